//! The fixed 64-byte header (docs/FORMAT.md §2).
//!
//! The header is all a reader needs to find and check the manifest. Its layout never changes
//! across versions (magic, then the version at offset 8) so that any reader can say "version N is
//! not supported" about a future file instead of misreading it.

use super::error::FormatError;
use super::layout::{self, HEADER_LEN, MAX_MANIFEST_LEN};

/// The first 8 bytes of every bundle.
pub const MAGIC: [u8; 8] = *b"TASKPACK";
/// The format version this crate writes.
pub const VERSION: u32 = 5;
/// The oldest format version this crate reads (a version-2 bundle is a version-5 bundle without
/// block-quantized sections, residuals or `tvq`; a version-3 one has no `q3`, `q2`, `ternary`, residuals
/// or `tvq`; a version-4 one no `ternary`; rules 36 and 37).
pub(super) const MIN_VERSION: u32 = 2;
/// The header flags this crate knows (none in versions 2 to 5).
pub(crate) const KNOWN_FLAGS: u32 = 0;

/// The decoded header. Field order is the on-disk order; see docs/FORMAT.md §2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Format version (offset 8).
    pub version: u32,
    /// Flags, 0 in versions 2 to 5 (offset 12).
    pub flags: u32,
    /// File offset of the data region, always 64 (offset 16).
    pub data_offset: u64,
    /// Length of the data region (offset 24).
    pub data_length: u64,
    /// File offset of the manifest, `data_offset + data_length` (offset 32).
    pub manifest_offset: u64,
    /// Length of the manifest (offset 40).
    pub manifest_length: u64,
    /// XXH3-64 (seed 0) of the manifest bytes (offset 48).
    pub manifest_checksum: u64,
    /// Length of the whole file (offset 56).
    pub file_length: u64,
}

impl Header {
    /// Size of the encoded header in bytes.
    pub const LEN: usize = HEADER_LEN as usize;

    /// The header of a current-version bundle with a data region of `data_length` bytes followed by a
    /// manifest of `manifest_length` bytes hashing to `manifest_checksum`.
    pub fn new(
        data_length: u64,
        manifest_length: u64,
        manifest_checksum: u64,
    ) -> Result<Header, FormatError> {
        let manifest_offset = layout::end(HEADER_LEN, data_length)?;
        let file_length = layout::end(manifest_offset, manifest_length)?;
        Ok(Header {
            version: VERSION,
            flags: 0,
            data_offset: HEADER_LEN,
            data_length,
            manifest_offset,
            manifest_length,
            manifest_checksum,
            file_length,
        })
    }

    /// Encodes the header (magic included) as it is stored, whatever its field values.
    pub fn to_bytes(&self) -> [u8; Header::LEN] {
        let mut out = [0u8; Header::LEN];
        let fields: [&[u8]; 9] = [
            &MAGIC,
            &self.version.to_le_bytes(),
            &self.flags.to_le_bytes(),
            &self.data_offset.to_le_bytes(),
            &self.data_length.to_le_bytes(),
            &self.manifest_offset.to_le_bytes(),
            &self.manifest_length.to_le_bytes(),
            &self.manifest_checksum.to_le_bytes(),
            &self.file_length.to_le_bytes(),
        ];
        let mut at = 0;
        for f in fields {
            for (o, b) in out.iter_mut().skip(at).zip(f) {
                *o = *b;
            }
            at += f.len();
        }
        out
    }

    /// Decodes the first 64 bytes of `bytes`, checking rules 1–4 (length, magic, version, flags).
    /// The offsets are checked by [`Header::check_layout`].
    pub fn decode(bytes: &[u8]) -> Result<Header, FormatError> {
        let Some(h) = bytes.first_chunk::<{ Header::LEN }>() else {
            return Err(FormatError::HeaderTooShort {
                len: bytes.len() as u64,
            });
        };
        let u32_at = |at| u32::from_le_bytes(field(h, at));
        let u64_at = |at| u64::from_le_bytes(field(h, at));
        let magic: [u8; 8] = field(h, 0);
        if magic != MAGIC {
            return Err(FormatError::BadMagic { found: magic });
        }
        let header = Header {
            version: u32_at(8),
            flags: u32_at(12),
            data_offset: u64_at(16),
            data_length: u64_at(24),
            manifest_offset: u64_at(32),
            manifest_length: u64_at(40),
            manifest_checksum: u64_at(48),
            file_length: u64_at(56),
        };
        if !(MIN_VERSION..=VERSION).contains(&header.version) {
            return Err(FormatError::UnsupportedVersion {
                found: header.version,
                known: VERSION,
            });
        }
        if header.flags & !KNOWN_FLAGS != 0 {
            return Err(FormatError::UnknownFlags {
                flags: header.flags,
            });
        }
        Ok(header)
    }

    /// Checks rules 5–9: the header's regions tile a file of `actual_len` bytes exactly and the
    /// manifest is within its cap.
    pub fn check_layout(&self, actual_len: u64) -> Result<(), FormatError> {
        if self.file_length != actual_len {
            return Err(FormatError::FileLengthMismatch {
                header: self.file_length,
                actual: actual_len,
            });
        }
        if self.data_offset != HEADER_LEN {
            return Err(FormatError::InvalidDataOffset {
                found: self.data_offset,
            });
        }
        let data_end = layout::end(self.data_offset, self.data_length)?;
        if self.manifest_offset != data_end {
            return Err(FormatError::InvalidManifestOffset {
                found: self.manifest_offset,
                expected: data_end,
            });
        }
        let manifest_end = layout::end(self.manifest_offset, self.manifest_length)?;
        if manifest_end != self.file_length {
            return Err(FormatError::InvalidManifestLength {
                end: manifest_end,
                file_length: self.file_length,
            });
        }
        if self.manifest_length > MAX_MANIFEST_LEN {
            return Err(FormatError::ManifestTooLarge {
                length: self.manifest_length,
                max: MAX_MANIFEST_LEN,
            });
        }
        Ok(())
    }
}

/// The `N` bytes of `h` at `at` (no indexing: zero-filled past the end, which the fixed layout
/// never reaches).
fn field<const N: usize>(h: &[u8; Header::LEN], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    for (o, b) in out.iter_mut().zip(h.iter().skip(at)) {
        *o = *b;
    }
    out
}
