//! Cluster DNS benchmark: Skiff's DNS against unbound (`local-data` in a
//! static local-zone) and NSD (`rrl-ratelimit: 0`), same 1,000 names, same
//! query file (90 % hits, 10 % NXDOMAIN), measured with dnsperf.
//!
//! Skiff's names come through the API: a real `skiff server` (its own DNS
//! disabled) gets 1,000 ClusterIP Services, and `skiff dns` (one UDP
//! worker) serves them from its watch. unbound and NSD are configured from
//! `shared/peers/dns-conf` with the same names and the ClusterIPs the API
//! server allocated. Each server is pinned to CPU 0, dnsperf to CPU 1;
//! runs are interleaved; the median of several 10 s runs is reported with
//! the server's CPU time per query (from /proc, whole process tree).
//!
//! `cargo build --release --bin skiff -p skiff-bench --bin dns &&
//!  target/release/dns [ROUNDS]`

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, PostParams};
use skiff_e2e::server::Server;

const NAMES: usize = 1_000;
const QUERIES: usize = 10_000;
const RUN_SECONDS: u32 = 10;
const PORT_SKIFF: u16 = 5300;
const PORT_UNBOUND: u16 = 5301;
const PORT_NSD: u16 = 5302;

struct Peer {
    name: &'static str,
    port: u16,
    child: Child,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Copy, Debug)]
struct Run {
    qps: f64,
    cpu_us_per_query: f64,
    lost: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::args()
        .nth(1)
        .map(|r| r.parse())
        .transpose()
        .context("ROUNDS must be a number")?
        .unwrap_or(3);
    let bin = skiff_binary()?;
    let peers_conf = peers_conf_dir()?;
    let work = tempfile::Builder::new()
        .prefix("skiff-bench-dns-")
        .tempdir()?;
    for dir in ["conf", "zones", "run", "run/knot"] {
        std::fs::create_dir_all(work.path().join(dir))?;
    }

    let server = Server::start(&bin, &["--disable", "dns"]).await?;
    let names = create_services(&server).await?;
    write_peer_configs(&peers_conf, work.path(), &names)?;
    let queries = work.path().join("queries.txt");
    std::fs::write(&queries, query_file())?;

    let skiff = start_skiff_dns(&bin, &server.kubeconfig())?;
    let unbound = start_peer(
        "unbound",
        PORT_UNBOUND,
        Command::new("unbound")
            .args(["-d", "-c"])
            .arg(work.path().join("conf/unbound.conf")),
    )?;
    let nsd = start_peer(
        "nsd",
        PORT_NSD,
        Command::new("nsd")
            .args(["-d", "-c"])
            .arg(work.path().join("conf/nsd.conf")),
    )?;
    let servers = [&skiff, &unbound, &nsd];
    for peer in servers {
        wait_answering(
            peer,
            &format!("svc-{}.default.svc.cluster.local", NAMES - 1),
        )?;
    }

    println!(
        "DNS benchmark: {NAMES} A records, {QUERIES} queries (90% hits, 10% NXDOMAIN), dnsperf -l {RUN_SECONDS} -T 1 -c 4 -q 200 on CPU 1, server on CPU 0, {rounds} interleaved rounds, median"
    );
    println!(
        "skiff: names fed through the API (skiff server + `skiff dns --workers 1` watching it)"
    );
    let mut results: Vec<Vec<Run>> = vec![Vec::new(); servers.len()];
    for round in 0..rounds {
        for (i, peer) in servers.iter().enumerate() {
            let run = dnsperf(peer, &queries)?;
            println!(
                "  round {} {:8} {:>9.0} QPS {:>6.2} µs CPU/query lost {}",
                round + 1,
                peer.name,
                run.qps,
                run.cpu_us_per_query,
                run.lost
            );
            results[i].push(run);
        }
    }
    let median = |runs: &[Run], f: fn(&Run) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let qps: Vec<f64> = results.iter().map(|r| median(r, |r| r.qps)).collect();
    let cpu: Vec<f64> = results
        .iter()
        .map(|r| median(r, |r| r.cpu_us_per_query))
        .collect();
    for (i, peer) in servers.iter().enumerate() {
        println!(
            "dns {:8} QPS {:>9.0}  server CPU {:>6.2} µs/query  lost {}",
            peer.name,
            qps[i],
            cpu[i],
            results[i].iter().map(|r| r.lost).sum::<u64>()
        );
    }
    println!(
        "dns skiff/unbound QPS ratio {:.2} (goal >= 1.25); skiff/nsd QPS ratio {:.2}",
        qps[0] / qps[1],
        qps[0] / qps[2]
    );
    println!(
        "dns skiff/nsd CPU per query ratio {:.2} (goal <= 0.80); skiff/unbound CPU per query ratio {:.2}",
        cpu[0] / cpu[2],
        cpu[0] / cpu[1]
    );
    Ok(())
}

