//! The archive's timeline rules: which history files it holds, whether a
//! new history file agrees with the WAL already archived for its timeline,
//! and where the archived histories leave a timeline for another — so that
//! WAL of that timeline past that point (a split brain, or a PITR clone
//! archiving into the same stanza) is seen.
//!
//! Every answer reads history files as PostgreSQL does (`pg::history`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};

use super::{Archive, Listing, SummaryRead};
use crate::error::{Error, Kind, Result};
use crate::pg::history::{newest_timeline, parse_history, TimelineHistory};
use crate::pg::walscan::WalSummary;
use crate::pg::{Lsn, SegmentNo, TimelineId, WalFileKind, WalFileName};

/// An archived history file, with when it was archived.
#[derive(Debug, Clone)]
pub struct ArchivedHistory {
    pub history: TimelineHistory,
    /// From its claim (the clock of the host that archived it).
    pub archived_at: Option<DateTime<Utc>>,
}

/// Some of the archive's history files, by timeline.
#[derive(Debug, Clone, Default)]
pub struct Histories {
    by_timeline: BTreeMap<TimelineId, ArchivedHistory>,
}

/// Where the archived histories leave a timeline for another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fork {
    /// The timeline left.
    pub timeline: TimelineId,
    /// Its switch point in the history that leaves it first.
    pub at: Lsn,
    /// The timeline that history continues on after it.
    pub to: TimelineId,
    /// The timeline whose history file says so.
    pub file: TimelineId,
    /// When that history file was archived.
    pub archived_at: Option<DateTime<Utc>>,
}

impl Histories {
    pub fn get(&self, tli: TimelineId) -> Option<&ArchivedHistory> {
        self.by_timeline.get(&tli)
    }

    pub fn timelines(&self) -> impl Iterator<Item = TimelineId> + '_ {
        self.by_timeline.keys().copied()
    }

    /// The timeline PostgreSQL's recovery takes for `latest` from a backup
    /// on timeline `start` (`findNewestTimeLine` over these files).
    pub fn newest_from(&self, start: TimelineId) -> TimelineId {
        newest_timeline(start, |t| self.by_timeline.contains_key(&t))
    }

    /// The earliest point where one of these histories leaves `tli`
    /// (`tliSwitchPoint` in each history listing `tli` as an ancestor).
    pub fn fork_of(&self, tli: TimelineId) -> Option<Fork> {
        self.by_timeline
            .iter()
            .filter(|(m, _)| **m > tli)
            .filter_map(|(m, a)| {
                a.history.departure(tli).map(|d| Fork {
                    timeline: tli,
                    at: d.at,
                    to: d.to,
                    file: *m,
                    archived_at: a.archived_at,
                })
            })
            .min_by_key(|f| (f.at, f.file))
    }
}

impl Fork {
    /// Does archived file `name` hold WAL of the timeline left past the
    /// fork, a record starting at or after it? Told by its record summary
    /// (the end of its last record) when there is one, else by where the
    /// segment starts. Only full segments count: a `.partial` is archived
    /// by the server that *left* the timeline (its copy up to the switch,
    /// xlog.c `CleanupAfterArchiveRecovery`), never by one going on with it.
    pub fn passed_by(
        &self,
        name: &WalFileName,
        summary: Option<&WalSummary>,
        seg_size: u32,
    ) -> bool {
        if name.kind() != WalFileKind::Segment || name.timeline() != self.timeline {
            return false;
        }
        match summary.and_then(|s| s.end_of_wal) {
            Some(end) => end > self.at,
            None => name.start_lsn(seg_size).is_some_and(|s| s >= self.at),
        }
    }

    /// "timeline 1 continues past 0/5000060, where timeline 2 branched off
    /// (00000002.history)".
    pub fn describe(&self) -> String {
        format!("timeline {} continues {}", self.timeline, self.past())
    }

    /// "past 0/5000060, where timeline 2 branched off (00000002.history)".
    pub fn past(&self) -> String {
        format!(
            "past {}, where timeline {} branched off ({})",
            self.at,
            self.to,
            WalFileName::history(self.file)
        )
    }
}

