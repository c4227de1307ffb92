//! Deployments and ReplicaSets through a real `skiff server` and the real
//! kubectl. No scheduler or node agent runs here: the test plays both for
//! three fake nodes — it binds every new pod to a node through
//! `pods/binding`, marks pods on those nodes Running and Ready, and
//! finishes the graceful deletion of pods being deleted — so the
//! controllers see pods come and go as on a real cluster.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, watcher};
use serde_json::{Value, json};
use skiff_e2e::server::Server;
use tokio::task::JoinHandle;

const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");
const NODES: [&str; 3] = ["node-1", "node-2", "node-3"];
/// Pods with this image are bound but never become ready.
const NEVER_READY: &str = "never-ready";
/// Generous: the machine may be busy running other tests.
const DEADLINE: Duration = Duration::from_secs(120);

/// A server, a client for it, and the fake scheduler and agents.
struct Cluster {
    server: Server,
    client: kube::Client,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn cluster() -> anyhow::Result<Cluster> {
    let server = Server::start(SKIFF.as_ref(), &[]).await?;
    let kubeconfig = kube::config::Kubeconfig::read_from(server.kubeconfig())?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    let client = kube::Client::try_from(config)?;
    let nodes: Api<Node> = Api::all(client.clone());
    for (i, name) in NODES.iter().enumerate() {
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "status": {
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                "lastHeartbeatTime": now(), "lastTransitionTime": now()}],
                "capacity": {"cpu": "8", "memory": "16Gi", "pods": "110"},
                "allocatable": {"cpu": "8", "memory": "16Gi", "pods": "110"},
                "addresses": [{"type": "InternalIP", "address": format!("127.0.0.{}", i + 1)}],
            },
        }))?;
        nodes.create(&PostParams::default(), &node).await?;
    }
    let tasks = vec![
        tokio::spawn(renew_leases(client.clone())),
        tokio::spawn(fake_agents(client.clone())),
    ];
    Ok(Cluster {
        server,
        client,
        tasks,
    })
}

