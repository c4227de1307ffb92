//! DaemonSet: one pod on every eligible node — the node matches the
//! template's nodeSelector and required node affinity, and the pod
//! tolerates its NoSchedule/NoExecute taints (daemon pods get upstream's
//! default tolerations for not-ready, unreachable, pressure and
//! unschedulable nodes). Each pod is pinned to its node the upstream way,
//! by a required node affinity `matchFields metadata.name In [node]`, and
//! the scheduler binds it. Nodes joining, leaving or changing labels and
//! taints are followed; a RollingUpdate replaces old pods within
//! maxUnavailable, or surges new ones first within maxSurge. Template
//! history is kept as ControllerRevisions ([`super::revision`]).
//!
//! Nodes come from a watch-fed cache (many sets, one watch); each set's
//! pods are read from the API on every reconcile, so a pod just created is
//! never created twice because a cache had not seen it yet.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::{ControllerRevision, DaemonSet, DaemonSetSpec, DaemonSetStatus};
use k8s_openapi::api::core::v1::{
    Affinity, Node, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod,
    PodSpec, Taint, Toleration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::core::Selector;
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher::{self, watcher};
use serde_json::json;
use tokio::sync::Notify;

use super::pod_informer::PodInformer;
use super::revision::{self, Snapshot};

/// On pods and revisions: the hash of the template they come from.
const REVISION_LABEL: &str = "controller-revision-hash";
const GENERATION_LABEL: &str = "pod-template-generation";
/// What daemon pods tolerate so that node trouble does not evict them.
const DEFAULT_TOLERATIONS: [(&str, &str); 6] = [
    ("node.kubernetes.io/not-ready", "NoExecute"),
    ("node.kubernetes.io/unreachable", "NoExecute"),
    ("node.kubernetes.io/disk-pressure", "NoSchedule"),
    ("node.kubernetes.io/memory-pressure", "NoSchedule"),
    ("node.kubernetes.io/pid-pressure", "NoSchedule"),
    ("node.kubernetes.io/unschedulable", "NoSchedule"),
];
/// Host-network daemons (network plugins) run before the network is up.
const NETWORK_UNAVAILABLE: &str = "node.kubernetes.io/network-unavailable";
/// Pod creates and deletes in flight at once for one set.
const PARALLEL_WRITES: usize = 16;
const RESYNC: Duration = Duration::from_secs(300);
const RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("daemonset {0}: {1}")]
    Kube(String, #[source] kube::Error),
    #[error("daemonset {0}: encoding its template: {1}")]
    Encode(String, #[source] serde_json::Error),
}

struct Context {
    client: kube::Client,
    recorder: Recorder,
    nodes: Store<Node>,
}

pub async fn run(client: kube::Client, pods: &PodInformer) {
    let (nodes, writer) = reflector::store::<Node>();
    let changed = Arc::new(Notify::new());
    let node_watch = watch_nodes(Api::all(client.clone()), writer, changed.clone());
    let controller = async {
        if nodes.wait_until_ready().await.is_err() {
            tracing::error!("daemonset controller: node cache never synced");
            return;
        }
        let node_changes = futures::stream::unfold(changed, |changed| async move {
            changed.notified().await;
            Some(((), changed))
        });
        let reporter = Reporter {
            controller: "daemonset-controller".into(),
            instance: None,
        };
        let context = Arc::new(Context {
            recorder: Recorder::new(client.clone(), reporter),
            client: client.clone(),
            nodes,
        });
        Controller::new(
            Api::<DaemonSet>::all(client.clone()),
            watcher::Config::default(),
        )
        .reconcile_on(pods.controllers::<DaemonSet>())
        .reconcile_all_on(node_changes)
        .run(reconcile, retry, context)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "daemonset reconcile failed");
            }
        })
        .await;
    };
    tokio::join!(node_watch, controller);
}

