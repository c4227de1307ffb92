//! Address and port rewriting with incremental checksum updates
//! (RFC 1624): TCP/UDP packets of a tracked flow, and ICMP errors quoting
//! one. A packet whose L4 checksum the device will finish
//! (`CHECKSUM_PARTIAL`) carries only the pseudo-header sum: address changes
//! go into it, port changes must not (the device sums the ports itself).

use super::checksum::Delta;
use super::conntrack::Flow;
use super::state::Direction;
use super::wire::{
    ICMP_CHECKSUM_AT, Ipv4Packet, PROTO_UDP, TCP_CHECKSUM_AT, UDP_CHECKSUM_AT, WireError,
    l4_checksum_at, read_u16, write_u16,
};

/// The addresses and ports a packet leaves with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewrite {
    pub src: u32,
    pub src_port: u16,
    pub dst: u32,
    pub dst_port: u16,
}

impl Rewrite {
    /// For a packet of `flow` travelling `direction`: forwards look like
    /// the reply tuple reversed (DNAT, maybe SNAT); replies look like the
    /// original reversed (the Service address as source).
    pub fn for_flow(flow: &Flow, direction: Direction) -> Rewrite {
        let other = match direction {
            Direction::Original => &flow.reply,
            Direction::Reply => &flow.original,
        };
        Rewrite {
            src: other.dst,
            src_port: other.dst_port,
            dst: other.src,
            dst_port: other.src_port,
        }
    }
}

/// Rewrites a whole TCP or UDP packet (headers checked by the caller).
pub fn rewrite_transport(ip: &mut Ipv4Packet<&mut [u8]>, to: Rewrite, checksum_partial: bool) {
    let protocol = ip.protocol();
    let addresses = rewrite_addresses(ip, to.src, to.dst);
    let segment = ip.payload_mut();
    let mut l4 = addresses;
    let ports = rewrite_ports(segment, to.src_port, to.dst_port);
    if !checksum_partial {
        l4.merge(ports);
    }
    let at = if protocol == PROTO_UDP {
        UDP_CHECKSUM_AT
    } else {
        TCP_CHECKSUM_AT
    };
    let old = read_u16(segment, at);
    let new = if checksum_partial {
        l4.apply_partial(old)
    } else {
        full_l4_checksum(protocol, old, l4)
    };
    write_u16(segment, at, new);
}

/// Rewrites an ICMP error about a tracked flow: the outer header as a
/// packet of `direction` (its source only if it is the flow's peer, not a
/// router on the way), the quoted packet as the peer sent it, and every
/// checksum on the way. The ICMP header must be whole.
pub fn rewrite_icmp_error(
    ip: &mut Ipv4Packet<&mut [u8]>,
    to: Rewrite,
    rewrite_source: bool,
) -> Result<(), WireError> {
    let src = if rewrite_source { to.src } else { ip.src() };
    rewrite_addresses(ip, src, to.dst);
    let icmp = ip.payload_mut();
    let Some((header, quote)) = icmp.split_at_mut_checked(8) else {
        return Err(WireError::Truncated);
    };
    let mut icmp_delta = Delta::default();
    let mut inner = Ipv4Packet::new_quoted(quote)?;
    let protocol = inner.protocol();
    // The quoted packet went the other way: its source is our destination.
    let old_checksum = inner.checksum();
    let addresses = rewrite_addresses(&mut inner, to.dst, to.src);
    icmp_delta.merge(addresses);
    icmp_delta.word(old_checksum, inner.checksum());
    let segment = inner.payload_mut();
    if segment.len() < 4 {
        return Err(WireError::Truncated);
    }
    let ports = rewrite_ports(segment, to.dst_port, to.src_port);
    icmp_delta.merge(ports);
    if let Some(at) = l4_checksum_at(protocol, segment.len()) {
        let mut l4 = addresses;
        l4.merge(ports);
        let old = read_u16(segment, at);
        let new = full_l4_checksum(protocol, old, l4);
        write_u16(segment, at, new);
        icmp_delta.word(old, new);
    }
    let old = read_u16(header, ICMP_CHECKSUM_AT);
    write_u16(header, ICMP_CHECKSUM_AT, icmp_delta.apply_full(old));
    Ok(())
}

/// Sets both addresses and fixes the header checksum; returns the change
/// (what the pseudo-header of the L4 checksum sees too).
fn rewrite_addresses(ip: &mut Ipv4Packet<&mut [u8]>, src: u32, dst: u32) -> Delta {
    let mut delta = Delta::default();
    delta.addr(ip.src(), src);
    delta.addr(ip.dst(), dst);
    ip.set_src(src);
    ip.set_dst(dst);
    ip.set_checksum(delta.apply_full(ip.checksum()));
    delta
}

/// Sets both ports (the first four bytes of TCP and UDP).
fn rewrite_ports(segment: &mut [u8], src: u16, dst: u16) -> Delta {
    let mut delta = Delta::default();
    delta.word(read_u16(segment, 0), src);
    delta.word(read_u16(segment, 2), dst);
    write_u16(segment, 0, src);
    write_u16(segment, 2, dst);
    delta
}

/// A full L4 checksum after `delta`; UDP's "no checksum" zero stays zero
/// and a computed zero is sent as all ones (RFC 768).
fn full_l4_checksum(protocol: u8, old: u16, delta: Delta) -> u16 {
    if protocol == PROTO_UDP && old == 0 {
        return 0;
    }
    let new = delta.apply_full(old);
    if protocol == PROTO_UDP && new == 0 {
        0xffff
    } else {
        new
    }
}
