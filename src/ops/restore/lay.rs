//! Laying a backup down in a data directory: directories and tablespace
//! links, every file checked against its SHA-256 as it is written, the
//! recovery files, a flush of everything, and `global/pg_control` last.
//!
//! Memory stays flat in the number of files (issue 14): the file list is
//! streamed into a scratch database on disk, grouped there by the object
//! that stores each file, and the workers take one object (with its
//! pieces) at a time from it.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::catalog::scratch::{self, Groups, Row, Rows, Scratch};
use crate::error::{Error, Kind, Result, WriteWatch};
use crate::ops::progress::Progress;
use crate::ops::workers;
use crate::pg::datadir::{self, EMPTY_DIRS};
use crate::pg::recovery::{self, RecoverySettings};
use crate::repo::blockmap::{self, Part, PartWriter, Ranges};
use crate::repo::blocksums::{self, BlockSums};
use crate::repo::chunked;
use crate::repo::codec::{self, Binding, Keys};
use crate::repo::filelist::{object_group, split_object_group, LocalFileList};
use crate::repo::keys::decode_error;
use crate::repo::layout;
use crate::repo::manifest::{FileEntry, Manifest};
use crate::repo::{Backend, Fetched, Repository};

use super::RestoreOptions;

/// What laying a backup down did.
pub(super) struct Laid {
    /// Files `--delta` found in place already.
    pub skipped: usize,
    pub delta_blocks: Option<DeltaBlocks>,
}

/// `--delta` with the backup's block sums: the relation files on disk
/// compared block by block, and only the blocks that differ written.
#[derive(Debug, Clone, Default, serde::Serialize, PartialEq, Eq)]
pub struct DeltaBlocks {
    /// Relation files compared, and their blocks.
    pub files: u64,
    pub blocks: u64,
    /// Blocks that differed (or were missing) and were written.
    pub blocks_written: u64,
    /// Bytes read from the repository for them and the other files.
    pub bytes_fetched: u64,
}

/// Lays backup `m` down in `opts.pgdata`.
pub(super) async fn lay_down(
    repo: &Repository,
    m: &Manifest,
    opts: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<Laid> {
    let owner = target_owner(&opts.pgdata)?;
    check_target(&opts.pgdata, opts.delta)?;
    let ts_map: BTreeMap<u32, PathBuf> = opts.tablespace_map.iter().cloned().collect();
    for oid in ts_map.keys() {
        if !m.tablespaces.iter().any(|t| t.oid == *oid) {
            return Err(Error::usage(format!(
                "--tablespace-map {oid}=…: backup {} has no tablespace {oid}",
                m.label
            )));
        }
    }

    // Never onto another cluster's tablespace; checked before anything is
    // written, so a refused restore leaves everything as it was.
    for ts in &m.tablespaces {
        let location = ts_map
            .get(&ts.oid)
            .cloned()
            .unwrap_or_else(|| PathBuf::from(&ts.location));
        let nonempty = fs::read_dir(&location)
            .map(|mut r| r.next().is_some())
            .unwrap_or(false);
        if nonempty && !opts.delta {
            return Err(Error::usage(format!(
                "tablespace {} ({}) target {} is not empty",
                ts.name,
                ts.oid,
                location.display()
            ))
            .hint(format!(
                "map it elsewhere with --tablespace-map {}=/new/empty/dir",
                ts.oid
            )));
        }
    }

    let list = Arc::new(repo.file_list(m).await?);
    let count = list.count();
    let (label, delta) = (m.label.clone(), opts.delta);
    // With --delta, what is not in the backup goes (the paths, on disk).
    let list2 = list.clone();
    let listed = tokio::task::spawn_blocking(move || listed_paths(&list2, delta)).await??;
    let pgdata = opts.pgdata.clone();
    let m2 = m.clone();
    let ts_map2 = ts_map.clone();
    tokio::task::spawn_blocking(move || prepare_dirs(&pgdata, &m2, &ts_map2, delta, &listed))
        .await??;

    // With --delta, the backup's block sums say which blocks of the
    // relation files on disk differ (a backup without them: whole files);
    // compared after the tablespace links point where this restore writes.
    let sums = match opts.delta {
        false => None,
        true => match repo.read_block_sums(&m.label).await? {
            Fetched::Found(s) => Some(s),
            Fetched::Missing => None,
            Fetched::Damaged(why) => {
                log::warn!("--delta compares whole files: {why}");
                None
            }
        },
    };
    let diffs = match sums {
        None => None,
        Some(sums) => {
            Some(differing_blocks(&opts.pgdata, list.clone(), sums, opts.process_max).await?)
        }
    };
    let (db, mut planned) =
        tokio::task::spawn_blocking(move || plan_pieces(&list, &label, delta, diffs)).await??;
    let control = planned.control.take().ok_or_else(|| {
        Error::repository(format!("backup {} has no {}", m.label, datadir::PG_CONTROL))
    })?;

    progress.phase("write files");
    progress.set_total(count, m.original_size);
    let laid = write_files(repo, &opts.pgdata, db, planned, opts.process_max, progress.clone())
        .await
        .map_err(|e| e.hint("the data directory is incomplete and cannot be started; rerun the restore (--delta reuses what was written)"))?;

    // backup_label, tablespace_map, recovery settings, signal file.
    let pgdata = opts.pgdata.clone();
    let settings = RecoverySettings {
        restore_command: opts.restore_command.clone(),
        target: opts.target.clone(),
        target_action: opts.target_action,
        target_timeline: opts.target_timeline.clone(),
        target_exclusive: opts.target_exclusive,
        archive_mode_off: opts.archive_mode_off,
        primary_conninfo: opts.primary_conninfo.clone(),
    };
    let standby = opts.standby;
    let m3 = m.clone();
    tokio::task::spawn_blocking(move || {
        write_recovery_files(&pgdata, &m3, &ts_map, &settings, standby)
    })
    .await??;

    // Everything on disk first, then pg_control, then flush that.
    let pgdata = opts.pgdata.clone();
    let key = layout::backup_object_key(repo.stanza(), &m.label, &control.object);
    let object = format!("{}/{key}", repo.describe());
    let reader = repo
        .backend()
        .get(&key)
        .await?
        .ok_or_else(|| Error::repository(format!("backup {}: {object} is missing", m.label)))?;
    let what = format!("{} (in {object})", control.path);
    let control_size = control.size;
    let keys = repo.keys().await?;
    tokio::task::spawn_blocking(move || -> Result<()> {
        // Ownership before the flush: a chown after it (as this did) is
        // metadata a crash can lose, leaving root's files PostgreSQL
        // refuses.
        if let Some((uid, gid)) = owner {
            chown_tree(&pgdata, uid, gid)?;
        }
        sync_tree(&pgdata)?;
        let mut reader = reader;
        discard(&mut reader, control.offset, &what)?;
        // Under another name until it is whole and checked: a damaged or
        // cut-off object must leave no pg_control that PostgreSQL would
        // start from (write_one checks the checksum only at the end).
        let dest = pgdata.join(&control.path);
        let tmp = dest.with_file_name("pg_control.pgvault-restore");
        let bind = Binding::at(&key, control.offset);
        let r = &mut reader.take(control.length);
        if let Err(e) = write_one(r, &tmp, &control, &what, &keys, bind) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::lchown(&tmp, Some(uid), Some(gid))
                .map_err(local_err("chown", &tmp))?;
        }
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(local_err("fsync", &tmp))?;
        fs::rename(&tmp, &dest).map_err(local_err("rename", &tmp))?;
        fsync_dir(dest.parent().expect("global/pg_control has a parent"))?;
        Ok(())
    })
    .await??;
    progress.file_done(control_size);
    Ok(laid)
}

