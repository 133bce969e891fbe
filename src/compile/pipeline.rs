//! The compile pipeline: checkpoints in, one bundle out.
//!
//! ```text
//! open & align checkpoints ─► pass 1: per-tensor statistics (NaN/Inf, relative change)
//!   ─► decide private tensors ─► pass 2: per tensor, τ_t = θ_t − θ_0 ─► merge ─► scale
//!   ─► stream sections to the writer ─► manifest + report ─► atomic rename
//! ```
//! Both passes stream one tensor at a time across all checkpoints (memory-mapped), so peak memory
//! is bounded by the largest tensor times the number of tasks, not by N whole models.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Instant;

use regex::Regex;

use crate::compile::checkpoint::Checkpoint;
use crate::compile::error::CompileError;
use crate::compile::fidelity::Fidelity;
use crate::compile::fitted::{self, Gram, LayerGrams, Product};
use crate::dtype::DType;
use crate::encoding::Encoding;
use crate::format::manifest::{
    CalibrationReport, CompileReport, GraphEntry, InputRecord, Manifest, Provenance, Scale,
    SectionKind, Stored, TaskEntry, TaskReport, TaskTensor, TensorEntry, TensorStorage,
};
use crate::format::{BundleWriter, MergeParams, Method, ScaleMode};
use crate::merge::{scaling, Merger, TensorView};
use crate::onnx::InitializerInfo;
use crate::runtime::Bundle;

/// Everything `taskpack compile` needs.
#[derive(Debug, Clone)]
pub struct CompileOptions {
    /// The base checkpoint `θ_0`.
    pub base: PathBuf,
    /// The task checkpoints, `(name, path)`, in bundle order.
    pub tasks: Vec<(String, PathBuf)>,
    /// ONNX graph for safetensors checkpoints.
    pub graph: Option<PathBuf>,
    /// Method and hyper-parameters (`lambda` has one entry per task).
    pub params: MergeParams,
    /// Scaling vectors on top of the method, one mode per task.
    pub scale: Vec<ScaleMode>,
    /// Tensors matching this pattern are stored privately per task.
    pub private: Option<Regex>,
    /// Merged tensors matching this pattern get the merged delta without a per-task mask (and
    /// with the identity of the task's scale mode): the same weights for every task, which the
    /// runtime binds once per graph instead of at every switch — where the method gives every
    /// task the same global scale (all but EMR).
    pub shared: Option<Regex>,
    /// Storage of the merged delta. A block-quantized one (`q8`, `q4`) applies to large tensors
    /// only (as for `base_dtype`); other tensors store their delta as `f16`.
    pub delta_dtype: Encoding,
    /// Storage of each task's own residual over the merged reconstruction (`None`: no residual;
    /// `--method tvq` needs one). As for `delta_dtype`, a block-quantized encoding applies to
    /// large tensors only; the rest store their residual as `f16`.
    pub residual_dtype: Option<Encoding>,
    /// Per-tensor residual storage: the first pattern matching a tensor's name gives its
    /// residual storage instead of `residual_dtype` (e.g. `word_embeddings` → `q2` next to `q3`
    /// elsewhere). Same size rule: block codes for large tensors, `f16` for the rest.
    pub residual_for: Vec<(Regex, Encoding)>,
    /// Per-task residual storage: entry `t`, if given, replaces `residual_dtype` for task `t`
    /// (`residual_for` still comes first). Empty by default; a size budget
    /// (`compile_within`) sets it when it gives some tasks a more faithful residual than others.
    pub residual_per_task: Vec<Option<Encoding>>,
    /// Storage of the base weights of merged tensors (`None`: each tensor's own type). Only
    /// tensors of rank ≥ 2 with at least 4096 elements take it; biases, normalization weights
    /// and other small tensors keep their own type.
    pub base_dtype: Option<Encoding>,
    /// Keep tensors whose relative change dwarfs the rest of the model (fresh heads) private.
    pub auto_private: bool,
    /// Output bundle path.
    pub output: PathBuf,
    /// A Hugging Face `tokenizer.json` to carry in the bundle, so apps can run tasks on text.
    pub tokenizer: Option<Vec<u8>>,
    /// Label names per task (logit order), one list per task; an empty list means none.
    pub labels: Vec<Vec<String>>,
}

impl CompileOptions {
    /// Options with the defaults of `method` for `tasks`: no scaling, f16 delta, automatic
    /// private heads, no tokenizer or labels; for `tvq`, a `q8` base and `q3` residuals (what
    /// the benchmark supports, docs/METHODS.md), for the other methods the checkpoint's base
    /// and no residual.
    pub fn new(
        base: impl Into<PathBuf>,
        tasks: Vec<(String, PathBuf)>,
        method: Method,
        output: impl Into<PathBuf>,
    ) -> CompileOptions {
        let n = tasks.len();
        CompileOptions {
            base: base.into(),
            tasks,
            graph: None,
            params: MergeParams::defaults(method, n),
            scale: vec![ScaleMode::None; n],
            private: None,
            shared: None,
            delta_dtype: Encoding::F16,
            residual_dtype: (method == Method::Tvq).then_some(DEFAULT_TVQ_RESIDUAL),
            residual_for: Vec::new(),
            residual_per_task: Vec::new(),
            base_dtype: (method == Method::Tvq).then_some(Encoding::Q8),
            auto_private: true,
            output: output.into(),
            tokenizer: None,
            labels: vec![Vec::new(); n],
        }
    }

