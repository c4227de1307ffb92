//! An owner's records as the builder keeps them between updates: one
//! byte string per owner, names written relative to the owner's name.
//! Decoded (to `StoredRec`s with shared wire names) only while the
//! builder re-encodes names, so the records of a Service cost about
//! their encoded size rather than a record struct and a name allocation
//! each.
//!
//! Each record: `[name][type: 1][data]`. A name is `0` (the owner's
//! name), `3` (the previous record's name), `1 [len] [labels]` (labels
//! prepended to the owner's name) or `2 [len] [wire name]` (a name
//! elsewhere: a PTR name, a target outside the owner). Data: A 4 bytes,
//! AAAA 16, CNAME/PTR/NS a name, SRV priority, weight and port (2 bytes
//! each) then a name, TXT `[len: 2][text]`, SOA nothing.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use super::{Stored, StoredRec, WireName};
use crate::wire;

const ROOT: u8 = 0;
const BELOW: u8 = 1;
const ELSEWHERE: u8 = 2;
const SAME: u8 = 3;

const A: u8 = 0;
const AAAA: u8 = 1;
const CNAME: u8 = 2;
const PTR: u8 = 3;
const SRV: u8 = 4;
const TXT: u8 = 5;
const NS: u8 = 6;
const SOA: u8 = 7;

/// `records` (sorted, all with names at or below `root` or outside the
/// zone) packed. A TXT longer than 65535 bytes is cut there.
pub(super) fn pack(root: &[u8], records: &[StoredRec]) -> Box<[u8]> {
    let mut out = Vec::new();
    let mut last: Option<&WireName> = None;
    for rec in records {
        if last == Some(&rec.name) {
            out.push(SAME);
        } else {
            put_name(&mut out, root, &rec.name);
        }
        last = Some(&rec.name);
        match &rec.data {
            Stored::A(ip) => {
                out.push(A);
                out.extend_from_slice(&ip.octets());
            }
            Stored::Aaaa(ip) => {
                out.push(AAAA);
                out.extend_from_slice(&ip.octets());
            }
            Stored::Cname(t) => {
                out.push(CNAME);
                put_name(&mut out, root, t);
            }
            Stored::Ptr(t) => {
                out.push(PTR);
                put_name(&mut out, root, t);
            }
            Stored::Srv {
                priority,
                weight,
                port,
                target,
            } => {
                out.push(SRV);
                out.extend_from_slice(&priority.to_be_bytes());
                out.extend_from_slice(&weight.to_be_bytes());
                out.extend_from_slice(&port.to_be_bytes());
                put_name(&mut out, root, target);
            }
            Stored::Txt(text) => {
                out.push(TXT);
                let text = &text.as_bytes()[..text.len().min(usize::from(u16::MAX))];
                out.extend_from_slice(&(text.len() as u16).to_be_bytes());
                out.extend_from_slice(text);
            }
            Stored::Ns(t) => {
                out.push(NS);
                put_name(&mut out, root, t);
            }
            Stored::Soa => out.push(SOA),
        }
    }
    out.into_boxed_slice()
}

/// The records `pack` packed for `root`, in the same order, with names
/// equal to `root` sharing its allocation. `None` if `packed` is not
/// something `pack` wrote.
pub(super) fn unpack(root: &WireName, packed: &[u8]) -> Option<Vec<StoredRec>> {
    let mut out: Vec<StoredRec> = Vec::new();
    let mut at = packed;
    while !at.is_empty() {
        let name = if at[0] == SAME {
            at = &at[1..];
            out.last()?.name.clone()
        } else {
            take_name(&mut at, root)?
        };
        let (&kind, rest) = at.split_first()?;
        at = rest;
        let data = match kind {
            A => Stored::A(Ipv4Addr::from(take::<4>(&mut at)?)),
            AAAA => Stored::Aaaa(Ipv6Addr::from(take::<16>(&mut at)?)),
            CNAME => Stored::Cname(take_name(&mut at, root)?),
            PTR => Stored::Ptr(take_name(&mut at, root)?),
            SRV => {
                let [p0, p1, w0, w1, n0, n1] = take::<6>(&mut at)?;
                Stored::Srv {
                    priority: u16::from_be_bytes([p0, p1]),
                    weight: u16::from_be_bytes([w0, w1]),
                    port: u16::from_be_bytes([n0, n1]),
                    target: take_name(&mut at, root)?,
                }
            }
            TXT => {
                let len = usize::from(u16::from_be_bytes(take::<2>(&mut at)?));
                let text = at.get(..len)?;
                at = &at[len..];
                Stored::Txt(std::str::from_utf8(text).ok()?.into())
            }
            NS => Stored::Ns(take_name(&mut at, root)?),
            SOA => Stored::Soa,
            _ => return None,
        };
        out.push(StoredRec { name, data });
    }
    Some(out)
}

