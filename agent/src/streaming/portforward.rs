//! Port-forward: every forwarded connection is a pair of SPDY streams the
//! client opens, `streamtype: error` then `streamtype: data`, with the
//! same `port` and `requestid` headers. The agent connects to that port on
//! the pod's loopback, inside the pod's network namespace, and splices.
//! kubectl's default carries the SPDY bytes in binary WebSocket messages
//! (`SPDY/3.1+portforward.k8s.io`): [`tunnel`] unwraps them.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::session::BoxFuture;
use super::spdy::{self, Event};
use super::websocket::{self, Message};

/// How long a connection to the pod's port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a connection to a port of the pod.
pub type Dialer = Arc<dyn Fn(u16) -> BoxFuture<io::Result<TcpStream>> + Send + Sync>;

/// A dialer for a pod whose network namespace is `netns` (none: the
/// host's, for `hostNetwork` pods): it connects to 127.0.0.1:PORT from a
/// thread of its own that has joined the namespace, so no runtime thread
/// ever changes namespace, and hands the socket to tokio.
pub fn netns_dialer(netns: Option<PathBuf>) -> Dialer {
    Arc::new(move |port| {
        let netns = netns.clone();
        Box::pin(async move {
            let (tx, rx) = oneshot::channel();
            std::thread::Builder::new()
                .name("portforward-dial".into())
                .spawn(move || {
                    let _ = tx.send(connect_in(netns.as_deref(), port));
                })?;
            let stream = rx
                .await
                .map_err(|_| io::Error::other("the dialing thread died"))??;
            TcpStream::from_std(stream)
        })
    })
}

fn connect_in(netns: Option<&std::path::Path>, port: u16) -> io::Result<std::net::TcpStream> {
    if let Some(path) = netns {
        let file = std::fs::File::open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| io::Error::other(format!("joining {}: {e}", path.display())))?;
    }
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    stream.set_nonblocking(true)?;
    Ok(stream)
}

/// Forwarded connections with one of their two streams open, at most.
const MAX_HALF_OPEN: usize = 1024;

/// One forwarded connection while its streams are being opened.
#[derive(Default)]
struct Pair {
    error: Option<u32>,
    data: Option<u32>,
}

/// Serves one port-forward SPDY connection until the client goes away.
/// `pod` names the pod in error messages.
pub async fn over_spdy<IO>(io: IO, pod: String, dial: Dialer) -> io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let mut conn = spdy::Connection::new(io);
    let writer = conn.writer();
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    // Client data for each connection's data stream.
    let mut to_backend: HashMap<u32, mpsc::Sender<Vec<u8>>> = HashMap::new();
    while let Some(event) = conn.next().await? {
        match event {
            Event::Stream { id, headers } => {
                let Some(port) = headers.get("port").and_then(|p| p.parse::<u16>().ok()) else {
                    let _ = writer.reset(id).await;
                    continue;
                };
                // Clients before requestID paired streams by port alone.
                let key = format!("{port}/{}", headers.get("requestid").unwrap_or(""));
                // A pair waits only until its second stream comes; a client
                // that keeps opening halves must not grow the table.
                if pairs.len() >= MAX_HALF_OPEN && !pairs.contains_key(&key) {
                    let _ = writer.reset(id).await;
                    continue;
                }
                let pair = pairs.entry(key.clone()).or_default();
                match headers.get("streamtype") {
                    Some("error") => pair.error = Some(id),
                    Some("data") => pair.data = Some(id),
                    _ => {
                        let _ = writer.reset(id).await;
                        continue;
                    }
                }
                if let Some(Pair {
                    error: Some(error),
                    data: Some(data),
                }) = pairs.get(&key)
                {
                    let (tx, rx) = mpsc::channel(16);
                    to_backend.insert(*data, tx);
                    tokio::spawn(forward(
                        writer.clone(),
                        *error,
                        *data,
                        port,
                        pod.clone(),
                        dial.clone(),
                        rx,
                    ));
                    pairs.remove(&key);
                }
            }
            Event::Data { id, fin, payload } => {
                if let Some(tx) = to_backend.get(&id)
                    && !payload.is_empty()
                    && tx.send(payload).await.is_err()
                {
                    to_backend.remove(&id);
                }
                if fin {
                    to_backend.remove(&id);
                }
            }
            Event::Reset { id } => {
                to_backend.remove(&id);
            }
        }
    }
    Ok(())
}

/// One forwarded connection: connect, then copy both ways; a failure to
/// connect goes back on the error stream, as kubelet reports it.
async fn forward(
    writer: spdy::Writer,
    error: u32,
    data: u32,
    port: u16,
    pod: String,
    dial: Dialer,
    mut from_client: mpsc::Receiver<Vec<u8>>,
) {
    let backend = match dial(port).await {
        Ok(backend) => backend,
        Err(e) => {
            let message = format!("error forwarding port {port} to pod {pod}: {e}");
            let _ = writer.data(error, false, message.as_bytes()).await;
            let _ = writer.data(error, true, &[]).await;
            let _ = writer.data(data, true, &[]).await;
            return;
        }
    };
    let _ = backend.set_nodelay(true);
    let (mut from_backend, mut to_backend) = backend.into_split();
    let upstream = tokio::spawn(async move {
        while let Some(chunk) = from_client.recv().await {
            if to_backend.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to_backend.shutdown().await;
    });
    let mut buffer = vec![0u8; 32 * 1024];
    loop {
        match from_backend.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if writer.data(data, false, &buffer[..n]).await.is_err() {
                    upstream.abort();
                    return;
                }
            }
        }
    }
    let _ = writer.data(data, true, &[]).await;
    let _ = writer.data(error, true, &[]).await;
    let _ = upstream.await;
}

/// Port-forward's SPDY carried in binary WebSocket messages: unwraps them
/// into a byte stream for the SPDY session and wraps its output back.
pub async fn tunnel<IO>(io: IO, pod: String, dial: Dialer) -> io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (inner, session_side) = tokio::io::duplex(64 * 1024);
    let session = tokio::spawn(over_spdy(session_side, pod, dial));
    let (ws_reader, mut ws_writer) = tokio::io::split(io);
    let (mut from_session, mut to_session) = tokio::io::split(inner);
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
    let session_out = out.clone();
    let pump = tokio::spawn(async move {
        let mut buffer = vec![0u8; 32 * 1024];
        while let Ok(n) = from_session.read(&mut buffer).await {
            if n == 0
                || session_out
                    .send((websocket::BINARY, buffer[..n].to_vec()))
                    .await
                    .is_err()
            {
                break;
            }
        }
    });
    let mut reader = websocket::Reader::new(ws_reader);
    while let Ok(Some(message)) = reader.next().await {
        match message {
            Message::Data(bytes) => {
                if to_session.write_all(&bytes).await.is_err() {
                    break;
                }
            }
            Message::Ping(payload) => {
                let _ = out.send((websocket::PONG, payload)).await;
            }
            Message::Close => {
                let _ = out
                    .send((websocket::CLOSE, websocket::NORMAL_CLOSURE.to_vec()))
                    .await;
                break;
            }
        }
    }
    let _ = to_session.shutdown().await;
    drop(out);
    let _ = session.await;
    // Forwarded connections still open end with the client gone.
    pump.abort();
    let _ = writer.await;
    Ok(())
}
