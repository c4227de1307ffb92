//! StatefulSet: pods with stable identities `NAME-0..N-1` (hostname, the
//! governing Service as subdomain, ordinal labels), each with its own
//! PersistentVolumeClaims that outlive it and are reused by its
//! replacement. `OrderedReady` creates pods one at a time in ordinal order,
//! each once its predecessor is Running and Ready, and removes them one at
//! a time from the highest ordinal; `Parallel` does both at once. A
//! `RollingUpdate` replaces pods with ordinals at or above `partition`,
//! highest first, one at a time; `OnDelete` leaves that to the user.
//! Template history is kept as ControllerRevisions ([`super::revision`]).
//!
//! Every reconcile reads the set's pods, claims and revisions from the API
//! rather than from a cache, so no decision rests on a view older than the
//! controller's own last write (upstream needs "expectations" for that).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::{
    ControllerRevision, StatefulSet, StatefulSetSpec, StatefulSetStatus,
};
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, Pod, PodTemplateSpec, Volume,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::core::Selector;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use serde_json::json;

use super::pod_informer::PodInformer;
use super::revision::{self, Snapshot};

const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";
const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";
/// Pods carry the name of the revision they were made from.
const REVISION_LABEL: &str = "controller-revision-hash";
/// Revisions carry the hash of the template they hold.
const HASH_LABEL: &str = "controller.kubernetes.io/hash";
/// Sets are looked at again this often even when nothing changes.
const RESYNC: Duration = Duration::from_secs(300);
const RETRY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("statefulset {0}: {1}")]
    Kube(String, #[source] kube::Error),
    #[error("statefulset {0}: encoding its template: {1}")]
    Encode(String, #[source] serde_json::Error),
}

struct Context {
    client: kube::Client,
    recorder: Recorder,
}

pub async fn run(client: kube::Client, pods: &PodInformer) {
    let sets: Api<StatefulSet> = Api::all(client.clone());
    let reporter = Reporter {
        controller: "statefulset-controller".into(),
        instance: None,
    };
    let recorder = Recorder::new(client.clone(), reporter);
    let context = Arc::new(Context { client, recorder });
    Controller::new(sets, watcher::Config::default())
        .reconcile_on(pods.controllers::<StatefulSet>())
        .run(reconcile, retry, context)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "statefulset reconcile failed");
            }
        })
        .await;
}

async fn reconcile(sts: Arc<StatefulSet>, ctx: Arc<Context>) -> Result<Action, Error> {
    let meta = &sts.metadata;
    let (Some(name), Some(namespace), Some(uid), Some(spec)) = (
        meta.name.as_deref(),
        meta.namespace.as_deref(),
        meta.uid.as_deref(),
        sts.spec.as_ref(),
    ) else {
        return Ok(Action::await_change());
    };
    // Its pods go with it, by the garbage collector.
    if meta.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let set = Set::new(&ctx, &sts, spec, name, namespace, uid);
    let selector = match Selector::try_from(spec.selector.clone()) {
        Ok(selector) if !selector.selects_all() => selector,
        Ok(_) => {
            set.event(
                EventType::Warning,
                "InvalidSelector",
                "Sync",
                "empty selector selects every pod".into(),
            )
            .await;
            return Ok(Action::await_change());
        }
        Err(e) => {
            set.event(EventType::Warning, "InvalidSelector", "Sync", e.to_string())
                .await;
            return Ok(Action::await_change());
        }
    };
    set.sync(&selector).await
}

fn retry(_sts: Arc<StatefulSet>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(%error, "statefulset sync failed; retrying");
    Action::requeue(RETRY)
}

