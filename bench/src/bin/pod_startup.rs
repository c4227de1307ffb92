//! Pod startup benchmark: a real `skiff server` (without its local agent)
//! and a `skiff agent` that joined it with the server's token, as a second
//! node would, both in one network namespace of their own; real runc
//! containers from a busybox image imported beforehand, and pods created
//! through the API. Each pod's latency is from its create request to the
//! moment a watch sees it `Running`; batches of 1, 10 and 50 pods go to
//! the one node at once. Then, with 50 pods running, the agent process's
//! RSS (the node agent and the node's pod network, as k3s' agent holds
//! flannel), the server's, the per-container shims' total PSS (they
//! are what containerd-shim processes are to containerd), and the node's
//! cluster DNS process's (CoreDNS or NodeLocal DNSCache's job).
//!
//! Peers: upstream's pod startup SLO (p99 <= 5 s), Skiff's goal (p99 <=
//! 1 s for 10 pods, agent <= 40 MB), k3s' agent (275 MB with
//! containerd), and a bare `runc run` / `crun run` of a container running
//! `true`, timed here. crun is tried for real; on a hybrid cgroup layout
//! it refuses, and the output says so with its own message.
//!
//! `cargo build --release -p skiff && cargo run --profile bench -p skiff-bench
//! --bin pod_startup`

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::{Api, DeleteParams, PostParams};
use kube::runtime::watcher::{self, watcher};
use skiff_bench::Samples;
use skiff_e2e::node::{AgentNode, JoinedAgent};

const IMAGE: &str = "skiff-bench/busybox:1";
const BATCHES: [usize; 3] = [1, 10, 50];
const UPSTREAM_SLO: Duration = Duration::from_secs(5);
const GOAL_P99_10: Duration = Duration::from_secs(1);
const GOAL_AGENT_MB: f64 = 40.0;
const K3S_AGENT_MB: f64 = 275.0;
const DEADLINE: Duration = Duration::from_secs(300);
/// Runs of the bare runtime peer (`runc run` of `true`).
const BARE_RUNS: usize = 10;

fn main() -> anyhow::Result<()> {
    let bin = skiff_bench::skiff_binary()?;
    println!(
        "pod startup benchmark: skiff server + joined skiff agent (runc), busybox image present; \
         latency = create request -> Running seen by a watch; {} build",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    bare_runtimes()?;
    let outside = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let node = outside.block_on(AgentNode::start(
        &bin,
        &["--disable", "agent", "--disable", "network"],
    ))?;
    let agent = JoinedAgent::beside(&bin, &node, IMAGE)?;
    println!(
        "server and agent in netns {}; agent pid {}",
        node.netns.name,
        agent.child.id()
    );
    // The API server listens inside the node's namespace, so the client
    // runs there, on a runtime whose one thread entered it.
    let netns = node.netns.name.clone();
    let result = skiff_e2e::netns::enter(&netns, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|inside| inside.block_on(measure(&node, &agent)))
    })?;
    if result.is_err() {
        eprintln!("agent log:\n{}", agent.log_tail());
    }
    drop(agent);
    drop(node);
    result
}

