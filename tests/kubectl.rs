//! The real kubectl against a real `skiff server`: the commands a platform
//! team types every day, checked by what the server then holds.

use std::time::Duration;

use anyhow::{Context, ensure};
use serde_json::Value;
use skiff_e2e::server::Server;

const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {app: web}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: app
        image: nginx:1.25
        ports:
        - containerPort: 80
        - containerPort: 8080
"#;

fn json(text: &str) -> anyhow::Result<Value> {
    serde_json::from_str(text).context("kubectl output is not JSON")
}

#[tokio::test]
async fn discovery_version_and_defaults() -> anyhow::Result<()> {
    let server = Server::start(SKIFF.as_ref(), &[]).await?;
    let version = server.kubectl_ok(&["version", "-o", "json"])?;
    let version = json(&version)?;
    ensure!(version["serverVersion"]["minor"] == "33", "{version}");

    let namespaces = server.kubectl_ok(&["get", "namespaces"])?;
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        ensure!(namespaces.contains(ns), "{ns} missing:\n{namespaces}");
    }
    let ip = server.kubectl_ok(&[
        "get",
        "service",
        "kubernetes",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])?;
    ensure!(ip == "10.43.0.1", "kubernetes Service has {ip}");
    // The cluster DNS address is reserved, so no other Service gets it.
    let dns = server.kubectl_ok(&[
        "get",
        "service",
        "kube-dns",
        "-n",
        "kube-system",
        "-o",
        "jsonpath={.spec.clusterIP} {.spec.ports[*].protocol}",
    ])?;
    ensure!(dns == "10.43.0.10 UDP TCP", "kube-dns Service: {dns}");

    let resources = server.kubectl_ok(&["api-resources"])?;
    for line in [
        "deployments",
        "deploy",
        "apps/v1",
        "ingresses",
        "endpointslices",
        "leases",
    ] {
        ensure!(
            resources.contains(line),
            "api-resources lacks {line}:\n{resources}"
        );
    }
    let explain = server.kubectl_ok(&["explain", "deployment.spec"])?;
    ensure!(explain.contains("DeploymentSpec"), "{explain}");
    ensure!(explain.contains("replicas"), "{explain}");
    let all = server.kubectl_ok(&["get", "all", "-A"])?;
    ensure!(all.contains("service/kubernetes"), "{all}");

    let metrics = server.kubectl_ok(&["get", "--raw", "/metrics"])?;
    ensure!(
        metrics.contains("apiserver_request_total{verb=\"LIST\""),
        "{metrics}"
    );
    ensure!(metrics.contains("apiserver_request_duration_seconds_bucket"));
    ensure!(
        metrics.contains("apiserver_storage_objects{resource=\"namespaces\"} 4"),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn apply_get_describe_delete() -> anyhow::Result<()> {
    let server = Server::start(SKIFF.as_ref(), &[]).await?;
    let created = server.kubectl_stdin(&["apply", "-f", "-"], DEPLOYMENT)?;
    ensure!(created.contains("deployment.apps/web created"), "{created}");

    let object = json(&server.kubectl_ok(&["get", "deployment", "web", "-o", "json"])?)?;
    ensure!(object["spec"]["replicas"] == 2);
    ensure!(object["metadata"]["generation"] == 1);
    ensure!(
        object["spec"]["strategy"]["type"] == "RollingUpdate",
        "defaulted"
    );
    let ports = &object["spec"]["template"]["spec"]["containers"][0]["ports"];
    ensure!(ports.as_array().map(Vec::len) == Some(2), "{ports}");

    let wide = server.kubectl_ok(&["get", "deployments", "-o", "wide"])?;
    ensure!(wide.contains("READY") && wide.contains("UP-TO-DATE") && wide.contains("AVAILABLE"));
    ensure!(
        wide.contains("nginx:1.25") && wide.contains("app=web"),
        "{wide}"
    );
    let yaml = server.kubectl_ok(&["get", "deployment", "web", "-o", "yaml"])?;
    ensure!(yaml.contains("kind: Deployment"), "{yaml}");
    let describe = server.kubectl_ok(&["describe", "deployment", "web"])?;
    ensure!(
        describe.contains("Replicas:") && describe.contains("nginx:1.25"),
        "{describe}"
    );

    let deleted = server.kubectl_stdin(&["delete", "-f", "-", "--wait"], DEPLOYMENT)?;
    ensure!(deleted.contains("deleted"), "{deleted}");
    let gone = server.kubectl_err(&["get", "deployment", "web"])?;
    ensure!(gone.contains("NotFound"), "{gone}");
    Ok(())
}

#[tokio::test]
async fn pods_table_selectors_and_watch() -> anyhow::Result<()> {
    let server = Server::start(SKIFF.as_ref(), &[]).await?;
    server.kubectl_stdin(
        &["create", "-f", "-"],
        r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p1","labels":{"app":"web"}},
            "spec":{"containers":[{"name":"c","image":"busybox"}]}}"#,
    )?;
    let pods = server.kubectl_ok(&["get", "pods", "-A", "-o", "wide"])?;
    for column in [
        "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE", "p1", "Pending",
    ] {
        ensure!(pods.contains(column), "{column} missing:\n{pods}");
    }
    let selected = server.kubectl_ok(&["get", "pods", "-l", "app=web", "-o", "name"])?;
    ensure!(selected.trim() == "pod/p1", "{selected}");
    let none = server.kubectl_ok(&["get", "pods", "-l", "app=db", "-o", "name"])?;
    ensure!(none.trim().is_empty(), "{none}");
    let by_field = server.kubectl_ok(&[
        "get",
        "pods",
        "--field-selector",
        "status.phase=Pending",
        "-o",
        "name",
    ])?;
    ensure!(by_field.trim() == "pod/p1", "{by_field}");
    let bad = server.kubectl_err(&["get", "pods", "--field-selector", "spec.bogus=1"])?;
    ensure!(
        bad.contains("BadRequest") || bad.contains("not supported"),
        "{bad}"
    );

    // `get -w` sees a change made after it started.
    let mut watch = server
        .kubectl()
        .args(["get", "pods", "-w", "-o", "name", "--request-timeout=20s"])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.kubectl_stdin(
        &["create", "-f", "-"],
        r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p2"},
            "spec":{"containers":[{"name":"c","image":"busybox"}]}}"#,
    )?;
    tokio::time::sleep(Duration::from_millis(700)).await;
    watch.kill()?;
    let output = watch.wait_with_output()?;
    let seen = String::from_utf8_lossy(&output.stdout);
    ensure!(
        seen.contains("pod/p1") && seen.contains("pod/p2"),
        "watch saw:\n{seen}"
    );
    Ok(())
}

