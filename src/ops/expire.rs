//! `expire`: apply retention. Delete old backups and the WAL that no kept
//! backup needs any more.
//!
//! What stays:
//! * `retention-full = N`: the newest N full backups;
//! * `retention-window = D`: every backup that ended inside the window, plus
//!   the newest one that ended before it — the one a restore to the
//!   window's oldest moment starts from. The window is measured back from
//!   the newest backup's stop time as the server reported it, never from
//!   the local clock; that keeps at least what the window needs.
//!   With both set, whatever either policy keeps stays.
//! * `retention-diff = N` (pgBackRest's word and rule): the newest N
//!   differential backups, full ones counted as differential; an older
//!   differential goes, with the incrementals built on it, even while its
//!   full stays — unless the window keeps it or a kept backup depends on
//!   it. Alone (no `retention-full`, no window) it keeps every full.
//!   Unset, a differential stays as long as its full.
//! * all WAL from the oldest kept backup's start on, on every timeline,
//!   and every timeline history file — per cluster of the stanza: after a
//!   `pg_upgrade`, the old cluster's WAL goes with its last backup.
//!
//! Deletion order keeps the repository valid if interrupted, and a re-run
//! finishes: a backup is marked as being expired, then its manifest goes
//! (it is no longer offered), then its data, the mark last; a WAL file's
//! claim goes before its data (a push of it again would simply rewrite
//! both).
//!
//! Expire also sweeps what killed or failed commands left behind, once it
//! is old enough that nothing can still be writing it: backup directories
//! without a manifest, temporary files, summaries without their content,
//! and the rest of an interrupted expire (see `repo::orphans`). A backup
//! whose manifest cannot be read is reported and kept: never deleted on a
//! guess.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::pg::{SegmentNo, WalFileKind};
use crate::repo::manifest::{BackupDir, BackupHeader, Backups, UnreadableManifest};
use crate::repo::orphans::{self, Orphan};
use crate::repo::{Deletion, Repository};

