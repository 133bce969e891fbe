//! Criterion benchmarks of the runtime on the demo bundle (`cargo bench --bench runtime`):
//! task switching (cold: materialize + bind; warm: cached) against what a user does without
//! taskpack (tract loading and optimizing the task's own ONNX model) and against a plain copy of
//! the same bytes, and inference through the engine against tract.
//!
//! `taskpack bench BUNDLE` prints the same comparisons as one table; docs/PERFORMANCE.md has the
//! numbers.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use taskpack::compile::{compile, CompileOptions};
use taskpack::format::Encoding;
use taskpack::format::Method;
use taskpack::runtime::{Bundle, Engine, EngineOptions};
use tract_onnx::prelude::*;

/// The task benchmarked (the demo's tasks all have the same size but for the head).
const TASK: &str = "mnist";

/// Compiles the demo models (TALL masks) into a temporary bundle and reads it into memory.
fn demo_bundle() -> Arc<Bundle> {
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/demo");
    let tasks: Vec<(String, std::path::PathBuf)> =
        ["digits", "fashion3", "footwear", "mnist", "parity"]
            .iter()
            .map(|t| (t.to_string(), demo.join(format!("{t}.onnx"))))
            .collect();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let out = dir.path().join("demo.tpk");
    let opts = CompileOptions {
        delta_dtype: Encoding::F32,
        ..CompileOptions::new(demo.join("base.onnx"), tasks, Method::Tall, &out)
    };
    drop(compile(&opts, &mut |_| {}).expect("the demo models compile"));
    Arc::new(Bundle::read(&out).expect("the demo bundle reads back"))
}

fn input(batch: usize) -> Tensor {
    let values: Vec<f32> = (0..batch * 28 * 28)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
        .collect();
    Tensor::from_shape(&[batch, 1, 28, 28], &values).expect("a valid input")
}

fn benches(c: &mut Criterion) {
    let bundle = demo_bundle();
    let engine = Engine::new(Arc::clone(&bundle), EngineOptions::default()).expect("an engine");
    let task = engine.task_index(TASK).expect("the task exists");
    let onnx = taskpack::export::export_task(&bundle, TASK).expect("export");
    let load = || {
        tract_onnx::onnx()
            .model_for_read(&mut &onnx[..])
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .expect("tract loads the exported model")
    };
    engine.prepare(task).expect("bind");
    let bytes = engine.task_weight_bytes(task).expect("size");

    let mut g = c.benchmark_group("switch");
    g.bench_function("template (parse + optimize, once per graph)", |b| {
        b.iter(|| {
            let fresh = Engine::new(Arc::clone(&bundle), EngineOptions::default()).expect("engine");
            black_box(fresh.input_facts(task).expect("template"))
        })
    });
    g.bench_function("cold (materialize + bind)", |b| {
        b.iter(|| black_box(engine.bind(task).expect("bind")))
    });
    g.bench_function("baseline: tract load + optimize the task's ONNX", |b| {
        b.iter(|| black_box(load()))
    });
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    g.bench_function("memcpy of the bound weight bytes", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(&mut dst);
        })
    });
    g.bench_function("warm (cached)", |b| {
        b.iter(|| engine.prepare(black_box(task)).expect("cached"))
    });
    g.finish();

    let plain = load();
    let mut g = c.benchmark_group("inference");
    for batch in [1usize, 32] {
        let x = input(batch);
        g.bench_function(format!("engine, batch {batch}"), |b| {
            b.iter(|| black_box(engine.run(task, tvec!(x.clone().into())).expect("run")))
        });
        g.bench_function(format!("tract, batch {batch}"), |b| {
            b.iter(|| black_box(plain.run(tvec!(x.clone().into())).expect("run")))
        });
    }
    g.finish();
}

/// Decode speed of every storage encoding: 2^20 values (random task-vector-like data, encoded
/// by the compiler's encoder) decoded chunk by chunk as a switch does (1,024 values at a time,
/// into a buffer that stays in cache). docs/PERFORMANCE.md quotes the per-value times.
fn decode(c: &mut Criterion) {
    use taskpack::format::Encoding;
    const N: usize = 1 << 20;
    const CHUNK: usize = 1024;
    let x: Vec<f32> = (0..N)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-4)
        .collect();
    let mut g = c.benchmark_group("decode 2^20 values");
    g.throughput(criterion::Throughput::Elements(N as u64));
    for e in Encoding::ALL {
        let mut bytes = Vec::new();
        e.encode(&x, &mut bytes);
        let (block, block_bytes) = e.block();
        let chunk_bytes = (CHUNK as u64 / block * block_bytes) as usize;
        let mut out = vec![0f32; CHUNK];
        g.bench_function(e.name(), |b| {
            b.iter(|| {
                for chunk in bytes.chunks(chunk_bytes) {
                    taskpack::internals::decode_slice(e, chunk, &mut out);
                    black_box(&out);
                }
            })
        });
    }
    g.finish();
}

criterion_group!(runtime, benches, decode);
criterion_main!(runtime);
