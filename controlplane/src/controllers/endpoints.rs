//! The EndpointSlice and Endpoints controllers: for every Service with a
//! selector, the addresses of the pods it selects, as upstream's
//! `endpointslice-controller.k8s.io` and `endpoint-controller` write them.
//!
//! - A pod counts once it has an IPv4 pod IP and is not finished. In a
//!   slice its endpoint is `ready` when the pod is Ready and not
//!   terminating, `serving` when Ready, `terminating` while being deleted;
//!   `publishNotReadyAddresses` makes every endpoint ready.
//! - Target ports are resolved per pod: a named port against the pod's
//!   container ports; a pod lacking the name is left out of that port, so
//!   pods with different resolved ports go to different slices.
//! - Slices hold at most 100 endpoints, carry `kubernetes.io/service-name`
//!   and `endpointslice.kubernetes.io/managed-by`, and are owned by the
//!   Service, so the garbage collector removes them with it. A Service
//!   without endpoints keeps one empty placeholder slice.
//! - Writes are minimal: an endpoint stays in the slice it is in, changed
//!   slices absorb new endpoints before any slice is created, slices that
//!   would be deleted are reused for new ones, and an unchanged slice or
//!   Endpoints object is never written.
//! - The legacy Endpoints object (no owner, as upstream) is deleted when its
//!   Service goes.
//! - The `default/kubernetes` Service points at this API server.
//!
//! Caches lag behind our own writes; the resourceVersion of every write is
//! remembered until the cache shows it, and a Service is not reconciled
//! against a cache that has not caught up (which would create duplicates).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::{Stream, StreamExt, stream};
use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort as CorePort, EndpointSubset, Endpoints, Node, ObjectReference,
    Pod, Service,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ObjectMeta, PartialObjectMeta, PostParams, Preconditions};
use kube::runtime::controller::{self, Action};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, watcher};
use kube::runtime::{WatchStreamExt, applier};
use kube::{Resource, ResourceExt};
use tokio::time::Instant;

use super::pod_informer::{PodChange, PodInformer, Synced};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "endpointslice-controller.k8s.io";
const ENDPOINTS_MANAGED_BY_LABEL: &str = "endpoints.kubernetes.io/managed-by";
const ENDPOINTS_MANAGED_BY: &str = "endpoint-controller";
const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
const SKIP_MIRROR_LABEL: &str = "endpointslice.kubernetes.io/skip-mirror";
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const MAX_ENDPOINTS_PER_SLICE: usize = 100;
const IPV4: &str = "IPv4";
/// How long to wait for the caches to show our own writes before giving up
/// on them (someone else may have changed the object since).
const EXPECTATION_TIMEOUT: Duration = Duration::from_secs(10);
/// How soon a Service waiting for the caches is looked at again.
const STALE_RETRY: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("endpoint slices: {0}")]
    Slices(#[source] kube::Error),
    #[error("endpoints: {0}")]
    Endpoints(#[source] kube::Error),
}

/// One service port as resolved for one pod. Ordered, so that a pod's
/// resolved ports form the key of the slices it goes in.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct ResolvedPort {
    name: String,
    port: i32,
    protocol: String,
    app_protocol: Option<String>,
}

type PortKey = Vec<ResolvedPort>;

/// A selected pod as the endpoints see it.
struct Member<'a> {
    pod: &'a Pod,
    ip: &'a str,
    ready: bool,
    terminating: bool,
    hostname: Option<&'a str>,
    ports: PortKey,
}

/// The writes that bring one Service's slices in line.
#[derive(Debug, Default)]
struct SlicePlan {
    create: Vec<EndpointSlice>,
    update: Vec<EndpointSlice>,
    delete: Vec<Arc<EndpointSlice>>,
}

/// A version of one object the caches must show before we trust them.
#[derive(Clone, Debug)]
enum Version {
    AtLeast(u64),
    Gone,
}

/// Writes of one Service not yet seen in the caches.
struct Expected {
    since: Instant,
    slices: Vec<(String, Version)>,
    endpoints: Option<Version>,
}

type ServiceKey = (String, String);

struct Context {
    client: kube::Client,
    recorder: Recorder,
    api_endpoint: SocketAddr,
    services: Store<Service>,
    pods: Store<Pod>,
    pods_synced: Synced,
    slices: Store<EndpointSlice>,
    endpoints: Store<Endpoints>,
    nodes: Store<PartialObjectMeta<Node>>,
    /// The services each pod (by namespace, then name) last belonged to,
    /// so that a pod leaving a service (deleted, relabelled) updates it too.
    memberships: Mutex<HashMap<String, HashMap<String, Vec<String>>>>,
    expected: Mutex<HashMap<ServiceKey, Expected>>,
    /// Consecutive failures per service, for the retry back-off.
    failures: Mutex<HashMap<ServiceKey, u32>>,
}

type Triggers = std::pin::Pin<Box<dyn Stream<Item = ObjectRef<Service>> + Send>>;

