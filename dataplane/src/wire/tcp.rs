//! TCP/IP headers for cutting a TCP super-packet into self-contained
//! segments (what a NIC does for TSO) and for joining consecutive segments
//! back into one super-packet (what GRO does).
//!
//! The overlay sends every segment of a super-packet as its own datagram,
//! so one lost datagram costs TCP one segment, as on a real network, and
//! not the whole super-packet. The receiver joins the segments that arrive
//! together and hands its TUN device one super-packet again.
//!
//! Checksums stay *partial* on the whole path: a segment's TCP checksum
//! field holds only the pseudo-header sum (as the kernel leaves it for a
//! device with checksum offload), the receiver's kernel finishes it, and
//! the underlay's UDP checksum guards the bytes in between. Nobody sums
//! the payload in user space.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::checksum;

/// Longest IP + TCP headers: IPv4 with options (60) and TCP with options
/// (60).
pub const MAX_HEADERS: usize = 120;
/// The checksum field's offset in the TCP header (`csum_offset`).
pub const CSUM_OFFSET: usize = 16;

const PROTO_TCP: u8 = 6;
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const URG: u8 = 0x20;
const CWR: u8 = 0x80;

/// Where the headers of a TCP/IP packet end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub v6: bool,
    /// IP header length: where the TCP header (and `csum_start`) begins.
    pub ip_len: usize,
    /// IP and TCP headers together: where the payload begins.
    pub hdr_len: usize,
}

/// The layout of `packet` if it is a whole TCP segment over IPv4 (not an
/// IP fragment) or over IPv6 without extension headers, its length fields
/// matching `packet.len()`.
pub fn layout(packet: &[u8]) -> Option<Layout> {
    let (v6, ip_len) = match packet.first()? >> 4 {
        4 => {
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            let fragment = u16::from_be_bytes([*packet.get(6)?, *packet.get(7)?]) & 0x3fff;
            if ihl < 20
                || *packet.get(9)? != PROTO_TCP
                || fragment != 0
                || usize::from(u16::from_be_bytes([packet[2], packet[3]])) != packet.len()
            {
                return None;
            }
            (false, ihl)
        }
        6 => {
            if *packet.get(6)? != PROTO_TCP
                || usize::from(u16::from_be_bytes([*packet.get(4)?, packet[5]])) + 40
                    != packet.len()
            {
                return None;
            }
            (true, 40)
        }
        _ => return None,
    };
    let doff = usize::from(*packet.get(ip_len + 12)? >> 4) * 4;
    let hdr_len = ip_len + doff;
    if doff < 20 || hdr_len > packet.len() || hdr_len > MAX_HEADERS {
        return None;
    }
    Some(Layout {
        v6,
        ip_len,
        hdr_len,
    })
}

/// Fills in the headers of segment `index` of `count` cut from a
/// super-packet whose headers `out` already holds a copy of: `payload`
/// bytes starting `index * mss` into the super-packet's payload.
pub fn fix_segment(
    out: &mut [u8],
    l: &Layout,
    index: usize,
    count: usize,
    mss: usize,
    payload: usize,
) {
    let tcp = l.ip_len;
    let seq = read_u32(out, tcp + 4).wrapping_add((index * mss) as u32);
    out[tcp + 4..tcp + 8].copy_from_slice(&seq.to_be_bytes());
    if index > 0 {
        out[tcp + 13] &= !CWR;
    }
    if index + 1 < count {
        out[tcp + 13] &= !(FIN | PSH);
    }
    if !l.v6 {
        let id = u16::from_be_bytes([out[4], out[5]]).wrapping_add(index as u16);
        out[4..6].copy_from_slice(&id.to_be_bytes());
    }
    set_lengths(out, l, payload);
}

