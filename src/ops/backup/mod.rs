//! `backup`: a base backup of a running cluster, full, or differential or
//! incremental (only what changed since a reference backup: `incr`).
//!
//! Order (each step only after the previous one succeeded):
//! 0. choose the server to copy (`backup-standby`, see [`super::standby`]):
//!    this node's, a primary or a standby, and check that `--pgdata` is
//!    that server's data directory;
//! 1. prove archiving works (on the primary): a failing archiver would
//!    make the backup useless (its WAL would never arrive); from a
//!    standby, wait until it has replayed past the primary's checkpoint;
//! 2. `pg_backup_start` in one session;
//! 3. copy the data directory from local disk — several files at once, each
//!    streamed through SHA-256 and zstd into the repository, small files
//!    bundled — and `global/pg_control` last;
//! 4. `pg_backup_stop`, which returns `backup_label` and `tablespace_map`
//!    (from a standby: still a standby on the same timeline, and the
//!    primary switches WAL so that the stop segment is archived);
//! 5. wait, with a bound, until the WAL from start to stop is archived;
//! 6. write the manifest. Only now is the backup complete: an interrupted
//!    backup has no manifest and is never offered for restore.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

mod incr;
mod resume;

pub use incr::BackupKind;

use crate::catalog::scratch::{self, Row, Rows, Scratch};
use crate::error::{Error, Kind, Result};
use crate::ops::check::{prove_archiving, wait_for_wal};
use crate::ops::pg_error;
use crate::ops::progress::Progress;
use crate::ops::standby::{self, PrimaryOverride, StandbyMode};
use crate::ops::stanza_create::read_cluster;
use crate::ops::workers;
use crate::pg::conn::ConnParams;
use crate::pg::datadir::{self, Entry};
use crate::pg::page::PageVerifier;
use crate::pg::recovery::parse_backup_label;
use crate::pg::relfile::{RelFile, BLOCK_SIZE};
use crate::pg::{Lsn, WalFileName};
use crate::repo::blockmap::{self, Part, Ranges};
use crate::repo::blocksums::{self, BlockSum, Summer, SumsSink};
use crate::repo::chunked::{PieceEncoder, CHUNK_BLOCKS};
use crate::repo::codec::{Binding, EncodeOptions, Keys};
use crate::repo::filelist::InlineFiles;
use crate::repo::layout;
use crate::repo::manifest::{
    BackupHeader, BadPageEntry, ChangeReport, DirEntry, FileEntry, Manifest, PageChecksums,
    ResumeReport, Tablespace, MANIFEST_FORMAT,
};
use crate::repo::{Backend, PutMode, Repository, Spool};
use incr::{BlockReader, Decision, Plan};
use resume::{Journal, JournalHeader, Journaled, Resumable, Want};

#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// `--type`: full, diff or incr.
    pub kind: BackupKind,
    /// This node's server: its data directory and connection.
    pub pgdata: PathBuf,
    pub conn: ConnParams,
    /// `backup-standby`: whether this node must, may or must not be a
    /// standby.
    pub standby: StandbyMode,
    /// How to reach the primary from a standby, where its own connection
    /// to it is not the way.
    pub primary: PrimaryOverride,
    pub start_fast: bool,
    pub process_max: usize,
    /// `threads`: zstd worker threads for a large file while the other
    /// workers have nothing left to do (the tail of the backup, or
    /// `process_max` 1); otherwise each file is compressed on its worker's
    /// own thread.
    pub encode: EncodeOptions,
    /// Bound on waiting for WAL to reach the repository.
    pub archive_timeout: Duration,
    /// `resume`: continue an interrupted backup that fits (see `resume`).
    pub resume: bool,
    /// The local cache of backup headers, for choosing a reference without
    /// reading every manifest.
    pub catalog: Option<crate::catalog::Catalog>,
}

/// Files smaller than this go into bundles.
const BUNDLE_FILE_MAX: u64 = 1 << 20;
/// A bundle is stored once it holds this much …
const BUNDLE_TARGET: u64 = 8 << 20;
/// … or this many files: a worker holds the entries of its open bundle,
/// and empty or tiny files would put a hundred thousand in 8 MiB.
const BUNDLE_FILES_MAX: usize = 2048;
/// Entries a worker gathers before it adds them to the scratch database.
const DONE_BATCH: usize = 512;