/// One reconcile's view of a set.
struct Set<'a> {
    ctx: &'a Context,
    sts: &'a StatefulSet,
    spec: &'a StatefulSetSpec,
    name: &'a str,
    uid: &'a str,
    key: String,
    pods: Api<Pod>,
    claims: Api<PersistentVolumeClaim>,
    revisions: Api<ControllerRevision>,
    /// Ordinals `start..end` are the set's replicas.
    start: i32,
    end: i32,
    monotonic: bool,
    min_ready: i32,
    /// `persistentVolumeClaimRetentionPolicy`: delete claims with the set,
    /// and with pods removed by a scale-down.
    claims_follow_set: bool,
    claims_follow_scale_down: bool,
    now: Timestamp,
}

/// The template pods of one revision are made from.
struct Version<'t> {
    revision: String,
    template: Cow<'t, PodTemplateSpec>,
}

impl<'a> Set<'a> {
    fn new(
        ctx: &'a Context,
        sts: &'a StatefulSet,
        spec: &'a StatefulSetSpec,
        name: &'a str,
        namespace: &str,
        uid: &'a str,
    ) -> Self {
        let start = spec
            .ordinals
            .as_ref()
            .and_then(|o| o.start)
            .unwrap_or(0)
            .max(0);
        let replicas = spec.replicas.unwrap_or(1).max(0);
        let retention = spec.persistent_volume_claim_retention_policy.as_ref();
        Set {
            ctx,
            sts,
            spec,
            name,
            uid,
            key: format!("{namespace}/{name}"),
            pods: Api::namespaced(ctx.client.clone(), namespace),
            claims: Api::namespaced(ctx.client.clone(), namespace),
            revisions: Api::namespaced(ctx.client.clone(), namespace),
            start,
            end: start.saturating_add(replicas),
            monotonic: spec.pod_management_policy.as_deref() != Some("Parallel"),
            min_ready: spec.min_ready_seconds.unwrap_or(0),
            claims_follow_set: retention.and_then(|r| r.when_deleted.as_deref()) == Some("Delete"),
            claims_follow_scale_down: retention.and_then(|r| r.when_scaled.as_deref())
                == Some("Delete"),
            now: Timestamp::now(),
        }
    }

    async fn sync(&self, selector: &Selector) -> Result<Action, Error> {
        // Pods: the set's own, and orphans whose names make them members.
        let listed = self
            .pods
            .list(&ListParams::default().labels_from(selector))
            .await
            .map_err(|e| self.kube(e))?;
        let mut members: BTreeMap<i32, Pod> = BTreeMap::new();
        let mut condemned: Vec<(i32, Pod)> = Vec::new();
        for pod in listed.items {
            let name = pod.metadata.name.as_deref().unwrap_or_default();
            let Some(ordinal) = ordinal_of(self.name, name) else {
                continue;
            };
            match revision::controller_of(&pod.metadata) {
                Some(owner) if owner.uid == self.uid => {}
                Some(_) => continue,
                None if revision::is_terminating(&pod) => continue,
                None => self.adopt(&pod).await?,
            }
            if (self.start..self.end).contains(&ordinal) {
                members.insert(ordinal, pod);
            } else {
                condemned.push((ordinal, pod));
            }
        }
        // Highest ordinal first: the order they are removed in.
        condemned.sort_by_key(|(ordinal, _)| std::cmp::Reverse(*ordinal));

        // History: the revision of the current template, and the one the
        // set is rolling from.
        let mut history = revision::owned(&self.revisions, selector, self.uid)
            .await
            .map_err(|e| self.kube(e))?;
        let prior = self.sts.status.as_ref();
        let collisions = prior.and_then(|s| s.collision_count);
        let owner = self.owner();
        let snapshot = Snapshot::new(
            self.name,
            &self.spec.template,
            collisions,
            HASH_LABEL,
            owner,
            self.sts.metadata.annotations.clone(),
        )
        .map_err(|e| Error::Encode(self.key.clone(), e))?;
        let Some(update) = revision::record(&self.revisions, &mut history, snapshot)
            .await
            .map_err(|e| self.kube(e))?
        else {
            return self.bump_collisions(collisions).await;
        };
        let update = Version {
            revision: history[update].metadata.name.clone().unwrap_or_default(),
            template: Cow::Borrowed(&self.spec.template),
        };
        let current = prior
            .and_then(|s| s.current_revision.as_deref())
            .and_then(|name| {
                history
                    .iter()
                    .find(|r| r.metadata.name.as_deref() == Some(name))
            })
            .and_then(|r| {
                Some(Version {
                    revision: r.metadata.name.clone()?,
                    template: Cow::Owned(revision::template_of(r)?),
                })
            })
            .unwrap_or_else(|| Version {
                revision: update.revision.clone(),
                template: Cow::Borrowed(&self.spec.template),
            });

        let pods = members.values().chain(condemned.iter().map(|(_, p)| p));
        let (status, wake) = self.status(pods, &current, &update);
        if prior != Some(&status) {
            self.write_status(&status).await?;
        }

        let claims = self.claims_by_name().await?;
        self.act(&members, &condemned, &claims, &current, &update, &status)
            .await?;

        let limit = self.spec.revision_history_limit.unwrap_or(10);
        let live = |r: &ControllerRevision| {
            let name = r.metadata.name.as_deref();
            name == Some(current.revision.as_str())
                || name == Some(update.revision.as_str())
                || members
                    .values()
                    .chain(condemned.iter().map(|(_, p)| p))
                    .any(|p| pod_revision(p) == name)
        };
        revision::truncate(&self.revisions, &history, live, limit)
            .await
            .map_err(|e| self.kube(e))?;
        Ok(Action::requeue(wake.unwrap_or(RESYNC)))
    }

