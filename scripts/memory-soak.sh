#!/usr/bin/env bash
# The memory soak: the quickstart model (configs/quickstart.yaml) trained for STEPS steps on
# the CPU with zero-shot evaluation and checkpoints on, its resident memory (VmRSS) sampled
# every second. Prints resident memory after warm-up (just after the first evaluation, over 5%
# of the run) against the end (the last 5%), and the growth between them;
# the samples are kept in OUT/rss.tsv (seconds, kB). Needs `make build` (or `make test`) and
# `make quickstart`'s shards in data/synth (written here if missing).
#
#   scripts/memory-soak.sh [STEPS] [BATCH] [OUT]    (default 3000 steps of batch 32, runs/memory-soak)
set -euo pipefail
cd "$(dirname "$0")/.."
steps="${1:-3000}" batch="${2:-32}" out="${3:-runs/memory-soak}"
every=$(( steps / 6 ))
BIN=target/release/oxclip
[ -x "$BIN" ] || { echo "memory-soak: $BIN is missing; run make build first" >&2; exit 1; }
if [ ! -f data/synth/val/index.json ]; then
  "$BIN" data synth --out data/synth --samples 20000 --val-samples 2000 --image-size 64
fi
if [ -e "$out" ] && [ ! -f "$out/rss.tsv" ]; then
  echo "memory-soak: $out exists and is not an earlier soak's folder; name another" >&2; exit 1
fi
rm -rf "$out"
mkdir -p "$out"
"$BIN" train --config configs/quickstart.yaml --run-dir "$out/run" \
  --set "train.steps=$steps" --set "train.batch_size=$batch" \
  --set "train.eval_every=$every" --set "train.checkpoint_every=$every" \
  --set train.log_every=100 > "$out/train.log" 2>&1 &
pid=$!
start=$(date +%s)
while kill -0 "$pid" 2>/dev/null; do
  rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
  [ -n "$rss" ] && echo "$(( $(date +%s) - start ))	$rss" >> "$out/rss.tsv"
  sleep 1
done
wait "$pid" || { echo "memory-soak: training failed; see $out/train.log" >&2; exit 1; }
# Warm-up ends with the first evaluation (it allocates what evaluation needs): the window is
# the 5% of the run after its log line; the end is the last 5%.
first_eval=$(grep -m1 "| zero-shot" "$out/run/train.log" 2>/dev/null || grep -m1 "| zero-shot" "$out/train.log" || true)
warm_from=0
if [ -n "$first_eval" ]; then
  warm_from=$(( $(date -d "$(echo "$first_eval" | cut -c1-19)Z" +%s) - start ))
fi
awk -v steps="$steps" -v batch="$batch" -v from="$warm_from" '
  NR == FNR { end_t = $1; n++; next }
  FNR == 1 { span = (end_t * 0.05 > 10) ? end_t * 0.05 : 10 }
  $1 >= from + 5 && $1 <= from + 5 + span { w += $2; wn++ }
  $1 >= 0.95 * end_t { e += $2; en++ }
  $2 > peak { peak = $2 }
  END {
    warm = w / wn; last = e / en
    printf "memory soak: %d steps of batch %d in %d s, %d samples; first evaluation done at %d s\n", steps, batch, end_t, n, from
    printf "resident after warm-up %.0f MB, at the end %.0f MB, growth %+.1f%% (goal < 5%%), peak %.0f MB\n",
      warm / 1024, last / 1024, 100 * (last - warm) / warm, peak / 1024
  }' "$out/rss.tsv" "$out/rss.tsv"
