//! Merge methods: from the task vectors of one tensor to a shared delta and per-task masks.
//!
//! The compiler streams one tensor at a time; for each it computes the task vectors
//! `τ_t = θ_t − θ_0` and hands them to a [`Merger`]. A merger returns the tensor's shared merged
//! delta `δ` and, for masked methods, one [`Mask`] per task. Methods that need whole-model
//! statistics (EMR's rescaler `λ_t`) accumulate them across calls and report them at the end
//! through [`Merger::task_scales`].
//!
//! The reconstruction of task `t` for a merged tensor is always
//! `θ̂_t = θ_0 + g_t · s_t ⊙ (m_t ⊙ δ)` where `g_t` is the task's global scale
//! ([`Merger::task_scales`], 1 unless the method says otherwise), `s_t` the optional per-tensor or
//! per-row scale of [`scaling`], and `m_t` the mask (all ones when the method has none).
//!
//! One file per method; each is a small unit with its own hand-checked tests. The formulas are
//! those of docs/METHODS.md; each method's module documentation states the exact
//! variant implemented, including tie-breaking and rounding rules.
//!
//! ## Numerics shared by every method
//! - Sums across tasks are accumulated in `f32`, in task order, starting from `0.0`
//!   (`((0 + τ_0) + τ_1) + …`), and a scale `α` is applied after summing (`α · Σ_t τ_t`, not
//!   `Σ_t α τ_t`). The numpy reference (tests/reference/merge_reference.py) does the same, so
//!   its outputs match to the last bit in practice.
//! - Reductions over a whole tensor or model (EMR's rescaler, [`scaling`]) are accumulated in
//!   `f64`.
//! - Counts derived from fractions (`k = round(density · n)`, `floor(gamma · n)`) are computed
//!   in `f64` from the `f32` parameter; `round` rounds half away from zero.
//! - "Top-k by magnitude" everywhere means the order by `|τ|` descending, ties broken by the
//!   lower flat index first (a stable sort by descending magnitude), see `magnitude_rank_mask`.
//! - No method panics on malformed input: zero tasks, task vectors of different lengths and
//!   out-of-range parameters are [`MergeError`]s; empty tensors give empty outputs.

use crate::format::{DareBase, MergeParams, Method, TiesReduce};
use crate::mask::Mask;

pub(crate) mod breadcrumbs;
pub(crate) mod consensus;
pub(crate) mod dare;
pub(crate) mod emr;
pub(crate) mod scaling;
pub(crate) mod tall;
pub(crate) mod task_arithmetic;
pub(crate) mod ties;
pub(crate) mod tvq;

#[cfg(test)]
mod reference_tests;

/// The task vectors of one tensor, as handed to a [`Merger`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct TensorView<'a> {
    /// Position of the tensor in the model (stable across runs): seeds DARE's random drops.
    pub index: u64,
    /// One task vector per task, `τ_t = θ_t − θ_0`, all of the same length.
    pub task_vectors: &'a [Vec<f32>],
}

/// What a method produces for one tensor.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TensorMerge {
    /// The shared merged delta `δ` (length = tensor length).
    pub delta: Vec<f32>,
    /// One mask per task, for methods that reconstruct tasks individually; `None` when every task
    /// uses `δ` as is.
    pub masks: Option<Vec<Mask>>,
}

/// Errors of the merge methods.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MergeError {
    /// The method was given no task.
    #[error("no task vectors to merge")]
    NoTasks,
    /// Task vectors of one tensor have different lengths.
    #[error("task vectors of one tensor have different lengths ({0} and {1})")]
    LengthMismatch(usize, usize),
    /// A hyper-parameter is out of its valid range.
    #[error("invalid hyper-parameter {name} = {value}: {why}")]
    InvalidParameter {
        /// Parameter name as on the command line.
        name: &'static str,
        /// The rejected value.
        value: f64,
        /// The valid range.
        why: &'static str,
    },
    /// A stateful merger built for one number of tasks was given another.
    #[error("merger built for {expected} tasks was given {got}")]
    TaskCountMismatch {
        /// Number of tasks the merger was built for.
        expected: usize,
        /// Number of task vectors in the view.
        got: usize,
    },
}

