//! `taskpack run`: one task of a bundle through the runtime [`Engine`] (the path an app takes),
//! on inputs from a `.npz` or `.npy` file, or on texts with the bundle's tokenizer.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{ArgGroup, Args};
use ndarray_npy::NpzWriter;
use taskpack::npz::Limits;
use taskpack::runtime::{Engine, EngineOptions, TextClassifier};
use tract_onnx::prelude::*;

/// Arguments of `taskpack run`.
#[derive(Args, Debug)]
#[command(group(ArgGroup::new("what").required(true).args(["input", "text"])))]
pub struct RunArgs {
    /// The bundle.
    pub bundle: PathBuf,
    /// Name of the task to run.
    #[arg(long)]
    pub task: String,
    /// Inputs: an `.npz` with one array per graph input (matched by name; a single array is
    /// accepted for a single-input model), or an `.npy` for a single-input model.
    #[arg(long, value_name = "X.npz")]
    pub input: Option<PathBuf>,
    /// A text to classify with the bundle's tokenizer (compile with --tokenizer); repeat for
    /// several. Prints one line per text, tab-separated: the label (the class index if the task
    /// has no label names), its softmax probability, the text.
    #[arg(long, value_name = "TEXT")]
    pub text: Vec<String>,
    /// With --input: write the outputs, by name, to this `.npz`. With --text: write the
    /// predictions to this JSON file (per text: text, class, label, probability, logits).
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Rows to show the argmax of, for `[N, C]` outputs (with --input).
    #[arg(long, default_value_t = 10)]
    pub rows: usize,
    /// Most bytes of input data: of the arrays read from --input, and of the tensors one run
    /// takes (the token inputs of --text). Larger inputs are refused before they are allocated.
    #[arg(long, value_name = "BYTES", default_value_t = EngineOptions::DEFAULT_MAX_INPUT_BYTES)]
    pub max_input_bytes: usize,
}

/// Runs `taskpack run`.
pub fn run(a: &RunArgs) -> Result<()> {
    if let Some(output) = &a.output {
        // Refuse a special-file destination, the bundle or the input before any work.
        taskpack::files::check_output(output)?;
        let inputs = std::iter::once(a.bundle.as_path()).chain(a.input.as_deref());
        taskpack::files::check_not_input(output, inputs)?;
    }
    let bundle = Arc::new(crate::open_bundle(&a.bundle)?);
    let options = EngineOptions::default().with_max_input_bytes(a.max_input_bytes);
    let engine = Engine::new(bundle, options)?;
    let task = engine.task_index(&a.task)?;
    match &a.input {
        Some(input) => run_tensors(a, &engine, task, input),
        None => run_texts(a, engine, task),
    }
}

/// `--text`: one line per text, and the predictions as JSON with `--output`.
fn run_texts(a: &RunArgs, engine: Engine, task: usize) -> Result<()> {
    let classifier = TextClassifier::new(Arc::new(engine))
        .with_context(|| format!("cannot run {} on text", a.bundle.display()))?;
    let predictions = classifier.classify(task, &a.text)?;
    let mut json = Vec::with_capacity(predictions.len());
    for (text, p) in a.text.iter().zip(&predictions) {
        let label = p.label.clone().unwrap_or_else(|| p.class.to_string());
        println!("{label}\t{:.4}\t{text}", p.probability);
        json.push(serde_json::json!({
            "text": text,
            "class": p.class,
            "label": p.label,
            "probability": p.probability,
            "logits": p.logits,
        }));
    }
    if let Some(path) = &a.output {
        let mut bytes = serde_json::to_vec_pretty(&json)?;
        bytes.push(b'\n');
        taskpack::files::write_atomic(path, &bytes)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// `--input`: the graph's outputs, their argmax per row, and the outputs as `.npz` with
/// `--output`.
fn run_tensors(a: &RunArgs, engine: &Engine, task: usize, input: &Path) -> Result<()> {
    let started = Instant::now();
    let facts = engine.input_facts(task)?;
    let template = started.elapsed();
    let limits = Limits::with_max_bytes(u64::try_from(a.max_input_bytes).unwrap_or(u64::MAX));
    let inputs = crate::npz::read_inputs(input, &facts, &limits)?;
    for (fact, value) in facts.iter().zip(&inputs) {
        println!(
            "input  {:<16} {:?} {:?}",
            fact.name,
            value.datum_type(),
            value.shape()
        );
    }
    let started = Instant::now();
    engine.prepare(task)?;
    let bound = started.elapsed();
    let started = Instant::now();
    let outputs = engine.run(
        task,
        inputs.into_iter().map(IntoTValue::into_tvalue).collect(),
    )?;
    let ran = started.elapsed();
    println!(
        "graph template built in {:.2} ms (once per graph), task {} bound in {:.2} ms, ran in {:.2} ms",
        template.as_secs_f64() * 1e3,
        a.task,
        bound.as_secs_f64() * 1e3,
        ran.as_secs_f64() * 1e3
    );
    let infos = engine.output_facts(task)?;
    let mut named = Vec::new();
    for (i, value) in outputs.iter().enumerate() {
        let name = infos
            .get(i)
            .map_or_else(|| format!("output{i}"), |f| f.name.clone());
        println!(
            "output {:<16} {:?} {:?}",
            name,
            value.datum_type(),
            value.shape()
        );
        if let (DatumType::F32, &[n, c]) = (value.datum_type(), value.shape()) {
            let view = value.to_plain_array_view::<f32>()?;
            let rows = n.min(a.rows);
            for r in 0..rows {
                let row = view.index_axis(tract_ndarray::Axis(0), r);
                let best = row.as_slice().and_then(taskpack::runtime::argmax);
                if let Some((class, score)) = best.and_then(|i| Some((i, *row.get(i)?))) {
                    println!("  row {r:>4}: argmax {class:>3} of {c} (score {score:.4})");
                }
            }
            if n > rows {
                println!("  … {} more rows", n - rows);
            }
        }
        named.push((name, value.clone().into_tensor()));
    }
    if let Some(path) = &a.output {
        write_outputs(path, &named)?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

macro_rules! by_type {
    ($dt:expr, $read:ident, $($args:expr),*) => {
        match $dt {
            DatumType::F32 => $read::<f32>($($args),*),
            DatumType::F64 => $read::<f64>($($args),*),
            DatumType::I64 => $read::<i64>($($args),*),
            DatumType::I32 => $read::<i32>($($args),*),
            DatumType::I8 => $read::<i8>($($args),*),
            DatumType::U8 => $read::<u8>($($args),*),
            DatumType::Bool => $read::<bool>($($args),*),
            other => bail!("writing {other:?} arrays is not supported"),
        }
    };
}

fn write_outputs(path: &Path, outputs: &[(String, Tensor)]) -> Result<()> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    {
        let mut npz = NpzWriter::new_compressed(&mut bytes);
        for (name, t) in outputs {
            fn add<T: Datum + ndarray_npy::WritableElement>(
                npz: &mut NpzWriter<&mut std::io::Cursor<Vec<u8>>>,
                name: &str,
                t: &Tensor,
            ) -> Result<()> {
                Ok(npz.add_array(name, &t.to_plain_array_view::<T>()?)?)
            }
            by_type!(t.datum_type(), add, &mut npz, name, t)?;
        }
        npz.finish()?;
    }
    Ok(taskpack::files::write_atomic(path, bytes.get_ref())?)
}
