#!/usr/bin/env bash
# One device call for the GPU presets of the reproduction (docs/reproduction.md, "GPU presets"):
# joins and checks the staged model (scripts/stage_join), builds slowed_distill with ninja and runs
# --preset gpu (base, sft, slowed) and, with "ablation", --preset gpu-ablation (slow, lem) into
# $OUT/slowed_distill_gpu (results.jsonl, results.csv, plot.png, samples/*.jsonl, log); before
# them, a one-rank NCCL smoke run of the data-parallel path ($OUT/distill_nccl.log).
#   usage: scripts/gpu_distill.sh [gpu|ablation|both]   (data: stage/data/ or ../shared/data)
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${OUT:-$root/out}"
mkdir -p "$out"
which="${1:-gpu}"
py="${PYTHON:-python3}"
build="${SLOWED_BUILD_DIR:-$root/build-gpu}"
log() { printf '[gpu_distill %s] %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$out/gpu_distill.log"; }
model="$root/stage/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
"$root/scripts/stage_join" "$model" 2>&1 | tee -a "$out/gpu_distill.log" || exit 1
data="$root/../shared/data"
[[ -d "$root/stage/data/bbh" ]] && data="$root/stage/data"
prefix="$("$py" -c 'import torch;print(torch.utils.cmake_prefix_path)')"
log "configure + build slowed_distill"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$prefix" \
  -DSLOWED_BUILD_TESTS=OFF > "$out/configure.log" 2>&1 || { log "configure failed"; tail -20 "$out/configure.log"; exit 1; }
cmake --build "$build" --target slowed_distill -j "$(nproc)" > "$out/build.log" 2>&1 ||
  { log "build failed"; grep -m20 error "$out/build.log"; exit 1; }
# First, seconds: the trainer as one NCCL rank under torchrun (docs/distributed.md), its gradient
# and counter sums through ProcessGroupNCCL, on a tiny random model with the staged tokenizer.
log "slowed_distill: one NCCL rank under torchrun (smoke model)"
timeout 180 "$py" -m torch.distributed.run --nproc-per-node 1 --no-python --master-addr 127.0.0.1 \
  --master-port 29531 "$build/examples/slowed_distill/slowed_distill" --smoke --quiet --device cuda \
  --data "$data" --model "$model" --tasks boolean_expressions --train-per-task 4 --test-per-task 1 \
  --advbench 2 --max-new-tokens 4 --safety-new-tokens 4 --modes base,slowed --no-checkpoints \
  --dist-timeout 60 --out "$out/distill_nccl" > "$out/distill_nccl.log" 2>&1
log "distill NCCL rank: rc=$? ($(grep -m1 'rank' "$out/distill_nccl.log"))"
presets=(gpu); [[ "$which" == ablation ]] && presets=(gpu-ablation); [[ "$which" == both ]] && presets=(gpu gpu-ablation)
for p in "${presets[@]}"; do
  log "slowed_distill --preset $p"
  /usr/bin/time -v "$build/examples/slowed_distill/slowed_distill" --preset "$p" --model "$model" --data "$data" \
    --out "$out/slowed_distill_gpu" --quiet >> "$out/gpu_distill.log" 2>&1
  log "$p: rc=$?"
done
log "done"
