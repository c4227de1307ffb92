//! The peer table: which node's underlay address owns which pod prefix,
//! which underlay addresses may send to us, and which prefixes are ours.
//!
//! The table is immutable. The node watcher builds a new one on every
//! change and publishes it with a generation bump; a worker compares the
//! generation once per batch (one atomic load) and takes the new table only
//! when it changed, so the packet path never locks.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ipnet::IpNet;

#[derive(Debug, Default)]
pub struct PeerTable {
    /// Our own podCIDRs: decapsulated packets must be for these.
    local: Vec<IpNet>,
    /// Remote prefixes by prefix length (longest first), each a map from
    /// the masked address to the owning node's underlay socket address.
    v4: Vec<(u8, HashMap<u32, SocketAddr>)>,
    v6: Vec<(u8, HashMap<u128, SocketAddr>)>,
    /// Underlay addresses of known nodes, sorted.
    sources: Vec<IpAddr>,
}

impl PeerTable {
    /// Builds the table from our prefixes and `(prefix, underlay)` pairs.
    pub fn new(local: Vec<IpNet>, remote: &[(IpNet, SocketAddr)]) -> Self {
        let mut table = PeerTable {
            local,
            ..PeerTable::default()
        };
        for (prefix, underlay) in remote {
            match prefix.trunc() {
                IpNet::V4(net) => {
                    let len = net.prefix_len();
                    slot(&mut table.v4, len).insert(u32::from(net.network()), *underlay);
                }
                IpNet::V6(net) => {
                    let len = net.prefix_len();
                    slot(&mut table.v6, len).insert(u128::from(net.network()), *underlay);
                }
            }
            table.sources.push(underlay.ip());
        }
        table.v4.sort_by_key(|e| std::cmp::Reverse(e.0));
        table.v6.sort_by_key(|e| std::cmp::Reverse(e.0));
        table.sources.sort_unstable();
        table.sources.dedup();
        table
    }

    /// The underlay address of the node whose prefix holds `dst`.
    pub fn lookup(&self, dst: IpAddr) -> Option<SocketAddr> {
        match dst {
            IpAddr::V4(ip) => {
                let ip = u32::from(ip);
                self.v4.iter().find_map(|(len, map)| {
                    let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
                    map.get(&(ip & mask)).copied()
                })
            }
            IpAddr::V6(ip) => {
                let ip = u128::from(ip);
                self.v6.iter().find_map(|(len, map)| {
                    let mask = u128::MAX.checked_shl(128 - u32::from(*len)).unwrap_or(0);
                    map.get(&(ip & mask)).copied()
                })
            }
        }
    }

    pub fn is_known_source(&self, ip: IpAddr) -> bool {
        self.sources.binary_search(&canonical(ip)).is_ok()
    }

    pub fn is_local(&self, dst: IpAddr) -> bool {
        self.local.iter().any(|net| net.contains(&dst))
    }

    /// Our IPv4 podCIDR.
    pub fn local_v4(&self) -> Option<ipnet::Ipv4Net> {
        self.local.iter().find_map(|net| match net {
            IpNet::V4(net) => Some(*net),
            IpNet::V6(_) => None,
        })
    }

    pub fn peer_count(&self) -> usize {
        self.sources.len()
    }
}

fn slot<K>(by_len: &mut Vec<(u8, HashMap<K, SocketAddr>)>, len: u8) -> &mut HashMap<K, SocketAddr> {
    let at = match by_len.iter().position(|(l, _)| *l == len) {
        Some(at) => at,
        None => {
            by_len.push((len, HashMap::new()));
            by_len.len() - 1
        }
    };
    &mut by_len[at].1
}

/// An IPv4 sender seen by a dual-stack socket shows up as `::ffff:a.b.c.d`.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Where the watcher publishes tables.
#[derive(Debug, Default)]
pub struct Shared {
    generation: AtomicU64,
    table: Mutex<Arc<PeerTable>>,
}

impl Shared {
    pub fn publish(&self, table: PeerTable) {
        let table = Arc::new(table);
        match self.table.lock() {
            Ok(mut slot) => *slot = table,
            Err(poisoned) => *poisoned.into_inner() = table,
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub fn current(&self) -> Arc<PeerTable> {
        match self.table.lock() {
            Ok(slot) => slot.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

/// A worker's view: the table it uses and the generation it came from.
pub struct Reader {
    shared: Arc<Shared>,
    generation: u64,
    table: Arc<PeerTable>,
}

impl Reader {
    pub fn new(shared: Arc<Shared>) -> Self {
        let generation = shared.generation.load(Ordering::Acquire);
        let table = shared.current();
        Reader {
            shared,
            generation,
            table,
        }
    }

    /// The newest table; takes the lock only when a new one was published.
    pub fn refresh(&mut self) -> &PeerTable {
        let generation = self.shared.generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.table = self.shared.current();
            self.generation = generation;
        }
        &self.table
    }

    pub fn table(&self) -> &PeerTable {
        &self.table
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins() {
        let table = PeerTable::new(
            vec![net("10.42.0.0/24")],
            &[
                (net("10.42.1.0/24"), addr("172.31.0.2:8472")),
                (net("10.42.0.0/16"), addr("172.31.0.9:8472")),
                (net("fd00:42:1::/64"), addr("172.31.0.2:8472")),
            ],
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(table.lookup(ip("10.42.1.7")), Some(addr("172.31.0.2:8472")));
        assert_eq!(table.lookup(ip("10.42.9.7")), Some(addr("172.31.0.9:8472")));
        assert_eq!(table.lookup(ip("10.43.0.1")), None);
        assert_eq!(
            table.lookup(ip("fd00:42:1::5")),
            Some(addr("172.31.0.2:8472"))
        );
        assert!(table.is_known_source(ip("172.31.0.9")));
        assert!(table.is_known_source(ip("::ffff:172.31.0.2")));
        assert!(!table.is_known_source(ip("172.31.0.3")));
        assert!(table.is_local(ip("10.42.0.200")));
        assert!(!table.is_local(ip("10.42.1.1")));
        assert_eq!(table.peer_count(), 2);
    }

    #[test]
    fn readers_follow_publications() {
        let shared = Arc::new(Shared::default());
        let mut reader = Reader::new(shared.clone());
        assert_eq!(reader.refresh().peer_count(), 0);
        shared.publish(PeerTable::new(
            vec![],
            &[(net("10.42.1.0/24"), addr("172.31.0.2:8472"))],
        ));
        assert_eq!(reader.refresh().peer_count(), 1);
    }
}
