//! The agent's kubelet API with real containers, end to end: a real
//! `skiff server`, the real `kubectl`, and `agent::streaming` serving
//! busybox containers that run under the shim with real runc in a test
//! network namespace. A Node points the API server at the streaming
//! server; pods bound to it name the containers.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use agent::shim::{self, ShimSpec};
use agent::streaming::{self, ContainerRef, Containers, StreamError};
use anyhow::{Context, bail, ensure};
use skiff_e2e::kubectl_async::{self, TIMEOUT as KUBECTL_TIMEOUT};
use skiff_e2e::runc::{BundleOptions, Netns, RuncRoot, busybox_bundle, unique};
use skiff_e2e::server::Server;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");
const NODE: &str = "stream-node";

/// The test's pods: (namespace, pod) → container name → its reference.
#[derive(Default)]
struct Pods(HashMap<(String, String), Vec<(String, ContainerRef)>>);

impl Containers for Pods {
    fn find(
        &self,
        namespace: &str,
        pod: &str,
        container: Option<&str>,
    ) -> Result<ContainerRef, StreamError> {
        let containers = self
            .0
            .get(&(namespace.to_owned(), pod.to_owned()))
            .ok_or_else(|| StreamError::NotFound(format!("pod {pod:?} not found")))?;
        let found = match container {
            Some(name) => containers.iter().find(|(n, _)| n == name),
            None if containers.len() == 1 => containers.first(),
            None => {
                return Err(StreamError::BadRequest(format!(
                    "a container name must be specified for pod {pod}"
                )));
            }
        };
        let (_, found) = found.ok_or_else(|| {
            StreamError::NotFound(format!("container {container:?} not found in pod {pod:?}"))
        })?;
        let mut found = found.clone();
        found.running = shim::running(&found.state_dir);
        Ok(found)
    }
}

/// A server, the streaming server registered as a Node, and two pods on
/// it: `web` (container `app`: prints to stdout and stderr, serves
/// /www on :8080 with busybox httpd, then ticks) and `reader` (container
/// `echo`, with stdin: answers each line it reads).
struct Cluster {
    server: Server,
    specs: Vec<ShimSpec>,
    agent: JoinHandle<()>,
    // Dropped last: containers first, then their namespace.
    _netns: Netns,
    _root: RuncRoot,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.agent.abort();
        for spec in &self.specs {
            let _ = std::process::Command::new("runc")
                .arg("--root")
                .arg(&spec.runtime_root)
                .args(["delete", "--force", &spec.id])
                .stderr(Stdio::null())
                .status();
        }
    }
}

async fn cluster() -> anyhow::Result<Cluster> {
    let server = Server::start(SKIFF.as_ref(), &[]).await?;
    let root = RuncRoot::new()?;
    let netns = Netns::new("skiff-stream")?;
    let web = container(
        &root,
        &netns,
        &[
            "sh",
            "-c",
            "echo line one; echo line two >&2; httpd -p 8080 -h /www; \
             i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.3; done",
        ],
        false,
    )
    .await?;
    let reader = container(
        &root,
        &netns,
        &[
            "sh",
            "-c",
            "while read line; do echo \"got $line\"; done; echo stdin closed",
        ],
        true,
    )
    .await?;
    let mut pods = Pods::default();
    pods.0.insert(
        ("default".into(), "web".into()),
        vec![("app".into(), reference(&web, &netns))],
    );
    pods.0.insert(
        ("default".into(), "reader".into()),
        vec![("echo".into(), reference(&reader, &netns))],
    );

    let tls_dir = server.data_dir().join("server").join("tls");
    let tls = serving_tls(&tls_dir)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let agent = tokio::spawn(streaming::serve(listener, tls, Arc::new(pods)));
    let cluster = Cluster {
        server,
        specs: vec![web, reader],
        agent,
        _netns: netns,
        _root: root,
    };
    let objects = format!(
        r#"
apiVersion: v1
kind: Node
metadata: {{name: {NODE}}}
status:
  addresses:
  - {{type: InternalIP, address: 127.0.0.1}}
  daemonEndpoints:
    kubeletEndpoint: {{Port: {port}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web}}
spec:
  nodeName: {NODE}
  containers: [{{name: app, image: busybox}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: reader}}
spec:
  nodeName: {NODE}
  containers: [{{name: echo, image: busybox, stdin: true, stdinOnce: true}}]
"#
    );
    let s = &cluster.server;
    kubectl_async::ok(s, &["create", "-f", "-"], &[], Some(&objects)).await?;
    for pod in ["web", "reader"] {
        kubectl_async::ok(
            s,
            &[
                "patch",
                "pod",
                pod,
                "--subresource=status",
                "--type=merge",
                "-p",
                r#"{"status":{"phase":"Running"}}"#,
            ],
            &[],
            None,
        )
        .await?;
    }
    Ok(cluster)
}

