//! Encryption at rest for the values under chosen key prefixes (Secrets),
//! in front of any [`Store`], as upstream's storage transformers sit in
//! front of etcd.
//!
//! A value is sealed with AES-256-GCM under a random 96-bit nonce and
//! stored as `k8s:enc:aesgcm:v1:<key name>:<nonce><ciphertext+tag>`, the
//! prefix upstream's `aesgcm` provider writes. The key name and prefix are
//! bound into the tag, so a value moved to another key does not open.
//! Keys (object names) stay readable, as upstream's do. Values without the
//! prefix are read as they are, so a store written before encryption was
//! turned on stays readable and is sealed as objects are next written.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use super::{
    Deleted, KeyValue, RangeRequest, RangeResponse, Revision, Store, StoreError, WatchStream,
};

const KEY_LEN: usize = 32;
const VERSION_PREFIX: &[u8] = b"k8s:enc:aesgcm:v1:";

/// What upstream encrypts by default when encryption is configured.
pub const SECRETS_PREFIX: &[u8] = b"/registry/core/secrets/";

/// A store whose values under `prefixes` are sealed before they are
/// written and opened after they are read.
pub struct EncryptedStore {
    inner: Arc<dyn Store>,
    cipher: Arc<Cipher>,
    prefixes: Vec<&'static [u8]>,
}

struct Cipher {
    key: LessSafeKey,
    /// `k8s:enc:aesgcm:v1:<name>:`
    header: Vec<u8>,
    rng: SystemRandom,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} must hold {KEY_LEN} bytes of key, it holds {len}")]
    Length { path: String, len: usize },
    #[error("no random source for a new key")]
    Random,
}

impl EncryptedStore {
    /// Wraps `inner`, sealing values under `prefixes` with the key in
    /// `key_file` (created, readable by its owner only, when absent).
    pub fn open(
        inner: Arc<dyn Store>,
        key_file: &Path,
        prefixes: Vec<&'static [u8]>,
    ) -> Result<Self, KeyFileError> {
        let key = load_or_create_key(key_file)?;
        Ok(EncryptedStore {
            inner,
            cipher: Arc::new(Cipher::new("skiff-1", &key)),
            prefixes,
        })
    }

    fn sealed(&self, key: &[u8]) -> bool {
        self.prefixes.iter().any(|p| key.starts_with(p))
    }

    fn seal(&self, key: &[u8], value: Bytes) -> Result<Bytes, StoreError> {
        if self.sealed(key) {
            self.cipher.seal(key, &value)
        } else {
            Ok(value)
        }
    }

    fn open_kv(&self, kv: &mut KeyValue) -> Result<(), StoreError> {
        open_kv(&self.cipher, &self.prefixes, kv)
    }
}

#[async_trait]
impl Store for EncryptedStore {
    async fn current_revision(&self) -> Result<Revision, StoreError> {
        self.inner.current_revision().await
    }

    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        let mut found = self.inner.get(key).await?;
        if let Some(kv) = &mut found {
            self.open_kv(kv)?;
        }
        Ok(found)
    }

    async fn create(&self, key: &[u8], value: Bytes) -> Result<KeyValue, StoreError> {
        let sealed = self.seal(key, value.clone())?;
        let mut kv = self.inner.create(key, sealed).await?;
        kv.value = value;
        Ok(kv)
    }

    async fn update(
        &self,
        key: &[u8],
        value: Bytes,
        expected: Revision,
    ) -> Result<KeyValue, StoreError> {
        let sealed = self.seal(key, value.clone())?;
        match self.inner.update(key, sealed, expected).await {
            Ok(mut kv) => {
                kv.value = value;
                Ok(kv)
            }
            Err(e) => Err(self.open_error(e)),
        }
    }

    async fn delete(&self, key: &[u8], expected: Option<Revision>) -> Result<Deleted, StoreError> {
        match self.inner.delete(key, expected).await {
            Ok(mut deleted) => {
                self.open_kv(&mut deleted.prev)?;
                Ok(deleted)
            }
            Err(e) => Err(self.open_error(e)),
        }
    }

    async fn range(&self, request: RangeRequest) -> Result<RangeResponse, StoreError> {
        let mut response = self.inner.range(request).await?;
        for kv in &mut response.kvs {
            self.open_kv(kv)?;
        }
        Ok(response)
    }

    async fn watch(&self, prefix: &[u8], from: Revision) -> Result<WatchStream, StoreError> {
        let events = self.inner.watch(prefix, from).await?;
        let cipher = self.cipher.clone();
        let prefixes = self.prefixes.clone();
        Ok(Box::pin(events.map(move |event| {
            let mut event = event?;
            open_kv(&cipher, &prefixes, &mut event.kv)?;
            if let Some(prev) = &mut event.prev {
                open_kv(&cipher, &prefixes, prev)?;
            }
            Ok(event)
        })))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.inner.compact(revision).await
    }
}

