//! Bundles whose stored graphs cannot run, and compiles that would write one: each must be
//! refused up front with a typed error naming the problem (docs/FORMAT.md rules G1–G8) — by
//! `check_graphs` (what `taskpack verify` runs), by `Engine::new`, and by `compile` — never a
//! panic inside tract at run time.
//!
//! The hostile bundles are the demo's `mnist` and `parity` tasks compiled once, then rebuilt by
//! the bundle writer with one thing changed (a graph, a tensor's shape or type, a label list).
//! Each keeps every format rule (1–30, V1–V5): only the graph rules catch them.

use crate::common::{assert_one_line_error, cli, cli_compile, demo};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use prost::Message;
use sha2::{Digest, Sha256};
use taskpack::compile::{compile, CompileError, CompileOptions};
use taskpack::format::DType;
use taskpack::format::Encoding;
use taskpack::format::Method;
use taskpack::format::{
    BundleWriter, Manifest, SectionKind, Stored, TaskTensor, TensorEntry, TensorStorage,
};
use taskpack::runtime::{
    check_graphs, Bundle, Engine, EngineOptions, Error, GraphProblem, MAX_CONSTANT_SHAPE_ELEMENTS,
};
use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::{AttributeProto, ModelProto, NodeProto, TensorProto, ValueInfoProto};

/// A bundle's sections, in table order.
pub type Sections = Vec<(SectionKind, Vec<u8>)>;

const TASKS: [&str; 2] = ["mnist", "parity"];

/// The demo's `mnist` and `parity` compiled once.
fn fixture() -> &'static Bundle {
    static FIXTURE: OnceLock<Bundle> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("fixture.tpk");
        let tasks = TASKS
            .iter()
            .map(|t| (t.to_string(), demo().join(format!("{t}.onnx"))))
            .collect();
        let opts = CompileOptions::new(demo().join("base.onnx"), tasks, Method::Emr, &out);
        drop(compile(&opts, &mut |_| {}).unwrap());
        Bundle::read(&out).unwrap()
    })
}

/// `bundle` with `edit` applied to its manifest (section table cleared) and sections, written
/// by the bundle writer (graph hashes recomputed) and read back. Asserts that the format rules
/// still hold.
pub fn rewrite(bundle: &Bundle, edit: impl FnOnce(&mut Manifest, &mut Sections)) -> Bundle {
    let mut manifest = bundle.manifest().clone();
    let mut sections: Sections = manifest
        .sections
        .iter()
        .enumerate()
        .map(|(id, s)| {
            let bytes = bundle.parsed().section(bundle.bytes(), id as u32).unwrap();
            (s.kind, bytes.to_vec())
        })
        .collect();
    manifest.sections.clear();
    edit(&mut manifest, &mut sections);
    for g in &mut manifest.graphs {
        let digest = Sha256::digest(&sections[g.section as usize].1);
        g.sha256 = digest.iter().map(|b| format!("{b:02x}")).collect();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rewritten.tpk");
    let mut writer = BundleWriter::create(&path).unwrap();
    for (kind, bytes) in &sections {
        writer.add_section(*kind, bytes).unwrap();
    }
    writer.finish(manifest).unwrap();
    let bundle = Bundle::read(&path).unwrap();
    bundle.verify().unwrap();
    bundle
}

/// The fixture with `edit` applied (see [`rewrite`]).
fn rebuild(edit: impl FnOnce(&mut Manifest, &mut Sections)) -> Bundle {
    rewrite(fixture(), edit)
}

/// The fixture with every stored graph edited by `edit`.
fn with_graphs(edit: impl Fn(&mut ModelProto)) -> Bundle {
    rebuild(|m, sections| {
        for g in &m.graphs {
            let bytes = &mut sections[g.section as usize].1;
            let mut model = ModelProto::decode(bytes.as_slice()).unwrap();
            edit(&mut model);
            *bytes = model.encode_to_vec();
        }
    })
}

/// The first node of type `op` in `model`'s graph.
fn node<'a>(model: &'a mut ModelProto, op: &str) -> &'a mut NodeProto {
    let graph = model.graph.as_mut().unwrap();
    graph
        .node
        .iter_mut()
        .find(|n| n.op_type == op)
        .unwrap_or_else(|| panic!("the demo graph has a {op} node"))
}

