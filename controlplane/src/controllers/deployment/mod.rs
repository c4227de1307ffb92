//! Deployment: rolls a pod template out through ReplicaSets, as upstream's
//! controller does. Each template gets a ReplicaSet `<deployment>-<hash>`;
//! a rolling update grows the new set and shrinks the old ones within
//! `maxSurge`/`maxUnavailable`, `Recreate` empties the old sets first. The
//! revision annotation numbers the templates for `kubectl rollout history`
//! and `undo`; conditions and counts in the status drive `kubectl rollout
//! status`.
//!
//! - [`rollout`]: the steps of a sync (new set, rolling, recreate, scaling,
//!   history cleanup).
//! - [`status`]: the status and its `Available`/`Progressing` conditions.
//! - [`replicas`], [`template`]: the pure arithmetic and template hashing.

mod replicas;
mod rollout;
mod status;
mod template;

use std::sync::Arc;

use futures::{StreamExt, stream};
use k8s_openapi::api::apps::v1::{Deployment, DeploymentStatus, ReplicaSet};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{self, Action, applier, trigger_self, trigger_with};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::workload::{self, Claim, Retries};

const MANAGER: &str = "deployment-controller";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}: {1}")]
    Kube(&'static str, #[source] kube::Error),
    #[error("the replicaset cache stopped")]
    CacheGone,
    #[error("replicaset {0} exists with another template; trying the next name")]
    Collision(String),
}

struct Context {
    client: kube::Client,
    sets: Store<ReplicaSet>,
    recorder: Recorder,
    retries: Retries,
}

pub async fn run(client: kube::Client) {
    let (deployments, deployments_writer) = reflector::store::<Deployment>();
    let (sets, sets_writer) = reflector::store::<ReplicaSet>();
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), Reporter::from(MANAGER)),
        client: client.clone(),
        sets: sets.clone(),
        retries: Retries::default(),
    });
    let forget = ctx.clone();
    let deployment_changes = watcher(
        Api::<Deployment>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(deployments_writer)
    .inspect(move |event| {
        if let Ok(watcher::Event::Delete(d)) = event {
            forget.retries.succeeded(&workload::key(&d.metadata));
        }
    })
    .applied_objects();
    // The reflector has stored each change before it triggers a reconcile.
    let set_changes = watcher(Api::<ReplicaSet>::all(client), watcher::Config::default())
        .default_backoff()
        .reflect(sets_writer)
        .touched_objects();
    let lookup = deployments.clone();
    let queue = stream::select(
        trigger_self(deployment_changes, ()),
        trigger_with(set_changes, move |set: ReplicaSet| {
            deployments_for_set(&lookup, &set)
        }),
    );
    applier(
        |object, ctx| Box::pin(reconcile(object, ctx)),
        error_policy,
        ctx,
        deployments,
        queue,
        controller::Config::default(),
    )
    .for_each(|result| async move {
        if let Err(error) = result {
            tracing::debug!(%error, "deployment reconcile");
        }
    })
    .await;
}

/// The Deployments a ReplicaSet change concerns: its controller, or (an
/// orphan) every Deployment in its namespace that selects it.
fn deployments_for_set(
    deployments: &Store<Deployment>,
    set: &ReplicaSet,
) -> Vec<ObjectRef<Deployment>> {
    let namespace = set.metadata.namespace.as_deref();
    if let Some(owner) = workload::controller_of(&set.metadata) {
        if owner.kind == "Deployment" && owner.api_version == "apps/v1" {
            return vec![ObjectRef::new(&owner.name).within(namespace.unwrap_or_default())];
        }
        return Vec::new();
    }
    deployments
        .state()
        .iter()
        .filter(|d| d.metadata.namespace.as_deref() == namespace)
        .filter(|d| {
            d.spec
                .as_ref()
                .and_then(|s| workload::selector(&s.selector))
                .is_some_and(|s| workload::selects(&s, &set.metadata))
        })
        .map(|d| ObjectRef::from_obj(d.as_ref()))
        .collect()
}

async fn reconcile(deployment: Arc<Deployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let key = workload::key(&deployment.metadata);
    let action = sync(&deployment, &ctx).await?;
    ctx.retries.succeeded(&key);
    Ok(action)
}

