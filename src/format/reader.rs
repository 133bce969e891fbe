//! Parsing and validation of a bundle held in memory (docs/FORMAT.md §6).
//!
//! [`parse`] borrows the bundle's bytes — a memory map or a `Vec` read from disk, that is the
//! caller's business — checks the header, the manifest and the section table against every
//! structural rule (1–30) in time proportional to the manifest only, and returns a
//! [`ParsedBundle`] that owns the manifest and the validated byte ranges of every section. Later
//! accesses slice the caller's bytes through those ranges and never re-read offsets from the
//! file. The checks that need the bulk bytes (checksums, zero padding, mask pad bits, finite row
//! scales, UTF-8 tokenizer, graph hashes, finite block scales: V1–V7) are [`ParsedBundle::verify_section`] and
//! [`ParsedBundle::verify`].
//!
//! The writer runs the same code: the structural checks before it writes a manifest, then
//! [`parse`] and [`ParsedBundle::verify`] on the file it wrote, before renaming it into place. So
//! a bundle the writer produces always passes, and the two cannot drift apart.

use std::collections::{HashMap, HashSet};

use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::xxh3_64;

use crate::encoding::Encoding;
use crate::format::{MergeParams, Method, ScaleMode};

use super::budget;
use super::error::FormatError;
use super::header::Header;
use super::layout::{
    self, MANIFEST_DECODE_FACTOR, MAX_GRAPHS, MAX_LABELS, MAX_NAME_LEN, MAX_SECTIONS, MAX_TASKS,
    MAX_TASK_NAME_LEN, MAX_TENSORS,
};
use super::manifest::{
    Manifest, Scale, SectionEntry, SectionId, SectionKind, SizeReport, Stored, TaskEntry,
    TaskTensor, TensorEntry, TensorStorage,
};

/// What a section's bytes are, as established by the reference to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Content {
    /// The graph of this index in `Manifest::graphs` (V6 compares its hash).
    Graph(usize),
    Tokenizer,
    Dense(Encoding),
    Mask,
    RowScale,
}

/// A section's validated place in the data region and what it holds.
#[derive(Debug, Clone, Copy)]
struct SectionMeta {
    /// Start, relative to the data region until [`parse`] makes it a file offset.
    start: u64,
    /// End of the section's bytes.
    end: u64,
    /// End of its padding (start of the next section, or `end` for the last one).
    pad_end: u64,
    /// Elements held: dense elements, mask bits, rows, or bytes for a graph.
    elements: u64,
    content: Content,
}

/// The result of the structural checks on a manifest.
pub(crate) struct Checked {
    sections: Vec<SectionMeta>,
    tasks: HashMap<String, usize>,
    tensors: HashMap<String, usize>,
}

/// A validated bundle: the header, the decoded manifest and the byte range of every section.
///
/// Methods that take `bytes` expect the same buffer that was parsed (its length is checked).
#[derive(Debug, Clone)]
pub struct ParsedBundle {
    header: Header,
    manifest: Manifest,
    sections: Vec<SectionMeta>,
    tasks: HashMap<String, usize>,
    tensors: HashMap<String, usize>,
}

/// Parses and validates a whole bundle (rules 1–37 of docs/FORMAT.md), in time independent of
/// the size of the data region.
pub fn parse(bytes: &[u8]) -> Result<ParsedBundle, FormatError> {
    let header = Header::decode(bytes)?;
    let file_len = bytes.len() as u64;
    header.check_layout(file_len)?;
    let manifest_bytes = slice(bytes, header.manifest_offset, header.file_length)?;
    let actual = xxh3_64(manifest_bytes);
    if actual != header.manifest_checksum {
        return Err(FormatError::ManifestChecksumMismatch {
            expected: header.manifest_checksum,
            actual,
        });
    }
    let manifest = decode_manifest(manifest_bytes)?;
    let Checked {
        mut sections,
        tasks,
        tensors,
    } = check_manifest(&manifest, header.data_length)?;
    check_version_features(header.version, &manifest, &sections)?;
    for s in &mut sections {
        s.start = layout::end(header.data_offset, s.start)?;
        s.end = layout::end(header.data_offset, s.end)?;
        s.pad_end = layout::end(header.data_offset, s.pad_end)?;
    }
    Ok(ParsedBundle {
        header,
        manifest,
        sections,
        tasks,
        tensors,
    })
}

