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
use crate::pg::walscan::{RestorePoint, ScanOptions, WalScanner, WalSummary};
use crate::pg::{Lsn, TimelineId, WalFileKind, WalFileName};
use crate::repo::archive::{Archive, Fork, Histories, Listing, SummaryRead};
use crate::repo::{DbInfo, Repository, Sha256Sum};

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

/// Summaries of some archived files; `missing` lists those that have none
/// (archived before pgvault read records, or a push that crashed before
/// writing it): `pgvault backfill` writes them. `damaged` names summaries
/// that are there but unreadable (object and cause): their files count as
/// missing, and `verify` reports them.
#[derive(Debug, Default, Clone)]
pub struct Summaries {
    pub by_name: BTreeMap<WalFileName, WalSummary>,
    pub missing: Vec<WalFileName>,
    pub damaged: Vec<(WalFileName, String)>,
}

/// Reads the summaries of `names` (files `listing` holds): from the catalog
/// where it has them, otherwise from the archive (then cached).
pub async fn load(
    archive: &Archive,
    catalog: Option<&Catalog>,
    listing: &Listing,
    names: &[WalFileName],
) -> Result<Summaries> {
    let stanza = archive.repo().stanza().to_string();
    let wanted: Vec<(String, String)> = names
        .iter()
        .filter_map(|n| Some((n.as_str().to_string(), listing.answer(n)?.to_hex())))
        .collect();
    let s2 = stanza.clone();
    let cached: HashMap<(String, String), WalSummary> =
        Catalog::read_best_effort(catalog, move |c| c.summaries(&s2, &wanted)).await;
    let mut out = Summaries::default();
    let mut fetch = Vec::new();
    for name in names {
        if name.kind() != WalFileKind::Segment && name.kind() != WalFileKind::Partial {
            continue;
        }
        let Some(sha) = listing.answer(name) else {
            continue;
        };
        if let Some(s) = cached.get(&(name.as_str().to_string(), sha.to_hex())) {
            out.by_name.insert(name.clone(), s.clone());
        } else if listing.is_summarized(name) {
            fetch.push((name.clone(), sha));
        } else {
            out.missing.push(name.clone());
        }
    }
    let fetched: Vec<(WalFileName, Sha256Sum, SummaryRead)> = stream::iter(fetch)
        .map(|(name, sha)| async move {
            let read = archive.read_summary(&name, &sha).await?;
            Ok::<_, Error>((name, sha, read))
        })
        .buffer_unordered(READ_PARALLEL)
        .try_collect()
        .await?;
    let mut new_rows = Vec::new();
    for (name, sha, read) in fetched {
        match read {
            SummaryRead::Found(s) => {
                new_rows.push((name.clone(), sha, (*s).clone()));
                out.by_name.insert(name, *s);
            }
            SummaryRead::Missing => out.missing.push(name),
            SummaryRead::Damaged(why) => {
                log::warn!("{why}; ignored");
                out.missing.push(name.clone());
                out.damaged.push((name, why));
            }
        }
    }
    out.missing.sort();
    out.damaged.sort();
    if let Some(cat) = catalog {
        cat.record_summaries_best_effort(&stanza, new_rows).await;
    }
    Ok(out)
}

/// What the records on one replay path say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathFacts {
    /// The newest record with a timestamp recovery can stop at (a commit,
    /// an abort or a restore point): Unix µs and LSN.
    pub last_time: Option<(i64, Lsn)>,
    /// The newest commit or abort (Unix µs): how old it is, is the data a
    /// loss now would cost at most.
    pub last_xact: Option<i64>,
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
            f.last_xact = f.last_xact.max(Some(x.time_us));
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

/// Per timeline that an archived history leaves (see [`Fork`]): the full
/// segments holding its WAL past that point and archived after that
/// history file was — written after the fork was made known: an old
/// primary going on after a failover (a split brain), or the original of a
/// PITR clone archiving into the same stanza. Segments archived before the
/// history file are its own past (what a point-in-time recovery left
/// behind, or what a failover lost) and are not listed.
pub async fn superseded_wal(
    archive: &Archive,
    catalog: Option<&Catalog>,
    listing: &Listing,
    histories: &Histories,
) -> Result<Vec<(Fork, Vec<WalFileName>)>> {
    let seg = archive.db().wal_segment_size;
    let mut out = Vec::new();
    let timelines: std::collections::BTreeSet<TimelineId> =
        listing.archived().map(|(n, _)| n.timeline()).collect();
    for tli in timelines {
        let Some(fork) = histories.fork_of(tli) else {
            continue;
        };
        // Only segments from the one holding the fork on can be past it;
        // only that one needs its records read to tell.
        let from = fork.at.segno(seg);
        let mut candidates: Vec<WalFileName> = listing
            .archived()
            .map(|(n, _)| n.clone())
            .filter(|n| {
                n.timeline() == tli
                    && n.kind() == WalFileKind::Segment
                    && n.segno(seg).is_some_and(|s| s >= from)
            })
            .collect();
        if candidates.is_empty() {
            continue;
        }
        let holding: Vec<WalFileName> = candidates
            .iter()
            .filter(|n| n.segno(seg) == Some(from))
            .cloned()
            .collect();
        let sums = load(archive, catalog, listing, &holding).await?;
        // Newest first: a timeline's segments are archived in order, so
        // those archived after the history file are the newest ones, and
        // the first archived before it ends the search (after a PITR, the
        // abandoned future of the old timeline can be long).
        candidates.sort_by_key(|n| std::cmp::Reverse(n.segno(seg)));
        let mut files = Vec::new();
        for name in candidates {
            if !fork.passed_by(&name, sums.by_name.get(&name), seg) {
                continue;
            }
            let claimed_at = archive
                .read_claim(&name)
                .await?
                .and_then(|c| chrono::DateTime::parse_from_rfc3339(&c.archived_at).ok());
            match (fork.archived_at, claimed_at) {
                (Some(history), Some(segment)) if segment < history => break,
                _ => files.push(name),
            }
        }
        files.reverse();
        if !files.is_empty() {
            out.push((fork, files));
        }
    }
    Ok(out)
}

