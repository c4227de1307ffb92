//! The steps of a Deployment sync, after upstream's `sync.go`,
//! `rolling.go` and `recreate.go`: find or create the new ReplicaSet and
//! number the revisions, roll, recreate, scale proportionally, and clean
//! up old history.

use std::cmp::{Ordering, Reverse};
use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, ReplicaSetSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PostParams};
use serde_json::json;

use super::{Error, MANAGER, Sync, params, replicas, status, template};
use crate::controllers::workload::{self, POD_TEMPLATE_HASH};

pub const REVISION: &str = "deployment.kubernetes.io/revision";
const REVISION_HISTORY: &str = "deployment.kubernetes.io/revision-history";
const DESIRED_REPLICAS: &str = "deployment.kubernetes.io/desired-replicas";
const MAX_REPLICAS: &str = "deployment.kubernetes.io/max-replicas";
/// Deployment annotations its ReplicaSets do not copy.
const NOT_COPIED: &[&str] = &[
    "kubectl.kubernetes.io/last-applied-configuration",
    REVISION,
    REVISION_HISTORY,
    DESIRED_REPLICAS,
    MAX_REPLICAS,
    "deprecated.deployment.rollback.to",
];
/// Longest `revision-history` annotation kept (upstream's default).
const MAX_HISTORY_CHARS: usize = 2000;
/// How often `Recreate` looks again for old pods still shutting down.
const OLD_PODS_POLL: Duration = Duration::from_secs(1);

/// A Deployment's ReplicaSets, oldest first; `new` indexes the one whose
/// template is the Deployment's, if there is one.
pub(super) struct Sets {
    pub all: Vec<ReplicaSet>,
    pub new: Option<usize>,
}

impl Sets {
    fn split(d: &Deployment, mut all: Vec<ReplicaSet>) -> Sets {
        all.sort_by(by_creation);
        let new = d.spec.as_ref().and_then(|spec| {
            all.iter().position(|rs| {
                rs.spec
                    .as_ref()
                    .and_then(|s| s.template.as_ref())
                    .is_some_and(|t| template::same(t, &spec.template))
            })
        });
        Sets { all, new }
    }

    pub fn new_set(&self) -> Option<&ReplicaSet> {
        self.new.and_then(|i| self.all.get(i))
    }

    pub fn old(&self) -> impl Iterator<Item = &ReplicaSet> {
        self.all
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != self.new)
            .map(|(_, rs)| rs)
    }

    /// Indexes of the old sets, oldest first.
    fn old_indexes(&self) -> Vec<usize> {
        (0..self.all.len())
            .filter(|i| Some(*i) != self.new)
            .collect()
    }
}

pub(super) fn spec_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

pub(super) fn status_replicas(rs: &ReplicaSet) -> i32 {
    rs.status.as_ref().map_or(0, |s| s.replicas)
}

pub(super) fn available(rs: &ReplicaSet) -> i32 {
    rs.status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0)
}

pub(super) fn ready(rs: &ReplicaSet) -> i32 {
    rs.status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0)
}

