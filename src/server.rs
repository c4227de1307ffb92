//! `skiff server`: opens the store and runs the control plane until told to
//! stop.

use std::sync::Arc;

use anyhow::Context;
use controlplane::storage::Store;
use controlplane::storage::embedded::EmbeddedStore;
use controlplane::storage::etcd::EtcdStore;

use crate::cli::ServerArgs;

pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    let store = open_store(&args).await?;
    let revision = store
        .current_revision()
        .await
        .context("reading the store's revision")?;
    tracing::info!(revision, "store ready");
    tokio::signal::ctrl_c()
        .await
        .context("waiting for the stop signal")?;
    tracing::info!("stopping");
    Ok(())
}

/// The embedded store under `DATA_DIR/server/db/` (where k3s keeps its
/// own), or etcd when `--datastore-endpoint` names it.
async fn open_store(args: &ServerArgs) -> anyhow::Result<Arc<dyn Store>> {
    if let Some(spec) = &args.datastore_endpoint {
        let endpoints = EtcdStore::parse_endpoints(spec).context("--datastore-endpoint")?;
        let store = EtcdStore::connect(&endpoints)
            .await
            .with_context(|| format!("connecting to etcd at {spec}"))?;
        return Ok(Arc::new(store));
    }
    let dir = args.node.data_dir.join("server").join("db");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("state.db");
    let store = tokio::task::spawn_blocking(move || EmbeddedStore::open(&path))
        .await
        .context("opening the embedded store")?
        .context("opening the embedded store")?;
    Ok(Arc::new(store))
}
