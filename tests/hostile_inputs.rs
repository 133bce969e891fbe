//! Inputs to `run` from a hostile or careless user (issue 8): token ids outside the vocabulary,
//! a tokenizer that pads with an id that is no token, `.npy` / `.npz` files whose headers
//! declare more than they hold or more than the caps allow, a named pipe as `--input`, and the
//! backstop that turns a panic inside tract into an error. Each case gets a typed error (or one
//! line from the CLI), never a panic, an abort or a hang.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use taskpack::compile::{compile, CompileOptions};
use taskpack::format::Method;
use taskpack::npz::{self, Limits, Npz, NpzError};
use taskpack::runtime::{Bundle, Engine, EngineOptions, Error, TextClassifier};
use tract_onnx::prelude::*;

use crate::common::{assert_one_line_error, cli, cli_compile, demo};

fn text_models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/text")
}

/// The text family's `mood` task compiled alone into `dir/NAME.tpk`, with `tokenizer` (JSON).
fn text_bundle(dir: &Path, name: &str, tokenizer: Option<Vec<u8>>) -> PathBuf {
    let path = dir.join(format!("{name}.tpk"));
    let tasks = vec![("mood".to_string(), text_models().join("mood.onnx"))];
    let mut opts = CompileOptions::new(
        text_models().join("base.onnx"),
        tasks,
        Method::TaskArithmetic,
        &path,
    );
    opts.tokenizer = tokenizer;
    drop(compile(&opts, &mut |_| {}).unwrap());
    path
}