#[derive(Debug, Clone, Default)]
pub struct ExpireOptions {
    pub retention_full: Option<usize>,
    pub retention_window: Option<Duration>,
    pub retention_diff: Option<usize>,
    pub dry_run: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ExpireReport {
    pub dry_run: bool,
    pub kept: Vec<String>,
    pub expired: Vec<String>,
    /// WAL of the current cluster older than this segment (any timeline)
    /// is removed.
    pub wal_kept_from: Option<String>,
    pub wal_objects_removed: u64,
    /// WAL file names (segments, `.partial` and `.backup` files) removed.
    pub wal_files_removed: u64,
    /// Backups whose manifest could not be read: kept, and left out of
    /// every decision (`pgvault verify` says more).
    pub unreadable: Vec<UnreadableManifest>,
    /// What killed or failed commands left behind; those `removable` were
    /// removed (with `--dry-run`: would be).
    pub orphans: Vec<Orphan>,
}

/// Which backups stay, by the policies (indices into `all`, oldest first).
pub fn keep_set(all: &[BackupHeader], opts: &ExpireOptions) -> BTreeSet<usize> {
    let mut keep = BTreeSet::new();
    if all.is_empty() {
        return keep;
    }
    if let Some(n) = opts.retention_full {
        let fulls: Vec<usize> = (0..all.len())
            .filter(|&i| all[i].backup_type == "full")
            .collect();
        keep.extend(fulls.iter().rev().take(n.max(1)));
    } else if opts.retention_window.is_none() {
        // retention-diff alone: fulls are not its business.
        keep.extend((0..all.len()).filter(|&i| all[i].backup_type == "full"));
    }
    // Differentials past the newest N (fulls counted, as pgBackRest
    // counts them): they no longer stay with their full.
    let old_diffs: BTreeSet<&str> = match opts.retention_diff {
        Some(n) => {
            let counted: Vec<usize> = (0..all.len())
                .filter(|&i| matches!(all[i].backup_type.as_str(), "full" | "diff"))
                .collect();
            counted
                .iter()
                .rev()
                .skip(n.max(1))
                .filter(|&&i| all[i].backup_type == "diff")
                .map(|&i| all[i].label.as_str())
                .collect()
        }
        None => BTreeSet::new(),
    };
    if let Some(window) = opts.retention_window {
        let newest = all.iter().filter_map(BackupHeader::stop_time_utc).max();
        if let Some(newest) = newest {
            let edge = newest - chrono::Duration::from_std(window).unwrap_or(chrono::Duration::MAX);
            let mut before_edge = None;
            for (i, m) in all.iter().enumerate() {
                match m.stop_time_utc() {
                    Some(t) if t >= edge => {
                        keep.insert(i);
                    }
                    _ => before_edge = Some(i),
                }
            }
            keep.extend(before_edge);
        }
    }
    // Never expire everything.
    keep.insert(all.len() - 1);
    // A differential or incremental backup goes with its full backup (as
    // pgBackRest's retention-full does), and with its differential past
    // retention-diff; a kept one keeps every backup it takes files or
    // blocks from.
    for (i, h) in all.iter().enumerate() {
        let full = h.depends_on.last();
        let old_diff = std::iter::once(&h.label)
            .chain(&h.depends_on)
            .any(|l| old_diffs.contains(l.as_str()));
        if !old_diff && full.is_some_and(|f| keep.iter().any(|&k| &all[k].label == f)) {
            keep.insert(i);
        }
    }
    let needed: Vec<&String> = keep.iter().flat_map(|&k| &all[k].depends_on).collect();
    for (i, h) in all.iter().enumerate() {
        if needed.contains(&&h.label) {
            keep.insert(i);
        }
    }
    keep
}

pub async fn expire(
    repo: &Repository,
    catalog: Option<&Catalog>,
    opts: &ExpireOptions,
) -> Result<ExpireReport> {
    if opts.retention_full.is_none()
        && opts.retention_window.is_none()
        && opts.retention_diff.is_none()
    {
        return Err(Error::usage("no retention policy set").hint(
            "set retention-full (a count of full backups), retention-diff (of differential ones) and/or retention-window (e.g. 14d)",
        ));
    }
    if opts.dry_run {
        return expire_locked(repo, catalog, opts).await;
    }
    // Not while a backup runs: it may be between its data and its manifest.
    let lock = repo.lock("expire").await?;
    let result = expire_locked(repo, catalog, opts).await;
    lock.release().await?;
    result
}

async fn expire_locked(
    repo: &Repository,
    catalog: Option<&Catalog>,
    opts: &ExpireOptions,
) -> Result<ExpireReport> {
    let stanza = repo.require_stanza().await?;
    // The headers decide (from the catalog where it knows them); the full
    // listing says what to delete and what was left behind.
    let index = crate::ops::backups::index(repo, catalog).await?;
    let backups = Backups {
        dirs: repo.backup_dirs().await?,
        ..Backups::default()
    };
    if let Some(u) = index.unreadable.iter().find(|u| !u.corrupt) {
        // Its WAL needs are unknown to this version: deleting any could
        // break a backup that a newer pgvault restores.
        return Err(Error::repository(u.error.clone())
            .hint("run expire with the pgvault version that wrote that backup"));
    }
    for u in &index.unreadable {
        log::warn!("backup {} kept: {}", u.label, u.error);
    }
    let all = &index.headers;
    let keep = keep_set(all, opts);
    let kept: Vec<&BackupHeader> = keep.iter().map(|&i| &all[i]).collect();
    let expired: Vec<&BackupHeader> = (0..all.len())
        .filter(|i| !keep.contains(i))
        .map(|i| &all[i])
        .collect();

    // Per cluster of the stanza (one more per pg_upgrade), WAL before its
    // oldest kept backup's start is needed by nothing kept. A cluster from
    // before an upgrade with no backup kept needs none of its WAL; the
    // current one keeps all of its WAL until it has a backup.
    let current = stanza.current().id;
    let mut wal_keys = Deletion::default();
    let mut wal_names = 0u64;
    let mut wal_kept_from = None;
    let mut archives = Vec::new();
    for db in &stanza.dbs {
        let seg = db.wal_segment_size;
        let archive = repo.archive(db);
        let listing = archive.list().await?;
        let oldest = kept
            .iter()
            .filter(|m| m.db_id == db.id)
            .min_by_key(|m| m.start_lsn);
        let first: Option<SegmentNo> = match oldest {
            Some(m) => Some(m.start_lsn.segno(seg)),
            None if db.id == current => {
                archives.push((archive, listing));
                continue;
            }
            None => None, // everything before "no backup at all"
        };
        if db.id == current {
            wal_kept_from = oldest.zip(first).map(|(m, s)| {
                crate::pg::WalFileName::for_segment(m.timeline, s, seg)
                    .as_str()
                    .to_string()
            });
        }
        for (name, entry) in listing.entries() {
            // Timeline history files stay: they are tiny, and recovery to
            // any kept backup may need every one of them.
            if name.kind() == WalFileKind::History {
                continue;
            }
            if name
                .segno(seg)
                .is_some_and(|s| first.is_none_or(|first| s < first))
            {
                wal_names += 1;
                // Per name in the archive's order: claim first, content
                // last; all names together, phase by phase.
                wal_keys.merge(archive.keys_to_delete(name, entry));
            }
        }
        archives.push((archive, listing));
    }
    let listed: Vec<_> = archives.iter().map(|(a, l)| (a, l)).collect();
    let mut leftovers = orphans::find(repo, &backups, &listed, SystemTime::now()).await?;
    // A summary in expired WAL goes with it, counted there.
    let doomed: BTreeSet<&str> = wal_keys.keys().map(String::as_str).collect();
    leftovers.retain(|o| !o.keys().keys().all(|k| doomed.contains(k.as_str())));
    let report = ExpireReport {
        dry_run: opts.dry_run,
        kept: kept.iter().map(|m| m.label.clone()).collect(),
        expired: expired.iter().map(|m| m.label.clone()).collect(),
        wal_kept_from,
        wal_objects_removed: wal_keys.len() as u64,
        wal_files_removed: wal_names,
        unreadable: index.unreadable.clone(),
        orphans: leftovers,
    };
    if opts.dry_run {
        return Ok(report);
    }
    // Backups before the WAL they need: an interruption never leaves a
    // backup that is offered without its WAL.
    let dirs: Vec<&BackupDir> = backups
        .dirs
        .iter()
        .filter(|d| expired.iter().any(|m| m.label == d.label))
        .collect();
    repo.delete_backups(&dirs).await?;
    if let Some(cat) = catalog {
        let gone = expired.iter().map(|m| m.label.clone()).collect();
        cat.update_backups_best_effort(repo.stanza(), Vec::new(), gone)
            .await;
    }
    repo.delete_all(&wal_keys).await?;
    let removable: Vec<&Orphan> = report.orphans.iter().filter(|o| o.removable).collect();
    orphans::remove(repo, &removable).await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(label: &str, stop: &str) -> BackupHeader {
        crate::repo::manifest::test_manifest(label, 1, 0x100, stop).header
    }

    #[test]
    fn policies() {
        let all = vec![
            m("a", "2026-11-20T00:00:00Z"),
            m("b", "2026-11-22T00:00:00Z"),
            m("c", "2026-11-24T00:00:00Z"),
            m("d", "2026-11-26T00:00:00Z"),
        ];
        let full2 = ExpireOptions {
            retention_full: Some(2),
            ..Default::default()
        };
        assert_eq!(keep_set(&all, &full2), BTreeSet::from([2, 3]));
        // 3 days back from d (11-26): c is inside, b is the newest before
        // the edge (11-23) and is needed to recover to the edge.
        let win = ExpireOptions {
            retention_window: Some(Duration::from_secs(3 * 86400)),
            ..Default::default()
        };
        assert_eq!(keep_set(&all, &win), BTreeSet::from([1, 2, 3]));
        let both = ExpireOptions {
            retention_full: Some(1),
            retention_window: Some(Duration::from_secs(86400)),
            ..Default::default()
        };
        assert_eq!(keep_set(&all, &both), BTreeSet::from([2, 3]));
        assert_eq!(
            keep_set(
                &all,
                &ExpireOptions {
                    retention_full: Some(0),
                    ..Default::default()
                }
            ),
            BTreeSet::from([3])
        );
    }

    /// A kept incremental keeps its chain; incrementals go with their full.
    #[test]
    fn chains() {
        let on = |label: &str, stop: &str, kind: &str, deps: &[&str]| {
            let mut h = m(label, stop);
            h.backup_type = kind.into();
            h.reference = deps.first().map(|d| d.to_string());
            h.depends_on = deps.iter().map(|d| d.to_string()).collect();
            h
        };
        let all = vec![
            on("f1", "2026-11-20T00:00:00Z", "full", &[]),
            on("i1", "2026-11-21T00:00:00Z", "incr", &["f1"]),
            on("d1", "2026-11-22T00:00:00Z", "diff", &["f1"]),
            on("i2", "2026-11-23T00:00:00Z", "incr", &["d1", "f1"]),
            on("f2", "2026-11-24T00:00:00Z", "full", &[]),
            on("i3", "2026-11-25T00:00:00Z", "incr", &["f2"]),
        ];
        let full1 = ExpireOptions {
            retention_full: Some(1),
            ..Default::default()
        };
        assert_eq!(keep_set(&all, &full1), BTreeSet::from([4, 5]));
        // A window reaching back to i2 only: i2's diff and full stay.
        let win = ExpireOptions {
            retention_window: Some(Duration::from_secs(86400)),
            ..Default::default()
        };
        let mut only_i2 = all[..4].to_vec();
        only_i2[3].stop_time = "2026-11-30T00:00:00Z".into();
        assert_eq!(keep_set(&only_i2, &win), BTreeSet::from([0, 2, 3]));
    }

    /// retention-diff: older differentials go with their incrementals while
    /// their full stays; alone it keeps every full.
    #[test]
    fn differentials() {
        let on = |label: &str, day: u32, kind: &str, deps: &[&str]| {
            let mut h = m(label, &format!("2026-11-{day:02}T00:00:00Z"));
            h.backup_type = kind.into();
            h.reference = deps.first().map(|d| d.to_string());
            h.depends_on = deps.iter().map(|d| d.to_string()).collect();
            h
        };
        let all = vec![
            on("f1", 1, "full", &[]),
            on("d1", 2, "diff", &["f1"]),
            on("i1", 3, "incr", &["d1", "f1"]),
            on("d2", 4, "diff", &["f1"]),
            on("i2", 5, "incr", &["d2", "f1"]),
            on("d3", 6, "diff", &["f1"]),
            on("i3", 7, "incr", &["d3", "f1"]),
        ];
        let opts = |full: Option<usize>, diff: usize| ExpireOptions {
            retention_full: full,
            retention_diff: Some(diff),
            ..Default::default()
        };
        assert_eq!(
            keep_set(&all, &opts(Some(1), 2)),
            BTreeSet::from([0, 3, 4, 5, 6])
        );
        assert_eq!(keep_set(&all, &opts(Some(1), 1)), BTreeSet::from([0, 5, 6]));
        assert_eq!(
            keep_set(&all, &opts(None, 2)),
            BTreeSet::from([0, 3, 4, 5, 6])
        );
        // The full counts: with a newer full, one diff is one too many.
        let mut two = all.clone();
        two.push(on("f2", 8, "full", &[]));
        assert_eq!(
            keep_set(&two, &opts(Some(2), 2)),
            BTreeSet::from([0, 5, 6, 7])
        );
        // Unset, every diff stays with its full.
        let full1 = ExpireOptions {
            retention_full: Some(1),
            ..Default::default()
        };
        assert_eq!(keep_set(&all, &full1).len(), all.len());
    }
}
