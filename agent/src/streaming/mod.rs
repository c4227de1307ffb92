//! The kubelet API's streaming endpoints, which the API server proxies
//! `kubectl logs`, `exec`, `attach` and `port-forward` to:
//!
//! - `GET /containerLogs/{namespace}/{pod}/{container}` ([`logs`])
//! - `/exec/{namespace}/{pod}/{container}?command=…&input=1&output=1&error=1&tty=1`
//! - `/attach/{namespace}/{pod}/{container}?…` (same flags)
//! - `/portForward/{namespace}/{pod}`
//! - `GET /metrics/resource` (resource usage, when the agent collects it)
//!
//! over HTTPS that accepts only clients whose certificate the cluster's
//! client CA signed. Exec and attach switch to WebSocket
//! (`v5.channel.k8s.io`, `v4.channel.k8s.io`) or SPDY/3.1 ([`session`]);
//! port-forward to SPDY, plain or inside a WebSocket ([`portforward`]).
//! The agent tells where a pod's containers are through [`Containers`].

pub mod exec;
pub mod logs;
pub mod portforward;
pub mod session;
pub mod spdy;
pub mod websocket;

use std::convert::Infallible;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jiff::Timestamp;
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

use self::portforward::Dialer;
use self::session::{Process, StreamFlags};

/// A TLS handshake slower than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub type Body = BoxBody<Bytes, Infallible>;

/// Finds a pod's containers; the agent's pod manager implements it.
pub trait Containers: Send + Sync + 'static {
    /// The container `container` of pod `namespace/pod` (its only
    /// container when `None`). Errors carry kubelet's messages.
    fn find(
        &self,
        namespace: &str,
        pod: &str,
        container: Option<&str>,
    ) -> Result<ContainerRef, StreamError>;

    /// The network namespace of pod `namespace/pod` (`None`: the host's),
    /// for port-forward. The default asks [`Containers::find`] for the
    /// pod's only container; a pod manager that knows the pod's namespace
    /// directly should say so for pods with several containers.
    fn netns(&self, namespace: &str, pod: &str) -> Result<Option<PathBuf>, StreamError> {
        self.find(namespace, pod, None).map(|c| c.netns)
    }

    /// `/metrics/resource` in the Prometheus text format (the kubelet's
    /// resource metrics: CPU seconds and working-set bytes of the node,
    /// its pods and containers); `None` when not collected.
    fn resource_metrics(&self) -> Option<String> {
        None
    }
}

/// Where a container is and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerRef {
    /// The runtime's container id.
    pub id: String,
    /// The runc binary and its `--root`.
    pub runtime: PathBuf,
    pub runtime_root: PathBuf,
    /// The CRI log of this instance of the container, and of the one
    /// before it (for `previous`).
    pub log_path: PathBuf,
    pub previous_log_path: Option<PathBuf>,
    /// The container's shim state directory.
    pub state_dir: PathBuf,
    /// The pod's network namespace; `None` for host-network pods.
    pub netns: Option<PathBuf>,
    pub tty: bool,
    pub stdin: bool,
    pub running: bool,
}

/// A refusal, answered in plain text as kubelet does.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Internal(String),
}

/// The TLS setup could not be built from the given PEM files.
#[derive(Debug, thiserror::Error)]
#[error("kubelet API TLS: {what}: {reason}")]
pub struct TlsError {
    what: &'static str,
    reason: String,
}

