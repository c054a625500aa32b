//! The local catalog: a SQLite cache of what the repository holds.
//!
//! It is only a cache. The repository is the truth, every command that
//! reads the catalog can rebuild what it needs from a listing, and nothing
//! may depend on it being complete: several hosts and OS users (postgres for
//! `archive_command`, root for cron) touch one repository, each with its own
//! catalog. Writes from `archive-push` are best-effort: a locked, missing or
//! read-only catalog never fails a push, and a push never waits long for it.
//!
//! This is the only module that runs SQL against SQLite.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags};
use sha2::{Digest, Sha256};

use crate::pg::WalFileName;
use crate::repo::Digest256;

/// Schema migrations, applied in order; `PRAGMA user_version` records how
/// many ran. Append only.
const MIGRATIONS: &[&str] = &[
    // 1: archived WAL
    "CREATE TABLE wal (
        stanza      TEXT NOT NULL,
        name        TEXT NOT NULL,
        timeline    INTEGER NOT NULL,
        sha256      TEXT NOT NULL,
        size        INTEGER,
        stored_size INTEGER,
        archived_at TEXT,
        PRIMARY KEY (stanza, name)
    ) WITHOUT ROWID;",
];

/// How long a best-effort writer waits for a lock held by another process.
const BEST_EFFORT_BUSY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct Catalog {
    path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct WalRow {
    pub name: String,
    pub timeline: u32,
    pub sha256: String,
    pub stored_size: u64,
}

impl Catalog {
    pub fn at(path: PathBuf) -> Self {
        Catalog { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One catalog file per repository, under the user's state directory.
    pub fn default_for(repo_identity: &str) -> Option<Self> {
        let base = std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute())
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
        let id = hex::encode(&Sha256::digest(repo_identity.as_bytes())[..8]);
        Some(Catalog::at(
            base.join("pgvault").join(format!("catalog-{id}.db")),
        ))
    }

    /// Opens (creating and migrating as needed).
    pub fn connect(&self, busy: Duration) -> rusqlite::Result<Connection> {
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(busy)?;
        // WAL journal: readers never block the writer, and concurrent
        // archive-push processes only queue briefly behind each other.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        migrate(&conn)?;
        Ok(conn)
    }

    /// Records one archived file; failures are logged, never returned.
    pub async fn record_wal_best_effort(
        &self,
        stanza: &str,
        name: &WalFileName,
        digest: &Digest256,
    ) {
        let (cat, stanza, name, digest) = (self.clone(), stanza.to_string(), name.clone(), *digest);
        let r = tokio::task::spawn_blocking(move || -> rusqlite::Result<()> {
            let conn = cat.connect(BEST_EFFORT_BUSY)?;
            conn.execute(
                "INSERT INTO wal (stanza, name, timeline, sha256, size, archived_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (stanza, name) DO UPDATE SET sha256 = excluded.sha256, size = excluded.size",
                params![
                    stanza,
                    name.as_str(),
                    name.timeline().0,
                    digest.sha256.to_hex(),
                    digest.size as i64,
                    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                ],
            )?;
            Ok(())
        })
        .await;
        self.log_failure(r);
    }

    /// Replaces what the catalog knows of a stanza's WAL with a fresh
    /// listing of the repository.
    pub async fn replace_wal_best_effort(&self, stanza: &str, rows: Vec<WalRow>) {
        let (cat, stanza) = (self.clone(), stanza.to_string());
        let r = tokio::task::spawn_blocking(move || -> rusqlite::Result<()> {
            let mut conn = cat.connect(Duration::from_secs(2))?;
            let tx = conn.transaction()?;
            tx.execute("DELETE FROM wal WHERE stanza = ?1", params![stanza])?;
            {
                let mut ins = tx.prepare(
                    "INSERT INTO wal (stanza, name, timeline, sha256, stored_size) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for r in &rows {
                    ins.execute(params![stanza, r.name, r.timeline, r.sha256, r.stored_size as i64])?;
                }
            }
            tx.commit()
        })
        .await;
        self.log_failure(r);
    }

    /// Archived WAL names of a stanza known to this catalog.
    pub fn wal_names(&self, stanza: &str) -> rusqlite::Result<Vec<String>> {
        let conn = self.connect(Duration::from_secs(2))?;
        let mut st = conn.prepare("SELECT name FROM wal WHERE stanza = ?1 ORDER BY name")?;
        let rows = st.query_map(params![stanza], |r| r.get(0))?;
        rows.collect()
    }

    fn log_failure(&self, r: std::result::Result<rusqlite::Result<()>, tokio::task::JoinError>) {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::debug!(
                "catalog {}: {e} (ignored: the repository is the truth)",
                self.path.display()
            ),
            Err(e) => log::debug!("catalog {}: {e}", self.path.display()),
        }
    }
}

fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let version: usize =
        conn.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))? as usize;
    if version >= MIGRATIONS.len() {
        return Ok(());
    }
    conn.execute_batch("BEGIN IMMEDIATE")?;
    // Re-read under the write lock: another process may have migrated.
    let version: usize =
        conn.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))? as usize;
    let result = (|| {
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            conn.execute_batch(sql)?;
            conn.pragma_update(None, "user_version", (i + 1) as i64)?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => conn.execute_batch("COMMIT"),
        Err(e) => {
            let _ = conn.execute_batch("ROLLBACK");
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_once_and_records() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::at(dir.path().join("c.db"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let name = WalFileName::parse("000000010000000000000003").unwrap();
        let d = Digest256 {
            size: 16,
            sha256: crate::repo::Sha256Sum([1; 32]),
        };
        rt.block_on(cat.record_wal_best_effort("main", &name, &d));
        rt.block_on(cat.record_wal_best_effort("main", &name, &d));
        assert_eq!(
            cat.wal_names("main").unwrap(),
            vec!["000000010000000000000003".to_string()]
        );
        let conn = cat.connect(BEST_EFFORT_BUSY).unwrap();
        let v: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v as usize, MIGRATIONS.len());
    }

    #[test]
    fn unwritable_catalog_is_ignored() {
        let cat = Catalog::at(PathBuf::from("/proc/definitely/not/writable.db"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let name = WalFileName::parse("000000010000000000000003").unwrap();
        let d = Digest256 {
            size: 16,
            sha256: crate::repo::Sha256Sum([1; 32]),
        };
        rt.block_on(cat.record_wal_best_effort("main", &name, &d));
    }
}
