//! `taskpack run`: one task of a bundle through the runtime [`Engine`] (the path an app takes),
//! on inputs from a `.npz` or `.npy` file, or on texts with the bundle's tokenizer.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{ArgGroup, Args};
use ndarray_npy::{NpzReader, NpzWriter, ReadNpyExt};
use taskpack::runtime::{Engine, EngineOptions, IoInfo, TextClassifier};
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
    let engine = Engine::new(bundle, EngineOptions::default())?;
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
    let inputs = read_inputs(input, &facts)?;
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
                let best = row
                    .iter()
                    .enumerate()
                    .max_by(|x, y| x.1.total_cmp(y.1))
                    .map(|(i, v)| (i, *v));
                if let Some((class, score)) = best {
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

/// The arrays of `path`, one per input of `facts`, each read as the input's element type.
fn read_inputs(path: &Path, facts: &[IoInfo]) -> Result<Vec<Tensor>> {
    let open =
        || std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()));
    let is_npy = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npy"));
    if is_npy {
        let [fact] = facts else {
            bail!(
                "the task has {} inputs ({}); give them by name in an .npz",
                facts.len(),
                names(facts)
            )
        };
        let tensor = read_array(fact, |dt| read_npy(open()?, dt))
            .with_context(|| format!("reading {}", path.display()))?;
        return Ok(vec![tensor]);
    }
    let mut npz = NpzReader::new(open()?)
        .with_context(|| format!("{} is neither an .npz nor an .npy file", path.display()))?;
    let available: Vec<String> = npz
        .names()?
        .into_iter()
        .map(|n| n.strip_suffix(".npy").map(str::to_string).unwrap_or(n))
        .collect();
    let mut tensors = Vec::with_capacity(facts.len());
    for fact in facts {
        let key = if available.contains(&fact.name) {
            fact.name.clone()
        } else if let ([_], [only]) = (facts, available.as_slice()) {
            only.clone()
        } else {
            bail!(
                "{} has no array {:?} (it has: {}; the task's inputs are: {})",
                path.display(),
                fact.name,
                available.join(", "),
                names(facts)
            )
        };
        let tensor = read_array(fact, |dt| read_npz(&mut npz, &key, dt))
            .with_context(|| format!("{}: array {key:?}", path.display()))?;
        tensors.push(tensor);
    }
    Ok(tensors)
}

fn names(facts: &[IoInfo]) -> String {
    facts
        .iter()
        .map(|f| f.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Reads the array as the input's type; an `f64` array is accepted for an `f32` input.
fn read_array(fact: &IoInfo, mut read: impl FnMut(DatumType) -> Result<Tensor>) -> Result<Tensor> {
    match read(fact.dtype) {
        Ok(t) => Ok(t),
        Err(e) if fact.dtype == DatumType::F32 => match read(DatumType::F64) {
            Ok(t) => Ok(t.cast_to::<f32>()?.into_owned()),
            Err(_) => Err(e),
        },
        Err(e) => Err(e),
    }
    .with_context(|| format!("input {:?} must be {:?}", fact.name, fact.dtype))
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
            other => bail!("reading {other:?} arrays is not supported"),
        }
    };
}

fn read_npy(file: std::fs::File, dt: DatumType) -> Result<Tensor> {
    fn read<T: Datum + ndarray_npy::ReadableElement>(file: std::fs::File) -> Result<Tensor> {
        Ok(tract_ndarray::ArrayD::<T>::read_npy(file)?.into_tensor())
    }
    by_type!(dt, read, file)
}

fn read_npz(npz: &mut NpzReader<std::fs::File>, name: &str, dt: DatumType) -> Result<Tensor> {
    fn read<T: Datum + ndarray_npy::ReadableElement>(
        npz: &mut NpzReader<std::fs::File>,
        name: &str,
    ) -> Result<Tensor> {
        Ok(npz
            .by_name::<_, tract_ndarray::IxDyn>(name)
            .map(|a: tract_ndarray::ArrayD<T>| a.into_tensor())?)
    }
    by_type!(dt, read, npz, name)
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
