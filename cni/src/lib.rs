//! Pod network plumbing on one node: IPAM, bridge, veth, network namespaces
//! and routes, plus a CNI-spec plugin entry point. Not built yet.
