//! Ending a client connection with its last answer: the answer, the TLS
//! close_notify alert and the FIN leave in one TCP segment.
//!
//! Written one after another, they were three segments (two over plain
//! HTTP), and on loopback the sender's CPU also runs the receiver's side of
//! every segment and the wakeup of the process waiting for it. The bytes
//! are sent with `MSG_MORE`, which keeps them queued, and the shutdown that
//! follows at once adds the FIN to that queued segment and pushes it.

use std::io::{self, IoSlice, Write};
use std::os::fd::AsRawFd;

use tokio::io::{AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// Answers larger than this go out the ordinary way: the TLS session
/// buffers plaintext only up to a limit, and a big answer fills segments
/// of its own anyway.
pub const MAX_FINAL: usize = 16 * 1024;

/// A client connection that can send its last bytes and its end together.
pub trait Finish: AsyncWrite + Unpin + Send {
    /// Writes `data` (at most [`MAX_FINAL`] bytes) as the connection's last
    /// bytes and shuts its write side.
    fn finish(&mut self, data: &[u8]) -> impl Future<Output = io::Result<()>> + Send;
}

impl Finish for TcpStream {
    async fn finish(&mut self, data: &[u8]) -> io::Result<()> {
        let mut sent = 0;
        while sent < data.len() {
            match More(self).write(&data[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable().await?,
                Err(e) => return Err(e),
            }
        }
        self.shutdown().await
    }
}

impl Finish for Box<TlsStream<TcpStream>> {
    async fn finish(&mut self, data: &[u8]) -> io::Result<()> {
        let (tcp, tls) = self.get_mut();
        tls.writer().write_all(data)?;
        tls.send_close_notify();
        while tls.wants_write() {
            match tls.write_tls(&mut More(tcp)) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => tcp.writable().await?,
                Err(e) => return Err(e),
            }
        }
        tcp.shutdown().await
    }
}

/// Writes to a socket with `MSG_MORE`, without blocking.
struct More<'a>(&'a TcpStream);

impl Write for More<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let fd = self.0.as_raw_fd();
        self.0.try_io(Interest::WRITABLE, || {
            // SAFETY: an all-zero msghdr is valid; the iovecs point into
            // `bufs` (IoSlice is ABI-compatible with iovec) and outlive
            // the call.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = bufs.as_ptr().cast_mut().cast();
            msg.msg_iovlen = bufs.len();
            let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_MORE | libc::MSG_NOSIGNAL) };
            usize::try_from(n).map_err(|_| io::Error::last_os_error())
        })
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// The peer reads the bytes whole, then the end of the stream.
    #[tokio::test]
    async fn tcp_sends_the_bytes_then_the_end() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.expect("read");
            got
        });
        let (mut server, _) = listener.accept().await.expect("accept");
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".repeat(300);
        assert!(answer.len() <= MAX_FINAL);
        server.finish(&answer).await.expect("finish");
        assert_eq!(client.await.expect("client"), answer);
    }

    /// Over TLS the client reads the answer and then a clean end: the
    /// close_notify alert came before the FIN (without it, rustls reports
    /// the end as truncation).
    #[tokio::test]
    async fn tls_sends_the_answer_the_alert_and_the_end() {
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::new()).expect("ca params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::from_ca_cert_der(ca.der(), ca_key).expect("issuer");
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec!["a.test".to_owned()]).expect("params");
        let cert = params.signed_by(&key, &issuer).expect("cert");
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls_pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("der"),
            )
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).expect("root");
        let client_config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(client_config));
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let name = rustls_pki_types::ServerName::try_from("a.test").expect("name");
            let mut tls = connector.connect(name, tcp).await.expect("handshake");
            let mut got = Vec::new();
            tls.read_to_end(&mut got).await.map(|_| got)
        });
        let (tcp, _) = listener.accept().await.expect("accept");
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server_config));
        let mut server = Box::new(acceptor.accept(tcp).await.expect("server handshake"));
        server.finish(b"the answer").await.expect("finish");
        let got = client.await.expect("client").expect("a clean end");
        assert_eq!(got, b"the answer");
    }
}