async fn container(
    root: &RuncRoot,
    netns: &Netns,
    args: &[&str],
    stdin: bool,
) -> anyhow::Result<ShimSpec> {
    let id = unique("skiff-stream");
    let bundle = root.subdir(&format!("{id}/bundle"))?;
    busybox_bundle(
        &bundle,
        &BundleOptions {
            args,
            tty: false,
            netns: Some(&netns.path()),
        },
    )?;
    let spec = ShimSpec {
        bundle,
        runtime: PathBuf::from("runc"),
        runtime_root: root.root(),
        log_path: root.subdir(&format!("{id}/logs"))?.join("0.log"),
        state_dir: root.subdir(&format!("{id}/state"))?,
        tty: false,
        stdin,
        stdin_once: stdin,
        max_log_bytes: 1024 * 1024,
        max_log_files: 3,
        id,
    };
    shim::spawn(SKIFF.as_ref(), &spec).await?;
    Ok(spec)
}

fn reference(spec: &ShimSpec, netns: &Netns) -> ContainerRef {
    ContainerRef {
        id: spec.id.clone(),
        runtime: spec.runtime.clone(),
        runtime_root: spec.runtime_root.clone(),
        log_path: spec.log_path.clone(),
        previous_log_path: None,
        state_dir: spec.state_dir.clone(),
        netns: Some(netns.path()),
        tty: spec.tty,
        stdin: spec.stdin,
        running: true,
    }
}

