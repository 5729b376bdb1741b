#!/usr/bin/env python3
"""open_clip training-step baseline for `oxclip bench train`.

Builds open_clip's CLIP from a model config file: one of our YAMLs or an
open_clip JSON (configs/models/open_clip/; YAML reads JSON), feeds random images and random token ids,
and times S training steps after W warm-up steps.  Prints ONE JSON line:

  {"impl":"open_clip","model":...,"batch_size":B,"precision":P,"steps":S,"threads":T,
   "seconds":...,"samples_per_second":...,"cpu_seconds":...}

cpu_seconds is the process's CPU time (every thread) over the timed steps, as `oxclip bench
train` reports it: on a machine others load too, the work that wall time is not.

A step is what open_clip's train_one_epoch does for one batch: forward
(encode_image / encode_text, normalised), ClipLoss with model.logit_scale.exp()
(for a CoCa config, one with a multimodal_cfg: open_clip's CoCa forward and CoCaLoss with
its default weights, caption 2 and contrastive 1, their sum back-propagated),
backward, AdamW step (lr 5e-4, betas (0.9, 0.98), eps 1e-6, weight decay 0.2 on
>=2-d weights only, as open_clip's main.py groups them), zero_grad, and the
logit_scale clamp to [0, ln 100]; under --precision as open_clip's (the same as
`oxclip bench train --precision`):

  fp32       no autocast
  amp        autocast in fp16 (on the CPU too: open_clip asks for float16) and
             torch.amp.GradScaler (scale, unscale, step, update)
  amp_bf16   autocast in bf16
  pure_bf16  model.to(bfloat16), bf16 images, no autocast

Environment (nothing is downloaded at run time):

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.11.0 open_clip_torch==3.3.0 pyyaml

Usage:

    /tmp/refenv/bin/python scripts/bench_open_clip.py \
        --model-config configs/models/tiny.yaml --batch-size 64 \
        --steps 20 --warmup 3 --threads 2 [--device cpu] [--precision amp_bf16]
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import yaml

import open_clip
from open_clip.loss import ClipLoss, CoCaLoss


def build_model(path):
    with open(path) as f:
        cfg = yaml.safe_load(f)
    towers = dict(
        embed_dim=cfg["embed_dim"],
        vision_cfg=dict(cfg["vision_cfg"]),
        text_cfg=dict(cfg["text_cfg"]),
        quick_gelu=bool(cfg.get("quick_gelu", False)),
    )
    if "multimodal_cfg" in cfg:
        model = open_clip.coca_model.CoCa(multimodal_cfg=dict(cfg["multimodal_cfg"]), **towers)
    else:
        model = open_clip.model.CLIP(**towers)
    return model, cfg


def random_text(batch, ctx, vocab, gen):
    """Random ids in 1..vocab-2 with EOT = vocab-1 (the largest id in each
    row, where open_clip pools) at a random position, zeros after it."""
    eot = vocab - 1
    text = torch.zeros(batch, ctx, dtype=torch.long)
    lengths = torch.randint(1, ctx, (batch,), generator=gen)
    for i, n in enumerate(lengths.tolist()):
        text[i, :n] = torch.randint(1, eot, (n,), generator=gen)
        text[i, n] = eot
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-config", required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "amp", "amp_bf16", "pure_bf16"],
                    help="as open_clip's --precision")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(args.threads)
    except RuntimeError:
        pass
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    model, cfg = build_model(args.model_config)
    model = model.to(device).train()
    input_dtype = torch.float32
    if args.precision == "pure_bf16":
        model = model.to(torch.bfloat16)
        input_dtype = torch.bfloat16
    autocast_dtype = {"amp": torch.float16, "amp_bf16": torch.bfloat16}.get(args.precision)
    scaler = torch.amp.GradScaler(device=device.type) if args.precision == "amp" else None

    isz = cfg["vision_cfg"]["image_size"]
    ctx = cfg["text_cfg"].get("context_length", 77)
    vocab = cfg["text_cfg"].get("vocab_size", 49408)
    gen = torch.Generator().manual_seed(args.seed + 1)
    images = torch.randn(args.batch_size, 3, isz, isz, generator=gen).to(device, dtype=input_dtype)
    text = random_text(args.batch_size, ctx, vocab, gen).to(device)

    # open_clip main.py: no weight decay on gains, biases, norms, logit_scale
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2},
        ],
        lr=5e-4, betas=(0.9, 0.98), eps=1e-6,
    )
    coca = "multimodal_cfg" in cfg
    loss_fn = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0) if coca else ClipLoss()

    def step():
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            if coca:
                out = model(images, text)
                loss = sum(loss_fn(out["image_features"], out["text_features"], out["logits"],
                                   out["labels"], out["logit_scale"]))
            else:
                image_features = model.encode_image(images, normalize=True)
                text_features = model.encode_text(text, normalize=True)
                loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        loss = step()
    loss.item()
    sync()
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - cpu0

    model_name = os.path.splitext(os.path.basename(args.model_config))[0]
    print(json.dumps({
        "impl": "open_clip",
        "model": model_name,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "steps": args.steps,
        "threads": args.threads,
        "seconds": round(seconds, 6),
        "samples_per_second": round(args.batch_size * args.steps / seconds, 3),
        "cpu_seconds": round(cpu_seconds, 6),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
