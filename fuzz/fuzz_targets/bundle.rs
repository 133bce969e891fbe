//! The bundle reader: `format::parse`, `ParsedBundle::verify` / `verify_section` / `decode_f32`,
//! `runtime::Bundle::from_bytes` + `verify`, and the reconstruction of every task tensor, on the
//! bytes as given and again after `repair` (checksums recomputed, so that mutations reach the
//! manifest rules and the bulk checks).
#![no_main]

use libfuzzer_sys::fuzz_target;
use taskpack::format::{parse, MAX_ELEMENTS};
use taskpack::internals::{task_tensor, DecodeBuffers};
use taskpack::runtime::Bundle;

/// Reconstruct tensors only up to this many elements in all (the reader accepts tensors of up
/// to 2^40 elements; a shape is bounded by the sections' lengths, so this only bounds time).
const MAX_RECONSTRUCTED: u64 = 1 << 22;

fn check(bytes: &[u8]) {
    if let Ok(parsed) = parse(bytes) {
        let verified = parsed.verify(bytes);
        let _ = parsed.sizes();
        let mut out = Vec::new();
        for id in 0..parsed.manifest().sections.len() as u32 {
            let one = parsed.verify_section(bytes, id);
            // verify() is exactly "header unchanged + every section verifies".
            if verified.is_ok() {
                assert!(one.is_ok(), "verify passed but section {id} fails: {one:?}");
            }
            let _ = parsed.section(bytes, id);
            let _ = parsed.decode_f32(bytes, id, &mut out);
        }
    }
    let Ok(bundle) = Bundle::from_bytes(bytes.to_vec()) else {
        return;
    };
    let _ = bundle.verify();
    let m = bundle.manifest();
    let mut budget = MAX_RECONSTRUCTED;
    let mut out = Vec::new();
    let mut scratch = DecodeBuffers::default();
    for task in 0..m.tasks.len() {
        for (tensor, entry) in m.tensors.iter().enumerate() {
            let numel = entry
                .shape
                .iter()
                .try_fold(1u64, |n, &d| n.checked_mul(d))
                .unwrap_or(MAX_ELEMENTS);
            let Some(rest) = budget.checked_sub(numel) else {
                return;
            };
            budget = rest;
            if let Ok(shape) = task_tensor(&bundle, task, tensor, &mut out, &mut scratch) {
                let n = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
                assert_eq!(
                    n,
                    Some(out.len() as u64),
                    "shape {shape:?} vs {} values",
                    out.len()
                );
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    if let Some(repaired) = taskpack_fuzz::repair(data) {
        check(&repaired);
    }
});
