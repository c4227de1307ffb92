//! Node lifecycle, as kube-controller-manager's node lifecycle, taint
//! eviction and pod GC controllers do it:
//!
//! - a node whose Lease (`kube-node-lease/<node>`) and Ready heartbeat stop
//!   changing for the grace period (40 s) gets all its conditions set to
//!   `Unknown`, and its pods are marked not ready;
//! - node conditions become taints: Ready=Unknown → `unreachable`,
//!   Ready=False → `not-ready` (NoSchedule and NoExecute each), pressure
//!   conditions and `spec.unschedulable` → NoSchedule taints; they go away
//!   when the node's own status updates clear the condition;
//! - pods on a node with NoExecute taints they do not tolerate are deleted,
//!   at once or after the shortest `tolerationSeconds` that applies (the API
//!   server gives every pod 300 s for `not-ready` and `unreachable`);
//! - pods bound to a Node that no longer exists are deleted outright.
//!
//! Silence is measured on this process's clock from the moment it last saw
//! the Lease or heartbeat change, so clock skew between nodes and servers
//! does not matter, and a newly elected leader gives every node a full grace
//! period first.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, NodeCondition, Pod, Taint, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Resource;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, watcher};
use serde_json::json;
use tokio::time::Instant;

use super::pod_informer::{PodInformer, Synced};

/// Upstream's `--node-monitor-grace-period`.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(40);
/// Upstream's pod GC quarantine for pods on a missing node.
const ORPHAN_QUARANTINE: Duration = Duration::from_secs(40);
const LEASE_NAMESPACE: &str = "kube-node-lease";

const READY: &str = "Ready";
const NO_SCHEDULE: &str = "NoSchedule";
const NO_EXECUTE: &str = "NoExecute";
const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
const NOT_READY: &str = "node.kubernetes.io/not-ready";
/// Conditions a silent node gets as `Unknown`.
const NODE_CONDITIONS: [&str; 4] = [READY, "MemoryPressure", "DiskPressure", "PIDPressure"];
/// NoSchedule taints that mirror a condition being True.
const CONDITION_TAINTS: [(&str, &str); 4] = [
    ("MemoryPressure", "node.kubernetes.io/memory-pressure"),
    ("DiskPressure", "node.kubernetes.io/disk-pressure"),
    ("PIDPressure", "node.kubernetes.io/pid-pressure"),
    (
        "NetworkUnavailable",
        "node.kubernetes.io/network-unavailable",
    ),
];
const UNSCHEDULABLE: &str = "node.kubernetes.io/unschedulable";

/// What this controller last saw of one node's signs of life.
struct Health {
    /// When the Lease or heartbeat last changed, on our clock.
    probed: Instant,
    renew: Option<MicroTime>,
    heartbeat: Option<Time>,
}

struct Monitor {
    nodes_api: Api<Node>,
    pods_api: Api<Pod>,
    recorder: Recorder,
    nodes: Store<Node>,
    leases: Store<Lease>,
    pods: Store<Pod>,
    pods_synced: Synced,
    grace: Duration,
    health: HashMap<String, Health>,
    /// Pods (by uid) already deleted by the taint eviction, until they go.
    evicted: HashSet<String>,
    /// NoExecute taints without `timeAdded`, by node, key and effect: when
    /// we first saw them.
    taints_seen: HashMap<(String, String), Timestamp>,
    /// Pods (by uid) on a missing node, and since when.
    orphans: HashMap<String, Instant>,
}

pub async fn run(client: kube::Client, pods: &PodInformer, grace: Duration) {
    let nodes_api: Api<Node> = Api::all(client.clone());
    let pods_api: Api<Pod> = Api::all(client.clone());
    let (nodes, node_events) = reflect(nodes_api.clone());
    let (leases, lease_events) = reflect(Api::namespaced(client.clone(), LEASE_NAMESPACE));
    let (pods_synced, pods) = (pods.synced(), pods.cache());
    let mut events = futures::stream::select_all([node_events, lease_events]);
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "node-controller".into(),
            instance: None,
        },
    );
    let mut monitor = Monitor {
        nodes_api,
        pods_api,
        recorder,
        nodes,
        leases,
        pods,
        pods_synced,
        grace,
        health: HashMap::new(),
        evicted: HashSet::new(),
        taints_seen: HashMap::new(),
        orphans: HashMap::new(),
    };
    // Nothing is judged before every cache holds a full list.
    let ready = async {
        let _ = monitor.nodes.wait_until_ready().await;
        let _ = monitor.leases.wait_until_ready().await;
        monitor.pods_synced.wait().await;
    };
    tokio::select! {
        () = ready => {}
        () = async { while events.next().await.is_some() {} } => return,
    }
    let period = (grace / 8).clamp(Duration::from_millis(200), Duration::from_secs(5));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            event = events.next() => if event.is_none() { return },
            _ = tick.tick() => monitor.pass().await,
        }
    }
}

