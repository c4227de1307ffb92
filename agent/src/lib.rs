//! The node agent (the kubelet's job): node registration and heartbeats, the
//! image store, the OCI runtime driver, pod lifecycle, probes, volumes, and
//! the logs/exec/port-forward server. Not built yet.

pub mod images;
//! the logs/exec/port-forward server.
//!
//! [`shim`] is the per-container monitor process, [`streaming`] the
//! kubelet API the API server proxies logs, exec, attach and port-forward
//! to.

pub mod crilog;
pub mod shim;
pub mod streaming;
pub mod tty;
