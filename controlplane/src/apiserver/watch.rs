//! WATCH: a stream of `{"type": ..., "object": ...}` lines fed by a store
//! watch. It starts with the current state as ADDED events (or, given a
//! resourceVersion, replays history after it), honours selectors with
//! ADDED/DELETED on transitions, sends bookmarks when asked, and answers a
//! compacted resourceVersion with an ERROR event carrying 410 Expired.
//!
//! A task per watch writes into a small bounded channel that the response
//! body drains: a slow client slows its own task down and buffers nothing
//! beyond the channel; the store's history is what it falls behind on, and
//! once compaction passes it the watch ends with 410.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::list::{self, Filter};
use super::request::{Answer, Query};
use super::resources::ResourceType;
use super::status::ApiError;
use super::{ApiState, objects};
use crate::storage::{Event, EventKind, Revision, StoreError};

/// Encoded events waiting for a slow client, per watch.
const BUFFER: usize = 64;
const BOOKMARK_EVERY: Duration = Duration::from_secs(60);
/// Upstream's `--min-request-timeout` default: watches end after this
/// (clients reconnect from their last resourceVersion).
const DEFAULT_TIMEOUT_SECS: i64 = 1800;
/// The longest watch a client may ask for (a year).
const MAX_TIMEOUT_SECS: i64 = 365 * 24 * 3600;

struct Plan {
    rt: &'static ResourceType,
    namespace: Option<String>,
    filter: Filter,
    answer: Answer,
    include_object: Query,
    bookmarks: bool,
    initial: bool,
    /// Table watches carry column definitions on their first event only.
    columns_sent: std::sync::atomic::AtomicBool,
    /// Watch from this revision (exclusive); 0 = after the initial list.
    from: Revision,
    timeout: Duration,
}

pub async fn serve(
    state: Arc<ApiState>,
    rt: &'static ResourceType,
    namespace: Option<&str>,
    query: &Query,
    answer: Answer,
) -> Result<Response, ApiError> {
    let filter = Filter::from_query(query)?;
    filter.check_fields(rt)?;
    let rv = match query.get("resourceVersion") {
        None => None,
        Some(v) => Some(
            v.parse::<Revision>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version {v:?}")))?,
        ),
    };
    let send_initial = match query.get("sendInitialEvents") {
        None => None,
        Some(_) => Some(query.flag("sendInitialEvents")?),
    };
    if send_initial == Some(true) && query.get("resourceVersionMatch") != Some("NotOlderThan") {
        return Err(ApiError::invalid_watch(
            "resourceVersionMatch",
            "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
        ));
    }
    let initial = send_initial.unwrap_or(matches!(rv, None | Some(0)));
    // Clamped: the deadline is the current instant plus the timeout, which
    // a value near `i64::MAX` seconds would overflow.
    let timeout = query
        .number("timeoutSeconds")?
        .filter(|t| *t > 0)
        .unwrap_or(DEFAULT_TIMEOUT_SECS)
        .min(MAX_TIMEOUT_SECS);
    let mut include_object = Query::default();
    if let Some(include) = query.get("includeObject") {
        include_object = Query::parse(Some(&format!("includeObject={include}")));
    }
    let plan = Plan {
        rt,
        namespace: namespace.map(str::to_owned),
        filter,
        answer,
        include_object,
        bookmarks: query.flag("allowWatchBookmarks")?,
        initial,
        columns_sent: std::sync::atomic::AtomicBool::new(false),
        from: if initial { 0 } else { rv.unwrap_or(0) },
        timeout: Duration::from_secs(timeout as u64),
    };
    let (tx, rx) = mpsc::channel::<Bytes>(BUFFER);
    tokio::spawn(async move {
        if let Err(e) = run(&state, plan, &tx).await {
            let event = json!({"type": "ERROR", "object": e.to_status()});
            let _ = tx.send(line(&event)).await;
        }
    });
    let body = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, std::convert::Infallible>(chunk), rx))
    });
    Response::builder()
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::CACHE_CONTROL, "no-cache, private")
        .body(Body::from_stream(body))
        .map_err(|e| ApiError::internal(e.to_string()))
}

