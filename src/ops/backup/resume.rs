//! Resume of an interrupted backup: running `backup` again after a kill,
//! a lost connection or a reboot reuses what the interrupted run had
//! already stored, full, differential and incremental backups alike.
//!
//! **The journal.** Every backup writes, in its own directory, a journal:
//! immutable chunks (`journal/<n>.pgv`, see `repo::layout`), each listing
//! data objects that are *committed* (a reader sees them whole) and the
//! files they hold, with what each file was when it was read: size, inode,
//! mtime to the nanosecond and the moment it was opened. A chunk is only
//! written after its objects, so an object that no chunk names (one being
//! written when the run died, or committed just before) is never trusted.
//! Chunks are written every [`JOURNAL_INTERVAL`] or [`JOURNAL_BYTES`] of
//! files (and once more when the copy ends), so an interruption loses at
//! most that much work. The manifest makes the journal redundant: it is
//! deleted once the manifest is written (and, in a directory being
//! removed, first: `manifest::BackupDir::deletion_order`).
//!
//! **Which directory.** Only the newest backup directory, and only when it
//! has no manifest (its backup never completed, so it is newer than every
//! complete one), no `expire` mark, and a journal whose chunks say it is a
//! backup of the same cluster (system identifier and stanza entry), of the
//! same type on the same reference. The stanza lock, held by `backup` and
//! by `expire`, keeps the orphan sweep (`repo::orphans`) from removing the
//! directory while it is resumed; a sweep interrupted earlier deleted the
//! journal first, and every object a chunk names is checked in a listing
//! of the directory (present, at the size it was committed with) anyway.
//!
//! **Which files.** The resumed run continues in the same directory, under
//! the same label, with a new `pg_backup_start`: its copy must be
//! consistent from the *new* start, so a stored file is reused only when it
//! is certain that the file has not changed between the moment it was read
//! and now (after the new start's checkpoint, which wrote every page
//! changed before it):
//! - same size, inode and mtime (nanoseconds) as recorded;
//! - its recorded mtime at least [`MTIME_MARGIN`] older than the moment it
//!   was opened: a write after that moment then shows as a later mtime even
//!   on file systems whose timestamps are coarse (pgBackRest applies the
//!   same rule to its timestamps);
//! - for a diff or incr, the new plan wants the same thing stored: the file
//!   whole, or the same changed blocks on the same older parts (the change
//!   set grows with the new start; different blocks are read again);
//! - `global/pg_control` is never reused (it is copied last, every run).
//!
//! Everything else is read again. Objects of the interrupted runs that the
//! finished backup does not use are deleted before its manifest is written.
//!
//! **Memory.** What the interrupted runs stored (a journal record per
//! file) and the objects in the directory are read into a scratch database
//! on disk (`catalog::scratch`), a chunk at a time, and looked up by path
//! there; a chunk holds at most [`JOURNAL_FILES`] files. Nothing is held
//! per file in memory, whatever the number of files (issue 14).
//! pgBackRest resumes full backups only (its bundles not at all) and
//! re-checksums what it reuses; here the objects are immutable and were
//! checksummed as they were written, and `verify` reads every one.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::catalog::scratch::{self, Row, Rows, Scratch};
use crate::error::{Error, Result};
use crate::ops::progress::Progress;
use crate::repo::blockmap::{self, Part, Ranges};
use crate::repo::layout::{self, BackupObject};
use crate::repo::manifest::{BadPageEntry, FileEntry, ResumeReport};
use crate::repo::{Deletion, Fetched, PutMode, Repository};

/// How often (at most) the journal gets a chunk while files are stored.
const JOURNAL_INTERVAL: Duration = Duration::from_secs(30);
/// Or after this many bytes of files.
const JOURNAL_BYTES: u64 = 1 << 30;
/// Or after this many files: a chunk is written, and read back, whole (a
/// few MiB of JSON at most).
const JOURNAL_FILES: usize = 4096;
/// Test-only: a chunk after every N objects (`1`: after each).
pub const JOURNAL_EVERY_VARIABLE: &str = "PGVAULT_TEST_JOURNAL_EVERY";
/// How much older than the moment it was opened a file's mtime must be for
/// its stored copy to be reused (see the module documentation).
const MTIME_MARGIN: Duration = Duration::from_secs(1);
/// Data objects of each run are numbered from a multiple of this, so that a
/// run never meets a name an earlier one used, even one the listing missed.
const RUN_OBJECTS: u64 = 1_000_000;

