//! PersistentVolumes: the binder of upstream's PV controller and a
//! local-path provisioner like the one k3s ships.
//!
//! A claim is bound to the smallest Available volume that satisfies it
//! (class, access modes, size, volume mode, selector). A claim of a class
//! whose provisioner is ours gets a fresh volume: a `hostPath` directory
//! under the storage directory of the node that first uses it — the
//! scheduler names that node in the claim's `volume.kubernetes.io/
//! selected-node` annotation (`WaitForFirstConsumer`) — with a node
//! affinity that keeps every later pod of the claim on that node. A claim
//! that names no class gets the default class, as upstream's retroactive
//! default class assignment does. A volume whose claim is gone is
//! `Released`; with reclaim policy `Delete` the volume object goes too (the
//! node's agent removes directories no volume names any more).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};

use crate::scheduler::quantity;

/// The StorageClass the API server creates at its first start.
pub const LOCAL_PATH_CLASS: &str = "local-path";
/// Our provisioner's name; k3s's is accepted too, so its manifests work.
pub const LOCAL_PATH_PROVISIONER: &str = "skiff.io/local-path";
const K3S_PROVISIONER: &str = "rancher.io/local-path";
/// Set by the scheduler on a `WaitForFirstConsumer` claim.
pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
const DEFAULT_CLASS: [&str; 2] = [
    "storageclass.kubernetes.io/is-default-class",
    "storageclass.beta.kubernetes.io/is-default-class",
];
const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";
const MANAGER: &str = "persistentvolume-controller";
/// A failed sync is retried after this long.
const RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
enum Error {
    #[error("{0}: {1}")]
    Kube(&'static str, #[source] kube::Error),
    #[error("building a volume: {0}")]
    Build(#[source] serde_json::Error),
    #[error("the object cache stopped")]
    CacheGone,
}

struct Context {
    client: kube::Client,
    claims: Store<PersistentVolumeClaim>,
    volumes: Store<PersistentVolume>,
    classes: Store<StorageClass>,
    recorder: Recorder,
    /// Where provisioned volumes live on their node.
    storage_dir: PathBuf,
}

/// Runs the binder and the provisioner until the process ends.
pub async fn run(client: kube::Client, storage_dir: PathBuf) {
    let (volumes, volumes_writer) = reflector::store::<PersistentVolume>();
    let (classes, classes_writer) = reflector::store::<StorageClass>();
    let follow_volumes = watcher(Api::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(volumes_writer)
        .for_each(|_| std::future::ready(()));
    let follow_classes = watcher(Api::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(classes_writer)
        .for_each(|_| std::future::ready(()));
    let claims_controller = Controller::new(
        Api::<PersistentVolumeClaim>::all(client.clone()),
        watcher::Config::default(),
    );
    let claims = claims_controller.store();
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), Reporter::from(MANAGER)),
        client: client.clone(),
        claims: claims.clone(),
        volumes,
        classes,
        storage_dir,
    });
    let (by_volume, by_class) = (claims.clone(), claims.clone());
    let binder = claims_controller
        .watches(
            Api::all(client.clone()),
            watcher::Config::default(),
            move |pv| claims_for_volume(&by_volume, &pv),
        )
        .watches(
            Api::<StorageClass>::all(client.clone()),
            watcher::Config::default(),
            move |class| claims_of_class(&by_class, &class.name_any()),
        )
        .run(reconcile_claim, retry, ctx.clone())
        .for_each(|result| async move {
            if let Err(error) = result {
                tracing::debug!(%error, "claim sync");
            }
        });
    let reclaimer = Controller::new(
        Api::<PersistentVolume>::all(client.clone()),
        watcher::Config::default(),
    )
    .watches(
        Api::<PersistentVolumeClaim>::all(client),
        watcher::Config::default(),
        |pvc| {
            pvc.spec
                .and_then(|s| s.volume_name)
                .filter(|n| !n.is_empty())
                .map(|name| ObjectRef::new(&name))
        },
    )
    .run(reconcile_volume, retry, ctx)
    .for_each(|result| async move {
        if let Err(error) = result {
            tracing::debug!(%error, "volume sync");
        }
    });
    tokio::join!(follow_volumes, follow_classes, binder, reclaimer);
}

