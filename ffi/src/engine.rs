//! `TpEngine`: runs the tasks of a bundle; task queries and graph input/output descriptions.

use std::ffi::{c_char, CString};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use taskpack_core::runtime::{DatumType, Engine, EngineOptions, IoInfo, TextClassifier};

use crate::args;
use crate::bundle::TpBundle;
use crate::status::{guard, Failure, TpStatus};
use crate::tensor::dtype_code;

/// Runs the tasks of one bundle (opaque). Create it with `tp_engine_new`, release it with
/// `tp_engine_free`. Thread-safe: any number of threads may call `tp_engine_*` functions on the
/// same engine at once (each call runs on the calling thread; bound tasks are cached and
/// shared), except `tp_engine_free`, which must not race with any other use.
pub struct TpEngine {
    pub(crate) engine: Arc<Engine>,
    names: Vec<CString>,
    /// Per task, its graph's inputs and outputs, described on first request and kept (their
    /// strings and shapes are handed out by pointer until the engine is freed).
    io: Vec<OnceLock<TaskIo>>,
    /// Per task, its label names as C strings, made on first request and kept (handed out by
    /// pointer until the engine is freed).
    labels: Vec<OnceLock<Vec<CString>>>,
    /// The text classifier (the bundle's tokenizer, loaded once), made on first use.
    text: OnceLock<TextClassifier>,
    /// Held while making `text`, so that the tokenizer is loaded once.
    text_init: Mutex<()>,
}

/// The inputs and outputs of one task's graph.
pub(crate) struct TaskIo {
    pub inputs: Vec<Io>,
    pub outputs: Vec<Io>,
}

/// One graph input or output.
pub(crate) struct Io {
    pub name: CString,
    pub dtype: DatumType,
    /// Dimensions, -1 for a symbolic one (e.g. the batch size).
    pub shape: Vec<i64>,
}

impl Io {
    fn new(info: IoInfo) -> Io {
        Io {
            name: CString::new(info.name.replace('\0', "\\0")).unwrap_or_default(),
            dtype: info.dtype,
            shape: info
                .shape
                .iter()
                .map(|d| d.and_then(|d| i64::try_from(d).ok()).unwrap_or(-1))
                .collect(),
        }
    }

    /// E.g. `F32 [N,1,28,28]`.
    pub fn describe(&self) -> String {
        describe(self.dtype, self.shape.iter().copied())
    }

    /// Whether a tensor of `dtype` and `shape` fits.
    pub fn accepts(&self, dtype: DatumType, shape: &[usize]) -> bool {
        dtype == self.dtype
            && shape.len() == self.shape.len()
            && shape
                .iter()
                .zip(&self.shape)
                .all(|(&got, &want)| want < 0 || i64::try_from(got) == Ok(want))
    }
}

/// E.g. `F32 [N,1,28,28]` (a negative dimension prints as `N`).
pub(crate) fn describe(dtype: DatumType, shape: impl Iterator<Item = i64>) -> String {
    let dims: Vec<String> = shape
        .map(|d| {
            if d < 0 {
                "N".to_string()
            } else {
                d.to_string()
            }
        })
        .collect();
    format!("{dtype:?} [{}]", dims.join(","))
}

impl TpEngine {
    pub(crate) fn check_task(&self, task: usize) -> Result<(), Failure> {
        if task < self.names.len() {
            Ok(())
        } else {
            Err(Failure::new(
                TpStatus::TP_UNKNOWN_TASK,
                format!(
                    "task index {task} out of range (the bundle has {} tasks)",
                    self.names.len()
                ),
            ))
        }
    }

    /// The name of task `task` (checked), for messages.
    pub(crate) fn task_name(&self, task: usize) -> Result<String, Failure> {
        self.check_task(task)?;
        Ok(self.names[task].to_string_lossy().into_owned())
    }

