//! The read side of the zone: a sharded map from a lowercased wire name
//! to its node, the pre-encoded answers of every type the name has,
//! published as an immutable snapshot. Readers check one atomic per batch
//! and take a lock only when a new snapshot was published; the writer
//! (`zone`) replaces only the shards it changed.

mod bytes;

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
pub use bytes::{collect as collect_shard_memory, live_bytes as shard_bytes};

/// Bits of a name's hash that pick its shard. Small shards (a few names
/// each at a thousand Services) keep what a change copies small, and
/// leave the allocator fewer holes as shards are rewritten: measured
/// in-process with 1,200 objects added one by one, 64 shards left about
/// a fifth more resident memory per object than 1,024.
const SHARD_BITS: u32 = 10;
pub const SHARDS: usize = 1 << SHARD_BITS;

/// A name's node: its answers one after the other, each
/// `[qtype: 2][head: 10][external: 1][body length: 2][body]`. Qtype 0
/// answers every type without an answer of its own (an alias's CNAME);
/// a node without one answers such types NODATA, and an empty node is an
/// empty non-terminal.
pub type Node = [u8];

/// One shard of the map, immutable once built, in one allocation: its
/// entries' names and nodes back to back, found through an open-addressed
/// table of offsets in front of them. One allocation per shard rather
/// than three per name (a map slot, the name, the node) keeps the zone at
/// about its encoded size; a changed shard is written anew, exactly sized,
/// in one pass, and a snapshot shares the shards it did not change.
///
/// Layout: `[slots: 4][entries: 4][slot: 4]*[entry]*`, numbers little
/// endian; an entry is `[name length: 1][name][node length: 4][node]`; a
/// slot holds 1 + the offset of an entry after the table, at the slot its
/// name hashes to or after it (linear probing), or 0 when free. A quarter
/// or more of the slots is free, so probes stay short.
///
/// A shard's bytes are its own allocation, or a range of a slab that
/// `compact` packed many shards into, both in the shards' own heap
/// (`bytes`): rewriting shards as names come and go leaves freed copies
/// of every size behind, holes that keep the allocator's pages resident;
/// packed back to back in one allocation once the changes settle, the
/// live shards leave those pages empty, to be given back. Measured with
/// 1,200 objects: about 750 B of RSS per object instead of 1,100.
#[derive(Clone, Debug)]
pub struct Shard {
    bytes: Arc<Bytes>,
    start: u32,
    len: u32,
}

/// Bytes before a shard's slots.
const SHARD_HEAD: usize = 8;

impl Default for Shard {
    fn default() -> Self {
        Shard::own(Bytes::copy_of(&[0u8; SHARD_HEAD]))
    }
}

impl Shard {
    /// A shard in an allocation of its own (shards are far below 4 GiB:
    /// `from_entries` refuses larger ones).
    fn own(bytes: Bytes) -> Shard {
        let len = bytes.as_slice().len() as u32;
        Shard {
            bytes: Arc::new(bytes),
            start: 0,
            len,
        }
    }

    /// The shard's bytes.
    fn data(&self) -> &[u8] {
        let start = self.start as usize;
        self.bytes
            .as_slice()
            .get(start..start + self.len as usize)
            .unwrap_or(&[])
    }

    /// The node of `name`, a lowercased wire name.
    pub fn get(&self, name: &[u8]) -> Option<&Node> {
        self.get_hashed(name, name_hash(name))
    }

    /// As `get`, given `name_hash(name)`: the index's lookup hashes a
    /// name once for both its shard and its slot.
    fn get_hashed(&self, name: &[u8], hash: u64) -> Option<&Node> {
        let data = self.data();
        let word = |at: usize| le_word(data, at).map(|w| w as usize);
        let slots = word(0)?;
        if slots == 0 {
            return None;
        }
        let entries = data.get(SHARD_HEAD + 4 * slots..)?;
        let mut slot = slot_at(hash, slots);
        loop {
            let entry = word(SHARD_HEAD + 4 * slot)?;
            if entry == 0 {
                return None;
            }
            let (key, node) = entry_at(entries, entry - 1)?;
            if key == name {
                return Some(node);
            }
            slot = if slot + 1 == slots { 0 } else { slot + 1 };
        }
    }

    pub fn contains_key(&self, name: &[u8]) -> bool {
        self.get(name).is_some()
    }

