//! Services through the data plane (its own engine, or the nftables
//! backend for connections from local pods), across three nodes, each
//! a network namespace running `skiff dataplane`: the real EndpointSlice
//! controller builds the slices from Pod objects (the test plays the node
//! agent and reports each pod's address and readiness), every node's
//! engine watches them, and clients in pod namespaces reach the ClusterIPs
//! with real sockets.
//!
//! Backends: `web-1` on node 1, `web-2` on node 2, `web-3` on node 3, each
//! a TCP server answering with its name and a UDP echo server; the client
//! pod runs on node 1, so its flows reach one endpoint on its own node and
//! two across the overlay. Node 1's own namespace is a client too (a
//! host process).

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use skiff_e2e::cluster::{Cluster, Pod};
use skiff_e2e::netns::Netns;

const SKIFF: &str = env!("CARGO_BIN_EXE_skiff");
const HTTP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 5353;
const REQUESTS: usize = 3_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_ips_balance_pin_hairpin_and_refuse_in_the_engine() -> anyhow::Result<()> {
    cluster_ips_balance_pin_hairpin_and_refuse("engine").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_ips_balance_pin_hairpin_and_refuse_with_nftables() -> anyhow::Result<()> {
    cluster_ips_balance_pin_hairpin_and_refuse("nftables").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_ips_balance_pin_hairpin_and_refuse_at_connect() -> anyhow::Result<()> {
    cluster_ips_balance_pin_hairpin_and_refuse("socket").await
}

/// The same checks whichever backend takes connections from local pods
/// (`--service-backend`).
async fn cluster_ips_balance_pin_hairpin_and_refuse(backend: &str) -> anyhow::Result<()> {
    let mut cluster = start_cluster(3, backend).await?;
    for (name, node) in [("web-1", 0), ("web-2", 1), ("web-3", 2)] {
        cluster.add_pod(node, name)?;
        serve(cluster.pod(name))?;
    }
    cluster.add_pod(0, "client")?;
    cluster.add_pod(1, "client-2")?;

    cluster
        .server()
        .kubectl_stdin(&["apply", "-f", "-"], MANIFESTS)?;
    for (name, node) in [("web-1", 1), ("web-2", 2), ("web-3", 3)] {
        create_pod_object(&cluster, name, node)?;
        cluster.set_pod_status(name, cluster.pod(name).ip, true)?;
    }
    let web = cluster.cluster_ip("web")?;
    let sticky = cluster.cluster_ip("web-sticky")?;
    let echo = cluster.cluster_ip("echo")?;
    let hairpin = cluster.cluster_ip("hairpin")?;
    let empty = cluster.cluster_ip("empty")?;
    let vip = |ip: Ipv4Addr, port: u16| SocketAddr::from((ip, port));

    // Every node's engine knows the Service and its three endpoints.
    wait_until(
        &cluster,
        "all three endpoints answer through the ClusterIP",
        || {
            let seen = spread(cluster.pod("client"), vip(web, 80), 60)?;
            Ok(seen.len() == 3)
        },
    )
    .await?;

    // 3,000 fresh connections from node 1: one endpoint is local, two are
    // across the overlay; each gets close to a third.
    for client_pod in ["client", "client-2"] {
        let seen = spread(cluster.pod(client_pod), vip(web, 80), REQUESTS)?;
        eprintln!("{client_pod}: {REQUESTS} requests through {web}:80 went to {seen:?}");
        ensure!(
            seen.len() == 3,
            "{client_pod}: not every endpoint served: {seen:?}"
        );
        for (name, n) in &seen {
            ensure!(
                (700..=1300).contains(n),
                "{client_pod}: {name} served {n} of {REQUESTS}, far from a third: {seen:?}"
            );
        }
    }

    // ClientIP affinity: one client, one endpoint, connection after
    // connection.
    let pinned = spread(cluster.pod("client"), vip(sticky, 80), 100)?;
    ensure!(
        pinned.len() == 1,
        "ClientIP affinity did not pin: {pinned:?}"
    );

    // Hairpin: web-1 reaches a Service whose only endpoint is itself.
    let own = spread(cluster.pod("web-1"), vip(hairpin, 80), 20)?;
    ensure!(
        own.len() == 1 && own.contains_key("web-1"),
        "hairpin went elsewhere: {own:?}"
    );

    // A host process on node 1 (source outside the pod network) reaches
    // endpoints on its own node and across the overlay.
    let url = format!("http://{web}/");
    let mut from_host = BTreeMap::new();
    for _ in 0..60 {
        let name = cluster
            .node(0)
            .netns
            .run("curl", &["-sf", "-m", "5", &url])
            .context("curl from node 1's host namespace")?;
        *from_host.entry(name).or_insert(0) += 1;
    }
    ensure!(from_host.len() == 3, "from the host: {from_host:?}");

    // UDP: the echo comes back from the ClusterIP (reverse-translated).
    for client_pod in ["client", "client-2"] {
        let (from, answer) = udp_exchange(cluster.pod(client_pod), vip(echo, 53), b"ping")?;
        ensure!(
            from == vip(echo, 53),
            "the echo came from {from}, not the ClusterIP"
        );
        ensure!(answer.ends_with(":ping"), "echo answered {answer:?}");
    }

    // No endpoints: refused at once, TCP with a reset, UDP with ICMP.
    let refused = cluster
        .pod("client")
        .netns
        .enter(move || TcpStream::connect_timeout(&vip(empty, 80), Duration::from_secs(5)))?;
    match refused {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        other => bail!("a Service without endpoints answered {other:?}, not a refusal"),
    }
    let udp_refused = cluster
        .pod("client")
        .netns
        .enter(move || -> std::io::Result<()> {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.set_read_timeout(Some(Duration::from_secs(5)))?;
            socket.connect(vip(empty, 53))?;
            socket.send(b"anyone?")?;
            let mut buf = [0u8; 64];
            socket.recv(&mut buf).map(|_| ())
        })?;
    match udp_refused {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        other => bail!("UDP to a Service without endpoints: {other:?}, not a refusal"),
    }

    // Observability: counters and the flow listing.
    let metrics = cluster.metrics(0)?;
    ensure!(
        counter(
            &metrics,
            "skiff_service_new_flows_total{namespace=\"default\",service=\"web\"}"
        ) >= REQUESTS as f64,
        "{metrics}"
    );
    ensure!(
        counter(&metrics, "skiff_service_rejected_total") >= 2.0,
        "{metrics}"
    );
    ensure!(
        counter(&metrics, "skiff_service_flows_tracked") > 0.0,
        "{metrics}"
    );
    let flows = cluster.node(0).netns.run(
        SKIFF,
        &["dataplane", "conntrack", "--addr", "127.0.0.1:9469"],
    )?;
    ensure!(
        flows.lines().any(|l| l.starts_with("tcp ")
            && l.contains(&format!("dst={web} "))
            && l.contains("service=default/web")),
        "no flow to {web} listed:\n{flows}"
    );
    // Balanced at connect, the client pod's connections were never
    // translated (the flows above are the host's).
    let from_client = format!("src={} dst={web} ", cluster.pod("client").ip);
    ensure!(
        (backend == "socket") != flows.lines().any(|l| l.contains(&from_client)),
        "with the {backend} backend, the client pod's flows to {web}:\n{flows}"
    );

    // An endpoint leaves (web-3 stops being ready): the Service keeps
    // answering, no request fails, and web-3 gets no new flows.
    let started = Instant::now();
    cluster.set_pod_status("web-3", cluster.pod("web-3").ip, false)?;
    let mut failures = 0;
    let mut clean_run = 0;
    while clean_run < 200 {
        match request(cluster.pod("client"), vip(web, 80)) {
            Ok(name) if name == "web-3" => clean_run = 0,
            Ok(_) => clean_run += 1,
            Err(e) => {
                failures += 1;
                eprintln!("request failed while web-3 left: {e:#}");
            }
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("web-3 still got new flows 30 s after it became not ready");
        }
    }
    eprintln!("web-3 out of rotation after {:?}", started.elapsed());
    ensure!(
        failures == 0,
        "{failures} requests failed while an endpoint left"
    );
    let after = spread(cluster.pod("client"), vip(web, 80), 300)?;
    ensure!(
        after.len() == 2 && !after.contains_key("web-3"),
        "after web-3 left: {after:?}"
    );

    // The backend asked for is the one that balanced: with nftables (also
    // behind connect-time balancing) the kernel has a chain for web's port
    // (none for the pinned Service, which stays with the engine); with the
    // engine there is no table.
    let rules = cluster
        .node(0)
        .netns
        .run("nft", &["list", "ruleset"])
        .context("listing node 1's nftables rules")?;
    let chain = "chain svc-default/web/tcp/80 ";
    if backend != "engine" {
        ensure!(
            rules.contains(chain) && !rules.contains("svc-default/web-sticky/"),
            "node 1's nftables rules:\n{rules}"
        );
    } else {
        ensure!(!rules.contains("skiff_services"), "{rules}");
    }
    Ok(())
}

/// Connect-time balancing (`--service-backend socket`): processes in the
/// client pod's cgroup dial the ClusterIP and are sent straight to an
/// endpoint, on this node or across the overlay, while `getpeername()`
/// still names the ClusterIP; the kernel NAT never sees those
/// connections. UDP and Services without endpoints stay with nftables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_ips_balance_at_connect_for_pod_processes() -> anyhow::Result<()> {
    let mut cluster = start_cluster(2, "socket").await?;
    for (name, node) in [("web-1", 0), ("web-2", 1)] {
        cluster.add_pod(node, name)?;
        serve(cluster.pod(name))?;
    }
    cluster.add_pod(0, "client")?;
    cluster
        .server()
        .kubectl_stdin(&["apply", "-f", "-"], MANIFESTS)?;
    for (name, node) in [("web-1", 1), ("web-2", 2)] {
        create_pod_object(&cluster, name, node)?;
        cluster.set_pod_status(name, cluster.pod(name).ip, true)?;
    }
    let web = cluster.cluster_ip("web")?;
    let echo = cluster.cluster_ip("echo")?;
    let empty = cluster.cluster_ip("empty")?;
    let client = cluster.pod("client");

    wait_until(&cluster, "both endpoints answer at connect", || {
        Ok(dial_from_process(client, web, 40)?.0.len() == 2)
    })
    .await?;
    let (seen, peers) = dial_from_process(client, web, 400)?;
    eprintln!("400 connections to {web}:80 from the client's process went to {seen:?}");
    for name in ["web-1", "web-2"] {
        let n = seen.get(name).copied().unwrap_or(0);
        ensure!(
            (140..=260).contains(&n),
            "{name} served {n} of 400: {seen:?}"
        );
    }
    ensure!(
        peers.iter().all(|p| *p == format!("{web}:80")),
        "getpeername() did not name the ClusterIP: {peers:?}"
    );
    // Counted per Service as the NAT's flows are, yet none of them is in
    // the kernel's or the engine's flow tables.
    let metrics = cluster.metrics(0)?;
    ensure!(
        counter(
            &metrics,
            "skiff_service_new_flows_total{namespace=\"default\",service=\"web\"}"
        ) >= 400.0,
        "{metrics}"
    );
    ensure!(
        counter(&metrics, "skiff_service_socket_frontends") >= 1.0,
        "{metrics}"
    );
    let flows = cluster.node(0).netns.run(
        SKIFF,
        &["dataplane", "conntrack", "--addr", "127.0.0.1:9469"],
    )?;
    let translated = format!("src={} dst={web} ", client.ip);
    ensure!(
        !flows.lines().any(|l| l.contains(&translated)),
        "connections from the pod went through a NAT:\n{flows}"
    );

    // UDP from the same pod: nftables translates, the echo comes back
    // from the ClusterIP.
    let udp = client
        .netns
        .run("python3", &["-c", UDP_ECHO, &echo.to_string()])?;
    ensure!(
        udp.starts_with(&format!("{echo}:53 ")) && udp.trim_end().ends_with(":ping"),
        "UDP through {echo}: {udp:?}"
    );
    // No endpoints: refused, by the kernel rules.
    let (refused, _) = dial_from_process(client, empty, 1)?;
    ensure!(
        refused.get("ConnectionRefusedError") == Some(&1),
        "a Service without endpoints answered {refused:?}"
    );

    // web-2 stops being ready: new connections go to web-1 only.
    cluster.set_pod_status("web-2", cluster.pod("web-2").ip, false)?;
    wait_until(&cluster, "web-2 leaves the connect-time choice", || {
        let (seen, _) = dial_from_process(cluster.pod("client"), web, 50)?;
        Ok(seen.len() == 1 && seen.get("web-1") == Some(&50))
    })
    .await?;
    Ok(())
}

/// `count` HTTP/1.0 requests to `vip:80`, each on its own connection,
/// from a process in `pod` (its namespace and cgroup): who answered (or
/// the error's name), and what `getpeername()` said of each connection.
fn dial_from_process(
    pod: &Pod,
    vip: Ipv4Addr,
    count: usize,
) -> anyhow::Result<(BTreeMap<String, usize>, Vec<String>)> {
    let out = pod.netns.run(
        "python3",
        &["-c", DIAL, &vip.to_string(), &count.to_string()],
    )?;
    let mut seen = BTreeMap::new();
    let mut peers = Vec::new();
    for line in out.lines() {
        let (who, peer) = line.split_once(' ').unwrap_or((line, ""));
        *seen.entry(who.to_owned()).or_insert(0) += 1;
        peers.push(peer.to_owned());
    }
    Ok((seen, peers))
}

const DIAL: &str = r#"
import socket, sys
vip, count = sys.argv[1], int(sys.argv[2])
for _ in range(count):
    try:
        s = socket.create_connection((vip, 80), timeout=5)
        peer = "%s:%d" % s.getpeername()
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        print(data.split(b"\r\n\r\n", 1)[1].decode(), peer)
    except OSError as e:
        print(type(e).__name__)
"#;

const UDP_ECHO: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
for _ in range(5):
    s.sendto(b"ping", (sys.argv[1], 53))
    try:
        data, peer = s.recvfrom(1500)
        print("%s:%d" % peer, data.decode())
        break
    except socket.timeout:
        pass
"#;

/// NodePort from outside the cluster: a client in the underlay (on no
/// node) reaches the Service on every node's address, TCP and UDP, and
/// each node forwards to endpoints on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_ports_answer_on_every_node() -> anyhow::Result<()> {
    // The nftables backend: Local NodePorts from outside need the kernel's
    // conntrack (the endpoint's reply leaves by the node's routing); the
    // other NodePorts stay with the engine either way.
    let mut cluster = start_cluster(3, "nftables").await?;
    for (name, node) in [("web-1", 0), ("web-2", 1), ("web-3", 2)] {
        cluster.add_pod(node, name)?;
        serve(cluster.pod(name))?;
    }
    // The outside client: an address on the underlay bridge itself.
    let outside = Ipv4Addr::new(172, 31, cluster.subnet(), 2);
    cluster
        .underlay()
        .ip(&["addr", "add", &format!("{outside}/24"), "dev", "br0"])?;
    cluster
        .server()
        .kubectl_stdin(&["apply", "-f", "-"], NODE_PORT_MANIFESTS)?;
    for (name, node) in [("web-1", 1), ("web-2", 2), ("web-3", 3)] {
        create_pod_object(&cluster, name, node)?;
        cluster.set_pod_status(name, cluster.pod(name).ip, true)?;
    }

    for index in 0..3 {
        let node_ip = cluster.node(index).underlay_ip;
        let tcp = SocketAddr::from((node_ip, 30080));
        wait_until(
            &cluster,
            &format!("every endpoint answers on node {}'s NodePort", index + 1),
            || Ok(spread_in(cluster.underlay(), tcp, 30)?.len() == 3),
        )
        .await?;
        let seen = spread_in(cluster.underlay(), tcp, 300)?;
        eprintln!("300 requests to {tcp} from {outside} went to {seen:?}");
        ensure!(seen.len() == 3, "through {tcp}: {seen:?}");

        let udp = SocketAddr::from((node_ip, 30053));
        let (from, answer) = udp_exchange_in(cluster.underlay(), udp, b"ping")?;
        ensure!(from == udp, "the UDP echo came from {from}, not {udp}");
        ensure!(answer.ends_with(":ping"), "echo answered {answer:?}");

        // A LoadBalancer Service answers on its own port at every node IP.
        let lb = SocketAddr::from((node_ip, 8088));
        wait_until(
            &cluster,
            &format!(
                "every endpoint answers on node {}'s LoadBalancer port",
                index + 1
            ),
            || Ok(spread_in(cluster.underlay(), lb, 30)?.len() == 3),
        )
        .await?;
    }

    // externalTrafficPolicy: Local from outside the cluster: on each node
    // only that node's endpoint answers, it sees the client's own
    // address, and its reply, which leaves by the node's routing and not
    // the overlay, still comes back from the NodePort.
    for index in 0..3 {
        let node_ip = cluster.node(index).underlay_ip;
        let own = format!("web-{}", index + 1);
        let tcp = SocketAddr::from((node_ip, 30081));
        wait_until(
            &cluster,
            &format!("node {}'s Local NodePort to answer", index + 1),
            || Ok(spread_in(cluster.underlay(), tcp, 1)?.contains_key(&own)),
        )
        .await?;
        let seen = spread_in(cluster.underlay(), tcp, 30)?;
        ensure!(
            seen.len() == 1 && seen.contains_key(&own),
            "Local NodePort {tcp} went to {seen:?}"
        );
        let udp = SocketAddr::from((node_ip, 30054));
        let (from, answer) = udp_exchange_in(cluster.underlay(), udp, b"ping")?;
        ensure!(
            from == udp,
            "the Local UDP echo came from {from}, not {udp}"
        );
        ensure!(
            answer == format!("{own}@{outside}:ping"),
            "the Local endpoint saw {answer:?}, not the client {outside}"
        );
    }

    // A LoadBalancer port that a process of the node listens on (here the
    // API server on node 1) stays that process's.
    let api_port = cluster.server().port;
    if !(30000..=32767).contains(&api_port) {
        let taken = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: api-lb}}\nspec:\n  type: LoadBalancer\n  selector: {{app: web}}\n  ports: [{{port: {api_port}, targetPort: 8080}}]\n"
        );
        cluster
            .server()
            .kubectl_stdin(&["apply", "-f", "-"], &taken)?;
        wait_until(&cluster, "node 1 to refuse the API server's port", || {
            Ok(cluster.dataplane_log(0).contains("is in use on this node"))
        })
        .await?;
        let rules = cluster.node(0).netns.ip(&["rule", "show"])?;
        ensure!(
            rules.contains("dport 8088") && !rules.contains(&format!("dport {api_port} ")),
            "LoadBalancer rules on node 1:\n{rules}"
        );
        cluster
            .server()
            .kubectl_ok(&["delete", "service", "web-lb"])?;
        wait_until(&cluster, "the LoadBalancer port's rule to go", || {
            Ok(!cluster
                .node(0)
                .netns
                .ip(&["rule", "show"])?
                .contains("dport 8088"))
        })
        .await?;
    }

    // The steering is Skiff's own rules, in front of the local table.
    let rules = cluster.node(0).netns.ip(&["rule", "show"])?;
    ensure!(
        rules
            .lines()
            .next()
            .is_some_and(|l| !l.contains("lookup local"))
            && rules.contains("lookup 152")
            && rules.contains("dport 30000-32767"),
        "unexpected rules on node 1:\n{rules}"
    );
    // A node's own NodePort-range listener would be shadowed, but local
    // delivery for everything else goes on: the API server on node 1.
    cluster.server().kubectl_ok(&["get", "nodes"])?;

    // A data plane that stops (SIGINT) puts the kernel's rules back.
    let pid = cluster.dataplane_pid(0).context("node 1's data plane")?;
    std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()?;
    let started = Instant::now();
    while cluster.dataplane_running(0) {
        ensure!(
            started.elapsed() < Duration::from_secs(10),
            "the data plane did not stop on SIGINT"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rules = cluster.node(0).netns.ip(&["rule", "show"])?;
    ensure!(
        rules
            .lines()
            .next()
            .is_some_and(|l| l.contains("lookup local"))
            && !rules.contains("152"),
        "rules left after the data plane stopped:\n{rules}\n{}",
        cluster.dataplane_log(0)
    );
    let tables = cluster.node(0).netns.run("nft", &["list", "tables"])?;
    ensure!(
        !tables.contains("skiff_services"),
        "the Service table stayed after the data plane stopped:\n{tables}"
    );
    Ok(())
}

/// `kubectl scale` down and back up while a client that retries nothing
/// keeps opening connections through the ClusterIP: the pods being
/// removed stop getting new flows (terminating endpoints) and no request
/// fails. The test plays the node agent: it gives every pod the
/// ReplicaSet creates a namespace with servers on node 2, and never
/// finishes the graceful deletion itself until it has checked the
/// Service.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_scale_drops_no_request_in_the_engine() -> anyhow::Result<()> {
    kubectl_scale_drops_no_request("engine").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_scale_drops_no_request_with_nftables() -> anyhow::Result<()> {
    kubectl_scale_drops_no_request("nftables").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_scale_drops_no_request_at_connect() -> anyhow::Result<()> {
    kubectl_scale_drops_no_request("socket").await
}

async fn kubectl_scale_drops_no_request(backend: &str) -> anyhow::Result<()> {
    let mut cluster = start_cluster(2, backend).await?;
    cluster.add_pod(0, "client")?;
    cluster
        .server()
        .kubectl_stdin(&["apply", "-f", "-"], SCALED_MANIFESTS)?;
    let vip = SocketAddr::from((cluster.cluster_ip("scaled")?, 80));
    let mut running = Vec::new();
    let started = Instant::now();
    loop {
        adopt_pods(&mut cluster, &mut running)?;
        if running.len() == 3
            && spread(cluster.pod("client"), vip, 30).is_ok_and(|seen| seen.len() == 3)
        {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!(
                "three replicas did not answer: {running:?}\n{}",
                cluster.dataplane_log(0)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Down to one: two pods are deleted gracefully and stay terminating
    // (there is no kubelet to finish them); they keep serving, but get no
    // new flows.
    cluster
        .server()
        .kubectl_ok(&["scale", "deployment", "scaled", "--replicas=1"])?;
    let (failures, elapsed) = requests_until(&cluster, vip, |seen| seen.len() == 1)?;
    eprintln!("scaled to 1: one endpoint left after {elapsed:?}, {failures} failed requests");
    ensure!(
        failures == 0,
        "{failures} requests failed while scaling to 1"
    );
    let terminating = terminating_pods(&cluster)?;
    ensure!(
        terminating.len() == 2,
        "expected two terminating pods: {terminating:?}"
    );
    // The "kubelet" finishes them; the endpoints leave the slices.
    for pod in &terminating {
        cluster
            .server()
            .kubectl_ok(&["delete", "pod", pod, "--grace-period=0", "--force"])?;
    }
    running.retain(|name| !terminating.contains(name));

    // And back to three: the client keeps sending while new pods join.
    cluster
        .server()
        .kubectl_ok(&["scale", "deployment", "scaled", "--replicas=3"])?;
    let started = Instant::now();
    let mut failures = 0;
    loop {
        adopt_pods(&mut cluster, &mut running)?;
        let seen = match spread(cluster.pod("client"), vip, 30) {
            Ok(seen) => seen,
            Err(e) => {
                failures += 1;
                eprintln!("request failed while scaling to 3: {e:#}");
                BTreeMap::new()
            }
        };
        if seen.len() == 3 {
            break;
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("not all three replicas answered after 60 s: {seen:?}");
        }
    }
    ensure!(
        failures == 0,
        "{failures} requests failed while scaling to 3"
    );
    Ok(())
}

const SCALED_MANIFESTS: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: scaled}
spec:
  replicas: 3
  selector: {matchLabels: {app: scaled}}
  template:
    metadata: {labels: {app: scaled}}
    spec:
      nodeName: node-2
      containers: [{name: app, image: busybox, ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: scaled}
spec:
  selector: {app: scaled}
  ports: [{name: http, port: 80, targetPort: http}]
"#;

/// Plays the node agent for the Deployment's pods: every new one gets a
/// namespace on its node with the servers, and is reported running and
/// ready. `running` holds the pods already given one.
fn adopt_pods(cluster: &mut Cluster, running: &mut Vec<String>) -> anyhow::Result<()> {
    let out = cluster
        .server()
        .kubectl_ok(&["get", "pods", "-l", "app=scaled", "-o", "json"])?;
    let list: serde_json::Value = serde_json::from_str(&out)?;
    for pod in list["items"].as_array().into_iter().flatten() {
        let name = pod["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if name.is_empty()
            || running.contains(&name)
            || !pod["metadata"]["deletionTimestamp"].is_null()
        {
            continue;
        }
        let node = match pod["spec"]["nodeName"].as_str() {
            Some("node-1") => 0,
            Some("node-2") => 1,
            _ => continue,
        };
        let ip = cluster.add_pod(node, &name)?.ip;
        serve(cluster.pod(&name))?;
        cluster.set_pod_status(&name, ip, true)?;
        running.push(name);
    }
    Ok(())
}

fn terminating_pods(cluster: &Cluster) -> anyhow::Result<Vec<String>> {
    let out = cluster
        .server()
        .kubectl_ok(&["get", "pods", "-l", "app=scaled", "-o", "json"])?;
    let list: serde_json::Value = serde_json::from_str(&out)?;
    Ok(list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| !p["metadata"]["deletionTimestamp"].is_null())
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
        .collect())
}

/// Requests from the client pod, one connection each, none retried, until
/// the endpoints seen in the last 200 requests satisfy `done`: how many
/// failed, and how long it took.
fn requests_until(
    cluster: &Cluster,
    vip: SocketAddr,
    done: impl Fn(&BTreeMap<String, usize>) -> bool,
) -> anyhow::Result<(usize, Duration)> {
    let started = Instant::now();
    let mut failures = 0;
    let mut window = std::collections::VecDeque::new();
    loop {
        match request(cluster.pod("client"), vip) {
            Ok(name) => window.push_back(name),
            Err(e) => {
                failures += 1;
                eprintln!("request failed: {e:#}");
            }
        }
        if window.len() > 200 {
            window.pop_front();
        }
        let mut seen = BTreeMap::new();
        for name in &window {
            *seen.entry(name.clone()).or_insert(0) += 1;
        }
        if window.len() == 200 && done(&seen) {
            return Ok((failures, started.elapsed()));
        }
        if started.elapsed() > Duration::from_secs(60) {
            bail!("after 60 s the endpoints still answering are {seen:?}");
        }
    }
}

const NODE_PORT_MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web-np}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-np}
spec:
  type: NodePort
  selector: {app: web}
  ports: [{name: echo, port: 53, targetPort: 5353, protocol: UDP, nodePort: 30053}]
---
apiVersion: v1
kind: Service
metadata: {name: web-lb}
spec:
  type: LoadBalancer
  selector: {app: web}
  ports: [{name: http, port: 8088, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web-local}
spec:
  type: NodePort
  externalTrafficPolicy: Local
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080, nodePort: 30081}
  - {name: echo, port: 53, targetPort: 5353, protocol: UDP, nodePort: 30054}
"#;

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web-sticky}
spec:
  selector: {app: web}
  sessionAffinity: ClientIP
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: echo}
spec:
  selector: {app: web}
  ports: [{name: echo, port: 53, targetPort: 5353, protocol: UDP}]
---
apiVersion: v1
kind: Service
metadata: {name: hairpin}
spec:
  selector: {hairpin: "yes"}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: empty}
