//! `taskpack export`: one task of a bundle as a standalone ONNX model.
//!
//! The task's weights are reconstructed by the runtime's reconstruction rule (src/runtime/reconstruct.rs,
//! the same code the engine binds) and put back as initializers of the task's stored graph, so any ONNX runtime
//! can check a bundle against the original checkpoints.

use crate::compile::error::CompileError;
use crate::runtime::reconstruct::{self, DecodeBuffers};
use crate::runtime::Bundle;

/// Builds the standalone ONNX model of task `task`. Every section it reads is checksum-verified.
pub fn export_task(bundle: &Bundle, task: &str) -> Result<Vec<u8>, CompileError> {
    let index = bundle.task_index(task)?;
    let manifest = bundle.manifest();
    let entry = manifest
        .tasks
        .get(index)
        .ok_or(crate::runtime::Error::OutOfRange {
            what: "task",
            index,
            count: manifest.tasks.len(),
        })?;
    // Validated by `parse` (rule 20): the graph index is in range.
    let graph = manifest.graphs.get(entry.graph as usize).ok_or(
        crate::format::FormatError::GraphOutOfRange {
            task: entry.name.clone(),
            graph: entry.graph,
            count: manifest.graphs.len() as u64,
        },
    )?;
    let mut values = Vec::new();
    let mut scratch = DecodeBuffers::default();
    let mut tensors = Vec::with_capacity(manifest.tensors.len());
    for (i, t) in manifest.tensors.iter().enumerate() {
        let shape = reconstruct::task_tensor(bundle, index, i, &mut values, &mut scratch)?;
        let mut raw = Vec::new();
        t.dtype.encode(&values, &mut raw);
        tensors.push(crate::onnx::TensorBytes {
            name: t.name.clone(),
            dtype: t.dtype,
            shape,
            data: raw,
        });
    }
    crate::onnx::restore_initializers(bundle.section(graph.section)?, tensors).map_err(|source| {
        CompileError::Export {
            task: task.to_string(),
            source,
        }
    })
}
