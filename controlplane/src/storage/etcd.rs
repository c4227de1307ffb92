//! The etcd backend: the store contract mapped onto etcd's own — every write
//! is one transaction that compares `create_revision` or `mod_revision` and
//! reads the key back when the comparison fails, so a lost compare-and-swap
//! costs one round trip.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, KvClient,
    PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse, WatchClient, WatchOptions,
};
use futures::StreamExt;

use super::{
    Deleted, Event, EventKind, KeyValue, RangeRequest, RangeResponse, Revision, Store, StoreError,
    WatchStream, check_key, check_value, prefix_end,
};

/// How long one unary call may take before it counts as unavailable.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Lists of many large objects exceed gRPC's 4 MiB default.
const MAX_MESSAGE_BYTES: usize = 512 * 1024 * 1024;

pub struct EtcdStore {
    kv: KvClient,
    watch: WatchClient,
}

impl EtcdStore {
    /// Connects to one or more endpoints (`http://host:port`). It does not
    /// wait for etcd to answer: calls made while it is down fail with
    /// [`StoreError::Unavailable`] and succeed again once it is back.
    pub async fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::InvalidRequest("no etcd endpoints given".into()));
        }
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        let client = Client::connect(endpoints, Some(options))
            .await
            .map_err(map_error)?;
        Ok(EtcdStore {
            kv: client
                .kv_client()
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            watch: client
                .watch_client()
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
        })
    }

    /// Parses `--datastore-endpoint`: comma-separated `http://` URLs.
    pub fn parse_endpoints(spec: &str) -> Result<Vec<String>, StoreError> {
        let endpoints: Vec<String> = spec
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_owned)
            .collect();
        if endpoints.is_empty() {
            return Err(StoreError::InvalidRequest(
                "empty etcd endpoint list".into(),
            ));
        }
        for endpoint in &endpoints {
            if !endpoint.starts_with("http://") {
                return Err(StoreError::InvalidRequest(format!(
                    "etcd endpoint {endpoint:?} must start with http://"
                )));
            }
        }
        Ok(endpoints)
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        let mut kv = self.kv.clone();
        call(kv.txn(txn)).await
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn current_revision(&self) -> Result<Revision, StoreError> {
        let mut kv = self.kv.clone();
        let options = GetOptions::new().with_count_only();
        let response = call(kv.get(&b"\0"[..], Some(options))).await?;
        header_revision(response.header())
    }

    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        let mut kv = self.kv.clone();
        let mut response = call(kv.get(key, None)).await?;
        Ok(response.take_kvs().into_iter().next().map(convert_kv))
    }

    async fn create(&self, key: &[u8], value: Bytes) -> Result<KeyValue, StoreError> {
        check_key(key)?;
        check_value(&value)?;
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value.to_vec(), None)]);
        let response = self.txn(txn).await?;
        if !response.succeeded() {
            return Err(StoreError::AlreadyExists {
                key: Bytes::copy_from_slice(key),
            });
        }
        let revision = header_revision(response.header())?;
        Ok(KeyValue {
            key: Bytes::copy_from_slice(key),
            value,
            create_revision: revision,
            mod_revision: revision,
        })
    }

    async fn update(
        &self,
        key: &[u8],
        value: Bytes,
        expected: Revision,
    ) -> Result<KeyValue, StoreError> {
        check_key(key)?;
        check_value(&value)?;
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, expected)])
            .and_then([TxnOp::put(
                key,
                value.to_vec(),
                Some(PutOptions::new().with_prev_key()),
            )])
            .or_else([TxnOp::get(key, None)]);
        let response = self.txn(txn).await?;
        let revision = header_revision(response.header())?;
        if !response.succeeded() {
            return Err(lost_compare(key, expected, &response));
        }
        let prev = match response.op_responses().into_iter().next() {
            Some(TxnOpResponse::Put(mut put)) => put.take_prev_key(),
            _ => None,
        };
        let create_revision = prev.map_or(revision, |p| p.create_revision());
        Ok(KeyValue {
            key: Bytes::copy_from_slice(key),
            value,
            create_revision,
            mod_revision: revision,
        })
    }

    async fn delete(&self, key: &[u8], expected: Option<Revision>) -> Result<Deleted, StoreError> {
        check_key(key)?;
        // Without an expected revision, "the key exists" is the condition,
        // so a missing key reads back instead of deleting nothing.
        let compare = match expected {
            Some(rev) => Compare::mod_revision(key, CompareOp::Equal, rev),
            None => Compare::create_revision(key, CompareOp::Greater, 0),
        };
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::delete(
                key,
                Some(DeleteOptions::new().with_prev_key()),
            )])
            .or_else([TxnOp::get(key, None)]);
        let response = self.txn(txn).await?;
        let revision = header_revision(response.header())?;
        if !response.succeeded() {
            return Err(lost_compare(key, expected.unwrap_or(0), &response));
        }
        let prev = match response.op_responses().into_iter().next() {
            Some(TxnOpResponse::Delete(mut delete)) => {
                delete.take_prev_kvs().into_iter().next().map(convert_kv)
            }
            _ => None,
        };
        // The compare guaranteed the key existed, so the delete removed it.
        let prev = prev
            .ok_or_else(|| StoreError::Internal("etcd delete returned no previous value".into()))?;
        Ok(Deleted { revision, prev })
    }

    async fn range(&self, request: RangeRequest) -> Result<RangeResponse, StoreError> {
        let start = match &request.start {
            Some(start) if !start.starts_with(&request.prefix) => {
                return Err(StoreError::InvalidRequest(
                    "continue key is outside the requested prefix".into(),
                ));
            }
            Some(start) => start.to_vec(),
            None => request.prefix.to_vec(),
        };
        let end = prefix_end(&request.prefix).unwrap_or_else(|| vec![0]);
        let mut options = GetOptions::new()
            .with_range(end)
            .with_limit(i64::try_from(request.limit).unwrap_or(i64::MAX));
        if request.revision > 0 {
            options = options.with_revision(request.revision);
        }
        let mut kv = self.kv.clone();
        let mut response = call(kv.get(start, Some(options)))
            .await
            .map_err(|e| revision_error(e, request.revision))?;
        let revision = if request.revision > 0 {
            request.revision
        } else {
            header_revision(response.header())?
        };
        Ok(RangeResponse {
            more: response.more(),
            count: usize::try_from(response.count()).unwrap_or(0),
            kvs: response.take_kvs().into_iter().map(convert_kv).collect(),
            revision,
        })
    }

    async fn watch(&self, prefix: &[u8], from: Revision) -> Result<WatchStream, StoreError> {
        let current = self.current_revision().await?;
        if from > current {
            return Err(StoreError::FutureRevision {
                requested: from,
                current,
            });
        }
        // Starting at `from` itself (not after it) makes etcd refuse exactly
        // the watches the contract refuses: those from before the
        // compaction point. The event at `from` is skipped below.
        let start = if from == 0 { current + 1 } else { from };
        let end = prefix_end(prefix).unwrap_or_else(|| vec![0]);
        let options = WatchOptions::new()
            .with_range(end)
            .with_start_revision(start)
            .with_prev_key();
        let mut client = self.watch.clone();
        let stream = call(client.watch(prefix, Some(options))).await?;
        let requested = from;
        // The stream owns the request sender: dropping it cancels the watch.
        let events = stream
            .map(move |message| -> Vec<Result<Event, StoreError>> {
                let response = match message {
                    Ok(response) => response,
                    Err(e) => return vec![Err(map_error(e))],
                };
                if response.compact_revision() > 0 {
                    return vec![Err(StoreError::Compacted {
                        requested,
                        compacted: response.compact_revision(),
                    })];
                }
                if response.canceled() {
                    return vec![Err(StoreError::Unavailable(format!(
                        "etcd cancelled the watch: {}",
                        response.cancel_reason()
                    )))];
                }
                response
                    .events()
                    .iter()
                    .map(convert_event)
                    .filter(|e| e.as_ref().map_or(true, |e| e.revision() > requested))
                    .collect()
            })
            .flat_map(futures::stream::iter)
            .chain(futures::stream::once(async {
                Err(StoreError::Unavailable("etcd closed the watch".into()))
            }));
        Ok(Box::pin(stop_after_error(events)))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let mut kv = self.kv.clone();
        call(kv.compact(revision, None))
            .await
            .map_err(|e| revision_error(e, revision))?;
        Ok(())
    }
}

