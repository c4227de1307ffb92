//! The request path: find the route in the current snapshot, answer
//! locally when the route says so (404, redirect, 429, 503), otherwise
//! forward to one of the backend's ready endpoints over a pooled
//! keep-alive connection and stream the answer back.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{PathAndQuery, Scheme, Uri};
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::annotations::Protocol;
use crate::body::{ResponseBody, UpstreamBody};
use crate::build::Snapshot;
use crate::metrics::Metrics;
use crate::pool::{ConnectError, Return};
use crate::route::{Backend, Endpoint, Route};
use crate::table::rewrite;

/// Time allowed to open a connection to an endpoint.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle upstream connections are closed after this.
const POOL_IDLE: Duration = Duration::from_secs(90);

pub struct Proxy {
    pub(crate) state: Arc<ArcSwap<Snapshot>>,
    h1: Client<HttpConnector, UpstreamBody>,
    h2c: Client<HttpConnector, UpstreamBody>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) https_port: u16,
    pub(crate) access_log: bool,
}

/// What the proxy knows about a client connection, made once per connection.
pub struct Conn {
    pub peer: SocketAddr,
    pub tls: bool,
    pub(crate) client_ip: HeaderValue,
    /// `for=…;proto=…` of the `Forwarded` header.
    pub(crate) forwarded: String,
}

impl Conn {
    pub fn new(peer: SocketAddr, tls: bool) -> Self {
        let ip = peer.ip().to_canonical();
        let proto = if tls { "https" } else { "http" };
        let forwarded = match ip {
            std::net::IpAddr::V4(v4) => format!("for={v4};proto={proto}"),
            std::net::IpAddr::V6(v6) => format!("for=\"[{v6}]\";proto={proto}"),
        };
        Conn {
            peer,
            tls,
            client_ip: HeaderValue::try_from(ip.to_string())
                .unwrap_or(HeaderValue::from_static("unknown")),
            forwarded,
        }
    }
}

/// Why a request got no upstream response.
enum Failure {
    Timeout,
    Refused,
    Other(Box<dyn std::error::Error + Send + Sync>),
}

