//! Two `skiff server`s on one real etcd: only one of them holds the
//! `kube-controller-manager` Lease at a time; when it dies the other takes
//! over, and a leader that was frozen past its lease steps down.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::Value;
use skiff_e2e::etcd::Etcd;
use skiff_e2e::server::Server;

const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");
const LEASE: &str = "kube-controller-manager";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_failover() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let endpoint = etcd.endpoint();
    let args = ["--datastore-endpoint", endpoint.as_str()];
    let mut servers = [
        Server::start(SKIFF.as_ref(), &args).await?,
        Server::start(SKIFF.as_ref(), &args).await?,
    ];

    let (first, lease) = wait_for("a leader", Duration::from_secs(60), || {
        let lease = read_lease(&servers[0])?;
        let holder = holder(&lease);
        Ok(leader_index(&servers, &holder)?.map(|i| (i, lease)))
    })
    .await?;
    let spec = &lease["spec"];
    ensure!(spec["leaseDurationSeconds"] == 15, "{lease}");
    ensure!(
        spec["renewTime"].is_string() && spec["acquireTime"].is_string(),
        "{lease}"
    );
    println!(
        "{}",
        servers[0].kubectl_ok(&["get", "lease", "-n", "kube-system", LEASE, "-o", "wide"])?
    );

    // For a while, across several renewals, the leader keeps the Lease and
    // the other server never claims it.
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        let lease = read_lease(&servers[1])?;
        ensure!(
            leader_index(&servers, &holder(&lease))? == Some(first),
            "leadership moved: {lease}"
        );
        ensure!(led(&servers[1 - first])?.is_empty(), "both servers led");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let transitions = lease["spec"]["leaseTransitions"]
        .as_i64()
        .unwrap_or_default();

    // The leader dies; the follower takes over once the Lease expires.
    servers[first].kill();
    let second = 1 - first;
    let lease = wait_for("the follower to take over", Duration::from_secs(60), || {
        let lease = read_lease(&servers[second])?;
        Ok((leader_index(&servers[second..=second], &holder(&lease))? == Some(0)).then_some(lease))
    })
    .await?;
    ensure!(
        lease["spec"]["leaseTransitions"].as_i64() == Some(transitions + 1),
        "{lease}"
    );
    println!(
        "{}",
        servers[second].kubectl_ok(&["get", "lease", "-n", "kube-system", LEASE, "-o", "wide"])?
    );

    // The new leader's controllers run: the kubernetes Service's endpoints
    // now name its port.
    wait_for(
        "the new leader's endpoints",
        Duration::from_secs(60),
        || {
            let out =
                servers[second].kubectl_ok(&["get", "endpoints", "kubernetes", "-o", "json"])?;
            let endpoints: Value = serde_json::from_str(&out)?;
            Ok((endpoints["subsets"][0]["ports"][0]["port"] == servers[second].port).then_some(()))
        },
    )
    .await?;

    // The dead server comes back as a follower, and does not lead.
    servers[first].restart().await?;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let lease = read_lease(&servers[first])?;
    ensure!(
        leader_index(&servers, &holder(&lease))? == Some(second),
        "{lease}"
    );
    ensure!(
        led(&servers[first])?.is_empty(),
        "the restarted server took the lease over"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leader_steps_down() -> anyhow::Result<()> {
    let etcd = Etcd::start().await?;
    let endpoint = etcd.endpoint();
    let args = ["--datastore-endpoint", endpoint.as_str()];
    let servers = [
        Server::start(SKIFF.as_ref(), &args).await?,
        Server::start(SKIFF.as_ref(), &args).await?,
    ];
    let first = wait_for("a leader", Duration::from_secs(60), || {
        leader_index(&servers, &holder(&read_lease(&servers[0])?))
    })
    .await?;
    let second = 1 - first;
    let pid = servers[first].pid().context("leader pid")?.to_string();

    // Freeze the leader past its lease: the follower takes over.
    signal("STOP", &pid)?;
    let taken = wait_for("the follower to take over", Duration::from_secs(60), || {
        let lease = read_lease(&servers[second])?;
        Ok((leader_index(&servers, &holder(&lease))? == Some(second)).then_some(()))
    })
    .await;
    signal("CONT", &pid)?;
    taken?;

    // Thawed, the old leader finds the Lease taken and stops leading.
    wait_for(
        "the old leader to step down",
        Duration::from_secs(60),
        || {
            let log = log_of(&servers[first])?;
            Ok(log.contains("lost the lease").then_some(()))
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let lease = read_lease(&servers[first])?;
    ensure!(
        leader_index(&servers, &holder(&lease))? == Some(second),
        "{lease}"
    );
    Ok(())
}

fn read_lease(server: &Server) -> anyhow::Result<Value> {
    let out = server.kubectl_ok(&[
        "get",
        "lease",
        "-n",
        "kube-system",
        LEASE,
        "--ignore-not-found",
        "-o",
        "json",
    ])?;
    if out.trim().is_empty() {
        return Ok(Value::Null);
    }
    Ok(serde_json::from_str(&out)?)
}

fn holder(lease: &Value) -> String {
    lease["spec"]["holderIdentity"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Which server `holder` is, by the identities their logs say they led as.
fn leader_index(servers: &[Server], holder: &str) -> anyhow::Result<Option<usize>> {
    if holder.is_empty() {
        return Ok(None);
    }
    for (i, server) in servers.iter().enumerate() {
        if led(server)?.iter().any(|id| id == holder) {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

/// The identities with which `server` became leader, from its log.
fn led(server: &Server) -> anyhow::Result<Vec<String>> {
    Ok(log_of(server)?
        .lines()
        .filter(|l| l.contains("became leader") && l.contains(LEASE))
        .filter_map(|l| {
            let id = l.split("identity=").nth(1)?;
            Some(id.split_whitespace().next()?.trim_matches('"').to_owned())
        })
        .collect())
}

/// The server's log, without terminal colour codes.
fn log_of(server: &Server) -> anyhow::Result<String> {
    let path = server.data_dir().join("server.log");
    let log =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut plain = String::with_capacity(log.len());
    let mut rest = log.as_str();
    while let Some(at) = rest.find('\x1b') {
        plain.push_str(&rest[..at]);
        rest = &rest[at..];
        rest = rest.find('m').map_or("", |end| &rest[end + 1..]);
    }
    plain.push_str(rest);
    Ok(plain)
}

fn signal(name: &str, pid: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), pid])
        .status()?;
    ensure!(status.success(), "kill -{name} {pid} failed");
    Ok(())
}

async fn wait_for<T>(
    what: &str,
    limit: Duration,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        let last = match check() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => String::new(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