/// Sets attribute `name` of `node` to `ints`.
fn set_ints(node: &mut NodeProto, name: &str, ints: &[i64]) {
    node.attribute.retain(|a| a.name != name);
    node.attribute.push(AttributeProto {
        name: name.into(),
        ints: ints.to_vec(),
        r#type: AttributeType::Ints as i32,
        ..Default::default()
    });
}

/// Sets attribute `name` of `node` to `i`.
fn set_int(node: &mut NodeProto, name: &str, i: i64) {
    node.attribute.retain(|a| a.name != name);
    node.attribute.push(AttributeProto {
        name: name.into(),
        i,
        r#type: AttributeType::Int as i32,
        ..Default::default()
    });
}

/// The error `check_graphs` gives `bundle`, asserting that `Engine::new` gives the same one.
fn refused(bundle: Bundle) -> Error {
    let checked = check_graphs(&bundle).expect_err("check_graphs refuses the bundle");
    let engine = Engine::new(Arc::new(bundle), EngineOptions::default())
        .expect_err("Engine::new refuses the bundle");
    assert_eq!(checked.to_string(), engine.to_string());
    checked
}

/// The [`GraphProblem`] `check_graphs` and `Engine::new` give `bundle`.
fn problem(bundle: Bundle) -> GraphProblem {
    match refused(bundle) {
        Error::Graph { problem, .. } => *problem,
        other => panic!("expected a graph problem, got {other}"),
    }
}

/// Asserts `p` is a bad attribute `attribute` of an `op` node.
fn assert_bad_attribute(p: &GraphProblem, op: &str, attribute: &str) {
    assert!(
        matches!(p, GraphProblem::BadAttribute { op: o, attribute: a, .. } if o == op && a == attribute),
        "expected {op}.{attribute}, got {p}"
    );
}

#[test]
fn the_fixture_passes_every_check() {
    let bundle = rebuild(|_, _| {});
    check_graphs(&bundle).unwrap();
    Engine::new(Arc::new(bundle), EngineOptions::default()).unwrap();
}

#[test]
fn g1_a_graph_section_that_is_not_onnx() {
    for bytes in [Vec::new(), b"not a model at all".to_vec(), vec![0xff; 64]] {
        let bundle = rebuild(|m, sections| {
            sections[m.graphs[0].section as usize].1 = bytes.clone();
        });
        let p = problem(bundle);
        assert!(matches!(p, GraphProblem::NotOnnx { .. }), "{p}");
    }
}

#[test]
fn g2_a_node_input_and_a_graph_output_nothing_produces() {
    let p = problem(with_graphs(|m| {
        node(m, "Relu").input[0] = "nowhere".into();
    }));
    assert!(
        matches!(&p, GraphProblem::UndefinedInput { op, input, .. } if op == "Relu" && input == "nowhere"),
        "{p}"
    );
    let p = problem(with_graphs(|m| {
        m.graph.as_mut().unwrap().output.push(ValueInfoProto {
            name: "ghost".into(),
            ..Default::default()
        });
    }));
    assert_eq!(
        p,
        GraphProblem::UndefinedOutput {
            output: "ghost".into()
        }
    );
    // A tensor renamed in the manifest: the graph reads a name the bundle no longer has.
    let p = problem(rebuild(|m, _| {
        m.tensors[0].name.push_str(".renamed");
    }));
    assert!(matches!(p, GraphProblem::UndefinedInput { .. }), "{p}");
}

#[test]
fn g3_a_tensor_the_graph_never_reads() {
    let p = problem(rebuild(|m, sections| {
        let section = sections.len() as u32;
        sections.push((SectionKind::Base, vec![0; 4]));
        m.tensors.push(TensorEntry {
            name: "unread".into(),
            shape: vec![1],
            dtype: DType::F32,
            storage: TensorStorage::Merged {
                base: Stored {
                    section,
                    encoding: Encoding::F32,
                },
                delta: None,
            },
        });
        for t in &mut m.tasks {
            t.tensors.push(TaskTensor::Merged {
                mask: None,
                scale: taskpack::format::Scale::None,
            });
        }
    }));
    assert_eq!(
        p,
        GraphProblem::UnreadTensor {
            task: "mnist".into(),
            tensor: "unread".into()
        }
    );
}

