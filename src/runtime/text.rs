//! Text in, label out: run a task on strings instead of token ids (feature `text`).
//!
//! An app wants "this review → positive, 0.97", not tensors of token ids. A bundle may carry
//! the Hugging Face `tokenizer.json` its tasks were trained with (`Manifest::tokenizer`) and
//! per-task label names (`TaskEntry::labels`); a [`TextClassifier`] puts the pieces together:
//! it loads the tokenizer once (with the `tokenizers` crate, built pure Rust), turns a batch of
//! texts into the task graph's token inputs, runs the task with the [`Engine`] and applies a
//! softmax to its logits.
//!
//! How texts become inputs:
//! - Graph inputs are matched **by name**: `input_ids` (the token ids), `attention_mask` (1 for a
//!   token, 0 for padding) and `token_type_ids` (the tokenizer's type ids: zeros for a single
//!   text). Each must be `[batch, sequence]`, `i64` or `i32`; any other input is an
//!   [`Error::UnfillableInput`].
//! - Each text is encoded with its special tokens (e.g. `[CLS] … [SEP]`) and the tokenizer's own
//!   truncation. When the graph fixes the sequence length `L` (in the ONNX file, or by
//!   [`EngineOptions::symbol_values`](super::EngineOptions::symbol_values)), texts are
//!   truncated to at most `L` tokens, special tokens included, and padded to `L`; otherwise the
//!   batch is padded to its longest text. Padding uses the tokenizer's `padding` settings for the
//!   pad id, type id and side (its length strategy is replaced by the above), or, without them,
//!   the id of `[PAD]` (or `<pad>`, else 0) on the right.
//! - A graph whose batch dimension is fixed to `B` is run on chunks of `B` texts (the last chunk
//!   filled up with copies of its last text, whose results are dropped).
//! - The task's first output must be `[batch, classes]` logits; the prediction is its argmax,
//!   with the softmax probability of that class.
//!
//! Tokenization runs on the calling thread (no thread pool is started).
//!
//! Hostile tokenizers and texts: a pad id that names no token of the vocabulary is refused by
//! [`TextClassifier::new`]; token ids outside the graph's vocabulary (its embedding table) are
//! refused by [`Engine::run`] ([`Error::IndexOutOfRange`]); the token inputs are sized against
//! [`EngineOptions::max_input_bytes`](super::EngineOptions::max_input_bytes) before they are
//! allocated; a panic inside the `tokenizers` crate is [`Error::EnginePanic`].

use std::sync::{Arc, Mutex, PoisonError};

use tokenizers::{
    Encoding, PaddingDirection, PostProcessor, Tokenizer, TruncationParams, TruncationStrategy,
};
use tract_onnx::prelude::{DatumType, IntoTValue, TValue, TVec, Tensor};

use crate::runtime::guard::catch_panic;
use crate::runtime::{argmax, Engine, Error, IoInfo};

/// What a task predicts for one text.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Index of the most probable class (the argmax of the logits).
    pub class: usize,
    /// Name of that class, if the task has label names.
    pub label: Option<String>,
    /// Softmax probability of that class, in `[0, 1]`.
    pub probability: f32,
    /// The task's logits for the text, one per class.
    pub logits: Vec<f32>,
}

/// Where the values of one graph input come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Ids,
    Mask,
    TypeIds,
}

/// How a task's graph takes text: one entry per data input, in graph order.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TextInputs {
    inputs: Vec<(Source, DatumType)>,
    /// A fixed batch size, if the graph has one.
    batch: Option<usize>,
    /// A fixed sequence length, if the graph has one.
    sequence: Option<usize>,
}

/// How encodings are padded.
#[derive(Debug, Clone, Copy)]
struct Pad {
    id: u32,
    type_id: u32,
    left: bool,
}

/// Classifies texts with the tasks of one bundle: its tokenizer, loaded once, and an [`Engine`].
/// `Send + Sync`, like the engine.
pub struct TextClassifier {
    engine: Arc<Engine>,
    /// The bundle's tokenizer without its padding (done here) and with a zero stride.
    tokenizer: Arc<Tokenizer>,
    pad: Pad,
    /// Special tokens the tokenizer adds around one text.
    special: usize,
    /// Copies of the tokenizer that truncate to a graph's fixed sequence length, by length.
    truncating: Mutex<Vec<(usize, Arc<Tokenizer>)>>,
}

