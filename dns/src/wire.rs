//! A zero-copy view of a DNS query, for the hot path: the header, the one
//! question and an optional EDNS OPT record, checked for length and
//! shape without allocating. Anything unusual is reported as such so the
//! caller can hand the packet to the full decoder in `slow`.

pub const HEADER_LEN: usize = 12;
/// The longest name on the wire (RFC 1035 §2.3.4).
pub const MAX_NAME_LEN: usize = 255;
/// A lookup key: the lowercased wire name followed by the query type.
pub const MAX_KEY_LEN: usize = MAX_NAME_LEN + 2;

pub const TYPE_A: u16 = 1;
pub const TYPE_NS: u16 = 2;
pub const TYPE_CNAME: u16 = 5;
pub const TYPE_SOA: u16 = 6;
pub const TYPE_PTR: u16 = 12;
pub const TYPE_TXT: u16 = 16;
pub const TYPE_AAAA: u16 = 28;
pub const TYPE_SRV: u16 = 33;
pub const TYPE_OPT: u16 = 41;
pub const TYPE_IXFR: u16 = 251;
pub const TYPE_AXFR: u16 = 252;
pub const TYPE_ANY: u16 = 255;
pub const CLASS_IN: u16 = 1;

pub const RCODE_NOERROR: u8 = 0;
pub const RCODE_FORMERR: u8 = 1;
pub const RCODE_SERVFAIL: u8 = 2;
pub const RCODE_NXDOMAIN: u8 = 3;
pub const RCODE_NOTIMP: u8 = 4;
pub const RCODE_REFUSED: u8 = 5;

/// Header flag bits in byte 2 and byte 3.
pub const FLAG_QR: u8 = 0x80;
pub const FLAG_AA: u8 = 0x04;
pub const FLAG_TC: u8 = 0x02;
pub const FLAG_RD: u8 = 0x01;
pub const FLAG_RA: u8 = 0x80;
pub const FLAG_CD: u8 = 0x10;

/// The largest UDP answer we send, whatever the client offers: the DNS
/// flag day 2020 size, which avoids IP fragmentation.
pub const MAX_UDP_PAYLOAD: u16 = 1232;
/// Size of the OPT record we append to EDNS answers.
pub const OPT_LEN: usize = 11;

/// Why a packet was not answered on the fast path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    /// Too short or inconsistent to be a DNS message: dropped, since
    /// there may not even be an ID to answer to.
    Runt,
    /// A response (QR set): never answered, so two servers cannot loop.
    Response,
    /// Well-formed enough to answer, but wrong: FORMERR.
    Malformed,
    /// Legal but unusual (other opcodes, several questions, compressed
    /// question names, EDNS versions, extra records): the slow path.
    Unusual,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edns {
    pub payload: u16,
    pub dnssec_ok: bool,
}

/// A parsed query. `key` holds the lowercased name and the type.
#[derive(Debug)]
pub struct Query {
    pub id: [u8; 2],
    pub rd: bool,
    pub cd: bool,
    /// Length of the name on the wire.
    pub name_len: usize,
    pub qtype: u16,
    pub qclass: u16,
    /// End of the question section (offset).
    pub question_end: usize,
    pub edns: Option<Edns>,
    pub key: [u8; MAX_KEY_LEN],
}

impl Query {
    /// The lowercased wire name.
    pub fn name(&self) -> &[u8] {
        &self.key[..self.name_len]
    }

    /// The lookup key for `qtype` (0 stands for "any other type").
    pub fn key_for(&mut self, qtype: u16) -> &[u8] {
        self.key[self.name_len..self.name_len + 2].copy_from_slice(&qtype.to_be_bytes());
        &self.key[..self.name_len + 2]
    }

    /// The most an answer to this query may hold over UDP.
    pub fn udp_limit(&self) -> usize {
        match self.edns {
            Some(e) => usize::from(e.payload.clamp(512, MAX_UDP_PAYLOAD)),
            None => 512,
        }
    }
}

