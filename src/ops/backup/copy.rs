//! The copy of a backup's files: the walk of the data directory (into the
//! scratch database, joined there with the reference's list), the workers
//! that take the files largest first, and what they stored, gathered.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::incr::Plan;
use super::resume::{self, Journal, Resumable};
use super::worker::Worker;
use super::BackupOptions;
use crate::catalog::scratch::{self, Row, Rows, Scratch};
use crate::error::{Error, Kind, Result};
use crate::ops::progress::Progress;
use crate::ops::workers;
use crate::pg::datadir::{self, Entry};
use crate::pg::Lsn;
use crate::repo::blocksums::SumsSink;
use crate::repo::manifest::{ChangeReport, DirEntry, FileEntry, PageChecksums, ResumeReport};
use crate::repo::Repository;

/// A file to copy: path relative to the data directory (`/`-separated) and
/// where it is on disk.
#[derive(Debug, Clone)]
pub(super) struct ScanFile {
    pub rel: String,
    pub abs: PathBuf,
    pub size: u64,
}

/// One file to copy and, for a diff or incr, the reference's entry for
/// the same path.
pub(super) struct Item {
    pub f: ScanFile,
    pub old: Option<FileEntry>,
}

/// Walks the data directory and its tablespaces, handing each file to
/// `sink` (in no order); returns the directories.
fn scan(
    pgdata: &Path,
    sink: &mut dyn FnMut(ScanFile) -> io::Result<()>,
) -> io::Result<Vec<DirEntry>> {
    let mut dirs = Vec::new();
    let mut stack: Vec<(PathBuf, String)> = vec![(pgdata.to_path_buf(), String::new())];
    while let Some((abs_dir, rel_dir)) = stack.pop() {
        let rd = match fs::read_dir(&abs_dir) {
            Ok(rd) => rd,
            // A directory dropped while we walk (DROP DATABASE): WAL replay
            // takes care of it.
            Err(e) if e.kind() == io::ErrorKind::NotFound && !rel_dir.is_empty() => continue,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("read {}: {e}", abs_dir.display()),
                ))
            }
        };
        for entry in rd {
            let entry = entry.map_err(|e| {
                io::Error::new(e.kind(), format!("read {}: {e}", abs_dir.display()))
            })?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                continue;
            };
            let rel = if rel_dir.is_empty() {
                name.to_string()
            } else {
                format!("{rel_dir}/{name}")
            };
            let abs = entry.path();
            // Follow symlinks: tablespaces (pg_tblspc/<oid>) and a pg_wal
            // that lives elsewhere.
            let meta = match fs::metadata(&abs) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("stat {}: {e}", abs.display()),
                    ))
                }
            };
            let is_dir = meta.is_dir();
            match datadir::classify(&rel, is_dir) {
                Entry::Skip => {}
                Entry::EmptyDir => dirs.push(DirEntry {
                    path: rel,
                    mode: meta.permissions().mode() & 0o7777,
                }),
                Entry::Copy if is_dir => {
                    dirs.push(DirEntry {
                        path: rel.clone(),
                        mode: meta.permissions().mode() & 0o7777,
                    });
                    stack.push((abs, rel));
                }
                Entry::Copy if meta.is_file() => sink(ScanFile {
                    rel,
                    abs,
                    size: meta.len(),
                })?,
                Entry::Copy => {}
            }
        }
    }
    dirs.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(dirs)
}

/// What the copy stored: its entries (table `done` of the scratch
/// database, read back in path order for the file list), the directories,
/// the page checks, the change counts and the sizes.
pub(super) struct Copied {
    pub db: scratch::Shared,
    pub dirs: Vec<DirEntry>,
    pub pages: Option<PageChecksums>,
    pub counts: ChangeReport,
    pub original_size: u64,
    pub stored_size: u64,
    /// The workers' block sums, for the backup's block sums object.
    pub sums: Vec<SumsSink>,
    /// What a resumed backup took from its interrupted runs.
    pub reused: ResumeReport,
}

/// Rows added to the scratch database at once.
const SCAN_BATCH: usize = 4096;

/// The entries stored, in path order, from the scratch database.
pub(super) fn done_entries(
    db: scratch::Shared,
) -> impl Iterator<Item = Result<FileEntry>> + Send + 'static {
    Rows::by_key(db, "done").map(|r| {
        let r = r?;
        serde_json::from_slice::<FileEntry>(&r.row.v)
            .map_err(|e| Error::internal(format!("the entry of {}: {e}", r.row.k)))
    })
}

