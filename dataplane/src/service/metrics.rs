//! Counters the engine keeps as plain atomics (relaxed, bumped per flow
//! event, never per forwarded packet) for the caller to export.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not a well-formed IPv4/TCP/UDP/ICMP packet.
    Malformed,
    /// A fragment to a Service address: no ports to translate by.
    Fragment,
    /// To the Service network but no Service's address.
    NoService,
    /// Neither TCP nor UDP (nor an ICMP error) to a Service address.
    UnsupportedProtocol,
    /// `externalTrafficPolicy: Local` and no endpoint on this node.
    NoLocalEndpoint,
    /// A tracked flow's endpoint left the Service.
    EndpointGone,
    /// A TCP reset for no tracked connection.
    InvalidTcp,
    /// An ICMP error to a Service address about no tracked flow.
    UnknownFlow,
    /// No free source port for the translated flow.
    NatPortExhausted,
    /// A reject was due but the source must not be answered, or the
    /// caller's buffer is too small.
    CannotReject,
}

impl DropReason {
    pub const ALL: [DropReason; 10] = [
        DropReason::Malformed,
        DropReason::NoService,
        DropReason::Fragment,
        DropReason::UnsupportedProtocol,
        DropReason::NoLocalEndpoint,
        DropReason::EndpointGone,
        DropReason::InvalidTcp,
        DropReason::UnknownFlow,
        DropReason::NatPortExhausted,
        DropReason::CannotReject,
    ];

    /// A label value for `/metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Fragment => "fragment",
            DropReason::NoService => "no_service",
            DropReason::UnsupportedProtocol => "unsupported_protocol",
            DropReason::NoLocalEndpoint => "no_local_endpoint",
            DropReason::EndpointGone => "endpoint_gone",
            DropReason::InvalidTcp => "invalid_tcp",
            DropReason::UnknownFlow => "unknown_flow",
            DropReason::NatPortExhausted => "nat_port_exhausted",
            DropReason::CannotReject => "cannot_reject",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Engine-wide counters; share one between the engines of all queues.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Flows in the tables now (a gauge).
    pub flows_tracked: AtomicU64,
    pub flows_created: AtomicU64,
    /// Flows ended by their idle timeout.
    pub flows_expired: AtomicU64,
    /// Live flows pushed out of a full table.
    pub flows_evicted: AtomicU64,
    /// Flows ended because their endpoint left the Service.
    pub flows_stale: AtomicU64,
    /// Packets to a Service with no tracked flow that do not open one
    /// (TCP without SYN): picked up mid-stream.
    pub nat_misses: AtomicU64,
    /// Resets and port-unreachables sent for Services without endpoints.
    pub rejected: AtomicU64,
    drops: [AtomicU64; DropReason::ALL.len()],
}

impl Metrics {
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()].load(Ordering::Relaxed)
    }

    /// Every drop reason with its count.
    pub fn drop_counts(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.into_iter().map(|r| (r, self.drops(r)))
    }

    pub(crate) fn count_drop(&self, reason: DropReason) {
        self.drops[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
