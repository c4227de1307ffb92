//! Shared by the controllers that keep replicated pods (ReplicaSet and
//! Deployment): label selectors, controller references and claiming,
//! pod readiness and availability, Events and per-object retry back-off.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, ObjectMeta, OwnerReference, Time,
};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Resource;
use kube::core::{Selector, SelectorExt};
use kube::runtime::events::{Event, EventType, Recorder};
use serde_json::{Value, json};

/// The label a Deployment puts on its ReplicaSets and their pods.
pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";

static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// The selector of a workload, or `None` when it would select nothing or
/// everything: validation refuses empty selectors, and a controller must
/// never grab every pod of a namespace because of a bad one.
pub fn selector(selector: &LabelSelector) -> Option<Selector> {
    let parsed = Selector::try_from(selector.clone()).ok()?;
    (!parsed.selects_all()).then_some(parsed)
}

pub fn selects(selector: &Selector, meta: &ObjectMeta) -> bool {
    selector.matches(meta.labels.as_ref().unwrap_or(&NO_LABELS))
}

pub fn labels(meta: &ObjectMeta) -> &BTreeMap<String, String> {
    meta.labels.as_ref().unwrap_or(&NO_LABELS)
}

/// The owner reference with `controller: true`, if any.
pub fn controller_of(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true))
}

/// A controller reference to `owner`, which blocks the owner's foreground
/// deletion until the dependent is gone.
pub fn controller_ref<K: Resource<DynamicType = ()>>(owner: &K) -> Option<OwnerReference> {
    let mut reference = owner.controller_owner_ref(&())?;
    reference.block_owner_deletion = Some(true);
    Some(reference)
}

/// What a controller does with an object its selector may cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Controlled by us and still selected.
    Mine,
    /// An orphan we select: take it.
    Adopt,
    /// Controlled by us but no longer selected: let it go.
    Release,
    /// Someone else's, or nothing to do with us.
    NotMine,
}

/// Decides as upstream's controller-ref manager: never adopt or release
/// while the owner is being deleted, never adopt an object being deleted.
pub fn claim(owner: &ObjectMeta, selector: &Selector, object: &ObjectMeta) -> Claim {
    let owner_deleting = owner.deletion_timestamp.is_some();
    let selected = selects(selector, object);
    match controller_of(object) {
        Some(reference) if Some(&reference.uid) == owner.uid.as_ref() => {
            if selected {
                Claim::Mine
            } else if owner_deleting {
                Claim::NotMine
            } else {
                Claim::Release
            }
        }
        Some(_) => Claim::NotMine,
        None if selected && !owner_deleting && object.deletion_timestamp.is_none() => Claim::Adopt,
        None => Claim::NotMine,
    }
}

/// Strategic-merge patch adding `reference` to an object's owners (merged
/// by uid, so the object's other owners stay untouched).
pub fn adopt_patch(reference: &OwnerReference, object_uid: &str) -> Value {
    json!({"metadata": {"ownerReferences": [reference], "uid": object_uid}})
}

/// Strategic-merge patch removing the owner `owner_uid` from an object.
pub fn release_patch(owner_uid: &str, object_uid: &str) -> Value {
    json!({"metadata": {
        "ownerReferences": [{"$patch": "delete", "uid": owner_uid}],
        "uid": object_uid,
    }})
}

/// Running or pending and not being deleted: a pod that counts.
pub fn is_active(pod: &Pod) -> bool {
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    !finished && pod.metadata.deletion_timestamp.is_none()
}

/// When the pod last became ready, if it is ready; a Ready condition
/// without a transition time counts as ready but with no known start.
pub fn ready_since(pod: &Pod) -> Option<Option<Timestamp>> {
    let condition = pod
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")?;
    (condition.status == "True").then(|| condition.last_transition_time.as_ref().map(|t| t.0))
}

pub fn is_ready(pod: &Pod) -> bool {
    ready_since(pod).is_some()
}

