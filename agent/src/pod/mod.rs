//! Pods on this node: a watch on pods bound here feeds one worker task
//! per pod (by uid), which runs its containers and reports its status.
//! At start, pods found on disk whose objects are gone are torn down.

mod env;
mod probe;
mod probe_grpc;
mod probe_tls;
mod reclaim;
mod sa_token;
mod service_env;
mod status;
mod volumes;
mod worker;

pub(crate) use worker::CONTAINERS_RECORD;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolume, PersistentVolumeClaim, Pod, Secret, Service,
};
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, watcher};
use tokio::sync::watch;

use crate::AgentConfig;
use crate::cgroups::CgroupLayout;
use crate::dns::ClusterDns;
use crate::image_source::ImageSource;
use crate::runtime::Runtime;
use crate::sandbox::PodNetwork;

/// How long a crashing container waits before its next start.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_secs(10),
            max: Duration::from_secs(300),
        }
    }
}

/// What every pod worker shares.
pub struct Context {
    pub client: kube::Client,
    pub config: Arc<AgentConfig>,
    pub runtime: Arc<dyn Runtime>,
    pub images: Arc<dyn ImageSource>,
    pub network: watch::Receiver<Option<Arc<dyn PodNetwork>>>,
    pub config_maps: Store<ConfigMap>,
    pub secrets: Store<Secret>,
    pub claims: Store<PersistentVolumeClaim>,
    pub volumes: Store<PersistentVolume>,
    pub cgroups: CgroupLayout,
    pub dns: ClusterDns,
}

impl Context {
    pub fn pods_dir(&self) -> PathBuf {
        self.config.data_dir.join("pods")
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.config.data_dir.join("logs")
    }

    pub fn ns_dir(&self) -> PathBuf {
        self.config.data_dir.join("ns")
    }

    fn network(&self) -> Option<Arc<dyn PodNetwork>> {
        self.network.borrow().clone()
    }
}

impl env::Sources for Context {
    fn config_map(&self, namespace: &str, name: &str) -> Option<ConfigMap> {
        self.config_maps
            .get(&ObjectRef::new(name).within(namespace))
            .map(|c| (*c).clone())
    }

    fn secret(&self, namespace: &str, name: &str) -> Option<Secret> {
        self.secrets
            .get(&ObjectRef::new(name).within(namespace))
            .map(|s| (*s).clone())
    }
}

impl volumes::Claims for Context {
    fn claim_path(&self, namespace: &str, claim: &str) -> Result<PathBuf, String> {
        let pvc = self
            .claims
            .get(&ObjectRef::new(claim).within(namespace))
            .ok_or_else(|| format!("persistentvolumeclaim \"{claim}\" not found"))?;
        let volume = pvc
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.clone())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| format!("persistentvolumeclaim \"{claim}\" is not bound"))?;
        let pv = self
            .volumes
            .get(&ObjectRef::new(&volume))
            .ok_or_else(|| format!("persistentvolume \"{volume}\" not found"))?;
        let spec = pv.spec.as_ref();
        spec.and_then(|s| s.host_path.as_ref().map(|h| h.path.clone()))
            .or_else(|| spec.and_then(|s| s.local.as_ref().map(|l| l.path.clone())))
            .map(PathBuf::from)
            .ok_or_else(|| format!("persistentvolume \"{volume}\" is neither hostPath nor local"))
    }
}

/// Starts the caches pod workers read from.
pub fn caches(
    client: &kube::Client,
) -> (
    Store<ConfigMap>,
    Store<Secret>,
    Store<PersistentVolumeClaim>,
    Store<PersistentVolume>,
) {
    (
        cache(Api::all(client.clone())),
        cache(Api::all(client.clone())),
        cache(Api::all(client.clone())),
        cache(Api::all(client.clone())),
    )
}

fn cache<K>(api: Api<K>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(forget_managed_fields)
        .reflect(writer)
        .for_each(|event| async move {
            if let Err(e) = event {
                tracing::debug!(error = %e, "agent cache watch error");
            }
        });
    tokio::spawn(stream);
    reader
}

