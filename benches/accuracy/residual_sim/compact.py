#!/usr/bin/env python3
"""Accuracy of per-task low-bit task vectors on the real fine-tuned checkpoints.

For each task t: θ̂_t = deq(Q8(θ_0)) + [m_t ⊙ δ̂] + deq(E(θ_t − deq(Q8(θ_0)) − [m_t ⊙ δ̂]))
over the *merged* tensors (float initializers in base and task with equal shape, not `head.*`,
not BatchNorm running mean / var); private tensors stay the task's. The bracket is only in the `tall+E`
rows (δ̂ = q4(Σ_t τ_t), TALL masks λ = 0.4, τ_t taken from the q8-rounded base as taskpack does).
The modified task model is run with onnxruntime on the task's test set exactly as
benches/accuracy/evaluate.py's `onnxruntime_predictions` does (batches of 250, argmax of the
first output).

    python compact.py FAMILY ROW [ROW ...]      (FAMILY: text | vision; ROW: individual,
                                                 a name of lowbit.ENCODINGS, tall+NAME, tall)
Results go to results/FAMILY/ROW.json (per-task accuracy, relative error, bytes).
"""

import json
import os
import re
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from data import TASKS as TEXT_TASKS  # noqa: E402
from lowbit import ENCODINGS, q4, q8  # noqa: E402

CACHE = os.path.expanduser("~/.cache/taskpack/accuracy")
HERE = os.path.dirname(os.path.abspath(__file__))
# Results live in the cache, next to the benchmark's own (not in the repository).
RESULTS = os.path.join(os.path.expanduser(os.environ.get("TASKPACK_CACHE", "~/.cache/taskpack")), "accuracy", "residual_sim")
HEAD = re.compile(r"^head\.")  # finetune.HEAD_PATTERN
THREADS = int(os.environ.get("THREADS", "2"))
LAMBDA = 0.4


def family_paths(family):
    root = CACHE if family == "text" else os.path.join(CACHE, "vision")
    if family == "text":
        tasks = list(TEXT_TASKS)
    else:
        with open(os.path.join(root, "data", "summary.json"), encoding="utf-8") as f:
            tasks = list(json.load(f)["tasks"])
    return root, tasks


def float_inits(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
            if i.data_type == TensorProto.FLOAT}


def predict(model_bytes, test_path):
    """evaluate.py's onnxruntime_predictions, on an in-memory model."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    sess = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    with np.load(test_path) as d:
        arrays = {n: d[n] for n in names}
        labels = d["label"]
    pred = []
    rows = len(next(iter(arrays.values())))
    for i in range(0, rows, 250):
        feed = {n: v[i:i + 250] for n, v in arrays.items()}
        pred += [int(p) for p in np.asarray(sess.run(None, feed)[0]).argmax(1)]
    return pred, float(np.mean(np.array(pred) == labels))


def with_weights(model, new):
    """The serialized `model` with the initializers named in `new` replaced (float32)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for init in m.graph.initializer:
        if init.name in new:
            init.CopyFrom(numpy_helper.from_array(new[init.name].astype(np.float32), init.name))
    return m.SerializeToString()


def tall_parts(base_q, tasks_w, merged):
    """Per tensor: δ̂ = q4(Σ τ_t) and per task the mask m_t = |τ_t| > λ |Σ τ − τ_t|
    (τ_t = θ_t − deq(Q8 θ_0)); returns {name: (δ̂, {task: mask})} and the bytes of δ̂."""
    parts, delta_bytes = {}, 0
    for name in merged:
        taus = {t: w[name].astype(np.float32).reshape(-1) - base_q[name] for t, w in tasks_w.items()}
        mtl = np.sum([taus[t] for t in taus], axis=0, dtype=np.float32)
        dq, b = q4(mtl)
        delta_bytes += b
        masks = {t: np.abs(tau) > LAMBDA * np.abs(mtl - tau) for t, tau in taus.items()}
        parts[name] = (dq, masks)
    return parts, delta_bytes


