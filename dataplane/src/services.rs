//! Feeding the Service engine: a watch of Services and EndpointSlices that
//! keeps the `ServiceTable` (and so every packet loop's view) in line with
//! the API, the engine's counters in Prometheus text, and the flow dump
//! behind `skiff dataplane conntrack`.
//!
//! Each event re-translates only the Service it touches (an EndpointSlice
//! belongs to the Service named by its `kubernetes.io/service-name` label),
//! so an endpoint change costs one Service's shards, whatever the table's
//! size. The packet loops never see this side's locks: they read the
//! published table.
//!
//! Packet path (the engine runs in the overlay's packet loop, see
//! `overlay::worker`):
//!
//! - Client pod → ClusterIP: the Service network is routed into the TUN
//!   device; the engine opens a flow (Maglev pick, same on every node),
//!   DNATs, and the packet goes on by its new destination: encapsulated to
//!   the endpoint's node, or written back into the device for an endpoint
//!   on this node.
//! - Endpoint on another node: its reply to the client's podCIDR is routed
//!   into that node's device and tunnelled back; here the engine finds the
//!   flow and restores the ClusterIP as source.
//! - Endpoint on this node: its reply to a pod on the same bridge would be
//!   bridged straight to the client and never meet the engine, so such
//!   flows are SNATed to the Service network's broadcast address (never a
//!   ClusterIP; routed into the device on every node): the reply comes
//!   into the device, is reverse-translated and written back. This costs
//!   the endpoint the client's address for same-node flows (as kube-proxy
//!   without `br_netfilter`); hairpin is the same case.
//! - Sources outside the pod network (host processes) reaching a remote
//!   endpoint are SNATed to this node's podCIDR gateway, which the other
//!   node routes back here.
//!
//! The flow table belongs to one packet loop, and a flow's two directions
//! arrive on different TUN queues (different addresses after NAT) or from
//! the underlay socket, so with Services on the overlay runs one worker.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, watcher};

use crate::nftables::Kernel;
use crate::service::{LoadBalancerPort, Metrics, Published, ServiceKey, ServiceTable, TableConfig};
use crate::socket::SocketBalancer;

/// The label tying an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// How long a conntrack request waits for the packet loop's answer.
const DUMP_WAIT: Duration = Duration::from_secs(2);

/// `namespace/name`.
type Key = (String, String);

/// The engine's shared state: the table (control side), its published view
/// for the packet loops, the counters and the flow-dump mailbox.
pub struct Services {
    table: Mutex<ServiceTable>,
    published: Arc<Published>,
    pub metrics: Arc<Metrics>,
    pub dump: FlowDump,
    /// The table's LoadBalancer ports, for the routing that steers them.
    load_balancer: tokio::sync::watch::Sender<BTreeSet<LoadBalancerPort>>,
    /// The nftables backend, which takes connections from local pods.
    pub kernel: Option<Arc<Kernel>>,
    /// Connect-time balancing, which takes TCP from local pods first.
    pub socket: Option<Arc<SocketBalancer>>,
}

impl Services {
    pub fn new(
        config: TableConfig,
        kernel: Option<Arc<Kernel>>,
        socket: Option<Arc<SocketBalancer>>,
    ) -> Self {
        let table = ServiceTable::new(config);
        Services {
            published: table.published(),
            table: Mutex::new(table),
            metrics: Arc::new(Metrics::default()),
            dump: FlowDump::default(),
            load_balancer: tokio::sync::watch::Sender::new(BTreeSet::new()),
            kernel,
            socket,
        }
    }

    /// Live flows of both backends, one line each (`conntrack -L`'s
    /// shape); `None` when the packet loop did not answer.
    pub async fn flows(&self) -> Option<String> {
        let mut lines = self.dump.request().await?;
        if let Some(kernel) = &self.kernel {
            lines.push_str(&kernel.flows());
        }
        Some(lines)
    }

    /// Reads what the kernel backend counts, before [`Services::render`].
    pub async fn refresh(&self) {
        if let Some(kernel) = &self.kernel {
            kernel.refresh_counters().await;
        }
    }

    pub fn published(&self) -> Arc<Published> {
        self.published.clone()
    }

    /// Follows the ports of LoadBalancer Services (see
    /// [`ServiceTable::load_balancer_ports`]).
    pub fn load_balancer_ports(&self) -> tokio::sync::watch::Receiver<BTreeSet<LoadBalancerPort>> {
        self.load_balancer.subscribe()
    }

