//! Output and input files as a careless or hostile user gives them (issue 8, items 1–3, 8 and
//! 11): special files and symbolic links as outputs, an output that is one of the inputs, a
//! signal in the middle of a compile, named pipes as inputs, argument errors and a damaged
//! safetensors file. Every CLI run has a deadline: a hang fails the test (after killing the
//! child) instead of blocking the suite.

use std::fs;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use prost::Message;
use taskpack::compile::CompileError;
use taskpack::internals::Checkpoint;
use tract_onnx::pb::tensor_proto::{DataLocation, DataType};
use tract_onnx::pb::{StringStringEntryProto, TensorProto};

use crate::common::{demo, matmul_model};
use crate::readers::value_info;
use tract_onnx::prelude::tract_ndarray;

/// Longest a CLI run may take here (a debug build on a loaded 2-core machine); every run that
/// is expected to succeed or fail takes well under a second of work.
const DEADLINE: Duration = Duration::from_secs(90);

/// What a CLI run did.
struct Run {
    /// Exit status (`None`: killed by a signal).
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Starts the CLI with stdin closed and stdout/stderr captured in anonymous files.
fn spawn(args: &[&str]) -> (std::process::Child, fs::File, fs::File) {
    let out = tempfile::tempfile().unwrap();
    let err = tempfile::tempfile().unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_taskpack"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap())
        .spawn()
        .unwrap();
    (child, out, err)
}

/// Waits for the child until the deadline; kills it and fails the test if it is still running.
fn finish(mut child: std::process::Child, mut out: fs::File, mut err: fs::File) -> Run {
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            panic!("taskpack did not finish within {DEADLINE:?} (hangs)");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let read = |f: &mut fs::File| {
        f.rewind().unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        s
    };
    Run {
        code: status.code(),
        stdout: read(&mut out),
        stderr: read(&mut err),
    }
}

/// Runs the CLI to completion (or the deadline).
fn taskpack(args: &[&str]) -> Run {
    let (child, out, err) = spawn(args);
    finish(child, out, err)
}

/// The run failed normally (exit 1) with one line on stderr that contains every needle.
fn assert_one_line_error(run: &Run, needles: &[&str]) {
    assert_eq!(run.code, Some(1), "exit status; stderr: {}", run.stderr);
    assert_eq!(
        run.stderr.trim_end().lines().count(),
        1,
        "one line: {:?}",
        run.stderr
    );
    assert!(run.stderr.starts_with("error: "), "{:?}", run.stderr);
    for needle in needles {
        assert!(
            run.stderr.contains(needle),
            "{needle:?} in {:?}",
            run.stderr
        );
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Sorted names in a folder.
fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[cfg(unix)]
fn mkfifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

#[cfg(unix)]
fn is_fifo(path: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_fifo())
}

/// A bundle of the demo base with the mnist task, compiled by the CLI into `dir/b.tpk`.
fn demo_bundle(dir: &Path) -> PathBuf {
    let out = dir.join("b.tpk");
    let run = taskpack(&[
        "compile",
        "--base",
        &s(&demo().join("base.onnx")),
        "--task",
        &format!("mnist={}", s(&demo().join("mnist.onnx"))),
        "-o",
        &s(&out),
    ]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    out
}

/// The first rows of the mnist test images as `dir/x.npz` (array `image`), for `run --input`.
fn demo_input(dir: &Path) -> PathBuf {
    use ndarray_npy::{NpzReader, NpzWriter};
    let mut npz = NpzReader::new(fs::File::open(demo().join("mnist.test.npz")).unwrap()).unwrap();
    let image: tract_ndarray::ArrayD<f32> = npz.by_name("image").unwrap();
    let rows = image.slice_axis(tract_ndarray::Axis(0), (0..2).into());
    let path = dir.join("x.npz");
    let mut w = NpzWriter::new(fs::File::create(&path).unwrap());
    w.add_array("image", &rows).unwrap();
    w.finish().unwrap();
    path
}

fn compile_args<'a>(base: &'a str, task: &'a str, out: &'a str) -> Vec<&'a str> {
    vec!["compile", "--base", base, "--task", task, "-o", out]
}

// ---------------------------------------------------------------------------------------------
// Item 1: an existing destination that is not a regular file is refused and left as it is.

#[cfg(unix)]
#[test]
fn special_file_outputs_are_refused_and_left_as_they_are() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = demo_bundle(dir.path());
    let input = demo_input(dir.path());
    let base = s(&demo().join("base.onnx"));
    let task = format!("mnist={}", s(&demo().join("mnist.onnx")));
    let fifo = dir.path().join("out.fifo");
    mkfifo(&fifo);
    let null_link = dir.path().join("null.link");
    std::os::unix::fs::symlink("/dev/null", &null_link).unwrap();
    let dangling = dir.path().join("dangling.link");
    std::os::unix::fs::symlink(dir.path().join("nothing"), &dangling).unwrap();
    let folder = dir.path().join("folder");
    fs::create_dir(&folder).unwrap();
    let before = entries(dir.path());

