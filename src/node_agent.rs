//! Starting the node agent: inside `skiff server` for the local node, or
//! as `skiff agent` joining a remote server.

use std::net::IpAddr;
use std::path::Path;

use crate::cli::NodeArgs;

/// The agent's settings from the node flags.
pub fn config(node: &NodeArgs, node_ip: IpAddr) -> agent::AgentConfig {
    let name = node.node_name.clone().unwrap_or_else(hostname);
    let mut config = agent::AgentConfig::new(name, node_ip, node.data_dir.join("agent"));
    config.backoff.initial = node.crash_loop_backoff;
    config
}

/// Runs the local agent of `skiff server` in the background.
pub fn spawn_local(
    client: kube::Client,
    node: &NodeArgs,
    node_ip: IpAddr,
    cluster_dns: IpAddr,
    cluster_domain: &str,
) {
    let mut config = config(node, node_ip);
    config.cluster_dns = cluster_dns;
    config.cluster_domain = cluster_domain.to_owned();
    tokio::spawn(async move {
        if let Err(e) = agent::run(client, config).await {
            tracing::error!(error = %e, "the node agent stopped");
        }
    });
}

fn hostname() -> String {
    std::fs::read_to_string(Path::new("/proc/sys/kernel/hostname"))
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}
