//! taskpack: one pretrained backbone, many fine-tuned tasks, one file, instant task switching.
//!
//! The crate has two halves that share the bundle format:
//! - the **compiler** (feature `compiler`, on by default): reads a base checkpoint and N
//!   fine-tuned task checkpoints, merges their task vectors with one of the [`merge`] methods and
//!   writes a single self-describing `.tpk` bundle ([`format`](mod@format));
//! - the **runtime** (always built, no compiler dependencies): opens a bundle, validates it and
//!   reconstructs any task's weights.
//!
//! See README.md for the command line and docs/FORMAT.md for the normative file format.
#![deny(missing_docs)]

pub mod dtype;
pub mod files;
pub mod format;
pub mod mask;
pub mod merge;
mod mmap;
#[cfg(feature = "npz")]
pub mod npz;
pub mod onnx;
pub mod runtime;

#[cfg(feature = "compiler")]
pub mod compile;
