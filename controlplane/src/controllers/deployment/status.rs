//! A Deployment's status, after upstream's `progress.go` and
//! `deploymentutil`: counts summed over its ReplicaSets, `Available` when
//! at most `maxUnavailable` pods are missing, and `Progressing` that tells
//! `kubectl rollout status` when a rollout is done or stuck past
//! `progressDeadlineSeconds`.

use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentCondition, DeploymentStatus};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;

use super::rollout::{Sets, available, ready, spec_replicas, status_replicas};
use super::{Error, Sync};

pub const AVAILABLE: &str = "Available";
pub const PROGRESSING: &str = "Progressing";
const REPLICA_FAILURE: &str = "ReplicaFailure";
const COMPLETE: &str = "NewReplicaSetAvailable";
const TIMED_OUT: &str = "ProgressDeadlineExceeded";
const PAUSED: &str = "DeploymentPaused";
/// Soonest a stuck rollout is looked at again.
const STUCK_RECHECK: Duration = Duration::from_secs(1);

impl Sync<'_> {
    /// `progressDeadlineSeconds`, unless it is unset or "never" (max i32).
    pub(super) fn progress_deadline(&self) -> Option<i32> {
        self.d
            .spec
            .as_ref()
            .and_then(|s| s.progress_deadline_seconds)
            .filter(|&s| s != i32::MAX)
    }

    /// The status the sets add up to, keeping the conditions (with
    /// `Available` brought up to date) and the collision count.
    fn calculate_status(&self, sets: &Sets) -> DeploymentStatus {
        let old = self.d.status.clone().unwrap_or_default();
        let available_total: i32 = sets.all.iter().map(available).sum();
        let total: i32 = sets.all.iter().map(spec_replicas).sum();
        let mut status = DeploymentStatus {
            observed_generation: self.d.metadata.generation,
            replicas: Some(sets.all.iter().map(status_replicas).sum()),
            updated_replicas: Some(sets.new_set().map_or(0, status_replicas)),
            ready_replicas: Some(sets.all.iter().map(ready).sum()),
            available_replicas: Some(available_total),
            unavailable_replicas: Some((total - available_total).max(0)),
            collision_count: old.collision_count,
            conditions: old.conditions,
            terminating_replicas: old.terminating_replicas,
        };
        let condition = if available_total >= self.replicas() - self.unavailable {
            condition(
                AVAILABLE,
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.".into(),
            )
        } else {
            condition(
                AVAILABLE,
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.".into(),
            )
        };
        set_condition(&mut status, condition);
        status
    }

    /// Upstream's `syncDeploymentStatus`: counts and `Available` only.
    pub(super) async fn sync_status(&mut self, sets: &Sets) -> Result<Option<Duration>, Error> {
        self.d.status = Some(self.calculate_status(sets));
        self.write_status().await?;
        Ok(None)
    }

    /// A Deployment being deleted only reports.
    pub(super) async fn sync_status_only(
        &mut self,
        sets: Vec<k8s_openapi::api::apps::v1::ReplicaSet>,
    ) -> Result<Option<Duration>, Error> {
        let sets = self.sync_revision(sets, false).await?;
        self.sync_status(&sets).await
    }

    /// Upstream's `syncRolloutStatus`: the status with `Progressing` and
    /// `ReplicaFailure` too; when nothing changed, when to look again for a
    /// rollout that may pass its deadline.
    pub(super) async fn sync_rollout_status(
        &mut self,
        sets: &Sets,
    ) -> Result<Option<Duration>, Error> {
        let mut status = self.calculate_status(sets);
        let deadline = self.progress_deadline();
        if deadline.is_none() {
            remove_condition(&mut status, PROGRESSING);
        }
        let current = condition_of(Some(&status), PROGRESSING).cloned();
        let done = status.replicas == status.updated_replicas
            && current.as_ref().and_then(|c| c.reason.as_deref()) == Some(COMPLETE);
        if let Some(deadline) = deadline
            && !done
        {
            let subject = match sets.new_set() {
                Some(rs) => format!("ReplicaSet {:?}", rs.name_any()),
                None => format!("Deployment {:?}", self.d.name_any()),
            };
            let old = self.d.status.clone().unwrap_or_default();
            if complete_with(&self.d, &status) {
                let message = format!("{subject} has successfully progressed.");
                set_condition(
                    &mut status,
                    condition(PROGRESSING, "True", COMPLETE, message),
                );
            } else if progressed(&old, &status) {
                // Progress moves `lastUpdateTime` even with the same reason.
                let message = format!("{subject} is progressing.");
                let mut progressing = condition(PROGRESSING, "True", "ReplicaSetUpdated", message);
                if let Some(current) = current.filter(|c| c.status == "True") {
                    progressing.last_transition_time = current.last_transition_time;
                }
                remove_condition(&mut status, PROGRESSING);
                status.conditions.get_or_insert_default().push(progressing);
            } else if timed_out(deadline, &status, Timestamp::now()) {
                let message = format!("{subject} has timed out progressing.");
                set_condition(
                    &mut status,
                    condition(PROGRESSING, "False", TIMED_OUT, message),
                );
            }
        }
        match replica_failure(sets) {
            Some(failure) => set_condition(&mut status, failure),
            None => remove_condition(&mut status, REPLICA_FAILURE),
        }
        if self.d.status.as_ref() == Some(&status) {
            return Ok(self.recheck_stuck(&status));
        }
        self.d.status = Some(status);
        self.write_status().await?;
        Ok(None)
    }

    /// When a rollout without progress would pass its deadline, so that
    /// it is marked as timed out then.
    fn recheck_stuck(&self, status: &DeploymentStatus) -> Option<Duration> {
        let deadline = self.progress_deadline()?;
        let current = condition_of(Some(status), PROGRESSING)?;
        let reason = current.reason.as_deref();
        // A complete rollout (or one already timed out) cannot time out.
        if complete_with(&self.d, status) || reason == Some(TIMED_OUT) || reason == Some(COMPLETE) {
            return None;
        }
        let since = current.last_update_time.as_ref()?.0;
        let at = since
            .saturating_add(SignedDuration::from_secs(deadline.into()))
            .ok()?;
        let left = Duration::try_from(at.duration_since(Timestamp::now())).unwrap_or_default();
        Some(left.max(STUCK_RECHECK))
    }

    /// A paused Deployment says so in `Progressing`, and that it resumed.
    pub(super) async fn check_paused_conditions(&mut self) -> Result<(), Error> {
        if self.progress_deadline().is_none() {
            return Ok(());
        }
        let reason =
            condition_of(self.d.status.as_ref(), PROGRESSING).and_then(|c| c.reason.clone());
        if reason.as_deref() == Some(TIMED_OUT) {
            return Ok(());
        }
        let paused_noted = reason.as_deref() == Some(PAUSED);
        let update = match (self.paused(), paused_noted) {
            (true, false) => condition(
                PROGRESSING,
                "Unknown",
                PAUSED,
                "Deployment is paused".into(),
            ),
            (false, true) => condition(
                PROGRESSING,
                "Unknown",
                "DeploymentResumed",
                "Deployment is resumed".into(),
            ),
            _ => return Ok(()),
        };
        set_condition(self.d.status.get_or_insert_default(), update);
        self.write_status().await
    }
}

