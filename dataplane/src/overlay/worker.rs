//! The packet loop of one worker thread. Each worker owns one TUN queue,
//! one receiving socket (sharing the overlay port with the other workers'
//! through `SO_REUSEPORT`) and one sending socket, and moves packets both
//! ways:
//!
//! - out: read a packet or super-packet from the TUN queue, find the node
//!   that owns its destination and queue it as one GSO message: a TCP
//!   super-packet cut into self-contained segments, one per datagram (their
//!   headers written into per-read scratch, their payloads iovecs into the
//!   read buffer: no payload is copied); anything else whole, or in
//!   fragments behind overlay headers. After a batch of reads, send every
//!   queued message with one `sendmmsg`.
//! - in: receive a batch of GRO messages with one `recvmmsg`, drop what
//!   comes from unknown nodes, check every datagram's header, join
//!   consecutive TCP segments of a flow into one super-packet and write it
//!   to the TUN queue with one `writev`; other packets are written one by
//!   one (a fragmented one with one `writev` over its fragments, or through
//!   the reassembly slots when its fragments were split across messages).
//!
//! All buffers are allocated when the worker starts; the loop allocates,
//! locks and spawns nothing. The peer table is re-read only when the node
//! watcher published a new generation.

use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use ipnet::Ipv4Net;

use crate::device::tun::Queue;
use crate::device::udp::{MAX_PARTS, RecvBatch, SendBatch, UdpSocket};
use crate::metrics::{Drop, Io, Local, Metrics};
use crate::service::{Engine, PacketMeta, Verdict};
use crate::services::Services;
use crate::wire::overlay::{
    self, FLAG_CSUM_PARTIAL, FLAG_VNET, HEADER_LEN, Header, MAX_FRAGMENTS, MAX_PAYLOAD,
};
use crate::wire::{self, checksum, ip, tcp, vnet};

use super::idle_spin::IdleSpin;
use super::peers::{PeerTable, Reader};
use super::reassembly::Reassembly;

/// TUN reads, and received messages, handled between two polls.
const BATCH: usize = 16;
/// The largest UDP payload one GSO send may carry over IPv4.
const MAX_GSO_BYTES: usize = 65_507;
/// The kernel's limit on datagrams in one GSO send (`UDP_MAX_SEGMENTS`).
const MAX_GSO_SEGMENTS: usize = 64;
/// How long a poll waits before the worker checks whether to stop.
const POLL_MS: libc::c_int = 100;
/// After handling packets, the worker keeps looking for more this long
/// before it sleeps in `poll`. A request's answer usually follows within
/// tens of microseconds, and waking a sleeping thread costs about as much
/// again on each of the four hops of a round trip. While it looks, it
/// yields the CPU to anything else runnable on it.
const LINGER: std::time::Duration = std::time::Duration::from_micros(60);

/// The packet loop's nice value. The kernel's own forwarding (VXLAN,
/// bridging) runs in softirq context, ahead of every process; a packet
/// loop at the default weight falls far behind it when the node's other
/// processes keep the CPUs busy (measured on a machine busy compiling:
/// 1.9 Gbit/s against kernel VXLAN's 11.6). Needs `CAP_SYS_NICE`; without
/// it the loop keeps the default.
const NICE: libc::c_int = -10;

/// Most segments of one TCP super-packet; the TUN device's
/// `gso_max_segs`, so the kernel never hands over more.
pub const MAX_SEGMENTS: usize = 64;
/// Room for one datagram's headers: overlay header, then (for a TCP
/// segment) the inner IP and TCP headers.
const HEAD_ROOM: usize = HEADER_LEN + tcp::MAX_HEADERS;

/// Datagrams of `size` bytes that fit in one GSO send.
fn per_message(size: usize) -> usize {
    (MAX_GSO_BYTES / size.max(1)).clamp(1, MAX_GSO_SEGMENTS)
}

/// What `Worker::new` needs.
pub struct Setup {
    pub queue: Queue,
    pub rx: UdpSocket,
    pub tx: UdpSocket,
    pub peers: Reader,
    pub metrics: Arc<Metrics>,
    pub stop: Arc<AtomicBool>,
    /// Fragment size: the TUN MTU, so that a lone packet is one datagram.
    pub chunk: usize,
    pub mtu: usize,
    /// The Service engine, when this node balances Services.
    pub services: Option<ServiceSetup>,
    /// Keep polling this long after a packet while the CPU is otherwise
    /// idle (see `idle_spin`); zero sleeps after the linger.
    pub busy_poll: std::time::Duration,
}

