//! The node agent end to end: a real `skiff server` with its agent inside
//! a network namespace of its own, real runc containers from a busybox
//! image built at test time, and the real kubectl.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::Value;
use skiff_e2e::node::AgentNode;

const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");
const IMAGE: &str = "skiff-test/busybox:1";

/// A node with the busybox test image imported.
async fn node() -> anyhow::Result<AgentNode> {
    let node = AgentNode::start(Path::new(SKIFF), &[]).await?;
    node.import_busybox(Path::new(SKIFF), IMAGE)?;
    Ok(node)
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

/// A pod running busybox httpd on 8080 that serves `/www`, after `setup`
/// (shell) has run; `extra` is added to the container spec (YAML, indented
/// for it).
fn httpd_pod(name: &str, setup: &str, extra: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  terminationGracePeriodSeconds: 2
  containers:
  - name: main
    image: {IMAGE}
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "mkdir -p /www\n{setup}\nexec httpd -f -p 8080 -h /www"]
{extra}
"#
    )
}

fn pod_ip(node: &AgentNode, name: &str) -> anyhow::Result<Option<String>> {
    let pod = node.pod_json(name)?;
    Ok(pod["status"]["podIP"].as_str().map(str::to_owned))
}

/// GETs `path` from the pod's IP, from inside the node. (curl: Debian's
/// busybox wget crashes on answers without a Content-Type, which httpd
/// sends for files without an extension.)
fn fetch(node: &AgentNode, ip: &str, path: &str) -> anyhow::Result<String> {
    node.netns.exec(
        "curl",
        &["-sSf", "-m", "3", &format!("http://{ip}:8080{path}")],
    )
}

async fn wait_running(node: &AgentNode, name: &str) -> anyhow::Result<Value> {
    node.eventually(&format!("{name} running"), || {
        let pod = node.pod_json(name)?;
        Ok(
            (pod["status"]["containerStatuses"][0]["state"]["running"].is_object()
                && pod["status"]["podIP"].is_string())
            .then_some(pod),
        )
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn crashing_container_restarts_with_growing_backoff() -> anyhow::Result<()> {
    let node = node().await?;
    let manifest = format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: crasher}}
spec:
  containers:
  - name: main
    image: {IMAGE}
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "echo crashing; exit 1"]
"#
    );
    node.server
        .kubectl_stdin(&["apply", "-f", "-"], &manifest)?;
    // The back-off periods the waiting messages named ("back-off 2s
    // restarting failed container=…"), in the order first seen.
    let mut backoffs: Vec<u64> = Vec::new();
    node.eventually("three restarts", || {
        let pod = node.pod_json("crasher")?;
        let c = container_status(&pod, 0);
        let count = c["restartCount"].as_u64().unwrap_or(0);
        let waiting = &c["state"]["waiting"];
        if waiting["reason"] == "CrashLoopBackOff"
            && let Some(secs) = waiting["message"]
                .as_str()
                .and_then(|m| m.strip_prefix("back-off "))
                .and_then(|m| m.split_once('s'))
                .and_then(|(n, _)| n.parse().ok())
            && !backoffs.contains(&secs)
        {
            backoffs.push(secs);
        }
        Ok((count >= 3).then_some(()))
    })
    .await?;
    ensure!(
        !backoffs.is_empty(),
        "the container never waited in CrashLoopBackOff"
    );
    let pod = node.pod_json("crasher")?;
    let c = container_status(&pod, 0);
    let last = &c["lastState"]["terminated"];
    ensure!(
        last["exitCode"] == 1 && last["reason"] == "Error",
        "lastState: {c}"
    );
    ensure!(
        last["finishedAt"].is_string() && last["containerID"].is_string(),
        "{c}"
    );
    ensure!(
        pod["status"]["phase"] == "Running",
        "a crash-looping pod stays Running"
    );
    // The back-off doubles from one crash to the next.
    ensure!(
        backoffs.len() >= 2 && backoffs.windows(2).all(|w| w[1] == 2 * w[0]),
        "the back-off did not double: {backoffs:?}"
    );
    Ok(())
}

/// How a probe reaches the pod in the probe tests: each kind answers
/// "yes" while the file `ok` exists in the pod's control folder (a hostPath
/// the test writes to).
const PROBE_KINDS: [(&str, &str); 3] = [
    ("exec", "exec: {command: [test, -f, /ctl/ok]}"),
    ("http", "httpGet: {path: /ok, port: 8080}"),
    ("tcp", "tcpSocket: {port: 8081}"),
];

/// A pod whose httpd serves its control folder `/ctl` on 8080 and which
/// listens on 8081 only while `/ctl/ok` exists; `probes` is added to the
/// container (YAML, indented for it).
fn probed_pod(name: &str, ctl: &Path, probes: &str) -> String {
    let script = "httpd -p 8080 -h /ctl; while :; do \
        if [ -f /ctl/ok ]; then [ -n \\\"$p\\\" ] || { httpd -f -p 8081 -h /ctl & p=$!; }; \
        elif [ -n \\\"$p\\\" ]; then kill $p; p=; fi; sleep 0.2; done";
    format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: probed}}}}
