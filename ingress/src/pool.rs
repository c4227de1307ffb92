//! Keep-alive HTTP/1.1 connections to one endpoint, of two kinds: plain
//! sockets the fast path drives itself, and hyper connections for the
//! generic path. A request takes an idle connection (or opens one) and
//! gives it back when the response has been read to the end, so the data
//! path needs no extra task per request. Connections the endpoint closed
//! are noticed and dropped at checkout; connections left idle for
//! `IDLE_TIMEOUT` are closed by a reaper task that runs only while the pool
//! holds idle connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::UpstreamBody;
use crate::buf::Buf;

/// Idle connections kept per endpoint; more are closed.
const MAX_IDLE: usize = 1024;
/// Idle connections are closed after this, as nginx's upstream
/// `keepalive_timeout` does by default, so a backend that went quiet does
/// not keep sockets (or their CLOSE_WAIT remains) for ever.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

pub type Sender = SendRequest<UpstreamBody>;

#[derive(Debug)]
pub struct Pool {
    idle: Mutex<Idle<Sender>>,
    raw: Mutex<Idle<Upstream>>,
    idle_timeout: Duration,
    /// A reaper task is waiting for the oldest idle connection to expire.
    reaping: AtomicBool,
}

impl Default for Pool {
    fn default() -> Self {
        Pool::with_idle_timeout(IDLE_TIMEOUT)
    }
}

/// Idle connections with the time each was put back, oldest first (they
/// are taken from the end, most recent first).
#[derive(Debug)]
struct Idle<T>(Vec<(T, Instant)>);

impl<T> Default for Idle<T> {
    fn default() -> Self {
        Idle(Vec::new())
    }
}

impl<T> Idle<T> {
    fn push(&mut self, conn: T, now: Instant) {
        if self.0.len() < MAX_IDLE {
            self.0.push((conn, now));
        }
    }

    fn pop(&mut self) -> Option<T> {
        self.0.pop().map(|(conn, _)| conn)
    }

    /// Closes the connections idle for `timeout` or longer; returns when
    /// the oldest of the others will be.
    fn expire(&mut self, now: Instant, timeout: Duration) -> Option<Instant> {
        let expired = self.0.partition_point(|(_, at)| *at + timeout <= now);
        self.0.drain(..expired);
        self.0.first().map(|(_, at)| *at + timeout)
    }
}

/// A connection the fast path drives, with its read buffer.
#[derive(Debug)]
pub struct Upstream {
    pub stream: TcpStream,
    pub buf: Buf,
    /// Taken from the pool: it may have been closed by the endpoint in the
    /// meantime, so a request that got no answer may be sent again.
    pub reused: bool,
}

/// Why no connection could be had.
#[derive(Debug)]
pub enum ConnectError {
    Refused,
    Timeout,
    Other(std::io::Error),
}

impl Pool {
    pub fn with_idle_timeout(idle_timeout: Duration) -> Self {
        Pool {
            idle: Mutex::default(),
            raw: Mutex::default(),
            idle_timeout,
            reaping: AtomicBool::new(false),
        }
    }

    /// An idle connection ready for a request, or a new one.
    pub async fn checkout(
        &self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<Sender, ConnectError> {
        loop {
            let idle = self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            let Some(mut sender) = idle else { break };
            if sender.is_closed() {
                continue;
            }
            if sender.is_ready() || sender.ready().await.is_ok() {
                return Ok(sender);
            }
        }
        connect(addr, timeout).await
    }

    /// Takes a connection back after its response was read whole.
    pub fn checkin(self: &Arc<Self>, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(sender, Instant::now());
        self.reap_later();
    }
}

impl Pool {
    /// An idle plain connection that is still open.
    pub fn take(&self) -> Option<Upstream> {
        let mut idle = self.raw.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some(mut up) = idle.pop() {
            // Idle, the endpoint has nothing to say: anything readable is
            // its close (or garbage), so the connection is done. Tokio
            // answers from its cached readiness, mostly without a syscall.
            let mut probe = [0u8; 1];
            if let Err(e) = up.stream.try_read(&mut probe)
                && e.kind() == std::io::ErrorKind::WouldBlock
            {
                up.reused = true;
                return Some(up);
            }
        }
        None
    }

    /// Takes a plain connection back after a complete exchange.
    pub fn put(self: &Arc<Self>, up: Upstream) {
        self.raw
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(up, Instant::now());
        self.reap_later();
    }

