//! How a dense tensor's values are stored in a section: a float element type, or a
//! block-quantized integer code (`q8`, `q4`, `q3`, `q2`) with one `f32` scale per block.
//!
//! Block quantization is what lets a bundle be smaller than one int8 model per task: the base at
//! 8.5 bits per weight, the shared merged delta at 8.5 or 5. Each block of `B` consecutive
//! elements (flat row-major order, so a block may span two rows) stores its scale `s` and `B`
//! signed codes `q`; a reader decodes element `i` to `f32(q_i) · s`, one `f32` multiplication,
//! so every implementation gets the same bits (docs/FORMAT.md §3). Groups of 64 (`q8`) and 32
//! (`q4`) are what measured best on MiniLM's real weights and fine-tuned deltas (docs/METHODS.md,
//! "Storage types"): per-row scales err 35–50% more at the same size.
//!
//! `q3` and `q2` (format version 4) are for task vectors and per-task residuals, whose values
//! are small, many and close to zero: at three and two bits the step matters more than the
//! outliers, so their encoder *chooses* the scale that minimizes the block's squared error
//! instead of taking `max|x| / Q`, and uses every code of the two's complement range.
//!
//! `ternary` (format version 5) is the sparse sign module of T-Switch as a block code: each
//! weight of a task vector stays (`0`) or moves by `±s`, with one magnitude `s` per block of
//! 128. Its codes are packed five to a byte as base-3 digits (`3^5 = 243 ≤ 256`; 26 bytes per
//! block, 1.625 bits per code) whatever their density — about what a move bitmap plus a sign
//! per mover costs when 60% move, which is what the least-squares choice of movers gives on
//! real task vectors (docs/METHODS.md) — and the section length depends only on the element
//! count.
//!
//! The encoder is the compiler's choice and not normative: symmetric, `s = max|x| / Q` with
//! `Q = 127` (`q8`) or `7` (`q4`), `q = round(x / s)` ties to even, clamped to `±Q`; for `q3`
//! and `q2`, the scale of least squared error on a grid of clipped maxima, either sign, with
//! codes `−4 … 3` or `−2 … 1` ([`quantize_search`]); for `ternary`, the movers and magnitude of
//! least squared error ([`quantize_ternary`]).
//! [`Encoding::round_slice`] is exactly decode ∘ encode, so the compiler can take task vectors
//! from the base a reader will see.

use serde::{Deserialize, Serialize};

use crate::dtype::DType;

/// Storage of a dense tensor in a bundle section. The first three variants are the float
/// element types of [`DType`], with the same wire encoding; the others are block-quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Encoding {
    /// 32-bit float.
    F32,
    /// IEEE 754 half precision.
    F16,
    /// bfloat16.
    BF16,
    /// Blocks of 64 elements: an `f32` scale, then 64 signed 8-bit codes (68 bytes).
    Q8,
    /// Blocks of 32 elements: an `f32` scale, then 16 bytes of signed 4-bit codes, element `2k`
    /// in the low nibble of byte `k` (20 bytes).
    Q4,
    /// Blocks of 64 elements: an `f32` scale, then 24 bytes of signed 3-bit codes, eight codes
    /// per three bytes (28 bytes). Format version 4.
    Q3,
    /// Blocks of 64 elements: an `f32` scale, then 16 bytes of signed 2-bit codes, element `4k + j`
    /// in bits `2j..2j + 2` of byte `k` (20 bytes). Format version 4.
    Q2,
    /// Blocks of 128 elements: an `f32` scale, then 26 bytes of ternary codes `−1, 0, 1`, five
    /// per byte as the base-3 digits of the byte's value, element `5k + i` in digit `i` of byte
    /// `k` (30 bytes, 1.875 bits per element). Format version 5.
    Ternary,
}

/// Elements per `q8` block.
pub(crate) const Q8_BLOCK: usize = 64;
/// Elements per `q4` block.
pub(crate) const Q4_BLOCK: usize = 32;
/// Elements per `q3` block.
pub(crate) const Q3_BLOCK: usize = 64;
/// Elements per `q2` block.
pub(crate) const Q2_BLOCK: usize = 64;
/// Elements per `ternary` block.
pub(crate) const TERNARY_BLOCK: usize = 128;
/// Code bytes per `ternary` block: five codes per byte, the last byte holding three.
const TERNARY_CODE_BYTES: usize = TERNARY_BLOCK.div_ceil(5);

impl Encoding {
    /// Every encoding, in wire order.
    pub const ALL: [Encoding; 8] = [
        Encoding::F32,
        Encoding::F16,
        Encoding::BF16,
        Encoding::Q8,
        Encoding::Q4,
        Encoding::Q3,
        Encoding::Q2,
        Encoding::Ternary,
    ];

    /// The float element type, for the first three variants.
    pub const fn float(self) -> Option<DType> {
        match self {
            Encoding::F32 => Some(DType::F32),
            Encoding::F16 => Some(DType::F16),
            Encoding::BF16 => Some(DType::BF16),
            Encoding::Q8 | Encoding::Q4 | Encoding::Q3 | Encoding::Q2 | Encoding::Ternary => None,
        }
    }