pub struct ServiceSetup {
    pub engine: Engine,
    pub services: Arc<Services>,
    /// The pod network: translated packets to an address outside it (a
    /// host process's) go back to the kernel, not to a peer.
    pub cluster_cidr: Option<Ipv4Net>,
}

pub struct Worker {
    queue: Queue,
    rx: UdpSocket,
    tx: UdpSocket,
    peers: Reader,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    local: Local,
    out: Outbound,
    inbound: Inbound,
    svc: Option<Svc>,
    idle_spin: Option<IdleSpin>,
}

/// The Service engine inside the packet loop.
///
/// Out (read from the TUN): every packet goes through the engine first.
/// Translated packets go on by their new destination — to a peer, or back
/// into the device for an endpoint on this node; rejects go back into the
/// device to the client.
///
/// In (from a peer): only packets of tracked flows (replies to translated
/// flows) are for the engine; `Engine::tracks` checks the headers in
/// place, so other traffic is not copied. Those are gathered into
/// `scratch` (a super-packet arrives as fragments), translated there and
/// written from it.
struct Svc {
    engine: Engine,
    services: Arc<Services>,
    cluster_cidr: Option<Ipv4Net>,
    local_pods: Option<Ipv4Net>,
    reject: Box<[u8]>,
    scratch: Box<[u8]>,
    epoch: Instant,
    now: u64,
}

/// Flow-table slots the engine sweeps for expired flows per poll round.
const SWEEP_BUDGET: usize = 256;
/// The reject buffer: a virtio-net header and the largest reject.
const REJECT_LEN: usize = 576;

/// Where a packet read from the TUN goes after the engine.
enum Out {
    /// To the peer owning its (possibly new) destination.
    Encapsulate,
    /// Written back to the device or dropped: done with.
    Done,
}

struct Outbound {
    bufs: Vec<Box<[u8]>>,
    /// `MAX_SEGMENTS` datagram headers per read buffer.
    headers: Vec<[u8; HEAD_ROOM]>,
    batch: SendBatch,
    next_id: u32,
    chunk: usize,
    /// Fragments that fit in one GSO send.
    per_message: usize,
}

struct Inbound {
    batch: RecvBatch,
    reassembly: Reassembly,
    mtu: usize,
}

/// The virtio-net header for a packet that needs nothing from the kernel.
const PLAIN_VNET: [u8; vnet::HEADER_LEN] = [0; vnet::HEADER_LEN];

impl Worker {
    pub fn new(setup: Setup) -> Self {
        let chunk = setup.chunk.max(1);
        let per_message = per_message(HEADER_LEN + chunk);
        Worker {
            queue: setup.queue,
            rx: setup.rx,
            tx: setup.tx,
            peers: setup.peers,
            metrics: setup.metrics,
            stop: setup.stop,
            local: Local::default(),
            idle_spin: IdleSpin::new(setup.busy_poll),
            out: Outbound {
                bufs: (0..BATCH)
                    .map(|_| vec![0; MAX_PAYLOAD].into_boxed_slice())
                    .collect(),
                headers: vec![[0; HEAD_ROOM]; BATCH * MAX_SEGMENTS],
                batch: SendBatch::new(BATCH * 2),
                next_id: 0,
                chunk,
                per_message,
            },
            inbound: Inbound {
                batch: RecvBatch::new(BATCH),
                reassembly: Reassembly::new(),
                mtu: setup.mtu,
            },
            svc: setup.services.map(|s| Svc {
                engine: s.engine,
                services: s.services,
                cluster_cidr: s.cluster_cidr,
                local_pods: None,
                reject: vec![0; vnet::HEADER_LEN + REJECT_LEN].into_boxed_slice(),
                scratch: vec![0; MAX_PAYLOAD + vnet::HEADER_LEN].into_boxed_slice(),
                epoch: Instant::now(),
                now: 0,
            }),
        }
    }

