//! Wires cluster DNS into every node: in-process in `skiff server`, as a
//! supervised `skiff dns` child of `skiff agent` on a joined node, and
//! the hidden `skiff dns` command itself, which runs it alone against any
//! cluster.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use agent::node_service::NodeService;
use anyhow::Context;

use crate::cli::{Component, DnsArgs, ServerArgs};

/// How soon a joined node's DNS is started again after it exits, and
/// the longest wait as it keeps exiting: pods cannot resolve names
/// meanwhile, so sooner than a crashing container.
const NODE_DNS_BACKOFF: agent::Backoff = agent::Backoff {
    initial: Duration::from_secs(1),
    max: Duration::from_secs(30),
};

/// Runs DNS for the server's own cluster. It listens on the cluster DNS
/// address when that address is on this machine (the server puts it
/// there when it runs the node's network), and on `--dns-listen`. A
/// failure to start is logged; the rest of the server keeps running.
pub fn serve_for_server(
    client: kube::Client,
    args: &ServerArgs,
) -> impl Future<Output = ()> + Send + 'static {
    let mut listen = args.dns_listen.clone();
    let cluster_dns = SocketAddr::new(args.cluster_dns, 53);
    if !is_local(args.cluster_dns)
        && !args.disable.contains(&Component::Network)
        && let Err(e) = claim_address(args.cluster_dns)
    {
        tracing::warn!(error = %e, "cannot put the cluster DNS address on this node; pods cannot reach DNS");
    }
    if is_local(args.cluster_dns) && !listen.contains(&cluster_dns) {
        listen.push(cluster_dns);
    }
    let config = dns::DnsConfig {
        listen,
        cluster_domain: args.cluster_domain.clone(),
        upstream_resolv_conf: Some(args.dns_upstream_resolv_conf.clone()),
        dns_ip: Some(args.cluster_dns),
        metrics_listen: args.dns_metrics_listen,
        ..dns::DnsConfig::default()
    };
    async move {
        if config.listen.is_empty() {
            tracing::info!(
                cluster_dns = %cluster_dns,
                "cluster DNS address is not on this machine and no --dns-listen given; DNS not served here"
            );
            return;
        }
        if let Err(e) = dns::run(client, config).await {
            tracing::error!(error = %e, "cluster DNS did not start; the server runs on without it");
        }
    }
}

/// A joined node's cluster DNS, as NodeLocal DNSCache serves it: the
/// cluster DNS address on this node's loopback, and `skiff dns` (the
/// executable `skiff`) serving there as a child process of the agent,
/// fed through the node's own kubeconfig (nodes may read Services,
/// EndpointSlices and Pods), forwarding other names to the resolvers
/// `upstream_resolv_conf` lists. Its own process, so that a DNS crash does
/// not take the agent down; it stops with the agent. `None`, logged,
/// when the address cannot be had: this node's pods then cannot resolve
/// names.
pub fn serve_for_agent(
    skiff: &Path,
    kubeconfig: &Path,
    cluster_dns: IpAddr,
    cluster_domain: &str,
    upstream_resolv_conf: &Path,
) -> Option<NodeService> {
    if !is_local(cluster_dns)
        && let Err(e) = claim_address(cluster_dns)
    {
        tracing::error!(error = %format!("{e:#}"), "cannot put the cluster DNS address on this node; its pods cannot resolve names");
        return None;
    }
    let mut command = std::process::Command::new(skiff);
    command
        .arg("dns")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--listen")
        .arg(SocketAddr::new(cluster_dns, 53).to_string())
        .args(["--cluster-dns", &cluster_dns.to_string()])
        .args(["--cluster-domain", cluster_domain])
        .arg("--upstream-resolv-conf")
        .arg(upstream_resolv_conf);
    match NodeService::start("dns", command, NODE_DNS_BACKOFF) {
        Ok(service) => Some(service),
        Err(e) => {
            tracing::error!(error = %e, "cannot run the node's cluster DNS; its pods cannot resolve names");
            None
        }
    }
}

/// `skiff dns`: only the DNS server, fed through a kubeconfig.
pub async fn run(args: DnsArgs) -> anyhow::Result<()> {
    // Sized like the agent it runs in on a node: by memory. With
    // transparent huge pages mimalloc's heaps fill 2 MB pages, which
    // were most of this process's RSS (12 of 35 MB with 1,200 objects).
    if let Err(e) = agent::shim::disable_own_thp() {
        tracing::warn!(error = %e, "cannot turn transparent huge pages off for DNS");
    }
    let kubeconfig = kube::config::Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading {}", args.kubeconfig.display()))?;
    let options = kube::config::KubeConfigOptions::default();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .context("loading the kubeconfig")?;
    let client = crate::api_client::multiplexed(config).context("building the API client")?;
    let upstream = (args.upstream_resolv_conf.as_os_str() != "none")
        .then(|| args.upstream_resolv_conf.clone());
    let config = dns::DnsConfig {
        listen: args.listen,
        cluster_domain: args.cluster_domain,
        ttl: args.ttl,
        upstream_resolv_conf: upstream,
        workers: args.workers,
        metrics_listen: args.metrics_listen,
        dns_ip: args.cluster_dns,
        ..dns::DnsConfig::default()
    };
    dns::run(client, config).await.context("cluster DNS")
}

/// Puts `ip` on the node's loopback, so that pods' queries to the cluster
/// DNS address reach this node's DNS: the kernel delivers to a local
/// address before any route, including the one that sends Service
/// addresses into the data plane. NodeLocal DNSCache does the same with
/// a dummy interface. The address stays when the server or agent stops,
/// as a node's network does.
fn claim_address(ip: IpAddr) -> anyhow::Result<()> {
    let prefix = if ip.is_ipv4() { 32 } else { 128 };
    let address = format!("{ip}/{prefix}");
    let output = std::process::Command::new("ip")
        .args(["address", "add", &address, "dev", "lo"])
        .output()
        .context("running ip (iproute2)")?;
    anyhow::ensure!(
        output.status.success(),
        "ip address add {address} dev lo: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    tracing::info!(%address, "cluster DNS address put on the loopback");
    Ok(())
}

/// Whether `ip` is assigned on this machine (binding to it would work).
fn is_local(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}
