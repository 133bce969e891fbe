//! TIES-merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.
//!
//! For one tensor with task vectors `τ_t` of `n` entries:
//! 1. **Trim.** Per task, keep the `k = round(density · n)` entries of largest `|τ_t|`
//!    (round half away from zero, computed in `f64`) and zero the rest, giving `τ̂_t`. Ties in
//!    magnitude are broken by the lower flat index first, i.e. the order of a stable sort by
//!    descending `|τ_t|` (`magnitude_rank_mask` in [`crate::merge`]). The TIES paper trims over
//!    the whole model (global top-k); like mergekit we trim **per tensor**, which keeps the
//!    compiler streaming one tensor at a time.
//! 2. **Elect.** `γ = sgn(Σ_t τ̂_t)` element-wise, with `sgn(0) = 0`; the sum is accumulated in
//!    `f32` in task order.
//! 3. **Disjoint merge.** An entry `τ̂_t[i]` *agrees* when `τ̂_t[i] · γ[i] > 0` (so a zero entry,
//!    trimmed or not, never agrees, and nothing agrees where `γ = 0`).
//!    [`TiesReduce::Mean`]: `merged[i] = (Σ agreeing) / (number agreeing)`, 0 if none agree;
//!    [`TiesReduce::Sum`]: `merged[i] = Σ agreeing`. The sums are `f32`, in task order.
//! 4. `δ = α · merged`. No per-task payload (`masks = None`).
//!
//! The core (steps 1–3) is the crate-internal `ties_merge`, which DARE reuses with
//! `density = 1` (no trimming).

use super::{
    check_alpha, check_fraction, check_view, magnitude_rank_mask, round_count, sign, sum_tasks,
    MergeError, Merger, TensorMerge, TensorView, TiesReduce,
};

/// TIES-merging with per-tensor trimming.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Ties {
    /// Scale of the merged vector (default 1).
    pub alpha: f32,
    /// Fraction of entries kept per task and tensor by the trim step (default 0.2).
    pub density: f32,
    /// Mean (default) or sum of the agreeing kept entries.
    pub reduce: TiesReduce,
}

impl Merger for Ties {
    fn merge(&mut self, view: &TensorView<'_>) -> Result<TensorMerge, MergeError> {
        let n = check_view(view)?;
        check_alpha(self.alpha)?;
        check_fraction("density", self.density)?;
        let mut delta = ties_merge(view.task_vectors, n, self.density, self.reduce);
        for d in &mut delta {
            *d *= self.alpha;
        }
        Ok(TensorMerge { delta, masks: None })
    }
}

