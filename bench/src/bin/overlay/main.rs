//! Overlay benchmark: Skiff's TUN overlay against the kernel's VXLAN, in
//! one run, over the same underlay and MTU, with a bare TUN forwarder
//! beside them: the least work a TUN overlay does per packet.
//!
//! Two nodes (network namespaces on a veth/bridge underlay, from the test
//! harness) run `skiff server` (node 1) and `skiff dataplane` (both). Each
//! node also gets a kernel VXLAN device (`vxlan id 42 … dstport 4789`, MTU
//! 1450 as the overlay's) and a bare forwarder (`bare`), each with its own
//! pod bridge and pod. Then, interleaved so that machine noise hits all
//! alike: iperf3 pod to pod, 1 stream and 4 streams, 10 s, three times each
//! (the median is reported); ping and a TCP request/response loop for
//! latency; and the data planes' CPU time from `/proc/PID/stat` per Gbit
//! carried. Last, Skiff's ping again with its data planes restarted with
//! busy polling (`--busy-poll-us`, off by default).
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

mod bare;

/// The data planes' `--busy-poll-us` for the last ping: longer than the
/// pings' 10 ms interval.
const BUSY_POLL_US: u64 = 20_000;

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

/// A path's two pods, client first.
fn endpoints<'a>(netns: [&'a Netns; 2], ip: [Ipv4Addr; 2]) -> (Endpoint<'a>, Endpoint<'a>) {
    (
        Endpoint {
            netns: netns[0],
            ip: ip[0],
        },
        Endpoint {
            netns: netns[1],
            ip: ip[1],
        },
    )
}

#[derive(Clone, Copy, PartialEq)]
enum Path {
    Skiff,
    Vxlan,
    /// The least work a TUN overlay does (see `bare`).
    Bare,
}

impl Path {
    const ALL: [Path; 3] = [Path::Skiff, Path::Vxlan, Path::Bare];

