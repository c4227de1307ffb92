//! The specification's records through the hot path, decoded by an
//! independent decoder (hickory's), plus the protocol's corner cases.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

use crate::answer::{self, Outcome};
use crate::index::Index;
use crate::records::{
    EndpointInfo, PodInfo, PortInfo, ServiceInfo, ServiceKind, SliceInfo, service_records,
};
use crate::wire::{self, Reject};
use crate::zone::{Owner, ZoneBuilder};

pub(crate) fn builder() -> ZoneBuilder {
    let mut b = ZoneBuilder::new(
        "cluster.local",
        5,
        Some("10.43.0.10".parse().unwrap()),
        true,
    )
    .unwrap();
    b.set_ready();
    b
}

fn port(name: &str, proto: &str, port: u16) -> PortInfo {
    PortInfo {
        name: name.into(),
        protocol: proto.into(),
        port,
    }
}

fn cluster_ip(ips: &[&str]) -> ServiceInfo {
    ServiceInfo {
        kind: ServiceKind::ClusterIp(ips.iter().map(|i| i.parse().unwrap()).collect()),
        ports: vec![port("http", "tcp", 80)],
        publish_not_ready: false,
    }
}

fn endpoint(ip: &str, hostname: Option<&str>, ready: bool) -> EndpointInfo {
    EndpointInfo {
        addresses: vec![ip.parse().unwrap()],
        hostname: hostname.map(Into::into),
        ready,
    }
}

pub(crate) fn add_service(
    b: &mut ZoneBuilder,
    ns: &str,
    name: &str,
    svc: &ServiceInfo,
    slices: &[SliceInfo],
    pods: &[PodInfo],
) {
    let records = service_records(b.apex(), ns, name, svc, slices.iter(), pods.iter());
    b.set_owner(Owner::Service(ns.into(), name.into()), records);
}

