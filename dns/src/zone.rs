//! The write side of the zone. Each owner (a Service, or the zone itself)
//! keeps its records once, packed into one byte string (`packed`, names
//! relative to the owner's), sorted by name; every name of the zone is
//! answered from the records of the one owner whose subtree holds it, so
//! the builder keeps no per-name copy. An update replaces an owner's
//! records, re-encodes the names it had or has (and those whose answers
//! embed them), and writes anew only the index shards they live in.

mod packed;

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use hickory_proto::op::{Message, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::index::{
    FxBuild, Index, Published, Shard, ShardMap, Zone, empty_shards, node_answer, push_answer,
    shard_of,
};
use crate::wire;

/// The schema version of the Kubernetes DNS specification served.
pub const SCHEMA_VERSION: &str = "1.1.0";

/// Record data, with names lowercased and fully qualified: what `records`
/// renders and hands to `ZoneBuilder::set_owner`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Data {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Cname(Name),
    Ptr(Name),
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: Name,
    },
    Txt(String),
    Ns(Name),
    Soa,
}

impl Data {
    pub fn address(ip: IpAddr) -> Data {
        match ip {
            IpAddr::V4(v4) => Data::A(v4),
            IpAddr::V6(v6) => Data::Aaaa(v6),
        }
    }
}

/// One record: a lowercased, fully qualified owner name and its data.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rec {
    pub name: Name,
    pub data: Data,
}

/// Who contributed a set of records; an owner's records are replaced as a
/// whole, and all of them lie at or below the owner's name (the zone's
/// apex, or `<svc>.<ns>.svc.<zone>`), except PTR records.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Owner {
    /// dns-version, the apex SOA and NS.
    Apex,
    /// A Service (namespace, name), with its endpoints and pods.
    Service(String, String),
}

/// A lowercased wire name, shared between decoded records and the maps
/// below.
type WireName = Arc<[u8]>;

/// Record data as stored: `Data` with wire names. The variant order keeps
/// records of one type next to each other once sorted.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Stored {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    Cname(WireName),
    Ptr(WireName),
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: WireName,
    },
    Txt(Box<str>),
    Ns(WireName),
    Soa,
}

impl Stored {
    fn rtype(&self) -> u16 {
        match self {
            Stored::A(_) => wire::TYPE_A,
            Stored::Aaaa(_) => wire::TYPE_AAAA,
            Stored::Cname(_) => wire::TYPE_CNAME,
            Stored::Ptr(_) => wire::TYPE_PTR,
            Stored::Srv { .. } => wire::TYPE_SRV,
            Stored::Txt(_) => wire::TYPE_TXT,
            Stored::Ns(_) => wire::TYPE_NS,
            Stored::Soa => wire::TYPE_SOA,
        }
    }

    /// The name this record's answer embeds data of.
    fn target(&self) -> Option<&WireName> {
        match self {
            Stored::Cname(t) | Stored::Srv { target: t, .. } => Some(t),
            _ => None,
        }
    }
}

/// A record as an owner keeps it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct StoredRec {
    name: WireName,
    data: Stored,
}

pub struct ZoneBuilder {
    apex: Name,
    apex_wire: WireName,
    ttl: u32,
    soa: SOA,
    zone: Arc<Zone>,
    /// Owner name → its records, sorted by name, packed (`packed`); kept
    /// as the index keeps names, not a map slot, a name and the records
    /// each.
    owners: ShardMap,
    /// Owners' records decoded during a build, each once.
    decoded: RefCell<HashMap<WireName, Arc<[StoredRec]>, FxBuild>>,
    /// Names between the apex and the owners' names (`svc`, `pod`,
    /// namespaces), with how many owners lie below each (`svc` and `pod`
    /// hold one more, so they always exist).
    above: HashMap<WireName, u32, FxBuild>,
    /// PTR names (outside the zone) with a target added or removed
    /// since the last build, in order, back to back: `[added: 1][PTR
    /// name][target]`. A PTR name's targets are kept only in its node;
    /// the owners' targets are distinct, as each lies under its owner's
    /// name.
    ptr_changes: Vec<u8>,
    /// Name → names in other owners whose answers embed its records (a
    /// CNAME to it, or an SRV record targeting it), one per record.
    dependents: HashMap<WireName, Vec<WireName>, FxBuild>,
    shards: Vec<Shard>,
    /// Names to re-encode at the next build, back to back (wire names
    /// end themselves), repeats included: one buffer rather than a name
    /// allocation each, which a burst would leave as holes among the
    /// records it stores.
    dirty: Vec<u8>,
    ready: bool,
}

