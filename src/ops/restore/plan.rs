//! Planning a restore, before anything is written: which backup, which
//! cluster of the stanza recovers it, the target timeline's history, and
//! whether the archived WAL reaches the target.

use std::collections::{BTreeSet, HashMap};

use crate::error::{Error, Kind, Result};
use crate::ops::walfacts::{self, RecordTarget, Stop, StopRecords, Summaries};
use crate::pg::history::TimelineHistory;
use crate::pg::recovery::{self, RecoveryTarget};
use crate::pg::{TimelineId, WalFileName};
use crate::repo::archive::{Archive, Histories, Listing};
use crate::repo::manifest::BackupHeader;
use crate::repo::{DbInfo, Repository, StanzaInfo};

use super::RestoreOptions;

/// What planning decided.
pub(super) struct Plan<'a> {
    pub backup: &'a BackupHeader,
    pub db: &'a DbInfo,
    /// The target timeline's history; `None`: the backup's own timeline.
    pub history: Option<TimelineHistory>,
    /// The archive as the choice read it (a name or xid target), so that
    /// the check does not read it again.
    wal: Option<ArchivedWal>,
}

impl Plan<'_> {
    /// The archive of the chosen backup's cluster with the summaries of its
    /// replay path: as the choice read it, else read now.
    async fn archived_wal(
        &self,
        repo: &Repository,
        opts: &RestoreOptions,
    ) -> Result<std::borrow::Cow<'_, ArchivedWal>> {
        let history = self.history.as_ref();
        Ok(match &self.wal {
            Some(wal) => std::borrow::Cow::Borrowed(wal),
            None => std::borrow::Cow::Owned(
                ArchivedWal::read(
                    &repo.archive(self.db),
                    opts,
                    &|_| history.cloned(),
                    &[self.backup],
                )
                .await?,
            ),
        })
    }
}

/// One cluster's archive, listed, with the summaries of every file on the
/// replay paths of some backups.
#[derive(Clone)]
struct ArchivedWal {
    listing: Listing,
    sums: Summaries,
}

impl ArchivedWal {
    async fn read(
        archive: &Archive,
        opts: &RestoreOptions,
        history_of: &dyn Fn(&BackupHeader) -> Option<TimelineHistory>,
        backups: &[&BackupHeader],
    ) -> Result<ArchivedWal> {
        let listing = archive.list().await?;
        let seg = archive.db().wal_segment_size;
        let files: BTreeSet<WalFileName> = backups
            .iter()
            .flat_map(|m| replay_path(&listing, history_of(m).as_ref(), m, seg))
            .collect();
        let files: Vec<WalFileName> = files.into_iter().collect();
        let sums = walfacts::load(archive, opts.catalog.as_ref(), &listing, &files).await?;
        Ok(ArchivedWal { listing, sums })
    }

    fn path(
        &self,
        history: Option<&TimelineHistory>,
        m: &BackupHeader,
        seg: u32,
    ) -> Vec<WalFileName> {
        replay_path(&self.listing, history, m, seg)
    }
}

/// The files recovery of `m` replays: along `history`, or `m`'s own
/// timeline.
fn replay_path(
    listing: &Listing,
    history: Option<&TimelineHistory>,
    m: &BackupHeader,
    seg: u32,
) -> Vec<WalFileName> {
    let root = TimelineHistory::root(m.timeline);
    listing.replay_path(history.unwrap_or(&root), m.start_lsn.segno(seg), seg)
}

/// A name or xid target, as recovery matches it against records.
fn record_target(target: Option<&RecoveryTarget>) -> Result<Option<RecordTarget>> {
    Ok(match target {
        Some(RecoveryTarget::Name(n)) => Some(RecordTarget::Name(n.clone())),
        Some(RecoveryTarget::Xid(x)) => Some(RecordTarget::Xid(
            recovery::target_xid(x).ok_or_else(|| {
                Error::usage(format!(
                    "--target-xid {x}: not a transaction id (PostgreSQL refuses a value past 64 bits)"
                ))
            })?,
        )),
        _ => None,
    })
}

