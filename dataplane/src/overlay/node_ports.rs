//! Steers NodePort traffic into the TUN device with policy routing, so the
//! Service engine sees it.
//!
//! Packets for one of the node's own addresses are delivered locally by the
//! `local` routing table, whose rule comes first (preference 0). Two rules
//! send TCP and UDP to `nodeIP` on the NodePort range to table
//! [`TABLE`] instead, whose only route leads into the device:
//!
//! ```text
//! 0:  from all lookup local                 (the kernel's, removed)
//! 0:  from all to NODE_IP ipproto tcp dport 30000-32767 lookup 152 proto 152
//! 0:  from all to NODE_IP ipproto udp dport 30000-32767 lookup 152 proto 152
//! 1:  from all lookup local proto 152       (its replacement)
//! ```
//!
//! LoadBalancer Services add one such rule per port (`dport 8080`) at
//! preference 0, kept in step with the Services by
//! [`follow_load_balancer_ports`]; they come before the local rule
//! whenever they are added.
//!
//! The local rule is moved behind Skiff's by adding a copy (tagged `proto
//! 152`, at preference 1) and then deleting the original: local delivery
//! never lapses. On shutdown the kernel's rule is put back first, then Skiff's
//! are removed. After a crash the stale rules are harmless: table 152's
//! route went away with the device, so its rules fall through to the local
//! copy, and the next start replaces them.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

use futures::TryStreamExt;
use rtnetlink::packet_route::IpProtocol;
use rtnetlink::packet_route::route::RouteProtocol;
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage, RulePortRange};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

use tokio::sync::watch;

use super::routes::Error;
use crate::service::LoadBalancerPort;

/// The routing table (and the protocol tag of every rule and route this
/// module adds): `ip rule` shows them as `lookup 152 proto 152`.
pub const TABLE: u8 = 152;
/// The `local` routing table (`RT_TABLE_LOCAL`).
const LOCAL_TABLE: u32 = 255;
/// Where the local rule goes: after every rule at 0.
const LOCAL_COPY_PREFERENCE: u32 = 1;
/// The kernel's protocol tag on the rules it creates.
const KERNEL: RouteProtocol = RouteProtocol::Kernel;

/// The installed rules; [`NodePorts::remove`] takes them out again.
pub struct NodePorts {
    handle: Handle,
}

impl NodePorts {
    /// Routes `node_ip`'s NodePort range into the device `tun_index`,
    /// replacing whatever an earlier run left behind.
    pub async fn install(
        handle: Handle,
        tun_index: u32,
        node_ip: Ipv4Addr,
        ports: RangeInclusive<u16>,
    ) -> Result<Self, Error> {
        let steering = NodePorts { handle };
        // A clean slate, with the kernel's local rule in front.
        steering.restore().await?;

        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(u32::from(TABLE))
            .output_interface(tun_index)
            .protocol(RouteProtocol::Other(TABLE))
            .build();
        steering
            .handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await?;
        for protocol in [IpProtocol::Tcp, IpProtocol::Udp] {
            steering.add_port_rule(node_ip, protocol, &ports).await?;
        }
        let kernel_local: Vec<RuleMessage> = steering
            .rules()
            .await?
            .into_iter()
            .filter(|r| local_lookup_preference(r) == Some(0) && !is_ours(r))
            .collect();
        if kernel_local.is_empty() {
            // The local rule lives at another preference (as in VRF
            // setups); Skiff's rules at 0 already come first.
            return Ok(steering);
        }
        // The copy first, so some local rule is always in place.
        let mut copy = steering
            .handle
            .rule()
            .add()
            .v4()
            .priority(LOCAL_COPY_PREFERENCE)
            .table_id(LOCAL_TABLE)
            .action(RuleAction::ToTable);
        copy.message_mut()
            .attributes
            .push(RuleAttribute::Protocol(RouteProtocol::Other(TABLE)));
        copy.execute().await?;
        for rule in kernel_local {
            steering.handle.rule().del(rule).execute().await?;
        }
        Ok(steering)
    }

    /// `to node_ip ipproto protocol dport ports lookup 152`, after the
    /// rules already at preference 0.
    async fn add_port_rule(
        &self,
        node_ip: Ipv4Addr,
        protocol: IpProtocol,
        ports: &RangeInclusive<u16>,
    ) -> Result<(), Error> {
        let mut rule = self
            .handle
            .rule()
            .add()
            .v4()
            .priority(0)
            .table_id(u32::from(TABLE))
            .action(RuleAction::ToTable)
            .destination_prefix(node_ip, 32);
        let attributes = &mut rule.message_mut().attributes;
        attributes.push(RuleAttribute::Protocol(RouteProtocol::Other(TABLE)));
        attributes.push(RuleAttribute::IpProtocol(protocol));
        attributes.push(RuleAttribute::DestinationPortRange(RulePortRange {
            start: *ports.start(),
            end: *ports.end(),
        }));
        rule.execute().await?;
        Ok(())
    }

