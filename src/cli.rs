//! The command line. Flag names and defaults follow k3s so that its users
//! feel at home.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;

#[derive(Parser, Debug)]
#[command(
    name = "skiff",
    version,
    about = "A lean, Kubernetes-compatible cluster in one binary"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once at start: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the control plane, with a local agent and networking.
    Server(ServerArgs),
    /// Run a node agent that joins an existing server.
    Agent(AgentArgs),
    /// Manage this node's image store.
    Images(ImagesArgs),
    /// Act as a CNI 1.x plugin (CNI_* environment, configuration on stdin).
    #[command(hide = true)]
    Cni,
    /// The container monitor the agent starts for each container.
    #[command(hide = true)]
    Shim(ShimArgs),
    /// Run only this node's pod network data plane (tests, debugging).
    #[command(
        hide = true,
        args_conflicts_with_subcommands = true,
        subcommand_negates_reqs = true
    )]
    Dataplane(crate::dataplane::DataplaneArgs),
    /// Run only the cluster DNS server against a cluster (benchmarks, debugging).
    #[command(hide = true)]
    Dns(DnsArgs),
    /// Run only the Ingress controller against a cluster (benchmarks, debugging).
    #[command(hide = true)]
    Ingress(IngressArgs),
}

/// Flags that every node has, server or agent.
#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    /// Folder for all state of this node.
    #[arg(
        long,
        short = 'd',
        default_value = "/var/lib/skiff",
        env = "SKIFF_DATA_DIR"
    )]
    pub data_dir: PathBuf,
    /// Node name (default: the hostname).
    #[arg(long, env = "SKIFF_NODE_NAME")]
    pub node_name: Option<String>,
    /// IP address to advertise for the node.
    #[arg(long, env = "SKIFF_NODE_IP")]
    pub node_ip: Option<IpAddr>,
    /// First delay before restarting a crashed container (doubles up to
    /// 5 min); shorter for tests.
    #[arg(long, hide = true, default_value = "10s", value_parser = seconds, env = "SKIFF_CRASH_LOOP_BACKOFF")]
    pub crash_loop_backoff: Duration,
    /// Port of the node's kubelet API (logs, exec, port-forward, resource
    /// metrics); tests give nodes sharing an address different ports.
    #[arg(long, hide = true, default_value_t = 10250, env = "SKIFF_KUBELET_PORT")]
    pub kubelet_port: u16,
    /// Pod network data plane: worker threads and TUN queues (0: one per
    /// CPU).
    #[arg(long, default_value_t = 0)]
    pub dataplane_workers: usize,
    /// Pod network data plane: largest TCP super-packet the kernel hands
    /// the TUN device, in bytes.
    #[arg(long)]
    pub dataplane_max_super_packet: Option<u32>,
    /// Pod network data plane: after a packet, keep polling this many
    /// microseconds instead of sleeping, while the machine has a CPU to
    /// spare. Lower latency for sparse traffic, at the cost of a busy CPU
    /// while packets keep coming (0: off).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(..=1_000_000))]
    pub dataplane_busy_poll_us: u64,
}

