//! The flow table: a fixed number of flows, each findable by its original
//! and its reply 5-tuple, in one open-addressing index (linear probing,
//! backward-shift deletion, load ≤ ½). Flows sit on an LRU list by last
//! packet, so a full table evicts the flow idle longest. Nothing here
//! allocates after construction, and construction writes nothing: flows
//! are taken from reserved memory as they are first needed and the index
//! starts as zeroed memory, so an idle node does not hold a full table
//! (262,144 flows by default, about 30 MB) in RAM.

use super::hash::hash2;
use super::state::{Direction, FlowState};

/// A 5-tuple, addresses as `u32`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tuple {
    pub src: u32,
    pub dst: u32,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
}

impl Tuple {
    pub fn reversed(self) -> Tuple {
        Tuple {
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
            protocol: self.protocol,
        }
    }

    fn hash(&self, seed: u64) -> u64 {
        let a = (u64::from(self.src) << 32) | u64::from(self.dst);
        let b = (u64::from(self.src_port) << 32)
            | (u64::from(self.dst_port) << 16)
            | u64::from(self.protocol);
        hash2(seed, a, b)
    }
}

/// One tracked flow.
#[derive(Debug, Clone, Copy)]
pub struct Flow {
    /// As the client sent it: client → frontend.
    pub original: Tuple,
    /// As the endpoint answers: endpoint → client (or the SNAT address).
    pub reply: Tuple,
    pub state: FlowState,
    pub last_seen: u64,
    pub expires: u64,
    /// The table generation under which the endpoint was last confirmed.
    pub checked_generation: u64,
    prev: u32,
    next: u32,
    live: bool,
}

const NIL: u32 = u32::MAX;

/// An index slot: the tuple's hash in the high half, `(flow << 1 |
/// direction) + 1` in the low half; all zero is empty, so a fresh index is
/// zeroed memory the kernel has not had to provide yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bucket(u64);

impl Bucket {
    const EMPTY: Bucket = Bucket(0);

    fn new(hash: u32, entry: u32) -> Bucket {
        Bucket((u64::from(hash) << 32) | (u64::from(entry) + 1))
    }

    fn is_empty(self) -> bool {
        self.0 == 0
    }

    fn hash(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// flow << 1 | direction.
    fn entry(self) -> u32 {
        (self.0 as u32).wrapping_sub(1)
    }
}

/// What an insert did to make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    Free,
    /// The flow idle longest was expired anyway.
    Expired,
    /// A live flow was evicted.
    Evicted,
}

pub struct FlowTable {
    /// Grows up to `capacity` (reserved up front, never reallocated).
    flows: Vec<Flow>,
    capacity: usize,
    /// [`Bucket`]s as plain words, so that a fresh index is all zero.
    index: Box<[u64]>,
    mask: usize,
    seed: u64,
    /// Free flows, linked through `next`.
    free: u32,
    /// Most recently seen.
    head: u32,
    /// Idle longest.
    tail: u32,
    len: usize,
    sweep_hand: usize,
}