/// A merge method, fed one tensor at a time.
pub(crate) trait Merger {
    /// Merges the task vectors of one tensor.
    fn merge(&mut self, view: &TensorView<'_>) -> Result<TensorMerge, MergeError>;

    /// The per-task global scale `g_t`, known once every tensor has been merged. Defaults to 1
    /// for every task.
    fn task_scales(&self, n_tasks: usize) -> Vec<f32> {
        vec![1.0; n_tasks]
    }
}

impl MergeParams {
    /// Builds the merger these parameters describe, after checking their ranges.
    pub(crate) fn merger(&self, n_tasks: usize) -> Result<Box<dyn Merger>, MergeError> {
        check_range("alpha", self.alpha, f32::MIN, f32::MAX, "a finite number")?;
        check_range("density", self.density, 0.0, 1.0, "a fraction in [0, 1]")?;
        check_range("gamma", self.gamma, 0.0, 1.0, "a fraction in [0, 1]")?;
        for &l in &self.lambda {
            check_range("lambda", l, 0.0, f32::MAX, "a finite number >= 0")?;
        }
        if n_tasks == 0 {
            return Err(MergeError::NoTasks);
        }
        Ok(match self.method {
            Method::TaskArithmetic => {
                Box::new(task_arithmetic::TaskArithmetic { alpha: self.alpha })
            }
            Method::Ties => Box::new(ties::Ties {
                alpha: self.alpha,
                density: self.density,
                reduce: self.ties_reduce,
            }),
            Method::Dare => Box::new(dare::Dare {
                alpha: self.alpha,
                density: self.density,
                seed: self.seed,
                base: self.dare_base,
                ties_reduce: self.ties_reduce,
            }),
            Method::Breadcrumbs => Box::new(breadcrumbs::Breadcrumbs {
                alpha: self.alpha,
                density: self.density,
                gamma: self.gamma,
            }),
            Method::Tall => Box::new(tall::Tall {
                alpha: self.alpha,
                lambda: self.lambda.clone(),
            }),
            Method::Consensus => Box::new(consensus::Consensus {
                alpha: self.alpha,
                lambda: self.lambda.clone(),
                min_tasks: self.min_tasks,
            }),
            Method::Emr => Box::new(emr::Emr::new(n_tasks)),
            Method::Tvq => Box::new(tvq::Tvq),
        })
    }
}

fn check_range(
    name: &'static str,
    v: f32,
    lo: f32,
    hi: f32,
    why: &'static str,
) -> Result<(), MergeError> {
    if v.is_finite() && v >= lo && v <= hi {
        Ok(())
    } else {
        Err(MergeError::InvalidParameter {
            name,
            value: f64::from(v),
            why,
        })
    }
}

/// Checks that a view has at least one task and that all task vectors have the same length;
/// returns that length. Every method calls it first.
pub(crate) fn check_view(view: &TensorView<'_>) -> Result<usize, MergeError> {
    let first = view.task_vectors.first().ok_or(MergeError::NoTasks)?;
    let n = first.len();
    for tv in view.task_vectors {
        if tv.len() != n {
            return Err(MergeError::LengthMismatch(n, tv.len()));
        }
    }
    Ok(n)
}

/// `sgn(x)` with `sgn(0) = 0`, as the formulas use it.
pub(crate) fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Checks a fraction parameter (`density`, `gamma`) at merge time: the fields of the method
/// structs are public, so a merger may have been built without [`MergeParams::merger`].
pub(crate) fn check_fraction(name: &'static str, v: f32) -> Result<(), MergeError> {
    check_range(name, v, 0.0, 1.0, "a fraction in [0, 1]")
}

/// Checks that `alpha` is finite (same reason as [`check_fraction`]).
pub(crate) fn check_alpha(alpha: f32) -> Result<(), MergeError> {
    check_range("alpha", alpha, f32::MIN, f32::MAX, "a finite number")
}

/// `Σ_t τ_t` element-wise, accumulated in `f32` in task order starting from `0.0`. Every task
/// vector must have length `n` (see [`check_view`]).
pub(crate) fn sum_tasks(task_vectors: &[Vec<f32>], n: usize) -> Vec<f32> {
    let mut acc = vec![0.0f32; n];
    for tv in task_vectors {
        for (a, &x) in acc.iter_mut().zip(tv) {
            *a += x;
        }
    }
    acc
}

/// `round(fraction · n)` (half away from zero) computed in `f64`, clamped to `[0, n]`.
pub(crate) fn round_count(fraction: f32, n: usize) -> usize {
    let k = (f64::from(fraction) * n as f64).round();
    // `as` saturates (NaN → 0); the clamp keeps the count within the tensor.
    (k as usize).min(n)
}

/// `floor(fraction · n)` computed in `f64`, clamped to `[0, n]`.
pub(crate) fn floor_count(fraction: f32, n: usize) -> usize {
    let k = (f64::from(fraction) * n as f64).floor();
    (k as usize).min(n)
}

/// Selects entries of `values` by magnitude rank.
///
/// Ranks the entries by `|v|` descending, ties broken by the lower flat index first (exactly the
/// order a stable sort by descending magnitude gives), and returns `true` for the entries whose
/// rank `r` satisfies `skip <= r < skip + keep`. `skip` and `keep` are clamped to the length.
/// NaNs (which a task vector should not contain) rank above every number, via
/// [`f32::total_cmp`], so this never panics.
///
/// Runs in O(n) expected time with two `select_nth_unstable_by` partitions: the comparator is a
/// total order (magnitude, then index), so the partitions are exactly those of the stable sort.
pub(crate) fn magnitude_rank_mask(values: &[f32], skip: usize, keep: usize) -> Vec<bool> {
    let n = values.len();
    let skip = skip.min(n);
    let end = skip.saturating_add(keep).min(n);
    let mut selected = vec![false; n];
    if end <= skip {
        return selected;
    }
    let mut order: Vec<(f32, usize)> = values.iter().map(|v| v.abs()).zip(0..n).collect();
    let by_rank = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    // Move the `end` best-ranked entries to the front, then drop the `skip` best of those.
    if end < n {
        order.select_nth_unstable_by(end, by_rank);
    }
    let front = order.get_mut(..end).unwrap_or_default();
    if skip > 0 {
        front.select_nth_unstable_by(skip, by_rank);
    }
    for &(_, i) in front.get(skip..).unwrap_or_default() {
        if let Some(s) = selected.get_mut(i) {
            *s = true;
        }
    }
    selected
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(task_vectors: &[Vec<f32>]) -> TensorView<'_> {
        TensorView {
            index: 0,
            task_vectors,
        }
    }

