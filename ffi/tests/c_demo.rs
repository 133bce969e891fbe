//! A C program (tests/c/demo.c) compiled with the system C compiler against libtaskpack.a: it
//! runs every task of the demo bundle on its test inputs and checks the outputs computed here.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::common::{build_c, Demo};

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
