//! The API server as node 1 sees it, for the benchmark's own requests.
//!
//! The server listens only inside node 1's network namespace, so the
//! client lives on a thread that entered it: a current-thread runtime whose
//! tasks (and so every socket they open) stay on that thread.
//!
//! The nodes run no agent, so the benchmark renews their Leases as an agent
//! would: a node silent for the grace period (40 s) is marked Unknown, its
//! pods not ready, and the Service then has no endpoint left and refuses
//! new connections (which is how an earlier run of this benchmark failed).

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use skiff_e2e::netns::Netns;
use tokio::sync::oneshot;

const LEASE_NAMESPACE: &str = "kube-node-lease";
/// The kubelet's renew interval.
const RENEW_EVERY: Duration = Duration::from_secs(10);

pub struct ApiThread {
    handle: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub client: kube::Client,
}

impl ApiThread {
    pub async fn start(netns: &Netns, kubeconfig: PathBuf) -> anyhow::Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        // A thread started from one that entered the namespace stays in it.
        let thread = netns.enter(move || {
            std::thread::spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(runtime.handle().clone()));
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
        })?;
        let handle = ready_rx
            .recv()
            .context("the API thread ended at once")?
            .context("building the API thread's runtime")?;
        let client = handle
            .spawn(async move {
                let kubeconfig = kube::config::Kubeconfig::read_from(kubeconfig)?;
                let config =
                    kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
                anyhow::Ok(kube::Client::try_from(config)?)
            })
            .await??;
        Ok(ApiThread {
            handle,
            stop: Some(stop),
            thread: Some(thread),
            client,
        })
    }

    /// Runs `task` on the API thread and waits for it.
    pub async fn run<T: Send + 'static>(
        &self,
        task: impl Future<Output = anyhow::Result<T>> + Send + 'static,
    ) -> anyhow::Result<T> {
        self.handle.spawn(task).await?
    }

    /// Renews each node's Lease every 10 s for as long as this thread runs.
    pub fn keep_nodes_alive(&self, nodes: Vec<String>) {
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), LEASE_NAMESPACE);
        self.handle.spawn(async move {
            loop {
                for node in &nodes {
                    let lease = Lease {
                        metadata: ObjectMeta {
                            name: Some(node.clone()),
                            ..Default::default()
                        },
                        spec: Some(LeaseSpec {
                            holder_identity: Some(node.clone()),
                            lease_duration_seconds: Some(40),
                            renew_time: Some(MicroTime(Timestamp::now())),
                            ..Default::default()
                        }),
                    };
                    let params = PatchParams::apply("skiff-bench").force();
                    if let Err(e) = leases.patch(node, &params, &Patch::Apply(&lease)).await {
                        eprintln!("  renewing the Lease of {node}: {e}");
                    }
                }
                tokio::time::sleep(RENEW_EVERY).await;
            }
        });
    }
}

impl Drop for ApiThread {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
