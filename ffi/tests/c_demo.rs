//! A C program (tests/c/demo.c) compiled with the system C compiler against libtaskpack.a: it
//! runs every task of the demo bundle on its test inputs and checks the outputs computed here.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::common::Demo;

/// libtaskpack.a of this build: cargo builds it next to this test's executable (in `deps/`)
/// because the test links the crate's rlib.
fn static_library() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    let lib = deps.join("libtaskpack.a");
    assert!(lib.exists(), "{} is missing", lib.display());
    lib
}

fn write_f32(path: &Path, values: &[f32]) {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn c_program_runs_every_task_against_the_static_library() {
    let started = Instant::now();
    let demo = Demo::new();
    let data = demo.dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let mut tasks = String::new();
    for name in &demo.tasks {
        let case = demo.case(name, usize::MAX);
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

    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let exe = demo.dir.path().join("demo");
    let cc = Command::new("cc")
        .args(["-std=c99", "-O1", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(root.join("include"))
        .arg(root.join("tests/c/demo.c"))
        .arg(static_library())
        // noexecstack: tract's assembly kernels lack a .note.GNU-stack section, without which
        // the linker would make the stack executable.
        .args(["-lpthread", "-ldl", "-lm", "-Wl,-z,noexecstack", "-o"])
        .arg(&exe)
        .output()
        .expect("cannot run cc");
    assert!(
        cc.status.success(),
        "cc failed:\n{}",
        String::from_utf8_lossy(&cc.stderr)
    );

    let run = Command::new(&exe)
        .arg(&demo.path)
        .arg(&data)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    println!("{stdout}");
    assert!(
        run.status.success(),
        "demo.c failed ({}):\n{stdout}\n{stderr}",
        run.status
    );
    assert!(stdout.contains(", 0 failures"), "{stdout}");
    for name in &demo.tasks {
        assert!(
            stdout.contains(&format!("task {name} ")),
            "{name} ran:\n{stdout}"
        );
    }
    println!("c_demo: {:.1} s", started.elapsed().as_secs_f64());
}