impl FlowTable {
    /// A table for `capacity` flows (at least 1, at most 2³⁰).
    pub fn new(capacity: usize, seed: u64) -> Self {
        let capacity = capacity.clamp(1, 1 << 30);
        let buckets = (capacity * 4).next_power_of_two();
        // Zeroed words: the allocator takes fresh pages from the kernel
        // and writes none of them.
        FlowTable {
            flows: Vec::with_capacity(capacity),
            capacity,
            index: vec![0; buckets].into_boxed_slice(),
            mask: buckets - 1,
            seed,
            free: NIL,
            head: NIL,
            tail: NIL,
            len: 0,
            sweep_hand: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn get(&self, id: u32) -> &Flow {
        &self.flows[id as usize]
    }

    pub fn get_mut(&mut self, id: u32) -> &mut Flow {
        &mut self.flows[id as usize]
    }

    /// The flow a packet with this tuple belongs to, and which way it goes.
    pub fn lookup(&self, tuple: &Tuple) -> Option<(u32, Direction)> {
        let hash = tuple.hash(self.seed);
        let mut at = hash as usize & self.mask;
        loop {
            let bucket = Bucket(self.index[at]);
            if bucket.is_empty() {
                return None;
            }
            if bucket.hash() == hash as u32 {
                let (id, direction) = split(bucket.entry());
                if self.tuple_of(id, direction) == tuple {
                    return Some((id, direction));
                }
            }
            at = (at + 1) & self.mask;
        }
    }

    pub fn contains(&self, tuple: &Tuple) -> bool {
        self.lookup(tuple).is_some()
    }

    /// Tracks a new flow. When the table is full the flow idle longest
    /// makes room. The caller has checked neither tuple is tracked.
    pub fn insert(
        &mut self,
        original: Tuple,
        reply: Tuple,
        state: FlowState,
        now: u64,
        expires: u64,
        generation: u64,
    ) -> (u32, Room) {
        let flow = Flow {
            original,
            reply,
            state,
            last_seen: now,
            expires,
            checked_generation: generation,
            prev: NIL,
            next: NIL,
            live: true,
        };
        if self.free == NIL && self.flows.len() < self.capacity {
            let id = self.flows.len() as u32;
            self.flows.push(flow);
            return (self.track(id), Room::Free);
        }
        let room = if self.free == NIL {
            let victim = self.tail;
            let expired = self.flows[victim as usize].expires <= now;
            self.remove(victim);
            if expired {
                Room::Expired
            } else {
                Room::Evicted
            }
        } else {
            Room::Free
        };
        let id = self.free;
        self.free = self.flows[id as usize].next;
        self.flows[id as usize] = flow;
        (self.track(id), room)
    }

    /// Links a freshly written flow into the LRU list and the index.
    fn track(&mut self, id: u32) -> u32 {
        self.push_front(id);
        self.index_insert(id, Direction::Original);
        self.index_insert(id, Direction::Reply);
        self.len += 1;
        id
    }

    /// Marks a packet seen: the flow becomes the most recent.
    pub fn touch(&mut self, id: u32, now: u64, expires: u64) {
        let flow = &mut self.flows[id as usize];
        flow.expires = expires;
        if flow.last_seen == now && self.head == id {
            return;
        }
        flow.last_seen = now;
        if self.head != id {
            self.unlink(id);
            self.push_front(id);
        }
    }

    /// Stops tracking a flow.
    pub fn remove(&mut self, id: u32) {
        if !self.flows[id as usize].live {
            return;
        }
        self.index_remove(id, Direction::Original);
        self.index_remove(id, Direction::Reply);
        self.unlink(id);
        let flow = &mut self.flows[id as usize];
        flow.live = false;
        flow.next = self.free;
        self.free = id;
        self.len -= 1;
    }

    /// Removes expired flows among the next `budget` slots (a clock hand,
    /// so each call costs at most `budget` steps); returns how many.
    pub fn sweep(&mut self, now: u64, budget: usize) -> usize {
        let mut removed = 0;
        for _ in 0..budget.min(self.flows.len()) {
            let id = self.sweep_hand as u32;
            self.sweep_hand = (self.sweep_hand + 1) % self.flows.len();
            let flow = &self.flows[id as usize];
            if flow.live && flow.expires <= now {
                self.remove(id);
                removed += 1;
            }
        }
        removed
    }

    /// Live flows, most recently seen first.
    pub fn iter(&self) -> impl Iterator<Item = &Flow> {
        let mut at = self.head;
        std::iter::from_fn(move || {
            (at != NIL).then(|| {
                let flow = &self.flows[at as usize];
                at = flow.next;
                flow
            })
        })
    }

    fn tuple_of(&self, id: u32, direction: Direction) -> &Tuple {
        let flow = &self.flows[id as usize];
        match direction {
            Direction::Original => &flow.original,
            Direction::Reply => &flow.reply,
        }
    }

    fn index_insert(&mut self, id: u32, direction: Direction) {
        let hash = self.tuple_of(id, direction).hash(self.seed);
        let mut at = hash as usize & self.mask;
        while !Bucket(self.index[at]).is_empty() {
            at = (at + 1) & self.mask;
        }
        self.index[at] = Bucket::new(hash as u32, join(id, direction)).0;
    }

    fn index_remove(&mut self, id: u32, direction: Direction) {
        let hash = self.tuple_of(id, direction).hash(self.seed);
        let wanted = join(id, direction);
        let mut hole = hash as usize & self.mask;
        loop {
            let bucket = Bucket(self.index[hole]);
            if bucket.is_empty() {
                return; // Not indexed: nothing to do.
            }
            if bucket.entry() == wanted {
                break;
            }
            hole = (hole + 1) & self.mask;
        }
        // Backward-shift: pull later entries of the run into the hole
        // unless that would move one before its home bucket.
        let mut at = hole;
        loop {
            at = (at + 1) & self.mask;
            let bucket = Bucket(self.index[at]);
            if bucket.is_empty() {
                break;
            }
            let home = bucket.hash() as usize & self.mask;
            let distance_home = at.wrapping_sub(home) & self.mask;
            let distance_hole = at.wrapping_sub(hole) & self.mask;
            if distance_home >= distance_hole {
                self.index[hole] = bucket.0;
                hole = at;
            }
        }
        self.index[hole] = Bucket::EMPTY.0;
    }

    fn push_front(&mut self, id: u32) {
        let old_head = self.head;
        {
            let flow = &mut self.flows[id as usize];
            flow.prev = NIL;
            flow.next = old_head;
        }
        if old_head != NIL {
            self.flows[old_head as usize].prev = id;
        } else {
            self.tail = id;
        }
        self.head = id;
    }

    fn unlink(&mut self, id: u32) {
        let (prev, next) = {
            let flow = &self.flows[id as usize];
            (flow.prev, flow.next)
        };
        if prev != NIL {
            self.flows[prev as usize].next = next;
        } else {
            self.head = next;
        }
        if next != NIL {
            self.flows[next as usize].prev = prev;
        } else {
            self.tail = prev;
        }
    }
}

fn join(id: u32, direction: Direction) -> u32 {
    (id << 1) | u32::from(direction == Direction::Reply)
}

fn split(entry: u32) -> (u32, Direction) {
    let direction = if entry & 1 == 1 {
        Direction::Reply
    } else {
        Direction::Original
    };
    (entry >> 1, direction)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tuple(i: u32) -> (Tuple, Tuple) {
        let original = Tuple {
            src: 0x0a2a_0000 + i,
            dst: 0x0a2b_0001,
            src_port: 40000 + (i % 1000) as u16,
            dst_port: 80,
            protocol: 6,
        };
        let reply = Tuple {
            src: 0x0a2a_0100 + (i % 3),
            dst: original.src,
            src_port: 8080,
            dst_port: original.src_port,
            protocol: 6,
        };
        (original, reply)
    }

    const UDP: FlowState = FlowState::Udp { replied: false };

    #[test]
    fn both_directions_find_the_flow() {
        let mut table = FlowTable::new(16, 7);
        let (o, r) = tuple(1);
        let (id, room) = table.insert(o, r, UDP, 0, 10, 0);
        assert_eq!(room, Room::Free);
        assert_eq!(table.lookup(&o), Some((id, Direction::Original)));
        assert_eq!(table.lookup(&r), Some((id, Direction::Reply)));
        assert_eq!(table.lookup(&o.reversed()), None);
        table.remove(id);
        assert_eq!(table.lookup(&o), None);
        assert_eq!(table.lookup(&r), None);
        assert!(table.is_empty());
    }

    #[test]
    fn flows_are_taken_as_needed_and_reused() {
        let mut table = FlowTable::new(1000, 3);
        assert_eq!((table.flows.len(), table.capacity()), (0, 1000));
        assert!(table.index.iter().all(|&word| Bucket(word).is_empty()));
        let ids: Vec<u32> = (0..3)
            .map(|i| {
                let (o, r) = tuple(i);
                table.insert(o, r, UDP, 0, 10, 0).0
            })
            .collect();
        assert_eq!(table.flows.len(), 3);
        table.remove(ids[1]);
        let (o, r) = tuple(7);
        let (id, room) = table.insert(o, r, UDP, 0, 10, 0);
        assert_eq!((id, room, table.flows.len()), (ids[1], Room::Free, 3));
        assert_eq!(table.lookup(&r), Some((id, Direction::Reply)));
    }

    #[test]
    fn full_table_evicts_the_flow_idle_longest() {
        let mut table = FlowTable::new(4, 1);
        let ids: Vec<u32> = (0..4)
            .map(|i| {
                let (o, r) = tuple(i);
                table.insert(o, r, UDP, u64::from(i), 1000, 0).0
            })
            .collect();
        // Flow 0 is oldest, but a packet refreshes it; flow 1 is then idle longest.
        table.touch(ids[0], 10, 1000);
        let (o, r) = tuple(9);
        let (_, room) = table.insert(o, r, UDP, 11, 1000, 0);
        assert_eq!(room, Room::Evicted);
        assert_eq!(table.len(), 4);
        assert!(table.contains(&tuple(0).0));
        assert!(!table.contains(&tuple(1).0), "flow 1 was idle longest");
        assert!(!table.contains(&tuple(1).1));
        // An expired victim is counted as such.
        let (o, r) = tuple(10);
        let (_, room) = table.insert(o, r, UDP, 5000, 9000, 0);
        assert_eq!(room, Room::Expired);
    }

    #[test]
    fn churn_keeps_the_index_consistent() {
        // Many inserts and removals through a small table exercise probing
        // runs and backward shifts; every live flow must stay findable.
        let mut table = FlowTable::new(64, 3);
        let mut live: Vec<(u32, u32)> = Vec::new();
        for i in 0..5000u32 {
            let (o, r) = tuple(i);
            if table.len() == table.capacity() || (i % 3 == 0 && !live.is_empty()) {
                let (id, _) = live.remove((i as usize * 7) % live.len());
                table.remove(id);
            }
            let (id, room) = table.insert(o, r, UDP, u64::from(i), u64::MAX, 0);
            assert_eq!(room, Room::Free);
            live.push((id, i));
            for &(id, n) in &live {
                let (o, r) = tuple(n);
                assert_eq!(table.lookup(&o), Some((id, Direction::Original)));
                assert_eq!(table.lookup(&r), Some((id, Direction::Reply)));
            }
        }
        assert_eq!(table.iter().count(), table.len());
    }

    #[test]
    fn sweep_removes_expired_flows_only() {
        let mut table = FlowTable::new(8, 5);
        for i in 0..8 {
            let (o, r) = tuple(i);
            table.insert(o, r, UDP, 0, if i % 2 == 0 { 100 } else { 1000 }, 0);
        }
        assert_eq!(table.sweep(500, 3), 2, "a budget of 3 slots sees 0, 1, 2");
        assert_eq!(table.sweep(500, 100), 2);
        assert_eq!(table.len(), 4);
    }
}
