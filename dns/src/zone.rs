//! The write side of the zone: records grouped by owner (a Service, or the
//! zone itself), merged per name, encoded once per (name, type) with
//! `hickory-proto` and published as an `Index`. An update re-encodes only
//! the names its owner touched and copies only the shards they live in.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use hickory_proto::op::{Message, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::index::{Answer, Index, Published, SHARDS, Shard, Zone, shard_of};
use crate::wire;

/// The schema version of the Kubernetes DNS specification served.
pub const SCHEMA_VERSION: &str = "1.1.0";

/// Record data, with names lowercased and fully qualified.
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

    fn rtype(&self) -> u16 {
        match self {
            Data::A(_) => wire::TYPE_A,
            Data::Aaaa(_) => wire::TYPE_AAAA,
            Data::Cname(_) => wire::TYPE_CNAME,
            Data::Ptr(_) => wire::TYPE_PTR,
            Data::Srv { .. } => wire::TYPE_SRV,
            Data::Txt(_) => wire::TYPE_TXT,
            Data::Ns(_) => wire::TYPE_NS,
            Data::Soa => wire::TYPE_SOA,
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
/// whole.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Owner {
    /// dns-version, the apex SOA and NS.
    Apex,
    /// A Service (namespace, name), with its endpoints and pods.
    Service(String, String),
}

#[derive(Debug)]
struct NameState {
    name: Name,
    records: Vec<(Owner, Data)>,
    /// Names directly below this one; a name with children but no records
    /// is an empty non-terminal (NODATA, not NXDOMAIN).
    children: u32,
    /// Types with an encoded answer in the index.
    encoded: Vec<u16>,
}

pub struct ZoneBuilder {
    apex: Name,
    ttl: u32,
    soa: SOA,
    zone: Arc<Zone>,
    owners: HashMap<Owner, Vec<Rec>>,
    names: HashMap<Vec<u8>, NameState>,
    shards: Vec<Arc<Shard>>,
    dirty: HashSet<Vec<u8>>,
    /// CNAME target → aliases pointing at it (with a count per alias, as
    /// several owners may hold the same alias), so an alias is re-encoded
    /// when its in-zone target's addresses change.
    aliases: HashMap<Vec<u8>, HashMap<Vec<u8>, u32>>,
    ready: bool,
}

/// Most CNAMEs followed inside the zone (a loop of ExternalNames stops
/// here).
const MAX_CHAIN: usize = 8;

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
            apex: apex_wire,
            ttl,
            forwarding,
        });
        let mut builder = ZoneBuilder {
            apex: apex.clone(),
            ttl,
            soa,
            zone,
            owners: HashMap::new(),
            names: HashMap::new(),
            shards: (0..SHARDS).map(|_| Arc::new(Shard::default())).collect(),
            dirty: HashSet::new(),
            aliases: HashMap::new(),
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
                builder.touch(&name, 1);
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
    /// empty, to remove the owner).
    pub fn set_owner(&mut self, owner: Owner, records: Vec<Rec>) {
        let old = if records.is_empty() {
            self.owners.remove(&owner).unwrap_or_default()
        } else {
            self.owners
                .insert(owner.clone(), records.clone())
                .unwrap_or_default()
        };
        if old == records {
            return;
        }
        let old_names: BTreeSet<Vec<u8>> = old.iter().map(|r| name_key(&r.name)).collect();
        let new_names: BTreeSet<Vec<u8>> = records.iter().map(|r| name_key(&r.name)).collect();
        for key in &old_names {
            if let Some(state) = self.names.get_mut(key) {
                state.records.retain(|(o, _)| *o != owner);
            }
            self.dirty.insert(key.clone());
        }
        for rec in &old {
            if let Data::Cname(target) = &rec.data {
                self.unlink_alias(&name_key(target), &name_key(&rec.name));
            }
        }
        for rec in &records {
            if let Data::Cname(target) = &rec.data {
                *self
                    .aliases
                    .entry(name_key(target))
                    .or_default()
                    .entry(name_key(&rec.name))
                    .or_default() += 1;
            }
        }
        for rec in records {
            let key = name_key(&rec.name);
            if !self.names.contains_key(&key) {
                self.touch(&rec.name, 0);
            }
            if let Some(state) = self.names.get_mut(&key)
                && !state
                    .records
                    .iter()
                    .any(|(o, d)| *o == owner && *d == rec.data)
            {
                state.records.push((owner.clone(), rec.data));
            }
            self.dirty.insert(key);
        }
        // Names this owner no longer has go only after the new records are
        // in, so a name kept across the update keeps its index entries.
        for key in old_names.difference(&new_names) {
            self.collect_if_empty(key.clone());
        }
    }

    /// Re-encodes what changed and returns the new index.
    pub fn build(&mut self) -> Index {
        // A changed name also changes the answers of the aliases that lead
        // to it, directly or through other aliases.
        let mut dirty: Vec<Vec<u8>> = self.dirty.drain().collect();
        let mut seen: HashSet<Vec<u8>> = dirty.iter().cloned().collect();
        let mut next = 0;
        while next < dirty.len() {
            if let Some(aliases) = self.aliases.get(&dirty[next]) {
                for alias in aliases.keys() {
                    if seen.insert(alias.clone()) {
                        dirty.push(alias.clone());
                    }
                }
            }
            next += 1;
        }
        for key in dirty {
            self.encode_name(&key);
        }
        Index {
            shards: self.shards.clone(),
            zone: self.zone.clone(),
            ready: self.ready,
        }
    }

    /// Builds and publishes.
    pub fn publish(&mut self, to: &Published) {
        let index = self.build();
        to.publish(index);
    }

    fn unlink_alias(&mut self, target: &[u8], alias: &[u8]) {
        let Some(aliases) = self.aliases.get_mut(target) else {
            return;
        };
        if let Some(count) = aliases.get_mut(alias) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                aliases.remove(alias);
            }
        }
        if aliases.is_empty() {
            self.aliases.remove(target);
        }
    }

    /// Creates `name` (and its missing ancestors inside the zone) with
    /// `children` extra child references.
    fn touch(&mut self, name: &Name, children: u32) {
        let key = name_key(name);
        if let Some(state) = self.names.get_mut(&key) {
            state.children += children;
            return;
        }
        self.names.insert(
            key.clone(),
            NameState {
                name: name.clone(),
                records: Vec::new(),
                children,
                encoded: Vec::new(),
            },
        );
        self.dirty.insert(key);
        if let Some(parent) = self.parent_in_zone(name) {
            self.touch(&parent, 1);
        }
    }

    /// Drops a name with no records and no children, with its index
    /// entries, and releases its parent.
    fn collect_if_empty(&mut self, key: Vec<u8>) {
        let Some(state) = self.names.get(&key) else {
            return;
        };
        if !state.records.is_empty() || state.children > 0 || state.name == self.apex {
            return;
        }
        let Some(state) = self.names.remove(&key) else {
            return;
        };
        for t in state.encoded.iter().copied().chain([0]) {
            self.remove(&key, t);
        }
        if let Some(parent) = self.parent_in_zone(&state.name) {
            let parent_key = name_key(&parent);
            if let Some(p) = self.names.get_mut(&parent_key) {
                p.children = p.children.saturating_sub(1);
            }
            self.dirty.insert(parent_key.clone());
            self.collect_if_empty(parent_key);
        }
    }

    fn parent_in_zone(&self, name: &Name) -> Option<Name> {
        if name == &self.apex || !self.apex.zone_of(name) {
            return None;
        }
        Some(name.base_name())
    }

    /// Writes the index entries of one name from its current records.
    fn encode_name(&mut self, key: &[u8]) {
        let Some(state) = self.names.get(key) else {
            return;
        };
        let stale: Vec<u16> = state.encoded.clone();
        if state.records.is_empty() && state.children == 0 && state.name != self.apex {
            for t in stale.iter().copied().chain([0]) {
                self.remove(key, t);
            }
            self.names.remove(key);
            return;
        }
        let name = state.name.clone();
        let mut by_type: HashMap<u16, BTreeSet<Data>> = HashMap::new();
        for (_, data) in &state.records {
            by_type
                .entry(data.rtype())
                .or_default()
                .insert(data.clone());
        }
        let mut answers: Vec<(u16, Answer)> = Vec::new();
        for (rtype, datas) in &by_type {
            if let Some(answer) = self.positive(&name, datas) {
                answers.push((*rtype, answer));
            }
        }
        let mut types: Vec<u16> = by_type.keys().copied().collect();
        let default = match by_type.get(&wire::TYPE_CNAME) {
            Some(cname) => {
                // As CoreDNS: an address question about an ExternalName
                // gets the CNAME chain and the addresses it ends at.
                for rtype in [wire::TYPE_A, wire::TYPE_AAAA] {
                    if let Some(answer) = self.alias(&name, cname, rtype) {
                        answers.push((rtype, answer));
                        if !types.contains(&rtype) {
                            types.push(rtype);
                        }
                    }
                }
                self.positive(&name, cname)
            }
            None => self.negative(&name, ResponseCode::NoError),
        };
        for t in stale {
            if !types.contains(&t) {
                self.remove(key, t);
            }
        }
        for (rtype, answer) in answers {
            self.insert(key, rtype, answer);
        }
        if let Some(answer) = default {
            self.insert(key, 0, answer);
        }
        if let Some(state) = self.names.get_mut(key) {
            state.encoded = types;
        }
    }

    fn insert(&mut self, name_key: &[u8], rtype: u16, answer: Answer) {
        let key = lookup_key(name_key, rtype);
        let shard = shard_of(&key);
        if self.shards[shard]
            .get(&key[..])
            .is_some_and(|a| **a == answer)
        {
            return;
        }
        Arc::make_mut(&mut self.shards[shard]).insert(key, Arc::new(answer));
    }

    fn remove(&mut self, name_key: &[u8], rtype: u16) {
        let key = lookup_key(name_key, rtype);
        let shard = shard_of(&key);
        if self.shards[shard].contains_key(&key[..]) {
            Arc::make_mut(&mut self.shards[shard]).remove(&key[..]);
        }
    }

    fn positive(&self, name: &Name, datas: &BTreeSet<Data>) -> Option<Answer> {
        let answers: Vec<Record> = datas.iter().map(|d| self.record(name, d)).collect();
        let mut additionals = Vec::new();
        for data in datas {
            if let Data::Srv { target, .. } = data
                && let Some(state) = self.names.get(&name_key(target))
            {
                let mut addrs: Vec<&Data> = state
                    .records
                    .iter()
                    .map(|(_, d)| d)
                    .filter(|d| matches!(d, Data::A(_) | Data::Aaaa(_)))
                    .collect();
                addrs.sort();
                addrs.dedup();
                additionals.extend(addrs.into_iter().map(|d| self.record(target, d)));
            }
        }
        encode(
            name,
            ResponseCode::NoError,
            answers,
            Vec::new(),
            additionals,
        )
    }

    /// The answer to an `rtype` (A or AAAA) question about an alias: its
    /// CNAME, the CNAMEs it leads to inside the zone, then the final
    /// name's addresses when that name is in the zone, or a mark that they
    /// are to be asked upstream when it is not.
    fn alias(&self, name: &Name, cnames: &BTreeSet<Data>, rtype: u16) -> Option<Answer> {
        let mut answers: Vec<Record> = cnames.iter().map(|d| self.record(name, d)).collect();
        let Some(Data::Cname(mut target)) = cnames.first().cloned() else {
            return None;
        };
        let mut external = false;
        for _ in 0..MAX_CHAIN {
            if !self.apex.zone_of(&target) {
                external = true;
                break;
            }
            let Some(state) = self.names.get(&name_key(&target)) else {
                break;
            };
            let mut datas: Vec<&Data> = state.records.iter().map(|(_, d)| d).collect();
            datas.sort();
            datas.dedup();
            if let Some(Data::Cname(next)) = datas.iter().find(|d| matches!(d, Data::Cname(_))) {
                answers.push(self.record(&target, &Data::Cname(next.clone())));
                target = next.clone();
                continue;
            }
            answers.extend(
                datas
                    .into_iter()
                    .filter(|d| d.rtype() == rtype)
                    .map(|d| self.record(&target, d)),
            );
            break;
        }
        let mut answer = encode(name, ResponseCode::NoError, answers, Vec::new(), Vec::new())?;
        answer.external = external;
        Some(answer)
    }

    fn negative(&self, name: &Name, rcode: ResponseCode) -> Option<Answer> {
        let soa = Record::from_rdata(self.apex.clone(), self.ttl, RData::SOA(self.soa.clone()));
        encode(name, rcode, Vec::new(), vec![soa], Vec::new())
    }

    fn record(&self, name: &Name, data: &Data) -> Record {
        let rdata = match data {
            Data::A(ip) => RData::A(A(*ip)),
            Data::Aaaa(ip) => RData::AAAA(AAAA(*ip)),
            Data::Cname(target) => RData::CNAME(CNAME(target.clone())),
            Data::Ptr(target) => RData::PTR(PTR(target.clone())),
            Data::Srv {
                priority,
                weight,
                port,
                target,
            } => RData::SRV(SRV::new(*priority, *weight, *port, target.clone())),
            Data::Txt(text) => RData::TXT(TXT::new(vec![text.clone()])),
            Data::Ns(target) => RData::NS(NS(target.clone())),
            Data::Soa => RData::SOA(self.soa.clone()),
        };
        Record::from_rdata(name.clone(), self.ttl, rdata)
    }
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

fn lookup_key(name_key: &[u8], rtype: u16) -> Box<[u8]> {
    let mut key = Vec::with_capacity(name_key.len() + 2);
    key.extend_from_slice(name_key);
    key.extend_from_slice(&rtype.to_be_bytes());
    key.into_boxed_slice()
}

/// Encodes a full answer with hickory and keeps what follows the question.
fn encode(
    name: &Name,
    rcode: ResponseCode,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
) -> Option<Answer> {
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
    if bytes.len() < qend {
        return None;
    }
    let mut head = [0u8; 10];
    head.copy_from_slice(&bytes[2..12]);
    head[0] &= !(wire::FLAG_QR | wire::FLAG_RD);
    Some(Answer {
        head,
        body: bytes[qend..].into(),
        external: false,
    })
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
