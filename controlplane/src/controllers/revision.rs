//! Template history for the StatefulSet and DaemonSet controllers, kept as
//! upstream keeps it so that `kubectl rollout history|undo` work: one
//! ControllerRevision per distinct pod template, owned by the set, named
//! `<set>-<hash>`, numbered in the order templates became current, and
//! holding a patch that restores the template (`{"spec":{"template":…}}`).
//!
//! Also here: the pod-state predicates both controllers judge a rollout by.

use std::collections::BTreeMap;

use jiff::Timestamp;
use k8s_openapi::api::apps::v1::ControllerRevision;
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::core::Selector;
use serde_json::{Value, json};

/// A template as it should be recorded.
pub(super) struct Snapshot {
    /// `<set>-<hash>`.
    pub name: String,
    /// The label that carries the hash on the revision.
    pub hash_label: &'static str,
    pub hash: String,
    /// The template's labels, so the set's selector finds its revisions.
    pub labels: BTreeMap<String, String>,
    pub annotations: Option<BTreeMap<String, String>>,
    pub owner: OwnerReference,
    pub data: Value,
}

impl Snapshot {
    /// The snapshot of `template` for a set named `set`; `collision_count`
    /// (from the set's status) perturbs the hash after a name collision.
    pub fn new(
        set: &str,
        template: &PodTemplateSpec,
        collision_count: Option<i32>,
        hash_label: &'static str,
        owner: OwnerReference,
        annotations: Option<BTreeMap<String, String>>,
    ) -> Result<Self, serde_json::Error> {
        let hash = template_hash(template, collision_count)?;
        let mut recorded = serde_json::to_value(template)?;
        if let Value::Object(fields) = &mut recorded {
            // Applying the revision replaces the template rather than
            // merging into it.
            fields.insert("$patch".into(), json!("replace"));
        }
        Ok(Snapshot {
            name: format!("{set}-{hash}"),
            hash_label,
            labels: template
                .metadata
                .as_ref()
                .and_then(|m| m.labels.clone())
                .unwrap_or_default(),
            annotations,
            owner,
            hash,
            data: json!({"spec": {"template": recorded}}),
        })
    }
}

/// The revisions controlled by the owner with `uid`, oldest first.
pub(super) async fn owned(
    api: &Api<ControllerRevision>,
    selector: &Selector,
    uid: &str,
) -> Result<Vec<ControllerRevision>, kube::Error> {
    let mut revisions: Vec<ControllerRevision> = api
        .list(&ListParams::default().labels_from(selector))
        .await?
        .items
        .into_iter()
        .filter(|r| controlled_by(&r.metadata, uid))
        .collect();
    sort(&mut revisions);
    Ok(revisions)
}

/// Makes `snapshot` the newest revision: an equal revision is renumbered
/// (a rollback), otherwise a new one is created. Returns its index in
/// `revisions` (kept sorted), or `None` when its name is taken by a
/// different template: the caller bumps its collision count and retries.
pub(super) async fn record(
    api: &Api<ControllerRevision>,
    revisions: &mut Vec<ControllerRevision>,
    snapshot: Snapshot,
) -> Result<Option<usize>, kube::Error> {
    let newest = revisions.last().map_or(0, |r| r.revision);
    if let Some(i) = revisions.iter().rposition(|r| holds(r, &snapshot.data)) {
        if i + 1 == revisions.len() {
            return Ok(Some(i));
        }
        let name = revisions[i].metadata.name.clone().unwrap_or_default();
        let patch = json!({"revision": newest + 1});
        let renumbered = api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        revisions[i] = renumbered;
        sort(revisions);
        return Ok(Some(revisions.len() - 1));
    }
    let mut labels = snapshot.labels;
    labels.insert(snapshot.hash_label.to_owned(), snapshot.hash);
    let owner_uid = snapshot.owner.uid.clone();
    let revision = ControllerRevision {
        metadata: ObjectMeta {
            name: Some(snapshot.name.clone()),
            labels: Some(labels),
            annotations: snapshot.annotations,
            owner_references: Some(vec![snapshot.owner]),
            ..ObjectMeta::default()
        },
        data: Some(RawExtension(snapshot.data)),
        revision: newest + 1,
    };
    match api.create(&PostParams::default(), &revision).await {
        Ok(created) => {
            revisions.push(created);
            Ok(Some(revisions.len() - 1))
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            // Ours already, but missed by the list (or not: a collision).
            let existing = api.get(&snapshot.name).await?;
            let data = revision.data.as_ref().map(|d| &d.0);
            if controlled_by(&existing.metadata, &owner_uid)
                && data.is_some_and(|d| holds(&existing, d))
            {
                revisions.push(existing);
                sort(revisions);
                Ok(revisions
                    .iter()
                    .position(|r| r.metadata.name.as_deref() == Some(&snapshot.name)))
            } else {
                Ok(None)
            }
        }
        Err(e) => Err(e),
    }
}

