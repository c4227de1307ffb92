//! The scheduler inside a real `skiff server`, driven with the real
//! kubectl. There is no node agent: the tests create Node objects (with
//! status and heartbeat Leases) as an agent would, and read where pods
//! land from the API.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use skiff_e2e::server::Server;

const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");
const DEADLINE: Duration = Duration::from_secs(60);

/// A server and a kube client for playing the node agent.
struct Cluster {
    server: Server,
    client: kube::Client,
    leases: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for lease in &self.leases {
            lease.abort();
        }
    }
}

/// A fake node: its name, allocatable resources and extra fields.
struct FakeNode<'a> {
    name: &'a str,
    cpu: &'a str,
    memory: &'a str,
    labels: Value,
    spec: Value,
    ready: bool,
}

impl<'a> FakeNode<'a> {
    fn new(name: &'a str, cpu: &'a str, memory: &'a str) -> Self {
        FakeNode {
            name,
            cpu,
            memory,
            labels: json!({}),
            spec: json!({}),
            ready: true,
        }
    }

    fn labels(mut self, labels: Value) -> Self {
        self.labels = labels;
        self
    }

    fn spec(mut self, spec: Value) -> Self {
        self.spec = spec;
        self
    }

    /// Reports `Ready=False`: node lifecycle keeps the not-ready taint on.
    fn not_ready(mut self) -> Self {
        self.ready = false;
        self
    }
}

impl Cluster {
    async fn start() -> anyhow::Result<Self> {
        let server = Server::start(SKIFF.as_ref(), &[]).await?;
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(server.kubeconfig())?,
            &Default::default(),
        )
        .await?;
        let client = kube::Client::try_from(config)?;
        Ok(Cluster {
            server,
            client,
            leases: Vec::new(),
        })
    }

    /// Registers a Ready node and keeps its Lease renewed, as an agent.
    async fn add_node(&mut self, node: FakeNode<'_>) -> anyhow::Result<()> {
        let mut labels = json!({
            "kubernetes.io/hostname": node.name,
            "kubernetes.io/os": "linux",
        });
        if let (Some(into), Some(from)) = (labels.as_object_mut(), node.labels.as_object()) {
            into.extend(from.clone());
        }
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let resources = json!({"cpu": node.cpu, "memory": node.memory, "pods": "110"});
        let object: Node = serde_json::from_value(json!({
            "metadata": {"name": node.name, "labels": labels},
            "spec": node.spec,
            "status": {
                "capacity": resources,
                "allocatable": resources,
                "conditions": [{"type": "Ready", "status": if node.ready { "True" } else { "False" },
                    "reason": "KubeletReady",
                    "message": "fake node", "lastHeartbeatTime": now, "lastTransitionTime": now}],
                "addresses": [{"type": "InternalIP", "address": "10.0.0.1"},
                    {"type": "Hostname", "address": node.name}],
                "nodeInfo": {"machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "6.1",
                    "osImage": "fake", "containerRuntimeVersion": "fake://1", "kubeletVersion": "v1.33.0",
                    "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"}
            }
        }))?;
        Api::<Node>::all(self.client.clone())
            .create(&PostParams::default(), &object)
            .await
            .with_context(|| format!("creating node {}", node.name))?;
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "kube-node-lease");
        let name = node.name.to_owned();
        self.leases.push(tokio::spawn(async move {
            loop {
                let lease = json!({
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": name},
                    "spec": {"holderIdentity": name, "leaseDurationSeconds": 40,
                        "renewTime": k8s_openapi::jiff::Timestamp::now().to_string()}
                });
                let _ = leases
                    .patch(
                        &name,
                        &PatchParams::apply("fake-agent").force(),
                        &Patch::Apply(&lease),
                    )
                    .await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        }));
        Ok(())
    }

    fn apply(&self, yaml: &str) -> anyhow::Result<()> {
        self.server.kubectl_stdin(&["apply", "-f", "-"], yaml)?;
        Ok(())
    }

    fn node_of(&self, pod: &str) -> anyhow::Result<String> {
        self.server
            .kubectl_ok(&["get", "pod", pod, "-o", "jsonpath={.spec.nodeName}"])
    }

    /// Waits until the pod is bound; returns its node.
    async fn bound(&self, pod: &str) -> anyhow::Result<String> {
        wait_for(&format!("pod {pod} bound"), || async {
            let node = self.node_of(pod)?;
            Ok((!node.is_empty()).then_some(node))
        })
        .await
    }

    /// Waits until the pod's FailedScheduling event says `message`.
    async fn failed_with(&self, pod: &str, message: &str) -> anyhow::Result<()> {
        wait_for(&format!("FailedScheduling of {pod}: {message}"), || async {
            let events = self.server.kubectl_ok(&[
                "get",
                "events",
                "--field-selector",
                &format!("involvedObject.name={pod},reason=FailedScheduling"),
                "-o",
                "json",
            ])?;
            let events: Value = serde_json::from_str(&events)?;
            let found = events["items"]
                .as_array()
                .is_some_and(|items| items.iter().any(|e| e["message"] == message));
            Ok(found.then_some(()))
        })
        .await
    }
}

