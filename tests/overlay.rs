//! The pod network overlay across three nodes, each a network namespace
//! running its own `skiff dataplane`: pods on different nodes reach each
//! other over TCP, UDP and ICMP both ways; membership changes (a pod moved,
//! a node gone, a node back with a new address, a data plane restarted)
//! are followed; malformed and spoofed datagrams are dropped, counted and
//! never reach a pod; tearing the cluster down leaves nothing behind.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use skiff_e2e::cluster::{Cluster, Pod};
use skiff_e2e::netns;

const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_on_different_nodes_reach_each_other() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(SKIFF.as_ref(), 3).await?;
    let prefix = cluster.prefix.clone();
    cluster.add_pod(0, "a")?;
    cluster.add_pod(1, "b")?;
    cluster.add_pod(2, "c")?;
    for (from, to) in [
        ("a", "b"),
        ("b", "a"),
        ("a", "c"),
        ("c", "a"),
        ("b", "c"),
        ("c", "b"),
    ] {
        let (from, to) = (cluster.pod(from), cluster.pod(to));
        ping(from, to.ip).with_context(|| format!("ping {} -> {}", from.name, to.name))?;
        tcp_round_trip(from, to).with_context(|| format!("TCP {} -> {}", from.name, to.name))?;
        udp_round_trip(from, to).with_context(|| format!("UDP {} -> {}", from.name, to.name))?;
    }

    // The pod is recreated on node 3 with an address of that node's range.
    let old_ip = cluster.pod("b").ip;
    cluster.remove_pod("b");
    cluster.add_pod(2, "b")?;
    let (a, b) = (cluster.pod("a"), cluster.pod("b"));
    ensure!(b.ip != old_ip && cluster.node(2).pod_cidr.contains(&b.ip));
    ping(a, b.ip)?;
    tcp_round_trip(a, b)?;
    tcp_round_trip(b, a)?;
    ensure!(
        a.netns
            .run("ping", &["-c", "1", "-W", "1", &old_ip.to_string()])
            .is_err(),
        "the pod's old address still answers"
    );

    let metrics = cluster.metrics(0)?;
    ensure!(counter(&metrics, "skiff_dataplane_packets_total{direction=\"out\"}") > 0.0);
    ensure!(counter(&metrics, "skiff_dataplane_packets_total{direction=\"in\"}") > 0.0);

    drop(cluster);
    let left: Vec<String> = netns::list()?
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    ensure!(left.is_empty(), "namespaces left behind: {left:?}");
    let links = std::process::Command::new("ip")
        .args(["-o", "link", "show"])
        .output()?;
    ensure!(!String::from_utf8_lossy(&links.stdout).contains(&prefix));
    Ok(())
}

