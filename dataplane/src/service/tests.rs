//! Engine tests: real packets built and checked with etherparse (every
//! checksum recomputed independently), an injected clock, and proptest
//! for malformed input.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use etherparse::icmpv4::DestUnreachableHeader;
use etherparse::{
    Icmpv4Header, Icmpv4Type, IpNumber, Ipv4Header, PacketBuilder, TcpHeader, UdpHeader,
};
use proptest::prelude::*;

use super::checksum::{fold, sum};
use super::*;

const NODE: &str = "node-a";
const NODE_IP: &str = "192.168.5.10";
const SNAT_IP: &str = "10.42.0.1";
const VIP: &str = "10.43.0.10";
const CLIENT: &str = "10.42.0.20";

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;
const RST: u8 = 0x04;
const SECOND: u64 = 1000;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().expect("test address")
}

fn sock(s: &str, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip(s), port)
}

struct Harness {
    table: ServiceTable,
    engine: Engine,
    now: u64,
    reject: Vec<u8>,
}

impl Harness {
    fn new() -> Self {
        Self::with(|_| {})
    }

    fn with(tune: impl FnOnce(&mut EngineConfig)) -> Self {
        let table = ServiceTable::new(TableConfig {
            node_name: NODE.into(),
            node_ips: vec![ip(NODE_IP)],
        });
        let mut config = EngineConfig::new(ip(SNAT_IP));
        config.cluster_cidr = Some("10.42.0.0/16".parse().expect("cidr"));
        config.service_cidr = Some("10.43.0.0/16".parse().expect("cidr"));
        config.max_flows = 4096;
        tune(&mut config);
        let engine = Engine::new(config, table.published(), Arc::new(Metrics::default()));
        Harness {
            table,
            engine,
            now: 1_000_000,
            reject: vec![0; 1500],
        }
    }

    /// Another node: its own engine over an identical table.
    fn peer(&self, services: &[ServiceSpec]) -> Harness {
        let mut other = Harness::new();
        other.table.upsert_many(services);
        other
    }

    fn send(&mut self, packet: &mut [u8]) -> Verdict {
        self.send_meta(packet, PacketMeta::default())
    }

    fn send_meta(&mut self, packet: &mut [u8], meta: PacketMeta) -> Verdict {
        self.engine
            .process(self.now, packet, meta, &mut self.reject)
    }

    fn metrics(&self) -> &Metrics {
        self.engine.metrics()
    }
}

fn backend(addr: &str, port: u16) -> Backend {
    Backend {
        addr: ip(addr),
        port,
        ready: true,
        serving: true,
        terminating: false,
        node: Some("node-b".into()),
    }
}

fn service(
    name: &str,
    vip: &str,
    port: u16,
    protocol: Protocol,
    backends: Vec<Backend>,
) -> ServiceSpec {
    ServiceSpec {
        key: ServiceKey::new("default", name),
        cluster_ips: vec![ip(vip)],
        ports: vec![ServicePort {
            name: String::new(),
            protocol,
            port,
            node_port: None,
            backends,
        }],
        load_balancer: false,
        external_local: false,
        affinity_timeout_secs: None,
    }
}

fn web(backends: Vec<Backend>) -> ServiceSpec {
    service("web", VIP, 80, Protocol::Tcp, backends)
}

fn three() -> Vec<Backend> {
    vec![
        backend("10.42.1.2", 8080),
        backend("10.42.2.2", 8080),
        backend("10.42.3.2", 8080),
    ]
}

fn tcp(
    src: SocketAddrV4,
    dst: SocketAddrV4,
    flags: u8,
    seq: u32,
    ack: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = PacketBuilder::ipv4(src.ip().octets(), dst.ip().octets(), 64).tcp(
        src.port(),
        dst.port(),
        seq,
        65535,
    );
    if flags & SYN != 0 {
        b = b.syn();
    }
    if flags & ACK != 0 {
        b = b.ack(ack);
    }
    if flags & FIN != 0 {
        b = b.fin();
    }
    if flags & RST != 0 {
        b = b.rst();
    }
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("build tcp");
    out
}

fn udp(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(src.ip().octets(), dst.ip().octets(), 64)
        .udp(src.port(), dst.port())
        .write(&mut out, payload)
        .expect("build udp");
    out
}

fn icmp_error(src: &str, dst: &str, quoted: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(ip(src).octets(), ip(dst).octets(), 64)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            DestUnreachableHeader::Port,
        ))
        .write(&mut out, quoted)
        .expect("build icmp");
    out
}

/// Source and destination of a TCP/UDP packet, after checking its IPv4 and
/// L4 checksums with etherparse.
fn checked(packet: &[u8]) -> (SocketAddrV4, SocketAddrV4) {
    let (header, rest) = Ipv4Header::from_slice(packet).expect("ipv4 header");
    assert_eq!(
        header.header_checksum,
        header.calc_header_checksum(),
        "IPv4 checksum"
    );
    let src = Ipv4Addr::from(header.source);
    let dst = Ipv4Addr::from(header.destination);
    match header.protocol {
        IpNumber::TCP => {
            let (tcp, data) = TcpHeader::from_slice(rest).expect("tcp header");
            let want = tcp.calc_checksum_ipv4(&header, data).expect("tcp checksum");
            assert_eq!(tcp.checksum, want, "TCP checksum");
            (
                SocketAddrV4::new(src, tcp.source_port),
                SocketAddrV4::new(dst, tcp.destination_port),
            )
        }
        IpNumber::UDP => {
            let (udp, data) = UdpHeader::from_slice(rest).expect("udp header");
            let want = udp.calc_checksum_ipv4(&header, data).expect("udp checksum");
            assert_eq!(udp.checksum, want, "UDP checksum");
            (
                SocketAddrV4::new(src, udp.source_port),
                SocketAddrV4::new(dst, udp.destination_port),
            )
        }
        other => panic!("not TCP/UDP: {other:?}"),
    }
}

/// Checks an ICMP packet's checksums; returns (outer src, outer dst, the
/// quoted bytes).
fn checked_icmp(packet: &[u8]) -> (Ipv4Addr, Ipv4Addr, Icmpv4Type, Vec<u8>) {
    let (header, rest) = Ipv4Header::from_slice(packet).expect("ipv4 header");
    assert_eq!(
        header.header_checksum,
        header.calc_header_checksum(),
        "IPv4 checksum"
    );
    assert_eq!(header.protocol, IpNumber::ICMP);
    let (icmp, quoted) = Icmpv4Header::from_slice(rest).expect("icmp header");
    assert_eq!(
        icmp.checksum,
        icmp.icmp_type.calc_checksum(quoted),
        "ICMP checksum"
    );
    (
        Ipv4Addr::from(header.source),
        Ipv4Addr::from(header.destination),
        icmp.icmp_type,
        quoted.to_vec(),
    )
}

