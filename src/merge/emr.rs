//! EMR-merging (Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging",
//! NeurIPS 2024): elect a unified task vector, then per-task masks and rescalers. Data-free.
//!
//! For one tensor with task vectors `τ_t`:
//! - **Elect.** `γ = sgn(Σ_t τ_t)` with `sgn(0) = 0` (sum in `f32` in task order).
//!   `ε[i] = max |τ_t[i]|` over the tasks that agree with the elected sign
//!   (`τ_t[i] · γ[i] > 0`), 0 if none agrees (in particular wherever `γ[i] = 0`).
//!   `τ_uni = γ ⊙ ε`, stored as the shared delta `δ`.
//! - **Masks.** `M_t = (τ_t ⊙ τ_uni > 0)`. Since `τ_uni[i]` is non-zero exactly when some task
//!   agrees with `γ[i]`, and then has the sign `γ[i]`, this is evaluated as the sign test
//!   `τ_t[i] · γ[i] > 0` (no `f32` underflow of the product of two tiny values).
//! - **Rescalers.** `λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni|`, where the sums run over the **whole
//!   model**, as in the EMR-merging reference code (which flattens every parameter into one
//!   vector before computing them): each [`Merger::merge`] call adds the tensor's contributions
//!   to per-task `f64` accumulators, and [`Merger::task_scales`] returns the ratios once every
//!   tensor has been merged (1 for a task whose denominator is 0: its masks select nothing).
//!   Task `t` is reconstructed as `θ̂_t = θ_0 + λ_t · M_t ⊙ τ_uni`.
//!
//! Differences from the reference code, on measure-zero inputs: it elects with
//! `(Σ > 0) · 2 − 1`, i.e. a sum of exactly 0 counts as negative; we use `sgn(0) = 0` as the
//! paper's formula does, so such entries get `τ_uni = 0` and no mask bit.

use super::{check_view, sign, sum_tasks, MergeError, Merger, TensorMerge, TensorView};
use crate::mask::Mask;

/// EMR-merging, with whole-model rescaler statistics accumulated across [`Merger::merge`] calls.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Emr {
    /// Per task: `Σ|τ_t|` over the tensors merged so far.
    abs_sum: Vec<f64>,
    /// Per task: `Σ|M_t ⊙ τ_uni|` over the tensors merged so far.
    kept_sum: Vec<f64>,
}

impl Emr {
    /// A merger for `n_tasks` tasks, with empty rescaler statistics. Every view it merges must
    /// have exactly `n_tasks` task vectors.
    pub(crate) fn new(n_tasks: usize) -> Emr {
        Emr {
            abs_sum: vec![0.0; n_tasks],
            kept_sum: vec![0.0; n_tasks],
        }
    }
}

impl Merger for Emr {
    fn merge(&mut self, view: &TensorView<'_>) -> Result<TensorMerge, MergeError> {
        let n = check_view(view)?;
        let tvs = view.task_vectors;
        if tvs.len() != self.abs_sum.len() {
            return Err(MergeError::TaskCountMismatch {
                expected: self.abs_sum.len(),
                got: tvs.len(),
            });
        }
        let elected: Vec<f32> = sum_tasks(tvs, n).into_iter().map(sign).collect();
        let mut eps = vec![0.0f32; n];
        for tv in tvs {
            for ((e, &x), &g) in eps.iter_mut().zip(tv).zip(&elected) {
                if x * g > 0.0 {
                    *e = e.max(x.abs());
                }
            }
        }
        let unified: Vec<f32> = elected.iter().zip(&eps).map(|(&g, &e)| g * e).collect();
        let mut masks = Vec::with_capacity(tvs.len());
        for ((tv, abs_sum), kept_sum) in tvs.iter().zip(&mut self.abs_sum).zip(&mut self.kept_sum) {
            let bits: Vec<bool> = tv
                .iter()
                .zip(&elected)
                .map(|(&x, &g)| x * g > 0.0)
                .collect();
            *abs_sum += tv.iter().map(|&x| f64::from(x.abs())).sum::<f64>();
            *kept_sum += bits
                .iter()
                .zip(&unified)
                .filter(|(&b, _)| b)
                .map(|(_, &u)| f64::from(u.abs()))
                .sum::<f64>();
            masks.push(Mask::from_fn(n, |i| bits.get(i).copied().unwrap_or(false)));
        }
        Ok(TensorMerge {
            delta: unified,
            masks: Some(masks),
        })
    }

