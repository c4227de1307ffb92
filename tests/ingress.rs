//! The Ingress controller inside a real `skiff server`, driven with the
//! real kubectl. No pods run here (the node agent is another component),
//! so each backend is an HTTP server the test starts on loopback, put
//! behind a selector-less Service by an EndpointSlice the test writes —
//! the same objects the EndpointSlice controller writes for pods. The
//! API accepts 127.0.0.1 endpoint addresses, so no network namespace is
//! needed and all traffic stays on loopback.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use skiff_e2e::etcd::free_port;
use skiff_e2e::server::Server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");
const DEADLINE: Duration = Duration::from_secs(30);

/// A server with its ingress on free ports.
struct Cluster {
    server: Server,
    http: u16,
    https: u16,
}

async fn cluster() -> anyhow::Result<Cluster> {
    let (http, https, metrics) = (free_port()?, free_port()?, free_port()?);
    let server = Server::start(
        SKIFF.as_ref(),
        &[
            "--ingress-http-port",
            &http.to_string(),
            "--ingress-https-port",
            &https.to_string(),
            "--ingress-metrics-port",
            &metrics.to_string(),
        ],
    )
    .await?;
    Ok(Cluster {
        server,
        http,
        https,
    })
}

impl Cluster {
    fn apply(&self, yaml: &str) -> anyhow::Result<()> {
        self.server.kubectl_stdin(&["apply", "-f", "-"], yaml)?;
        Ok(())
    }