impl Cluster {
    /// kubectl, without holding up the fake agents while it runs.
    fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        tokio::task::block_in_place(|| self.server.kubectl_ok(args))
    }

    fn kubectl_stdin(&self, args: &[&str], input: &str) -> anyhow::Result<String> {
        tokio::task::block_in_place(|| self.server.kubectl_stdin(args, input))
    }

    fn kubectl_err(&self, args: &[&str]) -> anyhow::Result<String> {
        tokio::task::block_in_place(|| self.server.kubectl_err(args))
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), "default")
    }

    fn sets(&self) -> Api<ReplicaSet> {
        Api::namespaced(self.client.clone(), "default")
    }

    async fn pods_labelled(&self, selector: &str) -> anyhow::Result<Vec<Pod>> {
        Ok(self
            .pods()
            .list(&ListParams::default().labels(selector))
            .await?
            .items)
    }

    /// The deployment's sets, by name.
    async fn sets_of(&self, app: &str) -> anyhow::Result<BTreeMap<String, ReplicaSet>> {
        let list = self
            .sets()
            .list(&ListParams::default().labels(&format!("app={app}")))
            .await?;
        Ok(list
            .items
            .into_iter()
            .map(|rs| (rs.name_any(), rs))
            .collect())
    }

    async fn rollout_status(&self, deployment: &str) -> anyhow::Result<String> {
        let out = self.kubectl(&[
            "rollout",
            "status",
            &format!("deployment/{deployment}"),
            "--timeout=120s",
        ])?;
        ensure!(out.contains("successfully rolled out"), "{out}");
        Ok(out)
    }

    /// The READY column of `kubectl get deployment`.
    fn ready_column(&self, deployment: &str) -> anyhow::Result<String> {
        let table = self.kubectl(&["get", "deployment", deployment, "--no-headers"])?;
        table
            .split_whitespace()
            .nth(1)
            .map(str::to_owned)
            .context("no READY column")
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Keeps the fake nodes' heartbeats fresh, as their agents would.
async fn renew_leases(client: kube::Client) {
    let leases: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    loop {
        for node in NODES {
            let lease = json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": node},
                "spec": {"holderIdentity": node, "leaseDurationSeconds": 40,
                         "renewTime": now().replace('Z', ".000000Z")},
            });
            let params = PatchParams::apply("fake-agent").force();
            let _ = leases.patch(node, &params, &Patch::Apply(&lease)).await;
        }
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

/// The scheduler's and the agents' part: binds unbound pods round-robin,
/// runs pods bound to a fake node (Running, Ready), and removes pods whose
/// graceful deletion started.
async fn fake_agents(client: kube::Client) {
    let pods: Api<Pod> = Api::all(client.clone());
    let events = watcher(pods, watcher::Config::default())
        .default_backoff()
        .applied_objects();
    let mut events = std::pin::pin!(events);
    let mut next = 0;
    while let Some(event) = events.next().await {
        let Ok(pod) = event else {
            continue;
        };
        let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
        let name = pod.name_any();
        if pod.metadata.deletion_timestamp.is_some() {
            let _ = api
                .delete(&name, &DeleteParams::default().grace_period(0))
                .await;
            continue;
        }
        let spec = pod.spec.as_ref();
        match spec.and_then(|s| s.node_name.as_deref()) {
            None => {
                let node = NODES[next % NODES.len()];
                next += 1;
                let binding = json!({
                    "apiVersion": "v1", "kind": "Binding",
                    "metadata": {"name": name},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": node},
                });
                let _ = api
                    .create_subresource::<_, Value>(
                        "binding",
                        &name,
                        &PostParams::default(),
                        &binding,
                    )
                    .await;
            }
            Some(node) if NODES.contains(&node) && !is_ready(&pod) => {
                let never = spec
                    .map(|s| s.containers.iter())
                    .into_iter()
                    .flatten()
                    .any(|c| c.image.as_deref() == Some(NEVER_READY));
                if never {
                    continue;
                }
                let at = now();
                let containers: Vec<Value> = spec
                    .map(|s| s.containers.iter())
                    .into_iter()
                    .flatten()
                    .map(|c| {
                        json!({
                            "name": c.name, "image": c.image, "imageID": "", "ready": true,
                            "restartCount": 0, "started": true,
                            "state": {"running": {"startedAt": at}},
                        })
                    })
                    .collect();
                let status = json!({"status": {
                    "containerStatuses": containers,
                    "phase": "Running",
                    "hostIP": "10.0.0.1",
                    "podIP": format!("10.42.0.{}", next % 250 + 2),
                    "startTime": at,
                    "conditions": [
                        {"type": "PodScheduled", "status": "True", "lastTransitionTime": at},
                        {"type": "Initialized", "status": "True", "lastTransitionTime": at},
                        {"type": "ContainersReady", "status": "True", "lastTransitionTime": at},
                        {"type": "Ready", "status": "True", "lastTransitionTime": at},
                    ],
                }});
                next += 1;
                let _ = api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                    .await;
            }
            Some(_) => {}
        }
    }
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn is_live(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
}

/// Polls `check` until it yields a value.
async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut last_error = None;
    loop {
        match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if tokio::time::Instant::now() > deadline {
            bail!("timed out waiting for {what} (last error: {last_error:?})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn deployment(name: &str, replicas: i32, image: &str, strategy: &str) -> String {
    format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
  labels: {{app: {name}}}
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: {name}}}
  strategy: {strategy}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
      containers:
      - name: app
        image: {image}
"#
    )
}

const ROLLING: &str = "{type: RollingUpdate, rollingUpdate: {maxSurge: 1, maxUnavailable: 1}}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployment_becomes_ready_and_scales() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        &deployment("web", 3, "nginx:1.25", "{type: RollingUpdate}"),
    )?;
    let status = cluster.rollout_status("web").await?;
    println!("{status}");
    let table = cluster.kubectl(&["get", "deployment", "web"])?;
    println!("{table}");
    ensure!(cluster.ready_column("web")? == "3/3", "{table}");

    // One set `web-<hash>` labelled with its hash, three pods named after
    // it and controlled by it.
    let sets = cluster.sets_of("web").await?;
    ensure!(sets.len() == 1, "{:?}", sets.keys());
    let (name, set) = sets.iter().next().context("no replicaset")?;
    let hash = set
        .labels()
        .get("pod-template-hash")
        .context("no pod-template-hash label")?;
    ensure!(*name == format!("web-{hash}"), "{name} vs {hash}");
    ensure!(set.annotations().get("deployment.kubernetes.io/revision") == Some(&"1".into()));
    let pods = cluster.pods_labelled("app=web").await?;
    ensure!(pods.len() == 3, "{} pods", pods.len());
    for pod in &pods {
        ensure!(
            pod.name_any().starts_with(&format!("{name}-")),
            "{}",
            pod.name_any()
        );
        ensure!(pod.labels().get("pod-template-hash") == Some(hash));
        let owner = &pod.owner_references()[0];
        ensure!(owner.kind == "ReplicaSet" && owner.name == *name);
        ensure!(owner.controller == Some(true) && owner.block_owner_deletion == Some(true));
    }
    let d: Deployment = Api::namespaced(cluster.client.clone(), "default")
        .get("web")
        .await?;
    ensure!(d.annotations().get("deployment.kubernetes.io/revision") == Some(&"1".into()));
    let status = d.status.context("no status")?;
    ensure!(status.observed_generation == d.metadata.generation);
    let reasons: BTreeSet<(String, String, String)> = status
        .conditions
        .unwrap_or_default()
        .into_iter()
        .map(|c| (c.type_, c.status, c.reason.unwrap_or_default()))
        .collect();
    ensure!(
        reasons.contains(&(
            "Available".into(),
            "True".into(),
            "MinimumReplicasAvailable".into()
        )) && reasons.contains(&(
            "Progressing".into(),
            "True".into(),
            "NewReplicaSetAvailable".into()
        )),
        "{reasons:?}"
    );

    cluster.kubectl(&["scale", "deployment/web", "--replicas=10"])?;
    cluster.rollout_status("web").await?;
    wait_for("10/10 ready", || async {
        Ok((cluster.ready_column("web")? == "10/10").then_some(()))
    })
    .await?;
    ensure!(cluster.pods_labelled("app=web").await?.len() == 10);

    cluster.kubectl(&["scale", "deployment/web", "--replicas=2"])?;
    wait_for("2 pods left", || async {
        let pods = cluster.pods_labelled("app=web").await?;
        Ok((pods.len() == 2 && cluster.ready_column("web")? == "2/2").then_some(()))
    })
    .await?;
    println!(
        "{}",
        cluster.kubectl(&["get", "deployment,replicaset,pods"])?
    );
    ensure!(
        cluster.sets_of("web").await?.len() == 1,
        "scaling made no new set"
    );
    Ok(())
}

