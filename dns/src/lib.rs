//! Cluster DNS (the Kubernetes DNS specification), node-local, with
//! upstream forwarding. Not built yet.