/// The family's tokenizer.json with `edit` applied.
fn tokenizer_with(edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let bytes = std::fs::read(text_models().join("tokenizer.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    edit(&mut json);
    serde_json::to_vec(&json).unwrap()
}

fn engine(path: &Path) -> Engine {
    Engine::new(
        Arc::new(Bundle::open(path).unwrap()),
        EngineOptions::default(),
    )
    .unwrap()
}

/// The three token inputs of the text family, in the engine's order, from `ids` and `types`
/// (one row), as `i64`.
fn token_inputs(engine: &Engine, task: usize, ids: &[i64], types: &[i64]) -> TVec<TValue> {
    engine
        .input_facts(task)
        .unwrap()
        .iter()
        .map(|f| {
            let values: Vec<i64> = match f.name.as_str() {
                "input_ids" => ids.to_vec(),
                "token_type_ids" => types.to_vec(),
                _ => vec![1; ids.len()],
            };
            Tensor::from_shape(&[1, ids.len()], &values)
                .unwrap()
                .into_tvalue()
        })
        .collect()
}

/// Writes the named arrays as an `.npz` (deflated).
fn write_npz(path: &Path, arrays: &[(&str, Tensor)]) {
    let mut npz = ndarray_npy::NpzWriter::new_compressed(std::fs::File::create(path).unwrap());
    for (name, t) in arrays {
        match t.datum_type() {
            DatumType::I64 => npz
                .add_array(*name, &t.to_plain_array_view::<i64>().unwrap())
                .unwrap(),
            DatumType::F32 => npz
                .add_array(*name, &t.to_plain_array_view::<f32>().unwrap())
                .unwrap(),
            other => panic!("{other:?}"),
        }
    }
    npz.finish().unwrap();
}

/// Item 4: before, `input_ids` = 5000 (61-word vocabulary) and `token_type_ids` = 9 (2 types)
/// panicked inside tract's Gather (exit 101).
#[test]
fn token_ids_outside_the_vocabulary_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = text_bundle(dir.path(), "text", None);
    let engine = engine(&path);
    let task = engine.task_index("mood").unwrap();
    // In range, counted from the end as ONNX allows, and the boundaries.
    for (ids, types) in [([2i64, 60, 3], [0i64, 1, 0]), ([2, -61, 3], [0, -2, 0])] {
        assert!(engine
            .run(task, token_inputs(&engine, task, &ids, &types))
            .is_ok());
    }
    for (ids, types, input, value, size) in [
        ([2i64, 5000, 3], [0i64, 0, 0], "input_ids", 5000, 61),
        ([2, 61, 3], [0, 0, 0], "input_ids", 61, 61),
        ([2, -62, 3], [0, 0, 0], "input_ids", -62, 61),
        ([2, 7, 3], [0, 9, 0], "token_type_ids", 9, 2),
    ] {
        let err = engine
            .run(task, token_inputs(&engine, task, &ids, &types))
            .unwrap_err();
        match &err {
            Error::IndexOutOfRange {
                task: t,
                input: i,
                value: v,
                size: s,
            } => assert_eq!(
                (t.as_str(), i.as_str(), *v, *s),
                ("mood", input, value, size)
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            err.to_string(),
            format!(
                "input {input:?} of task \"mood\": index {value} is out of range for a lookup \
                 table of {size} rows (a token id outside the vocabulary?)"
            )
        );
    }
    // The same through a bound task, and from the CLI on an .npz.
    let bound = engine.bind(task).unwrap();
    assert!(matches!(
        bound.run(token_inputs(&engine, task, &[5000], &[0])),
        Err(Error::IndexOutOfRange { value: 5000, .. })
    ));
    let ids = Tensor::from_shape(&[1, 3], &[2i64, 5000, 3]).unwrap();
    let ones = Tensor::from_shape(&[1, 3], &[1i64, 1, 1]).unwrap();
    let zeros = Tensor::from_shape(&[1, 3], &[0i64, 9, 0]).unwrap();
    let input = dir.path().join("ids.npz");
    write_npz(
        &input,
        &[
            ("input_ids", ids),
            ("attention_mask", ones),
            ("token_type_ids", zeros),
        ],
    );
    let (ok, _, stderr) = cli(&[
        "run",
        path.to_str().unwrap(),
        "--task",
        "mood",
        "--input",
        input.to_str().unwrap(),
    ]);
    assert_one_line_error(
        ok,
        &stderr,
        "index 5000 is out of range for a lookup table of 61 rows",
    );
}

/// Item 4: before, a tokenizer padding with id 4000000000 passed `verify` and panicked inside
/// tract under `run --text` (when texts of different lengths are padded).
#[test]
fn a_pad_id_that_is_no_token_is_refused_when_the_classifier_is_built() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = tokenizer_with(|t| {
        t["padding"] = serde_json::json!({
            "strategy": "BatchLongest", "direction": "Right", "pad_to_multiple_of": null,
            "pad_id": 4000000000u32, "pad_type_id": 0, "pad_token": "[PAD]"
        });
    });
    let path = text_bundle(dir.path(), "pad", Some(tokenizer));
    let err = TextClassifier::new(Arc::new(engine(&path))).unwrap_err();
    assert!(
        matches!(&err, Error::TokenizerParse { message } if message == "its pad id 4000000000 is not a token of its vocabulary (61 tokens)"),
        "{err}"
    );
    let (ok, _, stderr) = cli(&[
        "run",
        path.to_str().unwrap(),
        "--task",
        "mood",
        "--text",
        "i love this pizza",
        "--text",
        "bad",
    ]);
    assert_one_line_error(ok, &stderr, "its pad id 4000000000 is not a token");
}

/// A tokenizer whose vocabulary is larger than the graph's embedding: its ids are checked by
/// the engine before running (before: a panic inside tract).
#[test]
fn a_token_the_graph_has_no_embedding_for_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = tokenizer_with(|t| {
        t["added_tokens"] = serde_json::json!([{
            "id": 5000, "content": "[BIG]", "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true
        }]);
    });
    let path = text_bundle(dir.path(), "big", Some(tokenizer));
    let classifier = TextClassifier::new(Arc::new(engine(&path))).unwrap();
    let task = classifier.engine().task_index("mood").unwrap();
    assert!(classifier.classify(task, &["i love this pizza"]).is_ok());
    let err = classifier
        .classify(task, &["i love [BIG] pizza"])
        .unwrap_err();
    assert!(
        matches!(&err, Error::IndexOutOfRange { input, value: 61, size: 61, .. } if input == "input_ids"),
        "{err}"
    );
}

/// The bytes of an `.npy` file: a version 1.0 header for `descr` and `shape`, then `data`.
fn npy_bytes(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // Pad so that magic + version + length + dict + newline is a multiple of 64, as numpy does.
    while (10 + dict.len() + 1) % 64 != 0 {
        dict.push(' ');
    }
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&u16::try_from(dict.len()).unwrap().to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.extend_from_slice(data);
    out
}

/// An `.npz` holding the raw `.npy` bytes of each array (stored or deflated).
fn npz_bytes(entries: &[(&str, &[u8])], deflate: bool) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    {
        let mut zip = zip::ZipWriter::new(&mut out);
        let method = if deflate {
            zip::CompressionMethod::Deflated
        } else {
            zip::CompressionMethod::Stored
        };
        let options = zip::write::SimpleFileOptions::default().compression_method(method);
        for (name, bytes) in entries {
            zip.start_file(format!("{name}.npy"), options).unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap();
    }
    out.into_inner()
}

