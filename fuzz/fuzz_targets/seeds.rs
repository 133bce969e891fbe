//! Not a fuzzer: writes the seed corpora of every fuzz target into `fuzz/corpus/<target>/`
//! from the fixture bundles (`fuzz/bundles/`) and the models of `models/`, on its first input.
//! `fuzz/seeds.sh` runs it once (`cargo fuzz run seeds -- -runs=1`): as a fuzz target it shares
//! the fuzz build instead of needing a second, uninstrumented build of tract. See
//! docs/FUZZING.md.
#![no_main]

use std::fs;
use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use prost::Message;
use taskpack::format::parse;
use taskpack::internals::{decode_model, scan_model, strip_float_initializers, TensorProto};
use taskpack_fuzz::{DEMO_BUNDLE, TEXT_BUNDLE};

fn write(dir: &Path, name: &str, parts: &[&[u8]]) {
    fs::create_dir_all(dir).expect("corpus directory");
    fs::write(dir.join(name), parts.concat()).expect("seed written");
}

fuzz_target!(|_data: &[u8]| {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(write_seeds);
});

fn write_seeds() {
    let fuzz = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let models = fuzz.join("../models");
    let corpus = fuzz.join("corpus");
    let bundles = [("text", TEXT_BUNDLE), ("demo", DEMO_BUNDLE)];

    // bundle: the two bundles as they are.
    for (name, b) in bundles {
        write(&corpus.join("bundle"), &format!("{name}.tpk"), &[b]);
    }

    // engine: whole bundles (mode 2t: task t) and each stored graph alone (mode 1 | 2 | g << 2).
    for (name, b) in bundles {
        let tasks = parse(b).expect("fixture").manifest().tasks.len();
        for t in 0..tasks.min(2) {
            write(
                &corpus.join("engine"),
                &format!("{name}-task{t}"),
                &[&[(t as u8) << 1], b],
            );
        }
    }
    for (i, (name, b)) in bundles.iter().enumerate() {
        let parsed = parse(b).expect("fixture");
        for (g, entry) in parsed.manifest().graphs.iter().enumerate() {
            let graph = parsed.section(b, entry.section).expect("graph section");
            let mode = 1 | (i as u8) << 1 | (g as u8) << 2;
            write(
                &corpus.join("engine"),
                &format!("{name}-graph{g}"),
                &[&[mode], graph],
            );
        }
    }

    // onnx_scan: the text checkpoints, one demo checkpoint, and their stripped graphs.
    for file in [
        "text/base.onnx",
        "text/mood.onnx",
        "text/topic.onnx",
        "demo/parity.onnx",
    ] {
        let bytes = fs::read(models.join(file)).expect("model file");
        let name = file.replace('/', "-");
        write(&corpus.join("onnx_scan"), &name, &[&bytes]);
        let scanned = scan_model(&bytes).expect("model scans");
        let stripped = strip_float_initializers(&scanned.skeleton);
        write(
            &corpus.join("onnx_scan"),
            &format!("{name}.stripped"),
            &[&stripped],
        );
    }

    // onnx_scan: the text base model with its weights in typed fields instead of raw_data:
    // float_data (FLOAT), and int32_data holding bf16 bits (BFLOAT16).
    let base = fs::read(models.join("text/base.onnx")).expect("model file");
    for (name, bf16) in [("typed-f32", false), ("typed-bf16", true)] {
        let mut model = decode_model(&base).expect("model decodes");
        for t in model
            .graph
            .iter_mut()
            .flat_map(|g| g.initializer.iter_mut())
        {
            if t.data_type != 1 {
                continue;
            }
            let values: Vec<f32> = t
                .raw_data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            *t = if bf16 {
                TensorProto {
                    data_type: 16,
                    int32_data: values.iter().map(|v| (v.to_bits() >> 16) as i32).collect(),
                    raw_data: Vec::new(),
                    ..t.clone()
                }
            } else {
                TensorProto {
                    float_data: values,
                    raw_data: Vec::new(),
                    ..t.clone()
                }
            };
        }
        write(&corpus.join("onnx_scan"), name, &[&model.encode_to_vec()]);
    }

    // text: texts for each task, and the tokenizer.json for each task.
    let texts =
        "I love this pizza!\nThe game was terrible.\nthe pizza was good but the game was bad";
    let tokenizer = fs::read(models.join("text/tokenizer.json")).expect("tokenizer.json");
    for t in 0..2u8 {
        write(
            &corpus.join("text"),
            &format!("texts-task{t}"),
            &[&[t << 1], texts.as_bytes()],
        );
        write(
            &corpus.join("text"),
            &format!("tokenizer-task{t}"),
            &[&[1 | t << 1], &tokenizer],
        );
    }
    // npz: mode byte 0 = .npy, 1 = .npz. Small hand-made .npy files of several types, shapes
    // and orders, and two of the demo's test sets (deflated zip entries).
    let npy = |descr: &str, fortran: bool, shape: &str, data: &[u8]| -> Vec<u8> {
        let dict = format!(
            "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
            if fortran { "True" } else { "False" }
        );
        let mut header = dict.into_bytes();
        while (10 + header.len() + 1) % 64 != 0 {
            header.push(b' ');
        }
        header.push(b'\n');
        let len = u16::try_from(header.len()).expect("short header");
        [b"\x93NUMPY\x01\x00".as_slice(), &len.to_le_bytes(), &header, data].concat()
    };
    let f32s: Vec<u8> = (0..6).flat_map(|i| (i as f32 * 0.5).to_le_bytes()).collect();
    let i64s: Vec<u8> = (0..4).flat_map(|i| (i as i64 - 1).to_le_bytes()).collect();
    let seeds = [
        ("f32-2x3", npy("<f4", false, "(2, 3)", &f32s)),
        ("f32-3x2-fortran", npy("<f4", true, "(3, 2)", &f32s)),
        ("i64-4", npy("<i8", false, "(4,)", &i64s)),
        ("u8-scalar", npy("|u1", false, "()", &[7])),
        ("f64-empty", npy("<f8", false, "(0, 5)", &[])),
    ];
    for (name, bytes) in &seeds {
        write(&corpus.join("npz"), &format!("npy-{name}"), &[&[0], bytes]);
    }
    for name in ["mnist", "parity"] {
        let bytes = fs::read(models.join(format!("demo/{name}.test.npz"))).expect("demo npz");
        write(&corpus.join("npz"), &format!("npz-{name}"), &[&[1], &bytes]);
    }
    println!("seeds written to {}", corpus.display());
}
