//! Lazy scan of an ONNX file: everything but the float weights is decoded; the weights are
//! located (byte ranges into the input, or external-data references) and read one at a time.

use std::collections::HashSet;
use std::ops::Range;

use prost::Message;
use tract_onnx::pb::tensor_proto::DataLocation;
use tract_onnx::pb::{ModelProto, StringStringEntryProto, TensorProto};

use super::wire::{count_packed_varints, for_each_packed_varint, put_bytes_field, Payload, Reader};
use super::{check_is_model, checked_shape, dtype_from_onnx, InitializerInfo, OnnxError};
use crate::dtype::DType;

/// `ModelProto.graph`.
const MODEL_GRAPH: u32 = 7;
/// `GraphProto.initializer`.
const GRAPH_INITIALIZER: u32 = 5;
/// `TensorProto` payload fields: float_data, int32_data, string_data, int64_data, raw_data,
/// double_data, uint64_data. Everything else is metadata.
const TENSOR_DATA_FIELDS: [u32; 7] = [4, 5, 6, 7, 9, 10, 11];
const TENSOR_FLOAT_DATA: u32 = 4;
const TENSOR_INT32_DATA: u32 = 5;
const TENSOR_RAW_DATA: u32 = 9;

/// Where a weight's data is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightData {
    /// `raw_data`: little-endian bytes of the weight's dtype at this range of the scanned buffer
    /// (length already checked against the shape).
    Raw(Range<usize>),
    /// Typed fields (`float_data` for FLOAT, `int32_data` for FLOAT16/BFLOAT16): the range is
    /// the whole `TensorProto` message in the scanned buffer; decode with [`read_typed_f32`].
    /// The element count was checked against the shape.
    Typed(Range<usize>),
    /// `data_location = EXTERNAL`: resolving the file is the caller's business.
    External(ExternalRef),
    /// A tensor with zero elements and no data.
    Empty,
}

/// A parsed `external_data` description. Paths are **not** validated here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalRef {
    /// The `location` entry, as written (relative to the model's folder by the ONNX spec).
    pub location: String,
    /// The `offset` entry, 0 if absent.
    pub offset: u64,
    /// The `length` entry, if present. For weights it has been checked against the shape.
    pub length: Option<u64>,
}

/// One weight found by [`scan_model`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScannedWeight {
    /// Name, dtype, shape.
    pub info: InitializerInfo,
    /// Where its data is.
    pub data: WeightData,
}

/// A non-float initializer of the skeleton whose data is external. It must be inlined (its
/// `raw_data` filled, `data_location` and `external_data` cleared) before the skeleton is stored,
/// because a bundle has no external references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GraphExternal {
    /// Index in `skeleton.graph.initializer`.
    pub index: usize,
    /// Initializer name.
    pub name: String,
    /// Where its data is.
    pub external: ExternalRef,
}

/// Result of [`scan_model`].
#[derive(Debug, Clone)]
pub struct ScannedModel {
    /// The model without its float initializers (everything else decoded and owned).
    pub skeleton: ModelProto,
    /// The float initializers in file order.
    pub weights: Vec<ScannedWeight>,
    /// Non-float initializers of the skeleton with external data, in file order.
    pub graph_externals: Vec<GraphExternal>,
}

