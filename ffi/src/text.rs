//! Text in, label out: classify a string with a task, using the tokenizer the bundle carries,
//! and read the tasks' label names.

use std::ffi::c_char;

use crate::args;
use crate::engine::TpEngine;
use crate::status::{guard, Failure, TpStatus};

/// Classifies the NUL-terminated UTF-8 `text` with task `task`: the bundle's tokenizer turns it
/// into the graph's token inputs (`input_ids`, `attention_mask`, `token_type_ids`, matched by
/// name), the task runs, and the most probable class is written to `*class_index` and its
/// softmax probability to `*probability`. The class's name, if the task has label names:
/// `tp_engine_task_label`. The tokenizer is loaded on the engine's first text call.
///
/// `TP_UNSUPPORTED` if the bundle has no tokenizer (compile it with `--tokenizer`), or the task's
/// graph does not take token inputs or does not give `[batch, classes]` logits;
/// `TP_INVALID_BUNDLE` if the tokenizer does not load or the task's label names do not match its
/// number of classes; `TP_BAD_INPUT` if the tokenizer fails on the text; `TP_INVALID_ARGUMENT` if
/// `text` is not UTF-8. On failure `*class_index` is `SIZE_MAX` and `*probability` 0.
///
/// # Safety
/// `engine` is NULL or a live engine; `text` is NULL or a NUL-terminated string; `class_index` is
/// NULL or valid for writing a `size_t`; `probability` is NULL or valid for writing a `float`.
#[no_mangle]
pub unsafe extern "C" fn tp_engine_classify_text(
    engine: *const TpEngine,
    task: usize,
    text: *const c_char,
    class_index: *mut usize,
    probability: *mut f32,
) -> TpStatus {
    guard("tp_engine_classify_text", || {
        // SAFETY: `class_index` is NULL or writable (contract).
        let class = unsafe { args::out(class_index, "class_index") }?;
        *class = usize::MAX;
        // SAFETY: `probability` is NULL or writable (contract).
        let probability = unsafe { args::out(probability, "probability") }?;
        *probability = 0.0;
        // SAFETY: `engine` is NULL or live (contract).
        let engine = unsafe { args::get(engine, "engine") }?;
        // SAFETY: `text` is NULL or NUL-terminated (contract).
        let text = unsafe { args::str(text, "text") }?;
        engine.check_task(task)?;
        let prediction = engine.text()?.classify_one(task, text)?;
        *class = prediction.class;
        *probability = prediction.probability;
        Ok(())
    })
}

/// Writes to `*count` the number of label names of task `task`: its number of classes, or 0 if
/// the bundle gives the task no label names. `TP_UNKNOWN_TASK` for an index out of range.
///
/// # Safety
/// `engine` is NULL or a live engine; `count` is NULL or valid for writing a `size_t`.
#[no_mangle]
pub unsafe extern "C" fn tp_engine_task_label_count(
    engine: *const TpEngine,
    task: usize,
    count: *mut usize,
) -> TpStatus {
    // SAFETY: the contract above is `query`'s.
    unsafe {
        args::query(
            "tp_engine_task_label_count",
            engine,
            "engine",
            count,
            "count",
            |e| Ok(e.labels(task)?.len()),
        )
    }
}

/// Writes to `*label` the name of class `class_index` of task `task` (the class
/// `tp_engine_classify_text` returns; 0-based, below `tp_engine_task_label_count`): a
/// NUL-terminated UTF-8 string owned by the engine, valid until `tp_engine_free`. On failure
/// `*label` is set to NULL; `TP_UNKNOWN_TASK` for a task index out of range,
/// `TP_INVALID_ARGUMENT` for a class out of range (always, for a task without label names).
///
/// # Safety
/// `engine` is NULL or a live engine; `label` is NULL or valid for writing a pointer.
#[no_mangle]
pub unsafe extern "C" fn tp_engine_task_label(
    engine: *const TpEngine,
    task: usize,
    class_index: usize,
    label: *mut *const c_char,
) -> TpStatus {
    guard("tp_engine_task_label", || {
        // SAFETY: `label` is NULL or writable (contract).
        let label = unsafe { args::out(label, "label") }?;
        *label = std::ptr::null();
        // SAFETY: `engine` is NULL or live (contract).
        let engine = unsafe { args::get(engine, "engine") }?;
        let labels = engine.labels(task)?;
        let Some(name) = labels.get(class_index) else {
            return Err(Failure::invalid(format!(
                "class {class_index} out of range (task {:?} has {} label names)",
                engine.task_name(task)?,
                labels.len()
            )));
        };
        *label = name.as_ptr();
        Ok(())
    })
}
