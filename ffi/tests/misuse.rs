//! The C ABI called from Rust through the rlib, as a careless C caller would: NULL pointers,
//! double frees, bad task indices and names, wrong shapes, small buffers, panics, threads.

use std::ffi::{c_char, CStr, CString};
use std::ptr::{null, null_mut, NonNull};

use taskpack::TpStatus::*;
use taskpack::*;

use crate::common::{assert_close, expect, last_error, Demo};

/// A bundle and an engine opened through the C ABI.
struct Open {
    bundle: *mut TpBundle,
    engine: *mut TpEngine,
}

impl Open {
    fn new(demo: &Demo) -> Open {
        let path = demo.c_path();
        let mut bundle = null_mut();
        let mut engine = null_mut();
        // SAFETY: a NUL-terminated path and writable out-pointers.
        expect(unsafe { tp_bundle_open(path.as_ptr(), &mut bundle) }, TP_OK);
        // SAFETY: a live bundle and a writable out-pointer.
        expect(unsafe { tp_engine_new(bundle, 0, &mut engine) }, TP_OK);
        Open { bundle, engine }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        // SAFETY: our own handles (or NULL), freed once here and nulled.
        unsafe {
            tp_engine_free(&mut self.engine);
            tp_bundle_free(&mut self.bundle);
        }
    }
}

/// Output of [`run_f32`]: status, values, shape, and the reported length and rank.
struct Run {
    status: TpStatus,
    values: Vec<f32>,
    shape: Vec<i64>,
    len: usize,
    rank: usize,
}

/// `tp_engine_run_f32` with buffers of the given capacities.
fn run_f32(
    engine: *const TpEngine,
    task: usize,
    input: &[f32],
    shape: &[i64],
    capacity: usize,
    shape_capacity: usize,
) -> Run {
    let mut values = vec![f32::NAN; capacity];
    let mut out_shape = vec![-7i64; shape_capacity];
    let (mut len, mut rank) = (usize::MAX, usize::MAX);
    // SAFETY: every buffer is valid for its stated length; `engine` is live or NULL.
    let status = unsafe {
        tp_engine_run_f32(
            engine,
            task,
            input.as_ptr(),
            shape.as_ptr(),
            shape.len(),
            values.as_mut_ptr(),
            capacity,
            &mut len,
            out_shape.as_mut_ptr(),
            shape_capacity,
            &mut rank,
        )
    };
    Run {
        status,
        values,
        shape: out_shape,
        len,
        rank,
    }
}

fn task_name(engine: *const TpEngine, task: usize) -> Result<String, TpStatus> {
    let mut name: *const c_char = null();
    // SAFETY: a live engine and a writable out-pointer.
    match unsafe { tp_engine_task_name(engine, task, &mut name) } {
        // SAFETY: on TP_OK, a NUL-terminated string owned by the engine.
        TP_OK => Ok(unsafe { CStr::from_ptr(name) }.to_str().unwrap().into()),
        status => {
            assert!(name.is_null(), "the out-pointer is nulled on failure");
            Err(status)
        }
    }
}

