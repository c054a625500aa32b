//! Timeline history files (`00000002.history`), as written by
//! `writeTimeLineHistory` and read by `readTimeLineHistory` (timeline.c).
//!
//! A history file of timeline N lists every ancestor of N, oldest first, one
//! per line: `parentTLI<TAB>switchpoint<TAB>reason`, where the switch point
//! is the LSN at which the *next* timeline in the list (N itself, for the last
//! line) branched off the parent. Blank lines and `#` comments are allowed.

use std::fmt::Write as _;

use super::{Lsn, PgError, Result, SegmentNo, TimelineId};

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HistoryEntry {
    /// An ancestor timeline.
    pub parent: TimelineId,
    /// Where the ancestor ends: the first LSN of the timeline after it.
    pub switch_point: Lsn,
    /// Why the timeline was switched ("no recovery target specified",
    /// "before 2024-01-01 ...", "at restore point ..."); free text.
    pub reason: String,
}

/// The ancestry of one timeline.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TimelineHistory {
    pub timeline: TimelineId,
    /// Ancestors, oldest first; empty for a timeline with no history file
    /// (timeline 1).
    pub entries: Vec<HistoryEntry>,
}

/// The range of WAL one timeline of a history covers
/// (`TimeLineHistoryEntry`): `begin` inclusive ([`Lsn::INVALID`] for the
/// oldest), `end` exclusive (`None` for the newest, still open).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimelineSpan {
    pub timeline: TimelineId,
    pub begin: Lsn,
    pub end: Option<Lsn>,
}

/// Parses the history file of timeline `tli` like `readTimeLineHistory`:
/// parents must increase strictly and stay below `tli`; fields may be
/// separated by tabs or spaces; the reason is the rest of the line. Switch
/// points must not decrease (a timeline cannot end before it begins).
pub fn parse_history(tli: TimelineId, text: &str) -> Result<TimelineHistory> {
    let mut entries: Vec<HistoryEntry> = Vec::new();
    let mut last_line = 0;
    for (i, raw_line) in text.lines().enumerate() {
        let line_no = i + 1;
        let err = |reason: String| PgError::InvalidHistory {
            line: line_no,
            reason,
        };
        let line = raw_line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (tli_text, rest) = split_field(line);
        if tli_text.is_empty() || !tli_text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err(format!(
                "expected a numeric timeline ID, found {:?}",
                shorten(tli_text)
            )));
        }
        let parent = match tli_text.parse::<u32>() {
            Ok(0) => return Err(err("timeline 0 does not exist".to_string())),
            Ok(v) => TimelineId(v),
            Err(_) => return Err(err(format!("timeline ID {tli_text} is too large"))),
        };
        let (lsn_text, rest) = split_field(rest);
        if lsn_text.is_empty() {
            return Err(err(
                "expected a write-ahead log switch point location after the timeline ID"
                    .to_string(),
            ));
        }
        let switch_point: Lsn = lsn_text.parse().map_err(|_| {
            err(format!(
                "switch point {:?} is not an LSN like 0/3000000",
                shorten(lsn_text)
            ))
        })?;
        if let Some(last) = entries.last() {
            if parent <= last.parent {
                return Err(err(format!(
                    "timeline IDs must be in increasing sequence ({parent} follows {})",
                    last.parent
                )));
            }
            if switch_point < last.switch_point {
                return Err(err(format!(
                    "switch point {switch_point} is before the previous one, {}",
                    last.switch_point
                )));
            }
        }
        entries.push(HistoryEntry {
            parent,
            switch_point,
            reason: rest.trim().to_string(),
        });
        last_line = line_no;
    }
    if let Some(last) = entries.last() {
        if last.parent >= tli {
            return Err(PgError::InvalidHistory {
                line: last_line,
                reason: format!(
                    "timeline IDs must be less than the history's own timeline: {} is not below {tli}",
                    last.parent
                ),
            });
        }
    }
    Ok(TimelineHistory {
        timeline: tli,
        entries,
    })
}

/// The first whitespace-separated field, and the rest after the whitespace.
fn split_field(s: &str) -> (&str, &str) {
    match s.find(|c: char| c.is_ascii_whitespace()) {
        Some(i) => (&s[..i], s[i..].trim_start_matches([' ', '\t'])),
        None => (s, ""),
    }
}

fn shorten(s: &str) -> String {
    s.chars().take(40).collect()
}

impl TimelineHistory {
    /// The history of a timeline without ancestors (timeline 1, which has no
    /// history file).
    pub fn root(tli: TimelineId) -> TimelineHistory {
        TimelineHistory {
            timeline: tli,
            entries: Vec::new(),
        }
    }

    /// Is `tli` this timeline or one of its ancestors?
    pub fn contains(&self, tli: TimelineId) -> bool {
        tli == self.timeline || self.entries.iter().any(|e| e.parent == tli)
    }