/// 1,000 ClusterIP Services through the API; returns (name, ClusterIP).
async fn create_services(server: &Server) -> anyhow::Result<Vec<(String, String)>> {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(server.kubeconfig())?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    let client = kube::Client::try_from(config)?;
    let api: Arc<Api<Service>> = Arc::new(Api::namespaced(client, "default"));
    let started = Instant::now();
    let mut out = Vec::with_capacity(NAMES);
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in (0..NAMES).collect::<Vec<_>>().chunks(NAMES / 16) {
        let api = api.clone();
        let chunk = chunk.to_vec();
        tasks.spawn(async move {
            let mut made = Vec::new();
            for i in chunk {
                let name = format!("svc-{i}");
                let svc: Service = serde_json::from_value(serde_json::json!({
                    "metadata": {"name": name},
                    "spec": {"ports": [{"name": "http", "port": 80}]}
                }))?;
                let created = api.create(&PostParams::default(), &svc).await?;
                let ip = created
                    .spec
                    .and_then(|s| s.cluster_ip)
                    .context("no ClusterIP allocated")?;
                made.push((name, ip));
            }
            anyhow::Ok(made)
        });
    }
    while let Some(made) = tasks.join_next().await {
        out.extend(made??);
    }
    out.sort_by_key(|(n, _)| n.trim_start_matches("svc-").parse::<usize>().unwrap_or(0));
    println!(
        "created {} Services through the API in {:?}",
        out.len(),
        started.elapsed()
    );
    Ok(out)
}

fn query_file() -> String {
    let mut out = String::new();
    for i in 0..QUERIES {
        if i % 10 == 9 {
            let _ = writeln!(out, "nx-{i}.default.svc.cluster.local A");
        } else {
            let _ = writeln!(out, "svc-{}.default.svc.cluster.local A", (i * 7) % NAMES);
        }
    }
    out
}

fn write_peer_configs(peers: &Path, work: &Path, names: &[(String, String)]) -> anyhow::Result<()> {
    let workdir = work.to_str().context("work dir path")?;
    for file in ["unbound.conf", "nsd.conf"] {
        let text = std::fs::read_to_string(peers.join(file))
            .with_context(|| format!("reading {}", peers.join(file).display()))?;
        std::fs::write(
            work.join("conf").join(file),
            text.replace("@WORKDIR@", workdir),
        )?;
    }
    let mut local = String::from("local-zone: \"cluster.local.\" static\n");
    local.push_str("local-data: \"cluster.local. 5 IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5\"\n");
    let mut zone = String::from(
        "$ORIGIN cluster.local.\n$TTL 5\n@ IN SOA ns.dns.cluster.local. hostmaster.cluster.local. 1 7200 1800 86400 5\n@ IN NS ns.dns.cluster.local.\nns.dns IN A 10.43.0.10\n",
    );
    for (name, ip) in names {
        let _ = writeln!(
            local,
            "local-data: \"{name}.default.svc.cluster.local. 5 IN A {ip}\""
        );
        let _ = writeln!(zone, "{name}.default.svc IN A {ip}");
    }
    std::fs::write(work.join("conf/unbound-localdata.conf"), local)?;
    std::fs::write(work.join("zones/cluster.local.zone"), zone)?;
    Ok(())
}

