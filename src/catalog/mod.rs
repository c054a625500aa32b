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

pub mod scratch;

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags};
use sha2::{Digest, Sha256};

use crate::pg::walscan::WalSummary;
use crate::pg::WalFileName;
use crate::repo::manifest::BackupHeader;
use crate::repo::{Digest256, Sha256Sum};

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
    // 2: backups and timelines
    "CREATE TABLE backup (
        stanza        TEXT NOT NULL,
        label         TEXT NOT NULL,
        type          TEXT NOT NULL,
        timeline      INTEGER NOT NULL,
        start_lsn     TEXT NOT NULL,
        stop_lsn      TEXT NOT NULL,
        start_time    TEXT NOT NULL,
        stop_time     TEXT NOT NULL,
        original_size INTEGER NOT NULL,
        stored_size   INTEGER NOT NULL,
        PRIMARY KEY (stanza, label)
    ) WITHOUT ROWID;
    CREATE TABLE timeline (
        stanza     TEXT NOT NULL,
        timeline   INTEGER NOT NULL,
        parent     INTEGER,
        switch_lsn TEXT,
        PRIMARY KEY (stanza, timeline)
    ) WITHOUT ROWID;",
    // 3: what archived WAL's records say (the `.summary` objects), by content
    "CREATE TABLE wal_summary (
        stanza        TEXT NOT NULL,
        name          TEXT NOT NULL,
        sha256        TEXT NOT NULL,
        last_xact_us  INTEGER,
        crc_failures  INTEGER NOT NULL,
        summary       TEXT NOT NULL,
        PRIMARY KEY (stanza, name, sha256)
    ) WITHOUT ROWID;",
    // 4: the whole header of each backup's manifest, so that info, restore's
    // choice and expire read a manifest only for a backup they have not seen
    "ALTER TABLE backup ADD COLUMN header TEXT;",
    // 5: WAL this repository missed: dropped from its archive-push queue
    // (several repositories), as the spool recorded it or `info` read the
    // repository's gap markers
    "CREATE TABLE wal_gap (
        stanza     TEXT NOT NULL,
        name       TEXT NOT NULL,
        dropped_at TEXT NOT NULL,
        reason     TEXT NOT NULL,
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
pub struct TimelineRow {
    pub timeline: u32,
    pub parent: Option<u32>,
    pub switch_lsn: Option<String>,
}

/// What a fresh read of the repository found, to replace the cache with.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub wal: Vec<WalRow>,
    pub timelines: Vec<TimelineRow>,
}

/// A WAL file this repository missed (see `spool::Queue`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GapRow {
    pub name: String,
    pub dropped_at: String,
    pub reason: String,
}

