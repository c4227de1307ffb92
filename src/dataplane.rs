//! The pod network data plane as `skiff server` runs it for its own node,
//! and as the hidden `skiff dataplane` runs it alone with a kubeconfig
//! (multi-node tests, debugging) until the node agent runs it.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use dataplane::overlay::{self, OverlayConfig};
use ipnet::IpNet;

use crate::cli::{NodeArgs, ServerArgs};

#[derive(Args, Debug)]
pub struct DataplaneArgs {
    #[command(subcommand)]
    pub command: Option<DataplaneCommand>,
    /// Kubeconfig of the cluster whose Node objects to follow.
    #[arg(long, required = true)]
    pub kubeconfig: Option<PathBuf>,
    /// This node's Node object.
    #[arg(long, required = true)]
    pub node_name: Option<String>,
    /// This node's underlay address (its InternalIP).
    #[arg(long, required = true)]
    pub node_ip: Option<IpAddr>,
    #[arg(long, default_value_t = overlay::DEFAULT_PORT)]
    pub port: u16,
    /// The TUN device; the pod bridge is `skiff0`.
    #[arg(long, default_value = dataplane::overlay::DEFAULT_TUN)]
    pub tun_name: String,
    #[arg(long, default_value_t = 1450)]
    pub mtu: u16,
    /// Also route this range into the overlay (Service ClusterIPs) and
    /// balance Services.
    #[arg(long)]
    pub service_cidr: Option<IpNet>,
    /// The pod network (for the Service engine's SNAT decisions).
    #[arg(long)]
    pub cluster_cidr: Option<IpNet>,
    /// Worker threads and TUN queues (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Largest TCP super-packet the kernel hands the TUN device, in bytes.
    #[arg(long)]
    pub max_super_packet: Option<u32>,
    /// After a packet, keep polling this many microseconds instead of
    /// sleeping, while the machine has a CPU to spare: lower latency for
    /// sparse traffic, at the cost of a busy CPU while packets keep coming
    /// (0: off).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(..=1_000_000))]
    pub busy_poll_us: u64,
    /// Serve Prometheus metrics at this address.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Who balances connections from this node's pods to Services:
    /// `engine` (the data plane's own NAT), `nftables` (kernel rules, as
    /// kube-proxy's nftables mode; also `externalTrafficPolicy: Local`
    /// NodePorts from outside), `socket` (TCP translated at `connect()` by
    /// a BPF program on the pods' cgroup, nftables for the rest) or `auto`
    /// (each of socket and nftables where it works here, else the engine).
    #[arg(long, default_value = "auto")]
    pub service_backend: overlay::ServiceBackend,
    /// The cgroup v2 folder of this node's pods, relative to the
    /// hierarchy's root (default: the node agent's `/skiff/<node>`).
    #[arg(long)]
    pub pod_cgroup: Option<String>,
}

#[derive(clap::Subcommand, Debug)]
pub enum DataplaneCommand {
    /// List the Service engine's live flows (as `conntrack -L`), read from
    /// a running data plane's metrics port.
    Conntrack {
        /// The data plane's `--metrics-addr`.
        #[arg(long, default_value = "127.0.0.1:9469")]
        addr: SocketAddr,
    },
}

