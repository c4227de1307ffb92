//! A joined node serves cluster DNS itself, node-local: two nodes, each a
//! network namespace on a shared underlay bridge. Node 1 runs `skiff
//! server` without an agent or pod network (its DNS cannot reach node 2's
//! pods); node 2 joins with `skiff agent --server URL --token T` and runs
//! the `skiff dns` child on the cluster DNS address. A pod on node 2
//! finds a Service by its short name through the search path (busybox
//! `nslookup`), fetches it by `http://<name>` (busybox `wget`), sees it go
//! (NXDOMAIN) once deleted, and resolves a name outside the cluster
//! through the node's upstream (a test server in node 2's namespace,
//! named by the agent's `--dns-upstream-resolv-conf`); the DNS process is
//! restarted when it dies and gone when the agent is, whether it was
//! killed or stopped.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::Value;
use skiff_e2e::dns_upstream;
use skiff_e2e::netns::Underlay;
use skiff_e2e::node::JoinedAgent;
use skiff_e2e::server::Server;

const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");
const IMAGE: &str = "skiff-test/busybox:1";
/// Only a liveness bound for each wait (the machine may be busy); how
/// long a deleted name took to go is printed.
const DEADLINE: Duration = Duration::from_secs(120);

const WORKLOAD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec:
  nodeName: NODE
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: IMAGE
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "mkdir -p /www && echo hello from web > /www/index.html && exec httpd -f -p 8080 -h /www"]
    readinessProbe:
      tcpSocket: {port: 8080}
      periodSeconds: 1
---
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  nodeName: NODE
  terminationGracePeriodSeconds: 1
  containers:
  - {name: main, image: IMAGE, imagePullPolicy: IfNotPresent, command: [sleep, "3600"]}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
"#;

#[tokio::test(flavor = "multi_thread")]
async fn pods_on_a_joined_node_resolve_services_by_name() -> anyhow::Result<()> {
    let prefix = format!("skd{:x}", std::process::id() % 0x10000);
    let underlay = Underlay::create(&prefix, 2)?;
    let server_ip = underlay.ip(0);
    let server = Server::start_in(
        Path::new(SKIFF),
        underlay.nodes[0].name(),
        &[
            "--node-ip",
            &server_ip,
            "--node-name",
            &format!("{prefix}-n1"),
            "--disable",
            "agent",
            "--disable",
            "network",
            "--disable",
            "ingress",
        ],
    )
    .await?;
    // The node's upstream resolver: on port 53 inside node 2's
    // namespace, as a resolv.conf nameserver must be.
    let dir = tempfile::Builder::new()
        .prefix("skiff-test-agent-dns-")
        .tempdir()?;
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.9\n")?;
    dns_upstream::start("127.0.0.9:53", Some(underlay.nodes[1].name()))?;
    let mut agent = JoinedAgent::start(
        Path::new(SKIFF),
        &server,
        &format!("https://{server_ip}:{}", server.port),
        underlay.nodes[1].name(),
        &format!("{prefix}-n2"),
        IMAGE,
        &[
            "--dns-upstream-resolv-conf",
            resolv.to_str().context("path")?,
        ],
    )?;
    let result = check(&server, &mut agent).await;
    // A stopped agent (the test's end) leaves its containers to the
    // harness; a running one removes them itself.
    if agent.child.try_wait().is_ok_and(|status| status.is_none()) {
        let _ = server.kubectl_ok(&[
            "delete",
            "pod,service",
            "--all",
            "--wait=true",
            "--timeout=60s",
        ]);
    }
    drop(agent);
    result
}

