//! Typed, zero-copy views over the IPv4, TCP, UDP and ICMP headers the
//! engine reads and rewrites (the smoltcp `wire` shape): a constructor checks
//! lengths once, so the getters and setters after it cannot go out of bounds.
//! Addresses are `u32`s in host order of their network bytes.

use thiserror::Error;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

pub const IPV4_MIN_HEADER: usize = 20;
pub const TCP_MIN_HEADER: usize = 20;
pub const UDP_HEADER: usize = 8;
pub const ICMP_HEADER: usize = 8;

/// Where each L4 protocol keeps its checksum.
pub const TCP_CHECKSUM_AT: usize = 16;
pub const UDP_CHECKSUM_AT: usize = 6;
pub const ICMP_CHECKSUM_AT: usize = 2;

pub const ICMP_DEST_UNREACHABLE: u8 = 3;
pub const ICMP_PORT_UNREACHABLE: u8 = 3;
pub const ICMP_TIME_EXCEEDED: u8 = 11;
pub const ICMP_PARAMETER_PROBLEM: u8 = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum WireError {
    #[error("packet shorter than its headers say")]
    Truncated,
    #[error("not an IPv4 packet")]
    NotIpv4,
    #[error("header length field out of range")]
    BadHeaderLength,
}

pub fn read_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

pub fn write_u16(buf: &mut [u8], at: usize, value: u16) {
    buf[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

pub fn read_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

pub fn write_u32(buf: &mut [u8], at: usize, value: u32) {
    buf[at..at + 4].copy_from_slice(&value.to_be_bytes());
}

/// A view of an IPv4 packet: header length and end checked at construction.
#[derive(Debug)]
pub struct Ipv4Packet<T> {
    buf: T,
    header_len: usize,
    end: usize,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// A whole packet: `total length` bytes must be present (more may
    /// follow, as padding, and are ignored).
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let (header_len, total) = Self::check_header(buf.as_ref())?;
        if total < header_len || total > buf.as_ref().len() {
            return Err(WireError::Truncated);
        }
        Ok(Ipv4Packet {
            buf,
            header_len,
            end: total,
        })
    }

    /// A packet quoted inside an ICMP error: the header is whole, the
    /// payload may be cut short (RFC 792 promises its first 8 bytes).
    pub fn new_quoted(buf: T) -> Result<Self, WireError> {
        let (header_len, total) = Self::check_header(buf.as_ref())?;
        let end = total.min(buf.as_ref().len());
        if end < header_len {
            return Err(WireError::Truncated);
        }
        Ok(Ipv4Packet {
            buf,
            header_len,
            end,
        })
    }

    fn check_header(b: &[u8]) -> Result<(usize, usize), WireError> {
        let first = *b.first().ok_or(WireError::Truncated)?;
        if first >> 4 != 4 {
            return Err(WireError::NotIpv4);
        }
        if b.len() < IPV4_MIN_HEADER {
            return Err(WireError::Truncated);
        }
        let header_len = usize::from(first & 0x0f) * 4;
        if header_len < IPV4_MIN_HEADER {
            return Err(WireError::BadHeaderLength);
        }
        if header_len > b.len() {
            return Err(WireError::Truncated);
        }
        Ok((header_len, usize::from(read_u16(b, 2))))
    }

    pub fn header_len(&self) -> usize {
        self.header_len
    }

    pub fn protocol(&self) -> u8 {
        self.buf.as_ref()[9]
    }

    pub fn src(&self) -> u32 {
        read_u32(self.buf.as_ref(), 12)
    }

    pub fn dst(&self) -> u32 {
        read_u32(self.buf.as_ref(), 16)
    }

    pub fn checksum(&self) -> u16 {
        read_u16(self.buf.as_ref(), 10)
    }

    /// A fragment (more to come, or not the first): no whole L4 header to
    /// translate by.
    pub fn is_fragment(&self) -> bool {
        read_u16(self.buf.as_ref(), 6) & 0x3fff != 0
    }

    pub fn payload(&self) -> &[u8] {
        &self.buf.as_ref()[self.header_len..self.end]
    }

    /// The packet's bytes, header and payload.
    pub fn bytes(&self) -> &[u8] {
        &self.buf.as_ref()[..self.end]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    pub fn set_src(&mut self, addr: u32) {
        write_u32(self.buf.as_mut(), 12, addr);
    }

    pub fn set_dst(&mut self, addr: u32) {
        write_u32(self.buf.as_mut(), 16, addr);
    }

    pub fn set_checksum(&mut self, value: u16) {
        write_u16(self.buf.as_mut(), 10, value);
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let (start, end) = (self.header_len, self.end);
        &mut self.buf.as_mut()[start..end]
    }
}

/// TCP control flags the state machine looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;

    pub fn fin(self) -> bool {
        self.0 & Self::FIN != 0
    }
    pub fn syn(self) -> bool {
        self.0 & Self::SYN != 0
    }
    pub fn rst(self) -> bool {
        self.0 & Self::RST != 0
    }
    pub fn ack(self) -> bool {
        self.0 & Self::ACK != 0
    }
}

/// The parts of a TCP or UDP header the engine needs, read from a checked
/// segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transport {
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP only; zero for UDP.
    pub flags: TcpFlags,
}

impl Transport {
    /// Reads a whole TCP or UDP header from the start of `segment`.
    pub fn parse(protocol: u8, segment: &[u8]) -> Result<Self, WireError> {
        let ports = |s: &[u8]| (read_u16(s, 0), read_u16(s, 2));
        match protocol {
            PROTO_TCP => {
                if segment.len() < TCP_MIN_HEADER {
                    return Err(WireError::Truncated);
                }
                let data_offset = usize::from(segment[12] >> 4) * 4;
                if data_offset < TCP_MIN_HEADER {
                    return Err(WireError::BadHeaderLength);
                }
                if data_offset > segment.len() {
                    return Err(WireError::Truncated);
                }
                let (src_port, dst_port) = ports(segment);
                Ok(Transport {
                    src_port,
                    dst_port,
                    flags: TcpFlags(segment[13]),
                })
            }
            _ => {
                if segment.len() < UDP_HEADER {
                    return Err(WireError::Truncated);
                }
                let (src_port, dst_port) = ports(segment);
                Ok(Transport {
                    src_port,
                    dst_port,
                    flags: TcpFlags::default(),
                })
            }
        }
    }
}

/// Where a protocol's checksum lives, if the first `len` bytes hold it.
pub fn l4_checksum_at(protocol: u8, len: usize) -> Option<usize> {
    let at = match protocol {
        PROTO_TCP => TCP_CHECKSUM_AT,
        PROTO_UDP => UDP_CHECKSUM_AT,
        PROTO_ICMP => ICMP_CHECKSUM_AT,
        _ => return None,
    };
    (at + 2 <= len).then_some(at)
}

/// True for the ICMP types that quote the packet they are about.
pub fn is_icmp_error(icmp_type: u8) -> bool {
    matches!(
        icmp_type,
        ICMP_DEST_UNREACHABLE | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM
    )
}
