//! Connect-time Service balancing for this node's pods (as Cilium's
//! socket load balancer): a BPF program on the node's pod cgroup rewrites
//! the destination of `connect()` from a TCP ClusterIP frontend to one of
//! its endpoints. The connection is then plain pod-to-pod traffic from its
//! first packet: no DNAT, no conntrack entry, no reverse translation, so
//! a Service costs what the pod IP costs. `getpeername()` still answers
//! with the ClusterIP.
//!
//! What stays with nftables and the engine: UDP (a datagram socket's
//! answers would come from the endpoint's address), ClientIP affinity,
//! ports without endpoints (refused there), NodePorts, and every process
//! outside the pod cgroup (host processes, other nodes' traffic).
//!
//! The endpoints of each frontend are the ones `nftables::port_rules`
//! gives the kernel rules, so both backends balance over the same set.
//! An endpoint change rewrites the frontend's slots in an order that keeps
//! every lookup valid: new endpoints first, then the count, then the
//! slots past the new count.

mod bpf;
mod program;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Mutex;

use crate::nftables::{Frontend, port_rules};
use crate::service::{Protocol, ServiceKey, ServiceSpec};

use bpf::{Hook, Map};

/// Room in the frontend map: slots of every TCP ClusterIP port.
const MAX_SLOTS: u32 = 1 << 20;
/// Connections whose ClusterIP `getpeername()` can still tell; the oldest
/// are forgotten first.
const MAX_PEERS: u32 = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no cgroup v2 hierarchy is mounted")]
    NoCgroup2,
    #[error("cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("creating a BPF map: {0}")]
    Map(io::Error),
    #[error("loading the {hook:?} program: {source}")]
    Load { hook: Hook, source: io::Error },
    #[error("attaching the {hook:?} program: {source}")]
    Attach { hook: Hook, source: io::Error },
}

/// One TCP ClusterIP port and the endpoints its connections go to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    ip: Ipv4Addr,
    port: u16,
    targets: Vec<(Ipv4Addr, u16)>,
}

/// The maps and the attached programs; dropping it detaches them.
pub struct SocketBalancer {
    services: Map,
    node: String,
    state: Mutex<State>,
    _peers: Map,
    _links: [OwnedFd; 2],
}

#[derive(Default)]
struct State {
    programmed: HashMap<ServiceKey, Vec<Entry>>,
    /// Connections counted by frontends since rewritten or removed (a
    /// rewrite starts the kernel's counter again), per Service.
    carried: HashMap<ServiceKey, u64>,
}

impl SocketBalancer {
    /// Attaches to the v2 cgroup `cgroup` (relative to the hierarchy's
    /// root, made if missing) for node `node`.
    pub fn start(cgroup: &str, node: &str) -> Result<SocketBalancer, Error> {
        let path = cgroup2_root()
            .ok_or(Error::NoCgroup2)?
            .join(cgroup.trim_start_matches('/'));
        let cgroup_error = |source| Error::Cgroup {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&path).map_err(cgroup_error)?;
        let dir: OwnedFd = std::fs::File::open(&path).map_err(cgroup_error)?.into();
        let services = Map::create(
            bpf::MAP_HASH,
            "skiff_svc",
            program::ENTRY,
            program::SERVICE_VALUE,
            MAX_SLOTS,
            bpf::MAP_NO_PREALLOC,
        )
        .map_err(Error::Map)?;
        let peers = Map::create(
            bpf::MAP_LRU_HASH,
            "skiff_peers",
            program::ENTRY,
            program::ENTRY,
            MAX_PEERS,
            0,
        )
        .map_err(Error::Map)?;
        let attach = |hook, name, insns: Vec<u64>| {
            let prog =
                bpf::load(name, hook, &insns).map_err(|source| Error::Load { hook, source })?;
            bpf::attach(&prog, &dir, hook).map_err(|source| Error::Attach { hook, source })
        };
        let links = [
            attach(
                Hook::Connect4,
                "skiff_connect4",
                program::connect4(services.raw_fd(), peers.raw_fd()),
            )?,
            attach(
                Hook::GetPeerName4,
                "skiff_peername4",
                program::getpeername4(peers.raw_fd()),
            )?,
        ];
        tracing::info!(cgroup = %path.display(), "TCP Services from local pods are balanced at connect()");
        Ok(SocketBalancer {
            services,
            node: node.to_owned(),
            state: Mutex::new(State::default()),
            _peers: peers,
            _links: links,
        })
    }

    /// Frontends (TCP ClusterIP ports) balanced at connect.
    pub fn frontends(&self) -> usize {
        self.lock().programmed.values().map(Vec::len).sum()
    }

