//! Activation-fitted row scales of `tvq` residuals (`--calib` with `--method tvq`): the
//! ScaLearn-style scaling vectors of docs/METHODS.md, fitted to the original model's layer
//! outputs rather than to its weights.
//!
//! A low-bit residual `C` of a task vector `τ` errs in weight space by construction; what the
//! task needs is the layer output `X·τ` on its own inputs. For every weight `W` of shape
//! `[in, out]` that a `MatMul(x, W)` multiplies, the original task model runs on the task's
//! unlabeled calibration inputs and gives the Gram matrix `G = XᵀX` of its input activations
//! (padding positions left out where the inputs have an `attention_mask`); the row scales `s`
//! minimizing `‖X(τ − diag(s)·C)‖²` solve `(G ∘ CCᵀ) s = diag(G·τ·Cᵀ)` (with a ridge of
//! 10⁻⁶ of the mean diagonal). Rows of a block-quantized residual that are whole blocks
//! (`out` a multiple of the block length) take `s` into their blocks' scales, so the bundle
//! format does not change: a reader decodes the scaled blocks as any others.
//!
//! A pointwise convolution (`Conv` with a `[out, in, 1, 1]` weight, one group, stride 1) is the
//! same product per pixel: `G` sums over pixels, and its rows (output channels) are fitted each
//! on its own, `s_o = c_oᵀGτ_o / c_oᵀGc_o` (the rows do not interact: each output channel has
//! its own weights).
//!
//! Activations wider than [`MAX_DIM`] are left out (their weights keep the plain code): a
//! checkpoint cannot make the compiler allocate or solve more than that bound.

use std::collections::BTreeMap;
use std::path::Path;

use tract_onnx::prelude::*;

use crate::compile::calibrate::{run_original, tract, Inputs, Outputs};
use crate::compile::checkpoint::Checkpoint;
use crate::compile::CompileError;
use crate::encoding::Encoding;

/// Widest activation fitted: its Gram matrix takes `8 · dim²` bytes (128 MiB at 4096) and the
/// solve `dim³ / 3` multiply-adds, whatever a checkpoint declares. Wider layers keep their code.
const MAX_DIM: usize = 4096;

/// `G = XᵀX` of the activations one or more weights are multiplied by, `dim × dim`, row-major.
#[derive(Debug, Clone)]
pub(crate) struct Gram {
    pub(crate) dim: usize,
    pub(crate) values: Vec<f64>,
}

/// How a weight multiplies its activation: what its rows are and how they are fitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Product {
    /// `MatMul(x, W)`, `W` `[in, out]`: a row per input feature, fitted jointly.
    MatMul,
    /// A pointwise `Conv(x, W)`, `W` `[out, in, 1, 1]`: a row per output channel, each fitted
    /// on its own.
    PointwiseConv,
}

/// One task's fitted weights: each one's product and the Gram matrix of its input, by weight
/// name.
pub(crate) type TaskGrams = BTreeMap<String, (Product, std::sync::Arc<Gram>)>;

/// Per task (by index in the options), its [`TaskGrams`]. Tasks without calibration inputs
/// have none.
#[derive(Debug, Clone, Default)]
pub(crate) struct LayerGrams {
    pub(crate) tasks: Vec<TaskGrams>,
}

impl LayerGrams {
    /// What task `t`'s weight `name` was measured with, if it was.
    pub(crate) fn get(&self, t: usize, name: &str) -> Option<(Product, &Gram)> {
        self.tasks.get(t)?.get(name).map(|(p, g)| (*p, &**g))
    }
}

