//! The revisioned key-value store every other part of Skiff stands on.
//!
//! The contract is etcd's: one global revision that grows by one with every
//! write, compare-and-swap on a key's `mod_revision`, reads at the current or
//! a past revision, watches that replay history and then follow it, and
//! compaction that forgets old revisions. Two backends implement it — an
//! embedded SQLite revision log ([`embedded`]) and a real etcd ([`etcd`]) —
//! and the same conformance suite holds both to it.

pub mod embedded;
pub mod encrypted;
pub mod etcd;

use std::pin::Pin;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;

/// A revision of the whole store. Revision 0 means "none" or "current",
/// depending on where it is used; real revisions start at 1.
pub type Revision = i64;

/// etcd's default request size limit, which Kubernetes objects live under.
pub const MAX_VALUE_BYTES: usize = 1536 * 1024;

/// One version of one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: Bytes,
    pub value: Bytes,
    /// The revision that created this key (since its last deletion).
    pub create_revision: Revision,
    /// The revision of the write that produced this version.
    pub mod_revision: Revision,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// A change to one key. For a delete, `kv` carries the key, an empty value
/// and the deleting revision as `mod_revision`; `prev` carries what was
/// deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
    pub prev: Option<KeyValue>,
}

impl Event {
    pub fn revision(&self) -> Revision {
        self.kv.mod_revision
    }
}

/// A prefix read, optionally at a past revision and paginated.
#[derive(Clone, Debug, Default)]
pub struct RangeRequest {
    /// Every key that starts with these bytes.
    pub prefix: Bytes,
    /// Continue from this key (inclusive); it must start with `prefix`.
    /// Callers continuing a page pass the last key they saw followed by a
    /// zero byte.
    pub start: Option<Bytes>,
    /// At most this many keys; 0 means no limit.
    pub limit: usize,
    /// Read as of this revision; 0 means the current one.
    pub revision: Revision,
}

#[derive(Clone, Debug, Default)]
pub struct RangeResponse {
    pub kvs: Vec<KeyValue>,
    /// More keys follow the last one returned.
    pub more: bool,
    /// How many keys the range holds from `start` on, ignoring `limit`.
    pub count: usize,
    /// The revision the read was served at.
    pub revision: Revision,
}

/// The outcome of a successful delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Deleted {
    pub revision: Revision,
    pub prev: KeyValue,
}

/// A stream of events in revision order. It ends only with an error (the
/// backend went away, or the watcher fell behind a compaction).
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<Event, StoreError>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key {} already exists", show_key(.key))]
    AlreadyExists { key: Bytes },
    #[error("key {} not found", show_key(.key))]
    NotFound { key: Bytes },
    /// The compare-and-swap lost: the key is now at another revision (or
    /// gone). `current` lets the caller retry without another read.
    #[error("key {} was modified concurrently (expected revision {expected})", show_key(.key))]
    Conflict {
        key: Bytes,
        expected: Revision,
        current: Option<Box<KeyValue>>,
    },
    #[error("revision {requested} has been compacted (compacted up to {compacted})")]
    Compacted {
        requested: Revision,
        compacted: Revision,
    },
    #[error("revision {requested} is in the future (current is {current})")]
    FutureRevision {
        requested: Revision,
        current: Revision,
    },
    #[error("value of {size} bytes exceeds the limit of {limit} bytes")]
    ValueTooLarge { size: usize, limit: usize },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The backend cannot be reached right now; the same call may succeed
    /// later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store's files are damaged or belong to something else.
    #[error("store is corrupt or not a Skiff store: {0}")]
    Corrupt(String),
    #[error("store failure: {0}")]
    Internal(String),
}

impl StoreError {
    /// Whether the same call may succeed if retried later unchanged.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// The store contract. Every write is atomic and durable once it returns.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The revision of the latest write.
    async fn current_revision(&self) -> Result<Revision, StoreError>;

    /// The current version of `key`, if it exists.
    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError>;

    /// Creates `key`; fails with `AlreadyExists` if it exists.
    async fn create(&self, key: &[u8], value: Bytes) -> Result<KeyValue, StoreError>;

    /// Replaces `key` if its `mod_revision` is still `expected`.
    async fn update(
        &self,
        key: &[u8],
        value: Bytes,
        expected: Revision,
    ) -> Result<KeyValue, StoreError>;

    /// Deletes `key`; if `expected` is given, only while its `mod_revision`
    /// is still that.
    async fn delete(&self, key: &[u8], expected: Option<Revision>) -> Result<Deleted, StoreError>;

    /// Keys under a prefix, in key order.
    async fn range(&self, request: RangeRequest) -> Result<RangeResponse, StoreError>;

    /// Every event under `prefix` after `from` (exclusive), then new events
    /// as they happen. `from == 0` starts at the current revision.
    async fn watch(&self, prefix: &[u8], from: Revision) -> Result<WatchStream, StoreError>;

    /// Forgets every version superseded at or before `revision`. Reads and
    /// watches from before `revision` then fail with `Compacted`.
    async fn compact(&self, revision: Revision) -> Result<(), StoreError>;
}

/// Checks a value against the size limit shared by both backends.
pub(crate) fn check_value(value: &[u8]) -> Result<(), StoreError> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(StoreError::ValueTooLarge {
            size: value.len(),
            limit: MAX_VALUE_BYTES,
        });
    }
    Ok(())
}

/// Checks a key: empty keys have no meaning in either backend.
pub(crate) fn check_key(key: &[u8]) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::InvalidRequest("empty key".into()));
    }
    Ok(())
}

/// The first key after every key that starts with `prefix`, as etcd's
/// `range_end`; `None` when no such key exists (prefix of all 0xff).
pub(crate) fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

fn show_key(key: &[u8]) -> String {
    String::from_utf8_lossy(key).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(
            prefix_end(b"/registry/pods/"),
            Some(b"/registry/pods0".to_vec())
        );
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert_eq!(prefix_end(b""), None);
    }
}
