//! One veth pair per pod: the host end (`veth` + 8 hex digits of a hash of
//! the sandbox id, its alias set to the sandbox id) is a bridge port, the pod
//! end lives in the pod's namespace under the name the caller asked for.

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::Path;

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::address::AddressAttribute;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVeth, LinkMessage};
use netlink_packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::{
    Handle, LinkBridgePort, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
};

use crate::error::CniError;
use crate::netlink;

/// The host end's name for a sandbox: stable across restarts, so teardown
/// finds it from the id alone.
pub fn host_name(sandbox_id: &str) -> String {
    format!("veth{:08x}", fnv1a(sandbox_id.as_bytes()))
}

/// What the pod's namespace holds under the requested interface name.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PodEnd {
    pub peer_index: Option<u32>,
    pub is_veth: bool,
}

/// Looks at the pod end: `None` when the interface does not exist.
pub(crate) async fn pod_end(handle: &Handle, ifname: &str) -> Result<Option<PodEnd>, CniError> {
    Ok(netlink::link_by_name(handle, ifname)
        .await?
        .map(|link| PodEnd {
            peer_index: netlink::peer_index(&link),
            is_veth: netlink::kind(&link) == Some(&InfoKind::Veth),
        }))
}

/// Host-side wishes for one pod.
pub(crate) struct HostEnd<'a> {
    pub name: &'a str,
    pub sandbox_id: &'a str,
    pub bridge_index: u32,
    pub mtu: u32,
}

/// Makes sure the pair exists (creating it, with the pod end already inside
/// `netns` as `ifname`) and the host end is an up bridge port. Returns the
/// host end's MAC and whether this call created the pair.
pub(crate) async fn ensure_host_end(
    handle: &Handle,
    host: &HostEnd<'_>,
    pod: Option<PodEnd>,
    netns: &Path,
    ifname: &str,
) -> Result<([u8; 6], bool), CniError> {
    let existing = netlink::link_by_name(handle, host.name).await?;
    let mut created = false;
    let link = match existing {
        Some(link) if netlink::alias(&link) != Some(host.sandbox_id) => {
            return Err(CniError::Conflict(format!(
                "link {} belongs to sandbox {:?}, not {}",
                host.name,
                netlink::alias(&link).unwrap_or_default(),
                host.sandbox_id
            )));
        }
        Some(link) if pod.and_then(|p| p.peer_index) == Some(link.header.index) => link,
        stale => {
            // Our host end whose pod end is gone or elsewhere (the sandbox's
            // namespace was recreated): start over.
            if let Some(link) = stale {
                netlink::delete_link(handle, link.header.index, host.name).await?;
            }
            if pod.is_some() {
                return Err(CniError::Conflict(format!(
                    "interface {ifname} already exists in {}",
                    netns.display()
                )));
            }
            create_pair(handle, host, netns, ifname).await?;
            created = true;
            netlink::link_by_name(handle, host.name)
                .await?
                .ok_or_else(|| {
                    CniError::Missing(format!("{} vanished after creation", host.name))
                })?
        }
    };
    let configured = netlink::controller(&link) == Some(host.bridge_index)
        && netlink::is_up(&link)
        && netlink::mtu(&link) == Some(host.mtu);
    if !configured {
        let port = LinkUnspec::new_with_index(link.header.index)
            .controller(host.bridge_index)
            .mtu(host.mtu)
            .up()
            .build();
        netlink::set_link(handle, port, host.name).await?;
    }
    // A pod reaching a Service whose endpoint is itself: with the kernel
    // backend (nftables and `br_netfilter`) the translated packet is
    // bridged back out of the port it came in on, which a bridge refuses
    // unless the port is in hairpin mode (as the CNI bridge plugin's
    // `hairpinMode` and flannel's configuration do).
    if !configured || netlink::hairpin(&link) != Some(true) {
        let hairpin = LinkBridgePort::new(link.header.index).hairpin(true).build();
        netlink::set_port(handle, hairpin, host.name).await?;
    }
    let mac = netlink::mac(&link).unwrap_or_default();
    Ok((mac, created))
}