/// Ready for at least `min_ready_seconds`, as upstream counts available
/// pods; for a ready pod not yet available, when it will be.
pub fn availability(pod: &Pod, min_ready_seconds: i32, now: Timestamp) -> Availability {
    match ready_since(pod) {
        None => Availability::No,
        Some(_) if min_ready_seconds <= 0 => Availability::Yes,
        Some(None) => Availability::No,
        Some(Some(since)) => {
            let at = since.saturating_add(SignedDuration::from_secs(min_ready_seconds.into()));
            if let Ok(at) = at
                && at < now
            {
                Availability::Yes
            } else {
                Availability::At(at.unwrap_or(now))
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Yes,
    No,
    /// Ready, and available once this moment has passed.
    At(Timestamp),
}

/// Now, to the second: what the API stores for `Time` fields, so that a
/// condition written and read back compares equal.
pub fn now() -> Time {
    Time(Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// How long until `at`, at least a moment so that a requeue lands after it.
pub fn until(at: Timestamp) -> Duration {
    let left = at.duration_since(Timestamp::now());
    Duration::try_from(left).unwrap_or_default() + Duration::from_millis(50)
}

/// Publishes an Event about `regarding`; failing to record one is logged,
/// never fatal.
pub async fn record(
    recorder: &Recorder,
    regarding: &ObjectReference,
    warning: bool,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, regarding).await {
        tracing::debug!(%error, reason, "recording an event failed");
    }
}

/// Per-object exponential back-off after failed reconciles, reset by a
/// success: one broken object is retried ever more slowly and never holds
/// up the others.
#[derive(Default)]
pub struct Retries(Mutex<HashMap<String, u32>>);

const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(300);

impl Retries {
    /// Records a failure of `key`; returns how long to wait before the next try.
    pub fn failed(&self, key: String) -> Duration {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let count = map.entry(key).or_insert(0);
        let delay = RETRY_FIRST.saturating_mul(1 << (*count).min(16));
        *count = count.saturating_add(1);
        delay.min(RETRY_MAX)
    }

    /// Forgets `key`'s failures: it synced, or it is gone.
    pub fn succeeded(&self, key: &str) {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.remove(key);
    }
}

/// A merge patch making an object's status exactly `new`: fields `old`
/// had and `new` lacks are set to null, so they go.
pub fn status_patch<T: serde::Serialize>(new: &T, old: Option<&T>) -> Value {
    let mut status = serde_json::to_value(new).unwrap_or(Value::Null);
    if let (Value::Object(map), Some(Ok(Value::Object(before)))) =
        (&mut status, old.map(serde_json::to_value))
    {
        for field in before.keys() {
            map.entry(field.as_str()).or_insert(Value::Null);
        }
    }
    json!({ "status": status })
}

/// `namespace/name` of an object, the key controllers track state under.
pub fn key(meta: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default()
    )
}

/// What the API said, without the client's wrapping.
pub fn api_message(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) => status.message.clone(),
        other => other.to_string(),
    }
}

pub fn is_status(error: &kube::Error, code: u16) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == code)
}

pub fn is_not_found(error: &kube::Error) -> bool {
    is_status(error, 404)
}

/// How soon a sync that lost a write race runs again: the cache that
/// made it stale is about to catch up, so this is no failure to back off.
pub const CONFLICT_RETRY: Duration = Duration::from_millis(300);

/// A write lost a race with another writer (or a stale cache): retry soon.
pub fn is_conflict(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409 && status.reason == "Conflict")
}

pub fn is_already_exists(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 409 && status.reason == "AlreadyExists")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};

    fn meta(labels: &[(&str, &str)], owner: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).into(), (*v).into()))
                    .collect(),
            ),
            owner_references: owner.map(|uid| {
                vec![OwnerReference {
                    uid: uid.into(),
                    controller: Some(true),
                    ..Default::default()
                }]
            }),
            uid: Some("pod".into()),
            ..Default::default()
        }
    }

    #[test]
    fn claims_like_the_controller_ref_manager() {
        let owner = ObjectMeta {
            uid: Some("rs".into()),
            ..Default::default()
        };
        let sel = selector(&LabelSelector {
            match_labels: Some([("app".to_owned(), "web".to_owned())].into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            claim(&owner, &sel, &meta(&[("app", "web")], None)),
            Claim::Adopt
        );
        assert_eq!(
            claim(&owner, &sel, &meta(&[("app", "web")], Some("rs"))),
            Claim::Mine
        );
        assert_eq!(
            claim(&owner, &sel, &meta(&[("app", "db")], Some("rs"))),
            Claim::Release
        );
        assert_eq!(
            claim(&owner, &sel, &meta(&[("app", "web")], Some("x"))),
            Claim::NotMine
        );
        assert_eq!(
            claim(&owner, &sel, &meta(&[("app", "db")], None)),
            Claim::NotMine
        );
        let deleting = ObjectMeta {
            deletion_timestamp: Some(now()),
            ..owner
        };
        assert_eq!(
            claim(&deleting, &sel, &meta(&[("app", "web")], None)),
            Claim::NotMine
        );
        assert_eq!(
            claim(&deleting, &sel, &meta(&[("app", "db")], Some("rs"))),
            Claim::NotMine
        );
        assert!(selector(&LabelSelector::default()).is_none());
    }

    #[test]
    fn availability_waits_min_ready_seconds() {
        let since = Timestamp::from_second(1_000).unwrap();
        let pod = Pod {
            status: Some(PodStatus {
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    last_transition_time: Some(Time(since)),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let later = |s| Timestamp::from_second(s).unwrap();
        assert_eq!(availability(&pod, 0, later(1_000)), Availability::Yes);
        assert_eq!(
            availability(&pod, 5, later(1_003)),
            Availability::At(later(1_005))
        );
        assert_eq!(availability(&pod, 5, later(1_006)), Availability::Yes);
        assert_eq!(availability(&Pod::default(), 0, later(0)), Availability::No);
    }

    #[test]
    fn retries_back_off_and_reset() {
        let retries = Retries::default();
        let first = retries.failed("a".into());
        let second = retries.failed("a".into());
        assert!(second > first);
        retries.succeeded("a");
        assert_eq!(retries.failed("a".into()), first);
        for _ in 0..40 {
            retries.failed("b".into());
        }
        assert_eq!(retries.failed("b".into()), RETRY_MAX);
    }
}
