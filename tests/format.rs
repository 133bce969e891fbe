//! The bundle format, rule by rule (docs/FORMAT.md §6).
//!
//! Each `rNN_*` / `vN_*` test builds a valid bundle with the writer, breaks exactly one rule in
//! the bytes (re-encoding the manifest and fixing the header when needed so that only that rule
//! fails) and checks the specific error. The other tests cover the round trip, the literal
//! header, truncation, overflow, and the writer's atomicity.

use std::path::{Path, PathBuf};

use taskpack::format::DType;
use taskpack::format::Encoding;
use taskpack::format::{
    self, parse, BundleWriter, CalibrationReport, CandidateScore, CompileReport, FormatError,
    GraphEntry, Header, InputRecord, Manifest, MergeParams, Method, Provenance, Scale, ScaleMode,
    SectionEntry, SectionId, SectionKind, Stored, TaskEntry, TaskReport, TaskTensor, TensorEntry,
    TensorStorage, MAGIC, MANIFEST_DECODE_FACTOR, MAX_ELEMENTS, MAX_GRAPHS, MAX_LABELS,
    MAX_MANIFEST_LEN, MAX_NAME_LEN, MAX_RANK, MAX_SECTIONS, MAX_TASKS, MAX_TASK_NAME_LEN,
    MAX_TENSORS, VERSION,
};
use xxhash_rust::xxh3::xxh3_64;

// ---------------------------------------------------------------------------------------------
// A small sample bundle and helpers to take it apart and put it back together.
// ---------------------------------------------------------------------------------------------

// Section ids of the sample, in file order.
const GRAPH_A: SectionId = 0;
const W_BASE: SectionId = 1;
const W_DELTA: SectionId = 2;
const B_BASE: SectionId = 3;
const MASK_A: SectionId = 4;
const ROWS_A: SectionId = 5;
const HEAD_A: SectionId = 6;
const GRAPH_B: SectionId = 7;
const HEAD_B: SectionId = 8;
const TOKENIZER: SectionId = 9;

// Tensor and task indices of the sample.
const W: usize = 0;
const B: usize = 1;
const HEAD: usize = 2;
const TASK_A: usize = 0;
const TASK_B: usize = 1;

fn encode(dtype: DType, values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    dtype.encode(values, &mut out);
    out
}

fn hex(c: char) -> String {
    std::iter::repeat_n(c, 64).collect()
}

/// SHA-256 of `bytes` in lowercase hex (computed here with sha2, not with the crate's helper).
fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The compile report entry of task `name` (rule 34: one per task, in task order).
fn report(name: &str) -> TaskReport {
    TaskReport {
        name: name.into(),
        relative_error: 0.25,
        cosine: 0.9,
        mask_density: 0.5,
        calibration: None,
    }
}

fn merged(mask: Option<SectionId>, scale: Scale) -> TaskTensor {
    TaskTensor::Merged { mask, scale }
}

fn private(section: SectionId, dtype: DType, shape: &[u64]) -> TaskTensor {
    TaskTensor::Private {
        stored: Stored {
            section,
            encoding: dtype.into(),
        },
        shape: shape.to_vec(),
    }
}

fn tensor(name: &str, shape: &[u64], storage: TensorStorage) -> TensorEntry {
    TensorEntry {
        name: name.into(),
        shape: shape.to_vec(),
        dtype: DType::F32,
        storage,
    }
}

fn task(name: &str, graph: u32, global_scale: f32, tensors: Vec<TaskTensor>) -> TaskEntry {
    TaskEntry {
        name: name.into(),
        graph,
        global_scale,
        lambda: Some(0.4),
        scale_mode: ScaleMode::Row,
        labels: vec![],
        tensors,
    }
}

/// A manifest with everything but sections; tasks and tensors to be filled in.
fn manifest_skeleton(n_tasks: usize) -> Manifest {
    Manifest {
        graphs: vec![],
        tensors: vec![],
        sections: vec![],
        tasks: vec![],
        tokenizer: None,
        merge: MergeParams::defaults(Method::Tall, n_tasks),
        provenance: Provenance {
            compiler: "taskpack test".into(),
            inputs: vec![InputRecord {
                role: "base".into(),
                file: "base.onnx".into(),
                format: "onnx".into(),
                sha256: hex('0'),
                bytes: 1234,
            }],
        },
        report: CompileReport {
            inputs_bytes: 1234,
            ..CompileReport::default()
        },
    }
}

/// The sample: tensors `w` [3,5] (merged, f32 base, f16 delta), `b` [5] (merged, bf16 base, no
/// delta), `head` (private); task `a` (scale mode row: mask + row scales on `w`, graph A) and
/// task `b` (scale mode tensor: tensor scale on `w`, graph B, calibrated). Returns the manifest
/// without sections and the sections in order.
fn sample() -> (Manifest, Vec<(SectionKind, Vec<u8>)>) {
    let w_base: Vec<f32> = (0..15).map(|i| i as f32 * 0.5 - 3.0).collect();
    let w_delta: Vec<f32> = (0..15).map(|i| (i as f32 - 7.0) * 0.25).collect();
    let b_base = [0.1, 0.2, 0.3, 0.4, 0.5];
    // Elements i % 3 != 0 of 15, packed by hand (docs/FORMAT.md: bit i % 8, least significant
    // first, of byte i / 8): 1 2 4 5 7 | 8 10 11 13 14.
    let mask = [0b1011_0110u8, 0b0110_1101];
    let rows = [1.0f32, 0.5, 2.0];
    let head_a: Vec<f32> = (0..8).map(|i| i as f32).collect();
    let head_b: Vec<f32> = (0..12).map(|i| -(i as f32)).collect();
    let sections = vec![
        (SectionKind::Graph, b"fake onnx graph a".to_vec()),
        (SectionKind::Base, encode(DType::F32, &w_base)),
        (SectionKind::Delta, encode(DType::F16, &w_delta)),
        (SectionKind::Base, encode(DType::BF16, &b_base)),
        (SectionKind::Mask, mask.to_vec()),
        (SectionKind::RowScale, encode(DType::F32, &rows)),
        (SectionKind::Private, encode(DType::F32, &head_a)),
        (SectionKind::Graph, b"fake onnx graph b, longer".to_vec()),
        (SectionKind::Private, encode(DType::BF16, &head_b)),
        (
            SectionKind::Tokenizer,
            br#"{"model": "fake tokenizer"}"#.to_vec(),
        ),
    ];
    let mut m = manifest_skeleton(2);
    m.tokenizer = Some(TOKENIZER);
    m.graphs = vec![
        GraphEntry {
            section: GRAPH_A,
            sha256: sha256(&sections[GRAPH_A as usize].1),
        },
        GraphEntry {
            section: GRAPH_B,
            sha256: sha256(&sections[GRAPH_B as usize].1),
        },
    ];
    m.tensors = vec![
        tensor(
            "w",
            &[3, 5],
            TensorStorage::Merged {
                base: Stored {
                    section: W_BASE,
                    encoding: Encoding::F32,
                },
                delta: Some(Stored {
                    section: W_DELTA,
                    encoding: Encoding::F16,
                }),
            },
        ),
        tensor(
            "b",
            &[5],
            TensorStorage::Merged {
                base: Stored {
                    section: B_BASE,
                    encoding: Encoding::BF16,
                },
                delta: None,
            },
        ),
        tensor("head", &[2, 4], TensorStorage::Private),
    ];
    m.tasks = vec![
        task(
            "a",
            0,
            1.0,
            vec![
                merged(Some(MASK_A), Scale::Rows(ROWS_A)),
                merged(None, Scale::None),
                private(HEAD_A, DType::F32, &[2, 4]),
            ],
        ),
        // Task a carries label names (two rows of its head), task b none.
        task(
            "b",
            1,
            0.8,
            vec![
                merged(None, Scale::Tensor(0.5)),
                merged(None, Scale::None),
                private(HEAD_B, DType::BF16, &[3, 4]),
            ],
        ),
    ];
    m.tasks[TASK_A].labels = vec!["no".into(), "yes".into()];
    m.tasks[TASK_B].scale_mode = ScaleMode::Tensor;
    m.report.tasks = vec![
        report("a"),
        TaskReport {
            calibration: Some(CalibrationReport {
                examples: 16,
                candidates: vec![
                    CandidateScore {
                        setting: "lambda 0.4, scale none".into(),
                        agreement: 0.75,
                        logit_distance: 0.5,
                    },
                    CandidateScore {
                        setting: "lambda 0.4, scale tensor".into(),
                        agreement: 0.875,
                        logit_distance: 0.25,
                    },
                ],
                chosen: 1,
            }),
            ..report("b")
        },
    ];
    (m, sections)
}

/// Writes `sections` and `manifest` with the [`BundleWriter`] to `dir/name`.
fn write_bundle(
    dir: &Path,
    name: &str,
    manifest: Manifest,
    sections: &[(SectionKind, Vec<u8>)],
) -> Result<(PathBuf, u64), FormatError> {
    let path = dir.join(name);
    let mut w = BundleWriter::create(&path)?;
    for (i, (kind, bytes)) in sections.iter().enumerate() {
        let id = w.add_section(*kind, bytes)?;
        assert_eq!(id as usize, i);
    }
    let len = w.finish(manifest)?;
    Ok((path, len))
}

/// The sample bundle, written by the writer into a temporary directory, as bytes.
fn valid() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let (m, sections) = sample();
    let (path, len) = write_bundle(dir.path(), "sample.tpk", m, &sections).unwrap();
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(bytes.len() as u64, len);
    bytes
}

/// A bundle from its parts, with a consistent header.
fn with_parts(data: &[u8], manifest: &[u8]) -> Vec<u8> {
    let h = Header::new(data.len() as u64, manifest.len() as u64, xxh3_64(manifest)).unwrap();
    [h.to_bytes().as_slice(), data, manifest].concat()
}

/// A bundle assembled in memory by the test, independently of the writer: sections tiled per
/// docs/FORMAT.md §3, the section table filled in, no validation.
fn assemble(sections: &[(SectionKind, Vec<u8>)], mut m: Manifest) -> Vec<u8> {
    let mut data = Vec::new();
    m.sections.clear();
    for (kind, bytes) in sections {
        data.resize(data.len().next_multiple_of(64), 0);
        m.sections.push(SectionEntry {
            offset: data.len() as u64,
            length: bytes.len() as u64,
            checksum: xxh3_64(bytes),
            kind: *kind,
        });
        data.extend_from_slice(bytes);
    }
    with_parts(&data, &postcard::to_stdvec(&m).unwrap())
}

