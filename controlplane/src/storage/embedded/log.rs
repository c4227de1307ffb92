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
use rusqlite::{Connection, ErrorCode, OptionalExtension, params};

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
    pub fn checkpoint(&mut self) -> Result<(), StoreError> {
        let (busy, frames, copied): (i64, i64, i64) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?))
            })
            .map_err(internal)?;
        tracing::debug!(busy, frames, copied, "store log checkpointed");
        self.unchecked = 0;
        Ok(())
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
