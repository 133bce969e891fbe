//! Running a task: the f32 single-input single-output form, and the general form with typed
//! tensors in and an owned `TpOutputs` out.

use std::ffi::c_void;

use taskpack_core::runtime::{tvec, DatumType, TValue, TVec, Tensor};

use crate::args;
use crate::engine::{describe, Io, TpEngine};
use crate::status::{guard, Failure, TpStatus};

/// Element types (the `dtype` fields of `TpTensor` and `TpIoInfo`).
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TpDType {
    /// A type the C API has no code for (strings, quantized or complex numbers...).
    TP_DTYPE_OTHER = 0,
    /// `float`.
    TP_DTYPE_F32 = 1,
    /// `double`.
    TP_DTYPE_F64 = 2,
    /// IEEE 754 half precision, as `uint16_t` bits.
    TP_DTYPE_F16 = 3,
    /// `int8_t`.
    TP_DTYPE_I8 = 4,
    /// `int16_t`.
    TP_DTYPE_I16 = 5,
    /// `int32_t`.
    TP_DTYPE_I32 = 6,
    /// `int64_t`.
    TP_DTYPE_I64 = 7,
    /// `uint8_t`.
    TP_DTYPE_U8 = 8,
    /// `uint16_t`.
    TP_DTYPE_U16 = 9,
    /// `uint32_t`.
    TP_DTYPE_U32 = 10,
    /// `uint64_t`.
    TP_DTYPE_U64 = 11,
    /// One byte per element, 0 or 1.
    TP_DTYPE_BOOL = 12,
}

const DTYPES: [(TpDType, DatumType); 12] = [
    (TpDType::TP_DTYPE_F32, DatumType::F32),
    (TpDType::TP_DTYPE_F64, DatumType::F64),
    (TpDType::TP_DTYPE_F16, DatumType::F16),
    (TpDType::TP_DTYPE_I8, DatumType::I8),
    (TpDType::TP_DTYPE_I16, DatumType::I16),
    (TpDType::TP_DTYPE_I32, DatumType::I32),
    (TpDType::TP_DTYPE_I64, DatumType::I64),
    (TpDType::TP_DTYPE_U8, DatumType::U8),
    (TpDType::TP_DTYPE_U16, DatumType::U16),
    (TpDType::TP_DTYPE_U32, DatumType::U32),
    (TpDType::TP_DTYPE_U64, DatumType::U64),
    (TpDType::TP_DTYPE_BOOL, DatumType::Bool),
];

/// The `TpDType` code of `dtype` (`TP_DTYPE_OTHER` if it has none).
pub(crate) fn dtype_code(dtype: DatumType) -> i32 {
    DTYPES
        .iter()
        .find(|(_, d)| *d == dtype)
        .map_or(TpDType::TP_DTYPE_OTHER, |(c, _)| *c) as i32
}

fn dtype_of(code: i32) -> Option<DatumType> {
    DTYPES
        .iter()
        .find(|(c, _)| *c as i32 == code)
        .map(|(_, d)| *d)
}

/// A tensor passed by pointer: its element type, its elements (row-major, contiguous) and its
/// shape. As an input, the caller owns both buffers and they need only live during the call;
/// as an output (`tp_outputs_get`), they belong to the `TpOutputs`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct TpTensor {
    /// Element type, a `TpDType` value.
    pub dtype: i32,
    /// The elements: product(shape) of them (may be NULL if that is 0).
    pub data: *const c_void,
    /// `rank` dimensions (may be NULL if `rank` is 0).
    pub shape: *const i64,
    /// Number of dimensions.
    pub rank: usize,
}

/// The outputs of one `tp_engine_run` call (opaque): read them with `tp_outputs_count` and
/// `tp_outputs_get`, release them with `tp_outputs_free`. Independent of the engine once made.
pub struct TpOutputs {
    tensors: Vec<(TValue, Vec<i64>)>,
}

/// A C shape as `usize` dimensions, and its element count.
fn dims(shape: &[i64], name: &str) -> Result<(Vec<usize>, usize), Failure> {
    let dims = shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| Failure::invalid(format!("`{name}` {shape:?} has a negative dimension")))?;
    let count = dims
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| Failure::invalid(format!("`{name}` {shape:?} overflows")))?;
    Ok((dims, count))
}