impl Proxy {
    pub fn new(
        state: Arc<ArcSwap<Snapshot>>,
        metrics: Arc<Metrics>,
        https_port: u16,
        access_log: bool,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE)
            .set_host(false)
            .retry_canceled_requests(true);
        let h1 = builder.build(connector.clone());
        let h2c = builder.http2_only(true).build(connector);
        Proxy {
            state,
            h1,
            h2c,
            metrics,
            https_port,
            access_log,
        }
    }

    pub async fn serve(&self, mut req: Request<Incoming>, conn: &Conn) -> Response<ResponseBody> {
        let started = Instant::now();
        let Some(host) = request_host(&req) else {
            return local(StatusCode::BAD_REQUEST, "missing or malformed Host\n");
        };
        let host = lower(host).into_owned();
        let snapshot = self.state.load();
        let Some(matched) = snapshot.table.lookup(&host, req.uri().path()) else {
            drop(snapshot);
            self.metrics
                .record(None, 404, started.elapsed().as_secs_f64());
            self.log(conn, &req, &host, None, 404, None, started);
            return local(StatusCode::NOT_FOUND, "404 page not found\n");
        };
        let route = matched.route.clone();
        let matched_len = matched.matched_len;
        drop(snapshot);

        let upgrade = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        let (response, upstream) = self
            .route_request(req, conn, &host, &route, matched_len, upgrade)
            .await;
        let status = response.status().as_u16();
        self.metrics.record(
            Some(&route.metrics),
            status,
            started.elapsed().as_secs_f64(),
        );
        if self.access_log {
            tracing::info!(
                target: "ingress::access",
                client = %conn.peer.ip(),
                %host,
                status,
                ingress = %route.ingress,
                upstream = ?upstream,
                micros = started.elapsed().as_micros() as u64,
            );
        }
        response
    }

    async fn route_request(
        &self,
        req: Request<Incoming>,
        conn: &Conn,
        host: &str,
        route: &Route,
        matched_len: usize,
        upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> (Response<ResponseBody>, Option<SocketAddr>) {
        if !conn.tls && route.redirect_https {
            return (self.redirect(&req, host), None);
        }
        if let Some(limiter) = &route.limiter
            && !limiter.allow(conn.peer.ip(), Instant::now())
        {
            return (
                local(StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded\n"),
                None,
            );
        }
        let backend = route.pick_backend();
        if backend.endpoints.is_empty() {
            return (
                local(StatusCode::SERVICE_UNAVAILABLE, "no ready endpoints\n"),
                None,
            );
        }
        let (mut parts, body) = req.into_parts();
        let path_and_query = match &route.settings.rewrite_target {
            Some(target) => {
                let rewritten = rewrite(parts.uri.path(), parts.uri.query(), matched_len, target);
                match PathAndQuery::try_from(rewritten) {
                    Ok(p) => p,
                    Err(_) => return (local(StatusCode::BAD_REQUEST, "bad path\n"), None),
                }
            }
            None => parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        };
        prepare_headers(&mut parts.headers, conn, host, upgrade.is_some());
        parts.version = match backend.protocol {
            Protocol::Http1 => Version::HTTP_11,
            Protocol::H2c => Version::HTTP_2,
        };
        parts.extensions = http::Extensions::new();
        let timeout = route.settings.read_timeout;
        let result = match backend.protocol {
            Protocol::Http1 => {
                self.send_h1(backend, parts, body, path_and_query, timeout)
                    .await
            }
            Protocol::H2c => self
                .send(backend, parts, body, path_and_query, timeout)
                .await
                .map(|(resp, addr)| (resp.map(ResponseBody::Upstream), addr)),
        };
        match result {
            Ok((mut resp, addr)) => {
                if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                    // The connection now belongs to the upgrade, not the pool.
                    resp.body_mut().detach();
                    if let Some(client_side) = upgrade {
                        let upstream_side = hyper::upgrade::on(&mut resp);
                        tokio::spawn(splice(client_side, upstream_side));
                    }
                } else {
                    strip_hop_by_hop(resp.headers_mut());
                }
                *resp.version_mut() = Version::HTTP_11;
                (resp, Some(addr))
            }
            Err((failure, addr)) => {
                let (status, text) = match failure {
                    Failure::Timeout => (StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n"),
                    Failure::Refused => {
                        (StatusCode::BAD_GATEWAY, "upstream refused the connection\n")
                    }
                    Failure::Other(e) => {
                        tracing::debug!(error = %e, backend = %backend.name, "upstream request failed");
                        (StatusCode::BAD_GATEWAY, "upstream request failed\n")
                    }
                };
                (local(status, text), addr)
            }
        }
    }

    /// Sends to one endpoint, moving on to the next when a connection is
    /// refused and the request can be sent again (idempotent, no body).
    async fn send(
        &self,
        backend: &Backend,
        parts: Parts,
        body: Incoming,
        path_and_query: PathAndQuery,
        timeout: Duration,
    ) -> Result<(Response<Incoming>, SocketAddr), (Failure, Option<SocketAddr>)> {
        let client = match backend.protocol {
            Protocol::Http1 => &self.h1,
            Protocol::H2c => &self.h2c,
        };
        let retryable = is_idempotent(&parts.method) && body.is_end_stream();
        let attempts = if retryable {
            backend.endpoints.len().min(3)
        } else {
            1
        };
        let start = backend.start();
        let mut parts = Some(parts);
        let mut body = Some(body);
        let mut last = None;
        for attempt in 0..attempts {
            let Some(endpoint) = backend.endpoint(start, attempt) else {
                break;
            };
            let uri = upstream_uri(endpoint, path_and_query.clone());
            let req = if attempt + 1 < attempts {
                let Some(p) = parts.as_ref() else { break };
                copy_request(p, uri)
            } else {
                let Some(mut p) = parts.take() else { break };
                p.uri = uri;
                let b = match body.take() {
                    Some(b) if !retryable => UpstreamBody::Client(b),
                    _ => UpstreamBody::Empty,
                };
                Request::from_parts(p, b)
            };
            match tokio::time::timeout(timeout, client.request(req)).await {
                Ok(Ok(resp)) => return Ok((resp, endpoint.addr)),
                Ok(Err(e)) => match classify(e) {
                    Failure::Refused if attempt + 1 < attempts => {
                        tracing::debug!(endpoint = %endpoint.addr, "connection refused, trying the next endpoint");
                        last = Some(Failure::Refused);
                    }
                    failure => return Err((failure, Some(endpoint.addr))),
                },
                Err(_) => return Err((Failure::Timeout, Some(endpoint.addr))),
            }
        }
        Err((last.unwrap_or(Failure::Refused), None))
    }

    /// HTTP/1.1 over the endpoints' own connection pools. A request that
    /// never left (connection refused, or a pooled connection found closed)
    /// comes back whole and is sent again, so no copy is needed.
    async fn send_h1(
        &self,
        backend: &Backend,
        parts: Parts,
        body: Incoming,
        path_and_query: PathAndQuery,
        timeout: Duration,
    ) -> Result<(Response<ResponseBody>, SocketAddr), (Failure, Option<SocketAddr>)> {
        let idempotent = is_idempotent(&parts.method);
        let mut req = Request::from_parts(parts, UpstreamBody::Client(body));
        let attempts = if idempotent {
            backend.endpoints.len().min(3)
        } else {
            1
        };
        let start = backend.start();
        let (mut attempt, mut stale) = (0, 0);
        loop {
            let Some(endpoint) = backend.endpoint(start, attempt) else {
                return Err((Failure::Refused, None));
            };
            let addr = endpoint.addr;
            // The connection is to this endpoint already: origin-form.
            *req.uri_mut() = Uri::from(path_and_query.clone());
            let mut sender = match endpoint.pool.checkout(addr, CONNECT_TIMEOUT).await {
                Ok(sender) => sender,
                Err(ConnectError::Refused) if attempt + 1 < attempts => {
                    tracing::debug!(endpoint = %addr, "connection refused, trying the next endpoint");
                    attempt += 1;
                    continue;
                }
                Err(ConnectError::Refused) => return Err((Failure::Refused, Some(addr))),
                Err(ConnectError::Timeout) => return Err((Failure::Timeout, Some(addr))),
                Err(ConnectError::Other(e)) => {
                    return Err((Failure::Other(Box::new(e)), Some(addr)));
                }
            };
            match tokio::time::timeout(timeout, sender.try_send_request(req)).await {
                Ok(Ok(resp)) => {
                    let back = Return {
                        pool: endpoint.pool.clone(),
                        sender: Some(sender),
                    };
                    let (parts, body) = resp.into_parts();
                    return Ok((
                        Response::from_parts(parts, ResponseBody::Pooled(body, back)),
                        addr,
                    ));
                }
                Ok(Err(mut e)) => match e.take_message() {
                    Some(unsent) if stale < 3 => {
                        req = unsent;
                        stale += 1;
                    }
                    _ => return Err((Failure::Other(Box::new(e.into_error())), Some(addr))),
                },
                Err(_) => return Err((Failure::Timeout, Some(addr))),
            }
        }
    }

    fn redirect(&self, req: &Request<Incoming>, host: &str) -> Response<ResponseBody> {
        let path = req.uri().path_and_query().map_or("/", PathAndQuery::as_str);
        let location = if self.https_port == 443 {
            format!("https://{host}{path}")
        } else {
            format!("https://{host}:{}{path}", self.https_port)
        };
        let mut resp = local(StatusCode::PERMANENT_REDIRECT, "");
        if let Ok(v) = HeaderValue::try_from(location) {
            resp.headers_mut().insert(header::LOCATION, v);
        }
        resp
    }

    #[allow(clippy::too_many_arguments)]
    fn log(
        &self,
        conn: &Conn,
        req: &Request<Incoming>,
        host: &str,
        ingress: Option<&str>,
        status: u16,
        upstream: Option<SocketAddr>,
        started: Instant,
    ) {
        if self.access_log {
            tracing::info!(
                target: "ingress::access",
                client = %conn.peer.ip(),
                method = %req.method(),
                %host,
                path = req.uri().path(),
                status,
                ingress = ingress.unwrap_or(""),
                upstream = ?upstream,
                micros = started.elapsed().as_micros() as u64,
            );
        }
    }
}

fn local(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::text(text));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// The Host header (HTTP/1) or the URI's authority (HTTP/2), without port.
fn request_host<B>(req: &Request<B>) -> Option<&str> {
    if let Some(h) = req.uri().host() {
        return Some(h.trim_start_matches('[').trim_end_matches(']'));
    }
    let value = req.headers().get(header::HOST)?.to_str().ok()?;
    if let Some(v6) = value.strip_prefix('[') {
        return v6.split(']').next();
    }
    let host = value.rsplit_once(':').map_or(value, |(h, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            value
        }
    });
    (!host.is_empty()).then_some(host)
}

