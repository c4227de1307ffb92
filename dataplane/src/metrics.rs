//! The data plane's Prometheus metrics (`skiff_dataplane_*`), in their own
//! registry, and a small `/metrics` endpoint.
//!
//! Workers count into plain per-worker integers on the packet path and add
//! them to these shared counters once per batch, so counting costs no
//! atomic operation per packet.

use std::net::SocketAddr;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Why a packet was dropped; the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drop {
    /// Shorter than its headers.
    Truncated,
    /// An overlay header of a version we do not speak.
    BadVersion,
    /// A header that does not add up (flags, fragment numbers, lengths,
    /// virtio-net offsets, inner IP header).
    Malformed,
    /// Larger than the overlay or the TUN device allows.
    Oversized,
    /// From an underlay address that is no known node's.
    UnknownSource,
    /// For an address no node owns (outgoing) or that is not ours
    /// (incoming).
    UnknownDestination,
    /// A fragment of a packet whose other fragments never came.
    Reassembly,
    /// The kernel refused to send or to take the packet.
    Io,
}

impl Drop {
    pub const ALL: [Drop; 8] = [
        Drop::Truncated,
        Drop::BadVersion,
        Drop::Malformed,
        Drop::Oversized,
        Drop::UnknownSource,
        Drop::UnknownDestination,
        Drop::Reassembly,
        Drop::Io,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Drop::Truncated => "truncated",
            Drop::BadVersion => "bad_version",
            Drop::Malformed => "malformed",
            Drop::Oversized => "oversized",
            Drop::UnknownSource => "unknown_source",
            Drop::UnknownDestination => "unknown_destination",
            Drop::Reassembly => "reassembly",
            Drop::Io => "io_error",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A system call on the packet path; the `op` label of the I/O counters,
/// which show how many bytes each call moves (the point of the offloads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    TunRead,
    TunWrite,
    /// One `sendmmsg`.
    UdpSend,
    /// One `recvmmsg`.
    UdpRecv,
}

impl Io {
    pub const ALL: [Io; 4] = [Io::TunRead, Io::TunWrite, Io::UdpSend, Io::UdpRecv];

    pub fn label(self) -> &'static str {
        match self {
            Io::TunRead => "tun_read",
            Io::TunWrite => "tun_write",
            Io::UdpSend => "udp_send",
            Io::UdpRecv => "udp_recv",
        }
    }
}

/// What one op's counters count.
#[derive(Debug, Default, Clone, Copy)]
pub struct IoCount {
    pub calls: u64,
    pub bytes: u64,
    /// TUN: super-packets (GSO); UDP: datagrams.
    pub units: u64,
}

type Labels = Vec<(&'static str, &'static str)>;

