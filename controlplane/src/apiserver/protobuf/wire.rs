//! Protobuf wire-format primitives: keys, varints, fixed-width and length-delimited
//! values, and skipping fields nobody asked for. Every read is bounds-checked.

use std::fmt;

/// Groups (deprecated, never written by Kubernetes) only ever need skipping; this
/// bounds the recursion that skipping nested groups takes.
const MAX_GROUP_DEPTH: usize = 32;

/// Largest field number protobuf allows (2^29 - 1).
const MAX_FIELD_NUMBER: u64 = (1 << 29) - 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum WireType {
    Varint,
    Fixed64,
    Len,
    StartGroup,
    EndGroup,
    Fixed32,
}

impl fmt::Display for WireType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = match self {
            WireType::Varint => 0,
            WireType::Fixed64 => 1,
            WireType::Len => 2,
            WireType::StartGroup => 3,
            WireType::EndGroup => 4,
            WireType::Fixed32 => 5,
        };
        write!(f, "{n}")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum WireError {
    #[error("truncated varint")]
    TruncatedVarint,
    #[error("varint longer than 10 bytes")]
    VarintOverflow,
    #[error("truncated {0}-byte fixed-width value")]
    TruncatedFixed(usize),
    #[error("length {len} runs past the end of its message ({left} bytes left)")]
    Length { len: u64, left: usize },
    #[error("invalid field number {0}")]
    FieldNumber(u64),
    #[error("invalid wire type {0}")]
    InvalidWireType(u8),
    #[error("end-group marker for field {0} without a matching start")]
    UnmatchedEndGroup(u32),
    #[error("group of field {0} is never closed")]
    UnclosedGroup(u32),
    #[error("groups nested deeper than {MAX_GROUP_DEPTH} levels")]
    GroupDepth,
}

