//! One exec or attach session, whichever protocol carries it: kubectl's
//! WebSocket channel protocols (`v5.channel.k8s.io`, `v4.channel.k8s.io`)
//! or SPDY/3.1 (`v4.channel.k8s.io` streams). The protocol side turns
//! frames into the channels of an [`Io`]; a [`Process`] (runc exec, an
//! attach to the shim, or a test's fake) reads and writes those and ends
//! with an [`Outcome`], which goes back as the v4 protocols' Status.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::spdy::{self, Event};
use super::websocket::{self, Message};

/// How long the client has to open the streams it asked for, as kubelet's
/// stream creation timeout.
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
/// After the status is out, how long the client has to close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// After the process ends, how long its output may take to drain.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The streams a request asked for (kubelet's `input`, `output`, `error`
/// and `tty` query flags).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamFlags {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

/// A terminal size as the resize stream carries it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub struct TermSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// The process's side of the session's streams. `stdin` ends when the
/// client closes its stdin; dropping `stdout`/`stderr` ends those.
pub struct Io {
    pub stdin: Option<mpsc::Receiver<Bytes>>,
    pub resize: Option<mpsc::Receiver<TermSize>>,
    pub stdout: Option<mpsc::Sender<Bytes>>,
    pub stderr: Option<mpsc::Sender<Bytes>>,
    /// Turns true when the client has gone away: nothing it runs can be
    /// seen any more.
    pub gone: watch::Receiver<bool>,
}

impl Io {
    /// Resolves once the client has gone away.
    pub fn client_gone(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut gone = self.gone.clone();
        async move {
            let _ = gone.wait_for(|gone| *gone).await;
        }
    }
}

/// How a session's process ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Exited(i32),
    Failed(String),
}

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What a session runs.
pub type Process = Box<dyn FnOnce(Io) -> BoxFuture<Outcome> + Send>;

impl StreamFlags {
    /// A terminal merges stderr into stdout: kubelet drops a stderr
    /// request on a tty session.
    pub fn normalized(mut self) -> Self {
        if self.tty {
            self.stderr = false;
        }
        self
    }
}

/// The session's end as the v4 protocols report it: a `Status`, with a
/// non-zero exit code as `NonZeroExitCode` and its code in the causes.
pub fn status_json(outcome: &Outcome) -> String {
    let status = match outcome {
        Outcome::Exited(0) => serde_json::json!({"metadata": {}, "status": "Success"}),
        Outcome::Exited(code) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": format!("command terminated with non-zero exit code: exit status {code}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        }),
        Outcome::Failed(message) => serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": "InternalError",
            "code": 500,
        }),
    };
    status.to_string()
}

/// The process's channels and the protocol side's ends of them.
struct Ends {
    stdin: Option<mpsc::Sender<Bytes>>,
    resize: Option<mpsc::Sender<TermSize>>,
    stdout: Option<mpsc::Receiver<Bytes>>,
    stderr: Option<mpsc::Receiver<Bytes>>,
}

fn channels(flags: StreamFlags, gone: watch::Receiver<bool>) -> (Io, Ends) {
    fn pair<T>(wanted: bool) -> (Option<mpsc::Sender<T>>, Option<mpsc::Receiver<T>>) {
        if wanted {
            let (tx, rx) = mpsc::channel(16);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        }
    }
    let (stdin_tx, stdin_rx) = pair(flags.stdin);
    let (resize_tx, resize_rx) = pair(flags.tty);
    let (stdout_tx, stdout_rx) = pair(flags.stdout);
    let (stderr_tx, stderr_rx) = pair(flags.stderr);
    (
        Io {
            stdin: stdin_rx,
            resize: resize_rx,
            stdout: stdout_tx,
            stderr: stderr_tx,
            gone,
        },
        Ends {
            stdin: stdin_tx,
            resize: resize_tx,
            stdout: stdout_rx,
            stderr: stderr_rx,
        },
    )
}

