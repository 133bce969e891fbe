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
//!
//! With `tvq` the residuals are per task, so a budget that falls between two rungs with the
//! same base need not give every task the smaller one: starting from the rung that fits, tasks
//! get the previous (more faithful) rung's residual storage one by one, those whose relative
//! error drops the most per byte first, while the bundle still fits ([`upgrades`]). The
//! relative error `‖θ̂ − θ‖ / ‖τ‖` of each task at both rungs is the compile report's; it
//! needs no data. The mixed bundle is written and measured like a rung.

use std::time::Instant;

use crate::compile::calibrate::{
    calibrated, calibrated_tvq, check_calibratable, Calibration, RoundBundle, Upgrade,
};
use crate::compile::pipeline::{check_options, Prepared};
use crate::compile::{CompileError, CompileOptions, Progress};
use crate::encoding::Encoding;
use crate::format::layout;
use crate::format::{BundleWriter, Method, TaskTensor};
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
/// and q2 residuals, then a q4 base with q2 and ternary residuals (the residuals carry the
/// base's larger rounding error back; docs/METHODS.md measures it). A q8 base with ternary
/// residuals is not a rung: on the image benchmark it is larger than q4/q2 and less accurate
/// (docs/ACCURACY.md), so it would be picked over a better, smaller setting.
pub const TVQ_STORAGE_LADDER: [(Option<Encoding>, Encoding); 7] = [
    (None, Encoding::Q8),
    (Some(Encoding::Q8), Encoding::Q8),
    (Some(Encoding::Q8), Encoding::Q4),
    (Some(Encoding::Q8), Encoding::Q3),
    (Some(Encoding::Q8), Encoding::Q2),
    (Some(Encoding::Q4), Encoding::Q2),
    (Some(Encoding::Q4), Encoding::Ternary),
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

/// A size budget: a number of bytes, or a fraction of the task checkpoints' total size (their
/// files and external data, as the compile report's inputs count them; docs/ACCURACY.md's
/// "size vs originals").
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// At most this many bytes.
    Bytes(u64),
    /// At most this fraction of the task checkpoints' total size (`--max-size 0.1x`).
    OfTasks(f64),
}

impl From<u64> for Budget {
    fn from(bytes: u64) -> Budget {
        Budget::Bytes(bytes)
    }
}

impl Budget {
    /// The budget in bytes, for the task checkpoints `prepared` opened.
    fn bytes(self, prepared: &Prepared) -> Result<u64, CompileError> {
        let fraction = match self {
            Budget::Bytes(b) => return Ok(b),
            Budget::OfTasks(f) => f,
        };
        let tasks = prepared
            .tasks()
            .iter()
            .fold(0u64, |sum, c| sum.saturating_add(c.input_bytes()));
        let bytes = (tasks as f64 * fraction).floor();
        if !(fraction.is_finite() && bytes >= 1.0) {
            return Err(CompileError::Options(format!(
                "a size budget of {fraction}x the {tasks} bytes of task checkpoints is not a usable size"
            )));
        }
        log::info!("size budget {fraction}x of {tasks} bytes of task checkpoints: {bytes} bytes");
        // A float-to-integer cast saturates: a fraction above 1 of a huge input stays in range.
        Ok(bytes as u64)
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
    /// With `tvq`: the tasks given the residual storage of the rung before `chosen` (more
    /// faithful, larger), because the bundle still fits with them — those that gain the most per
    /// byte in relative error or, with calibration, in agreement with the original; the other
    /// tasks keep the chosen rung's.
    pub upgrades: Vec<TaskUpgrade>,
    /// Size of the bundle written, bytes.
    pub bytes: u64,
}

/// A task given a more faithful residual storage than the chosen rung's (see [`BudgetChoice`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskUpgrade {
    /// Task name.
    pub task: String,
    /// Its residual storage.
    pub residual: Encoding,
    /// Bytes it adds over the chosen rung's storage.
    pub extra_bytes: u64,
    /// Its relative error `‖θ̂ − θ‖ / ‖τ‖` at the chosen rung's storage, then at this one.
    pub relative_error: (f64, f64),
    /// With calibration, its agreement with the original at this storage (the chosen
    /// candidate's; the report's calibration lists every candidate at both storages).
    pub agreement: Option<f64>,
}

/// Per task of a candidate bundle: the bytes of its residual sections (with their padding) and
/// its relative error.
#[derive(Debug, Clone, PartialEq)]
struct TaskCosts {
    bytes: Vec<u64>,
    errors: Vec<f64>,
}

impl TaskCosts {
    fn of(bundle: &Bundle) -> TaskCosts {
        let m = bundle.manifest();
        let bytes = m
            .tasks
            .iter()
            .map(|task| {
                task.tensors
                    .iter()
                    .filter_map(|module| match module {
                        TaskTensor::Residual { residual, .. } => m
                            .sections
                            .get(residual.section as usize)
                            .map(|s| layout::align_up(s.length).unwrap_or(u64::MAX)),
                        _ => None,
                    })
                    .fold(0u64, u64::saturating_add)
            })
            .collect();
        let errors = m.report.tasks.iter().map(|t| t.relative_error).collect();
        TaskCosts { bytes, errors }
    }
}