#[tokio::test]
async fn bad_input_gets_status_errors() -> anyhow::Result<()> {
    let server = Server::start(SKIFF.as_ref(), &[]).await?;
    let invalid = server.kubectl_stdin(
        &["create", "-f", "-", "-o", "name"],
        r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"Bad_Name"},"spec":{"containers":[]}}"#,
    );
    let err = invalid
        .err()
        .context("an invalid pod was accepted")?
        .to_string();
    ensure!(err.contains("is invalid"), "{err}");
    ensure!(
        err.contains("metadata.name") && err.contains("spec.containers"),
        "{err}"
    );

    let unknown = server.kubectl_stdin(
        &["create", "-f", "-"],
        r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"},"bogus":1}"#,
    );
    let err = unknown
        .err()
        .context("an unknown field was accepted")?
        .to_string();
    ensure!(
        err.contains("unknown field") && err.contains("bogus"),
        "{err}"
    );
    ensure!(
        server
            .kubectl_err(&["get", "configmap", "c"])?
            .contains("NotFound"),
        "a refused object was stored"
    );

    let missing = server.kubectl_err(&["get", "widgets"])?;
    ensure!(
        missing.contains("the server doesn't have a resource type"),
        "{missing}"
    );
    let raw_missing = server.kubectl_err(&["get", "--raw", "/apis/nope/v1/things"])?;
    ensure!(raw_missing.contains("NotFound"), "{raw_missing}");
    Ok(())
}

#[tokio::test]
async fn restart_keeps_objects_and_revisions_grow() -> anyhow::Result<()> {
    let mut server = Server::start(SKIFF.as_ref(), &[]).await?;
    server.kubectl_stdin(&["apply", "-f", "-"], DEPLOYMENT)?;
    let before = json(&server.kubectl_ok(&["get", "deployment", "web", "-o", "json"])?)?;
    let kubeconfig = std::fs::read_to_string(server.kubeconfig())?;
    server.restart().await?;
    ensure!(
        std::fs::read_to_string(server.kubeconfig())? == kubeconfig,
        "restart must reuse the certificates"
    );
    let after = json(&server.kubectl_ok(&["get", "deployment", "web", "-o", "json"])?)?;
    // The Deployment controller may write status around the restart; what
    // the user stored must be unchanged.
    for field in [
        "/spec",
        "/metadata/uid",
        "/metadata/creationTimestamp",
        "/metadata/labels",
    ] {
        ensure!(
            before.pointer(field) == after.pointer(field),
            "{field} changed across a restart"
        );
    }
    let created = server.kubectl_stdin(
        &["create", "-f", "-", "-o", "json"],
        r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"later"}}"#,
    )?;
    let later: i64 = json(&created)?["metadata"]["resourceVersion"]
        .as_str()
        .context("resourceVersion")?
        .parse()?;
    let old: i64 = before["metadata"]["resourceVersion"]
        .as_str()
        .context("resourceVersion")?
        .parse()?;
    ensure!(later > old, "resourceVersion went from {old} to {later}");
    Ok(())
}

