//! Status codes, the per-thread last error, and the guard every entry point runs in.

use std::cell::RefCell;
use std::ffi::{c_char, CStr, CString};
use std::panic::{self, AssertUnwindSafe};

use taskpack_core::runtime::Error;

/// What a call returned. Every fallible `tp_` function returns one; on anything but `TP_OK`,
/// `tp_last_error()` says what went wrong.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TpStatus {
    /// Success.
    TP_OK = 0,
    /// A pointer argument that must not be NULL was NULL.
    TP_NULL_ARGUMENT = 1,
    /// An argument is invalid: a path or name that is not UTF-8, a negative dimension, a size
    /// that overflows, a misaligned buffer, an unknown element type, an index out of range
    /// (other than a task index).
    TP_INVALID_ARGUMENT = 2,
    /// The bundle file cannot be opened, mapped or read.
    TP_IO = 3,
    /// The bundle breaks a rule of the format, or a checksum does not match; or a stored graph
    /// cannot run with its tasks' tensors (docs/FORMAT.md rules G1–G8); or its tokenizer does
    /// not load, or a task's label names do not match its number of classes.
    TP_INVALID_BUNDLE = 4,
    /// No task of that name, or a task index not below `tp_engine_task_count`.
    TP_UNKNOWN_TASK = 5,
    /// The inputs do not fit the task's graph: their number, element type or shape; or the
    /// tokenizer fails on a text.
    TP_BAD_INPUT = 6,
    /// A caller buffer is too small; the needed length was written to the length out-parameter.
    TP_BUFFER_TOO_SMALL = 7,
    /// The task's graph is not one this call can run (e.g. a model with two outputs given to
    /// `tp_engine_run_f32`, an output element type the C API has no code for, or a graph
    /// without token inputs given to `tp_engine_classify_text`), or the bundle has no tokenizer
    /// for `tp_engine_classify_text`.
    TP_UNSUPPORTED = 8,
    /// tract failed to load, bind or run the task.
    TP_RUNTIME = 9,
    /// A bug: Rust code panicked. The panic was caught at the boundary; handles can still be
    /// freed.
    TP_PANIC = 10,
}

/// Why a call failed: its status and the message for `tp_last_error`.
#[derive(Debug)]
pub(crate) struct Failure {
    pub status: TpStatus,
    pub message: String,
}

impl Failure {
    pub fn new(status: TpStatus, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
        }
    }

    /// A NULL pointer where one was required.
    pub fn null(argument: &str) -> Failure {
        Failure::new(
            TpStatus::TP_NULL_ARGUMENT,
            format!("argument `{argument}` is NULL"),
        )
    }

    pub fn invalid(message: impl Into<String>) -> Failure {
        Failure::new(TpStatus::TP_INVALID_ARGUMENT, message)
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        let status = match &e {
            Error::Io { .. } => TpStatus::TP_IO,
            // A stored graph that breaks rules G1–G8 (docs/FORMAT.md).
            Error::Format(_) | Error::Graph { .. } => TpStatus::TP_INVALID_BUNDLE,
            Error::UnknownTask { .. } => TpStatus::TP_UNKNOWN_TASK,
            Error::OutOfRange { what: "task", .. } => TpStatus::TP_UNKNOWN_TASK,
            Error::OutOfRange { .. } => TpStatus::TP_INVALID_ARGUMENT,
            Error::InputCount { .. }
            | Error::InputMismatch { .. }
            | Error::IndexOutOfRange { .. }
            | Error::InputTooLarge { .. } => TpStatus::TP_BAD_INPUT,
            // The engine caught a panic inside tract or the tokenizer.
            Error::EnginePanic { .. } => TpStatus::TP_PANIC,
            Error::Unsupported { .. }
            | Error::NoTokenizer
            | Error::UnfillableInput { .. }
            | Error::NotAClassifier { .. } => TpStatus::TP_UNSUPPORTED,
            Error::TokenizerParse { .. } | Error::LabelCount { .. } => TpStatus::TP_INVALID_BUNDLE,
            Error::Tokenize { .. } => TpStatus::TP_BAD_INPUT,
            _ => TpStatus::TP_RUNTIME,
        };
        Failure::new(status, e.to_string())
    }
}