/// Run as root, the restored files must belong to the data directory's
/// owner: PostgreSQL refuses to run as root.
fn target_owner(pgdata: &Path) -> Result<Option<(u32, u32)>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let hint = format!(
        "create it for the PostgreSQL user first: install -d -o postgres -g postgres -m 700 {}",
        pgdata.display()
    );
    let meta = fs::metadata(pgdata).map_err(|_| {
        Error::usage(format!(
            "running as root, {} must exist and belong to the PostgreSQL user",
            pgdata.display()
        ))
        .hint(hint.clone())
    })?;
    if meta.uid() == 0 {
        return Err(Error::usage(format!(
            "running as root, {} belongs to root; PostgreSQL would refuse to start it",
            pgdata.display()
        ))
        .hint(hint));
    }
    Ok(Some((meta.uid(), meta.gid())))
}

fn check_target(pgdata: &Path, delta: bool) -> Result<()> {
    match fs::read_dir(pgdata) {
        Ok(mut rd) => {
            if rd.next().is_some() && !delta {
                return Err(Error::usage(format!("{} is not empty", pgdata.display())).hint(
                    "restore into an empty directory, or pass --delta to reuse the files that match the backup",
                ));
            }
            if pgdata.join("postmaster.pid").exists() {
                return Err(Error::usage(format!(
                    "{} has a postmaster.pid: is PostgreSQL running there?",
                    pgdata.display()
                ))
                .hint(
                    "stop the server first; remove a stale postmaster.pid only if no server runs",
                ));
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::usage(format!("{}: {e}", pgdata.display()))),
    }
}

/// An I/O error on the data directory being restored: what was done, to
/// which path, and (for a full disk, permissions) a hint.
fn local_err<'a>(what: &'a str, path: &'a Path) -> impl Fn(io::Error) -> Error + 'a {
    move |e| Error::io(Kind::Internal, what, path.display(), &e)
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(local_err("fsync", dir))
}

/// Rows added to the scratch database at once.
const BATCH: usize = 4096;

/// What one stored object gives to one file, as the scratch database
/// keeps it.
#[derive(Serialize, Deserialize)]
struct PieceRow {
    file: FileEntry,
    /// The part of the file this is (`None`: the whole file).
    part: Option<Part>,
    /// The blocks of that part no newer part holds.
    owned: Ranges,
}

/// What planning the restore found, besides its scratch database.
struct Planned {
    /// The entry of `global/pg_control`, written apart, last.
    control: Option<FileEntry>,
    delta: bool,
    /// Files `--delta` keeps as they are (every block matches).
    kept: usize,
    /// `--delta` with block sums: what the comparison found.
    delta_blocks: Option<DeltaBlocks>,
}

/// A `mapped` row's `o`: the file is created (truncated) at its size; kept
/// at its place with the blocks that differ written (`--delta` with block
/// sums); kept whole (every block matches).
const MAPPED_NEW: i64 = 0;
const MAPPED_IN_PLACE: i64 = 1;
const MAPPED_KEPT: i64 = 2;

/// Streams the file list of backup `label` into a scratch database: table
/// `pieces`, one row per piece of an object, grouped by object (`g`
/// `<backup>/<object>`) in stored order; `mapped`, the files written as
/// blocks (stored as block maps, or with `--delta` and block sums, kept in
/// place with only their differing blocks, `diffs`, written).
fn plan_pieces(
    list: &LocalFileList,
    label: &str,
    delta: bool,
    diffs: Option<(scratch::Shared, DeltaBlocks)>,
) -> Result<(scratch::Shared, Planned)> {
    let mut s = Scratch::new(&["pieces", "mapped"])?;
    let mut planned = Planned {
        control: None,
        delta,
        kept: 0,
        delta_blocks: diffs.as_ref().map(|(_, d)| d.clone()),
    };
    let differ_of = |path: &str| -> Result<Option<Ranges>> {
        let Some((db, _)) = &diffs else {
            return Ok(None);
        };
        let row = db
            .lock()
            .map_err(|_| Error::internal("scratch database: a thread failed holding it"))?
            .get("diffs", path)?;
        row.map(|r| from_json::<Ranges>(&r.v, "differing blocks"))
            .transpose()
    };
    let (mut pieces, mut mapped) = (Vec::new(), Vec::new());
    for f in list.iter()? {
        let f = f?;
        if f.path == datadir::PG_CONTROL {
            planned.control = Some(f);
            continue;
        }
        let differ = differ_of(&f.path)?;
        if f.parts.is_empty() && differ.is_none() {
            let backup = f.backup.as_deref().unwrap_or(label);
            pieces.push(Row {
                k: f.path.clone(),
                g: object_group(backup, &f.object),
                o: f.offset as i64,
                w: f.length as i64,
                v: Vec::new(),
            });
            let row = PieceRow {
                file: f,
                part: None,
                owned: Vec::new(),
            };
            pieces.last_mut().expect("just pushed").v = json(&row)?;
        } else if differ.as_ref().is_some_and(|d| d.is_empty()) {
            planned.kept += 1;
            mapped.push(Row {
                k: f.path.clone(),
                o: MAPPED_KEPT,
                v: json(&f)?,
                ..Row::default()
            });
        } else {
            let parts = blockmap::parts_of(&f, label);
            let owned = blockmap::owned(&parts, f.size);
            for (i, (part, owned)) in parts.into_iter().zip(owned).enumerate() {
                let owned = match &differ {
                    Some(d) => blockmap::intersect(&owned, d),
                    None => owned,
                };
                if owned.is_empty() {
                    continue;
                }
                let (g, o, w) = (
                    object_group(&part.backup, &part.object),
                    part.offset as i64,
                    part.length as i64,
                );
                let row = PieceRow {
                    file: f.clone(),
                    part: Some(part),
                    owned,
                };
                pieces.push(Row {
                    k: format!("{}\0{i}", f.path),
                    g,
                    o,
                    w,
                    v: json(&row)?,
                });
            }
            mapped.push(Row {
                k: f.path.clone(),
                o: if differ.is_some() {
                    MAPPED_IN_PLACE
                } else {
                    MAPPED_NEW
                },
                v: json(&f)?,
                ..Row::default()
            });
        }
        for (table, rows) in [("pieces", &mut pieces), ("mapped", &mut mapped)] {
            if rows.len() >= BATCH {
                s.insert(table, rows)?;
                rows.clear();
            }
        }
    }
    s.insert("pieces", &pieces)?;
    s.insert("mapped", &mapped)?;
    s.index("pieces")?;
    Ok((s.shared(), planned))
}

/// With `delta`, every path of the list, in a scratch database (table
/// `files`), for `--delta` to remove what the backup does not have;
/// without, an empty one.
fn listed_paths(list: &LocalFileList, delta: bool) -> Result<scratch::Shared> {
    let mut s = Scratch::new(&["files"])?;
    if delta {
        let mut files = Vec::new();
        for f in list.iter()? {
            files.push(Row {
                k: f?.path,
                ..Row::default()
            });
            if files.len() >= BATCH {
                s.insert("files", &files)?;
                files.clear();
            }
        }
        s.insert("files", &files)?;
    }
    Ok(s.shared())
}

/// A row's value in the scratch database.
fn json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::internal(format!("serialize: {e}")))
}