/// The weights this module fits, with their product and the name of their activation:
/// `MatMul(activation, weight)` with a rank-2 initializer, and pointwise convolutions (a
/// `[out, in, 1, 1]` initializer, one group, stride 1).
fn fitted_weights(
    path: &Path,
    ckpt: &Checkpoint,
) -> Result<Vec<(String, String, Product)>, CompileError> {
    let model =
        crate::onnx::decode_model(ckpt.stripped_graph()).map_err(|source| CompileError::Onnx {
            path: path.to_path_buf(),
            source,
        })?;
    let shape_of = |name: &str| {
        ckpt.tensors()
            .iter()
            .find(|t| t.name == name)
            .map(|t| t.shape.as_slice())
    };
    let mut out = Vec::new();
    for node in model.graph.iter().flat_map(|g| &g.node) {
        let (Some(x), Some(w)) = (node.input.first(), node.input.get(1)) else {
            continue;
        };
        let attr_is_one = |name: &str| {
            node.attribute
                .iter()
                .filter(|a| a.name == name)
                .all(|a| a.i <= 1 && a.ints.iter().all(|&v| v == 1))
        };
        let product = match (node.op_type.as_str(), shape_of(w)) {
            ("MatMul", Some([_, _])) if node.input.len() == 2 => Product::MatMul,
            ("Conv", Some([_, _, 1, 1])) if attr_is_one("group") && attr_is_one("strides") => {
                Product::PointwiseConv
            }
            _ => continue,
        };
        out.push((w.clone(), x.clone(), product));
    }
    Ok(out)
}

/// One task's original model run once on its calibration inputs ([`run_original`]), with the
/// activations of its fitted weights as extra outputs: its reference outputs, and its weights'
/// products and Gram matrices by weight name.
pub(crate) fn measure(
    ckpt: &Checkpoint,
    path: &Path,
    graph: Option<&Path>,
    set: &Inputs,
) -> Result<(Outputs, TaskGrams), CompileError> {
    let err = tract(&set.name);
    let weights = fitted_weights(path, ckpt)?;
    let mut activations: Vec<String> = weights.iter().map(|(_, x, _)| x.clone()).collect();
    activations.sort();
    activations.dedup();
    // The product each activation feeds (the first weight's, if several).
    let products: Vec<Product> = activations
        .iter()
        .map(|a| {
            weights
                .iter()
                .find(|(_, x, _)| x == a)
                .map_or(Product::MatMul, |(_, _, p)| *p)
        })
        .collect();
    let mask = set
        .arrays
        .iter()
        .find(|(n, _)| n == "attention_mask")
        .map(|(_, a)| a.cast_to::<i64>().map(|a| a.into_owned()))
        .transpose()
        .map_err(&err)?;
    let mut grams: Vec<Option<Gram>> = vec![None; activations.len()];
    let reference = run_original(path, graph, set, &activations, |outputs, range| {
        // The chunk's attention mask, one flag per (example, position).
        let keep: Option<Vec<bool>> = match &mask {
            Some(m) => {
                let m = m.slice(0, range.start, range.end).map_err(&err)?;
                let m = m.to_plain_array_view::<i64>().map_err(&err)?;
                Some(m.iter().map(|&v| v != 0).collect())
            }
            None => None,
        };
        for ((slot, value), product) in grams.iter_mut().zip(outputs).zip(&products) {
            let value = value.cast_to::<f32>().map_err(&err)?;
            let x = value.to_plain_array_view::<f32>().map_err(&err)?;
            // Rows of features: the last axis of a MatMul's input; for a convolution's NCHW
            // input, the channels of every pixel.
            let rows = match (product, x.shape()) {
                (Product::PointwiseConv, &[n, c, ..]) if n > 0 && c > 0 => {
                    let nhwc = x
                        .to_shape((n, c, x.len() / (n * c)))
                        .map_err(|e| CompileError::Calibration(format!("{}: {e}", set.name)))?
                        .permuted_axes([0, 2, 1]);
                    nhwc.as_standard_layout()
                        .into_shape_with_order((x.len() / c, c))
                        .map_err(|e| CompileError::Calibration(format!("{}: {e}", set.name)))?
                        .into_owned()
                }
                (Product::MatMul, &[.., d]) if d > 0 => x
                    .to_shape((x.len() / d, d))
                    .map_err(|e| CompileError::Calibration(format!("{}: {e}", set.name)))?
                    .into_owned(),
                _ => continue,
            };
            let dim = rows.ncols();
            if dim > MAX_DIM {
                continue;
            }
            let keep = match product {
                Product::MatMul => keep.as_deref().filter(|k| k.len() == rows.nrows()),
                Product::PointwiseConv => None,
            };
            let gram = slot.get_or_insert_with(|| Gram {
                dim,
                values: vec![0.0; dim * dim],
            });
            if gram.dim == dim {
                accumulate(gram, rows.view(), keep);
            }
        }
        Ok(())
    })?;
    let by_activation: BTreeMap<&str, std::sync::Arc<Gram>> = activations
        .iter()
        .zip(grams)
        .filter_map(|(a, g)| Some((a.as_str(), std::sync::Arc::new(g?))))
        .collect();
    let grams = weights
        .iter()
        .filter_map(|(w, x, p)| Some((w.clone(), (*p, by_activation.get(x.as_str())?.clone()))))
        .collect();
    Ok((reference, grams))
}

