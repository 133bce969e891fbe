//! A C program (tests/c/demo.c) compiled with the system C compiler against libtaskpack.a: it
//! runs every task of the demo bundle on its test inputs and checks the outputs computed here.

use std::time::Instant;

use crate::common::{run_c_program, static_library, write_demo_data, Demo};

#[test]
fn c_program_runs_every_task_against_the_static_library() {
    let started = Instant::now();
    let demo = Demo::new();
    let data = write_demo_data(&demo, usize::MAX);
    let stdout = run_c_program("demo.c", &demo, &data);
    for name in &demo.tasks {
        assert!(
            stdout.contains(&format!("task {name} ")),
            "{name} ran:\n{stdout}"
        );
    }
    println!("c_demo: {:.1} s", started.elapsed().as_secs_f64());
}

/// The library the C programs link is the runtime an app gets: the engine is in it, the
/// compiler (merge methods, checkpoint readers, bundle writer) is not. Symbol names are
/// searched in the archive's bytes (Rust's legacy mangling spells a path `8taskpack5merge`).
#[test]
fn the_app_library_holds_the_runtime_and_not_the_compiler() {
    let bytes = std::fs::read(static_library()).unwrap();
    let has = |needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
    for present in [
        "8taskpack7runtime6engine",
        "8taskpack6format6reader",
        "tp_engine_new",
    ] {
        assert!(has(present), "libtaskpack.a lacks {present}");
    }
    for absent in [
        "8taskpack5merge",
        "8taskpack7compile",
        "11safetensors",
        "8taskpack6format6writer",
    ] {
        assert!(!has(absent), "libtaskpack.a contains {absent}");
    }
}
