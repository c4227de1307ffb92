//! The store contract, checked the same way against every backend. Each
//! check takes a [`Backend`] (a store it may also restart) and fails with a
//! description of the first broken promise.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use async_trait::async_trait;
use bytes::Bytes;
use controlplane::storage::{
    Event, EventKind, RangeRequest, Revision, Store, StoreError, WatchStream,
};
use futures::StreamExt;

/// A store under test, and a way to close and reopen it from what it
/// persisted.
#[async_trait]
pub trait Backend: Send {
    fn store(&self) -> Arc<dyn Store>;
    /// Closes the store (and for etcd, kills the server) and opens it again.
    async fn restart(&mut self) -> anyhow::Result<()>;
}

/// How long a check waits for an event before calling it lost.
const EVENT_WAIT: Duration = Duration::from_secs(10);

pub async fn crud_and_compare_and_swap(backend: &mut dyn Backend) -> anyhow::Result<()> {
    let store = backend.store();
    let a = store.create(b"/crud/a", val("1")).await?;
    ensure!(a.create_revision == a.mod_revision, "fresh key: {a:?}");
    ensure!(store.current_revision().await? == a.mod_revision);

    let again = store.create(b"/crud/a", val("x")).await;
    ensure!(
        matches!(again, Err(StoreError::AlreadyExists { .. })),
        "second create: {again:?}"
    );

    let a2 = store.update(b"/crud/a", val("2"), a.mod_revision).await?;
    ensure!(a2.mod_revision == a.mod_revision + 1, "gapless: {a2:?}");
    ensure!(
        a2.create_revision == a.create_revision,
        "create kept: {a2:?}"
    );

    match store.update(b"/crud/a", val("3"), a.mod_revision).await {
        Err(StoreError::Conflict {
            current: Some(current),
            ..
        }) => ensure!(*current == a2, "conflict carries the current value"),
        other => bail!("stale update: {other:?}"),
    }
    let missing = store.update(b"/crud/none", val("x"), 1).await;
    ensure!(
        matches!(missing, Err(StoreError::NotFound { .. })),
        "update of a missing key: {missing:?}"
    );
    ensure!(
        store.current_revision().await? == a2.mod_revision,
        "failed writes must not use revisions"
    );

    let stale = store.delete(b"/crud/a", Some(a.mod_revision)).await;
    ensure!(
        matches!(stale, Err(StoreError::Conflict { .. })),
        "stale delete: {stale:?}"
    );
    let deleted = store.delete(b"/crud/a", Some(a2.mod_revision)).await?;
    ensure!(deleted.prev == a2, "delete returns what it removed");
    ensure!(deleted.revision == a2.mod_revision + 1);
    ensure!(
        store.get(b"/crud/a").await?.is_none(),
        "deleted key is gone"
    );
    let gone = store.delete(b"/crud/a", None).await;
    ensure!(
        matches!(gone, Err(StoreError::NotFound { .. })),
        "delete of a missing key: {gone:?}"
    );

    let b = store.create(b"/crud/a", val("new")).await?;
    ensure!(
        b.create_revision == deleted.revision + 1,
        "re-created key: {b:?}"
    );
    let unconditional = store.delete(b"/crud/a", None).await?;
    ensure!(unconditional.prev == b);
    Ok(())
}

pub async fn oversized_values_are_refused(backend: &mut dyn Backend) -> anyhow::Result<()> {
    let store = backend.store();
    let before = store.current_revision().await?;
    let big = Bytes::from(vec![b'x'; controlplane::storage::MAX_VALUE_BYTES + 1]);
    let refused = store.create(b"/big/a", big).await;
    ensure!(
        matches!(refused, Err(StoreError::ValueTooLarge { .. })),
        "oversized create: {refused:?}"
    );
    ensure!(store.get(b"/big/a").await?.is_none(), "nothing written");
    ensure!(store.current_revision().await? == before);
    let fits = Bytes::from(vec![b'x'; 1024 * 1024]);
    let kv = store.create(b"/big/a", fits.clone()).await?;
    ensure!(store.get(b"/big/a").await?.map(|kv| kv.value) == Some(fits));
    ensure!(kv.mod_revision == before + 1);
    Ok(())
}

