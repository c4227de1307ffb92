//! The in-process client: a `kube::Client` whose requests go straight into
//! the API server's own router, with no socket and no TLS, and the same code
//! path as any remote client. Components inside the binary use it.

use axum::Router;
use http::Request;

use super::authn::InProcess;

/// A client for the components running in this process. Requests are
/// trusted as the server itself.
pub fn in_process(router: Router) -> kube::Client {
    let service = tower::ServiceBuilder::new()
        .map_request(|mut request: Request<kube::client::Body>| {
            request.extensions_mut().insert(InProcess);
            request
        })
        .service(router);
    kube::Client::new(service, "default")
}

/// For tests: a bootstrapped API server on an embedded store in `dir`, and
/// an in-process client of it.
#[cfg(test)]
pub(crate) async fn test_server(dir: &std::path::Path) -> kube::Client {
    use std::sync::Arc;

    use super::{ApiState, ServiceRanges, authn::Authenticator};
    use crate::storage::embedded::EmbeddedStore;

    let store = Arc::new(EmbeddedStore::open(&dir.join("state.db")).unwrap());
    let ranges = ServiceRanges {
        cidr: "10.43.0.0/16".parse().unwrap(),
        node_ports: 30000..=32767,
    };
    let state = Arc::new(ApiState::new(store, ranges, "127.0.0.1:6443".into()));
    super::bootstrap(&state).await.unwrap();
    in_process(super::router(state, Arc::new(Authenticator::new())))
}
