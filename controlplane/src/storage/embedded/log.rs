//! The revision log on disk: one SQLite table with a row per revision, in
//! the style of k3s's kine. SQLite runs in WAL mode with `synchronous=FULL`,
//! so a committed transaction is on disk before the writer acknowledges it;
//! the exclusive lock keeps a second process off the same file.
//!
//! Checkpoints (copying the WAL back into the database file, two more
//! fsyncs) are the writer's to schedule rather than SQLite's: SQLite runs
//! them inside whichever commit crosses 1,000 WAL pages, and the writes of
//! that batch then wait for them.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{Connection, ErrorCode, InterruptHandle, OptionalExtension, params};

use super::index::Row;
use crate::storage::{Revision, StoreError};

/// Marks a database file as Skiff's ("Skif").
const APPLICATION_ID: i64 = 0x536b_6966;
const SCHEMA_VERSION: i64 = 1;
/// Log bytes appended since the last checkpoint after which the writer
/// checkpoints as soon as it is idle (about SQLite's own 1,000 pages).
const IDLE_CHECKPOINT_BYTES: usize = 4 << 20;
/// Log bytes after which the writer checkpoints even while writes wait,
/// so that the WAL stays bounded under sustained load.
const FORCED_CHECKPOINT_BYTES: usize = 32 << 20;
/// A WAL grown past this is cut back to it after a checkpoint. Below it
/// the file is kept and overwritten, so a commit's fdatasync has no file
/// size to write along with the data.
const WAL_SIZE_LIMIT: i64 = 64 << 20;

pub(super) struct Log {
    conn: Connection,
    /// Bytes appended since the last checkpoint (keys and values: an
    /// estimate of the WAL's growth).
    unchecked: usize,
}

/// When a checkpoint is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Checkpoint {
    /// Not yet.
    No,
    /// Once no write is waiting.
    WhenIdle,
    /// Before the next batch.
    Now,
}

/// How a checkpoint ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Checkpointed {
    /// The WAL is in the database file.
    Done,
    /// Stopped through [`Log::interrupt_handle`] before the end. SQLite
    /// records a checkpoint's progress only when it completes, so the WAL
    /// still holds everything and the checkpoint is still due.
    Interrupted,
}

/// Everything the index needs to start.
pub(super) struct Loaded {
    pub rows: Vec<Row>,
    pub compacted: Revision,
}

