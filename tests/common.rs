//! Helpers shared by the integration tests: the embedded demo model family.

use std::path::{Path, PathBuf};

/// The demo model folder.
pub fn demo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo")
}

/// The demo tasks: every NAME.onnx but the base that has a NAME.test.npz.
pub fn demo_tasks() -> Vec<(String, PathBuf)> {
    let mut tasks: Vec<(String, PathBuf)> = std::fs::read_dir(demo())
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            let stem = p.file_stem()?.to_str()?.to_string();
            (p.extension()? == "onnx"
                && stem != "base"
                && demo().join(format!("{stem}.test.npz")).exists())
            .then_some((stem, p))
        })
        .collect();
    tasks.sort();
    assert!(tasks.len() >= 4, "the demo family has at least 4 tasks");
    tasks
}