impl EncryptedStore {
    /// A conflict carries the current value, which the caller reads.
    fn open_error(&self, error: StoreError) -> StoreError {
        match error {
            StoreError::Conflict {
                key,
                expected,
                current: Some(mut current),
            } => match self.open_kv(&mut current) {
                Ok(()) => StoreError::Conflict {
                    key,
                    expected,
                    current: Some(current),
                },
                Err(e) => e,
            },
            other => other,
        }
    }
}

impl Cipher {
    fn new(name: &str, key: &[u8; KEY_LEN]) -> Self {
        let mut header = VERSION_PREFIX.to_vec();
        header.extend_from_slice(name.as_bytes());
        header.push(b':');
        let unbound = UnboundKey::new(&AES_256_GCM, key).expect("AES-256 takes a 32-byte key");
        Cipher {
            key: LessSafeKey::new(unbound),
            header,
            rng: SystemRandom::new(),
        }
    }

    fn seal(&self, key: &[u8], value: &[u8]) -> Result<Bytes, StoreError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| StoreError::Internal("no random source for a nonce".into()))?;
        let mut out = BytesMut::with_capacity(
            self.header.len() + NONCE_LEN + value.len() + AES_256_GCM.tag_len(),
        );
        out.put_slice(&self.header);
        out.put_slice(&nonce);
        let body_start = out.len();
        out.put_slice(value);
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(key),
                &mut out[body_start..],
            )
            .map_err(|_| StoreError::Internal("sealing a value failed".into()))?;
        out.put_slice(tag.as_ref());
        Ok(out.freeze())
    }

    fn open(&self, key: &[u8], stored: &[u8]) -> Result<Bytes, StoreError> {
        let corrupt = |why: &str| {
            StoreError::Corrupt(format!(
                "encrypted value of {}: {why}",
                String::from_utf8_lossy(key)
            ))
        };
        let Some(rest) = stored.strip_prefix(self.header.as_slice()) else {
            return Err(corrupt("sealed with another key (unknown key name)"));
        };
        if rest.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(corrupt("too short"));
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| corrupt("bad nonce"))?;
        let mut buffer = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(key), &mut buffer)
            .map_err(|_| corrupt("does not authenticate (wrong key or tampered)"))?;
        let len = plain.len();
        buffer.truncate(len);
        Ok(Bytes::from(buffer))
    }
}

fn open_kv(cipher: &Cipher, prefixes: &[&[u8]], kv: &mut KeyValue) -> Result<(), StoreError> {
    if prefixes.iter().any(|p| kv.key.starts_with(p)) && kv.value.starts_with(VERSION_PREFIX) {
        kv.value = cipher.open(&kv.key, &kv.value)?;
    }
    Ok(())
}

fn load_or_create_key(path: &Path) -> Result<[u8; KEY_LEN], KeyFileError> {
    let shown = || path.display().to_string();
    match std::fs::read(path) {
        Ok(bytes) => {
            let len = bytes.len();
            bytes
                .try_into()
                .map_err(|_| KeyFileError::Length { path: shown(), len })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; KEY_LEN];
            SystemRandom::new()
                .fill(&mut key)
                .map_err(|_| KeyFileError::Random)?;
            write_private(path, &key).map_err(|source| KeyFileError::Write {
                path: shown(),
                source,
            })?;
            Ok(key)
        }
        Err(source) => Err(KeyFileError::Read {
            path: shown(),
            source,
        }),
    }
}

