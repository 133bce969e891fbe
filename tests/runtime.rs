//! The runtime engine end to end on the demo models: every task's outputs against tract running
//! the task's exported ONNX, template reuse across switches, the cache budget, concurrent runs,
//! symbolic batch sizes and the typed errors.

use crate::common::{demo, demo_tasks};
use std::path::Path;
use std::sync::{Arc, OnceLock};

use ndarray_npy::NpzReader;
use taskpack::compile::{compile, CompileOptions};
use taskpack::format::Encoding;
use taskpack::format::{Method, ScaleMode};
use taskpack::runtime::{Bundle, Engine, EngineOptions, Error, IoInfo};
use tract_onnx::prelude::*;

/// Test images per task (the first rows of each test set): enough to exercise every class, small
/// enough for a debug build.
const ROWS: usize = 32;

/// Compiles the demo family with `method` and `scale` (once per test binary) and reads it back.
fn bundle(method: Method, scale: ScaleMode) -> Arc<Bundle> {
    static TALL: OnceLock<Arc<Bundle>> = OnceLock::new();
    static EMR_ROW: OnceLock<Arc<Bundle>> = OnceLock::new();
    let cell = match (method, scale) {
        (Method::Tall, ScaleMode::None) => &TALL,
        (Method::Emr, ScaleMode::Row) => &EMR_ROW,
        _ => panic!("no fixture for {method:?} {scale:?}"),
    };
    Arc::clone(cell.get_or_init(|| {
        let tasks = demo_tasks();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let out = dir.join(format!(
            "runtime-{}-{scale:?}-{}.tpk",
            method.name(),
            std::process::id()
        ));
        let opts = CompileOptions {
            scale: vec![scale; tasks.len()],
            // The EMR fixture stores its delta in f16 (the compiler's default), TALL in f32.
            delta_dtype: if method == Method::Emr {
                Encoding::F16
            } else {
                Encoding::F32
            },
            ..CompileOptions::new(demo().join("base.onnx"), tasks.clone(), method, &out)
        };
        drop(compile(&opts, &mut |_| {}).unwrap());
        let bundle = Bundle::read(&out).unwrap();
        std::fs::remove_file(&out).unwrap();
        Arc::new(bundle)
    }))
}

fn tall() -> Arc<Bundle> {
    bundle(Method::Tall, ScaleMode::None)
}

/// The first `rows` test images of `task`, `[rows, 1, 28, 28]`.
fn images(task: &str, rows: usize) -> Tensor {
    let path = demo().join(format!("{task}.test.npz"));
    let mut npz = NpzReader::new(std::fs::File::open(path).unwrap()).unwrap();
    let image: tract_ndarray::ArrayD<f32> = npz.by_name("image").unwrap();
    let rows = rows.min(image.shape()[0]);
    image
        .slice_axis(tract_ndarray::Axis(0), (0..rows).into())
        .to_owned()
        .into_tensor()
}

/// tract on the task's exported ONNX: the reference for the engine.
fn reference(bundle: &Bundle, task: &str, input: &Tensor) -> Tensor {
    let onnx = taskpack::export::export_task(bundle, task).unwrap();
    let model = tract_onnx::onnx()
        .model_for_read(&mut &onnx[..])
        .unwrap()
        .with_input_fact(0, f32::fact(input.shape()).into())
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let mut out = model.run(tvec!(input.clone().into())).unwrap();
    out.remove(0).into_tensor()
}

fn run(engine: &Engine, task: usize, input: &Tensor) -> Tensor {
    let mut out = engine.run(task, tvec!(input.clone().into())).unwrap();
    assert_eq!(out.len(), 1);
    out.remove(0).into_tensor()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.shape(), b.shape());
    let a = a.to_plain_array_view::<f32>().unwrap();
    let b = b.to_plain_array_view::<f32>().unwrap();
    a.iter()
        .zip(b.iter())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn check_against_exported_onnx(bundle: Arc<Bundle>) {
    let engine = Engine::new(Arc::clone(&bundle), EngineOptions::default()).unwrap();
    for task in 0..engine.task_count() {
        let name = engine.task_name(task).unwrap().to_string();
        let input = images(&name, ROWS);
        let got = run(&engine, task, &input);
        let want = reference(&bundle, &name, &input);
        let diff = max_abs_diff(&got, &want);
        assert!(
            diff <= 1e-5,
            "task {name}: engine and exported ONNX differ by {diff}"
        );
    }
}

#[test]
fn every_task_matches_its_exported_onnx_tall() {
    check_against_exported_onnx(tall());
}