fn from_json<T: serde::de::DeserializeOwned>(v: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(v).map_err(|e| Error::internal(format!("read back {what}: {e}")))
}

/// Creates the directory tree and tablespace links. With `--delta`, first
/// removes `global/pg_control` so that an interrupted restore cannot start.
fn prepare_dirs(
    pgdata: &Path,
    m: &Manifest,
    ts_map: &BTreeMap<u32, PathBuf>,
    delta: bool,
    db: &scratch::Shared,
) -> Result<()> {
    fs::create_dir_all(pgdata).map_err(local_err("create", pgdata))?;
    fs::set_permissions(pgdata, fs::Permissions::from_mode(0o700))
        .map_err(local_err("set permissions of", pgdata))?;
    if delta {
        let control = pgdata.join(datadir::PG_CONTROL);
        match fs::remove_file(&control) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(local_err("remove", &control)(e)),
        }
        for f in [
            recovery::BACKUP_LABEL,
            recovery::TABLESPACE_MAP,
            "postmaster.pid",
        ] {
            let _ = fs::remove_file(pgdata.join(f));
        }
        // What the backup left out must start empty: WAL of an earlier
        // run in pg_wal (with its history files) would be replayed before
        // the archive's and lead recovery onto the wrong timeline.
        for d in EMPTY_DIRS {
            let p = pgdata.join(d);
            if p.is_dir() {
                clear_dir(&p)?;
            }
        }
        remove_unlisted(pgdata, db)?;
    }
    let tblspc = pgdata.join("pg_tblspc");
    fs::create_dir_all(&tblspc).map_err(local_err("create", &tblspc))?;
    for ts in &m.tablespaces {
        let location = ts_map
            .get(&ts.oid)
            .cloned()
            .unwrap_or_else(|| PathBuf::from(&ts.location));
        fs::create_dir_all(&location).map_err(local_err("create", &location))?;
        fs::set_permissions(&location, fs::Permissions::from_mode(0o700))
            .map_err(local_err("set permissions of", &location))?;
        let link = pgdata.join("pg_tblspc").join(ts.oid.to_string());
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&location, &link).map_err(local_err("link", &link))?;
    }
    for d in &m.dirs {
        if d.path.starts_with("pg_tblspc/") && !d.path["pg_tblspc/".len()..].contains('/') {
            continue; // the link itself
        }
        let p = pgdata.join(&d.path);
        if fs::symlink_metadata(&p)
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(false)
        {
            continue;
        }
        fs::create_dir_all(&p).map_err(local_err("create", &p))?;
        // PostgreSQL accepts 0700 or 0750 data directories: keep what the
        // backup recorded, but never more than 0750.
        fs::set_permissions(&p, fs::Permissions::from_mode(d.mode & 0o750))
            .map_err(local_err("set permissions of", &p))?;
    }
    for d in EMPTY_DIRS {
        let p = pgdata.join(d);
        fs::create_dir_all(&p).map_err(local_err("create", &p))?;
    }
    let status = pgdata.join("pg_wal/archive_status");
    fs::create_dir_all(&status).map_err(local_err("create", &status))?;
    Ok(())
}

