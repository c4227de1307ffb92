//! Writes keys into an embedded store and prints each one it has been told
//! is committed, until killed. The durability test kills it with SIGKILL
//! mid-stream and checks that every printed key survived.

use std::io::Write;

use bytes::Bytes;
use controlplane::storage::Store;
use controlplane::storage::embedded::EmbeddedStore;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("usage: store-writer DB"))?;
    let store = std::sync::Arc::new(EmbeddedStore::open(path.as_ref())?);
    // Several writers at once so that commits are grouped, as in a server.
    let (acks, mut acked) = tokio::sync::mpsc::unbounded_channel();
    for writer in 0..8 {
        let store = store.clone();
        let acks = acks.clone();
        tokio::spawn(async move {
            for i in 0u64.. {
                let key = format!("/kill9/{writer}/{i}");
                if store
                    .create(key.as_bytes(), Bytes::from(key.clone()))
                    .await
                    .is_err()
                {
                    return;
                }
                if acks.send(key).is_err() {
                    return;
                }
            }
        });
    }
    drop(acks);
    let mut out = std::io::stdout().lock();
    while let Some(key) = acked.recv().await {
        writeln!(out, "{key}")?;
        out.flush()?;
    }
    Ok(())
}