fn retry<K>(_: Arc<K>, error: &Error, _: Arc<Context>) -> Action {
    tracing::warn!(%error, "volume binding failed; retrying");
    Action::requeue(RETRY)
}

async fn reconcile_claim(
    claim: Arc<PersistentVolumeClaim>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    for ready in [
        ctx.volumes.wait_until_ready().await,
        ctx.classes.wait_until_ready().await,
    ] {
        ready.map_err(|_| Error::CacheGone)?;
    }
    if claim.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let spec = claim.spec.clone().unwrap_or_default();
    if let Some(volume) = spec.volume_name.as_deref().filter(|v| !v.is_empty()) {
        return finish_binding(&claim, volume, &ctx).await;
    }
    let Some(class) = spec.storage_class_name.clone() else {
        if let Some(default) = default_class(&ctx.classes) {
            let patch = json!({"spec": {"storageClassName": default}});
            claims_api(&ctx, &claim)
                .patch(
                    &claim.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .map_err(|e| Error::Kube("assigning the default class", e))?;
            return Ok(Action::await_change());
        }
        let bound = bind_static(&claim, "", None, &ctx).await?;
        return Ok(bound.unwrap_or_else(Action::await_change));
    };
    let stored_class = ctx.classes.get(&ObjectRef::new(&class));
    let waits = stored_class
        .as_ref()
        .is_some_and(|c| c.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer"));
    let node = claim.annotations().get(SELECTED_NODE).cloned();
    if waits && node.is_none() {
        set_phase(&ctx, &claim, "Pending").await?;
        return Ok(Action::await_change());
    }
    if let Some(action) = bind_static(&claim, &class, node.as_deref(), &ctx).await? {
        return Ok(action);
    }
    let Some(stored_class) = stored_class else {
        set_phase(&ctx, &claim, "Pending").await?;
        return Ok(Action::await_change());
    };
    if !is_ours(&stored_class.provisioner) {
        let message = format!(
            "waiting for a volume to be created by the external provisioner \"{}\"",
            stored_class.provisioner
        );
        event(
            &ctx,
            &claim,
            EventType::Normal,
            "ExternalProvisioning",
            message,
        )
        .await;
        set_phase(&ctx, &claim, "Pending").await?;
        return Ok(Action::await_change());
    }
    let Some(node) = node else {
        let message = format!(
            "storage class \"{class}\" provisions node-local volumes: set its volumeBindingMode to WaitForFirstConsumer"
        );
        event(
            &ctx,
            &claim,
            EventType::Warning,
            "ProvisioningFailed",
            message,
        )
        .await;
        set_phase(&ctx, &claim, "Pending").await?;
        return Ok(Action::await_change());
    };
    provision(&claim, &stored_class, &node, &ctx).await
}

/// Binds to an existing volume when one fits; `None` when none does.
async fn bind_static(
    claim: &PersistentVolumeClaim,
    class: &str,
    node: Option<&str>,
    ctx: &Context,
) -> Result<Option<Action>, Error> {
    let want = requested(claim);
    let best = ctx
        .volumes
        .state()
        .into_iter()
        .filter(|pv| fits(pv, claim, class, node))
        .min_by_key(|pv| capacity(pv).unwrap_or(i64::MAX));
    let Some(pv) = best else {
        if class.is_empty() {
            set_phase(ctx, claim, "Pending").await?;
            let message =
                "no persistent volumes available for this claim and no storage class is set";
            event(
                ctx,
                claim,
                EventType::Normal,
                "FailedBinding",
                message.into(),
            )
            .await;
            return Ok(Some(Action::await_change()));
        }
        return Ok(None);
    };
    tracing::debug!(claim = %claim.name_any(), volume = %pv.name_any(), want, "binding to an existing volume");
    claim_volume(ctx, &pv, claim).await?;
    finish_binding(claim, &pv.name_any(), ctx).await.map(Some)
}

/// Creates a local-path volume on `node` for the claim and binds it.
async fn provision(
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    node: &str,
    ctx: &Context,
) -> Result<Action, Error> {
    let uid = claim.uid().unwrap_or_default();
    let name = format!("pvc-{uid}");
    let namespace = claim.namespace().unwrap_or_default();
    let path = ctx
        .storage_dir
        .join(format!("{name}_{namespace}_{}", claim.name_any()));
    let spec = claim.spec.clone().unwrap_or_default();
    let storage = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage").cloned())
        .unwrap_or_else(|| Quantity("1Gi".into()));
    let volume = json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": name,
            "annotations": {PROVISIONED_BY: class.provisioner},
            "finalizers": [],
        },
        "spec": {
            "capacity": {"storage": storage},
            "accessModes": spec.access_modes.clone().unwrap_or_else(|| vec!["ReadWriteOnce".into()]),
            "persistentVolumeReclaimPolicy": class.reclaim_policy.clone().unwrap_or_else(|| "Delete".into()),
            "storageClassName": class.name_any(),
            "volumeMode": spec.volume_mode.clone().unwrap_or_else(|| "Filesystem".into()),
            "hostPath": {"path": path.to_string_lossy(), "type": "DirectoryOrCreate"},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": HOSTNAME_LABEL, "operator": "In", "values": [node]},
            ]}]}},
            "claimRef": claim_ref(claim),
        },
    });
    let volume: PersistentVolume = serde_json::from_value(volume).map_err(Error::Build)?;
    let volumes: Api<PersistentVolume> = Api::all(ctx.client.clone());
    match volumes.create(&PostParams::default(), &volume).await {
        Ok(_) => {
            let message = format!("created volume {name} on node {node}");
            event(
                ctx,
                claim,
                EventType::Normal,
                "ProvisioningSucceeded",
                message,
            )
            .await;
        }
        // Made by an earlier pass whose binding did not finish.
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(Error::Kube("creating a volume", e)),
    }
    finish_binding(claim, &name, ctx).await
}

