#!/usr/bin/env python3
"""Train the quickstart with open_clip's own trainer, then score it with `oxclip eval`.

The yardstick for oxclip's training curves: same data (data/synth from
`make quickstart`), same architecture (configs/models/small.yaml), same
recipe (configs/quickstart.yaml: batch, steps, lr, warmup, cosine, weight
decay, AdamW betas/eps, fp32) run by open_clip_train.main on the CPU, for
the CLIP loss or (`--siglip`) open_clip's SigLipLoss. The checkpoint is
converted to safetensors and scored by the same `oxclip eval` zero-shot
command that scores an oxclip run, so the two differ only in the trainer.

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.11.0 open_clip_torch==3.3.0 \
        webdataset safetensors pyyaml tensorboard
    /tmp/refenv/bin/python scripts/open_clip_quickstart.py --loss siglip --out /tmp/oc-siglip

Run from the repository root after `make quickstart` (it needs the shards and
target/release/oxclip). Prints one JSON line: loss, steps, final logit_scale
(and logit_bias), zero-shot top-1 and top-5.
"""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import yaml


def open_clip_args(run: dict, model_name: str, loss: str, out: Path) -> list:
    train, optim, data = run["train"], run["optim"], run["data"]
    shards = sorted(Path(data["train"]).glob("*.tar"))
    if not shards:
        sys.exit(f"no shards under {data['train']}: run `make quickstart` first")
    batch, steps = train["batch_size"], train["steps"]
    # open_clip counts epochs; 4 epochs of steps/4 batches give the same step count and
    # the same cosine schedule over it.
    epochs = 4
    if steps % epochs:
        sys.exit(f"train.steps = {steps} is not a multiple of {epochs}")
    betas = optim.get("betas", [0.9, 0.98])
    args = [
        "--model", model_name,
        "--train-data", "::".join(str(s) for s in shards),
        "--dataset-type", "webdataset",
        "--train-num-samples", str(steps // epochs * batch),
        "--epochs", str(epochs),
        "--batch-size", str(batch),
        "--lr", str(optim["lr"]),
        "--wd", str(optim["weight_decay"]),
        "--warmup", str(optim["warmup_steps"]),
        "--beta1", str(betas[0]), "--beta2", str(betas[1]),
        "--eps", str(optim.get("eps", 1e-6)),
        "--workers", str(data.get("workers", 2)),
        "--precision", "fp32",
        "--seed", str(train.get("seed", 0)),
        "--logs", str(out), "--name", loss,
        "--save-frequency", str(epochs),
        "--log-every-n-steps", "50",
    ]
    return args + (["--siglip"] if loss == "siglip" else [])


def train(args: list, model_cfg: Path) -> None:
    import open_clip
    from open_clip_train.main import main

    open_clip.add_model_config(str(model_cfg))
    main(args)


def to_safetensors(checkpoint: Path, out: Path) -> dict:
    import torch
    from safetensors.torch import save_file

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    state = {k.removeprefix("module."): v.contiguous() for k, v in state.items()}
    save_file(state, str(out))
    return {k: v.item() for k, v in state.items() if k.startswith("logit")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loss", choices=["clip", "siglip"], default="clip")
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--out", type=Path, required=True, help="open_clip logs and the converted weights")
    p.add_argument("--train-only", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()

    run = yaml.safe_load(open(a.config))
    model = yaml.safe_load(open(Path("configs/models") / f"{run['model']}.yaml"))
    model_name = f"oxclip-{run['model']}"
    a.out.mkdir(parents=True, exist_ok=True)
    model_cfg = a.out / f"{model_name}.json"
    model_cfg.write_text(json.dumps({k: model[k] for k in ("embed_dim", "vision_cfg", "text_cfg")}))

    # open_clip's main() parses its own arguments and may call sys.exit; keep it in a child.
    oc_args = open_clip_args(run, model_name, a.loss, a.out)
    if a.train_only:
        train(oc_args, model_cfg)
        return
    subprocess.run([sys.executable, __file__, "--train-only", "--loss", a.loss, "--config", a.config,
                    "--out", str(a.out)], check=True)

    weights = a.out / f"{a.loss}.safetensors"
    scalars = to_safetensors(a.out / a.loss / "checkpoints" / "epoch_4.pt", weights)
    data = run["data"]
    ev = subprocess.run(["target/release/oxclip", "eval", "--checkpoint", str(weights), "--model", run["model"],
                         "--device", "cpu", "--zero-shot", data["val"], "--classnames", data["classnames"],
                         "--templates", data["templates"], "--json"],
                        check=True, capture_output=True, text=True)
    zero_shot = json.loads(ev.stdout.strip().splitlines()[-1])["zero_shot"]
    print(json.dumps({"trainer": "open_clip", "loss": a.loss, "steps": run["train"]["steps"],
                      "logit_scale": math.exp(scalars["logit_scale"]), "logit_bias": scalars.get("logit_bias"),
                      "zero_shot_top1": zero_shot["top1"], "zero_shot_top5": zero_shot["top5"]}))


if __name__ == "__main__":
    main()
