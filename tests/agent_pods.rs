//! The node agent end to end: a real `skiff server` with its agent inside
//! a network namespace of its own, real runc containers from a busybox
//! image built at test time, and the real kubectl.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::Value;
use skiff_e2e::images::busybox_oci_archive;
use skiff_e2e::node::AgentNode;

const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");
const IMAGE: &str = "skiff-test/busybox:1";
/// Generous: the machine may be busy running other tests.
const DEADLINE: Duration = Duration::from_secs(120);

/// A node with the busybox test image imported.
async fn node() -> anyhow::Result<AgentNode> {
    let node = AgentNode::start(Path::new(SKIFF), &[]).await?;
    let archive = node.server.data_dir().join("busybox.tar");
    busybox_oci_archive(&archive, IMAGE)?;
    let output = std::process::Command::new(SKIFF)
        .args(["images", "import", "--data-dir"])
        .arg(node.server.data_dir())
        .arg(&archive)
        .output()
        .context("running skiff images import")?;
    ensure!(
        output.status.success(),
        "skiff images import failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(node)
}

/// Polls `check` until it gives a value, failing with the last error and
/// the server log at the deadline.
async fn eventually<T>(
    node: &AgentNode,
    what: &str,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + DEADLINE;
    let mut last = String::new();
    loop {
        match check() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!(
                "timed out waiting for {what}: {last}\nserver log:\n{}",
                node.server.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn pod_json(node: &AgentNode, name: &str) -> anyhow::Result<Value> {
    let out = node
        .server
        .kubectl_ok(&["get", "pod", name, "-o", "json"])?;
    Ok(serde_json::from_str(&out)?)
}

fn container_status(pod: &Value, index: usize) -> &Value {
    &pod["status"]["containerStatuses"][index]
}

#[tokio::test(flavor = "multi_thread")]
async fn deployment_of_httpd_serves_from_pod_ips() -> anyhow::Result<()> {
    let node = node().await?;
    let manifest = format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      containers:
      - name: httpd
        image: {IMAGE}
        imagePullPolicy: IfNotPresent
        command: ["sh", "-c", "mkdir -p /www && echo hello from $(hostname) > /www/index.html && exec httpd -f -p 8080 -h /www"]
        ports: [{{containerPort: 8080}}]
        readinessProbe:
          httpGet: {{path: /, port: 8080}}
          periodSeconds: 1
"#
    );
    node.server
        .kubectl_stdin(&["apply", "-f", "-"], &manifest)?;
    node.server
        .kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=120s"])
        .with_context(|| node.server.log_tail())?;
    let pods: Value = serde_json::from_str(
        &node
            .server
            .kubectl_ok(&["get", "pods", "-l", "app=web", "-o", "json"])?,
    )?;
    let items = pods["items"].as_array().context("no pod list")?;
    ensure!(items.len() == 2, "two pods: {pods}");
    for pod in items {
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let status = &pod["status"];
        ensure!(status["phase"] == "Running", "{name} running: {status}");
        let ip = status["podIP"].as_str().context("podIP")?;
        ensure!(
            ip.starts_with("10.42."),
            "{name} has a pod IP from the podCIDR: {ip}"
        );
        ensure!(status["podIPs"][0]["ip"] == ip, "podIPs: {status}");
        ensure!(
            status["hostIP"].is_string() && status["startTime"].is_string(),
            "{status}"
        );
        let c = container_status(pod, 0);
        ensure!(c["ready"] == true && c["started"] == true, "{c}");
        ensure!(c["restartCount"] == 0, "{c}");
        ensure!(c["state"]["running"]["startedAt"].is_string(), "{c}");
        ensure!(
            c["imageID"]
                .as_str()
                .is_some_and(|i| i.starts_with("sha256:")),
            "{c}"
        );
        ensure!(
            c["containerID"]
                .as_str()
                .is_some_and(|i| i.starts_with("runc://")),
            "{c}"
        );
        let ready = status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        ensure!(ready, "Ready condition: {status}");
        // From the node, the pod answers on its own IP.
        let body = node
            .netns
            .exec("busybox", &["wget", "-qO-", &format!("http://{ip}:8080/")])?;
        ensure!(
            body.trim() == format!("hello from {name}"),
            "{name} answered {body:?}"
        );
    }
    Ok(())
}
