//! The fast path: plain HTTP/1.1 keep-alive proxying without hyper. Request
//! heads are parsed with `httparse` from a per-connection buffer, routed,
//! rewritten into a reusable output buffer and sent over an idle upstream
//! connection owned by the endpoint's pool; the response head is parsed and
//! rewritten the same way and both bodies are streamed by their framing
//! (Content-Length or chunked). No task, channel or allocation per request.
//!
//! What it does not do is left to the generic (hyper) path, which takes
//! over the connection at the request boundary with the bytes already read
//! replayed: HTTP/2 prior knowledge, HTTP/1.0, `Upgrade`, `Expect`,
//! absolute-form targets, unusual framing and h2c backends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::annotations::Protocol;
use crate::buf::{Buf, Deadline};
use crate::finish::{self, Finish};
use crate::h1::{self, BadChunk, Chunked, Framing, Refusal};
use crate::pool::{self, ConnectError, Upstream};
use crate::proxy::{CONNECT_TIMEOUT, Conn, Proxy, lower};
use crate::rewind::Rewind;
use crate::route::{Backend, Route};
use crate::table::rewrite;

/// Largest request or response head; bigger requests get 431.
pub const MAX_HEAD: usize = 64 * 1024;

/// How a connection left the fast path.
pub enum End<S> {
    Closed,
    /// The rest is for the generic path, starting with the bytes given.
    Generic(Rewind<S>),
}

/// Serves requests on a client connection until it closes or needs the
/// generic path.
pub async fn serve<S>(proxy: &Proxy, conn: &Conn, mut io: S, header_timeout: Duration) -> End<S>
where
    S: AsyncRead + Finish,
{
    let mut rx = Buf::default();
    let mut out = Vec::with_capacity(4096);
    let mut deadline = Deadline::new(Instant::now() + header_timeout);
    loop {
        deadline.set(Instant::now() + header_timeout);
        // Bytes of the head seen so far without its end, so a head arriving
        // in pieces is parsed once complete, not again for every piece.
        let mut seen = 0;
        let step = loop {
            if !rx.unread().is_empty() && may_end_head(rx.unread(), seen) {
                out.clear();
                match decide(proxy, conn, rx.unread(), &mut out) {
                    Step::Partial => {}
                    step => break step,
                }
            }
            if rx.unread().len() > MAX_HEAD {
                out.clear();
                h1::write_local(
                    &mut out,
                    431,
                    "request header too large\n",
                    None,
                    false,
                    true,
                );
                break Step::Answer {
                    head_len: 0,
                    close: true,
                };
            }
            seen = rx.unread().len();
            match deadline.fill(&mut io, &mut rx).await {
                Ok(0) | Err(_) => return End::Closed,
                Ok(_) => {}
            }
        };
        let keep = match step {
            Step::Partial => false,
            Step::Generic => return End::Generic(Rewind::new(rx.into_unread(), io)),
            Step::Answer { head_len, close } => {
                rx.consume(head_len);
                if !write_out(&mut io, &out).await {
                    return End::Closed;
                }
                if close {
                    linger(&mut io, &mut rx).await;
                    return End::Closed;
                }
                true
            }
            Step::Forward { head_len, ex } => {
                rx.consume(head_len);
                match exchange(proxy, conn, &mut io, &mut rx, &mut out, ex, &mut deadline).await {
                    After::Open => true,
                    After::Close => false,
                    After::Ended => return End::Closed,
                }
            }
        };
        if !keep {
            let _ = io.shutdown().await;
            return End::Closed;
        }
    }
}

/// Whether `data`, of which the first `seen` bytes were looked at before,
/// may now hold a whole head (an empty line after the request line).
fn may_end_head(data: &[u8], seen: usize) -> bool {
    if seen == 0 {
        return true;
    }
    let from = seen.saturating_sub(3);
    data[from..].windows(2).any(|w| w == b"\n\n") || data[from..].windows(3).any(|w| w == b"\n\r\n")
}

