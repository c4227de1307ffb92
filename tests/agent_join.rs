//! `skiff agent --server URL --token T` end to end: two nodes, each a
//! network namespace on a shared underlay bridge. Node 1 runs `skiff
//! server` with its own agent; node 2 joins it with the token from
//! `DATA_DIR/server/token`, registers its Node, runs a real runc pod
//! bound to it, serves its kubelet API (logs, exec) with the certificate
//! it obtained, and joins the pod network overlay (a pod on node 2 reaches
//! one on node 1 by its pod IP).

use std::path::Path;
use std::process::Command;

use anyhow::ensure;
use serde_json::Value;
use skiff_e2e::netns::Underlay;
use skiff_e2e::node::{JoinedAgent, import_busybox};
use skiff_e2e::server::Server;

const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");
const IMAGE: &str = "skiff-test/busybox:1";

#[tokio::test(flavor = "multi_thread")]
async fn a_second_node_joins_with_the_token_and_runs_pods() -> anyhow::Result<()> {
    let prefix = format!("skj{:x}", std::process::id() % 0x10000);
    let underlay = Underlay::create(&prefix, 2)?;
    let server_ip = underlay.ip(0);
    let first = format!("{prefix}-n1");
    let second = format!("{prefix}-n2");
    let mut server = Server::start_in(
        Path::new(SKIFF),
        underlay.nodes[0].name(),
        &[
            "--node-ip",
            &server_ip,
            "--node-name",
            &first,
            "--crash-loop-backoff",
            "2s",
        ],
    )
    .await?;

    // The joining node, with the token file's K10 token.
    let agent = JoinedAgent::start(
        Path::new(SKIFF),
        &server,
        &format!("https://{server_ip}:{}", server.port),
        underlay.nodes[1].name(),
        &second,
        IMAGE,
        &[],
    )?;

    // The joined Node: Ready, with the address the agent found for itself
    // (no --node-ip given) and its kubelet port.
    let node = agent
        .eventually(&server, "the second node Ready", || {
            let node: Value =
                serde_json::from_str(&server.kubectl_ok(&["get", "node", &second, "-o", "json"])?)?;
            let ready = node["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            Ok(ready.then_some(node))
        })
        .await?;
    ensure!(
        node["status"]["addresses"][0]["address"] == underlay.ip(1),
        "{}",
        node["status"]["addresses"]
    );
    ensure!(
        node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"] == 10250,
        "{}",
        node["status"]
    );

    // A pod bound to it runs there, and its logs and exec come through
    // the joined agent's kubelet API.
    let manifest = format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: remote}}
spec:
  nodeName: {second}
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {IMAGE}
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "echo started on $(hostname); exec sleep 3600"]
"#
    );
    server.kubectl_stdin(&["apply", "-f", "-"], &manifest)?;
    agent
        .eventually(&server, "the remote pod running", || {
            let pod: Value =
                serde_json::from_str(&server.kubectl_ok(&["get", "pod", "remote", "-o", "json"])?)?;
            Ok(pod["status"]["containerStatuses"][0]["state"]["running"]
                .is_object()
                .then_some(()))
        })
        .await?;
    let logs = agent
        .eventually(&server, "the remote pod's logs", || {
            let out = server.kubectl_ok(&["logs", "remote"])?;
            Ok((!out.is_empty()).then_some(out))
        })
        .await?;
    ensure!(logs == "started on remote\n", "{logs:?}");
    let out = server.kubectl_ok(&["exec", "remote", "--", "cat", "/proc/1/cmdline"])?;
    ensure!(out.starts_with("sleep"), "{out:?}");

    // A pod on the server's node, serving HTTP.
    let manifest = format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: local}}
spec:
  nodeName: {first}
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {IMAGE}
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "mkdir -p /www && echo hello from $(hostname) > /www/index.html && exec httpd -f -p 8080 -h /www"]
"#
    );
    import_busybox(Path::new(SKIFF), server.data_dir(), IMAGE)?;
    server.kubectl_stdin(&["apply", "-f", "-"], &manifest)?;
    let local_ip = agent
        .eventually(&server, "the local pod running", || {
            let pod: Value =
                serde_json::from_str(&server.kubectl_ok(&["get", "pod", "local", "-o", "json"])?)?;
            let running = pod["status"]["containerStatuses"][0]["state"]["running"].is_object();
            Ok(pod["status"]["podIP"]
                .as_str()
                .filter(|_| running)
                .map(str::to_owned))
        })
        .await?;
    // From the remote pod, over the overlay: busybox nc with an HTTP
    // request (busybox-static's wget crashes here).
    let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc {local_ip} 8080");
    let answer = agent
        .eventually(&server, "the local pod answering the remote one", || {
            let out = server.kubectl_ok(&["exec", "remote", "--", "sh", "-c", &script])?;
            Ok(out.contains("hello from local").then_some(out))
        })
        .await?;
    ensure!(answer.starts_with("HTTP/1."), "{answer:?}");

    // A wrong token is refused outright.
    let output = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", underlay.nodes[1].name()))
        .arg(SKIFF)
        .args(["agent", "--server"])
        .arg(format!("https://{server_ip}:{}", server.port))
        .args(["--token", "not-the-token", "--data-dir"])
        .arg(agent.data_dir.path().join("wrong"))
        .output()?;
    ensure!(!output.status.success(), "{output:?}");
    let err = String::from_utf8_lossy(&output.stderr);
    ensure!(err.contains("join token"), "{err}");

    server.kubectl_ok(&[
        "delete",
        "pod",
        "remote",
        "local",
        "--wait=true",
        "--timeout=60s",
    ])?;
    server.kill();
    drop(agent);
    Ok(())
}
