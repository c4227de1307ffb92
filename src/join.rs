//! `skiff agent --server URL --token T`: a node joining a server, as a k3s
//! agent does. It fetches the server CA and accepts it only if its hash is
//! the one the `K10…` token pins, asks for its credentials with the token
//! (see `controlplane::apiserver::node_join`), keeps them under
//! `DATA_DIR/agent/tls` with a kubeconfig naming them, and runs the node
//! agent and the node's pod network overlay with them. The server's answer
//! also names the cluster DNS address and domain (for pods'
//! `resolv.conf`) and the Service and pod ranges (for the node's data
//! plane); an older server's answer lacks them and the defaults stay.
//! Unless `--disable dns`, the node serves cluster DNS itself (see
//! `crate::dns::serve_for_agent`).

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use controlplane::apiserver::node_join::{
    CACERTS_PATH, CERTIFICATES_PATH, CertificateRequest, ClusterSettings, NodeCredentials,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};

use crate::cli::{AgentArgs, AgentComponent};

/// Until the server answers at start; it may still be starting itself.
const JOIN_RETRY: Duration = Duration::from_secs(2);
const JOIN_ATTEMPTS: u32 = 60;

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    // A node's agent is sized by its memory, not its allocation speed:
    // with transparent huge pages mimalloc's thread heaps each fill 2 MB
    // pages (18 of 79 MB with 50 pods). Containers get the machine's
    // setting back (`agent::shim::host_thp`).
    if let Err(e) = agent::shim::disable_own_thp() {
        tracing::warn!(error = %e, "cannot turn transparent huge pages off for the agent");
    }
    let url: http::Uri = args
        .server
        .parse()
        .with_context(|| format!("--server {:?} is not a URL", args.server))?;
    if url.scheme_str() != Some("https") || url.host().is_none() {
        bail!("--server {:?} must be an https:// URL", args.server);
    }
    let token = args.token.trim().to_owned();
    let tls_dir = args.node.data_dir.join("agent").join("tls");
    std::fs::create_dir_all(&tls_dir).with_context(|| format!("creating {}", tls_dir.display()))?;

    let ca_pem = retry("fetching the server CA", || fetch_ca(&args.server)).await?;
    match pinned_hash(&token) {
        Some(pinned) => {
            let hash = hex(&Sha256::digest(ca_pem.as_bytes()));
            if hash != pinned {
                bail!(
                    "the server's CA (sha256 {hash}) is not the one the join token names \
                     ({pinned}); refusing to join"
                );
            }
        }
        None => tracing::warn!(
            "the join token is a bare secret: the server CA is trusted as first seen \
             (use the K10 token from DATA_DIR/server/token to pin it)"
        ),
    }
    let ca_path = tls_dir.join("server-ca.crt");
    write_private(&ca_path, &ca_pem)?;

    let node_ip = match args.node.node_ip {
        Some(ip) => ip,
        None => route_source(&url).await?,
    };
    let agent_config = crate::node_agent::config(&args.node, node_ip);
    let request = CertificateRequest {
        node_name: agent_config.node_name.clone(),
        addresses: vec![node_ip],
    };
    let credentials = retry("obtaining the node's certificates", || {
        request_credentials(&args.server, &ca_pem, &token, &request)
    })
    .await?;
    let cert_path = tls_dir.join("client.crt");
    let key_path = tls_dir.join("client.key");
    write_private(&cert_path, &credentials.client_cert)?;
    write_private(&key_path, &credentials.client_key)?;
    let user = serde_json::json!({ "client-certificate": cert_path, "client-key": key_path });
    let kubeconfig_path = args.node.data_dir.join("agent").join("kubeconfig.yaml");
    write_private(&kubeconfig_path, &kubeconfig(&args.server, &ca_path, &user))?;
    let client = crate::api_client::multiplexed(client_config(&args.server, &ca_pem, user)?)?;

    let mut agent_config = agent_config;
    let cluster = &credentials.cluster;
    check_settings(cluster)?;
    if let Some(dns) = cluster.cluster_dns {
        agent_config.cluster_dns = dns;
    }
    if let Some(domain) = &cluster.cluster_domain {
        agent_config.cluster_domain = domain.clone();
    }
    agent_config.tls = Some(agent::KubeletTls {
        cert_pem: credentials.serving_cert,
        key_pem: credentials.serving_key,
        client_ca_pem: credentials.client_ca,
    });
    tracing::info!(
        server = %args.server,
        node = %agent_config.node_name,
        %node_ip,
        cluster_dns = %agent_config.cluster_dns,
        cluster_domain = %agent_config.cluster_domain,
        "joined; running the node agent"
    );
    // The node's end of the pod network overlay, as the server runs its
    // own: with the server's Service range it balances Services too.
    let mut overlay =
        dataplane::overlay::OverlayConfig::new(agent_config.node_name.clone(), node_ip);
    overlay.service_cidr = cluster.service_cidr;
    overlay.cluster_cidr = cluster.cluster_cidr;
    crate::dataplane::tune_for_node(&mut overlay, &args.node);
    tokio::spawn(dataplane::overlay::run_supervised(client.clone(), overlay));
    // Stopped when this function returns, and by the kernel if the
    // process dies outright.
    let _dns = (!args.disable.contains(&AgentComponent::Dns))
        .then(|| {
            crate::dns::serve_for_agent(
                &agent_config.skiff_exe,
                &kubeconfig_path,
                agent_config.cluster_dns,
                &agent_config.cluster_domain,
                &args.dns_upstream_resolv_conf,
            )
        })
        .flatten();
    let agent = agent::run(client, agent_config);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("waiting for the stop signal")?;
    tokio::select! {
        result = agent => result.context("the node agent stopped"),
        stop = tokio::signal::ctrl_c() => stop.context("waiting for the stop signal"),
        _ = terminate.recv() => Ok(()),
    }
}

