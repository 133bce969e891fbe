//! tract's `Flatten` and `Unsqueeze`, with their axes checked against the input's rank (rule
//! G6): tract's own index the shape with the axes and panic past the rank. These fail the
//! analysis instead.

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{GraphProto, NodeProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::*;
use tract_onnx::tract_hir::internal::{bail, StaticName};
use tract_onnx::tract_hir::ops::array::{AddDims, Flatten};
use tract_onnx::tract_hir::ops::expandable::{expand, Expansion};

/// tract's `Flatten` with its axis checked against the input's rank: tract's own slices the shape
/// with the axis and panics past the rank (rule G6); this one fails the analysis instead, and
/// [`type_graph`] names the node.
#[derive(Debug, Clone, Hash)]
struct CheckedFlatten {
    axis: i64,
}

impl Expansion for CheckedFlatten {
    fn name(&self) -> StaticName {
        "Flatten".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        s.given(&inputs[0].shape, move |s, shape| {
            let rank = i64::try_from(shape.len())?;
            if self.axis < -rank || self.axis > rank {
                bail!(
                    "Flatten axis {} is outside [-{rank}, {rank}] for an input of rank {rank}",
                    self.axis
                );
            }
            let [rows, columns] = Flatten::new(self.axis).compute_shape(&shape)?;
            s.equals(&outputs[0].shape, ShapeFactoid::from(vec![rows, columns]))
        })
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let rank = model.outlet_fact(inputs[0])?.rank();
        let rank = i64::try_from(rank)?;
        if self.axis < -rank || self.axis > rank {
            bail!("Flatten axis {} is outside [-{rank}, {rank}]", self.axis);
        }
        Expansion::wire(&Flatten::new(self.axis), prefix, model, inputs)
    }
}

/// The ONNX parser of [`CheckedFlatten`].
fn checked_flatten(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let axis: i64 = node.get_attr_opt("axis")?.unwrap_or(1);
    Ok((expand(CheckedFlatten { axis }), vec![]))
}

/// tract's `Unsqueeze` (its `AddDims`) with the axes checked: tract's own inserts a dimension
/// at each axis and panics on one past the output's rank (found by the `engine` fuzz target,
/// docs/FUZZING.md). Before opset 13 the axes are an attribute (`axes: Some`), from 13 on the
/// node's second input, which must be a constant.
#[derive(Debug, Clone, Hash)]
struct CheckedUnsqueeze {
    axes: Option<Vec<i64>>,
}

/// `axes` of an `Unsqueeze` of an input of rank `rank`, normalized (`a + r'` for a negative
/// one, `r'` the output's rank) if they are distinct and all in `[-r', r')`, which makes every
/// insertion of tract's `AddDims` land inside the shape.
fn unsqueeze_axes(axes: &[i64], rank: usize) -> TractResult<Vec<isize>> {
    let out = i64::try_from(rank + axes.len())?;
    let mut normalized = Vec::with_capacity(axes.len());
    for &a in axes {
        if a < -out || a >= out {
            bail!("Unsqueeze axis {a} is outside [-{out}, {out}) for an input of rank {rank}");
        }
        let a = isize::try_from(if a < 0 { a + out } else { a })?;
        if normalized.contains(&a) {
            bail!("Unsqueeze axes {axes:?} repeat an axis");
        }
        normalized.push(a);
    }
    Ok(normalized)
}

/// The values of a tensor of axes.
fn axes_of(t: &Tensor) -> TractResult<Vec<i64>> {
    Ok(t.cast_to::<i64>()?
        .try_as_plain_ram()?
        .as_slice::<i64>()?
        .to_vec())
}

impl Expansion for CheckedUnsqueeze {
    fn name(&self) -> StaticName {
        "Unsqueeze".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, if self.axes.is_some() { 1 } else { 2 })?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, &inputs[0].datum_type)?;
        match &self.axes {
            Some(axes) => s.given(&inputs[0].shape, move |s, shape| {
                let axes = unsqueeze_axes(axes, shape.len())?;
                s.equals(&outputs[0].shape, AddDims::new(axes).output_shape(&shape))
            }),
            None => s.given_2(&inputs[0].shape, &inputs[1].value, move |s, shape, axes| {
                let axes = unsqueeze_axes(&axes_of(&axes)?, shape.len())?;
                s.equals(&outputs[0].shape, AddDims::new(axes).output_shape(&shape))
            }),
        }
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        let axes = match &self.axes {
            Some(axes) => axes.clone(),
            None => match model.outlet_fact(inputs[1])?.konst.as_ref() {
                Some(axes) => axes_of(axes)?,
                None => bail!("Unsqueeze needs its axes to be a constant"),
            },
        };
        let axes = unsqueeze_axes(&axes, model.outlet_fact(inputs[0])?.rank())?;
        Expansion::wire(&AddDims::new(axes), prefix, model, &inputs[0..1])
    }
}

/// The ONNX parser of [`CheckedUnsqueeze`], by opset as tract's own.
fn checked_unsqueeze(
    ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let axes = if ctx.onnx_operator_set_version < 13 {
        Some(node.get_attr_vec::<i64>("axes")?)
    } else {
        None
    };
    Ok((expand(CheckedUnsqueeze { axes }), vec![]))
}

/// tract's ONNX parser, with the operators it would panic on replaced by checked ones.
pub(super) fn onnx_parser() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    onnx.op_register.insert("Flatten", checked_flatten);
    onnx.op_register.insert("Unsqueeze", checked_unsqueeze);
    onnx
}

/// `(node, input, axis)` of every top-level `Flatten` node (axis 1 when not given).
pub(super) fn flatten_axes(graph: &GraphProto) -> Vec<(String, String, i64)> {
    graph
        .node
        .iter()
        .enumerate()
        .filter(|(_, n)| n.op_type == "Flatten" && (n.domain.is_empty() || n.domain == "ai.onnx"))
        .filter_map(|(i, n)| {
            let input = n.input.first()?.clone();
            let axis = n
                .attribute
                .iter()
                .find(|a| a.name == "axis")
                .map_or(1, |a| a.i);
            Some((crate::runtime::check::node_label(n, i), input, axis))
        })
        .collect()
}