    /// A Service without selector whose endpoints are `backends`.
    fn service(
        &self,
        name: &str,
        port: u16,
        port_name: &str,
        backends: &[&Backend],
    ) -> anyhow::Result<()> {
        self.apply(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  ports: [{{name: {port_name}, port: {port}, targetPort: 8080}}]\n"
        ))?;
        for b in backends {
            self.add_endpoint(name, port_name, b)?;
        }
        Ok(())
    }

    /// One EndpointSlice per backend (each listens on its own port).
    fn add_endpoint(&self, service: &str, port_name: &str, b: &Backend) -> anyhow::Result<()> {
        self.apply(&format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-{name}\n  labels: {{kubernetes.io/service-name: {service}, endpointslice.kubernetes.io/managed-by: skiff-test}}\naddressType: IPv4\nports: [{{name: {port_name}, port: {port}, protocol: TCP}}]\nendpoints: [{{addresses: [127.0.0.1], conditions: {{ready: true}}}}]\n",
            name = b.name,
            port = b.port,
        ))
    }

    fn remove_endpoint(&self, service: &str, b: &Backend) -> anyhow::Result<()> {
        self.server
            .kubectl_ok(&["delete", "endpointslice", &format!("{service}-{}", b.name)])?;
        Ok(())
    }

    async fn get(&self, host: &str, path: &str) -> anyhow::Result<Reply> {
        get(self.http, host, path, &[]).await
    }

    /// Polls until `host` `path` answers with `body_prefix` (the table
    /// follows the API asynchronously).
    async fn wait_for(
        &self,
        host: &str,
        path: &str,
        status: u16,
        body_prefix: &str,
    ) -> anyhow::Result<Reply> {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let reply = self.get(host, path).await;
            if let Ok(r) = &reply
                && r.status == status
                && r.body.starts_with(body_prefix)
            {
                return reply;
            }
            if Instant::now() > deadline {
                bail!(
                    "{host}{path}: wanted {status} {body_prefix:?}, last {reply:?}\n{}",
                    self.server.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    headers: http::HeaderMap,
    body: String,
    version: Version,
}

/// A backend "pod": answers `NAME METHOD PATH VERSION` and echoes the
/// forwarding headers it got; `/slow` takes 3 s; `Upgrade` requests are
/// switched and echoed byte for byte.
struct Backend {
    name: String,
    port: u16,
    hits: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn backend(name: &str) -> anyhow::Result<Backend> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let hits = Arc::new(AtomicU64::new(0));
    let (n, h) = (name.to_owned(), hits.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (name, hits) = (n.clone(), h.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let (name, hits) = (name.clone(), hits.clone());
                    async move { Ok::<_, Infallible>(answer(&name, &hits, req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(Backend {
        name: name.to_owned(),
        port,
        hits,
        task,
    })
}

async fn answer(name: &str, hits: &AtomicU64, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    hits.fetch_add(1, Ordering::Relaxed);
    if req.headers().contains_key(http::header::UPGRADE) {
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = on_upgrade.await {
                let mut io = TokioIo::new(upgraded);
                let mut buf = [0u8; 4096];
                while let Ok(n) = io.read(&mut buf).await {
                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("upgrade", "websocket")
            .header("connection", "upgrade")
            .body(Full::new(Bytes::new()))
            .unwrap_or_default();
    }
    if req.uri().path() == "/slow" {
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let mut resp = Response::new(Full::new(Bytes::from(format!(
        "{name} {} {} {:?}",
        req.method(),
        req.uri(),
        req.version()
    ))));
    for h in [
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "forwarded",
        "host",
    ] {
        if let Some(v) = req.headers().get(h) {
            resp.headers_mut().insert(
                http::HeaderName::from_bytes(format!("seen-{h}").as_bytes())
                    .unwrap_or(http::header::WARNING),
                v.clone(),
            );
        }
    }
    resp
}

/// One HTTP/1.1 request on a new connection to the ingress.
async fn get(port: u16, host: &str, path: &str, headers: &[(&str, &str)]) -> anyhow::Result<Reply> {
    let stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = Request::get(path).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(&mut sender, req.body(Empty::<Bytes>::new())?).await
}

async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    req: Request<Empty<Bytes>>,
) -> anyhow::Result<Reply> {
    // The connection takes a moment to be free after the last response.
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    reply(resp).await
}

async fn reply(resp: Response<Incoming>) -> anyhow::Result<Reply> {
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Reply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        version: parts.version,
    })
}

/// Raw bytes in, the status line out.
async fn raw(port: u16, request: &[u8]) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    // The proxy may answer and close before it read everything.
    let _ = stream.write_all(request).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    Ok(text.lines().next().unwrap_or("").to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_by_host_and_path_as_the_spec_says() -> anyhow::Result<()> {
    let c = cluster().await?;
    let (b1, b2, b3) = (
        backend("b1").await?,
        backend("b2").await?,
        backend("b3").await?,
    );
    c.service("service1", 4200, "http", &[&b1])?;
    c.service("service2", 8080, "http", &[&b2])?;
    c.service("service3", 80, "web", &[&b3])?;
    // The specification's examples: simple fanout, name-based virtual
    // hosting, wildcard hosts; then Exact vs Prefix.
    c.apply(
        r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: simple-fanout-example}
spec:
  ingressClassName: skiff
  rules:
  - host: foo.bar.com
    http:
      paths:
      - {path: /foo, pathType: Prefix, backend: {service: {name: service1, port: {number: 4200}}}}
      - {path: /bar, pathType: Prefix, backend: {service: {name: service2, port: {number: 8080}}}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: name-virtual-host-ingress}
spec:
  ingressClassName: skiff
  rules:
  - host: first.bar.com
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: service1, port: {number: 4200}}}}]
  - host: second.bar.com
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: service2, port: {number: 8080}}}}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: ingress-wildcard-host}
spec:
  ingressClassName: skiff
  rules:
  - host: foo.baz.com
    http:
      paths: [{path: /bar, pathType: Prefix, backend: {service: {name: service1, port: {number: 4200}}}}]
  - host: "*.foo.com"
    http:
      paths: [{path: /foo, pathType: Prefix, backend: {service: {name: service2, port: {number: 8080}}}}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: exact-vs-prefix}
spec:
  ingressClassName: skiff
  rules:
  - host: exact.example
    http:
      paths:
      - {path: /foo, pathType: Exact, backend: {service: {name: service1, port: {number: 4200}}}}
      - {path: /foo, pathType: Prefix, backend: {service: {name: service2, port: {number: 8080}}}}
      - {path: /aaa/bbb/, pathType: ImplementationSpecific, backend: {service: {name: service3, port: {name: web}}}}
      - {path: /missing, pathType: Exact, backend: {service: {name: nosuch, port: {number: 80}}}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: someone-elses}
spec:
  ingressClassName: other
  rules:
  - host: other.example
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: service1, port: {number: 4200}}}}]
"#,
    )?;
    c.wait_for("exact.example", "/foo", 200, "b1").await?;
    let cases: &[(&str, &str, u16, &str)] = &[
        ("foo.bar.com", "/foo", 200, "b1 GET /foo "),
        ("foo.bar.com", "/foo/x?q=1", 200, "b1 GET /foo/x?q=1 "),
        ("foo.bar.com", "/bar", 200, "b2"),
        ("foo.bar.com", "/foobar", 404, ""),
        ("foo.bar.com", "/", 404, ""),
        ("first.bar.com", "/anything", 200, "b1"),
        ("FIRST.bar.com:8000", "/", 200, "b1"),
        ("second.bar.com", "/", 200, "b2"),
        ("foo.baz.com", "/bar", 200, "b1"),
        ("bar.foo.com", "/foo", 200, "b2"),
        ("baz.bar.foo.com", "/foo", 404, ""),
        ("foo.com", "/foo", 404, ""),
        ("exact.example", "/foo", 200, "b1"),
        ("exact.example", "/foo/", 200, "b2"),
        ("exact.example", "/foo/x", 200, "b2"),
        ("exact.example", "/aaa/bbb", 200, "b3"),
        ("exact.example", "/aaa/bbb/ccc", 200, "b3"),
        ("exact.example", "/aaa/bbbxyz", 404, ""),
        ("exact.example", "/missing", 503, ""),
        ("unknown.example", "/", 404, ""),
        ("other.example", "/", 404, ""),
    ];
    for (host, path, status, body) in cases {
        let r = c.get(host, path).await?;
        ensure!(
            r.status == *status && r.body.starts_with(body),
            "{host}{path}: {r:?}"
        );
    }
    // What the backend was told about the client.
    let r = c.get("first.bar.com", "/h").await?;
    ensure!(r.headers["seen-x-forwarded-for"] == "127.0.0.1", "{r:?}");
    ensure!(r.headers["seen-x-forwarded-proto"] == "http", "{r:?}");
    ensure!(
        r.headers["seen-x-forwarded-host"] == "first.bar.com",
        "{r:?}"
    );
    ensure!(r.headers["seen-host"] == "first.bar.com", "{r:?}");
    ensure!(
        r.headers["seen-forwarded"] == "for=127.0.0.1;proto=http;host=\"first.bar.com\"",
        "{r:?}"
    );

    // The broken reference is an event; nothing else suffered (above).
    let deadline = Instant::now() + DEADLINE;
    loop {
        let events = c
            .server
            .kubectl_ok(&["get", "events.events.k8s.io", "-o", "wide"])?;
        if events.contains("ServiceNotFound") && events.contains("exact-vs-prefix") {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no ServiceNotFound event: {events}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Served Ingresses carry the node address; others' are left alone.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let ip = c.server.kubectl_ok(&[
            "get",
            "ingress",
            "simple-fanout-example",
            "-o",
            "jsonpath={.status.loadBalancer.ingress[0].ip}",
        ])?;
        if ip == "127.0.0.1" {
            break;
        }
        ensure!(Instant::now() < deadline, "status address {ip:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let other = c.server.kubectl_ok(&[
        "get",
        "ingress",
        "someone-elses",
        "-o",
        "jsonpath={.status}",
    ])?;
    ensure!(!other.contains("127.0.0.1"), "{other}");

    // A default backend answers what no rule matches; a rule without a
    // host comes before it.
    c.apply(
        r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: test-ingress}