    let b = s(&bundle);
    let x = s(&input);
    let models = s(&demo());
    for (out, needle) in [
        (&fifo, "is a FIFO (named pipe), not a regular file"),
        (&null_link, "is a character device, not a regular file"),
        (&dangling, "is a symbolic link to a missing file"),
        (&folder, "is a directory, not a regular file"),
    ] {
        let o = s(out);
        let commands: [Vec<&str>; 4] = [
            vec!["export", &b, "--task", "mnist", "-o", &o],
            compile_args(&base, &task, &o),
            vec!["run", &b, "--task", "mnist", "--input", &x, "--output", &o],
            vec!["demo", "--models", &models, "-o", &o],
        ];
        for args in commands {
            let run = taskpack(&args);
            assert_one_line_error(&run, &[&o, needle]);
            assert_eq!(entries(dir.path()), before, "{args:?} left files");
        }
    }
    assert!(is_fifo(&fifo), "the FIFO is still a FIFO");
    assert_eq!(
        fs::read_link(&null_link).unwrap(),
        Path::new("/dev/null"),
        "the link still points to /dev/null"
    );
    assert!(fs::symlink_metadata(&dangling).unwrap().is_symlink());
    assert!(entries(&folder).is_empty());
    {
        use std::os::unix::fs::FileTypeExt;
        assert!(fs::metadata("/dev/null")
            .unwrap()
            .file_type()
            .is_char_device());
    }
}

/// A character device made with mknod (root only; skipped where mknod is not allowed).
#[cfg(unix)]
#[test]
fn a_character_device_output_is_refused() {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileTypeExt;
    let dir = tempfile::tempdir().unwrap();
    let dev = dir.path().join("null.dev");
    let c = std::ffi::CString::new(dev.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call; mknod reads nothing else.
    let made = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) };
    if made != 0 {
        eprintln!(
            "skipped: mknod is not allowed here ({})",
            std::io::Error::last_os_error()
        );
        return;
    }
    let bundle = demo_bundle(dir.path());
    let run = taskpack(&["export", &s(&bundle), "--task", "mnist", "-o", &s(&dev)]);
    assert_one_line_error(&run, &["is a character device"]);
    assert!(fs::symlink_metadata(&dev)
        .unwrap()
        .file_type()
        .is_char_device());
}

/// A symbolic link to a regular file is followed: the target is replaced, the link kept.
#[cfg(unix)]
#[test]
fn a_symlinked_output_replaces_its_target_and_keeps_the_link() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = demo_bundle(dir.path());
    let plain = dir.path().join("plain.onnx");
    let run = taskpack(&["export", &s(&bundle), "--task", "mnist", "-o", &s(&plain)]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);

    let sub = dir.path().join("sub");
    fs::create_dir(&sub).unwrap();
    let target = sub.join("target.onnx");
    fs::write(&target, b"old").unwrap();
    let link = dir.path().join("link.onnx");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let run = taskpack(&["export", &s(&bundle), "--task", "mnist", "-o", &s(&link)]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(fs::read_link(&link).unwrap(), target);
    assert_eq!(fs::read(&target).unwrap(), fs::read(&plain).unwrap());
    assert_eq!(entries(&sub), ["target.onnx"]);
}

