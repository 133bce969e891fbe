//! Soak (ignored by default: it runs for minutes): threads switching among every task of two
//! bundles through the C ABI, under engine caches smaller than their task counts, with every
//! output checked against references computed up front and the RSS watched throughout.
//!
//! Why: a leak or a race in task switching (binding, cache eviction, the tokenizer, the ABI's
//! per-engine strings and per-thread errors) shows only over many switches on several threads,
//! which the default suite is too short to see. docs/SECURITY.md records a run of
//!
//! ```sh
//! TASKPACK_SOAK_SECONDS=180 nice -n 19 cargo test -p taskpack-ffi --test ffi soak -- \
//!     --ignored --nocapture
//! ```
//!
//! Settings (environment): `TASKPACK_SOAK_SECONDS` (default 180), `TASKPACK_SOAK_THREADS`
//! (default 4), `TASKPACK_SOAK_WARMUP` (seconds; default a sixth of the run, at least 10),
//! `TASKPACK_SOAK_RSS_SLACK_MIB` (default 32).
//!
//! 1. The demo family (models/demo, 5 image tasks; TALL masks, f32 delta) and the text family
//!    (models/text, 2 text tasks; TALL, with tokenizer and label names) are compiled into two
//!    bundles.
//! 2. References, on one thread, from engines with the default cache: each demo task on 8 test
//!    images and on 1 (`tp_engine_run_f32`), checked within 1e-4 against plain tract running
//!    the task exported to ONNX; each text task on each golden sentence
//!    (`tp_engine_classify_text`), checked against plain tract running the exported task on the
//!    token ids python `tokenizers` gave (golden.json): the same class, the probability within
//!    1e-5.
//! 3. Fresh engines whose caches hold 2 of the 5 demo tasks and 1 of the 2 text tasks are
//!    shared by the threads; each iteration picks a task of either bundle at random, then one of
//!    its inputs; the output must equal the reference bit for bit.
//! 4. VmRSS (/proc/self/status) is sampled every 250 ms; after the warm-up it may not exceed
//!    its level at the end of the warm-up by more than the slack.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::ptr::null_mut;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use taskpack::TpStatus::*;
use taskpack::*;
use taskpack_core::compile::{compile, CompileOptions};
use taskpack_core::export::export_task;
use taskpack_core::format::Method;
use taskpack_core::runtime::{Bundle, Engine, EngineOptions};
use tract_onnx::prelude::*;

use crate::common::{assert_close, expect, Demo};

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().unwrap_or_else(|e| panic!("{name}={v}: {e}")))
        .unwrap_or(default)
}

fn text_models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/text")
}

/// VmRSS of this process in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The text family (mood, topic) in one bundle with its tokenizer and label names.
fn text_bundle(dir: &Path) -> (PathBuf, Vec<String>) {
    let path = dir.join("text.tpk");
    let names = vec!["mood".to_string(), "topic".to_string()];
    let tasks = names
        .iter()
        .map(|t| (t.clone(), text_models().join(format!("{t}.onnx"))))
        .collect();
    let mut opts = CompileOptions::new(text_models().join("base.onnx"), tasks, Method::Tall, &path);
    opts.tokenizer = Some(std::fs::read(text_models().join("tokenizer.json")).unwrap());
    opts.labels = names
        .iter()
        .map(|t| {
            std::fs::read_to_string(text_models().join(format!("{t}.labels")))
                .unwrap()
                .lines()
                .map(String::from)
                .collect()
        })
        .collect();
    compile(&opts, &mut |_| {}).unwrap();
    (path, names)
}

/// `(text, token ids)` of the golden sentences of `task` (dynamic shapes).
fn golden_ids(task: &str) -> Vec<(String, Vec<i64>)> {
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(text_models().join("golden.json")).unwrap()).unwrap();
    json["dynamic"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["task"] == task)
        .map(|c| {
            let ids = c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect();
            (c["text"].as_str().unwrap().to_string(), ids)
        })
        .collect()
}