spec:
  ingressClassName: skiff
  defaultBackend: {service: {name: service3, port: {name: web}}}
"#,
    )?;
    c.wait_for("unknown.example", "/", 200, "b3").await?;
    ensure!(
        c.get("exact.example", "/aaa/bbbxyz")
            .await?
            .body
            .starts_with("b3")
    );
    c.apply(
        r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: hostless}
spec:
  ingressClassName: skiff
  rules:
  - http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: service2, port: {number: 8080}}}}]
"#,
    )?;
    c.wait_for("unknown.example", "/", 200, "b2").await?;
    ensure!(c.get("foo.bar.com", "/foo").await?.body.starts_with("b1"));

    // Annotations: rewrite, read timeout.
    c.apply(
        r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: rewrite
  annotations: {skiff.io/rewrite-target: /, skiff.io/proxy-read-timeout: "1"}
spec:
  ingressClassName: skiff
  rules:
  - host: rw.example
    http:
      paths: [{path: /api, pathType: Prefix, backend: {service: {name: service1, port: {number: 4200}}}}]
"#,
    )?;
    c.wait_for("rw.example", "/api/users?x=1", 200, "b1 GET /users?x=1 ")
        .await?;
    let started = Instant::now();
    let r = c.get("rw.example", "/api/slow").await?;
    ensure!(r.status == 504, "{r:?}");
    ensure!(
        started.elapsed() < Duration::from_millis(2900),
        "504 took {:?}",
        started.elapsed()
    );

    // A Service whose endpoints all went away: 503 at once.
    c.remove_endpoint("service3", &b3)?;
    c.wait_for("exact.example", "/aaa/bbb", 503, "").await?;

    // Bad requests.
    ensure!(raw(c.http, b"GARBAGE\r\n\r\n").await?.contains("400"));
    let big = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "x".repeat(100_000)
    );
    ensure!(raw(c.http, big.as_bytes()).await?.contains("431"));
    Ok(())
}

