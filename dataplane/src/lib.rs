//! The packet engine: the TUN overlay between nodes and Service load
//! balancing (ClusterIP, NodePort) with connection tracking.
//!
//! Layout as in smoltcp: `wire` (packet formats as zero-copy views),
//! `device` (TUN and UDP I/O), `overlay` (peer table, routes, the packet
//! loop), `metrics`; `nftables`, the kernel backend for Services from
//! local pods; `socket`, their connect-time balancing.

pub mod device;
pub mod metrics;
pub mod nftables;
pub mod overlay;
pub mod service;
pub mod services;
pub mod socket;
pub mod wire;
