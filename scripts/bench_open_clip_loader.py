#!/usr/bin/env python3
"""open_clip's own WebDataset loader, the baseline for `oxclip bench loader`.

Runs open_clip_train.data.get_wds_dataset on the given shards with open_clip's default train
transform (RandomResizedCrop(size, scale=(0.9, 1.0)), bicubic, normalise) and tokenizer,
`--workers` DataLoader worker processes, and times `--samples` samples after one warm-up
batch. Prints ONE JSON line like `oxclip bench loader`.

Environment (nothing is downloaded at run time):

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.11.0 open_clip_torch==3.3.0 "webdataset==0.2.86" braceexpand pandas

(open_clip_train's own tar grouping breaks on webdataset 1.x.)

Usage:

    /tmp/refenv/bin/python scripts/bench_open_clip_loader.py --data 'shards/{00000..00009}.tar' \
        --train-num-samples 20000 --workers 2 --batch-size 64 --image-size 224 --samples 2048
"""
import argparse
import json
import time
from types import SimpleNamespace

import torch

import open_clip
from open_clip_train.data import get_wds_dataset


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="brace pattern of .tar shards")
    ap.add_argument("--train-num-samples", type=int, required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)

    preprocess = open_clip.image_transform(args.image_size, is_train=True)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    oc_args = SimpleNamespace(
        train_data=args.data, val_data=None, train_num_samples=args.train_num_samples,
        val_num_samples=None, train_data_upsampling_factors=None, dataset_resampled=False,
        seed=args.seed, batch_size=args.batch_size, workers=args.workers, world_size=1,
    )
    data = get_wds_dataset(oc_args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
    data.set_epoch(0)
    batches = max(1, -(-args.samples // args.batch_size))
    it = iter(data.dataloader)
    next(it)  # start the workers
    start = time.perf_counter()
    seen = 0
    for _ in range(batches):
        try:
            images, texts = next(it)
        except StopIteration:
            data.set_epoch(1)
            it = iter(data.dataloader)
            images, texts = next(it)
        seen += images.shape[0]
    seconds = time.perf_counter() - start
    print(json.dumps({
        "impl": "open_clip", "bench": "loader", "data": args.data, "workers": args.workers,
        "batch_size": args.batch_size, "image_size": args.image_size, "samples": seen,
        "seconds": round(seconds, 6), "samples_per_second": round(seen / seconds, 3),
        "samples_per_second_per_worker": round(seen / seconds / args.workers, 3),
    }))


if __name__ == "__main__":
    main()