    /// The first format version that has this encoding: 2 for the float types, 3 for `q8` and
    /// `q4`, 4 for `q3` and `q2`, 5 for `ternary` (rule 36).
    pub const fn since_version(self) -> u32 {
        match self {
            Encoding::F32 | Encoding::F16 | Encoding::BF16 => 2,
            Encoding::Q8 | Encoding::Q4 => 3,
            Encoding::Q3 | Encoding::Q2 => 4,
            Encoding::Ternary => 5,
        }
    }

    /// Whether this is a block-quantized encoding.
    pub const fn is_quantized(self) -> bool {
        self.float().is_none()
    }

    /// `(elements, bytes)` of one block: `(1, size)` for a float type. Byte lengths are computed
    /// from this by `format::layout::encoded_bytes` only.
    pub const fn block(self) -> (u64, u64) {
        match self {
            Encoding::F32 => (1, 4),
            Encoding::F16 | Encoding::BF16 => (1, 2),
            Encoding::Q8 => (Q8_BLOCK as u64, 4 + Q8_BLOCK as u64),
            Encoding::Q4 => (Q4_BLOCK as u64, 4 + Q4_BLOCK as u64 / 2),
            Encoding::Q3 => (Q3_BLOCK as u64, 4 + Q3_BLOCK as u64 * 3 / 8),
            Encoding::Q2 => (Q2_BLOCK as u64, 4 + Q2_BLOCK as u64 / 4),
            Encoding::Ternary => (TERNARY_BLOCK as u64, 4 + TERNARY_CODE_BYTES as u64),
        }
    }

