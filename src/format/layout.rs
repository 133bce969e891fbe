//! Every size the format implies, computed in one place with checked arithmetic.
//!
//! GGUF's integer-overflow CVEs (tensor dimensions whose product wraps, sizes accumulated in
//! several places, padding that wraps to zero) all came from size arithmetic spread over many
//! call sites. Here, element counts, byte lengths, alignment and region ends are computed only by
//! the functions of this module, in `u64`, returning [`FormatError::Overflow`] instead of wrapping
//! or panicking. The reader, the writer, the runtime and the exporter call these; none of them
//! multiplies or adds sizes on its own (docs/FORMAT.md §8).

use crate::encoding::Encoding;

use super::error::FormatError;

/// Length of the fixed header, and the file offset of the data region.
pub(crate) const HEADER_LEN: u64 = 64;
/// Alignment of every section in the data region (and in the file).
pub const ALIGNMENT: u64 = 64;
/// Cap on the manifest's length in bytes (64 MiB).
pub const MAX_MANIFEST_LEN: u64 = 64 << 20;
/// Cap on the number of tasks.
pub const MAX_TASKS: usize = 4096;
/// Cap on the number of tensors.
pub const MAX_TENSORS: usize = 1 << 20;
/// Cap on the number of sections (a [`SectionId`](super::SectionId) always fits `u32`).
pub const MAX_SECTIONS: usize = 1 << 22;
/// Cap on the number of graphs.
pub const MAX_GRAPHS: usize = 4096;
/// Cap on the rank of a shape.
pub const MAX_RANK: usize = 8;
/// Cap on the length of a task, tensor or label name, in bytes.
pub const MAX_NAME_LEN: usize = 4096;
/// Cap on the length of a task name, in bytes (rule 31; tighter than [`MAX_NAME_LEN`]).
pub const MAX_TASK_NAME_LEN: usize = 256;
/// Most label names per task.
pub const MAX_LABELS: usize = 1 << 16;
/// Cap on the number of elements of one tensor (2^40).
pub const MAX_ELEMENTS: u64 = 1 << 40;
/// Bytes of sequence buffers that decoding may allocate per manifest byte (rule 35).
pub const MANIFEST_DECODE_FACTOR: u64 = 16;

/// Number of elements of `shape` (1 for a scalar), or [`FormatError::Overflow`].
///
/// Does not apply [`MAX_ELEMENTS`]; the reader's `checked_numel` does.
pub(crate) fn numel(shape: &[u64]) -> Result<u64, FormatError> {
    shape.iter().try_fold(1u64, |acc, &d| {
        acc.checked_mul(d).ok_or(FormatError::Overflow {
            what: "element count of a shape",
        })
    })
}

/// Number of elements of `shape`, checked against [`MAX_RANK`] and [`MAX_ELEMENTS`]; `tensor`
/// names the shape in errors (called only on error).
pub(crate) fn checked_numel(
    shape: &[u64],
    tensor: impl FnOnce() -> String,
) -> Result<u64, FormatError> {
    if shape.len() > MAX_RANK {
        return Err(FormatError::RankTooLarge {
            tensor: tensor(),
            rank: shape.len() as u64,
            max: MAX_RANK as u64,
        });
    }
    let n = numel(shape)?;
    if n > MAX_ELEMENTS {
        return Err(FormatError::TooManyElements {
            tensor: tensor(),
            numel: n,
            max: MAX_ELEMENTS,
        });
    }
    Ok(n)
}

/// Bytes of a dense tensor of `numel` elements stored in `encoding`: whole blocks,
/// `⌈numel / block elements⌉ · block bytes` (for a float type, `numel · size`).
pub(crate) fn encoded_bytes(numel: u64, encoding: Encoding) -> Result<u64, FormatError> {
    let (elements, bytes) = encoding.block();
    numel
        .div_ceil(elements)
        .checked_mul(bytes)
        .ok_or(FormatError::Overflow {
            what: "byte length of a dense tensor",
        })
}

/// Bytes of a bit-packed mask over `numel` elements: `⌈numel / 8⌉` (cannot overflow).
pub(crate) const fn mask_bytes(numel: u64) -> u64 {
    numel.div_ceil(8)
}

/// Number of rows (first dimension) of `shape`, `None` for a scalar.
pub(crate) fn rows(shape: &[u64]) -> Option<u64> {
    shape.first().copied()
}

