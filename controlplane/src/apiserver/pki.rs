//! The cluster CA, serving and client certificates, the node join token and kubeconfig files.
//!
//! The layout follows k3s: two CAs under `DATA_DIR/server/tls` — `server-ca` signs the API
//! server's serving certificate, `client-ca` signs every client certificate (the admin's,
//! and later the nodes') — plus a join token whose `K10<hash>` prefix pins the server CA.
//! A CA is created once and never replaced: every node and kubeconfig trusts it.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType, SerialNumber,
    SigningKey,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::{GeneralName, ParsedExtension};

/// CAs outlive every certificate they sign; k3s uses the same ten years.
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// Leaf certificates closer than this to expiry are re-issued at start, as k3s does.
const RENEW_BEFORE: Duration = Duration::from_secs(90 * 24 * 3600);
/// Tolerates clocks on other nodes that run a little behind ours.
const BACKDATE: Duration = Duration::from_secs(3600);

const ADMIN_USER: &str = "system:admin";
const ADMIN_GROUP: &str = "system:masters";
const TOKEN_USER: &str = "server";

/// Everything that can go wrong with the cluster's certificates and token files.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{}: {reason}", path.display())]
    Damaged { path: PathBuf, reason: String },
    #[error(
        "{} exists but {} does not; refusing to create a new CA over an existing one \
         (restore the missing file, or remove both to start a new cluster)",
        present.display(),
        missing.display()
    )]
    IncompleteCa { present: PathBuf, missing: PathBuf },
    #[error("generating the {what}: {source}")]
    Generate {
        what: &'static str,
        source: rcgen::Error,
    },
    #[error("reading random bytes: {0}")]
    Random(getrandom::Error),
    #[error("invalid join token: {0}")]
    InvalidToken(&'static str),
    #[error(
        "the join token in {} differs from the one supplied; a cluster's token cannot be \
         changed by passing a new one",
        path.display()
    )]
    TokenMismatch { path: PathBuf },
    #[error("invalid certificate request: {0}")]
    InvalidRequest(String),
    #[error("building the TLS configuration: {what}: {reason}")]
    Tls { what: &'static str, reason: String },
}

/// The names the API server's serving certificate must cover.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerNames {
    ips: Vec<IpAddr>,
    dns_names: Vec<String>,
}

/// The cluster's CAs and the certificates Skiff issues at start.
pub struct Pki {
    tls_dir: PathBuf,
    server_ca: Ca,
    client_ca: Ca,
    serving: KeyedCert,
    admin: KeyedCert,
    token: Option<JoinToken>,
}

/// The secret a node presents to join, in k3s's `K10<sha256 of the server CA>::server:<secret>`
/// form; the hash lets a joining node pin the CA before it trusts anything it downloads.
/// Deliberately not `PartialEq`: compare presented tokens with [`JoinToken::verify`].
#[derive(Clone)]
pub struct JoinToken {
    ca_hash: String,
    secret: String,
}

struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    not_after: SystemTime,
    /// The raw subject and key identifier, to recognise certificates this CA issued.
    subject: Vec<u8>,
    key_id: Option<Vec<u8>>,
    issuer: Issuer<'static, KeyPair>,
}

struct KeyedCert {
    cert_pem: String,
    key_pem: String,
}

/// What a leaf certificate is for; decides its subject, SANs and extended key usage.
enum Leaf<'a> {
    Serving(&'a ServerNames),
    /// A node agent's kubelet API, `system:node:<node>` as upstream names it.
    NodeServing {
        node: &'a str,
        names: &'a ServerNames,
    },
    Client {
        user: &'a str,
        groups: &'a [&'a str],
    },
}

impl ServerNames {
    /// The names k3s puts on its serving certificate: loopback, the node's addresses and
    /// hostname, and the `kubernetes` Service's ClusterIP and in-cluster DNS names.
    pub fn new(
        node_ips: &[IpAddr],
        hostname: &str,
        first_service_ip: IpAddr,
        cluster_domain: &str,
    ) -> Self {
        let mut names = ServerNames::default();
        names.add_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
        names.add_ip(IpAddr::V6(Ipv6Addr::LOCALHOST));
        for ip in node_ips {
            names.add_ip(*ip);
        }
        names.add_ip(first_service_ip);
        names.add_dns_name("localhost");
        names.add_dns_name(hostname);
        names.add_dns_name("kubernetes");
        names.add_dns_name("kubernetes.default");
        names.add_dns_name("kubernetes.default.svc");
        let domain = cluster_domain.trim_matches('.');
        if !domain.is_empty() {
            names.add_dns_name(&format!("kubernetes.default.svc.{domain}"));
        }
        names
    }

    /// Adds an extra address (k3s's `--tls-san`); unspecified addresses are ignored.
    pub fn add_ip(&mut self, ip: IpAddr) {
        if !ip.is_unspecified() && !self.ips.contains(&ip) {
            self.ips.push(ip);
        }
    }

    /// Adds an extra DNS name; names compare case-insensitively, so they are stored lowercase.
    pub fn add_dns_name(&mut self, name: &str) {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if !name.is_empty() && !self.dns_names.contains(&name) {
            self.dns_names.push(name);
        }
    }

    pub fn ips(&self) -> &[IpAddr] {
        &self.ips
    }

    pub fn dns_names(&self) -> &[String] {
        &self.dns_names
    }
}

