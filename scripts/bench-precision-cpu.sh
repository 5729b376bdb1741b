#!/usr/bin/env bash
# Training-step throughput of each precision on this CPU, oxclip and open_clip side by side
# in one run (docs/benchmarks.md, "Precision on the CPU"): ViT-B-32, batch 64, random inputs.
# Rounds alternate the runs (oxclip fp32, oxclip P, ..., open_clip fp32, open_clip P, ...), so
# that a machine whose load drifts skews no one of them; each run prints one JSON line.
#
#   scripts/bench-precision-cpu.sh            # PRECISIONS="fp32 amp_bf16" ROUNDS=2 STEPS=2
#   PRECISIONS="fp32 amp amp_bf16 pure_bf16" ROUNDS=1 scripts/bench-precision-cpu.sh
#
# BIN: the oxclip binary (target/release/oxclip); PY: a Python with torch 2.11 and
# open_clip_torch 3.3.0 (/tmp/refenv/bin/python); THREADS: threads for both (all cores).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/oxclip}
PY=${PY:-/tmp/refenv/bin/python}
PRECISIONS=${PRECISIONS:-fp32 amp_bf16}
ROUNDS=${ROUNDS:-2}
STEPS=${STEPS:-2}
WARMUP=${WARMUP:-1}
THREADS=${THREADS:-$(nproc)}
BATCH=${BATCH:-64}
grep -o -m1 -w 'avx512_bf16\|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ' || true
echo "($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, $THREADS threads)"
for round in $(seq "$ROUNDS"); do
  for p in $PRECISIONS; do
    "$BIN" bench train --model ViT-B-32 --batch-size "$BATCH" --steps "$STEPS" --warmup "$WARMUP" \
      --device cpu --threads "$THREADS" --precision "$p"
  done
  for p in $PRECISIONS; do
    "$PY" scripts/bench_open_clip.py --model-config configs/models/open_clip/ViT-B-32.json \
      --batch-size "$BATCH" --steps "$STEPS" --warmup "$WARMUP" --threads "$THREADS" --device cpu \
      --precision "$p"
  done
  echo "# round $round done"
done
