//! StatefulSets through the real kubectl against a real `skiff server`,
//! with a fake node and agent (see `workloads/agent.rs`): ordered creation
//! and removal, one pod in progress at a time; a claim per ordinal that
//! outlives its pod and is reused by the replacement; `Parallel`
//! management; a partitioned rolling update and the revision history.

mod workloads {
    pub mod agent;
}

use anyhow::{Context, ensure};
use serde_json::{Value, json};
use skiff_e2e::server::Server;
use workloads::agent::{Cluster, HOLD_LABEL, eventually};

const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{name: http, port: 80}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: web}
spec:
  serviceName: web
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: app
        image: nginx:1.25
        volumeMounts: [{name: data, mountPath: /usr/share/nginx/html}]
  volumeClaimTemplates:
  - metadata: {name: data}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {requests: {storage: 1Gi}}
"#;

fn json(text: &str) -> anyhow::Result<Value> {
    serde_json::from_str(text).context("kubectl output is not JSON")
}

fn get(server: &Server, args: &[&str]) -> anyhow::Result<Value> {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json"]);
    json(&server.kubectl_ok(&all)?)
}

/// The set's pods by name.
fn pods(server: &Server, selector: &str) -> anyhow::Result<Vec<Value>> {
    let list = get(server, &["pods", "-l", selector])?;
    Ok(list["items"].as_array().cloned().unwrap_or_default())
}

fn names(pods: &[Value]) -> Vec<&str> {
    let mut names: Vec<&str> = pods
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str())
        .collect();
    names.sort_unstable();
    names
}