/// "a, b, c" (at most 5, then "… (N in all)").
pub fn names_list(files: &[WalFileName]) -> String {
    let mut s: Vec<&str> = files.iter().take(5).map(WalFileName::as_str).collect();
    if files.len() > 5 {
        s.push("…");
    }
    let mut out = s.join(", ");
    if files.len() > 5 {
        out += &format!(" ({} in all)", files.len());
    }
    out
}

/// A target recovery stops at on meeting one record (`recoveryStopsAfter`
/// and `recoveryStopsBefore`, xlogrecovery.c).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordTarget {
    /// A restore point's name: recovery stops after the first restore
    /// point of that name it replays (names can repeat).
    Name(String),
    /// A transaction: recovery stops after (or, exclusive, before) the
    /// commit or abort record whose xid is this one — the top-level xid,
    /// or the prepared transaction's for COMMIT/ABORT PREPARED.
    Xid(u32),
}

impl std::fmt::Display for RecordTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordTarget::Name(n) => write!(f, "restore point {n:?}"),
            RecordTarget::Xid(x) => write!(f, "the commit or abort of transaction {x}"),
        }
    }
}

/// Where recovery along a replay path meets a [`RecordTarget`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// At the record starting at this LSN: the first on the path from
    /// where replay begins.
    At(Lsn),
    /// No such record on the path, and every file on it says so.
    Absent,
    /// A file on the way, before any such record, has no summary that
    /// tells (none, or one written before pgvault kept xids).
    Unknown,
}

/// The records of some archived files that stop recovery at one target.
#[derive(Debug, Default)]
pub struct StopRecords {
    /// By file: the records' LSNs, in WAL order; `None` when its summary
    /// does not tell.
    by_file: HashMap<WalFileName, Option<Vec<Lsn>>>,
}