/// `shared: ^fc\.weight$` with TALL (the demo's one large matrix): no task masks it, so every
/// task's exported `fc.weight` has the same bits; the engine binds it once, in the template,
/// so each task's task-dependent bytes are those of the unshared TALL bundle minus its
/// 32 × 784 × 4 bytes; and every task still matches its exported ONNX.
#[test]
fn shared_tensors_are_bound_once_and_match_the_exported_onnx() {
    use prost::Message;
    use taskpack::format::TaskTensor;

    let tasks = demo_tasks();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("runtime-shared-{}.tpk", std::process::id()));
    let opts = CompileOptions {
        delta_dtype: Encoding::F32,
        shared: Some(regex::Regex::new(r"^fc\.weight$").unwrap()),
        ..CompileOptions::new(demo().join("base.onnx"), tasks.clone(), Method::Tall, &out)
    };
    drop(compile(&opts, &mut |_| {}).unwrap());
    let shared = Arc::new(Bundle::read(&out).unwrap());
    std::fs::remove_file(&out).unwrap();

    let m = shared.manifest();
    let fc = m
        .tensors
        .iter()
        .position(|t| t.name == "fc.weight")
        .unwrap();
    for t in &m.tasks {
        assert!(
            matches!(t.tensors[fc], TaskTensor::Merged { mask: None, .. }),
            "{}",
            t.name
        );
    }
    let fc_bits = |task: &str| -> Vec<u8> {
        let onnx = taskpack::export::export_task(&shared, task).unwrap();
        let model = tract_onnx::pb::ModelProto::decode(&onnx[..]).unwrap();
        let graph = model.graph.unwrap();
        let t = graph
            .initializer
            .iter()
            .find(|t| t.name == "fc.weight")
            .unwrap();
        t.raw_data.clone()
    };
    let first = fc_bits(&tasks[0].0);
    assert_eq!(first.len(), 32 * 784 * 4);
    for (name, _) in &tasks[1..] {
        assert_eq!(fc_bits(name), first, "{name}");
    }

    let masked = Engine::new(tall(), EngineOptions::default()).unwrap();
    let engine = Engine::new(Arc::clone(&shared), EngineOptions::default()).unwrap();
    for task in 0..engine.task_count() {
        assert_eq!(
            engine.task_weight_bytes(task).unwrap() + 32 * 784 * 4,
            masked.task_weight_bytes(task).unwrap(),
            "task {task}"
        );
    }
    check_against_exported_onnx(shared);
}

/// `tvq` with `--shared ^fc\.weight$`: the shared matrix gets no residual, so it is the base
/// for every task — a constant large enough that the engine binds it as a shared input (one
/// copy for all graphs) instead of baking a copy into each template. Through that path every
/// task still matches its exported ONNX, and the matrix is not counted as a task's bytes. (The
/// memory it saves is measured by `taskpack bench`: docs/PERFORMANCE.md.)
#[test]
fn a_large_tensor_that_is_the_base_for_every_task_is_shared_not_copied_per_graph() {
    let tasks = demo_tasks();
    let dir = tempfile::tempdir().unwrap();
    let compiled = |shared: Option<&str>, name: &str| {
        let out = dir.path().join(name);
        let opts = CompileOptions {
            shared: shared.map(|r| regex::Regex::new(r).unwrap()),
            ..CompileOptions::new(demo().join("base.onnx"), tasks.clone(), Method::Tvq, &out)
        };
        drop(compile(&opts, &mut |_| {}).unwrap());
        Arc::new(Bundle::read(&out).unwrap())
    };
    let plain = compiled(None, "tvq.tpk");
    let shared = compiled(Some(r"^fc\.weight$"), "tvq-shared.tpk");
    let plain = Engine::new(plain, EngineOptions::default()).unwrap();
    let engine = Engine::new(Arc::clone(&shared), EngineOptions::default()).unwrap();
    for task in 0..engine.task_count() {
        assert_eq!(
            engine.task_weight_bytes(task).unwrap() + 32 * 784 * 4,
            plain.task_weight_bytes(task).unwrap(),
            "task {task}"
        );
    }
    check_against_exported_onnx(shared);
}

#[test]
fn every_task_matches_its_exported_onnx_emr_row_scales_f16_delta() {
    check_against_exported_onnx(bundle(Method::Emr, ScaleMode::Row));
}

