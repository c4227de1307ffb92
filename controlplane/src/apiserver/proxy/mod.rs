//! The streaming pod subresources — `log`, `exec`, `attach` and
//! `portforward` — served as kube-apiserver serves them: find the pod's
//! node, send the request on to that node agent's kubelet API over TLS,
//! and hand back what the agent answers. Log output streams through as it
//! comes; an upgraded connection (WebSocket or SPDY) is spliced to the
//! agent's, whose framing this module never reads.
//!
//! [`locate`] finds the agent and the kubelet path, [`kubelet`] talks to
//! the agent, [`splice`] passes protocol switches through.

mod kubelet;
mod locate;
mod splice;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::request::Parts;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;

pub use self::kubelet::{KubeletClient, KubeletClientError};

use self::kubelet::Endpoint;
use self::locate::{Located, Params};
use super::ApiState;
use super::request::Target;
use super::resources::Subresource;
use super::status::ApiError;

/// GETs `path` from the agent of `node`, for a body of at most `limit`
/// bytes (the resource metrics collector's scrape).
pub async fn agent_get(
    client: &KubeletClient,
    node: k8s_openapi::api::core::v1::Node,
    path: &str,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let endpoint = locate::endpoint_of(&name, node)?;
    let request = Request::get(path)
        .body(Empty::new())
        .map_err(|e| ApiError::internal(format!("building a request: {e}")))?;
    let response = client.send(&endpoint, request).await?;
    if !response.status().is_success() {
        return Err(ApiError::unavailable(format!(
            "the node agent on {endpoint} answered {} for {path}",
            response.status()
        )));
    }
    http_body_util::Limited::new(response.into_body(), limit)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| ApiError::unavailable(format!("reading {path} from {endpoint}: {e}")))
}

/// How much of an agent's error answer is read to report it; the rest is
/// dropped.
const ERROR_BODY_LIMIT: usize = 64 * 1024;
/// How long an agent gets to send that error body.
const ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether this module serves the request for `target`: a streaming
/// subresource of a pod. Such requests must reach [`serve`] with their
/// body unread, since an upgraded connection carries the stream.
pub fn serves(target: &Target) -> bool {
    target.rt.group.is_empty()
        && target.rt.plural == "pods"
        && matches!(
            target.subresource,
            Some(
                Subresource::Log
                    | Subresource::Exec
                    | Subresource::Attach
                    | Subresource::PortForward
            )
        )
}

/// Serves one streaming request. The body is never read: logs are GETs,
/// and the other verbs carry their streams on the upgraded connection.
pub async fn serve(
    state: Arc<ApiState>,
    target: Target,
    mut parts: Parts,
) -> Result<Response, ApiError> {
    let sub = target
        .subresource
        .ok_or_else(|| ApiError::internal("not a streaming request"))?;
    check_method(sub, &parts.method)?;
    let (Some(namespace), Some(name)) = (target.namespace.as_deref(), target.name.as_deref())
    else {
        return Err(ApiError::no_route(parts.uri.path()));
    };
    let kubelet = state
        .kubelet
        .clone()
        .ok_or_else(|| ApiError::unavailable("this server has no client for node agents"))?;
    let upgrade = splice::requested(&parts.headers);
    // hyper offers the switch only on HTTP/1.1 connections.
    let client_upgrade = parts.extensions.remove::<OnUpgrade>();
    if upgrade && client_upgrade.is_none() {
        return Err(ApiError::bad_request(
            "this connection cannot switch protocols: streaming needs HTTP/1.1",
        ));
    }

    let params = Params::parse(parts.uri.query());
    let located = locate::locate(&state, target.rt, namespace, name, sub, &params).await?;
    let (endpoint, path) = match located {
        Located::Agent { endpoint, path } => (endpoint, path),
        Located::NoNode => return Ok(StatusCode::NO_CONTENT.into_response()),
    };

    let mut request = Request::new(Empty::<Bytes>::new());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = path
        .parse()
        .map_err(|e| ApiError::internal(format!("kubelet path {path:?}: {e}")))?;
    if upgrade {
        splice::forward_request_headers(&parts.headers, request.headers_mut());
    }
    tracing::debug!(%endpoint, %path, upgrade, "forwarding to the node agent");
    let response = kubelet.send(&endpoint, request).await?;

    match (response.status(), client_upgrade) {
        (StatusCode::SWITCHING_PROTOCOLS, Some(client)) if upgrade => {
            Ok(splice::switch(client, response))
        }
        (StatusCode::SWITCHING_PROTOCOLS, _) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "InternalError",
            format!("the node agent on {endpoint} switched protocols though none was asked for"),
        )),
        (status, _) if status.is_success() => Ok(stream_back(response)),
        _ => Ok(agent_error(response, &endpoint).await),
    }
}