/// Closes after an answer sent before the request was read whole: the
/// client's remaining bytes are read and dropped for a moment, so the
/// close does not reset the connection before the client read the answer.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S, rx: &mut Buf) {
    let _ = io.shutdown().await;
    let drain = async {
        let mut total = 0;
        while total < 1 << 20 {
            rx.consume(usize::MAX);
            match rx.fill(io).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// What to do with the bytes at the start of the buffer.
enum Step {
    /// No complete head yet.
    Partial,
    Generic,
    /// `out` holds the answer.
    Answer {
        head_len: usize,
        close: bool,
    },
    /// `out` holds the request head for the upstream.
    Forward {
        head_len: usize,
        ex: Exchange,
    },
}

/// How an exchange left the client's connection.
enum After {
    /// Ready for the next request.
    Open,
    /// To be closed.
    Close,
    /// Its write side already shut, with the last answer.
    Ended,
}

/// A request on its way upstream.
struct Exchange {
    route: Arc<Route>,
    backend: Arc<Backend>,
    framing: Framing,
    /// The client's connection ends after this exchange.
    close: bool,
    head_request: bool,
    idempotent: bool,
    started: Instant,
    /// Method, host and path for the access log, when it is on.
    log: Option<Box<[String; 3]>>,
}

fn decide(proxy: &Proxy, conn: &Conn, data: &[u8], out: &mut Vec<u8>) -> Step {
    let mut slots = [std::mem::MaybeUninit::<httparse::Header<'_>>::uninit(); h1::MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let bad = |out: &mut Vec<u8>, status, text| {
        h1::write_local(out, status, text, None, false, true);
        Step::Answer {
            head_len: 0,
            close: true,
        }
    };
    let head_len = match req.parse_with_uninit_headers(data, &mut slots) {
        Ok(httparse::Status::Complete(n)) if n > MAX_HEAD => {
            return bad(out, 431, "request header too large\n");
        }
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Step::Partial,
        // HTTP/2 by prior knowledge.
        Err(httparse::Error::Version) if data.starts_with(b"PRI ") => return Step::Generic,
        Err(httparse::Error::TooManyHeaders) => {
            return bad(out, 431, "too many header fields\n");
        }
        Err(_) => return bad(out, 400, "malformed request\n"),
    };
    let head = match h1::request(&req) {
        Ok(head) => head,
        Err(Refusal::Generic) => return Step::Generic,
        Err(Refusal::Bad) => return bad(out, 400, "malformed request\n"),
    };
    let started = Instant::now();
    let head_request = head.method == "HEAD";
    // A local answer leaves a request body unread: the connection ends.
    let close = head.close || head.framing != Framing::None;
    let answer = |out: &mut Vec<u8>, status, text, location: Option<&str>| {
        h1::write_local(out, status, text, location, head_request, close);
        Step::Answer { head_len, close }
    };
    let Some(host) = head.host else {
        return answer(out, 400, "missing or malformed Host\n", None);
    };
    let host = lower(host);
    let path = head.target.split('?').next().unwrap_or("/");
    // A local answer, counted and logged against its route (none: 404).
    let local = |out: &mut Vec<u8>, route: Option<&Route>, status, text, location| {
        proxy
            .metrics
            .record(route.map(|r| &r.metrics), status, secs(started));
        log(
            proxy,
            conn,
            head.method,
            &host,
            path,
            status,
            route.map_or("", |r| r.ingress.as_str()),
            None,
            started,
        );
        answer(out, status, text, location)
    };
    let snapshot = proxy.state.load();
    let Some(matched) = snapshot.table.lookup(&host, path) else {
        drop(snapshot);
        return local(out, None, 404, "404 page not found\n", None);
    };
    let route = matched.route.clone();
    let matched_len = matched.matched_len;
    drop(snapshot);
    if !route.all_speak(Protocol::Http1) {
        return Step::Generic;
    }
    let finish = |out: &mut Vec<u8>, status, text, location| {
        local(out, Some(&route), status, text, location)
    };
    if !conn.tls && route.redirect_https {
        let location = if proxy.https_port == 443 {
            format!("https://{host}{}", head.target)
        } else {
            format!("https://{host}:{}{}", proxy.https_port, head.target)
        };
        return finish(out, 308, "", Some(&location));
    }
    if let Some(limiter) = &route.limiter
        && !limiter.allow(conn.peer.ip(), std::time::Instant::now())
    {
        return finish(out, 429, "rate limit exceeded\n", None);
    }
    let backend = route.pick_backend().clone();
    if backend.endpoints.is_empty() {
        return finish(out, 503, "no ready endpoints\n", None);
    }
    let rewritten;
    let target = match &route.settings.rewrite_target {
        Some(to) => {
            let query = head.target.split_once('?').map(|(_, q)| q);
            rewritten = rewrite(path, query, matched_len, to);
            if !rewritten.bytes().all(|b| b.is_ascii_graphic()) {
                return finish(out, 400, "bad path\n", None);
            }
            rewritten.as_str()
        }
        None => head.target,
    };
    h1::write_request(
        out,
        &req,
        &head,
        target,
        &h1::Forwarding {
            client_ip: conn.client_ip.as_bytes(),
            https: conn.tls,
            host: &host,
            forwarded: &conn.forwarded,
        },
    );
    let log = proxy.access_log.then(|| {
        Box::new([
            head.method.to_owned(),
            host.clone().into_owned(),
            path.to_owned(),
        ])
    });
    Step::Forward {
        head_len,
        ex: Exchange {
            idempotent: is_idempotent(head.method),
            framing: head.framing,
            close: head.close,
            head_request,
            route,
            backend,
            started,
            log,
        },
    }
}

/// Why an exchange got no upstream response to pass on.
#[derive(Debug)]
enum Failed {
    Timeout,
    Refused,
    Upstream(std::io::Error),
    BadResponse,
    /// The request body broke its own framing.
    BadRequest,
    ClientGone,
}

/// Sends the request in `out` (head and the buffered start of its body),
/// streams the rest of the body, passes the response back. Returns whether
/// the client connection can carry another request.
async fn exchange<S>(
    proxy: &Proxy,
    conn: &Conn,
    io: &mut S,
    rx: &mut Buf,
    out: &mut Vec<u8>,
    ex: Exchange,
    deadline: &mut Deadline,
) -> After
where
    S: AsyncRead + Finish,
{
    let mut body = BodyState::new(ex.framing);
    let Ok(k) = body.take(rx.unread()) else {
        let _ = fail(proxy, conn, io, out, &ex, Failed::BadRequest, None, true).await;
        return After::Close;
    };
    out.extend_from_slice(&rx.unread()[..k]);
    rx.consume(k);
    deadline.set(Instant::now() + ex.route.settings.read_timeout);
    let (mut up, pool, addr, head) = match send(io, rx, out, &ex, &mut body, deadline).await {
        Ok(sent) => sent,
        Err((failed, addr)) => {
            // A request body not read to its end leaves the connection
            // unusable.
            let keep = body.is_done() && !ex.close;
            let sent = fail(proxy, conn, io, out, &ex, failed, addr, !keep).await;
            return if sent && keep {
                After::Open
            } else {
                After::Close
            };
        }
    };
    let mut resp_body = BodyState::new(head.framing);
    let Ok(k) = resp_body.take(up.buf.unread()) else {
        let _ = fail(
            proxy,
            conn,
            io,
            out,
            &ex,
            Failed::BadResponse,
            Some(addr),
            true,
        )
        .await;
        return After::Close;
    };
    out.extend_from_slice(&up.buf.unread()[..k]);
    up.buf.consume(k);
    record(proxy, conn, &ex, head.status, Some(addr));
    let last = ex.close && resp_body.is_done() && out.len() <= finish::MAX_FINAL;
    if last {
        if head.reusable && up.buf.unread().is_empty() {
            pool.put(up);
        }
        let _ = io.finish(out).await;
        return After::Ended;
    }
    if io.write_all(out).await.is_err() {
        return After::Close;
    }
    if !resp_body.is_done()
        && let Err(e) = pass_body(
            &mut resp_body,
            &mut up.stream,
            &mut up.buf,
            io,
            deadline,
            ex.route.settings.read_timeout,
        )
        .await
    {
        tracing::debug!(error = ?e, upstream = %addr, "response body not passed on whole");
        return After::Close;
    }
    if io.flush().await.is_err() {
        return After::Close;
    }
    if head.reusable && up.buf.unread().is_empty() {
        pool.put(up);
    }
    if !ex.close && head.framing != Framing::UntilClose {
        After::Open
    } else {
        After::Close
    }
}

/// An upstream response head, already rewritten into `out`.
struct Head {
    status: u16,
    framing: Framing,
    reusable: bool,
}

/// Delivers the request and waits for the response head, over an idle
/// connection of the chosen endpoint or a new one. A request that met a
/// connection the endpoint had closed meanwhile is sent again; a refused
/// connection moves an idempotent request on to the next endpoint.
async fn send<S>(
    client: &mut S,
    rx: &mut Buf,
    out: &mut Vec<u8>,
    ex: &Exchange,
    body: &mut BodyState,
    deadline: &mut Deadline,
) -> Result<(Upstream, Arc<pool::Pool>, SocketAddr, Head), (Failed, Option<SocketAddr>)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let backend = &ex.backend;
    let attempts = if ex.idempotent {
        backend.endpoints.len().min(3)
    } else {
        1
    };
    let whole = body.is_done();
    let start = backend.start();
    let (mut attempt, mut stale) = (0, 0);
    'attempts: loop {
        let Some(endpoint) = backend.endpoint(start, attempt) else {
            return Err((Failed::Refused, None));
        };
        let addr = endpoint.addr;
        let mut up = match endpoint.pool.take() {
            Some(up) => up,
            None => match pool::open(addr, CONNECT_TIMEOUT).await {
                Ok(up) => up,
                Err(ConnectError::Refused) if attempt + 1 < attempts => {
                    tracing::debug!(endpoint = %addr, "connection refused, trying the next endpoint");
                    attempt += 1;
                    continue;
                }
                Err(ConnectError::Refused) => return Err((Failed::Refused, Some(addr))),
                Err(ConnectError::Timeout) => return Err((Failed::Timeout, Some(addr))),
                Err(ConnectError::Other(e)) => return Err((Failed::Upstream(e), Some(addr))),
            },
        };
        // A write to a connection found closed reached no one: send again.
        if let Err(e) = up.stream.write_all(out).await {
            if up.reused && whole && stale < 3 {
                stale += 1;
                continue;
            }
            return Err((Failed::Upstream(e), Some(addr)));
        }
        let mut heard = false;
        if !whole {
            let idle = ex.route.settings.read_timeout;
            match pass_body(body, client, rx, &mut up.stream, deadline, idle).await {
                Ok(()) => {}
                Err(Pass::Read(e)) => {
                    tracing::debug!(error = %e, "request body ended early");
                    return Err((Failed::ClientGone, Some(addr)));
                }
                Err(Pass::Write(e)) => return Err((Failed::Upstream(e), Some(addr))),
                Err(Pass::Framing) => return Err((Failed::BadRequest, Some(addr))),
            }
            // The time for the answer starts when the request is complete.
            deadline.set(Instant::now() + ex.route.settings.read_timeout);
        }
        loop {
            if !up.buf.unread().is_empty() {
                let parsed = response_head(up.buf.unread(), ex.head_request, ex.close, out);
                match parsed {
                    Ok(Some((len, head))) if (100..200).contains(&head.status) => {
                        // Informational: passed on, the real answer follows.
                        if head.status == 101 {
                            return Err((Failed::BadResponse, Some(addr)));
                        }
                        up.buf.consume(len);
                        if client.write_all(out).await.is_err() {
                            return Err((Failed::ClientGone, Some(addr)));
                        }
                        continue;
                    }
                    Ok(Some((len, head))) => {
                        up.buf.consume(len);
                        return Ok((up, endpoint.pool.clone(), addr, head));
                    }
                    Ok(None) if up.buf.unread().len() > MAX_HEAD => {
                        return Err((Failed::BadResponse, Some(addr)));
                    }
                    Ok(None) => {}
                    Err(h1::BadResponse) => return Err((Failed::BadResponse, Some(addr))),
                }
            }
            let silent = !heard;
            heard = true;
            match deadline.fill(&mut up.stream, &mut up.buf).await {
                Ok(0) if silent && up.reused && whole && ex.idempotent && stale < 3 => {
                    stale += 1;
                    continue 'attempts;
                }
                Ok(0) => {
                    let eof = std::io::ErrorKind::UnexpectedEof.into();
                    return Err((Failed::Upstream(eof), Some(addr)));
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                    return Err((Failed::Timeout, Some(addr)));
                }
                Err(_) if silent && up.reused && whole && ex.idempotent && stale < 3 => {
                    stale += 1;
                    continue 'attempts;
                }
                Err(e) => return Err((Failed::Upstream(e), Some(addr))),
            }
        }
    }
}