/// Refuses, before anything is written, a target the archive cannot reach:
/// a time after the last archived commit (or abort, or restore point: the
/// records recovery can stop at), a restore point or a transaction's end
/// that is not in the WAL recovery would replay after the backup is
/// consistent, an LSN past its end. Files without a record summary that
/// tells make the answer unknown: then a warning, not a refusal.
pub(super) async fn check_target_reachable(
    repo: &Repository,
    opts: &RestoreOptions,
    plan: &Plan<'_>,
) -> Result<()> {
    let target = match &opts.target {
        Some(
            t @ (RecoveryTarget::Time(_)
            | RecoveryTarget::Name(_)
            | RecoveryTarget::Lsn(_)
            | RecoveryTarget::Xid(_)),
        ) => t,
        _ => return Ok(()),
    };
    let (m, db, history) = (plan.backup, plan.db, plan.history.as_ref());
    let seg = db.wal_segment_size;
    let wal = plan.archived_wal(repo, opts).await?;
    let path = wal.path(history, m, seg);
    let facts = walfacts::path_facts(&path, &wal.sums, seg);
    let timeline = history.map_or(m.timeline, |h| h.timeline);
    let window = match (&facts.last_time, path.last()) {
        (Some((t, _)), Some(last)) => format!(
            "recoverable on timeline {timeline} from backup {}: {} to {} (last archived commit), WAL up to {} ({})",
            m.label,
            m.stop_time,
            walfacts::format_us(*t),
            facts.end_lsn.unwrap_or_default(),
            last
        ),
        (None, Some(last)) => format!(
            "recoverable on timeline {timeline} from backup {}: {} to WAL {} ({}); no commit is archived after it",
            m.label,
            m.stop_time,
            facts.end_lsn.unwrap_or_default(),
            last
        ),
        (_, None) => format!(
            "the archive does not hold backup {}'s first WAL segment on timeline {timeline}",
            m.label
        ),
    };
    let refuse = |what: String| {
        Err(Error::usage(format!("{what}; {window}"))
            .hint("choose a target inside that window, or pass --no-target-check to try anyway"))
    };
    let unsure = |what: &str, files: usize| {
        log::warn!(
            "cannot check {what}: {files} archived segment(s) on the way have no record summary that tells (run `pgvault backfill`)"
        );
        Ok(())
    };
    match target {
        RecoveryTarget::Time(t) => {
            let want = t.timestamp_micros();
            match facts.last_time {
                Some((last, _)) if want <= last => Ok(()),
                _ if !facts.unsummarized.is_empty() => {
                    unsure("the target time", facts.unsummarized.len())
                }
                _ => refuse(format!(
                    "target time {} is after the last archived commit",
                    recovery::format_target_time(t)
                )),
            }
        }
        RecoveryTarget::Lsn(l) => match facts.end_lsn {
            Some(end) if *l <= end => Ok(()),
            _ => refuse(format!(
                "target LSN {l} is past the end of the archived WAL"
            )),
        },
        _ => {
            let Some(t) = record_target(Some(target))? else {
                return Ok(());
            };
            let records = StopRecords::find(&t, &path, &wal.sums);
            match records.first_on(&path, m.start_lsn) {
                Stop::At(l) if l >= m.stop_lsn => Ok(()),
                Stop::At(l) => refuse(format!(
                    "{t} at {l} is before backup {} is consistent ({}): recovery would stop too early",
                    m.label, m.stop_lsn
                )),
                Stop::Unknown => unsure(&t.to_string(), records.unknown_on(&path)),
                Stop::Absent => match &t {
                    RecordTarget::Name(n) => {
                        let known: Vec<&str> = facts
                            .restore_points
                            .iter()
                            .map(|rp| rp.name.as_str())
                            .collect();
                        refuse(format!(
                            "restore point {n:?} is not in the archived WAL (restore points there: {})",
                            if known.is_empty() {
                                "none".to_string()
                            } else {
                                known.join(", ")
                            }
                        ))
                    }
                    RecordTarget::Xid(x) => refuse(format!(
                        "no commit or abort of transaction {x} is archived after backup {}",
                        m.label
                    )),
                },
            }
        }
    }
}

