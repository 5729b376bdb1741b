#!/usr/bin/env python3
"""The pass/fail verdict of scripts/gpu-check.sh, from the JSON lines its sections wrote.

    python3 scripts/gpu_check_verdict.py OUT_DIR "bench loss large nccl coca levers"

Checks, for each section that was asked for (a section asked for but without its numbers
fails: a check that did not run is not a pass):
- bench: oxclip's ViT-B-32 samples/s at least MIN_RATIO x open_clip's at each batch size
  measured by both (GPU_CHECK_MIN_RATIO, default 0.9: one run each on a shared machine);
- loss: at each N measured both ways, the tiled fp32 loss equals the naive one to 1e-5
  relative and bf16 products to 1e-2, for each loss kind;
  every loss asked for ran and is finite (the growing-N lines, which have no naive twin);
- large: the whole-batch and every micro-batched ViT-B-32 step ran (a number for each batch
  size asked), with a finite throughput;
- nccl: the one-rank NCCL run's logged losses equal the single-process CUDA run's, 1e-5,
  with the default buckets and with many overlapped ones (dist.bucket_mb 0.05); and, where
  two GPUs ran, two ranks of 16 equal one of 32, 1e-4, both ways and under dist.shard:
  gradients;
- coca: oxclip's coca_ViT-B-32 samples/s (batch 128, bf16 autocast) at least MIN_RATIO x
  open_clip's CoCa with CoCaLoss;
- levers: ViT-B-16 (batch 256) and ViT-L-14 (64) ran in every precision, with activation
  checkpointing using less device memory than without, and with patch dropout 0.5 faster.
Commands that failed or timed out (OUT/failures.txt, written by gpu-check.sh) fail too.
Exit 0 when everything holds, 1 otherwise, with one line per check either way.

    python3 scripts/gpu_check_verdict.py --self-test

runs the checks on synthetic outputs (passing ones, then each kind of failure) without a GPU.
"""

import json
import math
import os
import shutil
import sys
import tempfile

MIN_RATIO = float(os.environ.get("GPU_CHECK_MIN_RATIO", "0.9"))
LARGE_BATCHES = (4096, 16384, 65536, 131072)
WHOLE_BATCH = 2048
# What gpu-check.sh's loss section runs: (kind, N, matmul, naive).
LOSS_RUNS = [("clip", 4096, "fp32", False)] + [
    (kind, 16384, matmul, naive) for kind in ("clip", "siglip") for matmul, naive in (("fp32", False), ("fp32", True), ("bf16", False))
] + [("clip", 65536, "fp32", False), ("clip", 65536, "fp32", True),
     ("clip", 262144, "bf16", False), ("clip", 1048576, "bf16", False), ("siglip", 1048576, "bf16", False)]


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def json_lines(path):
    if not os.path.exists(path):
        return []
    rows = []
    for line in open(path):
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def losses(run_dir):
    path = os.path.join(run_dir, "results.jsonl")
    if not os.path.exists(path):
        return None
    return [(r["step"], r["train/loss"]) for r in map(json.loads, open(path)) if "train/loss" in r]