/// A node agent's runtime is sized for its memory: its blocking jobs
/// (making network namespaces, allocating pod addresses) come in bursts
/// of one per pod, and an unbounded pool grew to one thread per pod
/// starting (42 threads for 50 pods), each keeping its own allocator
/// heap. A few threads do those short jobs as fast, as they contend on
/// the kernel's and the address allocator's locks anyway; and its async
/// work is I/O waiting that two workers keep up with.
pub fn size_runtime(builder: &mut tokio::runtime::Builder) {
    const MAX_WORKERS: usize = 2;
    const MAX_BLOCKING: usize = 4;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    builder
        .worker_threads(cpus.min(MAX_WORKERS))
        .max_blocking_threads(MAX_BLOCKING);
}

/// The server CA as `GET /cacerts` gives it, before anything is trusted:
/// the token's hash decides whether to keep it.
async fn fetch_ca(server: &str) -> anyhow::Result<String> {
    let mut config = kube::Config::new(server.parse()?);
    config.accept_invalid_certs = true;
    let client = crate::api_client::multiplexed(config)?;
    let request = http::Request::get(CACERTS_PATH).body(Vec::new())?;
    let pem = client.request_text(request).await?;
    if !pem.contains("BEGIN CERTIFICATE") {
        bail!("the server's {CACERTS_PATH} holds no certificate");
    }
    Ok(pem)
}

async fn request_credentials(
    server: &str,
    ca_pem: &str,
    token: &str,
    request: &CertificateRequest,
) -> anyhow::Result<NodeCredentials> {
    let user = serde_json::json!({ "token": token });
    let client = crate::api_client::multiplexed(client_config(server, ca_pem, user)?)?;
    let body = serde_json::to_vec(request)?;
    let request = http::Request::post(CERTIFICATES_PATH)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)?;
    let text = client.request_text(request).await?;
    serde_json::from_str(&text).context("reading the server's answer")
}

/// The agent's client settings, built in memory rather than read back
/// from the kubeconfig written for people and child processes: parsing
/// YAML would leave a YAML parser's code (0.8 MB) resident in the agent
/// for its whole life. `user` is a kubeconfig `user` entry.
fn client_config(
    server: &str,
    ca_pem: &str,
    user: serde_json::Value,
) -> anyhow::Result<kube::Config> {
    let mut config = kube::Config::new(server.parse()?);
    let roots = CertificateDer::pem_slice_iter(ca_pem.as_bytes())
        .map(|cert| cert.map(|cert| cert.to_vec()))
        .collect::<Result<Vec<_>, _>>()
        .context("reading the server CA")?;
    config.root_cert = Some(roots);
    config.auth_info = serde_json::from_value(user).context("the agent's credentials")?;
    Ok(config)
}

/// A kubeconfig naming the CA file and the kubeconfig `user` entry. JSON
/// is YAML, so kubectl and `kube` read it as any kubeconfig.
fn kubeconfig(server: &str, ca_path: &Path, user: &serde_json::Value) -> String {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "default",
            "cluster": { "server": server, "certificate-authority": ca_path },
        }],
        "users": [{ "name": "default", "user": user }],
        "contexts": [{
            "name": "default",
            "context": { "cluster": "default", "user": "default" },
        }],
        "current-context": "default",
    });
    format!("{config:#}\n")
}

/// The server's settings are applied to every pod: a domain that is not a
/// DNS name would break every pod's resolver, so it is refused here.
fn check_settings(cluster: &ClusterSettings) -> anyhow::Result<()> {
    if let Some(domain) = &cluster.cluster_domain {
        let valid = !domain.is_empty()
            && domain.len() <= 253
            && domain.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            });
        if !valid {
            bail!("the server's cluster domain {domain:?} is not a DNS name; refusing to join");
        }
    }
    Ok(())
}

