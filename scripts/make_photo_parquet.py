#!/usr/bin/env python3
"""The photo-like JPEGs of `scripts/make_photo_shards.py`, as a Hugging Face dataset in
Parquet: the data-loader benchmark's Parquet side (docs/benchmarks.md), the same images
as the shards, bytes unchanged.

Reads every sample of the shards in DIR (KEY.jpg, KEY.txt), in shard order, and writes
them with `datasets` as users do: `Dataset.from_dict` with the `Image` feature (the JPEG
bytes, path `KEY.jpg`) and a `text` string column, then `to_parquet` with its defaults
(row groups and compression chosen by `datasets`), into OUT/data/train-00000-of-0000N.parquet
(`--files` files, contiguous shards of the rows, as `push_to_hub` lays them out).

    /tmp/refenv/bin/pip install "datasets>=4,<5" pyarrow
    /tmp/refenv/bin/python scripts/make_photo_parquet.py --shards /tmp/pq-bench/photo-shards \
        --out /tmp/pq-bench/photo-parquet --files 4

Prints one JSON line: rows, files, row groups, bytes.
"""
import argparse
import json
import os
import tarfile

import pyarrow.parquet as pq
from datasets import Dataset, Features, Image, Value


def samples(shard_dir):
    names = sorted(n for n in os.listdir(shard_dir) if n.endswith(".tar"))
    for name in names:
        with tarfile.open(os.path.join(shard_dir, name)) as tar:
            members = {}
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
            for key in sorted(members):
                yield key, members[key]["jpg"], members[key]["txt"].decode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--files", type=int, default=4)
    args = ap.parse_args()
    rows = list(samples(args.shards))
    ds = Dataset.from_dict(
        {
            "image": [{"bytes": b, "path": f"{k}.jpg"} for k, b, _ in rows],
            "text": [t for _, _, t in rows],
        },
        features=Features({"image": Image(), "text": Value("string")}),
    )
    os.makedirs(os.path.join(args.out, "data"), exist_ok=True)
    groups = size = 0
    for i in range(args.files):
        path = os.path.join(args.out, "data", f"train-{i:05d}-of-{args.files:05d}.parquet")
        ds.shard(num_shards=args.files, index=i, contiguous=True).to_parquet(path)
        groups += pq.ParquetFile(path).metadata.num_row_groups
        size += os.path.getsize(path)
    print(json.dumps({"rows": len(rows), "files": args.files, "row_groups": groups, "bytes": size}))


if __name__ == "__main__":
    main()
