#!/usr/bin/env python3
"""The training loader on the same JPEGs as a Parquet table and as WebDataset shards,
alternating (table, shards, table, ...), in one run: docs/benchmarks.md's Parquet row.

Data: `scripts/make_photo_shards.py` (photo-like 256 px JPEGs), then
`scripts/make_photo_parquet.py` (the same bytes as a Hugging Face dataset in Parquet), then
`oxclip data pack --from parquet:...` (the shards the comparison reads: written from the
table, so both hold exactly the same images and captions).

    /tmp/refenv/bin/python scripts/bench_table_loader.py --oxclip target/release/oxclip \
        --table parquet:/tmp/pq-bench/photo-parquet --shards /tmp/pq-bench/packed --rounds 8

Each run is `oxclip bench loader --workers 2 --batch-size 64 --samples N` (its defaults
otherwise: 224 px random resized crops, CLIP tokens). Prints every run, then the median over
rounds of the table/shards ratio of samples per second (wall clock) and of samples per
CPU-second (the work per sample, which a loaded machine distorts less), one JSON line last.
"""
import argparse
import json
import os
import statistics
import subprocess


def run(oxclip, data, samples, workers):
    out = subprocess.run(
        [oxclip, "bench", "loader", "--data", data, "--workers", str(workers),
         "--batch-size", "64", "--samples", str(samples)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--oxclip", required=True)
    ap.add_argument("--table", required=True)
    ap.add_argument("--shards", required=True)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--samples", type=int, default=3200)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    wall, cpu = [], []
    for r in range(args.rounds):
        t = run(args.oxclip, args.table, args.samples, args.workers)
        s = run(args.oxclip, args.shards, args.samples, args.workers)
        assert t["skipped"] == 0 and s["skipped"] == 0, (t, s)
        wall.append(t["samples_per_second"] / s["samples_per_second"])
        cpu.append(t["samples_per_cpu_second"] / s["samples_per_cpu_second"])
        print(f"round {r}: table {t['samples_per_second']:.0f}/s "
              f"({t['samples_per_cpu_second']:.0f}/CPU-s), shards {s['samples_per_second']:.0f}/s "
              f"({s['samples_per_cpu_second']:.0f}/CPU-s), load {os.getloadavg()[0]:.1f}")
    print(json.dumps({
        "rounds": args.rounds,
        "wall_ratio_median": round(statistics.median(wall), 3),
        "wall_ratios": [round(x, 3) for x in wall],
        "cpu_ratio_median": round(statistics.median(cpu), 3),
        "cpu_ratios": [round(x, 3) for x in cpu],
    }))


if __name__ == "__main__":
    main()
