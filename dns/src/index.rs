//! The read side of the zone: a sharded map from a lowercased wire name
//! to its node, the pre-encoded answers of every type the name has,
//! published as an immutable snapshot. Readers check one atomic per batch
//! and take a lock only when a new snapshot was published; the writer
//! (`zone`) replaces only the shards it changed.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub const SHARDS: usize = 64;

/// A name's node: its answers one after the other, each
/// `[qtype: 2][head: 10][external: 1][body length: 2][body]`. Qtype 0
/// answers every type without an answer of its own (an alias's CNAME);
/// a node without one answers such types NODATA, and an empty node is an
/// empty non-terminal. One allocation per name (none for an empty node);
/// a shard copied for a new snapshot copies its nodes, which costs less
/// than a reference count on every node would in memory.
pub type Node = Box<[u8]>;

/// Lowercased wire name to node.
pub type Shard = HashMap<Arc<[u8]>, Node, FxBuild>;

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
    pub shards: Vec<Arc<Shard>>,
    pub zone: Arc<Zone>,
    /// False until the watches have listed everything once; until then
    /// zone questions get SERVFAIL rather than a false NXDOMAIN.
    pub ready: bool,
}

impl Index {
    pub fn empty(zone: Arc<Zone>) -> Self {
        Index {
            shards: (0..SHARDS).map(|_| Arc::new(Shard::default())).collect(),
            zone,
            ready: false,
        }
    }

    /// The node of `name`, a lowercased wire name.
    pub fn node(&self, name: &[u8]) -> Option<&[u8]> {
        self.shards[shard_of(name)].get(name).map(|n| &**n)
    }

    /// Number of names, for tests and logs.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub fn shard_of(key: &[u8]) -> usize {
    let mut h = FxHasher::default();
    h.write(key);
    (h.finish() >> 58) as usize % SHARDS
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
