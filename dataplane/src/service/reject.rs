//! Answers for connections a Service cannot take: a TCP reset (RFC 9293
//! §3.10.7.1) or an ICMP port unreachable (RFC 792, quoting as much of the
//! packet as fits in 576 bytes, RFC 1812 §4.3.2.3), written into the
//! caller's buffer, from the address the client tried.

use super::checksum::{checksum, fold, sum};
use super::wire::{
    ICMP_DEST_UNREACHABLE, ICMP_PORT_UNREACHABLE, IPV4_MIN_HEADER, Ipv4Packet, PROTO_ICMP,
    PROTO_TCP, TCP_MIN_HEADER, TcpFlags, read_u16, read_u32, write_u16, write_u32,
};

/// The most an ICMP error may take (RFC 1812).
const ICMP_ERROR_MAX: usize = 576;
const TTL: u8 = 64;

/// Builds a reset for a TCP segment; `None` when the segment is itself a
/// reset, its source must not be answered, or `out` is too small.
pub fn tcp_reset(ip: &Ipv4Packet<&mut [u8]>, out: &mut [u8]) -> Option<usize> {
    let segment = ip.payload();
    let flags = TcpFlags(*segment.get(13)?);
    if flags.rst() || !answerable(ip.src()) {
        return None;
    }
    let total = IPV4_MIN_HEADER + TCP_MIN_HEADER;
    let out = out.get_mut(..total)?;
    let data_offset = usize::from(segment[12] >> 4) * 4;
    let (seq, ack, reply_flags) = if flags.ack() {
        (read_u32(segment, 8), 0, TcpFlags::RST)
    } else {
        // SYN and FIN each take a sequence number.
        let length = segment.len().saturating_sub(data_offset)
            + usize::from(flags.syn())
            + usize::from(flags.fin());
        let ack = read_u32(segment, 4).wrapping_add(length as u32);
        (0, ack, TcpFlags::RST | TcpFlags::ACK)
    };
    write_ipv4_header(out, total, PROTO_TCP, ip.dst(), ip.src());
    let tcp = &mut out[IPV4_MIN_HEADER..];
    tcp.fill(0);
    write_u16(tcp, 0, read_u16(segment, 2));
    write_u16(tcp, 2, read_u16(segment, 0));
    write_u32(tcp, 4, seq);
    write_u32(tcp, 8, ack);
    tcp[12] = (TCP_MIN_HEADER as u8 / 4) << 4;
    tcp[13] = reply_flags;
    let pseudo = pseudo_header_sum(ip.dst(), ip.src(), PROTO_TCP, TCP_MIN_HEADER);
    let check = !fold(pseudo + sum(tcp));
    write_u16(tcp, 16, check);
    Some(total)
}

/// Builds an ICMP port unreachable for a packet; `None` when its source
/// must not be answered or `out` cannot hold the header and 8 bytes of it.
pub fn port_unreachable(ip: &Ipv4Packet<&mut [u8]>, out: &mut [u8]) -> Option<usize> {
    if !answerable(ip.src()) {
        return None;
    }
    let room = out.len().min(ICMP_ERROR_MAX);
    let original = ip.bytes();
    let quoted = original.len().min(room.checked_sub(IPV4_MIN_HEADER + 8)?);
    if quoted < ip.header_len() + 8 {
        return None;
    }
    let total = IPV4_MIN_HEADER + 8 + quoted;
    let out = &mut out[..total];
    write_ipv4_header(out, total, PROTO_ICMP, ip.dst(), ip.src());
    let icmp = &mut out[IPV4_MIN_HEADER..];
    icmp[..8].fill(0);
    icmp[0] = ICMP_DEST_UNREACHABLE;
    icmp[1] = ICMP_PORT_UNREACHABLE;
    icmp[8..].copy_from_slice(&original[..quoted]);
    let check = checksum(icmp);
    write_u16(icmp, 2, check);
    Some(total)
}

/// Never answer a source that is no single host (RFC 1122 §3.2.2).
fn answerable(src: u32) -> bool {
    let first = (src >> 24) as u8;
    src != 0 && src != u32::MAX && !(224..=239).contains(&first)
}

fn write_ipv4_header(out: &mut [u8], total: usize, protocol: u8, src: u32, dst: u32) {
    let header = &mut out[..IPV4_MIN_HEADER];
    header.fill(0);
    header[0] = 0x45;
    write_u16(header, 2, total as u16);
    write_u16(header, 6, 0x4000); // Don't fragment.
    header[8] = TTL;
    header[9] = protocol;
    write_u32(header, 12, src);
    write_u32(header, 16, dst);
    let check = checksum(header);
    write_u16(header, 10, check);
}

fn pseudo_header_sum(src: u32, dst: u32, protocol: u8, length: usize) -> u64 {
    let mut pseudo = [0u8; 12];
    write_u32(&mut pseudo, 0, src);
    write_u32(&mut pseudo, 4, dst);
    pseudo[9] = protocol;
    write_u16(&mut pseudo, 10, length as u16);
    sum(&pseudo)
}
