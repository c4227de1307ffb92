//! The scheduling queue, as upstream's: pods ready to try are taken by
//! priority, then first in first out; a pod that did not fit is parked
//! until something that could make it fit happens (a node added or
//! changed, a pod deleted) or five minutes pass, and even then waits out
//! an exponential back-off (1 s doubling to 10 s) from its last attempt.
//!
//! The heaps hold `(seq, uid)` entries that go stale when a pod moves or
//! leaves; a stale entry is skipped when it surfaces.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::pod::PodInfo;

const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Parked pods are retried at least this often, in case the event that
/// would let them fit was not one the queue listens for.
const MAX_PARKED: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Active,
    Backoff,
    Parked,
    /// Being scheduled or bound.
    InFlight,
}

/// The last FailedScheduling report for a pod, so that the same failure
/// again counts up one Event instead of writing a new one.
#[derive(Clone, Debug)]
pub struct Reported {
    pub event: String,
    pub count: i32,
    pub first: k8s_openapi::jiff::Timestamp,
    pub message: String,
}

pub struct Entry {
    pub info: Arc<PodInfo>,
    state: State,
    seq: u64,
    attempts: u32,
    last_attempt: Option<Instant>,
    parked_at: Instant,
    pub reported: Option<Reported>,
}

struct Ready {
    priority: i32,
    seq: u64,
    uid: String,
}

