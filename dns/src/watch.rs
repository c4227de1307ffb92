//! Feeds the zone from the Kubernetes API: watches of Services,
//! EndpointSlices and Pods, reduced to what DNS needs, and after each
//! burst of events the Services they touched are re-rendered and a new
//! index published.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Api, Client, ResourceExt};
// Links the allocator `mi_collect` (below) belongs to.
use libmimalloc_sys as _;

use crate::index::{Published, ShardMap};
use crate::objects::{EndpointSlice, Pod, Service};
use crate::records::{self, PodInfo, ServiceInfo, ServiceKind, SliceInfo};
use crate::zone::{Owner, ZoneBuilder};

/// Most events applied before a publish, so a long burst still shows up.
const MAX_BURST: usize = 4096;

/// How long the watches stay quiet after a publish before the shards are
/// packed (`index::compact`) and the memory the burst freed is given back
/// to the system.
const SETTLE: Duration = Duration::from_millis(500);

/// How long after a compaction's publish the freed memory is given
/// back: longer than an idle UDP worker takes to let go of the snapshot
/// it holds (`udp::STOP_POLL`), whose shards are then freed.
const RELEASE: Duration = Duration::from_millis(300);

/// Where the watch is since the last burst of changes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Settle {
    /// Nothing to do until the next event.
    Quiet,
    /// Changes applied; once quiet for `SETTLE`, the shards are packed.
    Changed,
    /// Packed and published; once the old snapshot is let go of
    /// (`RELEASE`), the freed memory is returned.
    Compacted,
}

/// (namespace, name); boxed, as the state holds one per object.
type Key = (Box<str>, Box<str>);

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Kind {
    Service,
    Slice,
    Pod,
}

enum Ev {
    Service(Box<Result<Event<Service>, watcher::Error>>),
    Slice(Box<Result<Event<EndpointSlice>, watcher::Error>>),
    Pod(Box<Result<Event<Pod>, watcher::Error>>),
}

/// Watches until the streams end (they do not, short of a panic).
pub async fn run(client: Client, mut builder: ZoneBuilder, published: Arc<Published>) {
    let config = watcher::Config::default();
    let services = watcher(Api::<Service>::all(client.clone()), config.clone())
        .default_backoff()
        .map(|ev| Ev::Service(Box::new(ev)));
    let slices = watcher(Api::<EndpointSlice>::all(client.clone()), config.clone())
        .default_backoff()
        .map(|ev| Ev::Slice(Box::new(ev)));
    let pods = watcher(Api::<Pod>::all(client), config)
        .default_backoff()
        .map(|ev| Ev::Pod(Box::new(ev)));
    let events = futures::stream::select(services, futures::stream::select(slices, pods));
    let mut events = std::pin::pin!(events);
    let mut state = ClusterState::default();
    let mut settle = Settle::Quiet;
    loop {
        let wait = match settle {
            Settle::Quiet => None,
            Settle::Changed => Some(SETTLE),
            Settle::Compacted => Some(RELEASE),
        };
        let ev = match wait {
            None => events.next().await,
            Some(wait) => match tokio::time::timeout(wait, events.next()).await {
                Ok(ev) => ev,
                Err(_) if settle == Settle::Changed => {
                    if state.compact(&mut builder) {
                        builder.publish(&published);
                    }
                    settle = Settle::Compacted;
                    continue;
                }
                Err(_) => {
                    return_freed_memory();
                    // The API client's connections run on the runtime's
                    // workers, which allocated what they read.
                    tokio::spawn(async { return_freed_memory() });
                    settle = Settle::Quiet;
                    continue;
                }
            },
        };
        let Some(ev) = ev else {
            break;
        };
        settle = Settle::Changed;
        state.handle(ev);
        let mut burst = 1;
        while burst < MAX_BURST {
            match events.next().now_or_never() {
                Some(Some(ev)) => state.handle(ev),
                _ => break,
            }
            burst += 1;
        }
        if state.all_synced() {
            builder.set_ready();
        }
        state.flush(&mut builder);
        builder.publish(&published);
    }
}

