//! Timeline history files (`00000002.history`): read as `readTimeLineHistory`
//! reads them and looked up as PostgreSQL's recovery looks them up
//! (`tliInHistory`, `tliOfPointInHistory`, `tliSwitchPoint` in timeline.c;
//! `XLogFileReadAnyTLI` and `findNewestTimeLine` in xlogrecovery.c).
//!
//! A history file of timeline N lists every ancestor of N, oldest first, one
//! per line: `parentTLI<TAB>switchpoint<TAB>reason`, where the switch point
//! is the LSN at which the *next* timeline in the list (N itself, for the last
//! line) branched off. Blank lines and `#` comments are allowed.
//!
//! PostgreSQL requires only that the timeline IDs increase. Switch points
//! need not: a point-in-time recovery along timeline 2 that stops before
//! timeline 2's own switch point writes a history whose last switch point
//! is before the one above it. PostgreSQL's recovery test
//! 028_pitr_timelines.pl makes exactly that, `1 0/3018CE0` then
//! `2 0/3018C78 at restore point "rp"` for timeline 3, and recovers along
//! it. So every lookup below follows PostgreSQL's: it walks the timelines
//! newest first, each with the `[begin, end)` that its own line and the line
//! before give it, and assumes nothing about the order of switch points.

use std::fmt::Write as _;

use super::{Lsn, PgError, Result, SegmentNo, TimelineId};
use crate::pg::wal::LONG_PAGE_HEADER_SIZE;
use crate::pg::WAL_BLOCK_SIZE;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HistoryEntry {
    /// An ancestor timeline.
    pub parent: TimelineId,
    /// Where the ancestor was left: the first LSN of the timeline after it
    /// in this history.
    pub switch_point: Lsn,
    /// Why the timeline was switched ("no recovery target specified",
    /// "before 2024-01-01 ...", "at restore point ..."); free text.
    pub reason: String,
}

/// The ancestry of one timeline.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TimelineHistory {
    pub timeline: TimelineId,
    /// Ancestors, oldest first, as the file lists them; empty for a timeline
    /// with no history file (timeline 1).
    pub entries: Vec<HistoryEntry>,
}

/// One element of the list `readTimeLineHistory` returns
/// (`TimeLineHistoryEntry`): a timeline with the `begin` its parent's line
/// gives it ([`Lsn::INVALID`] for the oldest) and the `end` its own line
/// gives it (`None` for the history's own timeline). With switch points out
/// of order, `begin` can be after `end`: no position is then that
/// timeline's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimelineSpan {
    pub timeline: TimelineId,
    pub begin: Lsn,
    pub end: Option<Lsn>,
}

impl TimelineSpan {
    /// The test `tliOfPointInHistory` applies to each entry.
    fn holds(&self, lsn: Lsn) -> bool {
        (!self.begin.is_valid() || self.begin <= lsn) && self.end.is_none_or(|end| lsn < end)
    }
}

/// Where a history leaves one of its ancestors (`tliSwitchPoint`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Departure {
    /// The ancestor's switch point in this history.
    pub at: Lsn,
    /// The timeline listed after it (`*nextTLI`).
    pub to: TimelineId,
}

/// `SizeOfXLogShortPHD`: MAXALIGN(sizeof(XLogPageHeaderData)), xlog_internal.h.
const SHORT_PAGE_HEADER_SIZE: u64 = 24;

