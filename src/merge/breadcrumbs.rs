//! Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): drop outliers and small entries, then
//! task arithmetic.
//!
//! Per tensor and per task, with `n` entries:
//! 1. Rank the entries by `|τ_t|` descending, ties broken by the lower flat index first (the
//!    order of a stable sort by descending magnitude, `magnitude_rank_mask` in [`crate::merge`]).
//! 2. Drop the first `n_top = floor(gamma · n)` entries (the large outliers).
//! 3. Keep the next `n_keep = min(round(density · n), n − n_top)` entries (`round` half away
//!    from zero); drop the rest (the small entries). So `density` is the kept fraction of the
//!    whole tensor, not of what remains after the outliers, and it is capped by what remains.
//! 4. `δ = α · Σ_t kept(τ_t)`, summed in `f32` in task order. No per-task payload.
//!
//! The counts are computed in `f64` from the `f32` parameters, so the `f32` rounding of the
//! fraction counts: e.g. `gamma = 0.7` is `0.699999988…` in `f32` and `floor(0.7 · 10) = 6`.

use super::{
    check_alpha, check_fraction, check_view, floor_count, magnitude_rank_mask, round_count,
    MergeError, Merger, TensorMerge, TensorView,
};

/// Model Breadcrumbs: per task keep the magnitude band below the top `gamma` fraction, of size
/// `density · n`, then task arithmetic.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Breadcrumbs {
    /// Scale of the summed vector (default 0.3).
    pub alpha: f32,
    /// Fraction of the tensor's entries kept per task (default 0.9).
    pub density: f32,
    /// Fraction of largest-magnitude entries dropped as outliers (default 0.01).
    pub gamma: f32,
}

impl Merger for Breadcrumbs {
    fn merge(&mut self, view: &TensorView<'_>) -> Result<TensorMerge, MergeError> {
        let n = check_view(view)?;
        check_alpha(self.alpha)?;
        check_fraction("density", self.density)?;
        check_fraction("gamma", self.gamma)?;
        let n_top = floor_count(self.gamma, n);
        let n_keep = round_count(self.density, n).min(n - n_top);
        let mut delta = vec![0.0f32; n];
        for tv in view.task_vectors {
            let kept = magnitude_rank_mask(tv, n_top, n_keep);
            for ((d, &x), keep) in delta.iter_mut().zip(tv).zip(kept) {
                if keep {
                    *d += x;
                }
            }
        }
        for d in &mut delta {
            *d *= self.alpha;
        }
        Ok(TensorMerge { delta, masks: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(alpha: f32, density: f32, gamma: f32, tvs: &[Vec<f32>]) -> Vec<f32> {
        let view = TensorView {
            index: 0,
            task_vectors: tvs,
        };
        let out = Breadcrumbs {
            alpha,
            density,
            gamma,
        }
        .merge(&view)
        .unwrap();
        assert_eq!(out.masks, None);
        out.delta
    }

    // 3 tasks × 10 elements; gamma 0.1 → n_top = floor(1.0000000149) = 1;
    // density 0.5 → n_keep = min(round(5), 9) = 5: keep ranks 1..=5.
    //   i:    0   1    2    3   4   5    6   7      8    9
    //   τ0:   5  -1   0.5   3  -3   0    2  -0.25   1    4
    //     order i0 | i9 i3 i4 i6 i1 | i8 i2 i7 i5   (|1| tie: i1 before i8)
    //     kept:   0  -1   0    3  -3   0    2   0      0    4
    //   τ1:   1   2   -2    0   6  -1   0.5   2    -0.5  0
    //     order i4 | i1 i2 i7 i0 i5 | i6 i8 i3 i9
    //     kept:   1   2   -2    0   0  -1    0   2      0    0
    //   τ2:  -2   0    0    1   1  -1    7   0.5   -2    3
    //     order i6 | i9 i0 i8 i3 i4 | i5 i7 i1 i2   (|1| tie: i3, i4 before i5)
    //     kept:  -2   0    0    1   1   0    0   0     -2    3
    //   Σ:   -1   1   -2    4  -2  -1    2   2     -2    7
    //   δ = 0.5 Σ: -0.5 0.5 -1 2 -1 -0.5 1 1 -1 3.5
    fn tvs() -> Vec<Vec<f32>> {
        vec![
            vec![5.0, -1.0, 0.5, 3.0, -3.0, 0.0, 2.0, -0.25, 1.0, 4.0],
            vec![1.0, 2.0, -2.0, 0.0, 6.0, -1.0, 0.5, 2.0, -0.5, 0.0],
            vec![-2.0, 0.0, 0.0, 1.0, 1.0, -1.0, 7.0, 0.5, -2.0, 3.0],
        ]
    }

    #[test]
    fn hand_worked() {
        assert_eq!(
            run(0.5, 0.5, 0.1, &tvs()),
            vec![-0.5, 0.5, -1.0, 2.0, -1.0, -0.5, 1.0, 1.0, -1.0, 3.5]
        );
    }

    #[test]
    fn no_outliers_full_density_is_task_arithmetic() {
        let t = tvs();
        let ta: Vec<f32> = super::super::sum_tasks(&t, 10)
            .iter()
            .map(|x| 0.5 * x)
            .collect();
        assert_eq!(run(0.5, 1.0, 0.0, &t), ta);
    }

    #[test]
    fn density_capped_by_what_remains_and_extremes() {
        let t = tvs();
        // gamma 0.1, density 1: n_keep = min(10, 9) = 9 → everything but each task's top entry.
        // Σ without i0 of τ0 (5), i4 of τ1 (6), i6 of τ2 (7):
        //   [1-2, -1+2, 0.5-2, 3+1, -3+1, -1-1, 2+0.5, -0.25+2+0.5, 1-0.5-2, 4+3]
        assert_eq!(
            run(1.0, 1.0, 0.1, &t),
            vec![-1.0, 1.0, -1.5, 4.0, -2.0, -2.0, 2.5, 2.25, -1.5, 7.0]
        );
        assert_eq!(run(1.0, 1.0, 1.0, &t), vec![0.0; 10]);
        assert_eq!(run(1.0, 0.0, 0.0, &t), vec![0.0; 10]);
    }

    #[test]
    fn errors_and_empty() {
        let t = tvs();
        let view = TensorView {
            index: 0,
            task_vectors: &t,
        };
        let mut m = Breadcrumbs {
            alpha: 1.0,
            density: 0.5,
            gamma: f32::NAN,
        };
        assert!(matches!(
            m.merge(&view),
            Err(MergeError::InvalidParameter { name: "gamma", .. })
        ));
        let mut m = Breadcrumbs {
            alpha: 1.0,
            density: 0.5,
            gamma: 0.1,
        };
        let view = TensorView {
            index: 0,
            task_vectors: &[],
        };
        assert_eq!(m.merge(&view), Err(MergeError::NoTasks));
        let empty = vec![vec![]];
        let view = TensorView {
            index: 0,
            task_vectors: &empty,
        };
        assert!(m.merge(&view).unwrap().delta.is_empty());
    }
}