/// Points the claim at `volume` and both statuses at Bound.
async fn finish_binding(
    claim: &PersistentVolumeClaim,
    volume: &str,
    ctx: &Context,
) -> Result<Action, Error> {
    let volumes: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let pv = match volumes.get_opt(volume).await {
        Ok(Some(pv)) => pv,
        Ok(None) => {
            set_phase(ctx, claim, "Lost").await?;
            let message = format!("bound volume {volume} is gone");
            event(ctx, claim, EventType::Warning, "ClaimLost", message).await;
            return Ok(Action::await_change());
        }
        Err(e) => return Err(Error::Kube("reading the bound volume", e)),
    };
    let claimed_by = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
    match claimed_by {
        Some(r)
            if r.uid
                .as_deref()
                .is_some_and(|u| Some(u) != claim.uid().as_deref()) =>
        {
            // The volume went to another claim first.
            set_phase(ctx, claim, "Pending").await?;
            return Ok(Action::requeue(RETRY));
        }
        Some(_) => {}
        None => claim_volume(ctx, &pv, claim).await?,
    }
    let bound_name = claim.spec.as_ref().and_then(|s| s.volume_name.as_deref());
    if bound_name != Some(volume) {
        let patch = json!({
            "metadata": {"annotations": {
                "pv.kubernetes.io/bind-completed": "yes",
                "pv.kubernetes.io/bound-by-controller": "yes",
            }},
            "spec": {"volumeName": volume},
        });
        claims_api(ctx, claim)
            .patch(
                &claim.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|e| Error::Kube("binding the claim", e))?;
    }
    let pv_spec = pv.spec.clone().unwrap_or_default();
    let status = claim.status.clone().unwrap_or_default();
    if status.phase.as_deref() != Some("Bound") || status.capacity != pv_spec.capacity {
        let patch = json!({"status": {
            "phase": "Bound",
            "accessModes": pv_spec.access_modes,
            "capacity": pv_spec.capacity,
        }});
        claims_api(ctx, claim)
            .patch_status(
                &claim.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|e| Error::Kube("marking the claim bound", e))?;
    }
    if pv.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Bound") {
        volume_phase(ctx, &pv, "Bound").await?;
    }
    Ok(Action::await_change())
}

