//! The in-memory picture of the revision log: every retained version of every
//! key (for reads at any revision) and the event log since the last
//! compaction (for watches). Reads and watches are served from here; SQLite
//! is only written to and read at start.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;

use bytes::Bytes;

use crate::storage::{
    Event, EventKind, KeyValue, RangeRequest, RangeResponse, Revision, StoreError,
};

/// One retained version of a key; `value == None` marks a deletion.
#[derive(Clone, Debug)]
struct Version {
    mod_revision: Revision,
    create_revision: Revision,
    value: Option<Bytes>,
}

/// A row of the revision log as stored: a put or a tombstone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Row {
    pub revision: Revision,
    pub key: Bytes,
    pub create_revision: Revision,
    /// `None` for a deletion.
    pub value: Option<Bytes>,
}

#[derive(Default)]
pub(super) struct Index {
    keys: BTreeMap<Bytes, Vec<Version>>,
    /// Events after `compacted`, in revision order.
    events: VecDeque<Event>,
    revision: Revision,
    compacted: Revision,
}

/// A write to validate against the index.
#[derive(Debug)]
pub(super) enum WriteOp {
    Create {
        key: Bytes,
        value: Bytes,
    },
    Update {
        key: Bytes,
        value: Bytes,
        expected: Revision,
    },
    Delete {
        key: Bytes,
        expected: Option<Revision>,
    },
}

impl Index {
    pub fn revision(&self) -> Revision {
        self.revision
    }

    pub fn compacted(&self) -> Revision {
        self.compacted
    }

    /// Rebuilds the index from the log's rows in revision order. Rows at or
    /// before `compacted` are the survivors of a compaction and produce no
    /// events.
    pub fn load(
        rows: impl IntoIterator<Item = Row>,
        compacted: Revision,
    ) -> Result<Self, StoreError> {
        let mut index = Index {
            revision: compacted,
            compacted,
            ..Index::default()
        };
        for row in rows {
            if row.revision <= index.revision && row.revision > compacted {
                return Err(StoreError::Corrupt(format!(
                    "revision {} out of order after {}",
                    row.revision, index.revision
                )));
            }
            if row.revision <= compacted {
                let history = index.keys.entry(row.key.clone()).or_default();
                history.push(Version {
                    mod_revision: row.revision,
                    create_revision: row.create_revision,
                    value: row.value,
                });
                continue;
            }
            let event = index.event_for_row(row);
            index.apply(event);
        }
        Ok(index)
    }

    /// The current version of `key`.
    pub fn get(&self, key: &[u8]) -> Option<KeyValue> {
        let (stored_key, history) = self.keys.get_key_value(key)?;
        version_at(history, self.revision).and_then(|v| to_kv(stored_key, v))
    }

