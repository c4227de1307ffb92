//! Resource metrics and the HorizontalPodAutoscaler through a real `skiff
//! server`: a fake node agent reports the CPU its pods burn on
//! `/metrics/resource`, the server serves it as `metrics.k8s.io` (so
//! `kubectl top` works), and an autoscaler scales a Deployment up when its
//! pods run hot and back down when they idle.

mod exec_proxy {
    // This test uses only the fake's metrics; exec_proxy.rs uses the rest.
    #![allow(dead_code)]
    pub mod kubelet;
}
mod workloads {
    pub mod agent;
}

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use exec_proxy::kubelet::{FakeKubelet, Identity};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use skiff_e2e::server::Server;
use workloads::agent::Cluster;

const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");
const DEADLINE: Duration = Duration::from_secs(90);

const DEPLOYMENT: &str = "
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 1
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: app
        image: registry.local/web:1
        resources: {requests: {cpu: 100m}}
";

const AUTOSCALER: &str = "
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: web}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: web}
  minReplicas: 1
  maxReplicas: 5
  metrics:
  - type: Resource
    resource: {name: cpu, target: {type: Utilization, averageUtilization: 50}}
  behavior:
    scaleDown: {stabilizationWindowSeconds: 0}
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_that_run_hot_are_scaled_out_and_back() -> anyhow::Result<()> {
    let server = Server::start(
        SKIFF.as_ref(),
        &[
            "--metric-resolution",
            "1s",
            "--horizontal-pod-autoscaler-sync-period",
            "1s",
        ],
    )
    .await?;
    let cluster = Cluster::start(&server).await?;
    cluster.add_node("n1", &[], json!([])).await?;
    let echo = "127.0.0.1:9".parse()?;
    let tls_dir = server.data_dir().join("server").join("tls");
    let kubelet = FakeKubelet::start(&tls_dir, Identity::ClusterCa, echo).await?;
    // The node's agent is the fake: its address and port.
    let status = json!({"status": {
        "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": "n1"}],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet.port}},
    }});
    Api::<Node>::all(cluster.client.clone())
        .patch_status("n1", &PatchParams::default(), &Patch::Merge(&status))
        .await?;

    server.kubectl_stdin(&["apply", "-f", "-"], DEPLOYMENT)?;
    server.kubectl_stdin(&["apply", "-f", "-"], AUTOSCALER)?;
    let pods = |server: &Server| -> anyhow::Result<Vec<(String, String)>> {
        let names = server.kubectl_ok(&[
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])?;
        Ok(names
            .split_whitespace()
            .map(|n| ("default".to_owned(), n.to_owned()))
            .collect())
    };

    // Hot: 200 % of the request, four times the target: out by at most
    // four pods a step, up to the maximum.
    wait_for("scaled out to the maximum", || {
        kubelet.set_usage(&pods(&server)?, 0.2);
        replicas(&server).map(|r| r == 5)
    })
    .await
    .with_context(|| diagnose(&server))?;
    let top = server.kubectl_ok(&["top", "pods", "-l", "app=web", "--no-headers"])?;
    if !top.contains("web-") || !top.contains('m') {
        bail!("kubectl top pods shows no usage:\n{top}");
    }
    let nodes = server.kubectl_ok(&["top", "nodes", "--no-headers"])?;
    if !nodes.contains("n1") {
        bail!("kubectl top nodes shows no n1:\n{nodes}");
    }
    // Still hot at the maximum: the status says it is held there.
    wait_for("the autoscaler limited by its maximum", || {
        kubelet.set_usage(&pods(&server)?, 0.2);
        let hpa: Value =
            serde_json::from_str(&server.kubectl_ok(&["get", "hpa", "web", "-o", "json"])?)?;
        let status = &hpa["status"];
        let limited = status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "ScalingLimited" && c["reason"] == "TooManyReplicas");
        let utilization = status["currentMetrics"][0]["resource"]["current"]["averageUtilization"]
            .as_i64()
            .unwrap_or(0);
        Ok(limited && status["desiredReplicas"] == 5 && utilization > 150)
    })
    .await
    .with_context(|| diagnose(&server))?;

    // Idle: 10 % of the request; down to the minimum.
    wait_for("scaled back to 1", || {
        kubelet.set_usage(&pods(&server)?, 0.01);
        replicas(&server).map(|r| r == 1)
    })
    .await
    .with_context(|| diagnose(&server))?;
    // Each rescale is told in an Event.
    wait_for("both rescale events", || {
        let notes = server.kubectl_ok(&[
            "get",
            "events.events.k8s.io",
            "--field-selector",
            "reason=SuccessfulRescale",
            "-o",
            "jsonpath={.items[*].note}",
        ])?;
        Ok(notes.contains("New size: 5") && notes.contains("New size: 1"))
    })
    .await?;
    Ok(())
}

/// What the autoscaler and the metrics API said, for a failure message.
fn diagnose(server: &Server) -> String {
    let hpa = server.kubectl_ok(&["get", "hpa", "web", "-o", "jsonpath={.status}"]);
    let metrics = server.kubectl_ok(&[
        "get",
        "--raw",
        "/apis/metrics.k8s.io/v1beta1/namespaces/default/pods",
    ]);
    format!("autoscaler status: {hpa:?}\npod metrics: {metrics:?}")
}

fn replicas(server: &Server) -> anyhow::Result<i64> {
    let text = server.kubectl_ok(&[
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.spec.replicas}",
    ])?;
    text.trim().parse().context("deployment replicas")
}

async fn wait_for(
    what: &str,
    mut done: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + DEADLINE;
    let mut last = None;
    while Instant::now() < deadline {
        match done() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    bail!("timed out waiting until {what} (last error: {last:?})")
}