/// Rules 36 and 37: every encoding, module kind and method exists in the bundle's version —
/// `q8` and `q4` from version 3 on, `q3`, `q2`, per-task residuals and `tvq` from version 4 on,
/// `ternary` from version 5 on.
fn check_version_features(
    version: u32,
    manifest: &Manifest,
    sections: &[SectionMeta],
) -> Result<(), FormatError> {
    let newer = sections
        .iter()
        .enumerate()
        .find_map(|(i, s)| match s.content {
            Content::Dense(e) if e.since_version() > version => Some((i, e)),
            _ => None,
        });
    if let Some((section, encoding)) = newer {
        return Err(FormatError::EncodingNeedsVersion {
            section: section as SectionId,
            encoding,
            version,
            since: encoding.since_version(),
        });
    }
    if version >= 4 {
        return Ok(());
    }
    if manifest.merge.method == Method::Tvq {
        return Err(FormatError::FeatureNeedsVersion {
            what: "method tvq".into(),
            version,
        });
    }
    for task in &manifest.tasks {
        let residual = task
            .tensors
            .iter()
            .zip(&manifest.tensors)
            .find(|(m, _)| matches!(m, TaskTensor::Residual { .. }));
        if let Some((_, tensor)) = residual {
            return Err(FormatError::FeatureNeedsVersion {
                what: format!(
                    "task {:?} has a residual for tensor {:?}, which",
                    task.name, tensor.name
                ),
                version,
            });
        }
    }
    Ok(())
}

/// Rules 11, 12 and 35: decodes the manifest bytes, allocating at most
/// [`MANIFEST_DECODE_FACTOR`] bytes of sequence buffers per manifest byte (plus the strings,
/// at most one byte per manifest byte).
pub(crate) fn decode_manifest(bytes: &[u8]) -> Result<Manifest, FormatError> {
    let length = bytes.len() as u64;
    let budget = length.saturating_mul(MANIFEST_DECODE_FACTOR);
    let (decoded, exceeded) =
        budget::with_budget(budget, || postcard::take_from_bytes::<Manifest>(bytes));
    if exceeded {
        return Err(FormatError::ManifestDecodeBudget { length, budget });
    }
    let (manifest, rest) = decoded.map_err(|e| FormatError::ManifestDecode(e.to_string()))?;
    if !rest.is_empty() {
        return Err(FormatError::ManifestTrailingBytes {
            count: rest.len() as u64,
        });
    }
    Ok(manifest)
}

/// Whether `name` may name a task (rule 31): 1 to [`MAX_TASK_NAME_LEN`] bytes, no control
/// character (Unicode category Cc: U+0000–U+001F, U+007F–U+009F). Such a name is a C string
/// and prints on one line. The compiler applies this same function to the names it is given.
pub fn is_valid_task_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= MAX_TASK_NAME_LEN && !name.chars().any(char::is_control)
}

/// The λ that rule 33 requires task `task` of `n_tasks` to record under `merge`: for a method
/// with a λ (TALL, Consensus) the task's entry of `merge.lambda` (one value per task, or one
/// value for all tasks), else none. The compiler records exactly this.
pub fn task_lambda(merge: &MergeParams, n_tasks: usize, task: usize) -> Option<f32> {
    if !matches!(merge.method, Method::Tall | Method::Consensus) {
        return None;
    }
    match merge.lambda.as_slice() {
        [one] => Some(*one),
        all if all.len() == n_tasks => all.get(task).copied(),
        _ => None,
    }
}

/// The scale variant rule 32 requires on a merged tensor with a delta, for a task's
/// `scale_mode` and the tensor's rank: `"none"`, `"tensor"` or `"rows"`.
fn expected_scale(mode: ScaleMode, rank: usize) -> &'static str {
    match mode {
        ScaleMode::None => "none",
        ScaleMode::Tensor => "tensor",
        ScaleMode::Row if rank == 0 => "tensor",
        ScaleMode::Row => "rows",
    }
}

/// The name rule 32 uses for a scale variant.
fn scale_name(scale: &Scale) -> &'static str {
    match scale {
        Scale::None => "none",
        Scale::Tensor(_) => "tensor",
        Scale::Rows(_) => "rows",
    }
}