/// Runs both controllers; `api_endpoint` is where this API server listens,
/// for the `kubernetes` Service.
pub async fn run(client: kube::Client, pods: &PodInformer, api_endpoint: SocketAddr) {
    let (services, service_writer) = reflector::store();
    let (slices, slice_writer) = reflector::store();
    let (endpoints, endpoints_writer) = reflector::store();
    let (nodes, node_writer) = reflector::store();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "endpointslice-controller".into(),
            instance: None,
        },
    );
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder,
        api_endpoint,
        services: services.clone(),
        pods: pods.cache(),
        pods_synced: pods.synced(),
        slices,
        endpoints,
        nodes,
        memberships: Mutex::default(),
        expected: Mutex::default(),
        failures: Mutex::default(),
    });
    let config = watcher::Config::default();
    let service_events = watcher(Api::<Service>::all(client.clone()), config.clone())
        .default_backoff()
        .reflect(service_writer);
    let slice_events = watcher(Api::<EndpointSlice>::all(client.clone()), config.clone())
        .default_backoff()
        .reflect(slice_writer);
    let endpoints_events = watcher(Api::<Endpoints>::all(client.clone()), config.clone())
        .default_backoff()
        .reflect(endpoints_writer);
    let node_events = watcher(Api::<PartialObjectMeta<Node>>::all(client), config)
        .default_backoff()
        .reflect(node_writer);

    let triggers: [Triggers; 5] = [
        triggered(service_events, |event| match event {
            watcher::Event::Apply(s) | watcher::Event::InitApply(s) | watcher::Event::Delete(s) => {
                vec![ObjectRef::from_obj(&s)]
            }
            watcher::Event::Init | watcher::Event::InitDone => Vec::new(),
        }),
        {
            let ctx = ctx.clone();
            pods.changes()
                .flat_map(move |change| stream::iter(ctx.pod_changed(change)))
                .boxed()
        },
        triggered(slice_events, {
            let ctx = ctx.clone();
            move |event| match event {
                watcher::Event::Apply(s)
                | watcher::Event::InitApply(s)
                | watcher::Event::Delete(s) => owning_service(&s).into_iter().collect(),
                watcher::Event::InitDone => ctx.all_services(),
                watcher::Event::Init => Vec::new(),
            }
        }),
        triggered(endpoints_events, {
            let ctx = ctx.clone();
            move |event| match event {
                watcher::Event::Apply(e)
                | watcher::Event::InitApply(e)
                | watcher::Event::Delete(e) => {
                    vec![ObjectRef::new(&e.name_any()).within(&e.namespace().unwrap_or_default())]
                }
                watcher::Event::InitDone => ctx.all_services(),
                watcher::Event::Init => Vec::new(),
            }
        }),
        // Nodes only feed the zone lookups.
        triggered(node_events, |_| Vec::new()),
    ];
    let queue = stream::select_all(triggers).map(Ok::<_, Infallible>);
    applier(
        |service, ctx| Box::pin(reconcile(service, ctx)),
        error_policy,
        ctx.clone(),
        services,
        queue,
        controller::Config::default(),
    )
    .for_each(|result| {
        let ctx = ctx.clone();
        async move {
            match result {
                Ok(_) => {}
                // The Service is gone: so are its legacy Endpoints.
                Err(controller::Error::ObjectNotFound(gone)) => {
                    if let Some(namespace) = gone.namespace.as_deref() {
                        ctx.service_gone(namespace, &gone.name).await;
                    }
                }
                Err(e) => tracing::debug!(error = %e, "endpoints reconcile failed"),
            }
        }
    })
    .await;
}

/// Maps each watch event of a reflector to the Services it concerns.
fn triggered<K, S>(
    events: S,
    map: impl Fn(watcher::Event<K>) -> Vec<ObjectRef<Service>> + Send + 'static,
) -> Triggers
where
    K: Send + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    events
        .flat_map(move |event| {
            let refs = match event {
                Ok(event) => map(event),
                Err(e) => {
                    tracing::debug!(error = %e, "endpoints controller watch error");
                    Vec::new()
                }
            };
            stream::iter(refs)
        })
        .boxed()
}

async fn reconcile(service: Arc<Service>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.synced().await;
    let key = service_key(&service);
    if service.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    if let Some(wait) = ctx.stale(&key) {
        return Ok(Action::requeue(wait));
    }
    let result = if key.0 == "default" && key.1 == "kubernetes" {
        ctx.sync_apiserver(&service, &key).await
    } else {
        ctx.sync(&service, &key).await
    };
    match &result {
        Ok(_) => {
            lock(&ctx.failures).remove(&key);
        }
        Err(e) => ctx.report(&service, e).await,
    }
    result
}

fn error_policy(service: Arc<Service>, _error: &Error, ctx: Arc<Context>) -> Action {
    let mut failures = lock(&ctx.failures);
    let count = failures.entry(service_key(&service)).or_insert(0);
    *count = count.saturating_add(1);
    // 100 ms, doubling, at most a minute: conflicts with a stale cache
    // clear up at once, real trouble is not hammered.
    let delay = Duration::from_millis(100).saturating_mul(1u32 << (*count - 1).min(10));
    Action::requeue(delay.min(Duration::from_secs(60)))
}

impl Context {
    async fn synced(&self) {
        self.pods_synced.wait().await;
        let _ = self.slices.wait_until_ready().await;
        let _ = self.endpoints.wait_until_ready().await;
        let _ = self.nodes.wait_until_ready().await;
    }

    async fn sync(&self, service: &Service, key: &ServiceKey) -> Result<Action, Error> {
        let Some(selector) = selector(service) else {
            // Not ours: upstream leaves selector-less (and ExternalName)
            // Services' endpoints to whoever wrote them.
            return Ok(Action::await_change());
        };
        let (namespace, name) = (key.0.as_str(), key.1.as_str());
        let pods = self.pods.state_filter(|p| {
            p.metadata.namespace.as_deref() == Some(namespace) && selects(selector, p)
        });
        {
            let mut memberships = lock(&self.memberships);
            let in_namespace = match memberships.get_mut(namespace) {
                Some(pods) => pods,
                None => memberships.entry(namespace.to_owned()).or_default(),
            };
            for pod in &pods {
                let pod_name = pod.metadata.name.as_deref().unwrap_or_default();
                match in_namespace.get_mut(pod_name) {
                    Some(services) if services.iter().any(|s| s == name) => {}
                    Some(services) => services.push(name.to_owned()),
                    None => {
                        in_namespace.insert(pod_name.to_owned(), vec![name.to_owned()]);
                    }
                }
            }
        }
        let members: Vec<Member<'_>> = pods.iter().filter_map(|p| member(service, p)).collect();

        let existing = self.slices.state_filter(|s| {
            s.metadata.namespace.as_deref() == Some(namespace)
                && label(&s.metadata, SERVICE_NAME_LABEL) == Some(name)
                && label(&s.metadata, MANAGED_BY_LABEL) == Some(MANAGED_BY)
                && s.metadata.deletion_timestamp.is_none()
        });
        let groups = slice_groups(service, &members, |node| self.zone(node));
        let plan = plan_slices(service, groups, &existing);
        let slices = self.apply_slices(key, plan).await;

        let subsets = legacy_subsets(service, &members);
        let endpoints = self
            .apply_endpoints(key, endpoints_labels(service), subsets)
            .await;
        slices?;
        endpoints?;
        Ok(Action::await_change())
    }

