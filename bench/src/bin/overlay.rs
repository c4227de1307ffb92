//! Overlay benchmark: Skiff's TUN overlay against the kernel's VXLAN, in
//! one run, over the same underlay and MTU.
//!
//! Two nodes (network namespaces on a veth/bridge underlay, from the test
//! harness) run `skiff server` (node 1) and `skiff dataplane` (both). Each
//! node also gets a kernel VXLAN device (`vxlan id 42 … dstport 4789`, MTU
//! 1450 as the overlay's) with its own pod bridge and pod. Then, interleaved
//! so that machine noise hits both alike: iperf3 pod to pod, 1 stream and 4
//! streams, 10 s, three times each (the median is reported); ping and a TCP
//! request/response loop for latency; and the data planes' CPU time from
//! `/proc/PID/stat` per Gbit carried.
//!
//! `cargo build --release -p skiff && cargo build --profile bench -p
//!  skiff-bench --bin overlay && target/bench/overlay [--seconds 10] [--runs 3] [-- extra skiff dataplane flags]`

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use skiff_e2e::cluster::{Cluster, POD_MTU};
use skiff_e2e::netns::Netns;

struct Args {
    seconds: u32,
    runs: usize,
    dataplane_args: Vec<String>,
}

/// One pod of a path: its namespace and address.
struct Endpoint<'a> {
    netns: &'a Netns,
    ip: Ipv4Addr,
}

#[derive(Clone, Copy, PartialEq)]
enum Path {
    Skiff,
    Vxlan,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Skiff => "skiff overlay",
            Path::Vxlan => "kernel VXLAN",
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let bin = skiff_bench::skiff_binary()?;
    let mut cluster = Cluster::start(&bin, 2).await?;
    if !args.dataplane_args.is_empty() {
        cluster.dataplane_args = args.dataplane_args.clone();
        cluster.restart_dataplanes().await?;
    }
    cluster.add_pod(0, "a")?;
    cluster.add_pod(1, "b")?;
    let vxlan_pods = setup_vxlan(&cluster)?;
    let skiff = (
        Endpoint {
            netns: &cluster.pod("a").netns,
            ip: cluster.pod("a").ip,
        },
        Endpoint {
            netns: &cluster.pod("b").netns,
            ip: cluster.pod("b").ip,
        },
    );
    let vxlan = (
        Endpoint {
            netns: &vxlan_pods[0],
            ip: vxlan_pod_ip(1),
        },
        Endpoint {
            netns: &vxlan_pods[1],
            ip: vxlan_pod_ip(2),
        },
    );
    let pids: Vec<u32> = (0..2).filter_map(|i| cluster.dataplane_pid(i)).collect();
    ensure!(pids.len() == 2, "data planes are not running");
    println!(
        "overlay benchmark: 2 nodes (netns) on a veth+bridge underlay, pod MTU {POD_MTU}; \
         iperf3 {} s per run, median of {} interleaved runs; data plane args {:?}",
        args.seconds, args.runs, args.dataplane_args
    );
    for (path, (a, b)) in [(Path::Skiff, &skiff), (Path::Vxlan, &vxlan)] {
        ping(a, b.ip, 3).with_context(|| format!("{} does not connect the pods", path.name()))?;
    }
    let servers = [
        IperfServer::start(skiff.1.netns)?,
        IperfServer::start(vxlan.1.netns)?,
    ];
    std::thread::sleep(Duration::from_millis(300));

    // throughput[streams index][path] = Gbit/s samples; cpu likewise in
    // data plane CPU seconds per Gbit.
    let streams = [1usize, 4];
    let mut gbits = vec![[Vec::new(), Vec::new()]; streams.len()];
    let mut cpu_per_gbit = vec![Vec::new(); streams.len()];
    for run in 0..args.runs {
        for (s, &n) in streams.iter().enumerate() {
            for (p, (path, (a, b))) in [(Path::Skiff, &skiff), (Path::Vxlan, &vxlan)]
                .into_iter()
                .enumerate()
            {
                let cpu_before = cpu_seconds(&pids)?;
                let rate = iperf(a, b.ip, n, args.seconds)?;
                let cpu = cpu_seconds(&pids)? - cpu_before;
                if path == Path::Skiff {
                    cpu_per_gbit[s].push(cpu / (rate * f64::from(args.seconds)));
                }
                println!(
                    "  run {} {:>2} stream(s) {:<13} {rate:6.2} Gbit/s{}",
                    run + 1,
                    n,
                    path.name(),
                    if path == Path::Skiff {
                        format!("  (data planes {cpu:.1} CPU-s)")
                    } else {
                        String::new()
                    }
                );
                gbits[s][p].push(rate);
            }
        }
    }
    drop(servers);

