//! `taskpack compile`: arguments, progress bar and the size report.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use taskpack::compile::{
    compile, compile_calibrated, compile_within, Budget, BudgetChoice, Calibration, CompileOptions,
    Progress,
};
use taskpack::format::Encoding;
use taskpack::format::{MergeParams, Method, ScaleMode};
use taskpack::runtime::Bundle;

/// The storage types `--base-dtype` accepts (`compile` and `demo`).
pub const BASE_TYPES: [&str; 7] = ["f32", "f16", "bf16", "q8", "q4", "q3", "q2"];
/// The storage types `--delta-dtype` accepts: the base's.
pub const DELTA_TYPES: [&str; 7] = BASE_TYPES;
/// The storage types `--residual-dtype` accepts (`none`: no residual).
pub const RESIDUAL_TYPES: [&str; 9] = [
    "none", "f32", "f16", "bf16", "q8", "q4", "q3", "q2", "ternary",
];

/// Arguments of `taskpack compile`.
#[derive(Args, Debug)]
pub struct CompileArgs {
    /// Base (pretrained) checkpoint: ONNX, or safetensors with --graph.
    #[arg(long)]
    pub base: PathBuf,
    /// A fine-tuned task checkpoint as NAME=PATH; repeat for every task.
    #[arg(long = "task", value_name = "NAME=PATH", required = true, value_parser = parse_task)]
    pub tasks: Vec<(String, PathBuf)>,
    /// Merge method. The default, tvq (each task's own task vector in 3.5 bits per weight over
    /// a q8 base, no shared delta), kept the individual models' accuracy on every real
    /// benchmark family (docs/ACCURACY.md); tall / emr share one merged delta and are smaller
    /// per task but lose accuracy where tasks differ.
    #[arg(long, default_value = "tvq", value_parser = Method::ALL.map(|m| m.name()))]
    pub method: String,
    /// Scale of the merged vector (default per method: task-arithmetic/dare/breadcrumbs/consensus 0.3, ties/tall/emr 1.0).
    #[arg(long)]
    pub alpha: Option<f32>,
    /// TALL / Consensus mask threshold λ (default 0.4).
    #[arg(long)]
    pub lambda: Option<f32>,
    /// Kept fraction for TIES (0.2), DARE (0.5) and Breadcrumbs (0.9). TIES trims per tensor.
    #[arg(long)]
    pub density: Option<f32>,
    /// Breadcrumbs: fraction of largest-magnitude entries dropped as outliers (default 0.01).
    #[arg(long)]
    pub gamma: Option<f32>,
    /// Consensus: a weight is kept when at least K task masks select it (default 2).
    #[arg(long, value_name = "K")]
    pub min_tasks: Option<u32>,
    /// DARE: random seed (default 0).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Closed-form scaling vectors on top of the method: none, one per tensor, or one per row.
    #[arg(long, default_value = "none", value_parser = ["none", "tensor", "row"])]
    pub scale: String,
    /// Regular expression: matching tensors are stored privately per task.
    #[arg(long, value_name = "REGEX")]
    pub private: Option<String>,
    /// Regular expression: matching merged tensors get the merged delta without per-task masks
    /// or residuals (with tvq: the base), the same weights for every task, bound once instead
    /// of at every switch (e.g. 'word_embeddings' for a BERT-style encoder: faster switches,
    /// at an accuracy cost to measure; docs/ACCURACY.md has it for MiniLM). Not with EMR,
    /// whose per-task rescaler keeps them apart.
    #[arg(long, value_name = "REGEX")]
    pub shared: Option<String>,
    /// Do not detect fresh task heads (tensors that changed far more than the rest) automatically.
    #[arg(long)]
    pub no_auto_private: bool,
    /// Storage of the merged delta: f16 halves it at no measured accuracy cost; q8 / q4 / q3 /
    /// q2 store blocks of signed 8- / 4- / 3- / 2-bit codes with one f32 scale (8.5 / 5 / 3.5 /
    /// 2.5 bits per weight) for matrices of at least 4096 elements, f16 for the rest. Default:
    /// f16.
    #[arg(long, value_parser = DELTA_TYPES)]
    pub delta_dtype: Option<String>,
    /// Storage of each task's own residual over what the method reconstructs (its task vector,
    /// with --method tvq): q8 / q4 / q3 / q2 (8.5 / 5 / 3.5 / 2.5 bits per weight) or ternary
    /// (T-Switch's sign module: each weight stays or moves by ± one magnitude per block of 128;
    /// 1.875 bits per weight) for matrices of at least 4096 elements, f16 for the rest; `none`
    /// for no residual. Default: q3 with tvq, none otherwise (docs/METHODS.md, "Per-task
    /// residuals").
    #[arg(long, value_parser = RESIDUAL_TYPES)]
    pub residual_dtype: Option<String>,
    /// Residual storage for the tensors whose name matches REGEX, instead of --residual-dtype
    /// (e.g. 'word_embeddings=q2'); repeat for more patterns, the first match wins.
    #[arg(long = "residual-dtype-for", value_name = "REGEX=TYPE", value_parser = parse_residual_for)]
    pub residual_for: Vec<(String, Encoding)>,
    /// A size budget for the bundle (e.g. 60MB, 1.5GB, 500MiB, bytes, or 0.1x: a fraction of
    /// the task checkpoints' total size, external data included): the compiler picks the
    /// most faithful storage of base and delta whose bundle fits (f32/f16, f16/f16, q8/f16,
    /// q8/q8, q8/q4, in that order; with tvq, base and residuals: f32/q8, q8/q8, q8/q4, q8/q3,
    /// q8/q2, q4/q2, q4/ternary), trying each, and says what it picked; with tvq,
    /// the room left gives the previous rung's residuals to the tasks whose relative error they
    /// lower the most per byte. Replaces --base-dtype, --delta-dtype and (with tvq)
    /// --residual-dtype.
    #[arg(
        long,
        value_name = "SIZE",
        value_parser = parse_size,
        conflicts_with_all = ["base_dtype", "delta_dtype", "residual_dtype"]
    )]
    pub max_size: Option<Budget>,
    /// Storage of the base weights of merged matrices (default: q8 with tvq, the checkpoint's
    /// type otherwise): f32, f16, bf16, or q8 / q4 / q3 / q2 (blocks of signed 8- / 4- / 3- /
    /// 2-bit codes and one f32 scale: 8.5 / 5 / 3.5 / 2.5 bits per weight; below q8, meant for
    /// tvq, whose residuals carry the base's rounding error back). Biases, normalization
    /// weights and tensors under 4096 elements keep their own type.
    #[arg(long, value_parser = BASE_TYPES)]
    pub base_dtype: Option<String>,
    /// ONNX graph whose initializers safetensors checkpoints fill.
    #[arg(long, value_name = "G.onnx")]
    pub graph: Option<PathBuf>,
    /// A Hugging Face tokenizer.json to carry in the bundle (enables `taskpack run --text`).
    #[arg(long, value_name = "tokenizer.json")]
    pub tokenizer: Option<PathBuf>,
    /// Label names of a task's outputs as NAME=FILE, one label per line in logit order.
    #[arg(long = "labels", value_name = "NAME=FILE", value_parser = parse_task)]
    pub labels: Vec<(String, PathBuf)>,
    /// Calibrate task NAME on the unlabeled inputs in INPUTS.npz (arrays named like the graph's
    /// inputs, examples on the first axis): its λ (TALL) and scale mode are chosen by agreement
    /// with the original task model; with tvq, the row scales of its residuals are fitted to
    /// the original's layer outputs (MatMul and pointwise convolution weights), kept if that
    /// agrees better. Repeat per task.
    #[arg(long = "calib", value_name = "NAME=INPUTS.npz", value_parser = parse_task)]
    pub calib: Vec<(String, PathBuf)>,
    /// Calibration: examples used per task (the first ones).
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub calib_examples: usize,
    /// Calibration: the λ grid for TALL.
    #[arg(long, value_name = "L,L,...", value_delimiter = ',', default_values_t = [0.2, 0.3, 0.4, 0.5, 0.6, 0.8])]
    pub calib_lambdas: Vec<f32>,
    /// Calibration: the scale modes to try.
    #[arg(long, value_name = "MODE,...", value_delimiter = ',', default_values_t = ["none".to_string(), "tensor".to_string(), "row".to_string()])]
    pub calib_scales: Vec<String>,
    /// Output bundle.
    #[arg(short, long, value_name = "OUT.tpk")]
    pub output: PathBuf,
}

