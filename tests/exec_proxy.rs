//! `kubectl logs`, `exec`, `attach` and `port-forward` through a real
//! `skiff server` to a fake node agent: the API server must find the pod's
//! node, reach its agent over verified TLS, build the kubelet request, and
//! stream or splice what comes back — with the real kubectl on the other
//! end, on each protocol it speaks (WebSocket, SPDY, SPDY in WebSocket).

mod exec_proxy {
    // The fake's resource metrics are for the autoscaler test.
    #![allow(dead_code)]
    pub mod kubelet;
}

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, ensure};
use exec_proxy::kubelet::{FakeKubelet, Identity};
use skiff_e2e::kubectl_async;
use skiff_e2e::server::Server;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");

/// A server, the fake agent registered as Node `fake-node`, and pods:
/// `web` (one container `app`, Running), `multi` (containers `a`, `b`),
/// `broken` (its agent says it has not started) on that node, and
/// `pending` on none.
struct Cluster {
    server: Server,
    kubelet: FakeKubelet,
    _echo: Echo,
}

async fn cluster() -> anyhow::Result<Cluster> {
    let server = Server::start(SKIFF.as_ref(), &[]).await?;
    let echo = Echo::start().await?;
    let tls_dir = server.data_dir().join("server").join("tls");
    let kubelet = FakeKubelet::start(&tls_dir, Identity::ClusterCa, echo.addr).await?;
    register_node(&server, "fake-node", kubelet.port).await?;
    let pods = r#"
apiVersion: v1
kind: Pod
metadata: {name: web}
spec:
  nodeName: fake-node
  containers: [{name: app, image: busybox}]
---
apiVersion: v1
kind: Pod
metadata: {name: multi}
spec:
  nodeName: fake-node
  containers: [{name: a, image: busybox}, {name: b, image: busybox}]
---
apiVersion: v1
kind: Pod
metadata: {name: broken}
spec:
  nodeName: fake-node
  containers: [{name: app, image: busybox}]
---
apiVersion: v1
kind: Pod
metadata: {name: pending}
spec:
  containers: [{name: app, image: busybox}]
"#;
    kubectl_async::ok(&server, &["create", "-f", "-"], &[], Some(pods)).await?;
    // kubectl port-forward wants a running pod; the agent would say so.
    kubectl_async::ok(
        &server,
        &[
            "patch",
            "pod",
            "web",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"phase":"Running"}}"#,
        ],
        &[],
        None,
    )
    .await?;
    Ok(Cluster {
        server,
        kubelet,
        _echo: echo,
    })
}

