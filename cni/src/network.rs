//! `BridgeNetwork`: the node's pod network, composed of the bridge, one veth
//! pair per pod and the persisted IPAM.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipnet::Ipv4Net;

use crate::error::CniError;
use crate::ipam::{self, Ipam};
use crate::{bridge, netlink, netns, veth};

#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// Bridge name, e.g. `skiff0`.
    pub bridge: String,
    /// The node's `spec.podCIDR`; its first host address is the gateway.
    pub pod_cidr: Ipv4Net,
    /// MTU of the bridge and every veth (sized for the overlay).
    pub mtu: u32,
    /// Where IPAM keeps its files.
    pub state_dir: PathBuf,
    /// The namespace that holds the bridge and host veths; `None` is the
    /// caller's own. Tests (and multi-node setups on one machine) point this
    /// at a node namespace.
    pub host_netns: Option<PathBuf>,
}

/// What a pod got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// The pod's address with the podCIDR's prefix length.
    pub ip: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub host_veth: String,
    /// MAC of the pod end.
    pub mac: [u8; 6],
}

#[derive(Debug, Clone)]
pub struct BridgeNetwork {
    config: Arc<BridgeConfig>,
    ipam: Ipam,
}

impl BridgeNetwork {
    /// Ensures the bridge (up, MTU, gateway address) and IP forwarding, and
    /// opens the IPAM state.
    pub async fn new(config: BridgeConfig) -> Result<Self, CniError> {
        veth::validate_ifname(&config.bridge)?;
        if !(68..=65535).contains(&config.mtu) {
            return Err(CniError::invalid("MTU", config.mtu.to_string()));
        }
        let state_dir = config.state_dir.clone();
        let cidr = config.pod_cidr;
        let ipam = tokio::task::spawn_blocking(move || Ipam::open(&state_dir, cidr))
            .await
            .map_err(|e| CniError::Thread(e.to_string()))??;
        let network = Self {
            config: Arc::new(config),
            ipam,
        };
        network.ensure_bridge().await?;
        Ok(network)
    }

    pub fn config(&self) -> &BridgeConfig {
        &self.config
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.ipam.gateway()
    }

    /// Connects the sandbox's namespace at `netns` to the bridge as
    /// `ifname`. Calling it again for the same sandbox returns the same
    /// address and repairs whatever is missing.
    pub async fn attach(
        &self,
        sandbox_id: &str,
        netns: &Path,
        ifname: &str,
    ) -> Result<Attachment, CniError> {
        ipam::validate_id(sandbox_id)?;
        veth::validate_ifname(ifname)?;
        if !netns::is_namespace(netns) && !netns.starts_with("/proc") {
            return Err(CniError::Missing(format!(
                "{} is not a network namespace",
                netns.display()
            )));
        }
        let (ip, fresh) = self.allocate(sandbox_id, ifname).await?;
        match self.plumb(sandbox_id, netns, ifname, ip).await {
            Ok(attachment) => Ok(attachment),
            Err(err) => {
                // Undo what this call did; leave an earlier attach alone.
                if fresh {
                    let _ = self.delete_host_end(sandbox_id).await;
                    let _ = self.release(sandbox_id).await;
                }
                Err(err)
            }
        }
    }

    /// Disconnects the sandbox: deletes its veth pair and frees its address.
    /// Anything already gone is fine; `netns` may be gone too.
    pub async fn detach(&self, sandbox_id: &str, netns: Option<&Path>) -> Result<(), CniError> {
        ipam::validate_id(sandbox_id)?;
        let allocation = self.lookup(sandbox_id).await?;
        let deleted = self.delete_host_end(sandbox_id).await?;
        // Without the host end (deleted by hand, say), look for the pod end.
        if !deleted
            && let (Some(ns), Some(allocation)) = (netns, &allocation)
            && netns::is_namespace(ns)
            && veth::validate_ifname(&allocation.ifname).is_ok()
        {
            let ifname = allocation.ifname.clone();
            netlink::run(Some(ns), move |handle| async move {
                if let Some(link) = netlink::link_by_name(&handle, &ifname).await?
                    && veth::is_veth(&link)
                {
                    netlink::delete_link(&handle, link.header.index, &ifname).await?;
                }
                Ok(())
            })
            .await?;
        }
        self.release(sandbox_id).await?;
        Ok(())
    }

    /// Verifies an attachment is intact: address reserved, host end a
    /// bridge port, pod end up with its address and default route.
    pub async fn check(
        &self,
        sandbox_id: &str,
        netns: &Path,
        ifname: &str,
    ) -> Result<Attachment, CniError> {
        ipam::validate_id(sandbox_id)?;
        veth::validate_ifname(ifname)?;
        let allocation = self
            .lookup(sandbox_id)
            .await?
            .ok_or_else(|| CniError::Missing(format!("no address reserved for {sandbox_id}")))?;
        let host_veth = veth::host_name(sandbox_id);
        let bridge = self.config.bridge.clone();
        let (name, id) = (host_veth.clone(), sandbox_id.to_string());
        let host_index = netlink::run(
            self.config.host_netns.as_deref(),
            move |handle| async move {
                let bridge = netlink::link_by_name(&handle, &bridge)
                    .await?
                    .ok_or_else(|| CniError::Missing(format!("bridge {bridge} not found")))?;
                let link = netlink::link_by_name(&handle, &name)
                    .await?
                    .ok_or_else(|| CniError::Missing(format!("host veth {name} not found")))?;
                if netlink::alias(&link) != Some(id.as_str()) {
                    return Err(CniError::Conflict(format!(
                        "{name} belongs to another sandbox"
                    )));
                }
                if netlink::controller(&link) != Some(bridge.header.index) || !netlink::is_up(&link)
                {
                    return Err(CniError::Missing(format!(
                        "{name} is not an up port of the bridge"
                    )));
                }
                Ok(link.header.index)
            },
        )
        .await?;
        let config = self.pod_config(ifname, allocation.ip);
        let (ip, gateway) = (config.ip, config.gateway);
        let (mac, peer) = netlink::run(Some(netns), move |handle| async move {
            let mac = veth::check_pod_end(&handle, &config).await?;
            let peer = veth::pod_end(&handle, &config.ifname).await?;
            Ok((mac, peer.and_then(|p| p.peer_index)))
        })
        .await?;
        if peer != Some(host_index) {
            return Err(CniError::Missing(format!(
                "{ifname} is not the peer of {host_veth}"
            )));
        }
        Ok(Attachment {
            ip,
            gateway,
            host_veth,
            mac,
        })
    }

