//! What the archived WAL's records say, and so which moments are
//! recoverable.
//!
//! `archive-push` walks every segment's records as it compresses it
//! (`pg::walscan`) and stores what it learnt beside the data object, as
//! `<wal>-<sha256>.summary` (named by the content it describes, so it can
//! never describe other bytes). `backfill` writes the summaries of segments
//! archived without one. Commands that need them read them from the
//! repository, through the catalog as a cache.
//!
//! Recovery replays one file per segment: from the backup's first segment
//! on, the file PostgreSQL would pick (`TimelineHistory::
//! timelines_for_segment`), until the first segment the archive does not
//! have. The commit times, restore points and damaged records on that
//! path are what `info` shows and what `restore` checks a target against.

use std::collections::{BTreeMap, HashMap};

use futures::stream::{self, StreamExt, TryStreamExt};

use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::pg::history::TimelineHistory;
use crate::pg::walscan::{RestorePoint, ScanOptions, WalSummary};
use crate::pg::{Lsn, SegmentNo, WalFileKind, WalFileName};
use crate::repo::layout::{self, ArchiveKey};
use crate::repo::{DbInfo, ObjectMeta, PutMode, Repository, Sha256Sum};

/// Summaries read from the store at once.
const READ_PARALLEL: usize = 16;

/// How to scan `name`, a file of cluster `db`; `None` for files without WAL
/// records (history files, backup labels).
pub fn scan_options(db: &DbInfo, name: &WalFileName) -> Option<ScanOptions> {
    let partial = match name.kind() {
        WalFileKind::Segment => false,
        WalFileKind::Partial => true,
        WalFileKind::History | WalFileKind::BackupLabel => return None,
    };
    Some(ScanOptions {
        major: db.pg_version,
        seg_size: db.wal_segment_size,
        segment_start: name.start_lsn(db.wal_segment_size)?,
        partial,
    })
}

/// Logs what a scan found wrong with a file being archived: it is archived
/// all the same (refusing would fill `pg_wal` and stop the primary).
pub fn warn_about(name: &WalFileName, summary: &WalSummary) {
    for lsn in &summary.crc_failures {
        log::warn!(
            "{name}: the WAL record at {lsn} fails its CRC-32C check; archived as it is, flagged for info and verify"
        );
    }
    for p in &summary.problems {
        log::warn!("{name}: {p}");
    }
}

/// Stores the summary of content `sha` of `name` (idempotent).
pub async fn store_summary(
    repo: &Repository,
    db_dir: &str,
    name: &WalFileName,
    sha: &Sha256Sum,
    summary: &WalSummary,
) -> Result<()> {
    let key = layout::wal_summary_key(repo.stanza(), db_dir, name, sha);
    let json = serde_json::to_vec(summary)
        .map_err(|e| Error::internal(format!("encode the summary of {name}: {e}")))?;
    repo.put_encoded(&key, &json, PutMode::CreateNew).await?;
    Ok(())
}

/// The archived WAL of one cluster, from one listing: each name's content
/// (names with more than one are conflicts, left out) and which contents
/// have a summary.
#[derive(Debug, Default, Clone)]
pub struct Archived {
    pub files: BTreeMap<WalFileName, Sha256Sum>,
    pub summarized: std::collections::HashSet<(WalFileName, Sha256Sum)>,
}

impl Archived {
    pub async fn list(repo: &Repository, db: &DbInfo) -> Result<Archived> {
        let listing = repo
            .backend()
            .list(&layout::archive_root(repo.stanza(), &db.dir()))
            .await?;
        Ok(Archived::from_listing(&listing))
    }

    /// From a listing of one cluster's archive directory.
    pub fn from_listing(listing: &[ObjectMeta]) -> Archived {
        let mut shas: BTreeMap<WalFileName, Vec<Sha256Sum>> = BTreeMap::new();
        let mut out = Archived::default();
        for m in listing {
            match layout::parse_archive_key(&m.key) {
                Some(ArchiveKey::Data { name, sha }) => shas.entry(name).or_default().push(sha),
                Some(ArchiveKey::Summary { name, sha }) => {
                    out.summarized.insert((name, sha));
                }
                _ => {}
            }
        }
        out.files = shas
            .into_iter()
            .filter(|(_, v)| v.len() == 1)
            .map(|(n, v)| (n, v[0]))
            .collect();
        out
    }

