//! Calibration: choose each task's setting by how well it reproduces the original task model.
//!
//! Data-free defaults (one λ, one scale mode for every task) leave accuracy on the table: tasks
//! differ in how much their task vectors interfere. Given *unlabeled* inputs per task,
//! [`compile_calibrated`] runs the original fine-tuned model and candidate reconstructions
//! with tract and keeps, per task, the candidate that agrees best with the original: the highest
//! top-1 agreement, then the lowest logit distance (root mean square difference of the outputs),
//! then the earliest candidate. No labels are needed.
//!
//! Candidates are measured on real bundles through the runtime [`Engine`], exactly as an app
//! would run them: each round compiles a bundle with one setting per task into a scratch file
//! next to the output, runs every calibrated task on its inputs, and removes it.
//! 1. **λ round** (TALL only): one bundle per λ of the grid, the default scale mode.
//! 2. **scale round**: at each task's best λ, one bundle per other scale mode of the grid.
//!
//! A task's reconstruction depends only on its own λ and scale mode (TALL's shared delta is
//! `α Σ τ`, whatever the λs; scale vectors are per task), so the final bundle, compiled with
//! every task's winner, reproduces exactly the outputs that were measured. Consensus is the
//! exception — its shared delta depends on every task's λ — so only scale modes are calibrated
//! there.
//!
//! Cost: the checkpoints are opened, checked and scanned once ([`Prepared`], which the final
//! bundle uses too); each round writes one bundle from them (the merge pass and the write) and
//! runs each calibrated task over its inputs, tasks in parallel threads; the reference model of
//! each task runs once.

use std::path::Path;
use std::time::Instant;

use tract_onnx::prelude::*;

use crate::compile::checkpoint::Checkpoint;
use crate::compile::error::CompileError;
use crate::compile::fitted::{self, LayerGrams};
use crate::compile::pipeline::{check_options, CompileOptions, Prepared, Progress};
use crate::compile::size_budget::take_by_gain;
use crate::encoding::Encoding;
use crate::format::{BundleWriter, CalibrationReport, CandidateScore, Method, ScaleMode};
use crate::onnx::TensorBytes;
use crate::runtime::{argmax, Bundle, Engine, EngineOptions, IoInfo};

/// What to calibrate on and over which settings.
#[derive(Debug, Clone)]
pub struct Calibration {
    /// Unlabeled inputs per task, as `(task name, named arrays)`; every array has the examples
    /// along its first axis. Arrays are matched to the graph's inputs by name (a single array
    /// feeds a single-input graph whatever its name) and converted to the input's element type.
    /// Tasks without inputs keep the options' setting.
    pub inputs: Vec<(String, Vec<(String, Tensor)>)>,
    /// The λ grid (TALL).
    pub lambdas: Vec<f32>,
    /// The scale modes to try.
    pub scales: Vec<ScaleMode>,
    /// Use at most this many examples per task (the first ones).
    pub max_examples: usize,
}

impl Calibration {
    /// The default grid: λ ∈ {0.2, 0.3, 0.4, 0.5, 0.6, 0.8}, every scale mode, 128 examples.
    pub fn new(inputs: Vec<(String, Vec<(String, Tensor)>)>) -> Calibration {
        Calibration {
            inputs,
            lambdas: vec![0.2, 0.3, 0.4, 0.5, 0.6, 0.8],
            scales: vec![ScaleMode::None, ScaleMode::Tensor, ScaleMode::Row],
            max_examples: 128,
        }
    }
}

/// Examples per run: enough to amortize a run, few enough to bound activation memory.
const CHUNK: usize = 32;

/// One task's setting.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Setting {
    lambda: Option<f32>,
    scale: ScaleMode,
}

impl std::fmt::Display for Setting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(l) = self.lambda {
            write!(f, "lambda {l}, ")?;
        }
        write!(f, "scale {}", self.scale)
    }
}

/// A calibrated task's inputs.
pub(crate) struct Inputs {
    /// Task index in the options.
    pub(crate) index: usize,
    pub(crate) name: String,
    /// Named arrays, cut to `examples` along the first axis.
    pub(crate) arrays: Vec<(String, Tensor)>,
    pub(crate) examples: usize,
}

/// A calibrated task: its inputs, the original model's outputs, and the candidates so far.
struct Task {
    set: Inputs,
    reference: Outputs,
    tried: Vec<(Setting, CandidateScore)>,
}

/// The first output of a model over all examples, as rows of the last axis.
pub(crate) struct Outputs {
    values: Vec<f32>,
    width: usize,
}

impl Outputs {
    fn new() -> Outputs {
        Outputs {
            values: Vec::new(),
            width: 0,
        }
    }