    /// Makes the single-port rules match `wanted`.
    async fn set_single_ports(
        &self,
        node_ip: Ipv4Addr,
        node_port_range: &RangeInclusive<u16>,
        wanted: &BTreeSet<LoadBalancerPort>,
    ) -> Result<(), Error> {
        let rules = self.rules().await?;
        let mut present = BTreeSet::new();
        for rule in &rules {
            // A NodePort range of one port has a single-port rule too.
            let Some(port) = single_port(rule).filter(|p| !node_port_range.contains(&p.1)) else {
                continue;
            };
            if is_ours(rule) && wanted.contains(&port) {
                present.insert(port);
            } else if is_ours(rule) {
                self.handle.rule().del(rule.clone()).execute().await?;
            }
        }
        let missing: Vec<_> = wanted.difference(&present).copied().collect();
        for (protocol, port) in &missing {
            self.add_port_rule(node_ip, IpProtocol::from(*protocol), &(*port..=*port))
                .await?;
        }
        Ok(())
    }

    /// Puts the kernel's local rule back in front and removes every rule
    /// and route this module adds.
    pub async fn remove(self) -> Result<(), Error> {
        self.restore().await
    }

    async fn restore(&self) -> Result<(), Error> {
        let rules = self.rules().await?;
        // Only put a local rule back if Skiff moved it.
        let moved = rules
            .iter()
            .any(|r| local_lookup_preference(r).is_some() && is_ours(r))
            && !rules
                .iter()
                .any(|r| local_lookup_preference(r) == Some(0) && !is_ours(r));
        if moved {
            let mut local = self
                .handle
                .rule()
                .add()
                .v4()
                .priority(0)
                .table_id(LOCAL_TABLE)
                .action(RuleAction::ToTable);
            local
                .message_mut()
                .attributes
                .push(RuleAttribute::Protocol(KERNEL));
            local.execute().await?;
        }
        for rule in rules {
            if is_ours(&rule) {
                self.handle.rule().del(rule).execute().await?;
            }
        }
        let request = RouteMessageBuilder::<Ipv4Addr>::new()
            .table_id(u32::from(TABLE))
            .build();
        let mut routes = self.handle.route().get(request).execute();
        let mut stale = Vec::new();
        while let Some(route) = routes.try_next().await? {
            if route.header.table == TABLE && route.header.protocol == RouteProtocol::Other(TABLE) {
                stale.push(route);
            }
        }
        for route in stale {
            self.handle.route().del(route).execute().await?;
        }
        Ok(())
    }

    async fn rules(&self) -> Result<Vec<RuleMessage>, Error> {
        let mut rules = Vec::new();
        let mut stream = self.handle.rule().get(IpVersion::V4).execute();
        while let Some(rule) = stream.try_next().await? {
            rules.push(rule);
        }
        Ok(rules)
    }
}

/// Steers the ports of LoadBalancer Services on `node_ip` into the device
/// as they come and go (k3s's service load balancer serves them on every
/// node the same way). Ports in the NodePort range are already steered; a
/// port a process of this node listens on (the API server, the ingress,
/// DNS) is left to it, with a warning, so that a Service cannot take it.
pub async fn follow_load_balancer_ports(
    handle: Handle,
    node_ip: Ipv4Addr,
    node_port_range: RangeInclusive<u16>,
    mut ports: watch::Receiver<BTreeSet<LoadBalancerPort>>,
) {
    let steering = NodePorts { handle };
    let mut warned = BTreeSet::new();
    loop {
        let requested: BTreeSet<LoadBalancerPort> = ports
            .borrow_and_update()
            .iter()
            .copied()
            .filter(|(_, port)| !node_port_range.contains(port))
            .collect();
        let busy = listening_ports(node_ip);
        let wanted: BTreeSet<LoadBalancerPort> = requested
            .iter()
            .copied()
            .filter(|port| {
                let taken = busy.contains(port);
                if taken && warned.insert(*port) {
                    tracing::warn!(protocol = port.0, port = port.1, %node_ip, "a LoadBalancer Service port is in use on this node; it is not steered to the Service here");
                }
                !taken
            })
            .collect();
        warned.retain(|port| requested.contains(port));
        match steering
            .set_single_ports(node_ip, &node_port_range, &wanted)
            .await
        {
            Ok(()) => {
                tracing::debug!(ports = ?wanted, "LoadBalancer ports steered into the device")
            }
            Err(e) => tracing::warn!(error = %e, "steering LoadBalancer ports"),
        }
        if ports.changed().await.is_err() {
            return;
        }
    }
}

