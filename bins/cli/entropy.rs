//! How far a bundle's per-task streams are from their entropy: the bytes of the block codes of
//! the residuals (per encoding) and of the masks on disk, against their order-0 empirical
//! entropy. The compile report prints it next to the real size, so that whether an entropy
//! coder would pay is measured on every bundle (docs/METHODS.md, "Are the masks and codes worth
//! entropy coding?"); nothing is coded.
//!
//! Codes are read as docs/FORMAT.md §3 lays them out: after each block's 4-byte scale, one
//! little-endian bit string with code `j` in bits `b·j … b·j + b − 1`, or for `ternary`
//! base-3 digit `j mod 5` of byte `j / 5`. Mask bits are counted over the tensor's elements.

use anyhow::Result;
use taskpack::format::{Encoding, TaskTensor};
use taskpack::runtime::Bundle;

/// One stream kind of a bundle: residual codes of one encoding, or masks.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamEntropy {
    /// `ternary`, `q3`, …, or `masks`.
    pub name: &'static str,
    /// Sections of this kind.
    pub sections: u64,
    /// Bytes of codes (or mask bits) on disk, block scales excluded.
    pub stored: u64,
    /// Bytes of block scales (0 for masks).
    pub scales: u64,
    /// Order-0 entropy of the codes, per section, summed: bytes an ideal coder would need.
    pub entropy: f64,
    /// Codes (or mask bits) counted.
    pub codes: u64,
    /// Of those, the zero codes (a weight that does not move; a mask bit that is clear).
    pub zeros: u64,
}

/// The residual codes per encoding, then the masks (kinds the bundle has none of are left out).
pub fn streams(bundle: &Bundle) -> Result<Vec<StreamEntropy>> {
    let m = bundle.manifest();
    let mut out: Vec<StreamEntropy> = Vec::new();
    for (i, tensor) in m.tensors.iter().enumerate() {
        let len = usize::try_from(tensor.shape.iter().product::<u64>())?;
        for task in &m.tasks {
            let Some((mask, _, residual)) = task.tensors.get(i).and_then(TaskTensor::merged_parts)
            else {
                continue;
            };
            if let Some(mask) = mask {
                let bytes = bundle.section(mask)?;
                let ones: u64 = bytes.iter().map(|b| u64::from(b.count_ones())).sum();
                let counts = [len as u64 - ones.min(len as u64), ones];
                add(&mut out, "masks", (bytes.len() as u64, 0), &counts);
            }
            let Some(residual) = residual else { continue };
            let Some((counts, stored, scales)) =
                code_counts(residual.encoding, bundle.section(residual.section)?, len)
            else {
                continue;
            };
            add(
                &mut out,
                residual.encoding.name(),
                (stored, scales),
                &counts,
            );
        }
    }
    // Codes first, masks last.
    out.sort_by_key(|s| s.name == "masks");
    Ok(out)
}

/// Adds one section (its stored and scale bytes, and its symbol counts, code 0 first) to the
/// stream `name`.
fn add(
    out: &mut Vec<StreamEntropy>,
    name: &'static str,
    (stored, scales): (u64, u64),
    counts: &[u64],
) {
    let index = match out.iter().position(|s| s.name == name) {
        Some(i) => i,
        None => {
            out.push(StreamEntropy {
                name,
                sections: 0,
                stored: 0,
                scales: 0,
                entropy: 0.0,
                codes: 0,
                zeros: 0,
            });
            out.len() - 1
        }
    };
    if let Some(s) = out.get_mut(index) {
        s.sections += 1;
        s.stored += stored;
        s.scales += scales;
        s.entropy += bits(counts) / 8.0;
        s.codes += counts.iter().sum::<u64>();
        s.zeros += counts.first().copied().unwrap_or(0);
    }
}

/// `Σ −c · log2(c / n)`: the order-0 entropy in bits of a stream with these symbol counts.
fn bits(counts: &[u64]) -> f64 {
    let n: u64 = counts.iter().sum();
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| -(c as f64) * (c as f64 / n as f64).log2())
        .sum()
}

/// Symbol counts of the `len` codes of a block-coded section, its code bytes and its scale
/// bytes; `None` for a float encoding.
fn code_counts(encoding: Encoding, bytes: &[u8], len: usize) -> Option<(Vec<u64>, u64, u64)> {
    let bits_per_code = match encoding {
        Encoding::Q8 => 8,
        Encoding::Q4 => 4,
        Encoding::Q3 => 3,
        Encoding::Q2 => 2,
        // Base-3 digits, not bit fields.
        Encoding::Ternary => 0,
        _ => return None,
    };
    let (block, block_bytes) = encoding.block();
    let (block, block_bytes) = (
        usize::try_from(block).ok()?,
        usize::try_from(block_bytes).ok()?,
    );
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
        for j in 0..block.min(len.saturating_sub(b * block)) {
            let code = if bits_per_code == 0 {
                codes.get(j / 5).map_or(0, |&v| {
                    usize::from(v) / [1, 3, 9, 27, 81].get(j % 5).copied().unwrap_or(1) % 3
                })
            } else {
                (0..bits_per_code).fold(0usize, |code, k| {
                    let bit = j * bits_per_code + k;
                    let set = codes.get(bit / 8).is_some_and(|c| c >> (bit % 8) & 1 == 1);
                    code | usize::from(set) << k
                })
            };
            if let Some(c) = counts.get_mut(code) {
                *c += 1;
            }
        }
    }
    let blocks = bytes.len() / block_bytes;
    let scales = 4 * blocks as u64;
    Some((counts, bytes.len() as u64 - scales, scales))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_0_entropy_by_hand() {
        // Two symbols at 1/4 and 3/4 over 4 codes: 1·2 + 3·log2(4/3) = 3.245 bits.
        assert!((bits(&[1, 3]) - (2.0 + 3.0 * (4.0f64 / 3.0).log2())).abs() < 1e-12);
        assert_eq!(bits(&[5, 0, 0]), 0.0);
    }

    #[test]
    fn ternary_and_q2_codes_are_counted_by_hand() {
        // Ternary: byte 88 = digits 1, 2, 0, 0, 1 (codes 1, −1, 0, 0, 1); 7 elements, so the
        // second byte's first two digits count: 15 = 0, 2 → code 0, then −1.
        let mut t = 1.0f32.to_le_bytes().to_vec();
        t.extend([88, 15]);
        t.resize(30, 0);
        assert_eq!(
            code_counts(Encoding::Ternary, &t, 7),
            Some((vec![3, 2, 2], 26, 4))
        );
        // q2: byte 0b00_11_10_01 = codes 1, 2 (−2), 3 (−1), 0 as fields; 4 elements.
        let mut q = 1.0f32.to_le_bytes().to_vec();
        q.push(0b0011_1001);
        q.resize(20, 0);
        assert_eq!(
            code_counts(Encoding::Q2, &q, 4),
            Some((vec![1, 1, 1, 1], 16, 4))
        );
        assert_eq!(code_counts(Encoding::F16, &q, 4), None);
    }
}
