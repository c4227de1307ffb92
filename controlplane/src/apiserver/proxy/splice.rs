//! Protocol switches passed through: the client's upgrade request goes to
//! the agent with its handshake headers, the agent's `101 Switching
//! Protocols` goes back to the client with its own, and the two upgraded
//! connections are then joined byte for byte. Neither WebSocket nor SPDY
//! framing is read here: both ends speak the same protocol.

use axum::body::Body;
use axum::response::Response;
use http::StatusCode;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

/// Handshake headers the agent must see as the client sent them.
const REQUEST_HEADERS: &[&str] = &[
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
    "x-stream-protocol-version",
];

/// Handshake answers the client must see as the agent sent them: the
/// WebSocket accept key is computed from the client's key, so only the
/// agent's copy is right.
const RESPONSE_HEADERS: &[&str] = &[
    "upgrade",
    "sec-websocket-accept",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
    "x-stream-protocol-version",
];

/// Whether the client asks to switch protocols (`Connection: Upgrade` with
/// an `Upgrade` header).
pub fn requested(headers: &HeaderMap) -> bool {
    let connection_upgrade = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    connection_upgrade && headers.contains_key(header::UPGRADE)
}

/// Copies the client's handshake headers onto the agent request.
pub fn forward_request_headers(from: &HeaderMap, to: &mut HeaderMap) {
    copy_named(REQUEST_HEADERS, from, to);
    to.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
}

/// Answers the client with the agent's `101` and, once both sides have
/// switched, joins the two connections in a task of their own.
pub fn switch(client: OnUpgrade, mut agent: http::Response<hyper::body::Incoming>) -> Response {
    let agent_upgrade = hyper::upgrade::on(&mut agent);
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    copy_named(RESPONSE_HEADERS, agent.headers(), headers);
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    tokio::spawn(join(client, agent_upgrade));
    response
}

/// Every value of each of `names` (lowercase), repeats included (SPDY
/// clients offer each protocol version in a header of its own).
fn copy_named(names: &[&'static str], from: &HeaderMap, to: &mut HeaderMap) {
    for name in names {
        let name = HeaderName::from_static(name);
        for value in from.get_all(&name) {
            to.append(name.clone(), value.clone());
        }
    }
}

/// Copies both ways until both directions have ended; an end of stream on
/// one side is passed on as a write shutdown to the other, so half-closed
/// streams (stdin done, output still coming) keep working. Memory is two
/// fixed copy buffers whatever the traffic.
async fn join(client: OnUpgrade, agent: OnUpgrade) {
    let (client, agent) = match tokio::try_join!(client, agent) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(error = %e, "protocol switch did not complete");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut agent = TokioIo::new(agent);
    match tokio::io::copy_bidirectional(&mut client, &mut agent).await {
        Ok((up, down)) => tracing::debug!(up, down, "stream to the node agent closed"),
        Err(e) => tracing::debug!(error = %e, "stream to the node agent ended with an error"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_upgrade_requests() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!requested(&headers));
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(requested(&headers));
    }

    #[test]
    fn forwards_only_handshake_headers() {
        let mut from = HeaderMap::new();
        from.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
        from.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer secret"),
        );
        from.append(
            "x-stream-protocol-version",
            HeaderValue::from_static("v4.channel.k8s.io"),
        );
        from.append(
            "x-stream-protocol-version",
            HeaderValue::from_static("v3.channel.k8s.io"),
        );
        let mut to = HeaderMap::new();
        forward_request_headers(&from, &mut to);
        assert!(to.get(header::AUTHORIZATION).is_none());
        assert_eq!(to.get_all("x-stream-protocol-version").iter().count(), 2);
        assert_eq!(to[header::CONNECTION], "Upgrade");
        assert_eq!(to[header::UPGRADE], "SPDY/3.1");
    }
}
