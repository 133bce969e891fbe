#!/usr/bin/env python3
"""Activation-fitted scales (ScaLearn-style) on top of low-bit task vectors: do they recover
accuracy? Fits the weights of `MatMul(activation, W)` (text) and of pointwise (1x1, one
group) convolutions (images: per output channel, G over pixels); FAMILY=vision in the
environment for the image family.

For each task t and each merged weight W (shape [in, out]) that a MatMul multiplies: the code
C = E(τ) of compact.py (τ = θ_t − deq(Q(θ_0))), the original task model's input activations X
of that MatMul on the task's *unlabeled* calibration inputs (benches/accuracy's TASK.calib.npz,
padding rows dropped), G = XᵀX, and per-row scales fitted by least squares to the layer output
X·τ — no labels:
    cols  Ĉ = C·diag(s), per output feature j: s_j = (c_jᵀ G τ_j) / (c_jᵀ G c_j)
    rows  Ĉ = diag(s)·C, per input row k (the axis of T-Switch's per-row magnitude):
          (G ∘ C Cᵀ) s = diag(G τ Cᵀ), solved with a 1e-6 · mean-diagonal ridge
Other merged tensors (embeddings, LayerNorm, biases) keep C. Then the modified model runs on the
test set as compact.py does.

    python fitted.py MODE ROW [ROW ...]     (MODE: cols | rows; ROW: a compact.py row without
                                             `tall`, e.g. q2-q8small, q4base+switch-row-q8small)
Results: results/FAMILY/fit-MODE+ROW.json (report.py's schema).
"""

import json
import os
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compact import (HEAD, RESULTS, THREADS, family_paths, float_inits, predict,  # noqa: E402
                     with_weights)
from lowbit import ENCODINGS, q4, q8  # noqa: E402


