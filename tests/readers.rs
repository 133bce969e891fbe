//! Checkpoint readers: ONNX (inline, typed, external data) and safetensors + `--graph`, the
//! strip/restore round trip, and tract loading the restored model.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use prost::Message;
use sha2::{Digest, Sha256};
use taskpack::compile::CompileError;
use taskpack::format::DType;
use taskpack::internals::Checkpoint;
use taskpack::internals::{
    decode_model, onnx_data_type, restore_initializers, InitializerInfo, ModelProto, TensorBytes,
};
use tract_onnx::pb::tensor_proto::{DataLocation, DataType};
use tract_onnx::pb::{GraphProto, StringStringEntryProto, TensorProto, ValueInfoProto};

use crate::common::{onnx_model, onnx_node};

/// W (2×3) and B (3) of the test network y = reshape(x·W + B, [3]).
const W: [f32; 6] = [0.5, -1.0, 2.0, 1.5, 0.25, -0.75];
const B: [f32; 3] = [0.1, 0.2, 0.3];
/// For x = [2, 4]: x·W = [1 + 6, -2 + 1, 4 - 3] = [7, -1, 1]; + B.
const Y: [f32; 3] = [7.1, -0.8, 1.3];

/// How a float initializer is stored.
#[derive(Clone)]
enum Enc {
    /// `raw_data` in this dtype.
    Raw(DType),
    /// `float_data` (FLOAT).
    FloatData,
    /// `int32_data` holding 16-bit patterns (FLOAT16 / BFLOAT16).
    Int32Data(DType),
    /// External f32 data: location, offset, length entry (None = omitted).
    External(String, u64, Option<u64>),
}

fn le(dtype: DType, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    dtype.encode(values, &mut out);
    out
}

fn float_tensor(name: &str, dims: &[i64], values: &[f32], enc: &Enc) -> TensorProto {
    let mut t = TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: onnx_data_type(DType::F32),
        ..Default::default()
    };
    match enc {
        Enc::Raw(dtype) => {
            t.data_type = onnx_data_type(*dtype);
            t.raw_data = le(*dtype, values);
        }
        Enc::FloatData => t.float_data = values.to_vec(),
        Enc::Int32Data(dtype) => {
            t.data_type = onnx_data_type(*dtype);
            t.int32_data = le(*dtype, values)
                .chunks_exact(2)
                .map(|c| i32::from(u16::from_le_bytes([c[0], c[1]])))
                .collect();
        }
        Enc::External(location, offset, length) => {
            t.data_location = Some(DataLocation::External as i32);
            let kv = |k: &str, v: String| StringStringEntryProto {
                key: k.into(),
                value: v,
            };
            t.external_data = vec![
                kv("location", location.clone()),
                kv("offset", offset.to_string()),
            ];
            if let Some(l) = length {
                t.external_data.push(kv("length", l.to_string()));
            }
        }
    }
    t
}

fn shape_initializer() -> TensorProto {
    TensorProto {
        name: "shape".into(),
        dims: vec![1],
        data_type: DataType::Int64 as i32,
        raw_data: 3i64.to_le_bytes().to_vec(),
        ..Default::default()
    }
}

/// A float graph input or output of the given fixed shape.
pub(crate) fn value_info(name: &str, dims: &[i64]) -> ValueInfoProto {
    let dims: Vec<Option<i64>> = dims.iter().map(|&d| Some(d)).collect();
    crate::common::float_value_info(name, &dims)
}

/// y = Reshape(MatMul(x, W) + B, shape): three initializers, one of them int64.
fn model(initializers: Vec<TensorProto>) -> ModelProto {
    onnx_model(GraphProto {
        name: "matmul_add".into(),
        node: vec![
            onnx_node("MatMul", &["x", "W"], "xw"),
            onnx_node("Add", &["xw", "B"], "sum"),
            onnx_node("Reshape", &["sum", "shape"], "y"),
        ],
        initializer: initializers,
        input: vec![value_info("x", &[1, 2])],
        output: vec![value_info("y", &[3])],
        ..Default::default()
    })
}