spec:
  selector: {app: nobody}
  ports: [{name: tcp, port: 80, targetPort: 8080}, {name: udp, port: 53, targetPort: 5353, protocol: UDP}]
"#;

/// The Pod object standing for a pod namespace; web-1 also backs the
/// hairpin Service.
fn create_pod_object(cluster: &Cluster, name: &str, node: usize) -> anyhow::Result<()> {
    let hairpin = if name == "web-1" { "yes" } else { "no" };
    let manifest = format!(
        r#"{{"apiVersion": "v1", "kind": "Pod",
            "metadata": {{"name": "{name}", "labels": {{"app": "web", "hairpin": "{hairpin}"}}}},
            "spec": {{"nodeName": "node-{node}", "containers": [{{"name": "app", "image": "busybox",
                "ports": [{{"name": "http", "containerPort": {HTTP_PORT}}},
                          {{"name": "echo", "containerPort": {ECHO_PORT}, "protocol": "UDP"}}]}}]}}}}"#
    );
    cluster
        .server()
        .kubectl_stdin(&["create", "-f", "-"], &manifest)?;
    Ok(())
}

/// Starts the pod's servers: TCP answering every connection with the
/// pod's name, UDP echoing `name:payload`. The sockets live in the pod's
/// namespace; they are served from threads of the test process.
fn serve(pod: &Pod) -> anyhow::Result<()> {
    let name = pod.name.clone();
    let (listener, udp) = pod.netns.enter(|| -> std::io::Result<_> {
        Ok((
            TcpListener::bind(("0.0.0.0", HTTP_PORT))?,
            UdpSocket::bind(("0.0.0.0", ECHO_PORT))?,
        ))
    })??;
    let tcp_name = name.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let _ = answer(stream, &tcp_name);
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            // The client's address as the endpoint sees it, then the echo.
            let mut reply = format!("{name}@{}:", from.ip()).into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = udp.send_to(&reply, from);
        }
    });
    Ok(())
}

