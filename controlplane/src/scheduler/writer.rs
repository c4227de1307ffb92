//! The scheduler's writes to the API: binds through `pods/binding`, the
//! `PodScheduled=False` condition through `pods/status`, and core/v1
//! Events (`Scheduled`, `FailedScheduling`).
//!
//! Events are written as core/v1 Events, not through kube's `Recorder`
//! (events.k8s.io/v1): Skiff stores the two groups apart, and
//! `kubectl describe` and `kubectl get events` read core/v1. The series
//! of one pod's identical failures is counted on one Event, as upstream's
//! recorder does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Binding, Event, EventSource, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::mpsc;

use super::pod::PodInfo;

/// Upstream's name: Events show it as their source.
pub const SCHEDULER_NAME: &str = "default-scheduler";
/// Events waiting to be written; more are dropped, as upstream's event
/// broadcaster drops them past its 1,000 queued, so that Events never hold
/// back scheduling.
const QUEUED_EVENTS: usize = 1000;
/// Event writes in flight.
const EVENT_WRITERS: usize = 16;
/// `Scheduled` Events written per second at most, after a burst: a large
/// rollout records its first pods' and then a sample, like upstream's
/// rate-limited event client, and its binds keep the API to themselves.
const SCHEDULED_EVENTS_PER_SECOND: f64 = 100.0;
const SCHEDULED_EVENTS_BURST: f64 = 300.0;

#[derive(Clone)]
pub struct Writer {
    client: kube::Client,
    instance: Arc<str>,
    events: mpsc::Sender<EventWrite>,
    dropped: Arc<AtomicU64>,
    scheduled_events: Arc<TokenBucket>,
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    fn new(rate: f64, burst: f64) -> Self {
        TokenBucket {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
        }
    }

