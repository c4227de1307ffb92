//! `BridgeNetwork` against the real kernel: a "node" network namespace holds
//! the bridge, pods are namespaces of their own, traffic is real ICMP. Runs
//! as root; everything lives under a unique temp folder and is removed by a
//! Drop guard, even when an assertion fails.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use cni::{BridgeConfig, BridgeNetwork, CniError, NetNs, netns};
use ipnet::Ipv4Net;

/// A node namespace plus a folder for pod namespaces and IPAM state.
struct Lab {
    root: tempfile::TempDir,
    netns_dir: PathBuf,
    node: NetNs,
}

impl Lab {
    fn new() -> Self {
        let root = tempfile::Builder::new()
            .prefix("skiff-cni-test-")
            .tempdir()
            .expect("temp dir");
        let netns_dir = root.path().join("netns");
        let node = netns::create(&netns_dir, "node").expect("node namespace");
        Self {
            root,
            netns_dir,
            node,
        }
    }

    fn config(&self, cidr: &str) -> BridgeConfig {
        BridgeConfig {
            bridge: "skiff0".into(),
            pod_cidr: cidr.parse().expect("cidr"),
            mtu: 1400,
            state_dir: self.state_dir(),
            host_netns: Some(self.node.path.clone()),
        }
    }

    fn state_dir(&self) -> PathBuf {
        self.root.path().join("ipam")
    }

    fn pod(&self, name: &str) -> NetNs {
        netns::create(&self.netns_dir, name).expect("pod namespace")
    }

    /// Runs a command inside a namespace and returns (success, stdout).
    fn exec(&self, ns: &Path, args: &[&str]) -> (bool, String) {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", ns.display()))
            .args(args)
            .output()
            .expect("nsenter runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    fn ping(&self, from: &Path, to: Ipv4Addr) -> bool {
        self.exec(from, &["ping", "-c", "1", "-W", "2", &to.to_string()])
            .0
    }

    /// Interface names in a namespace.
    fn links(&self, ns: &Path) -> Vec<String> {
        let (_, out) = self.exec(ns, &["ip", "-o", "link", "show"]);
        out.lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|name| name.split('@').next().unwrap_or(name).to_string())
            .collect()
    }

    fn link_line(&self, ns: &Path, name: &str) -> String {
        self.exec(ns, &["ip", "-o", "link", "show", "dev", name]).1
    }

    fn state_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.state_dir())
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting the node namespace deletes the bridge and host veths in it.
        if let Err(err) = netns::remove_dir(&self.netns_dir) {
            eprintln!("cleanup of {} failed: {err}", self.netns_dir.display());
        }
    }
}