/// Feeds the node cache; signals `changed` when a node comes or goes or
/// its labels or taints change (not on every status heartbeat).
async fn watch_nodes(api: Api<Node>, writer: reflector::store::Writer<Node>, changed: Arc<Notify>) {
    let mut seen: HashMap<String, u64> = HashMap::new();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    let mut stream = std::pin::pin!(stream);
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(node)) => {
                let name = node.metadata.name.as_deref().unwrap_or_default();
                let print = placement_fingerprint(&node);
                if seen.get(name) != Some(&print) {
                    seen.insert(name.to_owned(), print);
                    changed.notify_one();
                }
            }
            // A (re)list: one signal once it is complete.
            Ok(watcher::Event::InitApply(node)) => {
                let name = node.metadata.name.clone().unwrap_or_default();
                seen.insert(name, placement_fingerprint(&node));
            }
            Ok(watcher::Event::Delete(node)) => {
                if let Some(name) = &node.metadata.name {
                    seen.remove(name);
                }
                changed.notify_one();
            }
            Ok(watcher::Event::Init) => seen.clear(),
            Ok(watcher::Event::InitDone) => changed.notify_one(),
            Err(e) => tracing::debug!(error = %e, "daemonset node watch error"),
        }
    }
}

/// What about a node decides where daemon pods go.
fn placement_fingerprint(node: &Node) -> u64 {
    let mut hasher = DefaultHasher::new();
    node.metadata.labels.hash(&mut hasher);
    node.metadata.deletion_timestamp.is_some().hash(&mut hasher);
    for taint in node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or_default()
    {
        (&taint.key, &taint.value, &taint.effect).hash(&mut hasher);
    }
    hasher.finish()
}

async fn reconcile(ds: Arc<DaemonSet>, ctx: Arc<Context>) -> Result<Action, Error> {
    let meta = &ds.metadata;
    let (Some(name), Some(namespace), Some(uid), Some(spec)) = (
        meta.name.as_deref(),
        meta.namespace.as_deref(),
        meta.uid.as_deref(),
        ds.spec.as_ref(),
    ) else {
        return Ok(Action::await_change());
    };
    // Its pods go with it, by the garbage collector.
    if meta.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let set = Daemons::new(&ctx, &ds, spec, name, namespace, uid);
    let selector = match Selector::try_from(spec.selector.clone()) {
        Ok(selector) if !selector.selects_all() => selector,
        Ok(_) => {
            set.event(
                EventType::Warning,
                "SelectingAll",
                "Sync",
                "This daemon set is selecting all pods. A non-empty selector is required.".into(),
            )
            .await;
            return Ok(Action::await_change());
        }
        Err(e) => {
            set.event(EventType::Warning, "InvalidSelector", "Sync", e.to_string())
                .await;
            return Ok(Action::await_change());
        }
    };
    set.sync(&selector).await
}

fn retry(_ds: Arc<DaemonSet>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(%error, "daemonset sync failed; retrying");
    Action::requeue(RETRY)
}

/// One reconcile's view of a set.
struct Daemons<'a> {
    ctx: &'a Context,
    ds: &'a DaemonSet,
    spec: &'a DaemonSetSpec,
    name: &'a str,
    uid: &'a str,
    key: String,
    pods: Api<Pod>,
    revisions: Api<ControllerRevision>,
    /// The template's pod spec with the daemon tolerations: what placement
    /// is judged by and what new pods start from.
    pod_spec: PodSpec,
    min_ready: i32,
    now: Timestamp,
}

/// The set's pods on one node, oldest first.
struct OnNode<'p> {
    node: &'p str,
    pods: Vec<&'p Pod>,
    should_run: bool,
    may_stay: bool,
}

/// Writes one sync decides on.
#[derive(Default)]
struct Plan<'p> {
    create: Vec<&'p str>,
    /// Pods to delete; `true` forces it (its node is gone, so no agent
    /// will finish a graceful deletion).
    delete: Vec<(&'p Pod, bool)>,
}

impl<'a> Daemons<'a> {
    fn new(
        ctx: &'a Context,
        ds: &'a DaemonSet,
        spec: &'a DaemonSetSpec,
        name: &'a str,
        namespace: &str,
        uid: &'a str,
    ) -> Self {
        Daemons {
            ctx,
            ds,
            spec,
            name,
            uid,
            key: format!("{namespace}/{name}"),
            pods: Api::namespaced(ctx.client.clone(), namespace),
            revisions: Api::namespaced(ctx.client.clone(), namespace),
            pod_spec: daemon_pod_spec(spec.template.spec.clone().unwrap_or_default()),
            min_ready: spec.min_ready_seconds.unwrap_or(0),
            now: Timestamp::now(),
        }
    }