spec:
  terminationGracePeriodSeconds: 1
  volumes:
  - {{name: ctl, hostPath: {{path: {ctl}, type: Directory}}}}
  containers:
  - name: main
    image: {IMAGE}
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "{script}"]
    ports: [{{name: web, containerPort: 8080}}]
    volumeMounts: [{{name: ctl, mountPath: /ctl}}]
{probes}
"#,
        ctl = ctl.display()
    )
}

/// One control folder per pod, under the test's temporary folder.
fn control_dir(node: &AgentNode, pod: &str) -> anyhow::Result<std::path::PathBuf> {
    let dir = node.server.data_dir().join("ctl").join(pod);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn set_ok(dir: &Path, ok: bool) -> anyhow::Result<()> {
    let file = dir.join("ok");
    if ok {
        std::fs::write(file, "ok\n")?;
    } else if file.exists() {
        std::fs::remove_file(file)?;
    }
    Ok(())
}

fn condition(pod: &Value, kind: &str) -> Option<bool> {
    pod["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
        .map(|c| c["status"] == "True")
}

/// The ready condition of the endpoint of `ip` in the Service's slices.
fn endpoint_ready(node: &AgentNode, service: &str, ip: &str) -> anyhow::Result<Option<bool>> {
    let slices: Value = serde_json::from_str(&node.server.kubectl_ok(&[
        "get",
        "endpointslices",
        "-l",
        &format!("kubernetes.io/service-name={service}"),
        "-o",
        "json",
    ])?)?;
    Ok(slices["items"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
        .find(|e| e["addresses"][0] == ip)
        .map(|e| e["conditions"]["ready"] == true))
}

/// Events about the pod with this reason, as "reason: note" lines.
fn events(node: &AgentNode, pod: &str, reason: &str) -> anyhow::Result<Vec<String>> {
    let list: Value = serde_json::from_str(&node.server.kubectl_ok(&[
        "get",
        "events.events.k8s.io",
        "-o",
        "json",
    ])?)?;
    Ok(list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["regarding"]["name"] == pod && e["reason"] == reason)
        .map(|e| format!("{}: {}", e["reason"], e["note"]))
        .collect())
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_probes_flip_ready_and_endpoints_both_ways() -> anyhow::Result<()> {
    let node = node().await?;
    node.server.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Service\nmetadata: {name: probed}\nspec:\n  selector: {app: probed}\n  ports: [{port: 80, targetPort: 8080}]\n",
    )?;
    let mut pods = Vec::new();
    for (kind, handler) in PROBE_KINDS {
        let name = format!("ready-{kind}");
        let ctl = control_dir(&node, &name)?;
        let probes = format!(
            "    readinessProbe:\n      {handler}\n      periodSeconds: 1\n      successThreshold: 2\n      failureThreshold: 2"
        );
        node.server
            .kubectl_stdin(&["apply", "-f", "-"], &probed_pod(&name, &ctl, &probes))?;
        pods.push((name, ctl));
    }
    for (name, ctl) in &pods {
        let pod = wait_running(&node, name).await?;
        let ip = pod["status"]["podIP"]
            .as_str()
            .context("pod IP")?
            .to_owned();
        // Not ready until the probe passes: the endpoint is listed, not ready.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let pod = node.pod_json(name)?;
        ensure!(
            container_status(&pod, 0)["ready"] == false && condition(&pod, "Ready") == Some(false),
            "{name} is not ready before its probe passes: {}",
            pod["status"]
        );
        node.eventually(&format!("{name}'s endpoint, not ready"), || {
            endpoint_ready(&node, "probed", &ip).map(|r| (r == Some(false)).then_some(()))
        })
        .await?;
        for ok in [true, false, true] {
            set_ok(ctl, ok)?;
            node.eventually(&format!("{name} ready={ok}"), || {
                let pod = node.pod_json(name)?;
                let c = container_status(&pod, 0);
                Ok((c["ready"] == ok
                    && c["state"]["running"].is_object()
                    && condition(&pod, "Ready") == Some(ok)
                    && condition(&pod, "ContainersReady") == Some(ok))
                .then_some(()))
            })
            .await?;
            node.eventually(&format!("{name}'s endpoint ready={ok}"), || {
                endpoint_ready(&node, "probed", &ip).map(|r| (r == Some(ok)).then_some(()))
            })
            .await?;
        }
        let pod = node.pod_json(name)?;
        ensure!(
            container_status(&pod, 0)["restartCount"] == 0,
            "readiness never restarts {name}: {}",
            pod["status"]
        );
        let unhealthy = events(&node, name, "Unhealthy")?;
        ensure!(
            unhealthy
                .iter()
                .any(|e| e.contains("Readiness probe failed")),
            "{name} has an Unhealthy event: {unhealthy:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_liveness_probes_restart_the_container() -> anyhow::Result<()> {
    let node = node().await?;
    let mut pods = Vec::new();
    for (kind, handler) in PROBE_KINDS {
        let name = format!("live-{kind}");
        let ctl = control_dir(&node, &name)?;
        set_ok(&ctl, true)?;
        // The delay keeps the tcp probe off until the listener is up.
        let probes = format!(
            "    livenessProbe:\n      {handler}\n      initialDelaySeconds: 2\n      periodSeconds: 1\n      failureThreshold: 2"
        );
        node.server
            .kubectl_stdin(&["apply", "-f", "-"], &probed_pod(&name, &ctl, &probes))?;
        pods.push((name, ctl));
    }
    for (name, _) in &pods {
        wait_running(&node, name).await?;
    }
    // Healthy: left alone.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut first_ids = Vec::new();
    for (name, ctl) in &pods {
        let pod = node.pod_json(name)?;
        let c = container_status(&pod, 0);
        ensure!(
            c["restartCount"] == 0 && c["state"]["running"].is_object(),
            "a passing liveness probe leaves {name} alone: {c}"
        );
        first_ids.push(c["containerID"].clone());
        set_ok(ctl, false)?;
    }
    for ((name, ctl), first) in pods.iter().zip(first_ids) {
        node.eventually(&format!("{name} restarted by its liveness probe"), || {
            let pod = node.pod_json(name)?;
            let c = container_status(&pod, 0);
            // Under load it may have failed again since: any
            // restart of the first container counts.
            Ok((c["restartCount"].as_u64() >= Some(1)
                && c["lastState"]["terminated"].is_object()
                && c["containerID"] != first)
                .then_some(()))
        })
        .await?;
        set_ok(ctl, true)?;
        let killing = events(&node, name, "Killing")?;
        ensure!(
            killing
                .iter()
                .any(|e| e.contains("failed liveness probe, will be restarted")),
            "{name}: a Killing event: {killing:?}"
        );
        let unhealthy = events(&node, name, "Unhealthy")?;
        ensure!(
            unhealthy
                .iter()
                .any(|e| e.contains("Liveness probe failed")),
            "{name}: an Unhealthy event: {unhealthy:?}"
        );
    }
    // Healthy again: the new container keeps running.
    for (name, _) in &pods {
        wait_running(&node, name).await?;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    for (name, _) in &pods {
        let pod = node.pod_json(name)?;
        let c = container_status(&pod, 0);
        let count = c["restartCount"].as_u64().unwrap_or(0);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let later = node.pod_json(name)?;
        ensure!(
            container_status(&later, 0)["restartCount"].as_u64() == Some(count)
                && container_status(&later, 0)["state"]["running"].is_object(),
            "{name} stays up once healthy: {}",
            later["status"]
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn startup_probe_gates_liveness_and_readiness() -> anyhow::Result<()> {
    let node = node().await?;
    let ctl = control_dir(&node, "slow")?;
    // Liveness would kill the container at once if it ran before startup.
    let probes = "    startupProbe:\n      exec: {command: [test, -f, /ctl/started]}\n      periodSeconds: 1\n      failureThreshold: 1000\n    livenessProbe:\n      exec: {command: [test, -f, /ctl/alive]}\n      periodSeconds: 1\n      failureThreshold: 1\n    readinessProbe:\n      httpGet: {path: /ok, port: web}\n      periodSeconds: 1";
    node.server
        .kubectl_stdin(&["apply", "-f", "-"], &probed_pod("slow", &ctl, probes))?;
    set_ok(&ctl, true)?;
    wait_running(&node, "slow").await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pod = node.pod_json("slow")?;
    let c = container_status(&pod, 0);
    ensure!(
        c["started"] == false && c["ready"] == false && c["restartCount"] == 0,
        "before its startup probe passes the container is neither started nor ready, \
         and liveness has not run: {c}"
    );
    std::fs::write(ctl.join("alive"), "")?;
    std::fs::write(ctl.join("started"), "")?;
    node.eventually("started and ready", || {
        let pod = node.pod_json("slow")?;
        let c = container_status(&pod, 0);
        Ok(
            (c["started"] == true && c["ready"] == true && condition(&pod, "Ready") == Some(true))
                .then_some(()),
        )
    })
    .await?;
    // Now liveness runs: failing it restarts the container, which then
    // waits for its startup probe again.
    std::fs::remove_file(ctl.join("alive"))?;
    std::fs::remove_file(ctl.join("started"))?;
    node.eventually("a restart by liveness", || {
        let pod = node.pod_json("slow")?;
        let c = container_status(&pod, 0);
        Ok(
            (c["restartCount"].as_u64() >= Some(1) && c["state"]["running"].is_object())
                .then_some(c.clone()),
        )
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pod = node.pod_json("slow")?;
    let c = container_status(&pod, 0);
    ensure!(
        c["started"] == false && c["ready"] == false && c["restartCount"] == 1,
        "the restarted container waits for its startup probe: {c}"
    );
    // A startup probe that keeps failing restarts the container.
    let ctl = control_dir(&node, "never")?;
    let probes = "    startupProbe:\n      exec: {command: [test, -f, /ctl/started]}\n      periodSeconds: 1\n      failureThreshold: 2";
    node.server
        .kubectl_stdin(&["apply", "-f", "-"], &probed_pod("never", &ctl, probes))?;
    node.eventually("a restart by the startup probe", || {
        let pod = node.pod_json("never")?;
        Ok((container_status(&pod, 0)["restartCount"].as_u64() >= Some(1)).then_some(()))
    })
    .await?;
    let killing = events(&node, "never", "Killing")?;
    ensure!(
        killing.iter().any(|e| e.contains("failed startup probe")),
        "{killing:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn readiness_waits_for_initial_delay() -> anyhow::Result<()> {
    let node = node().await?;
    let ctl = control_dir(&node, "delayed")?;
    set_ok(&ctl, true)?;
    let probes = "    readinessProbe:\n      exec: {command: [test, -f, /ctl/ok]}\n      initialDelaySeconds: 6\n      periodSeconds: 1";
    node.server
        .kubectl_stdin(&["apply", "-f", "-"], &probed_pod("delayed", &ctl, probes))?;
    let pod = node
        .eventually("delayed ready", || {
            let pod = node.pod_json("delayed")?;
            Ok((container_status(&pod, 0)["ready"] == true).then_some(pod))
        })
        .await?;
    let started = epoch_seconds(&container_status(&pod, 0)["state"]["running"]["startedAt"])?;
    let ready_at = pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Ready")
        .map(|c| epoch_seconds(&c["lastTransitionTime"]))
        .context("Ready condition")??;
    ensure!(
        ready_at - started >= 6,
        "ready {}s after the start, not before the initial delay of 6s",
        ready_at - started
    );
    Ok(())
}

/// Seconds since the epoch of an API time (`2026-11-27T20:18:34Z`).
fn epoch_seconds(v: &Value) -> anyhow::Result<i64> {
    let s = v.as_str().context("a time")?;
    let output = std::process::Command::new("date")
        .args(["-u", "-d", s, "+%s"])
        .output()
        .context("running date")?;
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .with_context(|| format!("parsing the time {s:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn env_from_configmap_and_secret_and_configmap_volume_updates() -> anyhow::Result<()> {
    let node = node().await?;
    node.server.kubectl_ok(&[
        "create",
        "configmap",
        "settings",
        "--from-literal=greeting=hello",
        "--from-literal=color=blue",
    ])?;
    node.server.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "creds",
        "--from-literal=password=s3cret",
    ])?;
    let pod = format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: envpod, labels: {{tier: web}}}}
spec:
  containers:
  - name: main
    image: {IMAGE}
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "mkdir -p /www && echo $(GREETING)/$PASSWORD/$CFG_color/$POD/$TIER/$MEM > /www/env && ln -s /cfg /www/cfg && exec httpd -f -p 8080 -h /www"]
    resources: {{limits: {{memory: 64Mi}}}}
    envFrom:
    - configMapRef: {{name: settings}}
      prefix: CFG_
    env:
    - name: GREETING
      valueFrom: {{configMapKeyRef: {{name: settings, key: greeting}}}}
    - name: PASSWORD
      valueFrom: {{secretKeyRef: {{name: creds, key: password}}}}
    - name: POD
      valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}
    - name: TIER
      valueFrom: {{fieldRef: {{fieldPath: "metadata.labels['tier']"}}}}
    - name: MEM
      valueFrom: {{resourceFieldRef: {{resource: limits.memory, divisor: 1Mi}}}}
    volumeMounts:
    - {{name: cfg, mountPath: /cfg}}
  volumes:
  - name: cfg
    configMap: {{name: settings}}
"#
    );
    node.server.kubectl_stdin(&["apply", "-f", "-"], &pod)?;
    wait_running(&node, "envpod").await?;
    let ip = pod_ip(&node, "envpod")?.context("pod IP")?;
    let env = node
        .eventually("the env page", || fetch(&node, &ip, "/env").map(Some))
        .await?;
    ensure!(
        env.trim() == "hello/s3cret/blue/envpod/web/64",
        "environment: {env:?}"
    );
    let before = fetch(&node, &ip, "/cfg/color")?;
    ensure!(before.trim() == "blue", "volume before: {before:?}");
    node.server.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\ndata: {greeting: hello, color: green}\n",
    )?;
    node.eventually("the configMap volume to update", || {
        Ok(fetch(&node, &ip, "/cfg/color")
            .ok()
            .filter(|c| c.trim() == "green"))
    })
    .await?;
    // The environment is fixed at the start: unchanged.
    ensure!(fetch(&node, &ip, "/env")?.trim() == "hello/s3cret/blue/envpod/web/64");
    // A missing ConfigMap (or key) keeps the container waiting, with the
    // kubelet's reason, until it appears.
    let waiting = format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: waiter}}
spec:
  containers:
  - name: main
    image: {IMAGE}
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "mkdir -p /www && echo $LATE > /www/env && exec httpd -f -p 8080 -h /www"]
    env:
    - name: LATE
      valueFrom: {{configMapKeyRef: {{name: later, key: value}}}}
"#
    );
    node.server.kubectl_stdin(&["apply", "-f", "-"], &waiting)?;
    for (step, message) in [
        ("missing", "configmap \"later\" not found"),
        (
            "no key",
            "couldn't find key value in ConfigMap default/later",
        ),
    ] {
        if step == "no key" {
            node.server
                .kubectl_ok(&["create", "configmap", "later", "--from-literal=other=1"])?;
        }
        node.eventually(&format!("CreateContainerConfigError ({step})"), || {
            let pod = node.pod_json("waiter")?;
            let w = &container_status(&pod, 0)["state"]["waiting"];
            Ok(
                (w["reason"] == "CreateContainerConfigError" && w["message"] == message)
                    .then_some(()),
            )
        })
        .await?;
    }
    node.server.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: later}\ndata: {value: arrived}\n",
    )?;
    let pod = wait_running(&node, "waiter").await?;
    let ip = pod["status"]["podIP"]
        .as_str()
        .context("pod IP")?
        .to_owned();
    let env = node
        .eventually("the waiter's page", || fetch(&node, &ip, "/env").map(Some))
        .await?;
    ensure!(env.trim() == "arrived", "{env:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_server_leaves_pods_running_and_readopts_them() -> anyhow::Result<()> {
    let mut node = node().await?;
    node.server.kubectl_stdin(
        &["apply", "-f", "-"],
        &httpd_pod("survivor", "echo up > /www/index.html", ""),
    )?;
    let before = wait_running(&node, "survivor").await?;
    let ip = before["status"]["podIP"]
        .as_str()
        .context("pod IP")?
        .to_owned();
    let id = container_status(&before, 0)["containerID"].clone();
    node.eventually("survivor to serve", || Ok(fetch(&node, &ip, "/").ok()))
        .await?;
    node.server.kill();
    // The container keeps serving while nothing manages it.
    let body = fetch(&node, &ip, "/")?;
    ensure!(
        body.trim() == "up",
        "served while the server is down: {body:?}"
    );
    node.server.restart().await?;
    let after = node
        .eventually("the pod to be re-adopted", || {
            let pod = node.pod_json("survivor")?;
            let c = container_status(&pod, 0);
            Ok((c["ready"] == true).then_some(pod))
        })
        .await?;
    let c = container_status(&after, 0);
    ensure!(
        c["containerID"] == id,
        "the same container: {id} then {}",
        c["containerID"]
    );
    ensure!(c["restartCount"] == 0, "not restarted: {c}");
    ensure!(after["status"]["podIP"] == ip.as_str(), "same IP");
    ensure!(fetch(&node, &ip, "/")?.trim() == "up", "still serving");
    // Deleted while the agent is away: cleaned up when it comes back.
    node.restart_with(&["--disable", "agent"]).await?;
    node.server.kubectl_ok(&[
        "delete",
        "pod",
        "survivor",
        "--grace-period=0",
        "--force",
        "--wait=false",
    ])?;
    node.restart_with(&[]).await?;
    node.eventually("the deleted pod's leftovers to go", || {
        let left = node.leftovers();
        if left.is_empty() {
            Ok(Some(()))
        } else {
            bail!("left: {left:?}")
        }
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_every_pod_leaves_nothing_behind() -> anyhow::Result<()> {
    let node = node().await?;
    node.server
        .kubectl_ok(&["create", "configmap", "files", "--from-literal=a=1"])?;
    let manifest = format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata: {{name: many}}
spec:
  replicas: 3
  selector: {{matchLabels: {{app: many}}}}
  template:
    metadata: {{labels: {{app: many}}}}
    spec:
      terminationGracePeriodSeconds: 3
      initContainers:
      - name: init
        image: {IMAGE}
        imagePullPolicy: IfNotPresent
        command: ["sh", "-c", "echo init > /data/init"]
        volumeMounts: [{{name: scratch, mountPath: /data}}]
      containers:
      - name: main
        image: {IMAGE}
        imagePullPolicy: IfNotPresent
        command: ["sh", "-c", "test -f /data/init && exec sleep 3600"]
        resources: {{requests: {{cpu: 100m, memory: 32Mi}}, limits: {{cpu: 200m, memory: 64Mi}}}}
        volumeMounts:
        - {{name: scratch, mountPath: /data}}
        - {{name: mem, mountPath: /mem}}
        - {{name: files, mountPath: /files}}
      volumes:
      - {{name: scratch, emptyDir: {{}}}}
      - {{name: mem, emptyDir: {{medium: Memory}}}}
      - {{name: files, configMap: {{name: files}}}}
"#
    );
    node.server
        .kubectl_stdin(&["apply", "-f", "-"], &manifest)?;
    node.server
        .kubectl_ok(&["rollout", "status", "deployment/many", "--timeout=120s"])
        .with_context(|| node.server.log_tail())?;
    let pods: Value = serde_json::from_str(
        &node
            .server
            .kubectl_ok(&["get", "pods", "-l", "app=many", "-o", "json"])?,
    )?;
    for pod in pods["items"].as_array().into_iter().flatten() {
        ensure!(
            pod["status"]["qosClass"] == "Burstable",
            "{}",
            pod["status"]
        );
        ensure!(
            pod["status"]["initContainerStatuses"][0]["state"]["terminated"]["reason"]
                == "Completed",
            "{}",
            pod["status"]
        );
    }
    ensure!(
        !node.leftovers().is_empty(),
        "running pods are visible to the leftover check"
    );
    node.server.kubectl_ok(&["delete", "deployment", "many"])?;
    node.eventually("every pod to go", || {
        let out = node.server.kubectl_ok(&["get", "pods", "-o", "name"])?;
        Ok(out.trim().is_empty().then_some(()))
    })
    .await?;
    node.eventually("nothing to be left", || {
        let left = node.leftovers();
        if left.is_empty() {
            Ok(Some(()))
        } else {
            bail!("left: {left:?}")
        }
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn released_local_path_volume_folders_are_removed() -> anyhow::Result<()> {
    let node = node().await?;
    let manifest = format!(
        r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: data}}
spec:
  accessModes: [ReadWriteOnce]
  resources: {{requests: {{storage: 16Mi}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: writer}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {IMAGE}
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "echo kept > /data/file && exec sleep 3600"]
    volumeMounts: [{{name: data, mountPath: /data}}]
  volumes:
  - {{name: data, persistentVolumeClaim: {{claimName: data}}}}
"#
    );
    node.server
        .kubectl_stdin(&["apply", "-f", "-"], &manifest)?;
    wait_running(&node, "writer").await?;
    let storage = node.server.data_dir().join("storage");
    let folder = node
        .eventually("the volume's file on the node", || {
            let found = std::fs::read_dir(&storage)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .find(|p| std::fs::read_to_string(p.join("file")).is_ok_and(|c| c == "kept\n"));
            Ok(found)
        })
        .await?;
    let name = folder
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    ensure!(
        name.starts_with("pvc-") && name.ends_with("_default_data"),
        "{name}"
    );
    // A folder no volume ever named, which must survive.
    let unrelated = storage.join("not-a-volume");
    std::fs::create_dir_all(&unrelated)?;
    // Kept while its volume exists, even with the pod gone.
    node.server.kubectl_ok(&["delete", "pod", "writer"])?;
    tokio::time::sleep(Duration::from_secs(12)).await;
    ensure!(folder.join("file").exists(), "kept while the claim exists");
    node.server.kubectl_ok(&["delete", "pvc", "data"])?;
    node.eventually("the volume and its folder to go", || {
        let volumes = node.server.kubectl_ok(&["get", "pv", "-o", "name"])?;
        Ok((volumes.trim().is_empty() && !folder.exists()).then_some(()))
    })
    .await?;
    ensure!(unrelated.exists(), "folders that are not volumes stay");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn pre_stop_hook_then_sigterm_then_sigkill_after_the_grace_period() -> anyhow::Result<()> {
    let node = node().await?;
    let pod = |name: &str, ctl: &Path, grace: u32, script: &str| {
        format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  terminationGracePeriodSeconds: {grace}
  volumes:
  - {{name: ctl, hostPath: {{path: {ctl}, type: Directory}}}}
  containers:
  - name: main
    image: {IMAGE}
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "{script}"]
    volumeMounts: [{{name: ctl, mountPath: /ctl}}]
    lifecycle:
      preStop:
        exec: {{command: [sh, -c, "echo hook >> /ctl/order; sleep 1"]}}
"#,
            ctl = ctl.display()
        )
    };
    // Leaves on SIGTERM, after the hook has run.
    let polite_ctl = control_dir(&node, "polite")?;
    let polite = pod(
        "polite",
        &polite_ctl,
        30,
        "trap 'echo term >> /ctl/order; exit 0' TERM; while :; do sleep 0.2; done",
    );
    // Ignores SIGTERM: killed when its 3 s are up.
    let stubborn_ctl = control_dir(&node, "stubborn")?;
    let stubborn = pod(
        "stubborn",
        &stubborn_ctl,
        3,
        "trap 'echo term >> /ctl/order' TERM; while :; do sleep 0.2; done",
    );
    node.server.kubectl_stdin(&["apply", "-f", "-"], &polite)?;
    node.server
        .kubectl_stdin(&["apply", "-f", "-"], &stubborn)?;
    wait_running(&node, "polite").await?;
    wait_running(&node, "stubborn").await?;
    let asked = Instant::now();
    node.server
        .kubectl_ok(&["delete", "pod", "polite", "stubborn", "--wait=false"])?;
    let mut gone = std::collections::BTreeMap::new();
    node.eventually("both pods to go", || {
        for name in ["polite", "stubborn"] {
            if !gone.contains_key(name)
                && node
                    .server
                    .kubectl_ok(&["get", "pod", name, "--ignore-not-found", "-o", "name"])?
                    .trim()
                    .is_empty()
            {
                gone.insert(name, asked.elapsed());
            }
        }
        Ok((gone.len() == 2).then_some(()))
    })
    .await?;
    let order = std::fs::read_to_string(polite_ctl.join("order"))?;
    ensure!(
        order == "hook\nterm\n",
        "polite: the hook, then SIGTERM: {order:?}"
    );
    let order = std::fs::read_to_string(stubborn_ctl.join("order"))?;
    ensure!(
        order == "hook\nterm\n",
        "stubborn: the hook, then SIGTERM: {order:?}"
    );
    ensure!(
        gone["stubborn"] >= Duration::from_secs(3),
        "a container that ignores SIGTERM gets its whole grace period: gone after {:?}",
        gone["stubborn"]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn service_variables_for_services_that_exist_at_start() -> anyhow::Result<()> {
    let node = node().await?;
    node.server.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Service\nmetadata: {name: my-db}\nspec:\n  selector: {app: db}\n  ports: [{name: sql, port: 5432}]\n",
    )?;
    let cluster_ip = node
        .eventually("the Service's cluster IP", || {
            let svc: Value = serde_json::from_str(
                &node
                    .server
                    .kubectl_ok(&["get", "svc", "my-db", "-o", "json"])?,
            )?;
            Ok(svc["spec"]["clusterIP"].as_str().map(str::to_owned))
        })
        .await?;
    let pod = |name: &str, links: bool| {
        format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  enableServiceLinks: {links}
  containers:
  - name: main
    image: {IMAGE}
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "mkdir -p /www && env > /www/env && exec httpd -f -p 8080 -h /www"]
"#
        )
    };
    // The agent's Service cache may trail the API a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (name, links) in [("linked", true), ("unlinked", false)] {
        node.server
            .kubectl_stdin(&["apply", "-f", "-"], &pod(name, links))?;
        let status = wait_running(&node, name).await?;
        let ip = status["status"]["podIP"]
            .as_str()
            .context("pod IP")?
            .to_owned();
        let env = node
            .eventually("the env page", || fetch(&node, &ip, "/env").map(Some))
            .await?;
        let has = |line: &str| env.lines().any(|l| l == line);
        ensure!(
            has("KUBERNETES_SERVICE_PORT=443") && env.contains("KUBERNETES_SERVICE_HOST="),
            "{name}: the API server's variables: {env}"
        );
        let host = format!("MY_DB_SERVICE_HOST={cluster_ip}");
        let port = format!("MY_DB_PORT=tcp://{cluster_ip}:5432");
        if links {
            ensure!(
                has(&host)
                    && has("MY_DB_SERVICE_PORT=5432")
                    && has("MY_DB_SERVICE_PORT_SQL=5432")
                    && has(&port),
                "{name}: my-db's variables: {env}"
            );
        } else {
            ensure!(!env.contains("MY_DB_"), "{name}: no service links: {env}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn secret_downward_and_projected_volumes_and_oom_kill() -> anyhow::Result<()> {
    let node = node().await?;
    node.server.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "creds",
        "--from-literal=password=s3cret",
    ])?;
    node.server.kubectl_ok(&[
        "create",
        "configmap",
        "settings",
        "--from-literal=color=blue",
    ])?;
    let manifest = format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: files, labels: {{tier: web}}}}
spec:
  containers:
  - name: main
    image: {IMAGE}
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "mkdir -p /www && stat -L -c %a /sec/pw > /www/mode && for d in sec info all; do ln -s /$d /www/$d; done && exec httpd -f -p 8080 -h /www"]
    volumeMounts:
    - {{name: sec, mountPath: /sec}}
    - {{name: info, mountPath: /info}}
    - {{name: all, mountPath: /all}}
  volumes:
  - name: sec
    secret: {{secretName: creds, items: [{{key: password, path: pw, mode: 0400}}]}}
  - name: info
    downwardAPI: {{items: [{{path: labels, fieldRef: {{fieldPath: metadata.labels}}}}, {{path: name, fieldRef: {{fieldPath: metadata.name}}}}]}}
  - name: all
    projected:
      sources:
      - configMap: {{name: settings}}
      - secret: {{name: creds}}
      - downwardAPI: {{items: [{{path: ns, fieldRef: {{fieldPath: metadata.namespace}}}}]}}
