#!/bin/sh
# Regenerates the fixture bundles (fuzz/bundles/, compiled into the fuzz targets) and the seed
# corpora (fuzz/corpus/<target>/) of the fuzz targets. Needs the taskpack CLI (built here) and
# cargo-fuzz with a nightly toolchain. See docs/FUZZING.md.
set -eu
cd "$(dirname "$0")/.."
cargo build --bin taskpack
tp=target/debug/taskpack
m=models/text
# The text fixture with the default method (tvq: q8 base, q3 residuals), the demo one with TALL
# masks over a q4 delta and ternary residuals on top (f16 for the small tensors): between them
# every module kind and block code but q2 is fuzzed.
$tp compile --base $m/base.onnx --task mood=$m/mood.onnx --task topic=$m/topic.onnx \
    --tokenizer $m/tokenizer.json --labels mood=$m/mood.labels --labels topic=$m/topic.labels \
    -o fuzz/bundles/text.tpk > /dev/null
d=models/demo
$tp compile --base $d/base.onnx --task digits=$d/digits.onnx --task fashion3=$d/fashion3.onnx \
    --task footwear=$d/footwear.onnx --task mnist=$d/mnist.onnx --task parity=$d/parity.onnx \
    --method tall --base-dtype q8 --delta-dtype q4 --residual-dtype ternary \
    -o fuzz/bundles/demo.tpk > /dev/null
cd fuzz
cargo +nightly fuzz run --codegen-units 16 seeds -- -runs=1 > /dev/null 2>&1
ls corpus/*
