//! `tp_set_compute`: the precision of the matrix products of every engine in the process
//! (`taskpack::runtime::set_compute`; process-wide because tract fixes its kernel choice once).

use taskpack_core::runtime::{set_compute, Compute};

use crate::args;
use crate::status::{guard, Failure, TpStatus};

/// Precisions of the matrix products (`tp_set_compute`).
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TpCompute {
    /// `float` operands and accumulation: results as the ONNX model's (the default).
    TP_COMPUTE_F32 = 0,
    /// Operands rounded to bfloat16, accumulated in `float`, on CPUs with AMX-BF16 (Intel Xeon
    /// from Sapphire Rapids on): faster inference, at the accuracy docs/ACCURACY.md measures.
    TP_COMPUTE_BF16 = 1,
}

const CODES: [(TpCompute, Compute); 2] = [
    (TpCompute::TP_COMPUTE_F32, Compute::F32),
    (TpCompute::TP_COMPUTE_BF16, Compute::Bf16),
];

/// Sets the precision of the matrix products of every engine of the process (a `TpCompute`
/// code) and writes the one in effect to `*effective` when it is not NULL: `TP_COMPUTE_F32`
/// when bf16 is asked for on a CPU without AMX-BF16. Call it before the first engine runs or
/// prepares a task; afterwards asking for another precision than the one in effect is
/// `TP_UNSUPPORTED` (the same one is `TP_OK`). `TP_INVALID_ARGUMENT` for an unknown code.
///
/// # Safety
/// `effective` is NULL or valid for writing an `int32_t`.
#[no_mangle]
pub unsafe extern "C" fn tp_set_compute(compute: i32, effective: *mut i32) -> TpStatus {
    guard("tp_set_compute", || {
        let effective = if effective.is_null() {
            None
        } else {
            // SAFETY: non-NULL, so valid for writing an i32 (contract).
            Some(unsafe { args::out(effective, "effective") }?)
        };
        let result = match CODES.iter().find(|(code, _)| *code as i32 == compute) {
            Some(&(_, requested)) => set_compute(requested)
                .map_err(|e| Failure::new(TpStatus::TP_UNSUPPORTED, e.to_string())),
            None => Err(Failure::invalid(format!("unknown compute code {compute}"))),
        };
        if let Some(effective) = effective {
            let in_effect = match &result {
                Ok(c) => *c,
                Err(_) => taskpack_core::runtime::compute(),
            };
            *effective = CODES
                .iter()
                .find(|&&(_, c)| c == in_effect)
                .map_or(TpCompute::TP_COMPUTE_F32, |&(code, _)| code)
                as i32;
        }
        result.map(|_| ())
    })
}