fn forwarded_to(verdict: Verdict, want: &str) {
    assert_eq!(verdict, Verdict::Forward { next_hop: ip(want) });
}

fn state_of(h: &Harness, client: SocketAddrV4) -> FlowInfo {
    h.engine
        .flows(h.now)
        .into_iter()
        .find(|f| f.original.0 == client)
        .expect("flow tracked")
}

/// Opens a TCP connection through the VIP and returns the endpoint.
fn connect(h: &mut Harness, client: SocketAddrV4) -> SocketAddrV4 {
    let mut syn = tcp(client, sock(VIP, 80), SYN, 100, 0, &[]);
    let Verdict::Forward { .. } = h.send(&mut syn) else {
        panic!("SYN not forwarded")
    };
    checked(&syn).1
}

#[test]
fn clusterip_tcp_both_directions() {
    let mut h = Harness::new();
    h.table.upsert(&web(three()));
    let client = sock(CLIENT, 40000);

    let mut syn = tcp(client, sock(VIP, 80), SYN, 100, 0, &[]);
    let verdict = h.send(&mut syn);
    let (src, endpoint) = checked(&syn);
    forwarded_to(verdict, &endpoint.ip().to_string());
    assert_eq!(src, client, "pod sources are kept");
    assert_eq!(endpoint.port(), 8080);
    assert!(three().iter().any(|b| b.addr == *endpoint.ip()));
    assert_eq!(
        state_of(&h, client).state,
        FlowState::Tcp(TcpState::SynSent)
    );

    let mut syn_ack = tcp(endpoint, client, SYN | ACK, 500, 101, &[]);
    forwarded_to(h.send(&mut syn_ack), CLIENT);
    assert_eq!(
        checked(&syn_ack),
        (sock(VIP, 80), client),
        "replies come from the VIP"
    );
    assert_eq!(
        state_of(&h, client).state,
        FlowState::Tcp(TcpState::SynRecv)
    );

    let mut ack = tcp(
        client,
        sock(VIP, 80),
        ACK,
        101,
        501,
        b"GET / HTTP/1.1\r\n\r\n",
    );
    h.send(&mut ack);
    assert_eq!(checked(&ack), (client, endpoint));
    assert_eq!(
        state_of(&h, client).state,
        FlowState::Tcp(TcpState::Established)
    );

    let mut data = tcp(endpoint, client, ACK, 501, 119, &[7u8; 1000]);
    h.send(&mut data);
    assert_eq!(checked(&data), (sock(VIP, 80), client));

    assert_eq!(h.metrics().flows_created.load(Ordering::Relaxed), 1);
    assert_eq!(h.metrics().flows_tracked.load(Ordering::Relaxed), 1);
    let counts: Vec<_> = h.table.new_flows().collect();
    assert_eq!(counts, [(&ServiceKey::new("default", "web"), 1)]);
}

#[test]
fn tcp_states_and_kernel_timeouts() {
    let mut h = Harness::new();
    h.table.upsert(&web(three()));
    let client = sock(CLIENT, 40001);
    let vip = sock(VIP, 80);
    let endpoint = connect(&mut h, client);
    assert_eq!(state_of(&h, client).expires_in_ms, 120 * SECOND);
    h.send(&mut tcp(endpoint, client, SYN | ACK, 0, 101, &[]));
    assert_eq!(state_of(&h, client).expires_in_ms, 60 * SECOND);
    h.send(&mut tcp(client, vip, ACK, 101, 1, &[]));
    assert_eq!(state_of(&h, client).expires_in_ms, 432_000 * SECOND);

    // Idle for an hour: an established flow is still there.
    h.now += 3600 * SECOND;
    let mut late = tcp(client, vip, ACK, 101, 1, b"x");
    h.send(&mut late);
    assert_eq!(checked(&late).1, endpoint);

    h.send(&mut tcp(client, vip, FIN | ACK, 102, 1, &[]));
    assert_eq!(
        state_of(&h, client).state,
        FlowState::Tcp(TcpState::FinWait(Direction::Original))
    );
    assert_eq!(state_of(&h, client).expires_in_ms, 120 * SECOND);
    h.send(&mut tcp(endpoint, client, ACK, 1, 103, &[]));
    assert_eq!(
        state_of(&h, client).expires_in_ms,
        60 * SECOND,
        "CLOSE_WAIT"
    );
    h.send(&mut tcp(endpoint, client, FIN | ACK, 1, 103, &[]));
    assert_eq!(state_of(&h, client).expires_in_ms, 30 * SECOND, "LAST_ACK");
    h.send(&mut tcp(client, vip, ACK, 103, 2, &[]));
    let info = state_of(&h, client);
    assert_eq!(info.state, FlowState::Tcp(TcpState::TimeWait));
    assert_eq!(info.expires_in_ms, 120 * SECOND);

    // TIME_WAIT runs out: the flow is gone, its slot freed by a sweep.
    h.now += 121 * SECOND;
    assert!(h.engine.flows(h.now).is_empty());
    assert_eq!(h.engine.sweep(h.now, 10_000), 1);
    assert_eq!(h.engine.flow_count(), 0);
    assert_eq!(h.metrics().flows_expired.load(Ordering::Relaxed), 1);

    // A reset closes a flow for 10 s.
    let other = sock(CLIENT, 40002);
    let endpoint = connect(&mut h, other);
    h.send(&mut tcp(endpoint, other, RST, 0, 0, &[]));
    assert_eq!(state_of(&h, other).state, FlowState::Tcp(TcpState::Close));
    assert_eq!(state_of(&h, other).expires_in_ms, 10 * SECOND);
}

#[test]
fn syn_reopens_a_closed_flow() {
    let mut h = Harness::new();
    h.table.upsert(&web(three()));
    let client = sock(CLIENT, 40003);
    let endpoint = connect(&mut h, client);
    h.send(&mut tcp(endpoint, client, RST, 0, 0, &[]));
    let mut syn = tcp(client, sock(VIP, 80), SYN, 900, 0, &[]);
    h.send(&mut syn);
    assert_eq!(
        state_of(&h, client).state,
        FlowState::Tcp(TcpState::SynSent)
    );
    assert_eq!(h.metrics().flows_created.load(Ordering::Relaxed), 2);
}

