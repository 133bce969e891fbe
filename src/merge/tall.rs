//! TALL-masks (Wang et al., "Localizing Task Information for Improved Model Merging and
//! Compression", ICML 2024): one merged vector plus a per-task binary mask.
//!
//! For one tensor with task vectors `τ_t`:
//! - `τ_MTL = α · Σ_t τ_t` (summed in `f32` in task order, then scaled);
//! - `m_t[i] = |τ_t[i]| > λ_t · |τ_MTL[i] − τ_t[i]|` — strict `>`, evaluated in `f32`, so an
//!   entry where both sides are 0 (e.g. `τ_t[i] = 0` and `τ_MTL[i] = 0`) is not selected;
//! - `δ = τ_MTL`, `masks = Some(m_t)`, and task `t` is reconstructed as
//!   `θ̂_t = θ_0 + m_t ⊙ τ_MTL`.
//!
//! The mask compares against the *same* `τ_MTL` that is stored, so with `α ≠ 1` it is computed
//! on the scaled sum (the paper uses the unscaled sum, `α = 1`, the default here).
//!
//! We implement the paper's criterion on `|τ_t|`. One public benchmark implementation compares
//! `|θ_0 − τ_t|` instead of `|τ_t|` on the left-hand side; we deliberately do not follow it.
//!
//! `λ_t` is given per task (`lambda`, in task order). A single value is used for every task.
//! The paper selects `λ_t ∈ {0.2, …, 0.6}` on validation data; without calibration data the
//! default is [`DEFAULT_LAMBDA`](crate::format::DEFAULT_LAMBDA).

use super::{check_alpha, check_view, sum_tasks, MergeError, Merger, TensorMerge, TensorView};
use crate::mask::Mask;

/// TALL-masks: `δ = α Σ_t τ_t` and one mask per task.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Tall {
    /// Scale of the summed task vector (default 1, the paper's unscaled sum).
    pub alpha: f32,
    /// Mask threshold `λ_t`, one per task in task order (or one value for all tasks).
    pub lambda: Vec<f32>,
}

impl Merger for Tall {
    fn merge(&mut self, view: &TensorView<'_>) -> Result<TensorMerge, MergeError> {
        let n = check_view(view)?;
        check_alpha(self.alpha)?;
        let lambda = resolve_lambda(&self.lambda, view.task_vectors.len())?;
        let mut mtl = sum_tasks(view.task_vectors, n);
        for d in &mut mtl {
            *d *= self.alpha;
        }
        let masks = tall_masks(view.task_vectors, &mtl, &lambda);
        Ok(TensorMerge {
            delta: mtl,
            masks: Some(masks),
        })
    }
}

/// The per-task `λ_t`: `lambda` itself when it has one value per task, or its single value
/// repeated. Each value must be finite and `>= 0`.
pub(crate) fn resolve_lambda(lambda: &[f32], n_tasks: usize) -> Result<Vec<f32>, MergeError> {
    if let Some(&bad) = lambda.iter().find(|l| !(l.is_finite() && **l >= 0.0)) {
        return Err(MergeError::InvalidParameter {
            name: "lambda",
            value: f64::from(bad),
            why: "a finite number >= 0",
        });
    }
    match lambda {
        [single] => Ok(vec![*single; n_tasks]),
        _ if lambda.len() == n_tasks => Ok(lambda.to_vec()),
        _ => Err(MergeError::InvalidParameter {
            name: "lambda",
            value: lambda.len() as f64,
            why: "needs one value per task, or a single value for all tasks (value = count)",
        }),
    }
}

