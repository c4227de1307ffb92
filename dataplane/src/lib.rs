//! The packet engine: the TUN overlay between nodes and Service load
//! balancing (ClusterIP, NodePort) with connection tracking.
//!
//! Layout as in smoltcp: `wire` (packet formats as zero-copy views),
//! `device` (TUN and UDP I/O), `overlay` (peer table, routes, the packet
//! loop), `metrics`.

pub mod device;
pub mod metrics;
pub mod overlay;
pub mod service;
pub mod services;
pub mod wire;
