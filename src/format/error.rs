//! The one error type of the format layer.
//!
//! Every variant names exactly which rule of docs/FORMAT.md failed and carries enough context
//! (section id, task or tensor name, expected and found values) for a one-line message that a
//! user can act on. Writer failures carry the path of the file they were writing.

use std::path::PathBuf;

use super::manifest::{SectionId, SectionKind};
use crate::format::ScaleMode;

/// Why a bundle could not be read, validated or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// Rule 1: the file is shorter than the 64-byte header.
    #[error("file is {len} bytes, shorter than the 64-byte header")]
    HeaderTooShort {
        /// Length of the file.
        len: u64,
    },
    /// Rule 2: the file does not start with `TASKPACK`.
    #[error("not a taskpack bundle: magic is {found:02x?}, expected \"TASKPACK\"")]
    BadMagic {
        /// The first 8 bytes of the file.
        found: [u8; 8],
    },
    /// Rule 3: the format version is not one this reader knows.
    #[error(
        "unsupported bundle format version {found} (this reader knows versions {oldest} to {known})",
        oldest = super::header::MIN_VERSION
    )]
    UnsupportedVersion {
        /// Version in the header.
        found: u32,
        /// The newest version this reader implements.
        known: u32,
    },
    /// Rule 4: the header sets flags this reader does not know.
    #[error("unknown header flags {flags:#010x}")]
    UnknownFlags {
        /// The flags field.
        flags: u32,
    },
    /// Rule 5: the header's `file_length` is not the length of the file (truncated or extended
    /// file), or a buffer of the wrong length was passed for a parsed bundle.
    #[error("header says the file is {header} bytes but it is {actual} bytes")]
    FileLengthMismatch {
        /// `file_length` from the header.
        header: u64,
        /// Real length of the file or buffer.
        actual: u64,
    },
    /// Rule 6: `data_offset` is not 64.
    #[error("data region offset is {found}, expected 64")]
    InvalidDataOffset {
        /// `data_offset` from the header.
        found: u64,
    },
    /// Rule 7: `manifest_offset` is not `data_offset + data_length`.
    #[error("manifest offset is {found}, expected {expected} (end of the data region)")]
    InvalidManifestOffset {
        /// `manifest_offset` from the header.
        found: u64,
        /// `data_offset + data_length`.
        expected: u64,
    },
    /// Rule 8: the manifest does not end exactly at the end of the file.
    #[error("manifest ends at {end} but the file is {file_length} bytes")]
    InvalidManifestLength {
        /// `manifest_offset + manifest_length`.
        end: u64,
        /// `file_length` from the header.
        file_length: u64,
    },
    /// Rule 9: the manifest is longer than [`MAX_MANIFEST_LEN`](super::MAX_MANIFEST_LEN).
    #[error("manifest is {length} bytes, more than the cap of {max}")]
    ManifestTooLarge {
        /// `manifest_length`.
        length: u64,
        /// The cap.
        max: u64,
    },
    /// Rule 10 (and `verify`): the manifest bytes do not match the header's checksum.
    #[error(
        "manifest checksum mismatch: header says {expected:#018x}, bytes hash to {actual:#018x}"
    )]
    ManifestChecksumMismatch {
        /// `manifest_checksum` from the header.
        expected: u64,
        /// XXH3-64 of the manifest bytes.
        actual: u64,
    },
    /// Rule 11: the manifest is not a valid postcard `Manifest`; the decoder's message (a
    /// string, so that no postcard type is part of the API).
    #[error("manifest does not decode: {0}")]
    ManifestDecode(String),
    /// Rule 12: bytes are left over after the manifest.
    #[error("{count} trailing bytes after the manifest")]
    ManifestTrailingBytes {
        /// Number of unused bytes.
        count: u64,
    },
    /// Rule 13: more tasks than [`MAX_TASKS`](super::MAX_TASKS).
    #[error("{count} tasks, more than the cap of {max}")]
    TooManyTasks {
        /// Number of tasks.
        count: u64,
        /// The cap.
        max: u64,
    },
    /// Rule 13: more tensors than [`MAX_TENSORS`](super::MAX_TENSORS).
    #[error("{count} tensors, more than the cap of {max}")]
    TooManyTensors {
        /// Number of tensors.
        count: u64,
        /// The cap.
        max: u64,
    },
    /// Rule 13: more sections than [`MAX_SECTIONS`](super::MAX_SECTIONS).
    #[error("{count} sections, more than the cap of {max}")]
    TooManySections {
        /// Number of sections.
        count: u64,
        /// The cap.
        max: u64,
    },
    /// Rule 13: more graphs than [`MAX_GRAPHS`](super::MAX_GRAPHS).
    #[error("{count} graphs, more than the cap of {max}")]
    TooManyGraphs {
        /// Number of graphs.
        count: u64,
        /// The cap.
        max: u64,
    },
    /// Rule 14 (and 30 for labels): a task, tensor or label name is empty.
    #[error("{what} {index} has an empty name")]
    EmptyName {
        /// `"task"`, `"tensor"` or `"label"`.
        what: &'static str,
        /// Its index.
        index: u64,
    },
    /// Rule 14 (and 30 for labels): a task, tensor or label name is longer than
    /// [`MAX_NAME_LEN`](super::MAX_NAME_LEN).
    #[error("{what} {index} has a name of {len} bytes, more than the cap of {max}")]
    NameTooLong {
        /// `"task"`, `"tensor"` or `"label"`.
        what: &'static str,
        /// Its index.
        index: u64,
        /// Length of the name in bytes.
        len: u64,
        /// The cap.
        max: u64,
    },
    /// Rule 15: two tasks have the same name.
    #[error("duplicate task name {0:?}")]
    DuplicateTaskName(String),
    /// Rule 15: two tensors have the same name.
    #[error("duplicate tensor name {0:?}")]
    DuplicateTensorName(String),
    /// Rule 16: a shape has more dimensions than [`MAX_RANK`](super::MAX_RANK).
    #[error("tensor {tensor:?} has a shape of rank {rank}, more than the cap of {max}")]
    RankTooLarge {
        /// The tensor (for a private copy: `task/tensor`).
        tensor: String,
        /// Its rank.
        rank: u64,
        /// The cap.
        max: u64,
    },
    /// Rule 17: a shape has more elements than [`MAX_ELEMENTS`](super::MAX_ELEMENTS).
    #[error("tensor {tensor:?} has {numel} elements, more than the cap of {max}")]
    TooManyElements {
        /// The tensor (for a private copy: `task/tensor`).
        tensor: String,
        /// Its element count.
        numel: u64,
        /// The cap.
        max: u64,
    },
    /// Rule 17 and every other size computation: an integer overflow in size arithmetic.
    #[error("integer overflow computing {what}")]
    Overflow {
        /// The quantity being computed.
        what: &'static str,
    },
    /// Rule 18: an `f32` scalar of the manifest is NaN or infinite.
    #[error("{what} is not finite ({value})")]
    NonFiniteScalar {
        /// Which scalar (e.g. `task "a" scale`).
        what: String,
        /// Its value.
        value: f32,
    },
    /// Rule 19: a graph hash is not 64 lowercase hex digits.
    #[error("graph {graph} has an invalid SHA-256 {sha256:?} (expected 64 lowercase hex digits)")]
    InvalidGraphHash {
        /// Graph index.
        graph: u64,
        /// The recorded hash.
        sha256: String,
    },
    /// Rule 19: two graphs have the same hash.
    #[error("duplicate graph hash {0}")]
    DuplicateGraphHash(String),
    /// Rule 20: a task refers to a graph that does not exist.
    #[error("task {task:?} refers to graph {graph}, but there are {count} graphs")]
    GraphOutOfRange {
        /// Task name.
        task: String,
        /// The graph index.
        graph: u32,
        /// Number of graphs.
        count: u64,
    },
    /// Rule 21: a section does not start where the tiling puts it.
    #[error("section {section} starts at {offset}, expected {expected}")]
    MisplacedSection {
        /// Section id.
        section: SectionId,
        /// Its offset in the data region.
        offset: u64,
        /// `0` for the first section, else the aligned end of the previous one.
        expected: u64,
    },
    /// Rule 22: the data region is not exactly as long as its sections.
    #[error("data region is {data_length} bytes but its sections end at {end}")]
    DataLengthMismatch {
        /// `data_length` from the header.
        data_length: u64,
        /// End of the last section (0 without sections).
        end: u64,
    },
    /// Rule 23 (and accessors): a section id is out of range.
    #[error("section {section} does not exist ({count} sections)")]
    SectionOutOfRange {
        /// The id.
        section: u64,
        /// Number of sections.
        count: u64,
    },
    /// Rule 24: a section is referenced as another kind than it holds.
    #[error("section {section} holds {found:?} but is referenced as {expected:?}")]
    SectionKindMismatch {
        /// Section id.
        section: SectionId,
        /// The kind the reference needs.
        expected: SectionKind,
        /// The kind in the section table.
        found: SectionKind,
    },
    /// Rule 25: a section is referenced more than once.
    #[error("section {0} is referenced more than once")]
    SectionReferencedTwice(SectionId),
    /// Rule 25: nothing refers to a section.
    #[error("section {0} is not referenced by anything")]
    SectionUnreferenced(SectionId),
    /// Rule 26: a section's length is not what its reference implies.
    #[error("section {section} is {found} bytes, expected {expected}")]
    SectionLengthMismatch {
        /// Section id.
        section: SectionId,
        /// Length the reference implies.
        expected: u64,
        /// Length in the section table.
        found: u64,
    },
    /// Rule 26: a task has row scales for a rank-0 tensor.
    #[error("task {task:?} has row scales for the scalar tensor {tensor:?}")]
    RowScaleOnScalar {
        /// Task name.
        task: String,
        /// Tensor name.
        tensor: String,
    },
    /// Rule 27: a task does not have one entry per tensor.
    #[error("task {task:?} has {found} tensor entries, expected {expected}")]
    TaskTensorCount {
        /// Task name.
        task: String,
        /// Its number of entries.
        found: u64,
        /// Number of tensors.
        expected: u64,
    },
    /// Rule 28: a task's entry for a tensor does not match the tensor's storage.
    #[error("task {task:?} stores tensor {tensor:?} as {found} but the tensor is {expected}")]
    TaskTensorMismatch {
        /// Task name.
        task: String,
        /// Tensor name.
        tensor: String,
        /// `"merged"` or `"private"`: the tensor's storage.
        expected: &'static str,
        /// `"merged"` or `"private"`: the task's entry.
        found: &'static str,
    },
    /// Rule 29: a mask or scale on a merged tensor that has no delta.
    #[error("task {task:?} has a mask or scale on tensor {tensor:?}, which has no delta")]
    ModuleWithoutDelta {
        /// Task name.
        task: String,
        /// Tensor name.
        tensor: String,
    },
    /// V1: a section's bytes do not match its checksum.
    #[error("section {section} checksum mismatch: table says {expected:#018x}, bytes hash to {actual:#018x}")]
    SectionChecksumMismatch {
        /// Section id.
        section: SectionId,
        /// Checksum in the section table.
        expected: u64,
        /// XXH3-64 of the bytes.
        actual: u64,
    },
    /// V2: the padding after a section is not zero.
    #[error("padding after section {section} is not zero")]
    NonZeroPadding {
        /// Section id.
        section: SectionId,
    },
    /// V3: a mask has pad bits set past its last element.
    #[error("mask section {section} has pad bits set")]
    MaskPadBits {
        /// Section id.
        section: SectionId,
    },
    /// V4: a row scale is NaN or infinite.
    #[error("row scale section {section} has a non-finite value at row {row}")]
    NonFiniteRowScale {
        /// Section id.
        section: SectionId,
        /// First offending row.
        row: u64,
    },
    /// V5: the tokenizer section is not UTF-8.
    #[error("tokenizer section {section} is not valid UTF-8")]
    TokenizerNotUtf8 {
        /// Section id.
        section: SectionId,
    },
    /// Rule 30: a task has more label names than [`MAX_LABELS`](super::MAX_LABELS).
    #[error("task {task:?} has {count} labels, more than the cap of {max}")]
    TooManyLabels {
        /// Task name.
        task: String,
        /// Number of labels.
        count: u64,
        /// The cap.
        max: u64,
    },
    /// Rule 30: a task has two labels with the same name.
    #[error("task {task:?} has label {label:?} twice")]
    DuplicateLabel {
        /// Task name.
        task: String,
        /// The label.
        label: String,
    },
    /// Rule 31: a task name is not a C string on one line (control characters, e.g. NUL or a
    /// newline) or is longer than [`MAX_TASK_NAME_LEN`](super::MAX_TASK_NAME_LEN) bytes.
    #[error(
        "task {index} has the name {name:?}, which is not a task name (1 to {max} bytes, no \
         control characters)",
        max = super::MAX_TASK_NAME_LEN
    )]
    InvalidTaskName {
        /// The task's index.
        index: u64,
        /// Its name.
        name: String,
    },
    /// Rule 32: a task's scale on a merged tensor with delta is not the one its scale mode gives.
    #[error(
        "task {task:?} has scale mode {mode} but a {found} scale on tensor {tensor:?} (expected \
         {expected})"
    )]
    ScaleModeMismatch {
        /// Task name.
        task: String,
        /// Tensor name.
        tensor: String,
        /// The task's scale mode.
        mode: ScaleMode,
        /// `"none"`, `"tensor"` or `"rows"`: what the mode gives for this tensor.
        expected: &'static str,
        /// `"none"`, `"tensor"` or `"rows"`: what the task stores.
        found: &'static str,
    },
    /// Rule 33: a task's λ is not the one the merge parameters give it.
    #[error("task {task:?} records lambda {found:?}, but the merge parameters give {expected:?}")]
    LambdaMismatch {
        /// Task name.
        task: String,
        /// λ of the merge parameters for this task (`None` for a method without λ).
        expected: Option<f32>,
        /// `TaskEntry::lambda`.
        found: Option<f32>,
    },
    /// Rule 33: `merge.lambda` has neither zero, one, nor one value per task.
    #[error("the merge parameters hold {found} lambda values for {tasks} tasks (expected 0, 1 or {tasks})")]
    LambdaCount {
        /// Values in `merge.lambda`.
        found: u64,
        /// Tasks of the bundle.
        tasks: u64,
    },
    /// Rule 34: the compile report does not have one entry per task.
    #[error("the compile report has {found} task entries, expected {expected}")]
    TaskReportCount {
        /// Entries in `CompileReport::tasks`.
        found: u64,
        /// Number of tasks.
        expected: u64,
    },
    /// Rule 34: a compile report entry names another task than the task at its index.
    #[error("compile report entry {index} is for task {found:?}, expected {expected:?}")]
    TaskReportName {
        /// Index of the entry.
        index: u64,
        /// The name it records.
        found: String,
        /// The task at that index.
        expected: String,
    },
    /// Rule 34: a calibration report chooses a candidate it does not list.
    #[error("task {task:?}'s calibration chose candidate {chosen} of {candidates}")]
    CalibrationChoice {
        /// Task name.
        task: String,
        /// `CalibrationReport::chosen`.
        chosen: u64,
        /// Number of candidates.
        candidates: u64,
    },
    /// Rule 35: decoding the manifest would allocate more than its memory budget.
    #[error(
        "the {length}-byte manifest decodes to more than {budget} bytes of sequences (at most \
         {factor} per manifest byte)",
        factor = super::layout::MANIFEST_DECODE_FACTOR
    )]
    ManifestDecodeBudget {
        /// Manifest length.
        length: u64,
        /// The budget: `MANIFEST_DECODE_FACTOR × length`.
        budget: u64,
    },
    /// V6: a graph section's SHA-256 is not the one its `GraphEntry` records.
    #[error(
        "graph section {section} hashes to SHA-256 {actual}, but the manifest records {recorded}"
    )]
    GraphHashMismatch {
        /// Section id.
        section: SectionId,
        /// `GraphEntry::sha256`.
        recorded: String,
        /// SHA-256 of the section's bytes.
        actual: String,
    },
    /// Rule 36: a section in an encoding the bundle's version does not have (`q8`, `q4` before
    /// version 3; `q3`, `q2` before version 4; `ternary` before version 5).
    #[error("section {section} is stored as {encoding}, which format version {version} does not have (version {since} and later)")]
    EncodingNeedsVersion {
        /// Section id.
        section: SectionId,
        /// Its encoding.
        encoding: crate::encoding::Encoding,
        /// The bundle's version.
        version: u32,
        /// The first version with this encoding.
        since: u32,
    },
    /// Rule 37: a per-task residual or the `tvq` method in a bundle of a version before 4.
    #[error("{what} exists from format version 4 on; this bundle is version {version}")]
    FeatureNeedsVersion {
        /// What the bundle uses, e.g. `task "a" has a residual for tensor "w"`.
        what: String,
        /// The bundle's version.
        version: u32,
    },
    /// V7: a block of a `q8` or `q4` section has a NaN or infinite scale.
    #[error("section {section} has a non-finite scale in block {block}")]
    NonFiniteBlockScale {
        /// Section id.
        section: SectionId,
        /// First offending block.
        block: u64,
    },
    /// `decode_f32`: the section holds a graph or a mask, not numbers.
    #[error("section {section} holds {kind:?}, which does not decode to f32")]
    NotNumeric {
        /// Section id.
        section: SectionId,
        /// Its kind.
        kind: SectionKind,
    },
    /// Writer: the manifest could not be encoded.
    #[error("manifest does not encode: {0}")]
    ManifestEncode(String),
    /// `verify`: the header bytes differ from the ones parsed (the file changed since).
    #[error("the header changed since the bundle was opened")]
    HeaderChanged,
    /// Writer: the manifest given to `finish` already lists sections.
    #[error("the manifest given to finish already has {0} sections; the writer fills them in")]
    SectionsAlreadySet(u64),
    /// Writer: an earlier write failed, the partial file is unusable.
    #[error("an earlier error left the bundle being written to {path} unusable")]
    WriterFailed {
        /// Destination path.
        path: PathBuf,
    },
    /// Writer: an I/O operation failed.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done (`create`, `write`, `sync`, `rename to`, ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Writer: the destination cannot be written safely (not a regular file, a dangling
    /// symbolic link, the process is terminating).
    #[error(transparent)]
    File(#[from] crate::files::FileError),
}
