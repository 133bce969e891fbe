//! Checked conversions of the C caller's pointers into references and slices.
//!
//! Each helper turns NULL into `TP_NULL_ARGUMENT` and a misaligned pointer into
//! `TP_INVALID_ARGUMENT`; what cannot be checked (that a non-NULL pointer points to live memory
//! of the right type and size) is the caller's contract, stated in each entry point's `# Safety`.

use std::ffi::{c_char, CStr};
use std::path::PathBuf;

use crate::status::{guard, Failure, TpStatus};

fn check_aligned<T>(p: *const T, name: &str) -> Result<(), Failure> {
    if p.is_aligned() {
        Ok(())
    } else {
        Err(Failure::invalid(format!(
            "argument `{name}` is not aligned to {} bytes",
            std::mem::align_of::<T>()
        )))
    }
}

/// `&T` from `p`.
///
/// # Safety
/// `p` is NULL or points to a valid `T` that is not mutated during `'a`.
pub(crate) unsafe fn get<'a, T>(p: *const T, name: &str) -> Result<&'a T, Failure> {
    check_aligned(p, name)?;
    // SAFETY: aligned; NULL or a valid `T` (the caller's contract); `as_ref` maps NULL to None.
    unsafe { p.as_ref() }.ok_or_else(|| Failure::null(name))
}

/// `&mut T` from the out-parameter `p`.
///
/// # Safety
/// `p` is NULL or valid for reads and writes of a `T`, not accessed otherwise during `'a`.
pub(crate) unsafe fn out<'a, T>(p: *mut T, name: &str) -> Result<&'a mut T, Failure> {
    check_aligned(p, name)?;
    // SAFETY: aligned; NULL or valid and unaliased (the caller's contract).
    unsafe { p.as_mut() }.ok_or_else(|| Failure::null(name))
}

/// Frees the boxed handle in `*slot` and sets `*slot` to NULL (tract's `release!` idea): a no-op
/// when `*slot` is already NULL, so freeing twice through the same variable is harmless.
///
/// # Safety
/// `slot` is NULL or valid for reading and writing a pointer; `*slot` is NULL or a live handle
/// made by `Box::into_raw` that no other thread is using.
pub(crate) unsafe fn release<T>(slot: *mut *mut T, name: &str) -> Result<(), Failure> {
    // SAFETY: `slot` is NULL or readable and writable (the caller's contract).
    let slot = unsafe { out(slot, name) }?;
    let handle = std::mem::replace(slot, std::ptr::null_mut());
    if !handle.is_null() {
        // SAFETY: a live handle made by `Box::into_raw`, now unreachable from the caller's
        // variable (nulled above) and unused by other threads (the caller's contract).
        drop(unsafe { Box::from_raw(handle) });
    }
    Ok(())
}

/// Fails with `TP_NULL_ARGUMENT` if `p` is NULL (for pointers dereferenced later).
pub(crate) fn non_null<T>(p: *const T, name: &str) -> Result<(), Failure> {
    if p.is_null() {
        Err(Failure::null(name))
    } else {
        Ok(())
    }
}

/// Fails unless `len` elements of `T` fit in `isize::MAX` bytes (what a Rust slice may span).
fn check_len<T>(len: usize, name: &str) -> Result<(), Failure> {
    if len
        .checked_mul(std::mem::size_of::<T>())
        .is_none_or(|b| b > isize::MAX as usize)
    {
        return Err(Failure::invalid(format!(
            "argument `{name}`: {len} elements overflow"
        )));
    }
    Ok(())
}

/// `&[T]` of `len` elements from `p`; NULL is allowed only when `len` is 0.
///
/// # Safety
/// `p` is NULL or valid for reads of `len` elements of `T`, not mutated during `'a`.
pub(crate) unsafe fn slice<'a, T>(p: *const T, len: usize, name: &str) -> Result<&'a [T], Failure> {
    if len == 0 {
        return Ok(&[]);
    }
    non_null(p, name)?;
    check_aligned(p, name)?;
    check_len::<T>(len, name)?;
    // SAFETY: non-NULL, aligned, at most isize::MAX bytes; valid for `len` reads (the caller's
    // contract).
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// `&mut [T]` of `len` elements from `p`; NULL is allowed only when `len` is 0.
///
/// # Safety
/// `p` is NULL or valid for writes of `len` elements of `T`, not accessed otherwise during `'a`.
pub(crate) unsafe fn slice_mut<'a, T>(
    p: *mut T,
    len: usize,
    name: &str,
) -> Result<&'a mut [T], Failure> {
    if len == 0 {
        return Ok(&mut []);
    }
    non_null(p, name)?;
    check_aligned(p, name)?;
    check_len::<T>(len, name)?;
    // SAFETY: non-NULL, aligned, at most isize::MAX bytes; valid and unaliased for `len` writes
    // (the caller's contract).
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}

/// A NUL-terminated UTF-8 string.
///
/// # Safety
/// `p` is NULL or points to a NUL-terminated string that lives and is not mutated during `'a`.
pub(crate) unsafe fn str<'a>(p: *const c_char, name: &str) -> Result<&'a str, Failure> {
    non_null(p, name)?;
    // SAFETY: non-NULL and NUL-terminated (the caller's contract).
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .map_err(|_| Failure::invalid(format!("argument `{name}` is not UTF-8")))
}

/// A file path: any bytes on Unix (Android, iOS, Linux), UTF-8 elsewhere.
///
/// # Safety
/// As for [`str`].
pub(crate) unsafe fn path(p: *const c_char, name: &str) -> Result<PathBuf, Failure> {
    non_null(p, name)?;
    // SAFETY: non-NULL and NUL-terminated (the caller's contract).
    let s = unsafe { CStr::from_ptr(p) };
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(std::ffi::OsStr::from_bytes(s.to_bytes()).into())
    }
    #[cfg(not(unix))]
    {
        s.to_str()
            .map(PathBuf::from)
            .map_err(|_| Failure::invalid(format!("argument `{name}` is not UTF-8")))
    }
}

/// The whole body of an entry point that reads one value out of a handle: zeroes `*out` first
/// (so a failure leaves a defined value), checks `handle`, then writes `value(handle)`.
///
/// # Safety
/// `handle` is NULL or a live `H`; `out` is NULL or valid for writing a `T`.
pub(crate) unsafe fn query<H, T: Default>(
    entry: &str,
    handle: *const H,
    handle_name: &str,
    out: *mut T,
    out_name: &str,
    value: impl FnOnce(&H) -> Result<T, Failure>,
) -> TpStatus {
    guard(entry, || {
        // SAFETY: `out` is NULL or writable (the caller's contract).
        let out = unsafe { self::out(out, out_name) }?;
        *out = T::default();
        // SAFETY: `handle` is NULL or live (the caller's contract).
        let handle = unsafe { get(handle, handle_name) }?;
        *out = value(handle)?;
        Ok(())
    })
}
