//! The compiler: checkpoints in, one bundle out (feature `compiler`).
//!
//! Readers (`checkpoint.rs`: ONNX and safetensors) feed the `pipeline`, which merges task
//! vectors with one of the merge methods (`src/merge/`, docs/METHODS.md) and streams sections to the bundle writer;
//! `fidelity` measures each task's reconstruction for the report, `calibrate` ([`compile_calibrated`]) picks each
//! task's setting by agreement with its original model on unlabeled inputs. (Turning a task of a
//! bundle back into a standalone ONNX model is [`crate::export`]: it reads a bundle, it does not
//! compile one.)

mod calibrate;
pub(crate) mod checkpoint;
pub(crate) mod error;
pub(crate) mod fidelity;
mod fitted;
mod memory;
mod onnx_reader;
mod pipeline;
mod safetensors_reader;
mod size_budget;

pub use crate::merge::MergeError;
pub use crate::onnx::OnnxError;
pub use calibrate::{compile_calibrated, Calibration};
pub use error::CompileError;
pub use pipeline::{compile, CompileOptions, Progress};
pub use size_budget::{
    compile_within, residual_storage_name, storage_name, Budget, BudgetChoice, TaskUpgrade,
    STORAGE_LADDER, TVQ_STORAGE_LADDER,
};