/// A self-signed ECDSA certificate for `host`: (cert PEM, key PEM, DER).
fn certificate(host: &str) -> anyhow::Result<(String, String, Vec<u8>)> {
    let key = rcgen::KeyPair::generate()?;
    let cert = rcgen::CertificateParams::new(vec![host.to_owned()])?.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem(), cert.der().to_vec()))
}

fn tls_secret(
    c: &Cluster,
    name: &str,
    host: &str,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<u8>> {
    let (cert, key, der) = certificate(host)?;
    let (cert_path, key_path) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert_path, cert)?;
    std::fs::write(&key_path, key)?;
    let yaml = c.server.kubectl_ok(&[
        "create",
        "secret",
        "tls",
        name,
        "--cert",
        &cert_path.to_string_lossy(),
        "--key",
        &key_path.to_string_lossy(),
        "--dry-run=client",
        "-o",
        "yaml",
    ])?;
    c.apply(&yaml)?;
    Ok(der)
}

/// Accepts any server certificate; the test compares what it got.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// One HTTPS request with SNI `host` and ALPN `alpn`; returns the reply
/// and the certificate the ingress presented.
async fn https_get(
    port: u16,
    host: &str,
    path: &str,
    alpn: &[u8],
) -> anyhow::Result<(Reply, Vec<u8>)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())?;
    let tls = connector.connect(name, stream).await?;
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .context("no server certificate")?;
    let io = TokioIo::new(tls);
    let reply = if alpn == b"h2" {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        let req = Request::get(format!("https://{host}{path}")).body(Empty::<Bytes>::new())?;
        reply(sender.send_request(req).await?).await?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        send(
            &mut sender,
            Request::get(path).header("host", host).body(Empty::new())?,
        )
        .await?
    };
    Ok((reply, cert))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_by_sni_http2_and_websocket() -> anyhow::Result<()> {
    let c = cluster().await?;
    let dir = tempfile::Builder::new()
        .prefix("skiff-test-ingress-")
        .tempdir()?;
    let (b1, b2) = (backend("b1").await?, backend("b2").await?);
    c.service("service1", 80, "http", &[&b1])?;
    c.service("service2", 80, "http", &[&b2])?;
    let cert_a = tls_secret(&c, "cert-a", "a.example", dir.path())?;
    let cert_b = tls_secret(&c, "cert-b", "b.example", dir.path())?;
    c.apply(
        r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: tls}
spec:
  ingressClassName: skiff
  tls:
  - {hosts: [a.example], secretName: cert-a}
  - {hosts: [b.example], secretName: cert-b}
  rules:
  - host: a.example
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: service1, port: {number: 80}}}}]
  - host: b.example
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: service2, port: {number: 80}}}}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: plain
  annotations: {skiff.io/backend-protocol: H2C}
