#!/usr/bin/env python3
"""The scaling model of docs/scaling.md: predicted samples/s of a data-parallel CLIP step.

Prints the doc's tables (markdown) from the constants below, so every number in the doc can
be re-derived and every assumption changed in one place. Python standard library only.

    python3 scripts/scaling_model.py            # the tables of docs/scaling.md
    python3 scripts/scaling_model.py --model ViT-B-32 --gpus 128 --link-gbs 25   # one cluster
    python3 scripts/scaling_model.py --sim ...  # one simulated-link prediction (see --help)
"""

import argparse
import math

# Per-GPU compute of one step, batch 256 per GPU, bf16 autocast, one H200 (docs/benchmarks.md,
# "Training step, ViT-B-32": 3,432 samples/s at batch 256). ViT-L-14 has not run on a GPU
# here: its time is ViT-B-32's scaled by open_clip's model_profile.csv GFLOPs (175.33 / 14.78).
BATCH_PER_GPU = 256
VIT_B_32_STEP_S = BATCH_PER_GPU / 3432
MODELS = {
    # name: (parameters, embedding width, tower compute seconds per step, measured?)
    "ViT-B-32": (151.28e6, 512, VIT_B_32_STEP_S, True),
    "ViT-L-14": (427.62e6, 768, VIT_B_32_STEP_S * 175.33 / 14.78, False),
}
# Backward share of the towers' time (the forward is about a third of forward + backward).
BACKWARD_SHARE = 2 / 3
# The tiled CLIP loss, bf16 products, one H200: 66.6 s for N = 1,048,576 (N^2 pairs, both
# directions), 4.5 s for 262,144: ~6.1e-11 s per pair. A rank scores its n image rows and its
# n text columns against all N: 2 n N pairs.
LOSS_S_PER_PAIR = 66.6 / 1048576**2
# Per-collective latency (one hop of NCCL's tree algorithm) and hops per collective: log2(W).
HOP_LATENCY_S = 10e-6
# DDP's (and oxclip's) bucket: the last one to be reduced is exposed even with overlap.
BUCKET_BYTES = 25 * 2**20

# Bus bandwidth per GPU (bytes/s): NVLink inside a node of 8, the network's per-GPU NIC across
# nodes (a rail-optimised ring is as fast as its slowest link, each GPU's own NIC).
LINKS = {
    "NVLink node (8 GPUs), 360 GB/s": 360e9,
    "400 Gb/s per GPU (NDR InfiniBand), 50 GB/s": 50e9,
    "200 Gb/s per GPU (HDR, A100-era), 25 GB/s": 25e9,
}
GPU_COUNTS = [8, 64, 512, 4096]


def collective_s(kind, total_bytes, world, bandwidth):
    """Ring bandwidth term plus tree latency for one collective over `world` ranks.

    all_reduce of S bytes moves 2 (W-1)/W S per rank; all_gather and reduce_scatter whose
    full (gathered) tensor is S bytes move (W-1)/W S.
    """
    if world == 1:
        return 0.0
    factor = {"all_reduce": 2.0, "all_gather": 1.0, "reduce_scatter": 1.0}[kind]
    return factor * (world - 1) / world * total_bytes / bandwidth + HOP_LATENCY_S * math.ceil(math.log2(world))


def step(model, world, bandwidth, grad_bytes=4):
    """Seconds of one step's parts on `world` GPUs: a dict."""
    params, dim, towers_s, _ = MODELS[model]
    n, big_n = BATCH_PER_GPU, BATCH_PER_GPU * world
    # Features gathered in bf16 (two towers), their gradients reduce-scattered in fp32.
    features_s = 2 * collective_s("all_gather", big_n * dim * 2, world, bandwidth)
    feature_grads_s = 2 * collective_s("reduce_scatter", big_n * dim * 4, world, bandwidth)
    loss_s = LOSS_S_PER_PAIR * 2 * n * big_n
    reduce_s = collective_s("all_reduce", params * grad_bytes, world, bandwidth)
    backward_s = BACKWARD_SHARE * towers_s
    last_bucket_s = collective_s("all_reduce", min(BUCKET_BYTES, params * grad_bytes), world, bandwidth)
    exposed_overlap_s = max(reduce_s - backward_s, last_bucket_s) if world > 1 else 0.0
    base = towers_s + loss_s + features_s + feature_grads_s
    return {
        "towers": towers_s,
        "loss": loss_s,
        "features": features_s,
        "feature_grads": feature_grads_s,
        "reduce": reduce_s,
        "exposed_overlap": exposed_overlap_s,
        "step_no_overlap": base + reduce_s,
        "step_overlap": base + exposed_overlap_s,
    }