def run_row(family, row):
    root, tasks = family_paths(family)
    models = os.path.join(root, "models")
    data = os.path.join(root, "data")
    out_dir = os.path.join(RESULTS, family)
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, f"{row}.json")

    base_model = onnx.load(os.path.join(models, "base.onnx"))
    base = float_inits(base_model)
    # BatchNorm running mean / variance stay private, as taskpack does (decide_private,
    # PrivateReason::NormStatistics): quantizing their task vectors breaks the network.
    bn_stats = {i for node in base_model.graph.node if node.op_type == "BatchNormalization"
                for i in node.input[3:5]}
    task_models = {t: onnx.load(os.path.join(models, f"{t}.onnx")) for t in tasks}
    task_w = {t: float_inits(m) for t, m in task_models.items()}
    # Merged: in base and in every task with equal shape (same set for all tasks here), not a
    # head, not BatchNorm statistics.
    merged = [n for n, v in base.items() if not HEAD.search(n) and n not in bn_stats
              and all(n in w and w[n].shape == v.shape for w in task_w.values())]
    merged_elems = sum(base[n].size for n in merged)
    # `q4base+ROW`: ROW over a q4 base (blocks of 32, 20 bytes) instead of q8.
    base_q4 = row.startswith("q4base+")
    inner = row.split("+", 1)[1] if base_q4 else row
    if base_q4:
        base_q = {n: q4(base[n].astype(np.float32).reshape(-1))[0] for n in merged}
        base_bytes = sum(-(-base[n].size // 32) * 20 for n in merged)
    else:
        base_q = {n: q8(base[n].astype(np.float32).reshape(-1))[0] for n in merged}
        base_bytes = sum(-(-base[n].size // 64) * 68 for n in merged)

    enc_name = inner.split("+", 1)[1] if inner.startswith("tall") and "+" in inner else inner
    tall = inner.startswith("tall")
    shared_bytes = 0
    if tall:
        parts, delta_bytes = tall_parts(base_q, task_w, merged)
        shared_bytes = delta_bytes
    result = {"row": row, "family": family, "tasks": {}, "merged_tensors": len(merged),
              "merged_elements": int(merged_elems), "base_q8_bytes": int(base_bytes),
              "shared_delta_bytes": int(shared_bytes),
              "originals_bytes": sum(os.path.getsize(os.path.join(models, f"{t}.onnx"))
                                     for t in tasks)}
    for t in tasks:
        started = time.perf_counter()
        model, w = task_models[t], task_w[t]
        private_elems = sum(v.size for n, v in w.items() if n not in merged)
        enc_bytes, mask_bytes, err2, tau2 = 0, 0, 0.0, 0.0
        new = {}
        if row != "individual":
            for n in merged:
                theta = w[n].astype(np.float32).reshape(-1)
                ref = base_q[n].copy()
                if tall:
                    dq, masks = parts[n]
                    ref = ref + np.where(masks[t], dq, np.float32(0))
                    mask_bytes += -(-theta.size // 8)
                if enc_name in ENCODINGS:
                    dec, b = ENCODINGS[enc_name](theta - ref, w[n].shape)
                    enc_bytes += b
                    hat = ref + dec
                else:  # plain TALL reconstruction, no residual
                    hat = ref
                new[n] = hat.reshape(w[n].shape)
                d = hat.astype(np.float64) - theta
                err2 += float(d @ d)
                tau = theta.astype(np.float64) - base[n].reshape(-1)
                tau2 += float(tau @ tau)
            model_bytes = with_weights(model, new)
        else:
            model_bytes = model.SerializeToString()
        built = time.perf_counter() - started
        pred, acc = predict(model_bytes, os.path.join(data, f"{t}.test.npz"))
        result["tasks"][t] = {
            "accuracy": acc, "pred": pred,
            "relative_error": (err2 / tau2) ** 0.5 if tau2 else None,
            "encoded_bytes": int(enc_bytes), "mask_bytes": int(mask_bytes),
            "private_bytes": int(4 * private_elems),
            "bits_per_weight": 8 * (enc_bytes + mask_bytes) / merged_elems,
            "seconds": round(time.perf_counter() - started, 1), "build_seconds": round(built, 1)}
        print(f"{family} {row:<18} {t:<11} acc {acc:.4f}  rel.err "
              f"{result['tasks'][t]['relative_error'] or 0:.4f}  "
              f"{result['tasks'][t]['bits_per_weight']:.3f} b/w  "
              f"({result['tasks'][t]['seconds']} s)", flush=True)
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result, f)
    os.replace(out + ".tmp", out)


if __name__ == "__main__":
    fam = sys.argv[1]
    for r in sys.argv[2:]:
        if os.path.exists(os.path.join(RESULTS, fam, f"{r}.json")) and not os.environ.get("FORCE"):
            print(f"{fam} {r}: cached")
            continue
        run_row(fam, r)