    /// `λ_t = Σ|τ_t| / Σ|M_t ⊙ τ_uni|` over every tensor merged so far (1 where the denominator
    /// is 0, or for a task index the merger was not built for).
    fn task_scales(&self, n_tasks: usize) -> Vec<f32> {
        (0..n_tasks)
            .map(|t| match (self.abs_sum.get(t), self.kept_sum.get(t)) {
                (Some(&num), Some(&den)) if den > 0.0 => (num / den) as f32,
                _ => 1.0,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 3 tasks × 8 elements.
    //   i:      0    1    2    3    4    5      6    7
    //   τ0:     2   -1    0    1   -3    0.5    0    1
    //   τ1:    -1   -2    0    3    1   -0.5    0   -1
    //   τ2:     1    4    0   -1    2   -0.25   0    2
    //   Σ:      2    1    0    3    0   -0.25   0    2
    //   γ:      1    1    0    1    0   -1      0    1
    //   agree: {0,2} {2}  -  {0,1}  -  {1,2}    -  {0,2}
    //   ε:      2    4    0    3    0    0.5    0    2
    //   τ_uni:  2    4    0    3    0   -0.5    0    2
    //   M0:     1    0    0    1    0    0      0    1  → 1+8+128      = 137
    //   M1:     0    0    0    1    0    1      0    0  → 8+32         = 40
    //   M2:     1    1    0    0    0    1      0    1  → 1+2+32+128   = 163
    //   λ0 = Σ|τ0| / Σ|M0 τ_uni| = 8.5 / (2+3+2)       = 8.5 / 7
    //   λ1 = 8.5 / (3+0.5)                              = 8.5 / 3.5
    //   λ2 = 10.25 / (2+4+0.5+2)                        = 10.25 / 8.5
    fn tvs() -> Vec<Vec<f32>> {
        vec![
            vec![2.0, -1.0, 0.0, 1.0, -3.0, 0.5, 0.0, 1.0],
            vec![-1.0, -2.0, 0.0, 3.0, 1.0, -0.5, 0.0, -1.0],
            vec![1.0, 4.0, 0.0, -1.0, 2.0, -0.25, 0.0, 2.0],
        ]
    }

    fn merge(m: &mut Emr, tvs: &[Vec<f32>]) -> Result<TensorMerge, MergeError> {
        m.merge(&TensorView {
            index: 0,
            task_vectors: tvs,
        })
    }

    #[test]
    fn hand_worked() {
        let mut m = Emr::new(3);
        let out = merge(&mut m, &tvs()).unwrap();
        assert_eq!(out.delta, vec![2.0, 4.0, 0.0, 3.0, 0.0, -0.5, 0.0, 2.0]);
        let bytes: Vec<&[u8]> = out
            .masks
            .as_ref()
            .unwrap()
            .iter()
            .map(Mask::as_bytes)
            .collect();
        assert_eq!(bytes, vec![&[137u8][..], &[40], &[163]]);
        assert_eq!(
            m.task_scales(3),
            vec![
                (8.5f64 / 7.0) as f32,
                (8.5f64 / 3.5) as f32,
                (10.25f64 / 8.5) as f32
            ]
        );
    }

    #[test]
    fn rescaler_is_over_the_whole_model() {
        // A second tensor whose sum is 0 everywhere: γ = 0, no mask bit, but Σ|τ_t| grows.
        //   τ0 = [1, 0], τ1 = [0, 0], τ2 = [-1, 0] → numerators +1, +0, +1; denominators +0.
        let mut m = Emr::new(3);
        merge(&mut m, &tvs()).unwrap();
        let out = merge(&mut m, &[vec![1.0, 0.0], vec![0.0, 0.0], vec![-1.0, 0.0]]).unwrap();
        assert_eq!(out.delta, vec![0.0, 0.0]);
        assert!(out.masks.unwrap().iter().all(|k| k.count_ones() == 0));
        assert_eq!(
            m.task_scales(3),
            vec![
                (9.5f64 / 7.0) as f32,
                (8.5f64 / 3.5) as f32,
                (11.25f64 / 8.5) as f32
            ]
        );
    }

    #[test]
    fn zero_denominator_gives_scale_one() {
        let mut m = Emr::new(2);
        assert_eq!(m.task_scales(2), vec![1.0, 1.0]);
        // Task 1 is all zero: never agrees, numerator 0, denominator 0.
        merge(&mut m, &[vec![1.0, -2.0], vec![0.0, 0.0]]).unwrap();
        assert_eq!(m.task_scales(2), vec![1.0, 1.0]);
        assert_eq!(m.task_scales(3), vec![1.0, 1.0, 1.0]);
    }

    #[test]
    fn tiny_values_do_not_underflow_the_mask() {
        // 1e-30 · 1e-30 underflows to 0 in f32, the sign test does not.
        let mut m = Emr::new(2);
        let out = merge(&mut m, &[vec![1e-30], vec![2e-30]]).unwrap();
        assert_eq!(out.delta, vec![2e-30]);
        assert!(out.masks.unwrap().iter().all(|k| k.get(0)));
    }

    #[test]
    fn errors_and_empty() {
        let mut m = Emr::new(3);
        assert_eq!(merge(&mut m, &[]), Err(MergeError::NoTasks));
        assert_eq!(
            merge(&mut m, &[vec![1.0], vec![1.0]]),
            Err(MergeError::TaskCountMismatch {
                expected: 3,
                got: 2
            })
        );
        let out = merge(&mut m, &[vec![], vec![], vec![]]).unwrap();
        assert!(out.delta.is_empty());
        assert_eq!(out.masks.map(|k| k.len()), Some(3));
        assert_eq!(m.task_scales(3), vec![1.0; 3]);
    }
}