/// `G += XᵀX` over the rows of `x` that `keep` keeps (all without a mask).
fn accumulate(gram: &mut Gram, x: tract_ndarray::ArrayView2<f32>, keep: Option<&[bool]>) {
    let product = match keep {
        None => x.t().dot(&x),
        Some(keep) => {
            let rows: Vec<usize> = (0..x.nrows())
                .filter(|&r| keep.get(r).copied().unwrap_or(true))
                .collect();
            let kept = x.select(tract_ndarray::Axis(0), &rows);
            kept.t().dot(&kept)
        }
    };
    for (g, p) in gram.values.iter_mut().zip(product.iter()) {
        *g += f64::from(*p);
    }
}

/// The row scales of a weight's code `code` (its task vector part `tau`) fitted to the layer
/// output, by its product; `None` where there is nothing to fit.
pub(crate) fn fit_scales(
    (product, gram): (Product, &Gram),
    tau: &[f32],
    code: &[f32],
) -> Option<Vec<f32>> {
    match product {
        Product::MatMul => fit_row_scales(gram, tau, code),
        Product::PointwiseConv => fit_channel_scales(gram, tau, code),
    }
}

/// Per output channel `o` of a pointwise convolution (rows of `gram.dim` values):
/// `s_o = c_oᵀGτ_o / c_oᵀGc_o`, 1 where the code is zero on the data.
fn fit_channel_scales(gram: &Gram, tau: &[f32], code: &[f32]) -> Option<Vec<f32>> {
    let n = gram.dim;
    if n == 0 || tau.len() != code.len() || !tau.len().is_multiple_of(n) {
        return None;
    }
    let g = tract_ndarray::ArrayView2::from_shape((n, n), &gram.values).ok()?;
    let scales = tau
        .chunks_exact(n)
        .zip(code.chunks_exact(n))
        .map(|(t, c)| {
            let c = tract_ndarray::Array1::from_iter(c.iter().map(|&v| f64::from(v)));
            let t = tract_ndarray::Array1::from_iter(t.iter().map(|&v| f64::from(v)));
            let gc = g.dot(&c);
            let (num, den) = (gc.dot(&t), gc.dot(&c));
            if den > 0.0 && (num / den).is_finite() {
                (num / den) as f32
            } else {
                1.0
            }
        })
        .collect();
    Some(scales)
}