/// A cache of `api` and the stream that keeps it filled.
fn reflect<K>(api: Api<K>) -> (Store<K>, std::pin::Pin<Box<dyn Stream<Item = ()> + Send>>)
where
    K: Resource<DynamicType = ()>
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
        .reflect(writer)
        .map(|event| {
            if let Err(e) = event {
                tracing::debug!(error = %e, "node lifecycle watch error");
            }
        })
        .boxed();
    (reader, stream)
}

impl Monitor {
    async fn pass(&mut self) {
        let nodes = self.nodes.state();
        let names: HashSet<&str> = nodes
            .iter()
            .filter_map(|n| n.metadata.name.as_deref())
            .collect();
        self.health.retain(|name, _| names.contains(name.as_str()));
        let mut troubled: Vec<Arc<Node>> = Vec::new();
        for node in &nodes {
            let node = self.check(node).await;
            let not_ready = ready_status(&node) != Some("True")
                && node
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some();
            if not_ready || !no_execute_taints(&node).is_empty() {
                troubled.push(node);
            }
        }
        self.act_on_pods(&names, &troubled).await;
    }

    /// Marks a silent node Unknown and brings its taints in line with its
    /// conditions; returns the node as written.
    async fn check(&mut self, node: &Arc<Node>) -> Arc<Node> {
        let name = node.metadata.name.clone().unwrap_or_default();
        let lease = self
            .leases
            .get(&ObjectRef::new(&name).within(LEASE_NAMESPACE));
        let renew = lease.and_then(|l| l.spec.as_ref()?.renew_time.clone());
        let heartbeat = condition(node, READY).and_then(|c| c.last_heartbeat_time.clone());
        let now = Instant::now();
        let health = self.health.entry(name.clone()).or_insert_with(|| Health {
            probed: now,
            renew: renew.clone(),
            heartbeat: heartbeat.clone(),
        });
        if health.renew != renew || health.heartbeat != heartbeat {
            *health = Health {
                probed: now,
                renew,
                heartbeat,
            };
        }
        let silent = now.duration_since(health.probed) > self.grace;
        let mut current = node.clone();
        if silent && ready_status(node) != Some("Unknown") {
            match self.mark_unknown(node).await {
                Ok(written) => current = Arc::new(written),
                Err(e) => {
                    tracing::debug!(node = %name, error = %e, "cannot mark node Unknown");
                    return current;
                }
            }
        }
        let (taints, changed) = desired_taints(&current, Timestamp::now());
        if changed {
            let patch = json!({
                "metadata": {"resourceVersion": current.metadata.resource_version},
                "spec": {"taints": taints},
            });
            match self
                .nodes_api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(written) => current = Arc::new(written),
                // A conflict means the node changed; the next pass sees it.
                Err(e) => tracing::debug!(node = %name, error = %e, "cannot update node taints"),
            }
        }
        current
    }

    async fn mark_unknown(&self, node: &Node) -> Result<Node, kube::Error> {
        let name = node.metadata.name.as_deref().unwrap_or_default();
        let now = Time(Timestamp::now());
        let mut conditions = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        for type_ in NODE_CONDITIONS {
            match conditions.iter_mut().find(|c| c.type_ == type_) {
                Some(c) => {
                    if c.status != "Unknown" {
                        c.last_transition_time = Some(now.clone());
                    }
                    c.status = "Unknown".into();
                    c.reason = Some("NodeStatusUnknown".into());
                    c.message = Some("Kubelet stopped posting node status.".into());
                }
                None => conditions.push(NodeCondition {
                    type_: type_.into(),
                    status: "Unknown".into(),
                    reason: Some("NodeStatusNeverUpdated".into()),
                    message: Some("Kubelet never posted node status.".into()),
                    last_heartbeat_time: node.metadata.creation_timestamp.clone(),
                    last_transition_time: Some(now.clone()),
                }),
            }
        }
        let patch = json!({
            "metadata": {"resourceVersion": node.metadata.resource_version},
            "status": {"conditions": conditions},
        });
        let written = self
            .nodes_api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        tracing::info!(node = %name, "node stopped reporting; marked Unknown");
        self.event(
            &node.object_ref(&()),
            EventType::Normal,
            "NodeNotReady",
            &format!("Node {name} status is now: NodeNotReady"),
        )
        .await;
        Ok(written)
    }

    /// Pods on troubled nodes are marked not ready or evicted; pods on
    /// nodes that are gone are deleted.
    async fn act_on_pods(&mut self, names: &HashSet<&str>, troubled: &[Arc<Node>]) {
        let pods = self.pods.state();
        let by_name: HashMap<&str, &Node> = troubled
            .iter()
            .filter_map(|n| Some((n.metadata.name.as_deref()?, n.as_ref())))
            .collect();
        let now = Instant::now();
        let wall = Timestamp::now();
        let mut live: HashSet<&str> = HashSet::new();
        let mut orphaned: HashSet<&str> = HashSet::new();
        for pod in &pods {
            let Some(node_name) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) else {
                continue;
            };
            let uid = pod.metadata.uid.as_deref().unwrap_or_default();
            let deleting = pod.metadata.deletion_timestamp.is_some();
            if !deleting {
                live.insert(uid);
            }
            if !names.contains(node_name) {
                orphaned.insert(uid);
                let since = *self.orphans.entry(uid.to_owned()).or_insert(now);
                if now.duration_since(since) >= self.grace.min(ORPHAN_QUARANTINE) {
                    self.collect_orphan(pod, node_name).await;
                }
                continue;
            }
            let Some(node) = by_name.get(node_name) else {
                continue;
            };
            if deleting || self.evicted.contains(uid) {
                continue;
            }
            if ready_status(node) != Some("True") && pod_ready(pod) {
                self.mark_pod_not_ready(pod).await;
            }
            let taints = no_execute_taints(node);
            if taints.is_empty() {
                continue;
            }
            let started = taints
                .iter()
                .map(|t| self.taint_time(node_name, t, wall))
                .min()
                .unwrap_or(wall);
            if eviction_due(pod, &taints, started).is_some_and(|due| due <= wall) {
                self.evict(pod).await;
                self.evicted.insert(uid.to_owned());
            }
        }
        self.evicted.retain(|uid| live.contains(uid.as_str()));
        self.orphans
            .retain(|uid, _| orphaned.contains(uid.as_str()));
        self.taints_seen
            .retain(|(node, _), _| by_name.contains_key(node.as_str()));
    }

    /// When a NoExecute taint was put on: its `timeAdded`, else when we
    /// first saw it.
    fn taint_time(&mut self, node: &str, taint: &Taint, now: Timestamp) -> Timestamp {
        if let Some(Time(at)) = &taint.time_added {
            return *at;
        }
        *self
            .taints_seen
            .entry((node.to_owned(), taint.key.clone()))
            .or_insert(now)
    }

    async fn mark_pod_not_ready(&self, pod: &Pod) {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.pods_api.clone().into_client(), namespace);
        let patch = json!({"status": {"conditions": [
            {"type": READY, "status": "False", "lastTransitionTime": Time(Timestamp::now())}
        ]}});
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Strategic(&patch))
            .await
        {
            Ok(_) => {
                self.event(
                    &pod.object_ref(&()),
                    EventType::Warning,
                    "NodeNotReady",
                    "Node is not ready",
                )
                .await;
            }
            Err(e) => tracing::debug!(pod = %name, error = %e, "cannot mark pod not ready"),
        }
    }

    /// Deletes a pod that does not tolerate its node's NoExecute taints.
    async fn evict(&self, pod: &Pod) {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.pods_api.clone().into_client(), namespace);
        let condition = json!({"status": {"conditions": [{
            "type": "DisruptionTarget",
            "status": "True",
            "reason": "DeletionByTaintManager",
            "message": "Taint manager: deleting due to NoExecute taint",
            "lastTransitionTime": Time(Timestamp::now()),
        }]}});
        if let Err(e) = api
            .patch_status(name, &PatchParams::default(), &Patch::Strategic(&condition))
            .await
        {
            tracing::debug!(pod = %name, error = %e, "cannot mark pod as a disruption target");
        }
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(%namespace, pod = %name, "evicting pod from a tainted node");
                self.event(
                    &pod.object_ref(&()),
                    EventType::Normal,
                    "TaintManagerEviction",
                    &format!("Marking for deletion Pod {namespace}/{name}"),
                )
                .await;
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                tracing::warn!(pod = %name, error = %e, "cannot evict pod");
                self.event(
                    &pod.object_ref(&()),
                    EventType::Warning,
                    "FailedTaintManagerEviction",
                    &e.to_string(),
                )
                .await;
            }
        }
    }

    /// Force-deletes a pod whose node is confirmed gone.
    async fn collect_orphan(&self, pod: &Pod, node: &str) {
        match self.nodes_api.get_opt(node).await {
            Ok(None) => {}
            Ok(Some(_)) => return,
            Err(e) => {
                tracing::debug!(%node, error = %e, "cannot confirm node is gone");
                return;
            }
        }
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.pods_api.clone().into_client(), namespace);
        let mut params = DeleteParams::default().grace_period(0);
        params.preconditions = pod
            .metadata
            .uid
            .clone()
            .map(|uid| kube::api::Preconditions {
                uid: Some(uid),
                resource_version: None,
            });
        match api.delete(name, &params).await {
            Ok(_) => {
                tracing::info!(%namespace, pod = %name, %node, "deleted pod bound to a missing node")
            }
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => tracing::warn!(pod = %name, error = %e, "cannot delete orphaned pod"),
        }
    }

    async fn event(
        &self,
        regarding: &k8s_openapi::api::core::v1::ObjectReference,
        type_: EventType,
        reason: &str,
        note: &str,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note.into()),
            action: reason.into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, regarding).await {
            tracing::debug!(error = %e, "cannot record event");
        }
    }
}

