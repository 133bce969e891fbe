//! How much entropy coding could save on a bundle's per-task residuals: the bytes of their
//! block codes on disk against the empirical (order-0) entropy of the codes, per section. Issue
//! 11 asks whether coding the module streams is worth it; `mask_entropy` measures the masks,
//! this the low-bit codes of `tvq`'s residuals. It measures the bound; it codes nothing.
//!
//! ```sh
//! cargo run --release -p taskpack-cli --example code_entropy -- BUNDLE.tpk
//! ```
//!
//! The codes are read from the bytes as docs/FORMAT.md §3 lays them out: after each block's
//! 4-byte scale, one little-endian bit string with code `j` in bits `b·j … b·j + b − 1`; for
//! `ternary`, base-3 digit `j mod 5` of byte `j / 5`.

use anyhow::{Context, Result};
use taskpack::format::{Encoding, TaskTensor};
use taskpack::runtime::Bundle;

fn main() -> Result<()> {
    let path = std::env::args()
        .nth(1)
        .context("usage: code_entropy BUNDLE.tpk")?;
    let bundle = Bundle::open(&path)?;
    let manifest = bundle.manifest();
    // Per encoding: (sections, code bytes, scale bytes, entropy-coded code bits).
    let mut totals: Vec<(Encoding, u64, u64, u64, f64)> = Vec::new();
    for (i, tensor) in manifest.tensors.iter().enumerate() {
        let len = usize::try_from(tensor.shape.iter().product::<u64>())?;
        for task in &manifest.tasks {
            let Some(TaskTensor::Residual { residual, .. }) = task.tensors.get(i) else {
                continue;
            };
            // Bits per code; 0 for ternary's base-3 digits.
            let bits_per_code = match residual.encoding {
                Encoding::Q8 => 8,
                Encoding::Q4 => 4,
                Encoding::Q3 => 3,
                Encoding::Q2 => 2,
                Encoding::Ternary => 0,
                _ => continue,
            };
            let (block, block_bytes) = residual.encoding.block();
            let (block, block_bytes) = (usize::try_from(block)?, usize::try_from(block_bytes)?);
            let bytes = bundle.section(residual.section)?;
            let mut counts = vec![
                0u64;
                if bits_per_code == 0 {
                    3
                } else {
                    1 << bits_per_code
                }
            ];
            for (b, chunk) in bytes.chunks(block_bytes).enumerate() {
                let codes = chunk.get(4..).unwrap_or_default();
                let in_block = block.min(len.saturating_sub(b * block));
                for j in 0..in_block {
                    if bits_per_code == 0 {
                        let digit = codes.get(j / 5).map_or(0, |&v| {
                            usize::from(v) / [1, 3, 9, 27, 81].get(j % 5).copied().unwrap_or(1) % 3
                        });
                        if let Some(c) = counts.get_mut(digit) {
                            *c += 1;
                        }
                        continue;
                    }
                    let mut code = 0usize;
                    for k in 0..bits_per_code {
                        let bit = j * bits_per_code + k;
                        if codes.get(bit / 8).is_some_and(|c| c >> (bit % 8) & 1 == 1) {
                            code |= 1 << k;
                        }
                    }
                    if let Some(c) = counts.get_mut(code) {
                        *c += 1;
                    }
                }
            }
            let n: u64 = counts.iter().sum();
            let entropy: f64 = counts
                .iter()
                .filter(|&&c| c > 0)
                .map(|&c| {
                    let p = c as f64 / n as f64;
                    -(c as f64) * p.log2()
                })
                .sum();
            let blocks = bytes.len() / block_bytes;
            let entry = match totals.iter_mut().find(|t| t.0 == residual.encoding) {
                Some(e) => e,
                None => {
                    totals.push((residual.encoding, 0, 0, 0, 0.0));
                    totals.last_mut().context("just pushed")?
                }
            };
            entry.1 += 1;
            entry.2 += (bytes.len() - 4 * blocks) as u64;
            entry.3 += 4 * blocks as u64;
            entry.4 += entropy;
        }
    }
    println!("{path}: {} bytes", bundle.bytes().len());
    println!(
        "  {:<8}{:>9}{:>14}{:>14}{:>16}{:>10}{:>12}",
        "codes", "sections", "code bytes", "scale bytes", "order-0 bytes", "saving", "of bundle"
    );
    for (e, sections, code, scales, entropy) in totals {
        let coded = entropy / 8.0;
        println!(
            "  {:<8}{:>9}{:>14}{:>14}{:>16.0}{:>9.1}%{:>11.1}%",
            e.name(),
            sections,
            code,
            scales,
            coded,
            100.0 * (1.0 - coded / code as f64),
            100.0 * (code as f64 - coded) / bundle.bytes().len() as f64
        );
    }
    Ok(())
}
