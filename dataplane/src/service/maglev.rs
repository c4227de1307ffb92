//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table
//! of prime size in which every backend owns a near-equal share of slots.
//! Built from the backends' addresses alone, so every node builds the same
//! table and sends a flow to the same endpoint; a change of backends moves
//! few slots.

use super::hash::hash2;

/// Table sizes, primes, each about twice the last. The smallest one of at
/// least 100 slots per backend is used (the paper's M ≫ N), so a Service
/// with few endpoints costs little memory.
const SIZES: [usize; 9] = [251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521];

/// Seeds of the two permutation hashes (fixed: nodes must agree).
const OFFSET_SEED: u64 = 0x6d61_676c_6576_6f66;
const SKIP_SEED: u64 = 0x6d61_676c_6576_736b;

/// Indices into a Service port's backend list, one per slot.
#[derive(Debug, Clone, Default)]
pub struct Maglev {
    slots: Box<[u16]>,
}

impl Maglev {
    /// Builds the table over `backends`, each given as (its index in the
    /// caller's list, address, port). At most `u16::MAX` backends count.
    pub fn build(backends: &[(u16, u32, u16)]) -> Maglev {
        if backends.is_empty() {
            return Maglev::default();
        }
        // Fill order breaks ties, so fix it: nodes may list endpoints in
        // any order and must still agree.
        let mut backends = backends[..backends.len().min(usize::from(u16::MAX))].to_vec();
        backends.sort_unstable_by_key(|&(_, addr, port)| (addr, port));
        let size = table_size(backends.len());
        let permutation: Vec<(usize, usize)> = backends
            .iter()
            .map(|&(_, addr, port)| {
                let key = (u64::from(addr) << 16) | u64::from(port);
                let offset = (hash2(OFFSET_SEED, key, 0) % size as u64) as usize;
                let skip = (hash2(SKIP_SEED, key, 1) % (size as u64 - 1)) as usize + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0usize; backends.len()];
        let mut slots = vec![u16::MAX; size];
        let mut filled = 0;
        'fill: loop {
            for (i, &(offset, skip)) in permutation.iter().enumerate() {
                // Walk backend i's permutation to its next free slot.
                let mut slot = (offset + next[i] * skip) % size;
                while slots[slot] != u16::MAX {
                    next[i] += 1;
                    slot = (offset + next[i] * skip) % size;
                }
                slots[slot] = backends[i].0;
                next[i] += 1;
                filled += 1;
                if filled == size {
                    break 'fill;
                }
            }
        }
        Maglev {
            slots: slots.into_boxed_slice(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The backend index for a flow hash, `None` when there are no backends.
    pub fn pick(&self, flow_hash: u64) -> Option<u16> {
        if self.slots.is_empty() {
            return None;
        }
        Some(self.slots[(flow_hash % self.slots.len() as u64) as usize])
    }

    #[cfg(test)]
    pub fn size(&self) -> usize {
        self.slots.len()
    }
}

fn table_size(backends: usize) -> usize {
    let wanted = backends.saturating_mul(100);
    SIZES
        .iter()
        .copied()
        .find(|&s| s >= wanted)
        .unwrap_or(SIZES[SIZES.len() - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u16) -> Vec<(u16, u32, u16)> {
        (0..n)
            .map(|i| {
                (
                    i,
                    u32::from_be_bytes([10, 42, (i / 200) as u8, (i % 200) as u8 + 2]),
                    8080,
                )
            })
            .collect()
    }

    fn shares(table: &Maglev, n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &s in table.slots.iter() {
            counts[usize::from(s)] += 1;
        }
        counts
    }

    #[test]
    fn slots_are_shared_evenly() {
        for n in [1u16, 2, 3, 7, 50, 1000] {
            let table = Maglev::build(&backends(n));
            let counts = shares(&table, usize::from(n));
            let (min, max) = (counts.iter().min(), counts.iter().max());
            let (Some(&min), Some(&max)) = (min, max) else {
                panic!("no backends")
            };
            // The paper's fill gives every backend ⌊M/N⌋ or ⌈M/N⌉ slots.
            assert!(max - min <= 1, "n={n}: {min}..{max}");
        }
    }

    #[test]
    fn removing_a_backend_moves_few_slots() {
        let before = Maglev::build(&backends(10));
        let mut fewer = backends(10);
        fewer.remove(4);
        let after = Maglev::build(&fewer);
        assert_eq!(before.size(), after.size());
        let moved = before
            .slots
            .iter()
            .zip(after.slots.iter())
            .filter(|(b, a)| **b != 4 && b != a)
            .count();
        // Only backend 4's slots must move; Maglev moves a few more.
        assert!(
            moved * 100 / before.size() < 6,
            "{moved} of {} survivors' slots moved",
            before.size()
        );
    }

    #[test]
    fn same_backends_same_table_in_any_order() {
        let mut reversed = backends(5);
        reversed.reverse();
        let a = Maglev::build(&backends(5));
        let b = Maglev::build(&reversed);
        assert_eq!(
            a.slots, b.slots,
            "nodes must agree whatever order they list endpoints in"
        );
    }

    #[test]
    fn empty_table_picks_nothing() {
        assert_eq!(Maglev::build(&[]).pick(42), None);
    }
}
