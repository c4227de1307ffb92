//! The agent's kubelet API end to end: a real `skiff server` with its
//! agent in a network namespace of its own, busybox pods run by real runc,
//! and the real kubectl for logs, exec, attach, port-forward and top. The
//! agent's serving certificate comes from the server's CA and the API
//! server finds it through the Node's `daemonEndpoints`.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use skiff_e2e::kubectl_async::{self, TIMEOUT as KUBECTL_TIMEOUT};
use skiff_e2e::node::AgentNode;
use tokio::io::{AsyncBufReadExt, BufReader};

const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");
const IMAGE: &str = "skiff-test/busybox:1";

/// `web` prints to stdout and stderr, serves /www on :8080 with httpd,
/// then ticks; `reader` answers each line on its stdin until it closes;
/// `crasher` prints its run and fails, so it has a previous run.
const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: IMAGE
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "mkdir -p /www && echo hello from the pod > /www/index.html && echo line one && echo line two >&2 && httpd -p 8080 -h /www && i=0 && while true; do echo tick $i; i=$((i+1)); sleep 0.3; done"]
---
apiVersion: v1
kind: Pod
metadata: {name: reader}
spec:
  terminationGracePeriodSeconds: 1
  restartPolicy: Never
  containers:
  - name: echo
    image: IMAGE
    imagePullPolicy: IfNotPresent
    stdin: true
    stdinOnce: true
    command: ["sh", "-c", "while read line; do echo \"got $line\"; done; echo stdin closed"]
---
apiVersion: v1
kind: Pod
metadata: {name: crasher}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: IMAGE
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "echo run at $(date +%s%N); sleep 1; exit 1"]
"#;

/// A node with the busybox image imported and the three pods created.
async fn node_with_pods() -> anyhow::Result<AgentNode> {
    let node = AgentNode::start(Path::new(SKIFF), &[]).await?;
    node.import_busybox(Path::new(SKIFF), IMAGE)?;
    node.server
        .kubectl_stdin(&["apply", "-f", "-"], &PODS.replace("IMAGE", IMAGE))?;
    for pod in ["web", "reader"] {
        node.eventually(&format!("{pod} running"), || {
            let pod = node.pod_json(pod)?;
            Ok(pod["status"]["containerStatuses"][0]["state"]["running"]
                .is_object()
                .then_some(()))
        })
        .await?;
    }
    Ok(node)
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_logs_of_real_containers() -> anyhow::Result<()> {
    let node = node_with_pods().await?;
    let out = wait_for_output(&node, &["logs", "web"], |out| out.contains("tick 1")).await?;
    ensure!(
        out.contains("line one\n") && out.contains("line two\n") && out.contains("tick 0\n"),
        "{out:?}"
    );
    let out = kubectl_async::ok(
        &node.server,
        &["logs", "web", "-c", "app", "--tail=1"],
        &[],
        None,
    )
    .await?;
    ensure!(
        out.lines().count() == 1 && out.starts_with("tick "),
        "{out:?}"
    );

    // -f: new lines arrive as the container writes them, in order.
    let mut follow = kubectl_async::command(&node.server, &["logs", "-f", "--tail=1", "web"], &[])
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

    // --previous: the run before the current one, which differs from it.
    let err = kubectl_async::err(&node.server, &["logs", "web", "--previous"], &[], None).await?;
    ensure!(
        err.contains(r#"previous terminated container "app" in pod "web" not found"#),
        "{err}"
    );
    node.eventually("crasher restarted", || {
        let pod = node.pod_json("crasher")?;
        let restarts = pod["status"]["containerStatuses"][0]["restartCount"]
            .as_u64()
            .unwrap_or(0);
        Ok((restarts >= 1).then_some(()))
    })
    .await?;
    let previous =
        kubectl_async::ok(&node.server, &["logs", "crasher", "--previous"], &[], None).await?;
    ensure!(previous.starts_with("run at "), "{previous:?}");
    let current = wait_for_output(&node, &["logs", "crasher"], |out| {
        out.starts_with("run at ")
    })
    .await?;
    ensure!(
        previous != current,
        "previous and current run: {previous:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_exec_attach_and_port_forward_on_real_containers() -> anyhow::Result<()> {
    let node = node_with_pods().await?;
    let out = kubectl_async::ok(
        &node.server,
        &["exec", "web", "--", "echo", "hi"],
        &[],
        None,
    )
    .await?;
    ensure!(out == "hi\n", "{out:?}");

    // WebSocket (kubectl's default) and SPDY.
    for env in [None, Some(("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false"))] {
        let env: Vec<(&str, &str)> = env.into_iter().collect();
        let script = "echo out; echo err >&2; exit 3";
        let output = kubectl_async::output(
            &node.server,
            &["exec", "web", "--", "sh", "-c", script],
            &env,
            None,
        )
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
        let out = kubectl_async::ok(
            &node.server,
            &["exec", "-i", "web", "--", "cat"],
            &env,
            Some(input),
        )
        .await?;
        ensure!(out == input, "exec -i cat over {env:?}: {out:?}");
    }

    // A terminal: kubectl needs one itself, so it runs under script(1).
    let command = format!(
        "nsenter --net=/run/netns/{} kubectl --kubeconfig {} exec -it web -- sh -c 'tty; exit 5'",
        node.netns.name,
        node.server.kubeconfig().display()
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
    ensure!(out.contains("/dev/pts/"), "no terminal: {out:?}");
    ensure!(output.status.code() == Some(5), "{output:?}");

    // Attach with stdin: the container answers; closing stdin (stdinOnce)
    // ends its loop and the container.
    let output = kubectl_async::output(
        &node.server,
        &["attach", "-i", "reader"],
        &[],
        Some("first\nsecond\n"),
    )
    .await?;
    let out = String::from_utf8_lossy(&output.stdout);
    ensure!(
        out.contains("got first\ngot second\n"),
        "{output:?}\nlogs: {:?}\n{}",
        kubectl_async::ok(&node.server, &["logs", "reader"], &[], None).await,
        node.server.log_tail()
    );
    node.eventually("reader to finish", || {
        let pod = node.pod_json("reader")?;
        let terminated = &pod["status"]["containerStatuses"][0]["state"]["terminated"];
        Ok((terminated["exitCode"] == 0).then_some(()))
    })
    .await?;
    let out = kubectl_async::ok(&node.server, &["logs", "reader"], &[], None).await?;
    ensure!(out.ends_with("stdin closed\n"), "{out:?}");

    // httpd answers inside the pod.
    let out = kubectl_async::ok(
        &node.server,
        &[
            "exec",
            "web",
            "--",
            "wget",
            "-qO-",
            "http://127.0.0.1:8080/index.html",
        ],
        &[],
        None,
    )
    .await?;
    ensure!(out == "hello from the pod\n", "{out:?}");

    // Port-forward to httpd in the pod, over SPDY in a WebSocket and plain
    // SPDY; the forwarded port is on the node's loopback.
    for env in [None, Some(("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false"))] {
        let env: Vec<(&str, &str)> = env.into_iter().collect();
        let mut forward =
            kubectl_async::command(&node.server, &["port-forward", "pod/web", ":8080"], &env)
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
                    .to_owned();
            }
        };
        let drain = tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        for _ in 0..2 {
            let port: u16 = port.parse()?;
            let answer = skiff_e2e::netns::enter(&node.netns.name, || http_get(port))?;
            let body = match answer {
                Ok(body) => body,
                Err(e) => {
                    forward.kill().await?;
                    let mut err = String::new();
                    if let Some(mut stderr) = forward.stderr.take() {
                        use tokio::io::AsyncReadExt;
                        stderr.read_to_string(&mut err).await?;
                    }
                    bail!("{e:#}\nkubectl port-forward ({env:?}): {err}");
                }
            };
            let body = body
                .split_once("\r\n\r\n")
                .map(|(_, body)| body.to_owned())
                .with_context(|| format!("not an HTTP answer: {body:?}"))?;
            ensure!(body == "hello from the pod\n", "{body:?}");
        }
        forward.kill().await?;
        drain.abort();
    }
    Ok(())
}

/// GET /index.html from 127.0.0.1:`port` (in the calling thread's
/// network namespace), with a deadline.
fn http_get(port: u16) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port))?;
    conn.set_read_timeout(Some(Duration::from_secs(20)))?;
    conn.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    Ok(answer)
}

