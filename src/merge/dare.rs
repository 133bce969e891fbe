//! DARE, "drop and rescale" (Yu et al., ICML 2024), followed by task arithmetic or TIES.
//!
//! For one tensor with task vectors `τ_t` of `n` entries:
//! 1. **Drop.** Per task, entry `i` is kept with probability `density` (drop probability
//!    `p = 1 − density`) and zeroed otherwise.
//! 2. **Rescale.** Kept entries are divided by `density` (in `f32`: `τ_t[i] / density`), which
//!    keeps `E[τ̃_t] = τ_t`. With `density = 0` everything is dropped and nothing is divided.
//! 3. **Merge** the rescaled `τ̃_t`: [`DareBase::TaskArithmetic`] gives `δ = α · Σ_t τ̃_t`;
//!    [`DareBase::Ties`] gives `δ = α · ties_merge(τ̃, density = 1, reduce)` — TIES' sign
//!    election and disjoint merge without any further trimming (the random drop *is* the trim).
//!    No per-task payload (`masks = None`).
//!
//! ## Random stream (reproducible, streaming-order independent)
//! The drops of task `t` on the tensor at model position `view.index` depend only on
//! `(seed, view.index, t)`, so they do not depend on the order the compiler streams tensors in
//! and the numpy reference reproduces them bit-exactly. With wrapping `u64` arithmetic and
//! `mix` the SplitMix64 output function
//! ```text
//! mix(z):  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
//!          z = (z ^ (z >> 27)) * 0x94D049BB133111EB
//!          return z ^ (z >> 31)
//! ```
//! the generator state starts at
//! ```text
//! state = mix(seed ^ (index * 0x9E3779B97F4A7C15) ^ (t * 0xC2B2AE3D27D4EB4F))
//! ```
//! and each element, in flat order `i = 0, 1, …, n−1`, draws one SplitMix64 output:
//! ```text
//! state = state + 0x9E3779B97F4A7C15;   u = mix(state)
//! ```
//! Entry `i` is kept iff `(u >> 11) as f64 · 2^-53 < density` (`density` widened to `f64`).
//! The outer `mix` on the initial state matters: without it the state of tensor `index + 1` would
//! be the state of tensor `index` advanced by one step (the increment is the same golden-ratio
//! constant), so neighbouring tensors would see the same drops shifted by one element.

use super::ties::ties_merge;
use super::{
    check_alpha, check_fraction, check_view, sum_tasks, DareBase, MergeError, Merger, TensorMerge,
    TensorView, TiesReduce,
};

/// The SplitMix64 increment (`⌊2^64 / φ⌋`, odd); also the per-tensor seed multiplier.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
/// Per-task seed multiplier (an odd 64-bit constant from xxHash/Murmur).
const TASK_MUL: u64 = 0xC2B2_AE3D_27D4_EB4F;

/// The SplitMix64 output function (Steele, Lea & Flood, 2014): a bijective 64-bit mixer.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SplitMix64: a 64-bit Weyl sequence passed through [`mix`].
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// The generator for the drops of task `task` on the tensor at model position `tensor`
    /// (see the module documentation for the derivation).
    pub(crate) fn for_tensor_task(seed: u64, tensor: u64, task: u64) -> SplitMix64 {
        SplitMix64 {
            state: mix(seed ^ tensor.wrapping_mul(GOLDEN) ^ task.wrapping_mul(TASK_MUL)),
        }
    }

    /// The next 64-bit output.
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(GOLDEN);
        mix(self.state)
    }

    /// The next uniform draw in `[0, 1)` with 53 random bits.
    pub(crate) fn next_f64(&mut self) -> f64 {
        // 2^-53, exact.
        const SCALE: f64 = 1.0 / (1u64 << 53) as f64;
        (self.next_u64() >> 11) as f64 * SCALE
    }
}

/// Drops and rescales one task vector (steps 1–2 of the module documentation).
pub(crate) fn drop_and_rescale(
    tv: &[f32],
    density: f32,
    seed: u64,
    tensor: u64,
    task: u64,
) -> Vec<f32> {
    let mut rng = SplitMix64::for_tensor_task(seed, tensor, task);
    let keep_below = f64::from(density);
    tv.iter()
        .map(|&x| {
            // Always draw, so element i uses draw i whatever the density.
            let keep = rng.next_f64() < keep_below;
            if keep {
                x / density
            } else {
                0.0
            }
        })
        .collect()
}

/// DARE: random drop with probability `1 − density`, rescale by `1 / density`, then task
/// arithmetic or TIES.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Dare {
    /// Scale of the merged vector (default 0.3).
    pub alpha: f32,
    /// Probability of keeping each entry (default 0.5, i.e. drop probability 0.5).
    pub density: f32,
    /// Seed of the random drops (see the module documentation for the stream).
    pub seed: u64,
    /// The merge applied to the rescaled task vectors.
    pub base: DareBase,
    /// With [`DareBase::Ties`]: mean or sum of the agreeing entries.
    pub ties_reduce: TiesReduce,
}

