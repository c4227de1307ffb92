//! Service benchmark: HTTP through a ClusterIP against the same requests
//! straight to the pod IP, through the data planes' Service backend
//! (`--service-backend socket`, connect-time translation for the client
//! pod's processes, what `auto`, the data plane's default, picks where a
//! BPF program can be attached to the pods' cgroup; or `nftables` or
//! `engine`). Unless the backend is `engine`, also "ClusterIP engine", a
//! second Service on the same pod with ClientIP affinity, which the engine
//! always keeps, so two backends are measured in one run. And against the
//! two named peers doing the same job, in one run: a kernel nftables DNAT
//! rule (kube-proxy nftables mode's verdict-map shape, on the client's
//! node) and HAProxy in TCP mode (a userspace L4 proxy on the client's
//! node). A last row measures the pod IP again from another client pod:
//! two identical paths, so its ratio and p99 difference show how far the
//! run's noise alone moves the figures.
//!
//! Two nodes (network namespaces from the test harness) run `skiff server`
//! (node 1) and `skiff dataplane` with Services on (both). nginx (one
//! worker, a fixed 2-byte body) runs in a server pod on node 2 (cross-node)
//! and in one on node 1 (same-node); wrk runs in a client pod on node 1.
//! Every path is measured with keep-alive (requests/s, p99) and with a new
//! connection per request (connections/s), interleaved over `--runs`
//! rounds; the median is reported with the ratio to the pod IP and the
//! p99 difference, each the median over rounds of the round's own pair.
//!
//! Then the endpoint change latency at 100 and 10,000 Services (see
//! `endpoint_change`).
//!
//! `cargo build --release -p skiff && cargo build --profile bench -p
//!  skiff-bench --bin service && target/release/service [--seconds 5] [--runs 5] [--connections 16] [--endpoint-services 100,10000]
//!  [--no-http] [--service-backend socket|nftables|engine]`

mod api;
mod endpoint_change;

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use skiff_e2e::cluster::Cluster;
use skiff_e2e::netns::Netns;

const SERVICE_CIDR: &str = "10.43.0.0/16";
/// The address the nftables peer translates (outside every other range).
const NFT_VIP: &str = "10.45.0.1";
const HAPROXY_PORT: u16 = 8083;
/// Paths measured per scope, at most: pod IP, ClusterIP (two backends),
/// nftables DNAT, HAProxy, pod IP again.
const MAX_PATHS: usize = 6;

struct Args {
    seconds: u32,
    runs: usize,
    connections: u32,
    /// Service counts for the endpoint change latency (ascending).
    endpoint_services: Vec<u32>,
    http: bool,
    /// The data planes' `--service-backend`.
    backend: String,
}