pub(crate) fn query(name: &str, rtype: RecordType, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message::new(0xbeef, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

fn ask_raw(index: &Index, packet: &[u8], udp: bool) -> Option<Vec<u8>> {
    let mut out = vec![0u8; 65535];
    match answer::answer(packet, &mut out, index, udp) {
        Outcome::Reply { len, .. } => Some(out[..len].to_vec()),
        _ => None,
    }
}

fn ask(index: &Index, name: &str, rtype: RecordType) -> Message {
    ask_with(index, name, rtype, None, true)
}

fn ask_with(index: &Index, name: &str, rtype: RecordType, edns: Option<u16>, udp: bool) -> Message {
    let bytes =
        ask_raw(index, &query(name, rtype, edns), udp).expect("an answer from the fast path");
    let m = Message::from_vec(&bytes).expect("a well-formed answer");
    assert_eq!(m.metadata.id, 0xbeef);
    assert_eq!(m.metadata.message_type, MessageType::Response);
    assert!(m.metadata.recursion_desired, "RD is copied from the query");
    m
}

fn addrs(m: &Message) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = m
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn assert_negative(m: &Message, rcode: ResponseCode) {
    assert_eq!(m.metadata.response_code, rcode);
    assert!(m.answers.is_empty());
    assert!(m.metadata.authoritative);
    let soa = m
        .authorities
        .first()
        .expect("an SOA in the authority section");
    assert!(matches!(soa.data, RData::SOA(_)));
    assert_eq!(soa.name, Name::from_ascii("cluster.local.").unwrap());
    assert_eq!(soa.ttl, 5);
}

#[test]
fn schema_version_txt() {
    let index = builder().build();
    let m = ask(&index, "dns-version.cluster.local.", RecordType::TXT);
    let RData::TXT(txt) = &m.answers[0].data else {
        panic!("not TXT: {m:?}");
    };
    assert_eq!(&*txt.txt_data[0], b"1.1.0");
}

#[test]
fn cluster_ip_service_a_aaaa_srv_ptr() {
    let mut b = builder();
    add_service(
        &mut b,
        "default",
        "web",
        &cluster_ip(&["10.43.0.20", "fd00::20"]),
        &[],
        &[],
    );
    add_service(
        &mut b,
        "default",
        "v4only",
        &cluster_ip(&["10.43.0.21"]),
        &[],
        &[],
    );
    let index = b.build();

    let m = ask(&index, "web.default.svc.cluster.local.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(addrs(&m), vec![ip("10.43.0.20")]);
    assert_eq!(m.answers[0].ttl, 5);
    let m = ask(&index, "web.default.svc.cluster.local.", RecordType::AAAA);
    assert_eq!(addrs(&m), vec![ip("fd00::20")]);

    let m = ask(
        &index,
        "_http._tcp.web.default.svc.cluster.local.",
        RecordType::SRV,
    );
    let RData::SRV(srv) = &m.answers[0].data else {
        panic!("not SRV: {m:?}");
    };
    assert_eq!(srv.port, 80);
    assert_eq!(
        srv.target,
        Name::from_ascii("web.default.svc.cluster.local.").unwrap()
    );
    assert_eq!(m.additionals.len(), 2, "the target's A and AAAA ride along");

    let m = ask(&index, "20.0.43.10.in-addr.arpa.", RecordType::PTR);
    let RData::PTR(ptr) = &m.answers[0].data else {
        panic!("not PTR: {m:?}");
    };
    assert_eq!(
        ptr.0,
        Name::from_ascii("web.default.svc.cluster.local.").unwrap()
    );
    let v6 = Name::from(ip("fd00::20"));
    let m = ask(&index, &v6.to_string(), RecordType::PTR);
    assert_eq!(m.answers.len(), 1);

    // NODATA: the name exists, the type does not.
    let m = ask(
        &index,
        "v4only.default.svc.cluster.local.",
        RecordType::AAAA,
    );
    assert_negative(&m, ResponseCode::NoError);
    // Unnamed or wrong-protocol ports have no SRV.
    let m = ask(
        &index,
        "_http._udp.web.default.svc.cluster.local.",
        RecordType::SRV,
    );
    assert_negative(&m, ResponseCode::NXDomain);
}

#[test]
fn headless_service_follows_ready_endpoints() {
    let mut b = builder();
    let headless = ServiceInfo {
        kind: ServiceKind::Headless,
        ports: vec![],
        publish_not_ready: false,
    };
    let slice = SliceInfo {
        service: "db".into(),
        ports: vec![port("pg", "tcp", 5432)],
        endpoints: vec![
            endpoint("10.42.0.5", Some("db-0"), true),
            endpoint("10.42.0.6", Some("db-1"), true),
            endpoint("10.42.0.7", None, true),
            endpoint("10.42.0.8", Some("db-3"), false),
        ],
    };
    add_service(
        &mut b,
        "prod",
        "db",
        &headless,
        std::slice::from_ref(&slice),
        &[],
    );
    let index = b.build();

    let m = ask(&index, "db.prod.svc.cluster.local.", RecordType::A);
    assert_eq!(
        addrs(&m),
        vec![ip("10.42.0.5"), ip("10.42.0.6"), ip("10.42.0.7")]
    );
    let m = ask(&index, "db-1.db.prod.svc.cluster.local.", RecordType::A);
    assert_eq!(addrs(&m), vec![ip("10.42.0.6")]);
    // No hostname: a system-assigned one, the dashed address.
    let m = ask(
        &index,
        "10-42-0-7.db.prod.svc.cluster.local.",
        RecordType::A,
    );
    assert_eq!(addrs(&m), vec![ip("10.42.0.7")]);
    // Not ready: absent.
    let m = ask(&index, "db-3.db.prod.svc.cluster.local.", RecordType::A);
    assert_negative(&m, ResponseCode::NXDomain);

    let m = ask(
        &index,
        "_pg._tcp.db.prod.svc.cluster.local.",
        RecordType::SRV,
    );
    let mut targets: Vec<String> = m
        .answers
        .iter()
        .map(|r| match &r.data {
            RData::SRV(s) => format!("{} {}", s.port, s.target),
            other => panic!("not SRV: {other:?}"),
        })
        .collect();
    targets.sort();
    assert_eq!(
        targets,
        vec![
            "5432 10-42-0-7.db.prod.svc.cluster.local.",
            "5432 db-0.db.prod.svc.cluster.local.",
            "5432 db-1.db.prod.svc.cluster.local.",
        ]
    );
    assert_eq!(m.additionals.len(), 3);

    let m = ask(&index, "5.0.42.10.in-addr.arpa.", RecordType::PTR);
    let RData::PTR(ptr) = &m.answers[0].data else {
        panic!("not PTR");
    };
    assert_eq!(ptr.0.to_string(), "db-0.db.prod.svc.cluster.local.");

    // No ready endpoint: NXDOMAIN, unless not-ready ones are published.
    let none_ready = SliceInfo {
        endpoints: vec![endpoint("10.42.0.8", Some("db-3"), false)],
        ..slice
    };
    add_service(
        &mut b,
        "prod",
        "db",
        &headless,
        std::slice::from_ref(&none_ready),
        &[],
    );
    let index = b.build();
    assert_negative(
        &ask(&index, "db.prod.svc.cluster.local.", RecordType::A),
        ResponseCode::NXDomain,
    );
    let publish = ServiceInfo {
        publish_not_ready: true,
        ..headless
    };
    add_service(&mut b, "prod", "db", &publish, &[none_ready], &[]);
    let index = b.build();
    assert_eq!(
        addrs(&ask(&index, "db.prod.svc.cluster.local.", RecordType::A)),
        vec![ip("10.42.0.8")]
    );
}

#[test]
fn pods_with_hostname_and_subdomain() {
    let mut b = builder();
    let headless = ServiceInfo {
        kind: ServiceKind::Headless,
        ports: vec![],
        publish_not_ready: false,
    };
    let pods = [
        PodInfo {
            hostname: "busybox-1".into(),
            subdomain: "sub".into(),
            ips: vec![ip("10.42.1.9")],
            ready: true,
        },
        PodInfo {
            hostname: "busybox-2".into(),
            subdomain: "sub".into(),
            ips: vec![ip("10.42.1.10")],
            ready: false,
        },
    ];
    add_service(&mut b, "default", "sub", &headless, &[], &pods);
    let index = b.build();
    let m = ask(
        &index,
        "busybox-1.sub.default.svc.cluster.local.",
        RecordType::A,
    );
    assert_eq!(addrs(&m), vec![ip("10.42.1.9")]);
    let m = ask(
        &index,
        "busybox-2.sub.default.svc.cluster.local.",
        RecordType::A,
    );
    assert_negative(&m, ResponseCode::NXDomain);
}

fn external(target: &str) -> ServiceInfo {
    ServiceInfo {
        kind: ServiceKind::ExternalName(target.into()),
        ports: vec![],
        publish_not_ready: false,
    }
}

fn cname_targets(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::CNAME(t) => Some(format!("{} -> {}", r.name, t.0)),
            _ => None,
        })
        .collect()
}

#[test]
fn external_name_is_a_cname_for_every_type() {
    let mut b = builder();
    add_service(
        &mut b,
        "default",
        "ext",
        &external("www.Example.com"),
        &[],
        &[],
    );
    let index = b.build();
    for rtype in [RecordType::CNAME, RecordType::MX, RecordType::TXT] {
        let m = ask(&index, "ext.default.svc.cluster.local.", rtype);
        assert_eq!(m.answers.len(), 1, "{rtype}");
        assert_eq!(
            cname_targets(&m),
            vec!["ext.default.svc.cluster.local. -> www.example.com."]
        );
    }
    // Addresses of an outside target come from upstream: the slow path.
    let mut out = vec![0u8; 65535];
    for rtype in [RecordType::A, RecordType::AAAA] {
        let q = query("ext.default.svc.cluster.local.", rtype, None);
        assert_eq!(
            answer::answer(&q, &mut out, &index, true),
            Outcome::Slow,
            "{rtype}"
        );
        let Outcome::Reply { len, .. } = answer::answer_local(&q, &mut out, &index, true) else {
            panic!("answer_local answers an ExternalName");
        };
        let m = Message::from_vec(&out[..len]).unwrap();
        assert_eq!(
            cname_targets(&m),
            vec!["ext.default.svc.cluster.local. -> www.example.com."]
        );
    }
    // Without forwarding there is no upstream to ask: the CNAME alone.
    let mut b = ZoneBuilder::new("cluster.local", 5, None, false).unwrap();
    b.set_ready();
    add_service(
        &mut b,
        "default",
        "ext",
        &external("www.example.com"),
        &[],
        &[],
    );
    let index = b.build();
    let m = ask(&index, "ext.default.svc.cluster.local.", RecordType::A);
    assert_eq!(m.answers.len(), 1);
    assert_eq!(
        cname_targets(&m),
        vec!["ext.default.svc.cluster.local. -> www.example.com."]
    );
}

#[test]
fn external_name_to_a_cluster_name_carries_its_addresses() {
    let mut b = builder();
    add_service(
        &mut b,
        "default",
        "web",
        &cluster_ip(&["10.43.1.5", "fd00::5"]),
        &[],
        &[],
    );
    let to_web = external("web.default.svc.cluster.local");
    add_service(&mut b, "other", "alias", &to_web, &[], &[]);
    let index = b.build();
    let m = ask(&index, "alias.other.svc.cluster.local.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(
        cname_targets(&m),
        vec!["alias.other.svc.cluster.local. -> web.default.svc.cluster.local."]
    );
    assert_eq!(addrs(&m), vec![ip("10.43.1.5")]);
    assert_eq!(
        m.answers[1].name,
        Name::from_ascii("web.default.svc.cluster.local.").unwrap()
    );
    let m = ask(&index, "alias.other.svc.cluster.local.", RecordType::AAAA);
    assert_eq!(addrs(&m), vec![ip("fd00::5")]);
    // Other types: the CNAME only.
    let m = ask(&index, "alias.other.svc.cluster.local.", RecordType::TXT);
    assert_eq!(m.answers.len(), 1);

    // A chain of two aliases ends at the same addresses.
    let to_alias = external("alias.other.svc.cluster.local");
    add_service(&mut b, "default", "chain", &to_alias, &[], &[]);
    let index = b.build();
    let m = ask(&index, "chain.default.svc.cluster.local.", RecordType::A);
    assert_eq!(
        cname_targets(&m),
        vec![
            "chain.default.svc.cluster.local. -> alias.other.svc.cluster.local.",
            "alias.other.svc.cluster.local. -> web.default.svc.cluster.local.",
        ]
    );
    assert_eq!(addrs(&m), vec![ip("10.43.1.5")]);

    // The target's change reaches both aliases without touching them.
    add_service(
        &mut b,
        "default",
        "web",
        &cluster_ip(&["10.43.1.6"]),
        &[],
        &[],
    );
    let index = b.build();
    for alias in ["alias.other", "chain.default"] {
        let m = ask(
            &index,
            &format!("{alias}.svc.cluster.local."),
            RecordType::A,
        );
        assert_eq!(addrs(&m), vec![ip("10.43.1.6")], "{alias}");
    }
    // The target gone: the CNAMEs remain, with no address.
    b.set_owner(Owner::Service("default".into(), "web".into()), vec![]);
    let index = b.build();
    let m = ask(&index, "chain.default.svc.cluster.local.", RecordType::A);
    assert_eq!(cname_targets(&m).len(), 2);
    assert!(addrs(&m).is_empty());
    // And back again.
    add_service(
        &mut b,
        "default",
        "web",
        &cluster_ip(&["10.43.1.7"]),
        &[],
        &[],
    );
    let index = b.build();
    let m = ask(&index, "chain.default.svc.cluster.local.", RecordType::A);
    assert_eq!(addrs(&m), vec![ip("10.43.1.7")]);
    // Removing an alias removes its answers.
    b.set_owner(Owner::Service("default".into(), "chain".into()), vec![]);
    let index = b.build();
    assert_negative(
        &ask(&index, "chain.default.svc.cluster.local.", RecordType::A),
        ResponseCode::NXDomain,
    );
}

#[test]
fn external_name_loops_end() {
    let mut b = builder();
    add_service(
        &mut b,
        "default",
        "a",
        &external("b.default.svc.cluster.local"),
        &[],
        &[],
    );
    add_service(
        &mut b,
        "default",
        "b",
        &external("a.default.svc.cluster.local"),
        &[],
        &[],
    );
    let index = b.build();
    let m = ask(&index, "a.default.svc.cluster.local.", RecordType::A);
    assert!(!m.answers.is_empty());
    assert!(
        m.answers.len() <= 9,
        "the chain is bounded: {}",
        m.answers.len()
    );
    assert!(addrs(&m).is_empty());
}

#[test]
fn pod_a_records_from_the_name() {
    let index = builder().build();
    let m = ask(
        &index,
        "10-42-0-9.default.pod.cluster.local.",
        RecordType::A,
    );
    assert_eq!(addrs(&m), vec![ip("10.42.0.9")]);
    assert!(m.metadata.authoritative);
    let m = ask(
        &index,
        "fd00--9.default.pod.cluster.local.",
        RecordType::AAAA,
    );
    assert_eq!(
        addrs(&m),
        vec![IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 9))]
    );
    let m = ask(
        &index,
        "10-42-0-9.default.pod.cluster.local.",
        RecordType::AAAA,
    );
    assert_negative(&m, ResponseCode::NoError);
    for bad in [
        "10-42-0-999.default.pod.cluster.local.",
        "not-an-ip.default.pod.cluster.local.",
        "10-42-0-9.pod.cluster.local.",
        "10-42-0-9.x.default.pod.cluster.local.",
    ] {
        assert_negative(&ask(&index, bad, RecordType::A), ResponseCode::NXDomain);
    }
    // With EDNS, the OPT record follows the answer.
    let m = ask_with(
        &index,
        "10-42-0-9.default.pod.cluster.local.",
        RecordType::A,
        Some(1232),
        true,
    );
    assert_eq!(addrs(&m), vec![ip("10.42.0.9")]);
    assert!(m.edns.is_some());
}