/// Header, data region and decoded manifest of a well-formed bundle.
fn parts(bytes: &[u8]) -> (Header, Vec<u8>, Manifest) {
    let h = Header::decode(bytes).unwrap();
    let data = bytes[64..h.manifest_offset as usize].to_vec();
    let m = postcard::from_bytes(&bytes[h.manifest_offset as usize..]).unwrap();
    (h, data, m)
}

/// `bytes` with its manifest edited by `f` (re-encoded; header fixed up).
fn remanifest(bytes: &[u8], f: impl FnOnce(&mut Manifest)) -> Vec<u8> {
    let (_, data, mut m) = parts(bytes);
    f(&mut m);
    with_parts(&data, &postcard::to_stdvec(&m).unwrap())
}

/// `bytes` with header fields edited by `f` (nothing recomputed).
fn patch_header(bytes: &[u8], f: impl FnOnce(&mut Header)) -> Vec<u8> {
    let mut h = Header::decode(bytes).unwrap();
    f(&mut h);
    let mut out = bytes.to_vec();
    out[..64].copy_from_slice(&h.to_bytes());
    out
}

/// `bytes` with the bytes of section `id` edited by `f`; with `fix_checksum` the section table
/// is updated so that the checksum still matches.
fn patch_section(
    bytes: &[u8],
    id: SectionId,
    fix_checksum: bool,
    f: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    let (_, mut data, mut m) = parts(bytes);
    let s = &mut m.sections[id as usize];
    let range = s.offset as usize..(s.offset + s.length) as usize;
    f(&mut data[range.clone()]);
    if fix_checksum {
        s.checksum = xxh3_64(&data[range]);
    }
    with_parts(&data, &postcard::to_stdvec(&m).unwrap())
}

/// The error `parse` gives, asserting it is one.
fn parse_err(bytes: &[u8]) -> FormatError {
    match parse(bytes) {
        Ok(_) => panic!("parse accepted a broken bundle"),
        Err(e) => e,
    }
}

/// The error `verify` gives on a bundle that parses.
fn verify_err(bytes: &[u8]) -> FormatError {
    let b = parse(bytes).expect("bulk-byte rules must not be checked at open");
    match b.verify(bytes) {
        Ok(()) => panic!("verify accepted a broken bundle"),
        Err(e) => e,
    }
}

macro_rules! assert_err {
    ($e:expr, $($pat:tt)+) => {{
        let e = IntoErr::into_err($e);
        let msg = format!("got {e:?}: {e}");
        assert!(matches!(e, $($pat)+), "{msg}");
    }};
}

/// An error, or the error of a result that must be one.
trait IntoErr {
    fn into_err(self) -> FormatError;
}

impl IntoErr for FormatError {
    fn into_err(self) -> FormatError {
        self
    }
}