pub const JOURNAL_FORMAT: u32 = 1;

/// What a journal is the journal of: a resumed run must be the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalHeader {
    pub format: u32,
    pub label: String,
    #[serde(rename = "type")]
    pub backup_type: String,
    pub reference: Option<String>,
    pub system_identifier: String,
    pub db_id: u32,
    pub pg_version: u32,
}

impl JournalHeader {
    /// A full backup's journal header, of a made-up cluster (tests).
    #[doc(hidden)]
    pub fn test_full(label: &str) -> JournalHeader {
        JournalHeader {
            format: JOURNAL_FORMAT,
            label: label.into(),
            backup_type: "full".into(),
            reference: None,
            system_identifier: "7".into(),
            db_id: 1,
            pg_version: 15,
        }
    }

    /// Whether a run described by `other` may continue this journal's
    /// backup (the label aside: the resumed run takes this one's).
    fn same_backup(&self, other: &JournalHeader) -> bool {
        JournalHeader {
            label: String::new(),
            ..self.clone()
        } == JournalHeader {
            label: String::new(),
            ..other.clone()
        }
    }
}

/// One chunk of the journal.
#[derive(Debug, Serialize, Deserialize)]
struct Chunk {
    #[serde(flatten)]
    header: JournalHeader,
    /// Committed data objects (relative to the backup directory) and their
    /// size in the store.
    objects: Vec<(String, u64)>,
    files: Vec<Journaled>,
}

/// A file as a run stored it, and what it was when read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Journaled {
    pub entry: FileEntry,
    pub ino: u64,
    /// mtime and the moment the file was opened, nanoseconds since the
    /// epoch.
    pub mtime_ns: i64,
    pub opened_ns: i64,
    #[serde(default)]
    pub pages_checked: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bad_pages: Vec<BadPageEntry>,
}

impl Journaled {
    /// This backup's own object holding the file's bytes (`None`: it holds
    /// none, the file is the reference's).
    pub fn own_object<'a>(&'a self, label: &str) -> Option<(&'a str, u64, u64)> {
        let e = &self.entry;
        match e.parts.first() {
            Some(p) if p.backup == label => Some((&p.object, p.offset, p.length)),
            Some(_) => None,
            None if e.backup.is_none() => Some((&e.object, e.offset, e.length)),
            None => None,
        }
    }
}

/// Nanoseconds since the epoch.
pub(super) fn nanos(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
    }
}

/// A file's mtime to the nanosecond.
pub(super) fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec())
}

/// What a file's copy must be to be reused.
pub enum Want<'a> {
    /// The file whole in this backup's objects.
    Whole,
    /// These blocks in this backup's objects, then these older parts.
    Blocks(&'a Ranges, &'a [Part]),
}

/// Scratch tables of a [`Resumable`]: the journal's records by path (`w`
/// the file's size, `v` the record as JSON); the data objects in the
/// directory (`w` their size); the objects the finished backup uses.
const FILES: &str = "journaled";
const OBJECTS: &str = "objects";
const USED: &str = "used";
/// Rows added to the scratch database at once.
const BATCH: usize = 4096;

/// An interrupted backup to continue, and what of it may be reused.
pub struct Resumable {
    pub label: String,
    /// Runs that wrote a journal chunk.
    pub runs: u64,
    /// The files that may be reused (table `journaled`, by path) and the
    /// data objects of the interrupted runs (table `objects`).
    db: scratch::Shared,
    /// How many files may be reused, and their size.
    candidates: (u64, u64),
    /// Where this run numbers its objects from.
    pub next_object: u64,
    /// This run's first journal chunk.
    pub next_chunk: u64,
}

fn lock(db: &scratch::Shared) -> Result<std::sync::MutexGuard<'_, Scratch>> {
    db.lock()
        .map_err(|_| Error::internal("scratch database: a thread failed holding it"))
}

