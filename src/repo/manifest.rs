//! Backup manifests: what a backup holds and where each file is stored.
//!
//! A manifest is written after every data object it points to and after the
//! WAL from the backup's start to its stop is in the archive: its presence
//! is what makes a backup complete. A backup directory without one is an
//! interrupted backup, never offered for restore.

use serde::{Deserialize, Serialize};

use super::{layout, PutMode, Repository};
use crate::error::{Error, Result};
use crate::pg::{Lsn, TimelineId};

pub const MANIFEST_FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub label: String,
    /// `full` (room for `incr`/`diff`).
    #[serde(rename = "type")]
    pub backup_type: String,
    pub start_lsn: Lsn,
    pub stop_lsn: Lsn,
    /// The server's clock at start and stop, UTC RFC 3339.
    pub start_time: String,
    pub stop_time: String,
    pub timeline: TimelineId,
    pub pg_version: u32,
    pub system_identifier: String,
    /// The stanza entry (`DbInfo::id`) of the cluster backed up, whose
    /// archive recovers it; 1 in manifests written before it was recorded.
    #[serde(default = "first_db_id")]
    pub db_id: u32,
    pub wal_segment_size: u32,
    /// First and last WAL segment needed to make the backup consistent.
    pub wal_start: String,
    pub wal_stop: String,
    pub backup_label: String,
    pub tablespace_map: String,
    pub tablespaces: Vec<Tablespace>,
    pub dirs: Vec<DirEntry>,
    pub files: Vec<FileEntry>,
    pub original_size: u64,
    pub stored_size: u64,
    /// Data page checksums verified as the files were read (the cluster
    /// has data checksums), and the pages that failed.
    #[serde(default)]
    pub page_checksums: Option<PageChecksums>,
}

/// What the page checksum check of a backup found.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PageChecksums {
    /// Pages checked (new pages and pages changed after the backup's start
    /// are not checked: WAL replay rewrites them).
    pub pages_checked: u64,
    /// Pages that failed their checksum twice (read again once: a page
    /// being written while read can be torn).
    pub bad_pages: Vec<BadPageEntry>,
}

/// One page that failed its checksum.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BadPageEntry {
    /// The relation segment file, relative to the data directory.
    pub path: String,
    /// `main`, `fsm`, `vm` or `init`.
    pub fork: String,
    /// Block number in the fork.
    pub block: u32,
    pub stored: u16,
    pub computed: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tablespace {
    pub oid: u32,
    pub name: String,
    pub location: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DirEntry {
    /// Relative to the data directory, `/`-separated; tablespace contents
    /// under `pg_tblspc/<oid>/…`.
    pub path: String,
    pub mode: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    pub path: String,
    pub size: u64,
    /// Seconds since the epoch.
    pub mtime: i64,
    pub mode: u32,
    pub sha256: String,
    /// Data object relative to the backup directory.
    pub object: String,
    /// Where this file's encoded bytes sit in the object.
    pub offset: u64,
    pub length: u64,
}

fn first_db_id() -> u32 {
    1
}

impl Manifest {
    pub fn stop_time_utc(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        chrono::DateTime::parse_from_rfc3339(&self.stop_time)
            .ok()
            .map(|d| d.with_timezone(&chrono::Utc))
    }
}

impl Repository {
    pub async fn write_manifest(&self, m: &Manifest) -> Result<()> {
        self.put_json(
            &layout::backup_manifest_key(self.stanza(), &m.label),
            m,
            PutMode::CreateNew,
        )
        .await?;
        Ok(())
    }

    pub async fn read_manifest(&self, label: &str) -> Result<Option<Manifest>> {
        let m: Option<Manifest> = self
            .get_json(&layout::backup_manifest_key(self.stanza(), label))
            .await?;
        if let Some(m) = &m {
            if m.format > MANIFEST_FORMAT {
                return Err(Error::repository(format!(
                    "backup {label} was written by a newer pgvault (manifest format {})",
                    m.format
                )));
            }
        }
        Ok(m)
    }

    /// Labels of complete backups (those with a manifest), oldest first.
    pub async fn backup_labels(&self) -> Result<Vec<String>> {
        let listing = self
            .backend()
            .list(&layout::backups_root(self.stanza()))
            .await?;
        let mut labels: Vec<String> = listing
            .iter()
            .filter_map(|m| layout::parse_manifest_key(&m.key).map(str::to_string))
            .collect();
        labels.sort();
        Ok(labels)
    }

    /// Every complete backup, ordered by the stop LSN the server reported.
    pub async fn manifests(&self) -> Result<Vec<Manifest>> {
        let mut out = Vec::new();
        for label in self.backup_labels().await? {
            if let Some(m) = self.read_manifest(&label).await? {
                out.push(m);
            }
        }
        out.sort_by_key(|m| (m.stop_lsn, m.label.clone()));
        Ok(out)
    }
}

/// A manifest with only what backup choice and retention look at (tests).
#[cfg(test)]
pub(crate) fn test_manifest(label: &str, tli: u32, stop_lsn: u64, stop_time: &str) -> Manifest {
    Manifest {
        format: MANIFEST_FORMAT,
        label: label.into(),
        backup_type: "full".into(),
        start_lsn: Lsn(stop_lsn.saturating_sub(0x100)),
        stop_lsn: Lsn(stop_lsn),
        start_time: stop_time.into(),
        stop_time: stop_time.into(),
        timeline: TimelineId(tli),
        pg_version: 15,
        system_identifier: "1".into(),
        db_id: 1,
        wal_segment_size: 1 << 20,
        wal_start: String::new(),
        wal_stop: String::new(),
        backup_label: String::new(),
        tablespace_map: String::new(),
        tablespaces: vec![],
        dirs: vec![],
        files: vec![],
        original_size: 0,
        stored_size: 0,
        page_checksums: None,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn db_id_defaults_to_the_first_cluster() {
        let mut v =
            serde_json::to_value(super::test_manifest("a", 1, 0x100, "2026-01-01T00:00:00Z"))
                .unwrap();
        v.as_object_mut().unwrap().remove("db_id");
        let m: super::Manifest = serde_json::from_value(v).unwrap();
        assert_eq!(m.db_id, 1);
    }
}