fn condition<'a>(node: &'a Node, type_: &str) -> Option<&'a NodeCondition> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

fn ready_status(node: &Node) -> Option<&str> {
    condition(node, READY).map(|c| c.status.as_str())
}

fn pod_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == READY && c.status == "True"))
}

fn no_execute_taints(node: &Node) -> Vec<&Taint> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .map(|t| t.iter().filter(|t| t.effect == NO_EXECUTE).collect())
        .unwrap_or_default()
}

/// The taints `node` should carry: everyone else's as they are, plus ours
/// for its current conditions (keeping `timeAdded` of those already there);
/// and whether that differs from what it has.
fn desired_taints(node: &Node, now: Timestamp) -> (Vec<Taint>, bool) {
    let mut wanted: Vec<(&str, &str)> = Vec::new();
    match ready_status(node) {
        Some("False") => wanted.extend([(NOT_READY, NO_SCHEDULE), (NOT_READY, NO_EXECUTE)]),
        Some("Unknown") => wanted.extend([(UNREACHABLE, NO_SCHEDULE), (UNREACHABLE, NO_EXECUTE)]),
        _ => {}
    }
    for (type_, key) in CONDITION_TAINTS {
        if condition(node, type_).is_some_and(|c| c.status == "True") {
            wanted.push((key, NO_SCHEDULE));
        }
    }
    if node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
        wanted.push((UNSCHEDULABLE, NO_SCHEDULE));
    }
    let existing = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or_default();
    let mut taints: Vec<Taint> = existing.iter().filter(|t| !managed(t)).cloned().collect();
    let mut changed = false;
    for (key, effect) in &wanted {
        match existing
            .iter()
            .find(|t| t.key == *key && t.effect == *effect)
        {
            Some(t) => taints.push(t.clone()),
            None => {
                changed = true;
                taints.push(Taint {
                    key: (*key).into(),
                    effect: (*effect).into(),
                    value: None,
                    time_added: (*effect == NO_EXECUTE).then_some(Time(now)),
                });
            }
        }
    }
    // Ours that are no longer wanted.
    changed |= existing
        .iter()
        .filter(|t| managed(t))
        .any(|t| !wanted.contains(&(t.key.as_str(), t.effect.as_str())));
    (taints, changed)
}

