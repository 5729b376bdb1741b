#!/usr/bin/env bash
# The long run of oxclip's parser fuzzing (trainer/tests/fuzz.rs; `make test` runs the short
# one): every reader of untrusted files fed SCALE times its `make test` number of mutated and
# truncated inputs, printing one line per parser (inputs, accepted, refused, panics, hangs,
# largest single allocation). A failure prints the seed and iteration that reproduce it.
#
#   scripts/fuzz.sh [--scale N] [--seed S] [--iter I] [PARSER...]
#
#   --scale N   inputs per parser, as a multiple of make test's (default 20, env OXCLIP_FUZZ_SCALE)
#   --seed S    the run's seed (default 26, env OXCLIP_FUZZ_SEED); a new seed, new inputs
#   --iter I    run only iteration I (reproducing a reported failure)
#   PARSER      test names to run (default all): tar_shards shard_index_json csv_source
#               jsonl_source tokenizer_json safetensors_weights checkpoint_manifest
#               checkpoint_safetensors_header trainer_state_json sharded_index_json
#               pickle_weights run_config_yaml model_dir_config_json
#
# Needs LIBTORCH (as `make test` sets it from ~/.cache/oxclip/env.mk).
set -euo pipefail
cd "$(dirname "$0")/.."

export OXCLIP_FUZZ_SCALE="${OXCLIP_FUZZ_SCALE:-20}"
export OXCLIP_FUZZ_SEED="${OXCLIP_FUZZ_SEED:-26}"
filters=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --scale) OXCLIP_FUZZ_SCALE="$2"; shift 2 ;;
        --seed) OXCLIP_FUZZ_SEED="$2"; shift 2 ;;
        --iter) export OXCLIP_FUZZ_ITER="$2"; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) filters+=("$1"); shift ;;
    esac
done

if [[ -z "${LIBTORCH:-}" && -f "${OXCLIP_CACHE:-$HOME/.cache/oxclip}/env.mk" ]]; then
    LIBTORCH="$(sed -n 's/^OXCLIP_LIBTORCH *:\?= *//p' "${OXCLIP_CACHE:-$HOME/.cache/oxclip}/env.mk")"
    export LIBTORCH
fi

echo "fuzzing with OXCLIP_FUZZ_SEED=$OXCLIP_FUZZ_SEED OXCLIP_FUZZ_SCALE=$OXCLIP_FUZZ_SCALE"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
# One parser at a time per test thread, each printing its line as it ends.
cargo test --release --locked -p oxclip-trainer --test fuzz -- --nocapture "${filters[@]}" \
    2>&1 | tee "$log" | grep --line-buffered -E '^fuzz |panicked|hung|allocation|test result' || true
if ! grep -q '^test result: ok' "$log"; then
    status=1
    echo "fuzzing failed; the full log:" >&2
    cat "$log" >&2
fi
exit "$status"