async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + DEADLINE;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what} (last error: {last_error:?})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A pod manifest: `name`, then YAML lines indented under `spec:`.
fn pod(name: &str, labels: &str, spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{{labels}}}\nspec:\n{spec}\n"
    )
}

fn container(requests: &str) -> String {
    format!(
        "  containers:\n  - name: app\n    image: registry.local/app:1\n    resources:\n      requests: {{{requests}}}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_land_only_on_nodes_that_fit() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    cluster
        .add_node(FakeNode::new("small", "1", "1Gi").labels(json!({"zone": "a", "cores": "1"})))
        .await?;
    cluster
        .add_node(
            FakeNode::new("big", "8", "16Gi")
                .labels(json!({"zone": "b", "cores": "8", "disk": "ssd"})),
        )
        .await?;
    cluster
        .add_node(FakeNode::new("gpu", "8", "16Gi").spec(json!({"taints": [
            {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]})))
        .await?;
    cluster
        .add_node(FakeNode::new("cordoned", "8", "16Gi").spec(json!({"unschedulable": true})))
        .await?;
    cluster
        .add_node(
            FakeNode::new("not-ready", "8", "16Gi")
                .spec(json!({"taints": [
                    {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}]}))
                .not_ready(),
        )
        .await?;

    let cases = [
        // Only "big" has 2 cpus free among the nodes that take pods.
        ("cpu", pod("cpu", "", &container("cpu: '2'")), "big"),
        (
            "memory",
            pod("memory", "", &container("memory: 4Gi")),
            "big",
        ),
        (
            "selector",
            pod(
                "selector",
                "",
                &format!("  nodeSelector: {{disk: ssd}}\n{}", container("cpu: 10m")),
            ),
            "big",
        ),
        (
            "affinity-in",
            pod(
                "affinity-in",
                "",
                &format!(
                    "  affinity:\n    nodeAffinity:\n      requiredDuringSchedulingIgnoredDuringExecution:\n        nodeSelectorTerms:\n        - matchExpressions:\n          - {{key: zone, operator: In, values: [a]}}\n{}",
                    container("cpu: 10m")
                ),
            ),
            "small",
        ),
        (
            "affinity-gt",
            pod(
                "affinity-gt",
                "",
                &format!(
                    "  affinity:\n    nodeAffinity:\n      requiredDuringSchedulingIgnoredDuringExecution:\n        nodeSelectorTerms:\n        - matchExpressions:\n          - {{key: cores, operator: Gt, values: ['4']}}\n{}",
                    container("cpu: 10m")
                ),
            ),
            "big",
        ),
        (
            "affinity-field",
            pod(
                "affinity-field",
                "",
                &format!(
                    "  affinity:\n    nodeAffinity:\n      requiredDuringSchedulingIgnoredDuringExecution:\n        nodeSelectorTerms:\n        - matchFields:\n          - {{key: metadata.name, operator: In, values: [small]}}\n{}",
                    container("cpu: 10m")
                ),
            ),
            "small",
        ),
        (
            "tolerates-gpu",
            pod(
                "tolerates-gpu",
                "",
                &format!(
                    "  nodeSelector: {{kubernetes.io/hostname: gpu}}\n  tolerations:\n  - {{key: dedicated, operator: Equal, value: gpu, effect: NoSchedule}}\n{}",
                    container("cpu: '4'")
                ),
            ),
            "gpu",
        ),
    ];
    for (_, manifest, _) in &cases {
        cluster.apply(manifest)?;
    }
    for (name, _, want) in &cases {
        let node = cluster.bound(name).await?;
        ensure!(node == *want, "pod {name} landed on {node}, want {want}");
    }

    // Nodes that are cordoned, not ready or tainted take nothing else;
    // "big" is nearly full, "small" too small.
    cluster.apply(&pod("too-big", "", &container("cpu: '6'")))?;
    cluster
        .failed_with(
            "too-big",
            "0/5 nodes are available: 1 node(s) had untolerated taint {dedicated: gpu}, \
             1 node(s) had untolerated taint {node.kubernetes.io/not-ready: }, \
             1 node(s) were unschedulable, 2 Insufficient cpu.",
        )
        .await?;
    // kubectl uncordon lets it go to the cordoned node.
    cluster.server.kubectl_ok(&["uncordon", "cordoned"])?;
    ensure!(cluster.bound("too-big").await? == "cordoned");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anti_affinity_and_host_ports_keep_pods_apart() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    for name in ["n1", "n2", "n3"] {
        cluster.add_node(FakeNode::new(name, "4", "8Gi")).await?;
    }
    let anti = format!(
        "  affinity:\n    podAntiAffinity:\n      requiredDuringSchedulingIgnoredDuringExecution:\n      - labelSelector: {{matchLabels: {{app: db}}}}\n        topologyKey: kubernetes.io/hostname\n{}",
        container("cpu: 10m")
    );
    let ports = "  containers:\n  - name: app\n    image: registry.local/app:1\n    ports:\n    - {containerPort: 80, hostPort: 8080}";
    for i in 0..4 {
        cluster.apply(&pod(&format!("db-{i}"), "app: db", &anti))?;
        cluster.apply(&pod(&format!("web-{i}"), "app: web", ports))?;
    }
    let mut db_nodes = Vec::new();
    let mut web_nodes = Vec::new();
    for i in 0..3 {
        db_nodes.push(cluster.bound(&format!("db-{i}")).await?);
        web_nodes.push(cluster.bound(&format!("web-{i}")).await?);
    }
    db_nodes.sort();
    web_nodes.sort();
    ensure!(db_nodes == ["n1", "n2", "n3"], "db pods on {db_nodes:?}");
    ensure!(web_nodes == ["n1", "n2", "n3"], "web pods on {web_nodes:?}");
    cluster
        .failed_with(
            "db-3",
            "0/3 nodes are available: 3 node(s) didn't match pod anti-affinity rules.",
        )
        .await?;
    cluster
        .failed_with(
            "web-3",
            "0/3 nodes are available: 3 node(s) didn't have free ports for the requested pod ports.",
        )
        .await?;
    ensure!(cluster.node_of("db-3")?.is_empty() && cluster.node_of("web-3")?.is_empty());

    // Deleting one db pod frees its node for the fourth.
    let freed = cluster.node_of("db-0")?;
    cluster
        .server
        .kubectl_ok(&["delete", "pod", "db-0", "--grace-period=0", "--force"])?;
    ensure!(cluster.bound("db-3").await? == freed);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicaset_pods_spread_over_nodes() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    for name in ["n1", "n2", "n3", "n4"] {
        cluster.add_node(FakeNode::new(name, "16", "32Gi")).await?;
    }
    cluster.apply(
        "apiVersion: apps/v1\nkind: ReplicaSet\nmetadata:\n  name: web\nspec:\n  replicas: 12\n  selector:\n    matchLabels: {app: web}\n  template:\n    metadata:\n      labels: {app: web}\n    spec:\n      containers:\n      - name: app\n        image: registry.local/app:1\n        resources:\n          requests: {cpu: 100m, memory: 64Mi}\n",
    )?;
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    // With a ReplicaSet controller the pods appear by themselves; without
    // one, create them as it would, owned by the ReplicaSet.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let listed = pods.list(&Default::default()).await?;
    if listed.items.is_empty() {
        let uid =
            cluster
                .server
                .kubectl_ok(&["get", "rs", "web", "-o", "jsonpath={.metadata.uid}"])?;
        for i in 0..12 {
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": format!("web-{i}"), "labels": {"app": "web"},
                    "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web",
                        "uid": uid, "controller": true, "blockOwnerDeletion": true}]},
                "spec": {"containers": [{"name": "app", "image": "registry.local/app:1",
                    "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]}
            }))?;
            pods.create(&PostParams::default(), &pod).await?;
        }
    }
    let per_node = wait_for("12 web pods bound", || async {
        let list = pods.list(&Default::default()).await?;
        let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
        for pod in &list.items {
            match pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
                Some(node) => *per_node.entry(node).or_default() += 1,
                None => return Ok(None),
            }
        }
        Ok((list.items.len() == 12).then_some(per_node))
    })
    .await?;
    ensure!(
        per_node.len() == 4 && per_node.values().all(|&n| n == 3),
        "12 pods of one ReplicaSet over 4 equal nodes: {per_node:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unschedulable_pod_is_reported_then_scheduled_when_a_node_fits() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    for name in ["n1", "n2", "n3"] {
        cluster.add_node(FakeNode::new(name, "1", "2Gi")).await?;
    }
    cluster.apply(&pod(
        "hungry",
        "app: hungry",
        &container("cpu: '2', memory: 1Gi"),
    ))?;
    let message = "0/3 nodes are available: 3 Insufficient cpu.";
    cluster.failed_with("hungry", message).await?;

    let describe = cluster.server.kubectl_ok(&["describe", "pod", "hungry"])?;
    println!("{describe}");
    ensure!(
        describe.contains("FailedScheduling") && describe.contains(message),
        "kubectl describe pod:\n{describe}"
    );
    ensure!(describe.contains("default-scheduler"), "{describe}");
    let events = cluster.server.kubectl_ok(&["get", "events"])?;
    println!("{events}");
    ensure!(
        events.contains("FailedScheduling") && events.contains(message),
        "{events}"
    );
    let condition = cluster.server.kubectl_ok(&[
        "get",
        "pod",
        "hungry",
        "-o",
        "jsonpath={.status.conditions[?(@.type==\"PodScheduled\")]}",
    ])?;
    let condition: Value = serde_json::from_str(&condition)?;
    ensure!(
        condition["status"] == "False"
            && condition["reason"] == "Unschedulable"
            && condition["message"] == message,
        "{condition}"
    );

    cluster.add_node(FakeNode::new("roomy", "4", "8Gi")).await?;
    ensure!(cluster.bound("hungry").await? == "roomy");
    let condition = wait_for("PodScheduled=True", || async {
        let status = cluster.server.kubectl_ok(&[
            "get",
            "pod",
            "hungry",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"PodScheduled\")].status}",
        ])?;
        Ok((status == "True").then_some(status))
    })
    .await?;
    ensure!(condition == "True");
    let describe = wait_for("the Scheduled event", || async {
        let describe = cluster.server.kubectl_ok(&["describe", "pod", "hungry"])?;
        Ok(describe
            .contains("Successfully assigned default/hungry to roomy")
            .then_some(describe))
    })
    .await?;
    println!("{describe}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_with_a_node_or_another_scheduler_are_left_alone() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    cluster.add_node(FakeNode::new("n1", "1", "2Gi")).await?;
    // Bound by someone else: untouched, and its requests count.
    cluster.apply(&pod(
        "pinned",
        "",
        &format!("  nodeName: n1\n{}", container("cpu: 800m")),
    ))?;
    cluster.apply(&pod(
        "ghost",
        "",
        &format!("  nodeName: no-such-node\n{}", container("cpu: 10m")),
    ))?;
    cluster.apply(&pod(
        "custom",
        "",
        &format!("  schedulerName: my-scheduler\n{}", container("cpu: 10m")),
    ))?;
    cluster.apply(&pod("squeezed", "", &container("cpu: 500m")))?;
    cluster
        .failed_with("squeezed", "0/1 nodes are available: 1 Insufficient cpu.")
        .await?;
    ensure!(cluster.node_of("pinned")? == "n1");
    ensure!(cluster.node_of("ghost")? == "no-such-node");
    ensure!(cluster.node_of("custom")?.is_empty());
    let events = cluster
        .server
        .kubectl_ok(&["get", "events", "-o", "json"])?;
    let events: Value = serde_json::from_str(&events)?;
    for item in events["items"].as_array().into_iter().flatten() {
        let about = item["involvedObject"]["name"].as_str().unwrap_or_default();
        ensure!(
            !matches!(about, "pinned" | "ghost" | "custom"),
            "the scheduler wrote about {about}: {item}"
        );
    }
    for name in ["pinned", "ghost", "custom"] {
        let conditions = cluster.server.kubectl_ok(&[
            "get",
            "pod",
            name,
            "-o",
            "jsonpath={.status.conditions}",
        ])?;
        ensure!(!conditions.contains("PodScheduled"), "{name}: {conditions}");
    }
    // Deleting the pinned pod frees its cpu for the squeezed one.
    cluster
        .server
        .kubectl_ok(&["delete", "pod", "pinned", "--grace-period=0", "--force"])?;
    ensure!(cluster.bound("squeezed").await? == "n1");
    Ok(())
}

