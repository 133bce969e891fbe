//! Evaluating an ONNX classifier on a labeled `.npz` test set with tract (used by `demo`).

use std::path::Path;

use anyhow::{bail, Context, Result};
use taskpack::npz::{Limits, Npz};
use taskpack::runtime::argmax;
use tract_onnx::prelude::*;

/// A labeled test set: inputs under `image`, integer labels under `label`.
pub struct TestSet {
    /// Inputs, `[n, …]`.
    pub image: tract_ndarray::ArrayD<f32>,
    /// Class labels, `[n]`.
    pub label: Vec<i64>,
}

impl TestSet {
    /// Reads `image` (f32) and `label` (i64) from an `.npz` file.
    pub fn read(path: &Path) -> Result<TestSet> {
        let mut npz = Npz::open(path, &Limits::default())?;
        let image = npz
            .read("image")?
            .into_plain_array::<f32>()
            .with_context(|| format!("{}: array `image` is not f32", path.display()))?;
        let label = npz
            .read("label")?
            .into_plain_array::<i64>()
            .with_context(|| format!("{}: array `label` is not i64", path.display()))?;
        if label.ndim() != 1 {
            bail!("{}: array `label` is not a vector", path.display());
        }
        if image.shape().first() != Some(&label.len()) {
            bail!(
                "{}: {} images but {} labels",
                path.display(),
                image.shape().first().unwrap_or(&0),
                label.len()
            );
        }
        Ok(TestSet {
            image,
            label: label.iter().copied().collect(),
        })
    }
}

/// Runs an ONNX model (bytes) with plain tract on the whole test set as one batch; returns its
/// accuracy.
pub fn accuracy(onnx: &[u8], set: &TestSet) -> Result<f64> {
    let model = tract_onnx::onnx()
        .model_for_read(&mut &onnx[..])
        .context("tract cannot read the model")?
        .with_input_fact(0, f32::fact(set.image.shape()).into())?
        .into_optimized()?
        .into_runnable()?;
    let out = model.run(tvec!(Tensor::from(set.image.clone()).into()))?;
    set.accuracy_of(out.first().context("model has no output")?)
}

impl TestSet {
    /// The inputs as one tract batch.
    pub fn batch(&self) -> TVec<TValue> {
        tvec!(Tensor::from(self.image.clone()).into())
    }

    /// Top-1 accuracy of `logits` (`[n, classes]`) against the labels.
    pub fn accuracy_of(&self, logits: &TValue) -> Result<f64> {
        let logits = logits.to_plain_array_view::<f32>()?;
        let Some(&classes) = logits.shape().last() else {
            bail!("scalar output")
        };
        let flat = logits.as_slice().context("non-contiguous output")?;
        let correct = flat
            .chunks(classes.max(1))
            .zip(&self.label)
            .filter(|(row, &l)| argmax(row) == usize::try_from(l).ok())
            .count();
        Ok(correct as f64 / self.label.len().max(1) as f64)
    }
}