    /// Services installed in the table.
    pub fn len(&self) -> usize {
        self.with_table(|t| t.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn with_table<R>(&self, f: impl FnOnce(&mut ServiceTable) -> R) -> R {
        match self.table.lock() {
            Ok(mut table) => f(&mut table),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// The engine's counters in OpenMetrics text (without `# EOF`).
    pub fn render(&self, out: &mut String) {
        let m = &self.metrics;
        let gauge = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
            );
        };
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name}_total {value}\n"
            );
        };
        let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        gauge(
            out,
            "skiff_service_flows_tracked",
            "Flows in the connection-tracking table",
            load(&m.flows_tracked),
        );
        gauge(
            out,
            "skiff_service_services",
            "Services the data plane balances",
            self.len() as u64,
        );
        gauge(
            out,
            "skiff_service_socket_frontends",
            "TCP ClusterIP ports balanced at connect() for this node's pods",
            self.socket.as_ref().map_or(0, |s| s.frontends() as u64),
        );
        counter(
            out,
            "skiff_service_flows_created",
            "Flows opened to a Service endpoint",
            load(&m.flows_created),
        );
        counter(
            out,
            "skiff_service_flows_expired",
            "Flows ended by their idle timeout",
            load(&m.flows_expired),
        );
        counter(
            out,
            "skiff_service_flows_evicted",
            "Live flows pushed out of a full table",
            load(&m.flows_evicted),
        );
        counter(
            out,
            "skiff_service_flows_stale",
            "Flows ended because their endpoint left the Service",
            load(&m.flows_stale),
        );
        counter(
            out,
            "skiff_service_nat_misses",
            "Packets to a Service with no tracked flow that did not open one",
            load(&m.nat_misses),
        );
        counter(
            out,
            "skiff_service_rejected",
            "Resets and port-unreachables sent for Services without endpoints",
            load(&m.rejected),
        );
        out.push_str(
            "# HELP skiff_service_dropped_packets Packets the Service engine dropped, by reason\n\
             # TYPE skiff_service_dropped_packets counter\n",
        );
        for (reason, n) in m.drop_counts() {
            let _ = writeln!(
                out,
                "skiff_service_dropped_packets_total{{reason=\"{reason}\"}} {n}"
            );
        }
        out.push_str(
            "# HELP skiff_service_new_flows New flows per Service\n\
             # TYPE skiff_service_new_flows counter\n",
        );
        let mut rows = self
            .kernel
            .as_ref()
            .map(|kernel| kernel.new_flows())
            .unwrap_or_default();
        self.with_table(|table| {
            for (key, n) in table.new_flows() {
                *rows.entry(key.clone()).or_default() += n;
            }
        });
        if let Some(socket) = &self.socket {
            for (key, n) in socket.new_flows() {
                *rows.entry(key).or_default() += n;
            }
        }
        for (key, n) in rows {
            let _ = writeln!(
                out,
                "skiff_service_new_flows_total{{namespace=\"{}\",service=\"{}\"}} {n}",
                escape(&key.namespace),
                escape(&key.name)
            );
        }
    }
}

/// A label value as the text format wants it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The mailbox between `GET /conntrack` and the packet loops, which own
/// the flow tables: a request flag the loops check once per poll round
/// (one relaxed load; they poll at least every 100 ms) and the lines they
/// leave behind.
#[derive(Debug, Default)]
pub struct FlowDump {
    requested: AtomicBool,
    answer: Mutex<Option<String>>,
}

impl FlowDump {
    /// Whether a dump was asked for; clears the request.
    pub fn take_request(&self) -> bool {
        self.requested.load(Ordering::Relaxed) && self.requested.swap(false, Ordering::AcqRel)
    }

    /// Leaves a packet loop's dump.
    pub fn answer(&self, lines: String) {
        let mut slot = match self.answer.lock() {
            Ok(slot) => slot,
            Err(poisoned) => poisoned.into_inner(),
        };
        *slot = Some(lines);
    }