/// What a sampler saw during a rollout.
#[derive(Debug, Default)]
struct Samples {
    count: usize,
    min_ready: usize,
    max_spec_total: i32,
    /// Samples with ready pods of two templates at once.
    mixed: usize,
    /// Samples with pods (of any state) of two templates at once.
    coexisting: usize,
}

/// Samples the app's pods and sets until stopped.
fn sample(cluster: &Cluster, app: &str) -> (Arc<AtomicBool>, JoinHandle<anyhow::Result<Samples>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), "default");
    let sets: Api<ReplicaSet> = Api::namespaced(cluster.client.clone(), "default");
    let selector = format!("app={app}");
    let stopped = stop.clone();
    let task = tokio::spawn(async move {
        let mut samples = Samples {
            min_ready: usize::MAX,
            ..Samples::default()
        };
        while !stopped.load(Ordering::Relaxed) {
            let list = pods.list(&ListParams::default().labels(&selector)).await?;
            let hash = |p: &Pod| p.labels().get("pod-template-hash").cloned();
            let ready: Vec<&Pod> = list
                .items
                .iter()
                .filter(|p| is_ready(p) && is_live(p))
                .collect();
            let ready_hashes: BTreeSet<_> = ready.iter().map(|p| hash(p)).collect();
            let all_hashes: BTreeSet<_> = list.items.iter().map(hash).collect();
            samples.count += 1;
            samples.min_ready = samples.min_ready.min(ready.len());
            samples.mixed += usize::from(ready_hashes.len() > 1);
            samples.coexisting += usize::from(all_hashes.len() > 1);
            let total: i32 = sets
                .list(&ListParams::default().labels(&selector))
                .await?
                .items
                .iter()
                .filter_map(|rs| rs.spec.as_ref()?.replicas)
                .sum();
            samples.max_spec_total = samples.max_spec_total.max(total);
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        Ok(samples)
    });
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_update_keeps_pods_available_and_undo_reuses_the_old_set() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let manifest = deployment("web", 4, "nginx:1.25", ROLLING)
        .replace("  replicas: 4\n", "  replicas: 4\n  minReadySeconds: 1\n");
    cluster.kubectl_stdin(&["apply", "-f", "-"], &manifest)?;
    cluster.rollout_status("web").await?;
    let first = cluster.sets_of("web").await?;
    let first_name = first.keys().next().context("no replicaset")?.clone();

    // Roll to a new image while sampling: never fewer than replicas -
    // maxUnavailable = 3 ready pods, never more than replicas + maxSurge
    // = 5 pods wanted.
    let (stop, sampler) = sample(&cluster, "web");
    cluster.kubectl(&["set", "image", "deployment/web", "app=nginx:1.26"])?;
    // The controller copies it to the new set (as upstream, to whichever
    // set is new when it syncs).
    cluster.kubectl(&[
        "annotate",
        "deployment/web",
        "kubernetes.io/change-cause=move to 1.26",
    ])?;
    let status = cluster.rollout_status("web").await?;
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.await??;
    println!("{status}\n{samples:?}");
    ensure!(samples.count > 5, "{samples:?}");
    ensure!(samples.min_ready >= 3, "availability dropped: {samples:?}");
    ensure!(samples.max_spec_total <= 5, "surged too far: {samples:?}");
    ensure!(
        samples.mixed > 0,
        "old and new pods never served together: {samples:?}"
    );

    let sets = cluster.sets_of("web").await?;
    ensure!(sets.len() == 2, "{:?}", sets.keys());
    let revision = |rs: &ReplicaSet| {
        rs.annotations()
            .get("deployment.kubernetes.io/revision")
            .cloned()
            .unwrap_or_default()
    };
    let replicas = |rs: &ReplicaSet| rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(-1);
    ensure!(revision(&sets[&first_name]) == "1" && replicas(&sets[&first_name]) == 0);
    let second_name = sets
        .keys()
        .find(|n| **n != first_name)
        .context("no new set")?
        .clone();
    ensure!(revision(&sets[&second_name]) == "2" && replicas(&sets[&second_name]) == 4);
    wait_for("only the new set's pods", || async {
        let pods = cluster.pods_labelled("app=web").await?;
        Ok(
            (pods.len() == 4 && pods.iter().all(|p| p.name_any().starts_with(&second_name)))
                .then_some(()),
        )
    })
    .await?;

    let history = wait_for("the change cause in the history", || async {
        let history = cluster.kubectl(&["rollout", "history", "deployment/web"])?;
        Ok(history.contains("move to 1.26").then_some(history))
    })
    .await?;
    println!("{history}");
    let revisions: Vec<(&str, &str)> = history
        .lines()
        .filter_map(|l| l.trim().split_once(char::is_whitespace))
        .filter(|(r, _)| r.parse::<u32>().is_ok())
        .map(|(r, cause)| (r, cause.trim()))
        .collect();
    ensure!(
        revisions == [("1", "<none>"), ("2", "move to 1.26")],
        "{history}"
    );
    let detail = cluster.kubectl(&["rollout", "history", "deployment/web", "--revision=1"])?;
    ensure!(detail.contains("nginx:1.25"), "{detail}");

    // Undo: kubectl patches the template back from revision 1's set; the
    // controller reuses that set as revision 3.
    let undo = cluster.kubectl(&["rollout", "undo", "deployment/web"])?;
    println!("{undo}");
    cluster.rollout_status("web").await?;
    let image = cluster.kubectl(&[
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.spec.template.spec.containers[0].image}",
    ])?;
    ensure!(image == "nginx:1.25", "{image}");
    let sets = cluster.sets_of("web").await?;
    ensure!(sets.len() == 2, "undo made a new set: {:?}", sets.keys());
    let reused = &sets[&first_name];
    ensure!(
        revision(reused) == "3" && replicas(reused) == 4,
        "{reused:?}"
    );
    ensure!(
        reused
            .annotations()
            .get("deployment.kubernetes.io/revision-history")
            == Some(&"1".into())
    );
    wait_for("only the reused set's pods", || async {
        let pods = cluster.pods_labelled("app=web").await?;
        Ok(
            (pods.len() == 4 && pods.iter().all(|p| p.name_any().starts_with(&first_name)))
                .then_some(()),
        )
    })
    .await?;
    let history = cluster.kubectl(&["rollout", "history", "deployment/web"])?;
    println!("{history}");
    let revisions: Vec<&str> = history
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.parse::<u32>().is_ok())
        .collect();
    ensure!(revisions == ["2", "3"], "{history}");
    let d = cluster.kubectl(&[
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.metadata.annotations.deployment\\.kubernetes\\.io/revision}",
    ])?;
    ensure!(d == "3", "deployment revision {d}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_limit_pause_and_progress_deadline() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let manifest = deployment("web", 2, "nginx:1", ROLLING).replace(
        "  replicas: 2\n",
        "  replicas: 2\n  revisionHistoryLimit: 1\n",
    );
    cluster.kubectl_stdin(&["apply", "-f", "-"], &manifest)?;
    cluster.rollout_status("web").await?;
    for image in ["nginx:2", "nginx:3"] {
        cluster.kubectl(&["set", "image", "deployment/web", &format!("app={image}")])?;
        cluster.rollout_status("web").await?;
    }
    // Three templates, one old set kept.
    wait_for("history trimmed to one old set", || async {
        Ok((cluster.sets_of("web").await?.len() == 2).then_some(()))
    })
    .await?;

    // Paused: a template change makes no new set until resumed.
    let before = cluster.sets_of("web").await?;
    cluster.kubectl(&["rollout", "pause", "deployment/web"])?;
    cluster.kubectl(&["set", "image", "deployment/web", "app=nginx:4"])?;
    let paused = wait_for("the paused condition", || async {
        let d: Deployment = Api::namespaced(cluster.client.clone(), "default")
            .get("web")
            .await?;
        let status = d.status.unwrap_or_default();
        let reason = status
            .conditions
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "Progressing")
            .and_then(|c| c.reason);
        Ok((status.observed_generation == d.metadata.generation
            && reason.as_deref() == Some("DeploymentPaused"))
        .then_some(()))
    })
    .await;
    paused?;
    // No set for the new template. (Paused, the current set counts as old
    // too, so history cleanup may take the other one, as upstream.)
    let before: BTreeSet<String> = before.into_keys().collect();
    let sets = cluster.sets_of("web").await?;
    ensure!(
        sets.keys().all(|name| before.contains(name)),
        "a paused deployment rolled: {before:?} -> {:?}",
        sets.keys()
    );
    cluster.kubectl(&["rollout", "resume", "deployment/web"])?;
    cluster.rollout_status("web").await?;
    wait_for("only nginx:4 pods", || async {
        let pods = cluster.pods_labelled("app=web").await?;
        let image = |p: &Pod| p.spec.as_ref().map(|s| s.containers[0].image.clone());
        Ok((pods.len() == 2
            && pods
                .iter()
                .all(|p| image(p) == Some(Some("nginx:4".into()))))
        .then_some(()))
    })
    .await?;

    // A template whose pods never become ready passes its deadline.
    cluster.kubectl(&[
        "patch",
        "deployment/web",
        "--type=merge",
        "-p",
        r#"{"spec":{"progressDeadlineSeconds":3}}"#,
    ])?;
    cluster.kubectl(&[
        "set",
        "image",
        "deployment/web",
        &format!("app={NEVER_READY}"),
    ])?;
    let stuck = cluster.kubectl_err(&["rollout", "status", "deployment/web", "--timeout=120s"])?;
    println!("{stuck}");
    ensure!(stuck.contains("exceeded its progress deadline"), "{stuck}");
    // The old pods still serve: maxUnavailable 1 of 2.
    wait_for("one old pod serving", || async {
        Ok((cluster.ready_column("web")? == "1/2").then_some(()))
    })
    .await?;
    println!(
        "{}",
        cluster.kubectl(&["get", "deployment,replicaset", "-o", "wide"])?
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recreate_removes_old_pods_before_new_ones_start() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        &deployment("db", 3, "postgres:15", "{type: Recreate}"),
    )?;
    cluster.rollout_status("db").await?;
    let (stop, sampler) = sample(&cluster, "db");
    cluster.kubectl(&["set", "image", "deployment/db", "app=postgres:16"])?;
    cluster.rollout_status("db").await?;
    stop.store(true, Ordering::Relaxed);
    let samples = sampler.await??;
    println!("{samples:?}");
    ensure!(samples.count > 5, "{samples:?}");
    ensure!(
        samples.coexisting == 0,
        "old and new pods overlapped: {samples:?}"
    );
    ensure!(samples.max_spec_total <= 3, "{samples:?}");
    let pods = cluster.pods_labelled("app=db").await?;
    ensure!(pods.len() == 3 && pods.iter().all(is_ready));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreground_deletion_removes_sets_and_pods_first() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        &deployment("web", 3, "nginx:1.25", "{type: RollingUpdate}"),
    )?;
    cluster.rollout_status("web").await?;
    let deleted = cluster.kubectl(&[
        "delete",
        "deployment",
        "web",
        "--cascade=foreground",
        "--timeout=120s",
    ])?;
    println!("{deleted}");
    // kubectl waited for the Deployment to go; it went last.
    ensure!(cluster.sets_of("web").await?.is_empty(), "replicasets left");
    let pods = cluster.pods_labelled("app=web").await?;
    ensure!(pods.is_empty(), "{} pods left", pods.len());
    Ok(())
}