impl Pki {
    /// Loads the cluster's certificates from `tls_dir`, creating what is missing. The CAs are
    /// created only when both their files are absent; leaf certificates are re-issued from the
    /// same CA when they no longer fit (names, subject, issuer or near expiry).
    pub fn load_or_create(tls_dir: &Path, names: &ServerNames) -> Result<Pki, PkiError> {
        create_private_dir(tls_dir)?;
        let server_ca = Ca::load_or_create(tls_dir, "server-ca")?;
        let client_ca = Ca::load_or_create(tls_dir, "client-ca")?;
        let serving = load_or_issue(tls_dir, "serving", &server_ca, &Leaf::Serving(names))?;
        let admin_leaf = Leaf::Client {
            user: ADMIN_USER,
            groups: &[ADMIN_GROUP],
        };
        let admin = load_or_issue(tls_dir, "client-admin", &client_ca, &admin_leaf)?;
        Ok(Pki {
            tls_dir: tls_dir.to_path_buf(),
            server_ca,
            client_ca,
            serving,
            admin,
            token: None,
        })
    }

    /// Loads the join token from `path`, or creates it from `supplied` (`--token`, bare or in
    /// K10 form) or a random secret. A token that exists is never replaced: a different
    /// `supplied` one is an error, since joined nodes hold the old one.
    pub fn load_or_create_token(
        &mut self,
        path: &Path,
        supplied: Option<&str>,
    ) -> Result<&JoinToken, PkiError> {
        let token = JoinToken::load_or_create(path, &self.server_ca.cert_pem, supplied)?;
        Ok(self.token.insert(token))
    }

    pub fn token(&self) -> Option<&JoinToken> {
        self.token.as_ref()
    }

    /// Whether `presented` is this cluster's join token (full K10 form or bare secret).
    /// Always false before [`Pki::load_or_create_token`].
    pub fn verify_token(&self, presented: &str) -> bool {
        self.token.as_ref().is_some_and(|t| t.verify(presented))
    }

    /// Issues a client certificate signed by the client CA: `user` becomes the CN and each
    /// group an O, which is how Kubernetes reads identities from certificates.
    pub fn issue_client_cert(
        &self,
        user: &str,
        groups: &[&str],
    ) -> Result<(String, String), PkiError> {
        if user.is_empty() {
            return Err(PkiError::InvalidRequest(
                "a client certificate needs a user name".into(),
            ));
        }
        let issued = issue(&self.client_ca, &Leaf::Client { user, groups })?;
        Ok((issued.cert_pem, issued.key_pem))
    }

    /// Issues the serving certificate of node `node`'s kubelet API, signed by the server CA
    /// (which the API server trusts when it dials agents, as in k3s) and valid for `names`.
    pub fn issue_node_serving_cert(
        &self,
        node: &str,
        names: &ServerNames,
    ) -> Result<(String, String), PkiError> {
        if node.is_empty() {
            return Err(PkiError::InvalidRequest(
                "a node serving certificate needs the node's name".into(),
            ));
        }
        if names.ips.is_empty() && names.dns_names.is_empty() {
            return Err(PkiError::InvalidRequest(format!(
                "the serving certificate of node {node} needs at least one name"
            )));
        }
        let issued = issue(&self.server_ca, &Leaf::NodeServing { node, names })?;
        Ok((issued.cert_pem, issued.key_pem))
    }

    /// An admin kubeconfig (`system:admin` in `system:masters`) for `server_url`, with every
    /// credential inline so the file stands alone.
    pub fn kubeconfig(&self, server_url: &str) -> String {
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: default
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: default
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: default
  context:
    cluster: default
    user: default
current-context: default
preferences: {{}}
",
            server = yaml_quoted(server_url),
            ca = BASE64.encode(&self.server_ca.cert_pem),
            cert = BASE64.encode(&self.admin.cert_pem),
            key = BASE64.encode(&self.admin.key_pem),
        )
    }

    /// Writes [`Pki::kubeconfig`] to `path` (mode 0600, parent directories created).
    pub fn write_kubeconfig(&self, path: &Path, server_url: &str) -> Result<(), PkiError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(io_error("creating", parent))?;
        }
        write_atomic(path, self.kubeconfig(server_url).as_bytes(), 0o600)
    }

    pub fn tls_dir(&self) -> &Path {
        &self.tls_dir
    }

    /// The CA that clients use to verify the API server.
    pub fn server_ca_pem(&self) -> &str {
        &self.server_ca.cert_pem
    }

    /// The CA the API server uses to verify client certificates.
    pub fn client_ca_pem(&self) -> &str {
        &self.client_ca.cert_pem
    }

    pub(crate) fn serving_cert_pem(&self) -> &str {
        &self.serving.cert_pem
    }

    pub(crate) fn serving_key_pem(&self) -> &str {
        &self.serving.key_pem
    }

    pub(crate) fn client_ca_der(&self) -> &CertificateDer<'static> {
        &self.client_ca.cert_der
    }
}

impl fmt::Debug for Pki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pki")
            .field("tls_dir", &self.tls_dir)
            .finish_non_exhaustive()
    }
}

