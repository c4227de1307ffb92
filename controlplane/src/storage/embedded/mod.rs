//! The default backend: a SQLite revision log on disk with the whole picture
//! in memory ([`index`]) so that reads and watches never touch disk.
//!
//! All writes go through one writer thread. It takes every write that is
//! waiting, checks each against the index (and the ones before it in the
//! batch), appends the batch to the log in one transaction — one fsync for
//! all of them — then applies it to the index and wakes watchers. Concurrent
//! writers therefore share fsyncs (group commit) and revisions stay gapless.
//! Checkpoints of the log wait for a pause in writes (see [`log`]), run
//! at a low priority, and give way to the next write.

mod index;
mod log;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use self::index::{Index, WriteOp};
use self::log::{Checkpoint, Checkpointed, Log};
use super::{
    Deleted, Event, KeyValue, RangeRequest, RangeResponse, Revision, Store, StoreError,
    WatchStream, check_key, check_value,
};

/// Writes taken into one transaction at most.
const MAX_BATCH: usize = 1024;
/// Writes waiting for the writer before callers wait to enqueue.
const QUEUE_DEPTH: usize = 8192;
/// Events a watcher takes from the index per lock.
const WATCH_CHUNK: usize = 256;
/// A pause in writes this long lets a due checkpoint run. Under a closed
/// loop of writers the queue is briefly empty after every commit, so an
/// empty queue alone is no pause.
const IDLE: Duration = Duration::from_millis(100);
/// The nice value of a checkpoint run aside: well behind request serving,
/// yet near enough that, where its priority cannot be raised back, an
/// interrupted one soon gets a CPU to stop on.
const CHECKPOINT_NICE: libc::c_int = 10;

pub struct EmbeddedStore {
    index: Arc<RwLock<Index>>,
    requests: Option<mpsc::Sender<Request>>,
    /// Watchers wait on this; it carries the latest applied revision.
    applied: watch::Receiver<Revision>,
    writer: Option<JoinHandle<()>>,
}

enum Request {
    Write {
        op: WriteOp,
        reply: oneshot::Sender<Result<Event, StoreError>>,
    },
    Compact {
        revision: Revision,
        reply: oneshot::Sender<Result<(), StoreError>>,
    },
}

impl EmbeddedStore {
    /// Opens the store in `path` (a SQLite file, created if missing) and
    /// loads it into memory.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let log = Log::open(path)?;
        let loaded = log.load()?;
        let index = Index::load(loaded.rows, loaded.compacted)?;
        let revision = index.revision();
        let index = Arc::new(RwLock::new(index));
        let (requests, queue) = mpsc::channel(QUEUE_DEPTH);
        let (applied_tx, applied) = watch::channel(revision);
        let writer = Writer {
            log,
            index: index.clone(),
            applied: applied_tx,
            queue,
        };
        let writer = std::thread::Builder::new()
            .name("skiff-store-writer".into())
            .spawn(move || writer.run())
            .map_err(|e| StoreError::Internal(format!("starting the writer thread: {e}")))?;
        tracing::info!(path = %path.display(), revision, "embedded store opened");
        Ok(EmbeddedStore {
            index,
            requests: Some(requests),
            applied,
            writer: Some(writer),
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, Index> {
        read_index(&self.index)
    }

    async fn write(&self, op: WriteOp) -> Result<Event, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Write { op, reply }).await?;
        answer.await.map_err(|_| writer_gone())?
    }

    async fn send(&self, request: Request) -> Result<(), StoreError> {
        let requests = self.requests.as_ref().ok_or_else(writer_gone)?;
        requests.send(request).await.map_err(|_| writer_gone())
    }
}

impl Drop for EmbeddedStore {
    /// Closes the queue and waits for the writer to finish what it took, so
    /// the file is closed (and its lock released) when this returns.
    fn drop(&mut self) {
        self.requests = None;
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!("store writer thread panicked");
        }
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn current_revision(&self) -> Result<Revision, StoreError> {
        Ok(self.read().revision())
    }

    async fn get(&self, key: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        Ok(self.read().get(key))
    }

