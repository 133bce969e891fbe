//! The manifest: everything about a bundle except the bulk bytes, serialized with postcard.
//!
//! The manifest names every section of the data region and says what it holds: stripped ONNX
//! graphs, base weights, merged deltas, masks, row scales and private tensors. It also records
//! how the bundle was made (method, hyper-parameters, input checksums) and the compile report.
//! postcard is not self-describing, so any change to these types is a new format version
//! (docs/FORMAT.md, "Versioning"). Every `Vec` is decoded through the private `budget` module, which caps
//! the memory a hostile manifest can make the decoder allocate (rule 35).

use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::encoding::Encoding;
use crate::format::{MergeParams, ScaleMode};

/// Index into [`Manifest::sections`].
pub type SectionId = u32;

/// The decoded manifest of a bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Distinct ONNX graphs (initializers stripped), deduplicated by hash.
    #[serde(deserialize_with = "super::budget::seq")]
    pub graphs: Vec<GraphEntry>,
    /// Every weight tensor, by initializer name, in a fixed order; task modules index into it.
    #[serde(deserialize_with = "super::budget::seq")]
    pub tensors: Vec<TensorEntry>,
    /// The data region's sections, in file order.
    #[serde(deserialize_with = "super::budget::seq")]
    pub sections: Vec<SectionEntry>,
    /// The tasks, in the order they were given to the compiler.
    #[serde(deserialize_with = "super::budget::seq")]
    pub tasks: Vec<TaskEntry>,
    /// A Hugging Face `tokenizer.json` ([`SectionKind::Tokenizer`]) turning text into the graphs'
    /// token inputs, if the bundle carries one.
    pub tokenizer: Option<SectionId>,
    /// The merge method and all its hyper-parameters.
    pub merge: MergeParams,
    /// Where the bundle came from.
    pub provenance: Provenance,
    /// Sizes and fidelity measured when the bundle was compiled.
    pub report: CompileReport,
}

/// One section of the data region: a byte range and its checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SectionEntry {
    /// Offset from the start of the data region (a multiple of 64).
    pub offset: u64,
    /// Length in bytes (without padding).
    pub length: u64,
    /// XXH3-64 (seed 0) of the section's bytes.
    pub checksum: u64,
    /// What the section holds.
    pub kind: SectionKind,
}

/// What a section holds; checked against every reference to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SectionKind {
    /// A serialized ONNX `ModelProto` without its float initializers.
    Graph,
    /// Base weights `θ_0` of a merged tensor.
    Base,
    /// Shared merged delta `δ` of a merged tensor.
    Delta,
    /// A bit-packed task mask.
    Mask,
    /// Per-row scales of one task and tensor, `f32` little-endian, one per row (first axis).
    RowScale,
    /// A tensor stored densely for one task.
    Private,
    /// A Hugging Face `tokenizer.json`, UTF-8.
    Tokenizer,
    /// A task's own residual `r` of one merged tensor, dense in its `Stored::encoding`
    /// (format version 4).
    Residual,
}

/// A distinct graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphEntry {
    /// Section holding the stripped ONNX model.
    pub section: SectionId,
    /// SHA-256 of the stripped model bytes (the deduplication key), 64 lowercase hex digits.
    pub sha256: String,
}

/// A weight tensor, matched across checkpoints by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// ONNX initializer name.
    pub name: String,
    /// Shape of the base checkpoint's tensor.
    #[serde(deserialize_with = "super::budget::seq")]
    pub shape: Vec<u64>,
    /// Element type of the input checkpoints' tensor (what an exported model uses).
    pub dtype: DType,
    /// How the tensor is stored.
    pub storage: TensorStorage,
}

/// How a tensor's weights are stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TensorStorage {
    /// Shared by all tasks: the base once, and a merged delta unless no task changes it.
    Merged {
        /// The base weights.
        base: Stored,
        /// The merged delta; `None` when it is zero (every task uses the base as is).
        delta: Option<Stored>,
    },
    /// Every task stores its own copy ([`TaskTensor::Private`]).
    Private,
}

/// A section holding a dense tensor in a given encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    /// The section.
    pub section: SectionId,
    /// How the values are stored: a float type, or block-quantized (versions 3 and 4).
    pub encoding: Encoding,
}

/// One task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskEntry {
    /// Task name (unique in the bundle).
    pub name: String,
    /// Index into [`Manifest::graphs`].
    pub graph: u32,
    /// Global scale `g_t` of the task's reconstruction (EMR's rescaler; 1 otherwise). Not to be
    /// confused with `scale_mode` (which per-tensor [`Scale`] the task's module has).
    pub global_scale: f32,
    /// TALL / Consensus threshold used for this task, if the method has one.
    pub lambda: Option<f32>,
    /// The scaling vectors applied on top of the method for this task.
    pub scale_mode: ScaleMode,
    /// Names of the task's output classes, in logit order; empty if not given.
    #[serde(deserialize_with = "super::budget::seq")]
    pub labels: Vec<String>,
    /// One entry per tensor of [`Manifest::tensors`], in the same order.
    #[serde(deserialize_with = "super::budget::seq")]
    pub tensors: Vec<TaskTensor>,
}

