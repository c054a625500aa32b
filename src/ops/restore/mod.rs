//! `restore`: lay down a backup in a data directory and write the recovery
//! configuration for a target.
//!
//! Two steps, one module each:
//! * [`plan`]: which backup, which cluster of the stanza, which timeline,
//!   and whether the archive reaches the target — decided before anything
//!   is written, so a refused restore leaves `--pgdata` untouched;
//! * [`lay`]: lay the backup down in the data directory: directories and
//!   tablespace links, every file (in parallel, each checked against its
//!   SHA-256), `backup_label`, `tablespace_map`, the recovery settings and
//!   the signal file, everything flushed to disk, and only then
//!   `global/pg_control`. Until that last file exists PostgreSQL refuses to
//!   start the directory, so a restore that fails half-way can never be
//!   started as if it were complete.

mod lay;
mod plan;

use std::path::PathBuf;
use std::sync::Arc;

use crate::catalog::Catalog;
use crate::error::Result;
use crate::ops::progress::Progress;
use crate::pg::recovery::{RecoveryTarget, TargetAction};
use crate::pg::Lsn;
use crate::repo::manifest::Manifest;
use crate::repo::Repository;
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub pgdata: PathBuf,
    /// A backup label; `None` for the newest that fits the target.
    pub set: Option<String>,
    pub target: Option<RecoveryTarget>,
    pub target_action: Option<TargetAction>,
    /// `latest`, `current` or a number.
    pub target_timeline: Option<String>,
    pub target_exclusive: bool,
    pub archive_mode_off: bool,
    pub tablespace_map: Vec<(u32, PathBuf)>,
    pub standby: bool,
    pub primary_conninfo: Option<String>,
    pub delta: bool,
    pub process_max: usize,
    /// The `restore_command` to write (built by the caller, who knows how
    /// this binary was invoked; it never contains a secret).
    pub restore_command: String,
    /// Refuse a target the archived WAL does not reach (`--no-target-check`
    /// turns it off).
    pub target_check: bool,
    pub catalog: Option<Catalog>,
}

#[derive(Debug, Clone)]
pub struct Restored {
    pub label: String,
    pub files: usize,
    pub bytes: u64,
    pub skipped_by_delta: usize,
    /// The PostgreSQL major that must start it (the backup's cluster's).
    pub pg_version: u32,
}

/// Where recovery from one backup can reach (see [`reach`]).
#[derive(Debug, Clone)]
pub struct Reach {
    pub backup: Manifest,
    /// The PostgreSQL major that must start it.
    pub pg_version: u32,
    pub wal_segment_size: u32,
    /// The newest record on the replay path that a time target can stop
    /// at (a commit, an abort, a restore point): Unix µs and its LSN.
    pub last_commit: Option<(i64, Lsn)>,
    /// The end of the WAL the path holds, when known.
    pub end_lsn: Option<Lsn>,
    /// Archived WAL files on the path, from the backup's first segment on.
    pub wal_files: u64,
}

/// The backup a restore with `opts` would choose, and how far the archived
/// WAL after it reaches: planned exactly as [`restore`] plans, before
/// anything is written (`drill` picks its target and sizes its scratch
/// directory from it).
pub async fn reach(repo: &Repository, opts: &RestoreOptions) -> Result<Reach> {
    plan::reach(repo, opts).await
}

pub async fn restore(
    repo: &Repository,
    opts: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<Restored> {
    restore_inner(repo, opts, progress)
        .await
        .map_err(|e| e.context(format!("restore into {}", opts.pgdata.display())))
}

async fn restore_inner(
    repo: &Repository,
    opts: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<Restored> {
    let (stanza, manifests) = plan::backups(repo).await?;
    let plan = plan::choose_backup_and_db(repo, &stanza, &manifests, opts).await?;
    if opts.target_check {
        plan::check_target_reachable(repo, opts, &plan).await?;
    }
    let (m, db) = (plan.backup, plan.db);
    progress.message(&format!(
        "restoring backup {} (stopped {} at {}, timeline {})",
        m.label, m.stop_time, m.stop_lsn, m.timeline
    ));
    if db.id != stanza.current().id {
        progress.message(&format!(
            "backup {} is of the cluster before a pg_upgrade (PostgreSQL {}, archive {}): \
             start it with PostgreSQL {}'s binaries",
            m.label,
            db.pg_version,
            db.dir(),
            db.pg_version
        ));
    }

    let skipped = lay::lay_down(repo, m, opts, progress.clone()).await?;
    progress.finish();
    Ok(Restored {
        label: m.label.clone(),
        files: m.files.len(),
        bytes: m.original_size,
        skipped_by_delta: skipped,
        pg_version: db.pg_version,
    })
}