    /// Runs until the stop flag is set.
    pub fn run(mut self) {
        raise_priority();
        let mut fds = [
            libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&self.queue),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: std::os::fd::AsRawFd::as_raw_fd(&self.rx),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let mut busy_until: Option<Instant> = None;
        while !self.stop.load(Ordering::Relaxed) {
            for fd in &mut fds {
                fd.revents = 0;
            }
            let now = Instant::now();
            let lingering = busy_until.is_some_and(|until| now < until)
                || self
                    .idle_spin
                    .as_mut()
                    .is_some_and(|spin| spin.keep_polling(now));
            let timeout = if lingering { 0 } else { POLL_MS };
            // SAFETY: two valid pollfds.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
            if ready <= 0 && lingering {
                std::thread::yield_now();
                continue;
            }
            let table = self.peers.refresh();
            if let Some(svc) = &mut self.svc {
                svc.tick(table);
            }
            if ready <= 0 {
                busy_until = None;
                continue;
            }
            let now = Instant::now();
            busy_until = Some(now + LINGER);
            if let Some(spin) = &mut self.idle_spin {
                spin.restart(now);
            }
            if fds[0].revents != 0 {
                self.pump_tun();
            }
            if fds[1].revents != 0 {
                self.pump_udp();
            }
            self.local.flush(&self.metrics);
        }
    }

    /// Out: TUN → underlay.
    fn pump_tun(&mut self) {
        let table = self.peers.table();
        let out = &mut self.out;
        let mut slot = 0;
        while slot < BATCH {
            let len = match self.queue.read(&mut out.bufs[slot]) {
                Ok(Some(len)) => {
                    let gso = len >= vnet::HEADER_LEN
                        && vnet::Packet::new_unchecked(&out.bufs[slot][..len]).is_gso();
                    self.local.io(Io::TunRead, len, usize::from(gso));
                    len
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "TUN read failed");
                    self.local.drop(Drop::Io, 1);
                    break;
                }
            };
            if let Some(svc) = &mut self.svc
                && let Out::Done = svc.outbound(&mut out.bufs[slot][..len], &self.queue, table)
            {
                continue;
            }
            let headers = &mut out.headers[slot * MAX_SEGMENTS..(slot + 1) * MAX_SEGMENTS];
            let queued = encapsulate(
                &mut out.bufs[slot][..len],
                headers,
                Encap {
                    batch: &mut out.batch,
                    tx: &self.tx,
                    table,
                    local: &mut self.local,
                    next_id: &mut out.next_id,
                    chunk: out.chunk,
                    per_message: out.per_message,
                },
            );
            if queued {
                slot += 1;
            }
        }
        flush(&mut out.batch, &self.tx, &mut self.local);
    }

    /// In: underlay → TUN.
    fn pump_udp(&mut self) {
        let inbound = &mut self.inbound;
        let received = match inbound.batch.recv(&self.rx) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "underlay receive failed");
                self.local.drop(Drop::Io, 1);
                return;
            }
        };
        let table = self.peers.table();
        if received > 0 {
            let (bytes, datagrams) = (0..received)
                .filter_map(|i| inbound.batch.get(i))
                .fold((0, 0), |(b, d), m| {
                    (b + m.data.len(), d + m.data.len().div_ceil(m.segment))
                });
            self.local.io(Io::UdpRecv, bytes, datagrams);
        }
        let mut decap = Decap {
            queue: &self.queue,
            table,
            local: &mut self.local,
            mtu: inbound.mtu,
            svc: self.svc.as_mut(),
        };
        // One run for the whole batch: a super-packet of more segments than
        // one GSO send carries arrives as consecutive messages, and joined
        // again here it reaches the TUN device in one write.
        let mut run = Run::default();
        let mut run_from = None;
        for i in 0..received {
            let Some(message) = inbound.batch.get(i) else {
                break;
            };
            let datagrams = message.data.len().div_ceil(message.segment).max(1) as u64;
            let from = match message.from {
                Some(from) if table.is_known_source(from.ip()) => from,
                _ => {
                    decap.local.drop(Drop::UnknownSource, datagrams);
                    continue;
                }
            };
            if message.truncated {
                decap.local.drop(Drop::Oversized, datagrams);
                continue;
            }
            if run_from != Some(from) {
                run.deliver(&mut decap);
                run_from = Some(from);
            }
            decapsulate(
                message.data,
                message.segment,
                from,
                &mut inbound.reassembly,
                &mut run,
                &mut decap,
            );
        }
        run.deliver(&mut decap);
    }
}

struct Encap<'a> {
    batch: &'a mut SendBatch,
    tx: &'a UdpSocket,
    table: &'a PeerTable,
    local: &'a mut Local,
    next_id: &'a mut u32,
    chunk: usize,
    per_message: usize,
}

