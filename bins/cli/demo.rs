//! `taskpack demo`: the main job on the embedded models, end to end.
//!
//! Compiles `models/demo` (a base and its fine-tuned tasks) into one bundle, runs every task
//! from it with the runtime engine and reports, per task, the accuracy of the original
//! checkpoint next to the bundle's, the task switch times, and the bundle's size next to the
//! originals'.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use std::sync::Arc;
use std::time::Instant;

use taskpack::format::Method;
use taskpack::runtime::{Bundle, Engine, EngineOptions};

use crate::compile_cmd::{self, CompileArgs};
use crate::eval::{accuracy, TestSet};

/// Arguments of `taskpack demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Folder with base.onnx and, per task, NAME.onnx and NAME.test.npz.
    #[arg(long, default_value = "models/demo")]
    pub models: PathBuf,
    /// Merge method.
    #[arg(long, default_value = "tvq", value_parser = Method::ALL.map(|m| m.name()))]
    pub method: String,
    /// Scaling vectors on top of the method.
    #[arg(long, default_value = "none", value_parser = ["none", "tensor", "row"])]
    pub scale: String,
    /// Scale of the merged vector (default per method, see `compile --help`).
    #[arg(long)]
    pub alpha: Option<f32>,
    /// TALL / Consensus mask threshold λ.
    #[arg(long)]
    pub lambda: Option<f32>,
    /// Storage of the merged delta (as for `compile`).
    #[arg(long, default_value = "f16", value_parser = compile_cmd::DELTA_TYPES)]
    pub delta_dtype: String,
    /// Storage of each task's residual (as for `compile`; default q3 with tvq, none otherwise).
    #[arg(long, value_parser = compile_cmd::RESIDUAL_TYPES)]
    pub residual_dtype: Option<String>,
    /// Storage of the base weights of merged matrices (default: q8 with tvq, the checkpoint's
    /// otherwise).
    #[arg(long, value_parser = compile_cmd::BASE_TYPES)]
    pub base_dtype: Option<String>,
    /// Where to write the bundle.
    #[arg(short, long, default_value = "target/demo.tpk")]
    pub output: PathBuf,
}

/// The tasks of a demo folder: every `NAME.onnx` (but the base) that has a `NAME.test.npz`.
fn discover(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut tasks = Vec::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let (Some(stem), Some("onnx")) = (
            path.file_stem().and_then(|s| s.to_str()),
            path.extension().and_then(|e| e.to_str()),
        ) else {
            continue;
        };
        if stem != "base" && dir.join(format!("{stem}.test.npz")).exists() {
            tasks.push((stem.to_string(), path.clone()));
        }
    }
    tasks.sort();
    if tasks.is_empty() {
        bail!(
            "no task found in {} (expected NAME.onnx with NAME.test.npz)",
            dir.display()
        );
    }
    Ok(tasks)
}

/// Runs the demo.
pub fn run(a: &DemoArgs) -> Result<()> {
    let tasks = discover(&a.models)?;
    let bundle = Arc::new(compile_demo(a, &tasks)?);
    evaluate(a, &bundle, &tasks)?;
    let sizes = bundle.sizes();
    let originals: u64 = bundle
        .manifest()
        .provenance
        .inputs
        .iter()
        .skip(1)
        .map(|i| i.bytes)
        .sum();
    println!(
        "  bundle {} bytes vs {} bytes for the {} task models ({:.3}x)",
        sizes.total,
        originals,
        tasks.len(),
        compile_cmd::ratio(sizes.total as f64, originals as f64)
    );
    Ok(())
}

