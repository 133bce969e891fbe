//! What the tract examples share: an ONNX file parsed and optimized by plain tract, and the
//! inputs they all run — 64 ones at batch 1 in each input (a text model's token ids and
//! attention mask), in each input's type.

use anyhow::{Context, Result};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

/// `path` parsed and optimized by tract. With `fixed`, the inputs are declared `[1, 64]` first
/// (else batch and sequence stay symbolic, as in the engine's templates).
pub fn optimized(path: &str, fixed: bool) -> Result<TypedModel> {
    let mut model = tract_onnx::onnx()
        .model_for_path(path)
        .with_context(|| format!("tract cannot load {path}"))?;
    if fixed {
        for i in 0..model.input_outlets()?.len() {
            if let Some(dt) = model.input_fact(i)?.datum_type.concretize() {
                model.set_input_fact(i, InferenceFact::dt_shape(dt, [1, 64]))?;
            }
        }
    }
    model
        .into_optimized()
        .with_context(|| format!("tract cannot optimize {path}"))
}

/// [`ones`] for the inputs of `model`.
pub fn input_ones(model: &TypedModel) -> Result<TVec<TValue>> {
    let types = model
        .input_outlets()?
        .iter()
        .map(|o| Ok(model.outlet_fact(*o)?.datum_type))
        .collect::<Result<Vec<_>>>()?;
    ones(&types)
}

/// 64 ones at batch 1 in each of `types`.
pub fn ones(types: &[DatumType]) -> Result<TVec<TValue>> {
    types
        .iter()
        .map(|&dt| {
            let ones = tract_ndarray::Array2::<i64>::ones((1, 64)).into_tensor();
            Ok(ones.cast_to_dt(dt)?.into_owned().into_tvalue())
        })
        .collect()
}
