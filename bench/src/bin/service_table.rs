//! Service engine benchmark (issue 7): the data plane's per-packet cost for
//! established Service flows (conntrack lookup + NAT + incremental
//! checksums), and the time to apply one EndpointSlice change at 100 and
//! 10,000 Services of 5 endpoints each (50,000 endpoints at the top).
//!
//! Peers, measured in the same run:
//! - packets: a straightforward NAT — a std `HashMap` (SipHash) keyed by
//!   5-tuple, checksums recomputed over the whole packet;
//! - updates: rebuilding the whole table for the change, as a proxy that
//!   rewrites its full rule set does (kube-proxy's iptables mode).
//!
//! `cargo run --release -p skiff-bench --bin service_table [-- --scale 0.2]`

use std::collections::HashMap;
use std::hint::black_box;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use dataplane::service::{
    Engine, EngineConfig, Metrics, PacketMeta, ServiceTable, TableConfig, Verdict,
};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;
use skiff_bench::Samples;

const ENDPOINTS_PER_SERVICE: u32 = 5;
const UPDATES: usize = 2000;

fn main() -> anyhow::Result<()> {
    let scale = parse_scale()?;
    println!(
        "service engine benchmark: {} endpoints per Service, one packet loop thread",
        ENDPOINTS_PER_SERVICE
    );
    println!();
    println!("EndpointSlice change applied (translate + Maglev + publish) vs full rebuild:");
    for services in [100u32, 10_000] {
        updates(services, scale)?;
    }
    println!();
    println!("established-flow packets (lookup + NAT + checksums), 10,000 Services, 20,000 flows:");
    for size in [64usize, 1400] {
        packets(size, scale)?;
    }
    Ok(())
}

fn updates(services: u32, scale: f64) -> anyhow::Result<()> {
    let objects: Vec<(Service, Vec<EndpointSlice>)> = (0..services)
        .map(|i| objects_for(i, ENDPOINTS_PER_SERVICE))
        .collect();
    let started = Instant::now();
    let mut table = table_of(&objects)?;
    let initial = started.elapsed();

    // One EndpointSlice change: a Service loses an endpoint, or gets it back.
    let count = ((UPDATES as f64 * scale) as usize).max(20);
    let mut latencies = Vec::with_capacity(count);
    let wall = Instant::now();
    for n in 0..count {
        let i = (n as u32).wrapping_mul(2_654_435_761) % services;
        let endpoints = if n % 2 == 0 {
            ENDPOINTS_PER_SERVICE - 1
        } else {
            ENDPOINTS_PER_SERVICE
        };
        let (service, slices) = objects_for(i, endpoints);
        let t = Instant::now();
        table.apply(&service, &slices)?;
        latencies.push(t.elapsed());
    }
    let ours = Samples::new(latencies, wall.elapsed());

    // The peer: rebuild everything for each change.
    let rebuilds = if services > 1000 { 3 } else { 50 };
    let mut latencies = Vec::with_capacity(rebuilds);
    for _ in 0..rebuilds {
        let t = Instant::now();
        black_box(table_of(&objects)?);
        latencies.push(t.elapsed());
    }
    let full = Samples::new(latencies, Duration::ZERO);
    println!(
        "  {services:>6} Services: one change p50 {:>8.1} µs  p99 {:>8.1} µs | full rebuild p50 {:>9.1} µs ({:.0}× the change) | initial sync {:.1} ms",
        micros(ours.percentile(50.0)),
        micros(ours.percentile(99.0)),
        micros(full.percentile(50.0)),
        micros(full.percentile(50.0)) / micros(ours.percentile(50.0)).max(0.001),
        initial.as_secs_f64() * 1000.0,
    );
    Ok(())
}