/// Removes everything inside `dir` (following no links).
fn clear_dir(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir).map_err(local_err("read directory", dir))? {
        let p = e.map_err(local_err("read directory", dir))?.path();
        let meta = fs::symlink_metadata(&p).map_err(local_err("stat", &p))?;
        if meta.is_dir() {
            fs::remove_dir_all(&p).map_err(local_err("remove", &p))?;
        } else {
            fs::remove_file(&p).map_err(local_err("remove", &p))?;
        }
    }
    Ok(())
}

/// `--delta`: removes files the backup does not have, so the result is the
/// backup and nothing else (the left-out directories were emptied already;
/// configuration files the backup holds are restored from it).
fn remove_unlisted(pgdata: &Path, db: &scratch::Shared) -> Result<()> {
    let listed = |r: &str| -> Result<bool> {
        let s = db
            .lock()
            .map_err(|_| Error::internal("scratch database: a thread failed holding it"))?;
        Ok(s.get("files", r)?.is_some())
    };
    let mut stack = vec![(pgdata.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        for e in fs::read_dir(&dir).map_err(local_err("read directory", &dir))? {
            let e = e.map_err(local_err("read directory", &dir))?;
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let r = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            if rel.is_empty() && EMPTY_DIRS.contains(&name.as_str()) {
                continue;
            }
            let p = e.path();
            // pg_tblspc/<oid> are links: walk through them into the tablespace.
            let meta = fs::metadata(&p).map_err(local_err("stat", &p))?;
            if meta.is_dir() {
                stack.push((p, r));
            } else if !listed(&r)? {
                fs::remove_file(&p).map_err(local_err("remove", &p))?;
            }
        }
    }
    Ok(())
}

fn discard<R: Read>(r: &mut R, n: u64, what: &str) -> Result<()> {
    io::copy(&mut r.take(n), &mut io::sink())
        .map_err(|e| Error::repository(format!("read {what}: {e}")))?;
    Ok(())
}

/// Decodes one file from `r` into `dest`, checking its checksum against the
/// manifest, then sets mode and mtime.
fn write_one<R: Read>(
    r: &mut R,
    dest: &Path,
    f: &FileEntry,
    what: &str,
    keys: &Keys,
    bind: Binding<'_>,
) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode_0600()
        .open(dest)
        .map_err(local_err("create", dest))?;
    // Sized to the file: most of a many-files cluster is a few KiB, and a
    // 1 MiB buffer each was an allocation (and its page faults) per file.
    let cap = usize::try_from(f.size.clamp(8 << 10, 1 << 20)).unwrap_or(1 << 20);
    let mut out = WriteWatch::new(BufWriter::with_capacity(cap, StartWriteback::new(file)));
    // A failed write (a full disk) is the target's, not a damaged object.
    let digest = chunked::decode_piece(r, &mut out, f.length, f.size, f.chunk_blocks, keys, bind)
        .map_err(|e| match out.error() {
        Some(w) => local_err("write", dest)(w),
        None => decode_error(what, e),
    })?;
    let out = out.into_inner();
    if digest.sha256.to_hex() != f.sha256 || digest.size != f.size {
        return Err(Error::repository(format!(
            "{what}: restored {} does not match the manifest (checksum or size)",
            f.path
        )));
    }
    let file = out
        .into_inner()
        .map_err(|e| local_err("write", dest)(e.into_error()))?
        .finish();
    file.set_permissions(fs::Permissions::from_mode(f.mode & 0o750))
        .map_err(local_err("set permissions of", dest))?;
    let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(f.mtime.max(0) as u64);
    let _ = file.set_modified(mtime);
    Ok(())
}