/// Ends a stream after its first error, as the store contract says.
fn stop_after_error(
    stream: impl futures::Stream<Item = Result<Event, StoreError>> + Send + 'static,
) -> impl futures::Stream<Item = Result<Event, StoreError>> + Send + 'static {
    stream.scan(false, |failed, item| {
        let next = if *failed {
            None
        } else {
            *failed = item.is_err();
            Some(item)
        };
        futures::future::ready(next)
    })
}

async fn call<T>(
    future: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, StoreError> {
    match tokio::time::timeout(CALL_TIMEOUT, future).await {
        Ok(result) => result.map_err(map_error),
        Err(_) => Err(StoreError::Unavailable(format!(
            "etcd did not answer within {CALL_TIMEOUT:?}"
        ))),
    }
}

/// The error for a failed compare: the key is gone, or at another revision.
fn lost_compare(key: &[u8], expected: Revision, response: &TxnResponse) -> StoreError {
    let current = match response.op_responses().into_iter().next() {
        Some(TxnOpResponse::Get(mut get)) => get.take_kvs().into_iter().next().map(convert_kv),
        _ => None,
    };
    let key = Bytes::copy_from_slice(key);
    match current {
        None => StoreError::NotFound { key },
        Some(current) => StoreError::Conflict {
            key,
            expected,
            current: Some(Box::new(current)),
        },
    }
}

/// Turns etcd's revision errors into the contract's.
fn revision_error(error: StoreError, requested: Revision) -> StoreError {
    let StoreError::Internal(message) = &error else {
        return error;
    };
    if message.contains("required revision has been compacted") {
        StoreError::Compacted {
            requested,
            compacted: requested,
        }
    } else if message.contains("required revision is a future revision") {
        StoreError::FutureRevision {
            requested,
            current: 0,
        }
    } else {
        error
    }
}

fn map_error(error: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    use tonic::Code;
    match error {
        E::TransportError(e) => StoreError::Unavailable(e.to_string()),
        E::IoError(e) => StoreError::Unavailable(e.to_string()),
        E::GRpcStatus(status) => match status.code() {
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                StoreError::Unavailable(status.message().to_owned())
            }
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                StoreError::Internal(status.message().to_owned())
            }
            _ => StoreError::Internal(format!("{:?}: {}", status.code(), status.message())),
        },
        E::InvalidArgs(m) => StoreError::InvalidRequest(m),
        other => StoreError::Internal(other.to_string()),
    }
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<Revision, StoreError> {
    header
        .map(|h| h.revision())
        .ok_or_else(|| StoreError::Internal("etcd response without a header".into()))
}

fn convert_kv(kv: etcd_client::KeyValue) -> KeyValue {
    let create_revision = kv.create_revision();
    let mod_revision = kv.mod_revision();
    let (key, value) = kv.into_key_value();
    KeyValue {
        key: Bytes::from(key),
        value: Bytes::from(value),
        create_revision,
        mod_revision,
    }
}

fn convert_event(event: &etcd_client::Event) -> Result<Event, StoreError> {
    let kv = event
        .kv()
        .cloned()
        .map(convert_kv)
        .ok_or_else(|| StoreError::Internal("etcd event without a key".into()))?;
    let prev = event.prev_kv().cloned().map(convert_kv);
    let kind = match event.event_type() {
        EventType::Put => EventKind::Put,
        EventType::Delete => EventKind::Delete,
    };
    Ok(Event { kind, kv, prev })
}