    pub fn range(&self, request: &RangeRequest) -> Result<RangeResponse, StoreError> {
        let at = match request.revision {
            0 => self.revision,
            r if r > self.revision => {
                return Err(StoreError::FutureRevision {
                    requested: r,
                    current: self.revision,
                });
            }
            r if r < self.compacted => {
                return Err(StoreError::Compacted {
                    requested: r,
                    compacted: self.compacted,
                });
            }
            r => r,
        };
        let start = match &request.start {
            Some(start) if !start.starts_with(&request.prefix) => {
                return Err(StoreError::InvalidRequest(
                    "continue key is outside the requested prefix".into(),
                ));
            }
            Some(start) => start.clone(),
            None => request.prefix.clone(),
        };
        let mut response = RangeResponse {
            revision: at,
            ..RangeResponse::default()
        };
        let limit = if request.limit == 0 {
            usize::MAX
        } else {
            request.limit
        };
        let range = self
            .keys
            .range::<Bytes, _>((Bound::Included(&start), Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(&request.prefix));
        for (key, history) in range {
            let Some(kv) = version_at(history, at).and_then(|v| to_kv(key, v)) else {
                continue;
            };
            response.count += 1;
            if response.kvs.len() < limit {
                response.kvs.push(kv);
            } else {
                response.more = true;
            }
        }
        Ok(response)
    }

    /// Events under `prefix` after revision `after`, at most `max` of them,
    /// and the revision scanned up to (which may be past the last event
    /// returned, when later events are under other prefixes).
    pub fn events_after(
        &self,
        prefix: &[u8],
        after: Revision,
        max: usize,
    ) -> Result<(Vec<Event>, Revision), StoreError> {
        if after < self.compacted {
            return Err(StoreError::Compacted {
                requested: after,
                compacted: self.compacted,
            });
        }
        let start = self.events.partition_point(|e| e.revision() <= after);
        let mut found = Vec::new();
        let mut scanned = after.max(self.compacted);
        for event in self.events.range(start..) {
            if found.len() == max {
                break;
            }
            scanned = event.revision();
            if event.kv.key.starts_with(prefix) {
                found.push(event.clone());
            }
        }
        Ok((found, scanned))
    }

    /// Validates a write against the index plus the writes already accepted
    /// in the same batch (`pending`), and returns the event it would make at
    /// `revision`.
    pub fn prepare(
        &self,
        op: WriteOp,
        revision: Revision,
        pending: &HashMap<Bytes, Option<KeyValue>>,
    ) -> Result<Event, StoreError> {
        let current = |key: &Bytes| match pending.get(key) {
            Some(latest) => latest.clone(),
            None => self.get(key),
        };
        match op {
            WriteOp::Create { key, value } => {
                if current(&key).is_some() {
                    return Err(StoreError::AlreadyExists { key });
                }
                Ok(Event {
                    kind: EventKind::Put,
                    kv: KeyValue {
                        key,
                        value,
                        create_revision: revision,
                        mod_revision: revision,
                    },
                    prev: None,
                })
            }
            WriteOp::Update {
                key,
                value,
                expected,
            } => {
                let Some(prev) = current(&key) else {
                    return Err(StoreError::NotFound { key });
                };
                if prev.mod_revision != expected {
                    return Err(StoreError::Conflict {
                        key,
                        expected,
                        current: Some(Box::new(prev)),
                    });
                }
                Ok(Event {
                    kind: EventKind::Put,
                    kv: KeyValue {
                        key,
                        value,
                        create_revision: prev.create_revision,
                        mod_revision: revision,
                    },
                    prev: Some(prev),
                })
            }
            WriteOp::Delete { key, expected } => {
                let Some(prev) = current(&key) else {
                    return Err(StoreError::NotFound { key });
                };
                if let Some(expected) = expected
                    && prev.mod_revision != expected
                {
                    return Err(StoreError::Conflict {
                        key,
                        expected,
                        current: Some(Box::new(prev)),
                    });
                }
                Ok(Event {
                    kind: EventKind::Delete,
                    kv: tombstone(key, revision),
                    prev: Some(prev),
                })
            }
        }
    }

    /// Records a committed event. Events must come in revision order.
    pub fn apply(&mut self, event: Event) {
        debug_assert!(event.revision() > self.revision);
        self.revision = event.revision();
        let value = match event.kind {
            EventKind::Put => Some(event.kv.value.clone()),
            EventKind::Delete => None,
        };
        let version = Version {
            mod_revision: event.kv.mod_revision,
            create_revision: event.kv.create_revision,
            value,
        };
        match self.keys.get_mut(&event.kv.key) {
            Some(history) => history.push(version),
            None => {
                self.keys.insert(event.kv.key.clone(), vec![version]);
            }
        }
        self.events.push_back(event);
    }

    /// The revisions that a compaction at `revision` removes from the log:
    /// every version superseded at or before it, and tombstones at or before
    /// it.
    pub fn compactable(&self, revision: Revision) -> Vec<Revision> {
        let mut doomed = Vec::new();
        for history in self.keys.values() {
            let kept = history.partition_point(|v| v.mod_revision <= revision);
            if kept == 0 {
                continue;
            }
            let last = &history[kept - 1];
            let cut = if last.value.is_none() { kept } else { kept - 1 };
            doomed.extend(history[..cut].iter().map(|v| v.mod_revision));
        }
        doomed
    }

    /// Forgets what [`Index::compactable`] named.
    pub fn compact(&mut self, revision: Revision) {
        self.keys.retain(|_, history| {
            let kept = history.partition_point(|v| v.mod_revision <= revision);
            if kept > 0 {
                let cut = if history[kept - 1].value.is_none() {
                    kept
                } else {
                    kept - 1
                };
                history.drain(..cut);
            }
            !history.is_empty()
        });
        let gone = self.events.partition_point(|e| e.revision() <= revision);
        self.events.drain(..gone);
        self.compacted = self.compacted.max(revision);
    }

    /// Turns a loaded row into the event it recorded, finding the previous
    /// version in the index.
    fn event_for_row(&self, row: Row) -> Event {
        let prev = self.get(&row.key);
        match row.value {
            Some(value) => Event {
                kind: EventKind::Put,
                kv: KeyValue {
                    key: row.key,
                    value,
                    create_revision: row.create_revision,
                    mod_revision: row.revision,
                },
                prev,
            },
            None => Event {
                kind: EventKind::Delete,
                kv: tombstone(row.key, row.revision),
                prev,
            },
        }
    }
}

impl Event {
    /// The log row that records this event.
    pub(super) fn to_row(&self) -> Row {
        Row {
            revision: self.kv.mod_revision,
            key: self.kv.key.clone(),
            create_revision: self.kv.create_revision,
            value: match self.kind {
                EventKind::Put => Some(self.kv.value.clone()),
                EventKind::Delete => None,
            },
        }
    }
}

fn version_at(history: &[Version], revision: Revision) -> Option<&Version> {
    let n = history.partition_point(|v| v.mod_revision <= revision);
    n.checked_sub(1).map(|i| &history[i])
}

fn to_kv(key: &Bytes, version: &Version) -> Option<KeyValue> {
    Some(KeyValue {
        key: key.clone(),
        value: version.value.clone()?,
        create_revision: version.create_revision,
        mod_revision: version.mod_revision,
    })
}

fn tombstone(key: Bytes, revision: Revision) -> KeyValue {
    KeyValue {
        key,
        value: Bytes::new(),
        create_revision: 0,
        mod_revision: revision,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(index: &mut Index, op: WriteOp) -> Result<Event, StoreError> {
        let event = index.prepare(op, index.revision() + 1, &HashMap::new())?;
        index.apply(event.clone());
        Ok(event)
    }

    fn put(key: &str, value: &str) -> WriteOp {
        WriteOp::Create {
            key: Bytes::copy_from_slice(key.as_bytes()),
            value: Bytes::copy_from_slice(value.as_bytes()),
        }
    }

    #[test]
    fn compaction_keeps_latest_version_and_drops_tombstones() {
        let mut index = Index::default();
        commit(&mut index, put("a", "1")).unwrap();
        commit(&mut index, put("b", "1")).unwrap();
        let a2 = WriteOp::Update {
            key: Bytes::from_static(b"a"),
            value: Bytes::from_static(b"2"),
            expected: 1,
        };
        commit(&mut index, a2).unwrap();
        let del_b = WriteOp::Delete {
            key: Bytes::from_static(b"b"),
            expected: None,
        };
        commit(&mut index, del_b).unwrap();
        assert_eq!(index.compactable(4), vec![1, 2, 4]);
        index.compact(4);
        assert_eq!(index.get(b"a").unwrap().value, Bytes::from_static(b"2"));
        assert!(index.get(b"b").is_none());
        assert!(matches!(
            index.events_after(b"", 3, 10),
            Err(StoreError::Compacted { .. })
        ));
        let (events, scanned) = index.events_after(b"", 4, 10).unwrap();
        assert!(events.is_empty());
        assert_eq!(scanned, 4);
    }

    #[test]
    fn batch_overlay_is_seen_by_later_writes() {
        let index = Index::default();
        let mut pending = HashMap::new();
        let first = index.prepare(put("k", "v"), 1, &pending).unwrap();
        pending.insert(first.kv.key.clone(), Some(first.kv.clone()));
        let second = index.prepare(put("k", "w"), 2, &pending);
        assert!(matches!(second, Err(StoreError::AlreadyExists { .. })));
    }

    #[test]
    fn load_replays_rows_into_events_with_prev() {
        let rows = vec![
            Row {
                revision: 1,
                key: Bytes::from_static(b"k"),
                create_revision: 1,
                value: Some(Bytes::from_static(b"1")),
            },
            Row {
                revision: 2,
                key: Bytes::from_static(b"k"),
                create_revision: 1,
                value: None,
            },
        ];
        let index = Index::load(rows, 0).unwrap();
        let (events, _) = index.events_after(b"k", 0, 10).unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].kind, EventKind::Delete);
        assert_eq!(
            events[1].prev.as_ref().unwrap().value,
            Bytes::from_static(b"1")
        );
    }
}