impl<T> IntoErr for Result<T, FormatError> {
    fn into_err(self) -> FormatError {
        match self {
            Ok(_) => panic!("expected an error"),
            Err(e) => e,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Round trip, literal header, sizes, accessors.
// ---------------------------------------------------------------------------------------------

#[test]
fn round_trip_write_parse_verify() {
    let dir = tempfile::tempdir().unwrap();
    let (m, sections) = sample();
    let (path, len) = write_bundle(dir.path(), "rt.tpk", m.clone(), &sections).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len() as u64, len);
    // The writer's output is byte-for-byte what the spec says (an independent assembly).
    assert_eq!(bytes, assemble(&sections, m.clone()));

    let b = parse(&bytes).unwrap();
    b.verify(&bytes).unwrap();
    let mut expected = m;
    expected.sections = parts(&bytes).2.sections;
    assert_eq!(b.manifest(), &expected);
    assert_eq!(b.manifest().sections.len(), sections.len());
    for (i, (kind, data)) in sections.iter().enumerate() {
        let id = i as SectionId;
        assert_eq!(b.section(&bytes, id).unwrap(), &data[..]);
        assert_eq!(b.manifest().sections[i].kind, *kind);
        assert_eq!(b.manifest().sections[i].offset % 64, 0);
        b.verify_section(&bytes, id).unwrap();
    }
    // Every section is 64-byte aligned in the file.
    let h = b.header();
    assert_eq!(h.data_offset, 64);
    assert_eq!(h.version, VERSION);
    assert_eq!(h.file_length, len);

    // Decoding to f32 goes through the stored dtype.
    let mut out = Vec::new();
    b.decode_f32(&bytes, W_BASE, &mut out).unwrap();
    assert_eq!(out.len(), 15);
    assert_eq!(out[0], -3.0);
    b.decode_f32(&bytes, W_DELTA, &mut out).unwrap();
    assert_eq!(out[0], -1.75);
    b.decode_f32(&bytes, ROWS_A, &mut out).unwrap();
    assert_eq!(out, vec![1.0, 0.5, 2.0]);
    b.decode_f32(&bytes, HEAD_B, &mut out).unwrap();
    assert_eq!(out.len(), 12);
    assert_eq!(out[11], -11.0);
    assert_err!(
        b.decode_f32(&bytes, MASK_A, &mut out),
        FormatError::NotNumeric {
            section: MASK_A,
            kind: SectionKind::Mask
        }
    );
    assert_eq!(b.section_elements(MASK_A), Some(15));
    assert_eq!(b.section_elements(ROWS_A), Some(3));
    assert_eq!(b.section_elements(HEAD_B), Some(12));
    assert_eq!(b.section_elements(99), None);
    assert_eq!(b.task_index("b"), Some(TASK_B));
    assert_eq!(b.tensor_index("head"), Some(HEAD));
    assert_eq!(b.tensor_index("nope"), None);

    // Accessors check the buffer and the id.
    assert_err!(
        b.section(&bytes, 10),
        FormatError::SectionOutOfRange {
            section: 10,
            count: 10
        }
    );
    assert_err!(
        b.section(&bytes[..bytes.len() - 1], 0),
        FormatError::FileLengthMismatch { .. }
    );
    assert_eq!(b.into_manifest(), expected);
}

#[test]
fn sizes_are_derived_from_the_section_table() {
    let bytes = valid();
    let s = parse(&bytes).unwrap().sizes();
    assert_eq!(s.graphs, 17 + 25);
    assert_eq!(s.base, 60 + 10);
    assert_eq!(s.delta, 30);
    assert_eq!(s.masks, 2);
    assert_eq!(s.scales, 12);
    assert_eq!(s.private, 32 + 24);
    assert_eq!(s.tokenizer, 27);
    assert_eq!(s.total, bytes.len() as u64);
    assert_eq!(
        s.graphs + s.base + s.delta + s.masks + s.scales + s.private + s.tokenizer + s.overhead,
        s.total
    );
}

#[test]
fn empty_bundle_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let (path, len) = write_bundle(dir.path(), "empty.tpk", manifest_skeleton(0), &[]).unwrap();
    let bytes = std::fs::read(path).unwrap();
    let b = parse(&bytes).unwrap();
    b.verify(&bytes).unwrap();
    assert_eq!(b.header().data_length, 0);
    assert_eq!(b.header().manifest_offset, 64);
    assert_eq!(b.header().file_length, len);
    assert_eq!(b.sizes().overhead, len);
}

#[test]
fn header_literal_bytes() {
    let h = Header {
        version: 2,
        flags: 0,
        data_offset: 64,
        data_length: 0x0102,
        manifest_offset: 64 + 0x0102,
        manifest_length: 7,
        manifest_checksum: 0x1122_3344_5566_7788,
        file_length: 64 + 0x0102 + 7,
    };
    #[rustfmt::skip]
    let literal: [u8; 64] = [
        b'T', b'A', b'S', b'K', b'P', b'A', b'C', b'K', // magic
        2, 0, 0, 0,                                     // version
        0, 0, 0, 0,                                     // flags
        64, 0, 0, 0, 0, 0, 0, 0,                        // data_offset
        0x02, 0x01, 0, 0, 0, 0, 0, 0,                   // data_length
        0x42, 0x01, 0, 0, 0, 0, 0, 0,                   // manifest_offset
        7, 0, 0, 0, 0, 0, 0, 0,                         // manifest_length
        0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // manifest_checksum
        0x49, 0x01, 0, 0, 0, 0, 0, 0,                   // file_length
    ];
    assert_eq!(h.to_bytes(), literal);
    assert_eq!(Header::decode(&literal).unwrap(), h);
    assert_eq!(MAGIC, *b"TASKPACK");
    h.check_layout(64 + 0x0102 + 7).unwrap();

    // A whole bundle from literal header bytes: an empty data region and a real manifest.
    let manifest = postcard::to_stdvec(&manifest_skeleton(0)).unwrap();
    let mut file = Vec::new();
    file.extend_from_slice(b"TASKPACK");
    file.extend_from_slice(&2u32.to_le_bytes());
    file.extend_from_slice(&0u32.to_le_bytes());
    file.extend_from_slice(&64u64.to_le_bytes());
    file.extend_from_slice(&0u64.to_le_bytes());
    file.extend_from_slice(&64u64.to_le_bytes());
    file.extend_from_slice(&(manifest.len() as u64).to_le_bytes());
    file.extend_from_slice(&xxh3_64(&manifest).to_le_bytes());
    file.extend_from_slice(&(64 + manifest.len() as u64).to_le_bytes());
    assert_eq!(file.len(), 64);
    file.extend_from_slice(&manifest);
    let b = parse(&file).unwrap();
    assert_eq!(b.manifest(), &manifest_skeleton(0));
}

// ---------------------------------------------------------------------------------------------
// Header rules 1–9.
// ---------------------------------------------------------------------------------------------

#[test]
fn r01_file_shorter_than_header() {
    let bytes = valid();
    for len in 0..64 {
        assert_err!(
            parse_err(&bytes[..len]),
            FormatError::HeaderTooShort { len: l } if l == len as u64
        );
    }
}

#[test]
fn r02_magic() {
    let mut bytes = valid();
    bytes[7] = b'Q';
    assert_err!(parse_err(&bytes), FormatError::BadMagic { found } if &found == b"TASKPACQ");
}

#[test]
fn r03_version() {
    // Version 1 (the first pre-release format) and any future version are rejected.
    for version in [1, 6] {
        let bytes = patch_header(&valid(), |h| h.version = version);
        assert_err!(
            parse_err(&bytes),
            FormatError::UnsupportedVersion { found, known: 5 } if found == version
        );
    }
    // The writer writes version 5; versions 2 to 4 (the same manifest schema without what
    // came later) open.
    let bytes = valid();
    assert_eq!(bytes[8..12], 5u32.to_le_bytes());
    for old in [2, 3, 4] {
        let old = patch_header(&bytes, |h| h.version = old);
        parse(&old).unwrap().verify(&old).unwrap();
    }
    let bytes = patch_header(&valid(), |h| h.version = 0);
    assert_err!(
        parse_err(&bytes),
        FormatError::UnsupportedVersion { found: 0, .. }
    );
}

#[test]
fn r04_flags() {
    for flags in [1, 0x8000_0000] {
        let bytes = patch_header(&valid(), |h| h.flags = flags);
        assert_err!(parse_err(&bytes), FormatError::UnknownFlags { flags: f } if f == flags);
    }
}

#[test]
fn r05_file_length() {
    let bytes = valid();
    let n = bytes.len() as u64;
    // Extended file.
    let mut longer = bytes.clone();
    longer.push(0);
    assert_err!(
        parse_err(&longer),
        FormatError::FileLengthMismatch { header, actual } if header == n && actual == n + 1
    );
    // Header lies about the length.
    let lying = patch_header(&bytes, |h| h.file_length += 1);
    assert_err!(parse_err(&lying), FormatError::FileLengthMismatch { .. });
}

#[test]
fn r05_every_truncation_is_an_error_never_a_panic() {
    let bytes = valid();
    for len in 0..bytes.len() {
        let e = parse_err(&bytes[..len]);
        if len < 64 {
            assert_err!(e, FormatError::HeaderTooShort { .. });
        } else {
            assert_err!(e, FormatError::FileLengthMismatch { .. });
        }
    }
}

#[test]
fn r06_data_offset() {
    let bytes = patch_header(&valid(), |h| h.data_offset = 128);
    assert_err!(
        parse_err(&bytes),
        FormatError::InvalidDataOffset { found: 128 }
    );
}

#[test]
fn r07_manifest_offset() {
    let bytes = valid();
    let off = Header::decode(&bytes).unwrap().manifest_offset;
    let moved = patch_header(&bytes, |h| {
        h.manifest_offset += 1;
        h.manifest_length -= 1;
    });
    assert_err!(
        parse_err(&moved),
        FormatError::InvalidManifestOffset { found, expected } if found == off + 1 && expected == off
    );
    // data_length near u64::MAX: the sum overflows, cleanly.
    for data_length in [u64::MAX, u64::MAX - 63, u64::MAX / 2 + 1] {
        let huge = patch_header(&bytes, |h| h.data_length = data_length);
        let e = parse_err(&huge);
        assert!(
            matches!(
                e,
                FormatError::Overflow { .. } | FormatError::InvalidManifestOffset { .. }
            ),
            "{e:?}"
        );
    }
    let huge = patch_header(&bytes, |h| h.data_length = u64::MAX);
    assert_err!(parse_err(&huge), FormatError::Overflow { .. });
}

#[test]
fn r08_manifest_length() {
    let bytes = valid();
    let short = patch_header(&bytes, |h| h.manifest_length -= 1);
    assert_err!(parse_err(&short), FormatError::InvalidManifestLength { .. });
    let huge = patch_header(&bytes, |h| h.manifest_length = u64::MAX);
    assert_err!(parse_err(&huge), FormatError::Overflow { .. });
}

#[test]
fn r09_manifest_cap() {
    let manifest = vec![0u8; MAX_MANIFEST_LEN as usize + 1];
    let bytes = with_parts(&[], &manifest);
    assert_err!(
        parse_err(&bytes),
        FormatError::ManifestTooLarge { length, max } if length == MAX_MANIFEST_LEN + 1 && max == MAX_MANIFEST_LEN
    );
}

// ---------------------------------------------------------------------------------------------
// Manifest rules 10–20.
// ---------------------------------------------------------------------------------------------

#[test]
fn r10_manifest_checksum() {
    let mut bytes = valid();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    assert_err!(
        parse_err(&bytes),
        FormatError::ManifestChecksumMismatch { .. }
    );
    let bytes = patch_header(&valid(), |h| h.manifest_checksum ^= 1);
    assert_err!(
        parse_err(&bytes),
        FormatError::ManifestChecksumMismatch { .. }
    );
}

#[test]
fn r11_manifest_decode() {
    let (_, data, _) = parts(&valid());
    // Cut short (with a matching checksum and header).
    let (h, ..) = parts(&valid());
    let full = valid();
    let manifest = &full[h.manifest_offset as usize..];
    let bytes = with_parts(&data, &manifest[..manifest.len() - 1]);
    assert_err!(parse_err(&bytes), FormatError::ManifestDecode(_));
    // Not a manifest at all: an unknown enum variant where a `SectionKind` goes.
    let bytes = with_parts(&[], &[0, 0, 1, 0, 0, 0, 99]);
    assert_err!(parse_err(&bytes), FormatError::ManifestDecode(_));
    // An absurd length prefix does not allocate: it fails at the end of the input.
    let bytes = with_parts(&[], &[0xff, 0xff, 0xff, 0xff, 0x0f]);
    assert_err!(parse_err(&bytes), FormatError::ManifestDecode(_));
}

#[test]
fn r12_manifest_trailing_bytes() {
    let full = valid();
    let (h, data, _) = parts(&full);
    let mut manifest = full[h.manifest_offset as usize..].to_vec();
    manifest.extend_from_slice(&[0, 0, 0]);
    assert_err!(
        parse_err(&with_parts(&data, &manifest)),
        FormatError::ManifestTrailingBytes { count: 3 }
    );
}

#[test]
fn r13_task_count_cap() {
    let bytes = valid();
    let t = remanifest(&bytes, |m| {
        let a = m.tasks[0].clone();
        m.tasks = vec![a; MAX_TASKS + 1];
    });
    assert_err!(parse_err(&t), FormatError::TooManyTasks { count, .. } if count == MAX_TASKS as u64 + 1);
}

#[test]
fn r13_tensor_count_cap() {
    let t = remanifest(&valid(), |m| {
        // Counts are checked right after decoding; names long enough that the entries stay within
        // the decode budget of rule 35 (16 bytes of buffers per manifest byte).
        let e = tensor("0123456789abcdef", &[], TensorStorage::Private);
        m.tensors = vec![e; MAX_TENSORS + 1];
    });
    assert_err!(parse_err(&t), FormatError::TooManyTensors { count, .. } if count == MAX_TENSORS as u64 + 1);
}

#[test]
fn r13_section_count_cap() {
    // Spliced by hand (postcard concatenates fields; a varint count, then all-zero 4-byte
    // entries) to keep this test fast in debug builds.
    let (_, data, m) = parts(&valid());
    let n = MAX_SECTIONS + 1;
    let mut manifest = postcard::to_stdvec(&(&m.graphs, &m.tensors)).unwrap();
    manifest.extend_from_slice(&postcard::to_stdvec(&(n as u64)).unwrap());
    manifest.resize(manifest.len() + 4 * n, 0);
    let rest = (&m.tasks, &m.tokenizer, &m.merge, &m.provenance, &m.report);
    manifest.extend_from_slice(&postcard::to_stdvec(&rest).unwrap());
    let t = with_parts(&data, &manifest);
    assert_err!(parse_err(&t), FormatError::TooManySections { count, .. } if count == n as u64);
}

#[test]
fn r13_graph_count_cap() {
    let t = remanifest(&valid(), |m| {
        let g = m.graphs[0].clone();
        m.graphs = vec![g; MAX_GRAPHS + 1];
    });
    assert_err!(parse_err(&t), FormatError::TooManyGraphs { count, .. } if count == MAX_GRAPHS as u64 + 1);
}

#[test]
fn r14_names_non_empty_and_capped() {
    let bytes = valid();
    let t = remanifest(&bytes, |m| m.tensors[B].name.clear());
    assert_err!(
        parse_err(&t),
        FormatError::EmptyName {
            what: "tensor",
            index: 1
        }
    );
    let t = remanifest(&bytes, |m| m.tasks[TASK_B].name.clear());
    assert_err!(
        parse_err(&t),
        FormatError::EmptyName {
            what: "task",
            index: 1
        }
    );
    let t = remanifest(&bytes, |m| {
        m.tasks[TASK_A].name = "x".repeat(MAX_NAME_LEN + 1)
    });
    assert_err!(
        parse_err(&t),
        FormatError::NameTooLong {
            what: "task",
            index: 0,
            ..
        }
    );
    let t = remanifest(&bytes, |m| m.tensors[W].name = "x".repeat(MAX_NAME_LEN + 1));
    assert_err!(
        parse_err(&t),
        FormatError::NameTooLong {
            what: "tensor",
            index: 0,
            ..
        }
    );
    // Exactly at the cap is fine (task names have a tighter cap: rule 31).
    let ok = remanifest(&bytes, |m| m.tensors[W].name = "x".repeat(MAX_NAME_LEN));
    parse(&ok).unwrap();
}

#[test]
fn r15_unique_names() {
    let bytes = valid();
    let t = remanifest(&bytes, |m| m.tasks[TASK_B].name = "a".into());
    assert_err!(parse_err(&t), FormatError::DuplicateTaskName(n) if n == "a");
    let t = remanifest(&bytes, |m| m.tensors[HEAD].name = "w".into());
    assert_err!(parse_err(&t), FormatError::DuplicateTensorName(n) if n == "w");
}

#[test]
fn r16_rank_cap() {
    let bytes = valid();
    // Same element count, rank 9.
    let t = remanifest(&bytes, |m| {
        m.tensors[B].shape = vec![5, 1, 1, 1, 1, 1, 1, 1, 1];
    });
    assert_err!(
        parse_err(&t),
        FormatError::RankTooLarge { tensor, rank: 9, max } if tensor == "b" && max == MAX_RANK as u64
    );
    let t = remanifest(&bytes, |m| {
        m.tasks[TASK_A].tensors[HEAD] = private(HEAD_A, DType::F32, &[2, 4, 1, 1, 1, 1, 1, 1, 1]);
    });
    assert_err!(parse_err(&t), FormatError::RankTooLarge { tensor, .. } if tensor == "a/head");
}

#[test]
fn r17_element_count_overflow_and_cap() {
    let bytes = valid();
    // The private tensor's base shape is tied to no section: only rule 17 can catch it.
    let t = remanifest(&bytes, |m| m.tensors[HEAD].shape = vec![u64::MAX, 2]);
    assert_err!(parse_err(&t), FormatError::Overflow { .. });
    let t = remanifest(&bytes, |m| {
        m.tensors[HEAD].shape = vec![1 << 32, 1 << 32, 1 << 32]
    });
    assert_err!(parse_err(&t), FormatError::Overflow { .. });
    let t = remanifest(&bytes, |m| m.tensors[HEAD].shape = vec![1 << 21, 1 << 20]);
    assert_err!(
        parse_err(&t),
        FormatError::TooManyElements { numel, max, .. } if numel == 1 << 41 && max == MAX_ELEMENTS
    );
    // A private copy's shape whose byte length would overflow.
    let t = remanifest(&bytes, |m| {
        m.tasks[TASK_B].tensors[HEAD] = private(HEAD_B, DType::BF16, &[u64::MAX / 2, 3]);
    });
    assert_err!(parse_err(&t), FormatError::Overflow { .. });
}

#[test]
fn r18_finite_scalars() {
    let bytes = valid();
    let cases: [fn(&mut Manifest); 7] = [
        |m| m.tasks[TASK_A].global_scale = f32::NAN,
        |m| m.tasks[TASK_B].lambda = Some(f32::INFINITY),
        |m| m.tasks[TASK_B].tensors[W] = merged(None, Scale::Tensor(f32::NEG_INFINITY)),
        |m| m.merge.alpha = f32::NAN,
        |m| m.merge.density = f32::INFINITY,
        |m| m.merge.gamma = f32::NAN,
        |m| m.merge.lambda[1] = f32::NAN,
    ];
    for f in cases {
        let t = remanifest(&bytes, f);
        assert_err!(parse_err(&t), FormatError::NonFiniteScalar { .. });
    }
}

#[test]
fn r19_graph_hashes() {
    let bytes = valid();
    for bad in [hex('A'), hex('g'), "ab".into(), format!("{}0", hex('a'))] {
        let t = remanifest(&bytes, |m| m.graphs[1].sha256 = bad.clone());
        assert_err!(
            parse_err(&t),
            FormatError::InvalidGraphHash { graph: 1, .. }
        );
    }
    let t = remanifest(&bytes, |m| m.graphs[1].sha256 = m.graphs[0].sha256.clone());
    let a = sha256(b"fake onnx graph a");
    assert_err!(parse_err(&t), FormatError::DuplicateGraphHash(h) if h == a);
}

#[test]
fn r20_graph_index() {
    let t = remanifest(&valid(), |m| m.tasks[TASK_B].graph = 2);
    assert_err!(
        parse_err(&t),
        FormatError::GraphOutOfRange { task, graph: 2, count: 2 } if task == "b"
    );
    let t = remanifest(&valid(), |m| m.tasks[TASK_B].graph = u32::MAX);
    assert_err!(parse_err(&t), FormatError::GraphOutOfRange { .. });
}

// ---------------------------------------------------------------------------------------------
// Section table rules 21–26.
// ---------------------------------------------------------------------------------------------

#[test]
fn r21_sections_tile_the_data_region() {
    let bytes = valid();
    // Section 1 one alignment step too far (a gap).
    let t = remanifest(&bytes, |m| m.sections[1].offset += 64);
    assert_err!(
        parse_err(&t),
        FormatError::MisplacedSection {
            section: 1,
            offset: 128,
            expected: 64
        }
    );
    // Section 0 not at 0.
    let t = remanifest(&bytes, |m| m.sections[0].offset = 64);
    assert_err!(
        parse_err(&t),
        FormatError::MisplacedSection {
            section: 0,
            expected: 0,
            ..
        }
    );
    // Overlap: section 2 starts inside section 1.
    let t = remanifest(&bytes, |m| m.sections[2].offset -= 64);
    assert_err!(
        parse_err(&t),
        FormatError::MisplacedSection { section: 2, .. }
    );
    // A length that makes the end overflow.
    let t = remanifest(&bytes, |m| {
        let last = m.sections.len() - 1;
        m.sections[last].length = u64::MAX;
    });
    assert_err!(parse_err(&t), FormatError::Overflow { .. });
    // An end that overflows only when aligned up.
    let t = remanifest(&bytes, |m| {
        m.sections[0].length = u64::MAX - 1 - m.sections[0].offset;
    });
    assert_err!(parse_err(&t), FormatError::Overflow { .. });
}

#[test]
fn r22_no_trailing_bytes_in_the_data_region() {
    let full = valid();
    let (h, mut data, _) = parts(&full);
    data.extend_from_slice(&[0; 64]);
    let manifest = &full[h.manifest_offset as usize..];
    let t = with_parts(&data, manifest);
    assert_err!(
        parse_err(&t),
        FormatError::DataLengthMismatch { data_length, end } if data_length == end + 64
    );
    // No sections but a non-empty data region.
    let t = with_parts(
        &[0; 64],
        &postcard::to_stdvec(&manifest_skeleton(0)).unwrap(),
    );
    assert_err!(
        parse_err(&t),
        FormatError::DataLengthMismatch {
            data_length: 64,
            end: 0
        }
    );
}

#[test]
fn r23_section_ids_in_range() {
    let t = remanifest(&valid(), |m| m.graphs[0].section = 10);
    assert_err!(
        parse_err(&t),
        FormatError::SectionOutOfRange {
            section: 10,
            count: 10
        }
    );
    let t = remanifest(&valid(), |m| {
        m.tasks[TASK_A].tensors[W] = merged(Some(u32::MAX), Scale::Rows(ROWS_A));
    });
    assert_err!(parse_err(&t), FormatError::SectionOutOfRange { .. });
}

#[test]
fn r24_section_kinds_match_references() {
    let t = remanifest(&valid(), |m| {
        m.sections[MASK_A as usize].kind = SectionKind::Private
    });
    assert_err!(
        parse_err(&t),
        FormatError::SectionKindMismatch {
            section: MASK_A,
            expected: SectionKind::Mask,
            found: SectionKind::Private
        }
    );
    let t = remanifest(&valid(), |m| {
        m.sections[GRAPH_B as usize].kind = SectionKind::Base
    });
    assert_err!(
        parse_err(&t),
        FormatError::SectionKindMismatch {
            section: GRAPH_B,
            ..
        }
    );
}

#[test]
fn r25_sections_referenced_exactly_once() {
    let bytes = valid();
    // Task b reuses task a's mask.
    let t = remanifest(&bytes, |m| {
        m.tasks[TASK_B].tensors[W] = merged(Some(MASK_A), Scale::Tensor(0.5));
    });
    assert_err!(parse_err(&t), FormatError::SectionReferencedTwice(MASK_A));
    // Task a drops its mask: the section is orphaned.
    let t = remanifest(&bytes, |m| {
        m.tasks[TASK_A].tensors[W] = merged(None, Scale::Rows(ROWS_A));
    });
    assert_err!(parse_err(&t), FormatError::SectionUnreferenced(MASK_A));
}

#[test]
fn r26_section_lengths_match_references() {
    let bytes = valid();
    // Base declared f16 but stored as 15 f32.
    let t = remanifest(&bytes, |m| {
        if let TensorStorage::Merged { base, .. } = &mut m.tensors[W].storage {
            base.encoding = Encoding::F16;
        }
    });
    assert_err!(
        parse_err(&t),
        FormatError::SectionLengthMismatch {
            section: W_BASE,
            expected: 30,
            found: 60
        }
    );
    // Private copy with another shape than its bytes.
    let t = remanifest(&bytes, |m| {
        m.tasks[TASK_A].tensors[HEAD] = private(HEAD_A, DType::F32, &[3, 4]);
    });
    assert_err!(
        parse_err(&t),
        FormatError::SectionLengthMismatch {
            section: HEAD_A,
            expected: 48,
            found: 32
        }
    );
    // Mask and row-scale lengths follow the tensor's shape: [5,3] has 5 rows, not 3.
    let t = remanifest(&bytes, |m| m.tensors[W].shape = vec![5, 3]);
    assert_err!(
        parse_err(&t),
        FormatError::SectionLengthMismatch {
            section: ROWS_A,
            expected: 20,
            found: 12
        }
    );
    // A mask over 15 elements is 2 bytes.
    let (m, mut sections) = sample();
    sections[MASK_A as usize].1.push(0);
    assert_err!(
        parse_err(&assemble(&sections, m)),
        FormatError::SectionLengthMismatch {
            section: MASK_A,
            expected: 2,
            found: 3
        }
    );
}

#[test]
fn r26_row_scales_need_rank_one() {
    // A bundle with a scalar tensor that has a delta and row scales.
    let mut m = manifest_skeleton(1);
    m.graphs = vec![GraphEntry {
        section: 0,
        sha256: sha256(b"g"),
    }];
    m.report.tasks = vec![report("t")];
    m.tensors = vec![tensor(
        "s",
        &[],
        TensorStorage::Merged {
            base: Stored {
                section: 1,
                encoding: Encoding::F32,
            },
            delta: Some(Stored {
                section: 2,
                encoding: Encoding::F32,
            }),
        },
    )];
    m.tasks = vec![task("t", 0, 1.0, vec![merged(None, Scale::Rows(3))])];
    let sections = vec![
        (SectionKind::Graph, b"g".to_vec()),
        (SectionKind::Base, encode(DType::F32, &[1.0])),
        (SectionKind::Delta, encode(DType::F32, &[0.5])),
        (SectionKind::RowScale, encode(DType::F32, &[2.0])),
    ];
    assert_err!(
        parse_err(&assemble(&sections, m.clone())),
        FormatError::RowScaleOnScalar { task, tensor } if task == "t" && tensor == "s"
    );
    // The same with a tensor scale is a valid bundle.
    m.tasks[0].tensors[0] = merged(None, Scale::Tensor(2.0));
    let bytes = assemble(&sections[..3], m);
    parse(&bytes).unwrap().verify(&bytes).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Task rules 27–29.
// ---------------------------------------------------------------------------------------------

#[test]
fn r27_one_task_tensor_per_tensor() {
    let t = remanifest(&valid(), |m| {
        m.tasks[TASK_B].tensors.push(merged(None, Scale::None))
    });
    assert_err!(
        parse_err(&t),
        FormatError::TaskTensorCount { task, found: 4, expected: 3 } if task == "b"
    );
}

#[test]
fn r28_task_tensor_matches_storage() {
    // Task b's entries for `b` (merged) and `head` (private) swapped: every section is still
    // referenced once with the right length; only the variants are wrong.
    let t = remanifest(&valid(), |m| {
        m.tasks[TASK_B].tensors[B] = private(HEAD_B, DType::BF16, &[3, 4]);
        m.tasks[TASK_B].tensors[HEAD] = merged(None, Scale::None);
    });
    assert_err!(
        parse_err(&t),
        FormatError::TaskTensorMismatch { task, tensor, expected: "merged", found: "private" }
            if task == "b" && tensor == "b"
    );
}

#[test]
fn r29_no_module_without_delta() {
    let bytes = valid();
    let t = remanifest(&bytes, |m| {
        m.tasks[TASK_A].tensors[B] = merged(None, Scale::Tensor(2.0))
    });
    assert_err!(
        parse_err(&t),
        FormatError::ModuleWithoutDelta { task, tensor } if task == "a" && tensor == "b"
    );
    // A mask on `b` (moved from `w`, so no section is orphaned or shared).
    let t = remanifest(&bytes, |m| {
        m.tasks[TASK_A].tensors[W] = merged(None, Scale::Rows(ROWS_A));
        m.tasks[TASK_A].tensors[B] = merged(Some(MASK_A), Scale::None);
    });
    assert_err!(parse_err(&t), FormatError::ModuleWithoutDelta { .. });
}

// ---------------------------------------------------------------------------------------------
// Bulk-byte rules V1–V4 (verify).
// ---------------------------------------------------------------------------------------------

#[test]
fn v1_section_checksums() {
    let t = patch_section(&valid(), W_DELTA, false, |d| d[3] ^= 0x10);
    assert_err!(
        verify_err(&t),
        FormatError::SectionChecksumMismatch {
            section: W_DELTA,
            ..
        }
    );
    // verify_section checks one section only.
    let b = parse(&t).unwrap();
    b.verify_section(&t, W_BASE).unwrap();
    assert_err!(
        b.verify_section(&t, W_DELTA),
        FormatError::SectionChecksumMismatch {
            section: W_DELTA,
            ..
        }
    );
}

#[test]
fn v2_zero_padding() {
    let mut t = valid();
    // Section 0 is 17 bytes at file offset 64; its padding runs to file offset 128.
    t[64 + 40] = 1;
    assert_err!(
        verify_err(&t),
        FormatError::NonZeroPadding { section: GRAPH_A }
    );
    let b = parse(&t).unwrap();
    assert_err!(
        b.verify_section(&t, GRAPH_A),
        FormatError::NonZeroPadding { .. }
    );
}

#[test]
fn v3_mask_pad_bits() {
    // 15 elements: bit 7 of byte 1 is padding.
    let t = patch_section(&valid(), MASK_A, true, |d| d[1] |= 0x80);
    assert_err!(verify_err(&t), FormatError::MaskPadBits { section: MASK_A });
    // Element 14 (bit 6 of byte 1) is a real bit.
    let ok = patch_section(&valid(), MASK_A, true, |d| d[1] ^= 0x40);
    parse(&ok).unwrap().verify(&ok).unwrap();
}

#[test]
fn v4_finite_row_scales() {
    let t = patch_section(&valid(), ROWS_A, true, |d| {
        d[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    assert_err!(
        verify_err(&t),
        FormatError::NonFiniteRowScale {
            section: ROWS_A,
            row: 1
        }
    );
}

#[test]
fn v5_tokenizer_is_utf8() {
    let t = patch_section(&valid(), TOKENIZER, true, |d| d[0] = 0xff);
    assert_err!(
        verify_err(&t),
        FormatError::TokenizerNotUtf8 { section: TOKENIZER }
    );
}

#[test]
fn r24_r25_the_tokenizer_section() {
    let bytes = valid();
    let t = remanifest(&bytes, |m| m.tokenizer = Some(GRAPH_B));
    assert_err!(
        parse_err(&t),
        FormatError::SectionKindMismatch {
            section: GRAPH_B,
            expected: SectionKind::Tokenizer,
            found: SectionKind::Graph
        }
    );
    let t = remanifest(&bytes, |m| m.tokenizer = None);
    assert_err!(parse_err(&t), FormatError::SectionUnreferenced(TOKENIZER));
    let t = remanifest(&bytes, |m| m.tokenizer = Some(10));
    assert_err!(
        parse_err(&t),
        FormatError::SectionOutOfRange {
            section: 10,
            count: 10
        }
    );
}

#[test]
fn r30_label_names() {
    let bytes = valid();
    let t = remanifest(&bytes, |m| {
        m.tasks[TASK_B].labels = vec!["x".into(); MAX_LABELS + 1]
    });
    assert_err!(
        parse_err(&t),
        FormatError::TooManyLabels { ref task, count, max }
            if task == "b" && count == MAX_LABELS as u64 + 1 && max == MAX_LABELS as u64
    );
    let t = remanifest(&bytes, |m| m.tasks[TASK_A].labels[1] = String::new());
    assert_err!(
        parse_err(&t),
        FormatError::EmptyName {
            what: "label",
            index: 1
        }
    );
    let t = remanifest(&bytes, |m| {
        m.tasks[TASK_A].labels[1] = "x".repeat(MAX_NAME_LEN + 1)
    });
    assert_err!(
        parse_err(&t),
        FormatError::NameTooLong {
            what: "label",
            index: 1,
            ..
        }
    );
    let t = remanifest(&bytes, |m| m.tasks[TASK_A].labels[1] = "no".into());
    assert_err!(
        parse_err(&t),
        FormatError::DuplicateLabel { ref task, ref label } if task == "a" && label == "no"
    );
    // The same label in two tasks is fine.
    let t = remanifest(&bytes, |m| m.tasks[TASK_B].labels = vec!["no".into()]);
    assert_eq!(parse(&t).unwrap().manifest().tasks[TASK_B].labels, ["no"]);
}

// ---------------------------------------------------------------------------------------------
// Rules 31–35 and V6: names, scale modes, λ, the report, the decode budget, graph hashes.
// ---------------------------------------------------------------------------------------------

#[test]
fn r31_task_names_are_one_line_c_strings() {
    let bytes = valid();
    let long = "x".repeat(MAX_TASK_NAME_LEN + 1);
    for bad in [
        "a\0b",
        "\0",
        "two\nlines",
        "tab\there",
        "del\u{7f}",
        "c1\u{85}",
        &long,
    ] {
        let t = remanifest(&bytes, |m| m.tasks[TASK_B].name = bad.to_string());
        assert_err!(
            parse_err(&t),
            FormatError::InvalidTaskName { index: 1, ref name } if name == bad
        );
        // The compiler's rule is the same function.
        assert!(!format::is_valid_task_name(bad), "{bad:?}");
    }
    for good in ["x".repeat(MAX_TASK_NAME_LEN), "émotion/文字 v2".into()] {
        let t = remanifest(&bytes, |m| {
            m.tasks[TASK_B].name = good.clone();
            m.report.tasks[TASK_B].name = good.clone();
        });
        let b = parse(&t).unwrap();
        // What a C caller needs: the name as a C string.
        assert!(std::ffi::CString::new(b.manifest().tasks[TASK_B].name.clone()).is_ok());
    }
    // A tensor name may be anything rule 14 allows (ONNX initializer names are not ours).
    let t = remanifest(&bytes, |m| m.tensors[B].name = "b\0\n".into());
    parse(&t).unwrap();
    // A compile with such a task name fails before reading any checkpoint.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.tpk");
    let (ok, _, err) = crate::common::cli(&[
        "compile",
        "--base",
        "missing.onnx",
        "--task",
        "a\tb=missing.onnx",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("invalid task name"), "{err}");
}

#[test]
fn r32_scale_mode_matches_the_scales() {
    let bytes = valid();
    // (task, mode, expected, found): task a stores rows on `w`, task b a tensor scale.
    let cases = [
        (TASK_A, ScaleMode::None, "none", "rows"),
        (TASK_A, ScaleMode::Tensor, "tensor", "rows"),
        (TASK_B, ScaleMode::None, "none", "tensor"),
        (TASK_B, ScaleMode::Row, "rows", "tensor"),
    ];
    for (t, mode, e, f) in cases {
        let broken = remanifest(&bytes, |m| m.tasks[t].scale_mode = mode);
        assert_err!(
            parse_err(&broken),
            FormatError::ScaleModeMismatch { ref tensor, mode: m, expected, found, .. }
                if tensor == "w" && m == mode && expected == e && found == f
        );
    }
    // A scale where the mode says none.
    let broken = remanifest(&bytes, |m| {
        m.tasks[TASK_B].scale_mode = ScaleMode::None;
        m.tasks[TASK_B].tensors[W] = merged(None, Scale::None);
    });
    parse(&broken).unwrap();
    let broken = remanifest(&bytes, |m| {
        m.tasks[TASK_B].tensors[W] = merged(None, Scale::None)
    });
    assert_err!(
        parse_err(&broken),
        FormatError::ScaleModeMismatch {
            expected: "tensor",
            found: "none",
            ..
        }
    );
    // `b` has no delta: no scale whatever the mode (rule 29), so every mode is fine there; a
    // scalar under mode row takes a tensor scale (r26_row_scales_need_rank_one).
}

#[test]
fn r33_lambda_is_the_merge_parameters_lambda() {
    let bytes = valid();
    let t = remanifest(&bytes, |m| m.tasks[TASK_B].lambda = None);
    assert_err!(
        parse_err(&t),
        FormatError::LambdaMismatch { ref task, expected: Some(e), found: None }
            if task == "b" && e == 0.4
    );
    let t = remanifest(&bytes, |m| m.tasks[TASK_B].lambda = Some(0.5));
    assert_err!(
        parse_err(&t),
        FormatError::LambdaMismatch { found: Some(f), .. } if f == 0.5
    );
    // Per-task values.
    let t = remanifest(&bytes, |m| m.merge.lambda = vec![0.4, 0.6]);
    assert_err!(
        parse_err(&t),
        FormatError::LambdaMismatch { ref task, expected: Some(e), found: Some(f) }
            if task == "b" && e == 0.6 && f == 0.4
    );
    let ok = remanifest(&bytes, |m| {
        m.merge.lambda = vec![0.4, 0.6];
        m.tasks[TASK_B].lambda = Some(0.6);
    });
    parse(&ok).unwrap();
    // One value for every task.
    parse(&remanifest(&bytes, |m| m.merge.lambda = vec![0.4])).unwrap();
    // Neither one per task nor one for all.
    let t = remanifest(&bytes, |m| m.merge.lambda = vec![0.4; 3]);
    assert_err!(
        parse_err(&t),
        FormatError::LambdaCount { found: 3, tasks: 2 }
    );
    // A method without λ records none.
    let t = remanifest(&bytes, |m| m.merge.method = Method::TaskArithmetic);
    assert_err!(
        parse_err(&t),
        FormatError::LambdaMismatch { ref task, expected: None, found: Some(_) } if task == "a"
    );
    let ok = remanifest(&bytes, |m| {
        m.merge.method = Method::Emr;
        m.tasks.iter_mut().for_each(|t| t.lambda = None);
    });
    parse(&ok).unwrap();
}

#[test]
fn r34_report_has_one_entry_per_task() {
    let bytes = valid();
    let t = remanifest(&bytes, |m| {
        m.report.tasks.pop();
    });
    assert_err!(
        parse_err(&t),
        FormatError::TaskReportCount {
            found: 1,
            expected: 2
        }
    );
    let t = remanifest(&bytes, |m| m.report.tasks.push(report("c")));
    assert_err!(
        parse_err(&t),
        FormatError::TaskReportCount {
            found: 3,
            expected: 2
        }
    );
    let t = remanifest(&bytes, |m| m.report.tasks.swap(0, 1));
    assert_err!(
        parse_err(&t),
        FormatError::TaskReportName { index: 0, ref found, ref expected }
            if found == "b" && expected == "a"
    );
    for chosen in [2, u64::MAX] {
        let t = remanifest(&bytes, |m| {
            if let Some(c) = &mut m.report.tasks[TASK_B].calibration {
                c.chosen = chosen;
            }
        });
        assert_err!(
            parse_err(&t),
            FormatError::CalibrationChoice { ref task, chosen: c, candidates: 2 }
                if task == "b" && c == chosen
        );
    }
}

/// A manifest whose task `a` claims `claimed` labels and has `present` empty ones, spliced by
/// hand (postcard concatenates fields: a varint count, then one zero byte per empty string).
fn manifest_with_empty_labels(claimed: u64, present: usize) -> Vec<u8> {
    let mut m = manifest_skeleton(1);
    m.report.tasks = vec![report("a")];
    let t = task("a", 0, 1.0, vec![]);
    let mut out = postcard::to_stdvec(&(&m.graphs, &m.tensors, &m.sections)).unwrap();
    out.extend(postcard::to_stdvec(&1u64).unwrap());
    let head = (&t.name, t.graph, t.global_scale, t.lambda, t.scale_mode);
    out.extend(postcard::to_stdvec(&head).unwrap());
    out.extend(postcard::to_stdvec(&claimed).unwrap());
    out.resize(out.len() + present, 0);
    out.extend(postcard::to_stdvec(&t.tensors).unwrap());
    let rest = (&m.tokenizer, &m.merge, &m.provenance, &m.report);
    out.extend(postcard::to_stdvec(&rest).unwrap());
    out
}

#[test]
fn r35_manifest_decode_budget() {
    // Each empty label is 1 byte of manifest and a 24-byte `String` in memory: more than the
    // budget of MANIFEST_DECODE_FACTOR bytes per manifest byte. Refused before allocating.
    let n = 20_000;
    let manifest = manifest_with_empty_labels(n, n as usize);
    let length = manifest.len() as u64;
    assert!(std::mem::size_of::<String>() as u64 * n > MANIFEST_DECODE_FACTOR * length);
    assert_err!(
        parse_err(&with_parts(&[], &manifest)),
        FormatError::ManifestDecodeBudget { length: l, budget }
            if l == length && budget == MANIFEST_DECODE_FACTOR * length
    );
    // The splice is right: a few empty labels decode (and then break rule 30).
    assert_err!(
        parse_err(&with_parts(&[], &manifest_with_empty_labels(2, 2))),
        FormatError::EmptyName {
            what: "label",
            index: 0
        }
    );
    // A length prefix claiming 2^40 labels with a few bytes behind it: a decode error, not an
    // allocation (past the bytes left, elements are charged as they arrive).
    let lying = manifest_with_empty_labels(1 << 40, 0);
    assert_err!(
        parse_err(&with_parts(&[], &lying)),
        FormatError::ManifestDecode(_)
    );
    // The sample is well inside the budget (so are the compiler's bundles: every compile
    // reads its bundle back through `parse`).
    parse(&valid()).unwrap();
}

#[test]
fn v6_graph_hashes_match_the_graphs() {
    // The graph bytes changed and their checksum fixed: only the hash can tell.
    let t = patch_section(&valid(), GRAPH_B, true, |d| d[0] = b'F');
    assert_err!(
        verify_err(&t),
        FormatError::GraphHashMismatch { section: GRAPH_B, ref recorded, ref actual }
            if *recorded == sha256(b"fake onnx graph b, longer")
                && *actual == sha256(b"Fake onnx graph b, longer")
    );
    let b = parse(&t).unwrap();
    b.verify_section(&t, GRAPH_A).unwrap();
    assert_err!(
        b.verify_section(&t, GRAPH_B),
        FormatError::GraphHashMismatch { .. }
    );
    // The runtime checks it on first use of the section.
    let bundle = taskpack::runtime::Bundle::from_bytes(t).unwrap();
    assert!(bundle.section(GRAPH_A).is_ok());
    let e = bundle.section(GRAPH_B).unwrap_err().to_string();
    assert!(e.contains("SHA-256"), "{e}");
}

#[test]
fn writer_checks_the_bulk_rules_too() {
    // The writer runs the reader's verify on what it wrote: V3–V6 failures never reach the
    // destination.
    let dir = tempfile::tempdir().unwrap();
    type Damage = fn(&mut Manifest, &mut Vec<(SectionKind, Vec<u8>)>);
    let cases: [(Damage, &str); 4] = [
        (|_, s| s[MASK_A as usize].1[1] |= 0x80, "V3"),
        (
            |_, s| s[ROWS_A as usize].1[..4].copy_from_slice(&f32::INFINITY.to_le_bytes()),
            "V4",
        ),
        (|_, s| s[TOKENIZER as usize].1[0] = 0xc0, "V5"),
        (|m, _| m.graphs[0].sha256 = hex('0'), "V6"),
    ];
    for (f, rule) in cases {
        let (mut m, mut sections) = sample();
        f(&mut m, &mut sections);
        let e = write_bundle(dir.path(), "v.tpk", m, &sections).unwrap_err();
        let ok = match rule {
            "V3" => matches!(e, FormatError::MaskPadBits { section: MASK_A }),
            "V4" => matches!(
                e,
                FormatError::NonFiniteRowScale {
                    section: ROWS_A,
                    row: 0
                }
            ),
            "V5" => matches!(e, FormatError::TokenizerNotUtf8 { section: TOKENIZER }),
            _ => matches!(
                e,
                FormatError::GraphHashMismatch {
                    section: GRAPH_A,
                    ..
                }
            ),
        };
        assert!(ok, "{rule}: got {e:?}");
        assert!(dir_entries(dir.path()).is_empty(), "{rule}");
    }
    // And the rules 31–34 before writing the manifest.
    let (mut m, sections) = sample();
    m.tasks[TASK_A].scale_mode = ScaleMode::None;
    let e = write_bundle(dir.path(), "v.tpk", m, &sections).unwrap_err();
    assert_err!(e, FormatError::ScaleModeMismatch { .. });
    assert!(dir_entries(dir.path()).is_empty());
}

#[test]
fn a_bundle_read_into_memory_ignores_later_changes_to_the_file() {
    // The documented alternative to mapping (src/mmap.rs): `Bundle::read` owns its bytes.
    let dir = tempfile::tempdir().unwrap();
    let (m, sections) = sample();
    let (path, _) = write_bundle(dir.path(), "r.tpk", m, &sections).unwrap();
    let bundle = taskpack::runtime::Bundle::read(&path).unwrap();
    // Rewritten in place (not replaced by rename), same length.
    let len = std::fs::metadata(&path).unwrap().len() as usize;
    std::fs::write(&path, vec![0xa5u8; len]).unwrap();
    bundle.verify().unwrap();
    assert_eq!(bundle.section(GRAPH_A).unwrap(), b"fake onnx graph a");
    // The CLI's --no-mmap reads too (a global flag, before or after the command).
    let (m, sections) = sample();
    let (path, _) = write_bundle(dir.path(), "r.tpk", m, &sections).unwrap();
    let p = path.to_str().unwrap();
    // The sample's graphs are placeholders: verify reads the whole bundle (rules 1–36, V1–V7)
    // and stops at the graph rules, which shows it got that far with the flag in either place.
    for args in [["--no-mmap", "verify", p], ["verify", p, "--no-mmap"]] {
        let (ok, _, err) = crate::common::cli(&args);
        assert!(!ok);
        assert!(err.contains("graph 0: not an ONNX model"), "{err}");
    }
}

#[test]
fn verify_notices_a_changed_file() {
    let bytes = valid();
    let b = parse(&bytes).unwrap();
    let mut changed = bytes.clone();
    changed[60] ^= 1; // file_length
    assert_err!(b.verify(&changed), FormatError::HeaderChanged);
    let mut changed = bytes.clone();
    let last = changed.len() - 1;
    changed[last] ^= 1;
    assert_err!(
        b.verify(&changed),
        FormatError::ManifestChecksumMismatch { .. }
    );
}

#[test]
fn corrupting_any_single_byte_never_panics() {
    let bytes = valid();
    for i in 0..bytes.len() {
        for x in [0x01, 0x80, 0xff] {
            let mut t = bytes.clone();
            t[i] ^= x;
            if let Ok(b) = parse(&t) {
                // Only data bytes may pass open, and the version turned from 5 into 4 (5 ^ 1):
                // the sample stores nothing version 4 lacks, so it is a valid version-4 bundle too.
                let to_version_4 = i == 8 && t[8] == 4;
                assert!(
                    i >= 64 || to_version_4,
                    "header byte {i} corrupted yet parsed"
                );
                if to_version_4 {
                    continue;
                }
                assert!(b.verify(&t).is_err(), "byte {i} ^ {x:#x} undetected");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The writer.
// ---------------------------------------------------------------------------------------------

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn writer_dropped_unfinished_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.tpk");
    let mut w = BundleWriter::create(&path).unwrap();
    w.add_section(SectionKind::Graph, b"abc").unwrap();
    let tmp = w.temp_path().to_owned();
    assert!(tmp.exists());
    assert_eq!(tmp.parent(), Some(dir.path()));
    drop(w);
    assert!(!tmp.exists());
    assert!(dir_entries(dir.path()).is_empty());
}

#[test]
fn writer_failed_finish_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut m, sections) = sample();
    // An invalid manifest: the writer refuses to write what a reader would reject.
    m.tasks[TASK_B].name = "a".into();
    let e = write_bundle(dir.path(), "bad.tpk", m, &sections).unwrap_err();
    assert_err!(e, FormatError::DuplicateTaskName(_));
    assert!(dir_entries(dir.path()).is_empty());

    // A section the manifest forgets.
    let (m, mut sections) = sample();
    sections.push((SectionKind::Private, vec![1, 2, 3]));
    let e = write_bundle(dir.path(), "bad.tpk", m, &sections).unwrap_err();
    assert_err!(e, FormatError::SectionUnreferenced(10));
    assert!(dir_entries(dir.path()).is_empty());

    // The manifest must leave the section table to the writer.
    let (mut m, sections) = sample();
    m.sections = parts(&valid()).2.sections;
    let e = write_bundle(dir.path(), "bad.tpk", m, &sections).unwrap_err();
    assert_err!(e, FormatError::SectionsAlreadySet(10));
    assert!(dir_entries(dir.path()).is_empty());
}

#[test]
fn writer_panic_or_fill_error_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.tpk");
    let result = std::panic::catch_unwind(|| {
        let mut w = BundleWriter::create(&path).unwrap();
        w.add_section(SectionKind::Graph, b"abc").unwrap();
        let _ = w.add_section_with(SectionKind::Base, |_| panic!("compiler bug"));
    });
    assert!(result.is_err());
    assert!(dir_entries(dir.path()).is_empty());

    // An error from the fill closure poisons the writer.
    let mut w = BundleWriter::create(&path).unwrap();
    let e = w
        .add_section_with(SectionKind::Graph, |sink| {
            use std::io::Write;
            sink.write_all(b"part")?;
            Err(std::io::Error::other("source checkpoint unreadable"))
        })
        .unwrap_err();
    assert_err!(e, FormatError::Io { .. });
    assert_err!(
        w.add_section(SectionKind::Graph, b"x"),
        FormatError::WriterFailed { .. }
    );
    assert_err!(
        w.finish(manifest_skeleton(0)),
        FormatError::WriterFailed { .. }
    );
    assert!(dir_entries(dir.path()).is_empty());
}

#[test]
fn writer_streams_sections_in_chunks() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let (m, sections) = sample();
    let path = dir.path().join("chunks.tpk");
    let mut w = BundleWriter::create(&path).unwrap();
    for (kind, bytes) in &sections {
        w.add_section_with(*kind, |sink| {
            for chunk in bytes.chunks(3) {
                sink.write_all(chunk)?;
            }
            Ok(())
        })
        .unwrap();
    }
    w.finish(m.clone()).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), assemble(&sections, m));
    assert_eq!(dir_entries(dir.path()), vec!["chunks.tpk".to_string()]);
}

#[test]
fn writer_replaces_an_existing_bundle() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("s.tpk"), b"old contents").unwrap();
    let (m, sections) = sample();
    let (path, _) = write_bundle(dir.path(), "s.tpk", m, &sections).unwrap();
    let bytes = std::fs::read(path).unwrap();
    parse(&bytes).unwrap().verify(&bytes).unwrap();
    assert_eq!(dir_entries(dir.path()), vec!["s.tpk".to_string()]);
}

#[test]
fn writer_into_missing_directory_errors_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no/such/dir/out.tpk");
    let e = BundleWriter::create(&path).unwrap_err();
    let msg = e.to_string();
    assert_err!(
        e,
        FormatError::Io { ref path, ref source, .. }
            if path.starts_with(dir.path().join("no/such/dir"))
            && source.kind() == std::io::ErrorKind::NotFound
    );
    assert!(msg.contains("no/such/dir"), "{msg}");
    assert!(dir_entries(dir.path()).is_empty());
}

