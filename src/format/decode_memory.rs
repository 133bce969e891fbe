//! Measures how much memory decoding a hostile manifest allocates (docs/FORMAT.md §7, rule 35).
//!
//! A counting global allocator (this test binary only) keeps per-thread totals, so the figures
//! are those of the decoding thread alone, whatever other tests run in parallel. Each case is a
//! manifest made of one kind of element that encodes in very few bytes but takes many in memory
//! (empty strings, tensors without delta, empty records…), spliced by hand as postcard lays it
//! out (fields concatenated, lengths as varints). The multiple is peak bytes allocated during
//! decoding / manifest bytes.
//!
//! `cargo test -p taskpack --lib decode_memory -- --nocapture` prints the table; set
//! `TASKPACK_DECODE_MIB=64` to measure at the manifest cap.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use crate::format::layout::{MANIFEST_DECODE_FACTOR, MAX_MANIFEST_LEN};
use crate::format::manifest::{CompileReport, InputRecord, Provenance};
use crate::format::{parse, Header, MergeParams, Method, ScaleMode};

struct Counting;

thread_local! {
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

fn add(n: usize) {
    let _ = LIVE.try_with(|live| {
        let v = live.get().saturating_add(n as i64);
        live.set(v);
        let _ = PEAK.try_with(|p| p.set(p.get().max(v)));
    });
}

fn sub(n: usize) {
    let _ = LIVE.try_with(|live| live.set(live.get().saturating_sub(n as i64)));
}

// SAFETY: every call is forwarded unchanged to `System`; the counters are const-initialized
// thread-locals without destructors, which neither allocate nor re-enter the allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout (GlobalAlloc contract).
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            add(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            add(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (GlobalAlloc contract).
        unsafe { System.dealloc(ptr, layout) };
        sub(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged (GlobalAlloc contract).
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            // Counted as if old and new coexisted for a moment (a copying realloc): the
            // figure is an upper bound.
            add(new_size);
            sub(layout.size());
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Peak bytes allocated (net of frees) on this thread while `f` runs.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    let out = f();
    let peak = PEAK.with(Cell::get);
    (out, peak.saturating_sub(start).max(0) as u64)
}

fn enc<T: serde::Serialize + ?Sized>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).unwrap_or_default()
}

/// The eight top-level fields of an empty manifest, encoded one by one.
fn fields() -> [Vec<u8>; 8] {
    let empty: Vec<u8> = Vec::new();
    [
        enc(&empty),
        enc(&empty),
        enc(&empty),
        enc(&empty),
        enc(&None::<u32>),
        enc(&MergeParams::defaults(Method::Tall, 0)),
        enc(&Provenance {
            compiler: "t".into(),
            inputs: vec![],
        }),
        enc(&CompileReport::default()),
    ]
}

/// `count` copies of `element`, length-prefixed.
fn seq(count: usize, element: &[u8]) -> Vec<u8> {
    let mut out = enc(&(count as u64));
    out.reserve(count * element.len());
    for _ in 0..count {
        out.extend_from_slice(element);
    }
    out
}

/// The head of a task entry up to its labels: name "a", graph 0, g 1, no λ, no scale mode.
fn task_head() -> Vec<u8> {
    enc(&("a", 0u32, 1.0f32, None::<f32>, ScaleMode::None))
}

/// A hostile manifest of about `len` bytes made of one kind of element; `None` for the case
/// that claims elements it does not have.
fn case(name: &str, len: usize) -> Vec<u8> {
    let mut f = fields();
    match name {
        "empty labels" => {
            f[3] = [enc(&1u64), task_head(), seq(len, &[0]), enc(&0u64)].concat();
        }
        "task tensors without delta" => {
            // Merged { mask: None, scale: None }.
            let t = [
                enc(&1u64),
                task_head(),
                enc(&0u64),
                seq(len / 3, &[0, 0, 0]),
            ];
            f[3] = t.concat();
        }
        "tensor entries with empty names" => {
            // name "", shape [], dtype F32, storage Private.
            f[1] = seq(len / 4, &[0, 0, 0, 1]);
        }
        "one shape with many dimensions" => {
            f[1] = [enc(&1u64), enc(&0u64), seq(len, &[0]), vec![0, 1]].concat();
        }
        "graph entries with empty hashes" => {
            f[0] = seq(len / 2, &[0, 0]);
        }
        "empty sections" => {
            f[2] = seq(len / 4, &[0, 0, 0, 0]);
        }
        "empty input records" => {
            let record = enc(&InputRecord {
                role: String::new(),
                file: String::new(),
                format: String::new(),
                sha256: String::new(),
                bytes: 0,
            });
            f[6] = [enc("t"), seq(len / record.len(), &record)].concat();
        }
        "empty private reasons" => {
            // inputs_bytes 0, tasks [], private: empty strings, peak 0, seconds 0.
            f[7] = [vec![0, 0], seq(len, &[0]), vec![0], vec![0; 8]].concat();
        }
        "lambda values" => {
            f[5] = [enc(&Method::Tall), enc(&1.0f32), seq(len / 4, &[0; 4])].concat();
            f[5].extend_from_slice(&enc(&(1.0f32, 1.0f32, 2u32, 0u64))[..]);
            f[5].extend_from_slice(&[0, 0]);
        }
        "huge length prefix" => {
            f[3] = [enc(&1u64), task_head(), enc(&(1u64 << 40))].concat();
        }
        _ => {}
    }
    f.concat()
}

const CASES: [&str; 10] = [
    "empty labels",
    "task tensors without delta",
    "tensor entries with empty names",
    "one shape with many dimensions",
    "graph entries with empty hashes",
    "empty sections",
    "empty input records",
    "empty private reasons",
    "lambda values",
    "huge length prefix",
];

fn with_header(manifest: &[u8]) -> Vec<u8> {
    let checksum = xxhash_rust::xxh3::xxh3_64(manifest);
    let header = Header::new(0, manifest.len() as u64, checksum).map(|h| h.to_bytes());
    [header.unwrap_or([0; 64]).as_slice(), manifest].concat()
}

#[test]
fn hostile_manifests_decode_within_the_budget() {
    let mib: usize = std::env::var("TASKPACK_DECODE_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let len = (mib << 20).min(MAX_MANIFEST_LEN as usize - 64);
    let mut worst = 0f64;
    println!(
        "{:<34} {:>12} {:>14} {:>9}  outcome",
        "case", "bytes", "peak alloc", "multiple"
    );
    for name in CASES {
        let manifest = case(name, len);
        let bundle = with_header(&manifest);
        let (result, peak) = peak_during(|| parse(&bundle).map(|_| ()));
        let multiple = peak as f64 / manifest.len() as f64;
        worst = worst.max(multiple);
        let outcome = match &result {
            Ok(()) => "parsed".to_string(),
            Err(e) => format!("{e}"),
        };
        println!(
            "{name:<34} {:>12} {peak:>14} {multiple:>8.2}x  {outcome}",
            manifest.len()
        );
        // Every case is invalid one way or another; none gets through.
        assert!(result.is_err(), "{name}: a hostile manifest parsed");
    }
    // Decoding takes at most FACTOR + 1 bytes per manifest byte (rule 35 + strings); validating
    // the section table adds working tables (tiled ranges, claims, section metadata) of under
    // 60 bytes per section, and a section entry takes at least 4 manifest bytes: 15 more.
    let bound = (MANIFEST_DECODE_FACTOR + 1 + 15) as f64;
    println!("worst multiple: {worst:.2}x (bound: {bound}x)");
    assert!(worst <= bound, "parsing allocated {worst:.2}x the manifest");
}

/// The same empty labels decoded as the manifest types were before rule 35: serde's own
/// `Vec<String>` (1 MiB pre-allocation, then doubling). Prints the multiple for comparison; the
/// only assertion is that it is well above the budget (what rule 35 fixed).
#[test]
fn serde_default_vec_multiple_before_the_budget() {
    let mib: usize = std::env::var("TASKPACK_DECODE_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let len = mib << 20;
    let bytes = seq(len, &[0]);
    let (decoded, peak) =
        peak_during(|| postcard::from_bytes::<Vec<String>>(&bytes).map(|v| v.len()));
    assert_eq!(decoded.ok(), Some(len));
    let multiple = peak as f64 / bytes.len() as f64;
    println!(
        "before (serde Vec<String>, {} bytes of empty labels): peak {peak} = {multiple:.2}x",
        bytes.len()
    );
    assert!(multiple > (MANIFEST_DECODE_FACTOR + 1) as f64);
}