/// Queues the packet in `buf` (virtio-net header first) for its node.
/// Returns whether the batch now refers to `buf` and `headers`, which must
/// then stay untouched until the batch is flushed.
fn encapsulate(buf: &mut [u8], headers: &mut [[u8; HEAD_ROOM]], mut e: Encap<'_>) -> bool {
    let len = buf.len();
    let header = vnet::Packet::new_unchecked(&*buf);
    if let Err(err) = header.check(len) {
        e.local.drop(reason(err), 1);
        return false;
    }
    let (gso, needs_csum) = (header.is_gso(), header.needs_csum());
    let (csum_start, csum_offset) = (
        usize::from(header.csum_start()),
        usize::from(header.csum_offset()),
    );
    let dst = match ip::destination(&buf[vnet::HEADER_LEN..], len - vnet::HEADER_LEN) {
        Ok(dst) => dst,
        Err(err) => {
            e.local.drop(reason(err), 1);
            return false;
        }
    };
    let Some(to) = e.table.lookup(dst) else {
        e.local.drop(Drop::UnknownDestination, 1);
        return false;
    };
    if gso && needs_csum {
        let gso_type = header.gso_type() & !vnet::GSO_ECN;
        let mss = usize::from(header.gso_size());
        if let Some(queued) = queue_segments(
            &buf[vnet::HEADER_LEN..],
            gso_type,
            mss,
            csum_start,
            headers,
            to,
            &mut e,
        ) {
            return queued;
        }
    }
    // A super-packet travels with its virtio-net header so the receiving
    // kernel can segment it; a lone packet travels bare, its checksum
    // finished here as a NIC would.
    let (payload, flags) = if gso {
        (&buf[..], FLAG_VNET)
    } else {
        let inner = &mut buf[vnet::HEADER_LEN..];
        if needs_csum && !checksum::complete(inner, csum_start, csum_offset) {
            e.local.drop(Drop::Malformed, 1);
            return false;
        }
        (&buf[vnet::HEADER_LEN..], 0)
    };
    let count = payload.len().div_ceil(e.chunk).max(1);
    if count > usize::from(MAX_FRAGMENTS) {
        e.local.drop(Drop::Oversized, 1);
        return false;
    }
    let packet_id = *e.next_id;
    *e.next_id = e.next_id.wrapping_add(1);
    for (index, head) in headers[..count].iter_mut().enumerate() {
        let Some(head) = head.first_chunk_mut::<HEADER_LEN>() else {
            return false;
        };
        Header {
            flags,
            frag_index: index as u8,
            frag_count: count as u8,
            packet_id,
            payload_len: payload.len() as u32,
        }
        .emit(head);
    }
    let mut parts = [IoSlice::new(&[]); MAX_PARTS];
    let mut first = 0;
    while first < count {
        let n = (count - first).min(e.per_message);
        for k in 0..n {
            let index = first + k;
            let start = index * e.chunk;
            let end = (start + e.chunk).min(payload.len());
            parts[2 * k] = IoSlice::new(&headers[index][..HEADER_LEN]);
            parts[2 * k + 1] = IoSlice::new(&payload[start..end]);
        }
        // SAFETY: `parts` point into `buf` and `headers`, which the caller
        // leaves alone until the batch is flushed.
        let mut queued = unsafe { e.batch.push(to, &parts[..2 * n], HEADER_LEN + e.chunk) };
        if !queued {
            flush(e.batch, e.tx, e.local);
            // SAFETY: as above.
            queued = unsafe { e.batch.push(to, &parts[..2 * n], HEADER_LEN + e.chunk) };
        }
        if !queued {
            e.local.drop(Drop::Io, 1);
            return false;
        }
        first += n;
    }
    e.local.packets_out += 1;
    e.local.bytes_out += (len - vnet::HEADER_LEN) as u64;
    true
}