fn check_input(
    engine: &TpEngine,
    task: usize,
    io: &Io,
    dtype: DatumType,
    dims: &[usize],
) -> Result<(), Failure> {
    if io.accepts(dtype, dims) {
        return Ok(());
    }
    Err(Failure::new(
        TpStatus::TP_BAD_INPUT,
        format!(
            "input {:?} of task {:?}: expected {}, got {}",
            io.name,
            engine.task_name(task)?,
            io.describe(),
            describe(dtype, dims.iter().map(|&d| d as i64)),
        ),
    ))
}

fn runtime(action: &str, e: impl std::fmt::Display) -> Failure {
    Failure::new(TpStatus::TP_RUNTIME, format!("{action}: {e:#}"))
}

/// Runs task `task` of a graph with ONE f32 input and ONE f32 output (the common case).
///
/// `input` holds product(`shape`) floats, row-major; `shape` has `rank` dimensions and must
/// match the task's input (`tp_engine_input_shape`; a dimension given as -1 there is free, e.g.
/// the batch size), else `TP_BAD_INPUT`. The output's element count and rank are written to
/// `*output_len` and `*output_rank`; its elements to `output` (capacity `output_capacity`
/// floats) and its shape to `output_shape` (capacity `output_shape_capacity`). If either buffer
/// is too small, nothing is copied and the call returns `TP_BUFFER_TOO_SMALL` with
/// `*output_len` / `*output_rank` set, so the caller can resize and call again; a buffer may be
/// NULL when its capacity is 0. On any other failure both lengths are 0.
/// `TP_UNSUPPORTED` if the task's graph has more than one input or output, or other types
/// (use `tp_engine_run`). `input` and `output` may overlap.
///
/// # Safety
/// `engine` is NULL or a live engine; `input` is NULL or readable for product(shape) floats;
/// `shape` is NULL or readable for `rank` `int64_t`s; `output` is NULL or writable for
/// `output_capacity` floats; `output_shape` is NULL or writable for `output_shape_capacity`
/// `int64_t`s; `output_len` and `output_rank` are NULL or writable `size_t`s.
// About 100 lines, kept as one sequence on purpose: each raw argument is checked once, in the
// order the contract lists them, next to the SAFETY comment of its dereference.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn tp_engine_run_f32(
    engine: *const TpEngine,
    task: usize,
    input: *const f32,
    shape: *const i64,
    rank: usize,
    output: *mut f32,
    output_capacity: usize,
    output_len: *mut usize,
    output_shape: *mut i64,
    output_shape_capacity: usize,
    output_rank: *mut usize,
) -> TpStatus {
    guard("tp_engine_run_f32", || {
        // SAFETY: `output_len` is NULL or writable (contract).
        let output_len = unsafe { args::out(output_len, "output_len") }?;
        *output_len = 0;
        // SAFETY: `output_rank` is NULL or writable (contract).
        let output_rank = unsafe { args::out(output_rank, "output_rank") }?;
        *output_rank = 0;
        // SAFETY: `engine` is NULL or live (contract).
        let engine = unsafe { args::get(engine, "engine") }?;
        if output_capacity > 0 {
            args::non_null(output, "output")?;
        }
        if output_shape_capacity > 0 {
            args::non_null(output_shape, "output_shape")?;
        }
        // SAFETY: `shape` is NULL or readable for `rank` dimensions (contract).
        let shape = unsafe { args::slice(shape, rank, "shape") }?;
        let (dims, count) = dims(shape, "shape")?;
        if count > 0 {
            args::non_null(input, "input")?;
        }

        let io = engine.task_io(task)?;
        let name = engine.task_name(task)?;
        if io.inputs.len() != 1 || io.outputs.len() != 1 {
            return Err(Failure::new(
                TpStatus::TP_UNSUPPORTED,
                format!(
                    "task {name:?} has {} inputs and {} outputs; tp_engine_run_f32 takes one \
                     of each (use tp_engine_run)",
                    io.inputs.len(),
                    io.outputs.len()
                ),
            ));
        }
        check_input(engine, task, &io.inputs[0], DatumType::F32, &dims)?;

        // The input is copied into the tensor and its slice dropped before `output` is
        // borrowed, so the two may overlap.
        let tensor = {
            // SAFETY: `input` is readable for `count` floats (contract).
            let input = unsafe { args::slice(input, count, "input") }?;
            Tensor::from_shape(&dims, input).map_err(|e| runtime("copy the input", e))?
        };
        let outputs = engine.engine.run(task, tvec!(tensor.into()))?;
        let Some(out) = outputs.first().filter(|_| outputs.len() == 1) else {
            return Err(Failure::new(
                TpStatus::TP_UNSUPPORTED,
                format!("task {name:?} returned {} outputs", outputs.len()),
            ));
        };
        if out.datum_type() != DatumType::F32 {
            return Err(Failure::new(
                TpStatus::TP_UNSUPPORTED,
                format!(
                    "the output of task {name:?} is {:?}, not F32 (use tp_engine_run)",
                    out.datum_type()
                ),
            ));
        }
        let values = out
            .try_as_plain_ram()
            .and_then(|v| v.as_slice::<f32>())
            .map_err(|e| runtime("read the output", e))?;
        *output_len = values.len();
        *output_rank = out.rank();
        if output_capacity < values.len() || output_shape_capacity < out.rank() {
            return Err(Failure::new(
                TpStatus::TP_BUFFER_TOO_SMALL,
                format!(
                    "the output of task {name:?} has shape {:?}: {} floats and {} dimensions, \
                     the buffers hold {output_capacity} and {output_shape_capacity}",
                    out.shape(),
                    values.len(),
                    out.rank()
                ),
            ));
        }
        // SAFETY: `output` is writable for `output_capacity` floats (contract); the input slice
        // is gone.
        let output = unsafe { args::slice_mut(output, output_capacity, "output") }?;
        output[..values.len()].copy_from_slice(values);
        // SAFETY: `output_shape` is writable for `output_shape_capacity` dimensions (contract).
        let output_shape =
            unsafe { args::slice_mut(output_shape, output_shape_capacity, "output_shape") }?;
        for (dst, &d) in output_shape.iter_mut().zip(out.shape()) {
            *dst = d as i64;
        }
        Ok(())
    })
}