/// Item 5: before, a 12 KB `.npy` declaring shape (2^40, 1, 28, 28) aborted the process
/// ("memory allocation of 3448068464705536 bytes failed").
#[test]
fn an_npy_declaring_a_huge_shape_is_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let shape = "(1099511627776, 1, 28, 28)";
    let bytes = npy_bytes("<f4", shape, &[0u8; 12 << 10]);
    let npy = dir.path().join("huge.npy");
    std::fs::write(&npy, &bytes).unwrap();
    let available = 12 << 10;
    let declared = 3_448_068_464_705_536u64;
    let err = npz::read_npy(&npy, &Limits::default()).unwrap_err();
    match &err {
        NpzError::SizeMismatch {
            shape,
            dtype,
            declared: d,
            available: a,
            ..
        } => {
            assert_eq!(shape, &[1 << 40, 1, 28, 28]);
            assert_eq!(
                (*dtype, d.0, *a),
                (DatumType::F32, Some(declared), available)
            );
        }
        other => panic!("{other:?}"),
    }
    // The same array inside an .npz, stored and deflated.
    for deflate in [false, true] {
        let path = dir.path().join(format!("huge-{deflate}.npz"));
        std::fs::write(&path, npz_bytes(&[("image", &bytes)], deflate)).unwrap();
        let err = Npz::open(&path, &Limits::default())
            .unwrap()
            .read("image")
            .unwrap_err();
        assert!(
            matches!(&err, NpzError::SizeMismatch { declared, available: 12288, .. } if declared.0 == Some(declared_bytes())),
            "{err}"
        );
    }
    // A shape whose size overflows 64 bits, and a header claiming 4 GiB of header.
    let overflow = npy_bytes("<f8", "(4294967296, 4294967296)", &[]);
    std::fs::write(&npy, &overflow).unwrap();
    assert!(matches!(
        npz::read_npy(&npy, &Limits::default()),
        Err(NpzError::SizeMismatch { declared, .. }) if declared.0.is_none()
    ));
    let mut v2 = b"\x93NUMPY\x02\x00".to_vec();
    v2.extend_from_slice(&u32::MAX.to_le_bytes());
    std::fs::write(&npy, &v2).unwrap();
    assert!(matches!(
        npz::read_npy(&npy, &Limits::default()),
        Err(NpzError::Header { .. })
    ));

    // From the CLI: one line, no abort.
    let bundle = demo_bundle(dir.path());
    std::fs::write(&npy, &bytes).unwrap();
    let (ok, _, stderr) = cli(&[
        "run",
        bundle.to_str().unwrap(),
        "--task",
        "mnist",
        "--input",
        npy.to_str().unwrap(),
    ]);
    assert_one_line_error(
        ok,
        &stderr,
        "its header declares shape [1099511627776, 1, 28, 28] of F32 (3448068464705536 bytes) but \
         12288 bytes follow it",
    );
}

fn declared_bytes() -> u64 {
    (1u64 << 40) * 28 * 28 * 4
}

/// Three demo tasks compiled into `dir/demo.tpk`.
fn demo_bundle(dir: &Path) -> PathBuf {
    let path = dir.join("demo.tpk");
    let tasks = ["digits", "mnist"]
        .iter()
        .map(|t| (t.to_string(), demo().join(format!("{t}.onnx"))))
        .collect();
    let opts = CompileOptions::new(demo().join("base.onnx"), tasks, Method::Emr, &path);
    drop(compile(&opts, &mut |_| {}).unwrap());
    path
}