#[derive(Args, Debug)]
pub struct ServerArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// HTTPS port of the API server.
    #[arg(long, default_value_t = 6443)]
    pub https_listen_port: u16,
    /// Also write the admin kubeconfig here.
    #[arg(long, env = "SKIFF_KUBECONFIG_OUTPUT")]
    pub write_kubeconfig: Option<PathBuf>,
    /// etcd endpoints (`http://host:port`, comma-separated); the embedded
    /// store when absent.
    #[arg(long, env = "SKIFF_DATASTORE_ENDPOINT")]
    pub datastore_endpoint: Option<String>,
    /// Do not run a component (repeatable): agent, network, dns, ingress.
    #[arg(long = "disable", value_name = "COMPONENT")]
    pub disable: Vec<Component>,
    /// Do not run the scheduler (as k3s's flag of that name).
    #[arg(long)]
    pub disable_scheduler: bool,
    /// Do not run the controllers (as k3s's flag of that name).
    #[arg(long)]
    pub disable_controller_manager: bool,
    /// Pod IP range; each node gets a slice of it.
    #[arg(long, default_value = "10.42.0.0/16")]
    pub cluster_cidr: IpNet,
    /// Service ClusterIP range.
    #[arg(long, default_value = "10.43.0.0/16")]
    pub service_cidr: IpNet,
    /// Address of the cluster DNS service.
    #[arg(long, default_value = "10.43.0.10")]
    pub cluster_dns: IpAddr,
    /// Cluster domain.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Shared secret nodes use to join (generated when absent).
    #[arg(long, env = "SKIFF_TOKEN")]
    pub token: Option<String>,
    /// How long a node may go without renewing its Lease before it is
    /// unreachable (kube-controller-manager's `--node-monitor-grace-period`).
    #[arg(long, hide = true, default_value = "40s", value_parser = seconds, env = "SKIFF_NODE_MONITOR_GRACE")]
    pub node_monitor_grace_period: Duration,
    /// How often node agents' resource usage is scraped for
    /// `metrics.k8s.io` (metrics-server's `--metric-resolution`).
    #[arg(long, hide = true, default_value = "15s", value_parser = seconds)]
    pub metric_resolution: Duration,
    /// How often each HorizontalPodAutoscaler is evaluated
    /// (kube-controller-manager's `--horizontal-pod-autoscaler-sync-period`).
    #[arg(long, hide = true, default_value = "15s", value_parser = seconds)]
    pub horizontal_pod_autoscaler_sync_period: Duration,
    /// Port of the Ingress controller's plain HTTP listener.
    #[arg(long, default_value_t = 80, hide = true)]
    pub ingress_http_port: u16,
    /// Port of the Ingress controller's HTTPS listener.
    #[arg(long, default_value_t = 443, hide = true)]
    pub ingress_https_port: u16,
    /// Port of the Ingress controller's `/metrics` (0: not served).
    #[arg(long, default_value_t = 10254, hide = true)]
    pub ingress_metrics_port: u16,
    /// Extra addresses for cluster DNS (repeatable), besides the cluster DNS
    /// address when it is local.
    #[arg(long = "dns-listen", value_name = "ADDR:PORT", hide = true)]
    pub dns_listen: Vec<SocketAddr>,
    /// resolv.conf listing the upstream resolvers for names outside the cluster.
    #[arg(long, default_value = "/etc/resolv.conf", hide = true)]
    pub dns_upstream_resolv_conf: PathBuf,
    /// Where cluster DNS serves Prometheus metrics.
    #[arg(long, value_name = "ADDR:PORT", hide = true)]
    pub dns_metrics_listen: Option<SocketAddr>,
}

/// `40`, `40s`, `1.5s` or `500ms`; at most a year, since these periods are
/// added to instants and doubled, which a larger one could overflow.
fn seconds(value: &str) -> Result<Duration, String> {
    const LONGEST: Duration = Duration::from_secs(365 * 24 * 3600);
    let (number, scale) = match value.strip_suffix("ms") {
        Some(ms) => (ms, 1e-3),
        None => (value.strip_suffix('s').unwrap_or(value), 1.0),
    };
    let duration = number
        .parse::<f64>()
        .ok()
        .and_then(|n| Duration::try_from_secs_f64(n * scale).ok())
        .ok_or_else(|| format!("{value:?} is not a duration such as 40s"))?;
    if duration > LONGEST {
        return Err(format!("{value:?} is longer than a year"));
    }
    Ok(duration)
}

#[derive(Args, Debug)]
pub struct DnsArgs {
    /// Kubeconfig of the cluster to serve.
    #[arg(long)]
    pub kubeconfig: PathBuf,
    /// Address to serve on (repeatable).
    #[arg(long, required = true, value_name = "ADDR:PORT")]
    pub listen: Vec<SocketAddr>,
    /// Cluster domain.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Record TTL in seconds.
    #[arg(long, default_value_t = 5)]
    pub ttl: u32,
    /// UDP worker threads per address (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// resolv.conf listing the upstream resolvers ("none": do not forward).
    #[arg(long, default_value = "/etc/resolv.conf")]
    pub upstream_resolv_conf: PathBuf,
    /// Where to serve Prometheus metrics.
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics_listen: Option<SocketAddr>,
    /// The cluster DNS address, served as `ns.dns.<zone>`.
    #[arg(long)]
    pub cluster_dns: Option<IpAddr>,
}