/// The PTR changes since the last build, by PTR name.
#[derive(Default)]
struct PtrChanges<'a>(HashMap<&'a [u8], Vec<PtrChange<'a>>, FxBuild>);

/// A PTR target, added (true) or removed.
type PtrChange<'a> = (&'a [u8], bool);

impl<'a> PtrChanges<'a> {
    fn read(mut buffer: &'a [u8]) -> Self {
        let mut changes = PtrChanges::default();
        while let Some((&added, rest)) = buffer.split_first() {
            let mut names = split_names(rest);
            let (Some(name), Some(target)) = (names.next(), names.next()) else {
                break;
            };
            changes
                .0
                .entry(name)
                .or_default()
                .push((target, added != 0));
            buffer = &rest[name.len() + target.len()..];
        }
        changes
    }
}

/// Some of an owner's records (those at one name).
struct Records {
    all: Arc<[StoredRec]>,
    range: std::ops::Range<usize>,
}

impl std::ops::Deref for Records {
    type Target = [StoredRec];

    fn deref(&self) -> &[StoredRec] {
        &self.all[self.range.clone()]
    }
}

/// Bits of a name's hash that pick its owners' shard: a few owners each.
const OWNER_SHARD_BITS: u32 = 8;

/// Packed size from which an owner's decoded records are kept for the
/// rest of a build: a big headless Service is read once per name it has.
/// Smaller owners are decoded again on each read, which costs little and
/// leaves no allocation outliving the read among the long-lived ones.
const KEEP_DECODED: usize = 1024;

/// Most CNAMEs followed inside the zone (a loop of ExternalNames stops
/// here).
const MAX_CHAIN: usize = 8;

/// Largest answer body a node can hold (its length is 16 bits).
const MAX_BODY: usize = u16::MAX as usize;