/// With busy polling on, the packet loops answer packets while they poll
/// on after the last one (the ping and TCP/UDP exchanges follow each other
/// within its budget) as they do after waking.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_polling_data_planes_carry_the_same_traffic() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(SKIFF.as_ref(), 2).await?;
    cluster.dataplane_args = vec!["--busy-poll-us".into(), "20000".into()];
    cluster.restart_dataplanes().await?;
    cluster.add_pod(0, "a")?;
    cluster.add_pod(1, "b")?;
    for (from, to) in [("a", "b"), ("b", "a")] {
        let (from, to) = (cluster.pod(from), cluster.pod(to));
        ping(from, to.ip).with_context(|| format!("ping {} -> {}", from.name, to.name))?;
        tcp_round_trip(from, to).with_context(|| format!("TCP {} -> {}", from.name, to.name))?;
        udp_round_trip(from, to).with_context(|| format!("UDP {} -> {}", from.name, to.name))?;
    }
    ensure!(
        cluster.dataplane_running(0) && cluster.dataplane_running(1),
        "a data plane exited"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_changes_are_followed() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(SKIFF.as_ref(), 3).await?;
    cluster.add_pod(0, "a")?;
    cluster.add_pod(1, "b")?;
    cluster.add_pod(2, "c")?;

    // Node 3 comes back at a new underlay address; its peers follow.
    cluster.stop_dataplane(2);
    cluster.change_underlay_ip(2, 103)?;
    cluster.start_dataplane(2)?;
    cluster.wait_routes(2, 2).await?;
    let (a, c) = (cluster.pod("a"), cluster.pod("c"));
    eventually(|| ping(a, c.ip)).await?;
    tcp_round_trip(c, a)?;

    // A crashed data plane takes its device and routes with it; a new one
    // sets both up again and traffic resumes.
    cluster.stop_dataplane(1);
    ensure!(
        cluster
            .node(1)
            .netns
            .ip(&["link", "show", "skiff.1"])
            .is_err()
    );
    ensure!(cluster.overlay_routes(1).is_empty());
    cluster.start_dataplane(1)?;
    cluster.wait_routes(1, 2).await?;
    let (a, b) = (cluster.pod("a"), cluster.pod("b"));
    eventually(|| ping(b, a.ip)).await?;
    tcp_round_trip(a, b)?;

    // A deleted node's prefix leaves every other node's routes.
    let gone = cluster.node(2).pod_cidr.to_string();
    cluster.server().kubectl_ok(&["delete", "node", "node-3"])?;
    let started = Instant::now();
    cluster.wait_routes(0, 1).await?;
    cluster.wait_routes(1, 1).await?;
    ensure!(!cluster.overlay_routes(0).contains(&gone));
    ensure!(!cluster.overlay_routes(1).contains(&gone));
    eprintln!(
        "routes to a deleted node removed after {:?}",
        started.elapsed()
    );
    let (a, c) = (cluster.pod("a"), cluster.pod("c"));
    ensure!(
        a.netns
            .run("ping", &["-c", "1", "-W", "1", &c.ip.to_string()])
            .is_err()
    );
    let (a, b) = (cluster.pod("a"), cluster.pod("b"));
    ping(a, b.ip)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_datagrams_are_dropped_and_counted() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(SKIFF.as_ref(), 2).await?;
    cluster.add_pod(0, "a")?;
    cluster.add_pod(1, "b")?;
    let target = SocketAddr::from((cluster.node(0).underlay_ip, 8472));
    let a_ip = cluster.pod("a").ip;
    let b_ip = cluster.pod("b").ip;

    // A listener in pod a and a crafted overlay datagram for it, as node 2
    // would send it.
    let listener = cluster
        .pod("a")
        .netns
        .enter(|| UdpSocket::bind((a_ip, 0)))??;
    listener.set_read_timeout(Some(Duration::from_millis(1500)))?;
    let port = listener.local_addr()?.port();
    let inner = ipv4_udp(b_ip, a_ip, port, b"crafted", 0);
    let good = overlay(1, 0, 1, &inner);

    // A stranger on the underlay, at an address no Node has.
    let stranger_ip = Ipv4Addr::new(172, 31, cluster.subnet(), 200);
    let node2 = &cluster.node(1).netns;
    node2.ip(&["addr", "add", &format!("{stranger_ip}/24"), "dev", "eth0"])?;
    let stranger = node2.enter(|| UdpSocket::bind((stranger_ip, 0)))??;
    stranger.send_to(&good, target)?;
    let mut buf = [0u8; 64];
    ensure!(
        listener.recv_from(&mut buf).is_err(),
        "a datagram from an unknown node reached the pod"
    );

    // The same datagram from node 2 is delivered: the packet was valid.
    let known_ip = cluster.node(1).underlay_ip;
    let known = node2.enter(|| UdpSocket::bind((known_ip, 0)))??;
    known.send_to(&good, target)?;
    let (n, from) = listener
        .recv_from(&mut buf)
        .context("the valid datagram was not delivered")?;
    ensure!(&buf[..n] == b"crafted" && from.ip() == b_ip);

    // Truncated, another version, too big (by header and by inner length),
    // for an address that is not node 1's.
    known.send_to(&good[..5], target)?;
    let mut v9 = good.clone();
    v9[0] = 9;
    known.send_to(&v9, target)?;
    let mut huge = overlay(1, 0, 2, &inner);
    huge[8..12].copy_from_slice(&(1u32 << 20).to_be_bytes());
    known.send_to(&huge, target)?;
    let big_inner = ipv4_udp(b_ip, a_ip, port, &[0u8; 3000], 0);
    known.send_to(&overlay(1, 0, 1, &big_inner), target)?;
    let elsewhere = ipv4_udp(b_ip, Ipv4Addr::new(10, 99, 0, 1), port, b"x", 0);
    known.send_to(&overlay(1, 0, 1, &elsewhere), target)?;
    ensure!(
        listener.recv_from(&mut buf).is_err(),
        "a bad datagram reached the pod"
    );

    let deadline = Instant::now() + Duration::from_secs(5);
    let want = [
        ("unknown_source", 1.0),
        ("truncated", 1.0),
        ("bad_version", 1.0),
        ("oversized", 2.0),
        ("unknown_destination", 1.0),
    ];
    loop {
        let metrics = cluster.metrics(0)?;
        let short: Vec<_> = want
            .iter()
            .filter(|(reason, n)| {
                counter(
                    &metrics,
                    &format!("skiff_dataplane_dropped_packets_total{{reason=\"{reason}\"}}"),
                ) < *n
            })
            .collect();
        if short.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!("drops not counted: {short:?}\n{metrics}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The data plane is still up and still forwarding.
    ensure!(cluster.dataplane_running(0), "{}", cluster.dataplane_log(0));
    let (a, b) = (cluster.pod("a"), cluster.pod("b"));
    ping(b, a.ip)?;
    tcp_round_trip(b, a)?;
    Ok(())
}

fn ping(from: &Pod, to: Ipv4Addr) -> anyhow::Result<()> {
    let mut last = None;
    for _ in 0..3 {
        match from
            .netns
            .run("ping", &["-c", "1", "-W", "2", &to.to_string()])
        {
            Ok(_) => return Ok(()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("ping never ran")))
}

async fn eventually(mut check: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match check() {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Sends 1 MiB from `from` to an echo server in `to` and reads it back:
/// big enough for TCP super-packets both ways.
/// One underlay datagram in a hundred is lost: TCP across the overlay
/// still carries a bulk transfer whole. The loss is made inside the node
/// namespaces (this kernel has no `netem`): nftables drops 1% of arriving
/// overlay datagrams at random, and the nodes' UDP GSO offload is off so
/// that datagrams cross one by one and each loss hits one datagram, as on
/// a real network, not a whole GSO train.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_survives_one_percent_underlay_loss() -> anyhow::Result<()> {
    let mut cluster = Cluster::start(SKIFF.as_ref(), 2).await?;
    cluster.add_pod(0, "a")?;
    cluster.add_pod(1, "b")?;
    for index in 0..2 {
        let netns = &cluster.node(index).netns;
        netns.run("ethtool", &["-K", "eth0", "tx-udp-segmentation", "off"])?;
        netns.run("nft", &["add", "table", "inet", "loss"])?;
        netns.run(
            "nft",
            &[
                "add",
                "chain",
                "inet",
                "loss",
                "input",
                "{ type filter hook input priority 0; }",
            ],
        )?;
        netns.run(
            "nft",
            &[
                "add", "rule", "inet", "loss", "input", "udp", "dport", "8472", "numgen", "random",
                "mod", "100", "<", "1", "counter", "drop",
            ],
        )?;
    }
    let (a, b) = (cluster.pod("a"), cluster.pod("b"));
    let size = 32 << 20;
    let started = Instant::now();
    bulk_transfer(a, b, size).context("a -> b under 1% loss")?;
    let elapsed = started.elapsed();
    bulk_transfer(b, a, size).context("b -> a under 1% loss")?;
    let mut dropped = 0;
    for index in 0..2 {
        let rules = cluster
            .node(index)
            .netns
            .run("nft", &["list", "table", "inet", "loss"])?;
        dropped += rules
            .split("packets ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .context("no drop counter in the nft rules")?;
    }
    ensure!(dropped > 0, "the loss rule dropped nothing");
    println!(
        "32 MiB a -> b under 1% underlay loss in {:.2} s ({:.2} Gbit/s); {dropped} datagrams dropped in all",
        elapsed.as_secs_f64(),
        size as f64 * 8.0 / elapsed.as_secs_f64() / 1e9
    );
    Ok(())
}

/// Sends `size` bytes from `from` to `to` over one TCP connection and
/// checks that they all arrive, in order, within a generous minute.
fn bulk_transfer(from: &Pod, to: &Pod, size: usize) -> anyhow::Result<()> {
    let to_ip = to.ip;
    let listener = to.netns.enter(|| TcpListener::bind((to_ip, 0)))??;
    let addr = listener.local_addr()?;
    let sink = std::thread::spawn(move || -> anyhow::Result<usize> {
        let (mut stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut buf = vec![0u8; 1 << 16];
        let mut at = 0usize;
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return Ok(at);
            }
            for (i, &byte) in buf[..n].iter().enumerate() {
                ensure!(byte == ((at + i) % 251) as u8, "byte {} is wrong", at + i);
            }
            at += n;
        }
    });
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    from.netns.enter(|| -> anyhow::Result<()> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_write_timeout(Some(Duration::from_secs(60)))?;
        stream.write_all(&data)?;
        Ok(())
    })??;
    let received = sink
        .join()
        .map_err(|_| anyhow::anyhow!("receiver thread panicked"))??;
    ensure!(received == size, "received {received} of {size} bytes");
    Ok(())
}

fn tcp_round_trip(from: &Pod, to: &Pod) -> anyhow::Result<()> {
    let to_ip = to.ip;
    let listener = to.netns.enter(|| TcpListener::bind((to_ip, 0)))??;
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let echo = std::thread::spawn(move || -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        let (mut stream, _) = loop {
            match listener.accept() {
                Ok(accepted) => break accepted,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    ensure!(Instant::now() < deadline, "no connection came");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        };
        stream.set_nonblocking(false)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut data = Vec::new();
        stream.read_to_end(&mut data)?;
        stream.write_all(&data)?;
        Ok(())
    });
    let sent: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let received = from.netns.enter(|| -> anyhow::Result<Vec<u8>> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.write_all(&sent)?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut back = Vec::new();
        stream.read_to_end(&mut back)?;
        Ok(back)
    })??;
    echo.join()
        .map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
    ensure!(
        received == sent,
        "echoed {} of {} bytes",
        received.len(),
        sent.len()
    );
    Ok(())
}

fn udp_round_trip(from: &Pod, to: &Pod) -> anyhow::Result<()> {
    let (from_ip, to_ip) = (from.ip, to.ip);
    let server = to.netns.enter(|| UdpSocket::bind((to_ip, 0)))??;
    let client = from.netns.enter(|| UdpSocket::bind((from_ip, 0)))??;
    server.set_read_timeout(Some(Duration::from_secs(2)))?;
    client.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut buf = [0u8; 64];
    for _ in 0..3 {
        client.send_to(b"hello", server.local_addr()?)?;
        let Ok((n, peer)) = server.recv_from(&mut buf) else {
            continue;
        };
        ensure!(&buf[..n] == b"hello" && peer.ip() == from_ip);
        server.send_to(b"world", peer)?;
        if let Ok((n, _)) = client.recv_from(&mut buf) {
            ensure!(&buf[..n] == b"world");
            return Ok(());
        }
    }
    bail!("no UDP round trip")
}

/// An overlay datagram (version 1, no flags) carrying `payload` whole.
fn overlay(id: u32, index: u8, count: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![1, 0, index, count];
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(payload);
    out
}

/// An IPv4/UDP packet with a correct header checksum and no UDP checksum.
fn ipv4_udp(src: Ipv4Addr, dst: Ipv4Addr, port: u16, data: &[u8], id: u16) -> Vec<u8> {
    let total = (20 + 8 + data.len()) as u16;
    let mut p = vec![0x45, 0];
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&[0x40, 0, 64, 17, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let sum = p
        .chunks(2)
        .fold(0u32, |s, w| s + u32::from(u16::from_be_bytes([w[0], w[1]])));
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    p[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(&9999u16.to_be_bytes());
    p.extend_from_slice(&port.to_be_bytes());
    p.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(data);
    p
}

/// The value of one sample line in Prometheus text.
fn counter(metrics: &str, sample: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}