    pub fn len(&self) -> usize {
        self.word(4).unwrap_or(0) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether both are the same shard (not a copy).
    pub fn ptr_eq(&self, other: &Shard) -> bool {
        Arc::ptr_eq(&self.bytes, &other.bytes) && self.start == other.start
    }

    /// Every (name, node), in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &Node)> + Clone {
        let entries = self.entries();
        let mut at = 0;
        std::iter::from_fn(move || {
            let (key, node) = entry_at(entries, at)?;
            at += 1 + key.len() + 4 + node.len();
            Some((key, node))
        })
    }

    pub fn keys(&self) -> impl Iterator<Item = &[u8]> {
        self.iter().map(|(k, _)| k)
    }

    /// This shard with `changes` applied: a name with `Some(node)` gets
    /// that node, one with `None` is removed. `changes` names each name
    /// once, in byte order.
    pub fn with_changes(&self, changes: &[(&[u8], Option<&Node>)]) -> Shard {
        let changed = |name: &[u8]| changes.binary_search_by(|(k, _)| (*k).cmp(name)).is_ok();
        let kept = self.iter().filter(move |(k, _)| !changed(k));
        let added = changes
            .iter()
            .filter(|(k, _)| k.len() <= usize::from(u8::MAX))
            .filter_map(|(k, node)| Some((*k, (*node)?)));
        Shard::from_entries(kept.chain(added))
    }

    fn from_entries<'a>(entries: impl Iterator<Item = (&'a [u8], &'a Node)> + Clone) -> Shard {
        let mut size = 0;
        let mut len = 0;
        for (key, node) in entries.clone() {
            size += 1 + key.len() + 4 + node.len();
            len += 1;
        }
        let slots = if len == 0 { 0 } else { len + len / 3 + 1 };
        let table = SHARD_HEAD + 4 * slots;
        if table + size >= u32::MAX as usize {
            tracing::error!(size, "an index shard is too large to keep; names dropped");
            return Shard::default();
        }
        let mut buf = Vec::with_capacity(table + size);
        buf.extend_from_slice(&(slots as u32).to_le_bytes());
        buf.extend_from_slice(&(len as u32).to_le_bytes());
        buf.resize(table, 0);
        for (key, node) in entries {
            let at = buf.len() - table;
            buf.push(key.len() as u8);
            buf.extend_from_slice(key);
            buf.extend_from_slice(&(node.len() as u32).to_le_bytes());
            buf.extend_from_slice(node);
            let mut slot = slot_at(name_hash(key), slots);
            while buf[SHARD_HEAD + 4 * slot..SHARD_HEAD + 4 * slot + 4] != [0; 4] {
                slot = if slot + 1 == slots { 0 } else { slot + 1 };
            }
            buf[SHARD_HEAD + 4 * slot..SHARD_HEAD + 4 * slot + 4]
                .copy_from_slice(&(at as u32 + 1).to_le_bytes());
        }
        Shard::own(Bytes::copy_of(&buf))
    }

    fn slots(&self) -> usize {
        self.word(0).unwrap_or(0) as usize
    }

    fn entries(&self) -> &[u8] {
        self.data()
            .get(SHARD_HEAD + 4 * self.slots()..)
            .unwrap_or(&[])
    }

    /// The little-endian word at byte `at`.
    fn word(&self, at: usize) -> Option<u32> {
        le_word(self.data(), at)
    }
}