    async fn create(&self, key: &[u8], value: Bytes) -> Result<KeyValue, StoreError> {
        check_key(key)?;
        check_value(&value)?;
        let key = Bytes::copy_from_slice(key);
        Ok(self.write(WriteOp::Create { key, value }).await?.kv)
    }

    async fn update(
        &self,
        key: &[u8],
        value: Bytes,
        expected: Revision,
    ) -> Result<KeyValue, StoreError> {
        check_key(key)?;
        check_value(&value)?;
        let key = Bytes::copy_from_slice(key);
        let op = WriteOp::Update {
            key,
            value,
            expected,
        };
        Ok(self.write(op).await?.kv)
    }

    async fn delete(&self, key: &[u8], expected: Option<Revision>) -> Result<Deleted, StoreError> {
        check_key(key)?;
        let key = Bytes::copy_from_slice(key);
        let event = self.write(WriteOp::Delete { key, expected }).await?;
        let prev = event
            .prev
            .ok_or_else(|| StoreError::Internal("delete without a previous value".into()))?;
        Ok(Deleted {
            revision: event.kv.mod_revision,
            prev,
        })
    }

    async fn range(&self, request: RangeRequest) -> Result<RangeResponse, StoreError> {
        self.read().range(&request)
    }

    async fn watch(&self, prefix: &[u8], from: Revision) -> Result<WatchStream, StoreError> {
        let cursor = {
            let index = self.read();
            match from {
                0 => index.revision(),
                from if from < index.compacted() => {
                    return Err(StoreError::Compacted {
                        requested: from,
                        compacted: index.compacted(),
                    });
                }
                from if from > index.revision() => {
                    return Err(StoreError::FutureRevision {
                        requested: from,
                        current: index.revision(),
                    });
                }
                from => from,
            }
        };
        let watcher = Watcher {
            index: self.index.clone(),
            applied: self.applied.clone(),
            prefix: Bytes::copy_from_slice(prefix),
            cursor,
            ready: Vec::new(),
        };
        Ok(Box::pin(futures::stream::unfold(watcher, Watcher::next)))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.send(Request::Compact { revision, reply }).await?;
        answer.await.map_err(|_| writer_gone())?
    }
}

/// The writer thread's state.
struct Writer {
    log: Log,
    index: Arc<RwLock<Index>>,
    applied: watch::Sender<Revision>,
    queue: mpsc::Receiver<Request>,
}

/// A write accepted into the current batch, waiting for the commit.
struct Accepted {
    event: Event,
    reply: oneshot::Sender<Result<Event, StoreError>>,
}