#[derive(Args, Debug)]
pub struct IngressArgs {
    /// Kubeconfig of the cluster to serve.
    #[arg(long)]
    pub kubeconfig: PathBuf,
    /// Plain HTTP listen address.
    #[arg(long, default_value = "0.0.0.0:80")]
    pub http: std::net::SocketAddr,
    /// HTTPS listen address.
    #[arg(long, default_value = "0.0.0.0:443")]
    pub https: std::net::SocketAddr,
    /// `/metrics` listen address.
    #[arg(long)]
    pub metrics: Option<std::net::SocketAddr>,
    /// Addresses written to the Ingresses' status.
    #[arg(long = "node-address")]
    pub node_addresses: Vec<IpAddr>,
    /// Do not log every request.
    #[arg(long)]
    pub no_access_log: bool,
    /// Refuse TLS session resumption (to measure full handshakes).
    #[arg(long)]
    pub no_tls_resumption: bool,
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    #[command(flatten)]
    pub node: NodeArgs,
    /// The server to join (`https://host:6443`).
    #[arg(long, env = "SKIFF_URL")]
    pub server: String,
    /// The server's node join token.
    #[arg(long, env = "SKIFF_TOKEN")]
    pub token: String,
    /// Do not run a node service (repeatable): dns.
    #[arg(long = "disable", value_name = "COMPONENT")]
    pub disable: Vec<AgentComponent>,
    /// resolv.conf listing the upstream resolvers the node's DNS forwards
    /// names outside the cluster to.
    #[arg(long, default_value = "/etc/resolv.conf", hide = true)]
    pub dns_upstream_resolv_conf: PathBuf,
}

/// What a joined node can run without.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentComponent {
    /// The node-local cluster DNS (`skiff dns` on the cluster DNS address).
    Dns,
}

#[derive(Args, Debug)]
pub struct ShimArgs {
    /// The container's state directory, holding the shim's spec.
    #[arg(long)]
    pub state_dir: PathBuf,
}

#[derive(Args, Debug)]
pub struct ImagesArgs {
    /// Folder for all state of this node.
    #[arg(
        long,
        short = 'd',
        global = true,
        default_value = "/var/lib/skiff",
        env = "SKIFF_DATA_DIR"
    )]
    pub data_dir: PathBuf,
    #[command(subcommand)]
    pub command: ImagesCommand,
}

#[derive(Subcommand, Debug)]
pub enum ImagesCommand {
    /// Import `docker save` archives, OCI image archives (.tar, .tar.gz) or
    /// OCI layout folders.
    Import {
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// List images.
    #[command(alias = "list")]
    Ls,
    /// Remove images by reference or id.
    #[command(alias = "remove")]
    Rm {
        #[arg(required = true, value_name = "REF")]
        references: Vec<String>,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Agent,
    Network,
    Dns,
    Ingress,
    /// The resource metrics API (`metrics.k8s.io`) and its scraping.
    MetricsServer,
}

/// The least `skiff agent` command line, for tests.
#[cfg(test)]
pub(crate) const AGENT: [&str; 6] = [
    "skiff",
    "agent",
    "--server",
    "https://s:6443",
    "--token",
    "t",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_defaults_match_k3s() {
        let cli = Cli::try_parse_from(["skiff", "server"]).unwrap();
        let Command::Server(args) = cli.command else {
            panic!("not a server command");
        };
        assert_eq!(args.https_listen_port, 6443);
        assert_eq!(args.node.data_dir, PathBuf::from("/var/lib/skiff"));
        assert_eq!(args.cluster_cidr.to_string(), "10.42.0.0/16");
        assert_eq!(args.service_cidr.to_string(), "10.43.0.0/16");
        assert_eq!(args.cluster_dns.to_string(), "10.43.0.10");
        assert_eq!(args.cluster_domain, "cluster.local");
        assert_eq!(args.node_monitor_grace_period, Duration::from_secs(40));
    }

    #[test]
    fn grace_period_takes_durations() {
        for (flag, want) in [("3", 3000), ("3s", 3000), ("1.5s", 1500), ("500ms", 500)] {
            let cli = Cli::try_parse_from(["skiff", "server", "--node-monitor-grace-period", flag])
                .unwrap();
            let Command::Server(args) = cli.command else {
                panic!("not a server command");
            };
            assert_eq!(args.node_monitor_grace_period, Duration::from_millis(want));
        }
        for bad in ["-1s", "1e12s", "soon"] {
            assert!(
                Cli::try_parse_from(["skiff", "server", "--node-monitor-grace-period", bad])
                    .is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn bad_flags_are_rejected() {
        assert!(
            Cli::try_parse_from(["skiff", "server", "--cluster-cidr", "10.42.0.0/33"]).is_err()
        );
        assert!(Cli::try_parse_from(["skiff", "server", "--disable", "everything"]).is_err());
        assert!(Cli::try_parse_from(["skiff", "agent"]).is_err());
        let disabled = |extra: &[&str]| {
            Cli::try_parse_from(AGENT.iter().chain(extra)).map(|cli| match cli.command {
                Command::Agent(args) => args.disable,
                _ => Vec::new(),
            })
        };
        assert_eq!(disabled(&[]).unwrap(), []);
        assert_eq!(
            disabled(&["--disable", "dns"]).unwrap(),
            [AgentComponent::Dns]
        );
        assert!(disabled(&["--disable", "agent"]).is_err());
    }
}