#[test]
fn switching_builds_one_template_per_graph_and_binds_once_per_task() {
    let bundle = tall();
    let graphs = bundle.manifest().graphs.len();
    let engine = Engine::new(bundle, EngineOptions::default()).unwrap();
    let n = engine.task_count();
    let inputs: Vec<Tensor> = (0..n)
        .map(|t| images(engine.task_name(t).unwrap(), 4))
        .collect();
    for _ in 0..3 {
        for (t, input) in inputs.iter().enumerate() {
            run(&engine, t, input);
        }
    }
    let stats = engine.stats();
    assert_eq!(
        stats.templates_built, graphs,
        "one parse + optimize per graph"
    );
    assert_eq!(stats.binds, n, "one bind per task, then cache hits");
    assert_eq!(stats.cache_hits, 2 * n);
    assert!(engine.cached_bytes() > 0);
    for t in 0..n {
        assert!(engine.is_cached(t));
    }
    // A cold switch outside the cache reuses the templates too.
    let bound = engine.bind(0).unwrap();
    assert_eq!(engine.stats().templates_built, graphs);
    assert_eq!(
        bits(
            &bound.run(tvec!(inputs[0].clone().into())).unwrap()[0]
                .clone()
                .into_tensor()
        ),
        bits(&run(&engine, 0, &inputs[0]))
    );
}

#[test]
fn io_facts_keep_the_symbolic_batch() {
    let engine = Engine::new(tall(), EngineOptions::default()).unwrap();
    for t in 0..engine.task_count() {
        assert_eq!(
            engine.input_facts(t).unwrap(),
            vec![IoInfo {
                name: "image".into(),
                dtype: DatumType::F32,
                shape: vec![None, Some(1), Some(28), Some(28)],
            }]
        );
        let out = engine.output_facts(t).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].dtype, DatumType::F32);
        assert_eq!(out[0].shape.len(), 2);
        assert_eq!(out[0].shape[0], None);
        let classes = out[0].shape[1].expect("a concrete class count");
        let y = run(&engine, t, &images(engine.task_name(t).unwrap(), 3));
        assert_eq!(y.shape(), &[3, classes]);
    }
}

#[test]
fn any_batch_size_gives_the_rows_of_the_full_batch() {
    let engine = Engine::new(tall(), EngineOptions::default()).unwrap();
    let task = engine.task_index("mnist").unwrap();
    let all = images("mnist", 9);
    let full = run(&engine, task, &all);
    for (start, len) in [(0, 1), (1, 3), (4, 5)] {
        let part = all.slice(0, start, start + len).unwrap();
        let got = run(&engine, task, &part);
        let want = full.slice(0, start, start + len).unwrap();
        assert!(max_abs_diff(&got, &want) <= 1e-5);
    }
}

#[test]
fn cache_stays_within_budget_and_a_zero_budget_still_runs() {
    let bundle = tall();
    let probe = Engine::new(Arc::clone(&bundle), EngineOptions::default()).unwrap();
    let n = probe.task_count();
    let sizes: Vec<usize> = (0..n)
        .map(|t| probe.task_weight_bytes(t).unwrap())
        .collect();
    let largest = *sizes.iter().max().unwrap();
    let inputs: Vec<Tensor> = (0..n)
        .map(|t| images(probe.task_name(t).unwrap(), 2))
        .collect();
    let expected: Vec<Vec<u32>> = (0..n).map(|t| bits(&run(&probe, t, &inputs[t]))).collect();
    for budget in [0, largest - 1, largest, 2 * largest + 1, usize::MAX] {
        let engine =
            Engine::new(Arc::clone(&bundle), EngineOptions::with_cache_bytes(budget)).unwrap();
        for t in (0..n).chain((0..n).rev()).chain([0, 3, 0, 1, 4, 2, 2]) {
            let t = t % n;
            assert_eq!(bits(&run(&engine, t, &inputs[t])), expected[t]);
            assert!(engine.cached_bytes() <= budget, "budget {budget}");
        }
        if budget == 0 {
            assert_eq!(engine.cached_bytes(), 0);
            assert!((0..n).all(|t| !engine.is_cached(t)));
        }
        if budget == usize::MAX {
            assert_eq!(engine.cached_bytes(), sizes.iter().sum::<usize>());
        }
        engine.clear_cache();
        assert_eq!(engine.cached_bytes(), 0);
    }
}

