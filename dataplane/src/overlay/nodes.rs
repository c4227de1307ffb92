//! What the overlay needs from Node objects: each node's underlay address
//! (`status.addresses`, type `InternalIP`) and pod prefixes
//! (`spec.podCIDRs`, or the older `spec.podCIDR`), turned into a peer table
//! and the routes the TUN device should carry.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;

use super::peers::PeerTable;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub underlay: Option<IpAddr>,
    pub pod_cidrs: Vec<IpNet>,
}

impl NodeInfo {
    /// Reads a node, preferring an `InternalIP` of the underlay's family.
    pub fn from_node(node: &Node, want_v4: bool) -> Self {
        let internal: Vec<IpAddr> = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .filter_map(|a| a.address.parse().ok())
            .collect();
        let underlay = internal
            .iter()
            .find(|ip| ip.is_ipv4() == want_v4)
            .or(internal.first())
            .copied();
        let spec = node.spec.as_ref();
        let mut pod_cidrs: Vec<IpNet> = spec
            .and_then(|s| s.pod_cidrs.as_ref())
            .into_iter()
            .flatten()
            .chain(spec.and_then(|s| s.pod_cidr.as_ref()))
            .filter_map(|c| c.parse::<IpNet>().ok())
            .map(|c| c.trunc())
            .collect();
        pod_cidrs.sort();
        pod_cidrs.dedup();
        NodeInfo {
            underlay,
            pod_cidrs,
        }
    }
}

/// The routing state for node `own` given all known nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub local: Vec<IpNet>,
    pub remote: Vec<(IpNet, SocketAddr)>,
    pub routes: BTreeSet<IpNet>,
}

impl Plan {
    pub fn new(
        own: &str,
        nodes: &BTreeMap<String, NodeInfo>,
        port: u16,
        service_cidr: Option<IpNet>,
    ) -> Self {
        let local = nodes
            .get(own)
            .map(|n| n.pod_cidrs.clone())
            .unwrap_or_default();
        let mut remote = Vec::new();
        for (name, node) in nodes {
            if name == own {
                continue;
            }
            let Some(underlay) = node.underlay else {
                continue;
            };
            for cidr in &node.pod_cidrs {
                // Never steal our own pods' traffic, whatever a Node says.
                if local.iter().any(|l| l.contains(cidr) || cidr.contains(l)) {
                    tracing::warn!(node = %name, %cidr, "podCIDR overlaps this node's; ignored");
                    continue;
                }
                remote.push((*cidr, SocketAddr::new(underlay, port)));
            }
        }
        let mut routes: BTreeSet<IpNet> = remote.iter().map(|(c, _)| *c).collect();
        routes.extend(service_cidr.map(|c| c.trunc()));
        Plan {
            local,
            remote,
            routes,
        }
    }

    pub fn table(&self) -> PeerTable {
        PeerTable::new(self.local.clone(), &self.remote)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, ip: &str, cidr: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
            "status": {"addresses": [
                {"type": "Hostname", "address": name},
                {"type": "InternalIP", "address": "fd00::9"},
                {"type": "InternalIP", "address": ip},
            ]},
        }))
        .unwrap()
    }

    #[test]
    fn plans_routes_to_the_other_nodes() {
        let mut nodes = BTreeMap::new();
        for (name, ip, cidr) in [
            ("a", "172.31.0.1", "10.42.0.0/24"),
            ("b", "172.31.0.2", "10.42.1.0/24"),
            ("c", "172.31.0.3", "10.42.0.0/16"),
        ] {
            nodes.insert(
                name.to_owned(),
                NodeInfo::from_node(&node(name, ip, cidr), true),
            );
        }
        nodes.insert(
            "d".to_owned(),
            NodeInfo {
                underlay: None,
                pod_cidrs: vec!["10.42.3.0/24".parse().unwrap()],
            },
        );
        let plan = Plan::new("a", &nodes, 8472, Some("10.43.0.0/16".parse().unwrap()));
        assert_eq!(plan.local, vec!["10.42.0.0/24".parse::<IpNet>().unwrap()]);
        assert_eq!(
            plan.remote,
            vec![(
                "10.42.1.0/24".parse().unwrap(),
                "172.31.0.2:8472".parse().unwrap()
            )]
        );
        let routes: Vec<String> = plan.routes.iter().map(|r| r.to_string()).collect();
        assert_eq!(routes, ["10.42.1.0/24", "10.43.0.0/16"]);
    }
}
