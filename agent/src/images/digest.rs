//! sha256 digests: parsing `sha256:<hex>`, hashing bytes, and hashing a
//! stream as it is read.

use std::io::{self, Read};

use sha2::{Digest as _, Sha256};

/// The hex part of `sha256:<64 lowercase hex>`, or `None` for anything else
/// (other algorithms included: the store addresses content by sha256 only).
pub fn sha256_hex_of(digest: &str) -> Option<&str> {
    let hex = digest.strip_prefix("sha256:")?;
    is_sha256_hex(hex).then_some(hex)
}

pub fn is_sha256_hex(hex: &str) -> bool {
    hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// A running sha256 and byte count of everything read through a
/// [`HashingReader`].
#[derive(Default)]
pub struct HashState {
    hasher: Sha256,
    pub bytes: u64,
}

impl HashState {
    pub fn hex(self) -> String {
        hex(&self.hasher.finalize())
    }
}

pub struct HashingReader<'a, R> {
    inner: R,
    state: &'a mut HashState,
}

impl<'a, R: Read> HashingReader<'a, R> {
    pub fn new(inner: R, state: &'a mut HashState) -> Self {
        HashingReader { inner, state }
    }

    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for HashingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.state.hasher.update(&buf[..n]);
        self.state.bytes += n as u64;
        Ok(n)
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digest() {
        assert_eq!(
            sha256_hex(b"{}"),
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
    }

    #[test]
    fn streaming_equals_one_shot() {
        let data = vec![7u8; 100_000];
        let mut state = HashState::default();
        let mut reader = HashingReader::new(data.as_slice(), &mut state);
        io::copy(&mut reader, &mut io::sink()).unwrap();
        assert_eq!(state.bytes, 100_000);
        assert_eq!(state.hex(), sha256_hex(&data));
    }

    #[test]
    fn parses_only_sha256() {
        let hex = sha256_hex(b"x");
        assert_eq!(sha256_hex_of(&format!("sha256:{hex}")), Some(hex.as_str()));
        assert_eq!(sha256_hex_of(&format!("sha512:{hex}")), None);
        assert_eq!(
            sha256_hex_of(&format!("sha256:{}", hex.to_uppercase())),
            None
        );
        assert_eq!(sha256_hex_of("sha256:abc"), None);
        assert_eq!(sha256_hex_of("sha256:../../etc/passwd"), None);
    }
}
