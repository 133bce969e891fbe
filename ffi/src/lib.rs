//! The C ABI of the taskpack runtime, for native apps (Android NDK, iOS, Linux).
//!
//! Built as `libtaskpack.a` / `libtaskpack.so` (and an rlib, so that Rust tests can call the
//! entry points directly); the C declarations are `include/taskpack.h`, generated from this crate
//! by cbindgen and checked to be current by the test `header::header_is_current`.
//!
//! Conventions, the same for every entry point (the header repeats them for C users):
//! - every fallible call returns a [`TpStatus`]; on failure, [`tp_last_error`] gives a message,
//!   kept per thread until the next `tp_` call on that thread;
//! - every pointer argument is checked (`TP_NULL_ARGUMENT`, never a crash), and every call runs
//!   inside `catch_unwind`: a Rust panic becomes `TP_PANIC` and never unwinds into the host;
//! - handles are opaque and owned by the caller, who releases them with the matching `_free`
//!   function; it takes the address of the handle and nulls it, so a second free is a no-op;
//! - an out-parameter is written on failure too (NULL handle, zero count) when it is not NULL.
//!
//! The model for this crate is tract's own C API (`api/ffi`), plus `catch_unwind`.
#![deny(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

mod args;
mod bundle;
mod compute;
mod engine;
mod status;
mod tensor;
mod text;

pub use bundle::{
    tp_bundle_free, tp_bundle_from_memory, tp_bundle_open, tp_bundle_read, tp_bundle_verify,
    TpBundle,
};
pub use compute::{tp_set_compute, TpCompute};
pub use engine::{
    tp_engine_cached_bytes, tp_engine_free, tp_engine_input_count, tp_engine_input_info,
    tp_engine_input_shape, tp_engine_new, tp_engine_output_count, tp_engine_output_info,
    tp_engine_output_shape, tp_engine_prepare, tp_engine_task_count, tp_engine_task_index,
    tp_engine_task_name, TpEngine, TpIoInfo,
};
pub use status::{tp_debug_panic, tp_last_error, tp_status_name, tp_version, TpStatus};
pub use tensor::{
    tp_engine_run, tp_engine_run_f32, tp_outputs_count, tp_outputs_free, tp_outputs_get, TpDType,
    TpOutputs, TpTensor,
};
pub use text::{tp_engine_classify_text, tp_engine_task_label, tp_engine_task_label_count};
