//! Liveness, readiness and startup probes (httpGet over HTTP or HTTPS,
//! tcpSocket, exec, grpc) with upstream's timing: initial delay, period,
//! timeout, and success/failure thresholds. Each probe of a running
//! container is a task that reports every change of its verdict to the
//! pod worker.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

use crate::runtime::Runtime;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Startup,
    Liveness,
    Readiness,
}

/// A probe's verdict changed.
#[derive(Debug)]
pub struct Report {
    pub container: String,
    /// The container instance the probe ran against.
    pub instance: String,
    pub kind: Kind,
    pub success: bool,
    pub message: String,
}

/// Where probes reach the container.
#[derive(Clone)]
pub struct Target {
    pub container: Container,
    pub instance: String,
    pub ip: IpAddr,
    pub runtime: Arc<dyn Runtime>,
}

/// Starts the container's probe tasks; they stop when the returned handle
/// is dropped.
pub fn start(target: Target, reports: mpsc::Sender<Report>) -> Probes {
    let mut tasks = Vec::new();
    let c = &target.container;
    let (started_tx, started_rx) = watch::channel(c.startup_probe.is_none());
    if let Some(probe) = c.startup_probe.clone() {
        tasks.push(tokio::spawn(run(
            Kind::Startup,
            probe,
            target.clone(),
            reports.clone(),
            None,
            Some(started_tx),
        )));
    }
    for (kind, probe) in [
        (Kind::Liveness, c.liveness_probe.clone()),
        (Kind::Readiness, c.readiness_probe.clone()),
    ] {
        if let Some(probe) = probe {
            tasks.push(tokio::spawn(run(
                kind,
                probe,
                target.clone(),
                reports.clone(),
                Some(started_rx.clone()),
                None,
            )));
        }
    }
    Probes { tasks }
}

/// The running probe tasks of one container instance.
pub struct Probes {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Probes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Probes({})", self.tasks.len())
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn run(
    kind: Kind,
    probe: Probe,
    target: Target,
    reports: mpsc::Sender<Report>,
    mut wait_started: Option<watch::Receiver<bool>>,
    started: Option<watch::Sender<bool>>,
) {
    // Liveness and readiness wait for the startup probe; if it fails
    // instead (its sender is gone), the container is restarted and these
    // never run for this instance.
    if let Some(rx) = wait_started.as_mut()
        && rx.wait_for(|s| *s).await.is_err()
    {
        return;
    }
    let secs =
        |v: Option<i32>, default: i32| Duration::from_secs(v.unwrap_or(default).max(0) as u64);
    tokio::time::sleep(secs(probe.initial_delay_seconds, 0)).await;
    let period = secs(probe.period_seconds, 10).max(Duration::from_secs(1));
    let timeout = secs(probe.timeout_seconds, 1).max(Duration::from_secs(1));
    let success_threshold = probe.success_threshold.unwrap_or(1).max(1) as u32;
    let failure_threshold = probe.failure_threshold.unwrap_or(3).max(1) as u32;
    let mut verdict: Option<bool> = None;
    let (mut successes, mut failures) = (0u32, 0u32);
    let mut tick = tokio::time::interval(period);
    // A probe slower than its period runs again a period after it ended,
    // not in a burst.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = match tokio::time::timeout(timeout, check(&probe, &target, timeout)).await {
            Ok(r) => r,
            Err(_) => Err(format!("probe timed out after {}s", timeout.as_secs())),
        };
        let message = match &result {
            Ok(()) => {
                successes += 1;
                failures = 0;
                String::new()
            }
            Err(m) => {
                failures += 1;
                successes = 0;
                m.clone()
            }
        };
        let new = if successes >= success_threshold {
            Some(true)
        } else if failures >= failure_threshold {
            Some(false)
        } else {
            verdict
        };
        if new != verdict
            || (new == Some(false) && kind == Kind::Liveness && failures >= failure_threshold)
        {
            verdict = new;
            if let Some(success) = new {
                let report = Report {
                    container: target.container.name.clone(),
                    instance: target.instance.clone(),
                    kind,
                    success,
                    message,
                };
                if reports.send(report).await.is_err() {
                    return;
                }
                if kind == Kind::Startup && success {
                    if let Some(tx) = &started {
                        let _ = tx.send(true);
                    }
                    return;
                }
                if kind != Kind::Readiness && !success {
                    // The worker restarts the container; this task ends with it.
                    return;
                }
            }
        }
    }
}