/// `bytes[start..end]` for ranges validated against the buffer's length; an error, never a
/// panic, if they are not.
fn slice(bytes: &[u8], start: u64, end: u64) -> Result<&[u8], FormatError> {
    let range = layout::to_usize(start)?..layout::to_usize(end)?;
    bytes.get(range).ok_or(FormatError::FileLengthMismatch {
        header: end,
        actual: bytes.len() as u64,
    })
}

/// Rules 13–34 on a decoded manifest describing a data region of `data_length` bytes. The order
/// (counts, names, shapes, scalars, λ, the report, graphs, the section table, then what each
/// task references) decides which error a manifest with several faults gets; tests/format.rs
/// breaks one rule at a time.
pub(crate) fn check_manifest(m: &Manifest, data_length: u64) -> Result<Checked, FormatError> {
    check_counts(m)?;
    // Rules 14–15: names.
    let tensors = index_names(
        m.tensors.iter().map(|t| t.name.as_str()),
        "tensor",
        FormatError::DuplicateTensorName,
    )?;
    let tasks = index_names(
        m.tasks.iter().map(|t| t.name.as_str()),
        "task",
        FormatError::DuplicateTaskName,
    )?;
    check_task_names_and_labels(m)?;
    // Rules 16–17: tensor shapes.
    let numels = m
        .tensors
        .iter()
        .map(|t| layout::checked_numel(&t.shape, || t.name.clone()))
        .collect::<Result<Vec<u64>, _>>()?;
    check_scalars(m)?;
    check_lambdas(m)?;
    check_report(m)?;
    check_graphs(m)?;
    // Rules 21–22: the section table tiles the data region.
    let mut claims = Claims::tile(&m.sections, data_length)?;
    claim_shared_sections(m, &numels, &mut claims)?;
    check_task_modules(m, &numels, &mut claims)?;
    Ok(Checked {
        sections: claims.finish()?,
        tasks,
        tensors,
    })
}

/// A count of the manifest, for errors.
fn count(n: usize) -> u64 {
    n as u64
}

/// Rule 13: counts.
fn check_counts(m: &Manifest) -> Result<(), FormatError> {
    if m.tasks.len() > MAX_TASKS {
        return Err(FormatError::TooManyTasks {
            count: count(m.tasks.len()),
            max: count(MAX_TASKS),
        });
    }
    if m.tensors.len() > MAX_TENSORS {
        return Err(FormatError::TooManyTensors {
            count: count(m.tensors.len()),
            max: count(MAX_TENSORS),
        });
    }
    if m.sections.len() > MAX_SECTIONS {
        return Err(FormatError::TooManySections {
            count: count(m.sections.len()),
            max: count(MAX_SECTIONS),
        });
    }
    if m.graphs.len() > MAX_GRAPHS {
        return Err(FormatError::TooManyGraphs {
            count: count(m.graphs.len()),
            max: count(MAX_GRAPHS),
        });
    }
    Ok(())
}

/// Rules 31 (task names are C strings on one line) and 30 (label names).
fn check_task_names_and_labels(m: &Manifest) -> Result<(), FormatError> {
    // Rule 31: task names are C strings on one line.
    if let Some((i, t)) = m
        .tasks
        .iter()
        .enumerate()
        .find(|(_, t)| !is_valid_task_name(&t.name))
    {
        return Err(FormatError::InvalidTaskName {
            index: count(i),
            name: t.name.clone(),
        });
    }

    // Rule 30: label names.
    for t in &m.tasks {
        if t.labels.len() > MAX_LABELS {
            return Err(FormatError::TooManyLabels {
                task: t.name.clone(),
                count: count(t.labels.len()),
                max: count(MAX_LABELS),
            });
        }
        index_names(t.labels.iter().map(String::as_str), "label", |label| {
            FormatError::DuplicateLabel {
                task: t.name.clone(),
                label,
            }
        })?;
    }
    Ok(())
}

