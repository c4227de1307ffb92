//! Skiff's Ingress controller: `networking.k8s.io/v1` Ingress on hyper and
//! rustls, running in `skiff server` (or standalone with `skiff ingress`).
//!
//! # What it serves
//!
//! Ingresses of the IngressClass `skiff` (controller `skiff.io/ingress`,
//! created at start when absent), and Ingresses without a class when that
//! class carries `ingressclass.kubernetes.io/is-default-class: "true"`.
//! Other classes are ignored. Hosts match exactly or by a one-label
//! wildcard (`*.example.com`); `pathType` `Exact`, `Prefix` (element-wise
//! on `/`) and `ImplementationSpecific` (as `Prefix`); the longest path
//! wins and `Exact` beats `Prefix` at equal length; a host's rules come
//! before rules without a host, then `defaultBackend` (of the oldest
//! Ingress that has one), then a 404. The same host and path in two
//! Ingresses: the older one wins.
//!
//! Plain HTTP/1.1 requests take a fast path of their own (`fast`:
//! `httparse` heads, reusable per-connection buffers, bodies streamed by
//! their framing, plain upstream sockets); HTTP/2, HTTP/1.0, `Upgrade`,
//! `Expect` and h2c backends go through hyper, which takes a connection
//! over mid-way when one of its requests needs it.
//!
//! Requests go straight to the ready endpoints of the backend Service's
//! EndpointSlices, round-robin, over pooled keep-alive connections, with
//! `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host` and
//! `Forwarded` set. A refused connection is retried on the next endpoint
//! for idempotent requests without a body. TLS certificates come from the
//! `kubernetes.io/tls` Secrets named in `spec.tls`, chosen by SNI; plain
//! HTTP requests for a host with TLS are redirected (308) to HTTPS.
//!
//! Answers of its own: 400 malformed request, 431 request head over 64 KiB,
//! 404 no route, 429 rate limited, 502 upstream failed, 503 no ready
//! endpoints, 504 upstream did not answer in time. A request head must
//! arrive within the header timeout (30 s by default), which also closes
//! idle keep-alive connections. Each port holds at most 16,384 open
//! connections; more wait in the accept queue until one closes.
//!
//! # Annotations
//!
//! | annotation | value | effect |
//! |---|---|---|
//! | `skiff.io/rewrite-target` | a path, e.g. `/` | the matched part of the path is replaced by it: rule `/api` with target `/` sends `/api/users` as `/users` |
//! | `skiff.io/ssl-redirect` | `true` (default) / `false` | redirect plain HTTP to HTTPS for hosts in `spec.tls` |
//! | `skiff.io/backend-protocol` | `HTTP` (default) / `H2C` (or `GRPC`) | HTTP/1.1 or HTTP/2 cleartext to the endpoints |
//! | `skiff.io/proxy-read-timeout` | seconds (default 60, at most a year) | time for the backend to send its response head, then 504; also the longest pause within a request or response body |
//! | `skiff.io/limit-rps` | requests per second | per client address, with a burst of the same; then 429 |
//! | `skiff.io/canary` | `true` | this Ingress is a canary of the Ingress with the same host and path |
//! | `skiff.io/canary-weight` | 0–100 | percent of that route's requests sent to the canary's backend |
//!
//! An annotation value that does not parse is reported as a Warning event
//! and the default applies.
//!
//! # Metrics
//!
//! `ingress_requests_total{ingress,host,path,status}`,
//! `ingress_request_duration_seconds{ingress,host,path}` (time to the
//! response head), `ingress_open_connections`, `ingress_table_updates_total`,
//! served on the metrics address at `/metrics`. Each request is also
//! logged (target `ingress::access`) unless the access log is off.

mod annotations;
mod body;
mod buf;
mod build;
mod controller;
mod fast;
mod finish;
mod h1;
mod kx;
mod metrics;
mod metrics_server;
mod pool;
mod proxy;
mod rewind;
mod route;
mod server;
mod table;
mod tls;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

pub use build::{CLASS_NAME, CONTROLLER};

