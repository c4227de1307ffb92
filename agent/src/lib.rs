//! The node agent (the kubelet's job): registers the Node and keeps its
//! Lease, runs the pods bound to it as OCI containers through runc, with
//! their network, volumes, probes and status, and re-adopts them after a
//! restart.
//!
//! [`shim`] is the per-container monitor process, [`streaming`] the
//! kubelet API the API server proxies logs, exec, attach and port-forward
//! to, [`node_service`] the helper processes (node-local DNS) an agent
//! keeps running beside itself.

pub mod bundle;
pub mod cgroups;
pub mod crilog;
pub mod dns;
pub mod image_source;
pub mod images;
pub mod kubelet_api;
pub mod network;
pub mod node;
pub mod node_service;
pub mod pod;
pub mod resources;
pub mod runtime;
pub mod sandbox;
pub mod shim;
pub mod streaming;
pub mod tty;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use pod::Backoff;
pub use runtime::RuntimeConfig;

/// Everything the agent is told at start.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub node_name: String,
    pub node_ip: IpAddr,
    /// The agent's own folder (`DATA_DIR/agent`).
    pub data_dir: PathBuf,
    pub cluster_dns: IpAddr,
    pub cluster_domain: String,
    /// This binary, for `skiff shim`.
    pub skiff_exe: PathBuf,
    /// Where the kubelet API (logs, exec, port-forward) listens.
    pub kubelet_port: u16,
    pub runtime: RuntimeConfig,
    pub backoff: Backoff,
    /// Make the pod network (bridge, veths); off, only hostNetwork pods run.
    pub pod_network: bool,
    /// The kubelet API's TLS material; without it the API is not served.
    pub tls: Option<KubeletTls>,
}

/// The serving certificate of the kubelet API and the CA whose client
/// certificates (the API server's) it accepts.
#[derive(Clone, Debug)]
pub struct KubeletTls {
    pub cert_pem: String,
    pub key_pem: String,
    pub client_ca_pem: String,
}

impl AgentConfig {
    /// Defaults for a node named `node_name` keeping state in `data_dir`.
    pub fn new(node_name: String, node_ip: IpAddr, data_dir: PathBuf) -> AgentConfig {
        let runtime = RuntimeConfig::detect(data_dir.join("runc"));
        AgentConfig {
            node_name,
            node_ip,
            cluster_dns: IpAddr::from([10, 43, 0, 10]),
            cluster_domain: "cluster.local".into(),
            skiff_exe: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("skiff")),
            kubelet_port: 10250,
            runtime,
            backoff: Backoff::default(),
            pod_network: true,
            tls: None,
            data_dir,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("creating {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("opening the image store: {0}")]
    Images(String),
}

/// Runs the agent until the process stops.
pub async fn run(client: kube::Client, config: AgentConfig) -> Result<(), AgentError> {
    for dir in ["pods", "logs", "ns", "netns", "runc", "images"] {
        let path = config.data_dir.join(dir);
        std::fs::create_dir_all(&path).map_err(|source| AgentError::Io { path, source })?;
    }
    let config = Arc::new(config);
    loop {
        match node::register(&client, &config).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, "cannot register the node; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
    tokio::spawn(node::heartbeat(client.clone(), config.clone()));
    let node_pods = pod::NodePods::watch(&client, &config.node_name);
    tokio::spawn(kubelet_api::run(node_pods.store.clone(), config.clone()));
    let (network_tx, network_rx) = tokio::sync::watch::channel(None);
    if config.pod_network {
        tokio::spawn(network::run(client.clone(), config.clone(), network_tx));
    }
    let (config_maps, secrets, claims, volumes) = pod::caches(&client);
    let runtime: Arc<dyn runtime::Runtime> = Arc::new(runtime::OciRuntime::new(
        config.runtime.clone(),
        config.skiff_exe.clone(),
    ));
    let store_dir = config.data_dir.clone();
    let images = tokio::task::spawn_blocking(move || image_source::open_store(&store_dir))
        .await
        .map_err(|e| AgentError::Images(e.to_string()))?
        .map_err(|e| AgentError::Images(e.to_string()))?;
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let ctx = Arc::new(pod::Context {
        client,
        images: Arc::new(images),
        runtime,
        network: network_rx,
        config_maps,
        secrets,
        claims,
        volumes,
        cgroups: cgroups::CgroupLayout::new(&config.node_name),
        dns: dns::ClusterDns {
            server: config.cluster_dns,
            domain: config.cluster_domain.clone(),
            host_resolv,
        },
        config,
    });
    pod::run(ctx, node_pods).await;
    Ok(())
}
