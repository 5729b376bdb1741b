#!/usr/bin/env python3
"""Single-core decode ceiling for the data-loader benchmark.

Reads every image member (.jpg/.jpeg/.png/.webp) of the given WebDataset shards into memory
first (so tar and disk reads are not timed), then, in this one process with one torch
thread, times:

  decode      PIL Image.open + load + convert("RGB")
  decode+tf   PIL Image.open + open_clip's train transform
              (open_clip.image_transform(size, is_train=True): to RGB,
              RandomResizedCrop(size, scale=(0.9, 1.0)), bicubic, ToTensor, Normalize)

over `--samples` images (cycling the shards' images if there are fewer), after `--warmup`
untimed ones. This is what one core can do with no loader around it: a loader with W
workers cannot beat W times the decode+tf rate. Prints one JSON line per measurement, in
the style of `oxclip bench loader`.

Environment: the reference venv (see scripts/bench_open_clip_loader.py). Usage:

    /tmp/refenv/bin/python scripts/bench_decode_ceiling.py \
        --data '/tmp/oxclip-bench-photo256/{00000..00007}.tar' --samples 2048
"""
import argparse
import glob
import io
import json
import os
import tarfile
import time

import braceexpand
import torch
from PIL import Image

import open_clip

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def shard_paths(spec):
    if os.path.isdir(spec):
        return sorted(glob.glob(os.path.join(spec, "*.tar")))
    return list(braceexpand.braceexpand(spec))


def read_images(paths, limit):
    images = []
    for path in paths:
        with tarfile.open(path) as tar:
            for m in tar:
                if m.isfile() and m.name.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                    images.append(tar.extractfile(m).read())
                    if len(images) >= limit:
                        return images
    return images


def timed(images, n, warmup, fn):
    for i in range(warmup):
        fn(images[i % len(images)])
    start = time.perf_counter()
    for i in range(n):
        fn(images[(warmup + i) % len(images)])
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="brace pattern of .tar shards, or a directory")
    ap.add_argument("--samples", type=int, default=2048, help="images timed per measurement")
    ap.add_argument("--warmup", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    paths = shard_paths(args.data)
    if not paths:
        ap.error(f"no shards match {args.data}")
    images = read_images(paths, args.samples + args.warmup)
    if not images:
        ap.error(f"no images in {args.data}")
    mean_bytes = sum(map(len, images)) / len(images)
    preprocess = open_clip.image_transform(args.image_size, is_train=True)

    def decode(b):
        return Image.open(io.BytesIO(b)).convert("RGB")

    def decode_tf(b):
        return preprocess(Image.open(io.BytesIO(b)))

    for name, fn in (("decode", decode), ("decode+train_transform", decode_tf)):
        seconds = timed(images, args.samples, args.warmup, fn)
        print(json.dumps({
            "impl": "pil", "bench": "decode_ceiling", "stage": name, "data": args.data,
            "image_size": args.image_size if fn is decode_tf else None,
            "distinct_images": len(images), "mean_image_bytes": round(mean_bytes, 1),
            "samples": args.samples, "threads": 1, "seconds": round(seconds, 6),
            "samples_per_second": round(args.samples / seconds, 3),
        }), flush=True)


if __name__ == "__main__":
    main()