pub async fn range_pages_and_past_revisions(backend: &mut dyn Backend) -> anyhow::Result<()> {
    let store = backend.store();
    for i in 0..25 {
        store
            .create(format!("/range/k{i:02}").as_bytes(), val("v1"))
            .await?;
    }
    store.create(b"/rangeX/outside", val("no")).await?;
    let snapshot = store.current_revision().await?;
    let k00 = store.get(b"/range/k00").await?.context("k00")?;
    store
        .update(b"/range/k00", val("v2"), k00.mod_revision)
        .await?;
    store.delete(b"/range/k01", None).await?;
    store.create(b"/range/k99", val("late")).await?;

    let now = store.range(range("/range/", 0, None, 0)).await?;
    ensure!(now.kvs.len() == 25, "25 keys now, got {}", now.kvs.len());
    ensure!(now.count == 25 && !now.more);
    ensure!(now.revision == store.current_revision().await?);
    ensure!(now.kvs[0].value == val("v2"));
    ensure!(now.kvs.iter().all(|kv| kv.key.starts_with(b"/range/")));
    ensure!(now.kvs.windows(2).all(|w| w[0].key < w[1].key), "key order");

    let past = store.range(range("/range/", 0, None, snapshot)).await?;
    let keys: Vec<_> = past.kvs.iter().map(|kv| kv.key.clone()).collect();
    ensure!(past.kvs.len() == 25, "25 keys at the snapshot");
    ensure!(past.kvs[0].value == val("v1"), "old value at the snapshot");
    ensure!(
        keys.contains(&Bytes::from_static(b"/range/k01")),
        "deleted key was there"
    );
    ensure!(
        !keys.contains(&Bytes::from_static(b"/range/k99")),
        "later key was not"
    );

    // Pages of 10 at the snapshot, continuing after the last key seen.
    let mut seen = Vec::new();
    let mut start = None;
    loop {
        let page = store
            .range(range("/range/", 10, start.clone(), snapshot))
            .await?;
        ensure!(page.kvs.len() <= 10);
        seen.extend(page.kvs.iter().map(|kv| kv.key.clone()));
        if !page.more {
            break;
        }
        ensure!(page.count > page.kvs.len(), "count ignores the limit");
        let last = page.kvs.last().context("a page with more has keys")?;
        let mut next = last.key.to_vec();
        next.push(0);
        start = Some(Bytes::from(next));
    }
    ensure!(seen == keys, "pages add up to the whole range");

    let future = store
        .range(range("/range/", 0, None, snapshot + 1000))
        .await;
    ensure!(
        matches!(future, Err(StoreError::FutureRevision { .. })),
        "read in the future: {future:?}"
    );
    Ok(())
}

pub async fn watch_replays_then_follows(backend: &mut dyn Backend) -> anyhow::Result<()> {
    let store = backend.store();
    let first = store.create(b"/watch/a", val("1")).await?;
    let from = first.mod_revision;
    store.update(b"/watch/a", val("2"), from).await?;
    store.create(b"/other/x", val("skip me")).await?;
    store.create(b"/watch/b", val("1")).await?;
    store.delete(b"/watch/a", None).await?;

    let mut watch = store.watch(b"/watch/", from).await?;
    let replayed = next_events(&mut watch, 3).await?;
    check_event(
        &replayed[0],
        EventKind::Put,
        "/watch/a",
        Some("2"),
        Some("1"),
    )?;
    check_event(&replayed[1], EventKind::Put, "/watch/b", Some("1"), None)?;
    check_event(&replayed[2], EventKind::Delete, "/watch/a", None, Some("2"))?;
    ensure!(replayed[0].revision() == from + 1);
    ensure!(replayed[2].revision() == from + 4);

    let live = store.create(b"/watch/c", val("live")).await?;
    store.create(b"/other/y", val("skip me")).await?;
    let b = store.get(b"/watch/b").await?.context("b")?;
    store.update(b"/watch/b", val("2"), b.mod_revision).await?;
    let followed = next_events(&mut watch, 2).await?;
    check_event(&followed[0], EventKind::Put, "/watch/c", Some("live"), None)?;
    ensure!(followed[0].revision() == live.mod_revision);
    check_event(
        &followed[1],
        EventKind::Put,
        "/watch/b",
        Some("2"),
        Some("1"),
    )?;

    let mut fresh = store.watch(b"/watch/", 0).await?;
    let c = store.delete(b"/watch/c", None).await?;
    let only_new = next_events(&mut fresh, 1).await?;
    ensure!(
        only_new[0].revision() == c.revision,
        "watch from 0 starts now"
    );
    Ok(())
}

