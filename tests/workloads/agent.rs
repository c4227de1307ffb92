//! A fake cluster around a real `skiff server` for the workload controller
//! tests: Node objects with Ready status and renewed Leases, and one task
//! that plays node agent and races the real scheduler — it binds each new
//! pod (to the node its required affinity `matchFields metadata.name`
//! names, as a DaemonSet pod's, else to the first node) unless the
//! scheduler did so first, marks it Running and Ready a
//! moment later, and finishes graceful deletions a moment after they start.
//! A watcher records every pod change so tests can check orderings.

// Two test crates use this module, each a different part of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher::{self, watcher};
use serde_json::{Value, json};
use skiff_e2e::server::Server;
use tokio::task::JoinHandle;

/// Pods with this label are bound but left Pending: a test makes them
/// Ready itself (see [`Cluster::mark_ready`]).
pub const HOLD_LABEL: &str = "skiff-test/hold";
/// How long the fake agent takes to start or stop a pod: long enough that
/// a controller that did not wait would be seen running ahead.
pub const AGENT_DELAY: Duration = Duration::from_millis(300);
const DEADLINE: Duration = Duration::from_secs(90);

pub struct Cluster {
    pub client: kube::Client,
    nodes: Arc<Mutex<Vec<String>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Cluster {
    /// Connects to `server` and starts the fake scheduler/agent and the
    /// lease renewer.
    pub async fn start(server: &Server) -> anyhow::Result<Self> {
        let kubeconfig = kube::config::Kubeconfig::read_from(server.kubeconfig())?;
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
        let client = kube::Client::try_from(config)?;
        let nodes = Arc::new(Mutex::new(Vec::new()));
        let tasks = vec![
            tokio::spawn(agent(client.clone(), nodes.clone())),
            tokio::spawn(renew_leases(client.clone(), nodes.clone())),
        ];
        Ok(Cluster {
            client,
            nodes,
            tasks,
        })
    }

    /// Registers a Ready node with `labels` and `taints` (JSON taints).
    pub async fn add_node(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        taints: Value,
    ) -> anyhow::Result<()> {
        let mut all_labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        all_labels.insert("kubernetes.io/hostname", name);
        all_labels.insert("kubernetes.io/os", "linux");
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": all_labels},
            "spec": {"taints": taints},
        }))?;
        let api: Api<Node> = Api::all(self.client.clone());
        api.create(&PostParams::default(), &node).await?;
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let resources = json!({"cpu": "4", "memory": "8Gi", "pods": "110"});
        let status = json!({"status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "fake agent is ready", "lastHeartbeatTime": now, "lastTransitionTime": now}],
            "capacity": resources, "allocatable": resources,
            "addresses": [{"type": "InternalIP", "address": "10.0.0.1"}, {"type": "Hostname", "address": name}],
        }});
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
            .await?;
        lock(&self.nodes).push(name.to_owned());
        Ok(())
    }

    pub async fn remove_node(&self, name: &str) -> anyhow::Result<()> {
        lock(&self.nodes).retain(|n| n != name);
        let api: Api<Node> = Api::all(self.client.clone());
        api.delete(name, &DeleteParams::default()).await?;
        Ok(())
    }

    /// Marks a held pod Running and Ready, as its agent would.
    pub async fn mark_ready(&self, namespace: &str, name: &str) -> anyhow::Result<()> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        set_running(&api, name).await
    }

    /// Records every change to the pods in `namespace` from now on.
    pub fn record_pods(&mut self, namespace: &str) -> Recording {
        let recording = Recording::default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        self.tasks
            .push(tokio::spawn(record(api, recording.clone())));
        recording
    }
}

/// A pod as the tests look at it.
#[derive(Clone, Debug, PartialEq)]
pub struct PodView {
    pub uid: String,
    pub node: Option<String>,
    pub ready: bool,
    pub terminating: bool,
    pub image: String,
    pub labels: BTreeMap<String, String>,
}

/// The pods after each change, in the order the watch delivered them.
#[derive(Clone, Default)]
pub struct Recording {
    states: Arc<Mutex<Vec<BTreeMap<String, PodView>>>>,
}

impl Recording {
    pub fn states(&self) -> Vec<BTreeMap<String, PodView>> {
        lock(&self.states).clone()
    }

    /// Pod names in the order they first appeared.
    pub fn created(&self) -> Vec<String> {
        let mut seen = Vec::new();
        for state in self.states() {
            for name in state.keys() {
                if !seen.contains(name) {
                    seen.push(name.clone());
                }
            }
        }
        seen
    }

    /// (name, uid) in the order pods started terminating.
    pub fn terminated(&self) -> Vec<(String, String)> {
        let mut seen: Vec<(String, String)> = Vec::new();
        for state in self.states() {
            for (name, pod) in &state {
                let entry = (name.clone(), pod.uid.clone());
                if pod.terminating && !seen.contains(&entry) {
                    seen.push(entry);
                }
            }
        }
        seen
    }

    /// The most pods that were ever at once not yet Ready, or going away.
    pub fn most_in_progress(&self) -> usize {
        self.states()
            .iter()
            .map(|s| s.values().filter(|p| !p.ready || p.terminating).count())
            .max()
            .unwrap_or(0)
    }
}

