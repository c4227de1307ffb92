//! Liveness, readiness and startup probes (httpGet, tcpSocket, exec) with
//! upstream's timing: initial delay, period, timeout, and success/failure
//! thresholds. Each probe of a running container is a task that reports
//! every change of its verdict to the pod worker.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    if let Some(rx) = wait_started.as_mut() {
        let _ = rx.wait_for(|s| *s).await;
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
        if http.scheme.as_deref() == Some("HTTPS") {
            return Err("HTTPS probes are not supported by the skiff agent".into());
        }
        return http_get(SocketAddr::new(host, port), &path, &headers).await;
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
    if probe.grpc.is_some() {
        return Err("gRPC probes are not supported by the skiff agent".into());
    }
    Err("the probe has no handler".into())
}

async fn http_get(
    addr: SocketAddr,
    path: &str,
    headers: &[(String, String)],
) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("Get \"http://{addr}{path}\": dial tcp {addr}: {e}"))?;
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