/// Scans ONNX bytes without copying the float weights (see the module documentation).
///
/// Validates what can be validated without touching external files: the protobuf structure, that
/// it is a model ([`OnnxError::NotOnnx`] otherwise), unique non-empty weight names, shapes, and the
/// amount of inline data of every weight. Memory: the skeleton plus a small index.
pub fn scan_model(bytes: &[u8]) -> Result<ScannedModel, OnnxError> {
    let not_onnx = |reason: String| OnnxError::NotOnnx { reason };
    let mut state = State {
        bytes,
        weights: Vec::new(),
        names: HashSet::new(),
        graph_externals: Vec::new(),
        kept_initializers: 0,
    };
    let mut top = Vec::new();
    let mut reader = Reader::new(bytes, 0..bytes.len()).map_err(not_onnx)?;
    while let Some(field) = reader
        .next_field()
        .map_err(|e| not_onnx(format!("not a valid protobuf ({e})")))?
    {
        match (&field.payload, field.number) {
            (Payload::Bytes(range), MODEL_GRAPH) => {
                let graph = state.rewrite_graph(range.clone())?;
                put_bytes_field(&mut top, MODEL_GRAPH, &graph);
            }
            _ => top.extend_from_slice(bytes.get(field.span.clone()).unwrap_or_default()),
        }
    }
    let skeleton = ModelProto::decode(top.as_slice())
        .map_err(|e| not_onnx(format!("not a valid ONNX protobuf ({e})")))?;
    check_is_model(&skeleton)?;
    let kept = skeleton.graph.as_ref().map_or(0, |g| g.initializer.len());
    if kept != state.kept_initializers {
        return Err(not_onnx(format!(
            "inconsistent initializer count ({kept} decoded, {} scanned)",
            state.kept_initializers
        )));
    }
    Ok(ScannedModel {
        skeleton,
        weights: state.weights,
        graph_externals: state.graph_externals,
    })
}

struct State<'a> {
    bytes: &'a [u8],
    weights: Vec<ScannedWeight>,
    names: HashSet<String>,
    graph_externals: Vec<GraphExternal>,
    /// Non-float initializers copied into the skeleton so far.
    kept_initializers: usize,
}

/// What [`scan_tensor`] learns about one `TensorProto` without copying its payload.
struct TensorScan {
    /// The message decoded from its metadata fields only (no payload).
    meta: TensorProto,
    /// Last `raw_data` occurrence.
    raw: Option<Range<usize>>,
    /// Elements in `float_data`.
    float_count: u64,
    /// Elements in `int32_data`.
    int32_count: u64,
}

impl State<'_> {
    /// The graph message re-encoded without its float initializers (recorded in `self.weights`).
    fn rewrite_graph(&mut self, range: Range<usize>) -> Result<Vec<u8>, OnnxError> {
        let bytes = self.bytes;
        let bad = |e: String| OnnxError::NotOnnx {
            reason: format!("invalid graph ({e})"),
        };
        let mut out = Vec::new();
        let mut reader = Reader::new(bytes, range).map_err(bad)?;
        while let Some(field) = reader.next_field().map_err(bad)? {
            let span = bytes.get(field.span.clone()).unwrap_or_default();
            let Payload::Bytes(msg) = &field.payload else {
                out.extend_from_slice(span);
                continue;
            };
            if field.number != GRAPH_INITIALIZER {
                out.extend_from_slice(span);
                continue;
            }
            let index = self.weights.len() + self.kept_initializers;
            let scan = scan_tensor(bytes, msg.clone()).map_err(|e| OnnxError::NotOnnx {
                reason: format!("invalid initializer #{index} ({e})"),
            })?;
            match dtype_from_onnx(scan.meta.data_type) {
                Some(dtype) => {
                    let weight = weight(scan, msg.clone(), dtype)?;
                    if !self.names.insert(weight.info.name.clone()) {
                        return Err(OnnxError::DuplicateInitializer(weight.info.name));
                    }
                    self.weights.push(weight);
                }
                None => {
                    if is_external(&scan.meta) {
                        let external = parse_external(&scan.meta.name, &scan.meta.external_data)?;
                        self.graph_externals.push(GraphExternal {
                            index: self.kept_initializers,
                            name: scan.meta.name.clone(),
                            external,
                        });
                    }
                    self.kept_initializers += 1;
                    out.extend_from_slice(span);
                }
            }
        }
        Ok(out)
    }
}

fn is_external(meta: &TensorProto) -> bool {
    meta.data_location == Some(DataLocation::External as i32)
}

