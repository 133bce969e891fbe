//! Guards on the run path: checks of input *values* that the types and shapes do not cover, a cap
//! on input bytes, and the backstop that turns a panic inside tract or the tokenizer into an
//! [`Error::EnginePanic`].
//!
//! Why: tract trusts its inputs. An embedding lookup (`Gather`) indexes its table with the values
//! of an input, unchecked: a token id outside the vocabulary panics inside tract (`range start
//! index … out of range`). The engine therefore finds, once per template, every `Gather` whose
//! table does not depend on the inputs and whose indices are a data input (possibly through
//! integer casts and axis changes), and checks the values against the table's rows before each
//! run ([`IndexLimit`]). What no check foresees is caught by [`catch_panic`]: the engine's callers
//! get an error, never a panic.
//!
//! The panic hook is left alone (changing it is process-global, not a library's call): a caught
//! panic is still printed on stderr by the hook, then returned as an error. The CLI may install a
//! quiet hook.

use std::any::Any;
use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};

use tract_onnx::prelude::{DatumType, OutletId, Symbol, TDim, TValue, TypedFact, TypedModel};
use tract_onnx::tract_core::ops::array::Gather;
use tract_onnx::tract_core::ops::cast::Cast;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_hir::internal::DimLike;

use crate::runtime::Error;

/// A data input whose values index a lookup table of `size` rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IndexLimit {
    /// Position of the input among the data inputs.
    pub input: usize,
    /// Rows of the smallest table it indexes: values must be in `-size..size` (ONNX `Gather`
    /// counts negative indices from the end).
    pub size: usize,
}

/// The index limits of `model` (a template, whose data inputs are `data_inputs`): every `Gather`
/// whose table does not depend on a data input and has a known number of rows on the gathered
/// axis, and whose indices come from a data input through integer casts that do not narrow and
/// axis changes only. Conservative: any other path is not checked (and left to
/// [`catch_panic`]).
pub(crate) fn index_limits(model: &TypedModel, data_inputs: &[OutletId]) -> Vec<IndexLimit> {
    let dependent = data_dependent(model, data_inputs);
    let mut limits: Vec<IndexLimit> = Vec::new();
    for node in &model.nodes {
        let Some(gather) = node.op_as::<Gather>() else {
            continue;
        };
        let [table, indices] = node.inputs.as_slice() else {
            continue;
        };
        if dependent.contains(&table.node) {
            continue;
        }
        let Some(size) = model
            .outlet_fact(*table)
            .ok()
            .filter(|f| f.is_plain())
            .and_then(|f| f.shape.get(gather.axis))
            .and_then(|d| d.to_usize().ok())
        else {
            continue;
        };
        let Some(input) = source_input(model, *indices, data_inputs) else {
            continue;
        };
        match limits.iter_mut().find(|l| l.input == input) {
            Some(l) => l.size = l.size.min(size),
            None => limits.push(IndexLimit { input, size }),
        }
    }
    limits
}

/// Nodes whose value depends on a data input.
fn data_dependent(model: &TypedModel, data_inputs: &[OutletId]) -> HashSet<usize> {
    let mut seen: HashSet<usize> = HashSet::new();
    let mut todo: Vec<usize> = data_inputs.iter().map(|o| o.node).collect();
    while let Some(n) = todo.pop() {
        if !seen.insert(n) {
            continue;
        }
        if let Some(node) = model.nodes.get(n) {
            todo.extend(
                node.outputs
                    .iter()
                    .flat_map(|o| o.successors.iter().map(|s| s.node)),
            );
        }
    }
    seen
}

/// The data input `outlet` is, through value-preserving integer casts and axis changes.
fn source_input(model: &TypedModel, outlet: OutletId, data_inputs: &[OutletId]) -> Option<usize> {
    let mut outlet = outlet;
    // Each step goes to an earlier node: the walk ends within the number of nodes.
    for _ in 0..=model.nodes.len() {
        if let Some(i) = data_inputs.iter().position(|o| *o == outlet) {
            return Some(i);
        }
        let node = model.nodes.get(outlet.node)?;
        let [input] = node.inputs.as_slice() else {
            return None;
        };
        let passes = if let Some(cast) = node.op_as::<Cast>() {
            let from = model.outlet_fact(*input).ok()?.datum_type;
            widens(from, cast.to)
        } else {
            node.op_is::<AxisOp>()
        };
        if !passes {
            return None;
        }
        outlet = *input;
    }
    None
}

