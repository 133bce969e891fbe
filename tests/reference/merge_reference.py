#!/usr/bin/env python3
"""Independent numpy reference for taskpack's merge methods (src/merge/*.rs).

Regenerate the expectations the Rust test src/merge/reference_tests.rs checks with

    python3 tests/reference/merge_reference.py      # needs numpy

which rewrites tests/data/merge_expectations.txt. The inputs are generated from fixed seeds,
so the output is reproducible; commit it together with any change to a method's formula.

Each method is re-implemented here straight from the formulas of docs/METHODS.md and the module
docs of src/merge/*.rs, without looking at the Rust code paths: a stable argsort for the
magnitude ranks, np.sign, np.packbits(bitorder="little") for the masks, Python integers for
the SplitMix64 stream of DARE. Sums across tasks are float32, accumulated in task order (as the
Rust code documents), so the outputs match the Rust ones to the last bit in practice; whole-
tensor reductions (EMR rescalers, scaling) are float64.

Output format (plain text, one record per line, `key value value ...`, '#' starts a comment):

    model <name> <n_tasks>
    tensor <index> <dims...>          followed by n_tasks lines `tau <floats>`
    run <method> <key=value>...       a merge of every tensor of the model, in order, by one
                                      merger built from MergeParams::defaults + these keys
    out                               one per tensor, followed by
    delta <floats>
    mask <bytes>                      n_tasks lines, only for methods with masks
    tensor_scale <floats>             one per task: scaling::tensor_scale(delta, mask_t, tau_t)
    row_scales <floats>               n_tasks lines: row_scales(..., rows = shape[0] or 1)
    task_scales <floats>              after the last `out`: Merger::task_scales(n_tasks)

Floats are written with Python's shortest round-trip repr of the float32 value.
"""

import math
import os

import numpy as np

F32 = np.float32
F64 = np.float64
M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
TASK_MUL = 0xC2B2AE3D27D4EB4F


# ----------------------------------------------------------------------------- helpers

def f32(x):
    return F32(x)


def sum_tasks(tvs, n):
    """Σ_t τ_t in float32, task order, starting from 0."""
    acc = np.zeros(n, dtype=F32)
    for tv in tvs:
        acc = (acc + tv).astype(F32)
    return acc


def round_count(fraction, n):
    """round(fraction · n) half away from zero, in float64 from the float32 fraction."""
    return min(int(math.floor(float(f32(fraction)) * n + 0.5)), n)


def floor_count(fraction, n):
    return min(int(math.floor(float(f32(fraction)) * n)), n)


def rank_band(tv, skip, keep):
    """Entries whose rank by |τ| descending (stable: lower index first) is in [skip, skip+keep)."""
    order = np.argsort(-np.abs(tv), kind="stable")
    sel = np.zeros(tv.shape[0], dtype=bool)
    sel[order[skip:skip + keep]] = True
    return sel


def packed(mask):
    return [int(b) for b in np.packbits(mask.astype(np.uint8), bitorder="little")]


# ----------------------------------------------------------------------------- methods
# Each returns (delta, masks or None) for one tensor; stateful ones (EMR) take a stats dict.

def task_arithmetic(tvs, n, p):
    return f32(p["alpha"]) * sum_tasks(tvs, n), None


def ties_core(tvs, n, density, reduce):
    k = round_count(density, n)
    trimmed = [np.where(rank_band(tv, 0, k), tv, F32(0)).astype(F32) for tv in tvs]
    gamma = np.sign(sum_tasks(trimmed, n))
    total = np.zeros(n, dtype=F32)
    count = np.zeros(n, dtype=np.int64)
    for t in trimmed:
        agree = (t * gamma) > 0  # a 0 entry, or γ = 0, never agrees
        total = (total + np.where(agree, t, F32(0))).astype(F32)
        count += agree
    if reduce == "sum":
        return total
    return np.where(count > 0, total / np.maximum(count, 1).astype(F32), F32(0)).astype(F32)


def ties(tvs, n, p):
    return f32(p["alpha"]) * ties_core(tvs, n, p["density"], p["reduce"]), None


