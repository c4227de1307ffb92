//! Starting the node agent: inside `skiff server` for the local node, or
//! as `skiff agent` joining a remote server.

use std::net::IpAddr;
use std::path::Path;

use anyhow::Context;
use controlplane::apiserver::pki::{Pki, ServerNames};

use crate::cli::NodeArgs;

/// The agent's settings from the node flags.
pub fn config(node: &NodeArgs, node_ip: IpAddr) -> agent::AgentConfig {
    let name = node.node_name.clone().unwrap_or_else(hostname);
    let mut config = agent::AgentConfig::new(name, node_ip, node.data_dir.join("agent"));
    config.backoff.initial = node.crash_loop_backoff;
    config.kubelet_port = node.kubelet_port;
    config
}

/// The names a node's kubelet API certificate covers: its address,
/// loopback, its name and the machine's hostname.
pub fn serving_names(config: &agent::AgentConfig) -> ServerNames {
    let mut names = ServerNames::default();
    names.add_ip(config.node_ip);
    names.add_ip(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    names.add_dns_name(&config.node_name);
    names.add_dns_name(&hostname());
    names.add_dns_name("localhost");
    names
}

/// Runs the local agent of `skiff server` in the background.
pub fn spawn_local(
    client: kube::Client,
    pki: &Pki,
    node: &NodeArgs,
    node_ip: IpAddr,
    cluster_dns: IpAddr,
    cluster_domain: &str,
) -> anyhow::Result<()> {
    let mut config = config(node, node_ip);
    config.cluster_dns = cluster_dns;
    config.cluster_domain = cluster_domain.to_owned();
    // The local agent's kubelet API certificate comes straight from the
    // server's CA; it is issued afresh at every start.
    let (cert_pem, key_pem) = pki
        .issue_node_serving_cert(&config.node_name, &serving_names(&config))
        .context("issuing the node's kubelet API certificate")?;
    config.tls = Some(agent::KubeletTls {
        cert_pem,
        key_pem,
        client_ca_pem: pki.client_ca_pem().to_owned(),
    });
    tokio::spawn(async move {
        if let Err(e) = agent::run(client, config).await {
            tracing::error!(error = %e, "the node agent stopped");
        }
    });
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string(Path::new("/proc/sys/kernel/hostname"))
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}
