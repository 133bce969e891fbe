//! How much entropy coding could save on a bundle's masks: their bytes on disk against the
//! empirical entropy of their bits — order 0 (each task's mask on its own, per tensor), and the
//! bit of task `t` given the bits of the same weight in tasks `0..t` (how far masks of
//! different tasks predict each other). Issue 11 asks whether such coding is worth it; this
//! measures the bound, it does not code anything.
//!
//! ```sh
//! cargo run --release -p taskpack-cli --example mask_entropy -- target/minilm-q8-shared.tpk
//! ```

use std::collections::HashMap;

use anyhow::{Context, Result};
use taskpack::format::TaskTensor;
use taskpack::runtime::Bundle;

fn main() -> Result<()> {
    let path = std::env::args()
        .nth(1)
        .context("usage: mask_entropy BUNDLE.tpk")?;
    let bundle = Bundle::open(&path)?;
    let manifest = bundle.manifest();
    let (mut stored, mut bits, mut ones) = (0u64, 0u64, 0u64);
    let (mut order0, mut conditional) = (0f64, 0f64);
    for (i, tensor) in manifest.tensors.iter().enumerate() {
        let len: u64 = tensor.shape.iter().product();
        let len = usize::try_from(len)?;
        // The masks of this tensor, task by task (a task without one uses every weight).
        let mut masks: Vec<&[u8]> = Vec::new();
        for task in &manifest.tasks {
            if let Some(TaskTensor::Merged { mask: Some(id), .. }) = task.tensors.get(i) {
                masks.push(bundle.section(*id)?);
            }
        }
        if masks.is_empty() {
            continue;
        }
        let bit = |m: &[u8], j: usize| m.get(j / 8).is_some_and(|b| b >> (j % 8) & 1 == 1);
        for (t, m) in masks.iter().enumerate() {
            stored += m.len() as u64;
            bits += len as u64;
            let set = (0..len).filter(|&j| bit(m, j)).count() as u64;
            ones += set;
            order0 += len as f64 * h(set as f64 / len as f64);
            // H(bit of task t | bits of tasks 0..t at the same weight), from the counts.
            let mut counts: HashMap<u64, [u64; 2]> = HashMap::new();
            for j in 0..len {
                let context = masks
                    .iter()
                    .take(t.min(16))
                    .enumerate()
                    .fold(0u64, |c, (k, p)| c | (u64::from(bit(p, j)) << k));
                if let Some(slot) = counts
                    .entry(context)
                    .or_default()
                    .get_mut(usize::from(bit(m, j)))
                {
                    *slot += 1;
                }
            }
            conditional += counts
                .values()
                .map(|[zero, one]| {
                    let n = (zero + one) as f64;
                    n * h(*one as f64 / n)
                })
                .sum::<f64>();
        }
    }
    let mb = |b: f64| b / 8.0 / 1e6;
    println!("{path}: {} bytes", bundle.bytes().len());
    println!(
        "masks: {:.2} MB stored, {:.1}% of the bundle; density {:.3}",
        stored as f64 / 1e6,
        100.0 * stored as f64 / bundle.bytes().len() as f64,
        ones as f64 / bits as f64
    );
    println!(
        "entropy: order 0 {:.2} MB ({:.3} bits per mask bit), given the earlier tasks' bits {:.2} MB ({:.3})",
        mb(order0),
        order0 / bits as f64,
        mb(conditional),
        conditional / bits as f64
    );
    Ok(())
}

/// Binary entropy in bits.
fn h(p: f64) -> f64 {
    if p <= 0.0 || p >= 1.0 {
        0.0
    } else {
        -(p * p.log2() + (1.0 - p) * (1.0 - p).log2())
    }
}