impl ZoneBuilder {
    /// A zone for `domain` (e.g. `cluster.local`) with record TTL `ttl`.
    /// `dns_ip` is the cluster DNS address, served as `ns.dns.<zone>`.
    pub fn new(
        domain: &str,
        ttl: u32,
        dns_ip: Option<IpAddr>,
        forwarding: bool,
    ) -> Result<Self, crate::DnsError> {
        let bad = || crate::DnsError::Domain(domain.to_owned());
        let apex = Name::from_ascii(domain).map_err(|_| bad())?.to_lowercase();
        let mut apex = apex;
        apex.set_fqdn(true);
        let apex_wire = wire::encode_name(domain).ok_or_else(bad)?;
        let mname = child(&apex, &["ns", "dns"]).ok_or_else(bad)?;
        let rname = child(&apex, &["hostmaster"]).ok_or_else(bad)?;
        let serial = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as u32)
            .unwrap_or(1);
        let soa = SOA::new(mname.clone(), rname, serial, 7200, 1800, 86400, ttl);
        let zone = Arc::new(Zone {
            pod_suffix: wire::encode_name(&format!("pod.{domain}")).ok_or_else(bad)?,
            soa: raw_soa(&apex_wire, ttl, &soa),
            apex: apex_wire.clone(),
            ttl,
            forwarding,
        });
        let mut builder = ZoneBuilder {
            apex: apex.clone(),
            apex_wire: apex_wire.into(),
            ttl,
            soa,
            zone,
            owners: ShardMap::new(OWNER_SHARD_BITS),
            decoded: RefCell::default(),
            above: HashMap::default(),
            ptr_changes: Vec::new(),
            dependents: HashMap::default(),
            shards: empty_shards(),
            dirty: Vec::new(),
            ready: false,
        };
        let mut records = vec![
            Rec {
                name: child(&apex, &["dns-version"]).ok_or_else(bad)?,
                data: Data::Txt(SCHEMA_VERSION.into()),
            },
            Rec {
                name: apex.clone(),
                data: Data::Soa,
            },
            Rec {
                name: apex.clone(),
                data: Data::Ns(mname.clone()),
            },
        ];
        if let Some(ip) = dns_ip {
            records.push(Rec {
                name: mname,
                data: Data::address(ip),
            });
        }
        // `svc` and `pod` exist even in an empty cluster.
        for label in ["svc", "pod"] {
            if let Some(name) = child(&apex, &[label]) {
                let name: WireName = name_key(&name).into();
                builder.above.insert(name.clone(), 1);
                builder.dirty.extend_from_slice(&name);
            }
        }
        builder.set_owner(Owner::Apex, records);
        Ok(builder)
    }

    pub fn apex(&self) -> &Name {
        &self.apex
    }

    pub fn zone(&self) -> Arc<Zone> {
        self.zone.clone()
    }

    /// Marks the zone complete (the first full listing is in).
    pub fn set_ready(&mut self) {
        self.ready = true;
    }

    /// Replaces everything `owner` contributes with `records` (which may be
    /// empty, to remove the owner). Records outside the owner's subtree
    /// (other than PTR records outside the zone) are ignored.
    pub fn set_owner(&mut self, owner: Owner, records: Vec<Rec>) {
        let Some(root) = self.owner_name(&owner) else {
            return;
        };
        self.decoded.get_mut().remove(&root[..]);
        let old: Vec<StoredRec> = match self.owners.get(&root) {
            Some(packed) => packed::unpack(&root, packed).unwrap_or_default(),
            None => Vec::new(),
        };
        // One allocation per distinct name while the records are compared
        // and linked (the owner's name is most records' target too).
        let mut pool: HashSet<WireName, FxBuild> = HashSet::default();
        pool.insert(root.clone());
        for rec in old.iter() {
            pool.insert(rec.name.clone());
            if let Some(t) = rec.data.target() {
                pool.insert(t.clone());
            }
        }
        let mut new: Vec<StoredRec> = records
            .into_iter()
            .filter_map(|rec| self.store(&root, rec, &mut pool))
            .collect();
        new.sort();
        new.dedup();
        if old == new {
            return;
        }
        self.link(&root, &old, false);
        self.link(&root, &new, true);
        if old.is_empty() != new.is_empty() {
            self.count_above(&root, !new.is_empty());
        }
        mark_names(&mut self.dirty, &self.apex_wire, &root, &old);
        mark_names(&mut self.dirty, &self.apex_wire, &root, &new);
        let packed = (!new.is_empty()).then(|| packed::pack(&root, &new));
        self.owners.set(&root, packed.as_deref());
    }

    /// Re-encodes what changed and returns the new index.
    pub fn build(&mut self) -> Index {
        // A changed name also changes the answers that embed it, directly
        // or through other aliases.
        let marked = std::mem::take(&mut self.dirty);
        let ptr_buffer = std::mem::take(&mut self.ptr_changes);
        let ptr_changes = PtrChanges::read(&ptr_buffer);
        let mut dirty: Vec<&[u8]> = split_names(&marked).collect();
        let mut seen: HashSet<&[u8], FxBuild> = dirty.iter().copied().collect();
        let mut next = 0;
        while next < dirty.len() {
            if let Some(names) = self.dependents.get(dirty[next]) {
                for name in names {
                    if seen.insert(name) {
                        dirty.push(name);
                    }
                }
            }
            next += 1;
        }
        drop(seen);
        // Shard by shard: its nodes (PTR nodes read their current answers
        // back from it), then the shard written anew once, so that only
        // one shard's nodes are held at a time.
        let mut dirty: Vec<(usize, &[u8])> = dirty.into_iter().map(|n| (shard_of(n), n)).collect();
        dirty.sort_unstable();
        dirty.dedup();
        let mut written: Vec<(usize, Shard)> = Vec::new();
        for names in dirty.chunk_by(|a, b| a.0 == b.0) {
            let shard = names[0].0;
            let nodes: Vec<(&[u8], Option<Vec<u8>>)> = names
                .iter()
                .map(|(_, name)| (*name, self.node(name, &ptr_changes)))
                .filter(|(name, node)| self.shards[shard].get(name) != node.as_deref())
                .collect();
            if nodes.is_empty() {
                continue;
            }
            let changes: Vec<(&[u8], Option<&[u8]>)> = nodes
                .iter()
                .map(|(name, node)| (*name, node.as_deref()))
                .collect();
            written.push((shard, self.shards[shard].with_changes(&changes)));
        }
        for (shard, written) in written {
            self.shards[shard] = written;
        }
        // Dropped rather than cleared: a burst (the first listing) would
        // otherwise keep its capacity for good.
        self.ptr_changes = Vec::new();
        *self.decoded.get_mut() = HashMap::default();
        Index {
            shards: self.shards.clone(),
            zone: self.zone.clone(),
            ready: self.ready,
        }
    }

    /// Packs the index's shards, the owners' and `others`' into one
    /// allocation (`index::compact`), for when the changes have settled;
    /// true when it did, and the next published index holds them so.
    pub fn compact_with(&mut self, others: &mut ShardMap) -> bool {
        crate::index::compact(&mut [
            &mut self.shards,
            self.owners.shards_mut(),
            others.shards_mut(),
        ])
    }

    /// Builds and publishes.
    pub fn publish(&mut self, to: &Published) {
        let index = self.build();
        to.publish(index);
    }

    /// The wire name an owner's records live under.
    fn owner_name(&self, owner: &Owner) -> Option<WireName> {
        match owner {
            Owner::Apex => Some(self.apex_wire.clone()),
            Owner::Service(ns, name) => {
                let name = child(&self.apex, &[name, ns, "svc"])?;
                Some(name_key(&name).into())
            }
        }
    }

    /// `rec` as stored, with its names taken from `pool` when already
    /// there; `None` when it lies outside `root`'s subtree.
    fn store(
        &self,
        root: &[u8],
        rec: Rec,
        pool: &mut HashSet<WireName, FxBuild>,
    ) -> Option<StoredRec> {
        let mut intern = |name: &Name| -> WireName {
            let key = name_key(name);
            if let Some(found) = pool.get(&key[..]) {
                return found.clone();
            }
            let name: WireName = key.into();
            pool.insert(name.clone());
            name
        };
        let name = intern(&rec.name);
        let in_zone = wire::is_subdomain(&name, &self.apex_wire);
        let fits = match rec.data {
            Data::Ptr(_) => !in_zone || wire::is_subdomain(&name, root),
            _ => wire::is_subdomain(&name, root),
        };
        if !fits {
            tracing::warn!(name = %rec.name, "record outside its owner's subtree ignored");
            return None;
        }
        let data = match rec.data {
            Data::A(ip) => Stored::A(ip),
            Data::Aaaa(ip) => Stored::Aaaa(ip),
            Data::Cname(t) => Stored::Cname(intern(&t)),
            Data::Ptr(t) => Stored::Ptr(intern(&t)),
            Data::Srv {
                priority,
                weight,
                port,
                target,
            } => Stored::Srv {
                priority,
                weight,
                port,
                target: intern(&target),
            },
            Data::Txt(text) => Stored::Txt(text.into()),
            Data::Ns(t) => Stored::Ns(intern(&t)),
            Data::Soa => Stored::Soa,
        };
        Some(StoredRec { name, data })
    }

    /// Adds (`linked`) or takes back a PTR name's targets and the
    /// cross-owner dependencies of `records`.
    fn link(&mut self, root: &[u8], records: &[StoredRec], linked: bool) {
        for rec in records {
            if let Stored::Ptr(target) = &rec.data
                && !wire::is_subdomain(&rec.name, &self.apex_wire)
            {
                self.ptr_changes.push(u8::from(linked));
                self.ptr_changes.extend_from_slice(&rec.name);
                self.ptr_changes.extend_from_slice(target);
            }
            if let Some(target) = rec.data.target()
                && !wire::is_subdomain(target, root)
            {
                if linked {
                    self.dependents
                        .entry(target.clone())
                        .or_default()
                        .push(rec.name.clone());
                } else {
                    remove_one(&mut self.dependents, target, &rec.name);
                }
            }
        }
    }

    /// Counts an owner in (or out of) the names between it and the apex.
    fn count_above(&mut self, root: &[u8], add: bool) {
        let mut at = root;
        while at.len() > self.apex_wire.len() {
            at = parent(at);
            if at.len() <= self.apex_wire.len() {
                break;
            }
            let name: WireName = match self.above.get_key_value(at) {
                Some((k, _)) => k.clone(),
                None => at.into(),
            };
            let count = self.above.entry(name.clone()).or_default();
            if add {
                *count += 1;
            } else {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.above.remove(at);
                }
            }
            self.dirty.extend_from_slice(&name);
        }
    }

    /// The owner whose subtree holds `name` (in the zone): its name and
    /// records.
    fn owner_of(&self, name: &[u8]) -> Option<(WireName, Arc<[StoredRec]>)> {
        let mut at = name;
        loop {
            if let Some(packed) = self.owners.get(at) {
                let root: WireName = at.into();
                if let Some(records) = self.decoded.borrow().get(at) {
                    return Some((root, records.clone()));
                }
                let records: Arc<[StoredRec]> = match packed::unpack(&root, packed) {
                    Some(records) => records.into(),
                    None => {
                        tracing::error!("cannot read back an owner's records");
                        Arc::new([])
                    }
                };
                if packed.len() >= KEEP_DECODED {
                    self.decoded
                        .borrow_mut()
                        .insert(root.clone(), records.clone());
                }
                return Some((root, records));
            }
            if at.len() <= self.apex_wire.len() || at.len() <= 1 {
                return None;
            }
            at = parent(at);
        }
    }

    /// The records at `name`, a name in the zone.
    fn records_at(&self, name: &[u8]) -> Records {
        let Some((_, all)) = self.owner_of(name) else {
            return Records {
                all: Arc::new([]),
                range: 0..0,
            };
        };
        let start = all.partition_point(|r| &r.name[..] < name);
        let end = start + all[start..].partition_point(|r| &r.name[..] == name);
        Records {
            all,
            range: start..end,
        }
    }

    /// Whether `name` (in the zone, without records of its own) exists
    /// as an empty non-terminal.
    fn exists_empty(&self, name: &[u8]) -> bool {
        if *name == *self.apex_wire || self.above.contains_key(name) {
            return true;
        }
        self.owner_of(name).is_some_and(|(_, records)| {
            records
                .iter()
                .any(|r| r.name.len() > name.len() && wire::is_subdomain(&r.name, name))
        })
    }

    /// The PTR targets `name`'s node holds now, read back from its answer.
    fn ptr_targets(&self, name: &[u8]) -> BTreeSet<Vec<u8>> {
        let Some(node) = self.shards[shard_of(name)].get(name) else {
            return BTreeSet::new();
        };
        let Some(answer) = node_answer(node, wire::TYPE_PTR) else {
            return BTreeSet::new();
        };
        // The answer behind a header and the question it was encoded for.
        let mut message = vec![0, 0];
        message.extend_from_slice(answer.head);
        message.extend_from_slice(name);
        message.extend_from_slice(&wire::TYPE_PTR.to_be_bytes());
        message.extend_from_slice(&wire::CLASS_IN.to_be_bytes());
        message.extend_from_slice(answer.body);
        let Ok(message) = Message::from_vec(&message) else {
            tracing::warn!("cannot read back a PTR answer");
            return BTreeSet::new();
        };
        message
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::PTR(ptr) => Some(name_key(&ptr.0)),
                _ => None,
            })
            .collect()
    }

    /// The node of `name`, `None` when the name does not exist.
    fn node(&self, name: &[u8], ptr_changes: &PtrChanges) -> Option<Vec<u8>> {
        let qname = to_name(name)?;
        let mut node = Vec::new();
        if !wire::is_subdomain(name, &self.apex_wire) {
            let mut targets = self.ptr_targets(name);
            for (target, add) in ptr_changes.0.get(name).into_iter().flatten() {
                if *add {
                    targets.insert(target.to_vec());
                } else {
                    targets.remove(&target[..]);
                }
            }
            if targets.is_empty() {
                return None;
            }
            let records = targets
                .iter()
                .filter_map(|t| self.record(&qname, &Stored::Ptr(t[..].into())))
                .collect();
            self.push_positive(&mut node, wire::TYPE_PTR, &qname, records, Vec::new());
            return Some(node);
        }
        let records = self.records_at(name);
        if records.is_empty() {
            return self.exists_empty(name).then_some(node);
        }
        let mut cnames: &[StoredRec] = &[];
        for group in records.chunk_by(|a, b| a.data.rtype() == b.data.rtype()) {
            let rtype = group[0].data.rtype();
            let answers = group
                .iter()
                .filter_map(|r| self.record(&qname, &r.data))
                .collect();
            let additionals = self.additionals(group);
            self.push_positive(&mut node, rtype, &qname, answers, additionals);
            if rtype == wire::TYPE_CNAME {
                cnames = group;
            }
        }
        if let Some(first) = cnames.first() {
            // As CoreDNS: an address question about an ExternalName gets
            // the CNAME chain and the addresses it ends at.
            for rtype in [wire::TYPE_A, wire::TYPE_AAAA] {
                self.push_alias(&mut node, &qname, first, rtype);
            }
            let answers = cnames
                .iter()
                .filter_map(|r| self.record(&qname, &r.data))
                .collect();
            self.push_positive(&mut node, 0, &qname, answers, Vec::new());
        }
        Some(node)
    }

    /// The node the encoder makes for `name` now, to check the index
    /// against.
    #[cfg(test)]
    pub(crate) fn encoded_node(&self, name: &[u8]) -> Option<Vec<u8>> {
        self.node(name, &PtrChanges::read(&self.ptr_changes))
    }

    /// The addresses of the SRV targets in `group`.
    fn additionals(&self, group: &[StoredRec]) -> Vec<Record> {
        let mut out = Vec::new();
        for rec in group {
            let Stored::Srv { target, .. } = &rec.data else {
                continue;
            };
            let Some(target_name) = to_name(target) else {
                continue;
            };
            for addr in self.records_at(target).iter() {
                if matches!(addr.data, Stored::A(_) | Stored::Aaaa(_))
                    && let Some(r) = self.record(&target_name, &addr.data)
                {
                    out.push(r);
                }
            }
        }
        out
    }

    fn push_positive(
        &self,
        node: &mut Vec<u8>,
        qtype: u16,
        qname: &Name,
        answers: Vec<Record>,
        additionals: Vec<Record>,
    ) {
        if let Some((head, body)) = encode(
            qname,
            ResponseCode::NoError,
            answers,
            Vec::new(),
            additionals,
        ) {
            push_answer(node, qtype, &head, false, &body);
        }
    }

    /// The answer to an `rtype` (A or AAAA) question about an alias: its
    /// CNAME, the CNAMEs it leads to inside the zone, then the final
    /// name's addresses when that name is in the zone, or a mark that they
    /// are to be asked upstream when it is not.
    fn push_alias(&self, node: &mut Vec<u8>, qname: &Name, cname: &StoredRec, rtype: u16) {
        let Stored::Cname(first) = &cname.data else {
            return;
        };
        let mut answers: Vec<Record> = self.record(qname, &cname.data).into_iter().collect();
        let mut target = first.clone();
        let mut external = false;
        for _ in 0..MAX_CHAIN {
            if !wire::is_subdomain(&target, &self.apex_wire) {
                external = true;
                break;
            }
            let records = self.records_at(&target);
            let Some(target_name) = to_name(&target) else {
                break;
            };
            if let Some(next) = records.iter().find(|r| matches!(r.data, Stored::Cname(_))) {
                answers.extend(self.record(&target_name, &next.data));
                let Stored::Cname(next) = &next.data else {
                    break;
                };
                target = next.clone();
                continue;
            }
            answers.extend(
                records
                    .iter()
                    .filter(|r| r.data.rtype() == rtype)
                    .filter_map(|r| self.record(&target_name, &r.data)),
            );
            break;
        }
        if let Some((head, body)) = encode(
            qname,
            ResponseCode::NoError,
            answers,
            Vec::new(),
            Vec::new(),
        ) {
            push_answer(node, rtype, &head, external, &body);
        }
    }

    fn record(&self, name: &Name, data: &Stored) -> Option<Record> {
        let rdata = match data {
            Stored::A(ip) => RData::A(A(*ip)),
            Stored::Aaaa(ip) => RData::AAAA(AAAA(*ip)),
            Stored::Cname(target) => RData::CNAME(CNAME(to_name(target)?)),
            Stored::Ptr(target) => RData::PTR(PTR(to_name(target)?)),
            Stored::Srv {
                priority,
                weight,
                port,
                target,
            } => RData::SRV(SRV::new(*priority, *weight, *port, to_name(target)?)),
            Stored::Txt(text) => RData::TXT(TXT::new(vec![text.to_string()])),
            Stored::Ns(target) => RData::NS(NS(to_name(target)?)),
            Stored::Soa => RData::SOA(self.soa.clone()),
        };
        Some(Record::from_rdata(name.clone(), self.ttl, rdata))
    }
}