    /// Appends the first of one chunk's outputs.
    fn push_first(&mut self, task: &str, outputs: &[TValue]) -> Result<(), CompileError> {
        let err = tract(task);
        let first = outputs
            .first()
            .ok_or_else(|| CompileError::Calibration(format!("{task}: the model has no output")))?;
        let first = first.cast_to::<f32>().map_err(&err)?;
        let view = first.to_plain_array_view::<f32>().map_err(&err)?;
        self.width = view.shape().last().copied().unwrap_or(1);
        self.values.extend(view.iter().copied());
        Ok(())
    }
}

/// Compiles like [`crate::compile::compile`], choosing each calibrated task's λ and scale mode
/// by agreement with its original model (module docs). The report records every candidate's
/// agreement per task.
pub fn compile_calibrated(
    opts: &CompileOptions,
    calibration: &Calibration,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Bundle, CompileError> {
    let started = Instant::now();
    check_options(opts)?;
    check_calibratable(opts)?;
    let prepared = Prepared::open(opts, progress)?;
    calibrated(opts, &prepared, calibration, started, progress)
}

/// Refuses to calibrate what has nothing to choose: `tvq` calibrates the row scales of its
/// block-quantized residuals ([`fitted`]), so its residuals must be block-quantized.
pub(crate) fn check_calibratable(opts: &CompileOptions) -> Result<(), CompileError> {
    if opts.params.method == Method::Tvq && !opts.residual_dtype.is_some_and(|e| e.is_quantized()) {
        return Err(CompileError::Options(
            "--calib with tvq fits the row scales of block-quantized residuals: give \
             --residual-dtype q8, q4, q3, q2 or ternary"
                .into(),
        ));
    }
    Ok(())
}

/// One candidate of [`calibrated_tvq`]: a residual storage, with or without fitted row scales.
struct TvqCandidate {
    /// At the upgrade's storage (else at the options' own).
    upgraded: bool,
    /// With the row scales fitted to the layer outputs.
    fitted: bool,
    /// The residual storage.
    residual: Option<Encoding>,
    /// The setting's name in the report.
    label: String,
}

/// A size budget's offer to [`calibrated_tvq`]: the residual storage of the rung before the
/// one that fits, the extra bytes it costs each task, and the room the budget leaves.
#[derive(Debug, Clone)]
pub(crate) struct Upgrade {
    /// The more faithful residual storage.
    pub(crate) residual: Encoding,
    /// Per task, the bytes it adds.
    pub(crate) extra_bytes: Vec<u64>,
    /// Bytes the budget leaves over the bundle at `opts`' own storage, uncalibrated.
    pub(crate) room: u64,
    /// The budget.
    pub(crate) max_bytes: u64,
}

/// `--calib` with tvq: per task, its residuals as quantized, or with row scales fitted to its
/// layer outputs ([`fitted`]), whichever agrees better with the original model on the task's
/// calibration inputs (the same scoring as the λ and scale rounds). With an [`Upgrade`], each
/// task is also scored at the upgrade's residual storage, and the tasks whose best agreement
/// (then logit distance) gains the most per byte get it while the bundle fits; returns the
/// bundle and those tasks, in the order taken.
pub(crate) fn calibrated_tvq(
    opts: &CompileOptions,
    prepared: &Prepared,
    calibration: &Calibration,
    upgrade: Option<&Upgrade>,
    (started, progress): (Instant, &mut dyn FnMut(Progress<'_>)),
) -> Result<(Bundle, Vec<usize>), CompileError> {
    let n = opts.tasks.len();
    // One run of each original: its outputs (the reference) and the Gram matrices.
    let (tasks, measured) = prepare(opts, calibration, progress, |set| {
        let ckpt = prepared
            .task(set.index)
            .ok_or_else(|| CompileError::Calibration(format!("{}: no such task", set.name)))?;
        fitted::measure(ckpt, task_path(opts, set), opts.graph.as_deref(), set)
    })?;
    let mut grams = LayerGrams {
        tasks: vec![Default::default(); n],
    };
    for (t, g) in tasks.iter().zip(measured) {
        if let Some(slot) = grams.tasks.get_mut(t.set.index) {
            *slot = g;
        }
    }
    let plain = LayerGrams::default();
    // The candidates: at `opts`' own residual storage, then (with an upgrade) at the upgrade's;
    // each plain, then fitted.
    let storages = std::iter::once(false).chain(upgrade.map(|_| true));
    let candidates: Vec<TvqCandidate> = storages
        .flat_map(|upgraded| {
            let residual = match upgrade {
                Some(u) if upgraded => Some(u.residual),
                _ => opts.residual_dtype,
            };
            [
                (false, "residuals as quantized"),
                (true, "residual row scales fitted to layer outputs"),
            ]
            .map(|(fitted, label)| TvqCandidate {
                upgraded,
                fitted,
                residual,
                label: match (upgrade, residual) {
                    (Some(_), Some(e)) => format!("{e} {label}"),
                    _ => label.to_string(),
                },
            })
        })
        .collect();
    progress(Progress::Pass {
        name: "calibrating",
        total: (candidates.len() * tasks.len()) as u64,
    });
    // Per task, the score of every candidate, in the order of `candidates`.
    let mut tried: Vec<Vec<CandidateScore>> = vec![Vec::new(); tasks.len()];
    for c in &candidates {
        let round = CompileOptions {
            residual_dtype: c.residual,
            ..opts.clone()
        };
        let g = if c.fitted { &grams } else { &plain };
        let (engine, _round) = round_engine(opts, prepared, round, g)?;
        let scores = parallel_map(&tasks, |t| score(&engine, t))?;
        for ((t, mut score), slot) in tasks.iter().zip(scores).zip(&mut tried) {
            score.setting.clone_from(&c.label);
            log::info!(
                "{}: {}: agreement {:.4}, logit distance {:.4}",
                t.set.name,
                c.label,
                score.agreement,
                score.logit_distance
            );
            progress(Progress::Step(&t.set.name));
            slot.push(score);
        }
    }
    // The index of a task's best candidate at its own storage or at the upgrade's.
    let best_at = |tried: &[CandidateScore], upgraded: bool| -> Option<usize> {
        let at: Vec<(usize, CandidateScore)> = tried
            .iter()
            .enumerate()
            .filter(|(i, _)| candidates.get(*i).is_some_and(|c| c.upgraded == upgraded))
            .map(|(i, s)| (i, s.clone()))
            .collect();
        best(&at).and_then(|i| at.get(i)).map(|(i, _)| *i)
    };
    // With an upgrade: agreement gained, then logit distance lost, by each task's best
    // candidate at the upgrade's storage over its best at `opts`' own.
    let mut taken = match upgrade {
        Some(u) => {
            let gains = tasks
                .iter()
                .zip(&tried)
                .filter_map(|(t, tried)| {
                    let score = |upgraded| {
                        let s = tried.get(best_at(tried, upgraded)?)?;
                        Some((s.agreement, s.logit_distance))
                    };
                    let (lower, upper) = (score(false)?, score(true)?);
                    let cost = *u.extra_bytes.get(t.set.index)?;
                    Some((t.set.index, cost, (upper.0 - lower.0, lower.1 - upper.1)))
                })
                .collect();
            take_by_gain(gains, u.room)
        }
        None => Vec::new(),
    };
    loop {
        let mut chosen = LayerGrams {
            tasks: vec![Default::default(); n],
        };
        let mut reports = vec![None; n];
        for (t, tried) in tasks.iter().zip(&tried) {
            let pick = best_at(tried, taken.contains(&t.set.index)).unwrap_or(0);
            if let (true, Some(slot), Some(g)) = (
                candidates.get(pick).is_some_and(|c| c.fitted),
                chosen.tasks.get_mut(t.set.index),
                grams.tasks.get(t.set.index),
            ) {
                slot.clone_from(g);
            }
            if let Some(slot) = reports.get_mut(t.set.index) {
                *slot = Some(CalibrationReport {
                    examples: t.set.examples as u64,
                    candidates: tried.clone(),
                    chosen: pick as u64,
                });
            }
        }
        let final_opts = match upgrade {
            Some(u) => opts.with_upgrades(u.residual, &taken),
            None => opts.clone(),
        };
        let writer = BundleWriter::create(&opts.output)?;
        let bundle =
            prepared.write_fitted(&final_opts, writer, (reports, &chosen), started, progress)?;
        let over = upgrade.is_some_and(|u| bundle.bytes().len() as u64 > u.max_bytes);
        // The report's own bytes are not in the room: give the last upgrade back if it shows.
        if over && taken.pop().is_some() {
            continue;
        }
        return Ok((bundle, taken));
    }
}

/// [`compile_calibrated`] from checkpoints already opened (the size budget's final compile).
/// (About 85 lines: the two rounds of the module docs, in order.)
pub(crate) fn calibrated(
    opts: &CompileOptions,
    prepared: &Prepared,
    calibration: &Calibration,
    started: Instant,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Bundle, CompileError> {
    if opts.params.method == Method::Tvq {
        return calibrated_tvq(opts, prepared, calibration, None, (started, progress))
            .map(|(bundle, _)| bundle);
    }
    let n = opts.tasks.len();
    let has_lambda = opts.params.method == Method::Tall;
    let mut opts = opts.clone();
    if let [l] = opts.params.lambda[..] {
        // One λ for every task: spread it, so that each task can get its own.
        opts.params.lambda = vec![l; n];
    }
    let defaults: Vec<Setting> = (0..n)
        .map(|t| Setting {
            lambda: has_lambda
                .then(|| opts.params.lambda.get(t).copied())
                .flatten(),
            scale: opts.scale.get(t).copied().unwrap_or_default(),
        })
        .collect();
    let (mut tasks, _) = prepare(&opts, calibration, progress, |set| {
        let path = task_path(&opts, set);
        Ok((
            run_original(path, opts.graph.as_deref(), set, &[], |_, _| Ok(()))?,
            (),
        ))
    })?;

    let lambda_rounds = if has_lambda {
        calibration.lambdas.len()
    } else {
        1
    };
    let total = (lambda_rounds + calibration.scales.len()) * tasks.len();
    progress(Progress::Pass {
        name: "calibrating",
        total: total as u64,
    });
    // λ round (or the defaults, for methods without a per-task λ).
    if has_lambda {
        for &l in &calibration.lambdas {
            let settings: Vec<Setting> = defaults
                .iter()
                .map(|d| Setting {
                    lambda: Some(l),
                    ..*d
                })
                .collect();
            evaluate(&opts, prepared, &settings, &mut tasks, progress)?;
        }
    } else {
        evaluate(&opts, prepared, &defaults, &mut tasks, progress)?;
    }
    // Scale round: every mode at each task's best λ, unless already measured.
    let at_best = winners(&tasks, &defaults);
    for &mode in &calibration.scales {
        let settings: Vec<Setting> = at_best
            .iter()
            .map(|s| Setting { scale: mode, ..*s })
            .collect();
        evaluate(&opts, prepared, &settings, &mut tasks, progress)?;
    }

    // The final bundle, with every task's winner.
    let chosen = winners(&tasks, &defaults);
    for (t, s) in chosen.iter().enumerate() {
        if let (Some(l), Some(slot)) = (s.lambda, opts.params.lambda.get_mut(t)) {
            *slot = l;
        }
        if let Some(slot) = opts.scale.get_mut(t) {
            *slot = s.scale;
        }
    }
    let mut reports = vec![None; n];
    for c in &tasks {
        let chosen = best(&c.tried).unwrap_or(0);
        if let Some((setting, _)) = c.tried.get(chosen) {
            log::info!("{}: calibrated to {setting}", c.set.name);
        }
        if let Some(slot) = reports.get_mut(c.set.index) {
            *slot = Some(CalibrationReport {
                examples: c.set.examples as u64,
                candidates: c.tried.iter().map(|(_, s)| s.clone()).collect(),
                chosen: chosen as u64,
            });
        }
    }
    let writer = BundleWriter::create(&opts.output)?;
    prepared.write(&opts, writer, reports, started, progress)
}

/// Every task's best setting so far (its default if it is not calibrated).
fn winners(tasks: &[Task], defaults: &[Setting]) -> Vec<Setting> {
    let mut out = defaults.to_vec();
    for c in tasks {
        let won = best(&c.tried).and_then(|i| c.tried.get(i)).map(|(s, _)| *s);
        if let (Some(won), Some(slot)) = (won, out.get_mut(c.set.index)) {
            *slot = won;
        }
    }
    out
}

/// Index of the best candidate: highest agreement, then lowest distance, then earliest.
fn best(tried: &[(impl Sized, CandidateScore)]) -> Option<usize> {
    let mut best: Option<(usize, &CandidateScore)> = None;
    for (i, (_, s)) in tried.iter().enumerate() {
        let better = match best {
            None => true,
            Some((_, b)) => {
                s.agreement > b.agreement
                    || (s.agreement == b.agreement && s.logit_distance < b.logit_distance)
            }
        };
        if better {
            best = Some((i, s));
        }
    }
    best.map(|(i, _)| i)
}

/// Checks the calibration inputs and runs every calibrated task's original model on them
/// (`measure`: its reference outputs and whatever else the caller measures on the same run,
/// returned beside the tasks in the same order).
fn prepare<X: Send>(
    opts: &CompileOptions,
    calibration: &Calibration,
    progress: &mut dyn FnMut(Progress<'_>),
    measure: impl Fn(&Inputs) -> Result<(Outputs, X), CompileError> + Sync,
) -> Result<(Vec<Task>, Vec<X>), CompileError> {
    let sets = input_sets(opts, calibration)?;
    progress(Progress::Pass {
        name: "references",
        total: sets.len() as u64,
    });
    let measured = parallel_map(&sets, &measure)?;
    let mut tasks = Vec::with_capacity(sets.len());
    let mut extra = Vec::with_capacity(sets.len());
    for (set, (reference, x)) in sets.into_iter().zip(measured) {
        progress(Progress::Step(&set.name));
        tasks.push(Task {
            set,
            reference,
            tried: Vec::new(),
        });
        extra.push(x);
    }
    Ok((tasks, extra))
}

/// The checkpoint path of a calibrated task.
fn task_path<'a>(opts: &'a CompileOptions, set: &Inputs) -> &'a Path {
    opts.tasks
        .get(set.index)
        .map(|(_, p)| p.as_path())
        .unwrap_or(Path::new(""))
}

/// Every task's calibration inputs, checked (a task of the options, given once, arrays with the
/// same number of examples) and cut to `calibration.max_examples`, before any model runs.
fn input_sets(
    opts: &CompileOptions,
    calibration: &Calibration,
) -> Result<Vec<Inputs>, CompileError> {
    if calibration.max_examples == 0 {
        return Err(CompileError::Calibration(
            "the number of calibration examples must be at least 1".into(),
        ));
    }
    // Every set is checked before the first (slow) model run.
    let mut sets: Vec<Inputs> = Vec::with_capacity(calibration.inputs.len());
    for (name, arrays) in &calibration.inputs {
        let Some(index) = opts.tasks.iter().position(|(n, _)| n == name) else {
            return Err(CompileError::Calibration(format!(
                "calibration inputs for {name:?}, which is not a task"
            )));
        };
        if sets.iter().any(|t| t.index == index) {
            return Err(CompileError::Calibration(format!(
                "calibration inputs for {name:?} are given twice"
            )));
        }
        let examples = examples(name, arrays)?.min(calibration.max_examples);
        let arrays = arrays
            .iter()
            .map(|(n, a)| Ok((n.clone(), a.slice(0, 0, examples).map_err(tract(name))?)))
            .collect::<Result<Vec<_>, CompileError>>()?;
        sets.push(Inputs {
            index,
            name: name.clone(),
            arrays,
            examples,
        });
    }
    Ok(sets)
}

/// `f` of every item on up to as many scoped threads as the machine has cores (item `i` on
/// worker `i % workers`), in item order; the first error in item order is the result. A
/// panicking worker is an error, not an abort.
fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    f: impl Fn(&T) -> Result<R, CompileError> + Sync,
) -> Result<Vec<R>, CompileError> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, items.len().max(1));
    let mut done: Vec<(usize, Result<R, CompileError>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let f = &f;
                s.spawn(move || {
                    items
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| i % workers == w)
                        .map(|(i, item)| (i, f(item)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(items.len());
        for h in handles {
            match h.join() {
                Ok(v) => all.extend(v),
                Err(_) => all.push((
                    usize::MAX,
                    Err(CompileError::Calibration(
                        "a calibration thread panicked".into(),
                    )),
                )),
            }
        }
        all
    });
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, r)| r).collect()
}