// ---------------------------------------------------------------------------------------------
// Item 2: the output may not be one of the inputs.

/// y = MatMul(x, W) with x: [1, rows], W: [rows, cols] f32 stored as external data in `w.bin`
/// of the model's folder (`values` written, or a sparse file of zeros when `None`).
fn external_model(dir: &Path, rows: usize, cols: usize, values: Option<&[f32]>) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let bytes = (rows * cols * 4) as u64;
    let data = dir.join("w.bin");
    match values {
        Some(v) => fs::write(
            &data,
            v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<_>>(),
        )
        .unwrap(),
        None => fs::File::create(&data).unwrap().set_len(bytes).unwrap(),
    }
    let kv = |k: &str, v: String| StringStringEntryProto {
        key: k.into(),
        value: v,
    };
    let w = TensorProto {
        name: "W".into(),
        dims: vec![rows as i64, cols as i64],
        data_type: DataType::Float as i32,
        data_location: Some(DataLocation::External as i32),
        external_data: vec![
            kv("location", "w.bin".into()),
            kv("offset", "0".into()),
            kv("length", bytes.to_string()),
        ],
        ..Default::default()
    };
    let model = matmul_model(
        w,
        value_info("x", &[1, rows as i64]),
        value_info("y", &[1, cols as i64]),
    );
    let path = dir.join("m.onnx");
    fs::write(&path, model.encode_to_vec()).unwrap();
    path
}

#[test]
fn the_output_may_not_be_an_input() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Copies of the demo checkpoints, so that a failure cannot damage the repository.
    let base = d.join("base.onnx");
    let mnist = d.join("mnist.onnx");
    fs::copy(demo().join("base.onnx"), &base).unwrap();
    fs::copy(demo().join("mnist.onnx"), &mnist).unwrap();
    let graph = d.join("graph.onnx");
    fs::copy(demo().join("base.onnx"), &graph).unwrap();
    let hard = d.join("hard.onnx");
    fs::hard_link(&base, &hard).unwrap();
    let tokenizer = d.join("tokenizer.json");
    fs::write(&tokenizer, b"{}").unwrap();
    let labels = d.join("mnist.labels");
    fs::write(&labels, b"0\n1\n2\n3\n4\n5\n6\n7\n8\n9\n").unwrap();
    let calib = d.join("calib.npz");
    fs::write(&calib, b"not read").unwrap();
    let bundle = demo_bundle(d);
    let input = demo_input(d);
    let snapshot =
        |paths: &[&Path]| -> Vec<Vec<u8>> { paths.iter().map(|p| fs::read(p).unwrap()).collect() };
    let all: [&Path; 8] = [
        &base, &mnist, &graph, &tokenizer, &labels, &calib, &bundle, &input,
    ];
    let before = snapshot(&all);
    let names = entries(d);

    let (b, t) = (s(&base), format!("mnist={}", s(&mnist)));
    let extra = |flag: &'static str, value: String| (flag, value);
    for (out, flag) in [
        (&base, None),
        (&mnist, None),
        (&hard, None),
        (&graph, Some(extra("--graph", s(&graph)))),
        (&tokenizer, Some(extra("--tokenizer", s(&tokenizer)))),
        (
            &labels,
            Some(extra("--labels", format!("mnist={}", s(&labels)))),
        ),
        (
            &calib,
            Some(extra("--calib", format!("mnist={}", s(&calib)))),
        ),
    ] {
        let o = s(out);
        let mut args = compile_args(&b, &t, &o);
        if let Some((flag, value)) = &flag {
            args.extend([*flag, value.as_str()]);
        }
        let run = taskpack(&args);
        assert_one_line_error(&run, &["the output", &o, "is the input"]);
    }
    let (bs, xs) = (s(&bundle), s(&input));
    let run = taskpack(&["export", &bs, "--task", "mnist", "-o", &bs]);
    assert_one_line_error(&run, &["is the input", &bs]);
    for out in [&bs, &xs] {
        let run = taskpack(&[
            "run", &bs, "--task", "mnist", "--input", &xs, "--output", out,
        ]);
        assert_one_line_error(&run, &["is the input", out]);
    }
    assert_eq!(snapshot(&all), before, "no input changed");
    assert_eq!(entries(d), names, "no file left or removed");
}