impl JoinToken {
    /// See [`Pki::load_or_create_token`].
    pub fn load_or_create(
        path: &Path,
        server_ca_pem: &str,
        supplied: Option<&str>,
    ) -> Result<JoinToken, PkiError> {
        let ca_hash = sha256_hex(server_ca_pem.as_bytes())?;
        let supplied = supplied
            .map(|s| secret_of(s.trim(), &ca_hash))
            .transpose()?;
        let stored_text = match fs::read_to_string(path) {
            Ok(text) => Some(text),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_error("reading", path)(e)),
        };
        let stored = stored_text
            .as_deref()
            .map(|text| parse_stored_token(path, text))
            .transpose()?;
        let secret = match (stored, supplied) {
            (Some(stored), Some(supplied)) if !ct_eq(stored.as_bytes(), supplied.as_bytes()) => {
                return Err(PkiError::TokenMismatch {
                    path: path.to_path_buf(),
                });
            }
            (Some(stored), _) => stored,
            (None, Some(supplied)) => supplied,
            (None, None) => random_hex(16)?,
        };
        let token = JoinToken { ca_hash, secret };
        // The stored hash is derived data: rewrite it whenever it does not match this CA.
        let canonical = format!("{token}\n");
        if stored_text.as_deref() != Some(canonical.as_str()) {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                create_private_dir(parent)?;
            }
            write_atomic(path, canonical.as_bytes(), 0o600)?;
        }
        Ok(token)
    }

    /// Accepts the full `K10<hash>::server:<secret>` form (whose hash must name this CA) or
    /// the bare secret, comparing in constant time.
    pub fn verify(&self, presented: &str) -> bool {
        match split_k10(presented) {
            Some((hash, user, secret)) => {
                let hash_ok = ct_eq(hash.as_bytes(), self.ca_hash.as_bytes());
                let secret_ok = ct_eq(secret.as_bytes(), self.secret.as_bytes());
                hash_ok & secret_ok & (user == TOKEN_USER)
            }
            None => ct_eq(presented.as_bytes(), self.secret.as_bytes()),
        }
    }

    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// SHA-256 (hex) of the server CA's PEM file, as the `K10` prefix carries it.
    pub fn ca_hash(&self) -> &str {
        &self.ca_hash
    }
}

/// The full `K10…::server:…` form, as written to the token file.
impl fmt::Display for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "K10{}::{TOKEN_USER}:{}", self.ca_hash, self.secret)
    }
}

/// Keeps the secret out of logs.
impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("ca_hash", &self.ca_hash)
            .field("secret", &"[redacted]")
            .finish()
    }
}

impl Ca {
    fn load_or_create(dir: &Path, stem: &str) -> Result<Ca, PkiError> {
        let (cert_path, key_path) = pair_paths(dir, stem);
        match (exists(&cert_path)?, exists(&key_path)?) {
            (true, true) => Ca::load(&cert_path, &key_path),
            (false, false) => Ca::create(&cert_path, &key_path, stem),
            (true, false) => Err(PkiError::IncompleteCa {
                present: cert_path,
                missing: key_path,
            }),
            (false, true) => Err(PkiError::IncompleteCa {
                present: key_path,
                missing: cert_path,
            }),
        }
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Ca, PkiError> {
        let cert_pem = read_text(cert_path)?;
        let key_pem = read_text(key_path)?;
        let cert_der = pem_to_der(cert_path, &cert_pem)?;
        let key = parse_key(key_path, &key_pem)?;
        let (not_after, subject, key_id) = {
            let cert = parse_cert(cert_path, &cert_der)?;
            if !cert.is_ca() {
                return Err(damaged(cert_path, "not a CA certificate"));
            }
            if cert.public_key().raw != key.subject_public_key_info().as_slice() {
                return Err(damaged(key_path, "key does not match the CA certificate"));
            }
            let key_id = cert
                .iter_extensions()
                .find_map(|ext| match ext.parsed_extension() {
                    ParsedExtension::SubjectKeyIdentifier(ski) => Some(ski.0.to_vec()),
                    _ => None,
                });
            (not_after(&cert), cert.subject().as_raw().to_vec(), key_id)
        };
        if not_after < SystemTime::now() + RENEW_BEFORE {
            tracing::warn!(
                path = %cert_path.display(),
                "CA certificate expires soon; certificates it signs are cut short to its expiry"
            );
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| {
            damaged(
                cert_path,
                &format!("cannot sign with this CA certificate: {e}"),
            )
        })?;
        Ok(Ca {
            cert_pem,
            cert_der,
            not_after,
            subject,
            key_id,
            issuer,
        })
    }

    fn create(cert_path: &Path, key_path: &Path, stem: &str) -> Result<Ca, PkiError> {
        let what = "CA certificate";
        let now = SystemTime::now();
        let created = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("skiff-{stem}@{created}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial()?);
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + CA_VALIDITY).into();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate_error(what))?;
        let cert = params.self_signed(&key).map_err(generate_error(what))?;
        write_atomic(key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_atomic(cert_path, cert.pem().as_bytes(), 0o644)?;
        tracing::info!(path = %cert_path.display(), "created a new CA");
        // Reload what was written so a new CA and an existing one take the same path.
        Ca::load(cert_path, key_path)
    }
}

/// Returns the leaf certificate stored under `stem` if it still fits `leaf`, otherwise issues
/// and stores a new one. Files that exist but cannot be parsed are an error, not replaced.
fn load_or_issue(dir: &Path, stem: &str, ca: &Ca, leaf: &Leaf) -> Result<KeyedCert, PkiError> {
    let (cert_path, key_path) = pair_paths(dir, stem);
    if exists(&cert_path)? && exists(&key_path)? {
        let stored = KeyedCert {
            cert_pem: read_text(&cert_path)?,
            key_pem: read_text(&key_path)?,
        };
        let der = pem_to_der(&cert_path, &stored.cert_pem)?;
        let cert = parse_cert(&cert_path, &der)?;
        let key = parse_key(&key_path, &stored.key_pem)?;
        match misfit(&cert, &key, ca, leaf) {
            None => return Ok(stored),
            Some(reason) => {
                tracing::info!(path = %cert_path.display(), reason, "re-issuing certificate")
            }
        }
    }
    let issued = issue(ca, leaf)?;
    write_atomic(&key_path, issued.key_pem.as_bytes(), 0o600)?;
    write_atomic(&cert_path, issued.cert_pem.as_bytes(), 0o644)?;
    Ok(issued)
}

/// Why a stored leaf certificate must be re-issued, or `None` when it still fits.
fn misfit(cert: &X509Certificate, key: &KeyPair, ca: &Ca, leaf: &Leaf) -> Option<&'static str> {
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return Some("key does not match certificate");
    }
    if !issued_by(cert, ca) {
        return Some("not issued by the current CA");
    }
    if not_after(cert) < SystemTime::now() + RENEW_BEFORE {
        return Some("expires soon");
    }
    match leaf {
        Leaf::Serving(names) if !covers(cert, names) => Some("names changed"),
        Leaf::Client { user, groups } if !has_subject(cert, user, groups) => {
            Some("subject changed")
        }
        _ => None,
    }
}

