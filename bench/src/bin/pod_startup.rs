//! Pod startup benchmark: a real `skiff server` with its node agent in a
//! network namespace of its own, real runc containers from a busybox image
//! imported beforehand, and pods created through the API. Each pod's
//! latency is from its create request to the moment a watch sees it
//! `Running`; batches of 1, 10 and 50 pods go to the one node at once.
//! Then the server's RSS with 50 pods running (the agent runs inside
//! `skiff server`, so that figure also holds the API server, store and
//! controllers) and the RSS of the per-container shims.
//!
//! Peers: upstream's pod startup SLO (p99 <= 5 s), Skiff's goal (p99 <=
//! 1 s for 10 pods, agent <= 40 MB) and k3s' agent (275 MB with
//! containerd). crun cannot run on this machine's hybrid cgroup layout,
//! so only runc is measured; the output says so.
//!
//! `cargo build --release -p skiff -p skiff-bench && target/release/pod_startup`

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::watcher::{self, watcher};
use skiff_bench::Samples;
use skiff_e2e::node::AgentNode;

const IMAGE: &str = "skiff-bench/busybox:1";
const BATCHES: [usize; 3] = [1, 10, 50];
const UPSTREAM_SLO: Duration = Duration::from_secs(5);
const GOAL_P99_10: Duration = Duration::from_secs(1);
const GOAL_AGENT_MB: f64 = 40.0;
const K3S_AGENT_MB: f64 = 275.0;
const DEADLINE: Duration = Duration::from_secs(300);

fn main() -> anyhow::Result<()> {
    let bin = skiff_bench::skiff_binary()?;
    let outside = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let node = outside.block_on(AgentNode::start(&bin, &[]))?;
    node.import_busybox(&bin, IMAGE)?;
    println!(
        "pod startup benchmark: skiff server + node agent (runc) in netns {}; busybox image \
         present; latency = create request -> Running seen by a watch; {} build",
        node.netns.name,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    println!("crun: not measured (it refuses this machine's hybrid v1/v2 cgroup layout)");
    // The API server listens inside the node's namespace, so the client
    // runs there, on a runtime whose one thread entered it.
    let netns = node.netns.name.clone();
    let result = skiff_e2e::netns::enter(&netns, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|inside| inside.block_on(measure(&node)))
    })?;
    drop(node);
    result
}

async fn measure(node: &AgentNode) -> anyhow::Result<()> {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(node.server.kubeconfig())?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    let client = kube::Client::try_from(config)?;
    wait_for_account(&client, "default").await?;
    let mut p99_10 = None;
    for (round, &count) in BATCHES.iter().enumerate() {
        let ns = format!("startup-{round}-{count}");
        create_namespace(&client, &ns).await?;
        wait_for_account(&client, &ns).await?;
        let samples = start_pods(&client, &ns, count).await?;
        let (p50, p99) = (samples.percentile(50.0), samples.percentile(99.0));
        if count == 10 {
            p99_10 = Some(p99);
        }
        println!(
            "runc {count:>3} pods: p50 {:>6.0} ms  p99 {:>6.0} ms  ({:.2}x upstream's 5 s SLO{})",
            ms(p50),
            ms(p99),
            p99.as_secs_f64() / UPSTREAM_SLO.as_secs_f64(),
            if count == 10 {
                format!(
                    "; {:.2}x the 1 s goal: {}",
                    p99.as_secs_f64() / GOAL_P99_10.as_secs_f64(),
                    if p99 <= GOAL_P99_10 { "met" } else { "missed" }
                )
            } else {
                String::new()
            }
        );
        if count == 50 {
            report_memory(node)?;
        }
        if round + 1 < BATCHES.len() {
            let api: Api<Namespace> = Api::all(client.clone());
            api.delete(&ns, &DeleteParams::default()).await?;
        }
    }
    ensure!(p99_10.is_some(), "the 10-pod batch did not run");
    Ok(())
}

/// Creates `count` pods at once; each one's create-to-Running latency.
async fn start_pods(client: &kube::Client, ns: &str, count: usize) -> anyhow::Result<Samples> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    // The watch runs before the first create so no transition is missed.
    let mut events = watcher(pods.clone(), watcher::Config::default()).boxed();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let watch = tokio::spawn(async move {
        let mut running: HashMap<String, Instant> = HashMap::new();
        let mut ready = Some(ready_tx);
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::InitDone) => {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
                    if phase == Some("Running")
                        && let Some(name) = pod.metadata.name
                    {
                        running.entry(name).or_insert_with(Instant::now);
                        if running.len() == count {
                            return running;
                        }
                    }
                }
                _ => {}
            }
        }
        running
    });
    ready_rx
        .await
        .context("the pod watch ended before it started")?;
    let started = Instant::now();
    let creates = (0..count).map(|i| {
        let pods = pods.clone();
        async move {
            let pod: Pod = serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("p{i}")},
                "spec": {
                    "terminationGracePeriodSeconds": 0,
                    "containers": [{
                        "name": "main", "image": IMAGE, "imagePullPolicy": "IfNotPresent",
                        "command": ["sleep", "3600"],
                    }],
                },
            }))?;
            let at = Instant::now();
            pods.create(&PostParams::default(), &pod).await?;
            anyhow::Ok((format!("p{i}"), at))
        }
    });
    let created: HashMap<String, Instant> = futures::future::try_join_all(creates)
        .await?
        .into_iter()
        .collect();
    let running = match tokio::time::timeout(DEADLINE, watch).await {
        Ok(joined) => joined?,
        Err(_) => bail!("{count} pods were not all Running within {DEADLINE:?}"),
    };
    ensure!(running.len() == count, "the pod watch ended early");
    let latencies = created
        .iter()
        .map(|(name, at)| {
            running
                .get(name)
                .map(|r| r.saturating_duration_since(*at))
                .with_context(|| format!("pod {name} never ran"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Samples::new(latencies, started.elapsed()))
}

fn report_memory(node: &AgentNode) -> anyhow::Result<()> {
    let pid = node.server.pid().context("the server is not running")?;
    let server = rss_mb(pid)?;
    let marker = node.server.data_dir().display().to_string();
    let mut shims = 0;
    let mut shim_mb = 0.0;
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("shim") && cmdline.contains(&marker) {
            shims += 1;
            shim_mb += pss_mb(pid).unwrap_or(0.0);
        }
    }
    println!(
        "memory with 50 pods: skiff server (API server + store + controllers + agent) RSS \
         {server:.1} MB ({:.2}x the 40 MB agent goal, {:.2}x k3s' 275 MB agent); \
         {shims} container shims {shim_mb:.1} MB in all (PSS: shared pages split between them)",
        server / GOAL_AGENT_MB,
        server / K3S_AGENT_MB,
    );
    Ok(())
}

fn rss_mb(pid: u32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS")?
        .parse()?;
    Ok(kb / 1024.0)
}

/// Proportional set size: shared pages (the shims are one binary) count
/// once across all processes, not once per process as RSS would.
fn pss_mb(pid: u32) -> anyhow::Result<f64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let kb: f64 = rollup
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no Pss")?
        .parse()?;
    Ok(kb / 1024.0)
}

async fn create_namespace(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
    api.create(&PostParams::default(), &ns).await?;
    Ok(())
}

/// Pods wait for their namespace's `default` account; the benchmark
/// measures pods, not that race.
async fn wait_for_account(client: &kube::Client, ns: &str) -> anyhow::Result<()> {
    let api: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + Duration::from_secs(60);
    while api.get_opt("default").await?.is_none() {
        if Instant::now() > deadline {
            bail!("namespace {ns} got no default ServiceAccount");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
