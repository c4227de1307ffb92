//! The Service table: the control side (`ServiceTable`, fed by the API
//! watch) keeps one entry set per Service and publishes frontends to the
//! packet loops (`Published`). Frontends are spread over shards, each an
//! immutable map behind an `ArcSwap`; a change of one Service copies only
//! the shards its frontends live in, so its cost does not grow with the
//! number of Services. Packet loops read without locks; every change bumps
//! a generation so loops know to re-check the flows they track.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use super::hash::WordHasherBuilder;
use super::maglev::Maglev;
use super::model::{ServiceKey, ServicePort, ServiceSpec};
use super::translate::{TranslateError, translate};

/// Enough shards that one holds few entries at 10,000 Services.
const SHARDS: usize = 256;

/// What the table needs to know about the node it runs on.
#[derive(Debug, Clone)]
pub struct TableConfig {
    /// This node's name, to tell its own endpoints (`externalTrafficPolicy:
    /// Local`) from the others.
    pub node_name: String,
    /// Addresses on which NodePort and LoadBalancer Services are served.
    pub node_ips: Vec<Ipv4Addr>,
}

/// How a packet reached a Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// Counters of one Service, kept across its updates.
#[derive(Debug, Default)]
pub struct ServiceCounters {
    pub new_flows: AtomicU64,
}

/// An address, port and protocol a Service answers on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrontendKey {
    pub ip: u32,
    pub port: u16,
    pub protocol: u8,
}

impl FrontendKey {
    /// The marker that `ip` is some Service's cluster IP.
    fn vip(ip: u32) -> Self {
        FrontendKey {
            ip,
            port: 0,
            protocol: 0,
        }
    }

    fn packed(self) -> u64 {
        (u64::from(self.ip) << 24) | (u64::from(self.port) << 8) | u64::from(self.protocol)
    }

    /// Bits the shard maps' own hashing does not use (hashbrown takes the
    /// low bits for the bucket and the top seven for its tags), so keys of
    /// one shard still spread inside it.
    fn shard(self) -> usize {
        (WordHasherBuilder.hash_one(self) >> 32) as usize % SHARDS
    }
}

impl Hash for FrontendKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.packed());
    }
}

/// The per-Service facts the packet loop needs.
#[derive(Debug)]
pub(crate) struct ServiceInfo {
    pub key: ServiceKey,
    pub affinity_timeout_ms: Option<u64>,
    pub external_local: bool,
    pub counters: Arc<ServiceCounters>,
}

/// One endpoint of a Service port, with what it may receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BackendEntry {
    pub ip: u32,
    pub port: u16,
    /// Gets new flows from cluster-wide traffic.
    pub for_cluster: bool,
    /// Gets new flows under `externalTrafficPolicy: Local`.
    pub for_local: bool,
}

/// One Service port as published: endpoints and their Maglev tables.
#[derive(Debug)]
pub(crate) struct PortState {
    pub service: Arc<ServiceInfo>,
    /// Sorted by (ip, port): flows re-check their endpoint by binary search.
    pub backends: Box<[BackendEntry]>,
    pub cluster: Maglev,
    pub local: Maglev,
}

/// A published frontend: the port state it leads to and how.
#[derive(Debug, Clone)]
pub(crate) struct Frontend {
    pub kind: FrontendKind,
    pub port: Arc<PortState>,
}

impl Frontend {
    /// Node-facing traffic under `externalTrafficPolicy: Local`.
    pub fn local_only(&self) -> bool {
        self.kind != FrontendKind::ClusterIp && self.port.service.external_local
    }

    pub fn maglev(&self) -> &Maglev {
        if self.local_only() {
            &self.port.local
        } else {
            &self.port.cluster
        }
    }

    /// May `index` get a new flow through this frontend?
    pub fn usable(&self, index: usize) -> bool {
        self.port.backends.get(index).is_some_and(|b| {
            if self.local_only() {
                b.for_local
            } else {
                b.for_cluster
            }
        })
    }

    /// The index of an endpoint, whatever its conditions.
    pub fn find(&self, ip: u32, port: u16) -> Option<usize> {
        self.port
            .backends
            .binary_search_by_key(&(ip, port), |b| (b.ip, b.port))
            .ok()
    }
}

#[derive(Debug, Clone)]
enum Slot {
    Frontend(Frontend),
    Vip(Arc<ServiceInfo>),
}

impl Slot {
    fn owner(&self) -> &ServiceKey {
        match self {
            Slot::Frontend(f) => &f.port.service.key,
            Slot::Vip(info) => &info.key,
        }
    }
}

type Shard = HashMap<FrontendKey, Slot, WordHasherBuilder>;

/// The frontends as the packet loops see them.
pub struct Published {
    shards: Box<[ArcSwap<Shard>]>,
    generation: AtomicU64,
}

