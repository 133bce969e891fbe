//! The C programs (tests/c/demo.c, misuse.c, text.c) under valgrind's memcheck: no invalid read
//! or write, no use of uninitialized memory, no definite leak, in the library or the program.
//! Skipped with a note when `valgrind` is not on PATH (.ci/run installs it, so CI never skips).
//!
//! Each run is `valgrind --error-exitcode=99 --leak-check=full --errors-for-leak-kinds=definite`:
//! any memcheck error or definitely lost block makes the program exit 99.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::common::{build_c, write_demo_data, Demo};
use crate::text::{compile_task, goldens};

/// Whether `valgrind` runs here.
fn have_valgrind() -> bool {
    let found = Command::new("valgrind")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("valgrind is not on PATH: memcheck runs skipped");
    }
    found
}

/// Runs `exe args` under memcheck and returns its stdout; fails unless the program exits 0 and
/// memcheck reports no error and no definite leak.
fn memcheck(exe: &Path, args: &[&OsStr]) -> String {
    let started = Instant::now();
    let run = Command::new("valgrind")
        // Without a backtrace, a caught panic (misuse.c calls tp_debug_panic) prints one line:
        // symbolizing a backtrace under memcheck costs seconds and leaves std's cache of the
        // executable's debug info (~150 MB, still reachable) in the leak report.
        .env("RUST_BACKTRACE", "0")
        .args([
            "--error-exitcode=99",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite",
        ])
        .arg(exe)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    let name = exe.file_name().unwrap().to_string_lossy();
    assert!(
        run.status.success(),
        "{name} under memcheck: {} (99: a memcheck error or a definite leak)\n{stdout}\n{stderr}",
        run.status
    );
    assert!(
        stderr.contains("ERROR SUMMARY: 0 errors from 0 contexts"),
        "{name}:\n{stderr}"
    );
    // The leak summary, for the record (`cargo test -- --nocapture`).
    let summary: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            [
                "definitely lost",
                "indirectly lost",
                "possibly lost",
                "still reachable",
            ]
            .iter()
            .any(|k| l.contains(k))
        })
        .collect();
    println!(
        "memcheck {name}: {:.1} s, 0 errors\n{}",
        started.elapsed().as_secs_f64(),
        summary.join("\n")
    );
    stdout.into_owned()
}

#[test]
fn memcheck_demo_program() {
    if !have_valgrind() {
        return;
    }
    let demo = Demo::new();
    let data = write_demo_data(&demo, 8);
    let exe = demo.dir.path().join("demo");
    build_c("demo.c", &exe);
    let stdout = memcheck(&exe, &[demo.path.as_os_str(), data.as_os_str()]);
    assert!(stdout.contains(", 0 failures"), "{stdout}");
}

#[test]
fn memcheck_misuse_program() {
    if !have_valgrind() {
        return;
    }
    let demo = Demo::new();
    let data = write_demo_data(&demo, 8);
    let exe = demo.dir.path().join("misuse");
    build_c("misuse.c", &exe);
    // One round per thread (c_misuse.rs runs three natively): memcheck checks memory accesses,
    // and more rounds repeat the same paths at ~70x the native cost.
    let stdout = memcheck(
        &exe,
        &[demo.path.as_os_str(), data.as_os_str(), OsStr::new("1")],
    );
    assert!(stdout.contains(", 0 failures"), "{stdout}");
    let runs = 8 * demo.tasks.len() * 2;
    for phase in ["default cache", "cache of 2 tasks"] {
        let line = format!("{phase}: 8 threads, {runs} runs");
        assert!(stdout.contains(&line), "{line}:\n{stdout}");
    }
}

#[test]
fn memcheck_text_program() {
    if !have_valgrind() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bundle = compile_task(dir.path(), "topic", true);
    let cases = goldens("topic");
    let texts = dir.path().join("texts.txt");
    let lines: String = cases.iter().map(|(t, ..)| format!("{t}\n")).collect();
    std::fs::write(&texts, lines).unwrap();
    let exe = dir.path().join("text");
    build_c("text.c", &exe);
    let bundle = Path::new(bundle.to_str().unwrap());
    let stdout = memcheck(
        &exe,
        &[bundle.as_os_str(), OsStr::new("topic"), texts.as_os_str()],
    );
    // The same classes as without memcheck (text.rs checks the probabilities).
    let classes: Vec<String> = stdout
        .lines()
        .map(|l| l.split('\t').next().unwrap().to_string())
        .collect();
    let want: Vec<String> = cases.iter().map(|c| c.1.to_string()).collect();
    assert_eq!(classes, want, "{stdout}");
}
