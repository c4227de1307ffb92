//! The kernel backend for Services: the same Service model the engine
//! balances, programmed as nftables rules in the node's network namespace
//! for connections from this node's pods (kube-proxy nftables mode's
//! shape, see `rules`). A pod reaching a Service then never enters the TUN
//! device for the translation: an endpoint on the same node is reached
//! across the bridge, one on another node as plain pod-to-pod overlay
//! traffic, and conntrack restores the cluster IP on the replies.
//!
//! What stays with the engine: Services with ClientIP affinity, Service
//! ports without endpoints (the engine refuses them at once), NodePort
//! and LoadBalancer traffic, and connections from host processes (the
//! output path is not hooked, so they are routed into the device).
//!
//! Updates are incremental: each change appends the operations for the
//! Service it touched, and a task sends what has gathered as one netlink
//! transaction (`netlink`). If one fails, the whole table is rebuilt from
//! the model: the skeleton by `nft`, the Services by netlink.

mod flows;
mod netlink;
mod rules;

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

use crate::service::{ServiceKey, ServiceSpec};

pub use rules::Hairpin;
pub(crate) use rules::{Frontend, port_rules};
use rules::{Op, PortRule};

/// How long a failed transaction waits before the table is rebuilt.
const RETRY: Duration = Duration::from_secs(1);
/// `br_netfilter`'s switch in the node's namespace.
const BRIDGE_NF: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("running nft: {0}")]
    Spawn(std::io::Error),
    #[error("nft refused the update: {0}")]
    Refused(String),
    #[error(transparent)]
    Netlink(#[from] netlink::Error),
    #[error("the netlink task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The kernel backend's model of what is programmed, and the operations
/// not yet sent.
pub struct Kernel {
    state: Mutex<State>,
    wake: Notify,
    tun: String,
    hairpin: Hairpin,
    node: String,
    node_ips: Vec<Ipv4Addr>,
}

#[derive(Default)]
struct State {
    services: HashMap<ServiceKey, Vec<PortRule>>,
    /// Endpoint addresses in the hairpin set, with how many Service ports
    /// use each.
    endpoints: BTreeMap<Ipv4Addr, usize>,
    pending: Vec<Op>,
    /// The next transaction rebuilds the table from `services`.
    rebuild: bool,
    /// New flows per Service port chain, as last read from the kernel.
    counters: BTreeMap<String, u64>,
}

impl Kernel {
    /// Creates the (empty) table in this network namespace for node
    /// `node`, reached at `node_ips`; `None` (logged) when nftables cannot
    /// be used here.
    pub async fn start(tun: &str, node: &str, node_ips: Vec<Ipv4Addr>) -> Option<Kernel> {
        let hairpin = match std::fs::read_to_string(BRIDGE_NF) {
            Ok(on) if on.trim() == "1" => Hairpin::SelfOnly,
            _ => Hairpin::AllLocal,
        };
        let kernel = Kernel {
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            tun: tun.to_owned(),
            hairpin,
            node: node.to_owned(),
            node_ips,
        };
        match nft(&rules::skeleton(tun, hairpin, &kernel.node_ips)).await {
            Ok(()) => {
                tracing::info!(
                    table = rules::TABLE,
                    ?hairpin,
                    "Services from local pods are balanced by nftables"
                );
                Some(kernel)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot program nftables here");
                None
            }
        }
    }

    /// Brings one Service's rules in line with `spec` (`None`: gone).
    pub fn update(&self, key: &ServiceKey, spec: Option<&ServiceSpec>) {
        let new = spec
            .map(|spec| rules::port_rules(spec, &self.node))
            .unwrap_or_default();
        let mut state = self.lock();
        let old = state.services.remove(key).unwrap_or_default();
        if old == new {
            if !new.is_empty() {
                state.services.insert(key.clone(), new);
            }
            return;
        }
        let State {
            pending, endpoints, ..
        } = &mut *state;
        rules::diff(&old, &new, pending);
        let (mut added, mut gone) = (Vec::new(), Vec::new());
        for rule in &new {
            for (ip, _) in &rule.targets {
                let count = endpoints.entry(*ip).or_default();
                *count += 1;
                if *count == 1 {
                    added.push(*ip);
                }
            }
        }
        for rule in &old {
            for (ip, _) in &rule.targets {
                if let Some(count) = endpoints.get_mut(ip) {
                    *count -= 1;
                    if *count == 0 {
                        endpoints.remove(ip);
                        gone.push(*ip);
                    }
                }
            }
        }
        rules::hairpin(&gone, false, pending);
        rules::hairpin(&added, true, pending);
        if !new.is_empty() {
            state.services.insert(key.clone(), new);
        }
        drop(state);
        self.wake.notify_one();
    }

    /// Rebuilds the table from the model, then sends gathered updates
    /// until the future is dropped.
    pub async fn run(&self) {
        self.lock().rebuild = true;
        self.wake.notify_one();
        loop {
            self.wake.notified().await;
            let (skeleton, ops) = {
                let mut state = self.lock();
                if state.rebuild {
                    state.rebuild = false;
                    state.pending.clear();
                    let skeleton = rules::skeleton(&self.tun, self.hairpin, &self.node_ips);
                    (Some(skeleton), self.full(&state))
                } else {
                    (None, std::mem::take(&mut state.pending))
                }
            };
            if skeleton.is_none() && ops.is_empty() {
                continue;
            }
            if let Err(e) = apply(skeleton, ops).await {
                tracing::warn!(error = %e, "updating the Service rules; rebuilding the table");
                self.lock().rebuild = true;
                tokio::time::sleep(RETRY).await;
                self.wake.notify_one();
            }
        }
    }

    /// Reads the per-port new-flow counters from the kernel.
    pub async fn refresh_counters(&self) {
        let read = tokio::task::spawn_blocking(netlink::counters).await;
        match read
            .map_err(Error::from)
            .and_then(|r| r.map_err(Error::from))
        {
            Ok(counters) => self.lock().counters = counters,
            Err(e) => tracing::debug!(error = %e, "reading the Service rule counters"),
        }
    }

    /// Removes the table (the data plane stops): the kernel must not go
    /// on sending Service traffic to endpoints nobody follows any more.
    /// Blocking, for `Drop`.
    pub fn remove_blocking(&self) {
        let removed = std::process::Command::new("nft")
            .args(["delete", "table", "ip", rules::TABLE])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Err(e) = removed {
            tracing::warn!(error = %e, "removing the Service rules");
        }
    }

    /// New flows per Service, as of the last [`Kernel::refresh_counters`].
    pub fn new_flows(&self) -> BTreeMap<ServiceKey, u64> {
        let mut by_service = BTreeMap::new();
        for (chain, n) in &self.lock().counters {
            if let Some(key) = rules::service_of_chain(chain) {
                *by_service.entry(key).or_default() += n;
            }
        }
        by_service
    }

    /// The kernel's tracked connections to Services, one line each in the
    /// engine's `conntrack -L` shape.
    pub fn flows(&self) -> String {
        let mut frontends: HashMap<(Ipv4Addr, u16, u8), ServiceKey> = HashMap::new();
        for (key, ports) in &self.lock().services {
            for rule in ports {
                let protocol = rule.protocol.number();
                for frontend in &rule.frontends {
                    match *frontend {
                        Frontend::Cluster(ip, port) => {
                            frontends.insert((ip, port, protocol), key.clone());
                        }
                        Frontend::Node(port) => {
                            for ip in &self.node_ips {
                                frontends.insert((*ip, port, protocol), key.clone());
                            }
                        }
                    }
                }
            }
        }
        match std::fs::read_to_string("/proc/net/nf_conntrack") {
            Ok(table) => flows::service_flows(&table, &frontends),
            Err(e) => {
                tracing::debug!(error = %e, "reading the kernel's connection table");
                String::new()
            }
        }
    }

    /// Every Service in the model, for a rebuild onto a fresh skeleton.
    fn full(&self, state: &State) -> Vec<Op> {
        let mut ops = Vec::new();
        for rules in state.services.values() {
            rules::diff(&[], rules, &mut ops);
        }
        let endpoints: Vec<Ipv4Addr> = state.endpoints.keys().copied().collect();
        rules::hairpin(&endpoints, true, &mut ops);
        ops
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(state) => state,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

/// Recreates the table from `skeleton` if given, then applies `ops`.
/// Until they land, Service traffic is routed into the TUN device, where
/// the engine balances it.
async fn apply(skeleton: Option<String>, ops: Vec<Op>) -> Result<(), Error> {
    if let Some(skeleton) = skeleton {
        nft(&skeleton).await?;
    }
    // Blocking socket calls, and a rebuild's batch holds every Service:
    // off the runtime's workers.
    tokio::task::spawn_blocking(move || netlink::apply(&ops)).await??;
    Ok(())
}

/// Runs `script` as one `nft` transaction.
async fn nft(script: &str) -> Result<(), Error> {
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(Error::Spawn)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(Error::Spawn)?;
    }
    let output = child.wait_with_output().await.map_err(Error::Spawn)?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::Refused(first_lines(&output.stderr)))
    }
}

/// nft's error text, without the script echo past a few lines.
fn first_lines(stderr: &[u8]) -> String {
    String::from_utf8_lossy(stderr)
        .lines()
        .take(6)
        .collect::<Vec<_>>()
        .join(" | ")
}