/// Many writes, watched whole: events arrive gapless, in order, exactly
/// once, also across a watch restarted from the last revision it saw.
pub async fn watch_is_gapless_and_resumable(backend: &mut dyn Backend) -> anyhow::Result<()> {
    let store = backend.store();
    let start = store.current_revision().await?;
    let mut watch = store.watch(b"/gapless/", start).await?;
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..400 {
                let key = format!("/gapless/{}", i % 37);
                match store.get(key.as_bytes()).await? {
                    Some(kv) => {
                        store
                            .update(key.as_bytes(), val("u"), kv.mod_revision)
                            .await?
                    }
                    None => store.create(key.as_bytes(), val("c")).await?,
                };
            }
            anyhow::Ok(())
        })
    };
    let half = next_events(&mut watch, 200).await?;
    drop(watch);
    let resume_at = half.last().context("events")?.revision();
    let mut resumed = store.watch(b"/gapless/", resume_at).await?;
    let rest = next_events(&mut resumed, 200).await?;
    writer.await??;
    let revisions: Vec<Revision> = half.iter().chain(&rest).map(Event::revision).collect();
    let expected: Vec<Revision> = (start + 1..=start + 400).collect();
    ensure!(revisions == expected, "events are gapless and in order");
    Ok(())
}

/// Sixteen writers increment one counter with read-compare-and-swap loops;
/// no increment may be lost.
pub async fn concurrent_increments_lose_nothing(backend: &mut dyn Backend) -> anyhow::Result<()> {
    const WRITERS: usize = 16;
    const EACH: usize = 40;
    let store = backend.store();
    store.create(b"/counter", val("0")).await?;
    let mut tasks = Vec::new();
    for _ in 0..WRITERS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0usize;
            for _ in 0..EACH {
                let mut current = store.get(b"/counter").await?.context("counter")?;
                loop {
                    let n: u64 = std::str::from_utf8(&current.value)?.parse()?;
                    let next = Bytes::from((n + 1).to_string());
                    match store.update(b"/counter", next, current.mod_revision).await {
                        Ok(_) => break,
                        Err(StoreError::Conflict {
                            current: Some(now), ..
                        }) => {
                            conflicts += 1;
                            current = *now;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            anyhow::Ok(conflicts)
        }));
    }
    let mut conflicts = 0;
    for task in tasks {
        conflicts += task.await??;
    }
    let total = store.get(b"/counter").await?.context("counter")?;
    ensure!(
        total.value == (WRITERS * EACH).to_string(),
        "counter is {:?} after {} increments ({conflicts} conflicts retried)",
        total.value,
        WRITERS * EACH
    );
    Ok(())
}