async fn record(api: Api<Pod>, recording: Recording) {
    let mut current: BTreeMap<String, PodView> = BTreeMap::new();
    let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()));
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(pod)) => {
                let name = pod.metadata.name.clone().unwrap_or_default();
                current.insert(name, view(&pod));
            }
            Ok(watcher::Event::Delete(pod)) => {
                current.remove(pod.metadata.name.as_deref().unwrap_or_default());
            }
            // A (re)list is one state, complete once it is done.
            Ok(watcher::Event::Init) => {
                current.clear();
                continue;
            }
            Ok(watcher::Event::InitApply(pod)) => {
                let name = pod.metadata.name.clone().unwrap_or_default();
                current.insert(name, view(&pod));
                continue;
            }
            Ok(watcher::Event::InitDone) => {}
            Err(_) => continue,
        }
        lock(&recording.states).push(current.clone());
    }
}

fn view(pod: &Pod) -> PodView {
    let status = pod.status.as_ref();
    let ready = status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let spec = pod.spec.as_ref();
    PodView {
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        node: spec.and_then(|s| s.node_name.clone()),
        ready,
        terminating: pod.metadata.deletion_timestamp.is_some(),
        image: spec
            .and_then(|s| s.containers.first())
            .and_then(|c| c.image.clone())
            .unwrap_or_default(),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
    }
}

/// The fake scheduler and agent.
async fn agent(client: kube::Client, nodes: Arc<Mutex<Vec<String>>>) {
    let all: Api<Pod> = Api::all(client.clone());
    let mut started: HashSet<String> = HashSet::new();
    let mut stopping: HashSet<String> = HashSet::new();
    let mut stream = std::pin::pin!(watcher(all, watcher::Config::default()));
    while let Some(event) = stream.next().await {
        let (Ok(watcher::Event::Apply(pod)) | Ok(watcher::Event::InitApply(pod))) = event else {
            continue;
        };
        let (Some(name), Some(namespace), Some(uid)) = (
            pod.metadata.name.clone(),
            pod.metadata.namespace.clone(),
            pod.metadata.uid.clone(),
        ) else {
            continue;
        };
        let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        if pod.metadata.deletion_timestamp.is_some() {
            if stopping.insert(uid.clone()) {
                tokio::spawn(async move {
                    tokio::time::sleep(AGENT_DELAY).await;
                    let params = DeleteParams {
                        grace_period_seconds: Some(0),
                        preconditions: Some(kube::api::Preconditions {
                            uid: Some(uid),
                            resource_version: None,
                        }),
                        ..DeleteParams::default()
                    };
                    let _ = api.delete(&name, &params).await;
                });
            }
            continue;
        }
        if !started.insert(uid) {
            continue;
        }
        let target = pinned_node(&pod).or_else(|| lock(&nodes).first().cloned());
        let bound = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        let hold = pod
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(HOLD_LABEL));
        tokio::spawn(async move {
            if bound.is_none() {
                let Some(node) = target else { return };
                let binding = json!({
                    "apiVersion": "v1", "kind": "Binding",
                    "metadata": {"name": name},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": node},
                });
                // The real scheduler races this binding; whoever wins, the
                // pod is bound and this agent runs it.
                let bound = api
                    .create_subresource::<Value, Value>(
                        "binding",
                        &name,
                        &PostParams::default(),
                        &binding,
                    )
                    .await
                    .is_ok();
                let scheduled = || async {
                    api.get(&name)
                        .await
                        .ok()
                        .and_then(|p| p.spec?.node_name)
                        .is_some()
                };
                if !bound && !scheduled().await {
                    return;
                }
            }
            if hold {
                return;
            }
            tokio::time::sleep(AGENT_DELAY).await;
            let _ = set_running(&api, &name).await;
        });
    }
}

async fn set_running(api: &Api<Pod>, name: &str) -> anyhow::Result<()> {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let condition = |kind: &str| json!({"type": kind, "status": "True", "lastProbeTime": null, "lastTransitionTime": now});
    let pod = api.get(name).await?;
    let containers: Vec<Value> = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .map(|c| {
            json!({"name": c.name, "image": c.image, "imageID": "", "ready": true,
                "started": true, "restartCount": 0, "state": {"running": {"startedAt": now}}})
        })
        .collect();
    let status = json!({"status": {
        "phase": "Running",
        "containerStatuses": containers,
        "conditions": [condition("PodScheduled"), condition("Initialized"),
            condition("ContainersReady"), condition("Ready")],
        "hostIP": "10.0.0.1", "podIP": "10.42.0.10", "startTime": now,
    }});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("marking pod {name} ready"))?;
    Ok(())
}

/// The node a pod's required affinity pins it to, as a DaemonSet's do.
fn pinned_node(pod: &Pod) -> Option<String> {
    pod.spec
        .as_ref()?
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms
        .iter()
        .flat_map(|t| t.match_fields.iter().flatten())
        .find(|r| r.key == "metadata.name" && r.operator == "In")
        .and_then(|r| r.values.as_ref()?.first().cloned())
}

/// Keeps every node's Lease in `kube-node-lease` fresh, as agents do.
async fn renew_leases(client: kube::Client, nodes: Arc<Mutex<Vec<String>>>) {
    let api: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client, "kube-node-lease");
    loop {
        let names = lock(&nodes).clone();
        for name in names {
            let lease = json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name},
                "spec": {"holderIdentity": name, "leaseDurationSeconds": 40,
                    "renewTime": k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()},
            });
            let params = PatchParams::apply("skiff-test-agent").force();
            let _ = api.patch(&name, &params, &Patch::Apply(&lease)).await;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Polls `check` until it returns `Some`, or fails with the last `None`
/// explanation after a generous deadline.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
