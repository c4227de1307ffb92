//! Accept loops for the HTTP and HTTPS ports. An HTTP/1.1 connection starts
//! on the fast path (`fast`), which hands it to hyper when a request needs
//! more than it does; HTTP/2 (by ALPN or prior knowledge) is hyper's from
//! the start. Limits keep a slow or hostile client from holding the
//! proxy: a deadline for the TLS handshake and for every request head
//! (which is also the keep-alive idle timeout), bounded header sizes
//! (431), and HTTP/2 pings.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::service::{Service, service_fn};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::AsyncRead;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::body::ResponseBody;
use crate::fast::{self, End, MAX_HEAD};
use crate::finish::Finish;
use crate::metrics::Metrics;
use crate::proxy::{Conn, Proxy};
use crate::rewind::Rewind;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A request head must arrive within this; idle keep-alive connections
    /// are closed after it too.
    pub header_timeout: Duration,
    /// HTTP/1.1 connections start on the fast path.
    pub fast_path: bool,
    /// Open connections per listener; past it, new ones wait in the
    /// kernel's accept queue until one closes.
    pub max_connections: usize,
}

pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    limits: Limits,
) {
    let builders = Arc::new(Builders {
        any: builder(limits),
        h2: builder(limits).http2_only(),
    });
    // Each connection holds buffers and a task: without a bound, clients
    // that open connections faster than they close them take the memory.
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off briefly.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let conn = Conn::new(peer, tls.is_some());
        let task = Connection {
            proxy: proxy.clone(),
            metrics: metrics.clone(),
            builders: builders.clone(),
            limits,
            _permit: permit,
        };
        match &tls {
            None => tokio::spawn(task.plain(stream, conn)),
            Some(acceptor) => tokio::spawn(task.tls(stream, acceptor.clone(), conn)),
        };
    }
}

fn builder(limits: Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(MAX_HEAD as u32)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    b
}

struct Connection {
    proxy: Arc<Proxy>,
    metrics: Arc<Metrics>,
    builders: Arc<Builders>,
    limits: Limits,
    /// Given back when the connection's task ends.
    _permit: OwnedSemaphorePermit,
}

struct Builders {
    /// HTTP/1.1, or HTTP/2 by prior knowledge.
    any: auto::Builder<TokioExecutor>,
    /// HTTP/2 negotiated by ALPN.
    h2: auto::Builder<TokioExecutor>,
}

impl Connection {
    /// A connection on the HTTP port. The two ports' connections are
    /// separate tasks because an async fn keeps every branch's state side
    /// by side: one task for both was 9 KB, copied at spawn and again at
    /// its end.
    async fn plain(self, stream: TcpStream, conn: Conn) {
        self.metrics.connections.inc();
        let conn = Arc::new(conn);
        let service = self.service(&conn);
        let result = self.http1(stream, &conn, service).await;
        self.finish(&conn, result);
    }

    /// A connection on the HTTPS port: the handshake, then HTTP/1.1 or
    /// HTTP/2 as ALPN chose.
    async fn tls(self, stream: TcpStream, acceptor: TlsAcceptor, conn: Conn) {
        self.metrics.connections.inc();
        let conn = Arc::new(conn);
        let peer = conn.peer;
        let tls_stream =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls_stream)) => tls_stream,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return self.finish(&conn, Ok(()));
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return self.finish(&conn, Ok(()));
                }
            };
        let service = self.service(&conn);
        let result = if tls_stream.get_ref().1.alpn_protocol() == Some(b"h2") {
            let io = TokioIo::new(tls_stream);
            // Boxed, as hyper's HTTP/1.1 fallback in `http1` is: hyper's
            // connection futures are kilobytes, and the rare case should
            // not set the size of every connection's task.
            Box::pin(self.builders.h2.serve_connection(io, service)).await
        } else {
            // Boxed: the stream is a kilobyte, and the fast path moves
            // its connection through several states that each hold it.
            self.http1(Box::new(tls_stream), &conn, service).await
        };
        self.finish(&conn, result);
    }

    /// The hyper service for requests the fast path hands over.
    fn service(
        &self,
        conn: &Arc<Conn>,
    ) -> impl Service<
        Request<Incoming>,
        Response = Response<ResponseBody>,
        Error = Infallible,
        Future: Send + 'static,
    >
    + Clone
    + Send
    + 'static
    + use<> {
        let proxy = self.proxy.clone();
        let conn = conn.clone();
        service_fn(move |req| {
            let proxy = proxy.clone();
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(proxy.serve(req, &conn).await) }
        })
    }

    fn finish(&self, conn: &Conn, result: Result<(), BoxError>) {
        if let Err(e) = result {
            tracing::debug!(peer = %conn.peer, error = %e, "connection ended with an error");
        }
        self.metrics.connections.dec();
    }
}