    /// Creates, repairs, removes and replaces pods: the upstream order,
    /// stopping at the first thing to wait for when `monotonic`.
    async fn act(
        &self,
        members: &BTreeMap<i32, Pod>,
        condemned: &[(i32, Pod)],
        claims: &HashMap<String, PersistentVolumeClaim>,
        current: &Version<'_>,
        update: &Version<'_>,
        status: &StatefulSetStatus,
    ) -> Result<(), Error> {
        let healthy = |pod: &Pod| {
            !revision::is_terminating(pod)
                && running_and_ready(pod)
                && revision::is_available(pod, self.min_ready, self.now)
        };
        // The lowest-ordinal pod that is missing or unhealthy: the only one
        // a monotonic scale-down may remove while it is not ready.
        let first_unhealthy = (self.start..self.end)
            .find(|o| members.get(o).is_none_or(|p| !healthy(p)))
            .or_else(|| {
                condemned
                    .iter()
                    .rev()
                    .find(|(_, p)| !healthy(p))
                    .map(|(o, _)| *o)
            });

        for ordinal in self.start..self.end {
            let Some(pod) = members.get(&ordinal) else {
                if !self.ensure_claims(claims, ordinal, None, false).await? {
                    return Ok(());
                }
                let version = if self.uses_current(ordinal - self.start, status) {
                    current
                } else {
                    update
                };
                self.create(ordinal, version).await?;
                if self.monotonic {
                    return Ok(());
                }
                continue;
            };
            let terminating = revision::is_terminating(pod);
            if matches!(revision::phase(pod), "Failed" | "Succeeded") && !terminating {
                // Replaced once it is gone.
                self.delete(pod).await?;
                if self.monotonic {
                    return Ok(());
                }
                continue;
            }
            let claims_ok = self
                .ensure_claims(claims, ordinal, Some(pod), false)
                .await?;
            if self.monotonic
                && (!claims_ok
                    || terminating
                    || !running_and_ready(pod)
                    || !revision::is_available(pod, self.min_ready, self.now))
            {
                return Ok(());
            }
            self.fix_identity(ordinal, pod).await?;
        }

        for (ordinal, pod) in condemned {
            if revision::is_terminating(pod) {
                if self.monotonic {
                    return Ok(());
                }
                continue;
            }
            if self.monotonic && !running_and_ready(pod) && first_unhealthy != Some(*ordinal) {
                return Ok(());
            }
            self.ensure_claims(claims, *ordinal, Some(pod), true)
                .await?;
            self.delete(pod).await?;
            if self.monotonic {
                return Ok(());
            }
        }

        let strategy = self.spec.update_strategy.as_ref();
        if strategy.and_then(|s| s.type_.as_deref()) == Some("OnDelete") {
            return Ok(());
        }
        let partition = strategy
            .and_then(|s| s.rolling_update.as_ref())
            .and_then(|r| r.partition)
            .unwrap_or(0)
            .max(0);
        for ordinal in (self.start.saturating_add(partition)..self.end).rev() {
            let Some(pod) = members.get(&ordinal) else {
                return Ok(());
            };
            if pod_revision(pod) != Some(update.revision.as_str()) && !revision::is_terminating(pod)
            {
                self.delete(pod).await?;
                return Ok(());
            }
            if !healthy(pod) {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Whether a new pod at `index` gets the current (not the update)
    /// revision: below the partition of a rolling update.
    fn uses_current(&self, index: i32, status: &StatefulSetStatus) -> bool {
        let Some(strategy) = self.spec.update_strategy.as_ref() else {
            return false;
        };
        if strategy.type_.as_deref() == Some("OnDelete") {
            return false;
        }
        match &strategy.rolling_update {
            Some(rolling) => index < rolling.partition.unwrap_or(0),
            None => index < status.current_replicas.unwrap_or(0),
        }
    }

    fn status<'p>(
        &self,
        pods: impl Iterator<Item = &'p Pod>,
        current: &Version<'_>,
        update: &Version<'_>,
    ) -> (StatefulSetStatus, Option<Duration>) {
        let prior = self.sts.status.as_ref();
        let (mut replicas, mut ready, mut available, mut at_current, mut at_update) =
            (0, 0, 0, 0, 0);
        let mut wake: Option<Duration> = None;
        for pod in pods {
            replicas += 1;
            if running_and_ready(pod) {
                ready += 1;
                match revision::until_available(pod, self.min_ready, self.now) {
                    Some(left) if left.is_zero() => available += 1,
                    Some(left) => wake = Some(wake.map_or(left, |w| w.min(left))),
                    None => {}
                }
            }
            if !revision::is_terminating(pod) {
                let revision = pod_revision(pod);
                at_current += i32::from(revision == Some(current.revision.as_str()));
                at_update += i32::from(revision == Some(update.revision.as_str()));
            }
        }
        let rolling = self
            .spec
            .update_strategy
            .as_ref()
            .and_then(|s| s.type_.as_deref())
            != Some("OnDelete");
        let mut current_revision = current.revision.clone();
        // A finished rolling update makes its revision the current one.
        if rolling && at_update == replicas && ready == replicas {
            current_revision = update.revision.clone();
            at_current = at_update;
        }
        let status = StatefulSetStatus {
            observed_generation: self.sts.metadata.generation,
            replicas,
            ready_replicas: Some(ready),
            available_replicas: Some(available),
            current_replicas: Some(at_current),
            updated_replicas: Some(at_update),
            current_revision: Some(current_revision),
            update_revision: Some(update.revision.clone()),
            collision_count: prior.and_then(|s| s.collision_count),
            conditions: prior.and_then(|s| s.conditions.clone()),
        };
        // Wake up a little after the next pod becomes available.
        (status, wake.map(|w| w + Duration::from_millis(100)))
    }

    async fn write_status(&self, status: &StatefulSetStatus) -> Result<(), Error> {
        let api: Api<StatefulSet> = Api::namespaced(
            self.ctx.client.clone(),
            self.sts.metadata.namespace.as_deref().unwrap_or_default(),
        );
        api.patch_status(
            self.name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": status})),
        )
        .await
        .map(|_| ())
        .or_else(ignore_not_found)
        .map_err(|e| self.kube(e))
    }

    /// Another template already holds this revision name: hash again with a
    /// higher collision count.
    async fn bump_collisions(&self, collisions: Option<i32>) -> Result<Action, Error> {
        let count = collisions.unwrap_or(0).saturating_add(1);
        let api: Api<StatefulSet> = Api::namespaced(
            self.ctx.client.clone(),
            self.sts.metadata.namespace.as_deref().unwrap_or_default(),
        );
        api.patch_status(
            self.name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": {"collisionCount": count}})),
        )
        .await
        .map_err(|e| self.kube(e))?;
        Ok(Action::requeue(Duration::from_millis(100)))
    }

    async fn claims_by_name(&self) -> Result<HashMap<String, PersistentVolumeClaim>, Error> {
        if self.claim_templates().is_empty() {
            return Ok(HashMap::new());
        }
        let list = self
            .claims
            .list(&ListParams::default())
            .await
            .map_err(|e| self.kube(e))?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|c| Some((c.metadata.name.clone()?, c)))
            .collect())
    }

