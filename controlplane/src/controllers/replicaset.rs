//! ReplicaSet: keeps exactly `spec.replicas` active pods matching the
//! selector, as upstream's controller does. Pods are made from the template
//! (`generateName: <set>-`, controlled by the set), matching orphans are
//! adopted, owned pods that stop matching are released, and surplus pods
//! go in upstream's order (unscheduled, pending, not ready, … newest).
//!
//! Creates and deletes in flight are remembered ("expectations") until the
//! pod cache shows them, so a cache that lags behind the set's own writes
//! never makes it create or delete twice.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::{StreamExt, future, stream};
use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetCondition, ReplicaSetStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{self, Action, applier, trigger_self, trigger_with};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, watcher};
use kube::{Resource, ResourceExt};

use super::pod_informer::{PodChange, PodInformer, Synced};
use super::workload::{self, Availability, Claim, Retries};

const MANAGER: &str = "replicaset-controller";
/// Most pods created or deleted in one pass (upstream's `burstReplicas`).
const BURST: usize = 500;
/// Expectations the cache has not met by then are dropped, as upstream's.
const EXPECTATIONS_TIMEOUT: Duration = Duration::from_secs(300);
const REPLICA_FAILURE: &str = "ReplicaFailure";
/// Lower deletes first; set by users to steer scale-down.
const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: {1}")]
    Kube(&'static str, #[source] kube::Error),
}

struct Context {
    client: kube::Client,
    pods: Store<Pod>,
    pods_synced: Synced,
    sets: Store<ReplicaSet>,
    expectations: Expectations,
    recorder: Recorder,
    retries: Retries,
}

pub async fn run(client: kube::Client, pods: &PodInformer) {
    let (sets, sets_writer) = reflector::store::<ReplicaSet>();
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), Reporter::from(MANAGER)),
        client: client.clone(),
        pods: pods.cache(),
        pods_synced: pods.synced(),
        sets: sets.clone(),
        expectations: Expectations::default(),
        retries: Retries::default(),
    });
    let forget = ctx.clone();
    let set_changes = watcher(
        Api::<ReplicaSet>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(sets_writer)
    .inspect(move |event| {
        if let Ok(watcher::Event::Delete(set)) = event {
            let key = workload::key(&set.metadata);
            forget.expectations.forget(&key);
            forget.retries.succeeded(&key);
        }
    })
    .applied_objects();
    let observe = ctx.clone();
    let lookup = sets.clone();
    // The shared cache holds each change before it is announced.
    let pod_changes = pods.changes().map(Ok::<_, watcher::Error>);
    let queue = stream::select(
        trigger_self(set_changes, ()),
        trigger_with(pod_changes, move |change| match change {
            PodChange::Applied(pod) => sets_for_pod(&lookup, &pod),
            PodChange::Deleted(pod) => {
                observe.expectations.pod_gone(&pod);
                sets_for_pod(&lookup, &pod)
            }
            PodChange::Relisted => lookup
                .state()
                .iter()
                .map(|s| ObjectRef::from_obj(&**s))
                .collect(),
        }),
    );
    applier(
        |object, ctx| Box::pin(reconcile(object, ctx)),
        error_policy,
        ctx,
        sets,
        queue,
        controller::Config::default(),
    )
    .for_each(|result| async move {
        if let Err(error) = result {
            tracing::debug!(%error, "replicaset reconcile");
        }
    })
    .await;
}

/// The sets a pod change concerns: its controller if that is a set, else
/// (an orphan) every set in its namespace that selects it.
fn sets_for_pod(sets: &Store<ReplicaSet>, pod: &Pod) -> Vec<ObjectRef<ReplicaSet>> {
    let namespace = pod.metadata.namespace.as_deref();
    if let Some(owner) = workload::controller_of(&pod.metadata) {
        if owner.kind == "ReplicaSet" && owner.api_version == "apps/v1" {
            return vec![ObjectRef::new(&owner.name).within(namespace.unwrap_or_default())];
        }
        return Vec::new();
    }
    if !workload::is_active(pod) {
        return Vec::new();
    }
    sets.state()
        .iter()
        .filter(|set| set.metadata.namespace.as_deref() == namespace)
        .filter(|set| {
            set.spec
                .as_ref()
                .and_then(|spec| workload::selector(&spec.selector))
                .is_some_and(|s| workload::selects(&s, &pod.metadata))
        })
        .map(|set| ObjectRef::from_obj(set.as_ref()))
        .collect()
}

