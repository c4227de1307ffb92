//! How a `skiff agent` on another machine joins, as k3s does it: it
//! fetches the server CA from `GET /cacerts` (unauthenticated; the agent
//! checks it against the hash its `K10…` token carries before trusting
//! it), then presents the join token to
//! `POST /v1-skiff/node-certificates` with its node name and addresses
//! and gets its credentials back: a client certificate as
//! `system:node:<name>` in `system:nodes` for the API, and the serving
//! certificate of its kubelet API (from the server CA, which the API
//! server trusts when it dials agents) with the client CA that API must
//! accept. The answer also carries the cluster settings a node must share
//! with its server (cluster DNS address and domain, Service and pod
//! ranges); an older server's answer lacks them and the node keeps its
//! defaults.
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
use ipnet::IpNet;
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
    #[serde(flatten)]
    pub cluster: ClusterSettings,
}

/// The server's cluster-wide settings a node applies to its pods and its
/// data plane. Each is optional on the wire: servers before these fields
/// existed send none, and the node keeps its defaults.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterSettings {
    /// The cluster DNS Service's address (pods' `nameserver`).
    #[serde(
        rename = "clusterDNS",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cluster_dns: Option<IpAddr>,
    /// The cluster domain (pods' DNS search path).
    #[serde(
        rename = "clusterDomain",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cluster_domain: Option<String>,
    /// The Service ClusterIP range the node's data plane balances.
    #[serde(
        rename = "serviceCIDR",
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_net"
    )]
    pub service_cidr: Option<IpNet>,
    /// The whole pod network (sources outside it reaching a Service are
    /// SNATed by the node).
    #[serde(
        rename = "clusterCIDR",
        default,
        skip_serializing_if = "Option::is_none",
        with = "optional_net"
    )]
    pub cluster_cidr: Option<IpNet>,
}

/// An `IpNet` as its text (`10.43.0.0/16`); the `ipnet` crate is built
/// without serde here.
mod optional_net {
    use ipnet::IpNet;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(net: &Option<IpNet>, out: S) -> Result<S::Ok, S::Error> {
        match net {
            Some(net) => out.collect_str(net),
            None => out.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(input: D) -> Result<Option<IpNet>, D::Error> {
        Option::<String>::deserialize(input)?
            .map(|text| text.parse().map_err(serde::de::Error::custom))
            .transpose()
    }
}

struct JoinState {
    pki: Arc<Pki>,
    cluster: ClusterSettings,
}

/// The routes, to merge into the API server's router.
pub fn routes(pki: Arc<Pki>, cluster: ClusterSettings) -> Router {
    Router::new()
        .route(CACERTS_PATH, get(cacerts))
        .route(CERTIFICATES_PATH, post(certificates))
        .with_state(Arc::new(JoinState { pki, cluster }))
}

async fn cacerts(State(state): State<Arc<JoinState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        state.pki.server_ca_pem().to_owned(),
    )
        .into_response()
}

async fn certificates(
    State(state): State<Arc<JoinState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or("");
    let pki = &state.pki;
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
    match issue(pki, &request, &state.cluster) {
        Ok(credentials) => {
            tracing::info!(node = %request.node_name, "issued node credentials");
            Json(credentials).into_response()
        }
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

fn issue(
    pki: &Pki,
    request: &CertificateRequest,
    cluster: &ClusterSettings,
) -> Result<NodeCredentials, super::pki::PkiError> {
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
        cluster: cluster.clone(),
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
        let cluster = ClusterSettings {
            cluster_dns: Some("10.96.0.10".parse().unwrap()),
            cluster_domain: Some("corp.example".into()),
            service_cidr: Some("10.96.0.0/16".parse().unwrap()),
            cluster_cidr: Some("10.244.0.0/16".parse().unwrap()),
        };
        let credentials = issue(&pki, &request, &cluster).unwrap();
        assert!(credentials.client_cert.contains("BEGIN CERTIFICATE"));
        assert!(credentials.serving_key.contains("PRIVATE KEY"));
        assert_eq!(credentials.client_ca, pki.client_ca_pem());
        assert_eq!(credentials.cluster, cluster);
    }

    #[test]
    fn cluster_settings_travel_with_the_credentials_and_may_be_absent() {
        let with = serde_json::json!({
            "clientCert": "c", "clientKey": "k", "servingCert": "s", "servingKey": "sk",
            "clientCa": "ca",
            "clusterDNS": "10.96.0.10", "clusterDomain": "corp.example",
            "serviceCIDR": "10.96.0.0/16", "clusterCIDR": "10.244.0.0/16",
        });
        let parsed: NodeCredentials = serde_json::from_value(with).unwrap();
        assert_eq!(
            parsed.cluster.cluster_dns,
            Some("10.96.0.10".parse().unwrap())
        );
        assert_eq!(
            parsed.cluster.cluster_domain.as_deref(),
            Some("corp.example")
        );
        assert_eq!(
            parsed.cluster.service_cidr,
            Some("10.96.0.0/16".parse().unwrap())
        );
        assert_eq!(
            parsed.cluster.cluster_cidr,
            Some("10.244.0.0/16".parse().unwrap())
        );
        let round = serde_json::to_value(&parsed).unwrap();
        assert_eq!(round["clusterDNS"], "10.96.0.10");
        assert_eq!(round["serviceCIDR"], "10.96.0.0/16");

        // An older server's answer: no settings, defaults kept.
        let without = serde_json::json!({
            "clientCert": "c", "clientKey": "k", "servingCert": "s", "servingKey": "sk",
            "clientCa": "ca",
        });
        let parsed: NodeCredentials = serde_json::from_value(without).unwrap();
        assert_eq!(parsed.cluster, ClusterSettings::default());
        let round = serde_json::to_value(&parsed).unwrap();
        assert!(round.get("clusterDNS").is_none(), "{round}");

        // A malformed setting is an error, not a silent default.
        let bad = serde_json::json!({
            "clientCert": "c", "clientKey": "k", "servingCert": "s", "servingKey": "sk",
            "clientCa": "ca", "clusterDNS": "not-an-ip",
        });
        assert!(serde_json::from_value::<NodeCredentials>(bad).is_err());
        let bad = serde_json::json!({
            "clientCert": "c", "clientKey": "k", "servingCert": "s", "servingKey": "sk",
            "clientCa": "ca", "serviceCIDR": "10.96.0.0/99",
        });
        assert!(serde_json::from_value::<NodeCredentials>(bad).is_err());
    }
}
