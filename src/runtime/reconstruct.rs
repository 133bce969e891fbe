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
                Some(id) => {
                    let bits = bundle.section(*id)?;
                    // Validated by `parse` (rule 26) and, on first use, `verify_section` (pad bits).
                    if bits.len() != Mask::packed_len(out.len()) {
                        return Err(crate::format::FormatError::MaskPadBits { section: *id }.into());
                    }
                    Some(bits)
                }
                None => None,
            };
            let g = t.scale;
            match scale {
                Scale::None => apply(out, &scratch.delta, mask, |_| g),
                Scale::Tensor(s) => {
                    let gs = g * s;
                    apply(out, &scratch.delta, mask, |_| gs)
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
                    apply(out, &scratch.delta, mask, |i| {
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
///
/// `mask` is the packed mask (bit `i % 8` of byte `i / 8`, docs/FORMAT.md). It is walked a byte
/// at a time: an empty byte skips eight elements, a full one runs a branch-free inner loop.
fn apply(out: &mut [f32], delta: &[f32], mask: Option<&[u8]>, factor: impl Fn(usize) -> f32) {
    let Some(mask) = mask else {
        for (i, (o, d)) in out.iter_mut().zip(delta).enumerate() {
            *o += factor(i) * d;
        }
        return;
    };
    let blocks = out.chunks_mut(8).zip(delta.chunks(8)).zip(mask);
    for (block, ((o8, d8), &bits)) in blocks.enumerate() {
        let first = block * 8;
        match bits {
            0 => {}
            0xff => {
                for (j, (o, d)) in o8.iter_mut().zip(d8).enumerate() {
                    *o += factor(first + j) * d;
                }
            }
            _ => {
                for (j, (o, d)) in o8.iter_mut().zip(d8).enumerate() {
                    if bits >> j & 1 == 1 {
                        *o += factor(first + j) * d;
                    }
                }
            }
        }
    }
}
