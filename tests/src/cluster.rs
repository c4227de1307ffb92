//! A multi-node cluster on one machine, each node a network namespace.
//!
//! ```text
//!   underlay netns:  br0 ── u1 ── u2 ── … (veths to the nodes)
//!   node i netns:    eth0 172.31.X.(10+i)/24, cbr0 = first IP of its
//!                    podCIDR, skiff.1 (the overlay's TUN device)
//!   pod netns:       eth0 (veth into its node's cbr0), an IP of the
//!                    node's podCIDR, default route via cbr0
//! ```
//!
//! `skiff server` runs in node 1's namespace; Node objects for every node
//! are created with kubectl (until `skiff agent` runs in each node) and get
//! their podCIDRs from the server's node IPAM controller; each node's data
//! plane runs as `skiff dataplane` in its namespace. Every name carries a
//! prefix unique to the test run; dropping the cluster stops every process
//! and deletes every namespace, which takes their interfaces and routes
//! with them. Nothing is changed in the machine's own namespace.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use ipnet::Ipv4Net;

use crate::cgroup::Cgroup;
use crate::netns::Netns;
use crate::server::Server;

/// The overlay MTU: a 1500-byte underlay less 44 bytes of headers.
pub const POD_MTU: u16 = 1450;
const METRICS_PORT: u16 = 9469;

static CLUSTERS: AtomicU32 = AtomicU32::new(0);

pub struct Cluster {
    bin: PathBuf,
    pub prefix: String,
    subnet: u8,
    // Drop order: processes (in `Drop`), then pods, nodes, the underlay.
    server: Option<Server>,
    pods: Vec<Pod>,
    pub nodes: Vec<ClusterNode>,
    underlay: Netns,
    remote_kubeconfig: PathBuf,
    /// Extra flags for every `skiff dataplane` started from now on.
    pub dataplane_args: Vec<String>,
    pods_made: usize,
    /// The nodes' pod cgroups, `skiff-e2e/<prefix>/<node>/pod-<name>`
    /// (last: removed after everything else).
    cgroups: Option<Cgroup>,
}

pub struct ClusterNode {
    pub name: String,
    pub netns: Netns,
    pub underlay_ip: Ipv4Addr,
    pub pod_cidr: Ipv4Net,
    dataplane: Option<Child>,
    next_pod: u32,
    index: usize,
}

pub struct Pod {
    pub name: String,
    pub netns: Netns,
    pub ip: Ipv4Addr,
    pub node: usize,
}

impl Cluster {
    /// Plays the node agent for `pod`: it runs at `ip`, ready or not.
    pub fn set_pod_status(&self, pod: &str, ip: Ipv4Addr, ready: bool) -> anyhow::Result<()> {
        let status = if ready { "True" } else { "False" };
        let patch = serde_json::json!({"status": {
            "phase": "Running",
            "podIP": ip.to_string(),
            "podIPs": [{"ip": ip.to_string()}],
            "conditions": [{"type": "Ready", "status": status}],
        }});
        self.server()
            .kubectl_ok(&[
                "patch",
                "pod",
                pod,
                "--subresource=status",
                "--type=merge",
                "-p",
                &patch.to_string(),
            ])
            .with_context(|| format!("setting the status of pod {pod}"))?;
        Ok(())
    }

    /// The ClusterIP the API server gave `service` (in `default`).
    pub fn cluster_ip(&self, service: &str) -> anyhow::Result<Ipv4Addr> {
        let out = self.server().kubectl_ok(&[
            "get",
            "service",
            service,
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])?;
        out.trim()
            .parse()
            .with_context(|| format!("cluster IP of {service}: {out:?}"))
    }

    /// Builds `nodes` nodes, starts the server in the first and a data
    /// plane in each, and waits until every data plane routes to every
    /// other node.
    pub async fn start(bin: &Path, nodes: usize) -> anyhow::Result<Self> {
        Self::start_with(bin, nodes, &[], &[]).await
    }

