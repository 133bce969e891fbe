//! `taskpack bench`: how fast the runtime switches tasks, side by side with what a user does
//! without taskpack (load the task's own ONNX model with tract and optimize it), with a plain
//! memory copy of the same bytes, and how fast the bound tasks run compared with tract.
//!
//! Every number is the median of repeated measurements in this one process, single-threaded.

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use taskpack::runtime::{Engine, EngineOptions, IoInfo};
use tract_onnx::prelude::*;

/// Arguments of `taskpack bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The bundle.
    pub bundle: PathBuf,
    /// Only this task (default: every task).
    #[arg(long)]
    pub task: Option<String>,
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

/// Median time of `f` over repetitions filling `budget` (at least 5, at most 10 000), after one
/// warm-up call.
fn measure(budget: Duration, mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    f()?;
    let mut times = Vec::new();
    let started = Instant::now();
    while times.len() < 5 || (started.elapsed() < budget && times.len() < 10_000) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed());
    }
    times.sort_unstable();
    Ok(times.get(times.len() / 2).copied().unwrap_or_default())
}

/// Median times of each function of `fs`, each given a time budget, measured in `rounds` rounds
/// of blocks: in every round, each function runs for its budget / `rounds` (at least twice) before
/// the next one starts. One warm-up call of each comes first. Blocks keep each measurement's cache
/// state to itself (e.g. a tract model load evicts the bundle from the CPU caches, which doubles
/// the cold switch on the small demo model if the two alternate call by call), while the rounds
/// spread load from other processes that changes during the run over all of them alike, so that
/// their ratios are measured side by side.
fn measure_blocks(
    rounds: u32,
    fs: &mut [(Duration, &mut dyn FnMut() -> Result<()>)],
) -> Result<Vec<Duration>> {
    let mut times: Vec<Vec<Duration>> = fs.iter().map(|_| Vec::new()).collect();
    for (_, f) in fs.iter_mut() {
        f()?;
    }
    for _ in 0..rounds.max(1) {
        for ((budget, f), times) in fs.iter_mut().zip(&mut times) {
            let block = *budget / rounds.max(1);
            let started = Instant::now();
            let mut n = 0;
            while n < 2 || (started.elapsed() < block && n < 10_000) {
                let t = Instant::now();
                f()?;
                times.push(t.elapsed());
                n += 1;
            }
        }
    }
    Ok(times
        .into_iter()
        .map(|mut v| {
            v.sort_unstable();
            v.get(v.len() / 2).copied().unwrap_or_default()
        })
        .collect())
}

/// Median times of `a` and `b` called alternately, in alternating order (so that load from other
/// processes and cache effects hit both alike), over repetitions filling `budget`, after one warm-up call of each.
fn measure_pair(
    budget: Duration,
    mut a: impl FnMut() -> Result<()>,
    mut b: impl FnMut() -> Result<()>,
) -> Result<(Duration, Duration)> {
    a()?;
    b()?;
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    let started = Instant::now();
    while ta.len() < 6 || (started.elapsed() < budget && ta.len() < 10_000) {
        // Alternate which goes first, so neither always runs on the other's cache state.
        let a_first = ta.len() % 2 == 0;
        for first in [a_first, !a_first] {
            let t = Instant::now();
            if first {
                a()?;
                ta.push(t.elapsed());
            } else {
                b()?;
                tb.push(t.elapsed());
            }
        }
    }
    let median = |mut v: Vec<Duration>| {
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or_default()
    };
    Ok((median(ta), median(tb)))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn ratio(a: Duration, b: Duration) -> f64 {
    if b.is_zero() {
        f64::NAN
    } else {
        a.as_secs_f64() / b.as_secs_f64()
    }
}

/// Deterministic pseudo-random inputs in [0, 1) (floats) or ones (integers: valid token ids and
/// attention masks), symbolic dimensions = `batch`.
fn inputs(facts: &[IoInfo], batch: usize) -> Result<TVec<Tensor>> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    facts
        .iter()
        .map(|f| {
            let shape: Vec<usize> = f.shape.iter().map(|d| d.unwrap_or(batch)).collect();
            let mut t = Tensor::zero_dt(f.dtype, &shape)?;
            if f.dtype == DatumType::F32 {
                for v in t.try_as_plain_ram_mut()?.as_slice_mut::<f32>()? {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    *v = (state >> 40) as f32 / (1u64 << 24) as f32;
                }
            } else if f.dtype.is_integer() {
                t = Tensor::from(tract_ndarray::ArrayD::<i64>::ones(shape.clone()))
                    .cast_to_dt(f.dtype)?
                    .into_owned();
            }
            Ok(t)
        })
        .collect()
}