async fn measure(node: &AgentNode, agent: &JoinedAgent) -> anyhow::Result<()> {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(node.server.kubeconfig())?,
        &kube::config::KubeConfigOptions::default(),
    )
    .await?;
    let client = kube::Client::try_from(config)?;
    wait_for_node(&client, &agent.name).await?;
    wait_for_account(&client, "default").await?;
    let mut p99_10 = None;
    for (round, &count) in BATCHES.iter().enumerate() {
        let ns = format!("startup-{round}-{count}");
        create_namespace(&client, &ns).await?;
        wait_for_account(&client, &ns).await?;
        let server_pid = node.server.pid().context("the server is not running")?;
        let agent_before = own_and_children_cpu(agent.child.id())?;
        let dns_before = node_dns_cpu(agent);
        let cpu_before = (
            skiff_bench::cpu_seconds(server_pid)?,
            agent_before.0,
            machine_cpu_seconds()?,
            agent_before.1,
        );
        let samples = start_pods(&client, &ns, count).await?;
        let agent_after = own_and_children_cpu(agent.child.id())?;
        let cpu = (
            skiff_bench::cpu_seconds(server_pid)? - cpu_before.0,
            agent_after.0 - cpu_before.1,
            machine_cpu_seconds()? - cpu_before.2,
            agent_after.1 - cpu_before.3,
        );
        // The node's DNS watches every pod; a restart between the two
        // readings would make the difference meaningless.
        let dns_cpu = match (dns_before, node_dns_cpu(agent)) {
            (Some((pid, before)), Some((pid_after, after))) if pid == pid_after => {
                Some(after - before)
            }
            _ => None,
        };
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
        println!(
            "  CPU for the batch: server {:.2} s, agent {:.2} s (+ {:.2} s in the children it \
             waited for: shim launchers), node DNS {}, everything else on the machine (shims, \
             runc, kernel, other processes) {:.2} s, over {:.2} s",
            cpu.0,
            cpu.1,
            cpu.3,
            dns_cpu.map_or("not running".to_owned(), |s| format!("{s:.2} s")),
            (cpu.2 - cpu.0 - cpu.1 - cpu.3 - dns_cpu.unwrap_or(0.0)).max(0.0),
            samples.wall().as_secs_f64()
        );
        if count == 50 {
            report_memory(node, agent)?;
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

fn report_memory(node: &AgentNode, agent: &JoinedAgent) -> anyhow::Result<()> {
    let agent_mb = rss_mb(agent.child.id())?;
    let agent_pss = pss_mb(agent.child.id())?;
    let agent_huge = rollup_mb(agent.child.id(), "AnonHugePages:")?;
    let server_pid = node.server.pid().context("the server is not running")?;
    let server_mb = rss_mb(server_pid)?;
    let marker = agent.data_dir.path().display().to_string();
    let mut shims = 0;
    let mut shim_mb = 0.0;
    let (mut shim_cpu, mut runc_cpu) = (0.0, 0.0);
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        if cmdline.contains("shim") && cmdline.contains(&marker) {
            shims += 1;
            shim_mb += pss_mb(pid).unwrap_or(0.0);
            let (own, waited) = own_and_children_cpu(pid).unwrap_or((0.0, 0.0));
            shim_cpu += own;
            runc_cpu += waited;
        }
    }
    println!(
        "memory with 50 pods: skiff agent RSS {agent_mb:.1} MB (PSS {agent_pss:.1} MB, \
         {agent_huge:.1} MB of it transparent huge pages; {:.2}x the 40 MB goal: {}; {:.2}x k3s' 275 MB agent with containerd)",
        agent_mb / GOAL_AGENT_MB,
        if agent_mb <= GOAL_AGENT_MB {
            "met"
        } else {
            "missed"
        },
        agent_mb / K3S_AGENT_MB,
    );
    let kinds = rss_by_kind(agent.child.id())?;
    println!(
        "  the agent's RSS by kind: the skiff executable's mapped code and data {:.1} MB, \
         anonymous (heap, stacks, copied-on-write data) {:.1} MB, shared libraries {:.1} MB; \
         {} threads",
        kinds.executable_mb, kinds.anonymous_mb, kinds.libraries_mb, kinds.threads
    );
    println!(
        "  plus {shims} container shims (the containerd-shim equivalent): PSS {shim_mb:.1} MB \
         in all, {:.2} MB each (PSS: pages shared between them count once)",
        shim_mb / shims.max(1) as f64
    );
    println!(
        "  CPU per container to start it: shim {:.1} ms, `runc create` + `runc start` (the \
         shim's waited children) {:.1} ms",
        shim_cpu * 1000.0 / shims.max(1) as f64,
        runc_cpu * 1000.0 / shims.max(1) as f64
    );
    match agent.dns_processes().as_slice() {
        [pid] => println!(
            "  plus the node's cluster DNS (`skiff dns`, the agent's child process, watching \
             every Service, EndpointSlice and Pod): RSS {:.1} MB (PSS {:.1} MB), not in the \
             agent's figure",
            rss_mb(*pid)?,
            pss_mb(*pid)?
        ),
        pids => println!(
            "  the node's cluster DNS: {} processes, not measured",
            pids.len()
        ),
    }
    println!(
        "  and the skiff server (API server + store + controllers, no agent): RSS \
         {server_mb:.1} MB"
    );
    Ok(())
}

/// The node DNS process and its CPU seconds so far, when it runs.
fn node_dns_cpu(agent: &JoinedAgent) -> Option<(u32, f64)> {
    let [pid] = agent.dns_processes()[..] else {
        return None;
    };
    skiff_bench::cpu_seconds(pid).ok().map(|cpu| (pid, cpu))
}

/// A process's RSS split by what backs it.
struct RssByKind {
    /// Pages of its own executable file (code, read-only data); the
    /// copied-on-write ones count as anonymous.
    executable_mb: f64,
    anonymous_mb: f64,
    libraries_mb: f64,
    threads: usize,
}

fn rss_by_kind(pid: u32) -> anyhow::Result<RssByKind> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
    let exe = exe.to_string_lossy();
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let (mut executable, mut anonymous, mut libraries) = (0.0, 0.0, 0.0);
    let mut path = String::new();
    let mut rss = 0.0;
    for line in smaps.lines() {
        let kb = |name: &str| -> Option<f64> {
            line.strip_prefix(name)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        };
        if let Some(v) = kb("Rss:") {
            rss = v;
        } else if let Some(anon) = kb("Anonymous:") {
            anonymous += anon;
            let file = rss - anon;
            if path == exe {
                executable += file;
            } else if path.starts_with('/') {
                libraries += file;
            } else {
                // Special mappings ([vdso]) and anonymous ones counted above.
                anonymous += file;
            }
        } else if line
            .split_whitespace()
            .next()
            .is_some_and(|range| range.contains('-') && !range.ends_with(':'))
        {
            // A mapping's header: range perms offset dev inode [path].
            path = line
                .split_whitespace()
                .skip(5)
                .collect::<Vec<_>>()
                .join(" ");
        }
    }
    let threads = std::fs::read_dir(format!("/proc/{pid}/task"))?.count();
    Ok(RssByKind {
        executable_mb: executable / 1024.0,
        anonymous_mb: anonymous / 1024.0,
        libraries_mb: libraries / 1024.0,
        threads,
    })
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
    rollup_mb(pid, "Pss:")
}