/// Bytes written to one file between two starts of its writeback.
const WRITEBACK_AFTER: u64 = 1 << 20;
/// Files smaller than this are left to the final `syncfs` whole.
const WRITEBACK_MIN_FILE: u64 = 64 << 10;

/// A file being restored that starts the kernel's writeback of what was
/// written every [`WRITEBACK_AFTER`] bytes, without waiting for it —
/// PostgreSQL's `pg_flush_data` (storage/file/fd.c) does the same with
/// `sync_file_range(SYNC_FILE_RANGE_WRITE)` for checkpoints and initdb's
/// sync. Otherwise nothing reaches the disk until the dirty-page limits
/// or the final `syncfs`: the disk idles while files are decoded, then
/// the CPU idles while the disk writes everything at the end. Durability
/// still comes from that `syncfs` (this only starts writes early).
struct StartWriteback {
    file: File,
    written: u64,
    started: u64,
}

impl StartWriteback {
    fn new(file: File) -> Self {
        StartWriteback {
            file,
            written: 0,
            started: 0,
        }
    }

    fn start(&mut self) {
        use std::os::fd::AsRawFd;
        let (from, len) = (self.started, self.written - self.started);
        self.started = self.written;
        // SAFETY: a valid open file descriptor; the call only schedules
        // writeback. Its failure is no loss: the final syncfs writes and
        // reports whatever this did not.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                i64::try_from(from).unwrap_or(i64::MAX),
                i64::try_from(len).unwrap_or(0),
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }

    /// The file, its last bytes' writeback started (small files: left to
    /// the final syncfs).
    fn finish(mut self) -> File {
        if self.written >= WRITEBACK_MIN_FILE && self.written > self.started {
            self.start();
        }
        self.file
    }
}