/// What a destination is.
pub(crate) enum Lookup {
    Frontend(Frontend),
    /// A cluster IP, but no Service port there.
    UnknownPort,
    Miss,
}

impl Published {
    fn new() -> Self {
        Published {
            shards: (0..SHARDS).map(|_| ArcSwap::default()).collect(),
            generation: AtomicU64::new(0),
        }
    }

    /// Bumped after every change; flows checked under an older generation
    /// re-check their endpoint.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub(crate) fn frontend(&self, key: FrontendKey) -> Option<Frontend> {
        match self.shards[key.shard()].load().get(&key) {
            Some(Slot::Frontend(f)) => Some(f.clone()),
            _ => None,
        }
    }

    pub(crate) fn lookup(&self, key: FrontendKey) -> Lookup {
        if let Some(frontend) = self.frontend(key) {
            return Lookup::Frontend(frontend);
        }
        if self.is_vip(key.ip) {
            Lookup::UnknownPort
        } else {
            Lookup::Miss
        }
    }

    pub(crate) fn is_vip(&self, ip: u32) -> bool {
        let key = FrontendKey::vip(ip);
        self.shards[key.shard()].load().contains_key(&key)
    }
}

/// Per Service: the keys it owns, its counters and its LoadBalancer ports.
#[derive(Debug)]
struct Installed {
    keys: Vec<FrontendKey>,
    counters: Arc<ServiceCounters>,
    load_balancer: Vec<LoadBalancerPort>,
}

/// A LoadBalancer Service's port on the node addresses: (IP protocol
/// number, port).
pub type LoadBalancerPort = (u8, u16);

/// The control side of the table: owned by the task that watches Services
/// and EndpointSlices.
pub struct ServiceTable {
    config: TableConfig,
    published: Arc<Published>,
    installed: HashMap<ServiceKey, Installed>,
    /// How many installed Services use each LoadBalancer port.
    load_balancer: BTreeMap<LoadBalancerPort, usize>,
}

impl ServiceTable {
    pub fn new(config: TableConfig) -> Self {
        ServiceTable {
            config,
            published: Arc::new(Published::new()),
            installed: HashMap::new(),
            load_balancer: BTreeMap::new(),
        }
    }

    /// The published side, for the packet loops.
    pub fn published(&self) -> Arc<Published> {
        self.published.clone()
    }

    /// Applies a Service and its EndpointSlices: installs or replaces its
    /// entries, or removes them when the data plane has nothing to serve.
    /// Returns what was installed.
    pub fn apply(
        &mut self,
        service: &Service,
        slices: &[EndpointSlice],
    ) -> Result<Option<ServiceSpec>, TranslateError> {
        let spec = translate(service, slices)?;
        match &spec {
            Some(spec) => self.upsert(spec),
            None => {
                if let (Some(ns), Some(name)) =
                    (&service.metadata.namespace, &service.metadata.name)
                {
                    self.remove(&ServiceKey::new(ns.clone(), name.clone()));
                }
            }
        }
        Ok(spec)
    }

    /// Installs or replaces one Service's entries.
    pub fn upsert(&mut self, spec: &ServiceSpec) {
        self.upsert_many(std::slice::from_ref(spec));
    }

    /// Installs or replaces several Services, copying each touched shard
    /// once (the initial sync).
    pub fn upsert_many(&mut self, specs: &[ServiceSpec]) {
        let mut changes = Vec::with_capacity(specs.len());
        for spec in specs {
            let old = self.installed.remove(&spec.key);
            let counters = old.as_ref().map(|o| o.counters.clone()).unwrap_or_default();
            let entries = self.entries(spec, counters.clone());
            let load_balancer = if spec.load_balancer {
                spec.ports
                    .iter()
                    .map(|p| (p.protocol.number(), p.port))
                    .collect()
            } else {
                Vec::new()
            };
            let (old_keys, old_load_balancer) =
                old.map(|o| (o.keys, o.load_balancer)).unwrap_or_default();
            changes.push(Change {
                key: spec.key.clone(),
                old_keys,
                old_load_balancer,
                entries,
                counters,
                load_balancer,
            });
        }
        self.publish(changes);
    }

    /// Removes a Service; true if it was installed.
    pub fn remove(&mut self, key: &ServiceKey) -> bool {
        let Some(old) = self.installed.remove(key) else {
            return false;
        };
        self.publish(vec![Change {
            key: key.clone(),
            old_keys: old.keys,
            old_load_balancer: old.load_balancer,
            entries: Vec::new(),
            counters: old.counters,
            load_balancer: Vec::new(),
        }]);
        self.installed.remove(key);
        true
    }

    pub fn len(&self) -> usize {
        self.installed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.installed.is_empty()
    }

