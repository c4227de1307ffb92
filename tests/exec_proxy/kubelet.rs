//! A fake node agent: the kubelet API's streaming endpoints over HTTPS,
//! with canned "containers". It records every request it gets, so tests
//! can check what the API server asked for, and speaks each protocol
//! kubectl may end up on: plain HTTP for logs, WebSocket
//! (`v5.channel.k8s.io`/`v4.channel.k8s.io`) and SPDY/3.1 for exec and
//! attach, SPDY (plain or tunnelled in a WebSocket) for port-forward.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::spdy;
use super::websocket::{self, Message};

type Body = BoxBody<Bytes, Infallible>;

/// Whose certificate the fake serves with.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    /// Issued by the cluster's server CA, as a real agent's is.
    ClusterCa,
    /// Self-signed: the API server must refuse it.
    SelfSigned,
}

pub struct FakeKubelet {
    pub port: u16,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

struct Shared {
    seen: Mutex<Vec<String>>,
    /// Signalled when a followed log stream sees its reader go away.
    follow_ended: Notify,
    echo: SocketAddr,
    usage: Mutex<Usage>,
}

/// The CPU the fake's pods burn, as `/metrics/resource` reports it: one
/// rate for every pod listed, integrated into cumulative counters.
#[derive(Default)]
struct Usage {
    cores: f64,
    pods: Vec<(String, String)>,
    counters: std::collections::HashMap<(String, String), (f64, std::time::Instant)>,
}

/// What an exec or attach "runs": output it prints, whether it copies
/// stdin to stdout, its exit code, and the streams the request asked for.
#[derive(Clone)]
pub struct Process {
    pub output: Vec<u8>,
    pub echo_stdin: bool,
    pub exit_code: i32,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

impl FakeKubelet {
    /// Serves on a free loopback port. `tls_dir` is the server's
    /// `DATA_DIR/server/tls`: the fake's certificate is issued from its
    /// server CA, and it requires a client certificate from its client CA,
    /// as a real agent would. Port-forwarded connections go to `echo`.
    pub async fn start(
        tls_dir: &Path,
        identity: Identity,
        echo: SocketAddr,
    ) -> anyhow::Result<FakeKubelet> {
        let acceptor = TlsAcceptor::from(tls_config(tls_dir, identity)?);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared {
            seen: Mutex::new(Vec::new()),
            follow_ended: Notify::new(),
            echo,
            usage: Mutex::default(),
        });
        let serving = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let shared = serving.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |request| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(&shared, request)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Ok(FakeKubelet { port, shared, task })
    }

    /// Every request so far, as `METHOD path?query [protocol]`.
    pub fn seen(&self) -> Vec<String> {
        self.shared
            .seen
            .lock()
            .map(|seen| seen.clone())
            .unwrap_or_default()
    }

    /// From now on each of `pods` (namespace, name) uses `cores` of CPU.
    pub fn set_usage(&self, pods: &[(String, String)], cores: f64) {
        if let Ok(mut usage) = self.shared.usage.lock() {
            let now = std::time::Instant::now();
            advance(&mut usage, now);
            usage.cores = cores;
            usage.pods = pods.to_vec();
        }
    }

    /// Waits until a followed log stream has been abandoned by its reader.
    pub async fn follow_ended(&self, within: Duration) -> bool {
        tokio::time::timeout(within, self.shared.follow_ended.notified())
            .await
            .is_ok()
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn tls_config(tls_dir: &Path, identity: Identity) -> anyhow::Result<Arc<ServerConfig>> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])?;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let cert = match identity {
        Identity::ClusterCa => {
            let ca_cert = std::fs::read_to_string(tls_dir.join("server-ca.crt"))?;
            let ca_key =
                rcgen::KeyPair::from_pem(&std::fs::read_to_string(tls_dir.join("server-ca.key"))?)?;
            let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_cert, ca_key)?;
            params.signed_by(&key, &issuer)?
        }
        Identity::SelfSigned => params.self_signed(&key)?,
    };
    let client_ca = std::fs::read(tls_dir.join("client-ca.crt"))?;
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(&client_ca).context("client CA")?)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert.der().clone()], key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Brings every listed pod's counter up to `now` at the current rate.
fn advance(usage: &mut Usage, now: std::time::Instant) {
    let cores = usage.cores;
    for pod in usage.pods.clone() {
        let entry = usage.counters.entry(pod).or_insert((0.0, now));
        entry.0 += cores * now.duration_since(entry.1).as_secs_f64();
        entry.1 = now;
    }
}

/// `/metrics/resource` in the kubelet's format, for the listed pods.
fn resource_metrics(shared: &Shared) -> Response<Body> {
    let mut body = String::from("# TYPE container_cpu_usage_seconds_total counter\n");
    if let Ok(mut usage) = shared.usage.lock() {
        advance(&mut usage, std::time::Instant::now());
        let total: f64 = usage.counters.values().map(|(seconds, _)| seconds).sum();
        for (ns, pod) in &usage.pods {
            let seconds = usage
                .counters
                .get(&(ns.clone(), pod.clone()))
                .map_or(0.0, |c| c.0);
            let labels = format!("container=\"app\",namespace=\"{ns}\",pod=\"{pod}\"");
            body.push_str(&format!(
                "container_cpu_usage_seconds_total{{{labels}}} {seconds}\n"
            ));
            body.push_str(&format!(
                "container_memory_working_set_bytes{{{labels}}} 1048576\n"
            ));
        }
        body.push_str(&format!(
            "node_cpu_usage_seconds_total {total}\nnode_memory_working_set_bytes 1073741824\n"
        ));
    }
    text(StatusCode::OK, &body)
}