#[test]
fn nxdomain_versus_nodata() {
    let mut b = builder();
    add_service(
        &mut b,
        "default",
        "web",
        &cluster_ip(&["10.43.0.20"]),
        &[],
        &[],
    );
    let index = b.build();
    // Empty non-terminals exist: NODATA.
    for ent in [
        "default.svc.cluster.local.",
        "svc.cluster.local.",
        "_tcp.web.default.svc.cluster.local.",
    ] {
        assert_negative(&ask(&index, ent, RecordType::A), ResponseCode::NoError);
    }
    // Search-path guesses under the zone: cheap NXDOMAIN.
    for name in [
        "nope.default.svc.cluster.local.",
        "example.com.default.svc.cluster.local.",
        "web.default.svc.cluster.local.cluster.local.",
        "other.svc.cluster.local.",
    ] {
        assert_negative(&ask(&index, name, RecordType::A), ResponseCode::NXDomain);
    }
    let m = ask(&index, "cluster.local.", RecordType::SOA);
    assert!(matches!(m.answers[0].data, RData::SOA(_)));
    let m = ask(&index, "cluster.local.", RecordType::NS);
    assert_eq!(m.answers.len(), 1);
    let m = ask(&index, "ns.dns.cluster.local.", RecordType::A);
    assert_eq!(addrs(&m), vec![ip("10.43.0.10")]);
}