fn parse_residual_for(s: &str) -> Result<(String, Encoding), String> {
    match s.rsplit_once('=') {
        Some((pattern, e)) if !pattern.is_empty() => Ok((pattern.to_string(), e.parse()?)),
        _ => Err(format!("expected REGEX=TYPE, got {s:?}")),
    }
}

fn parse_task(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok((name.to_string(), PathBuf::from(path)))
        }
        _ => Err(format!("expected NAME=PATH, got {s:?}")),
    }
}

impl CompileArgs {
    /// The library's options for these arguments.
    pub fn options(&self) -> Result<CompileOptions> {
        let method: Method = self.method.parse().map_err(anyhow::Error::msg)?;
        let mut params = MergeParams::defaults(method, self.tasks.len());
        if let Some(a) = self.alpha {
            params.alpha = a;
        }
        if let Some(l) = self.lambda {
            params.lambda = vec![l; self.tasks.len()];
        }
        if let Some(d) = self.density {
            params.density = d;
        }
        if let Some(g) = self.gamma {
            params.gamma = g;
        }
        if let Some(k) = self.min_tasks {
            params.min_tasks = k;
        }
        if let Some(s) = self.seed {
            params.seed = s;
        }
        let pattern = |flag: &str, p: &Option<String>| -> Result<Option<regex::Regex>> {
            p.as_deref()
                .map(|p| {
                    regex::Regex::new(p).with_context(|| format!("invalid {flag} pattern {p:?}"))
                })
                .transpose()
        };
        let private = pattern("--private", &self.private)?;
        let shared = pattern("--shared", &self.shared)?;
        self.check_output()?;
        let scale = self
            .scale
            .parse::<ScaleMode>()
            .map_err(anyhow::Error::msg)?;
        let tokenizer = match &self.tokenizer {
            Some(path) => Some(
                taskpack::files::read_regular(path)
                    .with_context(|| format!("cannot read tokenizer {}", path.display()))?,
            ),
            None => None,
        };
        let defaults = CompileOptions::new(&self.base, Vec::new(), method, &self.output);
        let residual_dtype = match self.residual_dtype.as_deref() {
            None => defaults.residual_dtype,
            Some("none") => None,
            Some(e) => Some(e.parse::<Encoding>().map_err(anyhow::Error::msg)?),
        };
        let residual_for = self
            .residual_for
            .iter()
            .map(|(p, e)| {
                Ok((
                    regex::Regex::new(p)
                        .with_context(|| format!("invalid --residual-dtype-for pattern {p:?}"))?,
                    *e,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CompileOptions {
            base: self.base.clone(),
            tasks: self.tasks.clone(),
            graph: self.graph.clone(),
            params,
            scale: vec![scale; self.tasks.len()],
            private,
            shared,
            delta_dtype: self
                .delta_dtype
                .as_deref()
                .unwrap_or("f16")
                .parse::<Encoding>()
                .map_err(anyhow::Error::msg)?,
            residual_dtype,
            residual_for,
            residual_per_task: Vec::new(),
            base_dtype: match self.base_dtype.as_deref() {
                None => defaults.base_dtype,
                Some(e) => Some(e.parse::<Encoding>().map_err(anyhow::Error::msg)?),
            },
            auto_private: !self.no_auto_private,
            output: self.output.clone(),
            tokenizer,
            labels: self.labels()?,
        })
    }

    /// Refuses, before anything is read or written, an output that exists and is not a regular
    /// file, or that is one of the files this compile reads (base, tasks, --graph, --tokenizer,
    /// --labels, --calib; the library also checks external data files).
    fn check_output(&self) -> Result<()> {
        taskpack::files::check_output(&self.output)?;
        let inputs = std::iter::once(&self.base)
            .chain(self.tasks.iter().map(|(_, p)| p))
            .chain(&self.graph)
            .chain(&self.tokenizer)
            .chain(self.labels.iter().map(|(_, p)| p))
            .chain(self.calib.iter().map(|(_, p)| p))
            .map(PathBuf::as_path);
        taskpack::files::check_not_input(&self.output, inputs)?;
        Ok(())
    }

    /// Label names per task, read from the `--labels` files.
    fn labels(&self) -> Result<Vec<Vec<String>>> {
        let mut labels = vec![Vec::new(); self.tasks.len()];
        for (name, path) in &self.labels {
            let Some(t) = self.tasks.iter().position(|(n, _)| n == name) else {
                bail!("--labels names task {name:?}, which is not a --task");
            };
            let bytes = taskpack::files::read_regular(path)
                .with_context(|| format!("cannot read labels {}", path.display()))?;
            let text = String::from_utf8(bytes)
                .with_context(|| format!("labels {} are not UTF-8 text", path.display()))?;
            let names = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            if let Some(slot) = labels.get_mut(t) {
                *slot = names;
            }
        }
        Ok(labels)
    }
}

/// Runs `taskpack compile`.
pub fn run(args: &CompileArgs) -> Result<()> {
    let opts = args.options()?;
    let calibration = args.calibration()?;
    let bundle = compile_with_progress(&opts, calibration.as_ref(), args.max_size)?;
    print_report(&bundle, &opts.output);
    Ok(())
}

impl CompileArgs {
    /// The calibration settings, if any `--calib` was given.
    fn calibration(&self) -> Result<Option<Calibration>> {
        if self.calib.is_empty() {
            return Ok(None);
        }
        let mut inputs = Vec::with_capacity(self.calib.len());
        for (name, path) in &self.calib {
            inputs.push((name.clone(), crate::npz::read_all(path)?));
        }
        let scales = self
            .calib_scales
            .iter()
            .map(|s| s.parse::<ScaleMode>().map_err(anyhow::Error::msg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Some(Calibration {
            lambdas: self.calib_lambdas.clone(),
            scales,
            max_examples: self.calib_examples,
            ..Calibration::new(inputs)
        }))
    }
}

/// Compiles (calibrating if asked) with a progress bar on stderr (drawn only on a terminal).
pub fn compile_with_progress(
    opts: &CompileOptions,
    calibration: Option<&Calibration>,
    max_size: Option<Budget>,
) -> Result<Bundle> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos}/{len} {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut report = |p: Progress<'_>| match p {
        Progress::Pass { name, total } => {
            bar.set_prefix(name);
            bar.set_length(total);
            bar.set_position(0);
        }
        Progress::Tensor(name) | Progress::Step(name) => {
            bar.set_message(name.to_string());
            bar.inc(1);
        }
    };
    let bundle = match (max_size, calibration) {
        (Some(max), c) => compile_within(opts, max, c, &mut report).map(|(bundle, choice)| {
            bar.finish_and_clear();
            print_budget(&choice);
            bundle
        }),
        (None, Some(c)) => compile_calibrated(opts, c, &mut report),
        (None, None) => compile(opts, &mut report),
    };
    bar.finish_and_clear();
    bundle.with_context(|| format!("cannot compile {}", opts.output.display()))
}

/// What a size budget tried and picked.
fn print_budget(choice: &BudgetChoice) {
    println!("size budget {} bytes:", choice.max_bytes);
    for (i, (name, bytes)) in choice.tried.iter().enumerate() {
        let verdict = if i == choice.chosen {
            "fits: chosen (the most faithful that fits)"
        } else {
            "over"
        };
        println!("  {name:<42} {bytes:>12} bytes  {verdict}");
    }
    if choice.upgrades.is_empty() {
        return;
    }
    // The rung before the chosen one is the storage the upgraded tasks got.
    println!(
        "  with room left, {} task(s) keep the previous rung's residuals (most saved per byte \
         first: of agreement with the original on --calib inputs if given, else of relative \
         error ‖θ̂ − θ‖ / ‖τ‖):",
        choice.upgrades.len()
    );
    for u in &choice.upgrades {
        let agreement = u
            .agreement
            .map(|a| format!("  agreement {a:.4} (calibrated)"))
            .unwrap_or_default();
        println!(
            "    {:<20} residuals {:<8} +{:>10} bytes  relative error {:.4} → {:.4}{agreement}",
            u.task, u.residual, u.extra_bytes, u.relative_error.0, u.relative_error.1
        );
    }
    println!("  bundle: {} bytes", choice.bytes);
}

/// A size with an optional unit: bytes, or kB / MB / GB (powers of 1000; K, M, G too) or
/// KiB / MiB / GiB (powers of 1024); a decimal point is allowed (`1.5GB`); or a positive
/// fraction followed by `x` (`0.1x`), of the task checkpoints' total size.
fn parse_size(s: &str) -> Result<Budget, String> {
    let s = s.trim();
    if let Some(f) = s.strip_suffix('x') {
        return match f.trim().parse::<f64>() {
            Ok(f) if f.is_finite() && f > 0.0 => Ok(Budget::OfTasks(f)),
            _ => Err(format!("{s:?} is not a positive fraction (e.g. 0.1x)")),
        };
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "k" | "K" | "kB" | "KB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit {other:?} (use B, kB, MB, GB, KiB, MiB or GiB)"
            ))
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 60MB, 1.5GB, 500MiB)"))?;
    let bytes = value * factor as f64;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("{s:?} is not a usable size"));
    }
    Ok(Budget::Bytes(bytes as u64))
}

