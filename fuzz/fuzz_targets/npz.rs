//! The npy / npz reader of `src/npz.rs` (`taskpack run --input`, `--calib`): `read_npy` and
//! `read_npz` on a file holding the fuzzed bytes, under a 16 MiB byte cap.
//!
//! Besides "no panic, no abort": whatever is returned fits the cap (the reader sizes every array
//! from its header against the file, the zip entry and the cap before it allocates).
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use taskpack::npz::{read_npy, read_npz, Limits};

const CAP: u64 = 16 << 20;

/// One file per fuzzing process, in memory where the machine has a tmpfs.
fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("taskpack-fuzz-npz-{}", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, bytes)) = data.split_first() else {
        return;
    };
    let path = scratch();
    std::fs::write(path, bytes).expect("cannot write the scratch file");
    let limits = Limits::with_max_bytes(CAP);
    let arrays = if mode & 1 == 0 {
        read_npy(path, &limits).map(|t| vec![(String::new(), t)])
    } else {
        read_npz(path, &limits)
    };
    if let Ok(arrays) = arrays {
        let total: u64 = arrays
            .iter()
            .map(|(_, t)| (t.len() * t.datum_type().size_of()) as u64)
            .sum();
        assert!(total <= CAP, "{total} bytes returned under a cap of {CAP}");
    }
});