/// The agent reads no field ownership, and every object's managedFields
/// (a JSON tree per writer) would otherwise stay in its caches.
fn forget_managed_fields<K: kube::Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// The watch of the pods bound to this node and the cache it fills; the
/// cache is shared with the kubelet API, the events drive [`run`].
pub struct NodePods {
    pub store: Store<Pod>,
    events: futures::stream::BoxStream<'static, Result<watcher::Event<Pod>, watcher::Error>>,
}

impl NodePods {
    pub fn watch(client: &kube::Client, node_name: &str) -> NodePods {
        let pods: Api<Pod> = Api::all(client.clone());
        let selector = format!("spec.nodeName={node_name}");
        let (store, writer) = reflector::store();
        let events = watcher(pods, watcher::Config::default().fields(&selector))
            .default_backoff()
            .modify(forget_managed_fields)
            .reflect(writer)
            .boxed();
        NodePods { store, events }
    }
}

/// Runs pods bound to this node until the process stops.
pub async fn run(ctx: Arc<Context>, pods: NodePods) {
    if let Some(storage) = reclaim::storage_dir(&ctx.config.data_dir) {
        tokio::spawn(reclaim::run(storage, ctx.volumes.clone()));
    }
    // For the Service variables of containers.
    let services: Store<Service> = cache(Api::all(ctx.client.clone()));
    let NodePods { store, mut events } = pods;
    let mut workers: HashMap<String, watch::Sender<Option<Arc<Pod>>>> = HashMap::new();
    let (done_tx, mut done_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut adopted = false;
    loop {
        tokio::select! {
            event = events.next() => match event {
                None => return,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "pod watch error");
                    continue;
                }
                Some(Ok(_)) => {}
            },
            Some(uid) = done_rx.recv() => {
                workers.remove(&uid);
                continue;
            }
        }
        if !adopted {
            if store.wait_until_ready().now_or_never().is_none() {
                continue;
            }
            adopted = true;
            // Pods on disk without an object: removed while we were down.
            for uid in on_disk(&ctx) {
                if !store
                    .state()
                    .iter()
                    .any(|p| p.metadata.uid.as_deref() == Some(uid.as_str()))
                {
                    let (tx, rx) = watch::channel(None);
                    workers.insert(uid.clone(), tx);
                    spawn_worker(&ctx, &services, uid, rx, done_tx.clone());
                }
            }
        }
        let state = store.state();
        let mut seen = std::collections::HashSet::new();
        for pod in state {
            let Some(uid) = pod.metadata.uid.clone() else {
                continue;
            };
            seen.insert(uid.clone());
            match workers.get(&uid) {
                Some(tx) => {
                    tx.send_if_modified(|current| {
                        let changed = current.as_ref().map(|p| &p.metadata.resource_version)
                            != Some(&pod.metadata.resource_version);
                        if changed {
                            *current = Some(pod.clone());
                        }
                        changed
                    });
                }
                None => {
                    let (tx, rx) = watch::channel(Some(pod.clone()));
                    workers.insert(uid.clone(), tx);
                    spawn_worker(&ctx, &services, uid, rx, done_tx.clone());
                }
            }
        }
        for (uid, tx) in &workers {
            if !seen.contains(uid) && tx.borrow().is_some() {
                let _ = tx.send(None);
            }
        }
    }
}

fn spawn_worker(
    ctx: &Arc<Context>,
    services: &Store<Service>,
    uid: String,
    rx: watch::Receiver<Option<Arc<Pod>>>,
    done: tokio::sync::mpsc::UnboundedSender<String>,
) {
    let ctx = ctx.clone();
    let services = services.clone();
    tokio::spawn(async move {
        worker::run(ctx, services, uid.clone(), rx).await;
        let _ = done.send(uid);
    });
}

fn on_disk(ctx: &Context) -> Vec<String> {
    let mut uids: Vec<String> = std::fs::read_dir(ctx.pods_dir())
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for (_, uid) in ctx.cgroups.existing_pods() {
        if !uids.contains(&uid) {
            uids.push(uid);
        }
    }
    uids
}
