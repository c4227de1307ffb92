//! The DNS server on real loopback sockets: UDP through the batched
//! workers, TCP, forwarding to a test upstream (with TCP fallback and the
//! cache), the slow path's error answers, and the metrics endpoint.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use dns::records::{PortInfo, ServiceInfo, ServiceKind, service_records};
use dns::zone::Owner;
use dns::{DnsConfig, Server};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn query(id: u16, name: &str, rtype: RecordType) -> Message {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    m
}

fn udp_exchange(server: SocketAddr, packet: &[u8]) -> Option<Message> {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    socket.send_to(packet, server).unwrap();
    let mut buf = [0u8; 65535];
    let n = socket.recv(&mut buf).ok()?;
    Some(Message::from_vec(&buf[..n]).expect("a decodable answer"))
}

async fn udp(server: SocketAddr, m: &Message) -> Message {
    let bytes = m.to_vec().unwrap();
    tokio::task::spawn_blocking(move || udp_exchange(server, &bytes))
        .await
        .unwrap()
        .expect("an answer over UDP")
}

async fn tcp(server: SocketAddr, m: &Message) -> Message {
    let mut stream = tokio::net::TcpStream::connect(server).await.unwrap();
    let bytes = m.to_vec().unwrap();
    stream.write_u16(bytes.len() as u16).await.unwrap();
    stream.write_all(&bytes).await.unwrap();
    let len = stream.read_u16().await.unwrap();
    let mut buf = vec![0u8; usize::from(len)];
    stream.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).unwrap()
}

/// A tiny upstream: `www.example.com` A 192.0.2.1 (TTL 60), `big.example.com`
/// truncated over UDP and whole over TCP, anything else NXDOMAIN.
struct Upstream {
    addr: SocketAddr,
    queries: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn upstream_answer(request: &Message, tcp: bool) -> Message {
    let mut m = Message::response(request.metadata.id, OpCode::Query);
    m.metadata.recursion_available = true;
    m.queries = request.queries.clone();
    let q = &request.queries[0];
    let name = q.name().to_lowercase().to_string();
    match name.as_str() {
        "www.example.com." => {
            m.add_answer(Record::from_rdata(
                q.name().clone(),
                60,
                RData::A(A::new(192, 0, 2, 1)),
            ));
        }
        "big.example.com." if !tcp => m.metadata.truncation = true,
        "big.example.com." => {
            for i in 0..100 {
                m.add_answer(Record::from_rdata(
                    q.name().clone(),
                    60,
                    RData::A(A::new(192, 0, 2, i)),
                ));
            }
        }
        _ => {
            m.metadata.response_code = ResponseCode::NXDomain;
            let zone = Name::from_ascii("example.com.").unwrap();
            let soa = SOA::new(zone.clone(), zone.clone(), 1, 1, 1, 1, 30);
            m.add_authority(Record::from_rdata(zone, 30, RData::SOA(soa)));
        }
    }
    m
}

async fn start_upstream() -> Upstream {
    let socket = tokio::net::UdpSocket::bind("127.0.0.7:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let queries = Arc::new(AtomicUsize::new(0));
    let counter = queries.clone();
    let udp_task = tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            counter.fetch_add(1, Ordering::SeqCst);
            if let Ok(request) = Message::from_vec(&buf[..n]) {
                let answer = upstream_answer(&request, false).to_vec().unwrap();
                let _ = socket.send_to(&answer, from).await;
            }
        }
    });
    let tcp_task = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let len = stream.read_u16().await.unwrap();
            let mut buf = vec![0u8; usize::from(len)];
            stream.read_exact(&mut buf).await.unwrap();
            let request = Message::from_vec(&buf).unwrap();
            let answer = upstream_answer(&request, true).to_vec().unwrap();
            stream.write_u16(answer.len() as u16).await.unwrap();
            stream.write_all(&answer).await.unwrap();
        }
    });
    Upstream {
        addr,
        queries,
        tasks: vec![udp_task, tcp_task],
    }
}