#[test]
fn deletion_removes_names_and_empty_parents() {
    let mut b = builder();
    add_service(
        &mut b,
        "team",
        "web",
        &cluster_ip(&["10.43.0.20"]),
        &[],
        &[],
    );
    let before = b.build();
    assert_eq!(
        addrs(&ask(&before, "web.team.svc.cluster.local.", RecordType::A)),
        vec![ip("10.43.0.20")]
    );
    b.set_owner(Owner::Service("team".into(), "web".into()), Vec::new());
    let after = b.build();
    for name in [
        "web.team.svc.cluster.local.",
        "team.svc.cluster.local.",
        "20.0.43.10.in-addr.arpa.",
    ] {
        let m = ask_raw(&after, &query(name, RecordType::A, None), true);
        if let Some(m) = m {
            let m = Message::from_vec(&m).unwrap();
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
        }
    }
    assert_negative(
        &ask(&after, "svc.cluster.local.", RecordType::A),
        ResponseCode::NoError,
    );
    // The old snapshot still answers as it did: readers are never disturbed.
    assert_eq!(
        addrs(&ask(&before, "web.team.svc.cluster.local.", RecordType::A)),
        vec![ip("10.43.0.20")]
    );
}

#[test]
fn an_update_copies_only_the_shards_it_touches() {
    let mut b = builder();
    for i in 0..500 {
        add_service(
            &mut b,
            "default",
            &format!("svc-{i}"),
            &cluster_ip(&[&format!("10.43.{}.{}", i / 200, i % 200 + 1)]),
            &[],
            &[],
        );
    }
    let first = b.build();
    add_service(
        &mut b,
        "default",
        "svc-7",
        &cluster_ip(&["10.43.9.9"]),
        &[],
        &[],
    );
    let second = b.build();
    let shared = first
        .shards
        .iter()
        .zip(&second.shards)
        .filter(|(a, b)| a.ptr_eq(b))
        .count();
    let mut changed = Vec::new();
    for (a, b) in first.shards.iter().zip(&second.shards) {
        for (k, v) in b.iter() {
            if a.get(k) != Some(v) {
                changed.push(String::from_utf8_lossy(k).into_owned());
            }
        }
        for k in a.keys() {
            if !b.contains_key(k) {
                changed.push(format!("-{}", String::from_utf8_lossy(k)));
            }
        }
    }
    assert!(
        shared >= crate::index::SHARDS - 6,
        "only {shared} shards shared: {changed:?}"
    );
    assert_eq!(
        addrs(&ask(
            &second,
            "svc-7.default.svc.cluster.local.",
            RecordType::A
        )),
        vec![ip("10.43.9.9")]
    );
    assert_eq!(
        addrs(&ask(
            &first,
            "svc-7.default.svc.cluster.local.",
            RecordType::A
        )),
        vec![ip("10.43.0.8")]
    );
}