    /// [`Cluster::start`] with extra `skiff server` flags and extra flags
    /// for every `skiff dataplane`.
    pub async fn start_with(
        bin: &Path,
        nodes: usize,
        server_args: &[&str],
        dataplane_args: &[&str],
    ) -> anyhow::Result<Self> {
        let serial = CLUSTERS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Short: interface names stay well under 15 characters.
        let prefix = format!("sk{:x}{serial}", pid % 0x10000);
        let subnet = ((pid + serial * 37) % 200 + 20) as u8;
        let underlay = Netns::create(&format!("{prefix}-u"))?;
        underlay.ip(&["link", "add", "br0", "type", "bridge"])?;
        underlay.ip(&["link", "set", "br0", "up"])?;
        let mut cluster = Cluster {
            bin: bin.to_owned(),
            prefix: prefix.clone(),
            subnet,
            server: None,
            pods: Vec::new(),
            nodes: Vec::new(),
            underlay,
            remote_kubeconfig: PathBuf::new(),
            dataplane_args: dataplane_args.iter().map(|a| a.to_string()).collect(),
            pods_made: 0,
            cgroups: Cgroup::create(&format!("skiff-e2e/{prefix}")),
        };
        for index in 0..nodes {
            cluster.add_node_netns(index)?;
        }
        let first = &cluster.nodes[0];
        let node_ip = first.underlay_ip.to_string();
        let mut args = vec![
            "--node-ip",
            &node_ip,
            "--node-name",
            &first.name,
            "--disable",
            "network",
        ];
        args.extend_from_slice(server_args);
        let server = Server::start_in_netns(bin, first.netns.name(), &args).await?;
        // The other nodes reach the API over the underlay.
        let kubeconfig = std::fs::read_to_string(server.kubeconfig())?;
        let remote = kubeconfig.replace(
            &format!("https://127.0.0.1:{}", server.port),
            &format!("https://{node_ip}:{}", server.port),
        );
        cluster.remote_kubeconfig = server.data_dir().join("kubeconfig-underlay.yaml");
        std::fs::write(&cluster.remote_kubeconfig, remote)?;
        cluster.server = Some(server);
        for index in 0..nodes {
            cluster.register_node(index)?;
        }
        for index in 0..nodes {
            cluster.wait_pod_cidr(index).await?;
            cluster.start_dataplane(index)?;
        }
        // Each other node's podCIDR, and the Service network if routed.
        let service_routes = usize::from(dataplane_args.contains(&"--service-cidr"));
        for index in 0..nodes {
            cluster
                .wait_routes(index, nodes - 1 + service_routes)
                .await?;
        }
        Ok(cluster)
    }

    pub fn server(&self) -> &Server {
        self.server
            .as_ref()
            .expect("the server runs while the cluster lives")
    }

    pub fn node(&self, index: usize) -> &ClusterNode {
        &self.nodes[index]
    }

