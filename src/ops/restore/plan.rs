//! Planning a restore, before anything is written: which backup, which
//! cluster of the stanza recovers it, the target timeline's history, and
//! whether the archived WAL reaches the target.

use crate::error::{Error, Kind, Result};
use crate::ops::walfacts;
use crate::pg::history::TimelineHistory;
use crate::pg::recovery::{self, RecoveryTarget};
use crate::pg::TimelineId;
use crate::repo::archive::Archive;
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

/// The history of the target timeline, when one is named (or `latest`).
async fn target_history(
    archive: &Archive,
    target: Option<&str>,
) -> Result<Option<TimelineHistory>> {
    let tli = match target {
        // The newest timeline with a history file in the archive.
        None | Some("latest") => archive.history_timelines().await?.last().copied(),
        Some("current") => None,
        Some(n) => Some(
            n.parse::<TimelineId>()
                .map_err(|e| Error::usage(format!("--target-timeline: {e}")))?,
        ),
    };
    let Some(tli) = tli else {
        return Ok(None);
    };
    match archive.history(tli).await? {
        Some(h) => Ok(Some(h)),
        None => Err(Error::usage(format!(
            "timeline {tli} has no history file in the archive"
        ))),
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
        let m = choose_backup(all, opts, None)?;
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
        let history = target_history(&repo.archive(db), tli).await?;
        return Ok((m, db, history));
    }
    let mut refused: Option<Error> = None;
    for db in stanza.dbs.iter().rev() {
        let own: Vec<Manifest> = all.iter().filter(|m| m.db_id == db.id).cloned().collect();
        if own.is_empty() {
            continue;
        }
        let chosen = match target_history(&repo.archive(db), tli).await {
            Ok(history) => choose_backup(&own, opts, history.as_ref())
                .map(|m| m.label.clone())
                .map(|label| (label, history)),
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

/// Picks the backup: the named one, or the newest whose stop (as the server
/// reported it) is before the target and on the target timeline's path.
fn choose_backup<'a>(
    all: &'a [Manifest],
    opts: &RestoreOptions,
    history: Option<&TimelineHistory>,
) -> Result<&'a Manifest> {
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
    let on_path = |m: &Manifest| match history {
        None => true,
        Some(h) => {
            h.contains(m.timeline) && h.end_of(m.timeline).is_none_or(|end| m.stop_lsn <= end)
        }
    };
    let candidates: Vec<&Manifest> = all.iter().filter(|m| on_path(m)).collect();
    let fits = |m: &Manifest| match &opts.target {
        Some(RecoveryTarget::Time(t)) => m.stop_time_utc().is_some_and(|s| s < *t),
        Some(RecoveryTarget::Lsn(l)) => m.stop_lsn <= *l,
        _ => true,
    };
    if let Some(m) = candidates.iter().rev().find(|m| fits(m)) {
        return Ok(m);
    }
    let oldest = candidates
        .first()
        .copied()
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
        let pick = |t| choose_backup(&all, &opts(Some(time(t))), None).map(|m| m.label.clone());
        assert_eq!(pick("2026-11-26T11:30:00Z").unwrap(), "20261126-080000F");
        assert_eq!(pick("2026-11-26T13:00:00Z").unwrap(), "20261126-070000F");
        assert_eq!(pick("2026-11-26T10:00:01Z").unwrap(), "20261126-090000F");
        let e = pick("2026-11-26T09:59:59Z").unwrap_err().to_string();
        assert!(
            e.contains("before the end of the oldest usable backup"),
            "{e}"
        );
        assert!(e.contains("20261126-090000F"), "{e}");
        let lsn =
            choose_backup(&all, &opts(Some(RecoveryTarget::Lsn(Lsn(0x2500000)))), None).unwrap();
        assert_eq!(lsn.label, "20261126-080000F");
        assert_eq!(
            choose_backup(&all, &opts(None), None).unwrap().label,
            "20261126-070000F"
        );
        let mut named = opts(None);
        named.set = Some("20261126-080000F".into());
        assert_eq!(
            choose_backup(&all, &named, None).unwrap().label,
            "20261126-080000F"
        );
        named.set = Some("nope".into());
        assert!(choose_backup(&all, &named, None).is_err());
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
        let pick = |t| choose_backup(&all, &opts(Some(time(t))), Some(&h)).map(|m| m.label.clone());
        assert_eq!(pick("2026-11-26T12:30:00Z").unwrap(), "a");
        assert_eq!(pick("2026-11-26T14:00:00Z").unwrap(), "c");
        let root = TimelineHistory::root(TimelineId(1));
        let on1 =
            choose_backup(&all, &opts(Some(time("2026-11-26T14:00:00Z"))), Some(&root)).unwrap();
        assert_eq!(on1.label, "b");
    }
}