fn handle(shared: &Arc<Shared>, mut request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let params: Vec<(String, String)> = query_pairs(&query);
    let (response, protocol) = route(shared, &mut request, &path, &params);
    let mut line = format!("{} {path}", request.method());
    if !query.is_empty() {
        line.push('?');
        line.push_str(&query);
    }
    if let Some(protocol) = protocol {
        line.push(' ');
        line.push_str(&protocol);
    }
    if let Ok(mut seen) = shared.seen.lock() {
        seen.push(line);
    }
    response
}

/// The response, and the protocol switched to if any (`websocket:<sub>`
/// or `spdy:<version>`).
fn route(
    shared: &Arc<Shared>,
    request: &mut Request<Incoming>,
    path: &str,
    params: &[(String, String)],
) -> (Response<Body>, Option<String>) {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let flag = |name: &str| params.iter().any(|(k, v)| k == name && v == "1");
    let streams = |output: Vec<u8>, echo_stdin: bool, exit_code: i32| Process {
        output,
        echo_stdin,
        exit_code,
        stdin: flag("input"),
        stdout: flag("output"),
        stderr: flag("error"),
        tty: flag("tty"),
    };
    match segments.as_slice() {
        ["metrics", "resource"] => (resource_metrics(shared), None),
        ["containerLogs", _, pod, container] => (logs(shared, pod, container, params), None),
        ["exec", _, _, _] => {
            let command: Vec<&str> = params
                .iter()
                .filter(|(k, _)| k == "command")
                .map(|(_, v)| v.as_str())
                .collect();
            let process = match command.as_slice() {
                ["echo", words @ ..] => streams(format!("{}\n", words.join(" ")).into(), false, 0),
                ["cat"] => streams(Vec::new(), true, 0),
                ["false"] => streams(Vec::new(), false, 1),
                _ => streams(b"no such command\n".to_vec(), false, 127),
            };
            stream(shared, request, Session::Exec(process))
        }
        ["attach", _, _, container] => {
            let output = format!("attached to {container}\n").into_bytes();
            let process = streams(output, flag("input"), 0);
            stream(shared, request, Session::Exec(process))
        }
        ["portForward", _, _] => stream(shared, request, Session::PortForward),
        _ => (text(StatusCode::NOT_FOUND, "404 page not found\n"), None),
    }
}

