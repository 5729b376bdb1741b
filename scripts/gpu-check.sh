#!/usr/bin/env bash
# The device check, run on a GPU machine in one call (see docs/development.md): the binary
# built here is carried over with the cache's libtorch left behind; the machine's own PyTorch
# 2.11 supplies libtorch (CPU and CUDA), cudart, CUPTI and NCCL through LD_LIBRARY_PATH.
# open_clip, where the machine lacks it, comes as wheels in .whl/ (docs/development.md).
# Sections run in order of importance under one time budget (GPU_CHECK_BUDGET_S, default
# 480 s): what does not fit is skipped and says so. SECTIONS picks some of them (default
# "bench loss large nccl coca levers"). Prints what it measured and writes it under $OUT (or
# ./gpu-check-out); then scripts/gpu_check_verdict.py checks the numbers (tiled = naive
# loss, NCCL = single process, throughput against open_clip, every command ran) and the
# script exits non-zero when any check fails or a section asked for did not run.
set -uo pipefail
# The whole script under its own limit too (the budget plus a margin for set-up and the
# verdict): a hang outside the timed checks ends it with status 124, a failure.
if [ -z "${GPU_CHECK_INNER:-}" ]; then
  GPU_CHECK_INNER=1 exec timeout --kill-after=10 $(( ${GPU_CHECK_BUDGET_S:-480} + 90 )) bash "$0" "$@"
fi
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check-out}"
mkdir -p "$OUT"
: > "$OUT/failures.txt"
BIN=${BIN:-target/release/oxclip}
DEADLINE=$((SECONDS + ${GPU_CHECK_BUDGET_S:-480}))
SECTIONS=" ${SECTIONS:-bench loss large nccl coca levers} "
wanted() { [[ "$SECTIONS" == *" $1 "* ]]; }

# check LIMIT CMD...: runs CMD under min(LIMIT, what the budget has left). A failure (or a
# time-out) is recorded in $OUT/failures.txt for the verdict and the sections go on.
check() {
  local limit=$1 left=$((DEADLINE - SECONDS - 5))
  shift
  if [ "$left" -lt 15 ]; then echo "skipped, out of time: $*"; echo "skipped, out of time: $*" >> "$OUT/failures.txt"; return 0; fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout "$limit" "$@"
  local status=$?
  [ $status -ne 0 ] && { echo "status $status: $*"; echo "status $status: $*" >> "$OUT/failures.txt"; }
  return 0
}

