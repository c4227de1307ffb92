//! Service-account tokens end to end: the real kubectl asks for a token,
//! a real runc pod gets one mounted with the cluster CA and its namespace,
//! and curl (with that CA) authenticates with it against the API server;
//! a token bound to a deleted pod, or altered, no longer does.

use std::path::Path;
use std::process::Output;

use anyhow::{Context, bail, ensure};
use serde_json::Value;
use skiff_e2e::node::AgentNode;

const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");
const IMAGE: &str = "skiff-test/busybox:1";
const MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

async fn node() -> anyhow::Result<AgentNode> {
    let node = AgentNode::start(Path::new(SKIFF), &[]).await?;
    node.import_busybox(Path::new(SKIFF), IMAGE)?;
    Ok(node)
}

/// curl against the API server with `token` and `ca`: (HTTP code, body).
fn curl(
    node: &AgentNode,
    ca: &Path,
    token: &str,
    method: &str,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    let mut command = node.server.command("curl");
    command
        .args(["-sS", "-X", method, "--cacert"])
        .arg(ca)
        .args(["-H", &format!("Authorization: Bearer {token}")]);
    if method == "POST" {
        command.args(["-H", "Content-Type: application/json", "-d", "{}"]);
    }
    let output = command
        .args(["-w", "\n%{http_code}"])
        .arg(format!("{}{path}", node.server.url()))
        .output()
        .context("running curl")?;
    let text = stdout(&output, "curl")?;
    let (body, code) = text.trim_end().rsplit_once('\n').unwrap_or(("", &text));
    Ok((code.trim().parse()?, body.to_owned()))
}