/// Whether every value of integer type `from` is the same value in integer type `to`.
fn widens(from: DatumType, to: DatumType) -> bool {
    use DatumType::*;
    let signed = |d| matches!(d, I8 | I16 | I32 | I64);
    let unsigned = |d| matches!(d, U8 | U16 | U32 | U64);
    if !(signed(from) || unsigned(from)) || !(signed(to) || unsigned(to)) {
        return false;
    }
    let (f, t) = (from.size_of(), to.size_of());
    (signed(from) == signed(to) && t >= f) || (unsigned(from) && signed(to) && t > f)
}

/// [`Error::IndexOutOfRange`] for the first input value outside its limit.
pub(crate) fn check_index_limits(
    task: &str,
    limits: &[IndexLimit],
    names: &[&str],
    inputs: &[TValue],
) -> Result<(), Error> {
    for limit in limits {
        let Some(value) = inputs.get(limit.input) else {
            continue;
        };
        // Sizes come from tensor shapes: they fit an i64 on every platform Rust supports.
        let size = i64::try_from(limit.size).unwrap_or(i64::MAX);
        let out = |v: i64| v < -size || v >= size;
        let bad = match value.datum_type() {
            DatumType::I64 => first_bad::<i64>(value, out),
            DatumType::I32 => first_bad::<i32>(value, out),
            DatumType::I16 => first_bad::<i16>(value, out),
            DatumType::I8 => first_bad::<i8>(value, out),
            DatumType::U8 => first_bad::<u8>(value, out),
            DatumType::U16 => first_bad::<u16>(value, out),
            DatumType::U32 => first_bad::<u32>(value, out),
            DatumType::U64 => first_bad_u64(value, size),
            _ => None,
        };
        if let Some(value) = bad {
            return Err(Error::IndexOutOfRange {
                task: task.to_string(),
                input: names.get(limit.input).copied().unwrap_or("?").to_string(),
                value,
                size: limit.size,
            });
        }
    }
    Ok(())
}

fn first_bad<T>(value: &TValue, out: impl Fn(i64) -> bool) -> Option<i64>
where
    T: tract_onnx::prelude::Datum + Copy + Into<i64>,
{
    let view = value.to_plain_array_view::<T>().ok()?;
    view.iter().map(|&v| v.into()).find(|&v| out(v))
}

fn first_bad_u64(value: &TValue, size: i64) -> Option<i64> {
    let view = value.to_plain_array_view::<u64>().ok()?;
    view.iter()
        .find(|&&v| i64::try_from(v).map_or(true, |v| v >= size))
        .map(|&v| i64::try_from(v).unwrap_or(i64::MAX))
}

/// [`Error::InputMismatch`] if two inputs give one symbolic dimension (e.g. the sequence length
/// of `input_ids` and `attention_mask`) different sizes. `facts` and `names` are the data
/// inputs', `inputs` already of the right count and ranks.
pub(crate) fn check_symbols(
    task: &str,
    facts: &[TypedFact],
    names: &[&str],
    inputs: &[TValue],
) -> Result<(), Error> {
    let mut seen: Vec<(&Symbol, usize, usize)> = Vec::new();
    for (i, (fact, value)) in facts.iter().zip(inputs).enumerate() {
        for (dim, &got) in fact.shape.iter().zip(value.shape()) {
            let TDim::Sym(symbol) = dim else {
                continue;
            };
            match seen.iter().find(|(s, _, _)| *s == symbol) {
                Some(&(_, size, first)) if size != got => {
                    let name = |i: usize| names.get(i).copied().unwrap_or("?").to_string();
                    return Err(Error::InputMismatch {
                        task: task.to_string(),
                        name: name(i),
                        expected: format!("{symbol} = {size}, as in input {:?}", name(first)),
                        got: format!("{symbol} = {got} (shape {:?})", value.shape()),
                    });
                }
                Some(_) => {}
                None => seen.push((symbol, got, i)),
            }
        }
    }
    Ok(())
}

/// Bytes of `inputs`' elements (saturating).
pub(crate) fn input_bytes(inputs: &[TValue]) -> usize {
    inputs
        .iter()
        .map(|t| crate::format::layout::tensor_bytes(t.datum_type().size_of(), t.shape()))
        .map(|b| b.unwrap_or(usize::MAX))
        .fold(0, usize::saturating_add)
}

/// [`Error::InputTooLarge`] if `inputs` hold more than `limit` bytes.
pub(crate) fn check_input_bytes(task: &str, inputs: &[TValue], limit: usize) -> Result<(), Error> {
    let bytes = input_bytes(inputs);
    if bytes > limit {
        return Err(Error::InputTooLarge {
            task: task.to_string(),
            bytes,
            limit,
        });
    }
    Ok(())
}