/// One `field` (e.g. `Pss:`) of `/proc/PID/smaps_rollup`, in MB.
fn rollup_mb(pid: u32, field: &str) -> anyhow::Result<f64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    let kb: f64 = rollup
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .with_context(|| format!("no {field} in smaps_rollup"))?
        .parse()?;
    Ok(kb / 1024.0)
}

async fn create_namespace(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
    api.create(&PostParams::default(), &ns).await?;
    Ok(())
}

/// A process's own CPU seconds and those of its children it has waited
/// for (utime + stime, cutime + cstime in `/proc/PID/stat`).
fn own_and_children_cpu(pid: u32) -> anyhow::Result<(f64, f64)> {
    /// Linux reports these fields in USER_HZ ticks, fixed at 100.
    const TICKS_PER_SECOND: f64 = 100.0;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<f64> = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    ensure!(fields.len() == 4, "short /proc/{pid}/stat");
    Ok((
        (fields[0] + fields[1]) / TICKS_PER_SECOND,
        (fields[2] + fields[3]) / TICKS_PER_SECOND,
    ))
}

/// Busy CPU seconds of the whole machine (all CPUs, idle and iowait
/// excluded), from `/proc/stat`.
fn machine_cpu_seconds() -> anyhow::Result<f64> {
    /// Linux reports these fields in USER_HZ ticks, fixed at 100.
    const TICKS_PER_SECOND: f64 = 100.0;
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let fields: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    ensure!(fields.len() >= 5, "short /proc/stat");
    // user nice system idle iowait irq softirq steal ...
    let busy: f64 = fields.iter().take(8).sum::<f64>() - fields[3] - fields[4];
    Ok(busy / TICKS_PER_SECOND)
}

/// The joined agent's Node, Ready.
async fn wait_for_node(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    let api: Api<Node> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = api.get_opt(name).await?.is_some_and(|node| {
            node.status
                .and_then(|s| s.conditions)
                .into_iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the joined node {name} did not become Ready");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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

/// The peer outside Skiff: `runc run` and `crun run` of a busybox
/// container running `true`, timed, from one bundle. A runtime that
/// refuses prints its reason.
fn bare_runtimes() -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("skiff-bench-bare-")
        .tempdir()?;
    let rootfs = dir.path().join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin"))?;
    std::fs::copy(
        skiff_e2e::images::BUSYBOX,
        rootfs.join("bin").join("busybox"),
    )?;
    std::os::unix::fs::symlink("busybox", rootfs.join("bin").join("true"))?;
    let spec = Command::new("runc")
        .arg("spec")
        .current_dir(dir.path())
        .status()
        .context("running runc spec")?;
    ensure!(spec.success(), "runc spec failed");
    let config_path = dir.path().join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&config_path)?)?;
    config["process"]["args"] = serde_json::json!(["/bin/true"]);
    config["process"]["terminal"] = serde_json::json!(false);
    std::fs::write(&config_path, serde_json::to_vec(&config)?)?;
    for runtime in ["runc", "crun"] {
        let root = dir.path().join(format!("{runtime}-state"));
        let mut times = Vec::new();
        let mut refusal = None;
        for i in 0..BARE_RUNS {
            let id = format!("skiff-bench-bare-{}-{runtime}-{i}", std::process::id());
            let at = Instant::now();
            let output = Command::new(runtime)
                .arg("--root")
                .arg(&root)
                .args(["run", "--bundle"])
                .arg(dir.path())
                .arg(&id)
                .stdin(Stdio::null())
                .output();
            let elapsed = at.elapsed();
            let _ = Command::new(runtime)
                .arg("--root")
                .arg(&root)
                .args(["delete", "--force", &id])
                .stderr(Stdio::null())
                .status();
            match output {
                Ok(o) if o.status.success() => times.push(elapsed),
                Ok(o) => {
                    refusal = Some(String::from_utf8_lossy(&o.stderr).trim().to_owned());
                    break;
                }
                Err(e) => {
                    refusal = Some(format!("cannot run it: {e}"));
                    break;
                }
            }
        }
        match refusal {
            None => {
                let samples = Samples::new(times, Duration::ZERO);
                println!(
                    "{runtime}: bare `{runtime} run` of a container running `true`: p50 {:.0} ms \
                     ({BARE_RUNS} runs)",
                    ms(samples.percentile(50.0))
                );
            }
            Some(reason) => println!(
                "{runtime}: unusable on this machine, so pods are not measured with it; \
                 `{runtime} run` of a container running `true` said: {reason}"
            ),
        }
    }
    Ok(())
}