pub struct Metrics {
    registry: Registry,
    dropped: Vec<Counter>,
    packets_in: Counter,
    packets_out: Counter,
    bytes_in: Counter,
    bytes_out: Counter,
    io: Vec<[Counter; 3]>,
    pub peers: Gauge,
    pub routes: Gauge,
    pub route_errors: Counter,
    pub start_failures: Counter,
    /// The Service engine, once the data plane balances Services.
    pub services: std::sync::OnceLock<std::sync::Arc<crate::services::Services>>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let dropped_family = Family::<Labels, Counter>::default();
        let dropped = Drop::ALL
            .iter()
            .map(|d| {
                dropped_family
                    .get_or_create(&vec![("reason", d.label())])
                    .clone()
            })
            .collect();
        registry.register(
            "skiff_dataplane_dropped_packets",
            "Packets the data plane dropped, by reason",
            dropped_family,
        );
        let packets = Family::<Labels, Counter>::default();
        let bytes = Family::<Labels, Counter>::default();
        let packets_in = packets.get_or_create(&vec![("direction", "in")]).clone();
        let packets_out = packets.get_or_create(&vec![("direction", "out")]).clone();
        let bytes_in = bytes.get_or_create(&vec![("direction", "in")]).clone();
        let bytes_out = bytes.get_or_create(&vec![("direction", "out")]).clone();
        registry.register(
            "skiff_dataplane_packets",
            "Packets tunnelled to other nodes (out) and delivered from them (in); a TCP super-packet counts once",
            packets,
        );
        registry.register(
            "skiff_dataplane_bytes",
            "Bytes of inner packets tunnelled out and delivered in",
            bytes,
        );
        let calls = Family::<Labels, Counter>::default();
        let io_bytes = Family::<Labels, Counter>::default();
        let units = Family::<Labels, Counter>::default();
        let io = Io::ALL
            .iter()
            .map(|op| {
                let label = vec![("op", op.label())];
                [
                    calls.get_or_create(&label).clone(),
                    io_bytes.get_or_create(&label).clone(),
                    units.get_or_create(&label).clone(),
                ]
            })
            .collect();
        registry.register(
            "skiff_dataplane_io_calls",
            "System calls on the packet path, by op (a UDP op is one sendmmsg/recvmmsg)",
            calls,
        );
        registry.register(
            "skiff_dataplane_io_bytes",
            "Bytes those calls moved (TUN: with the virtio-net header; UDP: payload)",
            io_bytes,
        );
        registry.register(
            "skiff_dataplane_io_units",
            "TUN ops: GSO super-packets among the packets; UDP ops: datagrams",
            units,
        );
        let peers = Gauge::default();
        registry.register(
            "skiff_dataplane_peers",
            "Nodes the overlay reaches",
            peers.clone(),
        );
        let routes = Gauge::default();
        registry.register(
            "skiff_dataplane_routes",
            "Routes the data plane keeps in the TUN device",
            routes.clone(),
        );
        let route_errors = Counter::default();
        registry.register(
            "skiff_dataplane_route_errors",
            "Failed attempts to bring the TUN device's routes up to date",
            route_errors.clone(),
        );
        let start_failures = Counter::default();
        registry.register(
            "skiff_dataplane_start_failures",
            "Times the data plane could not start (no TUN device, port in use)",
            start_failures.clone(),
        );
        Metrics {
            registry,
            dropped,
            packets_in,
            packets_out,
            bytes_in,
            bytes_out,
            io,
            peers,
            routes,
            route_errors,
            start_failures,
            services: std::sync::OnceLock::new(),
        }
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        if let Some(services) = self.services.get() {
            // The engine's plain-atomic counters go before the end marker.
            let end = out.rfind("# EOF").unwrap_or(out.len());
            let tail = out.split_off(end);
            services.render(&mut out);
            out.push_str(&tail);
        }
        out
    }

    pub fn dropped(&self, reason: Drop) -> u64 {
        self.dropped[reason.index()].get()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// A worker's counts since its last flush.
#[derive(Debug, Default)]
pub struct Local {
    dropped: [u64; Drop::ALL.len()],
    pub packets_in: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    io: [IoCount; Io::ALL.len()],
}

impl Local {
    /// Counts one call of `op` that moved `bytes` in `units`.
    pub fn io(&mut self, op: Io, bytes: usize, units: usize) {
        let count = &mut self.io[op as usize];
        count.calls += 1;
        count.bytes += bytes as u64;
        count.units += units as u64;
    }

    pub fn drop(&mut self, reason: Drop, packets: u64) {
        self.dropped[reason.index()] += packets;
    }

    /// Adds the counts to `metrics` and starts over.
    pub fn flush(&mut self, metrics: &Metrics) {
        for (counter, n) in metrics.dropped.iter().zip(&mut self.dropped) {
            if *n > 0 {
                counter.inc_by(std::mem::take(n));
            }
        }
        for (counter, n) in [
            (&metrics.packets_in, &mut self.packets_in),
            (&metrics.packets_out, &mut self.packets_out),
            (&metrics.bytes_in, &mut self.bytes_in),
            (&metrics.bytes_out, &mut self.bytes_out),
        ] {
            if *n > 0 {
                counter.inc_by(std::mem::take(n));
            }
        }
        for (counters, count) in metrics.io.iter().zip(&mut self.io) {
            let count = std::mem::take(count);
            for (counter, n) in counters.iter().zip([count.calls, count.bytes, count.units]) {
                if n > 0 {
                    counter.inc_by(n);
                }
            }
        }
    }
}

/// Serves `GET /metrics` on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, metrics: std::sync::Arc<Metrics>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "data plane metrics listening");
    loop {
        let (mut stream, _) = listener.accept().await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut request = [0u8; 4096];
            let mut len = 0;
            // Read the request head; scrapers send nothing else.
            while len < request.len() {
                match stream.read(&mut request[len..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => len += n,
                }
                if request[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&request[..len]);
            let response = if head.starts_with("GET /metrics ") {
                if let Some(services) = metrics.services.get() {
                    services.refresh().await;
                }
                let body = metrics.render();
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else if head.starts_with("GET /conntrack ") {
                match conntrack(&metrics).await {
                    Some(body) => format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    ),
                    None => "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                        .to_owned(),
                }
            } else {
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    .to_owned()
            };
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}

/// The live flows, one `conntrack -L`-style line each, from the packet
/// loop; `None` when Services are not balanced here or the loop did not
/// answer.
async fn conntrack(metrics: &Metrics) -> Option<String> {
    let services = metrics.services.get()?;
    services.flows().await
}