#[test]
fn null_pointers_give_null_argument_and_null_outputs() {
    let demo = Demo::new();
    let open = Open::new(&demo);
    let path = demo.c_path();
    let name = CString::new("mnist").unwrap();
    let (e, b) = (
        open.engine as *const TpEngine,
        open.bundle as *const TpBundle,
    );
    // Non-NULL garbage that must come back NULL.
    let mut handle: *mut TpBundle = NonNull::dangling().as_ptr();
    let mut engine_out: *mut TpEngine = NonNull::dangling().as_ptr();
    let mut outputs: *mut TpOutputs = NonNull::dangling().as_ptr();
    let (mut n, mut text, mut io) = (7usize, null::<c_char>(), std::mem::MaybeUninit::uninit());
    let mut tensor = std::mem::MaybeUninit::uninit();
    let mut dims = [0i64; 4];
    let x = [0f32; 784];
    let shape = [1i64, 1, 28, 28];
    let mut y = [0f32; 16];
    // SAFETY: every non-NULL argument is valid; NULL is what is being tested.
    let cases: Vec<(&str, TpStatus)> = unsafe {
        vec![
            ("open path", tp_bundle_open(null(), &mut handle)),
            ("open out", tp_bundle_open(path.as_ptr(), null_mut())),
            ("read path", tp_bundle_read(null(), &mut handle)),
            ("read out", tp_bundle_read(path.as_ptr(), null_mut())),
            (
                "memory data",
                tp_bundle_from_memory(null(), 10, &mut handle),
            ),
            (
                "memory out",
                tp_bundle_from_memory(b"x".as_ptr(), 1, null_mut()),
            ),
            ("verify", tp_bundle_verify(null())),
            ("bundle free", tp_bundle_free(null_mut())),
            ("engine bundle", tp_engine_new(null(), 0, &mut engine_out)),
            ("engine out", tp_engine_new(b, 0, null_mut())),
            ("engine free", tp_engine_free(null_mut())),
            ("count engine", tp_engine_task_count(null(), &mut n)),
            ("count out", tp_engine_task_count(e, null_mut())),
            ("name engine", tp_engine_task_name(null(), 0, &mut text)),
            ("name out", tp_engine_task_name(e, 0, null_mut())),
            (
                "index engine",
                tp_engine_task_index(null(), name.as_ptr(), &mut n),
            ),
            ("index name", tp_engine_task_index(e, null(), &mut n)),
            (
                "index out",
                tp_engine_task_index(e, name.as_ptr(), null_mut()),
            ),
            ("prepare", tp_engine_prepare(null(), 0)),
            ("cached engine", tp_engine_cached_bytes(null(), &mut n)),
            ("cached out", tp_engine_cached_bytes(e, null_mut())),
            (
                "input count engine",
                tp_engine_input_count(null(), 0, &mut n),
            ),
            ("input count out", tp_engine_input_count(e, 0, null_mut())),
            (
                "output count engine",
                tp_engine_output_count(null(), 0, &mut n),
            ),
            ("output count out", tp_engine_output_count(e, 0, null_mut())),
            (
                "input info engine",
                tp_engine_input_info(null(), 0, 0, io.as_mut_ptr()),
            ),
            ("input info out", tp_engine_input_info(e, 0, 0, null_mut())),
            (
                "output info engine",
                tp_engine_output_info(null(), 0, 0, io.as_mut_ptr()),
            ),
            (
                "output info out",
                tp_engine_output_info(e, 0, 0, null_mut()),
            ),
            (
                "input shape engine",
                tp_engine_input_shape(null(), 0, 0, dims.as_mut_ptr(), 4, &mut n),
            ),
            (
                "input shape buffer",
                tp_engine_input_shape(e, 0, 0, null_mut(), 4, &mut n),
            ),
            (
                "input shape rank",
                tp_engine_input_shape(e, 0, 0, dims.as_mut_ptr(), 4, null_mut()),
            ),
            (
                "output shape engine",
                tp_engine_output_shape(null(), 0, 0, dims.as_mut_ptr(), 4, &mut n),
            ),
            (
                "output shape rank",
                tp_engine_output_shape(e, 0, 0, dims.as_mut_ptr(), 4, null_mut()),
            ),
            (
                "run f32 engine",
                tp_engine_run_f32(
                    null(),
                    0,
                    x.as_ptr(),
                    shape.as_ptr(),
                    4,
                    y.as_mut_ptr(),
                    16,
                    &mut n,
                    dims.as_mut_ptr(),
                    4,
                    &mut n,
                ),
            ),
            (
                "run f32 input",
                tp_engine_run_f32(
                    e,
                    0,
                    null(),
                    shape.as_ptr(),
                    4,
                    y.as_mut_ptr(),
                    16,
                    &mut n,
                    dims.as_mut_ptr(),
                    4,
                    &mut n,
                ),
            ),
            (
                "run f32 shape",
                tp_engine_run_f32(
                    e,
                    0,
                    x.as_ptr(),
                    null(),
                    4,
                    y.as_mut_ptr(),
                    16,
                    &mut n,
                    dims.as_mut_ptr(),
                    4,
                    &mut n,
                ),
            ),
            (
                "run f32 output",
                tp_engine_run_f32(
                    e,
                    0,
                    x.as_ptr(),
                    shape.as_ptr(),
                    4,
                    null_mut(),
                    16,
                    &mut n,
                    dims.as_mut_ptr(),
                    4,
                    &mut n,
                ),
            ),
            (
                "run f32 len",
                tp_engine_run_f32(
                    e,
                    0,
                    x.as_ptr(),
                    shape.as_ptr(),
                    4,
                    y.as_mut_ptr(),
                    16,
                    null_mut(),
                    dims.as_mut_ptr(),
                    4,
                    &mut n,
                ),
            ),
            (
                "run f32 out shape",
                tp_engine_run_f32(
                    e,
                    0,
                    x.as_ptr(),
                    shape.as_ptr(),
                    4,
                    y.as_mut_ptr(),
                    16,
                    &mut n,
                    null_mut(),
                    4,
                    &mut n,
                ),
            ),
            (
                "run f32 rank",
                tp_engine_run_f32(
                    e,
                    0,
                    x.as_ptr(),
                    shape.as_ptr(),
                    4,
                    y.as_mut_ptr(),
                    16,
                    &mut n,
                    dims.as_mut_ptr(),
                    4,
                    null_mut(),
                ),
            ),
            (
                "run engine",
                tp_engine_run(null(), 0, null(), 0, &mut outputs),
            ),
            ("run inputs", tp_engine_run(e, 0, null(), 1, &mut outputs)),
            ("run out", tp_engine_run(e, 0, null(), 0, null_mut())),
            ("outputs count", tp_outputs_count(null(), &mut n)),
            (
                "outputs get",
                tp_outputs_get(null(), 0, tensor.as_mut_ptr()),
            ),
            ("outputs free", tp_outputs_free(null_mut())),
        ]
    };
    for (what, status) in cases {
        assert_eq!(status, TP_NULL_ARGUMENT, "{what}");
    }
    // The last call's message names the argument.
    assert_eq!(last_error(), "argument `outputs` is NULL");
    assert!(handle.is_null() && engine_out.is_null() && outputs.is_null());
    assert!(text.is_null());
}