/// Item 6: a valid `.npz` whose data inflates beyond the cap (before: read whole, a 1 MB file
/// inflating to 1 GB panicked on allocation under `ulimit -v 4194304`) is refused before its
/// array is allocated; the cap counts all the arrays of a file and can be raised.
#[test]
fn an_npz_inflating_beyond_the_cap_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // 4 MiB of zeros: 4 KiB deflated.
    let zeros = Tensor::zero::<f32>(&[1024, 1, 32, 32]).unwrap();
    let path = dir.path().join("big.npz");
    write_npz(&path, &[("image", zeros.clone())]);
    assert!(std::fs::metadata(&path).unwrap().len() < 64 << 10);
    let limits = Limits::with_max_bytes(1 << 20);
    let err = Npz::open(&path, &limits)
        .unwrap()
        .read("image")
        .unwrap_err();
    assert!(
        matches!(&err, NpzError::TooLarge { bytes, limit, .. } if *bytes == 4 << 20 && *limit == 1 << 20),
        "{err}"
    );
    // Raised, it reads; two arrays of 4 MiB exceed a cap of 6 MiB together.
    let raised = Limits::with_max_bytes(6 << 20);
    let mut npz = Npz::open(&path, &raised).unwrap();
    assert_eq!(npz.read("image").unwrap(), zeros);
    assert!(matches!(
        npz.read("image"),
        Err(NpzError::TooLarge { bytes, .. }) if bytes == 8 << 20
    ));

    // From the CLI, with the cap lowered by --max-input-bytes (the default is 256 MiB).
    let bundle = demo_bundle(dir.path());
    let small = Tensor::zero::<f32>(&[300, 1, 28, 28]).unwrap();
    write_npz(&path, &[("image", small)]);
    let args = |cap: &'static str| {
        let mut a = vec![
            "run".to_string(),
            bundle.display().to_string(),
            "--task".into(),
            "mnist".into(),
            "--input".into(),
            path.display().to_string(),
        ];
        if !cap.is_empty() {
            a.extend(["--max-input-bytes".to_string(), cap.to_string()]);
        }
        a
    };
    let run = |a: Vec<String>| cli(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let (ok, _, stderr) = run(args("100000"));
    assert_one_line_error(
        ok,
        &stderr,
        "940800 bytes of data would exceed the limit of 100000 bytes of input (raise it with \
         --max-input-bytes)",
    );
    let (ok, stdout, stderr) = run(args(""));
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("input  image            F32 [300, 1, 28, 28]"),
        "{stdout}"
    );

    // The engine's own cap, on tensors a library caller built.
    let engine = Engine::new(
        Arc::new(Bundle::open(&bundle).unwrap()),
        EngineOptions::default().with_max_input_bytes(100_000),
    )
    .unwrap();
    let task = engine.task_index("mnist").unwrap();
    let x = Tensor::zero::<f32>(&[32, 1, 28, 28]).unwrap();
    assert!(matches!(
        engine.run(task, tvec!(x.into_tvalue())),
        Err(Error::InputTooLarge {
            bytes: 100_352,
            limit: 100_000,
            ..
        })
    ));
}

/// A zip entry that declares more than deflate can produce from its compressed bytes, or a
/// stored entry whose sizes disagree, is refused before reading it.
#[test]
fn an_npz_entry_with_implausible_sizes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let npy = npy_bytes("<f4", "(4,)", &[0u8; 16]);
    for deflate in [false, true] {
        let mut bytes = npz_bytes(&[("x", &npy)], deflate);
        // Patch the uncompressed size (local header offset 22, central directory offset 24).
        let huge = 1u32 << 30;
        for (signature, offset) in [(0x0403_4b50u32, 22), (0x0201_4b50, 24)] {
            let at = bytes
                .windows(4)
                .position(|w| w == signature.to_le_bytes())
                .unwrap();
            bytes[at + offset..at + offset + 4].copy_from_slice(&huge.to_le_bytes());
        }
        let path = dir.path().join("lying.npz");
        std::fs::write(&path, &bytes).unwrap();
        let err = Npz::open(&path, &Limits::default())
            .unwrap()
            .read("x")
            .unwrap_err();
        assert!(
            matches!(&err, NpzError::ImplausibleEntry { size, .. } if *size == u64::from(huge)),
            "deflate {deflate}: {err}"
        );
    }
}

/// Item 8 (`run --input`): before, a named pipe given as input blocked forever in its open.
#[test]
fn a_named_pipe_as_input_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("input.npz");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let err = Npz::open(&fifo, &Limits::default()).unwrap_err();
    assert!(matches!(&err, NpzError::NotAFile { .. }), "{err}");
    assert!(matches!(
        npz::read_npy(&fifo, &Limits::default()),
        Err(NpzError::NotAFile { .. })
    ));

    // The CLI, under a timeout so that a regression fails instead of hanging the suite.
    let bundle = demo_bundle(dir.path());
    let mut child = Command::new(env!("CARGO_BIN_EXE_taskpack"))
        .args([
            "run",
            bundle.to_str().unwrap(),
            "--task",
            "mnist",
            "--input",
        ])
        .arg(&fifo)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("taskpack run --input FIFO still blocks after 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_one_line_error(
        status.success(),
        &stderr,
        &format!("{} is not a regular file", fifo.display()),
    );
}