fn put_name(out: &mut Vec<u8>, root: &[u8], name: &[u8]) {
    if name == root {
        out.push(ROOT);
    } else if name.len() > root.len() && wire::is_subdomain(name, root) {
        let labels = &name[..name.len() - root.len()];
        out.push(BELOW);
        out.push(labels.len() as u8);
        out.extend_from_slice(labels);
    } else {
        out.push(ELSEWHERE);
        out.push(name.len().min(usize::from(u8::MAX)) as u8);
        out.extend_from_slice(&name[..name.len().min(usize::from(u8::MAX))]);
    }
}

fn take_name(at: &mut &[u8], root: &WireName) -> Option<WireName> {
    let (&kind, rest) = at.split_first()?;
    *at = rest;
    match kind {
        ROOT => Some(root.clone()),
        BELOW | ELSEWHERE => {
            let (&len, rest) = at.split_first()?;
            let bytes = rest.get(..usize::from(len))?;
            *at = &rest[usize::from(len)..];
            if kind == ELSEWHERE {
                return Some(bytes.into());
            }
            let mut name = Vec::with_capacity(bytes.len() + root.len());
            name.extend_from_slice(bytes);
            name.extend_from_slice(root);
            Some(Arc::from(name))
        }
        _ => None,
    }
}

fn take<const N: usize>(at: &mut &[u8]) -> Option<[u8; N]> {
    let bytes: [u8; N] = at.get(..N)?.try_into().ok()?;
    *at = &at[N..];
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn name(dotted: &str) -> WireName {
        wire::encode_name(dotted).unwrap().into()
    }

    #[test]
    fn every_kind_of_record_comes_back() {
        let root = name("web.default.svc.cluster.local");
        let host = name("web-0.web.default.svc.cluster.local");
        let srv = name("_http._tcp.web.default.svc.cluster.local");
        let ptr = name("5.0.42.10.in-addr.arpa");
        let other = name("db.other.svc.cluster.local");
        let mut records = vec![
            StoredRec {
                name: root.clone(),
                data: Stored::A("10.42.0.5".parse().unwrap()),
            },
            StoredRec {
                name: root.clone(),
                data: Stored::A("10.42.0.6".parse().unwrap()),
            },
            StoredRec {
                name: root.clone(),
                data: Stored::Aaaa("fd00::5".parse().unwrap()),
            },
            StoredRec {
                name: root.clone(),
                data: Stored::Cname(other.clone()),
            },
            StoredRec {
                name: host.clone(),
                data: Stored::A("10.42.0.5".parse().unwrap()),
            },
            StoredRec {
                name: srv.clone(),
                data: Stored::Srv {
                    priority: 0,
                    weight: 50,
                    port: 8080,
                    target: host.clone(),
                },
            },
            StoredRec {
                name: ptr.clone(),
                data: Stored::Ptr(host.clone()),
            },
            StoredRec {
                name: root.clone(),
                data: Stored::Txt("1.1.0".into()),
            },
            StoredRec {
                name: root.clone(),
                data: Stored::Ns(other),
            },
            StoredRec {
                name: root.clone(),
                data: Stored::Soa,
            },
        ];
        records.sort();
        let packed = pack(&root, &records);
        let back = unpack(&root, &packed).unwrap();
        assert_eq!(back, records);
        // Names equal to the owner's share its allocation.
        assert!(
            back.iter()
                .filter(|r| r.name == root)
                .all(|r| Arc::ptr_eq(&r.name, &root))
        );
        assert_eq!(unpack(&root, &[]).unwrap(), Vec::new());
    }

    #[test]
    fn a_cluster_ip_service_packs_small() {
        let root = name("svc-1.default.svc.cluster.local");
        let mut records = vec![
            StoredRec {
                name: root.clone(),
                data: Stored::A("10.43.0.1".parse().unwrap()),
            },
            StoredRec {
                name: name("_http._tcp.svc-1.default.svc.cluster.local"),
                data: Stored::Srv {
                    priority: 0,
                    weight: 100,
                    port: 80,
                    target: root.clone(),
                },
            },
            StoredRec {
                name: name("1.0.43.10.in-addr.arpa"),
                data: Stored::Ptr(root.clone()),
            },
        ];
        records.sort();
        assert!(pack(&root, &records).len() <= 64);
    }

    proptest! {
        #[test]
        fn any_bytes_unpack_without_panicking(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let root = name("web.default.svc.cluster.local");
            let _ = unpack(&root, &bytes);
        }
    }
}