    /// Task `task`'s inputs and outputs (checked; described once, then kept for the engine's
    /// life).
    pub(crate) fn task_io(&self, task: usize) -> Result<&TaskIo, Failure> {
        self.check_task(task)?;
        let slot = &self.io[task];
        if let Some(io) = slot.get() {
            return Ok(io);
        }
        // Two threads may describe the same task at once: the first to finish wins, which is
        // harmless (the descriptions are equal). An error is not kept: the next call retries.
        let io = TaskIo {
            inputs: self
                .engine
                .input_facts(task)?
                .into_iter()
                .map(Io::new)
                .collect(),
            outputs: self
                .engine
                .output_facts(task)?
                .into_iter()
                .map(Io::new)
                .collect(),
        };
        Ok(slot.get_or_init(|| io))
    }

    /// Task `task`'s label names (checked; made once, then kept for the engine's life).
    pub(crate) fn labels(&self, task: usize) -> Result<&[CString], Failure> {
        self.check_task(task)?;
        let slot = &self.labels[task];
        let labels = slot.get_or_init(|| {
            let names = self
                .engine
                .bundle()
                .manifest()
                .tasks
                .get(task)
                .map_or(&[][..], |t| t.labels.as_slice());
            names
                .iter()
                .map(|l| CString::new(l.replace('\0', "\\0")).unwrap_or_default())
                .collect()
        });
        Ok(labels)
    }

    /// The text classifier: the bundle's tokenizer, loaded on first use (once, whatever the
    /// number of threads; a failure is not kept, the next call retries).
    pub(crate) fn text(&self) -> Result<&TextClassifier, Failure> {
        if let Some(text) = self.text.get() {
            return Ok(text);
        }
        let _init = self
            .text_init
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(text) = self.text.get() {
            return Ok(text);
        }
        let text = TextClassifier::new(Arc::clone(&self.engine))?;
        Ok(self.text.get_or_init(|| text))
    }
}

