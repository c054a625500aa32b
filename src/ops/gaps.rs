//! What a repository missed: the WAL its gap markers name (with several
//! repositories, files dropped from its archive-push queue — see
//! `spool::Queue` and `repo::archive`), as runs of consecutive files, for
//! `info`, `check` and `verify`. Never silent: pgBackRest drops WAL past
//! its `archive-push-queue-max` without `info` showing it.

use serde::Serialize;

use crate::catalog::GapRow;
use crate::error::Result;
use crate::pg::{WalFileKind, WalFileName};
use crate::repo::archive::{Archive, Listing};
use crate::repo::Fetched;

/// A run of consecutive files this repository missed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DroppedRun {
    pub timeline: u32,
    pub from: String,
    pub to: String,
    pub files: u64,
    /// When and why its first file was dropped (from its gap marker).
    pub dropped_at: Option<String>,
    pub reason: Option<String>,
}

impl DroppedRun {
    pub fn describe(&self) -> String {
        let range = if self.from == self.to {
            self.from.clone()
        } else {
            format!("{} … {} ({} files)", self.from, self.to, self.files)
        };
        format!(
            "{range} missed by this repository: dropped from its archive-push queue{}{}",
            self.dropped_at
                .as_deref()
                .map(|t| format!(" at {t}"))
                .unwrap_or_default(),
            self.reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default()
        )
    }
}

/// The files `listing` says this repository missed, as runs: consecutive
/// segments of one timeline together, any other file alone.
pub async fn dropped_runs(archive: &Archive, listing: &Listing) -> Result<Vec<DroppedRun>> {
    let seg = archive.db().wal_segment_size;
    let names: Vec<&WalFileName> = listing.dropped().collect();
    let mut out = Vec::new();
    for run in runs(&names, seg) {
        let first = run[0];
        let last = run[run.len() - 1];
        let (dropped_at, reason) = match archive.read_gap(first).await? {
            Fetched::Found(m) => (Some(m.dropped_at), Some(m.reason)),
            Fetched::Missing => (None, None),
            Fetched::Damaged(why) => (None, Some(format!("marker unreadable: {why}"))),
        };
        out.push(DroppedRun {
            timeline: first.timeline().0,
            from: first.as_str().to_string(),
            to: last.as_str().to_string(),
            files: run.len() as u64,
            dropped_at,
            reason,
        });
    }
    Ok(out)
}

/// For the catalog: one row per file missed, dated by its run's marker.
pub fn rows(runs: &[DroppedRun], listing: &Listing) -> Vec<GapRow> {
    listing
        .dropped()
        .map(|n| {
            let run = runs.iter().find(|r| {
                r.timeline == n.timeline().0
                    && r.from.as_str() <= n.as_str()
                    && n.as_str() <= r.to.as_str()
            });
            GapRow {
                name: n.as_str().to_string(),
                dropped_at: run.and_then(|r| r.dropped_at.clone()).unwrap_or_default(),
                reason: run.and_then(|r| r.reason.clone()).unwrap_or_default(),
            }
        })
        .collect()
}

/// `names` (in name order) grouped into runs of consecutive segments of
/// one timeline; any other file is a run of its own.
fn runs<'a>(names: &[&'a WalFileName], seg: u32) -> Vec<Vec<&'a WalFileName>> {
    let mut out: Vec<Vec<&WalFileName>> = Vec::new();
    for &n in names {
        let extends = out.last().and_then(|r| r.last()).is_some_and(|p| {
            p.kind() == WalFileKind::Segment
                && n.kind() == WalFileKind::Segment
                && p.timeline() == n.timeline()
                && p.segno(seg).map(|s| s.next()) == n.segno(seg)
        });
        match out.last_mut() {
            Some(r) if extends => r.push(n),
            _ => out.push(vec![n]),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_segments_of_one_timeline_are_one_run() {
        let names: Vec<WalFileName> = [
            "000000010000000000000003",
            "000000010000000000000004",
            "000000010000000000000005",
            "000000010000000000000005.partial",
            "000000010000000000000007",
            "0000000100000000000000FF",
            "000000010000000100000000",
            "000000020000000100000001",
        ]
        .iter()
        .map(|s| WalFileName::parse(s).unwrap())
        .collect();
        let refs: Vec<&WalFileName> = names.iter().collect();
        let got: Vec<(String, usize)> = runs(&refs, 16 << 20)
            .into_iter()
            .map(|r| (r[0].as_str().to_string(), r.len()))
            .collect();
        assert_eq!(
            got,
            [
                ("000000010000000000000003".to_string(), 3),
                ("000000010000000000000005.partial".to_string(), 1),
                ("000000010000000000000007".to_string(), 1),
                // 16 MiB segments: 0x…FF is followed by the next log.
                ("0000000100000000000000FF".to_string(), 2),
                ("000000020000000100000001".to_string(), 1),
            ]
        );
    }
}