def verdict(out, sections):
    """[(ok, text)] for the outputs under `out` of the sections asked for."""
    results = []  # (ok, text)

    def check(ok, text):
        results.append((bool(ok), text))

    failures = os.path.join(out, "failures.txt")
    if os.path.exists(failures):
        for line in open(failures):
            if line.strip():
                check(False, f"command failed: {line.strip()}")

    if "bench" in sections:
        rows = json_lines(os.path.join(out, "bench.txt"))
        ours = {r["batch_size"]: r["samples_per_second"] for r in rows if r.get("bench") == "train"}
        theirs = {r["batch_size"]: r["samples_per_second"] for r in rows if r.get("impl") == "open_clip"}
        both = sorted(set(ours) & set(theirs))
        check(both, f"bench: batch sizes measured by both oxclip and open_clip: {both}")
        for bs in both:
            ratio = ours[bs] / theirs[bs]
            check(ratio >= MIN_RATIO, f"bench: batch {bs}: oxclip {ours[bs]:.0f} vs open_clip {theirs[bs]:.0f} samples/s = {ratio:.2f}x (at least {MIN_RATIO})")

    if "loss" in sections:
        rows = [r for r in json_lines(os.path.join(out, "loss.txt")) if r.get("bench") == "loss"]
        compared = 0
        for naive in (r for r in rows if r["tile"] is None):
            for tiled in rows:
                if tiled["tile"] is None or (tiled["kind"], tiled["batch"], tiled["dim"]) != (naive["kind"], naive["batch"], naive["dim"]):
                    continue
                tol = 1e-5 if tiled["matmul"] == "fp32" else 1e-2
                rel = abs(tiled["loss"] - naive["loss"]) / max(abs(naive["loss"]), 1e-12)
                compared += 1
                check(rel <= tol, f"loss: {tiled['kind']} N={tiled['batch']} tiled {tiled['matmul']} {tiled['loss']:.6f} vs naive {naive['loss']:.6f}: relative {rel:.1e} (at most {tol:.0e})")
        check(compared > 0, f"loss: {compared} tiled-vs-naive comparisons")
        for kind, n, matmul, naive in LOSS_RUNS:
            ran = [r for r in rows if (r["kind"], r["batch"], r["matmul"], r["tile"] is None) == (kind, n, matmul, naive)]
            what = f"loss: {kind} N={n} {'naive' if naive else 'tiled'} {matmul}"
            check(ran and all(finite(r["loss"]) for r in ran), f"{what} ran, loss finite: {[r['loss'] for r in ran]}")

    if "large" in sections:
        rows = json_lines(os.path.join(out, "large-batch.txt"))
        trains = [r for r in rows if r.get("bench") == "train"]
        whole = {r["batch_size"] for r in trains if not r.get("micro_batch_size") and finite(r.get("samples_per_second"))}
        check(WHOLE_BATCH in whole, f"large: ViT-B-32 whole batch {WHOLE_BATCH} ran")
        done = {r["batch_size"] for r in trains if r.get("micro_batch_size") and finite(r.get("samples_per_second"))}
        for bs in LARGE_BATCHES:
            check(bs in done, f"large: ViT-B-32 batch {bs} in micro-batches of 256 ran")

    if "coca" in sections:
        rows = json_lines(os.path.join(out, "coca.txt"))
        ours = [r["samples_per_second"] for r in rows if r.get("bench") == "train" and r.get("model") == "coca_ViT-B-32"]
        theirs = [r["samples_per_second"] for r in rows if r.get("impl") == "open_clip" and r.get("model") == "coca_ViT-B-32"]
        if ours and theirs:
            ratio = ours[0] / theirs[0]
            check(ratio >= MIN_RATIO, f"coca: coca_ViT-B-32 batch 128: oxclip {ours[0]:.0f} vs open_clip {theirs[0]:.0f} samples/s = {ratio:.2f}x (at least {MIN_RATIO})")
        else:
            check(False, f"coca: coca_ViT-B-32 ran in both oxclip ({len(ours)}) and open_clip ({len(theirs)})")

    if "levers" in sections:
        rows = [r for r in json_lines(os.path.join(out, "levers.txt")) if r.get("bench") == "train"]
        for model, bs in (("ViT-B-16", 256), ("ViT-L-14", 64)):
            runs = [r for r in rows if r.get("model") == model and r.get("batch_size") == bs]
            base = [r for r in runs if r.get("precision") == "amp_bf16" and not r.get("grad_checkpointing") and not r.get("patch_dropout")]
            ckpt = [r for r in runs if r.get("grad_checkpointing")]
            drop = [r for r in runs if r.get("patch_dropout")]
            precisions = {r.get("precision") for r in runs}
            check({"fp32", "amp", "amp_bf16", "pure_bf16"} <= precisions, f"levers: {model} batch {bs} ran in every precision: {sorted(p for p in precisions if p)}")
            if base and ckpt:
                b, c = base[0].get("cuda_memory_bytes") or 0, ckpt[0].get("cuda_memory_bytes") or 0
                check(0 < c < b, f"levers: {model} batch {bs}: device memory {c / 2**30:.1f} GiB with checkpointing, {b / 2**30:.1f} GiB without")
            else:
                check(False, f"levers: {model} batch {bs}: ran with and without checkpointing")
            if base and drop:
                b, d = base[0]["samples_per_second"], drop[0]["samples_per_second"]
                check(d > b, f"levers: {model} batch {bs}: {d:.0f} samples/s with patch dropout 0.5, {b:.0f} without")
            else:
                check(False, f"levers: {model} batch {bs}: ran with and without patch dropout")
    if "nccl" in sections:
        run_root = open(os.path.join(out, "nccl-dir.txt")).read().strip() if os.path.exists(os.path.join(out, "nccl-dir.txt")) else ""
        single, nccl1 = losses(os.path.join(run_root, "single")), losses(os.path.join(run_root, "nccl1"))
        check(single, f"nccl: the single-process CUDA run logged losses: {single}")
        check(nccl1, f"nccl: the one-rank NCCL run logged losses: {nccl1}")
        if single and nccl1:
            same_steps = [a[0] for a in single] == [b[0] for b in nccl1]
            diff = max(abs(a[1] - b[1]) for a, b in zip(single, nccl1))
            check(same_steps and diff <= 1e-5, f"nccl: one-rank NCCL vs single process: same steps {same_steps}, max |loss difference| {diff:.2e} (at most 1e-5)")
        overlap1 = losses(os.path.join(run_root, "nccl1-overlap"))
        check(overlap1, f"nccl: the one-rank NCCL run overlapped in several buckets logged losses: {overlap1}")
        if single and overlap1:
            same_steps = [a[0] for a in single] == [b[0] for b in overlap1]
            diff = max(abs(a[1] - b[1]) for a, b in zip(single, overlap1))
            check(same_steps and diff <= 1e-5, f"nccl: one-rank NCCL overlapped in several buckets, vs single process: same steps {same_steps}, max |loss difference| {diff:.2e} (at most 1e-5)")
        # Only where the machine had two GPUs: 2 ranks x 16 samples = 1 x 32.
        for name, what in (("nccl2", "two ranks x 16 vs one x 32"), ("nccl2-overlap", "two ranks x 16 overlapped in several buckets, vs one x 32"), ("nccl2-zero2", "two ranks x 16 with dist.shard: gradients (reduce-scatter in place, all-gather), vs one x 32")):
            nccl2 = losses(os.path.join(run_root, name))
            if single and nccl2:
                same_steps = [a[0] for a in single] == [b[0] for b in nccl2]
                diff = max(abs(a[1] - b[1]) for a, b in zip(single, nccl2))
                check(same_steps and diff <= 1e-4, f"nccl: {what}: same steps {same_steps}, max |loss difference| {diff:.2e} (at most 1e-4)")

    return results


