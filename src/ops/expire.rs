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
use crate::repo::manifest::{BackupHeader, Backups, UnreadableManifest};
use crate::repo::orphans::{self, Orphan};
use crate::repo::Repository;

#[derive(Debug, Clone, Default)]
pub struct ExpireOptions {
    pub retention_full: Option<usize>,
    pub retention_window: Option<Duration>,
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
    }
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
    keep
}

pub async fn expire(
    repo: &Repository,
    catalog: Option<&Catalog>,
    opts: &ExpireOptions,
) -> Result<ExpireReport> {
    if opts.retention_full.is_none() && opts.retention_window.is_none() {
        return Err(Error::usage("no retention policy set").hint(
            "set retention-full (a count of full backups) and/or retention-window (e.g. 14d)",
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
    let mut wal_keys = Vec::new();
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
                // Per name in the archive's order: claim first, content last.
                wal_keys.extend(archive.keys_to_delete(name, entry));
            }
        }
        archives.push((archive, listing));
    }
    let listed: Vec<_> = archives.iter().map(|(a, l)| (a, l)).collect();
    let mut leftovers = orphans::find(repo, &backups, &listed, SystemTime::now()).await?;
    // A summary in expired WAL goes with it, counted there.
    let doomed: BTreeSet<&str> = wal_keys.iter().map(String::as_str).collect();
    leftovers.retain(|o| !o.keys().iter().all(|k| doomed.contains(k.as_str())));
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
    for m in &expired {
        if let Some(dir) = backups.dirs.iter().find(|d| d.label == m.label) {
            repo.delete_backup(dir).await?;
        }
    }
    if let Some(cat) = catalog {
        let gone = expired.iter().map(|m| m.label.clone()).collect();
        cat.update_backups_best_effort(repo.stanza(), Vec::new(), gone)
            .await;
    }
    for key in &wal_keys {
        repo.backend().delete(key).await?;
    }
    for o in report.orphans.iter().filter(|o| o.removable) {
        orphans::remove(repo, o).await?;
    }
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
}