#[derive(Clone, Debug)]
pub struct IngressConfig {
    pub http: SocketAddr,
    pub https: SocketAddr,
    /// Put in `status.loadBalancer.ingress` of served Ingresses.
    pub node_addresses: Vec<IpAddr>,
    /// Where `/metrics` is served, if anywhere.
    pub metrics: Option<SocketAddr>,
    pub access_log: bool,
    /// Deadline for a request head, and the keep-alive idle timeout.
    pub header_timeout: Duration,
    /// TLS session resumption (tickets and a session cache); off only to
    /// measure full handshakes.
    pub tls_resumption: bool,
    /// HTTP/1.1 on the fast path (`fast`); off, every connection is
    /// hyper's. Off only to compare the two: `SKIFF_INGRESS_GENERIC_ONLY=1`.
    pub fast_path: bool,
    /// Open connections per port, as ingress-nginx's default
    /// `max-worker-connections`; more wait to be accepted.
    pub max_connections: usize,
}

impl IngressConfig {
    pub fn new(http: SocketAddr, https: SocketAddr, node_addresses: Vec<IpAddr>) -> Self {
        IngressConfig {
            http,
            https,
            node_addresses,
            metrics: None,
            access_log: true,
            header_timeout: Duration::from_secs(30),
            tls_resumption: true,
            fast_path: std::env::var_os("SKIFF_INGRESS_GENERIC_ONLY").is_none(),
            max_connections: 16_384,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listening on {0}: {1}")]
    Bind(SocketAddr, #[source] std::io::Error),
    #[error("making the default certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("configuring TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// Runs the controller and the proxy until the process stops. Returns
/// early only when it cannot listen or set up TLS.
pub async fn run(client: kube::Client, config: IngressConfig) -> Result<(), Error> {
    let mut registry = Registry::default();
    let metrics = Arc::new(metrics::Metrics::new(&mut registry));
    let default_cert = tls::default_certificate()?;
    let state = Arc::new(ArcSwap::from_pointee(build::Snapshot {
        table: table::Table::default(),
        certs: tls::Certs::new(default_cert.clone()),
    }));
    let tls_config = tls::server_config(state.clone(), config.tls_resumption)?;
    let http = bind(config.http).await?;
    let https = bind(config.https).await?;
    let metrics_listener = match config.metrics {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };

    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let controller = controller::Controller {
        client,
        state: state.clone(),
        builder: build::Builder::new(metrics.clone(), default_cert),
        metrics: metrics.clone(),
        node_addresses: config.node_addresses.clone(),
    };
    let control = tokio::spawn(controller.run(ready_tx));
    // Serve once the first table is in, rather than 404 everything before.
    let _ = ready_rx.await;
    let proxy = Arc::new(proxy::Proxy::new(
        state,
        metrics.clone(),
        config.https.port(),
        config.access_log,
    ));
    let limits = server::Limits {
        header_timeout: config.header_timeout,
        fast_path: config.fast_path,
        max_connections: config.max_connections,
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config));
    tracing::info!(http = %config.http, https = %config.https, "ingress listening");
    if let Some(listener) = metrics_listener {
        tokio::spawn(metrics_server::serve(listener, Arc::new(registry)));
    }
    tokio::spawn(server::serve(
        https,
        Some(acceptor),
        proxy.clone(),
        metrics.clone(),
        limits,
    ));
    server::serve(http, None, proxy, metrics, limits).await;
    control.abort();
    Ok(())
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(|e| Error::Bind(addr, e))?;
    socket
        .set_reuseaddr(true)
        .map_err(|e| Error::Bind(addr, e))?;
    socket.bind(addr).map_err(|e| Error::Bind(addr, e))?;
    defer_accept(&socket).map_err(|e| Error::Bind(addr, e))?;
    socket.listen(4096).map_err(|e| Error::Bind(addr, e))
}

/// HTTP and TLS clients speak first, so the kernel may hold a new
/// connection until its first bytes (the request or the ClientHello)
/// arrive: the proxy then accepts and reads in one wakeup instead of two,
/// as nginx's `listen ... deferred` does. A client that stays silent is
/// handed over after about a second anyway, and the header deadline
/// applies from there.
fn defer_accept(socket: &tokio::net::TcpSocket) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let seconds: libc::c_int = 1;
    // SAFETY: a valid socket descriptor and an int-sized option value.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&raw const seconds).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
