//! `info`: what the repository holds for a stanza. Read from the
//! repository itself (the source of truth); the catalog is refreshed from
//! what was read.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::catalog::{Catalog, Snapshot, TimelineRow, WalRow};
use crate::error::Result;
use crate::ops::gaps::{self, DroppedRun};
use crate::ops::walfacts;
use crate::pg::archiver::{archiver_lag, ArchiverLag};
use crate::pg::conn::{ConnParams, Session};
use crate::pg::history::TimelineHistory;
use crate::pg::{Lsn, SegmentNo, TimelineId, WalFileKind, WalFileName};
use crate::repo::archive::Histories;
use crate::repo::archive::Listing;
use crate::repo::manifest::{BackupHeader, ChangeReport, PageChecksums, UnreadableManifest};
use crate::repo::results::{DrillRecord, ResultKind, VerifyRecord};
use crate::repo::{DbInfo, Repository};
use crate::spool::{QueueState, SpoolDir};

/// Bumped when a field changes meaning or disappears (adding fields does not).
pub const INFO_SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize)]
pub struct InfoReport {
    pub schema_version: u32,
    /// With encryption configured: how much of the stanza is still
    /// plaintext (`repo::sealing`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encryption: Option<crate::repo::sealing::SealingReport>,
    pub repository: String,
    pub stanza: StanzaReport,
    /// Complete backups, oldest first (by the stop LSN the server reported).
    pub backups: Vec<BackupReport>,
    /// The current cluster's timelines (the same as the last of `dbs`).
    pub timelines: Vec<TimelineReport>,
    /// Every cluster the stanza records, oldest first (one more per
    /// `pg_upgrade`); the last is the one archiving now.
    pub dbs: Vec<DbReport>,
    /// The newest commit (or abort) recovery can reach: on the replay path
    /// of a recoverable window of the current cluster (a commit only a
    /// `.partial` file or a file past a gap holds is not recoverable).
    pub newest_commit_time: Option<String>,
    /// How old that commit is now, in seconds: the data a disaster right
    /// now would lose at most, as far as the archive knows (the recovery
    /// point objective actually met).
    pub rpo_seconds: Option<f64>,
    /// Backups whose manifest cannot be read: left out of everything above
    /// (`pgvault verify` checks the rest of the repository).
    pub unreadable_backups: Vec<UnreadableManifest>,
    /// Its number among the repositories configured (`repo2-…`): 1 with
    /// one repository.
    pub repository_number: u8,
    /// With several repositories: this host's archive-push queue for this
    /// repository (files PostgreSQL was told are archived that it does not
    /// hold yet, and what was dropped from it), when this host has one.
    pub archive_push_queue: Option<QueueState>,
    /// The newest WAL segment archived for the current cluster, and when.
    pub newest_archived_wal: Option<NewestWal>,
    /// The newest `verify` and `drill` results kept in the repository.
    pub last_verify: Option<VerifyRecord>,
    pub last_drill: Option<DrillRecord>,
    /// The server's archiver, when `info` was given a connection to it.
    pub archiver: Option<ArchiverReport>,
    /// This host's spool for the repository and stanza, when it has one.
    pub spool: Option<SpoolReport>,
    /// When this report was made (UTC, RFC 3339): ages above are as of then.
    pub generated_at: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct NewestWal {
    pub name: String,
    pub timeline: u32,
    /// When its claim was written (UTC, RFC 3339).
    pub archived_at: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ArchiverReport {
    /// Whether the server answered; `error` says why not.
    pub reachable: bool,
    pub error: Option<String>,
    #[serde(flatten)]
    pub status: Option<ArchiverLag>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SpoolReport {
    pub path: String,
    /// Files the look-ahead pusher stored ahead of PostgreSQL's calls for
    /// them: the spool's queue.
    pub pushed_ahead: u64,
}

/// What `info` reads besides the repository.
#[derive(Debug, Clone, Default)]
pub struct InfoOptions {
    pub catalog: Option<Catalog>,
    /// The server, for its archiver's state (`None`: not asked).
    pub conn: Option<ConnParams>,
    pub spool: Option<SpoolDir>,
    /// With encryption configured: read each object's header to say how
    /// much is still plaintext (`info`; not the exporter, every refresh).
    pub sealing: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct DbReport {
    pub db_id: u32,
    pub pg_version: u32,
    pub system_identifier: String,
    pub wal_segment_size: u32,
    /// Its archive directory, `<major>-<id>`.
    pub archive: String,
    pub current: bool,
    /// Labels of its complete backups, oldest first.
    pub backups: Vec<String>,
    pub timelines: Vec<TimelineReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BackupReport {
    pub label: String,
    #[serde(rename = "type")]
    pub backup_type: String,
    pub timeline: u32,
    pub start_lsn: Lsn,
    pub stop_lsn: Lsn,
    pub start_time: String,
    pub stop_time: String,
    /// Bytes of the files backed up.
    pub original_size: u64,
    /// Bytes stored in the repository (compressed).
    pub stored_size: u64,
    pub files: u64,
    /// WAL needed to make this backup consistent.
    pub wal_start: String,
    pub wal_stop: String,
    /// The cluster (`dbs[].db_id`) it is a backup of.
    pub db_id: u32,
    pub pg_version: u32,
    /// Data page checksums checked while the backup read the files (null
    /// when the cluster has no data checksums), and the pages that failed,
    /// by relation file, fork and block.
    pub page_checksums: Option<PageChecksums>,
    /// A diff's or incr's reference backup, and every backup it depends
    /// on, newest first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// How it found what changed: method, counts, fallbacks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub changes: Option<ChangeReport>,
    /// Resumed after an interruption: what it reused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resumed: Option<crate::repo::manifest::ResumeReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StanzaReport {
    pub name: String,
    pub system_identifier: String,
    pub pg_version: u32,
    pub wal_segment_size: u32,
    pub db_id: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct TimelineReport {
    pub timeline: u32,
    pub first_segment: Option<String>,
    pub last_segment: Option<String>,
    pub segments: u64,
    /// Runs of missing segments between the first and the last.
    pub gaps: Vec<Gap>,
    pub partial: Vec<String>,
    pub history_file: bool,
    /// The timeline this one branched from, and where (from its history file).
    pub parent: Option<u32>,
    pub switch_lsn: Option<Lsn>,
    /// From the oldest backup on this timeline (its consistency point) to the
    /// end of the archived WAL after it with no gap; null if no backup can
    /// recover onto this timeline.
    pub recoverable: Option<Recoverable>,
    /// Names under which more than one content is stored (a conflict).
    pub conflicts: Vec<String>,
    /// Records that failed their CRC-32C check when archived: "<file> at <LSN>".
    pub damaged_records: Vec<String>,
    /// WAL of this timeline archived past the point where a later
    /// timeline's history file left it, after that file was archived: a
    /// split brain, or the original of a PITR clone archiving into this
    /// stanza (see docs/disaster-recovery.md). Null when there is none.
    pub superseded: Option<SupersededReport>,
    /// WAL of this timeline this repository missed: with several
    /// repositories, dropped from its archive-push queue
    /// (`archive-push-queue-max`), as its gap markers record.
    pub dropped: Vec<DroppedRun>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SupersededReport {
    /// The timeline that branched off.
    pub by_timeline: u32,
    /// Where (the switch point of this timeline in that history).
    pub at_lsn: Lsn,
    /// The history file that says so.
    pub history_file: String,
    /// The segments holding this timeline's WAL past that point.
    pub files: Vec<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Recoverable {
    pub from_lsn: Lsn,
    pub from_time: String,
    pub from_backup: String,
    /// End of the WAL recovery can replay without a gap: the end of the
    /// last record of the last file, or of the file when it has no summary.
    pub to_lsn: Lsn,
    /// The last archived commit (or abort, or restore point: the records a
    /// time target can stop at) on the way; a `--target-time` after it is
    /// refused. Null when no such record is archived after the backup.
    pub to_time: Option<String>,
    /// Restore points on the way, oldest first.
    pub restore_points: Vec<RestorePointReport>,
    /// Files on the way whose records were never summarized (archived by
    /// an older pgvault: `pgvault backfill`); while there are any,
    /// `to_time` and `restore_points` may be incomplete.
    pub unsummarized_segments: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RestorePointReport {
    pub name: String,
    /// The LSN `pg_create_restore_point` returned (the end of its record).
    pub lsn: Lsn,
    pub time: String,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Gap {
    pub from: String,
    pub to: String,
}

pub async fn info(repo: &Repository, opts: &InfoOptions) -> Result<InfoReport> {
    let catalog = opts.catalog.as_ref();
    let generated_at = chrono::Utc::now();
    let stanza = repo.require_stanza().await?;
    let backups = crate::ops::backups::index(repo, catalog).await?;
    for u in &backups.unreadable {
        log::warn!("backup {} left out: {}", u.label, u.error);
    }
    let manifests = backups.headers;
    let mut dbs = Vec::new();
    let mut current_listing = Listing::default();
    let mut newest_commit = None;
    for db in &stanza.dbs {
        let own: Vec<BackupHeader> = manifests
            .iter()
            .filter(|m| m.db_id == db.id)
            .cloned()
            .collect();
        let (listing, timelines, newest) = db_archive(repo, catalog, db, &own).await?;
        let current = db.id == stanza.current().id;
        if current {
            current_listing = listing;
            newest_commit = newest;
        }
        dbs.push(DbReport {
            db_id: db.id,
            pg_version: db.pg_version,
            system_identifier: db.system_identifier.clone(),
            wal_segment_size: db.wal_segment_size,
            archive: db.dir(),
            current,
            backups: own.iter().map(|m| m.label.clone()).collect(),
            timelines,
        });
    }
    let db = stanza.current().clone();
    let newest_archived_wal = newest_wal(repo, &db, &dbs).await;
    let last_verify = repo.latest_result(ResultKind::Verify).await?;
    let last_drill = repo.latest_result(ResultKind::Drill).await?;
    let archiver = match &opts.conn {
        Some(c) => Some(archiver(c, &db).await),
        None => None,
    };
    let spool = opts
        .spool
        .as_ref()
        .filter(|s| s.path().is_dir())
        .map(|s| SpoolReport {
            path: s.path().display().to_string(),
            pushed_ahead: s.pushed_names().len() as u64,
        });
    let encryption = match opts.sealing && repo.encryption_configured() {
        true => Some(repo.sealing().await?),
        false => None,
    };
    let report = InfoReport {
        encryption,
        schema_version: INFO_SCHEMA_VERSION,
        repository: repo.describe(),
        stanza: StanzaReport {
            name: repo.stanza().to_string(),
            system_identifier: db.system_identifier.clone(),
            pg_version: db.pg_version,
            wal_segment_size: db.wal_segment_size,
            db_id: db.id,
        },
        backups: manifests
            .iter()
            .map(|m| BackupReport {
                label: m.label.clone(),
                backup_type: m.backup_type.clone(),
                timeline: m.timeline.0,
                start_lsn: m.start_lsn,
                stop_lsn: m.stop_lsn,
                start_time: m.start_time.clone(),
                stop_time: m.stop_time.clone(),
                original_size: m.original_size,
                stored_size: m.stored_size,
                files: m.file_count,
                wal_start: m.wal_start.clone(),
                wal_stop: m.wal_stop.clone(),
                db_id: m.db_id,
                pg_version: m.pg_version,
                page_checksums: m.page_checksums.clone(),
                reference: m.reference.clone(),
                depends_on: m.depends_on.clone(),
                changes: m.changes.clone(),
                resumed: m.resumed.clone(),
            })
            .collect(),
        timelines: dbs.last().map(|d| d.timelines.clone()).unwrap_or_default(),
        dbs,
        newest_commit_time: newest_commit.map(walfacts::format_us),
        rpo_seconds: newest_commit.map(|us| (generated_at.timestamp_micros() - us) as f64 / 1e6),
        unreadable_backups: backups.unreadable,
        repository_number: 1,
        archive_push_queue: None,
        newest_archived_wal,
        last_verify,
        last_drill,
        archiver,
        spool,
        generated_at: generated_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    };
    if let Some(cat) = catalog {
        // The catalog caches the current cluster's archive.
        cat.replace_best_effort(repo.stanza(), snapshot(&current_listing, &report))
            .await;
        let runs: Vec<DroppedRun> = report
            .timelines
            .iter()
            .flat_map(|t| t.dropped.iter().cloned())
            .collect();
        cat.replace_gaps_best_effort(repo.stanza(), gaps::rows(&runs, &current_listing))
            .await;
    }
    Ok(report)
}

/// The newest segment of the current cluster's newest timeline, with the
/// time its claim records (one read).
async fn newest_wal(repo: &Repository, db: &DbInfo, dbs: &[DbReport]) -> Option<NewestWal> {
    let t = dbs
        .iter()
        .find(|d| d.db_id == db.id)?
        .timelines
        .iter()
        .rev()
        .find(|t| t.last_segment.is_some())?;
    let name = t.last_segment.clone()?;
    let archived_at = match WalFileName::parse(&name) {
        Ok(n) => match repo.archive(db).read_claim(&n).await {
            Ok(c) => c.map(|c| c.archived_at),
            Err(e) => {
                log::warn!("read the claim of {name}: {e}");
                None
            }
        },
        Err(_) => None,
    };
    Some(NewestWal {
        name,
        timeline: t.timeline,
        archived_at,
    })
}

/// The server's archiver; a server that cannot be reached is reported in
/// the report, not an error nor a warning: `info` describes the repository
/// first, and a configuration file shared with `backup` names a server
/// that a host reading the repository may not reach.
async fn archiver(conn: &ConnParams, db: &DbInfo) -> ArchiverReport {
    const BOUND: std::time::Duration = std::time::Duration::from_secs(5);
    let read = async {
        let session = Session::connect(conn).await?;
        archiver_lag(&session, db.wal_segment_size).await
    };
    let failed = |error: String| {
        log::info!("archiver: {error}");
        ArchiverReport {
            reachable: false,
            error: Some(error),
            status: None,
        }
    };
    match tokio::time::timeout(BOUND, read).await {
        Ok(Ok(status)) => ArchiverReport {
            reachable: true,
            error: None,
            status: Some(status),
        },
        Ok(Err(e)) => failed(e.to_string()),
        Err(_) => failed(format!(
            "no answer from PostgreSQL at {} within {}s",
            conn.describe(),
            BOUND.as_secs()
        )),
    }
}

/// One cluster's archived WAL (`archive/<major>-<id>/`) and its timelines,
/// recoverable from its own backups; and the newest archived commit (Unix
/// µs).
async fn db_archive(
    repo: &Repository,
    catalog: Option<&Catalog>,
    db: &DbInfo,
    manifests: &[BackupHeader],
) -> Result<(Listing, Vec<TimelineReport>, Option<i64>)> {
    let archive = repo.archive(db);
    let listing = archive.list().await?;
    let mut timelines = timelines(db, &listing);
    let archived_histories = archive.histories_listed(&listing).await?;
    let mut histories = BTreeMap::new();
    for t in timelines.iter_mut() {
        let tli = TimelineId(t.timeline);
        let h = match archived_histories.get(tli) {
            Some(a) => a.history.clone(),
            None => TimelineHistory::root(tli),
        };
        if let Some(last) = h.entries.last() {
            t.parent = Some(last.parent.0);
            t.switch_lsn = Some(last.switch_point);
        }
        histories.insert(tli, h);
    }
    let all: Vec<WalFileName> = listing.archived().map(|(n, _)| n.clone()).collect();
    let sums = walfacts::load(&archive, catalog, &listing, &all).await?;
    for t in timelines.iter_mut() {
        t.damaged_records = sums
            .by_name
            .iter()
            .filter(|(n, _)| n.timeline().0 == t.timeline)
            .flat_map(|(n, s)| s.crc_failures.iter().map(move |l| format!("{n} at {l}")))
            .collect();
    }
    flag_superseded(
        &archive,
        catalog,
        &listing,
        &archived_histories,
        &mut timelines,
    )
    .await?;
    for run in gaps::dropped_runs(&archive, &listing).await? {
        if let Some(t) = timelines.iter_mut().find(|t| t.timeline == run.timeline) {
            t.dropped.push(run);
        }
    }
    let newest = recoverable(db, &listing, &sums, &histories, manifests, &mut timelines);
    Ok((listing, timelines, newest))
}

/// Fills `superseded` of the timelines a later history leaves and that
/// went on past that point.
async fn flag_superseded(
    archive: &crate::repo::archive::Archive,
    catalog: Option<&Catalog>,
    listing: &Listing,
    histories: &Histories,
    timelines: &mut [TimelineReport],
) -> Result<()> {
    for (fork, files) in walfacts::superseded_wal(archive, catalog, listing, histories).await? {
        if let Some(t) = timelines.iter_mut().find(|t| t.timeline == fork.timeline.0) {
            t.superseded = Some(SupersededReport {
                by_timeline: fork.to.0,
                at_lsn: fork.at,
                history_file: WalFileName::history(fork.file).as_str().to_string(),
                files: files.iter().map(|f| f.as_str().to_string()).collect(),
            });
        }
    }
    Ok(())
}

/// What the catalog caches of this read of the repository.
fn snapshot(listing: &Listing, report: &InfoReport) -> Snapshot {
    Snapshot {
        wal: listing
            .archived()
            .map(|(n, sha)| WalRow {
                name: n.as_str().to_string(),
                timeline: n.timeline().0,
                sha256: sha.to_hex(),
                stored_size: listing
                    .entry(n)
                    .and_then(|e| e.content(&sha))
                    .map_or(0, |c| c.stored_size),
            })
            .collect(),
        timelines: report
            .timelines
            .iter()
            .map(|t| TimelineRow {
                timeline: t.timeline,
                parent: t.parent,
                switch_lsn: t.switch_lsn.map(|l| l.to_string()),
            })
            .collect(),
    }
}

/// Per timeline: from the oldest backup recovery onto it can start from
/// (one on it, or on an ancestor before the switch) to as far as the
/// archived WAL on its way runs without a gap, with the commit times and
/// restore points on that way. Returns the newest commit (or abort) on
/// any of those ways (Unix µs).
fn recoverable(
    db: &DbInfo,
    listing: &Listing,
    sums: &walfacts::Summaries,
    histories: &BTreeMap<TimelineId, TimelineHistory>,
    manifests: &[BackupHeader],
    timelines: &mut [TimelineReport],
) -> Option<i64> {
    let seg = db.wal_segment_size;
    let mut newest = None;
    for t in timelines.iter_mut() {
        let Some(h) = histories.get(&TimelineId(t.timeline)) else {
            continue;
        };
        // Recovery along `h` replays the backup's WAL as its timeline's
        // (PostgreSQL refuses a backup whose checkpoint is not, and one
        // whose WAL leaves its timeline before its end never gets
        // consistent).
        let on_path = |m: &&BackupHeader| h.holds(m.timeline, m.start_lsn, m.stop_lsn);
        let Some(oldest) = manifests.iter().find(on_path) else {
            continue;
        };
        let path = listing.replay_path(h, oldest.start_lsn.segno(seg), seg);
        let Some(last) = path.last() else {
            continue;
        };
        // Recovery must at least reach the backup's consistency point.
        let file_end = last
            .segno(seg)
            .map(|s| s.next().start_lsn(seg))
            .unwrap_or_default();
        if file_end < oldest.stop_lsn {
            continue;
        }
        let f = walfacts::path_facts(&path, sums, seg);
        newest = newest.max(f.last_xact);
        t.recoverable = Some(Recoverable {
            from_lsn: oldest.stop_lsn,
            from_time: oldest.stop_time.clone(),
            from_backup: oldest.label.clone(),
            to_lsn: f.end_lsn.unwrap_or(file_end),
            to_time: f.last_time.map(|(us, _)| walfacts::format_us(us)),
            restore_points: f
                .restore_points
                .iter()
                .map(|rp| RestorePointReport {
                    name: rp.name.clone(),
                    // What pg_create_restore_point returned: the record's
                    // end (a summary from before `end` was kept has only
                    // its start).
                    lsn: if rp.end > rp.lsn { rp.end } else { rp.lsn },
                    time: walfacts::format_us(rp.time_us),
                })
                .collect(),
            unsummarized_segments: f.unsummarized.len() as u64,
        });
    }
    newest
}

fn timelines(db: &DbInfo, listing: &Listing) -> Vec<TimelineReport> {
    let seg_size = db.wal_segment_size;
    let mut per_tli: BTreeMap<TimelineId, TimelineReport> = BTreeMap::new();
    let mut segnos: BTreeMap<TimelineId, Vec<SegmentNo>> = BTreeMap::new();
    for (name, entry) in listing.entries() {
        let tli = name.timeline();
        let rep = per_tli.entry(tli).or_insert_with(|| TimelineReport {
            timeline: tli.0,
            first_segment: None,
            last_segment: None,
            segments: 0,
            gaps: Vec::new(),
            partial: Vec::new(),
            history_file: false,
            parent: None,
            switch_lsn: None,
            recoverable: None,
            conflicts: Vec::new(),
            damaged_records: Vec::new(),
            superseded: None,
            dropped: Vec::new(),
        });
        if entry.is_conflict() {
            rep.conflicts.push(name.as_str().to_string());
        }
        if entry.answer.is_none() {
            continue; // not archived (a conflict, or a claim without data)
        }
        match name.kind() {
            WalFileKind::Segment => {
                if let Some(s) = name.segno(seg_size) {
                    segnos.entry(tli).or_default().push(s);
                }
            }
            WalFileKind::Partial => rep.partial.push(name.as_str().to_string()),
            WalFileKind::History => rep.history_file = true,
            WalFileKind::BackupLabel => {}
        }
    }
    for (tli, mut segs) in segnos {
        segs.sort();
        segs.dedup();
        let rep = per_tli.get_mut(&tli).expect("timeline seen above");
        let seg_name = |s: SegmentNo| {
            WalFileName::for_segment(tli, s, seg_size)
                .as_str()
                .to_string()
        };
        rep.segments = segs.len() as u64;
        rep.first_segment = segs.first().map(|&s| seg_name(s));
        rep.last_segment = segs.last().map(|&s| seg_name(s));
        for w in segs.windows(2) {
            let (a, b) = (w[0].0, w[1].0);
            if b > a + 1 {
                rep.gaps.push(Gap {
                    from: seg_name(SegmentNo(a + 1)),
                    to: seg_name(SegmentNo(b - 1)),
                });
            }
        }
    }
    per_tli.into_values().collect()
}