async fn start(
    resolv_conf: Option<std::path::PathBuf>,
    metrics: Option<SocketAddr>,
) -> (Server, SocketAddr) {
    let listen = vec!["127.0.0.1:0".parse().unwrap()];
    start_on(listen, resolv_conf, metrics).await
}

/// The test server on `listen`; the address returned is the first one's.
async fn start_on(
    listen: Vec<SocketAddr>,
    resolv_conf: Option<std::path::PathBuf>,
    metrics: Option<SocketAddr>,
) -> (Server, SocketAddr) {
    let config = DnsConfig {
        listen,
        upstream_resolv_conf: resolv_conf,
        workers: 2,
        metrics_listen: metrics,
        ..DnsConfig::default()
    };
    let (server, mut builder) = Server::start(&config).await.unwrap();
    let svc = ServiceInfo {
        kind: ServiceKind::ClusterIp(vec!["10.43.0.20".parse().unwrap()]),
        ports: vec![PortInfo {
            name: "http".into(),
            protocol: "tcp".into(),
            port: 80,
        }],
        publish_not_ready: false,
    };
    let records = service_records(
        builder.apex(),
        "default",
        "web",
        &svc,
        std::iter::empty(),
        std::iter::empty(),
    );
    builder.set_owner(Owner::Service("default".into(), "web".into()), records);
    // ExternalNames: one out of the cluster, one to `web`.
    for (name, target) in [
        ("ext", "www.example.com"),
        ("alias", "web.default.svc.cluster.local"),
    ] {
        let svc = ServiceInfo {
            kind: ServiceKind::ExternalName(target.into()),
            ports: vec![],
            publish_not_ready: false,
        };
        let records = service_records(
            builder.apex(),
            "default",
            name,
            &svc,
            std::iter::empty(),
            std::iter::empty(),
        );
        builder.set_owner(Owner::Service("default".into(), name.into()), records);
    }
    builder.set_ready();
    builder.publish(&server.published);
    let addr = server.local_addrs[0];
    (server, addr)
}