/// One HTTP/1.0 exchange on the server side.
fn answer(mut stream: TcpStream, name: &str) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        request.extend_from_slice(&buf[..n]);
    }
    write!(
        stream,
        "HTTP/1.0 200 OK\r\ncontent-length: {}\r\n\r\n{name}",
        name.len()
    )
}

/// One request on a fresh connection from `pod`; the name that answered.
fn request(pod: &Pod, to: SocketAddr) -> anyhow::Result<String> {
    pod.netns.enter(move || get(to))?
}

fn get(to: SocketAddr) -> anyhow::Result<String> {
    let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))
        .with_context(|| format!("connecting to {to}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP response from {to}: {response:?}"))?;
    ensure!(head.starts_with("HTTP/1.0 200"), "{head}");
    Ok(body.to_owned())
}

/// `count` requests from `pod`, each on its own connection: how many each
/// endpoint served. Fails on the first failed request.
fn spread(pod: &Pod, to: SocketAddr, count: usize) -> anyhow::Result<BTreeMap<String, usize>> {
    spread_in(&pod.netns, to, count)
}

fn spread_in(
    netns: &Netns,
    to: SocketAddr,
    count: usize,
) -> anyhow::Result<BTreeMap<String, usize>> {
    netns.enter(move || -> anyhow::Result<_> {
        let mut seen = BTreeMap::new();
        for i in 0..count {
            let name = get(to).with_context(|| format!("request {i} to {to}"))?;
            *seen.entry(name).or_insert(0) += 1;
        }
        Ok(seen)
    })?
}

