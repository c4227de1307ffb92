//! The scheduler: assigns each pending pod that names the default
//! scheduler to a node, through the API like upstream's kube-scheduler.
//!
//! One task owns all state. It follows nodes and pods with kube watchers
//! (listing once, then watching) into a [`cache::Cache`] of nodes and of
//! what bound pods take, takes pods from a priority [`queue::Queue`], runs
//! the [`algorithm`] (filter → score → pick) against the cache, assumes
//! the result into the cache at once and binds through `pods/binding` in
//! a spawned task, so that many binds are in flight while the next pods
//! are decided. A bind that fails is forgotten and retried after a
//! back-off; a pod that fits nowhere gets a `FailedScheduling` Event and
//! `PodScheduled=False`, and waits for a node or pod change.

mod algorithm;
mod cache;
mod pod;
pub mod quantity;
mod queue;
mod selector;
mod volumes;
mod writer;

use std::collections::HashSet;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::jiff::Timestamp;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, watcher};
use tokio::sync::mpsc;

use self::algorithm::{Algorithm, Decision};
use self::cache::{Cache, NodeChange};
use self::pod::{PodInfo, pod_uid};
use self::queue::{Queue, Reported};
use self::volumes::Volumes;
use self::writer::{Failure, SCHEDULER_NAME, Writer, event_name};

/// Binds in flight at most: enough for the store to commit many in one
/// transaction, few enough to bound memory.
const MAX_BINDS_IN_FLIGHT: usize = 1024;
/// Pods decided per turn of the loop before watches are read again.
const BATCH: usize = 64;
/// How often pods whose back-off ended move to the active queue.
const BACKOFF_TICK: Duration = Duration::from_millis(100);
/// How often pods parked for too long are looked for.
const PARKED_TICK: Duration = Duration::from_secs(30);

/// A bind's outcome, back from its task.
struct BindDone {
    info: Arc<PodInfo>,
    result: Result<(), kube::Error>,
}

struct Scheduler {
    writer: Writer,
    cache: Cache,
    volumes: Volumes,
    queue: Queue,
    algorithm: Algorithm,
    done_tx: mpsc::UnboundedSender<BindDone>,
    in_flight: usize,
    nodes_synced: bool,
    pods_synced: bool,
    /// Objects seen since a watcher (re)started its list, to drop those
    /// that went away while it was not watching.
    nodes_listed: Option<HashSet<String>>,
    pods_listed: Option<HashSet<String>>,
}