#[test]
fn direct_connection_reusing_a_closed_flows_port_is_not_translated() {
    let mut h = Harness::new();
    h.table.upsert(&web(vec![backend("10.42.1.2", 8080)]));
    let client = sock(CLIENT, 40004);
    let endpoint = connect(&mut h, client);
    h.send(&mut tcp(endpoint, client, RST, 0, 0, &[]));
    assert_eq!(state_of(&h, client).state, FlowState::Tcp(TcpState::Close));

    // The client reuses the port for a connection to the pod IP itself.
    let mut syn = tcp(client, endpoint, SYN, 900, 0, &[]);
    assert!(matches!(h.send(&mut syn), Verdict::NotService));
    let mut syn_ack = tcp(endpoint, client, SYN | ACK, 5, 901, &[]);
    assert!(matches!(h.send(&mut syn_ack), Verdict::NotService));
    assert_eq!(checked(&syn_ack), (endpoint, client), "source left as is");
    assert!(h.engine.flows(h.now).is_empty());
}

#[test]
fn udp_both_directions_and_timeouts() {
    let mut h = Harness::new();
    h.table.upsert(&service(
        "dns",
        VIP,
        53,
        Protocol::Udp,
        vec![backend("10.42.1.9", 5353)],
    ));
    let client = sock(CLIENT, 33000);
    let vip = sock(VIP, 53);
    let mut query = udp(client, vip, b"query");
    forwarded_to(h.send(&mut query), "10.42.1.9");
    assert_eq!(checked(&query), (client, sock("10.42.1.9", 5353)));
    assert_eq!(state_of(&h, client).expires_in_ms, 30 * SECOND, "unreplied");

    let mut answer = udp(sock("10.42.1.9", 5353), client, b"answer");
    forwarded_to(h.send(&mut answer), CLIENT);
    assert_eq!(checked(&answer), (vip, client));
    let info = state_of(&h, client);
    assert_eq!(info.state, FlowState::Udp { replied: true });
    assert_eq!(info.expires_in_ms, 120 * SECOND, "stream");

    // A second unreplied flow expires after 30 s, the stream after 120 s.
    let quiet = sock(CLIENT, 33001);
    h.send(&mut udp(quiet, vip, b"q"));
    h.now += 31 * SECOND;
    let live: Vec<_> = h
        .engine
        .flows(h.now)
        .into_iter()
        .map(|f| f.original.0)
        .collect();
    assert_eq!(live, [client]);
    h.now += 90 * SECOND;
    assert!(h.engine.flows(h.now).is_empty());
    // The late reply no longer matches a flow: it passes untranslated.
    let mut stale = udp(sock("10.42.1.9", 5353), client, b"late");
    let before = stale.clone();
    assert_eq!(h.send(&mut stale), Verdict::NotService);
    assert_eq!(stale, before);
}

#[test]
fn udp_zero_checksum_stays_zero() {
    let mut h = Harness::new();
    h.table.upsert(&service(
        "dns",
        VIP,
        53,
        Protocol::Udp,
        vec![backend("10.42.1.9", 5353)],
    ));
    let mut query = udp(sock(CLIENT, 33002), sock(VIP, 53), b"query");
    query[26] = 0;
    query[27] = 0;
    h.send(&mut query);
    assert_eq!(&query[26..28], &[0, 0], "no checksum stays no checksum");
    let (header, _) = Ipv4Header::from_slice(&query).expect("ipv4");
    assert_eq!(header.header_checksum, header.calc_header_checksum());
}

#[test]
fn icmp_errors_for_tracked_flows_are_translated() {
    let mut h = Harness::new();
    h.table.upsert(&service(
        "dns",
        VIP,
        53,
        Protocol::Udp,
        vec![backend("10.42.1.9", 5353)],
    ));
    let client = sock(CLIENT, 33003);
    let vip = sock(VIP, 53);
    let mut query = udp(client, vip, b"query");
    h.send(&mut query);

    // The endpoint refuses what it received (client → endpoint).
    let mut error = icmp_error("10.42.1.9", CLIENT, &query);
    forwarded_to(h.send(&mut error), CLIENT);
    let (src, dst, kind, quoted) = checked_icmp(&error);
    assert_eq!((src, dst), (ip(VIP), ip(CLIENT)));
    assert_eq!(
        kind,
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port)
    );
    assert_eq!(
        checked(&quoted),
        (client, vip),
        "the quote looks like what the client sent"
    );

    // The client refuses a reply (VIP → client): the endpoint hears of it
    // about the packet it sent.
    let mut answer = udp(sock("10.42.1.9", 5353), client, b"answer");
    h.send(&mut answer);
    let mut error = icmp_error(CLIENT, VIP, &answer);
    forwarded_to(h.send(&mut error), "10.42.1.9");
    let (src, dst, _, quoted) = checked_icmp(&error);
    assert_eq!((src, dst), (ip(CLIENT), ip("10.42.1.9")));
    assert_eq!(checked(&quoted), (sock("10.42.1.9", 5353), client));
}

#[test]
fn icmp_error_with_short_tcp_quote_and_router_source() {
    let mut h = Harness::new();
    h.table.upsert(&web(three()));
    let client = sock(CLIENT, 40010);
    let mut syn = tcp(client, sock(VIP, 80), SYN, 100, 0, &[]);
    h.send(&mut syn);
    let endpoint = checked(&syn).1;
    // A router quotes the IP header and 8 bytes (no TCP checksum field).
    let mut error = icmp_error("10.99.0.1", CLIENT, &syn[..28]);
    forwarded_to(h.send(&mut error), CLIENT);
    let (src, dst, _, quoted) = checked_icmp(&error);
    assert_eq!(src, ip("10.99.0.1"), "a router's own address stays");
    assert_eq!(dst, ip(CLIENT));
    let (inner, l4) = Ipv4Header::from_slice(&quoted).expect("quoted header");
    assert_eq!(inner.header_checksum, inner.calc_header_checksum());
    assert_eq!(Ipv4Addr::from(inner.destination), ip(VIP));
    assert_eq!(u16::from_be_bytes([l4[2], l4[3]]), 80);
    assert_ne!(*endpoint.ip(), ip(VIP));
}