/// Keeps a volume's phase true to its claim, and reclaims it when the
/// claim is gone.
async fn reconcile_volume(pv: Arc<PersistentVolume>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.claims
        .wait_until_ready()
        .await
        .map_err(|_| Error::CacheGone)?;
    if pv.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let phase = pv.status.as_ref().and_then(|s| s.phase.as_deref());
    let Some(reference) = pv.spec.as_ref().and_then(|s| s.claim_ref.clone()) else {
        if phase != Some("Available") {
            volume_phase(&ctx, &pv, "Available").await?;
        }
        return Ok(Action::await_change());
    };
    let namespace = reference.namespace.clone().unwrap_or_default();
    let name = reference.name.clone().unwrap_or_default();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
    // Asked live, not from the cache: releasing on a stale view would
    // lose a user's data.
    let claim = claims
        .get_opt(&name)
        .await
        .map_err(|e| Error::Kube("reading the volume's claim", e))?;
    let same = |c: &PersistentVolumeClaim| reference.uid.is_none() || reference.uid == c.uid();
    if claim.as_ref().is_some_and(same) {
        return Ok(Action::await_change());
    }
    if phase != Some("Released") {
        volume_phase(&ctx, &pv, "Released").await?;
    }
    let policy = pv
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.as_deref());
    let provisioner = pv.annotations().get(PROVISIONED_BY).map(String::as_str);
    if policy == Some("Delete") && provisioner.is_some_and(is_ours) {
        let volumes: Api<PersistentVolume> = Api::all(ctx.client.clone());
        match volumes
            .delete(&pv.name_any(), &DeleteParams::default())
            .await
        {
            Ok(_) => tracing::info!(volume = %pv.name_any(), "released volume deleted"),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(Error::Kube("deleting a released volume", e)),
        }
    }
    Ok(Action::await_change())
}

/// Writes the claim reference into the volume, unless someone else's
/// write got there first (the resourceVersion is the precondition).
async fn claim_volume(
    ctx: &Context,
    pv: &PersistentVolume,
    claim: &PersistentVolumeClaim,
) -> Result<(), Error> {
    let patch = json!({
        "metadata": {"resourceVersion": pv.resource_version()},
        "spec": {"claimRef": claim_ref(claim)},
    });
    Api::<PersistentVolume>::all(ctx.client.clone())
        .patch(
            &pv.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map_err(|e| Error::Kube("claiming a volume", e))?;
    Ok(())
}

async fn volume_phase(ctx: &Context, pv: &PersistentVolume, phase: &str) -> Result<(), Error> {
    let patch = json!({"status": {"phase": phase}});
    Api::<PersistentVolume>::all(ctx.client.clone())
        .patch_status(
            &pv.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map_err(|e| Error::Kube("setting a volume's phase", e))?;
    Ok(())
}

async fn set_phase(ctx: &Context, claim: &PersistentVolumeClaim, phase: &str) -> Result<(), Error> {
    if claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some(phase) {
        return Ok(());
    }
    let patch = json!({"status": {"phase": phase}});
    claims_api(ctx, claim)
        .patch_status(
            &claim.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map_err(|e| Error::Kube("setting a claim's phase", e))?;
    Ok(())
}

async fn event(
    ctx: &Context,
    claim: &PersistentVolumeClaim,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "Binding".into(),
        secondary: None,
    };
    let reference = claim.object_ref(&());
    if let Err(e) = ctx.recorder.publish(&event, &reference).await {
        tracing::debug!(error = %e, "recording a volume event");
    }
}

fn claims_api(ctx: &Context, claim: &PersistentVolumeClaim) -> Api<PersistentVolumeClaim> {
    Api::namespaced(ctx.client.clone(), &claim.namespace().unwrap_or_default())
}

fn claim_ref(claim: &PersistentVolumeClaim) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "namespace": claim.namespace(),
        "name": claim.name_any(),
        "uid": claim.uid(),
    })
}

