//! A C program (tests/c/misuse.c) compiled against libtaskpack.a that misuses the C ABI the way
//! a careless caller does (NULLs, double frees, freed handles as the header defines them, wrong
//! tasks, tiny buffers, wrong shapes, bad bundles) and runs 8 threads on one engine, checking
//! every status and every output against single-thread ones. valgrind.rs runs it under memcheck.

use crate::common::{run_c_program, write_demo_data, Demo};

#[test]
fn c_misuse_program_gets_exact_statuses_and_thread_safe_outputs() {
    let demo = Demo::new();
    let data = write_demo_data(&demo, 8);
    let stdout = run_c_program("misuse.c", &demo, &data);
    // Both thread phases ran: 8 threads x 3 rounds x every task x 2 run forms.
    let runs = 8 * 3 * demo.tasks.len() * 2;
    for phase in ["default cache", "cache of 2 tasks"] {
        let line = format!("{phase}: 8 threads, {runs} runs");
        assert!(stdout.contains(&line), "{line}:\n{stdout}");
    }
}
