//! The precision of the engine's matrix products: exact `f32`, or `bf16` operands where the CPU
//! multiplies them in hardware (Intel AMX), for faster inference at a measured accuracy cost
//! (docs/PERFORMANCE.md, docs/ACCURACY.md).
//!
//! Why a process-wide setting rather than an [`crate::runtime::EngineOptions`] field: tract
//! decides which matrix kernels a process may use once, the first time it plans a matrix product
//! in that process (tract-linalg's kernel tiers, behind its `TRACT_AMX_BF16` knob). Two engines
//! of one process cannot differ, so this module holds the one setting, applies it to tract, and
//! refuses a change once taskpack has planned a model ([`Error::ComputeFixed`]).

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;

use tract_onnx::prelude::tract_linalg;

use super::Error;

/// How the engine's matrix products compute (see [`set_compute`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Compute {
    /// `f32` operands, `f32` accumulation: tract's default, results as the ONNX model's.
    F32,
    /// Operands rounded to bf16 (8 significant bits, relative error ≤ 2⁻⁹ per operand), products
    /// accumulated in `f32`, on CPUs with AMX-BF16 (Intel Xeon from Sapphire Rapids on). Only
    /// the matrix products of float weights change; everything else stays `f32`. Where the CPU
    /// or the build has no such kernel, [`set_compute`] answers [`Compute::F32`].
    Bf16,
}

impl Compute {
    /// The name the CLI and the C ABI use: `f32`, `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Compute::F32 => "f32",
            Compute::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for Compute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Compute {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Compute::F32),
            "bf16" => Ok(Compute::Bf16),
            other => Err(format!("unknown compute {other:?} (expected f32 or bf16)")),
        }
    }
}

/// The kernel [`Compute::Bf16`] needs (tract-linalg's AMX-BF16 `f32` matrix kernel).
const BF16_KERNEL: &str = "avx512amx_mmm_f32_16x16";

/// What [`set_compute`] chose, and whether tract has planned a model since (then it is fixed).
struct State {
    /// `None` until [`set_compute`] is called: tract's own default applies (`f32`, unless the
    /// process environment sets `TRACT_AMX_BF16`).
    chosen: Option<Compute>,
    fixed: bool,
}

static STATE: Mutex<State> = Mutex::new(State {
    chosen: None,
    fixed: false,
});

fn state() -> std::sync::MutexGuard<'static, State> {
    // The state is two plain fields, valid after any panic: a poisoned lock is still usable.
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether this CPU and this build can run [`Compute::Bf16`] (probed once: it instantiates
/// every kernel tract has).
pub fn bf16_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let isa = tract_linalg::isa::native();
        tract_linalg::mmm_routines::runnable_for(&isa)
            .iter()
            .any(|kernel| kernel.name() == BF16_KERNEL)
    })
}

/// Sets the precision of the matrix products of every engine in this process, and returns the
/// one in effect: [`Compute::F32`] when `Bf16` is asked for on a CPU without AMX-BF16.
///
/// Call it before the first [`crate::runtime::Engine`] runs or prepares a task: tract fixes its
/// kernel choice the first time it plans a model. Once taskpack has planned one, asking for a
/// different precision is [`Error::ComputeFixed`] (the same one is `Ok`).
pub fn set_compute(requested: Compute) -> Result<Compute, Error> {
    let effective = match requested {
        Compute::Bf16 if bf16_available() => Compute::Bf16,
        _ => Compute::F32,
    };
    let mut state = state();
    if state.fixed {
        let current = current(&state);
        return if current == effective {
            Ok(current)
        } else {
            Err(Error::ComputeFixed { requested, current })
        };
    }
    tract_linalg::knobs::TRACT_AMX_BF16.set(effective == Compute::Bf16);
    state.chosen = Some(effective);
    Ok(effective)
}

/// The precision the engines of this process use (or will use: see [`set_compute`]).
pub fn compute() -> Compute {
    current(&state())
}

fn current(state: &State) -> Compute {
    match state.chosen {
        Some(chosen) => chosen,
        None if tract_linalg::knobs::TRACT_AMX_BF16.get() && bf16_available() => Compute::Bf16,
        None => Compute::F32,
    }
}

/// Marks the setting fixed: called before taskpack hands tract a model to optimize.
pub(crate) fn fix() {
    state().fixed = true;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for c in [Compute::F32, Compute::Bf16] {
            assert_eq!(c.name().parse::<Compute>(), Ok(c));
            assert_eq!(c.to_string(), c.name());
        }
        let err = "int8".parse::<Compute>().unwrap_err();
        assert!(err.contains("int8") && err.contains("bf16"), "{err}");
    }
}
