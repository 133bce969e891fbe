//! taskpack: one pretrained backbone, many fine-tuned tasks, one file, instant task switching.
//!
//! The crate has two halves that share the bundle format ([`format`](mod@format)):
//! - the **runtime** ([`runtime`], always built; with the default feature `text`, text in and
//!   label out): opens a bundle, validates it, reconstructs any task's weights and runs the task
//!   with tract. This is what an app links, and what the C ABI (`ffi/`) wraps;
//! - the **compiler** (feature `compiler`, off by default: [`compile`], [`export`]; the merge
//!   methods are its private `merge` module): reads a base
//!   checkpoint and N fine-tuned task checkpoints, merges their task vectors and writes a single
//!   self-describing `.tpk` bundle.
//!
//! The layers: `format` ← `merge` ← `compile`, and `format` ← `runtime`; the runtime never
//! depends on the compiler, and a build without `compiler` does not compile `merge` or
//! `compile` at all. The engine's API exposes tract 0.23.9 types (re-exported by
//! [`runtime`]).
//!
//! See README.md for the command line and docs/FORMAT.md for the normative file format.
#![deny(missing_docs)]
// With `internals` on, every `pub` item is either reachable from the crate root or flagged (CI
// runs clippy with all features); without it, the items `internals` re-exports are unreachable.
#![cfg_attr(feature = "internals", warn(unreachable_pub))]

mod dtype;
mod encoding;
pub mod files;
pub mod format;
#[cfg(any(feature = "compiler", test))]
mod mask;
#[cfg(feature = "compiler")]
mod merge;
mod mmap;
#[cfg(feature = "npz")]
pub mod npz;
mod onnx;
pub mod prelude;
pub mod runtime;

#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod internals;

#[cfg(feature = "compiler")]
pub mod compile;
#[cfg(feature = "compiler")]
pub mod export;

/// The README's Rust snippets, compiled as doctests so that they stay true to the API.
#[cfg(all(doctest, feature = "text"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
