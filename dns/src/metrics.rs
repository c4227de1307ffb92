//! Prometheus metrics under CoreDNS's names. The hot path counts into
//! per-worker atomics (no shared cache line, no lock); a collector adds
//! them up at scrape time. The slow path uses ordinary metric families.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::wire::{self, Reject};

/// Query types with their own label value; the rest are "other".
const TYPES: [(u16, &str); 11] = [
    (wire::TYPE_A, "A"),
    (wire::TYPE_AAAA, "AAAA"),
    (wire::TYPE_SRV, "SRV"),
    (wire::TYPE_PTR, "PTR"),
    (wire::TYPE_TXT, "TXT"),
    (wire::TYPE_CNAME, "CNAME"),
    (wire::TYPE_SOA, "SOA"),
    (wire::TYPE_NS, "NS"),
    (15, "MX"),
    (65, "HTTPS"),
    (wire::TYPE_ANY, "ANY"),
];
const OTHER_TYPE: usize = TYPES.len();
const RCODES: [&str; 17] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "YXDOMAIN", "YXRRSET",
    "NXRRSET", "NOTAUTH", "NOTZONE", "RCODE11", "RCODE12", "RCODE13", "RCODE14", "RCODE15",
    "BADVERS",
];
const DROPS: [&str; 4] = ["runt", "response", "oversized", "overload"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Udp = 0,
    Tcp = 1,
}

#[derive(Clone, Copy, Debug)]
pub enum DropReason {
    Runt = 0,
    Response = 1,
    Oversized = 2,
    Overload = 3,
}

impl From<Reject> for DropReason {
    fn from(r: Reject) -> Self {
        match r {
            Reject::Response => DropReason::Response,
            _ => DropReason::Runt,
        }
    }
}

/// Counters one worker owns.
#[derive(Debug, Default)]
pub struct WorkerCounters {
    requests: [[AtomicU64; OTHER_TYPE + 1]; 2],
    responses: [AtomicU64; RCODES.len()],
    dropped: [AtomicU64; DROPS.len()],
}

impl WorkerCounters {
    pub fn request(&self, proto: Proto, qtype: u16) {
        let slot = TYPES
            .iter()
            .position(|(t, _)| *t == qtype)
            .unwrap_or(OTHER_TYPE);
        self.requests[proto as usize][slot].fetch_add(1, Ordering::Relaxed);
    }

    pub fn response(&self, rcode: u8) {
        let slot = usize::from(rcode).min(RCODES.len() - 1);
        self.responses[slot].fetch_add(1, Ordering::Relaxed);
    }

    pub fn dropped(&self, reason: DropReason) {
        self.dropped[reason as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// All DNS metrics.
#[derive(Debug)]
pub struct Metrics {
    workers: Mutex<Vec<Arc<WorkerCounters>>>,
    pub cache_hits: Family<Vec<(&'static str, &'static str)>, Counter>,
    pub cache_misses: Counter,
    pub cache_entries: Family<Vec<(&'static str, &'static str)>, Gauge>,
    pub forward_requests: Family<Vec<(&'static str, String)>, Counter>,
    pub forward_responses: Family<Vec<(&'static str, String)>, Counter>,
    pub forward_duration: Family<Vec<(&'static str, String)>, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            workers: Mutex::new(Vec::new()),
            cache_hits: Family::default(),
            cache_misses: Counter::default(),
            cache_entries: Family::default(),
            forward_requests: Family::default(),
            forward_responses: Family::default(),
            forward_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.00025, 2.0, 16))
            }),
        }
    }
}

impl Metrics {
    /// Counters for a new worker (or the slow path).
    pub fn worker(&self) -> Arc<WorkerCounters> {
        let counters = Arc::new(WorkerCounters::default());
        self.workers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(counters.clone());
        counters
    }

    /// Total responses with `rcode` so far (tests, logs).
    pub fn responses(&self, rcode: u8) -> u64 {
        let slot = usize::from(rcode).min(RCODES.len() - 1);
        self.sum(|w| w.responses[slot].load(Ordering::Relaxed))
    }

    pub fn dropped_total(&self) -> u64 {
        self.sum(|w| w.dropped.iter().map(|d| d.load(Ordering::Relaxed)).sum())
    }

    fn sum(&self, f: impl Fn(&WorkerCounters) -> u64) -> u64 {
        let workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
        workers.iter().map(|w| f(w)).sum()
    }

    /// A registry with everything, for the metrics endpoint.
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(HotCounters(self.clone())));
        registry.register(
            "coredns_cache_hits",
            "The count of cache hits.",
            self.cache_hits.clone(),
        );
        registry.register(
            "coredns_cache_misses",
            "The count of cache misses.",
            self.cache_misses.clone(),
        );
        registry.register(
            "coredns_cache_entries",
            "The number of elements in the cache.",
            self.cache_entries.clone(),
        );
        registry.register(
            "coredns_forward_requests",
            "Counter of requests made per upstream.",
            self.forward_requests.clone(),
        );
        registry.register(
            "coredns_forward_responses",
            "Counter of responses received per upstream.",
            self.forward_responses.clone(),
        );
        registry.register(
            "coredns_forward_request_duration_seconds",
            "Histogram of the time each request took.",
            self.forward_duration.clone(),
        );
        registry
    }
}

/// Sums the per-worker counters at scrape time.
#[derive(Debug)]
struct HotCounters(Arc<Metrics>);

impl Collector for HotCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.0;
        let mut family = encoder.encode_descriptor(
            "coredns_dns_requests",
            "Counter of DNS requests made per zone, protocol and family.",
            None,
            MetricType::Counter,
        )?;
        for (proto, proto_name) in [(0, "udp"), (1, "tcp")] {
            for (slot, name) in TYPES.iter().map(|(_, n)| *n).chain(["other"]).enumerate() {
                let value = m.sum(|w| w.requests[proto][slot].load(Ordering::Relaxed));
                let labels = [
                    ("server", "dns://"),
                    ("zone", "."),
                    ("proto", proto_name),
                    ("type", name),
                ];
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "coredns_dns_responses",
            "Counter of response status codes.",
            None,
            MetricType::Counter,
        )?;
        for (slot, name) in RCODES.iter().enumerate() {
            let value = m.sum(|w| w.responses[slot].load(Ordering::Relaxed));
            if value == 0 && slot > 5 {
                continue;
            }
            let labels = [("server", "dns://"), ("zone", "."), ("rcode", *name)];
            ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "skiff_dns_dropped",
            "Packets dropped without an answer, by reason.",
            None,
            MetricType::Counter,
        )?;
        for (slot, name) in DROPS.iter().enumerate() {
            let value = m.sum(|w| w.dropped[slot].load(Ordering::Relaxed));
            ConstCounter::new(value).encode(family.encode_family(&[("reason", *name)])?)?;
        }
        Ok(())
    }
}

/// Serves `GET /metrics` (any path, in fact) in the Prometheus text
/// format until the listener fails.
pub async fn serve(listener: tokio::net::TcpListener, registry: Arc<Registry>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let (mut stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            // Read the request head (bounded); its content does not matter.
            let mut buf = [0u8; 4096];
            let mut seen = 0;
            while seen < buf.len() {
                match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    stream.read(&mut buf[seen..]),
                )
                .await
                {
                    Ok(Ok(n)) if n > 0 => seen += n,
                    _ => break,
                }
                if buf[..seen].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let mut body = String::new();
            if prometheus_client::encoding::text::encode(&mut body, &registry).is_err() {
                return;
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
        });
    }
}