    #[test]
    fn every_method_builds_from_defaults_and_merges() {
        let tvs = vec![vec![1.0, -2.0, 0.5, 0.0], vec![0.5, 1.0, -0.5, 0.0]];
        for method in Method::ALL {
            let params = MergeParams::defaults(method, 2);
            let mut m = params.merger(2).unwrap();
            let out = m.merge(&view(&tvs)).unwrap();
            assert_eq!(out.delta.len(), 4, "{method}");
            assert_eq!(out.masks.is_some(), method.is_per_task(), "{method}");
            if let Some(masks) = &out.masks {
                assert_eq!(masks.len(), 2);
                assert!(masks.iter().all(|k| k.len() == 4));
            }
            assert_eq!(m.task_scales(2).len(), 2);
            assert_eq!(method.name().parse::<Method>(), Ok(method));
        }
    }

    #[test]
    fn merger_rejects_bad_parameters_and_zero_tasks() {
        let base = MergeParams::defaults(Method::Ties, 3);
        let bad = |p: MergeParams, name: &str| match p.merger(3) {
            Err(MergeError::InvalidParameter { name: n, .. }) => assert_eq!(n, name),
            Err(e) => panic!("expected invalid {name}, got {e}"),
            Ok(_) => panic!("expected invalid {name}, got a merger"),
        };
        bad(
            MergeParams {
                density: 1.5,
                ..base.clone()
            },
            "density",
        );
        bad(
            MergeParams {
                density: -0.1,
                ..base.clone()
            },
            "density",
        );
        bad(
            MergeParams {
                density: f32::NAN,
                ..base.clone()
            },
            "density",
        );
        bad(
            MergeParams {
                gamma: 2.0,
                ..base.clone()
            },
            "gamma",
        );
        bad(
            MergeParams {
                alpha: f32::INFINITY,
                ..base.clone()
            },
            "alpha",
        );
        bad(
            MergeParams {
                lambda: vec![0.4, -0.4, 0.4],
                ..base.clone()
            },
            "lambda",
        );
        assert_eq!(base.merger(0).err(), Some(MergeError::NoTasks));
        // Density 0 and 1 are valid fractions.
        assert!(MergeParams {
            density: 0.0,
            ..base.clone()
        }
        .merger(3)
        .is_ok());
        assert!(MergeParams {
            density: 1.0,
            ..base
        }
        .merger(3)
        .is_ok());
    }

