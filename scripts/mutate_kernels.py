#!/usr/bin/env python3
"""Injects realistic bugs into the CUDA kernel sources and shows that the emulator tests catch
each one (docs/emulator.md, "Mutation testing").

Each mutation replaces one piece of kernel text by a wrong one. The generator applies it to
every kernel source that contains the text (all dtype variants), the altered host-C++ kernels
are compiled into a shared library, and the already-built test_emulator runs against it
(SLOWED_EMU_KERNELS=...), test case by test case, until one fails. A mutation counts as caught
when a test case fails or times out; the unaltered kernels, built the same way, must pass
first. Nothing in the source tree is modified.

Usage (after building test_emulator, e.g. scripts/test -R emulator):
  scripts/mutate_kernels.py [--build build] [--only NAME...] [--markdown FILE]
"""

import argparse
import hashlib
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent

# (name, kernel, what the bug is, old text, new text). Old texts are unique in their source.
MUTATIONS = [
    ("tail-off-by-one", "emce rows",
     "the scalar tail loop stops one element early",
     "for (long long j = head + nvec * SLOWED_VEC + threadIdx.x; j < V; j += blockDim.x)",
     "for (long long j = head + nvec * SLOWED_VEC + threadIdx.x; j < V - 1; j += blockDim.x)"),
    ("missing-barrier", "emce rows",
     "no __syncthreads between the warp leaders' writes and warp 0's reads",
     "  if (lane == 0) smem[warp] = v;\n  __syncthreads();\n",
     "  if (lane == 0) smem[warp] = v;\n"),
    ("shuffle-width", "emce rows",
     "the warp reduction starts at offset 8: half-warps never merge",
     "for (int o = 16; o > 0; o >>= 1) v = merge(v, shfl_xor(v, o));",
     "for (int o = 8; o > 0; o >>= 1) v = merge(v, shfl_xor(v, o));"),
    ("swapped-merge", "emce rows",
     "the online-softmax merge rescales each sum by the other side's factor",
     "r.s = a.s * fa + b.s * fb;",
     "r.s = a.s * fb + b.s * fa;"),
    ("misaligned-head", "emce rows",
     "the scalar head is the row's offset from alignment, not the distance to it",
     "long long head = static_cast<long long>(((16 - (addr & 15)) & 15) / sizeof(storage_t));",
     "long long head = static_cast<long long>((addr & 15) / sizeof(storage_t));"),
    ("lost-nan", "emce rows",
     "the entropy of a NaN row becomes 0 (fmaxf drops the NaN), the bug this emulator found",
     "const float h = lse != lse ? lse : fmaxf(lse - r.t / r.s, 0.f);",
     "const float h = fmaxf(lse - r.t / r.s, 0.f);"),
    ("zero-rows-condition", "emce zero_rows",
     "ratio mode zeroes the rows it keeps instead of those it masks",
     "if (!kernel_keep[i] || keep[i]) continue;",
     "if (!kernel_keep[i] && keep[i]) continue;"),
    ("grid-stride", "emce scale_rows",
     "the backward's row loop strides by gridDim + 1 and skips rows when the grid is small",
     "for (long long i = blockIdx.x; i < n; i += gridDim.x) {\n    const float f = per_row",
     "for (long long i = blockIdx.x; i < n; i += gridDim.x + 1) {\n    const float f = per_row"),
    ("st-shuffle-width", "slow tuning sums",
     "the five-sum warp reduction starts at offset 8",
     "for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);",
     "for (int off = 8; off > 0; off >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], off);"),
    ("st-missing-barrier", "slow tuning sums",
     "no __syncthreads between the per-warp partial writes and their reads",
     "  __syncthreads();\n#pragma unroll\n  for (int k = 0; k < 5; ++k) v[k] = lane < nwarps",
     "#pragma unroll\n  for (int k = 0; k < 5; ++k) v[k] = lane < nwarps"),
    ("st-slot-offset", "slow tuning finalize",
     "each tensor reduces the partial sums from slot 0, not from its own first slot",
     "const double* slot = partials + 5LL * (first_slot + c);",
     "const double* slot = partials + 5LL * c;"),
    ("st-finalize-last-slot", "slow tuning finalize",
     "the slot loop stops one slot early: a tensor's last chunk is left out of its sums",
     "for (long long c = threadIdx.x; c < nchunks; c += blockDim.x) {",
     "for (long long c = threadIdx.x; c + 1 < nchunks; c += blockDim.x) {"),
    ("st-finalize-first", "slow tuning finalize",
     "block b finalizes slot b even when slot 0 continues a tensor finalized before",
     "const int t = first + blockIdx.x;",
     "const int t = blockIdx.x;"),
    ("st-chunk-tail", "slow tuning adam apply",
     "the apply loop stops one element before the chunk end",
     "for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {\n    const float p = "
     "to_float(param[i]);\n    float m = to_float(exp_avg[i]), v = to_float(exp_avg_sq[i]);\n"
     "    float vmax = h.amsgrad ? to_float(max_exp_avg_sq[i]) : 0.f;\n    const float u = "
     "adam_update(p, to_float(grad[i]), m, v, vmax, h, decoupled != 0);\n    float x",
     "for (long long i = begin + threadIdx.x; i < end - 1; i += blockDim.x) {\n    const float p = "
     "to_float(param[i]);\n    float m = to_float(exp_avg[i]), v = to_float(exp_avg_sq[i]);\n"
     "    float vmax = h.amsgrad ? to_float(max_exp_avg_sq[i]) : 0.f;\n    const float u = "
     "adam_update(p, to_float(grad[i]), m, v, vmax, h, decoupled != 0);\n    float x"),
    ("st-swapped-betas", "slow tuning adam",
     "the first moment mixes with the betas swapped",
     "m = m * h.beta1 + g * h.one_minus_beta1;",
     "m = m * h.one_minus_beta1 + g * h.beta1;"),
    ("st-projection-sign", "slow tuning adam apply",
     "the drift projection moves away from theta_0",
     "if (project) x = x - one_minus_g * (x - to_float(init[i]));",
     "if (project) x = x + one_minus_g * (x - to_float(init[i]));"),
]


