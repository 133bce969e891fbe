//! `taskpack`: the command-line front end. Thin by design: parsing, progress and printing live
//! here; everything else is the library's.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use taskpack::runtime::Bundle;

#[path = "cli/bench.rs"]
mod bench;
#[path = "cli/compile.rs"]
mod compile_cmd;
#[path = "cli/demo.rs"]
mod demo;
#[path = "cli/eval.rs"]
mod eval;
#[path = "cli/inspect.rs"]
mod inspect;
#[path = "cli/npz.rs"]
mod npz;
#[path = "cli/run.rs"]
mod run_cmd;

/// Compile N fine-tuned checkpoints of one network into one bundle, and inspect, verify and
/// export bundles.
#[derive(Parser)]
#[command(name = "taskpack", version, about, propagate_version = true)]
struct Cli {
    /// Read bundles into memory instead of memory-mapping them: for files that may be rewritten
    /// while the command runs (removable media, network file systems).
    #[arg(long, global = true)]
    no_mmap: bool,
    #[command(subcommand)]
    command: Command,
}

/// `--no-mmap`: how [`open_bundle`] opens bundles.
static NO_MMAP: AtomicBool = AtomicBool::new(false);

#[derive(Subcommand)]
enum Command {
    /// Merge a base checkpoint and N task checkpoints into one bundle.
    Compile(Box<compile_cmd::CompileArgs>),
    /// Show a bundle's tasks, method, hyper-parameters, provenance and sizes.
    Inspect(InspectArgs),
    /// Check every checksum, structural rule and graph rule of a bundle; exit 0 only if all
    /// hold.
    Verify(VerifyArgs),
    /// Write one task's reconstructed weights as a standalone ONNX model.
    Export(ExportArgs),
    /// Compile the embedded demo models and compare each task's accuracy before and after.
    Demo(demo::DemoArgs),
    /// Run one task of a bundle on inputs from an .npz or .npy file, or on texts (--text).
    Run(run_cmd::RunArgs),
    /// Measure task switching and inference against loading each task's ONNX with tract.
    Bench(bench::BenchArgs),
}

#[derive(Args)]
struct InspectArgs {
    /// The bundle.
    bundle: PathBuf,
    /// Print the whole manifest (without section table) as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct VerifyArgs {
    /// The bundle.
    bundle: PathBuf,
}

#[derive(Args)]
struct ExportArgs {
    /// The bundle.
    bundle: PathBuf,
    /// Name of the task to export.
    #[arg(long)]
    task: String,
    /// Output ONNX file.
    #[arg(short, long)]
    output: PathBuf,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    NO_MMAP.store(cli.no_mmap, Ordering::Relaxed);
    let result = match cli.command {
        Command::Compile(a) => compile_cmd::run(&a),
        Command::Inspect(a) => inspect::run(&a.bundle, a.json),
        Command::Verify(a) => verify(&a.bundle),
        Command::Export(a) => export(&a),
        Command::Demo(a) => demo::run(&a),
        Command::Run(a) => run_cmd::run(&a),
        Command::Bench(a) => bench::run(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line (a cause its parent already quotes is not repeated).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain().map(ToString::to_string) {
        if line.ends_with(&cause) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&cause);
    }
    line
}

/// Opens (memory-maps, or reads with `--no-mmap`) and structurally validates a bundle.
fn open_bundle(path: &Path) -> Result<Bundle> {
    let bundle = if NO_MMAP.load(Ordering::Relaxed) {
        Bundle::read(path)
    } else {
        Bundle::open(path)
    };
    bundle.with_context(|| format!("{} is not a valid bundle", path.display()))
}

fn verify(path: &Path) -> Result<()> {
    let bundle = open_bundle(path)?;
    bundle
        .verify()
        .with_context(|| format!("{} failed verification", path.display()))?;
    taskpack::runtime::check_graphs(&bundle)
        .with_context(|| format!("{} failed verification", path.display()))?;
    let m = bundle.manifest();
    println!(
        "{}: OK ({} bytes, {} sections, {} tasks, {} tensors, all checksums match, {} graphs \
         load with their tensors)",
        path.display(),
        bundle.bytes().len(),
        m.sections.len(),
        m.tasks.len(),
        m.tensors.len(),
        m.graphs.len()
    );
    Ok(())
}

fn export(a: &ExportArgs) -> Result<()> {
    let bundle = open_bundle(&a.bundle)?;
    let onnx = taskpack::compile::export::export_task(&bundle, &a.task)?;
    write_atomically(&a.output, &onnx)?;
    println!("wrote {} ({} bytes)", a.output.display(), onnx.len());
    Ok(())
}

/// Writes `bytes` to a temp file beside `path`, then renames it over `path`.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Some(name) = path.file_name() else {
        bail!("{} is not a file path", path.display())
    };
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_line_does_not_repeat_a_cause_its_parent_quotes() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let e = anyhow::Error::new(io)
            .context("cannot open x: gone")
            .context("cannot compile y");
        assert_eq!(super::one_line(&e), "cannot compile y: cannot open x: gone");
    }
}
