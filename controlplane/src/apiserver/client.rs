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