impl std::fmt::Debug for TextClassifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextClassifier")
            .field("engine", &self.engine)
            .field("special_tokens", &self.special)
            .finish_non_exhaustive()
    }
}

impl TextClassifier {
    /// Loads the tokenizer of `engine`'s bundle. [`Error::NoTokenizer`] if the bundle has none,
    /// [`Error::TokenizerParse`] if it does not load (or truncates to fewer tokens than it adds
    /// itself, or pads with an id that is no token of its vocabulary); a checksum mismatch of
    /// its section is an [`Error::Format`]; a panic of the `tokenizers` crate is
    /// [`Error::EnginePanic`].
    pub fn new(engine: Arc<Engine>) -> Result<TextClassifier, Error> {
        // The tokenizer is built here and dropped if this panics: nothing shared to break.
        catch_panic(
            || "load the bundle's tokenizer".into(),
            || Self::load(engine),
        )
    }

    fn load(engine: Arc<Engine>) -> Result<TextClassifier, Error> {
        let bundle = engine.bundle();
        let section = bundle.manifest().tokenizer.ok_or(Error::NoTokenizer)?;
        let bytes = bundle.section(section)?;
        let mut tokenizer =
            parse_tokenizer(bytes).map_err(|message| Error::TokenizerParse { message })?;
        let pad = match tokenizer.get_padding() {
            Some(p) => Pad {
                id: p.pad_id,
                type_id: p.pad_type_id,
                left: matches!(p.direction, PaddingDirection::Left),
            },
            None => Pad {
                id: ["[PAD]", "<pad>"]
                    .iter()
                    .find_map(|t| tokenizer.token_to_id(t))
                    .unwrap_or(0),
                type_id: 0,
                left: false,
            },
        };
        if tokenizer.id_to_token(pad.id).is_none() {
            return Err(Error::TokenizerParse {
                message: format!(
                    "its pad id {} is not a token of its vocabulary ({} tokens)",
                    pad.id,
                    tokenizer.get_vocab_size(true)
                ),
            });
        }
        tokenizer.with_padding(None);
        let special = tokenizer
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        if let Some(truncation) = tokenizer.get_truncation().cloned() {
            // The tokenizers crate subtracts the special tokens from `max_length` unchecked, and
            // asserts that the stride (overlap of overflowing windows, unused here) is below it.
            if truncation.max_length < special {
                return Err(Error::TokenizerParse {
                    message: format!(
                        "its truncation to {} tokens leaves no room for the {special} special \
                         tokens it adds",
                        truncation.max_length
                    ),
                });
            }
            tokenizer
                .with_truncation(Some(TruncationParams {
                    stride: 0,
                    ..truncation
                }))
                .map_err(|e| Error::TokenizerParse {
                    message: e.to_string(),
                })?;
        }
        Ok(TextClassifier {
            engine,
            tokenizer: Arc::new(tokenizer),
            pad,
            special,
            truncating: Mutex::new(Vec::new()),
        })
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Label names of task `task` in logit order; empty if the bundle has none for it.
    pub fn labels(&self, task: usize) -> Result<&[String], Error> {
        let tasks = &self.engine.bundle().manifest().tasks;
        tasks
            .get(task)
            .map(|t| t.labels.as_slice())
            .ok_or(Error::OutOfRange {
                what: "task",
                index: task,
                count: tasks.len(),
            })
    }

    /// Classifies `texts` with task `task`: one [`Prediction`] per text, in order. Errors:
    /// [`Error::UnfillableInput`] for a graph input that is not one of the token inputs (see the
    /// module docs), [`Error::Tokenize`] for a text the tokenizer fails on,
    /// [`Error::LabelCount`] if the task's label names do not match its number of classes,
    /// [`Error::NotAClassifier`] if its first output is not `[batch, classes]` logits.
    pub fn classify<S: AsRef<str>>(
        &self,
        task: usize,
        texts: &[S],
    ) -> Result<Vec<Prediction>, Error> {
        let name = self.task_name(task)?;
        let text_inputs = text_inputs(name, &self.engine.input_facts(task)?)?;
        let labels = self.labels(task)?;
        if let Some(&[_, Some(classes)]) = self
            .engine
            .output_facts(task)?
            .first()
            .map(|o| o.shape.as_slice())
        {
            check_labels(name, labels, classes)?;
        }
        let mut predictions = Vec::with_capacity(texts.len());
        let chunk = text_inputs.batch.unwrap_or(texts.len()).max(1);
        for (n, texts) in texts.chunks(chunk).enumerate() {
            let mut encodings = self.encode(task, &text_inputs, texts, n * chunk)?;
            let rows = encodings.len();
            if let Some(last) = encodings.last().cloned() {
                encodings.resize(chunk.max(rows), last);
            }
            let inputs = self.tensors(task, &text_inputs, &encodings)?;
            let outputs = self.engine.run(task, inputs)?;
            let logits = logits(name, outputs.first(), encodings.len())?;
            for row in logits.iter().take(rows) {
                check_labels(name, labels, row.len())?;
                predictions.push(predict(row, labels));
            }
        }
        Ok(predictions)
    }

    /// Classifies one text with task `task` (see [`TextClassifier::classify`]).
    pub fn classify_one(&self, task: usize, text: &str) -> Result<Prediction, Error> {
        let name = self.task_name(task)?;
        self.classify(task, &[text])?
            .pop()
            .ok_or_else(|| Error::NotAClassifier {
                task: name.to_string(),
                reason: "no prediction for the text".into(),
            })
    }

    /// The token inputs of task `task`'s graph for `texts`, in the order [`Engine::run`] takes
    /// them (e.g. to run a task whose output is not logits, such as an embedding). The texts are
    /// one batch: if the graph fixes the batch size, their number must be that size.
    pub fn inputs<S: AsRef<str>>(&self, task: usize, texts: &[S]) -> Result<TVec<TValue>, Error> {
        let name = self.task_name(task)?;
        let text_inputs = text_inputs(name, &self.engine.input_facts(task)?)?;
        if let Some(batch) = text_inputs.batch.filter(|&b| b != texts.len()) {
            return Err(Error::InputMismatch {
                task: name.to_string(),
                name: "input_ids".into(),
                expected: format!("a batch of {batch} texts"),
                got: format!("{} texts", texts.len()),
            });
        }
        let encodings = self.encode(task, &text_inputs, texts, 0)?;
        self.tensors(task, &text_inputs, &encodings)
    }

    fn task_name(&self, task: usize) -> Result<&str, Error> {
        self.engine.task_name(task).ok_or(Error::OutOfRange {
            what: "task",
            index: task,
            count: self.engine.task_count(),
        })
    }

    /// Encodes `texts`, truncated to the graph's fixed sequence length if it has one; errors
    /// number the texts from `first`.
    fn encode<S: AsRef<str>>(
        &self,
        task: usize,
        text_inputs: &TextInputs,
        texts: &[S],
        first: usize,
    ) -> Result<Vec<Encoding>, Error> {
        let tokenizer = self.tokenizer_for(task, text_inputs.sequence)?;
        texts
            .iter()
            .enumerate()
            .map(|(index, text)| {
                // The tokenizer is only read; the encoding is the call's own.
                catch_panic(
                    || format!("tokenize text {}", first + index),
                    || {
                        tokenizer
                            .encode(text.as_ref(), true)
                            .map_err(|e| Error::Tokenize {
                                index: first + index,
                                message: e.to_string(),
                            })
                    },
                )
            })
            .collect()
    }

    /// The tokenizer that truncates to at most `sequence` tokens (the bundle's own if it already
    /// does, else a copy made once per length).
    fn tokenizer_for(&self, task: usize, sequence: Option<usize>) -> Result<Arc<Tokenizer>, Error> {
        let Some(length) = sequence else {
            return Ok(Arc::clone(&self.tokenizer));
        };
        let own = self.tokenizer.get_truncation();
        if own.is_some_and(|t| t.max_length <= length) {
            return Ok(Arc::clone(&self.tokenizer));
        }
        let mut cache = self
            .truncating
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some((_, t)) = cache.iter().find(|(l, _)| *l == length) {
            return Ok(Arc::clone(t));
        }
        if length < self.special {
            return Err(Error::UnfillableInput {
                task: self.task_name(task)?.to_string(),
                name: "input_ids".into(),
                reason: format!(
                    "its sequence length {length} leaves no room for the {} special tokens the \
                     tokenizer adds",
                    self.special
                ),
            });
        }
        let params = TruncationParams {
            max_length: length,
            stride: 0,
            ..own.cloned().unwrap_or(TruncationParams {
                strategy: TruncationStrategy::LongestFirst,
                ..TruncationParams::default()
            })
        };
        // The copy is built here, and cached only once made: a panic (caught inside the lock,
        // which it therefore does not poison) leaves the cache as it was.
        let tokenizer = catch_panic(
            || format!("truncate the tokenizer to {length} tokens"),
            || {
                let mut tokenizer = Tokenizer::clone(&self.tokenizer);
                tokenizer
                    .with_truncation(Some(params))
                    .map_err(|e| Error::TokenizerParse {
                        message: e.to_string(),
                    })?;
                Ok(tokenizer)
            },
        )?;
        let tokenizer = Arc::new(tokenizer);
        cache.push((length, Arc::clone(&tokenizer)));
        Ok(tokenizer)
    }

    /// The graph inputs for `encodings`, padded to the fixed sequence length or the longest;
    /// sized against the engine's `max_input_bytes` before they are allocated.
    fn tensors(
        &self,
        task: usize,
        text_inputs: &TextInputs,
        encodings: &[Encoding],
    ) -> Result<TVec<TValue>, Error> {
        let longest = encodings.iter().map(Encoding::len).max().unwrap_or(0);
        let width = text_inputs.sequence.unwrap_or(longest.max(1));
        if let Some((index, e)) = encodings.iter().enumerate().find(|(_, e)| e.len() > width) {
            return Err(Error::Tokenize {
                index,
                message: format!("{} tokens, the graph takes {width}", e.len()),
            });
        }
        // What `Engine::run` counts: rows × width values per input, of the input's size.
        let limit = self.engine.options().max_input_bytes;
        let value_bytes: usize = text_inputs.inputs.iter().map(|(_, dt)| dt.size_of()).sum();
        let bytes = crate::format::layout::tensor_bytes(value_bytes, &[encodings.len(), width]);
        if bytes.is_none_or(|b| b > limit) {
            return Err(Error::InputTooLarge {
                task: self.task_name(task)?.to_string(),
                bytes: bytes.unwrap_or(usize::MAX),
                limit,
            });
        }
        text_inputs
            .inputs
            .iter()
            .map(|&(source, dtype)| {
                let (pad, values): (u32, fn(&Encoding) -> &[u32]) = match source {
                    Source::Ids => (self.pad.id, Encoding::get_ids),
                    Source::Mask => (0, Encoding::get_attention_mask),
                    Source::TypeIds => (self.pad.type_id, Encoding::get_type_ids),
                };
                let mut flat = vec![pad; encodings.len() * width];
                for (row, e) in flat.chunks_mut(width.max(1)).zip(encodings) {
                    let v = values(e);
                    let start = if self.pad.left { width - v.len() } else { 0 };
                    if let Some(dst) = row.get_mut(start..start + v.len()) {
                        dst.copy_from_slice(v);
                    }
                }
                tensor(dtype, encodings.len(), width, &flat)
            })
            .collect()
    }
}

/// A `[rows, width]` tensor of `dtype` (i64 or i32) holding `values`.
fn tensor(dtype: DatumType, rows: usize, width: usize, values: &[u32]) -> Result<TValue, Error> {
    let shape = [rows, width];
    let made = match dtype {
        DatumType::I32 => {
            let values = values
                .iter()
                .enumerate()
                .map(|(i, &v)| {
                    i32::try_from(v).map_err(|_| Error::Tokenize {
                        index: i / width.max(1),
                        message: format!("token id {v} does not fit the graph's I32 input"),
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            Tensor::from_shape(&shape, &values)
        }
        _ => {
            let values: Vec<i64> = values.iter().map(|&v| i64::from(v)).collect();
            Tensor::from_shape(&shape, &values)
        }
    };
    made.map(IntoTValue::into_tvalue).map_err(|e| Error::Tract {
        action: "build the token inputs".into(),
        message: format!("{e:#}"),
    })
}

/// How the graph with data inputs `facts` takes text (task `task` for messages).
fn text_inputs(task: &str, facts: &[IoInfo]) -> Result<TextInputs, Error> {
    let unfillable = |name: &str, reason: String| Error::UnfillableInput {
        task: task.to_string(),
        name: name.to_string(),
        reason,
    };
    let mut text_inputs = TextInputs {
        inputs: Vec::with_capacity(facts.len()),
        batch: None,
        sequence: None,
    };
    for fact in facts {
        let source = match fact.name.as_str() {
            "input_ids" => Source::Ids,
            "attention_mask" => Source::Mask,
            "token_type_ids" => Source::TypeIds,
            _ => {
                return Err(unfillable(
                    &fact.name,
                    "not a token input (input_ids, attention_mask or token_type_ids)".into(),
                ))
            }
        };
        if !matches!(fact.dtype, DatumType::I64 | DatumType::I32) {
            return Err(unfillable(
                &fact.name,
                format!("its element type is {:?}, not I64 or I32", fact.dtype),
            ));
        }
        let &[batch, sequence] = fact.shape.as_slice() else {
            return Err(unfillable(
                &fact.name,
                format!("rank {}, not [batch, sequence]", fact.shape.len()),
            ));
        };
        for (dim, fixed, what) in [
            (batch, &mut text_inputs.batch, "batch size"),
            (sequence, &mut text_inputs.sequence, "sequence length"),
        ] {
            match (dim, *fixed) {
                (Some(0), _) => return Err(unfillable(&fact.name, format!("its {what} is 0"))),
                (Some(d), Some(f)) if d != f => {
                    return Err(unfillable(
                        &fact.name,
                        format!("its {what} is {d}, another token input's is {f}"),
                    ))
                }
                (Some(d), _) => *fixed = Some(d),
                (None, _) => {}
            }
        }
        text_inputs.inputs.push((source, fact.dtype));
    }
    if !text_inputs.inputs.iter().any(|(s, _)| *s == Source::Ids) {
        return Err(unfillable(
            "input_ids",
            "the graph has no input of that name".into(),
        ));
    }
    Ok(text_inputs)
}

/// [`Error::LabelCount`] unless `labels` is empty or has one name per class.
fn check_labels(task: &str, labels: &[String], classes: usize) -> Result<(), Error> {
    if labels.is_empty() || labels.len() == classes {
        Ok(())
    } else {
        Err(Error::LabelCount {
            task: task.to_string(),
            labels: labels.len(),
            classes,
        })
    }
}

/// The rows of the first output: `rows` rows of logits, as `f32`.
fn logits(task: &str, output: Option<&TValue>, rows: usize) -> Result<Vec<Vec<f32>>, Error> {
    let not = |reason: String| Error::NotAClassifier {
        task: task.to_string(),
        reason,
    };
    let output = output.ok_or_else(|| not("the graph has no output".into()))?;
    let &[got_rows, classes] = output.shape() else {
        return Err(not(format!(
            "its first output has shape {:?}, not [batch, classes]",
            output.shape()
        )));
    };
    if got_rows != rows || classes == 0 {
        return Err(not(format!(
            "its first output has shape {:?} for {rows} texts",
            output.shape()
        )));
    }
    let values = output.cast_to::<f32>().map_err(|_| {
        not(format!(
            "its first output is {:?}, not numbers",
            output.datum_type()
        ))
    })?;
    let values: Vec<f32> = values
        .to_plain_array_view::<f32>()
        .map_err(|e| not(format!("{e:#}")))?
        .iter()
        .copied()
        .collect();
    Ok(values.chunks(classes).map(<[f32]>::to_vec).collect())
}

/// A Hugging Face `tokenizer.json`, loaded by the `tokenizers` crate after a syntax check of the
/// JSON: that crate panics on some syntax errors inside a component (its decoder helper
/// `expect`s, found by the `text` fuzz target), so malformed JSON never reaches it. The
/// compiler refuses a `--tokenizer` with the same function. (A panic it still has is caught by
/// the callers' panic guard.)
pub(crate) fn parse_tokenizer(bytes: &[u8]) -> Result<Tokenizer, String> {
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
        .map_err(|e| format!("it is not JSON: {e}"))?;
    Tokenizer::from_bytes(bytes).map_err(|e| e.to_string())
}

/// The argmax of `logits` ([`argmax`]: the first of equal maxima; class 0 when every logit is
/// NaN), its name and its softmax probability.
fn predict(logits: &[f32], labels: &[String]) -> Prediction {
    let class = argmax(logits).unwrap_or(0);
    let max = logits.get(class).copied().unwrap_or(f32::NAN);
    let sum: f64 = logits
        .iter()
        .map(|&v| (f64::from(v) - f64::from(max)).exp())
        .sum();
    Prediction {
        class,
        label: labels.get(class).cloned(),
        probability: (1.0 / sum) as f32,
        logits: logits.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(name: &str, dtype: DatumType, shape: &[Option<usize>]) -> IoInfo {
        IoInfo {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    #[test]
    fn text_inputs_map_inputs_by_name_in_graph_order() {
        let facts = [
            io("token_type_ids", DatumType::I32, &[None, Some(8)]),
            io("input_ids", DatumType::I64, &[None, None]),
            io("attention_mask", DatumType::I64, &[None, Some(8)]),
        ];
        let text_inputs = text_inputs("t", &facts).unwrap();
        assert_eq!(
            text_inputs.inputs,
            [
                (Source::TypeIds, DatumType::I32),
                (Source::Ids, DatumType::I64),
                (Source::Mask, DatumType::I64)
            ]
        );
        assert_eq!((text_inputs.batch, text_inputs.sequence), (None, Some(8)));
    }

    #[test]
    fn text_inputs_refuse_inputs_they_cannot_fill() {
        let cases = [
            vec![io(
                "image",
                DatumType::F32,
                &[None, Some(1), Some(28), Some(28)],
            )],
            vec![io("input_ids", DatumType::F32, &[None, None])],
            vec![io("input_ids", DatumType::I64, &[None])],
            vec![io("input_ids", DatumType::I64, &[None, Some(0)])],
            vec![
                io("input_ids", DatumType::I64, &[None, Some(8)]),
                io("attention_mask", DatumType::I64, &[None, Some(16)]),
            ],
            vec![io("attention_mask", DatumType::I64, &[None, None])],
        ];
        for facts in cases {
            let err = text_inputs("t", &facts).unwrap_err();
            assert!(matches!(err, Error::UnfillableInput { .. }), "{err}");
        }
    }

    #[test]
    fn predict_takes_the_argmax_and_its_softmax_probability() {
        let labels = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        let p = predict(&[1.0, 3.0, 2.0], &labels);
        let e = [(-2f64).exp(), 1.0, (-1f64).exp()];
        assert_eq!((p.class, p.label.as_deref()), (1, Some("b")));
        assert!((f64::from(p.probability) - 1.0 / e.iter().sum::<f64>()).abs() < 1e-7);
        let p = predict(&[0.0, 0.0], &[]);
        assert_eq!((p.class, p.label, p.probability), (0, None, 0.5));
        // Equal maxima: the first one, as calibration's agreement counts it (runtime::argmax).
        let p = predict(&[2.0, 5.0, 5.0], &labels);
        assert_eq!((p.class, p.label.as_deref()), (1, Some("b")));
        // NaN logits give a NaN probability, not a panic.
        assert!(predict(&[f32::NAN], &labels).probability.is_nan());
    }

    #[test]
    fn classifier_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<TextClassifier>();
    }
}