/// An external data file of a checkpoint is an input too (checked by the library once the
/// checkpoint is open).
#[test]
fn the_output_may_not_be_an_external_data_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = external_model(
        &dir.path().join("base"),
        2,
        3,
        Some(&[1.0f32, 2., 3., 4., 5., 6.][..]),
    );
    let task = external_model(
        &dir.path().join("task"),
        2,
        3,
        Some(&[1.0f32, 2., 3., 4., 5., 7.][..]),
    );
    let data = dir.path().join("task").join("w.bin");
    let before = fs::read(&data).unwrap();
    let opts = taskpack::compile::CompileOptions::new(
        &base,
        vec![("t".into(), task.clone())],
        taskpack::format::Method::TaskArithmetic,
        &data,
    );
    let err = taskpack::compile::compile(&opts, &mut |_| {}).unwrap_err();
    assert!(
        matches!(
            err,
            CompileError::File(taskpack::files::FileError::OutputIsInput { ref input, .. })
                if input.ends_with("task/w.bin")
        ),
        "{err}"
    );
    let run = taskpack(&compile_args(
        &s(&base),
        &format!("t={}", s(&task)),
        &s(&data),
    ));
    assert_one_line_error(&run, &["is the input", "w.bin"]);
    assert_eq!(fs::read(&data).unwrap(), before);
    assert_eq!(entries(&dir.path().join("task")), ["m.onnx", "w.bin"]);
}

// ---------------------------------------------------------------------------------------------
// Item 3: SIGINT / SIGTERM / SIGHUP during a compile leave no temporary file.