    /// Lower-case name, as used on the command line and in reports.
    pub const fn name(self) -> &'static str {
        match self {
            Encoding::F32 => "f32",
            Encoding::F16 => "f16",
            Encoding::BF16 => "bf16",
            Encoding::Q8 => "q8",
            Encoding::Q4 => "q4",
            Encoding::Q3 => "q3",
            Encoding::Q2 => "q2",
            Encoding::Ternary => "ternary",
        }
    }

    /// Appends `values` in this encoding to `out`; a partial last block is padded with zero codes.
    pub fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        match (self.float(), self) {
            (Some(dtype), _) => dtype.encode(values, out),
            (None, Encoding::Q4) => {
                for block in values.chunks(Q4_BLOCK) {
                    let (s, codes) = quantize::<Q4_BLOCK>(block, 7.0);
                    out.extend_from_slice(&s.to_le_bytes());
                    out.extend(
                        codes
                            .chunks_exact(2)
                            .map(|p| (p[0] as u8 & 0x0f) | ((p[1] as u8) << 4)),
                    );
                }
            }
            (None, Encoding::Q3) => {
                for block in values.chunks(Q3_BLOCK) {
                    let (s, codes) = quantize_q3(block);
                    out.extend_from_slice(&s.to_le_bytes());
                    for eight in codes.chunks_exact(8) {
                        let bits = eight.iter().enumerate().fold(0u32, |acc, (j, &q)| {
                            acc | (u32::from(q as u8 & 7) << (3 * j))
                        });
                        out.extend_from_slice(&bits.to_le_bytes()[..3]);
                    }
                }
            }
            (None, Encoding::Q2) => {
                for block in values.chunks(Q2_BLOCK) {
                    let (s, codes) = quantize_q2(block);
                    out.extend_from_slice(&s.to_le_bytes());
                    out.extend(codes.chunks_exact(4).map(|four| {
                        four.iter()
                            .enumerate()
                            .fold(0u8, |acc, (j, &q)| acc | ((q as u8 & 3) << (2 * j)))
                    }));
                }
            }
            (None, Encoding::Ternary) => {
                for block in values.chunks(TERNARY_BLOCK) {
                    let (s, codes) = quantize_ternary(block);
                    out.extend_from_slice(&s.to_le_bytes());
                    out.extend(codes.chunks(5).map(|five| {
                        five.iter()
                            .rev()
                            .fold(0u8, |acc, &q| acc * 3 + ternary_digit(q))
                    }));
                }
            }
            (None, _) => {
                for block in values.chunks(Q8_BLOCK) {
                    let (s, codes) = quantize::<Q8_BLOCK>(block, 127.0);
                    out.extend_from_slice(&s.to_le_bytes());
                    out.extend(codes.iter().map(|&q| q as u8));
                }
            }
        }
    }

    /// Decodes `out.len()` elements from `bytes`, which hold at least as many (whole blocks;
    /// callers check lengths with `format::layout::encoded_bytes`). Elements past the end of
    /// `bytes` are left as they are.
    pub(crate) fn decode_slice(self, bytes: &[u8], out: &mut [f32]) {
        match (self.float(), self) {
            (Some(dtype), _) => dtype.decode_slice(bytes, out),
            (None, Encoding::Q4) => {
                for (o, b) in out.chunks_mut(Q4_BLOCK).zip(bytes.chunks(4 + Q4_BLOCK / 2)) {
                    let Some((s, codes)) = split_scale(b) else {
                        return;
                    };
                    // Whole blocks through fixed-size arrays, which the compiler unrolls and
                    // vectorizes; the last, partial block element by element.
                    match (
                        <&mut [f32; Q4_BLOCK]>::try_from(&mut *o),
                        codes.first_chunk(),
                    ) {
                        (Ok(o), Some(codes)) => decode_q4_block(o, codes, s),
                        _ => {
                            for (pair, &c) in o.chunks_mut(2).zip(codes) {
                                for (o, q) in pair.iter_mut().zip(nibbles(c)) {
                                    *o = f32::from(q) * s;
                                }
                            }
                        }
                    }
                }
            }
            (None, Encoding::Q3) => decode_packed::<Q3_BLOCK, 3>(bytes, out),
            (None, Encoding::Q2) => decode_packed::<Q2_BLOCK, 2>(bytes, out),
            (None, Encoding::Ternary) => decode_ternary(bytes, out),
            (None, _) => {
                for (o, b) in out.chunks_mut(Q8_BLOCK).zip(bytes.chunks(4 + Q8_BLOCK)) {
                    let Some((s, codes)) = split_scale(b) else {
                        return;
                    };
                    match (
                        <&mut [f32; Q8_BLOCK]>::try_from(&mut *o),
                        codes.first_chunk(),
                    ) {
                        (Ok(o), Some(codes)) => decode_q8_block(o, codes, s),
                        _ => {
                            for (o, &c) in o.iter_mut().zip(codes) {
                                *o = f32::from(c as i8) * s;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Replaces every value by what a reader decodes after [`Encoding::encode`]: the rounding of
    /// storage, applied in place.
    pub fn round_slice(self, values: &mut [f32]) {
        match (self.float(), self) {
            (Some(dtype), _) => dtype.round_slice(values),
            // Decoding a nibble sign-extends it; q4 codes are within ±7, so that is `q` itself.
            (None, Encoding::Q4) => round_blocks::<Q4_BLOCK>(values, 7.0),
            (None, Encoding::Q3) => round_with::<Q3_BLOCK>(values, quantize_q3),
            (None, Encoding::Q2) => round_with::<Q2_BLOCK>(values, quantize_q2),
            (None, Encoding::Ternary) => round_with::<TERNARY_BLOCK>(values, quantize_ternary),
            (None, _) => round_blocks::<Q8_BLOCK>(values, 127.0),
        }
    }

    /// Index of the first block whose scale is not finite, if any (rule V7). Float encodings
    /// have no scales.
    pub(crate) fn first_bad_scale(self, bytes: &[u8]) -> Option<u64> {
        let (_, block_bytes) = self.block();
        if !self.is_quantized() {
            return None;
        }
        bytes
            .chunks(block_bytes as usize)
            .position(|b| split_scale(b).is_some_and(|(s, _)| !s.is_finite()))
            .map(|i| i as u64)
    }
}

impl From<DType> for Encoding {
    fn from(dtype: DType) -> Encoding {
        match dtype {
            DType::F32 => Encoding::F32,
            DType::F16 => Encoding::F16,
            DType::BF16 => Encoding::BF16,
        }
    }
}

/// The two codes of a `q4` byte, low nibble first, sign-extended (shifted to the top of an
/// `i8`, then arithmetically back).
#[inline(always)]
fn nibbles(c: u8) -> [i8; 2] {
    [((c << 4) as i8) >> 4, (c as i8) >> 4]
}

/// One whole `q8` block: `o[j] = f32(q_j) · s`.
#[inline(always)]
fn decode_q8_block(o: &mut [f32; Q8_BLOCK], codes: &[u8; Q8_BLOCK], s: f32) {
    for (o, &c) in o.iter_mut().zip(codes) {
        *o = f32::from(c as i8) * s;
    }
}

/// One whole `q4` block: `o[2k], o[2k + 1]` from the nibbles of byte `k`, times `s`.
#[inline(always)]
fn decode_q4_block(o: &mut [f32; Q4_BLOCK], codes: &[u8; Q4_BLOCK / 2], s: f32) {
    let mut q = [0f32; Q4_BLOCK];
    for (pair, &c) in q.chunks_exact_mut(2).zip(codes) {
        if let ([a, b], [lo, hi]) = (pair, nibbles(c)) {
            *a = f32::from(lo);
            *b = f32::from(hi);
        }
    }
    for (o, q) in o.iter_mut().zip(q) {
        *o = q * s;
    }
}

/// A block's scale (its first four bytes, `f32` little-endian) and its code bytes.
fn split_scale(block: &[u8]) -> Option<(f32, &[u8])> {
    let (s, codes) = block.split_first_chunk::<4>()?;
    Some((f32::from_le_bytes(*s), codes))
}

/// Every block of `B` values replaced by its decoded codes, `f32(q) · s` ([`quantize`]).
fn round_blocks<const B: usize>(values: &mut [f32], q_max: f32) {
    round_with::<B>(values, |block| quantize::<B>(block, q_max));
}

/// Every block of `B` values replaced by the decoding of the codes `quantize` gives it.
fn round_with<const B: usize>(values: &mut [f32], quantize: impl Fn(&[f32]) -> (f32, [i8; B])) {
    for block in values.chunks_mut(B) {
        let (s, codes) = quantize(block);
        block
            .iter_mut()
            .zip(codes)
            .for_each(|(v, q)| *v = f32::from(q) * s);
    }
}

/// Decodes the bit-packed blocks of `q3` (`BITS = 3`) or `q2` (`BITS = 2`): after the block's
/// scale, code `j` occupies bits `BITS·j .. BITS·j + BITS` of the code bytes read as one
/// little-endian integer, a two's complement `BITS`-bit number. Groups of `8 / gcd` codes fill
/// whole bytes (eight 3-bit codes in three bytes, four 2-bit codes in one), so a block decodes
/// group by group. Elements past the end of `bytes` are left as they are.
fn decode_packed<const B: usize, const BITS: usize>(bytes: &[u8], out: &mut [f32]) {
    // Codes per group and bytes per group: the smallest whole number of bytes.
    let (per_group, group_bytes) = if BITS == 3 { (8, 3) } else { (4, 1) };
    let block_bytes = 4 + B * BITS / 8;
    for (o, b) in out.chunks_mut(B).zip(bytes.chunks(block_bytes)) {
        let Some((s, codes)) = split_scale(b) else {
            return;
        };
        // Whole blocks through fixed-size arrays (unrolled, vectorized); the last, partial
        // block by the general loop below. (Both codes have blocks of 64.)
        const _: () = assert!(Q3_BLOCK == 64 && Q2_BLOCK == 64);
        if let Ok(o) = <&mut [f32; 64]>::try_from(&mut *o) {
            match (BITS, codes.first_chunk::<24>(), codes.first_chunk::<16>()) {
                (3, Some(codes), _) => {
                    decode_q3_block(o, codes, s);
                    continue;
                }
                (2, _, Some(codes)) => {
                    decode_q2_block(o, codes, s);
                    continue;
                }
                _ => {}
            }
        }
        let mut q = [0f32; B];
        for (group, g) in q.chunks_mut(per_group).zip(codes.chunks(group_bytes)) {
            let bits = g
                .iter()
                .enumerate()
                .fold(0u32, |acc, (k, &byte)| acc | (u32::from(byte) << (8 * k)));
            for (j, q) in group.iter_mut().enumerate() {
                // Shift the code to the top of an i32, then arithmetically back: sign extension.
                let code = ((bits >> (BITS * j)) << (32 - BITS)) as i32 >> (32 - BITS);
                *q = code as f32;
            }
        }
        for (o, q) in o.iter_mut().zip(q) {
            *o = q * s;
        }
    }
}

/// One whole `q3` block: eight codes per three bytes (a little-endian 24-bit group), each
/// sign-extended by shifting its field to the top of an `i32` and back, times `s`.
#[inline(always)]
fn decode_q3_block(o: &mut [f32; Q3_BLOCK], codes: &[u8; Q3_BLOCK * 3 / 8], s: f32) {
    let mut q = [0f32; Q3_BLOCK];
    for (eight, g) in q.chunks_exact_mut(8).zip(codes.chunks_exact(3)) {
        if let ([a, b, c], Ok(eight)) = (g, <&mut [f32; 8]>::try_from(eight)) {
            let v = u32::from(*a) | (u32::from(*b) << 8) | (u32::from(*c) << 16);
            for (j, q) in eight.iter_mut().enumerate() {
                *q = ((v << (29 - 3 * j)) as i32 >> 29) as f32;
            }
        }
    }
    for (o, q) in o.iter_mut().zip(q) {
        *o = q * s;
    }
}

/// One whole `q2` block: four codes per byte, each sign-extended through an `i8`, times `s`.
#[inline(always)]
fn decode_q2_block(o: &mut [f32; Q2_BLOCK], codes: &[u8; Q2_BLOCK / 4], s: f32) {
    let mut q = [0f32; Q2_BLOCK];
    for (four, &c) in q.chunks_exact_mut(4).zip(codes) {
        if let Ok(four) = <&mut [f32; 4]>::try_from(four) {
            for (j, q) in four.iter_mut().enumerate() {
                *q = f32::from(((c << (6 - 2 * j)) as i8) >> 6);
            }
        }
    }
    for (o, q) in o.iter_mut().zip(q) {
        *o = q * s;
    }
}

/// The ternary codes of every byte value: element `i` is base-3 digit `i` (least significant
/// first) of the byte, `⌊v / 3^i⌋ mod 3`, read as `0 → 0`, `1 → 1`, `2 → −1`. Bytes above 242
/// (`3^5 − 1`), which no encoder writes, decode by the same rule.
const TERNARY_CODES: [[f32; 5]; 256] = {
    let mut table = [[0f32; 5]; 256];
    let mut v = 0;
    while v < 256 {
        let mut rest = v;
        let mut i = 0;
        while i < 5 {
            table[v][i] = match rest % 3 {
                0 => 0.0,
                1 => 1.0,
                _ => -1.0,
            };
            rest /= 3;
            i += 1;
        }
        v += 1;
    }
    table
};

/// The base-3 digit of a ternary code: `0 → 0`, `1 → 1`, `−1 → 2`.
fn ternary_digit(q: i8) -> u8 {
    match q {
        1 => 1,
        -1 => 2,
        _ => 0,
    }
}

/// Decodes `ternary` blocks: after the block's scale, five codes per byte ([`TERNARY_CODES`]),
/// each times `s`. Elements past the end of `bytes` are left as they are.
fn decode_ternary(bytes: &[u8], out: &mut [f32]) {
    for (o, b) in out
        .chunks_mut(TERNARY_BLOCK)
        .zip(bytes.chunks(4 + TERNARY_CODE_BYTES))
    {
        let Some((s, codes)) = split_scale(b) else {
            return;
        };
        for (five, &c) in o.chunks_mut(5).zip(codes) {
            for (o, q) in five.iter_mut().zip(TERNARY_CODES[usize::from(c)]) {
                *o = q * s;
            }
        }
    }
}

/// The `ternary` encoder's choice for one block: the codes and scale of least squared error.
/// For a given set `S` of non-zero codes the best codes are the signs and the best scale the mean
/// `|x|` over `S`, leaving the error `Σx² − (Σ_S |x|)² / |S|`; so `S` is the `k` largest `|x|`
/// for the `k` that maximizes `(Σ_S |x|)² / k` (the first such `k`, in order of decreasing `|x|`,
/// ties by position). A block of zeros, or with a non-finite value, gets `s = 0`.
fn quantize_ternary(block: &[f32]) -> (f32, [i8; TERNARY_BLOCK]) {
    let mut codes = [0i8; TERNARY_BLOCK];
    if block.iter().any(|v| !v.is_finite()) {
        return (0.0, codes);
    }
    // (|x|, position), largest first, ties by position: no allocation per block.
    let mut order = [(0f32, 0usize); TERNARY_BLOCK];
    for (i, (o, v)) in order.iter_mut().zip(block).enumerate() {
        *o = (v.abs(), i);
    }
    let order = order.get_mut(..block.len()).unwrap_or_default();
    order.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let (mut sum, mut best, mut best_k, mut best_sum) = (0f64, 0f64, 0usize, 0f64);
    for (k, &(a, _)) in order.iter().enumerate() {
        sum += f64::from(a);
        let gain = sum * sum / (k + 1) as f64;
        if gain > best {
            (best, best_k, best_sum) = (gain, k + 1, sum);
        }
    }
    if best_k == 0 {
        return (0.0, codes);
    }
    for &(_, i) in order.iter().take(best_k) {
        if let (Some(q), Some(&v)) = (codes.get_mut(i), block.get(i)) {
            *q = if v > 0.0 { 1 } else { -1 };
        }
    }
    ((best_sum / best_k as f64) as f32, codes)
}

/// The `q3` encoder's choice for one block ([`quantize_search`] with 3-bit codes).
fn quantize_q3(block: &[f32]) -> (f32, [i8; Q3_BLOCK]) {
    quantize_search::<Q3_BLOCK>(block, 4)
}

/// The `q2` encoder's choice for one block ([`quantize_search`] with 2-bit codes).
fn quantize_q2(block: &[f32]) -> (f32, [i8; Q2_BLOCK]) {
    quantize_search::<Q2_BLOCK>(block, 2)
}

/// The least-squares choice among a grid of scales for codes `−l … l − 1` (two's complement of
/// `log2(2l)` bits): `s = ± c · max|x| / l` for `c` in `0.5, 0.55, …, 1`, then `1.1, 1.2, …`
/// below `l / (l − 1)`, and `l / (l − 1)` itself (the plain rule `s = max|x| / (l − 1)`, at which
/// the top code `l − 1` reaches the maximum), both signs — a
/// negative scale puts the extra code `−l` on the side of the positive values —, codes
/// `x · (1 / s)` clamped to the range and rounded, ties to even. The first candidate with the least
/// squared error wins. At three and two bits, clipping the few large values buys a finer step
/// for the many small ones, and the spare code of a two's complement range is worth a level.
fn quantize_search<const B: usize>(block: &[f32], l: i8) -> (f32, [i8; B]) {
    let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (lo, hi) = (-f32::from(l), f32::from(l - 1));
    let top = f32::from(l) / f32::from(l - 1);
    let clips = (0..=10u8)
        .map(|i| 0.5 + 0.05 * f32::from(i))
        .chain(
            (1..10u8)
                .map(|i| 1.0 + 0.1 * f32::from(i))
                .take_while(|&c| c < top),
        )
        .chain([top]);
    if max == 0.0 || !max.is_finite() {
        return (0.0, [0i8; B]);
    }
    // The block padded with zeros to `B` values, whose codes are 0 and errors 0 at any scale.
    let mut x = [0f32; B];
    for (x, &v) in x.iter_mut().zip(block) {
        *x = v;
    }
    let (mut best_err, mut best_s) = (f32::INFINITY, 0f32);
    for c in clips {
        for sign in [1f32, -1.0] {
            let s = sign * c * max / f32::from(l);
            let inv = 1.0 / s;
            // Eight partial sums, so that the loop vectorizes.
            let mut err = [0f32; 8];
            for lane in x.chunks_exact(8) {
                for (e, &v) in err.iter_mut().zip(lane) {
                    let d = v - round_small((v * inv).clamp(lo, hi)) * s;
                    *e += d * d;
                }
            }
            let err: f32 = err.iter().sum();
            if err < best_err {
                (best_err, best_s) = (err, s);
            }
        }
    }
    let inv = 1.0 / best_s;
    let mut codes = [0i8; B];
    for (q, &v) in codes.iter_mut().zip(&x) {
        *q = round_small((v * inv).clamp(lo, hi)) as i8;
    }
    (best_s, codes)
}

/// `y.round_ties_even()` for `|y| ≤ 2²²`, by adding and subtracting `1.5 · 2²³`: the addition
/// rounds to an integer, ties to even, in the default rounding mode. Plain SSE2 arithmetic,
/// where `round_ties_even` is a library call on targets without SSE4.1 — this is the inner loop
/// of the `q3` / `q2` scale search.
#[inline(always)]
fn round_small(y: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (y + MAGIC) - MAGIC
}

/// The encoder's choice for one block of at most `B` values: `s = max|x| / q_max` and
/// `q = round(x / s)` (ties to even) clamped to `±q_max`; codes past the block's values are 0.
/// A block of zeros (or with a non-finite maximum, which compile never produces) gets `s = 0`.
fn quantize<const B: usize>(block: &[f32], q_max: f32) -> (f32, [i8; B]) {
    let mut codes = [0i8; B];
    let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let s = max / q_max;
    if s == 0.0 || !s.is_finite() {
        return (0.0, codes);
    }
    for (q, v) in codes.iter_mut().zip(block) {
        // In range by construction (|x| ≤ max); the clamp only guards rounding at the edge.
        *q = (v / s).round_ties_even().clamp(-q_max, q_max) as i8;
    }
    (s, codes)
}

impl std::fmt::Display for Encoding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Encoding {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Encoding::ALL
            .into_iter()
            .find(|e| e.name() == s)
            .ok_or_else(|| {
                format!("unknown storage type {s:?} (expected f32, f16, bf16, q8, q4, q3, q2 or ternary)")
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(e: Encoding, bytes: &[u8], n: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; n];
        e.decode_slice(bytes, &mut out);
        out
    }

    #[test]
    fn q8_block_worked_by_hand() {
        // Binary fractions, so every step is exact: max |x| = 127/128, s = 1/128, codes x · 128.
        let x = [
            127.0f32 / 128.0,
            -63.5 / 128.0,
            1.5 / 128.0,
            0.5 / 128.0,
            0.0,
        ];
        let s = 1.0f32 / 128.0;
        let mut bytes = Vec::new();
        Encoding::Q8.encode(&x, &mut bytes);
        assert_eq!(bytes.len(), 68, "one block, padded to 64 codes");
        assert_eq!(bytes[..4], s.to_le_bytes());
        // -63.5 → -64, 1.5 → 2, 0.5 → 0 (ties to even).
        assert_eq!(bytes[4..9], [127, (-64i8) as u8, 2, 0, 0]);
        assert!(bytes[9..].iter().all(|&b| b == 0), "padding codes are zero");
        assert_eq!(
            decode(Encoding::Q8, &bytes, 5),
            vec![127.0 * s, -64.0 * s, 2.0 * s, 0.0, 0.0]
        );
    }

    #[test]
    fn q4_nibbles_and_sign_extension_by_hand() {
        // max |x| = 7/8, s = 1/8: codes 7, -7, 3, -1, then padding zeros.
        let x = [0.875f32, -0.875, 0.375, -0.125];
        let s = 0.125f32;
        let mut bytes = Vec::new();
        Encoding::Q4.encode(&x, &mut bytes);
        assert_eq!(bytes.len(), 20);
        assert_eq!(bytes[..4], s.to_le_bytes());
        // byte 0: low nibble 7 (0x7), high nibble -7 (0x9); byte 1: 3 (0x3) and -1 (0xf).
        assert_eq!(bytes[4..6], [0x97, 0xf3]);
        assert_eq!(
            decode(Encoding::Q4, &bytes, 4),
            vec![7.0 * s, -7.0 * s, 3.0 * s, -s]
        );
        // A reader decodes -8 (0x8), which this encoder never writes, as -8 · s.
        let hostile = [s.to_le_bytes().as_slice(), &[0x08; 16]].concat();
        assert_eq!(decode(Encoding::Q4, &hostile, 2), vec![-8.0 * s, 0.0]);
    }

    #[test]
    fn round_slice_is_decode_of_encode_across_blocks() {
        // 200 values: three full q8 blocks and a partial one; six full q4 blocks and a partial.
        let x: Vec<f32> = (0..200)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) * 1e-3 * (1 + i / 64) as f32)
            .collect();
        for e in Encoding::ALL {
            let mut bytes = Vec::new();
            e.encode(&x, &mut bytes);
            let (b, bb) = e.block();
            assert_eq!(bytes.len() as u64, (x.len() as u64).div_ceil(b) * bb, "{e}");
            let mut rounded = x.clone();
            e.round_slice(&mut rounded);
            assert_eq!(decode(e, &bytes, x.len()), rounded, "{e}");
        }
    }

    #[test]
    fn quantization_error_is_within_half_a_step() {
        let x: Vec<f32> = (0..128).map(|i| (i as f32 * 0.37).sin()).collect();
        for (e, q_max, block) in [
            (Encoding::Q8, 127.0, Q8_BLOCK),
            (Encoding::Q4, 7.0, Q4_BLOCK),
        ] {
            let mut r = x.clone();
            e.round_slice(&mut r);
            for (xb, rb) in x.chunks(block).zip(r.chunks(block)) {
                let step = xb.iter().fold(0f32, |m, v| m.max(v.abs())) / q_max;
                for (a, b) in xb.iter().zip(rb) {
                    assert!((a - b).abs() <= step * 0.5 + 1e-7, "{e}: {a} vs {b}");
                }
            }
        }
    }

    fn hex(text: &str) -> Vec<u8> {
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Every quantized encoding decodes random bytes (hostile codes, scales of both signs,
    /// partial last blocks) exactly as the numpy reader of tests/reference/encoding_reference.py,
    /// written from docs/FORMAT.md §3 alone, bit for bit.
    #[test]
    fn decoding_matches_numpy_reference_bit_for_bit() {
        let text = include_str!("../tests/data/encoding_expectations.txt");
        let mut lines = text.lines().filter(|l| !l.starts_with('#'));
        let mut cases = 0;
        while let Some(case) = lines.next() {
            let mut words = case.split(' ');
            assert_eq!(words.next(), Some("case"));
            let e: Encoding = words.next().unwrap().parse().unwrap();
            let n: usize = words.next().unwrap().parse().unwrap();
            let bytes = hex(lines.next().unwrap().strip_prefix("bytes ").unwrap());
            let want: Vec<u32> = lines
                .next()
                .unwrap()
                .strip_prefix("values ")
                .unwrap()
                .split(' ')
                .map(|h| u32::from_le_bytes(hex(h).try_into().unwrap()))
                .collect();
            let (b, bb) = e.block();
            assert_eq!(bytes.len() as u64, (n as u64).div_ceil(b) * bb, "{e} {n}");
            let got: Vec<u32> = decode(e, &bytes, n).iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "{e}, {n} elements");
            cases += 1;
        }
        assert_eq!(cases, 20, "four cases per quantized encoding");
    }

    #[test]
    fn q3_and_q2_packing_by_hand() {
        // q3: codes 3, -4, 1, -1, 0, 2, -2, -3 → 3-bit fields 011 100 001 111 000 010 110 101,
        // field j at bits 3j of a 24-bit little-endian integer:
        // 0b101_110_010_000_111_001_100_011 = 0xb90e63 → bytes 63 0e b9.
        let q3 = [3i32, -4, 1, -1, 0, 2, -2, -3];
        let int = q3
            .iter()
            .enumerate()
            .fold(0u32, |acc, (j, &q)| acc | (((q & 7) as u32) << (3 * j)));
        assert_eq!(int, 0b101_110_010_000_111_001_100_011);
        let s = 0.5f32;
        let mut block = s.to_le_bytes().to_vec();
        block.extend_from_slice(&int.to_le_bytes()[..3]);
        block.resize(28, 0);
        let want: Vec<f32> = q3.iter().map(|&q| q as f32 * s).collect();
        assert_eq!(decode(Encoding::Q3, &block, 8), want);
        assert_eq!(block[4..7], [0x63, 0x0e, 0xb9]);

        // q2: codes 1, -2, -1, 0 → fields 01 10 11 00 at bits 0, 2, 4, 6 of byte 0 = 0b00_11_10_01.
        let mut block = (-0.25f32).to_le_bytes().to_vec();
        block.push(0b0011_1001);
        block.resize(20, 0);
        assert_eq!(
            decode(Encoding::Q2, &block, 5),
            vec![-0.25, 0.5, 0.25, -0.0, -0.0]
        );
        // The encoder writes what it decodes to.
        let x = [0.3f32, -0.61, 0.0, 0.3, -0.3, 0.9];
        for e in [Encoding::Q3, Encoding::Q2] {
            let mut bytes = Vec::new();
            e.encode(&x, &mut bytes);
            let mut r = x.to_vec();
            e.round_slice(&mut r);
            assert_eq!(decode(e, &bytes, x.len()), r, "{e}");
        }
    }

    #[test]
    fn scale_search_errs_no_more_than_the_plain_maximum_rule() {
        // The q3 / q2 search includes s = max / (l − 1) (c = l / (l − 1)), the plain symmetric
        // rule, so it can only do better; on a heavy-tailed block it does strictly better.
        let x: Vec<f32> = (0..256)
            .map(|i| {
                let u = ((i * 7919 % 256) as f32 + 0.5) / 256.0 - 0.5;
                u * u * u * 8.0
            })
            .collect();
        let sq = |a: &[f32], b: &[f32]| -> f64 {
            a.iter().zip(b).map(|(a, b)| f64::from(a - b).powi(2)).sum()
        };
        for (e, q_max, block) in [
            (Encoding::Q3, 3.0f32, Q3_BLOCK),
            (Encoding::Q2, 1.0, Q2_BLOCK),
        ] {
            let mut searched = x.clone();
            e.round_slice(&mut searched);
            let mut plain = x.clone();
            for chunk in plain.chunks_mut(block) {
                let (s, codes) = quantize::<64>(chunk, q_max);
                for (v, q) in chunk.iter_mut().zip(codes) {
                    *v = f32::from(q) * s;
                }
            }
            let (es, ep) = (sq(&x, &searched), sq(&x, &plain));
            assert!(es < ep, "{e}: searched {es} vs plain {ep}");
        }
    }

    #[test]
    fn ternary_packing_by_hand() {
        // Codes 1, -1, 0, 0, 1 → digits 1, 2, 0, 0, 1 → 1 + 2·3 + 1·81 = 88; then 0, -1, 1
        // (the last three of a 128-element block share byte 25) → 0 + 2·3 + 1·9 = 15.
        let s = 0.5f32;
        let mut block = s.to_le_bytes().to_vec();
        block.push(88);
        block.resize(4 + 25, 0);
        block.push(15);
        assert_eq!(block.len() as u64, Encoding::Ternary.block().1);
        let out = decode(Encoding::Ternary, &block, 128);
        assert_eq!(out[..5], [0.5, -0.5, 0.0, 0.0, 0.5]);
        assert_eq!(out[125..], [0.0, -0.5, 0.5]);
        assert!(out[5..125].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn ternary_encoder_picks_the_least_squares_movers() {
        // |x| sorted: 4, 3, 1, 0.5: (Σ|x|)² / k = 16, 24.5, 21.33, 18.06, so the two largest
        // move, by their mean magnitude 3.5, with their signs; the rest stay.
        let x = [1.0f32, -4.0, 0.5, 3.0];
        let mut bytes = Vec::new();
        Encoding::Ternary.encode(&x, &mut bytes);
        assert_eq!(bytes.len(), 30);
        assert_eq!(bytes[..4], 3.5f32.to_le_bytes());
        // Codes 0, -1, 0, 1 → digits 0, 2, 0, 1 → 2·3 + 1·27 = 33.
        assert_eq!(bytes[4], 33);
        assert!(bytes[5..].iter().all(|&b| b == 0));
        // Against every choice of movers and sign, brute force on a random block: no subset of
        // the same size does better, and the chosen size is the best over all sizes.
        let x: Vec<f32> = (0..12)
            .map(|i| ((i * 7919 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let mut r = x.clone();
        Encoding::Ternary.round_slice(&mut r);
        let err =
            |r: &[f32]| -> f64 { x.iter().zip(r).map(|(a, b)| f64::from(a - b).powi(2)).sum() };
        let best = (1u32..1 << x.len())
            .map(|set| {
                let movers: Vec<f32> = (0..x.len())
                    .filter(|i| set >> i & 1 == 1)
                    .map(|i| x[i].abs())
                    .collect();
                let s = movers.iter().sum::<f32>() / movers.len() as f32;
                let y: Vec<f32> = (0..x.len())
                    .map(|i| {
                        if set >> i & 1 == 1 {
                            x[i].signum() * s
                        } else {
                            0.0
                        }
                    })
                    .collect();
                err(&y)
            })
            .fold(f64::INFINITY, f64::min);
        assert!(
            (err(&r) - best).abs() <= 1e-5 * best.max(1e-9),
            "{} vs {best}",
            err(&r)
        );
    }

    #[test]
    fn zero_blocks_and_names() {
        let mut bytes = Vec::new();
        Encoding::Q8.encode(&[0.0; 3], &mut bytes);
        assert_eq!(decode(Encoding::Q8, &bytes, 3), vec![0.0; 3]);
        assert_eq!(Encoding::Q8.first_bad_scale(&bytes), None);
        let mut nan = bytes.clone();
        nan[..4].copy_from_slice(&f32::NAN.to_le_bytes());
        assert_eq!(Encoding::Q8.first_bad_scale(&nan), Some(0));
        for e in Encoding::ALL {
            assert_eq!(e.name().parse::<Encoding>(), Ok(e));
        }
        assert!("int8".parse::<Encoding>().is_err());
    }
}
