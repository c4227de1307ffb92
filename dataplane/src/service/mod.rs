//! Service load balancing in the data plane: kube-proxy's job as a pure
//! library the packet loop calls once per packet. Layers, bottom up:
//!
//! - `wire`, `checksum`: typed views over packet bytes; RFC 1071/1624 sums.
//! - `model`, `translate`: a Service and its EndpointSlices, resolved.
//! - `maglev`, `table`: consistent-hash tables per Service port, published
//!   to packet loops without locks and updated per Service.
//! - `state`, `conntrack`, `affinity`: flow tracking in fixed memory.
//! - `nat`, `reject`: packet rewriting and the answers for refused flows.
//! - `engine`: the per-packet flow that ties them together.
//!
//! IPv4 only for now: IPv6 packets pass as `NotService`.

mod affinity;
mod checksum;
mod conntrack;
mod engine;
mod hash;
mod maglev;
mod metrics;
mod model;
mod nat;
mod reject;
mod state;
mod table;
mod translate;
mod wire;

pub use engine::{Engine, EngineConfig, FlowInfo, PacketMeta, Verdict};
pub use metrics::{DropReason, Metrics};
pub use model::{Backend, Protocol, ServiceKey, ServicePort, ServiceSpec};
pub use state::{Direction, FlowState, TcpState, Timeouts};
pub use table::{
    FrontendKind, LoadBalancerPort, Published, ServiceCounters, ServiceTable, TableConfig,
};
pub use translate::{DEFAULT_AFFINITY_TIMEOUT_SECS, TranslateError, translate};

#[cfg(test)]
mod tests;