class NotApplied(Exception):
    """The mutation's text does not occur exactly once in the kernel sources that hold it."""


def read_config(build):
    path = build / "tests" / "emulator" / "mutation_build.txt"
    if not path.exists():
        sys.exit(f"{path} is missing: configure and build test_emulator first")
    cfg = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition("=")
        cfg[key] = value
    return cfg


def build_kernels(cfg, work, cache, replace):
    """Generates (optionally mutated) kernels and links them into work/kernels.so."""
    gen = work / "gen"
    gen.mkdir(parents=True, exist_ok=True)
    for f in gen.iterdir():
        f.unlink()
    cmd = [cfg["generator"], "--out", str(gen)] + cfg["generator_args"].split()
    if replace:
        old, new = work / "old.txt", work / "new.txt"
        old.write_text(replace[0])
        new.write_text(replace[1])
        cmd += ["--replace", str(old), str(new)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        if replace and "--replace:" in r.stderr:
            raise NotApplied(r.stderr.strip())
        sys.exit(f"generator failed: {' '.join(cmd)}\n{r.stderr}")
    flags = ["-std=c++17", "-fPIC"] + cfg["flags"].split() + ["-I", cfg["include"]]
    objects = []
    for src in sorted(gen.glob("*.cpp")):
        key = hashlib.sha1(src.read_bytes() + " ".join(flags).encode()).hexdigest()
        obj = cache / f"{key}.o"
        if not obj.exists():
            subprocess.run([cfg["cxx"], *flags, "-c", str(src), "-o", str(obj)], check=True)
        objects.append(str(obj))
    lib = work / "kernels.so"
    subprocess.run([cfg["cxx"], "-shared", "-o", str(lib), *objects, cfg["emulator_library"]],
                   check=True)
    return lib


def test_cases(cfg):
    # Catch2 v2 exits with the number of cases listed, so the exit status is not an error.
    r = subprocess.run([cfg["test_program"], "--list-test-names-only"], capture_output=True,
                       text=True)
    names = [line.strip() for line in r.stdout.splitlines() if line.strip()]
    if not names or r.returncode != len(names) % 256:
        sys.exit(f"cannot list the test cases of {cfg['test_program']}:\n{r.stdout}{r.stderr}")
    return names


def test_spec(name):
    """A Catch2 test spec that matches exactly the case `name` (',' separates specs, '[' starts
    a tag, '*' is a wildcard, a leading '~' or '-' excludes: all escaped with a backslash)."""
    out = "".join("\\" + c if c in ",[]*\\\"" else c for c in name)
    return "\\" + out if out[:1] in "~-" else out


def failure_of(out):
    """How a case failed, in one short line: the emulator's or another exception's message, or
    the failed assertion and the first message logged with it (Catch2's console report)."""
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if not line.rstrip().endswith("FAILED:"):
            continue
        block = lines[i + 1:i + 40]
        for j, l in enumerate(block):
            if "due to unexpected exception with message" in l or "due to a fatal error" in l:
                msg = next((m.strip() for m in block[j + 1:] if m.strip()), "")
                return "exception: " + msg[:200]
        check = block[0].strip() if block else ""
        msg = next((block[j + 1].strip() for j, l in enumerate(block[:-1])
                    if l.startswith("with message")), "")
        return (check + (" -- " + msg if msg else ""))[:200]
    return out.strip().splitlines()[-1][:200] if out.strip() else "(no output)"


def run_case(cfg, lib, name, timeout):
    env = dict(os.environ, SLOWED_EMU_KERNELS=str(lib))
    try:
        r = subprocess.run([cfg["test_program"], test_spec(name), "-a"], env=env,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", ""
    if r.returncode != 0:
        return "fail", failure_of(r.stdout + r.stderr)
    if not re.search(r"All tests passed \(\d+ assertions? in 1 test case\)",
                                           r.stdout):
        sys.exit(f"'{name}' did not run as exactly one test case:\n{r.stdout[-3000:]}")
    return "pass", ""


def ordered(cases, kernel):
    """Cases of the mutated family first (they catch it soonest), then the rest."""
    key = "Slow Tuning" if kernel.startswith("slow tuning") else "loss"
    return [c for c in cases if key in c] + [c for c in cases if key not in c]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", default=str(ROOT / "build"))
    ap.add_argument("--only", nargs="*", help="mutation names to run")
    ap.add_argument("--markdown", help="write the result table to this file")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per test case")
    args = ap.parse_args()
    cfg = read_config(pathlib.Path(args.build))
    cases = test_cases(cfg)
    cache = pathlib.Path(tempfile.gettempdir()) / "slowed_mutation_objects"
    cache.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="slowed_mutate_") as tmp:
        work = pathlib.Path(tmp)
        lib = build_kernels(cfg, work, cache, None)
        for name in cases:
            status, out = run_case(cfg, lib, name, args.timeout)
            if status != "pass":
                sys.exit(f"the unaltered kernels fail '{name}' ({status}): {out}")
        print(f"unaltered kernels: all {len(cases)} test cases pass", flush=True)
        rows = []
        for name, kernel, what, old, new in MUTATIONS:
            if args.only and name not in args.only:
                continue
            start = time.time()
            try:
                lib = build_kernels(cfg, work, cache, (old, new))
            except NotApplied as e:
                rows.append((name, kernel, what, "did not apply", "", str(e), time.time() - start))
                print(f"{name:22s} did not apply: {e}", flush=True)
                continue
            caught_by, status, how = "", "not caught", ""
            for case in ordered(cases, kernel):
                result, how = run_case(cfg, lib, case, args.timeout)
                if result != "pass":
                    caught_by, status = case, ("caught" if result == "fail" else "caught (timeout)")
                    break
            secs = time.time() - start
            rows.append((name, kernel, what, status, caught_by, how, secs))
            print(f"{name:22s} {status:16s} {secs:6.1f} s  {caught_by}\n{'':24s}{how}", flush=True)
    table = ["| mutation | kernel | injected bug | result | first failing test case | how it failed | s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    cell = lambda t: t.replace("|", "\\|")
    for name, kernel, what, status, caught_by, how, secs in rows:
        table.append(f"| {name} | {kernel} | {cell(what)} | {status} | {cell(caught_by)} | "
                     f"`{how.replace('`', '')}` | {secs:.1f} |" if how else
                     f"| {name} | {kernel} | {cell(what)} | {status} | {cell(caught_by)} |  | "
                     f"{secs:.1f} |")
    text = "\n".join(table) + "\n"
    print(text)
    if args.markdown:
        pathlib.Path(args.markdown).write_text(text)
    return 0 if all(r[3].startswith("caught") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