pub async fn compaction_forgets_history(backend: &mut dyn Backend) -> anyhow::Result<()> {
    let store = backend.store();
    let a = store.create(b"/compact/a", val("1")).await?;
    store
        .update(b"/compact/a", val("2"), a.mod_revision)
        .await?;
    store.create(b"/compact/gone", val("x")).await?;
    store.delete(b"/compact/gone", None).await?;
    let at = store.create(b"/compact/b", val("1")).await?.mod_revision;
    store.create(b"/compact/c", val("after")).await?;
    store.compact(at).await?;

    let old = store.range(range("/compact/", 0, None, at - 1)).await;
    ensure!(
        matches!(old, Err(StoreError::Compacted { .. })),
        "read before the compaction: {old:?}"
    );
    let kept = store.range(range("/compact/", 0, None, at)).await?;
    let keys: Vec<_> = kept.kvs.iter().map(|kv| kv.key.clone()).collect();
    ensure!(
        keys == [
            Bytes::from_static(b"/compact/a"),
            Bytes::from_static(b"/compact/b")
        ],
        "latest versions survive the compaction: {keys:?}"
    );
    ensure!(kept.kvs[0].value == val("2"));

    match store.watch(b"/compact/", at - 1).await {
        Err(StoreError::Compacted { .. }) => {}
        Err(other) => bail!("watch from before the compaction: {other}"),
        Ok(mut stream) => match tokio::time::timeout(EVENT_WAIT, stream.next()).await {
            Ok(Some(Err(StoreError::Compacted { .. }))) => {}
            other => bail!("watch from before the compaction yielded {other:?}"),
        },
    }
    let mut watch = store.watch(b"/compact/", at).await?;
    let after = next_events(&mut watch, 1).await?;
    check_event(&after[0], EventKind::Put, "/compact/c", Some("after"), None)?;
    Ok(())
}

/// Everything acknowledged is there after a restart, and revisions go on
/// growing from where they were.
pub async fn restart_keeps_everything(backend: &mut dyn Backend) -> anyhow::Result<()> {
    let store = backend.store();
    for i in 0..50 {
        store
            .create(format!("/durable/{i}").as_bytes(), val("v"))
            .await?;
    }
    let x = store.create(b"/durable/x", val("1")).await?;
    store
        .update(b"/durable/x", val("2"), x.mod_revision)
        .await?;
    store.delete(b"/durable/0", None).await?;
    let before = store.current_revision().await?;
    let listing = store.range(range("/durable/", 0, None, 0)).await?;
    drop(store);

    backend.restart().await?;
    let store = backend.store();
    ensure!(
        store.current_revision().await? == before,
        "revision survives"
    );
    let again = store.range(range("/durable/", 0, None, 0)).await?;
    ensure!(
        again.kvs == listing.kvs,
        "every key, value and revision survives"
    );
    let next = store.create(b"/durable/after", val("v")).await?;
    ensure!(next.mod_revision == before + 1, "revisions continue");
    let mut watch = store.watch(b"/durable/x", x.mod_revision).await?;
    let history = next_events(&mut watch, 1).await?;
    check_event(
        &history[0],
        EventKind::Put,
        "/durable/x",
        Some("2"),
        Some("1"),
    )?;
    Ok(())
}

fn val(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn range(prefix: &str, limit: usize, start: Option<Bytes>, revision: Revision) -> RangeRequest {
    RangeRequest {
        prefix: val(prefix),
        start,
        limit,
        revision,
    }
}

async fn next_events(watch: &mut WatchStream, n: usize) -> anyhow::Result<Vec<Event>> {
    let mut events = Vec::with_capacity(n);
    while events.len() < n {
        match tokio::time::timeout(EVENT_WAIT, watch.next()).await {
            Ok(Some(Ok(event))) => events.push(event),
            Ok(Some(Err(e))) => bail!("watch failed after {} events: {e}", events.len()),
            Ok(None) => bail!("watch ended after {} events", events.len()),
            Err(_) => bail!("no event within {EVENT_WAIT:?} after {}", events.len()),
        }
    }
    Ok(events)
}

fn check_event(
    event: &Event,
    kind: EventKind,
    key: &str,
    value: Option<&str>,
    prev: Option<&str>,
) -> anyhow::Result<()> {
    ensure!(event.kind == kind, "kind of {event:?}");
    ensure!(event.kv.key == key.as_bytes(), "key of {event:?}");
    if let Some(value) = value {
        ensure!(event.kv.value == value.as_bytes(), "value of {event:?}");
    }
    let prev_value = event.prev.as_ref().map(|p| p.value.clone());
    ensure!(
        prev_value.as_deref() == prev.map(str::as_bytes),
        "previous value of {event:?}"
    );
    Ok(())
}
