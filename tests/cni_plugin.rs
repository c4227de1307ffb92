//! The `skiff cni` plugin binary end to end, as a CNI runtime drives it:
//! environment variables, configuration on stdin, JSON on stdout. The plugin
//! runs inside a "node" network namespace (via nsenter), so the bridge and
//! host veths never touch the machine's own namespace. Runs as root;
//! everything is removed by a Drop guard, even when an assertion fails.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use cni::{NetNs, netns};
use ipnet::Ipv4Net;
use serde_json::{Value, json};

const POD_CIDR: &str = "10.78.1.0/24";

struct Lab {
    root: tempfile::TempDir,
    netns_dir: PathBuf,
    node: NetNs,
}

struct Reply {
    code: i32,
    stdout: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.stdout))
    }

    fn error_code(&self) -> u64 {
        assert_eq!(self.code, 1, "expected failure, got {:?}", self.stdout);
        let body = self.json();
        assert!(
            body["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "{body}"
        );
        body["code"].as_u64().expect("numeric code")
    }
}

impl Lab {
    fn new() -> Self {
        let root = tempfile::Builder::new()
            .prefix("skiff-cni-plugin-test-")
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

    fn data_dir(&self) -> PathBuf {
        self.root.path().join("ipam")
    }

    fn conf(&self) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": "skiff-test",
            "type": "skiff",
            "bridge": "skiff0",
            "podCIDR": POD_CIDR,
            "mtu": 1450,
            "dataDir": self.data_dir(),
        })
    }

    /// Runs the plugin in the node namespace with `args` (`["cni"]`, or none
    /// as a runtime would), the given CNI_* variables and stdin.
    fn plugin(&self, args: &[&str], env: &[(&str, &str)], stdin: &[u8]) -> Reply {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", self.node.path.display()))
            .arg(env!("CARGO_BIN_EXE_skiff"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = command.spawn().expect("plugin starts");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin)
            .expect("write stdin");
        let out = child.wait_with_output().expect("plugin runs");
        Reply {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        }
    }

    fn call(&self, command: &str, id: &str, ns: &Path, conf: &Value) -> Reply {
        let ns = ns.display().to_string();
        self.plugin(
            &["cni"],
            &[
                ("CNI_COMMAND", command),
                ("CNI_CONTAINERID", id),
                ("CNI_NETNS", &ns),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", "/opt/cni/bin"),
            ],
            conf.to_string().as_bytes(),
        )
    }

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

    fn ping(&self, from: &Path, to: &str) -> bool {
        self.exec(from, &["ping", "-c", "1", "-W", "2", to]).0
    }

    fn node_links(&self) -> Vec<String> {
        let (_, out) = self.exec(&self.node.path, &["ip", "-o", "link", "show"]);
        out.lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .collect()
    }

    fn address_files(&self) -> usize {
        std::fs::read_dir(self.data_dir())
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| {
                        e.file_name()
                            .to_string_lossy()
                            .parse::<std::net::Ipv4Addr>()
                            .is_ok()
                    })
                    .count()
            })
            .unwrap_or(0)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Err(err) = netns::remove_dir(&self.netns_dir) {
            eprintln!("cleanup of {} failed: {err}", self.netns_dir.display());
        }
    }
}

fn pod_address(result: &Value) -> String {
    let address = result["ips"][0]["address"].as_str().expect("an address");
    address.split('/').next().unwrap_or_default().to_string()
}

#[test]
fn add_check_del_end_to_end() {
    let lab = Lab::new();
    let conf = lab.conf();
    let a = netns::create(&lab.netns_dir, "pod-a").unwrap();
    let b = netns::create(&lab.netns_dir, "pod-b").unwrap();

    let added = lab.call("ADD", "container-a", &a.path, &conf);
    assert_eq!(added.code, 0, "{}", added.stdout);
    let result = added.json();
    assert_eq!(result["cniVersion"], "1.0.0");
    let interfaces = result["interfaces"].as_array().expect("interfaces");
    assert_eq!(interfaces.len(), 3, "{result}");
    assert_eq!(interfaces[0]["name"], "skiff0");
    assert_eq!(interfaces[1]["name"], cni::host_veth_name("container-a"));
    assert_eq!(interfaces[2]["name"], "eth0");
    assert_eq!(interfaces[2]["sandbox"], a.path.display().to_string());
    assert!(interfaces[2]["mac"].as_str().is_some_and(|m| m.len() == 17));
    let ip: Ipv4Net = result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(POD_CIDR.parse::<Ipv4Net>().unwrap().contains(&ip.addr()));
    assert_eq!(ip.prefix_len(), 24);
    assert_eq!(result["ips"][0]["gateway"], "10.78.1.1");
    assert_eq!(result["ips"][0]["interface"], 2);
    assert_eq!(
        result["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": "10.78.1.1"}])
    );

    let added_b = lab.call("ADD", "container-b", &b.path, &conf);
    assert_eq!(added_b.code, 0, "{}", added_b.stdout);
    let result_b = added_b.json();
    assert_ne!(pod_address(&result), pod_address(&result_b));
    assert!(lab.ping(&a.path, &pod_address(&result_b)));
    assert!(lab.ping(&b.path, "10.78.1.1"));
    let (_, mtu) = lab.exec(&a.path, &["ip", "-o", "link", "show", "dev", "eth0"]);
    assert!(mtu.contains("mtu 1450"), "{mtu}");

    // CHECK with the ADD result passes silently...
    let mut with_prev = conf.clone();
    with_prev["prevResult"] = result.clone();
    let checked = lab.call("CHECK", "container-a", &a.path, &with_prev);
    assert_eq!((checked.code, checked.stdout.as_str()), (0, ""));
    // ...and fails once the pod lost its address; without prevResult it is
    // a configuration error.
    lab.exec(&a.path, &["ip", "addr", "flush", "dev", "eth0"]);
    assert_eq!(
        lab.call("CHECK", "container-a", &a.path, &with_prev)
            .error_code(),
        102
    );
    assert_eq!(
        lab.call("CHECK", "container-a", &a.path, &conf)
            .error_code(),
        7
    );

    // DEL removes everything and may be repeated; it also works when the
    // namespace is already gone.
    let deleted = lab.call("DEL", "container-a", &a.path, &conf);
    assert_eq!((deleted.code, deleted.stdout.as_str()), (0, ""));
    assert_eq!(lab.call("DEL", "container-a", &a.path, &conf).code, 0);
    netns::remove(&lab.netns_dir, "pod-b").unwrap();
    assert_eq!(lab.call("DEL", "container-b", &b.path, &conf).code, 0);
    assert_eq!(lab.address_files(), 0);
    let mut links = lab.node_links();
    links.sort();
    assert_eq!(links, vec!["lo".to_string(), "skiff0".to_string()]);
}

