//! What a scan of one WAL segment found: [`WalSummary`] and its parts.
//! Callers store it as JSON, so every field has a default and JSON written
//! before a field was added still parses.

use crate::pg::Lsn;

use super::XactEnds;

/// The last commit or abort seen, or the first.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct XactMark {
    /// LSN of the commit or abort record.
    pub lsn: Lsn,
    /// The transaction (for COMMIT/ABORT PREPARED, the prepared one).
    pub xid: u32,
    /// `xact_time`, Unix microseconds.
    pub time_us: i64,
    pub commit: bool,
}

/// An `XLOG_RESTORE_POINT` record (`pg_create_restore_point`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RestorePoint {
    pub name: String,
    /// LSN of the record.
    pub lsn: Lsn,
    /// `rp_time`, Unix microseconds.
    pub time_us: i64,
    /// End of the record, MAXALIGNed: the LSN `pg_create_restore_point`
    /// returned.
    pub end: Lsn,
}

/// A record that starts a new timeline: `XLOG_END_OF_RECOVERY` (a promotion)
/// or an end-of-recovery shutdown checkpoint whose timelines differ.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TimelineSwitch {
    pub lsn: Lsn,
    pub from: u32,
    pub to: u32,
    /// Unix microseconds (a checkpoint's time has whole seconds only).
    pub time_us: Option<i64>,
}

/// What one WAL segment holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct WalSummary {
    /// Version of this summary's layout: [`SUMMARY_FORMAT`].
    pub format: u32,
    /// Records whose header starts in this file.
    pub records: u64,
    pub first_record: Option<Lsn>,
    /// End (MAXALIGNed) of the last record that starts here, lies wholly
    /// inside the file and passed its CRC check.
    pub end_of_wal: Option<Lsn>,
    pub commits: u64,
    pub aborts: u64,
    pub first_xact: Option<XactMark>,
    pub last_xact: Option<XactMark>,
    /// Every commit and abort record, for `--target-xid`. `None` in a
    /// summary written before pgvault kept them (format 1): which xids end
    /// in the segment is then unknown.
    pub xact_ends: Option<XactEnds>,
    pub restore_points: Vec<RestorePoint>,
    pub timeline_switches: Vec<TimelineSwitch>,
    /// LSN of the `XLOG_SWITCH` record that ends the segment early.
    pub xlog_switch: Option<Lsn>,
    /// Records not wholly inside this file: one continued from the previous
    /// segment, one going on into the next (or both, the same record).
    pub spanning: u32,
    pub crc_failures: Vec<Lsn>,
    /// Human-readable, one line each, with the LSN.
    pub problems: Vec<String>,
    /// `XLOG_OVERWRITE_CONTRECORD` records here: the LSN of the record each
    /// says was cut short by a crash and abandoned.
    pub overwritten_contrecords: Vec<Lsn>,
}

/// Layout version of [`WalSummary`].
/// 2: `xact_ends`.
pub const SUMMARY_FORMAT: u32 = 2;