/// The claims a volume change concerns: its own, or, while it is free,
/// the unbound claims of its class.
fn claims_for_volume(
    claims: &Store<PersistentVolumeClaim>,
    pv: &PersistentVolume,
) -> Vec<ObjectRef<PersistentVolumeClaim>> {
    let spec = pv.spec.as_ref();
    if let Some(reference) = spec.and_then(|s| s.claim_ref.as_ref()) {
        let (Some(name), Some(namespace)) = (&reference.name, &reference.namespace) else {
            return Vec::new();
        };
        return vec![ObjectRef::new(name).within(namespace)];
    }
    let class = spec
        .and_then(|s| s.storage_class_name.as_deref())
        .unwrap_or_default();
    claims_of_class(claims, class)
}

/// Unbound claims of a class, which a class change may unblock.
fn claims_of_class(
    claims: &Store<PersistentVolumeClaim>,
    class: &str,
) -> Vec<ObjectRef<PersistentVolumeClaim>> {
    claims
        .state()
        .iter()
        .filter(|c| {
            let spec = c.spec.as_ref();
            spec.and_then(|s| s.volume_name.as_deref())
                .is_none_or(str::is_empty)
                && spec
                    .and_then(|s| s.storage_class_name.as_deref())
                    .is_none_or(|n| n == class)
        })
        .map(|c| ObjectRef::from_obj(c.as_ref()))
        .collect()
}

fn default_class(classes: &Store<StorageClass>) -> Option<String> {
    // Upstream picks the newest when several claim to be the default.
    classes
        .state()
        .into_iter()
        .filter(|c| {
            DEFAULT_CLASS
                .iter()
                .any(|a| c.annotations().get(*a).map(String::as_str) == Some("true"))
        })
        .max_by_key(|c| c.metadata.creation_timestamp.clone().map(|t| t.0))
        .map(|c| c.name_any())
}

fn is_ours(provisioner: &str) -> bool {
    provisioner == LOCAL_PATH_PROVISIONER || provisioner == K3S_PROVISIONER
}

/// Whether an existing volume can serve `claim` (of `class`, used first
/// on `node` when the class waits for a consumer).
fn fits(
    pv: &PersistentVolume,
    claim: &PersistentVolumeClaim,
    class: &str,
    node: Option<&str>,
) -> bool {
    let (Some(spec), Some(want)) = (pv.spec.as_ref(), claim.spec.as_ref()) else {
        return false;
    };
    if pv.metadata.deletion_timestamp.is_some()
        || pv
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p != "Available")
    {
        return false;
    }
    if let Some(r) = &spec.claim_ref {
        // Pre-bound to a claim: only that one.
        let named = r.name == claim.metadata.name && r.namespace == claim.metadata.namespace;
        if !named
            || r.uid
                .as_ref()
                .is_some_and(|u| Some(u) != claim.metadata.uid.as_ref())
        {
            return false;
        }
    }
    if spec.storage_class_name.as_deref().unwrap_or_default() != class {
        return false;
    }
    let mode = |m: &Option<String>| m.clone().unwrap_or_else(|| "Filesystem".into());
    if mode(&spec.volume_mode) != mode(&want.volume_mode) {
        return false;
    }
    let modes = spec.access_modes.clone().unwrap_or_default();
    if !want
        .access_modes
        .iter()
        .flatten()
        .all(|m| modes.contains(m))
    {
        return false;
    }
    if capacity(pv).is_none_or(|c| c < requested(claim)) {
        return false;
    }
    if let Some(selector) = &want.selector {
        let labels = pv.metadata.labels.clone().unwrap_or_default();
        if !selects(selector, &labels) {
            return false;
        }
    }
    match (node, node_names(pv)) {
        (Some(node), Some(names)) => names.iter().any(|n| n == node),
        _ => true,
    }
}

