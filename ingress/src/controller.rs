//! The control loop: makes sure the `skiff` IngressClass exists, watches
//! Ingresses, IngressClasses, Services, EndpointSlices and Secrets, and on
//! every change builds a new snapshot and swaps it in whole. Requests in
//! flight keep the snapshot they started with. Problems of an Ingress
//! become Warning events; served Ingresses get the node addresses in
//! `status.loadBalancer.ingress`.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{
    Ingress, IngressClass, IngressClassSpec, IngressLoadBalancerIngress,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use tokio::sync::{Notify, oneshot};

use crate::build::{self, Builder, Objects, Problem, Snapshot};
use crate::metrics::Metrics;

const MANAGER: &str = "skiff-ingress";

pub struct Controller {
    pub client: kube::Client,
    pub state: Arc<ArcSwap<Snapshot>>,
    pub builder: Builder,
    pub metrics: Arc<Metrics>,
    pub node_addresses: Vec<IpAddr>,
}

impl Controller {
    /// Runs until the process stops; `ready` fires after the first table.
    pub async fn run(mut self, ready: oneshot::Sender<()>) {
        ensure_class(&self.client).await;
        let changed = Arc::new(Notify::new());
        let ingresses = reflect::<Ingress>(&self.client, &changed);
        let classes = reflect::<IngressClass>(&self.client, &changed);
        let services = reflect::<Service>(&self.client, &changed);
        let slices = reflect::<EndpointSlice>(&self.client, &changed);
        let secrets = reflect::<Secret>(&self.client, &changed);
        let waited = tokio::join!(
            ingresses.wait_until_ready(),
            classes.wait_until_ready(),
            services.wait_until_ready(),
            slices.wait_until_ready(),
            secrets.wait_until_ready(),
        );
        if waited.0.is_err()
            || waited.1.is_err()
            || waited.2.is_err()
            || waited.3.is_err()
            || waited.4.is_err()
        {
            tracing::error!("an ingress watch stopped before it was ready");
            return;
        }
        let recorder = Recorder::new(self.client.clone(), Reporter::from(MANAGER));
        let mut reported: HashSet<(String, Problem)> = HashSet::new();
        let mut ready = Some(ready);
        loop {
            let built = self.builder.build(&Objects {
                ingresses: &ingresses.state(),
                classes: &classes.state(),
                services: &services.state(),
                slices: &slices.state(),
                secrets: &secrets.state(),
            });
            self.state.store(Arc::new(built.snapshot));
            self.metrics.table_updates.inc();
            if let Some(ready) = ready.take() {
                let _ = ready.send(());
            }
            reported = self.report(&recorder, &built.ours, reported).await;
            self.update_status(&built.ours).await;
            changed.notified().await;
        }
    }

    /// Publishes each problem once, until it goes away and comes back.
    async fn report(
        &self,
        recorder: &Recorder,
        ours: &[(Arc<Ingress>, Vec<Problem>)],
        before: HashSet<(String, Problem)>,
    ) -> HashSet<(String, Problem)> {
        let mut now = HashSet::new();
        for (ing, problems) in ours {
            let uid = ing.uid().unwrap_or_default();
            for problem in problems {
                let key = (uid.clone(), problem.clone());
                if !before.contains(&key) {
                    tracing::warn!(ingress = %format!("{}/{}", ing.namespace().unwrap_or_default(), ing.name_any()), reason = problem.reason, message = %problem.message, "ingress problem");
                    let event = Event {
                        type_: EventType::Warning,
                        reason: problem.reason.into(),
                        note: Some(problem.message.clone()),
                        action: "Sync".into(),
                        secondary: None,
                    };
                    if let Err(e) = recorder.publish(&event, &ing.object_ref(&())).await {
                        tracing::debug!(error = %e, "cannot publish an event");
                    }
                }
                now.insert(key);
            }
        }
        now
    }

    async fn update_status(&self, ours: &[(Arc<Ingress>, Vec<Problem>)]) {
        let want: Vec<IngressLoadBalancerIngress> = self
            .node_addresses
            .iter()
            .map(|ip| IngressLoadBalancerIngress {
                ip: Some(ip.to_string()),
                ..Default::default()
            })
            .collect();
        for (ing, _) in ours {
            let have = ing
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.clone())
                .unwrap_or_default();
            if have == want {
                continue;
            }
            let Some(ns) = ing.namespace() else { continue };
            let api = Api::<Ingress>::namespaced(self.client.clone(), &ns);
            let patch = serde_json::json!({"status": {"loadBalancer": {"ingress": want}}});
            if let Err(e) = api
                .patch_status(
                    &ing.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                tracing::debug!(error = %e, ingress = %ing.name_any(), "cannot set the Ingress status");
            }
        }
    }
}

/// A reflector over every object of a kind, driven by its own task, that
/// wakes the control loop on each change.
fn reflect<K>(client: &kube::Client, changed: &Arc<Notify>) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let changed = changed.clone();
    let stream = watcher(Api::<K>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .reflect(writer);
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::InitApply(_) | watcher::Event::Init) => {}
                Ok(_) => changed.notify_one(),
                Err(e) => tracing::debug!(error = %e, kind = %K::kind(&()), "watch error"),
            }
        }
    });
    store
}

/// Creates the `skiff` IngressClass unless it exists, retrying until the
/// API answers.
async fn ensure_class(client: &kube::Client) {
    let api = Api::<IngressClass>::all(client.clone());
    let class = IngressClass {
        metadata: ObjectMeta {
            name: Some(build::CLASS_NAME.into()),
            ..Default::default()
        },
        spec: Some(IngressClassSpec {
            controller: Some(build::CONTROLLER.into()),
            ..Default::default()
        }),
    };
    let mut delay = Duration::from_millis(200);
    loop {
        match api.create(&PostParams::default(), &class).await {
            Ok(_) => {
                tracing::info!(class = build::CLASS_NAME, "created the IngressClass");
                return;
            }
            Err(kube::Error::Api(e)) if e.code == 409 => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot create the IngressClass; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}
