//! The harness for Skiff's end-to-end tests and benchmarks: real components
//! (etcd, and later `skiff` servers and network namespaces) started for a
//! test and removed after it, plus suites that hold every implementation of
//! a contract to the same checks.

pub mod cgroup;
pub mod cluster;
pub mod dns_upstream;
pub mod etcd;
pub mod images;
pub mod kubectl_async;
pub mod netns;
pub mod node;
pub mod runc;
pub mod server;
pub mod store_conformance;
