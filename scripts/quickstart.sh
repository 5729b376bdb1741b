#!/usr/bin/env bash
# The quickstart's main job: synthetic shards, a short CPU training run with zero-shot
# evaluation, and where to look at the curves. runs/quickstart is this demo's scratch space
# and is started afresh each time.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/oxclip

if [ ! -f data/synth/val/index.json ]; then
  "$BIN" data synth --out data/synth --samples 20000 --val-samples 2000 --image-size 64
fi
rm -rf runs/quickstart
start=$(date +%s)
"$BIN" train --config configs/quickstart.yaml
echo "quickstart: trained in $(( $(date +%s) - start )) s"
echo "quickstart: watch the curves with: tensorboard --logdir runs/quickstart/tensorboard"