#[test]
fn case_insensitive_and_question_case_preserved() {
    let mut b = builder();
    add_service(
        &mut b,
        "default",
        "web",
        &cluster_ip(&["10.43.0.20"]),
        &[],
        &[],
    );
    let index = b.build();
    let m = ask(&index, "WeB.DeFault.SVC.Cluster.Local.", RecordType::A);
    assert_eq!(addrs(&m), vec![ip("10.43.0.20")]);
    assert_eq!(
        m.queries[0].name().to_string(),
        "WeB.DeFault.SVC.Cluster.Local."
    );
    let m = ask(&index, "NOPE.DeFault.SVC.Cluster.Local.", RecordType::A);
    assert_negative(&m, ResponseCode::NXDomain);
}

fn big_headless(b: &mut ZoneBuilder, n: usize) {
    let headless = ServiceInfo {
        kind: ServiceKind::Headless,
        ports: vec![],
        publish_not_ready: false,
    };
    let slice = SliceInfo {
        service: "big".into(),
        ports: vec![],
        endpoints: (0..n)
            .map(|i| endpoint(&format!("10.42.{}.{}", i / 250, i % 250 + 1), None, true))
            .collect(),
    };
    add_service(b, "default", "big", &headless, &[slice], &[]);
}

#[test]
fn truncation_over_udp_full_answer_over_tcp() {
    let mut b = builder();
    big_headless(&mut b, 100);
    let index = b.build();
    let name = "big.default.svc.cluster.local.";
    // 100 A records: 16 bytes each compressed, over 512 and over 1232.
    let m = ask_with(&index, name, RecordType::A, None, true);
    assert!(m.metadata.truncation);
    assert!(m.answers.is_empty());
    let m = ask_with(&index, name, RecordType::A, Some(4096), true);
    assert!(m.metadata.truncation);
    assert!(m.edns.is_some(), "the OPT record survives truncation");
    let m = ask_with(&index, name, RecordType::A, None, false);
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 100);
    // 40 records fit a 1232-byte EDNS answer but not 512 bytes.
    let mut b = builder();
    big_headless(&mut b, 40);
    let index = b.build();
    assert!(
        ask_with(&index, name, RecordType::A, None, true)
            .metadata
            .truncation
    );
    let m = ask_with(&index, name, RecordType::A, Some(1232), true);
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 40);
    assert_eq!(
        m.edns.as_ref().map(|e| e.max_payload()),
        Some(wire::MAX_UDP_PAYLOAD)
    );
}

#[test]
fn answers_are_compressed() {
    let mut b = builder();
    big_headless(&mut b, 20);
    let index = b.build();
    let bytes = ask_raw(
        &index,
        &query("big.default.svc.cluster.local.", RecordType::A, None),
        true,
    )
    .unwrap();
    let question_end = wire::HEADER_LEN + "big.default.svc.cluster.local.".len() + 1 + 4;
    // Each record: a 2-byte pointer to the question, type, class, TTL,
    // length and 4 bytes of address.
    assert_eq!(bytes.len(), question_end + 20 * 16);
    assert_eq!(&bytes[question_end..question_end + 2], &[0xc0, 12]);
}

#[test]
fn any_and_transfers_are_refused() {
    let mut b = builder();
    add_service(
        &mut b,
        "default",
        "web",
        &cluster_ip(&["10.43.0.20"]),
        &[],
        &[],
    );
    let index = b.build();
    for rtype in [RecordType::ANY, RecordType::AXFR, RecordType::IXFR] {
        let m = ask(&index, "web.default.svc.cluster.local.", rtype);
        assert_eq!(m.metadata.response_code, ResponseCode::Refused, "{rtype}");
        assert!(m.answers.is_empty());
    }
}

