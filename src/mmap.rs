//! The crate's one memory map: read-only maps of bundles and checkpoints.
//!
//! Mapping a file is `unsafe` because the OS does not stop another process from truncating or
//! rewriting it while it is mapped; reads could then see changed bytes or fault (SIGBUS). Every
//! map in the crate goes through [`map_readonly`], so that contract is stated once: callers only
//! map files that nobody rewrites while they are open (checkpoints during a compile, bundles
//! opened with `Bundle::open`; `Bundle::read` is the alternative for storage that may change),
//! and they validate every offset before slicing the map.

use std::fs::File;

use memmap2::Mmap;

/// Maps `file` read-only (see the module docs for the contract).
pub(crate) fn map_readonly(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the map is read-only and private to this process. Its contents stay valid as long
    // as no other process truncates or rewrites the file, which is the documented contract of
    // every caller (module docs); all offsets into it are validated before use.
    unsafe { Mmap::map(file) }
}