async fn reconcile(set: Arc<ReplicaSet>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = workload::key(&set.metadata);
    let action = sync(&set, &ctx, &key).await?;
    ctx.retries.succeeded(&key);
    Ok(action)
}

fn error_policy(set: Arc<ReplicaSet>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = workload::key(&set.metadata);
    if let Error::Kube(_, e) = error
        && workload::is_conflict(e)
    {
        tracing::debug!(replicaset = %key, %error, "replicaset sync lost a race; retrying");
        return Action::requeue(workload::CONFLICT_RETRY);
    }
    tracing::warn!(replicaset = %key, %error, "replicaset sync failed; retrying");
    Action::requeue(ctx.retries.failed(key))
}

async fn sync(set: &ReplicaSet, ctx: &Context, key: &str) -> Result<Action, Error> {
    ctx.pods_synced.wait().await;
    let namespace = set.metadata.namespace.as_deref().unwrap_or("default");
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let spec = set.spec.as_ref();
    let selector = spec.and_then(|s| workload::selector(&s.selector));

    let mut owned = Vec::new();
    if let Some(selector) = &selector {
        let mut adopt = Vec::new();
        let mut release = Vec::new();
        for pod in ctx.pods.state() {
            if pod.metadata.namespace.as_deref() != Some(namespace) || !workload::is_active(&pod) {
                continue;
            }
            match workload::claim(&set.metadata, selector, &pod.metadata) {
                Claim::Mine => owned.push(pod),
                Claim::Adopt => adopt.push(pod),
                Claim::Release => release.push(pod),
                Claim::NotMine => {}
            }
        }
        if !adopt.is_empty() {
            owned.extend(adopt_pods(set, ctx, &pods_api, &adopt).await?);
        }
        for pod in &release {
            release_pod(set, &pods_api, pod).await?;
        }
    }

    let replicas = spec.and_then(|s| s.replicas).unwrap_or(1).max(0) as usize;
    let waiting = ctx.expectations.pending(key, namespace, &ctx.pods);
    let mut failure = None;
    if waiting.is_none() && set.metadata.deletion_timestamp.is_none() && selector.is_some() {
        let result = if owned.len() < replicas {
            create_pods(set, ctx, &pods_api, replicas - owned.len(), key).await
        } else if owned.len() > replicas {
            delete_pods(set, ctx, &pods_api, &owned, owned.len() - replicas, key).await
        } else {
            Ok(())
        };
        if let Err(error) = result {
            let reason = if owned.len() < replicas {
                "FailedCreate"
            } else {
                "FailedDelete"
            };
            failure = Some((reason, error));
        }
    }

    let now = Timestamp::now();
    let (status, available_at) = status_of(set, &owned, failure.as_ref(), now);
    if set.status.as_ref() != Some(&status) {
        let api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), namespace);
        let patch = workload::status_patch(&status, set.status.as_ref());
        api.patch_status(
            &set.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
        .map_err(|e| Error::Kube("updating status", e))?;
    }
    if let Some((_, error)) = failure {
        return Err(error);
    }
    // Wake up when a ready pod becomes available, or when expectations the
    // cache never met expire.
    let wake = [available_at.map(workload::until), waiting]
        .into_iter()
        .flatten()
        .min();
    Ok(wake.map_or_else(Action::await_change, Action::requeue))
}