def grams(model, names, calib_path):
    """G = XᵀX (float64) of each named activation over the calibration set, padding dropped."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for n in names:
        m.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    sess = ort.InferenceSession(m.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])
    inputs = [i.name for i in sess.get_inputs()]
    with np.load(calib_path) as d:
        arrays = {n: d[n] for n in inputs}
    keep_all = arrays["attention_mask"].astype(bool) if "attention_mask" in arrays else None
    g = {}
    rows = len(next(iter(arrays.values())))
    for i in range(0, rows, 32):
        feed = {n: v[i:i + 32] for n, v in arrays.items()}
        outs = sess.run(names, feed)
        for n, x in zip(names, outs):
            if x.ndim == 4:  # NCHW, a 1x1 convolution's input: one row per pixel
                x = x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])
            else:
                x = x.reshape(-1, x.shape[-1])
                if keep_all is not None:
                    x = x[keep_all[i:i + 32].reshape(-1)]
            x = x.astype(np.float64)
            g[n] = g.get(n, 0) + x.T @ x
    return g


def fit(mode, tau, code, g):
    """The fitted code (f32), tau and code of shape [in, out]."""
    t, c = tau.astype(np.float64), code.astype(np.float64)
    if mode == "cols":
        gc = g @ c
        num = np.einsum("ij,ij->j", t, gc)
        den = np.einsum("ij,ij->j", c, gc)
        s = np.where(den > 0, num / np.where(den > 0, den, 1), 1.0)
        return (c * s[None, :]).astype(np.float32), s
    a = g * (c @ c.T)
    b = np.einsum("kj,kj->k", g @ t, c)
    a[np.diag_indices_from(a)] += 1e-6 * np.mean(np.diag(a)) + 1e-30
    s = np.linalg.solve(a, b)
    return (c * s[:, None]).astype(np.float32), s


def run(mode, row, family="text"):
    root, tasks = family_paths(family)
    models, data = os.path.join(root, "models"), os.path.join(root, "data")
    out = os.path.join(RESULTS, family, f"fit-{mode}+{row}.json")
    base_model = onnx.load(os.path.join(models, "base.onnx"))
    base = float_inits(base_model)
    task_models = {t: onnx.load(os.path.join(models, f"{t}.onnx")) for t in tasks}
    task_w = {t: float_inits(m) for t, m in task_models.items()}
    bn_stats = {i for node in base_model.graph.node if node.op_type == "BatchNormalization"
                for i in node.input[3:5]}
    merged = [n for n, v in base.items() if not HEAD.search(n) and n not in bn_stats
              and all(n in w and w[n].shape == v.shape for w in task_w.values())]
    base_q4 = row.startswith("q4base+")
    enc = ENCODINGS[row.split("+", 1)[1] if base_q4 else row]
    quant = q4 if base_q4 else q8
    base_q = {n: quant(base[n].astype(np.float32).reshape(-1))[0] for n in merged}
    base_bytes = sum(-(-base[n].size // (32 if base_q4 else 64)) * (20 if base_q4 else 68)
                     for n in merged)
    result = {"row": f"fit-{mode}+{row}", "family": family, "tasks": {},
              "merged_tensors": len(merged),
              "merged_elements": int(sum(base[n].size for n in merged)),
              "base_q8_bytes": int(base_bytes), "shared_delta_bytes": 0,
              "originals_bytes": sum(os.path.getsize(os.path.join(models, f"{t}.onnx"))
                                     for t in tasks)}
    for t in tasks:
        started = time.perf_counter()
        model, w = task_models[t], task_w[t]
        # The weights a MatMul multiplies, and the activation it multiplies them by.
        act = {node.input[1]: node.input[0] for node in model.graph.node
               if node.op_type == "MatMul" and node.input[1] in merged}
        # 1x1 convolutions (group 1): W [O, C, 1, 1] is a matrix on the input channels; its
        # rows (output channels) are what `cols` fits (the code is fitted as W's transpose).
        convs = {node.input[1]: node.input[0] for node in model.graph.node
                 if node.op_type == "Conv" and node.input[1] in merged
                 and list(w[node.input[1]].shape[2:]) == [1, 1]
                 and all(a.i == 1 for a in node.attribute if a.name == "group")}
        act.update(convs)
        g = grams(model, sorted(set(act.values())), os.path.join(data, f"{t}.calib.npz"))
        new, enc_bytes, err2, tau2, scales = {}, 0, 0.0, 0.0, []
        for n in merged:
            theta = w[n].astype(np.float32).reshape(-1)
            tau = theta - base_q[n]
            dec, b = enc(tau, w[n].shape)
            enc_bytes += b
            if n in convs:
                # Per output channel = per column of the transposed [C, O] matrix.
                o = w[n].shape[0]
                dec2, s = fit("cols", tau.reshape(o, -1).T, dec.reshape(o, -1).T, g[act[n]])
                dec = dec2.T.reshape(-1)
                scales.append(s)
            elif n in act:
                dec2, s = fit(mode, tau.reshape(w[n].shape), dec.reshape(w[n].shape), g[act[n]])
                dec = dec2.reshape(-1)
                enc_bytes += 4 * len(s) if mode == "cols" else 0  # rows: folded into the code
                scales.append(s)
            hat = base_q[n] + dec
            new[n] = hat.reshape(w[n].shape)
            d = hat.astype(np.float64) - theta
            err2 += float(d @ d)
            tt = theta.astype(np.float64) - base[n].reshape(-1)
            tau2 += float(tt @ tt)
        pred, acc = predict(with_weights(model, new), os.path.join(data, f"{t}.test.npz"))
        private_elems = sum(v.size for n, v in w.items() if n not in merged)
        allscales = np.concatenate(scales)
        result["tasks"][t] = {
            "accuracy": acc, "pred": pred, "relative_error": (err2 / tau2) ** 0.5,
            "encoded_bytes": int(enc_bytes), "mask_bytes": 0, "private_bytes": int(4 * private_elems),
            "bits_per_weight": 8 * enc_bytes / result["merged_elements"],
            "scale_quantiles": [float(q) for q in np.quantile(allscales, [0.05, 0.5, 0.95])],
            "seconds": round(time.perf_counter() - started, 1)}
        print(f"fit-{mode} {row:<28} {t:<11} acc {acc:.4f}  rel.err "
              f"{result['tasks'][t]['relative_error']:.4f}  scales 5/50/95% "
              f"{np.round(result['tasks'][t]['scale_quantiles'], 3)}  "
              f"({result['tasks'][t]['seconds']} s)", flush=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result, f)
    os.replace(out + ".tmp", out)


if __name__ == "__main__":
    fam = os.environ.get("FAMILY", "text")
    mode = sys.argv[1]
    if mode not in ("cols", "rows"):
        sys.exit("MODE is cols or rows")
    for r in sys.argv[2:]:
        run(mode, r, fam)
