#!/usr/bin/env python3
"""Photo-like 256 px JPEG WebDataset shards for the data-loader benchmark.

`oxclip data synth` draws flat-colour shapes, which JPEG-decode far faster than real web
photos. This script writes shards whose images are crops of the real photographs bundled
inside the scikit-image wheel (astronaut, coffee, chelsea, rocket, ...; read from the
installed package, never downloaded with pooch), so that decode cost is close to LAION's.

Layout as img2dataset writes it (`--resize_mode center_crop --image_size 256`, its default
`--encode_quality 95`): DIR/00000.tar, DIR/00001.tar, ... with members KEY.jpg, KEY.json,
KEY.txt (KEY = 5-digit shard id + 4-digit index, e.g. 000000012, unique across shards),
written with webdataset.TarWriter, plus DIR/sizes.json ({"00000.tar": 1000, ...}, the
open_clip / webdataset convention).

Each image: a random photo (12 of them), a random crop (area 15-100 % of the photo, aspect 1:2 to 2:1),
a random horizontal flip, slight colour jitter (brightness, contrast, saturation, channel
gains; grey photos get a random tint), resized like img2dataset (shorter side to 256 px,
area filter when shrinking, Lanczos when enlarging, then a centre crop to 256x256), mild
Gaussian sensor noise, JPEG quality 95 (4:2:0, as OpenCV's encoder). Captions are short
random English sentences. Everything is seeded from (seed, sample index), so the output
(tar bytes included) is the same for the same --seed and --samples whatever --shard-size.

Environment: the reference venv (see tests/fixtures/make_fixtures.py) plus scikit-image:

    /tmp/refenv/bin/pip install "webdataset==0.2.86" scikit-image

Usage:

    /tmp/refenv/bin/python scripts/make_photo_shards.py --out /tmp/oxclip-bench-photo256 \
        --samples 8000 --shard-size 1000 --seed 0

Prints one JSON line: shards, samples, mean/min/max JPEG bytes, seconds.
"""
import argparse
import io
import json
import math
import os
import time

import numpy as np
from PIL import Image

import webdataset as wds

# Real photographs shipped inside the scikit-image wheel (skimage/data/); the pure texture
# swatches (grass, gravel) and the microscopy slide (ihc) are left out as untypical of web
# images. Colour ones are drawn three times as often as the grey ones.
COLOUR_PHOTOS = [
    "astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg",
    "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg",
]
GREY_PHOTOS = ["brick.png", "camera.png", "coins.png", "moon.png"]

ADJECTIVES = [
    "small", "large", "old", "new", "red", "blue", "green", "bright", "dark", "quiet",
    "busy", "wooden", "shiny", "tall", "round", "happy", "sleepy", "wild", "modern", "rusty",
]
NOUNS = [
    "cat", "dog", "car", "house", "tree", "cup of coffee", "rocket", "bicycle", "bird",
    "mountain", "river", "city street", "beach", "flower", "astronaut", "train", "boat",
    "table", "window", "garden",
]
PLACES = [
    "in the park", "on the table", "at night", "in the morning", "near the sea",
    "under a blue sky", "in the snow", "on a sunny day", "in the city", "by the window",
    "in a field", "at the station",
]
TEMPLATES = [
    "a photo of a {adj} {noun} {place}",
    "{Adj} {noun} {place}",
    "a {adj} {noun} and a {adj2} {noun2}",
    "close-up of a {noun}",
    "the {adj} {noun} {place}, stock photo",
    "a picture of my {noun}",
    "{Adj} {noun} with a {adj2} {noun2} {place}",
]

SIZE = 256
QUALITY = 95
NOISE_SIGMA = (0.5, 2.0)  # per-image Gaussian noise sigma range, 8-bit levels


def load_photos():
    import skimage.data  # only for its install location; nothing is fetched

    root = os.path.dirname(skimage.data.__file__)
    photos = []
    for names, grey in ((COLOUR_PHOTOS, False), (GREY_PHOTOS, True)):
        for name in names:
            im = Image.open(os.path.join(root, name))
            im = im.convert("L" if grey else "RGB")
            photos.append((name, grey, np.asarray(im.convert("RGB"), dtype=np.uint8)))
    return photos


def caption(rng):
    t = TEMPLATES[rng.integers(len(TEMPLATES))]
    adj, adj2 = (ADJECTIVES[i] for i in rng.choice(len(ADJECTIVES), 2, replace=False))
    noun, noun2 = (NOUNS[i] for i in rng.choice(len(NOUNS), 2, replace=False))
    place = PLACES[rng.integers(len(PLACES))]
    return t.format(adj=adj, Adj=adj.capitalize(), adj2=adj2, noun=noun, noun2=noun2,
                    place=place)