#[test]
fn offloaded_partial_checksums_stay_pseudo_header_sums() {
    let mut h = Harness::new();
    h.table.upsert(&web(three()));
    let client = sock(CLIENT, 40020);
    // A TSO super-packet as the TUN hands it over: the TCP checksum field
    // holds the pseudo-header sum only.
    let mut packet = tcp(client, sock(VIP, 80), SYN, 7, 0, &[0x5a; 3000]);
    set_partial(&mut packet);
    let meta = PacketMeta {
        checksum_partial: true,
    };
    h.send_meta(&mut packet, meta);
    assert_partial_is_pseudo_sum(&packet);
    let (_, endpoint) = device_finishes(&mut packet);
    let mut reply = tcp(endpoint, client, SYN | ACK, 1, 8, &[0xa5; 2000]);
    set_partial(&mut reply);
    h.send_meta(&mut reply, meta);
    assert_partial_is_pseudo_sum(&reply);
    assert_eq!(device_finishes(&mut reply), (sock(VIP, 80), client));

    // UDP too.
    h.table.upsert(&service(
        "dns",
        "10.43.0.53",
        53,
        Protocol::Udp,
        vec![backend("10.42.1.9", 5353)],
    ));
    let mut datagram = udp(sock(CLIENT, 5000), sock("10.43.0.53", 53), &[1; 999]);
    set_partial(&mut datagram);
    h.send_meta(&mut datagram, meta);
    assert_partial_is_pseudo_sum(&datagram);
    device_finishes(&mut datagram);
}

fn l4_checksum_at(packet: &[u8]) -> usize {
    20 + if packet[9] == 6 { 16 } else { 6 }
}

fn pseudo_sum(packet: &[u8]) -> u16 {
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&packet[12..20]);
    pseudo.extend_from_slice(&[0, packet[9]]);
    pseudo.extend_from_slice(&((packet.len() - 20) as u16).to_be_bytes());
    fold(sum(&pseudo))
}

