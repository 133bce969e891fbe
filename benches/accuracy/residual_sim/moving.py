#!/usr/bin/env python3
"""Shares docs/METHODS.md quotes about the benchmark's models, from the cached checkpoints.

    python moving.py FAMILY       (text | vision)

- the fraction of weights that move in T-Switch's module (lowbit.ternary_rows of each task
  vector over the q8 base, per row, tensors of >= 4096 elements, BatchNorm statistics and
  heads left out), over every task;
- for a family with convolutions, the share of its convolution weights that taskpack's
  `--calib` fits: pointwise (1x1, one group, stride 1), input channels a multiple of the 64-value block.
"""

import os
import sys

import numpy as np
import onnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compact import HEAD, family_paths, float_inits  # noqa: E402
from lowbit import q8, ternary_rows  # noqa: E402


def main(family):
    root, tasks = family_paths(family)
    base_model = onnx.load(os.path.join(root, "models", "base.onnx"))
    base = float_inits(base_model)
    bn_stats = {i for node in base_model.graph.node if node.op_type == "BatchNormalization"
                for i in node.input[3:5]}
    moved = total = 0
    for t in tasks:
        w = float_inits(onnx.load(os.path.join(root, "models", f"{t}.onnx")))
        for n, v in base.items():
            if (HEAD.search(n) or n in bn_stats or n not in w or w[n].shape != v.shape
                    or v.size < 4096):
                continue
            tau = w[n].reshape(-1).astype(np.float32) - q8(v.astype(np.float32).reshape(-1))[0]
            rows = v.shape[0] if v.ndim >= 2 else 1
            d = ternary_rows(tau.reshape(rows, -1))
            moved += np.count_nonzero(d)
            total += d.size
    print(f"{family}: T-Switch moves {moved / total:.3f} of the weights (tensors >= 4096 "
          f"elements, {len(tasks)} tasks)")
    convs = [n for n in base_model.graph.node if n.op_type == "Conv" and n.input[1] in base]
    if convs:
        def group(n):
            return next((a.i for a in n.attribute if a.name == "group"), 1)

        def unit_strides(n):
            return all(v == 1 for a in n.attribute if a.name == "strides" for v in a.ints)
        all_w = sum(base[n.input[1]].size for n in convs)
        fitted = sum(base[n.input[1]].size for n in convs
                     if base[n.input[1]].shape[2:] == (1, 1) and group(n) == 1 and unit_strides(n)
                     and base[n.input[1]].shape[1] % 64 == 0)
        print(f"{family}: --calib fits {fitted / all_w:.3f} of the convolution weights "
              f"({fitted} of {all_w})")


if __name__ == "__main__":
    main(sys.argv[1])