    fn add_node_netns(&mut self, index: usize) -> anyhow::Result<()> {
        let netns = Netns::create(&format!("{}-n{}", self.prefix, index + 1))?;
        let port = format!("u{}", index + 1);
        self.underlay.add_veth(&port, &netns, "eth0")?;
        self.underlay
            .ip(&["link", "set", &port, "master", "br0", "up"])?;
        let underlay_ip = Ipv4Addr::new(172, 31, self.subnet, 11 + index as u8);
        netns.ip(&["addr", "add", &format!("{underlay_ip}/24"), "dev", "eth0"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        netns.run("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        self.nodes.push(ClusterNode {
            name: format!("node-{}", index + 1),
            netns,
            underlay_ip,
            pod_cidr: Ipv4Net::default(),
            dataplane: None,
            next_pod: 2,
            index,
        });
        Ok(())
    }

    /// Creates (or re-creates) the Node object, reporting the node's
    /// underlay address as its InternalIP.
    pub fn register_node(&self, index: usize) -> anyhow::Result<()> {
        let node = &self.nodes[index];
        let manifest = format!(
            r#"{{"apiVersion": "v1", "kind": "Node",
                "metadata": {{"name": "{name}", "labels": {{"kubernetes.io/hostname": "{name}"}}}},
                "status": {{"addresses": [{{"type": "InternalIP", "address": "{ip}"}},
                                          {{"type": "Hostname", "address": "{name}"}}]}}}}"#,
            name = node.name,
            ip = node.underlay_ip
        );
        self.server()
            .kubectl_stdin(&["create", "-f", "-"], &manifest)?;
        Ok(())
    }

    /// Waits for the IPAM controller to give the node a podCIDR, then
    /// makes the node's pod bridge with the range's first address.
    async fn wait_pod_cidr(&mut self, index: usize) -> anyhow::Result<()> {
        let name = self.nodes[index].name.clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        let cidr: Ipv4Net = loop {
            let out = self.server().kubectl_ok(&[
                "get",
                "node",
                &name,
                "-o",
                "jsonpath={.spec.podCIDR}",
            ])?;
            if let Ok(cidr) = out.trim().parse() {
                break cidr;
            }
            if Instant::now() > deadline {
                bail!("{name} got no podCIDR: {}", self.server().log_tail());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let node = &mut self.nodes[index];
        if node.pod_cidr != cidr {
            node.pod_cidr = cidr;
            let gateway = gateway(cidr)?;
            let _ = node.netns.ip(&["link", "del", "cbr0"]);
            node.netns.ip(&["link", "add", "cbr0", "type", "bridge"])?;
            node.netns.ip(&[
                "addr",
                "add",
                &format!("{gateway}/{}", cidr.prefix_len()),
                "dev",
                "cbr0",
            ])?;
            node.netns
                .ip(&["link", "set", "cbr0", "mtu", &POD_MTU.to_string(), "up"])?;
        }
        Ok(())
    }

    /// Starts `skiff dataplane` for the node in its namespace.
    pub fn start_dataplane(&mut self, index: usize) -> anyhow::Result<()> {
        let log_path = self
            .server()
            .data_dir()
            .join(format!("dataplane-{}.log", index + 1));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let kubeconfig = if index == 0 {
            self.server().kubeconfig()
        } else {
            self.remote_kubeconfig.clone()
        };
        let node = &mut self.nodes[index];
        // `ip netns exec` mounts a fresh /sys, without the cgroup
        // hierarchies; the node sees the v2 one where a unified host has it.
        let mut command = node.netns.command("sh");
        let child = command
            .args([
                "-c",
                r#"mount -t cgroup2 none /sys/fs/cgroup 2>/dev/null; exec "$@""#,
                "sh",
            ])
            .arg(&self.bin)
            .arg("dataplane")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--node-name", &node.name])
            .args(["--node-ip", &node.underlay_ip.to_string()])
            .args(["--mtu", &POD_MTU.to_string()])
            .args(["--metrics-addr", &format!("127.0.0.1:{METRICS_PORT}")])
            .args(
                self.cgroups
                    .as_ref()
                    .map(|c| {
                        [
                            "--pod-cgroup".to_owned(),
                            format!("{}/{}", c.relative(), node.name),
                        ]
                    })
                    .into_iter()
                    .flatten(),
            )
            .args(&self.dataplane_args)
            .env("RUST_LOG", "info")
            .env("RUST_BACKTRACE", "0")
            .env("RUST_LIB_BACKTRACE", "0")
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting skiff dataplane")?;
        node.dataplane = Some(child);
        Ok(())
    }

    /// Kills the node's data plane (SIGKILL, as a crash would).
    pub fn stop_dataplane(&mut self, index: usize) {
        if let Some(mut child) = self.nodes[index].dataplane.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The process id of the node's data plane.
    pub fn dataplane_pid(&self, index: usize) -> Option<u32> {
        self.nodes[index].dataplane.as_ref().map(Child::id)
    }

    /// Restarts every node's data plane (to pick up `dataplane_args`).
    pub async fn restart_dataplanes(&mut self) -> anyhow::Result<()> {
        for index in 0..self.nodes.len() {
            self.stop_dataplane(index);
            self.start_dataplane(index)?;
        }
        for index in 0..self.nodes.len() {
            self.wait_routes(index, self.nodes.len() - 1).await?;
        }
        Ok(())
    }

    /// Whether the node's data plane process is still running.
    pub fn dataplane_running(&mut self, index: usize) -> bool {
        self.nodes[index]
            .dataplane
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Moves the node to another underlay address (its namespace and Node
    /// object both), as a node that came back with a new IP would.
    pub fn change_underlay_ip(&mut self, index: usize, last_octet: u8) -> anyhow::Result<()> {
        let new_ip = Ipv4Addr::new(172, 31, self.subnet, last_octet);
        let node = &mut self.nodes[index];
        let old = format!("{}/24", node.underlay_ip);
        // Old first: deleting a primary address takes its secondaries.
        node.netns.ip(&["addr", "del", &old, "dev", "eth0"])?;
        node.netns
            .ip(&["addr", "add", &format!("{new_ip}/24"), "dev", "eth0"])?;
        node.underlay_ip = new_ip;
        let patch = format!(
            r#"{{"status": {{"addresses": [{{"type": "InternalIP", "address": "{new_ip}"}},
                                            {{"type": "Hostname", "address": "{}"}}]}}}}"#,
            node.name
        );
        let name = node.name.clone();
        self.server().kubectl_ok(&[
            "patch",
            "node",
            &name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch,
        ])?;
        Ok(())
    }

    /// The data plane log of a node, for failure messages.
    pub fn dataplane_log(&self, index: usize) -> String {
        let path = self
            .server()
            .data_dir()
            .join(format!("dataplane-{}.log", index + 1));
        let log = std::fs::read_to_string(path).unwrap_or_default();
        let start = log.len().saturating_sub(3000);
        log[log.floor_char_boundary(start)..].to_owned()
    }

    /// The node's routes into the overlay device (`ip route show dev
    /// skiff.1`), one prefix per entry.
    pub fn overlay_routes(&self, index: usize) -> Vec<String> {
        self.nodes[index]
            .netns
            .ip(&["route", "show", "dev", "skiff.1"])
            .map(|out| {
                out.lines()
                    .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until the node's data plane routes `count` prefixes.
    pub async fn wait_routes(&self, index: usize, count: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let routes = self.overlay_routes(index);
            if routes.len() == count {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} routes {routes:?}, not {count} prefixes: {}",
                    index + 1,
                    self.dataplane_log(index)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The node's data plane metrics.
    pub fn metrics(&self, index: usize) -> anyhow::Result<String> {
        self.nodes[index].netns.run(
            "curl",
            &["-sf", &format!("http://127.0.0.1:{METRICS_PORT}/metrics")],
        )
    }

    /// A pod on node `index`: a namespace with a veth into the node's
    /// bridge and the next free address of the node's podCIDR.
    pub fn add_pod(&mut self, index: usize, name: &str) -> anyhow::Result<&Pod> {
        self.pods_made += 1;
        let serial = self.pods_made;
        let mut netns = Netns::create(&format!("{}-p{serial}", self.prefix))?;
        let node = &mut self.nodes[index];
        // As runc puts a pod's containers below the node's pod cgroup.
        if let Some(cgroups) = &self.cgroups {
            let dir = cgroups.path().join(&node.name).join(format!("pod-{name}"));
            std::fs::create_dir_all(&dir)?;
            netns.set_cgroup(dir);
        }
        let ip = node
            .pod_cidr
            .hosts()
            .nth(node.next_pod as usize - 1)
            .context("the podCIDR is full")?;
        node.next_pod += 1;
        let host_end = format!("v{serial}");
        node.netns.add_veth(&host_end, &netns, "eth0")?;
        let mtu = POD_MTU.to_string();
        node.netns.ip(&[
            "link", "set", &host_end, "master", "cbr0", "mtu", &mtu, "up",
        ])?;
        // As the agent's CNI does: a pod reaching itself through a Service
        // translated by the kernel comes back out of its own port.
        node.netns.ip(&[
            "link",
            "set",
            &host_end,
            "type",
            "bridge_slave",
            "hairpin",
            "on",
        ])?;
        netns.ip(&[
            "addr",
            "add",
            &format!("{ip}/{}", node.pod_cidr.prefix_len()),
            "dev",
            "eth0",
        ])?;
        netns.ip(&["link", "set", "eth0", "mtu", &mtu, "up"])?;
        netns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &gateway(node.pod_cidr)?.to_string(),
        ])?;
        self.pods.push(Pod {
            name: name.to_owned(),
            netns,
            ip,
            node: node.index,
        });
        Ok(self.pods.last().expect("just pushed"))
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }

    /// Deletes a pod's namespace (and so its veth).
    pub fn remove_pod(&mut self, name: &str) {
        self.pods.retain(|p| p.name != name);
    }

    pub fn underlay(&self) -> &Netns {
        &self.underlay
    }

    pub fn subnet(&self) -> u8 {
        self.subnet
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for index in 0..self.nodes.len() {
            self.stop_dataplane(index);
        }
        if let Some(mut server) = self.server.take() {
            server.kill();
        }
        // The namespaces go with the fields, pods first.
    }
}

/// The first address of a podCIDR, the pods' gateway.
fn gateway(cidr: Ipv4Net) -> anyhow::Result<Ipv4Addr> {
    cidr.hosts().next().context("podCIDR has no host addresses")
}