#[test]
fn g4_windowed_attributes_out_of_range() {
    let cases: [(&str, &str, Vec<i64>); 5] = [
        ("MaxPool", "kernel_shape", vec![0, 0]),
        ("MaxPool", "strides", vec![0, 0]),
        ("Conv", "strides", vec![0, 1]),
        ("Conv", "dilations", vec![1, 0]),
        ("Conv", "pads", vec![-1, 0, 0, 0]),
    ];
    for (op, attribute, value) in cases {
        let p = problem(with_graphs(|m| set_ints(node(m, op), attribute, &value)));
        assert_bad_attribute(&p, op, attribute);
    }
    let p = problem(with_graphs(|m| set_int(node(m, "Conv"), "group", 0)));
    assert_bad_attribute(&p, "Conv", "group");
    // One stride for two spatial axes.
    let p = problem(with_graphs(|m| {
        set_ints(node(m, "MaxPool"), "strides", &[2])
    }));
    assert_bad_attribute(&p, "MaxPool", "strides");
}

/// The fixture with a node `hostile` of type `op` whose shape input is the constant `shape`
/// (`ConstantOfShape`: its only input; `Expand`: its second, the first being a scalar), and its
/// output made a graph output.
fn with_constant_shape(op: &str, shape: Vec<i64>) -> Bundle {
    let op = op.to_string();
    with_graphs(move |m| {
        let graph = m.graph.as_mut().unwrap();
        graph.initializer.push(TensorProto {
            name: "hostile_shape".into(),
            dims: vec![shape.len() as i64],
            data_type: DataType::Int64 as i32,
            int64_data: shape.clone(),
            ..Default::default()
        });
        let mut input = vec!["hostile_shape".to_string()];
        if op == "Expand" {
            graph.initializer.push(TensorProto {
                name: "hostile_one".into(),
                data_type: DataType::Float as i32,
                float_data: vec![1.0],
                ..Default::default()
            });
            input.insert(0, "hostile_one".into());
        }
        graph.node.push(NodeProto {
            name: "hostile".into(),
            op_type: op.clone(),
            input,
            output: vec!["hostile_out".into()],
            ..Default::default()
        });
        graph.output.push(ValueInfoProto {
            name: "hostile_out".into(),
            ..Default::default()
        });
    })
}

#[test]
fn g4_constant_of_shape_with_a_negative_shape() {
    let p = problem(with_constant_shape("ConstantOfShape", vec![-1, 4]));
    assert_eq!(
        p,
        GraphProblem::BadShape {
            node: "hostile".into(),
            op: "ConstantOfShape".into(),
            input: "hostile_shape".into(),
            shape: vec![-1, 4],
            reason: "has a negative dimension".into()
        }
    );
}

/// A constant shape asking for 2^40 elements (4 TiB of f32) is refused before tract folds or
/// runs it, for `ConstantOfShape` and `Expand` (the cap's boundary is tested in
/// `runtime::check`'s unit tests).
#[test]
fn g4_constant_shapes_asking_for_huge_tensors() {
    for op in ["ConstantOfShape", "Expand"] {
        let p = problem(with_constant_shape(op, vec![1 << 20, 1 << 20]));
        let want = format!(
            "asks for 1099511627776 elements, more than the {MAX_CONSTANT_SHAPE_ELEMENTS} a graph \
             may create from a constant shape"
        );
        match &p {
            GraphProblem::BadShape {
                op: got, reason, ..
            } => {
                assert_eq!((got.as_str(), reason.as_str()), (op, want.as_str()))
            }
            other => panic!("{op}: {other}"),
        }
    }
}

