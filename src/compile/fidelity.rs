//! Compile-time fidelity of each task's reconstruction against its own checkpoint.
//!
//! For merged tensors the reconstructed task vector is `g · d` with `d = s ⊙ m ⊙ δ`; the global
//! scale `g` (EMR's rescaler) is only known after the last tensor, so the accumulator keeps
//! `Σd²`, `Σd·τ` and `Στ²` and expands `‖g·d − τ‖² = g²Σd² − 2gΣd·τ + Στ²` at the end.

use crate::format::manifest::TaskReport;
use crate::mask::Mask;

/// Running sums for one task over all merged tensors.
#[derive(Debug, Clone, Default)]
pub(crate) struct Fidelity {
    dd: f64,
    dt: f64,
    tt: f64,
    kept: u64,
    total: u64,
}

impl Fidelity {
    /// Adds a tensor whose reconstruction is `factor(i) · m_i · δ_i`.
    pub(crate) fn add(
        &mut self,
        delta: &[f32],
        mask: Option<&Mask>,
        tau: &[f32],
        factor: impl Fn(usize) -> f32,
    ) {
        for (i, (&d, &t)) in delta.iter().zip(tau).enumerate() {
            let on = mask.is_none_or(|m| m.get(i));
            self.accumulate(if on { factor(i) * d } else { 0.0 }, t);
            self.kept += u64::from(on);
        }
        self.total += delta.len() as u64;
    }

    /// One element: reconstructed task-vector value `d`, true value `t`.
    fn accumulate(&mut self, d: f32, t: f32) {
        let (d, t) = (f64::from(d), f64::from(t));
        self.dd += d * d;
        self.dt += d * t;
        self.tt += t * t;
    }

    /// Adds a tensor whose reconstructed task vector is `v` (a task scale of 1), of which `kept`
    /// elements are in the task's mask.
    pub(crate) fn add_vector(&mut self, v: &[f32], tau: &[f32], kept: u64) {
        for (&d, &t) in v.iter().zip(tau) {
            self.accumulate(d, t);
        }
        self.kept += kept;
        self.total += v.len() as u64;
    }

    /// Adds a tensor every task reconstructs as the base (no merged delta).
    pub(crate) fn add_unchanged(&mut self, tau: &[f32]) {
        self.tt += tau
            .iter()
            .map(|&t| f64::from(t) * f64::from(t))
            .sum::<f64>();
        self.total += tau.len() as u64;
    }

    /// The report for a task whose global scale is `g`.
    pub(crate) fn report(&self, name: &str, g: f32) -> TaskReport {
        let g = f64::from(g);
        let err = (g * g * self.dd - 2.0 * g * self.dt + self.tt).max(0.0);
        let relative_error = if self.tt > 0.0 {
            (err / self.tt).sqrt()
        } else {
            0.0
        };
        let denom = (self.dd * self.tt).sqrt();
        let cosine = if denom > 0.0 {
            g.signum() * self.dt / denom
        } else {
            0.0
        };
        TaskReport {
            name: name.to_string(),
            relative_error,
            cosine,
            mask_density: if self.total > 0 {
                self.kept as f64 / self.total as f64
            } else {
                1.0
            },
            calibration: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_worked_relative_error_and_cosine() {
        // τ = [1, 2, 0], δ = [1, 1, 1], mask keeps elements 0 and 1, g = 2:
        // reconstruction = [2, 2, 0]; error = [1, 0, 0] → ‖e‖/‖τ‖ = 1/√5;
        // cosine = (2·1 + 2·2) / (√8 · √5) = 6/√40.
        let mask = Mask::from_fn(3, |i| i < 2);
        let mut f = Fidelity::default();
        f.add(&[1.0, 1.0, 1.0], Some(&mask), &[1.0, 2.0, 0.0], |_| 1.0);
        let r = f.report("t", 2.0);
        assert!((r.relative_error - 1.0 / 5f64.sqrt()).abs() < 1e-12);
        assert!((r.cosine - 6.0 / 40f64.sqrt()).abs() < 1e-12);
        assert!((r.mask_density - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn unchanged_tensor_counts_as_full_error() {
        let mut f = Fidelity::default();
        f.add_unchanged(&[3.0, 4.0]);
        assert_eq!(f.report("t", 1.0).relative_error, 1.0);
    }
}