/// Deletes the oldest revisions beyond `limit` among those `live` does not
/// keep (the set's current and update revisions, and any a pod runs).
pub(super) async fn truncate(
    api: &Api<ControllerRevision>,
    revisions: &[ControllerRevision],
    live: impl Fn(&ControllerRevision) -> bool,
    limit: i32,
) -> Result<(), kube::Error> {
    let history: Vec<&ControllerRevision> = revisions.iter().filter(|r| !live(r)).collect();
    let excess = history
        .len()
        .saturating_sub(usize::try_from(limit).unwrap_or(0));
    for old in &history[..excess] {
        if let Some(name) = &old.metadata.name {
            match api.delete(name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// The template a revision records.
pub(super) fn template_of(revision: &ControllerRevision) -> Option<PodTemplateSpec> {
    let mut template = revision.data.as_ref()?.0.pointer("/spec/template")?.clone();
    if let Value::Object(fields) = &mut template {
        fields.remove("$patch");
    }
    serde_json::from_value(template).ok()
}

fn holds(revision: &ControllerRevision, data: &Value) -> bool {
    revision.data.as_ref().is_some_and(|d| &d.0 == data)
}

fn sort(revisions: &mut [ControllerRevision]) {
    revisions.sort_by(|a, b| {
        a.revision
            .cmp(&b.revision)
            .then_with(|| a.metadata.name.cmp(&b.metadata.name))
    });
}

/// Whether the controller reference of `meta` points at `uid`.
pub(super) fn controlled_by(meta: &ObjectMeta, uid: &str) -> bool {
    controller_of(meta).is_some_and(|r| r.uid == uid)
}

pub(super) fn controller_of(meta: &ObjectMeta) -> Option<&OwnerReference> {
    meta.owner_references
        .as_ref()?
        .iter()
        .find(|r| r.controller == Some(true))
}

/// The reference a set puts on what it controls.
pub(super) fn controller_ref(
    api_version: &str,
    kind: &str,
    name: &str,
    uid: &str,
) -> OwnerReference {
    OwnerReference {
        api_version: api_version.to_owned(),
        kind: kind.to_owned(),
        name: name.to_owned(),
        uid: uid.to_owned(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// FNV-1a (32 bit) over the template's JSON and the collision count, in
/// upstream's alphabet without vowels (so a hash never spells a word).
fn template_hash(
    template: &PodTemplateSpec,
    collision_count: Option<i32>,
) -> Result<String, serde_json::Error> {
    let mut hasher = Fnv32(0x811c_9dc5);
    serde_json::to_writer(&mut hasher, template)?;
    if let Some(count) = collision_count {
        hasher.feed(&count.to_le_bytes());
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    Ok(hasher
        .0
        .to_string()
        .bytes()
        .map(|digit| char::from(ALPHABET[usize::from(digit) % ALPHABET.len()]))
        .collect())
}

struct Fnv32(u32);

impl Fnv32 {
    fn feed(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u32::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0193);
        }
    }
}

impl std::io::Write for Fnv32 {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.feed(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// Pod state.

pub(super) fn is_terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

pub(super) fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// When the pod's `Ready` condition last became true, if it is true.
pub(super) fn ready_since(pod: &Pod) -> Option<Option<Timestamp>> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")
        .map(|c| c.last_transition_time.as_ref().map(|t| t.0))
}

pub(super) fn is_ready(pod: &Pod) -> bool {
    ready_since(pod).is_some()
}

/// How long until a ready pod has been ready for `min_ready_seconds`:
/// zero when it is available now, `None` when it is not ready.
pub(super) fn until_available(
    pod: &Pod,
    min_ready_seconds: i32,
    now: Timestamp,
) -> Option<std::time::Duration> {
    let since = ready_since(pod)?;
    if min_ready_seconds <= 0 {
        return Some(std::time::Duration::ZERO);
    }
    let Some(since) = since else {
        return Some(std::time::Duration::ZERO);
    };
    let due = since.as_millisecond() + i64::from(min_ready_seconds) * 1000;
    let left = due.saturating_sub(now.as_millisecond()).max(0);
    Some(std::time::Duration::from_millis(left.unsigned_abs()))
}

pub(super) fn is_available(pod: &Pod, min_ready_seconds: i32, now: Timestamp) -> bool {
    until_available(pod, min_ready_seconds, now).is_some_and(|d| d.is_zero())
}

/// Oldest first, as controllers pick which of two pods to keep.
pub(super) fn by_age(a: &Pod, b: &Pod) -> std::cmp::Ordering {
    let created = |p: &Pod| p.metadata.creation_timestamp.as_ref().map(|t| t.0);
    created(a)
        .cmp(&created(b))
        .then_with(|| a.metadata.name.cmp(&b.metadata.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(image: &str) -> PodTemplateSpec {
        serde_json::from_value(json!({
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "c", "image": image}]}
        }))
        .unwrap()
    }

    #[test]
    fn hash_is_stable_and_tracks_template_and_collisions() {
        let a = template_hash(&template("nginx:1"), None).unwrap();
        assert_eq!(a, template_hash(&template("nginx:1"), None).unwrap());
        assert_ne!(a, template_hash(&template("nginx:2"), None).unwrap());
        assert_ne!(a, template_hash(&template("nginx:1"), Some(1)).unwrap());
        assert!(
            a.bytes()
                .all(|b| b"bcdfghjklmnpqrstvwxz2456789".contains(&b))
        );
    }

    #[test]
    fn recorded_template_round_trips() {
        let owner = controller_ref("apps/v1", "StatefulSet", "web", "u1");
        let snapshot = Snapshot::new("web", &template("nginx:1"), None, "h", owner, None).unwrap();
        assert_eq!(snapshot.data["spec"]["template"]["$patch"], "replace");
        let revision = ControllerRevision {
            data: Some(RawExtension(snapshot.data)),
            ..ControllerRevision::default()
        };
        assert_eq!(template_of(&revision), Some(template("nginx:1")));
    }

    #[test]
    fn availability_waits_min_ready_seconds() {
        let now = Timestamp::now();
        let pod: Pod = serde_json::from_value(json!({
            "status": {"phase": "Running", "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": now.to_string()}
            ]}
        }))
        .unwrap();
        assert!(is_available(&pod, 0, now));
        assert!(!is_available(&pod, 10, now));
        assert_eq!(
            until_available(&pod, 10, now),
            Some(std::time::Duration::from_secs(10))
        );
        assert!(until_available(&Pod::default(), 0, now).is_none());
    }
}
