//! Just enough SPDY/3.1 for the fake agent's side of kubectl's SPDY
//! streams (exec's fallback and port-forward, plain or tunnelled in a
//! WebSocket).
//!
//! The fake never inflates the client's header blocks: kubectl creates its
//! streams one at a time, each waiting for the reply, in a fixed order
//! (exec: error, stdin, stdout, stderr; port-forward: error then data per
//! connection), so a stream's role follows from its position. Replies
//! carry an empty header block in a stored (uncompressed) deflate block,
//! which the client's zlib reader takes like any other.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::kubelet::Process;

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const FLAG_FIN: u8 = 0x01;

/// What the session serves.
pub enum Mode {
    Exec(Process),
    /// Every forwarded connection goes to this (echo) server.
    PortForward(SocketAddr),
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

/// Serves one SPDY connection until the client goes away.
pub async fn serve<IO>(io: IO, mode: Mode) -> io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (reader, mut writer) = tokio::io::split(io);
    let (out, mut frames) = mpsc::channel::<Vec<u8>>(64);
    let write_task = tokio::spawn(async move {
        while let Some(frame) = frames.recv().await {
            writer.write_all(&frame).await?;
            writer.flush().await?;
        }
        writer.shutdown().await
    });
    let result = match mode {
        Mode::Exec(process) => exec(reader, out, process).await,
        Mode::PortForward(echo) => port_forward(reader, out, echo).await,
    };
    let written = write_task.await.map_err(io::Error::other)?;
    result.and(written)
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Role {
    Error,
    Stdin,
    Stdout,
    Stderr,
    Resize,
}

async fn exec<R: AsyncRead + Unpin>(
    mut reader: R,
    out: mpsc::Sender<Vec<u8>>,
    process: Process,
) -> io::Result<()> {
    let roles = process.spdy_roles();
    let mut streams: HashMap<Role, u32> = HashMap::new();
    let mut replies = Replies::default();
    let mut finished = false;
    while let Some(frame) = read_frame(&mut reader).await? {
        match frame {
            Frame::Control {
                kind: SYN_STREAM,
                payload,
            } => {
                let id = stream_id(&payload)?;
                send(&out, replies.reply(id)).await?;
                if let Some(role) = roles.get(streams.len()) {
                    streams.insert(*role, id);
                }
                if streams.len() == roles.len() && !process.echo_stdin && !finished {
                    finish(&out, &streams, &process).await?;
                    finished = true;
                }
            }
            Frame::Data {
                stream,
                flags,
                payload,
            } if Some(&stream) == streams.get(&Role::Stdin) => {
                if let Some(stdout) = streams.get(&Role::Stdout)
                    && !payload.is_empty()
                {
                    send(&out, data(*stdout, false, &payload)).await?;
                }
                if flags & FLAG_FIN != 0 && !finished {
                    finish(&out, &streams, &process).await?;
                    finished = true;
                }
            }
            Frame::Control {
                kind: PING,
                payload,
            } => {
                send(&out, control(PING, 0, &payload)).await?;
            }
            Frame::Control { kind: GOAWAY, .. } => break,
            _ => {}
        }
    }
    Ok(())
}

/// The process has ended: output, end of output, exit status.
async fn finish(
    out: &mpsc::Sender<Vec<u8>>,
    streams: &HashMap<Role, u32>,
    process: &Process,
) -> io::Result<()> {
    if let Some(stdout) = streams.get(&Role::Stdout) {
        if !process.output.is_empty() {
            send(out, data(*stdout, false, &process.output)).await?;
        }
        send(out, data(*stdout, true, &[])).await?;
    }
    if let Some(stderr) = streams.get(&Role::Stderr) {
        send(out, data(*stderr, true, &[])).await?;
    }
    if let Some(error) = streams.get(&Role::Error) {
        send(out, data(*error, false, process.status().as_bytes())).await?;
        send(out, data(*error, true, &[])).await?;
    }
    Ok(())
}

async fn port_forward<R: AsyncRead + Unpin>(
    mut reader: R,
    out: mpsc::Sender<Vec<u8>>,
    echo: SocketAddr,
) -> io::Result<()> {
    let mut replies = Replies::default();
    let mut created = 0usize;
    let mut error_stream = None;
    let mut backends: HashMap<u32, tokio::net::tcp::OwnedWriteHalf> = HashMap::new();
    while let Some(frame) = read_frame(&mut reader).await? {
        match frame {
            Frame::Control {
                kind: SYN_STREAM,
                payload,
            } => {
                let id = stream_id(&payload)?;
                send(&out, replies.reply(id)).await?;
                // Each forwarded connection opens its error stream first.
                if created.is_multiple_of(2) {
                    error_stream = Some(id);
                } else {
                    let backend = TcpStream::connect(echo).await?;
                    let (from_backend, to_backend) = backend.into_split();
                    backends.insert(id, to_backend);
                    tokio::spawn(pump(from_backend, out.clone(), id, error_stream.take()));
                }
                created += 1;
            }
            Frame::Data {
                stream,
                flags,
                payload,
            } => {
                if let Some(backend) = backends.get_mut(&stream) {
                    if !payload.is_empty() {
                        backend.write_all(&payload).await?;
                    }
                    if flags & FLAG_FIN != 0 {
                        backend.shutdown().await?;
                        backends.remove(&stream);
                    }
                }
            }
            Frame::Control {
                kind: RST_STREAM,
                payload,
            } => {
                backends.remove(&stream_id(&payload)?);
            }
            Frame::Control {
                kind: PING,
                payload,
            } => {
                send(&out, control(PING, 0, &payload)).await?;
            }
            Frame::Control { kind: GOAWAY, .. } => break,
            Frame::Control { .. } => {}
        }
    }
    Ok(())
}

/// Backend output to the data stream; at its end, the end of both streams
/// of the pair (an empty error stream means no error).
async fn pump(
    mut backend: tokio::net::tcp::OwnedReadHalf,
    out: mpsc::Sender<Vec<u8>>,
    stream: u32,
    error_stream: Option<u32>,
) -> io::Result<()> {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = backend.read(&mut buffer).await?;
        if n == 0 {
            break;
        }
        send(&out, data(stream, false, &buffer[..n])).await?;
    }
    send(&out, data(stream, true, &[])).await?;
    if let Some(error) = error_stream {
        send(&out, data(error, true, &[])).await?;
    }
    Ok(())
}

async fn send(out: &mpsc::Sender<Vec<u8>>, frame: Vec<u8>) -> io::Result<()> {
    out.send(frame)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "SPDY writer gone"))
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
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "short SPDY frame",
        )),
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

/// SYN_REPLY frames. Header blocks of one connection form one zlib stream,
/// so only the first carries the zlib header.
#[derive(Default)]
struct Replies {
    started: bool,
}

impl Replies {
    fn reply(&mut self, stream: u32) -> Vec<u8> {
        let mut payload = stream.to_be_bytes().to_vec();
        if !self.started {
            // CMF/FLG: deflate, 32K window, no preset dictionary.
            payload.extend_from_slice(&[0x78, 0x01]);
            self.started = true;
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

impl Process {
    /// The streams kubectl opens for this exec, in the order it opens them.
    fn spdy_roles(&self) -> Vec<Role> {
        let mut roles = vec![Role::Error];
        if self.stdin {
            roles.push(Role::Stdin);
        }
        if self.stdout {
            roles.push(Role::Stdout);
        }
        if self.stderr {
            roles.push(Role::Stderr);
        }
        if self.tty {
            roles.push(Role::Resize);
        }
        roles
    }
}