/// Class and softmax probability of task `task` exported from `bundle` and run by plain tract
/// on one sentence's token ids (mask all ones, type ids all zeros).
fn exported_prediction(bundle: &Bundle, task: &str, ids: &[i64]) -> (usize, f64) {
    let onnx = export_task(bundle, task).unwrap();
    let mut model = tract_onnx::onnx().model_for_read(&mut &onnx[..]).unwrap();
    let names: Vec<String> = model
        .input_outlets()
        .unwrap()
        .iter()
        .map(|o| model.node(o.node).name.clone())
        .collect();
    let n = ids.len();
    let mut inputs = TVec::new();
    for (i, name) in names.iter().enumerate() {
        let values = match name.as_str() {
            "input_ids" => ids.to_vec(),
            "attention_mask" => vec![1; n],
            "token_type_ids" => vec![0; n],
            other => panic!("{task}: unexpected input {other}"),
        };
        model = model.with_input_fact(i, i64::fact([1, n]).into()).unwrap();
        inputs.push(Tensor::from_shape(&[1, n], &values).unwrap().into());
    }
    let plan = model.into_optimized().unwrap().into_runnable().unwrap();
    let out = plan.run(inputs).unwrap();
    let logits = out[0].to_plain_array_view::<f32>().unwrap();
    let logits = logits.as_slice().unwrap();
    let (class, max) =
        logits.iter().enumerate().fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
        );
    let sum: f64 = logits.iter().map(|&v| f64::from(v - max).exp()).sum();
    (class, 1.0 / sum)
}

/// An engine handle shared by the threads.
struct Shared(*mut TpEngine);

// SAFETY: a TpEngine is Send + Sync (checked in ffi/src/engine.rs): any number of threads may
// call tp_engine_* on it at once. It is freed only after every thread has been joined.
unsafe impl Send for Shared {}
// SAFETY: as above.
unsafe impl Sync for Shared {}

impl Shared {
    fn open(path: &Path, cache_bytes: usize) -> Shared {
        let path = CString::new(path.to_str().unwrap()).unwrap();
        let (mut bundle, mut engine) = (null_mut(), null_mut());
        // SAFETY: a NUL-terminated path, writable out-pointers; our own handles.
        unsafe {
            expect(tp_bundle_open(path.as_ptr(), &mut bundle), TP_OK);
            expect(tp_engine_new(bundle, cache_bytes, &mut engine), TP_OK);
            expect(tp_bundle_free(&mut bundle), TP_OK);
        }
        Shared(engine)
    }

    fn cached_bytes(&self) -> usize {
        let mut bytes = 0;
        // SAFETY: a live engine, a writable size.
        expect(unsafe { tp_engine_cached_bytes(self.0, &mut bytes) }, TP_OK);
        bytes
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // SAFETY: our own handle, no thread uses it any more; freed once and nulled.
        unsafe { tp_engine_free(&mut self.0) };
    }
}

/// One input of a task and what it must give.
enum Job {
    Image {
        task: usize,
        input: Vec<f32>,
        shape: Vec<i64>,
        want: Vec<f32>,
    },
    Text {
        task: usize,
        text: CString,
        /// Class and the probability's bits.
        want: (usize, u32),
    },
}

fn run_image(engine: &Shared, task: usize, input: &[f32], shape: &[i64]) -> (TpStatus, Vec<f32>) {
    let mut out = vec![0f32; 64 * 16];
    let mut out_shape = [0i64; 4];
    let (mut len, mut rank) = (0, 0);
    // SAFETY: a live engine; every buffer valid for its stated length.
    let status = unsafe {
        tp_engine_run_f32(
            engine.0,
            task,
            input.as_ptr(),
            shape.as_ptr(),
            shape.len(),
            out.as_mut_ptr(),
            out.len(),
            &mut len,
            out_shape.as_mut_ptr(),
            out_shape.len(),
            &mut rank,
        )
    };
    out.truncate(len);
    (status, out)
}

fn classify(engine: &Shared, task: usize, text: &CString) -> (TpStatus, usize, f32) {
    let (mut class, mut probability) = (usize::MAX, 0f32);
    // SAFETY: a live engine, a NUL-terminated text, writable out-pointers.
    let status = unsafe {
        tp_engine_classify_text(engine.0, task, text.as_ptr(), &mut class, &mut probability)
    };
    (status, class, probability)
}

/// A small deterministic generator (xorshift64*), one per thread.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
    }
}

