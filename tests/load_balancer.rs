//! The service load balancer's status against a real `skiff server`, seen
//! through the real kubectl: LoadBalancer Services list the Ready nodes'
//! addresses as their ingress and follow the nodes. There is no node agent
//! here, so the test plays it and writes the nodes' status itself.

use std::time::{Duration, Instant};

use anyhow::bail;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use skiff_e2e::server::Server;

const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancer_ingress_follows_ready_nodes() -> anyhow::Result<()> {
    let server = Server::start(SKIFF.as_ref(), &[]).await?;
    let client = client(&server).await?;
    for (name, ip) in [("lb-a", "10.99.0.1"), ("lb-b", "10.99.0.2")] {
        add_node(&client, name, ip, true).await?;
    }
    server.kubectl_stdin(
        &["apply", "-f", "-"],
        r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  type: LoadBalancer
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: elsewhere}
spec:
  type: LoadBalancer
  loadBalancerClass: example.com/other
  selector: {app: web}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: inside}
spec:
  selector: {app: web}
  ports: [{port: 80}]
"#,
    )?;

    wait_for_ingress(&server, "web", "10.99.0.1 10.99.0.2").await?;
    // kubectl shows it as the Service's external address.
    let wide = server.kubectl_ok(&["get", "service", "web"])?;
    if !wide.contains("10.99.0.1,10.99.0.2") {
        bail!("kubectl get service shows no external IPs:\n{wide}");
    }

    // A node that stops being Ready leaves the ingress; a new one joins it.
    add_node(&client, "lb-a", "10.99.0.1", false).await?;
    wait_for_ingress(&server, "web", "10.99.0.2").await?;
    add_node(&client, "lb-c", "10.99.0.3", true).await?;
    wait_for_ingress(&server, "web", "10.99.0.2 10.99.0.3").await?;

    // A Service that stops being a LoadBalancer loses its ingress.
    server.kubectl_ok(&[
        "patch",
        "service",
        "web",
        "-p",
        r#"{"spec": {"type": "ClusterIP"}}"#,
    ])?;
    wait_for_ingress(&server, "web", "").await?;

    // Neither the other implementation's Service nor the ClusterIP one was
    // ever given an ingress.
    for name in ["elsewhere", "inside"] {
        let ingress = ingress_of(&server, name)?;
        if !ingress.is_empty() {
            bail!("{name} got an ingress it should not have: {ingress}");
        }
    }
    Ok(())
}

async fn client(server: &Server) -> anyhow::Result<kube::Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(server.kubeconfig())?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// Plays a node agent: creates the node if needed and reports its address
/// and readiness.
async fn add_node(client: &kube::Client, name: &str, ip: &str, ready: bool) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    if nodes.get_opt(name).await?.is_none() {
        let node: Node = serde_json::from_value(json!({"metadata": {"name": name}}))?;
        nodes.create(&PostParams::default(), &node).await?;
    }
    let status = if ready { "True" } else { "False" };
    let patch = json!({"status": {
        "conditions": [{"type": "Ready", "status": status, "reason": "Test",
                        "lastHeartbeatTime": now(), "lastTransitionTime": now()}],
        "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
    }});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// The Service's ingress IPs as kubectl reports them, space-separated.
fn ingress_of(server: &Server, name: &str) -> anyhow::Result<String> {
    let out = server.kubectl_ok(&[
        "get",
        "service",
        name,
        "-o",
        "jsonpath={.status.loadBalancer.ingress[*].ip}",
    ])?;
    Ok(out.trim().to_string())
}

async fn wait_for_ingress(server: &Server, name: &str, want: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = ingress_of(server, name)?;
        if got == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{name}'s ingress is {got:?}, not {want:?}\n{}",
                server.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
