//! Prometheus metrics of the proxy (no global registry). Each route holds
//! clones of its own counters, made when the table is built, so the data
//! path only touches atomics for the common status codes.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub ingress: String,
    pub host: String,
    pub path: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub ingress: String,
    pub host: String,
    pub path: String,
}

type Latency = Family<RouteLabels, Histogram, fn() -> Histogram>;

pub struct Metrics {
    requests: Family<RequestLabels, Counter>,
    latency: Latency,
    pub connections: Gauge,
    pub table_updates: Counter,
}

/// Status codes that get a pre-made counter on every route.
const COMMON: [u16; 12] = [200, 201, 204, 301, 304, 308, 400, 404, 429, 502, 503, 504];

/// A route's handles into the families.
#[derive(Clone, Debug)]
pub struct RouteMetrics {
    labels: RouteLabels,
    common: [Counter; COMMON.len()],
    latency: Histogram,
}

fn latency_histogram() -> Histogram {
    // 100 µs … ~100 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            connections: Gauge::default(),
            table_updates: Counter::default(),
        };
        registry.register(
            "ingress_requests",
            "Requests answered, by Ingress, host, path and status",
            m.requests.clone(),
        );
        registry.register(
            "ingress_request_duration_seconds",
            "Time to the response head, by Ingress, host and path",
            m.latency.clone(),
        );
        registry.register(
            "ingress_open_connections",
            "Client connections open",
            m.connections.clone(),
        );
        registry.register(
            "ingress_table_updates",
            "Routing tables built and swapped in",
            m.table_updates.clone(),
        );
        m
    }

    pub fn route(&self, ingress: &str, host: &str, path: &str) -> RouteMetrics {
        let labels = RouteLabels {
            ingress: ingress.to_owned(),
            host: host.to_owned(),
            path: path.to_owned(),
        };
        let common = COMMON.map(|status| {
            self.requests.get_or_create_owned(&RequestLabels {
                ingress: labels.ingress.clone(),
                host: labels.host.clone(),
                path: labels.path.clone(),
                status,
            })
        });
        let latency = self.latency.get_or_create_owned(&labels);
        RouteMetrics {
            labels,
            common,
            latency,
        }
    }

    /// Counts a request of `route` (or of no route: the 404 default).
    pub fn record(&self, route: Option<&RouteMetrics>, status: u16, seconds: f64) {
        match route {
            Some(r) => {
                r.latency.observe(seconds);
                match COMMON.iter().position(|&s| s == status) {
                    Some(i) => {
                        r.common[i].inc();
                    }
                    None => {
                        self.requests
                            .get_or_create(&RequestLabels {
                                ingress: r.labels.ingress.clone(),
                                host: r.labels.host.clone(),
                                path: r.labels.path.clone(),
                                status,
                            })
                            .inc();
                    }
                }
            }
            None => {
                self.requests
                    .get_or_create(&RequestLabels {
                        ingress: String::new(),
                        host: String::new(),
                        path: String::new(),
                        status,
                    })
                    .inc();
            }
        }
    }
}
