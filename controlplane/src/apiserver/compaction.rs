//! Periodic compaction of the store, as upstream's API server does: every
//! interval, history older than the previous tick is forgotten. Watchers
//! further behind than one interval get 410 Expired and re-list.

use std::sync::Arc;
use std::time::Duration;

use crate::storage::{Store, StoreError};

/// Upstream's `--etcd-compaction-interval` default.
pub const INTERVAL: Duration = Duration::from_secs(300);

pub async fn run(store: Arc<dyn Store>, interval: Duration) {
    let mut previous = None;
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        let current = match store.current_revision().await {
            Ok(revision) => revision,
            Err(e) => {
                tracing::warn!(error = %e, "compaction: cannot read the revision");
                continue;
            }
        };
        if let Some(target) = previous.filter(|r| *r > 0) {
            match store.compact(target).await {
                Ok(()) => tracing::debug!(revision = target, "store compacted"),
                // Someone (another server on the same etcd) got there first.
                Err(StoreError::Compacted { .. }) => {}
                Err(e) => tracing::warn!(error = %e, revision = target, "compaction failed"),
            }
        }
        previous = Some(current);
    }
}