fn set_partial(packet: &mut [u8]) {
    let at = l4_checksum_at(packet);
    let value = pseudo_sum(packet);
    packet[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

fn assert_partial_is_pseudo_sum(packet: &[u8]) {
    let at = l4_checksum_at(packet);
    let field = u16::from_be_bytes([packet[at], packet[at + 1]]);
    // Ones-complement zero has two spellings.
    assert_eq!(field % 0xffff, pseudo_sum(packet) % 0xffff);
}

/// Does what the device does with CHECKSUM_PARTIAL (sum from the L4 header
/// on, field included, and store the complement), then checks the result
/// with etherparse.
fn device_finishes(packet: &mut [u8]) -> (SocketAddrV4, SocketAddrV4) {
    let at = l4_checksum_at(packet);
    let value = !fold(sum(&packet[20..]));
    packet[at..at + 2].copy_from_slice(&value.to_be_bytes());
    checked(packet)
}

#[test]
fn maglev_spreads_3000_flows_evenly_over_3_endpoints() {
    let mut h = Harness::new();
    h.table.upsert(&web(three()));
    let mut counts = std::collections::HashMap::new();
    for i in 0..3000u32 {
        let client = SocketAddrV4::new(
            Ipv4Addr::from(0x0a2a_0000 + 256 + i / 100),
            30000 + (i % 100) as u16,
        );
        *counts.entry(*connect(&mut h, client).ip()).or_insert(0) += 1;
    }
    assert_eq!(counts.len(), 3);
    for (endpoint, n) in &counts {
        // 1,000 each ± 8 %, about three standard deviations of chance.
        assert!((920..=1080).contains(n), "{endpoint}: {n} of 3000");
    }
}

#[test]
fn every_node_picks_the_same_endpoint() {
    let spec = web(three());
    let mut a = Harness::new();
    a.table.upsert(&spec);
    let mut b = a.peer(std::slice::from_ref(&spec));
    for i in 0..300 {
        let client = sock(CLIENT, 20000 + i);
        assert_eq!(connect(&mut a, client), connect(&mut b, client));
    }
}

#[test]
fn removing_an_endpoint_moves_few_other_flows() {
    let four = {
        let mut b = three();
        b.push(backend("10.42.4.2", 8080));
        b
    };
    let before = Harness::new().peer(&[web(four.clone())]);
    let after = Harness::new().peer(&[web(four[..3].to_vec())]);
    let (mut before, mut after) = (before, after);
    let (mut kept, mut moved) = (0, 0);
    for i in 0..4000u32 {
        let client = SocketAddrV4::new(
            Ipv4Addr::from(0x0a2a_0000 + 256 + i / 200),
            30000 + (i % 200) as u16,
        );
        let old = connect(&mut before, client);
        if *old.ip() == ip("10.42.4.2") {
            continue;
        }
        if connect(&mut after, client) == old {
            kept += 1;
        } else {
            moved += 1;
        }
    }
    assert!(
        moved * 100 < (kept + moved) * 3,
        "{moved} of {} surviving flows moved",
        kept + moved
    );
}

#[test]
fn established_flows_survive_updates_and_die_with_their_endpoint() {
    let mut h = Harness::new();
    h.table.upsert(&web(three()));
    let client = sock(CLIENT, 40030);
    let endpoint = connect(&mut h, client);

    // More endpoints, and this one becomes not ready: the flow stays.
    let mut changed = three();
    changed.push(backend("10.42.4.2", 8080));
    for b in &mut changed {
        if b.addr == *endpoint.ip() {
            b.ready = false;
            b.serving = false;
        }
    }
    h.table.upsert(&web(changed.clone()));
    let mut data = tcp(client, sock(VIP, 80), ACK, 101, 1, b"more");
    h.send(&mut data);
    assert_eq!(
        checked(&data).1,
        endpoint,
        "established flows keep their endpoint"
    );
    // But it gets no new flows.
    for port in 0..200 {
        assert_ne!(connect(&mut h, sock("10.42.0.21", port + 1000)), endpoint);
    }

    // Removed from the Service: the flow ends, the client gets a reset.
    changed.retain(|b| b.addr != *endpoint.ip());
    h.table.upsert(&web(changed));
    let mut data = tcp(client, sock(VIP, 80), ACK, 105, 1, b"again");
    let Verdict::Reject { len } = h.send(&mut data) else {
        panic!("expected a reset")
    };
    let rst = &h.reject[..len];
    assert_eq!(checked(rst), (sock(VIP, 80), client));
    assert_eq!(h.metrics().flows_stale.load(Ordering::Relaxed), 1);
    // The endpoint's late replies are dropped, not leaked untranslated.
    assert_eq!(
        h.send(&mut tcp(endpoint, client, ACK, 1, 105, b"late")),
        Verdict::NotService,
        "the flow is gone, so this is ordinary pod traffic"
    );
}

#[test]
fn udp_flows_to_a_removed_endpoint_move() {
    let mut h = Harness::new();
    let two = vec![backend("10.42.1.9", 5353), backend("10.42.2.9", 5353)];
    h.table
        .upsert(&service("dns", VIP, 53, Protocol::Udp, two.clone()));
    let client = sock(CLIENT, 33010);
    let mut query = udp(client, sock(VIP, 53), b"q");
    h.send(&mut query);
    let first = checked(&query).1;
    let rest: Vec<_> = two.into_iter().filter(|b| b.addr != *first.ip()).collect();
    h.table
        .upsert(&service("dns", VIP, 53, Protocol::Udp, rest.clone()));
    let mut query = udp(client, sock(VIP, 53), b"q");
    h.send(&mut query);
    assert_eq!(*checked(&query).1.ip(), rest[0].addr);
    assert_eq!(h.metrics().flows_stale.load(Ordering::Relaxed), 1);
}

#[test]
fn terminating_endpoints_only_when_nothing_else_is_left() {
    let mut h = Harness::new();
    let terminating = |addr| Backend {
        ready: false,
        serving: true,
        terminating: true,
        ..backend(addr, 8080)
    };
    h.table.upsert(&web(vec![
        terminating("10.42.1.2"),
        backend("10.42.2.2", 8080),
    ]));
    for port in 0..100 {
        assert_eq!(
            *connect(&mut h, sock(CLIENT, 41000 + port)).ip(),
            ip("10.42.2.2")
        );
    }
    h.table.upsert(&web(vec![
        terminating("10.42.1.2"),
        Backend {
            serving: false,
            ..terminating("10.42.3.2")
        },
    ]));
    for port in 0..100 {
        assert_eq!(
            *connect(&mut h, sock(CLIENT, 42000 + port)).ip(),
            ip("10.42.1.2"),
            "only the serving terminating endpoint takes flows"
        );
    }
}

#[test]
fn session_affinity_pins_a_client() {
    let mut h = Harness::new();
    let mut spec = web(three());
    spec.affinity_timeout_secs = Some(60);
    h.table.upsert(&spec);
    let first = connect(&mut h, sock(CLIENT, 1000));
    for port in 1001..1100 {
        assert_eq!(connect(&mut h, sock(CLIENT, port)), first);
    }
    // Clients spread over the endpoints all the same.
    let others: std::collections::HashSet<_> = (0..60)
        .map(|i| *connect(&mut h, sock(&format!("10.42.9.{i}"), 1000)).ip())
        .collect();
    assert_eq!(others.len(), 3);

    // The pin holds while endpoints come and go around it...
    let mut more = three();
    for i in 4..10 {
        more.push(backend(&format!("10.42.{i}.2"), 8080));
    }
    spec.ports[0].backends = more.clone();
    h.table.upsert(&spec);
    h.now += 59 * SECOND;
    assert_eq!(
        connect(&mut h, sock(CLIENT, 2000)),
        first,
        "new flows refresh the pin"
    );
    // ...but not when its endpoint stops being ready.
    for b in &mut more {
        if b.addr == *first.ip() {
            b.ready = false;
        }
    }
    spec.ports[0].backends = more;
    h.table.upsert(&spec);
    let moved = connect(&mut h, sock(CLIENT, 2001));
    assert_ne!(moved, first);
    assert_eq!(
        connect(&mut h, sock(CLIENT, 2002)),
        moved,
        "and pins to the new one"
    );
}

#[test]
fn named_target_ports_from_endpoint_slices() {
    let mut h = Harness::new();
    let svc = serde_json::from_value(serde_json::json!({
        "metadata": {"namespace": "default", "name": "web"},
        "spec": {"clusterIP": VIP, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }))
    .expect("service");
    let slice = |port: u16, addr: &str| {
        serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "default", "name": format!("web-{port}")},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [addr], "conditions": {"ready": true}}],
        }))
        .expect("slice")
    };
    h.table
        .apply(&svc, &[slice(8080, "10.42.1.2"), slice(9090, "10.42.2.2")])
        .expect("apply");
    let mut seen = std::collections::HashSet::new();
    for port in 0..100 {
        seen.insert(connect(&mut h, sock(CLIENT, 43000 + port)));
    }
    let want: std::collections::HashSet<_> = [sock("10.42.1.2", 8080), sock("10.42.2.2", 9090)]
        .into_iter()
        .collect();
    assert_eq!(seen, want, "each endpoint gets its own number for `http`");
}

#[test]
fn hairpin_is_snated_to_the_node() {
    let mut h = Harness::new();
    let pod = "10.42.0.5";
    h.table.upsert(&web(vec![backend(pod, 8080)]));
    let me = sock(pod, 45000);
    let mut syn = tcp(me, sock(VIP, 80), SYN, 1, 0, &[]);
    forwarded_to(h.send(&mut syn), pod);
    let (src, dst) = checked(&syn);
    assert_eq!(dst, sock(pod, 8080));
    assert_eq!(
        *src.ip(),
        ip(SNAT_IP),
        "the reply must come back through the data plane"
    );
    let mut reply = tcp(dst, src, SYN | ACK, 1, 2, &[]);
    forwarded_to(h.send(&mut reply), pod);
    assert_eq!(checked(&reply), (sock(VIP, 80), me));
}

