//! The Internet checksum (RFC 1071), for finishing a checksum the kernel
//! left to the device when a packet leaves the overlay as a lone datagram.

/// Folds the one's-complement sum of `data` into `sum`.
pub fn add(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        sum = sum.wrapping_add(u32::from(u16::from_be_bytes([pair[0], pair[1]])));
        if sum > 0xffff_0000 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
    }
    if let [last] = chunks.remainder() {
        sum = sum.wrapping_add(u32::from(*last) << 8);
    }
    sum
}

/// The final 16-bit checksum of a folded sum.
pub fn finish(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Completes a partial checksum as a device does for `CHECKSUM_PARTIAL`:
/// the kernel put the pseudo-header sum at `start + offset`; the checksum
/// over `packet[start..]` replaces it. Returns `false` if the offsets do
/// not fit the packet.
pub fn complete(packet: &mut [u8], start: usize, offset: usize) -> bool {
    let at = start + offset;
    if at + 2 > packet.len() || start > packet.len() {
        return false;
    }
    let sum = finish(add(0, &packet[start..]));
    packet[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // The example from RFC 1071 section 3: sum 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(finish(add(0, &data)), !0xddf2);
    }

    #[test]
    fn completed_checksum_verifies() {
        let mut packet = [0x12, 0x34, 0x00, 0x00, 0xab, 0xcd, 0xef];
        assert!(complete(&mut packet, 0, 2));
        assert_eq!(finish(add(0, &packet)), 0);
        assert!(!complete(&mut packet, 6, 2));
    }
}