/// Number of examples (first axis) shared by all of a task's arrays.
fn examples(task: &str, arrays: &[(String, Tensor)]) -> Result<usize, CompileError> {
    let mut n = None;
    for (name, a) in arrays {
        let Some(&rows) = a.shape().first() else {
            return Err(CompileError::Calibration(format!(
                "{task}: array {name:?} is a scalar; calibration arrays have the examples on \
                 their first axis"
            )));
        };
        if n.is_some_and(|n| n != rows) {
            return Err(CompileError::Calibration(format!(
                "{task}: arrays have different numbers of examples ({} and {rows})",
                n.unwrap_or(0)
            )));
        }
        n = Some(rows);
    }
    match n {
        Some(n) if n > 0 => Ok(n),
        _ => Err(CompileError::Calibration(format!(
            "{task}: no calibration examples"
        ))),
    }
}

pub(crate) fn tract(task: &str) -> impl Fn(TractError) -> CompileError + '_ {
    move |e| CompileError::Calibration(format!("{task}: {e:#}"))
}

/// The original task model on the task's inputs, with plain tract: its first output over all
/// examples. The values named in `extra` (outlet labels, or graph inputs) become outputs too,
/// handed to `on_extra` chunk by chunk with the chunk's example range. An ONNX checkpoint is
/// loaded as it is; safetensors weights are first put into the graph (`--graph`).
pub(crate) fn run_original(
    path: &Path,
    graph: Option<&Path>,
    set: &Inputs,
    extra: &[String],
    mut on_extra: impl FnMut(&[TValue], std::ops::Range<usize>) -> Result<(), CompileError>,
) -> Result<Outputs, CompileError> {
    let err = tract(&set.name);
    let onnx = tract_onnx::onnx();
    let mut model = match graph {
        None => onnx.model_for_path(path).map_err(&err)?,
        Some(_) => onnx
            .model_for_read(&mut &with_weights(path, graph, &set.name)?[..])
            .map_err(&err)?,
    };
    let own = model.output_outlets().map_err(&err)?.len();
    if !extra.is_empty() {
        let mut outlets = model.output_outlets().map_err(&err)?.to_vec();
        for a in extra {
            // A value is an outlet label, a graph input the name of its source node.
            let input = || model.node_by_name(a).ok().map(|n| OutletId::new(n.id, 0));
            outlets.push(model.find_outlet_label(a).or_else(input).ok_or_else(|| {
                CompileError::Calibration(format!("{}: no value {a:?} in the graph", set.name))
            })?);
        }
        model.select_output_outlets(&outlets).map_err(&err)?;
    }
    let model = model
        .into_optimized()
        .map_err(&err)?
        .into_runnable()
        .map_err(&err)?;
    let facts: Vec<IoInfo> = model
        .model()
        .input_outlets()
        .map_err(&err)?
        .iter()
        .map(|&o| {
            let name = model.model().node(o.node).name.clone();
            Ok(IoInfo::from_fact(name, model.model().outlet_fact(o)?))
        })
        .collect::<TractResult<_>>()
        .map_err(&err)?;
    let mut out = Outputs::new();
    for_each_chunk(set, &facts, |inputs, range| {
        let outputs = model.run(inputs).map_err(&err)?;
        out.push_first(&set.name, &outputs)?;
        on_extra(outputs.get(own..).unwrap_or_default(), range)
    })?;
    Ok(out)
}