fn ready(pod: &Value) -> bool {
    pod["status"]["phase"] == "Running"
        && pod["metadata"]["deletionTimestamp"].is_null()
        && pod["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

/// Waits until the set has exactly `expected` pods, all Ready, and its
/// status says so; returns the set.
async fn settled(server: &Server, set: &str, expected: &[&str]) -> anyhow::Result<Value> {
    let want = i64::try_from(expected.len())?;
    eventually(
        &format!("statefulset {set} to settle on {expected:?}"),
        || async move {
            let pods = pods(server, &format!("app={set}"))?;
            let sts = get(server, &["statefulset", set])?;
            let status = &sts["status"];
            let done = names(&pods) == expected
                && pods.iter().all(ready)
                && status["replicas"] == want
                && status["readyReplicas"].as_i64().unwrap_or(0) == want
                && status["observedGeneration"] == sts["metadata"]["generation"];
            Ok(done.then_some(sts))
        },
    )
    .await
}

fn claim_uid(server: &Server, name: &str) -> anyhow::Result<String> {
    let claim = get(server, &["pvc", name])?;
    claim["metadata"]["uid"]
        .as_str()
        .map(str::to_owned)
        .context("claim without uid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_pods_one_at_a_time_with_claims_that_outlive_them() -> anyhow::Result<()> {
    let server = Server::start(SKIFF.as_ref(), &[]).await?;
    let mut cluster = Cluster::start(&server).await?;
    cluster.add_node("node-1", &[], json!([])).await?;
    let recording = cluster.record_pods("default");

    server.kubectl_stdin(&["apply", "-f", "-"], WEB)?;
    let sts = settled(&server, "web", &["web-0", "web-1", "web-2"]).await?;

    // Created in order, never two at once.
    ensure!(
        recording.created() == ["web-0", "web-1", "web-2"],
        "creation order {:?}",
        recording.created()
    );
    ensure!(
        recording.most_in_progress() == 1,
        "{} pods were in progress at once",
        recording.most_in_progress()
    );
    let status = &sts["status"];
    let update_revision = status["updateRevision"]
        .as_str()
        .context("updateRevision")?;
    ensure!(status["currentRevision"] == update_revision, "{status}");
    ensure!(
        status["currentReplicas"] == 3 && status["updatedReplicas"] == 3,
        "{status}"
    );
    ensure!(status["availableReplicas"] == 3, "{status}");

    // Stable identity, and a claim per ordinal.
    for (ordinal, pod) in pods(&server, "app=web")?.iter().enumerate() {
        let name = format!("web-{ordinal}");
        let labels = &pod["metadata"]["labels"];
        ensure!(pod["metadata"]["name"] == name.as_str(), "{pod}");
        ensure!(pod["spec"]["hostname"] == name.as_str(), "{pod}");
        ensure!(pod["spec"]["subdomain"] == "web", "{pod}");
        ensure!(
            labels["statefulset.kubernetes.io/pod-name"] == name.as_str(),
            "{labels}"
        );
        ensure!(
            labels["apps.kubernetes.io/pod-index"] == ordinal.to_string().as_str(),
            "{labels}"
        );
        ensure!(
            labels["controller-revision-hash"] == update_revision,
            "{labels}"
        );
        let claim_name = format!("data-web-{ordinal}");
        let volumes = pod["spec"]["volumes"].as_array().context("volumes")?;
        ensure!(
            volumes.iter().any(|v| v["name"] == "data"
                && v["persistentVolumeClaim"]["claimName"] == claim_name.as_str()),
            "{volumes:?}"
        );
        let claim = get(&server, &["pvc", &claim_name])?;
        ensure!(claim["metadata"]["labels"]["app"] == "web", "{claim}");
        ensure!(
            claim["spec"]["resources"]["requests"]["storage"] == "1Gi",
            "{claim}"
        );
    }
    let shown = server.kubectl_ok(&["get", "statefulset,pods,pvc"])?;
    println!("{shown}");

    // A deleted pod comes back under its name, on the same claim.
    let claim = claim_uid(&server, "data-web-1")?;
    let old_pod = get(&server, &["pod", "web-1"])?;
    server.kubectl_ok(&["delete", "pod", "web-1", "--wait=false"])?;
    let replaced = eventually("web-1 to be replaced", || {
        let old_uid = old_pod["metadata"]["uid"].clone();
        let server = &server;
        async move {
            let pod = get(server, &["pod", "web-1", "--ignore-not-found"]);
            Ok(pod
                .ok()
                .filter(|p| p["metadata"]["uid"] != old_uid && ready(p)))
        }
    })
    .await?;
    ensure!(
        replaced["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "data-web-1",
        "{replaced}"
    );
    ensure!(
        claim_uid(&server, "data-web-1")? == claim,
        "the claim was replaced"
    );

    // Scale down: highest ordinal first, one at a time; claims stay.
    let before = recording.terminated().len();
    server.kubectl_ok(&["scale", "statefulset", "web", "--replicas=1"])?;
    settled(&server, "web", &["web-0"]).await?;
    let removed: Vec<String> = recording.terminated()[before..]
        .iter()
        .map(|(name, _)| name.clone())
        .collect();
    ensure!(removed == ["web-2", "web-1"], "removal order {removed:?}");
    ensure!(
        recording.most_in_progress() == 1,
        "{} pods were in progress at once",
        recording.most_in_progress()
    );
    for ordinal in 0..3 {
        get(&server, &["pvc", &format!("data-web-{ordinal}")])?;
    }

    // Scaling back up reuses the retained claim.
    server.kubectl_ok(&["scale", "statefulset", "web", "--replicas=2"])?;
    settled(&server, "web", &["web-0", "web-1"]).await?;
    ensure!(
        claim_uid(&server, "data-web-1")? == claim,
        "the claim was replaced"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_pods_start_and_stop_together() -> anyhow::Result<()> {
    let server = Server::start(SKIFF.as_ref(), &[]).await?;
    let cluster = Cluster::start(&server).await?;
    cluster.add_node("node-1", &[], json!([])).await?;

    // Held pods never become Ready on their own, so only Parallel
    // management gets past the first one.
    let manifest = format!(
        r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: db}}
spec:
  serviceName: db
  replicas: 3
  podManagementPolicy: Parallel
  selector: {{matchLabels: {{app: db}}}}
  template:
    metadata: {{labels: {{app: db, {HOLD_LABEL}: "true"}}}}
    spec:
      containers: [{{name: db, image: postgres:16}}]
"#
    );
    server.kubectl_stdin(&["apply", "-f", "-"], &manifest)?;
    eventually("three pending pods", || {
        let server = &server;
        async move {
            let pods = pods(server, "app=db")?;
            Ok((names(&pods) == ["db-0", "db-1", "db-2"] && !pods.iter().any(ready)).then_some(()))
        }
    })
    .await?;
    for name in ["db-0", "db-1", "db-2"] {
        cluster.mark_ready("default", name).await?;
    }
    settled(&server, "db", &["db-0", "db-1", "db-2"]).await?;

    // Scaling to zero removes them all without waiting on one another,
    // even when none is Ready.
    for name in ["db-0", "db-1", "db-2"] {
        server.kubectl_ok(&[
            "patch",
            "pod",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"phase":"Pending"}}"#,
        ])?;
    }
    server.kubectl_ok(&["scale", "statefulset", "db", "--replicas=0"])?;
    eventually("every pod to go", || {
        let server = &server;
        async move { Ok(pods(server, "app=db")?.is_empty().then_some(())) }
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_update_honours_the_partition() -> anyhow::Result<()> {
    let server = Server::start(SKIFF.as_ref(), &[]).await?;
    let mut cluster = Cluster::start(&server).await?;
    cluster.add_node("node-1", &[], json!([])).await?;
    server.kubectl_stdin(&["apply", "-f", "-"], WEB)?;
    let sts = settled(&server, "web", &["web-0", "web-1", "web-2"]).await?;
    let first = sts["status"]["updateRevision"]
        .as_str()
        .context("updateRevision")?
        .to_owned();
    let recording = cluster.record_pods("default");

    // Only ordinals >= 2 move to the new template.
    server.kubectl_ok(&[
        "patch",
        "statefulset",
        "web",
        "-p",
        r#"{"spec":{"updateStrategy":{"type":"RollingUpdate","rollingUpdate":{"partition":2}}}}"#,
    ])?;
    server.kubectl_ok(&["set", "image", "statefulset/web", "app=nginx:1.27"])?;
    let sts = eventually("the partitioned rollout", || {
        let server = &server;
        async move {
            let sts = get(server, &["statefulset", "web"])?;
            let status = &sts["status"];
            let done = status["observedGeneration"] == sts["metadata"]["generation"]
                && status["updatedReplicas"] == 1
                && status["readyReplicas"] == 3
                && status["currentReplicas"] == 2;
            Ok(done.then_some(sts))
        }
    })
    .await?;
    let second = sts["status"]["updateRevision"]
        .as_str()
        .context("updateRevision")?
        .to_owned();
    ensure!(second != first, "the template change made no new revision");
    ensure!(sts["status"]["currentRevision"] == first.as_str(), "{sts}");
    let rollout = server.kubectl_ok(&["rollout", "status", "statefulset/web", "--timeout=60s"])?;
    println!("{rollout}");
    ensure!(
        rollout.contains("partitioned roll out complete"),
        "{rollout}"
    );
    for pod in pods(&server, "app=web")? {
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let (image, revision) = if name == "web-2" {
            ("nginx:1.27", &second)
        } else {
            ("nginx:1.25", &first)
        };
        ensure!(
            pod["spec"]["containers"][0]["image"] == image,
            "{name}: {pod}"
        );
        ensure!(
            pod["metadata"]["labels"]["controller-revision-hash"] == revision.as_str(),
            "{name}: {pod}"
        );
    }

    // Lowering the partition rolls the rest, highest ordinal first.
    server.kubectl_ok(&[
        "patch",
        "statefulset",
        "web",
        "-p",
        r#"{"spec":{"updateStrategy":{"rollingUpdate":{"partition":0}}}}"#,
    ])?;
    eventually("the full rollout", || {
        let server = &server;
        let second = second.clone();
        async move {
            let sts = get(server, &["statefulset", "web"])?;
            let status = &sts["status"];
            let done = status["updatedReplicas"] == 3
                && status["readyReplicas"] == 3
                && status["currentRevision"] == second.as_str();
            Ok(done.then_some(()))
        }
    })
    .await?;
    let replaced: Vec<String> = recording
        .terminated()
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    ensure!(
        replaced == ["web-2", "web-1", "web-0"],
        "replacement order {replaced:?}"
    );
    ensure!(
        recording.most_in_progress() == 1,
        "{} pods were in progress at once",
        recording.most_in_progress()
    );
    for pod in pods(&server, "app=web")? {
        ensure!(
            pod["spec"]["containers"][0]["image"] == "nginx:1.27",
            "{pod}"
        );
    }

    let history = server.kubectl_ok(&["rollout", "history", "statefulset/web"])?;
    println!("{history}");
    let revisions: Vec<&str> = history
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.parse::<u32>().is_ok())
        .collect();
    ensure!(revisions == ["1", "2"], "{history}");
    let revisions = get(&server, &["controllerrevisions", "-l", "app=web"])?;
    let items = revisions["items"].as_array().context("items")?;
    ensure!(items.len() == 2, "{revisions}");
    for item in items {
        ensure!(
            item["metadata"]["ownerReferences"][0]["kind"] == "StatefulSet",
            "{item}"
        );
    }
    Ok(())
}