impl Archive {
    /// The history files of `timelines` the archive holds (each read
    /// through its claim). A history file that cannot be read is left out
    /// with a warning: it must not stop archiving.
    pub async fn histories_of(
        &self,
        timelines: impl IntoIterator<Item = TimelineId>,
    ) -> Result<Histories> {
        let mut out = Histories::default();
        for tli in timelines {
            let name = WalFileName::history(tli);
            let Some(claim) = self.read_claim(&name).await? else {
                continue;
            };
            let bytes = match self.read_content(&name, &claim.sha256, Vec::new()).await {
                Ok(b) => b,
                Err(e) => {
                    log::warn!("{e}; timeline {tli}'s history is left out");
                    continue;
                }
            };
            match parse_history(tli, &String::from_utf8_lossy(&bytes)) {
                Ok(history) => {
                    let archived_at = DateTime::parse_from_rfc3339(&claim.archived_at)
                        .ok()
                        .map(|t| t.with_timezone(&Utc));
                    out.by_timeline.insert(
                        tli,
                        ArchivedHistory {
                            history,
                            archived_at,
                        },
                    );
                }
                Err(e) => log::warn!("{}: {e}; left out", self.describe_claim(&name)),
            }
        }
        Ok(out)
    }

    /// Every history file the archive holds.
    pub async fn histories(&self) -> Result<Histories> {
        let all = self.history_timelines().await?;
        self.histories_of(all).await
    }

    /// Refuses a history file for timeline N that the WAL of N already in
    /// the archive contradicts: WAL of N from before N begins in this
    /// history, or a first segment whose switch record (the end-of-recovery
    /// record PostgreSQL writes first on a new timeline) is not this
    /// history's. That is another cluster history's timeline N — left by a
    /// restore that found no `0000000N.history` in the archive and took N
    /// again. Without record summaries the check cannot tell, and says so.
    pub async fn check_history_agrees(&self, history: &TimelineHistory) -> Result<()> {
        let tli = history.timeline;
        let Some(begin) = history.switch_point_into(tli) else {
            return Ok(());
        };
        let seg = self.db.wal_segment_size;
        let listing = self.list().await?;
        let Some((first, sha)) = earliest_of(&listing, tli, seg) else {
            return Ok(());
        };
        let file = WalFileName::history(tli);
        let begin_seg = WalFileName::for_segment(tli, begin.segno(seg), seg);
        let disagree = |detail: String| {
            Err(Error::new(
                Kind::Timeline,
                format!(
                    "{file} disagrees with timeline {tli}'s archived WAL: {detail}; the archive holds timeline {tli} of another cluster history"
                ),
            )
            .hint(format!(
                "a restore took timeline {tli} again while {file} was missing from the archive: archive this cluster into a stanza of its own (pgvault stanza-create) and see docs/disaster-recovery.md"
            )))
        };
        let first_seg = first.segno(seg).unwrap_or(SegmentNo(0));
        if first_seg < begin.segno(seg) {
            return disagree(format!(
                "{first} is archived, but this history has timeline {tli} begin at {begin} (in {begin_seg})"
            ));
        }
        let summary = match self.read_summary(&first, &sha).await? {
            SummaryRead::Found(s) => s,
            SummaryRead::Missing | SummaryRead::Damaged(_) => {
                log::warn!(
                    "{file}: cannot check it against {first}, which has no record summary (run pgvault backfill)"
                );
                return Ok(());
            }
        };
        let Some(switch) = summary.timeline_switches.iter().find(|s| s.to == tli.0) else {
            return Ok(());
        };
        let agrees = first_seg == begin.segno(seg)
            && history.begins_with_switch(switch.lsn, TimelineId(switch.from), tli, seg);
        if agrees {
            Ok(())
        } else {
            disagree(format!(
                "{first} begins timeline {tli} at {} (from timeline {}), this history at {begin} (from timeline {})",
                switch.lsn,
                switch.from,
                history.timeline_at(Lsn(begin.0.saturating_sub(1)))
            ))
        }
    }
}

