//! What the repository holds that nothing points to, and when it may go.
//!
//! Backups are found through their manifests and WAL through its names'
//! claims, so whatever a killed or failed command left behind is invisible
//! to every reader — and, unless swept here, stays forever:
//!
//! - **a backup directory without a manifest**: a backup that failed or was
//!   killed (the manifest is written last). It goes once its newest object
//!   (temporary files included) is older than [`MIN_AGE`]: `expire` holds
//!   the stanza lock, so no backup runs, and the age keeps even one whose
//!   lock was lost from having its data removed under it.
//! - **a backup directory holding `expire`'s mark**: an expire that was
//!   interrupted. It goes at once and whole, in the order expire itself
//!   uses ([`super::manifest::BackupDir::deletion_order`]): a re-run finishes the job.
//! - **temporary files** (`.pgvault-tmp-*`, local repositories only) of a
//!   writer killed before it renamed its file into place: an archive-push
//!   or a backup killed (or, before spools cleaned up after themselves, a
//!   failed one). They go once older than [`MIN_AGE`]: a writer renames its
//!   file within seconds of its last write, and one that still tried after
//!   the sweep would fail, never succeed falsely (its rename finds nothing).
//! - **a summary without its content**: archive-push stores a content and
//!   its record summary side by side, so one killed in between can leave
//!   the summary alone. It goes once older than [`MIN_AGE`] (a push in
//!   flight stores the content a moment later).
//!
//! `verify` lists them all (with what `expire` would do); `expire` removes
//! those that may go, and `expire --dry-run` shows which.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::archive::{Archive, Listing};
use super::layout;
use super::manifest::{label_time, Backups};
use super::{ObjectMeta, Repository};
use crate::error::Result;

/// How old a leftover must be before `expire` removes it.
pub const MIN_AGE: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OrphanKind {
    /// A backup directory without a manifest.
    IncompleteBackup,
    /// A backup directory with `expire`'s mark.
    InterruptedExpire,
    /// A writer's temporary file.
    TemporaryFile,
    /// A record summary whose content is not stored.
    Summary,
}

impl OrphanKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OrphanKind::IncompleteBackup => "incomplete-backup",
            OrphanKind::InterruptedExpire => "interrupted-expire",
            OrphanKind::TemporaryFile => "temporary-file",
            OrphanKind::Summary => "summary",
        }
    }
}

/// One leftover: a backup directory, or a single object.
#[derive(Debug, Clone, Serialize)]
pub struct Orphan {
    pub kind: OrphanKind,
    /// The directory or object, as messages name it.
    pub what: String,
    pub detail: String,
    pub objects: u64,
    pub bytes: u64,
    /// Since it was last written, where the store says.
    pub age_seconds: Option<u64>,
    /// `expire` removes it now.
    pub removable: bool,
    /// Its keys, in the order to delete them.
    #[serde(skip)]
    keys: Vec<String>,
}

impl Orphan {
    /// Its keys, in the order [`remove`] deletes them.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }
}