/// Writes a file only its owner may read, whole or not at all.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::embedded::EmbeddedStore;

    const SECRET: &[u8] = b"/registry/core/secrets/default/db";
    const PLAIN: &[u8] = br#"{"metadata":{"name":"db"},"data":{"password":"aHVudGVyMg=="}}"#;

    fn stores(dir: &Path) -> (Arc<dyn Store>, EncryptedStore) {
        let raw: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.join("state.db")).expect("store opens"));
        let sealed = EncryptedStore::open(raw.clone(), &dir.join("key"), vec![SECRETS_PREFIX])
            .expect("key is created");
        (raw, sealed)
    }

    #[tokio::test]
    async fn secrets_are_sealed_in_the_store_and_open_on_every_read() {
        let dir = tempfile::tempdir().unwrap();
        let (raw, store) = stores(dir.path());
        let created = store
            .create(SECRET, Bytes::from_static(PLAIN))
            .await
            .unwrap();
        assert_eq!(created.value, PLAIN);
        let at_rest = raw.get(SECRET).await.unwrap().unwrap().value;
        assert!(at_rest.starts_with(b"k8s:enc:aesgcm:v1:skiff-1:"));
        assert!(
            !at_rest.windows(8).any(|w| w == b"aHVudGVy"),
            "plaintext at rest"
        );

        assert_eq!(store.get(SECRET).await.unwrap().unwrap().value, PLAIN);
        let listed = store
            .range(RangeRequest {
                prefix: Bytes::from_static(SECRETS_PREFIX),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(listed.kvs[0].value, PLAIN);

        let mut events = store
            .watch(SECRETS_PREFIX, created.mod_revision)
            .await
            .unwrap();
        let updated = store
            .update(SECRET, Bytes::from_static(b"{}"), created.mod_revision)
            .await
            .unwrap();
        let event = events.next().await.unwrap().unwrap();
        assert_eq!(event.kv.value, &b"{}"[..]);
        assert_eq!(event.prev.unwrap().value, PLAIN);

        // A stale write's conflict carries the current value, opened.
        match store
            .update(SECRET, Bytes::new(), created.mod_revision)
            .await
        {
            Err(StoreError::Conflict {
                current: Some(current),
                ..
            }) => assert_eq!(current.value, &b"{}"[..]),
            other => panic!("expected a conflict, got {other:?}"),
        }
        let deleted = store
            .delete(SECRET, Some(updated.mod_revision))
            .await
            .unwrap();
        assert_eq!(deleted.prev.value, &b"{}"[..]);
    }

    #[tokio::test]
    async fn other_keys_and_old_plaintext_pass_through() {
        let dir = tempfile::tempdir().unwrap();
        let (raw, store) = stores(dir.path());
        let cm = b"/registry/core/configmaps/default/x";
        store.create(cm, Bytes::from_static(PLAIN)).await.unwrap();
        assert_eq!(raw.get(cm).await.unwrap().unwrap().value, PLAIN);
        // Written before encryption was on.
        raw.create(SECRET, Bytes::from_static(PLAIN)).await.unwrap();
        assert_eq!(store.get(SECRET).await.unwrap().unwrap().value, PLAIN);
    }

    #[tokio::test]
    async fn key_survives_restart_and_tampering_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (_, store) = stores(dir.path());
            store
                .create(SECRET, Bytes::from_static(PLAIN))
                .await
                .unwrap();
        }
        let (raw, store) = stores(dir.path());
        let kv = store.get(SECRET).await.unwrap().unwrap();
        assert_eq!(kv.value, PLAIN);

        let mut at_rest = raw.get(SECRET).await.unwrap().unwrap().value.to_vec();
        let last = at_rest.len() - 1;
        at_rest[last] ^= 1;
        raw.update(SECRET, Bytes::from(at_rest), kv.mod_revision)
            .await
            .unwrap();
        assert!(matches!(
            store.get(SECRET).await,
            Err(StoreError::Corrupt(_))
        ));

        // A sealed value copied under another name does not open either.
        let sealed = raw.get(SECRET).await.unwrap().unwrap().value;
        let other = b"/registry/core/secrets/default/other";
        raw.create(other, sealed).await.unwrap();
        assert!(matches!(
            store.get(other).await,
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn a_key_file_of_the_wrong_size_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(
            load_or_create_key(&path),
            Err(KeyFileError::Length { len: 5, .. })
        ));
    }
}
