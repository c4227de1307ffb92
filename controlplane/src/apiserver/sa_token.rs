//! Service-account tokens: JWTs signed with the cluster's ES256 key, as
//! upstream's `--service-account-signing-key-file` makes them. The key is
//! made on first start and kept under `DATA_DIR/server/tls/`, so tokens
//! stay valid across restarts.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::rand::SystemRandom;
use ring::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
    UnparsedPublicKey,
};
use serde::{Deserialize, Serialize};

/// The issuer (and default audience) upstream uses for a cluster whose
/// domain is `cluster.local`.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: not a PEM-encoded PKCS#8 P-256 private key")]
    BadKey(String),
    #[error("cannot sign the token")]
    Sign,
    #[error("malformed token")]
    Malformed,
    #[error("unsupported token algorithm {0:?}")]
    Algorithm(String),
    #[error("invalid token signature")]
    Signature,
    #[error("token issued by {0:?}, not this cluster")]
    Issuer(String),
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token audiences {0:?} are not accepted")]
    Audience(Vec<String>),
}

/// The claims of a service-account token, in upstream's layout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: Vec<String>,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: KubernetesClaims,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KubernetesClaims {
    pub namespace: String,
    pub serviceaccount: ObjectClaim,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<ObjectClaim>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<ObjectClaim>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ObjectClaim {
    pub name: String,
    pub uid: String,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: String,
}

/// The signing key pair and the key id published in token headers.
pub struct TokenKeys {
    pair: EcdsaKeyPair,
    key_id: String,
    verified: VerifiedTokens,
}

/// Tokens whose signature has been checked, by SHA-256 of the token. An
/// in-cluster client sends the same token with every request, and an ECDSA
/// verification costs more than the rest of a typical request; the claims
/// a signature vouches for never change, so only the time and audience
/// checks (and the caller's binding checks) are repeated.
struct VerifiedTokens {
    claims: Mutex<HashMap<[u8; 32], Claims>>,
}

/// Bounds the cache: a flood of distinct valid tokens cannot grow it.
const VERIFIED_CAPACITY: usize = 4096;

const PEM_LABEL: &str = "PRIVATE KEY";