#[test]
fn writer_rejects_a_path_without_file_name() {
    assert_err!(BundleWriter::create("/"), FormatError::Io { .. });
}

#[test]
fn public_constants() {
    assert_eq!(format::ALIGNMENT, 64);
    assert_eq!(VERSION, 5);
    assert_eq!(MAX_RANK, 8);
    assert_eq!(Header::LEN, 64);
}

// ---------------------------------------------------------------------------------------------
// Version 3: block-quantized sections (rules 26 and 36, V7).
// ---------------------------------------------------------------------------------------------

/// The sample with `w`'s delta stored as `q8` (its 15 values in one 68-byte block).
fn q8_sample() -> (Manifest, Vec<(SectionKind, Vec<u8>)>) {
    let (mut m, mut sections) = sample();
    let w_delta: Vec<f32> = (0..15).map(|i| (i as f32 - 7.0) * 0.25).collect();
    let mut bytes = Vec::new();
    Encoding::Q8.encode(&w_delta, &mut bytes);
    sections[W_DELTA as usize].1 = bytes;
    if let TensorStorage::Merged { delta: Some(d), .. } = &mut m.tensors[W].storage {
        d.encoding = Encoding::Q8;
    }
    (m, sections)
}

fn q8_valid() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let (m, sections) = q8_sample();
    let (path, _) = write_bundle(dir.path(), "q8.tpk", m, &sections).unwrap();
    std::fs::read(path).unwrap()
}