    async fn sync(&self, selector: &Selector) -> Result<Action, Error> {
        let listed = self
            .pods
            .list(&ListParams::default().labels_from(selector))
            .await
            .map_err(|e| self.kube(e))?;
        let mut pods: Vec<Pod> = Vec::with_capacity(listed.items.len());
        for pod in listed.items {
            match revision::controller_of(&pod.metadata) {
                Some(owner) if owner.uid == self.uid => pods.push(pod),
                Some(_) => {}
                None if revision::is_terminating(&pod) => {}
                None => {
                    self.adopt(&pod).await?;
                    pods.push(pod);
                }
            }
        }

        let mut history = revision::owned(&self.revisions, selector, self.uid)
            .await
            .map_err(|e| self.kube(e))?;
        let prior = self.ds.status.as_ref();
        let collisions = prior.and_then(|s| s.collision_count);
        let snapshot = Snapshot::new(
            self.name,
            &self.spec.template,
            collisions,
            REVISION_LABEL,
            self.owner(),
            self.ds.metadata.annotations.clone(),
        )
        .map_err(|e| Error::Encode(self.key.clone(), e))?;
        let fallback_hash = snapshot.hash.clone();
        let Some(current) = revision::record(&self.revisions, &mut history, snapshot)
            .await
            .map_err(|e| self.kube(e))?
        else {
            return self.bump_collisions(collisions).await;
        };
        // An equal template recorded under an older collision count keeps
        // its hash.
        let hash = history[current]
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(REVISION_LABEL))
            .cloned()
            .unwrap_or(fallback_hash);

        let nodes = self.ctx.nodes.state();
        let mut by_node: HashMap<&str, Vec<&Pod>> = HashMap::new();
        for pod in &pods {
            if let Some(node) = target_node(pod) {
                by_node.entry(node).or_default().push(pod);
            }
        }
        let mut placed: Vec<OnNode<'_>> = Vec::with_capacity(nodes.len());
        for node in &nodes {
            let Some(name) = node.metadata.name.as_deref() else {
                continue;
            };
            let (should_run, may_stay) = placement(node, name, &self.pod_spec);
            let mut here = by_node.remove(name).unwrap_or_default();
            here.sort_by(|a, b| revision::by_age(a, b));
            placed.push(OnNode {
                node: name,
                pods: here,
                should_run,
                may_stay,
            });
        }

        let (status, wake) = self.status(&placed, &hash);
        if prior != Some(&status) {
            self.write_status(&status).await?;
        }

        let mut plan = Plan::default();
        // Pods whose node is gone.
        for pod in by_node.into_values().flatten() {
            if !revision::is_terminating(pod) || bound(pod) {
                plan.delete.push((pod, bound(pod)));
            }
        }
        for on in &placed {
            self.manage(on, &hash, &mut plan).await;
        }
        // Rolling only once the placement is settled, as upstream.
        let strategy = self.spec.update_strategy.as_ref();
        if plan.create.is_empty()
            && plan.delete.is_empty()
            && strategy.and_then(|s| s.type_.as_deref()) != Some("OnDelete")
        {
            self.roll(&placed, &hash, status.desired_number_scheduled, &mut plan);
        }
        self.execute(plan, &hash).await?;