    fn claim_templates(&self) -> &[PersistentVolumeClaim] {
        self.spec
            .volume_claim_templates
            .as_deref()
            .unwrap_or_default()
    }

    /// Creates the pod's missing claims and keeps their owner references as
    /// the retention policy wants. False when a claim is still being
    /// deleted: the pod must not start on it.
    async fn ensure_claims(
        &self,
        claims: &HashMap<String, PersistentVolumeClaim>,
        ordinal: i32,
        pod: Option<&Pod>,
        condemned: bool,
    ) -> Result<bool, Error> {
        let mut usable = true;
        for template in self.claim_templates() {
            let Some(claim_name) = self.claim_name(template, ordinal) else {
                continue;
            };
            let Some(existing) = claims.get(&claim_name) else {
                let claim = self.new_claim(template, claim_name.clone(), pod, condemned);
                let pod_name = format!("{}-{ordinal}", self.name);
                match self.claims.create(&PostParams::default(), &claim).await {
                    Ok(_) => {
                        let note = format!(
                            "create Claim {claim_name} Pod {pod_name} in StatefulSet {} success",
                            self.name
                        );
                        self.event(EventType::Normal, "SuccessfulCreate", "Create", note)
                            .await;
                    }
                    Err(kube::Error::Api(status)) if status.code == 409 => {}
                    Err(e) => {
                        let note = format!(
                            "create Claim {claim_name} for Pod {pod_name} in StatefulSet {} failed error: {e}",
                            self.name
                        );
                        self.event(EventType::Warning, "FailedCreate", "Create", note)
                            .await;
                        return Err(self.kube(e));
                    }
                }
                continue;
            };
            if existing.metadata.deletion_timestamp.is_some() {
                usable = false;
                continue;
            }
            let current = existing
                .metadata
                .owner_references
                .as_deref()
                .unwrap_or_default();
            let wanted = self.claim_owners(current, pod, condemned);
            let same = wanted.len() == current.len() && wanted.iter().all(|r| current.contains(r));
            if !same {
                let patch = json!({"metadata": {"ownerReferences": wanted}});
                self.claims
                    .patch(&claim_name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| ())
                    .or_else(ignore_not_found)
                    .map_err(|e| self.kube(e))?;
            }
        }
        Ok(usable)
    }

