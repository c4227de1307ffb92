//! SPDY/3.1 as kubectl speaks it (through client-go's spdystream): the
//! server's side of one connection. The client opens every stream; each
//! SYN_STREAM carries a header block (`streamtype`, and for port-forward
//! `port` and `requestid`) compressed with zlib against SPDY's preset
//! dictionary, one compression context per connection. This side answers
//! each with a SYN_REPLY whose empty header block is sent as a stored
//! deflate block, which any zlib reader takes. spdystream does no flow
//! control, so neither does this.

use std::io;

use flate2::{Decompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf};
use tokio::sync::mpsc;

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
pub const FLAG_FIN: u8 = 0x01;

/// Frames larger than this are refused (SPDY's length field allows 16 MiB).
const MAX_FRAME: usize = 1 << 20;
/// A header block may not inflate past this.
const MAX_HEADERS: usize = 64 * 1024;

/// The zlib dictionary of SPDY/3 (draft 3, section 2.6.10.1): these
/// names, each behind its length as a big-endian u32, then `DICTIONARY_TAIL`.
const DICTIONARY_WORDS: &[&str] = &[
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
];
const DICTIONARY_TAIL: &str = "100101201202205206300302303304305306307402405406407408409410411\
412413414415416417502504505203 Non-Authoritative Information204 No Content301 Moved \
Permanently400 Bad Request401 Unauthorized403 Forbidden404 Not Found500 Internal Server \
Error501 Not Implemented503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov \
Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,\
image/gif,application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivate\
max-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.";

/// What the client did.
#[derive(Debug)]
pub enum Event {
    /// A new stream (already answered), with its headers.
    Stream { id: u32, headers: Headers },
    Data {
        id: u32,
        fin: bool,
        payload: Vec<u8>,
    },
    /// The client reset a stream.
    Reset { id: u32 },
}

/// A stream's headers, names lower-cased.
#[derive(Debug, Default)]
pub struct Headers(Vec<(String, String)>);

/// The reading side of a connection; answers pings and new streams itself.
pub struct Connection<IO> {
    reader: ReadHalf<IO>,
    writer: Writer,
    inflater: Inflater,
    replied: bool,
}

/// Sends frames; cheap to clone. The connection is shut down when the
/// last clone is gone.
#[derive(Clone)]
pub struct Writer(mpsc::Sender<Vec<u8>>);

impl<IO> Connection<IO>
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    pub fn new(io: IO) -> Self {
        let (reader, mut writer) = tokio::io::split(io);
        let (tx, mut frames) = mpsc::channel::<Vec<u8>>(64);
        tokio::spawn(async move {
            while let Some(frame) = frames.recv().await {
                if writer.write_all(&frame).await.is_err() || writer.flush().await.is_err() {
                    return;
                }
            }
            let _ = writer.shutdown().await;
        });
        Connection {
            reader,
            writer: Writer(tx),
            inflater: Inflater::new(),
            replied: false,
        }
    }

    pub fn writer(&self) -> Writer {
        self.writer.clone()
    }

    /// The next event; `None` once the client has gone away.
    pub async fn next(&mut self) -> io::Result<Option<Event>> {
        loop {
            let Some(frame) = read_frame(&mut self.reader).await? else {
                return Ok(None);
            };
            match frame {
                Frame::Data {
                    stream,
                    flags,
                    payload,
                } => {
                    return Ok(Some(Event::Data {
                        id: stream,
                        fin: flags & FLAG_FIN != 0,
                        payload,
                    }));
                }
                Frame::Control {
                    kind: SYN_STREAM,
                    payload,
                } => {
                    // stream id, associated stream id, priority, slot.
                    let id = stream_id(&payload)?;
                    let block = payload.get(10..).unwrap_or_default();
                    let headers = Headers::decode(&self.inflater.inflate(block)?)?;
                    let reply = self.reply(id);
                    self.writer.send(reply).await?;
                    return Ok(Some(Event::Stream { id, headers }));
                }
                Frame::Control {
                    kind: HEADERS,
                    payload,
                } => {
                    // Unused, but its block is part of the zlib stream.
                    self.inflater
                        .inflate(payload.get(4..).unwrap_or_default())?;
                }
                Frame::Control {
                    kind: RST_STREAM,
                    payload,
                } => {
                    return Ok(Some(Event::Reset {
                        id: stream_id(&payload)?,
                    }));
                }
                Frame::Control {
                    kind: PING,
                    payload,
                } => {
                    self.writer.send(control(PING, 0, &payload)).await?;
                }
                Frame::Control { kind: GOAWAY, .. } => return Ok(None),
                // SETTINGS, WINDOW_UPDATE: nothing to do.
                Frame::Control { .. } => {}
            }
        }
    }

    /// A SYN_REPLY with no headers. Header blocks of one connection form
    /// one zlib stream, so only the first carries the zlib header.
    fn reply(&mut self, stream: u32) -> Vec<u8> {
        let mut payload = stream.to_be_bytes().to_vec();
        if !self.replied {
            // CMF/FLG: deflate, 32K window, no preset dictionary.
            payload.extend_from_slice(&[0x78, 0x01]);
            self.replied = true;
        }
        // A non-final stored block holding the header block (zero
        // headers), then the empty stored block of a zlib sync flush: the
        // reader hands out what it has only when it meets that one.
        let block = 0u32.to_be_bytes();
        let len = block.len() as u16;
        payload.push(0x00);
        payload.extend_from_slice(&len.to_le_bytes());
        payload.extend_from_slice(&(!len).to_le_bytes());
        payload.extend_from_slice(&block);
        payload.extend_from_slice(&[0x00, 0x00, 0x00, 0xff, 0xff]);
        control(SYN_REPLY, 0, &payload)
    }
}

