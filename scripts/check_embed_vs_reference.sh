#!/usr/bin/env bash
# Issue 5's acceptance check against the reference implementations, on ViT-B-32 size
# (too large for committed fixtures): the same random-init open_clip ViT-B-32 weights,
# embedded by open_clip and by `oxclip embed` (224 px PNGs: max abs difference; a resized
# JPEG: cosine), the same through a Hugging Face export read by transformers' CLIPModel, and
# an open_clip export loaded with strict=True.
#
# Needs a Python with torch 2.11, open_clip_torch 3.3.0 and transformers 4.57
# (OXCLIP_REF_PYTHON, see tests/fixtures/make_fixtures.py) and a built target/release/oxclip.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${OXCLIP_REF_PYTHON:?set OXCLIP_REF_PYTHON to a python with open_clip and transformers}"
BIN="$PWD/target/release/oxclip"
D=$(mktemp -d)
trap 'rm -rf "$D"' EXIT
cd "$D"
"$PY" - <<'PY'
import json, numpy as np, torch, open_clip
from PIL import Image
from safetensors.torch import save_file
torch.manual_seed(0)
model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
model.eval()
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, "vitb32.safetensors")
rng = np.random.default_rng(0)
paths = []
for i in range(3):
    Image.fromarray((rng.random((224, 224, 3)) * 255).astype(np.uint8)).save(f"img{i}.png"); paths.append(f"img{i}.png")
y, x = np.mgrid[0:300, 0:400]
Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)).save("photo.jpg", quality=90); paths.append("photo.jpg")
texts = ["a photo of a dog", "A Red Car, parked on the street!", "二つの猫", "café au lait & croissants", "the number 42 in big letters"]
json.dump(texts, open("texts.json", "w"))
tok = open_clip.get_tokenizer("ViT-B-32")
with torch.no_grad():
    ie = torch.nn.functional.normalize(model.encode_image(torch.stack([preprocess(Image.open(p)) for p in paths])), dim=-1)
    te = torch.nn.functional.normalize(model.encode_text(tok(texts)), dim=-1)
save_file({"image_embeds": ie.contiguous(), "text_embeds": te.contiguous()}, "reference.safetensors")
PY
"$BIN" embed --model ViT-B-32 --checkpoint vitb32.safetensors --images img0.png img1.png img2.png photo.jpg \
  --texts-file texts.json --out ours.safetensors --device cpu
"$BIN" export --model ViT-B-32 --checkpoint vitb32.safetensors --format hf --out hf >/dev/null
"$BIN" export --model ViT-B-32 --checkpoint vitb32.safetensors --format open_clip --out oc >/dev/null
"$BIN" embed --model ViT-B-32 --checkpoint hf/model.safetensors --images img0.png photo.jpg \
  --texts-file texts.json --out ours_from_hf.safetensors --device cpu
"$PY" - <<'PY'
import json, torch, open_clip
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPModel, CLIPImageProcessor
a, ref = load_file("ours.safetensors"), load_file("reference.safetensors")
png = (a["image_embeds"][:3] - ref["image_embeds"][:3]).abs().max().item()
jpg = (a["image_embeds"][3] * ref["image_embeds"][3]).sum().item()
txt = (a["text_embeds"] - ref["text_embeds"]).abs().max().item()
print(f"open_clip: PNG max abs {png:.2e}, JPEG cosine {jpg:.6f}, text max abs {txt:.2e}")
cfg = json.load(open("oc/open_clip_config.json"))
m = open_clip.model.CLIP(**cfg["model_cfg"])
print("open_clip export:", m.load_state_dict(load_file("oc/open_clip_model.safetensors"), strict=True))
hf = CLIPModel.from_pretrained("hf").eval()
proc = CLIPImageProcessor.from_pretrained("hf")
texts = json.load(open("texts.json"))
with torch.no_grad():
    px = proc(images=[Image.open("img0.png").convert("RGB"), Image.open("photo.jpg").convert("RGB")], return_tensors="pt")["pixel_values"]
    hie = torch.nn.functional.normalize(hf.get_image_features(pixel_values=px), dim=-1)
    hte = torch.nn.functional.normalize(hf.get_text_features(input_ids=open_clip.get_tokenizer("ViT-B-32")(texts)), dim=-1)
b = load_file("ours_from_hf.safetensors")
hpng = (b["image_embeds"][0] - hie[0]).abs().max().item()
hjpg = (b["image_embeds"][1] * hie[1]).sum().item()
htxt = (b["text_embeds"] - hte).abs().max().item()
print(f"transformers: PNG max abs {hpng:.2e}, JPEG cosine {hjpg:.6f}, text max abs {htxt:.2e}")
ok = png <= 1e-4 and jpg >= 0.999 and txt <= 1e-4 and hpng <= 1e-4 and hjpg >= 0.999 and htxt <= 1e-4
print("PASS" if ok else "FAIL")
raise SystemExit(0 if ok else 1)
PY
