//! The programs in the real kernel: a cgroup of the test's own, loopback
//! endpoints, and a child process in the cgroup dialling a frontend in
//! 127.0.0.0/8, so nothing leaves the machine. The frontend's port is one
//! the test itself listens on there, answering "kernel": a connection the
//! programs did not translate reaches that listener, whatever else the
//! machine runs (another test's server on 0.0.0.0:80, say).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::service::{Backend, ServicePort};

const FRONTEND: Ipv4Addr = Ipv4Addr::new(127, 77, 0, 1);

/// A cgroup folder removed on drop.
struct TestCgroup {
    relative: String,
    path: PathBuf,
}

impl TestCgroup {
    fn new() -> Option<TestCgroup> {
        static SERIAL: AtomicUsize = AtomicUsize::new(0);
        let root = cgroup2_root()?;
        let relative = format!(
            "skiff-test-socket-{}-{}",
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed)
        );
        Some(TestCgroup {
            path: root.join(&relative),
            relative,
        })
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Endpoints that answer each connection with their name.
fn endpoint(name: &'static str) -> (u16, std::thread::JoinHandle<()>) {
    answering(Ipv4Addr::LOCALHOST, name)
}

/// A listener on a free port of `addr` that answers each connection with
/// `name`.
fn answering(addr: Ipv4Addr, name: &'static str) -> (u16, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind((addr, 0)).expect("binding a listener");
    let port = listener.local_addr().expect("endpoint address").port();
    let handle = std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            if stream.write_all(name.as_bytes()).is_err() {
                break;
            }
        }
    });
    (port, handle)
}

fn spec(ports: &[u16]) -> ServiceSpec {
    spec_on(80, ports)
}

/// A Service on `FRONTEND:frontend_port` with endpoints on `ports`.
fn spec_on(frontend_port: u16, ports: &[u16]) -> ServiceSpec {
    let backends = ports
        .iter()
        .map(|port| Backend {
            addr: Ipv4Addr::LOCALHOST,
            port: *port,
            ready: true,
            serving: true,
            terminating: false,
            node: Some("n1".into()),
        })
        .collect();
    ServiceSpec {
        key: ServiceKey::new("default", "web"),
        cluster_ips: vec![FRONTEND],
        ports: vec![ServicePort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: frontend_port,
            node_port: None,
            backends,
        }],
        load_balancer: false,
        external_local: false,
        affinity_timeout_secs: None,
    }
}

/// `count` connections to `FRONTEND:port` from a child process in the
/// cgroup: who answered, and what `getpeername()` said.
fn dial(cgroup: &TestCgroup, port: u16, count: usize) -> (BTreeMap<String, usize>, Vec<String>) {
    let script = format!(
        r#"
import socket
for _ in range({count}):
    try:
        s = socket.create_connection(("{FRONTEND}", {port}), timeout=5)
        peer = "%s:%d" % s.getpeername()
        print(s.recv(64).decode(), peer)
        s.close()
    except OSError as e:
        print("error", type(e).__name__)
"#
    );
    let output = Command::new("sh")
        .args([
            "-c",
            r#"echo $$ > "$1/cgroup.procs" && exec python3 -c "$2""#,
            "sh",
        ])
        .arg(&cgroup.path)
        .arg(script)
        .output()
        .expect("running python3 in the cgroup");
    assert!(output.status.success(), "{output:?}");
    let mut answered = BTreeMap::new();
    let mut peers = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let (who, peer) = line.split_once(' ').unwrap_or((line, ""));
        *answered.entry(who.to_owned()).or_insert(0) += 1;
        peers.push(peer.to_owned());
    }
    (answered, peers)
}

fn bpf_is_usable() -> bool {
    // Loading programs needs CAP_BPF or root; skip quietly elsewhere.
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn connect_goes_to_an_endpoint_and_getpeername_keeps_the_cluster_ip() {
    if !bpf_is_usable() {
        eprintln!("skipped: not root");
        return;
    }
    let Some(cgroup) = TestCgroup::new() else {
        eprintln!("skipped: no cgroup v2 hierarchy");
        return;
    };
    let balancer = SocketBalancer::start(&cgroup.relative, "n1").expect("attaching");
    let (a, _a) = endpoint("a");
    let (b, _b) = endpoint("b");
    let (port, _kernel) = answering(FRONTEND, "kernel");
    let key = ServiceKey::new("default", "web");

    balancer.update(&key, Some(&spec_on(port, &[a, b])));
    assert_eq!(balancer.frontends(), 1);
    let (answered, peers) = dial(&cgroup, port, 200);
    assert_eq!(answered.len(), 2, "{answered:?}");
    for n in answered.values() {
        assert!((60..=140).contains(n), "far from half each: {answered:?}");
    }
    assert!(
        peers.iter().all(|p| p == &format!("{FRONTEND}:{port}")),
        "getpeername: {peers:?}"
    );
    assert_eq!(balancer.new_flows(), BTreeMap::from([(key.clone(), 200)]));

    // One endpoint leaves: every new connection goes to the other.
    balancer.update(&key, Some(&spec_on(port, &[b])));
    let (answered, _) = dial(&cgroup, port, 30);
    assert_eq!(answered, BTreeMap::from([("b".to_owned(), 30)]));
    // The count goes on across the rewrite.
    assert_eq!(balancer.new_flows(), BTreeMap::from([(key.clone(), 230)]));

    // A process outside the cgroup is not translated.
    let mut outside = std::net::TcpStream::connect((FRONTEND, port)).expect("connecting");
    let mut said = String::new();
    std::io::Read::read_to_string(&mut outside, &mut said).expect("reading");
    assert_eq!(said, "kernel");

    // The Service goes: the frontend is left to the kernel's routing.
    balancer.update(&key, None);
    assert_eq!(balancer.frontends(), 0);
    assert!(balancer.new_flows().is_empty());
    let (answered, _) = dial(&cgroup, port, 3);
    assert_eq!(
        answered,
        BTreeMap::from([("kernel".to_owned(), 3)]),
        "connections after the Service went"
    );
}

#[test]
fn udp_and_affinity_stay_with_the_kernel_rules() {
    let mut udp = spec(&[8080]);
    udp.ports[0].protocol = Protocol::Udp;
    assert!(entries(&udp, "n1").is_empty());
    let mut pinned = spec(&[8080]);
    pinned.affinity_timeout_secs = Some(10800);
    assert!(entries(&pinned, "n1").is_empty());
    let mut empty = spec(&[8080]);
    empty.ports[0].backends[0].ready = false;
    assert!(entries(&empty, "n1").is_empty());
    assert_eq!(
        entries(&spec(&[8080, 8081]), "n1"),
        vec![Entry {
            ip: FRONTEND,
            port: 80,
            targets: vec![(Ipv4Addr::LOCALHOST, 8080), (Ipv4Addr::LOCALHOST, 8081)],
        }]
    );
}
