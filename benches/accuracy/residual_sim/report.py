#!/usr/bin/env python3
"""Turns results/FAMILY/*.json (compact.py) into the tables of results.md (printed to stdout).

Size of a setting = base q8 bytes (68 per 64 merged elements) + shared δ bytes (tall rows:
q4, 20 per 32) + Σ_tasks (E bytes + mask bits (tall rows) + 4 bytes per private element),
as a fraction of the sum of the task ONNX file sizes. 95% intervals: the paired bootstrap of
benches/accuracy/stats.py over test examples, against the individual models.
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from stats import Bootstrap  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# Results live in the cache, next to the benchmark's own (not in the repository).
RESULTS = os.path.join(os.path.expanduser(os.environ.get("TASKPACK_CACHE", "~/.cache/taskpack")), "accuracy", "residual_sim")
CACHE = os.path.expanduser("~/.cache/taskpack/accuracy")
ORDER = ["individual", "identity", "q8", "q4", "q3", "ternary-64", "ternary-128", "ternary-row",
         "q2", "ternary-64-q8small", "ternary-128-q8small", "ternary-row-q8small",
         "q2-q8small", "switch-row-q8small", "q4base+switch-row-q8small", "q4base+q2-q8small",
         "q4base+q3-q8small", "fit-cols+q2-q8small", "fit-rows+q2-q8small",
         "fit-rows+switch-row-q8small", "fit-cols+switch-row-q8small",
         "fit-rows+q4base+switch-row-q8small", "fit-cols+q4base+switch-row-q8small",
         "fit-cols+q4base+q2-q8small", "tall", "tall+q3", "tall+ternary-64"]
LABEL = {"individual": "individual (task ONNX as is)",
         "identity": "q8 base + exact f32 task vector",
         "q8": "q8 base + q8 τ (blocks 64)", "q4": "q8 base + q4 τ (blocks 32)",
         "q3": "q8 base + q3 τ (blocks 64, MSE scale)",
         "ternary-64": "q8 base + ternary τ (blocks 64)",
         "ternary-128": "q8 base + ternary τ (blocks 128)",
         "ternary-row": "q8 base + ternary τ (per row)",
         "q2": "q8 base + q2 {−2..1} τ (blocks 64)",
         "ternary-64-q8small": "q8 base + ternary-64 τ, q8 τ for tensors < 4096 el.",
         "ternary-128-q8small": "q8 base + ternary-128 τ, q8 τ for tensors < 4096 el.",
         "ternary-row-q8small": "q8 base + ternary-row τ, q8 τ for tensors < 4096 el.",
         "q2-q8small": "q8 base + q2 τ, q8 τ for tensors < 4096 el.",
         "switch-row-q8small": "q8 base + T-Switch τ (sparse: move bit, sign of movers, f32 per "
                               "row), q8 τ for tensors < 4096 el.",
         "q4base+switch-row-q8small": "q4 base + T-Switch τ, q8 τ for tensors < 4096 el.",
         "q4base+q2-q8small": "q4 base + q2 τ, q8 τ for tensors < 4096 el.",
         "q4base+q3-q8small": "q4 base + q3 τ, q8 τ for tensors < 4096 el.",
         "fit-cols+q2-q8small": "q8 base + q2 τ, per-column scales fitted to layer outputs "
                                "(fitted.py cols)",
         "fit-rows+q2-q8small": "q8 base + q2 τ, per-row scales fitted to layer outputs "
                                "(fitted.py rows)",
         "fit-rows+switch-row-q8small": "q8 base + T-Switch τ, row magnitudes fitted to layer "
                                        "outputs",
         "fit-cols+switch-row-q8small": "q8 base + T-Switch τ, per-column scales fitted",
         "fit-rows+q4base+switch-row-q8small": "q4 base + T-Switch τ, row magnitudes fitted",
         "fit-cols+q4base+switch-row-q8small": "q4 base + T-Switch τ, per-column scales fitted",
         "fit-cols+q4base+q2-q8small": "q4 base + q2 τ, per-column scales fitted",
         "tall": "TALL only (q8 base, q4 δ, masks; no residual)",
         "tall+q3": "TALL (q4 δ, masks) + q3 residual",
         "tall+ternary-64": "TALL (q4 δ, masks) + ternary-64 residual"}


def load(family):
    folder = os.path.join(RESULTS, family)
    rows = {}
    for f in os.listdir(folder):
        if f.endswith(".json"):
            with open(os.path.join(folder, f), encoding="utf-8") as fh:
                r = json.load(fh)
            rows[r["row"]] = r
    return rows


def labels_of(family, tasks):
    root = CACHE if family == "text" else os.path.join(CACHE, "vision")
    out = {}
    for t in tasks:
        with np.load(os.path.join(root, "data", f"{t}.test.npz")) as d:
            out[t] = d["label"]
    return out


def table(family):
    rows = load(family)
    ind = rows["individual"]
    tasks = list(ind["tasks"])
    boot = Bootstrap(labels_of(family, tasks), {t: ind["tasks"][t]["pred"] for t in tasks})
    T = len(tasks)
    head = ["setting", "bits/weight/task", "size vs originals", "mean acc", "normalized",
            "95% CI", "per-task normalized (" + ", ".join(tasks) + ")", "mean rel. error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    summary = {}
    for name in [n for n in ORDER if n in rows] + sorted(set(rows) - set(ORDER)):
        r = rows[name]
        if len(r["tasks"]) != T:
            continue
        acc = {t: r["tasks"][t]["accuracy"] for t in tasks}
        norm = {t: acc[t] / ind["tasks"][t]["accuracy"] for t in tasks}
        ci = boot.row(name, {t: r["tasks"][t]["pred"] for t in tasks})["normalized_mean_ci"]
        per_task = [r["tasks"][t]["bits_per_weight"] for t in tasks]
        shared = 8 * r["shared_delta_bytes"] / r["merged_elements"]
        if name == "individual":
            bits, size = "32 (f32 model)", 1.0
        else:
            bits = f"{np.mean(per_task):.2f}" + (f" + {shared:.1f}/{T} shared" if shared else "")
            size = (r["base_q8_bytes"] + r["shared_delta_bytes"]
                    + sum(r["tasks"][t]["encoded_bytes"] + r["tasks"][t]["mask_bytes"]
                          + r["tasks"][t]["private_bytes"] for t in tasks)) / r["originals_bytes"]
        errs = [r["tasks"][t]["relative_error"] for t in tasks]
        err = "–" if name == "individual" else f"{np.mean(errs):.4f}"
        lines.append(f"| {LABEL.get(name, name)} | {bits} | {size:.3f}x | "
                     f"{np.mean(list(acc.values())):.4f} | {np.mean(list(norm.values())):.4f} | "
                     f"[{ci[0]:.3f}, {ci[1]:.3f}] | "
                     + ", ".join(f"{norm[t]:.3f}" for t in tasks) + f" | {err} |")
        summary[name] = (np.mean(list(norm.values())), size)
    ref = rows.get("identity", ind)
    info = (f"{len(tasks)} tasks; merged tensors: {ref['merged_tensors']}, "
            f"{ref['merged_elements']:,} elements per task; originals "
            f"{ind['originals_bytes'] / 1e6:.1f} MB")
    return "\n".join(lines), info, summary


if __name__ == "__main__":
    for fam in sys.argv[1:] or ["text", "vision"]:
        if not os.path.isdir(os.path.join(RESULTS, fam)):
            continue
        text, info, _ = table(fam)
        print(f"## {fam}\n\n{info}\n\n{text}\n")
