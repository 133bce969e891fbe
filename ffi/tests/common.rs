//! Shared by the tests: the demo bundle, its test inputs and the outputs it must give.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use ndarray_npy::NpzReader;
use taskpack::{tp_last_error, TpStatus};
use taskpack_core::compile::{compile, CompileOptions};
use taskpack_core::format::Encoding;
use taskpack_core::format::Method;
use taskpack_core::runtime::Bundle;
use tract_onnx::prelude::*;

pub fn demo_models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/demo")
}

/// The demo tasks: every NAME.onnx but the base that has a NAME.test.npz, sorted.
pub fn demo_tasks() -> Vec<(String, PathBuf)> {
    let dir = demo_models();
    let mut tasks: Vec<(String, PathBuf)> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            let stem = p.file_stem()?.to_str()?.to_string();
            (p.extension()? == "onnx"
                && stem != "base"
                && dir.join(format!("{stem}.test.npz")).exists())
            .then_some((stem, p))
        })
        .collect();
    tasks.sort();
    assert!(tasks.len() >= 4, "the demo family has at least 4 tasks");
    tasks
}

/// The demo family compiled (TALL masks, the default method) into a bundle in a temporary
/// folder, which lives as long as this value.
pub struct Demo {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
    pub bundle: Bundle,
    pub tasks: Vec<String>,
}

impl Demo {
    pub fn new() -> Demo {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("demo.tpk");
        let tasks = demo_tasks();
        let opts = CompileOptions {
            delta_dtype: Encoding::F32,
            ..CompileOptions::new(
                demo_models().join("base.onnx"),
                tasks.clone(),
                Method::Tall,
                &path,
            )
        };
        let bundle = compile(&opts, &mut |_| {}).unwrap();
        Demo {
            dir,
            path,
            bundle,
            tasks: tasks.into_iter().map(|(name, _)| name).collect(),
        }
    }

    pub fn c_path(&self) -> CString {
        CString::new(self.path.to_str().unwrap()).unwrap()
    }

    /// The first `n` test images of `task` (`[n,1,28,28]`) and what the bundle's task gives
    /// for them: tract on the task exported to ONNX (`[n,classes]`).
    pub fn case(&self, task: &str, n: usize) -> Case {
        let file = std::fs::File::open(demo_models().join(format!("{task}.test.npz"))).unwrap();
        let images: tract_ndarray::ArrayD<f32> =
            NpzReader::new(file).unwrap().by_name("image").unwrap();
        let n = n.min(images.shape()[0]);
        let images = images
            .slice_axis(tract_ndarray::Axis(0), (0..n).into())
            .to_owned();
        let onnx = taskpack_core::export::export_task(&self.bundle, task).unwrap();
        let model = tract_onnx::onnx()
            .model_for_read(&mut &onnx[..])
            .unwrap()
            .with_input_fact(0, f32::fact(images.shape()).into())
            .unwrap()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap();
        let out = model
            .run(tvec!(Tensor::from(images.clone()).into()))
            .unwrap();
        let expected = out[0].to_plain_array_view::<f32>().unwrap();
        Case {
            input_shape: images.shape().iter().map(|&d| d as i64).collect(),
            input: images.iter().copied().collect(),
            expected_shape: expected.shape().iter().map(|&d| d as i64).collect(),
            expected: expected.iter().copied().collect(),
        }
    }
}

/// Inputs of one task and the outputs expected from them, flat.
pub struct Case {
    pub input: Vec<f32>,
    pub input_shape: Vec<i64>,
    pub expected: Vec<f32>,
    pub expected_shape: Vec<i64>,
}

/// Asserts that `got` is `want` within 1e-4 (relative to the magnitude, at least 1).
pub fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * w.abs().max(1.0),
            "{what}[{i}]: {g} vs {w}"
        );
    }
}

/// The calling thread's last error.
pub fn last_error() -> String {
    // SAFETY: tp_last_error never returns NULL and its string lives until the next call.
    unsafe { CStr::from_ptr(tp_last_error()) }
        .to_str()
        .unwrap()
        .to_string()
}

