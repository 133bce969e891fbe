//! Text in, label out: the tiny text family of models/text compiled with its tokenizer and label
//! names, classified by `TextClassifier` and `taskpack run --text`, against the goldens its
//! recipe computed with an independent implementation (the python `tokenizers` library for the
//! token ids, onnxruntime on the task's own ONNX file for the logits).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use taskpack::compile::{compile, CompileError, CompileOptions};
use taskpack::export::export_task;
use taskpack::format::Encoding;
use taskpack::format::Method;
use taskpack::runtime::{Bundle, Engine, EngineOptions, Error, Prediction, TextClassifier};
use tract_onnx::prelude::*;

use crate::common::{cli, demo};

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/text")
}

const TASKS: [&str; 2] = ["mood", "topic"];

/// One golden sentence: what python `tokenizers` + onnxruntime gave for it.
#[derive(Debug)]
struct Golden {
    task: String,
    text: String,
    ids: Vec<i64>,
    class: usize,
    label: String,
    probability: f64,
    logits: Vec<f64>,
}

/// The goldens of `set` (`dynamic` or `fixed_8`) for `task`.
fn goldens(set: &str, task: &str) -> Vec<Golden> {
    let text = std::fs::read_to_string(models().join("golden.json")).unwrap();
    let json: Value = serde_json::from_str(&text).unwrap();
    let cases: Vec<Golden> = json[set]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| Golden {
            task: c["task"].as_str().unwrap().into(),
            text: c["text"].as_str().unwrap().into(),
            ids: c["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect(),
            class: c["class"].as_u64().unwrap() as usize,
            label: c["label"].as_str().unwrap().into(),
            probability: c["probability"].as_f64().unwrap(),
            logits: c["logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect(),
        })
        .filter(|g| g.task == task)
        .collect();
    assert!(cases.len() >= 5, "{set}/{task}: {} goldens", cases.len());
    cases
}

fn labels(task: &str) -> Vec<String> {
    std::fs::read_to_string(models().join(format!("{task}.labels")))
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

fn tokenizer() -> Vec<u8> {
    std::fs::read(models().join("tokenizer.json")).unwrap()
}

/// Compiles `tasks` of the text family into `dir/NAME.tpk` with `method`, the family's
/// tokenizer (or `tokenizer`) and label names.
fn compile_text(
    dir: &Path,
    name: &str,
    tasks: &[&str],
    method: Method,
    tokenizer: Option<Vec<u8>>,
) -> (PathBuf, Bundle) {
    let path = dir.join(format!("{name}.tpk"));
    let list = tasks
        .iter()
        .map(|t| (t.to_string(), models().join(format!("{t}.onnx"))))
        .collect();
    let mut opts = CompileOptions::new(models().join("base.onnx"), list, method, &path);
    opts.tokenizer = tokenizer;
    opts.labels = tasks.iter().map(|t| labels(t)).collect();
    if method == Method::TaskArithmetic {
        // One task at α = 1 and an f32 delta: θ_0 + (θ_t − θ_0), the task's weights up to f32
        // rounding.
        assert_eq!(tasks.len(), 1);
        opts.params.alpha = 1.0;
        opts.delta_dtype = Encoding::F32;
    }
    let bundle = compile(&opts, &mut |_| {}).unwrap();
    (path, bundle)
}

fn classifier(path: &Path, options: EngineOptions) -> TextClassifier {
    try_classifier(path, options).unwrap()
}

/// A text classifier for a bundle, or the error `TextClassifier::new` gives.
fn try_classifier(path: &Path, options: EngineOptions) -> Result<TextClassifier, Error> {
    let engine = Engine::new(Arc::new(Bundle::open(path).unwrap()), options).unwrap();
    TextClassifier::new(Arc::new(engine))
}

/// Asserts that `got` is the golden prediction: same class and label, probability within 1e-5,
/// logits within 1e-4.
#[track_caller]
fn assert_matches(got: &Prediction, want: &Golden) {
    let what = format!("{} {:?}", want.task, want.text);
    assert_eq!(got.class, want.class, "{what}: {got:?}");
    assert_eq!(got.label.as_deref(), Some(want.label.as_str()), "{what}");
    assert!(
        (f64::from(got.probability) - want.probability).abs() <= 1e-5,
        "{what}: probability {} vs {}",
        got.probability,
        want.probability
    );
    assert_eq!(got.logits.len(), want.logits.len(), "{what}");
    for (g, w) in got.logits.iter().zip(&want.logits) {
        assert!(
            (f64::from(*g) - w).abs() <= 1e-4,
            "{what}: logits {:?} vs {:?}",
            got.logits,
            want.logits
        );
    }
}

/// The `input_ids` the classifier gives `text` for `task`, without padding.
fn token_ids(classifier: &TextClassifier, task: usize, text: &str) -> Vec<i64> {
    let inputs = classifier.inputs(task, &[text]).unwrap();
    let facts = classifier.engine().input_facts(task).unwrap();
    let at = |name: &str| facts.iter().position(|f| f.name == name).unwrap();
    let values = |name: &str| -> Vec<i64> {
        let t = inputs[at(name)].cast_to::<i64>().unwrap();
        t.to_plain_array_view::<i64>()
            .unwrap()
            .iter()
            .copied()
            .collect()
    };
    let mask = values("attention_mask");
    values("input_ids")
        .into_iter()
        .zip(mask)
        .filter(|&(_, m)| m == 1)
        .map(|(i, _)| i)
        .collect()
}

/// Each task compiled alone carries its own weights (up to f32 rounding), so the bundle must
/// reproduce the goldens: the token ids of python `tokenizers`, and onnxruntime's class,
/// probability and logits. Batched (padded to the longest text, as the goldens were) and one
/// by one, with the graph's dynamic sequence length and with it fixed to 8 (truncation).
#[test]
fn classify_reproduces_python_tokenizers_and_onnxruntime() {
    let dir = tempfile::tempdir().unwrap();
    for task in TASKS {
        let (path, _) = compile_text(
            dir.path(),
            task,
            &[task],
            Method::TaskArithmetic,
            Some(tokenizer()),
        );
        let dynamic = classifier(&path, EngineOptions::default());
        let t = dynamic.engine().task_index(task).unwrap();
        assert_eq!(dynamic.labels(t).unwrap(), labels(task).as_slice());
        let cases = goldens("dynamic", task);
        let texts: Vec<&str> = cases.iter().map(|g| g.text.as_str()).collect();
        let batch = dynamic.classify(t, &texts).unwrap();
        assert_eq!(batch.len(), cases.len());
        for (got, want) in batch.iter().zip(&cases) {
            assert_matches(got, want);
            assert_eq!(
                token_ids(&dynamic, t, &want.text),
                want.ids,
                "{}",
                want.text
            );
            assert_matches(&dynamic.classify_one(t, &want.text).unwrap(), want);
        }

        let fixed = classifier(&path, EngineOptions::default().with_symbol("sequence", 8));
        for want in goldens("fixed_8", task) {
            assert_eq!(token_ids(&fixed, t, &want.text), want.ids, "{}", want.text);
            assert_matches(&fixed.classify_one(t, &want.text).unwrap(), &want);
        }
        // A fixed batch size: texts run in chunks of 2, the last one filled up.
        let pairs = classifier(&path, EngineOptions::default().with_symbol("batch", 2));
        let got = pairs.classify(t, &texts).unwrap();
        assert_eq!(got.len(), cases.len());
        for (got, want) in got.iter().zip(&cases) {
            assert_matches(got, want);
        }
        assert!(dynamic.classify(t, &[] as &[&str]).unwrap().is_empty());
    }
}

/// softmax(logits)[class] in f64, and the argmax.
fn best(logits: &[f32]) -> (usize, f64) {
    let (class, max) =
        logits.iter().enumerate().fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &v)| if v > b.1 { (i, v) } else { b },
        );
    let sum: f64 = logits.iter().map(|&v| f64::from(v - max).exp()).sum();
    (class, 1.0 / sum)
}