fn issue(ca: &Ca, leaf: &Leaf) -> Result<KeyedCert, PkiError> {
    let what = match leaf {
        Leaf::Serving(_) | Leaf::NodeServing { .. } => "serving certificate",
        Leaf::Client { .. } => "client certificate",
    };
    let now = SystemTime::now();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    match leaf {
        Leaf::Serving(names) | Leaf::NodeServing { names, .. } => {
            let common_name = match leaf {
                Leaf::NodeServing { node, .. } => format!("system:node:{node}"),
                _ => "kube-apiserver".to_owned(),
            };
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            params.subject_alt_names = names.ips.iter().map(|ip| SanType::IpAddress(*ip)).collect();
            for name in &names.dns_names {
                let name = name.clone().try_into().map_err(generate_error(what))?;
                params.subject_alt_names.push(SanType::DnsName(name));
            }
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        }
        Leaf::Client { user, .. } => {
            // The full subject, with every group, replaces this one below.
            params.distinguished_name.push(DnType::CommonName, *user);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + LEAF_VALIDITY).min(ca.not_after).into();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generate_error(what))?;
    let cert = params
        .signed_by(&key, &ca.issuer)
        .map_err(generate_error(what))?;
    let cert_pem = match leaf {
        Leaf::Serving(_) | Leaf::NodeServing { .. } => cert.pem(),
        Leaf::Client { user, groups } => {
            let subject = client_subject(user, groups);
            let der = replace_subject(cert.der(), &subject, ca.issuer.key())
                .map_err(generate_error(what))?;
            pem_encode("CERTIFICATE", &der)
        }
    };
    Ok(KeyedCert {
        cert_pem,
        key_pem: key.serialize_pem(),
    })
}

/// `O=<group>, …, CN=<user>` in DER, in the order Go's crypto/x509 writes it. rcgen keeps one
/// value per attribute type, but Kubernetes reads every O as a group, hence this by hand.
fn client_subject(user: &str, groups: &[&str]) -> Vec<u8> {
    const COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
    const ORGANIZATION: &[u8] = &[0x55, 0x04, 0x0a];
    let attribute = |oid: &[u8], value: &str| {
        let mut pair = der(DER_OID, oid);
        pair.extend(der(DER_UTF8_STRING, value.as_bytes()));
        der(DER_SET, &der(DER_SEQUENCE, &pair))
    };
    let mut rdns: Vec<u8> = groups
        .iter()
        .flat_map(|group| attribute(ORGANIZATION, group))
        .collect();
    rdns.extend(attribute(COMMON_NAME, user));
    der(DER_SEQUENCE, &rdns)
}

/// Swaps the subject of `cert` (as rcgen writes it) for `subject` and signs the result again
/// with the CA key and algorithm that signed `cert`.
fn replace_subject(cert: &[u8], subject: &[u8], ca_key: &KeyPair) -> Result<Vec<u8>, rcgen::Error> {
    let malformed = rcgen::Error::CouldNotParseCertificate;
    let (cert_header, _) = tlv(cert, 0).ok_or(malformed.clone())?;
    let tbs_start = cert_header;
    let (tbs_header, tbs_len) = tlv(cert, tbs_start).ok_or(malformed.clone())?;
    let tbs_end = tbs_start + tbs_len;
    // TBSCertificate: version, serialNumber, signature, issuer, validity, subject, …
    let mut subject_start = tbs_start + tbs_header;
    for _ in 0..5 {
        subject_start += tlv(cert, subject_start).ok_or(malformed.clone())?.1;
    }
    let (_, old_subject_len) = tlv(cert, subject_start).ok_or(malformed.clone())?;
    let (_, algorithm_len) = tlv(cert, tbs_end).ok_or(malformed.clone())?;
    let before = cert.get(tbs_start + tbs_header..subject_start);
    let after = cert.get(subject_start + old_subject_len..tbs_end);
    let algorithm = cert.get(tbs_end..tbs_end + algorithm_len);
    let (Some(before), Some(after), Some(algorithm)) = (before, after, algorithm) else {
        return Err(malformed);
    };

    let tbs = der(DER_SEQUENCE, &[before, subject, after].concat());
    let mut signature = vec![0]; // no unused bits
    signature.extend(ca_key.sign(&tbs)?);
    let content = [tbs.as_slice(), algorithm, &der(DER_BIT_STRING, &signature)].concat();
    Ok(der(DER_SEQUENCE, &content))
}

