//! The per-packet engine. One per packet loop (it owns its flow table);
//! all engines read the same published Service table. Per packet: parse,
//! look the 5-tuple up in the flow table, and either translate by the flow
//! or look the destination up among the Service frontends and open a flow.
//! No allocation, lock or system call on the way; the clock is the
//! caller's (milliseconds of any monotonic clock), so tests inject time.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use ipnet::Ipv4Net;

use super::affinity::AffinityTable;
use super::conntrack::{Flow, FlowTable, Room, Tuple};
use super::hash::{hash2, random_seed};
use super::metrics::{DropReason, Metrics};
use super::model::{Protocol, ServiceKey};
use super::nat::{Rewrite, rewrite_icmp_error, rewrite_transport};
use super::reject::{port_unreachable, tcp_reset};
use super::state::{Direction, FlowState, TcpState, Timeouts};
use super::table::{Frontend, FrontendKey, Lookup, Published};
use super::wire::{
    ICMP_HEADER, Ipv4Packet, PROTO_ICMP, PROTO_TCP, PROTO_UDP, TcpFlags, Transport, WireError,
    is_icmp_error,
};

/// Seed of the flow hash that picks endpoints: fixed, so every node picks
/// the same endpoint for the same flow.
const PICK_SEED: u64 = 0x736b_6966_665f_6c62;
/// Source ports tried when a translated flow's reply tuple is taken.
const PORT_TRIES: u32 = 64;

/// How an engine is set up.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// A node-local address whose replies come back through this node's
    /// data plane (e.g. the pod bridge's address): the source of hairpin,
    /// NodePort and host traffic after SNAT.
    pub snat_ip: Ipv4Addr,
    /// The pod network. Sources outside it (host processes, the outside)
    /// reaching a ClusterIP are SNATed to `snat_ip`, so replies return here.
    pub cluster_cidr: Option<Ipv4Net>,
    /// The Service network: packets to an address in it that no Service
    /// holds are dropped (and counted) instead of routed on.
    pub service_cidr: Option<Ipv4Net>,
    /// This node's podCIDR. A flow to an endpoint in it is SNATed to
    /// `local_snat_ip`: the endpoint's reply to a pod on the same bridge
    /// would be bridged past the data plane, never reverse-translated.
    pub local_pods: Option<Ipv4Net>,
    /// An address routed into this node's TUN device that no pod or Service
    /// holds (the data plane uses the Service network's broadcast address,
    /// which the ClusterIP allocator never hands out).
    pub local_snat_ip: Option<Ipv4Addr>,
    /// Flows tracked at most; a full table evicts the flow idle longest.
    pub max_flows: usize,
    /// Clients pinned by `sessionAffinity: ClientIP` at most.
    pub max_affinity: usize,
    pub timeouts: Timeouts,
}

impl EngineConfig {
    /// Defaults as the kernel's: 262,144 flows (`nf_conntrack_max` on a
    /// machine with a few GiB), its timeouts.
    pub fn new(snat_ip: Ipv4Addr) -> Self {
        EngineConfig {
            snat_ip,
            cluster_cidr: None,
            service_cidr: None,
            local_pods: None,
            local_snat_ip: None,
            max_flows: 262_144,
            max_affinity: 65_536,
            timeouts: Timeouts::default(),
        }
    }
}

/// What the device told about a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PacketMeta {
    /// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the L4 checksum field holds only the
    /// pseudo-header sum, for the device to finish.
    pub checksum_partial: bool,
}

/// What to do with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Rewritten in place; send it on towards `next_hop` (its new
    /// destination address).
    Forward {
        next_hop: Ipv4Addr,
    },
    /// Drop it and send the first `len` bytes of the reject buffer back
    /// to its source instead.
    Reject {
        len: usize,
    },
    Drop(DropReason),
    /// Not for a Service: pass it on untouched.
    NotService,
}