impl Writer {
    fn run(mut self) {
        // Only to wait for the queue with a timeout; nothing is spawned.
        let timer = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(timer) => Some(timer),
            Err(e) => {
                tracing::warn!(error = %e, "store writer has no timer; checkpoints run in line");
                None
            }
        };
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = self.next_request(timer.as_ref()) {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match self.queue.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            self.process(&mut batch);
            if self.log.checkpoint_due() == Checkpoint::Now {
                self.checkpoint();
            }
        }
    }

    /// The next request; `None` once the store is closed. While a
    /// checkpoint is due, a pause of [`IDLE`] in writes runs it first.
    fn next_request(&mut self, timer: Option<&tokio::runtime::Runtime>) -> Option<Request> {
        let due = self.log.checkpoint_due();
        match timer {
            Some(timer) if due != Checkpoint::No => {
                // The timeout is made inside the runtime: it needs its timer.
                let next =
                    timer.block_on(async { tokio::time::timeout(IDLE, self.queue.recv()).await });
                match next {
                    Ok(next) => return next,
                    Err(_) => {
                        if let Some(arrived) = self.checkpoint_aside(timer) {
                            return arrived;
                        }
                    }
                }
            }
            None if due != Checkpoint::No => self.checkpoint(),
            _ => {}
        }
        self.queue.blocking_recv()
    }

    fn checkpoint(&mut self) {
        report_checkpoint(self.log.checkpoint());
    }

    /// Runs a due checkpoint on a thread of its own at a low CPU priority,
    /// so that the reads being served keep the CPUs: in the API bench, the
    /// checkpoint after 6,400 creates slowed the gets that followed for
    /// 60-80 ms. A request that arrives meanwhile interrupts it and
    /// is returned; SQLite keeps the WAL whole, and the next pause tries
    /// again. `None` when the checkpoint ran to its end undisturbed.
    fn checkpoint_aside(&mut self, timer: &tokio::runtime::Runtime) -> Option<Option<Request>> {
        let interrupt = self.log.interrupt_handle();
        // SAFETY: a plain system call on this thread's own id.
        let writer_nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, own_tid() as libc::id_t) };
        let worker_tid = AtomicI32::new(0);
        let (finished, done) = oneshot::channel::<()>();
        let Writer { log, queue, .. } = self;
        let ran = std::thread::scope(|scope| {
            let tid = &worker_tid;
            let worker = std::thread::Builder::new()
                .name("skiff-store-ckpt".into())
                .spawn_scoped(scope, move || {
                    tid.store(own_tid(), Ordering::Release);
                    set_own_nice(CHECKPOINT_NICE);
                    let outcome = log.checkpoint();
                    let _ = finished.send(());
                    outcome
                })?;
            let arrived = timer.block_on(async {
                tokio::select! {
                    biased;
                    _ = done => None,
                    next = queue.recv() => Some(next),
                }
            });
            if arrived.is_some() {
                // Back to the writer's priority, where allowed, so that it
                // stops promptly; and interrupt until it has stopped, as an
                // interrupt before its statement starts is forgotten.
                let tid = worker_tid.load(Ordering::Acquire);
                if tid != 0 {
                    // SAFETY: a plain system call on a thread of this process.
                    let _ = unsafe {
                        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, writer_nice)
                    };
                }
                while !worker.is_finished() {
                    interrupt.interrupt();
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
            match worker.join() {
                Ok(outcome) => report_checkpoint(outcome),
                Err(_) => tracing::error!("store checkpoint thread panicked"),
            }
            Ok::<_, std::io::Error>(arrived)
        });
        match ran {
            Ok(arrived) => arrived,
            Err(e) => {
                tracing::warn!(error = %e, "no thread for a checkpoint aside; checkpointing in line");
                self.checkpoint();
                None
            }
        }
    }

    /// Commits the writes of `batch` together; a compaction in the middle
    /// commits what came before it first, so order is kept.
    fn process(&mut self, batch: &mut Vec<Request>) {
        let mut accepted: Vec<Accepted> = Vec::new();
        let mut pending: HashMap<Bytes, Option<KeyValue>> = HashMap::new();
        let mut next = read_index(&self.index).revision() + 1;
        for request in batch.drain(..) {
            match request {
                Request::Write { op, reply } => {
                    let prepared = read_index(&self.index).prepare(op, next, &pending);
                    match prepared {
                        Ok(event) => {
                            let latest = match event.kind {
                                super::EventKind::Put => Some(event.kv.clone()),
                                super::EventKind::Delete => None,
                            };
                            pending.insert(event.kv.key.clone(), latest);
                            next += 1;
                            accepted.push(Accepted { event, reply });
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Request::Compact { revision, reply } => {
                    self.commit(&mut accepted);
                    pending.clear();
                    next = read_index(&self.index).revision() + 1;
                    let _ = reply.send(self.compact(revision));
                }
            }
        }
        self.commit(&mut accepted);
    }

    fn commit(&mut self, accepted: &mut Vec<Accepted>) {
        if accepted.is_empty() {
            return;
        }
        let rows: Vec<_> = accepted.iter().map(|a| a.event.to_row()).collect();
        if let Err(e) = self.log.append(&rows) {
            tracing::error!(error = %e, writes = rows.len(), "store commit failed");
            for a in accepted.drain(..) {
                let _ = a.reply.send(Err(StoreError::Internal(e.to_string())));
            }
            return;
        }
        let mut last = 0;
        {
            let mut index = self.index.write().unwrap_or_else(|p| p.into_inner());
            for a in accepted.iter() {
                last = a.event.revision();
                index.apply(a.event.clone());
            }
        }
        self.applied.send_replace(last);
        for a in accepted.drain(..) {
            let _ = a.reply.send(Ok(a.event));
        }
    }

    fn compact(&mut self, revision: Revision) -> Result<(), StoreError> {
        let doomed = {
            let index = read_index(&self.index);
            if revision > index.revision() {
                return Err(StoreError::FutureRevision {
                    requested: revision,
                    current: index.revision(),
                });
            }
            if revision <= index.compacted() {
                return Err(StoreError::Compacted {
                    requested: revision,
                    compacted: index.compacted(),
                });
            }
            index.compactable(revision)
        };
        self.log.compact(revision, &doomed)?;
        self.index
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .compact(revision);
        tracing::debug!(revision, removed = doomed.len(), "store compacted");
        Ok(())
    }
}

/// A watch: a cursor into the index's event log that waits for the writer
/// when it has caught up. It holds no buffer beyond one chunk, so a slow
/// consumer costs nothing until compaction overtakes it.
struct Watcher {
    index: Arc<RwLock<Index>>,
    applied: watch::Receiver<Revision>,
    prefix: Bytes,
    cursor: Revision,
    /// Events read but not yet yielded, in reverse order.
    ready: Vec<Event>,
}

impl Watcher {
    async fn next(mut self) -> Option<(Result<Event, StoreError>, Self)> {
        loop {
            if let Some(event) = self.ready.pop() {
                return Some((Ok(event), self));
            }
            if self.cursor == i64::MIN {
                return None;
            }
            // Mark the current revision seen before reading, so a write
            // applied after the read still wakes us.
            self.applied.borrow_and_update();
            let read = read_index(&self.index).events_after(&self.prefix, self.cursor, WATCH_CHUNK);
            match read {
                Ok((mut events, scanned)) => {
                    self.cursor = scanned;
                    if !events.is_empty() {
                        events.reverse();
                        self.ready = events;
                        continue;
                    }
                }
                Err(e) => {
                    self.cursor = i64::MIN;
                    return Some((Err(e), self));
                }
            }
            if self.applied.changed().await.is_err() {
                self.cursor = i64::MIN;
                return Some((Err(writer_gone()), self));
            }
        }
    }
}

fn report_checkpoint(outcome: Result<Checkpointed, StoreError>) {
    match outcome {
        Ok(Checkpointed::Done) => {}
        Ok(Checkpointed::Interrupted) => {
            tracing::debug!("store log checkpoint interrupted by a request; it stays due");
        }
        // The WAL keeps every commit; a later checkpoint retries.
        Err(e) => tracing::warn!(error = %e, "store log checkpoint failed"),
    }
}

fn own_tid() -> i32 {
    // SAFETY: gettid has no preconditions and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// Lowers this thread's CPU priority (raising the nice value needs no
/// privilege).
fn set_own_nice(nice: libc::c_int) {
    // SAFETY: a plain system call on this thread's own id.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, own_tid() as libc::id_t, nice) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "checkpoint keeps the default priority");
    }
}

fn read_index(index: &RwLock<Index>) -> RwLockReadGuard<'_, Index> {
    // A panic while holding the lock cannot leave the index half-updated in
    // a way later reads would misread more than failing would, so keep going.
    index.read().unwrap_or_else(|p| p.into_inner())
}

fn writer_gone() -> StoreError {
    StoreError::Unavailable("the store is closed".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_during_an_idle_checkpoint_commit_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let key = |i: usize| format!("/registry/configmaps/default/c{i}").into_bytes();
        let store = EmbeddedStore::open(&path).unwrap();
        let value = Bytes::from(vec![b'x'; 2_000]);
        // 5 MB: a checkpoint is due once writes pause.
        for i in 0..2_500 {
            store.create(&key(i), value.clone()).await.unwrap();
        }
        // The pause starts the checkpoint aside; these writes arrive while
        // it runs (or after it), and each must commit either way.
        tokio::time::sleep(IDLE + Duration::from_millis(2)).await;
        for i in 2_500..2_600 {
            store.create(&key(i), value.clone()).await.unwrap();
        }
        drop(store);
        let reopened = EmbeddedStore::open(&path).unwrap();
        let all = reopened
            .range(RangeRequest {
                prefix: Bytes::from_static(b"/registry/configmaps/"),
                ..RangeRequest::default()
            })
            .await
            .unwrap();
        assert_eq!(all.count, 2_600);
    }
}
