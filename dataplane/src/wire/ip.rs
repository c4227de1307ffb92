//! Just enough of IPv4 and IPv6 to route an inner packet and to refuse one
//! whose header does not match its length.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::Error;

/// The destination of an IP packet of `len` bytes whose first bytes are
/// `packet` (the rest may lie in other buffers), after checking that its
/// header is whole and its length field matches `len`.
pub fn destination(packet: &[u8], len: usize) -> Result<IpAddr, Error> {
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            if packet.len() < 20 {
                return Err(Error::Truncated);
            }
            let ihl = usize::from(packet[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
            if ihl < 20 || total < ihl || total != len {
                return Err(Error::Malformed);
            }
            let d = &packet[16..20];
            Ok(IpAddr::V4(Ipv4Addr::new(d[0], d[1], d[2], d[3])))
        }
        Some(6) => {
            if packet.len() < 40 {
                return Err(Error::Truncated);
            }
            let payload = usize::from(u16::from_be_bytes([packet[4], packet[5]]));
            if payload + 40 != len {
                return Err(Error::Malformed);
            }
            let mut d = [0u8; 16];
            d.copy_from_slice(&packet[24..40]);
            Ok(IpAddr::V6(Ipv6Addr::from(d)))
        }
        Some(_) => Err(Error::Malformed),
        None => Err(Error::Truncated),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4(total: u16) -> Vec<u8> {
        let mut p = vec![0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p[16..20].copy_from_slice(&[10, 42, 1, 5]);
        p
    }

    #[test]
    fn reads_destinations() {
        assert_eq!(
            destination(&ipv4(28), 28),
            Ok(IpAddr::V4(Ipv4Addr::new(10, 42, 1, 5)))
        );
        let mut v6 = vec![0u8; 48];
        v6[0] = 0x60;
        v6[5] = 8;
        v6[39] = 1;
        assert_eq!(destination(&v6, 48), Ok(IpAddr::V6(Ipv6Addr::LOCALHOST)));
    }

    #[test]
    fn rejects_mismatched_lengths() {
        assert_eq!(destination(&ipv4(60), 28), Err(Error::Malformed));
        assert_eq!(destination(&ipv4(28)[..10], 28), Err(Error::Truncated));
        assert_eq!(destination(&[], 0), Err(Error::Truncated));
        assert_eq!(destination(&[0x50; 30], 30), Err(Error::Malformed));
    }
}
