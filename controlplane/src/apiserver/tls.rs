//! The HTTPS listener: TLS accept loop and client certificate identity.
//!
//! Client certificates are optional at the TLS layer — anonymous and bearer-token clients
//! must get through the handshake — but any certificate presented must chain to the client
//! CA. Authentication proper happens in the handlers, from the [`PeerInfo`] each request
//! carries.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::{Body, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;
use tower::util::Oneshot;
use x509_parser::certificate::X509Certificate;

use super::pki::{Pki, PkiError};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests get to finish after shutdown; watches never finish on their
/// own, so the rest are cut off after this.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Pause after an accept error such as EMFILE, which would otherwise repeat at once.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

type BoxError = Box<dyn StdError + Send + Sync>;

/// The user a verified client certificate names, read as Kubernetes does: CN is the user,
/// every O a group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientIdentity {
    pub user: String,
    pub groups: Vec<String>,
}

/// Inserted into every request's extensions (`axum::Extension<PeerInfo>`).
#[derive(Clone, Debug)]
pub struct PeerInfo {
    /// `None` when the client presented no certificate.
    pub identity: Option<ClientIdentity>,
    pub remote: SocketAddr,
}

/// TLS 1.2 and 1.3 with the serving certificate; client certificates optional, verified
/// against the client CA; ALPN offers HTTP/2 first.
pub fn server_config(pki: &Pki) -> Result<Arc<ServerConfig>, PkiError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots
        .add(pki.client_ca_der().clone())
        .map_err(tls_error("client CA"))?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(tls_error("client certificate verifier"))?;
    let chain = CertificateDer::pem_slice_iter(pki.serving_cert_pem().as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(tls_error("serving certificate"))?;
    let key = PrivateKeyDer::from_pem_slice(pki.serving_key_pem().as_bytes())
        .map_err(tls_error("serving key"))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(tls_error("protocol versions"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(tls_error("serving certificate"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves HTTPS on `listener` until `shutdown` completes: stops accepting, lets open
/// connections finish for a short grace period, then drops the rest. One task per
/// connection; a failing connection is logged at debug and affects no other.
pub async fn serve<S, B>(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    service: S,
    shutdown: impl Future<Output = ()>,
) where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let acceptor = TlsAcceptor::from(config);
    let mut http = auto::Builder::new(TokioExecutor::new());
    // A timer enables hyper's header-read and keep-alive timeouts.
    http.http1().timer(TokioTimer::new());
    // Node components multiplex every watch and request on one HTTP/2
    // connection; kube-apiserver allows 1,000 streams on one (hyper: 200).
    http.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(1000);
    let http = Arc::new(http);
    let (stop_tx, stop_rx) = watch::channel(());
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);

    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                log_panic(done);
            }
            accepted = listener.accept() => match accepted {
                Ok((tcp, remote)) => {
                    connections.spawn(serve_connection(
                        tcp,
                        remote,
                        acceptor.clone(),
                        http.clone(),
                        service.clone(),
                        stop_rx.clone(),
                    ));
                }
                Err(e) if is_per_connection(&e) => {
                    tracing::debug!(error = %e, "accept failed");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }

    drop(listener);
    // No receiver left just means no connection is open.
    let _ = stop_tx.send(());
    let drain = async {
        while let Some(done) = connections.join_next().await {
            log_panic(done);
        }
    };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        tracing::debug!(
            open = connections.len(),
            "closing connections still open after the grace period"
        );
        connections.shutdown().await;
    }
}

async fn serve_connection<S, B>(
    tcp: TcpStream,
    remote: SocketAddr,
    acceptor: TlsAcceptor,
    http: Arc<auto::Builder<TokioExecutor>>,
    service: S,
    mut stop: watch::Receiver<()>,
) where
    S: tower::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    // Small HTTP/2 frames (watch events) must not wait on Nagle.
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(%remote, error = %e, "setting TCP_NODELAY failed");
    }
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
    let tls = tokio::select! {
        result = handshake => match result {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(%remote, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%remote, "TLS handshake timed out");
                return;
            }
        },
        _ = stop.changed() => return,
    };

    let identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(identity_of);
    let service = WithPeer {
        inner: service,
        peer: PeerInfo { identity, remote },
    };
    let mut connection =
        std::pin::pin!(http.serve_connection_with_upgrades(TokioIo::new(tls), service));
    let result = tokio::select! {
        result = connection.as_mut() => result,
        _ = stop.changed() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%remote, error = %e, "connection ended with an error");
    }
}

/// Hands each request to the inner service with the connection's [`PeerInfo`] attached.
struct WithPeer<S> {
    inner: S,
    peer: PeerInfo,
}

impl<S> hyper::service::Service<Request<Incoming>> for WithPeer<S>
where
    S: tower::Service<Request<Incoming>> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Oneshot<S, Request<Incoming>>;

    fn call(&self, mut request: Request<Incoming>) -> Self::Future {
        request.extensions_mut().insert(self.peer.clone());
        self.inner.clone().oneshot(request)
    }
}

/// The certificate was verified during the handshake; this only reads its subject. Kubernetes
/// refuses certificates without a CN, so those yield no identity.
fn identity_of(cert: &CertificateDer) -> Option<ClientIdentity> {
    let (_, cert): (_, X509Certificate) = x509_parser::parse_x509_certificate(cert).ok()?;
    let subject = cert.subject();
    let user = subject.iter_common_name().next()?.as_str().ok()?;
    if user.is_empty() {
        return None;
    }
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok())
        .map(str::to_string)
        .collect();
    Some(ClientIdentity {
        user: user.to_string(),
        groups,
    })
}

/// Errors that concern one connection attempt only, as opposed to the listener or process.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

fn log_panic(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done
        && e.is_panic()
    {
        tracing::error!(error = %e, "connection task panicked");
    }
}

fn tls_error<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> PkiError {
    move |e| PkiError::Tls {
        what,
        reason: e.to_string(),
    }
}