/// The agent's serving certificate from the cluster's server CA (the API
/// server checks it) and the client CA it trusts (the API server's
/// client certificate comes from it).
fn serving_tls(tls_dir: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])?;
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let ca_cert = std::fs::read_to_string(tls_dir.join("server-ca.crt"))?;
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(tls_dir.join("server-ca.key"))?)?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_cert, ca_key)?;
    let cert = params.signed_by(&key, &issuer)?;
    let client_ca = std::fs::read(tls_dir.join("client-ca.crt"))?;
    Ok(streaming::tls_config(
        cert.pem().as_bytes(),
        key.serialize_pem().as_bytes(),
        &client_ca,
    )?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_logs_reads_the_container_s_cri_log() -> anyhow::Result<()> {
    let c = cluster().await?;
    let s = &c.server;
    let out = wait_for(s, &["logs", "web"], |out| out.contains("tick 1")).await?;
    // stdout and stderr reach the log through separate pipes, so only the
    // order within each stream is given.
    let stdout: Vec<&str> = out.lines().filter(|l| *l != "line two").collect();
    ensure!(
        out.lines().any(|l| l == "line two") && stdout.starts_with(&["line one", "tick 0"]),
        "{out:?}"
    );

    let out = kubectl_async::ok(s, &["logs", "web", "--tail=1", "--timestamps"], &[], None).await?;
    let (time, text) = out
        .trim_end()
        .split_once(' ')
        .with_context(|| format!("{out:?}"))?;
    ensure!(text.starts_with("tick "), "{out:?}");
    ensure!(
        time.len() == 30 && time.ends_with('Z'),
        "not RFC 3339 with nanoseconds: {time}"
    );
    let out = kubectl_async::ok(s, &["logs", "web", "--limit-bytes=6"], &[], None).await?;
    ensure!(out == "line o", "{out:?}");

    // -f: new lines arrive as the container writes them.
    let mut follow = kubectl_async::command(s, &["logs", "-f", "--tail=1", "web"], &[])
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = follow.stdout.take().context("kubectl stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let mut ticks = Vec::new();
    while ticks.len() < 4 {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .context("no followed log line in time")??
            .context("kubectl logs -f ended")?;
        let n: u64 = line
            .strip_prefix("tick ")
            .with_context(|| format!("{line:?}"))?
            .parse()?;
        ticks.push(n);
    }
    ensure!(
        ticks.windows(2).all(|w| w[1] == w[0] + 1),
        "lines lost or repeated: {ticks:?}"
    );
    follow.kill().await?;

    let err = kubectl_async::err(s, &["logs", "web", "--previous"], &[], None).await?;
    ensure!(
        err.contains(r#"previous terminated container "app" in pod "web" not found"#),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_exec_runs_in_the_container() -> anyhow::Result<()> {
    let c = cluster().await?;
    let s = &c.server;
    let script = "echo out; echo err >&2; exit 3";
    for env in [None, Some(("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false"))] {
        let env: Vec<(&str, &str)> = env.into_iter().collect();
        let output =
            kubectl_async::output(s, &["exec", "web", "--", "sh", "-c", script], &env, None)
                .await?;
        ensure!(output.status.code() == Some(3), "{output:?}");
        ensure!(
            String::from_utf8_lossy(&output.stdout) == "out\n",
            "{output:?}"
        );
        ensure!(
            String::from_utf8_lossy(&output.stderr).contains("err\n"),
            "{output:?}"
        );

        let input = "through runc exec\nand back\n";
        let out =
            kubectl_async::ok(s, &["exec", "-i", "web", "--", "cat"], &env, Some(input)).await?;
        ensure!(out == input, "{out:?}");
    }
    // The pod's own network: httpd answers on the pod's loopback.
    let out = kubectl_async::ok(
        s,
        &[
            "exec",
            "web",
            "--",
            "busybox",
            "wget",
            "-qO-",
            "http://127.0.0.1:8080/index.html",
        ],
        &[],
        None,
    )
    .await?;
    ensure!(out.contains("hello from the pod"), "{out:?}");

    // A terminal: kubectl needs one itself, so it runs under script(1).
    let command = format!(
        "kubectl --kubeconfig {} exec -it web -- sh -c 'tty; stty size; exit 5'",
        s.kubeconfig().display()
    );
    let output = tokio::time::timeout(
        KUBECTL_TIMEOUT,
        tokio::process::Command::new("script")
            .args(["-qec", &command, "/dev/null"])
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .context("kubectl exec -it timed out")??;
    let out = String::from_utf8_lossy(&output.stdout);
    ensure!(
        out.contains("/dev/pts/"),
        "no terminal in the container: {out:?}"
    );
    ensure!(output.status.code() == Some(5), "{output:?}");

    let err = kubectl_async::err(s, &["exec", "web", "--", "no-such-binary"], &[], None).await?;
    ensure!(err.contains("no-such-binary"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_attach_and_port_forward() -> anyhow::Result<()> {
    let c = cluster().await?;
    let s = &c.server;

    // Attach with stdin: the container answers; closing stdin (stdinOnce)
    // ends its loop.
    let out =
        kubectl_async::ok(s, &["attach", "-i", "reader"], &[], Some("first\nsecond\n")).await?;
    ensure!(out.contains("got first\ngot second\n"), "{out:?}");
    let reader = &c.specs[1];
    let status = tokio::time::timeout(Duration::from_secs(20), shim::wait(&reader.state_dir))
        .await
        .context("the container's stdin stayed open")??;
    ensure!(status.code == 0, "{status:?}");
    let out = kubectl_async::ok(s, &["logs", "reader"], &[], None).await?;
    ensure!(out.ends_with("stdin closed\n"), "{out:?}");

    // Port-forward to httpd in the pod's network namespace, over
    // kubectl's default (SPDY in a WebSocket) and plain SPDY.
    for env in [None, Some(("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false"))] {
        let env: Vec<(&str, &str)> = env.into_iter().collect();
        let mut forward = kubectl_async::command(
            s,
            &["port-forward", "--address", "127.0.0.1", "pod/web", ":8080"],
            &env,
        )
        .stdout(Stdio::piped())
        .spawn()?;
        let stdout = forward.stdout.take().context("kubectl stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let port = loop {
            let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await
                .context("kubectl port-forward did not start")??
                .context("kubectl port-forward ended")?;
            if let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:") {
                break rest
                    .split_whitespace()
                    .next()
                    .context("no port")?
                    .parse::<u16>()?;
            }
        };
        let drain: JoinHandle<()> =
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        for _ in 0..2 {
            let answer = tokio::time::timeout(Duration::from_secs(30), http_get(port))
                .await
                .context("port-forward round trip timed out")??;
            ensure!(answer.contains("hello from the pod"), "{answer:?}");
        }
        forward.kill().await?;
        drain.abort();
    }
    Ok(())
}

async fn http_get(port: u16) -> anyhow::Result<String> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).await?;
    conn.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").await?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await?;
    Ok(answer)
}

/// Runs kubectl until its output satisfies `done` (logs fill in over time).
async fn wait_for(
    server: &Server,
    args: &[&str],
    done: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = kubectl_async::ok(server, args, &[], None).await?;
        if done(&out) {
            return Ok(out);
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "kubectl {} never showed what was expected: {out:?}",
                args.join(" ")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