/// What recovery from the backup a restore with `opts` chooses can reach,
/// planned as that restore plans (nothing is written).
pub(super) async fn reach(
    repo: &Repository,
    stanza: &StanzaInfo,
    manifests: &[BackupHeader],
    opts: &RestoreOptions,
) -> Result<super::Reach> {
    let plan = choose_backup_and_db(repo, stanza, manifests, opts).await?;
    let (m, db, history) = (plan.backup, plan.db, plan.history.as_ref());
    let seg = db.wal_segment_size;
    let wal = plan.archived_wal(repo, opts).await?;
    let path = wal.path(history, m, seg);
    let facts = walfacts::path_facts(&path, &wal.sums, seg);
    Ok(super::Reach {
        backup: m.clone(),
        pg_version: db.pg_version,
        wal_segment_size: seg,
        last_commit: facts.last_time,
        end_lsn: facts.end_lsn,
        wal_files: path.len() as u64,
    })
}

/// What `--target-timeline` asks for (`recovery_target_timeline`).
enum TimelineGoal {
    Latest,
    Current,
    Numeric(TimelineId),
}

/// The target timeline as PostgreSQL's recovery resolves it, from the
/// histories archived for one cluster.
struct TargetTimeline {
    goal: TimelineGoal,
    histories: Histories,
}

impl TargetTimeline {
    /// Reads the archive's history files; a timeline named that has none
    /// is refused, as PostgreSQL refuses it ("recovery target timeline N
    /// does not exist").
    async fn read(archive: &Archive, target: Option<&str>) -> Result<TargetTimeline> {
        let goal = match target {
            None | Some("latest") => TimelineGoal::Latest,
            Some("current") => TimelineGoal::Current,
            Some(n) => TimelineGoal::Numeric(
                n.parse::<TimelineId>()
                    .map_err(|e| Error::usage(format!("--target-timeline: {e}")))?,
            ),
        };
        let histories = archive.histories().await?;
        if let TimelineGoal::Numeric(t) = goal {
            if t != TimelineId::FIRST && histories.get(t).is_none() {
                return Err(Error::usage(format!(
                    "timeline {t} has no history file in the archive"
                )));
            }
        }
        Ok(TargetTimeline { goal, histories })
    }

    /// The history recovery from backup `m` follows; `None`: `m`'s own
    /// timeline (`current`). For `latest`, PostgreSQL probes the archive
    /// for the history files of the timelines after the backup's, one by
    /// one, and takes the last before the first missing one
    /// (`findNewestTimeLine`): so does this.
    fn for_backup(&self, m: &BackupHeader) -> Option<TimelineHistory> {
        let tli = match self.goal {
            TimelineGoal::Current => return None,
            TimelineGoal::Numeric(t) => t,
            TimelineGoal::Latest => self.histories.newest_from(m.timeline),
        };
        Some(match self.histories.get(tli) {
            Some(a) => a.history.clone(),
            // Timeline 1, or a backup's timeline without a history file
            // (after pg_upgrade): no ancestors, as PostgreSQL takes it.
            None => TimelineHistory::root(tli),
        })
    }
}