/// Trim (top `round(density · n)` by magnitude per task), elect sign, disjoint merge — steps 1–3
/// of the module documentation, without the final `α`. Every task vector must have length `n`
/// (checked by the caller with [`super::check_view`]).
pub(crate) fn ties_merge(
    task_vectors: &[Vec<f32>],
    n: usize,
    density: f32,
    reduce: TiesReduce,
) -> Vec<f32> {
    let k = round_count(density, n);
    let trimmed: Vec<Vec<f32>> = task_vectors
        .iter()
        .map(|tv| {
            if k >= n {
                return tv.clone();
            }
            let kept = magnitude_rank_mask(tv, 0, k);
            tv.iter()
                .zip(kept)
                .map(|(&x, keep)| if keep { x } else { 0.0 })
                .collect()
        })
        .collect();
    let elected: Vec<f32> = sum_tasks(&trimmed, n).into_iter().map(sign).collect();
    let mut sum = vec![0.0f32; n];
    let mut count = vec![0u32; n];
    for tv in &trimmed {
        for (((s, c), &x), &g) in sum.iter_mut().zip(count.iter_mut()).zip(tv).zip(&elected) {
            if x * g > 0.0 {
                *s += x;
                *c += 1;
            }
        }
    }
    match reduce {
        TiesReduce::Sum => sum,
        TiesReduce::Mean => sum
            .into_iter()
            .zip(count)
            .map(|(s, c)| if c == 0 { 0.0 } else { s / c as f32 })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 3 tasks × 8 elements; density 0.5 → k = round(0.5 · 8) = 4 per task.
    //   i:    0   1   2   3   4   5   6    7
    //   τ0:   3  -1   2   0  -2   2   0.5 -4   |τ0| order: i7(4) i0(3) i2(2) i4(2) | i5(2) …
    //                                          (three entries tie at 2: lower indices 2, 4 win)
    //   τ̂0:   3   0   2   0  -2   0   0   -4
    //   τ1:  -1   2   1   0   3  -3   0    1   order: i4(3) i5(3) i1(2) i0(1) | i2(1) i7(1) …
    //   τ̂1:  -1   2   0   0   3  -3   0    0
    //   τ2:   2   0  -3   0  -1  -2   0    0   order: i2(3) i0(2) i5(2) i4(1) | zeros
    //   τ̂2:   2   0  -3   0  -1  -2   0    0
    //   Στ̂:   4   2  -1   0   0  -5   0   -4   (i4: -2 + 3 - 1 = 0 → γ = 0)
    //   γ:    1   1  -1   0   0  -1   0   -1
    //   agreeing: i0 {3, 2}, i1 {2}, i2 {-3}, i5 {-3, -2}, i7 {-4}; i3, i4, i6 none.
    //   mean: 2.5  2  -3   0   0  -2.5 0   -4
    //   sum:  5    2  -3   0   0  -5   0   -4
    fn tvs() -> Vec<Vec<f32>> {
        vec![
            vec![3.0, -1.0, 2.0, 0.0, -2.0, 2.0, 0.5, -4.0],
            vec![-1.0, 2.0, 1.0, 0.0, 3.0, -3.0, 0.0, 1.0],
            vec![2.0, 0.0, -3.0, 0.0, -1.0, -2.0, 0.0, 0.0],
        ]
    }

    fn run(alpha: f32, density: f32, reduce: TiesReduce, tvs: &[Vec<f32>]) -> Vec<f32> {
        let view = TensorView {
            index: 0,
            task_vectors: tvs,
        };
        let out = Ties {
            alpha,
            density,
            reduce,
        }
        .merge(&view)
        .unwrap();
        assert_eq!(out.masks, None);
        out.delta
    }

    #[test]
    fn hand_worked_mean() {
        assert_eq!(
            run(1.0, 0.5, TiesReduce::Mean, &tvs()),
            vec![2.5, 2.0, -3.0, 0.0, 0.0, -2.5, 0.0, -4.0]
        );
    }

    #[test]
    fn hand_worked_sum_with_alpha() {
        // α = 0.5 on the sum row above.
        assert_eq!(
            run(0.5, 0.5, TiesReduce::Sum, &tvs()),
            vec![2.5, 1.0, -1.5, 0.0, 0.0, -2.5, 0.0, -2.0]
        );
    }

    #[test]
    fn density_one_is_elect_and_disjoint_mean_without_trim() {
        // No trimming: Στ = [4, 1, 0, 0, 0, -3, 0.5, -3] → γ = [1, 1, 0, 0, 0, -1, 1, -1].
        // i0 {3, 2} → 2.5; i1 {2} → 2; i2 γ = 0 → 0; i5 {-3, -2} → -2.5; i6 {0.5} → 0.5;
        // i7 {-4} → -4.
        assert_eq!(
            run(1.0, 1.0, TiesReduce::Mean, &tvs()),
            vec![2.5, 2.0, 0.0, 0.0, 0.0, -2.5, 0.5, -4.0]
        );
    }

    #[test]
    fn density_zero_gives_zero() {
        assert_eq!(run(1.0, 0.0, TiesReduce::Sum, &tvs()), vec![0.0; 8]);
    }

    #[test]
    fn core_matches_method_without_alpha() {
        let t = tvs();
        assert_eq!(
            ties_merge(&t, 8, 0.5, TiesReduce::Mean),
            run(1.0, 0.5, TiesReduce::Mean, &t)
        );
    }

    #[test]
    fn errors() {
        let t = tvs();
        let view = TensorView {
            index: 0,
            task_vectors: &t,
        };
        let mut bad = Ties {
            alpha: 1.0,
            density: 1.5,
            reduce: TiesReduce::Mean,
        };
        assert!(matches!(
            bad.merge(&view),
            Err(MergeError::InvalidParameter {
                name: "density",
                ..
            })
        ));
        let empty = TensorView {
            index: 0,
            task_vectors: &[],
        };
        let mut ok = Ties {
            alpha: 1.0,
            density: 0.5,
            reduce: TiesReduce::Mean,
        };
        assert_eq!(ok.merge(&empty), Err(MergeError::NoTasks));
        let zero_len = vec![vec![], vec![]];
        let view = TensorView {
            index: 0,
            task_vectors: &zero_len,
        };
        assert!(ok.merge(&view).unwrap().delta.is_empty());
    }
}
