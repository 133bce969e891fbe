//! The ONNX checkpoint backend: weights inline (`raw_data` or typed fields) or in external data
//! files inside the model's own folder, read lazily from memory maps.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use super::checkpoint::{map_file, GraphInfo, Mapped};
use super::error::CompileError;
use crate::onnx::{
    read_typed_f32, scan_model, ExternalRef, InitializerInfo, OnnxError, ScannedModel, WeightData,
};

/// Where one weight's bytes are.
enum Source {
    /// Little-endian bytes in the model map.
    Inline(Range<usize>),
    /// A `TensorProto` message in the model map with typed payload fields.
    Typed(Range<usize>),
    /// Little-endian bytes in `externals[file]`.
    External { file: usize, range: Range<usize> },
    /// Zero elements.
    Empty,
}

struct ExternalFile {
    /// Canonical path.
    path: PathBuf,
    map: Mapped,
}

/// A mapped ONNX model with its external data files.
pub(crate) struct OnnxReader {
    path: PathBuf,
    map: Mapped,
    externals: Vec<ExternalFile>,
    /// Parallel to the graph's tensors.
    sources: Vec<Source>,
}

/// External data files of one model, mapped once each, in order of first reference.
struct Externals<'a> {
    model: &'a Path,
    /// Canonical folder of the model.
    folder: PathBuf,
    files: Vec<ExternalFile>,
    by_path: HashMap<PathBuf, usize>,
}

impl<'a> Externals<'a> {
    fn new(model: &'a Path) -> Result<Self, CompileError> {
        let parent = match model.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let folder = parent.canonicalize().map_err(|source| CompileError::Io {
            path: parent.to_path_buf(),
            source,
        })?;
        Ok(Externals {
            model,
            folder,
            files: Vec::new(),
            by_path: HashMap::new(),
        })
    }

    /// Resolves `location` inside the model's folder and maps it (once).
    fn file(&mut self, tensor: &str, location: &str) -> Result<usize, CompileError> {
        let outside = |reason: String| CompileError::ExternalDataOutsideFolder {
            path: self.model.to_path_buf(),
            tensor: tensor.to_string(),
            location: location.to_string(),
            reason,
        };
        let rel = Path::new(location);
        for c in rel.components() {
            match c {
                Component::Normal(_) | Component::CurDir => {}
                Component::ParentDir => return Err(outside("contains `..`".into())),
                Component::RootDir | Component::Prefix(_) => {
                    return Err(outside("absolute path".into()))
                }
            }
        }
        if rel.components().next().is_none() {
            return Err(outside("empty path".into()));
        }
        let joined = self.folder.join(rel);
        let canonical = joined.canonicalize().map_err(|source| CompileError::Io {
            path: joined.clone(),
            source,
        })?;
        if !canonical.starts_with(&self.folder) {
            return Err(outside(format!(
                "resolves to {} through a symbolic link",
                canonical.display()
            )));
        }
        if let Some(&i) = self.by_path.get(&canonical) {
            return Ok(i);
        }
        let map = map_file(&canonical)?;
        let i = self.files.len();
        self.files.push(ExternalFile {
            path: canonical.clone(),
            map,
        });
        self.by_path.insert(canonical, i);
        Ok(i)
    }

    /// File index and checked byte range of an external reference. `required` is the exact byte
    /// count needed (weights); `None` takes `length`, or the rest of the file.
    fn locate(
        &mut self,
        tensor: &str,
        external: &ExternalRef,
        required: Option<u64>,
    ) -> Result<(usize, Range<usize>), CompileError> {
        let file = self.file(tensor, &external.location)?;
        let entry = self.files.get(file).ok_or_else(|| CompileError::Io {
            path: self.model.to_path_buf(),
            source: std::io::Error::other("external file table out of sync"),
        })?;
        let size = entry.map.len() as u64;
        let offset = external.offset;
        let length = match (required, external.length) {
            (Some(r), _) => r,
            (None, Some(l)) => l,
            (None, None) => size.saturating_sub(offset),
        };
        let out_of_bounds = || CompileError::ExternalDataOutOfBounds {
            file: entry.path.clone(),
            tensor: tensor.to_string(),
            offset,
            length,
            file_size: size,
        };
        let end = offset
            .checked_add(length)
            .filter(|&end| end <= size)
            .ok_or_else(out_of_bounds)?;
        // A weight without a `length` entry runs to the end of the file (ONNX semantics), so the
        // rest of the file must be exactly the weight.
        if required.is_some() && external.length.is_none() && end != size {
            return Err(out_of_bounds());
        }
        let start = usize::try_from(offset).map_err(|_| out_of_bounds())?;
        let end = usize::try_from(end).map_err(|_| out_of_bounds())?;
        Ok((file, start..end))
    }

