//! Planning a restore, before anything is written: which backup, which
//! cluster of the stanza recovers it, the target timeline's history, and
//! whether the archived WAL reaches the target.

use crate::error::{Error, Kind, Result};
use crate::ops::walfacts;
use crate::pg::history::TimelineHistory;
use crate::pg::recovery::{self, RecoveryTarget};
use crate::pg::TimelineId;
use crate::repo::archive::{Archive, Histories};
use crate::repo::manifest::Manifest;
use crate::repo::{DbInfo, Repository, StanzaInfo};

use super::RestoreOptions;

/// Refuses, before anything is written, a target the archive cannot reach:
/// a time after the last archived commit (or abort, or restore point: the
/// records recovery can stop at), a restore point that is not in the WAL
/// recovery would replay, an LSN past its end. Files without a record
/// summary make the answer unknown: then a warning, not a refusal.
pub(super) async fn check_target_reachable(
    repo: &Repository,
    opts: &RestoreOptions,
    db: &DbInfo,
    m: &Manifest,
    history: Option<&TimelineHistory>,
) -> Result<()> {
    let target = match &opts.target {
        Some(t @ (RecoveryTarget::Time(_) | RecoveryTarget::Name(_) | RecoveryTarget::Lsn(_))) => t,
        _ => return Ok(()),
    };
    let seg = db.wal_segment_size;
    let root = TimelineHistory::root(m.timeline);
    let history = history.unwrap_or(&root);
    let archive = repo.archive(db);
    let listing = archive.list().await?;
    let path = listing.replay_path(history, m.start_lsn.segno(seg), seg);
    let sums = walfacts::load(&archive, opts.catalog.as_ref(), &listing, &path).await?;
    let facts = walfacts::path_facts(&path, &sums, seg);
    let timeline = history.timeline;
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
    let unsure = |what: &str| {
        log::warn!(
            "cannot check {what}: {} archived segment(s) on the way have no record summary (run `pgvault backfill`)",
            facts.unsummarized.len()
        );
        Ok(())
    };
    match target {
        RecoveryTarget::Time(t) => {
            let want = t.timestamp_micros();
            match facts.last_time {
                Some((last, _)) if want <= last => Ok(()),
                _ if !facts.unsummarized.is_empty() => unsure("the target time"),
                _ => refuse(format!(
                    "target time {} is after the last archived commit",
                    recovery::format_target_time(t)
                )),
            }
        }
        RecoveryTarget::Name(n) => {
            if facts.restore_points.iter().any(|rp| &rp.name == n) {
                Ok(())
            } else if !facts.unsummarized.is_empty() {
                unsure("the restore point")
            } else {
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
        }
        RecoveryTarget::Lsn(l) => match facts.end_lsn {
            Some(end) if *l <= end => Ok(()),
            _ => refuse(format!(
                "target LSN {l} is past the end of the archived WAL"
            )),
        },
        _ => Ok(()),
    }
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
    fn for_backup(&self, m: &Manifest) -> Option<TimelineHistory> {
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
/// reach a time or LSN target are the clusters before a `pg_upgrade` tried,
/// newest first.
pub(super) async fn choose_backup_and_db<'a>(
    repo: &Repository,
    stanza: &'a StanzaInfo,
    all: &'a [Manifest],
    opts: &RestoreOptions,
) -> Result<(&'a Manifest, &'a DbInfo, Option<TimelineHistory>)> {
    let tli = opts.target_timeline.as_deref();
    if opts.set.as_deref().is_some_and(|l| l != "latest") {
        let (m, _) = choose_backup(all, opts, &|_| None)?;
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
        return Ok((m, db, target.for_backup(m)));
    }
    let mut refused: Option<Error> = None;
    for db in stanza.dbs.iter().rev() {
        let own: Vec<Manifest> = all.iter().filter(|m| m.db_id == db.id).cloned().collect();
        if own.is_empty() {
            continue;
        }
        let chosen = match TargetTimeline::read(&repo.archive(db), tli).await {
            Ok(target) => choose_backup(&own, opts, &|m| target.for_backup(m))
                .map(|(m, history)| (m.label.clone(), history)),
            Err(e) => Err(e),
        };
        match chosen {
            Ok((label, history)) => {
                let m = all
                    .iter()
                    .find(|m| m.label == label)
                    .expect("chosen among these manifests");
                return Ok((m, db, history));
            }
            Err(e) if e.kind() == Kind::Usage => refused = refused.or(Some(e)),
            Err(e) => return Err(e),
        }
        if !matches!(
            opts.target,
            Some(RecoveryTarget::Time(_) | RecoveryTarget::Lsn(_))
        ) {
            break;
        }
    }
    Err(refused.unwrap_or_else(|| {
        Error::new(
            Kind::Stanza,
            format!(
                "no backup of stanza {:?} belongs to a cluster it records",
                repo.stanza()
            ),
        )
    }))
}

/// Picks the backup, with the history recovery from it follows
/// (`history_of`): the named one, or the newest whose stop (as the server
/// reported it) is before the target and whose WAL recovery along that
/// history replays as the backup's own timeline's (PostgreSQL refuses a
/// backup whose checkpoint is not on the history's path, and one whose WAL
/// leaves its timeline before it ends never becomes consistent).
fn choose_backup<'a>(
    all: &'a [Manifest],
    opts: &RestoreOptions,
    history_of: &dyn Fn(&Manifest) -> Option<TimelineHistory>,
) -> Result<(&'a Manifest, Option<TimelineHistory>)> {
    if let Some(label) = opts.set.as_deref().filter(|l| *l != "latest") {
        let m = all.iter().find(|m| m.label == label).ok_or_else(|| {
            Error::usage(format!("no complete backup labelled {label}")).hint(format!(
                "complete backups: {}",
                all.iter()
                    .map(|m| m.label.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        return Ok((m, history_of(m)));
    }
    let candidates: Vec<(&Manifest, Option<TimelineHistory>)> = all
        .iter()
        .map(|m| (m, history_of(m)))
        .filter(|(m, h)| {
            h.as_ref()
                .is_none_or(|h| h.holds(m.timeline, m.start_lsn, m.stop_lsn))
        })
        .collect();
    let fits = |m: &Manifest| match &opts.target {
        Some(RecoveryTarget::Time(t)) => m.stop_time_utc().is_some_and(|s| s < *t),
        Some(RecoveryTarget::Lsn(l)) => m.stop_lsn <= *l,
        _ => true,
    };
    if let Some((m, h)) = candidates.iter().rev().find(|(m, _)| fits(m)) {
        return Ok((m, h.clone()));
    }
    let oldest = candidates
        .first()
        .map(|(m, _)| *m)
        .or(all.first())
        .expect("at least one backup");
    let what = match &opts.target {
        Some(RecoveryTarget::Time(t)) => format!("target time {}", recovery::format_target_time(t)),
        Some(RecoveryTarget::Lsn(l)) => format!("target LSN {l}"),
        _ => "the target".into(),
    };
    Err(Error::usage(format!(
        "{what} is before the end of the oldest usable backup ({}, consistent at {} / {})",
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

    use crate::repo::manifest::test_manifest as manifest;

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
        let pick =
            |t| choose_backup(&all, &opts(Some(time(t))), &|_| None).map(|(m, _)| m.label.clone());
        assert_eq!(pick("2026-11-26T11:30:00Z").unwrap(), "20261126-080000F");
        assert_eq!(pick("2026-11-26T13:00:00Z").unwrap(), "20261126-070000F");
        assert_eq!(pick("2026-11-26T10:00:01Z").unwrap(), "20261126-090000F");
        let e = pick("2026-11-26T09:59:59Z").unwrap_err().to_string();
        assert!(
            e.contains("before the end of the oldest usable backup"),
            "{e}"
        );
        assert!(e.contains("20261126-090000F"), "{e}");
        let (lsn, _) = choose_backup(
            &all,
            &opts(Some(RecoveryTarget::Lsn(Lsn(0x2500000)))),
            &|_| None,
        )
        .unwrap();
        assert_eq!(lsn.label, "20261126-080000F");
        assert_eq!(
            choose_backup(&all, &opts(None), &|_| None).unwrap().0.label,
            "20261126-070000F"
        );
        let mut named = opts(None);
        named.set = Some("20261126-080000F".into());
        assert_eq!(
            choose_backup(&all, &named, &|_| None).unwrap().0.label,
            "20261126-080000F"
        );
        named.set = Some("nope".into());
        assert!(choose_backup(&all, &named, &|_| None).is_err());
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
            choose_backup(&all, &opts(Some(time(t))), &|_| Some(h.clone()))
                .map(|(m, _)| m.label.clone())
        };
        assert_eq!(pick("2026-11-26T12:30:00Z").unwrap(), "a");
        assert_eq!(pick("2026-11-26T14:00:00Z").unwrap(), "c");
        let root = TimelineHistory::root(TimelineId(1));
        let (on1, _) = choose_backup(&all, &opts(Some(time("2026-11-26T14:00:00Z"))), &|_| {
            Some(root.clone())
        })
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
        let (m, got) = choose_backup(&all, &opts(None), &|_| Some(h.clone())).unwrap();
        assert_eq!(m.label, "early");
        assert_eq!(got, Some(h));
    }
}