/// The row scales `s` minimizing `‖X(τ − diag(s)·C)‖²` for a weight of `rows × cols` (`rows` =
/// the Gram's dimension), or `None` when the system is singular or the result is not finite.
fn fit_row_scales(gram: &Gram, tau: &[f32], code: &[f32]) -> Option<Vec<f32>> {
    let n = gram.dim;
    if n == 0 || tau.len() != code.len() || !tau.len().is_multiple_of(n) {
        return None;
    }
    let cols = tau.len() / n;
    let t = tract_ndarray::ArrayView2::from_shape((n, cols), tau).ok()?;
    let c = tract_ndarray::ArrayView2::from_shape((n, cols), code).ok()?;
    let g = tract_ndarray::ArrayView2::from_shape((n, n), &gram.values).ok()?;
    let c64 = c.mapv(f64::from);
    let gt = g.dot(&t.mapv(f64::from));
    let cct = c64.dot(&c64.t());
    // A = G ∘ CCᵀ, b_k = Σ_j (Gτ)_kj C_kj.
    let mut a: Vec<f64> = g.iter().zip(cct.iter()).map(|(x, y)| x * y).collect();
    let b: Vec<f64> = (0..n)
        .map(|k| (0..cols).map(|j| gt[[k, j]] * c64[[k, j]]).sum())
        .collect();
    let mean_diag = (0..n).map(|k| a[k * n + k]).sum::<f64>() / n as f64;
    if mean_diag <= 0.0 || !mean_diag.is_finite() {
        return None;
    }
    for k in 0..n {
        a[k * n + k] += 1e-6 * mean_diag;
    }
    let s = cholesky_solve(&mut a, &b, n)?;
    s.iter()
        .all(|v| v.is_finite())
        .then(|| s.iter().map(|&v| v as f32).collect())
}

/// Solves `A x = b` for a symmetric positive definite `A` (`n × n`, row-major, overwritten by
/// its Cholesky factor), or `None` if `A` is not positive definite.
fn cholesky_solve(a: &mut [f64], b: &[f64], n: usize) -> Option<Vec<f64>> {
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= a[j * n + k] * a[j * n + k];
        }
        if d <= 0.0 || !d.is_finite() {
            return None;
        }
        let d = d.sqrt();
        a[j * n + j] = d;
        for i in j + 1..n {
            let mut v = a[i * n + j];
            for k in 0..j {
                v -= a[i * n + k] * a[j * n + k];
            }
            a[i * n + j] = v / d;
        }
    }
    // L y = b, then Lᵀ x = y.
    let mut y = b.to_vec();
    for i in 0..n {
        for k in 0..i {
            y[i] -= a[i * n + k] * y[k];
        }
        y[i] /= a[i * n + i];
    }
    for i in (0..n).rev() {
        for k in i + 1..n {
            y[i] -= a[k * n + i] * y[k];
        }
        y[i] /= a[i * n + i];
    }
    Some(y)
}

