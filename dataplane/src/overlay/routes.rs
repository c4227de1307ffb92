//! The TUN device's routes, through rtnetlink: one route per remote node's
//! podCIDR (and the service CIDR) into the device. Routes Skiff adds carry
//! their own protocol number, so a sync removes only its own stale routes
//! and never touches anyone else's.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol,
};
use rtnetlink::{Handle, LinkUnspec, RouteMessageBuilder};

/// `ip route` shows Skiff's routes as `proto 152`.
const PROTOCOL: u8 = 152;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening a netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("no network interface {0}")]
    NoLink(String),
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("{0} is not a routable prefix")]
    Prefix(IpNet),
}

pub struct Routes {
    handle: Handle,
    index: u32,
}

impl Routes {
    /// Connects to rtnetlink (on the calling tokio runtime) and finds the
    /// device `name`.
    pub async fn open(name: &str) -> Result<Self, Error> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(Error::Socket)?;
        tokio::spawn(connection);
        let link = handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute()
            .try_next()
            .await?
            .ok_or_else(|| Error::NoLink(name.to_owned()))?;
        Ok(Routes {
            handle,
            index: link.header.index,
        })
    }

    /// Brings the device up and sets the largest super-packet it takes
    /// (`gso_max_size`, `gso_max_segs`). The kernel cuts a bigger one into
    /// MTU-sized packets in software before the device sees it, so the
    /// size must not be below what the pods' own interfaces build (64 KiB
    /// on a veth).
    pub async fn configure(&self, gso_max_size: u32, gso_max_segs: u32) -> Result<(), Error> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(self.index).up().build())
            .execute()
            .await?;
        let cap = LinkUnspec::new_with_index(self.index)
            .append_extra_attribute(LinkAttribute::GsoMaxSize(gso_max_size))
            .append_extra_attribute(LinkAttribute::GsoMaxSegs(gso_max_segs))
            .build();
        self.handle.link().set(cap).execute().await?;
        Ok(())
    }

    /// Makes the device's Skiff routes exactly `want`; returns how many
    /// were added and removed.
    pub async fn sync(&self, want: &BTreeSet<IpNet>) -> Result<(usize, usize), Error> {
        let mut have = Vec::new();
        for request in [
            RouteMessageBuilder::<Ipv4Addr>::new().build(),
            RouteMessageBuilder::<Ipv6Addr>::new().build(),
        ] {
            let mut routes = self.handle.route().get(request).execute();
            while let Some(route) = routes.try_next().await? {
                if self.is_ours(&route) {
                    have.push(route);
                }
            }
        }
        let mut removed = 0;
        let mut present = BTreeSet::new();
        for route in have {
            match destination(&route) {
                Some(net) if want.contains(&net) => {
                    present.insert(net);
                }
                _ => {
                    self.handle.route().del(route).execute().await?;
                    removed += 1;
                }
            }
        }
        let mut added = 0;
        for net in want.difference(&present) {
            let route = RouteMessageBuilder::<IpAddr>::new()
                .destination_prefix(net.network(), net.prefix_len())
                .map_err(|_| Error::Prefix(*net))?
                .output_interface(self.index)
                .protocol(RouteProtocol::Other(PROTOCOL))
                .build();
            self.handle.route().add(route).replace().execute().await?;
            added += 1;
        }
        Ok((added, removed))
    }

    /// The netlink connection, for the NodePort rules.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// The device's interface index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Skiff's routes into the device in the main table (the NodePort
    /// table has its own, see `node_ports`).
    fn is_ours(&self, route: &RouteMessage) -> bool {
        route.header.protocol == RouteProtocol::Other(PROTOCOL)
            && route.header.table == RouteHeader::RT_TABLE_MAIN
            && route
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Oif(i) if *i == self.index))
    }
}

fn destination(route: &RouteMessage) -> Option<IpNet> {
    let len = route.header.destination_prefix_length;
    route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(RouteAddress::Inet(ip)) => {
            IpNet::new(IpAddr::V4(*ip), len).ok()
        }
        RouteAttribute::Destination(RouteAddress::Inet6(ip)) => {
            IpNet::new(IpAddr::V6(*ip), len).ok()
        }
        _ => None,
    })
}
