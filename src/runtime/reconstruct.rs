//! Reconstruction of a task's weights from a bundle: `θ̂_t = θ_0 + g_t · s_t ⊙ (m_t ⊙ δ)`.
//!
//! This is the one implementation of the normative rule of docs/FORMAT.md ("Reconstruction"):
//! the exporter and the runtime both call it, so an exported ONNX model and the runtime's bound
//! weights are bit-identical. Arithmetic is `f32`, base and delta decoded to `f32` first, the
//! factor `g · s` formed before it multiplies `δ`, and no fused multiply-add.

use crate::format::manifest::{Scale, TaskTensor, TensorStorage};
use crate::mask::Mask;
use crate::runtime::{Bundle, Error};

/// Reusable scratch buffers, so reconstructing many tensors allocates once.
#[derive(Debug, Default)]
pub struct Scratch {
    delta: Vec<f32>,
    rows: Vec<f32>,
}

/// Reconstructs tensor `tensor` of task `task` into `out` (cleared first) and returns its shape.
/// Every section read is checksum-verified on first use.
pub fn task_tensor(
    bundle: &Bundle,
    task: usize,
    tensor: usize,
    out: &mut Vec<f32>,
    scratch: &mut Scratch,
) -> Result<Vec<u64>, Error> {
    let manifest = bundle.manifest();
    let t = manifest.tasks.get(task).ok_or(Error::OutOfRange {
        what: "task",
        index: task,
        count: manifest.tasks.len(),
    })?;
    let out_of_range = || Error::OutOfRange {
        what: "tensor",
        index: tensor,
        count: manifest.tensors.len(),
    };
    let entry = manifest.tensors.get(tensor).ok_or_else(out_of_range)?;
    // Validated by `parse` (rules 27–29): one module per tensor, of the matching variant.
    let module = t.tensors.get(tensor).ok_or_else(out_of_range)?;
    match (module, &entry.storage) {
        (TaskTensor::Private { stored, shape }, _) => {
            bundle.decode_f32(stored.section, out)?;
            Ok(shape.clone())
        }
        (TaskTensor::Merged { mask, scale }, TensorStorage::Merged { base, delta }) => {
            bundle.decode_f32(base.section, out)?;
            let Some(delta) = delta else {
                return Ok(entry.shape.clone());
            };
            bundle.decode_f32(delta.section, &mut scratch.delta)?;
            let mask = match mask {
                Some(id) => Some(
                    Mask::from_packed(out.len(), bundle.section(*id)?.to_vec())
                        .ok_or(crate::format::FormatError::MaskPadBits { section: *id })?,
                ),
                None => None,
            };
            let g = t.scale;
            match scale {
                Scale::None => apply(out, &scratch.delta, mask.as_ref(), |_| g),
                Scale::Tensor(s) => {
                    let gs = g * s;
                    apply(out, &scratch.delta, mask.as_ref(), |_| gs)
                }
                Scale::Rows(id) => {
                    bundle.decode_f32(*id, &mut scratch.rows)?;
                    // Validated: rows × row length == elements, rows ≥ 1.
                    let row_len = out
                        .len()
                        .checked_div(scratch.rows.len())
                        .unwrap_or(0)
                        .max(1);
                    let rows = &scratch.rows;
                    apply(out, &scratch.delta, mask.as_ref(), |i| {
                        rows.get(i / row_len).map_or(0.0, |s| g * s)
                    })
                }
            }
            Ok(entry.shape.clone())
        }
        // Unreachable after validation (rule 28); treated as the base alone would be wrong.
        (TaskTensor::Merged { .. }, TensorStorage::Private) => Err(Error::Format(
            crate::format::FormatError::TaskTensorMismatch {
                task: t.name.clone(),
                tensor: entry.name.clone(),
                expected: "private",
                found: "merged",
            },
        )),
    }
}

/// `out[i] += factor(i) · δ[i]` where the mask selects `i`.
fn apply(out: &mut [f32], delta: &[f32], mask: Option<&Mask>, factor: impl Fn(usize) -> f32) {
    match mask {
        None => {
            for (i, (o, d)) in out.iter_mut().zip(delta).enumerate() {
                *o += factor(i) * d;
            }
        }
        Some(m) => {
            for (i, (o, d)) in out.iter_mut().zip(delta).enumerate() {
                if m.get(i) {
                    *o += factor(i) * d;
                }
            }
        }
    }
}