/// The one reader reads what numpy writes: every element type the CLI takes, C and Fortran
/// order, as its own tract type.
#[test]
fn the_reader_reads_numpy_files() {
    let dir = tempfile::tempdir().unwrap();
    let values: Vec<u8> = (0..6).collect();
    let cases: [(&str, Vec<u8>, DatumType); 4] = [
        (
            "<f4",
            [0f32, 1.5, -2.0, 3.0, 4.0, 5.0]
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
            DatumType::F32,
        ),
        (
            ">i8",
            (0i64..6).flat_map(|v| v.to_be_bytes()).collect(),
            DatumType::I64,
        ),
        ("|u1", values.clone(), DatumType::U8),
        ("|b1", vec![0, 1, 0, 1, 1, 0], DatumType::Bool),
    ];
    for (descr, data, dt) in cases {
        let path = dir.path().join("a.npy");
        std::fs::write(&path, npy_bytes(descr, "(2, 3)", &data)).unwrap();
        let t = npz::read_npy(&path, &Limits::default()).unwrap();
        assert_eq!(
            (t.datum_type(), t.shape()),
            (dt, &[2usize, 3][..]),
            "{descr}"
        );
    }
    // Fortran order: stored column by column, read back row-major.
    let mut bytes = npy_bytes("|u1", "(2, 3)", &values);
    let at = bytes.windows(5).position(|w| w == b"False").unwrap();
    bytes[at..at + 5].copy_from_slice(b"True ");
    let path = dir.path().join("f.npy");
    std::fs::write(&path, &bytes).unwrap();
    let t = npz::read_npy(&path, &Limits::default()).unwrap();
    let got: Vec<u8> = t
        .to_plain_array_view::<u8>()
        .unwrap()
        .iter()
        .copied()
        .collect();
    assert_eq!(got, [0, 2, 4, 1, 3, 5]);
    // Complex numbers are not taken; a truncated array is an error.
    std::fs::write(&path, npy_bytes("<c8", "(1,)", &[0; 8])).unwrap();
    assert!(matches!(
        npz::read_npy(&path, &Limits::default()),
        Err(NpzError::UnsupportedType { descr, .. }) if descr == "<c8"
    ));
    std::fs::write(&path, npy_bytes("<f4", "(3,)", &[0; 8])).unwrap();
    assert!(matches!(
        npz::read_npy(&path, &Limits::default()),
        Err(NpzError::SizeMismatch { available: 8, .. })
    ));
}

/// Found by the `text` fuzz target (docs/FUZZING.md): a tokenizer.json with a JSON syntax error
/// inside its `decoder` object makes the `tokenizers` crate panic (an `expect` in its decoder
/// helper) instead of returning an error. Before: `Error::EnginePanic` from the panic guard,
/// with the panic's message printed on stderr. Now the JSON is checked first, the same way by
/// the classifier and the compiler: a typed error, no panic.
#[test]
fn a_tokenizer_with_a_syntax_error_in_its_decoder_is_refused_without_a_panic() {
    let good = std::fs::read_to_string(text_models().join("tokenizer.json")).unwrap();
    let broken = good.replacen(
        "\"decoder\": {",
        "\"decoder\": {\n    \"type\":\"cake\": 51,",
        1,
    );
    assert_ne!(broken, good);
    let dir = tempfile::tempdir().unwrap();

    // The runtime: a bundle carrying it (written around the compiler, which refuses it).
    let valid = text_bundle(dir.path(), "valid", Some(good.into_bytes()));
    let bundle = crate::hostile_graphs::rewrite(&Bundle::read(&valid).unwrap(), |m, sections| {
        let id = m.tokenizer.unwrap() as usize;
        sections[id].1 = broken.clone().into_bytes();
    });
    let engine = Engine::new(Arc::new(bundle), EngineOptions::default()).unwrap();
    let err = TextClassifier::new(Arc::new(engine)).unwrap_err();
    assert!(
        matches!(&err, Error::TokenizerParse { message } if message.starts_with("it is not JSON: expected `,` or `}`")),
        "{err}"
    );

    // The compiler: one line, no panic message.
    let bad = dir.path().join("broken-tokenizer.json");
    std::fs::write(&bad, &broken).unwrap();
    let out = dir.path().join("out.tpk");
    let mood = text_models().join("mood.onnx");
    let (ok, _, stderr) = cli_compile(
        &text_models().join("base.onnx"),
        ("mood", &mood),
        &["--tokenizer", bad.to_str().unwrap()],
        &out,
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_one_line_error(ok, &stderr, "it is not JSON");
    assert!(!out.exists());
}