impl io::Write for StartWriteback {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.started >= WRITEBACK_AFTER {
            self.start();
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}
impl Mode0600 for OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

/// Is `dest` already what the manifest says (for `--delta`)?
fn matches(dest: &Path, f: &FileEntry) -> bool {
    let Ok(meta) = fs::metadata(dest) else {
        return false;
    };
    if meta.len() != f.size {
        return false;
    }
    let Ok(file) = File::open(dest) else {
        return false;
    };
    let mut h = codec::HashingWriter::new(io::sink());
    if io::copy(&mut io::BufReader::with_capacity(1 << 20, file), &mut h).is_err() {
        return false;
    }
    h.finish().1.sha256.to_hex() == f.sha256
}

/// What one stored object gives to the data directory.
enum Piece {
    /// A whole file.
    Whole(FileEntry),
    /// The blocks of a part that no newer part holds (`blockmap::owned`).
    Blocks {
        file: Arc<FileEntry>,
        part: Part,
        owned: Ranges,
    },
}

impl Piece {
    fn offset(&self) -> u64 {
        match self {
            Piece::Whole(f) => f.offset,
            Piece::Blocks { part, .. } => part.offset,
        }
    }
    fn length(&self) -> u64 {
        match self {
            Piece::Whole(f) => f.length,
            Piece::Blocks { part, .. } => part.length,
        }
    }
}

/// `--delta`: the blocks of each relation file on disk whose sums differ
/// from the backup's (or that it lacks), for the files the backup has sums
/// for; one that is the backup's already has none. Files are read
/// `process_max` at a time, and what differs goes to a scratch database
/// (table `diffs`, by path), not memory.
async fn differing_blocks(
    pgdata: &Path,
    list: Arc<LocalFileList>,
    sums: BlockSums,
    process_max: usize,
) -> Result<(scratch::Shared, DeltaBlocks)> {
    let db = Scratch::new(&["diffs"])?.shared();
    let sums = Arc::new(sums);
    let items = list.iter()?.map(|f| f.map(|f| (f.path, f.size)));
    let states = vec![(Vec::new(), DeltaBlocks::default()); process_max.max(1)];
    let pgdata = pgdata.to_path_buf();
    type State = (Vec<Row>, DeltaBlocks);
    let insert = {
        let db = db.clone();
        move |rows: &mut Vec<Row>| -> Result<()> {
            db.lock()
                .map_err(|_| Error::internal("scratch database: a thread failed holding it"))?
                .insert("diffs", rows)?;
            rows.clear();
            Ok(())
        }
    };
    let insert2 = insert.clone();
    let work = move |(out, d): &mut State, (path, size): (String, u64)| -> Result<()> {
        let n = blockmap::block_count(size);
        let Some(want) = sums
            .get(&path)
            .map_err(|e| Error::io_in(Kind::Internal, "read the backup's block sums", &e))?
            .filter(|w| w.len() == n as usize)
        else {
            return Ok(());
        };
        let dest = pgdata.join(&path);
        // Not there, or not a file: every block.
        let disk = match fs::symlink_metadata(&dest) {
            Ok(meta) if meta.is_file() => {
                blocksums::sums_of_file(&dest).map_err(local_err("read", &dest))?
            }
            _ => None,
        }
        .unwrap_or_default();
        d.files += 1;
        d.blocks += u64::from(n);
        let differ = (0..n).filter(|&b| disk.get(b as usize) != want.get(b as usize));
        let differ = blockmap::ranges_of(differ);
        d.blocks_written += blockmap::count(&differ);
        out.push(Row {
            k: path,
            v: json(&differ)?,
            ..Row::default()
        });
        if out.len() >= BATCH {
            insert(out)?;
        }
        Ok(())
    };
    let done = workers::run(items, states, work, move |(mut out, d): State| {
        insert2(&mut out)?;
        Ok(d)
    })
    .await?;
    let mut all = DeltaBlocks::default();
    for d in done {
        all.files += d.files;
        all.blocks += d.blocks;
        all.blocks_written += d.blocks_written;
    }
    Ok((db, all))
}

#[allow(clippy::too_many_arguments)]
async fn write_files(
    repo: &Repository,
    pgdata: &Path,
    db: scratch::Shared,
    planned: Planned,
    process_max: usize,
    progress: Arc<dyn Progress>,
) -> Result<Laid> {
    let (delta, mut delta_blocks) = (planned.delta, planned.delta_blocks);
    // One work item per stored object (of this backup or one it depends
    // on), largest first; its pieces in stored order. A file stored as
    // blocks of several backups is created at its size first; each part
    // then writes the blocks it is the newest holder of: every block once,
    // no chain replay. With --delta and block sums, a relation file (whole
    // or in parts) is kept at its place and only its differing blocks are
    // written (`o` of a `mapped` row: 1).
    let mapped = {
        let db = db.clone();
        move || {
            Rows::by_key(db.clone(), "mapped").map(|r| {
                let r = r?;
                Ok::<_, Error>((from_json::<FileEntry>(&r.row.v, "a file")?, r.row.o))
            })
        }
    };
    let pgdata2 = pgdata.to_path_buf();
    let mapped2 = mapped.clone();
    let progress2 = progress.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        for f in mapped2() {
            let (f, how) = f?;
            if how == MAPPED_KEPT {
                progress2.file_done(f.size);
                continue;
            }
            let in_place = how == MAPPED_IN_PLACE;
            let dest = pgdata2.join(&f.path);
            // In place (--delta): the blocks that match stay.
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(!in_place)
                .mode_0600()
                .open(&dest)
                .map_err(local_err("create", &dest))?;
            file.set_len(f.size).map_err(local_err("extend", &dest))?;
        }
        Ok(())
    })
    .await??;
    let items = Groups::heaviest_first(db, "pieces")?.map(|g| {
        let (object, rows) = g?;
        let (backup, object) = split_object_group(&object)?;
        let pieces = rows
            .iter()
            .map(|r| {
                let p: PieceRow = from_json(&r.v, "a piece")?;
                Ok(match p.part {
                    None => Piece::Whole(p.file),
                    Some(part) => Piece::Blocks {
                        file: Arc::new(p.file),
                        part,
                        owned: p.owned,
                    },
                })
            })
            .collect::<Result<Vec<Piece>>>()?;
        Ok(((backup.to_string(), object.to_string()), pieces))
    });
    let skipped = Arc::new(std::sync::atomic::AtomicUsize::new(planned.kept));
    let fetched = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let states = vec![(); process_max.max(1)];
    let backend: Arc<dyn Backend> = repo.backend().clone();
    let (stanza, pgdata) = (repo.stanza().to_string(), pgdata.to_path_buf());
    let keys = repo.keys().await?;
    let handle = tokio::runtime::Handle::current();
    let (skipped2, fetched2) = (skipped.clone(), fetched.clone());
    let pgdata2 = pgdata.clone();
    let work = move |_: &mut (),
                     ((backup, object), pieces): ((String, String), Vec<Piece>)|
          -> Result<()> {
        let key = layout::backup_object_key(&stanza, &backup, &object);
        let what = format!("{}/{key}", backend.describe());
        let whole = |p: &Piece| match p {
            Piece::Whole(f) => matches(&pgdata2.join(&f.path), f),
            Piece::Blocks { .. } => false,
        };
        if delta && pieces.iter().all(whole) {
            skipped2.fetch_add(pieces.len(), std::sync::atomic::Ordering::Relaxed);
            pieces.iter().for_each(|p| {
                if let Piece::Whole(f) = p {
                    progress.file_done(f.size)
                }
            });
            return Ok(());
        }
        // --delta, blocks of chunked parts: only the chunks holding them.
        let chunks_only = |p: &Piece| match p {
            Piece::Blocks { part, .. } => part.chunk_blocks.is_some(),
            Piece::Whole(_) => false,
        };
        if delta && pieces.iter().all(chunks_only) {
            for p in &pieces {
                if let Piece::Blocks { file, part, owned } = p {
                    let dest = pgdata2.join(&file.path);
                    let at = (key.as_str(), &keys);
                    let read = write_chunks(&*backend, &handle, at, &dest, file, part, owned)?;
                    fetched2.fetch_add(read, std::sync::atomic::Ordering::Relaxed);
                    progress
                        .file_done(blockmap::count(owned) * crate::pg::relfile::BLOCK_SIZE as u64);
                }
            }
            return Ok(());
        }
        let mut reader = handle
            .block_on(backend.get(&key))?
            .ok_or_else(|| Error::repository(format!("{what} is missing")))?;
        let mut pos = 0u64;
        for p in &pieces {
            discard(&mut reader, p.offset() - pos, &what)?;
            let mut r = (&mut reader).take(p.length());
            match p {
                Piece::Whole(f) => {
                    let dest = pgdata2.join(&f.path);
                    let what = format!("{} (in {what})", f.path);
                    let bind = Binding::at(&key, f.offset);
                    write_one(&mut r, &dest, f, &what, &keys, bind)?;
                    progress.file_done(f.size);
                }
                Piece::Blocks { file, part, owned } => {
                    let dest = pgdata2.join(&file.path);
                    let bind = Binding::at(&key, part.offset);
                    write_blocks(&mut r, &dest, (file, part, owned), &what, &keys, bind)?;
                    progress
                        .file_done(blockmap::count(owned) * crate::pg::relfile::BLOCK_SIZE as u64);
                }
            }
            discard(&mut r, u64::MAX, &what)?;
            pos = p.offset() + p.length();
        }
        // Read from the object's start (one request), up to its last piece.
        fetched2.fetch_add(pos, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    };
    workers::run(items, states, work, |_| Ok(())).await?;
    // Mode and time of the files written in parts, once all are there.
    tokio::task::spawn_blocking(move || -> Result<()> {
        for f in mapped() {
            let (f, _) = f?;
            let dest = pgdata.join(&f.path);
            fs::set_permissions(&dest, fs::Permissions::from_mode(f.mode & 0o750))
                .map_err(local_err("set permissions of", &dest))?;
            let mtime =
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(f.mtime.max(0) as u64);
            if let Ok(file) = File::options().write(true).open(&dest) {
                let _ = file.set_modified(mtime);
            }
        }
        Ok(())
    })
    .await??;
    if let Some(d) = delta_blocks.as_mut() {
        d.bytes_fetched = fetched.load(std::sync::atomic::Ordering::Relaxed);
    }
    Ok(Laid {
        skipped: skipped.load(std::sync::atomic::Ordering::Relaxed),
        delta_blocks,
    })
}

