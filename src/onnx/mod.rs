//! ONNX protobuf helpers shared by the compiler and the runtime.
//!
//! A bundle stores each distinct network once, as its ONNX `ModelProto` **without its float
//! initializers** (the "stripped graph"); the weights live in bundle sections and are put back
//! per task. This module provides the pieces of that round trip:
//!
//! - [`decode_model`]: full prost decode of (small) ONNX bytes, e.g. a stripped graph, with a clear
//!   [`OnnxError::NotOnnx`] on anything that is not an ONNX model (the runtime's only use);
//!
//! and, for the compiler only (feature `compiler`):
//! - [`scan_model`]: a *lazy* scan of a (large) ONNX file that decodes everything except the float
//!   weights, whose payloads are reported as byte ranges into the input (see below);
//! - [`float_initializers`], [`strip_float_initializers`], [`batchnorm_statistics`];
//! - [`restore_initializers`]: rebuilds a standalone ONNX model from a stripped graph and weights.
//!
//! **Which initializers are weights.** Only top-level graph initializers of type FLOAT, FLOAT16 or
//! BFLOAT16 are weights ([`dtype_from_onnx`]). Every other initializer (int64 shape constants,
//! DOUBLE, int8 quantized data...), sparse initializers, `Constant` nodes and initializers of
//! subgraphs stay part of the graph.
//!
//! **Memory.** prost decodes `bytes` fields into owned `Vec<u8>`s, so [`decode_model`] on a
//! 400 MB model allocates ≈ 400 MB on top of the input bytes. [`scan_model`] avoids that: it walks
//! the protobuf wire format itself, copies only the non-weight fields (nodes, value infos, non-float
//! initializers, metadata) into a "skeleton" that prost then decodes, and records each weight's
//! `raw_data` as a byte range into the input. When the input is a memory map, heap use is the
//! skeleton (typically kilobytes to a few MB) plus whatever one tensor read allocates.

#[cfg(feature = "compiler")]
mod scan;
#[cfg(feature = "compiler")]
mod weights;
#[cfg(feature = "compiler")]
mod wire;

#[cfg(feature = "compiler")]
pub(crate) use scan::ExternalRef;
#[cfg(feature = "compiler")]
pub use scan::{read_typed_f32, scan_model, ScannedModel, WeightData};
#[cfg(feature = "compiler")]
pub(crate) use weights::checked_shape;
#[cfg(feature = "internals")]
pub use weights::float_initializers;
#[cfg(feature = "compiler")]
pub use weights::{
    batchnorm_statistics, restore_initializers, strip_float_initializers, InitializerInfo,
    TensorBytes,
};

use prost::Message;
pub use tract_onnx::pb::ModelProto;
#[cfg(feature = "internals")]
pub use tract_onnx::pb::TensorProto;

use crate::dtype::DType;
use tract_onnx::pb::tensor_proto::DataType;

/// Errors of the ONNX helpers. Each names the offending initializer where there is one.
// The runtime alone only decodes graphs (`NotOnnx`); the other variants are the compiler's.
#[cfg_attr(not(feature = "compiler"), allow(dead_code))]
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// The bytes are not an ONNX model: not a protobuf `ModelProto`, or one without a graph or
    /// without nodes (random bytes and text files often decode as a protobuf with unknown fields).
    #[error("not an ONNX model: {reason}")]
    NotOnnx {
        /// What was wrong.
        reason: String,
    },
    /// A top-level initializer has an empty name (weights are matched by name).
    #[error("a float initializer has no name")]
    UnnamedInitializer,
    /// Two initializers (or a restored tensor and an initializer) share a name.
    #[error("initializer {0:?} is defined more than once")]
    DuplicateInitializer(String),
    /// A dimension is negative.
    #[error("initializer {tensor:?} has a negative dimension in its shape {dims:?}")]
    NegativeDimension {
        /// Initializer name.
        tensor: String,
        /// The shape as stored.
        dims: Vec<i64>,
    },
    /// The element or byte count overflows (or a dimension does not fit ONNX's `int64`).
    #[error("initializer {tensor:?}: shape {shape:?} is too large")]
    ShapeOverflow {
        /// Initializer name.
        tensor: String,
        /// The shape.
        shape: Vec<u64>,
    },
    /// The amount of data does not match the shape and type.
    #[error("initializer {tensor:?} holds {actual} {unit} of data but its shape and type need {expected}")]
    DataLength {
        /// Initializer name.
        tensor: String,
        /// Required count.
        expected: u64,
        /// Count found.
        actual: u64,
        /// `"bytes"` or `"elements"`.
        unit: &'static str,
    },
    /// A float initializer with a non-empty shape carries no data at all.
    #[error("initializer {tensor:?} has no data")]
    MissingData {
        /// Initializer name.
        tensor: String,
    },
    /// A feature of the ONNX format this crate does not handle for weights.
    #[error("initializer {tensor:?}: {what} is not supported")]
    Unsupported {
        /// Initializer name.
        tensor: String,
        /// What is unsupported.
        what: &'static str,
    },
    /// `external_data` entries that are missing or malformed.
    #[error("initializer {tensor:?}: invalid external data description: {reason}")]
    BadExternalData {
        /// Initializer name.
        tensor: String,
        /// What was wrong.
        reason: String,
    },
}

/// The weight type of an ONNX `TensorProto.data_type`, `None` for non-weight types.
#[cfg(feature = "compiler")]
pub fn dtype_from_onnx(data_type: i32) -> Option<DType> {
    match DataType::try_from(data_type).ok()? {
        DataType::Float => Some(DType::F32),
        DataType::Float16 => Some(DType::F16),
        DataType::Bfloat16 => Some(DType::BF16),
        _ => None,
    }
}

/// The ONNX `TensorProto.data_type` of a weight type.
pub fn onnx_data_type(dtype: DType) -> i32 {
    match dtype {
        DType::F32 => DataType::Float as i32,
        DType::F16 => DataType::Float16 as i32,
        DType::BF16 => DataType::Bfloat16 as i32,
    }
}

/// Decodes ONNX bytes into a `ModelProto` (a full decode: every payload is copied, see the module
/// documentation). Fails with [`OnnxError::NotOnnx`] unless the bytes are a protobuf with a graph
/// that has at least one node.
pub fn decode_model(bytes: &[u8]) -> Result<ModelProto, OnnxError> {
    let model = ModelProto::decode(bytes).map_err(|e| OnnxError::NotOnnx {
        reason: format!("not a valid ONNX protobuf ({e})"),
    })?;
    check_is_model(&model)?;
    Ok(model)
}

/// Rejects protobufs that decode but are not models.
pub(crate) fn check_is_model(model: &ModelProto) -> Result<(), OnnxError> {
    let graph = model.graph.as_ref().ok_or_else(|| OnnxError::NotOnnx {
        reason: "the protobuf has no graph".into(),
    })?;
    if graph.node.is_empty() {
        return Err(OnnxError::NotOnnx {
            reason: "the graph has no nodes".into(),
        });
    }
    Ok(())
}