pub(crate) fn lower(host: &str) -> Cow<'_, str> {
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && connection_has(req.headers(), "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the headers meant for one hop only, including those the
/// Connection header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if let Some(conn) = headers.get(header::CONNECTION) {
        let named: Vec<HeaderName> = conn
            .to_str()
            .unwrap_or("")
            .split(',')
            .filter_map(|t| HeaderName::try_from(t.trim()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        if headers.contains_key(name) {
            headers.remove(name);
        }
    }
}

fn prepare_headers(headers: &mut HeaderMap, conn: &Conn, host: &str, upgrade: bool) {
    let upgrade_to = if upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    strip_hop_by_hop(headers);
    if let Some(protocol) = upgrade_to {
        headers.insert(header::UPGRADE, protocol);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    let host_value = HeaderValue::try_from(host).ok();
    if !headers.contains_key(header::HOST)
        && let Some(h) = &host_value
    {
        headers.insert(header::HOST, h.clone());
    }
    const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    let xff = match headers.get(&XFF).and_then(|v| v.to_str().ok()) {
        Some(prior) => HeaderValue::try_from(format!("{prior}, {}", conn.peer.ip().to_canonical()))
            .unwrap_or_else(|_| conn.client_ip.clone()),
        None => conn.client_ip.clone(),
    };
    headers.insert(XFF, xff);
    let proto = if conn.tls { "https" } else { "http" };
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static(proto),
    );
    if let Some(h) = host_value {
        headers.insert(HeaderName::from_static("x-forwarded-host"), h);
    }
    let element = format!("{};host=\"{host}\"", conn.forwarded);
    let forwarded = match headers.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {element}"),
        None => element,
    };
    if let Ok(v) = HeaderValue::try_from(forwarded) {
        headers.insert(header::FORWARDED, v);
    }
}