#[test]
fn flows_to_local_endpoints_are_snated_into_the_device() {
    // A pod's reply to a pod on the same bridge is bridged past the data
    // plane, so flows to this node's endpoints take the Service network's
    // broadcast address as source; flows to other nodes keep theirs.
    let local_snat = "10.43.255.255";
    let mut h = Harness::with(|c| c.local_snat_ip = Some(ip(local_snat)));
    h.engine
        .set_local_pods("10.42.0.0/24".parse().expect("cidr"));
    h.table.upsert(&web(vec![backend("10.42.0.9", 8080)]));
    let client = sock("10.42.0.5", 40000);
    let mut syn = tcp(client, sock(VIP, 80), SYN, 1, 0, &[]);
    forwarded_to(h.send(&mut syn), "10.42.0.9");
    let (src, dst) = checked(&syn);
    assert_eq!((*src.ip(), dst), (ip(local_snat), sock("10.42.0.9", 8080)));
    assert!(h.engine.tracks(&tcp(dst, src, SYN | ACK, 1, 2, &[])));
    let mut reply = tcp(dst, src, SYN | ACK, 1, 2, &[]);
    forwarded_to(h.send(&mut reply), "10.42.0.5");
    assert_eq!(checked(&reply), (sock(VIP, 80), client));

    h.table.upsert(&web(vec![backend("10.42.1.9", 8080)]));
    let other = sock("10.42.0.5", 40001);
    let mut syn = tcp(other, sock(VIP, 80), SYN, 1, 0, &[]);
    forwarded_to(h.send(&mut syn), "10.42.1.9");
    assert_eq!(
        checked(&syn).0,
        other,
        "a remote endpoint's reply is tunnelled back"
    );
}

#[test]
fn host_sources_reaching_a_clusterip_are_snated() {
    let mut h = Harness::new();
    h.table.upsert(&web(three()));
    let host = sock(NODE_IP, 50000);
    let mut syn = tcp(host, sock(VIP, 80), SYN, 1, 0, &[]);
    h.send(&mut syn);
    let (src, endpoint) = checked(&syn);
    assert_eq!(*src.ip(), ip(SNAT_IP));
    let mut reply = tcp(endpoint, src, SYN | ACK, 1, 2, &[]);
    forwarded_to(h.send(&mut reply), NODE_IP);
    assert_eq!(checked(&reply), (sock(VIP, 80), host));
}

fn node_port_service(local: bool) -> ServiceSpec {
    let mut spec = web(vec![
        Backend {
            node: Some(NODE.into()),
            ..backend("10.42.0.7", 8080)
        },
        backend("10.42.1.7", 8080),
        backend("10.42.2.7", 8080),
    ]);
    spec.ports[0].node_port = Some(30080);
    spec.external_local = local;
    spec
}

#[test]
fn node_port_snats_to_the_node() {
    let mut h = Harness::new();
    h.table.upsert(&node_port_service(false));
    let outside = sock("203.0.113.9", 5555);
    let node_port = sock(NODE_IP, 30080);
    let mut seen = std::collections::HashSet::new();
    for port in 0..60 {
        let client = SocketAddrV4::new(*outside.ip(), 5555 + port);
        let mut syn = tcp(client, node_port, SYN, 1, 0, &[]);
        h.send(&mut syn);
        let (src, endpoint) = checked(&syn);
        assert_eq!(*src.ip(), ip(SNAT_IP));
        seen.insert(*endpoint.ip());
        let mut reply = tcp(endpoint, src, SYN | ACK, 1, 2, &[]);
        forwarded_to(h.send(&mut reply), "203.0.113.9");
        assert_eq!(checked(&reply), (node_port, client));
    }
    assert_eq!(seen.len(), 3, "endpoints on every node serve a NodePort");
}

#[test]
fn node_port_local_keeps_the_source_and_stays_local() {
    let mut h = Harness::new();
    h.table.upsert(&node_port_service(true));
    let node_port = sock(NODE_IP, 30080);
    for port in 0..30 {
        let client = sock("203.0.113.9", 6000 + port);
        let mut syn = tcp(client, node_port, SYN, 1, 0, &[]);
        h.send(&mut syn);
        assert_eq!(checked(&syn), (client, sock("10.42.0.7", 8080)));
    }
    // The ClusterIP still reaches every endpoint.
    let spread: std::collections::HashSet<_> = (0..60)
        .map(|p| *connect(&mut h, sock(CLIENT, 7000 + p)).ip())
        .collect();
    assert_eq!(spread.len(), 3);

    let mut remote_only = node_port_service(true);
    remote_only.ports[0].backends.remove(0);
    h.table.upsert(&remote_only);
    let mut syn = tcp(sock("203.0.113.9", 6999), node_port, SYN, 1, 0, &[]);
    assert_eq!(h.send(&mut syn), Verdict::Drop(DropReason::NoLocalEndpoint));
    assert_eq!(h.metrics().drops(DropReason::NoLocalEndpoint), 1);
}

#[test]
fn no_endpoints_rejects_tcp_with_a_reset() {
    let mut h = Harness::new();
    h.table.upsert(&web(vec![]));
    let client = sock(CLIENT, 40040);
    let mut syn = tcp(client, sock(VIP, 80), SYN, 1000, 0, &[]);
    let Verdict::Reject { len } = h.send(&mut syn) else {
        panic!("expected a reject")
    };
    let rst = h.reject[..len].to_vec();
    assert_eq!(checked(&rst), (sock(VIP, 80), client));
    let (_, rest) = Ipv4Header::from_slice(&rst).expect("ipv4");
    let (header, _) = TcpHeader::from_slice(rest).expect("tcp");
    assert!(header.rst && header.ack && !header.syn);
    assert_eq!(header.acknowledgment_number, 1001, "acknowledges the SYN");

    // An ACK is answered with a reset at its acknowledgment number.
    let mut ack = tcp(client, sock(VIP, 80), ACK, 1001, 777, b"data");
    let Verdict::Reject { len } = h.send(&mut ack) else {
        panic!("expected a reject")
    };
    let (_, rest) = Ipv4Header::from_slice(&h.reject[..len]).expect("ipv4");
    let (header, _) = TcpHeader::from_slice(rest).expect("tcp");
    assert!(header.rst && !header.ack);
    assert_eq!(header.sequence_number, 777);
    // A reset is never answered.
    let mut rst = tcp(client, sock(VIP, 80), RST, 1, 0, &[]);
    assert_eq!(h.send(&mut rst), Verdict::Drop(DropReason::InvalidTcp));
    assert_eq!(h.metrics().rejected.load(Ordering::Relaxed), 2);
}