impl StreamError {
    fn status(&self) -> StatusCode {
        match self {
            StreamError::NotFound(_) => StatusCode::NOT_FOUND,
            StreamError::BadRequest(_) => StatusCode::BAD_REQUEST,
            StreamError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// A server configuration that presents `cert_pem` (with its chain) and
/// `key_pem`, and requires a client certificate signed by `client_ca_pem`:
/// only the API server (or an admin) may reach containers.
pub fn tls_config(
    cert_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: &[u8],
) -> Result<Arc<ServerConfig>, TlsError> {
    fn fail<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> TlsError {
        move |e| TlsError {
            what,
            reason: e.to_string(),
        }
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(client_ca_pem) {
        roots
            .add(cert.map_err(fail("client CA"))?)
            .map_err(fail("client CA"))?;
    }
    if roots.is_empty() {
        return Err(TlsError {
            what: "client CA",
            reason: "no certificate in the PEM text".into(),
        });
    }
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(fail("serving certificate"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(fail("serving key"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(fail("client verifier"))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(fail("protocol versions"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(fail("serving certificate"))?;
    // Upgrades (exec, attach, port-forward) exist only in HTTP/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves the kubelet API on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, tls: Arc<ServerConfig>, containers: Arc<dyn Containers>) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a kubelet API connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let containers = containers.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "kubelet API TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let service = service_fn(move |request| {
                let containers = containers.clone();
                async move { Ok::<_, Infallible>(handle(containers.as_ref(), request)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .with_upgrades()
                .await
            {
                tracing::debug!(%peer, error = %e, "kubelet API connection ended");
            }
        });
    }
}

fn handle(containers: &dyn Containers, mut request: Request<Incoming>) -> Response<Body> {
    match route(containers, &mut request) {
        Ok(response) => response,
        Err(e) => text(e.status(), &e.to_string()),
    }
}

fn route(
    containers: &dyn Containers,
    request: &mut Request<Incoming>,
) -> Result<Response<Body>, StreamError> {
    let path = request.uri().path().to_owned();
    let params = query_pairs(request.uri().query());
    let segments: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let flag = |name: &str| {
        params
            .iter()
            .any(|(k, v)| k == name && matches!(v.as_str(), "1" | "true" | "True" | "TRUE" | "t"))
    };
    let flags = StreamFlags {
        stdin: flag("input"),
        stdout: flag("output"),
        stderr: flag("error"),
        tty: flag("tty"),
    };
    match (request.method(), segments.as_slice()) {
        (&Method::GET, ["healthz"]) => Ok(text(StatusCode::OK, "ok")),
        (&Method::GET, ["metrics", "resource"]) => match containers.resource_metrics() {
            Some(body) => {
                let mut response = text(StatusCode::OK, &body);
                response.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                Ok(response)
            }
            None => Err(StreamError::NotFound("404 page not found".into())),
        },
        (&Method::GET, ["containerLogs", namespace, pod, container]) => {
            let found = containers.find(namespace, pod, Some(container))?;
            let options = logs::LogOptions::parse(&params, Timestamp::now())?;
            let rx = logs::stream(&found, pod, container, options)?;
            let mut response = Response::new(ChannelBody(rx).boxed());
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain"),
            );
            Ok(response)
        }
        (&Method::GET | &Method::POST, ["exec", namespace, pod, container]) => {
            let found = running(containers, namespace, pod, container)?;
            let command: Vec<String> = params
                .iter()
                .filter(|(k, _)| k == "command")
                .map(|(_, v)| v.clone())
                .collect();
            if command.is_empty() {
                return Err(StreamError::BadRequest(
                    "you must specify at least one command for the container".into(),
                ));
            }
            check_streams(flags)?;
            let process = exec::runc_exec(&found, command, flags.tty);
            upgrade_session(request, flags, process)
        }
        (&Method::GET | &Method::POST, ["attach", namespace, pod, container]) => {
            let found = running(containers, namespace, pod, container)?;
            check_streams(flags)?;
            if flags.tty && !found.tty {
                return Err(StreamError::BadRequest(format!(
                    "container {container:?} in pod {pod:?} was not started with a terminal"
                )));
            }
            let flags = StreamFlags {
                stdin: flags.stdin && found.stdin,
                ..flags
            };
            upgrade_session(request, flags, exec::attach(&found))
        }
        (&Method::GET | &Method::POST, ["portForward", namespace, pod]) => {
            let netns = containers.netns(namespace, pod)?;
            let dialer = portforward::netns_dialer(netns);
            upgrade_port_forward(request, format!("{pod}_{namespace}"), dialer)
        }
        _ => Err(StreamError::NotFound("404 page not found".into())),
    }
}

fn running(
    containers: &dyn Containers,
    namespace: &str,
    pod: &str,
    container: &str,
) -> Result<ContainerRef, StreamError> {
    let found = containers.find(namespace, pod, Some(container))?;
    if !found.running || !crate::shim::running(&found.state_dir) {
        return Err(StreamError::BadRequest(format!(
            "container {container:?} in pod {pod:?} is not running"
        )));
    }
    Ok(found)
}

fn check_streams(flags: StreamFlags) -> Result<(), StreamError> {
    if !(flags.stdin || flags.stdout || flags.stderr) {
        return Err(StreamError::BadRequest(
            "you must specify at least 1 of stdin, stdout, stderr".into(),
        ));
    }
    Ok(())
}

/// Switches an exec or attach request to the protocol the client offers
/// (WebSocket v5/v4 first, SPDY otherwise) and runs `process` on it.
pub fn upgrade_session(
    request: &mut Request<Incoming>,
    flags: StreamFlags,
    process: Process,
) -> Result<Response<Body>, StreamError> {
    let headers = request.headers().clone();
    let on_upgrade = hyper::upgrade::on(request);
    match header(&headers, "upgrade").to_ascii_lowercase().as_str() {
        "websocket" => {
            let offered = list(&headers, "sec-websocket-protocol");
            let chosen = ["v5.channel.k8s.io", "v4.channel.k8s.io"]
                .into_iter()
                .find(|p| offered.iter().any(|o| o == p))
                .ok_or_else(|| {
                    StreamError::BadRequest(format!(
                        "none of the offered WebSocket subprotocols {offered:?} is supported \
                         (v5.channel.k8s.io, v4.channel.k8s.io)"
                    ))
                })?;
            let accept = websocket::accept_key(header(&headers, "sec-websocket-key"));
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await
                    && let Err(e) =
                        session::over_websocket(TokioIo::new(upgraded), flags, process).await
                {
                    tracing::debug!(error = %e, "exec/attach session ended");
                }
            });
            Ok(switching(
                "websocket",
                &[
                    ("sec-websocket-accept", accept.as_str()),
                    ("sec-websocket-protocol", chosen),
                ],
            ))
        }
        "spdy/3.1" => {
            const PROTOCOL: &str = "v4.channel.k8s.io";
            if !list(&headers, "x-stream-protocol-version")
                .iter()
                .any(|v| v == PROTOCOL)
            {
                return Err(StreamError::BadRequest(format!(
                    "the client offers no supported stream protocol ({PROTOCOL})"
                )));
            }
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await
                    && let Err(e) = session::over_spdy(TokioIo::new(upgraded), flags, process).await
                {
                    tracing::debug!(error = %e, "exec/attach session ended");
                }
            });
            Ok(switching(
                "SPDY/3.1",
                &[("x-stream-protocol-version", PROTOCOL)],
            ))
        }
        _ => Err(StreamError::BadRequest("Upgrade request required".into())),
    }
}

/// Switches a port-forward request to SPDY, plain or tunnelled in a
/// WebSocket, connecting with `dial`.
pub fn upgrade_port_forward(
    request: &mut Request<Incoming>,
    pod: String,
    dial: Dialer,
) -> Result<Response<Body>, StreamError> {
    let headers = request.headers().clone();
    let on_upgrade = hyper::upgrade::on(request);
    match header(&headers, "upgrade").to_ascii_lowercase().as_str() {
        "websocket" => {
            const PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";
            if !list(&headers, "sec-websocket-protocol")
                .iter()
                .any(|p| p == PROTOCOL)
            {
                return Err(StreamError::BadRequest(format!(
                    "port-forward over WebSocket needs the {PROTOCOL} subprotocol"
                )));
            }
            let accept = websocket::accept_key(header(&headers, "sec-websocket-key"));
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await
                    && let Err(e) = portforward::tunnel(TokioIo::new(upgraded), pod, dial).await
                {
                    tracing::debug!(error = %e, "port-forward session ended");
                }
            });
            Ok(switching(
                "websocket",
                &[
                    ("sec-websocket-accept", accept.as_str()),
                    ("sec-websocket-protocol", PROTOCOL),
                ],
            ))
        }
        "spdy/3.1" => {
            const PROTOCOL: &str = "portforward.k8s.io";
            if !list(&headers, "x-stream-protocol-version")
                .iter()
                .any(|v| v == PROTOCOL)
            {
                return Err(StreamError::BadRequest(format!(
                    "the client offers no supported stream protocol ({PROTOCOL})"
                )));
            }
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await
                    && let Err(e) = portforward::over_spdy(TokioIo::new(upgraded), pod, dial).await
                {
                    tracing::debug!(error = %e, "port-forward session ended");
                }
            });
            Ok(switching(
                "SPDY/3.1",
                &[("x-stream-protocol-version", PROTOCOL)],
            ))
        }
        _ => Err(StreamError::BadRequest("Upgrade request required".into())),
    }
}