fn scan_tensor(bytes: &[u8], range: Range<usize>) -> Result<TensorScan, String> {
    let mut header = Vec::new();
    let mut raw = None;
    let mut float_count = 0u64;
    let mut int32_count = 0u64;
    let mut reader = Reader::new(bytes, range)?;
    while let Some(field) = reader.next_field()? {
        if !TENSOR_DATA_FIELDS.contains(&field.number) {
            header.extend_from_slice(bytes.get(field.span.clone()).unwrap_or_default());
            continue;
        }
        let add = |count: u64, n: u64| {
            count
                .checked_add(n)
                .ok_or_else(|| "element count overflows".to_string())
        };
        match (field.number, &field.payload) {
            (TENSOR_RAW_DATA, Payload::Bytes(r)) => raw = Some(r.clone()),
            (TENSOR_FLOAT_DATA, Payload::Bytes(r)) => {
                if r.len() % 4 != 0 {
                    return Err(format!("packed float_data of {} bytes", r.len()));
                }
                float_count = add(float_count, (r.len() / 4) as u64)?;
            }
            (TENSOR_FLOAT_DATA, Payload::Fixed32(_)) => float_count = add(float_count, 1)?,
            (TENSOR_INT32_DATA, Payload::Bytes(r)) => {
                let run = bytes.get(r.clone()).unwrap_or_default();
                int32_count = add(int32_count, count_packed_varints(run)?)?;
            }
            (TENSOR_INT32_DATA, Payload::Varint(_)) => int32_count = add(int32_count, 1)?,
            (TENSOR_RAW_DATA | TENSOR_FLOAT_DATA | TENSOR_INT32_DATA, _) => {
                return Err(format!("field {} has the wrong wire type", field.number))
            }
            // Payload fields of non-float types: irrelevant here (non-float initializers are
            // copied verbatim and decoded by prost).
            _ => {}
        }
    }
    let meta = TensorProto::decode(header.as_slice()).map_err(|e| e.to_string())?;
    Ok(TensorScan {
        meta,
        raw,
        float_count,
        int32_count,
    })
}

fn weight(
    scan: TensorScan,
    message: Range<usize>,
    dtype: DType,
) -> Result<ScannedWeight, OnnxError> {
    let meta = scan.meta;
    let name = meta.name;
    if name.is_empty() {
        return Err(OnnxError::UnnamedInitializer);
    }
    if meta.segment.is_some() {
        return Err(OnnxError::Unsupported {
            tensor: name,
            what: "a segmented tensor",
        });
    }
    let (shape, numel, nbytes) = checked_shape(&name, &meta.dims, dtype)?;
    let length_error = |expected: u64, actual: u64, unit| OnnxError::DataLength {
        tensor: name.clone(),
        expected,
        actual,
        unit,
    };
    let data = if meta.data_location == Some(DataLocation::External as i32) {
        let external = parse_external(&name, &meta.external_data)?;
        if let Some(len) = external.length {
            if len != nbytes as u64 {
                return Err(length_error(nbytes as u64, len, "bytes"));
            }
        }
        WeightData::External(external)
    } else if let Some(raw) = scan.raw.filter(|r| !r.is_empty()) {
        if raw.len() != nbytes {
            return Err(length_error(nbytes as u64, raw.len() as u64, "bytes"));
        }
        WeightData::Raw(raw)
    } else {
        let count = match dtype {
            DType::F32 => scan.float_count,
            DType::F16 | DType::BF16 => scan.int32_count,
        };
        if count > 0 {
            if count != numel as u64 {
                return Err(length_error(numel as u64, count, "elements"));
            }
            WeightData::Typed(message)
        } else if numel == 0 {
            WeightData::Empty
        } else {
            return Err(OnnxError::MissingData { tensor: name });
        }
    };
    Ok(ScannedWeight {
        info: InitializerInfo { name, dtype, shape },
        data,
    })
}

/// Parses `external_data` entries (`location` required; `offset`, `length` optional decimal
/// integers; other keys such as `checksum` ignored). The last occurrence of a key wins.
fn parse_external(
    tensor: &str,
    entries: &[StringStringEntryProto],
) -> Result<ExternalRef, OnnxError> {
    let bad = |reason: String| OnnxError::BadExternalData {
        tensor: tensor.to_string(),
        reason,
    };
    let get = |key: &str| {
        entries
            .iter()
            .rev()
            .find(|e| e.key == key)
            .map(|e| e.value.as_str())
    };
    let number = |key: &str| -> Result<Option<u64>, OnnxError> {
        get(key)
            .map(|v| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| bad(format!("{key} {v:?} is not a non-negative integer")))
            })
            .transpose()
    };
    let location = get("location")
        .filter(|l| !l.is_empty())
        .ok_or_else(|| bad("no location".into()))?;
    Ok(ExternalRef {
        location: location.to_string(),
        offset: number("offset")?.unwrap_or(0),
        length: number("length")?,
    })
}