fn packets(size: usize, scale: f64) -> anyhow::Result<()> {
    let services = 10_000u32;
    let objects: Vec<(Service, Vec<EndpointSlice>)> = (0..services)
        .map(|i| objects_for(i, ENDPOINTS_PER_SERVICE))
        .collect();
    let table = table_of(&objects)?;
    let mut config = EngineConfig::new(Ipv4Addr::new(10, 42, 0, 1));
    config.max_flows = 65_536;
    let mut engine = Engine::new(config, table.published(), Arc::new(Metrics::default()));
    let mut reject = vec![0u8; 576];
    let now = 1_000;

    // Open one flow per Service, keep both directions' packets as templates.
    let mut templates = Vec::with_capacity(2 * services as usize);
    let mut naive = NaiveNat::default();
    for i in 0..services {
        // Clients outside the endpoints' range, one per Service.
        let client = (
            Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 46, 0, 1)) + i),
            40_000 + (i % 1000) as u16,
        );
        let vip = (vip(i), 80);
        let mut syn = packet(client, vip, 0x02, size);
        let Verdict::Forward { .. } =
            engine.process(now, &mut syn, PacketMeta::default(), &mut reject)
        else {
            bail!("SYN to service {i} not forwarded");
        };
        let endpoint = (addr_at(&syn, 16), port_at(&syn, 22));
        // Complete the handshake so the flow is ESTABLISHED.
        for (src, dst, flags) in [(endpoint, client, 0x12), (client, vip, 0x10)] {
            let mut p = packet(src, dst, flags, size);
            engine.process(now, &mut p, PacketMeta::default(), &mut reject);
        }
        templates.push(packet(client, vip, 0x10, size));
        templates.push(packet(endpoint, client, 0x10, size));
        naive.insert(client, vip, endpoint);
    }
    let rounds = ((2_000_000.0 * scale) as usize / templates.len()).max(1);
    let total = rounds * templates.len();
    let mut buffer = vec![0u8; size];

    let copy = time(total, || {
        for _ in 0..rounds {
            for t in &templates {
                buffer.copy_from_slice(t);
                black_box(&mut buffer);
            }
        }
    });
    let mut forwarded = 0usize;
    let ours = time(total, || {
        for _ in 0..rounds {
            for t in &templates {
                buffer.copy_from_slice(t);
                if let Verdict::Forward { .. } =
                    engine.process(now, &mut buffer, PacketMeta::default(), &mut reject)
                {
                    forwarded += 1;
                }
            }
        }
    });
    if forwarded != total {
        bail!("{} of {total} packets not forwarded", total - forwarded);
    }
    let peer = time(total, || {
        for _ in 0..rounds {
            for t in &templates {
                buffer.copy_from_slice(t);
                black_box(naive.process(&mut buffer));
            }
        }
    });
    let (ours, peer) = (ours - copy, peer - copy);
    println!(
        "  {size:>5} B packets: engine {ours:>6.1} ns/packet | naive HashMap + full checksum {peer:>6.1} ns/packet ({:.2}× ours) | {:.1} Mpps per core (copy of {copy:.1} ns excluded)",
        peer / ours.max(0.001),
        1000.0 / ours.max(0.001),
    );
    Ok(())
}

/// ns per packet.
fn time(packets: usize, mut run: impl FnMut()) -> f64 {
    let started = Instant::now();
    run();
    started.elapsed().as_nanos() as f64 / packets as f64
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn table_of(objects: &[(Service, Vec<EndpointSlice>)]) -> anyhow::Result<ServiceTable> {
    let mut table = ServiceTable::new(TableConfig {
        node_name: "node-0".into(),
        node_ips: vec![Ipv4Addr::new(192, 168, 5, 10)],
    });
    let specs = objects
        .iter()
        .filter_map(|(s, e)| dataplane::service::translate(s, e).transpose())
        .collect::<Result<Vec<_>, _>>()
        .context("translating")?;
    table.upsert_many(&specs);
    Ok(table)
}

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 43, 0, 0)) + 16 + i)
}

