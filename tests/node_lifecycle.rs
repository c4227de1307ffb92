//! Node lifecycle against a real `skiff server`: podCIDR allocation, a node
//! that stops renewing its Lease going Unknown and tainted, its pods evicted
//! after their toleration, and pods of a deleted node collected. The test
//! plays the node agents: it creates Nodes and renews their Leases.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use ipnet::Ipv4Net;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use skiff_e2e::server::Server;

const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");
/// A short grace period, so a silent node is noticed within seconds.
const GRACE: &[&str] = &["--node-monitor-grace-period", "3s"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_node_goes_unknown_and_its_pods_are_evicted() -> anyhow::Result<()> {
    let server = Server::start(SKIFF.as_ref(), GRACE).await?;
    let client = client(&server).await?;
    let mut node = FakeNode::register(&client, "worker-1").await?;
    server.kubectl_stdin(
        &["apply", "-f", "-"],
        r#"
apiVersion: v1
kind: Pod
metadata: {name: hasty}
spec:
  nodeName: worker-1
  containers: [{name: app, image: busybox}]
  tolerations:
  - {key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 2}
---
apiVersion: v1
kind: Pod
metadata: {name: patient}
spec:
  nodeName: worker-1
  containers: [{name: app, image: busybox}]
---
apiVersion: v1
kind: Pod
metadata: {name: loyal}
spec:
  nodeName: worker-1
  containers: [{name: app, image: busybox}]
  tolerations:
  - {key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute}
"#,
    )?;
    for pod in ["hasty", "patient", "loyal"] {
        set_running(&client, pod).await?;
    }
    // The API server gave the pod without tolerations upstream's 300 s.
    let patient: Value =
        serde_json::from_str(&server.kubectl_ok(&["get", "pod", "patient", "-o", "json"])?)?;
    ensure!(
        patient["spec"]["tolerations"].as_array().is_some_and(|t| {
            t.iter().any(|t| {
                t["key"] == "node.kubernetes.io/unreachable" && t["tolerationSeconds"] == 300
            })
        }),
        "{patient}"
    );

    // While the Lease is renewed, well past the grace period, the node
    // stays Ready and untainted.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let n = get_node(&server, "worker-1")?;
    ensure!(
        condition(&n, "Ready") == "True",
        "a renewing node was marked: {n}"
    );
    ensure!(
        n["spec"]["taints"].as_array().is_none_or(Vec::is_empty),
        "{n}"
    );

    node.stop_renewing();
    let n = wait_for(&server, "worker-1 Unknown and unreachable", || {
        let n = get_node(&server, "worker-1")?;
        let tainted = has_taint(&n, "node.kubernetes.io/unreachable", "NoExecute")
            && has_taint(&n, "node.kubernetes.io/unreachable", "NoSchedule");
        Ok((condition(&n, "Ready") == "Unknown" && tainted).then_some(n))
    })
    .await?;
    // Every condition is Unknown; the ones the node never posted say so.
    for c in n["status"]["conditions"].as_array().into_iter().flatten() {
        let reason = if c["type"] == "Ready" {
            "NodeStatusUnknown"
        } else {
            "NodeStatusNeverUpdated"
        };
        ensure!(c["status"] == "Unknown" && c["reason"] == reason, "{c}");
    }
    println!("{}", server.kubectl_ok(&["get", "nodes"])?);
    println!(
        "{}",
        server.kubectl_ok(&["get", "node", "worker-1", "-o", "jsonpath={.spec.taints}"])?
    );

    // The pod tolerating 2 s is deleted; it is bound to a node that cannot
    // confirm, so it stays Terminating, as upstream.
    let hasty = wait_for(&server, "the hasty pod evicted", || {
        let out =
            server.kubectl_ok(&["get", "pod", "hasty", "--ignore-not-found", "-o", "json"])?;
        if out.trim().is_empty() {
            return Ok(Some(Value::Null));
        }
        let pod: Value = serde_json::from_str(&out)?;
        Ok(pod["metadata"]["deletionTimestamp"]
            .is_string()
            .then_some(pod))
    })
    .await?;
    if !hasty.is_null() {
        let disrupted = hasty["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "DisruptionTarget" && c["reason"] == "DeletionByTaintManager");
        ensure!(disrupted, "{hasty}");
    }
    // Pods on the lost node are no longer ready.
    wait_for(&server, "pods marked not ready", || {
        let pod: Value =
            serde_json::from_str(&server.kubectl_ok(&["get", "pod", "loyal", "-o", "json"])?)?;
        Ok((pod_condition(&pod, "Ready") == "False").then_some(()))
    })
    .await?;
    // kube-runtime's recorder writes events.k8s.io/v1 Events.
    let events: Value = serde_json::from_str(&server.kubectl_ok(&[
        "get",
        "events.events.k8s.io",
        "-o",
        "json",
    ])?)?;
    let evicted = events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|e| e["reason"] == "TaintManagerEviction" && e["regarding"]["name"] == "hasty");
    ensure!(evicted, "no TaintManagerEviction event: {events}");
    for pod in ["patient", "loyal"] {
        let p: Value =
            serde_json::from_str(&server.kubectl_ok(&["get", "pod", pod, "-o", "json"])?)?;
        ensure!(
            p["metadata"]["deletionTimestamp"].is_null(),
            "{pod} was evicted: {p}"
        );
    }

    // The node comes back: its own status update clears the taints.
    node.report_ready(&client).await?;
    node.resume();
    wait_for(&server, "worker-1 Ready and untainted", || {
        let n = get_node(&server, "worker-1")?;
        let clean = n["spec"]["taints"].as_array().is_none_or(Vec::is_empty);
        Ok((condition(&n, "Ready") == "True" && clean).then_some(()))
    })
    .await?;
    println!("{}", server.kubectl_ok(&["get", "nodes"])?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_of_a_deleted_node_are_collected() -> anyhow::Result<()> {
    let server = Server::start(SKIFF.as_ref(), GRACE).await?;
    let client = client(&server).await?;
    let _node = FakeNode::register(&client, "doomed").await?;
    server.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Pod\nmetadata: {name: stranded}\nspec: {nodeName: doomed, containers: [{name: app, image: busybox}]}\n",
    )?;
    set_running(&client, "stranded").await?;
    server.kubectl_ok(&["delete", "node", "doomed"])?;
    wait_for(&server, "the stranded pod deleted", || {
        let out = server.kubectl_ok(&["get", "pod", "stranded", "--ignore-not-found"])?;
        Ok(out.trim().is_empty().then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_cidrs_are_distinct_and_survive_restarts() -> anyhow::Result<()> {
    let mut server = Server::start(SKIFF.as_ref(), &[]).await?;
    let client = client(&server).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    // A node that already has a range keeps it, and nobody else gets it.
    let preset: Node = serde_json::from_value(json!({
        "metadata": {"name": "preset"},
        "spec": {"podCIDR": "10.42.0.0/24", "podCIDRs": ["10.42.0.0/24"]},
    }))?;
    nodes.create(&PostParams::default(), &preset).await?;

    let creates = (0..20).map(|i| {
        let nodes = nodes.clone();
        async move {
            let node: Node =
                serde_json::from_value(json!({"metadata": {"name": format!("node-{i:02}")}}))?;
            nodes.create(&PostParams::default(), &node).await?;
            anyhow::Ok(())
        }
    });
    for result in futures::future::join_all(creates).await {
        result?;
    }
    let cidrs = wait_for(&server, "21 podCIDRs", || {
        let cidrs = pod_cidrs(&server)?;
        Ok((cidrs.len() == 21).then_some(cidrs))
    })
    .await?;
    let cluster: Ipv4Net = "10.42.0.0/16".parse()?;
    let mut distinct = HashSet::new();
    for (name, cidr, cidrs) in &cidrs {
        let net: Ipv4Net = cidr.parse().with_context(|| format!("{name}: {cidr}"))?;
        ensure!(
            net.prefix_len() == 24 && cluster.contains(&net),
            "{name}: {cidr}"
        );
        ensure!(cidrs == &vec![cidr.clone()], "{name}: podCIDRs {cidrs:?}");
        ensure!(distinct.insert(net), "{cidr} handed out twice: {cidrs:?}");
    }
    ensure!(
        cidrs
            .iter()
            .any(|(n, c, _)| n == "preset" && c == "10.42.0.0/24")
    );
    println!(
        "{}",
        server.kubectl_ok(&[
            "get",
            "nodes",
            "-o",
            "custom-columns=NAME:.metadata.name,PODCIDR:.spec.podCIDR"
        ])?
    );

    // After a restart, ranges in use are known again: a freed range may be
    // reused, one in use never.
    nodes.delete("node-05", &DeleteParams::default()).await?;
    server.restart().await?;
    let client = self::client(&server).await?;
    let nodes: Api<Node> = Api::all(client);
    for name in ["late-1", "late-2"] {
        let node: Node = serde_json::from_value(json!({"metadata": {"name": name}}))?;
        nodes.create(&PostParams::default(), &node).await?;
    }
    let cidrs = wait_for(&server, "22 podCIDRs", || {
        let cidrs = pod_cidrs(&server)?;
        Ok((cidrs.len() == 22).then_some(cidrs))
    })
    .await?;
    let mut distinct = HashSet::new();
    for (_, cidr, _) in &cidrs {
        ensure!(
            distinct.insert(cidr.clone()),
            "{cidr} handed out twice: {cidrs:?}"
        );
    }
    Ok(())
}

/// A node the test keeps alive by renewing its Lease, until told not to.
struct FakeNode {
    name: String,
    leases: Api<Lease>,
    renewing: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeNode {
    async fn register(client: &kube::Client, name: &str) -> anyhow::Result<Self> {
        let nodes: Api<Node> = Api::all(client.clone());
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        }))?;
        nodes.create(&PostParams::default(), &node).await?;
        let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": MicroTime(Timestamp::now())},
        }))?;
        leases.create(&PostParams::default(), &lease).await?;
        let mut fake = FakeNode {
            name: name.to_owned(),
            leases,
            renewing: Arc::new(AtomicBool::new(true)),
            task: tokio::spawn(async {}),
        };
        fake.report_ready(client).await?;
        fake.task = fake.spawn_renewals();
        Ok(fake)
    }

    /// Posts the node's status: Ready, with capacity and an address.
    async fn report_ready(&self, client: &kube::Client) -> anyhow::Result<()> {
        let nodes: Api<Node> = Api::all(client.clone());
        let now = Time(Timestamp::now());
        let patch = json!({"status": {
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}],
            "capacity": {"cpu": "4", "memory": "8Gi", "pods": "110"},
            "allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"},
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
        }});
        nodes
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }

    fn spawn_renewals(&self) -> tokio::task::JoinHandle<()> {
        let leases = self.leases.clone();
        let name = self.name.clone();
        let renewing = self.renewing.clone();
        tokio::spawn(async move {
            while renewing.load(Ordering::Relaxed) {
                let patch = json!({"spec": {"renewTime": MicroTime(Timestamp::now())}});
                let _ = leases
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    }

    fn stop_renewing(&self) {
        self.renewing.store(false, Ordering::Relaxed);
        self.task.abort();
    }

    fn resume(&mut self) {
        self.renewing.store(true, Ordering::Relaxed);
        self.task = self.spawn_renewals();
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn client(server: &Server) -> anyhow::Result<kube::Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(server.kubeconfig())?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// Plays the node agent: the pod runs and is ready.
async fn set_running(client: &kube::Client, pod: &str) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let patch = json!({"status": {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True"}],
    }});
    pods.patch_status(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("setting the status of pod {pod}"))?;
    Ok(())
}

fn get_node(server: &Server, name: &str) -> anyhow::Result<Value> {
    Ok(serde_json::from_str(
        &server.kubectl_ok(&["get", "node", name, "-o", "json"])?,
    )?)
}

fn condition(node: &Value, type_: &str) -> String {
    node["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == type_)
        .and_then(|c| c["status"].as_str())
        .unwrap_or_default()
        .to_owned()
}

fn pod_condition(pod: &Value, type_: &str) -> String {
    condition(pod, type_)
}

fn has_taint(node: &Value, key: &str, effect: &str) -> bool {
    node["spec"]["taints"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|t| t["key"] == key && t["effect"] == effect)
}

/// Every node's (name, podCIDR, podCIDRs) that has a podCIDR.
fn pod_cidrs(server: &Server) -> anyhow::Result<Vec<(String, String, Vec<String>)>> {
    let list: Value = serde_json::from_str(&server.kubectl_ok(&["get", "nodes", "-o", "json"])?)?;
    Ok(list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| {
            let cidr = n["spec"]["podCIDR"].as_str()?.to_owned();
            let cidrs = n["spec"]["podCIDRs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c.as_str().map(str::to_owned))
                .collect();
            Some((n["metadata"]["name"].as_str()?.to_owned(), cidr, cidrs))
        })
        .collect())
}

/// Polls `check` until it yields a value, for up to a minute.
async fn wait_for<T>(
    server: &Server,
    what: &str,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = match check() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => String::new(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!(
                "timed out waiting for {what}: {last}\n{}",
                server.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
