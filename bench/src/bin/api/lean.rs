//! A lean HTTPS client for the load: one TLS connection per concurrent
//! client, HTTP/1.1 through hyper's connection API, the connection driven
//! inside the caller's own task.
//!
//! A kube-rs call passes through a tower buffer task and a connection
//! pool's dispatch task before it reaches its socket, and back. The
//! benchmark's clients share the machine's two cores with the server, so
//! those hops are CPU taken from the server and time added to every
//! latency. This client shows the server's latency with as little client
//! cost on top as HTTPS allows, the way a load generator such as `wrk`
//! would be used against any server.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

type Io = TokioIo<TlsStream<TcpStream>>;

/// Opens connections to one server as its admin.
pub struct Dialer {
    connector: TlsConnector,
    host: String,
    port: u16,
}

/// One open connection; calls on it take turns.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    connection: std::pin::Pin<Box<Connection<Io, Full<Bytes>>>>,
}

impl Dialer {
    /// The server at `url` (`https://host:port`), trusted through the
    /// cluster CA in `tls_dir`, authenticated with the admin client
    /// certificate kept there.
    pub fn new(url: &str, tls_dir: &Path) -> anyhow::Result<Self> {
        let uri: http::Uri = url.parse().with_context(|| format!("server URL {url}"))?;
        let host = uri.host().context("server URL has no host")?.to_string();
        let port = uri.port_u16().unwrap_or(443);
        let read = |name: &str| {
            std::fs::read(tls_dir.join(name))
                .with_context(|| format!("reading {}", tls_dir.join(name).display()))
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&read("server-ca.crt")?) {
            roots.add(cert?)?;
        }
        let chain = CertificateDer::pem_slice_iter(&read("client-admin.crt")?)
            .collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(&read("client-admin.key")?)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Dialer {
            connector: TlsConnector::from(Arc::new(config)),
            host,
            port,
        })
    }

    pub async fn connect(&self) -> anyhow::Result<Conn> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from(self.host.clone())?;
        let tls = self.connector.connect(name, tcp).await?;
        let (sender, connection) = http1::handshake(TokioIo::new(tls)).await?;
        Ok(Conn {
            sender,
            connection: Box::pin(connection),
        })
    }
}

impl Conn {
    /// Sends `request` and reads its whole response body; an answer other
    /// than 2xx is an error.
    pub async fn call(&mut self, request: http::Request<Full<Bytes>>) -> anyhow::Result<Bytes> {
        let sender = &mut self.sender;
        let exchange = async move {
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::ensure!(
                status.is_success(),
                "{status}: {}",
                String::from_utf8_lossy(&body)
            );
            anyhow::Ok(body)
        };
        tokio::select! {
            answer = exchange => answer,
            ended = &mut self.connection => match ended {
                Ok(()) => anyhow::bail!("the server closed the connection"),
                Err(e) => Err(e.into()),
            },
        }
    }
}
