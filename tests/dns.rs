//! Cluster DNS end to end: a real `skiff server` serving DNS on a loopback
//! port, Services and EndpointSlices made with the real kubectl, and the
//! real `dig` asking. Records appear after creation and go after deletion
//! (the time taken is printed, not asserted: the issue's 1 s is a benchmark
//! figure); readiness comes from EndpointSlice conditions; names
//! outside the cluster go to a test upstream on 127.0.0.9.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use skiff_e2e::dns_upstream;
use skiff_e2e::node::AgentNode;
use skiff_e2e::server::Server;

const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");
const IMAGE: &str = "skiff-test/busybox:1";
/// How long a change may take to show before the test gives up. Only a
/// liveness bound: how long it took is printed.
const VISIBLE_WITHIN: Duration = Duration::from_secs(30);

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec:
  type: ExternalName
  externalName: www.example.org
---
apiVersion: v1
kind: Service
metadata: {name: alias, namespace: kube-public}
spec:
  type: ExternalName
  externalName: web.default.svc.cluster.local
---
apiVersion: v1
kind: Service
metadata: {name: db}
spec:
  clusterIP: None
  ports: [{name: pg, port: 5432}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: db-1
  labels: {kubernetes.io/service-name: db}
addressType: IPv4
ports: [{name: pg, port: 5432, protocol: TCP}]
endpoints:
- {addresses: [10.42.0.10], hostname: db-0, conditions: {ready: true}}
- {addresses: [10.42.0.11], hostname: db-1, conditions: {ready: true}}
- {addresses: [10.42.0.12], hostname: db-2, conditions: {ready: false}}
"#;

/// One dig answer: the status and the answer section's data.
#[derive(Debug)]
struct Dig {
    status: String,
    flags: String,
    answers: Vec<String>,
}

fn dig(port: u16, args: &[&str]) -> anyhow::Result<Dig> {
    let output = Command::new("dig")
        .args(["@127.0.0.1", "-p", &port.to_string(), "+tries=1", "+time=2"])
        .args(args)
        .output()
        .context("running dig (Debian package dnsutils)")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    ensure!(output.status.success(), "dig {args:?} failed: {text}");
    let status = text
        .split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .with_context(|| format!("no status in dig output: {text}"))?
        .to_owned();
    let flags = text
        .split("flags: ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .unwrap_or_default()
        .to_owned();
    let mut answers = Vec::new();
    let mut in_answer = false;
    for line in text.lines() {
        if line.starts_with(";; ANSWER SECTION") {
            in_answer = true;
        } else if line.is_empty() {
            in_answer = false;
        } else if in_answer {
            // name ttl class type data...
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() >= 5 {
                answers.push(format!("{} {}", fields[3], fields[4..].join(" ")));
            }
        }
    }
    answers.sort();
    Ok(Dig {
        status,
        flags,
        answers,
    })
}

/// Polls dig until `check` holds; returns how long it took.
fn until(
    port: u16,
    args: &[&str],
    within: Duration,
    check: impl Fn(&Dig) -> bool,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        let answer = dig(port, args)?;
        if check(&answer) {
            let took = start.elapsed();
            println!("dig {args:?}: as expected after {took:?}");
            return Ok(took);
        }
        if start.elapsed() > within {
            bail!("dig {args:?} still answers {answer:?} after {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_udp_port() -> anyhow::Result<u16> {
    // The server binds TCP and UDP on the port; take one free for both.
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
}

/// The test upstream (`skiff_e2e::dns_upstream`) on 127.0.0.9.
fn start_upstream() -> anyhow::Result<SocketAddr> {
    dns_upstream::start("127.0.0.9:0", None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_dns_with_kubectl_and_dig() -> anyhow::Result<()> {
    let upstream = start_upstream()?;
    let dir = tempfile::Builder::new()
        .prefix("skiff-test-dns-")
        .tempdir()?;
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, format!("nameserver {upstream}\n"))?;
    let port = free_udp_port()?;
    let listen = format!("127.0.0.1:{port}");
    let server = Server::start(
        SKIFF.as_ref(),
        &[
            "--dns-listen",
            &listen,
            "--dns-upstream-resolv-conf",
            resolv.to_str().context("path")?,
        ],
    )
    .await?;
    let p = port;

    // The zone is up once the watches have synced.
    until(
        p,
        &["kubernetes.default.svc.cluster.local", "A"],
        Duration::from_secs(20),
        |d| d.answers.len() == 1,
    )
    .with_context(|| server.log_tail())?;
    let d = dig(p, &["dns-version.cluster.local", "TXT"])?;
    ensure!(d.answers == ["TXT \"1.1.0\""], "{d:?}");
    let d = dig(p, &["kubernetes.default.svc.cluster.local", "A"])?;
    ensure!(d.status == "NOERROR" && d.answers.len() == 1, "{d:?}");
    ensure!(d.flags.contains("aa"), "authoritative: {d:?}");

    server.kubectl_stdin(&["apply", "-f", "-"], SERVICES)?;
    let took = until(
        p,
        &["web.default.svc.cluster.local", "A"],
        VISIBLE_WITHIN,
        |d| d.answers.len() == 1,
    )?;
    println!("ClusterIP Service visible in DNS after {took:?}");
    let ip = server.kubectl_ok(&["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"])?;
    let d = dig(p, &["WEB.Default.svc.Cluster.Local", "A"])?;
    ensure!(d.answers == [format!("A {ip}")], "case-insensitive: {d:?}");
    let d = dig(p, &["_http._tcp.web.default.svc.cluster.local", "SRV"])?;
    ensure!(
        d.answers == ["SRV 0 100 80 web.default.svc.cluster.local."],
        "{d:?}"
    );
    let d = dig(p, &["-x", &ip])?;
    ensure!(d.answers == ["PTR web.default.svc.cluster.local."], "{d:?}");
    let d = dig(p, &["web.default.svc.cluster.local", "AAAA"])?;
    ensure!(
        d.status == "NOERROR" && d.answers.is_empty(),
        "NODATA: {d:?}"
    );
    let d = dig(p, &["+tcp", "web.default.svc.cluster.local", "A"])?;
    ensure!(d.answers == [format!("A {ip}")], "over TCP: {d:?}");
    let d = dig(p, &["web.default.svc.cluster.local", "ANY"])?;
    ensure!(d.status == "REFUSED", "{d:?}");

    // Headless: ready endpoints only, hostnames, SRV, PTR.
    let d = dig(p, &["db.default.svc.cluster.local", "A"])?;
    ensure!(d.answers == ["A 10.42.0.10", "A 10.42.0.11"], "{d:?}");
    let d = dig(p, &["db-1.db.default.svc.cluster.local", "A"])?;
    ensure!(d.answers == ["A 10.42.0.11"], "{d:?}");
    let d = dig(p, &["db-2.db.default.svc.cluster.local", "A"])?;
    ensure!(d.status == "NXDOMAIN", "not ready: {d:?}");
    let d = dig(p, &["_pg._tcp.db.default.svc.cluster.local", "SRV"])?;
    ensure!(
        d.answers
            == [
                "SRV 0 50 5432 db-0.db.default.svc.cluster.local.",
                "SRV 0 50 5432 db-1.db.default.svc.cluster.local."
            ],
        "{d:?}"
    );
    let d = dig(p, &["-x", "10.42.0.10"])?;
    ensure!(
        d.answers == ["PTR db-0.db.default.svc.cluster.local."],
        "{d:?}"
    );
    // db-2 becomes ready.
    server.kubectl_ok(&[
        "patch",
        "endpointslice",
        "db-1",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/endpoints/2/conditions/ready","value":true}]"#,
    ])?;
    let took = until(
        p,
        &["db.default.svc.cluster.local", "A"],
        VISIBLE_WITHIN,
        |d| d.answers.len() == 3,
    )?;
    println!("endpoint readiness visible in DNS after {took:?}");
    // None ready: NXDOMAIN.
    server.kubectl_ok(&[
        "patch", "endpointslice", "db-1", "--type=json",
        "-p", r#"[{"op":"replace","path":"/endpoints","value":[{"addresses":["10.42.0.10"],"conditions":{"ready":false}}]}]"#,
    ])?;
    until(
        p,
        &["db.default.svc.cluster.local", "A"],
        VISIBLE_WITHIN,
        |d| d.status == "NXDOMAIN",
    )?;

    // ExternalName: a CNAME, with the target's addresses for A
    // questions, as CoreDNS: from upstream for an outside name, from the
    // zone for a cluster name (`dig` lists the answers sorted).
    let d = dig(p, &["ext.default.svc.cluster.local", "A"])?;
    ensure!(
        d.answers == ["A 192.0.2.80", "CNAME www.example.org."],
        "{d:?}"
    );
    let d = dig(p, &["ext.default.svc.cluster.local", "TXT"])?;
    ensure!(d.answers == ["CNAME www.example.org."], "{d:?}");
    let d = dig(p, &["alias.kube-public.svc.cluster.local", "A"])?;
    ensure!(
        d.answers
            == [
                format!("A {ip}"),
                "CNAME web.default.svc.cluster.local.".to_owned()
            ],
        "{d:?}"
    );

    // Pod records, search-path guesses, names outside the cluster.
    let d = dig(p, &["10-42-3-4.default.pod.cluster.local", "A"])?;
    ensure!(d.answers == ["A 10.42.3.4"], "{d:?}");
    let d = dig(p, &["www.example.org.default.svc.cluster.local", "A"])?;
    ensure!(d.status == "NXDOMAIN", "{d:?}");
    let d = dig(p, &["www.example.org", "A"])?;
    ensure!(d.answers == ["A 192.0.2.80"], "forwarded: {d:?}");
    let d = dig(p, &["nothing.example.org", "A"])?;
    ensure!(d.status == "NXDOMAIN", "forwarded: {d:?}");

    // Deleted: NXDOMAIN within a second.
    server.kubectl_ok(&["delete", "svc", "web", "--wait=false"])?;
    let took = until(
        p,
        &["web.default.svc.cluster.local", "A"],
        VISIBLE_WITHIN,
        |d| d.status == "NXDOMAIN",
    )?;
    println!("deleted Service gone from DNS after {took:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_answers_truncate_over_udp_and_pods_get_names() -> anyhow::Result<()> {
    let port = free_udp_port()?;
    let listen = format!("127.0.0.1:{port}");
    let server = Server::start(SKIFF.as_ref(), &["--dns-listen", &listen]).await?;
    let endpoints: Vec<String> = (1..=80)
        .map(|i| format!("- {{addresses: [10.42.1.{i}], conditions: {{ready: true}}}}"))
        .collect();
    let manifest = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: many}}\nspec:\n  clusterIP: None\n  ports: [{{port: 80}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: many-1\n  labels: {{kubernetes.io/service-name: many}}\naddressType: IPv4\nendpoints:\n{}\n",
        endpoints.join("\n")
    );
    server.kubectl_stdin(&["apply", "-f", "-"], &manifest)?;
    until(
        port,
        &["+tcp", "many.default.svc.cluster.local", "A"],
        Duration::from_secs(20),
        |d| d.answers.len() == 80,
    )
    .with_context(|| server.log_tail())?;
    let d = dig(
        port,
        &["+noedns", "+ignore", "many.default.svc.cluster.local", "A"],
    )?;
    ensure!(
        d.flags.contains("tc") && d.answers.is_empty(),
        "truncated over UDP: {d:?}"
    );
    // dig retries over TCP by itself when it sees TC.
    let d = dig(port, &["+noedns", "many.default.svc.cluster.local", "A"])?;
    ensure!(d.answers.len() == 80, "{d:?}");

    // A Pod with hostname and subdomain under a headless Service; its IP
    // and readiness come from its status, as the agent would write them.
    server.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: v1\nkind: Service\nmetadata: {name: sub}\nspec:\n  clusterIP: None\n  ports: [{port: 80}]\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: pet}\nspec:\n  hostname: pet-0\n  subdomain: sub\n  containers: [{name: c, image: busybox}]\n",
    )?;
    server.kubectl_ok(&[
        "patch", "pod", "pet", "--subresource=status", "--type=merge",
        "-p", r#"{"status":{"podIP":"10.42.2.7","podIPs":[{"ip":"10.42.2.7"}],"conditions":[{"type":"Ready","status":"True"}]}}"#,
    ])?;
    until(
        port,
        &["pet-0.sub.default.svc.cluster.local", "A"],
        Duration::from_secs(5),
        |d| d.answers == ["A 10.42.2.7"],
    )?;
    Ok(())
}

/// What the in-pod test runs: a Deployment behind a ClusterIP Service, a
/// StatefulSet behind a headless one, and a client pod to ask from.
const IN_POD: &str = r#"
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
      - name: httpd
        image: IMAGE
        imagePullPolicy: IfNotPresent
        command: ["sh", "-c", "mkdir -p /www && echo hello from web > /www/index.html && exec httpd -f -p 8080 -h /www"]
        readinessProbe: {httpGet: {path: /, port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: db}
spec:
  clusterIP: None
  selector: {app: db}
  ports: [{name: pg, port: 5432}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  serviceName: db
  replicas: 1
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      containers:
      - {name: db, image: IMAGE, imagePullPolicy: IfNotPresent, command: [sleep, "3600"]}
---
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  containers:
  - {name: client, image: IMAGE, imagePullPolicy: IfNotPresent, command: [sleep, "3600"]}
"#;

/// The issue's "from inside a pod": busybox's `wget` and `nslookup` in a
/// pod the real agent runs with runc, asking the node's DNS at the
/// cluster DNS address through the pod's resolv.conf.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_find_services_by_name() -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("skiff-test-dns-pod-")
        .tempdir()?;
    // The upstream listens inside the node's namespace, on port 53 as a
    // resolv.conf nameserver must.
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.9\n")?;
    let node = AgentNode::start(
        Path::new(SKIFF),
        &[
            "--dns-upstream-resolv-conf",
            resolv.to_str().context("path")?,
        ],
    )
    .await?;
    dns_upstream::start("127.0.0.9:53", Some(&node.netns.name))?;
    node.import_busybox(Path::new(SKIFF), IMAGE)?;
    node.server
        .kubectl_stdin(&["apply", "-f", "-"], &IN_POD.replace("IMAGE", IMAGE))?;
    for pod in ["client", "db-0"] {
        node.eventually(&format!("{pod} ready"), || {
            let pod = node.pod_json(pod)?;
            let ready = pod["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            Ok(ready.then_some(()))
        })
        .await?;
    }
    node.server
        .kubectl_ok(&["rollout", "status", "deployment/web", "--timeout=120s"])
        .with_context(|| node.server.log_tail())?;

    // The pod asks the cluster DNS address, and busybox's nslookup applies
    // the pod's search path.
    let cluster_ip =
        node.server
            .kubectl_ok(&["get", "svc", "web", "-o", "jsonpath={.spec.clusterIP}"])?;
    let (_, out) = node.server.exec_in("client", &["nslookup", "web"])?;
    ensure!(
        out.contains("Server:\t\t10.43.0.10")
            && out.contains("Name:\tweb.default.svc.cluster.local")
            && out.contains(&format!("Address: {cluster_ip}")),
        "web through the search path from the cluster DNS at 10.43.0.10 is {cluster_ip}: {out}"
    );
    // A Deployment by `http://<svc>`: libc's resolver turns `web` into
    // web.default.svc.cluster.local, the data plane takes the ClusterIP to
    // the pod. (No `-T`: Debian's busybox wget crashes with it.)
    let page = node
        .eventually("wget http://web from the client pod", || {
            let (ok, out) = node
                .server
                .exec_in("client", &["wget", "-qO-", "http://web"])?;
            ensure!(ok, "wget: {out}");
            Ok(Some(out))
        })
        .await?;
    ensure!(page.trim() == "hello from web", "page: {page:?}");

    // The StatefulSet pod's own name under its headless Service.
    let db_ip = node.pod_json("db-0")?["status"]["podIP"]
        .as_str()
        .context("db-0 has no IP")?
        .to_owned();
    let (ok, out) = node.server.exec_in(
        "client",
        &["nslookup", "db-0.db.default.svc.cluster.local."],
    )?;
    ensure!(
        ok && out.contains(&format!("Address: {db_ip}")),
        "db-0.db is {db_ip}: {out}"
    );

    // A name outside the cluster goes to the node's upstream.
    let (ok, out) = node
        .server
        .exec_in("client", &["nslookup", "www.example.org."])?;
    ensure!(
        ok && out.contains("Address: 192.0.2.80"),
        "forwarded: {out}"
    );

    // Gone after deletion.
    node.server.kubectl_ok(&["delete", "service", "web"])?;
    let start = Instant::now();
    node.eventually("web's name to go", || {
        let (_, out) = node
            .server
            .exec_in("client", &["nslookup", "web.default.svc.cluster.local"])?;
        Ok(out.contains("NXDOMAIN").then_some(()))
    })
    .await?;
    println!(
        "deleted Service NXDOMAIN in the pod after {:?}",
        start.elapsed()
    );
    let (ok, out) = node
        .server
        .exec_in("client", &["wget", "-qO-", "-T", "3", "http://web"])?;
    ensure!(!ok, "wget http://web after the Service went: {out}");
    Ok(())
}
