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
//! 0:  from all lookup local proto 152       (its replacement)
//! ```
//!
//! Rules of equal preference are consulted in the order they were added,
//! so the local rule is moved behind Skiff's by adding a copy (tagged
//! `proto 152`) and then deleting the original: local delivery never
//! lapses. On shutdown the kernel's rule is put back first, then Skiff's
//! are removed. After a crash the stale rules are harmless: table 152's
//! route went away with the device, so its rules fall through to the local
//! copy, and the next start replaces them.

use std::net::Ipv4Addr;
use std::ops::RangeInclusive;

use futures::TryStreamExt;
use rtnetlink::packet_route::IpProtocol;
use rtnetlink::packet_route::route::RouteProtocol;
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage, RulePortRange};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

use super::routes::Error;

/// The routing table (and the protocol tag of every rule and route this
/// module adds): `ip rule` shows them as `lookup 152 proto 152`.
pub const TABLE: u8 = 152;
/// The `local` routing table (`RT_TABLE_LOCAL`).
const LOCAL_TABLE: u32 = 255;
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
            let mut rule = steering
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
        }
        let kernel_local: Vec<RuleMessage> = steering
            .rules()
            .await?
            .into_iter()
            .filter(|r| is_plain_local(r) && !is_ours(r))
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
            .priority(0)
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

    /// Puts the kernel's local rule back in front and removes every rule
    /// and route this module adds.
    pub async fn remove(self) -> Result<(), Error> {
        self.restore().await
    }

    async fn restore(&self) -> Result<(), Error> {
        let rules = self.rules().await?;
        // Only put a local rule back if Skiff moved it.
        let moved = rules.iter().any(|r| is_plain_local(r) && is_ours(r))
            && !rules.iter().any(|r| is_plain_local(r) && !is_ours(r));
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

/// `from all lookup local`, with no selector: the rule that delivers
/// packets for the node's own addresses.
fn is_plain_local(rule: &RuleMessage) -> bool {
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
    table == LOCAL_TABLE
        && priority == 0
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
        })
}

fn is_ours(rule: &RuleMessage) -> bool {
    rule.attributes
        .iter()
        .any(|a| matches!(a, RuleAttribute::Protocol(p) if *p == RouteProtocol::Other(TABLE)))
}
