#!/usr/bin/env bash
# The long chaos soak: a 2-rank CPU run through `oxclip launch`, hit by faults of every kind
# (SIGKILL and SIGTERM to a rank and to the launcher, a damaged newest checkpoint) at steps
# drawn from a seed, resumed with --resume auto after each; at the end its weights, optimizer
# state, loader positions and batches must equal an uninterrupted run's, bit for bit. It is
# launch/tests/chaos.rs with more steps and faults than `make test` gives it.
#
#   scripts/chaos-soak.sh [STEPS] [FAULTS] [SEED]     (default 300 steps, 30 faults, seed 1)
#
# Needs `make setup` first.
set -euo pipefail
cd "$(dirname "$0")/.."
export OXCLIP_CHAOS_STEPS="${1:-300}" OXCLIP_CHAOS_FAULTS="${2:-30}" OXCLIP_CHAOS_SEED="${3:-1}"
# shellcheck disable=SC1091
source <(sed -n 's/^\([A-Z_]*\) := \(.*\)$/export \1=\2/p' "${OXCLIP_CACHE:-$HOME/.cache/oxclip}/env.mk")
export LIBTORCH="${LIBTORCH:-$OXCLIP_LIBTORCH}"
exec cargo test --release --locked -p oxclip --test chaos -- --nocapture