/// Upstream's `DeploymentComplete` for the status the server holds.
pub fn complete(d: &Deployment) -> bool {
    d.status.as_ref().is_some_and(|s| complete_with(d, s))
}

/// Every replica updated and available, and the spec observed.
fn complete_with(d: &Deployment, status: &DeploymentStatus) -> bool {
    let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    status.updated_replicas.unwrap_or(0) == replicas
        && status.replicas.unwrap_or(0) == replicas
        && status.available_replicas.unwrap_or(0) == replicas
        && status.observed_generation >= d.metadata.generation
}

/// More pods updated, ready or available, or fewer old ones, than before.
fn progressed(old: &DeploymentStatus, new: &DeploymentStatus) -> bool {
    let count = |v: Option<i32>| v.unwrap_or(0);
    let old_pods = count(old.replicas) - count(old.updated_replicas);
    let new_pods = count(new.replicas) - count(new.updated_replicas);
    count(new.updated_replicas) > count(old.updated_replicas)
        || new_pods < old_pods
        || count(new.ready_replicas) > count(old.ready_replicas)
        || count(new.available_replicas) > count(old.available_replicas)
}

/// No progress noted for `deadline` seconds.
fn timed_out(deadline: i32, status: &DeploymentStatus, now: Timestamp) -> bool {
    let Some(current) = condition_of(Some(status), PROGRESSING) else {
        return false;
    };
    match current.reason.as_deref() {
        Some(COMPLETE) => return false,
        Some(TIMED_OUT) => return true,
        _ => {}
    }
    current
        .last_update_time
        .as_ref()
        .and_then(|t| {
            t.0.saturating_add(SignedDuration::from_secs(deadline.into()))
                .ok()
        })
        .is_some_and(|at| at < now)
}