impl Writer {
    /// Data on `stream`; `fin` ends this side of it.
    pub async fn data(&self, stream: u32, fin: bool, payload: &[u8]) -> io::Result<()> {
        self.send(data(stream, fin, payload)).await
    }

    /// Resets a stream the client opened (RST_STREAM, CANCEL).
    pub async fn reset(&self, stream: u32) -> io::Result<()> {
        let mut payload = stream.to_be_bytes().to_vec();
        payload.extend_from_slice(&5u32.to_be_bytes());
        self.send(control(RST_STREAM, 0, &payload)).await
    }

    async fn send(&self, frame: Vec<u8>) -> io::Result<()> {
        self.0
            .send(frame)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "SPDY connection closed"))
    }
}

impl Headers {
    /// The first value of `name` (lower-case).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// SPDY/3's name/value block: a count, then length-prefixed names and
    /// values (a value may hold several, NUL-separated; the first counts).
    fn decode(block: &[u8]) -> io::Result<Headers> {
        let mut rest = block;
        let count = take_u32(&mut rest)?;
        let mut headers = Vec::new();
        for _ in 0..count {
            let name = take_string(&mut rest)?.to_ascii_lowercase();
            let value = take_string(&mut rest)?;
            let first = value.split('\0').next().unwrap_or_default().to_owned();
            headers.push((name, first));
        }
        Ok(Headers(headers))
    }
}

fn take_u32(rest: &mut &[u8]) -> io::Result<u32> {
    match rest {
        [a, b, c, d, tail @ ..] => {
            let n = u32::from_be_bytes([*a, *b, *c, *d]);
            *rest = tail;
            Ok(n)
        }
        _ => Err(invalid("truncated SPDY header block")),
    }
}

fn take_string(rest: &mut &[u8]) -> io::Result<String> {
    let len = take_u32(rest)? as usize;
    if rest.len() < len {
        return Err(invalid("truncated SPDY header block"));
    }
    let (bytes, tail) = rest.split_at(len);
    *rest = tail;
    Ok(String::from_utf8_lossy(bytes).into_owned())
}

/// The zlib context of the client's header blocks.
struct Inflater(Decompress);

impl Inflater {
    fn new() -> Self {
        Inflater(Decompress::new(true))
    }

    fn inflate(&mut self, mut input: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(1024);
        loop {
            if out.len() == out.capacity() {
                if out.len() >= MAX_HEADERS {
                    return Err(invalid("SPDY header block too large"));
                }
                out.reserve(out.capacity());
            }
            let before = self.0.total_in();
            let result = self
                .0
                .decompress_vec(input, &mut out, FlushDecompress::Sync);
            let used = (self.0.total_in() - before) as usize;
            input = &input[used..];
            match result {
                Ok(Status::Ok | Status::BufError)
                    if input.is_empty() && out.len() < out.capacity() =>
                {
                    return Ok(out);
                }
                Ok(Status::StreamEnd) => return Ok(out),
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.0
                        .set_dictionary(&dictionary())
                        .map_err(|e| invalid(&format!("SPDY header dictionary: {e}")))?;
                }
                Err(e) => return Err(invalid(&format!("SPDY header block: {e}"))),
            }
        }
    }
}

