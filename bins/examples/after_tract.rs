//! What a tract run costs the caller's code *after* it: glibc's `expf` and `half`'s per-value
//! F16C conversion, timed before any inference, after one run of an ONNX model in plain tract,
//! and after one `Engine::run` of a bundle's task (which clears the vector state before
//! returning; src/runtime/guard.rs). docs/PERFORMANCE.md quotes it:
//!
//! ```sh
//! cargo run --release -p taskpack-cli --example after_tract -- \
//!     ~/.cache/taskpack/accuracy/models/rotten.onnx \
//!     ~/.cache/taskpack/accuracy/bundles/text/tall.tpk rotten
//! ```
//!
//! Every model gets 64 ones in each integer input at batch 1 (a text model's token ids and
//! attention mask).

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use taskpack::prelude::*;
use tract_onnx::prelude::IntoRunnable;

mod common;

const VALUES: usize = 1_000_000;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [onnx, bundle, task] = args.as_slice() else {
        anyhow::bail!("usage: after_tract MODEL.onnx BUNDLE.tpk TASK");
    };
    let values: Vec<f32> = (0..VALUES).map(|i| (i as f32).sin() * 1e-3).collect();
    report("before any inference", &values);

    let model = common::optimized(onnx, false)?.into_runnable()?;
    model.run(common::input_ones(model.model())?)?;
    report("after a plain tract run", &values);

    let engine = Engine::new(Arc::new(Bundle::open(bundle)?), EngineOptions::default())?;
    let index = engine.task_index(task)?;
    let facts: Vec<DatumType> = engine.input_facts(index)?.iter().map(|f| f.dtype).collect();
    engine.run(index, common::ones(&facts)?)?;
    report("after Engine::run", &values);
    Ok(())
}

/// Prints the time per value of `f32::exp` and of a scalar f32 → f16 → f32 round trip.
fn report(label: &str, values: &[f32]) {
    let t = Instant::now();
    let e: f32 = values.iter().map(|x| x.exp()).sum();
    let exp = t.elapsed().as_nanos() as f64 / values.len() as f64;
    let t = Instant::now();
    let h: f32 = values
        .iter()
        .map(|x| half::f16::from_f32(*x).to_f32())
        .sum();
    let f16 = t.elapsed().as_nanos() as f64 / values.len() as f64;
    println!("{label:<26} f32::exp {exp:6.1} ns/value   f16 round trip {f16:6.1} ns/value   ({e:.0}, {h:.3})");
}
