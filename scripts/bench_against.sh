#!/usr/bin/env bash
# Speed of this tree against another build of oxclip, measured in one run so the machine's
# load is shared: `bash scripts/bench_against.sh /path/to/old/oxclip [rounds]`
# (`make bench-against BASE=/path/to/old/oxclip`). Runs the training step (tiny and small
# models, CPU) and the data loader (8 synthetic shards, train transform) with both binaries,
# alternating, `rounds` times (default 3), and prints the median samples/s of each and the
# ratio new / base. A ratio under 1 means this tree is slower.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE="${1:?usage: bench_against.sh BASE_BINARY [ROUNDS]}"
ROUNDS="${2:-3}"
NEW=target/release/oxclip
THREADS="${BENCH_THREADS:-2}"
[ -x "$BASE" ] || { echo "bench_against: $BASE is not an executable oxclip binary" >&2; exit 2; }
[ -x "$NEW" ] || { echo "bench_against: $NEW missing; run make build first" >&2; exit 2; }

SHARDS="${BENCH_SHARDS:-${TMPDIR:-/tmp}/oxclip-bench-synth256}"
[ -f "$SHARDS/train/index.json" ] || "$NEW" data synth --out "$SHARDS" --samples 8000 \
  --val-samples 0 --image-size 256 --shard-size 1000 >/dev/null

OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT
for round in $(seq "$ROUNDS"); do
  for which in base new; do
    bin=$BASE; [ "$which" = new ] && bin=$NEW
    for spec in "tiny 64 20" "small 64 10"; do
      set -- $spec
      printf '%s train-%s %s\n' "$which" "$1" "$("$bin" bench train --model "$1" --batch-size "$2" \
        --steps "$3" --warmup 3 --device cpu --threads "$THREADS")" >>"$OUT"
    done
    printf '%s loader %s\n' "$which" "$("$bin" bench loader --data "$SHARDS/train" --workers 2 \
      --batch-size 64 --samples 2048)" >>"$OUT"
  done
  echo "round $round of $ROUNDS done" >&2
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
rates = {}
for line in open(sys.argv[1]):
    which, what, record = line.split(" ", 2)
    rates.setdefault(what, {}).setdefault(which, []).append(json.loads(record)["samples_per_second"])
failed = False
for what, by in rates.items():
    base, new = statistics.median(by["base"]), statistics.median(by["new"])
    print(f"{what:12s} base {base:9.1f}  new {new:9.1f} samples/s  new/base = {new / base:.3f}"
          f"  (rounds: base {', '.join(f'{r:.1f}' for r in by['base'])}; new {', '.join(f'{r:.1f}' for r in by['new'])})")
PY