impl From<&crate::spool::Dropped> for GapRow {
    fn from(d: &crate::spool::Dropped) -> Self {
        GapRow {
            name: d.name.clone(),
            dropped_at: d.dropped_at.clone(),
            reason: d.reason.clone(),
        }
    }
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
        let id = hex::encode(&Sha256::digest(repo_identity.as_bytes())[..8]);
        Some(Catalog::at(
            crate::home::state_dir()?.join(format!("catalog-{id}.db")),
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

    /// Records one archived file, with what its records say when they were
    /// read; failures are logged, never returned.
    pub async fn record_wal_best_effort(
        &self,
        stanza: &str,
        name: &WalFileName,
        digest: &Digest256,
        summary: Option<&WalSummary>,
    ) {
        let (cat, stanza, name, digest) = (self.clone(), stanza.to_string(), name.clone(), *digest);
        let summary = summary.cloned();
        let r = tokio::task::spawn_blocking(move || -> rusqlite::Result<()> {
            let conn = cat.connect(BEST_EFFORT_BUSY)?;
            if let Some(sum) = &summary {
                insert_summary(&conn, &stanza, &name, &digest.sha256, sum)?;
            }
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

    /// Replaces what the catalog knows of a stanza with a fresh read of the
    /// repository.
    pub async fn replace_best_effort(&self, stanza: &str, snap: Snapshot) {
        let (cat, stanza) = (self.clone(), stanza.to_string());
        let r = tokio::task::spawn_blocking(move || -> rusqlite::Result<()> {
            let mut conn = cat.connect(Duration::from_secs(2))?;
            let tx = conn.transaction()?;
            for table in ["wal", "timeline"] {
                tx.execute(&format!("DELETE FROM {table} WHERE stanza = ?1"), params![stanza])?;
            }
            {
                let mut ins = tx.prepare(
                    "INSERT INTO wal (stanza, name, timeline, sha256, stored_size) VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for r in &snap.wal {
                    ins.execute(params![stanza, r.name, r.timeline, r.sha256, r.stored_size as i64])?;
                }
                let mut ins = tx.prepare(
                    "INSERT INTO timeline (stanza, timeline, parent, switch_lsn) VALUES (?1, ?2, ?3, ?4)",
                )?;
                for t in &snap.timelines {
                    ins.execute(params![stanza, t.timeline, t.parent, t.switch_lsn])?;
                }
            }
            // Summaries of contents no longer archived (expired) go too.
            tx.execute(
                "DELETE FROM wal_summary WHERE stanza = ?1 AND NOT EXISTS
                     (SELECT 1 FROM wal w WHERE w.stanza = ?1 AND w.name = wal_summary.name
                                           AND w.sha256 = wal_summary.sha256)",
                params![stanza],
            )?;
            tx.commit()
        })
        .await;
        self.log_failure(r);
    }

    /// Records that this repository missed a WAL file; failures are
    /// logged, never returned.
    pub async fn record_gap_best_effort(&self, stanza: &str, gap: &crate::spool::Dropped) {
        let (cat, stanza, gap) = (self.clone(), stanza.to_string(), GapRow::from(gap));
        let r = tokio::task::spawn_blocking(move || -> rusqlite::Result<()> {
            let conn = cat.connect(BEST_EFFORT_BUSY)?;
            insert_gap(&conn, &stanza, &gap)
        })
        .await;
        self.log_failure(r);
    }

    /// Replaces the WAL a stanza's repository missed with what a fresh
    /// read of its gap markers found.
    pub async fn replace_gaps_best_effort(&self, stanza: &str, gaps: Vec<GapRow>) {
        let (cat, stanza) = (self.clone(), stanza.to_string());
        let r = tokio::task::spawn_blocking(move || -> rusqlite::Result<()> {
            let mut conn = cat.connect(Duration::from_secs(2))?;
            let tx = conn.transaction()?;
            tx.execute("DELETE FROM wal_gap WHERE stanza = ?1", params![stanza])?;
            for g in &gaps {
                insert_gap(&tx, &stanza, g)?;
            }
            tx.commit()
        })
        .await;
        self.log_failure(r);
    }

    /// The WAL a stanza's repository missed, as far as this catalog knows,
    /// in name order.
    pub fn gaps(&self, stanza: &str) -> rusqlite::Result<Vec<GapRow>> {
        let conn = self.connect(Duration::from_secs(2))?;
        let mut st = conn.prepare(
            "SELECT name, dropped_at, reason FROM wal_gap WHERE stanza = ?1 ORDER BY name",
        )?;
        let rows = st.query_map(params![stanza], |r| {
            Ok(GapRow {
                name: r.get(0)?,
                dropped_at: r.get(1)?,
                reason: r.get(2)?,
            })
        })?;
        rows.collect()
    }

    /// Caches record summaries (they describe one content each, so they
    /// never go stale while that content is archived).
    pub async fn record_summaries_best_effort(
        &self,
        stanza: &str,
        rows: Vec<(WalFileName, Sha256Sum, WalSummary)>,
    ) {
        if rows.is_empty() {
            return;
        }
        let (cat, stanza) = (self.clone(), stanza.to_string());
        let r = tokio::task::spawn_blocking(move || -> rusqlite::Result<()> {
            let mut conn = cat.connect(BEST_EFFORT_BUSY)?;
            let tx = conn.transaction()?;
            {
                for (name, sha, sum) in &rows {
                    insert_summary(&tx, &stanza, name, sha, sum)?;
                }
            }
            tx.commit()
        })
        .await;
        self.log_failure(r);
    }

    /// The cached record summaries of the contents `wanted` (name, sha256)
    /// of a stanza: only those, so memory follows what a command reads,
    /// not the size of the archive.
    pub fn summaries(
        &self,
        stanza: &str,
        wanted: &[(String, String)],
    ) -> rusqlite::Result<std::collections::HashMap<(String, String), WalSummary>> {
        let conn = self.connect(Duration::from_secs(2))?;
        let mut st = conn.prepare(
            "SELECT summary FROM wal_summary WHERE stanza = ?1 AND name = ?2 AND sha256 = ?3",
        )?;
        let mut out = std::collections::HashMap::new();
        for (name, sha) in wanted {
            let json: Option<String> = st
                .query_row(params![stanza, name, sha], |r| r.get(0))
                .map(Some)
                .or_else(|e| match e {
                    rusqlite::Error::QueryReturnedNoRows => Ok(None),
                    e => Err(e),
                })?;
            // A row this version cannot read is as good as absent.
            if let Some(sum) = json.and_then(|j| serde_json::from_str(&j).ok()) {
                out.insert((name.clone(), sha.clone()), sum);
            }
        }
        Ok(out)
    }

    /// The backup headers of a stanza this catalog holds, by label. A row
    /// this version cannot read is left out (and read again from the
    /// repository).
    pub fn backup_headers(
        &self,
        stanza: &str,
    ) -> rusqlite::Result<std::collections::HashMap<String, BackupHeader>> {
        let conn = self.connect(Duration::from_secs(2))?;
        let mut st = conn
            .prepare("SELECT label, header FROM backup WHERE stanza = ?1 AND header IS NOT NULL")?;
        let rows = st.query_map(params![stanza], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        let mut out = std::collections::HashMap::new();
        for row in rows {
            let (label, json) = row?;
            if let Ok(h) = serde_json::from_str::<BackupHeader>(&json) {
                if h.label == label {
                    out.insert(label, h);
                }
            }
        }
        Ok(out)
    }

    /// Caches the headers of backups just read from the repository, and
    /// forgets the backups `gone` (no longer in it).
    pub async fn update_backups_best_effort(
        &self,
        stanza: &str,
        read: Vec<BackupHeader>,
        gone: Vec<String>,
    ) {
        if read.is_empty() && gone.is_empty() {
            return;
        }
        let (cat, stanza) = (self.clone(), stanza.to_string());
        let r = tokio::task::spawn_blocking(move || -> rusqlite::Result<()> {
            let mut conn = cat.connect(Duration::from_secs(2))?;
            let tx = conn.transaction()?;
            for label in &gone {
                tx.execute(
                    "DELETE FROM backup WHERE stanza = ?1 AND label = ?2",
                    params![stanza, label],
                )?;
            }
            for h in &read {
                let json = serde_json::to_string(h).unwrap_or_default();
                tx.execute(
                    "INSERT OR REPLACE INTO backup (stanza, label, type, timeline, start_lsn,
                         stop_lsn, start_time, stop_time, original_size, stored_size, header)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                    params![
                        stanza,
                        h.label,
                        h.backup_type,
                        h.timeline.0,
                        h.start_lsn.to_string(),
                        h.stop_lsn.to_string(),
                        h.start_time,
                        h.stop_time,
                        h.original_size as i64,
                        h.stored_size as i64,
                        json
                    ],
                )?;
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

    /// Runs a read of the cache on a blocking thread; a catalog that cannot
    /// be read answers "nothing cached" (the caller reads the repository).
    pub async fn read_best_effort<T, F>(catalog: Option<&Catalog>, read: F) -> T
    where
        T: Default + Send + 'static,
        F: FnOnce(&Catalog) -> rusqlite::Result<T> + Send + 'static,
    {
        let Some(cat) = catalog.cloned() else {
            return T::default();
        };
        match tokio::task::spawn_blocking(move || read(&cat).map_err(|e| (cat.path, e))).await {
            Ok(Ok(v)) => v,
            Ok(Err((path, e))) => {
                log::debug!(
                    "catalog {}: {e} (reading the repository instead)",
                    path.display()
                );
                T::default()
            }
            Err(e) => {
                log::debug!("catalog: {e}");
                T::default()
            }
        }
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

fn insert_gap(conn: &Connection, stanza: &str, g: &GapRow) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO wal_gap (stanza, name, dropped_at, reason) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (stanza, name) DO UPDATE SET dropped_at = excluded.dropped_at, reason = excluded.reason",
        params![stanza, g.name, g.dropped_at, g.reason],
    )?;
    Ok(())
}

fn insert_summary(
    conn: &Connection,
    stanza: &str,
    name: &WalFileName,
    sha: &Sha256Sum,
    sum: &WalSummary,
) -> rusqlite::Result<()> {
    let json = serde_json::to_string(sum).unwrap_or_default();
    conn.prepare_cached(
        "INSERT OR REPLACE INTO wal_summary
             (stanza, name, sha256, last_xact_us, crc_failures, summary)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        stanza,
        name.as_str(),
        sha.to_hex(),
        sum.last_xact.as_ref().map(|x| x.time_us),
        sum.crc_failures.len() as i64,
        json
    ])?;
    Ok(())
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
        rt.block_on(cat.record_wal_best_effort("main", &name, &d, None));
        rt.block_on(cat.record_wal_best_effort("main", &name, &d, None));
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
    fn backup_headers_are_cached_and_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let cat = Catalog::at(dir.path().join("c.db"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let header = |label: &str| {
            crate::repo::manifest::test_manifest(label, 1, 0x100, "2026-11-26T02:00:00Z").header
        };
        rt.block_on(cat.update_backups_best_effort("main", vec![header("a"), header("b")], vec![]));
        let got = cat.backup_headers("main").unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got["a"].stop_lsn, header("a").stop_lsn);
        // An info snapshot leaves the backups alone.
        rt.block_on(cat.replace_best_effort("main", Snapshot::default()));
        assert_eq!(cat.backup_headers("main").unwrap().len(), 2);
        rt.block_on(cat.update_backups_best_effort("main", vec![], vec!["a".into()]));
        let got = cat.backup_headers("main").unwrap();
        assert_eq!(got.keys().collect::<Vec<_>>(), ["b"]);
        assert!(cat.backup_headers("other").unwrap().is_empty());
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
        rt.block_on(cat.record_wal_best_effort("main", &name, &d, None));
    }
}
