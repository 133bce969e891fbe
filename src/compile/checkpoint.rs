//! One input checkpoint: an ONNX model, or a safetensors file plus the ONNX graph it fills.
//!
//! [`Checkpoint::open`] picks the reader (a file named `*.safetensors`, or one that begins with an
//! 8-byte little-endian header length followed by `{`, is read as safetensors; anything else is
//! tried as ONNX), validates the whole file
//! structure up front (so a bad checkpoint fails before any merging starts), hashes the input for
//! provenance, and then serves weights one at a time with [`Checkpoint::read_f32`].
//!
//! # Memory
//! Inputs are memory-mapped, never read into the heap as a whole:
//! - ONNX: the file is scanned with [`crate::onnx::scan_model`], which decodes only the non-weight
//!   part of the protobuf (nodes, shapes, small non-float initializers) — the "skeleton", usually
//!   kilobytes to a few MB — and records each weight as a byte range of the map (`raw_data`), of
//!   an external data file (also mapped), or of its `TensorProto` message (typed `float_data` /
//!   `int32_data`, decoded straight from the map). Nothing else is kept.
//! - safetensors: only the JSON header is parsed; the `--graph` ONNX file is scanned the same way
//!   and unmapped again once its skeleton is built.
//!
//! `read_f32` allocates the returned `Vec<f32>` (4 bytes per element) and nothing else; use
//! `Checkpoint::read_f32_into` to reuse a buffer. Resident memory still grows with the pages of
//! the maps that have been touched (hashing at open touches all of them), but those are clean
//! file-backed pages the kernel can drop under pressure, not heap.

use std::collections::{BTreeSet, HashMap};
use std::ops::Deref;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::error::CompileError;
use super::onnx_reader::OnnxReader;
use super::safetensors_reader::SafetensorsReader;
use crate::onnx::{batchnorm_statistics, strip_float_initializers, InitializerInfo, ModelProto};

/// A read-only memory map of a whole file (or nothing, for an empty file).
pub(crate) enum Mapped {
    /// A zero-length file (cannot be mapped portably).
    Empty,
    /// The mapped file.
    Map(memmap2::Mmap),
}

impl Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Mapped::Empty => &[],
            Mapped::Map(m) => m,
        }
    }
}

/// Maps `path` read-only.
pub(crate) fn map_file(path: &Path) -> Result<Mapped, CompileError> {
    let io = |source| CompileError::Io {
        path: path.to_path_buf(),
        source,
    };
    // Refuses FIFOs, devices and directories without blocking in `open`.
    let file = crate::files::open_regular(path)?;
    let meta = file.metadata().map_err(io)?;
    if meta.len() == 0 {
        return Ok(Mapped::Empty);
    }
    // Compiler inputs are checkpoints nobody writes during a compile; the provenance hash is
    // taken at open time.
    let map = crate::mmap::map_readonly(&file).map_err(io)?;
    Ok(Mapped::Map(map))
}

/// Lower-case hex of a byte string.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The graph half of a checkpoint: the model without float initializers and the weight list.
pub(crate) struct GraphInfo {
    /// The ONNX file the graph came from.
    pub path: PathBuf,
    /// The model without its float initializers; external non-float data already inlined.
    pub skeleton: ModelProto,
    /// `strip_float_initializers(&skeleton)`.
    pub stripped: Vec<u8>,
    /// Hex sha256 of `stripped`.
    pub stripped_sha256: String,
    /// The weights in graph initializer order.
    pub tensors: Vec<InitializerInfo>,
    /// Name → index in `tensors`.
    pub index: HashMap<String, usize>,
    /// BatchNorm running statistics that are weights.
    pub batchnorm: BTreeSet<String>,
}

impl GraphInfo {
    /// Builds the derived fields from a skeleton and its weights.
    pub(crate) fn new(path: &Path, skeleton: ModelProto, tensors: Vec<InitializerInfo>) -> Self {
        let stripped = strip_float_initializers(&skeleton);
        let stripped_sha256 = hex(&Sha256::digest(&stripped));
        let index: HashMap<String, usize> = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        let batchnorm = batchnorm_statistics(&skeleton)
            .into_iter()
            .filter(|n| index.contains_key(n))
            .collect();
        GraphInfo {
            path: path.to_path_buf(),
            skeleton,
            stripped,
            stripped_sha256,
            tensors,
            index,
            batchnorm,
        }
    }
}

enum Backend {
    Onnx(OnnxReader),
    Safetensors(SafetensorsReader),
}

/// An opened checkpoint. See the module documentation.
pub struct Checkpoint {
    path: PathBuf,
    backend: Backend,
    graph: GraphInfo,
    sha256: String,
    input_bytes: u64,
    input_files: Vec<PathBuf>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("format", &self.format())
            .field("tensors", &self.graph.tensors.len())
            .field("sha256", &self.sha256)
            .finish()
    }
}

/// The largest header a safetensors file may declare (the `safetensors` crate's own limit).
const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

/// Whether the file at `path` with content `bytes` is meant as a safetensors file: its name ends
/// in `.safetensors`, or it starts like one (a u64 LE header length no larger than the format
/// allows, then `{`). An ONNX file never does: its first eight bytes are protobuf tags and text,
/// far above the limit as a number. A damaged safetensors file is then reported as one, not as
/// "not an ONNX model".
fn looks_like_safetensors(path: &Path, bytes: &[u8]) -> bool {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
    {
        return true;
    }
    let Some(len) = bytes.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
        return false;
    };
    let n = u64::from_le_bytes(len);
    bytes.get(8) == Some(&b'{') && (2..=MAX_SAFETENSORS_HEADER).contains(&n)
}

