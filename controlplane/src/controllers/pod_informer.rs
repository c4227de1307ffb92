//! One watch of every Pod, shared by the controllers that follow pods, as
//! upstream's shared informer is: each pod change is decoded and cached
//! once, not once per controller (with five controllers following pods,
//! their separate watches were a fifth of the server's CPU per pod in the
//! scheduler benchmark, and five copies of every pod in memory).
//!
//! Controllers read the shared cache and follow a stream of changes. A
//! controller that falls too far behind the stream is told to rebuild from
//! the cache rather than being waited for: one slow controller never holds
//! the others back.

use std::collections::HashSet;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::Resource;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::{self, watcher};
use tokio::sync::broadcast;

/// Changes a controller may have not taken yet before it is told to
/// rebuild instead.
const BACKLOG: usize = 4096;

#[derive(Clone, Debug)]
pub enum PodChange {
    /// Created or changed; the cache holds it.
    Applied(Arc<Pod>),
    /// Deleted; the cache no longer holds it.
    Deleted(Arc<Pod>),
    /// The cache is whole again (at the start, after a watch gap, or after
    /// this follower fell behind): whatever a controller derives from pods
    /// must be rebuilt from the cache, as changes may have been missed.
    Relisted,
}

#[derive(Clone)]
pub struct PodInformer {
    cache: Store<Pod>,
    changes: broadcast::Sender<PodChange>,
    synced: Synced,
}

/// Waits for the shared cache to hold a full list. `Store::wait_until_ready`
/// must not be used on a shared cache: kube's wakes only the last of several
/// tasks waiting at once, and the others hang.
#[derive(Clone)]
pub struct Synced(tokio::sync::watch::Receiver<bool>);

impl Synced {
    /// Returns once the cache is whole (at once, ever after).
    pub async fn wait(&self) {
        let mut synced = self.0.clone();
        // An error means the feed is gone: nothing more will come to wait for.
        let _ = synced.wait_for(|synced| *synced).await;
    }
}

impl PodInformer {
    /// The informer, and the task that keeps it fed (run it alongside the
    /// controllers).
    pub fn new(client: kube::Client) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (cache, writer) = reflector::store::<Pod>();
        let (changes, _) = broadcast::channel(BACKLOG);
        let (mark_synced, synced) = tokio::sync::watch::channel(false);
        let informer = PodInformer {
            cache: cache.clone(),
            changes: changes.clone(),
            synced: Synced(synced),
        };
        let feed = async move {
            let events = watcher(Api::<Pod>::all(client), watcher::Config::default())
                .default_backoff()
                .reflect(writer);
            let mut events = std::pin::pin!(events);
            while let Some(event) = events.next().await {
                let change = match event {
                    // The reflector has stored it: share the cached copy.
                    Ok(watcher::Event::Apply(pod)) => match cache.get(&ObjectRef::from_obj(&pod)) {
                        Some(cached) => PodChange::Applied(cached),
                        None => PodChange::Applied(Arc::new(pod)),
                    },
                    Ok(watcher::Event::Delete(pod)) => PodChange::Deleted(Arc::new(pod)),
                    Ok(watcher::Event::InitDone) => {
                        mark_synced.send_replace(true);
                        PodChange::Relisted
                    }
                    // A list in progress: the cache swaps it in at InitDone.
                    Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => continue,
                    Err(error) => {
                        tracing::debug!(%error, "shared pod watch");
                        continue;
                    }
                };
                // Without followers yet the change is not lost: a follower
                // starts from the cache.
                let _ = changes.send(change);
            }
        };
        (informer, feed)
    }

    /// Every pod, as of the last change seen.
    pub fn cache(&self) -> Store<Pod> {
        self.cache.clone()
    }

    pub fn synced(&self) -> Synced {
        self.synced.clone()
    }

    /// The changes from now on, starting with `Relisted` once the cache
    /// holds a full list (so a follower builds its state from the cache
    /// first; it may see `Relisted` twice at the start).
    pub fn changes(&self) -> impl Stream<Item = PodChange> + Send + 'static {
        let receiver = self.changes.subscribe();
        let synced = self.synced.clone();
        let start = futures::stream::once(async move {
            synced.wait().await;
            PodChange::Relisted
        });
        let follow = futures::stream::unfold(receiver, |mut receiver| async move {
            let change = match receiver.recv().await {
                Ok(change) => change,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "pod follower fell behind; rebuilding");
                    PodChange::Relisted
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            Some((change, receiver))
        });
        start.chain(follow)
    }

    /// The controllers of kind `K` whose pods changed, for a controller of
    /// that kind (what `Controller::owns` does with a watch of its own).
    pub fn controllers<K>(&self) -> impl Stream<Item = ObjectRef<K>> + Send + 'static
    where
        K: Resource<DynamicType = ()> + 'static,
    {
        let cache = self.cache.clone();
        self.changes().flat_map(move |change| {
            let owners: Vec<ObjectRef<K>> = match change {
                PodChange::Applied(pod) | PodChange::Deleted(pod) => {
                    controller_of::<K>(&pod).into_iter().collect()
                }
                PodChange::Relisted => {
                    let owners: HashSet<ObjectRef<K>> = cache
                        .state()
                        .iter()
                        .filter_map(|pod| controller_of::<K>(pod))
                        .collect();
                    owners.into_iter().collect()
                }
            };
            futures::stream::iter(owners)
        })
    }
}

/// The pod's controller, if it is a `K`.
fn controller_of<K: Resource<DynamicType = ()>>(pod: &Pod) -> Option<ObjectRef<K>> {
    let owner = pod
        .metadata
        .owner_references
        .as_ref()?
        .iter()
        .find(|owner| owner.controller == Some(true))?;
    if owner.kind != K::kind(&()) || owner.api_version != K::api_version(&()) {
        return None;
    }
    Some(ObjectRef::new(&owner.name).within(pod.metadata.namespace.as_deref()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[tokio::test]
    async fn followers_start_when_synced_and_rebuild_when_behind() {
        let (cache, mut writer) = reflector::store::<Pod>();
        let (changes, _) = broadcast::channel(2);
        let (mark_synced, synced) = tokio::sync::watch::channel(false);
        let informer = PodInformer {
            cache,
            changes: changes.clone(),
            synced: Synced(synced),
        };
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let mut follower = std::pin::pin!(informer.changes());
        let mut other = std::pin::pin!(informer.changes());
        assert!(follower.next().now_or_never().is_none());
        mark_synced.send_replace(true);
        assert!(matches!(other.next().await, Some(PodChange::Relisted)));
        assert!(matches!(follower.next().await, Some(PodChange::Relisted)));
        for _ in 0..3 {
            let _ = changes.send(PodChange::Deleted(Arc::new(Pod::default())));
        }
        assert!(matches!(follower.next().await, Some(PodChange::Relisted)));
        assert!(matches!(follower.next().await, Some(PodChange::Deleted(_))));
        assert!(matches!(follower.next().await, Some(PodChange::Deleted(_))));
        assert!(follower.next().now_or_never().is_none());
    }
}