/// Parses `packet` as a standard query with exactly one question.
pub fn parse(packet: &[u8]) -> Result<Query, Reject> {
    if packet.len() < HEADER_LEN {
        return Err(Reject::Runt);
    }
    let flags = packet[2];
    if flags & FLAG_QR != 0 {
        return Err(Reject::Response);
    }
    let opcode = (flags >> 3) & 0x0f;
    let qdcount = u16::from_be_bytes([packet[4], packet[5]]);
    let ancount = u16::from_be_bytes([packet[6], packet[7]]);
    let nscount = u16::from_be_bytes([packet[8], packet[9]]);
    let arcount = u16::from_be_bytes([packet[10], packet[11]]);
    if opcode != 0 || qdcount != 1 || ancount != 0 || nscount != 0 || arcount > 1 {
        return Err(if qdcount == 0 && opcode == 0 {
            Reject::Malformed
        } else {
            Reject::Unusual
        });
    }
    let mut query = Query {
        id: [packet[0], packet[1]],
        rd: flags & FLAG_RD != 0,
        cd: packet[3] & FLAG_CD != 0,
        name_len: 0,
        qtype: 0,
        qclass: 0,
        question_end: 0,
        edns: None,
        key: [0; MAX_KEY_LEN],
    };
    let mut pos = HEADER_LEN;
    loop {
        let Some(&len) = packet.get(pos) else {
            return Err(Reject::Malformed);
        };
        let len = usize::from(len);
        if len & 0xc0 == 0xc0 {
            // A pointer in the question is legal; the full decoder copes.
            return Err(Reject::Unusual);
        }
        if len > 63 {
            return Err(Reject::Malformed);
        }
        let out = pos - HEADER_LEN;
        if out + len + 1 > MAX_NAME_LEN {
            return Err(Reject::Malformed);
        }
        let Some(label) = packet.get(pos..pos + 1 + len) else {
            return Err(Reject::Malformed);
        };
        query.key[out] = label[0];
        for (dst, src) in query.key[out + 1..out + 1 + len]
            .iter_mut()
            .zip(&label[1..])
        {
            *dst = src.to_ascii_lowercase();
        }
        pos += 1 + len;
        if len == 0 {
            break;
        }
    }
    query.name_len = pos - HEADER_LEN;
    let Some(fixed) = packet.get(pos..pos + 4) else {
        return Err(Reject::Malformed);
    };
    query.qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
    query.qclass = u16::from_be_bytes([fixed[2], fixed[3]]);
    pos += 4;
    query.question_end = pos;
    if arcount == 1 {
        query.edns = Some(parse_opt(&packet[pos..])?);
    } else if pos != packet.len() {
        return Err(Reject::Malformed);
    }
    Ok(query)
}

/// The one additional record, which must be an OPT record of EDNS
/// version 0 and end the packet.
fn parse_opt(rest: &[u8]) -> Result<Edns, Reject> {
    // root name, type, class (payload), ttl (ext rcode, version, flags), rdlen
    if rest.len() < OPT_LEN {
        return Err(Reject::Malformed);
    }
    if rest[0] != 0 || u16::from_be_bytes([rest[1], rest[2]]) != TYPE_OPT {
        // Another record type (TSIG, say): the slow path decides.
        return Err(Reject::Unusual);
    }
    let rdlen = usize::from(u16::from_be_bytes([rest[9], rest[10]]));
    if rest.len() != OPT_LEN + rdlen {
        return Err(Reject::Malformed);
    }
    if rest[6] != 0 {
        // EDNS version other than 0: BADVERS, from the slow path.
        return Err(Reject::Unusual);
    }
    Ok(Edns {
        payload: u16::from_be_bytes([rest[3], rest[4]]),
        dnssec_ok: rest[7] & 0x80 != 0,
    })
}

/// Whether the wire name `name` equals `suffix` or ends with it on a label
/// boundary. Both must be lowercased wire names.
pub fn is_subdomain(name: &[u8], suffix: &[u8]) -> bool {
    label_offset(name, suffix).is_some()
}

/// Offset in `name` where `suffix` starts, on a label boundary.
pub fn label_offset(name: &[u8], suffix: &[u8]) -> Option<usize> {
    if suffix.len() > name.len() {
        return None;
    }
    let target = name.len() - suffix.len();
    let mut pos = 0;
    while pos < target {
        pos += 1 + usize::from(name[pos]);
    }
    (pos == target && name[pos..] == *suffix).then_some(pos)
}

/// Encodes a dotted name ("a.b.c", trailing dot optional) as a lowercased
/// wire name. `None` when a label is empty or too long.
pub fn encode_name(dotted: &str) -> Option<Vec<u8>> {
    let trimmed = dotted.strip_suffix('.').unwrap_or(dotted);
    let mut out = Vec::with_capacity(trimmed.len() + 2);
    if !trimmed.is_empty() {
        for label in trimmed.split('.') {
            if label.is_empty() || label.len() > 63 {
                return None;
            }
            out.push(label.len() as u8);
            out.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
        }
    }
    out.push(0);
    (out.len() <= MAX_NAME_LEN).then_some(out)
}