fn revision(rs: &ReplicaSet) -> i64 {
    rs.annotations()
        .get(REVISION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn annotated(rs: &ReplicaSet, key: &str) -> Option<i32> {
    rs.annotations().get(key).and_then(|v| v.parse().ok())
}

fn by_creation(a: &ReplicaSet, b: &ReplicaSet) -> Ordering {
    let created = |rs: &ReplicaSet| rs.metadata.creation_timestamp.as_ref().map(|t| t.0);
    created(a)
        .cmp(&created(b))
        .then_with(|| a.metadata.name.cmp(&b.metadata.name))
}

impl Sync<'_> {
    /// Upstream's `getAllReplicaSetsAndSyncRevision`: splits the sets into
    /// new and old, creates the new one if asked to, and numbers it one
    /// past the newest old revision (reusing an old set for a template seen
    /// before, as after `kubectl rollout undo`, renumbers it).
    pub(super) async fn sync_revision(
        &mut self,
        sets: Vec<ReplicaSet>,
        create: bool,
    ) -> Result<Sets, Error> {
        let mut sets = Sets::split(&self.d, sets);
        let max_old = sets.old().map(revision).max().unwrap_or(0);
        let new_revision = (max_old + 1).to_string();
        match sets.new {
            Some(i) => self.update_new_set(&mut sets.all[i], &new_revision).await?,
            None if create => {
                let created = self.create_new_set(&sets, &new_revision).await?;
                sets.all.push(created);
                sets.new = Some(sets.all.len() - 1);
            }
            None => {}
        }
        Ok(sets)
    }

    async fn update_new_set(
        &mut self,
        rs: &mut ReplicaSet,
        new_revision: &str,
    ) -> Result<(), Error> {
        let mut annotations = rs.annotations().clone();
        let changed = self.new_set_annotations(&mut annotations, new_revision, false);
        let min_ready = self.spec_min_ready();
        let min_ready_changed = rs
            .spec
            .as_ref()
            .and_then(|s| s.min_ready_seconds)
            .unwrap_or(0)
            != min_ready;
        if changed || min_ready_changed {
            let patch = json!({
                "metadata": {
                    "resourceVersion": rs.metadata.resource_version,
                    "annotations": annotations,
                },
                "spec": {"minReadySeconds": min_ready},
            });
            *rs = self
                .sets_api
                .patch(&rs.name_any(), &params(), &Patch::Merge(&patch))
                .await
                .map_err(|e| Error::Kube("updating the new replicaset", e))?;
        }
        let revision = rs.annotations().get(REVISION).cloned().unwrap_or_default();
        self.write_revision(&revision).await?;
        if self.progress_deadline().is_some()
            && status::condition_of(self.d.status.as_ref(), status::PROGRESSING).is_none()
        {
            let message = format!("Found new replica set {:?}", rs.name_any());
            status::set_condition(
                self.d.status.get_or_insert_default(),
                status::condition(status::PROGRESSING, "True", "FoundNewReplicaSet", message),
            );
            self.write_status().await?;
        }
        Ok(())
    }

    async fn create_new_set(
        &mut self,
        sets: &Sets,
        new_revision: &str,
    ) -> Result<ReplicaSet, Error> {
        let spec = self.d.spec.clone().unwrap_or_default();
        let collisions = self.d.status.as_ref().and_then(|s| s.collision_count);
        let hash = template::hash(&spec.template, collisions);
        let mut pod_template = spec.template;
        let metadata = pod_template.metadata.get_or_insert_default();
        metadata
            .labels
            .get_or_insert_default()
            .insert(POD_TEMPLATE_HASH.into(), hash.clone());
        let labels = metadata.labels.clone();
        let mut selector = spec.selector;
        selector
            .match_labels
            .get_or_insert_default()
            .insert(POD_TEMPLATE_HASH.into(), hash.clone());
        let name = format!("{}-{hash}", self.d.name_any());
        let size = if self.recreate() {
            self.replicas()
        } else {
            let all: i32 = sets.old().map(spec_replicas).sum();
            replicas::rolling_new_size(self.replicas(), self.surge, all, 0)
        };
        let mut annotations = BTreeMap::new();
        self.new_set_annotations(&mut annotations, new_revision, true);
        let new_set = ReplicaSet {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: self.d.metadata.namespace.clone(),
                labels,
                annotations: Some(annotations),
                owner_references: workload::controller_ref(&self.d).map(|r| vec![r]),
                ..ObjectMeta::default()
            },
            spec: Some(ReplicaSetSpec {
                replicas: Some(size),
                min_ready_seconds: spec.min_ready_seconds,
                selector,
                template: Some(pod_template),
            }),
            status: None,
        };
        let post = PostParams {
            field_manager: Some(MANAGER.into()),
            ..PostParams::default()
        };
        match self.sets_api.create(&post, &new_set).await {
            Ok(created) => {
                if size > 0 {
                    let note = format!("Scaled up replica set {name} from 0 to {size}");
                    self.event(false, "ScalingReplicaSet", "Scale", note).await;
                }
                self.write_revision(new_revision).await?;
                if self.progress_deadline().is_some() {
                    let message = format!("Created new replica set {name:?}");
                    status::set_condition(
                        self.d.status.get_or_insert_default(),
                        status::condition(
                            status::PROGRESSING,
                            "True",
                            "NewReplicaSetCreated",
                            message,
                        ),
                    );
                    self.write_status().await?;
                }
                Ok(created)
            }
            Err(e) if workload::is_already_exists(&e) => {
                let existing = self
                    .sets_api
                    .get_opt(&name)
                    .await
                    .map_err(|e| Error::Kube("reading the existing replicaset", e))?;
                // Our own set the cache has not shown yet.
                if let Some(existing) = existing
                    && workload::controller_of(&existing.metadata).map(|r| &r.uid)
                        == self.d.metadata.uid.as_ref()
                    && existing
                        .spec
                        .as_ref()
                        .and_then(|s| s.template.as_ref())
                        .zip(self.d.spec.as_ref())
                        .is_some_and(|(t, spec)| template::same(t, &spec.template))
                {
                    self.write_revision(new_revision).await?;
                    return Ok(existing);
                }
                // Someone else's set has the name: hash again with a higher
                // collision count.
                let status = self.d.status.get_or_insert_default();
                status.collision_count = Some(status.collision_count.unwrap_or(0) + 1);
                self.write_status().await?;
                Err(Error::Collision(name))
            }
            Err(e) => {
                let message = format!(
                    "Failed to create new replica set {name:?}: {}",
                    workload::api_message(&e)
                );
                if self.progress_deadline().is_some() {
                    status::set_condition(
                        self.d.status.get_or_insert_default(),
                        status::condition(
                            status::PROGRESSING,
                            "False",
                            "ReplicaSetCreateError",
                            message.clone(),
                        ),
                    );
                    self.write_status().await?;
                }
                self.event(true, "ReplicaSetCreateError", "Create", message)
                    .await;
                Err(Error::Kube("creating the new replicaset", e))
            }
        }
    }

    /// Upstream's `SetNewReplicaSetAnnotations`: the Deployment's own
    /// annotations, the revision (keeping the ones it replaces in the
    /// history), and for a set about to be created its replica counts.
    fn new_set_annotations(
        &self,
        annotations: &mut BTreeMap<String, String>,
        new_revision: &str,
        creating: bool,
    ) -> bool {
        let mut changed = false;
        for (key, value) in self.d.annotations() {
            if NOT_COPIED.contains(&key.as_str()) || annotations.get(key) == Some(value) {
                continue;
            }
            annotations.insert(key.clone(), value.clone());
            changed = true;
        }
        let old_revision = annotations.get(REVISION).cloned();
        let old_number: i64 = old_revision
            .as_deref()
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        let new_number: i64 = new_revision.parse().unwrap_or(0);
        if old_number < new_number {
            annotations.insert(REVISION.into(), new_revision.into());
            changed = true;
            if let Some(old) = old_revision.filter(|r| !r.is_empty()) {
                append_history(annotations, &old);
            }
        }
        if creating {
            changed |= self.set_replica_annotations(annotations);
        }
        changed
    }

    /// The desired and maximum replica counts a set was last sized for:
    /// what proportional scaling reads back.
    fn set_replica_annotations(&self, annotations: &mut BTreeMap<String, String>) -> bool {
        let desired = self.replicas().to_string();
        let max = (self.replicas() + self.surge).to_string();
        let mut changed = false;
        for (key, value) in [(DESIRED_REPLICAS, desired), (MAX_REPLICAS, max)] {
            if annotations.get(key) != Some(&value) {
                annotations.insert(key.into(), value);
                changed = true;
            }
        }
        changed
    }

    /// Upstream's `isScalingEvent`: an active set was sized for another
    /// replica count than the Deployment's.
    pub(super) fn is_scaling_event(&self, sets: &[ReplicaSet]) -> bool {
        sets.iter()
            .filter(|rs| spec_replicas(rs) > 0)
            .filter_map(|rs| annotated(rs, DESIRED_REPLICAS))
            .any(|desired| desired != self.replicas())
    }

    /// A rolling update step: grow the new set, else shrink old ones, else
    /// (complete) clean up history.
    pub(super) async fn rollout_rolling(
        &mut self,
        sets: Vec<ReplicaSet>,
    ) -> Result<Option<Duration>, Error> {
        let mut sets = self.sync_revision(sets, true).await?;
        if self.reconcile_new(&mut sets).await? || self.reconcile_old(&mut sets).await? {
            return self.sync_rollout_status(&sets).await;
        }
        if status::complete(&self.d) {
            self.cleanup(&sets).await?;
        }
        self.sync_rollout_status(&sets).await
    }

    async fn reconcile_new(&mut self, sets: &mut Sets) -> Result<bool, Error> {
        let Some(i) = sets.new else {
            return Ok(false);
        };
        let desired = self.replicas();
        let current = spec_replicas(&sets.all[i]);
        if current == desired {
            return Ok(false);
        }
        let size = if current > desired {
            desired
        } else {
            let all = sets.all.iter().map(spec_replicas).sum();
            replicas::rolling_new_size(desired, self.surge, all, current)
        };
        self.scale_set(&mut sets.all[i], size, false).await
    }

    /// Shrinks old sets as far as availability allows: first their
    /// unavailable pods, then available ones down to `replicas -
    /// maxUnavailable` available in all.
    async fn reconcile_old(&mut self, sets: &mut Sets) -> Result<bool, Error> {
        let old_total: i32 = sets.old().map(spec_replicas).sum();
        if old_total == 0 {
            return Ok(false);
        }
        let all_total = old_total + sets.new_set().map_or(0, spec_replicas);
        let min_available = self.replicas() - self.unavailable;
        let new_unavailable = sets
            .new_set()
            .map_or(0, |rs| (spec_replicas(rs) - available(rs)).max(0));
        let max_scaled_down = all_total - min_available - new_unavailable;
        if max_scaled_down <= 0 {
            return Ok(false);
        }
        let cleaned = self.cleanup_unhealthy(sets, max_scaled_down).await?;
        let scaled = self.scale_down_old(sets, min_available).await?;
        Ok(cleaned + scaled > 0)
    }

    /// Scales old sets down by their unavailable pods, oldest first.
    async fn cleanup_unhealthy(&mut self, sets: &mut Sets, max: i32) -> Result<i32, Error> {
        let mut total = 0;
        for i in sets.old_indexes() {
            if total >= max {
                break;
            }
            let rs = &mut sets.all[i];
            let (size, healthy) = (spec_replicas(rs), available(rs));
            if size == 0 || healthy >= size {
                continue;
            }
            let down = (max - total).min(size - healthy);
            self.scale_set(rs, size - down, false).await?;
            total += down;
        }
        Ok(total)
    }

    /// Scales old sets down, oldest first, keeping `min_available` pods
    /// available. A set's availability never counts above its size: a set
    /// just scaled down may not have reported yet.
    async fn scale_down_old(&mut self, sets: &mut Sets, min_available: i32) -> Result<i32, Error> {
        let available_total: i32 = sets
            .all
            .iter()
            .map(|rs| available(rs).min(spec_replicas(rs)))
            .sum();
        if available_total <= min_available {
            return Ok(0);
        }
        let wanted = available_total - min_available;
        let mut total = 0;
        for i in sets.old_indexes() {
            if total >= wanted {
                break;
            }
            let rs = &mut sets.all[i];
            let size = spec_replicas(rs);
            if size == 0 {
                continue;
            }
            let down = size.min(wanted - total);
            self.scale_set(rs, size - down, false).await?;
            total += down;
        }
        Ok(total)
    }

    /// `Recreate`: every old pod is gone before the new set grows.
    pub(super) async fn rollout_recreate(
        &mut self,
        sets: Vec<ReplicaSet>,
    ) -> Result<Option<Duration>, Error> {
        let mut sets = self.sync_revision(sets, false).await?;
        let mut scaled = false;
        for i in sets.old_indexes() {
            if spec_replicas(&sets.all[i]) > 0 {
                scaled |= self.scale_set(&mut sets.all[i], 0, false).await?;
            }
        }
        if scaled {
            return self.sync_rollout_status(&sets).await;
        }
        if self.old_pods_running(&sets).await? {
            let wake = self.sync_rollout_status(&sets).await?;
            return Ok(Some(wake.map_or(OLD_PODS_POLL, |w| w.min(OLD_PODS_POLL))));
        }
        if sets.new.is_none() {
            sets = self.sync_revision(sets.all, true).await?;
        }
        if let Some(i) = sets.new {
            let desired = self.replicas();
            self.scale_set(&mut sets.all[i], desired, false).await?;
        }
        if status::complete(&self.d) {
            self.cleanup(&sets).await?;
        }
        self.sync_rollout_status(&sets).await
    }

    /// Whether pods of old sets still run, including ones shutting down
    /// (their sets no longer count them). Pods are read live, and only
    /// while the new set still has to grow.
    async fn old_pods_running(&self, sets: &Sets) -> Result<bool, Error> {
        if sets.old().map(status_replicas).sum::<i32>() > 0 {
            return Ok(true);
        }
        if sets
            .new_set()
            .is_some_and(|rs| spec_replicas(rs) >= self.replicas())
        {
            return Ok(false);
        }
        let Some(selector) = self
            .d
            .spec
            .as_ref()
            .and_then(|s| workload::selector(&s.selector))
        else {
            return Ok(false);
        };
        let old: Vec<&str> = sets
            .old()
            .filter_map(|rs| rs.metadata.uid.as_deref())
            .collect();
        let pods: Api<Pod> = Api::namespaced(
            self.ctx.client.clone(),
            self.d.metadata.namespace.as_deref().unwrap_or("default"),
        );
        let list = pods
            .list(&ListParams::default().labels_from(&selector))
            .await
            .map_err(|e| Error::Kube("listing the deployment's pods", e))?;
        Ok(list.items.iter().any(|pod| {
            let finished = pod
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|p| p == "Succeeded" || p == "Failed");
            !finished
                && workload::controller_of(&pod.metadata)
                    .is_some_and(|r| old.contains(&r.uid.as_str()))
        }))
    }

    /// Upstream's `sync`, for a paused Deployment or a scaling event: sizes
    /// change, the template does not roll.
    pub(super) async fn sync_scale(
        &mut self,
        sets: Vec<ReplicaSet>,
    ) -> Result<Option<Duration>, Error> {
        let mut sets = self.sync_revision(sets, false).await?;
        self.scale(&mut sets).await?;
        if self.paused() {
            self.cleanup(&sets).await?;
        }
        self.sync_status(&sets).await
    }

    /// Resizes the sets to a new `spec.replicas`: all to the one active set
    /// if there is one, else in proportion to their sizes.
    async fn scale(&mut self, sets: &mut Sets) -> Result<(), Error> {
        let desired = self.replicas();
        let mut active: Vec<usize> = (0..sets.all.len())
            .filter(|&i| spec_replicas(&sets.all[i]) > 0)
            .collect();
        let only = match active.len() {
            0 => sets.new.or_else(|| sets.old_indexes().last().copied()),
            1 => Some(active[0]),
            _ => None,
        };
        if let Some(i) = only {
            if spec_replicas(&sets.all[i]) != desired {
                self.scale_set(&mut sets.all[i], desired, false).await?;
            }
            return Ok(());
        }
        // The new set alone is fully up and available: the old ones go.
        let saturated = sets.new_set().is_some_and(|rs| {
            spec_replicas(rs) == desired
                && annotated(rs, DESIRED_REPLICAS) == Some(desired)
                && available(rs) == desired
        });
        if saturated {
            for i in sets.old_indexes() {
                if spec_replicas(&sets.all[i]) > 0 {
                    self.scale_set(&mut sets.all[i], 0, false).await?;
                }
            }
            return Ok(());
        }
        if self.recreate() {
            return Ok(());
        }
        let total: i32 = active.iter().map(|&i| spec_replicas(&sets.all[i])).sum();
        let allowed = if desired > 0 { desired + self.surge } else { 0 };
        let growing = allowed > total;
        // Largest first; on ties, newer first when growing, older when shrinking.
        active.sort_by(|&a, &b| {
            let (a, b) = (&sets.all[a], &sets.all[b]);
            let ties = if growing {
                by_creation(b, a)
            } else {
                by_creation(a, b)
            };
            Reverse(spec_replicas(a))
                .cmp(&Reverse(spec_replicas(b)))
                .then(ties)
        });
        let current: Vec<(i32, Option<i32>)> = active
            .iter()
            .map(|&i| {
                (
                    spec_replicas(&sets.all[i]),
                    annotated(&sets.all[i], MAX_REPLICAS),
                )
            })
            .collect();
        let status_replicas = self.d.status.as_ref().and_then(|s| s.replicas).unwrap_or(0);
        let sizes = replicas::spread(&current, desired, self.surge, status_replicas);
        for (i, size) in active.into_iter().zip(sizes) {
            self.scale_set(&mut sets.all[i], size, true).await?;
        }
        Ok(())
    }

    /// Sets a set's size, with the replica annotations proportional
    /// scaling relies on. Unless `annotate` asks to refresh the annotations
    /// anyway, a set already at `size` is left alone. True if the size
    /// changed.
    async fn scale_set(
        &mut self,
        rs: &mut ReplicaSet,
        size: i32,
        annotate: bool,
    ) -> Result<bool, Error> {
        let before = spec_replicas(rs);
        if before == size && !annotate {
            return Ok(false);
        }
        let mut annotations = BTreeMap::new();
        let stale = self.set_replica_annotations(&mut annotations)
            && annotations
                .iter()
                .any(|(k, v)| rs.annotations().get(k) != Some(v));
        if before == size && !stale {
            return Ok(false);
        }
        // The resourceVersion makes a write from a stale cache fail (and
        // the sync retry) instead of undoing a newer change.
        let patch = json!({
            "metadata": {
                "resourceVersion": rs.metadata.resource_version,
                "annotations": annotations,
            },
            "spec": {"replicas": size},
        });
        *rs = self
            .sets_api
            .patch(&rs.name_any(), &params(), &Patch::Merge(&patch))
            .await
            .map_err(|e| Error::Kube("scaling a replicaset", e))?;
        if before == size {
            return Ok(false);
        }
        let direction = if before < size { "up" } else { "down" };
        let note = format!(
            "Scaled {direction} replica set {} from {before} to {size}",
            rs.name_any()
        );
        self.event(false, "ScalingReplicaSet", "Scale", note).await;
        Ok(true)
    }

    /// Deletes the oldest old sets beyond `revisionHistoryLimit`, once they
    /// are empty and settled.
    async fn cleanup(&self, sets: &Sets) -> Result<(), Error> {
        let Some(limit) = self.d.spec.as_ref().and_then(|s| s.revision_history_limit) else {
            return Ok(());
        };
        let mut alive: Vec<&ReplicaSet> = sets
            .old()
            .filter(|rs| rs.metadata.deletion_timestamp.is_none())
            .collect();
        let excess = alive.len().saturating_sub(limit.max(0) as usize);
        if excess == 0 {
            return Ok(());
        }
        alive.sort_by(|a, b| {
            revision(a)
                .cmp(&revision(b))
                .then_with(|| by_creation(a, b))
        });
        for rs in alive.into_iter().take(excess) {
            let settled =
                rs.metadata.generation <= rs.status.as_ref().and_then(|s| s.observed_generation);
            if status_replicas(rs) != 0 || spec_replicas(rs) != 0 || !settled {
                continue;
            }
            tracing::debug!(replicaset = %rs.name_any(), "deleting old replicaset beyond the history limit");
            match self
                .sets_api
                .delete(&rs.name_any(), &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(e) if workload::is_not_found(&e) => {}
                Err(e) => return Err(Error::Kube("deleting an old replicaset", e)),
            }
        }
        Ok(())
    }

    fn spec_min_ready(&self) -> i32 {
        self.d
            .spec
            .as_ref()
            .and_then(|s| s.min_ready_seconds)
            .unwrap_or(0)
    }
}

/// Appends `old` to the revision history, dropping the oldest entries to
/// stay within [`MAX_HISTORY_CHARS`].
fn append_history(annotations: &mut BTreeMap<String, String>, old: &str) {
    let history = annotations
        .get(REVISION_HISTORY)
        .cloned()
        .unwrap_or_default();
    let mut revisions: Vec<&str> = history.split(',').filter(|r| !r.is_empty()).collect();
    revisions.push(old);
    while revisions.join(",").len() > MAX_HISTORY_CHARS && revisions.len() > 1 {
        revisions.remove(0);
    }
    annotations.insert(REVISION_HISTORY.into(), revisions.join(","));
}