pub async fn run(args: DataplaneArgs) -> anyhow::Result<()> {
    if let Some(DataplaneCommand::Conntrack { addr }) = args.command {
        let flows = conntrack(addr).await?;
        print!("{flows}");
        return Ok(());
    }
    // Required by clap unless a subcommand is given.
    let (Some(kubeconfig_path), Some(node_name), Some(node_ip)) =
        (args.kubeconfig, args.node_name, args.node_ip)
    else {
        anyhow::bail!("--kubeconfig, --node-name and --node-ip are required");
    };
    let kubeconfig = kube::config::Kubeconfig::read_from(&kubeconfig_path)
        .with_context(|| format!("reading {}", kubeconfig_path.display()))?;
    let client_config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    let client =
        crate::api_client::multiplexed(client_config).context("building the API client")?;
    let mut config = OverlayConfig::new(node_name, node_ip);
    config.port = args.port;
    config.tun_name = args.tun_name;
    config.mtu = args.mtu;
    config.service_cidr = args.service_cidr;
    config.cluster_cidr = args.cluster_cidr;
    tune(
        &mut config,
        args.workers,
        args.max_super_packet,
        args.busy_poll_us,
    );
    config.metrics_addr = args.metrics_addr;
    config.service_backend = args.service_backend;
    config.pod_cgroup = args.pod_cgroup;
    let run = overlay::run(client, config);
    tokio::select! {
        result = run => result.context("pod network data plane"),
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

/// The server's own node's data plane: never fails the server; a missing
/// TUN device is logged, counted and retried.
pub fn run_for_server(
    client: kube::Client,
    args: &ServerArgs,
    hostname: &str,
) -> impl Future<Output = ()> + 'static {
    let node_name = args
        .node
        .node_name
        .clone()
        .unwrap_or_else(|| hostname.to_owned());
    let underlay = args
        .node
        .node_ip
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let mut config = OverlayConfig::new(node_name, underlay);
    config.service_cidr = Some(args.service_cidr);
    config.cluster_cidr = Some(args.cluster_cidr);
    tune_for_node(&mut config, &args.node);
    overlay::run_supervised(client, config)
}

/// The packet loops' settings that `skiff server` and `skiff agent` take
/// for their own node's data plane (`--dataplane-*`).
pub fn tune_for_node(config: &mut OverlayConfig, node: &NodeArgs) {
    tune(
        config,
        node.dataplane_workers,
        node.dataplane_max_super_packet,
        node.dataplane_busy_poll_us,
    );
}

fn tune(
    config: &mut OverlayConfig,
    workers: usize,
    max_super_packet: Option<u32>,
    busy_poll_us: u64,
) {
    config.workers = workers;
    config.busy_poll = std::time::Duration::from_micros(busy_poll_us);
    if let Some(size) = max_super_packet {
        config.max_super_packet = size;
    }
}

/// `GET /conntrack` from a running data plane.
async fn conntrack(addr: SocketAddr) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to the data plane at {addr}"))?;
    stream
        .write_all(b"GET /conntrack HTTP/1.1\r\nhost: skiff\r\nconnection: close\r\n\r\n")
        .await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("the data plane sent no HTTP response")?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        anyhow::bail!(
            "the data plane answered {status:?} (is it balancing Services, with --service-cidr?)"
        );
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use clap::Parser;

    use super::*;
    use crate::cli::{AGENT, Cli, Command};

    fn agent_node(extra: &[&str]) -> NodeArgs {
        let cli = Cli::try_parse_from(AGENT.iter().chain(extra)).expect("agent flags parse");
        match cli.command {
            Command::Agent(args) => args.node,
            other => panic!("not an agent command: {other:?}"),
        }
    }

    fn tuned(node: &NodeArgs) -> OverlayConfig {
        let mut config = OverlayConfig::new("n1", IpAddr::V4(Ipv4Addr::LOCALHOST));
        tune_for_node(&mut config, node);
        config
    }

    #[test]
    fn a_node_tunes_its_own_data_plane() {
        let defaults = OverlayConfig::new("n1", IpAddr::V4(Ipv4Addr::LOCALHOST));
        let untouched = tuned(&agent_node(&[]));
        assert_eq!(untouched.workers, defaults.workers);
        assert_eq!(untouched.busy_poll, defaults.busy_poll);
        assert_eq!(untouched.max_super_packet, defaults.max_super_packet);

        let config = tuned(&agent_node(&[
            "--dataplane-workers",
            "1",
            "--dataplane-busy-poll-us",
            "20000",
            "--dataplane-max-super-packet",
            "32768",
        ]));
        assert_eq!(config.workers, 1);
        assert_eq!(config.busy_poll, Duration::from_millis(20));
        assert_eq!(config.max_super_packet, 32_768);

        let server = Cli::try_parse_from(["skiff", "server", "--dataplane-busy-poll-us", "500"])
            .expect("server flags parse");
        let Command::Server(args) = server.command else {
            panic!("not a server command");
        };
        assert_eq!(tuned(&args.node).busy_poll, Duration::from_micros(500));
        for bad in ["-1", "1000001", "18446744073709551615"] {
            assert!(
                Cli::try_parse_from(["skiff", "server", "--dataplane-busy-poll-us", bad]).is_err(),
                "{bad}"
            );
        }
    }
}