#[test]
fn no_endpoints_rejects_udp_with_port_unreachable() {
    let mut h = Harness::new();
    h.table
        .upsert(&service("dns", VIP, 53, Protocol::Udp, vec![]));
    let client = sock(CLIENT, 33020);
    let mut query = udp(client, sock(VIP, 53), &[9; 100]);
    let original = query.clone();
    let Verdict::Reject { len } = h.send(&mut query) else {
        panic!("expected a reject")
    };
    let (src, dst, kind, quoted) = checked_icmp(&h.reject[..len]);
    assert_eq!((src, dst), (ip(VIP), ip(CLIENT)));
    assert_eq!(
        kind,
        Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port)
    );
    assert_eq!(quoted, original, "the whole small datagram is quoted");

    // Big datagrams are quoted only up to 576 bytes in all.
    let mut big = udp(client, sock(VIP, 53), &[1; 1400]);
    let Verdict::Reject { len } = h.send(&mut big) else {
        panic!("expected a reject")
    };
    assert_eq!(len, 576);
    checked_icmp(&h.reject[..len]);
}

#[test]
fn unknown_port_on_a_cluster_ip_is_refused() {
    let mut h = Harness::new();
    h.table.upsert(&web(three()));
    let mut syn = tcp(sock(CLIENT, 1), sock(VIP, 81), SYN, 1, 0, &[]);
    assert!(matches!(h.send(&mut syn), Verdict::Reject { .. }));
    let mut ping = Vec::new();
    PacketBuilder::ipv4(ip(CLIENT).octets(), ip(VIP).octets(), 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut ping, b"hi")
        .expect("ping");
    assert_eq!(
        h.send(&mut ping),
        Verdict::Drop(DropReason::UnsupportedProtocol)
    );
}

#[test]
fn unknown_service_addresses_are_dropped_and_counted() {
    let mut h = Harness::new();
    h.table.upsert(&web(three()));
    let mut syn = tcp(sock(CLIENT, 1), sock("10.43.7.7", 80), SYN, 1, 0, &[]);
    assert_eq!(h.send(&mut syn), Verdict::Drop(DropReason::NoService));
    let mut datagram = udp(sock(CLIENT, 1), sock("10.43.7.8", 53), b"q");
    assert_eq!(h.send(&mut datagram), Verdict::Drop(DropReason::NoService));
    let counts: Vec<_> = h.metrics().drop_counts().filter(|(_, n)| *n > 0).collect();
    assert_eq!(counts, [(DropReason::NoService, 2)]);
}

#[test]
fn load_balancer_is_served_on_node_ips_at_its_port() {
    let mut h = Harness::new();
    let mut spec = web(three());
    spec.load_balancer = true;
    h.table.upsert(&spec);
    let client = sock("203.0.113.7", 9000);
    let mut syn = tcp(client, sock(NODE_IP, 80), SYN, 1, 0, &[]);
    h.send(&mut syn);
    let (src, endpoint) = checked(&syn);
    assert_eq!(*src.ip(), ip(SNAT_IP));
    assert_eq!(endpoint.port(), 8080);
    let mut reply = tcp(endpoint, src, SYN | ACK, 1, 2, &[]);
    h.send(&mut reply);
    assert_eq!(checked(&reply), (sock(NODE_IP, 80), client));
}

#[test]
fn load_balancer_ports_follow_the_services_that_use_them() {
    let mut h = Harness::new();
    assert!(h.table.load_balancer_ports().is_empty());
    let mut first = web(three());
    first.load_balancer = true;
    h.table.upsert(&first);
    let mut second = service("dns", "10.43.0.9", 80, Protocol::Tcp, three());
    second.load_balancer = true;
    h.table.upsert(&second);
    let mut udp_lb = service("syslog", "10.43.0.8", 514, Protocol::Udp, three());
    udp_lb.load_balancer = true;
    h.table.upsert(&udp_lb);
    let tcp_80 = (Protocol::Tcp.number(), 80);
    let udp_514 = (Protocol::Udp.number(), 514);
    assert_eq!(
        h.table
            .load_balancer_ports()
            .into_iter()
            .collect::<Vec<_>>(),
        [tcp_80, udp_514]
    );
    // Port 80 stays while one of its two Services is still a LoadBalancer.
    h.table.upsert(&web(three()));
    assert!(h.table.load_balancer_ports().contains(&tcp_80));
    h.table.remove(&second.key);
    h.table.remove(&udp_lb.key);
    assert!(h.table.load_balancer_ports().is_empty());
}

#[test]
fn other_traffic_passes_untouched() {
    let mut h = Harness::new();
    h.table.upsert(&web(three()));
    let mut packet = tcp(sock(CLIENT, 1), sock("10.42.1.2", 8080), SYN, 1, 0, b"hi");
    let before = packet.clone();
    assert_eq!(h.send(&mut packet), Verdict::NotService);
    assert_eq!(packet, before);
    let mut v6 = vec![0x60; 60];
    assert_eq!(h.send(&mut v6), Verdict::NotService);
    let mut ping = Vec::new();
    PacketBuilder::ipv4(ip(CLIENT).octets(), [10, 42, 1, 2], 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut ping, b"hi")
        .expect("ping");
    assert_eq!(h.send(&mut ping), Verdict::NotService);
}

#[test]
fn clashing_client_ports_get_a_new_source_port() {
    let mut h = Harness::new();
    let one = vec![backend("10.42.1.9", 5353)];
    h.table
        .upsert(&service("a", "10.43.0.1", 53, Protocol::Udp, one.clone()));
    h.table
        .upsert(&service("b", "10.43.0.2", 53, Protocol::Udp, one));
    let client = sock(CLIENT, 33030);
    let mut to_a = udp(client, sock("10.43.0.1", 53), b"a");
    let mut to_b = udp(client, sock("10.43.0.2", 53), b"b");
    h.send(&mut to_a);
    h.send(&mut to_b);
    let (src_a, _) = checked(&to_a);
    let (src_b, _) = checked(&to_b);
    assert_eq!(src_a, client);
    assert_eq!(src_b.ip(), client.ip());
    assert_ne!(
        src_b.port(),
        client.port(),
        "the endpoint must tell the two flows apart"
    );
    let mut reply_b = udp(sock("10.42.1.9", 5353), src_b, b"B");
    h.send(&mut reply_b);
    assert_eq!(checked(&reply_b), (sock("10.43.0.2", 53), client));
}