/// Matches the issuer name and, when both carry one, the key identifier — enough to tell our
/// CA from a replaced one without a signature check.
fn issued_by(cert: &X509Certificate, ca: &Ca) -> bool {
    if cert.issuer().as_raw() != ca.subject.as_slice() {
        return false;
    }
    let authority_key_id = cert
        .iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| k.0)
            }
            _ => None,
        });
    match (authority_key_id, &ca.key_id) {
        (Some(a), Some(b)) => a == b.as_slice(),
        _ => true,
    }
}

fn covers(cert: &X509Certificate, names: &ServerNames) -> bool {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return names.ips.is_empty() && names.dns_names.is_empty();
    };
    let general_names = &san.value.general_names;
    let has_ip = |ip: &IpAddr| {
        general_names.iter().any(|n| match n {
            GeneralName::IPAddress(bytes) => ip_from_bytes(bytes).as_ref() == Some(ip),
            _ => false,
        })
    };
    let has_dns = |name: &String| {
        general_names.iter().any(|n| match n {
            GeneralName::DNSName(dns) => dns.eq_ignore_ascii_case(name),
            _ => false,
        })
    };
    names.ips.iter().all(has_ip) && names.dns_names.iter().all(has_dns)
}

fn has_subject(cert: &X509Certificate, user: &str, groups: &[&str]) -> bool {
    let subject = cert.subject();
    let cn: Vec<&str> = subject
        .iter_common_name()
        .filter_map(|a| a.as_str().ok())
        .collect();
    let mut orgs: Vec<&str> = subject
        .iter_organization()
        .filter_map(|a| a.as_str().ok())
        .collect();
    let mut wanted = groups.to_vec();
    orgs.sort_unstable();
    wanted.sort_unstable();
    cn == [user] && orgs == wanted
}

const DER_BIT_STRING: u8 = 0x03;
const DER_OID: u8 = 0x06;
const DER_UTF8_STRING: u8 = 0x0c;
const DER_SEQUENCE: u8 = 0x30;
const DER_SET: u8 = 0x31;

/// A DER tag-length-value.
fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let len = content.len();
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(tag);
    match u8::try_from(len) {
        Ok(short) if short < 0x80 => out.push(short),
        _ => {
            let bytes = len.to_be_bytes();
            let skip = bytes.iter().take_while(|b| **b == 0).count();
            // At most 8 length bytes, so this cannot overflow the 7-bit count.
            out.push(0x80 | (bytes.len() - skip) as u8);
            out.extend_from_slice(&bytes[skip..]);
        }
    }
    out.extend_from_slice(content);
    out
}

/// The header length and total length of the DER element starting at `pos`.
fn tlv(buf: &[u8], pos: usize) -> Option<(usize, usize)> {
    let first = *buf.get(pos + 1)?;
    if first < 0x80 {
        return Some((2, 2 + usize::from(first)));
    }
    let count = usize::from(first & 0x7f);
    if count == 0 || count > 4 {
        return None;
    }
    let len = buf
        .get(pos + 2..pos + 2 + count)?
        .iter()
        .fold(0usize, |len, b| (len << 8) | usize::from(*b));
    Some((2 + count, 2 + count + len))
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    let body = BASE64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

fn not_after(cert: &X509Certificate) -> SystemTime {
    let secs = cert.validity().not_after.timestamp();
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// The secret inside a supplied token; a K10 token must name this cluster's CA.
fn secret_of(token: &str, ca_hash: &str) -> Result<String, PkiError> {
    let secret = match split_k10(token) {
        Some((hash, user, secret)) => {
            if hash != ca_hash {
                return Err(PkiError::InvalidToken(
                    "its CA hash does not match this server's CA",
                ));
            }
            if user != TOKEN_USER {
                return Err(PkiError::InvalidToken("it is not a server token"));
            }
            secret
        }
        None => token,
    };
    if secret.is_empty() || secret.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(PkiError::InvalidToken(
            "the secret must be non-empty, without whitespace",
        ));
    }
    Ok(secret.to_string())
}

fn parse_stored_token(path: &Path, text: &str) -> Result<String, PkiError> {
    let text = text.trim();
    let secret = split_k10(text).map_or(text, |(_, _, secret)| secret);
    if secret.is_empty() || secret.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(damaged(path, "not a join token"));
    }
    Ok(secret.to_string())
}

/// Splits `K10<hash>::<user>:<secret>` into its parts; `None` for anything else.
fn split_k10(token: &str) -> Option<(&str, &str, &str)> {
    let (hash, credentials) = token.strip_prefix("K10")?.split_once("::")?;
    let (user, secret) = credentials.split_once(':')?;
    Some((hash, user, secret))
}

