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
