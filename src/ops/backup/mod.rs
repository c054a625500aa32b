//! `backup`: a base backup of a running cluster, full, or differential or
//! incremental (only what changed since a reference backup: `incr`).
//!
//! Order (each step only after the previous one succeeded):
//! 0. choose the server to copy (`backup-standby`, see [`super::standby`]):
//!    this node's, a primary or a standby, and check that `--pgdata` is
//!    that server's data directory;
//! 1. prove archiving works (on the primary): a failing archiver would
//!    make the backup useless (its WAL would never arrive); from a
//!    standby, wait until it has replayed past the primary's checkpoint;
//! 2. `pg_backup_start` in one session;
//! 3. copy the data directory from local disk — several files at once, each
//!    streamed through SHA-256 and zstd into the repository, small files
//!    bundled — and `global/pg_control` last;
//! 4. `pg_backup_stop`, which returns `backup_label` and `tablespace_map`
//!    (from a standby: still a standby on the same timeline, and the
//!    primary switches WAL so that the stop segment is archived);
//! 5. wait, with a bound, until the WAL from start to stop is archived;
//! 6. write the manifest. Only now is the backup complete: an interrupted
//!    backup has no manifest and is never offered for restore.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

mod copy;
mod incr;
/// Public for `tests/flatmem.rs` only (a resumed backup's journal at a
/// million files); not an interface.
#[doc(hidden)]
pub mod resume;
mod worker;

pub use incr::BackupKind;

use crate::error::{Error, Kind, Result};
use crate::ops::check::{prove_archiving, wait_for_wal};
use crate::ops::pg_error;
use crate::ops::progress::Progress;
use crate::ops::standby::{self, PrimaryOverride, StandbyMode};
use crate::ops::stanza_create::read_cluster;
use crate::pg::conn::ConnParams;
use crate::pg::recovery::parse_backup_label;
use crate::pg::WalFileName;
use crate::repo::codec::EncodeOptions;
use crate::repo::filelist::InlineFiles;
use crate::repo::layout;
use crate::repo::manifest::{BackupHeader, Manifest, ResumeReport, Tablespace, MANIFEST_FORMAT};
use crate::repo::Repository;
use copy::{copy_files, done_entries, Copied};
use resume::{Journal, JournalHeader};

#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// `--type`: full, diff or incr.
    pub kind: BackupKind,
    /// This node's server: its data directory and connection.
    pub pgdata: PathBuf,
    pub conn: ConnParams,
    /// `backup-standby`: whether this node must, may or must not be a
    /// standby.
    pub standby: StandbyMode,
    /// How to reach the primary from a standby, where its own connection
    /// to it is not the way.
    pub primary: PrimaryOverride,
    pub start_fast: bool,
    pub process_max: usize,
    /// `threads`: zstd worker threads for a large file while the other
    /// workers have nothing left to do (the tail of the backup, or
    /// `process_max` 1); otherwise each file is compressed on its worker's
    /// own thread.
    pub encode: EncodeOptions,
    /// Bound on waiting for WAL to reach the repository.
    pub archive_timeout: Duration,
    /// `resume`: continue an interrupted backup that fits (see `resume`).
    pub resume: bool,
    /// The local cache of backup headers, for choosing a reference without
    /// reading every manifest.
    pub catalog: Option<crate::catalog::Catalog>,
}

pub async fn backup(
    repo: &Repository,
    opts: &BackupOptions,
    progress: Arc<dyn Progress>,
) -> Result<Manifest> {
    let context = || format!("backup of {}", opts.pgdata.display());
    let lock = repo
        .lock("backup")
        .await
        .map_err(|e| e.context(context()))?;
    let result = backup_inner(repo, opts, progress).await;
    let released = lock.release().await;
    let manifest = result.map_err(|e| e.context(context()))?;
    released.map_err(|e| e.context(context()))?;
    Ok(manifest)
}