/// Logs are read with GET; the connect verbs also take POST (SPDY
/// clients), as upstream.
fn check_method(sub: Subresource, method: &Method) -> Result<(), ApiError> {
    let allowed = match sub {
        Subresource::Log => *method == Method::GET,
        _ => *method == Method::GET || *method == Method::POST,
    };
    if allowed {
        Ok(())
    } else {
        Err(ApiError::method_not_allowed(format!(
            "method {method} is not supported on pods/{}",
            sub.name()
        )))
    }
}

/// The agent's answer as it comes, chunk by chunk (`logs -f` never ends).
fn stream_back(response: http::Response<Incoming>) -> Response {
    let (parts, body) = response.into_parts();
    let mut out = Response::new(Body::new(body));
    *out.status_mut() = parts.status;
    copy_end_to_end(&parts.headers, out.headers_mut());
    out
}

/// Headers meant for the far end, not for the connection they came on.
fn copy_end_to_end(from: &HeaderMap, to: &mut HeaderMap) {
    const HOP_BY_HOP: &[&str] = &[
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ];
    let named_in_connection: Vec<String> = from
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|token| token.trim().to_ascii_lowercase())
        .collect();
    for (name, value) in from {
        if HOP_BY_HOP.contains(&name.as_str())
            || named_in_connection.iter().any(|n| n == name.as_str())
        {
            continue;
        }
        to.append(name.clone(), value.clone());
    }
}

/// An agent's refusal as a `Status`: passed on when it is one already,
/// otherwise built from the agent's code and (the start of) its text.
async fn agent_error(response: http::Response<Incoming>, endpoint: &Endpoint) -> Response {
    let status = response.status();
    let body =
        match tokio::time::timeout(ERROR_BODY_TIMEOUT, read_prefix(response.into_body())).await {
            Ok(Ok(body)) => body,
            Ok(Err(e)) => {
                tracing::debug!(%endpoint, error = %e, "reading the agent's error answer failed");
                Bytes::new()
            }
            Err(_) => Bytes::new(),
        };
    let is_status = serde_json::from_slice::<serde_json::Value>(&body)
        .is_ok_and(|v| v.get("kind").and_then(|k| k.as_str()) == Some("Status"));
    if is_status {
        return (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    }
    let text = String::from_utf8_lossy(&body).trim().to_owned();
    let message = if text.is_empty() {
        format!("the node agent on {endpoint} answered {status}")
    } else {
        text
    };
    ApiError::new(status, reason_for(status), message).into_response()
}

/// Up to [`ERROR_BODY_LIMIT`] bytes of a body.
async fn read_prefix(mut body: Incoming) -> Result<Bytes, hyper::Error> {
    let mut buffer = BytesMut::new();
    while buffer.len() < ERROR_BODY_LIMIT {
        let Some(frame) = body.frame().await else {
            break;
        };
        if let Ok(data) = frame?.into_data() {
            let room = ERROR_BODY_LIMIT - buffer.len();
            buffer.extend_from_slice(&data[..data.len().min(room)]);
        }
    }
    Ok(buffer.freeze())
}

/// The `reason` clients expect with a code, as client-go derives one for
/// answers that carry none.
fn reason_for(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        406 => "NotAcceptable",
        409 => "Conflict",
        410 => "Expired",
        413 => "RequestEntityTooLarge",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        code if code >= 500 => "InternalError",
        _ => "BadRequest",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn drops_hop_by_hop_headers() {
        let mut from = HeaderMap::new();
        from.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        from.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        from.insert(header::CONNECTION, HeaderValue::from_static("x-private"));
        from.insert("x-private", HeaderValue::from_static("1"));
        let mut to = HeaderMap::new();
        copy_end_to_end(&from, &mut to);
        assert_eq!(to.len(), 1);
        assert_eq!(to[header::CONTENT_TYPE], "text/plain");
    }

    #[test]
    fn only_streaming_verbs() {
        assert!(check_method(Subresource::Log, &Method::GET).is_ok());
        assert!(check_method(Subresource::Log, &Method::POST).is_err());
        assert!(check_method(Subresource::Exec, &Method::POST).is_ok());
        assert!(check_method(Subresource::PortForward, &Method::GET).is_ok());
        assert!(check_method(Subresource::Attach, &Method::DELETE).is_err());
    }
}