fn error_policy(deployment: Arc<Deployment>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = workload::key(&deployment.metadata);
    if let Error::Kube(_, e) = error
        && workload::is_conflict(e)
    {
        tracing::debug!(deployment = %key, %error, "deployment sync lost a race; retrying");
        return Action::requeue(workload::CONFLICT_RETRY);
    }
    tracing::warn!(deployment = %key, %error, "deployment sync failed; retrying");
    Action::requeue(ctx.retries.failed(key))
}

/// Upstream's `syncDeployment`.
async fn sync(deployment: &Deployment, ctx: &Context) -> Result<Action, Error> {
    ctx.sets
        .wait_until_ready()
        .await
        .map_err(|_| Error::CacheGone)?;
    let mut sync = Sync::new(ctx, deployment.clone());
    let selector = deployment
        .spec
        .as_ref()
        .and_then(|s| workload::selector(&s.selector));
    let Some(selector) = selector else {
        sync.event(
            true,
            "SelectingAll",
            "Sync",
            "This deployment is selecting all pods. A non-empty selector is required.".into(),
        )
        .await;
        let status = sync.d.status.get_or_insert_default();
        status.observed_generation = sync.d.metadata.generation;
        sync.write_status().await?;
        return Ok(Action::await_change());
    };
    let budget = match sync.budget() {
        Ok(budget) => budget,
        Err(message) => {
            sync.event(true, "InvalidStrategy", "Sync", message).await;
            return Ok(Action::await_change());
        }
    };
    sync.surge = budget.0;
    sync.unavailable = budget.1;
    let sets = sync.claim_sets(&selector).await?;
    let wake = if sync.d.metadata.deletion_timestamp.is_some() {
        sync.sync_status_only(sets).await?
    } else {
        sync.check_paused_conditions().await?;
        if sync.paused() || sync.is_scaling_event(&sets) {
            sync.sync_scale(sets).await?
        } else if sync.recreate() {
            sync.rollout_recreate(sets).await?
        } else {
            sync.rollout_rolling(sets).await?
        }
    };
    Ok(wake.map_or_else(Action::await_change, Action::requeue))
}

/// One sync of one Deployment: a working copy that the steps update as
/// upstream's do, and the status the server holds, to write only changes.
struct Sync<'a> {
    ctx: &'a Context,
    d: Deployment,
    stored_status: Option<DeploymentStatus>,
    sets_api: Api<ReplicaSet>,
    deployments_api: Api<Deployment>,
    regarding: ObjectReference,
    /// maxSurge and maxUnavailable resolved against `spec.replicas` (0 and
    /// 0 for `Recreate`, as upstream's `MaxSurge`/`MaxUnavailable`).
    surge: i32,
    unavailable: i32,
}

impl<'a> Sync<'a> {
    fn new(ctx: &'a Context, d: Deployment) -> Self {
        let namespace = d.metadata.namespace.as_deref().unwrap_or("default");
        Sync {
            sets_api: Api::namespaced(ctx.client.clone(), namespace),
            deployments_api: Api::namespaced(ctx.client.clone(), namespace),
            regarding: d.object_ref(&()),
            stored_status: d.status.clone(),
            ctx,
            d,
            surge: 0,
            unavailable: 0,
        }
    }

    fn replicas(&self) -> i32 {
        self.d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
    }

    fn paused(&self) -> bool {
        self.d.spec.as_ref().and_then(|s| s.paused).unwrap_or(false)
    }

    fn recreate(&self) -> bool {
        self.d
            .spec
            .as_ref()
            .and_then(|s| s.strategy.as_ref())
            .and_then(|s| s.type_.as_deref())
            == Some("Recreate")
    }

    /// `(maxSurge, maxUnavailable)` as upstream's `MaxSurge` and
    /// `MaxUnavailable` give them.
    fn budget(&self) -> Result<(i32, i32), String> {
        let desired = self.replicas();
        let rolling = self
            .d
            .spec
            .as_ref()
            .and_then(|s| s.strategy.as_ref())
            .and_then(|s| s.rolling_update.as_ref());
        if self.recreate() {
            return Ok((0, 0));
        }
        let (surge, unavailable) = replicas::fenceposts(
            rolling.and_then(|r| r.max_surge.as_ref()),
            rolling.and_then(|r| r.max_unavailable.as_ref()),
            desired,
        )?;
        let unavailable = if desired == 0 {
            0
        } else {
            unavailable.min(desired)
        };
        Ok((surge, unavailable))
    }

