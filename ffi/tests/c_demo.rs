//! A C program (tests/c/demo.c) compiled with the system C compiler against libtaskpack.a: it
//! runs every task of the demo bundle on its test inputs and checks the outputs computed here.

use std::process::Command;
use std::time::Instant;

use crate::common::{build_c, write_demo_data, Demo};

#[test]
fn c_program_runs_every_task_against_the_static_library() {
    let started = Instant::now();
    let demo = Demo::new();
    let data = write_demo_data(&demo, usize::MAX);

    let exe = demo.dir.path().join("demo");
    build_c("demo.c", &exe);

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
