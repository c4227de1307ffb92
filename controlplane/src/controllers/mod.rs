//! Controllers: each turns one kind of desired state into actions through
//! the Kubernetes API, using `kube` watchers like any external controller.

pub mod daemonset;
pub mod garbage;
pub mod namespace;
mod revision;
pub mod statefulset;

/// Runs every controller until one of them fails irrecoverably.
pub async fn run(client: kube::Client) {
    tokio::join!(
        namespace::run(client.clone()),
        garbage::run(client.clone()),
        statefulset::run(client.clone()),
        daemonset::run(client)
    );
}