/// Compiles the demo models with the demo's options and prints the compile report.
fn compile_demo(a: &DemoArgs, tasks: &[(String, PathBuf)]) -> Result<Bundle> {
    // The compile checks the checkpoints; the test sets are read after it.
    let test_sets: Vec<PathBuf> = tasks
        .iter()
        .map(|(name, _)| a.models.join(format!("{name}.test.npz")))
        .collect();
    taskpack::files::check_output(&a.output)?;
    taskpack::files::check_not_input(&a.output, test_sets.iter().map(PathBuf::as_path))?;
    if let Some(parent) = a.output.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let args = CompileArgs {
        base: a.models.join("base.onnx"),
        tasks: tasks.to_vec(),
        method: a.method.clone(),
        alpha: a.alpha,
        lambda: a.lambda,
        density: None,
        gamma: None,
        min_tasks: None,
        seed: None,
        scale: a.scale.clone(),
        private: None,
        shared: None,
        max_size: None,
        no_auto_private: false,
        delta_dtype: Some(a.delta_dtype.clone()),
        residual_dtype: a.residual_dtype.clone(),
        residual_for: Vec::new(),
        base_dtype: a.base_dtype.clone(),
        graph: None,
        tokenizer: None,
        labels: Vec::new(),
        calib: Vec::new(),
        calib_examples: 0,
        calib_lambdas: Vec::new(),
        calib_scales: Vec::new(),
        output: a.output.clone(),
    };
    let bundle = compile_cmd::compile_with_progress(&args.options()?, None, None)?;
    compile_cmd::print_report(&bundle, &a.output);
    Ok(bundle)
}

/// Runs every task on its test set, from its own ONNX file with plain tract and from the
/// bundle, and prints the table: accuracies, their ratio, and one-shot load and switch times.
fn evaluate(a: &DemoArgs, bundle: &Arc<Bundle>, tasks: &[(String, PathBuf)]) -> Result<()> {
    // Cache large enough for every task: the warm switch below is a cache hit.
    let engine = Engine::new(
        Arc::clone(bundle),
        EngineOptions::with_cache_bytes(usize::MAX),
    )?;

    println!();
    println!(
        "  {:<12}{:>10}{:>10}{:>12}{:>16}{:>18}{:>18}",
        "task",
        "original",
        "bundle",
        "normalized",
        "tract load ms",
        "cold switch ms",
        "warm switch µs"
    );
    let (mut sum_orig, mut sum_bundle) = (0.0, 0.0);
    for (name, path) in tasks {
        let set = TestSet::read(&a.models.join(format!("{name}.test.npz")))?;
        let original =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let started = Instant::now();
        let acc_orig =
            accuracy(&original, &set).with_context(|| format!("running {}", path.display()))?;
        let load_ms = started.elapsed().as_secs_f64() * 1e3;
        let task = engine.task_index(name)?;
        let started = Instant::now();
        engine.prepare(task)?;
        let cold_ms = started.elapsed().as_secs_f64() * 1e3;
        let started = Instant::now();
        engine.prepare(task)?;
        let warm_us = started.elapsed().as_secs_f64() * 1e6;
        let out = engine.run(task, set.batch())?;
        let acc_bundle = set.accuracy_of(out.first().context("task has no output")?)?;
        sum_orig += acc_orig;
        sum_bundle += acc_bundle;
        println!(
            "  {:<12}{:>10.4}{:>10.4}{:>12.4}{:>16.1}{:>18.2}{:>18.1}",
            name,
            acc_orig,
            acc_bundle,
            compile_cmd::ratio(acc_bundle, acc_orig),
            load_ms,
            cold_ms,
            warm_us
        );
    }
    let n = tasks.len() as f64;
    println!(
        "  {:<12}{:>10.4}{:>10.4}{:>12.4}",
        "mean",
        sum_orig / n,
        sum_bundle / n,
        compile_cmd::ratio(sum_bundle, sum_orig)
    );
    println!("  original: the task's own ONNX file run by plain tract (tract load = parse + optimize + one");
    println!(
        "  batch). bundle: the task run from the bundle by the taskpack runtime. cold switch ="
    );
    println!(
        "  reconstruct + bind the task's weights (the first task of each graph also builds that"
    );
    println!("  graph's template); warm switch = cache hit. One-shot timings; `taskpack bench` measures.");
    Ok(())
}