fn start_skiff_dns(bin: &Path, kubeconfig: &Path) -> anyhow::Result<Peer> {
    let mut command = Command::new(bin);
    command
        .arg("dns")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--listen", &format!("127.0.0.1:{PORT_SKIFF}")])
        .args(["--workers", "1", "--upstream-resolv-conf", "none"])
        .env("RUST_LOG", "warn");
    start_peer("skiff", PORT_SKIFF, &mut command)
}

fn start_peer(name: &'static str, port: u16, command: &mut Command) -> anyhow::Result<Peer> {
    let program = command.get_program().to_owned();
    let args: Vec<_> = command.get_args().map(|a| a.to_owned()).collect();
    let envs: Vec<_> = command
        .get_envs()
        .filter_map(|(k, v)| Some((k.to_owned(), v?.to_owned())))
        .collect();
    let child = Command::new("taskset")
        .args(["-c", "0"])
        .arg(program)
        .args(args)
        .envs(envs)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {name} (is it installed?)"))?;
    Ok(Peer { name, port, child })
}

fn wait_answering(peer: &Peer, name: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new("dig")
            .args([
                "@127.0.0.1",
                "-p",
                &peer.port.to_string(),
                "+short",
                "+tries=1",
                "+time=1",
                name,
                "A",
            ])
            .output()
            .context("running dig")?;
        if out.status.success() && !out.stdout.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{} does not answer {name}", peer.name);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn dnsperf(peer: &Peer, queries: &Path) -> anyhow::Result<Run> {
    let pid = peer.child.id();
    let before = tree_cpu_ticks(pid)?;
    let out = Command::new("taskset")
        .args([
            "-c",
            "1",
            "dnsperf",
            "-s",
            "127.0.0.1",
            "-p",
            &peer.port.to_string(),
        ])
        .arg("-d")
        .arg(queries)
        .args([
            "-l",
            &RUN_SECONDS.to_string(),
            "-T",
            "1",
            "-c",
            "4",
            "-q",
            "200",
        ])
        .output()
        .context("running dnsperf")?;
    let after = tree_cpu_ticks(pid)?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "dnsperf failed: {text}");
    let field = |label: &str| -> anyhow::Result<f64> {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .with_context(|| format!("no {label:?} in dnsperf output: {text}"))?;
        let value = line[line.find(':').context("no colon")? + 1..]
            .split_whitespace()
            .next()
            .context("no value")?;
        value
            .parse()
            .with_context(|| format!("bad {label} {value:?}"))
    };
    let completed = field("Queries completed")?;
    let lost = field("Queries lost")? as u64;
    let qps = field("Queries per second")?;
    let ticks_per_second = 100.0; // USER_HZ on Linux
    let cpu_us = (after - before) as f64 * 1e6 / ticks_per_second;
    Ok(Run {
        qps,
        cpu_us_per_query: cpu_us / completed.max(1.0),
        lost,
    })
}

/// utime + stime of `pid` and all its descendants, in clock ticks.
fn tree_cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let mut stats: Vec<(u32, u32, u64)> = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the command name (which may contain spaces).
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.len() < 13 {
            continue;
        }
        let ppid: u32 = fields[1].parse().unwrap_or(0);
        let ticks = fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0);
        stats.push((p, ppid, ticks));
    }
    let mut tree = vec![pid];
    let mut total = 0;
    while let Some(p) = tree.pop() {
        for (child, parent, ticks) in &stats {
            if *child == p {
                total += ticks;
            }
            if *parent == p {
                tree.push(*child);
            }
        }
    }
    Ok(total)
}

fn skiff_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .context("bench binary has no folder")?
        .join("skiff");
    ensure!(
        bin.exists(),
        "{} is missing: run `cargo build --release` first",
        bin.display()
    );
    Ok(bin)
}

/// `shared/peers/dns-conf`, next to the checkout or at /work/shared.
fn peers_conf_dir() -> anyhow::Result<PathBuf> {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let candidates = [
        here.join("../../shared/peers/dns-conf"),
        here.join("../shared/peers/dns-conf"),
        PathBuf::from("/work/shared/peers/dns-conf"),
    ];
    candidates
        .into_iter()
        .find(|p| p.join("nsd.conf").exists())
        .context("cannot find shared/peers/dns-conf")
}