impl Ord for Ready {
    fn cmp(&self, other: &Self) -> Ordering {
        self.priority
            .cmp(&other.priority)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

impl PartialOrd for Ready {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Ready {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Ready {}

#[derive(Default)]
pub struct Queue {
    entries: HashMap<String, Entry>,
    active: BinaryHeap<Ready>,
    backoff: BinaryHeap<Reverse<(Instant, u64, String)>>,
    /// Uids of the parked pods.
    parked: HashSet<String>,
    seq: u64,
}

impl Queue {
    /// Adds a pod to try, or refreshes the one queued: a parked pod whose
    /// spec or labels changed is tried again.
    pub fn add(&mut self, info: Arc<PodInfo>, now: Instant) {
        let uid = info.uid.clone();
        if let Some(entry) = self.entries.get_mut(&uid) {
            let changed = entry.info != info;
            entry.info = info;
            if changed && entry.state == State::Parked {
                self.unpark(&uid, now);
            }
            return;
        }
        self.seq += 1;
        self.active.push(Ready {
            priority: info.priority,
            seq: self.seq,
            uid: uid.clone(),
        });
        self.entries.insert(
            uid,
            Entry {
                info,
                state: State::Active,
                seq: self.seq,
                attempts: 0,
                last_attempt: None,
                parked_at: now,
                reported: None,
            },
        );
    }

    pub fn entry_mut(&mut self, uid: &str) -> Option<&mut Entry> {
        self.entries.get_mut(uid)
    }

    pub fn remove(&mut self, uid: &str) -> Option<Entry> {
        self.parked.remove(uid);
        self.entries.remove(uid)
    }

    /// Drops the pods `keep` refuses (after a relist: those gone).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.entries.retain(|uid, _| keep(uid));
        self.parked.retain(|uid| keep(uid));
    }

    pub fn has_active(&self) -> bool {
        !self.active.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// The next pod to schedule, now in flight.
    pub fn pop(&mut self, now: Instant) -> Option<Arc<PodInfo>> {
        while let Some(ready) = self.active.pop() {
            let Some(entry) = self.entries.get_mut(&ready.uid) else {
                continue;
            };
            if entry.seq != ready.seq || entry.state != State::Active {
                continue;
            }
            entry.state = State::InFlight;
            entry.attempts += 1;
            entry.last_attempt = Some(now);
            return Some(entry.info.clone());
        }
        None
    }

    /// The pod fits no node: park it until the cluster changes.
    pub fn park(&mut self, uid: &str, now: Instant) {
        if let Some(entry) = self.entries.get_mut(uid) {
            entry.state = State::Parked;
            entry.parked_at = now;
            self.parked.insert(uid.to_owned());
        }
    }

    /// Its bind failed: try again after its back-off.
    pub fn retry_later(&mut self, uid: &str, now: Instant) {
        if self.entries.contains_key(uid) {
            self.unpark(uid, now);
        }
    }

    /// Something changed that may let parked pods fit: try them again,
    /// each once its back-off has passed.
    pub fn unpark_all(&mut self, now: Instant) {
        for uid in std::mem::take(&mut self.parked) {
            self.unpark(&uid, now);
        }
    }

    /// Moves pods whose back-off is over to the active queue. Cheap: call
    /// it often.
    pub fn flush_backoff(&mut self, now: Instant) {
        while let Some(Reverse((at, seq, _))) = self.backoff.peek() {
            if *at > now {
                break;
            }
            let seq = *seq;
            let Some(Reverse((_, _, uid))) = self.backoff.pop() else {
                break;
            };
            let Some(entry) = self.entries.get_mut(&uid) else {
                continue;
            };
            if entry.seq != seq || entry.state != State::Backoff {
                continue;
            }
            self.seq += 1;
            entry.seq = self.seq;
            entry.state = State::Active;
            self.active.push(Ready {
                priority: entry.info.priority,
                seq: self.seq,
                uid,
            });
        }
    }

    /// Tries again pods parked for too long. Walks the queue: call it
    /// seldom.
    pub fn flush_parked(&mut self, now: Instant) {
        let stale: Vec<String> = self
            .parked
            .iter()
            .filter(|uid| {
                self.entries
                    .get(*uid)
                    .is_none_or(|e| now.duration_since(e.parked_at) >= MAX_PARKED)
            })
            .cloned()
            .collect();
        for uid in stale {
            self.unpark(&uid, now);
        }
    }

    fn unpark(&mut self, uid: &str, now: Instant) {
        self.parked.remove(uid);
        let Some(entry) = self.entries.get_mut(uid) else {
            return;
        };
        self.seq += 1;
        entry.seq = self.seq;
        let ready_at = entry
            .last_attempt
            .map(|t| t + backoff(entry.attempts))
            .unwrap_or(now);
        if ready_at > now {
            entry.state = State::Backoff;
            self.backoff
                .push(Reverse((ready_at, self.seq, uid.to_owned())));
        } else {
            entry.state = State::Active;
            self.active.push(Ready {
                priority: entry.info.priority,
                seq: self.seq,
                uid: uid.to_owned(),
            });
        }
    }
}

/// 1 s after the first failed attempt, doubling up to 10 s.
fn backoff(attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(8);
    (INITIAL_BACKOFF * (1u32 << doublings)).min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;
    use serde_json::json;

    fn pod(uid: &str, priority: i32) -> Arc<PodInfo> {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": uid, "namespace": "ns", "uid": uid},
            "spec": {"priority": priority, "containers": [{"name": "c"}]}
        }))
        .expect("pod");
        Arc::new(PodInfo::new(&pod))
    }

    fn pop(q: &mut Queue, now: Instant) -> Option<String> {
        q.pop(now).map(|p| p.uid.clone())
    }

    #[test]
    fn priority_then_fifo() {
        let mut q = Queue::default();
        let now = Instant::now();
        for (uid, priority) in [("a", 0), ("b", 10), ("c", 0), ("d", 10)] {
            q.add(pod(uid, priority), now);
        }
        let order: Vec<_> = std::iter::from_fn(|| pop(&mut q, now)).collect();
        assert_eq!(order, ["b", "d", "a", "c"]);
    }

    #[test]
    fn parked_pods_wait_for_a_change_and_their_backoff() {
        let mut q = Queue::default();
        let t0 = Instant::now();
        q.add(pod("a", 0), t0);
        assert_eq!(pop(&mut q, t0).as_deref(), Some("a"));
        q.park("a", t0);
        assert!(!q.has_active());
        // A change within the back-off: it waits the rest of its second.
        q.unpark_all(t0 + Duration::from_millis(100));
        assert!(!q.has_active());
        q.flush_backoff(t0 + Duration::from_millis(500));
        assert!(!q.has_active());
        q.flush_backoff(t0 + Duration::from_secs(1));
        assert_eq!(
            pop(&mut q, t0 + Duration::from_secs(1)).as_deref(),
            Some("a")
        );
        // Second failure: two seconds; a change after that moves it at once.
        let t1 = t0 + Duration::from_secs(1);
        q.park("a", t1);
        q.unpark_all(t1 + Duration::from_secs(3));
        assert_eq!(
            pop(&mut q, t1 + Duration::from_secs(3)).as_deref(),
            Some("a")
        );
        // Without any change, five minutes bring it back.
        let t2 = t1 + Duration::from_secs(3);
        q.park("a", t2);
        q.flush_parked(t2 + Duration::from_secs(1));
        assert!(!q.has_active());
        q.flush_parked(t2 + MAX_PARKED);
        assert!(q.has_active());
    }

    #[test]
    fn removed_and_updated_pods() {
        let mut q = Queue::default();
        let now = Instant::now();
        q.add(pod("a", 0), now);
        q.add(pod("b", 0), now);
        q.remove("a");
        assert_eq!(pop(&mut q, now).as_deref(), Some("b"));
        q.park("b", now);
        // The same pod again changes nothing; a changed one is retried.
        q.add(pod("b", 0), now);
        assert!(!q.has_active());
        q.add(pod("b", 5), now + MAX_BACKOFF);
        assert_eq!(pop(&mut q, now + MAX_BACKOFF).as_deref(), Some("b"));
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(40), MAX_BACKOFF);
    }
}