#[tokio::test]
async fn apply_update_label_annotate_scale_set_image_diff() -> anyhow::Result<()> {
    let server = Server::start(SKIFF.as_ref(), &[]).await?;
    server.kubectl_stdin(&["apply", "-f", "-"], DEPLOYMENT)?;

    // Client-side apply of a changed image and a removed container port.
    let changed = DEPLOYMENT
        .replace("nginx:1.25", "nginx:1.26")
        .replace("        - containerPort: 8080\n", "");
    let diff = server
        .kubectl()
        .args(["diff", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let diff = {
        use std::io::Write;
        let mut diff = diff;
        diff.stdin
            .take()
            .context("stdin")?
            .write_all(changed.as_bytes())?;
        diff.wait_with_output()?
    };
    let diff_text = String::from_utf8_lossy(&diff.stdout);
    ensure!(
        diff.status.code() == Some(1),
        "kubectl diff exit {:?}: {diff_text}",
        diff.status
    );
    ensure!(
        diff_text.contains("nginx:1.26") && diff_text.contains("8080"),
        "{diff_text}"
    );

    let applied = server.kubectl_stdin(&["apply", "-f", "-"], &changed)?;
    ensure!(applied.contains("configured"), "{applied}");
    let object = json(&server.kubectl_ok(&["get", "deployment", "web", "-o", "json"])?)?;
    let container = &object["spec"]["template"]["spec"]["containers"][0];
    ensure!(container["image"] == "nginx:1.26", "{container}");
    let ports = container["ports"].as_array().context("ports")?;
    ensure!(
        ports.len() == 1 && ports[0]["containerPort"] == 80,
        "port not removed: {container}"
    );
    ensure!(
        object["metadata"]["generation"] == 2,
        "generation follows spec changes"
    );

    server.kubectl_ok(&["label", "deployment", "web", "tier=frontend"])?;
    server.kubectl_ok(&["annotate", "deployment", "web", "owner=team-a"])?;
    server.kubectl_ok(&["scale", "deployment/web", "--replicas=5"])?;
    server.kubectl_ok(&["set", "image", "deployment/web", "app=nginx:1.27"])?;
    let object = json(&server.kubectl_ok(&["get", "deployment", "web", "-o", "json"])?)?;
    ensure!(
        object["metadata"]["labels"]["tier"] == "frontend",
        "{object}"
    );
    ensure!(object["metadata"]["annotations"]["owner"] == "team-a");
    ensure!(object["spec"]["replicas"] == 5);
    ensure!(object["spec"]["template"]["spec"]["containers"][0]["image"] == "nginx:1.27");
    let replicas = server.kubectl_ok(&[
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.spec.replicas}",
    ])?;
    ensure!(replicas == "5");
    server.kubectl_ok(&["label", "deployment", "web", "tier-"])?;
    let labels = server.kubectl_ok(&[
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.metadata.labels}",
    ])?;
    ensure!(!labels.contains("tier"), "{labels}");
    Ok(())
}

#[tokio::test]
async fn create_commands_send_protobuf_and_namespaces_delete() -> anyhow::Result<()> {
    let server = Server::start(SKIFF.as_ref(), &[]).await?;
    // kubectl sends these creates as protobuf bodies.
    server.kubectl_ok(&["create", "namespace", "team"])?;
    server.kubectl_ok(&[
        "-n",
        "team",
        "create",
        "configmap",
        "settings",
        "--from-literal=mode=fast",
    ])?;
    server.kubectl_ok(&[
        "-n",
        "team",
        "create",
        "secret",
        "generic",
        "creds",
        "--from-literal=password=s3cret",
    ])?;
    server.kubectl_ok(&[
        "-n",
        "team",
        "create",
        "deployment",
        "api",
        "--image=nginx:1.25",
        "--replicas=3",
        "--port=80",
    ])?;
    let data = server.kubectl_ok(&[
        "-n",
        "team",
        "get",
        "configmap",
        "settings",
        "-o",
        "jsonpath={.data.mode}",
    ])?;
    ensure!(data == "fast", "{data}");
    let secret = server.kubectl_ok(&[
        "-n",
        "team",
        "get",
        "secret",
        "creds",
        "-o",
        "jsonpath={.data.password}",
    ])?;
    ensure!(secret == "czNjcmV0", "{secret}");
    let deployment =
        json(&server.kubectl_ok(&["-n", "team", "get", "deployment", "api", "-o", "json"])?)?;
    ensure!(deployment["spec"]["replicas"] == 3, "{deployment}");
    ensure!(
        deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] == 80
    );

    // Deleting the namespace empties it, then it goes away.
    server.kubectl_ok(&["delete", "namespace", "team", "--wait", "--timeout=60s"])?;
    let gone = server.kubectl_err(&["get", "namespace", "team"])?;
    ensure!(gone.contains("NotFound"), "{gone}");
    let leftovers = server.kubectl_ok(&[
        "get",
        "configmaps,secrets,deployments",
        "-n",
        "team",
        "-o",
        "name",
    ])?;
    ensure!(
        leftovers.trim().is_empty(),
        "left in the deleted namespace: {leftovers}"
    );
    Ok(())
}