#[test]
fn concurrent_runs_are_bit_identical_to_sequential_ones() {
    let bundle = tall();
    let probe = Engine::new(Arc::clone(&bundle), EngineOptions::default()).unwrap();
    let n = probe.task_count();
    let inputs: Vec<Tensor> = (0..n)
        .map(|t| images(probe.task_name(t).unwrap(), 4))
        .collect();
    let expected: Vec<Vec<u32>> = (0..n).map(|t| bits(&run(&probe, t, &inputs[t]))).collect();
    // Room for two tasks out of five: threads keep evicting each other's tasks.
    let budget = 2 * probe.task_weight_bytes(0).unwrap() + 1;
    let engine = Arc::new(
        Engine::new(Arc::clone(&bundle), EngineOptions::with_cache_bytes(budget)).unwrap(),
    );
    let inputs = Arc::new(inputs);
    let expected = Arc::new(expected);
    let threads: Vec<_> = (0..4)
        .map(|thread| {
            let (engine, inputs, expected) = (
                Arc::clone(&engine),
                Arc::clone(&inputs),
                Arc::clone(&expected),
            );
            std::thread::spawn(move || {
                for round in 0..100 {
                    for i in 0..n {
                        let t = (i + thread + round) % n;
                        let out = engine.run(t, tvec!(inputs[t].clone().into())).unwrap();
                        assert_eq!(bits(&out[0].clone().into_tensor()), expected[t]);
                        assert!(engine.cached_bytes() <= budget);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!(engine.stats().templates_built <= bundle.manifest().graphs.len());
}

#[test]
fn typed_errors_name_what_is_wrong() {
    let engine = Engine::new(tall(), EngineOptions::default()).unwrap();
    let n = engine.task_count();
    match engine.task_index("nope") {
        Err(Error::UnknownTask { name, known }) => {
            assert_eq!(name, "nope");
            assert!(
                known.contains("mnist") && known.contains("parity"),
                "{known}"
            );
        }
        other => panic!("{other:?}"),
    }
    let good = images("mnist", 2);
    assert!(matches!(
        engine.run(n, tvec!(good.clone().into())),
        Err(Error::OutOfRange { what: "task", index, count }) if index == n && count == n
    ));
    assert!(matches!(
        engine.prepare(n + 7),
        Err(Error::OutOfRange { .. })
    ));
    assert!(matches!(
        engine.input_facts(n),
        Err(Error::OutOfRange { .. })
    ));
    assert!(engine.task_name(n).is_none());

    let task = engine.task_index("mnist").unwrap();
    match engine.run(task, tvec!()) {
        Err(Error::InputCount {
            task,
            expected,
            got,
            ..
        }) => assert_eq!((task.as_str(), expected, got), ("mnist", 1, 0)),
        other => panic!("{other:?}"),
    }
    match engine.run(task, tvec!(good.clone().into(), good.clone().into())) {
        Err(Error::InputCount { expected, got, .. }) => assert_eq!((expected, got), (1, 2)),
        other => panic!("{other:?}"),
    }
    let f64_input = good.cast_to::<f64>().unwrap().into_owned();
    match engine.run(task, tvec!(f64_input.into())) {
        Err(Error::InputMismatch {
            name,
            expected,
            got,
            ..
        }) => {
            assert_eq!(name, "image");
            assert!(expected.starts_with("F32"), "{expected}");
            assert!(got.starts_with("F64"), "{got}");
        }
        other => panic!("{other:?}"),
    }
    for shape in [&[2usize, 1, 28, 27][..], &[2, 28, 28], &[2, 3, 28, 28]] {
        let bad = Tensor::zero::<f32>(shape).unwrap();
        match engine.run(task, tvec!(bad.into())) {
            Err(Error::InputMismatch {
                name,
                expected,
                got,
                ..
            }) => {
                assert_eq!(name, "image");
                assert!(expected.contains(",1,28,28]"), "{expected}");
                assert!(
                    got.contains(&format!("{}]", shape[shape.len() - 1])),
                    "{got}"
                );
            }
            other => panic!("{shape:?}: {other:?}"),
        }
    }
    // The message reads as one line naming the input.
    let e = engine
        .run(
            task,
            tvec!(Tensor::zero::<f32>(&[1, 28, 28]).unwrap().into()),
        )
        .unwrap_err();
    assert!(e.to_string().contains("\"image\""), "{e}");
}

#[test]
fn fixed_symbols_give_concrete_facts_and_the_same_outputs() {
    let bundle = tall();
    let symbolic = Engine::new(Arc::clone(&bundle), EngineOptions::default()).unwrap();
    let fixed = Engine::new(
        Arc::clone(&bundle),
        EngineOptions::default()
            .with_symbol("N", 4)
            .with_symbol("not-a-symbol-of-this-graph", 9),
    )
    .unwrap();
    let task = fixed.task_index("fashion3").unwrap();
    assert_eq!(
        fixed.input_facts(task).unwrap()[0].shape,
        vec![Some(4), Some(1), Some(28), Some(28)]
    );
    assert_eq!(fixed.output_facts(task).unwrap()[0].shape[0], Some(4));
    let x = images("fashion3", 4);
    let got = run(&fixed, task, &x);
    assert!(max_abs_diff(&got, &run(&symbolic, task, &x)) <= 1e-5);
    assert!(max_abs_diff(&got, &reference(&bundle, "fashion3", &x)) <= 1e-5);
    assert!(matches!(
        fixed.run(task, tvec!(images("fashion3", 3).into())),
        Err(Error::InputMismatch { .. })
    ));
}