spec:
  ingressClassName: skiff
  rules:
  - host: ws.example
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: service1, port: {number: 80}}}}]
"#,
    )?;
    // Plain HTTP to a TLS host is redirected.
    let r = c.wait_for("a.example", "/x?y=1", 308, "").await?;
    let location = format!("https://a.example:{}/x?y=1", c.https);
    ensure!(r.headers["location"] == location.as_str(), "{r:?}");

    // Each name gets its own certificate; HTTP/1.1 and HTTP/2 by ALPN.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let (r, cert) = https_get(c.https, "a.example", "/one", b"http/1.1").await?;
        if cert == cert_a {
            ensure!(
                r.status == 200 && r.body.starts_with("b1 GET /one HTTP/1.1"),
                "{r:?}"
            );
            ensure!(r.headers["seen-x-forwarded-proto"] == "https", "{r:?}");
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "a.example never got its certificate"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (r, cert) = https_get(c.https, "b.example", "/two", b"h2").await?;
    ensure!(cert == cert_b, "b.example got the wrong certificate");
    ensure!(r.version == Version::HTTP_2, "{r:?}");
    ensure!(
        r.status == 200 && r.body.starts_with("b2 GET /two HTTP/1.1"),
        "{r:?}"
    );
    ensure!(r.headers["seen-host"] == "b.example", "{r:?}");

    // A changed Secret is served without a restart.
    let new_a = tls_secret(&c, "cert-a", "a.example", dir.path())?;
    ensure!(new_a != cert_a);
    let deadline = Instant::now() + DEADLINE;
    while https_get(c.https, "a.example", "/", b"http/1.1").await?.1 != new_a {
        ensure!(
            Instant::now() < deadline,
            "the renewed certificate was not served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // HTTP/2 cleartext to the backend.
    c.wait_for("ws.example", "/h2c", 200, "b1 GET http://")
        .await?;
    let r = c.get("ws.example", "/h2c").await?;
    ensure!(r.body.ends_with("HTTP/2.0"), "{r:?}");

    // WebSocket: the handshake is passed on and frames echo both ways.
    c.apply(
        r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: plain}
spec:
  ingressClassName: skiff
  rules:
  - host: ws.example
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: service1, port: {number: 80}}}}]
"#,
    )?;
    c.wait_for("ws.example", "/", 200, "b1 GET / HTTP/1.1")
        .await?;
    let mut stream = TcpStream::connect(("127.0.0.1", c.http)).await?;
    stream
        .write_all(
            b"GET /chat HTTP/1.1\r\nHost: ws.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await?;
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        ensure!(
            stream.read(&mut byte).await? == 1,
            "closed during the handshake"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    ensure!(head.starts_with("HTTP/1.1 101"), "{head}");
    for text in ["hello", "through the ingress"] {
        // A masked client text frame; the echo backend returns the same bytes.
        let mask = [1u8, 2, 3, 4];
        let mut frame = vec![0x81, 0x80 | text.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        stream.write_all(&frame).await?;
        let mut back = vec![0u8; frame.len()];
        stream.read_exact(&mut back).await?;
        let payload: Vec<u8> = back[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ back[2 + i % 4])
            .collect();
        ensure!(
            back[0] == 0x81 && payload == text.as_bytes(),
            "echo {back:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_under_load_drop_nothing() -> anyhow::Result<()> {
    let c = cluster().await?;
    let (b1, b2, b3) = (
        backend("b1").await?,
        backend("b2").await?,
        backend("b3").await?,
    );
    c.service("web", 80, "http", &[&b1])?;
    c.service("other", 80, "http", &[&b3])?;
    c.apply(
        r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: load}
spec:
  ingressClassName: skiff
  rules:
  - host: load.example
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}]
"#,
    )?;
    c.wait_for("load.example", "/", 200, "b1").await?;

    // Eight clients, each on one keep-alive connection, as fast as they can.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let done = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (stop, failures, done, port) = (stop.clone(), failures.clone(), done.clone(), c.http);
        workers.push(tokio::spawn(async move {
            let stream = TcpStream::connect(("127.0.0.1", port)).await?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            while !stop.load(Ordering::Relaxed) {
                let req = Request::get("/")
                    .header("host", "load.example")
                    .body(Empty::new())?;
                match send(&mut sender, req).await {
                    Ok(r) if r.status == 200 => {}
                    Ok(r) => failures
                        .lock()
                        .map_err(|_| anyhow::anyhow!("poisoned"))?
                        .push(format!("{r:?}")),
                    Err(e) => failures
                        .lock()
                        .map_err(|_| anyhow::anyhow!("poisoned"))?
                        .push(e.to_string()),
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    let hits_after = |b: &Backend, min: u64| {
        let before = b.hits.load(Ordering::Relaxed);
        let hits = b.hits.clone();
        async move {
            let deadline = Instant::now() + DEADLINE;
            while hits.load(Ordering::Relaxed) < before + min {
                ensure!(Instant::now() < deadline, "backend got no traffic");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok(())
        }
    };
    // Scale up: a second endpoint gets traffic; scale down: the first stops.
    c.add_endpoint("web", "http", &b2)?;
    let started = Instant::now();
    hits_after(&b2, 50).await?;
    let followed = started.elapsed();
    c.remove_endpoint("web", &b1)?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b1_before = b1.hits.load(Ordering::Relaxed);
    hits_after(&b2, 200).await?;
    ensure!(
        b1.hits.load(Ordering::Relaxed) == b1_before,
        "a removed endpoint still got requests"
    );
    // Edit the Ingress: a new path and a new backend for the old one.
    c.apply(
        r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: load}
spec:
  ingressClassName: skiff
  rules:
  - host: load.example
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: other, port: {number: 80}}}}
      - {path: /new, pathType: Exact, backend: {service: {name: web, port: {number: 80}}}}
"#,
    )?;
    hits_after(&b3, 200).await?;
    c.wait_for("load.example", "/new", 200, "b2").await?;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await??;
    }
    let failures = failures.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    let total = done.load(Ordering::Relaxed);
    ensure!(
        failures.is_empty(),
        "{} of {total} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    ensure!(total > 1000, "only {total} requests ran");
    ensure!(
        followed < Duration::from_secs(5),
        "the new endpoint took {followed:?}"
    );
    eprintln!("{total} requests, none failed; a new endpoint got traffic after {followed:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_takes_its_weight() -> anyhow::Result<()> {
    let c = cluster().await?;
    let (stable, canary) = (backend("stable").await?, backend("canary").await?);
    c.service("stable", 80, "http", &[&stable])?;
    c.service("canary", 80, "http", &[&canary])?;
    c.apply(
        r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: app}
spec:
  ingressClassName: skiff
  rules:
  - host: app.example
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: stable, port: {number: 80}}}}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: app-canary
  annotations: {skiff.io/canary: "true", skiff.io/canary-weight: "20"}
spec:
  ingressClassName: skiff
  rules:
  - host: app.example
    http:
      paths: [{path: /, pathType: Prefix, backend: {service: {name: canary, port: {number: 80}}}}]
"#,
    )?;
    c.wait_for("app.example", "/", 200, "canary").await?;
    let stream = TcpStream::connect(("127.0.0.1", c.http)).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut counts: HashMap<String, u32> = HashMap::new();
    for _ in 0..1000 {
        let r = send(
            &mut sender,
            Request::get("/")
                .header("host", "app.example")
                .body(Empty::new())?,
        )
        .await?;
        ensure!(r.status == 200, "{r:?}");
        let name = r.body.split(' ').next().unwrap_or("").to_owned();
        *counts.entry(name).or_default() += 1;
    }
    let canary_share = counts.get("canary").copied().unwrap_or(0);
    eprintln!("canary got {canary_share} of 1000: {counts:?}");
    ensure!(
        (150..=250).contains(&canary_share),
        "canary got {canary_share} of 1000: {counts:?}"
    );
    Ok(())
}
