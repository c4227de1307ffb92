//! Every namespace gets what in-cluster clients need, as upstream's
//! ServiceAccount controller and root-CA publisher give it: a `default`
//! ServiceAccount and a `kube-root-ca.crt` ConfigMap holding the cluster
//! CA under `ca.crt`. Both are recreated when deleted and the ConfigMap is
//! corrected when edited.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;

use crate::apiserver::service_accounts::ROOT_CA_CONFIG_MAP;

const DEFAULT_ACCOUNT: &str = "default";
const CA_KEY: &str = "ca.crt";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("namespace {0}: {1}")]
    Kube(String, #[source] kube::Error),
}

struct Context {
    client: kube::Client,
    root_ca: String,
}

pub async fn run(client: kube::Client, root_ca: String) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let accounts: Api<ServiceAccount> = Api::all(client.clone());
    let config_maps: Api<ConfigMap> = Api::all(client.clone());
    let context = Arc::new(Context { client, root_ca });
    Controller::new(namespaces, watcher::Config::default())
        .watches(accounts, watcher::Config::default(), |sa| {
            named(&sa.metadata, DEFAULT_ACCOUNT)
        })
        .watches(config_maps, watcher::Config::default(), |cm| {
            named(&cm.metadata, ROOT_CA_CONFIG_MAP)
        })
        .run(reconcile, retry, context)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "service account reconcile failed");
            }
        })
        .await;
}

/// The namespace of an object called `name` (the only ones that matter).
fn named(meta: &ObjectMeta, name: &str) -> Option<ObjectRef<Namespace>> {
    if meta.name.as_deref() != Some(name) {
        return None;
    }
    meta.namespace.as_deref().map(ObjectRef::new)
}

async fn reconcile(namespace: Arc<Namespace>, ctx: Arc<Context>) -> Result<Action, Error> {
    if namespace.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = namespace.metadata.name.clone().unwrap_or_default();
    let kube_error = |e| Error::Kube(ns.clone(), e);
    let accounts: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &ns);
    if accounts
        .get_opt(DEFAULT_ACCOUNT)
        .await
        .map_err(kube_error)?
        .is_none()
    {
        let account = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(DEFAULT_ACCOUNT.into()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        };
        create(accounts.create(&PostParams::default(), &account).await).map_err(kube_error)?;
    }
    let wanted = BTreeMap::from([(CA_KEY.to_owned(), ctx.root_ca.clone())]);
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    match config_maps
        .get_opt(ROOT_CA_CONFIG_MAP)
        .await
        .map_err(kube_error)?
    {
        None => {
            let config_map = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(ROOT_CA_CONFIG_MAP.into()),
                    annotations: Some(BTreeMap::from([(
                        "kubernetes.io/description".to_owned(),
                        "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters.".to_owned(),
                    )])),
                    ..ObjectMeta::default()
                },
                data: Some(wanted),
                ..ConfigMap::default()
            };
            create(
                config_maps
                    .create(&PostParams::default(), &config_map)
                    .await,
            )
            .map_err(kube_error)?;
        }
        Some(mut current) if current.data.as_ref() != Some(&wanted) => {
            current.data = Some(wanted);
            current.binary_data = None;
            config_maps
                .replace(ROOT_CA_CONFIG_MAP, &PostParams::default(), &current)
                .await
                .map_err(kube_error)?;
        }
        Some(_) => {}
    }
    Ok(Action::await_change())
}

/// A create that lost to another writer is as good as done.
fn create<T>(result: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

fn retry(_namespace: Arc<Namespace>, error: &Error, _ctx: Arc<Context>) -> Action {
    tracing::debug!(%error, "service account setup failed; retrying");
    Action::requeue(Duration::from_secs(2))
}