impl Resumable {
    /// How many files the interrupted runs stored that may be reused, and
    /// their size.
    pub fn candidates(&self) -> (u64, u64) {
        self.candidates
    }

    /// The record of `rel`, if a run stored it (and it may be reused).
    fn journaled(&self, rel: &str) -> Result<Option<Journaled>> {
        let Some(row) = lock(&self.db)?.get(FILES, rel)? else {
            return Ok(None);
        };
        serde_json::from_slice(&row.v)
            .map(Some)
            .map_err(|e| Error::internal(format!("the journal record of {rel}: {e}")))
    }

    /// The stored copy of `rel` (on disk at `abs`, `size` bytes now), when
    /// it may be reused as `want` says: `Reuse::No` when the interrupted
    /// run stored it but it must be read again, `Reuse::NotStored` when it
    /// did not.
    pub fn reusable(&self, rel: &str, abs: &Path, size: u64, want: Want<'_>) -> Result<Reuse> {
        let Some(j) = self.journaled(rel)? else {
            return Ok(Reuse::NotStored);
        };
        let Ok(meta) = std::fs::metadata(abs) else {
            return Ok(Reuse::No);
        };
        let margin = i64::try_from(MTIME_MARGIN.as_nanos()).unwrap_or(i64::MAX);
        let unchanged = meta.len() == size
            && size == j.entry.size
            && meta.ino() == j.ino
            && mtime_ns(&meta) == j.mtime_ns
            && j.mtime_ns.saturating_add(margin) <= j.opened_ns;
        let e = &j.entry;
        let same_kind = match want {
            Want::Whole => e.parts.is_empty() && e.backup.is_none(),
            Want::Blocks(blocks, older) => match e.parts.first() {
                Some(p) if p.backup == self.label && p.blocks.as_ref() == Some(blocks) => {
                    blockmap::chain(p.clone(), older.to_vec(), size) == e.parts
                }
                _ => false,
            },
        };
        Ok(if unchanged && same_kind {
            Reuse::Yes(Box::new(j))
        } else {
            Reuse::No
        })
    }

    /// Deletes the objects of the interrupted runs that `files` (the
    /// finished backup's, streamed in path order from the scratch
    /// database) do not use: before the manifest, so a complete backup
    /// holds only what it lists. The objects used go to the scratch
    /// database, and those of the interrupted runs not among them come
    /// back from it: nothing per file or per object is held in memory but
    /// the keys to delete.
    pub async fn delete_unused<I>(&self, repo: &Repository, files: I) -> Result<u64>
    where
        I: Iterator<Item = Result<FileEntry>> + Send + 'static,
    {
        let label = self.label.clone();
        let db = self.db.clone();
        let stanza = repo.stanza().to_string();
        let unused = tokio::task::spawn_blocking(move || -> Result<Vec<String>> {
            let mut rows = Vec::with_capacity(BATCH);
            let used = |f: &FileEntry| -> Option<String> {
                if f.parts.is_empty() && f.backup.is_none() {
                    return Some(f.object.clone());
                }
                f.parts
                    .first()
                    .filter(|p| p.backup == label)
                    .map(|p| p.object.clone())
            };
            for f in files {
                // A bundle's files are often neighbours in the list: its
                // object once for them.
                let o = used(&f?).filter(|o| rows.last().is_none_or(|r: &Row| &r.k != o));
                if let Some(o) = o {
                    rows.push(Row {
                        k: o,
                        ..Row::default()
                    });
                }
                if rows.len() >= BATCH {
                    // A bundle's files name the same object.
                    lock(&db)?.replace(USED, &rows)?;
                    rows.clear();
                }
            }
            lock(&db)?.replace(USED, &rows)?;
            Rows::unmatched(db, OBJECTS, USED, None)
                .map(|r| Ok(layout::backup_object_key(&stanza, &label, &r?.row.k)))
                .collect()
        })
        .await??;
        let n = unused.len() as u64;
        repo.delete_all(&Deletion::phased([unused])).await?;
        Ok(n)
    }
}

/// Whether an interrupted run's copy of a file may be reused.
pub enum Reuse {
    /// It may: its journal record.
    Yes(Box<Journaled>),
    /// A run stored it, but it must be read again.
    No,
    /// No run stored it.
    NotStored,
}

