//! The crate's one memory map: read-only maps of bundles and checkpoints.
//!
//! What a map is: [`memmap2::Mmap::map`] maps the whole file `PROT_READ` and **`MAP_SHARED`**
//! (on Windows, a read-only view of the file). The process cannot write through it, but it is
//! not a private snapshot either: it shows the file's current bytes, so if any process rewrites
//! the file in place, the mapped bytes change under the `&[u8]` the crate hands out (which Rust
//! assumes immutable), and if it truncates the file, touching a page past the new end raises
//! SIGBUS and kills the process. Nothing in the OS prevents that (advisory locks do not bind
//! other processes), and `MAP_PRIVATE` would not help: its unwritten pages still follow the file.
//!
//! So mapping is sound only under a contract that the caller keeps, stated here once because
//! every map in the crate goes through [`map_readonly`]: nobody rewrites or truncates the file
//! while it is mapped. Files replaced by rename (the writer's way, and an updater's if it writes
//! a new file and renames it) are fine: the map keeps the old inode. The mapped paths are:
//! checkpoints during a compile (the user's own inputs), the writer reading back its own
//! temporary file, and bundles opened with `Bundle::open` / `tp_bundle_open`. For bundles on
//! storage that may change under the process (removable media, network file systems, files an
//! updater rewrites in place) the choice is `Bundle::read` / `tp_bundle_read` / `--no-mmap`,
//! which copy the file into owned memory. Independently of the contract, every offset into a map
//! is validated before use, so even a changed file cannot make the crate read outside the map.

use std::fs::File;

use memmap2::Mmap;

/// Maps `file` read-only (see the module docs for the contract).
pub(crate) fn map_readonly(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: `Mmap::map` is unsafe because the map is shared with the file: if another process
    // rewrites the file in place, the bytes behind the returned slice change (Rust assumes
    // they don't), and if it truncates the file, reading a page past the new end raises SIGBUS.
    // The map is read-only (this process never writes through it) and every offset into it is
    // validated before use; the rest is the contract of every caller (module docs): the file is
    // not rewritten or truncated while it is mapped. Callers that cannot promise that read the
    // file into owned memory instead (`Bundle::read`).
    unsafe { Mmap::map(file) }
}