    /// The ports LoadBalancer Services are served on at the node addresses,
    /// which the node must route into the device.
    pub fn load_balancer_ports(&self) -> BTreeSet<LoadBalancerPort> {
        self.load_balancer.keys().copied().collect()
    }

    /// New flows per Service, for `/metrics`.
    pub fn new_flows(&self) -> impl Iterator<Item = (&ServiceKey, u64)> {
        self.installed
            .iter()
            .map(|(k, i)| (k, i.counters.new_flows.load(Ordering::Relaxed)))
    }

    /// The frontends and port states of one Service.
    fn entries(
        &self,
        spec: &ServiceSpec,
        counters: Arc<ServiceCounters>,
    ) -> Vec<(FrontendKey, Slot)> {
        let info = Arc::new(ServiceInfo {
            key: spec.key.clone(),
            affinity_timeout_ms: spec.affinity_timeout_secs.map(|s| u64::from(s) * 1000),
            external_local: spec.external_local,
            counters,
        });
        let mut entries = Vec::new();
        for vip in &spec.cluster_ips {
            entries.push((FrontendKey::vip(u32::from(*vip)), Slot::Vip(info.clone())));
        }
        for port in &spec.ports {
            let state = Arc::new(self.port_state(&info, port));
            let protocol = port.protocol.number();
            let mut add = |ip: Ipv4Addr, number: u16, kind: FrontendKind| {
                let key = FrontendKey {
                    ip: u32::from(ip),
                    port: number,
                    protocol,
                };
                let frontend = Frontend {
                    kind,
                    port: state.clone(),
                };
                entries.push((key, Slot::Frontend(frontend)));
            };
            for vip in &spec.cluster_ips {
                add(*vip, port.port, FrontendKind::ClusterIp);
            }
            for node_ip in &self.config.node_ips {
                if let Some(node_port) = port.node_port {
                    add(*node_ip, node_port, FrontendKind::NodePort);
                }
                if spec.load_balancer {
                    add(*node_ip, port.port, FrontendKind::LoadBalancer);
                }
            }
        }
        entries
    }

    /// The endpoints with what each may receive (see
    /// [`ServicePort::eligible`]) and their Maglev tables.
    fn port_state(&self, info: &Arc<ServiceInfo>, port: &ServicePort) -> PortState {
        let (cluster, local) = (
            port.eligible(None),
            port.eligible(Some(self.config.node_name.as_str())),
        );
        // The translator sorts backends; sort again so a hand-built spec
        // cannot break the binary search.
        let mut backends: Vec<BackendEntry> = port
            .backends
            .iter()
            .zip(cluster.iter().zip(&local))
            .map(|(b, (&c, &l))| BackendEntry {
                ip: u32::from(b.addr),
                port: b.port,
                for_cluster: c,
                for_local: l,
            })
            .collect();
        backends.sort_unstable_by_key(|b| (b.ip, b.port));
        backends.dedup_by_key(|b| (b.ip, b.port));
        backends.truncate(usize::from(u16::MAX));
        let table = |pick: fn(&BackendEntry) -> bool| {
            let chosen: Vec<(u16, u32, u16)> = backends
                .iter()
                .enumerate()
                .filter(|(_, b)| pick(b))
                .map(|(i, b)| (i as u16, b.ip, b.port))
                .collect();
            Maglev::build(&chosen)
        };
        PortState {
            service: info.clone(),
            cluster: table(|b| b.for_cluster),
            local: table(|b| b.for_local),
            backends: backends.into_boxed_slice(),
        }
    }

    /// Publishes changes: each touched shard is copied once, edited and
    /// swapped in; then the generation moves.
    fn publish(&mut self, changes: Vec<Change>) {
        let mut touched: Vec<usize> = changes
            .iter()
            .flat_map(|c| {
                c.old_keys
                    .iter()
                    .copied()
                    .chain(c.entries.iter().map(|(k, _)| *k))
            })
            .map(FrontendKey::shard)
            .collect();
        touched.sort_unstable();
        touched.dedup();
        let mut owned: HashMap<&ServiceKey, Vec<FrontendKey>> = HashMap::new();
        for shard_index in touched {
            let shard = &self.published.shards[shard_index];
            let mut map: Shard = (**shard.load()).clone();
            for change in &changes {
                for key in change.old_keys.iter().filter(|k| k.shard() == shard_index) {
                    if map.get(key).is_some_and(|s| s.owner() == &change.key) {
                        map.remove(key);
                    }
                }
            }
            for change in &changes {
                for (key, slot) in change
                    .entries
                    .iter()
                    .filter(|(k, _)| k.shard() == shard_index)
                {
                    // First come, first served: a key another Service holds
                    // (a NodePort or LoadBalancer port clash) stays its.
                    if map.get(key).is_some_and(|s| s.owner() != &change.key) {
                        continue;
                    }
                    map.insert(*key, slot.clone());
                    owned.entry(&change.key).or_default().push(*key);
                }
            }
            shard.store(Arc::new(map));
        }
        self.published.generation.fetch_add(1, Ordering::AcqRel);
        let owned: HashMap<ServiceKey, Vec<FrontendKey>> =
            owned.into_iter().map(|(k, v)| (k.clone(), v)).collect();
        for change in changes {
            for port in &change.old_load_balancer {
                if let Some(users) = self.load_balancer.get_mut(port) {
                    *users -= 1;
                    if *users == 0 {
                        self.load_balancer.remove(port);
                    }
                }
            }
            if change.entries.is_empty() {
                continue;
            }
            for port in &change.load_balancer {
                *self.load_balancer.entry(*port).or_default() += 1;
            }
            let keys = owned.get(&change.key).cloned().unwrap_or_default();
            self.installed.insert(
                change.key,
                Installed {
                    keys,
                    counters: change.counters,
                    load_balancer: change.load_balancer,
                },
            );
        }
    }
}

