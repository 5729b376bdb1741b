#!/usr/bin/env bash
# Runs every fault case of launch/tests/faults.rs N times (default 20): a flatten failure, a
# gradient hook panic, a sum that fails to start and a rank killed mid-backward on one of four
# CPU ranks (every rank must
# exit naming the cause, and --resume auto must end equal to the run that never failed), and
# a bucket of missing gradients (summed as zeros; the run goes on). Needs `make setup` first.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-20}"
# shellcheck disable=SC1091
source <(sed -n 's/^\([A-Z_]*\) := \(.*\)$/export \1=\2/p' "${OXCLIP_CACHE:-$HOME/.cache/oxclip}/env.mk")
export LIBTORCH="${LIBTORCH:-$OXCLIP_LIBTORCH}"
OXCLIP_FAULT_RUNS="$runs" cargo test --release --locked -p oxclip --test faults -- --nocapture