/// Cuts the TCP super-packet `inner` into segments of `mss` bytes, each a
/// whole TCP/IP packet in its own datagram, and queues them as GSO trains
/// to `to`. `None` when it is not a super-packet this can cut (the caller
/// then sends it whole, in fragments).
fn queue_segments(
    inner: &[u8],
    gso_type: u8,
    mss: usize,
    csum_start: usize,
    headers: &mut [[u8; HEAD_ROOM]],
    to: SocketAddr,
    e: &mut Encap<'_>,
) -> Option<bool> {
    let l = tcp::layout(inner)?;
    let expected = if l.v6 {
        vnet::GSO_TCPV6
    } else {
        vnet::GSO_TCPV4
    };
    let data = inner.len() - l.hdr_len;
    let count = data.div_ceil(mss.max(1));
    if gso_type != expected
        || csum_start != l.ip_len
        || mss == 0
        || l.hdr_len + mss > e.chunk
        || count == 0
        || count > headers.len().min(MAX_SEGMENTS)
    {
        return None;
    }
    let head_len = HEADER_LEN + l.hdr_len;
    for (index, room) in headers[..count].iter_mut().enumerate() {
        let start = index * mss;
        let payload = (data - start).min(mss);
        let (overlay_head, rest) = room.split_at_mut(HEADER_LEN);
        let segment = &mut rest[..l.hdr_len];
        segment.copy_from_slice(&inner[..l.hdr_len]);
        tcp::fix_segment(segment, &l, index, count, mss, payload);
        let packet_id = *e.next_id;
        *e.next_id = e.next_id.wrapping_add(1);
        let head = overlay_head.first_chunk_mut::<HEADER_LEN>()?;
        Header {
            flags: FLAG_CSUM_PARTIAL,
            frag_index: 0,
            frag_count: 1,
            packet_id,
            payload_len: (l.hdr_len + payload) as u32,
        }
        .emit(head);
    }
    let size = head_len + mss;
    let per_message = per_message(size).min(MAX_PARTS / 2);
    let payload = &inner[l.hdr_len..];
    let mut parts = [IoSlice::new(&[]); MAX_PARTS];
    let mut first = 0;
    while first < count {
        let n = (count - first).min(per_message);
        for k in 0..n {
            let start = (first + k) * mss;
            let end = (start + mss).min(payload.len());
            parts[2 * k] = IoSlice::new(&headers[first + k][..head_len]);
            parts[2 * k + 1] = IoSlice::new(&payload[start..end]);
        }
        // SAFETY: `parts` point into the read buffer and `headers`, which
        // the caller leaves alone until the batch is flushed.
        let mut queued = unsafe { e.batch.push(to, &parts[..2 * n], size) };
        if !queued {
            flush(e.batch, e.tx, e.local);
            // SAFETY: as above.
            queued = unsafe { e.batch.push(to, &parts[..2 * n], size) };
        }
        if !queued {
            e.local.drop(Drop::Io, 1);
            return Some(false);
        }
        first += n;
    }
    e.local.packets_out += 1;
    e.local.bytes_out += inner.len() as u64;
    Some(true)
}

struct Decap<'a> {
    queue: &'a Queue,
    table: &'a PeerTable,
    local: &'a mut Local,
    mtu: usize,
    svc: Option<&'a mut Svc>,
}

/// Delivers every packet in one received message: `data` holds datagrams
/// of `segment` bytes (the last may be shorter). Consecutive TCP segments
/// of one flow are joined into one super-packet in `run`, which the caller
/// delivers once no later message can continue it.
fn decapsulate<'a>(
    data: &'a [u8],
    segment: usize,
    from: SocketAddr,
    reassembly: &mut Reassembly,
    run: &mut Run<'a>,
    d: &mut Decap<'_>,
) {
    let mut fragments: [&[u8]; MAX_FRAGMENTS as usize] = [&[]; MAX_FRAGMENTS as usize];
    let mut at = 0;
    while at < data.len() {
        let end = (at + segment).min(data.len());
        let datagram = &data[at..end];
        at = end;
        let packet = match overlay::Packet::new_checked(datagram) {
            Ok(packet) => packet,
            Err(err) => {
                d.local.drop(reason(err), 1);
                continue;
            }
        };
        if packet.frag_count() == 1 {
            let partial = packet.has_csum_partial();
            if !packet.has_vnet()
                && let Some(tcp) = tcp::Segment::joinable(packet.fragment_slice())
            {
                if run.push(tcp, partial, d.mtu) {
                    continue;
                }
                run.deliver(d);
                if run.push(tcp, partial, d.mtu) {
                    continue;
                }
            }
            run.deliver(d);
            deliver(&[packet.fragment()], packet.has_vnet(), partial, d);
            continue;
        }
        run.deliver(d);
        if packet.frag_index() == 0
            && let Some(next) = whole_train(data, at, segment, &packet, &mut fragments)
        {
            deliver(
                &fragments[..usize::from(packet.frag_count())],
                packet.has_vnet(),
                false,
                d,
            );
            at = next;
            continue;
        }
        if let Some(whole) = reassembly.push(from, &packet, d.local) {
            let vnet = whole.vnet;
            deliver(&[whole.payload], vnet, false, d);
        }
    }
}

/// Consecutive segments of one TCP flow from one peer's received messages,
/// to be written to the TUN device as one super-packet (what GRO does for
/// a NIC). Borrows the messages; allocates nothing.
struct Run<'a> {
    first: Option<tcp::Segment<'a>>,
    /// The first segment's checksum is partial (matters when it stays
    /// alone; a joined packet's checksum is always left to the kernel).
    partial: bool,
    payloads: [&'a [u8]; MAX_SEGMENTS],
    count: usize,
    bytes: usize,
    next_seq: u32,
    last_len: usize,
    last_flags: u8,
    ended: bool,
}

