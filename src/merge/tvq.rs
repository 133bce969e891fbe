//! Task vector quantization (Kim et al., "Task Vector Quantization for Memory-Efficient Model
//! Merging", ICCV 2025): no merged model at all. Each task keeps its own task vector
//! `τ_t = θ_t − θ_0`, stored quantized; the compiler writes it as the task's residual
//! (`TaskTensor::Residual`, `--residual-dtype`, docs/METHODS.md "Per-task residuals"), so the
//! reconstruction is `θ̂_t = θ_0 + Q(τ_t)`.
//!
//! As a merger it is the trivial one: the shared delta is zero and there are no masks. What
//! makes the method is the per-task storage, which is the pipeline's (every task's residual
//! is `θ_t` minus what the shared parts reconstruct, here the base alone).

use super::{check_view, MergeError, Merger, TensorMerge, TensorView};

/// No shared delta: every task's task vector goes into its residual.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Tvq;

impl Merger for Tvq {
    fn merge(&mut self, view: &TensorView<'_>) -> Result<TensorMerge, MergeError> {
        let n = check_view(view)?;
        Ok(TensorMerge {
            delta: vec![0.0; n],
            masks: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_nothing() {
        let tvs = vec![vec![1.0, -2.0], vec![0.5, 3.0]];
        let out = Tvq
            .merge(&TensorView {
                index: 0,
                task_vectors: &tvs,
            })
            .unwrap();
        assert_eq!(out.delta, vec![0.0, 0.0]);
        assert_eq!(out.masks, None);
        let ragged = vec![vec![1.0], vec![1.0, 2.0]];
        let err = Tvq.merge(&TensorView {
            index: 0,
            task_vectors: &ragged,
        });
        assert_eq!(err, Err(MergeError::LengthMismatch(1, 2)));
    }
}