/// Adds to `dirty` every name `records` (of the owner `root`) make exist:
/// their own names and, inside the zone (`apex`), the names between them
/// and `root`.
fn mark_names(dirty: &mut Vec<u8>, apex: &[u8], root: &[u8], records: &[StoredRec]) {
    let mut last: Option<&[u8]> = None;
    for rec in records {
        if last == Some(&rec.name[..]) {
            continue;
        }
        last = Some(&rec.name);
        dirty.extend_from_slice(&rec.name);
        if wire::is_subdomain(&rec.name, apex) {
            let mut at = &rec.name[..];
            while at.len() > root.len() {
                at = parent(at);
                dirty.extend_from_slice(at);
            }
        }
    }
}

/// The names `mark_names` wrote to a buffer, repeats included.
fn split_names(mut buffer: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let mut len = 0;
        loop {
            let label = usize::from(*buffer.get(len)?);
            len += 1 + label;
            if label == 0 {
                break;
            }
        }
        let name = buffer.get(..len)?;
        buffer = &buffer[len..];
        Some(name)
    })
}

/// Removes one `value` from the list at `key`, and the list when empty.
fn remove_one(map: &mut HashMap<WireName, Vec<WireName>, FxBuild>, key: &[u8], value: &[u8]) {
    let Some(list) = map.get_mut(key) else {
        return;
    };
    if let Some(i) = list.iter().position(|v| **v == *value) {
        list.swap_remove(i);
    }
    if list.is_empty() {
        map.remove(key);
    }
}