    /// Ancestors then this timeline, oldest first, with the WAL each covers.
    pub fn spans(&self) -> Vec<TimelineSpan> {
        let mut out = Vec::with_capacity(self.entries.len() + 1);
        let mut begin = Lsn::INVALID;
        for e in &self.entries {
            out.push(TimelineSpan {
                timeline: e.parent,
                begin,
                end: Some(e.switch_point),
            });
            begin = e.switch_point;
        }
        out.push(TimelineSpan {
            timeline: self.timeline,
            begin,
            end: None,
        });
        out
    }

    fn span_of(&self, tli: TimelineId) -> Option<(usize, TimelineSpan)> {
        self.spans()
            .into_iter()
            .enumerate()
            .find(|(_, s)| s.timeline == tli)
    }

    /// The timeline `tli` branched off, within this history; `None` for the
    /// oldest timeline and for timelines not in this history.
    pub fn parent_of(&self, tli: TimelineId) -> Option<TimelineId> {
        let (i, _) = self.span_of(tli)?;
        i.checked_sub(1).map(|p| self.entries[p].parent)
    }

    /// The LSN where `tli` begins (the switch point into it); `None` for the
    /// oldest timeline and for timelines not in this history.
    pub fn switch_point_into(&self, tli: TimelineId) -> Option<Lsn> {
        let (i, span) = self.span_of(tli)?;
        (i > 0).then_some(span.begin)
    }

    /// The LSN where `tli` was left for its child; `None` for this history's
    /// own (newest) timeline and for timelines not in this history.
    pub fn end_of(&self, tli: TimelineId) -> Option<Lsn> {
        self.span_of(tli)?.1.end
    }

    /// The timeline of this history holding WAL position `lsn`
    /// (`tliOfPointInHistory`): a switch point belongs to the new timeline.
    pub fn timeline_at(&self, lsn: Lsn) -> TimelineId {
        self.entries
            .iter()
            .find(|e| lsn < e.switch_point)
            .map(|e| e.parent)
            .unwrap_or(self.timeline)
    }

    /// The timelines whose file for segment `segno` recovery along this
    /// history asks for, in the order PostgreSQL tries them
    /// (`XLogFileReadAnyTLI`): newest first, skipping timelines that begin
    /// after the segment. The first is the one that normally exists: the
    /// segment holding a switch point is read from the new timeline, whose
    /// copy starts with the old timeline's pages.
    pub fn timelines_for_segment(&self, segno: SegmentNo, seg_size: u32) -> Vec<TimelineId> {
        self.spans()
            .iter()
            .rev()
            .filter(|s| !s.begin.is_valid() || s.begin.segno(seg_size) <= segno)
            .map(|s| s.timeline)
            .collect()
    }

