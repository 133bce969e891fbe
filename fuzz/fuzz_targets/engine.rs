//! `Engine::new` and one run on a fuzzed bundle, graph included.
//!
//! Input: one mode byte, then
//! - mode bit 0 clear: a whole bundle, `repair`ed (checksums recomputed) — mutations of the
//!   manifest, the weights and the stored graphs in place; the task run is `mode >> 1`;
//! - mode bit 0 set: an ONNX graph that replaces graph `mode >> 2` of the text bundle (bit 1
//!   clear) or the demo bundle (bit 1 set), laid out again with valid checksums — graph
//!   mutations of any length; the task run is the first one of that graph.
//!
//! Each input of the task gets a small zero tensor of its declared type and shape (symbolic
//! dimensions set to 1, at most `MAX_INPUT_ELEMENTS` elements: a huge declared input is the
//! caller's allocation, not the engine's bug).
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use taskpack::runtime::{Bundle, Engine, EngineOptions, IntoTValue, TVec};
use taskpack_fuzz::{rebuild, repair, small_input, Part, DEMO_BUNDLE, TEXT_BUNDLE};

fn run(bytes: Vec<u8>, task: impl FnOnce(&Engine) -> Option<usize>) {
    let Ok(bundle) = Bundle::from_bytes(bytes) else {
        return;
    };
    let Ok(engine) = Engine::new(Arc::new(bundle), EngineOptions::with_cache_bytes(1 << 20)) else {
        return;
    };
    let Some(task) = task(&engine) else {
        return;
    };
    let Ok(facts) = engine.input_facts(task) else {
        return;
    };
    let mut inputs = TVec::new();
    for f in &facts {
        match small_input(f.dtype, &f.shape) {
            Some(t) => inputs.push(t.into_tvalue()),
            None => return,
        }
    }
    let _ = engine.output_facts(task);
    let _ = engine.run(task, inputs);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let Some(bytes) = repair(rest) else {
            return;
        };
        run(bytes, |e| {
            let n = e.task_count();
            (n > 0).then(|| usize::from(mode >> 1) % n)
        });
    } else {
        let base = if mode & 2 == 0 {
            TEXT_BUNDLE
        } else {
            DEMO_BUNDLE
        };
        let Some((bytes, graph)) = rebuild(base, Part::Graph(usize::from(mode >> 2)), rest) else {
            return;
        };
        run(bytes, |e| {
            e.bundle()
                .manifest()
                .tasks
                .iter()
                .position(|t| t.graph as usize == graph)
        });
    }
});