    fn take(&self, now: Instant) -> bool {
        let Ok(mut state) = self.state.lock() else {
            return false;
        };
        let (tokens, last) = &mut *state;
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One Event write for the background writers.
enum EventWrite {
    Create(Box<Event>),
    /// One more of a series: count it up, or create it if it is gone.
    Count(Box<Event>),
}

/// One FailedScheduling report to write.
pub struct Failure {
    pub message: String,
    /// The Event to write: a new one, or the series to count up.
    pub event: String,
    pub count: i32,
    pub first: Timestamp,
    /// Whether the pod's condition needs writing (its message changed).
    pub condition: bool,
}

impl Writer {
    /// A writer, and its background Event writers on the current runtime.
    pub fn new(client: kube::Client) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        let (events, queue) = mpsc::channel(QUEUED_EVENTS);
        tokio::spawn(write_events(client.clone(), queue));
        Writer {
            client,
            instance: Arc::from(format!("{SCHEDULER_NAME}-{host}")),
            events,
            dropped: Arc::default(),
            scheduled_events: Arc::new(TokenBucket::new(
                SCHEDULED_EVENTS_PER_SECOND,
                SCHEDULED_EVENTS_BURST,
            )),
        }
    }

    /// Binds the pod to `node`.
    /// Tells each unbound `WaitForFirstConsumer` claim the node its first
    /// pod goes to, so the provisioner makes the volume there.
    pub async fn select_node(
        &self,
        pod: &PodInfo,
        claims: &[String],
        node: &str,
    ) -> Result<(), kube::Error> {
        let api: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
            Api::namespaced(self.client.clone(), &pod.namespace);
        let patch = serde_json::json!({"metadata": {"annotations": {
            crate::controllers::volume::SELECTED_NODE: node,
        }}});
        for claim in claims {
            api.patch(claim, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
        Ok(())
    }

    pub async fn bind(&self, pod: &PodInfo, node: &str) -> Result<(), kube::Error> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let binding = Binding {
            metadata: ObjectMeta {
                name: Some(pod.name.clone()),
                namespace: Some(pod.namespace.clone()),
                uid: Some(pod.uid.clone()),
                ..ObjectMeta::default()
            },
            target: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Node".into()),
                name: Some(node.to_owned()),
                ..ObjectReference::default()
            },
        };
        api.create_subresource::<_, serde::de::IgnoredAny>(
            "binding",
            &pod.name,
            &PostParams::default(),
            &binding,
        )
        .await?;
        Ok(())
    }

    /// Records the `Scheduled` Event of a bound pod.
    pub fn scheduled(&self, pod: &PodInfo, node: &str) {
        let message = format!("Successfully assigned {} to {node}", pod.key());
        let now = Timestamp::now();
        let event = self.event(
            pod,
            &event_name(pod, now),
            "Normal",
            "Scheduled",
            message,
            1,
            now,
        );
        if self.scheduled_events.take(Instant::now()) {
            self.enqueue(EventWrite::Create(event));
        }
    }

    /// Records a bind the API refused, as upstream's scheduler does.
    pub fn bind_failed(&self, pod: &PodInfo, error: &kube::Error) {
        let message = format!("Binding rejected: {error}");
        let now = Timestamp::now();
        let event = self.event(
            pod,
            &event_name(pod, now),
            "Warning",
            "FailedScheduling",
            message,
            1,
            now,
        );
        self.enqueue(EventWrite::Create(event));
    }

    /// Records why the pod fits nowhere: its condition and an Event.
    pub async fn unschedulable(&self, pod: &PodInfo, failure: Failure) {
        let event = self.event(
            pod,
            &failure.event,
            "Warning",
            "FailedScheduling",
            failure.message.clone(),
            failure.count,
            failure.first,
        );
        self.enqueue(if failure.count > 1 {
            EventWrite::Count(event)
        } else {
            EventWrite::Create(event)
        });
        if !failure.condition {
            return;
        }
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &pod.namespace);
        let patch = json!({"status": {"conditions": [{
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": failure.message,
            "lastProbeTime": null,
            "lastTransitionTime": Timestamp::now().to_string(),
        }]}});
        if let Err(e) = api
            .patch_status(
                &pod.name,
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await
        {
            tracing::debug!(pod = %pod.key(), error = %e, "cannot set PodScheduled=False");
        }
    }

    fn enqueue(&self, write: EventWrite) {
        if self.events.try_send(write).is_err() {
            let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::info!(dropped, "scheduler: event queue full; events dropped");
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn event(
        &self,
        pod: &PodInfo,
        name: &str,
        type_: &str,
        reason: &str,
        message: String,
        count: i32,
        first: Timestamp,
    ) -> Box<Event> {
        Box::new(Event {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(pod.namespace.clone()),
                ..ObjectMeta::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.name.clone()),
                namespace: Some(pod.namespace.clone()),
                uid: Some(pod.uid.clone()),
                ..ObjectReference::default()
            },
            action: Some(
                if reason == "Scheduled" {
                    "Binding"
                } else {
                    "Scheduling"
                }
                .into(),
            ),
            reason: Some(reason.to_owned()),
            message: Some(message),
            type_: Some(type_.to_owned()),
            count: Some(count),
            first_timestamp: Some(Time(first)),
            last_timestamp: Some(Time(Timestamp::now())),
            source: Some(EventSource {
                component: Some(SCHEDULER_NAME.into()),
                host: None,
            }),
            reporting_component: Some(SCHEDULER_NAME.into()),
            reporting_instance: Some(self.instance.to_string()),
            ..Event::default()
        })
    }
}

/// Writes queued Events, a few at a time, until the scheduler is gone.
async fn write_events(client: kube::Client, queue: mpsc::Receiver<EventWrite>) {
    let writes = futures::stream::unfold(queue, |mut queue| async move {
        queue.recv().await.map(|write| (write, queue))
    });
    writes
        .for_each_concurrent(EVENT_WRITERS, |write| {
            let client = client.clone();
            async move {
                if let Err(e) = write_event(client, write).await {
                    tracing::debug!(error = %e, "scheduler: cannot write an event");
                }
            }
        })
        .await;
}

async fn write_event(client: kube::Client, write: EventWrite) -> Result<(), kube::Error> {
    let (event, count) = match write {
        EventWrite::Create(event) => (event, false),
        EventWrite::Count(event) => (event, true),
    };
    let namespace = event.metadata.namespace.as_deref().unwrap_or("default");
    let api: Api<Event> = Api::namespaced(client, namespace);
    if count {
        let name = event.metadata.name.as_deref().unwrap_or_default();
        let patch = json!({
            "count": event.count,
            "lastTimestamp": event.last_timestamp,
        });
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            other => return other.map(drop),
        }
    }
    api.create(&PostParams::default(), &event).await.map(drop)
}

/// Upstream's event naming: the object's name and a unique hex suffix.
pub fn event_name(pod: &PodInfo, now: Timestamp) -> String {
    format!("{}.{:x}", pod.name, now.as_nanosecond())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn token_bucket_allows_a_burst_then_its_rate() {
        let bucket = TokenBucket::new(10.0, 3.0);
        let t0 = Instant::now();
        let taken = (0..5).filter(|_| bucket.take(t0)).count();
        assert_eq!(taken, 3);
        assert!(!bucket.take(t0 + Duration::from_millis(50)));
        assert!(bucket.take(t0 + Duration::from_millis(100)));
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| bucket.take(later)).count(), 3);
    }
}