/// The outcome of checking a tracked flow for a packet.
enum Tracked {
    /// Translate by the flow.
    Yes,
    /// Over (expired, or a SYN reopened it): treat as new.
    Ended,
    /// Its endpoint left the Service; the flow is gone.
    EndpointGone,
}

pub struct Engine {
    config: EngineConfig,
    table: Arc<Published>,
    flows: FlowTable,
    affinity: AffinityTable,
    metrics: Arc<Metrics>,
    seed: u64,
}

impl Engine {
    pub fn new(config: EngineConfig, table: Arc<Published>, metrics: Arc<Metrics>) -> Self {
        let seed = random_seed();
        Engine {
            flows: FlowTable::new(config.max_flows, seed),
            affinity: AffinityTable::new(config.max_affinity, seed.rotate_left(17)),
            config,
            table,
            metrics,
            seed,
        }
    }

    /// Flows this engine tracks now.
    pub fn flow_count(&self) -> usize {
        self.flows.len()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Sets this node's podCIDR once the node watch knows it: flows to
    /// endpoints in it are SNATed to `local_snat_ip`, flows from sources
    /// outside the pod network to remote endpoints to the podCIDR's
    /// gateway address (replies to it are tunnelled back to this node).
    /// Open flows keep the addresses they were opened with.
    pub fn set_local_pods(&mut self, pods: Ipv4Net) {
        self.config.local_pods = Some(pods);
        if let Some(gateway) = pods.hosts().next() {
            self.config.snat_ip = gateway;
        }
    }

    /// Whether the packet starting in `head` (its headers suffice) may be
    /// for the engine: a tracked flow's packet or an ICMP error. Lets a
    /// caller skip gathering packets that only pass through.
    pub fn tracks(&self, head: &[u8]) -> bool {
        let Ok(ip) = Ipv4Packet::new_quoted(head) else {
            return false;
        };
        if ip.is_fragment() {
            return false;
        }
        let payload = ip.payload();
        match ip.protocol() {
            protocol @ (PROTO_TCP | PROTO_UDP) if payload.len() >= 4 => {
                let tuple = Tuple {
                    src: ip.src(),
                    dst: ip.dst(),
                    src_port: u16::from_be_bytes([payload[0], payload[1]]),
                    dst_port: u16::from_be_bytes([payload[2], payload[3]]),
                    protocol,
                };
                self.flows.lookup(&tuple).is_some()
            }
            PROTO_ICMP => payload.first().is_some_and(|&t| is_icmp_error(t)),
            _ => false,
        }
    }

    /// Handles one IPv4 packet at time `now` (ms). `reject` receives a
    /// reset or ICMP error when the verdict is `Reject`; 576 bytes hold any.
    pub fn process(
        &mut self,
        now: u64,
        packet: &mut [u8],
        meta: PacketMeta,
        reject: &mut [u8],
    ) -> Verdict {
        let mut ip = match Ipv4Packet::new_checked(packet) {
            Ok(ip) => ip,
            Err(WireError::NotIpv4) => return Verdict::NotService,
            Err(_) => return self.drop(DropReason::Malformed),
        };
        if ip.is_fragment() {
            return self.ours_or_pass(ip.dst(), DropReason::Fragment);
        }
        match ip.protocol() {
            PROTO_TCP | PROTO_UDP => self.transport(now, &mut ip, meta, reject),
            PROTO_ICMP => self.icmp(&mut ip),
            _ => self.ours_or_pass(ip.dst(), DropReason::UnsupportedProtocol),
        }
    }

    /// Ends expired flows among the next `budget` table slots; call it
    /// between batches so idle flows free their slots without a packet.
    pub fn sweep(&mut self, now: u64, budget: usize) -> usize {
        let removed = self.flows.sweep(now, budget);
        self.metrics
            .flows_expired
            .fetch_add(removed as u64, Ordering::Relaxed);
        self.metrics
            .flows_tracked
            .fetch_sub(removed as u64, Ordering::Relaxed);
        removed
    }

    /// The live flows, most recently active first (for `skiff dataplane
    /// conntrack`). Allocates; not for the packet path.
    pub fn flows(&self, now: u64) -> Vec<FlowInfo> {
        self.flows
            .iter()
            .filter(|f| f.expires > now)
            .map(|f| self.describe(f, now))
            .collect()
    }

    fn transport(
        &mut self,
        now: u64,
        ip: &mut Ipv4Packet<&mut [u8]>,
        meta: PacketMeta,
        reject: &mut [u8],
    ) -> Verdict {
        let protocol = ip.protocol();
        let Ok(transport) = Transport::parse(protocol, ip.payload()) else {
            return self.drop(DropReason::Malformed);
        };
        let tuple = Tuple {
            src: ip.src(),
            dst: ip.dst(),
            src_port: transport.src_port,
            dst_port: transport.dst_port,
            protocol,
        };
        if let Some((id, direction)) = self.flows.lookup(&tuple) {
            match self.track(now, id, direction, transport.flags) {
                Tracked::Yes => return self.translate(ip, id, direction, meta),
                Tracked::Ended => {}
                Tracked::EndpointGone if direction == Direction::Reply => {
                    return self.drop(DropReason::EndpointGone);
                }
                // TCP cannot move to another endpoint mid-connection: tell
                // the client now rather than let it time out.
                Tracked::EndpointGone if protocol == PROTO_TCP => {
                    return self.reject(ip, reject);
                }
                // UDP has no connection: the next datagram picks anew.
                Tracked::EndpointGone => {}
            }
        }
        if protocol == PROTO_TCP && transport.flags.syn() && !transport.flags.ack() {
            self.end_shadowing_flow(&tuple);
        }
        let key = FrontendKey {
            ip: tuple.dst,
            port: tuple.dst_port,
            protocol,
        };
        match self.table.lookup(key) {
            Lookup::Frontend(frontend) => {
                self.open(now, ip, tuple, transport.flags, &frontend, meta, reject)
            }
            Lookup::UnknownPort => self.reject(ip, reject),
            Lookup::Miss if self.in_service_cidr(tuple.dst) => self.drop(DropReason::NoService),
            Lookup::Miss => Verdict::NotService,
        }
    }

    /// A new connection straight to an endpoint (no Service) whose reply
    /// would look like a closing Service flow's reply (the client reused
    /// its port within TIME_WAIT): ends that flow, as the kernel's conntrack
    /// does on a SYN in TIME_WAIT, so the new connection's replies are not
    /// rewritten to come from the Service address.
    fn end_shadowing_flow(&mut self, tuple: &Tuple) {
        let inverse = Tuple {
            src: tuple.dst,
            dst: tuple.src,
            src_port: tuple.dst_port,
            dst_port: tuple.src_port,
            protocol: tuple.protocol,
        };
        if let Some((id, Direction::Reply)) = self.flows.lookup(&inverse)
            && let FlowState::Tcp(TcpState::TimeWait | TcpState::Close) = self.flows.get(id).state
        {
            self.forget(id);
        }
    }

    /// Checks a tracked flow for a packet and advances its state.
    fn track(&mut self, now: u64, id: u32, direction: Direction, flags: TcpFlags) -> Tracked {
        let flow = *self.flows.get(id);
        if flow.expires <= now {
            self.forget(id);
            Metrics::bump(&self.metrics.flows_expired);
            return Tracked::Ended;
        }
        if let FlowState::Tcp(state) = flow.state
            && state.reopens(direction, flags)
        {
            self.forget(id);
            return Tracked::Ended;
        }
        let generation = self.table.generation();
        if flow.checked_generation != generation {
            if !self.endpoint_exists(&flow) {
                self.forget(id);
                Metrics::bump(&self.metrics.flows_stale);
                return Tracked::EndpointGone;
            }
            self.flows.get_mut(id).checked_generation = generation;
        }
        let state = match flow.state {
            FlowState::Tcp(state) => FlowState::Tcp(state.next(direction, flags)),
            FlowState::Udp { replied } => FlowState::Udp {
                replied: replied || direction == Direction::Reply,
            },
        };
        self.flows.get_mut(id).state = state;
        let expires = now.saturating_add(self.config.timeouts.for_state(state));
        self.flows.touch(id, now, expires);
        Tracked::Yes
    }

    /// Opens a flow to one of the frontend's endpoints.
    #[allow(clippy::too_many_arguments)]
    fn open(
        &mut self,
        now: u64,
        ip: &mut Ipv4Packet<&mut [u8]>,
        tuple: Tuple,
        flags: TcpFlags,
        frontend: &Frontend,
        meta: PacketMeta,
        reject: &mut [u8],
    ) -> Verdict {
        let opening = tuple.protocol != PROTO_TCP || (flags.syn() && !flags.ack());
        if tuple.protocol == PROTO_TCP && flags.rst() {
            return self.drop(DropReason::InvalidTcp);
        }
        if !opening {
            Metrics::bump(&self.metrics.nat_misses);
        }
        let Some(index) = self.choose(now, &tuple, frontend) else {
            if frontend.local_only() {
                return self.drop(DropReason::NoLocalEndpoint);
            }
            return self.reject(ip, reject);
        };
        let backend = frontend.port.backends[index];
        let backend_local = self
            .config
            .local_pods
            .is_some_and(|net| net.contains(&Ipv4Addr::from(backend.ip)));
        let local_snat = match self.config.local_snat_ip {
            Some(ip) if backend_local && !frontend.local_only() => Some(ip),
            _ => None,
        };
        let snat = if local_snat.is_some() || frontend.local_only() {
            false
        } else if frontend.kind == super::table::FrontendKind::ClusterIp {
            // Hairpin, or a source the endpoint's reply would not route
            // back through this node.
            tuple.src == backend.ip
                || self
                    .config
                    .cluster_cidr
                    .is_some_and(|net| !net.contains(&Ipv4Addr::from(tuple.src)))
        } else {
            true
        };
        let client_side = match local_snat {
            Some(ip) => u32::from(ip),
            None if snat => u32::from(self.config.snat_ip),
            None => tuple.src,
        };
        let Some(reply) = self.reply_tuple(&tuple, backend.ip, backend.port, client_side) else {
            return self.drop(DropReason::NatPortExhausted);
        };
        let state = match tuple.protocol {
            PROTO_TCP if opening => FlowState::Tcp(TcpState::SynSent),
            // Picked up mid-stream, as the kernel's `tcp_loose` does; the
            // consistent hash sends it where it went before.
            PROTO_TCP => FlowState::Tcp(TcpState::Established),
            _ => FlowState::Udp { replied: false },
        };
        let expires = now.saturating_add(self.config.timeouts.for_state(state));
        let generation = self.table.generation();
        let (id, room) = self
            .flows
            .insert(tuple, reply, state, now, expires, generation);
        match room {
            Room::Free => Metrics::bump(&self.metrics.flows_tracked),
            Room::Expired => Metrics::bump(&self.metrics.flows_expired),
            Room::Evicted => Metrics::bump(&self.metrics.flows_evicted),
        }
        Metrics::bump(&self.metrics.flows_created);
        Metrics::bump(&frontend.port.service.counters.new_flows);
        self.translate(ip, id, Direction::Original, meta)
    }

    /// The endpoint for a new flow: the client's pinned one if affinity
    /// holds and it may still take flows, else the consistent hash's.
    fn choose(&mut self, now: u64, tuple: &Tuple, frontend: &Frontend) -> Option<usize> {
        let maglev = frontend.maglev();
        if maglev.is_empty() {
            return None;
        }
        let Some(timeout) = frontend.port.service.affinity_timeout_ms else {
            let a = (u64::from(tuple.src) << 32) | u64::from(tuple.dst);
            let b = (u64::from(tuple.src_port) << 32)
                | (u64::from(tuple.dst_port) << 16)
                | u64::from(tuple.protocol);
            return maglev.pick(hash2(PICK_SEED, a, b)).map(usize::from);
        };
        let fkey = (u64::from(tuple.dst) << 24)
            | (u64::from(tuple.dst_port) << 8)
            | u64::from(tuple.protocol);
        let expires = now.saturating_add(timeout);
        let pinned = self
            .affinity
            .get(tuple.src, fkey, now)
            .and_then(|(ip, port)| frontend.find(ip, port))
            .filter(|&i| frontend.usable(i));
        // Hash the client alone, so every node pins it to the same place.
        let index = match pinned {
            Some(i) => i,
            None => usize::from(maglev.pick(hash2(PICK_SEED, u64::from(tuple.src), fkey))?),
        };
        let backend = frontend.port.backends[index];
        self.affinity
            .put(tuple.src, fkey, (backend.ip, backend.port), expires);
        Some(index)
    }

    /// The tuple replies will carry; a new source port when that one is
    /// taken (two flows from one client port meeting at one endpoint).
    fn reply_tuple(&self, tuple: &Tuple, ip: u32, port: u16, client_side: u32) -> Option<Tuple> {
        let mut reply = Tuple {
            src: ip,
            dst: client_side,
            src_port: port,
            dst_port: tuple.src_port,
            protocol: tuple.protocol,
        };
        if !self.flows.contains(&reply) {
            return Some(reply);
        }
        let start = hash2(
            self.seed,
            (u64::from(tuple.src) << 32) | u64::from(tuple.dst),
            u64::from(tuple.src_port),
        );
        (0..PORT_TRIES).find_map(|i| {
            reply.dst_port = 1024 + ((start + u64::from(i)) % (65536 - 1024)) as u16;
            (!self.flows.contains(&reply)).then_some(reply)
        })
    }

    fn translate(
        &mut self,
        ip: &mut Ipv4Packet<&mut [u8]>,
        id: u32,
        direction: Direction,
        meta: PacketMeta,
    ) -> Verdict {
        let to = Rewrite::for_flow(self.flows.get(id), direction);
        rewrite_transport(ip, to, meta.checksum_partial);
        Verdict::Forward {
            next_hop: Ipv4Addr::from(to.dst),
        }
    }

    /// ICMP: errors about a tracked flow are translated like the flow's
    /// packets; other ICMP is not for Services.
    fn icmp(&mut self, ip: &mut Ipv4Packet<&mut [u8]>) -> Verdict {
        let payload = ip.payload();
        if payload.len() < ICMP_HEADER {
            return self.drop(DropReason::Malformed);
        }
        if !is_icmp_error(payload[0]) {
            return self.ours_or_pass(ip.dst(), DropReason::UnsupportedProtocol);
        }
        let Some(quoted) = quoted_tuple(&payload[ICMP_HEADER..]) else {
            return self.ours_or_pass(ip.dst(), DropReason::UnknownFlow);
        };
        // The quoted packet went the other way from this error.
        let Some((id, direction)) = self.flows.lookup(&quoted.reversed()) else {
            return self.ours_or_pass(ip.dst(), DropReason::UnknownFlow);
        };
        let flow = *self.flows.get(id);
        let peer = match direction {
            Direction::Original => flow.original.src,
            Direction::Reply => flow.reply.src,
        };
        let to = Rewrite::for_flow(&flow, direction);
        match rewrite_icmp_error(ip, to, ip.src() == peer) {
            Ok(()) => Verdict::Forward {
                next_hop: Ipv4Addr::from(to.dst),
            },
            Err(_) => self.drop(DropReason::Malformed),
        }
    }

    fn reject(&mut self, ip: &Ipv4Packet<&mut [u8]>, out: &mut [u8]) -> Verdict {
        let built = match ip.protocol() {
            PROTO_TCP => tcp_reset(ip, out),
            _ => port_unreachable(ip, out),
        };
        match built {
            Some(len) => {
                Metrics::bump(&self.metrics.rejected);
                Verdict::Reject { len }
            }
            None => self.drop(DropReason::CannotReject),
        }
    }

    fn endpoint_exists(&self, flow: &Flow) -> bool {
        let key = FrontendKey {
            ip: flow.original.dst,
            port: flow.original.dst_port,
            protocol: flow.original.protocol,
        };
        self.table
            .frontend(key)
            .is_some_and(|f| f.find(flow.reply.src, flow.reply.src_port).is_some())
    }

    fn forget(&mut self, id: u32) {
        self.flows.remove(id);
        self.metrics.flows_tracked.fetch_sub(1, Ordering::Relaxed);
    }

    /// Drops what is addressed to a Service; passes the rest.
    fn ours_or_pass(&self, dst: u32, reason: DropReason) -> Verdict {
        if self.table.is_vip(dst) {
            self.drop(reason)
        } else if self.in_service_cidr(dst) {
            self.drop(DropReason::NoService)
        } else {
            Verdict::NotService
        }
    }

    fn in_service_cidr(&self, dst: u32) -> bool {
        self.config
            .service_cidr
            .is_some_and(|net| net.contains(&Ipv4Addr::from(dst)))
    }

    fn drop(&self, reason: DropReason) -> Verdict {
        self.metrics.count_drop(reason);
        Verdict::Drop(reason)
    }

    fn describe(&self, flow: &Flow, now: u64) -> FlowInfo {
        let socket = |ip: u32, port: u16| SocketAddrV4::new(Ipv4Addr::from(ip), port);
        let key = FrontendKey {
            ip: flow.original.dst,
            port: flow.original.dst_port,
            protocol: flow.original.protocol,
        };
        FlowInfo {
            protocol: Protocol::from_number(flow.original.protocol).unwrap_or(Protocol::Tcp),
            original: (
                socket(flow.original.src, flow.original.src_port),
                socket(flow.original.dst, flow.original.dst_port),
            ),
            reply: (
                socket(flow.reply.src, flow.reply.src_port),
                socket(flow.reply.dst, flow.reply.dst_port),
            ),
            state: flow.state,
            idle_ms: now.saturating_sub(flow.last_seen),
            expires_in_ms: flow.expires.saturating_sub(now),
            service: self.table.frontend(key).map(|f| f.port.service.key.clone()),
        }
    }
}

/// The 5-tuple of the packet an ICMP error quotes, if it has ports.
fn quoted_tuple(quote: &[u8]) -> Option<Tuple> {
    let inner = Ipv4Packet::new_quoted(quote).ok()?;
    let protocol = inner.protocol();
    let segment = inner.payload();
    if !matches!(protocol, PROTO_TCP | PROTO_UDP) || inner.is_fragment() || segment.len() < 8 {
        return None;
    }
    Some(Tuple {
        src: inner.src(),
        dst: inner.dst(),
        src_port: u16::from_be_bytes([segment[0], segment[1]]),
        dst_port: u16::from_be_bytes([segment[2], segment[3]]),
        protocol,
    })
}

/// One live flow, for debugging.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowInfo {
    pub protocol: Protocol,
    /// Client → frontend.
    pub original: (SocketAddrV4, SocketAddrV4),
    /// Endpoint → client (or the SNAT address).
    pub reply: (SocketAddrV4, SocketAddrV4),
    pub state: FlowState,
    pub idle_ms: u64,
    pub expires_in_ms: u64,
    /// The Service the frontend belongs to, if it still exists.
    pub service: Option<ServiceKey>,
}

impl fmt::Display for FlowInfo {
    /// One line in the shape of `conntrack -L`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} src={} dst={} sport={} dport={} src={} dst={} sport={} dport={} service={}",
            self.protocol,
            self.expires_in_ms / 1000,
            self.state,
            self.original.0.ip(),
            self.original.1.ip(),
            self.original.0.port(),
            self.original.1.port(),
            self.reply.0.ip(),
            self.reply.1.ip(),
            self.reply.0.port(),
            self.reply.1.port(),
            self.service
                .as_ref()
                .map_or_else(|| "-".to_string(), ToString::to_string),
        )
    }
}