impl Checkpoint {
    /// Opens a checkpoint, dispatching on its content.
    ///
    /// - ONNX: `path` is the model; external data must lie in its folder. `graph` is ignored (the
    ///   model is its own graph), so one `--graph` can accompany a mix of ONNX and safetensors
    ///   checkpoints.
    /// - safetensors: `graph` (the ONNX model whose float initializers the file fills) is
    ///   required ([`CompileError::GraphRequired`]); names, shapes and dtypes must match it.
    ///
    /// The whole input is validated and hashed here (one sequential pass over the maps).
    pub fn open(path: &Path, graph: Option<&Path>) -> Result<Checkpoint, CompileError> {
        let map = map_file(path)?;
        if looks_like_safetensors(path, &map) {
            // A damaged header is reported as such before asking for the graph.
            super::safetensors_reader::read_header(path, &map)?;
            let graph_path = graph.ok_or_else(|| CompileError::GraphRequired {
                path: path.to_path_buf(),
            })?;
            let graph = super::onnx_reader::open_graph(graph_path)?;
            let reader = SafetensorsReader::open(path, map, &graph)?;
            let input_bytes = reader.bytes().len() as u64;
            let sha256 = hex(&Sha256::digest(reader.bytes()));
            Ok(Checkpoint {
                path: path.to_path_buf(),
                backend: Backend::Safetensors(reader),
                graph,
                sha256,
                input_bytes,
                input_files: vec![path.to_path_buf()],
            })
        } else {
            let (reader, graph) = OnnxReader::open(path, map)?;
            let mut hasher = Sha256::new();
            let mut input_bytes = 0u64;
            let mut input_files = Vec::new();
            for (file, bytes) in reader.inputs() {
                hasher.update(bytes);
                input_bytes = input_bytes.saturating_add(bytes.len() as u64);
                input_files.push(file.to_path_buf());
            }
            Ok(Checkpoint {
                path: path.to_path_buf(),
                backend: Backend::Onnx(reader),
                graph,
                sha256: hex(&hasher.finalize()),
                input_bytes,
                input_files,
            })
        }
    }

    /// `"onnx"` or `"safetensors"`.
    pub fn format(&self) -> &'static str {
        match self.backend {
            Backend::Onnx(_) => "onnx",
            Backend::Safetensors(_) => "safetensors",
        }
    }

    /// The checkpoint file as given to [`Checkpoint::open`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The ONNX file the graph comes from: the checkpoint itself, or the `--graph` file.
    #[cfg(feature = "internals")]
    pub fn graph_path(&self) -> &Path {
        &self.graph.path
    }

    /// The weights (float initializers of the graph) in graph initializer order.
    pub fn tensors(&self) -> &[InitializerInfo] {
        &self.graph.tensors
    }

    /// The weight called `name`, if any.
    pub fn tensor(&self, name: &str) -> Option<&InitializerInfo> {
        self.graph
            .index
            .get(name)
            .and_then(|&i| self.graph.tensors.get(i))
    }

    /// Reads one weight as `f32` (decoding f16/bf16). Fails on an unknown name and on NaN/±Inf
    /// ([`CompileError::NonFinite`], naming the tensor, the checkpoint and the first bad index).
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>, CompileError> {
        let mut out = Vec::new();
        self.read_f32_into(name, &mut out)?;
        Ok(out)
    }

    /// [`Checkpoint::read_f32`] into a reusable buffer (cleared first).
    pub(crate) fn read_f32_into(&self, name: &str, out: &mut Vec<f32>) -> Result<(), CompileError> {
        let index = *self
            .graph
            .index
            .get(name)
            .ok_or_else(|| CompileError::UnknownTensor {
                checkpoint: self.path.clone(),
                tensor: name.to_string(),
            })?;
        let info = self
            .graph
            .tensors
            .get(index)
            .ok_or_else(|| CompileError::UnknownTensor {
                checkpoint: self.path.clone(),
                tensor: name.to_string(),
            })?;
        match &self.backend {
            Backend::Onnx(r) => r.read_f32_into(index, info, out)?,
            Backend::Safetensors(r) => r.read_f32_into(&self.path, index, info, out)?,
        }
        if let Some((index, value)) = out.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(CompileError::NonFinite {
                checkpoint: self.path.clone(),
                tensor: name.to_string(),
                index,
                value: *value,
            });
        }
        Ok(())
    }

    /// The ONNX model without its float initializers (the weights are [`Checkpoint::tensors`]);
    /// non-float initializers stored as external data have been inlined.
    pub fn graph(&self) -> &ModelProto {
        &self.graph.skeleton
    }

    /// The graph with its float initializers stripped (weights are stored as sections): the
    /// bytes a bundle stores once per distinct architecture.
    pub fn stripped_graph(&self) -> &[u8] {
        &self.graph.stripped
    }

    /// Hex sha256 of [`Checkpoint::stripped_graph`]: equal for checkpoints of one architecture.
    pub fn graph_sha256(&self) -> &str {
        &self.graph.stripped_sha256
    }

    /// Weights that are BatchNorm running means/variances (inputs 3 and 4 of
    /// `BatchNormalization` nodes): per-task statistics, never merged.
    pub fn batchnorm_statistics(&self) -> &BTreeSet<String> {
        &self.graph.batchnorm
    }

    /// Hex sha256 of the input bytes: for ONNX the model file followed by each distinct external
    /// data file (in order of first reference: weights first, then other initializers); for
    /// safetensors the safetensors file alone (the graph is identified by
    /// [`Checkpoint::graph_sha256`]).
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Total size in bytes of the hashed input files.
    pub fn input_bytes(&self) -> u64 {
        self.input_bytes
    }

    /// The hashed input files, in hashing order (external data files canonicalized).
    pub fn input_files(&self) -> &[PathBuf] {
        &self.input_files
    }
}
