//! Keep-alive HTTP/1.1 connections to one endpoint, of two kinds: plain
//! sockets the fast path drives itself, and hyper connections for the
//! generic path. A request takes an idle connection (or opens one) and
//! gives it back when the response has been read to the end, so the data
//! path needs no extra task per request. Connections the endpoint closed
//! are noticed and dropped at checkout.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::UpstreamBody;
use crate::buf::Buf;

/// Idle connections kept per endpoint; more are closed.
const MAX_IDLE: usize = 1024;

pub type Sender = SendRequest<UpstreamBody>;

#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<Vec<Sender>>,
    raw: Mutex<Vec<Upstream>>,
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
    pub fn checkin(&self, sender: Sender) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(sender);
        }
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
    pub fn put(&self, up: Upstream) {
        let mut idle = self.raw.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE {
            idle.push(up);
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
