#!/usr/bin/env bash
# `make bench`: oxclip's training step on the CPU, and open_clip's beside it in the same run
# when a Python with open_clip is given (OXCLIP_REF_PYTHON=/path/to/venv/bin/python; see
# tests/fixtures/make_fixtures.py for how to make one from PyPI). Prints JSON lines and the
# ratio oxclip / open_clip per model, then the same for the data loader (the loader baseline
# needs webdataset==0.2.86, braceexpand and pandas in that venv), on synthetic shards and, with
# that Python, on photo-like shards too (scripts/make_photo_shards.py; it also needs
# scikit-image in the venv: `pip install scikit-image`, whose wheel bundles the photographs).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/oxclip
THREADS="${BENCH_THREADS:-2}"
PY="${OXCLIP_REF_PYTHON:-}"

bench_one() { # model batch steps
  local model=$1 batch=$2 steps=$3
  local ours theirs
  ours=$("$BIN" bench train --model "$model" --batch-size "$batch" --steps "$steps" --warmup 3 \
    --device cpu --threads "$THREADS")
  echo "$ours"
  if [ -n "$PY" ]; then
    theirs=$("$PY" scripts/bench_open_clip.py --model-config "configs/models/$model.yaml" \
      --batch-size "$batch" --steps "$steps" --warmup 3 --threads "$THREADS")
    echo "$theirs"
    python3 - "$ours" "$theirs" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"ratio {a['model']} batch {a['batch_size']}: oxclip/open_clip = "
      f"{a['samples_per_second'] / b['samples_per_second']:.2f}")
PY
  fi
}

bench_one tiny 64 20
bench_one small 64 10

bench_loader() { # label shard-dir: 8 shards of 1000 samples, train transform to 224 px
  local label=$1 dir=$2 ours theirs
  ours=$("$BIN" bench loader --data "$dir" --workers 2 --batch-size 64 --samples 2048)
  echo "$ours"
  if [ -n "$PY" ]; then
    theirs=$("$PY" scripts/bench_open_clip_loader.py --data "$dir/{00000..00007}.tar" \
      --train-num-samples 8000 --workers 2 --batch-size 64 --samples 2048 2>/dev/null)
    echo "$theirs"
    python3 - "$label" "$ours" "$theirs" <<'PY'
import json, sys
label = sys.argv[1] + " " if sys.argv[1] else ""
a, b = json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(f"ratio loader {label}2 workers: oxclip/open_clip = "
      f"{a['samples_per_second'] / b['samples_per_second']:.2f}")
PY
  fi
}

# The data loader: 8 shards of 1000 synthetic 256 px JPEGs (flat-colour drawings, ~13 KB).
SHARDS="${BENCH_SHARDS:-${TMPDIR:-/tmp}/oxclip-bench-synth256}"
[ -f "$SHARDS/train/index.json" ] || "$BIN" data synth --out "$SHARDS" --samples 8000 \
  --val-samples 0 --image-size 256 --shard-size 1000 >/dev/null
bench_loader "" "$SHARDS/train"

# And on 8 shards of 1000 photo-like 256 px JPEGs (crops of real photographs, q95, ~28 KB as
# LAION's img2dataset output), which cost more to decode; written once with the reference
# Python (scikit-image needed, see above).
if [ -n "$PY" ]; then
  PHOTOS="${BENCH_PHOTO_SHARDS:-${TMPDIR:-/tmp}/oxclip-bench-photo256}"
  [ -f "$PHOTOS/sizes.json" ] || "$PY" scripts/make_photo_shards.py --out "$PHOTOS" \
    --samples 8000 --shard-size 1000 --seed 0 >/dev/null
  bench_loader photo "$PHOTOS"
fi

# Large batches (docs/large-batch.md): the tiled loss against the N x N oracle at N = 16384,
# both losses, and a step of batch 512 with and without micro-batches of 64 (peak memory).
ratio_loss() { # kind
  local tiled naive
  tiled=$("$BIN" bench loss --batch 16384 --dim 128 --kind "$1" --device cpu)
  naive=$("$BIN" bench loss --batch 16384 --dim 128 --kind "$1" --naive --device cpu)
  echo "$tiled"; echo "$naive"
  python3 - "$tiled" "$naive" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"ratio {a['kind']} loss N=16384: tiled/naive time = {a['seconds'] / b['seconds']:.2f}, "
      f"peak memory = {a['peak_rss_bytes'] / b['peak_rss_bytes']:.2f}")
PY
}
ratio_loss clip
ratio_loss siglip
for micro in 512 64; do
  "$BIN" bench train --model small --batch-size 512 --micro-batch-size $micro --steps 2 --warmup 1 \
    --device cpu --threads "$THREADS"
done