    /// These options with the tasks `taken` (indices) given `residual` storage, the others
    /// `residual_dtype` (a size budget's per-task choice).
    pub(crate) fn with_upgrades(&self, residual: Encoding, taken: &[usize]) -> CompileOptions {
        CompileOptions {
            residual_per_task: (0..self.tasks.len())
                .map(|t| {
                    if taken.contains(&t) {
                        Some(residual)
                    } else {
                        self.residual_dtype
                    }
                })
                .collect(),
            ..self.clone()
        }
    }

    /// The scale mode of task `t` (none if `scale` is short).
    fn scale_of(&self, t: usize) -> ScaleMode {
        self.scale.get(t).copied().unwrap_or(ScaleMode::None)
    }
}

/// The residual storage `--method tvq` gets when none is given (docs/METHODS.md, "Per-task
/// residuals").
pub(crate) const DEFAULT_TVQ_RESIDUAL: Encoding = Encoding::Q3;

/// Fewest elements a tensor needs for `CompileOptions::base_dtype` (and a block-quantized
/// `delta_dtype`) to apply to it.
pub(crate) const BASE_DTYPE_MIN_ELEMENTS: u64 = 4096;

/// Whether `info` is a matrix (or larger) of at least [`BASE_DTYPE_MIN_ELEMENTS`] elements:
/// where the bytes are. The rest — biases, LayerNorm and BatchNorm weights — are few bytes, and
/// a rounding there moves every activation of a channel.
fn is_large(info: &InitializerInfo) -> bool {
    info.shape.len() >= 2
        && crate::format::layout::numel(&info.shape).is_ok_and(|n| n >= BASE_DTYPE_MIN_ELEMENTS)
}

/// The storage of the base of a merged tensor: `base_dtype` for matrices and larger tensors of
/// at least [`BASE_DTYPE_MIN_ELEMENTS`] elements, the tensor's own type for the rest.
pub(crate) fn base_encoding_of(info: &InitializerInfo, base_dtype: Option<Encoding>) -> Encoding {
    match base_dtype {
        Some(encoding) if is_large(info) => encoding,
        _ => info.dtype.into(),
    }
}

/// The storage of the merged delta of a tensor: `delta_dtype`, except that a block-quantized one
/// applies to matrices of at least [`BASE_DTYPE_MIN_ELEMENTS`] elements only and the rest store
/// `f16`.
pub(crate) fn delta_encoding_of(info: &InitializerInfo, delta_dtype: Encoding) -> Encoding {
    if delta_dtype.is_quantized() && !is_large(info) {
        Encoding::F16
    } else {
        delta_dtype
    }
}

/// What the pipeline reports while it works; the CLI turns it into a progress bar.
#[derive(Debug, Clone)]
pub enum Progress<'a> {
    /// A pass over `total` tensors starts.
    Pass {
        /// Human-readable name of the pass.
        name: &'static str,
        /// Number of tensors it visits.
        total: u64,
    },
    /// One tensor of the current pass is done.
    Tensor(&'a str),
    /// One step of the current pass other than a tensor is done (e.g. a calibration run of a
    /// task).
    Step(&'a str),
}

/// Relative change ‖τ‖/‖θ_0‖ above which a tensor is a head candidate…
const HEAD_MIN_RELATIVE_CHANGE: f64 = 0.5;
/// …if it is also this many times the median relative change of the model.
const HEAD_MEDIAN_FACTOR: f64 = 10.0;

/// Why a tensor is stored privately per task.
#[derive(Debug, Clone, PartialEq)]
enum PrivateReason {
    Shape,
    Pattern,
    NormStatistics,
    Head(f64, f64),
}

impl std::fmt::Display for PrivateReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrivateReason::Shape => f.write_str("shape differs between tasks"),
            PrivateReason::Pattern => f.write_str("matches --private"),
            PrivateReason::NormStatistics => f.write_str("normalization statistics"),
            PrivateReason::Head(r, med) => write!(
                f,
                "relative change {r:.3} vs model median {med:.3} (likely a task head)"
            ),
        }
    }
}