/// Copies the files. Memory stays flat in the
/// number of files (issue 14): the walk of the data directory, the
/// reference's file list and the entries the workers make go to a scratch
/// database on disk; workers take files from it largest first (each
/// joined there with the reference's entry of the same path), and the list
/// is written from it in path order (by the caller, with the block sums).
pub(super) async fn copy_files(
    repo: &Repository,
    label: &str,
    pgdata: &Path,
    opts: &BackupOptions,
    (verify_pages, plan): (Option<Lsn>, Option<Arc<Plan>>),
    (resume, journal): (Option<Arc<Resumable>>, Arc<Journal>),
    progress: Arc<dyn Progress>,
) -> Result<Copied> {
    let reference = match &plan {
        Some(p) => Some(repo.file_list(&p.reference).await?),
        None => None,
    };
    let dir = pgdata.to_path_buf();
    let (db, dirs, control, count, total) = tokio::task::spawn_blocking(move || -> Result<_> {
        let mut s = Scratch::new(&["scan", "refs", "done"])?;
        let mut batch = Vec::with_capacity(SCAN_BATCH);
        let mut control = None;
        let add = |s: &mut Scratch, batch: &mut Vec<Row>, table: &str, flush: bool| {
            if batch.len() >= SCAN_BATCH || (flush && !batch.is_empty()) {
                s.insert(table, batch)?;
                batch.clear();
            }
            Ok::<(), scratch::ScratchError>(())
        };
        let dirs = scan(&dir, &mut |f| {
            if f.rel == datadir::PG_CONTROL {
                control = Some(f);
                return Ok(());
            }
            batch.push(Row {
                w: f.size as i64,
                k: f.rel,
                ..Row::default()
            });
            add(&mut s, &mut batch, "scan", false).map_err(io::Error::other)
        })
        .map_err(|e| Error::io_in(Kind::InvalidInput, "read the data directory", &e))?;
        add(&mut s, &mut batch, "scan", true)?;
        if let Some(list) = reference {
            for e in list.iter()? {
                let e = e?;
                batch.push(Row {
                    v: serde_json::to_vec(&e)
                        .map_err(|e| Error::internal(format!("serialize an entry: {e}")))?,
                    k: e.path,
                    ..Row::default()
                });
                add(&mut s, &mut batch, "refs", false)?;
            }
            add(&mut s, &mut batch, "refs", true)?;
        }
        s.index("scan")?;
        let count = s.count("scan")?;
        let (_, total) = s.sums("scan")?;
        Ok((s.shared(), dirs, control, count, total as u64))
    })
    .await??;
    let control = control.ok_or_else(|| {
        Error::new(
            Kind::InvalidInput,
            format!("{} has no {}", pgdata.display(), datadir::PG_CONTROL),
        )
    })?;
    progress.phase("copy files");
    progress.set_total(count + 1, total + control.size);

    let workers = opts.process_max.max(1);
    let keys = repo.keys().await?;
    let new_worker = |id| {
        let resume = (resume.clone(), Some(journal.clone()));
        let mut w = Worker::new(
            id,
            repo,
            label,
            opts.encode,
            verify_pages,
            plan.clone(),
            resume,
            db.clone(),
        );
        w.keys = keys.clone();
        w
    };
    let states: Vec<Worker> = (0..workers).map(new_worker).collect();
    let progress2 = progress.clone();
    // Bytes no worker has taken yet.
    let queued = std::sync::atomic::AtomicU64::new(total);
    let work = move |w: &mut Worker, item: Item| -> Result<()> {
        let size = item.f.size;
        let left = queued
            .fetch_sub(size, std::sync::atomic::Ordering::Relaxed)
            .saturating_sub(size);
        w.tail = workers == 1 || left < size;
        let size = w.add(item)?;
        progress2.file_done(size);
        Ok(())
    };
    // Largest first, so the long files start early and the small ones
    // fill in.
    let root = pgdata.to_path_buf();
    let join = plan.as_ref().map(|_| "refs");
    let items = Rows::heaviest_first(db.clone(), "scan", join).map(move |r| {
        let j = r?;
        let old = match j.other {
            Some(v) => Some(serde_json::from_slice::<FileEntry>(&v).map_err(|e| {
                Error::internal(format!("the reference's entry of {}: {e}", j.row.k))
            })?),
            None => None,
        };
        Ok(Item {
            f: ScanFile {
                abs: root.join(&j.row.k),
                rel: j.row.k,
                size: j.row.w as u64,
            },
            old,
        })
    });
    let done = workers::run(items, states, work, |mut w: Worker| {
        w.flush()?;
        // What is stored is in the journal before the backup waits for its
        // WAL (which can take long).
        if let Some(j) = &w.journal {
            j.flush()?;
        }
        Ok((w.pages, w.counts, w.sums, w.reused))
    })
    .await?;
    let mut pages = PageChecksums::default();
    let mut counts = ChangeReport::default();
    let mut sums = Vec::new();
    let mut reused = ResumeReport::default();
    for (p, c, s, r) in done {
        sums.extend(s);
        resume::add_to(&mut reused, &r);
        counts.unchanged_files += c.unchanged_files;
        counts.delta_files += c.delta_files;
        counts.changed_blocks += c.changed_blocks;
        counts.whole_files += c.whole_files;
        counts.compared_files += c.compared_files;
        counts.compared_blocks += c.compared_blocks;
        counts.fallbacks.extend(c.fallbacks);
        pages.pages_checked += p.pages_checked;
        pages.bad_pages.extend(p.bad_pages);
    }
    pages
        .bad_pages
        .sort_by(|a, b| (&a.path, a.block).cmp(&(&b.path, b.block)));
    // pg_control last, in an object of its own.
    let mut w = new_worker(workers);
    // pg_control is not a relation file: always whole; and always read by
    // this run, never reused.
    w.plan = None;
    w.resume = None;
    w.journal = None;
    let db2 = db.clone();
    let (control_size, db_sums) = tokio::task::spawn_blocking(move || -> Result<_> {
        let size = w.add(Item {
            f: control,
            old: None,
        })?;
        w.flush()?;
        let s = db2
            .lock()
            .map_err(|_| Error::internal("scratch database: a worker failed holding it"))?;
        if s.get("done", datadir::PG_CONTROL)?.is_none() {
            return Err(Error::new(
                Kind::InvalidInput,
                "global/pg_control vanished during the backup",
            ));
        }
        Ok((size, s.sums("done")?))
    })
    .await??;
    progress.file_done(control_size);
    counts.fallbacks.sort();
    Ok(Copied {
        db,
        dirs,
        pages: verify_pages.map(|_| pages),
        counts,
        original_size: db_sums.1 as u64,
        stored_size: db_sums.0 as u64,
        sums,
        reused,
    })
}