/// Bytes of a row-scale section for `rows` rows (`f32` each).
pub(crate) fn row_scale_bytes(rows: u64) -> Result<u64, FormatError> {
    rows.checked_mul(4).ok_or(FormatError::Overflow {
        what: "byte length of row scales",
    })
}

/// `x` rounded up to the next multiple of [`ALIGNMENT`].
pub(crate) fn align_up(x: u64) -> Result<u64, FormatError> {
    x.checked_next_multiple_of(ALIGNMENT)
        .ok_or(FormatError::Overflow {
            what: "aligned offset",
        })
}

/// `offset + length`, the end of a range.
pub(crate) fn end(offset: u64, length: u64) -> Result<u64, FormatError> {
    offset.checked_add(length).ok_or(FormatError::Overflow {
        what: "end of a byte range",
    })
}

/// Number of zero padding bytes written after a section ending at `end` (data-region relative).
#[cfg(feature = "compiler")]
pub(crate) fn padding_after(end: u64) -> Result<u64, FormatError> {
    // align_up(end) >= end, so the subtraction cannot wrap.
    Ok(align_up(end)? - end)
}

/// Bytes of an in-memory tensor of `elem_size`-byte elements and shape `dims` (a weight being
/// bound, a batch of token ids), `None` if it overflows `usize`.
pub(crate) fn tensor_bytes(elem_size: usize, dims: &[usize]) -> Option<usize> {
    dims.iter()
        .try_fold(elem_size, |acc, &d| acc.checked_mul(d))
}

/// Bytes of a bit-packed mask over `len` elements in memory: `⌈len / 8⌉`, as [`mask_bytes`].
pub(crate) const fn mask_len(len: usize) -> usize {
    len.div_ceil(8)
}

/// Rows described by a row-scale section of `bytes` bytes (`f32` each), as
/// `row_scale_bytes` counts them; `None` unless `bytes` is a whole number of scales.
pub(crate) const fn row_scale_count(bytes: usize) -> Option<usize> {
    if bytes.is_multiple_of(4) {
        Some(bytes / 4)
    } else {
        None
    }
}

/// Converts a file offset or length that has been validated against the real file length to
/// `usize` (always succeeds then; fails cleanly otherwise).
pub(crate) fn to_usize(x: u64) -> Result<usize, FormatError> {
    usize::try_from(x).map_err(|_| FormatError::Overflow {
        what: "offset or length as usize",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn align_up_and_overflow() {
        assert_eq!(align_up(0).ok(), Some(0));
        assert_eq!(align_up(1).ok(), Some(64));
        assert_eq!(align_up(64).ok(), Some(64));
        assert_eq!(align_up(65).ok(), Some(128));
        assert!(matches!(
            align_up(u64::MAX - 3),
            Err(FormatError::Overflow { .. })
        ));
    }

    #[cfg(feature = "compiler")]
    #[test]
    fn padding_after_a_section() {
        assert_eq!(padding_after(70).ok(), Some(58));
        assert_eq!(padding_after(128).ok(), Some(0));
    }

    #[test]
    fn sizes() {
        assert_eq!(numel(&[]).ok(), Some(1));
        assert_eq!(numel(&[3, 0, 5]).ok(), Some(0));
        assert!(matches!(
            numel(&[u64::MAX, 2]),
            Err(FormatError::Overflow { .. })
        ));
        assert_eq!(mask_bytes(0), 0);
        assert_eq!(mask_bytes(9), 2);
        assert_eq!(mask_bytes(u64::MAX), u64::MAX / 8 + 1);
        assert_eq!(encoded_bytes(3, Encoding::BF16).ok(), Some(6));
        // Whole blocks: 65 elements are two q8 blocks of 68 bytes, 33 two q4 blocks of 20.
        assert_eq!(encoded_bytes(65, Encoding::Q8).ok(), Some(136));
        assert_eq!(encoded_bytes(64, Encoding::Q8).ok(), Some(68));
        assert_eq!(encoded_bytes(33, Encoding::Q4).ok(), Some(40));
        assert_eq!(encoded_bytes(0, Encoding::Q4).ok(), Some(0));
        assert!(matches!(
            encoded_bytes(u64::MAX, Encoding::Q8),
            Err(FormatError::Overflow { .. })
        ));
        assert!(matches!(
            encoded_bytes(u64::MAX / 2, Encoding::F32),
            Err(FormatError::Overflow { .. })
        ));
        assert!(matches!(
            checked_numel(&[1 << 20, 1 << 21], || "x".into()),
            Err(FormatError::TooManyElements { .. })
        ));
    }
}
