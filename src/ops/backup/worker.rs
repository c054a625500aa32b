//! A backup worker: takes one file at a time, decides what to store of it
//! (whole, changed blocks, nothing: the reference's or an interrupted
//! run's copy), bundles small files, and records entries, journal records
//! and block sums. Encoding is in `encode`, block sums in `sums`.

use std::fs;
use std::sync::Arc;

mod encode;
mod sums;

use super::copy::{Item, ScanFile};
use super::incr::{Decision, Plan};
use super::resume::{Journal, Journaled, Resumable, Reuse, Want};
use crate::catalog::scratch::{self, Row};
use crate::error::{Error, Result};
use crate::pg::relfile::BLOCK_SIZE;
use crate::pg::Lsn;
use crate::repo::blockmap;
use crate::repo::blocksums::SumsSink;
use crate::repo::codec::{EncodeOptions, Keys};
use crate::repo::layout;
use crate::repo::manifest::{ChangeReport, FileEntry, PageChecksums, ResumeReport};
use crate::repo::{Backend, Repository, Spool};
use encode::Counting;
use sums::merge_sums;

/// Files smaller than this go into bundles.
const BUNDLE_FILE_MAX: u64 = 1 << 20;
/// A bundle is stored once it holds this much …
const BUNDLE_TARGET: u64 = 8 << 20;
/// … or this many files: a worker holds the entries of its open bundle,
/// and empty or tiny files would put a hundred thousand in 8 MiB.
const BUNDLE_FILES_MAX: usize = 2048;
/// Entries a worker gathers before it adds them to the scratch database.
const DONE_BATCH: usize = 512;

/// Bytes this backup stored of `f` (not those it takes from others).
fn stored_size(f: &FileEntry, label: &str) -> u64 {
    match f.parts.first() {
        Some(p) if p.backup == label => p.length,
        Some(_) => 0,
        None if f.backup.is_none() => f.length,
        None => 0,
    }
}

/// An open bundle: its object, the entries in it and their journal records.
type Bundle = (Counting<Spool>, String, Vec<FileEntry>, Vec<Journaled>);