#[test]
fn bad_packets_get_formerr_or_silence() {
    let index = builder().build();
    let mut out = vec![0u8; 65535];
    // Runt: silence.
    assert_eq!(
        answer::answer(&[1, 2, 3], &mut out, &index, true),
        Outcome::Drop(Reject::Runt)
    );
    // A response: silence (no loops between servers).
    let mut response = query("a.cluster.local.", RecordType::A, None);
    response[2] |= 0x80;
    assert_eq!(
        answer::answer(&response, &mut out, &index, true),
        Outcome::Drop(Reject::Response)
    );
    // Cut in the question: FORMERR with the same ID.
    let full = query("web.default.svc.cluster.local.", RecordType::A, None);
    let Outcome::Reply { len, rcode, .. } = answer::answer(&full[..20], &mut out, &index, true)
    else {
        panic!("no FORMERR");
    };
    assert_eq!(rcode, wire::RCODE_FORMERR);
    let m = Message::from_vec(&out[..len]).unwrap();
    assert_eq!(m.metadata.id, 0xbeef);
    assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    // A compression loop in the question goes to the full decoder, which
    // rejects it (see slow::tests).
    let mut looped = full[..12].to_vec();
    looped.extend([0xc0, 12, 0, 1, 0, 1]);
    assert_eq!(
        answer::answer(&looped, &mut out, &index, true),
        Outcome::Slow
    );
    // Not ready yet: SERVFAIL, not a false NXDOMAIN.
    let mut cold = ZoneBuilder::new("cluster.local", 5, None, true)
        .unwrap()
        .build();
    cold.ready = false;
    let Outcome::Reply { rcode, .. } = answer::answer(
        &query("x.default.svc.cluster.local.", RecordType::A, None),
        &mut out,
        &cold,
        true,
    ) else {
        panic!("no answer");
    };
    assert_eq!(rcode, wire::RCODE_SERVFAIL);
}

#[test]
fn names_outside_the_zone_leave_the_fast_path() {
    let index = builder().build();
    let mut out = vec![0u8; 65535];
    let q = query("www.example.com.", RecordType::A, None);
    assert_eq!(answer::answer(&q, &mut out, &index, true), Outcome::Slow);
    let q = query("9.9.9.9.in-addr.arpa.", RecordType::PTR, None);
    assert_eq!(answer::answer(&q, &mut out, &index, true), Outcome::Slow);
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn index() -> &'static Index {
        static INDEX: std::sync::OnceLock<Index> = std::sync::OnceLock::new();
        INDEX.get_or_init(|| {
            let mut b = builder();
            add_service(
                &mut b,
                "default",
                "web",
                &cluster_ip(&["10.43.0.20", "fd00::1"]),
                &[],
                &[],
            );
            big_headless(&mut b, 50);
            b.build()
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Arbitrary bytes never panic, and whatever is answered decodes.
        #[test]
        fn arbitrary_packets(packet in proptest::collection::vec(any::<u8>(), 0..600), udp in any::<bool>()) {
            let index = index();
            let mut out = vec![0u8; if udp { answer::MIN_OUT } else { 65535 }];
            if let Outcome::Reply { len, .. } = answer::answer(&packet, &mut out, index, udp) {
                prop_assert!(len >= wire::HEADER_LEN);
                if udp { prop_assert!(len <= usize::from(wire::MAX_UDP_PAYLOAD)); }
                prop_assert!(Message::from_vec(&out[..len]).is_ok());
            }
        }

        /// Valid queries with bytes flipped, cut or appended.
        #[test]
        fn mutated_queries(
            name in prop::sample::select(vec![
                "web.default.svc.cluster.local.", "big.default.svc.cluster.local.",
                "10-1-2-3.default.pod.cluster.local.", "nope.cluster.local.",
            ]),
            edns in prop::option::of(0u16..5000),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in any::<prop::sample::Index>(),
            extra in proptest::collection::vec(any::<u8>(), 0..20),
        ) {
            let index = index();
            let mut packet = query(name, RecordType::A, edns);
            for (at, byte) in flips {
                let i = at.index(packet.len());
                packet[i] = byte;
            }
            packet.truncate(cut.index(packet.len() + 1).max(1));
            packet.extend(extra);
            let mut out = vec![0u8; answer::MIN_OUT];
            if let Outcome::Reply { len, .. } = answer::answer(&packet, &mut out, index, true) {
                prop_assert!(Message::from_vec(&out[..len]).is_ok());
            }
        }
    }
}

#[test]
fn ipv4_helpers_agree_with_std() {
    assert_eq!(
        Name::from(IpAddr::V4(Ipv4Addr::new(10, 43, 0, 20))).to_string(),
        "20.0.43.10.in-addr.arpa."
    );
}

/// Every name's node in `index`, for comparing whole indexes; the apex
/// is left out, as its SOA serial is the builder's creation time.
fn contents(index: &Index) -> std::collections::BTreeMap<Vec<u8>, Vec<u8>> {
    let all: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = index
        .shards
        .iter()
        .flat_map(|s| s.iter())
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .collect();
    assert_eq!(all.len(), index.len(), "a name is in the index twice");
    all.into_iter()
        .filter(|(k, _)| **k != *index.zone.apex)
        .collect()
}

/// Service number `n` in one of several shapes, drawn by `roll`: names,
/// addresses and targets overlap on purpose (shared PTR names, aliases
/// to other services and to their endpoints' hostnames).
fn random_service(n: u32, roll: u32) -> (ServiceInfo, Vec<SliceInfo>, Vec<PodInfo>) {
    let headless = ServiceInfo {
        kind: ServiceKind::Headless,
        ports: vec![port("http", "tcp", 80)],
        publish_not_ready: roll.is_multiple_of(7),
    };
    match roll % 5 {
        0 => (
            cluster_ip(&[&format!("10.43.0.{}", roll % 6 + 1)]),
            vec![],
            vec![],
        ),
        1 => (
            external(&format!("svc-{}.default.svc.cluster.local", roll % 4)),
            vec![],
            vec![],
        ),
        2 => (
            external("db-0.svc-3.default.svc.cluster.local"),
            vec![],
            vec![],
        ),
        3 => (external("example.com"), vec![], vec![]),
        _ => {
            let endpoints = (0..roll % 4)
                .map(|e| {
                    let host = format!("db-{e}");
                    endpoint(
                        &format!("10.42.0.{}", (roll / 5 + e) % 5 + 1),
                        (e % 2 == 0).then_some(host.as_str()),
                        !(roll / 3 + e).is_multiple_of(3),
                    )
                })
                .collect();
            let slice = SliceInfo {
                service: format!("svc-{n}"),
                ports: vec![port("http", "tcp", 80)],
                endpoints,
            };
            let pods = roll
                .is_multiple_of(3)
                .then(|| PodInfo {
                    hostname: "pinned".into(),
                    subdomain: format!("svc-{n}"),
                    ips: vec![ip("10.42.0.9")],
                    ready: true,
                })
                .into_iter()
                .collect();
            (headless, vec![slice], pods)
        }
    }
}

#[test]
fn incremental_updates_equal_a_fresh_build() {
    // A fixed pseudo-random walk of creations, changes and deletions; after
    // every step the index must be exactly what a builder fed only the
    // current state builds.
    let mut seed: u64 = 0x5eed_1234;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as u32
    };
    let mut b = builder();
    let mut state: std::collections::BTreeMap<u32, u32> = Default::default();
    for step in 0..300 {
        let n = next() % 6;
        let roll = next();
        let name = format!("svc-{n}");
        if roll % 4 == 0 {
            state.remove(&n);
            b.set_owner(Owner::Service("default".into(), name), Vec::new());
        } else {
            state.insert(n, roll);
            let (svc, slices, pods) = random_service(n, roll);
            add_service(&mut b, "default", &name, &svc, &slices, &pods);
        }
        if step % 3 != 0 {
            continue; // several updates per build, as the watch batches
        }
        let mut fresh = builder();
        for (n, roll) in &state {
            let (svc, slices, pods) = random_service(*n, *roll);
            add_service(
                &mut fresh,
                "default",
                &format!("svc-{n}"),
                &svc,
                &slices,
                &pods,
            );
        }
        assert_eq!(
            contents(&b.build()),
            contents(&fresh.build()),
            "step {step}"
        );
    }
    // Everything deleted: only the apex's names remain.
    for n in 0..6 {
        b.set_owner(Owner::Service("default".into(), format!("svc-{n}")), vec![]);
    }
    assert_eq!(contents(&b.build()), contents(&builder().build()));
}

