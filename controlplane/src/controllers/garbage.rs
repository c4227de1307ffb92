//! Garbage collection by `ownerReferences`, as upstream's collector does:
//! objects whose owners are all gone are deleted (in the background);
//! an owner deleted in the foreground (`foregroundDeletion` finalizer)
//! waits until its dependents are gone; an owner deleted with `orphan`
//! first takes its references off its dependents.
//!
//! Every served kind is watched metadata-only into a local cache. After
//! changes settle, the whole graph is scanned; a deletion is checked against
//! a live read of the owner first, so a cache that lags behind a freshly
//! created owner never costs its dependents.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind, PartialObjectMeta};
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, watcher};
use serde_json::json;
use tokio::sync::Notify;

use crate::apiserver::registry;
use crate::apiserver::resources::ResourceType;

const FOREGROUND: &str = "foregroundDeletion";
const ORPHAN: &str = "orphan";
/// Changes arriving within this window are handled by one scan.
const SETTLE: Duration = Duration::from_millis(500);
/// A scan also runs this often, to retry what failed.
const RESYNC: Duration = Duration::from_secs(30);

type Meta = PartialObjectMeta<DynamicObject>;

/// One watched kind and its cache.
struct Watched {
    rt: &'static ResourceType,
    resource: ApiResource,
    store: Store<Meta>,
}

/// An object as the scan sees it.
struct Node<'a> {
    kind: &'a Watched,
    meta: &'a kube::api::ObjectMeta,
}

impl Node<'_> {
    /// Being deleted and waiting on `finalizer`.
    fn deleting_with(&self, finalizer: &str) -> bool {
        self.meta.deletion_timestamp.is_some()
            && self
                .meta
                .finalizers
                .as_ref()
                .is_some_and(|f| f.iter().any(|x| x == finalizer))
    }
}

pub async fn run(client: kube::Client) {
    let changed = Arc::new(Notify::new());
    let mut watched = Vec::new();
    for rt in registry().all() {
        let gvk = GroupVersionKind::gvk(rt.group, rt.version, rt.kind);
        let resource = ApiResource::from_gvk_with_plural(&gvk, rt.plural);
        let api: Api<Meta> = Api::all_with(client.clone(), &resource);
        let writer = reflector::store::Writer::<Meta>::new(resource.clone());
        let store = writer.as_reader();
        let notify = changed.clone();
        // Only ownership matters here: keep the cache to what the scan reads.
        let stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .modify(|object: &mut Meta| {
                let meta = &mut object.metadata;
                meta.managed_fields = None;
                meta.annotations = None;
                meta.labels = None;
            })
            .reflect(writer);
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                if let Err(e) = event {
                    tracing::debug!(error = %e, "garbage collector watch error");
                }
                notify.notify_one();
            }
        });
        watched.push(Watched {
            rt,
            resource,
            store,
        });
    }
    for kind in &watched {
        if kind.store.wait_until_ready().await.is_err() {
            tracing::error!(kind = kind.rt.kind, "garbage collector cache never synced");
            return;
        }
    }
    loop {
        if let Err(e) = scan(&client, &watched).await {
            tracing::warn!(error = %e, "garbage collection pass failed");
        }
        tokio::select! {
            _ = changed.notified() => tokio::time::sleep(SETTLE).await,
            _ = tokio::time::sleep(RESYNC) => {}
        }
    }
}

