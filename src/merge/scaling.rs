//! Closed-form scaling vectors on top of any reconstruction (ScaLearn / aTLAS spirit, data-free).
//!
//! For a task's reconstructed delta `d_t = m_t ⊙ δ` and its true task vector `τ_t`, the scale
//! `s = ⟨d_t, τ_t⟩ / ‖d_t‖²` minimises `‖θ_0 + s·d_t − θ_t‖²`. [`ScaleMode::Tensor`](crate::format::ScaleMode::Tensor) computes
//! one `s` per tensor, [`ScaleMode::Row`](crate::format::ScaleMode::Row) one per row (a slice along the first axis). Where
//! `‖d_t‖² = 0` the scale is 0 (the reconstruction adds nothing there anyway).
//!
//! Both reductions are accumulated in `f64` (a tensor can have millions of entries) and the
//! ratio is rounded to `f32` once. A row is a contiguous chunk of the row-major flat vector:
//! `rows = shape[0]` chunks of `n / rows` entries each. Malformed input (lengths that differ, a
//! row count that does not divide the length) is a [`MergeError`], never a panic.

use super::MergeError;
use crate::mask::Mask;

/// The closed-form scale `s = ⟨d, τ⟩ / ‖d‖²` of one tensor, with `d = m ⊙ δ` (`d = δ` without a
/// mask). Both reductions are accumulated in `f64`; `s = 0` where `‖d‖² = 0`.
///
/// Errors with [`MergeError::LengthMismatch`] (`δ` length first) when `τ` or the mask does not
/// have the length of `δ`.
pub(crate) fn tensor_scale(
    delta: &[f32],
    mask: Option<&Mask>,
    tau: &[f32],
) -> Result<f32, MergeError> {
    check_lengths(delta, mask, tau)?;
    Ok(range_scale(delta, mask, tau, 0))
}

/// One closed-form scale per row: the flat vectors are split into `rows` equal contiguous chunks
/// (a row is a slice along the first axis of a row-major tensor, so `rows = shape[0]`) and each
/// chunk gets `s_r = ⟨d_r, τ_r⟩ / ‖d_r‖²` as in [`tensor_scale`] (0 where `‖d_r‖² = 0`).
///
/// An empty tensor gives `rows` zeros (an empty list for `rows = 0`). Errors with
/// [`MergeError::LengthMismatch`] as [`tensor_scale`], and with
/// [`MergeError::InvalidParameter`] (`rows`) when `rows` does not divide the non-zero length
/// (including `rows = 0`).
pub(crate) fn row_scales(
    delta: &[f32],
    mask: Option<&Mask>,
    tau: &[f32],
    rows: usize,
) -> Result<Vec<f32>, MergeError> {
    check_lengths(delta, mask, tau)?;
    let n = delta.len();
    if n == 0 {
        return Ok(vec![0.0; rows]);
    }
    if n.checked_rem(rows) != Some(0) {
        return Err(MergeError::InvalidParameter {
            name: "rows",
            value: rows as f64,
            why: "the number of rows must divide the tensor length",
        });
    }
    let width = n / rows;
    Ok(delta
        .chunks_exact(width)
        .zip(tau.chunks_exact(width))
        .zip((0..).step_by(width))
        .map(|((d, t), start)| range_scale(d, mask, t, start))
        .collect())
}

fn check_lengths(delta: &[f32], mask: Option<&Mask>, tau: &[f32]) -> Result<(), MergeError> {
    if tau.len() != delta.len() {
        return Err(MergeError::LengthMismatch(delta.len(), tau.len()));
    }
    match mask {
        Some(m) if m.len() != delta.len() => Err(MergeError::LengthMismatch(delta.len(), m.len())),
        _ => Ok(()),
    }
}