/// The little-endian word at byte `at` of `data`.
fn le_word(data: &[u8], at: usize) -> Option<u32> {
    let bytes = data.get(at..at + 4)?;
    Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

/// Packs the shards of `sets` back to back into one new allocation
/// (unless they already share one), so that the copies left behind by
/// their rewrites can be freed with the pages they hold. Returns whether
/// anything was packed. Shards with no names keep the shared empty shard.
pub fn compact(sets: &mut [&mut [Shard]]) -> bool {
    let live = || {
        sets.iter()
            .flat_map(|set| set.iter())
            .filter(|shard| !shard.is_empty())
    };
    let total: usize = live().map(|shard| shard.len as usize).sum();
    // Already one slab holding exactly these shards (or nothing to pack).
    let packed = live().next().is_none_or(|first| {
        first.bytes.as_slice().len() == total && live().all(|s| Arc::ptr_eq(&s.bytes, &first.bytes))
    });
    if packed || total >= u32::MAX as usize {
        return false;
    }
    let bytes = Arc::new(Bytes::build(total, |dst| {
        let mut at = 0;
        for shard in live() {
            let data = shard.data();
            dst[at..at + data.len()].copy_from_slice(data);
            at += data.len();
        }
    }));
    let mut at = 0u32;
    for set in sets.iter_mut() {
        for shard in set.iter_mut().filter(|shard| !shard.is_empty()) {
            let len = shard.len;
            *shard = Shard {
                bytes: bytes.clone(),
                start: at,
                len,
            };
            at += len;
        }
    }
    true
}

/// A map from names (up to 255 bytes) to byte strings in shards, for
/// the builder's and the watch's own many small entries: one allocation
/// per shard of a few entries rather than a map slot and one or two
/// allocations each. A change writes its shard anew.
pub struct ShardMap {
    shards: Vec<Shard>,
    bits: u32,
}

impl Default for ShardMap {
    /// 256 shards: a few entries each at a thousand.
    fn default() -> Self {
        ShardMap::new(8)
    }
}

impl ShardMap {
    /// A map of `2^bits` shards (`bits` from 1 to 16).
    pub fn new(bits: u32) -> Self {
        let bits = bits.clamp(1, 16);
        ShardMap {
            shards: vec![Shard::default(); 1 << bits],
            bits,
        }
    }

    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.shards[self.shard(name)].get(name)
    }

    /// Sets (`Some`) or removes the value of `name`; names over 255
    /// bytes are not kept.
    pub fn set(&mut self, name: &[u8], value: Option<&[u8]>) {
        let shard = self.shard(name);
        if self.shards[shard].get(name) != value {
            self.shards[shard] = self.shards[shard].with_changes(&[(name, value)]);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    /// The shards, for `compact`.
    pub fn shards_mut(&mut self) -> &mut [Shard] {
        &mut self.shards
    }

    fn shard(&self, name: &[u8]) -> usize {
        (name_hash(name) >> (64 - self.bits)) as usize
    }
}

/// The (name, node) of the entry at `at` in a shard's entries.
fn entry_at(entries: &[u8], at: usize) -> Option<(&[u8], &Node)> {
    let key_len = usize::from(*entries.get(at)?);
    let key = entries.get(at + 1..at + 1 + key_len)?;
    let len = entries.get(at + 1 + key_len..at + 5 + key_len)?;
    let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    let node = entries.get(at + 5 + key_len..at + 5 + key_len + len)?;
    Some((key, node))
}

/// The home slot of a name with `hash` in a table of `slots` slots: the
/// hash's bits below those `shard_of` took, scaled to the table.
fn slot_at(hash: u64, slots: usize) -> usize {
    let bits = hash << SHARD_BITS;
    ((u128::from(bits) * slots as u128) >> 64) as usize
}

/// Bytes of an answer's fixed part in a node.
const ENTRY_HEAD: usize = 2 + 10 + 1 + 2;

/// A pre-encoded answer inside a node. Names in `body` may point into the
/// question (offset 12), which the client's question replaces byte for
/// byte up to case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer<'a> {
    /// Flags (2 bytes, without RD/CD which come from the query) and the
    /// QD/AN/NS/AR counts.
    pub head: &'a [u8],
    pub body: &'a [u8],
    /// An ExternalName answer whose CNAME chain leaves the zone: the
    /// target's addresses come from upstream, off the hot path.
    pub external: bool,
}

impl Answer<'_> {
    pub fn rcode(&self) -> u8 {
        self.head[1] & 0x0f
    }
}