#[test]
fn g6_flatten_axis_past_the_rank() {
    for axis in [99, -99] {
        let p = problem(with_graphs(|m| set_int(node(m, "Flatten"), "axis", axis)));
        assert_bad_attribute(&p, "Flatten", "axis");
        match p {
            GraphProblem::BadAttribute { value, .. } => assert_eq!(value, axis.to_string()),
            _ => unreachable!(),
        }
    }
}

/// An `Unsqueeze` whose axis lies past its output's rank made tract 0.23.9 panic while it
/// inferred the shape (`AddDims::output_shape` inserts past the end of a `SmallVec`; found by
/// the `engine` fuzz target, docs/FUZZING.md; the G7 guard caught it as `GraphProblem::Panic`).
/// The checked `Unsqueeze` parser (rule G6) fails the analysis instead, naming the node and
/// the axis, for both `check_graphs` and `Engine::new`.
#[test]
fn g6_an_unsqueeze_axis_past_the_rank_fails_the_analysis_with_the_node_named() {
    let bundle = with_graphs(|m| {
        let graph = m.graph.as_mut().unwrap();
        graph.initializer.push(TensorProto {
            name: "hostile_one".into(),
            data_type: DataType::Float as i32,
            float_data: vec![1.0],
            ..Default::default()
        });
        graph.initializer.push(TensorProto {
            name: "hostile_axes".into(),
            dims: vec![1],
            data_type: DataType::Int64 as i32,
            int64_data: vec![9],
            ..Default::default()
        });
        graph.node.push(NodeProto {
            name: "hostile".into(),
            op_type: "Unsqueeze".into(),
            input: vec!["hostile_one".into(), "hostile_axes".into()],
            output: vec!["hostile_out".into()],
            ..Default::default()
        });
        graph.output.push(ValueInfoProto {
            name: "hostile_out".into(),
            ..Default::default()
        });
    });
    match refused(bundle) {
        Error::Tract { action, message } => {
            assert_eq!(action, "analyse graph 0");
            assert!(
                message.contains("\"hostile\" Unsqueeze")
                    && message
                        .contains("Unsqueeze axis 9 is outside [-1, 1) for an input of rank 0"),
                "{message}"
            );
        }
        other => panic!("expected tract's analysis error, got {other}"),
    }
}

/// Index of the tensor called `name` in the fixture.
fn tensor(m: &Manifest, name: &str) -> usize {
    m.tensors.iter().position(|t| t.name == name).unwrap()
}

/// Re-encodes every section of tensor `k` (base, delta, private copies) from `from` to `to`,
/// and sets the tensor's type to `to`.
fn retype(m: &mut Manifest, sections: &mut Sections, k: usize, to: DType) {
    let mut ids = Vec::new();
    match &mut m.tensors[k].storage {
        TensorStorage::Merged { base, delta } => {
            ids.push((base.section, base.encoding));
            base.encoding = to.into();
            if let Some(d) = delta {
                ids.push((d.section, d.encoding));
                d.encoding = to.into();
            }
        }
        TensorStorage::Private => {
            for t in &mut m.tasks {
                if let TaskTensor::Private { stored, .. } = &mut t.tensors[k] {
                    ids.push((stored.section, stored.encoding));
                    stored.encoding = to.into();
                }
            }
        }
    }
    for (id, from) in ids {
        let bytes = &mut sections[id as usize].1;
        let mut values = Vec::new();
        let from = from.float().expect("the fixture stores floats");
        from.decode_into(bytes, &mut values);
        bytes.clear();
        to.encode(&values, bytes);
    }
    m.tensors[k].dtype = to;
}

#[test]
fn g5_g7_a_weight_type_the_graph_cannot_take() {
    // bf16: tract has no such type.
    let p = problem(rebuild(|m, s| {
        let k = tensor(m, "head.weight");
        retype(m, s, k, DType::BF16);
    }));
    assert_eq!(
        p,
        GraphProblem::WeightType {
            tensor: "head.weight".into(),
            dtype: DType::BF16
        }
    );
    // f16 weights in an f32 graph: the types do not unify.
    let err = refused(rebuild(|m, s| {
        let k = tensor(m, "head.weight");
        retype(m, s, k, DType::F16);
    }));
    assert!(
        matches!(&err, Error::Tract { action, .. } if action.contains("graph")),
        "{err}"
    );
}