/// Runs the probe's handler once.
pub async fn check(probe: &Probe, target: &Target, timeout: Duration) -> Result<(), String> {
    if let Some(http) = &probe.http_get {
        let port = port(&http.port, &target.container)?;
        let host: IpAddr = match http.host.as_deref() {
            Some(h) if !h.is_empty() => {
                h.parse().map_err(|_| format!("invalid probe host {h:?}"))?
            }
            _ => target.ip,
        };
        let path = http.path.clone().unwrap_or_else(|| "/".into());
        let headers: Vec<(String, String)> = http
            .http_headers
            .iter()
            .flatten()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect();
        let https = http.scheme.as_deref() == Some("HTTPS");
        return http_get(SocketAddr::new(host, port), https, &path, &headers).await;
    }
    if let Some(tcp) = &probe.tcp_socket {
        let port = port(&tcp.port, &target.container)?;
        let host: IpAddr = match tcp.host.as_deref() {
            Some(h) if !h.is_empty() => {
                h.parse().map_err(|_| format!("invalid probe host {h:?}"))?
            }
            _ => target.ip,
        };
        return TcpStream::connect((host, port))
            .await
            .map(drop)
            .map_err(|e| format!("dial tcp {host}:{port}: {e}"));
    }
    if let Some(exec) = &probe.exec {
        let argv = exec.command.clone().unwrap_or_default();
        let output = target
            .runtime
            .exec(&target.instance, &argv, timeout)
            .await
            .map_err(|e| e.to_string())?;
        return if output.code == 0 {
            Ok(())
        } else {
            Err(format!(
                "command {argv:?} exited with {}: {}",
                output.code,
                output.output.trim()
            ))
        };
    }
    if let Some(grpc) = &probe.grpc {
        let port = u16::try_from(grpc.port).map_err(|_| format!("invalid port {}", grpc.port))?;
        let service = grpc.service.as_deref().unwrap_or("");
        return super::probe_grpc::check(SocketAddr::new(target.ip, port), service).await;
    }
    Err("the probe has no handler".into())
}

async fn http_get(
    addr: SocketAddr,
    https: bool,
    path: &str,
    headers: &[(String, String)],
) -> Result<(), String> {
    let scheme = if https { "https" } else { "http" };
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("Get \"{scheme}://{addr}{path}\": dial tcp {addr}: {e}"))?;
    if https {
        let tls = super::probe_tls::connect(tcp, addr).await?;
        exchange(tls, addr, path, headers).await
    } else {
        exchange(tcp, addr, path, headers).await
    }
}