/// Writes the blocks `owned` of a chunked part into `dest`, fetching only
/// the chunks that hold them (ranged reads), each checked against its own
/// SHA-256; returns the bytes fetched.
fn write_chunks(
    backend: &dyn Backend,
    handle: &tokio::runtime::Handle,
    (key, keys): (&str, &Keys),
    dest: &Path,
    f: &FileEntry,
    part: &Part,
    owned: &[(u32, u32)],
) -> Result<u64> {
    let what = format!("{}/{key}", backend.describe());
    let cb = u64::from(part.chunk_blocks.unwrap_or(chunked::CHUNK_BLOCKS).max(1));
    let (ranges, mut fetched) = handle.block_on(chunked::chunk_ranges(
        backend,
        keys,
        key,
        part.offset,
        part.length,
    ))?;
    let needed: std::collections::BTreeSet<u64> = owned
        .iter()
        .flat_map(|&(a, b)| a..=b)
        .filter_map(|b| blockmap::raw_index(part, b))
        .map(|r| r / cb)
        .collect();
    let file = OpenOptions::new()
        .write(true)
        .open(dest)
        .map_err(local_err("open", dest))?;
    for c in needed {
        let range = ranges.get(c as usize).cloned().ok_or_else(|| {
            Error::repository(format!(
                "{} (a part in {what}): its chunk index has no chunk {c}",
                f.path
            ))
        })?;
        let len = range.end - range.start;
        let bind = Binding::at(key, range.start);
        let bytes = handle
            .block_on(backend.get_range(key, range))?
            .ok_or_else(|| Error::repository(format!("{what} is missing")))?;
        fetched += len;
        let mut out = WriteWatch::new(PartWriter::starting_at(&file, f.size, part, owned, c * cb));
        codec::decode_sized(&bytes[..], &mut out, len, keys, bind).map_err(|e| {
            match out.error() {
                Some(w) => local_err("write", dest)(w),
                None => decode_error(&format!("{} (chunk {c} of a part in {what})", f.path), e),
            }
        })?;
    }
    Ok(fetched)
}