/// Runs `process` over the WebSocket channel protocol: every message is
/// one stream's bytes behind a channel byte (0 stdin, 1 stdout, 2 stderr,
/// 3 status, 4 resize; v5 adds 255, "this stream is closed").
pub async fn over_websocket<IO>(io: IO, flags: StreamFlags, process: Process) -> io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let flags = flags.normalized();
    let (reader, mut ws_writer) = tokio::io::split(io);
    let (out, mut frames) = mpsc::channel::<(u8, Vec<u8>)>(64);
    let writer = tokio::spawn(async move {
        while let Some((opcode, payload)) = frames.recv().await {
            if websocket::write(&mut ws_writer, opcode, &payload)
                .await
                .is_err()
            {
                break;
            }
        }
        let _ = ws_writer.shutdown().await;
    });
    let (gone, gone_rx) = watch::channel(false);
    let (io, ends) = channels(flags, gone_rx);
    let Ends {
        stdin,
        resize,
        stdout,
        stderr,
    } = ends;
    let reading = tokio::spawn({
        let out = out.clone();
        async move {
            read_websocket(websocket::Reader::new(reader), stdin, resize, out).await;
            let _ = gone.send(true);
        }
    });
    let mut pumps = Vec::new();
    for (channel, rx) in [(1u8, stdout), (2u8, stderr)] {
        if let Some(mut rx) = rx {
            let out = out.clone();
            pumps.push(tokio::spawn(async move {
                while let Some(data) = rx.recv().await {
                    let mut message = Vec::with_capacity(data.len() + 1);
                    message.push(channel);
                    message.extend_from_slice(&data);
                    if out.send((websocket::BINARY, message)).await.is_err() {
                        break;
                    }
                }
            }));
        }
    }
    let outcome = process(io).await;
    drain(pumps).await;
    let mut status = vec![3];
    status.extend_from_slice(status_json(&outcome).as_bytes());
    let _ = out.send((websocket::BINARY, status)).await;
    let _ = out
        .send((websocket::CLOSE, websocket::NORMAL_CLOSURE.to_vec()))
        .await;
    // The client answers the close; until then it may still be reading.
    finish(reading).await;
    drop(out);
    let _ = writer.await;
    Ok(())
}

async fn read_websocket<R: AsyncRead + Unpin>(
    mut reader: websocket::Reader<R>,
    mut stdin: Option<mpsc::Sender<Bytes>>,
    resize: Option<mpsc::Sender<TermSize>>,
    out: mpsc::Sender<(u8, Vec<u8>)>,
) {
    while let Ok(Some(message)) = reader.next().await {
        match message {
            Message::Close => break,
            Message::Ping(payload) => {
                let _ = out.send((websocket::PONG, payload)).await;
            }
            Message::Data(message) => match message.split_first() {
                Some((0, input)) => {
                    if let Some(tx) = &stdin
                        && !input.is_empty()
                        && tx.send(Bytes::copy_from_slice(input)).await.is_err()
                    {
                        stdin = None;
                    }
                }
                Some((4, size)) => {
                    if let (Some(tx), Ok(size)) = (&resize, serde_json::from_slice(size)) {
                        let _ = tx.send(size).await;
                    }
                }
                // v5: the client closed its stdin.
                Some((255, [0])) => stdin = None,
                _ => {}
            },
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Error,
    Stdin,
    Stdout,
    Stderr,
    Resize,
}

/// Runs `process` over SPDY: the client opens one stream per role
/// (`streamtype` error, stdin, stdout, stderr, resize), then the session
/// runs; the status goes out on the error stream.
pub async fn over_spdy<IO>(io: IO, flags: StreamFlags, process: Process) -> io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let flags = flags.normalized();
    let mut conn = spdy::Connection::new(io);
    let writer = conn.writer();
    let mut expected = vec![Role::Error];
    for (wanted, role) in [
        (flags.stdin, Role::Stdin),
        (flags.stdout, Role::Stdout),
        (flags.stderr, Role::Stderr),
        (flags.tty, Role::Resize),
    ] {
        if wanted {
            expected.push(role);
        }
    }
    let (gone, gone_rx) = watch::channel(false);
    let (io, ends) = channels(flags, gone_rx);
    let mut router = Router {
        roles: Vec::new(),
        stdin: ends.stdin,
        resize: ends.resize,
        resize_buffer: Vec::new(),
    };
    let opened = tokio::time::timeout(STREAM_CREATION_TIMEOUT, async {
        while !expected.iter().all(|r| router.id(*r).is_some()) {
            match conn.next().await? {
                Some(event) => router.route(event).await,
                None => return Ok(false),
            }
        }
        Ok::<_, io::Error>(true)
    })
    .await;
    match opened {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "timed out waiting for the client to create streams",
            ));
        }
    }
    let error_stream = router.id(Role::Error);
    let mut pumps = Vec::new();
    for (role, rx) in [(Role::Stdout, ends.stdout), (Role::Stderr, ends.stderr)] {
        if let (Some(mut rx), Some(id)) = (rx, router.id(role)) {
            let writer = writer.clone();
            pumps.push(tokio::spawn(async move {
                while let Some(data) = rx.recv().await {
                    if writer.data(id, false, &data).await.is_err() {
                        return;
                    }
                }
                let _ = writer.data(id, true, &[]).await;
            }));
        }
    }
    let reading = tokio::spawn(async move {
        while let Ok(Some(event)) = conn.next().await {
            router.route(event).await;
        }
        let _ = gone.send(true);
    });
    let outcome = process(io).await;
    drain(pumps).await;
    if let Some(id) = error_stream {
        let _ = writer
            .data(id, false, status_json(&outcome).as_bytes())
            .await;
        let _ = writer.data(id, true, &[]).await;
    }
    finish(reading).await;
    Ok(())
}