fn selects(
    selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    labels: &BTreeMap<String, String>,
) -> bool {
    use kube::core::{Selector, SelectorExt};
    Selector::try_from(selector.clone()).is_ok_and(|s| s.matches(labels))
}

/// The hostnames a volume's node affinity allows, when it is that simple.
fn node_names(pv: &PersistentVolume) -> Option<Vec<String>> {
    let terms = &pv
        .spec
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required
        .as_ref()?
        .node_selector_terms;
    let mut names = Vec::new();
    for term in terms {
        for e in term.match_expressions.iter().flatten() {
            if e.key == HOSTNAME_LABEL && e.operator == "In" {
                names.extend(e.values.iter().flatten().cloned());
            }
        }
    }
    Some(names)
}

fn capacity(pv: &PersistentVolume) -> Option<i64> {
    let q = pv.spec.as_ref()?.capacity.as_ref()?.get("storage")?;
    quantity::Quantity::parse(&q.0).map(|q| q.value())
}

fn requested(claim: &PersistentVolumeClaim) -> i64 {
    claim
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .and_then(|q| quantity::Quantity::parse(&q.0))
        .map_or(0, |q| q.value())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pv(extra: Value) -> PersistentVolume {
        let mut base = json!({
            "metadata": {"name": "pv1"},
            "spec": {"capacity": {"storage": "5Gi"}, "accessModes": ["ReadWriteOnce"],
                     "storageClassName": "manual", "hostPath": {"path": "/tmp/x"}},
            "status": {"phase": "Available"},
        });
        merge(&mut base, extra);
        serde_json::from_value(base).expect("a volume")
    }

    fn claim(extra: Value) -> PersistentVolumeClaim {
        let mut base = json!({
            "metadata": {"name": "data", "namespace": "default", "uid": "u1"},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "manual",
                     "resources": {"requests": {"storage": "1Gi"}}},
        });
        merge(&mut base, extra);
        serde_json::from_value(base).expect("a claim")
    }

    fn merge(into: &mut Value, from: Value) {
        if let (Value::Object(a), Value::Object(b)) = (&mut *into, &from) {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(Value::Null), v.clone());
            }
        } else {
            *into = from;
        }
    }

    #[test]
    fn a_volume_fits_by_class_size_modes_and_selector() {
        let c = claim(json!({}));
        assert!(fits(&pv(json!({})), &c, "manual", None));
        assert!(!fits(&pv(json!({})), &c, "other", None));
        assert!(!fits(
            &pv(json!({"spec": {"capacity": {"storage": "512Mi"}}})),
            &c,
            "manual",
            None
        ));
        assert!(!fits(
            &pv(json!({"spec": {"accessModes": ["ReadOnlyMany"]}})),
            &c,
            "manual",
            None
        ));
        assert!(!fits(
            &pv(json!({"status": {"phase": "Released"}})),
            &c,
            "manual",
            None
        ));
        let picky = claim(json!({"spec": {"selector": {"matchLabels": {"tier": "db"}}}}));
        assert!(!fits(&pv(json!({})), &picky, "manual", None));
        assert!(fits(
            &pv(json!({"metadata": {"labels": {"tier": "db"}}})),
            &picky,
            "manual",
            None
        ));
    }

    #[test]
    fn a_pre_bound_volume_serves_only_its_claim_and_node() {
        let c = claim(json!({}));
        let other = pv(json!({"spec": {"claimRef": {"namespace": "default", "name": "logs"}}}));
        assert!(!fits(&other, &c, "manual", None));
        let mine = pv(
            json!({"spec": {"claimRef": {"namespace": "default", "name": "data", "uid": "u1"}}}),
        );
        assert!(fits(&mine, &c, "manual", None));
        let pinned = pv(
            json!({"spec": {"nodeAffinity": {"required": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": HOSTNAME_LABEL, "operator": "In", "values": ["n1"]}]}]}}}}),
        );
        assert!(fits(&pinned, &c, "manual", Some("n1")));
        assert!(!fits(&pinned, &c, "manual", Some("n2")));
    }
}
