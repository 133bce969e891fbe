//! `taskpack bench`: how fast the runtime switches tasks, side by side with what a user does
//! without taskpack (load the task's own ONNX model with tract and optimize it), with a plain
//! memory copy of the same bytes, and how fast the bound tasks run compared with tract.
//!
//! Every number is the median of repeated measurements in this one process, single-threaded.

mod memory;
mod timing;
mod workload;

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use taskpack::runtime::{Bundle, Engine, EngineOptions};
use tract_onnx::prelude::*;

use memory::{rss_child, rss_of_child};
use timing::{measure, measure_blocks, measure_pair, ms, ratio, us};
use workload::{input_symbols, inputs, symbolic_size, tvalues};

/// Arguments of `taskpack bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The bundle.
    pub bundle: PathBuf,
    /// Only this task (default: every task).
    #[arg(long)]
    pub task: Option<String>,
    /// Sequence length for symbolic input dimensions past the first (token inputs of text
    /// models).
    #[arg(long, default_value_t = 64)]
    pub seq: usize,
    /// Batch size for symbolic input dimensions.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Time budget per measurement, in milliseconds (more repetitions, steadier medians).
    #[arg(long, default_value_t = 300)]
    pub millis: u64,
    /// Skip the peak memory comparison (two child processes).
    #[arg(long)]
    pub no_rss: bool,
    /// Internal: run one peak-memory workload in this process and print its VmHWM: `engine`
    /// (every task in turn, cache of one task) or `tract=PATH` (one ONNX model alone).
    #[arg(long, hide = true)]
    pub rss_child: Option<String>,
}

/// One task's measurements.
struct Row {
    name: String,
    bytes: usize,
    cold: Duration,
    materialize: Duration,
    baseline: Duration,
    memcpy: Duration,
    warm: Duration,
    engine: Duration,
    tract: Duration,
    engine_fixed: Duration,
    tract_fixed: Duration,
}

/// Runs `taskpack bench`: opening, templates, then per task its switches ([`switching`]) and
/// its inference ([`inference`]), the tables, and the peak memory ([`peak_memory`]).
pub fn run(a: &BenchArgs) -> Result<()> {
    if let Some(which) = &a.rss_child {
        return rss_child(a, which);
    }
    let budget = Duration::from_millis(a.millis);
    // Opening: mmap + validation of header, manifest and section table (no checksums, no
    // weights touched), which must not grow with the bundle.
    let open = measure(budget / 4, || {
        black_box(crate::open_bundle(&a.bundle)?);
        Ok(())
    })?;
    let file_bytes = std::fs::metadata(&a.bundle)?.len();
    let bundle = Arc::new(crate::open_bundle(&a.bundle)?);
    bundle.verify()?;
    let n = bundle.manifest().tasks.len();
    let tasks: Vec<usize> = match &a.task {
        Some(name) => vec![bundle.task_index(name)?],
        None => (0..n).collect(),
    };
    println!(
        "{}: {} tasks, {} graphs; batch {} (sequence {} where a later dimension is symbolic), \
         single thread, {} matrix products, medians over ≥ {} ms per measurement",
        a.bundle.display(),
        n,
        bundle.manifest().graphs.len(),
        a.batch,
        a.seq,
        taskpack::runtime::compute(),
        a.millis
    );
    println!(
        "open (Bundle::open: mmap + validation, no checksums): {:.1} µs for {} bytes",
        us(open),
        file_bytes
    );

    // Templates: parse + declutter + optimize, once per graph (fresh engines, first use).
    let mut template_times = Vec::new();
    for &task in &tasks {
        let t = measure(budget / 4, || {
            let fresh = Engine::new(Arc::clone(&bundle), EngineOptions::default())?;
            fresh.input_facts(task)?;
            Ok(())
        })?;
        template_times.push(t);
    }

    let engine = Engine::new(
        Arc::clone(&bundle),
        EngineOptions::with_cache_bytes(usize::MAX),
    )?;
    let mut rows = Vec::new();
    for &task in &tasks {
        rows.push(measure_task(a, &bundle, &engine, task, budget)?);
    }
    print_switching(&rows, &template_times);
    print_inference(&rows, a.batch);
    print_summary(&rows);
    if !a.no_rss {
        peak_memory(a, &bundle, &engine, &tasks)?;
    }
    println!(
        "  open: {:.1} µs (bundle of {} bytes)",
        us(open),
        file_bytes
    );
    let stats = engine.stats();
    println!(
        "  work done by the engine: {} templates built for {} graphs, {} binds, {} cache hits",
        stats.templates_built,
        bundle.manifest().graphs.len(),
        stats.binds,
        stats.cache_hits
    );
    Ok(())
}