        let limit = self.spec.revision_history_limit.unwrap_or(10);
        let live = |r: &ControllerRevision| {
            let of = r
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(REVISION_LABEL));
            of == Some(&hash) || pods.iter().any(|p| pod_hash(p) == of.map(String::as_str))
        };
        revision::truncate(&self.revisions, &history, live, limit)
            .await
            .map_err(|e| self.kube(e))?;
        Ok(Action::requeue(wake.unwrap_or(RESYNC)))
    }

    /// What one node needs: a pod where one should run, none where none
    /// may stay, failed pods replaced, duplicates removed.
    async fn manage<'p>(&self, on: &OnNode<'p>, hash: &str, plan: &mut Plan<'p>) {
        if on.should_run && on.pods.is_empty() {
            plan.create.push(on.node);
            return;
        }
        if !on.may_stay {
            for pod in on.pods.iter().filter(|p| !revision::is_terminating(p)) {
                plan.delete.push((pod, false));
            }
            return;
        }
        let mut running: Vec<&Pod> = Vec::with_capacity(on.pods.len());
        for pod in on.pods.iter().copied() {
            if revision::is_terminating(pod) {
                continue;
            }
            if matches!(revision::phase(pod), "Failed" | "Succeeded") {
                let note = format!(
                    "Found failed daemon pod {} on node {}, will try to kill it",
                    pod.metadata.name.as_deref().unwrap_or_default(),
                    on.node
                );
                self.event(EventType::Warning, "FailedDaemonPod", "Delete", note)
                    .await;
                plan.delete.push((pod, false));
            } else {
                running.push(pod);
            }
        }
        if self.max_surge_setting().is_none() {
            // Only the oldest may stay.
            plan.delete
                .extend(running.iter().skip(1).map(|p| (*p, false)));
            return;
        }
        if running.len() <= 1 {
            if running.is_empty() && on.should_run {
                plan.create.push(on.node);
            }
            return;
        }
        // Surging: an old pod may stay beside the oldest new one until that
        // is available; everything else goes.
        let mut oldest_new: Option<&Pod> = None;
        let mut oldest_old: Option<&Pod> = None;
        for pod in running {
            let slot = if pod_hash(pod) == Some(hash) {
                &mut oldest_new
            } else {
                &mut oldest_old
            };
            if slot.is_none() {
                *slot = Some(pod);
            } else {
                plan.delete.push((pod, false));
            }
        }
        if let (Some(new), Some(old)) = (oldest_new, oldest_old)
            && (!revision::is_ready(old) || revision::is_available(new, self.min_ready, self.now))
        {
            plan.delete.push((old, false));
        }
    }

    /// Rolls old pods to the current template, upstream's way: without
    /// surge, delete old pods while at most maxUnavailable nodes lack an
    /// available pod (the manage pass then creates new ones); with surge,
    /// start new pods beside old ones (at most maxSurge at once) and delete
    /// each old pod once its replacement is available.
    fn roll<'p>(&self, placed: &[OnNode<'p>], hash: &str, desired: i32, plan: &mut Plan<'p>) {
        let (max_surge, max_unavailable) = self.rolling_limits(desired);
        let available = |pod: &Pod| revision::is_available(pod, self.min_ready, self.now);
        if max_surge == 0 {
            let mut unavailable = 0;
            let mut replace: Vec<&Pod> = Vec::new();
            let mut candidates: Vec<&Pod> = Vec::new();
            for on in placed.iter().filter(|on| !on.pods.is_empty()) {
                match versions_on(&on.pods, hash) {
                    Some((Some(new), None)) => {
                        unavailable += i32::from(!available(new));
                    }
                    Some((None, Some(old))) => {
                        if !available(old) {
                            replace.push(old);
                            unavailable += 1;
                        } else if unavailable < max_unavailable {
                            candidates.push(old);
                        }
                    }
                    // Nothing, both, or duplicates: the manage pass sorts
                    // it out; meanwhile the node counts as unavailable.
                    _ => unavailable += 1,
                }
            }
            let room = usize::try_from((max_unavailable - unavailable).max(0)).unwrap_or(0);
            let chosen = replace.into_iter().chain(candidates.into_iter().take(room));
            plan.delete.extend(chosen.map(|p| (p, false)));
            return;
        }
        let mut surging = 0;
        for on in placed.iter().filter(|on| !on.pods.is_empty()) {
            match versions_on(&on.pods, hash) {
                None => surging += 1,
                Some((_, None)) => {}
                Some((None, Some(old))) => {
                    if !available(old) {
                        plan.create.push(on.node);
                    } else if surging < max_surge {
                        plan.create.push(on.node);
                        surging += 1;
                    }
                }
                Some((Some(new), Some(old))) => {
                    if available(new) {
                        plan.delete.push((old, false));
                    } else {
                        surging += 1;
                    }
                }
            }
        }
    }

    /// maxSurge and maxUnavailable as pod counts out of `desired`.
    fn rolling_limits(&self, desired: i32) -> (i32, i32) {
        let rolling = self
            .spec
            .update_strategy
            .as_ref()
            .and_then(|s| s.rolling_update.as_ref());
        let surge = scaled(self.max_surge_setting(), desired).unwrap_or(0);
        let unavailable =
            scaled(rolling.and_then(|r| r.max_unavailable.as_ref()), desired).unwrap_or(1);
        if surge == 0 && unavailable == 0 {
            return (0, 1);
        }
        (surge, unavailable)
    }

    /// The maxSurge setting, when it allows surging at all.
    fn max_surge_setting(&self) -> Option<&IntOrString> {
        let surge = self
            .spec
            .update_strategy
            .as_ref()
            .filter(|s| s.type_.as_deref() != Some("OnDelete"))?
            .rolling_update
            .as_ref()?
            .max_surge
            .as_ref()?;
        match surge {
            IntOrString::Int(0) => None,
            IntOrString::String(s) if s == "0" || s == "0%" => None,
            other => Some(other),
        }
    }

    async fn execute(&self, plan: Plan<'_>, hash: &str) -> Result<(), Error> {
        // Futures collected first: a lazy `map` in the stream trips
        // rustc's higher-ranked `Send` inference.
        let creates: Vec<_> = plan
            .create
            .into_iter()
            .map(|node| self.create(node, hash))
            .collect();
        let deletes: Vec<_> = plan
            .delete
            .into_iter()
            .map(|(pod, force)| self.delete(pod, force))
            .collect();
        let creates = futures::stream::iter(creates)
            .buffer_unordered(PARALLEL_WRITES)
            .collect::<Vec<_>>();
        let deletes = futures::stream::iter(deletes)
            .buffer_unordered(PARALLEL_WRITES)
            .collect::<Vec<_>>();
        let (created, deleted) = futures::join!(creates, deletes);
        created.into_iter().chain(deleted).collect()
    }

    async fn create(&self, node: &str, hash: &str) -> Result<(), Error> {
        let pod = self.new_pod(node, hash);
        match self.pods.create(&PostParams::default(), &pod).await {
            Ok(created) => {
                let name = created.metadata.name.as_deref().unwrap_or_default();
                self.event(
                    EventType::Normal,
                    "SuccessfulCreate",
                    "Create",
                    format!("Created pod: {name}"),
                )
                .await;
                Ok(())
            }
            Err(e) => {
                self.event(
                    EventType::Warning,
                    "FailedCreate",
                    "Create",
                    format!("Error creating: {e}"),
                )
                .await;
                Err(self.kube(e))
            }
        }
    }

    async fn delete(&self, pod: &Pod, force: bool) -> Result<(), Error> {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let params = DeleteParams {
            grace_period_seconds: force.then_some(0),
            preconditions: Some(Preconditions {
                uid: pod.metadata.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match self.pods.delete(name, &params).await {
            Ok(_) => {
                self.event(
                    EventType::Normal,
                    "SuccessfulDelete",
                    "Delete",
                    format!("Deleted pod: {name}"),
                )
                .await;
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
            Err(e) => {
                self.event(
                    EventType::Warning,
                    "FailedDelete",
                    "Delete",
                    format!("Error deleting: {e}"),
                )
                .await;
                Err(self.kube(e))
            }
        }
    }

    fn new_pod(&self, node: &str, hash: &str) -> Pod {
        let template_meta = self.spec.template.metadata.as_ref();
        let mut labels = template_meta
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        labels.insert(REVISION_LABEL.into(), hash.to_owned());
        if let Some(generation) = self.ds.metadata.generation {
            labels.insert(GENERATION_LABEL.into(), generation.to_string());
        }
        let mut spec = self.pod_spec.clone();
        // The node already passed the template's own terms: pin to it.
        let pinned = NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_expressions: None,
                match_fields: Some(vec![NodeSelectorRequirement {
                    key: "metadata.name".into(),
                    operator: "In".into(),
                    values: Some(vec![node.to_owned()]),
                }]),
            }],
        };
        let affinity = spec.affinity.get_or_insert_with(Affinity::default);
        affinity
            .node_affinity
            .get_or_insert_with(NodeAffinity::default)
            .required_during_scheduling_ignored_during_execution = Some(pinned);
        Pod {
            metadata: ObjectMeta {
                generate_name: Some(format!("{}-", self.name)),
                labels: Some(labels),
                annotations: template_meta.and_then(|m| m.annotations.clone()),
                owner_references: Some(vec![self.owner()]),
                ..ObjectMeta::default()
            },
            spec: Some(spec),
            status: None,
        }
    }

    /// Counted per node from the oldest of its pods, as upstream.
    fn status(&self, placed: &[OnNode<'_>], hash: &str) -> (DaemonSetStatus, Option<Duration>) {
        let prior = self.ds.status.as_ref();
        let (mut desired, mut scheduled, mut misscheduled) = (0, 0, 0);
        let (mut ready, mut available, mut updated) = (0, 0, 0);
        let mut wake: Option<Duration> = None;
        for on in placed {
            let Some(pod) = on.pods.first() else {
                desired += i32::from(on.should_run);
                continue;
            };
            if !on.should_run {
                misscheduled += 1;
                continue;
            }
            desired += 1;
            scheduled += 1;
            match revision::until_available(pod, self.min_ready, self.now) {
                Some(left) if left.is_zero() => {
                    ready += 1;
                    available += 1;
                }
                Some(left) => {
                    ready += 1;
                    wake = Some(wake.map_or(left, |w| w.min(left)));
                }
                None => {}
            }
            updated += i32::from(pod_hash(pod) == Some(hash));
        }
        let status = DaemonSetStatus {
            observed_generation: self.ds.metadata.generation,
            desired_number_scheduled: desired,
            current_number_scheduled: scheduled,
            number_misscheduled: misscheduled,
            number_ready: ready,
            number_available: Some(available),
            number_unavailable: Some(desired - available),
            updated_number_scheduled: Some(updated),
            collision_count: prior.and_then(|s| s.collision_count),
            conditions: prior.and_then(|s| s.conditions.clone()),
        };
        (status, wake.map(|w| w + Duration::from_millis(100)))
    }

    async fn write_status(&self, status: &DaemonSetStatus) -> Result<(), Error> {
        self.sets()
            .patch_status(
                self.name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": status})),
            )
            .await
            .map(|_| ())
            .or_else(|e| match e {
                kube::Error::Api(status) if status.code == 404 => Ok(()),
                other => Err(other),
            })
            .map_err(|e| self.kube(e))
    }

    /// Another template already holds this revision name: hash again with a
    /// higher collision count.
    async fn bump_collisions(&self, collisions: Option<i32>) -> Result<Action, Error> {
        let count = collisions.unwrap_or(0).saturating_add(1);
        self.sets()
            .patch_status(
                self.name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": {"collisionCount": count}})),
            )
            .await
            .map_err(|e| self.kube(e))?;
        Ok(Action::requeue(Duration::from_millis(100)))
    }

    /// Takes an orphan the selector picks.
    async fn adopt(&self, pod: &Pod) -> Result<(), Error> {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let mut owners = pod.metadata.owner_references.clone().unwrap_or_default();
        owners.push(self.owner());
        let patch = json!({"metadata": {"ownerReferences": owners}});
        match self
            .pods
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(e) => Err(self.kube(e)),
        }
    }

    fn sets(&self) -> Api<DaemonSet> {
        Api::namespaced(
            self.ctx.client.clone(),
            self.ds.metadata.namespace.as_deref().unwrap_or_default(),
        )
    }

    fn owner(&self) -> OwnerReference {
        revision::controller_ref("apps/v1", "DaemonSet", self.name, self.uid)
    }

    async fn event(&self, type_: EventType, reason: &str, action: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self
            .ctx
            .recorder
            .publish(&event, &self.ds.object_ref(&()))
            .await
        {
            tracing::debug!(error = %e, set = %self.key, "recording an event failed");
        }
    }

    fn kube(&self, error: kube::Error) -> Error {
        Error::Kube(self.key.clone(), error)
    }
}