async fn run(state: &ApiState, plan: Plan, tx: &mpsc::Sender<Bytes>) -> Result<(), ApiError> {
    let rt = plan.rt;
    let deadline = tokio::time::Instant::now() + plan.timeout;
    let mut last = plan.from;
    if plan.initial {
        let page = list::read(
            state.store.as_ref(),
            rt,
            plan.namespace.as_deref(),
            &Query::default(),
            &plan.filter,
        )
        .await?;
        for (stored, revision) in &page.items {
            let chunk = encode_event(&plan, "ADDED", stored, *revision)?;
            if tx.send(chunk).await.is_err() {
                return Ok(());
            }
        }
        last = page.revision;
        if plan.bookmarks {
            let mut bookmark = bookmark(rt, last);
            bookmark["object"]["metadata"]["annotations"] =
                json!({"k8s.io/initial-events-end": "true"});
            if tx.send(line(&bookmark)).await.is_err() {
                return Ok(());
            }
        }
    }
    let prefix = rt.key_prefix(plan.namespace.as_deref());
    let mut events = state
        .store
        .watch(prefix.as_bytes(), last)
        .await
        .map_err(|e| watch_error(e, last))?;
    let mut ticker = tokio::time::interval(BOOKMARK_EVERY);
    ticker.tick().await;
    loop {
        tokio::select! {
            next = events.next() => {
                let event = match next {
                    Some(Ok(event)) => event,
                    Some(Err(e)) => return Err(watch_error(e, last)),
                    None => return Ok(()),
                };
                last = event.revision();
                if let Some(chunk) = translate(&plan, &event)?
                    && tx.send(chunk).await.is_err()
                {
                    return Ok(());
                }
            }
            _ = ticker.tick(), if plan.bookmarks => {
                if tx.send(line(&bookmark(rt, last))).await.is_err() {
                    return Ok(());
                }
            }
            _ = tokio::time::sleep_until(deadline) => return Ok(()),
            _ = tx.closed() => return Ok(()),
        }
    }
}

/// The watch event a store event becomes for this watcher, if any: with
/// selectors, an object moving into the selection is ADDED and one moving
/// out is DELETED.
fn translate(plan: &Plan, event: &Event) -> Result<Option<Bytes>, ApiError> {
    let matches = |bytes: &[u8]| plan.filter.matches_stored(plan.rt, bytes);
    let served = |bytes: &Bytes| objects::served(plan.rt, bytes.clone());
    match event.kind {
        EventKind::Put => {
            let value = served(&event.kv.value);
            let now = matches(&value);
            let before = event.prev.as_ref().map(|p| matches(&served(&p.value)));
            let kind = match (before, now) {
                (None, true) | (Some(false), true) => "ADDED",
                (Some(true), true) => "MODIFIED",
                (Some(true), false) => "DELETED",
                (_, false) => return Ok(None),
            };
            let chunk = encode_event(plan, kind, &value, event.kv.mod_revision)?;
            Ok(Some(chunk))
        }
        EventKind::Delete => {
            let Some(prev) = &event.prev else {
                return Ok(None);
            };
            let prev = served(&prev.value);
            if !matches(&prev) {
                return Ok(None);
            }
            let chunk = encode_event(plan, "DELETED", &prev, event.kv.mod_revision)?;
            Ok(Some(chunk))
        }
    }
}

fn encode_event(
    plan: &Plan,
    kind: &str,
    stored: &[u8],
    revision: Revision,
) -> Result<Bytes, ApiError> {
    let mut out = Vec::with_capacity(stored.len() + 64);
    out.extend_from_slice(b"{\"type\":\"");
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(b"\",\"object\":");
    match plan.answer {
        Answer::Json => objects::write_with_version(&mut out, stored, revision),
        Answer::Metadata => objects::write_partial_metadata(&mut out, stored, revision)?,
        Answer::Table => {
            let object = objects::decode(stored, revision)?;
            let mut table = super::table_for(plan.rt, &[object], &plan.include_object)?;
            table["metadata"] = json!({"resourceVersion": revision.to_string()});
            if plan
                .columns_sent
                .swap(true, std::sync::atomic::Ordering::Relaxed)
                && let Some(map) = table.as_object_mut()
            {
                map.remove("columnDefinitions");
            }
            serde_json::to_writer(&mut out, &table)
                .map_err(|e| ApiError::internal(e.to_string()))?;
        }
    }
    out.extend_from_slice(b"}\n");
    Ok(Bytes::from(out))
}

fn bookmark(rt: &ResourceType, revision: Revision) -> Value {
    json!({
        "type": "BOOKMARK",
        "object": {
            "kind": rt.kind,
            "apiVersion": rt.api_version,
            "metadata": {"resourceVersion": revision.to_string()},
        }
    })
}

fn line(value: &Value) -> Bytes {
    let mut text = value.to_string();
    text.push('\n');
    Bytes::from(text)
}

fn watch_error(error: StoreError, from: Revision) -> ApiError {
    match error {
        StoreError::Compacted { compacted, .. } => {
            ApiError::expired(format!("too old resource version: {from} ({compacted})"))
        }
        StoreError::FutureRevision { requested, current } => ApiError::timeout(format!(
            "Too large resource version: {requested}, current: {current}"
        )),
        StoreError::Unavailable(m) => ApiError::unavailable(m),
        other => ApiError::internal(other.to_string()),
    }
}