/// A merged bundle (EMR, f16 delta) reconstructs each task close to, not exactly, its
/// checkpoint: what `classify` must give is what that reconstruction gives. So the reference is
/// the task exported from the bundle, run by plain tract on the ids python `tokenizers` made.
/// The labels must still agree with the original models' on these clear-cut sentences.
#[test]
fn merged_bundle_classifies_as_its_exported_tasks_do() {
    let dir = tempfile::tempdir().unwrap();
    let (path, bundle) = compile_text(dir.path(), "family", &TASKS, Method::Emr, Some(tokenizer()));
    let classifier = classifier(&path, EngineOptions::default());
    for task in TASKS {
        let t = classifier.engine().task_index(task).unwrap();
        let onnx = export_task(&bundle, task).unwrap();
        let model = crate::common::tract_plan(&onnx);
        let cases = goldens("dynamic", task);
        let mut agree = 0;
        for g in &cases {
            let n = g.ids.len();
            let ids = Tensor::from_shape(&[1, n], &g.ids).unwrap();
            let ones = Tensor::from_shape(&[1, n], &vec![1i64; n]).unwrap();
            let zeros = Tensor::from_shape(&[1, n], &vec![0i64; n]).unwrap();
            let out = model
                .run(tvec![ids.into(), ones.into(), zeros.into()])
                .unwrap();
            let logits: Vec<f32> = out[0]
                .to_plain_array_view::<f32>()
                .unwrap()
                .iter()
                .copied()
                .collect();
            let (class, probability) = best(&logits);
            let got = classifier.classify_one(t, &g.text).unwrap();
            assert_eq!(got.class, class, "{task} {:?}", g.text);
            assert_eq!(got.label.as_deref(), Some(labels(task)[class].as_str()));
            assert!(
                (f64::from(got.probability) - probability).abs() <= 1e-5,
                "{task} {:?}: {} vs {probability}",
                g.text,
                got.probability
            );
            agree += usize::from(got.class == g.class);
        }
        assert_eq!(
            agree,
            cases.len(),
            "{task}: the merged task's labels differ from the original's"
        );
    }
}