/// Taints this controller owns, by key and effect.
fn managed(taint: &Taint) -> bool {
    match taint.effect.as_str() {
        NO_EXECUTE => taint.key == UNREACHABLE || taint.key == NOT_READY,
        NO_SCHEDULE => {
            taint.key == UNREACHABLE
                || taint.key == NOT_READY
                || taint.key == UNSCHEDULABLE
                || CONDITION_TAINTS.iter().any(|(_, key)| taint.key == *key)
        }
        _ => false,
    }
}

/// When `pod` must leave a node with these NoExecute `taints`, put on at
/// `started`: now if one is not tolerated, after the shortest
/// `tolerationSeconds` among the tolerations that apply, never if none of
/// those has a limit.
fn eviction_due(pod: &Pod, taints: &[&Taint], started: Timestamp) -> Option<Timestamp> {
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.as_deref())
        .unwrap_or_default();
    let mut shortest: Option<i64> = None;
    for taint in taints {
        let mut tolerated = false;
        for toleration in tolerations.iter().filter(|t| tolerates(t, taint)) {
            tolerated = true;
            if let Some(seconds) = toleration.toleration_seconds {
                shortest = Some(shortest.map_or(seconds, |s| s.min(seconds)));
            }
        }
        if !tolerated {
            return Some(started);
        }
    }
    let seconds = shortest?.max(0);
    Some(
        started
            .checked_add(SignedDuration::from_secs(seconds))
            .unwrap_or(Timestamp::MAX),
    )
}

