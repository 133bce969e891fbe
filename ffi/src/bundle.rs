//! `TpBundle`: an open, validated bundle.

use std::ffi::c_char;
use std::sync::Arc;

use taskpack_core::runtime::Bundle;

use crate::args;
use crate::status::{guard, TpStatus};

/// An open, validated bundle (opaque). Create it with `tp_bundle_open`, `tp_bundle_read` or
/// `tp_bundle_from_memory`; release it with `tp_bundle_free`. Engines made from it keep their
/// own reference: the bundle may be freed while they live. Usable from several threads at
/// once, except `tp_bundle_free`.
pub struct TpBundle {
    pub(crate) bundle: Arc<Bundle>,
}

/// Boxes `bundle` into `*out`.
fn hand_out(out: &mut *mut TpBundle, bundle: Bundle) {
    *out = Box::into_raw(Box::new(TpBundle {
        bundle: Arc::new(bundle),
    }));
}

/// Opens the bundle at `path` by memory-mapping it, and validates its header, manifest and
/// section table (time independent of the weights' size; section checksums are checked on first
/// use, or all at once by `tp_bundle_verify`). The map is shared with the file, not a copy: if
/// the file is rewritten in place while the bundle (or an engine made from it) lives, the bundle
/// sees bytes that were never checked, and if it is truncated, the process gets SIGBUS. So the
/// file must only ever be replaced by rename; use `tp_bundle_read` for storage that may change
/// under the process. On failure `*out` is set to NULL.
///
/// `TP_IO` if the file cannot be opened or mapped, `TP_INVALID_BUNDLE` if it is not a valid
/// bundle.
///
/// # Safety
/// `path` is NULL or a NUL-terminated string (bytes of a file name on Unix, UTF-8 elsewhere);
/// `out` is NULL or valid for writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn tp_bundle_open(path: *const c_char, out: *mut *mut TpBundle) -> TpStatus {
    guard("tp_bundle_open", || {
        // SAFETY: `out` is NULL or writable (contract).
        let out = unsafe { args::out(out, "out") }?;
        *out = std::ptr::null_mut();
        // SAFETY: `path` is NULL or NUL-terminated (contract).
        let path = unsafe { args::path(path, "path") }?;
        hand_out(out, Bundle::open(path)?);
        Ok(())
    })
}

/// Like `tp_bundle_open`, but reads the whole file into memory owned by the bundle, so that later
/// changes to the file do not affect it (for removable media, network file systems, or files an
/// updater rewrites in place). Costs a read of the whole file up front.
///
/// # Safety
/// As for `tp_bundle_open`.
#[no_mangle]
pub unsafe extern "C" fn tp_bundle_read(path: *const c_char, out: *mut *mut TpBundle) -> TpStatus {
    guard("tp_bundle_read", || {
        // SAFETY: `out` is NULL or writable (contract).
        let out = unsafe { args::out(out, "out") }?;
        *out = std::ptr::null_mut();
        // SAFETY: `path` is NULL or NUL-terminated (contract).
        let path = unsafe { args::path(path, "path") }?;
        hand_out(out, Bundle::read(path)?);
        Ok(())
    })
}

/// Validates a bundle held in memory (e.g. an Android asset) and copies its `len` bytes: the
/// caller's buffer may be released as soon as this returns. On failure `*out` is set to NULL.
///
/// # Safety
/// `data` is NULL or valid for reading `len` bytes; `out` is NULL or valid for writing a
/// pointer.
#[no_mangle]
pub unsafe extern "C" fn tp_bundle_from_memory(
    data: *const u8,
    len: usize,
    out: *mut *mut TpBundle,
) -> TpStatus {
    guard("tp_bundle_from_memory", || {
        // SAFETY: `out` is NULL or writable (contract).
        let out = unsafe { args::out(out, "out") }?;
        *out = std::ptr::null_mut();
        args::non_null(data, "data")?;
        // SAFETY: `data` is readable for `len` bytes (contract).
        let bytes = unsafe { args::slice(data, len, "data") }?;
        hand_out(out, Bundle::from_bytes(bytes.to_vec())?);
        Ok(())
    })
}

/// Checks every section checksum and every rule that needs the bulk bytes (reads the whole
/// bundle), then that every stored graph can run with its tasks' tensors (rules G1–G8 of
/// docs/FORMAT.md: what `taskpack verify` checks). `TP_INVALID_BUNDLE` if one fails.
///
/// # Safety
/// `bundle` is NULL or a live handle from `tp_bundle_open` / `_read` / `_from_memory`.
#[no_mangle]
pub unsafe extern "C" fn tp_bundle_verify(bundle: *const TpBundle) -> TpStatus {
    guard("tp_bundle_verify", || {
        // SAFETY: `bundle` is NULL or live (contract).
        let bundle = unsafe { args::get(bundle, "bundle") }?;
        bundle.bundle.verify()?;
        taskpack_core::runtime::check_graphs(&bundle.bundle)?;
        Ok(())
    })
}

/// Releases `*bundle` and sets `*bundle` to NULL; a no-op (`TP_OK`) if `*bundle` is already
/// NULL, so freeing twice through the same variable is harmless. Engines made from the bundle
/// stay valid. `TP_NULL_ARGUMENT` if `bundle` itself is NULL.
///
/// # Safety
/// `bundle` is NULL or valid for reading and writing a pointer; `*bundle` is NULL or a live
/// handle that no other thread is using.
#[no_mangle]
pub unsafe extern "C" fn tp_bundle_free(bundle: *mut *mut TpBundle) -> TpStatus {
    guard("tp_bundle_free", || {
        // SAFETY: the contract above is `release`'s.
        unsafe { args::release(bundle, "bundle") }
    })
}

// C callers share handles between threads.
const _: fn() = || {
    fn check<T: Send + Sync>() {}
    check::<TpBundle>();
};