fn tvalues(inputs: &TVec<Tensor>) -> TVec<TValue> {
    inputs.iter().map(|t| t.clone().into_tvalue()).collect()
}

/// The symbolic dimension names (`dim_param`) of the model's graph inputs.
fn input_symbols(onnx: &[u8]) -> Result<Vec<String>> {
    use tract_onnx::pb::tensor_shape_proto::dimension::Value;
    use tract_onnx::pb::type_proto;
    let model = taskpack::onnx::decode_model(onnx)?;
    let mut names = Vec::new();
    for input in model.graph.iter().flat_map(|g| &g.input) {
        let Some(type_proto::Value::TensorType(t)) =
            input.r#type.as_ref().and_then(|t| t.value.as_ref())
        else {
            continue;
        };
        for d in t.shape.iter().flat_map(|s| &s.dim) {
            if let Some(Value::DimParam(p)) = &d.value {
                if !names.contains(p) {
                    names.push(p.clone());
                }
            }
        }
    }
    Ok(names)
}

/// A memory figure of this process from /proc/self/status, in bytes: `VmHWM` (peak resident set
/// size so far), `RssFile` (resident file-backed pages now, e.g. the mapped bundle), ...
fn proc_status(field: &str) -> Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let key = format!("{field}:");
    let line = status
        .lines()
        .find(|l| l.starts_with(&key))
        .with_context(|| format!("no {field} in /proc/self/status"))?;
    let kb: u64 = line
        .trim_start_matches(&key)
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb * 1024)
}

