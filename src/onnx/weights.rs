//! The compiler's side of the ONNX round trip (feature `compiler`): which initializers of a
//! checkpoint are weights, the stripped graph a bundle stores, and the standalone model rebuilt
//! from a stripped graph and weights (`taskpack export`). The runtime never needs these: it
//! binds weights into a stripped graph it decodes with [`decode_model`].

use std::collections::{BTreeSet, HashSet};

use prost::Message;
use tract_onnx::pb::{GraphProto, ModelProto, TensorProto};

use super::{decode_model, dtype_from_onnx, onnx_data_type, OnnxError};
use crate::dtype::DType;

/// Name, type and shape of one float initializer (a weight).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct InitializerInfo {
    /// Initializer name (weights are matched across checkpoints by this name).
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape; empty for a scalar.
    pub shape: Vec<u64>,
}

impl InitializerInfo {
    /// Number of elements (1 for a scalar), `None` if it overflows (computed by
    /// `format/layout.rs`, the one place sizes are computed).
    pub fn numel(&self) -> Option<usize> {
        let n = crate::format::layout::numel(&self.shape).ok()?;
        crate::format::layout::to_usize(n).ok()
    }

    /// Size of the data in bytes, `None` if it overflows.
    pub fn byte_len(&self) -> Option<usize> {
        let n = crate::format::layout::numel(&self.shape).ok()?;
        let bytes = crate::format::layout::encoded_bytes(n, self.dtype.into()).ok()?;
        crate::format::layout::to_usize(bytes).ok()
    }
}

/// A tensor to put back into a stripped graph: little-endian bytes of `dtype`, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorBytes {
    /// Initializer name.
    pub name: String,
    /// Element type of `data`.
    pub dtype: DType,
    /// Shape; empty for a scalar.
    pub shape: Vec<u64>,
    /// `numel × dtype.size()` little-endian bytes.
    pub data: Vec<u8>,
}

/// Shape of an initializer as `u64`s, with its element and byte counts (checked).
pub(crate) fn checked_shape(
    tensor: &str,
    dims: &[i64],
    dtype: DType,
) -> Result<(Vec<u64>, usize, usize), OnnxError> {
    let shape = dims
        .iter()
        .map(|&d| u64::try_from(d))
        .collect::<Result<Vec<u64>, _>>()
        .map_err(|_| OnnxError::NegativeDimension {
            tensor: tensor.to_string(),
            dims: dims.to_vec(),
        })?;
    let info = InitializerInfo {
        name: String::new(),
        dtype,
        shape,
    };
    match (info.numel(), info.byte_len()) {
        (Some(n), Some(b)) => Ok((info.shape, n, b)),
        _ => Err(OnnxError::ShapeOverflow {
            tensor: tensor.to_string(),
            shape: info.shape,
        }),
    }
}

/// The float initializers (weights) of a fully decoded model, in file order.
///
/// Errors on an unnamed or duplicated float initializer and on an invalid shape. (The reference
/// the fuzz target checks the scanner against; the compiler itself scans.)
#[cfg(any(test, feature = "internals"))]
pub fn float_initializers(model: &ModelProto) -> Result<Vec<InitializerInfo>, OnnxError> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for t in model.graph.iter().flat_map(|g| g.initializer.iter()) {
        let Some(dtype) = dtype_from_onnx(t.data_type) else {
            continue;
        };
        if t.name.is_empty() {
            return Err(OnnxError::UnnamedInitializer);
        }
        if !seen.insert(t.name.as_str()) {
            return Err(OnnxError::DuplicateInitializer(t.name.clone()));
        }
        let (shape, _, _) = checked_shape(&t.name, &t.dims, dtype)?;
        out.push(InitializerInfo {
            name: t.name.clone(),
            dtype,
            shape,
        });
    }
    Ok(out)
}

/// The model re-encoded without its float initializers: the graph a bundle stores once per
/// distinct architecture. Deterministic: the same model always gives the same bytes, and a model
/// that went through [`scan_model`](super::scan_model) gives the same bytes as its full decode.
///
/// Only the non-weight parts of the model are cloned (never a float payload).
pub fn strip_float_initializers(model: &ModelProto) -> Vec<u8> {
    // Exhaustive struct literals (no `..`): a field added to the prost types fails to compile here
    // instead of being silently dropped.
    let graph = model.graph.as_ref().map(|g| GraphProto {
        node: g.node.clone(),
        name: g.name.clone(),
        initializer: g
            .initializer
            .iter()
            .filter(|t| dtype_from_onnx(t.data_type).is_none())
            .cloned()
            .collect(),
        sparse_initializer: g.sparse_initializer.clone(),
        doc_string: g.doc_string.clone(),
        input: g.input.clone(),
        output: g.output.clone(),
        value_info: g.value_info.clone(),
        quantization_annotation: g.quantization_annotation.clone(),
    });
    let stripped = ModelProto {
        ir_version: model.ir_version,
        opset_import: model.opset_import.clone(),
        producer_name: model.producer_name.clone(),
        producer_version: model.producer_version.clone(),
        domain: model.domain.clone(),
        model_version: model.model_version,
        doc_string: model.doc_string.clone(),
        graph,
        metadata_props: model.metadata_props.clone(),
        training_info: model.training_info.clone(),
        functions: model.functions.clone(),
    };
    stripped.encode_to_vec()
}