/// Deletes the host end of `sandbox_id` (and with it the pod end). Returns
/// whether there was one. A link of that name that belongs to another
/// sandbox is left alone.
pub(crate) async fn delete_host_end(handle: &Handle, sandbox_id: &str) -> Result<bool, CniError> {
    let name = host_name(sandbox_id);
    match netlink::link_by_name(handle, &name).await? {
        Some(link) if netlink::alias(&link) == Some(sandbox_id) => {
            netlink::delete_link(handle, link.header.index, &name).await?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Pod-side wishes: address, gateway, MTU.
pub(crate) struct PodConfig {
    pub ifname: String,
    pub ip: Ipv4Net,
    pub gateway: Ipv4Addr,
    pub mtu: u32,
}

/// Brings up `lo` and the pod end, gives it its address and a default route
/// via the gateway. Idempotent. Returns the pod end's MAC.
pub(crate) async fn configure_pod_end(
    handle: &Handle,
    config: &PodConfig,
) -> Result<[u8; 6], CniError> {
    netlink::set_up_by_name(handle, "lo").await?;
    let link = netlink::link_by_name(handle, &config.ifname)
        .await?
        .ok_or_else(|| CniError::Missing(format!("{} not found in the pod", config.ifname)))?;
    let index = link.header.index;
    netlink::set_link(
        handle,
        LinkUnspec::new_with_index(index)
            .mtu(config.mtu)
            .up()
            .build(),
        &config.ifname,
    )
    .await?;
    handle
        .address()
        .add(index, IpAddr::V4(config.ip.addr()), config.ip.prefix_len())
        .replace()
        .execute()
        .await
        .map_err(|e| CniError::netlink(format!("adding {} to {}", config.ip, config.ifname), e))?;
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .gateway(config.gateway)
        .output_interface(index)
        .build();
    handle
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(|e| {
            CniError::netlink(format!("adding default route via {}", config.gateway), e)
        })?;
    Ok(netlink::mac(&link).unwrap_or_default())
}

/// Verifies the pod end as `configure_pod_end` left it; returns its MAC.
pub(crate) async fn check_pod_end(
    handle: &Handle,
    config: &PodConfig,
) -> Result<[u8; 6], CniError> {
    let link = netlink::link_by_name(handle, &config.ifname)
        .await?
        .ok_or_else(|| CniError::Missing(format!("{} not found in the pod", config.ifname)))?;
    if !netlink::is_up(&link) {
        return Err(CniError::Missing(format!("{} is down", config.ifname)));
    }
    let index = link.header.index;
    let addresses: Vec<_> = handle
        .address()
        .get()
        .set_link_index_filter(index)
        .execute()
        .try_collect()
        .await
        .map_err(|e| CniError::netlink(format!("listing addresses of {}", config.ifname), e))?;
    let has_ip = addresses.iter().any(|a| {
        a.header.prefix_len == config.ip.prefix_len()
            && a.attributes
                .iter()
                .any(|attr| matches!(attr, AddressAttribute::Address(IpAddr::V4(ip)) if *ip == config.ip.addr()))
    });
    if !has_ip {
        return Err(CniError::Missing(format!(
            "{} does not hold {}",
            config.ifname, config.ip
        )));
    }
    let routes: Vec<_> = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .map_err(|e| CniError::netlink("listing routes", e))?;
    let has_default = routes.iter().any(|r| {
        r.header.destination_prefix_length == 0
            && r.attributes.iter().any(|attr| {
                matches!(attr, RouteAttribute::Gateway(RouteAddress::Inet(gw)) if *gw == config.gateway)
            })
    });
    if !has_default {
        return Err(CniError::Missing(format!(
            "no default route via {} in the pod",
            config.gateway
        )));
    }
    Ok(netlink::mac(&link).unwrap_or_default())
}

/// Creates the pair with the peer born inside the pod's namespace under its
/// final name, so it never collides with a host interface of that name.
async fn create_pair(
    handle: &Handle,
    host: &HostEnd<'_>,
    netns: &Path,
    ifname: &str,
) -> Result<(), CniError> {
    let ns =
        File::open(netns).map_err(|e| CniError::io(format!("opening {}", netns.display()), e))?;
    let peer = LinkMessageBuilder::<LinkUnspec>::new()
        .name(ifname)
        .mtu(host.mtu)
        .setns_by_fd(ns.as_raw_fd())
        .build();
    let pair = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(host.name)
        .mtu(host.mtu)
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
        .build();
    handle.link().add(pair).execute().await.map_err(|e| {
        CniError::netlink(format!("creating veth pair {} / {ifname}", host.name), e)
    })?;
    // The kernel takes no alias at creation: set it now (the namespace file
    // stays open until here, as the request referenced its descriptor).
    drop(ns);
    let link = netlink::link_by_name(handle, host.name)
        .await?
        .ok_or_else(|| CniError::Missing(format!("{} vanished after creation", host.name)))?;
    let alias = LinkUnspec::new_with_index(link.header.index)
        .alias(host.sandbox_id)
        .build();
    if let Err(err) = netlink::set_link(handle, alias, host.name).await {
        let _ = netlink::delete_link(handle, link.header.index, host.name).await;
        return Err(err);
    }
    Ok(())
}

/// Looks up a link's MAC by name (for results that list host interfaces).
pub(crate) async fn mac_of(handle: &Handle, name: &str) -> Result<Option<[u8; 6]>, CniError> {
    Ok(netlink::link_by_name(handle, name)
        .await?
        .as_ref()
        .and_then(netlink::mac))
}

/// Whether `link` is a veth (used to decide what teardown may delete).
pub(crate) fn is_veth(link: &LinkMessage) -> bool {
    netlink::kind(link) == Some(&InfoKind::Veth)
}

/// 32-bit FNV-1a: tiny, and stable across Rust releases (unlike the std
/// hasher), which a name that must survive upgrades needs.
pub(crate) fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |hash, b| {
        (hash ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// Interface names: 1 to 15 bytes, not `.`/`..`, no `/`, `:` or whitespace.
pub(crate) fn validate_ifname(name: &str) -> Result<(), CniError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(CniError::invalid(
            "interface name",
            format!("{name:?} (1-15 characters, no '/', ':' or spaces)"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_fit_the_kernel_limit_and_are_stable() {
        let name = host_name("0123456789abcdef0123456789abcdef");
        assert_eq!(name.len(), 12);
        assert!(name.starts_with("veth"));
        assert_eq!(name, host_name("0123456789abcdef0123456789abcdef"));
        assert_ne!(host_name("pod-a"), host_name("pod-b"));
        // Known FNV-1a value, so the naming never drifts.
        assert_eq!(fnv1a(b"a"), 0xe40c_292c);
    }

    #[test]
    fn interface_names_are_checked() {
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "sixteen-chars-xx"] {
            assert!(validate_ifname(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["eth0", "net1", "fifteen-chars-x"] {
            assert!(validate_ifname(good).is_ok(), "{good:?} rejected");
        }
    }
}