impl Default for Run<'_> {
    fn default() -> Self {
        Run {
            first: None,
            partial: false,
            payloads: [&[]; MAX_SEGMENTS],
            count: 0,
            bytes: 0,
            next_seq: 0,
            last_len: 0,
            last_flags: 0,
            ended: false,
        }
    }
}

impl<'a> Run<'a> {
    /// Adds `s` to the run if it continues it (or starts the run when
    /// empty); `false` when it does not fit.
    fn push(&mut self, s: tcp::Segment<'a>, partial: bool, mtu: usize) -> bool {
        let len = s.payload_len();
        if s.packet.len() > mtu {
            return false;
        }
        let Some(first) = &self.first else {
            self.first = Some(s);
            self.partial = partial;
            self.payloads[0] = s.payload();
            self.count = 1;
            self.bytes = len;
            self.next_seq = s.seq().wrapping_add(len as u32);
            self.last_len = len;
            self.last_flags = s.flags();
            self.ended = s.ends_run();
            return true;
        };
        let gso_size = self.payloads[0].len();
        if self.ended
            || self.count == MAX_SEGMENTS
            || first.layout.hdr_len + self.bytes + len > usize::from(u16::MAX)
            || self.last_len != gso_size
            || len > gso_size
            || s.seq() != self.next_seq
            || !first.same_flow(&s)
        {
            return false;
        }
        self.payloads[self.count] = s.payload();
        self.count += 1;
        self.bytes += len;
        self.next_seq = self.next_seq.wrapping_add(len as u32);
        self.last_len = len;
        self.last_flags = s.flags();
        self.ended = s.ends_run();
        true
    }

    /// Writes the run to the TUN device and empties it.
    fn deliver(&mut self, d: &mut Decap<'_>) {
        let Some(first) = self.first.take() else {
            return;
        };
        let count = std::mem::take(&mut self.count);
        if count == 1 {
            deliver(&[first.packet], false, self.partial, d);
            return;
        }
        if !d.table.is_local(first.destination()) {
            d.local.drop(Drop::UnknownDestination, count as u64);
            return;
        }
        let l = first.layout;
        let mut head = [0u8; tcp::MAX_HEADERS];
        let hdr_len = tcp::join_headers(&mut head, &first, self.bytes, self.last_flags);
        let vnet_header = vnet::header(
            vnet::F_NEEDS_CSUM,
            if l.v6 {
                vnet::GSO_TCPV6
            } else {
                vnet::GSO_TCPV4
            },
            hdr_len as u16,
            self.payloads[0].len() as u16,
            l.ip_len as u16,
            tcp::CSUM_OFFSET as u16,
        );
        if let Some(svc) = d.svc.as_deref_mut()
            && svc.engine.tracks(first.packet)
        {
            let mut parts: [&[u8]; MAX_SEGMENTS + 2] = [&[]; MAX_SEGMENTS + 2];
            parts[0] = &vnet_header;
            parts[1] = &head[..hdr_len];
            parts[2..count + 2].copy_from_slice(&self.payloads[..count]);
            svc.inbound(&parts[..count + 2], true, d.queue, d.local);
            return;
        }
        let mut iov = [IoSlice::new(&[]); MAX_SEGMENTS + 2];
        iov[0] = IoSlice::new(&vnet_header);
        iov[1] = IoSlice::new(&head[..hdr_len]);
        for (slot, payload) in iov[2..].iter_mut().zip(&self.payloads[..count]) {
            *slot = IoSlice::new(payload);
        }
        match d.queue.write(&iov[..count + 2]) {
            Ok(written) => {
                d.local.io(Io::TunWrite, written, 1);
                d.local.packets_in += 1;
                d.local.bytes_in += (hdr_len + self.bytes) as u64;
            }
            Err(e) => {
                tracing::debug!(error = %e, "TUN write failed");
                d.local.drop(Drop::Io, count as u64);
            }
        }
    }
}