/// The earliest segment (or `.partial`) of `tli` the listing holds.
fn earliest_of(
    listing: &Listing,
    tli: TimelineId,
    seg: u32,
) -> Option<(WalFileName, crate::repo::Sha256Sum)> {
    listing
        .archived()
        .filter(|(n, _)| {
            n.timeline() == tli && matches!(n.kind(), WalFileKind::Segment | WalFileKind::Partial)
        })
        .min_by_key(|(n, _)| (n.segno(seg), n.kind() == WalFileKind::Partial))
        .map(|(n, sha)| (n.clone(), sha))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::walscan::TimelineSwitch;

    const SEG: u32 = 1 << 20;

    fn history(tli: u32, text: &str) -> ArchivedHistory {
        ArchivedHistory {
            history: parse_history(TimelineId(tli), text).unwrap(),
            archived_at: None,
        }
    }

    fn histories(list: &[(u32, &str)]) -> Histories {
        Histories {
            by_timeline: list
                .iter()
                .map(|(t, h)| (TimelineId(*t), history(*t, h)))
                .collect(),
        }
    }

    #[test]
    fn finds_the_first_fork_and_the_newest_timeline() {
        // 028_pitr_timelines.pl: timeline 3 branched off timeline 2's
        // history before timeline 2 began.
        let h = histories(&[
            (2, "1\t0/3018CE0\tno recovery target specified\n"),
            (
                3,
                "1\t0/3018CE0\tno recovery target specified\n\n2\t0/3018C78\tat restore point \"rp\"\n",
            ),
            (5, "1\t0/3000000\tx\n4\t0/5000000\tx\n"),
        ]);
        let f1 = h.fork_of(TimelineId(1)).unwrap();
        assert_eq!(
            (f1.at, f1.to, f1.file),
            ("0/3000000".parse().unwrap(), TimelineId(4), TimelineId(5))
        );
        let f2 = h.fork_of(TimelineId(2)).unwrap();
        assert_eq!(
            (f2.at, f2.to, f2.file),
            ("0/3018C78".parse().unwrap(), TimelineId(3), TimelineId(3))
        );
        assert_eq!(h.fork_of(TimelineId(3)), None);
        assert_eq!(
            f2.describe(),
            "timeline 2 continues past 0/3018C78, where timeline 3 branched off (00000003.history)"
        );
        // findNewestTimeLine stops at the gap (4 has no history file).
        assert_eq!(h.newest_from(TimelineId(1)), TimelineId(3));
        assert_eq!(h.newest_from(TimelineId(4)), TimelineId(5));
        assert_eq!(h.newest_from(TimelineId(5)), TimelineId(5));
    }

    #[test]
    fn only_full_segments_of_the_left_timeline_past_the_fork_count() {
        let fork = Fork {
            timeline: TimelineId(1),
            at: "0/B000D0".parse().unwrap(),
            to: TimelineId(2),
            file: TimelineId(2),
            archived_at: None,
        };
        let seg = |tli, n| WalFileName::for_segment(TimelineId(tli), SegmentNo(n), SEG);
        let ending = |end: &str| WalSummary {
            end_of_wal: Some(end.parse().unwrap()),
            timeline_switches: vec![TimelineSwitch::default()],
            ..Default::default()
        };
        // The segment holding the fork: past it only with a record after it.
        assert!(!fork.passed_by(&seg(1, 0xB), Some(&ending("0/B000D0")), SEG));
        assert!(fork.passed_by(&seg(1, 0xB), Some(&ending("0/B00110")), SEG));
        // Without a summary, by where the segment starts.
        assert!(!fork.passed_by(&seg(1, 0xB), None, SEG));
        assert!(fork.passed_by(&seg(1, 0xC), None, SEG));
        assert!(!fork.passed_by(&seg(1, 0xA), None, SEG));
        // Another timeline, a .partial: never.
        assert!(!fork.passed_by(&seg(2, 0xC), None, SEG));
        let partial = WalFileName::parse("00000001000000000000000B.partial").unwrap();
        assert!(!fork.passed_by(&partial, Some(&ending("0/B00110")), SEG));
    }

    #[test]
    fn the_replay_path_follows_the_028_history_as_postgresql_reads_files() {
        use crate::repo::backend::ObjectMeta;
        use crate::repo::layout;
        use crate::repo::Sha256Sum;
        let h = history(
            3,
            "1\t0/3018CE0\tno recovery target specified\n\n2\t0/3018C78\tat restore point \"rp\"\n",
        )
        .history;
        let seg16 = 16 << 20;
        let name = |s: &str| WalFileName::parse(s).unwrap();
        let listing = |names: &[&str]| {
            Listing::from_objects(
                names
                    .iter()
                    .map(|n| ObjectMeta {
                        key: layout::wal_data_key("s", "15-1", &name(n), &Sha256Sum([1; 32])),
                        size: 1,
                        modified: None,
                    })
                    .collect(),
            )
        };
        let archived = [
            "000000010000000000000002",
            "000000010000000000000003.partial",
            "000000020000000000000003",
            "000000030000000000000003",
            "000000030000000000000004",
            "000000020000000000000004",
        ];
        // XLogFileReadAnyTLI: segment 3 from timeline 3 (newest first),
        // then never back to an older timeline.
        let path = listing(&archived).replay_path(&h, SegmentNo(2), seg16);
        assert_eq!(
            path,
            [
                name("000000010000000000000002"),
                name("000000030000000000000003"),
                name("000000030000000000000004"),
            ]
        );
        // Without timeline 3's copy of segment 3, PostgreSQL would open
        // timeline 2's (it lists timeline 2 as beginning in segment 3), and
        // then stays at timeline 2 or newer.
        let path = listing(&archived[..3]).replay_path(&h, SegmentNo(2), seg16);
        assert_eq!(
            path,
            [
                name("000000010000000000000002"),
                name("000000020000000000000003"),
            ]
        );
    }
}
