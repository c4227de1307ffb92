//! What the stores do when things go wrong: a process killed mid-write,
//! damaged or foreign files, a second opener, etcd going away and coming
//! back.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, ensure};
use bytes::Bytes;
use controlplane::storage::embedded::EmbeddedStore;
use controlplane::storage::etcd::EtcdStore;
use controlplane::storage::{Store, StoreError};
use skiff_e2e::etcd::Etcd;

fn temp_dir() -> anyhow::Result<tempfile::TempDir> {
    Ok(tempfile::Builder::new()
        .prefix("skiff-test-store-")
        .tempdir()?)
}

#[tokio::test]
async fn acknowledged_writes_survive_kill_9() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let db = dir.path().join("state.db");
    let mut child = Command::new(env!("CARGO_BIN_EXE_store-writer"))
        .arg(&db)
        .stdout(Stdio::piped())
        .spawn()
        .context("starting store-writer")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut acked = Vec::new();
    for line in BufReader::new(stdout).lines() {
        acked.push(line?);
        if acked.len() == 2000 {
            break;
        }
    }
    child.kill()?; // SIGKILL: no destructor, no flush, no clean close
    child.wait()?;
    ensure!(
        acked.len() == 2000,
        "writer stopped early after {}",
        acked.len()
    );

    let store = EmbeddedStore::open(&db)?;
    for key in &acked {
        let kv = store.get(key.as_bytes()).await?;
        ensure!(
            kv.map(|kv| kv.value) == Some(Bytes::from(key.clone())),
            "acknowledged {key} was lost"
        );
    }
    Ok(())
}

#[test]
fn garbage_file_is_refused_and_left_alone() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let db = dir.path().join("state.db");
    let garbage = b"this is not a database, and it must not be emptied".repeat(200);
    std::fs::write(&db, &garbage)?;
    match EmbeddedStore::open(&db) {
        Err(StoreError::Corrupt(message)) => ensure!(message.contains("state.db"), "{message}"),
        Err(other) => anyhow::bail!("expected Corrupt, got {other}"),
        Ok(_) => anyhow::bail!("opened a garbage file"),
    }
    ensure!(std::fs::read(&db)? == garbage, "the file was changed");
    Ok(())
}

#[test]
fn another_applications_database_is_refused() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let db = dir.path().join("state.db");
    let other = rusqlite::Connection::open(&db)?;
    other.execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('mine');")?;
    drop(other);
    match EmbeddedStore::open(&db) {
        Err(StoreError::Corrupt(message)) => {
            ensure!(message.contains("another application"), "{message}")
        }
        Err(other) => anyhow::bail!("expected Corrupt, got {other}"),
        Ok(_) => anyhow::bail!("opened a foreign database"),
    }
    let check = rusqlite::Connection::open(&db)?;
    let body: String = check.query_row("SELECT body FROM notes", [], |r| r.get(0))?;
    ensure!(body == "mine", "the foreign data was changed");
    Ok(())
}

#[test]
fn damaged_pages_are_refused() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let db = dir.path().join("state.db");
    {
        let runtime = tokio::runtime::Runtime::new()?;
        let store = EmbeddedStore::open(&db)?;
        runtime.block_on(async {
            for i in 0..500 {
                let key = format!("/damage/{i}");
                store
                    .create(key.as_bytes(), Bytes::from(vec![b'v'; 512]))
                    .await?;
            }
            anyhow::Ok(())
        })?;
    }
    // Fold the WAL into the main file, then scribble over a page in the
    // middle of the table's b-tree.
    rusqlite::Connection::open(&db)?.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);")?;
    let mut bytes = std::fs::read(&db)?;
    ensure!(bytes.len() > 16 * 4096, "database is {} bytes", bytes.len());
    for b in &mut bytes[8 * 4096..9 * 4096] {
        *b = 0xA5;
    }
    std::fs::write(&db, &bytes)?;
    match EmbeddedStore::open(&db) {
        Err(StoreError::Corrupt(_)) => Ok(()),
        Err(other) => anyhow::bail!("expected Corrupt, got {other}"),
        Ok(_) => anyhow::bail!("opened a damaged database"),
    }
}

/// The writer checkpoints the log itself, when writes pause and when the
/// WAL has grown large: writes before and after checkpoints are all there
/// after a reopen.
#[test]
fn checkpointed_log_reopens_whole() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let db = dir.path().join("state.db");
    let runtime = tokio::runtime::Runtime::new()?;
    // 64 KiB, distinct per key.
    let value = |i: usize| {
        let mut bytes = format!("{i:0>8}").into_bytes();
        bytes.resize(64 << 10, b'v');
        Bytes::from(bytes)
    };
    // 16 MiB in bursts of 4 MiB with pauses (checkpoints when idle), then
    // 46 MiB without one (a checkpoint while writes keep coming).
    let keys = 1000;
    {
        let store = EmbeddedStore::open(&db)?;
        runtime.block_on(async {
            for i in 0..keys {
                let key = format!("/checkpoint/{i}");
                store.create(key.as_bytes(), value(i)).await?;
                if i % 64 == 63 && i < 256 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
            anyhow::Ok(())
        })?;
    }
    let store = EmbeddedStore::open(&db)?;
    runtime.block_on(async {
        for i in 0..keys {
            let key = format!("/checkpoint/{i}");
            let kv = store.get(key.as_bytes()).await?;
            ensure!(kv.map(|kv| kv.value) == Some(value(i)), "{key} was lost");
        }
        anyhow::Ok(())
    })
}

#[test]
fn a_second_opener_is_refused() -> anyhow::Result<()> {
    let dir = temp_dir()?;
    let db = dir.path().join("state.db");
    let _first = EmbeddedStore::open(&db)?;
    match EmbeddedStore::open(&db) {
        Err(e) => ensure!(e.to_string().contains("in use by another process"), "{e}"),
        Ok(_) => anyhow::bail!("two stores opened one file"),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_is_retryable_and_recovers() -> anyhow::Result<()> {
    let mut etcd = Etcd::start().await?;
    let store = EtcdStore::connect(&[etcd.endpoint()]).await?;
    store
        .create(b"/outage/before", Bytes::from_static(b"1"))
        .await?;

    etcd.kill();
    let during = store
        .create(b"/outage/during", Bytes::from_static(b"2"))
        .await;
    match &during {
        Err(e) => ensure!(
            e.is_retryable(),
            "error during the outage is not retryable: {e}"
        ),
        Ok(_) => anyhow::bail!("write succeeded with etcd down"),
    }

    etcd.restart().await?;
    // The client reconnects on its own; give it a few tries.
    let mut last = None;
    for _ in 0..50 {
        match store
            .create(b"/outage/after", Bytes::from_static(b"3"))
            .await
        {
            Ok(_) => {
                last = None;
                break;
            }
            Err(e) => {
                ensure!(e.is_retryable(), "error while reconnecting: {e}");
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    ensure!(last.is_none(), "store did not recover: {last:?}");
    ensure!(store.get(b"/outage/before").await?.is_some());
    Ok(())
}

#[tokio::test]
async fn unreachable_etcd_fails_retryably_without_hanging() -> anyhow::Result<()> {
    let port = skiff_e2e::etcd::free_port()?;
    let store = EtcdStore::connect(&[format!("http://127.0.0.1:{port}")]).await?;
    let err = store
        .get(b"/nothing")
        .await
        .err()
        .context("no etcd, yet a read worked")?;
    ensure!(err.is_retryable(), "{err}");
    Ok(())
}