fn model_with(w: &[f32], b: &[f32], enc_w: &Enc, enc_b: &Enc) -> ModelProto {
    model(vec![
        float_tensor("W", &[2, 3], w, enc_w),
        shape_initializer(),
        float_tensor("B", &[3], b, enc_b),
    ])
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn write_model(dir: &Path, name: &str, m: &ModelProto) -> PathBuf {
    write(dir, name, &m.encode_to_vec())
}

fn info(name: &str, dtype: DType, shape: &[u64]) -> InitializerInfo {
    InitializerInfo {
        name: name.into(),
        dtype,
        shape: shape.to_vec(),
    }
}

fn hex_sha256(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    parts.iter().for_each(|p| h.update(p));
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn safetensors_bytes(tensors: &[(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let views: Vec<(&str, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                *n,
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, None).unwrap()
}

#[test]
fn onnx_raw_f32_lists_weights_and_reads_values() {
    let dir = tempfile::tempdir().unwrap();
    let m = model_with(&W, &B, &Enc::Raw(DType::F32), &Enc::Raw(DType::F32));
    let path = write_model(dir.path(), "m.onnx", &m);
    let cp = Checkpoint::open(&path, None).unwrap();
    assert_eq!(cp.format(), "onnx");
    assert_eq!(cp.path(), path);
    assert_eq!(
        cp.tensors(),
        &[info("W", DType::F32, &[2, 3]), info("B", DType::F32, &[3])]
    );
    assert_eq!(cp.read_f32("W").unwrap(), W);
    assert_eq!(cp.read_f32("B").unwrap(), B);
    assert!(matches!(
        cp.read_f32("shape"),
        Err(CompileError::UnknownTensor { .. })
    ));
    // The int64 initializer stays in the graph, the float ones do not.
    let kept: Vec<_> = cp
        .graph()
        .graph
        .as_ref()
        .unwrap()
        .initializer
        .iter()
        .map(|t| t.name.clone())
        .collect();
    assert_eq!(kept, vec!["shape"]);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(cp.sha256(), hex_sha256(&[&bytes]));
    assert_eq!(cp.input_bytes(), bytes.len() as u64);
    assert_eq!(cp.graph_sha256(), hex_sha256(&[cp.stripped_graph()]));
    assert!(cp.batchnorm_statistics().is_empty());
}

#[test]
#[allow(clippy::excessive_precision)] // exact decimal expansions of the f16/bf16 values
fn onnx_f16_and_bf16_are_decoded() {
    let dir = tempfile::tempdir().unwrap();
    // W is exact in both; 0.1 is not: f16 0x2E66 = 1.599609375 · 2⁻⁴ = 0.0999755859375,
    // bf16 0x3DCD = 1.6015625 · 2⁻⁴ = 0.10009765625; 0.2 and 0.3 likewise by hand:
    // f16 0.2 = 0x3266 = 0.199951171875, 0.3 = 0x34CD = 0.300048828125;
    // bf16 0.2 = 0x3E4D = 0.2001953125, 0.3 = 0x3E9A = 0.30078125.
    let f16_b = [0.099_975_585_937_5, 0.199_951_171_875, 0.300_048_828_125];
    let bf16_b = [0.100_097_656_25, 0.200_195_312_5, 0.300_781_25];
    for (dtype, expected) in [(DType::F16, f16_b), (DType::BF16, bf16_b)] {
        for enc in [Enc::Raw(dtype), Enc::Int32Data(dtype)] {
            let m = model_with(&W, &B, &enc, &enc);
            let path = write_model(dir.path(), "h.onnx", &m);
            let cp = Checkpoint::open(&path, None).unwrap();
            assert_eq!(cp.tensors()[0], info("W", dtype, &[2, 3]));
            assert_eq!(cp.read_f32("W").unwrap(), W);
            assert_eq!(cp.read_f32("B").unwrap(), expected, "{dtype}");
        }
    }
    // Hand-written bytes, independent of the encoder: bf16 -2.5 = 0xC020, f16 -2.5 = 0xC100.
    let mut m = model_with(&W, &B, &Enc::Raw(DType::F32), &Enc::Raw(DType::F32));
    let g = m.graph.as_mut().unwrap();
    g.initializer[2].data_type = DataType::Bfloat16 as i32;
    g.initializer[2].raw_data = vec![0x20, 0xc0, 0x80, 0x3f, 0x00, 0x00];
    g.initializer[0].data_type = DataType::Float16 as i32;
    g.initializer[0].raw_data = vec![
        0x00, 0xc1, 0x00, 0x3c, 0, 0, 0, 0x80, 0xff, 0x7b, 0x01, 0x00,
    ];
    let path = write_model(dir.path(), "hand.onnx", &m);
    let cp = Checkpoint::open(&path, None).unwrap();
    assert_eq!(cp.read_f32("B").unwrap(), vec![-2.5, 1.0, 0.0]);
    // 0x7BFF = 65504 (largest f16), 0x0001 = 2⁻²⁴ (smallest subnormal), 0x8000 = -0.
    let w = cp.read_f32("W").unwrap();
    assert_eq!(w, vec![-2.5, 1.0, 0.0, -0.0, 65504.0, 5.960_464_5e-8]);
    assert!(w[3].is_sign_negative());
}

#[test]
fn float_data_and_raw_data_agree() {
    let dir = tempfile::tempdir().unwrap();
    let raw = write_model(
        dir.path(),
        "raw.onnx",
        &model_with(&W, &B, &Enc::Raw(DType::F32), &Enc::Raw(DType::F32)),
    );
    let typed = write_model(
        dir.path(),
        "typed.onnx",
        &model_with(&W, &B, &Enc::FloatData, &Enc::FloatData),
    );
    let a = Checkpoint::open(&raw, None).unwrap();
    let b = Checkpoint::open(&typed, None).unwrap();
    assert_eq!(a.tensors(), b.tensors());
    for t in a.tensors() {
        assert_eq!(a.read_f32(&t.name).unwrap(), b.read_f32(&t.name).unwrap());
    }
    // Same architecture, same stripped graph, different files.
    assert_eq!(a.graph_sha256(), b.graph_sha256());
    assert_eq!(a.stripped_graph(), b.stripped_graph());
    assert_ne!(a.sha256(), b.sha256());
}

#[test]
fn external_data_in_the_model_folder() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    // weights.bin: 8 bytes of padding, W (24 bytes), B (12 bytes).
    let mut bin = vec![0xaa; 8];
    bin.extend(le(DType::F32, &W));
    bin.extend(le(DType::F32, &B));
    write(&dir.path().join("data"), "weights.bin", &bin);
    // The int64 shape constant is external too, in its own file (no length entry).
    write(dir.path(), "shape.bin", &3i64.to_le_bytes());
    let mut shape = shape_initializer();
    shape.raw_data.clear();
    shape.data_location = Some(DataLocation::External as i32);
    shape.external_data = vec![StringStringEntryProto {
        key: "location".into(),
        value: "./shape.bin".into(),
    }];
    let m = model(vec![
        float_tensor(
            "W",
            &[2, 3],
            &W,
            &Enc::External("data/weights.bin".into(), 8, Some(24)),
        ),
        shape,
        float_tensor(
            "B",
            &[3],
            &B,
            &Enc::External("data/weights.bin".into(), 32, None),
        ),
    ]);
    let path = write_model(dir.path(), "ext.onnx", &m);
    let cp = Checkpoint::open(&path, None).unwrap();
    assert_eq!(cp.read_f32("W").unwrap(), W);
    assert_eq!(cp.read_f32("B").unwrap(), B);
    // Provenance: model, then the weight file, then the shape file.
    let model_bytes = std::fs::read(&path).unwrap();
    let shape_bytes = 3i64.to_le_bytes();
    assert_eq!(cp.sha256(), hex_sha256(&[&model_bytes, &bin, &shape_bytes]));
    assert_eq!(
        cp.input_bytes(),
        (model_bytes.len() + bin.len() + shape_bytes.len()) as u64
    );
    assert_eq!(cp.input_files().len(), 3);
    // The non-float external initializer was inlined: the stripped graph is self-contained.
    let stripped = decode_model(cp.stripped_graph()).unwrap();
    let s = &stripped.graph.as_ref().unwrap().initializer[0];
    assert_eq!(s.name, "shape");
    assert_eq!(s.raw_data, shape_bytes);
    assert!(s.external_data.is_empty() && s.data_location.is_none());
    // Same graph as the inline model.
    let inline = write_model(
        dir.path(),
        "inline.onnx",
        &model_with(&W, &B, &Enc::Raw(DType::F32), &Enc::Raw(DType::F32)),
    );
    assert_eq!(
        Checkpoint::open(&inline, None).unwrap().graph_sha256(),
        cp.graph_sha256()
    );
}

fn open_with_external(
    dir: &Path,
    location: &str,
    offset: u64,
    length: Option<u64>,
) -> Result<Checkpoint, CompileError> {
    let m = model_with(
        &W,
        &B,
        &Enc::External(location.into(), offset, length),
        &Enc::Raw(DType::F32),
    );
    let path = write_model(dir, "m.onnx", &m);
    Checkpoint::open(&path, None)
}

#[test]
fn external_data_outside_the_folder_or_out_of_bounds_is_rejected() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("model");
    std::fs::create_dir(&dir).unwrap();
    let outside = write(root.path(), "outside.bin", &le(DType::F32, &W));
    write(&dir, "w.bin", &le(DType::F32, &W));

    // Sanity: the valid layout opens.
    open_with_external(&dir, "w.bin", 0, Some(24)).unwrap();

    let abs = outside.to_str().unwrap();
    for location in [abs, "../outside.bin", "sub/../../outside.bin"] {
        let err = open_with_external(&dir, location, 0, Some(24)).unwrap_err();
        assert!(
            matches!(err, CompileError::ExternalDataOutsideFolder { ref tensor, .. } if tensor == "W"),
            "{location}: {err}"
        );
    }
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(&outside, dir.join("link.bin")).unwrap();
        let err = open_with_external(&dir, "link.bin", 0, Some(24)).unwrap_err();
        assert!(
            matches!(err, CompileError::ExternalDataOutsideFolder { .. }),
            "{err}"
        );
        // A symlink that stays inside the folder is fine.
        std::os::unix::fs::symlink(dir.join("w.bin"), dir.join("inside.bin")).unwrap();
        open_with_external(&dir, "inside.bin", 0, Some(24)).unwrap();
    }

    // Out of bounds: offset past the end, offset + length past the end, overflowing offset,
    // and a missing length whose rest-of-file is not the tensor.
    for (offset, length) in [
        (100, Some(24)),
        (4, Some(24)),
        (u64::MAX - 4, Some(24)),
        (4, None),
    ] {
        let err = open_with_external(&dir, "w.bin", offset, length).unwrap_err();
        assert!(
            matches!(
                err,
                CompileError::ExternalDataOutOfBounds { file_size: 24, .. }
            ),
            "{offset} {length:?}: {err}"
        );
    }
    // A length that disagrees with the shape is caught before touching the file.
    let err = open_with_external(&dir, "w.bin", 0, Some(20)).unwrap_err();
    assert!(matches!(err, CompileError::Onnx { .. }), "{err}");
    // A missing file is an I/O error naming it.
    let err = open_with_external(&dir, "nope.bin", 0, Some(24)).unwrap_err();
    assert!(
        matches!(err, CompileError::Io { ref path, .. } if path.ends_with("nope.bin")),
        "{err}"
    );
}

#[test]
fn non_onnx_files_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    // Deterministic pseudo-random bytes (xorshift).
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    let cases: [(&str, &[u8]); 4] = [
        ("random.onnx", &random),
        ("text.onnx", b"hello, this is a text file\nwith two lines\n"),
        ("empty.onnx", b""),
        // A valid protobuf ModelProto without a graph.
        (
            "nograph.onnx",
            &ModelProto {
                ir_version: 8,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
    ];
    for (name, bytes) in cases {
        let path = write(dir.path(), name, bytes);
        let err = Checkpoint::open(&path, None).unwrap_err();
        assert!(
            matches!(err, CompileError::NotOnnx { path: ref p, .. } if p == &path),
            "{name}: {err}"
        );
        assert!(err.to_string().contains(name), "{err}");
    }
    let err = Checkpoint::open(&dir.path().join("missing.onnx"), None).unwrap_err();
    assert!(matches!(err, CompileError::Io { .. }), "{err}");
}

#[test]
fn nan_and_inf_are_rejected_with_tensor_and_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = B;
    b[1] = f32::NAN;
    let path = write_model(
        dir.path(),
        "nan.onnx",
        &model_with(&W, &b, &Enc::Raw(DType::F32), &Enc::FloatData),
    );
    let cp = Checkpoint::open(&path, None).unwrap();
    assert_eq!(cp.read_f32("W").unwrap(), W);
    let err = cp.read_f32("B").unwrap_err();
    assert!(
        matches!(err, CompileError::NonFinite { ref tensor, index: 1, ref checkpoint, .. } if tensor == "B" && checkpoint == &path),
        "{err}"
    );
    let msg = err.to_string();
    assert!(msg.contains("\"B\"") && msg.contains("nan.onnx"), "{msg}");

    let mut w = W;
    w[5] = f32::NEG_INFINITY;
    let path = write_model(
        dir.path(),
        "inf.onnx",
        &model_with(&w, &B, &Enc::Raw(DType::F16), &Enc::Raw(DType::F16)),
    );
    let err = Checkpoint::open(&path, None)
        .unwrap()
        .read_f32("W")
        .unwrap_err();
    assert!(
        matches!(err, CompileError::NonFinite { index: 5, value, .. } if value == f32::NEG_INFINITY),
        "{err}"
    );
}

#[test]
#[allow(clippy::excessive_precision)] // exact decimal expansions of the bf16 values
fn safetensors_with_matching_graph() {
    let dir = tempfile::tempdir().unwrap();
    let graph = write_model(
        dir.path(),
        "graph.onnx",
        &model_with(&W, &B, &Enc::Raw(DType::F32), &Enc::Raw(DType::F32)),
    );
    let w2: Vec<f32> = W.iter().map(|v| v * 2.0).collect();
    let st = safetensors_bytes(&[
        (
            "W",
            safetensors::Dtype::F32,
            vec![2, 3],
            le(DType::F32, &w2),
        ),
        ("B", safetensors::Dtype::F32, vec![3], le(DType::F32, &B)),
        // Integer buffers the graph does not have are ignored.
        (
            "num_batches_tracked",
            safetensors::Dtype::I64,
            vec![],
            7i64.to_le_bytes().to_vec(),
        ),
    ]);
    let path = write(dir.path(), "model.safetensors", &st);

    let err = Checkpoint::open(&path, None).unwrap_err();
    assert!(matches!(err, CompileError::GraphRequired { .. }), "{err}");

    let cp = Checkpoint::open(&path, Some(&graph)).unwrap();
    assert_eq!(cp.format(), "safetensors");
    assert_eq!(cp.graph_path(), graph);
    assert_eq!(
        cp.tensors(),
        &[info("W", DType::F32, &[2, 3]), info("B", DType::F32, &[3])]
    );
    assert_eq!(cp.read_f32("W").unwrap(), w2);
    assert_eq!(cp.read_f32("B").unwrap(), B);
    assert_eq!(cp.sha256(), hex_sha256(&[&st]));
    assert_eq!(cp.input_bytes(), st.len() as u64);
    let onnx = Checkpoint::open(&graph, Some(&graph)).unwrap();
    assert_eq!(cp.graph_sha256(), onnx.graph_sha256());
    assert_eq!(cp.stripped_graph(), onnx.stripped_graph());

    // A graph whose weights are bf16 takes bf16 safetensors.
    let graph16 = write_model(
        dir.path(),
        "graph16.onnx",
        &model_with(&W, &B, &Enc::Raw(DType::BF16), &Enc::Raw(DType::BF16)),
    );
    let st16 = safetensors_bytes(&[
        (
            "W",
            safetensors::Dtype::BF16,
            vec![2, 3],
            le(DType::BF16, &W),
        ),
        ("B", safetensors::Dtype::BF16, vec![3], le(DType::BF16, &B)),
    ]);
    let path16 = write(dir.path(), "bf16.safetensors", &st16);
    let cp16 = Checkpoint::open(&path16, Some(&graph16)).unwrap();
    assert_eq!(
        cp16.read_f32("B").unwrap(),
        [0.100_097_656_25, 0.200_195_312_5, 0.300_781_25]
    );
}

#[test]
fn safetensors_mismatches_are_explained() {
    let dir = tempfile::tempdir().unwrap();
    let graph = write_model(
        dir.path(),
        "graph.onnx",
        &model_with(&W, &B, &Enc::Raw(DType::F32), &Enc::Raw(DType::F32)),
    );
    let open = |name: &str, tensors: &[(&str, safetensors::Dtype, Vec<usize>, Vec<u8>)]| {
        let path = write(dir.path(), name, &safetensors_bytes(tensors));
        Checkpoint::open(&path, Some(&graph))
    };
    let f32s = |n: usize| le(DType::F32, &vec![1.0; n]);

    // Names: W renamed, plus seven extra float tensors (only five are listed).
    let mut tensors = vec![
        ("encoder.W", safetensors::Dtype::F32, vec![2, 3], f32s(6)),
        ("B", safetensors::Dtype::F32, vec![3], f32s(3)),
    ];
    let extra: Vec<String> = (0..7).map(|i| format!("extra{i}")).collect();
    for name in &extra {
        tensors.push((name.as_str(), safetensors::Dtype::F32, vec![1], f32s(1)));
    }
    let err = open("names.safetensors", &tensors).unwrap_err();
    match &err {
        CompileError::NameMismatch {
            missing_in_checkpoint,
            missing_count,
            extra_in_checkpoint,
            extra_count,
            ..
        } => {
            assert_eq!(missing_in_checkpoint, &["W"]);
            assert_eq!(*missing_count, 1);
            assert_eq!(extra_in_checkpoint.len(), 5);
            assert_eq!(*extra_count, 8);
        }
        other => panic!("{other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("\"W\"") && msg.contains("\"encoder.W\"") && msg.contains("..."),
        "{msg}"
    );

    // Shape.
    let err = open(
        "shape.safetensors",
        &[
            ("W", safetensors::Dtype::F32, vec![3, 2], f32s(6)),
            ("B", safetensors::Dtype::F32, vec![3], f32s(3)),
        ],
    )
    .unwrap_err();
    assert!(
        matches!(err, CompileError::ShapeMismatch { ref tensor, ref expected, ref found, .. }
            if tensor == "W" && expected == &[2, 3] && found == &[3, 2]),
        "{err}"
    );

    // Dtype.
    let err = open(
        "dtype.safetensors",
        &[
            ("W", safetensors::Dtype::F16, vec![2, 3], le(DType::F16, &W)),
            ("B", safetensors::Dtype::F32, vec![3], f32s(3)),
        ],
    )
    .unwrap_err();
    assert!(
        matches!(err, CompileError::DTypeMismatch { ref tensor, .. } if tensor == "W"),
        "{err}"
    );
    let err = open(
        "f64.safetensors",
        &[
            ("W", safetensors::Dtype::F64, vec![2, 3], vec![0; 48]),
            ("B", safetensors::Dtype::F32, vec![3], f32s(3)),
        ],
    )
    .unwrap_err();
    assert!(
        matches!(err, CompileError::UnsupportedDType { ref tensor, .. } if tensor == "W"),
        "{err}"
    );

    // A truncated safetensors file is a parse error (it still sniffs as safetensors).
    let good = safetensors_bytes(&[
        ("W", safetensors::Dtype::F32, vec![2, 3], f32s(6)),
        ("B", safetensors::Dtype::F32, vec![3], f32s(3)),
    ]);
    let path = write(dir.path(), "cut.safetensors", &good[..good.len() - 4]);
    let err = Checkpoint::open(&path, Some(&graph)).unwrap_err();
    assert!(matches!(err, CompileError::Safetensors { .. }), "{err}");
    // A graph that is not ONNX.
    let path = write(dir.path(), "good.safetensors", &good);
    let err = Checkpoint::open(&path, Some(&path)).unwrap_err();
    assert!(matches!(err, CompileError::NotOnnx { .. }), "{err}");
}

fn run_tract(bytes: &[u8], x: [f32; 2]) -> Vec<f32> {
    use tract_onnx::prelude::*;
    let model = crate::common::tract_plan(bytes);
    let input = tract_ndarray::arr2(&[x]).into_tensor();
    let out = model.run(tvec!(input.into())).unwrap();
    out[0]
        .to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

#[test]
fn strip_and_restore_round_trip_runs_in_tract() {
    let dir = tempfile::tempdir().unwrap();
    let original = model_with(&W, &B, &Enc::FloatData, &Enc::Raw(DType::F32));
    let path = write_model(dir.path(), "m.onnx", &original);
    let cp = Checkpoint::open(&path, None).unwrap();

    let tensors: Vec<TensorBytes> = cp
        .tensors()
        .iter()
        .map(|t| TensorBytes {
            name: t.name.clone(),
            dtype: DType::F32,
            shape: t.shape.clone(),
            data: le(DType::F32, &cp.read_f32(&t.name).unwrap()),
        })
        .collect();
    let restored = restore_initializers(cp.stripped_graph(), tensors).unwrap();

    // Same initializers (by name; raw_data instead of float_data is the only allowed change).
    let by_name = |m: &ModelProto| -> HashMap<String, (i32, Vec<i64>, Vec<f32>)> {
        m.graph
            .as_ref()
            .unwrap()
            .initializer
            .iter()
            .map(|t| {
                let values = if t.data_type == DataType::Int64 as i32 {
                    t.raw_data
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
                        .collect()
                } else if !t.float_data.is_empty() {
                    t.float_data.clone()
                } else {
                    t.raw_data
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect()
                };
                (t.name.clone(), (t.data_type, t.dims.clone(), values))
            })
            .collect()
    };
    let back = decode_model(&restored).unwrap();
    assert_eq!(by_name(&back), by_name(&original));
    assert_eq!(
        back.graph.as_ref().unwrap().node,
        original.graph.as_ref().unwrap().node
    );
    // Stripping the restored model gives the stored graph again.
    assert_eq!(
        taskpack::internals::strip_float_initializers(&back),
        cp.stripped_graph()
    );

    // tract loads and runs it: y = x·W + B.
    let y = run_tract(&restored, [2.0, 4.0]);
    assert_eq!(y.len(), 3);
    for (a, b) in y.iter().zip(Y) {
        assert!((a - b).abs() < 1e-6, "{y:?} vs {Y:?}");
    }

    // f16/bf16 tensors restore as FLOAT16/BFLOAT16 initializers that read back exactly.
    let half = restore_initializers(
        cp.stripped_graph(),
        [
            TensorBytes {
                name: "W".into(),
                dtype: DType::F16,
                shape: vec![2, 3],
                data: le(DType::F16, &W),
            },
            TensorBytes {
                name: "B".into(),
                dtype: DType::BF16,
                shape: vec![3],
                data: le(DType::BF16, &B),
            },
        ],
    )
    .unwrap();
    let half_path = write(dir.path(), "half.onnx", &half);
    let h = Checkpoint::open(&half_path, None).unwrap();
    assert_eq!(
        h.tensors(),
        &[info("W", DType::F16, &[2, 3]), info("B", DType::BF16, &[3])]
    );
    assert_eq!(h.read_f32("W").unwrap(), W);
}

/// The teammate-generated demo family (a small CNN with BatchNorm). Skipped with a note when the
/// files are absent.
#[test]
fn demo_model_batchnorm_and_safetensors() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/demo");
    let onnx = root.join("base.onnx");
    let st = root.join("base.safetensors");
    if !onnx.exists() || !st.exists() {
        eprintln!(
            "skipping: {} or {} is missing",
            onnx.display(),
            st.display()
        );
        return;
    }
    let a = Checkpoint::open(&onnx, None).unwrap();
    let stats = a.batchnorm_statistics();
    assert!(
        stats.iter().any(|n| n.ends_with("running_mean"))
            && stats.iter().any(|n| n.ends_with("running_var")),
        "{stats:?}"
    );
    assert!(stats.contains("features.1.running_mean"), "{stats:?}");
    assert_eq!(stats.len() % 2, 0);
    for name in stats {
        assert!(a.tensor(name).is_some());
    }
    let b = Checkpoint::open(&st, Some(&onnx)).unwrap();
    assert_eq!(a.tensors(), b.tensors());
    assert_eq!(a.graph_sha256(), b.graph_sha256());
    assert_eq!(a.batchnorm_statistics(), b.batchnorm_statistics());
    for t in a.tensors() {
        assert_eq!(
            a.read_f32(&t.name).unwrap(),
            b.read_f32(&t.name).unwrap(),
            "{}",
            t.name
        );
    }
    // The restored base model is a loadable ONNX model with the same weights.
    let tensors: Vec<TensorBytes> = a
        .tensors()
        .iter()
        .map(|t| TensorBytes {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            data: le(t.dtype, &a.read_f32(&t.name).unwrap()),
        })
        .collect();
    let restored = restore_initializers(a.stripped_graph(), tensors).unwrap();
    use tract_onnx::prelude::Framework;
    tract_onnx::onnx()
        .model_for_read(&mut &restored[..])
        .unwrap();
}