#[test]
fn free_nulls_the_handle_and_a_second_free_is_a_no_op() {
    let demo = Demo::new();
    let mut open = Open::new(&demo);
    // The engine holds its own reference: freeing the bundle first is fine.
    // SAFETY: our live bundle, freed through its variable.
    expect(unsafe { tp_bundle_free(&mut open.bundle) }, TP_OK);
    assert!(open.bundle.is_null());
    // SAFETY: the variable is NULL now: a no-op.
    expect(unsafe { tp_bundle_free(&mut open.bundle) }, TP_OK);
    assert_eq!(task_name(open.engine, 0).unwrap(), demo.tasks[0]);
    // SAFETY: our live engine, freed through its variable, then again as a no-op.
    expect(unsafe { tp_engine_free(&mut open.engine) }, TP_OK);
    assert!(open.engine.is_null());
    // SAFETY: as above.
    expect(unsafe { tp_engine_free(&mut open.engine) }, TP_OK);
    let mut outputs: *mut TpOutputs = null_mut();
    // SAFETY: a NULL handle through a valid variable: a no-op.
    expect(unsafe { tp_outputs_free(&mut outputs) }, TP_OK);
}

#[test]
fn task_names_and_indices_out_of_range_are_errors() {
    let demo = Demo::new();
    let open = Open::new(&demo);
    let mut count = 0;
    // SAFETY: a live engine and a writable count.
    expect(
        unsafe { tp_engine_task_count(open.engine, &mut count) },
        TP_OK,
    );
    assert_eq!(count, demo.tasks.len());
    for (t, name) in demo.tasks.iter().enumerate() {
        assert_eq!(&task_name(open.engine, t).unwrap(), name);
        let c = CString::new(name.as_str()).unwrap();
        let mut index = usize::MAX;
        // SAFETY: a live engine, a NUL-terminated name, a writable index.
        expect(
            unsafe { tp_engine_task_index(open.engine, c.as_ptr(), &mut index) },
            TP_OK,
        );
        assert_eq!(index, t);
    }
    assert_eq!(task_name(open.engine, count), Err(TP_UNKNOWN_TASK));
    assert!(last_error().contains("out of range"), "{}", last_error());
    assert_eq!(task_name(open.engine, usize::MAX), Err(TP_UNKNOWN_TASK));

    let mut index = 0;
    let unknown = CString::new("nope").unwrap();
    // SAFETY: as above.
    let status = unsafe { tp_engine_task_index(open.engine, unknown.as_ptr(), &mut index) };
    expect(status, TP_UNKNOWN_TASK);
    assert_eq!(index, usize::MAX);
    assert!(
        last_error().contains(&demo.tasks[0]),
        "the message lists the tasks"
    );
    let not_utf8 = CString::new(vec![0xffu8, 0xfe]).unwrap();
    // SAFETY: as above.
    let status = unsafe { tp_engine_task_index(open.engine, not_utf8.as_ptr(), &mut index) };
    expect(status, TP_INVALID_ARGUMENT);

    // Every task-taking call refuses the index, never crashes.
    let x = [0f32; 784];
    let run = run_f32(open.engine, count, &x, &[1, 1, 28, 28], 64, 4);
    expect(run.status, TP_UNKNOWN_TASK);
    assert_eq!((run.len, run.rank), (0, 0));
    // SAFETY: a live engine.
    expect(
        unsafe { tp_engine_prepare(open.engine, count + 3) },
        TP_UNKNOWN_TASK,
    );
    let mut n = 0;
    // SAFETY: a live engine, a writable count.
    expect(
        unsafe { tp_engine_input_count(open.engine, count, &mut n) },
        TP_UNKNOWN_TASK,
    );
    let mut outputs = null_mut();
    let shape = [1i64, 1, 28, 28];
    let tensor = TpTensor {
        dtype: TpDType::TP_DTYPE_F32 as i32,
        data: x.as_ptr().cast(),
        shape: shape.as_ptr(),
        rank: 4,
    };
    // SAFETY: one valid tensor, a writable out-pointer.
    expect(
        unsafe { tp_engine_run(open.engine, count, &tensor, 1, &mut outputs) },
        TP_UNKNOWN_TASK,
    );
    assert!(outputs.is_null());
}

