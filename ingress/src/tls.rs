//! TLS termination: certificates from `kubernetes.io/tls` Secrets chosen
//! by SNI from the current snapshot, a self-signed fallback for names no
//! Secret covers, TLS 1.2 and 1.3 only, ALPN h2 and http/1.1.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use k8s_openapi::api::core::v1::Secret;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::build::Snapshot;
use crate::table::HostMatch;

/// Certificates by host name, exact and one-label wildcard.
#[derive(Debug)]
pub struct Certs {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl Certs {
    pub fn new(default: Arc<CertifiedKey>) -> Self {
        Certs {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            default,
        }
    }

    /// Adds a certificate for `host` unless an older Ingress set one.
    pub fn insert(&mut self, host: HostMatch, cert: Arc<CertifiedKey>) {
        match host {
            HostMatch::Any => {}
            HostMatch::Exact(h) => {
                self.exact.entry(h).or_insert(cert);
            }
            HostMatch::Wildcard(p) => {
                self.wildcard.entry(p).or_insert(cert);
            }
        }
    }

    /// The certificate for an SNI name (any case), or the default.
    pub fn find(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni else {
            return self.default.clone();
        };
        let name = name.to_ascii_lowercase();
        if let Some(c) = self.exact.get(&name) {
            return c.clone();
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .unwrap_or(&self.default)
            .clone()
    }
}

/// Parses a Secret's `tls.crt` and `tls.key`.
pub fn certified_key(secret: &Secret) -> Result<Arc<CertifiedKey>, String> {
    let data = secret.data.as_ref().ok_or("the Secret has no data")?;
    let crt = data.get("tls.crt").ok_or("no tls.crt")?;
    let key = data.get("tls.key").ok_or("no tls.key")?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&crt.0)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.crt: {e}"))?;
    if chain.is_empty() {
        return Err("tls.crt holds no certificate".into());
    }
    let key = PrivateKeyDer::from_pem_slice(&key.0).map_err(|e| format!("tls.key: {e}"))?;
    let key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("tls.key: {e}"))?;
    let certified = CertifiedKey::new(chain, key);
    // A key that does not belong to the certificate would fail every handshake.
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(Arc::new(certified))
        }
        Err(e) => Err(format!("tls.key does not match tls.crt: {e}")),
    }
}

/// The certificate served when no Secret covers the name, as other
/// controllers serve a "fake" one.
pub fn default_certificate() -> Result<Arc<CertifiedKey>, rcgen::Error> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(vec!["ingress.skiff.invalid".to_owned()])?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        "Skiff Ingress Default Certificate",
    );
    let cert = params.self_signed(&key)?;
    let der = PrivateKeyDer::try_from(key.serialize_der())
        .map_err(|_| rcgen::Error::CouldNotParseKeyPair)?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&der)
        .map_err(|_| rcgen::Error::CouldNotParseKeyPair)?;
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signing,
    )))
}

/// Picks the certificate from whatever snapshot is current at handshake.
#[derive(Debug)]
pub struct SniResolver(pub Arc<ArcSwap<Snapshot>>);

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load().certs.find(hello.server_name()))
    }
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot").finish_non_exhaustive()
    }
}

/// All of ring's suites, the SHA-256 ones first.
const CIPHER_SUITES: [rustls::SupportedCipherSuite; 9] = {
    use rustls::crypto::ring::cipher_suite::*;
    [
        TLS13_AES_128_GCM_SHA256,
        TLS13_CHACHA20_POLY1305_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    ]
};

pub fn server_config(
    state: Arc<ArcSwap<Snapshot>>,
    resumption: bool,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = CIPHER_SUITES.to_vec();
    for group in &mut provider.kx_groups {
        if group.name() == rustls::NamedGroup::X25519 {
            *group = &crate::kx::X25519;
        }
    }
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver(state)));
    // Our order, not the client's: clients such as OpenSSL list AES-256
    // first, whose SHA-384 key schedule costs a handshake noticeably more
    // than SHA-256's at no gain in practice.
    config.ignore_client_order = true;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    if resumption {
        config.session_storage = rustls::server::ServerSessionMemoryCache::new(16_384);
        config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    } else {
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every suite of the provider is offered, only the order differs.
    #[test]
    fn all_suites_sha256_first() {
        let all = rustls::crypto::ring::ALL_CIPHER_SUITES;
        assert_eq!(CIPHER_SUITES.len(), all.len());
        assert!(all.iter().all(|s| CIPHER_SUITES.contains(s)));
        assert_eq!(
            CIPHER_SUITES[0].suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        );
    }
}
