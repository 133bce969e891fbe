#!/usr/bin/env python3
"""Check models/demo against its golden outputs (needs only numpy, onnx, onnxruntime, safetensors).

For every model in manifest.json: re-run onnxruntime on <name>.test.npz and assert the logits
match the stored golden ones to 1e-5; check the graph (ops, BN nodes, initializer names identical
across models, nothing external, no num_batches_tracked), the safetensors copies, and the sha256s.
Prints the accuracies. Usage: python check_golden.py [DIR]   (default: <repo>/models/demo)
"""
import hashlib
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper
from safetensors.numpy import load_file

TOL = 1e-5


def main():
    d = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else
                        os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "demo"))
    man = json.load(open(os.path.join(d, "manifest.json")))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    ref_names = None
    print(f"{'model':10s} {'C':>2s} {'n':>4s} {'acc(256)':>8s} {'acc(full,manifest)':>18s} {'max|dlogit|':>11s}")
    for e in man["models"]:
        name = e["name"]
        for fname, digest in e["sha256"].items():
            got = hashlib.sha256(open(os.path.join(d, fname), "rb").read()).hexdigest()
            assert got == digest, f"{fname}: sha256 mismatch"
        path = os.path.join(d, e["onnx"])
        m = onnx.load(path, load_external_data=False)
        onnx.checker.check_model(m, full_check=True)
        g = m.graph
        assert [n.op_type for n in g.node] == man["ops"], [n.op_type for n in g.node]
        assert [i.name for i in g.input] == ["image"] and [o.name for o in g.output] == ["logits"]
        assert g.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
        assert g.output[0].type.tensor_type.shape.dim[0].dim_param == "N"
        inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
        assert all(i.data_location == onnx.TensorProto.DEFAULT and not i.external_data for i in g.initializer)
        assert all(a.dtype == np.float32 for a in inits.values())
        assert not any("num_batches_tracked" in k for k in inits)
        assert [[k, list(v.shape)] for k, v in inits.items()] == [[i["name"], i["shape"]] for i in e["initializers"]]
        for n in g.node:
            if n.op_type == "BatchNormalization":
                assert n.input[3].endswith("running_mean") and n.input[4].endswith("running_var")
                assert all(x in inits for x in n.input[1:])
        if ref_names is None:
            ref_names = list(inits)
        assert list(inits) == ref_names, "initializer names differ across models"
        assert inits["head.weight"].shape == (e["num_classes"], 32)
        if "safetensors" in e:
            st = load_file(os.path.join(d, e["safetensors"]))
            assert sorted(st) == sorted(inits)
            for k in inits:
                assert st[k].dtype == np.float32 and np.array_equal(st[k], inits[k]), k

        z = np.load(os.path.join(d, e["test_npz"]))
        x, y, gold = z["image"], z["label"], z["logits"]
        assert x.dtype == np.float32 and x.shape == (e["saved_test_size"], 1, 28, 28)
        assert 0.0 <= x.min() and x.max() <= 1.0
        assert y.dtype == np.int64 and y.shape == (len(x),)
        assert gold.dtype == np.float32 and gold.shape == (len(x), e["num_classes"])
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        logits = sess.run(["logits"], {"image": x})[0]
        diff = float(np.abs(logits - gold).max())
        assert diff <= TOL, f"{name}: logits differ from golden by {diff}"
        acc = float((logits.argmax(1) == y).mean())
        assert abs(acc - e["test_accuracy_saved"]) < 1e-3
        print(f"{name:10s} {e['num_classes']:2d} {len(x):4d} {acc:8.4f} {e['test_accuracy_full']:18.4f} {diff:11.1e}")
    print(f"OK: {len(man['models'])} models match their golden logits (tol {TOL})")


if __name__ == "__main__":
    main()