fn stdout(output: &Output, what: &str) -> anyhow::Result<String> {
    if !output.status.success() {
        bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `kubectl auth whoami` with a kubeconfig that holds only `token`.
fn whoami(node: &AgentNode, ca: &Path, token: &str) -> anyhow::Result<Output> {
    let config = node.server.data_dir().join("token-kubeconfig.yaml");
    std::fs::write(
        &config,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n",
            node.server.url(),
            ca.display()
        ),
    )?;
    node.server
        .command("kubectl")
        .arg("--kubeconfig")
        .arg(&config)
        .env_remove("KUBECONFIG")
        .args(["auth", "whoami", "-o", "json"])
        .output()
        .context("running kubectl auth whoami")
}

fn username(output: &Output) -> anyhow::Result<String> {
    let review: Value = serde_json::from_str(&stdout(output, "kubectl auth whoami")?)?;
    Ok(review["status"]["userInfo"]["username"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn service_account_tokens_from_kubectl_and_in_pods_authenticate() -> anyhow::Result<()> {
    let node = node().await?;
    // The controller makes the account and the CA bundle in every namespace.
    node.eventually("the default ServiceAccount", || {
        Ok(node
            .server
            .kubectl_ok(&["get", "serviceaccount", "default", "-o", "name"])
            .ok())
    })
    .await?;
    let bundle = node
        .eventually("the kube-root-ca.crt ConfigMap", || {
            Ok(node
                .server
                .kubectl_ok(&[
                    "get",
                    "configmap",
                    "kube-root-ca.crt",
                    "-n",
                    "kube-system",
                    "-o",
                    "jsonpath={.data.ca\\.crt}",
                ])
                .ok()
                .filter(|ca| ca.contains("BEGIN CERTIFICATE")))
        })
        .await?;
    let manifest = format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: tok}}
spec:
  containers:
  - name: main
    image: {IMAGE}
    imagePullPolicy: IfNotPresent
    command: ["sleep", "3600"]
---
apiVersion: v1
kind: Pod
metadata: {{name: none}}
spec:
  automountServiceAccountToken: false
  containers:
  - name: main
    image: {IMAGE}
    imagePullPolicy: IfNotPresent
    command: ["sleep", "3600"]
"#
    );
    node.server
        .kubectl_stdin(&["apply", "-f", "-"], &manifest)?;

    // Admission added upstream's volume and read-only mount.
    let pod = node.pod_json("tok")?;
    let volume = pod["spec"]["volumes"]
        .as_array()
        .and_then(|v| {
            v.iter().find(|v| {
                v["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("kube-api-access-"))
            })
        })
        .context("the kube-api-access volume")?;
    let sources = &volume["projected"]["sources"];
    ensure!(
        sources[0]["serviceAccountToken"]["expirationSeconds"] == 3607,
        "{sources}"
    );
    let mount = &pod["spec"]["containers"][0]["volumeMounts"][0];
    ensure!(
        mount["mountPath"] == MOUNT && mount["readOnly"] == true && mount["name"] == volume["name"],
        "{mount}"
    );
    ensure!(
        pod["spec"]["serviceAccountName"] == "default",
        "{}",
        pod["spec"]
    );
    let none = node.pod_json("none")?;
    ensure!(
        none["spec"]["volumes"].is_null()
            && none["spec"]["containers"][0]["volumeMounts"].is_null(),
        "automountServiceAccountToken: false: {}",
        none["spec"]
    );

    // Inside the pod: token, CA bundle and namespace.
    let read = |path: &str| node.server.kubectl_ok(&["exec", "tok", "--", "cat", path]);
    let token = node
        .eventually("the mounted token", || {
            Ok(read(&format!("{MOUNT}/token"))
                .ok()
                .filter(|t| t.split('.').count() == 3))
        })
        .await?;
    let ca = read(&format!("{MOUNT}/ca.crt"))?;
    ensure!(ca == bundle, "the mounted ca.crt is the cluster CA");
    let namespace = read(&format!("{MOUNT}/namespace"))?;
    ensure!(namespace == "default", "namespace file: {namespace:?}");
    let write = node.server.kubectl_err(&[
        "exec",
        "tok",
        "--",
        "sh",
        "-c",
        &format!("echo x > {MOUNT}/extra"),
    ])?;
    ensure!(write.contains("Read-only"), "writing to the mount: {write}");
    let none_mount = node
        .server
        .kubectl_err(&["exec", "none", "--", "ls", MOUNT])?;
    ensure!(none_mount.contains("No such file"), "{none_mount}");

    let ca_file = node.server.data_dir().join("pod-ca.crt");
    std::fs::write(&ca_file, &ca)?;
    // Authenticated as the account, and authorized only as RBAC says.
    let pods = "/api/v1/namespaces/default/pods";
    let (code, body) = curl(&node, &ca_file, &token, "GET", pods)?;
    ensure!(
        code == 403 && body.contains("system:serviceaccount:default:default"),
        "before any binding: {code}: {body}"
    );
    node.server.kubectl_ok(&[
        "create",
        "rolebinding",
        "sa-view",
        "--clusterrole=view",
        "--serviceaccount=default:default",
    ])?;
    let (code, body) = node
        .eventually("the binding to take effect", || {
            let answer = curl(&node, &ca_file, &token, "GET", pods)?;
            Ok((answer.0 != 403).then_some(answer))
        })
        .await?;
    ensure!(code == 200 && body.contains("\"tok\""), "{code}: {body}");
    let (code, body) = curl(
        &node,
        &ca_file,
        &token,
        "POST",
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
    )?;
    let review: Value = serde_json::from_str(&body).with_context(|| format!("{code}: {body}"))?;
    ensure!(
        review["status"]["userInfo"]["username"] == "system:serviceaccount:default:default",
        "{review}"
    );
    let groups = review["status"]["userInfo"]["groups"].to_string();
    for group in [
        "system:serviceaccounts",
        "system:serviceaccounts:default",
        "system:authenticated",
    ] {
        ensure!(groups.contains(&format!("\"{group}\"")), "{groups}");
    }

    // An altered token is refused.
    let (head, signature) = token.rsplit_once('.').context("token shape")?;
    let flipped = if signature.starts_with('A') { "B" } else { "A" };
    let forged = format!("{head}.{flipped}{}", &signature[1..]);
    let (code, body) = curl(
        &node,
        &ca_file,
        &forged,
        "GET",
        "/api/v1/namespaces/default/pods",
    )?;
    ensure!(code == 401, "a forged token: {code}: {body}");

    // kubectl create token: the real kubectl, with only the token.
    let created = node
        .server
        .kubectl_ok(&["create", "token", "default", "--duration=15m"])?;
    let created = created.trim();
    ensure!(created.split('.').count() == 3, "{created}");
    let me = username(&whoami(&node, &ca_file, created)?)?;
    ensure!(me == "system:serviceaccount:default:default", "{me}");
    let bound = node.server.kubectl_ok(&[
        "create",
        "token",
        "default",
        "--bound-object-kind=Pod",
        "--bound-object-name=tok",
    ])?;
    let bound = bound.trim().to_owned();
    ensure!(username(&whoami(&node, &ca_file, &bound)?)? == me);
    let short = node
        .server
        .kubectl_err(&["create", "token", "default", "--duration=1m"])?;
    ensure!(short.contains("10 minutes"), "{short}");
    let missing = node.server.kubectl_err(&["create", "token", "nobody"])?;
    ensure!(missing.contains("not found"), "{missing}");

    // Tokens bound to the pod die with it; the unbound one lives on.
    node.server
        .kubectl_ok(&["delete", "pod", "tok", "--grace-period=1"])?;
    node.eventually("the pod to be gone", || {
        Ok(node
            .server
            .kubectl_err(&["get", "pod", "tok"])
            .ok()
            .filter(|e| e.contains("NotFound")))
    })
    .await?;
    for (what, t) in [("mounted", token.as_str()), ("bound", bound.as_str())] {
        let (code, body) = curl(&node, &ca_file, t, "GET", "/api/v1/namespaces/default/pods")?;
        ensure!(
            code == 401,
            "the {what} token of a deleted pod: {code}: {body}"
        );
    }
    let denied = whoami(&node, &ca_file, &bound)?;
    ensure!(!denied.status.success(), "whoami with a dead pod's token");
    ensure!(username(&whoami(&node, &ca_file, created)?)? == me);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pod_of_a_missing_account_waits_until_it_exists() -> anyhow::Result<()> {
    let node = node().await?;
    let manifest = format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: later}}
spec:
  serviceAccountName: robot
  containers:
  - name: main
    image: {IMAGE}
    imagePullPolicy: IfNotPresent
    command: ["sleep", "3600"]
"#
    );
    node.server
        .kubectl_stdin(&["apply", "-f", "-"], &manifest)?;
    let waiting = node
        .eventually("the pod to wait for its account", || {
            let pod = node.pod_json("later")?;
            let waiting = &pod["status"]["containerStatuses"][0]["state"]["waiting"];
            Ok(waiting["message"]
                .as_str()
                .filter(|m| m.contains("robot"))
                .map(|_| waiting.clone()))
        })
        .await?;
    ensure!(waiting["reason"] == "ContainerCreating", "{waiting}");
    node.server
        .kubectl_ok(&["create", "serviceaccount", "robot"])?;
    node.eventually("the pod to run", || {
        let pod = node.pod_json("later")?;
        Ok((pod["status"]["phase"] == "Running").then_some(()))
    })
    .await?;
    let token =
        node.server
            .kubectl_ok(&["exec", "later", "--", "cat", &format!("{MOUNT}/token")])?;
    let ca_file = node.server.data_dir().join("ca.crt");
    let ca = node.server.kubectl_ok(&[
        "get",
        "configmap",
        "kube-root-ca.crt",
        "-o",
        "jsonpath={.data.ca\\.crt}",
    ])?;
    std::fs::write(&ca_file, ca)?;
    let me = username(&whoami(&node, &ca_file, &token)?)?;
    ensure!(me == "system:serviceaccount:default:robot", "{me}");
    Ok(())
}
