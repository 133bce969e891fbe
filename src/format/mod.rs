//! The `.tpk` bundle format (normative spec: docs/FORMAT.md).
//!
//! A bundle is `header (64 bytes) | data region | manifest`: the bulk bytes (graphs, base
//! weights, merged deltas, masks, row scales, private tensors) are 64-byte aligned sections that
//! tile the data region exactly, and the manifest that describes them comes last so the compiler
//! can stream sections to disk without holding them in memory.
//!
//! Why the format is shaped like this:
//! - **Opening is cheap and safe.** [`parse`] checks the header, the manifest and the section
//!   table against every structural rule in time independent of the weights' size; the bulk
//!   checks (checksums, padding) run on first use of a section or all at once
//!   ([`ParsedBundle::verify`]). It only borrows `&[u8]`; memory-mapping is the caller's choice.
//! - **No arithmetic surprises.** All size arithmetic lives in `layout.rs`, checked; caps bound
//!   every count and length (GGUF's overflow CVEs came from size arithmetic spread everywhere).
//! - **Exact cover.** Sections tile the data region with zero padding and no trailing bytes, and
//!   every section is referenced exactly once by a reference of its kind (safetensors' rule):
//!   there is no place for unvalidated bytes to hide.
//! - **Atomic writes.** [`BundleWriter`] (feature `compiler`) writes a temporary file and renames
//!   it into place; an interrupted compile leaves nothing behind.

pub(crate) mod budget;
#[cfg(test)]
mod decode_memory;
mod error;
mod header;
pub(crate) mod layout;
pub(crate) mod manifest;
mod params;
mod reader;
#[cfg(feature = "compiler")]
mod writer;

pub use crate::dtype::DType;
pub use crate::encoding::Encoding;
pub use error::FormatError;
pub use header::{Header, MAGIC, VERSION};
pub use layout::{
    ALIGNMENT, MANIFEST_DECODE_FACTOR, MAX_ELEMENTS, MAX_GRAPHS, MAX_LABELS, MAX_MANIFEST_LEN,
    MAX_NAME_LEN, MAX_RANK, MAX_SECTIONS, MAX_TASKS, MAX_TASK_NAME_LEN, MAX_TENSORS,
};
pub use manifest::{
    CalibrationReport, CandidateScore, CompileReport, GraphEntry, InputRecord, Manifest,
    Provenance, Scale, SectionEntry, SectionId, SectionKind, SizeReport, Stored, TaskEntry,
    TaskReport, TaskTensor, TensorEntry, TensorStorage,
};
pub use params::{DareBase, MergeParams, Method, ScaleMode, TiesReduce, DEFAULT_LAMBDA};
pub use reader::{is_valid_task_name, parse, sha256_hex, task_lambda, ParsedBundle};
#[cfg(feature = "compiler")]
pub use writer::{BundleWriter, SectionSink};
