//! The node agent (the kubelet's job): node registration and heartbeats, the
//! image store, the OCI runtime driver, pod lifecycle, probes, volumes, and
//! the logs/exec/port-forward server. Not built yet.

pub mod images;