def splitmix_mix(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def dare_keep(seed, index, task, n, density):
    state = splitmix_mix(seed ^ ((index * GOLDEN) & M64) ^ ((task * TASK_MUL) & M64))
    d = float(f32(density))
    keep = np.zeros(n, dtype=bool)
    for i in range(n):
        state = (state + GOLDEN) & M64
        u = splitmix_mix(state)
        keep[i] = (u >> 11) * 2.0 ** -53 < d
    return keep


def dare(tvs, n, p, index):
    d = f32(p["density"])
    rescaled = []
    for t, tv in enumerate(tvs):
        keep = dare_keep(p["seed"], index, t, n, p["density"])
        if d > 0:
            rescaled.append(np.where(keep, tv / d, F32(0)).astype(F32))
        else:
            rescaled.append(np.zeros(n, dtype=F32))
    if p["base"] == "ties":
        merged = ties_core(rescaled, n, 1.0, p["reduce"])
    else:
        merged = sum_tasks(rescaled, n)
    return f32(p["alpha"]) * merged, None


def breadcrumbs(tvs, n, p):
    n_top = floor_count(p["gamma"], n)
    n_keep = min(round_count(p["density"], n), n - n_top)
    kept = [np.where(rank_band(tv, n_top, n_keep), tv, F32(0)).astype(F32) for tv in tvs]
    return f32(p["alpha"]) * sum_tasks(kept, n), None


def lambdas(p, n_tasks):
    lam = p["lambda"]
    return lam * n_tasks if len(lam) == 1 else lam


def tall_masks(tvs, mtl, lam):
    return [np.abs(tv) > f32(l) * np.abs(mtl - tv) for tv, l in zip(tvs, lam)]


def tall(tvs, n, p):
    mtl = (f32(p["alpha"]) * sum_tasks(tvs, n)).astype(F32)
    return mtl, tall_masks(tvs, mtl, lambdas(p, len(tvs)))


def consensus(tvs, n, p):
    s = sum_tasks(tvs, n)
    masks = tall_masks(tvs, s, lambdas(p, len(tvs)))
    votes = np.sum(np.array(masks, dtype=np.int64).reshape(len(tvs), n), axis=0)
    keep = votes >= p["min_tasks"]
    return np.where(keep, f32(p["alpha"]) * s, F32(0)).astype(F32), None


def emr(tvs, n, stats):
    gamma = np.sign(sum_tasks(tvs, n))
    eps = np.zeros(n, dtype=F32)
    for tv in tvs:
        eps = np.maximum(eps, np.where(tv * gamma > 0, np.abs(tv), F32(0)))
    uni = (gamma * eps).astype(F32)
    masks = []
    for t, tv in enumerate(tvs):
        m = tv.astype(F64) * uni.astype(F64) > 0  # τ_t ⊙ τ_uni > 0, without f32 underflow
        masks.append(m)
        stats["num"][t] += float(np.sum(np.abs(tv.astype(F64))))
        stats["den"][t] += float(np.sum(np.abs(np.where(m, uni, F32(0)).astype(F64))))
    return uni, masks


def scale(delta, mask, tau):
    d = (np.where(mask, delta, F32(0)) if mask is not None else delta).astype(F64)
    t = tau.astype(F64)
    norm = float(d @ d)
    return F32(float(d @ t) / norm) if norm > 0 else F32(0)


def row_scales(delta, mask, tau, rows):
    n = delta.shape[0]
    if n == 0:
        return [F32(0)] * rows
    w = n // rows
    return [scale(delta[r * w:(r + 1) * w], None if mask is None else mask[r * w:(r + 1) * w],
                  tau[r * w:(r + 1) * w]) for r in range(rows)]


# ----------------------------------------------------------------------------- cases

def task_vectors(rng, n_tasks, n, magnitude):
    """Random task vectors with exact zeros, magnitude ties and exact-zero sums."""
    x = rng.normal(0.0, 1.0, (n_tasks, n))
    on_grid = rng.random((n_tasks, n)) < 0.4
    x = np.where(on_grid, np.round(x * 4) / 4, x)  # many ±0.25, ±0.5, ... → ties in |τ|
    x = np.where(rng.random((n_tasks, n)) < 0.15, 0.0, x)
    if n >= 4:
        x[:, 0] = 0.0  # all tasks zero
        x[:, 1] = 0.0
        x[0, 1], x[1, 1] = 0.5, -0.5  # sum exactly 0, equal magnitudes
        x[:, 2] = 0.75 * np.where(np.arange(n_tasks) % 2 == 0, 1.0, -1.0)  # one magnitude, mixed signs
    return [(F32(magnitude) * row.astype(F32)).astype(F32) for row in x]


def runs(n_tasks, per_task_lambda):
    lam = ",".join(str(v) for v in per_task_lambda)
    return [
        "task-arithmetic alpha=0.3",
        "ties alpha=1 density=0.2 reduce=mean",
        "ties alpha=0.7 density=0.5 reduce=sum",
        "ties alpha=1 density=1 reduce=mean",
        "dare alpha=0.3 density=0.5 seed=42 base=task-arithmetic",
        "dare alpha=1 density=0.7 seed=7 base=ties reduce=mean",
        "dare alpha=0.5 density=0.3 seed=18446744073709551615 base=ties reduce=sum",
        "dare alpha=0.3 density=1 seed=3 base=task-arithmetic",
        "dare alpha=0.3 density=0 seed=3 base=task-arithmetic",
        "breadcrumbs alpha=0.3 density=0.9 gamma=0.01",
        "breadcrumbs alpha=1 density=0.5 gamma=0.1",
        "breadcrumbs alpha=0.5 density=1 gamma=0.3",
        f"tall alpha=1 lambda={lam}",
        "tall alpha=0.3 lambda=0.4",
        "consensus alpha=0.3 lambda=0.4 min_tasks=2",
        f"consensus alpha=1 lambda={lam} min_tasks={n_tasks}",
        "consensus alpha=0.5 lambda=0.2 min_tasks=1",
        "emr",
        "tvq",
    ]


DEFAULTS = dict(alpha=None, density=None, gamma=0.01, min_tasks=2, seed=0, reduce="mean",
                base="task-arithmetic", **{"lambda": [0.4]})


def parse_run(spec):
    method, *kvs = spec.split()
    p = dict(DEFAULTS)
    for kv in kvs:
        k, v = kv.split("=")
        if k == "lambda":
            p[k] = [float(x) for x in v.split(",")]
        elif k in ("seed", "min_tasks"):
            p[k] = int(v)
        elif k in ("reduce", "base"):
            p[k] = v
        else:
            p[k] = float(v)
    return method, p


def fmt(values):
    return " ".join(repr(float(F32(v))) for v in values)


def main():
    rng = np.random.default_rng(20240607)
    models = [
        ("A", 3, [(0, (37,)), (5, (8, 8))], 1.0, [0.4, 0.3, 0.6]),
        ("B", 4, [(2, (64,)), (7, (5, 6)), (9, (0,)), (11, (1, 3))], 0.01, [0.2, 0.5, 0.4, 0.3]),
    ]
    lines = [
        "# GENERATED by tests/reference/merge_reference.py -- do not edit by hand.",
        "# Regenerate: python3 tests/reference/merge_reference.py (numpy). Format: see the script.",
    ]
    for name, n_tasks, tensors, magnitude, lam in models:
        data = []
        lines.append(f"model {name} {n_tasks}")
        for index, shape in tensors:
            n = int(np.prod(shape))
            tvs = task_vectors(rng, n_tasks, n, magnitude)
            data.append((index, shape, n, tvs))
            lines.append(f"tensor {index} " + " ".join(str(d) for d in shape))
            lines.extend("tau " + fmt(tv) for tv in tvs)
        for spec in runs(n_tasks, lam):
            method, p = parse_run(spec)
            lines.append("run " + spec)
            stats = {"num": [0.0] * n_tasks, "den": [0.0] * n_tasks}
            for index, shape, n, tvs in data:
                if method == "task-arithmetic":
                    delta, masks = task_arithmetic(tvs, n, p)
                elif method == "ties":
                    delta, masks = ties(tvs, n, p)
                elif method == "dare":
                    delta, masks = dare(tvs, n, p, index)
                elif method == "breadcrumbs":
                    delta, masks = breadcrumbs(tvs, n, p)
                elif method == "tall":
                    delta, masks = tall(tvs, n, p)
                elif method == "consensus":
                    delta, masks = consensus(tvs, n, p)
                elif method == "emr":
                    delta, masks = emr(tvs, n, stats)
                elif method == "tvq":
                    # No shared delta: each task's task vector goes into its residual.
                    delta, masks = np.zeros(n, dtype=F32), None
                else:
                    raise ValueError(method)
                delta = np.asarray(delta, dtype=F32)
                lines.append("out")
                lines.append(("delta " + fmt(delta)).rstrip())
                if masks is not None:
                    lines.extend(("mask " + " ".join(str(b) for b in packed(m))).rstrip()
                                 for m in masks)
                ms = masks if masks is not None else [None] * n_tasks
                lines.append("tensor_scale " + fmt(scale(delta, m, tv) for m, tv in zip(ms, tvs)))
                rows = shape[0] if len(shape) > 0 else 1
                for m, tv in zip(ms, tvs):
                    lines.append(("row_scales " + fmt(row_scales(delta, m, tv, rows))).rstrip())
            # λ_t for EMR; 1 for every other method (and where the denominator is 0).
            scales = [F32(num / den) if den > 0 else F32(1)
                      for num, den in zip(stats["num"], stats["den"])]
            lines.append("task_scales " + fmt(scales))
    here = os.path.dirname(os.path.abspath(__file__))
    out = os.path.join(here, "..", "data", "merge_expectations.txt")
    with open(out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.normpath(out)} ({len(lines)} lines)")


def self_check():
    # Published SplitMix64 outputs (Rosetta Code, "Pseudo-random numbers/Splitmix64").
    state, outs = 1234567, []
    for _ in range(3):
        state = (state + GOLDEN) & M64
        outs.append(splitmix_mix(state))
    assert outs == [6457827717110365317, 3203168211198807973, 9817491932198370423], outs
    assert packed(np.array([1, 0, 1, 1, 0, 0, 0, 0, 0, 1], dtype=bool)) == [13, 2]
    assert round_count(0.25, 10) == 3 and round_count(0.2, 37) == 7 and floor_count(0.7, 10) == 6


if __name__ == "__main__":
    self_check()
    main()
