//! What the engine needs to know about one Service, already resolved from
//! the API objects (see `translate`): addresses, ports, policies, and per
//! port the endpoints with their target port numbers.

use std::fmt;
use std::net::Ipv4Addr;

use super::wire::{PROTO_TCP, PROTO_UDP};

/// Namespace and name of a Service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ServiceKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The transport protocols the engine balances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        }
    }

    pub fn from_number(number: u8) -> Option<Self> {
        match number {
            PROTO_TCP => Some(Protocol::Tcp),
            PROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// One Service, ready for the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    pub key: ServiceKey,
    /// The IPv4 cluster IPs (`spec.clusterIPs`).
    pub cluster_ips: Vec<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
    /// `type: LoadBalancer`: also served on the node IPs at `port`, as k3s's
    /// service load balancer does.
    pub load_balancer: bool,
    /// `externalTrafficPolicy: Local`: node-facing traffic keeps its source
    /// address and goes to this node's endpoints only.
    pub external_local: bool,
    /// `sessionAffinity: ClientIP` and its timeout.
    pub affinity_timeout_secs: Option<u32>,
}

/// One port of a Service with its endpoints resolved to numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub node_port: Option<u16>,
    /// Sorted by address and port, no duplicates.
    pub backends: Vec<Backend>,
}

impl ServicePort {
    /// Which endpoints take new flows, as upstream decides: the ready ones;
    /// if none, the serving ones that are terminating. With `local_node`,
    /// only that node's endpoints count (`externalTrafficPolicy: Local`).
    pub fn eligible(&self, local_node: Option<&str>) -> Vec<bool> {
        let candidate = |b: &Backend| local_node.is_none_or(|node| b.node.as_deref() == Some(node));
        let any_ready = self.backends.iter().any(|b| candidate(b) && b.ready);
        self.backends
            .iter()
            .map(|b| {
                candidate(b)
                    && if any_ready {
                        b.ready
                    } else {
                        b.serving && b.terminating
                    }
            })
            .collect()
    }
}

/// One endpoint of one Service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub addr: Ipv4Addr,
    /// The target port, resolved for this endpoint.
    pub port: u16,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node: Option<String>,
}
