//! The virtio-net header (`struct virtio_net_hdr`, 10 bytes) that a TUN
//! device opened with `IFF_VNET_HDR` puts in front of every packet. It says
//! whether the packet is a GSO super-packet (and its segment size) and
//! where a checksum the kernel left for the device to finish starts.
//!
//! Fields are in the host's byte order, as the kernel reads them for a
//! legacy TUN device; Skiff's nodes are little-endian, so the overlay
//! carries them as they are.

use super::Error;

pub const HEADER_LEN: usize = 10;
/// The checksum at `csum_start + csum_offset` still has to be computed.
pub const F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
pub const GSO_UDP_L4: u8 = 5;
pub const GSO_ECN: u8 = 0x80;

/// A virtio-net header with these fields, for writing a packet.
pub fn header(
    flags: u8,
    gso_type: u8,
    hdr_len: u16,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = flags;
    h[1] = gso_type;
    h[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    h[4..6].copy_from_slice(&gso_size.to_le_bytes());
    h[6..8].copy_from_slice(&csum_start.to_le_bytes());
    h[8..10].copy_from_slice(&csum_offset.to_le_bytes());
    h
}

/// A view of a virtio-net header and the packet behind it.
#[derive(Debug, Clone, Copy)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    pub const fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }

    /// Checks the header against the packet behind it: a known GSO type,
    /// and offsets that stay inside the packet.
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let packet = Self::new_unchecked(buffer);
        let len = packet.buffer.as_ref().len();
        packet.check(len)?;
        Ok(packet)
    }

    /// As [`Packet::new_checked`], for a buffer that holds only the start
    /// of a packet of `len` bytes in all (header included).
    pub fn check(&self, len: usize) -> Result<(), Error> {
        if self.buffer.as_ref().len() < HEADER_LEN || len < HEADER_LEN {
            return Err(Error::Truncated);
        }
        let inner = len - HEADER_LEN;
        let gso = self.gso_type() & !GSO_ECN;
        if !matches!(gso, GSO_NONE | GSO_TCPV4 | GSO_TCPV6 | GSO_UDP_L4) {
            return Err(Error::Malformed);
        }
        if gso != GSO_NONE && (self.gso_size() == 0 || self.hdr_len() as usize > inner) {
            return Err(Error::Malformed);
        }
        if self.needs_csum() && self.csum_start() as usize + self.csum_offset() as usize + 2 > inner
        {
            return Err(Error::Malformed);
        }
        Ok(())
    }

    fn u16_at(&self, at: usize) -> u16 {
        let b = self.buffer.as_ref();
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[0]
    }

    pub fn needs_csum(&self) -> bool {
        self.flags() & F_NEEDS_CSUM != 0
    }

    pub fn gso_type(&self) -> u8 {
        self.buffer.as_ref()[1]
    }

    pub fn is_gso(&self) -> bool {
        self.gso_type() & !GSO_ECN != GSO_NONE
    }

    pub fn hdr_len(&self) -> u16 {
        self.u16_at(2)
    }

    pub fn gso_size(&self) -> u16 {
        self.u16_at(4)
    }

    pub fn csum_start(&self) -> u16 {
        self.u16_at(6)
    }

    pub fn csum_offset(&self) -> u16 {
        self.u16_at(8)
    }

    /// The IP packet behind the header.
    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[HEADER_LEN..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_offsets() {
        let mut buf = [0u8; HEADER_LEN + 40];
        assert!(Packet::new_checked(&buf[..]).is_ok());
        buf[1] = GSO_TCPV4;
        assert_eq!(Packet::new_checked(&buf[..]).unwrap_err(), Error::Malformed);
        buf[4] = 0xa0; // gso_size
        buf[5] = 0x05;
        buf[2] = 40; // hdr_len
        assert!(Packet::new_checked(&buf[..]).is_ok());
        buf[0] = F_NEEDS_CSUM;
        buf[6] = 39; // csum_start beyond the packet
        assert_eq!(Packet::new_checked(&buf[..]).unwrap_err(), Error::Malformed);
        buf[1] = 3; // UFO, which no kernel emits any more
        buf[6] = 0;
        assert_eq!(Packet::new_checked(&buf[..]).unwrap_err(), Error::Malformed);
        assert_eq!(
            Packet::new_checked(&buf[..4]).unwrap_err(),
            Error::Truncated
        );
    }
}
