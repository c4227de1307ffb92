//! The store conformance suite against both backends: the embedded SQLite
//! log in a temporary directory, and a real etcd started for each test.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use controlplane::storage::Store;
use controlplane::storage::embedded::EmbeddedStore;
use controlplane::storage::etcd::EtcdStore;
use skiff_e2e::etcd::Etcd;
use skiff_e2e::store_conformance::{self as suite, Backend};
use tempfile::TempDir;

struct Embedded {
    _dir: TempDir,
    path: PathBuf,
    store: Option<Arc<EmbeddedStore>>,
}

impl Embedded {
    fn new() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("skiff-test-store-")
            .tempdir()?;
        let path = dir.path().join("state.db");
        let store = Arc::new(EmbeddedStore::open(&path)?);
        Ok(Embedded {
            _dir: dir,
            path,
            store: Some(store),
        })
    }
}

#[async_trait]
impl Backend for Embedded {
    fn store(&self) -> Arc<dyn Store> {
        self.store.clone().expect("store is open between restarts")
    }

    async fn restart(&mut self) -> anyhow::Result<()> {
        let store = self.store.take().context("store is open")?;
        // Dropping the last handle closes the file and releases its lock.
        Arc::into_inner(store).context("the suite still holds the store")?;
        self.store = Some(Arc::new(EmbeddedStore::open(&self.path)?));
        Ok(())
    }
}

struct Etcd3 {
    etcd: Etcd,
    store: Arc<EtcdStore>,
}

impl Etcd3 {
    async fn new() -> anyhow::Result<Self> {
        let etcd = Etcd::start().await?;
        let store = Arc::new(EtcdStore::connect(&[etcd.endpoint()]).await?);
        Ok(Etcd3 { etcd, store })
    }
}

#[async_trait]
impl Backend for Etcd3 {
    fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    async fn restart(&mut self) -> anyhow::Result<()> {
        self.etcd.restart().await?;
        self.store = Arc::new(EtcdStore::connect(&[self.etcd.endpoint()]).await?);
        Ok(())
    }
}

macro_rules! conformance {
    ($($check:ident),* $(,)?) => {
        mod embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() -> anyhow::Result<()> {
                    let mut backend = super::Embedded::new()?;
                    super::suite::$check(&mut backend).await
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $check() -> anyhow::Result<()> {
                    let mut backend = super::Etcd3::new().await?;
                    super::suite::$check(&mut backend).await
                }
            )*
        }
    };
}

conformance!(
    crud_and_compare_and_swap,
    oversized_values_are_refused,
    range_pages_and_past_revisions,
    watch_replays_then_follows,
    watch_is_gapless_and_resumable,
    concurrent_increments_lose_nothing,
    compaction_forgets_history,
    restart_keeps_everything,
);