/// Runs task `task` on `input_count` tensors, one per graph input in graph order (see
/// `tp_engine_input_info`), and hands the outputs to `*outputs` (release them with
/// `tp_outputs_free`). `TP_BAD_INPUT` if their number, element types or shapes do not fit;
/// `TP_INVALID_ARGUMENT` for an unknown `dtype` code or a BOOL byte other than 0 or 1. Input
/// data need not be aligned. On failure `*outputs` is set to NULL.
///
/// # Safety
/// `engine` is NULL or a live engine; `inputs` is NULL or readable for `input_count`
/// `TpTensor`s, each with `shape` readable for `rank` dimensions and `data` readable for
/// product(shape) elements of its type; `outputs` is NULL or valid for writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn tp_engine_run(
    engine: *const TpEngine,
    task: usize,
    inputs: *const TpTensor,
    input_count: usize,
    outputs: *mut *mut TpOutputs,
) -> TpStatus {
    guard("tp_engine_run", || {
        // SAFETY: `outputs` is NULL or writable (contract).
        let outputs = unsafe { args::out(outputs, "outputs") }?;
        *outputs = std::ptr::null_mut();
        // SAFETY: `engine` is NULL or live (contract).
        let engine = unsafe { args::get(engine, "engine") }?;
        args::non_null(inputs, "inputs")?;
        // SAFETY: `inputs` is readable for `input_count` tensors (contract).
        let inputs = unsafe { args::slice(inputs, input_count, "inputs") }?;
        let io = engine.task_io(task)?;
        if inputs.len() != io.inputs.len() {
            return Err(Failure::new(
                TpStatus::TP_BAD_INPUT,
                format!(
                    "task {:?} takes {} input(s), got {}",
                    engine.task_name(task)?,
                    io.inputs.len(),
                    inputs.len()
                ),
            ));
        }
        let mut values: TVec<TValue> = TVec::new();
        for (i, (input, want)) in inputs.iter().zip(&io.inputs).enumerate() {
            let Some(dtype) = dtype_of(input.dtype) else {
                return Err(Failure::invalid(format!(
                    "inputs[{i}].dtype: unknown TpDType code {}",
                    input.dtype
                )));
            };
            // SAFETY: `shape` is readable for `rank` dimensions (contract).
            let shape = unsafe { args::slice(input.shape, input.rank, "inputs[].shape") }?;
            let (dims, count) = dims(shape, "inputs[].shape")?;
            check_input(engine, task, want, dtype, &dims)?;
            let bytes = count
                .checked_mul(dtype.size_of())
                .ok_or_else(|| Failure::invalid(format!("inputs[{i}] is too large")))?;
            // SAFETY: `data` is readable for `count` elements of `dtype`, i.e. `bytes` bytes
            // (contract); read as bytes, so no alignment is required.
            let data = unsafe { args::slice(input.data.cast::<u8>(), bytes, "inputs[].data") }?;
            if dtype == DatumType::Bool && data.iter().any(|&b| b > 1) {
                return Err(Failure::invalid(format!(
                    "inputs[{i}]: a BOOL element is neither 0 nor 1"
                )));
            }
            // SAFETY: `data` holds exactly product(dims) valid elements of `dtype`: its length
            // was computed from them, every bit pattern is valid for the numeric types, and
            // BOOL bytes were checked above.
            let tensor = unsafe { Tensor::from_raw_dt(dtype, &dims, data) }
                .map_err(|e| runtime("copy the input", e))?;
            values.push(tensor.into());
        }
        let result = engine.engine.run(task, values)?;
        let tensors = result
            .into_iter()
            .map(|t| {
                let shape = t.shape().iter().map(|&d| d as i64).collect();
                (t, shape)
            })
            .collect();
        *outputs = Box::into_raw(Box::new(TpOutputs { tensors }));
        Ok(())
    })
}