/// Every measurement of one task: its switches, then its inference.
fn measure_task(
    a: &BenchArgs,
    bundle: &Arc<Bundle>,
    engine: &Engine,
    task: usize,
    budget: Duration,
) -> Result<Row> {
    let name = engine
        .task_name(task)
        .context("task index out of range")?
        .to_string();
    let onnx = taskpack::export::export_task(bundle, &name)?;
    let (bytes, [cold, materialize, baseline, memcpy, warm]) =
        switching(engine, task, &onnx, budget)?;
    let [engine_run, tract, engine_fixed, tract_fixed] =
        inference(a, bundle, engine, task, &name, &onnx, budget)?;
    Ok(Row {
        name,
        bytes,
        cold,
        materialize,
        baseline,
        memcpy,
        warm,
        engine: engine_run,
        tract,
        engine_fixed,
        tract_fixed,
    })
}

/// The task's own ONNX model, loaded and optimized by tract (from memory: no file read, which a
/// user loading the file would pay on top).
fn load(onnx: &[u8]) -> Result<Arc<TypedRunnableModel>> {
    tract_onnx::onnx()
        .model_for_read(&mut &onnx[..])?
        .into_optimized()?
        .into_runnable()
}

/// Switching: the bytes a switch materializes, and the medians of the cold switch, of its
/// materialization, of the baseline (tract loading the task's ONNX), of a memcpy of as many
/// bytes, and of the warm switch.
///
/// Cold switch: materialize + bind into the warm template, bypassing the cache. Memcpy: a plain
/// copy between two buffers already mapped. The three in rounds of blocks
/// ([`measure_blocks`]), so that their ratios are side by side.
fn switching(
    engine: &Engine,
    task: usize,
    onnx: &[u8],
    budget: Duration,
) -> Result<(usize, [Duration; 5])> {
    let bytes = engine.task_weight_bytes(task)?;
    let src = vec![1u8; bytes.max(1)];
    let mut dst = vec![0u8; bytes.max(1)];
    let mut materialize = Vec::new();
    let mut cold = || -> Result<()> {
        let bound = engine.bind(task)?;
        materialize.push(bound.timings().0);
        black_box(bound);
        Ok(())
    };
    let mut baseline = || load(onnx).map(black_box).map(drop);
    let mut memcpy = || -> Result<()> {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
        Ok(())
    };
    let times = measure_blocks(
        3,
        &mut [
            (budget, &mut cold),
            (budget, &mut baseline),
            (budget / 4, &mut memcpy),
        ],
    )?;
    let [cold, baseline, memcpy] = times[..] else {
        bail!("expected three timings");
    };
    materialize.sort_unstable();
    let materialize = materialize
        .get(materialize.len() / 2)
        .copied()
        .unwrap_or_default();

    // Warm switch: the task is cached, switching is a lookup.
    engine.prepare(task)?;
    let warm = measure(budget / 4, || {
        engine.prepare(black_box(task)).map_err(Into::into)
    })?;
    Ok((bytes, [cold, materialize, baseline, memcpy, warm]))
}

/// Inference: the engine vs tract on the same reconstructed weights, with the batch symbolic (as
/// the ONNX declares it) and fixed (symbols set to the batch before optimizing, in tract and in
/// the engine alike). Medians of engine and tract, symbolic then fixed. Fails if the engine's
/// outputs are not tract's: the comparison would mean nothing.
fn inference(
    a: &BenchArgs,
    bundle: &Arc<Bundle>,
    engine: &Engine,
    task: usize,
    name: &str,
    onnx: &[u8],
    budget: Duration,
) -> Result<[Duration; 4]> {
    let data = inputs(&engine.input_facts(task)?, a.batch, a.seq)?;
    let plain = load(onnx)?;
    let (engine_run, tract) = measure_pair(
        budget,
        || {
            black_box(engine.run(task, tvalues(&data))?);
            Ok(())
        },
        || {
            black_box(plain.run(tvalues(&data))?);
            Ok(())
        },
    )?;
    let mut fixed = tract_onnx::onnx().model_for_read(&mut &onnx[..])?;
    for (i, t) in data.iter().enumerate() {
        fixed = fixed.with_input_fact(i, InferenceFact::dt_shape(t.datum_type(), t.shape()))?;
    }
    let fixed = fixed.into_optimized()?.into_runnable()?;
    let options = input_symbols(onnx)?
        .into_iter()
        .fold(EngineOptions::default(), |o, (s, axis)| {
            o.with_symbol(s, symbolic_size(axis, a.batch, a.seq))
        });
    let fixed_engine = Engine::new(Arc::clone(bundle), options)?;
    fixed_engine.prepare(task)?;
    let (engine_fixed, tract_fixed) = measure_pair(
        budget,
        || {
            black_box(fixed_engine.run(task, tvalues(&data))?);
            Ok(())
        },
        || {
            black_box(fixed.run(tvalues(&data))?);
            Ok(())
        },
    )?;
    let (ours, theirs) = (
        engine.run(task, tvalues(&data))?,
        plain.run(tvalues(&data))?,
    );
    for (x, y) in ours.iter().zip(theirs.iter()) {
        if x.close_enough(y, true).is_err() {
            bail!("task {name}: engine and tract outputs differ");
        }
    }
    Ok([engine_run, tract, engine_fixed, tract_fixed])
}