/// A cursor over one message's bytes.
pub(super) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The next field's number and wire type, or `None` at the end of the message.
    pub(super) fn key(&mut self) -> Result<Option<(u32, WireType)>, WireError> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let number = key >> 3;
        if number == 0 || number > MAX_FIELD_NUMBER {
            return Err(WireError::FieldNumber(number));
        }
        let wire = match key & 7 {
            0 => WireType::Varint,
            1 => WireType::Fixed64,
            2 => WireType::Len,
            3 => WireType::StartGroup,
            4 => WireType::EndGroup,
            5 => WireType::Fixed32,
            // Masked to 3 bits, so the cast keeps the value.
            other => return Err(WireError::InvalidWireType(other as u8)),
        };
        // Checked against MAX_FIELD_NUMBER above.
        Ok(Some((number as u32, wire)))
    }

    pub(super) fn varint(&mut self) -> Result<u64, WireError> {
        let mut value = 0u64;
        for (i, &byte) in self.buf.iter().enumerate().take(10) {
            // The tenth byte may only contribute the top bit of a u64.
            if i == 9 && byte > 1 {
                return Err(WireError::VarintOverflow);
            }
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte < 0x80 {
                self.buf = &self.buf[i + 1..];
                return Ok(value);
            }
        }
        // Ten bytes always end the loop above, so fewer were left.
        Err(WireError::TruncatedVarint)
    }

    pub(super) fn fixed64(&mut self) -> Result<u64, WireError> {
        let bytes = self.take(8).ok_or(WireError::TruncatedFixed(8))?;
        let mut raw = [0u8; 8];
        raw.copy_from_slice(bytes);
        Ok(u64::from_le_bytes(raw))
    }

    pub(super) fn fixed32(&mut self) -> Result<u32, WireError> {
        let bytes = self.take(4).ok_or(WireError::TruncatedFixed(4))?;
        let mut raw = [0u8; 4];
        raw.copy_from_slice(bytes);
        Ok(u32::from_le_bytes(raw))
    }

    /// A length-prefixed value (string, bytes, embedded message, packed scalars).
    pub(super) fn len_delimited(&mut self) -> Result<&'a [u8], WireError> {
        let len = self.varint()?;
        let left = self.buf.len();
        usize::try_from(len)
            .ok()
            .and_then(|n| self.take(n))
            .ok_or(WireError::Length { len, left })
    }

    /// Skips the value of a field we have no schema for.
    pub(super) fn skip(&mut self, number: u32, wire: WireType) -> Result<(), WireError> {
        self.skip_at_depth(number, wire, 0)
    }

    fn skip_at_depth(
        &mut self,
        number: u32,
        wire: WireType,
        depth: usize,
    ) -> Result<(), WireError> {
        match wire {
            WireType::Varint => self.varint().map(drop),
            WireType::Fixed64 => self.fixed64().map(drop),
            WireType::Fixed32 => self.fixed32().map(drop),
            WireType::Len => self.len_delimited().map(drop),
            WireType::EndGroup => Err(WireError::UnmatchedEndGroup(number)),
            WireType::StartGroup => {
                if depth >= MAX_GROUP_DEPTH {
                    return Err(WireError::GroupDepth);
                }
                loop {
                    match self.key()? {
                        None => return Err(WireError::UnclosedGroup(number)),
                        Some((n, WireType::EndGroup)) if n == number => return Ok(()),
                        Some((n, w)) => self.skip_at_depth(n, w, depth + 1)?,
                    }
                }
            }
        }
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.buf.len() {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints() {
        assert_eq!(Reader::new(&[0x00]).varint(), Ok(0));
        assert_eq!(Reader::new(&[0x96, 0x01]).varint(), Ok(150));
        let max = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(Reader::new(&max).varint(), Ok(u64::MAX));
        let too_big = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02];
        assert_eq!(
            Reader::new(&too_big).varint(),
            Err(WireError::VarintOverflow)
        );
        let eleven = [0x80; 11];
        assert_eq!(
            Reader::new(&eleven).varint(),
            Err(WireError::VarintOverflow)
        );
        assert_eq!(
            Reader::new(&[0x80, 0x80]).varint(),
            Err(WireError::TruncatedVarint)
        );
        assert_eq!(Reader::new(&[]).varint(), Err(WireError::TruncatedVarint));
    }

    #[test]
    fn keys_and_lengths() {
        let mut r = Reader::new(&[0x0a, 0x02, b'h', b'i', 0x10, 0x01]);
        assert_eq!(r.key(), Ok(Some((1, WireType::Len))));
        assert_eq!(r.len_delimited(), Ok(&b"hi"[..]));
        assert_eq!(r.key(), Ok(Some((2, WireType::Varint))));
        assert_eq!(r.varint(), Ok(1));
        assert_eq!(r.key(), Ok(None));

        assert_eq!(Reader::new(&[0x00]).key(), Err(WireError::FieldNumber(0)));
        assert_eq!(
            Reader::new(&[0x0e]).key(),
            Err(WireError::InvalidWireType(6))
        );
        let mut r = Reader::new(&[0x0a, 0x05, b'a']);
        r.key().unwrap();
        assert_eq!(
            r.len_delimited(),
            Err(WireError::Length { len: 5, left: 1 })
        );
        // A length that does not even fit in usize on 32-bit targets.
        let mut r = Reader::new(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert!(matches!(r.len_delimited(), Err(WireError::Length { .. })));
    }

    #[test]
    fn skips_every_wire_type() {
        // field 1 varint, 2 fixed64, 3 len, 4 group { 5 varint }, 6 fixed32, then field 7.
        let body = [
            0x08, 0x96, 0x01, //
            0x11, 1, 2, 3, 4, 5, 6, 7, 8, //
            0x1a, 0x01, 0xff, //
            0x23, 0x28, 0x01, 0x24, //
            0x35, 1, 2, 3, 4, //
            0x38, 0x07,
        ];
        let mut r = Reader::new(&body);
        for _ in 0..5 {
            let (n, w) = r.key().unwrap().unwrap();
            r.skip(n, w).unwrap();
        }
        assert_eq!(r.key(), Ok(Some((7, WireType::Varint))));
    }

    #[test]
    fn bad_groups() {
        let mut r = Reader::new(&[0x23, 0x28, 0x01]);
        let (n, w) = r.key().unwrap().unwrap();
        assert_eq!(r.skip(n, w), Err(WireError::UnclosedGroup(4)));
        let mut r = Reader::new(&[0x24]);
        let (n, w) = r.key().unwrap().unwrap();
        assert_eq!(r.skip(n, w), Err(WireError::UnmatchedEndGroup(4)));
        let deep = [0x0b; 100];
        let mut r = Reader::new(&deep);
        let (n, w) = r.key().unwrap().unwrap();
        assert_eq!(r.skip(n, w), Err(WireError::GroupDepth));
    }
}