    let mut ping_p50 = [0.0; 2];
    let mut rr = [(Duration::ZERO, Duration::ZERO); 2];
    for _ in 0..2 {
        for (p, (a, b)) in [&skiff, &vxlan].into_iter().enumerate() {
            ping_p50[p] = ping_median(a, b.ip)?;
            rr[p] = request_response(a, b, 5_000)?;
        }
    }

    println!();
    for (s, &n) in streams.iter().enumerate() {
        let skiff_rate = median(&mut gbits[s][0]);
        let vxlan_rate = median(&mut gbits[s][1]);
        println!(
            "overlay iperf3 {n} stream{}: skiff {skiff_rate:.2} Gbit/s, kernel VXLAN {vxlan_rate:.2} Gbit/s, ratio {:.2}x (goal {})",
            if n == 1 { "" } else { "s" },
            skiff_rate / vxlan_rate,
            if n == 1 { ">= 1.0x" } else { ">= 0.8x" },
        );
    }
    for (s, &n) in streams.iter().enumerate() {
        println!(
            "overlay data plane CPU, {n} stream{}: {:.3} CPU-seconds per Gbit carried (both nodes)",
            if n == 1 { "" } else { "s" },
            median(&mut cpu_per_gbit[s]),
        );
    }
    println!(
        "overlay ping RTT p50: skiff {:.3} ms, kernel VXLAN {:.3} ms, difference {:+.0} µs (goal <= +50 µs)",
        ping_p50[0],
        ping_p50[1],
        (ping_p50[0] - ping_p50[1]) * 1000.0
    );
    println!(
        "overlay TCP request/response (1 byte) p50/p99: skiff {:.0}/{:.0} µs, kernel VXLAN {:.0}/{:.0} µs",
        micros(rr[0].0),
        micros(rr[0].1),
        micros(rr[1].0),
        micros(rr[1].1)
    );
    let metrics = cluster.metrics(0)?;
    let drops: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("skiff_dataplane_dropped_packets_total") && !l.ends_with(" 0"))
        .collect();
    println!("node 1 data plane drops: {drops:?}");
    for node in 0..2 {
        println!(
            "node {} data plane I/O: {}",
            node + 1,
            io_summary(&cluster.metrics(node)?)
        );
    }
    Ok(())
}