fn udp_exchange(pod: &Pod, to: SocketAddr, payload: &[u8]) -> anyhow::Result<(SocketAddr, String)> {
    udp_exchange_in(&pod.netns, to, payload)
}

fn udp_exchange_in(
    netns: &Netns,
    to: SocketAddr,
    payload: &[u8],
) -> anyhow::Result<(SocketAddr, String)> {
    let payload = payload.to_vec();
    netns.enter(move || -> anyhow::Result<_> {
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = [0u8; 1500];
        // UDP may lose a datagram on a loaded machine; a client resends,
        // from the same socket, so it stays one flow.
        let mut last = None;
        for attempt in 1..=5 {
            socket.send_to(&payload, to)?;
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    if attempt > 1 {
                        eprintln!("UDP echo from {to} answered on attempt {attempt}");
                    }
                    return Ok((from, String::from_utf8_lossy(&buf[..n]).into_owned()));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(anyhow::Error::from(last.expect("five attempts were made")).context("no echo"))
    })?
}

/// `nodes` nodes with Services balanced by `backend`; no node agent (the
/// test reports pod status itself, and a real one would try to run the
/// Pod objects).
async fn start_cluster(nodes: usize, backend: &str) -> anyhow::Result<Cluster> {
    Cluster::start_with(
        SKIFF.as_ref(),
        nodes,
        &["--disable", "agent"],
        &[
            "--service-cidr",
            "10.43.0.0/16",
            "--cluster-cidr",
            "10.42.0.0/16",
            "--service-backend",
            backend,
        ],
    )
    .await
}

/// Retries `check` until it holds (errors count as not yet) for 30 s.
async fn wait_until(
    cluster: &Cluster,
    what: &str,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last = match check() {
            Ok(true) => return Ok(()),
            Ok(false) => "not yet".to_owned(),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() > deadline {
            bail!(
                "{what}: {last}\nnode 1 data plane log:\n{}",
                cluster.dataplane_log(0)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A sample's value in Prometheus text, 0 when absent.
fn counter(metrics: &str, sample: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or(0.0)
}