/// Multiplies the scale of every block of row `r` of an encoded residual (rows of `row_len`
/// values, a multiple of the block length) by `scales[r]`. `false`, and nothing changed, when
/// the rows are not whole blocks or the sizes do not match.
pub(crate) fn scale_block_rows(
    encoding: Encoding,
    encoded: &mut [u8],
    row_len: usize,
    scales: &[f32],
) -> bool {
    let (elements, bytes) = encoding.block();
    let (elements, bytes) = (elements as usize, bytes as usize);
    if !encoding.is_quantized() || row_len == 0 || !row_len.is_multiple_of(elements) {
        return false;
    }
    let per_row = row_len / elements;
    if encoded.len() != scales.len() * per_row * bytes {
        return false;
    }
    for (block, chunk) in encoded.chunks_exact_mut(bytes).enumerate() {
        let (Some(&s), Some(head)) = (scales.get(block / per_row), chunk.first_chunk_mut::<4>())
        else {
            return false;
        };
        *head = (f32::from_le_bytes(*head) * s).to_le_bytes();
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-worked 2 × 2 case: X = I (G = I), so the fit is per-row least squares in weight
    /// space: s_k = ⟨τ_k, c_k⟩ / ⟨c_k, c_k⟩ = (2·1 + 4·2) / (1 + 4) = 2 and (3·1) / 1 = 3.
    #[test]
    fn with_identity_activations_the_fit_is_row_least_squares() {
        let gram = Gram {
            dim: 2,
            values: vec![1.0, 0.0, 0.0, 1.0],
        };
        let s = fit_row_scales(&gram, &[2.0, 4.0, 3.0, 0.0], &[1.0, 2.0, 1.0, 0.0]).unwrap();
        assert!(
            (s[0] - 2.0).abs() < 1e-4 && (s[1] - 3.0).abs() < 1e-4,
            "{s:?}"
        );
    }

    /// Correlated activations couple the rows: G = [[2, 1], [1, 2]], τ = [1, 1]ᵀ (one
    /// column), C = [1, 0]ᵀ: only row 0 has a code, and the best s_0 also makes up for row 1's
    /// missing part through the correlation: s_0 = (Gτ)_0 / G_00 = 3 / 2 (row 1: no code, the
    /// ridge keeps s_1 finite and irrelevant).
    #[test]
    fn correlated_activations_shift_the_scales() {
        let gram = Gram {
            dim: 2,
            values: vec![2.0, 1.0, 1.0, 2.0],
        };
        let s = fit_row_scales(&gram, &[1.0, 1.0], &[1.0, 0.0]).unwrap();
        assert!((s[0] - 1.5).abs() < 1e-5, "{s:?}");
    }

    /// A pointwise convolution fits each output channel alone: with G = I the weight-space
    /// least squares of each row (2 and 3 as above), with G = [[2, 1], [1, 2]], τ_0 = [1, 1],
    /// c_0 = [1, 0]: Gc_0 = [2, 1], s_0 = (Gc_0)·τ_0 / (Gc_0)·c_0 = 3 / 2; a zero code keeps 1.
    #[test]
    fn channel_scales_are_fitted_one_row_at_a_time() {
        let identity = Gram {
            dim: 2,
            values: vec![1.0, 0.0, 0.0, 1.0],
        };
        let s = fit_channel_scales(&identity, &[2.0, 4.0, 3.0, 0.0], &[1.0, 2.0, 1.0, 0.0]);
        assert_eq!(s, Some(vec![2.0, 3.0]));
        let correlated = Gram {
            dim: 2,
            values: vec![2.0, 1.0, 1.0, 2.0],
        };
        let s = fit_channel_scales(&correlated, &[1.0, 1.0, 5.0, 5.0], &[1.0, 0.0, 0.0, 0.0]);
        assert_eq!(s, Some(vec![1.5, 1.0]));
        assert_eq!(fit_channel_scales(&correlated, &[1.0; 3], &[1.0; 3]), None);
    }

    #[test]
    fn cholesky_solves_and_refuses_what_is_not_positive_definite() {
        let mut a = vec![4.0, 2.0, 2.0, 3.0];
        let x = cholesky_solve(&mut a, &[2.0, 5.0], 2).unwrap();
        // 4x + 2y = 2, 2x + 3y = 5: x = -0.5, y = 2.
        assert!(
            (x[0] + 0.5).abs() < 1e-12 && (x[1] - 2.0).abs() < 1e-12,
            "{x:?}"
        );
        let mut b = vec![1.0, 2.0, 2.0, 1.0];
        assert!(cholesky_solve(&mut b, &[1.0, 1.0], 2).is_none());
    }

    #[test]
    fn block_scales_are_multiplied_per_row() {
        // Two rows of 64 values in q8 (one block each): the decoded rows scale by 2 and 0.5.
        let values: Vec<f32> = (0..128).map(|i| (i as f32 - 64.0) / 10.0).collect();
        let mut encoded = Vec::new();
        Encoding::Q8.encode(&values, &mut encoded);
        let mut before = vec![0.0; 128];
        Encoding::Q8.decode_slice(&encoded, &mut before);
        assert!(scale_block_rows(
            Encoding::Q8,
            &mut encoded,
            64,
            &[2.0, 0.5]
        ));
        let mut after = vec![0.0; 128];
        Encoding::Q8.decode_slice(&encoded, &mut after);
        for (i, (a, b)) in after.iter().zip(&before).enumerate() {
            let s = if i < 64 { 2.0 } else { 0.5 };
            assert!(
                (a - b * s).abs() <= 1e-6 * b.abs().max(1.0),
                "{i}: {a} vs {b}"
            );
        }
        // Rows that are not whole blocks: refused, untouched.
        let copy = encoded.clone();
        assert!(!scale_block_rows(Encoding::Q8, &mut encoded, 32, &[1.0; 4]));
        assert_eq!(encoded, copy);
    }
}
