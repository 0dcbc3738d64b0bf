#!/usr/bin/env python3
"""Static statistics of every CUDA kernel slowed ships, without a GPU (docs/benchmarks.md,
"CUDA kernels, static").

benchmarks/kernel_dump writes each source and variant of the library's kernel registry as
NVRTC compiles it, NVRTC's cubin for sm_XY and NVRTC's PTX for compute_XY. This script then
reads, per kernel and architecture:

  - registers, shared memory, stack and local memory of NVRTC's cubin (cuobjdump -res-usage);
  - spill stores / loads, registers and shared memory from ptxas -v on NVRTC's PTX (the same
    compiler version as NVRTC's: the registers must agree with the cubin, checked);
  - the theoretical occupancy (resident warps of the SM's 64) at each block size the launcher
    uses, from registers, shared memory and block size (the CUDA occupancy calculator's rules:
    registers in units of 256 per warp, spread over 4 sub-partitions of 16384; 1 KiB of
    shared memory reserved per block, allocation unit 128 bytes; at most 32 blocks and 2048
    threads per SM; 228 KiB of shared memory per SM on sm_90, 164 KiB on sm_80: ARCH below),
    cross-checked against the toolkit's cuda_occupancy.h when it and g++ are present;
  - SASS instructions per element of every loop that loads the row (cuobjdump -sass): for each
    loop (a backward branch), a path count over its body from the loop head to the back branch:
    min and max over all paths, and the "typical" path (see typical_taken); elements per
    iteration from the loads in the body (16-byte loads x elements per vector, or scalar loads of
    the storage type).

Usage: scripts/kernel_stats.py [--build build] [--arch 90 80] [--markdown FILE] [--keep DIR]
Needs build/benchmarks/kernel_dump (cmake --build build --target kernel_dump), libnvrtc, ptxas
and cuobjdump (PATH, $CUDA_HOME/bin, or the copy Triton bundles in the project's venv).
"""

import argparse
import glob
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Per SM: registers, max threads, max blocks, shared memory per SM usable by blocks (bytes),
# reserved shared memory per block (bytes). sm_90 = H100/H200, sm_80 = A100.
ARCH = {
    90: dict(regs=65536, threads=2048, blocks=32, smem=228 * 1024, reserved=1024, max_reg=255),
    80: dict(regs=65536, threads=2048, blocks=32, smem=164 * 1024, reserved=1024, max_reg=255),
}
# Block sizes each kernel is launched with (the launchers: entropy_masked_cross_entropy_cuda.h
# emce_block_size: 256 for V < 8192, 512 below 65536, 1024 above; Slow Tuning: 512).
BLOCKS = {"slowed_emce": [256, 512, 1024], "slowed_st": [512], "slowed_scale_add": [256]}
# Storage bytes per element for SLOWED_DTYPE 0, 1, 2.
ELEM_BYTES = {"0": 4, "1": 2, "2": 2}
DTYPE = {"0": "fp32", "1": "bf16", "2": "fp16"}


def find_tool(name):
    for d in [os.environ.get("CUDA_HOME", "/usr/local/cuda") + "/bin"] + \
            os.environ.get("PATH", "").split(os.pathsep):
        p = os.path.join(d, name)
        if os.access(p, os.X_OK):
            return p
    venv = os.environ.get("SLOWED_VENV", os.path.expanduser("~/.cache/slowed/venv"))
    hits = sorted(glob.glob(f"{venv}/lib/python*/site-packages/triton/backends/nvidia/bin/{name}"))
    if hits:
        return hits[0]
    sys.exit(f"kernel_stats: {name} not found (PATH, $CUDA_HOME/bin, Triton's copy in {venv})")


def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"kernel_stats: {' '.join(cmd)} failed:\n{r.stdout}{r.stderr}")
    return r.stdout + r.stderr


def tool_version(path):
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else "?"


def res_usage(cuobjdump, cubin):
    out = run([cuobjdump, "-res-usage", cubin])
    funcs = {}
    for m in re.finditer(r"Function (\w+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)",
                         out):
        funcs[m.group(1)] = dict(reg=int(m.group(2)), stack=int(m.group(3)),
                                 shared=int(m.group(4)), local=int(m.group(5)))
    return funcs