    /// A claim's owners: whatever else owns it, the set when claims are
    /// deleted with it, and a condemned pod when claims go with a
    /// scale-down.
    fn claim_owners(
        &self,
        current: &[OwnerReference],
        pod: Option<&Pod>,
        condemned: bool,
    ) -> Vec<OwnerReference> {
        let pod_name = pod.and_then(|p| p.metadata.name.as_deref());
        let mut owners: Vec<OwnerReference> = current
            .iter()
            .filter(|r| {
                r.uid != self.uid && !(r.kind == "Pod" && Some(r.name.as_str()) == pod_name)
            })
            .cloned()
            .collect();
        if self.claims_follow_set {
            owners.push(OwnerReference {
                api_version: "apps/v1".into(),
                kind: "StatefulSet".into(),
                name: self.name.to_owned(),
                uid: self.uid.to_owned(),
                ..OwnerReference::default()
            });
        }
        if self.claims_follow_scale_down
            && condemned
            && let Some(pod) = pod
            && let (Some(name), Some(uid)) = (&pod.metadata.name, &pod.metadata.uid)
        {
            owners.push(OwnerReference {
                api_version: "v1".into(),
                kind: "Pod".into(),
                name: name.clone(),
                uid: uid.clone(),
                ..OwnerReference::default()
            });
        }
        owners
    }

