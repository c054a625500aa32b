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

mod blocks;
mod dirs;
mod durable;
mod files;
pub mod lay;
mod pieces;
mod pipe;
mod plan;

use std::path::PathBuf;
use std::sync::Arc;

use crate::catalog::Catalog;
use crate::error::{Error, Kind, Result};
use crate::ops::backups::BackupIndex;
use crate::ops::progress::Progress;
use crate::pg::recovery::{RecoveryTarget, TargetAction};
use crate::pg::Lsn;
use crate::repo::manifest::{label_time, BackupHeader, ManifestRead, UnreadableManifest};
use crate::repo::{Repository, StanzaInfo};
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

/// Says so when a backup that restore had to skip, its manifest
/// unreadable, may have been a better start than `chosen`: one that began
/// after it (labels are start times) and, for a time target, before the
/// target.
fn warn_hidden_candidates(
    unreadable: &[UnreadableManifest],
    chosen: &BackupHeader,
    target: Option<&RecoveryTarget>,
) {
    for u in unreadable.iter().filter(|u| u.label > chosen.label) {
        let started = label_time(&u.label);
        if let (Some(RecoveryTarget::Time(t)), Some(started)) = (target, started) {
            if started >= *t {
                continue;
            }
        }
        log::warn!(
            "backup {} is newer than backup {} and might have been a closer start, \
             but it was skipped: {}",
            u.label,
            chosen.label,
            u.error
        );
    }
}

#[derive(Debug, Clone)]
pub struct Restored {
    pub label: String,
    pub files: usize,
    pub bytes: u64,
    pub skipped_by_delta: usize,
    /// `--delta` on a backup with block sums: what comparing the relation
    /// files on disk block by block found and cost.
    pub delta_blocks: Option<lay::DeltaBlocks>,
    /// The PostgreSQL major that must start it (the backup's cluster's).
    pub pg_version: u32,
}

/// Where recovery from one backup can reach (see [`reach`]).
#[derive(Debug, Clone)]
pub struct Reach {
    pub backup: BackupHeader,
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
    let (stanza, backups) = readable_backups(repo, opts).await?;
    plan::reach(repo, &stanza, &backups.headers, opts).await
}

pub async fn restore(
    repo: &Repository,
    opts: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<Restored> {
    restore_inner(repo, opts, Some(progress))
        .await
        .map(|r| r.expect("laid down when given a progress"))
        .map_err(|e| e.context(format!("restore into {}", opts.pgdata.display())))
}

/// With several repositories: restores from the first (in `repos`' order)
/// that has a backup recovering to the target — a repository that cannot
/// be read, has no fitting backup or whose archive does not reach the
/// target is passed over, with a warning, before anything is written.
/// Each repository comes with its own catalog (`opts.catalog` is ignored):
/// a catalog caches one repository's backups, and reading another's
/// through it would forget the backups it knows. Returns the index in
/// `repos` of the one used.
pub async fn restore_first(
    repos: &[(Repository, Option<Catalog>)],
    opts: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<(usize, Restored)> {
    let with = |catalog: &Option<Catalog>| RestoreOptions {
        catalog: catalog.clone(),
        ..opts.clone()
    };
    let ((last, last_catalog), rest) = repos
        .split_last()
        .ok_or_else(|| Error::internal("restore from no repository"))?;
    for (i, (repo, catalog)) in rest.iter().enumerate() {
        let opts = with(catalog);
        match restore_inner(repo, &opts, None).await {
            Ok(_) => return restore(repo, &opts, progress).await.map(|r| (i, r)),
            Err(e) => log::warn!(
                "not restoring from {}: {e}; trying the next repository",
                repo.describe()
            ),
        }
    }
    restore(last, &with(last_catalog), progress)
        .await
        .map(|r| (repos.len() - 1, r))
}

/// The stanza and its backups, when one of them can be restored: refuses
/// a `--set` whose manifest cannot be read, and a stanza without a
/// readable complete backup.
async fn readable_backups(
    repo: &Repository,
    opts: &RestoreOptions,
) -> Result<(StanzaInfo, BackupIndex)> {
    let stanza = repo.require_stanza().await?;
    let backups = crate::ops::backups::index(repo, opts.catalog.as_ref()).await?;
    if let Some(u) = opts.set.as_deref().and_then(|l| backups.unreadable(l)) {
        return Err(Error::repository(format!(
            "backup {} cannot be restored: {}",
            u.label, u.error
        ))
        .hint("choose another backup with --set (`pgvault info` lists them)"));
    }
    if backups.headers.is_empty() {
        let unreadable: Vec<&str> = backups
            .unreadable
            .iter()
            .map(|u| u.label.as_str())
            .collect();
        if !unreadable.is_empty() {
            return Err(Error::repository(format!(
                "stanza {:?} has no backup that can be restored: the manifest of every \
                 complete backup ({}) cannot be read",
                repo.stanza(),
                unreadable.join(", ")
            ))
            .hint("`pgvault verify` says what is damaged"));
        }
        return Err(Error::new(
            Kind::Stanza,
            format!("stanza {:?} has no complete backup", repo.stanza()),
        )
        .hint("take one with `pgvault backup`"));
    }
    Ok((stanza, backups))
}

/// Plans the restore and, with `progress`, lays it down; without, stops
/// after the plan (nothing written) and returns `None`.
async fn restore_inner(
    repo: &Repository,
    opts: &RestoreOptions,
    progress: Option<Arc<dyn Progress>>,
) -> Result<Option<Restored>> {
    let (stanza, backups) = readable_backups(repo, opts).await?;
    let plan = plan::choose_backup_and_db(repo, &stanza, &backups.headers, opts).await?;
    if opts.set.is_none() || opts.set.as_deref() == Some("latest") {
        warn_hidden_candidates(&backups.unreadable, plan.backup, opts.target.as_ref());
    }
    if opts.target_check {
        plan::check_target_reachable(repo, opts, &plan).await?;
    }
    let Some(progress) = progress else {
        return Ok(None);
    };
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

    // The choice read headers (from the catalog where it could); laying
    // the backup down needs all of its manifest.
    let read = repo.read_manifest(&m.label).await?;
    if !matches!(read, Some(ManifestRead::Found(_))) {
        // The catalog's copy of its header is stale: forget it.
        if let Some(cat) = &opts.catalog {
            cat.update_backups_best_effort(repo.stanza(), Vec::new(), vec![m.label.clone()])
                .await;
        }
    }
    let m = match read {
        Some(ManifestRead::Found(full)) => full,
        Some(ManifestRead::Unreadable(u)) => {
            return Err(Error::repository(format!(
                "backup {} cannot be restored: {}",
                u.label, u.error
            ))
            .hint("choose another backup with --set (`pgvault info` lists them)"))
        }
        None => {
            return Err(Error::repository(format!(
                "backup {} is gone from {} (expired while this restore started?)",
                m.label,
                repo.describe()
            ))
            .hint("run the restore again: it chooses among the backups there now"))
        }
    };
    let laid = lay::lay_down(repo, &m, opts, progress.clone()).await?;
    progress.finish();
    Ok(Some(Restored {
        label: m.label.clone(),
        files: m.file_count as usize,
        bytes: m.original_size,
        skipped_by_delta: laid.skipped,
        delta_blocks: laid.delta_blocks,
        pg_version: db.pg_version,
    }))
}
