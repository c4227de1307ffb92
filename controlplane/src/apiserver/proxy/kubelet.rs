//! The API server's client for the node agents' kubelet API: one HTTP/1.1
//! connection per request (streams and upgrades own their connection), over
//! TLS that checks the agent's certificate against the cluster's server CA
//! and presents the API server's own client certificate.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::super::pki::Pki;
use super::super::status::ApiError;

/// TCP connect plus TLS handshake; an agent slower than this is as good as down.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Until the agent's response head. Exec and attach answer once the process
/// is set up, logs at once, so a minute is generous.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

/// The identity the API server presents to agents, as upstream's
/// `kube-apiserver-kubelet-client`.
const CLIENT_USER: &str = "system:apiserver";
const CLIENT_GROUP: &str = "system:masters";

/// Connects to node agents. Cheap to share: the TLS configuration is
/// built once.
#[derive(Clone)]
pub struct KubeletClient {
    connector: TlsConnector,
}

/// The client could not be set up from the given certificates.
#[derive(Debug, thiserror::Error)]
#[error("setting up the kubelet client: {what}: {reason}")]
pub struct KubeletClientError {
    what: &'static str,
    reason: String,
}

/// Where an agent listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Endpoint {
    /// The Node's name, for messages.
    pub(super) node: String,
    /// An IP address or DNS name from the Node's `status.addresses`.
    pub(super) host: String,
    pub(super) port: u16,
}

impl KubeletClient {
    /// Trusts agents whose serving certificate chains to `ca_pem`, and
    /// authenticates with `cert_pem`/`key_pem`.
    pub fn new(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, KubeletClientError> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            let cert = cert.map_err(setup_error("CA certificate"))?;
            roots.add(cert).map_err(setup_error("CA certificate"))?;
        }
        if roots.is_empty() {
            return Err(KubeletClientError {
                what: "CA certificate",
                reason: "no certificate in the PEM text".into(),
            });
        }
        let chain = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(setup_error("client certificate"))?;
        let key =
            PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(setup_error("client key"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(setup_error("protocol versions"))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(setup_error("client certificate"))?;
        // Upgrades (exec, attach, port-forward) exist only in HTTP/1.1.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(KubeletClient {
            connector: TlsConnector::from(Arc::new(config)),
        })
    }

    /// The client a server of this cluster uses: agents' serving
    /// certificates are signed by the server CA (as in k3s), and the API
    /// server authenticates with a fresh client certificate from the
    /// client CA.
    pub fn for_cluster(pki: &Pki) -> Result<Self, KubeletClientError> {
        let (cert, key) = pki
            .issue_client_cert(CLIENT_USER, &[CLIENT_GROUP])
            .map_err(setup_error("client certificate"))?;
        KubeletClient::new(pki.server_ca_pem(), &cert, &key)
    }

    /// Sends `request` (origin-form URI: path and query only) to the agent
    /// at `endpoint` on a new connection, returning its response head. The
    /// connection lives on in a task until the response body is consumed or
    /// dropped, or until the upgraded stream ends.
    pub(super) async fn send(
        &self,
        endpoint: &Endpoint,
        mut request: Request<Empty<Bytes>>,
    ) -> Result<Response<Incoming>, ApiError> {
        let tls = tokio::time::timeout(DIAL_TIMEOUT, self.dial(endpoint))
            .await
            .map_err(|_| {
                ApiError::unavailable(format!(
                    "error dialing backend: {endpoint}: timed out after {}s",
                    DIAL_TIMEOUT.as_secs()
                ))
            })??;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| bad_gateway(endpoint, &e))?;
        let node = endpoint.node.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(%node, error = %e, "kubelet connection ended with an error");
            }
        });
        if let Ok(host) = http::HeaderValue::from_str(&endpoint.authority()) {
            request.headers_mut().insert(http::header::HOST, host);
        }
        tokio::time::timeout(RESPONSE_TIMEOUT, sender.send_request(request))
            .await
            .map_err(|_| {
                ApiError::timeout(format!(
                    "the node agent on {endpoint} did not answer within {}s",
                    RESPONSE_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| bad_gateway(endpoint, &e))
    }

    async fn dial(
        &self,
        endpoint: &Endpoint,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ApiError> {
        let tcp = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .map_err(|e| {
                ApiError::unavailable(format!("error dialing backend: {endpoint}: {e}"))
            })?;
        // Small frames of interactive sessions must not wait on Nagle.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%endpoint, error = %e, "setting TCP_NODELAY failed");
        }
        let name = ServerName::try_from(endpoint.host.clone()).map_err(|e| {
            ApiError::unavailable(format!(
                "error dialing backend: {endpoint}: invalid host name: {e}"
            ))
        })?;
        self.connector
            .connect(name, tcp)
            .await
            .map_err(|e| bad_gateway(endpoint, &format!("TLS handshake failed: {e}")))
    }
}

impl fmt::Debug for KubeletClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeletClient").finish_non_exhaustive()
    }
}

impl Endpoint {
    /// `host:port`, with IPv6 addresses bracketed.
    pub(super) fn authority(&self) -> String {
        match self.host.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("[{ip}]:{}", self.port),
            _ => format!("{}:{}", self.host, self.port),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {:?} at {}", self.node, self.authority())
    }
}

/// The agent was reached but the exchange with it failed. Kubernetes has no
/// reason for 502; clients read any 5xx without one as `InternalError`.
fn bad_gateway(endpoint: &Endpoint, error: &dyn fmt::Display) -> ApiError {
    ApiError::new(
        http::StatusCode::BAD_GATEWAY,
        "InternalError",
        format!("error talking to the node agent on {endpoint}: {error}"),
    )
}

fn setup_error<E: fmt::Display>(what: &'static str) -> impl FnOnce(E) -> KubeletClientError {
    move |e| KubeletClientError {
        what,
        reason: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_brackets_ipv6() {
        let endpoint = |host: &str| Endpoint {
            node: "n".into(),
            host: host.into(),
            port: 10250,
        };
        assert_eq!(endpoint("10.0.0.1").authority(), "10.0.0.1:10250");
        assert_eq!(endpoint("fd00::1").authority(), "[fd00::1]:10250");
        assert_eq!(endpoint("node-1").authority(), "node-1:10250");
    }

    #[test]
    fn refuses_a_missing_ca() {
        let e = KubeletClient::new("", "", "").unwrap_err();
        assert!(e.to_string().contains("CA certificate"), "{e}");
    }

    #[test]
    fn builds_from_the_cluster_pki() {
        let dir = tempfile::tempdir().unwrap();
        let names = crate::apiserver::pki::ServerNames::default();
        let pki = Pki::load_or_create(dir.path(), &names).unwrap();
        KubeletClient::for_cluster(&pki).unwrap();
    }
}
