//! Laying a backup down in a data directory: directories and tablespace
//! links, every file checked against its SHA-256 as it is written, the
//! recovery files, a flush of everything, and `global/pg_control` last.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Kind, Result, WriteWatch};
use crate::ops::progress::Progress;
use crate::ops::workers;
use crate::pg::datadir::{self, EMPTY_DIRS};
use crate::pg::recovery::{self, RecoverySettings};
use crate::repo::codec;
use crate::repo::layout;
use crate::repo::manifest::{FileEntry, Manifest};
use crate::repo::{Backend, Repository};

use super::RestoreOptions;

/// Lays backup `m` down in `opts.pgdata`; returns how many files `--delta`
/// found in place already.
pub(super) async fn lay_down(
    repo: &Repository,
    m: &Manifest,
    opts: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<usize> {
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

    let pgdata = opts.pgdata.clone();
    let m2 = m.clone();
    let delta = opts.delta;
    let ts_map2 = ts_map.clone();
    tokio::task::spawn_blocking(move || prepare_dirs(&pgdata, &m2, &ts_map2, delta)).await??;

    let control = m
        .files
        .iter()
        .find(|f| f.path == datadir::PG_CONTROL)
        .cloned()
        .ok_or_else(|| {
            Error::repository(format!("backup {} has no {}", m.label, datadir::PG_CONTROL))
        })?;
    let files: Vec<FileEntry> = m
        .files
        .iter()
        .filter(|f| f.path != datadir::PG_CONTROL)
        .cloned()
        .collect();
    progress.phase("write files");
    progress.set_total(m.files.len() as u64, m.original_size);
    let skipped = write_files(repo, &m.label, &opts.pgdata, files, opts.delta, opts.process_max, progress.clone())
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
    tokio::task::spawn_blocking(move || -> Result<()> {
        sync_tree(&pgdata)?;
        let mut reader = reader;
        discard(&mut reader, control.offset, &what)?;
        let dest = pgdata.join(&control.path);
        write_one(&mut reader.take(control.length), &dest, &control, &what)?;
        File::open(&dest)
            .and_then(|f| f.sync_all())
            .map_err(local_err("fsync", &dest))?;
        fsync_dir(dest.parent().expect("global/pg_control has a parent"))?;
        if let Some((uid, gid)) = owner {
            chown_tree(&pgdata, uid, gid)?;
        }
        Ok(())
    })
    .await??;
    progress.file_done(control_size);
    Ok(skipped)
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

/// Creates the directory tree and tablespace links. With `--delta`, first
/// removes `global/pg_control` so that an interrupted restore cannot start.
fn prepare_dirs(
    pgdata: &Path,
    m: &Manifest,
    ts_map: &BTreeMap<u32, PathBuf>,
    delta: bool,
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
        remove_unlisted(pgdata, m)?;
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
fn remove_unlisted(pgdata: &Path, m: &Manifest) -> Result<()> {
    let listed: HashSet<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
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
            } else if !listed.contains(r.as_str()) {
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
fn write_one<R: Read>(r: &mut R, dest: &Path, f: &FileEntry, what: &str) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode_0600()
        .open(dest)
        .map_err(local_err("create", dest))?;
    let mut out = WriteWatch::new(BufWriter::with_capacity(1 << 20, file));
    // A failed write (a full disk) is the target's, not a damaged object.
    let digest = codec::decode_sized(r, &mut out, f.length).map_err(|e| match out.error() {
        Some(w) => local_err("write", dest)(w),
        None => Error::repository(format!("{what}: {e}")),
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
        .map_err(|e| local_err("write", dest)(e.into_error()))?;
    file.set_permissions(fs::Permissions::from_mode(f.mode & 0o750))
        .map_err(local_err("set permissions of", dest))?;
    let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(f.mtime.max(0) as u64);
    let _ = file.set_modified(mtime);
    Ok(())
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

async fn write_files(
    repo: &Repository,
    label: &str,
    pgdata: &Path,
    files: Vec<FileEntry>,
    delta: bool,
    process_max: usize,
    progress: Arc<dyn Progress>,
) -> Result<usize> {
    // One work item per stored object; its files in stored order.
    let mut by_object: BTreeMap<String, Vec<FileEntry>> = BTreeMap::new();
    for f in files {
        by_object.entry(f.object.clone()).or_default().push(f);
    }
    let mut items: Vec<(String, Vec<FileEntry>)> = by_object.into_iter().collect();
    for (_, v) in items.iter_mut() {
        v.sort_by_key(|f| f.offset);
    }
    // Largest objects first.
    items.sort_by_key(|(_, v)| v.iter().map(|f| f.length).sum::<u64>());
    let skipped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let states = vec![(); process_max.max(1)];
    let backend: Arc<dyn Backend> = repo.backend().clone();
    let (stanza, label, pgdata) = (
        repo.stanza().to_string(),
        label.to_string(),
        pgdata.to_path_buf(),
    );
    let handle = tokio::runtime::Handle::current();
    let skipped2 = skipped.clone();
    let work = move |_: &mut (), (object, entries): (String, Vec<FileEntry>)| -> Result<()> {
        let key = layout::backup_object_key(&stanza, &label, &object);
        let what = format!("{}/{key}", backend.describe());
        if delta && entries.iter().all(|f| matches(&pgdata.join(&f.path), f)) {
            skipped2.fetch_add(entries.len(), std::sync::atomic::Ordering::Relaxed);
            entries.iter().for_each(|f| progress.file_done(f.size));
            return Ok(());
        }
        let mut reader = handle
            .block_on(backend.get(&key))?
            .ok_or_else(|| Error::repository(format!("{what} is missing")))?;
        let mut pos = 0u64;
        for f in &entries {
            discard(&mut reader, f.offset - pos, &what)?;
            let dest = pgdata.join(&f.path);
            let mut part = (&mut reader).take(f.length);
            write_one(&mut part, &dest, f, &format!("{} (in {what})", f.path))?;
            discard(&mut part, u64::MAX, &what)?;
            pos = f.offset + f.length;
            progress.file_done(f.size);
        }
        Ok(())
    };
    workers::run(items, states, work, |_| Ok(())).await?;
    Ok(skipped.load(std::sync::atomic::Ordering::Relaxed))
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
    while let Some(p) = stack.pop() {
        std::os::unix::fs::lchown(&p, Some(uid), Some(gid)).map_err(local_err("chown", &p))?;
        let meta = fs::symlink_metadata(&p).map_err(local_err("stat", &p))?;
        if meta.is_dir() {
            for e in fs::read_dir(&p).map_err(local_err("read directory", &p))? {
                stack.push(e.map_err(local_err("read directory", &p))?.path());
            }
        }
    }
    Ok(())
}
