//! The overlay header, version 1.
//!
//! Every UDP datagram between two nodes' data planes (default port 8472)
//! carries one header and one fragment of a tunnelled packet:
//!
//! ```text
//!  0               1               2               3
//! +---------------+---------------+---------------+---------------+
//! |   version=1   |     flags     |  frag index   |  frag count   |
//! +---------------+---------------+---------------+---------------+
//! |                  packet id (big-endian u32)                   |
//! +---------------------------------------------------------------+
//! |        payload length: all fragments together (u32)           |
//! +---------------+---------------+-------------------------------+
//! | auth tag len  |   reserved    |       reserved (zero)         |
//! +---------------+---------------+-------------------------------+
//! |       auth tag (auth tag len bytes; none in version 1)        |
//! +---------------------------------------------------------------+
//! |                    fragment of the payload                    |
//! ```
//!
//! The payload is a bare IP packet; with flag `CSUM_PARTIAL` a TCP
//! segment whose checksum field holds only the pseudo-header sum, for the
//! receiving kernel to finish. That is how a TCP super-packet crosses:
//! the sender cuts it into self-contained segments, one per datagram,
//! which leave in one `sendmsg` with UDP GSO and usually arrive in one
//! `recvmsg` with UDP GRO; the receiver joins consecutive segments into a
//! super-packet again for its TUN device (see `wire::tcp`). A lost datagram
//! costs TCP one segment, as any lost packet would.
//!
//! Other super-packets (UDP GSO, IPv6 with extension headers) travel with
//! flag `VNET`: a virtio-net header followed by the IP packet of up to
//! 64 KiB as the sending kernel handed it to its TUN device, split into
//! fragments of equal size (the last may be shorter) that share a packet
//! id. The receiver writes the payload whole to its own TUN device, whose
//! kernel segments it if it must; missing one fragment drops the whole
//! packet.
//!
//! The auth tag length is there so that a later version can authenticate
//! datagrams (a MAC over header and fragment) without a new layout; version
//! 1 receivers reject datagrams that carry one. Unknown flags and non-zero
//! reserved bytes are rejected too, so they can be given a meaning later.

use super::Error;

pub const VERSION: u8 = 1;
/// Header length without an auth tag.
pub const HEADER_LEN: usize = 16;
/// The payload starts with a virtio-net header (a GSO super-packet or a
/// packet that still needs its checksum).
pub const FLAG_VNET: u8 = 0x01;
/// The payload is a lone TCP segment with a partial checksum (see above).
pub const FLAG_CSUM_PARTIAL: u8 = 0x02;
const KNOWN_FLAGS: u8 = FLAG_VNET | FLAG_CSUM_PARTIAL;
/// Most fragments of one packet: 64 KiB payload in fragments of at least
/// 1 KiB.
pub const MAX_FRAGMENTS: u8 = 64;
/// Largest payload: a virtio-net header and a 64 KiB IP packet.
pub const MAX_PAYLOAD: usize = super::vnet::HEADER_LEN + 65_535;

mod field {
    use std::ops::Range;
    pub const VERSION: usize = 0;
    pub const FLAGS: usize = 1;
    pub const FRAG_INDEX: usize = 2;
    pub const FRAG_COUNT: usize = 3;
    pub const PACKET_ID: Range<usize> = 4..8;
    pub const PAYLOAD_LEN: Range<usize> = 8..12;
    pub const TAG_LEN: usize = 12;
    pub const RESERVED: Range<usize> = 13..16;
}