/// The TALL masks `m_t[i] = |τ_t[i]| > λ_t · |mtl[i] − τ_t[i]|` for every task, against the
/// given merged vector `mtl`. Consensus merging calls it with the unscaled sum. Tasks are paired
/// with `lambda` in order (the caller resolves it to one value per task); entries past the end of
/// a shorter vector are unselected.
pub(crate) fn tall_masks(task_vectors: &[Vec<f32>], mtl: &[f32], lambda: &[f32]) -> Vec<Mask> {
    task_vectors
        .iter()
        .zip(lambda)
        .map(|(tv, &l)| {
            Mask::from_fn(mtl.len(), |i| match (tv.get(i), mtl.get(i)) {
                (Some(&t), Some(&m)) => t.abs() > l * (m - t).abs(),
                _ => false,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    // 3 tasks × 8 elements, α = 1, λ = [0.5, 1, 0.25].
    //   i:     0    1    2    3    4    5    6    7
    //   τ0:    1   -2    0    3   0.5  -1    2    0
    //   τ1:    1    2    0   -1   0.5  -1   -2    1
    //   τ2:   -2    1    0    1   0.5   3    0   -1
    //   MTL:   0    1    0    3   1.5   1    0    0
    // m0 (λ 0.5): |τ0| vs 0.5|MTL−τ0|:
    //   1>0.5 T, 2>1.5 T, 0>0 F, 3>0 T, 0.5>0.5 F, 1>1 F, 2>1 T, 0>0 F → 1101_0010 → 75
    // m1 (λ 1):   1>1 F, 2>1 T, 0>0 F, 1>4 F, 0.5>1 F, 1>2 F, 2>2 F, 1>1 F → bit 1 → 2
    // m2 (λ 0.25): 2>0.5 T, 1>0 T, 0>0 F, 1>0.5 T, 0.5>0.25 T, 3>0.5 T, 0>0 F, 1>0.25 T
    //   → bits 0 1 3 4 5 7 → 1+2+8+16+32+128 = 187
    fn tvs() -> Vec<Vec<f32>> {
        vec![
            vec![1.0, -2.0, 0.0, 3.0, 0.5, -1.0, 2.0, 0.0],
            vec![1.0, 2.0, 0.0, -1.0, 0.5, -1.0, -2.0, 1.0],
            vec![-2.0, 1.0, 0.0, 1.0, 0.5, 3.0, 0.0, -1.0],
        ]
    }

    fn run(alpha: f32, lambda: &[f32], tvs: &[Vec<f32>]) -> Result<TensorMerge, MergeError> {
        let view = TensorView {
            index: 0,
            task_vectors: tvs,
        };
        Tall {
            alpha,
            lambda: lambda.to_vec(),
        }
        .merge(&view)
    }

    fn mask_bytes(out: &TensorMerge) -> Vec<Vec<u8>> {
        out.masks
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.as_bytes().to_vec())
            .collect()
    }

    #[test]
    fn hand_worked() {
        let out = run(1.0, &[0.5, 1.0, 0.25], &tvs()).unwrap();
        assert_eq!(out.delta, vec![0.0, 1.0, 0.0, 3.0, 1.5, 1.0, 0.0, 0.0]);
        assert_eq!(mask_bytes(&out), vec![vec![75], vec![2], vec![187]]);
    }

    #[test]
    fn mask_uses_the_scaled_sum() {
        // α = 0.5: MTL = [0, 0.5, 0, 1.5, 0.75, 0.5, 0, 0]. Task 1 (λ 1):
        //   1>1 F, 2>1.5 T, 0>0 F, 1>2.5 F, 0.5>0.25 T, 1>1.5 F, 2>2 F, 1>1 F → bits 1, 4 → 18
        let out = run(0.5, &[0.5, 1.0, 0.25], &tvs()).unwrap();
        assert_eq!(out.delta, vec![0.0, 0.5, 0.0, 1.5, 0.75, 0.5, 0.0, 0.0]);
        assert_eq!(mask_bytes(&out)[1], vec![18]);
    }

    #[test]
    fn single_lambda_applies_to_every_task() {
        let one = run(1.0, &[1.0], &tvs()).unwrap();
        let three = run(1.0, &[1.0, 1.0, 1.0], &tvs()).unwrap();
        assert_eq!(one, three);
    }

    #[test]
    fn lambda_zero_selects_every_nonzero_entry() {
        // λ = 0: |τ| > 0.
        let out = run(1.0, &[0.0], &tvs()).unwrap();
        let masks = out.masks.unwrap();
        for (m, tv) in masks.iter().zip(tvs()) {
            for (i, x) in tv.iter().enumerate() {
                assert_eq!(m.get(i), *x != 0.0);
            }
        }
    }

    #[test]
    fn errors_and_empty() {
        assert!(matches!(
            run(1.0, &[0.4, 0.4], &tvs()),
            Err(MergeError::InvalidParameter { name: "lambda", .. })
        ));
        assert!(matches!(
            run(1.0, &[0.4, -1.0, 0.4], &tvs()),
            Err(MergeError::InvalidParameter { name: "lambda", .. })
        ));
        assert_eq!(run(1.0, &[0.4], &[]), Err(MergeError::NoTasks));
        let out = run(1.0, &[0.4], &[vec![], vec![]]).unwrap();
        assert!(out.delta.is_empty());
        assert_eq!(
            out.masks.unwrap().iter().map(Mask::len).collect::<Vec<_>>(),
            vec![0, 0]
        );
    }
}
