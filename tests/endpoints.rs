//! The EndpointSlice and Endpoints controllers against a real `skiff
//! server`, seen through the real kubectl. There is no node agent here, so
//! the test plays it: it gives pods their IPs and readiness through
//! `pods/{name}/status`.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use skiff_e2e::server::Server;

const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slices_and_endpoints_follow_pod_readiness() -> anyhow::Result<()> {
    let server = Server::start(SKIFF.as_ref(), &[]).await?;
    let client = client(&server).await?;
    server.kubectl_stdin(
        &["apply", "-f", "-"],
        r#"
apiVersion: v1
kind: Service
metadata: {name: web, labels: {tier: front}}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-a, labels: {app: web}}
spec: {containers: [{name: app, image: busybox, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-b, labels: {app: web}}
spec: {containers: [{name: app, image: busybox, ports: [{containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: stranger, labels: {app: other}}
spec: {containers: [{name: app, image: busybox}]}
"#,
    )?;

    // No pod has an address yet: one empty placeholder slice.
    let slices = wait_for(&server, "a placeholder slice", || {
        let list = slices_of(&server, "web")?;
        Ok(
            (list.len() == 1 && list[0]["endpoints"].as_array().is_none_or(Vec::is_empty))
                .then_some(list),
        )
    })
    .await?;
    let slice = &slices[0];
    ensure!(slice["addressType"] == "IPv4", "{slice}");
    ensure!(
        slice["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"]
            == "endpointslice-controller.k8s.io"
    );
    ensure!(
        slice["metadata"]["labels"]["tier"] == "front",
        "service labels are copied: {slice}"
    );
    let owner = &slice["metadata"]["ownerReferences"][0];
    ensure!(
        owner["kind"] == "Service" && owner["name"] == "web" && owner["controller"] == true,
        "{slice}"
    );

    set_status(&client, "web-a", "10.42.0.10", true).await?;
    set_status(&client, "web-b", "10.42.0.11", false).await?;
    set_status(&client, "stranger", "10.42.0.12", true).await?;
    let endpoints = wait_for(&server, "web-a ready and web-b not ready", || {
        let eps = endpoints_of(&server, "web")?;
        let want = [
            ("10.42.0.10".to_owned(), true, true, false),
            ("10.42.0.11".to_owned(), false, false, false),
        ];
        Ok((eps == want).then_some(eps))
    })
    .await?;
    println!("endpoints: {endpoints:?}");
    let slice = &slices_of(&server, "web")?[0];
    ensure!(
        slice["ports"] == json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
        "{slice}"
    );
    let a = &slice["endpoints"][0];
    ensure!(
        a["targetRef"]["kind"] == "Pod" && a["targetRef"]["name"] == "web-a",
        "{a}"
    );

    // The legacy Endpoints: ready and not-ready addresses apart.
    let legacy: Value =
        serde_json::from_str(&server.kubectl_ok(&["get", "endpoints", "web", "-o", "json"])?)?;
    let subset = &legacy["subsets"][0];
    ensure!(subset["addresses"][0]["ip"] == "10.42.0.10", "{legacy}");
    ensure!(
        subset["notReadyAddresses"][0]["ip"] == "10.42.0.11",
        "{legacy}"
    );
    ensure!(
        subset["ports"] == json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
        "{legacy}"
    );
    ensure!(
        legacy["metadata"]["labels"]["endpoints.kubernetes.io/managed-by"] == "endpoint-controller",
        "{legacy}"
    );
    println!(
        "{}",
        server.kubectl_ok(&[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=web"
        ])?
    );
    println!("{}", server.kubectl_ok(&["get", "endpoints", "web"])?);

    set_status(&client, "web-b", "10.42.0.11", true).await?;
    wait_for(&server, "web-b ready", || {
        let eps = endpoints_of(&server, "web")?;
        Ok(eps.iter().all(|e| e.1).then_some(()))
    })
    .await?;
    let table = wait_for(&server, "both in kubectl get endpoints", || {
        let out = server.kubectl_ok(&["get", "endpoints", "web"])?;
        Ok(out
            .contains("10.42.0.10:8080,10.42.0.11:8080")
            .then_some(out))
    })
    .await?;
    println!("{table}");

    // A change that does not concern the endpoints writes nothing: after a
    // later change has been handled, the slice is still the same version.
    let versions = || -> anyhow::Result<Vec<Value>> {
        let rv = |kind: &str, name: &str| -> anyhow::Result<Value> {
            let out = server.kubectl_ok(&["get", kind, name, "-o", "json"])?;
            Ok(serde_json::from_str::<Value>(&out)?["metadata"]["resourceVersion"].clone())
        };
        Ok(vec![
            slices_of(&server, "web")?[0]["metadata"]["resourceVersion"].clone(),
            rv("endpoints", "web")?,
            rv("endpoints", "kubernetes")?,
            rv("endpointslices", "kubernetes")?,
        ])
    };
    let version = versions()?;
    server.kubectl_ok(&["annotate", "pod", "web-b", "note=unrelated"])?;
    server.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Service\nmetadata: {name: probe}\nspec: {selector: {app: web}, ports: [{port: 81, targetPort: 8080}]}\n",
    )?;
    wait_for(&server, "the probe service's endpoints", || {
        Ok((endpoints_of(&server, "probe")?.len() == 2).then_some(()))
    })
    .await?;
    let again = versions()?;
    ensure!(
        version == again,
        "unchanged objects were rewritten: {version:?} → {again:?}"
    );

    // Deleted pods leave; terminating ones would stay, marked so.
    server.kubectl_ok(&["delete", "pod", "web-a"])?;
    wait_for(&server, "web-a gone", || {
        let eps = endpoints_of(&server, "web")?;
        Ok((eps.len() == 1 && eps[0].0 == "10.42.0.11").then_some(()))
    })
    .await?;

    // The Service goes, and its slices and Endpoints with it.
    server.kubectl_ok(&["delete", "service", "web"])?;
    wait_for(&server, "slices and endpoints removed", || {
        let slices = slices_of(&server, "web")?;
        let legacy = server.kubectl_ok(&["get", "endpoints", "--ignore-not-found", "web"])?;
        Ok((slices.is_empty() && legacy.trim().is_empty()).then_some(()))
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_target_ports_resolve_per_pod() -> anyhow::Result<()> {
    let server = Server::start(SKIFF.as_ref(), &[]).await?;
    let client = client(&server).await?;
    server.kubectl_stdin(
        &["apply", "-f", "-"],
        r#"
apiVersion: v1
kind: Service
metadata: {name: api}
spec:
  selector: {app: api}
  ports: [{name: web, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Pod
metadata: {name: api-old, labels: {app: api}}
spec: {containers: [{name: app, image: busybox, ports: [{name: http, containerPort: 8080}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api-new, labels: {app: api}}
spec: {containers: [{name: app, image: busybox, ports: [{name: http, containerPort: 9090}]}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api-unnamed, labels: {app: api}}
spec: {containers: [{name: app, image: busybox, ports: [{containerPort: 8080}]}]}
"#,
    )?;
    set_status(&client, "api-old", "10.42.1.10", true).await?;
    set_status(&client, "api-new", "10.42.1.11", true).await?;
    set_status(&client, "api-unnamed", "10.42.1.12", true).await?;
    let slices = wait_for(&server, "one slice per resolved port", || {
        let slices = slices_of(&server, "api")?;
        Ok((slices.len() == 3).then_some(slices))
    })
    .await?;
    let mut seen: Vec<(Value, Vec<String>)> = slices
        .iter()
        .map(|s| {
            let pods = s["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    e["targetRef"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned()
                })
                .collect();
            (s["ports"].clone(), pods)
        })
        .collect();
    seen.sort_by_key(|(_, pods)| pods.clone());
    let port = |n: u16| json!([{"name": "web", "port": n, "protocol": "TCP"}]);
    ensure!(
        seen == [
            (port(9090), vec!["api-new".to_owned()]),
            (port(8080), vec!["api-old".to_owned()]),
            // The pod without the port name is left out of that port.
            (Value::Null, vec!["api-unnamed".to_owned()]),
        ],
        "{seen:?}"
    );
    let legacy: Value =
        serde_json::from_str(&server.kubectl_ok(&["get", "endpoints", "api", "-o", "json"])?)?;
    let mut pairs: Vec<(String, i64)> = legacy["subsets"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            (
                s["addresses"][0]["ip"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                s["ports"][0]["port"].as_i64().unwrap_or_default(),
            )
        })
        .collect();
    pairs.sort();
    ensure!(
        pairs
            == [
                ("10.42.1.10".to_owned(), 8080),
                ("10.42.1.11".to_owned(), 9090)
            ],
        "{legacy}"
    );
    println!(
        "{}",
        server.kubectl_ok(&[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=api"
        ])?
    );
    println!("{}", server.kubectl_ok(&["get", "endpoints", "api"])?);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_service_gives_statefulset_pods_hostnames() -> anyhow::Result<()> {
    let server = Server::start(SKIFF.as_ref(), &[]).await?;
    let client = client(&server).await?;
    server.kubectl_stdin(
        &["apply", "-f", "-"],
        r#"
apiVersion: v1
kind: Service
metadata: {name: db}
spec:
  clusterIP: None
  selector: {app: db}
  ports: [{port: 5432}]
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, labels: {app: db}}
spec: {hostname: db-0, subdomain: db, containers: [{name: db, image: busybox}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, labels: {app: db}}
spec: {hostname: db-1, subdomain: db, containers: [{name: db, image: busybox}]}
---
apiVersion: v1
kind: Pod
metadata: {name: loner, labels: {app: db}}
spec: {hostname: loner, subdomain: elsewhere, containers: [{name: db, image: busybox}]}
"#,
    )?;
    set_status(&client, "db-0", "10.42.2.10", true).await?;
    set_status(&client, "db-1", "10.42.2.11", false).await?;
    set_status(&client, "loner", "10.42.2.12", true).await?;
    let slice = wait_for(&server, "three endpoints", || {
        let slices = slices_of(&server, "db")?;
        Ok(slices
            .into_iter()
            .find(|s| s["endpoints"].as_array().is_some_and(|e| e.len() == 3)))
    })
    .await?;
    let mut hostnames: Vec<(String, Value)> = slice["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["targetRef"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                e["hostname"].clone(),
            )
        })
        .collect();
    hostnames.sort_by(|a, b| a.0.cmp(&b.0));
    ensure!(
        hostnames
            == [
                ("db-0".to_owned(), json!("db-0")),
                ("db-1".to_owned(), json!("db-1")),
                ("loner".to_owned(), Value::Null),
            ],
        "{hostnames:?}"
    );
    ensure!(
        slice["metadata"]["labels"]["service.kubernetes.io/headless"] == "",
        "{slice}"
    );
    let legacy: Value =
        serde_json::from_str(&server.kubectl_ok(&["get", "endpoints", "db", "-o", "json"])?)?;
    let subset = &legacy["subsets"][0];
    ensure!(subset["addresses"][0]["hostname"] == "db-0", "{legacy}");
    ensure!(
        subset["notReadyAddresses"][0]["hostname"] == "db-1",
        "{legacy}"
    );
    ensure!(subset["addresses"][1]["hostname"].is_null(), "{legacy}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_services_split_into_slices_of_100() -> anyhow::Result<()> {
    let server = Server::start(SKIFF.as_ref(), &[]).await?;
    let client = client(&server).await?;
    server.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Service\nmetadata: {name: big}\nspec: {selector: {app: big}, ports: [{port: 80}]}\n",
    )?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let count = 230;
    let creates = (0..count).map(|i| {
        let pods = pods.clone();
        let client = client.clone();
        async move {
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": format!("big-{i}"), "labels": {"app": "big"}},
                "spec": {"containers": [{"name": "app", "image": "busybox"}]},
            }))?;
            pods.create(&PostParams::default(), &pod).await?;
            set_status(
                &client,
                &format!("big-{i}"),
                &format!("10.42.{}.{}", 10 + i / 200, i % 200 + 2),
                true,
            )
            .await
        }
    });
    for result in futures::future::join_all(creates).await {
        result?;
    }
    let slices = wait_for(&server, "all endpoints in slices", || {
        let slices = slices_of(&server, "big")?;
        let total: usize = slices
            .iter()
            .map(|s| s["endpoints"].as_array().map_or(0, Vec::len))
            .sum();
        Ok((total == count).then_some(slices))
    })
    .await?;
    let mut sizes: Vec<usize> = slices
        .iter()
        .map(|s| s["endpoints"].as_array().map_or(0, Vec::len))
        .collect();
    sizes.sort();
    ensure!(sizes.iter().all(|&n| n <= 100), "{sizes:?}");
    ensure!(
        sizes.len() == 3,
        "230 endpoints fill three slices: {sizes:?}"
    );
    println!(
        "{}",
        server.kubectl_ok(&[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=big"
        ])?
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_service_points_at_the_api_server() -> anyhow::Result<()> {
    let server = Server::start(SKIFF.as_ref(), &["--node-ip", "127.0.0.1"]).await?;
    let legacy = wait_for(&server, "the kubernetes endpoints", || {
        let out = server.kubectl_ok(&[
            "get",
            "endpoints",
            "kubernetes",
            "--ignore-not-found",
            "-o",
            "json",
        ])?;
        if out.trim().is_empty() {
            return Ok(None);
        }
        Ok(Some(serde_json::from_str::<Value>(&out)?))
    })
    .await?;
    let subset = &legacy["subsets"][0];
    ensure!(subset["addresses"][0]["ip"] == "127.0.0.1", "{legacy}");
    ensure!(subset["ports"][0]["port"] == server.port, "{legacy}");
    ensure!(subset["ports"][0]["name"] == "https", "{legacy}");
    let slice = wait_for(&server, "the kubernetes slice", || {
        Ok(slices_of(&server, "kubernetes")?.into_iter().next())
    })
    .await?;
    ensure!(slice["metadata"]["name"] == "kubernetes", "{slice}");
    ensure!(
        slice["endpoints"][0]["addresses"][0] == "127.0.0.1",
        "{slice}"
    );
    ensure!(slice["ports"][0]["port"] == server.port, "{slice}");
    println!(
        "{}",
        server.kubectl_ok(&["get", "endpoints", "kubernetes"])?
    );
    println!(
        "{}",
        server.kubectl_ok(&["get", "endpointslices", "kubernetes"])?
    );
    Ok(())
}

async fn client(server: &Server) -> anyhow::Result<kube::Client> {
    let kubeconfig = kube::config::Kubeconfig::read_from(server.kubeconfig())?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// Plays the node agent: the pod is running with `ip`, ready or not.
async fn set_status(client: &kube::Client, pod: &str, ip: &str, ready: bool) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let status = if ready { "True" } else { "False" };
    let patch = json!({"status": {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": status}],
    }});
    pods.patch_status(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .with_context(|| format!("setting the status of pod {pod}"))?;
    Ok(())
}

/// The EndpointSlices of one Service, through kubectl.
fn slices_of(server: &Server, service: &str) -> anyhow::Result<Vec<Value>> {
    let selector = format!("kubernetes.io/service-name={service}");
    let out = server.kubectl_ok(&["get", "endpointslices", "-l", &selector, "-o", "json"])?;
    let list: Value = serde_json::from_str(&out)?;
    Ok(list["items"].as_array().cloned().unwrap_or_default())
}

/// Every endpoint of a Service's slices: (address, ready, serving,
/// terminating), sorted.
fn endpoints_of(server: &Server, service: &str) -> anyhow::Result<Vec<(String, bool, bool, bool)>> {
    let mut out = Vec::new();
    for slice in slices_of(server, service)? {
        for e in slice["endpoints"].as_array().into_iter().flatten() {
            let c = &e["conditions"];
            out.push((
                e["addresses"][0].as_str().unwrap_or_default().to_owned(),
                c["ready"] == true,
                c["serving"] == true,
                c["terminating"] == true,
            ));
        }
    }
    out.sort();
    Ok(out)
}

/// Polls `check` until it yields a value, for up to a minute.
async fn wait_for<T>(
    server: &Server,
    what: &str,
    mut check: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = match check() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => String::new(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!(
                "timed out waiting for {what}: {last}\n{}",
                server.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