    /// `default/kubernetes`: one endpoint, this API server.
    async fn sync_apiserver(&self, service: &Service, key: &ServiceKey) -> Result<Action, Error> {
        let ip = self.api_endpoint.ip().to_string();
        let port = i32::from(self.api_endpoint.port());
        let port_name = service
            .spec
            .as_ref()
            .and_then(|s| s.ports.as_ref()?.first()?.name.clone())
            .unwrap_or_else(|| "https".into());
        let address_type = if self.api_endpoint.is_ipv4() {
            IPV4
        } else {
            "IPv6"
        };
        let slice = EndpointSlice {
            metadata: ObjectMeta {
                name: Some(key.1.clone()),
                namespace: Some(key.0.clone()),
                labels: Some(BTreeMap::from([(SERVICE_NAME_LABEL.into(), key.1.clone())])),
                ..ObjectMeta::default()
            },
            address_type: address_type.into(),
            endpoints: vec![Endpoint {
                addresses: vec![ip.clone()],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    ..EndpointConditions::default()
                }),
                ..Endpoint::default()
            }],
            ports: Some(vec![EndpointPort {
                name: Some(port_name.clone()),
                port: Some(port),
                protocol: Some("TCP".into()),
                app_protocol: None,
            }]),
        };
        let current = self.slices.get(&ObjectRef::new(&key.1).within(&key.0));
        let mut plan = SlicePlan::default();
        match current {
            Some(current)
                if current.address_type == slice.address_type
                    && current.endpoints == slice.endpoints
                    && current.ports == slice.ports
                    && current.metadata.labels == slice.metadata.labels => {}
            Some(current) if current.address_type == slice.address_type => {
                let mut updated = (*current).clone();
                updated.endpoints = slice.endpoints;
                updated.ports = slice.ports;
                updated.metadata.labels = slice.metadata.labels;
                plan.update.push(updated);
            }
            // The address type cannot change: delete the slice; its
            // deletion brings us back here to create the new one.
            Some(current) => plan.delete.push(current),
            None => plan.create.push(slice),
        }
        let slices = self.apply_slices(key, plan).await;
        let subsets = Some(vec![EndpointSubset {
            addresses: Some(vec![EndpointAddress {
                ip,
                ..EndpointAddress::default()
            }]),
            not_ready_addresses: None,
            ports: Some(vec![CorePort {
                name: Some(port_name),
                port,
                protocol: Some("TCP".into()),
                app_protocol: None,
            }]),
        }]);
        let labels = BTreeMap::from([(SKIP_MIRROR_LABEL.into(), "true".into())]);
        let endpoints = self.apply_endpoints(key, labels, subsets).await;
        slices?;
        endpoints?;
        Ok(Action::await_change())
    }

    /// Creates first, then updates, then deletes, so that no endpoint is
    /// ever missing in between.
    async fn apply_slices(&self, key: &ServiceKey, plan: SlicePlan) -> Result<(), Error> {
        if plan.create.is_empty() && plan.update.is_empty() && plan.delete.is_empty() {
            return Ok(());
        }
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &key.0);
        let mut written: Vec<(String, Version)> = Vec::new();
        let mut result = Ok(());
        for slice in &plan.create {
            match api.create(&PostParams::default(), slice).await {
                Ok(created) => written.push(version_of(&created.metadata)),
                Err(e) => {
                    result = Err(Error::Slices(e));
                    break;
                }
            }
        }
        if result.is_ok() {
            for slice in &plan.update {
                match api
                    .replace(&slice.name_any(), &PostParams::default(), slice)
                    .await
                {
                    Ok(updated) => written.push(version_of(&updated.metadata)),
                    Err(e) => {
                        result = Err(Error::Slices(e));
                        break;
                    }
                }
            }
        }
        if result.is_ok() {
            for slice in &plan.delete {
                let name = slice.name_any();
                let params = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: slice.metadata.uid.clone(),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                match api.delete(&name, &params).await {
                    Ok(_) => written.push((name, Version::Gone)),
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => {
                        result = Err(Error::Slices(e));
                        break;
                    }
                }
            }
        }
        if !written.is_empty() {
            let mut expected = lock(&self.expected);
            let entry = expected.entry(key.clone()).or_insert_with(|| Expected {
                since: Instant::now(),
                slices: Vec::new(),
                endpoints: None,
            });
            entry.since = Instant::now();
            entry.slices.extend(written);
        }
        result
    }

    /// Writes the Service's Endpoints object if it differs.
    async fn apply_endpoints(
        &self,
        key: &ServiceKey,
        labels: BTreeMap<String, String>,
        subsets: Option<Vec<EndpointSubset>>,
    ) -> Result<(), Error> {
        let current = self.endpoints.get(&ObjectRef::new(&key.1).within(&key.0));
        let labels = (!labels.is_empty()).then_some(labels);
        let api: Api<Endpoints> = Api::namespaced(self.client.clone(), &key.0);
        let written = match current {
            Some(current) if current.metadata.labels == labels && current.subsets == subsets => {
                return Ok(());
            }
            Some(current) => {
                let mut updated = (*current).clone();
                updated.metadata.labels = labels;
                updated.subsets = subsets;
                api.replace(&key.1, &PostParams::default(), &updated).await
            }
            None => {
                let created = Endpoints {
                    metadata: ObjectMeta {
                        name: Some(key.1.clone()),
                        namespace: Some(key.0.clone()),
                        labels,
                        ..ObjectMeta::default()
                    },
                    subsets,
                };
                api.create(&PostParams::default(), &created).await
            }
        }
        .map_err(Error::Endpoints)?;
        let (_, version) = version_of(&written.metadata);
        let mut expected = lock(&self.expected);
        let entry = expected.entry(key.clone()).or_insert_with(|| Expected {
            since: Instant::now(),
            slices: Vec::new(),
            endpoints: None,
        });
        entry.since = Instant::now();
        entry.endpoints = Some(version);
        Ok(())
    }

    /// How long to wait if the caches do not yet show our last writes.
    fn stale(&self, key: &ServiceKey) -> Option<Duration> {
        let mut expected = lock(&self.expected);
        let entry = expected.get(key)?;
        let fresh = |cached: Option<&ObjectMeta>, version: &Version| match version {
            Version::Gone => cached.is_none(),
            Version::AtLeast(v) => cached
                .and_then(|m| m.resource_version.as_deref()?.parse::<u64>().ok())
                .is_some_and(|rv| rv >= *v),
        };
        let slices_fresh = entry.slices.iter().all(|(name, version)| {
            let cached = self.slices.get(&ObjectRef::new(name).within(&key.0));
            fresh(cached.as_ref().map(|s| &s.metadata), version)
        });
        let endpoints_fresh = entry.endpoints.as_ref().is_none_or(|version| {
            let cached = self.endpoints.get(&ObjectRef::new(&key.1).within(&key.0));
            fresh(cached.as_ref().map(|e| &e.metadata), version)
        });
        if (slices_fresh && endpoints_fresh) || entry.since.elapsed() > EXPECTATION_TIMEOUT {
            expected.remove(key);
            return None;
        }
        Some(STALE_RETRY)
    }

    /// The Services a pod event concerns: those selecting it now and those
    /// it belonged to before.
    fn pod_changed(&self, change: PodChange) -> Vec<ObjectRef<Service>> {
        match change {
            PodChange::Applied(pod) => self.follow_pod(&pod, false),
            PodChange::Deleted(pod) => self.follow_pod(&pod, true),
            PodChange::Relisted => {
                lock(&self.memberships).clear();
                for pod in self.pods.state() {
                    self.follow_pod(&pod, false);
                }
                self.all_services()
            }
        }
    }

    /// Records which Services select `pod` now; returns those it joined,
    /// stayed in or left.
    fn follow_pod(&self, pod: &Pod, gone: bool) -> Vec<ObjectRef<Service>> {
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let now: Vec<String> = self
            .services
            .state_filter(|s| {
                s.metadata.namespace.as_deref() == Some(namespace.as_str())
                    && selector(s).is_some_and(|sel| selects(sel, pod))
            })
            .iter()
            .map(|s| s.name_any())
            .collect();
        let pod_name = pod.metadata.name.as_deref().unwrap_or_default();
        let before = {
            let mut memberships = lock(&self.memberships);
            if gone || now.is_empty() {
                let in_namespace = memberships.get_mut(&namespace);
                let before = in_namespace.and_then(|pods| pods.remove(pod_name));
                if memberships.get(&namespace).is_some_and(HashMap::is_empty) {
                    memberships.remove(&namespace);
                }
                before
            } else {
                memberships
                    .entry(namespace.clone())
                    .or_default()
                    .insert(pod_name.to_owned(), now.clone())
            }
        };
        let mut names = now;
        for name in before.unwrap_or_default() {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
            .iter()
            .map(|name| ObjectRef::new(name).within(&namespace))
            .collect()
    }

    fn all_services(&self) -> Vec<ObjectRef<Service>> {
        self.services
            .state()
            .iter()
            .map(|s| ObjectRef::from_obj(s.as_ref()))
            .collect()
    }

    fn zone(&self, node: &str) -> Option<String> {
        let node = self.nodes.get(&ObjectRef::new(node))?;
        node.metadata
            .labels
            .as_ref()?
            .get(ZONE_LABEL)
            .filter(|z| !z.is_empty())
            .cloned()
    }

    /// Deletes the legacy Endpoints we wrote for a Service that is gone.
    async fn service_gone(&self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        lock(&self.expected).remove(&key);
        lock(&self.failures).remove(&key);
        let Some(endpoints) = self.endpoints.get(&ObjectRef::new(name).within(namespace)) else {
            return;
        };
        if label(&endpoints.metadata, ENDPOINTS_MANAGED_BY_LABEL) != Some(ENDPOINTS_MANAGED_BY) {
            return;
        }
        // The cache may not show a Service that was just re-created.
        let services: Api<Service> = Api::namespaced(self.client.clone(), namespace);
        match services.get_opt(name).await {
            Ok(None) => {}
            Ok(Some(_)) => return,
            Err(e) => {
                tracing::debug!(%namespace, service = %name, error = %e, "cannot confirm service is gone");
                return;
            }
        }
        let api: Api<Endpoints> = Api::namespaced(self.client.clone(), namespace);
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: endpoints.metadata.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(name, &params).await {
            Ok(_) => {
                tracing::debug!(%namespace, service = %name, "deleted endpoints of a deleted service")
            }
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => {
                tracing::warn!(%namespace, service = %name, error = %e, "cannot delete endpoints")
            }
        }
    }

    /// Records a failed sync on the Service, unless it was only a lost race
    /// with a stale cache (retried at once).
    async fn report(&self, service: &Service, error: &Error) {
        let (reason, source) = match error {
            Error::Slices(e) => ("FailedToUpdateEndpointSlices", e),
            Error::Endpoints(e) => ("FailedToUpdateEndpoint", e),
        };
        if matches!(source, kube::Error::Api(s) if s.code == 409) {
            return;
        }
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(format!("Error updating endpoints for service: {source}")),
            action: "Update".into(),
            secondary: None,
        };
        if let Err(e) = self
            .recorder
            .publish(&event, &service.object_ref(&()))
            .await
        {
            tracing::debug!(error = %e, "cannot record event");
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn service_key(service: &Service) -> ServiceKey {
    (
        service.metadata.namespace.clone().unwrap_or_default(),
        service.name_any(),
    )
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels.as_ref()?.get(key).map(String::as_str)
}

fn version_of(meta: &ObjectMeta) -> (String, Version) {
    let name = meta.name.clone().unwrap_or_default();
    let version = meta
        .resource_version
        .as_deref()
        .and_then(|rv| rv.parse().ok())
        .map_or(Version::Gone, Version::AtLeast);
    (name, version)
}

fn owning_service(slice: &EndpointSlice) -> Option<ObjectRef<Service>> {
    let name = label(&slice.metadata, SERVICE_NAME_LABEL)?;
    Some(ObjectRef::new(name).within(slice.metadata.namespace.as_deref()?))
}

/// The selector of a Service this controller serves endpoints for.
fn selector(service: &Service) -> Option<&BTreeMap<String, String>> {
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    spec.selector.as_ref().filter(|s| !s.is_empty())
}

fn selects(selector: &BTreeMap<String, String>, pod: &Pod) -> bool {
    let labels = pod.metadata.labels.as_ref();
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// `pod` as an endpoint of `service`, if it should be one at all.
fn member<'a>(service: &'a Service, pod: &'a Pod) -> Option<Member<'a>> {
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let is_v4 = |ip: &&str| ip.parse::<std::net::Ipv4Addr>().is_ok();
    let ip = status
        .pod_ips
        .iter()
        .flatten()
        .map(|p| p.ip.as_str())
        .find(is_v4)
        .or_else(|| status.pod_ip.as_deref().filter(is_v4))?;
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let spec = pod.spec.as_ref();
    let hostname = spec
        .and_then(|s| s.hostname.as_deref())
        .filter(|h| !h.is_empty())
        .filter(|_| {
            spec.and_then(|s| s.subdomain.as_deref()) == service.metadata.name.as_deref()
                && pod.metadata.namespace == service.metadata.namespace
        });
    let mut ports: PortKey = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|port| {
            let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".into());
            let number = match &port.target_port {
                None => port.port,
                Some(IntOrString::Int(n)) => *n,
                Some(IntOrString::String(name)) => container_port(pod, name, &protocol)?,
            };
            Some(ResolvedPort {
                name: port.name.clone().unwrap_or_default(),
                port: number,
                protocol,
                app_protocol: port.app_protocol.clone(),
            })
        })
        .collect();
    ports.sort();
    Some(Member {
        pod,
        ip,
        ready,
        terminating: pod.metadata.deletion_timestamp.is_some(),
        hostname,
        ports,
    })
}

/// The number of the container port called `name` (with `protocol`) in
/// `pod`'s containers or sidecars.
fn container_port(pod: &Pod, name: &str, protocol: &str) -> Option<i32> {
    let spec = pod.spec.as_ref()?;
    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .filter(|c| c.restart_policy.as_deref() == Some("Always"));
    spec.containers
        .iter()
        .chain(sidecars)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| {
            p.name.as_deref() == Some(name) && p.protocol.as_deref().unwrap_or("TCP") == protocol
        })
        .map(|p| p.container_port)
}

fn target_ref(pod: &Pod) -> ObjectReference {
    ObjectReference {
        kind: Some("Pod".into()),
        namespace: pod.metadata.namespace.clone(),
        name: pod.metadata.name.clone(),
        uid: pod.metadata.uid.clone(),
        ..ObjectReference::default()
    }
}

/// The endpoints each set of resolved ports should have, keyed by pod name.
fn slice_groups(
    service: &Service,
    members: &[Member<'_>],
    zone: impl Fn(&str) -> Option<String>,
) -> BTreeMap<PortKey, BTreeMap<String, Endpoint>> {
    let publish = service
        .spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        .unwrap_or(false);
    let mut groups: BTreeMap<PortKey, BTreeMap<String, Endpoint>> = BTreeMap::new();
    for m in members {
        let node_name = m.pod.spec.as_ref().and_then(|s| s.node_name.clone());
        let endpoint = Endpoint {
            addresses: vec![m.ip.to_owned()],
            conditions: Some(EndpointConditions {
                ready: Some(publish || (m.ready && !m.terminating)),
                serving: Some(m.ready),
                terminating: Some(m.terminating),
            }),
            hostname: m.hostname.map(str::to_owned),
            zone: node_name.as_deref().and_then(&zone),
            node_name,
            target_ref: Some(target_ref(m.pod)),
            ..Endpoint::default()
        };
        groups
            .entry(m.ports.clone())
            .or_default()
            .insert(m.pod.name_any(), endpoint);
    }
    groups
}

/// What to create, update and delete so that `existing` holds `groups`.
fn plan_slices(
    service: &Service,
    mut groups: BTreeMap<PortKey, BTreeMap<String, Endpoint>>,
    existing: &[Arc<EndpointSlice>],
) -> SlicePlan {
    let labels = slice_labels(service);
    let owner = owner_reference(service);
    let mut plan = SlicePlan::default();
    // Slices of ours whose ports nobody wants any more: reused for new
    // slices before anything is created, deleted otherwise.
    let mut spare: Vec<Arc<EndpointSlice>> = Vec::new();
    let mut by_ports: BTreeMap<PortKey, Vec<Arc<EndpointSlice>>> = BTreeMap::new();
    for slice in existing {
        let owned =
            slice.metadata.owner_references.iter().flatten().any(|r| {
                Some(&r.uid) == service.metadata.uid.as_ref() && r.controller == Some(true)
            });
        if slice.address_type != IPV4 || !owned {
            plan.delete.push(slice.clone());
            continue;
        }
        let key = slice_port_key(slice);
        if groups.contains_key(&key) {
            by_ports.entry(key).or_default().push(slice.clone());
        } else {
            spare.push(slice.clone());
        }
    }
    // A Service without endpoints keeps exactly one empty slice.
    let placeholder = groups.is_empty();
    if placeholder {
        let key = spare.iter().position(|s| slice_port_key(s).is_empty());
        let keep = match key {
            Some(at) => spare.remove(at),
            None => match spare.pop() {
                Some(slice) => slice,
                None => {
                    plan.create
                        .push(new_slice(service, &labels, &owner, &[], Vec::new()));
                    return plan;
                }
            },
        };
        plan.delete.append(&mut spare);
        let mut slice = (*keep).clone();
        let changed = !slice.endpoints.is_empty()
            || slice.ports.as_ref().is_some_and(|p| !p.is_empty())
            || !meta_matches(&slice.metadata, &labels, &owner);
        if changed {
            slice.endpoints.clear();
            slice.ports = None;
            set_meta(&mut slice.metadata, &labels, &owner);
            plan.update.push(slice);
        }
        return plan;
    }
    for (key, mut wanted) in std::mem::take(&mut groups) {
        // Keep every endpoint in the slice it is in.
        let mut kept: Vec<(EndpointSlice, bool)> = Vec::new();
        for slice in by_ports.remove(&key).unwrap_or_default() {
            let mut changed = !meta_matches(&slice.metadata, &labels, &owner);
            let mut endpoints = Vec::with_capacity(slice.endpoints.len());
            for endpoint in &slice.endpoints {
                let desired = endpoint_key(endpoint).and_then(|k| wanted.remove(k));
                match desired {
                    Some(d) if endpoints.len() < MAX_ENDPOINTS_PER_SLICE => {
                        changed |= d != *endpoint;
                        endpoints.push(d);
                    }
                    Some(d) => {
                        // Over-full (not written by us): move the rest.
                        changed = true;
                        if let Some(k) = endpoint_key(&d).map(str::to_owned) {
                            wanted.insert(k, d);
                        }
                    }
                    None => changed = true,
                }
            }
            let mut slice = (*slice).clone();
            slice.endpoints = endpoints;
            kept.push((slice, changed));
        }
        // New endpoints go first to slices being written anyway.
        kept.sort_by_key(|(_, changed)| !changed);
        let mut rest = wanted.into_values().peekable();
        for (slice, changed) in &mut kept {
            while slice.endpoints.len() < MAX_ENDPOINTS_PER_SLICE {
                let Some(endpoint) = rest.next() else { break };
                slice.endpoints.push(endpoint);
                *changed = true;
            }
        }
        let rest: Vec<Endpoint> = rest.collect();
        for chunk in rest.chunks(MAX_ENDPOINTS_PER_SLICE) {
            match spare.pop() {
                Some(old) => {
                    let mut slice = (*old).clone();
                    slice.ports = render_ports(&key);
                    slice.endpoints = chunk.to_vec();
                    set_meta(&mut slice.metadata, &labels, &owner);
                    plan.update.push(slice);
                }
                None => plan
                    .create
                    .push(new_slice(service, &labels, &owner, &key, chunk.to_vec())),
            }
        }
        for (mut slice, changed) in kept {
            if slice.endpoints.is_empty() {
                plan.delete.push(Arc::new(slice));
            } else if changed {
                set_meta(&mut slice.metadata, &labels, &owner);
                plan.update.push(slice);
            }
        }
    }
    plan.delete.extend(spare);
    plan
}

fn endpoint_key(endpoint: &Endpoint) -> Option<&str> {
    endpoint
        .target_ref
        .as_ref()
        .and_then(|r| r.name.as_deref())
        .or_else(|| endpoint.addresses.first().map(String::as_str))
}

fn slice_port_key(slice: &EndpointSlice) -> PortKey {
    let mut key: PortKey = slice
        .ports
        .iter()
        .flatten()
        .map(|p| ResolvedPort {
            name: p.name.clone().unwrap_or_default(),
            port: p.port.unwrap_or_default(),
            protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            app_protocol: p.app_protocol.clone(),
        })
        .collect();
    key.sort();
    key
}

fn render_ports(key: &[ResolvedPort]) -> Option<Vec<EndpointPort>> {
    (!key.is_empty()).then(|| {
        key.iter()
            .map(|p| EndpointPort {
                name: Some(p.name.clone()),
                port: Some(p.port),
                protocol: Some(p.protocol.clone()),
                app_protocol: p.app_protocol.clone(),
            })
            .collect()
    })
}

fn new_slice(
    service: &Service,
    labels: &BTreeMap<String, String>,
    owner: &OwnerReference,
    ports: &[ResolvedPort],
    endpoints: Vec<Endpoint>,
) -> EndpointSlice {
    // Generated names get five characters appended; keep within 63.
    let mut prefix = service.name_any();
    prefix.truncate(57);
    prefix.push('-');
    let mut metadata = ObjectMeta {
        generate_name: Some(prefix),
        namespace: service.metadata.namespace.clone(),
        ..ObjectMeta::default()
    };
    set_meta(&mut metadata, labels, owner);
    EndpointSlice {
        metadata,
        address_type: IPV4.into(),
        endpoints,
        ports: render_ports(ports),
    }
}

/// A Service's labels, plus the ones that say whose slice this is.
fn slice_labels(service: &Service) -> BTreeMap<String, String> {
    let mut labels = service.metadata.labels.clone().unwrap_or_default();
    labels.remove(HEADLESS_LABEL);
    labels.insert(SERVICE_NAME_LABEL.into(), service.name_any());
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    if headless(service) {
        labels.insert(HEADLESS_LABEL.into(), String::new());
    }
    labels
}

fn endpoints_labels(service: &Service) -> BTreeMap<String, String> {
    let mut labels = service.metadata.labels.clone().unwrap_or_default();
    labels.remove(HEADLESS_LABEL);
    labels.insert(
        ENDPOINTS_MANAGED_BY_LABEL.into(),
        ENDPOINTS_MANAGED_BY.into(),
    );
    if headless(service) {
        labels.insert(HEADLESS_LABEL.into(), String::new());
    }
    labels
}

fn headless(service: &Service) -> bool {
    service.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None")
}

fn owner_reference(service: &Service) -> OwnerReference {
    OwnerReference {
        api_version: "v1".into(),
        kind: "Service".into(),
        name: service.name_any(),
        uid: service.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn meta_matches(
    meta: &ObjectMeta,
    labels: &BTreeMap<String, String>,
    owner: &OwnerReference,
) -> bool {
    meta.labels.as_ref() == Some(labels)
        && meta.owner_references.as_deref() == Some(std::slice::from_ref(owner))
}

fn set_meta(meta: &mut ObjectMeta, labels: &BTreeMap<String, String>, owner: &OwnerReference) {
    meta.labels = Some(labels.clone());
    meta.owner_references = Some(vec![owner.clone()]);
}

/// The legacy Endpoints subsets: one per set of resolved ports, ready and
/// not-ready addresses sorted by IP. Terminating pods are left out unless
/// the Service publishes not-ready addresses.
fn legacy_subsets(service: &Service, members: &[Member<'_>]) -> Option<Vec<EndpointSubset>> {
    let publish = service
        .spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        .unwrap_or(false);
    // Unlike a slice, the Endpoints object lists a pod only under ports it
    // resolves; a pod with none is left out (unless the Service has none:
    // headless without ports lists addresses alone).
    let service_ports = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .is_some_and(|p| !p.is_empty());
    if !service_ports && !headless(service) {
        return None;
    }
    let mut groups: BTreeMap<&PortKey, (Vec<EndpointAddress>, Vec<EndpointAddress>)> =
        BTreeMap::new();
    for m in members {
        if (m.terminating && !publish) || (service_ports && m.ports.is_empty()) {
            continue;
        }
        let address = EndpointAddress {
            ip: m.ip.to_owned(),
            hostname: m.hostname.map(str::to_owned),
            node_name: m.pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            target_ref: Some(target_ref(m.pod)),
        };
        let (ready, not_ready) = groups.entry(&m.ports).or_default();
        if publish || m.ready {
            ready.push(address);
        } else {
            not_ready.push(address);
        }
    }
    let by_ip = |a: &EndpointAddress, b: &EndpointAddress| {
        (
            a.ip.as_str(),
            a.target_ref.as_ref().and_then(|r| r.uid.as_deref()),
        )
            .cmp(&(
                b.ip.as_str(),
                b.target_ref.as_ref().and_then(|r| r.uid.as_deref()),
            ))
    };
    let subsets: Vec<EndpointSubset> = groups
        .into_iter()
        .map(|(ports, (mut ready, mut not_ready))| {
            ready.sort_by(by_ip);
            not_ready.sort_by(by_ip);
            EndpointSubset {
                addresses: (!ready.is_empty()).then_some(ready),
                not_ready_addresses: (!not_ready.is_empty()).then_some(not_ready),
                ports: (!ports.is_empty()).then(|| {
                    ports
                        .iter()
                        .map(|p| CorePort {
                            name: (!p.name.is_empty()).then(|| p.name.clone()),
                            port: p.port,
                            protocol: Some(p.protocol.clone()),
                            app_protocol: p.app_protocol.clone(),
                        })
                        .collect()
                }),
            }
        })
        .collect();
    (!subsets.is_empty()).then_some(subsets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, from_value, json};

    fn service(spec: Value) -> Service {
        from_value(json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "svc-uid", "labels": {"app": "web"}},
            "spec": spec,
        }))
        .unwrap()
    }

    fn pod(name: &str, ip: &str, ready: bool, extra: Value) -> Pod {
        let mut pod = json!({
            "metadata": {"name": name, "namespace": "default", "uid": format!("{name}-uid"), "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                       "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        });
        merge(&mut pod, extra);
        from_value(pod).unwrap()
    }

    fn merge(target: &mut Value, patch: Value) {
        match (target, patch) {
            (Value::Object(t), Value::Object(p)) => {
                for (k, v) in p {
                    merge(t.entry(k).or_insert(Value::Null), v);
                }
            }
            (t, p) => *t = p,
        }
    }

    fn plan_for(svc: &Service, pods: &[Pod], existing: &[Arc<EndpointSlice>]) -> SlicePlan {
        let members: Vec<_> = pods.iter().filter_map(|p| member(svc, p)).collect();
        plan_slices(svc, slice_groups(svc, &members, |_| None), existing)
    }

    /// What the server would hold after `plan`: created slices get names.
    fn applied(existing: &[Arc<EndpointSlice>], plan: SlicePlan) -> Vec<Arc<EndpointSlice>> {
        let mut out: Vec<Arc<EndpointSlice>> = existing
            .iter()
            .filter(|s| {
                !plan
                    .delete
                    .iter()
                    .any(|d| d.metadata.name == s.metadata.name)
            })
            .filter(|s| {
                !plan
                    .update
                    .iter()
                    .any(|u| u.metadata.name == s.metadata.name)
            })
            .cloned()
            .collect();
        out.extend(plan.update.into_iter().map(Arc::new));
        for (i, mut slice) in plan.create.into_iter().enumerate() {
            slice.metadata.name = Some(format!("web-{}{i}", out.len()));
            out.push(Arc::new(slice));
        }
        out
    }

    #[test]
    fn conditions_follow_readiness_and_termination() {
        let svc = service(
            json!({"selector": {"app": "web"}, "ports": [{"port": 80, "protocol": "TCP", "targetPort": 8080}]}),
        );
        let pods = [
            pod("a", "10.42.0.2", true, json!({})),
            pod("b", "10.42.0.3", false, json!({})),
            pod(
                "c",
                "10.42.0.4",
                true,
                json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}),
            ),
            pod(
                "no-ip",
                "",
                true,
                json!({"status": {"podIP": null, "podIPs": null}}),
            ),
            pod(
                "done",
                "10.42.0.5",
                false,
                json!({"status": {"phase": "Succeeded"}}),
            ),
        ];
        let plan = plan_for(&svc, &pods, &[]);
        assert_eq!(plan.create.len(), 1);
        let slice = &plan.create[0];
        let got: Vec<_> = slice
            .endpoints
            .iter()
            .map(|e| {
                let c = e.conditions.clone().unwrap();
                (e.addresses[0].as_str(), c.ready, c.serving, c.terminating)
            })
            .collect();
        assert_eq!(
            got,
            [
                ("10.42.0.2", Some(true), Some(true), Some(false)),
                ("10.42.0.3", Some(false), Some(false), Some(false)),
                ("10.42.0.4", Some(false), Some(true), Some(true)),
            ]
        );
        let labels = slice.metadata.labels.clone().unwrap();
        assert_eq!(labels[SERVICE_NAME_LABEL], "web");
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(labels["app"], "web");
        assert_eq!(
            slice.metadata.owner_references.as_ref().unwrap()[0].uid,
            "svc-uid"
        );
        assert_eq!(slice.address_type, "IPv4");

        // Legacy: terminating pods are left out; not-ready ones listed apart.
        let members: Vec<_> = pods.iter().filter_map(|p| member(&svc, p)).collect();
        let subsets = legacy_subsets(&svc, &members).unwrap();
        assert_eq!(subsets.len(), 1);
        let ips = |a: &Option<Vec<EndpointAddress>>| {
            a.iter().flatten().map(|a| a.ip.clone()).collect::<Vec<_>>()
        };
        assert_eq!(ips(&subsets[0].addresses), ["10.42.0.2"]);
        assert_eq!(ips(&subsets[0].not_ready_addresses), ["10.42.0.3"]);
        assert_eq!(subsets[0].ports.as_ref().unwrap()[0].port, 8080);

        // publishNotReadyAddresses: everyone is ready, terminating included.
        let publish = service(
            json!({"selector": {"app": "web"}, "publishNotReadyAddresses": true, "ports": [{"port": 80}]}),
        );
        let plan = plan_for(&publish, &pods, &[]);
        assert!(
            plan.create[0]
                .endpoints
                .iter()
                .all(|e| e.conditions.as_ref().unwrap().ready == Some(true))
        );
        let members: Vec<_> = pods.iter().filter_map(|p| member(&publish, p)).collect();
        let subsets = legacy_subsets(&publish, &members).unwrap();
        assert_eq!(ips(&subsets[0].addresses).len(), 3);
    }

    /// A slice as (port name and number, pod names).
    type SliceView = (Vec<(String, i32)>, Vec<String>);

    #[test]
    fn named_target_ports_resolve_per_pod() {
        let svc = service(json!({"selector": {"app": "web"}, "ports": [
            {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"},
            {"name": "metrics", "port": 9090, "protocol": "TCP", "targetPort": 9100},
        ]}));
        let other: Value = json!({"spec": {"containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 9000}]}]}});
        let none: Value = json!({"spec": {"containers": [{"name": "c"}]}});
        let pods = [
            pod("a", "10.42.0.2", true, json!({})),
            pod("b", "10.42.0.3", true, other),
            pod("c", "10.42.0.4", true, none),
        ];
        let plan = plan_for(&svc, &pods, &[]);
        let mut got: Vec<SliceView> = plan
            .create
            .iter()
            .map(|s| {
                let ports = s
                    .ports
                    .iter()
                    .flatten()
                    .map(|p| (p.name.clone().unwrap(), p.port.unwrap()))
                    .collect();
                let pods = s
                    .endpoints
                    .iter()
                    .map(|e| e.target_ref.as_ref().unwrap().name.clone().unwrap())
                    .collect();
                (ports, pods)
            })
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                (
                    vec![("http".into(), 8080), ("metrics".into(), 9100)],
                    vec!["a".to_owned()]
                ),
                (
                    vec![("http".into(), 9000), ("metrics".into(), 9100)],
                    vec!["b".to_owned()]
                ),
                (vec![("metrics".into(), 9100)], vec!["c".to_owned()]),
            ]
        );

        // With only the named port, a pod without that name still has an
        // endpoint (in a slice without ports, as upstream) but no address
        // in the Endpoints object.
        let named = service(json!({"selector": {"app": "web"}, "ports": [
            {"name": "http", "port": 80, "protocol": "TCP", "targetPort": "http"},
        ]}));
        let plan = plan_for(&named, &pods, &[]);
        assert_eq!(plan.create.len(), 3);
        assert!(
            plan.create
                .iter()
                .any(|s| s.ports.is_none() && s.endpoints.len() == 1)
        );
        let members: Vec<_> = pods.iter().filter_map(|p| member(&named, p)).collect();
        let subsets = legacy_subsets(&named, &members).unwrap();
        let ports: Vec<i32> = subsets
            .iter()
            .map(|s| s.ports.as_ref().unwrap()[0].port)
            .collect();
        assert_eq!(ports, [8080, 9000]);
    }

    #[test]
    fn hostnames_only_for_the_matching_subdomain() {
        let svc = service(
            json!({"selector": {"app": "web"}, "clusterIP": "None", "ports": [{"port": 80}]}),
        );
        let pods = [
            pod(
                "web-0",
                "10.42.0.2",
                true,
                json!({"spec": {"hostname": "web-0", "subdomain": "web"}}),
            ),
            pod(
                "other-0",
                "10.42.0.3",
                true,
                json!({"spec": {"hostname": "other-0", "subdomain": "other"}}),
            ),
        ];
        let plan = plan_for(&svc, &pods, &[]);
        let hostnames: Vec<_> = plan.create[0]
            .endpoints
            .iter()
            .map(|e| e.hostname.clone())
            .collect();
        assert_eq!(hostnames, [None, Some("web-0".to_owned())]);
        assert_eq!(
            plan.create[0].metadata.labels.as_ref().unwrap()[HEADLESS_LABEL],
            ""
        );
    }

    #[test]
    fn slices_hold_at_most_100_and_updates_are_minimal() {
        let svc = service(
            json!({"selector": {"app": "web"}, "ports": [{"port": 80, "protocol": "TCP"}]}),
        );
        let mut pods: Vec<Pod> = (0..250)
            .map(|i| {
                pod(
                    &format!("p{i:03}"),
                    &format!("10.42.{}.{}", i / 200, i % 200 + 2),
                    true,
                    json!({}),
                )
            })
            .collect();
        let slices = applied(&[], plan_for(&svc, &pods, &[]));
        let mut sizes: Vec<usize> = slices.iter().map(|s| s.endpoints.len()).collect();
        sizes.sort();
        assert_eq!(sizes, [50, 100, 100]);

        // Nothing changed: nothing to write.
        let plan = plan_for(&svc, &pods, &slices);
        assert!(
            plan.create.is_empty() && plan.update.is_empty() && plan.delete.is_empty(),
            "{plan:?}"
        );

        // One pod turns unready: exactly its slice is rewritten.
        pods[7] = pod("p007", "10.42.0.9", false, json!({}));
        let plan = plan_for(&svc, &pods, &slices);
        assert!(plan.create.is_empty() && plan.delete.is_empty());
        assert_eq!(plan.update.len(), 1);
        let slices = applied(&slices, plan);

        // Two pods go, one comes: the new one fills a slice being written.
        pods.remove(3);
        pods.remove(120);
        pods.push(pod("new", "10.42.9.9", true, json!({})));
        let plan = plan_for(&svc, &pods, &slices);
        assert!(plan.create.is_empty() && plan.delete.is_empty());
        assert!(plan.update.len() <= 2);
        let slices = applied(&slices, plan);
        let total: usize = slices.iter().map(|s| s.endpoints.len()).sum();
        assert_eq!(total, 249);
        assert!(
            slices
                .iter()
                .all(|s| s.endpoints.len() <= MAX_ENDPOINTS_PER_SLICE)
        );

        // All gone: one empty placeholder is kept, nothing is created.
        let plan = plan_for(&svc, &[], &slices);
        assert!(plan.create.is_empty());
        assert_eq!(plan.update.len(), 1);
        assert_eq!(plan.delete.len(), 2);
        let slices = applied(&slices, plan);
        assert_eq!(slices.len(), 1);
        assert!(slices[0].endpoints.is_empty() && slices[0].ports.is_none());
        let plan = plan_for(&svc, &[], &slices);
        assert!(plan.create.is_empty() && plan.update.is_empty() && plan.delete.is_empty());

        // Pods back: the placeholder is reused rather than replaced.
        let plan = plan_for(&svc, &pods[..3], &slices);
        assert!(plan.create.is_empty() && plan.delete.is_empty());
        assert_eq!(plan.update[0].endpoints.len(), 3);
    }

    #[test]
    fn foreign_and_stale_slices_are_deleted() {
        let svc = service(
            json!({"selector": {"app": "web"}, "ports": [{"port": 80, "protocol": "TCP"}]}),
        );
        let pods = [pod("a", "10.42.0.2", true, json!({}))];
        let mut stale = plan_for(&svc, &pods, &[]).create.remove(0);
        stale.metadata.name = Some("web-old".into());
        stale.metadata.owner_references.as_mut().unwrap()[0].uid = "previous-service".into();
        let plan = plan_for(&svc, &pods, &[Arc::new(stale)]);
        assert_eq!(plan.create.len(), 1);
        assert_eq!(plan.delete.len(), 1);
    }
}
