//! DaemonSets through the real kubectl against a real `skiff server`, with
//! fake nodes and a fake scheduler/agent (see `workloads/agent.rs`) that
//! binds each daemon pod to the node its affinity pins it to: a pod per
//! eligible node as nodes join, leave, change labels or carry taints;
//! rolling image changes within maxUnavailable or maxSurge; the pods going
//! with their set.

mod workloads {
    pub mod agent;
}

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, ensure};
use serde_json::{Value, json};
use skiff_e2e::server::Server;
use workloads::agent::{Cluster, PodView, eventually};

const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");

const AGENT: &str = r#"
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec:
      nodeSelector: {skiff-test/daemons: "yes"}
      containers: [{name: app, image: "busybox:1.36"}]
"#;

const DAEMON_NODES: &[(&str, &str)] = &[("skiff-test/daemons", "yes")];

fn get(server: &Server, args: &[&str]) -> anyhow::Result<Value> {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json"]);
    serde_json::from_str(&server.kubectl_ok(&all)?).context("kubectl output is not JSON")
}

/// Node name → the daemon pods bound there.
fn placement(server: &Server) -> anyhow::Result<BTreeMap<String, Vec<Value>>> {
    let list = get(server, &["pods", "-l", "app=agent"])?;
    let mut by_node: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for pod in list["items"].as_array().cloned().unwrap_or_default() {
        let node = pod["spec"]["nodeName"].as_str().unwrap_or("").to_owned();
        by_node.entry(node).or_default().push(pod);
    }
    Ok(by_node)
}