fn a_records(m: &Message) -> Vec<String> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_cluster_names_over_udp_and_tcp() {
    let (server, addr) = start(None, None).await;
    let q = query(7, "web.default.svc.cluster.local.", RecordType::A);
    let m = udp(addr, &q).await;
    assert_eq!(m.metadata.id, 7);
    assert_eq!(a_records(&m), vec!["10.43.0.20"]);
    let m = tcp(addr, &q).await;
    assert_eq!(a_records(&m), vec!["10.43.0.20"]);
    // Many queries in flight at once go through the batched path.
    let mut handles = Vec::new();
    for i in 0..200u16 {
        let q = query(i, "web.default.svc.cluster.local.", RecordType::A);
        handles.push(tokio::spawn(async move { udp(addr, &q).await }));
    }
    for (i, h) in handles.into_iter().enumerate() {
        let m = h.await.unwrap();
        assert_eq!(m.metadata.id, i as u16);
        assert_eq!(a_records(&m), vec!["10.43.0.20"]);
    }
    assert!(server.metrics.responses(0) >= 202);
    // Without upstreams, other names are refused.
    let m = udp(addr, &query(8, "www.example.com.", RecordType::A)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
    // An ExternalName to a cluster name carries its address; one to an
    // outside name is the CNAME alone when there is no upstream.
    let m = udp(
        addr,
        &query(9, "alias.default.svc.cluster.local.", RecordType::A),
    )
    .await;
    assert_eq!(a_records(&m), vec!["10.43.0.20"]);
    assert!(matches!(m.answers[0].data, RData::CNAME(_)));
    let m = udp(
        addr,
        &query(10, "ext.default.svc.cluster.local.", RecordType::A),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(m.answers.len(), 1);
    assert!(matches!(m.answers[0].data, RData::CNAME(_)));
}

/// One client socket with many queries in flight: answers of one size
/// for it leave the worker as one segmented send, and must still arrive
/// as one datagram per answer, each matching its query. Over IPv4 and
/// IPv6.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_answers_for_one_client_arrive_one_per_datagram() {
    let listen = vec!["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()];
    let (server, _) = start_on(listen, None, None).await;
    for addr in server.local_addrs.clone() {
        let answers = tokio::task::spawn_blocking(move || answers_in_rounds(addr))
            .await
            .unwrap();
        check_answers(answers);
    }
}

/// 300 queries from one socket to `addr`, in rounds of 60, and their answers.
fn answers_in_rounds(addr: SocketAddr) -> Vec<Message> {
    let local = if addr.is_ipv6() {
        "[::1]:0"
    } else {
        "127.0.0.1:0"
    };
    let socket = UdpSocket::bind(local).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answers = Vec::new();
    let mut buf = [0u8; 65535];
    // In rounds small enough for the client's receive buffer. Same-size
    // answers (the A record), and some of another size (NXDOMAIN with
    // its SOA) mixed in.
    for round in 0..5u16 {
        for id in round * 60..(round + 1) * 60 {
            let name = if id % 5 == 0 {
                "nope.default.svc.cluster.local."
            } else {
                "web.default.svc.cluster.local."
            };
            let packet = query(id, name, RecordType::A).to_vec().unwrap();
            socket.send_to(&packet, addr).unwrap();
        }
        while answers.len() < usize::from(round + 1) * 60 {
            let n = socket.recv(&mut buf).expect("every query answered");
            answers.push(Message::from_vec(&buf[..n]).expect("one whole answer per datagram"));
        }
    }
    answers
}

/// Each of the 300 queries answered once, as asked.
fn check_answers(answers: Vec<Message>) {
    let mut seen = vec![false; 300];
    for m in answers {
        let id = m.metadata.id;
        assert!(!seen[usize::from(id)], "answer {id} twice");
        seen[usize::from(id)] = true;
        if id % 5 == 0 {
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        } else {
            assert_eq!(a_records(&m), vec!["10.43.0.20"], "answer {id}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_with_cache_and_tcp_fallback() {
    let upstream = start_upstream().await;
    let dir = tempfile::Builder::new()
        .prefix("skiff-dns-test-")
        .tempdir()
        .unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, format!("nameserver {}\n", upstream.addr)).unwrap();
    let (server, addr) = start(Some(resolv), None).await;

    let m = udp(addr, &query(1, "www.example.com.", RecordType::A)).await;
    assert_eq!(a_records(&m), vec!["192.0.2.1"]);
    assert_eq!(m.metadata.id, 1);
    let entries = |kind: &'static str| {
        server
            .metrics
            .cache_entries
            .get_or_create(&vec![("server", "dns://"), ("type", kind)])
            .get()
    };
    assert_eq!(entries("success"), 1);
    let before = upstream.queries.load(Ordering::SeqCst);
    let m = udp(addr, &query(2, "WWW.example.com.", RecordType::A)).await;
    assert_eq!(a_records(&m), vec!["192.0.2.1"]);
    assert!(m.answers[0].ttl <= 60);
    assert_eq!(
        upstream.queries.load(Ordering::SeqCst),
        before,
        "served from the cache"
    );

    // Truncated upstream answer: fetched over TCP; the UDP client without
    // EDNS gets TC, the TCP client the whole answer.
    let m = udp(addr, &query(3, "big.example.com.", RecordType::A)).await;
    assert!(m.metadata.truncation);
    let m = tcp(addr, &query(4, "big.example.com.", RecordType::A)).await;
    assert_eq!(m.answers.len(), 100);

    let m = udp(addr, &query(5, "nope.example.com.", RecordType::A)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    let before = upstream.queries.load(Ordering::SeqCst);
    let m = udp(addr, &query(6, "nope.example.com.", RecordType::A)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(
        upstream.queries.load(Ordering::SeqCst),
        before,
        "negative answers are cached"
    );
    assert_eq!(entries("denial"), 1);

    // An ExternalName to an outside name: the CNAME, then the target's
    // address from upstream (cached like any forwarded answer), over UDP
    // and TCP.
    for over_tcp in [false, true] {
        let q = query(7, "ext.default.svc.cluster.local.", RecordType::A);
        let m = if over_tcp {
            tcp(addr, &q).await
        } else {
            udp(addr, &q).await
        };
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        let RData::CNAME(target) = &m.answers[0].data else {
            panic!("a CNAME first: {m:?}");
        };
        assert_eq!(target.0.to_string(), "www.example.com.");
        assert_eq!(a_records(&m), vec!["192.0.2.1"]);
        assert_eq!(m.answers[1].name.to_string(), "www.example.com.");
    }

    // Cluster names never leave the node.
    let before = upstream.queries.load(Ordering::SeqCst);
    let m = udp(
        addr,
        &query(9, "nope.default.svc.cluster.local.", RecordType::A),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(upstream.queries.load(Ordering::SeqCst), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusual_and_broken_messages() {
    let (server, addr) = start(None, None).await;
    // EDNS version 1: BADVERS.
    let mut q = query(1, "web.default.svc.cluster.local.", RecordType::A);
    let mut edns = Edns::new();
    edns.set_version(1);
    q.set_edns(edns);
    let m = udp(addr, &q).await;
    // 16 is BADVERS (and BADSIG, which the decoder names it).
    assert_eq!(u16::from(m.metadata.response_code), 16);
    // Another opcode: NOTIMP.
    let mut q = query(2, "web.default.svc.cluster.local.", RecordType::A);
    q.metadata.op_code = OpCode::Update;
    let m = udp(addr, &q).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NotImp);
    // A question name that points at itself: a compression loop. The
    // full decoder must reject it (FORMERR), not hang or crash.
    let mut packet = vec![0, 3, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
    packet.extend([0xc0, 12, 0, 1, 0, 1]);
    let looped = tokio::task::spawn_blocking(move || udp_exchange(addr, &packet))
        .await
        .unwrap();
    if let Some(m) = looped {
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
    }
    // Garbage is dropped and counted; the server keeps answering.
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    for junk in [&[1u8, 2, 3][..], &[0xff; 600][..], &[0u8; 12][..]] {
        socket.send_to(junk, addr).unwrap();
    }
    let m = udp(
        addr,
        &query(4, "web.default.svc.cluster.local.", RecordType::A),
    )
    .await;
    assert_eq!(a_records(&m), vec!["10.43.0.20"]);
    // The junk may land on another SO_REUSEPORT worker than the query, so
    // it may still be in flight: wait for the count rather than race it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while server.metrics.dropped_total() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(server.metrics.dropped_total() >= 2);
    // Oversized datagrams are dropped, not answered.
    let mut huge = query(5, "web.default.svc.cluster.local.", RecordType::A)
        .to_vec()
        .unwrap();
    huge.resize(8000, 0);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    socket.send_to(&huge, addr).unwrap();
    let mut buf = [0u8; 512];
    assert!(
        socket.recv(&mut buf).is_err(),
        "an oversized query is not answered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_use_coredns_names() {
    let metrics_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (_server, addr) = start(None, Some(metrics_addr)).await;
    udp(
        addr,
        &query(1, "web.default.svc.cluster.local.", RecordType::A),
    )
    .await;
    udp(
        addr,
        &query(2, "nope.default.svc.cluster.local.", RecordType::A),
    )
    .await;
    let mut stream = tokio::net::TcpStream::connect(metrics_addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    let line = |prefix: &str| {
        body.lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no {prefix} in {body}"))
            .to_owned()
    };
    assert!(
        line(r#"coredns_dns_requests_total{server="dns://",zone=".",proto="udp",type="A"}"#)
            .ends_with(" 2")
    );
    assert!(
        line(r#"coredns_dns_responses_total{server="dns://",zone=".",rcode="NXDOMAIN"}"#)
            .ends_with(" 1")
    );
    assert!(body.contains("coredns_cache_misses_total"));
}