/// Decodes one part into the blocks it owns of `dest`, checking the part's
/// checksum.
fn write_blocks<R: Read>(
    r: &mut R,
    dest: &Path,
    (f, part, owned): (&FileEntry, &Part, &[(u32, u32)]),
    what: &str,
    keys: &Keys,
    bind: Binding<'_>,
) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .open(dest)
        .map_err(local_err("open", dest))?;
    let mut out = WriteWatch::new(PartWriter::new(&file, f.size, part, owned));
    let digest = chunked::decode_piece(
        r,
        &mut out,
        part.length,
        part.raw_size,
        part.chunk_blocks,
        keys,
        bind,
    )
    .map_err(|e| match out.error() {
        Some(w) => local_err("write", dest)(w),
        None => decode_error(&format!("{} (a part in {what})", f.path), e),
    })?;
    if digest.sha256.to_hex() != part.sha256 || digest.size != part.raw_size {
        return Err(Error::repository(format!(
            "{} (a part in {what}): its blocks do not match the manifest (checksum or size)",
            f.path
        )));
    }
    Ok(())
}

fn write_recovery_files(
    pgdata: &Path,
    m: &Manifest,
    ts_map: &BTreeMap<u32, PathBuf>,
    settings: &RecoverySettings,
    standby: bool,
) -> Result<()> {
    let write = |name: &str, text: &str| -> Result<()> {
        let p = pgdata.join(name);
        fs::write(&p, text).map_err(local_err("write", &p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600))
            .map_err(local_err("set permissions of", &p))
    };
    write(recovery::BACKUP_LABEL, &m.backup_label)?;
    if !m.tablespace_map.is_empty() {
        write(
            recovery::TABLESPACE_MAP,
            &recovery::remap_tablespace_map(&m.tablespace_map, ts_map),
        )?;
    }
    let auto = pgdata.join("postgresql.auto.conf");
    let existing = fs::read_to_string(&auto).unwrap_or_default();
    let stamp = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    write(
        "postgresql.auto.conf",
        &recovery::rewrite_auto_conf(&existing, settings, &stamp),
    )?;
    let _ = fs::remove_file(pgdata.join(recovery::RECOVERY_SIGNAL));
    let _ = fs::remove_file(pgdata.join(recovery::STANDBY_SIGNAL));
    write(
        if standby {
            recovery::STANDBY_SIGNAL
        } else {
            recovery::RECOVERY_SIGNAL
        },
        "",
    )?;
    Ok(())
}

/// Flushes everything written: one `syncfs` per file system involved
/// (the data directory and each tablespace) instead of an fsync per file.
fn sync_tree(pgdata: &Path) -> Result<()> {
    let mut seen = HashSet::new();
    let mut roots = vec![pgdata.to_path_buf()];
    if let Ok(rd) = fs::read_dir(pgdata.join("pg_tblspc")) {
        roots.extend(rd.flatten().map(|e| e.path()));
    }
    for r in roots {
        let f = File::open(&r).map_err(local_err("open", &r))?;
        let dev = f.metadata().map_err(local_err("stat", &r))?.dev();
        if seen.insert(dev) {
            use std::os::fd::AsRawFd;
            // SAFETY: a valid open file descriptor.
            if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
                return Err(local_err("syncfs", &r)(io::Error::last_os_error()));
            }
        }
    }
    Ok(())
}

fn chown_tree(root: &Path, uid: u32, gid: u32) -> Result<()> {
    let mut stack = vec![root.to_path_buf()];
    if let Ok(rd) = fs::read_dir(root.join("pg_tblspc")) {
        stack.extend(rd.flatten().filter_map(|e| fs::canonicalize(e.path()).ok()));
    }
    // The directory entries' types decide what to descend into: no stat
    // per file.
    for p in &stack {
        std::os::unix::fs::lchown(p, Some(uid), Some(gid)).map_err(local_err("chown", p))?;
    }
    while let Some(p) = stack.pop() {
        for e in fs::read_dir(&p).map_err(local_err("read directory", &p))? {
            let e = e.map_err(local_err("read directory", &p))?;
            let child = e.path();
            std::os::unix::fs::lchown(&child, Some(uid), Some(gid))
                .map_err(local_err("chown", &child))?;
            if e.file_type().map_err(local_err("stat", &child))?.is_dir() {
                stack.push(child);
            }
        }
    }
    Ok(())
}
