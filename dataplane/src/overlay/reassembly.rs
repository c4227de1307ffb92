//! Reassembly of packets whose fragments did not arrive in one GRO train
//! (a lossy or reordering underlay, or a NIC without GRO). Fragments of one
//! packet leave a sender back to back from one socket, so each sender has
//! at most one packet in progress: a new first fragment from it means the
//! old one lost a fragment. A few preallocated slots, reused oldest first;
//! nothing is allocated per packet.

use std::net::SocketAddr;

use crate::metrics::{Drop, Local};
use crate::wire::overlay::{MAX_PAYLOAD, Packet};

/// Senders with a packet in progress at once, per worker.
const SLOTS: usize = 8;

pub struct Reassembly {
    slots: Vec<Slot>,
    clock: u64,
}

struct Slot {
    from: Option<SocketAddr>,
    id: u32,
    count: u8,
    next: u8,
    vnet: bool,
    payload_len: usize,
    filled: usize,
    used: u64,
    buf: Box<[u8]>,
}

/// A whole payload, ready to deliver.
pub struct Whole<'a> {
    pub payload: &'a [u8],
    pub vnet: bool,
}

impl Reassembly {
    pub fn new() -> Self {
        let slots = (0..SLOTS)
            .map(|_| Slot {
                from: None,
                id: 0,
                count: 0,
                next: 0,
                vnet: false,
                payload_len: 0,
                filled: 0,
                used: 0,
                buf: vec![0; MAX_PAYLOAD].into_boxed_slice(),
            })
            .collect();
        Reassembly { slots, clock: 0 }
    }

    /// Adds one checked fragment from `from`; returns the payload once its
    /// last fragment is in.
    pub fn push(
        &mut self,
        from: SocketAddr,
        fragment: &Packet<&[u8]>,
        local: &mut Local,
    ) -> Option<Whole<'_>> {
        self.clock += 1;
        let index = fragment.frag_index();
        let at = if index == 0 {
            let at = self.claim(from, local);
            let slot = &mut self.slots[at];
            slot.from = Some(from);
            slot.id = fragment.packet_id();
            slot.count = fragment.frag_count();
            slot.next = 0;
            slot.vnet = fragment.has_vnet();
            slot.payload_len = fragment.payload_len() as usize;
            slot.filled = 0;
            at
        } else {
            let Some(at) = self
                .slots
                .iter()
                .position(|s| s.from == Some(from) && s.id == fragment.packet_id())
            else {
                local.drop(Drop::Reassembly, 1);
                return None;
            };
            at
        };
        let slot = &mut self.slots[at];
        slot.used = self.clock;
        let data = fragment.fragment();
        if slot.next != index
            || slot.count != fragment.frag_count()
            || slot.filled + data.len() > slot.payload_len
        {
            // A gap: the packet can no longer be completed.
            local.drop(Drop::Reassembly, u64::from(slot.next) + 1);
            slot.from = None;
            return None;
        }
        slot.buf[slot.filled..slot.filled + data.len()].copy_from_slice(data);
        slot.filled += data.len();
        slot.next += 1;
        if slot.next < slot.count {
            return None;
        }
        slot.from = None;
        if slot.filled != slot.payload_len {
            local.drop(Drop::Malformed, 1);
            return None;
        }
        Some(Whole {
            payload: &slot.buf[..slot.filled],
            vnet: slot.vnet,
        })
    }

    /// A slot for a new packet from `from`: the sender's own (its packet
    /// in progress is lost), a free one, or the least recently used.
    fn claim(&mut self, from: SocketAddr, local: &mut Local) -> usize {
        let at = self
            .slots
            .iter()
            .position(|s| s.from == Some(from))
            .or_else(|| self.slots.iter().position(|s| s.from.is_none()))
            .unwrap_or_else(|| {
                self.slots
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, s)| s.used)
                    .map_or(0, |(i, _)| i)
            });
        if self.slots[at].from.is_some() {
            local.drop(Drop::Reassembly, u64::from(self.slots[at].next));
        }
        at
    }
}

impl Default for Reassembly {
    fn default() -> Self {
        Reassembly::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::overlay::{HEADER_LEN, Header};

    fn fragment(id: u32, index: u8, count: u8, total: u32, data: &[u8]) -> Vec<u8> {
        let mut head = [0u8; HEADER_LEN];
        Header {
            flags: 0,
            frag_index: index,
            frag_count: count,
            packet_id: id,
            payload_len: total,
        }
        .emit(&mut head);
        [&head[..], data].concat()
    }

    fn push<'a>(
        r: &'a mut Reassembly,
        from: SocketAddr,
        bytes: &'a [u8],
        local: &mut Local,
    ) -> Option<Vec<u8>> {
        let packet = Packet::new_checked(bytes).unwrap();
        r.push(from, &packet, local).map(|w| w.payload.to_vec())
    }

    #[test]
    fn joins_fragments_and_drops_incomplete_packets() {
        let mut r = Reassembly::new();
        let mut local = Local::default();
        let a: SocketAddr = "172.31.0.2:8472".parse().unwrap();
        let b: SocketAddr = "172.31.0.3:8472".parse().unwrap();
        let f0 = fragment(1, 0, 2, 6, b"abc");
        let f1 = fragment(1, 1, 2, 6, b"def");
        let g0 = fragment(9, 0, 2, 4, b"xy");
        let g1 = fragment(9, 1, 2, 4, b"zw");
        assert_eq!(push(&mut r, a, &f0, &mut local), None);
        // Another sender's packet interleaves without harm.
        assert_eq!(push(&mut r, b, &g0, &mut local), None);
        assert_eq!(
            push(&mut r, a, &f1, &mut local).as_deref(),
            Some(&b"abcdef"[..])
        );
        assert_eq!(
            push(&mut r, b, &g1, &mut local).as_deref(),
            Some(&b"xyzw"[..])
        );
        // A fragment without its first is dropped; so is a packet whose
        // sender moved on.
        assert_eq!(push(&mut r, a, &f1, &mut local), None);
        assert_eq!(push(&mut r, a, &f0, &mut local), None);
        let h0 = fragment(2, 0, 2, 6, b"abc");
        assert_eq!(push(&mut r, a, &h0, &mut local), None);
        assert_eq!(push(&mut r, a, &f1, &mut local), None);
        let metrics = crate::metrics::Metrics::new();
        local.flush(&metrics);
        assert_eq!(metrics.dropped(Drop::Reassembly), 3);
    }
}
