//! The packet engine: the TUN overlay between nodes and Service load
//! balancing (ClusterIP, NodePort) with connection tracking.

pub mod service;