#[test]
fn text_errors_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    // No tokenizer.
    let (path, _) = compile_text(dir.path(), "bare", &["mood"], Method::Emr, None);
    let err = try_classifier(&path, EngineOptions::default()).unwrap_err();
    assert!(matches!(err, Error::NoTokenizer), "{err}");
    assert!(err.to_string().contains("--tokenizer"), "{err}");

    // A tokenizer that does not parse: the compiler refuses it, and a bundle that has one anyway
    // (rewritten here) does not load it.
    let garbled = b"{\"model\": 3}".to_vec();
    let mut opts = CompileOptions::new(
        models().join("base.onnx"),
        vec![("mood".into(), models().join("mood.onnx"))],
        Method::Emr,
        dir.path().join("garbled.tpk"),
    );
    opts.tokenizer = Some(garbled.clone());
    let err = compile(&opts, &mut |_| {}).unwrap_err();
    assert!(matches!(err, CompileError::Tokenizer(_)), "{err}");
    let (_, bundle) = compile_text(
        dir.path(),
        "good",
        &["mood"],
        Method::Emr,
        Some(tokenizer()),
    );
    let rewritten = crate::hostile_graphs::rewrite(&bundle, |m, sections| {
        sections[m.tokenizer.unwrap() as usize].1 = garbled;
    });
    let path = dir.path().join("garbled.tpk");
    std::fs::write(&path, rewritten.bytes()).unwrap();
    let err = try_classifier(&path, EngineOptions::default()).unwrap_err();
    assert!(matches!(err, Error::TokenizerParse { .. }), "{err}");

    // Unknown task names and indices.
    let (path, _) = compile_text(dir.path(), "family", &TASKS, Method::Emr, Some(tokenizer()));
    let c = classifier(&path, EngineOptions::default());
    let err = c.engine().task_index("spam").unwrap_err();
    assert!(matches!(err, Error::UnknownTask { .. }), "{err}");
    let err = c.classify(7, &["hello"]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::OutOfRange {
                what: "task",
                index: 7,
                count: 2
            }
        ),
        "{err}"
    );

    // A sequence length that leaves no room for [CLS] and [SEP].
    let c = classifier(&path, EngineOptions::default().with_symbol("sequence", 1));
    let err = c.classify(0, &["hello"]).unwrap_err();
    assert!(matches!(err, Error::UnfillableInput { .. }), "{err}");

    // Label names that do not match the output width: topic's three for mood's two classes.
    // The compiler refuses them; a bundle that has them anyway (rewritten here) still runs, and
    // classifying reports the mismatch.
    let mut opts = CompileOptions::new(
        models().join("base.onnx"),
        vec![("mood".into(), models().join("mood.onnx"))],
        Method::Emr,
        dir.path().join("labels.tpk"),
    );
    opts.tokenizer = Some(tokenizer());
    opts.labels = vec![labels("topic")];
    let err = compile(&opts, &mut |_| {}).unwrap_err();
    assert!(matches!(err, CompileError::Labels { .. }), "{err}");
    opts.labels = vec![Vec::new()];
    let bundle = compile(&opts, &mut |_| {}).unwrap();
    let relabeled = crate::hostile_graphs::rewrite(&bundle, |m, _| {
        m.tasks[0].labels = labels("topic");
    });
    std::fs::write(dir.path().join("labels.tpk"), relabeled.bytes()).unwrap();
    let c = classifier(&dir.path().join("labels.tpk"), EngineOptions::default());
    let err = c.classify(0, &["i love this pizza"]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LabelCount {
                labels: 3,
                classes: 2,
                ..
            }
        ),
        "{err}"
    );

    // A graph that does not take tokens: an image model with a tokenizer.
    let mut opts = CompileOptions::new(
        demo().join("base.onnx"),
        vec![("mnist".into(), demo().join("mnist.onnx"))],
        Method::Emr,
        dir.path().join("image.tpk"),
    );
    opts.tokenizer = Some(tokenizer());
    compile(&opts, &mut |_| {}).unwrap();
    let c = classifier(&dir.path().join("image.tpk"), EngineOptions::default());
    let err = c.classify(0, &["a digit"]).unwrap_err();
    assert!(
        matches!(err, Error::UnfillableInput { ref name, .. } if name == "image"),
        "{err}"
    );
}