/// Whether `toleration` tolerates `taint`, as upstream's
/// `Toleration.ToleratesTaint`.
fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    if let Some(effect) = toleration.effect.as_deref()
        && !effect.is_empty()
        && effect != taint.effect
    {
        return false;
    }
    if let Some(key) = toleration.key.as_deref()
        && !key.is_empty()
        && key != taint.key
    {
        return false;
    }
    match toleration.operator.as_deref() {
        Some("Exists") => true,
        None | Some("") | Some("Equal") => {
            // An empty key only goes with Exists.
            toleration.key.as_deref().is_some_and(|k| !k.is_empty())
                && toleration.value.as_deref().unwrap_or_default()
                    == taint.value.as_deref().unwrap_or_default()
        }
        Some(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeSpec, NodeStatus, PodSpec};
    use serde_json::from_value;

    fn node(ready: Option<&str>, taints: serde_json::Value) -> Node {
        let mut node = Node {
            spec: Some(NodeSpec {
                taints: from_value(taints).unwrap(),
                ..NodeSpec::default()
            }),
            ..Node::default()
        };
        if let Some(status) = ready {
            node.status = Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: READY.into(),
                    status: status.into(),
                    ..NodeCondition::default()
                }]),
                ..NodeStatus::default()
            });
        }
        node
    }

    fn keys(taints: &[Taint]) -> Vec<String> {
        taints
            .iter()
            .map(|t| format!("{}:{}", t.key, t.effect))
            .collect()
    }

    #[test]
    fn taints_follow_the_ready_condition() {
        let now = Timestamp::now();
        let (taints, changed) = desired_taints(&node(Some("Unknown"), json!([])), now);
        assert!(changed);
        assert_eq!(
            keys(&taints),
            [
                "node.kubernetes.io/unreachable:NoSchedule",
                "node.kubernetes.io/unreachable:NoExecute"
            ]
        );
        assert!(taints[0].time_added.is_none() && taints[1].time_added.is_some());

        // Unknown → False swaps unreachable for not-ready; others' stay.
        let tainted = node(
            Some("False"),
            json!([
                {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"},
                {"key": UNREACHABLE, "effect": "NoExecute", "timeAdded": "2026-01-01T00:00:00Z"},
            ]),
        );
        let (taints, changed) = desired_taints(&tainted, now);
        assert!(changed);
        assert_eq!(
            keys(&taints),
            [
                "dedicated:NoSchedule",
                "node.kubernetes.io/not-ready:NoSchedule",
                "node.kubernetes.io/not-ready:NoExecute"
            ]
        );

        // Back to Ready: ours go, nothing else changes; steady state is no write.
        let (taints, changed) = desired_taints(&node(Some("True"), json!(taints)), now);
        assert!(changed);
        assert_eq!(keys(&taints), ["dedicated:NoSchedule"]);
        let (_, changed) = desired_taints(&node(Some("True"), json!(taints)), now);
        assert!(!changed);
    }

    fn pod(tolerations: serde_json::Value) -> Pod {
        Pod {
            spec: Some(PodSpec {
                tolerations: from_value(tolerations).unwrap(),
                ..PodSpec::default()
            }),
            ..Pod::default()
        }
    }

    #[test]
    fn eviction_honours_toleration_seconds() {
        let started: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let unreachable: Taint =
            from_value(json!({"key": UNREACHABLE, "effect": "NoExecute"})).unwrap();
        let taints = [&unreachable];
        let at = |secs| Some(started + SignedDuration::from_secs(secs));

        assert_eq!(
            eviction_due(&pod(json!([])), &taints, started),
            Some(started)
        );
        let short = pod(json!([
            {"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 2},
            {"key": NOT_READY, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
        ]));
        assert_eq!(eviction_due(&short, &taints, started), at(2));
        let forever = pod(json!([{"key": UNREACHABLE, "operator": "Exists"}]));
        assert_eq!(eviction_due(&forever, &taints, started), None);
        let everything = pod(json!([{"operator": "Exists"}]));
        assert_eq!(eviction_due(&everything, &taints, started), None);
        let other_effect =
            pod(json!([{"key": UNREACHABLE, "operator": "Exists", "effect": "NoSchedule"}]));
        assert_eq!(eviction_due(&other_effect, &taints, started), Some(started));
        let equal = pod(
            json!([{"key": UNREACHABLE, "value": "", "effect": "NoExecute", "tolerationSeconds": -5}]),
        );
        assert_eq!(eviction_due(&equal, &taints, started), Some(started));
    }
}