/// The template's pod spec plus the tolerations every daemon pod has
/// (replacing the template's own for the same taint).
fn daemon_pod_spec(mut spec: PodSpec) -> PodSpec {
    let host_network = spec.host_network == Some(true);
    let defaults = DEFAULT_TOLERATIONS
        .iter()
        .chain(host_network.then_some(&(NETWORK_UNAVAILABLE, "NoSchedule")));
    let tolerations = spec.tolerations.get_or_insert_with(Vec::new);
    for (key, effect) in defaults {
        tolerations
            .retain(|t| t.key.as_deref() != Some(*key) || t.effect.as_deref() != Some(*effect));
        tolerations.push(Toleration {
            key: Some((*key).to_owned()),
            operator: Some("Exists".into()),
            effect: Some((*effect).to_owned()),
            ..Toleration::default()
        });
    }
    spec
}

/// Whether a daemon pod should be started on `node`, and whether one
/// already there may keep running (a NoSchedule taint keeps new pods off
/// but does not evict).
fn placement(node: &Node, name: &str, spec: &PodSpec) -> (bool, bool) {
    if spec
        .node_name
        .as_deref()
        .is_some_and(|n| !n.is_empty() && n != name)
    {
        return (false, false);
    }
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    if let Some(selector) = &spec.node_selector
        && !selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    {
        return (false, false);
    }
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    if let Some(required) = required
        && !required
            .node_selector_terms
            .iter()
            .any(|term| term_matches(term, name, labels))
    {
        return (false, false);
    }
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or_default();
    let tolerations = spec.tolerations.as_deref().unwrap_or_default();
    let untolerated = |effect: &str| {
        taints
            .iter()
            .any(|t| t.effect == effect && !tolerations.iter().any(|tol| tolerates(tol, t)))
    };
    if untolerated("NoExecute") {
        return (false, false);
    }
    if untolerated("NoSchedule") {
        return (false, true);
    }
    (true, true)
}

