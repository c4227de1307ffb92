//! Controllers: each turns one kind of desired state into actions through
//! the Kubernetes API, using `kube` watchers like any external controller.

pub mod daemonset;
pub mod deployment;
pub mod garbage;
pub mod namespace;
pub mod replicaset;
mod revision;
pub mod statefulset;
mod workload;

/// Runs every controller until one of them fails irrecoverably.
pub async fn run(client: kube::Client) {
    tokio::join!(
        namespace::run(client.clone()),
        garbage::run(client.clone()),
        replicaset::run(client.clone()),
        deployment::run(client.clone()),
        statefulset::run(client.clone()),
        daemonset::run(client),
    );
}