/// Picks the backup and the cluster (stanza entry) whose archive recovers
/// it, and the target timeline's history read from that archive. A named
/// backup brings its own cluster (the manifest's `db_id`).
/// Otherwise the newest cluster that has backups comes first, its
/// timelines read from its own archive; only when none of its backups can
/// reach the target (for a restore point or a transaction: when no replay
/// path in its archive holds it) are the clusters before a `pg_upgrade`
/// tried, newest first.
pub(super) async fn choose_backup_and_db<'a>(
    repo: &Repository,
    stanza: &'a StanzaInfo,
    all: &'a [BackupHeader],
    opts: &RestoreOptions,
) -> Result<Plan<'a>> {
    let tli = opts.target_timeline.as_deref();
    let record = record_target(opts.target.as_ref())?;
    if opts.set.as_deref().is_some_and(|l| l != "latest") {
        let m = choose_backup(all, opts, &|_| None, &HashMap::new())?;
        let db = stanza.db(m.db_id).ok_or_else(|| {
            Error::new(
                Kind::Stanza,
                format!(
                    "backup {} belongs to cluster {} (PostgreSQL {}), which stanza {:?} does not record",
                    m.label,
                    m.db_id,
                    m.pg_version,
                    repo.stanza()
                ),
            )
        })?;
        // A timeline named that its archive does not know is refused here.
        let target = TargetTimeline::read(&repo.archive(db), tli).await?;
        return Ok(Plan {
            backup: m,
            db,
            history: target.for_backup(m),
            wal: None,
        });
    }
    let mut refused: Option<Error> = None;
    // The first cluster's choice when no replay path there holds the
    // restore point or transaction.
    let mut absent: Option<Plan<'a>> = None;
    for db in stanza.dbs.iter().rev() {
        let own: Vec<BackupHeader> = all.iter().filter(|m| m.db_id == db.id).cloned().collect();
        if own.is_empty() {
            continue;
        }
        let chosen = match TargetTimeline::read(&repo.archive(db), tli).await {
            Ok(target) => {
                let history_of = |m: &BackupHeader| target.for_backup(m);
                let (stops, wal) = match &record {
                    Some(t) => {
                        let (stops, wal) = locate(repo, db, opts, t, &own, &history_of).await?;
                        (stops, Some(wal))
                    }
                    None => (HashMap::new(), None),
                };
                choose_backup(&own, opts, &history_of, &stops)
                    .map(|m| (m.label.clone(), history_of(m)))
                    .map(|(label, history)| (label, history, stops, wal))
            }
            Err(e) => Err(e),
        };
        match chosen {
            Ok((label, history, stops, wal)) => {
                let m = all
                    .iter()
                    .find(|m| m.label == label)
                    .expect("chosen among these manifests");
                let plan = Plan {
                    backup: m,
                    db,
                    history,
                    wal,
                };
                if record.is_some()
                    && !stops.is_empty()
                    && stops.values().all(|s| *s == Stop::Absent)
                {
                    absent = absent.or(Some(plan));
                } else {
                    return Ok(plan);
                }
            }
            Err(e) if e.kind() == Kind::Usage => refused = refused.or(Some(e)),
            Err(e) => return Err(e),
        }
        if matches!(opts.target, None | Some(RecoveryTarget::Immediate)) {
            break;
        }
    }
    if let Some(e) = refused {
        return Err(e);
    }
    absent.ok_or_else(|| {
        Error::new(
            Kind::Stanza,
            format!(
                "no backup of stanza {:?} belongs to a cluster it records",
                repo.stanza()
            ),
        )
    })
}

/// Where recovery from each of `backups` on the target timeline's path
/// would stop for a restore point or transaction (by label), from the WAL
/// summaries of their replay paths; and the archive as read for it.
async fn locate(
    repo: &Repository,
    db: &DbInfo,
    opts: &RestoreOptions,
    target: &RecordTarget,
    backups: &[BackupHeader],
    history_of: &dyn Fn(&BackupHeader) -> Option<TimelineHistory>,
) -> Result<(HashMap<String, Stop>, ArchivedWal)> {
    let seg = db.wal_segment_size;
    let candidates: Vec<&BackupHeader> = backups
        .iter()
        .filter(|m| on_path(m, history_of(m).as_ref()))
        .collect();
    let wal = ArchivedWal::read(&repo.archive(db), opts, history_of, &candidates).await?;
    let paths: Vec<(&BackupHeader, Vec<WalFileName>)> = candidates
        .iter()
        .map(|m| (*m, wal.path(history_of(m).as_ref(), m, seg)))
        .collect();
    let records = StopRecords::find(target, paths.iter().flat_map(|(_, p)| p), &wal.sums);
    let stops = paths
        .iter()
        .map(|(m, p)| (m.label.clone(), records.first_on(p, m.start_lsn)))
        .collect();
    Ok((stops, wal))
}

