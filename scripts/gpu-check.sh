#!/usr/bin/env bash
# The device check, run on a GPU machine in one call (see docs/development.md): the binary
# built here is carried over with the cache's libtorch left behind; the machine's own PyTorch
# 2.11 supplies libtorch (CPU and CUDA) through LD_LIBRARY_PATH. Prints what it measured and
# writes it under $OUT (or ./gpu-check-out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check-out}"
mkdir -p "$OUT"
BIN=${BIN:-target/release/oxclip}
TORCH_LIB=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB:${LD_LIBRARY_PATH:-}"
export OXCLIP_LIBTORCH_CUDA="$TORCH_LIB/libtorch_cuda.so"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"

{
  echo "# oxclip bench train (CUDA)"
  for bs in 128 256; do
    timeout 240 "$BIN" bench train --model ViT-B-32 --batch-size $bs --steps 20 --warmup 5 --device cuda --amp-bf16
  done
  echo "# open_clip on the same GPU"
  for bs in 128 256; do
    timeout 240 python3 scripts/bench_open_clip.py --model-config configs/models/ViT-B-32.yaml \
      --batch-size $bs --steps 20 --warmup 5 --threads 16 --device cuda --amp-bf16 2>&1 | tail -n 1
  done
} 2>&1 | tee "$OUT/bench.txt"

# The NCCL backend: a one-rank NCCL run must give the loss curve of the single-process CUDA
# run (same seed, same data), and two ranks of 32 the weights of one of 64 (indexed data).
{
  echo "# NCCL vs single process (tiny model, synthetic data)"
  # pip's NCCL beside torch (torch/lib/../../nvidia/nccl/lib); loaded with libtorch_cuda anyway.
  export OXCLIP_NCCL="${OXCLIP_NCCL:-$(ls "$TORCH_LIB"/../../nvidia/nccl/lib/libnccl.so* 2>/dev/null | head -n 1)}"
  D=$(mktemp -d)
  cat > "$D/run.yaml" <<YAML
run_dir: $D/run
model: tiny
data: {train: "synthetic:2048", workers: 4}
train: {batch_size: 32, steps: 20, seed: 7, precision: fp32, device: cuda, log_every: 5, checkpoint_every: 0}
optim: {lr: 1.0e-4, warmup_steps: 2}
dist: {backend: nccl, timeout_s: 120}
YAML
  timeout 120 "$BIN" train --config "$D/run.yaml" --run-dir "$D/single" 2>&1 | grep -E "step .*loss|error" | tail -n 4
  timeout 120 "$BIN" launch --nproc-per-node 1 --master-port 29710 -- train --config "$D/run.yaml" --run-dir "$D/nccl1" 2>&1 | grep -E "step .*loss|NCCL|error" | tail -n 5
  if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    timeout 180 "$BIN" launch --nproc-per-node 2 --master-port 29720 -- train --config "$D/run.yaml" \
      --set train.batch_size=16 --run-dir "$D/nccl2" 2>&1 | grep -E "step .*loss|error" | tail -n 4
  fi
  python3 - "$D" <<'PY'
import sys, json, os
d = sys.argv[1]
def losses(run):
    path = os.path.join(d, run, "results.jsonl")
    if not os.path.exists(path):
        return None
    return [(r["step"], r["train/loss"]) for r in map(json.loads, open(path)) if "train/loss" in r]
a, b = losses("single"), losses("nccl1")
print("single :", a)
print("nccl x1:", b)
if a and b:
    print("max |loss difference|:", max(abs(x[1] - y[1]) for x, y in zip(a, b)))
PY
} 2>&1 | tee "$OUT/nccl.txt"

# Large batches (docs/large-batch.md): the tiled loss alone at growing N (bf16 products, as
# training runs them under amp_bf16), and ViT-B-32 steps with micro-batches at growing batch.
{
  echo "# bench loss, D = 512, bf16 products"
  for n in 65536 262144 1048576; do
    timeout 150 "$BIN" bench loss --batch $n --dim 512 --bf16 --device cuda || echo "N=$n failed (status $?)"
  done
  echo "# bench loss, D = 512, SigLIP"
  timeout 60 "$BIN" bench loss --batch 262144 --dim 512 --bf16 --kind siglip --device cuda || echo "failed"
  echo "# bench train ViT-B-32, micro-batches of 256"
  for bs in 1024 4096; do
    timeout 150 "$BIN" bench train --model ViT-B-32 --batch-size $bs --micro-batch-size 256 --steps 2 --warmup 1 \
      --device cuda --amp-bf16 || echo "batch $bs failed (status $?)"
  done
} 2>&1 | tee "$OUT/large-batch.txt"
