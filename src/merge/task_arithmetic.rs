//! Task arithmetic (Ilharco et al., ICLR 2023): `δ = α · Σ_t τ_t`.
//!
//! The simplest merge: add the task vectors and scale the sum. The sum is accumulated in `f32`
//! in task order and `α` is applied once, after summing (see the numerics notes of
//! [`crate::merge`]). There is no per-task payload: every task uses `δ` as is (`masks = None`).

use super::{check_alpha, check_view, sum_tasks, MergeError, Merger, TensorMerge, TensorView};

/// Task arithmetic: `δ = α · Σ_t τ_t`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TaskArithmetic {
    /// Scale of the summed task vector (default 0.3).
    pub alpha: f32,
}

impl Merger for TaskArithmetic {
    fn merge(&mut self, view: &TensorView<'_>) -> Result<TensorMerge, MergeError> {
        let n = check_view(view)?;
        check_alpha(self.alpha)?;
        let mut delta = sum_tasks(view.task_vectors, n);
        for d in &mut delta {
            *d *= self.alpha;
        }
        Ok(TensorMerge { delta, masks: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(alpha: f32, tvs: &[Vec<f32>]) -> Result<TensorMerge, MergeError> {
        TaskArithmetic { alpha }.merge(&TensorView {
            index: 0,
            task_vectors: tvs,
        })
    }

    #[test]
    fn hand_worked_sum_times_alpha() {
        // 3 tasks × 6 elements, α = 0.5 (exact in binary, so the expectation is exact):
        //   i:   0     1     2     3     4     5
        //   τ0:  1.0  -2.0   0.0   0.5   4.0  -1.0
        //   τ1:  3.0   2.0   0.0  -0.5   0.0  -1.0
        //   τ2: -1.0   1.0   0.0   0.25  2.0  -2.0
        //   Σ:   3.0   1.0   0.0   0.25  6.0  -4.0
        //   δ:   1.5   0.5   0.0   0.125 3.0  -2.0
        let tvs = vec![
            vec![1.0, -2.0, 0.0, 0.5, 4.0, -1.0],
            vec![3.0, 2.0, 0.0, -0.5, 0.0, -1.0],
            vec![-1.0, 1.0, 0.0, 0.25, 2.0, -2.0],
        ];
        let out = run(0.5, &tvs).unwrap();
        assert_eq!(out.delta, vec![1.5, 0.5, 0.0, 0.125, 3.0, -2.0]);
        assert_eq!(out.masks, None);
    }

    #[test]
    fn single_task_alpha_one_is_identity() {
        let tvs = vec![vec![0.1, -0.2, 0.3]];
        assert_eq!(run(1.0, &tvs).unwrap().delta, tvs[0]);
    }

    #[test]
    fn errors_and_empty() {
        assert_eq!(run(0.3, &[]), Err(MergeError::NoTasks));
        assert_eq!(
            run(0.3, &[vec![1.0, 2.0], vec![1.0]]),
            Err(MergeError::LengthMismatch(2, 1))
        );
        assert!(matches!(
            run(f32::NAN, &[vec![1.0]]),
            Err(MergeError::InvalidParameter { name: "alpha", .. })
        ));
        let out = run(0.3, &[vec![], vec![]]).unwrap();
        assert!(out.delta.is_empty());
    }
}