    #[test]
    fn every_method_reports_zero_tasks_and_length_mismatch() {
        for method in Method::ALL {
            let mut m = MergeParams::defaults(method, 2).merger(2).unwrap();
            assert_eq!(
                m.merge(&view(&[])).err(),
                Some(MergeError::NoTasks),
                "{method}"
            );
            let ragged = vec![vec![1.0, 2.0, 3.0], vec![1.0, 2.0]];
            assert_eq!(
                m.merge(&view(&ragged)).err(),
                Some(MergeError::LengthMismatch(3, 2)),
                "{method}"
            );
        }
    }

    #[test]
    fn every_method_accepts_empty_tensors() {
        let empty = vec![vec![], vec![]];
        for method in Method::ALL {
            let mut m = MergeParams::defaults(method, 2).merger(2).unwrap();
            let out = m.merge(&view(&empty)).unwrap();
            assert!(out.delta.is_empty(), "{method}");
        }
    }

    #[test]
    fn magnitude_rank_is_a_stable_descending_sort() {
        // |v| = [1, 3, 3, 0, 2, 3, 1]; stable order by descending |v|: 1 2 5 4 0 6 3.
        let v = [1.0, -3.0, 3.0, 0.0, 2.0, 3.0, -1.0];
        let sel = |skip, keep| -> Vec<usize> {
            let m = magnitude_rank_mask(&v, skip, keep);
            (0..v.len()).filter(|&i| m[i]).collect()
        };
        assert_eq!(sel(0, 2), vec![1, 2]);
        assert_eq!(sel(0, 3), vec![1, 2, 5]);
        assert_eq!(sel(1, 3), vec![2, 4, 5]);
        assert_eq!(sel(4, 2), vec![0, 6]);
        assert_eq!(sel(5, 100), vec![3, 6]);
        assert_eq!(sel(0, 0), Vec::<usize>::new());
        assert_eq!(sel(7, 3), Vec::<usize>::new());
        assert_eq!(sel(0, 7), (0..7).collect::<Vec<_>>());
        // Matches a stable sort on a larger input with many ties.
        let big: Vec<f32> = (0..200)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.5)
            .collect();
        let mut order: Vec<usize> = (0..200).collect();
        order.sort_by(|&a, &b| big[b].abs().total_cmp(&big[a].abs()));
        for (skip, keep) in [(0, 50), (13, 77), (199, 1), (0, 200)] {
            let m = magnitude_rank_mask(&big, skip, keep);
            let mut expected = vec![false; 200];
            for &i in &order[skip..skip + keep] {
                expected[i] = true;
            }
            assert_eq!(m, expected, "skip {skip} keep {keep}");
        }
    }

    #[test]
    fn counts_round_half_away_and_floor_in_f64() {
        assert_eq!(round_count(0.25, 10), 3); // 2.5 → 3
        assert_eq!(round_count(0.2, 37), 7); // 7.4000001 → 7
        assert_eq!(round_count(0.5, 37), 19); // 18.5 → 19
        assert_eq!(round_count(1.0, 5), 5);
        assert_eq!(round_count(0.0, 5), 0);
        assert_eq!(floor_count(0.1, 10), 1); // 0.1f32 = 0.10000000149… → 1.0000000149
        assert_eq!(floor_count(0.7, 10), 6); // 0.7f32 = 0.69999998… → 6.9999998
        assert_eq!(floor_count(0.01, 99), 0);
    }

    #[test]
    fn sum_is_f32_in_task_order() {
        // (1e8 + 1) + (−1e8) = 0 in f32, whereas 1 + (1e8 − 1e8) would be 1.
        let tvs = vec![vec![1.0e8], vec![1.0], vec![-1.0e8]];
        assert_eq!(sum_tasks(&tvs, 1), vec![0.0]);
    }
}
