//! Errors of the runtime.

use std::path::PathBuf;

use crate::format::FormatError;

/// Everything that can go wrong opening a bundle or running a task.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The bundle file could not be opened, mapped or read.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// `open`, `map` or `read`.
        action: &'static str,
        /// The bundle path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The bundle breaks a rule of the format (docs/FORMAT.md).
    #[error(transparent)]
    Format(#[from] FormatError),
    /// No task of that name in the bundle.
    #[error("no task {name:?} in the bundle (tasks: {known})")]
    UnknownTask {
        /// The requested name.
        name: String,
        /// The bundle's task names, comma-separated.
        known: String,
    },
    /// A task or tensor index out of range.
    #[error("{what} index {index} out of range (the bundle has {count})")]
    OutOfRange {
        /// `task` or `tensor`.
        what: &'static str,
        /// The index given.
        index: usize,
        /// How many there are.
        count: usize,
    },
    /// [`crate::runtime::Engine::run`] got the wrong number of inputs.
    #[error("task {task:?} takes {expected} input(s), got {got}")]
    InputCount {
        /// The task name.
        task: String,
        /// How many inputs the task's graph has.
        expected: usize,
        /// How many were given.
        got: usize,
    },
    /// An input of [`crate::runtime::Engine::run`] has the wrong element type or shape.
    #[error("input {name:?} of task {task:?}: expected {expected}, got {got}")]
    InputMismatch {
        /// The task name.
        task: String,
        /// The graph input's name.
        name: String,
        /// What the graph expects, e.g. `F32 [N,1,28,28]`.
        expected: String,
        /// What was given, e.g. `F64 [2,1,28,28]`.
        got: String,
    },
    /// The task's graph is not one the engine can run (e.g. an ONNX feature it does not
    /// handle, or weights whose element type tract lacks).
    #[error("graph {graph}: {reason}")]
    Unsupported {
        /// Index of the graph in the bundle.
        graph: usize,
        /// What is unsupported.
        reason: String,
    },
    /// The bundle carries no tokenizer, so its tasks cannot take text
    /// (`TextClassifier`, feature `text`).
    #[error("the bundle has no tokenizer; compile it with --tokenizer")]
    NoTokenizer,
    /// The bundle's tokenizer (a Hugging Face `tokenizer.json`) does not load.
    #[error("the bundle's tokenizer does not load: {message}")]
    TokenizerParse {
        /// Why, from the `tokenizers` crate or the check that failed.
        message: String,
    },
    /// The tokenizer failed on a text, or a text does not fit the graph.
    #[error("cannot tokenize text {index}: {message}")]
    Tokenize {
        /// Index of the text in the batch.
        index: usize,
        /// Why.
        message: String,
    },
    /// A graph input that text classification cannot fill: not one of `input_ids`,
    /// `attention_mask`, `token_type_ids`, or not an `[batch, sequence]` integer tensor.
    #[error("input {name:?} of task {task:?} cannot be filled from text: {reason}")]
    UnfillableInput {
        /// The task name.
        task: String,
        /// The graph input's name.
        name: String,
        /// Why it cannot be filled.
        reason: String,
    },
    /// A task's label names do not match the width of its output.
    #[error("task {task:?} has {labels} label names but its output has {classes} classes")]
    LabelCount {
        /// The task name.
        task: String,
        /// How many label names the bundle gives the task.
        labels: usize,
        /// How many logits its first output has per example.
        classes: usize,
    },
    /// A task whose first output is not `[batch, classes]` logits was asked to classify.
    #[error("task {task:?} is not a classifier: {reason}")]
    NotAClassifier {
        /// The task name.
        task: String,
        /// What its output is instead.
        reason: String,
    },
    /// A stored graph cannot run with the bundle's tensors: it breaks one of the graph rules
    /// G1–G7 of docs/FORMAT.md (checked by [`crate::runtime::check_graphs`] and
    /// [`crate::runtime::Engine::new`]).
    #[error("graph {graph}: {problem}")]
    Graph {
        /// Index of the graph in the bundle.
        graph: usize,
        /// What is wrong with it.
        problem: Box<crate::runtime::GraphProblem>,
    },
    /// An input holds an index outside the table a lookup of the graph reads (a `Gather` of an
    /// embedding, e.g. a token id outside the vocabulary): refused before running, since tract
    /// would index out of bounds.
    #[error(
        "input {input:?} of task {task:?}: index {value} is out of range for a lookup table of \
         {size} rows (a token id outside the vocabulary?)"
    )]
    IndexOutOfRange {
        /// The task name.
        task: String,
        /// The graph input's name.
        input: String,
        /// The first offending value.
        value: i64,
        /// Rows of the table: valid indices are `0..size` (and `-size..0`, counted from the end,
        /// as ONNX `Gather` allows).
        size: usize,
    },
    /// The inputs of one run hold more bytes than [`crate::runtime::EngineOptions::max_input_bytes`]
    /// allows (raise it for larger batches).
    #[error(
        "the inputs of task {task:?} hold {bytes} bytes, more than the limit of {limit} bytes"
    )]
    InputTooLarge {
        /// The task name.
        task: String,
        /// Bytes of the inputs given (saturating at `usize::MAX`).
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// tract or the tokenizer panicked; the engine caught it (the panic hook has still printed it
    /// on stderr). The engine stays usable: nothing half-built is kept.
    #[error("{action} panicked: {message}")]
    EnginePanic {
        /// What the engine was doing: `run task mnist`, `bind task mnist`, `tokenize text 0`...
        action: String,
        /// The panic message.
        message: String,
    },
    /// [`crate::runtime::set_compute`] asked for another precision after taskpack had planned a
    /// model in this process (tract fixes its kernel choice then).
    #[error(
        "cannot switch the matrix products to {requested}: this process already planned models \
         with {current} (call set_compute before the first engine runs)"
    )]
    ComputeFixed {
        /// The precision asked for.
        requested: crate::runtime::Compute,
        /// The precision in effect.
        current: crate::runtime::Compute,
    },
    /// tract failed to load, optimize, bind or run a graph; the message is tract's error chain.
    #[error("tract failed to {action}: {message}")]
    Tract {
        /// What the engine was doing: `load graph 0`, `bind task mnist`, `run task mnist`...
        action: String,
        /// tract's error chain, `: `-separated.
        message: String,
    },
}