def main():
    if sys.argv[1:] == ["--self-test"]:
        return self_test()
    out, sections = sys.argv[1], sys.argv[2].split()
    results = verdict(out, sections)
    for ok, text in results:
        print(("PASS " if ok else "FAIL ") + text)
    failed = sum(1 for ok, _ in results if not ok)
    print(f"gpu-check verdict: {len(results) - failed} passed, {failed} failed")
    return 1 if failed or not results else 0


def write_outputs(out, bench_ratio=1.0, tiled_error=0.0, bf16_error=0.0, nccl_error=0.0, overlap_error=0.0, missing_large=None, failure=None, ckpt_memory=0.4, missing_precision=None, coca_ratio=1.0, coca_missing=False):
    """What a gpu-check.sh run writes under `out`, synthetic: each argument spoils one check."""
    with open(os.path.join(out, "bench.txt"), "w") as f:
        for bs in (256, 128):
            f.write(json.dumps({"bench": "train", "batch_size": bs, "samples_per_second": 1000.0 * bench_ratio}) + "\n")
            f.write("status lines and other text are ignored\n")
            f.write(json.dumps({"impl": "open_clip", "batch_size": bs, "samples_per_second": 1000.0}) + "\n")
    with open(os.path.join(out, "loss.txt"), "w") as f:
        for kind, n, matmul, naive in LOSS_RUNS:
            loss = 9.7 if kind == "clip" else 0.72
            if not naive:
                loss *= 1 + (tiled_error if matmul == "fp32" else bf16_error)
            tile = None if naive else 4096
            f.write(json.dumps({"bench": "loss", "kind": kind, "batch": n, "dim": 512, "tile": tile, "matmul": matmul, "loss": loss}) + "\n")
    with open(os.path.join(out, "large-batch.txt"), "w") as f:
        f.write(json.dumps({"bench": "train", "batch_size": WHOLE_BATCH, "micro_batch_size": None, "samples_per_second": 900.0}) + "\n")
        for bs in LARGE_BATCHES:
            if bs != missing_large:
                f.write(json.dumps({"bench": "train", "batch_size": bs, "micro_batch_size": 256, "samples_per_second": 800.0}) + "\n")
    runs = os.path.join(out, "runs")
    for name, shift in (("single", 0.0), ("nccl1", nccl_error), ("nccl1-overlap", overlap_error)):
        os.makedirs(os.path.join(runs, name), exist_ok=True)
        with open(os.path.join(runs, name, "results.jsonl"), "w") as f:
            for step in (5, 10, 15, 20):
                f.write(json.dumps({"step": step, "train/loss": 4.0 - 0.1 * step + shift}) + "\n")
    with open(os.path.join(out, "nccl-dir.txt"), "w") as f:
        f.write(runs + "\n")
    with open(os.path.join(out, "coca.txt"), "w") as f:
        f.write(json.dumps({"bench": "train", "model": "coca_ViT-B-32", "batch_size": 128, "samples_per_second": 300.0 * coca_ratio}) + "\n")
        if not coca_missing:
            f.write(json.dumps({"impl": "open_clip", "model": "coca_ViT-B-32", "batch_size": 128, "samples_per_second": 300.0}) + "\n")
    with open(os.path.join(out, "levers.txt"), "w") as f:
        for model, bs in (("ViT-B-16", 256), ("ViT-L-14", 64)):
            row = {"bench": "train", "model": model, "batch_size": bs, "grad_checkpointing": False, "patch_dropout": 0.0}
            for precision in ("amp_bf16", "fp32", "amp", "pure_bf16"):
                if precision != missing_precision:
                    f.write(json.dumps({**row, "precision": precision, "samples_per_second": 500.0, "cuda_memory_bytes": 10 * 2**30}) + "\n")
            f.write(json.dumps({**row, "precision": "amp_bf16", "grad_checkpointing": True, "samples_per_second": 400.0, "cuda_memory_bytes": int(ckpt_memory * 10 * 2**30)}) + "\n")
            f.write(json.dumps({**row, "precision": "amp_bf16", "patch_dropout": 0.5, "samples_per_second": 800.0, "cuda_memory_bytes": 7 * 2**30}) + "\n")
    with open(os.path.join(out, "failures.txt"), "w") as f:
        f.write(f"{failure}\n" if failure else "")


