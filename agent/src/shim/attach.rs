//! The shim's attach socket: `attach.sock` in the state directory.
//!
//! Frames both ways are `[kind: u8][length: u32 BE][payload]`. A client
//! starts with HELLO (payload: three bytes, stdin/stdout/stderr wanted),
//! then sends STDIN data, CLOSE_STDIN and RESIZE (`width, height` as u16
//! BE). The shim sends STDOUT and STDERR as the container writes them (a
//! container on a terminal has only STDOUT), and EXIT (payload: the
//! [`ExitStatus`] as JSON) once the container has ended and its output is
//! out, then closes. A client that wants nothing just waits for EXIT.

use std::io;
use std::path::Path;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use super::{ATTACH_SOCKET, ExitStatus, socket_path};

pub(super) const STDIN: u8 = 0;
pub(super) const STDOUT: u8 = 1;
pub(super) const STDERR: u8 = 2;
pub(super) const EXIT: u8 = 3;
pub(super) const RESIZE: u8 = 4;
pub(super) const CLOSE_STDIN: u8 = 5;
pub(super) const HELLO: u8 = 6;

/// The largest frame either side accepts.
const MAX_FRAME: usize = 1 << 20;

/// The streams a client attaches to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wants {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
}

impl Wants {
    pub const NOTHING: Wants = Wants {
        stdin: false,
        stdout: false,
        stderr: false,
    };
}

/// What the shim sends an attached client.
#[derive(Debug)]
pub enum Event {
    Stdout(Bytes),
    Stderr(Bytes),
    Exit(ExitStatus),
}

/// A connection to a shim's attach socket.
pub struct Client {
    events: Events,
    input: Input,
}

/// The receiving half of a [`Client`].
pub struct Events(OwnedReadHalf);

/// The sending half of a [`Client`].
pub struct Input(OwnedWriteHalf);

impl Client {
    /// Attaches to the shim of the container whose state is in `state_dir`.
    pub async fn connect(state_dir: &Path, wants: Wants) -> io::Result<Client> {
        let (path, _dir) = socket_path(state_dir, ATTACH_SOCKET)?;
        let stream = UnixStream::connect(&path).await?;
        let (reader, mut writer) = stream.into_split();
        let hello = [
            u8::from(wants.stdin),
            u8::from(wants.stdout),
            u8::from(wants.stderr),
        ];
        write_frame(&mut writer, HELLO, &hello).await?;
        Ok(Client {
            events: Events(reader),
            input: Input(writer),
        })
    }

    pub async fn next(&mut self) -> io::Result<Option<Event>> {
        self.events.next().await
    }

    pub fn split(self) -> (Events, Input) {
        (self.events, self.input)
    }
}

impl Events {
    /// The next event; `None` when the shim closed the connection.
    pub async fn next(&mut self) -> io::Result<Option<Event>> {
        loop {
            let Some((kind, payload)) = read_frame(&mut self.0).await? else {
                return Ok(None);
            };
            match kind {
                STDOUT => return Ok(Some(Event::Stdout(payload.into()))),
                STDERR => return Ok(Some(Event::Stderr(payload.into()))),
                EXIT => {
                    let status = serde_json::from_slice(&payload)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    return Ok(Some(Event::Exit(status)));
                }
                // Unknown frames come from a newer shim: skip them.
                _ => {}
            }
        }
    }
}

impl Input {
    pub async fn stdin(&mut self, data: &[u8]) -> io::Result<()> {
        for chunk in data.chunks(MAX_FRAME) {
            write_frame(&mut self.0, STDIN, chunk).await?;
        }
        Ok(())
    }

    pub async fn close_stdin(&mut self) -> io::Result<()> {
        write_frame(&mut self.0, CLOSE_STDIN, &[]).await
    }

    pub async fn resize(&mut self, width: u16, height: u16) -> io::Result<()> {
        let mut size = [0u8; 4];
        size[..2].copy_from_slice(&width.to_be_bytes());
        size[2..].copy_from_slice(&height.to_be_bytes());
        write_frame(&mut self.0, RESIZE, &size).await
    }
}

pub(super) async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("attach frame of {len} bytes is too large"),
        ));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await?;
    Ok(Some((head[0], payload)))
}

pub(super) async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: u8,
    payload: &[u8],
) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "attach frame too large"))?;
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&len.to_be_bytes());
    w.write_all(&head).await?;
    w.write_all(payload).await?;
    w.flush().await
}

/// The (width, height) of a RESIZE payload.
pub(super) fn parse_resize(payload: &[u8]) -> Option<(u16, u16)> {
    match payload {
        [w0, w1, h0, h1] => Some((
            u16::from_be_bytes([*w0, *w1]),
            u16::from_be_bytes([*h0, *h1]),
        )),
        _ => None,
    }
}