/// Names used as inputs 3 and 4 (running mean, running variance) of `BatchNormalization` nodes,
/// in the main graph and, recursively, in subgraphs (`If`/`Loop`/`Scan` bodies).
///
/// These are per-task data statistics, never merged. The names are returned whether or not they
/// are initializers of `model` (a stripped graph has none): intersect with the weight list.
pub fn batchnorm_statistics(model: &ModelProto) -> BTreeSet<String> {
    fn visit(graph: &GraphProto, out: &mut BTreeSet<String>) {
        for node in &graph.node {
            if node.op_type == "BatchNormalization"
                && (node.domain.is_empty() || node.domain == "ai.onnx")
            {
                for name in node.input.iter().skip(3).take(2) {
                    if !name.is_empty() {
                        out.insert(name.clone());
                    }
                }
            }
            for attr in &node.attribute {
                attr.g.iter().for_each(|g| visit(g, out));
                attr.graphs.iter().for_each(|g| visit(g, out));
            }
        }
    }
    let mut out = BTreeSet::new();
    if let Some(g) = &model.graph {
        visit(g, &mut out);
    }
    out
}

/// Rebuilds a standalone ONNX model: the stripped graph with `tensors` appended as initializers
/// (inline `raw_data`, little-endian), in the given order after the graph's own (non-float)
/// initializers. Any ONNX runtime can load the result; it has no external references.
///
/// Fails if `stripped` is not a model, a tensor's byte count does not match its shape and type,
/// a dimension does not fit `int64`, or a name is already an initializer.
/// Memory: the decoded stripped graph plus the tensors (moved, not copied) plus the output.
pub fn restore_initializers(
    stripped: &[u8],
    tensors: impl IntoIterator<Item = TensorBytes>,
) -> Result<Vec<u8>, OnnxError> {
    let mut model = decode_model(stripped)?;
    let graph = model.graph.as_mut().ok_or_else(|| OnnxError::NotOnnx {
        reason: "the protobuf has no graph".into(),
    })?;
    let mut names: HashSet<String> = graph.initializer.iter().map(|t| t.name.clone()).collect();
    for t in tensors {
        if t.name.is_empty() {
            return Err(OnnxError::UnnamedInitializer);
        }
        let info = InitializerInfo {
            name: t.name,
            dtype: t.dtype,
            shape: t.shape,
        };
        let overflow = || OnnxError::ShapeOverflow {
            tensor: info.name.clone(),
            shape: info.shape.clone(),
        };
        let expected = info.byte_len().ok_or_else(overflow)?;
        if t.data.len() != expected {
            return Err(OnnxError::DataLength {
                tensor: info.name,
                expected: expected as u64,
                actual: t.data.len() as u64,
                unit: "bytes",
            });
        }
        let dims = info
            .shape
            .iter()
            .map(|&d| i64::try_from(d))
            .collect::<Result<Vec<i64>, _>>()
            .map_err(|_| overflow())?;
        if !names.insert(info.name.clone()) {
            return Err(OnnxError::DuplicateInitializer(info.name));
        }
        graph.initializer.push(TensorProto {
            dims,
            data_type: onnx_data_type(info.dtype),
            name: info.name,
            raw_data: t.data,
            ..Default::default()
        });
    }
    Ok(model.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnx::scan_model;
    use tract_onnx::pb::tensor_proto::DataType;
    use tract_onnx::pb::NodeProto;
    use tract_onnx::pb::{AttributeProto, OperatorSetIdProto};

    fn tensor(name: &str, data_type: i32, dims: Vec<i64>, raw: Vec<u8>) -> TensorProto {
        TensorProto {
            name: name.into(),
            data_type,
            dims,
            raw_data: raw,
            ..Default::default()
        }
    }

    fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
        NodeProto {
            op_type: op.into(),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        }
    }

    fn model() -> ModelProto {
        let mut w = Vec::new();
        DType::F32.encode(&[1.0, 2.0, 3.0, 4.0], &mut w);
        let mut mean = Vec::new();
        DType::F16.encode(&[0.5, 0.25], &mut mean);
        let shape: Vec<u8> = [2i64, 2].iter().flat_map(|v| v.to_le_bytes()).collect();
        ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 13,
            }],
            graph: Some(GraphProto {
                node: vec![
                    node("MatMul", &["x", "w"], "y"),
                    node("BatchNormalization", &["y", "s", "b", "mean", "var"], "z"),
                ],
                initializer: vec![
                    tensor("w", DataType::Float as i32, vec![2, 2], w),
                    tensor("shape", DataType::Int64 as i32, vec![2], shape),
                    tensor("mean", DataType::Float16 as i32, vec![2], mean),
                ],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn lists_strips_and_restores() {
        let m = model();
        let infos = float_initializers(&m).unwrap();
        assert_eq!(
            infos,
            vec![
                InitializerInfo {
                    name: "w".into(),
                    dtype: DType::F32,
                    shape: vec![2, 2]
                },
                InitializerInfo {
                    name: "mean".into(),
                    dtype: DType::F16,
                    shape: vec![2]
                },
            ]
        );
        let stripped = strip_float_initializers(&m);
        let s = decode_model(&stripped).unwrap();
        let names: Vec<_> = s
            .graph
            .as_ref()
            .unwrap()
            .initializer
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        assert_eq!(names, vec!["shape"]);
        // Deterministic and idempotent.
        assert_eq!(strip_float_initializers(&s), stripped);
        // Lazy scan agrees with the full decode.
        let bytes = m.encode_to_vec();
        let scanned = scan_model(&bytes).unwrap();
        assert_eq!(strip_float_initializers(&scanned.skeleton), stripped);
        assert_eq!(
            scanned
                .weights
                .iter()
                .map(|w| w.info.clone())
                .collect::<Vec<_>>(),
            infos
        );

        let g = m.graph.as_ref().unwrap();
        let restored = restore_initializers(
            &stripped,
            [0, 2].iter().map(|&i| {
                let t = &g.initializer[i];
                TensorBytes {
                    name: t.name.clone(),
                    dtype: dtype_from_onnx(t.data_type).unwrap(),
                    shape: t.dims.iter().map(|&d| d as u64).collect(),
                    data: t.raw_data.clone(),
                }
            }),
        )
        .unwrap();
        let r = decode_model(&restored).unwrap();
        let mut a = g.initializer.clone();
        let mut b = r.graph.unwrap().initializer;
        a.sort_by(|x, y| x.name.cmp(&y.name));
        b.sort_by(|x, y| x.name.cmp(&y.name));
        assert_eq!(a, b);
    }

    #[test]
    fn restore_rejects_bad_tensors() {
        let stripped = strip_float_initializers(&model());
        let t = |name: &str, len: usize| TensorBytes {
            name: name.into(),
            dtype: DType::F32,
            shape: vec![2],
            data: vec![0; len],
        };
        assert!(matches!(
            restore_initializers(&stripped, [t("w", 4)]),
            Err(OnnxError::DataLength { .. })
        ));
        assert!(matches!(
            restore_initializers(&stripped, [t("shape", 8)]),
            Err(OnnxError::DuplicateInitializer(_))
        ));
        assert!(matches!(
            restore_initializers(&stripped, [t("w", 8), t("w", 8)]),
            Err(OnnxError::DuplicateInitializer(_))
        ));
        let huge = TensorBytes {
            name: "h".into(),
            dtype: DType::F32,
            shape: vec![u64::MAX, 2],
            data: vec![],
        };
        assert!(matches!(
            restore_initializers(&stripped, [huge]),
            Err(OnnxError::ShapeOverflow { .. })
        ));
    }

    #[test]
    fn batchnorm_statistics_include_subgraphs() {
        let mut m = model();
        let sub = GraphProto {
            node: vec![node(
                "BatchNormalization",
                &["a", "s2", "b2", "m2", "v2"],
                "o",
            )],
            ..Default::default()
        };
        let mut if_node = node("If", &["cond"], "r");
        if_node.attribute.push(AttributeProto {
            name: "then_branch".into(),
            g: Some(sub),
            ..Default::default()
        });
        m.graph.as_mut().unwrap().node.push(if_node);
        let stats: Vec<_> = batchnorm_statistics(&m).into_iter().collect();
        assert_eq!(stats, vec!["m2", "mean", "v2", "var"]);
    }

    #[test]
    fn not_onnx() {
        for bytes in [
            &b""[..],
            b"hello world, this is text\n",
            &[0xff, 0xff, 0xff],
        ] {
            assert!(matches!(
                decode_model(bytes),
                Err(OnnxError::NotOnnx { .. })
            ));
            assert!(matches!(scan_model(bytes), Err(OnnxError::NotOnnx { .. })));
        }
    }
}