/// A node selector term: all of its requirements hold (an empty term
/// matches nothing).
fn term_matches(term: &NodeSelectorTerm, name: &str, labels: &BTreeMap<String, String>) -> bool {
    let expressions = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if expressions.is_empty() && fields.is_empty() {
        return false;
    }
    expressions
        .iter()
        .all(|r| requirement_holds(r, labels.get(&r.key).map(String::as_str)))
        && fields.iter().all(|r| {
            let value = (r.key == "metadata.name").then_some(name);
            requirement_holds(r, value)
        })
}

fn requirement_holds(requirement: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = requirement.values.as_deref().unwrap_or_default();
    match requirement.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        op @ ("Gt" | "Lt") => {
            let parse = |s: &str| s.parse::<i64>().ok();
            match (value.and_then(parse), values.first().and_then(|b| parse(b))) {
                (Some(v), Some(bound)) if op == "Gt" => v > bound,
                (Some(v), Some(bound)) => v < bound,
                _ => false,
            }
        }
        _ => false,
    }
}

fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    if toleration
        .effect
        .as_deref()
        .is_some_and(|e| !e.is_empty() && e != taint.effect)
    {
        return false;
    }
    let key = toleration.key.as_deref().unwrap_or_default();
    match toleration.operator.as_deref().unwrap_or("Equal") {
        "Exists" => key.is_empty() || key == taint.key,
        "Equal" => {
            key == taint.key
                && toleration.value.as_deref().unwrap_or_default()
                    == taint.value.as_deref().unwrap_or_default()
        }
        _ => false,
    }
}