/// A Node whose agent listens on 127.0.0.1:`port`, as an agent registers
/// itself (status included).
async fn register_node(server: &Server, name: &str, port: u16) -> anyhow::Result<()> {
    let node = format!(
        r#"
apiVersion: v1
kind: Node
metadata: {{name: {name}}}
status:
  addresses:
  - {{type: InternalIP, address: 127.0.0.1}}
  - {{type: Hostname, address: {name}}}
  daemonEndpoints:
    kubeletEndpoint: {{Port: {port}}}
"#
    );
    kubectl_async::ok(server, &["create", "-f", "-"], &[], Some(&node)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_stream_from_the_node_agent() -> anyhow::Result<()> {
    let c = cluster().await?;
    let s = &c.server;

    let out = kubectl_async::ok(s, &["logs", "web"], &[], None).await?;
    ensure!(out == "log line 1 of app\nlog line 2 of app\n", "{out:?}");
    kubectl_async::ok(
        s,
        &[
            "logs",
            "web",
            "--tail=1",
            "--timestamps",
            "--limit-bytes=100",
            "--since=1h",
        ],
        &[],
        None,
    )
    .await?;
    let seen = c.kubelet.seen();
    ensure!(
        seen.iter().any(|r| r
            == "GET /containerLogs/default/web/app?timestamps=true&sinceSeconds=3600&tailLines=1&limitBytes=100"),
        "kubelet saw {seen:#?}"
    );

    // -f: lines arrive while the agent is still writing, and when kubectl
    // goes, the API server lets go of the agent's stream too.
    let mut follow = kubectl_async::command(s, &["logs", "-f", "web"], &[])
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = follow.stdout.take().context("kubectl stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    for expected in ["tick 0", "tick 1", "tick 2"] {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .context("no streamed log line in time")??;
        ensure!(
            line.as_deref() == Some(expected),
            "{line:?}, wanted {expected}"
        );
    }
    follow.kill().await?;
    ensure!(
        c.kubelet.follow_ended(Duration::from_secs(20)).await,
        "the agent's log stream stayed open after kubectl left"
    );

    // As upstream: the API server names the choices, and an unscheduled
    // pod has no logs yet (204).
    let err = kubectl_async::err(
        s,
        &["get", "--raw", "/api/v1/namespaces/default/pods/multi/log"],
        &[],
        None,
    )
    .await?;
    ensure!(
        err.contains("a container name must be specified for pod multi, choose one of: [a b]"),
        "{err}"
    );
    let err = kubectl_async::err(s, &["logs", "multi", "-c", "c"], &[], None).await?;
    ensure!(
        err.contains("container c is not valid for pod multi"),
        "{err}"
    );
    let out = kubectl_async::ok(s, &["logs", "multi", "-c", "b"], &[], None).await?;
    ensure!(out.contains("log line 1 of b"), "{out}");
    let out = kubectl_async::ok(s, &["logs", "pending"], &[], None).await?;
    ensure!(out.is_empty(), "{out:?}");
    let err = kubectl_async::err(s, &["logs", "ghost"], &[], None).await?;
    ensure!(err.contains(r#"pods "ghost" not found"#), "{err}");
    let err = kubectl_async::err(
        s,
        &[
            "get",
            "--raw",
            "/api/v1/namespaces/default/pods/web/log?tailLines=-2",
        ],
        &[],
        None,
    )
    .await?;
    ensure!(err.contains("tailLines: Invalid value"), "{err}");

    // The agent's own refusal, in plain text, reaches kubectl as a Status.
    let err = kubectl_async::err(s, &["logs", "broken"], &[], None).await?;
    ensure!(
        err.contains(r#"container "app" in pod "broken" is waiting to start: ContainerCreating"#),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_that_cannot_be_reached_or_trusted() -> anyhow::Result<()> {
    let c = cluster().await?;
    let s = &c.server;

    // Nothing listens: 503 with the reason.
    let closed = TcpListener::bind("127.0.0.1:0").await?;
    let closed_port = closed.local_addr()?.port();
    drop(closed);
    register_node(s, "gone-node", closed_port).await?;
    // A listener with a certificate outside the cluster CA.
    let echo = Echo::start().await?;
    let tls_dir = s.data_dir().join("server").join("tls");
    let impostor = FakeKubelet::start(&tls_dir, Identity::SelfSigned, echo.addr).await?;
    register_node(s, "impostor-node", impostor.port).await?;
    let pods = r#"
apiVersion: v1
kind: Pod
metadata: {name: orphan}
spec:
  nodeName: gone-node
  containers: [{name: app, image: busybox}]
---
apiVersion: v1
kind: Pod
metadata: {name: lured}
spec:
  nodeName: impostor-node
  containers: [{name: app, image: busybox}]
"#;
    kubectl_async::ok(s, &["create", "-f", "-"], &[], Some(pods)).await?;

    let err = kubectl_async::err(s, &["logs", "orphan"], &[], None).await?;
    ensure!(err.contains("ServiceUnavailable"), "{err}");
    ensure!(err.contains("error dialing backend"), "{err}");
    ensure!(err.contains(&format!("127.0.0.1:{closed_port}")), "{err}");

    let err = kubectl_async::err(s, &["logs", "lured"], &[], None).await?;
    ensure!(err.contains("TLS handshake failed"), "{err}");
    ensure!(
        impostor.seen().is_empty(),
        "a request reached the untrusted agent: {:?}",
        impostor.seen()
    );
    let err = kubectl_async::err(s, &["exec", "lured", "--", "echo", "hi"], &[], None).await?;
    ensure!(err.contains("TLS handshake failed"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_and_attach_through_the_node_agent() -> anyhow::Result<()> {
    let c = cluster().await?;
    let s = &c.server;

    // WebSocket, v5.
    let out = kubectl_async::ok(s, &["exec", "web", "--", "echo", "hi"], &[], None).await?;
    ensure!(out == "hi\n", "{out:?}");
    let seen = c.kubelet.seen();
    ensure!(
        seen.iter().any(|r| r
            == "GET /exec/default/web/app?output=1&error=1&command=echo&command=hi websocket:v5.channel.k8s.io"),
        "kubelet saw {seen:#?}"
    );
    let input = "through the splice\nand back\n";
    let out = kubectl_async::ok(s, &["exec", "-i", "web", "--", "cat"], &[], Some(input)).await?;
    ensure!(out == input, "{out:?}");
    let output = kubectl_async::output(s, &["exec", "web", "--", "false"], &[], None).await?;
    ensure!(output.status.code() == Some(1), "{output:?}");
    let err = String::from_utf8_lossy(&output.stderr);
    ensure!(err.contains("command terminated with exit code 1"), "{err}");

    // SPDY, as kubectl falls back to (or is told to use).
    let spdy = [("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")];
    let out = kubectl_async::ok(
        s,
        &["exec", "web", "--", "echo", "over", "spdy"],
        &spdy,
        None,
    )
    .await?;
    ensure!(out == "over spdy\n", "{out:?}");
    let out = kubectl_async::ok(s, &["exec", "-i", "web", "--", "cat"], &spdy, Some(input)).await?;
    ensure!(out == input, "{out:?}");
    let seen = c.kubelet.seen();
    ensure!(
        seen.iter()
            .any(|r| r.starts_with("POST /exec/default/web/app?")
                && r.ends_with(" spdy:v4.channel.k8s.io")),
        "kubelet saw {seen:#?}"
    );

    let out = kubectl_async::ok(s, &["attach", "web"], &[], None).await?;
    ensure!(out.contains("attached to app"), "{out:?}");
    ensure!(
        c.kubelet
            .seen()
            .iter()
            .any(|r| r.starts_with("GET /attach/default/web/app?output=1&error=1 websocket:")),
        "kubelet saw {:#?}",
        c.kubelet.seen()
    );

    let err = kubectl_async::err(s, &["exec", "pending", "--", "echo"], &[], None).await?;
    ensure!(
        err.contains("pod pending does not have a host assigned"),
        "{err}"
    );
    let err =
        kubectl_async::err(s, &["exec", "multi", "-c", "nope", "--", "echo"], &[], None).await?;
    ensure!(
        err.contains("container nope is not valid for pod multi"),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_forward_through_the_node_agent() -> anyhow::Result<()> {
    let c = cluster().await?;
    let s = &c.server;

    // SPDY tunnelled in a WebSocket (kubectl's default), then plain SPDY.
    for (env, protocol) in [
        (
            None,
            "GET /portForward/default/web websocket:SPDY/3.1+portforward.k8s.io",
        ),
        (
            Some(("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false")),
            "POST /portForward/default/web spdy:portforward.k8s.io",
        ),
    ] {
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
            // "Forwarding from 127.0.0.1:PORT -> 8080"
            if let Some(rest) = line.strip_prefix("Forwarding from 127.0.0.1:") {
                break rest
                    .split_whitespace()
                    .next()
                    .context("no port")?
                    .parse::<u16>()?;
            }
        };
        // Drain kubectl's "Handling connection" lines so it never blocks.
        let drain: JoinHandle<()> =
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        for round in 0..2 {
            let message = format!("ping {round} via {protocol}");
            let answer =
                tokio::time::timeout(Duration::from_secs(30), echo_through(port, &message))
                    .await
                    .context("port-forward round trip timed out")??;
            ensure!(answer == message, "{answer:?}");
        }
        forward.kill().await?;
        drain.abort();
        let seen = c.kubelet.seen();
        ensure!(seen.iter().any(|r| r == protocol), "kubelet saw {seen:#?}");
    }
    Ok(())
}

/// Sends `message` to the forwarded port, half-closes, and reads the
/// answer to the end.
async fn echo_through(port: u16, message: &str) -> anyhow::Result<String> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).await?;
    conn.write_all(message.as_bytes()).await?;
    conn.shutdown().await?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer).await?;
    Ok(answer)
}

/// A TCP echo server standing in for the pod's port.
struct Echo {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Echo {
    async fn start() -> anyhow::Result<Echo> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = conn.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        Ok(Echo { addr, task })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}
