//! Reading every array of an `.npz` file into tract tensors of their stored element type.
//!
//! `taskpack run` reads arrays as the graph's input types; calibration reads them before any
//! graph is loaded, so it takes whatever numpy stored and lets the library convert.

use std::path::Path;

use anyhow::{bail, Context, Result};
use ndarray_npy::{NpzReader, ReadNpzError};
use tract_onnx::prelude::*;

/// Every array of `path`, by name (without the `.npy` suffix), in the file's order.
pub fn read_all(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut npz =
        NpzReader::new(file).with_context(|| format!("{} is not an .npz file", path.display()))?;
    let names = npz
        .names()
        .with_context(|| format!("cannot list the arrays of {}", path.display()))?;
    let mut arrays = Vec::with_capacity(names.len());
    for entry in names {
        let tensor = read_any(&mut npz, &entry)
            .with_context(|| format!("{}: array {entry:?}", path.display()))?;
        let name = entry.strip_suffix(".npy").unwrap_or(&entry).to_string();
        arrays.push((name, tensor));
    }
    Ok(arrays)
}

/// Reads an array as one element type: `None` if the file holds another.
type Reader = fn(&mut NpzReader<std::fs::File>, &str) -> Result<Option<Tensor>, ReadNpzError>;

/// Reads array `name` as the first element type that matches its header.
fn read_any(npz: &mut NpzReader<std::fs::File>, name: &str) -> Result<Tensor> {
    fn read<T: Datum + ndarray_npy::ReadableElement>(
        npz: &mut NpzReader<std::fs::File>,
        name: &str,
    ) -> Result<Option<Tensor>, ReadNpzError> {
        match npz.by_name::<_, tract_ndarray::IxDyn>(name) {
            Ok(a) => Ok(Some(tract_ndarray::ArrayD::<T>::into_tensor(a))),
            // Another element type: let the caller try the next one.
            Err(ReadNpzError::Npy(ndarray_npy::ReadNpyError::WrongDescriptor(_))) => Ok(None),
            Err(e) => Err(e),
        }
    }
    let readers: [Reader; 8] = [
        read::<f32>,
        read::<f64>,
        read::<i64>,
        read::<i32>,
        read::<i16>,
        read::<i8>,
        read::<u8>,
        read::<bool>,
    ];
    for r in readers {
        if let Some(t) = r(npz, name)? {
            return Ok(t);
        }
    }
    bail!("unsupported element type (f32, f64, i64, i32, i16, i8, u8 and bool are)")
}