def ptxas_v(ptxas, ptx, arch):
    out = run([ptxas, f"-arch=sm_{arch}", "-v", ptx, "-o", os.devnull])
    funcs = {}
    for block in re.split(r"Compiling entry function '", out)[1:]:
        name = block.split("'", 1)[0]
        spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                          r"loads", block)
        regs = re.search(r"Used (\d+) registers", block)
        smem = re.search(r"(\d+) bytes smem", block)
        funcs[name] = dict(stack=int(spill.group(1)), spill_st=int(spill.group(2)),
                           spill_ld=int(spill.group(3)), reg=int(regs.group(1)),
                           smem=int(smem.group(1)) if smem else 0)
    return funcs


def occupancy(arch, regs, smem_static, block):
    """Resident warps per SM (and the limiting resource) for one block size."""
    a = ARCH[arch]
    warps = (block + 31) // 32
    if regs * block > a["regs"]:
        return 0, "registers per block"
    reg_per_warp = -(-regs * 32 // 256) * 256
    warps_by_regs = (a["regs"] // 4 // reg_per_warp) * 4 if regs else 64
    limits = {
        "registers": warps_by_regs // warps,
        "threads": a["threads"] // (warps * 32),
        "blocks": a["blocks"],
    }
    smem = -(-(smem_static + a["reserved"]) // 128) * 128
    limits["shared memory"] = a["smem"] // smem
    which = min(limits, key=lambda k: limits[k])
    resident = min(limits[which] * warps, a["threads"] // 32)
    return resident, ("full" if resident == a["threads"] // 32 else which)


OCC_CHECK = r"""
#include <cuda_occupancy.h>
#include <cstdio>
int main(int argc, char** argv) {
  // argv: arch regs smem block ... ; prints resident warps per SM for each quadruple.
  for (int i = 1; i + 3 < argc; i += 4) {
    const int arch = std::atoi(argv[i]), regs = std::atoi(argv[i + 1]),
              smem = std::atoi(argv[i + 2]), block = std::atoi(argv[i + 3]);
    cudaOccDeviceProp p;
    p.computeMajor = arch / 10; p.computeMinor = arch % 10;
    p.maxThreadsPerBlock = 1024; p.maxThreadsPerMultiprocessor = 2048;
    p.regsPerBlock = 65536; p.regsPerMultiprocessor = 65536; p.warpSize = 32;
    p.sharedMemPerBlock = 49152;
    p.sharedMemPerMultiprocessor = arch == 80 ? 167936 : 233472;
    p.sharedMemPerBlockOptin = arch == 80 ? 166912 : 232448;
    p.numSms = arch == 80 ? 108 : 132; p.reservedSharedMemPerBlock = 1024;
    cudaOccFuncAttributes f;
    f.maxThreadsPerBlock = 1024; f.numRegs = regs; f.sharedSizeBytes = smem;
    f.partitionedGCConfig = PARTITIONED_GC_OFF; f.shmemLimitConfig = FUNC_SHMEM_LIMIT_DEFAULT;
    f.maxDynamicSharedSizeBytes = 0; f.numBlockBarriers = 1;
    cudaOccDeviceState st;
    cudaOccResult r;
    if (cudaOccMaxActiveBlocksPerMultiprocessor(&r, &p, &f, &st, block, 0) != CUDA_OCC_SUCCESS) {
      std::printf("error\n");
      continue;
    }
    std::printf("%d\n", r.activeBlocksPerMultiprocessor * ((block + 31) / 32));
  }
}
"""


def occupancy_check(rows, work):
    """Recomputes every occupancy with the toolkit's cuda_occupancy.h (the CUDA occupancy API's
    host implementation); returns a note, or exits when it disagrees with occupancy()."""
    header = pathlib.Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
    cxx = shutil.which("g++") or shutil.which("c++")
    if not (header / "cuda_occupancy.h").exists() or not cxx:
        return "not cross-checked (no cuda_occupancy.h or no C++ compiler)"
    src, exe = work / "occ_check.cpp", work / "occ_check"
    src.write_text("#include <cstdlib>\n" + OCC_CHECK)
    run([cxx, "-std=c++17", "-I", str(header), str(src), "-o", str(exe)])
    args = [str(x) for r in rows for x in r[:4]]
    got = run([str(exe)] + args).split()
    for r, g in zip(rows, got):
        if g != str(r[4]):
            sys.exit(f"kernel_stats: occupancy of arch {r[0]} regs {r[1]} smem {r[2]} block "
                     f"{r[3]}: {r[4]} warps here, cuda_occupancy.h says {g}")
    return f"all {len(rows)} values agree with {header / 'cuda_occupancy.h'}"


# ---- SASS ------------------------------------------------------------------------------------

INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def sass_functions(cuobjdump, cubin):
    out = run([cuobjdump, "-sass", cubin])
    funcs, cur = {}, None
    for line in out.splitlines():
        m = re.search(r"Function : (\w+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = INSTR.search(line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2).strip()))
    return funcs


def parse(text):
    """(guard predicate or None, negated, opcode, operands)."""
    m = re.match(r"(@(!?)(U?P\w+)\s+)?(\S+)\s*(.*)", text)
    return (m.group(3), m.group(2) == "!", m.group(4), m.group(5)) if m else (None, False, "", "")


def branch_target(ops):
    m = re.match(r"(0x[0-9a-f]+)", ops.strip().strip("`(").strip())
    return int(m.group(1), 16) if m else None


def pred_writes(opcode, ops):
    """Predicates an instruction writes (its leading predicate operands)."""
    out = []
    for o in ops.split(","):
        o = o.strip()
        if re.fullmatch(r"!?U?P[0-6]", o):
            out.append(o.lstrip("!"))
        else:
            break
    return out


def typical_taken(body, i):
    """The typical direction of the conditional branch body[i] (its predicate written in the
    loop). In these loops the only data-dependent guard between two registers is the online
    softmax's "is z a new maximum" test (`FSETP.GT P, z, m` or `FSETP.GEU P, m, z`, whichever
    ptxas picks), whose branch skips the rescale block: typically taken (no new maximum). Guards
    against a constant (z = -Inf, the exp2 range check) typically fall through."""
    for j in range(i - 1, -1, -1):
        _, _, op, ops = parse(body[j][1])
        if parse(body[i][1])[0] in pred_writes(op, ops):
            fields = [f.strip() for f in ops.split(",")]
            regs = [f for f in fields[2:4] if re.fullmatch(r"-?\|?R\d+\|?(\.reuse)?", f)]
            return op.startswith("FSETP") and len(regs) == 2
    return False


def version_setter(instrs, head, pred):
    """The instruction before the loop that last wrote loop-invariant predicate `pred`."""
    for a, t in reversed([x for x in instrs if x[0] < head]):
        _, _, op, ops = parse(t)
        if pred in pred_writes(op, ops):
            return t
    return "?"


def loop_paths(instrs, head, back):
    """Instruction counts of the paths through the loop body [head, back], for each assignment
    of the loop-invariant branch predicates (versions): {version: (min, typical, max, names)}."""
    body = [(a, t) for a, t in instrs if head <= a <= back]
    index = {a: k for k, (a, _) in enumerate(body)}
    written = set()
    for _, t in body:
        _, _, op, ops = parse(t)
        written.update(pred_writes(op, ops))
    invariant = sorted({parse(t)[0] for _, t in body
                        if parse(t)[2].startswith("BRA") and parse(t)[0]
                        and parse(t)[0] not in written})
    results = {}
    for mask in range(1 << len(invariant)):
        value = {p: bool(mask >> k & 1) for k, p in enumerate(invariant)}
        INF = float("inf")
        best = {0: (0, 0, 0)}  # index -> (min, max, typical) to reach it (exclusive)
        lo = [INF] * len(body)
        hi = [-INF] * len(body)
        ty = [None] * len(body)
        lo[0] = hi[0] = 0
        ty[0] = 0
        for k, (a, t) in enumerate(body):
            if lo[k] == INF:
                continue
            pred, neg, op, ops = parse(t)
            succ = []  # (index, is_typical)
            if k == len(body) - 1:
                continue  # the back branch ends the iteration
            if op.startswith("BRA") and not op.startswith("BRA.DIV"):
                tgt = branch_target(ops)
                taken_ok = tgt in index and tgt > a
                if pred is None:
                    succ = [(index[tgt], True)] if taken_ok else []
                elif pred in value:
                    take = value[pred] != neg
                    succ = [(index[tgt], True)] if take and taken_ok else \
                           ([(k + 1, True)] if not take else [])
                else:
                    tt = typical_taken(body, k)
                    if taken_ok:
                        succ.append((index[tgt], tt))
                    succ.append((k + 1, not tt))
            elif op == "EXIT" and pred is None:
                succ = []
            else:
                succ = [(k + 1, True)]
            for s, typical in succ:
                lo[s] = min(lo[s], lo[k] + 1)
                hi[s] = max(hi[s], hi[k] + 1)
                if typical and ty[k] is not None and ty[s] is None:
                    ty[s] = ty[k] + 1
        end = len(body) - 1
        names = ", ".join(f"{'!' if not v else ''}{p}" for p, v in value.items())
        results[names or "-"] = (lo[end] + 1, (ty[end] + 1) if ty[end] is not None else None,
                                 hi[end] + 1, body, value)
    return results


def loops(instrs):
    """Innermost loops: (head, back branch) of each backward branch with no other loop inside."""
    found = []
    for a, t in instrs:
        pred, neg, op, ops = parse(t)
        if op == "BRA":
            tgt = branch_target(ops)
            if tgt is not None and tgt < a:
                found.append((tgt, a))
    for h, b in found:
        if not any((h, b) != (h2, b2) and h <= h2 and b2 <= b for h2, b2 in found):
            yield h, b


def path_loads(body, value):
    """Loads on the path through the version `value` (all instructions in the body that are not
    in a version excluded by a loop-invariant branch; approximated by the whole body when there
    are no versions)."""
    return [t for _, t in body]


def count_loads(body, elem_bytes):
    v128 = sum(1 for _, t in body if re.search(r"\bLDG\.E\.128\b", t))
    scalar_op = "LDG.E.U16" if elem_bytes == 2 else "LDG.E "
    scalar = sum(1 for _, t in body if scalar_op in t + " ")
    stores = sum(1 for _, t in body if re.search(r"\bSTG\.", t))
    return v128, scalar, stores


def version_body(body, value):
    """The instructions reachable in one version (loop-invariant predicates fixed)."""
    index = {a: k for k, (a, _) in enumerate(body)}
    seen, todo = set(), [0]
    while todo:
        k = todo.pop()
        if k in seen or k >= len(body):
            continue
        seen.add(k)
        a, t = body[k]
        pred, neg, op, ops = parse(t)
        if k == len(body) - 1:
            continue
        if op.startswith("BRA") and not op.startswith("BRA.DIV"):
            tgt = branch_target(ops)
            if pred is None:
                if tgt in index and tgt > a:
                    todo.append(index[tgt])
            elif pred in value:
                if value[pred] != neg:
                    if tgt in index and tgt > a:
                        todo.append(index[tgt])
                else:
                    todo.append(k + 1)
            else:
                if tgt in index and tgt > a:
                    todo.append(index[tgt])
                todo.append(k + 1)
        else:
            todo.append(k + 1)
    return [body[k] for k in sorted(seen)]


def loop_table(name, variant, arch, instrs, elem_bytes):
    rows = []
    for head, back in sorted(set(loops(instrs))):
        for ver, (lo, ty, hi, body, value) in loop_paths(instrs, head, back).items():
            vb = version_body(body, value)
            v128, scalar, stores = count_loads(vb, elem_bytes)
            if v128 == 0 and scalar == 0:
                continue
            elems = v128 * (16 // elem_bytes) if v128 else scalar
            kind = "16-byte" if v128 else "scalar"
            mufu = sum(1 for _, t in vb if "MUFU" in t)
            tanh = any("MUFU.TANH" in t for _, t in vb)
            if value:
                ver = "; ".join(f"{p}={'true' if v else 'false'}, {p} from `{version_setter(instrs, head, p)}`"
                                for p, v in value.items())
            rows.append(dict(kernel=name, variant=variant, arch=arch, head=head, back=back,
                             version=ver, kind=kind, elems=elems, min=lo, typical=ty, max=hi,
                             loads=v128 or scalar, stores=stores, mufu=mufu, tanh=tanh,
                             static=len(vb)))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", default=str(ROOT / "build"))
    ap.add_argument("--arch", nargs="*", type=int, default=[90, 80])
    ap.add_argument("--markdown", help="write the tables to this file")
    ap.add_argument("--keep", help="write the dumped sources, cubins, PTX and SASS here")
    args = ap.parse_args()
    dump = pathlib.Path(args.build) / "benchmarks" / "kernel_dump"
    if not dump.exists():
        sys.exit(f"{dump} is missing: cmake --build {args.build} --target kernel_dump")
    cuobjdump, ptxas = find_tool("cuobjdump"), find_tool("ptxas")
    out_dir = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="slowed_kernel_stats_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    arch_args = sum((["--arch", str(a)] for a in args.arch), [])
    names = run([str(dump), "--out", str(out_dir)] + arch_args).split()
    nvrtc = (out_dir / "nvrtc.txt").read_text().strip()
    md = [f"Tools: cubins and PTX of {nvrtc} written by `build/benchmarks/kernel_dump`; ptxas "
          f"{tool_version(ptxas)} ({ptxas}); cuobjdump {tool_version(cuobjdump)} ({cuobjdump}).",
          "",
          "| kernel | dtype | arch | registers | shared B (cubin / ptxas) | stack B | spill st/ld B "
          "| occupancy warps/64 at block (limit) |",
          "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    loop_rows, occ_rows = [], []
    for name in names:
        variant = name.rsplit("_d", 1)[1] if re.search(r"_d\d+$", name) else "-"
        for arch in args.arch:
            cubin = str(out_dir / f"{name}.sm_{arch}.cubin")
            ptx = str(out_dir / f"{name}.compute_{arch}.ptx")
            res = res_usage(cuobjdump, cubin)
            pv = ptxas_v(ptxas, ptx, arch)
            sass = sass_functions(cuobjdump, cubin)
            if args.keep:
                (out_dir / f"{name}.sm_{arch}.sass").write_text(run([cuobjdump, "-sass", cubin]))
            for fn in sorted(res):
                r, p = res[fn], pv.get(fn)
                if p and p["reg"] != r["reg"]:
                    print(f"warning: {fn} sm_{arch}: ptxas {p['reg']} registers, NVRTC's cubin "
                          f"{r['reg']}", file=sys.stderr)
                blocks = next((b for k, b in BLOCKS.items() if fn.startswith(k)), [256])
                occ = []
                for b in blocks:
                    w, lim = occupancy(arch, r["reg"], p["smem"] if p else r["shared"], b)
                    occ_rows.append((arch, r["reg"], p["smem"] if p else r["shared"], b, w))
                    occ.append(f"{w} at {b} ({lim})")
                md.append(f"| {fn} | {DTYPE.get(variant, variant)} | sm_{arch} | {r['reg']} | "
                          f"{r['shared']} / {p['smem'] if p else '?'} | {r['stack']} | "
                          f"{p['spill_st'] if p else '?'}/{p['spill_ld'] if p else '?'} | "
                          f"{'; '.join(occ)} |")
                if fn in sass and fn.startswith("slowed_emce"):
                    loop_rows += loop_table(fn, variant, arch, sass.get(fn, []),
                                            ELEM_BYTES.get(variant, 4))
    md += ["", "Occupancy cross-check: " + occupancy_check(occ_rows, out_dir)]
    md += ["", "Innermost loops of the loss kernels that load the row (SASS instructions per iteration over the paths "
           "of one loop version; per element = per iteration / elements per iteration):", "",
           "| kernel | dtype | arch | loop (SASS addresses) | version | loads | elements/iter "
           "| instr/iter min / typical / max | instr/element min / typical / max | stores | MUFU |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in loop_rows:
        e = r["elems"]
        ty = r["typical"]
        md.append(f"| {r['kernel']} | {DTYPE.get(r['variant'], r['variant'])} | sm_{r['arch']} | "
                  f"{r['head']:#06x}-{r['back']:#06x} | {r['version']}"
                  f"{' (softcap: MUFU.TANH)' if r['tanh'] else ''} | {r['loads']} x {r['kind']} | "
                  f"{e} | {r['min']} / {ty if ty is not None else '-'} / {r['max']} | "
                  f"{r['min'] / e:.1f} / {(ty / e) if ty is not None else float('nan'):.1f} / "
                  f"{r['max'] / e:.1f} | {r['stores']} | {r['mufu']} |")
    text = "\n".join(md) + "\n"
    print(text)
    if args.markdown:
        pathlib.Path(args.markdown).write_text(text)
    if not args.keep:
        shutil.rmtree(out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