/// The interrupted backup this one continues, if there is one that fits
/// `want` (see the module documentation); why one does not is said on
/// `progress`.
pub async fn find(
    repo: &Repository,
    want: &JournalHeader,
    progress: &dyn Progress,
) -> Result<Option<Resumable>> {
    let Some(label) = repo.backup_dir_labels().await?.into_iter().max() else {
        return Ok(None);
    };
    let stanza = repo.stanza();
    let listing = repo
        .backend()
        .list(&layout::backup_dir(stanza, &label))
        .await?;
    let mut chunks = Vec::new();
    // The data objects in the directory, on disk: a backup stored in
    // objects of a megabyte or more has one a file.
    let db = Scratch::new(&[FILES, OBJECTS, USED])?.shared();
    let mut objects = Vec::with_capacity(BATCH);
    let mut max_object = None;
    let (mut complete, mut expiring) = (false, false);
    let inside = format!("{}/", layout::backup_dir(stanza, &label));
    for o in &listing {
        let Some((_, kind)) = layout::parse_backup_key(stanza, &o.key) else {
            continue;
        };
        let name = o.key.strip_prefix(&inside).unwrap_or(&o.key);
        match kind {
            BackupObject::Manifest => complete = true,
            BackupObject::Expiring => expiring = true,
            BackupObject::Journal => chunks.extend(layout::parse_journal_name(name)),
            BackupObject::Data => {
                let n = layout::parse_backup_object_name(name).map(|(_, n)| n);
                max_object = max_object.max(n);
                objects.push(Row {
                    k: name.to_string(),
                    w: o.size as i64,
                    ..Row::default()
                });
            }
            _ => {}
        }
    }
    drop(listing);
    // Being removed: nothing to resume.
    if expiring {
        return Ok(None);
    }
    // Complete: nothing to resume; a journal left by a run that ended
    // between its manifest and the journal's deletion goes now.
    if complete {
        if !chunks.is_empty() {
            delete_journal(repo, &label).await?;
        }
        return Ok(None);
    }
    let any_objects = !objects.is_empty();
    let db2 = db.clone();
    tokio::task::spawn_blocking(move || {
        for rows in objects.chunks(BATCH) {
            lock(&db2)?.insert(OBJECTS, rows)?;
        }
        Ok::<_, Error>(())
    })
    .await??;
    chunks.sort_unstable();
    let mut runs = BTreeSet::new();
    let mut max_recorded = None;
    for &n in &chunks {
        let key = layout::backup_journal_key(stanza, &label, n);
        let chunk = match repo.fetch_json::<Chunk>(&key).await? {
            Fetched::Found(c) => c,
            Fetched::Missing => continue,
            Fetched::Damaged(why) => {
                progress.message(&format!(
                    "backup {label}: journal chunk skipped (what it lists is read again): {why}"
                ));
                continue;
            }
        };
        if !chunk.header.same_backup(want) {
            let h = &chunk.header;
            progress.message(&format!(
                "backup {label} was interrupted, but it is a {} backup{} of cluster {} \
                 (this one: {}{} of {}): not resumed; `pgvault expire` removes it once an hour old",
                h.backup_type,
                h.reference
                    .as_ref()
                    .map(|r| format!(" on {r}"))
                    .unwrap_or_default(),
                h.system_identifier,
                want.backup_type,
                want.reference
                    .as_ref()
                    .map(|r| format!(" on {r}"))
                    .unwrap_or_default(),
                want.system_identifier,
            ));
            return Ok(None);
        }
        for (o, _) in &chunk.objects {
            let n = layout::parse_backup_object_name(o).map(|(_, n)| n);
            max_recorded = max_recorded.max(n);
            runs.extend(n.map(|n| n / RUN_OBJECTS));
        }
        let (db, label) = (db.clone(), label.clone());
        tokio::task::spawn_blocking(move || add_chunk(&db, &label, chunk)).await??;
    }
    let db2 = db.clone();
    let candidates = tokio::task::spawn_blocking(move || -> Result<(u64, u64)> {
        let s = lock(&db2)?;
        Ok((s.count(FILES)?, s.sums(FILES)?.1 as u64))
    })
    .await??;
    if candidates.0 == 0 {
        if !chunks.is_empty() || any_objects {
            progress.message(&format!(
                "backup {label} was interrupted before its journal recorded a stored file: not resumed"
            ));
        }
        return Ok(None);
    }
    let top = max_object.max(max_recorded).unwrap_or(0);
    Ok(Some(Resumable {
        label,
        runs: runs.len() as u64,
        db,
        candidates,
        next_object: (top / RUN_OBJECTS + 1) * RUN_OBJECTS,
        next_chunk: chunks.last().map_or(0, |n| n + 1),
    }))
}