/// Parses the history file of timeline `tli` as `readTimeLineHistory` does.
///
/// Each line that is not blank or a comment is read like its
/// `sscanf(line, "%u\t%X/%X")`: a timeline ID, any run of white space (or
/// none), the switch point's two hex halves around a `/` (white space is
/// allowed before either half), and the rest of the line is the reason.
/// Timeline IDs must increase strictly and stay below `tli`; switch points
/// may come in any order (see the module comment).
///
/// Stricter than `sscanf` only where PostgreSQL never writes such a file and
/// the C reader would take garbage: a sign or an overflowing number, and
/// timeline 0, are refused.
pub fn parse_history(tli: TimelineId, text: &str) -> Result<TimelineHistory> {
    let mut entries: Vec<HistoryEntry> = Vec::new();
    let mut last_line = 0;
    for (i, raw_line) in text.lines().enumerate() {
        let line_no = i + 1;
        let err = |reason: String| PgError::InvalidHistory {
            line: line_no,
            reason,
        };
        let line = raw_line.trim_start_matches(is_c_space);
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (digits, rest) = take_while(line, |c| c.is_ascii_digit());
        if digits.is_empty() {
            return Err(err(format!(
                "expected a numeric timeline ID, found {:?}",
                shorten(first_field(line))
            )));
        }
        let parent = match digits.parse::<u32>() {
            Ok(0) => return Err(err("timeline 0 does not exist".to_string())),
            Ok(v) => TimelineId(v),
            Err(_) => return Err(err(format!("timeline ID {digits} is too large"))),
        };
        let rest = rest.trim_start_matches(is_c_space);
        if rest.is_empty() {
            return Err(err(
                "expected a write-ahead log switch point location after the timeline ID"
                    .to_string(),
            ));
        }
        let Some((switch_point, rest)) = scan_lsn(rest) else {
            return Err(err(format!(
                "switch point {:?} is not an LSN like 0/3000000",
                shorten(first_field(rest))
            )));
        };
        if let Some(last) = entries.last() {
            if parent <= last.parent {
                return Err(err(format!(
                    "timeline IDs must be in increasing sequence ({parent} follows {})",
                    last.parent
                )));
            }
        }
        entries.push(HistoryEntry {
            parent,
            switch_point,
            reason: rest.trim_matches(is_c_space).to_string(),
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

/// C's `isspace` in the C locale (Rust's whitespace tests differ: `\v`).
fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

fn take_while(s: &str, f: impl Fn(char) -> bool) -> (&str, &str) {
    let end = s.find(|c: char| !f(c)).unwrap_or(s.len());
    s.split_at(end)
}

/// `%X/%X` at the start of `s`, each half after optional white space, as
/// `sscanf` reads it; the LSN and what follows it.
fn scan_lsn(s: &str) -> Option<(Lsn, &str)> {
    let (hi, rest) = scan_hex32(s)?;
    let (lo, rest) = scan_hex32(rest.strip_prefix('/')?)?;
    Some((Lsn((hi << 32) | lo), rest))
}

/// One `%X` into 32 bits: optional white space, then hex digits.
fn scan_hex32(s: &str) -> Option<(u64, &str)> {
    let (hex, rest) = take_while(s.trim_start_matches(is_c_space), |c| c.is_ascii_hexdigit());
    let v = u32::from_str_radix(hex, 16).ok()?;
    Some((u64::from(v), rest))
}

/// The first white-space-separated field of `s`, for error messages.
fn first_field(s: &str) -> &str {
    take_while(s, |c| !is_c_space(c)).0
}

fn shorten(s: &str) -> String {
    s.chars().take(40).collect()
}

/// The timeline PostgreSQL's recovery targets when asked for `latest`
/// (`findNewestTimeLine`): from `start` (the timeline of pg_control), probe
/// for the history file of each next timeline and stop at the first one
/// missing. A gap ends the search: with 2 and 4 archived but not 3, the
/// answer is 2. `exists` is asked about timelines above `start` only.
pub fn newest_timeline(
    start: TimelineId,
    mut exists: impl FnMut(TimelineId) -> bool,
) -> TimelineId {
    let mut newest = start;
    while let Some(probe) = newest.0.checked_add(1).map(TimelineId) {
        if !exists(probe) {
            break;
        }
        newest = probe;
    }
    newest
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

    /// Is `tli` this timeline or one of its ancestors (`tliInHistory`)?
    pub fn contains(&self, tli: TimelineId) -> bool {
        tli == self.timeline || self.entries.iter().any(|e| e.parent == tli)
    }

    /// The list `readTimeLineHistory` builds, newest first: this timeline,
    /// beginning at the last switch point, then each ancestor with the
    /// `[begin, end)` its lines give it.
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
        out.reverse();
        out
    }

    fn span_of(&self, tli: TimelineId) -> Option<TimelineSpan> {
        self.spans().into_iter().find(|s| s.timeline == tli)
    }

    /// The timeline of this history that WAL position `lsn` belongs to
    /// (`tliOfPointInHistory`): the newest timeline whose `[begin, end)`
    /// holds it. A switch point belongs to the new timeline. Every position
    /// finds one: the newest timeline holds everything from its begin on,
    /// and below that some older line always reaches.
    pub fn timeline_at(&self, lsn: Lsn) -> TimelineId {
        self.spans()
            .iter()
            .find(|s| s.holds(lsn))
            .map(|s| s.timeline)
            // Unreachable (see above); PostgreSQL raises "timeline history
            // was not contiguous" here.
            .unwrap_or(self.timeline)
    }

    /// Where this history leaves `tli`, and for which timeline
    /// (`tliSwitchPoint`); `None` for this history's own timeline, which it
    /// does not leave, and for timelines not in it.
    pub fn departure(&self, tli: TimelineId) -> Option<Departure> {
        let mut next = None;
        for s in self.spans() {
            if s.timeline == tli {
                return Some(Departure {
                    at: s.end?,
                    to: next?,
                });
            }
            next = Some(s.timeline);
        }
        None
    }

    /// The switch point of `tli` in this history: the LSN its line gives
    /// ([`departure`](Self::departure)`.at`).
    pub fn end_of(&self, tli: TimelineId) -> Option<Lsn> {
        self.departure(tli).map(|d| d.at)
    }

    /// The timeline `tli` branched off, within this history; `None` for the
    /// oldest timeline and for timelines not in this history.
    pub fn parent_of(&self, tli: TimelineId) -> Option<TimelineId> {
        let spans = self.spans();
        let i = spans.iter().position(|s| s.timeline == tli)?;
        spans.get(i + 1).map(|s| s.timeline)
    }

    /// The LSN where `tli` begins (the switch point of its parent's line);
    /// `None` for the oldest timeline and for timelines not in this history.
    pub fn switch_point_into(&self, tli: TimelineId) -> Option<Lsn> {
        Some(self.span_of(tli)?.begin).filter(|b| b.is_valid())
    }

    /// The WAL that recovery along this history takes as `tli`'s: the
    /// positions [`timeline_at`](Self::timeline_at) gives to `tli`, as
    /// `[begin, end)` (`begin` [`Lsn::INVALID`] for "from the start", `end`
    /// `None` for "no end"). It ends where any later timeline's range
    /// begins, which is before `tli`'s own switch point when a later line's
    /// switch point is lower. `None` when no position is `tli`'s (its
    /// begin is not before that end) or `tli` is not in this history.
    pub fn range_of(&self, tli: TimelineId) -> Option<(Lsn, Option<Lsn>)> {
        let span = self.span_of(tli)?;
        // Later timelines together hold everything from the lowest switch
        // point from `tli`'s own on: each begins where the one before it
        // ends, and the newest has no end.
        let i = self.entries.iter().position(|e| e.parent == tli);
        let end = i.and_then(|i| self.entries[i..].iter().map(|e| e.switch_point).min());
        match end {
            Some(end) if span.begin.is_valid() && span.begin >= end => None,
            _ => Some((span.begin, end)),
        }
    }

    /// Does recovery along this history replay all of `[from, to)` as
    /// `tli`'s WAL? PostgreSQL refuses to start when a backup's checkpoint
    /// is not on its own timeline in the requested timeline's history
    /// ("requested timeline N is not a child of this server's history",
    /// `InitWalRecovery`), and a backup whose WAL up to its end leaves that
    /// timeline never becomes consistent: the end-of-backup record is not on
    /// the path. An empty range asks about `from` alone.
    pub fn holds(&self, tli: TimelineId, from: Lsn, to: Lsn) -> bool {
        // The positions of one timeline are one run (see range_of), so its
        // two ends decide.
        self.timeline_at(from) == tli && (to <= from || self.timeline_at(Lsn(to.0 - 1)) == tli)
    }

    /// The timelines whose file for segment `segno` recovery along this
    /// history asks for, in the order PostgreSQL tries them
    /// (`XLogFileReadAnyTLI`): newest first, skipping each timeline whose
    /// begin lies in a later segment. The caller stops at a timeline older
    /// than the one of the last file read (`curFileTLI`): recovery never goes
    /// back to an older timeline's files. The first is the one that normally
    /// exists: the segment holding a switch point is read from the new
    /// timeline, whose copy starts with the old timeline's pages.
    pub fn timelines_for_segment(&self, segno: SegmentNo, seg_size: u32) -> Vec<TimelineId> {
        self.spans()
            .iter()
            .filter(|s| !s.begin.is_valid() || s.begin.segno(seg_size) <= segno)
            .map(|s| s.timeline)
            .collect()
    }

    /// Is a record that switches from timeline `from` to `to` at `lsn` (an
    /// end-of-recovery record or shutdown checkpoint) the one that began
    /// this history's own timeline? The server that wrote the history file
    /// wrote that record first on the new timeline, at the switch point (the
    /// end of the last record replayed; past the page header when that is
    /// on a page boundary), naming as previous timeline the one replay was
    /// on there (`PrevTimeLineID`, the last record's timeline, which need
    /// not be the parent the file lists). A timeline-N segment whose switch
    /// record disagrees belongs to another history of timeline N.
    pub fn begins_with_switch(
        &self,
        lsn: Lsn,
        from: TimelineId,
        to: TimelineId,
        seg_size: u32,
    ) -> bool {
        let Some(start) = self.entries.last().map(|e| e.switch_point) else {
            return false;
        };
        let header = if start.0 % u64::from(WAL_BLOCK_SIZE) != 0 {
            0
        } else if start.segment_offset(seg_size) == 0 {
            LONG_PAGE_HEADER_SIZE as u64
        } else {
            SHORT_PAGE_HEADER_SIZE
        };
        to == self.timeline
            && start.is_valid()
            && from == self.timeline_at(Lsn(start.0 - 1))
            && start.checked_add(header) == Some(lsn)
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
mod tests;
