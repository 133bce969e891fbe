//! `--compute`: the precision of the matrix products, checked on a hand-worked product whose
//! f32 and bf16 results differ. The setting is process-wide, so it is driven through the CLI
//! (one process per run).

use std::path::Path;

use ndarray_npy::{NpzReader, NpzWriter};
use prost::Message;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::{TensorProto, ValueInfoProto};
use tract_onnx::prelude::tract_ndarray::{Array2, ArrayD};

use crate::common::{cli, cli_compile, matmul_model};

/// Rows, inner and output dimensions of y = x·W: large enough for tract's AMX tile (16×16, k ≥ 32).
const ROWS: usize = 16;
const INNER: usize = 64;
const OUT: usize = 32;

/// 1 + 2⁻¹⁰: exact in f32, rounds to 1 in bf16 (8 significant bits).
const W_TASK: f32 = 1.0 + 1.0 / 1024.0;

/// A float tensor type `[N, cols]`, N symbolic (as a batch is in real models).
fn batch_of(name: &str, cols: usize) -> ValueInfoProto {
    crate::common::float_value_info(name, &[None, Some(cols as i64)])
}

/// y = MatMul(x, W), W filled with `w`.
fn matmul_with(w: f32) -> Vec<u8> {
    let w = TensorProto {
        name: "W".into(),
        dims: vec![INNER as i64, OUT as i64],
        data_type: DataType::Float as i32,
        float_data: vec![w; INNER * OUT],
        ..Default::default()
    };
    matmul_model(w, batch_of("x", INNER), batch_of("y", OUT)).encode_to_vec()
}

/// Compiles base (W = 1) + one task (W = 1 + 2⁻¹⁰, kept exact: private) and writes x = 1.
fn bundle_and_input(dir: &Path) -> (String, String) {
    let base = dir.join("base.onnx");
    let task = dir.join("t.onnx");
    std::fs::write(&base, matmul_with(1.0)).unwrap();
    std::fs::write(&task, matmul_with(W_TASK)).unwrap();
    let bundle = dir.join("b.tpk");
    let (ok, _, err) = cli_compile(&base, ("t", &task), &["--private", "^W$"], &bundle);
    assert!(ok, "{err}");
    let input = dir.join("x.npz");
    let mut npz = NpzWriter::new(std::fs::File::create(&input).unwrap());
    npz.add_array("x", &Array2::<f32>::ones((ROWS, INNER)))
        .unwrap();
    npz.finish().unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    (s(&bundle), s(&input))
}

/// `taskpack run --compute COMPUTE`: every output value, and stderr.
fn run(bundle: &str, input: &str, out: &Path, compute: &str) -> (Vec<f32>, String) {
    let out_s = out.to_str().unwrap();
    let (ok, _, err) = cli(&[
        "run",
        bundle,
        "--task",
        "t",
        "--input",
        input,
        "--output",
        out_s,
        "--compute",
        compute,
    ]);
    assert!(ok, "{err}");
    let mut npz = NpzReader::new(std::fs::File::open(out).unwrap()).unwrap();
    let y: ArrayD<f32> = npz.by_name("y").unwrap();
    assert_eq!(y.shape(), [ROWS, OUT]);
    (y.iter().copied().collect(), err)
}

#[test]
fn bf16_rounds_the_operands_of_the_matrix_products_and_f32_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let (bundle, input) = bundle_and_input(dir.path());
    let out = dir.path().join("y.npz");

    // f32: 64 · (1 + 2⁻¹⁰) = 64.0625, exact.
    let (y, _) = run(&bundle, &input, &out, "f32");
    assert!(y.iter().all(|&v| v == 64.0625), "{:?}", &y[..4]);

    // bf16: W rounds to 1, so 64 exactly; without AMX-BF16 the CLI says so and runs f32.
    let (y, err) = run(&bundle, &input, &out, "bf16");
    if taskpack::runtime::bf16_available() {
        assert!(y.iter().all(|&v| v == 64.0), "{:?}", &y[..4]);
        assert!(err.is_empty(), "{err}");
    } else {
        assert!(y.iter().all(|&v| v == 64.0625), "{:?}", &y[..4]);
        assert!(err.contains("not available on this CPU"), "{err}");
    }
}

#[test]
fn an_unknown_compute_is_a_usage_error() {
    let (ok, _, err) = cli(&["inspect", "x.tpk", "--compute", "int8"]);
    assert!(!ok);
    assert!(err.contains("expected f32 or bf16"), "{err}");
}

#[test]
fn the_precision_is_fixed_once_a_model_is_planned() {
    use std::sync::Arc;
    use taskpack::runtime::{bf16_available, set_compute, Bundle, Compute, Engine, Error};
    let dir = tempfile::tempdir().unwrap();
    let (bundle, _) = bundle_and_input(dir.path());
    let engine = Engine::new(Arc::new(Bundle::open(&bundle).unwrap()), Default::default()).unwrap();
    // Planning a task fixes the precision; no test of this process asks for bf16 before.
    engine.prepare(0).unwrap();
    assert_eq!(set_compute(Compute::F32).unwrap(), Compute::F32);
    match set_compute(Compute::Bf16) {
        Err(Error::ComputeFixed { requested, current }) => {
            assert!(bf16_available());
            assert_eq!((requested, current), (Compute::Bf16, Compute::F32));
        }
        // Without AMX-BF16, bf16 means f32: nothing changes, nothing to refuse.
        Ok(effective) => {
            assert!(!bf16_available());
            assert_eq!(effective, Compute::F32);
        }
        Err(e) => panic!("{e}"),
    }
    assert_eq!(taskpack::runtime::compute(), Compute::F32);
}
