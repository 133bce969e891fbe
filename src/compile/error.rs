//! Errors of the compiler. One open enum: reading problems live here, pipeline problems are added
//! next to them.

use std::path::PathBuf;

use crate::onnx::OnnxError;

/// How many unmatched names a [`CompileError::NameMismatch`] lists per side.
pub(crate) const MAX_LISTED_NAMES: usize = 5;

/// Everything that can go wrong while compiling a bundle.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CompileError {
    /// An I/O error on a file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is neither an ONNX model nor a safetensors file.
    #[error("{} is not an ONNX model: {reason}", path.display())]
    NotOnnx {
        /// The file.
        path: PathBuf,
        /// Why it was rejected.
        reason: String,
    },
    /// Any other problem in an ONNX file (duplicate initializer, bad shape, data length, ...).
    #[error("{}: {source}", path.display())]
    Onnx {
        /// The file.
        path: PathBuf,
        /// The problem.
        source: OnnxError,
    },
    /// A weight has a type the compiler cannot read (e.g. F64 or F8 in a safetensors file).
    #[error("{}: tensor {tensor:?} has unsupported dtype {dtype} (supported: f32, f16, bf16)", path.display())]
    UnsupportedDType {
        /// The checkpoint.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The type as the file names it.
        dtype: String,
    },
    /// An external-data location leaves the model's folder (absolute path, `..`, symlink).
    #[error("{}: external data of tensor {tensor:?} at {location:?} is outside the model's folder{}", path.display(), if reason.is_empty() { String::new() } else { format!(" ({reason})") })]
    ExternalDataOutsideFolder {
        /// The ONNX model.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// The `location` entry.
        location: String,
        /// Details.
        reason: String,
    },
    /// An external-data offset/length runs past the end of its file.
    #[error("{}: external data of tensor {tensor:?} (offset {offset}, {length} bytes) runs past the end of the {file_size}-byte file", file.display())]
    ExternalDataOutOfBounds {
        /// The external data file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// Declared offset.
        offset: u64,
        /// Declared or required length.
        length: u64,
        /// Actual file size.
        file_size: u64,
    },
    /// A weight contains NaN or ±Inf.
    #[error("{}: tensor {tensor:?} contains a non-finite value ({value}) at flat index {index}", checkpoint.display())]
    NonFinite {
        /// The checkpoint.
        checkpoint: PathBuf,
        /// The tensor.
        tensor: String,
        /// Flat (row-major) index of the first bad value.
        index: usize,
        /// The value (NaN, inf or -inf).
        value: f32,
    },
    /// The safetensors file is malformed.
    #[error("{} is not a valid safetensors file: {reason}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// A safetensors checkpoint was given without the ONNX graph it fills.
    #[error("{} is a safetensors checkpoint: pass the ONNX graph it belongs to (--graph FILE.onnx)", path.display())]
    GraphRequired {
        /// The safetensors file.
        path: PathBuf,
    },
    /// The weight names of a safetensors checkpoint and of its ONNX graph differ.
    #[error(
        "{} does not match the graph {}: {} graph weight(s) missing from the checkpoint{}; {} checkpoint tensor(s) not in the graph{}",
        checkpoint.display(),
        graph.display(),
        missing_count,
        list(missing_in_checkpoint, *missing_count),
        extra_count,
        list(extra_in_checkpoint, *extra_count)
    )]
    NameMismatch {
        /// The safetensors file.
        checkpoint: PathBuf,
        /// The ONNX graph.
        graph: PathBuf,
        /// First (up to `MAX_LISTED_NAMES`) graph weights absent from the checkpoint, in graph order.
        missing_in_checkpoint: Vec<String>,
        /// How many graph weights are absent in total.
        missing_count: usize,
        /// First (up to `MAX_LISTED_NAMES`) float checkpoint tensors absent from the graph.
        extra_in_checkpoint: Vec<String>,
        /// How many float checkpoint tensors are absent from the graph in total.
        extra_count: usize,
    },
    /// A checkpoint tensor's shape differs from the graph's initializer.
    #[error("{}: tensor {tensor:?} has shape {found:?}, the graph expects {expected:?}", checkpoint.display())]
    ShapeMismatch {
        /// The checkpoint.
        checkpoint: PathBuf,
        /// The tensor.
        tensor: String,
        /// Shape in the graph.
        expected: Vec<u64>,
        /// Shape in the checkpoint.
        found: Vec<u64>,
    },
    /// A checkpoint tensor's dtype differs from the graph's initializer.
    #[error("{}: tensor {tensor:?} is {found}, the graph expects {expected}", checkpoint.display())]
    DTypeMismatch {
        /// The checkpoint.
        checkpoint: PathBuf,
        /// The tensor.
        tensor: String,
        /// Type in the graph.
        expected: String,
        /// Type in the checkpoint.
        found: String,
    },
    /// `read_f32` was asked for a name that is not a weight of the checkpoint.
    #[error("{}: no weight named {tensor:?}", checkpoint.display())]
    UnknownTensor {
        /// The checkpoint.
        checkpoint: PathBuf,
        /// The name asked for.
        tensor: String,
    },
    /// A per-task option does not have one entry per task.
    #[error("{option}: {found} entries for {tasks} tasks (give one per task)")]
    PerTaskCount {
        /// The option.
        option: &'static str,
        /// Entries given.
        found: usize,
        /// Number of tasks.
        tasks: usize,
    },
    /// Options that cannot be combined.
    #[error("{0}")]
    Options(String),
    /// A size budget (`compile_within`) that no storage setting meets.
    #[error(
        "no storage setting fits in {max_bytes} bytes: the smallest bundle tried is {smallest} \
         bytes; raise the budget, or keep fewer tasks"
    )]
    OverBudget {
        /// The budget.
        max_bytes: u64,
        /// Size of the smallest bundle tried (or of the calibrated one, if calibration grew it).
        smallest: u64,
    },
    /// Calibration cannot run: bad inputs, or a model tract cannot run.
    #[error("calibration: {0}")]
    Calibration(String),
    /// A task's graph could not run with the task's weights (docs/FORMAT.md, rules G1–G7).
    #[error("task {task:?}: its graph cannot run: {reason}")]
    TaskGraph {
        /// The task.
        task: String,
        /// What is wrong (the runtime's [`crate::runtime::GraphProblem`] or tract's error).
        reason: String,
    },
    /// A task's label names do not fit its graph's first output (docs/FORMAT.md, rule G8).
    #[error("--labels {task}: {reason}")]
    Labels {
        /// The task.
        task: String,
        /// What does not fit.
        reason: String,
    },
    /// The tokenizer file cannot be used.
    #[error("cannot use the tokenizer: {0}")]
    Tokenizer(String),
    /// `compile` was given no task.
    #[error("no task checkpoints given (pass at least one --task NAME=PATH)")]
    NoTasks,
    /// Two tasks have the same name.
    #[error("task name {0:?} is given twice")]
    DuplicateTask(String),
    /// A task name is empty, too long or has control characters.
    #[error("invalid task name {0:?} (1 to 256 bytes, no control characters)")]
    InvalidTaskName(String),
    /// A task checkpoint's graph is not the base's.
    #[error("task {task:?} does not have the base's architecture: {why}")]
    DifferentArchitecture {
        /// The task.
        task: String,
        /// What differs.
        why: String,
    },
    /// A task checkpoint lacks a weight the base has.
    #[error("task {task:?} has no tensor {tensor:?}, which the base has")]
    MissingTensor {
        /// The task.
        task: String,
        /// The missing tensor.
        tensor: String,
    },
    /// A task's tensor has another element type than the base's.
    #[error("tensor {tensor:?} is {base} in the base but {task_dtype} in task {task:?}")]
    TaskDTypeMismatch {
        /// The task.
        task: String,
        /// The tensor.
        tensor: String,
        /// The base's type.
        base: crate::dtype::DType,
        /// The task's type.
        task_dtype: crate::dtype::DType,
    },
    /// A hyper-parameter is out of range.
    #[error(transparent)]
    Merge(#[from] crate::merge::MergeError),
    /// Writing the bundle failed, or a bundle breaks a format rule.
    #[error(transparent)]
    Format(#[from] crate::format::FormatError),
    /// A task's stored graph could not be rebuilt into a standalone model.
    #[error("cannot rebuild the ONNX model of task {task:?}: {source}")]
    Export {
        /// The task.
        task: String,
        /// What failed.
        #[source]
        source: crate::onnx::OnnxError,
    },
    /// Reading back a bundle failed.
    #[error(transparent)]
    Runtime(#[from] crate::runtime::Error),
    /// An input is not a regular file, or the output would replace an input or a special file.
    #[error(transparent)]
    File(crate::files::FileError),
}

impl From<crate::files::FileError> for CompileError {
    /// Plain I/O failures keep the [`CompileError::Io`] shape (the path and the OS error).
    fn from(e: crate::files::FileError) -> Self {
        match e {
            crate::files::FileError::Io { path, source, .. } => CompileError::Io { path, source },
            other => CompileError::File(other),
        }
    }
}

/// `: a, b, c` (+ `, ...` when truncated), empty for no names.
fn list(names: &[String], total: usize) -> String {
    if names.is_empty() {
        return String::new();
    }
    let quoted: Vec<String> = names.iter().map(|n| format!("{n:?}")).collect();
    let more = if total > names.len() { ", ..." } else { "" };
    format!(": {}{more}", quoted.join(", "))
}