#[test]
fn full_table_evicts_the_oldest_idle_flows() {
    let mut h = Harness::with(|c| c.max_flows = 4);
    h.table.upsert(&web(three()));
    let clients: Vec<_> = (0..6).map(|i| sock(CLIENT, 46000 + i)).collect();
    let mut endpoints = Vec::new();
    for client in &clients {
        h.now += 1;
        endpoints.push(connect(&mut h, *client));
    }
    assert_eq!(h.engine.flow_count(), 4);
    assert_eq!(h.metrics().flows_evicted.load(Ordering::Relaxed), 2);
    assert_eq!(h.metrics().flows_tracked.load(Ordering::Relaxed), 4);
    let live: std::collections::HashSet<_> = h
        .engine
        .flows(h.now)
        .into_iter()
        .map(|f| f.original.0)
        .collect();
    assert_eq!(live, clients[2..].iter().copied().collect());
    // The evicted flow's replies no longer translate.
    let mut reply = tcp(endpoints[0], clients[0], SYN | ACK, 1, 101, &[]);
    assert_eq!(h.send(&mut reply), Verdict::NotService);
}

#[test]
fn mid_stream_packets_are_picked_up_consistently() {
    let spec = web(three());
    let mut a = Harness::new();
    a.table.upsert(&spec);
    let mut b = a.peer(std::slice::from_ref(&spec));
    let client = sock(CLIENT, 47000);
    let endpoint = connect(&mut a, client);
    // Node b never saw the SYN (a restart, a moved flow): it still agrees.
    let mut data = tcp(client, sock(VIP, 80), ACK, 5, 5, b"x");
    b.send(&mut data);
    assert_eq!(checked(&data).1, endpoint);
    assert_eq!(b.metrics().nat_misses.load(Ordering::Relaxed), 1);
    assert_eq!(
        state_of(&b, client).state,
        FlowState::Tcp(TcpState::Established)
    );
}

#[test]
fn flow_dump_names_the_service() {
    let mut h = Harness::new();
    h.table.upsert(&web(three()));
    let client = sock(CLIENT, 48000);
    let endpoint = connect(&mut h, client);
    let flows = h.engine.flows(h.now);
    assert_eq!(flows.len(), 1);
    let line = flows[0].to_string();
    assert!(
        line.starts_with("tcp 120 SYN_SENT src=10.42.0.20 dst=10.43.0.10 sport=48000 dport=80"),
        "{line}"
    );
    assert!(
        line.contains(&format!(
            "src={} dst={CLIENT} sport=8080 dport=48000",
            endpoint.ip()
        )),
        "{line}"
    );
    assert!(line.ends_with("service=default/web"), "{line}");
}

#[test]
fn removed_services_stop_answering() {
    let mut h = Harness::new();
    h.table.upsert(&web(three()));
    let client = sock(CLIENT, 49000);
    connect(&mut h, client);
    assert!(h.table.remove(&ServiceKey::new("default", "web")));
    assert!(h.table.is_empty());
    let mut data = tcp(client, sock(VIP, 80), ACK, 101, 1, b"x");
    assert!(
        matches!(h.send(&mut data), Verdict::Reject { .. }),
        "the flow's endpoint is gone"
    );
    let mut syn = tcp(sock(CLIENT, 49001), sock(VIP, 80), SYN, 1, 0, &[]);
    assert_eq!(
        h.send(&mut syn),
        Verdict::Drop(DropReason::NoService),
        "no longer a Service address"
    );
}

#[test]
fn fragments_to_a_service_are_dropped() {
    let mut h = Harness::new();
    h.table.upsert(&web(three()));
    let mut packet = udp(sock(CLIENT, 1), sock(VIP, 80), &[0; 64]);
    packet[6] = 0x20; // More fragments.
    let check = super::checksum::checksum(&{
        let mut header = packet[..20].to_vec();
        header[10] = 0;
        header[11] = 0;
        header
    });
    packet[10..12].copy_from_slice(&check.to_be_bytes());
    assert_eq!(h.send(&mut packet), Verdict::Drop(DropReason::Fragment));
}

/// A table and engine with live flows to aim malformed packets at.
fn fuzz_harness() -> Harness {
    let mut h = Harness::new();
    let mut spec = node_port_service(false);
    spec.affinity_timeout_secs = Some(30);
    h.table.upsert(&spec);
    h.table.upsert(&service(
        "dns",
        "10.43.0.53",
        53,
        Protocol::Udp,
        vec![backend("10.42.1.9", 5353)],
    ));
    h.table
        .upsert(&service("empty", "10.43.0.99", 80, Protocol::Tcp, vec![]));
    connect(&mut h, sock(CLIENT, 40000));
    h.send(&mut udp(sock(CLIENT, 5000), sock("10.43.0.53", 53), b"q"));
    h
}

fn seed_packets() -> Vec<Vec<u8>> {
    let syn = tcp(sock(CLIENT, 40000), sock(VIP, 80), SYN, 1, 0, b"abc");
    let query = udp(sock(CLIENT, 5000), sock("10.43.0.53", 53), b"q");
    let error = icmp_error(
        "10.42.1.9",
        CLIENT,
        &udp(sock(CLIENT, 5000), sock("10.42.1.9", 5353), b"q"),
    );
    vec![
        syn,
        query,
        error,
        tcp(sock(CLIENT, 1), sock("10.43.0.99", 80), SYN, 1, 0, &[]),
        udp(sock("203.0.113.1", 1), sock(NODE_IP, 30080), b""),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), partial: bool) {
        let mut h = fuzz_harness();
        let mut packet = bytes;
        let mut reject = vec![0; 64];
        h.engine.process(h.now, &mut packet, PacketMeta { checksum_partial: partial }, &mut reject);
    }

    #[test]
    fn mangled_packets_never_panic(
        which in 0usize..5,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cut in any::<usize>(),
        reject_room in 0usize..600,
    ) {
        let mut h = fuzz_harness();
        let mut packet = seed_packets().swap_remove(which);
        for (at, value) in flips {
            let len = packet.len();
            packet[at % len] = value;
        }
        packet.truncate(cut % (packet.len() + 1));
        let mut reject = vec![0; reject_room];
        let verdict = h.engine.process(h.now, &mut packet, PacketMeta::default(), &mut reject);
        if let Verdict::Reject { len } = verdict {
            prop_assert!(len <= reject_room);
        }
    }

    #[test]
    fn valid_flows_always_verify(sport in 1u16.., payload in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut h = fuzz_harness();
        let client = sock("10.42.7.7", sport);
        let mut packet = tcp(client, sock(VIP, 80), SYN, 9, 0, &payload);
        h.send(&mut packet);
        let (_, endpoint) = checked(&packet);
        let mut reply = tcp(endpoint, client, SYN | ACK, 3, 10, &payload);
        h.send(&mut reply);
        prop_assert_eq!(checked(&reply), (sock(VIP, 80), client));
    }
}
