//! Helpers shared by the integration tests: the embedded demo model family, plain tract and the
//! CLI.

use std::path::{Path, PathBuf};
use std::process::Command;

use taskpack::internals::ModelProto;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::{
    tensor_shape_proto, type_proto, GraphProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};
use tract_onnx::prelude::*;

/// An ONNX model (bytes) loaded, optimized and made runnable by plain tract.
pub fn tract_plan(onnx: &[u8]) -> Arc<TypedRunnableModel> {
    tract_onnx::onnx()
        .model_for_read(&mut &onnx[..])
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap()
}

/// Runs the CLI; returns (success, stdout, stderr).
pub fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_taskpack"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// `taskpack compile --base BASE --task NAME=PATH ARGS... -o OUT`: one task, extra arguments.
pub fn cli_compile(
    base: &Path,
    (name, path): (&str, &Path),
    args: &[&str],
    out: &Path,
) -> (bool, String, String) {
    let task = format!("{name}={}", path.display());
    let mut all = vec!["compile", "--base", base.to_str().unwrap(), "--task", &task];
    all.extend_from_slice(args);
    all.extend(["-o", out.to_str().unwrap()]);
    cli(&all)
}

/// The demo model folder.
pub fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/demo")
}

/// The demo tasks: every NAME.onnx but the base that has a NAME.test.npz.
pub fn demo_tasks() -> Vec<(String, PathBuf)> {
    let mut tasks: Vec<(String, PathBuf)> = std::fs::read_dir(demo())
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            let stem = p.file_stem()?.to_str()?.to_string();
            (p.extension()? == "onnx"
                && stem != "base"
                && demo().join(format!("{stem}.test.npz")).exists())
            .then_some((stem, p))
        })
        .collect();
    tasks.sort();
    assert!(tasks.len() >= 4, "the demo family has at least 4 tasks");
    tasks
}

/// A `taskpack` command exits non-zero with one line on stderr, and nothing panicked or aborted.
#[track_caller]
pub fn assert_one_line_error(ok: bool, stderr: &str, expected: &str) {
    assert!(!ok, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains(expected), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// An ONNX model (IR 8, opset 13) around `graph`.
pub fn onnx_model(graph: GraphProto) -> ModelProto {
    ModelProto {
        ir_version: 8,
        producer_name: "taskpack-tests".into(),
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: 13,
        }],
        graph: Some(graph),
        ..Default::default()
    }
}

/// A node `output = op(inputs)`, named after its output.
pub fn onnx_node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: output.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        ..Default::default()
    }
}

/// y = MatMul(x, W): a one-node ONNX model (opset 13) whose initializer is `w`.
pub fn matmul_model(w: TensorProto, x: ValueInfoProto, y: ValueInfoProto) -> ModelProto {
    onnx_model(GraphProto {
        name: "matmul".into(),
        node: vec![onnx_node("MatMul", &["x", "W"], "y")],
        initializer: vec![w],
        input: vec![x],
        output: vec![y],
        ..Default::default()
    })
}

/// A float graph input or output: `None` dimensions are the symbolic batch `N`, the others
/// fixed.
pub fn float_value_info(name: &str, dims: &[Option<i64>]) -> ValueInfoProto {
    use tensor_shape_proto::dimension::Value;
    let dim = |d: &Option<i64>| tensor_shape_proto::Dimension {
        value: Some(match d {
            Some(n) => Value::DimValue(*n),
            None => Value::DimParam("N".into()),
        }),
        ..Default::default()
    };
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto {
                    dim: dims.iter().map(dim).collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}