impl Merger for Dare {
    fn merge(&mut self, view: &TensorView<'_>) -> Result<TensorMerge, MergeError> {
        let n = check_view(view)?;
        check_alpha(self.alpha)?;
        check_fraction("density", self.density)?;
        let rescaled: Vec<Vec<f32>> = view
            .task_vectors
            .iter()
            .zip(0u64..)
            .map(|(tv, t)| drop_and_rescale(tv, self.density, self.seed, view.index, t))
            .collect();
        let mut delta = match self.base {
            DareBase::TaskArithmetic => sum_tasks(&rescaled, n),
            DareBase::Ties => ties_merge(&rescaled, n, 1.0, self.ties_reduce),
        };
        for d in &mut delta {
            *d *= self.alpha;
        }
        Ok(TensorMerge { delta, masks: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_published_vector() {
        // Published outputs of Vigna's splitmix64.c (Rosetta Code, "Pseudo-random
        // numbers/Splitmix64"): seed 1234567 → 6457827717110365317, 3203168211198807973,
        // 9817491932198370423; seed 0 → 0xE220A8397B1DCDAF first.
        let mut rng = SplitMix64 { state: 1234567 };
        assert_eq!(rng.next_u64(), 6457827717110365317);
        assert_eq!(rng.next_u64(), 3203168211198807973);
        assert_eq!(rng.next_u64(), 9817491932198370423);
        assert_eq!(SplitMix64 { state: 0 }.next_u64(), 0xE220_A839_7B1D_CDAF);
    }

    #[test]
    fn stream_derivation_is_as_documented() {
        // seed 0, tensor 0, task 0: state = mix(0) = 0, so the first draw is mix(GOLDEN).
        let mut rng = SplitMix64::for_tensor_task(0, 0, 0);
        assert_eq!(rng.next_u64(), mix(GOLDEN));
        let mut rng = SplitMix64::for_tensor_task(5, 3, 2);
        let start = mix(5 ^ 3u64.wrapping_mul(GOLDEN) ^ 2u64.wrapping_mul(TASK_MUL));
        assert_eq!(rng.next_u64(), mix(start.wrapping_add(GOLDEN)));
    }

    fn tvs() -> Vec<Vec<f32>> {
        vec![
            vec![1.0, -2.0, 3.0, 0.5, -0.25, 4.0, 0.0, -1.5, 2.0, 1.0],
            vec![-1.0, 2.0, 0.5, 0.5, 1.0, -4.0, 0.75, 1.5, -2.0, 1.0],
            vec![0.5, 1.0, -3.0, 2.0, 0.25, 1.0, 0.0, -0.5, 2.0, -1.0],
        ]
    }

    fn dare(density: f32, seed: u64, base: DareBase) -> Dare {
        Dare {
            alpha: 1.0,
            density,
            seed,
            base,
            ties_reduce: TiesReduce::Mean,
        }
    }

    fn run(m: &mut Dare, index: u64, tvs: &[Vec<f32>]) -> Vec<f32> {
        let out = m
            .merge(&TensorView {
                index,
                task_vectors: tvs,
            })
            .unwrap();
        assert_eq!(out.masks, None);
        out.delta
    }

    #[test]
    fn hand_worked_drops_from_the_stream() {
        // density 0.5, seed 42, tensor index 3. Keep decisions of the documented stream, as
        // printed by the independent Python implementation (tests/reference/merge_reference.py,
        // `dare_keep(42, 3, t, 10, 0.5)`):
        //   task 0: 1 0 0 1 0 1 0 1 1 0
        //   task 1: 1 1 1 1 0 0 1 1 0 0
        //   task 2: 0 1 0 1 1 1 1 1 1 0
        // Survivors are doubled (1 / 0.5), then summed (α = 1):
        //   i0: 2·1 + 2·(−1)          = 0      i5: 2·4 + 2·1          = 10
        //   i1: 2·2 + 2·1             = 6      i6: 2·0.75 + 2·0       = 1.5
        //   i2: 2·0.5                 = 1      i7: 2·(−1.5 + 1.5 − 0.5) = −1
        //   i3: 2·(0.5 + 0.5 + 2)     = 6      i8: 2·2 + 2·2          = 8
        //   i4: 2·0.25                = 0.5    i9: nothing kept       = 0
        let keep: [[u8; 10]; 3] = [
            [1, 0, 0, 1, 0, 1, 0, 1, 1, 0],
            [1, 1, 1, 1, 0, 0, 1, 1, 0, 0],
            [0, 1, 0, 1, 1, 1, 1, 1, 1, 0],
        ];
        for (task, row) in (0u64..).zip(keep) {
            let mut rng = SplitMix64::for_tensor_task(42, 3, task);
            let drawn: Vec<u8> = (0..10).map(|_| u8::from(rng.next_f64() < 0.5)).collect();
            assert_eq!(drawn, row, "task {task}");
        }
        assert_eq!(
            run(&mut dare(0.5, 42, DareBase::TaskArithmetic), 3, &tvs()),
            vec![0.0, 6.0, 1.0, 6.0, 0.5, 10.0, 1.5, -1.0, 8.0, 0.0]
        );
    }

    #[test]
    fn about_density_of_entries_survive() {
        // 10_000 draws at density 0.3: the kept count is binomial(10⁴, 0.3), σ ≈ 46.
        let tv = vec![vec![1.0f32; 10_000]];
        let out = run(&mut dare(0.3, 9, DareBase::TaskArithmetic), 0, &tv);
        let kept = out.iter().filter(|&&x| x != 0.0).count();
        assert!((2800..3200).contains(&kept), "kept {kept}");
        assert!(out.iter().all(|&x| x == 0.0 || x == 1.0 / 0.3));
    }

    #[test]
    fn deterministic_and_seeded_per_tensor() {
        let t = tvs();
        let a = run(&mut dare(0.5, 7, DareBase::TaskArithmetic), 1, &t);
        let b = run(&mut dare(0.5, 7, DareBase::TaskArithmetic), 1, &t);
        assert_eq!(a, b);
        // Independent of what was merged before (streaming order).
        let mut m = dare(0.5, 7, DareBase::TaskArithmetic);
        run(&mut m, 0, &t);
        assert_eq!(run(&mut m, 1, &t), a);
        // A different tensor index or seed gives different drops.
        let ones = vec![vec![1.0f32; 64]];
        let d1 = run(&mut dare(0.5, 7, DareBase::TaskArithmetic), 1, &ones);
        let d2 = run(&mut dare(0.5, 7, DareBase::TaskArithmetic), 2, &ones);
        let d3 = run(&mut dare(0.5, 8, DareBase::TaskArithmetic), 1, &ones);
        assert_ne!(d1, d2);
        assert_ne!(d1, d3);
        // Neighbouring tensors are not shifted copies of each other.
        assert_ne!(d1.get(1..), d2.get(..63));
        assert_ne!(d1.get(..63), d2.get(1..));
    }

    #[test]
    fn density_one_keeps_everything_and_density_zero_drops_everything() {
        let t = tvs();
        // density 1: nothing dropped, rescale by 1 → plain task arithmetic.
        let sum = super::super::sum_tasks(&t, 10);
        assert_eq!(run(&mut dare(1.0, 3, DareBase::TaskArithmetic), 0, &t), sum);
        // ... and plain TIES without trimming.
        let ties = ties_merge(&t, 10, 1.0, TiesReduce::Mean);
        assert_eq!(run(&mut dare(1.0, 3, DareBase::Ties), 0, &t), ties);
        // density 0: all dropped, no division by zero (no NaN / inf).
        assert_eq!(
            run(&mut dare(0.0, 3, DareBase::TaskArithmetic), 0, &t),
            vec![0.0; 10]
        );
        assert_eq!(run(&mut dare(0.0, 3, DareBase::Ties), 0, &t), vec![0.0; 10]);
    }

    #[test]
    fn ties_base_is_ties_on_rescaled_vectors() {
        let t = tvs();
        let rescaled: Vec<Vec<f32>> = (0u64..)
            .zip(&t)
            .map(|(k, tv)| drop_and_rescale(tv, 0.5, 11, 4, k))
            .collect();
        let mut m = Dare {
            alpha: 0.5,
            ..dare(0.5, 11, DareBase::Ties)
        };
        let expected: Vec<f32> = ties_merge(&rescaled, 10, 1.0, TiesReduce::Mean)
            .iter()
            .map(|x| 0.5 * x)
            .collect();
        assert_eq!(run(&mut m, 4, &t), expected);
    }

    #[test]
    fn errors() {
        let mut m = dare(-0.1, 0, DareBase::TaskArithmetic);
        let t = tvs();
        let view = TensorView {
            index: 0,
            task_vectors: &t,
        };
        assert!(matches!(
            m.merge(&view),
            Err(MergeError::InvalidParameter {
                name: "density",
                ..
            })
        ));
        let mut m = dare(0.5, 0, DareBase::TaskArithmetic);
        let view = TensorView {
            index: 0,
            task_vectors: &[],
        };
        assert_eq!(m.merge(&view), Err(MergeError::NoTasks));
    }
}
