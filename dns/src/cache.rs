//! A bounded cache of upstream answers (CoreDNS's `cache` plugin):
//! positive and negative, each kept no longer than its TTL allows and
//! handed out with TTLs counted down. Cluster names never live here, so
//! a flood of random names cannot push them out.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};

/// Longest time a positive answer is kept (CoreDNS's default).
pub const MAX_POSITIVE_TTL: u32 = 3600;
/// Longest time a negative answer is kept (CoreDNS's default).
pub const MAX_NEGATIVE_TTL: u32 = 1800;
/// Negative answers without an SOA are kept this long (CoreDNS's
/// `MinimalDefaultTTL`).
const DEFAULT_NEGATIVE_TTL: u32 = 5;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    name: Name,
    rtype: RecordType,
    class: DNSClass,
}

struct Entry {
    message: Message,
    stored: Instant,
    expires: Instant,
    kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Success,
    Denial,
}

pub struct Cache {
    entries: HashMap<Key, Entry>,
    capacity: usize,
    /// Entries per kind (`Kind as usize`), for `coredns_cache_entries`.
    counts: [usize; 2],
}

impl Cache {
    pub fn new(capacity: usize) -> Self {
        Cache {
            entries: HashMap::new(),
            capacity,
            counts: [0; 2],
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Entries holding answers (`Kind::Success`) and denials.
    pub fn entries(&self, kind: Kind) -> usize {
        self.counts[kind as usize]
    }

    /// The cached answer, with TTLs reduced by the time it was held.
    pub fn get(
        &mut self,
        name: &Name,
        rtype: RecordType,
        class: DNSClass,
        now: Instant,
    ) -> Option<(Message, Kind)> {
        let key = Key {
            name: name.to_lowercase(),
            rtype,
            class,
        };
        let entry = self.entries.get(&key)?;
        if now >= entry.expires {
            self.remove(&key);
            return None;
        }
        let held = now.duration_since(entry.stored).as_secs() as u32;
        let mut message = entry.message.clone();
        for record in message
            .answers
            .iter_mut()
            .chain(message.authorities.iter_mut())
            .chain(message.additionals.iter_mut())
        {
            record.decrement_ttl(held);
        }
        let kind = kind_of(&message);
        Some((message, kind))
    }

    /// Keeps `message` if it may be cached.
    pub fn put(&mut self, message: &Message, now: Instant) {
        let Some(query) = message.queries.first() else {
            return;
        };
        let Some(ttl) = cache_ttl(message) else {
            return;
        };
        if ttl == 0 || self.capacity == 0 {
            return;
        }
        if self.entries.len() >= self.capacity {
            self.entries.retain(|_, e| e.expires > now);
            self.counts = [0; 2];
            for entry in self.entries.values() {
                self.counts[entry.kind as usize] += 1;
            }
        }
        if self.entries.len() >= self.capacity {
            // Still full of live entries: make room by dropping any one.
            if let Some(victim) = self.entries.keys().next().cloned() {
                self.remove(&victim);
            }
        }
        let mut stored = message.clone();
        stored.edns = None;
        stored.signature = None;
        let kind = kind_of(&stored);
        let key = Key {
            name: query.name().to_lowercase(),
            rtype: query.query_type(),
            class: query.query_class(),
        };
        self.remove(&key);
        self.counts[kind as usize] += 1;
        self.entries.insert(
            key,
            Entry {
                message: stored,
                stored: now,
                expires: now + Duration::from_secs(u64::from(ttl)),
                kind,
            },
        );
    }

    fn remove(&mut self, key: &Key) {
        if let Some(entry) = self.entries.remove(key) {
            self.counts[entry.kind as usize] -= 1;
        }
    }
}

fn kind_of(message: &Message) -> Kind {
    if message.metadata.response_code == ResponseCode::NoError && !message.answers.is_empty() {
        Kind::Success
    } else {
        Kind::Denial
    }
}

/// How long `message` may be cached: the smallest TTL of its answers, or
/// for NXDOMAIN/NODATA the SOA's negative TTL; `None` for errors and
/// truncated answers.
fn cache_ttl(message: &Message) -> Option<u32> {
    if message.metadata.truncation {
        return None;
    }
    match message.metadata.response_code {
        ResponseCode::NoError if !message.answers.is_empty() => message
            .answers
            .iter()
            .map(|r| r.ttl)
            .min()
            .map(|t| t.min(MAX_POSITIVE_TTL)),
        ResponseCode::NoError | ResponseCode::NXDomain => {
            let soa = message.authorities.iter().find_map(|r| match &r.data {
                RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                _ => None,
            });
            Some(soa.unwrap_or(DEFAULT_NEGATIVE_TTL).min(MAX_NEGATIVE_TTL))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{OpCode, Query};
    use hickory_proto::rr::Record;
    use hickory_proto::rr::rdata::{A, SOA};

    fn answer(name: &str, ttl: u32) -> Message {
        let name = Name::from_ascii(name).unwrap();
        let mut m = Message::response(1, OpCode::Query);
        m.add_query(Query::query(name.clone(), RecordType::A));
        m.add_answer(Record::from_rdata(
            name,
            ttl,
            RData::A(A::new(192, 0, 2, 1)),
        ));
        m
    }

    #[test]
    fn respects_ttl_and_counts_down() {
        let mut cache = Cache::new(10);
        let now = Instant::now();
        cache.put(&answer("www.example.com.", 10), now);
        let name = Name::from_ascii("WWW.example.com.").unwrap();
        let (hit, kind) = cache
            .get(
                &name,
                RecordType::A,
                DNSClass::IN,
                now + Duration::from_secs(4),
            )
            .unwrap();
        assert_eq!(kind, Kind::Success);
        assert_eq!(hit.answers[0].ttl, 6);
        assert!(
            cache
                .get(
                    &name,
                    RecordType::A,
                    DNSClass::IN,
                    now + Duration::from_secs(10)
                )
                .is_none()
        );
        assert!(cache.is_empty());
    }

    #[test]
    fn caches_denials_by_soa_minimum() {
        let name = Name::from_ascii("nope.example.com.").unwrap();
        let mut m = Message::response(1, OpCode::Query);
        m.metadata.response_code = ResponseCode::NXDomain;
        m.add_query(Query::query(name.clone(), RecordType::A));
        let soa = SOA::new(name.clone(), name.clone(), 1, 1, 1, 1, 20);
        m.add_authority(Record::from_rdata(name.base_name(), 300, RData::SOA(soa)));
        let mut cache = Cache::new(10);
        let now = Instant::now();
        cache.put(&m, now);
        let at = |s| now + Duration::from_secs(s);
        assert_eq!(
            cache
                .get(&name, RecordType::A, DNSClass::IN, at(19))
                .unwrap()
                .1,
            Kind::Denial
        );
        assert!(
            cache
                .get(&name, RecordType::A, DNSClass::IN, at(20))
                .is_none()
        );
        let mut servfail = m.clone();
        servfail.metadata.response_code = ResponseCode::ServFail;
        cache.put(&servfail, now);
        assert!(cache.is_empty());
    }

    #[test]
    fn counts_entries_by_kind() {
        let mut cache = Cache::new(2);
        let now = Instant::now();
        cache.put(&answer("a.example.com.", 10), now);
        cache.put(&answer("a.example.com.", 20), now);
        assert_eq!(
            cache.entries(Kind::Success),
            1,
            "a replaced entry counts once"
        );
        let mut denial = Message::response(1, OpCode::Query);
        denial.metadata.response_code = ResponseCode::NXDomain;
        denial.add_query(Query::query(
            Name::from_ascii("nx.example.com.").unwrap(),
            RecordType::A,
        ));
        cache.put(&denial, now);
        assert_eq!(cache.entries(Kind::Denial), 1);
        // A denial without an SOA lives 5 s, as in CoreDNS.
        let later = now + Duration::from_secs(5);
        let name = Name::from_ascii("nx.example.com.").unwrap();
        assert!(
            cache
                .get(&name, RecordType::A, DNSClass::IN, later)
                .is_none()
        );
        assert_eq!(cache.entries(Kind::Denial), 0);
        // Full: a third entry pushes one out and the counts follow.
        cache.put(&answer("b.example.com.", 10), now);
        cache.put(&answer("c.example.com.", 10), now);
        assert_eq!(cache.len(), 2);
        assert_eq!(
            cache.entries(Kind::Success) + cache.entries(Kind::Denial),
            2
        );
    }

    #[test]
    fn stays_within_capacity() {
        let mut cache = Cache::new(100);
        let now = Instant::now();
        for i in 0..1000 {
            cache.put(&answer(&format!("n{i}.example.com."), 60), now);
        }
        assert_eq!(cache.len(), 100);
    }
}
