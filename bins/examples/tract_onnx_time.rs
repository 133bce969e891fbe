//! Times plain tract on ONNX files: load + optimize, and the median of 30 runs at batch 1 on
//! 64 ones of each integer input (a text model's token ids and attention mask), in one process
//! so that the files compare side by side. docs/PERFORMANCE.md uses it to compare a task model
//! with its onnxruntime `quantize_dynamic` copy:
//!
//! ```sh
//! cargo run --release -p taskpack-cli --example tract_onnx_time -- \
//!     ~/.cache/taskpack/accuracy/models/rotten.onnx ~/.cache/taskpack/minilm/rotten.int8.onnx
//! ```

use std::time::Instant;

use anyhow::Result;
use tract_onnx::prelude::*;

mod common;

fn main() -> Result<()> {
    let paths: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(!paths.is_empty(), "usage: tract_onnx_time MODEL.onnx ...");
    for path in &paths {
        let started = Instant::now();
        let model = common::optimized(path, false)?.into_runnable()?;
        let load = started.elapsed();
        let inputs = common::input_ones(model.model())?;
        model.run(inputs.clone())?;
        let mut runs: Vec<f64> = (0..30)
            .map(|_| {
                let t = Instant::now();
                model
                    .run(inputs.clone())
                    .map(|_| t.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<TractResult<_>>()?;
        runs.sort_by(f64::total_cmp);
        println!(
            "{path}: load + optimize {:.0} ms, run (batch 1 x 64) median {:.2} ms",
            load.as_secs_f64() * 1e3,
            runs.get(runs.len() / 2).copied().unwrap_or(f64::NAN)
        );
    }
    Ok(())
}