/// Adds the files of one chunk whose object it names as committed and that
/// is in the directory whole (the same size as when it was committed) to
/// table `journaled`; a later chunk's record of the same path replaces an
/// earlier one's.
fn add_chunk(db: &scratch::Shared, label: &str, chunk: Chunk) -> Result<()> {
    let committed: HashMap<&str, u64> = chunk
        .objects
        .iter()
        .map(|(o, s)| (o.as_str(), *s))
        .collect();
    let mut s = lock(db)?;
    let mut rows = Vec::with_capacity(chunk.files.len());
    for j in &chunk.files {
        let ok = match j.own_object(label) {
            Some((o, offset, length)) => match committed.get(o) {
                Some(&size) => {
                    s.get(OBJECTS, o)?.is_some_and(|r| r.w as u64 == size)
                        && offset.saturating_add(length) <= size
                }
                None => false,
            },
            None => false,
        };
        if ok && j.entry.path != crate::pg::datadir::PG_CONTROL {
            rows.push(Row {
                k: j.entry.path.clone(),
                w: j.entry.size as i64,
                v: serde_json::to_vec(j)
                    .map_err(|e| Error::internal(format!("serialize a journal record: {e}")))?,
                ..Row::default()
            });
        }
    }
    s.replace(FILES, &rows)?;
    Ok(())
}

/// Deletes the journal of backup `label` (once its manifest is written).
pub(super) async fn delete_journal(repo: &Repository, label: &str) -> Result<()> {
    let stanza = repo.stanza();
    let keys: Vec<String> = repo
        .backend()
        .list(&layout::backup_dir(stanza, label))
        .await?
        .into_iter()
        .filter(|o| {
            layout::parse_backup_key(stanza, &o.key)
                .is_some_and(|(_, k)| k == BackupObject::Journal)
        })
        .map(|o| o.key)
        .collect();
    repo.delete_all(&Deletion::phased([keys])).await
}

/// The journal a run writes, shared by its workers (blocking threads).
pub struct Journal {
    repo: Repository,
    header: JournalHeader,
    handle: tokio::runtime::Handle,
    every: Option<u64>,
    state: Mutex<Pending>,
}

struct Pending {
    next: u64,
    objects: Vec<(String, u64)>,
    files: Vec<Journaled>,
    bytes: u64,
    since: Instant,
}

impl Journal {
    pub fn new(repo: &Repository, header: JournalHeader, first_chunk: u64) -> Arc<Journal> {
        let every = std::env::var(JOURNAL_EVERY_VARIABLE)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .filter(|&n: &u64| n > 0);
        Arc::new(Journal {
            repo: repo.clone(),
            header,
            handle: tokio::runtime::Handle::current(),
            every,
            state: Mutex::new(Pending {
                next: first_chunk,
                objects: Vec::new(),
                files: Vec::new(),
                bytes: 0,
                since: Instant::now(),
            }),
        })
    }