/// One peak-memory workload, run in a child process of `taskpack bench` (so that each starts from
/// a fresh process). `engine`: every task in turn, twice round, from an engine whose cache holds
/// one task (so every switch is a cold switch that evicts the previous task). `tract=PATH`: the
/// ONNX model at PATH loaded, optimized and run once by plain tract. Prints `peak_rss BYTES`.
fn rss_child(a: &BenchArgs, which: &str) -> Result<()> {
    if which == "engine" {
        let bundle = Arc::new(crate::open_bundle(&a.bundle)?);
        let n = bundle.manifest().tasks.len();
        let probe = Engine::new(Arc::clone(&bundle), EngineOptions::default())?;
        let one = (0..n)
            .map(|t| probe.task_weight_bytes(t))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .max()
            .unwrap_or(0);
        drop(probe);
        let engine = Engine::new(bundle, EngineOptions::with_cache_bytes(one))?;
        for task in (0..n).chain(0..n) {
            let data = inputs(&engine.input_facts(task)?, a.batch)?;
            black_box(engine.run(task, tvalues(&data))?);
        }
    } else if let Some(path) = which.strip_prefix("tract=") {
        let model = tract_onnx::onnx()
            .model_for_path(path)?
            .into_optimized()?
            .into_runnable()?;
        let facts = model
            .model()
            .input_outlets()?
            .iter()
            .map(|o| {
                let f = model.model().outlet_fact(*o)?;
                Ok(IoInfo {
                    name: String::new(),
                    dtype: f.datum_type,
                    shape: f
                        .shape
                        .iter()
                        .map(|d| d.as_i64().map(|v| v as usize))
                        .collect(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let data = inputs(&facts, a.batch)?;
        black_box(model.run(tvalues(&data))?);
    } else {
        bail!("unknown --rss-child workload {which}");
    }
    println!("peak_rss {}", proc_status("VmHWM")?);
    println!("rss_file {}", proc_status("RssFile")?);
    Ok(())
}

/// Runs `taskpack bench` again as a child process with `--rss-child which`; its peak RSS and its
/// file-backed resident pages at the end.
fn rss_of_child(a: &BenchArgs, which: &str) -> Result<(u64, u64)> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .arg("bench")
        .arg(&a.bundle)
        .arg("--batch")
        .arg(a.batch.to_string())
        .arg("--rss-child")
        .arg(which)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "peak memory child ({which}) failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let field = |key: &str| -> Result<u64> {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .with_context(|| format!("peak memory child printed no {key}"))?
            .trim()
            .parse()
            .map_err(Into::into)
    };
    Ok((field("peak_rss ")?, field("rss_file ")?))
}

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

/// Runs `taskpack bench`.
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
        "{}: {} tasks, {} graphs; batch {}, single thread, medians over ≥ {} ms per measurement",
        a.bundle.display(),
        n,
        bundle.manifest().graphs.len(),
        a.batch,
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
        let name = engine
            .task_name(task)
            .context("task index out of range")?
            .to_string();
        let data = inputs(&engine.input_facts(task)?, a.batch)?;

        // Cold switch: materialize + bind into the warm template, bypassing the cache.
        // Baseline: the task's own ONNX model, loaded and optimized by tract (from memory: no
        // file read, which a user loading the file would pay on top). Memcpy: a plain copy of as
        // many bytes as the switch materializes, between two buffers already mapped.
        // The three in rounds of blocks (`measure_blocks`), so their ratios are side by side.
        let onnx = taskpack::compile::export::export_task(&bundle, &name)?;
        let load = || -> Result<Arc<TypedRunnableModel>> {
            tract_onnx::onnx()
                .model_for_read(&mut &onnx[..])?
                .into_optimized()?
                .into_runnable()
        };
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
        let mut baseline = || load().map(black_box).map(drop);
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

        // Inference: the engine vs tract on the same reconstructed weights, with the batch
        // symbolic (as the ONNX declares it) and fixed (symbols set to the batch before
        // optimizing, in tract and in the engine alike).
        let plain = load()?;
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
        let options = input_symbols(&onnx)?
            .into_iter()
            .fold(EngineOptions::default(), |o, s| o.with_symbol(s, a.batch));
        let fixed_engine = Engine::new(Arc::clone(&bundle), options)?;
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
        // Same answers, or the comparison means nothing.
        let (ours, theirs) = (
            engine.run(task, tvalues(&data))?,
            plain.run(tvalues(&data))?,
        );
        for (x, y) in ours.iter().zip(theirs.iter()) {
            if x.close_enough(y, true).is_err() {
                bail!("task {name}: engine and tract outputs differ");
            }
        }
        rows.push(Row {
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
        });
    }

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
    for (r, template) in rows.iter().zip(&template_times) {
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
    println!();
    println!(
        "inference (ms per run, batch {}; \"symbolic\": the batch stays a symbol as the ONNX \
         declares it, \"fixed\": symbols fixed to the batch before optimizing)",
        a.batch
    );
    println!(
        "  {:<10}{:>10}{:>10}{:>8}{:>10}{:>10}{:>8}",
        "", "engine", "tract", "", "engine", "tract", ""
    );
    println!(
        "  {:<10}{:>10}{:>10}{:>8}{:>10}{:>10}{:>8}",
        "task", "symbolic", "symbolic", "ratio", "fixed", "fixed", "ratio"
    );
    for r in &rows {
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
    if !a.no_rss {
        // Peak memory: each workload in a fresh child process, VmHWM at its end.
        let first = tasks.first().copied().unwrap_or(0);
        let name = engine
            .task_name(first)
            .context("task index out of range")?
            .to_string();
        let onnx = taskpack::compile::export::export_task(&bundle, &name)?;
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