async fn check(server: &Server, agent: &mut JoinedAgent) -> anyhow::Result<()> {
    let manifest = WORKLOAD
        .replace("NODE", &agent.name)
        .replace("IMAGE", IMAGE);
    server.kubectl_stdin(&["apply", "-f", "-"], &manifest)?;
    for pod in ["web", "client"] {
        agent
            .eventually(server, &format!("pod {pod} ready"), || {
                let pod: Value =
                    serde_json::from_str(&server.kubectl_ok(&["get", "pod", pod, "-o", "json"])?)?;
                let ready = pod["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True");
                Ok(ready.then_some(()))
            })
            .await?;
    }
    resolves_and_serves(server, agent).await?;

    // A name outside the cluster goes to the node's upstream (the
    // trailing dot keeps busybox off the search path).
    let (ok, out) = server.exec_in("client", &["nslookup", "www.example.org."])?;
    ensure!(
        ok && out.contains("Server:\t\t10.43.0.10")
            && out.contains(&format!("Address: {}", dns_upstream::EXAMPLE_ORG)),
        "www.example.org forwarded by the joined node's DNS: {out}"
    );
    let (_, out) = server.exec_in("client", &["nslookup", "nowhere.example.org."])?;
    ensure!(
        out.contains("NXDOMAIN"),
        "the upstream's NXDOMAIN passed on: {out}"
    );
    let dns = agent.dns_processes();
    ensure!(dns.len() == 1, "the node's DNS processes: {dns:?}");

    // The DNS process dies: the agent starts it again.
    let _ = std::process::Command::new("kill")
        .args(["-9", &dns[0].to_string()])
        .status()?;
    let killed = Instant::now();
    agent
        .eventually(server, "the node's DNS restarted", || {
            let now = agent.dns_processes();
            Ok((now.len() == 1 && now != dns).then_some(()))
        })
        .await?;
    resolves_and_serves(server, agent).await?;
    println!(
        "killed node DNS restarted and answering after {:?}",
        killed.elapsed()
    );

    // A deleted Service's name goes.
    server.kubectl_ok(&["delete", "service", "web"])?;
    let start = Instant::now();
    agent
        .eventually(server, "web's name to go", || {
            let (_, out) =
                server.exec_in("client", &["nslookup", "web.default.svc.cluster.local"])?;
            Ok(out.contains("NXDOMAIN").then_some(()))
        })
        .await?;
    println!(
        "deleted Service NXDOMAIN in the joined node's pod after {:?}",
        start.elapsed()
    );

    // Killed outright (SIGKILL, as the harness does), the agent takes its
    // DNS with it.
    let _ = agent.child.kill();
    let _ = agent.child.wait();
    gone(server, agent, "SIGKILL").await?;

    // Started again, the node serves DNS again; stopped (SIGTERM), the
    // agent ends and its DNS too.
    agent.restart()?;
    let restarted = Instant::now();
    agent
        .eventually(server, "the node's DNS after the restart", || {
            // busybox goes on through the search path and fails on the
            // names after the one that exists.
            let (_, out) = server.exec_in("client", &["nslookup", "kubernetes"])?;
            Ok(out
                .contains("Name:\tkubernetes.default.svc.cluster.local")
                .then_some(()))
        })
        .await?;
    println!(
        "restarted agent's node DNS answering the pod after {:?}",
        restarted.elapsed()
    );
    ensure!(
        agent.dns_processes().len() == 1,
        "{:?}",
        agent.dns_processes()
    );
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &agent.child.id().to_string()])
        .status()?;
    let stopping = Instant::now();
    let deadline = stopping + DEADLINE;
    let status = loop {
        if let Some(status) = agent.child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            bail!(
                "the agent did not stop on SIGTERM:
{}",
                agent.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "agent stopped on SIGTERM after {:?}: {status}",
        stopping.elapsed()
    );
    gone(server, agent, "SIGTERM").await
}

/// `nslookup web` through the search path, from the node's DNS at the
/// cluster DNS address, names the Service's ClusterIP, and `wget
/// http://web` reaches the pod behind it.
async fn resolves_and_serves(server: &Server, agent: &JoinedAgent) -> anyhow::Result<()> {
    let cluster_ip =
        server.kubectl_ok(&["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"])?;
    agent.eventually(server, "nslookup web from the joined node's pod", || {
        let (_, out) = server.exec_in("client", &["nslookup", "web"])?;
        ensure!(
            out.contains("Server:\t\t10.43.0.10")
                && out.contains("Name:\tweb.default.svc.cluster.local")
                && out.contains(&format!("Address: {cluster_ip}")),
            "web through the search path from the cluster DNS at 10.43.0.10 is {cluster_ip}: {out}"
        );
        Ok(Some(()))
    })
    .await?;
    // No `-T`: Debian's busybox wget crashes with it.
    let page = agent
        .eventually(server, "wget http://web from the client pod", || {
            let (ok, out) = server.exec_in("client", &["wget", "-qO-", "http://web"])?;
            ensure!(ok, "wget: {out}");
            Ok(Some(out))
        })
        .await?;
    ensure!(page.trim() == "hello from web", "page: {page:?}");
    Ok(())
}

/// No DNS process of the node is left once its agent is gone (the kernel
/// may take a moment to deliver the parent-death signal).
async fn gone(server: &Server, agent: &JoinedAgent, how: &str) -> anyhow::Result<()> {
    agent
        .eventually(
            server,
            &format!("the node's DNS gone after the agent's {how}"),
            || {
                let left = agent.dns_processes();
                ensure!(left.is_empty(), "left running: {left:?}");
                Ok(Some(()))
            },
        )
        .await
        .context("a DNS process outlived its agent")
}
