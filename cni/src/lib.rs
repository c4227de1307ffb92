//! Pod network plumbing on one node: named network namespaces, the node's
//! bridge, one veth pair per pod, IPAM persisted on disk, and a CNI 1.x
//! plugin entry point (`skiff cni`) over the same code.
//!
//! Every netlink operation runs on a short-lived thread that has entered the
//! namespace it works on (the pod's, or the node's: `BridgeConfig::host_netns`),
//! so callers on async workers never change namespace themselves.

mod bridge;
mod error;
pub mod ipam;
mod netlink;
pub mod netns;
mod network;
pub mod plugin;
mod veth;

pub use error::CniError;
pub use netns::{NetNs, run_in};
pub use network::{Attachment, BridgeConfig, BridgeNetwork};
pub use veth::host_name as host_veth_name;
