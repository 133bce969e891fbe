#!/usr/bin/env bash
# The runtime on real fine-tunes, side by side with ONNX Runtime (docs/PERFORMANCE.md).
# Takes the six all-MiniLM-L6-v2 text tasks that benches/accuracy fine-tunes (and caches; built
# first if missing), compiles them into bundles, runs `taskpack bench` on each bundle and then
# benches/minilm/ort.py on the same task models, f32 and `quantize_dynamic` int8, in one run.
# Usage: benches/minilm/run.sh [--tasks "rotten tweets"] [extra `taskpack bench` options]
set -euo pipefail
cd "$(dirname "$0")/../.."

TASKS="rotten tweets spam supersense fortune hedge"
if [ "${1:-}" = "--tasks" ]; then TASKS=$2; shift 2; fi
CACHE="${TASKPACK_CACHE:-$HOME/.cache/taskpack}"
PY="$CACHE/venv/bin/python"
ACC="$CACHE/accuracy"
OUT="$CACHE/minilm"
mkdir -p "$OUT"

missing=0
for t in $TASKS; do [ -e "$ACC/models/$t.onnx" ] || missing=1; done
if [ "$missing" = 1 ]; then benches/accuracy/run.sh --prepare; fi

cargo build --release -p taskpack-cli
EXE=./target/release/taskpack
args=()
for t in $TASKS; do args+=(--task "$t=$ACC/models/$t.onnx"); done
# The heads are fresh per task: private. tvq is the default (each task's own q3 task vector);
# TALL is the text family's best merge (docs/ACCURACY.md).
compile() { # NAME METHOD [compile options]: target/minilm-NAME.tpk, unless newer than the binary
    local name=$1 method=$2; shift 2
    if [ ! target/minilm-"$name".tpk -nt "$EXE" ]; then
        "$EXE" compile --base "$ACC/models/base.onnx" "${args[@]}" --private '^head\.' \
            --method "$method" "$@" -o target/minilm-"$name".tpk
    fi
}
compile tvq tvq
compile f32 tall
compile q8 tall --base-dtype q8 --delta-dtype q4
compile q8-shared tall --base-dtype q8 --delta-dtype q4 --shared word_embeddings

echo "== taskpack bench, tvq: q8 base + q3 task vectors (the default)"
"$EXE" bench target/minilm-tvq.tpk "$@"
echo "== taskpack bench, f32 base + f16 delta"
"$EXE" bench target/minilm-f32.tpk "$@"
echo "== taskpack bench, q8 base + q4 delta"
"$EXE" bench target/minilm-q8.tpk "$@"
echo "== taskpack bench, q8 base + q4 delta, word embeddings shared"
"$EXE" bench target/minilm-q8-shared.tpk "$@"
echo "== ONNX Runtime, each task model on its own"
# shellcheck disable=SC2086  # TASKS is a list
"$PY" benches/minilm/ort.py --models "$ACC/models" --data "$ACC/data" --tasks $TASKS --out "$OUT"