/// Asserts `status`, and that the last error is empty exactly on success.
#[track_caller]
pub fn expect(status: TpStatus, want: TpStatus) {
    let message = last_error();
    assert_eq!(status, want, "last error: {message}");
    assert_eq!(message.is_empty(), want == TpStatus::TP_OK, "{message}");
}

/// libtaskpack.a as an app gets it: `cargo build -p taskpack-ffi --lib` on its own, into
/// `target/app` (built once per test process; a no-op when it is current, as in CI, which builds
/// it before the tests). Not the copy `cargo test --workspace` leaves next to this test: one cargo
/// invocation unifies the features of every member, so that copy carries the compiler that the
/// CLI and these tests ask for.
pub fn static_library() -> PathBuf {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let target = workspace.join("target/app");
        let build = Command::new(env!("CARGO"))
            .args(["build", "-p", "taskpack-ffi", "--lib", "--target-dir"])
            .arg(&target)
            .current_dir(&workspace)
            .output()
            .expect("cannot run cargo");
        assert!(
            build.status.success(),
            "cargo build -p taskpack-ffi failed:\n{}",
            String::from_utf8_lossy(&build.stderr)
        );
        let lib = target.join("debug/libtaskpack.a");
        assert!(lib.exists(), "{} is missing", lib.display());
        lib
    })
    .clone()
}

/// Compiles `tests/c/{source}` with the system C compiler against libtaskpack.a into `exe`.
pub fn build_c(source: &str, exe: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cc = Command::new("cc")
        .args(["-std=c99", "-O1", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root.join("include"))
        .arg(root.join("tests/c").join(source))
        .arg(static_library())
        // noexecstack: tract's assembly kernels lack a .note.GNU-stack section, without which
        // the linker would make the stack executable.
        .args(["-lpthread", "-ldl", "-lm", "-Wl,-z,noexecstack", "-o"])
        .arg(exe)
        .output()
        .expect("cannot run cc");
    assert!(
        cc.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&cc.stderr)
    );
}

fn write_f32(path: &Path, values: &[f32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

/// The data folder the C programs demo.c and misuse.c read, made in `demo`'s folder: per task,
/// its first `n` test images (`NAME.input.f32`) and the outputs expected for them
/// (`NAME.expected.f32`), as raw little-endian floats, and `tasks.txt` with one line per task:
/// `NAME RANK DIMS... OUT_RANK OUT_DIMS...`.
pub fn write_demo_data(demo: &Demo, n: usize) -> PathBuf {
    let data = demo.dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut tasks = String::new();
    for name in &demo.tasks {
        let case = demo.case(name, n);
        write_f32(&data.join(format!("{name}.input.f32")), &case.input);
        write_f32(&data.join(format!("{name}.expected.f32")), &case.expected);
        let dims = |shape: &[i64]| {
            let dims: Vec<String> = shape.iter().map(i64::to_string).collect();
            format!("{} {}", shape.len(), dims.join(" "))
        };
        tasks += &format!(
            "{name} {} {}\n",
            dims(&case.input_shape),
            dims(&case.expected_shape)
        );
    }
    std::fs::write(data.join("tasks.txt"), tasks).unwrap();
    data
}

/// Builds the C program `source` (ffi/tests/c/) against the static library, runs it on the demo
/// bundle and `data`, and returns its standard output after checking that it exited with success
/// and reported `, 0 failures`.
pub fn run_c_program(source: &str, demo: &Demo, data: &Path) -> String {
    let exe = demo.dir.path().join(source.trim_end_matches(".c"));
    build_c(source, &exe);
    let run = std::process::Command::new(&exe)
        .arg(&demo.path)
        .arg(data)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&run.stderr);
    println!("{stdout}");
    assert!(
        run.status.success(),
        "{source} failed ({}):\n{stdout}\n{stderr}",
        run.status
    );
    assert!(stdout.contains(", 0 failures"), "{stdout}");
    stdout
}
