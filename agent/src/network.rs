//! The pod network from `cni/`: once the control plane has given this
//! Node a `spec.podCIDR`, the bridge `skiff0` is made on it and every
//! sandbox gets a veth and an address there.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, watcher};
use tokio::sync::watch;

use crate::AgentConfig;
use crate::sandbox::PodNetwork;

pub const BRIDGE: &str = "skiff0";
/// Leaves room for the overlay's encapsulation on a 1500-byte underlay.
pub const MTU: u32 = 1450;

/// Waits for the node's podCIDR, then makes the bridge network and hands
/// it to the pod workers.
pub async fn run(
    client: kube::Client,
    config: Arc<AgentConfig>,
    tx: watch::Sender<Option<Arc<dyn PodNetwork>>>,
) {
    let nodes: Api<Node> = Api::all(client);
    let selector = format!("metadata.name={}", config.node_name);
    let mut stream = watcher(nodes, watcher::Config::default().fields(&selector))
        .default_backoff()
        .applied_objects()
        .boxed();
    let mut current: Option<Ipv4Net> = None;
    while let Some(event) = stream.next().await {
        let Ok(node) = event else { continue };
        let Some(cidr) = node
            .spec
            .as_ref()
            .and_then(|s| s.pod_cidr.as_deref())
            .and_then(|c| c.parse::<Ipv4Net>().ok())
        else {
            continue;
        };
        if current == Some(cidr) {
            continue;
        }
        loop {
            let bridge = cni::BridgeConfig {
                bridge: BRIDGE.into(),
                pod_cidr: cidr,
                mtu: MTU,
                state_dir: config.data_dir.join("ipam"),
                host_netns: None,
            };
            match cni::BridgeNetwork::new(bridge).await {
                Ok(network) => {
                    tracing::info!(%cidr, bridge = BRIDGE, "pod network ready");
                    let network: Arc<dyn PodNetwork> = Arc::new(Bridge {
                        network,
                        netns_dir: config.data_dir.join("netns"),
                    });
                    let _ = tx.send(Some(network));
                    current = Some(cidr);
                    break;
                }
                Err(e) => {
                    tracing::warn!(%cidr, error = %e, "cannot make the pod network; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        }
    }
}

struct Bridge {
    network: cni::BridgeNetwork,
    netns_dir: PathBuf,
}

#[async_trait]
impl PodNetwork for Bridge {
    async fn create_netns(&self, name: &str) -> Result<PathBuf, String> {
        let dir = self.netns_dir.clone();
        let name = name.to_owned();
        let made = tokio::task::spawn_blocking(move || match cni::netns::open(&dir, &name) {
            Ok(Some(ns)) => Ok(ns),
            _ => cni::netns::create(&dir, &name),
        })
        .await
        .map_err(|e| e.to_string())?;
        made.map(|ns| ns.path).map_err(|e| e.to_string())
    }

    async fn attach(&self, sandbox_id: &str, netns: &Path) -> Result<IpAddr, String> {
        self.network
            .attach(sandbox_id, netns, "eth0")
            .await
            .map(|a| IpAddr::V4(a.ip.addr()))
            .map_err(|e| e.to_string())
    }

    async fn remove(&self, sandbox_id: &str, netns_name: &str) -> Result<(), String> {
        let path = self.netns_dir.join(netns_name);
        self.network
            .detach(sandbox_id, Some(&path))
            .await
            .map_err(|e| e.to_string())?;
        let dir = self.netns_dir.clone();
        let name = netns_name.to_owned();
        tokio::task::spawn_blocking(move || cni::netns::remove(&dir, &name))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }
}
