#!/usr/bin/env bash
# `make bench`: oxclip's training step on the CPU, and open_clip's beside it in the same run
# when a Python with open_clip is given (OXCLIP_REF_PYTHON=/path/to/venv/bin/python; see
# tests/fixtures/make_fixtures.py for how to make one from PyPI). Prints JSON lines and the
# ratio oxclip / open_clip per model, then the same for the data loader (the loader baseline
# needs webdataset==0.2.86, braceexpand and pandas in that venv).
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

# The data loader: 8 shards of 1000 synthetic 256 px JPEGs, train transform to 224 px.
SHARDS="${BENCH_SHARDS:-${TMPDIR:-/tmp}/oxclip-bench-synth256}"
[ -f "$SHARDS/train/index.json" ] || "$BIN" data synth --out "$SHARDS" --samples 8000 \
  --val-samples 0 --image-size 256 --shard-size 1000 >/dev/null
ours=$("$BIN" bench loader --data "$SHARDS/train" --workers 2 --batch-size 64 --samples 2048)
echo "$ours"
if [ -n "$PY" ]; then
  theirs=$("$PY" scripts/bench_open_clip_loader.py --data "$SHARDS/train/{00000..00007}.tar" \
    --train-num-samples 8000 --workers 2 --batch-size 64 --samples 2048 2>/dev/null)
  echo "$theirs"
  python3 - "$ours" "$theirs" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"ratio loader 2 workers: oxclip/open_clip = {a['samples_per_second'] / b['samples_per_second']:.2f}")
PY
fi