/// Has the allocator give freed memory back now. A burst of changes
/// (the first listing, a rollout) frees the snapshots and decoded objects
/// it went through; mimalloc returns such pages only after a delay and
/// only while it keeps allocating, so an idle DNS server would otherwise
/// hold them for good.
fn return_freed_memory() {
    // The shards' own heap first, so that the pages it frees are among
    // those returned.
    crate::index::collect_shard_memory();
    // SAFETY: mi_collect only walks the allocator's own structures; any
    // thread may call it at any time. In a process whose global allocator
    // is not mimalloc it finds nothing to collect.
    unsafe { mi_collect(true) }
}

// The binding libmimalloc-sys offers only with its `extended` feature.
unsafe extern "C" {
    fn mi_collect(force: bool);
}

/// What the watches have seen, reduced to DNS's needs.
#[derive(Default)]
pub struct ClusterState {
    /// Every Service, by `<namespace>/<name>`, compactly: most are
    /// ClusterIP Services the builder already holds the records of.
    services: ShardMap,
    /// What rendering needs: headless Services keep their info (their
    /// records follow slices and pods); the others only until their next
    /// flush, as nothing else changes their records.
    infos: HashMap<Key, Box<ServiceInfo>>,
    slices: HashMap<Key, SliceInfo>,
    slices_by_service: HashMap<Key, Names>,
    pods: HashMap<Key, PodInfo>,
    pods_by_subdomain: HashMap<Key, Names>,
    /// Keys seen during a relist, per kind; absent when not relisting.
    relisting: HashMap<Kind, HashSet<Key>>,
    synced: HashSet<Kind>,
    /// Services whose records must be rendered again.
    dirty: HashSet<Key>,
}

