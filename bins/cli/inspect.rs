//! `taskpack inspect`: what a bundle holds, for people (table) and tools (`--json`).

use std::path::Path;

use anyhow::Result;
use taskpack::format::manifest::{TaskTensor, TensorStorage};

/// Prints a bundle's contents.
pub fn run(path: &Path, json: bool) -> Result<()> {
    let bundle = crate::open_bundle(path)?;
    let m = bundle.manifest();
    let sizes = bundle.sizes();
    if json {
        let mut value = serde_json::to_value(m)?;
        if let Some(obj) = value.as_object_mut() {
            obj.remove("sections");
            obj.insert("sizes".into(), serde_json::to_value(sizes)?);
            obj.insert(
                "file_bytes".into(),
                serde_json::Value::from(bundle.bytes().len() as u64),
            );
        }
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!("{} ({} bytes)", path.display(), bundle.bytes().len());
    println!("  compiler: {}", m.provenance.compiler);
    let p = &m.merge;
    println!(
        "  method: {}  alpha {}  density {}  gamma {}  min-tasks {}  seed {}  scale {:?}",
        p.method, p.alpha, p.density, p.gamma, p.min_tasks, p.seed, m.scale_mode
    );
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
    println!(
        "  {:<16}{:>6}{:>8}{:>8}{:>8}{:>12}{:>10}",
        "task", "graph", "lambda", "scale", "masks", "rel. error", "cosine"
    );
    for (i, t) in m.tasks.iter().enumerate() {
        let masks = t
            .tensors
            .iter()
            .filter(|x| matches!(x, TaskTensor::Merged { mask: Some(_), .. }))
            .count();
        let r = m.report.tasks.get(i);
        println!(
            "  {:<16}{:>6}{:>8}{:>8.3}{:>8}{:>12.4}{:>10.4}",
            t.name,
            t.graph,
            t.lambda.map_or("-".to_string(), |l| format!("{l}")),
            t.scale,
            masks,
            r.map_or(f64::NAN, |r| r.relative_error),
            r.map_or(f64::NAN, |r| r.cosine),
        );
    }
    println!("  sizes (bytes): base {}  delta {}  masks {}  scales {}  private {}  graphs {}  overhead {}  total {}",
        sizes.base, sizes.delta, sizes.masks, sizes.scales, sizes.private, sizes.graphs, sizes.overhead, sizes.total);
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