/// Decodes the typed payload of a weight found as [`WeightData::Typed`] into `out` (cleared
/// first): `float_data` for F32, the low 16 bits of each `int32_data` entry for F16 and BF16
/// (the ONNX convention for half types).
pub fn read_typed_f32(
    bytes: &[u8],
    message: Range<usize>,
    dtype: DType,
    out: &mut Vec<f32>,
) -> Result<(), OnnxError> {
    let bad = |e: String| OnnxError::NotOnnx {
        reason: format!("invalid initializer ({e})"),
    };
    out.clear();
    let mut reader = Reader::new(bytes, message).map_err(bad)?;
    let half = |v: u64| -> f32 {
        let bits = v as u16;
        match dtype {
            DType::BF16 => half::bf16::from_bits(bits).to_f32(),
            _ => half::f16::from_bits(bits).to_f32(),
        }
    };
    while let Some(field) = reader.next_field().map_err(bad)? {
        match (dtype, field.number, &field.payload) {
            (DType::F32, TENSOR_FLOAT_DATA, Payload::Bytes(r)) => out.extend(
                bytes
                    .get(r.clone())
                    .unwrap_or_default()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            ),
            (DType::F32, TENSOR_FLOAT_DATA, Payload::Fixed32(bits)) => {
                out.push(f32::from_bits(*bits))
            }
            (DType::F16 | DType::BF16, TENSOR_INT32_DATA, Payload::Bytes(r)) => {
                for_each_packed_varint(bytes, r.clone(), |v| out.push(half(v))).map_err(bad)?
            }
            (DType::F16 | DType::BF16, TENSOR_INT32_DATA, Payload::Varint(v)) => out.push(half(*v)),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::pb::tensor_proto::DataType;
    use tract_onnx::pb::{GraphProto, NodeProto};

    fn model_with(t: TensorProto) -> Vec<u8> {
        ModelProto {
            ir_version: 8,
            graph: Some(GraphProto {
                node: vec![NodeProto {
                    op_type: "Identity".into(),
                    input: vec![t.name.clone()],
                    output: vec!["y".into()],
                    ..Default::default()
                }],
                initializer: vec![t],
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn typed_fields_are_read_without_prost() {
        let t = TensorProto {
            name: "w".into(),
            data_type: DataType::Float as i32,
            dims: vec![3],
            float_data: vec![1.5, -2.0, 0.25],
            ..Default::default()
        };
        let bytes = model_with(t);
        let s = scan_model(&bytes).unwrap();
        let WeightData::Typed(r) = s.weights[0].data.clone() else {
            panic!("{:?}", s.weights[0].data)
        };
        let mut out = Vec::new();
        read_typed_f32(&bytes, r, DType::F32, &mut out).unwrap();
        assert_eq!(out, vec![1.5, -2.0, 0.25]);

        let t = TensorProto {
            name: "h".into(),
            data_type: DataType::Bfloat16 as i32,
            dims: vec![2],
            int32_data: vec![0x3f80, 0xc040], // 1.0, -3.0
            ..Default::default()
        };
        let bytes = model_with(t);
        let s = scan_model(&bytes).unwrap();
        let WeightData::Typed(r) = s.weights[0].data.clone() else {
            panic!()
        };
        read_typed_f32(&bytes, r, DType::BF16, &mut out).unwrap();
        assert_eq!(out, vec![1.0, -3.0]);
    }

    #[test]
    fn wrong_lengths_are_rejected() {
        let t = TensorProto {
            name: "w".into(),
            data_type: DataType::Float as i32,
            dims: vec![3],
            float_data: vec![1.5, -2.0],
            ..Default::default()
        };
        assert!(matches!(
            scan_model(&model_with(t)),
            Err(OnnxError::DataLength {
                expected: 3,
                actual: 2,
                ..
            })
        ));
        let t = TensorProto {
            name: "w".into(),
            data_type: DataType::Float as i32,
            dims: vec![2],
            raw_data: vec![0; 7],
            ..Default::default()
        };
        assert!(matches!(
            scan_model(&model_with(t)),
            Err(OnnxError::DataLength {
                expected: 8,
                actual: 7,
                ..
            })
        ));
        let t = TensorProto {
            name: "w".into(),
            data_type: DataType::Float as i32,
            dims: vec![2],
            ..Default::default()
        };
        assert!(matches!(
            scan_model(&model_with(t)),
            Err(OnnxError::MissingData { .. })
        ));
        let t = TensorProto {
            name: "w".into(),
            data_type: DataType::Float as i32,
            dims: vec![-1],
            raw_data: vec![0; 4],
            ..Default::default()
        };
        assert!(matches!(
            scan_model(&model_with(t)),
            Err(OnnxError::NegativeDimension { .. })
        ));
        let t = TensorProto {
            name: "w".into(),
            data_type: DataType::Float as i32,
            dims: vec![i64::MAX, i64::MAX],
            raw_data: vec![0; 4],
            ..Default::default()
        };
        assert!(matches!(
            scan_model(&model_with(t)),
            Err(OnnxError::ShapeOverflow { .. })
        ));
    }

    #[test]
    fn a_typed_half_weight_is_rejected_unless_every_varint_reads() {
        // A BF16 weight of one element whose packed `int32_data` is one 11-byte varint: one
        // byte with a clear top bit, so counting such bytes said "1 element, matches the
        // shape", the scan succeeded and `read_typed_f32` failed later.
        let meta = TensorProto {
            name: "h".into(),
            data_type: DataType::Bfloat16 as i32,
            dims: vec![1],
            ..Default::default()
        };
        let run = [
            0x80u8, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00,
        ];
        let mut tensor = meta.encode_to_vec();
        put_bytes_field(&mut tensor, TENSOR_INT32_DATA, &run);
        let node = NodeProto {
            op_type: "Identity".into(),
            input: vec!["h".into()],
            output: vec!["y".into()],
            ..Default::default()
        };
        let mut graph = GraphProto {
            node: vec![node],
            ..Default::default()
        }
        .encode_to_vec();
        put_bytes_field(&mut graph, GRAPH_INITIALIZER, &tensor);
        let mut model = ModelProto {
            ir_version: 8,
            ..Default::default()
        }
        .encode_to_vec();
        put_bytes_field(&mut model, MODEL_GRAPH, &graph);
        assert!(
            ModelProto::decode(model.as_slice()).is_err(),
            "prost rejects it too"
        );
        assert!(matches!(
            scan_model(&model),
            Err(OnnxError::NotOnnx { reason }) if reason.contains("varint")
        ));
    }

    #[test]
    fn external_entries_are_parsed() {
        let kv = |k: &str, v: &str| StringStringEntryProto {
            key: k.into(),
            value: v.into(),
        };
        let t = TensorProto {
            name: "w".into(),
            data_type: DataType::Float as i32,
            dims: vec![2],
            data_location: Some(DataLocation::External as i32),
            external_data: vec![
                kv("location", "w.bin"),
                kv("offset", "16"),
                kv("length", "8"),
            ],
            ..Default::default()
        };
        let s = scan_model(&model_with(t.clone())).unwrap();
        assert_eq!(
            s.weights[0].data,
            WeightData::External(ExternalRef {
                location: "w.bin".into(),
                offset: 16,
                length: Some(8)
            })
        );
        let mut bad = t.clone();
        bad.external_data[1].value = "-4".into();
        assert!(matches!(
            scan_model(&model_with(bad)),
            Err(OnnxError::BadExternalData { .. })
        ));
        let mut bad = t;
        bad.external_data.remove(0);
        assert!(matches!(
            scan_model(&model_with(bad)),
            Err(OnnxError::BadExternalData { .. })
        ));
    }
}