pub(super) struct Worker {
    id: usize,
    backend: Arc<dyn Backend>,
    dir: String,
    stanza: String,
    label: String,
    encode: EncodeOptions,
    /// What the objects are sealed with (none: plaintext).
    pub keys: Keys,
    handle: tokio::runtime::Handle,
    next_object: u64,
    /// The open bundle: its object, entries and their journal records.
    bundle: Option<Bundle>,
    /// Entries of stored objects, not yet in the scratch database.
    done: Vec<FileEntry>,
    /// Where the entries go (table `done`), to be read back in path order.
    db: scratch::Shared,
    /// Read buffer, reused for every file.
    buf: Vec<u8>,
    /// Check data page checksums of relation files (the backup's start).
    verify_pages: Option<Lsn>,
    pub pages: PageChecksums,
    /// The file being added is the backup's tail: the files still queued
    /// are fewer bytes than it, so the other workers will run dry before
    /// it is done, and zstd's worker threads use their cores.
    pub tail: bool,
    /// A diff or incr: what changed since its reference.
    pub plan: Option<Arc<Plan>>,
    pub counts: ChangeReport,
    /// The block sums of the relation files it stored or took.
    pub sums: Option<SumsSink>,
    /// What the interrupted runs of a resumed backup stored.
    pub resume: Option<Arc<Resumable>>,
    pub reused: ResumeReport,
    /// Where committed objects are recorded (`None`: pg_control's worker).
    pub journal: Option<Arc<Journal>>,
    /// The file last encoded when it was opened: inode, mtime (ns), when.
    last_read: (u64, i64, i64),
}

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: usize,
        repo: &Repository,
        label: &str,
        encode: EncodeOptions,
        verify_pages: Option<Lsn>,
        plan: Option<Arc<Plan>>,
        (resume, journal): (Option<Arc<Resumable>>, Option<Arc<Journal>>),
        db: scratch::Shared,
    ) -> Worker {
        Worker {
            id,
            backend: repo.backend().clone(),
            dir: layout::backup_dir(repo.stanza(), label),
            stanza: repo.stanza().to_string(),
            label: label.to_string(),
            encode,
            keys: Keys::none(),
            handle: tokio::runtime::Handle::current(),
            next_object: resume.as_ref().map_or(0, |r| r.next_object),
            bundle: None,
            done: Vec::new(),
            db,
            buf: vec![0u8; 1 << 20],
            verify_pages,
            pages: PageChecksums::default(),
            tail: true,
            plan,
            counts: ChangeReport::default(),
            sums: None,
            resume,
            reused: ResumeReport::default(),
            journal,
            last_read: (0, 0, 0),
        }
    }

    /// The interrupted run's copy of `f`, when it may be reused as `want`
    /// says: listed as done, and its size returned.
    fn reuse(&mut self, f: &ScanFile, want: Want<'_>) -> Result<Option<u64>> {
        let Some(r) = self.resume.clone() else {
            return Ok(None);
        };
        Ok(match r.reusable(&f.rel, &f.abs, f.size, want)? {
            Reuse::Yes(j) => {
                self.reused.files += 1;
                self.reused.bytes += j.entry.size;
                self.reused.stored_bytes += j.own_object(&self.label).map_or(0, |(_, _, l)| l);
                self.pages.pages_checked += j.pages_checked;
                let size = j.entry.size;
                let Journaled {
                    entry, bad_pages, ..
                } = *j;
                self.pages.bad_pages.extend(bad_pages);
                self.push_done([entry])?;
                Some(size)
            }
            Reuse::NotStored => None,
            Reuse::No => {
                self.reused.recopied_files += 1;
                None
            }
        })
    }

    /// Adds stored entries; every [`DONE_BATCH`], into the scratch
    /// database.
    fn push_done(&mut self, entries: impl IntoIterator<Item = FileEntry>) -> Result<()> {
        self.done.extend(entries);
        if self.done.len() >= DONE_BATCH {
            self.flush_done()?;
        }
        Ok(())
    }

    fn flush_done(&mut self) -> Result<()> {
        if self.done.is_empty() {
            return Ok(());
        }
        let rows = self
            .done
            .drain(..)
            .map(|e| {
                Ok(Row {
                    o: stored_size(&e, &self.label) as i64,
                    w: e.size as i64,
                    v: serde_json::to_vec(&e)
                        .map_err(|e| Error::internal(format!("serialize an entry: {e}")))?,
                    k: e.path,
                    g: String::new(),
                })
            })
            .collect::<Result<Vec<Row>>>()?;
        self.db
            .lock()
            .map_err(|_| Error::internal("scratch database: a worker failed holding it"))?
            .insert("done", &rows)?;
        Ok(())
    }

    pub fn add(&mut self, item: Item) -> Result<u64> {
        let f = &item.f;
        let decision = self
            .plan
            .as_ref()
            .map(|p| p.decide(&f.rel, f.size, item.old.as_ref()));
        let mut delta = None;
        let mut stored = f.size;
        // The reference's sums of the blocks not stored again.
        let mut base_sums = None;
        match decision {
            Some((d, why)) => {
                self.counts.fallbacks.extend(why);
                match d {
                    Decision::Same(e) => {
                        self.counts.unchanged_files += 1;
                        if let Some(s) = self.plan.as_ref().and_then(|p| p.sums_of(&e.path)) {
                            self.record_sums(&e.path, &s)?;
                        }
                        let size = e.size;
                        self.push_done([e])?;
                        return Ok(size);
                    }
                    Decision::Blocks { blocks, older } => {
                        self.counts.delta_files += 1;
                        self.counts.changed_blocks += blockmap::count(&blocks);
                        base_sums = self.plan.as_ref().and_then(|p| p.sums_of(&f.rel));
                        if let Some(size) = self.reuse(f, Want::Blocks(&blocks, &older))? {
                            self.record_reused_sums(f, base_sums, Some(&blocks))?;
                            return Ok(size);
                        }
                        stored = blockmap::count(&blocks) * BLOCK_SIZE as u64;
                        delta = Some((blocks, older));
                    }
                    Decision::CompareBlocks { old, older, sums } => {
                        self.counts.compared_files += 1;
                        let Some(blocks) = self.changed_blocks(f, &sums)? else {
                            return Ok(0); // vanished
                        };
                        if blocks.is_empty() && f.size == old.size {
                            self.counts.unchanged_files += 1;
                            self.record_sums(&old.path, &sums)?;
                            let size = old.size;
                            self.done.push(old);
                            return Ok(size);
                        }
                        self.counts.delta_files += 1;
                        self.counts.changed_blocks += blockmap::count(&blocks);
                        // Stored by the interrupted run with the same
                        // changed blocks, and not changed since.
                        if let Some(size) = self.reuse(f, Want::Blocks(&blocks, &older))? {
                            self.record_reused_sums(f, Some(sums), Some(&blocks))?;
                            return Ok(size);
                        }
                        stored = blockmap::count(&blocks) * BLOCK_SIZE as u64;
                        base_sums = Some(sums);
                        delta = Some((blocks, older));
                    }
                    Decision::Compare(old) => {
                        // Stored by the interrupted run: it differed from
                        // the reference, and has not changed since.
                        if let Some(size) = self.reuse(f, Want::Whole)? {
                            self.counts.whole_files += 1;
                            self.record_reused_sums(f, None, None)?;
                            return Ok(size);
                        }
                        self.counts.compared_files += 1;
                        if self.same_as(f, &old)? {
                            self.counts.unchanged_files += 1;
                            let size = old.size;
                            self.done.push(old);
                            return Ok(size);
                        }
                        self.counts.whole_files += 1;
                    }
                    Decision::Whole => {
                        self.counts.whole_files += 1;
                        if let Some(size) = self.reuse(f, Want::Whole)? {
                            self.record_reused_sums(f, None, None)?;
                            return Ok(size);
                        }
                    }
                }
            }
            None => {
                if let Some(size) = self.reuse(f, Want::Whole)? {
                    self.record_reused_sums(f, None, None)?;
                    return Ok(size);
                }
            }
        }
        let delta = delta.as_ref();
        let pages_before = (self.pages.pages_checked, self.pages.bad_pages.len());
        let entry = if stored >= BUNDLE_FILE_MAX {
            let (mut out, object) = self.new_object().map_err(|e| self.write_err(e))?;
            let entry = self.encode_into(f, &mut out, &object, delta, true)?;
            if let Some((e, _)) = &entry {
                let (n, journaled) = (out.n, self.journaled(e, pages_before));
                self.commit(out.inner, &object)?;
                self.record(&object, n, vec![journaled])?;
                self.push_done([e.clone()])?;
            }
            entry
        } else {
            if self.bundle.is_none() {
                let (out, object) = self.new_object().map_err(|e| self.write_err(e))?;
                self.bundle = Some((out, object, Vec::new(), Vec::new()));
            }
            let (mut out, object, mut entries, mut journaled) =
                self.bundle.take().expect("bundle was just ensured");
            let entry = self.encode_into(f, &mut out, &object, delta, false)?;
            if let Some((e, _)) = &entry {
                journaled.push(self.journaled(e, pages_before));
                entries.push(e.clone());
            }
            if out.n >= BUNDLE_TARGET || entries.len() >= BUNDLE_FILES_MAX {
                let n = out.n;
                self.commit(out.inner, &object)?;
                self.record(&object, n, journaled)?;
                self.done.extend(entries);
            } else {
                self.bundle = Some((out, object, entries, journaled));
            }
            entry
        };
        let Some((entry, sums)) = entry else {
            return Ok(0);
        };
        // The file's sums at this backup: those of the blocks read, the
        // reference's for the others (none without the reference's).
        let sums = match (sums, delta) {
            (Some(read), Some((blocks, _))) => {
                base_sums.map(|all| merge_sums(all, f.size, blocks, read))
            }
            (read, _) => read,
        };
        if let Some(s) = sums {
            self.record_sums(&f.rel, &s)?;
        }
        Ok(entry.size)
    }

    /// The journal's record of `e`, just encoded (`pages_before`: the page
    /// counts before it was).
    fn journaled(&self, e: &FileEntry, pages_before: (u64, usize)) -> Journaled {
        let (ino, mtime_ns, opened_ns) = self.last_read;
        Journaled {
            entry: e.clone(),
            ino,
            mtime_ns,
            opened_ns,
            pages_checked: self.pages.pages_checked - pages_before.0,
            bad_pages: self.pages.bad_pages[pages_before.1..].to_vec(),
        }
    }

    /// `object`, of `n` bytes, is committed holding `files`.
    fn record(&self, object: &str, n: u64, files: Vec<Journaled>) -> Result<()> {
        match &self.journal {
            Some(j) => j.committed(object, n, files),
            None => Ok(()),
        }
    }

    pub fn flush(&mut self) -> Result<()> {
        if let Some((out, object, entries, journaled)) = self.bundle.take() {
            if entries.is_empty() {
                if let Spool::LocalFile { tmp, .. } = &out.inner {
                    let _ = fs::remove_file(tmp);
                }
                return self.flush_done();
            }
            let n = out.n;
            self.commit(out.inner, &object)?;
            self.record(&object, n, journaled)?;
            self.push_done(entries)?;
        }
        self.flush_done()
    }
}