impl ClusterState {
    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Service(ev) => self.event(Kind::Service, *ev, |s, key, svc| {
                s.set_service(key, svc.and_then(ServiceInfo::from_service))
            }),
            Ev::Slice(ev) => self.event(Kind::Slice, *ev, |s, key, slice| {
                s.set_slice(key, slice.and_then(SliceInfo::from_slice))
            }),
            Ev::Pod(ev) => self.event(Kind::Pod, *ev, |s, key, pod| {
                s.set_pod(key, pod.and_then(PodInfo::from_pod))
            }),
        }
    }

    fn event<K: kube::Resource>(
        &mut self,
        kind: Kind,
        ev: Result<Event<K>, watcher::Error>,
        mut apply: impl FnMut(&mut Self, Key, Option<&K>),
    ) {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(?kind, error = %e, "DNS watch failed; retrying");
                return;
            }
        };
        match ev {
            Event::Init => {
                self.relisting.insert(kind, HashSet::new());
            }
            Event::InitApply(obj) => {
                let key = key_of(&obj);
                if let Some(seen) = self.relisting.get_mut(&kind) {
                    seen.insert(key.clone());
                }
                apply(self, key, Some(&obj));
            }
            Event::InitDone => {
                let seen = self.relisting.remove(&kind).unwrap_or_default();
                for key in self.keys(kind) {
                    if !seen.contains(&key) {
                        apply(self, key, None);
                    }
                }
                self.synced.insert(kind);
            }
            Event::Apply(obj) => apply(self, key_of(&obj), Some(&obj)),
            Event::Delete(obj) => apply(self, key_of(&obj), None),
        }
    }

    fn keys(&self, kind: Kind) -> Vec<Key> {
        match kind {
            Kind::Service => self
                .services
                .iter()
                .filter_map(|(k, _)| {
                    let (ns, name) = std::str::from_utf8(k).ok()?.split_once('/')?;
                    Some((ns.into(), name.into()))
                })
                .collect(),
            Kind::Slice => self.slices.keys().cloned().collect(),
            Kind::Pod => self.pods.keys().cloned().collect(),
        }
    }

    fn all_synced(&self) -> bool {
        self.synced.len() == 3
    }

    pub fn set_service(&mut self, key: Key, info: Option<ServiceInfo>) {
        let id = service_id(&key);
        let changed = match info {
            Some(info) => {
                self.services.set(&id, Some(&[]));
                let old = self.infos.insert(key.clone(), Box::new(info.clone()));
                old.is_none_or(|old| *old != info)
            }
            None => {
                self.infos.remove(&key);
                let known = self.services.get(&id).is_some();
                self.services.set(&id, None);
                known
            }
        };
        if changed {
            self.dirty.insert(key);
        }
    }

    pub fn set_slice(&mut self, key: Key, info: Option<SliceInfo>) {
        let (ns, name) = key.clone();
        let old = match &info {
            Some(info) => self.slices.insert(key.clone(), info.clone()),
            None => self.slices.remove(&key),
        };
        if old == info {
            return;
        }
        if let Some(old) = old {
            let svc = (ns.clone(), old.service.into());
            if let Some(set) = self.slices_by_service.get_mut(&svc) {
                set.remove(&name[..]);
                if set.is_empty() {
                    self.slices_by_service.remove(&svc);
                }
            }
            self.dirty.insert(svc);
        }
        if let Some(info) = info {
            let svc = (ns, info.service.into());
            self.slices_by_service
                .entry(svc.clone())
                .or_default()
                .insert(name);
            self.dirty.insert(svc);
        }
    }

    pub fn set_pod(&mut self, key: Key, info: Option<PodInfo>) {
        let (ns, name) = key.clone();
        let old = match &info {
            Some(info) => self.pods.insert(key.clone(), info.clone()),
            None => self.pods.remove(&key),
        };
        if old == info {
            return;
        }
        if let Some(old) = old {
            let svc = (ns.clone(), old.subdomain.into());
            if let Some(set) = self.pods_by_subdomain.get_mut(&svc) {
                set.remove(&name[..]);
                if set.is_empty() {
                    self.pods_by_subdomain.remove(&svc);
                }
            }
            self.dirty.insert(svc);
        }
        if let Some(info) = info {
            let svc = (ns, info.subdomain.into());
            self.pods_by_subdomain
                .entry(svc.clone())
                .or_default()
                .insert(name);
            self.dirty.insert(svc);
        }
    }

    /// Packs the zone's shards and this state's (`ZoneBuilder::compact_with`)
    /// once changes have settled; true when the builder's index changed
    /// and should be published.
    pub fn compact(&mut self, builder: &mut ZoneBuilder) -> bool {
        builder.compact_with(&mut self.services)
    }

    /// Renders the records of every Service touched since the last flush.
    pub fn flush(&mut self, builder: &mut ZoneBuilder) {
        for key in std::mem::take(&mut self.dirty) {
            let (ns, name) = &key;
            let known = self.services.get(&service_id(&key)).is_some();
            let records = match self.infos.get(&key) {
                // A Service whose records nothing but itself changes, and
                // that has not changed since they were rendered.
                None if known => continue,
                Some(svc) => {
                    let slices = self
                        .slices_by_service
                        .get(&key)
                        .into_iter()
                        .flatten()
                        .filter_map(|s| self.slices.get(&(ns.clone(), s.clone())));
                    let pods = self
                        .pods_by_subdomain
                        .get(&key)
                        .into_iter()
                        .flatten()
                        .filter_map(|p| self.pods.get(&(ns.clone(), p.clone())));
                    records::service_records(builder.apex(), ns, name, svc, slices, pods)
                }
                None => Vec::new(),
            };
            if self
                .infos
                .get(&key)
                .is_some_and(|i| i.kind != ServiceKind::Headless)
            {
                self.infos.remove(&key);
            }
            builder.set_owner(Owner::Service(ns.to_string(), name.to_string()), records);
        }
    }
}

/// Object names in one namespace, sorted; usually one or a few, for
/// which a vector costs a fraction of a tree's node.
#[derive(Default)]
struct Names(Vec<Box<str>>);

impl Names {
    fn insert(&mut self, name: Box<str>) {
        if let Err(at) = self.0.binary_search(&name) {
            self.0.insert(at, name);
        }
    }