/// Prints the size report and per-task fidelity of a freshly written bundle.
pub fn print_report(bundle: &Bundle, path: &std::path::Path) {
    let m = bundle.manifest();
    let sizes = bundle.sizes();
    let inputs = m.report.inputs_bytes;
    println!(
        "wrote {} ({} tasks, method {})",
        path.display(),
        m.tasks.len(),
        m.merge.method,
    );
    println!("  {:<14}{:>14}", "part", "bytes");
    for (part, v) in [
        ("base", sizes.base),
        ("merged delta", sizes.delta),
        ("masks", sizes.masks),
        ("scales", sizes.scales),
        ("private", sizes.private),
        ("residuals", sizes.residuals),
        ("graphs", sizes.graphs),
        ("tokenizer", sizes.tokenizer),
        ("overhead", sizes.overhead),
        ("total", sizes.total),
    ] {
        if part == "tokenizer" && v == 0 {
            continue;
        }
        println!("  {part:<14}{v:>14}");
    }
    println!(
        "  inputs: {} bytes in {} checkpoints; bundle = {:.3}x their sum",
        inputs,
        m.provenance.inputs.len(),
        ratio(sizes.total as f64, inputs as f64)
    );
    // What an ideal entropy coder of the per-task streams could save (not coded: see
    // docs/METHODS.md, "Are the masks and codes worth entropy coding?").
    match crate::entropy::streams(bundle) {
        Ok(streams) => {
            for s in streams {
                let name = if s.name == "masks" {
                    s.name.to_string()
                } else {
                    format!("{} codes", s.name)
                };
                println!(
                    "  {name:<14}{:>14} bytes stored, order-0 entropy {:.0} ({:.1}% less, {:.1}% of the bundle)",
                    s.stored,
                    s.entropy,
                    100.0 * (1.0 - ratio(s.entropy, s.stored as f64)),
                    100.0 * ratio(s.stored as f64 - s.entropy, sizes.total as f64)
                );
            }
        }
        Err(e) => log::warn!("entropy of the per-task streams: {e:#}"),
    }
    println!(
        "  {:<16}{:>12}{:>10}{:>14}{:>8}{:>8}{:>8}",
        "task", "rel. error", "cosine", "mask density", "g", "scale", "λ"
    );
    for (t, r) in m.tasks.iter().zip(&m.report.tasks) {
        let lambda = t
            .lambda
            .map_or_else(|| "-".to_string(), |l| format!("{l:.2}"));
        println!(
            "  {:<16}{:>12.4}{:>10.4}{:>14.3}{:>8.3}{:>8}{:>8}",
            t.name,
            r.relative_error,
            r.cosine,
            r.mask_density,
            t.global_scale,
            t.scale_mode.to_string(),
            lambda
        );
    }
    for (t, r) in m.tasks.iter().zip(&m.report.tasks) {
        let Some(c) = &r.calibration else { continue };
        if let Some(chosen) = usize::try_from(c.chosen)
            .ok()
            .and_then(|i| c.candidates.get(i))
        {
            println!(
                "  calibrated {}: {} (agreement {:.4}, logit distance {:.4}, {} examples, {} candidates)",
                t.name,
                chosen.setting,
                chosen.agreement,
                chosen.logit_distance,
                c.examples,
                c.candidates.len()
            );
        }
    }
    for p in &m.report.private {
        println!("  private: {p}");
    }
    println!(
        "  compiled in {:.3} s, peak memory {:.1} MiB",
        m.report.seconds,
        m.report.peak_memory_bytes as f64 / (1024.0 * 1024.0)
    );
}

/// `a / b`, or 0 when `b` is 0.
pub fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        0.0
    } else {
        a / b
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;
    use taskpack::compile::Budget;

    #[test]
    fn sizes_with_units() {
        let bytes = |s| {
            parse_size(s).map(|m| match m {
                Budget::Bytes(b) => b,
                Budget::OfTasks(_) => panic!("{s}: not bytes"),
            })
        };
        assert_eq!(bytes("60MB"), Ok(60_000_000));
        assert_eq!(bytes("1.5GB"), Ok(1_500_000_000));
        assert_eq!(bytes("500MiB"), Ok(500 << 20));
        assert_eq!(bytes("12345"), Ok(12_345));
        assert_eq!(bytes("2 kB"), Ok(2_000));
        assert_eq!(parse_size("0.1x"), Ok(Budget::OfTasks(0.1)));
        assert!(parse_size("0x").is_err());
        assert!(parse_size("-1x").is_err());
        assert!(parse_size("NaNx").is_err());
        assert!(parse_size("60 parsecs").is_err());
        assert!(parse_size("MB").is_err());
        assert!(parse_size("0").is_err());
    }
}