/// Rule 18: finite scalars outside the task modules (those are checked in the task walk).
fn check_scalars(m: &Manifest) -> Result<(), FormatError> {
    let p = &m.merge;
    finite(p.alpha, || "merge alpha".into())?;
    finite(p.density, || "merge density".into())?;
    finite(p.gamma, || "merge gamma".into())?;
    for (i, &l) in p.lambda.iter().enumerate() {
        finite(l, || format!("merge lambda[{i}]"))?;
    }
    for t in &m.tasks {
        finite(t.global_scale, || format!("task {:?} global scale", t.name))?;
        if let Some(l) = t.lambda {
            finite(l, || format!("task {:?} lambda", t.name))?;
        }
    }
    Ok(())
}

/// Rule 33: the merge parameters hold no λ, one for all tasks, or one per task; each task
/// records its own.
fn check_lambdas(m: &Manifest) -> Result<(), FormatError> {
    if !matches!(m.merge.lambda.len(), 0 | 1) && m.merge.lambda.len() != m.tasks.len() {
        return Err(FormatError::LambdaCount {
            found: count(m.merge.lambda.len()),
            tasks: count(m.tasks.len()),
        });
    }
    for (i, t) in m.tasks.iter().enumerate() {
        let expected = task_lambda(&m.merge, m.tasks.len(), i);
        if t.lambda != expected {
            return Err(FormatError::LambdaMismatch {
                task: t.name.clone(),
                expected,
                found: t.lambda,
            });
        }
    }
    Ok(())
}

/// Rule 34: the compile report has one entry per task, in task order.
fn check_report(m: &Manifest) -> Result<(), FormatError> {
    if m.report.tasks.len() != m.tasks.len() {
        return Err(FormatError::TaskReportCount {
            found: count(m.report.tasks.len()),
            expected: count(m.tasks.len()),
        });
    }
    for (i, (t, r)) in m.tasks.iter().zip(&m.report.tasks).enumerate() {
        if r.name != t.name {
            return Err(FormatError::TaskReportName {
                index: count(i),
                found: r.name.clone(),
                expected: t.name.clone(),
            });
        }
        if let Some(c) = &r.calibration {
            if usize::try_from(c.chosen).map_or(true, |k| k >= c.candidates.len()) {
                return Err(FormatError::CalibrationChoice {
                    task: t.name.clone(),
                    chosen: c.chosen,
                    candidates: count(c.candidates.len()),
                });
            }
        }
    }
    Ok(())
}

/// Rules 19 (graph hashes) and 20 (each task's graph index).
fn check_graphs(m: &Manifest) -> Result<(), FormatError> {
    // Rule 19: graph hashes.
    let mut hashes = HashSet::with_capacity(m.graphs.len());
    for (i, g) in m.graphs.iter().enumerate() {
        let h = g.sha256.as_bytes();
        if h.len() != 64 || !h.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(FormatError::InvalidGraphHash {
                graph: count(i),
                sha256: g.sha256.clone(),
            });
        }
        if !hashes.insert(g.sha256.as_str()) {
            return Err(FormatError::DuplicateGraphHash(g.sha256.clone()));
        }
    }

    // Rule 20: graph indices.
    for t in &m.tasks {
        if usize::try_from(t.graph).map_or(true, |g| g >= m.graphs.len()) {
            return Err(FormatError::GraphOutOfRange {
                task: t.name.clone(),
                graph: t.graph,
                count: count(m.graphs.len()),
            });
        }
    }
    Ok(())
}

/// Rules 23–26 for the sections graphs, the tokenizer and tensors reference.
fn claim_shared_sections(
    m: &Manifest,
    numels: &[u64],
    claims: &mut Claims,
) -> Result<(), FormatError> {
    for (i, g) in m.graphs.iter().enumerate() {
        claims.claim(g.section, SectionKind::Graph, None, Content::Graph(i), None)?;
    }
    if let Some(id) = m.tokenizer {
        claims.claim(id, SectionKind::Tokenizer, None, Content::Tokenizer, None)?;
    }
    for (t, &n) in m.tensors.iter().zip(numels) {
        if let TensorStorage::Merged { base, delta } = &t.storage {
            claims.claim_dense(*base, SectionKind::Base, n)?;
            if let Some(d) = delta {
                claims.claim_dense(*d, SectionKind::Delta, n)?;
            }
        }
    }
    Ok(())
}

