//! The node's bridge: every pod's host veth is a port of it, and it holds the
//! pods' gateway address.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use netlink_packet_route::link::InfoKind;
use rtnetlink::{Handle, LinkBridge, LinkUnspec};

use crate::error::{CniError, netlink_errno};
use crate::netlink;

const EEXIST: i32 = 17;

/// Makes sure bridge `name` exists, is up, has `mtu` and holds `gateway`;
/// returns its interface index. Safe to call again and from two processes.
pub(crate) async fn ensure(
    handle: &Handle,
    name: &str,
    mtu: u32,
    gateway: Ipv4Addr,
    pod_cidr: Ipv4Net,
) -> Result<u32, CniError> {
    let link = match netlink::link_by_name(handle, name).await? {
        Some(link) => link,
        None => {
            let create = LinkBridge::new(name)
                .mtu(mtu)
                .address(stable_mac(name, pod_cidr).to_vec())
                .up()
                .build();
            match handle.link().add(create).execute().await {
                Ok(()) => {}
                // Another agent or plugin run created it first.
                Err(e) if netlink_errno(&e) == Some(EEXIST) => {}
                Err(e) => return Err(CniError::netlink(format!("creating bridge {name}"), e)),
            }
            netlink::link_by_name(handle, name).await?.ok_or_else(|| {
                CniError::Missing(format!("bridge {name} vanished after creation"))
            })?
        }
    };
    if netlink::kind(&link) != Some(&InfoKind::Bridge) {
        return Err(CniError::Conflict(format!(
            "link {name} exists and is not a bridge"
        )));
    }
    let index = link.header.index;
    if netlink::mtu(&link) != Some(mtu) || !netlink::is_up(&link) {
        netlink::set_link(
            handle,
            LinkUnspec::new_with_index(index).mtu(mtu).up().build(),
            name,
        )
        .await?;
    }
    handle
        .address()
        .add(index, IpAddr::V4(gateway), pod_cidr.prefix_len())
        .replace()
        .execute()
        .await
        .map_err(|e| CniError::netlink(format!("adding {gateway} to bridge {name}"), e))?;
    Ok(index)
}

/// Turns on IPv4 forwarding in the current thread's namespace (pods reach
/// the rest of the cluster through the node).
pub(crate) fn enable_ip_forward() -> Result<(), CniError> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(PATH).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(PATH, "1").map_err(|e| CniError::io(format!("writing {PATH}"), e))
}

/// A locally administered MAC derived from the bridge's name and range. A
/// bridge otherwise takes the lowest MAC of its ports, so the gateway's MAC
/// would change under the pods' ARP caches whenever a pod comes or goes.
pub(crate) fn stable_mac(name: &str, pod_cidr: Ipv4Net) -> [u8; 6] {
    let hash = crate::veth::fnv1a(format!("{name}/{pod_cidr}").as_bytes());
    let h = hash.to_be_bytes();
    // 0x02: locally administered, unicast.
    [0x02, 0x5a, h[0], h[1], h[2], h[3]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridge_mac_is_stable_unicast_and_local() {
        let cidr: Ipv4Net = "10.42.1.0/24".parse().unwrap();
        let mac = stable_mac("skiff0", cidr);
        assert_eq!(mac, stable_mac("skiff0", cidr));
        assert_ne!(mac, stable_mac("skiff0", "10.42.2.0/24".parse().unwrap()));
        assert_eq!(mac[0] & 0x01, 0, "multicast bit set");
        assert_eq!(mac[0] & 0x02, 0x02, "not locally administered");
    }
}
