//! Bit-packed per-parameter masks.
//!
//! A mask over a tensor of `n` parameters is `⌈n/8⌉` bytes; parameter `i` (flat, row-major index)
//! is bit `i % 8` (least significant first) of byte `i / 8`, the same order as numpy's
//! `np.packbits(bits, bitorder="little")`. Pad bits past `n` are zero. The same bytes are what a
//! bundle stores, so a mask goes from the merge method to the file without re-encoding.

/// A bit-packed boolean mask over the flat elements of one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mask {
    len: usize,
    bytes: Vec<u8>,
}

impl Mask {
    /// Packed length in bytes of a mask over `len` elements.
    pub(crate) const fn packed_len(len: usize) -> usize {
        crate::format::layout::mask_len(len)
    }

    /// A mask with bit `i` set where `f(i)` is true.
    pub(crate) fn from_fn(len: usize, mut f: impl FnMut(usize) -> bool) -> Mask {
        let mut bytes = vec![0u8; Self::packed_len(len)];
        for (i, byte) in bytes.iter_mut().enumerate() {
            let start = i * 8;
            let end = (start + 8).min(len);
            let mut b = 0u8;
            for j in start..end {
                b |= u8::from(f(j)) << (j - start);
            }
            *byte = b;
        }
        Mask { len, bytes }
    }

    /// Number of elements the mask covers.
    #[cfg(feature = "compiler")]
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether element `i` is selected (false past the end).
    pub(crate) fn get(&self, i: usize) -> bool {
        i < self.len && self.bytes.get(i / 8).is_some_and(|b| b >> (i % 8) & 1 == 1)
    }

    /// Number of selected elements.
    pub(crate) fn count_ones(&self) -> usize {
        self.bytes.iter().map(|b| b.count_ones() as usize).sum()
    }

    /// The packed bytes (what a bundle stores).
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bit_order_is_lsb_first_like_numpy_little() {
        // np.packbits([1,0,1,1,0,0,0,0, 0,1], bitorder="little") == [13, 2]
        let bits = [1, 0, 1, 1, 0, 0, 0, 0, 0, 1];
        let m = Mask::from_fn(bits.len(), |i| bits[i] == 1);
        assert_eq!(m.as_bytes(), &[13, 2]);
        assert_eq!(m.count_ones(), 4);
        assert!(m.get(9) && !m.get(8) && !m.get(10));
    }
}