/// Rules 27–29 and 32 (and 16–18, 23–26 for what tasks reference): each task's module has
/// one entry per tensor, of the tensor's kind, with the scale its scale mode gives, and claims
/// its sections.
fn check_task_modules(
    m: &Manifest,
    numels: &[u64],
    claims: &mut Claims,
) -> Result<(), FormatError> {
    for task in &m.tasks {
        if task.tensors.len() != m.tensors.len() {
            return Err(FormatError::TaskTensorCount {
                task: task.name.clone(),
                found: count(task.tensors.len()),
                expected: count(m.tensors.len()),
            });
        }
        for ((tensor, &n), entry) in m.tensors.iter().zip(numels).zip(&task.tensors) {
            let mismatch = |expected, found| FormatError::TaskTensorMismatch {
                task: task.name.clone(),
                tensor: tensor.name.clone(),
                expected,
                found,
            };
            match (&tensor.storage, entry) {
                (TensorStorage::Merged { delta, .. }, TaskTensor::Merged { mask, scale }) => {
                    let module = (delta.is_some(), mask.as_ref(), scale);
                    check_merged_module(task, tensor, n, module, claims)?;
                }
                (
                    TensorStorage::Merged { delta, .. },
                    TaskTensor::Residual {
                        mask,
                        scale,
                        residual,
                    },
                ) => {
                    let module = (delta.is_some(), mask.as_ref(), scale);
                    check_merged_module(task, tensor, n, module, claims)?;
                    claims.claim_dense(*residual, SectionKind::Residual, n)?;
                }
                (TensorStorage::Private, TaskTensor::Private { stored, shape }) => {
                    let pn =
                        layout::checked_numel(shape, || format!("{}/{}", task.name, tensor.name))?;
                    claims.claim_dense(*stored, SectionKind::Private, pn)?;
                }
                (TensorStorage::Merged { .. }, TaskTensor::Private { .. }) => {
                    return Err(mismatch("merged", "private"));
                }
                (TensorStorage::Private, TaskTensor::Merged { .. }) => {
                    return Err(mismatch("private", "merged"));
                }
                (TensorStorage::Private, TaskTensor::Residual { .. }) => {
                    return Err(mismatch("private", "residual"));
                }
            }
        }
    }
    Ok(())
}

/// One task's module entry for merged tensor `tensor` of `n` elements: `(whether the tensor has
/// a delta, the mask, the scale)`. A finite scale, nothing without a delta, the scale the task's
/// scale mode gives (rule 32; rule 26 first: a rows scale on a scalar is reported as such), and
/// its mask and row-scale sections claimed at their sizes.
fn check_merged_module(
    task: &TaskEntry,
    tensor: &TensorEntry,
    n: u64,
    (has_delta, mask, scale): (bool, Option<&SectionId>, &Scale),
    claims: &mut Claims,
) -> Result<(), FormatError> {
    if let Scale::Tensor(s) = scale {
        finite(*s, || {
            format!("task {:?} scale of tensor {:?}", task.name, tensor.name)
        })?;
    }
    if !has_delta && (mask.is_some() || !matches!(scale, Scale::None)) {
        return Err(FormatError::ModuleWithoutDelta {
            task: task.name.clone(),
            tensor: tensor.name.clone(),
        });
    }
    // Rule 26 before rule 32: a rows scale on a scalar is reported as such.
    if matches!(scale, Scale::Rows(_)) && layout::rows(&tensor.shape).is_none() {
        return Err(FormatError::RowScaleOnScalar {
            task: task.name.clone(),
            tensor: tensor.name.clone(),
        });
    }
    // Rule 32: the scale is the one the task's scale mode gives.
    let expected = expected_scale(task.scale_mode, tensor.shape.len());
    if has_delta && scale_name(scale) != expected {
        return Err(FormatError::ScaleModeMismatch {
            task: task.name.clone(),
            tensor: tensor.name.clone(),
            mode: task.scale_mode,
            expected,
            found: scale_name(scale),
        });
    }
    if let Some(id) = mask {
        claims.claim(
            *id,
            SectionKind::Mask,
            Some(layout::mask_bytes(n)),
            Content::Mask,
            Some(n),
        )?;
    }
    if let Scale::Rows(id) = scale {
        let Some(rows) = layout::rows(&tensor.shape) else {
            return Err(FormatError::RowScaleOnScalar {
                task: task.name.clone(),
                tensor: tensor.name.clone(),
            });
        };
        claims.claim(
            *id,
            SectionKind::RowScale,
            Some(layout::row_scale_bytes(rows)?),
            Content::RowScale,
            Some(rows),
        )?;
    }
    Ok(())
}

