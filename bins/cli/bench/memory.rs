//! Peak memory of the engine and of plain tract, each workload in a fresh child process
//! (`taskpack bench --rss-child`), read from /proc/self/status.

use std::hint::black_box;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use taskpack::runtime::{Engine, EngineOptions, IoInfo};
use tract_onnx::prelude::*;

use super::workload::{inputs, tvalues};
use super::BenchArgs;

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
pub(super) fn rss_child(a: &BenchArgs, which: &str) -> Result<()> {
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
            let data = inputs(&engine.input_facts(task)?, a.batch, a.seq)?;
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
        let data = inputs(&facts, a.batch, a.seq)?;
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
pub(super) fn rss_of_child(a: &BenchArgs, which: &str) -> Result<(u64, u64)> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .arg("bench")
        .arg(&a.bundle)
        .arg("--compute")
        .arg(taskpack::runtime::compute().name())
        .arg("--batch")
        .arg(a.batch.to_string())
        .arg("--seq")
        .arg(a.seq.to_string())
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
