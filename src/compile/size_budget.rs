//! A size budget: the most faithful storage of the base and the merged delta (or, with `tvq`, the
//! per-task residuals) whose bundle fits.
//!
//! The bulk of a bundle is the base and the merged delta; their storage types decide its size far
//! more than anything per task (a mask is one bit per weight whatever the setting). With `tvq`
//! the bulk is the base and every task's residual. So a budget is met by walking
//! [`STORAGE_LADDER`] (or [`TVQ_STORAGE_LADDER`]) — storage settings from the most faithful to
//! the smallest, ordered by the quantization error measured on real weights (docs/METHODS.md,
//! "Block-quantized storage", "Per-task residuals") — and keeping the first whose bundle fits. Each candidate is a
//! real bundle written into a scratch file next to the output, so the size is exact, not
//! estimated; the fitting one is moved into place, or, with calibration, calibrated at its
//! storage. The checkpoints are opened, checked and scanned once ([`Prepared`]) for every rung
//! and the calibration: each rung costs only the merge pass and the write.

use std::time::Instant;

use crate::compile::calibrate::{calibrated, check_calibratable, Calibration, RoundBundle};
use crate::compile::pipeline::{check_options, Prepared};
use crate::compile::{CompileError, CompileOptions, Progress};
use crate::encoding::Encoding;
use crate::format::{BundleWriter, Method};
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

/// `(base storage, residual storage)` for `--method tvq`, from the most faithful to the
/// smallest: the base as in the checkpoint with q8 residuals, then a q8 base with q8, q4, q3
/// and q2 residuals, then a q4 base with q2 residuals (the residuals carry the base's larger
/// rounding error back; docs/METHODS.md measures it).
pub const TVQ_STORAGE_LADDER: [(Option<Encoding>, Encoding); 6] = [
    (None, Encoding::Q8),
    (Some(Encoding::Q8), Encoding::Q8),
    (Some(Encoding::Q8), Encoding::Q4),
    (Some(Encoding::Q8), Encoding::Q3),
    (Some(Encoding::Q8), Encoding::Q2),
    (Some(Encoding::Q4), Encoding::Q2),
];

/// One rung of a ladder: the storage fields of [`CompileOptions`] it sets.
#[derive(Debug, Clone, Copy)]
struct Rung {
    base: Option<Encoding>,
    delta: Encoding,
    residual: Option<Encoding>,
}

impl Rung {
    /// The ladder for `opts`' method, with the residual storage it gives every rung (none but
    /// with tvq, where the ladder sets it).
    fn ladder(opts: &CompileOptions) -> Vec<(String, Rung)> {
        if opts.params.method == Method::Tvq {
            TVQ_STORAGE_LADDER
                .iter()
                .map(|&(base, residual)| {
                    let rung = Rung {
                        base,
                        delta: opts.delta_dtype,
                        residual: Some(residual),
                    };
                    (residual_storage_name((base, residual)), rung)
                })
                .collect()
        } else {
            STORAGE_LADDER
                .iter()
                .map(|&(base, delta)| {
                    let rung = Rung {
                        base,
                        delta,
                        residual: opts.residual_dtype,
                    };
                    (storage_name((base, delta)), rung)
                })
                .collect()
        }
    }

    /// `opts` with this rung's storage.
    fn apply(self, opts: &CompileOptions) -> CompileOptions {
        CompileOptions {
            base_dtype: self.base,
            delta_dtype: self.delta,
            residual_dtype: self.residual,
            ..opts.clone()
        }
    }
}

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

/// The name of a rung of [`TVQ_STORAGE_LADDER`]: `base q8, residuals q3`.
pub fn residual_storage_name((base, residual): (Option<Encoding>, Encoding)) -> String {
    match base {
        Some(b) => format!("base {b}, residuals {residual}"),
        None => format!("base as in the checkpoint, residuals {residual}"),
    }
}

/// Compiles `opts` with the most faithful rung of [`STORAGE_LADDER`] (with `tvq`,
/// [`TVQ_STORAGE_LADDER`]) whose bundle is at most `max_bytes` (module docs), calibrating the
/// final compile if `calibration` is given. The storage fields of `opts` the ladder sets are
/// ignored. Fails with
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
    if calibration.is_some() {
        check_calibratable(opts)?;
    }
    // Opened, checked and scanned once for every rung (and the calibration, if any).
    let prepared = Prepared::open(opts, progress)?;
    let scratch = RoundBundle::new(&opts.output, "sizing")?;
    let mut tried = Vec::new();
    let mut chosen = None;
    for (i, (name, rung)) in Rung::ladder(opts).into_iter().enumerate() {
        let candidate = CompileOptions {
            output: scratch.path().to_path_buf(),
            ..rung.apply(opts)
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
        log::info!("{name}: {bytes} bytes");
        tried.push((name, bytes));
        if bytes <= max_bytes {
            chosen = Some((i, rung, bundle));
            break;
        }
    }
    let Some((index, rung, candidate)) = chosen else {
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
            let final_opts = rung.apply(opts);
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
        let tvq: Vec<f64> = TVQ_STORAGE_LADDER
            .iter()
            .map(|&(b, r)| bits(b.unwrap_or(Encoding::F32)) + bits(r))
            .collect();
        assert_eq!(tvq, vec![40.5, 17.0, 13.5, 12.0, 11.0, 7.5]);
        assert_eq!(
            residual_storage_name(TVQ_STORAGE_LADDER[3]),
            "base q8, residuals q3".to_string()
        );
    }
}