    fn claim_name(&self, template: &PersistentVolumeClaim, ordinal: i32) -> Option<String> {
        let prefix = template.metadata.name.as_deref()?;
        Some(format!("{prefix}-{}-{ordinal}", self.name))
    }

    fn new_claim(
        &self,
        template: &PersistentVolumeClaim,
        name: String,
        pod: Option<&Pod>,
        condemned: bool,
    ) -> PersistentVolumeClaim {
        let mut labels = template.metadata.labels.clone().unwrap_or_default();
        if let Some(selected) = &self.spec.selector.match_labels {
            labels.extend(selected.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let owners = self.claim_owners(&[], pod, condemned);
        PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(name),
                labels: Some(labels),
                annotations: template.metadata.annotations.clone(),
                owner_references: (!owners.is_empty()).then_some(owners),
                ..ObjectMeta::default()
            },
            spec: template.spec.clone(),
            status: None,
        }
    }

    fn new_pod(&self, ordinal: i32, version: &Version<'_>) -> Pod {
        let name = format!("{}-{ordinal}", self.name);
        let template_meta = version.template.metadata.as_ref();
        let mut labels = template_meta
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        labels.insert(POD_NAME_LABEL.into(), name.clone());
        labels.insert(POD_INDEX_LABEL.into(), ordinal.to_string());
        labels.insert(REVISION_LABEL.into(), version.revision.clone());
        let mut spec = version.template.spec.clone().unwrap_or_default();
        spec.hostname = Some(name.clone());
        if let Some(service) = self.spec.service_name.as_deref().filter(|s| !s.is_empty()) {
            spec.subdomain = Some(service.to_owned());
        }
        let templates = self.claim_templates();
        if !templates.is_empty() {
            // Each claim template's volume replaces a template volume of
            // the same name.
            let mut volumes: Vec<Volume> = templates
                .iter()
                .filter_map(|t| {
                    Some(Volume {
                        name: t.metadata.name.clone()?,
                        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                            claim_name: self.claim_name(t, ordinal)?,
                            read_only: None,
                        }),
                        ..Volume::default()
                    })
                })
                .collect();
            let claimed = |v: &Volume| {
                templates
                    .iter()
                    .any(|t| t.metadata.name.as_deref() == Some(v.name.as_str()))
            };
            volumes.extend(
                spec.volumes
                    .take()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|v| !claimed(v)),
            );
            spec.volumes = Some(volumes);
        }
        Pod {
            metadata: ObjectMeta {
                name: Some(name),
                labels: Some(labels),
                annotations: template_meta.and_then(|m| m.annotations.clone()),
                owner_references: Some(vec![self.owner()]),
                ..ObjectMeta::default()
            },
            spec: Some(spec),
            status: None,
        }
    }

    async fn create(&self, ordinal: i32, version: &Version<'_>) -> Result<(), Error> {
        let pod = self.new_pod(ordinal, version);
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        match self.pods.create(&PostParams::default(), &pod).await {
            Ok(_) => {
                let note = format!("create Pod {name} in StatefulSet {} successful", self.name);
                self.event(EventType::Normal, "SuccessfulCreate", "Create", note)
                    .await;
                Ok(())
            }
            // Not in our list (not ours, or not selected): nothing to
            // create over; it is reported until someone resolves it.
            Err(kube::Error::Api(status)) if status.code == 409 => {
                let note = format!(
                    "create Pod {name} in StatefulSet {} failed: a pod of that name exists and is not controlled by the set",
                    self.name
                );
                self.event(EventType::Warning, "FailedCreate", "Create", note)
                    .await;
                Ok(())
            }
            Err(e) => {
                let note = format!(
                    "create Pod {name} in StatefulSet {} failed error: {e}",
                    self.name
                );
                self.event(EventType::Warning, "FailedCreate", "Create", note)
                    .await;
                Err(self.kube(e))
            }
        }
    }

    async fn delete(&self, pod: &Pod) -> Result<(), Error> {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: pod.metadata.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match self.pods.delete(name, &params).await {
            Ok(_) => {
                let note = format!("delete Pod {name} in StatefulSet {} successful", self.name);
                self.event(EventType::Normal, "SuccessfulDelete", "Delete", note)
                    .await;
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
            Err(e) => {
                let note = format!(
                    "delete Pod {name} in StatefulSet {} failed error: {e}",
                    self.name
                );
                self.event(EventType::Warning, "FailedDelete", "Delete", note)
                    .await;
                Err(self.kube(e))
            }
        }
    }

    /// Puts back identity labels a user took off.
    async fn fix_identity(&self, ordinal: i32, pod: &Pod) -> Result<(), Error> {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let labels = pod.metadata.labels.as_ref();
        let label = |key: &str| labels.and_then(|l| l.get(key)).map(String::as_str);
        let index = ordinal.to_string();
        if label(POD_NAME_LABEL) == Some(name) && label(POD_INDEX_LABEL) == Some(index.as_str()) {
            return Ok(());
        }
        let patch = json!({"metadata": {"labels": {POD_NAME_LABEL: name, POD_INDEX_LABEL: index}}});
        self.pods
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .or_else(ignore_not_found)
            .map_err(|e| self.kube(e))
    }

    /// Takes an orphan whose name makes it one of the set's pods.
    async fn adopt(&self, pod: &Pod) -> Result<(), Error> {
        let name = pod.metadata.name.as_deref().unwrap_or_default();
        let mut owners = pod.metadata.owner_references.clone().unwrap_or_default();
        owners.push(self.owner());
        let patch = json!({"metadata": {"ownerReferences": owners}});
        self.pods
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .or_else(ignore_not_found)
            .map_err(|e| self.kube(e))
    }

    fn owner(&self) -> OwnerReference {
        revision::controller_ref("apps/v1", "StatefulSet", self.name, self.uid)
    }

    async fn event(&self, type_: EventType, reason: &str, action: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        if let Err(e) = self
            .ctx
            .recorder
            .publish(&event, &self.sts.object_ref(&()))
            .await
        {
            tracing::debug!(error = %e, set = %self.key, "recording an event failed");
        }
    }

    fn kube(&self, error: kube::Error) -> Error {
        Error::Kube(self.key.clone(), error)
    }
}

/// The ordinal in a pod name `<set>-<ordinal>`.
fn ordinal_of(set: &str, pod: &str) -> Option<i32> {
    let digits = pod.strip_prefix(set)?.strip_prefix('-')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn pod_revision(pod: &Pod) -> Option<&str> {
    pod.metadata
        .labels
        .as_ref()?
        .get(REVISION_LABEL)
        .map(String::as_str)
}

fn running_and_ready(pod: &Pod) -> bool {
    revision::phase(pod) == "Running" && revision::is_ready(pod)
}

/// Something already gone needs nothing more.
fn ignore_not_found(error: kube::Error) -> Result<(), kube::Error> {
    match error {
        kube::Error::Api(status) if status.code == 404 => Ok(()),
        other => Err(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinals_come_from_the_name() {
        assert_eq!(ordinal_of("web", "web-0"), Some(0));
        assert_eq!(ordinal_of("web", "web-12"), Some(12));
        assert_eq!(ordinal_of("web", "web-x"), None);
        assert_eq!(ordinal_of("web", "web-"), None);
        assert_eq!(ordinal_of("web", "web-+1"), None);
        assert_eq!(ordinal_of("web", "webs-1"), None);
        assert_eq!(ordinal_of("web", "web-a-1"), None);
    }
}
