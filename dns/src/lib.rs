//! Cluster DNS: the Kubernetes DNS specification (schema 1.1.0), served
//! node-local from a watch-fed index of pre-encoded answers, with names
//! outside the cluster forwarded upstream through a cache.
//!
//! Layout, top-down: `watch` (API → cluster state, from the slim
//! `objects` it decodes) → `records` (objects → records) → `zone`
//! (records → encoded answers, published) → `index` (the published,
//! read-only map) → `answer` (the hot path) fed by `udp`
//! and `tcp`; `slow` (full decoder), `forward` and `cache` for the rest;
//! `wire` (zero-copy query view) and `metrics` underneath.

pub mod answer;
pub mod cache;
pub mod forward;
pub mod index;
pub mod metrics;
pub mod objects;
pub mod records;
pub mod slow;
pub mod tcp;
pub mod udp;
pub mod watch;
pub mod wire;
pub mod zone;

#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::cache::Cache;
use crate::index::{Index, Published};
use crate::metrics::Metrics;
use crate::slow::SlowPath;
use crate::zone::ZoneBuilder;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("{0:?} is not a valid cluster domain")]
    Domain(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("no listen address given")]
    NoListen,
}

#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// Addresses to serve on, UDP and TCP each.
    pub listen: Vec<SocketAddr>,
    /// The zone, e.g. `cluster.local`.
    pub cluster_domain: String,
    /// TTL of cluster records and of negative answers.
    pub ttl: u32,
    /// Where the upstream resolvers are listed; no forwarding (REFUSED
    /// outside the zone) when `None`.
    pub upstream_resolv_conf: Option<PathBuf>,
    /// UDP worker threads per listen address; 0 means one per CPU.
    pub workers: usize,
    /// The cluster DNS address, served as `ns.dns.<zone>`.
    pub dns_ip: Option<IpAddr>,
    /// Where to serve Prometheus metrics, if anywhere.
    pub metrics_listen: Option<SocketAddr>,
    /// Most upstream answers cached.
    pub cache_size: usize,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            listen: Vec::new(),
            cluster_domain: "cluster.local".into(),
            ttl: 5,
            upstream_resolv_conf: Some("/etc/resolv.conf".into()),
            workers: 0,
            dns_ip: None,
            metrics_listen: None,
            cache_size: 10_000,
        }
    }
}

/// Serves cluster DNS for the cluster `client` talks to, until the task is
/// dropped. Returns early only when it cannot start (bad domain, a listen
/// address that cannot be bound).
pub async fn run(client: kube::Client, config: DnsConfig) -> Result<(), DnsError> {
    let (server, builder) = Server::start(&config).await?;
    tracing::info!(listen = ?config.listen, zone = %config.cluster_domain, "cluster DNS serving");
    watch::run(client, builder, server.published.clone()).await;
    drop(server);
    Ok(())
}

/// The serving half: sockets, workers and the published index. Feed it
/// through the `ZoneBuilder` that `start` returns.
pub struct Server {
    pub published: Arc<Published>,
    pub metrics: Arc<Metrics>,
    /// The addresses bound (port 0 resolved), in `listen` order.
    pub local_addrs: Vec<SocketAddr>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Server {
    pub async fn start(config: &DnsConfig) -> Result<(Server, ZoneBuilder), DnsError> {
        if config.listen.is_empty() {
            return Err(DnsError::NoListen);
        }
        let upstreams = match &config.upstream_resolv_conf {
            Some(path) => match forward::read_resolv_conf(path) {
                Ok(list) => list
                    .into_iter()
                    .filter(|u| !config.listen.contains(u))
                    .collect(),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot read upstream resolvers; not forwarding");
                    Vec::new()
                }
            },
            None => Vec::new(),
        };
        let builder = ZoneBuilder::new(
            &config.cluster_domain,
            config.ttl,
            config.dns_ip,
            !upstreams.is_empty(),
        )?;
        let published = Published::new(Index::empty(builder.zone()));
        let metrics = Arc::new(Metrics::default());
        let stop = Arc::new(AtomicBool::new(false));
        let slow = Arc::new(SlowPath {
            published: published.clone(),
            upstreams,
            cache: Mutex::new(Cache::new(config.cache_size)),
            metrics: metrics.clone(),
            counters: metrics.worker(),
        });
        let workers = if config.workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            config.workers
        };
        let mut server = Server {
            published: published.clone(),
            metrics: metrics.clone(),
            local_addrs: Vec::new(),
            stop: stop.clone(),
            threads: Vec::new(),
            tasks: Vec::new(),
        };
        let (slow_tx, slow_rx) = mpsc::channel(1024);
        for addr in &config.listen {
            let listen_err = |source| DnsError::Listen {
                addr: *addr,
                source,
            };
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(listen_err)?;
            // Bind UDP on the port TCP got (matters for port 0).
            let bound = tcp.local_addr().map_err(listen_err)?;
            let threads = udp::spawn(bound, workers, &published, slow_tx.clone(), &metrics, &stop)
                .map_err(listen_err)?;
            server.threads.extend(threads);
            server.local_addrs.push(bound);
            server.tasks.push(tokio::spawn(tcp::serve(
                tcp,
                published.clone(),
                slow.clone(),
                metrics.worker(),
            )));
        }
        server.tasks.push(tokio::spawn(slow_loop(slow_rx, slow)));
        if let Some(addr) = config.metrics_listen {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(listener) => {
                    let registry = Arc::new(metrics.registry());
                    server
                        .tasks
                        .push(tokio::spawn(metrics::serve(listener, registry)));
                }
                Err(e) => tracing::warn!(%addr, error = %e, "cannot serve DNS metrics"),
            }
        }
        Ok((server, builder))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in &self.tasks {
            task.abort();
        }
        // Workers notice the flag within their poll interval; they hold no
        // state worth waiting for.
        self.threads.clear();
    }
}

/// Most slow-path queries in flight at once; beyond that they are dropped
/// (and counted) rather than queued without bound.
const SLOW_IN_FLIGHT: usize = 512;

async fn slow_loop(mut jobs: mpsc::Receiver<udp::SlowJob>, slow: Arc<SlowPath>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(SLOW_IN_FLIGHT));
    while let Some(job) = jobs.recv().await {
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            slow.counters.dropped(metrics::DropReason::Overload);
            continue;
        };
        let slow = slow.clone();
        tokio::spawn(async move {
            if let Some(reply) = slow.handle(&job.packet, true).await {
                let _ = job
                    .socket
                    .send_to_with_flags(&reply, &job.from.into(), libc::MSG_DONTWAIT);
            }
            drop(permit);
        });
    }
}