/// SHA-256 of `bytes` as 64 lowercase hex digits (the form of `GraphEntry::sha256`).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    Sha256::digest(bytes)
        .iter()
        .fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// Rules 14–15 for one list of names; returns the name → index map.
fn index_names<'a>(
    names: impl ExactSizeIterator<Item = &'a str>,
    what: &'static str,
    duplicate: impl Fn(String) -> FormatError,
) -> Result<HashMap<String, usize>, FormatError> {
    let mut map = HashMap::with_capacity(names.len());
    for (i, name) in names.enumerate() {
        if name.is_empty() {
            return Err(FormatError::EmptyName {
                what,
                index: i as u64,
            });
        }
        if name.len() > MAX_NAME_LEN {
            return Err(FormatError::NameTooLong {
                what,
                index: i as u64,
                len: name.len() as u64,
                max: MAX_NAME_LEN as u64,
            });
        }
        if map.insert(name.to_owned(), i).is_some() {
            return Err(duplicate(name.to_owned()));
        }
    }
    Ok(map)
}

/// Rule 18 for one scalar.
fn finite(v: f32, what: impl FnOnce() -> String) -> Result<(), FormatError> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(FormatError::NonFiniteScalar {
            what: what(),
            value: v,
        })
    }
}

/// The section table being claimed by references (rules 23–26).
struct Claims<'a> {
    table: &'a [SectionEntry],
    /// Tiled ranges (start, end, pad_end), data-region relative.
    ranges: Vec<(u64, u64, u64)>,
    /// What each section was claimed as.
    claimed: Vec<Option<(Content, u64)>>,
}

impl<'a> Claims<'a> {
    /// Rules 21–22.
    fn tile(table: &'a [SectionEntry], data_length: u64) -> Result<Claims<'a>, FormatError> {
        let mut ranges: Vec<(u64, u64, u64)> = Vec::with_capacity(table.len());
        let mut expected = 0u64;
        let mut prev_end = 0u64;
        for (i, s) in table.iter().enumerate() {
            if s.offset != expected {
                return Err(FormatError::MisplacedSection {
                    section: i as SectionId,
                    offset: s.offset,
                    expected,
                });
            }
            let end = layout::end(s.offset, s.length)?;
            if let Some(last) = ranges.last_mut() {
                last.2 = s.offset;
            }
            ranges.push((s.offset, end, end));
            prev_end = end;
            expected = layout::align_up(end)?;
        }
        if prev_end != data_length {
            return Err(FormatError::DataLengthMismatch {
                data_length,
                end: prev_end,
            });
        }
        Ok(Claims {
            table,
            ranges,
            claimed: vec![None; table.len()],
        })
    }

    /// Rules 23–26 for one reference: `id` exists, holds `kind`, is not yet claimed, and is
    /// `length` bytes long (any length if `None`). `elements` defaults to the byte length.
    fn claim(
        &mut self,
        id: SectionId,
        kind: SectionKind,
        length: Option<u64>,
        content: Content,
        elements: Option<u64>,
    ) -> Result<(), FormatError> {
        let out_of_range = FormatError::SectionOutOfRange {
            section: u64::from(id),
            count: self.table.len() as u64,
        };
        let Ok(i) = usize::try_from(id) else {
            return Err(out_of_range);
        };
        let (Some(entry), Some(slot)) = (self.table.get(i), self.claimed.get_mut(i)) else {
            return Err(out_of_range);
        };
        if entry.kind != kind {
            return Err(FormatError::SectionKindMismatch {
                section: id,
                expected: kind,
                found: entry.kind,
            });
        }
        if slot.is_some() {
            return Err(FormatError::SectionReferencedTwice(id));
        }
        if let Some(expected) = length {
            if entry.length != expected {
                return Err(FormatError::SectionLengthMismatch {
                    section: id,
                    expected,
                    found: entry.length,
                });
            }
        }
        *slot = Some((content, elements.unwrap_or(entry.length)));
        Ok(())
    }

    /// A dense tensor of `numel` elements in `stored`.
    fn claim_dense(
        &mut self,
        stored: Stored,
        kind: SectionKind,
        numel: u64,
    ) -> Result<(), FormatError> {
        let bytes = layout::encoded_bytes(numel, stored.encoding)?;
        self.claim(
            stored.section,
            kind,
            Some(bytes),
            Content::Dense(stored.encoding),
            Some(numel),
        )
    }

    /// Rule 25 (unreferenced sections); the per-section metadata.
    fn finish(self) -> Result<Vec<SectionMeta>, FormatError> {
        self.ranges
            .into_iter()
            .zip(self.claimed)
            .enumerate()
            .map(|(i, ((start, end, pad_end), claimed))| {
                let Some((content, elements)) = claimed else {
                    return Err(FormatError::SectionUnreferenced(i as SectionId));
                };
                Ok(SectionMeta {
                    start,
                    end,
                    pad_end,
                    elements,
                    content,
                })
            })
            .collect()
    }
}

impl ParsedBundle {
    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The validated manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Gives up the bundle's metadata, keeping the manifest.
    pub fn into_manifest(self) -> Manifest {
        self.manifest
    }