/// Writes to `*count` the number of tensors in `outputs`.
///
/// # Safety
/// `outputs` is NULL or a live `TpOutputs`; `count` is NULL or valid for writing a `size_t`.
#[no_mangle]
pub unsafe extern "C" fn tp_outputs_count(
    outputs: *const TpOutputs,
    count: *mut usize,
) -> TpStatus {
    // SAFETY: the contract above is `query`'s.
    unsafe {
        args::query(
            "tp_outputs_count",
            outputs,
            "outputs",
            count,
            "count",
            |h| Ok(h.tensors.len()),
        )
    }
}

/// Describes output `index` in `*tensor`; its `data` and `shape` belong to `outputs` and stay
/// valid until `tp_outputs_free`. `TP_INVALID_ARGUMENT` for an index out of range,
/// `TP_UNSUPPORTED` for an element type without a `TpDType` code. On failure `*tensor` is
/// zeroed.
///
/// # Safety
/// `outputs` is NULL or a live `TpOutputs`; `tensor` is NULL or valid for writing a `TpTensor`.
#[no_mangle]
pub unsafe extern "C" fn tp_outputs_get(
    outputs: *const TpOutputs,
    index: usize,
    tensor: *mut TpTensor,
) -> TpStatus {
    guard("tp_outputs_get", || {
        // SAFETY: `tensor` is NULL or writable (contract).
        let tensor = unsafe { args::out(tensor, "tensor") }?;
        *tensor = TpTensor {
            dtype: 0,
            data: std::ptr::null(),
            shape: std::ptr::null(),
            rank: 0,
        };
        // SAFETY: `outputs` is NULL or live (contract).
        let outputs = unsafe { args::get(outputs, "outputs") }?;
        let Some((value, shape)) = outputs.tensors.get(index) else {
            return Err(Failure::invalid(format!(
                "output index {index} out of range (there are {})",
                outputs.tensors.len()
            )));
        };
        let dtype = dtype_code(value.datum_type());
        if dtype == TpDType::TP_DTYPE_OTHER as i32 {
            return Err(Failure::new(
                TpStatus::TP_UNSUPPORTED,
                format!(
                    "output {index} is {:?}, which has no TpDType code",
                    value.datum_type()
                ),
            ));
        }
        let data = value
            .try_as_plain_ram()
            .map_err(|e| runtime("read the output", e))?
            .as_bytes();
        *tensor = TpTensor {
            dtype,
            data: data.as_ptr().cast(),
            shape: shape.as_ptr(),
            rank: shape.len(),
        };
        Ok(())
    })
}

/// Releases `*outputs` and sets `*outputs` to NULL; a no-op if `*outputs` is already NULL.
/// `TP_NULL_ARGUMENT` if `outputs` itself is NULL.
///
/// # Safety
/// `outputs` is NULL or valid for reading and writing a pointer; `*outputs` is NULL or a live
/// `TpOutputs` that no other thread is using.
#[no_mangle]
pub unsafe extern "C" fn tp_outputs_free(outputs: *mut *mut TpOutputs) -> TpStatus {
    guard("tp_outputs_free", || {
        // SAFETY: the contract above is `release`'s.
        unsafe { args::release(outputs, "outputs") }
    })
}

// C callers share handles between threads.
const _: fn() = || {
    fn check<T: Send + Sync>() {}
    check::<TpOutputs>();
};