/// Creates ConfigMap `name` owned by the object with `owner_uid`.
fn create_dependent(
    server: &Server,
    name: &str,
    owner: &str,
    owner_uid: &str,
) -> anyhow::Result<()> {
    let object = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "ownerReferences": [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": owner, "uid": owner_uid}
        ]}
    });
    server.kubectl_stdin(&["create", "-f", "-"], &object.to_string())?;
    Ok(())
}

async fn wait_gone(server: &Server, name: &str) -> anyhow::Result<()> {
    for _ in 0..100 {
        let out = server.kubectl().args(["get", "configmap", name]).output()?;
        if !out.status.success() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("configmap {name} was not garbage collected")
}

#[tokio::test]
async fn garbage_collection_follows_propagation_policy() -> anyhow::Result<()> {
    let server = Server::start(SKIFF.as_ref(), &[]).await?;
    let uid = |name: &str| -> anyhow::Result<String> {
        server.kubectl_ok(&[
            "create",
            "configmap",
            name,
            "-o",
            "jsonpath={.metadata.uid}",
        ])
    };

    // Background (the default): dependents go after the owner.
    let owner = uid("bg-owner")?;
    create_dependent(&server, "bg-dep", "bg-owner", &owner)?;
    server.kubectl_ok(&["delete", "configmap", "bg-owner"])?;
    wait_gone(&server, "bg-dep").await?;

    // Foreground: the owner waits for its dependents.
    let owner = uid("fg-owner")?;
    create_dependent(&server, "fg-dep", "fg-owner", &owner)?;
    server.kubectl_ok(&[
        "delete",
        "configmap",
        "fg-owner",
        "--cascade=foreground",
        "--wait",
        "--timeout=30s",
    ])?;
    ensure!(
        server
            .kubectl_err(&["get", "configmap", "fg-dep"])?
            .contains("NotFound")
    );

    // Orphan: the dependent stays, without its owner reference.
    let owner = uid("orphan-owner")?;
    create_dependent(&server, "orphan-dep", "orphan-owner", &owner)?;
    server.kubectl_ok(&[
        "delete",
        "configmap",
        "orphan-owner",
        "--cascade=orphan",
        "--wait",
        "--timeout=30s",
    ])?;
    let refs = server.kubectl_ok(&[
        "get",
        "configmap",
        "orphan-dep",
        "-o",
        "jsonpath={.metadata.ownerReferences}",
    ])?;
    ensure!(
        refs.trim().is_empty(),
        "owner reference left behind: {refs}"
    );

    // An object whose owner never existed is collected too.
    create_dependent(
        &server,
        "stray",
        "ghost",
        "00000000-0000-0000-0000-000000000000",
    )?;
    wait_gone(&server, "stray").await?;
    Ok(())
}

#[tokio::test]
async fn authentication_tokens_anonymous_and_limits() -> anyhow::Result<()> {
    let mut server = Server::start(SKIFF.as_ref(), &[]).await?;
    // A static token file in upstream's format, read at start.
    std::fs::write(
        server.data_dir().join("server/tokens.csv"),
        "t0ken-for-ci,ci-bot,1001,\"ci,deployers\"\n",
    )?;
    server.restart().await?;
    let ca = server.data_dir().join("server/tls/server-ca.crt");
    let ca = ca.to_str().context("path")?;
    let url = server.url();
    let as_token = |token: Option<&str>, args: &[&str]| {
        let mut command = std::process::Command::new("kubectl");
        command.args([
            "--kubeconfig",
            "/dev/null",
            "--server",
            &url,
            "--certificate-authority",
            ca,
        ]);
        if let Some(token) = token {
            command.args(["--token", token]);
        }
        command.args(args).output()
    };
    // RBAC: authenticated is not authorized until a binding says so.
    let refused = as_token(Some("t0ken-for-ci"), &["get", "namespaces"])?;
    ensure!(
        String::from_utf8_lossy(&refused.stderr).contains(
            "namespaces is forbidden: User \"ci-bot\" cannot list resource \"namespaces\" in API group \"\" at the cluster scope"
        ),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    server.kubectl_ok(&[
        "create",
        "clusterrolebinding",
        "ci-view",
        "--clusterrole=view",
        "--group=deployers",
    ])?;
    let ok = eventually(|| {
        let out = as_token(Some("t0ken-for-ci"), &["get", "namespaces", "-o", "name"])?;
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out)
    })?;
    ensure!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    ensure!(String::from_utf8_lossy(&ok.stdout).contains("namespace/default"));
    let wrong = as_token(Some("nope"), &["get", "namespaces"])?;
    ensure!(String::from_utf8_lossy(&wrong.stderr).contains("Unauthorized"));
    // kubectl would prompt for a password without credentials; curl asks
    // anonymously.
    let curl = |path: &str| {
        std::process::Command::new("curl")
            .args(["-s", "--cacert", ca, &format!("{url}{path}")])
            .output()
    };
    let anonymous = curl("/api/v1/namespaces")?;
    let status: Value = serde_json::from_slice(&anonymous.stdout)?;
    ensure!(
        status["code"] == 401 && status["reason"] == "Unauthorized",
        "{status}"
    );
    let health = curl("/readyz")?;
    ensure!(
        String::from_utf8_lossy(&health.stdout) == "ok",
        "health endpoints are public"
    );

    // Bodies over 3 MiB are refused whole.
    let big = server.data_dir().join("big.txt");
    std::fs::write(&big, vec![b'x'; 4 * 1024 * 1024])?;
    let too_big = server.kubectl_err(&[
        "create",
        "configmap",
        "big",
        &format!("--from-file={}", big.display()),
    ])?;
    ensure!(
        too_big.contains("too large") || too_big.contains("RequestEntityTooLarge"),
        "{too_big}"
    );
    ensure!(
        server
            .kubectl_err(&["get", "configmap", "big"])?
            .contains("NotFound")
    );

    // `kubectl wait --for=delete` sees a deletion.
    server.kubectl_ok(&["create", "configmap", "short-lived"])?;
    let mut waiter = server
        .kubectl()
        .args([
            "wait",
            "--for=delete",
            "configmap/short-lived",
            "--timeout=30s",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.kubectl_ok(&["delete", "configmap", "short-lived"])?;
    let waited = waiter.wait()?;
    ensure!(waited.success(), "kubectl wait --for=delete failed");
    Ok(())
}

#[tokio::test]
async fn pagination_and_kubectl_1_32() -> anyhow::Result<()> {
    let server = Server::start(SKIFF.as_ref(), &[]).await?;
    for i in 0..7 {
        server.kubectl_ok(&["create", "configmap", &format!("page-{i}")])?;
    }
    // kubectl pages through with limit/continue.
    let chunked = server.kubectl_ok(&["get", "configmaps", "--chunk-size=2", "-o", "name"])?;
    let names: Vec<&str> = chunked
        .lines()
        .filter(|l| l.starts_with("configmap/page-"))
        .collect();
    ensure!(names.len() == 7, "{chunked}");
    let page = json(&server.kubectl_ok(&[
        "get",
        "--raw",
        "/api/v1/namespaces/default/configmaps?limit=3",
    ])?)?;
    ensure!(page["items"].as_array().map(Vec::len) == Some(3), "{page}");
    ensure!(page["metadata"]["continue"].is_string(), "{page}");
    ensure!(
        page["metadata"]["remainingItemCount"].as_i64() >= Some(4),
        "{page}"
    );
    let bad = server.kubectl_err(&[
        "get",
        "--raw",
        "/api/v1/namespaces/default/configmaps?limit=3&continue=garbage",
    ])?;
    ensure!(
        bad.contains("BadRequest") || bad.contains("continue"),
        "{bad}"
    );

    // The previous minor's kubectl works too (the dispatcher picks 1.33).
    let kubectl_132 = "/usr/lib/google-cloud-sdk/bin/kubectl.1.32";
    let old = |args: &[&str]| {
        std::process::Command::new(kubectl_132)
            .arg("--kubeconfig")
            .arg(server.kubeconfig())
            .args(args)
            .output()
    };
    let version = old(&["version"])?;
    ensure!(
        String::from_utf8_lossy(&version.stdout).contains("v1.32"),
        "not kubectl 1.32"
    );
    for args in [
        &["create", "configmap", "from-132", "--from-literal=a=b"][..],
        &["get", "configmap", "from-132", "-o", "jsonpath={.data.a}"][..],
        &["get", "pods,services", "-A"][..],
        &["delete", "configmap", "from-132"][..],
    ] {
        let out = old(args)?;
        ensure!(
            out.status.success(),
            "kubectl 1.32 {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

#[tokio::test]
async fn server_side_apply_owns_fields_and_reports_conflicts() -> anyhow::Result<()> {
    let server = Server::start(SKIFF.as_ref(), &[]).await?;
    let applied = server.kubectl_stdin(&["apply", "--server-side", "-f", "-"], DEPLOYMENT)?;
    ensure!(applied.contains("serverside-applied"), "{applied}");
    let object = json(&server.kubectl_ok(&[
        "get",
        "deployment",
        "web",
        "-o",
        "json",
        "--show-managed-fields",
    ])?)?;
    let managers = object["metadata"]["managedFields"]
        .as_array()
        .context("managedFields")?;
    ensure!(
        managers
            .iter()
            .any(|m| m["manager"] == "kubectl" && m["operation"] == "Apply"),
        "{managers:?}"
    );

    // Changing an owned field is fine; a field another manager changed
    // since is a conflict until forced.
    server.kubectl_stdin(
        &["apply", "--server-side", "-f", "-"],
        &DEPLOYMENT.replace("nginx:1.25", "nginx:1.26"),
    )?;
    server.kubectl_ok(&[
        "patch",
        "deployment",
        "web",
        "--field-manager=autoscaler",
        "-p",
        r#"{"spec":{"replicas":4}}"#,
    ])?;
    let conflict = server
        .kubectl_stdin(&["apply", "--server-side", "-f", "-"], DEPLOYMENT)
        .err()
        .context("conflicting apply succeeded")?
        .to_string();
    ensure!(
        conflict.contains("conflict") && conflict.contains(".spec.replicas"),
        "{conflict}"
    );
    server.kubectl_stdin(
        &["apply", "--server-side", "--force-conflicts", "-f", "-"],
        DEPLOYMENT,
    )?;
    let object = json(&server.kubectl_ok(&["get", "deployment", "web", "-o", "json"])?)?;
    ensure!(object["spec"]["replicas"] == 2, "{object}");
    ensure!(object["spec"]["template"]["spec"]["containers"][0]["image"] == "nginx:1.25");

    // Dropping a field from the applied configuration removes it.
    let without_second_port = DEPLOYMENT.replace("        - containerPort: 8080\n", "");
    server.kubectl_stdin(&["apply", "--server-side", "-f", "-"], &without_second_port)?;
    let object = json(&server.kubectl_ok(&["get", "deployment", "web", "-o", "json"])?)?;
    let ports = &object["spec"]["template"]["spec"]["containers"][0]["ports"];
    ensure!(ports.as_array().map(Vec::len) == Some(1), "{ports}");
    Ok(())
}

#[tokio::test]
async fn etcd_backed_server_serves_kubectl_and_survives_restart() -> anyhow::Result<()> {
    let etcd = skiff_e2e::etcd::Etcd::start().await?;
    let endpoint = etcd.endpoint();
    let mut server = Server::start(SKIFF.as_ref(), &["--datastore-endpoint", &endpoint]).await?;
    server.kubectl_stdin(&["apply", "-f", "-"], DEPLOYMENT)?;
    server.kubectl_ok(&["create", "configmap", "on-etcd", "--from-literal=k=v"])?;
    let watched = server.kubectl_ok(&["get", "configmaps", "-o", "name"])?;
    ensure!(watched.contains("configmap/on-etcd"), "{watched}");
    server.restart().await?;
    let data = server.kubectl_ok(&["get", "configmap", "on-etcd", "-o", "jsonpath={.data.k}"])?;
    ensure!(data == "v", "{data}");
    let replicas = server.kubectl_ok(&[
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.spec.replicas}",
    ])?;
    ensure!(replicas == "2", "{replicas}");
    Ok(())
}

const STATEFUL_SET: &str = r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  replicas: 1
  serviceName: db
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      containers: [{name: db, image: busybox}]
"#;

const CORE_EVENT: &str = r#"
apiVersion: v1
kind: Event
metadata: {name: by-hand}
involvedObject: {kind: ConfigMap, name: settings, namespace: default}
reason: Edited
message: changed by hand
type: Normal
source: {component: operator}
count: 2
"#;

const NEW_EVENT: &str = r#"
apiVersion: events.k8s.io/v1
kind: Event
metadata: {name: rotated}
regarding: {kind: Secret, name: tls, namespace: default}
reason: Rotated
note: rotated
type: Normal
action: Rotate
reportingController: operator
reportingInstance: operator-1
eventTime: "2026-11-27T20:00:00.000000Z"
"#;

/// Controllers record Events through events.k8s.io/v1 (kube-rs's
/// Recorder); `kubectl get events` and `describe` read core/v1. Both are
/// one stored object, as upstream.
#[tokio::test]
async fn events_are_one_object_in_both_apis() -> anyhow::Result<()> {
    let server = Server::start(SKIFF.as_ref(), &[]).await?;
    server.kubectl_stdin(&["apply", "-f", "-"], STATEFUL_SET)?;
    let mut events = String::new();
    for _ in 0..100 {
        events = server.kubectl_ok(&["get", "events"])?;
        if events.contains("SuccessfulCreate") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(
        events.contains("SuccessfulCreate") && events.contains("statefulset/db"),
        "the controller's event is not a core/v1 Event:\n{events}"
    );
    let describe = server.kubectl_ok(&["describe", "statefulset", "db"])?;
    ensure!(
        describe.contains("SuccessfulCreate") && describe.contains("create Pod db-0"),
        "{describe}"
    );

    server.kubectl_stdin(&["create", "-f", "-"], CORE_EVENT)?;
    let new_api =
        json(&server.kubectl_ok(&["get", "events.v1.events.k8s.io", "by-hand", "-o", "json"])?)?;
    ensure!(new_api["apiVersion"] == "events.k8s.io/v1", "{new_api}");
    ensure!(new_api["note"] == "changed by hand", "{new_api}");
    ensure!(new_api["regarding"]["name"] == "settings", "{new_api}");
    ensure!(new_api["deprecatedCount"] == 2, "{new_api}");
    let core = json(&server.kubectl_ok(&["get", "event", "by-hand", "-o", "json"])?)?;
    ensure!(
        core["metadata"]["resourceVersion"] == new_api["metadata"]["resourceVersion"],
        "two objects: {core} vs {new_api}"
    );
    let by_field = server.kubectl_ok(&[
        "get",
        "events.v1.events.k8s.io",
        "--field-selector",
        "regarding.name=settings",
        "-o",
        "name",
    ])?;
    ensure!(
        by_field.trim() == "event.events.k8s.io/by-hand",
        "{by_field}"
    );

    // Written through the new API: the response is in the new shape, and
    // the object reads back through the old one.
    let created = json(&server.kubectl_stdin(&["create", "-o", "json", "-f", "-"], NEW_EVENT)?)?;
    ensure!(
        created["note"] == "rotated" && created.get("message").is_none(),
        "{created}"
    );
    let core = json(&server.kubectl_ok(&["get", "event", "rotated", "-o", "json"])?)?;
    ensure!(core["message"] == "rotated", "{core}");
    ensure!(core["reportingComponent"] == "operator", "{core}");

    server.kubectl_ok(&["delete", "events.v1.events.k8s.io", "by-hand"])?;
    let gone = server.kubectl_err(&["get", "event", "by-hand"])?;
    ensure!(gone.contains("NotFound"), "{gone}");
    Ok(())
}

/// Secrets never reach the disk in the clear, and read back after a
/// restart with the key the first start created.
#[tokio::test]
async fn secrets_are_encrypted_at_rest() -> anyhow::Result<()> {
    let mut server = Server::start(SKIFF.as_ref(), &[]).await?;
    let value = "correct-horse-battery-staple-7f3a";
    server.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "db",
        &format!("--from-literal=password={value}"),
    ])?;
    server.kill();
    let encoded = base64_of(value);
    let db = server.data_dir().join("server/db");
    for entry in std::fs::read_dir(&db)? {
        let path = entry?.path();
        let bytes = std::fs::read(&path)?;
        for needle in [value.as_bytes(), encoded.as_bytes()] {
            ensure!(
                !bytes.windows(needle.len()).any(|w| w == needle),
                "{} holds the secret in the clear",
                path.display()
            );
        }
    }
    server.restart().await?;
    let read = server.kubectl_ok(&["get", "secret", "db", "-o", "jsonpath={.data.password}"])?;
    ensure!(read == encoded, "read back {read}, wrote {encoded}");
    Ok(())
}

fn base64_of(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

#[tokio::test]
async fn rbac_grants_only_what_bindings_say() -> anyhow::Result<()> {
    let mut server = Server::start(SKIFF.as_ref(), &[]).await?;
    std::fs::write(
        server.data_dir().join("server/tokens.csv"),
        "alice-token,alice,2001,\"dev-team\"\n",
    )?;
    server.restart().await?;
    let ca = server.data_dir().join("server/tls/server-ca.crt");
    let url = server.url();
    let alice = |args: &[&str]| -> anyhow::Result<std::process::Output> {
        let mut command = std::process::Command::new("kubectl");
        command.args([
            "--kubeconfig",
            "/dev/null",
            "--server",
            &url,
            "--token",
            "alice-token",
        ]);
        command.arg("--certificate-authority").arg(&ca);
        Ok(command.args(args).output()?)
    };
    let stderr = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();

    // Authenticated, discovery allowed, nothing else.
    let whoami = alice(&["auth", "whoami", "-o", "json"])?;
    let review: Value = serde_json::from_slice(&whoami.stdout).context(stderr(&whoami))?;
    ensure!(
        review["status"]["userInfo"]["username"] == "alice",
        "{review}"
    );
    ensure!(
        review["status"]["userInfo"]["groups"]
            == serde_json::json!(["dev-team", "system:authenticated"]),
        "{review}"
    );
    server.kubectl_ok(&["create", "namespace", "dev"])?;
    let refused = alice(&["get", "pods", "-n", "dev"])?;
    ensure!(
        stderr(&refused).contains(
            "pods is forbidden: User \"alice\" cannot list resource \"pods\" in API group \"\" in the namespace \"dev\""
        ),
        "{}",
        stderr(&refused)
    );
    let can = alice(&["auth", "can-i", "list", "pods", "-n", "dev"])?;
    ensure!(
        String::from_utf8_lossy(&can.stdout).trim() == "no",
        "{can:?}"
    );

    // A Role bound to her in one namespace: reads there, nowhere else.
    server.kubectl_ok(&[
        "create",
        "role",
        "pod-reader",
        "--verb=get,list",
        "--resource=pods",
        "-n",
        "dev",
    ])?;
    server.kubectl_ok(&[
        "create",
        "rolebinding",
        "alice-reads",
        "--role=pod-reader",
        "--user=alice",
        "-n",
        "dev",
    ])?;
    eventually(|| {
        let out = alice(&["get", "pods", "-n", "dev"])?;
        ensure!(out.status.success(), "{}", stderr(&out));
        Ok(())
    })?;
    let can = alice(&["auth", "can-i", "list", "pods", "-n", "dev"])?;
    ensure!(
        String::from_utf8_lossy(&can.stdout).trim() == "yes",
        "{can:?}"
    );
    ensure!(!alice(&["get", "pods", "-n", "default"])?.status.success());
    let write = alice(&["create", "configmap", "settings", "-n", "dev"])?;
    ensure!(stderr(&write).contains("forbidden"), "{}", stderr(&write));

    // The aggregated `edit` ClusterRole through her group, in one namespace.
    server.kubectl_ok(&[
        "create",
        "rolebinding",
        "team-edit",
        "--clusterrole=edit",
        "--group=dev-team",
        "-n",
        "dev",
    ])?;
    eventually(|| {
        let out = alice(&["create", "configmap", "settings", "-n", "dev"])?;
        ensure!(out.status.success(), "{}", stderr(&out));
        Ok(())
    })?;
    ensure!(
        !alice(&["create", "configmap", "settings", "-n", "default"])?
            .status
            .success()
    );
    // edit does not include RBAC itself.
    let escalate = alice(&[
        "create",
        "rolebinding",
        "mine",
        "--clusterrole=admin",
        "--user=alice",
        "-n",
        "dev",
    ])?;
    ensure!(
        stderr(&escalate).contains("forbidden"),
        "{}",
        stderr(&escalate)
    );

    // Removing the bindings takes the access away again.
    server.kubectl_ok(&[
        "delete",
        "rolebinding",
        "alice-reads",
        "team-edit",
        "-n",
        "dev",
    ])?;
    eventually(|| {
        let out = alice(&["get", "pods", "-n", "dev"])?;
        ensure!(
            stderr(&out).contains("forbidden"),
            "still allowed: {}",
            stderr(&out)
        );
        Ok(())
    })?;
    // The admin (system:masters) is never subject to bindings.
    server.kubectl_ok(&["get", "pods", "-n", "dev"])?;
    Ok(())
}

/// Retries `check` for up to 20 s (RBAC changes reach the policy through a
/// store watch, not synchronously with the write).
fn eventually<T>(mut check: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match check() {
            Ok(value) => return Ok(value),
            Err(e) if std::time::Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}