def self_test():
    """The verdict on synthetic outputs: all pass, then each spoilt one fails exactly its check."""
    sections = ["bench", "loss", "large", "nccl", "coca", "levers"]
    cases = [
        ({"ckpt_memory": 1.2}, "with checkpointing"),
        ({"missing_precision": "amp"}, "in every precision"),
        ({}, None),
        ({"bench_ratio": 0.5}, "bench: batch "),
        ({"tiled_error": 1e-3}, "tiled fp32"),
        ({"bf16_error": 5e-2}, "tiled bf16"),
        ({"nccl_error": 1e-3}, "one-rank NCCL vs single process"),
        ({"overlap_error": 1e-3}, "overlapped in several buckets, vs single process"),
        ({"missing_large": 65536}, "batch 65536 in micro-batches"),
        ({"coca_ratio": 0.5}, "coca: coca_ViT-B-32 batch 128"),
        ({"coca_missing": True}, "coca: coca_ViT-B-32 ran in both"),
        ({"failure": "status 124: target/release/oxclip bench loss"}, "command failed: status 124"),
    ]
    problems = []
    for spoil, expect in cases:
        out = tempfile.mkdtemp(prefix="gpu-check-self-test-")
        try:
            write_outputs(out, **spoil)
            failed = [text for ok, text in verdict(out, sections) if not ok]
        finally:
            shutil.rmtree(out)
        if expect is None and failed:
            problems.append(f"all-good outputs failed: {failed}")
        if expect is not None and (not failed or not all(expect in t for t in failed)):
            problems.append(f"{spoil}: expected failures naming `{expect}`, got {failed}")
    # A section asked for whose numbers are missing fails: a check that did not run is no pass.
    empty = tempfile.mkdtemp(prefix="gpu-check-self-test-")
    try:
        for section in sections:
            if all(ok for ok, _ in verdict(empty, [section])):
                problems.append(f"section {section} without outputs passed")
    finally:
        shutil.rmtree(empty)
    for p in problems:
        print("FAIL " + p)
    print(f"gpu_check_verdict self-test: {len(cases) + len(sections) - len(problems)} passed, {len(problems)} failed")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