    /// `object` (`size` bytes in the store) was committed holding `files`;
    /// writes a chunk when one is due. From a blocking thread.
    pub fn committed(&self, object: &str, size: u64, files: Vec<Journaled>) -> Result<()> {
        let due = {
            let mut p = self.state.lock().unwrap_or_else(|e| e.into_inner());
            p.objects.push((object.to_string(), size));
            p.bytes += files.iter().map(|f| f.entry.size).sum::<u64>();
            p.files.extend(files);
            let n = p.objects.len() as u64;
            self.every.is_some_and(|e| n >= e)
                || (self.every.is_none()
                    && (p.bytes >= JOURNAL_BYTES
                        || p.files.len() >= JOURNAL_FILES
                        || p.since.elapsed() >= JOURNAL_INTERVAL))
        };
        if due {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes what is pending as one chunk. From a blocking thread.
    pub fn flush(&self) -> Result<()> {
        let (n, chunk) = {
            let mut p = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if p.objects.is_empty() {
                return Ok(());
            }
            let n = p.next;
            p.next += 1;
            p.bytes = 0;
            p.since = Instant::now();
            let chunk = Chunk {
                header: self.header.clone(),
                objects: std::mem::take(&mut p.objects),
                files: std::mem::take(&mut p.files),
            };
            (n, chunk)
        };
        let key = layout::backup_journal_key(self.repo.stanza(), &self.header.label, n);
        self.handle
            .block_on(self.repo.put_json(&key, &chunk, PutMode::CreateNew))
            .map(|_| ())
    }
}

/// What one worker reused.
pub(super) fn add_to(report: &mut ResumeReport, other: &ResumeReport) {
    report.files += other.files;
    report.bytes += other.bytes;
    report.stored_bytes += other.stored_bytes;
    report.recopied_files += other.recopied_files;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journaled(path: &str, object: &str, size: u64) -> Journaled {
        Journaled {
            entry: FileEntry {
                path: path.into(),
                size,
                mtime: 0,
                mode: 0o600,
                sha256: String::new(),
                object: object.into(),
                offset: 0,
                length: 10,
                backup: None,
                parts: vec![],
                chunk_blocks: None,
            },
            ino: 1,
            mtime_ns: 0,
            opened_ns: 5_000_000_000,
            pages_checked: 0,
            bad_pages: vec![],
        }
    }

    /// A stored file is reused only when unchanged (size, inode, mtime),
    /// read at least a second after its last write, and stored as the new
    /// plan wants it.
    #[test]
    fn reuse_rule() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("16384");
        std::fs::write(&path, vec![1u8; 8192]).unwrap();
        let old = SystemTime::now() - Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        let label = "20260101-000000F";
        let mut j = journaled("base/1/16384", "data/00-000000.pgv", 8192);
        j.ino = meta.ino();
        j.mtime_ns = mtime_ns(&meta);
        j.opened_ns = nanos(SystemTime::now());
        let with = |j: Journaled| {
            let mut db = Scratch::new(&[FILES, OBJECTS, USED]).unwrap();
            let row = Row {
                k: j.entry.path.clone(),
                w: j.entry.size as i64,
                v: serde_json::to_vec(&j).unwrap(),
                ..Row::default()
            };
            db.insert(FILES, &[row]).unwrap();
            Resumable {
                label: label.into(),
                runs: 1,
                db: db.shared(),
                candidates: (1, j.entry.size),
                next_object: RUN_OBJECTS,
                next_chunk: 1,
            }
        };
        let yes = |r: Result<Reuse>| matches!(r, Ok(Reuse::Yes(_)));
        let no = |r: Result<Reuse>| matches!(r, Ok(Reuse::No));
        let rel = "base/1/16384";
        let r = with(j.clone());
        assert!(yes(r.reusable(rel, &path, 8192, Want::Whole)));
        assert!(matches!(
            r.reusable("base/1/99", &path, 8192, Want::Whole),
            Ok(Reuse::NotStored)
        ));
        // Another size now, or another mtime, or another inode.
        assert!(no(r.reusable(rel, &path, 16384, Want::Whole)));
        let mut moved = j.clone();
        moved.mtime_ns += 1;
        assert!(no(with(moved).reusable(rel, &path, 8192, Want::Whole)));
        let mut other = j.clone();
        other.ino += 1;
        assert!(no(with(other).reusable(rel, &path, 8192, Want::Whole)));
        // Written less than a second before it was opened: a later write
        // might not show in a coarse mtime.
        let mut fresh = j.clone();
        fresh.opened_ns = fresh.mtime_ns + 500_000_000;
        assert!(no(with(fresh).reusable(rel, &path, 8192, Want::Whole)));
        // Stored whole, but now changed blocks are wanted, and the reverse;
        // the same blocks on the same older parts are reused.
        let blocks: Ranges = vec![(0, 0)];
        let older = vec![Part {
            backup: "20251231-000000F".into(),
            object: "data/00-000000.pgv".into(),
            offset: 0,
            length: 10,
            sha256: String::new(),
            raw_size: 8192,
            blocks: None,
            chunk_blocks: None,
        }];
        assert!(no(r.reusable(
            rel,
            &path,
            8192,
            Want::Blocks(&blocks, &older)
        )));
        let mut delta = j.clone();
        delta.entry.object = String::new();
        delta.entry.parts = blockmap::chain(
            Part {
                backup: label.into(),
                object: "data/00-000000.pgv".into(),
                offset: 0,
                length: 10,
                sha256: String::new(),
                raw_size: 8192,
                blocks: Some(blocks.clone()),
                chunk_blocks: None,
            },
            older.clone(),
            8192,
        );
        let d = with(delta);
        assert!(no(d.reusable(rel, &path, 8192, Want::Whole)));
        assert!(yes(d.reusable(
            rel,
            &path,
            8192,
            Want::Blocks(&blocks, &older)
        )));
        let more: Ranges = vec![(0, 1)];
        assert!(no(d.reusable(
            rel,
            &path,
            8192,
            Want::Blocks(&more, &older)
        )));
    }

    fn header(label: &str) -> JournalHeader {
        JournalHeader::test_full(label)
    }

    /// Only files whose object a chunk names as committed, and that is
    /// there at that size, are candidates; a different header is not
    /// resumed; a backup with a manifest is not either.
    #[tokio::test]
    async fn trusts_only_committed_objects() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::local_for_tests(dir.path(), "s");
        let label = "20260101-000000F";
        let put = |name: &str, len: usize| {
            let repo = repo.clone();
            let key = layout::backup_object_key("s", label, name);
            async move {
                repo.backend()
                    .put_bytes(&key, vec![7u8; len], PutMode::CreateNew)
                    .await
                    .unwrap();
            }
        };
        put("data/00-000000.pgv", 100).await;
        put("data/00-000001.pgv", 100).await;
        // Committed after the last chunk: not named in any.
        put("data/01-000000.pgv", 100).await;
        let chunk = Chunk {
            header: header(label),
            objects: vec![
                ("data/00-000000.pgv".into(), 100),
                // Recorded at another size: not this object.
                ("data/00-000001.pgv".into(), 99),
            ],
            files: vec![
                journaled("base/1/1", "data/00-000000.pgv", 8192),
                journaled("base/1/2", "data/00-000001.pgv", 8192),
                journaled("base/1/3", "data/01-000000.pgv", 8192),
                journaled("global/pg_control", "data/00-000000.pgv", 8192),
            ],
        };
        repo.put_json(
            &layout::backup_journal_key("s", label, 0),
            &chunk,
            PutMode::CreateNew,
        )
        .await
        .unwrap();
        let r = find(&repo, &header(label), &crate::ops::progress::NoProgress)
            .await
            .unwrap()
            .expect("resumable");
        let paths: Vec<String> = Rows::by_key(r.db.clone(), FILES)
            .map(|j| j.unwrap().row.k)
            .collect();
        assert_eq!(paths, ["base/1/1"]);
        assert_eq!(r.candidates(), (1, 8192));
        assert_eq!(r.next_object, RUN_OBJECTS);
        assert_eq!(r.next_chunk, 1);

        // Found whatever label the caller had in mind.
        assert!(find(&repo, &header("x"), &crate::ops::progress::NoProgress)
            .await
            .unwrap()
            .is_some());
        let mut other = header(label);
        other.system_identifier = "8".into();
        assert!(find(&repo, &other, &crate::ops::progress::NoProgress)
            .await
            .unwrap()
            .is_none());

        repo.backend()
            .put_bytes(
                &layout::backup_manifest_key("s", label),
                b"{}".to_vec(),
                PutMode::CreateNew,
            )
            .await
            .unwrap();
        assert!(
            find(&repo, &header(label), &crate::ops::progress::NoProgress)
                .await
                .unwrap()
                .is_none()
        );
    }
}