/// Whether recovery along `history` can start from `m`: it replays the
/// backup's WAL as the backup's own timeline's. PostgreSQL refuses a backup
/// whose checkpoint is not on the history's path ("requested timeline N is
/// not a child of this server's history"), and one whose WAL leaves its
/// timeline before the backup's end never becomes consistent.
fn on_path(m: &BackupHeader, history: Option<&TimelineHistory>) -> bool {
    history.is_none_or(|h| h.holds(m.timeline, m.start_lsn, m.stop_lsn))
}

/// Picks the backup: the named one, or the newest on the target timeline's
/// path whose stop (as the server reported it) is before the target. For a
/// restore point or a transaction, `stops` says where recovery from each
/// backup would stop (by label; one not there is unknown): the newest that
/// stops after it is consistent; else the newest whose WAL may hold the
/// target (not every file summarized); else, when no replay path holds it,
/// the oldest — its replay reads the most WAL, and the check then refuses
/// it with the whole window.
fn choose_backup<'a>(
    all: &'a [BackupHeader],
    opts: &RestoreOptions,
    history_of: &dyn Fn(&BackupHeader) -> Option<TimelineHistory>,
    stops: &HashMap<String, Stop>,
) -> Result<&'a BackupHeader> {
    if let Some(label) = opts.set.as_deref().filter(|l| *l != "latest") {
        return all.iter().find(|m| m.label == label).ok_or_else(|| {
            Error::usage(format!("no complete backup labelled {label}")).hint(format!(
                "complete backups: {}",
                all.iter()
                    .map(|m| m.label.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        });
    }
    let candidates: Vec<&BackupHeader> = all
        .iter()
        .filter(|m| on_path(m, history_of(m).as_ref()))
        .collect();
    let record = record_target(opts.target.as_ref())?;
    let stop = |m: &BackupHeader| stops.get(&m.label).copied().unwrap_or(Stop::Unknown);
    let fits = |m: &BackupHeader| match &opts.target {
        Some(RecoveryTarget::Time(t)) => m.stop_time_utc().is_some_and(|s| s < *t),
        Some(RecoveryTarget::Lsn(l)) => m.stop_lsn <= *l,
        // Recovery stops at the record, after (or, exclusive, before)
        // replaying it: the backup must be consistent by then, or
        // PostgreSQL refuses to start ("requested recovery stop point is
        // before consistent recovery point").
        Some(RecoveryTarget::Name(_) | RecoveryTarget::Xid(_)) => {
            matches!(stop(m), Stop::At(l) if l >= m.stop_lsn)
        }
        _ => true,
    };
    if let Some(m) = candidates.iter().rev().find(|m| fits(m)) {
        return Ok(m);
    }
    let mut before = None;
    if record.is_some() {
        if let Some(m) = candidates.iter().rev().find(|m| stop(m) == Stop::Unknown) {
            return Ok(m);
        }
        // The oldest backup whose replay meets the target (too early).
        before = candidates.iter().find_map(|m| match stop(m) {
            Stop::At(l) => Some((*m, l)),
            _ => None,
        });
        if let (None, Some(oldest)) = (before, candidates.first()) {
            return Ok(oldest);
        }
    }
    let (oldest, at) = match before {
        Some((m, l)) => (m, format!(" at {l}")),
        None => (
            candidates
                .first()
                .copied()
                .or(all.first())
                .expect("at least one backup"),
            String::new(),
        ),
    };
    let what = match (&opts.target, &record) {
        (Some(RecoveryTarget::Time(t)), _) => {
            format!("target time {}", recovery::format_target_time(t))
        }
        (Some(RecoveryTarget::Lsn(l)), _) => format!("target LSN {l}"),
        (_, Some(t)) => t.to_string(),
        _ => "the target".into(),
    };
    Err(Error::usage(format!(
        "{what}{at} is before the end of the oldest usable backup ({}, consistent at {} / {})",
        oldest.label, oldest.stop_time, oldest.stop_lsn
    ))
    .hint("choose a later target; a backup can only recover to moments after it ended"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::history::parse_history;
    use crate::pg::recovery::{self, RecoveryTarget};
    use crate::pg::Lsn;

    use crate::repo::manifest::test_manifest;

    fn manifest(label: &str, tli: u32, stop_lsn: u64, stop_time: &str) -> BackupHeader {
        test_manifest(label, tli, stop_lsn, stop_time).header
    }

    fn opts(target: Option<RecoveryTarget>) -> RestoreOptions {
        RestoreOptions {
            pgdata: "/x".into(),
            set: None,
            target,
            target_action: None,
            target_timeline: None,
            target_exclusive: false,
            archive_mode_off: false,
            tablespace_map: vec![],
            standby: false,
            primary_conninfo: None,
            delta: false,
            process_max: 1,
            restore_command: String::new(),
            target_check: true,
            catalog: None,
        }
    }

    fn time(s: &str) -> RecoveryTarget {
        RecoveryTarget::Time(recovery::parse_target_time(s).unwrap())
    }

    #[test]
    fn picks_newest_backup_ending_before_the_target() {
        // Labels deliberately disagree with the server's times: the choice
        // must follow the stop time and LSN, never the label.
        let all = vec![
            manifest("20261126-090000F", 1, 0x1000000, "2026-11-26T10:00:00Z"),
            manifest("20261126-080000F", 1, 0x2000000, "2026-11-26T11:00:00Z"),
            manifest("20261126-070000F", 1, 0x3000000, "2026-11-26T12:00:00Z"),
        ];
        let pick = |t| {
            choose_backup(&all, &opts(Some(time(t))), &|_| None, &HashMap::new())
                .map(|m| m.label.clone())
        };
        assert_eq!(pick("2026-11-26T11:30:00Z").unwrap(), "20261126-080000F");
        assert_eq!(pick("2026-11-26T13:00:00Z").unwrap(), "20261126-070000F");
        assert_eq!(pick("2026-11-26T10:00:01Z").unwrap(), "20261126-090000F");
        let e = pick("2026-11-26T09:59:59Z").unwrap_err().to_string();
        assert!(
            e.contains("before the end of the oldest usable backup"),
            "{e}"
        );
        assert!(e.contains("20261126-090000F"), "{e}");
        let lsn = choose_backup(
            &all,
            &opts(Some(RecoveryTarget::Lsn(Lsn(0x2500000)))),
            &|_| None,
            &HashMap::new(),
        )
        .unwrap();
        assert_eq!(lsn.label, "20261126-080000F");
        assert_eq!(
            choose_backup(&all, &opts(None), &|_| None, &HashMap::new())
                .unwrap()
                .label,
            "20261126-070000F"
        );
        let mut named = opts(None);
        named.set = Some("20261126-080000F".into());
        assert_eq!(
            choose_backup(&all, &named, &|_| None, &HashMap::new())
                .unwrap()
                .label,
            "20261126-080000F"
        );
        named.set = Some("nope".into());
        assert!(choose_backup(&all, &named, &|_| None, &HashMap::new()).is_err());
    }

    #[test]
    fn a_name_or_xid_picks_the_newest_backup_consistent_before_it() {
        // Backups consistent at 0/1000000, 0/2000000, 0/3000000, each
        // started 0x100 bytes earlier.
        let all = vec![
            manifest("a", 1, 0x1000000, "2026-11-26T10:00:00Z"),
            manifest("b", 1, 0x2000000, "2026-11-26T11:00:00Z"),
            manifest("c", 1, 0x3000000, "2026-11-26T12:00:00Z"),
        ];
        let at = |l: u64| Stop::At(Lsn(l));
        let pick = |target: RecoveryTarget, stops: [Stop; 3]| {
            let stops: HashMap<String, Stop> = ["a", "b", "c"]
                .iter()
                .map(|l| l.to_string())
                .zip(stops)
                .collect();
            choose_backup(&all, &opts(Some(target)), &|_| None, &stops).map(|m| m.label.clone())
        };
        let name = || RecoveryTarget::Name("rp".into());
        let xid = || RecoveryTarget::Xid("745".into());
        for t in [name(), xid()] {
            // Between a and b: a, not the newest.
            assert_eq!(
                pick(t.clone(), [at(0x1800000), Stop::Absent, Stop::Absent]).unwrap(),
                "a"
            );
            // After c: c.
            assert_eq!(
                pick(t.clone(), [at(0x3800000), at(0x3800000), at(0x3800000)]).unwrap(),
                "c"
            );
            // While b ran: b would stop before it is consistent.
            assert_eq!(
                pick(t.clone(), [at(0x1ffff80), at(0x1ffff80), Stop::Absent]).unwrap(),
                "a"
            );
            // A newer backup that cannot tell does not beat a sure one...
            assert_eq!(
                pick(t.clone(), [at(0x1800000), Stop::Absent, Stop::Unknown]).unwrap(),
                "a"
            );
            // ...but is taken when nothing is sure (the check then warns).
            assert_eq!(
                pick(t.clone(), [Stop::Unknown, Stop::Unknown, Stop::Absent]).unwrap(),
                "b"
            );
            // On no replay path: the oldest, whose replay reads the most WAL
            // (the check refuses it with the whole window).
            assert_eq!(
                pick(t.clone(), [Stop::Absent, Stop::Absent, Stop::Absent]).unwrap(),
                "a"
            );
            // Only while the oldest backup ran: refused.
            let e = pick(t.clone(), [at(0x0ffff80), Stop::Absent, Stop::Absent])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("at 0/FFFF80 is before the end of the oldest usable backup (a,"),
                "{e}"
            );
        }
        // A repeated name: each backup stops at the first one it replays.
        assert_eq!(
            pick(name(), [at(0x1800000), at(0x2800000), Stop::Absent]).unwrap(),
            "b"
        );
        let e = pick(name(), [at(0x0ffff80), Stop::Absent, Stop::Absent])
            .unwrap_err()
            .to_string();
        assert!(e.contains("restore point \"rp\""), "{e}");
        let e = pick(xid(), [at(0x0ffff80), Stop::Absent, Stop::Absent])
            .unwrap_err()
            .to_string();
        assert!(e.contains("transaction 745"), "{e}");
    }

    #[test]
    fn follows_the_target_timeline() {
        // Timeline 2 branched from 1 at 0/2800000: a timeline-1 backup that
        // ended after the switch is not on timeline 2's path.
        let all = vec![
            manifest("a", 1, 0x1000000, "2026-11-26T10:00:00Z"),
            manifest("b", 1, 0x3000000, "2026-11-26T12:00:00Z"),
            manifest("c", 2, 0x4000000, "2026-11-26T13:00:00Z"),
        ];
        let h = parse_history(
            TimelineId(2),
            "1\t0/2800000\tno recovery target specified\n",
        )
        .unwrap();
        let pick = |t| {
            choose_backup(
                &all,
                &opts(Some(time(t))),
                &|_| Some(h.clone()),
                &HashMap::new(),
            )
            .map(|m| m.label.clone())
        };
        assert_eq!(pick("2026-11-26T12:30:00Z").unwrap(), "a");
        assert_eq!(pick("2026-11-26T14:00:00Z").unwrap(), "c");
        let root = TimelineHistory::root(TimelineId(1));
        let on1 = choose_backup(
            &all,
            &opts(Some(time("2026-11-26T14:00:00Z"))),
            &|_| Some(root.clone()),
            &HashMap::new(),
        )
        .unwrap();
        assert_eq!(on1.label, "b");
    }

    #[test]
    fn a_backup_whose_wal_leaves_its_timeline_is_not_on_the_path() {
        // 028_pitr_timelines.pl's timeline 3: PostgreSQL reads timeline 3's
        // WAL from 0/3018C78 on, before timeline 1's own line (0/3018CE0)
        // ends it. A timeline-1 backup ending at 0/3018CA0 never becomes
        // consistent along it.
        let h = parse_history(
            TimelineId(3),
            "1\t0/3018CE0\tno recovery target specified\n\n2\t0/3018C78\tat restore point \"rp\"\n",
        )
        .unwrap();
        let all = vec![
            manifest("early", 1, 0x3018C00, "2026-11-26T10:00:00Z"),
            manifest("late", 1, 0x3018CA0, "2026-11-26T11:00:00Z"),
        ];
        let m = choose_backup(&all, &opts(None), &|_| Some(h.clone()), &HashMap::new()).unwrap();
        assert_eq!(m.label, "early");
    }
}