/// The protocol an upgrade response switched to, as `websocket:<sub>` or
/// `spdy:<version>`; for logs and tests.
pub fn switched_protocol(response: &Response<Body>) -> Option<String> {
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return None;
    }
    let headers = response.headers();
    match header(headers, "upgrade").to_ascii_lowercase().as_str() {
        "websocket" => Some(format!(
            "websocket:{}",
            header(headers, "sec-websocket-protocol")
        )),
        _ => Some(format!(
            "spdy:{}",
            header(headers, "x-stream-protocol-version")
        )),
    }
}

fn switching(upgrade: &str, extra: &[(&str, &str)]) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::new()).boxed());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("Upgrade"),
    );
    for (name, value) in std::iter::once(("upgrade", upgrade)).chain(extra.iter().copied()) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::try_from(name),
            http::HeaderValue::try_from(value),
        ) {
            headers.insert(name, value);
        }
    }
    response
}

/// A plain-text response, as kubelet's `http.Error`.
pub fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Every comma-separated value of every `name` header.
fn list(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .collect()
}

/// A query's pairs, decoded, in order and with repeats.
pub fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    query
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let decoded = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match decoded {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A response body fed by a channel: ends when the sender is dropped, and
/// its sender learns when the body is dropped (the client went away).
pub struct ChannelBody(pub mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_decode() {
        assert_eq!(percent_decode("a%2Fb"), "a/b");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }

    #[test]
    fn tls_needs_a_client_ca() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["node".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let e = tls_config(cert.pem().as_bytes(), key.serialize_pem().as_bytes(), b"").unwrap_err();
        assert!(e.to_string().contains("client CA"), "{e}");
        tls_config(
            cert.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
            cert.pem().as_bytes(),
        )
        .unwrap();
    }
}