impl Log {
    /// Opens (or creates) the log at `path`, refusing files that are not a
    /// Skiff store or are damaged.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(|e| open_error(path, e))?;
        // Another process holding the lock is a misconfiguration to report
        // promptly, not a transient to wait out.
        conn.busy_timeout(Duration::from_millis(500))
            .map_err(|e| open_error(path, e))?;
        let log = Log { conn, unchecked: 0 };
        log.configure(path)?;
        log.check_identity(path)?;
        Ok(log)
    }

    fn configure(&self, path: &Path) -> Result<(), StoreError> {
        let sqlite = |e| open_error(path, e);
        // EXCLUSIVE locking makes a second opener fail instead of writing
        // interleaved revisions; in WAL mode it also avoids the shm file.
        self.conn
            .pragma_update(None, "locking_mode", "EXCLUSIVE")
            .map_err(sqlite)?;
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode=WAL", [], |row| row.get(0))
            .map_err(sqlite)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Internal(format!(
                "{}: could not switch to WAL mode (got {mode})",
                path.display()
            )));
        }
        self.conn
            .pragma_update(None, "synchronous", "FULL")
            .map_err(sqlite)?;
        // The writer checkpoints (see the module comment).
        self.conn
            .pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(sqlite)?;
        let _limit: i64 = self
            .conn
            .query_row(
                &format!("PRAGMA journal_size_limit={WAL_SIZE_LIMIT}"),
                [],
                |row| row.get(0),
            )
            .map_err(sqlite)?;
        Ok(())
    }

    fn check_identity(&self, path: &Path) -> Result<(), StoreError> {
        let corrupt = |what: String| StoreError::Corrupt(format!("{}: {what}", path.display()));
        let pragma = |name: &str| -> Result<i64, StoreError> {
            self.conn
                .query_row(&format!("PRAGMA {name}"), [], |row| row.get(0))
                .map_err(|e| open_error(path, e))
        };
        let application_id = pragma("application_id")?;
        let tables: i64 = self
            .conn
            .query_row("SELECT count(*) FROM sqlite_master", [], |row| row.get(0))
            .map_err(|e| open_error(path, e))?;
        match application_id {
            0 if tables == 0 => return self.initialize().map_err(|e| open_error(path, e)),
            APPLICATION_ID => {}
            other => {
                return Err(corrupt(format!(
                    "a SQLite database of another application (application_id {other:#x})"
                )));
            }
        }
        let version = pragma("user_version")?;
        if version != SCHEMA_VERSION {
            return Err(corrupt(format!(
                "schema version {version}, this build reads {SCHEMA_VERSION}"
            )));
        }
        let check: String = self
            .conn
            .query_row("PRAGMA quick_check", [], |row| row.get(0))
            .map_err(|e| open_error(path, e))?;
        if check != "ok" {
            return Err(corrupt(format!("integrity check failed: {check}")));
        }
        Ok(())
    }

    fn initialize(&self) -> rusqlite::Result<()> {
        self.conn.execute_batch(&format!(
            "BEGIN;
             CREATE TABLE log (
                 revision INTEGER PRIMARY KEY,
                 key BLOB NOT NULL,
                 create_revision INTEGER NOT NULL,
                 deleted INTEGER NOT NULL,
                 value BLOB NOT NULL
             );
             CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
             INSERT INTO meta VALUES ('compacted', 0);
             PRAGMA application_id = {APPLICATION_ID};
             PRAGMA user_version = {SCHEMA_VERSION};
             COMMIT;"
        ))
    }

    /// Reads the whole log in revision order.
    pub fn load(&self) -> Result<Loaded, StoreError> {
        let compacted: Revision = self
            .conn
            .query_row("SELECT value FROM meta WHERE name = 'compacted'", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(internal)?
            .ok_or_else(|| StoreError::Corrupt("missing compaction marker".into()))?;
        let mut stmt = self
            .conn
            .prepare(
                "SELECT revision, key, create_revision, deleted, value FROM log ORDER BY revision",
            )
            .map_err(internal)?;
        let rows = stmt
            .query_map([], |r| {
                let deleted: bool = r.get(3)?;
                let value: Vec<u8> = r.get(4)?;
                let key: Vec<u8> = r.get(1)?;
                Ok(Row {
                    revision: r.get(0)?,
                    key: Bytes::from(key),
                    create_revision: r.get(2)?,
                    value: (!deleted).then(|| Bytes::from(value)),
                })
            })
            .map_err(internal)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Corrupt(format!("reading the log: {e}")))?;
        Ok(Loaded { rows, compacted })
    }

    /// Appends rows in one transaction: one fsync for the whole batch.
    pub fn append(&mut self, rows: &[Row]) -> Result<(), StoreError> {
        let tx = self.conn.transaction().map_err(internal)?;
        {
            let mut insert = tx
                .prepare_cached(
                    "INSERT INTO log (revision, key, create_revision, deleted, value)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )
                .map_err(internal)?;
            for row in rows {
                let value: &[u8] = row.value.as_deref().unwrap_or_default();
                self.unchecked += row.key.len() + value.len();
                insert
                    .execute(params![
                        row.revision,
                        &row.key[..],
                        row.create_revision,
                        row.value.is_none(),
                        value
                    ])
                    .map_err(internal)?;
            }
        }
        tx.commit().map_err(internal)
    }

    /// Whether the WAL has grown enough to be checkpointed.
    pub fn checkpoint_due(&self) -> Checkpoint {
        if self.unchecked >= FORCED_CHECKPOINT_BYTES {
            Checkpoint::Now
        } else if self.unchecked >= IDLE_CHECKPOINT_BYTES {
            Checkpoint::WhenIdle
        } else {
            Checkpoint::No
        }
    }

    /// Copies the WAL into the database file. Nothing else reads the file
    /// (exclusive locking), so a passive checkpoint copies all of it.
    pub fn checkpoint(&mut self) -> Result<Checkpointed, StoreError> {
        let counts = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, i64>(2)?,
                ))
            });
        let (busy, frames, copied) = match counts {
            Ok(counts) => counts,
            Err(e) if e.sqlite_error_code() == Some(ErrorCode::OperationInterrupted) => {
                return Ok(Checkpointed::Interrupted);
            }
            Err(e) => return Err(internal(e)),
        };
        tracing::debug!(busy, frames, copied, "store log checkpointed");
        self.unchecked = 0;
        Ok(Checkpointed::Done)
    }

    /// Stops a [`Log::checkpoint`] running on another thread (at its next
    /// page; a call while none runs is forgotten).
    pub fn interrupt_handle(&self) -> InterruptHandle {
        self.conn.get_interrupt_handle()
    }

    /// Deletes the named revisions and records the new compaction point.
    pub fn compact(&mut self, revision: Revision, doomed: &[Revision]) -> Result<(), StoreError> {
        let tx = self.conn.transaction().map_err(internal)?;
        {
            let mut delete = tx
                .prepare_cached("DELETE FROM log WHERE revision = ?1")
                .map_err(internal)?;
            for rev in doomed {
                delete.execute([rev]).map_err(internal)?;
            }
            // A deletion rewrites a page; count a row's share of one.
            self.unchecked += doomed.len() * 64;
            tx.execute(
                "UPDATE meta SET value = ?1 WHERE name = 'compacted'",
                [revision],
            )
            .map_err(internal)?;
        }
        tx.commit().map_err(internal)
    }
}