async fn scan(client: &kube::Client, watched: &[Watched]) -> Result<(), kube::Error> {
    // Borrow from one snapshot of every cache: a scan allocates per object
    // only an entry in the uid index.
    let snapshot: Vec<(&Watched, Vec<Arc<Meta>>)> = watched
        .iter()
        .map(|kind| (kind, kind.store.state()))
        .collect();
    let mut nodes: HashMap<&str, Node<'_>> = HashMap::new();
    let mut dependents: Vec<(&Watched, &Meta)> = Vec::new();
    for (kind, objects) in &snapshot {
        for object in objects {
            let meta = &object.metadata;
            let Some(uid) = meta.uid.as_deref() else {
                continue;
            };
            if meta
                .owner_references
                .as_ref()
                .is_some_and(|r| !r.is_empty())
            {
                dependents.push((kind, object));
            }
            nodes.insert(uid, Node { kind, meta });
        }
    }
    // Owners (by uid) that still have dependents pointing at them.
    let mut referenced: HashSet<&str> = HashSet::new();
    for (kind, object) in &dependents {
        let meta = &object.metadata;
        let name = meta.name.as_deref().unwrap_or_default();
        let namespace = meta.namespace.as_deref();
        let refs = meta.owner_references.as_deref().unwrap_or_default();
        let mut orphaned_by: Vec<&str> = Vec::new();
        let mut any_live = false;
        let mut delete_foreground = false;
        for owner in refs {
            match nodes.get(owner.uid.as_str()) {
                Some(node) if node.deleting_with(ORPHAN) => {
                    orphaned_by.push(&owner.uid);
                    referenced.insert(&owner.uid);
                }
                Some(node) if node.deleting_with(FOREGROUND) => {
                    delete_foreground = true;
                    referenced.insert(&owner.uid);
                }
                Some(_) => {
                    any_live = true;
                    referenced.insert(&owner.uid);
                }
                None => {
                    if owner_exists(client, namespace, owner).await? {
                        any_live = true;
                    }
                }
            }
        }
        let api = api_for(client, kind, namespace);
        if !orphaned_by.is_empty() {
            let kept: Vec<_> = refs
                .iter()
                .filter(|r| !orphaned_by.contains(&r.uid.as_str()))
                .collect();
            let patch = if kept.is_empty() {
                json!({"metadata": {"ownerReferences": null}})
            } else {
                json!({"metadata": {"ownerReferences": kept}})
            };
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map(|_| ())
                .or_else(ignore_not_found)?;
            continue;
        }
        if meta.deletion_timestamp.is_some() {
            continue;
        }
        if delete_foreground {
            tracing::debug!(%name, kind = kind.rt.kind, "deleting dependent of a foreground deletion");
            api.delete(name, &DeleteParams::foreground())
                .await
                .map(|_| ())
                .or_else(ignore_not_found)?;
        } else if !any_live {
            tracing::debug!(%name, kind = kind.rt.kind, "deleting object whose owners are gone");
            api.delete(name, &DeleteParams::background())
                .await
                .map(|_| ())
                .or_else(ignore_not_found)?;
        }
    }
    // Owners waiting on dependents that are now all gone finish deleting.
    for (uid, node) in &nodes {
        if node.meta.deletion_timestamp.is_none() || referenced.contains(uid) {
            continue;
        }
        let finalizers = node.meta.finalizers.as_deref().unwrap_or_default();
        let remaining: Vec<&String> = finalizers
            .iter()
            .filter(|f| *f != FOREGROUND && *f != ORPHAN)
            .collect();
        if remaining.len() == finalizers.len() {
            continue;
        }
        let api = api_for(client, node.kind, node.meta.namespace.as_deref());
        let name = node.meta.name.as_deref().unwrap_or_default();
        let patch = json!({"metadata": {"finalizers": remaining}});
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .or_else(ignore_not_found)?;
    }
    Ok(())
}

/// Reads an owner the cache does not know, in case the cache is behind.
async fn owner_exists(
    client: &kube::Client,
    namespace: Option<&str>,
    owner: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
) -> Result<bool, kube::Error> {
    let (group, _) = match owner.api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", owner.api_version.as_str()),
    };
    let Some(rt) = registry().by_kind(group, &owner.kind) else {
        // An owner of a kind this server does not serve cannot be checked;
        // keep the dependent rather than guess.
        return Ok(true);
    };
    let gvk = GroupVersionKind::gvk(rt.group, rt.version, rt.kind);
    let resource = ApiResource::from_gvk_with_plural(&gvk, rt.plural);
    let api: Api<DynamicObject> = match (rt.namespaced, namespace) {
        (true, Some(ns)) => Api::namespaced_with(client.clone(), ns, &resource),
        _ => Api::all_with(client.clone(), &resource),
    };
    match api.get_metadata_opt(&owner.name).await? {
        Some(found) => Ok(found.metadata.uid.as_deref() == Some(owner.uid.as_str())),
        None => Ok(false),
    }
}

fn api_for(client: &kube::Client, kind: &Watched, namespace: Option<&str>) -> Api<DynamicObject> {
    match (kind.rt.namespaced, namespace) {
        (true, Some(ns)) => Api::namespaced_with(client.clone(), ns, &kind.resource),
        _ => Api::all_with(client.clone(), &kind.resource),
    }
}

/// Something already gone needs nothing more.
fn ignore_not_found(error: kube::Error) -> Result<(), kube::Error> {
    match error {
        kube::Error::Api(status) if status.code == 404 => Ok(()),
        other => Err(other),
    }
}