#[test]
fn g7_a_private_head_of_the_wrong_shape() {
    let err = refused(rebuild(|m, sections| {
        let k = tensor(m, "head.weight");
        let TaskTensor::Private { stored, shape } = &mut m.tasks[0].tensors[k] else {
            panic!("the demo heads are private");
        };
        // One input feature too many for the layer before it.
        shape[1] += 1;
        let numel: u64 = shape.iter().product();
        sections[stored.section as usize].1 = vec![0; numel as usize * 4];
    }));
    assert!(
        matches!(&err, Error::Tract { action, .. } if action.contains("graph")),
        "{err}"
    );
}

#[test]
fn g8_label_names_that_do_not_fit_the_output() {
    let bundle = rebuild(|m, _| {
        m.tasks[0].labels = vec!["one".into(), "two".into()];
    });
    let err = check_graphs(&bundle).unwrap_err();
    assert!(
        matches!(&err, Error::Graph { problem, .. }
            if matches!(&**problem, GraphProblem::Labels { task, reason }
                if task == "mnist" && reason.contains("2 label names") && reason.contains("10 classes"))),
        "{err}"
    );
    // The task still runs on tensors: the engine takes the bundle.
    Engine::new(Arc::new(bundle), EngineOptions::default()).unwrap();
}

/// Writes `bundle`'s bytes to `dir/name` for the CLI.
fn save(bundle: &Bundle, dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bundle.bytes()).unwrap();
    path
}

#[test]
fn cli_verify_and_run_refuse_a_hostile_graph_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = save(&rebuild(|_, _| {}), dir.path(), "good.tpk");
    let (ok, stdout, err) = cli(&["verify", good.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(stdout.contains("OK"), "{stdout}");
    let hostile = save(
        &with_graphs(|m| set_ints(node(m, "MaxPool"), "strides", &[0, 0])),
        dir.path(),
        "hostile.tpk",
    );
    let path = hostile.to_str().unwrap();
    let (ok, _, err) = cli(&["verify", path]);
    assert!(!ok);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("failed verification") && err.contains("strides"),
        "{err}"
    );
    let npz = demo().join("mnist.test.npz");
    let (ok, _, err) = cli(&[
        "run",
        path,
        "--task",
        "mnist",
        "--input",
        npz.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("strides") && !err.contains("panicked"),
        "{err}"
    );
}

// ---- compile -------------------------------------------------------------------------------

/// Options compiling the demo's `mnist` and `parity` into `dir/out.tpk`.
fn options(dir: &Path) -> CompileOptions {
    let tasks = TASKS
        .iter()
        .map(|t| (t.to_string(), demo().join(format!("{t}.onnx"))))
        .collect();
    CompileOptions::new(
        demo().join("base.onnx"),
        tasks,
        Method::Emr,
        dir.join("out.tpk"),
    )
}

/// Asserts the directory holds nothing but the files in `keep`.
fn assert_nothing_written(dir: &Path, keep: &[&str]) {
    let left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn compile_refuses_a_tokenizer_that_does_not_load() {
    let dir = tempfile::tempdir().unwrap();
    for bytes in [&b"hello, not JSON"[..], b"{\"model\": 3}"] {
        let mut opts = options(dir.path());
        opts.tokenizer = Some(bytes.to_vec());
        let err = compile(&opts, &mut |_| {}).unwrap_err();
        assert!(matches!(err, CompileError::Tokenizer(_)), "{err}");
        assert_nothing_written(dir.path(), &[]);
    }
    // The CLI: one line, no output file.
    let tokenizer = dir.path().join("tokenizer.json");
    std::fs::write(&tokenizer, "hello, not JSON").unwrap();
    let out = dir.path().join("out.tpk");
    let mnist = demo().join("mnist.onnx");
    let (ok, _, err) = cli_compile(
        &demo().join("base.onnx"),
        ("mnist", &mnist),
        &["--tokenizer", tokenizer.to_str().unwrap()],
        &out,
    );
    assert_one_line_error(ok, &err, "tokenizer");
    assert_nothing_written(dir.path(), &["tokenizer.json"]);
}

#[test]
fn compile_refuses_labels_that_do_not_fit_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(dir.path());
    opts.labels = vec![vec!["even".into(), "odd".into()], Vec::new()];
    let err = compile(&opts, &mut |_| {}).unwrap_err();
    assert!(
        matches!(&err, CompileError::Labels { task, reason }
            if task == "mnist" && reason.contains("2 label names") && reason.contains("10 classes")),
        "{err}"
    );
    assert_nothing_written(dir.path(), &[]);
    // Two names fit the two-class task.
    opts.labels = vec![Vec::new(), vec!["even".into(), "odd".into()]];
    compile(&opts, &mut |_| {}).unwrap();

    let labels = dir.path().join("two.labels");
    std::fs::write(&labels, "even\nodd\n").unwrap();
    let out = dir.path().join("cli.tpk");
    let mnist = demo().join("mnist.onnx");
    let (ok, _, err) = cli_compile(
        &demo().join("base.onnx"),
        ("mnist", &mnist),
        &["--labels", &format!("mnist={}", labels.display())],
        &out,
    );
    assert!(!ok);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("10 classes"), "{err}");
    assert!(!out.exists());
}

