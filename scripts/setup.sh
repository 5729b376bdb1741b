#!/usr/bin/env bash
# Fetches what the build needs, from the package registries only, into a cache outside the repo.
# Idempotent: each piece is skipped when its marker file is already present.
#
#   OXCLIP_CACHE   cache directory (default ~/.cache/oxclip)
#   LIBTORCH       a libtorch of your own (e.g. a CUDA build); when set, none is fetched
#
# Writes $OXCLIP_CACHE/env.mk with the paths the Makefile gives cargo (OXCLIP_LIBTORCH,
# OXCLIP_VOCAB).
set -euo pipefail

CACHE="${OXCLIP_CACHE:-$HOME/.cache/oxclip}"
TORCH_VERSION=2.11.0
# libtorch_cpu.so links against these CUDA 13 runtime libraries even on CPU; the torch wheel
# pins them through cuda-toolkit 13.0.2.
CUDART_WHEEL="nvidia-cuda-runtime==13.0.96"
CUPTI_WHEEL="nvidia-cuda-cupti==13.0.85"
OPEN_CLIP_WHEEL="open-clip-torch==3.3.0"
PYTHON="${PYTHON:-python3}"

mkdir -p "$CACHE/wheels"
cd "$CACHE"

fetch_wheel() { # spec
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux_2_25_x86_64 --platform manylinux2014_x86_64 \
    --python-version 3.11 -d "$CACHE/wheels" "$1"
}
wheel_path() { # glob
  ls "$CACHE"/wheels/$1 2>/dev/null | head -n 1
}

if [ -n "${LIBTORCH:-}" ]; then
  echo "setup: using LIBTORCH=$LIBTORCH"
  [ -d "$LIBTORCH/lib" ] || { echo "setup: LIBTORCH=$LIBTORCH has no lib/ directory" >&2; exit 1; }
  LIBTORCH_DIR="$LIBTORCH"
else
  LIBTORCH_DIR="$CACHE/libtorch-$TORCH_VERSION"
  if [ ! -f "$LIBTORCH_DIR/.complete" ]; then
    echo "setup: fetching torch==$TORCH_VERSION from PyPI for its libtorch (~530 MB, once)"
    [ -n "$(wheel_path "torch-$TORCH_VERSION-*.whl")" ] || fetch_wheel "torch==$TORCH_VERSION"
    [ -n "$(wheel_path 'nvidia_cuda_runtime-*.whl')" ] || fetch_wheel "$CUDART_WHEEL"
    [ -n "$(wheel_path 'nvidia_cuda_cupti-*.whl')" ] || fetch_wheel "$CUPTI_WHEEL"
    rm -rf "$LIBTORCH_DIR.tmp" && mkdir -p "$LIBTORCH_DIR.tmp/lib"
    tmp="$LIBTORCH_DIR.tmp"
    unzip -q -o "$(wheel_path "torch-$TORCH_VERSION-*.whl")" 'torch/include/*' \
      'torch/lib/libtorch_cpu.so' 'torch/lib/libc10.so' 'torch/lib/libgomp.so.1' \
      'torch/lib/libtorch.so' -d "$tmp/wheel"
    mv "$tmp/wheel/torch/include" "$tmp/include"
    mv "$tmp"/wheel/torch/lib/* "$tmp/lib/"
    # torch-sys links -lgomp through the unversioned name.
    ln -sf libgomp.so.1 "$tmp/lib/libgomp.so"
    for w in nvidia_cuda_runtime nvidia_cuda_cupti; do
      unzip -q -o "$(wheel_path "$w-*.whl")" '*.so*' -d "$tmp/wheel"
    done
    find "$tmp/wheel" \( -name 'libcudart.so.13*' -o -name 'libcupti.so.13*' \) -exec cp -a {} "$tmp/lib/" \;
    rm -rf "$tmp/wheel"
    echo "$TORCH_VERSION" > "$tmp/build-version"
    touch "$tmp/.complete"
    rm -rf "$LIBTORCH_DIR" && mv "$tmp" "$LIBTORCH_DIR"
  fi
fi

VOCAB="$CACHE/bpe_simple_vocab_16e6.txt.gz"
if [ ! -f "$VOCAB" ]; then
  echo "setup: fetching the CLIP BPE vocabulary from $OPEN_CLIP_WHEEL"
  [ -n "$(wheel_path 'open_clip_torch-*.whl')" ] || fetch_wheel "$OPEN_CLIP_WHEEL"
  unzip -p "$(wheel_path 'open_clip_torch-*.whl')" 'open_clip/bpe_simple_vocab_16e6.txt.gz' > "$VOCAB.tmp"
  mv "$VOCAB.tmp" "$VOCAB"
fi

cat > "$CACHE/env.mk" <<EOM
OXCLIP_LIBTORCH := $LIBTORCH_DIR
OXCLIP_VOCAB := $VOCAB
EOM
echo "setup: libtorch at $LIBTORCH_DIR; vocabulary at $VOCAB"