---
apiVersion: v1
kind: Pod
metadata: {{name: hog}}
spec:
  restartPolicy: Never
  containers:
  - name: main
    image: {IMAGE}
    imagePullPolicy: IfNotPresent
    command: ["dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"]
    resources: {{limits: {{memory: 16Mi}}}}
"#
    );
    node.server
        .kubectl_stdin(&["apply", "-f", "-"], &manifest)?;
    let pod = wait_running(&node, "files").await?;
    let ip = pod["status"]["podIP"]
        .as_str()
        .context("pod IP")?
        .to_owned();
    let mode = node
        .eventually("the files page", || fetch(&node, &ip, "/mode").map(Some))
        .await?;
    ensure!(mode.trim() == "400", "the secret item's mode: {mode:?}");
    for (path, want) in [
        ("/sec/pw", "s3cret"),
        ("/info/name", "files"),
        ("/info/labels", "tier=\"web\""),
        ("/all/color", "blue"),
        ("/all/password", "s3cret"),
        ("/all/ns", "default"),
    ] {
        let got = fetch(&node, &ip, path)?;
        ensure!(got.trim() == want, "{path}: {got:?}, not {want:?}");
    }
    node.server
        .kubectl_ok(&["label", "pod", "files", "tier=db", "--overwrite"])?;
    node.eventually("the downward API labels to update", || {
        Ok(fetch(&node, &ip, "/info/labels")
            .ok()
            .filter(|l| l.trim() == "tier=\"db\""))
    })
    .await?;
    let hog = node
        .eventually("the hog to be OOM-killed", || {
            let pod = node.pod_json("hog")?;
            let t = &container_status(&pod, 0)["state"]["terminated"];
            Ok(t.is_object().then(|| pod.clone()))
        })
        .await?;
    let t = &container_status(&hog, 0)["state"]["terminated"];
    ensure!(
        t["reason"] == "OOMKilled" && t["exitCode"] == 137,
        "killed for memory: {t}"
    );
    ensure!(hog["status"]["phase"] == "Failed", "{}", hog["status"]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_images_wait_with_the_kubelet_reasons_and_name_files() -> anyhow::Result<()> {
    let node = node().await?;
    let waiting = |name: &str, policy: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  containers:\n  - {{name: main, image: skiff-test/absent:1, imagePullPolicy: {policy}}}\n"
        )
    };
    node.server
        .kubectl_stdin(&["apply", "-f", "-"], &waiting("never", "Never"))?;
    node.server
        .kubectl_stdin(&["apply", "-f", "-"], &waiting("ifnot", "IfNotPresent"))?;
    let named = format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: named}}
