//! A C program (tests/c/demo.c) compiled with the system C compiler against libtaskpack.a: it
//! runs every task of the demo bundle on its test inputs and checks the outputs computed here.

use std::time::Instant;

use crate::common::{run_c_program, write_demo_data, Demo};

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