    /// The ReplicaSets this Deployment controls, adopting orphans it
    /// selects and releasing its sets it no longer selects.
    async fn claim_sets(
        &mut self,
        selector: &kube::core::Selector,
    ) -> Result<Vec<ReplicaSet>, Error> {
        let namespace = self.d.metadata.namespace.as_deref();
        let mut owned = Vec::new();
        let mut adopt = Vec::new();
        for set in self.ctx.sets.state() {
            if set.metadata.namespace.as_deref() != namespace {
                continue;
            }
            match workload::claim(&self.d.metadata, selector, &set.metadata) {
                Claim::Mine => owned.push((*set).clone()),
                Claim::Adopt => adopt.push(set),
                Claim::Release => {
                    let patch = workload::release_patch(
                        self.d.metadata.uid.as_deref().unwrap_or_default(),
                        set.metadata.uid.as_deref().unwrap_or_default(),
                    );
                    match self
                        .sets_api
                        .patch(&set.name_any(), &params(), &Patch::Strategic(&patch))
                        .await
                    {
                        Ok(_) => {}
                        Err(e) if workload::is_not_found(&e) => {}
                        Err(e) => return Err(Error::Kube("releasing a replicaset", e)),
                    }
                }
                Claim::NotMine => {}
            }
        }
        if adopt.is_empty() {
            return Ok(owned);
        }
        // Adopt only if a live read agrees the Deployment is still there
        // and not being deleted: the cache may be behind.
        let fresh = self
            .deployments_api
            .get_opt(&self.d.name_any())
            .await
            .map_err(|e| Error::Kube("reading the deployment before adopting", e))?;
        let can_adopt = fresh.is_some_and(|f| {
            f.metadata.uid == self.d.metadata.uid && f.metadata.deletion_timestamp.is_none()
        });
        let Some(reference) = workload::controller_ref(&self.d).filter(|_| can_adopt) else {
            return Ok(owned);
        };
        for set in adopt {
            let patch =
                workload::adopt_patch(&reference, set.metadata.uid.as_deref().unwrap_or_default());
            match self
                .sets_api
                .patch(&set.name_any(), &params(), &Patch::Strategic(&patch))
                .await
            {
                Ok(adopted) => owned.push(adopted),
                Err(e) if workload::is_not_found(&e) => {}
                Err(e) => return Err(Error::Kube("adopting a replicaset", e)),
            }
        }
        Ok(owned)
    }

    /// Writes the working status if it differs from what the server has.
    async fn write_status(&mut self) -> Result<(), Error> {
        if self.d.status == self.stored_status {
            return Ok(());
        }
        let Some(status) = &self.d.status else {
            return Ok(());
        };
        let patch = workload::status_patch(status, self.stored_status.as_ref());
        self.deployments_api
            .patch_status(&self.d.name_any(), &params(), &Patch::Merge(&patch))
            .await
            .map_err(|e| Error::Kube("updating the deployment status", e))?;
        self.stored_status = self.d.status.clone();
        Ok(())
    }

    /// Sets the Deployment's revision annotation (upstream writes it along
    /// with the status; here the status subresource carries status only).
    async fn write_revision(&mut self, revision: &str) -> Result<(), Error> {
        let current = self.d.annotations().get(rollout::REVISION);
        if current.map(String::as_str) == Some(revision) {
            return Ok(());
        }
        let patch = json!({"metadata": {"annotations": {rollout::REVISION: revision}}});
        self.deployments_api
            .patch(&self.d.name_any(), &params(), &Patch::Merge(&patch))
            .await
            .map_err(|e| Error::Kube("annotating the deployment's revision", e))?;
        self.d
            .annotations_mut()
            .insert(rollout::REVISION.into(), revision.into());
        Ok(())
    }

    async fn event(&self, warning: bool, reason: &str, action: &str, note: String) {
        workload::record(
            &self.ctx.recorder,
            &self.regarding,
            warning,
            reason,
            action,
            note,
        )
        .await;
    }
}

fn params() -> PatchParams {
    PatchParams {
        field_manager: Some(MANAGER.into()),
        ..PatchParams::default()
    }
}
