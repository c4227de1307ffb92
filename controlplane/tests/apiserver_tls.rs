//! The HTTPS listener over real sockets and real TLS: client-certificate identities, ALPN,
//! rejected certificates, shutdown, and the real kubectl against it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::{Extension, Router};
use controlplane::apiserver::pki::{Pki, ServerNames};
use controlplane::apiserver::tls::{PeerInfo, serve, server_config};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

struct Server {
    addr: SocketAddr,
    pki: Pki,
    _dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

async fn whoami(Extension(peer): Extension<PeerInfo>) -> String {
    let ip = peer.remote.ip();
    match peer.identity {
        Some(id) => format!("user={} groups={} from={ip}", id.user, id.groups.join(",")),
        None => format!("anonymous from={ip}"),
    }
}

async fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let names = ServerNames::new(
        &[],
        "test-host",
        "10.43.0.1".parse().unwrap(),
        "cluster.local",
    );
    let pki = Pki::load_or_create(&dir.path().join("tls"), &names).unwrap();
    let config = server_config(&pki).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = Router::new().route("/whoami", get(whoami));
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(listener, config, router, async {
        let _ = stopped.await;
    }));
    Server {
        addr,
        pki,
        _dir: dir,
        stop: Some(stop),
        task,
    }
}

fn client_config(pki: &Pki, cert: Option<(&str, &str)>, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.server_ca_pem().as_bytes()).unwrap())
        .unwrap();
    let builder =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
    let mut config = match cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

fn admin_files(pki: &Pki) -> (String, String) {
    let read = |f: &str| std::fs::read_to_string(pki.tls_dir().join(f)).unwrap();
    (read("client-admin.crt"), read("client-admin.key"))
}

async fn connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("kubernetes.default.svc").unwrap();
    TlsConnector::from(config).connect(name, tcp).await
}

/// One HTTP/1.1 request; returns the body.
async fn get_over(mut tls: TlsStream<TcpStream>, path: &str) -> std::io::Result<String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    match tls.read_to_end(&mut response).await {
        Ok(_) => {}
        // Some peers close without close_notify once the response is complete.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
        Err(e) => return Err(e),
    }
    let response = String::from_utf8(response).unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let (_, body) = response.split_once("\r\n\r\n").unwrap();
    Ok(body.to_string())
}

async fn whoami_with(server: &Server, cert: Option<(&str, &str)>) -> std::io::Result<String> {
    let config = client_config(&server.pki, cert, &[b"http/1.1"]);
    get_over(connect(server.addr, config).await?, "/whoami").await
}

#[tokio::test]
async fn client_certificates_name_the_user() {
    let server = start().await;
    let (cert, key) = admin_files(&server.pki);
    assert_eq!(
        whoami_with(&server, Some((&cert, &key))).await.unwrap(),
        "user=system:admin groups=system:masters from=127.0.0.1"
    );

    let (cert, key) = server
        .pki
        .issue_client_cert("system:node:n1", &["system:nodes", "system:authenticated"])
        .unwrap();
    assert_eq!(
        whoami_with(&server, Some((&cert, &key))).await.unwrap(),
        "user=system:node:n1 groups=system:nodes,system:authenticated from=127.0.0.1"
    );

    assert_eq!(
        whoami_with(&server, None).await.unwrap(),
        "anonymous from=127.0.0.1"
    );
}

#[tokio::test]
async fn certificates_from_another_ca_are_refused() {
    let server = start().await;
    let other = tempfile::tempdir().unwrap();
    let names = ServerNames::new(&[], "other", "10.43.0.1".parse().unwrap(), "cluster.local");
    let foreign = Pki::load_or_create(other.path(), &names).unwrap();
    let (cert, key) = foreign
        .issue_client_cert("system:admin", &["system:masters"])
        .unwrap();

    // With TLS 1.3 the client learns of the rejection only on its first read.
    let result = whoami_with(&server, Some((&cert, &key))).await;
    assert!(result.is_err(), "{result:?}");

    // Garbage instead of a handshake, and a client that never finishes one.
    let mut junk = TcpStream::connect(server.addr).await.unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let _idle = TcpStream::connect(server.addr).await.unwrap();

    let (cert, key) = admin_files(&server.pki);
    assert!(
        whoami_with(&server, Some((&cert, &key)))
            .await
            .unwrap()
            .starts_with("user=system:admin")
    );
}

#[tokio::test]
async fn alpn_offers_h2_and_http11() {
    let server = start().await;
    let (cert, key) = admin_files(&server.pki);
    let h11 = connect(
        server.addr,
        client_config(&server.pki, Some((&cert, &key)), &[b"http/1.1"]),
    )
    .await
    .unwrap();
    assert_eq!(h11.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));

    let preference: &[&[u8]] = &[b"h2", b"http/1.1"];
    let mut h2 = connect(
        server.addr,
        client_config(&server.pki, Some((&cert, &key)), preference),
    )
    .await
    .unwrap();
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    // The connection preface and an empty SETTINGS frame; an HTTP/2 server answers with its
    // own SETTINGS frame (type 4 on stream 0).
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut header = [0u8; 9];
    h2.read_exact(&mut header).await.unwrap();
    assert_eq!(header[3], 4, "{header:?}");
    assert_eq!(&header[5..9], &[0, 0, 0, 0]);
}

#[tokio::test]
async fn kubectl_reaches_the_server_with_the_admin_kubeconfig() {
    let server = start().await;
    let kubeconfig = server.pki.tls_dir().join("../kubeconfig.yaml");
    server
        .pki
        .write_kubeconfig(
            &kubeconfig,
            &format!("https://127.0.0.1:{}", server.addr.port()),
        )
        .unwrap();
    let output = kubectl(&kubeconfig, &["get", "--raw", "/whoami"]).await;
    assert_eq!(
        output,
        "user=system:admin groups=system:masters from=127.0.0.1"
    );
}

#[tokio::test]
async fn shutdown_stops_accepting() {
    let mut server = start().await;
    let (cert, key) = admin_files(&server.pki);
    // An idle keep-alive connection must not hold shutdown up.
    let _idle = connect(
        server.addr,
        client_config(&server.pki, Some((&cert, &key)), &[b"h2"]),
    )
    .await
    .unwrap();
    server.stop.take().unwrap().send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(3), &mut server.task)
        .await
        .expect("serve returns promptly")
        .unwrap();
    assert!(TcpStream::connect(server.addr).await.is_err());
}

async fn kubectl(kubeconfig: &Path, args: &[&str]) -> String {
    let output = tokio::process::Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--request-timeout", "10s"])
        .args(args)
        .output()
        .await
        .expect("kubectl is installed");
    assert!(
        output.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}