/// The wire name one label up (`name` must not be the root).
fn parent(name: &[u8]) -> &[u8] {
    let skip = 1 + usize::from(name[0]);
    name.get(skip..).unwrap_or(&[0])
}

/// A hickory name from a wire name.
fn to_name(wire: &[u8]) -> Option<Name> {
    let mut labels = Vec::new();
    let mut at = wire;
    while let Some((&len, rest)) = at.split_first() {
        if len == 0 {
            break;
        }
        let label = rest.get(..usize::from(len))?;
        labels.push(label);
        at = &rest[usize::from(len)..];
    }
    let mut name = Name::from_labels(labels).ok()?;
    name.set_fqdn(true);
    Some(name)
}

/// `labels` (innermost first) prepended to `parent`.
pub fn child(parent: &Name, labels: &[&str]) -> Option<Name> {
    let mut name = parent.clone();
    for label in labels.iter().rev() {
        let prefix = Name::from_ascii(label).ok()?;
        name = prefix.append_domain(&name).ok()?;
    }
    let mut name = name.to_lowercase();
    name.set_fqdn(true);
    Some(name)
}

/// The lowercased wire form of `name`.
pub fn name_key(name: &Name) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len() + 2);
    for label in name.iter() {
        out.push(label.len() as u8);
        out.extend(label.iter().map(|b| b.to_ascii_lowercase()));
    }
    out.push(0);
    out
}