/// A read/write view of one overlay datagram.
#[derive(Debug, Clone, Copy)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps a buffer without checks; call [`Packet::check`] before reading
    /// anything that came from the network.
    pub const fn new_unchecked(buffer: T) -> Self {
        Packet { buffer }
    }

    /// Wraps a received datagram, rejecting any that is truncated, of
    /// another version or malformed.
    pub fn new_checked(buffer: T) -> Result<Self, Error> {
        let packet = Self::new_unchecked(buffer);
        packet.check()?;
        Ok(packet)
    }

    pub fn check(&self) -> Result<(), Error> {
        let data = self.buffer.as_ref();
        if data.len() < HEADER_LEN {
            return Err(Error::Truncated);
        }
        if self.version() != VERSION {
            return Err(Error::BadVersion(self.version()));
        }
        let count = self.frag_count();
        if self.flags() & !KNOWN_FLAGS != 0
            || self.flags() == FLAG_VNET | FLAG_CSUM_PARTIAL
            || (self.has_csum_partial() && count != 1)
            || data[field::RESERVED].iter().any(|&b| b != 0)
            // Version 1 has no keys, so it cannot check a tag.
            || data[field::TAG_LEN] != 0
            || count == 0
            || count > MAX_FRAGMENTS
            || self.frag_index() >= count
        {
            return Err(Error::Malformed);
        }
        let payload_len = self.payload_len() as usize;
        if payload_len > MAX_PAYLOAD {
            return Err(Error::Oversized);
        }
        let fragment = data.len() - HEADER_LEN;
        // A lone fragment is the whole payload; a fragment never carries
        // more than what is left of it.
        if (count == 1 && fragment != payload_len) || fragment > payload_len || fragment == 0 {
            return Err(Error::Malformed);
        }
        Ok(())
    }

    pub fn version(&self) -> u8 {
        self.buffer.as_ref()[field::VERSION]
    }

    pub fn flags(&self) -> u8 {
        self.buffer.as_ref()[field::FLAGS]
    }

    pub fn has_vnet(&self) -> bool {
        self.flags() & FLAG_VNET != 0
    }

    pub fn has_csum_partial(&self) -> bool {
        self.flags() & FLAG_CSUM_PARTIAL != 0
    }

    pub fn frag_index(&self) -> u8 {
        self.buffer.as_ref()[field::FRAG_INDEX]
    }

    pub fn frag_count(&self) -> u8 {
        self.buffer.as_ref()[field::FRAG_COUNT]
    }

    pub fn packet_id(&self) -> u32 {
        let b = &self.buffer.as_ref()[field::PACKET_ID];
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }

    pub fn payload_len(&self) -> u32 {
        let b = &self.buffer.as_ref()[field::PAYLOAD_LEN];
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }

    /// This datagram's fragment of the payload.
    pub fn fragment(&self) -> &[u8] {
        &self.buffer.as_ref()[HEADER_LEN..]
    }
}

impl<'a> Packet<&'a [u8]> {
    /// The fragment, borrowed from the underlying buffer rather than the
    /// view.
    pub fn fragment_slice(&self) -> &'a [u8] {
        &self.buffer[HEADER_LEN..]
    }
}

/// The header fields a sender chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub flags: u8,
    pub frag_index: u8,
    pub frag_count: u8,
    pub packet_id: u32,
    pub payload_len: u32,
}

impl Header {
    /// Writes the header into the first [`HEADER_LEN`] bytes of `buf`.
    pub fn emit(&self, buf: &mut [u8; HEADER_LEN]) {
        buf[field::VERSION] = VERSION;
        buf[field::FLAGS] = self.flags;
        buf[field::FRAG_INDEX] = self.frag_index;
        buf[field::FRAG_COUNT] = self.frag_count;
        buf[field::PACKET_ID].copy_from_slice(&self.packet_id.to_be_bytes());
        buf[field::PAYLOAD_LEN].copy_from_slice(&self.payload_len.to_be_bytes());
        buf[field::TAG_LEN] = 0;
        buf[field::RESERVED].fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn datagram(header: Header, fragment: &[u8]) -> Vec<u8> {
        let mut head = [0u8; HEADER_LEN];
        header.emit(&mut head);
        let mut out = head.to_vec();
        out.extend_from_slice(fragment);
        out
    }

    const LONE: Header = Header {
        flags: 0,
        frag_index: 0,
        frag_count: 1,
        packet_id: 7,
        payload_len: 3,
    };

    #[test]
    fn round_trips() {
        let bytes = datagram(LONE, b"abc");
        let packet = Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(packet.packet_id(), 7);
        assert_eq!(packet.frag_count(), 1);
        assert_eq!(packet.fragment(), b"abc");
        assert!(!packet.has_vnet());
    }

    #[test]
    fn rejects_bad_input() {
        let good = datagram(LONE, b"abc");
        assert_eq!(
            Packet::new_checked(&good[..5]).unwrap_err(),
            Error::Truncated
        );
        let mut v2 = good.clone();
        v2[0] = 2;
        assert_eq!(
            Packet::new_checked(&v2[..]).unwrap_err(),
            Error::BadVersion(2)
        );
        let mut tagged = good.clone();
        tagged[field::TAG_LEN] = 16;
        assert_eq!(
            Packet::new_checked(&tagged[..]).unwrap_err(),
            Error::Malformed
        );
        let mut flagged = good.clone();
        flagged[field::FLAGS] = 0x80;
        assert_eq!(
            Packet::new_checked(&flagged[..]).unwrap_err(),
            Error::Malformed
        );
        // The lone fragment must be exactly the payload.
        let short = datagram(LONE, b"ab");
        assert_eq!(
            Packet::new_checked(&short[..]).unwrap_err(),
            Error::Malformed
        );
        let beyond = datagram(
            Header {
                frag_index: 3,
                frag_count: 3,
                ..LONE
            },
            b"abc",
        );
        assert_eq!(
            Packet::new_checked(&beyond[..]).unwrap_err(),
            Error::Malformed
        );
        let huge = datagram(
            Header {
                frag_count: 2,
                payload_len: 1 << 20,
                ..LONE
            },
            b"abc",
        );
        assert_eq!(
            Packet::new_checked(&huge[..]).unwrap_err(),
            Error::Oversized
        );
    }
}