fn print_switching(rows: &[Row], template_times: &[Duration]) {
    println!();
    println!("switching (ms unless noted)");
    println!(
        "  {:<10}{:>10}{:>10}{:>13}{:>11}{:>10}{:>10}{:>10}{:>12}",
        "task",
        "weights",
        "template",
        "cold switch",
        "(of which",
        "baseline",
        "speedup",
        "memcpy",
        "warm (µs)"
    );
    println!(
        "  {:<10}{:>10}{:>10}{:>13}{:>11}{:>10}{:>10}{:>10}{:>12}",
        "", "bytes", "once", "", "materialize)", "load+opt", "", "", ""
    );
    for (r, template) in rows.iter().zip(template_times) {
        println!(
            "  {:<10}{:>10}{:>10.3}{:>13.3}{:>11.3}{:>10.3}{:>9.1}x{:>10.4}{:>12.2}",
            r.name,
            r.bytes,
            ms(*template),
            ms(r.cold),
            ms(r.materialize),
            ms(r.baseline),
            ratio(r.baseline, r.cold),
            ms(r.memcpy),
            us(r.warm),
        );
    }
}

fn print_inference(rows: &[Row], batch: usize) {
    println!();
    println!(
        "inference (ms per run, batch {batch}; \"symbolic\": the batch stays a symbol as the ONNX \
         declares it, \"fixed\": symbols fixed to the batch before optimizing)"
    );
    println!(
        "  {:<10}{:>10}{:>10}{:>8}{:>10}{:>10}{:>8}",
        "", "engine", "tract", "", "engine", "tract", ""
    );
    println!(
        "  {:<10}{:>10}{:>10}{:>8}{:>10}{:>10}{:>8}",
        "task", "symbolic", "symbolic", "ratio", "fixed", "fixed", "ratio"
    );
    for r in rows {
        println!(
            "  {:<10}{:>10.4}{:>10.4}{:>8.3}{:>10.4}{:>10.4}{:>8.3}",
            r.name,
            ms(r.engine),
            ms(r.tract),
            ratio(r.engine, r.tract),
            ms(r.engine_fixed),
            ms(r.tract_fixed),
            ratio(r.engine_fixed, r.tract_fixed),
        );
    }
}

/// The medians over tasks of the ratios the tables show.
fn print_summary(rows: &[Row]) {
    let median = |f: &dyn Fn(&Row) -> f64| -> f64 {
        let mut v: Vec<f64> = rows.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    println!();
    println!("summary (median over tasks)");
    println!(
        "  cold switch {:.3} ms vs baseline load+optimize {:.3} ms: {:.1}x faster",
        median(&|r| ms(r.cold)),
        median(&|r| ms(r.baseline)),
        median(&|r| ratio(r.baseline, r.cold)),
    );
    println!(
        "  cold switch vs memcpy of the same bytes: {:.1}x the copy time",
        median(&|r| ratio(r.cold, r.memcpy)),
    );
    println!("  warm switch (cached): {:.2} µs", median(&|r| us(r.warm)));
    println!(
        "  inference engine / tract: {:.3} with a symbolic batch, {:.3} with a fixed batch",
        median(&|r| ratio(r.engine, r.tract)),
        median(&|r| ratio(r.engine_fixed, r.tract_fixed)),
    );
    println!(
        "  fixing the batch: {:.2}x faster inference (engine symbolic / engine fixed)",
        median(&|r| ratio(r.engine, r.engine_fixed)),
    );
}

/// Peak memory: each workload in a fresh child process, VmHWM at its end: the engine running
/// every task in turn with a cache of one task, and tract running the first task alone.
fn peak_memory(a: &BenchArgs, bundle: &Bundle, engine: &Engine, tasks: &[usize]) -> Result<()> {
    let n = bundle.manifest().tasks.len();
    let first = tasks.first().copied().unwrap_or(0);
    let name = engine
        .task_name(first)
        .context("task index out of range")?
        .to_string();
    let onnx = taskpack::export::export_task(bundle, &name)?;
    let path = std::env::temp_dir().join(format!("taskpack-bench-{}.onnx", std::process::id()));
    std::fs::write(&path, &onnx)?;
    let tract_rss = rss_of_child(a, &format!("tract={}", path.display()));
    let _ = std::fs::remove_file(&path);
    let (tract_rss, tract_file) = tract_rss?;
    let (engine_rss, engine_file) = rss_of_child(a, "engine")?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "  peak RSS: engine running all {n} tasks in turn with a cache of one task {:.1} MiB \
         vs tract running {name} alone {:.1} MiB: {:.2}x (file-backed pages at the end, \
         e.g. the mapped bundle: {:.1} MiB vs {:.1} MiB)",
        mib(engine_rss),
        mib(tract_rss),
        engine_rss as f64 / tract_rss as f64,
        mib(engine_file),
        mib(tract_file),
    );
    Ok(())
}