def ms(seconds):
    return f"{1000 * seconds:.1f}"


def tables():
    for model, (params, dim, towers_s, measured) in MODELS.items():
        how = "measured" if measured else "estimated from GFLOPs"
        print(f"### {model} ({params / 1e6:.0f} M parameters, d = {dim}; towers {ms(towers_s)} ms per 256 samples, {how})\n")
        print("| link | GPUs | global batch | loss | features + their grads | param all-reduce fp32 / bf16 | exposed, no overlap | exposed, overlap | samples/s, no overlap | samples/s, overlap | scaling efficiency, overlap |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        one_gpu = BATCH_PER_GPU / towers_s
        for link, bandwidth in LINKS.items():
            for world in GPU_COUNTS:
                if ("NVLink" in link) != (world == 8):
                    continue
                s = step(model, world, bandwidth)
                s16 = step(model, world, bandwidth, grad_bytes=2)
                exchange = s["features"] + s["feature_grads"]
                samples = BATCH_PER_GPU * world
                print(
                    f"| {link} | {world:,} | {samples:,} | {ms(s['loss'])} | {ms(exchange)} | "
                    f"{ms(s['reduce'])} / {ms(s16['reduce'])} | {ms(exchange + s['reduce'])} | {ms(exchange + s['exposed_overlap'])} | "
                    f"{samples / s['step_no_overlap']:,.0f} | {samples / s['step_overlap']:,.0f} | "
                    f"{samples / s['step_overlap'] / (world * one_gpu):.0%} |"
                )
        print()


def simulate(args):
    """Exposed communication predicted for the CPU backend's simulated link."""
    # The CPU backend's simulated link holds each collective for its bandwidth term only.
    rate = args.link_gbs * 1e9
    reduce_s = 2 * (args.world - 1) / args.world * args.grad_bytes / rate
    last_bucket_s = 2 * (args.world - 1) / args.world * min(args.last_bucket_bytes or args.bucket_bytes, args.grad_bytes) / rate
    print(f"all-reduce of {args.grad_bytes:,} bytes over {args.world} ranks at {args.link_gbs} GB/s: {ms(reduce_s)} ms exposed without overlap")
    print(f"with overlap, backward {args.backward_ms} ms: {ms(max(reduce_s - args.backward_ms / 1000, last_bucket_s))} ms exposed")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), help="predict one configuration: the step's parts in ms")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--link-gbs", type=float, default=50.0, help="bus bandwidth per GPU, GB/s (with --sim: OXCLIP_SIM_LINK_GBPS)")
    parser.add_argument("--sim", action="store_true", help="predict one simulated-link run instead of printing the tables")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--grad-bytes", type=int, default=0, help="parameter gradient bytes of the model")
    parser.add_argument("--bucket-bytes", type=int, default=BUCKET_BYTES)
    parser.add_argument("--last-bucket-bytes", type=int, default=0, help="bytes of the last bucket the backward pass completes (default: a full bucket)")
    parser.add_argument("--backward-ms", type=float, default=0.0, help="measured backward time of one step")
    args = parser.parse_args()
    if args.sim:
        simulate(args)
    elif args.model:
        for part, seconds in step(args.model, args.gpus, args.link_gbs * 1e9).items():
            print(f"{part:>16}: {ms(seconds)} ms")
        print(f"{'samples/s':>16}: {BATCH_PER_GPU * args.gpus / step(args.model, args.gpus, args.link_gbs * 1e9)['step_overlap']:,.0f} (overlap)")
    else:
        tables()


if __name__ == "__main__":
    main()