def resize_center_crop(im):
    """img2dataset's center_crop mode: shorter side to SIZE (cv2 INTER_AREA when shrinking,
    INTER_LANCZOS4 when enlarging; PIL's BOX / LANCZOS here), then a centre crop."""
    w, h = im.size
    s = SIZE / min(w, h)
    nw, nh = max(SIZE, round(w * s)), max(SIZE, round(h * s))
    im = im.resize((nw, nh), Image.BOX if s < 1 else Image.LANCZOS)
    left, top = (nw - SIZE) // 2, (nh - SIZE) // 2
    return im.crop((left, top, left + SIZE, top + SIZE))


def make_sample(photos, weights, seed, index):
    rng = np.random.default_rng([seed, index])
    p = rng.choice(len(photos), p=weights)
    name, grey, px = photos[p]
    H, W = px.shape[:2]
    # Random crop: area fraction and log-uniform aspect, clipped to the photo.
    area = rng.uniform(0.15, 1.0) * W * H
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    cw = int(min(W, max(32, round(math.sqrt(area * aspect)))))
    ch = int(min(H, max(32, round(math.sqrt(area / aspect)))))
    x = int(rng.integers(0, W - cw + 1))
    y = int(rng.integers(0, H - ch + 1))
    crop = px[y:y + ch, x:x + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    im = resize_center_crop(Image.fromarray(np.ascontiguousarray(crop)))
    a = np.asarray(im, dtype=np.float32)
    # Colour jitter: brightness, contrast, saturation, per-channel gain (a tint for grey).
    a = a * rng.uniform(0.9, 1.1)
    mean = a.mean()
    a = (a - mean) * rng.uniform(0.9, 1.1) + mean
    lum = a.mean(axis=2, keepdims=True)
    a = lum + (a - lum) * rng.uniform(0.85, 1.15)
    gain = rng.uniform(0.8, 1.2, 3) if grey and rng.random() < 0.7 else rng.uniform(0.96, 1.04, 3)
    a = a * gain
    # Mild sensor noise.
    a = a + rng.normal(0.0, rng.uniform(*NOISE_SIGMA), a.shape)
    out = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    out.save(buf, format="JPEG", quality=QUALITY)
    meta = {"crop": [x, y, cw, ch], "photo": name}
    return buf.getvalue(), caption(rng), meta, (cw, ch)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--samples", type=int, default=8000)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.samples < 1 or args.shard_size < 1:
        ap.error("--samples and --shard-size must be positive")
    os.makedirs(args.out, exist_ok=True)
    photos = load_photos()
    weights = np.array([1.0 if grey else 3.0 for _, grey, _ in photos])
    weights /= weights.sum()
    n_shards = -(-args.samples // args.shard_size)
    idx_digits = max(4, len(str(args.shard_size - 1)))
    start = time.perf_counter()
    sizes, jpeg_bytes = {}, []
    for shard in range(n_shards):
        name = f"{shard:05d}.tar"
        lo, hi = shard * args.shard_size, min(args.samples, (shard + 1) * args.shard_size)
        tmp = os.path.join(args.out, name + ".tmp")
        with wds.TarWriter(tmp, mtime=1_700_000_000) as sink:
            for i in range(lo, hi):
                key = f"{shard:05d}{i - lo:0{idx_digits}d}"
                jpg, text, meta, (ow, oh) = make_sample(photos, weights, args.seed, i)
                jpeg_bytes.append(len(jpg))
                sink.write({
                    "__key__": key,
                    "jpg": jpg,
                    "txt": text,
                    "json": {
                        "url": f"skimage-data://{meta['photo']}#crop={','.join(map(str, meta['crop']))}",
                        "key": key, "status": "success", "error_message": None,
                        "width": SIZE, "height": SIZE,
                        "original_width": ow, "original_height": oh,
                        "exif": None, "caption": text,
                    },
                })
        os.replace(tmp, os.path.join(args.out, name))
        sizes[name] = hi - lo
    with open(os.path.join(args.out, "sizes.json"), "w") as f:
        json.dump(sizes, f, indent=2)
        f.write("\n")
    print(json.dumps({
        "out": args.out, "shards": n_shards, "samples": args.samples, "seed": args.seed,
        "image_size": SIZE, "jpeg_quality": QUALITY,
        "mean_jpeg_bytes": round(float(np.mean(jpeg_bytes)), 1),
        "min_jpeg_bytes": int(np.min(jpeg_bytes)), "max_jpeg_bytes": int(np.max(jpeg_bytes)),
        "seconds": round(time.perf_counter() - start, 3),
    }))


if __name__ == "__main__":
    main()
