//! `taskpack`: the command-line front end. Thin by design: parsing, progress and printing live
//! here; everything else is the library's.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use taskpack::runtime::{Bundle, Compute};

#[path = "cli/bench/mod.rs"]
mod bench;
#[path = "cli/compile.rs"]
mod compile_cmd;
#[path = "cli/demo.rs"]
mod demo;
#[path = "cli/entropy.rs"]
mod entropy;
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
    /// Precision of the matrix products when running tasks (run, bench, demo): `f32` (exact), or
    /// `bf16` (operands rounded to bfloat16, on CPUs with AMX-BF16; faster, see
    /// docs/PERFORMANCE.md; falls back to f32 with a warning elsewhere).
    #[arg(long, global = true, default_value = "f32", value_name = "f32|bf16")]
    compute: Compute,
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
    #[cfg(unix)]
    restore_default_sigpipe();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    #[cfg(unix)]
    if let Err(e) = clean_up_on_signals() {
        log::warn!("temporary files will not be removed on SIGINT/SIGTERM/SIGHUP: {e}");
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    NO_MMAP.store(cli.no_mmap, Ordering::Relaxed);
    match taskpack::runtime::set_compute(cli.compute) {
        Ok(effective) if effective != cli.compute => {
            eprintln!(
                "warning: --compute {} is not available on this CPU; using {effective}",
                cli.compute
            );
        }
        Ok(_) => {}
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
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

/// Rust starts programs with SIGPIPE ignored, so a `println!` into a closed pipe (`taskpack
/// inspect x.tpk | head -1`) panics. With the default action restored, the process ends
/// quietly at that write, as `cat` does. No temporary output is left by it: outputs are
/// committed before anything is printed about them (`files::write_atomic` is one call, a
/// compile prints its report after the rename).
#[cfg(unix)]
fn restore_default_sigpipe() {
    // SAFETY: runs first in `main`, before any other thread exists; it changes the disposition
    // of one signal and touches no memory of the program.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// On SIGINT, SIGTERM or SIGHUP: removes the temporary files of outputs being written
/// ([`taskpack::files::remove_temporary_files`]) and exits with status 128 + the signal number
/// (130, 143, 129), as a shell reports a process killed by it. The handler runs on its own
/// thread (signal-hook's iterator), not in signal context, so it may take locks and allocate.
#[cfg(unix)]
fn clean_up_on_signals() -> std::io::Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                taskpack::files::remove_temporary_files();
                std::process::exit(128 + signal);
            }
        })?;
    Ok(())
}

/// Reports a command-line parsing error on one line (`error: ...; see 'taskpack CMD --help'`)
/// with clap's exit status (2). `--help` and `--version` print as usual.
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        e.exit()
    }
    eprintln!("error: {}", usage_line(&e.render().to_string()));
    ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2))
}

/// The first paragraph of clap's rendered error joined on one line, plus where to get help
/// (the command named in clap's `Usage:` line).
fn usage_line(rendered: &str) -> String {
    let mut message = rendered
        .lines()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ");
    if let Some(rest) = message.strip_prefix("error:") {
        message = rest.trim_start().to_string();
    }
    let command: Vec<&str> = rendered
        .lines()
        .find_map(|l| l.trim().strip_prefix("Usage:"))
        .map(|u| {
            u.split_whitespace()
                .take_while(|w| !w.starts_with(['[', '<', '-']))
                .collect()
        })
        .unwrap_or_default();
    let command = if command.is_empty() {
        "taskpack".to_string()
    } else {
        command.join(" ")
    };
    format!("{message} (see '{command} --help')")
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
    // Refuse a special-file destination or the bundle itself before any work.
    taskpack::files::check_output(&a.output)?;
    taskpack::files::check_not_input(&a.output, [a.bundle.as_path()])?;
    let bundle = open_bundle(&a.bundle)?;
    let onnx = taskpack::export::export_task(&bundle, &a.task)?;
    taskpack::files::write_atomic(&a.output, &onnx)?;
    println!("wrote {} ({} bytes)", a.output.display(), onnx.len());
    Ok(())
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

    #[test]
    fn usage_errors_fit_on_one_line() {
        use clap::Parser;
        let e = match super::Cli::try_parse_from(["taskpack", "compile", "--base", "b.onnx"]) {
            Err(e) => e,
            Ok(_) => panic!("missing --task and -o must be an error"),
        };
        let line = super::usage_line(&e.render().to_string());
        assert!(!line.contains('\n'), "{line}");
        assert!(line.starts_with("the following required arguments were not provided:"));
        assert!(line.contains("--task <NAME=PATH>") && line.contains("--output <OUT.tpk>"));
        assert!(line.ends_with("(see 'taskpack compile --help')"), "{line}");
    }
}
