//! `taskpack inspect`: what a bundle holds, for people (table) and tools (`--json`).

use std::path::Path;

use anyhow::Result;
use taskpack::format::Manifest;
use taskpack::format::{TaskTensor, TensorStorage};
use taskpack::runtime::Bundle;

/// Prints a bundle's contents.
pub fn run(path: &Path, json: bool) -> Result<()> {
    let bundle = crate::open_bundle(path)?;
    if json {
        return print_json(&bundle);
    }
    let m = bundle.manifest();
    let sizes = bundle.sizes();
    println!("{} ({} bytes)", path.display(), bundle.bytes().len());
    println!("  compiler: {}", m.provenance.compiler);
    let p = &m.merge;
    println!(
        "  method: {}  alpha {}  density {}  gamma {}  min-tasks {}  seed {}",
        p.method, p.alpha, p.density, p.gamma, p.min_tasks, p.seed
    );
    if m.tokenizer.is_some() {
        println!("  tokenizer: {} bytes", sizes.tokenizer);
    }
    let merged = m
        .tensors
        .iter()
        .filter(|t| matches!(t.storage, TensorStorage::Merged { .. }))
        .count();
    println!(
        "  tensors: {} ({} merged, {} private), graphs: {}",
        m.tensors.len(),
        merged,
        m.tensors.len() - merged,
        m.graphs.len()
    );
    println!("  storage: {}", storage_summary(m));
    print_tasks(m);
    println!("  sizes (bytes): base {}  delta {}  masks {}  scales {}  private {}  residuals {}  graphs {}  tokenizer {}  overhead {}  total {}",
        sizes.base, sizes.delta, sizes.masks, sizes.scales, sizes.private, sizes.residuals, sizes.graphs, sizes.tokenizer, sizes.overhead, sizes.total);
    println!(
        "  inputs: {} bytes; bundle = {:.3}x",
        m.report.inputs_bytes,
        crate::compile_cmd::ratio(sizes.total as f64, m.report.inputs_bytes as f64)
    );
    for i in &m.provenance.inputs {
        println!(
            "  input {:<12} {} ({}, {} bytes, sha256 {})",
            i.role, i.file, i.format, i.bytes, i.sha256
        );
    }
    for p in &m.report.private {
        println!("  private: {p}");
    }
    Ok(())
}

/// The manifest as JSON, without the section table, with the sizes and the file's length.
fn print_json(bundle: &Bundle) -> Result<()> {
    let mut value = serde_json::to_value(bundle.manifest())?;
    if let Some(obj) = value.as_object_mut() {
        obj.remove("sections");
        obj.insert("sizes".into(), serde_json::to_value(bundle.sizes())?);
        obj.insert(
            "file_bytes".into(),
            serde_json::Value::from(bundle.bytes().len() as u64),
        );
    }
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(())
}

/// One line per task: graph, λ, global scale, scale mode, masks, residual storage (of its
/// block-coded residuals: a size budget may give tasks different ones), fidelity, calibration,
/// labels.
fn print_tasks(m: &Manifest) {
    println!(
        "  {:<16}{:>6}{:>8}{:>8}{:>8}{:>8}{:>9}{:>12}{:>10}{:>8}  labels",
        "task",
        "graph",
        "lambda",
        "g",
        "scale",
        "masks",
        "resid.",
        "rel. error",
        "cosine",
        "calib."
    );
    for (i, t) in m.tasks.iter().enumerate() {
        let masks = t
            .tensors
            .iter()
            .filter(|x| matches!(x.merged_parts(), Some((Some(_), ..))))
            .count();
        let mut residuals: Vec<&str> = t
            .tensors
            .iter()
            .filter_map(|x| x.merged_parts().and_then(|(_, _, r)| r))
            .filter(|r| r.encoding.is_quantized())
            .map(|r| r.encoding.name())
            .collect();
        residuals.sort_unstable();
        residuals.dedup();
        let residuals = if residuals.is_empty() {
            "-".to_string()
        } else {
            residuals.join("+")
        };
        let r = m.report.tasks.get(i);
        let agreement = r
            .and_then(|r| r.calibration.as_ref())
            .and_then(|c| {
                usize::try_from(c.chosen)
                    .ok()
                    .and_then(|i| c.candidates.get(i))
            })
            .map_or("-".to_string(), |c| format!("{:.3}", c.agreement));
        println!(
            "  {:<16}{:>6}{:>8}{:>8.3}{:>8}{:>8}{:>9}{:>12.4}{:>10.4}{:>8}  {}",
            t.name,
            t.graph,
            t.lambda.map_or("-".to_string(), |l| format!("{l}")),
            t.global_scale,
            t.scale_mode.to_string(),
            masks,
            residuals,
            r.map_or(f64::NAN, |r| r.relative_error),
            r.map_or(f64::NAN, |r| r.cosine),
            agreement,
            t.labels.join(", "),
        );
    }
}

/// How the merged tensors are stored, counted by encoding: `base q8 ×73, f32 ×22; delta q4 ×73,
/// f16 ×22; residuals q3 ×438, f16 ×132` (a merged tensor without delta has no delta entry;
/// residuals are counted over every task).
fn storage_summary(m: &taskpack::format::Manifest) -> String {
    use std::collections::BTreeMap;
    let (mut base, mut delta, mut residual) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
    for t in &m.tensors {
        if let TensorStorage::Merged { base: b, delta: d } = &t.storage {
            *base.entry(b.encoding.name()).or_insert(0usize) += 1;
            if let Some(d) = d {
                *delta.entry(d.encoding.name()).or_insert(0usize) += 1;
            }
        }
    }
    for module in m.tasks.iter().flat_map(|t| &t.tensors) {
        if let TaskTensor::Residual { residual: r, .. } = module {
            *residual.entry(r.encoding.name()).or_insert(0usize) += 1;
        }
    }
    let list = |counts: &BTreeMap<&str, usize>| {
        let parts: Vec<String> = counts.iter().map(|(e, n)| format!("{e} ×{n}")).collect();
        if parts.is_empty() {
            "none".to_string()
        } else {
            parts.join(", ")
        }
    };
    let mut summary = format!("base {}; delta {}", list(&base), list(&delta));
    if !residual.is_empty() {
        summary += &format!("; residuals {}", list(&residual));
    }
    summary
}
