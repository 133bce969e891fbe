//! Where tract spends an inference: the time of each node of an optimized ONNX model, summed by
//! operator over many runs at batch 1 on 64 ones of each integer input (a text model's token ids
//! and attention mask), with the op's share and its GFLOP/s where tract can count its flops.
//! docs/PERFORMANCE.md ("Where the inference time goes") quotes it for a MiniLM task:
//!
//! ```sh
//! cargo run --release -p taskpack-cli --example tract_op_profile -- \
//!     ~/.cache/taskpack/accuracy/models/rotten.onnx 200 [fixed]
//! ```
//!
//! With `fixed`, the inputs are declared `[1, 64]` before tract optimizes the model (the
//! engine's templates keep batch and sequence symbolic).
//!
//! Each node is timed around tract's own `plan::eval`, so the sum is the plan's time minus the
//! scheduling between nodes (printed as "outside nodes").

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::Cost;
use tract_onnx::tract_core::plan::{eval, SimpleState};

mod common;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .context("usage: tract_op_profile MODEL.onnx [RUNS]")?;
    let runs: usize = args.next().map_or(Ok(100), |r| r.parse())?;
    // `fixed`: the inputs' shape set to [1, 64] before optimizing (else symbolic, as in the
    // engine's templates).
    let rest: Vec<String> = args.collect();
    let fixed = rest.iter().any(|a| a == "fixed");
    let zeroupper = rest.iter().any(|a| a == "vzeroupper");
    let model = common::optimized(&path, fixed)?;
    let flops = flops_by_node(&model);
    let plan = Arc::new(model.into_runnable()?);
    let inputs = common::input_ones(plan.model())?;
    let mut state = SimpleState::new(&plan)?;
    state.run(inputs.clone())?; // warm-up

    let mut by_node: Vec<Duration> = vec![Duration::ZERO; plan.model().nodes.len()];
    let started = Instant::now();
    for _ in 0..runs {
        state.run_plan_with_eval(inputs.clone(), |ctx, op_state, node, input| {
            let t = Instant::now();
            let r = eval(ctx, op_state, node, input);
            if zeroupper {
                taskpack::internals::clear_upper_vector_state();
            }
            if let Some(slot) = by_node.get_mut(node.id) {
                *slot += t.elapsed();
            }
            r
        })?;
    }
    let total = started.elapsed();

    // Summed by operator name.
    let mut by_op: BTreeMap<String, (Duration, usize, f64)> = BTreeMap::new();
    for (node, time) in plan.model().nodes.iter().zip(&by_node) {
        let e = by_op.entry(node.op().name().to_string()).or_default();
        e.0 += *time;
        e.1 += 1;
        e.2 += flops.get(node.id).copied().unwrap_or(0.0);
    }
    let mut rows: Vec<_> = by_op.into_iter().collect();
    rows.sort_by_key(|(_, (time, _, _))| std::cmp::Reverse(*time));
    let per_run = |d: Duration| d.as_secs_f64() * 1e3 / runs as f64;
    let in_nodes: Duration = by_node.iter().sum();
    println!(
        "{path}: {runs} runs, {:.2} ms per run ({:.2} ms in nodes, {:.2} ms outside nodes)",
        per_run(total),
        per_run(in_nodes),
        per_run(total.saturating_sub(in_nodes))
    );
    println!(
        "{:<28} {:>6} {:>10} {:>7} {:>9}",
        "op", "nodes", "ms/run", "share", "GFLOP/s"
    );
    for (op, (time, nodes, flop)) in rows {
        let ms = per_run(time);
        let gflops = if flop > 0.0 && ms > 0.0 {
            format!("{:.1}", flop / (ms * 1e-3) / 1e9)
        } else {
            "-".to_string()
        };
        println!(
            "{op:<28} {nodes:>6} {ms:>10.3} {:>6.1}% {gflops:>9}",
            100.0 * time.as_secs_f64() / in_nodes.as_secs_f64().max(f64::MIN_POSITIVE)
        );
    }
    Ok(())
}

/// Floating-point operations per node for one run, where the op can count them (matrix
/// products): tract's `cost` with the model's symbols as the inputs fix them.
fn flops_by_node(model: &TypedModel) -> Vec<f64> {
    let mut values = SymbolValues::default();
    for o in model.input_outlets().into_iter().flatten() {
        if let Ok(fact) = model.outlet_fact(*o) {
            for (axis, d) in fact.shape.iter().enumerate() {
                if let TDim::Sym(sym) = d {
                    values.set(sym, if axis == 0 { 1 } else { 64 });
                }
            }
        }
    }
    model
        .nodes
        .iter()
        .map(|node| {
            let inputs: Vec<&TypedFact> = node
                .inputs
                .iter()
                .filter_map(|i| model.outlet_fact(*i).ok())
                .collect();
            node.op
                .cost(&inputs)
                .ok()
                .into_iter()
                .flatten()
                .filter(|(c, _)| matches!(c, Cost::FMA(_)))
                .filter_map(|(_, n)| n.eval(&values).to_i64().ok())
                .map(|n| 2.0 * n as f64)
                .sum()
        })
        .collect()
}