#[test]
fn bad_files_and_bytes_are_io_or_invalid_bundle() {
    let demo = Demo::new();
    let mut bundle = null_mut();
    let missing = CString::new(demo.dir.path().join("missing.tpk").to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path, a writable out-pointer.
    expect(
        unsafe { tp_bundle_open(missing.as_ptr(), &mut bundle) },
        TP_IO,
    );
    assert!(last_error().contains("missing.tpk"), "{}", last_error());
    // SAFETY: as above.
    expect(
        unsafe { tp_bundle_read(missing.as_ptr(), &mut bundle) },
        TP_IO,
    );

    let junk_path = demo.dir.path().join("junk.tpk");
    std::fs::write(&junk_path, b"not a bundle at all, just some text").unwrap();
    let junk = CString::new(junk_path.to_str().unwrap()).unwrap();
    // SAFETY: as above.
    expect(
        unsafe { tp_bundle_open(junk.as_ptr(), &mut bundle) },
        TP_INVALID_BUNDLE,
    );
    let bytes = b"TPK? no";
    // SAFETY: `bytes` is readable for its length.
    let status = unsafe { tp_bundle_from_memory(bytes.as_ptr(), bytes.len(), &mut bundle) };
    expect(status, TP_INVALID_BUNDLE);
    assert!(bundle.is_null());

    // A flipped byte in the weights: found at open or, at the latest, by verify.
    let mut bytes = std::fs::read(&demo.path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    // SAFETY: as above.
    let status = unsafe { tp_bundle_from_memory(bytes.as_ptr(), bytes.len(), &mut bundle) };
    if status == TP_OK {
        // SAFETY: the live bundle just made.
        expect(unsafe { tp_bundle_verify(bundle) }, TP_INVALID_BUNDLE);
        // SAFETY: our bundle, freed once.
        expect(unsafe { tp_bundle_free(&mut bundle) }, TP_OK);
    } else {
        expect(status, TP_INVALID_BUNDLE);
    }

    // The good file, read into memory and verified; the caller's buffer can go right away.
    let good = std::fs::read(&demo.path).unwrap();
    // SAFETY: as above.
    expect(
        unsafe { tp_bundle_from_memory(good.as_ptr(), good.len(), &mut bundle) },
        TP_OK,
    );
    drop(good);
    // SAFETY: the live bundle just made.
    expect(unsafe { tp_bundle_verify(bundle) }, TP_OK);
    // SAFETY: our bundle, freed once.
    expect(unsafe { tp_bundle_free(&mut bundle) }, TP_OK);
    let path = demo.c_path();
    // SAFETY: as above.
    expect(unsafe { tp_bundle_read(path.as_ptr(), &mut bundle) }, TP_OK);
    // SAFETY: our bundle, freed once.
    expect(unsafe { tp_bundle_free(&mut bundle) }, TP_OK);
}

#[test]
fn a_panic_is_caught_and_reported() {
    expect(tp_debug_panic(), TP_PANIC);
    assert!(
        last_error().contains("tp_debug_panic was called"),
        "{}",
        last_error()
    );
    // The next call starts afresh.
    let mut n = 0;
    // SAFETY: a NULL engine is refused before use.
    expect(
        unsafe { tp_engine_task_count(null(), &mut n) },
        TP_NULL_ARGUMENT,
    );
    assert_eq!(last_error(), "argument `engine` is NULL");
    let mut bundle = null_mut();
    // SAFETY: a NULL handle through a valid variable.
    expect(unsafe { tp_bundle_free(&mut bundle) }, TP_OK);
}

#[test]
fn the_last_error_is_per_thread() {
    expect(tp_debug_panic(), TP_PANIC);
    std::thread::spawn(|| {
        assert_eq!(last_error(), "");
        let mut n = 0;
        // SAFETY: a NULL engine is refused before use.
        expect(
            unsafe { tp_engine_task_count(null(), &mut n) },
            TP_NULL_ARGUMENT,
        );
    })
    .join()
    .unwrap();
    assert!(last_error().contains("tp_debug_panic"));
}

#[test]
fn status_names_and_version() {
    let name = |s: i32| {
        // SAFETY: tp_status_name returns a static NUL-terminated string.
        unsafe { CStr::from_ptr(tp_status_name(s)) }
            .to_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(name(TP_OK as i32), "TP_OK");
    assert_eq!(name(TP_BUFFER_TOO_SMALL as i32), "TP_BUFFER_TOO_SMALL");
    assert_eq!(name(TP_PANIC as i32), "TP_PANIC");
    assert_eq!(name(-1), "TP_UNKNOWN_STATUS");
    // SAFETY: a static NUL-terminated string.
    let version = unsafe { CStr::from_ptr(tp_version()) };
    assert_eq!(version.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
}

#[test]
fn inputs_and_outputs_are_described() {
    let demo = Demo::new();
    let open = Open::new(&demo);
    let mut n = 0;
    // SAFETY: a live engine, a writable count.
    expect(
        unsafe { tp_engine_input_count(open.engine, 0, &mut n) },
        TP_OK,
    );
    assert_eq!(n, 1);
    // SAFETY: as above.
    expect(
        unsafe { tp_engine_output_count(open.engine, 0, &mut n) },
        TP_OK,
    );
    assert_eq!(n, 1);
    let mut info = std::mem::MaybeUninit::<TpIoInfo>::uninit();
    // SAFETY: a live engine, a writable TpIoInfo.
    expect(
        unsafe { tp_engine_input_info(open.engine, 0, 0, info.as_mut_ptr()) },
        TP_OK,
    );
    // SAFETY: written on TP_OK.
    let info = unsafe { info.assume_init() };
    // SAFETY: the engine's NUL-terminated name and `rank` dimensions, alive with the engine.
    let (name, shape) = unsafe {
        (
            CStr::from_ptr(info.name).to_str().unwrap(),
            std::slice::from_raw_parts(info.shape, info.rank),
        )
    };
    assert_eq!(name, "image");
    assert_eq!(info.dtype, TpDType::TP_DTYPE_F32 as i32);
    assert_eq!(shape, [-1, 1, 28, 28]);

    let mut dims = [0i64; 8];
    let mut rank = 0;
    // SAFETY: a live engine, `dims` writable for 8, a writable rank.
    let status =
        unsafe { tp_engine_input_shape(open.engine, 0, 0, dims.as_mut_ptr(), 8, &mut rank) };
    expect(status, TP_OK);
    assert_eq!(&dims[..rank], [-1, 1, 28, 28]);
    // A buffer too small, then no buffer at all: the rank is reported either way.
    // SAFETY: as above, with the stated capacities.
    let status =
        unsafe { tp_engine_input_shape(open.engine, 0, 0, dims.as_mut_ptr(), 2, &mut rank) };
    expect(status, TP_BUFFER_TOO_SMALL);
    assert_eq!(rank, 4);
    // SAFETY: as above.
    let status = unsafe { tp_engine_output_shape(open.engine, 0, 0, null_mut(), 0, &mut rank) };
    expect(status, TP_BUFFER_TOO_SMALL);
    assert_eq!(rank, 2);
    // SAFETY: as above.
    let status =
        unsafe { tp_engine_output_shape(open.engine, 0, 1, dims.as_mut_ptr(), 8, &mut rank) };
    expect(status, TP_INVALID_ARGUMENT);
    let mut info = std::mem::MaybeUninit::<TpIoInfo>::uninit();
    // SAFETY: a live engine, a writable TpIoInfo.
    let status = unsafe { tp_engine_output_info(open.engine, 0, 3, info.as_mut_ptr()) };
    expect(status, TP_INVALID_ARGUMENT);
    // SAFETY: zeroed on failure.
    assert!(unsafe { info.assume_init() }.name.is_null());
}

#[test]
fn wrong_input_shapes_and_types_are_bad_input() {
    let demo = Demo::new();
    let open = Open::new(&demo);
    let x = vec![0.5f32; 2 * 784];
    for shape in [
        &[2i64, 1, 28, 27][..],
        &[2, 28, 28],
        &[2, 1, 28, 28, 1],
        &[1568],
    ] {
        let run = run_f32(open.engine, 0, &x, shape, 64, 4);
        expect(run.status, TP_BAD_INPUT);
        assert!(
            last_error().contains("expected F32 [N,1,28,28]"),
            "{}",
            last_error()
        );
        assert_eq!((run.len, run.rank), (0, 0));
    }
    let run = run_f32(open.engine, 0, &x, &[2, 1, -28, -28], 64, 4);
    expect(run.status, TP_INVALID_ARGUMENT);
    let run = run_f32(open.engine, 0, &x, &[i64::MAX, i64::MAX, 2, 2], 64, 4);
    expect(run.status, TP_INVALID_ARGUMENT);

    let mut outputs = null_mut();
    let shape = [2i64, 1, 28, 28];
    let ints = vec![0i64; 2 * 784];
    let tensor = |dtype: TpDType, data: *const std::ffi::c_void| TpTensor {
        dtype: dtype as i32,
        data,
        shape: shape.as_ptr(),
        rank: 4,
    };
    let wrong_type = tensor(TpDType::TP_DTYPE_I64, ints.as_ptr().cast());
    // SAFETY: one valid tensor, a writable out-pointer.
    expect(
        unsafe { tp_engine_run(open.engine, 0, &wrong_type, 1, &mut outputs) },
        TP_BAD_INPUT,
    );
    let bad_code = TpTensor {
        dtype: 99,
        ..tensor(TpDType::TP_DTYPE_F32, x.as_ptr().cast())
    };
    // SAFETY: as above.
    expect(
        unsafe { tp_engine_run(open.engine, 0, &bad_code, 1, &mut outputs) },
        TP_INVALID_ARGUMENT,
    );
    let two = [tensor(TpDType::TP_DTYPE_F32, x.as_ptr().cast()); 2];
    // SAFETY: two valid tensors.
    expect(
        unsafe { tp_engine_run(open.engine, 0, two.as_ptr(), 2, &mut outputs) },
        TP_BAD_INPUT,
    );
    // SAFETY: zero tensors from a valid pointer.
    expect(
        unsafe { tp_engine_run(open.engine, 0, two.as_ptr(), 0, &mut outputs) },
        TP_BAD_INPUT,
    );
    assert!(outputs.is_null());
}

#[test]
fn small_buffers_report_the_needed_lengths() {
    let demo = Demo::new();
    let open = Open::new(&demo);
    let case = demo.case(&demo.tasks[0], 3);
    let needed = case.expected.len();
    let run = run_f32(open.engine, 0, &case.input, &case.input_shape, 0, 0);
    expect(run.status, TP_BUFFER_TOO_SMALL);
    assert_eq!((run.len, run.rank), (needed, 2));
    let run = run_f32(
        open.engine,
        0,
        &case.input,
        &case.input_shape,
        needed - 1,
        2,
    );
    expect(run.status, TP_BUFFER_TOO_SMALL);
    assert_eq!(run.len, needed);
    assert!(run.values.iter().all(|v| v.is_nan()), "nothing copied");
    let run = run_f32(open.engine, 0, &case.input, &case.input_shape, needed, 1);
    expect(run.status, TP_BUFFER_TOO_SMALL);
    assert_eq!(run.rank, 2);
    let run = run_f32(
        open.engine,
        0,
        &case.input,
        &case.input_shape,
        needed + 5,
        3,
    );
    expect(run.status, TP_OK);
    assert_eq!((run.len, run.rank), (needed, 2));
    assert_eq!(&run.shape[..2], case.expected_shape);
    assert_eq!(run.shape[2], -7, "untouched past the rank");
    assert_close(&run.values[..needed], &case.expected, &demo.tasks[0]);
    assert!(
        run.values[needed..].iter().all(|v| v.is_nan()),
        "untouched past the length"
    );
}

#[test]
fn the_general_form_matches_the_f32_form() {
    let demo = Demo::new();
    let open = Open::new(&demo);
    for (t, name) in demo.tasks.iter().enumerate() {
        let case = demo.case(name, 4);
        let input = TpTensor {
            dtype: TpDType::TP_DTYPE_F32 as i32,
            data: case.input.as_ptr().cast(),
            shape: case.input_shape.as_ptr(),
            rank: case.input_shape.len(),
        };
        let mut outputs = null_mut();
        // SAFETY: one valid tensor, a writable out-pointer.
        expect(
            unsafe { tp_engine_run(open.engine, t, &input, 1, &mut outputs) },
            TP_OK,
        );
        let mut count = 0;
        // SAFETY: live outputs, a writable count.
        expect(unsafe { tp_outputs_count(outputs, &mut count) }, TP_OK);
        assert_eq!(count, 1);
        let mut tensor = std::mem::MaybeUninit::<TpTensor>::uninit();
        // SAFETY: live outputs, a writable TpTensor.
        expect(
            unsafe { tp_outputs_get(outputs, 0, tensor.as_mut_ptr()) },
            TP_OK,
        );
        // SAFETY: written on TP_OK.
        let tensor = unsafe { tensor.assume_init() };
        assert_eq!(tensor.dtype, TpDType::TP_DTYPE_F32 as i32);
        // SAFETY: the outputs' shape (`rank` dims) and f32 data (product of them), alive until
        // tp_outputs_free.
        let (shape, values) = unsafe {
            let shape = std::slice::from_raw_parts(tensor.shape, tensor.rank);
            let len = shape.iter().product::<i64>() as usize;
            (
                shape.to_vec(),
                std::slice::from_raw_parts(tensor.data.cast::<f32>(), len).to_vec(),
            )
        };
        assert_eq!(shape, case.expected_shape);
        assert_close(&values, &case.expected, name);
        let mut other = std::mem::MaybeUninit::<TpTensor>::uninit();
        // SAFETY: as above.
        expect(
            unsafe { tp_outputs_get(outputs, 1, other.as_mut_ptr()) },
            TP_INVALID_ARGUMENT,
        );
        // SAFETY: our outputs, freed once, then a no-op.
        expect(unsafe { tp_outputs_free(&mut outputs) }, TP_OK);
        assert!(outputs.is_null());
    }
}

#[test]
fn one_engine_serves_many_threads_at_once() {
    let demo = Demo::new();
    let open = Open::new(&demo);
    let cases: Vec<_> = demo.tasks.iter().map(|t| demo.case(t, 8)).collect();
    let engine = open.engine as usize; // raw pointers are not Send; the engine is Sync
    std::thread::scope(|s| {
        for thread in 0..4 {
            let cases = &cases;
            s.spawn(move || {
                for round in 0..3 {
                    let t = (thread + round) % cases.len();
                    let case = &cases[t];
                    let run = run_f32(
                        engine as *const TpEngine,
                        t,
                        &case.input,
                        &case.input_shape,
                        case.expected.len(),
                        2,
                    );
                    expect(run.status, TP_OK);
                    assert_close(
                        &run.values,
                        &case.expected,
                        &format!("thread {thread} task {t}"),
                    );
                }
            });
        }
    });
}

/// A bundle whose stored graph is not ONNX, with every checksum and hash right: the byte-level
/// checks pass, and `tp_bundle_verify` refuses it because it also checks that each graph can
/// run (rule G1 of docs/FORMAT.md), as `taskpack verify` does.
#[test]
fn verify_refuses_a_graph_that_cannot_run() {
    use taskpack_core::format::{sha256_hex, BundleWriter};
    use taskpack_core::runtime::Bundle;

    let demo = Demo::new();
    let original = Bundle::read(&demo.path).unwrap();
    let mut manifest = original.manifest().clone();
    let mut sections: Vec<_> = (0..manifest.sections.len())
        .map(|id| {
            let bytes = original.parsed().section(original.bytes(), id as u32);
            (manifest.sections[id].kind, bytes.unwrap().to_vec())
        })
        .collect();
    manifest.sections.clear();
    for (i, g) in manifest.graphs.iter_mut().enumerate() {
        // Distinct bytes: graph hashes are unique (rule 19).
        let bytes = format!("this is not an ONNX model ({i})").into_bytes();
        g.sha256 = sha256_hex(&bytes);
        sections[g.section as usize].1 = bytes;
    }
    let path = demo.dir.path().join("not-onnx.tpk");
    let mut writer = BundleWriter::create(&path).unwrap();
    for (kind, bytes) in &sections {
        writer.add_section(*kind, bytes).unwrap();
    }
    writer.finish(manifest).unwrap();

    let c_path = CString::new(path.to_str().unwrap()).unwrap();
    let mut bundle = null_mut();
    // SAFETY: a NUL-terminated path and a writable out-pointer.
    expect(
        unsafe { tp_bundle_read(c_path.as_ptr(), &mut bundle) },
        TP_OK,
    );
    // SAFETY: the live bundle just made.
    let status = unsafe { tp_bundle_verify(bundle) };
    let message = last_error();
    assert_eq!(status, TP_INVALID_BUNDLE, "{message}");
    assert!(message.contains("not an ONNX model"), "{message}");
    // SAFETY: our bundle, freed once.
    expect(unsafe { tp_bundle_free(&mut bundle) }, TP_OK);
}

#[test]
fn set_compute_checks_its_code_and_refuses_a_change_once_a_task_is_planned() {
    let demo = Demo::new();
    let open = Open::new(&demo);
    // SAFETY: a live engine; planning task 0 fixes the precision for the process.
    expect(unsafe { tp_engine_prepare(open.engine, 0) }, TP_OK);
    const F32: i32 = TpCompute::TP_COMPUTE_F32 as i32;
    const BF16: i32 = TpCompute::TP_COMPUTE_BF16 as i32;
    let mut effective = -1;
    // SAFETY: a writable out-pointer (and NULL, allowed).
    unsafe {
        expect(tp_set_compute(7, &mut effective), TP_INVALID_ARGUMENT);
        assert!(last_error().contains("unknown compute code 7"));
        assert_eq!(effective, F32, "written on failure too");
        effective = -1;
        expect(tp_set_compute(F32, &mut effective), TP_OK);
        assert_eq!(effective, F32);
        expect(tp_set_compute(F32, null_mut()), TP_OK);
        effective = -1;
        let status = tp_set_compute(BF16, &mut effective);
        // No test of this process asks for bf16: f32 is in effect, and stays.
        if taskpack_core::runtime::bf16_available() {
            expect(status, TP_UNSUPPORTED);
            assert!(last_error().contains("already planned models with f32"));
        } else {
            expect(status, TP_OK);
        }
        assert_eq!(effective, F32);
    }
}
