//! The one argmax of the crate: the predicted class of a row of logits.
//!
//! Calibration compares the class a candidate predicts with the original model's, the CLI's
//! `eval` and `run` report classes, and [`Prediction::class`](super::Prediction) is the class
//! an app shows: all of them must break ties and treat NaN the same way, so they all call this.

/// The index of the largest value of `row`: the **first** one when several are equal (`0.0` and
/// `-0.0` are equal), NaN never chosen. `None` when `row` is empty or all NaN.
pub fn argmax(row: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in row.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        match best {
            Some((_, b)) if v <= b => {}
            _ => best = Some((i, v)),
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::argmax;

    #[test]
    fn first_of_equal_maxima_wins() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), Some(1));
        assert_eq!(argmax(&[5.0, 5.0]), Some(0));
        // Signed zeros compare equal: the first one wins whatever its sign.
        assert_eq!(argmax(&[-0.0, 0.0]), Some(0));
        assert_eq!(argmax(&[0.0, -0.0]), Some(0));
    }

    #[test]
    fn nan_is_never_the_maximum() {
        assert_eq!(argmax(&[f32::NAN, -1.0, f32::NAN, -0.5]), Some(3));
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), None);
        assert_eq!(argmax(&[]), None);
    }

    #[test]
    fn infinities_order_as_numbers() {
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::MIN]), Some(1));
        assert_eq!(argmax(&[f32::MAX, f32::INFINITY, f32::INFINITY]), Some(1));
        assert_eq!(argmax(&[f32::NEG_INFINITY]), Some(0));
    }
}