/// Runs `f`, turning a panic into [`Error::EnginePanic`] (with the panic's message and `action`,
/// e.g. `run task mnist`).
///
/// Callers must only pass closures after whose panic no shared state is left half-updated: the
/// engine wraps calls into tract and the tokenizer that read shared, immutable data (templates,
/// bound plans, the tokenizer) and build their results in values they own, which the unwinding
/// drops. A lock held *around* the call is not poisoned (the panic stops inside); no lock is
/// taken inside a wrapped call except the template's buffer pool, which is only held to pop or
/// push a whole entry.
///
/// Whatever `f` did, the upper halves of the vector registers are cleared before returning
/// ([`clear_upper_vector_state`]).
pub(crate) fn catch_panic<T>(
    action: impl FnOnce() -> String,
    f: impl FnOnce() -> Result<T, Error>,
) -> Result<T, Error> {
    // AssertUnwindSafe: see the contract above; what `f` may leave broken is dropped with it.
    let outcome = catch_unwind(AssertUnwindSafe(f));
    clear_upper_vector_state();
    match outcome {
        Ok(result) => result,
        Err(payload) => {
            let action = action();
            let message = panic_message(payload.as_ref());
            log::error!("caught a panic in {action}: {message}");
            Err(Error::EnginePanic { action, message })
        }
    }
}

/// The message of a panic payload (`panic!` with a literal or a formatted message).
pub(crate) fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic without a message)".to_string())
}

/// Clears the upper halves of the AVX registers (`vzeroupper`) where the CPU has AVX.
///
/// tract 0.23.9's x86-64 matrix kernels return without `vzeroupper` (their assembly postamble
/// has none), leaving the upper register state dirty. Until the next `vzeroupper`, every switch
/// between AVX-encoded and legacy SSE code on that thread — and on the threads it spawns, which
/// inherit the state — pays a transition penalty. Measured after one MiniLM run on this
/// project's machine: glibc's `expf` took 254 ns per call instead of 4.5, and `half`'s
/// per-value F16C conversion 230–245 ns instead of 4.8 (docs/PERFORMANCE.md,
/// bins/examples/after_tract.rs). tract's
/// own operators are not slowed, but the caller's code after an engine call would be, so every
/// engine call that ran tract ends with this.
pub fn clear_upper_vector_state() {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX (checked just above), the only requirement of `vzeroupper`.
        // It zeroes bits 128 and up of the vector registers, which hold no live value across a
        // function call (they are caller-saved), so no Rust value is affected.
        unsafe { zeroupper() }
    }
}

/// `vzeroupper`. Callers check that the CPU has AVX.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn zeroupper() {
    std::arch::x86_64::_mm256_zeroupper();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widening_keeps_every_value() {
        use DatumType::*;
        assert!(widens(I32, I64));
        assert!(widens(I64, I64));
        assert!(widens(U32, I64));
        assert!(widens(U8, U16));
        assert!(!widens(I64, I32));
        assert!(!widens(U64, I64));
        assert!(!widens(I32, U64));
        assert!(!widens(F32, I64));
    }

    #[test]
    fn a_caught_panic_is_an_error_with_its_message() {
        let err = catch_panic(
            || "run task t".into(),
            || -> Result<(), Error> { panic!("boom {}", 7) },
        )
        .unwrap_err();
        assert!(
            matches!(&err, Error::EnginePanic { action, message } if action == "run task t" && message == "boom 7"),
            "{err}"
        );
        assert_eq!(err.to_string(), "run task t panicked: boom 7");
        assert_eq!(catch_panic(String::new, || Ok(3)).unwrap(), 3);
    }

    #[test]
    fn index_limits_allow_onnx_negative_indices_only_within_the_table() {
        use tract_onnx::prelude::{tensor1, IntoTValue};
        let limits = [IndexLimit { input: 0, size: 4 }];
        let check = |values: &[i64]| {
            check_index_limits("t", &limits, &["ids"], &[tensor1(values).into_tvalue()])
        };
        assert!(check(&[0, 3, -4, -1]).is_ok());
        for (values, bad) in [
            (&[0, 4][..], 4),
            (&[-5, 0][..], -5),
            (&[i64::MIN][..], i64::MIN),
        ] {
            let err = check(values).unwrap_err();
            assert!(
                matches!(&err, Error::IndexOutOfRange { input, value, size: 4, .. } if input == "ids" && *value == bad),
                "{err}"
            );
        }
        let u = tensor1(&[1u64, u64::MAX]).into_tvalue();
        assert!(matches!(
            check_index_limits("t", &limits, &["ids"], &[u]),
            Err(Error::IndexOutOfRange {
                value: i64::MAX,
                ..
            })
        ));
    }
}