/// The tasks to move from `lower` (a rung that fits) to `upper` (the rung before it) within
/// `room` extra bytes, by the relative error each saves ([`take_by_gain`]). Returns task
/// indices, in the order taken.
fn upgrades(lower: &TaskCosts, upper: &TaskCosts, room: u64) -> Vec<usize> {
    let candidates = (0..lower.bytes.len())
        .filter_map(|t| {
            let cost = upper.bytes.get(t)?.saturating_sub(*lower.bytes.get(t)?);
            let saved = lower.errors.get(t)? - upper.errors.get(t)?;
            Some((t, cost, (saved, 0.0)))
        })
        .collect();
    take_by_gain(candidates, room)
}

/// The greedy choice of a size budget: `(task, extra bytes, gain)` candidates — a gain is
/// compared first on its first component, then on its second (e.g. agreement, then logit
/// distance) — taken in order of decreasing gain per byte (ties by task order), each one that
/// still fits in `room`; a candidate that gains nothing (not above `(0, 0)`) is never taken.
/// Returns task indices, in the order taken.
pub(crate) fn take_by_gain(mut candidates: Vec<(usize, u64, (f64, f64))>, room: u64) -> Vec<usize> {
    candidates.retain(|(_, _, g)| g.0 > 0.0 || (g.0 == 0.0 && g.1 > 0.0));
    let per_byte = |(_, cost, g): &(usize, u64, (f64, f64))| {
        let bytes = (*cost).max(1) as f64;
        (g.0 / bytes, g.1 / bytes)
    };
    candidates.sort_by(|a, b| {
        let (a, b) = (per_byte(a), per_byte(b));
        b.0.total_cmp(&a.0).then(b.1.total_cmp(&a.1))
    });
    let mut left = room;
    let mut taken = Vec::new();
    for (t, cost, _) in candidates {
        if cost <= left {
            left -= cost;
            taken.push(t);
        }
    }
    taken
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
/// [`TVQ_STORAGE_LADDER`]) whose bundle fits `budget` (module docs), calibrating the
/// final compile if `calibration` is given. The storage fields of `opts` the ladder sets are
/// ignored. Fails with
/// [`CompileError::OverBudget`] if even the smallest rung does not fit, or if calibration adds
/// row scales that push the chosen bundle over.
pub fn compile_within(
    opts: &CompileOptions,
    budget: impl Into<Budget>,
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
    let max_bytes = budget.into().bytes(&prepared)?;
    let scratch = RoundBundle::new(&opts.output, "sizing")?;
    let mut tried = Vec::new();
    let mut chosen = None;
    // The previous rung and its per-task costs (with tvq), for mixing.
    let mut previous: Option<(Rung, TaskCosts)> = None;
    for (i, (name, rung)) in Rung::ladder(opts).into_iter().enumerate() {
        let bundle = write_to(&prepared, &rung.apply(opts), &scratch, started, progress)?;
        let bytes = bundle_len(&bundle);
        log::info!("{name}: {bytes} bytes");
        tried.push((name, bytes));
        if bytes <= max_bytes {
            chosen = Some((i, rung, bundle, previous.take()));
            break;
        }
        if opts.params.method == Method::Tvq {
            previous = Some((rung, TaskCosts::of(&bundle)));
        }
    }
    let Some((index, rung, mut candidate, previous)) = chosen else {
        return Err(CompileError::OverBudget {
            max_bytes,
            smallest: tried.last().map_or(0, |(_, b)| *b),
        });
    };
    // Per-task residual storage between this rung and the previous one, if they share a base.
    let mix = previous
        .filter(|(p, _)| p.base == rung.base)
        .and_then(|(upper, upper_costs)| {
            let residual = upper.residual?;
            let lower_costs = TaskCosts::of(&candidate);
            Some((residual, lower_costs, upper_costs))
        });
    let room = max_bytes.saturating_sub(bundle_len(&candidate));
    let final_opts = rung.apply(opts);
    let (bundle, taken) = match calibration {
        None => {
            let mut taken = Vec::new();
            let mut file = scratch;
            if let Some((residual, lower, upper)) = &mix {
                taken = upgrades(lower, upper, room);
                // Mixed bundles go to their own scratch file, the rung's stays. The manifest's
                // own bytes change a little with the section lengths: measure, and give the
                // last upgrade back until the bundle fits.
                let mixing = RoundBundle::new(&opts.output, "mixing")?;
                while !taken.is_empty() {
                    let mixed_opts = final_opts.with_upgrades(*residual, &taken);
                    let mixed = write_to(&prepared, &mixed_opts, &mixing, started, progress)?;
                    let bytes = bundle_len(&mixed);
                    log::info!("tasks {taken:?} at {residual}: {bytes} bytes");
                    if bytes <= max_bytes {
                        (candidate, file) = (mixed, mixing);
                        break;
                    }
                    taken.pop();
                }
            }
            // The candidate is the bundle: move it into place rather than compile it again.
            file.persist_to(&opts.output)?;
            (candidate, taken)
        }
        Some(c) => {
            drop((candidate, scratch));
            let (bundle, taken) = match &mix {
                Some((residual, lower, upper)) => {
                    let offer = Upgrade {
                        residual: *residual,
                        extra_bytes: lower
                            .bytes
                            .iter()
                            .zip(&upper.bytes)
                            .map(|(l, u)| u.saturating_sub(*l))
                            .collect(),
                        room,
                        max_bytes,
                    };
                    calibrated_tvq(&final_opts, &prepared, c, Some(&offer), (started, progress))?
                }
                None => (
                    calibrated(&final_opts, &prepared, c, started, progress)?,
                    Vec::new(),
                ),
            };
            let bytes = bundle_len(&bundle);
            if bytes > max_bytes {
                return Err(CompileError::OverBudget {
                    max_bytes,
                    smallest: bytes,
                });
            }
            (bundle, taken)
        }
    };
    let upgraded = match &mix {
        Some((residual, lower, upper)) => taken
            .iter()
            .filter_map(|&t| {
                let (name, _) = opts.tasks.get(t)?;
                let (lower_bytes, lower_err) = (lower.bytes.get(t)?, lower.errors.get(t)?);
                let (upper_bytes, upper_err) = (upper.bytes.get(t)?, upper.errors.get(t)?);
                let agreement = bundle
                    .manifest()
                    .report
                    .tasks
                    .get(t)
                    .and_then(|r| r.calibration.as_ref())
                    .and_then(|c| {
                        usize::try_from(c.chosen)
                            .ok()
                            .and_then(|i| c.candidates.get(i))
                    })
                    .map(|s| s.agreement);
                Some(TaskUpgrade {
                    task: name.clone(),
                    residual: *residual,
                    extra_bytes: upper_bytes.saturating_sub(*lower_bytes),
                    relative_error: (*lower_err, *upper_err),
                    agreement,
                })
            })
            .collect(),
        None => Vec::new(),
    };
    let bytes = bundle_len(&bundle);
    Ok((
        bundle,
        BudgetChoice {
            max_bytes,
            tried,
            chosen: index,
            upgrades: upgraded,
            bytes,
        },
    ))
}

/// `opts`' bundle, written into the scratch file.
fn write_to(
    prepared: &Prepared,
    opts: &CompileOptions,
    scratch: &RoundBundle,
    started: Instant,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Bundle, CompileError> {
    let writer = BundleWriter::create(scratch.path())?;
    prepared.write(
        &CompileOptions {
            output: scratch.path().to_path_buf(),
            ..opts.clone()
        },
        writer,
        vec![None; opts.tasks.len()],
        started,
        progress,
    )
}

/// The length of a bundle's file.
fn bundle_len(bundle: &Bundle) -> u64 {
    bundle.bytes().len() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrades_take_the_most_error_saved_per_byte_that_still_fits() {
        // Extra bytes 20, 40, 10, 5; error saved 0.2, 0.4, 0.05, -0.01, so per byte 0.01, 0.01,
        // 0.005 (task 3 would lose accuracy: never taken). In 35 bytes: task 0 (20, ties by
        // order), not task 1 (40 > 15), task 2 (10).
        let lower = TaskCosts {
            bytes: vec![10, 10, 10, 10],
            errors: vec![0.5, 0.5, 0.5, 0.5],
        };
        let upper = TaskCosts {
            bytes: vec![30, 50, 20, 15],
            errors: vec![0.3, 0.1, 0.45, 0.51],
        };
        assert_eq!(upgrades(&lower, &upper, 35), vec![0, 2]);
        assert_eq!(upgrades(&lower, &upper, 70), vec![0, 1, 2]);
        assert_eq!(upgrades(&lower, &upper, 9), Vec::<usize>::new());
    }

    #[test]
    fn gains_compare_on_the_first_component_then_the_second() {
        // Equal costs: task 1 gains agreement (first component), tasks 3 and 0 only distance
        // (0.9 before 0.5), task 2 nothing. Room for two.
        let candidates = vec![
            (0, 10, (0.0, 0.5)),
            (1, 10, (0.01, 0.0)),
            (2, 10, (0.0, 0.0)),
            (3, 10, (0.0, 0.9)),
        ];
        assert_eq!(take_by_gain(candidates.clone(), 25), vec![1, 3]);
        assert_eq!(take_by_gain(candidates, 100), vec![1, 3, 0]);
    }

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
        assert_eq!(tvq, vec![40.5, 17.0, 13.5, 12.0, 11.0, 7.5, 6.875]);
        assert_eq!(
            residual_storage_name(TVQ_STORAGE_LADDER[3]),
            "base q8, residuals q3".to_string()
        );
    }
}
