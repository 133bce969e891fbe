//! What `taskpack bench` runs: deterministic inputs for a task's graph, and the symbolic
//! dimensions a model declares.

use anyhow::Result;
use taskpack::runtime::IoInfo;
use tract_onnx::prelude::*;

/// The size bench gives a symbolic dimension on axis `axis`: the batch on the first axis, the
/// sequence length on any other (a text model's `[batch, sequence]` token inputs).
pub(super) fn symbolic_size(axis: usize, batch: usize, seq: usize) -> usize {
    if axis == 0 {
        batch
    } else {
        seq
    }
}

/// Deterministic pseudo-random inputs in [0, 1) (floats) or ones (integers: valid token ids and
/// attention masks), symbolic dimensions sized by [`symbolic_size`].
pub(super) fn inputs(facts: &[IoInfo], batch: usize, seq: usize) -> Result<TVec<Tensor>> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    facts
        .iter()
        .map(|f| {
            let shape: Vec<usize> = (f.shape.iter().enumerate())
                .map(|(axis, d)| d.unwrap_or_else(|| symbolic_size(axis, batch, seq)))
                .collect();
            let mut t = Tensor::zero_dt(f.dtype, &shape)?;
            if f.dtype == DatumType::F32 {
                for v in t.try_as_plain_ram_mut()?.as_slice_mut::<f32>()? {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    *v = (state >> 40) as f32 / (1u64 << 24) as f32;
                }
            } else if f.dtype.is_integer() {
                t = Tensor::from(tract_ndarray::ArrayD::<i64>::ones(shape.clone()))
                    .cast_to_dt(f.dtype)?
                    .into_owned();
            }
            Ok(t)
        })
        .collect()
}

/// Each input as a fresh `TValue` (a run consumes its inputs).
pub(super) fn tvalues(inputs: &TVec<Tensor>) -> TVec<TValue> {
    inputs.iter().map(|t| t.clone().into_tvalue()).collect()
}

/// The symbolic dimension names (`dim_param`) of the model's graph inputs, each with the first
/// axis it names.
pub(super) fn input_symbols(onnx: &[u8]) -> Result<Vec<(String, usize)>> {
    use tract_onnx::pb::tensor_shape_proto::dimension::Value;
    use tract_onnx::pb::type_proto;
    let model = tract_onnx::onnx().proto_model_for_read(&mut &onnx[..])?;
    let mut names = Vec::new();
    for input in model.graph.iter().flat_map(|g| &g.input) {
        let Some(type_proto::Value::TensorType(t)) =
            input.r#type.as_ref().and_then(|t| t.value.as_ref())
        else {
            continue;
        };
        for (axis, d) in t.shape.iter().flat_map(|s| &s.dim).enumerate() {
            if let Some(Value::DimParam(p)) = &d.value {
                if !names.iter().any(|(n, _)| n == p) {
                    names.push((p.clone(), axis));
                }
            }
        }
    }
    Ok(names)
}
