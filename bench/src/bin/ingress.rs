//! Ingress benchmark: the same backend (nginx returning "ok", 1 worker)
//! behind Skiff's ingress, nginx (1 worker, upstream keepalive pool) and
//! HAProxy (1 thread, `http-reuse always`), each proxy pinned to CPU 0,
//! backend and `wrk -t1 -c64 -d10s --latency` on CPU 1, the proxies
//! interleaved within each scenario. Scenarios: keep-alive and
//! `Connection: close`, over HTTP and HTTPS (ECDSA P-256). Prints req/s,
//! p50/p99, the proxy's own CPU time per request (from /proc), how busy
//! CPU 1 (backend and wrk) was, and Skiff's ratios against nginx measured
//! in the same run. With CPU 1 near 100 %, req/s says more about the
//! backend and wrk than about the proxy, and CPU per request is the
//! proxy's figure. For plain keep-alive, wrk straight to the backend (no
//! proxy) is run too: the most req/s this setup can show.
//!
//! For new TLS connections, nginx's server without session resumption
//! (`:8445`) and a Skiff ingress started with `--no-tls-resumption` are
//! compared, so every connection is a full handshake.
//!
//! `cargo build --release -p skiff && cargo run --profile bench -p skiff-bench --bin ingress [-- --rounds N --duration S --only TEXT]`

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use skiff_bench::CpuBusy;
use skiff_e2e::etcd::free_port;
use skiff_e2e::server::Server;

const BACKEND: &str = "127.0.0.1:8080";

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    KeepAlive,
    Close,
}

struct Scenario {
    name: &'static str,
    tls: bool,
    mode: Mode,
}

const SCENARIOS: [Scenario; 4] = [
    Scenario {
        name: "HTTP keep-alive",
        tls: false,
        mode: Mode::KeepAlive,
    },
    Scenario {
        name: "HTTP Connection: close",
        tls: false,
        mode: Mode::Close,
    },
    Scenario {
        name: "HTTPS keep-alive",
        tls: true,
        mode: Mode::KeepAlive,
    },
    Scenario {
        name: "HTTPS Connection: close (full handshakes)",
        tls: true,
        mode: Mode::Close,
    },
];

/// One proxy under test: its processes (for CPU time) and its URLs.
struct Proxy {
    name: &'static str,
    pids: Vec<u32>,
    http: String,
    https_keepalive: String,
    https_full: String,
}

#[derive(Default, Clone, Copy)]
struct Result {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us: f64,
    /// Share of CPU 1 (backend and wrk) busy during the run, in percent.
    cpu1_busy: f64,
}