    /// Asks the packet loop for its flows and waits for the answer.
    pub async fn request(&self) -> Option<String> {
        self.take_answer();
        self.requested.store(true, Ordering::Release);
        let deadline = tokio::time::Instant::now() + DUMP_WAIT;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if let Some(lines) = self.take_answer() {
                return Some(lines);
            }
        }
        None
    }

    fn take_answer(&self) -> Option<String> {
        match self.answer.lock() {
            Ok(mut slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("the {0} watch ended")]
    Ended(&'static str),
}

/// What the watch knows, keyed by namespace and name.
#[derive(Default)]
struct Known {
    services: BTreeMap<Key, Service>,
    slices: BTreeMap<Key, EndpointSlice>,
    /// Service → its slices' names, from the service-name label.
    by_service: BTreeMap<Key, BTreeSet<String>>,
}

impl Known {
    fn add_slice(&mut self, slice: EndpointSlice) -> Option<Key> {
        let key = object_key(&slice.metadata)?;
        let owner = slice_owner(&slice);
        let old = self.slices.insert(key.clone(), slice);
        let old_owner = old.as_ref().and_then(slice_owner);
        if let Some(previous) = &old_owner
            && Some(previous) != owner.as_ref()
            && let Some(set) = self.by_service.get_mut(previous)
        {
            set.remove(&key.1);
        }
        if let Some(service) = &owner {
            self.by_service
                .entry(service.clone())
                .or_default()
                .insert(key.1.clone());
        }
        owner.or(old_owner)
    }

    fn remove_slice(&mut self, slice: &EndpointSlice) -> Option<Key> {
        let key = object_key(&slice.metadata)?;
        let old = self.slices.remove(&key);
        let owner = old
            .as_ref()
            .and_then(slice_owner)
            .or_else(|| slice_owner(slice));
        if let Some(service) = &owner
            && let Some(set) = self.by_service.get_mut(service)
        {
            set.remove(&key.1);
        }
        owner
    }

    fn slices_of(&self, service: &Key) -> Vec<EndpointSlice> {
        self.by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|name| self.slices.get(&(service.0.clone(), name.clone())))
            .cloned()
            .collect()
    }
}

fn service_key(key: &Key) -> ServiceKey {
    ServiceKey::new(key.0.clone(), key.1.clone())
}

fn object_key(meta: &kube::api::ObjectMeta) -> Option<Key> {
    Some((meta.namespace.clone()?, meta.name.clone()?))
}

fn slice_owner(slice: &EndpointSlice) -> Option<Key> {
    let name = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some((slice.metadata.namespace.clone()?, name.clone()))
}

/// Keeps `services`' table in line with the API until the future is
/// dropped or a watch ends.
pub async fn watch(client: kube::Client, services: Arc<Services>) -> Result<(), WatchError> {
    let service_api: Api<Service> = Api::all(client.clone());
    let slice_api: Api<EndpointSlice> = Api::all(client);
    let mut service_events =
        std::pin::pin!(watcher(service_api, watcher::Config::default()).default_backoff());
    let mut slice_events =
        std::pin::pin!(watcher(slice_api, watcher::Config::default()).default_backoff());
    let mut known = Known::default();
    // A relist's objects, swapped in whole when it is done.
    let mut service_relist: Option<BTreeMap<Key, Service>> = None;
    let mut slice_relist: Option<Vec<EndpointSlice>> = None;
    loop {
        let touched: Vec<Key> = tokio::select! {
            event = service_events.next() => match event {
                None => return Err(WatchError::Ended("Service")),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "watching Services");
                    continue;
                }
                Some(Ok(watcher::Event::Init)) => {
                    service_relist = Some(BTreeMap::new());
                    continue;
                }
                Some(Ok(watcher::Event::InitApply(service))) => {
                    if let (Some(list), Some(key)) =
                        (service_relist.as_mut(), object_key(&service.metadata))
                    {
                        list.insert(key, service);
                    }
                    continue;
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    let fresh = service_relist.take().unwrap_or_default();
                    let old = std::mem::replace(&mut known.services, fresh);
                    old.into_keys().chain(known.services.keys().cloned()).collect()
                }
                Some(Ok(watcher::Event::Apply(service))) => {
                    let Some(key) = object_key(&service.metadata) else { continue };
                    known.services.insert(key.clone(), service);
                    vec![key]
                }
                Some(Ok(watcher::Event::Delete(service))) => {
                    let Some(key) = object_key(&service.metadata) else { continue };
                    known.services.remove(&key);
                    vec![key]
                }
            },
            event = slice_events.next() => match event {
                None => return Err(WatchError::Ended("EndpointSlice")),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "watching EndpointSlices");
                    continue;
                }
                Some(Ok(watcher::Event::Init)) => {
                    slice_relist = Some(Vec::new());
                    continue;
                }
                Some(Ok(watcher::Event::InitApply(slice))) => {
                    if let Some(list) = slice_relist.as_mut() {
                        list.push(slice);
                    }
                    continue;
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    let old = std::mem::take(&mut known.slices);
                    known.by_service.clear();
                    let mut touched: BTreeSet<Key> =
                        old.values().filter_map(slice_owner).collect();
                    for slice in slice_relist.take().unwrap_or_default() {
                        touched.extend(known.add_slice(slice));
                    }
                    touched.into_iter().collect()
                }
                Some(Ok(watcher::Event::Apply(slice))) => {
                    known.add_slice(slice).into_iter().collect()
                }
                Some(Ok(watcher::Event::Delete(slice))) => {
                    known.remove_slice(&slice).into_iter().collect()
                }
            },
        };
        sync(&known, &services, &touched);
    }
}

/// Re-translates the `touched` Services into the table.
fn sync(known: &Known, services: &Services, touched: &[Key]) {
    let ports = services.with_table(|table| {
        for key in touched {
            match known.services.get(key) {
                Some(service) => {
                    match table.apply(service, &known.slices_of(key)) {
                        Ok(spec) => {
                            if let Some(kernel) = &services.kernel {
                                kernel.update(&service_key(key), spec.as_ref());
                            }
                            if let Some(socket) = &services.socket {
                                socket.update(&service_key(key), spec.as_ref());
                            }
                        }
                        Err(e) => {
                            tracing::warn!(service = %format!("{}/{}", key.0, key.1), error = %e, "cannot balance Service");
                        }
                    }
                }
                None => {
                    table.remove(&service_key(key));
                    if let Some(kernel) = &services.kernel {
                        kernel.update(&service_key(key), None);
                    }
                    if let Some(socket) = &services.socket {
                        socket.update(&service_key(key), None);
                    }
                }
            }
        }
        table.load_balancer_ports()
    });
    services.load_balancer.send_if_modified(|current| {
        let changed = *current != ports;
        if changed {
            *current = ports;
        }
        changed
    });
}
