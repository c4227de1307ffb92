//! What the routing table points at: routes (one rule's path), their
//! backends (a Service port resolved to ready endpoints) and per-client
//! rate limiters.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use http::uri::Authority;

use crate::annotations::{Protocol, Settings};
use crate::metrics::RouteMetrics;
use crate::pool::Pool;

#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// `ip:port`, made once so requests need not format it.
    pub authority: Authority,
    /// Kept across table rebuilds for as long as the endpoint exists.
    pub pool: Arc<Pool>,
}

impl Endpoint {
    pub fn new(addr: SocketAddr, pool: Arc<Pool>) -> Option<Self> {
        let authority = Authority::try_from(addr.to_string()).ok()?;
        Some(Endpoint {
            addr,
            authority,
            pool,
        })
    }
}

/// A Service port and its ready endpoints at the time the table was built.
#[derive(Debug)]
pub struct Backend {
    /// `namespace/service:port`, for logs.
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    pub protocol: Protocol,
    next: AtomicUsize,
}

impl Backend {
    pub fn new(name: String, endpoints: Vec<Endpoint>, protocol: Protocol) -> Self {
        Backend {
            name,
            endpoints,
            protocol,
            next: AtomicUsize::new(0),
        }
    }

    /// Round-robin start for one request; `attempt` moves on from it when
    /// a connection was refused.
    pub fn start(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    pub fn endpoint(&self, start: usize, attempt: usize) -> Option<&Endpoint> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        self.endpoints.get(start.wrapping_add(attempt) % n)
    }
}

/// A second Ingress taking `weight` percent of a route's requests.
#[derive(Debug)]
pub struct Canary {
    pub weight: u32,
    pub backend: Arc<Backend>,
}

#[derive(Debug)]
pub struct Route {
    /// `namespace/name` of the Ingress.
    pub ingress: String,
    pub backend: Arc<Backend>,
    pub canary: Option<Canary>,
    pub settings: Arc<Settings>,
    /// Plain-HTTP requests get a redirect to HTTPS.
    pub redirect_https: bool,
    pub limiter: Option<Arc<RateLimiter>>,
    pub metrics: RouteMetrics,
}

impl Route {
    /// The backend for one request, rolling the canary's dice.
    pub fn pick_backend(&self) -> &Arc<Backend> {
        match &self.canary {
            Some(c) if c.weight > 0 && fastrand::u32(0..100) < c.weight => &c.backend,
            _ => &self.backend,
        }
    }

    /// Every backend of the route speaks `protocol` to its endpoints.
    pub fn all_speak(&self, protocol: Protocol) -> bool {
        self.backend.protocol == protocol
            && self
                .canary
                .as_ref()
                .is_none_or(|c| c.backend.protocol == protocol)
    }
}

/// A token bucket per client address: `rate` requests per second with a
/// burst of the same size.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    buckets: Mutex<Buckets>,
}

#[derive(Debug, Default)]
struct Buckets {
    by_client: HashMap<IpAddr, (f64, Instant)>,
    /// When idle buckets were last dropped.
    pruned: Option<Instant>,
}

/// Buckets kept before idle (full) ones are dropped.
const MAX_CLIENTS: usize = 65_536;
/// How often a full table may be scanned for idle buckets: each scan
/// visits every bucket under the lock.
const PRUNE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

impl RateLimiter {
    pub fn new(rate: u32) -> Self {
        RateLimiter {
            rate: f64::from(rate),
            buckets: Mutex::default(),
        }
    }