/// Where the client's SPDY streams go.
struct Router {
    roles: Vec<(u32, Role)>,
    stdin: Option<mpsc::Sender<Bytes>>,
    resize: Option<mpsc::Sender<TermSize>>,
    resize_buffer: Vec<u8>,
}

impl Router {
    fn id(&self, role: Role) -> Option<u32> {
        self.roles
            .iter()
            .find(|(_, r)| *r == role)
            .map(|(id, _)| *id)
    }

    fn role(&self, id: u32) -> Option<Role> {
        self.roles.iter().find(|(i, _)| *i == id).map(|(_, r)| *r)
    }

    async fn route(&mut self, event: Event) {
        match event {
            Event::Stream { id, headers } => {
                let role = match headers.get("streamtype") {
                    Some("error") => Role::Error,
                    Some("stdin") => Role::Stdin,
                    Some("stdout") => Role::Stdout,
                    Some("stderr") => Role::Stderr,
                    Some("resize") => Role::Resize,
                    _ => return,
                };
                // One stream per role, as upstream: a client opening more
                // would otherwise grow the list without bound.
                if self.id(role).is_none() {
                    self.roles.push((id, role));
                }
            }
            Event::Data { id, fin, payload } => match self.role(id) {
                Some(Role::Stdin) => {
                    if let Some(tx) = &self.stdin
                        && !payload.is_empty()
                        && tx.send(Bytes::from(payload)).await.is_err()
                    {
                        self.stdin = None;
                    }
                    if fin {
                        self.stdin = None;
                    }
                }
                Some(Role::Resize) => {
                    // JSON objects, one after another, split anywhere.
                    self.resize_buffer.extend_from_slice(&payload);
                    let mut sizes = serde_json::Deserializer::from_slice(&self.resize_buffer)
                        .into_iter::<TermSize>();
                    let mut parsed = Vec::new();
                    while let Some(Ok(size)) = sizes.next() {
                        parsed.push(size);
                    }
                    let used = sizes.byte_offset();
                    self.resize_buffer.drain(..used);
                    if self.resize_buffer.len() > 4096 {
                        self.resize_buffer.clear();
                    }
                    if let Some(tx) = &self.resize {
                        for size in parsed {
                            let _ = tx.send(size).await;
                        }
                    }
                }
                _ => {}
            },
            Event::Reset { id } => {
                if self.role(id) == Some(Role::Stdin) {
                    self.stdin = None;
                }
            }
        }
    }
}

async fn drain(pumps: Vec<JoinHandle<()>>) {
    for pump in pumps {
        if tokio::time::timeout(DRAIN_TIMEOUT, pump).await.is_err() {
            tracing::debug!("session output did not drain in time");
        }
    }
}

async fn finish(reading: JoinHandle<()>) {
    let abort = reading.abort_handle();
    if tokio::time::timeout(CLOSE_TIMEOUT, reading).await.is_err() {
        abort.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_as_kubelet_s() {
        assert_eq!(
            status_json(&Outcome::Exited(0)),
            r#"{"metadata":{},"status":"Success"}"#
        );
        let failed: serde_json::Value =
            serde_json::from_str(&status_json(&Outcome::Exited(3))).unwrap();
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(failed["details"]["causes"][0]["message"], "3");
        let broken: serde_json::Value =
            serde_json::from_str(&status_json(&Outcome::Failed("no \"sh\"".into()))).unwrap();
        assert_eq!(broken["message"], "no \"sh\"");
    }

    #[test]
    fn a_tty_has_no_stderr() {
        let flags = StreamFlags {
            stdin: true,
            stdout: true,
            stderr: true,
            tty: true,
        };
        assert!(!flags.normalized().stderr);
    }
}