/// Compiles the checkpoints into a bundle and returns it, opened (memory-mapped) and validated.
pub fn compile(
    opts: &CompileOptions,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Bundle, CompileError> {
    compile_with_reports(opts, vec![None; opts.tasks.len()], Instant::now(), progress)
}

/// [`compile`], recording each task's calibration (in task order) in the report, and the time
/// since `started` as the compile time: [`Prepared::open`], then [`Prepared::write`].
pub(crate) fn compile_with_reports(
    opts: &CompileOptions,
    calibration: Vec<Option<CalibrationReport>>,
    started: Instant,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Bundle, CompileError> {
    check_options(opts)?;
    // Fail on an unwritable output before any heavy work.
    let writer = BundleWriter::create(&opts.output)?;
    let prepared = Prepared::open(opts, progress)?;
    prepared.write(opts, writer, calibration, started, progress)
}

/// What every bundle compiled from the same checkpoints shares, whatever its merge parameters
/// and storage: the opened checkpoints, their aligned tensors (checked, every value read once)
/// and the tensors kept private. Calibration and the size budget open it once and write one
/// bundle per candidate setting from it ([`Prepared::write`]).
pub(crate) struct Prepared {
    base: Checkpoint,
    tasks: Vec<Checkpoint>,
    tensors: Vec<InitializerInfo>,
    private: BTreeMap<String, PrivateReason>,
}

impl Prepared {
    /// The steps that depend only on the inputs, in order: open and align the checkpoints,
    /// check every task's graph, pass 1 (scan: relative changes, NaN / Inf), decide what stays
    /// private. `opts` gives the inputs and the privacy options; its merge parameters, storage
    /// and output are [`Prepared::write`]'s.
    pub(crate) fn open(
        opts: &CompileOptions,
        progress: &mut dyn FnMut(Progress<'_>),
    ) -> Result<Prepared, CompileError> {
        let (base, tasks) = open_checkpoints(opts)?;
        let names: Vec<&str> = opts.tasks.iter().map(|(n, _)| n.as_str()).collect();
        let tensors = read_tensors(align(&base, &tasks, &names)?, &base, &tasks);
        // Refuse, before anything is written, a task whose bundle could not run.
        check_task_graphs(opts, &tasks, &tensors)?;
        let relative = relative_changes(&base, &tasks, &tensors, progress)?;
        let private = decide_private(opts, &base, &tasks, &tensors, &relative);
        for (name, why) in &private {
            log::info!("{name}: private ({why})");
        }
        Ok(Prepared {
            base,
            tasks,
            tensors,
            private,
        })
    }

    /// Task `t`'s checkpoint, as opened.
    pub(crate) fn task(&self, t: usize) -> Option<&Checkpoint> {
        self.tasks.get(t)
    }

    /// The task checkpoints, in task order.
    pub(crate) fn tasks(&self) -> &[Checkpoint] {
        &self.tasks
    }

    /// Writes the bundle of `opts` (the inputs [`Prepared::open`] was given; any merge
    /// parameters and storage) through `writer`, whatever its destination: the graphs, pass 2
    /// (merge and write), the manifest. Returns the bundle, opened.
    pub(crate) fn write(
        &self,
        opts: &CompileOptions,
        writer: BundleWriter,
        calibration: Vec<Option<CalibrationReport>>,
        started: Instant,
        progress: &mut dyn FnMut(Progress<'_>),
    ) -> Result<Bundle, CompileError> {
        let none = LayerGrams::default();
        self.write_fitted(opts, writer, (calibration, &none), started, progress)
    }

    /// [`Prepared::write`] with the residuals' row scales fitted to the layer outputs that
    /// `grams` measured (`--calib` with tvq, [`fitted`]).
    pub(crate) fn write_fitted(
        &self,
        opts: &CompileOptions,
        mut writer: BundleWriter,
        (calibration, grams): (Vec<Option<CalibrationReport>>, &LayerGrams),
        started: Instant,
        progress: &mut dyn FnMut(Progress<'_>),
    ) -> Result<Bundle, CompileError> {
        let Prepared {
            base,
            tasks,
            tensors,
            private,
        } = self;
        let (graphs, task_graph) = write_graphs(&mut writer, tasks)?;
        let mut merger = opts.params.merger(tasks.len())?;
        let merged = merge_tensors(
            (opts, grams),
            &mut writer,
            merger.as_mut(),
            (base, tasks),
            tensors,
            private,
            progress,
        )?;

        // With a scaling mode, the closed-form scales replace a method's global rescaler.
        let task_scales: Vec<f32> = merger
            .task_scales(tasks.len())
            .into_iter()
            .enumerate()
            .map(|(t, g)| {
                if opts.scale_of(t) == ScaleMode::None {
                    g
                } else {
                    1.0
                }
            })
            .collect();
        let tokenizer = match &opts.tokenizer {
            Some(bytes) => Some(writer.add_section(SectionKind::Tokenizer, bytes)?),
            None => None,
        };
        let inputs = input_records(opts, base, tasks);
        let report = CompileReport {
            inputs_bytes: inputs.iter().map(|i| i.bytes).sum(),
            tasks: task_reports(opts, &merged.fidelity, &task_scales, calibration),
            private: private
                .iter()
                .map(|(n, why)| format!("{n}: {why}"))
                .collect(),
            peak_memory_bytes: super::memory::peak_rss_bytes().unwrap_or(0),
            seconds: started.elapsed().as_secs_f64(),
        };
        let manifest = Manifest {
            graphs,
            tensors: merged.entries,
            sections: Vec::new(),
            tasks: task_entries(opts, merged.modules, &task_graph, &task_scales),
            tokenizer,
            merge: opts.params.clone(),
            provenance: Provenance {
                compiler: format!("taskpack {}", env!("CARGO_PKG_VERSION")),
                inputs,
            },
            report,
        };
        let dest = writer.dest().to_path_buf();
        writer.finish(manifest)?;
        Ok(Bundle::open(&dest)?)
    }
}

/// The checks that need no checkpoint: task names, one scale mode and label list per task (or
/// none), a tokenizer the runtime loads, and an output that is none of the given input paths
/// (the rename would destroy it).
pub(crate) fn check_options(opts: &CompileOptions) -> Result<(), CompileError> {
    check_task_names(&opts.tasks)?;
    let n_tasks = opts.tasks.len();
    check_per_task("scale", opts.scale.len(), n_tasks)?;
    check_per_task("labels", opts.labels.len(), n_tasks)?;
    if !opts.residual_per_task.is_empty() {
        check_per_task("residual_per_task", opts.residual_per_task.len(), n_tasks)?;
    }
    if let Some(t) = &opts.tokenizer {
        check_tokenizer(t)?;
    }
    let given = std::iter::once(opts.base.as_path())
        .chain(opts.tasks.iter().map(|(_, p)| p.as_path()))
        .chain(opts.graph.as_deref());
    crate::files::check_not_input(&opts.output, given)?;
    let any_residual = opts.residual_dtype.is_some()
        || !opts.residual_for.is_empty()
        || opts.residual_per_task.iter().any(Option::is_some);
    match (opts.params.method, any_residual) {
        (Method::Tvq, _) if opts.residual_dtype.is_none() => {
            return Err(CompileError::Options(
                "--method tvq stores each task's task vector as its residual: give \
                 --residual-dtype (ternary, q2, q3, q4, q8 or f16)"
                    .into(),
            ))
        }
        (Method::Emr, true) => {
            return Err(CompileError::Options(
                "--residual-dtype cannot be combined with emr: EMR's per-task rescaler is only \
                 known after the last tensor, and a residual must be computed against the final \
                 reconstruction (use tall, or tvq)"
                    .into(),
            ))
        }
        _ => {}
    }
    if opts.shared.is_some() && opts.params.method == Method::Emr {
        log::warn!(
            "--shared with EMR: each task rescales the shared delta by its own factor, so the \
             shared tensors differ between tasks and are bound at every switch as before \
             (they only lose their masks); use another method (e.g. tall) to bind them once"
        );
    }
    Ok(())
}

/// Opens the base and task checkpoints, and refuses an output that is one of their external
/// data files.
fn open_checkpoints(opts: &CompileOptions) -> Result<(Checkpoint, Vec<Checkpoint>), CompileError> {
    let graph = opts.graph.as_deref();
    let base = Checkpoint::open(&opts.base, graph)?;
    let tasks = opts
        .tasks
        .iter()
        .map(|(_, p)| Checkpoint::open(p, graph))
        .collect::<Result<Vec<_>, _>>()?;
    for c in std::iter::once(&base).chain(&tasks) {
        let files = c.input_files().iter().map(PathBuf::as_path);
        crate::files::check_not_input(&opts.output, files)?;
    }
    Ok((base, tasks))
}

/// Pass 1: the largest relative change ‖θ_t − θ_0‖ / ‖θ_0‖ over the tasks, per tensor. It also
/// reads every value once, so NaN/Inf and decoding errors surface before anything is written.
fn relative_changes(
    base: &Checkpoint,
    tasks: &[Checkpoint],
    tensors: &[InitializerInfo],
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Vec<f64>, CompileError> {
    progress(Progress::Pass {
        name: "scanning",
        total: tensors.len() as u64,
    });
    let mut relative = Vec::with_capacity(tensors.len());
    for info in tensors {
        let b = base.read_f32(&info.name)?;
        let bn = norm(&b);
        let mut worst: f64 = 0.0;
        for t in tasks {
            let v = t.read_f32(&info.name)?;
            if v.len() == b.len() {
                let tn = diff_norm(&v, &b);
                worst = worst.max(if bn > 0.0 {
                    tn / bn
                } else if tn > 0.0 {
                    f64::INFINITY
                } else {
                    0.0
                });
            }
        }
        relative.push(worst);
        progress(Progress::Tensor(&info.name));
    }
    Ok(relative)
}

/// Writes each distinct task graph once (deduplicated by hash). Returns the graph entries and
/// each task's graph index.
fn write_graphs(
    writer: &mut BundleWriter,
    tasks: &[Checkpoint],
) -> Result<(Vec<GraphEntry>, Vec<u32>), CompileError> {
    let mut graph_ids: BTreeMap<String, u32> = BTreeMap::new();
    let mut graphs = Vec::new();
    let mut task_graph = Vec::with_capacity(tasks.len());
    for t in tasks {
        let hash = t.graph_sha256().to_string();
        let id = match graph_ids.get(&hash) {
            Some(id) => *id,
            None => {
                let section = writer.add_section(SectionKind::Graph, t.stripped_graph())?;
                // At most one graph per task, and the task count is capped.
                let id = graphs.len() as u32;
                graphs.push(GraphEntry {
                    section,
                    sha256: hash.clone(),
                });
                graph_ids.insert(hash, id);
                id
            }
        };
        task_graph.push(id);
    }
    Ok((graphs, task_graph))
}

/// What pass 2 gives: the manifest's tensor entries, each task's module (one entry per tensor)
/// and each task's fidelity measurements.
struct MergedTensors {
    entries: Vec<TensorEntry>,
    modules: Vec<Vec<TaskTensor>>,
    fidelity: Vec<Fidelity>,
}

/// Pass 2: per tensor, its private copies or its merge (base, delta, masks, scales), streamed
/// to the writer.
fn merge_tensors(
    (opts, grams): (&CompileOptions, &LayerGrams),
    writer: &mut BundleWriter,
    merger: &mut dyn Merger,
    (base, tasks): (&Checkpoint, &[Checkpoint]),
    tensors: &[InitializerInfo],
    private: &BTreeMap<String, PrivateReason>,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<MergedTensors, CompileError> {
    let n_tasks = tasks.len();
    let mut out = MergedTensors {
        entries: Vec::with_capacity(tensors.len()),
        modules: vec![Vec::with_capacity(tensors.len()); n_tasks],
        fidelity: vec![Fidelity::default(); n_tasks],
    };
    progress(Progress::Pass {
        name: "merging",
        total: tensors.len() as u64,
    });
    let mut encoded = Vec::new();
    for (index, info) in tensors.iter().enumerate() {
        let entry = if private.contains_key(&info.name) {
            write_private(writer, tasks, info, &mut out.modules, &mut encoded)?
        } else {
            let view = (index as u64, info);
            write_merged(
                (opts, grams),
                writer,
                merger,
                (base, tasks),
                view,
                &mut out,
                &mut encoded,
            )?
        };
        out.entries.push(entry);
        progress(Progress::Tensor(&info.name));
    }
    Ok(out)
}

/// A private tensor: each task's own copy, as it is.
fn write_private(
    writer: &mut BundleWriter,
    tasks: &[Checkpoint],
    info: &InitializerInfo,
    modules: &mut [Vec<TaskTensor>],
    encoded: &mut Vec<u8>,
) -> Result<TensorEntry, CompileError> {
    for (ckpt, module) in tasks.iter().zip(modules.iter_mut()) {
        let v = ckpt.read_f32(&info.name)?;
        let shape = ckpt
            .tensor(&info.name)
            .map(|i| i.shape.clone())
            .unwrap_or_default();
        encoded.clear();
        info.dtype.encode(&v, encoded);
        let section = writer.add_section(SectionKind::Private, encoded)?;
        module.push(TaskTensor::Private {
            stored: Stored {
                section,
                encoding: info.dtype.into(),
            },
            shape,
        });
    }
    Ok(TensorEntry {
        name: info.name.clone(),
        shape: info.shape.clone(),
        dtype: info.dtype,
        storage: TensorStorage::Private,
    })
}

/// A merged tensor (`index`: its position, which seeds DARE): the base, the merged delta
/// rounded to its storage type, and per task its mask and scale; the fidelity of each task's
/// reconstruction is measured against its task vector on the way. (About 90 lines, kept whole:
/// the rounded delta, the choice made on it and each task's module share this tensor's buffers.)
fn write_merged(
    (opts, grams): (&CompileOptions, &LayerGrams),
    writer: &mut BundleWriter,
    merger: &mut dyn Merger,
    (base, tasks): (&Checkpoint, &[Checkpoint]),
    (index, info): (u64, &InitializerInfo),
    out: &mut MergedTensors,
    encoded: &mut Vec<u8>,
) -> Result<TensorEntry, CompileError> {
    // The base as stored (rounded to its storage type): task vectors are taken from it, so the
    // merge, the masks and the fidelity all see what a reader will reconstruct from.
    let base_encoding = base_encoding_of(info, opts.base_dtype);
    let mut b = base.read_f32(&info.name)?;
    base_encoding.round_slice(&mut b);
    let task_vectors = tasks
        .iter()
        .map(|t| {
            t.read_f32(&info.name)
                .map(|v| v.iter().zip(&b).map(|(x, y)| x - y).collect::<Vec<f32>>())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let shape: Vec<usize> = info.shape.iter().map(|&d| d as usize).collect();
    let merged = merger.merge(&TensorView {
        index,
        task_vectors: &task_vectors,
    })?;

    encoded.clear();
    base_encoding.encode(&b, encoded);
    let base_section = writer.add_section(SectionKind::Base, encoded)?;

    // What a reader will see after storage rounding.
    let shared = opts.shared.as_ref().is_some_and(|r| r.is_match(&info.name));
    let delta_encoding = delta_encoding_of(info, opts.delta_dtype);
    let mut delta = merged.delta;
    delta_encoding.round_slice(&mut delta);
    let has_delta = delta.iter().any(|&d| d != 0.0);
    let delta_stored = if has_delta {
        encoded.clear();
        delta_encoding.encode(&delta, encoded);
        Some(Stored {
            section: writer.add_section(SectionKind::Delta, encoded)?,
            encoding: delta_encoding,
        })
    } else {
        None
    };

    // A `--shared` tensor is the same for every task: no residual.
    let for_tensor = opts
        .residual_for
        .iter()
        .find(|(pattern, _)| pattern.is_match(&info.name))
        .map(|&(_, e)| e);
    let residual_encoding = |t: usize| {
        for_tensor
            .or(opts.residual_per_task.get(t).copied().flatten())
            .or(opts.residual_dtype)
            .filter(|_| !shared)
            .map(|e| delta_encoding_of(info, e))
    };
    for (t, tau) in task_vectors.iter().enumerate() {
        let (Some(f), Some(m)) = (out.fidelity.get_mut(t), out.modules.get_mut(t)) else {
            continue;
        };
        let mask = if shared || !has_delta {
            None
        } else {
            merged.masks.as_ref().and_then(|masks| masks.get(t))
        };
        let task_scale = if !has_delta {
            // Every task uses the base (and its residual, if any): no mask, no scale.
            TaskScale::One
        } else if shared {
            TaskScale::identity(opts.scale_of(t), delta.len(), &shape)
        } else {
            TaskScale::new(opts.scale_of(t), &delta, mask, tau, &shape)?
        };
        let merged_factor = |i: usize| if has_delta { task_scale.factor(i) } else { 0.0 };
        let residual = match residual_encoding(t) {
            Some(encoding) => {
                let gram = grams.get(t, &info.name);
                let parts = (&delta[..], mask, &merged_factor as &dyn Fn(usize) -> f32);
                if residual_of(&b, tau, parts, (encoding, gram), f, encoded) {
                    Some(Stored {
                        section: writer.add_section(SectionKind::Residual, encoded)?,
                        encoding,
                    })
                } else {
                    None
                }
            }
            None if has_delta => {
                f.add(&delta, mask, tau, merged_factor);
                None
            }
            None => {
                f.add_unchanged(tau);
                None
            }
        };
        let scale = match task_scale {
            TaskScale::One => Scale::None,
            TaskScale::Tensor(s) => Scale::Tensor(s),
            TaskScale::Rows { scales, .. } => {
                encoded.clear();
                DType::F32.encode(&scales, encoded);
                Scale::Rows(writer.add_section(SectionKind::RowScale, encoded)?)
            }
        };
        let mask = match mask {
            Some(mask) => Some(writer.add_section(SectionKind::Mask, mask.as_bytes())?),
            None => None,
        };
        m.push(match residual {
            Some(residual) => TaskTensor::Residual {
                mask,
                scale,
                residual,
            },
            None => TaskTensor::Merged { mask, scale },
        });
    }
    Ok(TensorEntry {
        name: info.name.clone(),
        shape: info.shape.clone(),
        dtype: info.dtype,
        storage: TensorStorage::Merged {
            base: Stored {
                section: base_section,
                encoding: base_encoding,
            },
            delta: delta_stored,
        },
    })
}

/// Encodes into `encoded` a task's residual over its merged reconstruction in `encoding` (what
/// a reader adds), its rows scaled to fit the layer outputs where `gram` is given
/// ([`fitted`]); `false` where it rounds to zero everywhere (then nothing is to be stored). The
/// reconstruction is what a reader computes (docs/FORMAT.md §5, `g = 1`: `check_options` keeps
/// residuals away from EMR): `θ_0 + s · δ` where the mask keeps an element (`factor` gives `s`,
/// 0 without a delta), `θ_0` elsewhere. The fidelity of the final reconstruction is added to
/// `fidelity`.
fn residual_of(
    base: &[f32],
    tau: &[f32],
    (delta, mask, factor): (&[f32], Option<&crate::mask::Mask>, &dyn Fn(usize) -> f32),
    (encoding, gram): (Encoding, Option<(Product, &Gram)>),
    fidelity: &mut Fidelity,
    encoded: &mut Vec<u8>,
) -> bool {
    // θ_merged: what the reader reconstructs before adding the residual.
    let merged: Vec<f32> = base
        .iter()
        .zip(delta)
        .enumerate()
        .map(|(i, (&b, &d))| {
            if mask.is_none_or(|m| m.get(i)) {
                b + factor(i) * d
            } else {
                b
            }
        })
        .collect();
    let mut r: Vec<f32> = base
        .iter()
        .zip(tau)
        .zip(&merged)
        .map(|((&b, &t), &m)| (b + t) - m)
        .collect();
    // What the code approximates, kept only when its rows are to be fitted.
    let target = gram.map(|g| (g, r.clone()));
    encoding.round_slice(&mut r);
    encoded.clear();
    encoding.encode(&r, encoded);
    // Row scales fitted to the layer's outputs (`--calib` with tvq), taken into the block
    // scales: what a reader decodes is then the scaled code.
    if let Some(scales) = target.and_then(|(g, t)| fitted::fit_scales(g, &t, &r)) {
        let row_len = r.len() / scales.len().max(1);
        if fitted::scale_block_rows(encoding, encoded, row_len, &scales) {
            encoding.decode_slice(encoded, &mut r);
        }
    }
    // The task vector the reader reconstructs: (θ_merged + r) − θ_0.
    let v: Vec<f32> = merged
        .iter()
        .zip(&r)
        .zip(base)
        .map(|((&m, &r), &b)| (m + r) - b)
        .collect();
    let kept = mask.map_or(base.len(), |m| m.count_ones()) as u64;
    fidelity.add_vector(&v, tau, kept);
    r.iter().any(|&x| x != 0.0)
}

/// Each task's report: the fidelity of its reconstruction (with its global scale) and its
/// calibration, if any.
fn task_reports(
    opts: &CompileOptions,
    fidelity: &[Fidelity],
    task_scales: &[f32],
    calibration: Vec<Option<CalibrationReport>>,
) -> Vec<TaskReport> {
    opts.tasks
        .iter()
        .zip(fidelity)
        .zip(task_scales)
        .zip(calibration)
        .map(|((((name, _), f), g), calibration)| TaskReport {
            calibration,
            ..f.report(name, *g)
        })
        .collect()
}

/// The manifest's task entries: name, graph, global scale, λ, scale mode, labels and module.
fn task_entries(
    opts: &CompileOptions,
    modules: Vec<Vec<TaskTensor>>,
    task_graph: &[u32],
    task_scales: &[f32],
) -> Vec<TaskEntry> {
    let n_tasks = opts.tasks.len();
    opts.tasks
        .iter()
        .zip(modules)
        .zip(task_graph)
        .enumerate()
        .map(|(i, (((name, _), tensors), graph))| TaskEntry {
            name: name.clone(),
            graph: *graph,
            global_scale: task_scales.get(i).copied().unwrap_or(1.0),
            // The λ the reader's rule 33 expects (the one the merge used for this task).
            lambda: crate::format::task_lambda(&opts.params, n_tasks, i),
            scale_mode: opts.scale_of(i),
            labels: opts.labels.get(i).cloned().unwrap_or_default(),
            tensors,
        })
        .collect()
}

/// The provenance record of each input checkpoint (base first): file name, format, SHA-256 and
/// size.
fn input_records(
    opts: &CompileOptions,
    base: &Checkpoint,
    tasks: &[Checkpoint],
) -> Vec<InputRecord> {
    std::iter::once(("base".to_string(), base))
        .chain(opts.tasks.iter().map(|(n, _)| n.clone()).zip(tasks.iter()))
        .map(|(role, c)| InputRecord {
            role,
            file: c
                .path()
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            format: c.format().to_string(),
            sha256: c.sha256().to_string(),
            bytes: c.input_bytes(),
        })
        .collect()
}

/// Elements per row of a tensor of `len` elements in `rows` rows (at least 1).
fn row_len(len: usize, rows: usize) -> usize {
    len.checked_div(rows).unwrap_or(0).max(1)
}

/// One task's scale `s_t` for one merged tensor.
enum TaskScale {
    One,
    Tensor(f32),
    Rows { scales: Vec<f32>, row_len: usize },
}

impl TaskScale {
    /// The closed-form scale of `mode` (docs/METHODS.md). A scalar tensor has no rows: `row`
    /// gives it one tensor scale.
    fn new(
        mode: ScaleMode,
        delta: &[f32],
        mask: Option<&crate::mask::Mask>,
        tau: &[f32],
        shape: &[usize],
    ) -> Result<TaskScale, CompileError> {
        Ok(match (mode, shape.first()) {
            (ScaleMode::None, _) => TaskScale::One,
            (ScaleMode::Tensor, _) | (ScaleMode::Row, None) => {
                TaskScale::Tensor(scaling::tensor_scale(delta, mask, tau)?)
            }
            (ScaleMode::Row, Some(&rows)) => TaskScale::Rows {
                scales: scaling::row_scales(delta, mask, tau, rows)?,
                row_len: row_len(delta.len(), rows),
            },
        })
    }

    /// The scale of `mode` that leaves `δ` as it is (a `--shared` tensor's): the variant rule 32
    /// asks for, with value 1.
    fn identity(mode: ScaleMode, len: usize, shape: &[usize]) -> TaskScale {
        match (mode, shape.first()) {
            (ScaleMode::None, _) => TaskScale::One,
            (ScaleMode::Tensor, _) | (ScaleMode::Row, None) => TaskScale::Tensor(1.0),
            (ScaleMode::Row, Some(&rows)) => TaskScale::Rows {
                scales: vec![1.0; rows],
                row_len: row_len(len, rows),
            },
        }
    }

    /// The factor multiplying `δ[i]`.
    fn factor(&self, i: usize) -> f32 {
        match self {
            TaskScale::One => 1.0,
            TaskScale::Tensor(s) => *s,
            TaskScale::Rows { scales, row_len } => scales.get(i / row_len).copied().unwrap_or(0.0),
        }
    }
}

/// Refuses a tokenizer the runtime would not load: with the `text` feature, what the
/// `tokenizers` crate (the runtime's) does not load; without it, text that is not JSON.
fn check_tokenizer(bytes: &[u8]) -> Result<(), CompileError> {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return Err(CompileError::Tokenizer("it is not UTF-8 text".into()));
    };
    #[cfg(feature = "text")]
    {
        // The runtime's loader (JSON syntax first: the tokenizers crate panics on some syntax
        // errors); a panic it still has is a refusal too.
        let loaded =
            std::panic::catch_unwind(|| crate::runtime::text::parse_tokenizer(text.as_bytes()));
        match loaded {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(CompileError::Tokenizer(format!(
                "it does not load as a Hugging Face tokenizer.json: {e}"
            ))),
            Err(_) => Err(CompileError::Tokenizer(
                "it does not load as a Hugging Face tokenizer.json (the tokenizers crate \
                 panicked on it)"
                    .into(),
            )),
        }
    }
    #[cfg(not(feature = "text"))]
    {
        serde_json::from_str::<serde::de::IgnoredAny>(text)
            .map(drop)
            .map_err(|e| CompileError::Tokenizer(format!("it is not JSON: {e}")))
    }
}

/// The tensors some checkpoint's graph reads: an initializer no node reads (and that is no
/// graph output) has no effect on any task, and a bundle carries only what its graphs read
/// (docs/FORMAT.md rule G3).
fn read_tensors(
    tensors: Vec<InitializerInfo>,
    base: &Checkpoint,
    tasks: &[Checkpoint],
) -> Vec<InitializerInfo> {
    let read: BTreeSet<String> = std::iter::once(base)
        .chain(tasks)
        .filter_map(|c| c.graph().graph.as_ref())
        .flat_map(crate::runtime::read_names)
        .collect();
    tensors
        .into_iter()
        .filter(|t| {
            let kept = read.contains(&t.name);
            if !kept {
                log::info!("{}: dropped (no graph reads it)", t.name);
            }
            kept
        })
        .collect()
}

/// Checks each task's graph with the task's weights as the runtime will check the bundle
/// ([`crate::runtime::check::check_checkpoint_graph`]: rules G1–G7 of docs/FORMAT.md), once per
/// distinct graph and weight shapes, and the task's label names against its first output
/// (`[batch, classes]`, rule G8).
fn check_task_graphs(
    opts: &CompileOptions,
    tasks: &[Checkpoint],
    tensors: &[InitializerInfo],
) -> Result<(), CompileError> {
    use crate::runtime::check::{check_checkpoint_graph, check_labels, WeightInfo};
    use crate::runtime::{Error, GraphProblem, IoInfo};

    let mut checked: BTreeMap<(String, Vec<Vec<u64>>), Vec<IoInfo>> = BTreeMap::new();
    for (t, ((name, _), ckpt)) in opts.tasks.iter().zip(tasks).enumerate() {
        let weights: Vec<WeightInfo> = tensors
            .iter()
            .map(|info| WeightInfo {
                name: info.name.clone(),
                dtype: info.dtype,
                shape: ckpt
                    .tensor(&info.name)
                    .map_or_else(|| info.shape.clone(), |t| t.shape.clone()),
            })
            .collect();
        let key = (
            ckpt.graph_sha256().to_string(),
            weights.iter().map(|w| w.shape.clone()).collect(),
        );
        let outputs = match checked.get(&key) {
            Some(outputs) => outputs.clone(),
            None => {
                let outputs =
                    check_checkpoint_graph(name, ckpt.graph(), &weights).map_err(|e| {
                        CompileError::TaskGraph {
                            task: name.clone(),
                            reason: match e {
                                Error::Graph { problem, .. } => problem.to_string(),
                                other => other.to_string(),
                            },
                        }
                    })?;
                checked.insert(key, outputs.clone());
                outputs
            }
        };
        let labels = opts.labels.get(t).map_or(0, Vec::len);
        check_labels(name, labels, &outputs).map_err(|problem| CompileError::Labels {
            task: name.clone(),
            reason: match problem {
                GraphProblem::Labels { reason, .. } => reason,
                other => other.to_string(),
            },
        })?;
    }
    Ok(())
}

/// A per-task option list must have one entry per task.
fn check_per_task(option: &'static str, found: usize, tasks: usize) -> Result<(), CompileError> {
    if found == tasks {
        Ok(())
    } else {
        Err(CompileError::PerTaskCount {
            option,
            found,
            tasks,
        })
    }
}

fn check_task_names(tasks: &[(String, PathBuf)]) -> Result<(), CompileError> {
    if tasks.is_empty() {
        return Err(CompileError::NoTasks);
    }
    if tasks.len() > crate::format::MAX_TASKS {
        return Err(crate::format::FormatError::TooManyTasks {
            count: tasks.len() as u64,
            max: crate::format::MAX_TASKS as u64,
        }
        .into());
    }
    let mut seen = BTreeSet::new();
    for (name, _) in tasks {
        // The reader's rule 31, so that a name the compiler takes is one every reader takes.
        if !crate::format::is_valid_task_name(name) {
            return Err(CompileError::InvalidTaskName(name.clone()));
        }
        if !seen.insert(name.as_str()) {
            return Err(CompileError::DuplicateTask(name.clone()));
        }
    }
    Ok(())
}

/// Checks that every task has the base's architecture and returns the base's float tensors.
fn align(
    base: &Checkpoint,
    tasks: &[Checkpoint],
    names: &[&str],
) -> Result<Vec<InitializerInfo>, CompileError> {
    let base_ops = op_types(base);
    for (task, name) in tasks.iter().zip(names) {
        let ops = op_types(task);
        if ops != base_ops {
            return Err(CompileError::DifferentArchitecture {
                task: name.to_string(),
                why: format!(
                    "its graph has {} nodes ({}), the base's {} ({})",
                    ops.len(),
                    summary(&ops),
                    base_ops.len(),
                    summary(&base_ops)
                ),
            });
        }
        let theirs: BTreeMap<&str, &InitializerInfo> = task
            .tensors()
            .iter()
            .map(|i| (i.name.as_str(), i))
            .collect();
        let ours: BTreeSet<&str> = base.tensors().iter().map(|i| i.name.as_str()).collect();
        if let Some(missing) = base
            .tensors()
            .iter()
            .find(|i| !theirs.contains_key(i.name.as_str()))
        {
            return Err(CompileError::MissingTensor {
                task: name.to_string(),
                tensor: missing.name.clone(),
            });
        }
        if let Some(extra) = task
            .tensors()
            .iter()
            .find(|i| !ours.contains(i.name.as_str()))
        {
            return Err(CompileError::DifferentArchitecture {
                task: name.to_string(),
                why: format!("it has tensor {:?} that the base lacks", extra.name),
            });
        }
        for b in base.tensors() {
            if let Some(t) = theirs.get(b.name.as_str()) {
                if t.dtype != b.dtype {
                    return Err(CompileError::TaskDTypeMismatch {
                        task: name.to_string(),
                        tensor: b.name.clone(),
                        base: b.dtype,
                        task_dtype: t.dtype,
                    });
                }
            }
        }
    }
    Ok(base.tensors().to_vec())
}

fn op_types(c: &Checkpoint) -> Vec<String> {
    c.graph()
        .graph
        .as_ref()
        .map(|g| g.node.iter().map(|n| n.op_type.clone()).collect())
        .unwrap_or_default()
}

fn summary(ops: &[String]) -> String {
    let mut s = ops.iter().take(6).cloned().collect::<Vec<_>>().join(", ");
    if ops.len() > 6 {
        s.push_str(", …");
    }
    s
}

fn decide_private(
    opts: &CompileOptions,
    base: &Checkpoint,
    tasks: &[Checkpoint],
    tensors: &[InitializerInfo],
    relative: &[f64],
) -> BTreeMap<String, PrivateReason> {
    let stats = base.batchnorm_statistics();
    let mut sorted: Vec<f64> = relative.iter().copied().filter(|r| r.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0.0);
    let mut private = BTreeMap::new();
    for (info, &r) in tensors.iter().zip(relative) {
        let shape_differs = tasks
            .iter()
            .any(|t| t.tensor(&info.name).is_some_and(|i| i.shape != info.shape));
        let reason = if shape_differs {
            Some(PrivateReason::Shape)
        } else if opts
            .private
            .as_ref()
            .is_some_and(|re| re.is_match(&info.name))
        {
            Some(PrivateReason::Pattern)
        } else if stats.contains(&info.name) {
            Some(PrivateReason::NormStatistics)
        } else if opts.auto_private
            && r > HEAD_MIN_RELATIVE_CHANGE
            && r > HEAD_MEDIAN_FACTOR * median
        {
            Some(PrivateReason::Head(r, median))
        } else {
            None
        };
        if let Some(reason) = reason {
            private.insert(info.name.clone(), reason);
        }
    }
    private
}

fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

fn diff_norm(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = f64::from(x) - f64::from(y);
            d * d
        })
        .sum::<f64>()
        .sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_scaling_of_a_scalar_falls_back_to_one_tensor_scale() {
        // δ = [2], τ = [3]: s = ⟨δ, τ⟩ / ‖δ‖² = 6 / 4.
        let s = TaskScale::new(ScaleMode::Row, &[2.0], None, &[3.0], &[]).unwrap();
        assert!(matches!(s, TaskScale::Tensor(v) if v == 1.5));
    }

    #[test]
    fn row_factors_follow_the_first_axis() {
        // Shape [2, 2]: rows [1, 1] and [1, 0] against τ = [1, 1, 2, 0] → s = [1, 2].
        let s = TaskScale::new(
            ScaleMode::Row,
            &[1.0, 1.0, 1.0, 0.0],
            None,
            &[1.0, 1.0, 2.0, 0.0],
            &[2, 2],
        )
        .unwrap();
        let factors: Vec<f32> = (0..4).map(|i| s.factor(i)).collect();
        assert_eq!(factors, [1.0, 1.0, 2.0, 2.0]);
    }
}
