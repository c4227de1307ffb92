//! How a `skiff agent` on another machine joins, as k3s does it: it
//! fetches the server CA from `GET /cacerts` (unauthenticated; the agent
//! checks it against the hash its `K10…` token carries before trusting
//! it), then presents the join token to
//! `POST /v1-skiff/node-certificates` with its node name and addresses
//! and gets its credentials back: a client certificate as
//! `system:node:<name>` in `system:nodes` for the API, and the serving
//! certificate of its kubelet API (from the server CA, which the API
//! server trusts when it dials agents) with the client CA that API must
//! accept.
//!
//! These routes sit outside the API's authentication: the token is their
//! only credential.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::pki::{Pki, ServerNames};

/// The join endpoints' paths.
pub const CACERTS_PATH: &str = "/cacerts";
pub const CERTIFICATES_PATH: &str = "/v1-skiff/node-certificates";

/// What a joining node asks for.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CertificateRequest {
    pub node_name: String,
    /// Addresses its kubelet API is reached at (the Node's InternalIP).
    pub addresses: Vec<IpAddr>,
}

/// What it gets back (PEM throughout).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeCredentials {
    pub client_cert: String,
    pub client_key: String,
    pub serving_cert: String,
    pub serving_key: String,
    /// The CA whose client certificates the kubelet API accepts.
    pub client_ca: String,
}

/// The routes, to merge into the API server's router.
pub fn routes(pki: Arc<Pki>) -> Router {
    Router::new()
        .route(CACERTS_PATH, get(cacerts))
        .route(CERTIFICATES_PATH, post(certificates))
        .with_state(pki)
}

async fn cacerts(State(pki): State<Arc<Pki>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        pki.server_ca_pem().to_owned(),
    )
        .into_response()
}

async fn certificates(
    State(pki): State<Arc<Pki>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    if presented.is_empty() || !pki.verify_token(presented) {
        return refuse(
            StatusCode::UNAUTHORIZED,
            "a valid node join token is required",
        );
    }
    let request: CertificateRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, &format!("invalid request: {e}")),
    };
    if let Err(reason) = check_node_name(&request.node_name) {
        return refuse(StatusCode::BAD_REQUEST, &reason);
    }
    match issue(&pki, &request) {
        Ok(credentials) => {
            tracing::info!(node = %request.node_name, "issued node credentials");
            Json(credentials).into_response()
        }
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn issue(pki: &Pki, request: &CertificateRequest) -> Result<NodeCredentials, super::pki::PkiError> {
    let user = format!("system:node:{}", request.node_name);
    let (client_cert, client_key) = pki.issue_client_cert(&user, &["system:nodes"])?;
    let mut names = ServerNames::default();
    for ip in &request.addresses {
        names.add_ip(*ip);
    }
    names.add_dns_name(&request.node_name);
    let (serving_cert, serving_key) = pki.issue_node_serving_cert(&request.node_name, &names)?;
    Ok(NodeCredentials {
        client_cert,
        client_key,
        serving_cert,
        serving_key,
        client_ca: pki.client_ca_pem().to_owned(),
    })
}

/// A Node name is a DNS subdomain (lowercase, digits, `-` and `.`).
fn check_node_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if valid {
        Ok(())
    } else {
        Err(format!(
            "invalid node name {name:?}: must be a lowercase DNS subdomain"
        ))
    }
}

fn refuse(status: StatusCode, message: &str) -> Response {
    (status, message.to_owned()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_dns_subdomains() {
        for good in ["worker-1", "a", "n1.example"] {
            assert!(check_node_name(good).is_ok(), "{good}");
        }
        for bad in ["", "Worker", "-a", "a-", "a/b", "a b", "system:node"] {
            assert!(check_node_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn credentials_name_the_node() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(&tmp.path().join("tls"), &ServerNames::default()).unwrap();
        let request = CertificateRequest {
            node_name: "worker-1".into(),
            addresses: vec!["192.0.2.7".parse().unwrap()],
        };
        let credentials = issue(&pki, &request).unwrap();
        assert!(credentials.client_cert.contains("BEGIN CERTIFICATE"));
        assert!(credentials.serving_key.contains("PRIVATE KEY"));
        assert_eq!(credentials.client_ca, pki.client_ca_pem());
    }
}
