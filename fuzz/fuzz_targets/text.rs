//! The text path: `TextClassifier` on the text bundle (`models/text`).
//!
//! Input: one mode byte, then
//! - mode bit 0 clear: texts, split at `\n` (at most 8, lossy UTF-8), classified by task
//!   `mode >> 1` of the text bundle;
//! - mode bit 0 set: a `tokenizer.json` that replaces the text bundle's, then fixed texts
//!   classified by task `mode >> 1` (loading, truncation, padding and the ids it produces).
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use taskpack::runtime::{Bundle, Engine, EngineOptions, TextClassifier};
use taskpack_fuzz::{rebuild, Part, TEXT_BUNDLE};

fn classify(bundle: Vec<u8>, task: u8, texts: &[&str]) {
    let Ok(bundle) = Bundle::from_bytes(bundle) else {
        return;
    };
    let Ok(engine) = Engine::new(Arc::new(bundle), EngineOptions::default()) else {
        return;
    };
    let Ok(classifier) = TextClassifier::new(Arc::new(engine)) else {
        return;
    };
    check(&classifier, task, texts);
}

/// The text bundle's classifier, built once: texts alone do not change it.
fn shared() -> &'static TextClassifier {
    static CLASSIFIER: OnceLock<TextClassifier> = OnceLock::new();
    CLASSIFIER.get_or_init(|| {
        let bundle = Bundle::from_bytes(TEXT_BUNDLE.to_vec()).expect("fixture bundle");
        let engine = Engine::new(Arc::new(bundle), EngineOptions::default()).expect("engine");
        TextClassifier::new(Arc::new(engine)).expect("classifier")
    })
}

fn check(classifier: &TextClassifier, task: u8, texts: &[&str]) {
    let n = classifier.engine().task_count();
    if n == 0 {
        return;
    }
    let task = usize::from(task) % n;
    if let Ok(predictions) = classifier.classify(task, texts) {
        assert_eq!(predictions.len(), texts.len());
        for p in &predictions {
            assert!(p.class < p.logits.len(), "{p:?}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let text = String::from_utf8_lossy(rest);
        let texts: Vec<&str> = text.split('\n').take(8).collect();
        check(shared(), mode >> 1, &texts);
    } else {
        let Some((bundle, _)) = rebuild(TEXT_BUNDLE, Part::Tokenizer, rest) else {
            return;
        };
        classify(
            bundle,
            mode >> 1,
            &[
                "I love this pizza!",
                "",
                "the game was terrible, wasn't it? ünïcödé 🍕",
            ],
        );
    }
});