/// Runs kubectl until its output satisfies `done` (logs fill in over time).
async fn wait_for_output(
    node: &AgentNode,
    args: &[&str],
    done: impl Fn(&str) -> bool,
) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = kubectl_async::ok(&node.server, args, &[], None).await?;
        if done(&out) {
            return Ok(out);
        }
        if Instant::now() > deadline {
            bail!(
                "kubectl {} never showed what was expected: {out:?}",
                args.join(" ")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kubectl_top_shows_usage_from_the_pod_cgroups() -> anyhow::Result<()> {
    let node = AgentNode::start(Path::new(SKIFF), &["--metric-resolution", "2s"]).await?;
    node.import_busybox(Path::new(SKIFF), IMAGE)?;
    // A container that spins, and one that sleeps.
    let manifest = r#"
apiVersion: v1
kind: Pod
metadata: {name: busy}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: spin
    image: IMAGE
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "while true; do :; done"]
  - name: idle
    image: IMAGE
    imagePullPolicy: IfNotPresent
    command: ["sleep", "3600"]
"#
    .replace("IMAGE", IMAGE);
    node.server
        .kubectl_stdin(&["apply", "-f", "-"], &manifest)?;
    // `kubectl top pod --containers`: NAME CPU(cores) MEMORY(bytes) per
    // container, once two scrapes have given a rate.
    let (spin_millis, idle_millis) = node
        .eventually("container usage in kubectl top", || {
            let out =
                node.server
                    .kubectl_ok(&["top", "pod", "busy", "--containers", "--no-headers"])?;
            let mut spin = None;
            let mut idle = None;
            for line in out.lines() {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let [_, container, cpu, memory] = fields.as_slice() else {
                    bail!("unexpected kubectl top line {line:?}");
                };
                let millis: u64 = cpu.trim_end_matches('m').parse()?;
                let memory_ok = memory.trim_end_matches("Mi").parse::<u64>().is_ok();
                ensure!(memory_ok, "memory column {memory:?}");
                match *container {
                    "spin" => spin = Some(millis),
                    "idle" => idle = Some(millis),
                    _ => {}
                }
            }
            Ok(spin.zip(idle).filter(|(spin, _)| *spin > 0))
        })
        .await?;
    eprintln!("kubectl top: spin {spin_millis}m, idle {idle_millis}m");
    ensure!(
        spin_millis > idle_millis,
        "the spinning container used no more CPU than the idle one: {spin_millis}m vs {idle_millis}m"
    );
    let out = node.server.kubectl_ok(&["top", "node", "--no-headers"])?;
    let fields: Vec<&str> = out.split_whitespace().collect();
    ensure!(
        fields.first() == Some(&node.node_name().as_str()) && fields.len() >= 5,
        "{out:?}"
    );
    let node_millis: u64 = fields[1].trim_end_matches('m').parse()?;
    ensure!(node_millis > 0, "{out:?}");
    Ok(())
}