fn dictionary() -> Vec<u8> {
    let mut dictionary = Vec::with_capacity(1423);
    for word in DICTIONARY_WORDS {
        dictionary.extend_from_slice(&(word.len() as u32).to_be_bytes());
        dictionary.extend_from_slice(word.as_bytes());
    }
    dictionary.extend_from_slice(DICTIONARY_TAIL.as_bytes());
    dictionary
}

enum Frame {
    Control {
        kind: u16,
        payload: Vec<u8>,
    },
    Data {
        stream: u32,
        flags: u8,
        payload: Vec<u8>,
    },
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Frame>> {
    let mut head = [0u8; 8];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let flags = head[4];
    let len = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
    if len > MAX_FRAME {
        return Err(invalid("SPDY frame too large"));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    if head[0] & 0x80 != 0 {
        Ok(Some(Frame::Control {
            kind: u16::from_be_bytes([head[2], head[3]]),
            payload,
        }))
    } else {
        Ok(Some(Frame::Data {
            stream: u32::from_be_bytes([head[0], head[1], head[2], head[3]]) & 0x7fff_ffff,
            flags,
            payload,
        }))
    }
}

fn stream_id(payload: &[u8]) -> io::Result<u32> {
    match payload {
        [a, b, c, d, ..] => Ok(u32::from_be_bytes([*a, *b, *c, *d]) & 0x7fff_ffff),
        _ => Err(invalid("short SPDY frame")),
    }
}

fn control(kind: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x80, 0x03];
    frame.extend_from_slice(&kind.to_be_bytes());
    frame.push(flags);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    frame.extend_from_slice(payload);
    frame
}

fn data(stream: u32, fin: bool, payload: &[u8]) -> Vec<u8> {
    let mut frame = (stream & 0x7fff_ffff).to_be_bytes().to_vec();
    frame.push(if fin { FLAG_FIN } else { 0 });
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    frame.extend_from_slice(payload);
    frame
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::{Compress, Compression, FlushCompress};

    #[test]
    fn the_dictionary_is_spdy_3_s() {
        let dictionary = dictionary();
        assert_eq!(dictionary.len(), 1423);
        // zlib names a preset dictionary by its Adler-32; this is the one
        // in the header of every spdystream header block.
        let mut a: u32 = 1;
        let mut b: u32 = 0;
        for byte in &dictionary {
            a = (a + u32::from(*byte)) % 65521;
            b = (b + a) % 65521;
        }
        assert_eq!((b << 16) | a, 0xe3c6_a7c2);
    }

    fn block(headers: &[(&str, &str)]) -> Vec<u8> {
        let mut out = (headers.len() as u32).to_be_bytes().to_vec();
        for (k, v) in headers {
            out.extend_from_slice(&(k.len() as u32).to_be_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v.as_bytes());
        }
        out
    }

    #[test]
    fn header_blocks_inflate_across_one_context() {
        let mut deflate = Compress::new(Compression::default(), true);
        deflate.set_dictionary(&dictionary()).unwrap();
        let mut inflater = Inflater::new();
        for (kind, port) in [("error", "8080"), ("data", "8080"), ("error", "9090")] {
            let plain = block(&[("streamType", kind), ("port", port), ("requestID", "0")]);
            let mut compressed = Vec::with_capacity(1024);
            deflate
                .compress_vec(&plain, &mut compressed, FlushCompress::Sync)
                .unwrap();
            let headers = Headers::decode(&inflater.inflate(&compressed).unwrap()).unwrap();
            assert_eq!(headers.get("streamtype"), Some(kind));
            assert_eq!(headers.get("port"), Some(port));
        }
    }

    #[test]
    fn bad_blocks_are_errors() {
        assert!(Headers::decode(&[0, 0, 0, 1, 0, 0, 0, 9, b'x']).is_err());
        assert!(Inflater::new().inflate(b"not zlib at all").is_err());
    }
}