/// How one task reconstructs one tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TaskTensor {
    /// `θ̂ = θ_0 + g · s ⊙ (m ⊙ δ)` from the shared base and delta.
    Merged {
        /// The task's mask over `δ`; `None` means all ones.
        mask: Option<SectionId>,
        /// The task's scale `s`.
        scale: Scale,
    },
    /// The task's own dense copy.
    Private {
        /// Section holding the tensor.
        stored: Stored,
        /// Shape (may differ from the base's, e.g. a head with another number of classes).
        #[serde(deserialize_with = "super::budget::seq")]
        shape: Vec<u64>,
    },
    /// `θ̂ = θ_0 + g · s ⊙ (m ⊙ δ) + r`: the merged reconstruction plus the task's own residual
    /// `r` (format version 4). Without a shared delta, `θ̂ = θ_0 + r`: the task's task vector,
    /// stored on its own (`--method tvq`).
    Residual {
        /// The task's mask over `δ`; `None` means all ones.
        mask: Option<SectionId>,
        /// The task's scale `s`.
        scale: Scale,
        /// Section holding `r`, a dense tensor of the tensor's shape.
        residual: Stored,
    },
}

impl TaskTensor {
    /// The parts of a merged module: `(mask, scale, residual)`; `None` for a private tensor.
    pub fn merged_parts(&self) -> Option<(Option<SectionId>, Scale, Option<Stored>)> {
        match self {
            TaskTensor::Merged { mask, scale } => Some((*mask, *scale, None)),
            TaskTensor::Residual {
                mask,
                scale,
                residual,
            } => Some((*mask, *scale, Some(*residual))),
            TaskTensor::Private { .. } => None,
        }
    }
}

/// A task's scale `s` for one merged tensor.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Scale {
    /// `s = 1`.
    None,
    /// One scale for the whole tensor.
    Tensor(f32),
    /// One scale per row (slice along the first axis), in a [`SectionKind::RowScale`] section.
    Rows(SectionId),
}

/// Where a bundle came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// `taskpack <version>` of the compiler that wrote the bundle.
    pub compiler: String,
    /// The input checkpoints, base first.
    #[serde(deserialize_with = "super::budget::seq")]
    pub inputs: Vec<InputRecord>,
}

/// One input checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputRecord {
    /// `base` or the task name.
    pub role: String,
    /// File name of the checkpoint (no directory).
    pub file: String,
    /// `onnx` or `safetensors`.
    pub format: String,
    /// SHA-256 of the checkpoint file (and of its external data files, in order), hex.
    pub sha256: String,
    /// Size in bytes of the checkpoint (with external data).
    pub bytes: u64,
}

/// Sizes and fidelity measured at compile time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct CompileReport {
    /// Sum of the input checkpoints' sizes (base and every task).
    pub inputs_bytes: u64,
    /// Per-task fidelity of the reconstruction, in task order.
    #[serde(deserialize_with = "super::budget::seq")]
    pub tasks: Vec<TaskReport>,
    /// Tensors kept private and why (`name: reason`).
    #[serde(deserialize_with = "super::budget::seq")]
    pub private: Vec<String>,
    /// Peak resident memory of the compiler, bytes (0 if unknown).
    pub peak_memory_bytes: u64,
    /// Wall time of the compile, seconds.
    pub seconds: f64,
}

/// Bytes per part of a bundle, derived from the section table (never stored: it can't go stale).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SizeReport {
    /// Base weights of merged tensors.
    pub base: u64,
    /// Merged deltas.
    pub delta: u64,
    /// Task masks.
    pub masks: u64,
    /// Row scale sections (tensor scales live in the manifest).
    pub scales: u64,
    /// Private tensors.
    pub private: u64,
    /// Per-task residuals (format version 4).
    pub residuals: u64,
    /// Stripped graphs.
    pub graphs: u64,
    /// The tokenizer.
    pub tokenizer: u64,
    /// Header, manifest and padding.
    pub overhead: u64,
    /// The whole file.
    pub total: u64,
}

/// Fidelity of one task's reconstruction against its checkpoint, over merged tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TaskReport {
    /// Task name.
    pub name: String,
    /// `‖θ̂_t − θ_t‖ / ‖τ_t‖` over merged tensors (0 is perfect; 1 is as bad as the base).
    pub relative_error: f64,
    /// Cosine similarity between the reconstructed and the true task vector.
    pub cosine: f64,
    /// Fraction of merged parameters the task's mask keeps (1 without a mask).
    pub mask_density: f64,
    /// How calibration chose this task's setting, if it was calibrated.
    pub calibration: Option<CalibrationReport>,
}

/// The outcome of calibrating one task: agreement of candidate reconstructions with the
/// original task model on unlabeled inputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct CalibrationReport {
    /// Inputs the candidates were run on.
    pub examples: u64,
    /// Every candidate tried, in the order tried; the chosen one is the first with the highest
    /// agreement and, among those, the lowest logit distance.
    #[serde(deserialize_with = "super::budget::seq")]
    pub candidates: Vec<CandidateScore>,
    /// Index of the chosen candidate in `candidates`.
    pub chosen: u64,
}

/// How well one candidate setting reproduced the original task model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct CandidateScore {
    /// The setting, e.g. `lambda 0.4, scale row`.
    pub setting: String,
    /// Fraction of inputs whose top-1 class matches the original model's.
    pub agreement: f64,
    /// Root mean square difference between the candidate's and the original's outputs.
    pub logit_distance: f64,
}