/// Appends an answer for `qtype` to a node under construction.
pub fn push_answer(node: &mut Vec<u8>, qtype: u16, head: &[u8; 10], external: bool, body: &[u8]) {
    node.extend_from_slice(&qtype.to_be_bytes());
    node.extend_from_slice(head);
    node.push(u8::from(external));
    node.extend_from_slice(&(body.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
    node.extend_from_slice(&body[..body.len().min(usize::from(u16::MAX))]);
}

/// The answer `node` holds for `qtype`, else its catch-all (qtype 0).
/// `None` means NODATA.
pub fn node_answer(node: &[u8], qtype: u16) -> Option<Answer<'_>> {
    let mut fallback = None;
    let mut pos = 0;
    while let Some(fixed) = node.get(pos..pos + ENTRY_HEAD) {
        let t = u16::from_be_bytes([fixed[0], fixed[1]]);
        let len = usize::from(u16::from_be_bytes([fixed[13], fixed[14]]));
        let body = node.get(pos + ENTRY_HEAD..pos + ENTRY_HEAD + len)?;
        let answer = Answer {
            head: &fixed[2..12],
            body,
            external: fixed[12] != 0,
        };
        if t == qtype {
            return Some(answer);
        }
        if t == 0 {
            fallback = Some(answer);
        }
        pos += ENTRY_HEAD + len;
    }
    fallback
}

/// What the fast path needs to know about the zone besides the map.
#[derive(Debug)]
pub struct Zone {
    /// The cluster domain as a lowercased wire name.
    pub apex: Vec<u8>,
    /// `pod.<zone>` as a lowercased wire name.
    pub pod_suffix: Vec<u8>,
    /// The zone's SOA record, uncompressed, for negative answers.
    pub soa: Vec<u8>,
    /// Record TTL for synthesised pod answers.
    pub ttl: u32,
    /// Whether names outside the zone are forwarded upstream (else
    /// REFUSED).
    pub forwarding: bool,
}

#[derive(Debug)]
pub struct Index {
    pub shards: Vec<Shard>,
    pub zone: Arc<Zone>,
    /// False until the watches have listed everything once; until then
    /// zone questions get SERVFAIL rather than a false NXDOMAIN.
    pub ready: bool,
}

impl Index {
    pub fn empty(zone: Arc<Zone>) -> Self {
        Index {
            shards: empty_shards(),
            zone,
            ready: false,
        }
    }

    /// The node of `name`, a lowercased wire name.
    pub fn node(&self, name: &[u8]) -> Option<&[u8]> {
        let hash = name_hash(name);
        self.shards[shard_at(hash)].get_hashed(name, hash)
    }

    /// Number of names, for tests and logs.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `SHARDS` shards, all one shared empty shard until each gets names.
pub fn empty_shards() -> Vec<Shard> {
    vec![Shard::default(); SHARDS]
}

pub fn shard_of(key: &[u8]) -> usize {
    shard_at(name_hash(key))
}

/// The shard of a name with `hash`: the hash's top bits.
fn shard_at(hash: u64) -> usize {
    (hash >> (64 - SHARD_BITS)) as usize
}

/// The hash names are placed by.
pub fn name_hash(key: &[u8]) -> u64 {
    let mut h = FxHasher::default();
    h.write(key);
    h.finish()
}

/// The latest published index, shared by writer and readers.
#[derive(Debug)]
pub struct Published {
    generation: AtomicU64,
    current: Mutex<Arc<Index>>,
}

impl Published {
    pub fn new(index: Index) -> Arc<Self> {
        Arc::new(Published {
            generation: AtomicU64::new(0),
            current: Mutex::new(Arc::new(index)),
        })
    }

    pub fn publish(&self, index: Index) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        *current = Arc::new(index);
        self.generation.fetch_add(1, Ordering::Release);
    }

    pub fn load(&self) -> Arc<Index> {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn reader(self: &Arc<Self>) -> Reader {
        Reader {
            generation: self.generation.load(Ordering::Acquire),
            index: self.load(),
            cell: self.clone(),
        }
    }
}

/// A worker's handle on the published index.
pub struct Reader {
    cell: Arc<Published>,
    generation: u64,
    index: Arc<Index>,
}

impl Reader {
    /// The newest index; costs one atomic load unless it changed.
    pub fn current(&mut self) -> &Index {
        let generation = self.cell.generation.load(Ordering::Acquire);
        if generation != self.generation {
            self.index = self.cell.load();
            self.generation = generation;
        }
        &self.index
    }
}

/// FxHash (as in rustc): fast for short keys. Keys come from the cluster's
/// own objects, not from the network, so flooding attacks cannot choose
/// colliding keys to insert.
#[derive(Default, Clone, Copy, Debug)]
pub struct FxBuild;

impl BuildHasher for FxBuild {
    type Hasher = FxHasher;
    fn build_hasher(&self) -> FxHasher {
        FxHasher::default()
    }
}

#[derive(Default)]
pub struct FxHasher {
    hash: u64,
}

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl FxHasher {
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word) ^ ((rest.len() as u64) << 56));
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.hash
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn name(i: u8) -> Vec<u8> {
        crate::wire::encode_name(&format!("n{i}.default.svc.cluster.local")).unwrap()
    }

    /// Checks `shard` holds exactly `model`, byte for byte.
    fn same(shard: &Shard, model: &BTreeMap<Vec<u8>, Vec<u8>>) {
        assert_eq!(shard.len(), model.len());
        let listed: BTreeMap<Vec<u8>, Vec<u8>> = shard
            .iter()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect();
        assert_eq!(&listed, model);
        for i in 0..64 {
            let key = name(i);
            assert_eq!(shard.get(&key), model.get(&key).map(|v| &v[..]));
            assert_eq!(shard.contains_key(&key), model.contains_key(&key));
        }
    }

    proptest! {
        /// Batches of sets (some to empty nodes) and removals, as the
        /// builder sends them, against a map.
        #[test]
        fn a_shard_is_a_map(batches in proptest::collection::vec(
            proptest::collection::btree_map(
                0..64u8,
                proptest::option::of(proptest::collection::vec(any::<u8>(), 0..80)),
                0..24,
            ),
            1..12,
        )) {
            let mut shard = Shard::default();
            let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            same(&shard, &model);
            for batch in batches {
                let mut keys: Vec<(Vec<u8>, Option<Vec<u8>>)> =
                    batch.into_iter().map(|(i, node)| (name(i), node)).collect();
                keys.sort();
                let changes: Vec<(&[u8], Option<&[u8]>)> = keys
                    .iter()
                    .map(|(k, node)| (&k[..], node.as_deref()))
                    .collect();
                shard = shard.with_changes(&changes);
                for (k, node) in keys {
                    match node {
                        Some(node) => model.insert(k, node),
                        None => model.remove(&k),
                    };
                }
                same(&shard, &model);
            }
        }
    }

    #[test]
    fn compacted_shards_keep_their_names_in_one_allocation() {
        let mut index = empty_shards();
        let mut map = ShardMap::new(4);
        let mut model = BTreeMap::new();
        for i in 0..40u8 {
            let key = name(i);
            let node = vec![i; usize::from(i)];
            let shard = shard_of(&key);
            index[shard] = index[shard].with_changes(&[(&key, Some(&node))]);
            map.set(&key, Some(&node));
            model.insert(key, node);
        }
        let check = |index: &[Shard], map: &ShardMap| {
            for (key, node) in &model {
                assert_eq!(index[shard_of(key)].get(key), Some(&node[..]));
                assert_eq!(map.get(key), Some(&node[..]));
            }
            assert_eq!(index.iter().map(|s| s.len()).sum::<usize>(), model.len());
            assert_eq!(map.iter().count(), model.len());
        };
        assert!(compact(&mut [&mut index, map.shards_mut()]));
        check(&index, &map);
        let live: Vec<&Shard> = index.iter().filter(|s| !s.is_empty()).collect();
        assert!(live.iter().all(|s| Arc::ptr_eq(&s.bytes, &live[0].bytes)));
        assert!(!live[0].ptr_eq(live[1]), "shards in one slab stay apart");
        assert!(
            !compact(&mut [&mut index, map.shards_mut()]),
            "packed shards are not packed again"
        );
        // A change after packing rewrites its shard on its own; the next
        // packing takes it in again.
        let key = name(3);
        map.set(&key, Some(b"changed"));
        assert_eq!(map.get(&key), Some(&b"changed"[..]));
        map.set(&key, Some(&model[&key]));
        assert!(compact(&mut [&mut index, map.shards_mut()]));
        check(&index, &map);
    }

    #[test]
    fn names_that_are_prefixes_of_others_stay_apart() {
        // `a.b` and `b` as labels: equal bytes up to a point, different
        // lengths.
        let long = crate::wire::encode_name("a.b").unwrap();
        let short = crate::wire::encode_name("a").unwrap();
        let shard =
            Shard::default().with_changes(&[(&short, Some(b"short")), (&long, Some(b"long"))]);
        let shard = shard.with_changes(&[(&long, Some(b"longer"))]);
        assert_eq!(shard.len(), 2);
        assert_eq!(shard.get(&long), Some(&b"longer"[..]));
        assert_eq!(shard.get(&short), Some(&b"short"[..]));
        assert_eq!(shard.get(&long[..2]), None);
        assert_eq!(Shard::default().get(&short), None);
    }
}
