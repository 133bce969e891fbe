//! include/taskpack.h is what cbindgen generates from the current sources.

use std::path::Path;

#[test]
fn header_is_current() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(root.join("cbindgen.toml")).unwrap();
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src/lib.rs"))
        .generate()
        .expect("cbindgen fails on ffi/src")
        .write(&mut generated);
    let path = root.join("include/taskpack.h");
    if std::env::var_os("TASKPACK_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is stale: regenerate it with\n  TASKPACK_BLESS=1 cargo test -p taskpack-ffi --test ffi \
         header\nand commit it",
        path.display()
    );
}