fn pod_manifest(name: &str, labels: &str, node: Option<&str>) -> String {
    let node = node.map_or(String::new(), |n| format!("  nodeName: {n}\n"));
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {labels}\nspec:\n{node}  containers: [{{name: app, image: redis:7}}]\n"
    )
}

const CACHE_SET: &str = r#"
apiVersion: apps/v1
kind: ReplicaSet
metadata:
  name: cache
  labels: {app: cache}
spec:
  replicas: 2
  selector:
    matchLabels: {app: cache}
  template:
    metadata:
      labels: {app: cache}
    spec:
      containers:
      - name: app
        image: redis:7
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicaset_adopts_replaces_releases_and_trims() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    cluster.kubectl_stdin(
        &["create", "-f", "-"],
        &pod_manifest("orphan", "{app: cache}", None),
    )?;
    cluster.kubectl_stdin(&["create", "-f", "-"], CACHE_SET)?;
    let set = cluster.sets().get("cache").await?;
    let uid = set.metadata.uid.clone().context("no uid")?;

    // The orphan is adopted and counts: one pod is created, not two.
    let live = || async {
        let pods = cluster.pods_labelled("app=cache").await?;
        anyhow::Ok(pods.into_iter().filter(is_live).collect::<Vec<_>>())
    };
    let pods = wait_for("two ready pods", || async {
        let pods = live().await?;
        Ok((pods.len() == 2 && pods.iter().all(is_ready)).then_some(pods))
    })
    .await?;
    let orphan = pods
        .iter()
        .find(|p| p.name_any() == "orphan")
        .context("orphan replaced instead of adopted")?;
    let owner = &orphan.owner_references()[0];
    ensure!(
        owner.uid == uid
            && owner.controller == Some(true)
            && owner.block_owner_deletion == Some(true)
    );
    let other = pods
        .iter()
        .find(|p| p.name_any() != "orphan")
        .context("no second pod")?
        .name_any();
    ensure!(other.starts_with("cache-"), "{other}");

    // A deleted pod is replaced.
    cluster.kubectl(&["delete", "pod", &other, "--wait=true"])?;
    wait_for("a replacement", || async {
        let pods = live().await?;
        Ok(
            (pods.len() == 2 && pods.iter().all(|p| p.name_any() != other && is_ready(p)))
                .then_some(()),
        )
    })
    .await?;

    // A pod relabelled out of the selector is released and replaced.
    cluster.kubectl(&["label", "pod", "orphan", "app=other", "--overwrite"])?;
    wait_for("orphan released and replaced", || async {
        let released = cluster.pods().get("orphan").await?;
        let pods = live().await?;
        Ok((released.owner_references().is_empty() && pods.len() == 2).then_some(()))
    })
    .await?;

    // Surplus goes in upstream's order: a pod stuck pending on its node
    // before running, ready ones.
    cluster.kubectl_stdin(
        &["create", "-f", "-"],
        &pod_manifest("stuck", "{app: cache}", Some("elsewhere")),
    )?;
    wait_for("the stuck pod adopted and deleted", || async {
        let pods = live().await?;
        let stuck = pods.iter().any(|p| p.name_any() == "stuck");
        Ok((!stuck && pods.len() == 2).then_some(()))
    })
    .await?;

    cluster.kubectl(&["scale", "replicaset/cache", "--replicas=4"])?;
    wait_for("four ready pods", || async {
        let set = cluster.sets().get("cache").await?;
        let status = set.status.unwrap_or_default();
        Ok((status.ready_replicas == Some(4)
            && status.available_replicas == Some(4)
            && status.fully_labeled_replicas == Some(4)
            && status.observed_generation == set.metadata.generation)
            .then_some(()))
    })
    .await?;
    let table = cluster.kubectl(&["get", "replicaset", "cache", "-o", "wide"])?;
    println!("{table}");
    ensure!(live().await?.len() == 4);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_pods_record_an_event_and_other_sets_go_on() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    // The set is valid; its template's label key is not, so every pod
    // create is refused by validation.
    cluster.kubectl_stdin(
        &["create", "-f", "-"],
        &CACHE_SET
            .replace("name: cache", "name: bad")
            .replace("{app: cache}", "{app: bad}")
            .replace(
                "    metadata:\n      labels: {app: bad}",
                "    metadata:\n      labels: {app: bad, \"bad key!\": x}",
            ),
    )?;
    let event = wait_for("a FailedCreate event", || async {
        let events = cluster.kubectl(&["get", "events.events.k8s.io", "-o", "json"])?;
        let events: Value = serde_json::from_str(&events)?;
        Ok(events["items"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["reason"] == "FailedCreate" && e["regarding"]["name"] == "bad")
            .cloned())
    })
    .await?;
    println!("{event}");
    ensure!(event["type"] == "Warning", "{event}");
    let note = event["note"].as_str().unwrap_or_default();
    ensure!(
        note.contains("Error creating") && note.contains("bad key!"),
        "{note}"
    );
    let failure = wait_for("the ReplicaFailure condition", || async {
        let set = cluster.sets().get("bad").await?;
        Ok(set
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "ReplicaFailure"))
    })
    .await?;
    ensure!(failure.status == "True" && failure.reason.as_deref() == Some("FailedCreate"));

    // The controller keeps working for everything else.
    cluster.kubectl_stdin(
        &["apply", "-f", "-"],
        &deployment("web", 2, "nginx:1.25", "{type: RollingUpdate}"),
    )?;
    cluster.rollout_status("web").await?;
    ensure!(cluster.pods_labelled("app=bad").await?.is_empty());

    // Fixing the template clears the failure.
    cluster.kubectl(&[
        "patch",
        "replicaset",
        "bad",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/spec/template/metadata/labels/bad key!"}]"#,
    ])?;
    wait_for("the fixed set's pods", || async {
        let set = cluster.sets().get("bad").await?;
        let status = set.status.unwrap_or_default();
        Ok((status.ready_replicas == Some(2) && status.conditions.is_none()).then_some(()))
    })
    .await?;
    Ok(())
}