if [ -d .whl ] && ! python3 -c 'import open_clip' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
SITE=$(python3 -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
TORCH_LIB="$SITE/torch/lib"
NVIDIA_LIBS=$(find "$SITE/nvidia" \( -name 'libcudart.so.*' -o -name 'libcupti.so.*' -o -name 'libnccl.so*' \) \
  -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)
export LD_LIBRARY_PATH="$TORCH_LIB:$NVIDIA_LIBS:${LD_LIBRARY_PATH:-}"
export OXCLIP_LIBTORCH_CUDA="$TORCH_LIB/libtorch_cuda.so"
export OXCLIP_NCCL="${OXCLIP_NCCL:-$(find "$SITE/nvidia" -name 'libnccl.so*' 2>/dev/null | head -n 1)}"
# The CLIP BPE vocabulary that `make setup` fetches here ships inside open_clip too.
if [ -z "${OXCLIP_VOCAB:-}" ] && [ ! -f "$HOME/.cache/oxclip/bpe_simple_vocab_16e6.txt.gz" ]; then
  OXCLIP_VOCAB=$(python3 -c 'import os, open_clip; print(os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz"))')
  export OXCLIP_VOCAB
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$BIN" --version; } | tee "$OUT/gpu.txt"

# 1. Step throughput, ViT-B-32 under bf16 autocast: oxclip, then open_clip on the same GPU.
wanted bench && {
  echo "# oxclip bench train (CUDA, amp bf16)"
  for bs in 256 128; do
    check 90 "$BIN" bench train --model ViT-B-32 --batch-size $bs --steps 20 --warmup 5 --device cuda --precision amp_bf16
  done
  echo "# open_clip, same GPU"
  for bs in 256 128; do
    check 90 python3 scripts/bench_open_clip.py --model-config configs/models/open_clip/ViT-B-32.json \
      --batch-size $bs --steps 20 --warmup 5 --threads 16 --device cuda --precision amp_bf16 2>&1 | tail -n 1
  done
} 2>&1 | tee "$OUT/bench.txt"

# 2. The loss alone. First agreement on CUDA (tiled fp32 = naive fp32; bf16 products close),
# then tiled against naive time, then growing N at D = 512 with bf16 products.
wanted loss && {
  echo "# warm-up"
  check 60 "$BIN" bench loss --batch 4096 --dim 512 --device cuda
  echo "# agreement, N = 16384"
  for args in "" "--naive" "--bf16" "--kind siglip" "--kind siglip --naive" "--kind siglip --bf16"; do
    # shellcheck disable=SC2086
    check 60 "$BIN" bench loss --batch 16384 --dim 512 --device cuda $args
  done
  echo "# tiled vs naive, N = 65536, fp32"
  check 90 "$BIN" bench loss --batch 65536 --dim 512 --device cuda
  check 90 "$BIN" bench loss --batch 65536 --dim 512 --device cuda --naive
  echo "# growing N, D = 512, bf16 products"
  for n in 262144 1048576; do
    check 150 "$BIN" bench loss --batch $n --dim 512 --bf16 --device cuda
  done
  check 100 "$BIN" bench loss --batch 1048576 --dim 512 --bf16 --kind siglip --device cuda
} 2>&1 | tee "$OUT/loss.txt"

# 3. Batches beyond activation memory: ViT-B-32 whole, then with micro-batches of 256.
wanted large && {
  echo "# bench train ViT-B-32, whole batch"
  check 60 "$BIN" bench train --model ViT-B-32 --batch-size 2048 --steps 1 --warmup 1 --device cuda --precision amp_bf16
  echo "# bench train ViT-B-32, micro-batches of 256"
  # At 131072 the images alone take 79 GB of the GPU (94 GB in use in all on an H200).
  for bs in 4096 16384 65536 131072; do
    check 120 "$BIN" bench train --model ViT-B-32 --batch-size $bs --micro-batch-size 256 --steps 1 --warmup 1 \
      --device cuda --precision amp_bf16
  done
} 2>&1 | tee "$OUT/large-batch.txt"

# 4. The NCCL backend: a one-rank NCCL run must give the loss curve of the single-process CUDA
# run (same seed, same data), and two ranks of 16 that of one of 32 where two GPUs exist.
# Both again with the gradients in many buckets (dist.bucket_mb 0.05), each all-reduced on
# the communication stream while the backward pass goes on (dist.overlap). One rank checks
# that the overlapped path runs and leaves the numbers alone (freed or reused buckets would
# show); only two ranks can show a bucket summed before it was written or copied back
# before its sum was done (a one-rank sum changes no value). Two ranks also run dist.shard
# (ZeRO-2), which one rank cannot.
wanted nccl && {
  echo "# NCCL vs single process (tiny model, synthetic data); libnccl: $OXCLIP_NCCL"
  D=$(mktemp -d)
  cat > "$D/run.yaml" <<YAML
run_dir: $D/run
model: tiny
data: {train: "synthetic:2048", workers: 4}
train: {batch_size: 32, steps: 20, seed: 7, precision: fp32, device: cuda, log_every: 5, checkpoint_every: 0}
optim: {lr: 1.0e-4, warmup_steps: 2}
dist: {backend: nccl, timeout_s: 120}
YAML
  check 60 "$BIN" train --config "$D/run.yaml" --run-dir "$D/single" 2>&1 | grep -E "step .*loss|error|caused" | tail -n 6
  check 60 "$BIN" launch --nproc-per-node 1 --master-port 29710 -- train --config "$D/run.yaml" --run-dir "$D/nccl1" 2>&1 \
    | grep -E "step .*loss|NCCL|error|caused" | tail -n 7
  echo "# NCCL, overlapped reduction in buckets of 0.05 MB, vs single process"
  check 60 "$BIN" launch --nproc-per-node 1 --master-port 29740 -- train --config "$D/run.yaml" \
    --set dist.overlap=true --set dist.bucket_mb=0.05 --run-dir "$D/nccl1-overlap" 2>&1 | grep -E "step .*loss|error|caused" | tail -n 6
  if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
    check 90 "$BIN" launch --nproc-per-node 2 --master-port 29720 -- train --config "$D/run.yaml" \
      --set train.batch_size=16 --run-dir "$D/nccl2" 2>&1 | grep -E "step .*loss|error|caused" | tail -n 6
    check 90 "$BIN" launch --nproc-per-node 2 --master-port 29750 -- train --config "$D/run.yaml" \
      --set train.batch_size=16 --set dist.overlap=true --set dist.bucket_mb=0.05 --run-dir "$D/nccl2-overlap" 2>&1 \
      | grep -E "step .*loss|error|caused" | tail -n 6
    # ZeRO-2: each bucket reduce-scattered in place on the communication stream, the updated
    # chunks all-gathered; the loss curve must be the unsharded one's.
    echo "# NCCL, 2 ranks, dist.shard: gradients in buckets of 0.05 MB, vs the unsharded runs above"
    check 90 "$BIN" launch --nproc-per-node 2 --master-port 29760 -- train --config "$D/run.yaml" \
      --set train.batch_size=16 --set dist.shard=gradients --set dist.bucket_mb=0.05 --run-dir "$D/nccl2-zero2" 2>&1 \
      | grep -E "step .*loss|AdamW moments|error|caused" | tail -n 8
  fi
  echo "$D" > "$OUT/nccl-dir.txt"
  # A rank that joins the rendezvous but never the communicator (scripts/silent_peer.py takes
  # NCCL's unique id, then goes silent): rank 0 must fail within dist.timeout_s (5 s), naming
  # the communicator's creation, instead of hanging in it. Any other outcome is a failure.
  echo "# NCCL communicator creation under dist.timeout_s (2-rank world, rank 1 never creates it)"
  if [ $((DEADLINE - SECONDS)) -lt 75 ]; then
    echo "skipped, out of time: nccl init timeout" | tee -a "$OUT/failures.txt"
  else
    sed 's/timeout_s: 120/timeout_s: 5/' "$D/run.yaml" > "$D/init.yaml"
    OXCLIP_RDZV_TOKEN=gpu-check python3 scripts/silent_peer.py 29730 1 2 1 2> "$D/peer.log" & PEER=$!
    started=$SECONDS
    OXCLIP_RDZV_TOKEN=gpu-check RANK=0 WORLD_SIZE=2 LOCAL_RANK=0 LOCAL_WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=29730 \
      timeout --kill-after=5 60 "$BIN" train --config "$D/init.yaml" --run-dir "$D/init" > "$D/init.log" 2>&1
    status=$? took=$((SECONDS - started))
    kill $PEER 2>/dev/null; wait $PEER 2>/dev/null
    grep -E "NCCL|error|caused" "$D/init.log" | tail -n 4
    if [ $status -eq 0 ] || [ $status -ge 124 ] || [ $took -gt 40 ] \
      || ! grep -q "the NCCL communicator was not created within dist.timeout_s" "$D/init.log"; then
      echo "nccl init timeout: rank 0 ended with status $status after ${took}s without the expected error" | tee -a "$OUT/failures.txt"
    else
      echo "nccl init timeout: rank 0 failed after ${took}s as it should"
    fi
  fi
  # A peer lost mid-run (two GPUs): rank 1 is killed (SIGKILL) or frozen (SIGSTOP) once rank 0
  # has logged a step. Rank 0 must fail by itself, naming the collective it was at (an NCCL
  # one, `all_reduce #812 ...`, or a host exchange, `in GatherBytes #12: ...`), within
  # dist.timeout_s (10 s) plus the bounded NCCL abort (10 s) and a margin, and its exit must
  # not hang in the communicator's end. Any other outcome is a failure. Each case ends within
  # about 2 minutes (rank 0 runs under a 120 s limit; rank 1 is killed when rank 0 ends).
  nccl_peer_lost() {
    local sig=$1 port=$2 dir="$D/lost-$1" r0 r1 status took started
    mkdir -p "$dir"
    sed -e 's/timeout_s: 120/timeout_s: 10/' -e 's/steps: 20,/steps: 1000000,/' "$D/run.yaml" > "$dir/run.yaml"
    RANK=1 WORLD_SIZE=2 LOCAL_RANK=1 LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      "$BIN" train --config "$dir/run.yaml" --set train.batch_size=16 --run-dir "$dir/run" > "$dir/rank1.log" 2>&1 & r1=$!
    RANK=0 WORLD_SIZE=2 LOCAL_RANK=0 LOCAL_WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
      timeout --kill-after=5 120 "$BIN" train --config "$dir/run.yaml" --set train.batch_size=16 --run-dir "$dir/run" \
      > "$dir/rank0.log" 2>&1 & r0=$!
    # Mid-run: once rank 0 has logged a step (start-up, CUDA and NCCL included, within 60 s).
    started=$SECONDS
    until grep -qE "step .*loss" "$dir/rank0.log" || [ $((SECONDS - started)) -ge 60 ] || ! kill -0 $r0 2>/dev/null; do
      sleep 1
    done
    if ! grep -qE "step .*loss" "$dir/rank0.log"; then
      kill -KILL $r1 2>/dev/null; wait $r0 $r1 2>/dev/null
      grep -E "NCCL|error|caused" "$dir/rank0.log" | tail -n 4
      echo "nccl peer lost ($sig): the 2-rank run logged no step within 60 s" | tee -a "$OUT/failures.txt"
      return
    fi
    sleep 2
    kill -"$sig" $r1
    started=$SECONDS
    wait $r0
    status=$? took=$((SECONDS - started))
    kill -KILL $r1 2>/dev/null; wait $r1 2>/dev/null
    grep -E "NCCL|error|caused|leaving it behind" "$dir/rank0.log" | tail -n 5
    if [ $status -eq 0 ] || [ $status -ge 124 ] || [ $took -gt 45 ] \
      || ! grep -qE "(all_gather|reduce_scatter|all_reduce|broadcast) #[0-9]+|in [A-Za-z]+ #[0-9]+:" "$dir/rank0.log"; then
      echo "nccl peer lost ($sig): rank 0 ended with status $status ${took}s after rank 1 got SIG$sig, without naming a collective in time" | tee -a "$OUT/failures.txt"
    else
      echo "nccl peer lost ($sig): rank 0 failed ${took}s after rank 1 got SIG$sig, naming the collective, as it should"
    fi
  }
  if [ "$(nvidia-smi -L | wc -l)" -lt 2 ]; then
    echo "# NCCL peer lost mid-run: needs two GPUs, not run"
  else
    for fault in KILL:29760 STOP:29770; do
      sig=${fault%%:*}
      echo "# NCCL peer lost mid-run (2 ranks, rank 1 gets SIG$sig, dist.timeout_s 10)"
      if [ $((DEADLINE - SECONDS)) -lt 130 ]; then
        echo "skipped, out of time: nccl peer lost ($sig)" | tee -a "$OUT/failures.txt"
      else
        nccl_peer_lost "$sig" "${fault#*:}"
      fi
    done
  fi
} 2>&1 | tee "$OUT/nccl.txt"
# 5. CoCa: coca_ViT-B-32's step under bf16 autocast (the attentional pooler, the text tower's
# padding mask, the decoder and its 49,408-way cross-entropy on CUDA), oxclip then open_clip
# on the same GPU. Before the levers, whose batch climb takes what is left of the budget.
wanted coca && {
  echo "# coca: oxclip bench train (CUDA, amp bf16)"
  check 120 "$BIN" bench train --model coca_ViT-B-32 --batch-size 128 --steps 10 --warmup 3 \
    --device cuda --precision amp_bf16
  echo "# coca: open_clip, same GPU"
  check 120 python3 scripts/bench_open_clip.py --model-config configs/models/open_clip/coca_ViT-B-32.json \
    --batch-size 128 --steps 10 --warmup 3 --threads 16 --device cuda --precision amp_bf16 2>&1 | tail -n 1
} 2>&1 | tee "$OUT/coca.txt"

# 6. The memory and speed levers (docs/training.md): ViT-B-16 and ViT-L-14, each at a batch
# that fits an 80 GB GPU under bf16 autocast, with each lever alone (samples/s, device memory);
# then the largest power-of-two batch each model reaches with and without activation
# checkpointing (the first that fails ends the climb; its failure is expected, not recorded).
wanted levers && {
  for spec in ViT-B-16:256 ViT-L-14:64; do
    model=${spec%%:*} bs=${spec#*:}
    for lever in "--precision amp_bf16" "--precision fp32" "--precision amp" "--precision pure_bf16" \
      "--precision amp_bf16 --grad-checkpointing" "--precision amp_bf16 --patch-dropout 0.5"; do
      echo "# levers: $model batch $bs $lever"
      check 90 "$BIN" bench train --model $model --batch-size $bs --steps 5 --warmup 2 --device cuda $lever
    done
  done
  for spec in ViT-B-16:512 ViT-L-14:128; do
    model=${spec%%:*}
    for ckpt in "" "--grad-checkpointing"; do
      bs=${spec#*:}
      echo "# levers: largest batch, $model ${ckpt:-without checkpointing}"
      while [ $((DEADLINE - SECONDS)) -gt 60 ] && [ $bs -le 16384 ]; do
        timeout 90 "$BIN" bench train --model $model --batch-size $bs --steps 1 --warmup 1 --device cuda \
          --precision amp_bf16 $ckpt || break
        bs=$((bs * 2))
      done
    done
  done
} 2>&1 | tee "$OUT/levers.txt"

echo "gpu-check done in $SECONDS s"
timeout 60 python3 scripts/gpu_check_verdict.py "$OUT" "$SECTIONS" | tee "$OUT/verdict.txt"
status=${PIPESTATUS[0]}
# A verdict that could not run (no python3, a crash) is a failure, not a pass.
[ "$status" -eq 0 ] || echo "gpu-check: FAILED (verdict status $status)"
exit "$status"