fn upstream_uri(endpoint: &Endpoint, path_and_query: PathAndQuery) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(endpoint.authority.clone());
    parts.path_and_query = Some(path_and_query);
    Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
}

/// A copy for an attempt that may be followed by another (no body).
fn copy_request(parts: &Parts, uri: Uri) -> Request<UpstreamBody> {
    let mut req = Request::new(UpstreamBody::Empty);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = uri;
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

fn classify(e: hyper_util::client::legacy::Error) -> Failure {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused if e.is_connect() => return Failure::Refused,
                std::io::ErrorKind::TimedOut => return Failure::Timeout,
                _ => {}
            }
        }
        source = s.source();
    }
    Failure::Other(Box::new(e))
}

/// Joins the client's and the backend's upgraded connections (WebSocket
/// and other `Upgrade` protocols) and copies bytes both ways until either
/// side closes.
async fn splice(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = tokio::join!(client, upstream);
    let (Ok(client), Ok(upstream)) = (client, upstream) else {
        tracing::debug!("an upgrade did not complete");
        return;
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "upgraded connection ended");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_from_header_or_authority() {
        let req = Request::builder()
            .uri("/x")
            .header("host", "Example.com:8080")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req), Some("Example.com"));
        assert_eq!(lower("Example.com"), "example.com");
        let req = Request::builder()
            .uri("https://h2.example/x")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req), Some("h2.example"));
        let req = Request::builder()
            .uri("/")
            .header("host", "[::1]:80")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req), Some("::1"));
        let req = Request::builder().uri("/").body(()).unwrap();
        assert_eq!(request_host(&req), None);
    }

    #[test]
    fn forwarding_headers() {
        let conn = Conn::new("10.1.2.3:5555".parse().unwrap(), true);
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("secret"));
        h.insert("te", HeaderValue::from_static("trailers"));
        prepare_headers(&mut h, &conn, "a.example", false);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "a.example");
        assert_eq!(h["host"], "a.example");
        assert_eq!(
            h["forwarded"],
            "for=10.1.2.3;proto=https;host=\"a.example\""
        );
        assert!(
            !h.contains_key("x-private") && !h.contains_key("connection") && !h.contains_key("te")
        );

        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        prepare_headers(
            &mut h,
            &Conn::new("[::1]:1".parse().unwrap(), false),
            "b",
            true,
        );
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["forwarded"], "for=\"[::1]\";proto=http;host=\"b\"");
    }
}