    fn remove(&mut self, name: &str) {
        if let Ok(at) = self.0.binary_search_by(|n| (**n).cmp(name)) {
            self.0.remove(at);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'a> IntoIterator for &'a Names {
    type Item = &'a Box<str>;
    type IntoIter = std::slice::Iter<'a, Box<str>>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

/// A Service's entry in `ClusterState::services` (namespace and name are
/// DNS labels, so it fits a `ShardMap` name).
fn service_id((ns, name): &Key) -> Vec<u8> {
    format!("{ns}/{name}").into_bytes()
}

fn key_of<K: kube::Resource>(obj: &K) -> Key {
    (
        obj.namespace().unwrap_or_default().into(),
        obj.name_any().into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{EndpointInfo, PortInfo, ServiceKind};

    fn key(name: &str) -> Key {
        ("default".into(), name.into())
    }

    fn nodes(builder: &mut ZoneBuilder) -> usize {
        builder.build().len()
    }

    #[test]
    fn slices_re_render_headless_services_and_leave_the_others() {
        let mut builder = crate::tests::builder();
        let mut state = ClusterState::default();
        let empty = nodes(&mut builder);
        let cluster_ip = ServiceInfo {
            kind: ServiceKind::ClusterIp(vec!["10.43.0.5".parse().unwrap()]),
            ports: vec![],
            publish_not_ready: false,
        };
        state.set_service(key("web"), Some(cluster_ip.clone()));
        state.set_service(
            key("db"),
            Some(ServiceInfo {
                kind: ServiceKind::Headless,
                ..cluster_ip.clone()
            }),
        );
        state.flush(&mut builder);
        // web, its PTR name and default.svc.
        assert_eq!(nodes(&mut builder), empty + 3);
        let slice = |service: &str, ip: &str| SliceInfo {
            service: service.into(),
            ports: vec![PortInfo {
                name: "http".into(),
                protocol: "tcp".into(),
                port: 80,
            }],
            endpoints: vec![EndpointInfo {
                addresses: vec![ip.parse().unwrap()],
                hostname: None,
                ready: true,
            }],
        };
        // A slice of the ClusterIP Service changes nothing; one of the
        // headless Service gives it names.
        state.set_slice(key("web-1"), Some(slice("web", "10.42.0.7")));
        state.set_slice(key("db-1"), Some(slice("db", "10.42.0.8")));
        state.flush(&mut builder);
        let index = builder.build();
        let name = |n: &str| crate::wire::encode_name(n).unwrap();
        assert!(index.node(&name("web.default.svc.cluster.local")).is_some());
        assert!(index.node(&name("db.default.svc.cluster.local")).is_some());
        assert!(
            index
                .node(&name("10-42-0-8.db.default.svc.cluster.local"))
                .is_some()
        );
        assert!(
            index
                .node(&name("10-42-0-7.web.default.svc.cluster.local"))
                .is_none()
        );
        // The ClusterIP Service changes, then goes; the headless one too.
        state.set_service(
            key("web"),
            Some(ServiceInfo {
                kind: ServiceKind::ClusterIp(vec!["10.43.0.6".parse().unwrap()]),
                ..cluster_ip
            }),
        );
        state.flush(&mut builder);
        let index = builder.build();
        assert!(index.node(&name("5.0.43.10.in-addr.arpa")).is_none());
        assert!(index.node(&name("6.0.43.10.in-addr.arpa")).is_some());
        state.set_service(key("web"), None);
        state.set_service(key("db"), None);
        state.flush(&mut builder);
        assert_eq!(nodes(&mut builder), empty);
    }

    #[test]
    fn services_are_listed_and_removed_by_key() {
        let mut builder = crate::tests::builder();
        let mut state = ClusterState::default();
        let empty = nodes(&mut builder);
        let svc = |ip: &str| ServiceInfo {
            kind: ServiceKind::ClusterIp(vec![ip.parse().unwrap()]),
            ports: vec![],
            publish_not_ready: false,
        };
        state.set_service(key("a"), Some(svc("10.43.0.5")));
        state.set_service(("team".into(), "b".into()), Some(svc("10.43.0.6")));
        state.flush(&mut builder);
        let mut keys = state.keys(Kind::Service);
        keys.sort();
        assert_eq!(
            keys,
            vec![key("a"), ("team".into(), "b".into())],
            "what a relist compares against"
        );
        // Rendered and unchanged: nothing to do; then gone.
        state.set_service(key("a"), Some(svc("10.43.0.5")));
        state.flush(&mut builder);
        assert!(
            state.infos.is_empty(),
            "ClusterIP infos are dropped once rendered"
        );
        state.set_service(key("a"), None);
        state.set_service(("team".into(), "b".into()), None);
        state.flush(&mut builder);
        assert!(state.keys(Kind::Service).is_empty());
        assert_eq!(nodes(&mut builder), empty);
    }
}
