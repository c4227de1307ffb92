//! The command line. Flag names and defaults follow k3s so that its users
//! feel at home.

use std::net::IpAddr;
use std::path::PathBuf;

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

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the control plane, with a local agent and networking.
    Server(ServerArgs),
    /// Run a node agent that joins an existing server.
    Agent(AgentArgs),
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
    /// Port of the Ingress controller's plain HTTP listener.
    #[arg(long, default_value_t = 80, hide = true)]
    pub ingress_http_port: u16,
    /// Port of the Ingress controller's HTTPS listener.
    #[arg(long, default_value_t = 443, hide = true)]
    pub ingress_https_port: u16,
    /// Port of the Ingress controller's `/metrics` (0: not served).
    #[arg(long, default_value_t = 10254, hide = true)]
    pub ingress_metrics_port: u16,
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
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Agent,
    Network,
    Dns,
    Ingress,
}

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
    }

    #[test]
    fn bad_flags_are_rejected() {
        assert!(
            Cli::try_parse_from(["skiff", "server", "--cluster-cidr", "10.42.0.0/33"]).is_err()
        );
        assert!(Cli::try_parse_from(["skiff", "server", "--disable", "everything"]).is_err());
        assert!(Cli::try_parse_from(["skiff", "agent"]).is_err());
    }
}
