//! Text through the C ABI: `tp_engine_classify_text` and the label names, on the text family of
//! models/text compiled with its tokenizer, against the goldens its recipe computed with python
//! `tokenizers` and onnxruntime. From Rust (misuse included) and from a C program.

use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::ptr::{null, null_mut};

use taskpack::TpStatus::*;
use taskpack::*;
use taskpack_core::compile::{compile, CompileOptions};
use taskpack_core::format::Encoding;
use taskpack_core::format::Method;

use crate::common::{build_c, expect, last_error};

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/text")
}

/// `(text, class, label, probability)` of the golden sentences of `task` (dynamic shapes).
pub fn goldens(task: &str) -> Vec<(String, usize, String, f64)> {
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(models().join("golden.json")).unwrap()).unwrap();
    json["dynamic"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["task"] == task)
        .map(|c| {
            (
                c["text"].as_str().unwrap().to_string(),
                c["class"].as_u64().unwrap() as usize,
                c["label"].as_str().unwrap().to_string(),
                c["probability"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// `task` of the text family compiled alone (task arithmetic at α = 1, f32 delta: its own
/// weights up to f32 rounding), with the family's label names and, if `tokenizer`, its
/// tokenizer.
pub fn compile_task(dir: &Path, task: &str, tokenizer: bool) -> CString {
    let path = dir.join(format!("{task}-{tokenizer}.tpk"));
    let mut opts = CompileOptions::new(
        models().join("base.onnx"),
        vec![(task.to_string(), models().join(format!("{task}.onnx")))],
        Method::TaskArithmetic,
        &path,
    );
    opts.params.alpha = 1.0;
    opts.delta_dtype = Encoding::F32;
    opts.tokenizer = tokenizer.then(|| std::fs::read(models().join("tokenizer.json")).unwrap());
    let labels = std::fs::read_to_string(models().join(format!("{task}.labels"))).unwrap();
    opts.labels = vec![labels.lines().map(String::from).collect()];
    compile(&opts, &mut |_| {}).unwrap();
    CString::new(path.to_str().unwrap()).unwrap()
}

/// An engine over the bundle at `path`, freed on drop.
struct Open(*mut TpEngine);

impl Open {
    fn new(path: &CStr) -> Open {
        let mut bundle = null_mut();
        let mut engine = null_mut();
        // SAFETY: a NUL-terminated path and writable out-pointers; our own handles.
        unsafe {
            expect(tp_bundle_open(path.as_ptr(), &mut bundle), TP_OK);
            expect(tp_engine_new(bundle, 0, &mut engine), TP_OK);
            expect(tp_bundle_free(&mut bundle), TP_OK);
        }
        Open(engine)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        // SAFETY: our own handle, freed once here and nulled.
        unsafe { tp_engine_free(&mut self.0) };
    }
}

/// `tp_engine_classify_text`: status, class, probability.
fn classify(engine: *const TpEngine, task: usize, text: *const c_char) -> (TpStatus, usize, f32) {
    let (mut class, mut probability) = (7, 0.5);
    // SAFETY: `text` is NULL or NUL-terminated (the callers'); writable out-pointers.
    let status =
        unsafe { tp_engine_classify_text(engine, task, text, &mut class, &mut probability) };
    (status, class, probability)
}

/// `tp_engine_task_label`: status and the label (None for NULL).
fn label(engine: *const TpEngine, task: usize, class: usize) -> (TpStatus, Option<String>) {
    let mut label: *const c_char = c"x".as_ptr();
    // SAFETY: a writable out-pointer.
    let status = unsafe { tp_engine_task_label(engine, task, class, &mut label) };
    // SAFETY: NULL or a NUL-terminated string owned by the live engine.
    let text = (!label.is_null()).then(|| {
        unsafe { CStr::from_ptr(label) }
            .to_str()
            .unwrap()
            .to_string()
    });
    (status, text)
}

#[test]
fn classify_text_gives_the_golden_label_and_probability() {
    let dir = tempfile::tempdir().unwrap();
    for task in ["mood", "topic"] {
        let open = Open::new(&compile_task(dir.path(), task, true));
        let mut count = 0;
        // SAFETY: a live engine, a writable count.
        expect(
            unsafe { tp_engine_task_label_count(open.0, 0, &mut count) },
            TP_OK,
        );
        let cases = goldens(task);
        for (text, class, name, probability) in &cases {
            let c_text = CString::new(text.as_str()).unwrap();
            let (status, got, p) = classify(open.0, 0, c_text.as_ptr());
            expect(status, TP_OK);
            assert_eq!(got, *class, "{task} {text:?}");
            assert!(
                (f64::from(p) - probability).abs() <= 1e-5,
                "{text:?}: {p} vs {probability}"
            );
            let (status, got) = label(open.0, 0, got);
            expect(status, TP_OK);
            assert_eq!(got.as_deref(), Some(name.as_str()));
        }
        assert_eq!(count, if task == "mood" { 2 } else { 3 });
    }
}

#[test]
fn classify_text_misuse_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let open = Open::new(&compile_task(dir.path(), "mood", true));
    let text = c"I love this pizza!";
    // NULL arguments: out-parameters are still reset.
    let (status, class, p) = classify(open.0, 0, null());
    expect(status, TP_NULL_ARGUMENT);
    assert_eq!((class, p), (usize::MAX, 0.0));
    expect(classify(null(), 0, text.as_ptr()).0, TP_NULL_ARGUMENT);
    let mut p = 0f32;
    // SAFETY: NULL `class` is what is tested; the rest is valid.
    let status = unsafe { tp_engine_classify_text(open.0, 0, text.as_ptr(), null_mut(), &mut p) };
    expect(status, TP_NULL_ARGUMENT);
    // A task out of range, a text that is not UTF-8.
    expect(classify(open.0, 1, text.as_ptr()).0, TP_UNKNOWN_TASK);
    let latin1 = c"caf\xe9";
    expect(classify(open.0, 0, latin1.as_ptr()).0, TP_INVALID_ARGUMENT);
    // Labels: past the end, task out of range, NULL out-pointer.
    let (status, got) = label(open.0, 0, 2);
    expect(status, TP_INVALID_ARGUMENT);
    assert_eq!(got, None);
    expect(label(open.0, 5, 0).0, TP_UNKNOWN_TASK);
    // SAFETY: NULL `label` is what is tested.
    expect(
        unsafe { tp_engine_task_label(open.0, 0, 0, null_mut()) },
        TP_NULL_ARGUMENT,
    );
    let mut count = 9;
    // SAFETY: a live engine, a writable count.
    expect(
        unsafe { tp_engine_task_label_count(open.0, 3, &mut count) },
        TP_UNKNOWN_TASK,
    );
    assert_eq!(count, 0);

    // A bundle without tokenizer: the text call is unsupported, the labels are still there.
    let bare = Open::new(&compile_task(dir.path(), "mood", false));
    let (status, class, _) = classify(bare.0, 0, text.as_ptr());
    assert_eq!(status, TP_UNSUPPORTED);
    let message = last_error();
    assert!(
        message.contains("has no tokenizer; compile it with --tokenizer"),
        "{message}"
    );
    assert_eq!(class, usize::MAX);
    assert_eq!(label(bare.0, 0, 1), (TP_OK, Some("positive".to_string())));
}

#[test]
fn c_program_classifies_text() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = compile_task(dir.path(), "topic", true);
    let cases = goldens("topic");
    let texts = dir.path().join("texts.txt");
    let lines: String = cases.iter().map(|(t, ..)| format!("{t}\n")).collect();
    std::fs::write(&texts, lines).unwrap();
    let exe = dir.path().join("text");
    build_c("text.c", &exe);
    let run = Command::new(&exe)
        .arg(bundle.to_str().unwrap())
        .arg("topic")
        .arg(&texts)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "text.c failed:\n{stdout}\n{stderr}");
    assert!(stderr.contains("0 failures"), "{stderr}");
    let got: Vec<&str> = stdout.lines().collect();
    assert_eq!(got.len(), cases.len(), "{stdout}");
    for (line, (text, class, name, probability)) in got.iter().zip(&cases) {
        let fields: Vec<&str> = line.split('\t').collect();
        assert_eq!(
            fields[..2],
            [class.to_string().as_str(), name.as_str()],
            "{text:?}: {line}"
        );
        let p: f64 = fields[2].parse().unwrap();
        assert!(
            (p - probability).abs() <= 1e-5,
            "{text:?}: {p} vs {probability}"
        );
    }
}
