//! Which backups a stanza has, cheaply: one listing of the backup
//! directories (one level, not every object they hold) and the catalog's
//! copy of each manifest's header; only a backup the catalog has not seen
//! is read from the repository (then cached). `info`, restore's choice of
//! backup and `expire` start here.
//!
//! The catalog is a cache: a backup whose directory is gone is forgotten;
//! one being expired right now (its manifest deleted a moment ago) can still
//! be listed until its directory is gone — restore reads the chosen
//! manifest in full anyway and says so if it has just gone.

use std::collections::HashMap;

use futures::stream::{self, StreamExt, TryStreamExt};

use crate::catalog::Catalog;
use crate::error::Result;
use crate::repo::manifest::{BackupHeader, ManifestRead, UnreadableManifest};
use crate::repo::Repository;

/// How many manifests are read at once.
const READ_PARALLEL: usize = 8;

/// The complete backups of a stanza.
#[derive(Debug, Clone, Default)]
pub struct BackupIndex {
    /// Ordered by the stop LSN the server reported (then label).
    pub headers: Vec<BackupHeader>,
    /// Backups whose manifest could not be read, by label.
    pub unreadable: Vec<UnreadableManifest>,
}

impl BackupIndex {
    pub fn unreadable(&self, label: &str) -> Option<&UnreadableManifest> {
        self.unreadable.iter().find(|u| u.label == label)
    }
}

/// The stanza's backups, from the catalog where it knows them.
pub async fn index(repo: &Repository, catalog: Option<&Catalog>) -> Result<BackupIndex> {
    let labels = repo.backup_dir_labels().await?;
    let stanza = repo.stanza().to_string();
    let mut cached: HashMap<String, BackupHeader> =
        Catalog::read_best_effort(catalog, move |c| c.backup_headers(&stanza)).await;
    let mut out = BackupIndex::default();
    let mut unknown = Vec::new();
    for label in &labels {
        match cached.remove(label) {
            Some(h) => out.headers.push(h),
            None => unknown.push(label.as_str()),
        }
    }
    // What the catalog knows and the repository no longer holds.
    let gone: Vec<String> = cached.into_keys().collect();
    let reads: Vec<Option<ManifestRead>> = stream::iter(unknown)
        .map(|label| repo.read_manifest(label))
        .buffered(READ_PARALLEL)
        .try_collect()
        .await?;
    let mut read = Vec::new();
    for r in reads.into_iter().flatten() {
        match r {
            ManifestRead::Found(m) => read.push(m.header),
            ManifestRead::Unreadable(u) => out.unreadable.push(u),
        }
    }
    out.headers.extend(read.iter().cloned());
    out.headers
        .sort_by(|a, b| (a.stop_lsn, &a.label).cmp(&(b.stop_lsn, &b.label)));
    if let Some(cat) = catalog {
        cat.update_backups_best_effort(repo.stanza(), read, gone)
            .await;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::manifest::test_manifest;

    /// The second call reads no manifest: the catalog answers; a backup
    /// gone from the repository is forgotten.
    #[tokio::test]
    async fn reads_each_manifest_once() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::local_for_tests(&dir.path().join("repo"), "s");
        let cat = Catalog::at(dir.path().join("catalog.db"));
        for (label, stop) in [("20261126-010000F", 0x200), ("20261126-000000F", 0x300)] {
            let m = test_manifest(label, 1, stop, "2026-11-26T02:00:00Z");
            repo.write_manifest(&m).await.unwrap();
        }
        let first = index(&repo, Some(&cat)).await.unwrap();
        let labels: Vec<&str> = first.headers.iter().map(|h| h.label.as_str()).collect();
        assert_eq!(
            labels,
            ["20261126-010000F", "20261126-000000F"],
            "by stop LSN"
        );
        assert_eq!(cat.backup_headers("s").unwrap().len(), 2);

        // Damage both manifests: only the catalog can still answer.
        for label in &labels {
            let p = dir
                .path()
                .join("repo/s/backup")
                .join(label)
                .join("manifest.pgv");
            std::fs::write(&p, b"garbage").unwrap();
        }
        let again = index(&repo, Some(&cat)).await.unwrap();
        assert_eq!(again.headers.len(), 2);
        assert!(again.unreadable.is_empty());
        let uncached = index(&repo, None).await.unwrap();
        assert_eq!(
            uncached.unreadable.len(),
            2,
            "without the catalog they are read"
        );

        std::fs::remove_dir_all(dir.path().join("repo/s/backup/20261126-000000F")).unwrap();
        let after = index(&repo, Some(&cat)).await.unwrap();
        assert_eq!(after.headers.len(), 1);
        assert_eq!(cat.backup_headers("s").unwrap().len(), 1);
    }
}
