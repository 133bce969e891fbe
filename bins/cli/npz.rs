//! The CLI's use of the library's one `.npy` / `.npz` reader ([`taskpack::npz`]): every array of
//! a file (calibration), and a task's inputs matched by name (`taskpack run --input`).

use std::path::Path;

use anyhow::{bail, Context, Result};
use taskpack::npz::{self, Limits, Npz};
use taskpack::runtime::IoInfo;
use tract_onnx::prelude::*;

/// Every array of `path`, by name (without the `.npy` suffix), in the file's order, each as its
/// stored element type.
pub fn read_all(path: &Path) -> Result<Vec<(String, Tensor)>> {
    Ok(npz::read_npz(path, &Limits::default())?)
}

/// The arrays of `path` (an `.npz`, or an `.npy` for a single-input task), one per input of
/// `facts`, matched by name (a single array is taken for a single input); each must have the
/// input's element type (an `f64` array is accepted for an `f32` input).
pub fn read_inputs(path: &Path, facts: &[IoInfo], limits: &Limits) -> Result<Vec<Tensor>> {
    let is_npy = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"));
    if is_npy {
        let [fact] = facts else {
            bail!(
                "the task has {} inputs ({}); give them by name in an .npz",
                facts.len(),
                names(facts)
            )
        };
        let tensor = npz::read_npy(path, limits)?;
        return Ok(vec![
            as_input(fact, tensor).with_context(|| format!("reading {}", path.display()))?
        ]);
    }
    let mut file = Npz::open(path, limits)?;
    let available = file.names().to_vec();
    let mut tensors = Vec::with_capacity(facts.len());
    for fact in facts {
        let key = if available.contains(&fact.name) {
            fact.name.clone()
        } else if let ([_], [only]) = (facts, available.as_slice()) {
            only.clone()
        } else {
            bail!(
                "{} has no array {:?} (it has: {}; the task's inputs are: {})",
                path.display(),
                fact.name,
                available.join(", "),
                names(facts)
            )
        };
        let tensor = as_input(fact, file.read(&key)?)
            .with_context(|| format!("{}: array {key:?}", path.display()))?;
        tensors.push(tensor);
    }
    Ok(tensors)
}

fn names(facts: &[IoInfo]) -> String {
    facts
        .iter()
        .map(|f| f.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `tensor` as input `fact`'s element type: as it is, or `f64` narrowed to `f32`.
fn as_input(fact: &IoInfo, tensor: Tensor) -> Result<Tensor> {
    match (tensor.datum_type(), fact.dtype) {
        (got, want) if got == want => Ok(tensor),
        (DatumType::F64, DatumType::F32) => Ok(tensor.cast_to::<f32>()?.into_owned()),
        (got, want) => bail!(
            "input {:?} must be {want:?}, the array is {got:?}",
            fact.name
        ),
    }
}