/// A Service and its one EndpointSlice as the API serves them.
fn objects_for(i: u32, endpoints: u32) -> (Service, Vec<EndpointSlice>) {
    let name = format!("svc-{i}");
    let service = serde_json::from_value(json!({
        "metadata": {"namespace": "bench", "name": name},
        "spec": {
            "clusterIP": vip(i).to_string(),
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }))
    .expect("static service json");
    let endpoints: Vec<_> = (0..endpoints)
        .map(|n| {
            let host = u32::from(Ipv4Addr::new(10, 42, 0, 0)) + 256 + i * ENDPOINTS_PER_SERVICE + n;
            json!({
                "addresses": [Ipv4Addr::from(host).to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": format!("node-{}", n % 3),
            })
        })
        .collect();
    let slice = serde_json::from_value(json!({
        "metadata": {"namespace": "bench", "name": format!("{name}-abcde")},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints,
    }))
    .expect("static slice json");
    (service, vec![slice])
}

/// An IPv4/TCP packet of `size` bytes with valid checksums.
fn packet(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), flags: u8, size: usize) -> Vec<u8> {
    let mut p = vec![0u8; size.max(40)];
    let len = p.len() as u16;
    p[0] = 0x45;
    p[2..4].copy_from_slice(&len.to_be_bytes());
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&src.0.octets());
    p[16..20].copy_from_slice(&dst.0.octets());
    let ip_check = checksum(&p[..20], 0);
    p[10..12].copy_from_slice(&ip_check.to_be_bytes());
    p[20..22].copy_from_slice(&src.1.to_be_bytes());
    p[22..24].copy_from_slice(&dst.1.to_be_bytes());
    p[32] = 5 << 4;
    p[33] = flags;
    p[34..36].copy_from_slice(&65535u16.to_be_bytes());
    for (n, b) in p[40..].iter_mut().enumerate() {
        *b = n as u8;
    }
    let tcp_check = checksum(&p[20..], pseudo(&p));
    p[36..38].copy_from_slice(&tcp_check.to_be_bytes());
    p
}

fn addr_at(p: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(p[at], p[at + 1], p[at + 2], p[at + 3])
}

fn port_at(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([p[at], p[at + 1]])
}

fn pseudo(p: &[u8]) -> u64 {
    let words = |b: &[u8]| -> u64 {
        b.chunks(2)
            .map(|w| u64::from(u16::from_be_bytes([w[0], w[1]])))
            .sum()
    };
    words(&p[12..20]) + 6 + (p.len() as u64 - 20)
}

fn checksum(data: &[u8], initial: u64) -> u16 {
    let mut sum = initial;
    let mut chunks = data.chunks_exact(2);
    for w in chunks.by_ref() {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

type Key = (Ipv4Addr, u16, Ipv4Addr, u16);

/// The peer: NAT by a SipHash map, checksums summed again in full.
#[derive(Default)]
struct NaiveNat {
    map: HashMap<Key, Key>,
}

impl NaiveNat {
    fn insert(&mut self, client: (Ipv4Addr, u16), vip: (Ipv4Addr, u16), endpoint: (Ipv4Addr, u16)) {
        self.map.insert(
            (client.0, client.1, vip.0, vip.1),
            (client.0, client.1, endpoint.0, endpoint.1),
        );
        self.map.insert(
            (endpoint.0, endpoint.1, client.0, client.1),
            (vip.0, vip.1, client.0, client.1),
        );
    }

    fn process(&self, p: &mut [u8]) -> bool {
        let key = (
            addr_at(p, 12),
            port_at(p, 20),
            addr_at(p, 16),
            port_at(p, 22),
        );
        let Some(&(src, sport, dst, dport)) = self.map.get(&key) else {
            return false;
        };
        p[12..16].copy_from_slice(&src.octets());
        p[16..20].copy_from_slice(&dst.octets());
        p[20..22].copy_from_slice(&sport.to_be_bytes());
        p[22..24].copy_from_slice(&dport.to_be_bytes());
        p[10..12].fill(0);
        let ip_check = checksum(&p[..20], 0);
        p[10..12].copy_from_slice(&ip_check.to_be_bytes());
        p[36..38].fill(0);
        let tcp_check = checksum(&p[20..], pseudo(p));
        p[36..38].copy_from_slice(&tcp_check.to_be_bytes());
        true
    }
}

fn parse_scale() -> anyhow::Result<f64> {
    let mut args = std::env::args().skip(1);
    let mut scale = 1.0;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--scale" => {
                scale = args
                    .next()
                    .context("--scale needs a value")?
                    .parse()
                    .context("--scale must be a number")?;
            }
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(scale)
}
