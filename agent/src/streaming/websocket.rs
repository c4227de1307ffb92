//! The server's side of RFC 6455, as much as the kubelet API needs: the
//! accept key, reading masked client frames (fragmented messages
//! included) and writing unmasked server frames.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;
const CONTINUATION: u8 = 0x0;

/// Close status 1000, "normal closure": client-go treats any other close as
/// a failed stream.
pub const NORMAL_CLOSURE: [u8; 2] = 1000u16.to_be_bytes();

/// The largest frame accepted; kubectl's are a few KiB.
const MAX_FRAME: u64 = 1 << 20;
/// The largest message, however many frames it comes in.
const MAX_MESSAGE: usize = 4 << 20;

pub enum Message {
    Data(Vec<u8>),
    Ping(Vec<u8>),
    Close,
}

/// Reads messages from a client.
pub struct Reader<R> {
    inner: R,
    partial: Option<Vec<u8>>,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(inner: R) -> Self {
        Reader {
            inner,
            partial: None,
        }
    }

    /// The next data message or control frame; `None` at end of stream.
    pub async fn next(&mut self) -> io::Result<Option<Message>> {
        loop {
            let Some((fin, opcode, payload)) = self.frame().await? else {
                return Ok(None);
            };
            match opcode {
                PING => return Ok(Some(Message::Ping(payload))),
                PONG => {}
                CLOSE => return Ok(Some(Message::Close)),
                TEXT | BINARY | CONTINUATION => {
                    let mut message = self.partial.take().unwrap_or_default();
                    if message.len() + payload.len() > MAX_MESSAGE {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "WebSocket message too large",
                        ));
                    }
                    message.extend_from_slice(&payload);
                    if fin {
                        return Ok(Some(Message::Data(message)));
                    }
                    self.partial = Some(message);
                }
                other => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unknown WebSocket opcode {other}"),
                    ));
                }
            }
        }
    }

    async fn frame(&mut self) -> io::Result<Option<(bool, u8, Vec<u8>)>> {
        let mut head = [0u8; 2];
        match self.inner.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let fin = head[0] & 0x80 != 0;
        let opcode = head[0] & 0x0f;
        let masked = head[1] & 0x80 != 0;
        let len = match head[1] & 0x7f {
            126 => u64::from(self.inner.read_u16().await?),
            127 => self.inner.read_u64().await?,
            n => u64::from(n),
        };
        if len > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "WebSocket frame too large",
            ));
        }
        let mut mask = [0u8; 4];
        if masked {
            self.inner.read_exact(&mut mask).await?;
        }
        let mut payload = vec![0u8; len as usize];
        self.inner.read_exact(&mut payload).await?;
        if masked {
            for (i, byte) in payload.iter_mut().enumerate() {
                *byte ^= mask[i % 4];
            }
        }
        Ok(Some((fin, opcode, payload)))
    }
}

/// Writes one unmasked, final frame.
pub async fn write<W: AsyncWrite + Unpin>(w: &mut W, opcode: u8, payload: &[u8]) -> io::Result<()> {
    let mut frame = Vec::with_capacity(payload.len() + 10);
    frame.push(0x80 | opcode);
    match payload.len() {
        n if n < 126 => frame.push(n as u8),
        n if n <= usize::from(u16::MAX) => {
            frame.push(126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    w.write_all(&frame).await?;
    w.flush().await
}

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    base64(&sha1(format!("{}{GUID}", key.trim()).as_bytes()))
}

/// SHA-1 (FIPS 180-4), needed only for the handshake above.
fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [
        0x6745_2301,
        0xEFCD_AB89,
        0x98BA_DCFE,
        0x1032_5476,
        0xC3D2_E1F0,
    ];
    let mut message = data.to_vec();
    message.push(0x80);
    while message.len() % 64 != 56 {
        message.push(0);
    }
    message.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in message.chunks(64) {
        let mut w = [0u32; 80];
        for (word, bytes) in w.iter_mut().zip(block.chunks(4)) {
            *word = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, word) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A82_7999),
                20..=39 => (b ^ c ^ d, 0x6ED9_EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1B_BCDC),
                _ => (b ^ c ^ d, 0xCA62_C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*word);
            e = d;
            d = c;
            c = b.rotate_left(30);
            b = a;
            a = t;
        }
        for (state, value) in h.iter_mut().zip([a, b, c, d, e]) {
            *state = state.wrapping_add(value);
        }
    }
    let mut out = [0u8; 20];
    for (bytes, word) in out.chunks_mut(4).zip(h) {
        bytes.copy_from_slice(&word.to_be_bytes());
    }
    out
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from_be_bytes([0, b[0], b[1], b[2]]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_6455_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    /// A masked client frame of `len` zero bytes.
    fn frame(fin: bool, opcode: u8, len: usize) -> Vec<u8> {
        let mut out = vec![if fin { 0x80 } else { 0 } | opcode, 0x80 | 127];
        out.extend_from_slice(&(len as u64).to_be_bytes());
        out.extend_from_slice(&[0; 4]);
        out.resize(out.len() + len, 0);
        out
    }

    #[tokio::test]
    async fn fragments_are_joined_up_to_a_bound() {
        let mut stream = frame(false, BINARY, 1000);
        stream.extend(frame(true, CONTINUATION, 24));
        let mut reader = Reader::new(&stream[..]);
        match reader.next().await {
            Ok(Some(Message::Data(data))) => assert_eq!(data.len(), 1024),
            _ => panic!("expected one joined message"),
        }

        // Unfinished fragments of 1 MiB each, without end.
        let mut stream = frame(false, BINARY, 1 << 20);
        for _ in 0..8 {
            stream.extend(frame(false, CONTINUATION, 1 << 20));
        }
        let mut reader = Reader::new(&stream[..]);
        let error = reader.next().await.err().expect("refused");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
    }
}