/// Kills the processes this benchmark started, whatever happens.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            skiff_bench::stop(c);
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str, default: u64| -> u64 {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let rounds = flag("--rounds", 1);
    let duration = flag("--duration", 10);
    // `--only TEXT`: just the scenarios whose name contains TEXT.
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map_or("", String::as_str);
    let scenarios: Vec<&Scenario> = SCENARIOS.iter().filter(|s| s.name.contains(only)).collect();
    ensure!(
        !scenarios.is_empty(),
        "no scenario's name contains {only:?}"
    );
    for tool in ["nginx", "haproxy", "wrk", "taskset"] {
        ensure!(
            which(tool),
            "{tool} is not installed (apt-get install nginx-light haproxy wrk)"
        );
    }
    let bin = skiff_bench::skiff_binary()?;
    let work = tempfile::Builder::new()
        .prefix("skiff-bench-ingress-")
        .tempdir()?;
    let dir = work.path();
    prepare(dir)?;
    let mut children = Children(Vec::new());

    // The backend on CPU 1, and the two peers on CPU 0.
    children.0.push(spawn_in(
        dir,
        &[
            "taskset",
            "-c",
            "1",
            "nginx",
            "-p",
            &format!("{}/", dir.display()),
            "-c",
            "conf/nginx-backend.conf",
        ],
    )?);
    wait_http(&format!("http://{BACKEND}/"))
        .await
        .context("backend nginx")?;
    let nginx = spawn_in(
        dir,
        &[
            "taskset",
            "-c",
            "0",
            "nginx",
            "-p",
            &format!("{}/", dir.display()),
            "-c",
            "conf/nginx-proxy.conf",
        ],
    )?;
    let nginx_pid = nginx.id();
    children.0.push(nginx);
    let haproxy = spawn_in(
        dir,
        &[
            "taskset",
            "-c",
            "0",
            "haproxy",
            "-db",
            "-f",
            "conf/haproxy.cfg",
        ],
    )?;
    let haproxy_pid = haproxy.id();
    children.0.push(haproxy);

    // Skiff: the API server on CPU 1 (idle while measuring), the ingress
    // alone on CPU 0, with and without TLS resumption.
    let server = Server::start(&bin, &["--disable", "ingress"]).await?;
    configure_cluster(&server)?;
    let (p1, p2, p3, p4) = (free_port()?, free_port()?, free_port()?, free_port()?);
    let mut skiff_pids = Vec::new();
    for (http, https, extra) in [(p1, p2, None), (p3, p4, Some("--no-tls-resumption"))] {
        let mut cmd = vec![
            "taskset".to_owned(),
            "-c".into(),
            "0".into(),
            bin.display().to_string(),
            "ingress".into(),
            "--kubeconfig".into(),
            server.kubeconfig().display().to_string(),
            "--http".into(),
            format!("127.0.0.1:{http}"),
            "--https".into(),
            format!("127.0.0.1:{https}"),
            "--no-access-log".into(),
        ];
        cmd.extend(extra.map(str::to_owned));
        let refs: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let child = spawn_in(dir, &refs)?;
        skiff_pids.push(child.id());
        children.0.push(child);
    }
    if let Some(pid) = server.pid() {
        let _ = Command::new("taskset")
            .args(["-a", "-p", "-c", "1", &pid.to_string()])
            .output();
    }
    let skiff = Proxy {
        name: "skiff",
        pids: skiff_pids,
        http: format!("http://127.0.0.1:{p1}/"),
        https_keepalive: format!("https://127.0.0.1:{p2}/"),
        https_full: format!("https://127.0.0.1:{p4}/"),
    };
    let nginx = Proxy {
        name: "nginx",
        pids: vec![nginx_pid],
        http: "http://127.0.0.1:8081/".into(),
        https_keepalive: "https://127.0.0.1:8443/".into(),
        https_full: "https://127.0.0.1:8445/".into(),
    };
    let haproxy = Proxy {
        name: "haproxy",
        pids: vec![haproxy_pid],
        http: "http://127.0.0.1:8082/".into(),
        https_keepalive: "https://127.0.0.1:8444/".into(),
        https_full: "https://127.0.0.1:8444/".into(),
    };
    let proxies = [skiff, nginx, haproxy];
    for p in &proxies {
        for url in [&p.http, &p.https_keepalive, &p.https_full] {
            wait_http(url)
                .await
                .with_context(|| format!("{} at {url}", p.name))?;
        }
    }

    println!(
        "Ingress benchmark: wrk -t1 -c64 -d{duration}s --latency, proxy on CPU 0, backend nginx + wrk on CPU 1, {rounds} interleaved round(s)"
    );
    // The ceiling of plain HTTP keep-alive: wrk straight to the backend,
    // no proxy. CPU 1 then does the same work per request as behind a
    // proxy (wrk's and the backend's sends, each running the receiving
    // socket's side on loopback) minus the proxy's wakeups, so no proxy's
    // req/s can go much past it. (Not so for Connection: close, where a
    // proxy takes the new connections off the backend.)
    let direct = Proxy {
        name: "no proxy",
        pids: Vec::new(),
        http: format!("http://{BACKEND}/"),
        https_keepalive: String::new(),
        https_full: String::new(),
    };
    let mut results = vec![vec![Vec::<Result>::new(); proxies.len()]; scenarios.len()];
    let mut ceilings = vec![Vec::<Result>::new(); scenarios.len()];
    for _ in 0..rounds {
        for (s, scenario) in scenarios.iter().enumerate() {
            for (i, proxy) in proxies.iter().enumerate() {
                let r = measure(proxy, scenario, duration)?;
                results[s][i].push(r);
            }
            if !scenario.tls && scenario.mode == Mode::KeepAlive {
                ceilings[s].push(measure(&direct, scenario, duration)?);
            }
        }
    }
    for (s, scenario) in scenarios.iter().enumerate() {
        println!("{}:", scenario.name);
        let medians: Vec<Result> = results[s].iter().map(|rs| median(rs)).collect();
        for (proxy, r) in proxies.iter().zip(&medians) {
            println!(
                "  {:<8} {:>8.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  proxy CPU {:>7.1} µs/req  CPU 1 busy {:>3.0} %",
                proxy.name, r.rps, r.p50_ms, r.p99_ms, r.cpu_us, r.cpu1_busy
            );
        }
        let (sk, ng) = (medians[0], medians[1]);
        if !ceilings[s].is_empty() {
            let r = median(&ceilings[s]);
            println!(
                "  {:<8} {:>8.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  (wrk straight to the backend)  CPU 1 busy {:>3.0} %",
                direct.name, r.rps, r.p50_ms, r.p99_ms, r.cpu1_busy
            );
            println!(
                "  ceiling: no proxy/nginx req/s {:.2}x (skiff/no proxy {:.2}x)",
                r.rps / ng.rps,
                sk.rps / r.rps
            );
        }
        println!(
            "  skiff/nginx: req/s {:.2}x, p99 {:.2}x, CPU/req {:.2}x",
            sk.rps / ng.rps,
            sk.p99_ms / ng.p99_ms,
            sk.cpu_us / ng.cpu_us
        );
    }
    Ok(())
}