/// Builds an engine over `bundle` with a cache of bound tasks of `cache_bytes` bytes of
/// materialized weights (least recently used out first; 0 selects the default, 256 MiB; a task
/// larger than the budget still runs, bound for the call only). The engine keeps its own
/// reference to the bundle: `tp_bundle_free` may be called right after. On failure `*out` is
/// set to NULL.
///
/// # Safety
/// `bundle` is NULL or a live bundle handle; `out` is NULL or valid for writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn tp_engine_new(
    bundle: *const TpBundle,
    cache_bytes: usize,
    out: *mut *mut TpEngine,
) -> TpStatus {
    guard("tp_engine_new", || {
        // SAFETY: `out` is NULL or writable (contract).
        let out = unsafe { args::out(out, "out") }?;
        *out = std::ptr::null_mut();
        // SAFETY: `bundle` is NULL or live (contract).
        let bundle = unsafe { args::get(bundle, "bundle") }?;
        let options = if cache_bytes == 0 {
            EngineOptions::default()
        } else {
            EngineOptions::with_cache_bytes(cache_bytes)
        };
        let engine = Arc::new(Engine::new(bundle.bundle.clone(), options)?);
        let names = (0..engine.task_count())
            .map(|t| {
                let name = engine.task_name(t).unwrap_or_default();
                CString::new(name).map_err(|_| {
                    Failure::new(
                        TpStatus::TP_INVALID_BUNDLE,
                        format!("task name {name:?} contains a NUL byte"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        *out = Box::into_raw(Box::new(TpEngine {
            engine,
            io: names.iter().map(|_| OnceLock::new()).collect(),
            labels: names.iter().map(|_| OnceLock::new()).collect(),
            text: OnceLock::new(),
            text_init: Mutex::new(()),
            names,
        }));
        Ok(())
    })
}

/// Releases `*engine` and sets `*engine` to NULL; a no-op (`TP_OK`) if `*engine` is already
/// NULL. Every pointer the engine handed out (task names, label names, `TpIoInfo` fields) dies
/// with it.
/// `TP_NULL_ARGUMENT` if `engine` itself is NULL.
///
/// # Safety
/// `engine` is NULL or valid for reading and writing a pointer; `*engine` is NULL or a live
/// handle that no other thread is using, now or later.
#[no_mangle]
pub unsafe extern "C" fn tp_engine_free(engine: *mut *mut TpEngine) -> TpStatus {
    guard("tp_engine_free", || {
        // SAFETY: the contract above is `release`'s.
        unsafe { args::release(engine, "engine") }
    })
}

/// Writes the number of tasks to `*count`.
///
/// # Safety
/// `engine` is NULL or a live engine; `count` is NULL or valid for writing a `size_t`.
#[no_mangle]
pub unsafe extern "C" fn tp_engine_task_count(
    engine: *const TpEngine,
    count: *mut usize,
) -> TpStatus {
    // SAFETY: the contract above is `query`'s.
    unsafe {
        args::query(
            "tp_engine_task_count",
            engine,
            "engine",
            count,
            "count",
            |h| Ok(h.names.len()),
        )
    }
}

/// Writes to `*name` the name of task `task` (0-based, below `tp_engine_task_count`): a
/// NUL-terminated UTF-8 string owned by the engine, valid until `tp_engine_free`. On failure
/// `*name` is set to NULL; `TP_UNKNOWN_TASK` for an index out of range.
///
/// # Safety
/// `engine` is NULL or a live engine; `name` is NULL or valid for writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn tp_engine_task_name(
    engine: *const TpEngine,
    task: usize,
    name: *mut *const c_char,
) -> TpStatus {
    guard("tp_engine_task_name", || {
        // SAFETY: `name` is NULL or writable (contract).
        let name = unsafe { args::out(name, "name") }?;
        *name = std::ptr::null();
        // SAFETY: `engine` is NULL or live (contract).
        let engine = unsafe { args::get(engine, "engine") }?;
        engine.check_task(task)?;
        *name = engine.names[task].as_ptr();
        Ok(())
    })
}

/// Writes to `*task` the index of the task called `name`. `TP_UNKNOWN_TASK` (the message lists
/// the bundle's tasks) if there is none; `*task` is then `SIZE_MAX`.
///
/// # Safety
/// `engine` is NULL or a live engine; `name` is NULL or a NUL-terminated string; `task` is NULL
/// or valid for writing a `size_t`.
#[no_mangle]
pub unsafe extern "C" fn tp_engine_task_index(
    engine: *const TpEngine,
    name: *const c_char,
    task: *mut usize,
) -> TpStatus {
    guard("tp_engine_task_index", || {
        // SAFETY: `task` is NULL or writable (contract).
        let task = unsafe { args::out(task, "task") }?;
        *task = usize::MAX;
        // SAFETY: `engine` is NULL or live (contract).
        let engine = unsafe { args::get(engine, "engine") }?;
        // SAFETY: `name` is NULL or NUL-terminated (contract).
        let name = unsafe { args::str(name, "name") }?;
        *task = engine.engine.task_index(name)?;
        Ok(())
    })
}

/// Binds task `task` ahead of time (materializes its weights into its graph) and caches it, so
/// that its first run is not slower than the next ones.
///
/// # Safety
/// `engine` is NULL or a live engine.
#[no_mangle]
pub unsafe extern "C" fn tp_engine_prepare(engine: *const TpEngine, task: usize) -> TpStatus {
    guard("tp_engine_prepare", || {
        // SAFETY: `engine` is NULL or live (contract).
        let engine = unsafe { args::get(engine, "engine") }?;
        engine.check_task(task)?;
        engine.engine.prepare(task)?;
        Ok(())
    })
}

/// Writes to `*bytes` the materialized weight bytes of the tasks currently cached.
///
/// # Safety
/// `engine` is NULL or a live engine; `bytes` is NULL or valid for writing a `size_t`.
#[no_mangle]
pub unsafe extern "C" fn tp_engine_cached_bytes(
    engine: *const TpEngine,
    bytes: *mut usize,
) -> TpStatus {
    // SAFETY: the contract above is `query`'s.
    unsafe {
        args::query(
            "tp_engine_cached_bytes",
            engine,
            "engine",
            bytes,
            "bytes",
            |h| Ok(h.engine.cached_bytes()),
        )
    }
}

/// One input or output of a task's graph. Its pointers are owned by the engine and valid until
/// `tp_engine_free`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct TpIoInfo {
    /// The ONNX name, NUL-terminated.
    pub name: *const c_char,
    /// Element type: a `TpDType` value, or `TP_DTYPE_OTHER` for a type the C API has no code
    /// for.
    pub dtype: i32,
    /// Number of dimensions.
    pub rank: usize,
    /// `rank` dimensions; -1 for a symbolic one (e.g. the batch size, free at run time).
    pub shape: *const i64,
}

#[derive(Clone, Copy)]
enum Side {
    Input,
    Output,
}

impl Side {
    fn of(self, io: &TaskIo) -> &[Io] {
        match self {
            Side::Input => &io.inputs,
            Side::Output => &io.outputs,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Side::Input => "input",
            Side::Output => "output",
        }
    }
}

/// # Safety
/// `engine` is NULL or a live engine; `count` is NULL or valid for writing a `size_t`.
unsafe fn io_count(
    name: &str,
    side: Side,
    engine: *const TpEngine,
    task: usize,
    count: *mut usize,
) -> TpStatus {
    // SAFETY: forwarded contract.
    unsafe {
        args::query(name, engine, "engine", count, "count", |e| {
            Ok(side.of(e.task_io(task)?).len())
        })
    }
}

/// The `index`-th input or output of task `task`, which lives as long as the engine.
fn io_entry(engine: &TpEngine, side: Side, task: usize, index: usize) -> Result<&Io, Failure> {
    let io = engine.task_io(task)?;
    let list = side.of(io);
    if index >= list.len() {
        return Err(Failure::invalid(format!(
            "{} index {index} out of range (task {:?} has {})",
            side.word(),
            engine.task_name(task)?,
            list.len()
        )));
    }
    Ok(&list[index])
}

/// # Safety
/// `engine` is NULL or a live engine; `info` is NULL or valid for writing a `TpIoInfo`.
unsafe fn io_info(
    name: &str,
    side: Side,
    engine: *const TpEngine,
    task: usize,
    index: usize,
    info: *mut TpIoInfo,
) -> TpStatus {
    guard(name, || {
        // SAFETY: `info` is NULL or writable (contract).
        let info = unsafe { args::out(info, "info") }?;
        *info = TpIoInfo {
            name: std::ptr::null(),
            dtype: 0,
            rank: 0,
            shape: std::ptr::null(),
        };
        // SAFETY: `engine` is NULL or live (contract).
        let engine = unsafe { args::get(engine, "engine") }?;
        let entry = io_entry(engine, side, task, index)?;
        *info = TpIoInfo {
            name: entry.name.as_ptr(),
            dtype: dtype_code(entry.dtype),
            rank: entry.shape.len(),
            shape: entry.shape.as_ptr(),
        };
        Ok(())
    })
}

/// # Safety
/// `engine` is NULL or a live engine; `shape` is NULL or valid for writing `capacity`
/// `int64_t`s; `rank` is NULL or valid for writing a `size_t`.
#[allow(clippy::too_many_arguments)]
unsafe fn io_shape(
    name: &str,
    side: Side,
    engine: *const TpEngine,
    task: usize,
    index: usize,
    shape: *mut i64,
    capacity: usize,
    rank: *mut usize,
) -> TpStatus {
    guard(name, || {
        // SAFETY: `rank` is NULL or writable (contract).
        let rank = unsafe { args::out(rank, "rank") }?;
        *rank = 0;
        // SAFETY: `engine` is NULL or live (contract).
        let engine = unsafe { args::get(engine, "engine") }?;
        // SAFETY: `shape` is NULL or writable for `capacity` elements (contract).
        let shape = unsafe { args::slice_mut(shape, capacity, "shape") }?;
        let entry = io_entry(engine, side, task, index)?;
        *rank = entry.shape.len();
        let Some(dst) = shape.get_mut(..entry.shape.len()) else {
            return Err(Failure::new(
                TpStatus::TP_BUFFER_TOO_SMALL,
                format!(
                    "{} {index} has rank {}, `shape` holds {capacity}",
                    side.word(),
                    entry.shape.len()
                ),
            ));
        };
        dst.copy_from_slice(&entry.shape);
        Ok(())
    })
}

/// Writes to `*count` the number of inputs of task `task`'s graph.
///
/// # Safety
/// `engine` is NULL or a live engine; `count` is NULL or valid for writing a `size_t`.
#[no_mangle]
pub unsafe extern "C" fn tp_engine_input_count(
    engine: *const TpEngine,
    task: usize,
    count: *mut usize,
) -> TpStatus {
    // SAFETY: forwarded contract.
    unsafe { io_count("tp_engine_input_count", Side::Input, engine, task, count) }
}

/// Writes to `*count` the number of outputs of task `task`'s graph.
///
/// # Safety
/// As for `tp_engine_input_count`.
#[no_mangle]
pub unsafe extern "C" fn tp_engine_output_count(
    engine: *const TpEngine,
    task: usize,
    count: *mut usize,
) -> TpStatus {
    // SAFETY: forwarded contract.
    unsafe { io_count("tp_engine_output_count", Side::Output, engine, task, count) }
}

/// Describes input `index` of task `task`'s graph (name, element type, shape). On failure
/// `*info` is zeroed; `TP_INVALID_ARGUMENT` for an input index out of range.
///
/// # Safety
/// `engine` is NULL or a live engine; `info` is NULL or valid for writing a `TpIoInfo`.
#[no_mangle]
pub unsafe extern "C" fn tp_engine_input_info(
    engine: *const TpEngine,
    task: usize,
    index: usize,
    info: *mut TpIoInfo,
) -> TpStatus {
    // SAFETY: forwarded contract.
    unsafe {
        io_info(
            "tp_engine_input_info",
            Side::Input,
            engine,
            task,
            index,
            info,
        )
    }
}

/// Describes output `index` of task `task`'s graph.
///
/// # Safety
/// As for `tp_engine_input_info`.
#[no_mangle]
pub unsafe extern "C" fn tp_engine_output_info(
    engine: *const TpEngine,
    task: usize,
    index: usize,
    info: *mut TpIoInfo,
) -> TpStatus {
    // SAFETY: forwarded contract.
    unsafe {
        io_info(
            "tp_engine_output_info",
            Side::Output,
            engine,
            task,
            index,
            info,
        )
    }
}

/// Copies the shape of input `index` of task `task` into `shape` (-1 for a symbolic dimension)
/// and writes its rank to `*rank`. `TP_BUFFER_TOO_SMALL` if `capacity` is below the rank
/// (`*rank` still holds it; `shape` may be NULL when `capacity` is 0, to ask for the rank).
///
/// # Safety
/// `engine` is NULL or a live engine; `shape` is NULL or valid for writing `capacity`
/// `int64_t`s; `rank` is NULL or valid for writing a `size_t`.
#[no_mangle]
pub unsafe extern "C" fn tp_engine_input_shape(
    engine: *const TpEngine,
    task: usize,
    index: usize,
    shape: *mut i64,
    capacity: usize,
    rank: *mut usize,
) -> TpStatus {
    // SAFETY: forwarded contract.
    unsafe {
        io_shape(
            "tp_engine_input_shape",
            Side::Input,
            engine,
            task,
            index,
            shape,
            capacity,
            rank,
        )
    }
}

/// Like `tp_engine_input_shape`, for output `index`.
///
/// # Safety
/// As for `tp_engine_input_shape`.
#[no_mangle]
pub unsafe extern "C" fn tp_engine_output_shape(
    engine: *const TpEngine,
    task: usize,
    index: usize,
    shape: *mut i64,
    capacity: usize,
    rank: *mut usize,
) -> TpStatus {
    // SAFETY: forwarded contract.
    unsafe {
        io_shape(
            "tp_engine_output_shape",
            Side::Output,
            engine,
            task,
            index,
            shape,
            capacity,
            rank,
        )
    }
}

// C callers share engines between threads.
const _: fn() = || {
    fn check<T: Send + Sync>() {}
    check::<TpEngine>();
};