/// Writes a header-and-question-only reply with `rcode` into `out`.
pub fn write_empty(query: &Query, packet: &[u8], out: &mut [u8], flags: [u8; 2]) -> usize {
    let qend = query.question_end;
    out[..2].copy_from_slice(&query.id);
    out[2] = flags[0] | FLAG_QR | u8::from(query.rd);
    out[3] = flags[1] | if query.cd { FLAG_CD } else { 0 };
    out[4..12].copy_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    out[HEADER_LEN..qend].copy_from_slice(&packet[HEADER_LEN..qend]);
    finish(query, out, qend)
}

/// Appends the OPT record when the query had one, fixing ARCOUNT.
pub fn finish(query: &Query, out: &mut [u8], len: usize) -> usize {
    let Some(edns) = query.edns else {
        return len;
    };
    let payload = MAX_UDP_PAYLOAD.to_be_bytes();
    let flags = if edns.dnssec_ok { 0x80 } else { 0 };
    out[len..len + OPT_LEN]
        .copy_from_slice(&[0, 0, 41, payload[0], payload[1], 0, 0, flags, 0, 0, 0]);
    let arcount = u16::from_be_bytes([out[10], out[11]]).wrapping_add(1);
    out[10..12].copy_from_slice(&arcount.to_be_bytes());
    len + OPT_LEN
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn query_bytes(name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
        let mut p = vec![
            0x12,
            0x34,
            0x01,
            0x00,
            0,
            1,
            0,
            0,
            0,
            0,
            0,
            u8::from(edns.is_some()),
        ];
        for label in name.trim_end_matches('.').split('.') {
            p.push(label.len() as u8);
            p.extend(label.bytes());
        }
        p.push(0);
        p.extend(qtype.to_be_bytes());
        p.extend(CLASS_IN.to_be_bytes());
        if let Some(size) = edns {
            p.extend([0, 0, 41]);
            p.extend(size.to_be_bytes());
            p.extend([0, 0, 0, 0, 0, 0]);
        }
        p
    }

    #[test]
    fn parses_and_lowercases_the_question() {
        let mut q = parse(&query_bytes("Web.Default.SVC.cluster.local", TYPE_A, None)).unwrap();
        assert_eq!(
            q.name(),
            encode_name("web.default.svc.cluster.local").unwrap()
        );
        assert_eq!(q.qtype, TYPE_A);
        assert!(q.rd);
        assert_eq!(q.udp_limit(), 512);
        let key = q.key_for(TYPE_AAAA).to_vec();
        assert_eq!(&key[key.len() - 2..], &[0, 28]);
    }

    #[test]
    fn reads_edns_payload_size() {
        let q = parse(&query_bytes("a.b", TYPE_A, Some(4096))).unwrap();
        assert_eq!(
            q.edns,
            Some(Edns {
                payload: 4096,
                dnssec_ok: false
            })
        );
        assert_eq!(q.udp_limit(), usize::from(MAX_UDP_PAYLOAD));
        let q = parse(&query_bytes("a.b", TYPE_A, Some(100))).unwrap();
        assert_eq!(q.udp_limit(), 512);
    }

    #[test]
    fn rejects_bad_shapes() {
        assert_eq!(parse(&[0; 5]).unwrap_err(), Reject::Runt);
        let mut response = query_bytes("a.b", TYPE_A, None);
        response[2] |= FLAG_QR;
        assert_eq!(parse(&response).unwrap_err(), Reject::Response);
        let full = query_bytes("a.b", TYPE_A, None);
        for cut in HEADER_LEN..full.len() {
            assert_eq!(
                parse(&full[..cut]).unwrap_err(),
                Reject::Malformed,
                "cut {cut}"
            );
        }
        let mut trailing = full.clone();
        trailing.push(0);
        assert_eq!(parse(&trailing).unwrap_err(), Reject::Malformed);
        let mut pointer = full[..HEADER_LEN].to_vec();
        pointer.extend([0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(parse(&pointer).unwrap_err(), Reject::Unusual);
        let mut long = full[..HEADER_LEN].to_vec();
        for _ in 0..5 {
            long.push(63);
            long.extend([b'a'; 63]);
        }
        long.extend([0, 0, 1, 0, 1]);
        assert_eq!(parse(&long).unwrap_err(), Reject::Malformed);
    }

    #[test]
    fn suffixes_match_on_label_boundaries() {
        let zone = encode_name("cluster.local").unwrap();
        let name = encode_name("a.svc.cluster.local").unwrap();
        assert_eq!(label_offset(&name, &zone), Some(6));
        assert!(is_subdomain(&zone, &zone));
        let other = encode_name("xcluster.local").unwrap();
        assert!(!is_subdomain(&other, &zone));
        assert!(!is_subdomain(&encode_name("local").unwrap(), &zone));
    }
}