pub async fn backup(
    repo: &Repository,
    opts: &BackupOptions,
    progress: Arc<dyn Progress>,
) -> Result<Manifest> {
    let context = || format!("backup of {}", opts.pgdata.display());
    let lock = repo
        .lock("backup")
        .await
        .map_err(|e| e.context(context()))?;
    let result = backup_inner(repo, opts, progress).await;
    let released = lock.release().await;
    let manifest = result.map_err(|e| e.context(context()))?;
    released.map_err(|e| e.context(context()))?;
    Ok(manifest)
}

async fn backup_inner(
    repo: &Repository,
    opts: &BackupOptions,
    progress: Arc<dyn Progress>,
) -> Result<Manifest> {
    let stanza = repo.require_stanza().await?;
    let db = stanza.current().clone();
    let source = standby::choose(
        opts.standby,
        &opts.conn,
        &opts.pgdata,
        &opts.primary,
        &*progress,
    )
    .await?;
    let pgdata = source.pgdata.as_path();
    let cluster = read_cluster(pgdata.to_path_buf()).await?;
    if cluster.control.system_identifier != db.system_id() {
        return Err(Error::stanza(format!(
            "{} is cluster {}, but stanza {:?} archives cluster {}",
            pgdata.display(),
            cluster.control.system_identifier,
            repo.stanza(),
            db.system_identifier
        ))
        .hint("after pg_upgrade run `pgvault stanza-upgrade --pgdata <new PGDATA>` first"));
    }

    let session = &source.session;
    if session.major != db.pg_version {
        return Err(Error::stanza(format!(
            "the server runs PostgreSQL {}, the stanza records {}",
            session.major, db.pg_version
        )));
    }
    standby::check_datadir(session, &source.params, pgdata).await?;
    let primary = source.primary.as_ref();
    let archiving_on = primary.map(|p| &p.session).unwrap_or(session);
    prove_archiving(repo, &db, archiving_on, opts.archive_timeout, &*progress).await?;
    if let Some(p) = primary {
        standby::wait_replayed(
            session,
            p,
            opts.start_fast,
            opts.archive_timeout,
            &*progress,
        )
        .await?;
    }

    // The reference of a diff or incr, chosen before the backup starts;
    // none: a full backup. The timeline is the one the primary writes (a
    // standby cannot name its current WAL file; it replays the primary's
    // timeline, which `standby` checked).
    let tli_now = archiving_on.current_timeline().await.map_err(pg_error)?;
    let history = if opts.kind == BackupKind::Full {
        None
    } else {
        incr::history_of(repo, &db, tli_now).await?
    };
    let reference = incr::choose_reference(
        repo,
        opts.catalog.as_ref(),
        &db,
        opts.kind,
        history.as_ref(),
        &*progress,
    )
    .await?;
    let kind = match (&reference, &history) {
        (Some(_), Some(_)) => opts.kind,
        _ => BackupKind::Full,
    };
    // An interrupted backup of the same kind on the same reference is
    // continued in its directory (see `resume`).
    let mut journal_header = JournalHeader {
        format: resume::JOURNAL_FORMAT,
        label: String::new(),
        backup_type: kind.as_str().into(),
        reference: reference.as_ref().map(|r| r.label.clone()),
        system_identifier: db.system_identifier.clone(),
        db_id: db.id,
        pg_version: db.pg_version,
    };
    let resumed = match opts.resume {
        true => resume::find(repo, &journal_header, &*progress)
            .await?
            .map(Arc::new),
        false => None,
    };
    let label = match &resumed {
        Some(r) => r.label.clone(),
        None => new_label(repo, kind.suffix()).await?,
    };
    journal_header.label = label.clone();
    let journal = Journal::new(
        repo,
        journal_header,
        resumed.as_ref().map_or(0, |r| r.next_chunk),
    );
    let from = match primary {
        Some(p) => format!(
            "from the standby at {} (primary {})",
            source.params.describe(),
            p.params.describe()
        ),
        None => format!("from the primary at {}", source.params.describe()),
    };
    let on = match &reference {
        Some(r) => format!("{} backup on {}", kind.as_str(), r.label),
        None => "full backup".to_string(),
    };
    if let Some(r) = &resumed {
        let (files, bytes) = r.candidates();
        progress.message(&format!(
            "backup {label}: resuming the interrupted {on}: {files} files ({:.1} MiB) it stored \
             are reused where unchanged since",
            bytes as f64 / (1 << 20) as f64
        ));
    }
    progress.message(&format!(
        "backup {label}: {on}, starting {from}, files from {} ({}checkpoint)",
        pgdata.display(),
        if opts.start_fast { "fast " } else { "" }
    ));
    let start_lsn = session
        .backup_start(&format!("pgvault {label}"), opts.start_fast)
        .await
        .map_err(pg_error)?;
    let start_time = session.now_utc().await.map_err(pg_error)?;
    let tablespaces: Vec<Tablespace> = session
        .tablespaces()
        .await
        .map_err(pg_error)?
        .into_iter()
        .map(|(oid, name, location)| Tablespace {
            oid,
            name,
            location,
        })
        .collect();

    // With data checksums, every page is checked as it is read (pages
    // changed after the start are not: WAL replay rewrites them).
    let verify_pages = (cluster.control.data_checksum_version != 0).then_some(start_lsn);
    let plan = match (reference, &history) {
        (Some(r), Some(h)) => {
            // The segment holding the start must be archived to read its
            // block references: switch to the next one.
            let seg = db.wal_segment_size;
            let started = async {
                archiving_on.write_and_switch().await.map_err(pg_error)?;
                let at = start_lsn.segno(seg);
                wait_for_wal(
                    repo,
                    &db,
                    h.timeline_at(start_lsn),
                    at,
                    at,
                    opts.archive_timeout,
                )
                .await?;
                incr::plan(repo, &db, h, r, start_lsn, &*progress).await
            }
            .await;
            match started {
                Ok(p) => Some(Arc::new(p)),
                Err(e) => {
                    let _ = session.backup_stop().await;
                    return Err(e);
                }
            }
        }
        _ => None,
    };
    let copied = copy_files(
        repo,
        &label,
        pgdata,
        opts,
        (verify_pages, plan.clone()),
        (resumed.clone(), journal),
        progress.clone(),
    )
    .await;
    // Stop the backup whatever happened to the copy: leaving it running
    // would hold back WAL removal until the session ends.
    let stop = session.backup_stop().await.map_err(pg_error);
    if primary.is_some() {
        standby::still_standby(session).await?;
    }
    let Copied {
        db: scratch_db,
        dirs,
        pages: page_checksums,
        counts,
        original_size,
        stored_size,
        sums,
        reused,
    } = copied?;
    let (reference, depends_on, changes) = match &plan {
        Some(p) => {
            let mut r = p.report.clone();
            r.unchanged_files = counts.unchanged_files;
            r.delta_files = counts.delta_files;
            r.changed_blocks = counts.changed_blocks;
            r.whole_files = counts.whole_files;
            r.compared_files = counts.compared_files;
            r.compared_blocks = counts.compared_blocks;
            for f in &counts.fallbacks {
                progress.message(&format!("falling back to the whole file: {f}"));
            }
            r.fallbacks.extend(counts.fallbacks);
            let mut chain = vec![p.reference.label.clone()];
            chain.extend(p.reference.depends_on.iter().cloned());
            (Some(p.reference.label.clone()), chain, Some(r))
        }
        None => (None, Vec::new(), None),
    };
    if let Some(pc) = &page_checksums {
        for b in &pc.bad_pages {
            progress.message(&format!(
                "warning: {} ({} fork) block {}: page checksum {} does not match its contents ({}); \
                 the backup holds the page as it is on disk",
                b.path, b.fork, b.block, b.stored, b.computed
            ));
        }
    }
    let stop = stop?;
    let stop_time = session.now_utc().await.map_err(pg_error)?;
    let parsed = parse_backup_label(&stop.backup_label).map_err(|e| {
        Error::new(
            Kind::Postgres,
            format!("backup stop returned a bad backup_label: {e}"),
        )
    })?;
    if parsed.start_lsn != start_lsn {
        return Err(Error::new(
            Kind::Postgres,
            format!(
                "backup_label starts at {} but the backup started at {start_lsn}",
                parsed.start_lsn
            ),
        ));
    }
    let tli = parsed.start_timeline;
    let seg = db.wal_segment_size;
    let first = start_lsn.segno(seg);
    let last = stop.lsn.prev_segno(seg).max(first);
    if let Some(p) = primary {
        standby::finish_on_primary(session, p, tli, stop.lsn, seg).await?;
    }

    progress.message(&format!(
        "backup {label}: waiting for WAL {} … {} to be archived",
        WalFileName::for_segment(tli, first, seg),
        WalFileName::for_segment(tli, last, seg)
    ));
    wait_for_wal(repo, &db, tli, first, last, opts.archive_timeout).await?;

    if resumed.is_some() {
        // An interrupted run may have written its block sums and file list
        // just before it stopped: this run's replace them.
        let keys = vec![
            layout::backup_block_sums_key(repo.stanza(), &label),
            layout::backup_file_list_key(repo.stanza(), &label),
        ];
        repo.delete_all(&crate::repo::Deletion::phased([keys]))
            .await?;
    }
    repo.write_block_sums(
        &label,
        sums,
        EncodeOptions {
            threads: 0,
            ..opts.encode
        },
    )
    .await?;
    // Objects of the interrupted runs this backup does not list go first:
    // a complete backup holds only what its manifest names.
    let resumed = match &resumed {
        Some(r) => {
            r.delete_unused(repo, done_entries(scratch_db.clone()))
                .await?;
            Some(ResumeReport {
                interrupted_runs: r.runs,
                ..reused
            })
        }
        None => None,
    };
    // The file list, in path order, from the scratch database.
    let file_list = repo
        .write_file_list(&label, done_entries(scratch_db))
        .await?;
    let manifest = Manifest {
        header: BackupHeader {
            format: MANIFEST_FORMAT,
            label: label.clone(),
            backup_type: kind.as_str().into(),
            reference,
            depends_on,
            changes,
            start_lsn,
            stop_lsn: stop.lsn,
            start_time,
            stop_time,
            timeline: tli,
            pg_version: db.pg_version,
            system_identifier: db.system_identifier.clone(),
            db_id: db.id,
            wal_segment_size: seg,
            wal_start: WalFileName::for_segment(tli, first, seg)
                .as_str()
                .to_string(),
            wal_stop: WalFileName::for_segment(tli, last, seg)
                .as_str()
                .to_string(),
            original_size,
            stored_size,
            file_count: file_list.count,
            page_checksums,
            resumed,
        },
        backup_label: stop.backup_label,
        tablespace_map: stop.tablespace_map,
        tablespaces,
        dirs,
        file_list: Some(file_list),
        inline_files: InlineFiles::default(),
    };
    repo.write_manifest(&manifest).await?;
    // The manifest says it all now; a journal left behind (this failing) is
    // deleted with the backup.
    if let Err(e) = resume::delete_journal(repo, &label).await {
        progress.message(&format!(
            "warning: backup {label} is complete, but its journal was not deleted: {e}"
        ));
    }
    progress.finish();
    Ok(manifest)
}

