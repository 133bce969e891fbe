//! The on-device half: open a bundle, reconstruct any task's weights and run it ([`Engine`]).
//!
//! Built without any compiler dependency: an app links this (and the C ABI) only. With the
//! `text` feature, `TextClassifier` runs tasks on text with the bundle's tokenizer.

mod argmax;
mod bundle;
mod cache;
pub(crate) mod check;
mod compute;
mod engine;
mod error;
pub(crate) mod guard;
pub(crate) mod reconstruct;
mod template;
#[cfg(feature = "text")]
pub(crate) mod text;

pub use argmax::argmax;
pub use bundle::Bundle;
pub use check::{check_graphs, GraphProblem, MAX_CONSTANT_SHAPE_ELEMENTS};
pub use compute::{bf16_available, compute, set_compute, Compute};
pub use engine::{BoundTask, Engine, EngineOptions, EngineStats, IoInfo};
pub use error::Error;
#[cfg(feature = "compiler")]
pub(crate) use template::read_names;
#[cfg(feature = "text")]
pub use text::{Prediction, TextClassifier};

/// tract types of the engine's API, re-exported so that users need no direct tract dependency.
pub use tract_onnx::prelude::{tvec, DatumType, IntoTValue, TValue, TVec, Tensor};
