//! Internals for the fuzz targets and the tests of the checkpoint readers — **not a stable API**.
//!
//! Built only with the `internals` feature, which no app needs and which only fuzz/ and the
//! tests of the `taskpack-cli` package enable. The fuzz targets drive the ONNX scanner and the
//! reconstruction directly; tests/readers.rs and tests/safety_io.rs open checkpoints with
//! [`Checkpoint`] and check the strip / restore round trip of ONNX initializers;
//! bins/examples/tract_op_profile.rs clears the vector state after every node to show that
//! tract's own operators do not need it; benches/runtime.rs times the block decoders. The
//! public API keeps all of these private; everything
//! here can change in any release.

pub use crate::compile::checkpoint::Checkpoint;
pub use crate::onnx::{
    batchnorm_statistics, decode_model, dtype_from_onnx, float_initializers, onnx_data_type,
    read_typed_f32, restore_initializers, scan_model, strip_float_initializers, InitializerInfo,
    ModelProto, ScannedModel, TensorBytes, TensorProto, WeightData,
};
pub use crate::runtime::guard::clear_upper_vector_state;
pub use crate::runtime::reconstruct::{task_tensor, DecodeBuffers};

/// Decodes `out.len()` values stored in `encoding` from `bytes` (whole blocks): the decoder a
/// switch runs, for benches/runtime.rs's per-encoding decode speed.
pub fn decode_slice(encoding: crate::encoding::Encoding, bytes: &[u8], out: &mut [f32]) {
    encoding.decode_slice(bytes, out);
}