impl Connection {
    /// An HTTP/1.1 (or HTTP/2 prior knowledge) connection: through the
    /// fast path when it is on, until it closes or hands the connection
    /// (with the bytes it read) to hyper's `service`; straight to hyper
    /// otherwise.
    async fn http1<S, Svc>(&self, stream: S, conn: &Conn, service: Svc) -> Result<(), BoxError>
    where
        S: AsyncRead + Finish + 'static,
        Svc: Service<Request<Incoming>, Response = Response<ResponseBody>, Error = Infallible>,
        Svc::Future: Send + 'static,
    {
        let end = if self.limits.fast_path {
            fast::serve(&self.proxy, conn, stream, self.limits.header_timeout).await
        } else {
            End::Generic(Rewind::new(Vec::new(), stream))
        };
        match end {
            End::Closed => Ok(()),
            End::Generic(io) => {
                Box::pin(
                    self.builders
                        .any
                        .serve_connection_with_upgrades(TokioIo::new(io), service),
                )
                .await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arc_swap::ArcSwap;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use crate::build::Snapshot;

    /// A proxy with an empty table on a loopback port.
    async fn start(header_timeout: Duration) -> std::net::SocketAddr {
        start_with(Limits {
            header_timeout,
            fast_path: true,
            max_connections: 1024,
        })
        .await
    }

    async fn start_with(limits: Limits) -> std::net::SocketAddr {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        let cert = crate::tls::default_certificate().expect("default certificate");
        let state = Arc::new(ArcSwap::from_pointee(Snapshot {
            table: crate::table::Table::default(),
            certs: crate::tls::Certs::new(cert),
        }));
        let proxy = Arc::new(Proxy::new(state, metrics.clone(), 443, false));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(serve(listener, None, proxy, metrics, limits));
        addr
    }

    async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let _ = s.write_all(request).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn bad_requests_get_their_status() {
        let addr = start(Duration::from_secs(5)).await;
        assert!(
            exchange(addr, b"NOT HTTP AT ALL\r\n\r\n")
                .await
                .starts_with("HTTP/1.1 400")
        );
        let big = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
            "y".repeat(MAX_HEAD + 10)
        );
        assert!(
            exchange(addr, big.as_bytes())
                .await
                .starts_with("HTTP/1.1 431")
        );
        let reply = exchange(
            addr,
            b"GET / HTTP/1.1\r\nHost: nowhere\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
        let reply = exchange(addr, b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").await;
        assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    }

    /// Past the connection limit a new client waits to be accepted until
    /// an open connection ends.
    #[tokio::test]
    async fn connections_past_the_limit_wait_their_turn() {
        let addr = start_with(Limits {
            header_timeout: Duration::from_secs(5),
            fast_path: true,
            max_connections: 1,
        })
        .await;
        let idle = TcpStream::connect(addr).await.expect("connect");
        // Let the proxy accept the first connection and take the one permit.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut waiting = TcpStream::connect(addr).await.expect("connect");
        waiting
            .write_all(b"GET / HTTP/1.1\r\nHost: nowhere\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 64];
        let early = tokio::time::timeout(Duration::from_millis(300), waiting.read(&mut buf)).await;
        assert!(early.is_err(), "answered while over the limit");
        drop(idle);
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), waiting.read_to_end(&mut out))
            .await
            .expect("answered once the first connection closed")
            .expect("read");
        let reply = String::from_utf8_lossy(&out);
        assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
    }

    /// A client that sends its head a byte at a time is cut off at the
    /// deadline, and the proxy keeps answering others meanwhile.
    #[tokio::test]
    async fn slowloris_is_timed_out() {
        let addr = start(Duration::from_millis(500)).await;
        let mut slow = TcpStream::connect(addr).await.expect("connect");
        let started = std::time::Instant::now();
        let mut closed = false;
        for b in b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if slow.write_all(&[*b]).await.is_err() {
                closed = true;
                break;
            }
            let mut buf = [0u8; 64];
            // Anything from the server (a 408, or the end) means it gave up.
            if tokio::time::timeout(Duration::from_millis(100), slow.read(&mut buf))
                .await
                .is_ok()
            {
                closed = true;
                break;
            }
            let ok = exchange(
                addr,
                b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await;
            assert!(ok.starts_with("HTTP/1.1 404"), "{ok}");
        }
        assert!(closed, "the slow client was never cut off");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(3), "cut off after {took:?}");
    }
}