    /// The files recovery along `history` replays from segment `start` on,
    /// in order, up to the first segment the archive does not have.
    pub fn replay_path(
        &self,
        history: &TimelineHistory,
        start: SegmentNo,
        seg_size: u32,
    ) -> Vec<WalFileName> {
        let mut out = Vec::new();
        let mut floor = None;
        let mut segno = start;
        'segments: loop {
            for tli in history.timelines_for_segment(segno, seg_size) {
                if floor.is_some_and(|f| tli < f) {
                    break;
                }
                let name = WalFileName::for_segment(tli, segno, seg_size);
                if self.files.contains_key(&name) {
                    out.push(name);
                    floor = Some(tli);
                    segno = segno.next();
                    continue 'segments;
                }
            }
            return out;
        }
    }
}

/// Summaries of some archived files; `missing` lists those that have none
/// (archived before pgvault read records, or a push that crashed before
/// writing it): `pgvault backfill` writes them.
#[derive(Debug, Default, Clone)]
pub struct Summaries {
    pub by_name: BTreeMap<WalFileName, WalSummary>,
    pub missing: Vec<WalFileName>,
}

/// Reads the summaries of `names` (files of `archived`): from the catalog
/// where it has them, otherwise from the store (then cached).
pub async fn load(
    repo: &Repository,
    catalog: Option<&Catalog>,
    db: &DbInfo,
    archived: &Archived,
    names: &[WalFileName],
) -> Result<Summaries> {
    let cached: HashMap<(String, String), WalSummary> = match catalog {
        Some(cat) => {
            let (cat, stanza) = (cat.clone(), repo.stanza().to_string());
            tokio::task::spawn_blocking(move || cat.summaries(&stanza))
                .await?
                .unwrap_or_else(|e| {
                    log::debug!("catalog: {e} (reading summaries from the repository)");
                    HashMap::new()
                })
        }
        None => HashMap::new(),
    };
    let mut out = Summaries::default();
    let mut fetch = Vec::new();
    for name in names {
        if name.kind() != WalFileKind::Segment && name.kind() != WalFileKind::Partial {
            continue;
        }
        let Some(sha) = archived.files.get(name) else {
            continue;
        };
        if let Some(s) = cached.get(&(name.as_str().to_string(), sha.to_hex())) {
            out.by_name.insert(name.clone(), s.clone());
        } else if archived.summarized.contains(&(name.clone(), *sha)) {
            fetch.push((name.clone(), *sha));
        } else {
            out.missing.push(name.clone());
        }
    }
    let dir = db.dir();
    let fetched: Vec<(WalFileName, Sha256Sum, Option<WalSummary>)> = stream::iter(fetch)
        .map(|(name, sha)| {
            let key = layout::wal_summary_key(repo.stanza(), &dir, &name, &sha);
            async move {
                let bytes = repo.get_decoded(&key).await?;
                let summary = bytes.and_then(|b| match serde_json::from_slice(&b) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        log::warn!(
                            "{}/{key}: unreadable summary ({e}); ignored",
                            repo.describe()
                        );
                        None
                    }
                });
                Ok::<_, Error>((name, sha, summary))
            }
        })
        .buffer_unordered(READ_PARALLEL)
        .try_collect()
        .await?;
    let mut new_rows = Vec::new();
    for (name, sha, summary) in fetched {
        match summary {
            Some(s) => {
                new_rows.push((name.clone(), sha, s.clone()));
                out.by_name.insert(name, s);
            }
            None => out.missing.push(name),
        }
    }
    out.missing.sort();
    if let Some(cat) = catalog {
        cat.record_summaries_best_effort(repo.stanza(), new_rows)
            .await;
    }
    Ok(out)
}

/// What the records on one replay path say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathFacts {
    /// The newest record with a timestamp recovery can stop at (a commit,
    /// an abort or a restore point): Unix µs and LSN.
    pub last_time: Option<(i64, Lsn)>,
    pub restore_points: Vec<RestorePoint>,
    /// End of the last record of the path's last file, when known; else
    /// the end of that file.
    pub end_lsn: Option<Lsn>,
    /// Files on the path without a summary.
    pub unsummarized: Vec<WalFileName>,
    /// (file, LSN) of records that failed their CRC check.
    pub damaged: Vec<(WalFileName, Lsn)>,
}