/// `⟨d, τ⟩ / ‖d‖²` over one chunk whose first element is flat element `start` of the tensor (for
/// the mask lookup).
fn range_scale(delta: &[f32], mask: Option<&Mask>, tau: &[f32], start: usize) -> f32 {
    let mut dot = 0.0f64;
    let mut norm = 0.0f64;
    for ((&d, &t), i) in delta.iter().zip(tau).zip(start..) {
        if mask.is_none_or(|m| m.get(i)) {
            let d = f64::from(d);
            dot += d * f64::from(t);
            norm += d * d;
        }
    }
    if norm > 0.0 {
        (dot / norm) as f32
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // δ    = [1, 2, -1, 0, 2,  1]
    // mask = [1, 1,  0, 1, 1,  1]
    // τ    = [2, 2,  5, 3, 1, -1]
    // d = m ⊙ δ = [1, 2, 0, 0, 2, 1]
    // tensor, masked: ⟨d,τ⟩ = 2+4+0+0+2−1 = 7, ‖d‖² = 1+4+0+0+4+1 = 10 → 0.7
    // tensor, no mask: ⟨δ,τ⟩ = 2+4−5+0+2−1 = 2, ‖δ‖² = 11 → 2/11
    // 3 rows of 2, masked: [1,2]·[2,2] = 6 / 5 = 1.2; [0,0] → 0; [2,1]·[1,−1] = 1 / 5 = 0.2
    // 2 rows of 3, masked: [1,2,0]·[2,2,5] = 6 / 5 = 1.2; [0,2,1]·[3,1,−1] = 1 / 5 = 0.2
    const DELTA: [f32; 6] = [1.0, 2.0, -1.0, 0.0, 2.0, 1.0];
    const TAU: [f32; 6] = [2.0, 2.0, 5.0, 3.0, 1.0, -1.0];

    fn mask() -> Mask {
        Mask::from_fn(6, |i| i != 2)
    }

    fn f(x: f64) -> f32 {
        x as f32
    }

    #[test]
    fn hand_worked_tensor() {
        assert_eq!(tensor_scale(&DELTA, Some(&mask()), &TAU), Ok(f(0.7)));
        assert_eq!(tensor_scale(&DELTA, None, &TAU), Ok(f(2.0 / 11.0)));
    }

    #[test]
    fn hand_worked_rows() {
        assert_eq!(
            row_scales(&DELTA, Some(&mask()), &TAU, 3),
            Ok(vec![f(1.2), 0.0, f(0.2)])
        );
        assert_eq!(
            row_scales(&DELTA, Some(&mask()), &TAU, 2),
            Ok(vec![f(1.2), f(0.2)])
        );
        // One row is the tensor scale; one row per element is τ/δ where d ≠ 0.
        assert_eq!(row_scales(&DELTA, None, &TAU, 1), Ok(vec![f(2.0 / 11.0)]));
        assert_eq!(
            row_scales(&DELTA, None, &TAU, 6),
            Ok(vec![2.0, 1.0, -5.0, 0.0, 0.5, -1.0])
        );
    }

    #[test]
    fn scale_minimises_the_residual() {
        // s* = argmin ‖s·d − τ‖²: nudging s either way increases the residual.
        let d: Vec<f32> = DELTA
            .iter()
            .enumerate()
            .map(|(i, &x)| if i == 2 { 0.0 } else { x })
            .collect();
        let s = tensor_scale(&DELTA, Some(&mask()), &TAU).unwrap();
        let residual =
            |s: f32| -> f32 { d.iter().zip(TAU).map(|(&d, t)| (s * d - t).powi(2)).sum() };
        assert!(residual(s) < residual(s + 0.01) && residual(s) < residual(s - 0.01));
    }

    #[test]
    fn zero_norm_gives_zero() {
        assert_eq!(tensor_scale(&[0.0; 4], None, &[1.0; 4]), Ok(0.0));
        assert_eq!(
            tensor_scale(&DELTA, Some(&Mask::from_fn(6, |_| false)), &TAU),
            Ok(0.0)
        );
        assert_eq!(tensor_scale(&[], None, &[]), Ok(0.0));
    }

    #[test]
    fn bad_shapes_are_errors_not_panics() {
        assert_eq!(
            tensor_scale(&DELTA, None, &TAU[..5]),
            Err(MergeError::LengthMismatch(6, 5))
        );
        assert_eq!(
            tensor_scale(&DELTA, Some(&Mask::from_fn(5, |_| true)), &TAU),
            Err(MergeError::LengthMismatch(6, 5))
        );
        assert!(matches!(
            row_scales(&DELTA, None, &TAU, 4),
            Err(MergeError::InvalidParameter { name: "rows", .. })
        ));
        assert!(matches!(
            row_scales(&DELTA, None, &TAU, 0),
            Err(MergeError::InvalidParameter { name: "rows", .. })
        ));
        assert_eq!(row_scales(&[], None, &[], 0), Ok(vec![]));
        assert_eq!(row_scales(&[], None, &[], 3), Ok(vec![0.0; 3]));
    }
}
