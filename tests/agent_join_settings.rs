//! A joined `skiff agent` takes the server's cluster settings from its
//! join answer: a server started with a non-default cluster DNS address,
//! cluster domain and Service range, and a node joined to it. Its pods'
//! `/etc/resolv.conf` names the server's DNS address and domain, and its
//! data plane balances the server's Service range (a pod on the joined
//! node reaches a Service's ClusterIP from that range), and its own DNS
//! answers on the server's DNS address in the server's domain.
//!
//! As in the pod startup bench, the server runs without its own agent and
//! network, and the joined agent runs in the server's network namespace.

use std::path::Path;

use anyhow::ensure;
use serde_json::Value;
use skiff_e2e::node::{AgentNode, JoinedAgent};

const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");
const IMAGE: &str = "skiff-test/busybox:1";
const CLUSTER_DNS: &str = "10.96.0.10";
const CLUSTER_DOMAIN: &str = "corp.example";
const SERVICE_CIDR: &str = "10.96.0.0/16";

#[tokio::test(flavor = "multi_thread")]
async fn a_joined_node_uses_the_servers_dns_and_service_range() -> anyhow::Result<()> {
    let node = AgentNode::start(
        Path::new(SKIFF),
        &[
            "--disable",
            "agent",
            "--disable",
            "network",
            "--cluster-dns",
            CLUSTER_DNS,
            "--cluster-domain",
            CLUSTER_DOMAIN,
            "--service-cidr",
            SERVICE_CIDR,
        ],
    )
    .await?;
    let agent = JoinedAgent::beside(Path::new(SKIFF), &node, IMAGE)?;
    let result = check(&node, &agent).await;
    if result.is_err() {
        eprintln!("agent log:\n{}", agent.log_tail());
    }
    let _ = node.server.kubectl_ok(&[
        "delete",
        "pod,service",
        "--all",
        "--wait=true",
        "--timeout=60s",
    ]);
    drop(agent);
    result
}

async fn check(node: &AgentNode, agent: &JoinedAgent) -> anyhow::Result<()> {
    let name = &agent.name;
    let manifest = format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: web, labels: {{app: web}}}}
spec:
  nodeName: {name}
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {IMAGE}
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "mkdir -p /www && echo hello from $(hostname) > /www/index.html && exec httpd -f -p 8080 -h /www"]
    readinessProbe:
      tcpSocket: {{port: 8080}}
      periodSeconds: 1
---
apiVersion: v1
kind: Pod
metadata: {{name: client}}
spec:
  nodeName: {name}
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {IMAGE}
    imagePullPolicy: IfNotPresent
    command: ["sleep", "3600"]
---
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  selector: {{app: web}}
  ports:
  - {{port: 80, targetPort: 8080}}
"#
    );
    node.server
        .kubectl_stdin(&["apply", "-f", "-"], &manifest)?;
    for pod in ["web", "client"] {
        node.eventually(&format!("pod {pod} running on the joined node"), || {
            let pod = node.pod_json(pod)?;
            Ok(pod["status"]["containerStatuses"][0]["state"]["running"]
                .is_object()
                .then_some(()))
        })
        .await?;
    }

    // The server's DNS address and domain, not the defaults.
    let resolv = node
        .server
        .kubectl_ok(&["exec", "client", "--", "cat", "/etc/resolv.conf"])?;
    ensure!(
        resolv
            .lines()
            .any(|l| l.trim() == format!("nameserver {CLUSTER_DNS}")),
        "{resolv}"
    );
    let search =
        format!("search default.svc.{CLUSTER_DOMAIN} svc.{CLUSTER_DOMAIN} {CLUSTER_DOMAIN}");
    ensure!(resolv.lines().any(|l| l.trim() == search), "{resolv}");
    ensure!(!resolv.contains("cluster.local"), "{resolv}");
    ensure!(!resolv.contains("10.43.0.10"), "{resolv}");

    // The Service got its ClusterIP from the server's range, and the
    // joined node's data plane balances it.
    let service: Value = serde_json::from_str(
        &node
            .server
            .kubectl_ok(&["get", "service", "web", "-o", "json"])?,
    )?;
    let cluster_ip = service["spec"]["clusterIP"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    ensure!(cluster_ip.starts_with("10.96."), "{service}");
    let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {cluster_ip} 80");
    let answer = node
        .eventually("the Service answering from the joined node's pod", || {
            let out = node
                .server
                .kubectl_ok(&["exec", "client", "--", "sh", "-c", &script])?;
            Ok(out.contains("hello from web").then_some(out))
        })
        .await?;
    ensure!(answer.starts_with("HTTP/1."), "{answer:?}");

    // The node's own DNS serves the server's domain on the server's DNS
    // address (busybox's nslookup fails on the search path's later
    // names, hence `true`).
    let lookup = node
        .eventually("web by name from the joined node's DNS", || {
            let out = node.server.kubectl_ok(&[
                "exec",
                "client",
                "--",
                "sh",
                "-c",
                "nslookup web; true",
            ])?;
            let found = out.contains(&format!("Name:\tweb.default.svc.{CLUSTER_DOMAIN}"))
                && out.contains(&format!("Address: {cluster_ip}"));
            Ok(found.then_some(out))
        })
        .await?;
    ensure!(
        lookup.contains(&format!("Server:\t\t{CLUSTER_DNS}")),
        "{lookup}"
    );
    Ok(())
}