/// Adopts orphans, after checking with a live read that the set is still
/// there and not being deleted (the cache may be behind).
async fn adopt_pods(
    set: &ReplicaSet,
    ctx: &Context,
    pods_api: &Api<Pod>,
    orphans: &[Arc<Pod>],
) -> Result<Vec<Arc<Pod>>, Error> {
    let api: Api<ReplicaSet> = Api::namespaced(
        ctx.client.clone(),
        pods_api.namespace().unwrap_or("default"),
    );
    let fresh = api
        .get_opt(&set.name_any())
        .await
        .map_err(|e| Error::Kube("reading the replicaset before adopting", e))?;
    let can_adopt = fresh.is_some_and(|f| {
        f.metadata.uid == set.metadata.uid && f.metadata.deletion_timestamp.is_none()
    });
    let Some(reference) = workload::controller_ref(set).filter(|_| can_adopt) else {
        return Ok(Vec::new());
    };
    let params = PatchParams {
        field_manager: Some(MANAGER.into()),
        ..PatchParams::default()
    };
    let mut adopted = Vec::with_capacity(orphans.len());
    for pod in orphans {
        let uid = pod.metadata.uid.as_deref().unwrap_or_default();
        let patch = workload::adopt_patch(&reference, uid);
        match pods_api
            .patch(&pod.name_any(), &params, &Patch::Strategic(&patch))
            .await
        {
            Ok(patched) => adopted.push(Arc::new(patched)),
            Err(e) if workload::is_not_found(&e) => {}
            Err(e) => return Err(Error::Kube("adopting a pod", e)),
        }
    }
    Ok(adopted)
}

