//! Backup manifests: what a backup holds and where each file is stored.
//!
//! A manifest is written after every data object it points to and after the
//! WAL from the backup's start to its stop is in the archive: its presence
//! is what makes a backup complete. A backup directory without one is an
//! interrupted backup, never offered for restore (`repo::orphans` decides
//! when it goes); one holding `expire`'s mark is being expired, and counts
//! as gone.
//!
//! Readers go through every manifest: one that cannot be read is reported
//! and skipped ([`Backups::unreadable`]), never the end of the command.

use std::time::SystemTime;

use futures::stream::{self, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use super::filelist::{FileListRef, InlineFiles};
use super::layout::{self, BackupObject};
use super::{Deletion, Fetched, ObjectMeta, PutMode, Repository};
use crate::error::Result;
use crate::pg::{Lsn, TimelineId};

/// How many manifests are read at once.
const READ_PARALLEL: usize = 8;

/// 2: the file list in its own object (`repo::filelist`); 1: inline.
pub const MANIFEST_FORMAT: u32 = 2;

/// What a backup is, without what it holds: what choosing a backup,
/// retention and `info` look at. The catalog caches it, so those commands
/// read a manifest only for a backup they have not seen before.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupHeader {
    pub format: u32,
    pub label: String,
    /// `full`, `diff` or `incr`.
    #[serde(rename = "type")]
    pub backup_type: String,
    /// The backup a `diff` or `incr` takes unchanged files and blocks from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Every backup whose objects this one's files point at, newest first
    /// (the reference, its reference, … down to the full): what `expire`
    /// must keep while this backup is kept, and `verify` checks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// How a `diff` or `incr` found its changed blocks, and what it fell
    /// back on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<ChangeReport>,
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
    pub original_size: u64,
    pub stored_size: u64,
    /// How many files the backup holds (0 in manifests written before it
    /// was recorded: [`Manifest`] then counts them when read).
    #[serde(default)]
    pub file_count: u64,
    /// Data page checksums verified as the files were read (the cluster
    /// has data checksums), and the pages that failed.
    #[serde(default)]
    pub page_checksums: Option<PageChecksums>,
    /// A backup resumed after an interruption: what it took from what the
    /// interrupted run had stored (`ops::backup::resume`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed: Option<ResumeReport>,
}

/// What a resumed backup reused of its interrupted runs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResumeReport {
    /// Runs before this one that stored objects in its directory.
    pub interrupted_runs: u64,
    /// Files taken as the interrupted run stored them (not read again),
    /// their size, and the bytes of the repository they take.
    pub files: u64,
    pub bytes: u64,
    pub stored_bytes: u64,
    /// Files the interrupted run had stored that were read again (changed
    /// since, modified too close to when they were read, or their object
    /// missing).
    pub recopied_files: u64,
}

/// How an incremental or differential backup found what changed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChangeReport {
    /// `wal` (block references of every segment in the range), or
    /// `whole-files` (the WAL could not answer: every relation file copied).
    pub method: String,
    /// WAL segments whose block references were read.
    pub segments: u64,
    /// Relation files taken unchanged from the reference.
    pub unchanged_files: u64,
    /// Relation files stored as their changed blocks, and those blocks.
    pub delta_files: u64,
    pub changed_blocks: u64,
    /// Files copied whole (not relation files, new, created, truncated to
    /// nothing, free space maps, or a doubt).
    pub whole_files: u64,
    /// Files the WAL could not answer for, read and compared with the
    /// reference's copy (those found the same count as unchanged): block
    /// by block against its block sums (those with changed blocks count
    /// as delta files), or whole where it has none.
    #[serde(default)]
    pub compared_files: u64,
    /// The blocks of those files compared with the reference's block sums.
    #[serde(default)]
    pub compared_blocks: u64,
    /// Why files were copied whole where the WAL could not answer: one
    /// line each (a missing segment, a doubt, a size not explained).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<String>,
}

/// A backup: its header and what it holds, but not its files, which are
/// read as a stream when a command needs them ([`Repository::file_list`]):
/// memory does not grow with their number (issue 14).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(flatten)]
    pub header: BackupHeader,
    pub backup_label: String,
    pub tablespace_map: String,
    pub tablespaces: Vec<Tablespace>,
    /// One per directory (not per file).
    pub dirs: Vec<DirEntry>,
    /// Format 2: the file list object this manifest was written with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file_list: Option<FileListRef>,
    /// Format 1: the files were inline; counted, not kept.
    #[serde(default, rename = "files", skip_serializing)]
    pub inline_files: InlineFiles,
}

/// A manifest reads as its header: `m.label`, `m.stop_lsn`.
impl std::ops::Deref for Manifest {
    type Target = BackupHeader;
    fn deref(&self) -> &BackupHeader {
        &self.header
    }
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
    /// The backup whose directory holds `object` (an incremental's file
    /// unchanged since its reference); `None`: this backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<String>,
    /// A relation file stored as blocks of several backups (its block
    /// map), newest first; then `object` is empty and `sha256` that of the
    /// newest part. Restore writes each block from the newest part that
    /// holds it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<super::blockmap::Part>,
    /// Stored in chunks of this many blocks (`repo::chunked`); `None`:
    /// one envelope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_blocks: Option<u32>,
}