/// Parses a response head from `data`; when complete, writes it rewritten
/// for the client into `out` (cleared first).
fn response_head(
    data: &[u8],
    head_request: bool,
    close: bool,
    out: &mut Vec<u8>,
) -> Result<Option<(usize, Head)>, h1::BadResponse> {
    let mut slots = [std::mem::MaybeUninit::<httparse::Header<'_>>::uninit(); h1::MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, data, &mut slots);
    let len = match parsed {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err(h1::BadResponse),
    };
    let head = h1::response(&resp, head_request)?;
    let close = close || head.framing == Framing::UntilClose;
    out.clear();
    h1::write_response(out, &resp, &head, close);
    Ok(Some((
        len,
        Head {
            status: head.status,
            framing: head.framing,
            reusable: head.reusable,
        },
    )))
}

/// Answers a failed exchange; returns whether the answer went out.
#[allow(clippy::too_many_arguments)]
async fn fail<S>(
    proxy: &Proxy,
    conn: &Conn,
    io: &mut S,
    out: &mut Vec<u8>,
    ex: &Exchange,
    failed: Failed,
    addr: Option<SocketAddr>,
    close: bool,
) -> bool
where
    S: AsyncWrite + Unpin,
{
    let (status, text) = match failed {
        Failed::ClientGone => return false,
        Failed::Timeout => (504, "upstream timed out\n"),
        Failed::Refused => (502, "upstream refused the connection\n"),
        Failed::BadRequest => (400, "malformed request body\n"),
        Failed::BadResponse => (502, "upstream sent a malformed response\n"),
        Failed::Upstream(e) => {
            tracing::debug!(error = %e, backend = %ex.backend.name, "upstream request failed");
            (502, "upstream request failed\n")
        }
    };
    record(proxy, conn, ex, status, addr);
    out.clear();
    h1::write_local(out, status, text, None, ex.head_request, close);
    write_out(io, out).await
}

async fn write_out<S: AsyncWrite + Unpin>(io: &mut S, out: &[u8]) -> bool {
    io.write_all(out).await.is_ok() && io.flush().await.is_ok()
}

fn record(proxy: &Proxy, conn: &Conn, ex: &Exchange, status: u16, upstream: Option<SocketAddr>) {
    proxy
        .metrics
        .record(Some(&ex.route.metrics), status, secs(ex.started));
    if let Some(fields) = &ex.log {
        let [method, host, path] = &**fields;
        log(
            proxy,
            conn,
            method,
            host,
            path,
            status,
            &ex.route.ingress,
            upstream,
            ex.started,
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn log(
    proxy: &Proxy,
    conn: &Conn,
    method: &str,
    host: &str,
    path: &str,
    status: u16,
    ingress: &str,
    upstream: Option<SocketAddr>,
    started: Instant,
) {
    if proxy.access_log {
        tracing::info!(
            target: "ingress::access",
            client = %conn.peer.ip(),
            method,
            host,
            path,
            status,
            ingress,
            upstream = ?upstream,
            micros = started.elapsed().as_micros() as u64,
        );
    }
}

fn secs(started: Instant) -> f64 {
    started.elapsed().as_secs_f64()
}

fn is_idempotent(method: &str) -> bool {
    matches!(
        method,
        "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE"
    )
}

/// How much of a body is still to come.
#[derive(Debug)]
enum BodyState {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
    Done,
}

impl BodyState {
    fn new(framing: Framing) -> Self {
        match framing {
            Framing::None | Framing::Length(0) => BodyState::Done,
            Framing::Length(n) => BodyState::Length(n),
            Framing::Chunked => BodyState::Chunked(Chunked::default()),
            Framing::UntilClose => BodyState::UntilClose,
        }
    }

    fn is_done(&self) -> bool {
        matches!(self, BodyState::Done)
    }

    /// How many of the bytes in `data` belong to the body, moving past them.
    fn take(&mut self, data: &[u8]) -> Result<usize, BadChunk> {
        let taken = match self {
            BodyState::Length(n) => {
                let k = (*n).min(data.len() as u64);
                *n -= k;
                k as usize
            }
            BodyState::Chunked(c) => c.advance(data)?,
            BodyState::UntilClose => data.len(),
            BodyState::Done => 0,
        };
        let done = match self {
            BodyState::Length(n) => *n == 0,
            BodyState::Chunked(c) => c.is_done(),
            _ => false,
        };
        if done {
            *self = BodyState::Done;
        }
        Ok(taken)
    }
}

#[derive(Debug)]
enum Pass {
    Read(std::io::Error),
    Write(std::io::Error),
    Framing,
}

/// Streams the rest of a body from `src` (read through `buf`) to `dst`.
/// Bytes after the body stay in `buf`. A sender that goes quiet for `idle`
/// fails it with `TimedOut`, as nginx's `client_body_timeout` and
/// `proxy_read_timeout` bound the wait between two reads.
async fn pass_body<R, W>(
    state: &mut BodyState,
    src: &mut R,
    buf: &mut Buf,
    dst: &mut W,
    deadline: &mut Deadline,
    idle: Duration,
) -> Result<(), Pass>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    while !state.is_done() {
        if buf.unread().is_empty() {
            deadline.set(Instant::now() + idle);
            match deadline.fill(src, buf).await {
                Ok(0) if matches!(state, BodyState::UntilClose) => break,
                Ok(0) => return Err(Pass::Read(std::io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => {}
                Err(e) => return Err(Pass::Read(e)),
            }
        }
        let k = state.take(buf.unread()).map_err(|BadChunk| Pass::Framing)?;
        dst.write_all(&buf.unread()[..k])
            .await
            .map_err(Pass::Write)?;
        buf.consume(k);
    }
    dst.flush().await.map_err(Pass::Write)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use arc_swap::ArcSwap;
    use bytes::Bytes;
    use http::HeaderValue;
    use http_body_util::{BodyExt, Full, StreamBody};
    use hyper::body::Frame;
    use hyper_util::rt::TokioIo;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    use crate::annotations::Settings;
    use crate::build::Snapshot;
    use crate::metrics::Metrics;
    use crate::route::Endpoint;
    use crate::server::{Limits, serve};

    /// An echo backend (hyper): the request body comes back, with the
    /// target and X-Forwarded-For it saw as headers. Counts connections.
    async fn backend() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let conns = Arc::new(AtomicUsize::new(0));
        let counter = conns.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let xff = req.headers().get("x-forwarded-for").cloned();
                        let target = HeaderValue::try_from(req.uri().to_string());
                        let mut resp = http::Response::new(req.into_body());
                        if let Some(xff) = xff {
                            resp.headers_mut().insert("x-saw-xff", xff);
                        }
                        if let Ok(target) = target {
                            resp.headers_mut().insert("x-saw-target", target);
                        }
                        Ok::<_, hyper::Error>(resp)
                    },
                );
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc),
                );
            }
        });
        (addr, conns)
    }

    /// A backend that reads requests and never answers.
    async fn silent_backend() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        addr
    }

    /// The proxy on a loopback port, everything routed to `backend`.
    async fn proxy_to(backend: SocketAddr, settings: Settings) -> SocketAddr {
        let metrics = Arc::new(Metrics::new(&mut Default::default()));
        let endpoint = Endpoint::new(backend, Arc::default()).expect("endpoint");
        let route = Route {
            ingress: "ns/i".into(),
            backend: Arc::new(Backend::new(
                "ns/b:80".into(),
                vec![endpoint],
                Protocol::Http1,
            )),
            canary: None,
            settings: Arc::new(settings),
            redirect_https: false,
            limiter: None,
            metrics: metrics.route("ns/i", "", "/"),
        };
        let mut table = crate::table::Table::default();
        table.set_default(Arc::new(route));
        let cert = crate::tls::default_certificate().expect("certificate");
        let state = Arc::new(ArcSwap::from_pointee(Snapshot {
            table,
            certs: crate::tls::Certs::new(cert),
        }));
        let proxy = Arc::new(Proxy::new(state, metrics.clone(), 443, true));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let limits = Limits {
            header_timeout: Duration::from_secs(5),
            fast_path: true,
            max_connections: 1024,
        };
        tokio::spawn(serve(listener, None, proxy, metrics, limits));
        addr
    }

    /// Writes `request` at once and reads until the proxy closes.
    async fn raw(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request).await.expect("write");
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "the proxy did not close");
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn pipelined_requests_with_both_framings() {
        let (backend, conns) = backend().await;
        let addr = proxy_to(backend, Settings::default()).await;
        let reply = raw(
            addr,
            b"GET /a?q=1 HTTP/1.1\r\nHost: x\r\n\r\n\
              POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
              POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nT: 1\r\n\r\n\
              HEAD /d HTTP/1.1\r\nHost: x\r\n\r\n\
              GET /e HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        let answers: Vec<&str> = reply.split("HTTP/1.1 ").skip(1).collect();
        assert_eq!(answers.len(), 5, "{reply}");
        for (answer, target) in answers.iter().zip(["/a?q=1", "/b", "/c", "/d", "/e"]) {
            assert!(answer.starts_with("200 OK\r\n"), "{answer}");
            assert!(
                answer.contains(&format!("x-saw-target: {target}\r\n")),
                "{answer}"
            );
            assert!(answer.contains("x-saw-xff: 127.0.0.1\r\n"), "{answer}");
        }
        assert!(answers[1].ends_with("\r\n\r\nhello"), "{}", answers[1]);
        assert!(
            answers[2].contains("transfer-encoding: chunked\r\n"),
            "{}",
            answers[2]
        );
        assert!(
            answers[2].ends_with("\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"),
            "{}",
            answers[2]
        );
        assert!(
            answers[4].contains("connection: close\r\n"),
            "{}",
            answers[4]
        );
        assert_eq!(conns.load(Ordering::SeqCst), 1, "one upstream connection");
    }

    #[tokio::test]
    async fn large_bodies_stream_both_ways() {
        let (backend, _) = backend().await;
        let addr = proxy_to(backend, Settings::default()).await;
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn);
        let data: Bytes = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let req = http::Request::post("/len")
            .header("host", "x")
            .body(Full::new(data.clone()).boxed())
            .expect("request");
        let resp = sender.send_request(req).await.expect("response");
        assert_eq!(resp.status(), 200);
        let got = resp.into_body().collect().await.expect("body").to_bytes();
        assert!(got == data, "length-framed body came back changed");

        // Unknown length: chunked both ways, in pieces.
        let pieces: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = data
            .chunks(70_000)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        let body = StreamBody::new(futures::stream::iter(pieces)).boxed();
        let req = http::Request::post("/chunked")
            .header("host", "x")
            .body(body)
            .expect("request");
        sender.ready().await.expect("ready");
        let resp = sender.send_request(req).await.expect("response");
        assert_eq!(resp.status(), 200);
        let got = resp.into_body().collect().await.expect("body").to_bytes();
        assert!(got == data, "chunked body came back changed");
    }

    #[tokio::test]
    async fn generic_path_takes_what_the_fast_path_does_not() {
        let (backend, _) = backend().await;
        let addr = proxy_to(backend, Settings::default()).await;
        let reply = raw(addr, b"GET /old HTTP/1.0\r\nHost: x\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.0 200"), "{reply}");
        assert!(reply.contains("x-saw-target: /old"), "{reply}");
        // A fast-path request, then one for hyper on the same connection.
        let reply = raw(
            addr,
            b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nPOST /2 HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
        )
        .await;
        assert!(reply.contains("x-saw-target: /1"), "{reply}");
        assert!(reply.contains("x-saw-target: /2"), "{reply}");
        assert!(reply.ends_with("hi"), "{reply}");
    }

    #[tokio::test]
    async fn upstream_silence_is_a_504() {
        let backend = silent_backend().await;
        let settings = Settings {
            read_timeout: Duration::from_millis(300),
            ..Settings::default()
        };
        let addr = proxy_to(backend, settings).await;
        let reply = raw(
            addr,
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(reply.starts_with("HTTP/1.1 504"), "{reply}");
    }

    #[tokio::test]
    async fn a_body_that_stops_coming_is_given_up() {
        let settings = || Settings {
            read_timeout: Duration::from_millis(300),
            ..Settings::default()
        };
        // The client's request body stalls after 5 of 1,000 bytes.
        let (backend, _) = backend().await;
        let addr = proxy_to(backend, settings()).await;
        let reply = raw(
            addr,
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nhello",
        )
        .await;
        assert!(!reply.contains("200 OK"), "{reply}");

        // The backend's response body stalls after 3 of 100 bytes.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let stalling = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((mut s, _)) = listener.accept().await {
                let mut head = [0u8; 1024];
                let _ = s.read(&mut head).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
                    .await;
                held.push(s);
            }
        });
        let addr = proxy_to(stalling, settings()).await;
        let reply = raw(addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
        assert!(reply.ends_with("abc"), "{reply}");
    }

    /// Garbage of every kind gets an answer or a close, never a panic,
    /// and the proxy goes on serving.
    #[tokio::test]
    async fn malformed_input_is_refused() {
        let (backend, _) = backend().await;
        let addr = proxy_to(backend, Settings::default()).await;
        for (input, status) in [
            (
                &b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"[..],
                "400",
            ),
            (
                b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "400",
            ),
            (b"GET / HTTP/1.1\r\nHo st: x\r\n\r\n", "400"),
            (b"\x00\x01\x02\r\n\r\n", "400"),
        ] {
            let reply = raw(addr, input).await;
            assert!(
                reply.starts_with(&format!("HTTP/1.1 {status}")),
                "{input:?}: {reply}"
            );
        }
        let mut rng = fastrand::Rng::with_seed(7);
        let alphabet = b"GET /HTTP1.1\r\n:;chunkedContent-Length0123456789abcHost x\x00";
        for _ in 0..200 {
            let len = rng.usize(1..300);
            let mut input: Vec<u8> = (0..len)
                .map(|_| alphabet[rng.usize(0..alphabet.len())])
                .collect();
            input.extend_from_slice(b"\r\n\r\n");
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let _ = s.write_all(&input).await;
            let _ = s.shutdown().await;
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        }
        let reply = raw(
            addr,
            b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    }
}