#[test]
fn q8_delta_decodes_to_codes_times_scale() {
    let bytes = q8_valid();
    let b = parse(&bytes).unwrap();
    b.verify(&bytes).unwrap();
    let mut out = Vec::new();
    b.decode_f32(&bytes, W_DELTA, &mut out).unwrap();
    // δ_i = (i − 7) / 4, max 1.75: s = 1.75 / 127, codes round((i − 7) · 127 / 7) by hand.
    let codes = [
        -127.0f32, -109.0, -91.0, -73.0, -54.0, -36.0, -18.0, 0.0, 18.0, 36.0, 54.0, 73.0, 91.0,
        109.0, 127.0,
    ];
    let s = 1.75f32 / 127.0;
    assert_eq!(out, codes.map(|q| q * s).to_vec());
}

#[test]
fn r26_q8_length_is_whole_blocks() {
    // 15 elements of q8 are one block of 68 bytes; the 30 bytes of an f16 delta are not.
    let (mut m, sections) = sample();
    if let TensorStorage::Merged { delta: Some(d), .. } = &mut m.tensors[W].storage {
        d.encoding = Encoding::Q8;
    }
    assert_err!(
        parse_err(&assemble(&sections, m)),
        FormatError::SectionLengthMismatch {
            section: W_DELTA,
            expected: 68,
            found: 30
        }
    );
}