/// The node a daemon pod is on, or is pinned to until it is bound.
fn target_node(pod: &Pod) -> Option<&str> {
    let spec = pod.spec.as_ref()?;
    if let Some(node) = spec.node_name.as_deref().filter(|n| !n.is_empty()) {
        return Some(node);
    }
    spec.affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms
        .iter()
        .flat_map(|t| t.match_fields.as_deref().unwrap_or_default())
        .find(|r| r.key == "metadata.name" && r.operator == "In")
        .and_then(|r| match r.values.as_deref() {
            Some([node]) => Some(node.as_str()),
            _ => None,
        })
}

fn bound(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.as_deref())
        .is_some_and(|n| !n.is_empty())
}

fn pod_hash(pod: &Pod) -> Option<&str> {
    pod.metadata
        .labels
        .as_ref()?
        .get(REVISION_LABEL)
        .map(String::as_str)
}

/// The (new, old) pods on a node, ignoring terminating ones; `None` when
/// there are two of either (the manage pass removes duplicates first).
fn versions_on<'p>(pods: &[&'p Pod], hash: &str) -> Option<(Option<&'p Pod>, Option<&'p Pod>)> {
    let (mut new, mut old) = (None, None);
    for pod in pods
        .iter()
        .copied()
        .filter(|p| !revision::is_terminating(p))
    {
        let slot = if pod_hash(pod) == Some(hash) {
            &mut new
        } else {
            &mut old
        };
        if slot.replace(pod).is_some() {
            return None;
        }
    }
    Some((new, old))
}