#[test]
fn cli_compile_with_tokenizer_and_labels_then_run_text() {
    let dir = tempfile::tempdir().unwrap();
    let m = |f: &str| models().join(f).display().to_string();
    let out = dir.path().join("text.tpk").display().to_string();
    let (ok, _, stderr) = cli(&[
        "compile",
        "--base",
        &m("base.onnx"),
        "--task",
        &format!("mood={}", m("mood.onnx")),
        "--task",
        &format!("topic={}", m("topic.onnx")),
        "--tokenizer",
        &m("tokenizer.json"),
        "--labels",
        &format!("mood={}", m("mood.labels")),
        "--labels",
        &format!("topic={}", m("topic.labels")),
        "-o",
        &out,
    ]);
    assert!(ok, "{stderr}");

    let json = dir.path().join("p.json").display().to_string();
    let cases = goldens("dynamic", "topic");
    let mut args = vec!["run", &out, "--task", "topic"];
    for g in &cases {
        args.extend(["--text", g.text.as_str()]);
    }
    args.extend(["--output", &json]);
    let (ok, stdout, stderr) = cli(&args);
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), cases.len(), "{stdout}");
    let written: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("p.json")).unwrap()).unwrap();
    for ((line, g), p) in lines.iter().zip(&cases).zip(written.as_array().unwrap()) {
        let fields: Vec<&str> = line.split('\t').collect();
        assert_eq!(fields.len(), 3, "{line}");
        assert_eq!(fields[0], g.label, "{line}");
        let probability: f64 = fields[1].parse().unwrap();
        assert!((0.0..=1.0).contains(&probability), "{line}");
        assert_eq!(fields[2], g.text);
        assert_eq!(p["text"], g.text.as_str());
        assert_eq!(p["label"], g.label.as_str());
        assert_eq!(p["class"], g.class);
        assert_eq!(p["logits"].as_array().unwrap().len(), 3);
    }

    // --text and --input exclude each other; one of them is required.
    let (ok, _, stderr) = cli(&[
        "run", &out, "--task", "mood", "--text", "x", "--input", "x.npz",
    ]);
    assert!(!ok && stderr.contains("cannot be used with"), "{stderr}");
    let (ok, _, stderr) = cli(&["run", &out, "--task", "mood"]);
    assert!(!ok && stderr.contains("--input"), "{stderr}");

    // An unknown task, and a bundle without tokenizer: one clear line each.
    let (ok, _, stderr) = cli(&["run", &out, "--task", "spam", "--text", "x"]);
    assert!(!ok && stderr.contains("no task \"spam\""), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let (bare, _) = compile_text(dir.path(), "bare", &["mood"], Method::Emr, None);
    let bare = bare.display().to_string();
    let (ok, _, stderr) = cli(&["run", &bare, "--task", "mood", "--text", "x"]);
    assert!(
        !ok && stderr.contains("has no tokenizer; compile it with --tokenizer"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}