fn measure(proxy: &Proxy, scenario: &Scenario, duration: u64) -> anyhow::Result<Result> {
    let url = match (scenario.tls, scenario.mode) {
        (false, _) => &proxy.http,
        (true, Mode::KeepAlive) => &proxy.https_keepalive,
        (true, Mode::Close) => &proxy.https_full,
    };
    let mut cmd = Command::new("taskset");
    cmd.args([
        "-c",
        "1",
        "wrk",
        "-t1",
        "-c64",
        &format!("-d{duration}s"),
        "--latency",
    ]);
    if scenario.mode == Mode::Close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(url);
    let cpu_before = cpu_ticks(&proxy.pids)?;
    let cpu1 = CpuBusy::start(1);
    let out = cmd.output().context("running wrk")?;
    let cpu1_busy = cpu1.percent();
    let cpu_after = cpu_ticks(&proxy.pids)?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "wrk failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let requests = parse_requests(&text).context("wrk printed no request count")?;
    ensure!(
        !text.contains("Non-2xx"),
        "{} answered errors: {text}",
        proxy.name
    );
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let cpu_us = (cpu_after - cpu_before) as f64 / ticks_per_sec * 1e6 / requests.max(1) as f64;
    Ok(Result {
        rps: parse_after(&text, "Requests/sec:").context("no Requests/sec")?,
        p50_ms: parse_latency(&text, "50%").context("no p50")?,
        p99_ms: parse_latency(&text, "99%").context("no p99")?,
        cpu_us,
        cpu1_busy,
    })
}

/// user + system time of the processes and their children (nginx workers).
fn cpu_ticks(pids: &[u32]) -> anyhow::Result<u64> {
    let mut total = 0;
    let mut stack: Vec<u32> = pids.to_vec();
    while let Some(pid) = stack.pop() {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after.split_whitespace().collect();
        // Fields after the command: state is [0]; utime [11], stime [12].
        let utime: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0);
        let stime: u64 = fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
        total += utime + stime;
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for task in tasks.flatten() {
                let children =
                    std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
                stack.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
    }
    Ok(total)
}

