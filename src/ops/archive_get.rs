//! `archive-get`: hand PostgreSQL one archived file, verified.
//!
//! "Not in the archive" is an outcome, not an error: the caller maps it to
//! exit 1, which PostgreSQL reads as "not available". Everything else
//! (corruption, an unreachable store, a bad configuration) is an error, which
//! during archive recovery must stop recovery rather than end it (see
//! `cli::exit`).

use std::fs::{self, File};
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use crate::error::{Error, Kind, Result};
use crate::ops::archive_push::read_claim;
use crate::pg::control::read_cluster_info;
use crate::pg::history::{self, TimelineHistory};
use crate::pg::{WalFileKind, WalFileName};
use crate::repo::codec::{self, Sha256Sum};
use crate::repo::layout::{self, ArchiveKey};
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
    if !fetch_into(repo, &db.dir(), &name, &opts.dest).await? {
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

/// Fetches `name` into `dest`, verified; `false` when the archive does not
/// hold it.
async fn fetch_into(
    repo: &Repository,
    db_dir: &str,
    name: &WalFileName,
    dest: &Path,
) -> Result<bool> {
    let Some((key, sha)) = locate(repo, db_dir, name).await? else {
        return Ok(false);
    };
    let Some(reader) = repo.backend().get(&key).await? else {
        // Listed or claimed a moment ago: it was there. Vanishing now means
        // something deletes archived WAL under a running recovery.
        return Err(Error::repository(format!(
            "{}/{key} disappeared while being read",
            repo.describe()
        )));
    };
    let dest = dest.to_path_buf();
    let what = format!("{}/{key}", repo.describe());
    tokio::task::spawn_blocking(move || restore_into(reader, &dest, sha, &what)).await??;
    Ok(true)
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
    let dir = spool.get_dir();
    let Some(_lock) = spool
        .try_lock_prefetcher()
        .map_err(|e| Error::internal(format!("lock {}: {e}", dir.display())))?
    else {
        return Ok(0); // another prefetcher is at work
    };
    let stanza = repo.require_stanza().await?;
    let db = db_of_working_dir(&stanza).await;
    let seg = db.wal_segment_size;
    let Some(start) = name.segno(seg) else {
        return Ok(0);
    };
    let history = recovery_history(repo, &db.dir(), &name, spool).await;
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
            if have || fetch_into(repo, &db.dir(), &next, &spool.prefetched(&next)).await? {
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
    repo: &Repository,
    db_dir: &str,
    name: &WalFileName,
    spool: &SpoolDir,
) -> Option<TimelineHistory> {
    let target = spool.recovery_timeline()?;
    if target <= name.timeline() {
        return None;
    }
    let file = WalFileName::history(target);
    let bytes = match fetch_small(repo, db_dir, &file).await {
        Ok(Some(b)) => b,
        Ok(None) => return None,
        Err(e) => {
            log::debug!("prefetch: read {file}: {e}");
            return None;
        }
    };
    let text = String::from_utf8_lossy(&bytes);
    history::parse_history(target, &text)
        .ok()
        .filter(|h| h.contains(name.timeline()))
}

/// Reads a small archived file (a timeline history) into memory, verified;
/// `None` when the archive does not hold it.
pub async fn fetch_small(
    repo: &Repository,
    db_dir: &str,
    name: &WalFileName,
) -> Result<Option<Vec<u8>>> {
    let Some((key, sha)) = locate(repo, db_dir, name).await? else {
        return Ok(None);
    };
    let Some(raw) = repo.backend().get_bytes(&key).await? else {
        return Ok(None);
    };
    let what = format!("{}/{key}", repo.describe());
    let data = codec::decode_bytes(&raw).map_err(|e| Error::repository(format!("{what}: {e}")))?;
    if codec::read_trailer(&raw).map(|d| d.sha256).ok() != Some(sha) {
        return Err(Error::repository(format!(
            "{what}: content does not match its name's checksum"
        )));
    }
    Ok(Some(data))
}

/// Finds the data object for `name`: the one its claim names, or — for a
/// push that crashed between storing the data and writing the claim — the
/// only one there is.
async fn locate(
    repo: &Repository,
    db_dir: &str,
    name: &WalFileName,
) -> Result<Option<(String, Sha256Sum)>> {
    let claim_key = layout::wal_claim_key(repo.stanza(), db_dir, name);
    if let Some(claim) = read_claim(repo, &claim_key).await? {
        let sha = Sha256Sum::from_hex(&claim.sha256).expect("read_claim checked the checksum");
        return Ok(Some((
            layout::wal_data_key(repo.stanza(), db_dir, name, &sha),
            sha,
        )));
    }
    let dir = layout::wal_dir(repo.stanza(), db_dir, name);
    let mut found: Vec<Sha256Sum> = repo
        .backend()
        .list(&dir)
        .await?
        .iter()
        .filter_map(|m| match layout::parse_archive_key(&m.key) {
            Some(ArchiveKey::Data { name: n, sha }) if &n == name => Some(sha),
            _ => None,
        })
        .collect();
    match found.len() {
        0 => Ok(None),
        1 => {
            let sha = found.pop().expect("one element");
            Ok(Some((
                layout::wal_data_key(repo.stanza(), db_dir, name, &sha),
                sha,
            )))
        }
        n => Err(Error::new(
            Kind::Conflict,
            format!("{n} different copies of {name} are archived and none is claimed"),
        )
        .hint("run `pgvault verify` and keep the right copy")),
    }
}

/// Decodes into a temporary file beside `dest`, checks the checksum, and
/// only then renames it into place: a corrupt object never reaches `dest`.
fn restore_into(
    reader: Box<dyn std::io::Read + Send>,
    dest: &Path,
    expected: Sha256Sum,
    what: &str,
) -> Result<()> {
    let tmp = tmp_path(dest);
    let result = (|| -> Result<()> {
        let file = File::create(&tmp)
            .map_err(|e| Error::new(Kind::Internal, format!("create {}: {e}", tmp.display())))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let digest = codec::decode(reader, &mut out).map_err(|e| match e {
            codec::CodecError::Io(io) => Error::repository(format!("{what}: {io}")),
            other => Error::repository(format!("{what}: {other}")),
        })?;
        if digest.sha256 != expected {
            return Err(Error::repository(format!(
                "{what}: content checksum {} does not match the archived name's {}",
                digest.sha256, expected
            )));
        }
        out.into_inner().map_err(|e| {
            Error::new(
                Kind::Internal,
                format!("write {}: {}", tmp.display(), e.error()),
            )
        })?;
        fs::rename(&tmp, dest).map_err(|e| {
            Error::new(
                Kind::Internal,
                format!("rename into {}: {e}", dest.display()),
            )
        })
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

fn tmp_path(dest: &Path) -> PathBuf {
    let mut name = dest
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "wal".into());
    name.push(".pgvault-tmp");
    dest.with_file_name(name)
}