fn first_db_id() -> u32 {
    1
}

impl BackupHeader {
    pub fn stop_time_utc(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        chrono::DateTime::parse_from_rfc3339(&self.stop_time)
            .ok()
            .map(|d| d.with_timezone(&chrono::Utc))
    }
}

/// One backup directory, as one listing shows it.
#[derive(Debug, Clone)]
pub struct BackupDir {
    pub label: String,
    pub has_manifest: bool,
    /// `expire` began removing it: its mark is there.
    pub expiring: bool,
    /// Every object in it, manifest and mark included.
    pub objects: Vec<ObjectMeta>,
}

impl BackupDir {
    /// When its newest object was written, where the store says.
    pub fn last_written(&self) -> Option<SystemTime> {
        self.objects.iter().filter_map(|o| o.modified).max()
    }

    /// Its keys in the order a backup is deleted: the manifest first (from
    /// then on the backup is not offered) with the journal of an unfinished
    /// one (from then on a backup does not resume it), then the data, the
    /// block sums and the file list (format 2), `expire`'s mark last (until
    /// then a re-run knows to finish). Objects pgvault does not write there
    /// stay, for `verify` to report.
    pub fn deletion_order(&self, stanza: &str) -> Deletion {
        let of = |want: &'static [BackupObject]| {
            self.objects
                .iter()
                .filter(move |o| {
                    layout::parse_backup_key(stanza, &o.key).is_some_and(|(_, k)| want.contains(&k))
                })
                .map(|o| o.key.clone())
        };
        Deletion::phased([
            of(&[BackupObject::Manifest, BackupObject::Journal]).collect::<Vec<_>>(),
            of(&[
                BackupObject::Data,
                BackupObject::BlockSums,
                BackupObject::FileList,
            ])
            .collect(),
            of(&[BackupObject::Expiring]).collect(),
        ])
    }

    /// Objects pgvault does not write in a backup directory.
    pub fn unknown_objects<'a>(
        &'a self,
        stanza: &'a str,
    ) -> impl Iterator<Item = &'a ObjectMeta> + 'a {
        self.objects.iter().filter(move |o| {
            layout::parse_backup_key(stanza, &o.key)
                .is_none_or(|(_, kind)| kind == BackupObject::Unknown)
        })
    }
}

/// A backup whose manifest is there but cannot be used.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UnreadableManifest {
    pub label: String,
    /// The manifest object, as messages name it.
    pub object: String,
    pub error: String,
    /// Damaged (rather than written by a newer pgvault).
    pub corrupt: bool,
}

/// The backups of a stanza, from one listing.
#[derive(Debug, Clone, Default)]
pub struct Backups {
    /// Every backup directory, by label.
    pub dirs: Vec<BackupDir>,
    /// The complete backups whose manifest was read, ordered by the stop
    /// LSN the server reported.
    pub manifests: Vec<Manifest>,
    /// Backups with a manifest that could not be read, by label.
    pub unreadable: Vec<UnreadableManifest>,
}

impl Backups {
    /// The unreadable backup labelled `label`, if it is one.
    pub fn unreadable(&self, label: &str) -> Option<&UnreadableManifest> {
        self.unreadable.iter().find(|u| u.label == label)
    }
}

/// When the backup labelled `label` started, read from the label
/// (`20261126-031500F`, UTC: see `ops::backup`); `None` for any other form.
pub fn label_time(label: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let stamp = label.get(..15)?;
    chrono::NaiveDateTime::parse_from_str(stamp, "%Y%m%d-%H%M%S")
        .ok()
        .map(|t| t.and_utc())
}

/// `expire`'s mark in a backup directory it is deleting.
#[derive(Debug, Serialize)]
struct ExpiringMark {
    expire_started_at: String,
}

/// What reading one manifest found.
pub enum ManifestRead {
    Found(Box<Manifest>),
    Unreadable(UnreadableManifest),
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

    /// Deletes backups `dirs` so that an interruption at any point leaves
    /// what a re-run finishes: `expire`'s mark in each first (a directory
    /// with it counts as gone and is finished by the next expire, see
    /// `repo::orphans`), then in [`BackupDir::deletion_order`], all of them
    /// together phase by phase (bulk deletes, see `repo::deletion`).
    pub async fn delete_backups(&self, dirs: &[&BackupDir]) -> Result<()> {
        let since = ExpiringMark {
            expire_started_at: chrono::Utc::now()
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        };
        let marks: Vec<String> = dirs
            .iter()
            .map(|d| layout::backup_expiring_key(self.stanza(), &d.label))
            .collect();
        stream::iter(&marks)
            .map(|mark| self.put_json(mark, &since, PutMode::Overwrite))
            .buffer_unordered(READ_PARALLEL)
            .try_collect::<Vec<_>>()
            .await?;
        let mut all = Deletion::default();
        for d in dirs {
            all.merge(d.deletion_order(self.stanza()));
        }
        // The marks last, also those the listing did not show yet.
        all.merge(Deletion::phased([Vec::new(), Vec::new(), marks]));
        self.delete_all(&all).await
    }