/// Sets the IP length fields, the IPv4 header checksum and the partial TCP
/// checksum of headers `out` for a packet carrying `payload` bytes.
pub fn set_lengths(out: &mut [u8], l: &Layout, payload: usize) {
    let tcp_len = l.hdr_len - l.ip_len + payload;
    if l.v6 {
        out[4..6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
    } else {
        out[2..4].copy_from_slice(&((l.ip_len + tcp_len) as u16).to_be_bytes());
        out[10..12].fill(0);
        let sum = checksum::finish(checksum::add(0, &out[..l.ip_len]));
        out[10..12].copy_from_slice(&sum.to_be_bytes());
    }
    let addrs = if l.v6 { &out[8..40] } else { &out[12..20] };
    let [hi, lo] = (tcp_len as u16).to_be_bytes();
    let pseudo = checksum::add(checksum::add(0, addrs), &[0, PROTO_TCP, hi, lo]);
    let at = l.ip_len + CSUM_OFFSET;
    out[at..at + 2].copy_from_slice(&(!checksum::finish(pseudo)).to_be_bytes());
}

/// One TCP segment, read for joining.
#[derive(Debug, Clone, Copy)]
pub struct Segment<'a> {
    pub packet: &'a [u8],
    pub layout: Layout,
}

impl<'a> Segment<'a> {
    /// A TCP segment that carries data and may be joined with others (no
    /// SYN, RST, URG or CWR).
    pub fn joinable(packet: &'a [u8]) -> Option<Self> {
        let layout = layout(packet)?;
        let segment = Segment { packet, layout };
        let ok = segment.payload_len() > 0 && segment.flags() & (SYN | RST | URG | CWR) == 0;
        ok.then_some(segment)
    }

    pub fn payload(&self) -> &'a [u8] {
        &self.packet[self.layout.hdr_len..]
    }

    pub fn payload_len(&self) -> usize {
        self.packet.len() - self.layout.hdr_len
    }

    pub fn seq(&self) -> u32 {
        read_u32(self.packet, self.layout.ip_len + 4)
    }

    pub fn flags(&self) -> u8 {
        self.packet[self.layout.ip_len + 13]
    }

    /// Whether nothing may follow this segment in a super-packet.
    pub fn ends_run(&self) -> bool {
        self.flags() & (FIN | PSH) != 0
    }

    pub fn destination(&self) -> IpAddr {
        let p = self.packet;
        if self.layout.v6 {
            let mut d = [0u8; 16];
            d.copy_from_slice(&p[24..40]);
            IpAddr::V6(Ipv6Addr::from(d))
        } else {
            IpAddr::V4(Ipv4Addr::new(p[16], p[17], p[18], p[19]))
        }
    }

    /// Whether `next` may follow this segment in one super-packet: the
    /// same flow, addresses, IP fields, ACK, window and TCP options, and
    /// the same flags apart from FIN and PSH. (Sequence numbers and sizes
    /// are the caller's to check.)
    pub fn same_flow(&self, next: &Segment<'_>) -> bool {
        let (a, b) = (self.packet, next.packet);
        let (l, tcp) = (self.layout, self.layout.ip_len);
        if l != next.layout {
            return false;
        }
        let ip_same = if l.v6 {
            // Version, traffic class, flow label, next header, hop limit,
            // addresses.
            a[..4] == b[..4] && a[6..40] == b[6..40]
        } else {
            // Version/IHL, TOS; flags; TTL, protocol; addresses; options.
            a[..2] == b[..2]
                && a[6] == b[6]
                && a[8..10] == b[8..10]
                && a[12..l.ip_len] == b[12..l.ip_len]
        };
        ip_same
            && a[tcp..tcp + 4] == b[tcp..tcp + 4]
            && a[tcp + 8..tcp + 13] == b[tcp + 8..tcp + 13]
            && (a[tcp + 13] ^ b[tcp + 13]) & !(FIN | PSH) == 0
            && a[tcp + 14..tcp + 16] == b[tcp + 14..tcp + 16]
            && a[tcp + 20..l.hdr_len] == b[tcp + 20..l.hdr_len]
    }
}