fn ready(pod: &Value) -> bool {
    pod["status"]["phase"] == "Running"
        && pod["metadata"]["deletionTimestamp"].is_null()
        && pod["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

/// Waits until exactly `nodes` each run one Ready daemon pod (with
/// `image`) and the set's status agrees; returns the set.
async fn settled(server: &Server, nodes: &[&str], image: &str) -> anyhow::Result<Value> {
    let want = i64::try_from(nodes.len())?;
    eventually(
        &format!("daemon pods on exactly {nodes:?}"),
        || async move {
            let placed = placement(server)?;
            let on: Vec<&str> = placed.keys().map(String::as_str).collect();
            let pods_ok = on == nodes
                && placed.values().all(|pods| {
                    pods.len() == 1
                        && ready(&pods[0])
                        && pods[0]["spec"]["containers"][0]["image"] == image
                });
            let ds = get(server, &["daemonset", "agent"])?;
            let status = &ds["status"];
            let status_ok = status["observedGeneration"] == ds["metadata"]["generation"]
                && status["desiredNumberScheduled"] == want
                && status["currentNumberScheduled"] == want
                && status["numberReady"] == want
                && status["numberAvailable"] == want
                && status["updatedNumberScheduled"] == want
                && status["numberMisscheduled"] == 0;
            Ok((pods_ok && status_ok).then_some(ds))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_pods_follow_nodes_and_go_with_their_set() -> anyhow::Result<()> {
    let server = Server::start(SKIFF.as_ref(), &[]).await?;
    let cluster = Cluster::start(&server).await?;
    cluster.add_node("n1", DAEMON_NODES, json!([])).await?;
    cluster.add_node("n2", DAEMON_NODES, json!([])).await?;
    let dedicated = json!([{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]);
    cluster.add_node("tainted", DAEMON_NODES, dedicated).await?;
    cluster.add_node("other", &[], json!([])).await?;

    server.kubectl_stdin(&["apply", "-f", "-"], AGENT)?;
    settled(&server, &["n1", "n2"], "busybox:1.36").await?;
    println!(
        "{}",
        server.kubectl_ok(&["get", "daemonset,pods", "-o", "wide"])?
    );

    // Pinned the upstream way, with the daemon tolerations.
    let placed = placement(&server)?;
    let pod = &placed["n1"][0];
    let terms = &pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"];
    ensure!(
        *terms
            == json!([{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}]),
        "{terms}"
    );
    let tolerated: BTreeSet<&str> = pod["spec"]["tolerations"]
        .as_array()
        .context("tolerations")?
        .iter()
        .filter_map(|t| t["key"].as_str())
        .collect();
    for key in [
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
        "node.kubernetes.io/disk-pressure",
        "node.kubernetes.io/memory-pressure",
        "node.kubernetes.io/pid-pressure",
        "node.kubernetes.io/unschedulable",
    ] {
        ensure!(
            tolerated.contains(key),
            "{key} not tolerated: {tolerated:?}"
        );
    }
    ensure!(
        pod["metadata"]["ownerReferences"][0]["kind"] == "DaemonSet",
        "{pod}"
    );

    // A node joins.
    cluster.add_node("n3", DAEMON_NODES, json!([])).await?;
    settled(&server, &["n1", "n2", "n3"], "busybox:1.36").await?;
    // A node leaves.
    cluster.remove_node("n2").await?;
    settled(&server, &["n1", "n3"], "busybox:1.36").await?;
    // A node stops matching the selector.
    server.kubectl_ok(&["label", "node", "n1", "skiff-test/daemons-"])?;
    settled(&server, &["n3"], "busybox:1.36").await?;
    // A tolerated taint lets the tainted node in.
    server.kubectl_ok(&[
        "patch",
        "daemonset",
        "agent",
        "-p",
        r#"{"spec":{"template":{"spec":{"tolerations":[{"key":"dedicated","operator":"Exists"}]}}}}"#,
    ])?;
    settled(&server, &["n3", "tainted"], "busybox:1.36").await?;

    server.kubectl_ok(&["delete", "daemonset", "agent", "--wait=false"])?;
    eventually("the daemon pods to go", || {
        let server = &server;
        async move { Ok(placement(server)?.is_empty().then_some(())) }
    })
    .await?;
    Ok(())
}

/// Nodes that had no Ready (and not terminating) daemon pod, at worst.
fn most_nodes_down(states: &[BTreeMap<String, PodView>], nodes: &[&str]) -> usize {
    states
        .iter()
        .map(|state| {
            nodes
                .iter()
                .filter(|node| {
                    !state
                        .values()
                        .any(|p| p.node.as_deref() == Some(**node) && p.ready && !p.terminating)
                })
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_changes_roll_within_the_budget() -> anyhow::Result<()> {
    let server = Server::start(SKIFF.as_ref(), &[]).await?;
    let mut cluster = Cluster::start(&server).await?;
    let nodes = ["n1", "n2", "n3", "n4"];
    for node in nodes {
        cluster.add_node(node, DAEMON_NODES, json!([])).await?;
    }
    server.kubectl_stdin(&["apply", "-f", "-"], AGENT)?;
    let ds = settled(&server, &nodes, "busybox:1.36").await?;
    ensure!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1,
        "{ds}"
    );

    // maxUnavailable 1: one node at a time without a daemon.
    let recording = cluster.record_pods("default");
    server.kubectl_ok(&["set", "image", "daemonset/agent", "app=busybox:1.37"])?;
    let rollout = server.kubectl_ok(&["rollout", "status", "daemonset/agent", "--timeout=90s"])?;
    println!("{rollout}");
    ensure!(rollout.contains("successfully rolled out"), "{rollout}");
    settled(&server, &nodes, "busybox:1.37").await?;
    let states = recording.states();
    let down = most_nodes_down(&states, &nodes);
    ensure!(down == 1, "{down} nodes were without their daemon at once");
    ensure!(
        recording.terminated().len() == nodes.len(),
        "{:?}",
        recording.terminated()
    );

    // maxSurge 1: the new pod starts before the old one goes, so no node
    // is ever without its daemon.
    server.kubectl_ok(&[
        "patch",
        "daemonset",
        "agent",
        "-p",
        r#"{"spec":{"updateStrategy":{"rollingUpdate":{"maxSurge":1,"maxUnavailable":0}}}}"#,
    ])?;
    let skip = recording.states().len();
    server.kubectl_ok(&["set", "image", "daemonset/agent", "app=busybox:1.38"])?;
    server.kubectl_ok(&["rollout", "status", "daemonset/agent", "--timeout=90s"])?;
    settled(&server, &nodes, "busybox:1.38").await?;
    let states = recording.states();
    let down = most_nodes_down(&states[skip..], &nodes);
    ensure!(
        down == 0,
        "{down} nodes were without their daemon while surging"
    );
    let most_pods = states[skip..]
        .iter()
        .map(|s| s.values().filter(|p| !p.terminating).count())
        .max()
        .unwrap_or(0);
    ensure!(
        most_pods <= nodes.len() + 1,
        "{most_pods} pods at once with maxSurge 1"
    );

    let history = server.kubectl_ok(&["rollout", "history", "daemonset/agent"])?;
    println!("{history}");
    let revisions: Vec<&str> = history
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.parse::<u32>().is_ok())
        .collect();
    ensure!(revisions == ["1", "2", "3"], "{history}");
    Ok(())
}
