//! tract's `Flatten`, with its axis checked against the input's rank (rule G6).

use tract_onnx::model::ParsingContext;
use tract_onnx::pb::{GraphProto, NodeProto};
use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::*;
use tract_onnx::tract_hir::internal::{bail, StaticName};
use tract_onnx::tract_hir::ops::array::Flatten;
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

/// tract's ONNX parser, with the operators it would panic on replaced by checked ones.
pub(super) fn onnx_parser() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    onnx.op_register.insert("Flatten", checked_flatten);
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