    /// Every (sandbox id, address) reserved, read from disk: after an agent
    /// restart, compare with the live sandboxes and `detach` the rest.
    pub fn allocations(&self) -> Vec<(String, Ipv4Addr)> {
        match self.ipam.list() {
            Ok(list) => list.into_iter().map(|a| (a.sandbox_id, a.ip)).collect(),
            Err(err) => {
                tracing::warn!(%err, "cannot list pod IP allocations");
                Vec::new()
            }
        }
    }

    /// MAC of a link in the host namespace (the bridge, a host veth).
    pub async fn host_link_mac(&self, name: &str) -> Result<Option<[u8; 6]>, CniError> {
        let name = name.to_string();
        netlink::run(
            self.config.host_netns.as_deref(),
            move |handle| async move { veth::mac_of(&handle, &name).await },
        )
        .await
    }

    async fn ensure_bridge(&self) -> Result<u32, CniError> {
        let config = self.config.clone();
        let gateway = self.gateway();
        netlink::run(
            self.config.host_netns.as_deref(),
            move |handle| async move {
                bridge::enable_ip_forward()?;
                bridge::ensure(
                    &handle,
                    &config.bridge,
                    config.mtu,
                    gateway,
                    config.pod_cidr,
                )
                .await
            },
        )
        .await
    }

    async fn plumb(
        &self,
        sandbox_id: &str,
        netns: &Path,
        ifname: &str,
        ip: Ipv4Addr,
    ) -> Result<Attachment, CniError> {
        let name = ifname.to_string();
        let pod = netlink::run(Some(netns), move |handle| async move {
            veth::pod_end(&handle, &name).await
        })
        .await?;
        if pod.is_some_and(|p| !p.is_veth) {
            return Err(CniError::Conflict(format!(
                "interface {ifname} already exists in {}",
                netns.display()
            )));
        }
        // The bridge may have been deleted since `new`: recreate it.
        let bridge_index = self.ensure_bridge().await?;
        let host_veth = veth::host_name(sandbox_id);
        let (host_name, id, ns, name) = (
            host_veth.clone(),
            sandbox_id.to_string(),
            netns.to_path_buf(),
            ifname.to_string(),
        );
        let mtu = self.config.mtu;
        netlink::run(
            self.config.host_netns.as_deref(),
            move |handle| async move {
                let host = veth::HostEnd {
                    name: &host_name,
                    sandbox_id: &id,
                    bridge_index,
                    mtu,
                };
                veth::ensure_host_end(&handle, &host, pod, &ns, &name).await
            },
        )
        .await?;
        let config = self.pod_config(ifname, ip);
        let (ip, gateway) = (config.ip, config.gateway);
        let mac = netlink::run(Some(netns), move |handle| async move {
            veth::configure_pod_end(&handle, &config).await
        })
        .await?;
        Ok(Attachment {
            ip,
            gateway,
            host_veth,
            mac,
        })
    }

    fn pod_config(&self, ifname: &str, ip: Ipv4Addr) -> veth::PodConfig {
        veth::PodConfig {
            ifname: ifname.to_string(),
            ip: Ipv4Net::new(ip, self.config.pod_cidr.prefix_len()).unwrap_or_else(|_| {
                // Unreachable: the prefix comes from a valid Ipv4Net.
                Ipv4Net::from(ip)
            }),
            gateway: self.gateway(),
            mtu: self.config.mtu,
        }
    }

    async fn delete_host_end(&self, sandbox_id: &str) -> Result<bool, CniError> {
        let id = sandbox_id.to_string();
        netlink::run(
            self.config.host_netns.as_deref(),
            move |handle| async move { veth::delete_host_end(&handle, &id).await },
        )
        .await
    }

    async fn allocate(&self, sandbox_id: &str, ifname: &str) -> Result<(Ipv4Addr, bool), CniError> {
        let (ipam, id, ifname) = (
            self.ipam.clone(),
            sandbox_id.to_string(),
            ifname.to_string(),
        );
        blocking(move || ipam.allocate(&id, &ifname)).await
    }

    async fn release(&self, sandbox_id: &str) -> Result<Option<Ipv4Addr>, CniError> {
        let (ipam, id) = (self.ipam.clone(), sandbox_id.to_string());
        blocking(move || ipam.release(&id)).await
    }

    async fn lookup(&self, sandbox_id: &str) -> Result<Option<ipam::Allocation>, CniError> {
        let (ipam, id) = (self.ipam.clone(), sandbox_id.to_string());
        blocking(move || ipam.lookup(&id)).await
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CniError> + Send + 'static,
) -> Result<T, CniError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CniError::Thread(e.to_string()))?
}
