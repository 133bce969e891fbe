//! A minimal, allocation-free protobuf wire-format reader.
//!
//! [`super::scan_model`] uses it to walk an ONNX file field by field without letting prost copy
//! the (large) tensor payloads: payloads are reported as byte ranges into the input buffer.
//! Every length is bounds-checked against the buffer; every position is computed with checked
//! arithmetic. Groups (wire types 3 and 4, deprecated and unused by ONNX) are rejected.

use std::ops::Range;

/// A protobuf field's payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Payload {
    /// Wire type 0.
    Varint(u64),
    /// Wire type 1: eight little-endian bytes.
    Fixed64(u64),
    /// Wire type 2: the byte range of the payload (absolute, in the reader's buffer).
    Bytes(Range<usize>),
    /// Wire type 5: four little-endian bytes.
    Fixed32(u32),
}

/// One field: its number, payload and the absolute byte range of the whole field (tag included).
#[derive(Debug, Clone)]
pub(crate) struct Field {
    /// Field number (≥ 1).
    pub number: u32,
    /// The payload.
    pub payload: Payload,
    /// The whole encoded field, tag included, so it can be copied verbatim.
    pub span: Range<usize>,
}

/// Iterates over the fields of one message stored in `buf[range]`.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    /// A reader over `buf[range]`. Fails if the range is not inside the buffer.
    pub(crate) fn new(buf: &'a [u8], range: Range<usize>) -> Result<Self, String> {
        if range.start > range.end || range.end > buf.len() {
            return Err(format!(
                "message range {}..{} outside a buffer of {} bytes",
                range.start,
                range.end,
                buf.len()
            ));
        }
        Ok(Reader {
            buf,
            pos: range.start,
            end: range.end,
        })
    }

    fn byte(&mut self) -> Result<u8, String> {
        if self.pos >= self.end {
            return Err("truncated varint".into());
        }
        let b = *self
            .buf
            .get(self.pos)
            .ok_or_else(|| "truncated varint".to_string())?;
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value: u64 = 0;
        for i in 0..10u32 {
            let b = self.byte()?;
            let low = u64::from(b & 0x7f);
            if i == 9 && b > 1 {
                return Err("varint overflows 64 bits".into());
            }
            value |= low << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint longer than 10 bytes".into())
    }

    fn take(&mut self, n: usize) -> Result<Range<usize>, String> {
        let stop = self
            .pos
            .checked_add(n)
            .filter(|stop| *stop <= self.end)
            .ok_or_else(|| {
                format!(
                    "field of {n} bytes at offset {} runs past the end of its message ({})",
                    self.pos, self.end
                )
            })?;
        let range = self.pos..stop;
        self.pos = stop;
        Ok(range)
    }

    fn fixed<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let range = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(
            self.buf
                .get(range)
                .ok_or_else(|| "truncated fixed-width field".to_string())?,
        );
        Ok(out)
    }

    /// The next field, `None` at the end of the message.
    pub(crate) fn next_field(&mut self) -> Result<Option<Field>, String> {
        if self.pos >= self.end {
            return Ok(None);
        }
        let start = self.pos;
        let tag = self.varint()?;
        let number = u32::try_from(tag >> 3)
            .ok()
            .filter(|n| (1..=0x1fff_ffff).contains(n))
            .ok_or_else(|| format!("invalid field number in tag {tag:#x} at offset {start}"))?;
        let payload = match tag & 7 {
            0 => Payload::Varint(self.varint()?),
            1 => Payload::Fixed64(u64::from_le_bytes(self.fixed::<8>()?)),
            2 => {
                let len = self.varint()?;
                let len = usize::try_from(len)
                    .map_err(|_| format!("length {len} does not fit in memory"))?;
                Payload::Bytes(self.take(len)?)
            }
            5 => Payload::Fixed32(u32::from_le_bytes(self.fixed::<4>()?)),
            other => {
                return Err(format!(
                    "unsupported protobuf wire type {other} at offset {start}"
                ))
            }
        };
        Ok(Some(Field {
            number,
            payload,
            span: start..self.pos,
        }))
    }
}

/// Number of varints in a packed run, each checked as [`for_each_packed_varint`] will read it
/// (counting the bytes whose top bit is clear would accept a varint longer than 10 bytes or
/// overflowing 64 bits, which the later read then rejects).
pub(crate) fn count_packed_varints(bytes: &[u8]) -> Result<u64, String> {
    let mut r = Reader::new(bytes, 0..bytes.len())?;
    let mut count = 0u64;
    while r.pos < r.end {
        r.varint().map_err(|e| format!("packed varint run: {e}"))?;
        count += 1;
    }
    Ok(count)
}

/// Decodes a packed run of varints, calling `f` on each.
pub(crate) fn for_each_packed_varint(
    buf: &[u8],
    range: Range<usize>,
    mut f: impl FnMut(u64),
) -> Result<(), String> {
    let mut r = Reader::new(buf, range)?;
    while r.pos < r.end {
        f(r.varint()?);
    }
    Ok(())
}

/// Appends a varint to `out`.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends a length-delimited field (wire type 2) to `out`.
pub(crate) fn put_bytes_field(out: &mut Vec<u8>, number: u32, payload: &[u8]) {
    put_varint(out, (u64::from(number) << 3) | 2);
    put_varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut buf = Vec::new();
            put_varint(&mut buf, 8); // field 1, varint
            put_varint(&mut buf, v);
            let mut r = Reader::new(&buf, 0..buf.len()).unwrap();
            let f = r.next_field().unwrap().unwrap();
            assert_eq!(f.number, 1);
            assert_eq!(f.payload, Payload::Varint(v));
            assert_eq!(f.span, 0..buf.len());
            assert!(r.next_field().unwrap().is_none());
        }
    }

    #[test]
    fn truncated_and_oversized_fields_are_errors() {
        // Field 1, wire type 2, length 5 but only 2 bytes follow.
        let buf = [0x0a, 0x05, 1, 2];
        let mut r = Reader::new(&buf, 0..buf.len()).unwrap();
        assert!(r.next_field().is_err());
        // Length varint that overflows.
        let buf = [
            0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
        ];
        let mut r = Reader::new(&buf, 0..buf.len()).unwrap();
        assert!(r.next_field().is_err());
        // Group wire type.
        let buf = [0x0b];
        let mut r = Reader::new(&buf, 0..buf.len()).unwrap();
        assert!(r.next_field().is_err());
        // Field number 0.
        let buf = [0x00, 0x00];
        let mut r = Reader::new(&buf, 0..buf.len()).unwrap();
        assert!(r.next_field().is_err());
        assert!(Reader::new(&buf, 1..5).is_err());
    }

    #[test]
    fn packed_varints() {
        let bytes = [0x01, 0xac, 0x02, 0x7f];
        assert_eq!(count_packed_varints(&bytes).unwrap(), 3);
        let mut seen = Vec::new();
        for_each_packed_varint(&bytes, 0..4, |v| seen.push(v)).unwrap();
        assert_eq!(seen, vec![1, 300, 127]);
        assert!(count_packed_varints(&[0x80]).is_err());
        // An 11-byte varint, and a 10-byte one overflowing 64 bits, end with a byte whose top
        // bit is clear but are not varints.
        let long = [
            0x80u8, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x00,
        ];
        assert!(count_packed_varints(&long).is_err());
        let overflow = [0xffu8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert!(count_packed_varints(&overflow).is_err());
        assert!(for_each_packed_varint(&overflow, 0..overflow.len(), |_| ()).is_err());
    }
}