/// Compares without an early exit, so response time does not reveal how much of a guessed
/// secret was right. Lengths are not secret.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| std::hint::black_box(acc | (x ^ y)));
    diff == 0
}

/// ring is reachable here only through rustls, whose TLS 1.3 AES-128 suite hashes with SHA-256.
fn sha256_hex(data: &[u8]) -> Result<String, PkiError> {
    let suite = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .ok_or(PkiError::Tls {
            what: "SHA-256",
            reason: "the TLS 1.3 suite is unavailable".into(),
        })?;
    Ok(hex(suite.common.hash_provider.hash(data).as_ref()))
}

fn random_hex(len: usize) -> Result<String, PkiError> {
    let mut bytes = vec![0u8; len];
    getrandom::fill(&mut bytes).map_err(PkiError::Random)?;
    Ok(hex(&bytes))
}

/// Random serials keep re-issued certificates distinct; the top bits keep the DER integer
/// positive and at full length.
fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).map_err(PkiError::Random)?;
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// A YAML double-quoted scalar, so any URL (IPv6 brackets, `#`, `: `) survives parsing.
fn yaml_quoted(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn pair_paths(dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{stem}.crt")),
        dir.join(format!("{stem}.key")),
    )
}

fn pem_to_der(path: &Path, pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| damaged(path, &format!("no PEM certificate: {e}")))
}

fn parse_cert<'a>(path: &Path, der: &'a CertificateDer) -> Result<X509Certificate<'a>, PkiError> {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert)
        .map_err(|e| damaged(path, &format!("invalid certificate: {e}")))
}

fn parse_key(path: &Path, pem: &str) -> Result<KeyPair, PkiError> {
    KeyPair::from_pem(pem).map_err(|e| damaged(path, &format!("invalid PKCS#8 private key: {e}")))
}

fn read_text(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(io_error("reading", path))
}

fn exists(path: &Path) -> Result<bool, PkiError> {
    path.try_exists().map_err(io_error("checking", path))
}

fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error("creating", dir))
}

/// Writes through a temporary file and a rename, so a crash never leaves a half-written key
/// or certificate behind. The temporary file is created fresh so it never inherits wider
/// permissions from a leftover.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    if let Err(e) = fs::remove_file(&tmp)
        && e.kind() != io::ErrorKind::NotFound
    {
        return Err(io_error("removing", &tmp)(e));
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_error("creating", &tmp))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(io_error("writing", &tmp))?;
    fs::rename(&tmp, path).map_err(io_error("renaming into", path))?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::File::open(parent)
            .and_then(|dir| dir.sync_all())
            .map_err(io_error("syncing", parent))?;
    }
    Ok(())
}