    /// Whether `client` may send a request now. A new client finding the
    /// table full of clients still being limited is refused, as nginx's
    /// `limit_req` refuses when its zone is full: tracking it would grow
    /// the table without bound.
    pub fn allow(&self, client: IpAddr, now: Instant) -> bool {
        let mut guard = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let Buckets { by_client, pruned } = &mut *guard;
        if by_client.len() >= MAX_CLIENTS && !by_client.contains_key(&client) {
            if pruned.is_none_or(|at| now.saturating_duration_since(at) >= PRUNE_INTERVAL) {
                let rate = self.rate;
                by_client.retain(|_, (tokens, at)| {
                    *tokens + now.saturating_duration_since(*at).as_secs_f64() * rate < rate
                });
                *pruned = Some(now);
            }
            if by_client.len() >= MAX_CLIENTS {
                return false;
            }
        }
        let (tokens, at) = by_client.entry(client).or_insert((self.rate, now));
        let refill = now.saturating_duration_since(*at).as_secs_f64() * self.rate;
        *tokens = (*tokens + refill).min(self.rate);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn backend(name: &str, n: u16) -> Arc<Backend> {
        let endpoints = (0..n)
            .filter_map(|i| {
                Endpoint::new(SocketAddr::from(([127, 0, 0, 1], 1000 + i)), Arc::default())
            })
            .collect();
        Arc::new(Backend::new(name.into(), endpoints, Protocol::Http1))
    }

    #[test]
    fn round_robin_and_retry_move_on() {
        let b = backend("b", 3);
        let ports: Vec<u16> = (0..6)
            .map(|_| b.endpoint(b.start(), 0).unwrap().addr.port())
            .collect();
        assert_eq!(ports, [1000, 1001, 1002, 1000, 1001, 1002]);
        let start = b.start();
        assert_ne!(
            b.endpoint(start, 0).unwrap().addr,
            b.endpoint(start, 1).unwrap().addr
        );
        assert!(backend("empty", 0).endpoint(0, 0).is_none());
    }

    #[test]
    fn canary_weight_takes_its_share() {
        let metrics = crate::metrics::Metrics::new(&mut Default::default());
        let mut route = Route {
            ingress: "ns/main".into(),
            backend: backend("main", 1),
            canary: Some(Canary {
                weight: 20,
                backend: backend("canary", 1),
            }),
            settings: Arc::default(),
            redirect_https: false,
            limiter: None,
            metrics: metrics.route("ns/main", "", "/"),
        };
        let n = 20_000;
        let hits = (0..n)
            .filter(|_| route.pick_backend().name == "canary")
            .count();
        let share = hits as f64 / n as f64;
        assert!((0.18..0.22).contains(&share), "canary share {share}");
        route.canary.as_mut().unwrap().weight = 0;
        assert!((0..1000).all(|_| route.pick_backend().name == "main"));
        route.canary.as_mut().unwrap().weight = 100;
        assert!((0..1000).all(|_| route.pick_backend().name == "canary"));
    }

    #[test]
    fn rate_limit_per_client_refills() {
        let limiter = RateLimiter::new(2);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let t0 = Instant::now();
        assert!(limiter.allow(a, t0));
        assert!(limiter.allow(a, t0));
        assert!(!limiter.allow(a, t0));
        assert!(limiter.allow(b, t0), "another client has its own bucket");
        assert!(limiter.allow(a, t0 + Duration::from_millis(600)));
    }

    #[test]
    fn a_table_full_of_limited_clients_stops_growing() {
        let limiter = RateLimiter::new(1);
        let t0 = Instant::now();
        let client = |i: usize| IpAddr::from(std::net::Ipv6Addr::from(i as u128));
        // Every client spends its one token: none of their buckets is idle.
        for i in 0..MAX_CLIENTS {
            assert!(limiter.allow(client(i), t0));
        }
        let newcomer = client(MAX_CLIENTS);
        assert!(
            !limiter.allow(newcomer, t0),
            "refused while the table is full"
        );
        assert!(!limiter.allow(newcomer, t0 + Duration::from_millis(500)));
        let tracked = || {
            let buckets = limiter.buckets.lock().unwrap();
            buckets.by_client.len()
        };
        assert_eq!(tracked(), MAX_CLIENTS);
        // Once the others' buckets have refilled they are dropped, and the
        // newcomer is tracked like anyone else.
        let later = t0 + Duration::from_secs(2);
        assert!(limiter.allow(newcomer, later));
        assert_eq!(tracked(), 1);
        assert!(!limiter.allow(newcomer, later));
    }
}
