//! `archive-get`: hand PostgreSQL one archived file, verified.
//!
//! "Not in the archive" is an outcome, not an error: the caller maps it to
//! exit 1, which PostgreSQL reads as "not available". Everything else
//! (corruption, an unreachable store, a bad configuration) is an error, which
//! during archive recovery must stop recovery rather than end it (see
//! `cli::exit`).

use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Kind, Result};
use crate::pg::control::read_cluster_info;
use crate::pg::history::TimelineHistory;
use crate::pg::{WalFileKind, WalFileName};
use crate::repo::archive::{tmp_path, Archive};
use crate::repo::{DbInfo, Repository, StanzaInfo};
use crate::spool::SpoolDir;

#[derive(Debug, Clone)]
pub struct GetOptions {
    pub name: String,
    pub dest: PathBuf,
    /// Where prefetched segments wait (`None`: no prefetch).
    pub spool: Option<SpoolDir>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GetOutcome {
    Restored,
    NotFound,
}

pub async fn archive_get(repo: &Repository, opts: &GetOptions) -> Result<GetOutcome> {
    get_inner(repo, opts)
        .await
        .map_err(|e| e.context(format!("archive-get {}", opts.name)))
}

async fn get_inner(repo: &Repository, opts: &GetOptions) -> Result<GetOutcome> {
    let name = parse_name(&opts.name)?;
    if let Some(spool) = &opts.spool {
        spool.forget_prefetched_before(&name);
        let ready = spool.prefetched(&name);
        if ready.exists() {
            // Checked against its checksum when it was fetched; only ever
            // handed out under exactly the name it was fetched for.
            let dest = opts.dest.clone();
            let moved = tokio::task::spawn_blocking(move || move_into(&ready, &dest)).await?;
            match moved {
                Ok(()) => {
                    log::debug!("{name}: from the prefetch spool");
                    return Ok(GetOutcome::Restored);
                }
                Err(e) => log::debug!("use prefetched {name}: {e}; fetching it again"),
            }
        }
    }
    let stanza = repo.require_stanza().await?;
    let db = db_of_working_dir(&stanza).await;
    if !repo.archive(&db).fetch_into(&name, &opts.dest).await? {
        return Ok(GetOutcome::NotFound);
    }
    if let (Some(spool), WalFileKind::History) = (&opts.spool, name.kind()) {
        if let Err(e) = spool.record_recovery_timeline(name.timeline()) {
            log::debug!("record the recovery timeline {}: {e}", name.timeline());
        }
    }
    Ok(GetOutcome::Restored)
}

/// Which of the stanza's clusters the recovering server belongs to.
///
/// After `pg_upgrade` the stanza records more than one cluster, and an old
/// backup restored with the old binaries must replay the old cluster's WAL
/// (`<major>-<id>`), whose names repeat in the new cluster's. PostgreSQL
/// runs `restore_command` with the data directory as working directory
/// (the same fact `cli` relies on for `standby.signal`), so its
/// `global/pg_control` says which cluster this is: its system identifier
/// and major pick the entry. Nothing to read with a single cluster; and
/// when the working directory is not a data directory of a recorded
/// cluster (a call by hand), the current cluster, as before upgrades.
async fn db_of_working_dir(stanza: &StanzaInfo) -> DbInfo {
    if stanza.dbs.len() == 1 {
        return stanza.current().clone();
    }
    let here = tokio::task::spawn_blocking(|| read_cluster_info(Path::new("."))).await;
    match here {
        Ok(Ok(c)) => match stanza.db_for_cluster(c.control.system_identifier, c.major) {
            Some(db) => db.clone(),
            None => {
                log::warn!(
                    "the working directory is cluster {} (PostgreSQL {}), which stanza {:?} \
                     does not record; fetching from its current cluster",
                    c.control.system_identifier,
                    c.major,
                    stanza.stanza
                );
                stanza.current().clone()
            }
        },
        Ok(Err(e)) => {
            log::debug!("working directory is not a data directory ({e}): current cluster");
            stanza.current().clone()
        }
        Err(e) => {
            log::debug!("read pg_control of the working directory: {e}");
            stanza.current().clone()
        }
    }
}

fn parse_name(name: &str) -> Result<WalFileName> {
    WalFileName::parse(name).map_err(|e| {
        Error::usage(format!("not a WAL file name: {e}"))
            .hint("restore_command = 'pgvault archive-get %f \"%p\"'")
    })
}

/// Renames (or, across file systems, copies) a prefetched file into place.
fn move_into(from: &Path, dest: &Path) -> std::io::Result<()> {
    if fs::rename(from, dest).is_ok() {
        return Ok(());
    }
    let tmp = tmp_path(dest);
    fs::copy(from, &tmp)?;
    fs::rename(&tmp, dest)?;
    let _ = fs::remove_file(from);
    Ok(())
}

/// Prefetch: fetches up to `ahead` segments after `name` on its timeline
/// into the spool, each verified before it is renamed there, stopping at
/// the first one the archive does not have yet. Runs in a detached
/// process so that PostgreSQL's call returns at once; a lock file keeps
/// one prefetcher per spool.
pub async fn prefetch(
    repo: &Repository,
    name: &str,
    ahead: usize,
    spool: &SpoolDir,
) -> Result<usize> {
    let name = parse_name(name)?;
    if name.kind() != WalFileKind::Segment || ahead == 0 {
        return Ok(0);
    }
    let Some(_lock) = spool
        .try_lock_prefetcher()
        .map_err(|e| Error::io_in(Kind::Internal, "lock the prefetch spool", &e))?
    else {
        return Ok(0); // another prefetcher is at work
    };
    let stanza = repo.require_stanza().await?;
    let db = db_of_working_dir(&stanza).await;
    let seg = db.wal_segment_size;
    let Some(start) = name.segno(seg) else {
        return Ok(0);
    };
    let archive = repo.archive(&db);
    let history = recovery_history(&archive, &name, spool).await;
    let mut fetched = 0;
    let mut segno = start;
    // Like PostgreSQL, never go back to an older timeline once a newer one's
    // file was read.
    let mut floor = name.timeline();
    'ahead: for _ in 0..ahead {
        segno = segno.next();
        // The names PostgreSQL will ask for, in its order: from the switch
        // segment on, the new timeline's; before it (or while the new
        // timeline has no such segment), the older ones'.
        let timelines = match &history {
            Some(h) => h.timelines_for_segment(segno, seg),
            None => vec![name.timeline()],
        };
        for tli in timelines.into_iter().filter(|&t| t >= floor) {
            let next = WalFileName::for_segment(tli, segno, seg);
            // fetch_into decodes beside the destination and renames only
            // after the checksum matched: the spool never holds an
            // unchecked file.
            let have = spool.prefetched(&next).exists();
            if have || archive.fetch_into(&next, &spool.prefetched(&next)).await? {
                fetched += usize::from(!have);
                floor = tli;
                continue 'ahead;
            }
        }
        break; // not archived (yet) on any timeline: stop here
    }
    Ok(fetched)
}

/// The history recovery follows, when it is a later timeline than `name`'s
/// and includes it (read from the archive); `None`: stay on `name`'s
/// timeline.
async fn recovery_history(
    archive: &Archive,
    name: &WalFileName,
    spool: &SpoolDir,
) -> Option<TimelineHistory> {
    let target = spool.recovery_timeline()?;
    if target <= name.timeline() {
        return None;
    }
    match archive.history(target).await {
        Ok(h) => h.filter(|h| h.contains(name.timeline())),
        Err(e) => {
            log::debug!("prefetch: read the history of timeline {target}: {e}");
            None
        }
    }
}
