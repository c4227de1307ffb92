//! The hot path: one query in, one answer out, from the pre-encoded index
//! or synthesised in place (negative answers, pod records, refusals). No
//! allocation and no lock; anything it cannot answer goes to `slow`.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::index::{Answer, Index, node_answer};
use crate::wire::{self, FLAG_AA, FLAG_CD, FLAG_QR, FLAG_TC, HEADER_LEN, OPT_LEN, Query, Reject};

/// Room an output buffer needs for any answer the fast path writes over
/// UDP; TCP callers pass a 64 KiB buffer.
pub const MIN_OUT: usize = 1500;

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `len` bytes of answer are in the output buffer.
    Reply { len: usize, rcode: u8, qtype: u16 },
    /// Needs the full decoder or an upstream.
    Slow,
    /// Not answered at all.
    Drop(Reject),
}

/// Answers `packet` into `out`, over UDP (the client's EDNS size limits
/// the answer) or TCP.
pub fn answer(packet: &[u8], out: &mut [u8], index: &Index, udp: bool) -> Outcome {
    answer_with(packet, out, index, udp, true)
}

/// As `answer`, but an ExternalName answer whose target lies outside the
/// zone is written as it is (the CNAME chain) instead of being handed to
/// the slow path, which uses this to get the chain it then completes.
pub fn answer_local(packet: &[u8], out: &mut [u8], index: &Index, udp: bool) -> Outcome {
    answer_with(packet, out, index, udp, false)
}

fn answer_with(packet: &[u8], out: &mut [u8], index: &Index, udp: bool, chase: bool) -> Outcome {
    let query = match wire::parse(packet) {
        Ok(q) => q,
        Err(Reject::Malformed) => return formerr(packet, out),
        Err(Reject::Unusual) => return Outcome::Slow,
        Err(reject) => return Outcome::Drop(reject),
    };
    let limit = if udp {
        query.udp_limit()
    } else {
        out.len().min(65535)
    };
    let qtype = query.qtype;
    let reply = |len, rcode| Outcome::Reply { len, rcode, qtype };
    if query.qclass != wire::CLASS_IN {
        return Outcome::Slow;
    }
    if matches!(qtype, wire::TYPE_ANY | wire::TYPE_AXFR | wire::TYPE_IXFR) {
        // As CoreDNS and NSD with refuse-any: no amplification by ANY,
        // and no zone transfers of the cluster's names.
        let len = wire::write_empty(&query, packet, out, [0, wire::RCODE_REFUSED]);
        return reply(len, wire::RCODE_REFUSED);
    }
    let zone = &*index.zone;
    if let Some(node) = index.node(query.name()) {
        let Some(found) = node_answer(node, qtype) else {
            let len = write_negative(&query, packet, out, wire::RCODE_NOERROR, &zone.soa);
            return reply(len, wire::RCODE_NOERROR);
        };
        if found.external && chase && zone.forwarding {
            return Outcome::Slow;
        }
        let len = write_answer(&query, packet, out, &found, limit);
        return reply(len, found.rcode());
    }
    if !wire::is_subdomain(query.name(), &zone.apex) {
        return Outcome::Slow;
    }
    if !index.ready {
        let len = wire::write_empty(&query, packet, out, [0, wire::RCODE_SERVFAIL]);
        return reply(len, wire::RCODE_SERVFAIL);
    }
    if let Some(addr) = pod_address(query.name(), &zone.pod_suffix) {
        let len = write_pod(&query, packet, out, addr, zone.ttl, &zone.soa);
        return reply(len, wire::RCODE_NOERROR);
    }
    let len = write_negative(&query, packet, out, wire::RCODE_NXDOMAIN, &zone.soa);
    reply(len, wire::RCODE_NXDOMAIN)
}

/// Copies a pre-encoded answer behind the client's own header and
/// question, or a truncated answer when it does not fit.
fn write_answer(
    query: &Query,
    packet: &[u8],
    out: &mut [u8],
    found: &Answer<'_>,
    limit: usize,
) -> usize {
    let qend = query.question_end;
    let opt = if query.edns.is_some() { OPT_LEN } else { 0 };
    let total = qend + found.body.len() + opt;
    if total > limit || total > out.len() {
        let flags = [found.head[0] | FLAG_TC, found.head[1]];
        return wire::write_empty(query, packet, out, flags);
    }
    out[..2].copy_from_slice(&query.id);
    out[2] = found.head[0] | FLAG_QR | u8::from(query.rd);
    out[3] = found.head[1] | if query.cd { FLAG_CD } else { 0 };
    out[4..12].copy_from_slice(&found.head[2..10]);
    out[HEADER_LEN..qend].copy_from_slice(&packet[HEADER_LEN..qend]);
    out[qend..qend + found.body.len()].copy_from_slice(found.body);
    wire::finish(query, out, qend + found.body.len())
}