/// When all fragments of the packet whose first is `first` follow it in
/// `data` from `at` on, collects them into `fragments` and returns where
/// the next datagram starts.
fn whole_train<'a>(
    data: &'a [u8],
    mut at: usize,
    segment: usize,
    first: &overlay::Packet<&'a [u8]>,
    fragments: &mut [&'a [u8]; MAX_FRAGMENTS as usize],
) -> Option<usize> {
    let count = first.frag_count();
    fragments[0] = first.fragment_slice();
    let mut total = fragments[0].len();
    for index in 1..count {
        if at >= data.len() {
            return None;
        }
        let end = (at + segment).min(data.len());
        let next = overlay::Packet::new_checked(&data[at..end]).ok()?;
        if next.packet_id() != first.packet_id()
            || next.frag_index() != index
            || next.frag_count() != count
            || next.flags() != first.flags()
        {
            return None;
        }
        fragments[usize::from(index)] = next.fragment_slice();
        total += fragments[usize::from(index)].len();
        at = end;
    }
    (total == first.payload_len() as usize).then_some(at)
}

/// Checks one whole payload (its parts in order) and writes it to the TUN
/// queue. A bare packet whose TCP checksum is `partial` is handed over
/// with a virtio-net header that asks the kernel to finish it.
fn deliver(parts: &[&[u8]], has_vnet: bool, partial: bool, d: &mut Decap<'_>) {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let first = parts.first().copied().unwrap_or_default();
    let (head, ip_len, gso) = if has_vnet {
        let header = vnet::Packet::new_unchecked(first);
        if let Err(err) = header.check(total) {
            d.local.drop(reason(err), 1);
            return;
        }
        (
            first.get(vnet::HEADER_LEN..).unwrap_or_default(),
            total - vnet::HEADER_LEN,
            header.is_gso(),
        )
    } else {
        (first, total, false)
    };
    if let Some(svc) = d.svc.as_deref_mut()
        && svc.engine.tracks(head)
    {
        if partial && !has_vnet {
            // The engine learns from a virtio-net header that the TCP
            // checksum is partial.
            let Some(l) = tcp::layout(first) else {
                d.local.drop(Drop::Malformed, 1);
                return;
            };
            let vnet_header = vnet::header(
                vnet::F_NEEDS_CSUM,
                vnet::GSO_NONE,
                0,
                0,
                l.ip_len as u16,
                tcp::CSUM_OFFSET as u16,
            );
            svc.inbound(&[&vnet_header, first], true, d.queue, d.local);
        } else {
            svc.inbound(parts, has_vnet, d.queue, d.local);
        }
        return;
    }
    let dst = match ip::destination(head, ip_len) {
        Ok(dst) => dst,
        Err(err) => {
            d.local.drop(reason(err), 1);
            return;
        }
    };
    if !d.table.is_local(dst) {
        d.local.drop(Drop::UnknownDestination, 1);
        return;
    }
    if !gso && ip_len > d.mtu {
        d.local.drop(Drop::Oversized, 1);
        return;
    }
    let needs_csum = if partial && !has_vnet {
        let Some(l) = tcp::layout(first) else {
            d.local.drop(Drop::Malformed, 1);
            return;
        };
        vnet::header(
            vnet::F_NEEDS_CSUM,
            vnet::GSO_NONE,
            0,
            0,
            l.ip_len as u16,
            tcp::CSUM_OFFSET as u16,
        )
    } else {
        PLAIN_VNET
    };
    let mut iov = [IoSlice::new(&[]); MAX_FRAGMENTS as usize + 1];
    let mut n = 0;
    if !has_vnet {
        iov[0] = IoSlice::new(&needs_csum);
        n = 1;
    }
    for part in parts {
        iov[n] = IoSlice::new(part);
        n += 1;
    }
    match d.queue.write(&iov[..n]) {
        Ok(written) => {
            d.local.io(Io::TunWrite, written, usize::from(gso));
            d.local.packets_in += 1;
            d.local.bytes_in += ip_len as u64;
        }
        Err(e) => {
            tracing::debug!(error = %e, "TUN write failed");
            d.local.drop(Drop::Io, 1);
        }
    }
}

/// Sends what `batch` holds and counts it.
fn flush(batch: &mut SendBatch, tx: &UdpSocket, local: &mut Local) {
    if batch.is_empty() {
        return;
    }
    let sent = batch.flush(tx);
    local.drop(Drop::Io, sent.skipped as u64);
    local.io(Io::UdpSend, sent.bytes, sent.datagrams);
}

impl Svc {
    /// Once per poll round: the clock, this node's podCIDR when the node
    /// watch changed it, expired flows, a pending flow dump.
    fn tick(&mut self, table: &PeerTable) {
        self.now = self.epoch.elapsed().as_millis() as u64;
        let pods = table.local_v4();
        if pods != self.local_pods
            && let Some(net) = pods
        {
            self.engine.set_local_pods(net);
            self.local_pods = pods;
        }
        self.engine.sweep(self.now, SWEEP_BUDGET);
        if self.services.dump.take_request() {
            let mut lines = String::new();
            for flow in self.engine.flows(self.now) {
                lines.push_str(&flow.to_string());
                lines.push('\n');
            }
            self.services.dump.answer(lines);
        }
    }