/// Bytes this backup stored of `f` (not those it takes from others).
fn stored_size(f: &FileEntry, label: &str) -> u64 {
    match f.parts.first() {
        Some(p) if p.backup == label => p.length,
        Some(_) => 0,
        None if f.backup.is_none() => f.length,
        None => 0,
    }
}

/// Labels are UTC, sort by time and are unique: `20261126-031500F` (`D`
/// a differential, `I` an incremental backup).
async fn new_label(repo: &Repository, suffix: char) -> Result<String> {
    let existing = repo.backup_dir_labels().await?;
    loop {
        let stamp = chrono::Utc::now().format("%Y%m%d-%H%M%S").to_string();
        let label = format!("{stamp}{suffix}");
        if !existing.iter().any(|l| l.starts_with(&stamp)) {
            return Ok(label);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A file to copy: path relative to the data directory (`/`-separated) and
/// where it is on disk.
#[derive(Debug, Clone)]
struct ScanFile {
    rel: String,
    abs: PathBuf,
    size: u64,
}

/// One file to copy and, for a diff or incr, the reference's entry for
/// the same path.
struct Item {
    f: ScanFile,
    old: Option<FileEntry>,
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

/// Counts what passes through, so bundle offsets are known.
struct Counting<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// An open bundle: its object, the entries in it and their journal records.
type Bundle = (Counting<Spool>, String, Vec<FileEntry>, Vec<Journaled>);

struct Worker {
    id: usize,
    backend: Arc<dyn Backend>,
    dir: String,
    stanza: String,
    label: String,
    encode: EncodeOptions,
    /// What the objects are sealed with (none: plaintext).
    keys: Keys,
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
    pages: PageChecksums,
    /// The file being added is the backup's tail: the files still queued
    /// are fewer bytes than it, so the other workers will run dry before
    /// it is done, and zstd's worker threads use their cores.
    tail: bool,
    /// A diff or incr: what changed since its reference.
    plan: Option<Arc<Plan>>,
    counts: ChangeReport,
    /// The block sums of the relation files it stored or took.
    sums: Option<SumsSink>,
    /// What the interrupted runs of a resumed backup stored.
    resume: Option<Arc<Resumable>>,
    reused: ResumeReport,
    /// Where committed objects are recorded (`None`: pg_control's worker).
    journal: Option<Arc<Journal>>,
    /// The file last encoded when it was opened: inode, mtime (ns), when.
    last_read: (u64, i64, i64),
}

impl Worker {
    #[allow(clippy::too_many_arguments)]
    fn new(
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

    /// Records the block sums of relation file `rel`.
    fn record_sums(&mut self, rel: &str, sums: &[BlockSum]) -> Result<()> {
        let err =
            |e: io::Error| Error::io_in(Kind::Internal, "keep block sums in a temporary file", &e);
        if self.sums.is_none() {
            self.sums = Some(SumsSink::new().map_err(err)?);
        }
        let sink = self.sums.as_mut().expect("sink was just ensured");
        sink.add(rel, sums).map_err(err)
    }

    fn new_object(&mut self) -> io::Result<(Counting<Spool>, String)> {
        let name = layout::backup_object_name(self.id, self.next_object);
        self.next_object += 1;
        let spool = self.backend.spool(&format!("{}/data", self.dir))?;
        Ok((Counting { inner: spool, n: 0 }, name))
    }

    fn commit(&self, spool: Spool, object: &str) -> Result<()> {
        let key = layout::backup_object_key(&self.stanza, &self.label, object);
        self.handle
            .block_on(self.backend.commit(spool, &key, PutMode::CreateNew))
            .map(|_| ())
    }

    /// Encodes one file (or with `delta`, the given blocks of it, the rest
    /// from older parts) into `out`; `None` if it vanished (a dropped
    /// relation: WAL replay removes it anyway). With the entry, the sums of
    /// the blocks stored, in order, for a relation file.
    /// A relation file or part stored alone (a megabyte or more) is
    /// stored in chunks (`repo::chunked`), for `restore --delta` to fetch
    /// alone.
    fn encode_into(
        &mut self,
        f: &ScanFile,
        out: &mut Counting<Spool>,
        object: &str,
        delta: Option<&(Ranges, Vec<Part>)>,
        alone: bool,
    ) -> Result<Option<(FileEntry, Option<Vec<BlockSum>>)>> {
        let file = match File::open(&f.abs) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(Kind::InvalidInput, "open", f.abs.display(), &e)),
        };
        let opened = resume::nanos(std::time::SystemTime::now());
        let meta = file
            .metadata()
            .map_err(|e| Error::io(Kind::InvalidInput, "stat", f.abs.display(), &e))?;
        self.last_read = (meta.ino(), resume::mtime_ns(&meta), opened);
        let offset = out.n;
        // zstd worker threads only pay off for large files (starting them
        // for each small file of a bundle would cost more than it saves),
        // and only when the cores are not busy with other workers' files
        // (they cost CPU: each job re-reads the previous one's tail).
        let encode = if f.size >= BUNDLE_FILE_MAX && self.tail {
            self.encode
        } else {
            EncodeOptions {
                threads: 0,
                ..self.encode
            }
        };
        let chunk_blocks = (alone && RelFile::parse(&f.rel).is_some()).then_some(CHUNK_BLOCKS);
        // Bound to the object and the offset in it: a file moved inside a
        // bundle, or to another bundle, does not open.
        let key = layout::backup_object_key(&self.stanza, &self.label, object);
        let mut enc = PieceEncoder::new(
            &mut *out,
            encode,
            chunk_blocks.is_some(),
            &self.keys,
            Binding::at(&key, offset),
        )
        .map_err(|e| self.write_err(e))?;
        let relfile = self
            .verify_pages
            .and(RelFile::parse(&f.rel))
            .filter(|_| delta.is_none());
        let mut verifier = relfile
            .zip(self.verify_pages)
            .map(|(r, start)| PageVerifier::new(r, start));
        let mut summer = RelFile::parse(&f.rel).map(|_| Summer::new());
        let mut r: Box<dyn Read> = match delta {
            Some((blocks, _)) => Box::new(BlockReader::new(file, blocks)),
            None => Box::new(file),
        };
        let mut buf = std::mem::take(&mut self.buf);
        let copied = loop {
            let n = match r.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(Error::io(Kind::InvalidInput, "read", f.abs.display(), &e)),
            };
            if let Err(e) = enc.write_all(&buf[..n]) {
                break Err(self.write_err(e));
            }
            if let Some(v) = verifier.as_mut() {
                let _ = v.write_all(&buf[..n]); // never fails
            }
            if let Some(s) = summer.as_mut() {
                let _ = s.write_all(&buf[..n]); // never fails
            }
        };
        self.buf = buf;
        copied?;
        if let (Some(v), Some(rf)) = (verifier, relfile) {
            let report = v.finish(&f.abs).map_err(|e| {
                Error::new(
                    Kind::InvalidInput,
                    format!("read {} again to check its pages: {e}", f.abs.display()),
                )
            })?;
            self.pages.pages_checked += report.checked;
            self.pages
                .bad_pages
                .extend(report.bad.into_iter().map(|b| BadPageEntry {
                    path: f.rel.clone(),
                    fork: rf.fork.name().to_string(),
                    block: b.block,
                    stored: b.stored,
                    computed: b.computed,
                }));
        }
        let (_, digest) = enc.finish().map_err(|e| self.write_err(e))?;
        let (mtime, mode) = (meta.mtime(), meta.permissions().mode() & 0o7777);
        let sums = summer.map(Summer::finish);
        if let Some((blocks, older)) = delta {
            let part = Part {
                backup: self.label.clone(),
                object: object.to_string(),
                offset,
                length: out.n - offset,
                sha256: digest.sha256.to_hex(),
                raw_size: digest.size,
                blocks: Some(blocks.clone()),
                chunk_blocks,
            };
            let entry = FileEntry {
                path: f.rel.clone(),
                size: f.size,
                mtime,
                mode,
                sha256: String::new(),
                object: String::new(),
                offset: 0,
                length: 0,
                backup: None,
                parts: blockmap::chain(part, older.clone(), f.size),
                chunk_blocks: None,
            };
            return Ok(Some((entry, sums)));
        }
        let entry = FileEntry {
            path: f.rel.clone(),
            size: digest.size,
            mtime,
            mode,
            sha256: digest.sha256.to_hex(),
            object: object.to_string(),
            offset,
            length: out.n - offset,
            backup: None,
            parts: Vec::new(),
            chunk_blocks,
        };
        Ok(Some((entry, sums)))
    }

    fn write_err(&self, e: io::Error) -> Error {
        let dir = format!("{}/{}", self.backend.describe(), self.dir);
        Error::io(Kind::Repository, "write to", dir, &e)
    }

    /// Whether `f` on disk is the reference's copy `old` (size and SHA-256;
    /// a file that vanished is not).
    fn same_as(&mut self, f: &ScanFile, old: &FileEntry) -> Result<bool> {
        let mut file = match File::open(&f.abs) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::io(Kind::InvalidInput, "open", f.abs.display(), &e)),
        };
        let mut h = crate::repo::codec::HashingWriter::new(io::sink());
        io::copy(&mut file, &mut h)
            .map_err(|e| Error::io(Kind::InvalidInput, "read", f.abs.display(), &e))?;
        let (_, d) = h.finish();
        Ok(d.size == old.size && d.sha256.to_hex() == old.sha256)
    }

    /// The interrupted run's copy of `f`, when it may be reused as `want`
    /// says: listed as done, and its size returned.
    fn reuse(&mut self, f: &ScanFile, want: Want<'_>) -> Result<Option<u64>> {
        let Some(r) = self.resume.clone() else {
            return Ok(None);
        };
        Ok(match r.reusable(&f.rel, &f.abs, f.size, want) {
            Ok(Some(j)) => {
                self.reused.files += 1;
                self.reused.bytes += j.entry.size;
                self.reused.stored_bytes += j.own_object(&self.label).map_or(0, |(_, _, l)| l);
                self.pages.pages_checked += j.pages_checked;
                self.pages.bad_pages.extend(j.bad_pages.iter().cloned());
                self.push_done([j.entry.clone()])?;
                Some(j.entry.size)
            }
            Ok(None) => None,
            Err(()) => {
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

    fn add(&mut self, item: Item) -> Result<u64> {
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

    /// Records the block sums of relation file `f`, reused from an
    /// interrupted run: unchanged since that run read it, so its blocks on
    /// disk are those stored — all of them, or only `blocks` over the
    /// reference's sums `base` (none without the reference's).
    fn record_reused_sums(
        &mut self,
        f: &ScanFile,
        base: Option<Vec<BlockSum>>,
        blocks: Option<&Ranges>,
    ) -> Result<()> {
        if RelFile::parse(&f.rel).is_none() {
            return Ok(());
        }
        let Some(disk) = blocksums::sums_of_file(&f.abs)
            .map_err(|e| Error::io(Kind::InvalidInput, "read", f.abs.display(), &e))?
        else {
            return Ok(()); // vanished: replay recreates or drops it
        };
        let sums = match blocks {
            None => Some(disk),
            Some(blocks) => base.map(|all| {
                let read = blocks.iter().flat_map(|&(a, b)| a..=b).map(|b| {
                    disk.get(b as usize)
                        .copied()
                        .unwrap_or([0; blocksums::SUM_LEN])
                });
                merge_sums(all, f.size, blocks, read)
            }),
        };
        match sums {
            Some(s) => self.record_sums(&f.rel, &s),
            None => Ok(()),
        }
    }

    /// The blocks of `f` whose sums differ from the reference's `sums`
    /// (or that the reference does not have); `None` if it vanished.
    fn changed_blocks(&mut self, f: &ScanFile, sums: &[BlockSum]) -> Result<Option<Ranges>> {
        let read = blocksums::sums_of_file(&f.abs)
            .map_err(|e| Error::io(Kind::InvalidInput, "read", f.abs.display(), &e))?;
        let Some(disk) = read else {
            return Ok(None);
        };
        let n = blockmap::block_count(f.size);
        self.counts.compared_blocks += u64::from(n);
        let changed = (0..n).filter(|&b| {
            let i = b as usize;
            disk.get(i).is_none() || sums.get(i) != disk.get(i)
        });
        Ok(Some(blockmap::ranges_of(changed)))
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

    fn flush(&mut self) -> Result<()> {
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

/// A file's block sums at this backup: `all` (the reference's) with the
/// sums `read` of the changed `blocks` put in their places, sized to `size`.
fn merge_sums(
    mut all: Vec<BlockSum>,
    size: u64,
    blocks: &Ranges,
    read: impl IntoIterator<Item = BlockSum>,
) -> Vec<BlockSum> {
    all.resize(
        blockmap::block_count(size) as usize,
        [0; blocksums::SUM_LEN],
    );
    let at = blocks.iter().flat_map(|&(a, b)| a..=b);
    for (b, s) in at.zip(read) {
        if let Some(slot) = all.get_mut(b as usize) {
            *slot = s;
        }
    }
    all
}

/// What the copy stored: its entries (table `done` of the scratch
/// database, read back in path order for the file list), the directories,
/// the page checks, the change counts and the sizes.
struct Copied {
    db: scratch::Shared,
    dirs: Vec<DirEntry>,
    pages: Option<PageChecksums>,
    counts: ChangeReport,
    original_size: u64,
    stored_size: u64,
    /// The workers' block sums, for the backup's block sums object.
    sums: Vec<SumsSink>,
    /// What a resumed backup took from its interrupted runs.
    reused: ResumeReport,
}

/// Rows added to the scratch database at once.
const SCAN_BATCH: usize = 4096;

/// The entries stored, in path order, from the scratch database.
fn done_entries(db: scratch::Shared) -> impl Iterator<Item = Result<FileEntry>> + Send + 'static {
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
async fn copy_files(
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
