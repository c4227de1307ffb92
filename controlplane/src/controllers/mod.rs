//! Controllers: each turns one kind of desired state into actions through
//! the Kubernetes API, using `kube` watchers like any external controller.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub mod autoscaler;
pub mod daemonset;
pub mod deployment;
pub mod endpoints;
pub mod garbage;
pub mod namespace;
pub mod node_ipam;
pub mod node_lifecycle;
mod pod_informer;
pub mod replicaset;
mod revision;
pub mod service_accounts;
pub mod service_lb;
pub mod statefulset;
pub mod volume;
mod workload;

/// What the controllers need to know about the cluster around them.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Pod IP range; each node gets a /24 of it (`--cluster-cidr`).
    pub cluster_cidr: ipnet::IpNet,
    /// Where this API server listens: the `kubernetes` Service's endpoint.
    pub api_endpoint: SocketAddr,
    /// How long a node may stay silent before it is unreachable.
    pub node_monitor_grace: Duration,
    /// Where local-path volumes live on every node.
    pub storage_dir: PathBuf,
    /// How often each HorizontalPodAutoscaler is evaluated.
    pub autoscaler_sync: Duration,
    /// The cluster CA (PEM) published in every namespace.
    pub root_ca: String,
}

/// Runs every controller until one of them fails irrecoverably.
pub async fn run(client: kube::Client, settings: Settings) {
    let (pods, feed_pods) = pod_informer::PodInformer::new(client.clone());
    tokio::join!(
        feed_pods,
        namespace::run(client.clone()),
        garbage::run(client.clone()),
        endpoints::run(client.clone(), &pods, settings.api_endpoint),
        node_lifecycle::run(client.clone(), &pods, settings.node_monitor_grace),
        node_ipam::run(client.clone(), settings.cluster_cidr),
        replicaset::run(client.clone(), &pods),
        deployment::run(client.clone()),
        statefulset::run(client.clone(), &pods),
        daemonset::run(client.clone(), &pods),
        volume::run(client.clone(), settings.storage_dir),
        service_lb::run(client.clone()),
        service_accounts::run(client.clone(), settings.root_ca),
        autoscaler::run(client, settings.autoscaler_sync),
    );
}