/// Sends each signal to a compile that is writing its temporary file (a 64 MiB sparse weight per
/// checkpoint keeps it busy for a good while after the file appears) and checks the exit status
/// (128 + signal) and that the output folder is empty.
#[cfg(unix)]
#[test]
fn a_signal_during_compile_leaves_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = external_model(&dir.path().join("base"), 4096, 4096, None);
    let task = external_model(&dir.path().join("task"), 4096, 4096, None);
    let out_dir = dir.path().join("out");
    fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("out.tpk");
    for (signal, status) in [
        (libc::SIGTERM, 143),
        (libc::SIGINT, 130),
        (libc::SIGHUP, 129),
    ] {
        let (child, o, e) = spawn(&compile_args(
            &s(&base),
            &format!("t={}", s(&task)),
            &s(&out),
        ));
        let start = Instant::now();
        let temp_seen = loop {
            let seen = entries(&out_dir)
                .iter()
                .any(|n| n.starts_with(".out.tpk.tmp."));
            if seen || start.elapsed() > DEADLINE {
                break seen;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        let pid = libc::pid_t::try_from(child.id()).unwrap();
        // SAFETY: plain syscall on the pid of our own child, which has not been reaped yet.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
        let run = finish(child, o, e);
        assert!(temp_seen, "the compile never created its temporary file");
        assert_eq!(run.code, Some(status), "signal {signal}: {}", run.stderr);
        assert!(
            entries(&out_dir).is_empty(),
            "signal {signal} left {:?}",
            entries(&out_dir)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Item 8: a named pipe as an input is refused at once.

#[cfg(unix)]
#[test]
fn a_fifo_as_input_is_refused_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fifo = d.join("pipe");
    mkfifo(&fifo);
    let out = d.join("out.tpk");
    let (o, p) = (s(&out), s(&fifo));
    let base = s(&demo().join("base.onnx"));
    let task = format!("mnist={}", s(&demo().join("mnist.onnx")));
    let fifo_task = format!("mnist={p}");
    // External data that is a FIFO in the model's folder.
    let ext = external_model(&d.join("ext"), 2, 3, Some(&[1.0f32; 6][..]));
    fs::remove_file(d.join("ext/w.bin")).unwrap();
    mkfifo(&d.join("ext/w.bin"));
    let ext_base = external_model(&d.join("ext_base"), 2, 3, Some(&[0.0f32; 6][..]));
    let ext_task = format!("t={}", s(&ext));
    let eb = s(&ext_base);
    let labels = format!("mnist={p}");
    let st_base = s(&demo().join("base.safetensors"));
    let st_task = format!("mnist={}", s(&demo().join("mnist.safetensors")));

    let cases: Vec<Vec<&str>> = vec![
        compile_args(&p, &task, &o),
        compile_args(&base, &fifo_task, &o),
        compile_args(&eb, &ext_task, &o),
        [compile_args(&st_base, &st_task, &o), vec!["--graph", &p]].concat(),
        [compile_args(&base, &task, &o), vec!["--tokenizer", &p]].concat(),
        [compile_args(&base, &task, &o), vec!["--labels", &labels]].concat(),
    ];
    for args in cases {
        let run = taskpack(&args);
        assert_one_line_error(&run, &["is a FIFO (named pipe), not a regular file"]);
        assert!(!out.exists(), "{args:?}");
        assert_eq!(entries(d), ["ext", "ext_base", "pipe"], "{args:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Item 11: argument errors on one line; a damaged safetensors file reported as such.

#[test]
fn usage_errors_are_one_line_with_status_2() {
    for args in [
        vec!["compile", "--base", "b.onnx"],
        vec!["frobnicate"],
        vec!["export", "x.tpk", "--task"],
        vec![
            "compile", "--base", "b", "--task", "t=x", "-o", "o", "--method", "nope",
        ],
    ] {
        let run = taskpack(&args);
        assert_eq!(run.code, Some(2), "{args:?}: {}", run.stderr);
        assert_eq!(run.stderr.lines().count(), 1, "{args:?}: {:?}", run.stderr);
        assert!(
            run.stderr.starts_with("error: ") && run.stderr.contains("--help"),
            "{:?}",
            run.stderr
        );
    }
    let run = taskpack(&["compile", "--base", "b.onnx"]);
    assert!(
        run.stderr.contains("--task <NAME=PATH>") && run.stderr.contains("taskpack compile --help"),
        "{}",
        run.stderr
    );
    // Help and version still print as usual, with status 0.
    let run = taskpack(&["--help"]);
    assert_eq!(run.code, Some(0));
    assert!(run.stdout.contains("Usage: taskpack") && run.stdout.lines().count() > 5);
    let run = taskpack(&["compile", "--help"]);
    assert_eq!(run.code, Some(0));
    assert!(run.stdout.contains("--base <BASE>"), "{}", run.stdout);
    let run = taskpack(&["--version"]);
    assert_eq!(run.code, Some(0));
    assert_eq!(
        run.stdout.trim(),
        format!("taskpack {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn a_damaged_safetensors_file_is_reported_as_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    let good = fs::read(demo().join("mnist.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap());
    assert!(header_len > 40);
    // Cut inside the JSON header: the declared header runs past the end of the file.
    let cut = &good[..24];
    let graph = demo().join("mnist.onnx");
    for name in ["cut.safetensors", "cut.bin"] {
        let path = dir.path().join(name);
        fs::write(&path, cut).unwrap();
        for g in [None, Some(graph.as_path())] {
            let err = Checkpoint::open(&path, g).unwrap_err();
            assert!(
                matches!(err, CompileError::Safetensors { path: ref p, .. } if p == &path),
                "{name}: {err}"
            );
            assert!(
                err.to_string().contains("is not a valid safetensors file"),
                "{err}"
            );
        }
    }
    // Named .safetensors but not one at all.
    let text = dir.path().join("notes.safetensors");
    fs::write(&text, b"hello").unwrap();
    let err = Checkpoint::open(&text, None).unwrap_err();
    assert!(matches!(err, CompileError::Safetensors { .. }), "{err}");

    let run = taskpack(&[
        "compile",
        "--base",
        &s(&demo().join("base.safetensors")),
        "--task",
        &format!("mnist={}", s(&dir.path().join("cut.bin"))),
        "--graph",
        &s(&demo().join("base.onnx")),
        "-o",
        &s(&dir.path().join("o.tpk")),
    ]);
    assert_one_line_error(&run, &["cut.bin is not a valid safetensors file"]);
    assert!(!run.stderr.contains("ONNX"), "{}", run.stderr);
}

#[test]
fn a_fifo_as_bundle_is_refused_without_hanging() {
    // Every command that reads a bundle, mapped or read into memory.
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe.tpk");
    mkfifo(&fifo);
    let p = s(&fifo);
    let out = s(&dir.path().join("out.onnx"));
    let cases: [Vec<&str>; 5] = [
        vec!["verify", &p],
        vec!["verify", &p, "--no-mmap"],
        vec!["inspect", &p],
        vec!["export", &p, "--task", "mnist", "-o", &out],
        vec!["run", &p, "--task", "mnist", "--text", "hi"],
    ];
    for args in cases {
        let run = taskpack(&args);
        assert_one_line_error(&run, &["is a FIFO (named pipe), not a regular file"]);
        assert!(is_fifo(&fifo), "{args:?}");
    }
    // The library gives an I/O error (C: TP_IO), not a bundle-format error.
    for result in [
        taskpack::runtime::Bundle::open(&fifo),
        taskpack::runtime::Bundle::read(&fifo),
    ] {
        let err = result.unwrap_err();
        assert!(
            matches!(&err, taskpack::runtime::Error::Io { action: "open", .. }),
            "{err}"
        );
    }
}

/// The one atomic writer (`files::AtomicFile`) syncs the temporary file before renaming it into
/// place, and the folder after: watched with strace (`-y` prints each descriptor's path) on a
/// real `taskpack export`. An export that renamed without syncing could leave an empty or
/// partial file under the final name after a power loss. CI installs strace (.ci/run).
#[cfg(target_os = "linux")]
#[test]
fn the_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after() {
    if Command::new("strace").arg("-V").output().is_err() {
        eprintln!("skipped: strace is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // strace prints descriptors' paths resolved: resolve the folder's too.
    let root = fs::canonicalize(dir.path()).unwrap();
    let bundle = demo_bundle(&root);
    let out = root.join("mnist.onnx");
    let log = root.join("strace.log");
    let status = Command::new("strace")
        .args([
            "-f",
            "-y",
            "-qq",
            "-e",
            "trace=fsync,fdatasync,rename,renameat,renameat2",
        ])
        .arg("-o")
        .arg(&log)
        .arg(env!("CARGO_BIN_EXE_taskpack"))
        .args(["export", &s(&bundle), "--task", "mnist", "-o", &s(&out)])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let log = fs::read_to_string(&log).unwrap();
    let calls: Vec<&str> = log.lines().collect();
    let rename = calls
        .iter()
        .position(|l| l.contains("rename") && l.contains(&format!("\"{}\"", s(&out))))
        .unwrap_or_else(|| panic!("no rename onto {}:\n{log}", s(&out)));
    let synced = |l: &str, path: &str| {
        (l.contains("fsync(") || l.contains("fdatasync(")) && l.contains(&format!("<{path}>"))
    };
    // The temporary file: the rename's source, `.mnist.onnx.tmp.…` in the same folder.
    let temp = calls[rename]
        .split('"')
        .find(|p| p.contains(".mnist.onnx.tmp"))
        .unwrap_or_else(|| panic!("no temporary file in {:?}", calls[rename]));
    assert!(
        calls[..rename].iter().any(|l| synced(l, temp)),
        "the temporary file is not synced before the rename:\n{log}"
    );
    assert!(
        calls[rename..].iter().any(|l| synced(l, &s(&root))),
        "the folder is not synced after the rename:\n{log}"
    );
}

/// Output into a closed pipe (`taskpack inspect x.tpk | head -0`) ends the process quietly by
/// SIGPIPE, as `cat` would: no panic message, no exit status 101.
#[cfg(unix)]
#[test]
fn a_closed_stdout_ends_the_process_without_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let bundle = demo_bundle(dir.path());
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_taskpack"))
        .args(["inspect", &s(&bundle)])
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?}: {stderr}",
        out.status
    );
}
