//! Element types a bundle can store, and their conversion to and from `f32`.
//!
//! Every merge method works in `f32`; storage may narrow the merged delta or the base to `f16` or
//! `bf16`. The conversions live here so that the compiler, the exporter and the runtime round in
//! exactly the same way (IEEE round-to-nearest-even, through the `half` crate).

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

/// Elements converted at a time between `f32` and `f16`: `half`'s slice conversions use the
/// CPU's conversion instructions several lanes at a time (F16C on x86-64) where it has them,
/// element by element otherwise, with the same results. Converting one value per call was far
/// slower: 9 ns per value in a plain compile, up to 340 ns once tract had run on the thread
/// (it leaves the AVX state dirty, so each F16C call pays a transition; docs/PERFORMANCE.md).
const HALF_CHUNK: usize = 256;
use serde::{Deserialize, Serialize};

/// Storage type of a tensor in a bundle. All are little-endian IEEE formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// IEEE 754 half precision.
    F16,
    /// bfloat16 (the top 16 bits of an `f32`).
    BF16,
}

impl DType {
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Lower-case name, as used on the command line and in reports.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }

    /// Appends `values` encoded in this type (little-endian) to `out`.
    pub fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        out.reserve(values.len() * self.size());
        match self {
            DType::F32 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            DType::F16 => {
                let mut halves = [half::f16::ZERO; HALF_CHUNK];
                for chunk in values.chunks(HALF_CHUNK) {
                    let Some(h) = halves.get_mut(..chunk.len()) else {
                        return;
                    };
                    h.convert_from_f32_slice(chunk);
                    h.iter()
                        .for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
                }
            }
            DType::BF16 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        }
    }

    /// Decodes little-endian `bytes` of this type into `out` (cleared first). A trailing partial
    /// element is ignored; callers validate lengths before decoding.
    pub fn decode_into(self, bytes: &[u8], out: &mut Vec<f32>) {
        out.clear();
        out.resize(bytes.len() / self.size(), 0.0);
        self.decode_slice(bytes, out);
    }

    /// Decodes little-endian `bytes` of this type into `out`, element for element, as many as
    /// both hold (callers pass `bytes.len() == out.len() * self.size()`). The same conversions
    /// as [`DType::decode_into`], without allocating: a chunk of a tensor can be decoded
    /// straight into its destination.
    pub(crate) fn decode_slice(self, bytes: &[u8], out: &mut [f32]) {
        match self {
            DType::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            DType::F16 => {
                // Bit patterns into a small stack buffer, then `half`'s slice conversion, which
                // uses the CPU's f16→f32 instructions several lanes at a time where available
                // (exact either way). No heap allocation: fresh pages would cost more than this.
                let mut bits = [0u16; HALF_CHUNK];
                for (dst, chunk) in out.chunks_mut(HALF_CHUNK).zip(bytes.chunks(2 * HALF_CHUNK)) {
                    let mut n = 0;
                    for (b, c) in bits.iter_mut().zip(chunk.chunks_exact(2)) {
                        *b = u16::from_le_bytes([c[0], c[1]]);
                        n += 1;
                    }
                    let n = n.min(dst.len());
                    if let (Some(src), Some(dst)) = (bits.get(..n), dst.get_mut(..n)) {
                        src.reinterpret_cast::<half::f16>()
                            .convert_to_f32_slice(dst);
                    }
                }
            }
            DType::BF16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        }
    }

    /// Rounds `v` to this type and back, i.e. the value a reader will see after a round trip.
    pub fn round(self, v: f32) -> f32 {
        match self {
            DType::F32 => v,
            DType::F16 => half::f16::from_f32(v).to_f32(),
            DType::BF16 => half::bf16::from_f32(v).to_f32(),
        }
    }

    /// [`DType::round`] of every value, in place (f16 through the vectorized conversions).
    pub(crate) fn round_slice(self, values: &mut [f32]) {
        match self {
            DType::F32 => {}
            DType::F16 => {
                let mut halves = [half::f16::ZERO; HALF_CHUNK];
                for chunk in values.chunks_mut(HALF_CHUNK) {
                    let Some(h) = halves.get_mut(..chunk.len()) else {
                        return;
                    };
                    h.convert_from_f32_slice(chunk);
                    h.convert_to_f32_slice(chunk);
                }
            }
            DType::BF16 => values.iter_mut().for_each(|v| *v = self.round(*v)),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(DType::F32),
            "f16" => Ok(DType::F16),
            "bf16" => Ok(DType::BF16),
            other => Err(format!(
                "unknown dtype {other:?} (expected f32, f16 or bf16)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_round_trip_matches_half_rounding() {
        // 1/3 in f16 is 0x3555 = 0.333251953125 (hand-checked: 1 + 341/1024 times 2^-2).
        let mut bytes = Vec::new();
        DType::F16.encode(&[1.0 / 3.0, -2.0], &mut bytes);
        assert_eq!(bytes, vec![0x55, 0x35, 0x00, 0xc0]);
        let mut back = Vec::new();
        DType::F16.decode_into(&bytes, &mut back);
        assert_eq!(back, vec![0.333_251_95, -2.0]);
    }

    #[test]
    fn f16_decode_across_chunk_boundaries_matches_scalar_conversion() {
        // 600 values: two full 256-element chunks and a partial one.
        let bits: Vec<u16> = (0..600u16).map(|i| i.wrapping_mul(97) & 0x7bff).collect();
        let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let mut out = vec![7.0];
        DType::F16.decode_into(&bytes, &mut out);
        let expected: Vec<f32> = bits
            .iter()
            .map(|&b| half::f16::from_bits(b).to_f32())
            .collect();
        assert_eq!(out, expected);
    }

    #[test]
    fn f16_slice_encode_and_round_match_one_value_at_a_time() {
        // 600 values across chunk boundaries: ties to even, f16 subnormals and their underflow
        // to zero, overflow to infinity, infinities and NaN, against half's scalar conversion.
        let mut values: Vec<f32> = (0..590)
            .map(|i| {
                let x = (i as f32 - 295.0) * 1.37e-3;
                x * x * x * if i % 7 == 0 { 1e-4 } else { 1.0 }
            })
            .collect();
        values.extend([
            1.0 + 1.0 / 2048.0, // exactly between two f16: rounds to even (1.0)
            1.0 + 3.0 / 2048.0, // rounds up to even (1 + 2/1024)
            6.0e-8,             // f16 subnormal
            2.0e-8,             // underflows to zero
            -3.1e-5,            // negative subnormal
            70000.0,            // overflows to infinity
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -0.0,
        ]);
        let scalar = |v: &f32| half::f16::from_f32(*v);
        let mut bytes = Vec::new();
        DType::F16.encode(&values, &mut bytes);
        let expected: Vec<u8> = values
            .iter()
            .flat_map(|v| scalar(v).to_le_bytes())
            .collect();
        assert_eq!(bytes, expected);
        let mut rounded = values.clone();
        DType::F16.round_slice(&mut rounded);
        for (r, v) in rounded.iter().zip(&values) {
            let want = scalar(v).to_f32();
            assert!(
                r.to_bits() == want.to_bits() || (r.is_nan() && want.is_nan()),
                "{v}"
            );
        }
        assert_eq!(rounded[590], 1.0);
        assert_eq!(rounded[591], 1.0 + 2.0 / 1024.0);
        assert_eq!(rounded[593], 0.0);
        assert_eq!(rounded[595], f32::INFINITY);
    }

    #[test]
    fn bf16_keeps_the_top_half_of_f32() {
        let mut bytes = Vec::new();
        DType::BF16.encode(&[1.0], &mut bytes);
        assert_eq!(bytes, vec![0x80, 0x3f]);
    }
}