struct Soak {
    demo: Shared,
    text: Shared,
    /// The jobs of each task (demo tasks first).
    jobs: Vec<Vec<Job>>,
    stop: AtomicBool,
    iterations: AtomicU64,
    switches: AtomicU64,
    mismatches: AtomicU64,
}

fn worker(soak: &Soak, id: u64) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (id + 1).wrapping_mul(0x0123_4567_89ab_cdef));
    let mut previous = usize::MAX;
    while !soak.stop.load(Ordering::Relaxed) {
        let key = rng.below(soak.jobs.len());
        let tasks = &soak.jobs[key];
        let job = &tasks[rng.below(tasks.len())];
        let same = match job {
            Job::Image {
                task,
                input,
                shape,
                want,
            } => {
                let (status, got) = run_image(&soak.demo, *task, input, shape);
                status == TP_OK
                    && got
                        .iter()
                        .map(|v| v.to_bits())
                        .eq(want.iter().map(|v| v.to_bits()))
            }
            Job::Text { task, text, want } => {
                let (status, class, p) = classify(&soak.text, *task, text);
                status == TP_OK && (class, p.to_bits()) == *want
            }
        };
        if !same {
            eprintln!("thread {id}: task {key} gave another output than its reference");
            soak.mismatches.fetch_add(1, Ordering::Relaxed);
            soak.stop.store(true, Ordering::Relaxed);
        }
        if key != previous {
            soak.switches.fetch_add(1, Ordering::Relaxed);
            previous = key;
        }
        soak.iterations.fetch_add(1, Ordering::Relaxed);
    }
}

/// The largest materialized weight bytes of one task of the bundle at `path`.
fn largest_task_bytes(path: &Path) -> usize {
    let engine = Engine::new(
        Arc::new(Bundle::open(path).unwrap()),
        EngineOptions::default(),
    )
    .unwrap();
    (0..engine.task_count())
        .map(|t| engine.task_weight_bytes(t).unwrap())
        .max()
        .unwrap()
}

