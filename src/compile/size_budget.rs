//! A size budget: the most faithful storage of the base and the merged delta whose bundle fits.
//!
//! The bulk of a bundle is the base and the merged delta; their storage types decide its size far
//! more than anything per task (a mask is one bit per weight whatever the setting). So a budget
//! is met by walking [`STORAGE_LADDER`] — storage settings from the most faithful to the
//! smallest, ordered by the quantization error measured on real weights (docs/METHODS.md,
//! "Block-quantized storage") — and keeping the first whose bundle fits. Each candidate is a
//! real bundle written into a scratch file next to the output, so the size is exact, not
//! estimated; the fitting one is moved into place, or, with calibration, calibrated at its
//! storage. The checkpoints are opened, checked and scanned once ([`Prepared`]) for every rung
//! and the calibration: each rung costs only the merge pass and the write.

use std::time::Instant;

use crate::compile::calibrate::{calibrated, Calibration, RoundBundle};
use crate::compile::pipeline::{check_options, Prepared};
use crate::compile::{CompileError, CompileOptions, Progress};
use crate::encoding::Encoding;
use crate::format::BundleWriter;
use crate::runtime::Bundle;

/// `(base storage, delta storage)` from the most faithful to the smallest; `None` keeps each
/// base tensor's checkpoint type.
pub const STORAGE_LADDER: [(Option<Encoding>, Encoding); 5] = [
    (None, Encoding::F16),
    (Some(Encoding::F16), Encoding::F16),
    (Some(Encoding::Q8), Encoding::F16),
    (Some(Encoding::Q8), Encoding::Q8),
    (Some(Encoding::Q8), Encoding::Q4),
];

/// What [`compile_within`] tried and chose.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetChoice {
    /// The budget, in bytes.
    pub max_bytes: u64,
    /// Every rung tried, in order: its name (`base q8, delta q4`) and its bundle's size.
    pub tried: Vec<(String, u64)>,
    /// Index into `tried` of the setting compiled to the output.
    pub chosen: usize,
}

/// The name of a rung, for reports: `base q8, delta q4` (`base as in the checkpoint`).
pub fn storage_name((base, delta): (Option<Encoding>, Encoding)) -> String {
    match base {
        Some(b) => format!("base {b}, delta {delta}"),
        None => format!("base as in the checkpoint, delta {delta}"),
    }
}

/// Compiles `opts` with the most faithful rung of [`STORAGE_LADDER`] whose bundle is at most
/// `max_bytes` (module docs), calibrating the final compile if `calibration` is given. The
/// storage fields of `opts` are ignored (the ladder sets them). Fails with
/// [`CompileError::OverBudget`] if even the smallest rung does not fit, or if calibration adds
/// row scales that push the chosen bundle over.
pub fn compile_within(
    opts: &CompileOptions,
    max_bytes: u64,
    calibration: Option<&Calibration>,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<(Bundle, BudgetChoice), CompileError> {
    // The candidates are compiled to a scratch path, and the chosen one renamed to the output:
    // refuse, before anything is written, an output the compile itself would refuse (an input,
    // a checkpoint's external data file, not a regular file).
    let started = Instant::now();
    check_options(opts)?;
    // Opened, checked and scanned once for every rung (and the calibration, if any).
    let prepared = Prepared::open(opts, progress)?;
    let scratch = RoundBundle::new(&opts.output, "sizing")?;
    let mut tried = Vec::new();
    let mut chosen = None;
    for (i, &rung) in STORAGE_LADDER.iter().enumerate() {
        let candidate = CompileOptions {
            base_dtype: rung.0,
            delta_dtype: rung.1,
            output: scratch.path().to_path_buf(),
            ..opts.clone()
        };
        let writer = BundleWriter::create(scratch.path())?;
        let bundle = prepared.write(
            &candidate,
            writer,
            vec![None; opts.tasks.len()],
            started,
            progress,
        )?;
        let bytes = bundle_len(&bundle);
        log::info!("{}: {bytes} bytes", storage_name(rung));
        tried.push((storage_name(rung), bytes));
        if bytes <= max_bytes {
            chosen = Some((i, rung, bundle));
            break;
        }
    }
    let Some((index, (base, delta), candidate)) = chosen else {
        return Err(CompileError::OverBudget {
            max_bytes,
            smallest: tried.last().map_or(0, |(_, b)| *b),
        });
    };
    let bundle = match calibration {
        // The candidate is the bundle: move it into place rather than compile it again.
        None => {
            scratch.persist_to(&opts.output)?;
            candidate
        }
        Some(c) => {
            drop((candidate, scratch));
            let final_opts = CompileOptions {
                base_dtype: base,
                delta_dtype: delta,
                ..opts.clone()
            };
            let bundle = calibrated(&final_opts, &prepared, c, started, progress)?;
            let bytes = bundle_len(&bundle);
            if bytes > max_bytes {
                return Err(CompileError::OverBudget {
                    max_bytes,
                    smallest: bytes,
                });
            }
            bundle
        }
    };
    Ok((
        bundle,
        BudgetChoice {
            max_bytes,
            tried,
            chosen: index,
        },
    ))
}

/// The length of a bundle's file.
fn bundle_len(bundle: &Bundle) -> u64 {
    bundle.bytes().len() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ladder_only_gets_smaller() {
        // Bits per weight of a large matrix at each rung (f32 checkpoint): never growing.
        let bits = |e: Encoding| {
            let (elements, bytes) = e.block();
            bytes as f64 * 8.0 / elements as f64
        };
        let sizes: Vec<f64> = STORAGE_LADDER
            .iter()
            .map(|&(b, d)| bits(b.unwrap_or(Encoding::F32)) + bits(d))
            .collect();
        assert_eq!(sizes, vec![48.0, 32.0, 24.5, 17.0, 13.5]);
        assert_eq!(
            storage_name(STORAGE_LADDER[4]),
            "base q8, delta q4".to_string()
        );
    }
}
