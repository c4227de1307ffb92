//! Internet checksum arithmetic (RFC 1071) and incremental updates
//! (RFC 1624), for fully computed checksums and for the pseudo-header-only
//! sums that offloaded (`CHECKSUM_PARTIAL`) packets carry.

/// Ones-complement sum of `data` as big-endian 16-bit words, not yet folded.
/// An odd trailing byte is padded with zero.
pub fn sum(data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    let mut acc: u64 = chunks
        .by_ref()
        .map(|w| u64::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    if let [last] = chunks.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds carries back into 16 bits.
pub fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum(data))
}

/// The changes made to the 16-bit words one checksum covers, to be applied
/// to that checksum without summing the data again.
#[derive(Debug, Default, Clone, Copy)]
pub struct Delta(u64);

impl Delta {
    /// Records that a word changed from `old` to `new` (`~m + m'`).
    pub fn word(&mut self, old: u16, new: u16) {
        self.0 += u64::from(!old) + u64::from(new);
    }

    /// Records an IPv4 address change (two words).
    pub fn addr(&mut self, old: u32, new: u32) {
        self.word((old >> 16) as u16, (new >> 16) as u16);
        self.word(old as u16, new as u16);
    }

    /// Merges the changes recorded in `other`.
    pub fn merge(&mut self, other: Delta) {
        self.0 += other.0;
    }

    /// A fully computed checksum field after the changes:
    /// `HC' = ~(~HC + ~m + m')` (RFC 1624, eqn. 3).
    pub fn apply_full(self, field: u16) -> u16 {
        !fold(u64::from(!field) + self.0)
    }

    /// A pseudo-header-only sum (the non-complemented value a sender leaves
    /// for the device to finish) after the changes: `S' = S + ~m + m'`.
    pub fn apply_partial(self, field: u16) -> u16 {
        fold(u64::from(field) + self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // RFC 1071 §3: the words 0001 f203 f4f5 f6f7 sum to ddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(sum(&data)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn incremental_update_matches_recomputation() {
        let mut data: Vec<u8> = (0u8..64).map(|b| b.wrapping_mul(37)).collect();
        data[10] = 0;
        data[11] = 0;
        let c = checksum(&data);
        data[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(checksum(&data), 0);

        let mut delta = Delta::default();
        for (at, new) in [(4usize, 0xbeefu16), (20, 0x0000), (40, 0xffff)] {
            let old = u16::from_be_bytes([data[at], data[at + 1]]);
            delta.word(old, new);
            data[at..at + 2].copy_from_slice(&new.to_be_bytes());
        }
        let updated = delta.apply_full(c);
        data[10..12].copy_from_slice(&updated.to_be_bytes());
        assert_eq!(checksum(&data), 0, "an incremental update must verify");
    }

    #[test]
    fn partial_sum_tracks_the_pseudo_header() {
        let before = fold(sum(&[10, 0, 0, 1, 10, 43, 0, 7]));
        let after = fold(sum(&[10, 0, 0, 1, 10, 42, 3, 9]));
        let mut delta = Delta::default();
        delta.addr(
            u32::from_be_bytes([10, 43, 0, 7]),
            u32::from_be_bytes([10, 42, 3, 9]),
        );
        let updated = delta.apply_partial(before);
        // Ones-complement zero has two spellings; compare as sums.
        assert_eq!(fold(u64::from(updated)) % 0xffff, after % 0xffff);
    }
}