#[test]
#[ignore = "a soak of minutes; run it with --ignored (see the module docs)"]
fn soak_threads_switching_tasks_under_small_caches() {
    let seconds = setting("TASKPACK_SOAK_SECONDS", 180);
    let threads = setting("TASKPACK_SOAK_THREADS", 4).max(1);
    let warmup = setting("TASKPACK_SOAK_WARMUP", (seconds / 6).max(10)).min(seconds);
    let slack_mib = setting("TASKPACK_SOAK_RSS_SLACK_MIB", 32);
    let rss_launch = rss_kib();

    let demo = Demo::new();
    let (text_path, text_tasks) = text_bundle(demo.dir.path());
    let text_bundle = Bundle::open(&text_path).unwrap();

    // References, on this thread, from engines with the default cache.
    let mut jobs: Vec<Vec<Job>> = Vec::new();
    {
        let reference = Shared::open(&demo.path, 0);
        for (t, name) in demo.tasks.iter().enumerate() {
            let mut task_jobs = Vec::new();
            for n in [8, 1] {
                let case = demo.case(name, n);
                let (status, want) = run_image(&reference, t, &case.input, &case.input_shape);
                expect(status, TP_OK);
                assert_close(&want, &case.expected, name);
                task_jobs.push(Job::Image {
                    task: t,
                    input: case.input,
                    shape: case.input_shape,
                    want,
                });
            }
            jobs.push(task_jobs);
        }
        let reference = Shared::open(&text_path, 0);
        for (t, name) in text_tasks.iter().enumerate() {
            let mut task_jobs = Vec::new();
            for (text, ids) in golden_ids(name) {
                let text = CString::new(text).unwrap();
                let (status, class, p) = classify(&reference, t, &text);
                expect(status, TP_OK);
                let (want_class, want_p) = exported_prediction(&text_bundle, name, &ids);
                assert_eq!(class, want_class, "{name} {text:?}");
                assert!(
                    (f64::from(p) - want_p).abs() <= 1e-5,
                    "{name} {text:?}: {p} vs {want_p}"
                );
                task_jobs.push(Job::Text {
                    task: t,
                    text,
                    want: (class, p.to_bits()),
                });
            }
            assert!(
                task_jobs.len() >= 5,
                "{name}: {} sentences",
                task_jobs.len()
            );
            jobs.push(task_jobs);
        }
    }

    // Caches smaller than the task counts: 2 of the 5 demo tasks, 1 of the 2 text tasks.
    let demo_cache = 2 * largest_task_bytes(&demo.path);
    let text_cache = largest_task_bytes(&text_path);
    let soak = Arc::new(Soak {
        demo: Shared::open(&demo.path, demo_cache),
        text: Shared::open(&text_path, text_cache),
        jobs,
        stop: AtomicBool::new(false),
        iterations: AtomicU64::new(0),
        switches: AtomicU64::new(0),
        mismatches: AtomicU64::new(0),
    });
    println!(
        "soak: {threads} threads, {seconds} s (warm-up {warmup} s, RSS slack {slack_mib} MiB); \
         {} demo tasks under a cache of {demo_cache} B (2 tasks), {} text tasks under \
         {text_cache} B (1 task)",
        demo.tasks.len(),
        text_tasks.len()
    );

    let rss_start = rss_kib();
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|id| {
            let soak = Arc::clone(&soak);
            std::thread::spawn(move || worker(&soak, id))
        })
        .collect();
    let (mut rss_warm, mut rss_max, mut failure) = (None, 0, None);
    let mut last_report = Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) && !soak.stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        let rss = rss_kib();
        match rss_warm {
            None if started.elapsed() >= Duration::from_secs(warmup) => {
                rss_warm = Some(rss);
                println!(
                    "after the warm-up ({:.0} s): RSS {:.1} MiB, {} iterations",
                    started.elapsed().as_secs_f64(),
                    mib(rss),
                    soak.iterations.load(Ordering::Relaxed)
                );
            }
            None => {}
            Some(warm) => {
                rss_max = rss_max.max(rss);
                if rss > warm + slack_mib * 1024 {
                    failure = Some(format!(
                        "RSS grew from {:.1} MiB after the warm-up to {:.1} MiB",
                        mib(warm),
                        mib(rss)
                    ));
                    soak.stop.store(true, Ordering::Relaxed);
                }
            }
        }
        if last_report.elapsed() >= Duration::from_secs(30) {
            last_report = Instant::now();
            println!(
                "{:>4.0} s: {} iterations, {} switches, RSS {:.1} MiB",
                started.elapsed().as_secs_f64(),
                soak.iterations.load(Ordering::Relaxed),
                soak.switches.load(Ordering::Relaxed),
                mib(rss)
            );
        }
    }
    soak.stop.store(true, Ordering::Relaxed);
    for handle in handles {
        handle.join().unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rss_end = rss_kib();
    let iterations = soak.iterations.load(Ordering::Relaxed);
    println!(
        "soak: {elapsed:.0} s, {threads} threads, {iterations} iterations ({:.0}/s), {} task \
         switches, {} mismatches; cached bytes at the end: demo {} of {demo_cache}, text {} of \
         {text_cache}",
        iterations as f64 / elapsed,
        soak.switches.load(Ordering::Relaxed),
        soak.mismatches.load(Ordering::Relaxed),
        soak.demo.cached_bytes(),
        soak.text.cached_bytes(),
    );
    let warm = rss_warm.unwrap_or(rss_end);
    println!(
        "RSS: launch {:.1} MiB, start {:.1} MiB, after the warm-up {:.1} MiB, max after it \
         {:.1} MiB, end {:.1} MiB",
        mib(rss_launch),
        mib(rss_start),
        mib(warm),
        mib(rss_max.max(rss_end)),
        mib(rss_end)
    );
    assert_eq!(
        soak.mismatches.load(Ordering::Relaxed),
        0,
        "outputs differed"
    );
    assert!(failure.is_none(), "{failure:?}");
    assert!(
        rss_end <= warm + slack_mib * 1024,
        "RSS grew from {:.1} MiB after the warm-up to {:.1} MiB at the end",
        mib(warm),
        mib(rss_end)
    );
    assert!(soak.demo.cached_bytes() <= demo_cache);
    assert!(soak.text.cached_bytes() <= text_cache);
    assert!(iterations > 0 && soak.switches.load(Ordering::Relaxed) > 0);
}