struct Change {
    key: ServiceKey,
    old_keys: Vec<FrontendKey>,
    old_load_balancer: Vec<LoadBalancerPort>,
    entries: Vec<(FrontendKey, Slot)>,
    counters: Arc<ServiceCounters>,
    load_balancer: Vec<LoadBalancerPort>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::model::{Backend, Protocol};

    fn config() -> TableConfig {
        TableConfig {
            node_name: "a".into(),
            node_ips: vec![Ipv4Addr::new(192, 168, 5, 10)],
        }
    }

    fn spec(i: u32, node_port: Option<u16>) -> ServiceSpec {
        let backend = |n: u32| Backend {
            addr: Ipv4Addr::from(0x0a2a_0000 + i * 8 + n),
            port: 8080,
            ready: true,
            serving: true,
            terminating: false,
            node: None,
        };
        ServiceSpec {
            key: ServiceKey::new("ns", format!("svc-{i}")),
            cluster_ips: vec![Ipv4Addr::from(0x0a2b_0000 + i)],
            ports: vec![ServicePort {
                name: String::new(),
                protocol: Protocol::Tcp,
                port: 80,
                node_port,
                backends: (0..5).map(backend).collect(),
            }],
            load_balancer: false,
            external_local: false,
            affinity_timeout_secs: None,
        }
    }

    fn shard_pointers(table: &ServiceTable) -> Vec<*const Shard> {
        table
            .published
            .shards
            .iter()
            .map(|s| Arc::as_ptr(&s.load_full()))
            .collect()
    }

    #[test]
    fn one_change_copies_only_its_own_shards() {
        let mut table = ServiceTable::new(config());
        let specs: Vec<_> = (0..2000).map(|i| spec(i, None)).collect();
        table.upsert_many(&specs);
        let before = shard_pointers(&table);
        let generation = table.published.generation();
        let mut changed = spec(7, None);
        changed.ports[0].backends.pop();
        table.upsert(&changed);
        let after = shard_pointers(&table);
        let copied = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        // Service 7 owns two keys (its VIP marker and its port).
        assert!((1..=2).contains(&copied), "{copied} shards copied");
        assert_eq!(table.published.generation(), generation + 1);
        let key = |i: u32| FrontendKey {
            ip: 0x0a2b_0000 + i,
            port: 80,
            protocol: 6,
        };
        let seven = table.published.frontend(key(7)).expect("still served");
        assert_eq!(seven.port.backends.len(), 4);
        assert_eq!(
            table
                .published
                .frontend(key(8))
                .expect("untouched")
                .port
                .backends
                .len(),
            5
        );
    }

    #[test]
    fn a_node_port_clash_is_first_come_first_served() {
        let mut table = ServiceTable::new(config());
        table.upsert(&spec(1, Some(30000)));
        table.upsert(&spec(2, Some(30000)));
        let node_port = FrontendKey {
            ip: u32::from(Ipv4Addr::new(192, 168, 5, 10)),
            port: 30000,
            protocol: 6,
        };
        let owner = |t: &ServiceTable| {
            t.published
                .frontend(node_port)
                .map(|f| f.port.service.key.clone())
        };
        assert_eq!(owner(&table), Some(ServiceKey::new("ns", "svc-1")));
        // The loser's own update does not take the port, nor does removing
        // it free the winner's.
        table.upsert(&spec(2, Some(30000)));
        assert!(table.remove(&ServiceKey::new("ns", "svc-2")));
        assert_eq!(owner(&table), Some(ServiceKey::new("ns", "svc-1")));
        assert!(table.remove(&ServiceKey::new("ns", "svc-1")));
        assert_eq!(owner(&table), None);
        assert!(!table.published.is_vip(0x0a2b_0001));
    }
}