fn open_error(path: &Path, e: rusqlite::Error) -> StoreError {
    let code = e.sqlite_error_code();
    match code {
        Some(ErrorCode::NotADatabase) | Some(ErrorCode::DatabaseCorrupt) => {
            StoreError::Corrupt(format!("{}: {e}", path.display()))
        }
        Some(ErrorCode::DatabaseBusy) | Some(ErrorCode::DatabaseLocked) => StoreError::Internal(
            format!("{}: in use by another process ({e})", path.display()),
        ),
        _ => StoreError::Internal(format!("{}: {e}", path.display())),
    }
}

fn internal(e: rusqlite::Error) -> StoreError {
    StoreError::Internal(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends rows `first..first + count` with values of `size` bytes, in
    /// transactions of 100.
    fn append_rows(log: &mut Log, first: Revision, count: Revision, size: usize) {
        let rows: Vec<Row> = (first..first + count)
            .map(|revision| Row {
                revision,
                key: Bytes::from(format!("/registry/pods/default/p{revision}")),
                create_revision: revision,
                value: Some(Bytes::from(vec![b'x'; size])),
            })
            .collect();
        for chunk in rows.chunks(100) {
            log.append(chunk).unwrap();
        }
    }

    #[test]
    fn an_interrupted_checkpoint_keeps_the_log_and_stays_due() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut log = Log::open(&path).unwrap();
        // 24 MB of log: the checkpoint copies thousands of pages, far longer
        // than the 50 µs between two interrupts.
        append_rows(&mut log, 1, 12_000, 2_000);
        assert_eq!(log.checkpoint_due(), Checkpoint::WhenIdle);
        let interrupt = log.interrupt_handle();
        let outcome = std::thread::scope(|scope| {
            let worker = scope.spawn(|| log.checkpoint());
            // An interrupt before the statement starts is forgotten, so
            // keep interrupting until the checkpoint returns.
            while !worker.is_finished() {
                interrupt.interrupt();
                std::thread::sleep(Duration::from_micros(50));
            }
            worker.join().unwrap()
        });
        assert_eq!(outcome.unwrap(), Checkpointed::Interrupted);
        assert_eq!(log.checkpoint_due(), Checkpoint::WhenIdle);
        // The connection goes on working, and a checkpoint left alone ends.
        append_rows(&mut log, 12_001, 10, 2);
        assert_eq!(log.checkpoint().unwrap(), Checkpointed::Done);
        assert_eq!(log.checkpoint_due(), Checkpoint::No);
        drop(log);
        let loaded = Log::open(&path).unwrap().load().unwrap();
        assert_eq!(loaded.rows.len(), 12_010);
        assert_eq!(loaded.rows.last().map(|r| r.revision), Some(12_010));
    }
}
