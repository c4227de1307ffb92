//! Reading the kernel's connections to Services back from
//! `/proc/net/nf_conntrack`, in the engine's `conntrack -L` line shape.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use crate::service::{Protocol, ServiceKey};

/// The connections in `table` (`/proc/net/nf_conntrack`) whose original
/// destination is a Service frontend in `frontends`.
pub fn service_flows(table: &str, frontends: &HashMap<(Ipv4Addr, u16, u8), ServiceKey>) -> String {
    let mut out = String::new();
    for line in table.lines() {
        let Some(flow) = Flow::parse(line) else {
            continue;
        };
        let Some(key) = frontends.get(&(flow.original.1, flow.original.3, flow.protocol.number()))
        else {
            continue;
        };
        let (o, r) = (flow.original, flow.reply);
        let _ = writeln!(
            out,
            "{} {} {} src={} dst={} sport={} dport={} src={} dst={} sport={} dport={} service={key}",
            flow.protocol, flow.expires, flow.state, o.0, o.1, o.2, o.3, r.0, r.1, r.2, r.3
        );
    }
    out
}

/// One conntrack line's fields that matter here.
struct Flow<'a> {
    protocol: Protocol,
    expires: u64,
    /// TCP state; `-` for UDP.
    state: &'a str,
    /// src, dst, sport, dport.
    original: (Ipv4Addr, Ipv4Addr, u16, u16),
    reply: (Ipv4Addr, Ipv4Addr, u16, u16),
}

impl<'a> Flow<'a> {
    /// `ipv4 2 tcp 6 431999 ESTABLISHED src=… dst=… sport=… dport=… src=…`
    fn parse(line: &'a str) -> Option<Self> {
        let mut fields = line.split_whitespace();
        if fields.next()? != "ipv4" {
            return None;
        }
        fields.next()?;
        fields.next()?;
        let protocol = Protocol::from_number(fields.next()?.parse().ok()?)?;
        let expires = fields.next()?.parse().ok()?;
        let mut state = "-";
        let mut values: Vec<&str> = Vec::with_capacity(8);
        for field in fields {
            match field.split_once('=') {
                Some(("src" | "dst" | "sport" | "dport", value)) if values.len() < 8 => {
                    values.push(value)
                }
                Some(_) => {}
                None if values.is_empty() && !field.starts_with('[') => state = field,
                None => {}
            }
        }
        let tuple = |v: &[&str]| -> Option<(Ipv4Addr, Ipv4Addr, u16, u16)> {
            Some((
                v.first()?.parse().ok()?,
                v.get(1)?.parse().ok()?,
                v.get(2)?.parse().ok()?,
                v.get(3)?.parse().ok()?,
            ))
        };
        Some(Flow {
            protocol,
            expires,
            state,
            original: tuple(values.get(..4)?)?,
            reply: tuple(values.get(4..8)?)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_connections_to_service_frontends_are_listed() {
        let table = "\
ipv4     2 tcp      6 431999 ESTABLISHED src=10.42.0.5 dst=10.43.0.20 sport=41000 dport=80 src=10.42.0.7 dst=10.42.0.5 sport=8080 dport=41000 [ASSURED] mark=0 zone=0 use=2
ipv4     2 udp      17 29 src=10.42.0.5 dst=10.43.0.10 sport=5353 dport=53 [UNREPLIED] src=10.42.0.9 dst=10.42.0.5 sport=53 dport=5353 mark=0 zone=0 use=2
ipv4     2 tcp      6 100 ESTABLISHED src=10.42.0.5 dst=10.42.1.3 sport=41001 dport=80 src=10.42.1.3 dst=10.42.0.5 sport=80 dport=41001 [ASSURED] mark=0 zone=0 use=2
ipv6     10 tcp      6 100 ESTABLISHED src=fd00::1 dst=fd00::2 sport=1 dport=2 src=fd00::2 dst=fd00::1 sport=2 dport=1 use=1
garbage
";
        let mut frontends = HashMap::new();
        frontends.insert(
            (Ipv4Addr::new(10, 43, 0, 20), 80, 6),
            ServiceKey::new("default", "web"),
        );
        frontends.insert(
            (Ipv4Addr::new(10, 43, 0, 10), 53, 17),
            ServiceKey::new("kube-system", "kube-dns"),
        );
        assert_eq!(
            service_flows(table, &frontends),
            "tcp 431999 ESTABLISHED src=10.42.0.5 dst=10.43.0.20 sport=41000 dport=80 src=10.42.0.7 dst=10.42.0.5 sport=8080 dport=41000 service=default/web\n\
             udp 29 - src=10.42.0.5 dst=10.43.0.10 sport=5353 dport=53 src=10.42.0.9 dst=10.42.0.5 sport=53 dport=5353 service=kube-system/kube-dns\n"
        );
    }
}