/// NXDOMAIN or NODATA with the zone's SOA in the authority section.
fn write_negative(query: &Query, packet: &[u8], out: &mut [u8], rcode: u8, soa: &[u8]) -> usize {
    let len = wire::write_empty(query, packet, out, [FLAG_AA, rcode]);
    // write_empty may have appended an OPT record; the SOA goes before it.
    let qend = query.question_end;
    let opt = len - qend;
    out.copy_within(qend..len, qend + soa.len());
    out[qend..qend + soa.len()].copy_from_slice(soa);
    out[8..10].copy_from_slice(&1u16.to_be_bytes());
    qend + soa.len() + opt
}

/// `a-b-c-d.<ns>.pod.<zone>`, answered for any address as CoreDNS's
/// `pods insecure` does (specification §2.6); IPv6 with `-` for `:`.
fn write_pod(
    query: &Query,
    packet: &[u8],
    out: &mut [u8],
    addr: PodAddr,
    ttl: u32,
    soa: &[u8],
) -> usize {
    let (rtype, rdata): (u16, &[u8]) = match &addr {
        PodAddr::V4(a) => (wire::TYPE_A, a),
        PodAddr::V6(a) => (wire::TYPE_AAAA, a),
    };
    if query.qtype != rtype {
        return write_negative(query, packet, out, wire::RCODE_NOERROR, soa);
    }
    let len = wire::write_empty(query, packet, out, [FLAG_AA, 0]);
    let qend = query.question_end;
    let opt = len - qend;
    let mut record = [0u8; 12 + 16];
    record[..2].copy_from_slice(&[0xc0, HEADER_LEN as u8]);
    record[2..4].copy_from_slice(&rtype.to_be_bytes());
    record[4..6].copy_from_slice(&wire::CLASS_IN.to_be_bytes());
    record[6..10].copy_from_slice(&ttl.to_be_bytes());
    record[10..12].copy_from_slice(&(rdata.len() as u16).to_be_bytes());
    record[12..12 + rdata.len()].copy_from_slice(rdata);
    let record = &record[..12 + rdata.len()];
    out.copy_within(qend..len, qend + record.len());
    out[qend..qend + record.len()].copy_from_slice(record);
    out[6..8].copy_from_slice(&1u16.to_be_bytes());
    qend + record.len() + opt
}

enum PodAddr {
    V4([u8; 4]),
    V6([u8; 16]),
}

/// The address a pod name encodes, if `name` is exactly
/// `<address>.<ns>.pod.<zone>`.
fn pod_address(name: &[u8], pod_suffix: &[u8]) -> Option<PodAddr> {
    let at = wire::label_offset(name, pod_suffix)?;
    let first = usize::from(name[0]);
    let second = 1 + first;
    if second >= at || second + 1 + usize::from(name[second]) != at {
        return None;
    }
    let label = std::str::from_utf8(&name[1..1 + first]).ok()?;
    if let Some(v4) = parse_dashed_v4(label) {
        return Some(PodAddr::V4(v4.octets()));
    }
    let mut buf = [0u8; 63];
    for (dst, src) in buf.iter_mut().zip(label.bytes()) {
        *dst = if src == b'-' { b':' } else { src };
    }
    let text = std::str::from_utf8(&buf[..label.len()]).ok()?;
    text.parse::<Ipv6Addr>()
        .ok()
        .map(|a| PodAddr::V6(a.octets()))
}

fn parse_dashed_v4(label: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = label.split('-');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    parts.next().is_none().then(|| Ipv4Addr::from(octets))
}

/// FORMERR to a query we could read the header of but not the rest.
fn formerr(packet: &[u8], out: &mut [u8]) -> Outcome {
    out[..2].copy_from_slice(&packet[..2]);
    out[2] = FLAG_QR | (packet[2] & 0x79); // keep opcode and RD
    out[3] = wire::RCODE_FORMERR;
    out[4..12].fill(0);
    Outcome::Reply {
        len: HEADER_LEN,
        rcode: wire::RCODE_FORMERR,
        qtype: 0,
    }
}