fn in_cidr(ip: Ipv4Net, cidr: &str) -> bool {
    cidr.parse::<Ipv4Net>().unwrap().contains(&ip.addr())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pods_get_distinct_ips_and_reach_each_other_and_the_gateway() {
    let lab = Lab::new();
    let net = BridgeNetwork::new(lab.config("10.77.1.0/24"))
        .await
        .unwrap();
    let a = lab.pod("pod-a");
    let b = lab.pod("pod-b");
    let at_a = net.attach("sandbox-a", &a.path, "eth0").await.unwrap();
    let at_b = net.attach("sandbox-b", &b.path, "eth0").await.unwrap();

    assert_ne!(at_a.ip.addr(), at_b.ip.addr());
    assert!(in_cidr(at_a.ip, "10.77.1.0/24") && in_cidr(at_b.ip, "10.77.1.0/24"));
    assert_eq!(at_a.ip.prefix_len(), 24);
    let gateway = Ipv4Addr::new(10, 77, 1, 1);
    assert_eq!(at_a.gateway, gateway);
    assert_ne!(at_a.ip.addr(), gateway);
    assert_eq!(at_a.host_veth, cni::host_veth_name("sandbox-a"));
    assert_ne!(at_a.mac, [0; 6]);

    // The pods reach each other and the gateway; the node reaches the pods.
    assert!(lab.ping(&a.path, at_b.ip.addr()), "pod a cannot ping pod b");
    assert!(lab.ping(&b.path, at_a.ip.addr()), "pod b cannot ping pod a");
    assert!(lab.ping(&a.path, gateway), "pod a cannot ping the gateway");
    assert!(
        lab.ping(&lab.node.path, at_b.ip.addr()),
        "node cannot ping pod b"
    );

    // Pod side: eth0 up with the MTU, lo up, default route via the gateway.
    let eth0 = lab.link_line(&a.path, "eth0");
    assert!(eth0.contains("mtu 1400") && eth0.contains(",UP"), "{eth0}");
    assert!(lab.link_line(&a.path, "lo").contains(",UP"));
    let (_, routes) = lab.exec(&a.path, &["ip", "route", "show", "default"]);
    assert!(routes.contains("via 10.77.1.1 dev eth0"), "{routes}");
    let (_, addrs) = lab.exec(&a.path, &["ip", "-o", "-4", "addr", "show", "dev", "eth0"]);
    assert!(addrs.contains(&at_a.ip.to_string()), "{addrs}");

    // Node side: the bridge holds the gateway, host veths are its ports.
    let (_, bridge_addr) = lab.exec(
        &lab.node.path,
        &["ip", "-o", "-4", "addr", "show", "dev", "skiff0"],
    );
    assert!(bridge_addr.contains("10.77.1.1/24"), "{bridge_addr}");
    let host = lab.link_line(&lab.node.path, &at_a.host_veth);
    assert!(
        host.contains("master skiff0") && host.contains("mtu 1400"),
        "{host}"
    );
    // Hairpin mode, for a pod reaching itself through a Service.
    let (_, port) = lab.exec(
        &lab.node.path,
        &["ip", "-d", "link", "show", "dev", &at_a.host_veth],
    );
    assert!(port.contains("hairpin on"), "{port}");
    let (_, forward) = lab.exec(&lab.node.path, &["cat", "/proc/sys/net/ipv4/ip_forward"]);
    assert_eq!(forward.trim(), "1");

    // `check` agrees with what attach returned.
    assert_eq!(net.check("sandbox-a", &a.path, "eth0").await.unwrap(), at_a);

    let mut allocations = net.allocations();
    allocations.sort();
    assert_eq!(
        allocations,
        vec![
            ("sandbox-a".to_string(), at_a.ip.addr()),
            ("sandbox-b".to_string(), at_b.ip.addr())
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_is_idempotent_and_repairs() {
    let lab = Lab::new();
    let net = BridgeNetwork::new(lab.config("10.77.2.0/24"))
        .await
        .unwrap();
    let a = lab.pod("pod-a");
    let first = net.attach("sandbox-a", &a.path, "eth0").await.unwrap();
    let second = net.attach("sandbox-a", &a.path, "eth0").await.unwrap();
    assert_eq!(first, second);
    assert_eq!(net.allocations().len(), 1);
    let veths: Vec<_> = lab
        .links(&lab.node.path)
        .into_iter()
        .filter(|l| l.starts_with("veth"))
        .collect();
    assert_eq!(veths, vec![first.host_veth.clone()]);

    // Someone took the pod's address away and downed the host end: attach
    // puts both back.
    lab.exec(&a.path, &["ip", "addr", "flush", "dev", "eth0"]);
    lab.exec(
        &lab.node.path,
        &["ip", "link", "set", &first.host_veth, "down"],
    );
    assert!(net.check("sandbox-a", &a.path, "eth0").await.is_err());
    let repaired = net.attach("sandbox-a", &a.path, "eth0").await.unwrap();
    assert_eq!(repaired, first);
    assert!(net.check("sandbox-a", &a.path, "eth0").await.is_ok());
    assert!(lab.ping(&a.path, first.gateway));

    // The sandbox's namespace was recreated: the stale pair is replaced and
    // the sandbox keeps its address.
    netns::remove(&lab.netns_dir, "pod-a").unwrap();
    let a2 = lab.pod("pod-a");
    let again = net.attach("sandbox-a", &a2.path, "eth0").await.unwrap();
    assert_eq!(again.ip, first.ip);
    assert!(lab.ping(&a2.path, first.gateway));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipam_survives_a_reopen_and_never_repeats_an_address_in_use() {
    let lab = Lab::new();
    let mut held = Vec::new();
    {
        let net = BridgeNetwork::new(lab.config("10.77.3.0/28"))
            .await
            .unwrap();
        for i in 0..3 {
            let pod = lab.pod(&format!("pod-{i}"));
            held.push(
                net.attach(&format!("sb-{i}"), &pod.path, "eth0")
                    .await
                    .unwrap()
                    .ip,
            );
        }
    }
    // A new agent process: same state folder, the bridge already exists.
    let net = BridgeNetwork::new(lab.config("10.77.3.0/28"))
        .await
        .unwrap();
    let mut listed: Vec<Ipv4Addr> = net.allocations().into_iter().map(|(_, ip)| ip).collect();
    listed.sort();
    let mut want: Vec<Ipv4Addr> = held.iter().map(|n| n.addr()).collect();
    want.sort();
    assert_eq!(listed, want);

    // Fill the rest of the /28 (13 usable: .2 to .14): never an address in use.
    for i in 3..13 {
        let pod = lab.pod(&format!("pod-{i}"));
        let got = net
            .attach(&format!("sb-{i}"), &pod.path, "eth0")
            .await
            .unwrap();
        assert!(!held.contains(&got.ip), "{} handed out twice", got.ip);
        held.push(got.ip);
    }
    let full = lab.pod("pod-full");
    let err = net.attach("sb-full", &full.path, "eth0").await.unwrap_err();
    assert!(matches!(err, CniError::Exhausted(_)), "{err}");
    assert!(
        !lab.links(&lab.node.path)
            .contains(&cni::host_veth_name("sb-full"))
    );

    // Detach frees the address and the veth; the freed address is reused.
    let freed = held[4];
    net.detach("sb-4", Some(&lab.netns_dir.join("pod-4")))
        .await
        .unwrap();
    assert!(
        !lab.links(&lab.node.path)
            .contains(&cni::host_veth_name("sb-4"))
    );
    assert!(
        !lab.links(&lab.netns_dir.join("pod-4"))
            .contains(&"eth0".to_string())
    );
    let reused = net.attach("sb-full", &full.path, "eth0").await.unwrap();
    assert_eq!(reused.ip, freed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_is_idempotent_and_teardown_leaves_nothing() {
    let lab = Lab::new();
    let net = BridgeNetwork::new(lab.config("10.77.4.0/24"))
        .await
        .unwrap();
    let a = lab.pod("pod-a");
    let b = lab.pod("pod-b");
    net.attach("sandbox-a", &a.path, "eth0").await.unwrap();
    net.attach("sandbox-b", &b.path, "eth0").await.unwrap();

    net.detach("sandbox-a", Some(&a.path)).await.unwrap();
    net.detach("sandbox-a", Some(&a.path)).await.unwrap();
    // The namespace went first (a crashed pod): detach still frees the rest.
    netns::remove(&lab.netns_dir, "pod-b").unwrap();
    net.detach("sandbox-b", Some(&b.path)).await.unwrap();
    net.detach("sandbox-b", None).await.unwrap();
    net.detach("never-attached", None).await.unwrap();
    netns::remove(&lab.netns_dir, "pod-a").unwrap();
    netns::remove(&lab.netns_dir, "pod-a").unwrap();

    assert!(net.allocations().is_empty());
    assert_eq!(
        netns::list(&lab.netns_dir).unwrap(),
        vec!["node".to_string()]
    );
    let mut node_links = lab.links(&lab.node.path);
    node_links.sort();
    assert_eq!(node_links, vec!["lo".to_string(), "skiff0".to_string()]);
    // Only IPAM's bookkeeping files stay: no address file.
    assert_eq!(
        lab.state_files(),
        vec!["last_reserved_ip".to_string(), "lock".to_string()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_and_bad_input_are_errors_that_leak_nothing() {
    let lab = Lab::new();
    let net = BridgeNetwork::new(lab.config("10.77.5.0/24"))
        .await
        .unwrap();
    let a = lab.pod("pod-a");
    // The pod already has an eth0 that is not ours: a veth of someone
    // else's, or another kind of link.
    lab.exec(
        &a.path,
        &[
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "other0",
        ],
    );
    lab.exec(&a.path, &["ip", "link", "add", "eth1", "type", "bridge"]);
    for ifname in ["eth0", "eth1"] {
        let err = net.attach("sandbox-a", &a.path, ifname).await.unwrap_err();
        assert!(matches!(err, CniError::Conflict(_)), "{err}");
        assert!(net.allocations().is_empty(), "address leaked");
        assert!(
            !lab.links(&lab.node.path)
                .iter()
                .any(|l| l.starts_with("veth"))
        );
    }

    for (id, ifname) in [
        ("", "eth0"),
        ("a/b", "eth0"),
        ("ok", ""),
        ("ok", "much-too-long-name"),
    ] {
        assert!(matches!(
            net.attach(id, &a.path, ifname).await,
            Err(CniError::Invalid { .. })
        ));
    }
    let missing = lab.root.path().join("no-such-ns");
    assert!(net.attach("sandbox-x", &missing, "eth1").await.is_err());
    assert!(net.allocations().is_empty());

    // A bridge name taken by a non-bridge link is refused.
    lab.exec(
        &lab.node.path,
        &[
            "ip", "link", "add", "notabr", "type", "veth", "peer", "name", "notabr-p",
        ],
    );
    let mut config = lab.config("10.77.5.0/24");
    config.bridge = "notabr".into();
    assert!(matches!(
        BridgeNetwork::new(config).await,
        Err(CniError::Conflict(_))
    ));
}

#[test]
fn namespaces_are_created_listed_run_in_and_removed() {
    let lab = Lab::new();
    let pod = lab.pod("pod-x");
    assert_eq!(
        netns::open(&lab.netns_dir, "pod-x").unwrap(),
        Some(pod.clone())
    );
    assert_eq!(netns::open(&lab.netns_dir, "pod-y").unwrap(), None);
    assert!(matches!(
        netns::create(&lab.netns_dir, "pod-x"),
        Err(CniError::Conflict(_))
    ));
    assert_eq!(
        netns::list(&lab.netns_dir).unwrap(),
        vec!["node".to_string(), "pod-x".to_string()]
    );
    // Inside, only `lo`, and it is up.
    assert_eq!(lab.links(&pod.path), vec!["lo".to_string()]);
    assert!(lab.link_line(&pod.path, "lo").contains(",UP"));
    // run_in really runs in the namespace: its inode differs from ours.
    let ours = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let theirs = cni::run_in(&pod.path, || std::fs::read_link("/proc/thread-self/ns/net"))
        .unwrap()
        .unwrap();
    assert_ne!(ours, theirs);
    assert_eq!(
        std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
        ours
    );

    netns::remove(&lab.netns_dir, "pod-x").unwrap();
    netns::remove(&lab.netns_dir, "pod-x").unwrap();
    assert_eq!(netns::open(&lab.netns_dir, "pod-x").unwrap(), None);
    assert_eq!(
        netns::list(&lab.netns_dir).unwrap(),
        vec!["node".to_string()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_attaches_from_two_agents_never_share_an_address() {
    let lab = Lab::new();
    // Two agents on one state folder, racing to create the bridge as well.
    let (one, two) = tokio::join!(
        BridgeNetwork::new(lab.config("10.77.6.0/24")),
        BridgeNetwork::new(lab.config("10.77.6.0/24"))
    );
    let (one, two) = (one.unwrap(), two.unwrap());
    let mut tasks = Vec::new();
    for i in 0..12 {
        let net = if i % 2 == 0 { one.clone() } else { two.clone() };
        let pod = lab.pod(&format!("pod-{i}"));
        tasks.push(tokio::spawn(async move {
            net.attach(&format!("sb-{i}"), &pod.path, "eth0").await
        }));
    }
    let mut ips = std::collections::HashSet::new();
    for task in tasks {
        let attachment = task.await.unwrap().unwrap();
        assert!(
            ips.insert(attachment.ip.addr()),
            "{} handed out twice",
            attachment.ip
        );
    }
    assert_eq!(one.allocations().len(), 12);
    let first = lab.netns_dir.join("pod-0");
    let last = Ipv4Net::new(*ips.iter().max().unwrap(), 24).unwrap();
    assert!(lab.ping(&first, last.addr()));
}

#[test]
fn works_from_a_thread_inside_the_node_namespace() {
    // An agent that runs inside its node's namespace passes no host_netns:
    // the bridge must land in the caller's namespace, not the machine's.
    let lab = Lab::new();
    let mut config = lab.config("10.77.7.0/24");
    config.host_netns = None;
    let pod = lab.pod("pod-a");
    let pod_path = pod.path.clone();
    let attachment = cni::run_in(&lab.node.path, move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            let net = BridgeNetwork::new(config).await?;
            net.attach("sandbox-a", &pod_path, "eth0").await
        })
    })
    .unwrap()
    .unwrap();
    assert!(lab.links(&lab.node.path).contains(&"skiff0".to_string()));
    assert!(lab.links(&lab.node.path).contains(&attachment.host_veth));
    assert!(lab.ping(&pod.path, attachment.gateway));
    let machine = std::process::Command::new("ip")
        .args(["-o", "link", "show", "dev", &attachment.host_veth])
        .output()
        .unwrap();
    assert!(
        !machine.status.success(),
        "host veth leaked into the machine's namespace"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_collects_sandboxes_that_are_gone() {
    let lab = Lab::new();
    let net = BridgeNetwork::new(lab.config("10.77.8.0/24"))
        .await
        .unwrap();
    let live = lab.pod("live");
    let dead = lab.pod("dead");
    let kept = net.attach("live", &live.path, "eth0").await.unwrap();
    let lost = net.attach("dead", &dead.path, "eth0").await.unwrap();
    // A crash left an unreadable reservation behind.
    std::fs::write(lab.state_dir().join("10.77.8.200"), "").unwrap();
    netns::remove(&lab.netns_dir, "dead").unwrap();

    let mut removed = net.retain(|id| id == "live").await.unwrap();
    removed.sort();
    assert_eq!(removed, vec![String::new(), "dead".to_string()]);
    assert_eq!(
        net.allocations(),
        vec![("live".to_string(), kept.ip.addr())]
    );
    let links = lab.links(&lab.node.path);
    assert!(links.contains(&kept.host_veth) && !links.contains(&lost.host_veth));
    assert!(lab.ping(&live.path, kept.gateway));
}