thread_local! {
    /// The message of the last failed call on this thread; empty after a successful one.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    let message = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    // `try_with`: during thread teardown the slot may be gone; losing the message is better
    // than a panic outside the guard.
    let _ = LAST_ERROR.try_with(|slot| {
        if let Ok(mut slot) = slot.try_borrow_mut() {
            *slot = message;
        }
    });
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "non-string panic payload"
    }
}

/// Runs the body of entry point `name`: clears the last error, catches panics, turns a failure
/// into its status and records its message.
pub(crate) fn guard(name: &str, body: impl FnOnce() -> Result<(), Failure>) -> TpStatus {
    set_last_error("");
    let failure = match panic::catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => return TpStatus::TP_OK,
        Ok(Err(failure)) => failure,
        Err(payload) => {
            let failure = Failure::new(
                TpStatus::TP_PANIC,
                format!("{name} panicked: {}", panic_message(&*payload)),
            );
            // A payload's destructor may itself panic: keep that inside too.
            let _ = panic::catch_unwind(AssertUnwindSafe(move || drop(payload)));
            failure
        }
    };
    set_last_error(&failure.message);
    failure.status
}

/// Like [`guard`] for entry points that return a static string: `fallback` if `body` panics.
fn guard_str(body: impl FnOnce() -> *const c_char, fallback: &'static [u8]) -> *const c_char {
    panic::catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback.as_ptr().cast())
}

/// The message of the last failed `tp_` call on the calling thread: a NUL-terminated UTF-8
/// string, empty if that call succeeded. Never NULL. The pointer stays valid until the next
/// `tp_` call on this thread (other than `tp_last_error`, `tp_status_name` and `tp_version`);
/// copy the text to keep it.
#[no_mangle]
pub extern "C" fn tp_last_error() -> *const c_char {
    guard_str(
        || {
            LAST_ERROR
                .try_with(|slot| match slot.try_borrow() {
                    // The CString's heap buffer outlives the borrow: it is only replaced by the
                    // next guarded call on this thread.
                    Ok(message) => message.as_ptr(),
                    Err(_) => c"".as_ptr(),
                })
                .unwrap_or(c"".as_ptr())
        },
        b"\0",
    )
}

/// The name of status code `status` (e.g. `"TP_BAD_INPUT"`), or `"TP_UNKNOWN_STATUS"`: a static
/// NUL-terminated string, never NULL.
#[no_mangle]
pub extern "C" fn tp_status_name(status: i32) -> *const c_char {
    guard_str(
        || {
            STATUS_NAMES
                .iter()
                .find(|(s, _)| *s as i32 == status)
                .map_or(c"TP_UNKNOWN_STATUS", |(_, name)| name)
                .as_ptr()
        },
        b"TP_UNKNOWN_STATUS\0",
    )
}

/// Every status with its name.
const STATUS_NAMES: [(TpStatus, &CStr); 11] = [
    (TpStatus::TP_OK, c"TP_OK"),
    (TpStatus::TP_NULL_ARGUMENT, c"TP_NULL_ARGUMENT"),
    (TpStatus::TP_INVALID_ARGUMENT, c"TP_INVALID_ARGUMENT"),
    (TpStatus::TP_IO, c"TP_IO"),
    (TpStatus::TP_INVALID_BUNDLE, c"TP_INVALID_BUNDLE"),
    (TpStatus::TP_UNKNOWN_TASK, c"TP_UNKNOWN_TASK"),
    (TpStatus::TP_BAD_INPUT, c"TP_BAD_INPUT"),
    (TpStatus::TP_BUFFER_TOO_SMALL, c"TP_BUFFER_TOO_SMALL"),
    (TpStatus::TP_UNSUPPORTED, c"TP_UNSUPPORTED"),
    (TpStatus::TP_RUNTIME, c"TP_RUNTIME"),
    (TpStatus::TP_PANIC, c"TP_PANIC"),
];

/// The version of the library, e.g. `"0.1.0"`: a static NUL-terminated string.
#[no_mangle]
pub extern "C" fn tp_version() -> *const c_char {
    guard_str(
        || concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast(),
        b"\0",
    )
}

/// Test hook: panics inside the guard and so always returns `TP_PANIC` (with the panic's
/// message in `tp_last_error()`). Lets a host check that a Rust panic cannot take it down.
#[no_mangle]
pub extern "C" fn tp_debug_panic() -> TpStatus {
    guard("tp_debug_panic", || panic!("tp_debug_panic was called"))
}