/// Bytes per system call (and super-packets or datagrams per call) of each
/// packet-path op, from a data plane's `/metrics`: whether the offloads
/// work shows here.
fn io_summary(metrics: &str) -> String {
    let value = |name: &str, op: &str| -> f64 {
        let key = format!("{name}{{op=\"{op}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&key)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    ["tun_read", "tun_write", "udp_send", "udp_recv"]
        .iter()
        .map(|op| {
            let calls = value("skiff_dataplane_io_calls_total", op);
            let per = |x: f64| if calls > 0.0 { x / calls } else { 0.0 };
            format!(
                "{op} {calls:.0} calls {:.0} B/call {:.2} {}/call",
                per(value("skiff_dataplane_io_bytes_total", op)),
                per(value("skiff_dataplane_io_units_total", op)),
                if op.starts_with("tun") {
                    "gso"
                } else {
                    "dgrams"
                },
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// A kernel VXLAN between the two nodes, with a pod bridge and one pod on
/// each node in 10.201.N.0/24 (beside the Skiff pods' ranges).
fn setup_vxlan(cluster: &Cluster) -> anyhow::Result<Vec<Netns>> {
    let mut pods = Vec::new();
    for (i, j) in [(0usize, 1usize), (1, 0)] {
        let node = cluster.node(i);
        let peer = cluster.node(j);
        let n = i + 1;
        let netns = &node.netns;
        netns.ip(&[
            "link",
            "add",
            "vx0",
            "type",
            "vxlan",
            "id",
            "42",
            "local",
            &node.underlay_ip.to_string(),
            "remote",
            &peer.underlay_ip.to_string(),
            "dstport",
            "4789",
            "dev",
            "eth0",
        ])?;
        netns.ip(&["link", "set", "vx0", "mtu", &POD_MTU.to_string(), "up"])?;
        netns.ip(&["addr", "add", &format!("192.168.77.{n}/24"), "dev", "vx0"])?;
        netns.ip(&["link", "add", "vbr0", "type", "bridge"])?;
        netns.ip(&["addr", "add", &format!("10.201.{n}.1/24"), "dev", "vbr0"])?;
        netns.ip(&["link", "set", "vbr0", "mtu", &POD_MTU.to_string(), "up"])?;
        netns.ip(&[
            "route",
            "add",
            &format!("10.201.{}.0/24", j + 1),
            "via",
            &format!("192.168.77.{}", j + 1),
            "dev",
            "vx0",
        ])?;
        let pod = Netns::create(&format!("{}-vx{n}", cluster.prefix))?;
        netns.add_veth("vxp", &pod, "eth0")?;
        let mtu = POD_MTU.to_string();
        netns.ip(&["link", "set", "vxp", "master", "vbr0", "mtu", &mtu, "up"])?;
        pod.ip(&[
            "addr",
            "add",
            &format!("{}/24", vxlan_pod_ip(n)),
            "dev",
            "eth0",
        ])?;
        pod.ip(&["link", "set", "eth0", "mtu", &mtu, "up"])?;
        pod.ip(&["route", "add", "default", "via", &format!("10.201.{n}.1")])?;
        pods.push(pod);
    }
    Ok(pods)
}

fn vxlan_pod_ip(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 201, node as u8, 2)
}

struct IperfServer(Child);

impl IperfServer {
    fn start(netns: &Netns) -> anyhow::Result<Self> {
        let child = netns
            .command("iperf3")
            .arg("-s")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 (apt-get install iperf3)")?;
        Ok(IperfServer(child))
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Received Gbit/s of one iperf3 run.
fn iperf(from: &Endpoint, to: Ipv4Addr, streams: usize, seconds: u32) -> anyhow::Result<f64> {
    let out = from.netns.run(
        "iperf3",
        &[
            "-c",
            &to.to_string(),
            "-t",
            &seconds.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ],
    )?;
    let json: serde_json::Value = serde_json::from_str(&out).context("iperf3 JSON")?;
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no throughput in iperf3 output: {out}"))?;
    Ok(bps / 1e9)
}

fn ping(from: &Endpoint, to: Ipv4Addr, tries: usize) -> anyhow::Result<()> {
    for _ in 0..tries {
        if from
            .netns
            .run("ping", &["-c", "1", "-W", "2", &to.to_string()])
            .is_ok()
        {
            return Ok(());
        }
    }
    bail!("no ping reply from {to}")
}

/// Median RTT (ms) of 200 pings 10 ms apart.
fn ping_median(from: &Endpoint, to: Ipv4Addr) -> anyhow::Result<f64> {
    let out = from
        .netns
        .run("ping", &["-c", "200", "-i", "0.01", &to.to_string()])?;
    let mut rtts: Vec<f64> = out
        .lines()
        .filter_map(|l| {
            l.split("time=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    ensure!(!rtts.is_empty(), "no ping replies: {out}");
    Ok(median(&mut rtts))
}

/// p50 and p99 of `rounds` 1-byte TCP request/response round trips.
fn request_response(
    from: &Endpoint,
    to: &Endpoint,
    rounds: usize,
) -> anyhow::Result<(Duration, Duration)> {
    let ip = to.ip;
    let listener = to.netns.enter(|| TcpListener::bind((ip, 0)))??;
    let addr: SocketAddr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut stream, _) = listener.accept()?;
        stream.set_nodelay(true)?;
        let mut byte = [0u8; 1];
        while stream.read(&mut byte)? == 1 {
            stream.write_all(&byte)?;
        }
        Ok(())
    });
    let mut samples = from.netns.enter(|| -> anyhow::Result<Vec<Duration>> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        let mut byte = [7u8; 1];
        let mut samples = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let started = Instant::now();
            stream.write_all(&byte)?;
            stream.read_exact(&mut byte)?;
            samples.push(started.elapsed());
        }
        Ok(samples)
    })??;
    let _ = echo.join();
    samples.sort_unstable();
    let at = |p: f64| samples[((samples.len() as f64 * p) as usize).min(samples.len() - 1)];
    Ok((at(0.5), at(0.99)))
}

/// User + system CPU seconds of the processes.
fn cpu_seconds(pids: &[u32]) -> anyhow::Result<f64> {
    pids.iter().map(|&pid| skiff_bench::cpu_seconds(pid)).sum()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        seconds: 10,
        runs: 3,
        dataplane_args: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--seconds" => args.seconds = it.next().context("--seconds N")?.parse()?,
            "--runs" => args.runs = it.next().context("--runs N")?.parse()?,
            "--" => args.dataplane_args = it.by_ref().collect(),
            other => bail!("unknown argument {other}"),
        }
    }
    ensure!(args.seconds > 0 && args.runs > 0);
    Ok(args)
}