/// An int-or-percent of `total`, percentages rounded up.
fn scaled(value: Option<&IntOrString>, total: i32) -> Option<i32> {
    match value? {
        IntOrString::Int(n) => Some((*n).max(0)),
        IntOrString::String(s) => match s.strip_suffix('%') {
            Some(percent) => {
                let percent = i64::from(percent.trim().parse::<i32>().ok()?.max(0));
                let scaled = (percent * i64::from(total.max(0)) + 99) / 100;
                i32::try_from(scaled).ok()
            }
            None => s.trim().parse::<i32>().ok().map(|n| n.max(0)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(value: serde_json::Value) -> Node {
        serde_json::from_value(value).unwrap()
    }

    fn spec(value: serde_json::Value) -> PodSpec {
        daemon_pod_spec(serde_json::from_value(value).unwrap())
    }

    #[test]
    fn placement_follows_selectors_affinity_and_taints() {
        let plain =
            node(json!({"metadata": {"name": "a", "labels": {"disk": "ssd", "cores": "8"}}}));
        let tainted = node(json!({"metadata": {"name": "b"}, "spec": {"taints": [
            {"key": "dedicated", "value": "db", "effect": "NoSchedule"}]}}));
        let evicting = node(json!({"metadata": {"name": "c"}, "spec": {"taints": [
            {"key": "dedicated", "value": "db", "effect": "NoExecute"}]}}));
        let unready = node(
            json!({"metadata": {"name": "d"}, "spec": {"unschedulable": true, "taints": [
            {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"},
            {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}]}}),
        );
        let any = spec(json!({"containers": []}));
        assert_eq!(placement(&plain, "a", &any), (true, true));
        assert_eq!(placement(&tainted, "b", &any), (false, true));
        assert_eq!(placement(&evicting, "c", &any), (false, false));
        assert_eq!(placement(&unready, "d", &any), (true, true));

        let tolerant = spec(json!({"containers": [], "tolerations": [
            {"key": "dedicated", "operator": "Equal", "value": "db"}]}));
        assert_eq!(placement(&tainted, "b", &tolerant), (true, true));
        assert_eq!(placement(&evicting, "c", &tolerant), (true, true));

        let ssd = spec(json!({"containers": [], "nodeSelector": {"disk": "ssd"}}));
        assert_eq!(placement(&plain, "a", &ssd), (true, true));
        assert_eq!(placement(&unready, "d", &ssd), (false, false));

        let big = spec(json!({"containers": [], "affinity": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "cores", "operator": "Gt", "values": ["4"]}]},
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["d"]}]}
        ]}}}}));
        assert_eq!(placement(&plain, "a", &big), (true, true));
        assert_eq!(placement(&unready, "d", &big), (true, true));
        assert_eq!(placement(&tainted, "b", &big), (false, false));
    }

    #[test]
    fn defaults_replace_template_tolerations_for_the_same_taint() {
        let spec = spec(
            json!({"containers": [], "hostNetwork": true, "tolerations": [
            {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
            {"key": "x", "operator": "Exists"}]}),
        );
        let tolerations = spec.tolerations.unwrap();
        assert_eq!(tolerations.len(), 1 + DEFAULT_TOLERATIONS.len() + 1);
        assert!(tolerations.iter().all(|t| t.toleration_seconds.is_none()));
        assert!(
            tolerations
                .iter()
                .any(|t| t.key.as_deref() == Some(NETWORK_UNAVAILABLE))
        );
    }

    #[test]
    fn percentages_round_up() {
        let pct = IntOrString::String("25%".into());
        assert_eq!(scaled(Some(&pct), 10), Some(3));
        assert_eq!(scaled(Some(&pct), 0), Some(0));
        assert_eq!(scaled(Some(&IntOrString::Int(2)), 10), Some(2));
        assert_eq!(scaled(None, 10), None);
    }

    #[test]
    fn pods_are_pinned_and_found_by_node() {
        let pod: Pod = serde_json::from_value(json!({"spec": {"containers": [], "affinity": {"nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}]}}}}}))
        .unwrap();
        assert_eq!(target_node(&pod), Some("n1"));
        let mut bound = pod.clone();
        if let Some(spec) = bound.spec.as_mut() {
            spec.node_name = Some("n2".into());
        }
        assert_eq!(target_node(&bound), Some("n2"));
    }
}