/// The (protocol, port) pairs that a socket of this network namespace
/// holds on `node_ip` or on every address: TCP listeners and bound UDP
/// sockets, IPv4 and dual-stack IPv6.
fn listening_ports(node_ip: Ipv4Addr) -> BTreeSet<LoadBalancerPort> {
    const TCP_LISTEN: &str = "0A";
    let mut busy = BTreeSet::new();
    let tables = [
        ("/proc/net/tcp", IpProtocol::Tcp),
        ("/proc/net/tcp6", IpProtocol::Tcp),
        ("/proc/net/udp", IpProtocol::Udp),
        ("/proc/net/udp6", IpProtocol::Udp),
    ];
    // The kernel prints an IPv4 address as its four bytes in memory order.
    let node_hex = format!("{:08X}", u32::from_ne_bytes(node_ip.octets()));
    let mapped_hex = format!("0000000000000000FFFF0000{node_hex}");
    for (path, protocol) in tables {
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let mut fields = line.split_whitespace();
            let (Some(local), Some(_remote), Some(state)) =
                (fields.nth(1), fields.next(), fields.next())
            else {
                continue;
            };
            if protocol == IpProtocol::Tcp && state != TCP_LISTEN {
                continue;
            }
            let Some((address, port)) = local.split_once(':') else {
                continue;
            };
            let everywhere = address.bytes().all(|b| b == b'0');
            if !(everywhere || address == node_hex || address == mapped_hex) {
                continue;
            }
            if let Ok(port) = u16::from_str_radix(port, 16) {
                busy.insert((u8::from(protocol), port));
            }
        }
    }
    busy
}

/// The port of a rule that matches exactly one destination port.
fn single_port(rule: &RuleMessage) -> Option<LoadBalancerPort> {
    let protocol = rule.attributes.iter().find_map(|a| match a {
        RuleAttribute::IpProtocol(p) => Some(u8::from(*p)),
        _ => None,
    })?;
    rule.attributes.iter().find_map(|a| match a {
        RuleAttribute::DestinationPortRange(range) if range.start == range.end => {
            Some((protocol, range.start))
        }
        _ => None,
    })
}

/// Removes the rules from a fresh netlink connection on a thread of its
/// own: for `Drop`, which cannot wait on the caller's runtime.
pub fn remove_blocking() {
    let outcome = std::thread::spawn(|| -> Result<(), String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        runtime.block_on(async {
            let (connection, handle, _) = rtnetlink::new_connection().map_err(|e| e.to_string())?;
            let connection = tokio::spawn(connection);
            let result = NodePorts { handle }.remove().await;
            connection.abort();
            result.map_err(|e| e.to_string())
        })
    })
    .join();
    match outcome {
        Ok(Ok(())) => tracing::info!("NodePort routing rules removed"),
        Ok(Err(e)) => tracing::warn!(error = %e, "removing the NodePort routing rules"),
        Err(_) => tracing::warn!("removing the NodePort routing rules panicked"),
    }
}

/// The preference of a `from all lookup local` rule with no selector (the
/// rule that delivers packets for the node's own addresses); `None` for
/// any other rule.
fn local_lookup_preference(rule: &RuleMessage) -> Option<u32> {
    let table = rule
        .attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(rule.header.table));
    let priority = rule
        .attributes
        .iter()
        .find_map(|a| match a {
            RuleAttribute::Priority(p) => Some(*p),
            _ => None,
        })
        .unwrap_or(0);
    let plain = table == LOCAL_TABLE
        && rule.header.action == RuleAction::ToTable
        && rule.header.dst_len == 0
        && rule.header.src_len == 0
        && !rule.attributes.iter().any(|a| {
            matches!(
                a,
                RuleAttribute::Iifname(_)
                    | RuleAttribute::Oifname(_)
                    | RuleAttribute::FwMark(_)
                    | RuleAttribute::IpProtocol(_)
                    | RuleAttribute::DestinationPortRange(_)
                    | RuleAttribute::SourcePortRange(_)
            )
        });
    plain.then_some(priority)
}

fn is_ours(rule: &RuleMessage) -> bool {
    rule.attributes
        .iter()
        .any(|a| matches!(a, RuleAttribute::Protocol(p) if *p == RouteProtocol::Other(TABLE)))
}