/// Sends the GET and judges the status line: 2xx and 3xx pass.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    addr: SocketAddr,
    path: &str,
    headers: &[(String, String)],
) -> Result<(), String> {
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.33\r\nAccept: */*\r\nConnection: close\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut head = vec![0u8; 1024];
    let mut len = 0;
    while len < head.len() {
        let n = stream
            .read(&mut head[len..])
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 || head[..len + n].contains(&b'\n') {
            len += n;
            break;
        }
        len += n;
    }
    let line = String::from_utf8_lossy(&head[..len]);
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("invalid HTTP answer from {addr}"))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("HTTP probe failed with statuscode: {code}"))
    }
}

fn port(port: &IntOrString, container: &Container) -> Result<u16, String> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).map_err(|_| format!("invalid port {p}")),
        IntOrString::String(name) => {
            if let Ok(p) = name.parse::<u16>() {
                return Ok(p);
            }
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .ok_or_else(|| format!("port {name:?} not found"))
        }
    }
}

#[cfg(test)]
mod tests {
    //! Probe timing with a fake runtime whose exec answers are scripted,
    //! on tokio's paused clock, so seconds of probing take no time.

    use std::collections::HashMap;
    use std::path::Path;
    use std::sync::Mutex;

    use async_trait::async_trait;
    use k8s_openapi::api::core::v1::ExecAction;
    use tokio::time::Instant;

    use super::*;
    use crate::runtime::{ExecOutput, RuntimeConfig};
    use crate::shim::{ExitStatus, ShimError, ShimSpec};

    /// What `exec` of a command answers: success or not, after how long.
    #[derive(Clone, Copy)]
    struct Answer {
        ok: bool,
        takes: Duration,
    }

    struct FakeRuntime {
        config: RuntimeConfig,
        answers: Mutex<HashMap<String, Answer>>,
        /// (command, when) of every exec.
        calls: Mutex<Vec<(String, Instant)>>,
    }

    impl FakeRuntime {
        fn new() -> Arc<FakeRuntime> {
            Arc::new(FakeRuntime {
                config: RuntimeConfig {
                    name: "fake".into(),
                    binary: "/nonexistent".into(),
                    root: "/nonexistent".into(),
                },
                answers: Mutex::new(HashMap::new()),
                calls: Mutex::new(Vec::new()),
            })
        }

        fn answer(&self, command: &str, ok: bool, takes: Duration) {
            if let Ok(mut a) = self.answers.lock() {
                a.insert(command.into(), Answer { ok, takes });
            }
        }

        fn calls(&self, command: &str) -> Vec<Instant> {
            self.calls
                .lock()
                .map(|c| {
                    c.iter()
                        .filter(|(n, _)| n == command)
                        .map(|(_, t)| *t)
                        .collect()
                })
                .unwrap_or_default()
        }
    }

    #[async_trait]
    impl Runtime for FakeRuntime {
        fn config(&self) -> &RuntimeConfig {
            &self.config
        }
        async fn start(&self, _: &ShimSpec) -> Result<u32, ShimError> {
            Err(ShimError::Runtime("fake".into()))
        }
        fn exit_status(&self, _: &Path) -> Option<ExitStatus> {
            None
        }
        fn running(&self, _: &Path) -> bool {
            true
        }
        async fn wait(&self, _: &Path) -> Result<ExitStatus, ShimError> {
            futures::future::pending().await
        }
        async fn kill(&self, _: &ShimSpec, _: i32) -> Result<(), ShimError> {
            Ok(())
        }
        async fn delete(&self, _: &ShimSpec) -> Result<(), ShimError> {
            Ok(())
        }
        async fn exec(
            &self,
            _: &str,
            argv: &[String],
            _: Duration,
        ) -> Result<ExecOutput, ShimError> {
            let name = argv.first().cloned().unwrap_or_default();
            if let Ok(mut c) = self.calls.lock() {
                c.push((name.clone(), Instant::now()));
            }
            let answer = self
                .answers
                .lock()
                .ok()
                .and_then(|a| a.get(&name).copied())
                .unwrap_or(Answer {
                    ok: false,
                    takes: Duration::ZERO,
                });
            tokio::time::sleep(answer.takes).await;
            Ok(ExecOutput {
                code: if answer.ok { 0 } else { 1 },
                output: String::new(),
            })
        }
        async fn list(&self) -> Vec<String> {
            Vec::new()
        }
    }

    fn exec_probe(command: &str) -> Probe {
        Probe {
            exec: Some(ExecAction {
                command: Some(vec![command.into()]),
            }),
            ..Probe::default()
        }
    }

    /// Starts the probes of a container with the given ones.
    fn start_probes(
        runtime: &Arc<FakeRuntime>,
        startup: Option<Probe>,
        liveness: Option<Probe>,
        readiness: Option<Probe>,
    ) -> (Probes, mpsc::Receiver<Report>) {
        let container = Container {
            name: "main".into(),
            startup_probe: startup,
            liveness_probe: liveness,
            readiness_probe: readiness,
            ..Container::default()
        };
        let (tx, rx) = mpsc::channel(16);
        let target = Target {
            container,
            instance: "pod-main-0".into(),
            ip: IpAddr::from([127, 0, 0, 1]),
            runtime: runtime.clone(),
        };
        (start(target, tx), rx)
    }

    /// The next report, with when it came (since `t0`).
    async fn next(rx: &mut mpsc::Receiver<Report>, t0: Instant) -> (Kind, bool, Duration, String) {
        match rx.recv().await {
            Some(r) => (r.kind, r.success, t0.elapsed(), r.message),
            None => panic!("the probes stopped reporting"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn initial_delay_period_and_success_threshold() {
        let rt = FakeRuntime::new();
        rt.answer("ready", true, Duration::ZERO);
        let t0 = Instant::now();
        let probe = Probe {
            initial_delay_seconds: Some(5),
            period_seconds: Some(2),
            success_threshold: Some(3),
            ..exec_probe("ready")
        };
        let (_probes, mut rx) = start_probes(&rt, None, None, Some(probe));
        let (kind, ok, at, _) = next(&mut rx, t0).await;
        assert_eq!((kind, ok), (Kind::Readiness, true));
        // Runs at 5, 7 and 9 s: the third success makes it ready.
        assert_eq!(at, Duration::from_secs(9));
        let calls: Vec<Duration> = rt.calls("ready").iter().map(|t| *t - t0).collect();
        assert_eq!(calls, [5, 7, 9].map(Duration::from_secs));
    }

    #[tokio::test(start_paused = true)]
    async fn readiness_flips_both_ways_after_failure_threshold() {
        let rt = FakeRuntime::new();
        rt.answer("ready", true, Duration::ZERO);
        let t0 = Instant::now();
        let probe = Probe {
            period_seconds: Some(1),
            failure_threshold: Some(3),
            ..exec_probe("ready")
        };
        let (_probes, mut rx) = start_probes(&rt, None, None, Some(probe));
        assert!(next(&mut rx, t0).await.1);
        tokio::time::sleep(Duration::from_millis(10_500)).await;
        rt.answer("ready", false, Duration::ZERO);
        let (kind, ok, at, message) = next(&mut rx, t0).await;
        assert_eq!((kind, ok), (Kind::Readiness, false));
        // Failing from the run at 11 s: unready on the third, at 13 s.
        assert_eq!(at, Duration::from_secs(13));
        assert!(message.contains("exited with 1"), "{message}");
        rt.answer("ready", true, Duration::ZERO);
        let (_, ok, at, _) = next(&mut rx, t0).await;
        assert!(ok);
        assert_eq!(at, Duration::from_secs(14));
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_fails_a_slow_probe() {
        let rt = FakeRuntime::new();
        rt.answer("slow", true, Duration::from_secs(3));
        let t0 = Instant::now();
        let probe = |timeout| Probe {
            period_seconds: Some(10),
            timeout_seconds: Some(timeout),
            failure_threshold: Some(1),
            ..exec_probe("slow")
        };
        let (_short, mut rx) = start_probes(&rt, None, None, Some(probe(1)));
        let (_, ok, at, message) = next(&mut rx, t0).await;
        assert!(!ok, "a 3 s command fails a 1 s timeout");
        assert_eq!(at, Duration::from_secs(1));
        assert!(message.contains("timed out"), "{message}");
        let (_long, mut rx) = start_probes(&rt, None, None, Some(probe(5)));
        let (_, ok, _, _) = next(&mut rx, t0).await;
        assert!(ok, "and passes a 5 s one");
    }

    #[tokio::test(start_paused = true)]
    async fn liveness_failure_is_reported_once_and_ends_probing() {
        let rt = FakeRuntime::new();
        rt.answer("alive", false, Duration::ZERO);
        let t0 = Instant::now();
        let probe = Probe {
            period_seconds: Some(1),
            failure_threshold: Some(2),
            ..exec_probe("alive")
        };
        let (_probes, mut rx) = start_probes(&rt, None, Some(probe), None);
        let (kind, ok, at, _) = next(&mut rx, t0).await;
        assert_eq!((kind, ok), (Kind::Liveness, false));
        assert_eq!(at, Duration::from_secs(1));
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(rt.calls("alive").len(), 2, "no probing after the verdict");
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn startup_probe_gates_liveness_and_readiness() {
        let rt = FakeRuntime::new();
        rt.answer("alive", false, Duration::ZERO);
        rt.answer("ready", true, Duration::ZERO);
        let t0 = Instant::now();
        let every_second = |c| Probe {
            period_seconds: Some(1),
            failure_threshold: Some(1),
            ..exec_probe(c)
        };
        let startup = Probe {
            failure_threshold: Some(100),
            ..every_second("started")
        };
        let (_probes, mut rx) = start_probes(
            &rt,
            Some(startup),
            Some(every_second("alive")),
            Some(every_second("ready")),
        );
        tokio::time::sleep(Duration::from_millis(5_500)).await;
        assert!(rt.calls("alive").is_empty() && rt.calls("ready").is_empty());
        assert!(rx.try_recv().is_err(), "nothing reported before startup");
        rt.answer("started", true, Duration::ZERO);
        rt.answer("alive", true, Duration::ZERO);
        let (kind, ok, at, _) = next(&mut rx, t0).await;
        assert_eq!(
            (kind, ok, at),
            (Kind::Startup, true, Duration::from_secs(6))
        );
        let mut rest = [next(&mut rx, t0).await, next(&mut rx, t0).await];
        rest.sort_by_key(|r| r.0 == Kind::Readiness);
        assert_eq!((rest[0].0, rest[0].1), (Kind::Liveness, true));
        assert_eq!((rest[1].0, rest[1].1), (Kind::Readiness, true));
        assert!(
            rt.calls("alive")
                .iter()
                .all(|t| *t - t0 >= Duration::from_secs(6))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failed_startup_probe_never_starts_the_others() {
        let rt = FakeRuntime::new();
        let t0 = Instant::now();
        let startup = Probe {
            period_seconds: Some(1),
            failure_threshold: Some(3),
            ..exec_probe("started")
        };
        let (_probes, mut rx) = start_probes(&rt, Some(startup), Some(exec_probe("alive")), None);
        let (kind, ok, at, _) = next(&mut rx, t0).await;
        assert_eq!(
            (kind, ok, at),
            (Kind::Startup, false, Duration::from_secs(2))
        );
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert!(rt.calls("alive").is_empty());
    }

    #[tokio::test]
    async fn http_and_tcp_checks_against_a_real_listener() {
        let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(e) => panic!("binding: {e}"),
        };
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]).into_owned();
                let answer = if request.starts_with("GET /ok ") {
                    "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
                };
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        let rt = FakeRuntime::new();
        let target = Target {
            container: Container {
                name: "main".into(),
                ports: Some(vec![k8s_openapi::api::core::v1::ContainerPort {
                    name: Some("web".into()),
                    container_port: i32::from(port),
                    ..Default::default()
                }]),
                ..Container::default()
            },
            instance: "x".into(),
            ip: IpAddr::from([127, 0, 0, 1]),
            runtime: rt,
        };
        let http = |path: &str, port: IntOrString| Probe {
            http_get: Some(k8s_openapi::api::core::v1::HTTPGetAction {
                path: Some(path.into()),
                port,
                ..Default::default()
            }),
            ..Probe::default()
        };
        let second = Duration::from_secs(1);
        let by_name = IntOrString::String("web".into());
        assert_eq!(
            check(&http("/ok", by_name.clone()), &target, second).await,
            Ok(())
        );
        let missing = check(&http("/gone", by_name), &target, second).await;
        assert!(missing.is_err_and(|m| m.contains("404")));
        let tcp = |port: u16| Probe {
            tcp_socket: Some(k8s_openapi::api::core::v1::TCPSocketAction {
                port: IntOrString::Int(i32::from(port)),
                host: None,
            }),
            ..Probe::default()
        };
        assert_eq!(check(&tcp(port), &target, second).await, Ok(()));
        // A port nobody listens on: bind one and let it go.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(1);
        assert!(check(&tcp(closed), &target, second).await.is_err());
    }

    #[tokio::test]
    async fn https_probe_accepts_any_certificate() {
        let Ok(key) = rcgen::KeyPair::generate() else {
            panic!("generating a key")
        };
        let Ok(cert) =
            rcgen::CertificateParams::new(vec!["pod".into()]).and_then(|p| p.self_signed(&key))
        else {
            panic!("signing a certificate")
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| {
                b.with_no_client_auth().with_single_cert(
                    vec![cert.der().clone()],
                    rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
                )
            });
        let Ok(config) = config else {
            panic!("TLS server config")
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let Ok(listener) = tokio::net::TcpListener::bind("127.0.0.1:0").await else {
            panic!("binding")
        };
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let ok = String::from_utf8_lossy(&buf[..n]).starts_with("GET /healthz ");
                let answer = if ok {
                    "200 OK"
                } else {
                    "500 Internal Server Error"
                };
                let _ = s
                    .write_all(format!("HTTP/1.1 {answer}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
                let _ = s.shutdown().await;
            }
        });
        let target = Target {
            container: Container::default(),
            instance: "x".into(),
            ip: IpAddr::from([127, 0, 0, 1]),
            runtime: FakeRuntime::new(),
        };
        let probe = |path: &str, scheme: &str| Probe {
            http_get: Some(k8s_openapi::api::core::v1::HTTPGetAction {
                path: Some(path.into()),
                port: IntOrString::Int(i32::from(port)),
                scheme: Some(scheme.into()),
                ..Default::default()
            }),
            ..Probe::default()
        };
        let second = Duration::from_secs(2);
        assert_eq!(
            check(&probe("/healthz", "HTTPS"), &target, second).await,
            Ok(())
        );
        let failing = check(&probe("/other", "HTTPS"), &target, second).await;
        assert!(failing.is_err_and(|m| m.contains("500")));
        // Plain HTTP to a TLS port is a failure, not a hang.
        assert!(
            check(&probe("/healthz", "HTTP"), &target, second)
                .await
                .is_err()
        );
    }
}
