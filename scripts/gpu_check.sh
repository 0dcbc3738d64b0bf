#!/usr/bin/env bash
# One-call GPU check for a short device lease (../shared/guide/device.md): configure and build
# with ninja, run the CUDA tests (fused kernels on), compute-sanitizer memcheck and racecheck over them, the
# benchmarks and the anchor harness; logs and JSON go to $OUT (default ./out).
#   usage: scripts/gpu_check.sh [quick]      (quick: tests + one benchmark shape, no sanitizer)
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${OUT:-$root/out}"
mkdir -p "$out"
py="${PYTHON:-python3}"
build="${SLOWED_BUILD_DIR:-$root/build-gpu}"
mode="${1:-full}"
log() { printf '[gpu_check %s] %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$out/gpu_check.log"; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; "$py" -c 'import torch;print(torch.__version__, torch.version.cuda)'; } > "$out/device.txt" 2>&1
log "device: $(head -2 "$out/device.txt" | tail -1)"
prefix="$("$py" -c 'import torch;print(torch.utils.cmake_prefix_path)')"
gen=(-G Ninja); command -v ninja >/dev/null || gen=()
log "configure + build"
cmake -S "$root" -B "$build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" \
  > "$out/configure.log" 2>&1 || { log "configure failed"; tail -30 "$out/configure.log"; exit 1; }
cmake --build "$build" -j "$(nproc)" > "$out/build.log" 2>&1 || { log "build failed"; grep -m20 error "$out/build.log"; exit 1; }

export SLOWED_CUDA_KERNELS=1
export SLOWED_CACHE_DIR="$out/cache"
log "ctest -L cuda"
(cd "$build" && ctest -L cuda --output-on-failure) > "$out/ctest_cuda.log" 2>&1
log "ctest -L cuda: rc=$? ($(grep -E 'tests passed|tests failed' "$out/ctest_cuda.log" | tail -1))"

if [[ "$mode" != quick ]] && command -v compute-sanitizer >/dev/null; then
  for t in test_loss test_linear_loss test_optim test_optim_fused test_cuda_runtime; do
    log "compute-sanitizer memcheck $t [cuda]"
    compute-sanitizer --tool memcheck --error-exitcode 3 "$build/tests/$t" "[cuda]" > "$out/memcheck_$t.log" 2>&1
    log "memcheck $t: rc=$? $(grep -E 'ERROR SUMMARY' "$out/memcheck_$t.log" | tail -1)"
  done
  # racecheck (shared-memory hazards) is far slower than memcheck: the kernels with shared
  # memory, each bounded so the call keeps its time budget (rc 124 = stopped by the bound).
  for t in test_loss test_optim_fused test_cuda_runtime; do
    log "compute-sanitizer racecheck $t [cuda]"
    timeout 120 compute-sanitizer --tool racecheck --error-exitcode 3 "$build/tests/$t" "[cuda]" \
      > "$out/racecheck_$t.log" 2>&1
    log "racecheck $t: rc=$? $(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$out/racecheck_$t.log" | tail -1)"
  done
fi

shapes=("8192 151936" "8192 49152")
[[ "$mode" != quick ]] && shapes+=("8192 128256")
for s in "${shapes[@]}"; do
  set -- $s
  log "bench_loss cuda bf16 N=$1 V=$2"
  "$build/benchmarks/bench_loss" --device cuda --dtype bfloat16 --n "$1" --v "$2" --iters 20 --warmup 3 \
    --json "$out/bench_loss_cuda_$2.json" >> "$out/bench.log" 2>&1
done
# The LM head fused with the loss (issue 11's CUDA shape; eager and the ATen composite beside it).
log "bench_linear_loss cuda bf16 N=8192 D=1536 V=151936"
"$build/benchmarks/bench_linear_loss" --device cuda --dtype bfloat16 --n 8192 --d 1536 --v 151936 \
  --iters 10 --warmup 3 --json "$out/bench_linear_loss_cuda.json" >> "$out/bench.log" 2>&1
for b in bench_optim bench_generate; do
  [[ -x "$build/benchmarks/$b" ]] || continue
  log "$b cuda"
  "$build/benchmarks/$b" --device cuda --json "$out/$b.json" >> "$out/bench.log" 2>&1
done
anchors="${SLOWED_ANCHORS:-$root/../shared/bench/anchors.py}"
if [[ -f "$anchors" ]]; then
  log "anchors ($anchors)"
  quick=(); [[ "$mode" == quick ]] && quick=(--quick)
  "$py" "$anchors" --out "$out/anchors.json" "${quick[@]}" >> "$out/anchors.log" 2>&1
else
  log "anchor harness not found at $anchors (set SLOWED_ANCHORS)"
fi
log "done"