/// Runs the scheduler until the process ends.
pub async fn run(client: kube::Client) {
    let (done_tx, mut done_rx) = mpsc::unbounded_channel();
    let mut scheduler = Scheduler {
        writer: Writer::new(client.clone()),
        cache: Cache::default(),
        volumes: Volumes::default(),
        queue: Queue::default(),
        algorithm: Algorithm::default(),
        done_tx,
        in_flight: 0,
        nodes_synced: false,
        pods_synced: false,
        nodes_listed: None,
        pods_listed: None,
    };
    // Fused: a watch that ended (it should not) stays quiet.
    let mut nodes = pin!(
        watcher(Api::<Node>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .fuse()
    );
    let mut pods = pin!(
        watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
            .default_backoff()
            .fuse()
    );
    let mut claims = pin!(
        watcher(
            Api::<PersistentVolumeClaim>::all(client.clone()),
            watcher::Config::default()
        )
        .default_backoff()
        .fuse()
    );
    let mut volumes = pin!(
        watcher(
            Api::<PersistentVolume>::all(client.clone()),
            watcher::Config::default()
        )
        .default_backoff()
        .fuse()
    );
    let mut classes = pin!(
        watcher(Api::<StorageClass>::all(client), watcher::Config::default())
            .default_backoff()
            .fuse()
    );
    let mut backoff_tick = tokio::time::interval(BACKOFF_TICK);
    backoff_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut parked_tick = tokio::time::interval(PARKED_TICK);
    parked_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    tracing::info!("scheduler started");
    loop {
        let can_schedule = scheduler.nodes_synced
            && scheduler.pods_synced
            && scheduler.in_flight < MAX_BINDS_IN_FLIGHT
            && scheduler.queue.has_active();
        tokio::select! {
            Some(event) = nodes.next() => scheduler.on_node(event),
            Some(event) = pods.next() => scheduler.on_pod(event),
            Some(event) = claims.next() => scheduler.on_volume_event(event, Volumes::apply_claim, Volumes::delete_claim),
            Some(event) = volumes.next() => scheduler.on_volume_event(event, Volumes::apply_volume, Volumes::delete_volume),
            Some(event) = classes.next() => scheduler.on_volume_event(event, Volumes::apply_class, Volumes::delete_class),
            Some(done) = done_rx.recv() => scheduler.on_bound(done),
            _ = backoff_tick.tick() => scheduler.queue.flush_backoff(Instant::now()),
            _ = parked_tick.tick() => scheduler.queue.flush_parked(Instant::now()),
            () = std::future::ready(()), if can_schedule => scheduler.schedule_batch(),
        }
    }
}

impl Scheduler {
    fn on_node(&mut self, event: Result<watcher::Event<Node>, watcher::Error>) {
        let now = Instant::now();
        match event {
            Ok(watcher::Event::Apply(node)) => self.apply_node(node, now),
            Ok(watcher::Event::InitApply(node)) => {
                if let Some(listed) = &mut self.nodes_listed {
                    listed.insert(node.metadata.name.clone().unwrap_or_default());
                }
                self.apply_node(node, now);
            }
            Ok(watcher::Event::Delete(node)) => {
                self.cache
                    .remove_node(node.metadata.name.as_deref().unwrap_or_default());
            }
            Ok(watcher::Event::Init) => self.nodes_listed = Some(HashSet::new()),
            Ok(watcher::Event::InitDone) => {
                let listed = self.nodes_listed.take().unwrap_or_default();
                let gone: Vec<String> = self
                    .cache
                    .node_names()
                    .filter(|n| !listed.contains(*n))
                    .map(str::to_owned)
                    .collect();
                for name in gone {
                    self.cache.remove_node(&name);
                }
                self.nodes_synced = true;
                tracing::info!(nodes = self.cache.present.len(), "scheduler: nodes listed");
            }
            Err(e) => tracing::warn!(error = %e, "scheduler: node watch failed; retrying"),
        }
    }

    fn apply_node(&mut self, node: Node, now: Instant) {
        if self.cache.upsert_node(node) != NodeChange::Unchanged {
            // Pods that fit nowhere may fit on this node now.
            self.queue.unpark_all(now);
        }
    }

    /// A claim, volume or class changed: pods waiting on one may fit now.
    /// (A relist leaves objects deleted meanwhile in place; they only
    /// matter until the pods that name them go.)
    fn on_volume_event<K>(
        &mut self,
        event: Result<watcher::Event<K>, watcher::Error>,
        apply: fn(&mut Volumes, &K),
        delete: fn(&mut Volumes, &K),
    ) {
        match event {
            Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                apply(&mut self.volumes, &o)
            }
            Ok(watcher::Event::Delete(o)) => delete(&mut self.volumes, &o),
            Ok(watcher::Event::Init | watcher::Event::InitDone) => return,
            Err(e) => {
                tracing::warn!(error = %e, "scheduler: volume watch failed; retrying");
                return;
            }
        }
        self.queue.unpark_all(Instant::now());
    }

    fn on_pod(&mut self, event: Result<watcher::Event<Pod>, watcher::Error>) {
        let now = Instant::now();
        match event {
            Ok(watcher::Event::Apply(pod)) => self.apply_pod(&pod, now),
            Ok(watcher::Event::InitApply(pod)) => {
                if let Some(listed) = &mut self.pods_listed {
                    listed.insert(pod_uid(&pod));
                }
                self.apply_pod(&pod, now);
            }
            Ok(watcher::Event::Delete(pod)) => self.delete_pod(&pod_uid(&pod), now),
            Ok(watcher::Event::Init) => self.pods_listed = Some(HashSet::new()),
            Ok(watcher::Event::InitDone) => {
                let listed = self.pods_listed.take().unwrap_or_default();
                let gone: Vec<String> = self
                    .cache
                    .bound_uids()
                    .filter(|uid| !listed.contains(*uid))
                    .cloned()
                    .collect();
                for uid in gone {
                    self.delete_pod(&uid, now);
                }
                self.queue.retain(|uid| listed.contains(uid));
                self.pods_synced = true;
                tracing::info!(
                    bound = self.cache.bound_pods().count(),
                    pending = self.queue.len(),
                    "scheduler: pods listed"
                );
            }
            Err(e) => tracing::warn!(error = %e, "scheduler: pod watch failed; retrying"),
        }
    }

    fn apply_pod(&mut self, pod: &Pod, now: Instant) {
        let uid = pod_uid(pod);
        let spec = pod.spec.as_ref();
        let node = spec
            .and_then(|s| s.node_name.as_deref())
            .filter(|n| !n.is_empty());
        let terminal = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Succeeded" || p == "Failed");
        if let Some(node) = node {
            // Bound (by us or anyone): it only takes room now.
            self.queue.remove(&uid);
            if terminal {
                // A finished pod's resources are free again.
                if self.cache.remove_pod(&uid).is_some() {
                    self.queue.unpark_all(now);
                }
                return;
            }
            if let Some(bound) = self.cache.bound(&uid)
                && self.cache.slot_name(bound.slot) == node
                && pod.metadata.labels.as_ref().unwrap_or(&EMPTY_LABELS) == &bound.info.labels
            {
                self.cache.confirm(&uid);
                return;
            }
            self.cache.add_pod(Arc::new(PodInfo::new(pod)), node, false);
            return;
        }
        let ours = spec
            .and_then(|s| s.scheduler_name.as_deref())
            .is_none_or(|n| n.is_empty() || n == SCHEDULER_NAME);
        if terminal || !ours || pod.metadata.deletion_timestamp.is_some() {
            self.queue.remove(&uid);
            return;
        }
        if self.cache.bound(&uid).is_some_and(|b| b.assumed) {
            // Our bind is in flight; the watch has not seen it yet.
            return;
        }
        self.queue.add(Arc::new(PodInfo::new(pod)), now);
    }

    fn delete_pod(&mut self, uid: &str, now: Instant) {
        self.queue.remove(uid);
        if self.cache.remove_pod(uid).is_some() {
            // Its room may let a parked pod fit.
            self.queue.unpark_all(now);
        }
    }

    fn schedule_batch(&mut self) {
        let now = Instant::now();
        for _ in 0..BATCH {
            if self.in_flight >= MAX_BINDS_IN_FLIGHT {
                break;
            }
            let Some(info) = self.queue.pop(now) else {
                break;
            };
            self.schedule_one(info, now);
        }
    }

    fn schedule_one(&mut self, info: Arc<PodInfo>, now: Instant) {
        let plan = match self.volumes.plan(&info) {
            Ok(plan) => plan,
            Err(message) => {
                let decision = Decision::Unschedulable(format!(
                    "0/{} nodes are available: {message}.",
                    self.cache.present.len()
                ));
                return self.decided(info, decision, Vec::new(), now);
            }
        };
        let decision = self
            .algorithm
            .schedule(&self.cache, &info, &plan.node_selectors);
        self.decided(info, decision, plan.select_node_for, now);
    }

    fn decided(
        &mut self,
        info: Arc<PodInfo>,
        decision: Decision,
        select_node_for: Vec<String>,
        now: Instant,
    ) {
        match decision {
            Decision::Node(slot) => {
                let node = self.cache.slot_name(slot).to_owned();
                // Assume it bound, so the next pods see the room it takes.
                self.cache.add_pod(info.clone(), &node, true);
                self.in_flight += 1;
                let writer = self.writer.clone();
                let done = self.done_tx.clone();
                tokio::spawn(async move {
                    let result = match writer.select_node(&info, &select_node_for, &node).await {
                        Ok(()) => writer.bind(&info, &node).await,
                        Err(e) => Err(e),
                    };
                    let bound = result.is_ok();
                    let _ = done.send(BindDone {
                        info: info.clone(),
                        result,
                    });
                    if bound {
                        tracing::debug!(pod = %info.key(), %node, "bound");
                        writer.scheduled(&info, &node);
                    }
                });
            }
            Decision::Unschedulable(message) => {
                tracing::debug!(pod = %info.key(), %message, "unschedulable");
                self.queue.park(&info.uid, now);
                let failure = self.failure(&info.uid, message);
                let writer = self.writer.clone();
                tokio::spawn(async move { writer.unschedulable(&info, failure).await });
            }
        }
    }

    /// What to write for this failure: the same message as last time
    /// counts up that Event; a new one starts another.
    fn failure(&mut self, uid: &str, message: String) -> Failure {
        let entry = self.queue.entry_mut(uid);
        let reported = entry.and_then(|e| {
            if e.reported.as_ref().is_none_or(|r| r.message != message) {
                let first = Timestamp::now();
                e.reported = Some(Reported {
                    event: event_name(&e.info, first),
                    count: 0,
                    first,
                    message: message.clone(),
                });
            }
            e.reported.as_mut()
        });
        match reported {
            Some(r) => {
                r.count += 1;
                Failure {
                    event: r.event.clone(),
                    count: r.count,
                    first: r.first,
                    condition: r.count == 1,
                    message,
                }
            }
            None => {
                let first = Timestamp::now();
                Failure {
                    event: format!("{uid}.{:x}", first.as_nanosecond()),
                    count: 1,
                    first,
                    condition: true,
                    message,
                }
            }
        }
    }

    fn on_bound(&mut self, done: BindDone) {
        self.in_flight = self.in_flight.saturating_sub(1);
        let uid = &done.info.uid;
        let error = match done.result {
            Ok(()) => {
                self.queue.remove(uid);
                return;
            }
            Err(e) => e,
        };
        // Forget the assumption, unless the watch has since seen the pod
        // bound (the bind may have landed after all).
        if self.cache.bound(uid).is_some_and(|b| b.assumed) {
            self.cache.remove_pod(uid);
        }
        match &error {
            kube::Error::Api(status) if status.code == 404 => {
                self.queue.remove(uid);
                return;
            }
            _ => self.queue.retry_later(uid, Instant::now()),
        }
        tracing::warn!(pod = %done.info.key(), %error, "bind failed; retrying");
        self.writer.bind_failed(&done.info, &error);
    }
}

static EMPTY_LABELS: selector::Labels = selector::Labels::new();