#[test]
fn version_status_and_gc() {
    let lab = Lab::new();
    let conf = lab.conf();
    let version = lab.plugin(
        &["cni"],
        &[("CNI_COMMAND", "VERSION")],
        br#"{"cniVersion":"1.0.0"}"#,
    );
    assert_eq!(version.code, 0);
    assert_eq!(
        version.json(),
        json!({"cniVersion": "1.0.0", "supportedVersions": ["1.0.0", "1.1.0"]})
    );
    // A runtime runs the binary with no arguments at all.
    let bare = lab.plugin(
        &[],
        &[("CNI_COMMAND", "VERSION")],
        br#"{"cniVersion":"1.1.0"}"#,
    );
    assert_eq!(bare.code, 0, "{}", bare.stdout);
    assert_eq!(bare.json()["cniVersion"], "1.1.0");

    let status = lab.plugin(
        &["cni"],
        &[("CNI_COMMAND", "STATUS")],
        conf.to_string().as_bytes(),
    );
    assert_eq!((status.code, status.stdout.as_str()), (0, ""));
    // A data dir that cannot be created: not available.
    let mut broken = conf.clone();
    broken["dataDir"] = json!("/proc/no-such-dir/ipam");
    let status = lab.plugin(
        &["cni"],
        &[("CNI_COMMAND", "STATUS")],
        broken.to_string().as_bytes(),
    );
    assert_eq!(status.error_code(), 50);

    // GC releases what the runtime no longer lists.
    let keep = netns::create(&lab.netns_dir, "keep").unwrap();
    let gone = netns::create(&lab.netns_dir, "gone").unwrap();
    assert_eq!(lab.call("ADD", "keep-me", &keep.path, &conf).code, 0);
    assert_eq!(lab.call("ADD", "drop-me", &gone.path, &conf).code, 0);
    let mut gc = conf.clone();
    gc["cniVersion"] = json!("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep-me", "ifname": "eth0"}]);
    let collected = lab.plugin(
        &["cni"],
        &[("CNI_COMMAND", "GC")],
        gc.to_string().as_bytes(),
    );
    assert_eq!(collected.code, 0, "{}", collected.stdout);
    assert_eq!(lab.address_files(), 1);
    let links = lab.node_links();
    assert!(links.contains(&cni::host_veth_name("keep-me")));
    assert!(!links.contains(&cni::host_veth_name("drop-me")));
}

#[test]
fn bad_input_gets_the_spec_error_codes() {
    let lab = Lab::new();
    let conf = lab.conf();
    let pod = netns::create(&lab.netns_dir, "pod").unwrap();
    let ns = pod.path.display().to_string();

    // Undecodable configuration: 6.
    let reply = lab.plugin(
        &["cni"],
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", &ns),
            ("CNI_IFNAME", "eth0"),
        ],
        b"{\"cniVersion\": \"1.0.0\", ",
    );
    assert_eq!(reply.error_code(), 6);
    // Missing environment: 4, naming the variables.
    let reply = lab.plugin(
        &["cni"],
        &[("CNI_COMMAND", "ADD")],
        conf.to_string().as_bytes(),
    );
    assert_eq!(reply.error_code(), 4);
    assert!(
        reply.json()["details"]
            .as_str()
            .unwrap()
            .contains("CNI_NETNS")
    );
    let reply = lab.plugin(&["cni"], &[], conf.to_string().as_bytes());
    assert_eq!(reply.error_code(), 4);
    // A namespace path that does not exist: 4.
    let missing = lab.root.path().join("nope").display().to_string();
    let reply = lab.plugin(
        &["cni"],
        &[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", &missing),
            ("CNI_IFNAME", "eth0"),
        ],
        conf.to_string().as_bytes(),
    );
    assert_eq!(reply.error_code(), 4);
    // Unsupported version: 1; invalid configuration: 7.
    let mut old = conf.clone();
    old["cniVersion"] = json!("0.4.0");
    assert_eq!(lab.call("ADD", "c1", &pod.path, &old).error_code(), 1);
    let mut bad_cidr = conf.clone();
    bad_cidr["podCIDR"] = json!("10.78.1.0/40");
    assert_eq!(lab.call("ADD", "c1", &pod.path, &bad_cidr).error_code(), 7);
    // The interface name is taken inside the pod: 101, and nothing leaks.
    lab.exec(&pod.path, &["ip", "link", "add", "eth0", "type", "bridge"]);
    assert_eq!(lab.call("ADD", "c1", &pod.path, &conf).error_code(), 101);
    assert_eq!(lab.address_files(), 0);
    assert!(!lab.node_links().iter().any(|l| l.starts_with("veth")));
}
