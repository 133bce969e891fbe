//! Consensus merging (Wang et al., ICML 2024, same paper as TALL-masks): keep only the weights
//! that at least `k` tasks' TALL masks select, in one merged model for all tasks.
//!
//! For one tensor with task vectors `τ_t`:
//! - `Σ = Σ_t τ_t` (summed in `f32` in task order, **unscaled**);
//! - the TALL masks on that sum, `m_t[i] = |τ_t[i]| > λ_t · |Σ[i] − τ_t[i]|`
//!   (`tall_masks` of [`super::tall`]; `lambda` resolved as in [`super::tall`]);
//! - `m_cons[i] = (Σ_t m_t[i] ≥ k)` with `k = min_tasks` (`k = 0` keeps every weight, and a
//!   `k` above the number of tasks keeps none);
//! - `δ = α · m_cons ⊙ Σ`, `masks = None`: every task uses the same consensus model, which is why
//!   it serves as an "all tasks" fallback.
//!
//! The masks always use the unscaled sum, whatever `α` (the paper's TALL masks are built on the
//! unscaled multi-task vector); `α` only scales the result.

use super::tall::{resolve_lambda, tall_masks};
use super::{check_alpha, check_view, sum_tasks, MergeError, Merger, TensorMerge, TensorView};

/// Consensus merging: `δ = α · [Σ_t m_t ≥ k] ⊙ Σ_t τ_t`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Consensus {
    /// Scale of the kept summed vector (default 0.3).
    pub alpha: f32,
    /// TALL threshold `λ_t`, one per task in task order (or one value for all tasks).
    pub lambda: Vec<f32>,
    /// Minimum number of task masks that must select a weight (`k`, default 2).
    pub min_tasks: u32,
}

impl Merger for Consensus {
    fn merge(&mut self, view: &TensorView<'_>) -> Result<TensorMerge, MergeError> {
        let n = check_view(view)?;
        check_alpha(self.alpha)?;
        let lambda = resolve_lambda(&self.lambda, view.task_vectors.len())?;
        let sum = sum_tasks(view.task_vectors, n);
        let masks = tall_masks(view.task_vectors, &sum, &lambda);
        let mut votes = vec![0u32; n];
        for m in &masks {
            for (i, v) in votes.iter_mut().enumerate() {
                *v += u32::from(m.get(i));
            }
        }
        let delta = sum
            .into_iter()
            .zip(votes)
            .map(|(s, v)| {
                if v >= self.min_tasks {
                    self.alpha * s
                } else {
                    0.0
                }
            })
            .collect();
        Ok(TensorMerge { delta, masks: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The TALL example (tall.rs): 3 tasks × 8, λ = [0.5, 1, 0.25], unscaled
    //   Σ = [0, 1, 0, 3, 1.5, 1, 0, 0]
    //   m0 = 1 1 0 1 0 0 1 0
    //   m1 = 0 1 0 0 0 0 0 0
    //   m2 = 1 1 0 1 1 1 0 1
    //   votes = 2 3 0 2 1 1 1 1
    // k = 2 → m_cons = 1 1 0 1 0 0 0 0 → δ = 0.5 · [0, 1, 0, 3, 0, 0, 0, 0]
    // (had the masks used the 0.5-scaled sum, m1[4] would be set — see tall.rs — and i4 would
    // get 2 votes: the expectation below checks the unscaled sum is used.)
    fn tvs() -> Vec<Vec<f32>> {
        vec![
            vec![1.0, -2.0, 0.0, 3.0, 0.5, -1.0, 2.0, 0.0],
            vec![1.0, 2.0, 0.0, -1.0, 0.5, -1.0, -2.0, 1.0],
            vec![-2.0, 1.0, 0.0, 1.0, 0.5, 3.0, 0.0, -1.0],
        ]
    }

    fn run(alpha: f32, min_tasks: u32, tvs: &[Vec<f32>]) -> Result<TensorMerge, MergeError> {
        let view = TensorView {
            index: 0,
            task_vectors: tvs,
        };
        Consensus {
            alpha,
            lambda: vec![0.5, 1.0, 0.25],
            min_tasks,
        }
        .merge(&view)
    }

    #[test]
    fn hand_worked_k2() {
        let out = run(0.5, 2, &tvs()).unwrap();
        assert_eq!(out.delta, vec![0.0, 0.5, 0.0, 1.5, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(out.masks, None);
    }

    #[test]
    fn other_k() {
        // k = 1: every entry with a vote → 0.5 · [0, 1, 0, 3, 1.5, 1, 0, 0].
        assert_eq!(
            run(0.5, 1, &tvs()).unwrap().delta,
            vec![0.0, 0.5, 0.0, 1.5, 0.75, 0.5, 0.0, 0.0]
        );
        // k = 3: only i1.
        assert_eq!(
            run(0.5, 3, &tvs()).unwrap().delta,
            vec![0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        );
        // k = 0: plain task arithmetic; k = 4 > T: nothing.
        assert_eq!(
            run(0.5, 0, &tvs()).unwrap().delta,
            vec![0.0, 0.5, 0.0, 1.5, 0.75, 0.5, 0.0, 0.0]
        );
        assert_eq!(run(0.5, 4, &tvs()).unwrap().delta, vec![0.0; 8]);
    }

    #[test]
    fn errors() {
        assert_eq!(run(0.5, 2, &[]), Err(MergeError::NoTasks));
        assert!(matches!(
            run(0.5, 2, &[vec![1.0; 8], vec![1.0; 8]]),
            Err(MergeError::InvalidParameter { name: "lambda", .. })
        ));
        assert_eq!(
            run(0.5, 2, &[vec![1.0; 8], vec![1.0; 7], vec![1.0; 8]]),
            Err(MergeError::LengthMismatch(8, 7))
        );
    }
}