    fn name(self) -> &'static str {
        match self {
            Path::Skiff => "skiff overlay",
            Path::Vxlan => "kernel VXLAN",
            Path::Bare => "bare TUN forwarder",
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
    let bare = bare::Bare::start(&cluster)?;
    let (a, b) = (cluster.pod("a"), cluster.pod("b"));
    // In `Path` order.
    let paths = [
        endpoints([&a.netns, &b.netns], [a.ip, b.ip]),
        endpoints(
            [&vxlan_pods[0], &vxlan_pods[1]],
            [vxlan_pod_ip(1), vxlan_pod_ip(2)],
        ),
        endpoints(
            [&bare.pods[0], &bare.pods[1]],
            [bare::pod_ip(1), bare::pod_ip(2)],
        ),
    ];
    let pids: Vec<u32> = (0..2).filter_map(|i| cluster.dataplane_pid(i)).collect();
    ensure!(pids.len() == 2, "data planes are not running");
    println!(
        "overlay benchmark: 2 nodes (netns) on a veth+bridge underlay, pod MTU {POD_MTU}; \
         iperf3 {} s per run, median of {} interleaved runs; data plane args {:?}",
        args.seconds, args.runs, args.dataplane_args
    );
    for (path, (a, b)) in Path::ALL.into_iter().zip(&paths) {
        ping(a, b.ip, 3).with_context(|| format!("{} does not connect the pods", path.name()))?;
    }
    let servers = paths
        .iter()
        .map(|(_, b)| IperfServer::start(b.netns))
        .collect::<anyhow::Result<Vec<_>>>()?;
    std::thread::sleep(Duration::from_millis(300));

    // gbits[streams index][path] = Gbit/s samples; cpu likewise in data
    // plane CPU seconds per Gbit.
    let streams = [1usize, 4];
    let mut gbits = vec![[Vec::new(), Vec::new(), Vec::new()]; streams.len()];
    let mut cpu_per_gbit = vec![Vec::new(); streams.len()];
    for run in 0..args.runs {
        for (s, &n) in streams.iter().enumerate() {
            for (p, (path, (a, b))) in Path::ALL.into_iter().zip(&paths).enumerate() {
                let cpu_before = cpu_seconds(&pids)?;
                let rate = iperf(a, b.ip, n, args.seconds)?;
                let cpu = cpu_seconds(&pids)? - cpu_before;
                if path == Path::Skiff {
                    cpu_per_gbit[s].push(cpu / (rate * f64::from(args.seconds)));
                }
                println!(
                    "  run {} {:>2} stream(s) {:<20} {rate:6.2} Gbit/s{}",
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

    let mut ping_p50 = [0.0; 3];
    let mut rr = [(Duration::ZERO, Duration::ZERO); 2];
    let mut busy_ping_p50 = 0.0;
    for _ in 0..2 {
        for (p, (a, b)) in paths.iter().enumerate() {
            ping_p50[p] = ping_median(a, b.ip)?;
            if let Some(rr) = rr.get_mut(p) {
                *rr = request_response(a, b, 5_000)?;
            }
        }
        let (a, b) = &paths[Path::Bare as usize];
        bare.busy_poll(true);
        busy_ping_p50 = ping_median(a, b.ip)?;
        bare.busy_poll(false);
    }
    drop(bare);

    println!();
    let (skiff, vxlan, bare) = (
        Path::Skiff as usize,
        Path::Vxlan as usize,
        Path::Bare as usize,
    );
    for (s, &n) in streams.iter().enumerate() {
        let rates = gbits[s].each_mut().map(|samples| median(samples));
        println!(
            "overlay iperf3 {n} stream{}: skiff {:.2} Gbit/s, kernel VXLAN {:.2} Gbit/s, ratio {:.2}x (goal {}); \
             bare TUN forwarder {:.2} Gbit/s ({:.2}x VXLAN)",
            if n == 1 { "" } else { "s" },
            rates[skiff],
            rates[vxlan],
            rates[skiff] / rates[vxlan],
            if n == 1 { ">= 1.0x" } else { ">= 0.8x" },
            rates[bare],
            rates[bare] / rates[vxlan],
        );
    }
    for (s, &n) in streams.iter().enumerate() {
        println!(
            "overlay data plane CPU, {n} stream{}: {:.3} CPU-seconds per Gbit carried (both nodes)",
            if n == 1 { "" } else { "s" },
            median(&mut cpu_per_gbit[s]),
        );
    }
    let over_vxlan = |p: usize| (ping_p50[p] - ping_p50[vxlan]) * 1000.0;
    println!(
        "overlay ping RTT p50: skiff {:.3} ms, kernel VXLAN {:.3} ms, difference {:+.0} µs (goal <= +50 µs); \
         bare TUN forwarder {:.3} ms ({:+.0} µs), busy-polling {:.3} ms ({:+.0} µs)",
        ping_p50[skiff],
        ping_p50[vxlan],
        over_vxlan(skiff),
        ping_p50[bare],
        over_vxlan(bare),
        busy_ping_p50,
        (busy_ping_p50 - ping_p50[vxlan]) * 1000.0,
    );
    println!(
        "overlay TCP request/response (1 byte) p50/p99: skiff {:.0}/{:.0} µs, kernel VXLAN {:.0}/{:.0} µs",
        micros(rr[skiff].0),
        micros(rr[skiff].1),
        micros(rr[vxlan].0),
        micros(rr[vxlan].1)
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

    // Busy polling is off by default (an idle node with sparse traffic
    // would keep a CPU busy); the same pings with it on.
    let vxlan_rtt = ping_p50[vxlan];
    cluster
        .dataplane_args
        .extend(["--busy-poll-us".to_owned(), BUSY_POLL_US.to_string()]);
    cluster.restart_dataplanes().await?;
    let (a, b) = (cluster.pod("a"), cluster.pod("b"));
    let (a, b) = endpoints([&a.netns, &b.netns], [a.ip, b.ip]);
    ping(&a, b.ip, 3).context("skiff overlay with busy polling does not connect the pods")?;
    let rtt = ping_median(&a, b.ip)?;
    println!(
        "overlay ping RTT p50 with --busy-poll-us {BUSY_POLL_US}: skiff {rtt:.3} ms, difference {:+.0} µs over kernel VXLAN's above",
        (rtt - vxlan_rtt) * 1000.0
    );
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
        netns.ip(&[
            "route",
            "add",
            &format!("10.201.{}.0/24", j + 1),
            "via",
            &format!("192.168.77.{}", j + 1),
            "dev",
            "vx0",
        ])?;
        pods.push(add_bridged_pod(
            cluster,
            netns,
            &format!("vx{n}"),
            "vbr0",
            vxlan_pod_ip(n),
            "65536",
        )?);
    }
    Ok(pods)
}

/// A pod namespace `<prefix>-<name>` at `ip` (a /24 whose `.1` is the
/// node's side), bridged on the node `netns` through `bridge`, building
/// super-packets of at most `gso_max_size` bytes.
fn add_bridged_pod(
    cluster: &Cluster,
    netns: &Netns,
    name: &str,
    bridge: &str,
    ip: Ipv4Addr,
    gso_max_size: &str,
) -> anyhow::Result<Netns> {
    let [a, b, c, _] = ip.octets();
    let gateway = Ipv4Addr::new(a, b, c, 1).to_string();
    let mtu = POD_MTU.to_string();
    netns.ip(&["link", "add", bridge, "type", "bridge"])?;
    netns.ip(&["addr", "add", &format!("{gateway}/24"), "dev", bridge])?;
    netns.ip(&["link", "set", bridge, "mtu", &mtu, "up"])?;
    let pod = Netns::create(&format!("{}-{name}", cluster.prefix))?;
    let port = format!("{name}p");
    netns.add_veth(&port, &pod, "eth0")?;
    netns.ip(&["link", "set", &port, "master", bridge, "mtu", &mtu, "up"])?;
    pod.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
    pod.ip(&[
        "link",
        "set",
        "eth0",
        "mtu",
        &mtu,
        "gso_max_size",
        gso_max_size,
        "up",
    ])?;
    pod.ip(&["route", "add", "default", "via", &gateway])?;
    Ok(pod)
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