/// One measured wrk run.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    rps: f64,
    p99_us: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let bin = skiff_bench::skiff_binary()?;
    let cluster = Cluster::start_with(
        &bin,
        2,
        &["--disable", "agent"],
        &[
            "--service-cidr",
            SERVICE_CIDR,
            "--cluster-cidr",
            "10.42.0.0/16",
            "--service-backend",
            &args.backend,
        ],
    )
    .await?;
    let mut cluster = cluster;
    let api = api::ApiThread::start(&cluster.node(0).netns, cluster.server().kubeconfig()).await?;
    api.keep_nodes_alive(cluster.nodes.iter().map(|n| n.name.clone()).collect());
    cluster.add_pod(0, "client")?;
    // Paths after the first get their own client pods, see `client_for`.
    for path in 1..MAX_PATHS {
        cluster.add_pod(0, &format!("client-{path}"))?;
    }
    cluster.add_pod(1, "remote")?;
    cluster.add_pod(0, "local")?;
    let work = tempfile::tempdir()?;
    let _nginx = [
        Nginx::start(&cluster.pod("remote").netns, &work.path().join("remote"))?,
        Nginx::start(&cluster.pod("local").netns, &work.path().join("local"))?,
    ];
    cluster.server().kubectl_stdin(
        &["apply", "-f", "-"],
        r#"
apiVersion: v1
kind: Service
metadata: {name: remote}
spec: {selector: {app: remote}, ports: [{port: 80, targetPort: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: local}
spec: {selector: {app: local}, ports: [{port: 80, targetPort: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: remote-engine}
spec: {selector: {app: remote}, sessionAffinity: ClientIP, ports: [{port: 80, targetPort: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: local-engine}
spec: {selector: {app: local}, sessionAffinity: ClientIP, ports: [{port: 80, targetPort: 80}]}
"#,
    )?;
    for (name, node) in [("remote", 2), ("local", 1)] {
        let manifest = format!(
            r#"{{"apiVersion": "v1", "kind": "Pod",
                "metadata": {{"name": "{name}", "labels": {{"app": "{name}"}}}},
                "spec": {{"nodeName": "node-{node}", "containers": [{{"name": "nginx", "image": "nginx"}}]}}}}"#
        );
        cluster
            .server()
            .kubectl_stdin(&["create", "-f", "-"], &manifest)?;
        cluster.set_pod_status(name, cluster.pod(name).ip, true)?;
    }
    println!(
        "service benchmark: 2 nodes (netns), client pod on node 1, nginx (1 worker) in a pod on \
         node 2 (cross-node) and on node 1 (same-node); Service backend {}; wrk -t1 -c{} {} s per \
         run, median of {} interleaved runs (ratios and p99 differences: median of each round's \
         pair with the pod IP); conntrack TIME_WAIT 1 s in the nodes' namespaces; \
         load average at start {}",
        args.backend,
        args.connections,
        args.seconds,
        args.runs,
        load_average()
    );
    if args.http {
        http(&cluster, &args, &work)?;
    }
    if !args.endpoint_services.is_empty() {
        endpoint_change::run(&cluster, &api, &args.endpoint_services).await?;
    }
    println!("load average at the end {}", load_average());
    Ok(())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// HTTP through each path, same-node and cross-node.
fn http(cluster: &Cluster, args: &Args, work: &tempfile::TempDir) -> anyhow::Result<()> {
    let node1 = &cluster.node(0).netns;
    let gateway = cluster
        .node(0)
        .pod_cidr
        .hosts()
        .next()
        .context("no gateway")?;
    let mut scopes = [("same-node", "local"), ("cross-node", "remote")];
    if std::env::var_os("SERVICE_BENCH_CROSS_FIRST").is_some() {
        scopes.reverse();
    }
    for (scope, pod) in scopes {
        let pod_ip = cluster.pod(pod).ip;
        let vip = cluster.cluster_ip(pod)?;
        let _nft = NftDnat::load(node1, pod_ip)?;
        short_time_wait(cluster)?;
        let _haproxy = Haproxy::start(node1, gateway, pod_ip, &work.path().join(pod))?;
        let mut targets = vec![
            ("pod IP".to_owned(), format!("{pod_ip}:80")),
            (format!("ClusterIP {}", args.backend), format!("{vip}:80")),
        ];
        if args.backend != "engine" {
            let engine_vip = cluster.cluster_ip(&format!("{pod}-engine"))?;
            targets.push(("ClusterIP engine".to_owned(), format!("{engine_vip}:80")));
        }
        targets.extend([
            ("nftables DNAT".to_owned(), format!("{NFT_VIP}:80")),
            (
                "HAProxy TCP".to_owned(),
                format!("{gateway}:{HAPROXY_PORT}"),
            ),
            // The same path as the first from another client pod: how far
            // two identical paths differ in this run (the noise floor).
            ("pod IP again".to_owned(), format!("{pod_ip}:80")),
        ]);
        ensure!(targets.len() <= MAX_PATHS, "more paths than client pods");
        for (i, (name, target)) in targets.iter().enumerate() {
            if let Err(e) = wait_for_http(client_for(cluster, i), target) {
                let metrics = cluster.metrics(0).unwrap_or_default();
                for line in metrics.lines().filter(|l| l.starts_with("skiff_")) {
                    eprintln!("  node 1 {line}");
                }
                return Err(e.context(format!("{scope} {name}")));
            }
        }
        for close in [false, true] {
            let mut samples = vec![Vec::new(); targets.len()];
            for _ in 0..args.runs {
                for (i, (_, target)) in targets.iter().enumerate() {
                    match wrk(client_for(cluster, i), target, args, close) {
                        Ok(sample) => samples[i].push(sample),
                        Err(e) => {
                            report_state(cluster);
                            return Err(e);
                        }
                    }
                }
            }
            let what = if close {
                "new connections/s"
            } else {
                "keep-alive req/s"
            };
            let mut line = format!("service HTTP {scope} {what}:");
            for ((name, _), runs) in targets.iter().zip(&samples) {
                let m = median(runs);
                // Paired with the pod IP's run of the same round, so a
                // drift of the host's speed between rounds cancels out.
                let paired = |f: fn(&Sample, &Sample) -> f64| {
                    let mut v: Vec<f64> =
                        runs.iter().zip(&samples[0]).map(|(s, b)| f(s, b)).collect();
                    v.sort_by(f64::total_cmp);
                    v[v.len() / 2]
                };
                line.push_str(&format!(
                    " | {name} {:.0}/s p99 {:.0} µs ({:.2}x, p99 {:+.0} µs)",
                    m.rps,
                    m.p99_us,
                    paired(|s, b| s.rps / b.rps.max(1.0)),
                    paired(|s, b| s.p99_us - b.p99_us)
                ));
            }
            println!("{line}");
        }
    }
    let metrics = cluster.metrics(0)?;
    for line in metrics.lines().filter(|l| {
        l.starts_with("skiff_service_flows_created_total")
            || l.starts_with("skiff_service_new_flows_total")
            || (l.starts_with("skiff_service_dropped_packets_total") && !l.ends_with(" 0"))
    }) {
        println!("  node 1 {line}");
    }
    Ok(())
}

/// The client pod measuring path `i` (the order of `targets`). Each path
/// has its own client address because the server pod keeps TIME_WAIT for
/// a minute after each closed connection: the new-connection runs cycle
/// through the client's ports within seconds, and a SYN that meets a
/// TIME_WAIT left by another path (same client address and port, same
/// pod) is refused when its TCP timestamp is older, as it is when the
/// client's timestamp offset was derived for a different destination
/// address (the Service IP instead of the pod IP). The client then waits
/// a second to retry. With one address per path, a path only meets its
/// own TIME_WAITs, which its timestamps always pass.
fn client_for(cluster: &Cluster, i: usize) -> &Netns {
    match i {
        0 => &cluster.pod("client").netns,
        i => &cluster.pod(&format!("client-{i}")).netns,
    }
}

/// Once a NAT table is loaded in a node's namespace, every connection
/// routed through it is tracked, and a closed one stays in conntrack for
/// TIME_WAIT's 120 s. The new-connection runs open thousands per second
/// on every path (the pod IP too), which would fill the kernel's table
/// (`nf_conntrack_max`, shared by all namespaces) within half a minute and
/// make the later paths wait for free entries. One second keeps the table
/// small for every path alike; TCP's own TIME_WAIT, in the pods, is kept.
fn short_time_wait(cluster: &Cluster) -> anyhow::Result<()> {
    const KEY: &str = "net.netfilter.nf_conntrack_tcp_timeout_time_wait";
    for node in &cluster.nodes {
        node.netns
            .run("sysctl", &["-q", "-w", &format!("{KEY}=1")])
            .with_context(|| format!("setting {KEY} on {}", node.name))?;
    }
    Ok(())
}

/// What the API says about the nodes and endpoints, after a failed run.
fn report_state(cluster: &Cluster) {
    for what in ["nodes", "pods", "endpointslices"] {
        let out = cluster.server().kubectl_ok(&[
            "get",
            what,
            "-o",
            "custom-columns=NAME:.metadata.name,READY:.status.conditions[?(@.type==\"Ready\")].status,ENDPOINTS:.endpoints[*].conditions.ready",
        ]);
        eprintln!("  {what}:\n{}", out.unwrap_or_else(|e| format!("{e:#}")));
    }
}

/// nginx with the peers' backend configuration, listening on port 80 in
/// the pod's namespace.
struct Nginx(Child);

impl Nginx {
    fn start(netns: &Netns, dir: &Path) -> anyhow::Result<Self> {
        for sub in ["logs", "tmp", "run"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            "worker_processes 1;\ndaemon off;\npid run/nginx.pid;\nerror_log logs/error.log warn;\n\
             events { worker_connections 16384; }\n\
             http {\n  access_log off;\n  keepalive_requests 10000000;\n  keepalive_timeout 75s;\n\
               client_body_temp_path tmp/b; proxy_temp_path tmp/p; fastcgi_temp_path tmp/f;\n\
               uwsgi_temp_path tmp/u; scgi_temp_path tmp/s;\n\
               server { listen 0.0.0.0:80 backlog=4096; location / { default_type text/plain; return 200 \"ok\"; } }\n}\n",
        )?;
        let child = netns
            .command("nginx")
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx")?;
        Ok(Nginx(child))
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        skiff_bench::stop(&mut self.0);
    }
}

/// HAProxy in TCP mode on node 1 (the pods' gateway address), one thread.
struct Haproxy(Child);

impl Haproxy {
    fn start(netns: &Netns, bind: Ipv4Addr, backend: Ipv4Addr, dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let conf = dir.join("haproxy.cfg");
        std::fs::write(
            &conf,
            format!(
                "global\n  nbthread 1\n  maxconn 9000\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
                 timeout client 30s\n  timeout server 30s\nfrontend fe_tcp\n  bind {bind}:{HAPROXY_PORT} backlog 4096\n  \
                 default_backend be_tcp\nbackend be_tcp\n  server s1 {backend}:80\n"
            ),
        )?;
        let child = netns
            .command("haproxy")
            .args(["-db", "-f"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting haproxy")?;
        Ok(Haproxy(child))
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        skiff_bench::stop(&mut self.0);
    }
}

/// A kube-proxy-nftables-style DNAT of `NFT_VIP:80` to the pod on node 1,
/// in prerouting (the client pod's packets arrive from the bridge).
struct NftDnat<'a>(&'a Netns);

impl<'a> NftDnat<'a> {
    fn load(netns: &'a Netns, pod: Ipv4Addr) -> anyhow::Result<Self> {
        let rules = format!(
            "table ip skiff_bench {{\n  map service-ips {{\n    type ipv4_addr . inet_proto . inet_service : verdict\n    \
             elements = {{ {NFT_VIP} . tcp . 80 : goto svc }}\n  }}\n  chain svc {{\n    meta l4proto tcp dnat to {pod}:80\n  }}\n  \
             chain prerouting {{\n    type nat hook prerouting priority -100; policy accept;\n    \
             ip daddr . meta l4proto . th dport vmap @service-ips\n  }}\n}}\n"
        );
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("dnat.nft");
        std::fs::write(&file, rules)?;
        netns.run("nft", &["-f", &file.to_string_lossy()])?;
        // The client pod reaches the address through its default route.
        Ok(NftDnat(netns))
    }
}

impl Drop for NftDnat<'_> {
    fn drop(&mut self) {
        let _ = self.0.run("nft", &["delete", "table", "ip", "skiff_bench"]);
    }
}

fn wrk(netns: &Netns, target: &str, args: &Args, close: bool) -> anyhow::Result<Sample> {
    let url = format!("http://{target}/");
    let seconds = format!("{}s", args.seconds);
    let connections = args.connections.to_string();
    let mut wrk_args = vec!["-t1", "-c", &connections, "-d", &seconds, "--latency", &url];
    if close {
        wrk_args.extend(["-H", "Connection: close"]);
    }
    let out = netns.run("wrk", &wrk_args)?;
    let rps = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec from wrk:\n{out}"))?;
    let p99 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .and_then(|v| duration_us(v.trim()))
        .with_context(|| format!("no 99% latency from wrk:\n{out}"))?;
    if out.contains("Non-2xx") || out.contains("Socket errors") {
        eprintln!("  wrk {target} reported errors:\n{out}");
    }
    Ok(Sample { rps, p99_us: p99 })
}

/// wrk's `123.45us` / `1.23ms` / `1.00s`, in microseconds.
fn duration_us(v: &str) -> Option<f64> {
    let (number, scale) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1_000.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1_000_000.0)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * scale)
}

fn median(samples: &[Sample]) -> Sample {
    let mut rps: Vec<f64> = samples.iter().map(|s| s.rps).collect();
    let mut p99: Vec<f64> = samples.iter().map(|s| s.p99_us).collect();
    rps.sort_by(f64::total_cmp);
    p99.sort_by(f64::total_cmp);
    Sample {
        rps: rps.get(rps.len() / 2).copied().unwrap_or_default(),
        p99_us: p99.get(p99.len() / 2).copied().unwrap_or_default(),
    }
}

fn wait_for_http(netns: &Netns, target: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let url = format!("http://{target}/");
    loop {
        match netns.run("curl", &["-sf", "-m", "2", &url]) {
            Ok(body) if body == "ok" => return Ok(()),
            other if Instant::now() > deadline => bail!("{url} does not answer: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        seconds: 5,
        runs: 5,
        connections: 16,
        endpoint_services: vec![100, 10_000],
        http: true,
        backend: "socket".to_owned(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--seconds" => args.seconds = it.next().context("--seconds N")?.parse()?,
            "--runs" => args.runs = it.next().context("--runs N")?.parse()?,
            "--connections" => args.connections = it.next().context("--connections N")?.parse()?,
            "--endpoint-services" => {
                let list = it.next().context("--endpoint-services N,M (or \"\")")?;
                args.endpoint_services = list
                    .split(',')
                    .filter(|n| !n.is_empty())
                    .map(str::parse)
                    .collect::<Result<_, _>>()
                    .context("--endpoint-services takes counts like 100,10000")?;
                args.endpoint_services.sort_unstable();
            }
            "--no-http" => args.http = false,
            "--service-backend" => {
                args.backend = it
                    .next()
                    .context("--service-backend socket|nftables|engine")?;
            }
            other => bail!("unknown argument {other}"),
        }
    }
    ensure!(args.seconds > 0 && args.runs > 0 && args.connections > 0);
    Ok(args)
}