    /// The file text PostgreSQL would write for this history
    /// (`writeTimeLineHistory`: one "parent\tX/X\treason\n" line per entry).
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for e in &self.entries {
            // Writing to a String cannot fail.
            let _ = writeln!(s, "{}\t{}\t{}", e.parent, e.switch_point, e.reason);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::testdata;

    const MIB: u32 = 1 << 20;

    fn lsn(s: &str) -> Lsn {
        s.parse().unwrap()
    }

    #[test]
    fn parses_the_fixture_written_at_promotion() {
        let facts = testdata::facts("pg15");
        let text = testdata::read_text("pg15/wal/00000002.history");
        let h = parse_history(TimelineId(2), &text).unwrap();
        let switch = lsn(facts["promotion"]["switch_point"].as_str().unwrap());
        assert_eq!(
            h.entries,
            [HistoryEntry {
                parent: TimelineId(1),
                switch_point: switch,
                reason: "no recovery target specified".to_string(),
            }]
        );
        assert_eq!(h.to_text(), text);
        assert_eq!(h.parent_of(TimelineId(2)), Some(TimelineId(1)));
        assert_eq!(h.parent_of(TimelineId(1)), None);
        assert_eq!(h.switch_point_into(TimelineId(2)), Some(switch));
        assert_eq!(h.end_of(TimelineId(1)), Some(switch));
        assert_eq!(h.end_of(TimelineId(2)), None);
        // The segment holding the switch point is read from timeline 2 (the
        // fixture's 00000002 file of that segment), then from timeline 1.
        let segno = switch.segno(MIB);
        assert_eq!(
            h.timelines_for_segment(segno, MIB),
            [TimelineId(2), TimelineId(1)]
        );
        assert_eq!(
            facts["promotion"]["first_new_timeline_segment"],
            crate::pg::WalFileName::for_segment(TimelineId(2), segno, MIB).as_str()
        );
        assert_eq!(
            h.timelines_for_segment(segno.prev().unwrap(), MIB),
            [TimelineId(1)]
        );
        assert_eq!(h.timeline_at(switch), TimelineId(2));
        assert_eq!(h.timeline_at(Lsn(switch.0 - 1)), TimelineId(1));
    }

    const THREE: &str = "# written by hand\n\
                         1\t0/3000000\tno recovery target specified\n\
                         \n\
                         \x20 2\t0/5000060\tbefore 2024-01-01 00:00:00+00\n";

    #[test]
    fn follows_a_longer_history() {
        let h = parse_history(TimelineId(4), THREE).unwrap();
        assert_eq!(h.entries.len(), 2);
        assert_eq!(h.entries[1].reason, "before 2024-01-01 00:00:00+00");
        assert_eq!(
            h.spans(),
            [
                TimelineSpan {
                    timeline: TimelineId(1),
                    begin: Lsn::INVALID,
                    end: Some(lsn("0/3000000"))
                },
                TimelineSpan {
                    timeline: TimelineId(2),
                    begin: lsn("0/3000000"),
                    end: Some(lsn("0/5000060"))
                },
                TimelineSpan {
                    timeline: TimelineId(4),
                    begin: lsn("0/5000060"),
                    end: None
                },
            ]
        );
        assert_eq!(h.parent_of(TimelineId(4)), Some(TimelineId(2)));
        assert_eq!(h.parent_of(TimelineId(2)), Some(TimelineId(1)));
        assert_eq!(
            h.parent_of(TimelineId(3)),
            None,
            "3 is not an ancestor of 4"
        );
        assert!(!h.contains(TimelineId(3)));
        assert!(h.contains(TimelineId(4)) && h.contains(TimelineId(1)));
        assert_eq!(h.switch_point_into(TimelineId(4)), Some(lsn("0/5000060")));
        assert_eq!(h.switch_point_into(TimelineId(2)), Some(lsn("0/3000000")));
        assert_eq!(h.switch_point_into(TimelineId(1)), None);
        assert_eq!(h.end_of(TimelineId(2)), Some(lsn("0/5000060")));
        assert_eq!(h.timeline_at(lsn("0/2FFFFFF")), TimelineId(1));
        assert_eq!(h.timeline_at(lsn("0/3000000")), TimelineId(2));
        assert_eq!(h.timeline_at(lsn("0/5000060")), TimelineId(4));
        let seg16 = 16 << 20;
        assert_eq!(
            h.timelines_for_segment(SegmentNo(2), seg16),
            [TimelineId(1)]
        );
        assert_eq!(
            h.timelines_for_segment(SegmentNo(3), seg16),
            [TimelineId(2), TimelineId(1)]
        );
        assert_eq!(
            h.timelines_for_segment(SegmentNo(5), seg16),
            [TimelineId(4), TimelineId(2), TimelineId(1)]
        );
        let root = TimelineHistory::root(TimelineId(1));
        assert_eq!(root.timeline_at(lsn("5/0")), TimelineId(1));
        assert_eq!(
            root.timelines_for_segment(SegmentNo(9), seg16),
            [TimelineId(1)]
        );
        assert_eq!(root.parent_of(TimelineId(1)), None);
        assert_eq!(root.to_text(), "");
    }

    #[test]
    fn accepts_what_readtimelinehistory_accepts() {
        let h = parse_history(TimelineId(2), "1 0/3000000\n").unwrap();
        assert_eq!(h.entries[0].reason, "");
        let h = parse_history(TimelineId(2), "1\t0/3000000\tr\r\n").unwrap();
        assert_eq!(h.entries[0].reason, "r");
        let h = parse_history(TimelineId(2), "").unwrap();
        assert!(h.entries.is_empty());
        // upper or lower case hex, as sscanf("%X") reads either
        let h = parse_history(TimelineId(2), "1\t0/3a00000\tx\n").unwrap();
        assert_eq!(h.entries[0].switch_point, lsn("0/3A00000"));
    }

    fn history_err(tli: u32, text: &str) -> String {
        parse_history(TimelineId(tli), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn rejects_malformed_files() {
        assert_eq!(
            history_err(2, "one\t0/3000000\tx\n"),
            "timeline history line 1: expected a numeric timeline ID, found \"one\""
        );
        assert_eq!(
            history_err(2, "\n1\n"),
            "timeline history line 2: expected a write-ahead log switch point location after the timeline ID"
        );
        assert_eq!(
            history_err(2, "1\t3000000\tx\n"),
            "timeline history line 1: switch point \"3000000\" is not an LSN like 0/3000000"
        );
        assert_eq!(
            history_err(3, "2\t0/3000000\tx\n1\t0/4000000\tx\n"),
            "timeline history line 2: timeline IDs must be in increasing sequence (1 follows 2)"
        );
        assert_eq!(
            history_err(3, "1\t0/3000000\tx\n1\t0/4000000\tx\n"),
            "timeline history line 2: timeline IDs must be in increasing sequence (1 follows 1)"
        );
        assert_eq!(
            history_err(3, "1\t0/5000000\tx\n2\t0/4000000\tx\n"),
            "timeline history line 2: switch point 0/4000000 is before the previous one, 0/5000000"
        );
        assert_eq!(
            history_err(2, "1\t0/3000000\tx\n2\t0/4000000\tx\n"),
            "timeline history line 2: timeline IDs must be less than the history's own timeline: 2 is not below 2"
        );
        assert!(history_err(2, "0\t0/3000000\tx\n").contains("timeline 0 does not exist"));
        assert!(history_err(2, "99999999999\t0/3000000\tx\n").contains("too large"));
        assert!(history_err(2, "-1\t0/3000000\tx\n").contains("numeric timeline ID"));
    }
}