async fn backup_inner(
    repo: &Repository,
    opts: &BackupOptions,
    progress: Arc<dyn Progress>,
) -> Result<Manifest> {
    let stanza = repo.require_stanza().await?;
    let db = stanza.current().clone();
    let source = standby::choose(
        opts.standby,
        &opts.conn,
        &opts.pgdata,
        &opts.primary,
        &*progress,
    )
    .await?;
    let pgdata = source.pgdata.as_path();
    let cluster = read_cluster(pgdata.to_path_buf()).await?;
    if cluster.control.system_identifier != db.system_id() {
        return Err(Error::stanza(format!(
            "{} is cluster {}, but stanza {:?} archives cluster {}",
            pgdata.display(),
            cluster.control.system_identifier,
            repo.stanza(),
            db.system_identifier
        ))
        .hint("after pg_upgrade run `pgvault stanza-upgrade --pgdata <new PGDATA>` first"));
    }

    let session = &source.session;
    if session.major != db.pg_version {
        return Err(Error::stanza(format!(
            "the server runs PostgreSQL {}, the stanza records {}",
            session.major, db.pg_version
        )));
    }
    standby::check_datadir(session, &source.params, pgdata).await?;
    let primary = source.primary.as_ref();
    let archiving_on = primary.map(|p| &p.session).unwrap_or(session);
    prove_archiving(repo, &db, archiving_on, opts.archive_timeout, &*progress).await?;
    if let Some(p) = primary {
        standby::wait_replayed(
            session,
            p,
            opts.start_fast,
            opts.archive_timeout,
            &*progress,
        )
        .await?;
    }

    // The reference of a diff or incr, chosen before the backup starts;
    // none: a full backup. The timeline is the one the primary writes (a
    // standby cannot name its current WAL file; it replays the primary's
    // timeline, which `standby` checked).
    let tli_now = archiving_on.current_timeline().await.map_err(pg_error)?;
    let history = if opts.kind == BackupKind::Full {
        None
    } else {
        incr::history_of(repo, &db, tli_now).await?
    };
    let reference = incr::choose_reference(
        repo,
        opts.catalog.as_ref(),
        &db,
        opts.kind,
        history.as_ref(),
        &*progress,
    )
    .await?;
    let kind = match (&reference, &history) {
        (Some(_), Some(_)) => opts.kind,
        _ => BackupKind::Full,
    };
    // An interrupted backup of the same kind on the same reference is
    // continued in its directory (see `resume`).
    let mut journal_header = JournalHeader {
        format: resume::JOURNAL_FORMAT,
        label: String::new(),
        backup_type: kind.as_str().into(),
        reference: reference.as_ref().map(|r| r.label.clone()),
        system_identifier: db.system_identifier.clone(),
        db_id: db.id,
        pg_version: db.pg_version,
    };
    let resumed = match opts.resume {
        true => resume::find(repo, &journal_header, &*progress)
            .await?
            .map(Arc::new),
        false => None,
    };
    let label = match &resumed {
        Some(r) => r.label.clone(),
        None => new_label(repo, kind.suffix()).await?,
    };
    journal_header.label = label.clone();
    let journal = Journal::new(
        repo,
        journal_header,
        resumed.as_ref().map_or(0, |r| r.next_chunk),
    );
    let from = match primary {
        Some(p) => format!(
            "from the standby at {} (primary {})",
            source.params.describe(),
            p.params.describe()
        ),
        None => format!("from the primary at {}", source.params.describe()),
    };
    let on = match &reference {
        Some(r) => format!("{} backup on {}", kind.as_str(), r.label),
        None => "full backup".to_string(),
    };
    if let Some(r) = &resumed {
        let (files, bytes) = r.candidates();
        progress.message(&format!(
            "backup {label}: resuming the interrupted {on}: {files} files ({:.1} MiB) it stored \
             are reused where unchanged since",
            bytes as f64 / (1 << 20) as f64
        ));
    }
    progress.message(&format!(
        "backup {label}: {on}, starting {from}, files from {} ({}checkpoint)",
        pgdata.display(),
        if opts.start_fast { "fast " } else { "" }
    ));
    let start_lsn = session
        .backup_start(&format!("pgvault {label}"), opts.start_fast)
        .await
        .map_err(pg_error)?;
    let start_time = session.now_utc().await.map_err(pg_error)?;
    let tablespaces: Vec<Tablespace> = session
        .tablespaces()
        .await
        .map_err(pg_error)?
        .into_iter()
        .map(|(oid, name, location)| Tablespace {
            oid,
            name,
            location,
        })
        .collect();

    // With data checksums, every page is checked as it is read (pages
    // changed after the start are not: WAL replay rewrites them).
    let verify_pages = (cluster.control.data_checksum_version != 0).then_some(start_lsn);
    let plan = match (reference, &history) {
        (Some(r), Some(h)) => {
            // The segment holding the start must be archived to read its
            // block references: switch to the next one.
            let seg = db.wal_segment_size;
            let started = async {
                archiving_on.write_and_switch().await.map_err(pg_error)?;
                let at = start_lsn.segno(seg);
                wait_for_wal(
                    repo,
                    &db,
                    h.timeline_at(start_lsn),
                    at,
                    at,
                    opts.archive_timeout,
                )
                .await?;
                incr::plan(repo, &db, h, r, start_lsn, &*progress).await
            }
            .await;
            match started {
                Ok(p) => Some(Arc::new(p)),
                Err(e) => {
                    let _ = session.backup_stop().await;
                    return Err(e);
                }
            }
        }
        _ => None,
    };
    let copied = copy_files(
        repo,
        &label,
        pgdata,
        opts,
        (verify_pages, plan.clone()),
        (resumed.clone(), journal),
        progress.clone(),
    )
    .await;
    // Stop the backup whatever happened to the copy: leaving it running
    // would hold back WAL removal until the session ends.
    let stop = session.backup_stop().await.map_err(pg_error);
    if primary.is_some() {
        standby::still_standby(session).await?;
    }
    let Copied {
        db: scratch_db,
        dirs,
        pages: page_checksums,
        counts,
        original_size,
        stored_size,
        sums,
        reused,
    } = copied?;
    let (reference, depends_on, changes) = match &plan {
        Some(p) => {
            let mut r = p.report.clone();
            r.unchanged_files = counts.unchanged_files;
            r.delta_files = counts.delta_files;
            r.changed_blocks = counts.changed_blocks;
            r.whole_files = counts.whole_files;
            r.compared_files = counts.compared_files;
            r.compared_blocks = counts.compared_blocks;
            for f in &counts.fallbacks {
                progress.message(&format!("falling back to the whole file: {f}"));
            }
            r.fallbacks.extend(counts.fallbacks);
            let mut chain = vec![p.reference.label.clone()];
            chain.extend(p.reference.depends_on.iter().cloned());
            (Some(p.reference.label.clone()), chain, Some(r))
        }
        None => (None, Vec::new(), None),
    };
    if let Some(pc) = &page_checksums {
        for b in &pc.bad_pages {
            progress.message(&format!(
                "warning: {} ({} fork) block {}: page checksum {} does not match its contents ({}); \
                 the backup holds the page as it is on disk",
                b.path, b.fork, b.block, b.stored, b.computed
            ));
        }
    }
    let stop = stop?;
    let stop_time = session.now_utc().await.map_err(pg_error)?;
    let parsed = parse_backup_label(&stop.backup_label).map_err(|e| {
        Error::new(
            Kind::Postgres,
            format!("backup stop returned a bad backup_label: {e}"),
        )
    })?;
    if parsed.start_lsn != start_lsn {
        return Err(Error::new(
            Kind::Postgres,
            format!(
                "backup_label starts at {} but the backup started at {start_lsn}",
                parsed.start_lsn
            ),
        ));
    }
    let tli = parsed.start_timeline;
    let seg = db.wal_segment_size;
    let first = start_lsn.segno(seg);
    let last = stop.lsn.prev_segno(seg).max(first);
    if let Some(p) = primary {
        standby::finish_on_primary(session, p, tli, stop.lsn, seg).await?;
    }

    progress.message(&format!(
        "backup {label}: waiting for WAL {} … {} to be archived",
        WalFileName::for_segment(tli, first, seg),
        WalFileName::for_segment(tli, last, seg)
    ));
    wait_for_wal(repo, &db, tli, first, last, opts.archive_timeout).await?;

    if resumed.is_some() {
        // An interrupted run may have written its block sums and file list
        // just before it stopped: this run's replace them.
        let keys = vec![
            layout::backup_block_sums_key(repo.stanza(), &label),
            layout::backup_file_list_key(repo.stanza(), &label),
        ];
        repo.delete_all(&crate::repo::Deletion::phased([keys]))
            .await?;
    }
    repo.write_block_sums(
        &label,
        sums,
        EncodeOptions {
            threads: 0,
            ..opts.encode
        },
    )
    .await?;
    // Objects of the interrupted runs this backup does not list go first:
    // a complete backup holds only what its manifest names.
    let resumed = match &resumed {
        Some(r) => {
            r.delete_unused(repo, done_entries(scratch_db.clone()))
                .await?;
            Some(ResumeReport {
                interrupted_runs: r.runs,
                ..reused
            })
        }
        None => None,
    };
    // The file list, in path order, from the scratch database.
    let file_list = repo
        .write_file_list(&label, done_entries(scratch_db))
        .await?;
    let manifest = Manifest {
        header: BackupHeader {
            format: MANIFEST_FORMAT,
            label: label.clone(),
            backup_type: kind.as_str().into(),
            reference,
            depends_on,
            changes,
            start_lsn,
            stop_lsn: stop.lsn,
            start_time,
            stop_time,
            timeline: tli,
            pg_version: db.pg_version,
            system_identifier: db.system_identifier.clone(),
            db_id: db.id,
            wal_segment_size: seg,
            wal_start: WalFileName::for_segment(tli, first, seg)
                .as_str()
                .to_string(),
            wal_stop: WalFileName::for_segment(tli, last, seg)
                .as_str()
                .to_string(),
            original_size,
            stored_size,
            file_count: file_list.count,
            page_checksums,
            resumed,
        },
        backup_label: stop.backup_label,
        tablespace_map: stop.tablespace_map,
        tablespaces,
        dirs,
        file_list: Some(file_list),
        inline_files: InlineFiles::default(),
    };
    repo.write_manifest(&manifest).await?;
    // The manifest says it all now; a journal left behind (this failing) is
    // deleted with the backup.
    if let Err(e) = resume::delete_journal(repo, &label).await {
        progress.message(&format!(
            "warning: backup {label} is complete, but its journal was not deleted: {e}"
        ));
    }
    progress.finish();
    Ok(manifest)
}

/// Labels are UTC, sort by time and are unique: `20261126-031500F` (`D`
/// a differential, `I` an incremental backup).
async fn new_label(repo: &Repository, suffix: char) -> Result<String> {
    let existing = repo.backup_dir_labels().await?;
    loop {
        let stamp = chrono::Utc::now().format("%Y%m%d-%H%M%S").to_string();
        let label = format!("{stamp}{suffix}");
        if !existing.iter().any(|l| l.starts_with(&stamp)) {
            return Ok(label);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