impl StopRecords {
    /// Looks for `target` in the summaries of `files` (each file read once,
    /// however many replay paths share it).
    pub fn find<'a>(
        target: &RecordTarget,
        files: impl IntoIterator<Item = &'a WalFileName>,
        sums: &Summaries,
    ) -> StopRecords {
        let mut by_file = HashMap::new();
        for name in files {
            if by_file.contains_key(name) {
                continue;
            }
            let found = sums.by_name.get(name).and_then(|s| match target {
                RecordTarget::Name(n) => Some(
                    s.restore_points
                        .iter()
                        .filter(|rp| &rp.name == n)
                        .map(|rp| rp.lsn)
                        .collect(),
                ),
                RecordTarget::Xid(x) => Some(
                    s.xact_ends
                        .as_ref()?
                        .iter()?
                        .filter(|e| e.xid == *x)
                        .map(|e| e.lsn)
                        .collect(),
                ),
            });
            by_file.insert(name.clone(), found);
        }
        StopRecords { by_file }
    }

    /// Where recovery replaying `path` from `from` (the backup's start)
    /// stops.
    pub fn first_on(&self, path: &[WalFileName], from: Lsn) -> Stop {
        for name in path {
            match self.by_file.get(name) {
                Some(Some(lsns)) => {
                    if let Some(l) = lsns.iter().find(|l| **l >= from) {
                        return Stop::At(*l);
                    }
                }
                _ => return Stop::Unknown,
            }
        }
        Stop::Absent
    }

    /// Files on `path` whose summary does not tell.
    pub fn unknown_on(&self, path: &[WalFileName]) -> usize {
        path.iter()
            .filter(|n| !matches!(self.by_file.get(*n), Some(Some(_))))
            .count()
    }
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
        let archive = repo.archive(db);
        let listing = archive.list().await?;
        let mut todo = Vec::new();
        for (name, sha) in listing.archived() {
            let Some(opts) = scan_options(db, name) else {
                continue;
            };
            if listing.is_summarized(name) {
                report.had_summary += 1;
            } else {
                todo.push((name.clone(), sha, opts));
            }
        }
        let archive = &archive;
        let done: Vec<(WalFileName, Sha256Sum, WalSummary)> = stream::iter(todo)
            .map(|(name, sha, opts)| async move {
                let summary = summarize_object(archive, &name, &sha, opts).await?;
                archive.store_summary(&name, &sha, &summary).await?;
                Ok::<_, Error>((name, sha, summary))
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

/// Reads one archived content and walks its records, checking its checksum.
pub async fn summarize_object(
    archive: &Archive,
    name: &WalFileName,
    sha: &Sha256Sum,
    opts: ScanOptions,
) -> Result<WalSummary> {
    let scanner = archive
        .read_content(name, sha, WalScanner::new(opts))
        .await?;
    Ok(scanner.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::walscan::{XactEnd, XactEnds};

    fn name(n: &str) -> WalFileName {
        WalFileName::parse(n).unwrap()
    }

    fn rp(name: &str, lsn: u64) -> RestorePoint {
        RestorePoint {
            name: name.into(),
            lsn: Lsn(lsn),
            time_us: 0,
            end: Lsn(lsn + 0x68),
        }
    }

    fn ends(list: &[(u32, u64)]) -> Option<XactEnds> {
        let mut x = XactEnds::new();
        for (xid, lsn) in list {
            x.push(XactEnd {
                xid: *xid,
                lsn: Lsn(*lsn),
                commit: true,
            });
        }
        Some(x)
    }

    /// Four 16 MiB segments: 1 and 2 summarized, 3 with a format-1 summary
    /// (no xact ends), 4 with none.
    fn archive() -> (Vec<WalFileName>, Summaries) {
        let path: Vec<WalFileName> = (1..=4)
            .map(|i| name(&format!("00000001000000000000000{i}")))
            .collect();
        let mut sums = Summaries::default();
        sums.by_name.insert(
            path[0].clone(),
            WalSummary {
                restore_points: vec![rp("daily", 0x1000100), rp("x", 0x1000200)],
                xact_ends: ends(&[(740, 0x1000080), (741, 0x1000300)]),
                ..WalSummary::default()
            },
        );
        sums.by_name.insert(
            path[1].clone(),
            WalSummary {
                restore_points: vec![rp("daily", 0x2000100)],
                xact_ends: ends(&[(743, 0x2000080), (742, 0x2000400)]),
                ..WalSummary::default()
            },
        );
        sums.by_name.insert(
            path[2].clone(),
            WalSummary {
                restore_points: vec![rp("late", 0x3000100)],
                xact_ends: None,
                ..WalSummary::default()
            },
        );
        sums.missing.push(path[3].clone());
        (path, sums)
    }

    #[test]
    fn recovery_stops_at_the_first_matching_record_from_the_backup_on() {
        let (path, sums) = archive();
        let name = |n: &str| RecordTarget::Name(n.into());
        let daily = StopRecords::find(&name("daily"), &path, &sums);
        // A name repeats: the first one replayed.
        assert_eq!(
            daily.first_on(&path, Lsn(0x1000000)),
            Stop::At(Lsn(0x1000100))
        );
        assert_eq!(
            daily.first_on(&path, Lsn(0x1000180)),
            Stop::At(Lsn(0x2000100))
        );
        assert_eq!(
            daily.first_on(&path[1..], Lsn(0x2000000)),
            Stop::At(Lsn(0x2000100))
        );
        // Past the last one: file 3 has a summary, file 4 none.
        assert_eq!(daily.first_on(&path[..3], Lsn(0x2000200)), Stop::Absent);
        assert_eq!(daily.first_on(&path, Lsn(0x2000200)), Stop::Unknown);
        assert_eq!(daily.unknown_on(&path), 1);
        // A format-1 summary tells restore points, not xids.
        let late = StopRecords::find(&name("late"), &path, &sums);
        assert_eq!(
            late.first_on(&path, Lsn(0x1000000)),
            Stop::At(Lsn(0x3000100))
        );

        let xid = |x| StopRecords::find(&RecordTarget::Xid(x), &path, &sums);
        assert_eq!(
            xid(742).first_on(&path, Lsn(0x1000000)),
            Stop::At(Lsn(0x2000400))
        );
        assert_eq!(
            xid(740).first_on(&path, Lsn(0x1000000)),
            Stop::At(Lsn(0x1000080))
        );
        // Ended before the backup started: not replayed.
        assert_eq!(xid(740).first_on(&path[..2], Lsn(0x1000100)), Stop::Absent);
        // Not in files 1-2; file 3 cannot tell.
        assert_eq!(xid(999).first_on(&path[..2], Lsn(0x1000000)), Stop::Absent);
        assert_eq!(xid(999).first_on(&path, Lsn(0x1000000)), Stop::Unknown);
        assert_eq!(xid(999).unknown_on(&path), 2);
    }
}