    /// Index of the task called `name` in [`Manifest::tasks`].
    pub fn task_index(&self, name: &str) -> Option<usize> {
        self.tasks.get(name).copied()
    }

    /// Index of the tensor called `name` in [`Manifest::tensors`].
    pub fn tensor_index(&self, name: &str) -> Option<usize> {
        self.tensors.get(name).copied()
    }

    /// Number of elements section `id` holds: dense elements for base, delta and private
    /// sections, bits for a mask, rows for row scales, bytes for a graph.
    pub fn section_elements(&self, id: SectionId) -> Option<u64> {
        self.meta(id).ok().map(|m| m.elements)
    }

    fn meta(&self, id: SectionId) -> Result<&SectionMeta, FormatError> {
        usize::try_from(id)
            .ok()
            .and_then(|i| self.sections.get(i))
            .ok_or(FormatError::SectionOutOfRange {
                section: u64::from(id),
                count: self.sections.len() as u64,
            })
    }

    fn check_buffer(&self, bytes: &[u8]) -> Result<(), FormatError> {
        if bytes.len() as u64 != self.header.file_length {
            return Err(FormatError::FileLengthMismatch {
                header: self.header.file_length,
                actual: bytes.len() as u64,
            });
        }
        Ok(())
    }

    /// The bytes of section `id` (padding excluded) within `bytes`, the buffer that was parsed.
    /// Not checksummed: see [`ParsedBundle::verify_section`].
    pub fn section<'b>(&self, bytes: &'b [u8], id: SectionId) -> Result<&'b [u8], FormatError> {
        self.check_buffer(bytes)?;
        let m = self.meta(id)?;
        slice(bytes, m.start, m.end)
    }

    /// Decodes a base, delta, private or row-scale section to `f32` into `out` (cleared first;
    /// its allocation is reused).
    pub fn decode_f32(
        &self,
        bytes: &[u8],
        id: SectionId,
        out: &mut Vec<f32>,
    ) -> Result<(), FormatError> {
        let meta = self.meta(id)?;
        let encoding = match meta.content {
            Content::Dense(encoding) => encoding,
            Content::RowScale => Encoding::F32,
            Content::Graph(_) | Content::Tokenizer | Content::Mask => {
                return Err(FormatError::NotNumeric {
                    section: id,
                    kind: self.section_kind(id)?,
                })
            }
        };
        // The length was checked against `elements` by rule 26.
        out.clear();
        out.resize(layout::to_usize(meta.elements)?, 0.0);
        encoding.decode_slice(self.section(bytes, id)?, out);
        Ok(())
    }

    fn section_kind(&self, id: SectionId) -> Result<SectionKind, FormatError> {
        usize::try_from(id)
            .ok()
            .and_then(|i| self.manifest.sections.get(i))
            .map(|s| s.kind)
            .ok_or(FormatError::SectionOutOfRange {
                section: u64::from(id),
                count: self.sections.len() as u64,
            })
    }

    /// Checks rules V1–V7 for section `id`: its checksum, the zero padding after it, and for a
    /// mask its zero pad bits, for row scales that they are finite, for a tokenizer that it is
    /// UTF-8, for a graph that its SHA-256 is the one the manifest records, for a `q8` / `q4`
    /// tensor that its block scales are finite.
    pub fn verify_section(&self, bytes: &[u8], id: SectionId) -> Result<(), FormatError> {
        let data = self.section(bytes, id)?;
        let m = self.meta(id)?;
        let expected = self
            .manifest
            .sections
            .get(id as usize)
            .map_or(0, |s| s.checksum);
        let actual = xxh3_64(data);
        if actual != expected {
            return Err(FormatError::SectionChecksumMismatch {
                section: id,
                expected,
                actual,
            });
        }
        let padding = slice(bytes, m.end, m.pad_end)?;
        if padding.iter().any(|&b| b != 0) {
            return Err(FormatError::NonZeroPadding { section: id });
        }
        match m.content {
            Content::Mask => {
                let tail = m.elements % 8;
                if tail != 0 && data.last().is_some_and(|&b| b >> tail != 0) {
                    return Err(FormatError::MaskPadBits { section: id });
                }
            }
            Content::RowScale => {
                let bad = data.chunks_exact(4).position(|c| {
                    <[u8; 4]>::try_from(c).is_ok_and(|b| !f32::from_le_bytes(b).is_finite())
                });
                if let Some(row) = bad {
                    return Err(FormatError::NonFiniteRowScale {
                        section: id,
                        row: row as u64,
                    });
                }
            }
            Content::Tokenizer => {
                if std::str::from_utf8(data).is_err() {
                    return Err(FormatError::TokenizerNotUtf8 { section: id });
                }
            }
            Content::Graph(graph) => {
                let recorded = self.manifest.graphs.get(graph).map(|g| g.sha256.as_str());
                let actual = sha256_hex(data);
                if recorded != Some(actual.as_str()) {
                    return Err(FormatError::GraphHashMismatch {
                        section: id,
                        recorded: recorded.unwrap_or_default().to_owned(),
                        actual,
                    });
                }
            }
            Content::Dense(encoding) => {
                if let Some(block) = encoding.first_bad_scale(data) {
                    return Err(FormatError::NonFiniteBlockScale { section: id, block });
                }
            }
        }
        Ok(())
    }

    /// Checks everything: that the header and manifest are still those parsed, then rules
    /// V1–V7 for every section. Reads every byte of the file.
    pub fn verify(&self, bytes: &[u8]) -> Result<(), FormatError> {
        self.check_buffer(bytes)?;
        if bytes.get(..Header::LEN) != Some(&self.header.to_bytes()[..]) {
            return Err(FormatError::HeaderChanged);
        }
        let manifest = slice(bytes, self.header.manifest_offset, self.header.file_length)?;
        let actual = xxh3_64(manifest);
        if actual != self.header.manifest_checksum {
            return Err(FormatError::ManifestChecksumMismatch {
                expected: self.header.manifest_checksum,
                actual,
            });
        }
        (0..self.sections.len()).try_for_each(|i| self.verify_section(bytes, i as SectionId))
    }

    /// Bytes per part of the bundle, derived from the section table.
    pub fn sizes(&self) -> SizeReport {
        let mut r = SizeReport {
            total: self.header.file_length,
            ..SizeReport::default()
        };
        let mut sections = 0u64;
        for s in &self.manifest.sections {
            // Validated: the sections fit in the file, so these sums cannot overflow.
            let part = match s.kind {
                SectionKind::Graph => &mut r.graphs,
                SectionKind::Base => &mut r.base,
                SectionKind::Delta => &mut r.delta,
                SectionKind::Mask => &mut r.masks,
                SectionKind::RowScale => &mut r.scales,
                SectionKind::Private => &mut r.private,
                SectionKind::Tokenizer => &mut r.tokenizer,
                SectionKind::Residual => &mut r.residuals,
            };
            *part = part.saturating_add(s.length);
            sections = sections.saturating_add(s.length);
        }
        r.overhead = r.total.saturating_sub(sections);
        r
    }
}