    /// The manifest of backup `label` (`None`: it has none). A store that
    /// cannot be read is an error; a manifest that is damaged, written by a
    /// newer pgvault or not this backup's is an outcome.
    pub async fn read_manifest(&self, label: &str) -> Result<Option<ManifestRead>> {
        let key = layout::backup_manifest_key(self.stanza(), label);
        let object = format!("{}/{key}", self.describe());
        let unreadable = |error: String, corrupt: bool| {
            Some(ManifestRead::Unreadable(UnreadableManifest {
                label: label.to_string(),
                object: object.clone(),
                error,
                corrupt,
            }))
        };
        Ok(match self.fetch_manifest_streamed(&key).await? {
            Fetched::Missing => None,
            Fetched::Damaged(why) => unreadable(why, true),
            Fetched::Found(m) if m.format > MANIFEST_FORMAT => unreadable(
                format!(
                    "{object}: written by a newer pgvault (manifest format {})",
                    m.format
                ),
                false,
            ),
            Fetched::Found(m) if m.label != label => unreadable(
                format!("{object}: the manifest is backup {:?}'s", m.label),
                true,
            ),
            Fetched::Found(m) if m.format >= 2 && m.file_list.is_none() => unreadable(
                format!(
                    "{object}: a format-{} manifest without its file list",
                    m.format
                ),
                true,
            ),
            Fetched::Found(mut m) => {
                // Written before the header counted its files.
                if m.header.file_count == 0 {
                    m.header.file_count = m.inline_files.0;
                }
                Some(ManifestRead::Found(Box::new(m)))
            }
        })
    }

    /// The labels of the backup directories, from a listing of one level
    /// (not of every object the backups hold).
    pub async fn backup_dir_labels(&self) -> Result<Vec<String>> {
        self.backend()
            .list_dirs(&layout::backups_root(self.stanza()))
            .await
    }

    /// Every backup directory, from one listing, by label.
    pub async fn backup_dirs(&self) -> Result<Vec<BackupDir>> {
        let listing = self
            .backend()
            .list(&layout::backups_root(self.stanza()))
            .await?;
        let mut dirs: std::collections::BTreeMap<String, BackupDir> = Default::default();
        for o in listing {
            let Some((label, kind)) = layout::parse_backup_key(self.stanza(), &o.key) else {
                continue;
            };
            let dir = dirs.entry(label.to_string()).or_insert_with(|| BackupDir {
                label: label.to_string(),
                has_manifest: false,
                expiring: false,
                objects: Vec::new(),
            });
            dir.has_manifest |= kind == BackupObject::Manifest;
            dir.expiring |= kind == BackupObject::Expiring;
            dir.objects.push(o);
        }
        Ok(dirs.into_values().collect())
    }

    /// The backups: every directory, and the manifest of each complete one
    /// that is not being expired.
    pub async fn backups(&self) -> Result<Backups> {
        let dirs = self.backup_dirs().await?;
        let labels: Vec<&str> = dirs
            .iter()
            .filter(|d| d.has_manifest && !d.expiring)
            .map(|d| d.label.as_str())
            .collect();
        let reads: Vec<Option<ManifestRead>> = stream::iter(labels)
            .map(|label| self.read_manifest(label))
            .buffered(READ_PARALLEL)
            .try_collect()
            .await?;
        let mut out = Backups {
            dirs,
            ..Backups::default()
        };
        for read in reads.into_iter().flatten() {
            match read {
                ManifestRead::Found(m) => out.manifests.push(*m),
                ManifestRead::Unreadable(u) => out.unreadable.push(u),
            }
        }
        out.manifests.sort_by_key(|m| (m.stop_lsn, m.label.clone()));
        Ok(out)
    }

    /// Every complete backup whose manifest can be read, ordered by the
    /// stop LSN the server reported; one that cannot is logged and skipped.
    pub async fn manifests(&self) -> Result<Vec<Manifest>> {
        let backups = self.backups().await?;
        for u in &backups.unreadable {
            log::warn!("backup {} skipped: {}", u.label, u.error);
        }
        Ok(backups.manifests)
    }
}

/// A manifest with only what backup choice and retention look at (tests).
#[cfg(test)]
pub(crate) fn test_manifest(label: &str, tli: u32, stop_lsn: u64, stop_time: &str) -> Manifest {
    Manifest {
        header: BackupHeader {
            format: MANIFEST_FORMAT,
            label: label.into(),
            backup_type: "full".into(),
            reference: None,
            depends_on: vec![],
            changes: None,
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
            original_size: 0,
            stored_size: 0,
            file_count: 0,
            page_checksums: None,
            resumed: None,
        },
        backup_label: String::new(),
        tablespace_map: String::new(),
        tablespaces: vec![],
        dirs: vec![],
        file_list: Some(FileListRef {
            sha256: String::new(),
            count: 0,
        }),
        inline_files: InlineFiles::default(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn label_times() {
        let t = super::label_time("20261126-031500F").unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-26T03:15:00+00:00");
        assert_eq!(super::label_time("nonsense"), None);
    }

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
