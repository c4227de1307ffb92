//! A fake node agent: the kubelet API's streaming endpoints over HTTPS,
//! with canned "containers". It records every request it gets, so tests
//! can check what the API server asked for, and speaks each protocol
//! kubectl may end up on: plain HTTP for logs, WebSocket
//! (`v5.channel.k8s.io`/`v4.channel.k8s.io`) and SPDY/3.1 for exec and
//! attach, SPDY (plain or tunnelled in a WebSocket) for port-forward —
//! with the agent's own protocol code (`agent::streaming`), behind canned
//! processes instead of containers.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agent::streaming::portforward::Dialer;
use agent::streaming::session::{Io, Outcome, Process, StreamFlags};
use agent::streaming::{self, Body, ChannelBody, StreamError};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

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

/// What an exec or attach "runs": output it prints, whether it first
/// copies stdin to stdout, and its exit code.
#[derive(Clone)]
pub struct Canned {
    pub output: Vec<u8>,
    pub echo_stdin: bool,
    pub exit_code: i32,
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
    Ok(streaming::tls_config(
        cert.pem().as_bytes(),
        key.serialize_pem().as_bytes(),
        &client_ca,
    )?)
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
    streaming::text(StatusCode::OK, &body)
}

fn handle(shared: &Arc<Shared>, mut request: Request<Incoming>) -> Response<Body> {
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let params = streaming::query_pairs(Some(&query));
    let response = route(shared, &mut request, &path, &params)
        .unwrap_or_else(|e| streaming::text(StatusCode::BAD_REQUEST, &e.to_string()));
    let mut line = format!("{} {path}", request.method());
    if !query.is_empty() {
        line.push('?');
        line.push_str(&query);
    }
    if let Some(protocol) = streaming::switched_protocol(&response) {
        line.push(' ');
        line.push_str(&protocol);
    }
    if let Ok(mut seen) = shared.seen.lock() {
        seen.push(line);
    }
    response
}

fn route(
    shared: &Arc<Shared>,
    request: &mut Request<Incoming>,
    path: &str,
    params: &[(String, String)],
) -> Result<Response<Body>, StreamError> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let flag = |name: &str| params.iter().any(|(k, v)| k == name && v == "1");
    let flags = StreamFlags {
        stdin: flag("input"),
        stdout: flag("output"),
        stderr: flag("error"),
        tty: flag("tty"),
    };
    let canned = |output: Vec<u8>, echo_stdin: bool, exit_code: i32| Canned {
        output,
        echo_stdin,
        exit_code,
    };
    match segments.as_slice() {
        ["metrics", "resource"] => Ok(resource_metrics(shared)),
        ["containerLogs", _, pod, container] => Ok(logs(shared, pod, container, params)),
        ["exec", _, _, _] => {
            let command: Vec<&str> = params
                .iter()
                .filter(|(k, _)| k == "command")
                .map(|(_, v)| v.as_str())
                .collect();
            let process = match command.as_slice() {
                ["echo", words @ ..] => canned(format!("{}\n", words.join(" ")).into(), false, 0),
                ["cat"] => canned(Vec::new(), true, 0),
                ["false"] => canned(Vec::new(), false, 1),
                _ => canned(b"no such command\n".to_vec(), false, 127),
            };
            streaming::upgrade_session(request, flags, process.run())
        }
        ["attach", _, _, container] => {
            let output = format!("attached to {container}\n").into_bytes();
            let process = canned(output, flags.stdin, 0);
            streaming::upgrade_session(request, flags, process.run())
        }
        ["portForward", _, pod] => {
            let echo = shared.echo;
            let dial: Dialer = Arc::new(move |_port| Box::pin(TcpStream::connect(echo)));
            streaming::upgrade_port_forward(request, (*pod).to_owned(), dial)
        }
        _ => Ok(streaming::text(
            StatusCode::NOT_FOUND,
            "404 page not found\n",
        )),
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
        return streaming::text(
            StatusCode::BAD_REQUEST,
            &format!(
                "container {container:?} in pod {pod:?} is waiting to start: ContainerCreating"
            ),
        );
    }
    if !params.iter().any(|(k, v)| k == "follow" && v == "true") {
        return streaming::text(
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

impl Canned {
    /// The session process: echo stdin first if asked, then print the
    /// output and exit.
    fn run(self) -> Process {
        Box::new(move |mut io: Io| {
            Box::pin(async move {
                if self.echo_stdin
                    && let Some(mut stdin) = io.stdin.take()
                {
                    while let Some(data) = stdin.recv().await {
                        if let Some(stdout) = &io.stdout {
                            let _ = stdout.send(data).await;
                        }
                    }
                }
                if let Some(stdout) = &io.stdout
                    && !self.output.is_empty()
                {
                    let _ = stdout.send(Bytes::from(self.output)).await;
                }
                Outcome::Exited(self.exit_code)
            })
        })
    }
}