async fn release_pod(set: &ReplicaSet, pods_api: &Api<Pod>, pod: &Pod) -> Result<(), Error> {
    let patch = workload::release_patch(
        set.metadata.uid.as_deref().unwrap_or_default(),
        pod.metadata.uid.as_deref().unwrap_or_default(),
    );
    let params = PatchParams {
        field_manager: Some(MANAGER.into()),
        ..PatchParams::default()
    };
    match pods_api
        .patch(&pod.name_any(), &params, &Patch::Strategic(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if workload::is_not_found(&e) => Ok(()),
        Err(e) => Err(Error::Kube("releasing a pod", e)),
    }
}

/// Creates `count` pods in batches of 1, 2, 4, … (upstream's slow start):
/// a template the API refuses costs one request, not hundreds.
async fn create_pods(
    set: &ReplicaSet,
    ctx: &Context,
    api: &Api<Pod>,
    count: usize,
    key: &str,
) -> Result<(), Error> {
    let pod = pod_from_template(set);
    let regarding = set.object_ref(&());
    let params = PostParams {
        field_manager: Some(MANAGER.into()),
        ..PostParams::default()
    };
    let mut left = count.min(BURST);
    let mut batch = 1;
    while left > 0 {
        let size = batch.min(left);
        let results = future::join_all((0..size).map(|_| api.create(&params, &pod))).await;
        let mut first_error = None;
        for result in results {
            match result {
                Ok(created) => {
                    let name = created.name_any();
                    ctx.expectations.created(key, name.clone());
                    workload::record(
                        &ctx.recorder,
                        &regarding,
                        false,
                        "SuccessfulCreate",
                        "Create",
                        format!("Created pod: {name}"),
                    )
                    .await;
                }
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        if let Some(error) = first_error {
            workload::record(
                &ctx.recorder,
                &regarding,
                true,
                "FailedCreate",
                "Create",
                format!("Error creating: {}", workload::api_message(&error)),
            )
            .await;
            return Err(Error::Kube("creating pods", error));
        }
        left -= size;
        batch *= 2;
    }
    Ok(())
}

/// Deletes the `count` pods upstream would pick first.
async fn delete_pods(
    set: &ReplicaSet,
    ctx: &Context,
    api: &Api<Pod>,
    owned: &[Arc<Pod>],
    count: usize,
    key: &str,
) -> Result<(), Error> {
    let colocated = related_pods_per_node(set, ctx);
    let mut ranked: Vec<&Arc<Pod>> = owned.iter().collect();
    ranked.sort_by_cached_key(|pod| {
        let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
        let rank = node.and_then(|n| colocated.get(n)).copied().unwrap_or(0);
        deletion_rank(pod, rank)
    });
    ranked.truncate(count.min(BURST));
    for pod in &ranked {
        ctx.expectations.deleting(key, pod);
    }
    let deletes = ranked.iter().map(|pod| {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: pod.metadata.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        async move { api.delete(&pod.name_any(), &params).await }
    });
    let results = future::join_all(deletes).await;
    let regarding = set.object_ref(&());
    let mut first_error = None;
    for (pod, result) in ranked.iter().zip(results) {
        let name = pod.name_any();
        match result {
            Ok(_) => {
                workload::record(
                    &ctx.recorder,
                    &regarding,
                    false,
                    "SuccessfulDelete",
                    "Delete",
                    format!("Deleted pod: {name}"),
                )
                .await;
            }
            Err(error) if workload::is_not_found(&error) => ctx.expectations.pod_gone(pod),
            Err(error) => {
                ctx.expectations.pod_gone(pod);
                workload::record(
                    &ctx.recorder,
                    &regarding,
                    true,
                    "FailedDelete",
                    "Delete",
                    format!("Error deleting: {}", workload::api_message(&error)),
                )
                .await;
                first_error.get_or_insert(error);
            }
        }
    }
    match first_error {
        Some(error) => Err(Error::Kube("deleting pods", error)),
        None => Ok(()),
    }
}

/// How many active pods of this set and of its siblings (sets with the same
/// controlling owner, e.g. one Deployment's) run on each node: pods doubled
/// up on a node go first.
fn related_pods_per_node(set: &ReplicaSet, ctx: &Context) -> HashMap<String, usize> {
    let namespace = set.metadata.namespace.as_deref();
    let owner = workload::controller_of(&set.metadata).map(|r| r.uid.as_str());
    let mut related: Vec<String> = Vec::new();
    if let Some(owner) = owner {
        for sibling in ctx.sets.state() {
            if sibling.metadata.namespace.as_deref() == namespace
                && workload::controller_of(&sibling.metadata).map(|r| r.uid.as_str()) == Some(owner)
                && let Some(uid) = &sibling.metadata.uid
            {
                related.push(uid.clone());
            }
        }
    }
    if let Some(uid) = &set.metadata.uid
        && !related.contains(uid)
    {
        related.push(uid.clone());
    }
    let mut per_node = HashMap::new();
    for pod in ctx.pods.state() {
        if pod.metadata.namespace.as_deref() != namespace || !workload::is_active(&pod) {
            continue;
        }
        let Some(controller) = workload::controller_of(&pod.metadata) else {
            continue;
        };
        if !related.contains(&controller.uid) {
            continue;
        }
        if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
            *per_node.entry(node).or_insert(0) += 1;
        }
    }
    per_node
}

/// Sort key: smaller goes first. Unassigned < assigned; Pending < Unknown <
/// Running; not ready < ready; lower deletion cost; more pods doubled up on
/// the node; ready for a shorter time; more restarts; newer.
type DeletionRank = (
    bool,
    u8,
    bool,
    i32,
    Reverse<usize>,
    (bool, Reverse<Option<Timestamp>>),
    Reverse<i32>,
    (bool, Reverse<Option<Timestamp>>),
);

fn deletion_rank(pod: &Pod, colocated: usize) -> DeletionRank {
    let assigned = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .is_some_and(|n| !n.is_empty());
    let status = pod.status.as_ref();
    let phase = match status.and_then(|s| s.phase.as_deref()) {
        Some("Unknown") => 1,
        Some("Running") => 2,
        _ => 0,
    };
    let ready = workload::ready_since(pod);
    let cost = pod
        .annotations()
        .get(DELETION_COST)
        .and_then(|c| c.parse::<i32>().ok())
        .unwrap_or(0);
    // Among ready pods, one with no known ready time goes first, then the
    // most recently ready.
    let ready_time = match ready {
        Some(since) => (since.is_some(), Reverse(since)),
        None => (false, Reverse(None)),
    };
    let restarts = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|list| list.iter().map(|c| c.restart_count).max())
        .unwrap_or(0);
    let created = pod.metadata.creation_timestamp.as_ref().map(|t| t.0);
    (
        assigned,
        phase,
        ready.is_some(),
        cost,
        Reverse(colocated),
        ready_time,
        Reverse(restarts),
        (created.is_some(), Reverse(created)),
    )
}

/// The pod every create sends: the template's metadata and spec, named
/// after the set, controlled by it.
fn pod_from_template(set: &ReplicaSet) -> Pod {
    let template = set.spec.as_ref().and_then(|s| s.template.as_ref());
    let meta = template.and_then(|t| t.metadata.as_ref());
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", set.name_any())),
            namespace: set.metadata.namespace.clone(),
            labels: meta.and_then(|m| m.labels.clone()),
            annotations: meta.and_then(|m| m.annotations.clone()),
            finalizers: meta.and_then(|m| m.finalizers.clone()),
            owner_references: workload::controller_ref(set).map(|r| vec![r]),
            ..ObjectMeta::default()
        },
        spec: template.and_then(|t| t.spec.clone()),
        status: None,
    }
}