/// The demo checkpoint `task` with `edit` applied to its model, written to `dir/task.onnx`.
fn edited_checkpoint(dir: &Path, task: &str, edit: impl FnOnce(&mut ModelProto)) -> PathBuf {
    let bytes = std::fs::read(demo().join(format!("{task}.onnx"))).unwrap();
    let mut model = ModelProto::decode(bytes.as_slice()).unwrap();
    edit(&mut model);
    let path = dir.join(format!("{task}.onnx"));
    std::fs::write(&path, model.encode_to_vec()).unwrap();
    path
}

#[test]
fn compile_refuses_a_task_graph_reading_a_name_nothing_produces() {
    let dir = tempfile::tempdir().unwrap();
    let mnist = edited_checkpoint(dir.path(), "mnist", |m| {
        node(m, "Relu").input[0] = "nowhere".into();
    });
    let mut opts = options(dir.path());
    opts.tasks[0].1 = mnist;
    let err = compile(&opts, &mut |_| {}).unwrap_err();
    assert!(
        matches!(&err, CompileError::TaskGraph { task, reason }
            if task == "mnist" && reason.contains("\"nowhere\"")),
        "{err}"
    );
    assert_nothing_written(dir.path(), &["mnist.onnx"]);
}

#[test]
fn compile_refuses_a_hostile_attribute_in_a_task_graph() {
    let dir = tempfile::tempdir().unwrap();
    let mnist = edited_checkpoint(dir.path(), "mnist", |m| {
        set_int(node(m, "Flatten"), "axis", 99);
    });
    let mut opts = options(dir.path());
    opts.tasks[0].1 = mnist;
    let err = compile(&opts, &mut |_| {}).unwrap_err();
    assert!(
        matches!(&err, CompileError::TaskGraph { task, reason }
            if task == "mnist" && reason.contains("axis") && reason.contains("Flatten")),
        "{err}"
    );
    assert_nothing_written(dir.path(), &["mnist.onnx"]);
}

#[test]
fn compile_drops_an_initializer_no_node_reads() {
    let dir = tempfile::tempdir().unwrap();
    let dead = |m: &mut ModelProto| {
        let mut raw = Vec::new();
        DType::F32.encode(&[1.0, 2.0], &mut raw);
        m.graph.as_mut().unwrap().initializer.push(TensorProto {
            name: "dead".into(),
            dims: vec![2],
            data_type: DataType::Float as i32,
            raw_data: raw,
            ..Default::default()
        });
    };
    let base = edited_checkpoint(dir.path(), "base", dead);
    let mut opts = options(dir.path());
    opts.base = base;
    for (task, path) in &mut opts.tasks {
        *path = edited_checkpoint(dir.path(), task, dead);
    }
    let bundle = compile(&opts, &mut |_| {}).unwrap();
    assert!(bundle.manifest().tensors.iter().all(|t| t.name != "dead"));
    check_graphs(&bundle).unwrap();
}
