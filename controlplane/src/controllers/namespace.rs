//! Namespace lifecycle: a namespace marked for deletion is emptied of every
//! namespaced object, then its `kubernetes` finalizer is removed through
//! `/finalize`, which lets the API server delete it.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;

use crate::apiserver::registry;

/// The finalizer the API server puts on every namespace.
const FINALIZER: &str = "kubernetes";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("namespace {0}: {1}")]
    Kube(String, #[source] kube::Error),
}

struct Context {
    client: kube::Client,
}

pub async fn run(client: kube::Client) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let context = Arc::new(Context { client });
    Controller::new(namespaces, watcher::Config::default())
        .run(reconcile, retry, context)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "namespace reconcile failed");
            }
        })
        .await;
}

async fn reconcile(namespace: Arc<Namespace>, ctx: Arc<Context>) -> Result<Action, Error> {
    if namespace.metadata.deletion_timestamp.is_none() {
        return Ok(Action::await_change());
    }
    let name = namespace.metadata.name.clone().unwrap_or_default();
    let remaining = empty(&ctx.client, &name).await?;
    if remaining > 0 {
        // Objects with finalizers or graceful deletion are still going.
        return Ok(Action::requeue(Duration::from_secs(2)));
    }
    let finalizers = namespace
        .spec
        .as_ref()
        .and_then(|s| s.finalizers.clone())
        .unwrap_or_default();
    if !finalizers.iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let mut finalized = (*namespace).clone();
    if let Some(spec) = finalized.spec.as_mut() {
        spec.finalizers = Some(finalizers.into_iter().filter(|f| f != FINALIZER).collect());
    }
    let api: Api<Namespace> = Api::all(ctx.client.clone());
    api.replace_subresource("finalize", &name, &PostParams::default(), &finalized)
        .await
        .map_err(|e| Error::Kube(name.clone(), e))?;
    tracing::info!(namespace = %name, "namespace finalized");
    Ok(Action::await_change())
}

/// Deletes every namespaced object in `namespace`; returns how many were
/// still there.
async fn empty(client: &kube::Client, namespace: &str) -> Result<usize, Error> {
    let mut remaining = 0;
    for rt in registry().all().iter().filter(|t| t.namespaced) {
        let gvk = GroupVersionKind::gvk(rt.group, rt.version, rt.kind);
        let resource = ApiResource::from_gvk_with_plural(&gvk, rt.plural);
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
        let list = api
            .list_metadata(&ListParams::default())
            .await
            .map_err(|e| Error::Kube(namespace.to_owned(), e))?;
        if list.items.is_empty() {
            continue;
        }
        remaining += list.items.len();
        api.delete_collection(&DeleteParams::background(), &ListParams::default())
            .await
            .map_err(|e| Error::Kube(namespace.to_owned(), e))?;
    }
    Ok(remaining)
}

fn retry(_namespace: Arc<Namespace>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(%error, "namespace cleanup failed; retrying");
    Action::requeue(Duration::from_secs(5))
}