/// The set's status from its active pods; also when the next ready pod
/// becomes available, if one is waiting out `minReadySeconds`.
fn status_of(
    set: &ReplicaSet,
    pods: &[Arc<Pod>],
    failure: Option<&(&str, Error)>,
    now: Timestamp,
) -> (ReplicaSetStatus, Option<Timestamp>) {
    let spec = set.spec.as_ref();
    let min_ready = spec.and_then(|s| s.min_ready_seconds).unwrap_or(0);
    let template_labels = spec
        .and_then(|s| s.template.as_ref())
        .and_then(|t| t.metadata.as_ref())
        .map(workload::labels);
    let (mut fully_labeled, mut ready, mut available) = (0, 0, 0);
    let mut next: Option<Timestamp> = None;
    for pod in pods {
        let labels = workload::labels(&pod.metadata);
        if template_labels.is_none_or(|t| t.iter().all(|(k, v)| labels.get(k) == Some(v))) {
            fully_labeled += 1;
        }
        match workload::availability(pod, min_ready, now) {
            Availability::Yes => {
                ready += 1;
                available += 1;
            }
            Availability::At(at) => {
                ready += 1;
                next = Some(next.map_or(at, |n| n.min(at)));
            }
            Availability::No if workload::is_ready(pod) => ready += 1,
            Availability::No => {}
        }
    }
    let old = set.status.as_ref();
    let mut conditions: Vec<ReplicaSetCondition> =
        old.and_then(|s| s.conditions.clone()).unwrap_or_default();
    let has_failure = conditions.iter().any(|c| c.type_ == REPLICA_FAILURE);
    match failure {
        Some((reason, error)) if !has_failure => conditions.push(ReplicaSetCondition {
            type_: REPLICA_FAILURE.into(),
            status: "True".into(),
            reason: Some((*reason).into()),
            message: Some(error_message(error)),
            last_transition_time: Some(workload::now()),
        }),
        Some(_) => {}
        None => conditions.retain(|c| c.type_ != REPLICA_FAILURE),
    }
    let status = ReplicaSetStatus {
        replicas: pods.len() as i32,
        fully_labeled_replicas: Some(fully_labeled),
        ready_replicas: Some(ready),
        available_replicas: Some(available),
        observed_generation: set.metadata.generation,
        conditions: (!conditions.is_empty()).then_some(conditions),
        terminating_replicas: old.and_then(|s| s.terminating_replicas),
    };
    (status, next)
}

fn error_message(error: &Error) -> String {
    let Error::Kube(_, e) = error;
    workload::api_message(e)
}

/// Creates and deletes each set has in flight, until the pod cache shows
/// them. Reconciles of one set never overlap, so a set's own writes are all
/// recorded here before its next reconcile reads them.
#[derive(Default)]
struct Expectations(Mutex<HashMap<String, InFlight>>);

struct InFlight {
    /// Pods created (by name) that the cache has not shown yet.
    created: Vec<String>,
    /// Pods deleted (name, uid) that the cache still shows as live.
    deleted: Vec<(String, String)>,
    since: Instant,
}

impl Expectations {
    fn entry<R>(&self, key: &str, change: impl FnOnce(&mut InFlight) -> R) -> R {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = map.entry(key.to_owned()).or_insert_with(|| InFlight {
            created: Vec::new(),
            deleted: Vec::new(),
            since: Instant::now(),
        });
        entry.since = Instant::now();
        change(entry)
    }