#[test]
fn an_update_replaces_exactly_its_names() {
    let mut b = builder();
    let headless = ServiceInfo {
        kind: ServiceKind::Headless,
        ports: vec![port("http", "tcp", 80)],
        publish_not_ready: false,
    };
    let slice = |hosts: &[(&str, &str)]| SliceInfo {
        service: "db".into(),
        ports: vec![port("http", "tcp", 80)],
        endpoints: hosts
            .iter()
            .map(|(h, a)| endpoint(a, Some(h), true))
            .collect(),
    };
    add_service(
        &mut b,
        "default",
        "web",
        &cluster_ip(&["10.43.0.20"]),
        &[],
        &[],
    );
    add_service(
        &mut b,
        "default",
        "db",
        &headless,
        &[slice(&[("db-0", "10.42.0.5"), ("db-1", "10.42.0.6")])],
        &[],
    );
    let before = contents(&b.build());
    add_service(
        &mut b,
        "default",
        "db",
        &headless,
        &[slice(&[("db-1", "10.42.0.6"), ("db-2", "10.42.0.7")])],
        &[],
    );
    let index = b.build();
    let after = contents(&index);
    let changed: std::collections::BTreeSet<String> = before
        .keys()
        .chain(after.keys())
        .filter(|k| before.get(*k) != after.get(*k))
        .map(|k| Name::from_labels(to_labels(k)).unwrap().to_string())
        .collect();
    let expected: std::collections::BTreeSet<String> = [
        "db.default.svc.cluster.local.",
        "db-0.db.default.svc.cluster.local.",
        "db-2.db.default.svc.cluster.local.",
        "_http._tcp.db.default.svc.cluster.local.",
        "5.0.42.10.in-addr.arpa.",
        "7.0.42.10.in-addr.arpa.",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(changed, expected);
    assert_negative(
        &ask(&index, "db-0.db.default.svc.cluster.local.", RecordType::A),
        ResponseCode::NXDomain,
    );
    assert_eq!(
        addrs(&ask(
            &index,
            "db-2.db.default.svc.cluster.local.",
            RecordType::A
        )),
        vec![ip("10.42.0.7")]
    );
    // The same records again change nothing, down to the shards.
    let again = b.build();
    add_service(
        &mut b,
        "default",
        "db",
        &headless,
        &[slice(&[("db-1", "10.42.0.6"), ("db-2", "10.42.0.7")])],
        &[],
    );
    let same = b.build();
    assert!(
        again
            .shards
            .iter()
            .zip(&same.shards)
            .all(|(a, b)| a.ptr_eq(b))
    );
}

#[test]
fn shared_ptr_names_keep_the_other_owners_target() {
    let mut b = builder();
    let headless = |svc: &str| {
        (
            ServiceInfo {
                kind: ServiceKind::Headless,
                ports: vec![],
                publish_not_ready: false,
            },
            SliceInfo {
                service: svc.into(),
                ports: vec![],
                endpoints: vec![endpoint("10.42.0.5", Some("pod"), true)],
            },
        )
    };
    for svc in ["a", "b"] {
        let (info, slice) = headless(svc);
        add_service(&mut b, "default", svc, &info, &[slice], &[]);
    }
    let index = b.build();
    assert_eq!(
        ask(&index, "5.0.42.10.in-addr.arpa.", RecordType::PTR)
            .answers
            .len(),
        2
    );
    b.set_owner(Owner::Service("default".into(), "a".into()), vec![]);
    let index = b.build();
    let m = ask(&index, "5.0.42.10.in-addr.arpa.", RecordType::PTR);
    let RData::PTR(ptr) = &m.answers[0].data else {
        panic!("not PTR");
    };
    assert_eq!(m.answers.len(), 1);
    assert_eq!(ptr.0.to_string(), "pod.b.default.svc.cluster.local.");
}

fn to_labels(wire: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut at = wire;
    while let Some((&len, rest)) = at.split_first() {
        if len == 0 {
            break;
        }
        out.push(&rest[..usize::from(len)]);
        at = &rest[usize::from(len)..];
    }
    out
}

/// The index hands out exactly the bytes the encoder made, for names of
/// every kind: ClusterIP A/AAAA, SRV and PTR, headless addresses,
/// hostnames and their PTRs, pod hostnames, an ExternalName's CNAME and
/// alias answers, the apex's SOA/NS/TXT and empty non-terminals; and
/// names that do not exist stay out (NXDOMAIN, not NODATA).
#[test]
fn the_index_holds_the_encoded_nodes_of_every_kind() {
    let mut b = builder();
    add_service(
        &mut b,
        "default",
        "web",
        &cluster_ip(&["10.43.0.20", "fd00::20"]),
        &[],
        &[],
    );
    let headless = ServiceInfo {
        kind: ServiceKind::Headless,
        ports: vec![port("http", "tcp", 80), port("dns", "udp", 53)],
        publish_not_ready: false,
    };
    let slice = SliceInfo {
        service: "db".into(),
        ports: vec![port("http", "tcp", 80)],
        endpoints: vec![
            endpoint("10.42.0.6", Some("db-0"), true),
            endpoint("10.42.0.7", None, true),
            endpoint("10.42.0.8", Some("db-2"), false),
        ],
    };
    let pod = PodInfo {
        hostname: "box".into(),
        subdomain: "db".into(),
        ips: vec![ip("10.42.0.9")],
        ready: true,
    };
    add_service(&mut b, "default", "db", &headless, &[slice], &[pod]);
    add_service(&mut b, "default", "ext", &external("example.com"), &[], &[]);
    add_service(
        &mut b,
        "other",
        "alias",
        &external("web.default.svc.cluster.local"),
        &[],
        &[],
    );
    let index = b.build();
    let mut names = 0;
    for shard in &index.shards {
        for (name, node) in shard.iter() {
            assert_eq!(
                b.encoded_node(name).as_deref(),
                Some(node),
                "{:?}",
                String::from_utf8_lossy(name)
            );
            names += 1;
        }
    }
    assert_eq!(names, index.len());
    contents(&index);
    for present in [
        "web.default.svc.cluster.local",
        "_http._tcp.web.default.svc.cluster.local",
        "20.0.43.10.in-addr.arpa",
        "db.default.svc.cluster.local",
        "db-0.db.default.svc.cluster.local",
        "10-42-0-7.db.default.svc.cluster.local",
        "box.db.default.svc.cluster.local",
        "_http._tcp.db.default.svc.cluster.local",
        "6.0.42.10.in-addr.arpa",
        "ext.default.svc.cluster.local",
        "alias.other.svc.cluster.local",
        "dns-version.cluster.local",
        "cluster.local",
        "_tcp.web.default.svc.cluster.local",
        "default.svc.cluster.local",
    ] {
        let key = wire::encode_name(present).unwrap();
        assert!(index.node(&key).is_some(), "{present}");
    }
    for absent in [
        "db-2.db.default.svc.cluster.local",
        "8.0.42.10.in-addr.arpa",
        "_dns._udp.db.default.svc.cluster.local",
        "nope.default.svc.cluster.local",
    ] {
        let key = wire::encode_name(absent).unwrap();
        assert!(index.node(&key).is_none(), "{absent}");
        assert!(b.encoded_node(&key).is_none(), "{absent}");
    }
    assert_negative(
        &ask(&index, "nope.default.svc.cluster.local.", RecordType::A),
        ResponseCode::NXDomain,
    );
    assert_negative(
        &ask(&index, "web.default.svc.cluster.local.", RecordType::TXT),
        ResponseCode::NoError,
    );
}