    /// A packet read from the TUN (virtio-net header first).
    fn outbound(&mut self, buf: &mut [u8], queue: &Queue, table: &PeerTable) -> Out {
        let len = buf.len();
        let header = vnet::Packet::new_unchecked(&*buf);
        if header.check(len).is_err() {
            // `encapsulate` counts it.
            return Out::Encapsulate;
        }
        let meta = PacketMeta {
            checksum_partial: header.needs_csum(),
        };
        let (vnet_header, packet) = buf.split_at_mut(vnet::HEADER_LEN);
        let (reject_header, reject) = self.reject.split_at_mut(vnet::HEADER_LEN);
        match self.engine.process(self.now, packet, meta, reject) {
            Verdict::NotService => Out::Encapsulate,
            Verdict::Forward { next_hop } => {
                if self.for_kernel(next_hop, table) {
                    write(queue, &[IoSlice::new(vnet_header), IoSlice::new(packet)]);
                    Out::Done
                } else {
                    Out::Encapsulate
                }
            }
            Verdict::Reject { len } => {
                reject_header.copy_from_slice(&PLAIN_VNET);
                write(
                    queue,
                    &[IoSlice::new(&self.reject[..vnet::HEADER_LEN + len])],
                );
                Out::Done
            }
            // Counted by the engine.
            Verdict::Drop(_) => Out::Done,
        }
    }

    /// A packet from a peer that may belong to a tracked flow, in `parts`.
    fn inbound(&mut self, parts: &[&[u8]], has_vnet: bool, queue: &Queue, local: &mut Local) {
        let start = if has_vnet { 0 } else { vnet::HEADER_LEN };
        let mut end = start;
        for part in parts {
            let Some(slot) = self.scratch.get_mut(end..end + part.len()) else {
                local.drop(Drop::Oversized, 1);
                return;
            };
            slot.copy_from_slice(part);
            end += part.len();
        }
        let checksum_partial = if has_vnet {
            let header = vnet::Packet::new_unchecked(&self.scratch[..end]);
            if let Err(err) = header.check(end) {
                local.drop(reason(err), 1);
                return;
            }
            header.needs_csum()
        } else {
            self.scratch[..vnet::HEADER_LEN].copy_from_slice(&PLAIN_VNET);
            false
        };
        let (packet, reject) = (
            &mut self.scratch[vnet::HEADER_LEN..end],
            &mut self.reject[vnet::HEADER_LEN..],
        );
        let verdict =
            self.engine
                .process(self.now, packet, PacketMeta { checksum_partial }, reject);
        match verdict {
            Verdict::NotService | Verdict::Forward { .. } => {
                write(queue, &[IoSlice::new(&self.scratch[..end])]);
                local.packets_in += 1;
                local.bytes_in += (end - vnet::HEADER_LEN) as u64;
            }
            // A client behind another node is never refused here: its
            // node's engine opened the flow.
            Verdict::Reject { .. } | Verdict::Drop(_) => {}
        }
    }

    /// Whether a translated packet to `next_hop` goes back to the kernel:
    /// for a pod on this node, or for an address outside the pod network
    /// (a host process that reached a Service).
    fn for_kernel(&self, next_hop: std::net::Ipv4Addr, table: &PeerTable) -> bool {
        table.is_local(next_hop.into())
            || self
                .cluster_cidr
                .is_some_and(|net| !net.contains(&next_hop))
    }
}

fn write(queue: &Queue, parts: &[IoSlice<'_>]) {
    if let Err(e) = queue.write(parts) {
        tracing::debug!(error = %e, "TUN write failed");
    }
}

/// Gives the calling thread (a packet loop) [`NICE`].
fn raise_priority() {
    // SAFETY: gettid has no preconditions and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
    // SAFETY: a plain system call on this thread's own id.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, NICE) } != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "the packet loop keeps the default priority"
        );
    }
}

fn reason(err: wire::Error) -> Drop {
    match err {
        wire::Error::Truncated => Drop::Truncated,
        wire::Error::BadVersion(_) => Drop::BadVersion,
        wire::Error::Malformed => Drop::Malformed,
        wire::Error::Oversized => Drop::Oversized,
    }
}