/// Canned container output. `broken` answers as kubelet does for a
/// container that has not started; `follow=true` ticks until the reader
/// goes away.
fn logs(
    shared: &Arc<Shared>,
    pod: &str,
    container: &str,
    params: &[(String, String)],
) -> Response<Body> {
    if pod == "broken" {
        return text(
            StatusCode::BAD_REQUEST,
            &format!(
                "container {container:?} in pod {pod:?} is waiting to start: ContainerCreating"
            ),
        );
    }
    if !params.iter().any(|(k, v)| k == "follow" && v == "true") {
        return text(
            StatusCode::OK,
            &format!("log line 1 of {container}\nlog line 2 of {container}\n"),
        );
    }
    let (tx, rx) = mpsc::channel::<Bytes>(1);
    let shared = shared.clone();
    tokio::spawn(async move {
        for tick in 0u64.. {
            if tx.send(format!("tick {tick}\n").into()).await.is_err() {
                shared.follow_ended.notify_one();
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut response = Response::new(ChannelBody(rx).boxed());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    response
}

enum Session {
    Exec(Process),
    PortForward,
}

/// Switches to the protocol the client offers (WebSocket first, as the
/// agent prefers it, SPDY otherwise) and runs the session on it.
fn stream(
    shared: &Arc<Shared>,
    request: &mut Request<Incoming>,
    session: Session,
) -> (Response<Body>, Option<String>) {
    let headers = request.headers().clone();
    let upgrade = header(&headers, "upgrade").to_ascii_lowercase();
    let echo = shared.echo;
    let on_upgrade = hyper::upgrade::on(request);
    match upgrade.as_str() {
        "websocket" => {
            let wanted: &[&str] = match session {
                Session::Exec(_) => &["v5.channel.k8s.io", "v4.channel.k8s.io"],
                Session::PortForward => &["SPDY/3.1+portforward.k8s.io"],
            };
            let offered = list(&headers, "sec-websocket-protocol");
            let Some(chosen) = wanted.iter().find(|p| offered.iter().any(|o| o == *p)) else {
                return (
                    text(StatusCode::BAD_REQUEST, "no supported subprotocol\n"),
                    None,
                );
            };
            let accept = websocket::accept_key(header(&headers, "sec-websocket-key"));
            tokio::spawn(async move {
                let Ok(upgraded) = on_upgrade.await else {
                    return;
                };
                let io = TokioIo::new(upgraded);
                let _ = match session {
                    Session::Exec(process) => websocket_exec(io, process).await,
                    Session::PortForward => tunnel(io, echo).await,
                };
            });
            let response = switching(
                "websocket",
                &[
                    ("sec-websocket-accept", accept.as_str()),
                    ("sec-websocket-protocol", chosen),
                ],
            );
            (response, Some(format!("websocket:{chosen}")))
        }
        "spdy/3.1" => {
            let wanted = match session {
                Session::Exec(_) => "v4.channel.k8s.io",
                Session::PortForward => "portforward.k8s.io",
            };
            if !list(&headers, "x-stream-protocol-version")
                .iter()
                .any(|v| v == wanted)
            {
                return (
                    text(StatusCode::FORBIDDEN, "no supported stream protocol\n"),
                    None,
                );
            }
            let mode = match session {
                Session::Exec(process) => spdy::Mode::Exec(process),
                Session::PortForward => spdy::Mode::PortForward(echo),
            };
            tokio::spawn(async move {
                if let Ok(upgraded) = on_upgrade.await {
                    let _ = spdy::serve(TokioIo::new(upgraded), mode).await;
                }
            });
            let response = switching("SPDY/3.1", &[("x-stream-protocol-version", wanted)]);
            (response, Some(format!("spdy:{wanted}")))
        }
        _ => (
            text(StatusCode::BAD_REQUEST, "Upgrade request required\n"),
            None,
        ),
    }
}

/// Exec or attach over the channel protocol: each message is one stream's
/// bytes behind a channel byte (0 stdin, 1 stdout, 3 status; v5 adds 255,
/// "this stream is closed").
async fn websocket_exec<IO>(io: IO, process: Process) -> std::io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let (reader, mut writer) = tokio::io::split(io);
    let mut reader = websocket::Reader::new(reader);
    if process.echo_stdin {
        loop {
            match reader.next().await? {
                None | Some(Message::Close) => return Ok(()),
                Some(Message::Ping(payload)) => {
                    websocket::write(&mut writer, websocket::PONG, &payload).await?;
                }
                Some(Message::Data(message)) => match message.split_first() {
                    Some((0, input)) => {
                        let mut output = vec![1];
                        output.extend_from_slice(input);
                        websocket::write(&mut writer, websocket::BINARY, &output).await?;
                    }
                    Some((255, [0])) => break,
                    _ => {}
                },
            }
        }
    }
    if !process.output.is_empty() {
        let mut output = vec![1];
        output.extend_from_slice(&process.output);
        websocket::write(&mut writer, websocket::BINARY, &output).await?;
    }
    let mut status = vec![3];
    status.extend_from_slice(process.status().as_bytes());
    websocket::write(&mut writer, websocket::BINARY, &status).await?;
    websocket::write(&mut writer, websocket::CLOSE, &websocket::NORMAL_CLOSURE).await?;
    // The client answers the close; waiting for it lets it read everything.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(message)) = reader.next().await {
            match message {
                Message::Close => break,
                Message::Ping(payload) => {
                    let _ = websocket::write(&mut writer, websocket::PONG, &payload).await;
                }
                Message::Data(_) => {}
            }
        }
    })
    .await;
    writer.shutdown().await
}

/// Port-forward's SPDY carried in binary WebSocket messages: unwraps them
/// into a byte stream for the SPDY session and wraps its output back.
async fn tunnel<IO>(io: IO, echo: SocketAddr) -> std::io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Send + 'static,
{
    let (inner, session_side) = tokio::io::duplex(64 * 1024);
    let session = tokio::spawn(spdy::serve(session_side, spdy::Mode::PortForward(echo)));
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
        let mut buffer = vec![0u8; 16 * 1024];
        while let Ok(n) = tokio::io::AsyncReadExt::read(&mut from_session, &mut buffer).await {
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
    let _ = pump.await;
    let _ = writer.await;
    Ok(())
}

impl Process {
    /// The exit status as the v4+ channel protocols report it.
    pub fn status(&self) -> String {
        if self.exit_code == 0 {
            return r#"{"metadata":{},"status":"Success"}"#.to_owned();
        }
        format!(
            r#"{{"metadata":{{}},"status":"Failure","message":"command terminated with non-zero exit code: exit status {code}","reason":"NonZeroExitCode","details":{{"causes":[{{"reason":"ExitCode","message":"{code}"}}]}}}}"#,
            code = self.exit_code
        )
    }
}

fn switching(upgrade: &str, extra: &[(&str, &str)]) -> Response<Body> {
    let mut builder = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "Upgrade")
        .header("upgrade", upgrade);
    for (name, value) in extra {
        builder = builder.header(*name, *value);
    }
    builder
        .body(Full::new(Bytes::new()).boxed())
        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "bad response\n"))
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
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

fn query_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// `application/x-www-form-urlencoded` value decoding.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(byte) => {
                        out.push(byte);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A response body fed by a channel: ends when the sender is dropped, and
/// its sender learns when the body is dropped.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}