#[test]
fn r36_version_2_has_no_quantized_sections() {
    let bytes = q8_valid();
    parse(&bytes).unwrap();
    let v2 = patch_header(&bytes, |h| h.version = 2);
    assert_err!(
        parse_err(&v2),
        FormatError::EncodingNeedsVersion {
            section: W_DELTA,
            encoding: Encoding::Q8,
            version: 2,
            since: 3
        }
    );
}

#[test]
fn v7_finite_block_scales() {
    for bad in [f32::NAN, f32::INFINITY] {
        let t = patch_section(&q8_valid(), W_DELTA, true, |d| {
            d[..4].copy_from_slice(&bad.to_le_bytes());
        });
        assert_err!(
            verify_err(&t),
            FormatError::NonFiniteBlockScale {
                section: W_DELTA,
                block: 0
            }
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Version 4: q3 / q2 encodings and per-task residuals (rules 26, 28, 29, 36, 37).
// ---------------------------------------------------------------------------------------------

// Sections the residual sample appends to the sample's.
const W_RES_B: SectionId = 10;
const B_RES_A: SectionId = 11;

/// The sample plus two residuals: task `b` adds a `q2` residual to `w` (over its scaled
/// delta), task `a` a `q3` residual to `b` (which has no delta: `θ̂ = θ_0 + r`).
fn residual_sample() -> (Manifest, Vec<(SectionKind, Vec<u8>)>) {
    let (mut m, mut sections) = sample();
    // q2: one block (15 of 64 codes); scale -0.125, codes 1, -2, -1, 0, repeated, packed by
    // hand: fields 01 10 11 00 → 0b00_11_10_01 per byte, the last byte's codes past 15 zero.
    let mut w_res = (-0.125f32).to_le_bytes().to_vec();
    w_res.extend([0b0011_1001u8; 3]);
    w_res.push(0b0011_1001 & 0b0011_1111);
    w_res.resize(20, 0);
    // q3: one block (5 of 64 codes); scale 0.25, codes 3, -4, 1, -1, 0 in a 24-bit field.
    let mut b_res = 0.25f32.to_le_bytes().to_vec();
    b_res.extend([0x63, 0x0e, 0x00]);
    b_res.resize(28, 0);
    sections.push((SectionKind::Residual, w_res));
    sections.push((SectionKind::Residual, b_res));
    m.tasks[TASK_B].tensors[W] = TaskTensor::Residual {
        mask: None,
        scale: Scale::Tensor(0.5),
        residual: Stored {
            section: W_RES_B,
            encoding: Encoding::Q2,
        },
    };
    m.tasks[TASK_A].tensors[B] = TaskTensor::Residual {
        mask: None,
        scale: Scale::None,
        residual: Stored {
            section: B_RES_A,
            encoding: Encoding::Q3,
        },
    };
    (m, sections)
}

fn residual_valid() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let (m, sections) = residual_sample();
    let (path, _) = write_bundle(dir.path(), "r.tpk", m, &sections).unwrap();
    std::fs::read(path).unwrap()
}

#[test]
fn residual_sections_decode_to_codes_times_scale() {
    let bytes = residual_valid();
    let b = parse(&bytes).unwrap();
    b.verify(&bytes).unwrap();
    assert_eq!(b.sizes().residuals, 20 + 28);
    let mut out = Vec::new();
    b.decode_f32(&bytes, W_RES_B, &mut out).unwrap();
    let codes = [1.0f32, -2.0, -1.0, 0.0];
    let want: Vec<f32> = (0..15).map(|i| codes[i % 4] * -0.125).collect();
    assert_eq!(out, want);
    b.decode_f32(&bytes, B_RES_A, &mut out).unwrap();
    assert_eq!(out, vec![0.75, -1.0, 0.25, -0.25, 0.0]);
}

#[test]
fn r26_residual_length_is_whole_blocks_of_the_tensor() {
    let (m, mut sections) = residual_sample();
    sections[W_RES_B as usize].1.truncate(19);
    assert_err!(
        parse_err(&assemble(&sections, m)),
        FormatError::SectionLengthMismatch {
            section: W_RES_B,
            expected: 20,
            found: 19
        }
    );
}

#[test]
fn r24_residual_must_be_a_residual_section() {
    let (mut m, sections) = residual_sample();
    // Task b's `w` residual points at `b`'s base: the kind is checked first (rule 24).
    if let TaskTensor::Residual { residual, .. } = &mut m.tasks[TASK_B].tensors[W] {
        residual.section = B_BASE;
    }
    assert_err!(
        parse_err(&assemble(&sections, m)),
        FormatError::SectionKindMismatch {
            section: B_BASE,
            expected: SectionKind::Residual,
            found: SectionKind::Base
        }
    );
}

#[test]
fn r28_r29_residual_modules_are_for_merged_tensors_and_carry_no_mask_without_delta() {
    let (m, sections) = residual_sample();
    let mut on_private = m.clone();
    on_private.tasks[TASK_A].tensors[HEAD] = on_private.tasks[TASK_A].tensors[B].clone();
    on_private.tasks[TASK_A].tensors[B] = merged(None, Scale::None);
    assert_err!(
        parse_err(&assemble(&sections, on_private)),
        FormatError::TaskTensorMismatch { ref tensor, expected: "private", found: "residual", .. }
            if tensor == "head"
    );
    let mut masked = m;
    if let TaskTensor::Residual { mask, .. } = &mut masked.tasks[TASK_A].tensors[B] {
        *mask = Some(MASK_A);
    }
    // Task a's `w` module gives up its mask, so that only `b` (no delta) has one.
    masked.tasks[TASK_A].tensors[W] = merged(None, Scale::Rows(ROWS_A));
    assert_err!(
        parse_err(&assemble(&sections, masked)),
        FormatError::ModuleWithoutDelta { ref tensor, .. } if tensor == "b"
    );
}

#[test]
fn r36_r37_version_3_has_no_q3_q2_residuals_or_tvq() {
    let bytes = residual_valid();
    assert_eq!(parse(&bytes).unwrap().header().version, 5);
    // q3 / q2 sections: rule 36, with the version that has them.
    assert_err!(
        parse_err(&patch_header(&bytes, |h| h.version = 3)),
        FormatError::EncodingNeedsVersion {
            encoding: Encoding::Q2,
            version: 3,
            since: 4,
            ..
        }
    );
    // The same residuals stored as f32 (which version 3 has): rule 37.
    let (mut m, mut sections) = residual_sample();
    sections[W_RES_B as usize].1 = encode(DType::F32, &[0.5; 15]);
    sections[B_RES_A as usize].1 = encode(DType::F32, &[0.5; 5]);
    for t in &mut m.tasks {
        for module in &mut t.tensors {
            if let TaskTensor::Residual { residual, .. } = module {
                residual.encoding = Encoding::F32;
            }
        }
    }
    let f32_residuals = assemble(&sections, m.clone());
    parse(&f32_residuals).unwrap();
    assert_err!(
        parse_err(&patch_header(&f32_residuals, |h| h.version = 3)),
        FormatError::FeatureNeedsVersion { version: 3, ref what } if what.contains("residual")
    );
    // Method tvq: rule 37 even without a residual.
    let (mut m, sections) = sample();
    m.merge = MergeParams::defaults(Method::Tvq, 2);
    m.merge.lambda.clear();
    for t in &mut m.tasks {
        t.lambda = None;
    }
    let tvq = assemble(&sections, m);
    parse(&tvq).unwrap();
    assert_err!(
        parse_err(&patch_header(&tvq, |h| h.version = 3)),
        FormatError::FeatureNeedsVersion { version: 3, ref what } if what == "method tvq"
    );
}

/// The residual sample with task b's `w` residual stored as `ternary` (format version 5): one
/// block of 15 of 128 codes, scale 0.25, codes 1, −1, 0, 0, 1 | −1 × 5 | 0 × 5, packed by hand
/// as base-3 digits (0 → 0, 1 → 1, −1 → 2), least significant first: 1 + 2·3 + 1·81 = 88,
/// 2·(1 + 3 + 9 + 27 + 81) = 242, 0; the other 23 code bytes zero.
fn ternary_sample() -> (Manifest, Vec<(SectionKind, Vec<u8>)>) {
    let (mut m, mut sections) = residual_sample();
    let mut w_res = 0.25f32.to_le_bytes().to_vec();
    w_res.extend([88, 242, 0]);
    w_res.resize(30, 0);
    sections[W_RES_B as usize].1 = w_res;
    if let TaskTensor::Residual { residual, .. } = &mut m.tasks[TASK_B].tensors[W] {
        residual.encoding = Encoding::Ternary;
    }
    (m, sections)
}

#[test]
fn ternary_residual_decodes_by_hand_and_needs_version_5() {
    let (m, sections) = ternary_sample();
    let bytes = assemble(&sections, m.clone());
    let b = parse(&bytes).unwrap();
    assert_eq!(b.header().version, 5);
    b.verify(&bytes).unwrap();
    let mut out = Vec::new();
    b.decode_f32(&bytes, W_RES_B, &mut out).unwrap();
    let codes = [
        1.0f32, -1.0, 0.0, 0.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0,
    ];
    assert_eq!(out, codes.map(|q| q * 0.25).to_vec());
    // Rule 36: a version-4 reader has no ternary.
    assert_err!(
        parse_err(&patch_header(&bytes, |h| h.version = 4)),
        FormatError::EncodingNeedsVersion {
            section: W_RES_B,
            encoding: Encoding::Ternary,
            version: 4,
            since: 5
        }
    );
    // Rule 26: whole blocks of 30 bytes.
    let mut short = sections.clone();
    short[W_RES_B as usize].1.truncate(29);
    assert_err!(
        parse_err(&assemble(&short, m.clone())),
        FormatError::SectionLengthMismatch {
            section: W_RES_B,
            expected: 30,
            found: 29
        }
    );
    // A byte above 242, which no encoder writes, decodes by the same digit rule:
    // 255 = 0 + 1·3 + 1·9 + 0·27 + 3·81, and ⌊255 / 81⌋ mod 3 = 0 → codes 0, 1, 1, 0, 0.
    let mut hostile = sections;
    hostile[W_RES_B as usize].1[4] = 255;
    let bytes = assemble(&hostile, m);
    let b = parse(&bytes).unwrap();
    b.verify(&bytes).unwrap();
    b.decode_f32(&bytes, W_RES_B, &mut out).unwrap();
    assert_eq!(out[..5], [0.0, 0.25, 0.25, 0.0, 0.0]);
}

#[test]
fn residuals_add_to_the_merged_reconstruction() {
    use taskpack::internals::{task_tensor, DecodeBuffers};
    let dir = tempfile::tempdir().unwrap();
    let (m, sections) = residual_sample();
    let (path, _) = write_bundle(dir.path(), "r.tpk", m, &sections).unwrap();
    let bundle = taskpack::runtime::Bundle::read(&path).unwrap();
    let (mut out, mut buffers) = (Vec::new(), DecodeBuffers::default());

    // Task b, `w`: θ_0 + (g · s) · δ + r (§5), with g = 0.8, s = 0.5, δ_i = (i − 7) / 4 (exact
    // in f16), θ_0,i = i / 2 − 3 and r_i = −0.125 · (1, −2, −1, 0)[i mod 4].
    let shape = task_tensor(&bundle, TASK_B, W, &mut out, &mut buffers).unwrap();
    assert_eq!(shape, vec![3, 5]);
    let codes = [1.0f32, -2.0, -1.0, 0.0];
    let want: Vec<f32> = (0..15)
        .map(|i| {
            let (b, d) = (i as f32 * 0.5 - 3.0, (i as f32 - 7.0) * 0.25);
            (b + (0.8f32 * 0.5) * d) + codes[i % 4] * -0.125
        })
        .collect();
    assert_eq!(out, want);

    // Task a, `b` (no delta): θ_0 + r, r = 0.25 · (3, −4, 1, −1, 0).
    task_tensor(&bundle, TASK_A, B, &mut out, &mut buffers).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let mut base = Vec::new();
    parse(&bytes)
        .unwrap()
        .decode_f32(&bytes, B_BASE, &mut base)
        .unwrap();
    let r = [0.75f32, -1.0, 0.25, -0.25, 0.0];
    let want: Vec<f32> = base.iter().zip(r).map(|(b, r)| b + r).collect();
    assert_eq!(out, want);

    // Task b, `b` has no residual: the base as it is.
    task_tensor(&bundle, TASK_B, B, &mut out, &mut buffers).unwrap();
    assert_eq!(out, base);
}
