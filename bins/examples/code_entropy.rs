//! How much entropy coding could save on a bundle's per-task streams: the bytes of the block
//! codes of its residuals (per encoding) and of its masks on disk, against their empirical
//! (order-0) entropy, per section. Issue 11 asks whether coding the module streams is worth it;
//! `taskpack compile` prints the same figures in its report (bins/cli/entropy.rs computes
//! them), `mask_entropy` adds what masks of different tasks predict of each other. It measures
//! the bound; it codes nothing.
//!
//! ```sh
//! cargo run --release -p taskpack-cli --example code_entropy -- BUNDLE.tpk
//! ```

use anyhow::{Context, Result};
use taskpack::runtime::Bundle;

#[path = "../cli/entropy.rs"]
mod entropy;

fn main() -> Result<()> {
    let path = std::env::args()
        .nth(1)
        .context("usage: code_entropy BUNDLE.tpk")?;
    let bundle = Bundle::open(&path)?;
    let total = bundle.bytes().len() as f64;
    println!("{path}: {total} bytes");
    println!(
        "  {:<8}{:>9}{:>14}{:>14}{:>16}{:>10}{:>12}{:>12}",
        "stream",
        "sections",
        "stored bytes",
        "scale bytes",
        "order-0 bytes",
        "saving",
        "of bundle",
        "zero codes"
    );
    for s in entropy::streams(&bundle)? {
        println!(
            "  {:<8}{:>9}{:>14}{:>14}{:>16.0}{:>9.1}%{:>11.1}%{:>11.1}%",
            s.name,
            s.sections,
            s.stored,
            s.scales,
            s.entropy,
            100.0 * (1.0 - s.entropy / s.stored as f64),
            100.0 * (s.stored as f64 - s.entropy) / total,
            100.0 * s.zeros as f64 / s.codes.max(1) as f64
        );
    }
    Ok(())
}
