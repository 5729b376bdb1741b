#!/usr/bin/env python3
"""The pass/fail verdict of scripts/gpu-check.sh, from the JSON lines its sections wrote.

    python3 scripts/gpu_check_verdict.py OUT_DIR "bench loss large nccl"

Checks, for each section that was asked for (a section asked for but without its numbers
fails: a check that did not run is not a pass):
- bench: oxclip's ViT-B-32 samples/s at least MIN_RATIO x open_clip's at each batch size
  measured by both (GPU_CHECK_MIN_RATIO, default 0.9: one run each on a shared machine);
- loss: at each N measured both ways, the tiled fp32 loss equals the naive one to 1e-5
  relative and bf16 products to 1e-2, for each loss kind;
- large: every micro-batched ViT-B-32 step ran (a number for each batch size asked);
- nccl: the one-rank NCCL run's logged losses equal the single-process CUDA run's, 1e-5
  (and, where two GPUs ran, two ranks of 16 equal one of 32, 1e-4).
Commands that failed or timed out (OUT/failures.txt, written by gpu-check.sh) fail too.
Exit 0 when everything holds, 1 otherwise, with one line per check either way.
"""

import json
import os
import sys

MIN_RATIO = float(os.environ.get("GPU_CHECK_MIN_RATIO", "0.9"))
LARGE_BATCHES = (4096, 16384, 65536, 131072)


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


def main():
    out, sections = sys.argv[1], sys.argv[2].split()
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

    if "large" in sections:
        rows = json_lines(os.path.join(out, "large-batch.txt"))
        done = {r["batch_size"] for r in rows if r.get("bench") == "train" and r.get("micro_batch_size")}
        for bs in LARGE_BATCHES:
            check(bs in done, f"large: ViT-B-32 batch {bs} in micro-batches of 256 ran")

    if "nccl" in sections:
        run_root = open(os.path.join(out, "nccl-dir.txt")).read().strip() if os.path.exists(os.path.join(out, "nccl-dir.txt")) else ""
        single, nccl1 = losses(os.path.join(run_root, "single")), losses(os.path.join(run_root, "nccl1"))
        check(single, f"nccl: the single-process CUDA run logged losses: {single}")
        check(nccl1, f"nccl: the one-rank NCCL run logged losses: {nccl1}")
        if single and nccl1:
            same_steps = [a[0] for a in single] == [b[0] for b in nccl1]
            diff = max(abs(a[1] - b[1]) for a, b in zip(single, nccl1))
            check(same_steps and diff <= 1e-5, f"nccl: one-rank NCCL vs single process: same steps {same_steps}, max |loss difference| {diff:.2e} (at most 1e-5)")
        # Only where the machine had two GPUs: 2 ranks x 16 samples = 1 x 32.
        nccl2 = losses(os.path.join(run_root, "nccl2"))
        if single and nccl2:
            same_steps = [a[0] for a in single] == [b[0] for b in nccl2]
            diff = max(abs(a[1] - b[1]) for a, b in zip(single, nccl2))
            check(same_steps and diff <= 1e-4, f"nccl: two ranks x 16 vs one x 32: same steps {same_steps}, max |loss difference| {diff:.2e} (at most 1e-4)")

    for ok, text in results:
        print(("PASS " if ok else "FAIL ") + text)
    failed = sum(1 for ok, _ in results if not ok)
    print(f"gpu-check verdict: {len(results) - failed} passed, {failed} failed")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