fn median(results: &[Result]) -> Result {
    let mut sorted = results.to_vec();
    sorted.sort_by(|a, b| a.rps.total_cmp(&b.rps));
    sorted.get(sorted.len() / 2).copied().unwrap_or_default()
}

fn parse_after(text: &str, label: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.trim_start().starts_with(label))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `  1234567 requests in 10.00s, …`
fn parse_requests(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.contains(" requests in "))?;
    line.split_whitespace().next()?.parse().ok()
}

/// The latency distribution's `99%   2.31ms` line, in milliseconds.
fn parse_latency(text: &str, label: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.trim_start().starts_with(label))?;
    let value = line.split_whitespace().nth(1)?;
    let (number, unit) = value.split_at(value.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = number.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => return None,
    })
}

/// The peers' configs with the work folder filled in, and a P-256 certificate.
fn prepare(dir: &Path) -> anyhow::Result<()> {
    let peers = std::env::var_os("SKIFF_PEERS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/peers/proxy-conf")
        });
    for sub in ["conf", "run", "logs", "tmp", "certs"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    for name in ["nginx-backend.conf", "nginx-proxy.conf", "haproxy.cfg"] {
        let text = std::fs::read_to_string(peers.join(name))
            .with_context(|| format!("reading {}", peers.join(name).display()))?;
        std::fs::write(
            dir.join("conf").join(name),
            text.replace("@WORKDIR@", &dir.display().to_string()),
        )?;
    }
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = rcgen::CertificateParams::new(vec!["bench.local".to_owned()])?.self_signed(&key)?;
    std::fs::write(dir.join("certs/server.crt"), cert.pem())?;
    std::fs::write(dir.join("certs/server.key"), key.serialize_pem())?;
    std::fs::write(
        dir.join("certs/server.pem"),
        format!("{}{}", cert.pem(), key.serialize_pem()),
    )?;
    Ok(())
}

/// The backend as a selector-less Service with an EndpointSlice, and an
/// Ingress sending everything to it. Without SNI (wrk to an IP address)
/// the ingress presents its own P-256 default certificate.
fn configure_cluster(server: &Server) -> anyhow::Result<()> {
    let (ip, port) = BACKEND.split_once(':').context("backend address")?;
    server.kubectl_stdin(
        &["apply", "-f", "-"],
        &format!(
            r#"
apiVersion: v1
kind: Service
metadata: {{name: backend}}
spec:
  ports: [{{name: http, port: 80, targetPort: {port}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: backend-1
  labels: {{kubernetes.io/service-name: backend, endpointslice.kubernetes.io/managed-by: skiff-bench}}
addressType: IPv4
ports: [{{name: http, port: {port}, protocol: TCP}}]
endpoints: [{{addresses: ["{ip}"], conditions: {{ready: true}}}}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: backend}}
spec:
  ingressClassName: skiff
  defaultBackend: {{service: {{name: backend, port: {{number: 80}}}}}}
"#
        ),
    )?;
    Ok(())
}

fn spawn_in(dir: &Path, argv: &[&str]) -> anyhow::Result<Child> {
    let log = std::fs::File::create(dir.join("logs").join(format!(
            "{}.log",
            argv.iter()
                .find(|a| !a.starts_with('-') && **a != "taskset" && a.parse::<u32>().is_err())
                .map_or("proc", |a| a.rsplit('/').next().unwrap_or(a))
        )))?;
    Command::new(argv[0])
        .args(&argv[1..])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", argv.join(" ")))
}

/// Polls `url` with curl until it answers 200.
async fn wait_http(url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", url])
            .output()?;
        if out.stdout == b"200" {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{url} answered {}", String::from_utf8_lossy(&out.stdout));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn which(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}