/// Every leftover of the stanza: backup directories from `backups`, the
/// temporary files below the stanza, and summaries without their content
/// in `archives` (each cluster's archive with one listing of it). `now`
/// decides ages.
pub async fn find(
    repo: &Repository,
    backups: &Backups,
    archives: &[(&Archive, &Listing)],
    now: SystemTime,
) -> Result<Vec<Orphan>> {
    let stanza = repo.stanza();
    let describe = |key: &str| format!("{}/{key}", repo.describe());
    let age = |t: Option<SystemTime>| t.map(|t| now.duration_since(t).unwrap_or(Duration::ZERO));
    let temps = repo.backend().list_leftovers(stanza).await?;
    let mut out = Vec::new();

    for dir in &backups.dirs {
        let key = layout::backup_dir(stanza, &dir.label);
        let keys = dir.deletion_order(stanza);
        let bytes = dir
            .objects
            .iter()
            .filter(|o| keys.contains(&o.key))
            .map(|o| o.size)
            .sum();
        if dir.expiring {
            out.push(Orphan {
                kind: OrphanKind::InterruptedExpire,
                what: describe(&key),
                detail: format!(
                    "an interrupted expire of backup {}: the next expire finishes it",
                    dir.label
                ),
                objects: keys.len() as u64,
                bytes,
                age_seconds: age(dir.last_written()).map(|a| a.as_secs()),
                removable: true,
                keys,
            });
        } else if !dir.has_manifest {
            let inside = format!("{key}/");
            let written = dir
                .objects
                .iter()
                .chain(temps.iter().filter(|t| t.key.starts_with(&inside)))
                .filter_map(|o| o.modified)
                .max();
            // A store that keeps no times: the label says when it started.
            let written = written.or_else(|| label_time(&dir.label).map(SystemTime::from));
            let age = age(written);
            out.push(Orphan {
                kind: OrphanKind::IncompleteBackup,
                what: describe(&key),
                detail: format!(
                    "backup {} has no manifest: it failed or was killed{}",
                    dir.label,
                    removal(age)
                ),
                objects: keys.len() as u64,
                bytes,
                age_seconds: age.map(|a| a.as_secs()),
                removable: age.is_some_and(|a| a >= MIN_AGE),
                keys,
            });
        }
    }

    for t in &temps {
        let age = age(t.modified);
        out.push(Orphan {
            kind: OrphanKind::TemporaryFile,
            what: describe(&t.key),
            detail: format!(
                "a temporary file of a writer that did not finish{}",
                removal(age)
            ),
            objects: 1,
            bytes: t.size,
            age_seconds: age.map(|a| a.as_secs()),
            removable: age.is_some_and(|a| a >= MIN_AGE),
            keys: vec![t.key.clone()],
        });
    }

    let mut summaries = Vec::new();
    for (archive, listing) in archives {
        for (name, entry) in listing.entries() {
            summaries.extend(archive.orphan_summary_keys(name, entry));
        }
    }
    let times = times_of(repo, &summaries).await?;
    for key in summaries {
        let meta = times.get(&key);
        let age = age(meta.and_then(|m| m.modified));
        out.push(Orphan {
            kind: OrphanKind::Summary,
            what: describe(&key),
            detail: format!(
                "a record summary whose WAL content is not stored{}",
                removal(age)
            ),
            objects: 1,
            bytes: meta.map_or(0, |m| m.size),
            age_seconds: age.map(|a| a.as_secs()),
            removable: age.is_some_and(|a| a >= MIN_AGE),
            keys: vec![key],
        });
    }
    out.sort_by(|a, b| (a.kind, &a.what).cmp(&(b.kind, &b.what)));
    Ok(out)
}

/// Removes `orphan`, in its order. A key already gone is no error, so a
/// re-run after an interruption finishes.
pub async fn remove(repo: &Repository, orphan: &Orphan) -> Result<()> {
    for key in &orphan.keys {
        repo.backend().delete(key).await?;
    }
    Ok(())
}

/// What expire does about a leftover of this age.
fn removal(age: Option<Duration>) -> String {
    match age {
        Some(a) if a >= MIN_AGE => format!(
            "; last written {} ago, `pgvault expire` removes it",
            human(a)
        ),
        Some(a) => format!(
            "; last written {} ago, `pgvault expire` removes it once {} old",
            human(a),
            human(MIN_AGE)
        ),
        None => "; its age is unknown, so `pgvault expire` leaves it".into(),
    }
}

fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// The listed metadata of `keys`, listing each of their directories once.
async fn times_of(repo: &Repository, keys: &[String]) -> Result<BTreeMap<String, ObjectMeta>> {
    let mut dirs: Vec<&str> = keys
        .iter()
        .filter_map(|k| k.rsplit_once('/').map(|(d, _)| d))
        .collect();
    dirs.sort();
    dirs.dedup();
    let mut out = BTreeMap::new();
    for d in dirs {
        for m in repo.backend().list(d).await? {
            if keys.contains(&m.key) {
                out.insert(m.key.clone(), m);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::manifest::test_manifest;
    use crate::repo::PutMode;
    use std::fs;
    use std::path::Path;

    fn age_file(path: &Path, by: Duration) {
        fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(SystemTime::now() - by)
            .unwrap();
    }

    fn kinds(found: &[Orphan]) -> Vec<(OrphanKind, bool, String)> {
        found
            .iter()
            .map(|o| {
                let tail = o.what.rsplit('/').next().unwrap_or_default().to_string();
                (o.kind, o.removable, tail)
            })
            .collect()
    }

    /// Leftovers are found with their age, and may go only once old
    /// enough, except an interrupted expire, which may go at once; a
    /// damaged manifest is reported and hides no other backup.
    #[tokio::test]
    async fn leftovers_are_found_and_aged() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::local_for_tests(dir.path(), "s");
        let data =
            |label: &str| layout::backup_object_key("s", label, &layout::backup_object_name(0, 1));
        let put = |key: String| {
            let repo = repo.clone();
            async move {
                repo.backend()
                    .put_bytes(&key, b"bytes".to_vec(), PutMode::Overwrite)
                    .await
                    .unwrap();
            }
        };
        // Complete, damaged, incomplete (young and old), being expired.
        for label in ["20260101-000000F", "20260102-000000F"] {
            put(data(label)).await;
            repo.write_manifest(&test_manifest(label, 1, 0x1000, "2026-01-01T00:00:00Z"))
                .await
                .unwrap();
        }
        let damaged = dir
            .path()
            .join(layout::backup_manifest_key("s", "20260102-000000F"));
        let mut bytes = fs::read(&damaged).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 1;
        fs::write(&damaged, bytes).unwrap();
        put(data("20260103-000000F")).await;
        put(data("20260104-000000F")).await;
        age_file(
            &dir.path().join(data("20260104-000000F")),
            MIN_AGE + Duration::from_secs(60),
        );
        put(data("20260105-000000F")).await;
        put(layout::backup_expiring_key("s", "20260105-000000F")).await;
        // Temporary files: one fresh, one old.
        let wal_dir = dir.path().join("s/archive/15-1/0000000100000000");
        fs::create_dir_all(&wal_dir).unwrap();
        fs::write(wal_dir.join(".pgvault-tmp-1-0-young"), b"x").unwrap();
        fs::write(wal_dir.join(".pgvault-tmp-1-1-old"), b"x").unwrap();
        age_file(&wal_dir.join(".pgvault-tmp-1-1-old"), MIN_AGE * 2);

        let backups = repo.backups().await.unwrap();
        let labels: Vec<&str> = backups.manifests.iter().map(|m| m.label.as_str()).collect();
        assert_eq!(labels, ["20260101-000000F"]);
        assert_eq!(backups.unreadable.len(), 1);
        assert_eq!(backups.unreadable[0].label, "20260102-000000F");
        assert!(backups.unreadable[0].corrupt);

        let found = find(&repo, &backups, &[], SystemTime::now()).await.unwrap();
        assert_eq!(
            kinds(&found),
            [
                (
                    OrphanKind::IncompleteBackup,
                    false,
                    "20260103-000000F".into()
                ),
                (
                    OrphanKind::IncompleteBackup,
                    true,
                    "20260104-000000F".into()
                ),
                (
                    OrphanKind::InterruptedExpire,
                    true,
                    "20260105-000000F".into()
                ),
                (
                    OrphanKind::TemporaryFile,
                    false,
                    ".pgvault-tmp-1-0-young".into()
                ),
                (
                    OrphanKind::TemporaryFile,
                    true,
                    ".pgvault-tmp-1-1-old".into()
                ),
            ]
        );
        // The mark goes last.
        let expiring = &found[2];
        assert!(expiring.keys().last().unwrap().ends_with("expiring.pgv"));
        for o in found.iter().filter(|o| o.removable) {
            remove(&repo, o).await.unwrap();
        }
        let backups = repo.backups().await.unwrap();
        let left: Vec<&str> = backups.dirs.iter().map(|d| d.label.as_str()).collect();
        assert_eq!(
            left,
            ["20260101-000000F", "20260102-000000F", "20260103-000000F"]
        );
        let found = find(&repo, &backups, &[], SystemTime::now()).await.unwrap();
        assert_eq!(found.len(), 2, "{found:?}");
    }

    #[test]
    fn ages_read_as_people_say_them() {
        assert_eq!(human(Duration::from_secs(59)), "59s");
        assert_eq!(human(Duration::from_secs(3 * 60)), "3m");
        assert_eq!(human(Duration::from_secs(3600 + 5 * 60)), "1h05m");
        assert_eq!(human(Duration::from_secs(2 * 86400 + 3600)), "2d01h");
    }
}