    /// Makes sure a reaper will close the idle connections that expire.
    /// Costs an atomic load per request while one is waiting.
    fn reap_later(self: &Arc<Self>) {
        if self.reaping.load(Ordering::Relaxed) || self.reaping.swap(true, Ordering::AcqRel) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(reap(Arc::downgrade(self)));
            }
            // Outside a runtime (no such caller today): checkout and the
            // endpoint's own close still drop dead connections.
            Err(_) => self.reaping.store(false, Ordering::Release),
        }
    }

    /// Closes expired idle connections of both kinds; returns when the
    /// next one expires, if any is idle.
    fn expire(&self, now: Instant) -> Option<Instant> {
        let timeout = self.idle_timeout;
        let raw = self
            .raw
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .expire(now, timeout);
        let hyper = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .expire(now, timeout);
        match (raw, hyper) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// Sleeps until the oldest idle connection of the pool expires, closes
/// what expired, and goes on while connections are idle. Ends with the
/// pool (an endpoint gone from every table) or when none is idle.
async fn reap(pool: Weak<Pool>) {
    loop {
        let Some(strong) = pool.upgrade() else { return };
        match strong.expire(Instant::now()) {
            Some(next) => {
                drop(strong);
                tokio::time::sleep_until(next).await;
            }
            None => {
                strong.reaping.store(false, Ordering::Release);
                // A connection put back after `expire` looked saw the flag
                // still set and left the reaping to this task.
                let idle = !strong
                    .raw
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
                    .is_empty()
                    || !strong
                        .idle
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                        .is_empty();
                if !idle || strong.reaping.swap(true, Ordering::AcqRel) {
                    return;
                }
            }
        }
    }
}

/// A new plain connection.
pub async fn open(addr: SocketAddr, timeout: Duration) -> Result<Upstream, ConnectError> {
    Ok(Upstream {
        stream: dial(addr, timeout).await?,
        buf: Buf::default(),
        reused: false,
    })
}

async fn dial(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Err(_) => return Err(ConnectError::Timeout),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Err(ConnectError::Refused);
        }
        Ok(Err(e)) => return Err(ConnectError::Other(e)),
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Sender, ConnectError> {
    let stream = dial(addr, timeout).await?;
    let (sender, conn) = http1::Builder::new()
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ConnectError::Other(std::io::Error::other(e)))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(%addr, error = %e, "upstream connection ended");
        }
    });
    Ok(sender)
}

/// Hands a connection back to its pool when dropped after the end of the
/// response body; dropped earlier (client gone), the connection closes.
pub struct Return {
    pub pool: Arc<Pool>,
    pub sender: Option<Sender>,
}

impl Return {
    pub fn finish(&mut self) {
        if let Some(sender) = self.sender.take() {
            self.pool.checkin(sender);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http::Request;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A backend answering "ok" that counts its connections and closes
    /// each after `per_conn` responses.
    async fn backend(per_conn: usize) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let conns = Arc::new(AtomicUsize::new(0));
        let counter = conns.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    for _ in 0..per_conn {
                        let mut head = Vec::new();
                        while !head.ends_with(b"\r\n\r\n") {
                            match s.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => head.extend_from_slice(&buf[..n]),
                            }
                        }
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, conns)
    }

    async fn get(pool: &Arc<Pool>, addr: SocketAddr) -> Result<String, hyper::Error> {
        let mut sender = pool
            .checkout(addr, Duration::from_secs(5))
            .await
            .expect("connect");
        let req = Request::builder()
            .uri("/")
            .header("host", "x")
            .body(UpstreamBody::Empty)
            .expect("request");
        let resp = sender.send_request(req).await?;
        let mut back = Return {
            pool: pool.clone(),
            sender: Some(sender),
        };
        let body = resp.into_body().collect().await?.to_bytes();
        back.finish();
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn connections_are_reused() {
        let (addr, conns) = backend(usize::MAX).await;
        let pool = Arc::new(Pool::default());
        for _ in 0..5 {
            assert_eq!(get(&pool, addr).await.expect("request"), "ok");
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn closed_connections_are_not_handed_out() {
        let (addr, conns) = backend(1).await;
        let pool = Arc::new(Pool::default());
        for _ in 0..3 {
            assert_eq!(get(&pool, addr).await.expect("request"), "ok");
            // Let the connection task see the backend's close.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(conns.load(Ordering::SeqCst), 3);
    }

    /// Reads until the peer closes; `None` when it did not within 10 s.
    async fn closed(s: &mut tokio::net::TcpStream) -> Option<()> {
        let mut buf = [0u8; 64];
        loop {
            match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
                Err(_) => return None,
                Ok(Ok(0) | Err(_)) => return Some(()),
                Ok(Ok(_)) => {}
            }
        }
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let pool = Arc::new(Pool::with_idle_timeout(Duration::from_millis(100)));
        for _ in 0..2 {
            let up = open(addr, Duration::from_secs(5)).await.expect("connect");
            pool.put(up);
        }
        let sender = pool.checkout(addr, Duration::from_secs(5)).await;
        let sender = sender.expect("connect");
        pool.checkin(sender);
        for _ in 0..3 {
            let (mut s, _) = listener.accept().await.expect("accept");
            assert_eq!(
                closed(&mut s).await,
                Some(()),
                "an idle connection stayed open"
            );
        }
        assert!(pool.take().is_none());
        // The reaper is gone with the idle connections; the next one
        // returned gets a new one.
        let up = open(addr, Duration::from_secs(5)).await.expect("connect");
        pool.put(up);
        let (mut s, _) = listener.accept().await.expect("accept");
        assert_eq!(
            closed(&mut s).await,
            Some(()),
            "a later idle connection stayed open"
        );
    }

    #[test]
    fn expiry_keeps_the_recent() {
        let start = Instant::now();
        let mut idle = Idle::default();
        for (i, secs) in [0, 10, 20].into_iter().enumerate() {
            idle.push(i, start + Duration::from_secs(secs));
        }
        let timeout = Duration::from_secs(15);
        let next = idle.expire(start + Duration::from_secs(25), timeout);
        assert_eq!(next, Some(start + Duration::from_secs(35)));
        assert_eq!(idle.pop(), Some(2));
        assert_eq!(idle.pop(), None);
        assert_eq!(idle.expire(start, timeout), None);
    }

    #[tokio::test]
    async fn refused_is_told_apart() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let pool = Pool::default();
        assert!(matches!(
            pool.checkout(addr, Duration::from_secs(5)).await,
            Err(ConnectError::Refused)
        ));
    }
}