/// A standalone ONNX model of a checkpoint whose weights live outside its graph.
fn with_weights(path: &Path, graph: Option<&Path>, task: &str) -> Result<Vec<u8>, CompileError> {
    let ckpt = Checkpoint::open(path, graph)?;
    let mut weights = Vec::with_capacity(ckpt.tensors().len());
    for info in ckpt.tensors() {
        let mut data = Vec::new();
        info.dtype.encode(&ckpt.read_f32(&info.name)?, &mut data);
        weights.push(TensorBytes {
            name: info.name.clone(),
            dtype: info.dtype,
            shape: info.shape.clone(),
            data,
        });
    }
    crate::onnx::restore_initializers(ckpt.stripped_graph(), weights).map_err(|source| {
        CompileError::Export {
            task: task.to_string(),
            source,
        }
    })
}

/// One candidate: `round` (the options with the candidate's settings, and `grams`' fitted
/// scales) written into a scratch bundle next to the output, and an engine on it. The scratch
/// file goes when the returned [`RoundBundle`] is dropped.
fn round_engine(
    opts: &CompileOptions,
    prepared: &Prepared,
    mut round: CompileOptions,
    grams: &LayerGrams,
) -> Result<(Engine, RoundBundle), CompileError> {
    let round_bundle = RoundBundle::new(&opts.output, "calibrating")?;
    round.output = round_bundle.path().to_path_buf();
    round.tokenizer = None;
    let bundle = std::sync::Arc::new(prepared.write_fitted(
        &round,
        BundleWriter::create(round_bundle.path())?,
        (vec![None; opts.tasks.len()], grams),
        Instant::now(),
        &mut |_| {},
    )?);
    Ok((Engine::new(bundle, EngineOptions::default())?, round_bundle))
}