/// Encodes a full answer with hickory and keeps what follows the question.
fn encode(
    name: &Name,
    rcode: ResponseCode,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
) -> Option<([u8; 10], Vec<u8>)> {
    let mut message = Message::response(0, OpCode::Query);
    message.metadata.authoritative = true;
    message.metadata.response_code = rcode;
    message.add_query(Query::query(name.clone(), RecordType::A));
    message.answers = answers;
    message.authorities = authorities;
    message.additionals = additionals;
    let bytes = match message.to_vec() {
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::warn!(%name, error = %e, "cannot encode a DNS answer");
            return None;
        }
    };
    let qend = wire::HEADER_LEN + name_key(name).len() + 4;
    if bytes.len() < qend || bytes.len() - qend > MAX_BODY {
        tracing::warn!(%name, "a DNS answer too large to keep");
        return None;
    }
    let mut head = [0u8; 10];
    head.copy_from_slice(&bytes[2..12]);
    head[0] &= !(wire::FLAG_QR | wire::FLAG_RD);
    Some((head, bytes[qend..].to_vec()))
}

/// The SOA record without compression, to follow any question.
fn raw_soa(apex: &[u8], ttl: u32, soa: &SOA) -> Vec<u8> {
    let mut rdata = name_key(&soa.mname);
    rdata.extend(name_key(&soa.rname));
    rdata.extend(soa.serial.to_be_bytes());
    rdata.extend(soa.refresh.to_be_bytes());
    rdata.extend(soa.retry.to_be_bytes());
    rdata.extend(soa.expire.to_be_bytes());
    rdata.extend(soa.minimum.to_be_bytes());
    let mut out = apex.to_vec();
    out.extend(wire::TYPE_SOA.to_be_bytes());
    out.extend(wire::CLASS_IN.to_be_bytes());
    out.extend(ttl.to_be_bytes());
    out.extend((rdata.len() as u16).to_be_bytes());
    out.extend(rdata);
    out
}