/// Writes into `out` the headers of the super-packet that joins `first`
/// with segments after it, `payload` bytes in all, the last of which had
/// TCP flags `last_flags`; returns their length.
pub fn join_headers(out: &mut [u8], first: &Segment<'_>, payload: usize, last_flags: u8) -> usize {
    let l = first.layout;
    out[..l.hdr_len].copy_from_slice(&first.packet[..l.hdr_len]);
    out[l.ip_len + 13] |= last_flags & (FIN | PSH);
    set_lengths(out, &l, payload);
    l.hdr_len
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 TCP packet with timestamps and `payload` bytes, its TCP
    /// checksum complete.
    fn packet(seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20 + 32];
        p[0] = 0x45;
        p[6] = 0x40; // DF
        p[8] = 64;
        p[9] = PROTO_TCP;
        p[12..16].copy_from_slice(&[10, 42, 0, 2]);
        p[16..20].copy_from_slice(&[10, 42, 1, 2]);
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[28..32].copy_from_slice(&77u32.to_be_bytes());
        p[32] = 8 << 4;
        p[33] = flags | 0x10;
        p[34..36].copy_from_slice(&512u16.to_be_bytes());
        p[40..52].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 3]);
        p.extend_from_slice(payload);
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        let l = layout(&p).unwrap();
        let payload_len = p.len() - l.hdr_len;
        set_lengths(&mut p, &l, payload_len);
        let ok = checksum::complete(&mut p[..], l.ip_len, CSUM_OFFSET);
        assert!(ok);
        p
    }

    fn verifies(p: &[u8]) -> bool {
        let l = layout(p).unwrap();
        let tcp_len = p.len() - l.ip_len;
        let pseudo = checksum::add(0, &p[12..20]) + 6 + tcp_len as u32;
        checksum::finish(checksum::add(0, &p[..20])) == 0
            && checksum::finish(checksum::add(pseudo, &p[l.ip_len..])) == 0
    }

    /// Finishes a partial checksum as the receiving kernel would.
    fn finish_partial(p: &mut [u8]) {
        let l = layout(p).unwrap();
        assert!(checksum::complete(p, l.ip_len, CSUM_OFFSET));
    }

    #[test]
    fn cutting_then_joining_gives_back_the_super_packet() {
        let data: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let whole = packet(1000, PSH, &data);
        let l = layout(&whole).unwrap();
        assert_eq!((l.ip_len, l.hdr_len), (20, 52));
        let mss = 1000;
        let count = 3;
        let mut segments = Vec::new();
        for index in 0..count {
            let chunk = &data[index * mss..data.len().min((index + 1) * mss)];
            let mut seg = whole[..l.hdr_len].to_vec();
            fix_segment(&mut seg, &l, index, count, mss, chunk.len());
            seg.extend_from_slice(chunk);
            segments.push(seg);
        }
        for (index, seg) in segments.iter().enumerate() {
            let s = Segment::joinable(seg).unwrap();
            assert_eq!(s.seq(), 1000 + (index * mss) as u32);
            assert_eq!(s.ends_run(), index == count - 1, "only the last has PSH");
            let mut done = seg.clone();
            finish_partial(&mut done);
            assert!(verifies(&done), "segment {index} checksums");
        }
        let first = Segment::joinable(&segments[0]).unwrap();
        let last = Segment::joinable(&segments[2]).unwrap();
        assert!(first.same_flow(&last));
        let mut joined = [0u8; MAX_HEADERS];
        let n = join_headers(&mut joined, &first, data.len(), last.flags());
        let mut rebuilt = joined[..n].to_vec();
        for seg in &segments {
            rebuilt.extend_from_slice(Segment::joinable(seg).unwrap().payload());
        }
        finish_partial(&mut rebuilt);
        assert_eq!(rebuilt, whole);
    }

    #[test]
    fn refuses_what_cannot_be_joined() {
        let a = packet(1, 0, b"abc");
        assert!(Segment::joinable(&packet(1, SYN, b"abc")).is_none());
        assert!(
            Segment::joinable(&packet(1, 0, b"")).is_none(),
            "a pure ACK"
        );
        let mut other_port = a.clone();
        other_port[23] ^= 1;
        let mut other_ack = a.clone();
        other_ack[31] ^= 1;
        let s = Segment::joinable(&a).unwrap();
        assert!(!s.same_flow(&Segment::joinable(&other_port).unwrap()));
        assert!(!s.same_flow(&Segment::joinable(&other_ack).unwrap()));
        assert!(s.same_flow(&Segment::joinable(&packet(4, PSH, b"def")).unwrap()));
        // Bad lengths, UDP, fragments and garbage are not TCP segments.
        assert!(layout(&a[..a.len() - 1]).is_none());
        let mut udp = a.clone();
        udp[9] = 17;
        assert!(layout(&udp).is_none());
        let mut fragment = a.clone();
        fragment[6] |= 0x20;
        assert!(layout(&fragment).is_none());
        assert!(layout(&[0x45; 30]).is_none());
        assert!(layout(&[]).is_none());
    }
}
