"""Relative error of block quantization on real weights: which group size `q8` / `q4` use.

Reads the base and one fine-tuned task of the text family from the accuracy benchmark's cache
(run `benches/accuracy/run.sh --prepare` first) and prints, for int8 and int4 symmetric codes
with one scale per row or per group of 32 ... 256 consecutive values, the relative RMS error
‖q(x) − x‖ / ‖x‖ over every matrix of at least 4096 elements (the tensors taskpack quantizes),
for the pretrained weights and for the task vector; the word embeddings separately.
docs/METHODS.md ("Block-quantized storage") quotes its output.

    ~/.cache/taskpack/venv/bin/python benches/accuracy/quant_error.py [--task rotten]
"""

import argparse
import os

import numpy as np
import onnx
from onnx import numpy_helper


def initializers(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}


def quantize(x, bits, group):
    """Symmetric codes round(x / s), s = max|x| / (2^(bits-1) - 1) per row (group 0) or group."""
    q_max = 2 ** (bits - 1) - 1
    if group:
        flat = x.reshape(-1)
        blocks = np.concatenate([flat, np.zeros((-flat.size) % group, flat.dtype)]).reshape(-1, group)
    else:
        blocks = x.reshape(x.shape[0], -1)
    s = np.abs(blocks).max(axis=1, keepdims=True) / q_max
    s[s == 0] = 1
    out = np.clip(np.round(blocks / s), -q_max, q_max) * s
    return out.reshape(-1)[: x.size].reshape(x.shape)


def main():
    cache = os.environ.get("TASKPACK_CACHE", os.path.expanduser("~/.cache/taskpack"))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=os.path.join(cache, "accuracy", "models"))
    ap.add_argument("--task", default="rotten")
    a = ap.parse_args()
    base = initializers(os.path.join(a.models, "base.onnx"))
    task = initializers(os.path.join(a.models, f"{a.task}.onnx"))
    print("| storage | per row | groups of 32 | 64 | 128 | 256 | word embeddings, groups of 64 |")
    print("|---|---|---|---|---|---|---|")
    for kind in ("base", "task vector"):
        for bits in (8, 4):
            cells, embeddings = [], None
            for group in (0, 32, 64, 128, 256):
                err = norm = 0.0
                for name, w in base.items():
                    if w.ndim < 2 or w.size < 4096 or name not in task or task[name].shape != w.shape:
                        continue
                    x = w if kind == "base" else task[name] - w
                    e = float(((quantize(x, bits, group) - x) ** 2).sum())
                    n = float((x ** 2).sum())
                    err, norm = err + e, norm + n
                    if "word_embeddings" in name and group == 64:
                        embeddings = (e / n) ** 0.5
                cells.append(f"{(err / norm) ** 0.5:.4f}")
            print(f"| int{bits} {kind} | " + " | ".join(cells) + f" | {embeddings:.4f} |")


if __name__ == "__main__":
    main()
