//! The safetensors checkpoint backend: a Hugging Face fine-tune's `model.safetensors` whose tensor
//! names are the float initializer names of an ONNX graph (`--graph`).
//!
//! Matching rules: every graph weight must be in the file, and every floating-point tensor of the
//! file must be a graph weight (otherwise [`CompileError::NameMismatch`] lists the first unmatched
//! names on both sides). Integer and bool tensors absent from the graph (e.g. BatchNorm's
//! `num_batches_tracked`, `position_ids` buffers) are ignored. Matched tensors must have the
//! graph's exact shape and dtype.

use std::ops::Range;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

use super::checkpoint::{GraphInfo, Mapped};
use super::error::{CompileError, MAX_LISTED_NAMES};
use crate::dtype::DType;
use crate::onnx::InitializerInfo;

/// A mapped safetensors file matched against a graph.
pub(crate) struct SafetensorsReader {
    map: Mapped,
    /// Absolute byte ranges in `map`, parallel to the graph's tensors.
    ranges: Vec<Range<usize>>,
}

fn weight_dtype(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

fn is_integer(d: Dtype) -> bool {
    matches!(
        d,
        Dtype::BOOL
            | Dtype::U8
            | Dtype::I8
            | Dtype::I16
            | Dtype::U16
            | Dtype::I32
            | Dtype::U32
            | Dtype::I64
            | Dtype::U64
    )
}

/// Parses and checks the header of the safetensors file `path` (content `bytes`): its length
/// and JSON, dtypes, shapes and offsets ([`CompileError::Safetensors`] says what is wrong).
pub(crate) fn read_header(
    path: &Path,
    bytes: &[u8],
) -> Result<(usize, safetensors::tensor::Metadata), CompileError> {
    SafeTensors::read_metadata(bytes).map_err(|e| CompileError::Safetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

impl SafetensorsReader {
    /// Parses the header of the mapped file at `path` and matches it against `graph`. (About 85
    /// lines: one pass over the header's tensors, each checked against the graph's weight of
    /// that name for type, shape and byte range, with its error next to its check.)
    pub(crate) fn open(
        path: &Path,
        map: Mapped,
        graph: &GraphInfo,
    ) -> Result<SafetensorsReader, CompileError> {
        let checkpoint: PathBuf = path.to_path_buf();
        let (header_len, metadata) = read_header(path, &map)?;
        let data_start = header_len
            .checked_add(8)
            .ok_or_else(|| CompileError::Safetensors {
                path: checkpoint.clone(),
                reason: "header length overflows".into(),
            })?;

        let missing: Vec<&str> = graph
            .tensors
            .iter()
            .filter(|t| metadata.info(&t.name).is_none())
            .map(|t| t.name.as_str())
            .collect();
        let extra: Vec<String> = metadata
            .offset_keys()
            .into_iter()
            .filter(|name| !graph.index.contains_key(name))
            .filter(|name| metadata.info(name).is_some_and(|i| !is_integer(i.dtype)))
            .collect();
        if !missing.is_empty() || !extra.is_empty() {
            return Err(CompileError::NameMismatch {
                checkpoint,
                graph: graph.path.clone(),
                missing_in_checkpoint: missing
                    .iter()
                    .take(MAX_LISTED_NAMES)
                    .map(|s| s.to_string())
                    .collect(),
                missing_count: missing.len(),
                extra_in_checkpoint: extra.iter().take(MAX_LISTED_NAMES).cloned().collect(),
                extra_count: extra.len(),
            });
        }

        let mut ranges = Vec::with_capacity(graph.tensors.len());
        for t in &graph.tensors {
            let info = metadata
                .info(&t.name)
                .ok_or_else(|| CompileError::UnknownTensor {
                    checkpoint: checkpoint.clone(),
                    tensor: t.name.clone(),
                })?;
            let dtype = weight_dtype(info.dtype).ok_or_else(|| CompileError::UnsupportedDType {
                path: checkpoint.clone(),
                tensor: t.name.clone(),
                dtype: format!("{:?}", info.dtype),
            })?;
            if dtype != t.dtype {
                return Err(CompileError::DTypeMismatch {
                    checkpoint,
                    tensor: t.name.clone(),
                    expected: t.dtype.to_string(),
                    found: dtype.to_string(),
                });
            }
            let shape: Vec<u64> = info.shape.iter().map(|&d| d as u64).collect();
            if shape != t.shape {
                return Err(CompileError::ShapeMismatch {
                    checkpoint,
                    tensor: t.name.clone(),
                    expected: t.shape.clone(),
                    found: shape,
                });
            }
            let (s, e) = info.data_offsets;
            let range = data_start
                .checked_add(s)
                .zip(data_start.checked_add(e))
                .map(|(s, e)| s..e)
                .filter(|r| r.start <= r.end && r.end <= map.len())
                .filter(|r| Some(r.len()) == t.byte_len())
                .ok_or_else(|| CompileError::Safetensors {
                    path: checkpoint.clone(),
                    reason: format!("tensor {:?} has invalid data offsets", t.name),
                })?;
            ranges.push(range);
        }
        Ok(SafetensorsReader { map, ranges })
    }

    /// The whole file.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Decodes weight number `index` (described by `info`) into `out`.
    pub(crate) fn read_f32_into(
        &self,
        path: &Path,
        index: usize,
        info: &InitializerInfo,
        out: &mut Vec<f32>,
    ) -> Result<(), CompileError> {
        let bytes = self
            .ranges
            .get(index)
            .and_then(|r| self.map.get(r.clone()))
            .unwrap_or_default();
        info.dtype.decode_into(bytes, out);
        if Some(out.len()) != info.numel() {
            return Err(CompileError::Safetensors {
                path: path.to_path_buf(),
                reason: format!("tensor {:?} could not be read in full", info.name),
            });
        }
        Ok(())
    }
}