spec:
  hostname: web-0
  subdomain: web
  containers:
  - name: main
    image: {IMAGE}
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "mkdir -p /www && cp /etc/hosts /etc/resolv.conf /www/ && hostname > /www/hostname && exec httpd -f -p 8080 -h /www"]
"#
    );
    node.server.kubectl_stdin(&["apply", "-f", "-"], &named)?;
    for (name, reason) in [
        ("never", "ErrImageNeverPull"),
        ("ifnot", "ImagePullBackOff"),
    ] {
        node.eventually(&format!("{name} waiting with {reason}"), || {
            let pod = node.pod_json(name)?;
            let w = &container_status(&pod, 0)["state"]["waiting"];
            Ok((w["reason"] == reason
                && w["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("skiff-test/absent:1")))
            .then_some(()))
        })
        .await?;
    }
    let pod = wait_running(&node, "named").await?;
    let ip = pod["status"]["podIP"]
        .as_str()
        .context("pod IP")?
        .to_owned();
    let hostname = node
        .eventually("the name files", || {
            fetch(&node, &ip, "/hostname").map(Some)
        })
        .await?;
    ensure!(hostname.trim() == "web-0", "hostname: {hostname:?}");
    let hosts = fetch(&node, &ip, "/hosts")?;
    ensure!(
        hosts
            .lines()
            .any(|l| l.starts_with(&ip) && l.contains("web-0.web.default.svc.cluster.local")),
        "hosts: {hosts}"
    );
    let resolv = fetch(&node, &ip, "/resolv.conf")?;
    ensure!(
        resolv.contains("nameserver 10.43.0.10")
            && resolv.contains("search default.svc.cluster.local svc.cluster.local cluster.local"),
        "resolv.conf: {resolv}"
    );
    Ok(())
}