/// Compiles a bundle with `settings` into the round's bundle file and scores every calibrated
/// task that has not been scored with its setting yet. (About 85 lines: the compile, then
/// the tasks scored on worker threads, joined in task order.)
fn evaluate(
    opts: &CompileOptions,
    prepared: &Prepared,
    settings: &[Setting],
    tasks: &mut [Task],
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<(), CompileError> {
    let setting_of = |t: &Task| settings.get(t.set.index).copied();
    let todo: Vec<bool> = tasks
        .iter()
        .map(|t| setting_of(t).is_some_and(|s| !t.tried.iter().any(|(x, _)| *x == s)))
        .collect();
    if !todo.contains(&true) {
        return Ok(());
    }
    let started = Instant::now();
    let mut round = opts.clone();
    for (t, s) in settings.iter().enumerate() {
        if let (Some(l), Some(slot)) = (s.lambda, round.params.lambda.get_mut(t)) {
            *slot = l;
        }
        if let Some(slot) = round.scale.get_mut(t) {
            *slot = s.scale;
        }
    }
    let (engine, _round) = round_engine(opts, prepared, round, &LayerGrams::default())?;
    let written = started.elapsed();
    let pending: Vec<(usize, &Task)> = tasks
        .iter()
        .enumerate()
        .filter(|(i, _)| todo.get(*i) == Some(&true))
        .collect();
    let scores = parallel_map(&pending, |&(i, t)| Ok((i, score(&engine, t)?)))?;
    log::info!(
        "calibration round: bundle written in {:.2} s, {} tasks scored in {:.2} s",
        written.as_secs_f64(),
        todo.iter().filter(|&&t| t).count(),
        (started.elapsed() - written).as_secs_f64(),
    );
    for (i, mut score) in scores {
        let Some(t) = tasks.get_mut(i) else { continue };
        let Some(setting) = setting_of(t) else {
            continue;
        };
        score.setting = setting.to_string();
        log::info!(
            "{}: {setting}: agreement {:.4}, logit distance {:.4}",
            t.set.name,
            score.agreement,
            score.logit_distance
        );
        progress(Progress::Step(&t.set.name));
        t.tried.push((setting, score));
    }
    Ok(())
}

/// Agreement and logit distance of the engine's task against the original on the task's inputs.
fn score(engine: &Engine, task: &Task) -> Result<CandidateScore, CompileError> {
    let set = &task.set;
    let facts = engine.input_facts(set.index)?;
    let outputs = run_chunks(set, &facts, |inputs| {
        Ok(engine.run(set.index, inputs)?.into_iter().collect())
    })?;
    compare(&set.name, &task.reference, &outputs)
}

/// Top-1 agreement and RMS distance of `candidate` against `reference`.
fn compare(
    task: &str,
    reference: &Outputs,
    candidate: &Outputs,
) -> Result<CandidateScore, CompileError> {
    if reference.width != candidate.width || reference.values.len() != candidate.values.len() {
        return Err(CompileError::Calibration(format!(
            "{task}: the candidate's output ({} values, rows of {}) does not match the \
             original's ({} values, rows of {})",
            candidate.values.len(),
            candidate.width,
            reference.values.len(),
            reference.width
        )));
    }
    let width = reference.width.max(1);
    let rows = reference
        .values
        .chunks(width)
        .zip(candidate.values.chunks(width));
    let (mut agree, mut n) = (0usize, 0usize);
    for (r, c) in rows {
        n += 1;
        if argmax(r) == argmax(c) {
            agree += 1;
        }
    }
    let sq: f64 = reference
        .values
        .iter()
        .zip(&candidate.values)
        .map(|(&a, &b)| {
            let d = f64::from(a) - f64::from(b);
            d * d
        })
        .sum();
    let count = reference.values.len().max(1) as f64;
    Ok(CandidateScore {
        setting: String::new(),
        agreement: if n == 0 { 0.0 } else { agree as f64 / n as f64 },
        logit_distance: (sq / count).sqrt(),
    })
}

/// The first output of the model `run` runs over all of a task's examples, in chunks
/// ([`for_each_chunk`]).
fn run_chunks(
    task: &Inputs,
    facts: &[IoInfo],
    mut run: impl FnMut(TVec<TValue>) -> Result<Vec<TValue>, CompileError>,
) -> Result<Outputs, CompileError> {
    let mut out = Outputs::new();
    for_each_chunk(task, facts, |inputs, _| {
        out.push_first(&task.name, &run(inputs)?)
    })?;
    Ok(out)
}

/// Calls `f` with the graph inputs (in `facts` order, converted to their types) of successive
/// chunks of a task's examples, and the chunk's example range. A graph with a fixed batch size
/// gets chunks of exactly that size (a remainder is left out); otherwise chunks of up to
/// [`CHUNK`] examples.
fn for_each_chunk(
    task: &Inputs,
    facts: &[IoInfo],
    mut f: impl FnMut(TVec<TValue>, std::ops::Range<usize>) -> Result<(), CompileError>,
) -> Result<(), CompileError> {
    let err = tract(&task.name);
    // Arrays in graph input order, converted to the input's type.
    let mut arrays = Vec::with_capacity(facts.len());
    for fact in facts {
        let array = match task.arrays.iter().find(|(n, _)| *n == fact.name) {
            Some((_, a)) => a,
            None => match (facts, task.arrays.as_slice()) {
                ([_], [(_, only)]) => only,
                _ => {
                    return Err(CompileError::Calibration(format!(
                        "{}: no calibration array for graph input {:?} (given: {})",
                        task.name,
                        fact.name,
                        task.arrays
                            .iter()
                            .map(|(n, _)| n.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )))
                }
            },
        };
        arrays.push(array.cast_to_dt(fact.dtype).map_err(&err)?.into_owned());
    }
    let (batch, exact) = match facts
        .iter()
        .find_map(|f| f.shape.first().copied().flatten())
    {
        Some(b) => (b.max(1), true),
        None => (CHUNK, false),
    };
    if exact && task.examples < batch {
        return Err(CompileError::Calibration(format!(
            "{}: fewer calibration examples ({}) than the graph's fixed batch size ({batch})",
            task.name, task.examples
        )));
    }
    let end_all = if exact {
        task.examples - task.examples % batch
    } else {
        task.examples
    };
    for start in (0..end_all).step_by(batch) {
        let end = (start + batch).min(end_all);
        let inputs = arrays
            .iter()
            .map(|a| a.slice(0, start, end).map(TValue::from))
            .collect::<TractResult<TVec<TValue>>>()
            .map_err(&err)?;
        f(inputs, start..end)?;
    }
    Ok(())
}

/// The path of a scratch bundle (a calibration round's, a size budget's candidate), next to the
/// output, removed when dropped (or by [`crate::files::remove_temporary_files`] when the
/// process is terminated).
pub(crate) struct RoundBundle(crate::files::TempPath);

impl RoundBundle {
    /// `.{output name}.{purpose}.{pid}` next to `output`.
    pub(crate) fn new(output: &Path, purpose: &str) -> Result<RoundBundle, CompileError> {
        let name = output
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "bundle".into());
        let path = output.with_file_name(format!(".{name}.{purpose}.{}", std::process::id()));
        Ok(RoundBundle(crate::files::TempPath::register(path)?))
    }

    /// The scratch path.
    pub(crate) fn path(&self) -> &Path {
        self.0.path()
    }

    /// Moves the scratch bundle to `dest` (rename, then a sync of the folder).
    pub(crate) fn persist_to(self, dest: &Path) -> Result<(), CompileError> {
        Ok(self.0.persist_to(dest)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(agreement: f64, logit_distance: f64) -> ((), CandidateScore) {
        (
            (),
            CandidateScore {
                setting: String::new(),
                agreement,
                logit_distance,
            },
        )
    }

    #[test]
    fn best_is_agreement_then_distance_then_first() {
        assert_eq!(best(&[] as &[((), CandidateScore)]), None);
        // Higher agreement wins over a smaller distance.
        assert_eq!(best(&[s(0.90, 0.1), s(0.95, 0.9), s(0.93, 0.0)]), Some(1));
        // Equal agreement: the smaller distance.
        assert_eq!(best(&[s(0.95, 0.5), s(0.95, 0.2), s(0.95, 0.3)]), Some(1));
        // A full tie: the earliest.
        assert_eq!(best(&[s(0.5, 0.2), s(0.5, 0.2)]), Some(0));
    }

    #[test]
    fn parallel_map_keeps_item_order_and_reports_the_first_error() {
        let items: Vec<u32> = (0..9).collect();
        let squares = parallel_map(&items, |&x| Ok(x * x)).unwrap();
        assert_eq!(squares, vec![0, 1, 4, 9, 16, 25, 36, 49, 64]);
        let failing = parallel_map(&items, |&x| {
            if x % 4 == 3 {
                Err(CompileError::Calibration(format!("item {x}")))
            } else {
                Ok(x)
            }
        });
        assert!(matches!(failing, Err(CompileError::Calibration(m)) if m == "item 3"));
        let panicking = parallel_map(&items, |&x| if x == 5 { panic!("boom") } else { Ok(x) });
        assert!(matches!(panicking, Err(CompileError::Calibration(m)) if m.contains("panicked")));
    }

    #[test]
    fn compare_counts_top1_matches_and_rms() {
        // Rows of 2: argmax 1,0,1 vs 1,1,1 → 2/3; squared differences 0,0,1,1,0,0 → rms √(2/6).
        let r = Outputs {
            values: vec![0.0, 1.0, 1.0, 0.0, 0.0, 1.0],
            width: 2,
        };
        let c = Outputs {
            values: vec![0.0, 1.0, 0.0, 1.0, 0.0, 1.0],
            width: 2,
        };
        let score = compare("t", &r, &c).unwrap();
        assert!((score.agreement - 2.0 / 3.0).abs() < 1e-12);
        assert!((score.logit_distance - (2.0f64 / 6.0).sqrt()).abs() < 1e-12);
        let short = Outputs {
            values: vec![0.0, 1.0],
            width: 2,
        };
        assert!(matches!(
            compare("t", &r, &short),
            Err(CompileError::Calibration(_))
        ));
    }
}