impl TokenKeys {
    /// Reads the key at `path`, or makes one there (mode 0600).
    pub fn load_or_create(path: &Path) -> Result<TokenKeys, TokenError> {
        let io = |source| TokenError::Io {
            path: path.display().to_string(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(pem) => {
                let der = pem_decode(&pem)
                    .ok_or_else(|| TokenError::BadKey(path.display().to_string()))?;
                TokenKeys::from_pkcs8(&der)
                    .map_err(|_| TokenError::BadKey(path.display().to_string()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let der = TokenKeys::generate_pkcs8()?;
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(io)?;
                }
                write_private(path, &pem_encode(&der)).map_err(io)?;
                TokenKeys::from_pkcs8(&der)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// A fresh key pair that lives only in memory (tests).
    pub fn generate() -> Result<TokenKeys, TokenError> {
        TokenKeys::from_pkcs8(&TokenKeys::generate_pkcs8()?)
    }

    fn generate_pkcs8() -> Result<Vec<u8>, TokenError> {
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
            .map(|doc| doc.as_ref().to_vec())
            .map_err(|_| TokenError::Sign)
    }

    fn from_pkcs8(der: &[u8]) -> Result<TokenKeys, TokenError> {
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &SystemRandom::new())
                .map_err(|_| TokenError::BadKey("key".into()))?;
        let digest = ring::digest::digest(&ring::digest::SHA256, pair.public_key().as_ref());
        let key_id = URL_SAFE_NO_PAD.encode(digest.as_ref());
        Ok(TokenKeys {
            pair,
            key_id,
            verified: VerifiedTokens {
                claims: Mutex::new(HashMap::new()),
            },
        })
    }

    /// `header.payload.signature`, each part base64url without padding.
    pub fn sign(&self, claims: &Claims) -> Result<String, TokenError> {
        let header = Header {
            alg: "ES256".into(),
            kid: self.key_id.clone(),
        };
        let header = serde_json::to_vec(&header).map_err(|_| TokenError::Sign)?;
        let payload = serde_json::to_vec(claims).map_err(|_| TokenError::Sign)?;
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let signature = self
            .pair
            .sign(&SystemRandom::new(), signed.as_bytes())
            .map_err(|_| TokenError::Sign)?;
        Ok(format!(
            "{signed}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        ))
    }

    /// The claims of `token` if this key signed it, it is current at
    /// `now` (Unix seconds) and names one of `audiences`.
    pub fn verify(&self, token: &str, now: i64, audiences: &[&str]) -> Result<Claims, TokenError> {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(digest.as_ref());
        let claims = match self.verified.get(&key) {
            Some(claims) => claims,
            None => {
                let claims = self.check_signature(token)?;
                self.verified.insert(key, &claims, now);
                claims
            }
        };
        if claims.iss != ISSUER {
            return Err(TokenError::Issuer(claims.iss));
        }
        // A little leeway for clocks, as upstream allows.
        const LEEWAY: i64 = 60;
        if claims.exp <= now {
            return Err(TokenError::Expired);
        }
        if claims.nbf > now + LEEWAY {
            return Err(TokenError::NotYetValid);
        }
        if !claims.aud.iter().any(|a| audiences.contains(&a.as_str())) {
            return Err(TokenError::Audience(claims.aud));
        }
        Ok(claims)
    }

    /// The claims of `token` if this key signed it.
    fn check_signature(&self, token: &str) -> Result<Claims, TokenError> {
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let decode = |part: &str| {
            URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|_| TokenError::Malformed)
        };
        let parsed: Header =
            serde_json::from_slice(&decode(header)?).map_err(|_| TokenError::Malformed)?;
        if parsed.alg != "ES256" {
            return Err(TokenError::Algorithm(parsed.alg));
        }
        let signed_len = header.len() + 1 + payload.len();
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, self.pair.public_key().as_ref())
            .verify(&token.as_bytes()[..signed_len], &decode(signature)?)
            .map_err(|_| TokenError::Signature)?;
        serde_json::from_slice(&decode(payload)?).map_err(|_| TokenError::Malformed)
    }
}

impl VerifiedTokens {
    fn get(&self, key: &[u8; 32]) -> Option<Claims> {
        let claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        claims.get(key).cloned()
    }

    /// Remembers `token`'s claims; when full, forgets the expired ones, or
    /// everything if none has expired.
    fn insert(&self, key: [u8; 32], token: &Claims, now: i64) {
        let mut claims = self.claims.lock().unwrap_or_else(|e| e.into_inner());
        if claims.len() >= VERIFIED_CAPACITY {
            claims.retain(|_, c| c.exp > now);
            if claims.len() >= VERIFIED_CAPACITY {
                claims.clear();
            }
        }
        claims.insert(key, token.clone());
    }
}

/// The user name upstream gives a service account.
pub fn user_name(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}

fn pem_encode(der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {PEM_LABEL}-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {PEM_LABEL}-----\n"));
    out
}

fn pem_decode(pem: &str) -> Option<Vec<u8>> {
    let begin = format!("-----BEGIN {PEM_LABEL}-----");
    let end = format!("-----END {PEM_LABEL}-----");
    let start = pem.find(&begin)? + begin.len();
    let stop = start + pem[start..].find(&end)?;
    let body: String = pem[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    STANDARD.decode(body).ok()
}

fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(content.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(now: i64, lifetime: i64) -> Claims {
        Claims {
            iss: ISSUER.into(),
            sub: user_name("ns", "bot"),
            aud: vec![ISSUER.into()],
            exp: now + lifetime,
            iat: now,
            nbf: now,
            jti: Some("id".into()),
            kubernetes: KubernetesClaims {
                namespace: "ns".into(),
                serviceaccount: ObjectClaim {
                    name: "bot".into(),
                    uid: "u1".into(),
                },
                pod: Some(ObjectClaim {
                    name: "p".into(),
                    uid: "u2".into(),
                }),
                secret: None,
            },
        }
    }

    #[test]
    fn signed_tokens_verify_with_their_claims() {
        let keys = TokenKeys::generate().unwrap();
        let token = keys.sign(&claims(1000, 3600)).unwrap();
        assert_eq!(token.split('.').count(), 3);
        let verified = keys.verify(&token, 1001, &[ISSUER]).unwrap();
        assert_eq!(verified, claims(1000, 3600));
    }

    #[test]
    fn tampered_tokens_are_refused() {
        let keys = TokenKeys::generate().unwrap();
        let token = keys.sign(&claims(1000, 3600)).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let mut other = claims(1000, 3600);
        other.sub = user_name("kube-system", "admin");
        let forged_payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&other).unwrap());
        let forged = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert!(matches!(
            keys.verify(&forged, 1001, &[ISSUER]),
            Err(TokenError::Signature)
        ));
        let none_alg = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            parts[1]
        );
        assert!(matches!(
            keys.verify(&none_alg, 1001, &[ISSUER]),
            Err(TokenError::Algorithm(_))
        ));
        for junk in ["", "a.b", "a.b.c.d", "!!.??.##"] {
            assert!(keys.verify(junk, 1001, &[ISSUER]).is_err(), "{junk}");
        }
    }

    #[test]
    fn expired_or_early_tokens_are_refused() {
        let keys = TokenKeys::generate().unwrap();
        let token = keys.sign(&claims(1000, 3600)).unwrap();
        // Once while valid, so that the later checks meet the cached claims.
        assert!(keys.verify(&token, 1001, &[ISSUER]).is_ok());
        assert!(matches!(
            keys.verify(&token, 4600, &[ISSUER]),
            Err(TokenError::Expired)
        ));
        assert!(matches!(
            keys.verify(&token, 500, &[ISSUER]),
            Err(TokenError::NotYetValid)
        ));
    }

    #[test]
    fn another_keys_tokens_and_other_audiences_are_refused() {
        let keys = TokenKeys::generate().unwrap();
        let stranger = TokenKeys::generate().unwrap();
        let token = stranger.sign(&claims(1000, 3600)).unwrap();
        assert!(matches!(
            keys.verify(&token, 1001, &[ISSUER]),
            Err(TokenError::Signature)
        ));
        let mut vault = claims(1000, 3600);
        vault.aud = vec!["vault".into()];
        let token = keys.sign(&vault).unwrap();
        assert!(matches!(
            keys.verify(&token, 1001, &[ISSUER]),
            Err(TokenError::Audience(_))
        ));
        assert!(keys.verify(&token, 1001, &["vault"]).is_ok());
    }

    #[test]
    fn the_verified_token_cache_stays_bounded() {
        let keys = TokenKeys::generate().unwrap();
        for i in 0..=VERIFIED_CAPACITY as i64 {
            let token = keys.sign(&claims(1000 + i, 3600)).unwrap();
            assert!(keys.verify(&token, 1001 + i, &[ISSUER]).is_ok());
        }
        let cached = keys.verified.claims.lock().unwrap().len();
        assert!(cached <= VERIFIED_CAPACITY, "{cached}");
        assert!(cached >= 1);
    }

    #[test]
    fn the_key_file_is_made_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tls/service.key");
        let first = TokenKeys::load_or_create(&path).unwrap();
        let token = first.sign(&claims(1000, 3600)).unwrap();
        let again = TokenKeys::load_or_create(&path).unwrap();
        assert!(again.verify(&token, 1001, &[ISSUER]).is_ok());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(dir.path().join("bad.key"), "not a key").unwrap();
        assert!(matches!(
            TokenKeys::load_or_create(&dir.path().join("bad.key")),
            Err(TokenError::BadKey(_))
        ));
    }
}