/// The new set's `ReplicaFailure`, else any set's.
fn replica_failure(sets: &Sets) -> Option<DeploymentCondition> {
    sets.new_set()
        .into_iter()
        .chain(sets.all.iter())
        .filter_map(|rs| rs.status.as_ref()?.conditions.as_ref())
        .flatten()
        .find(|c| c.type_ == REPLICA_FAILURE)
        .map(|c| {
            condition(
                REPLICA_FAILURE,
                &c.status,
                c.reason.as_deref().unwrap_or_default(),
                c.message.clone().unwrap_or_default(),
            )
        })
}

pub fn condition(type_: &str, status: &str, reason: &str, message: String) -> DeploymentCondition {
    let now = crate::controllers::workload::now();
    DeploymentCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message),
        last_update_time: Some(now.clone()),
        last_transition_time: Some(now),
    }
}

pub fn condition_of<'a>(
    status: Option<&'a DeploymentStatus>,
    type_: &str,
) -> Option<&'a DeploymentCondition> {
    status?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
}

/// Upstream's `SetDeploymentCondition`: the same status and reason is no
/// change; the same status keeps its transition time.
pub fn set_condition(status: &mut DeploymentStatus, mut update: DeploymentCondition) {
    if let Some(current) = condition_of(Some(status), &update.type_) {
        if current.status == update.status && current.reason == update.reason {
            return;
        }
        if current.status == update.status {
            update.last_transition_time = current.last_transition_time.clone();
        }
    }
    remove_condition(status, &update.type_);
    status.conditions.get_or_insert_default().push(update);
}

fn remove_condition(status: &mut DeploymentStatus, type_: &str) {
    if let Some(conditions) = status.conditions.as_mut() {
        conditions.retain(|c| c.type_ != type_);
        if conditions.is_empty() {
            status.conditions = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    #[test]
    fn conditions_keep_transition_times_and_skip_no_ops() {
        let mut status = DeploymentStatus::default();
        let mut first = condition(AVAILABLE, "True", "A", "one".into());
        first.last_transition_time = Some(Time(Timestamp::UNIX_EPOCH));
        set_condition(&mut status, first);
        set_condition(&mut status, condition(AVAILABLE, "True", "A", "two".into()));
        let current = condition_of(Some(&status), AVAILABLE).unwrap();
        assert_eq!(current.message.as_deref(), Some("one"));
        set_condition(
            &mut status,
            condition(AVAILABLE, "True", "B", "three".into()),
        );
        let current = condition_of(Some(&status), AVAILABLE).unwrap();
        assert_eq!(current.reason.as_deref(), Some("B"));
        assert_eq!(
            current.last_transition_time,
            Some(Time(Timestamp::UNIX_EPOCH))
        );
        set_condition(
            &mut status,
            condition(AVAILABLE, "False", "C", "four".into()),
        );
        let current = condition_of(Some(&status), AVAILABLE).unwrap();
        assert_ne!(
            current.last_transition_time,
            Some(Time(Timestamp::UNIX_EPOCH))
        );
        assert_eq!(status.conditions.as_ref().map(Vec::len), Some(1));
    }

    #[test]
    fn deadline_passes_without_progress() {
        let mut status = DeploymentStatus::default();
        let mut progressing = condition(PROGRESSING, "True", "ReplicaSetUpdated", String::new());
        progressing.last_update_time = Some(Time(Timestamp::from_second(1_000).unwrap()));
        set_condition(&mut status, progressing);
        let at = |s| Timestamp::from_second(s).unwrap();
        assert!(!timed_out(600, &status, at(1_500)));
        assert!(timed_out(600, &status, at(1_601)));
        let before = DeploymentStatus {
            replicas: Some(4),
            updated_replicas: Some(1),
            ..Default::default()
        };
        let after = DeploymentStatus {
            replicas: Some(4),
            updated_replicas: Some(2),
            ..Default::default()
        };
        assert!(progressed(&before, &after));
        assert!(!progressed(&after, &after));
    }
}