    fn created(&self, key: &str, name: String) {
        self.entry(key, |e| e.created.push(name));
    }

    fn deleting(&self, key: &str, pod: &Pod) {
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        self.entry(key, |e| e.deleted.push((pod.name_any(), uid)));
    }

    /// A pod is gone: a create or delete of it is no longer in flight
    /// (a pod may come and go before the cache ever shows it).
    fn pod_gone(&self, pod: &Pod) {
        let Some(owner) = workload::controller_of(&pod.metadata) else {
            return;
        };
        let key = format!(
            "{}/{}",
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            owner.name
        );
        let name = pod.name_any();
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(entry) = map.get_mut(&key) {
            entry.created.retain(|n| *n != name);
            entry.deleted.retain(|(n, _)| *n != name);
        }
    }

    fn forget(&self, key: &str) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.remove(key);
    }

    /// `None` when nothing is in flight for the set any more; otherwise how
    /// long until its expectations expire.
    fn pending(&self, key: &str, namespace: &str, pods: &Store<Pod>) -> Option<Duration> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = map.get_mut(key)?;
        entry
            .created
            .retain(|name| pods.get(&ObjectRef::new(name).within(namespace)).is_none());
        entry.deleted.retain(|(name, uid)| {
            pods.get(&ObjectRef::new(name).within(namespace))
                .is_some_and(|p| {
                    p.metadata.uid.as_ref() == Some(uid) && p.metadata.deletion_timestamp.is_none()
                })
        });
        let elapsed = entry.since.elapsed();
        if (entry.created.is_empty() && entry.deleted.is_empty()) || elapsed >= EXPECTATIONS_TIMEOUT
        {
            if elapsed >= EXPECTATIONS_TIMEOUT {
                tracing::warn!(replicaset = %key, "pod cache never showed the set's writes; going on");
            }
            map.remove(key);
            return None;
        }
        Some(EXPECTATIONS_TIMEOUT - elapsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodSpec, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn pod(name: &str, node: Option<&str>, phase: &str, ready: bool, created: i64) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                creation_timestamp: Some(Time(Timestamp::from_second(created).unwrap())),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: node.map(Into::into),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    last_transition_time: Some(Time(Timestamp::from_second(created).unwrap())),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn surplus_pods_go_in_upstream_order() {
        let pods = [
            pod("ready-old", Some("n1"), "Running", true, 10),
            pod("ready-new", Some("n2"), "Running", true, 20),
            pod("unscheduled", None, "Pending", false, 5),
            pod("pending", Some("n1"), "Pending", false, 5),
            pod("not-ready", Some("n1"), "Running", false, 5),
        ];
        let mut order: Vec<&Pod> = pods.iter().collect();
        order.sort_by_key(|p| deletion_rank(p, 1));
        let names: Vec<String> = order.iter().map(|p| p.name_any()).collect();
        assert_eq!(
            names,
            [
                "unscheduled",
                "pending",
                "not-ready",
                "ready-new",
                "ready-old"
            ]
        );
        // A pod doubled up on a node goes before an equal one alone.
        assert!(deletion_rank(&pods[0], 3) < deletion_rank(&pods[0], 1));
    }

    #[test]
    fn status_counts_ready_and_available_pods() {
        let set = ReplicaSet {
            metadata: ObjectMeta {
                generation: Some(4),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::apps::v1::ReplicaSetSpec {
                min_ready_seconds: Some(10),
                ..Default::default()
            }),
            status: None,
        };
        let pods = vec![
            Arc::new(pod("a", Some("n"), "Running", true, 100)),
            Arc::new(pod("b", Some("n"), "Running", true, 195)),
            Arc::new(pod("c", Some("n"), "Pending", false, 195)),
        ];
        let now = Timestamp::from_second(200).unwrap();
        let (status, next) = status_of(&set, &pods, None, now);
        assert_eq!(status.replicas, 3);
        assert_eq!(status.ready_replicas, Some(2));
        assert_eq!(status.available_replicas, Some(1));
        assert_eq!(status.observed_generation, Some(4));
        assert_eq!(next, Some(Timestamp::from_second(205).unwrap()));
        assert!(status.conditions.is_none());
    }
}