fn io_error(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> PkiError {
    let path = path.to_path_buf();
    move |source| PkiError::Io { op, path, source }
}

fn generate_error(what: &'static str) -> impl FnOnce(rcgen::Error) -> PkiError {
    move |source| PkiError::Generate { what, source }
}

fn damaged(path: &Path, reason: &str) -> PkiError {
    PkiError::Damaged {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn names() -> ServerNames {
        ServerNames::new(
            &["192.0.2.10".parse().unwrap()],
            "Node-1",
            "10.43.0.1".parse().unwrap(),
            "cluster.local",
        )
    }

    fn read(dir: &Path, file: &str) -> String {
        fs::read_to_string(dir.join(file)).unwrap()
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn with_cert<T>(pem: &str, f: impl FnOnce(&X509Certificate) -> T) -> T {
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        f(&cert)
    }

    #[test]
    fn server_names_follow_k3s() {
        let names = names();
        let ips: Vec<String> = names.ips().iter().map(ToString::to_string).collect();
        assert_eq!(ips, ["127.0.0.1", "::1", "192.0.2.10", "10.43.0.1"]);
        assert_eq!(
            names.dns_names(),
            [
                "localhost",
                "node-1",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ]
        );
    }

    #[test]
    fn node_serving_certificates_come_from_the_server_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(&tmp.path().join("tls"), &names()).unwrap();
        let mut node_names = ServerNames::default();
        node_names.add_ip("192.0.2.20".parse().unwrap());
        node_names.add_dns_name("worker-1");
        let (cert_pem, key_pem) = pki
            .issue_node_serving_cert("worker-1", &node_names)
            .unwrap();
        with_cert(&cert_pem, |cert| {
            assert!(covers(cert, &node_names));
            assert!(issued_by(cert, &pki.server_ca));
            let cn = cert.subject().iter_common_name().next().unwrap();
            assert_eq!(cn.as_str().unwrap(), "system:node:worker-1");
        });
        KeyPair::from_pem(&key_pem).unwrap();
        let none = ServerNames::default();
        assert!(pki.issue_node_serving_cert("worker-1", &none).is_err());
        assert!(pki.issue_node_serving_cert("", &node_names).is_err());
    }

    #[test]
    fn first_start_creates_and_restart_reloads() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("server/tls");
        let token_path = tmp.path().join("server/token");
        let mut pki = Pki::load_or_create(&dir, &names()).unwrap();
        let token = pki.load_or_create_token(&token_path, None).unwrap().clone();

        for key in [
            "server-ca.key",
            "client-ca.key",
            "serving.key",
            "client-admin.key",
        ] {
            assert_eq!(mode(&dir.join(key)), 0o600, "{key}");
        }
        assert_eq!(mode(&token_path), 0o600);
        assert_eq!(mode(&dir), 0o700);
        with_cert(pki.server_ca_pem(), |ca| assert!(ca.is_ca()));
        with_cert(pki.serving_cert_pem(), |cert| {
            assert!(covers(cert, &names()));
            assert_eq!(cert.issuer().as_raw(), pki.server_ca.subject.as_slice());
        });
        with_cert(&pki.admin.cert_pem, |cert| {
            assert!(has_subject(cert, ADMIN_USER, &[ADMIN_GROUP]));
            assert!(issued_by(cert, &pki.client_ca));
            assert!(!issued_by(cert, &pki.server_ca));
        });

        let text = fs::read_to_string(&token_path).unwrap();
        let hash = sha256_hex(read(&dir, "server-ca.crt").as_bytes()).unwrap();
        let secret = token.secret();
        assert_eq!(text, format!("K10{hash}::server:{secret}\n"));
        assert_eq!(secret.len(), 32);
        assert!(secret.bytes().all(|b| b.is_ascii_hexdigit()));

        let mut again = Pki::load_or_create(&dir, &names()).unwrap();
        let token_again = again.load_or_create_token(&token_path, None).unwrap();
        assert_eq!(token_again.to_string(), token.to_string());
        assert_eq!(again.server_ca_pem(), pki.server_ca_pem());
        assert_eq!(again.client_ca_pem(), pki.client_ca_pem());
        assert_eq!(again.serving.cert_pem, pki.serving.cert_pem);
        assert_eq!(again.admin.cert_pem, pki.admin.cert_pem);
        assert_eq!(again.admin.key_pem, pki.admin.key_pem);
    }

    #[test]
    fn new_names_reissue_the_serving_cert_from_the_same_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let first = Pki::load_or_create(tmp.path(), &names()).unwrap();

        let mut more = names();
        more.add_ip("198.51.100.7".parse().unwrap());
        more.add_dns_name("api.example.com");
        let second = Pki::load_or_create(tmp.path(), &more).unwrap();
        assert_eq!(second.server_ca_pem(), first.server_ca_pem());
        assert_ne!(second.serving.cert_pem, first.serving.cert_pem);
        assert_ne!(second.serving.key_pem, first.serving.key_pem);
        assert_eq!(second.admin.cert_pem, first.admin.cert_pem);
        with_cert(second.serving_cert_pem(), |cert| {
            assert!(covers(cert, &more));
            assert!(issued_by(cert, &second.server_ca));
        });
        assert_eq!(read(tmp.path(), "serving.crt"), second.serving.cert_pem);

        // A subset of the names is still covered: nothing changes.
        let third = Pki::load_or_create(tmp.path(), &names()).unwrap();
        assert_eq!(third.serving.cert_pem, second.serving.cert_pem);
    }

    #[test]
    fn leaf_from_another_ca_or_near_expiry_is_reissued() {
        let tmp = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(tmp.path(), &names()).unwrap();
        Pki::load_or_create(other.path(), &names()).unwrap();
        for file in ["serving.crt", "serving.key"] {
            fs::copy(other.path().join(file), tmp.path().join(file)).unwrap();
        }
        let reloaded = Pki::load_or_create(tmp.path(), &names()).unwrap();
        assert_eq!(reloaded.server_ca_pem(), pki.server_ca_pem());
        with_cert(reloaded.serving_cert_pem(), |cert| {
            assert!(issued_by(cert, &reloaded.server_ca));
        });

        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, ADMIN_USER);
        params
            .distinguished_name
            .push(DnType::OrganizationName, ADMIN_GROUP);
        params.use_authority_key_identifier_extension = true;
        params.not_after = (SystemTime::now() + Duration::from_secs(86400)).into();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.signed_by(&key, &reloaded.client_ca.issuer).unwrap();
        fs::write(tmp.path().join("client-admin.crt"), cert.pem()).unwrap();
        fs::write(tmp.path().join("client-admin.key"), key.serialize_pem()).unwrap();
        let renewed = Pki::load_or_create(tmp.path(), &names()).unwrap();
        assert_ne!(renewed.admin.cert_pem, cert.pem());
        with_cert(&renewed.admin.cert_pem, |cert| {
            assert!(not_after(cert) > SystemTime::now() + RENEW_BEFORE);
        });
    }

    #[test]
    fn damaged_files_are_errors_and_never_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        Pki::load_or_create(tmp.path(), &names()).unwrap();
        let ca = tmp.path().join("server-ca.crt");
        fs::write(&ca, "garbage").unwrap();
        let err = Pki::load_or_create(tmp.path(), &names()).unwrap_err();
        assert!(
            matches!(&err, PkiError::Damaged { path, .. } if *path == ca),
            "{err}"
        );
        assert!(err.to_string().contains("server-ca.crt"), "{err}");
        assert_eq!(fs::read_to_string(&ca).unwrap(), "garbage");

        let tmp = tempfile::tempdir().unwrap();
        Pki::load_or_create(tmp.path(), &names()).unwrap();
        fs::remove_file(tmp.path().join("client-ca.key")).unwrap();
        let err = Pki::load_or_create(tmp.path(), &names()).unwrap_err();
        assert!(matches!(err, PkiError::IncompleteCa { .. }), "{err}");
        assert!(!tmp.path().join("client-ca.key").exists());

        let tmp = tempfile::tempdir().unwrap();
        Pki::load_or_create(tmp.path(), &names()).unwrap();
        let other = tempfile::tempdir().unwrap();
        Pki::load_or_create(other.path(), &names()).unwrap();
        fs::copy(
            other.path().join("server-ca.key"),
            tmp.path().join("server-ca.key"),
        )
        .unwrap();
        let err = Pki::load_or_create(tmp.path(), &names()).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");

        let tmp = tempfile::tempdir().unwrap();
        Pki::load_or_create(tmp.path(), &names()).unwrap();
        fs::write(
            tmp.path().join("serving.key"),
            "-----BEGIN PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = Pki::load_or_create(tmp.path(), &names()).unwrap_err();
        assert!(err.to_string().contains("serving.key"), "{err}");
    }

    #[test]
    fn supplied_tokens() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("token");
        let mut pki = Pki::load_or_create(&tmp.path().join("tls"), &names()).unwrap();
        assert!(!pki.verify_token("anything"));

        let token = pki
            .load_or_create_token(&path, Some("my-secret"))
            .unwrap()
            .clone();
        assert_eq!(token.secret(), "my-secret");
        let full = token.to_string();
        assert!(full.starts_with("K10") && full.ends_with("::server:my-secret"));
        assert!(pki.verify_token("my-secret"));
        assert!(pki.verify_token(&full));
        assert!(!pki.verify_token("my-secreT"));
        assert!(!pki.verify_token(""));
        assert!(!pki.verify_token(&full.replace("::server:", "::node:")));
        let wrong_hash = format!("K10{}::server:my-secret", "0".repeat(64));
        assert!(!pki.verify_token(&wrong_hash));
        assert!(!format!("{token:?}").contains("my-secret"));

        // The same token again, bare or in full, is fine; a different one is refused.
        pki.load_or_create_token(&path, Some("my-secret")).unwrap();
        pki.load_or_create_token(&path, Some(&full)).unwrap();
        let err = pki.load_or_create_token(&path, Some("other")).unwrap_err();
        assert!(matches!(err, PkiError::TokenMismatch { .. }), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), format!("{full}\n"));

        // A K10 token for another cluster's CA is refused before anything is written.
        let fresh = tmp.path().join("fresh-token");
        let err = pki
            .load_or_create_token(&fresh, Some(&wrong_hash))
            .unwrap_err();
        assert!(matches!(err, PkiError::InvalidToken(_)), "{err}");
        assert!(!fresh.exists());
        assert!(pki.load_or_create_token(&fresh, Some("has space")).is_err());

        // A hand-written bare token is kept and completed to the full form.
        fs::write(&fresh, "handmade\n").unwrap();
        let token = pki.load_or_create_token(&fresh, None).unwrap().clone();
        assert_eq!(token.secret(), "handmade");
        assert_eq!(fs::read_to_string(&fresh).unwrap(), format!("{token}\n"));
    }

    #[test]
    fn client_certs_carry_user_and_groups() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(tmp.path(), &names()).unwrap();
        let (cert_pem, key_pem) = pki
            .issue_client_cert("system:node:n1", &["system:nodes", "extra"])
            .unwrap();
        with_cert(&cert_pem, |cert| {
            assert!(has_subject(
                cert,
                "system:node:n1",
                &["extra", "system:nodes"]
            ));
            assert!(issued_by(cert, &pki.client_ca));
            let key = KeyPair::from_pem(&key_pem).unwrap();
            assert!(
                misfit(
                    cert,
                    &key,
                    &pki.client_ca,
                    &Leaf::Client {
                        user: "system:node:n1",
                        groups: &["system:nodes", "extra"],
                    }
                )
                .is_none()
            );
        });
        assert!(pki.issue_client_cert("", &[]).is_err());
    }

    #[test]
    fn kubectl_reads_the_kubeconfig() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::load_or_create(&tmp.path().join("tls"), &names()).unwrap();
        let path = tmp.path().join("etc/skiff/kubeconfig.yaml");
        let server = "https://[::1]:6443";
        pki.write_kubeconfig(&path, server).unwrap();
        assert_eq!(mode(&path), 0o600);

        let output = std::process::Command::new("kubectl")
            .args(["config", "view", "--raw", "-o", "json", "--kubeconfig"])
            .arg(&path)
            .output()
            .expect("kubectl is installed");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let config: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        let b64 = |s: &str| BASE64.encode(s);
        assert_eq!(config["current-context"], "default");
        assert_eq!(config["contexts"][0]["context"]["cluster"], "default");
        assert_eq!(config["contexts"][0]["context"]["user"], "default");
        let cluster = &config["clusters"][0];
        assert_eq!(cluster["name"], "default");
        assert_eq!(cluster["cluster"]["server"], server);
        assert_eq!(
            cluster["cluster"]["certificate-authority-data"],
            b64(pki.server_ca_pem())
        );
        let user = &config["users"][0];
        assert_eq!(user["name"], "default");
        assert_eq!(
            user["user"]["client-certificate-data"],
            b64(&pki.admin.cert_pem)
        );
        assert_eq!(user["user"]["client-key-data"], b64(&pki.admin.key_pem));
    }

    #[test]
    fn pki_can_be_shared_across_tasks() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Pki>();
    }
}
