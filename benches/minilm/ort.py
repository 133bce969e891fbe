"""What a user without taskpack runs: each task's ONNX model in ONNX Runtime, f32 and int8.

For every task model given, and for its `quantize_dynamic` int8 copy (made once, cached next to
the `--out` folder), measured on one thread like `taskpack bench`, each in a fresh child process
so that its peak RSS is its own:

- session: `InferenceSession(...)` creation (parse + optimize + weight prepacking);
- first run: the first `run` on batch 1 after it;
- inference: the median `run` at batch 1 and batch 8 (the rows of the task's test set, 64 tokens);
- peak RSS of that process (`VmHWM`; an idle process with onnxruntime imported is measured
  too, to subtract), and of a process that keeps every task's session of
  that type resident and runs each once (the "N sessions" way to serve N tasks).

    python benches/minilm/ort.py --models DIR --data DIR --tasks rotten tweets ... --out DIR
"""

import argparse
import json
import multiprocessing as mp
import os
import statistics
import time

import numpy as np


def session(path):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def feeds_for(data_dir, task, batch):
    with np.load(os.path.join(data_dir, f"{task}.test.npz")) as z:
        return {k: z[k][:batch] for k in ("input_ids", "attention_mask")}


def peak_rss_mb():
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that over exec, so a
    spawned child would report its parent's peak."""
    with open("/proc/self/status", encoding="ascii") as f:
        line = next(l for l in f if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def median_ms(f, millis):
    times, start = [], time.perf_counter()
    while not times or (time.perf_counter() - start) * 1e3 < millis or len(times) < 5:
        t = time.perf_counter()
        f()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def measure_one(path, data_dir, task, millis, queue):
    t = time.perf_counter()
    s = session(path)
    created = (time.perf_counter() - t) * 1e3
    f1, f8 = feeds_for(data_dir, task, 1), feeds_for(data_dir, task, 8)
    t = time.perf_counter()
    s.run(None, f1)
    first = (time.perf_counter() - t) * 1e3
    b1 = median_ms(lambda: s.run(None, f1), millis)
    b8 = median_ms(lambda: s.run(None, f8), millis)
    rss = peak_rss_mb()
    queue.put({"session_ms": created, "first_run_ms": first, "batch1_ms": b1, "batch8_ms": b8,
               "peak_rss_mb": rss})


def measure_idle(queue):
    import onnxruntime  # noqa: F401  (what every measuring process has loaded)
    queue.put({"peak_rss_mb": peak_rss_mb()})


def measure_resident(paths, data_dir, tasks, queue):
    sessions = [session(p) for p in paths]
    for s, task in zip(sessions, tasks):
        s.run(None, feeds_for(data_dir, task, 1))
    queue.put({"peak_rss_mb": peak_rss_mb()})


def in_child(target, *args):
    queue = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=target, args=(*args, queue))
    p.start()
    out = queue.get()
    p.join()
    return out


def int8_copy(path, out_dir):
    from onnxruntime.quantization import QuantType, quantize_dynamic
    q = os.path.join(out_dir, os.path.basename(path).replace(".onnx", ".int8.onnx"))
    if not os.path.exists(q) or os.path.getmtime(q) < os.path.getmtime(path):
        quantize_dynamic(path, q + ".tmp.onnx", weight_type=QuantType.QInt8)
        os.replace(q + ".tmp.onnx", q)
    return q


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", required=True, help="folder with TASK.onnx")
    ap.add_argument("--data", required=True, help="folder with TASK.test.npz")
    ap.add_argument("--tasks", nargs="+", required=True)
    ap.add_argument("--out", required=True, help="folder for the int8 copies and ort.json")
    ap.add_argument("--millis", type=float, default=1000, help="time per inference median")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    import onnxruntime
    results = {"onnxruntime": onnxruntime.__version__, "tasks": {}, "resident": {}}
    paths = {"f32": [os.path.join(a.models, f"{t}.onnx") for t in a.tasks]}
    paths["int8"] = [int8_copy(p, a.out) for p in paths["f32"]]
    idle = in_child(measure_idle)["peak_rss_mb"]
    results["idle_rss_mb"] = idle
    print(f"ONNX Runtime {onnxruntime.__version__}, 1 thread, 64 tokens; a Python process with "
          f"onnxruntime imported and nothing loaded peaks at {idle:.0f} MB RSS")
    print(f"{'task':<12} {'type':<5} {'MB':>6} {'session ms':>11} {'first run ms':>13} "
          f"{'batch 1 ms':>11} {'batch 8 ms':>11} {'peak RSS MB':>12}")
    for kind, files in paths.items():
        for task, path in zip(a.tasks, files):
            r = in_child(measure_one, path, a.data, task, a.millis)
            r["file_mb"] = os.path.getsize(path) / 1e6
            results["tasks"].setdefault(task, {})[kind] = r
            print(f"{task:<12} {kind:<5} {r['file_mb']:>6.1f} {r['session_ms']:>11.0f} "
                  f"{r['first_run_ms']:>13.1f} {r['batch1_ms']:>11.2f} {r['batch8_ms']:>11.2f} "
                  f"{r['peak_rss_mb']:>12.0f}", flush=True)
        r = in_child(measure_resident, files, a.data, a.tasks)
        results["resident"][kind] = r
        print(f"all {len(files)} {kind} sessions resident, each run once: peak RSS "
              f"{r['peak_rss_mb']:.0f} MB", flush=True)
    with open(os.path.join(a.out, "ort.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
