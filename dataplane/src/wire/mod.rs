//! Packet formats as typed, zero-copy views over byte buffers: the overlay
//! header Skiff puts in front of every tunnelled packet, the virtio-net
//! header a TUN device with offloads adds, and just enough of IPv4/IPv6 to
//! route and check an inner packet. Every view checks its length before any
//! getter can touch the bytes, so input from the network never panics.

pub mod checksum;
pub mod ip;
pub mod overlay;
pub mod tcp;
pub mod vnet;

/// Why a buffer is not a valid packet of some format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("packet shorter than its header says")]
    Truncated,
    #[error("unsupported overlay version {0}")]
    BadVersion(u8),
    #[error("malformed header")]
    Malformed,
    #[error("packet longer than allowed")]
    Oversized,
}