pub fn path_facts(path: &[WalFileName], sums: &Summaries, seg_size: u32) -> PathFacts {
    let mut f = PathFacts::default();
    for name in path {
        let Some(s) = sums.by_name.get(name) else {
            f.unsummarized.push(name.clone());
            continue;
        };
        if let Some(x) = &s.last_xact {
            if f.last_time.is_none_or(|(t, _)| x.time_us >= t) {
                f.last_time = Some((x.time_us, x.lsn));
            }
        }
        for rp in &s.restore_points {
            if f.last_time.is_none_or(|(t, _)| rp.time_us >= t) {
                f.last_time = Some((rp.time_us, rp.lsn));
            }
            f.restore_points.push(rp.clone());
        }
        f.damaged
            .extend(s.crc_failures.iter().map(|l| (name.clone(), *l)));
    }
    if let Some(last) = path.last() {
        f.end_lsn = sums
            .by_name
            .get(last)
            .and_then(|s| s.end_of_wal)
            .or_else(|| last.segno(seg_size).map(|s| s.next().start_lsn(seg_size)));
    }
    f
}

/// Unix µs as an RFC 3339 UTC time with microseconds.
pub fn format_us(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true))
        .unwrap_or_else(|| format!("{us} µs"))
}

/// What `backfill` did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct BackfillReport {
    /// Files that had a summary already.
    pub had_summary: u64,
    /// Files read and summarized now.
    pub summarized: u64,
    /// Records that failed their CRC check in the files read now.
    pub damaged: Vec<String>,
}

/// Writes the summary of every archived segment (and `.partial`) that has
/// none: reads the object, checks it against its checksum while walking its
/// records, stores the summary. `process_max` objects at a time.
pub async fn backfill(
    repo: &Repository,
    catalog: Option<&Catalog>,
    process_max: usize,
) -> Result<BackfillReport> {
    let stanza = repo.require_stanza().await?;
    let mut report = BackfillReport::default();
    for db in &stanza.dbs {
        let archived = Archived::list(repo, db).await?;
        let mut todo = Vec::new();
        for (name, sha) in &archived.files {
            let Some(opts) = scan_options(db, name) else {
                continue;
            };
            if archived.summarized.contains(&(name.clone(), *sha)) {
                report.had_summary += 1;
            } else {
                todo.push((name.clone(), *sha, opts));
            }
        }
        let dir = db.dir();
        let done: Vec<(WalFileName, Sha256Sum, WalSummary)> = stream::iter(todo)
            .map(|(name, sha, opts)| {
                let dir = dir.clone();
                async move {
                    let summary = summarize_object(repo, &dir, &name, &sha, opts).await?;
                    store_summary(repo, &dir, &name, &sha, &summary).await?;
                    Ok::<_, Error>((name, sha, summary))
                }
            })
            .buffer_unordered(process_max.max(1))
            .try_collect()
            .await?;
        for (name, _, s) in &done {
            warn_about(name, s);
            report
                .damaged
                .extend(s.crc_failures.iter().map(|l| format!("{name} at {l}")));
        }
        report.summarized += done.len() as u64;
        if let Some(cat) = catalog {
            cat.record_summaries_best_effort(repo.stanza(), done).await;
        }
    }
    report.damaged.sort();
    Ok(report)
}

/// Reads one archived object and walks its records, checking its checksum.
pub async fn summarize_object(
    repo: &Repository,
    db_dir: &str,
    name: &WalFileName,
    sha: &Sha256Sum,
    opts: ScanOptions,
) -> Result<WalSummary> {
    let key = layout::wal_data_key(repo.stanza(), db_dir, name, sha);
    let what = format!("{}/{key}", repo.describe());
    let reader = repo
        .backend()
        .get(&key)
        .await?
        .ok_or_else(|| Error::repository(format!("{what} disappeared while being read")))?;
    let expected = *sha;
    tokio::task::spawn_blocking(move || {
        let mut scanner = crate::pg::walscan::WalScanner::new(opts);
        let digest = crate::repo::codec::decode(reader, &mut scanner)
            .map_err(|e| Error::repository(format!("{what}: {e}")))?;
        if digest.sha256 != expected {
            return Err(Error::repository(format!(
                "{what}: content checksum {} does not match the archived name's {expected}",
                digest.sha256
            )));
        }
        Ok(scanner.finish())
    })
    .await?
}