    fn bytes(&self, file: usize, range: Range<usize>) -> &[u8] {
        self.files
            .get(file)
            .and_then(|f| f.map.get(range))
            .unwrap_or_default()
    }
}

/// Scans `bytes` (the content of `path`), maps and checks every external data file, inlines the
/// data of non-float external initializers into the skeleton. Returns the graph and the weight
/// sources.
fn load(
    path: &Path,
    bytes: &[u8],
    resolve_weights: bool,
) -> Result<(GraphInfo, Vec<Source>, Vec<ExternalFile>), CompileError> {
    let scanned = scan_model(bytes).map_err(|e| match e {
        OnnxError::NotOnnx { reason } => CompileError::NotOnnx {
            path: path.to_path_buf(),
            reason,
        },
        source => CompileError::Onnx {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let ScannedModel {
        mut skeleton,
        weights,
        graph_externals,
    } = scanned;
    let mut externals = Externals::new(path)?;

    let mut sources = Vec::with_capacity(if resolve_weights { weights.len() } else { 0 });
    if resolve_weights {
        for w in &weights {
            let nbytes = w.info.byte_len().unwrap_or(usize::MAX) as u64;
            sources.push(match &w.data {
                WeightData::Raw(r) => Source::Inline(r.clone()),
                WeightData::Typed(r) => Source::Typed(r.clone()),
                WeightData::Empty => Source::Empty,
                WeightData::External(ext) => {
                    let (file, range) = externals.locate(&w.info.name, ext, Some(nbytes))?;
                    Source::External { file, range }
                }
            });
        }
    }

    if let Some(graph) = skeleton.graph.as_mut() {
        for ge in &graph_externals {
            let (file, range) = externals.locate(&ge.name, &ge.external, None)?;
            let data = externals.bytes(file, range).to_vec();
            if let Some(t) = graph.initializer.get_mut(ge.index) {
                t.raw_data = data;
                t.data_location = None;
                t.external_data.clear();
            }
        }
    }

    let tensors: Vec<InitializerInfo> = weights.into_iter().map(|w| w.info).collect();
    let graph = GraphInfo::new(path, skeleton, tensors);
    Ok((graph, sources, externals.files))
}

/// Opens an ONNX file as a graph only (for safetensors checkpoints): weight data is neither read
/// nor resolved, and no map is kept.
pub(crate) fn open_graph(path: &Path) -> Result<GraphInfo, CompileError> {
    let map = map_file(path)?;
    let (graph, _, _) = load(path, &map, false)?;
    Ok(graph)
}

impl OnnxReader {
    /// Opens a mapped ONNX checkpoint.
    pub(crate) fn open(path: &Path, map: Mapped) -> Result<(OnnxReader, GraphInfo), CompileError> {
        let (graph, sources, externals) = load(path, &map, true)?;
        Ok((
            OnnxReader {
                path: path.to_path_buf(),
                map,
                externals,
                sources,
            },
            graph,
        ))
    }

    /// The input files and their bytes, model first, then external data in first-use order.
    pub(crate) fn inputs(&self) -> impl Iterator<Item = (&Path, &[u8])> {
        std::iter::once((self.path.as_path(), &self.map[..])).chain(
            self.externals
                .iter()
                .map(|f| (f.path.as_path(), &f.map[..])),
        )
    }

    /// Decodes weight number `index` (described by `info`) into `out`.
    pub(crate) fn read_f32_into(
        &self,
        index: usize,
        info: &InitializerInfo,
        out: &mut Vec<f32>,
    ) -> Result<(), CompileError> {
        let source = self
            .sources
            .get(index)
            .ok_or_else(|| CompileError::UnknownTensor {
                checkpoint: self.path.clone(),
                tensor: info.name.clone(),
            })?;
        match source {
            Source::Inline(r) => info
                .dtype
                .decode_into(self.map.get(r.clone()).unwrap_or_default(), out),
            Source::External { file, range } => {
                let bytes = self
                    .externals
                    .get(*file)
                    .and_then(|f| f.map.get(range.clone()))
                    .unwrap_or_default();
                info.dtype.decode_into(bytes, out)
            }
            Source::Typed(r) => {
                read_typed_f32(&self.map, r.clone(), info.dtype, out).map_err(|source| {
                    CompileError::Onnx {
                        path: self.path.clone(),
                        source,
                    }
                })?
            }
            Source::Empty => out.clear(),
        }
        // Ranges were checked at open; this guards against a file changed under the map.
        let expected = info.numel().unwrap_or(usize::MAX);
        if out.len() != expected {
            return Err(CompileError::Onnx {
                path: self.path.clone(),
                source: OnnxError::DataLength {
                    tensor: info.name.clone(),
                    expected: expected as u64,
                    actual: out.len() as u64,
                    unit: "elements",
                },
            });
        }
        Ok(())
    }
}