/// A pod that mounts the claim `claim`, asking for `cpu`.
fn claim_pod(name: &str, claim: &str, cpu: &str) -> String {
    let spec = format!(
        "{}\n    volumeMounts: [{{name: data, mountPath: /data}}]\n  volumes:\n  - name: data\n    persistentVolumeClaim: {{claimName: {claim}}}",
        container(&format!("cpu: {cpu}"))
    );
    pod(name, "", &spec)
}

fn claim_yaml(name: &str, class: Option<&str>, size: &str) -> String {
    let class = class.map_or(String::new(), |c| format!("  storageClassName: {c}\n"));
    format!(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: {name}\nspec:\n{class}  accessModes: [ReadWriteOnce]\n  resources:\n    requests: {{storage: {size}}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_path_volumes_are_made_where_their_first_pod_lands() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    for name in ["n1", "n2", "n3"] {
        cluster.add_node(FakeNode::new(name, "4", "8Gi")).await?;
    }
    // A claim without a class gets the default one, and waits for its pod.
    cluster.apply(&claim_yaml("data", None, "2Gi"))?;
    let class = wait_for("the default class on the claim", || async {
        let class = cluster.server.kubectl_ok(&[
            "get",
            "pvc",
            "data",
            "-o",
            "jsonpath={.spec.storageClassName}",
        ])?;
        Ok((!class.is_empty()).then_some(class))
    })
    .await?;
    ensure!(class == "local-path", "default class {class}");
    let phase = |cluster: &Cluster| {
        cluster
            .server
            .kubectl_ok(&["get", "pvc", "data", "-o", "jsonpath={.status.phase}"])
    };
    ensure!(phase(&cluster)? != "Bound", "bound before any pod used it");

    cluster.apply(&claim_pod("first", "data", "100m"))?;
    let node = cluster.bound("first").await?;
    wait_for("the claim bound", || async {
        Ok((phase(&cluster)? == "Bound").then_some(()))
    })
    .await?;
    let volume =
        cluster
            .server
            .kubectl_ok(&["get", "pvc", "data", "-o", "jsonpath={.spec.volumeName}"])?;
    let pv: Value = serde_json::from_str(
        &cluster
            .server
            .kubectl_ok(&["get", "pv", &volume, "-o", "json"])?,
    )?;
    ensure!(pv["status"]["phase"] == "Bound", "volume {pv}");
    ensure!(pv["spec"]["capacity"]["storage"] == "2Gi", "volume {pv}");
    let path = pv["spec"]["hostPath"]["path"].as_str().unwrap_or_default();
    let storage = cluster.server.data_dir().join("storage");
    ensure!(
        path.starts_with(&*storage.to_string_lossy()) && path.ends_with("_default_data"),
        "volume path {path}"
    );
    let pinned =
        &pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0];
    ensure!(
        pinned["values"] == json!([node]),
        "volume affinity {pinned}"
    );

    // Later pods of the claim follow its volume, though spreading would
    // put them elsewhere.
    for name in ["second", "third", "fourth"] {
        cluster.apply(&claim_pod(name, "data", "500m"))?;
        let landed = cluster.bound(name).await?;
        ensure!(
            landed == node,
            "{name} went to {landed}, the volume is on {node}"
        );
    }

    // The claim gone, the provisioned volume goes too (reclaim: Delete).
    cluster.server.kubectl_ok(&[
        "delete",
        "pod",
        "first",
        "second",
        "third",
        "fourth",
        "--grace-period=0",
        "--force",
    ])?;
    cluster
        .server
        .kubectl_ok(&["delete", "pvc", "data", "--wait=false"])?;
    wait_for("the released volume deleted", || async {
        let left = cluster.server.kubectl_ok(&["get", "pv", "-o", "name"])?;
        Ok(left.is_empty().then_some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_bind_to_fitting_volumes_and_pods_wait_for_their_claims() -> anyhow::Result<()> {
    let mut cluster = Cluster::start().await?;
    cluster.add_node(FakeNode::new("n1", "4", "8Gi")).await?;
    let volume = |name: &str, size: &str| {
        format!(
            "apiVersion: v1\nkind: PersistentVolume\nmetadata:\n  name: {name}\nspec:\n  storageClassName: manual\n  capacity: {{storage: {size}}}\n  accessModes: [ReadWriteOnce]\n  persistentVolumeReclaimPolicy: Retain\n  hostPath: {{path: /tmp/{name}}}\n"
        )
    };
    cluster.apply(&volume("small", "1Gi"))?;
    cluster.apply(&volume("large", "10Gi"))?;
    cluster.apply(&volume("medium", "5Gi"))?;
    cluster.apply(&claim_yaml("logs", Some("manual"), "2Gi"))?;
    let bound_to = |claim: &str| {
        cluster.server.kubectl_ok(&[
            "get",
            "pvc",
            claim,
            "-o",
            "jsonpath={.spec.volumeName}/{.status.phase}",
        ])
    };
    wait_for("logs bound to the smallest volume that fits", || async {
        Ok((bound_to("logs")? == "medium/Bound").then_some(()))
    })
    .await?;
    let pv_phase =
        cluster
            .server
            .kubectl_ok(&["get", "pv", "medium", "-o", "jsonpath={.status.phase}"])?;
    ensure!(pv_phase == "Bound", "medium is {pv_phase}");

    // A pod whose claim does not exist waits, and says why.
    cluster.apply(&claim_pod("waiting", "cache", "100m"))?;
    cluster
        .failed_with(
            "waiting",
            "0/1 nodes are available: persistentvolumeclaim \"cache\" not found.",
        )
        .await?;
    // Nothing fits a claim of 20Gi: it stays unbound, and so does the pod.
    cluster.apply(&claim_yaml("cache", Some("manual"), "20Gi"))?;
    cluster
        .failed_with(
            "waiting",
            "0/1 nodes are available: pod has unbound immediate PersistentVolumeClaims.",
        )
        .await?;
    ensure!(
        cluster.node_of("waiting")?.is_empty(),
        "scheduled without its volume"
    );
    cluster.apply(&volume("huge", "50Gi"))?;
    wait_for("cache bound", || async {
        Ok((bound_to("cache")? == "huge/Bound").then_some(()))
    })
    .await?;
    cluster.bound("waiting").await?;

    // With Retain, a volume outlives its claim as Released.
    cluster.server.kubectl_ok(&["delete", "pvc", "logs"])?;
    wait_for("medium released", || async {
        let phase = cluster.server.kubectl_ok(&[
            "get",
            "pv",
            "medium",
            "-o",
            "jsonpath={.status.phase}",
        ])?;
        Ok((phase == "Released").then_some(()))
    })
    .await
}