    /// Connections balanced at connect, per Service.
    pub fn new_flows(&self) -> BTreeMap<ServiceKey, u64> {
        let state = self.lock();
        let mut rows: BTreeMap<ServiceKey, u64> = state
            .carried
            .iter()
            .map(|(key, n)| (key.clone(), *n))
            .collect();
        for (key, entries) in &state.programmed {
            let live: u64 = entries.iter().map(|e| self.connections(e.ip, e.port)).sum();
            *rows.entry(key.clone()).or_default() += live;
        }
        rows
    }

    /// Brings one Service's frontends in line with `spec` (`None`: gone).
    pub fn update(&self, key: &ServiceKey, spec: Option<&ServiceSpec>) {
        let new = spec.map(|s| entries(s, &self.node)).unwrap_or_default();
        let mut state = self.lock();
        let old = state.programmed.remove(key).unwrap_or_default();
        let mut kept = Vec::new();
        let mut counted = 0;
        for entry in &new {
            let before = old
                .iter()
                .find(|o| o.ip == entry.ip && o.port == entry.port);
            if before == Some(entry) {
                kept.push(entry.clone());
                continue;
            }
            let before_len = before.map_or(0, |o| o.targets.len());
            if before.is_some() {
                counted += self.connections(entry.ip, entry.port);
            }
            match self.write(entry, before_len) {
                Ok(()) => kept.push(entry.clone()),
                Err(e) => {
                    tracing::warn!(service = %key, error = %e, "cannot balance at connect; nftables keeps the port");
                    self.erase(entry.ip, entry.port, before_len.max(entry.targets.len()));
                }
            }
        }
        for gone in old
            .iter()
            .filter(|o| !new.iter().any(|n| n.ip == o.ip && n.port == o.port))
        {
            counted += self.connections(gone.ip, gone.port);
            self.erase(gone.ip, gone.port, gone.targets.len());
        }
        if spec.is_none() {
            state.carried.remove(key);
        } else if counted > 0 {
            *state.carried.entry(key.clone()).or_default() += counted;
        }
        if !kept.is_empty() {
            state.programmed.insert(key.clone(), kept);
        }
    }

    /// Writes `entry` over a frontend that had `before` endpoints.
    fn write(&self, entry: &Entry, before: usize) -> io::Result<()> {
        for (slot, (ip, port)) in (1u16..).zip(&entry.targets) {
            self.services.set(
                &program::service_key(entry.ip, entry.port, slot),
                &program::endpoint_value(*ip, *port),
            )?;
        }
        let count = entry.targets.len() as u16;
        self.services.set(
            &program::service_key(entry.ip, entry.port, 0),
            &program::count_value(count),
        )?;
        for slot in usize::from(count) + 1..=before {
            self.services
                .remove(&program::service_key(entry.ip, entry.port, slot as u16))?;
        }
        Ok(())
    }

    /// Removes a frontend with up to `slots` endpoints, count first.
    fn erase(&self, ip: Ipv4Addr, port: u16, slots: usize) {
        for slot in 0..=slots {
            if let Err(e) = self
                .services
                .remove(&program::service_key(ip, port, slot as u16))
            {
                tracing::warn!(%ip, port, error = %e, "removing a connect-time frontend");
            }
        }
    }

    /// The frontend's connection counter (0 when it cannot be read).
    fn connections(&self, ip: Ipv4Addr, port: u16) -> u64 {
        let mut value = [0u8; program::SERVICE_VALUE as usize];
        match self
            .services
            .get(&program::service_key(ip, port, 0), &mut value)
        {
            Ok(true) => program::connections(&value),
            _ => 0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// The TCP ClusterIP frontends of `spec` with their endpoints (at most
/// a slot's range of them).
fn entries(spec: &ServiceSpec, node: &str) -> Vec<Entry> {
    let mut out = Vec::new();
    for rule in port_rules(spec, node) {
        if rule.protocol != Protocol::Tcp {
            continue;
        }
        let mut targets = rule.targets;
        targets.truncate(usize::from(u16::MAX));
        for frontend in rule.frontends {
            if let Frontend::Cluster(ip, port) = frontend {
                out.push(Entry {
                    ip,
                    port,
                    targets: targets.clone(),
                });
            }
        }
    }
    out
}

/// Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup` on a
/// unified system, `/sys/fs/cgroup/unified` on a hybrid one.
fn cgroup2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|root| root.join("cgroup.controllers").exists())
}

#[cfg(test)]
mod tests;
