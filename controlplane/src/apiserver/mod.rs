//! The Kubernetes API server: REST semantics for the built-in kinds over
//! HTTPS, backed by the revisioned store.

pub mod patch;
pub mod pki;
pub mod protobuf;
pub mod selectors;
pub mod table;
pub mod tls;