/// The hash a `K10<sha256>::user:secret` token pins; `None` for a bare secret.
fn pinned_hash(token: &str) -> Option<String> {
    let (hash, _) = token.strip_prefix("K10")?.split_once("::")?;
    Some(hash.to_ascii_lowercase())
}

/// The local address the kernel would use to reach the server: the
/// node's address on the network it shares with the server.
async fn route_source(url: &http::Uri) -> anyhow::Result<IpAddr> {
    let host = url
        .host()
        .unwrap_or_default()
        .trim_matches(|c| c == '[' || c == ']');
    let port = url.port_u16().unwrap_or(443);
    let target: SocketAddr = tokio::net::lookup_host((host, port))
        .await
        .with_context(|| format!("resolving {host}"))?
        .next()
        .with_context(|| format!("{host} has no address"))?;
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    // Connecting a UDP socket sends nothing; it only picks the route.
    let socket = tokio::net::UdpSocket::bind(bind).await?;
    socket
        .connect(target)
        .await
        .with_context(|| format!("no route to {target}; pass --node-ip"))?;
    Ok(socket.local_addr()?.ip())
}

async fn retry<T, F, Fut>(what: &str, mut attempt: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut tries = 0;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) if tries + 1 < JOIN_ATTEMPTS && retriable(&e) => {
                tries += 1;
                tracing::warn!(error = %format!("{e:#}"), "{what}; retrying");
                tokio::time::sleep(JOIN_RETRY).await;
            }
            Err(e) => return Err(e.context(what.to_owned())),
        }
    }
}

/// A refusal from the server (bad token, bad request) will not change by
/// asking again; a connection failure may.
fn retriable(error: &anyhow::Error) -> bool {
    !matches!(
        error.downcast_ref::<kube::Error>(),
        Some(kube::Error::Api(_))
    )
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::config::Kubeconfig;

    #[test]
    fn k10_tokens_pin_the_ca() {
        assert_eq!(pinned_hash("K10AbC::server:secret").as_deref(), Some("abc"));
        assert_eq!(pinned_hash("secret"), None);
    }

    #[test]
    fn cluster_domains_must_be_dns_names() {
        for good in ["cluster.local", "corp.example", "a"] {
            let cluster = ClusterSettings {
                cluster_domain: Some(good.into()),
                ..ClusterSettings::default()
            };
            assert!(check_settings(&cluster).is_ok(), "{good}");
        }
        for bad in ["", "a..b", "-a.b", "a b", "a\nnameserver 1.2.3.4"] {
            let cluster = ClusterSettings {
                cluster_domain: Some(bad.into()),
                ..ClusterSettings::default()
            };
            assert!(check_settings(&cluster).is_err(), "{bad:?}");
        }
        assert!(check_settings(&ClusterSettings::default()).is_ok());
    }

    #[test]
    fn the_written_kubeconfig_names_the_server_ca_and_credentials() {
        let user =
            serde_json::json!({ "client-certificate": "/d/c.crt", "client-key": "/d/c.key" });
        let text = kubeconfig("https://10.0.0.1:6443", Path::new("/d/ca.crt"), &user);
        let parsed = Kubeconfig::from_yaml(&text).unwrap();
        let cluster = parsed.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://10.0.0.1:6443"));
        assert_eq!(cluster.certificate_authority.as_deref(), Some("/d/ca.crt"));
        let auth = parsed.auth_infos[0].auth_info.as_ref().unwrap();
        assert_eq!(auth.client_certificate.as_deref(), Some("/d/c.crt"));
        assert_eq!(auth.client_key.as_deref(), Some("/d/c.key"));
        assert_eq!(parsed.current_context.as_deref(), Some("default"));
    }

    #[test]
    fn client_settings_carry_the_ca_and_the_user() {
        let ca = rcgen::generate_simple_self_signed(vec!["skiff-ca".to_owned()]).unwrap();
        let user = serde_json::json!({ "token": "K10x::server:y" });
        let config = client_config("https://10.0.0.1:6443", &ca.cert.pem(), user).unwrap();
        assert_eq!(config.cluster_url, "https://10.0.0.1:6443/");
        assert_eq!(config.root_cert, Some(vec![ca.cert.der().to_vec()]));
        assert!(config.auth_info.token.is_some());

        let user = serde_json::json!({ "token": "t" });
        let garbled = ca.cert.pem().replace("MII", "M!I");
        assert!(client_config("https://10.0.0.1:6443", &garbled, user).is_err());
        let user = serde_json::json!({ "client-key": 5 });
        assert!(client_config("https://10.0.0.1:6443", &ca.cert.pem(), user).is_err());
    }
}
