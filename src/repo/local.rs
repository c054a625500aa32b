//! A repository in a local (or mounted) directory.
//!
//! Durability is explicit, because a WAL file that PostgreSQL was told is
//! archived may be removed from `pg_wal` right after: write to a temporary
//! name in the final directory, fsync it, link or rename it into place, fsync
//! the directory. `link()` gives an atomic create-if-absent (it fails with
//! EEXIST), which is what makes two racing archive-pushes safe here.
//!
//! Conditional updates compare the object's version (the SHA-256 of its
//! bytes) and rename the new one over it while holding an exclusive
//! `flock` on the directory's lock file (in `.pgvault-locks/` at the root);
//! overwrites and deletes take the same lock, so no replace or delete can
//! slip in between the compare and the rename. That is enough because every process that
//! writes a local repository runs on the host that mounts it: flock is
//! arbitrated by that host's kernel (and on NFS, Linux turns it into a lock
//! the server arbitrates). Creates need no lock: `link()` cannot replace
//! an object, and an update needs one to exist. The lock is held only
//! around the compare and the rename; a process frozen right there (SIGSTOP)
//! holds up the others until it resumes, and they give up after
//! `DIR_LOCK_WAIT` with an error saying so rather than hang.
//!
//! Everything pgvault creates here is owner-only (files 0600, directories
//! 0700): full backups must not be readable by every local user. Run as
//! root in a repository that belongs to another user (the PostgreSQL
//! server's user, whose archive_command writes there), pgvault gives what
//! it creates to that user, so that a root cron job never leaves behind a
//! directory the archiver cannot write.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::backend::{
    Backend, ObjectMeta, ObjectVersion, PutMode, PutOutcome, PutResult, RawRead, Spool, TmpFile,
};
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct LocalBackend {
    root: PathBuf,
    /// Whom new files and directories are given to (see the module docs);
    /// known once the root exists.
    owner: Arc<OnceLock<Option<(u32, u32)>>>,
}

/// Names pgvault uses for its own files in a repository directory; they are
/// never listed as objects.
const OWN_PREFIX: &str = ".pgvault-";
const TMP_PREFIX: &str = ".pgvault-tmp-";
/// Below the root: the lock files of compare-and-rename, one per stripe of
/// directories (see [`Ctx::lock_dir`]).
const LOCKS_DIR: &str = ".pgvault-locks";
const LOCK_STRIPES: u64 = 256;
const FILE_MODE: u32 = 0o600;
/// How long a writer waits for a directory's lock.
const DIR_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
const DIR_MODE: u32 = 0o700;

impl LocalBackend {
    pub fn new(root: PathBuf) -> Self {
        LocalBackend {
            root,
            owner: Arc::new(OnceLock::new()),
        }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn err(&self, what: &str, path: &Path, e: io::Error) -> Error {
        local_error(what, path, e)
    }

    /// See [`list_blocking`].
    async fn list_files(&self, dir: &str, leftovers: bool) -> Result<Vec<ObjectMeta>> {
        let root = self.root.clone();
        let start = self.path(dir);
        let start2 = start.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            list_blocking(&root, &start2, leftovers, &mut out).map(|_| out)
        })
        .await?
        .map_err(|e| self.err("list", &start, e))
    }

    /// The user new files go to when pgvault runs as root in a repository
    /// that another user owns.
    fn owner(&self) -> Option<(u32, u32)> {
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        if let Some(o) = self.owner.get() {
            return *o;
        }
        let meta = fs::metadata(&self.root).ok()?;
        let owner = (meta.uid() != 0).then_some((meta.uid(), meta.gid()));
        *self.owner.get_or_init(|| owner)
    }

    fn ctx(&self) -> Ctx {
        Ctx {
            root: Arc::new(self.root.clone()),
            owner: self.owner(),
        }
    }
}

/// What the blocking helpers need to know about the repository.
#[derive(Clone)]
struct Ctx {
    root: Arc<PathBuf>,
    owner: Option<(u32, u32)>,
}

impl Ctx {
    /// Gives a new file or directory to the repository's owner (root only).
    fn adopt(&self, path: &Path) -> io::Result<()> {
        match self.owner {
            Some((uid, gid)) => std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .map_err(|e| at("give to the repository's owner", path, e)),
            None => Ok(()),
        }
    }

    /// Creates `dir` and any missing parents (0700), fsyncing each parent
    /// whose entries changed so the new directories survive a crash.
    fn create_dir_durable(&self, dir: &Path) -> io::Result<()> {
        if dir.is_dir() {
            return Ok(());
        }
        if let Some(parent) = dir.parent() {
            self.create_dir_durable(parent)?;
        }
        match fs::DirBuilder::new().mode(DIR_MODE).create(dir) {
            Ok(()) => {
                self.adopt(dir)?;
                if let Some(parent) = dir.parent() {
                    fsync_dir(parent)?;
                }
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(at("create directory", dir, e)),
        }
    }

    /// A new temporary file (0600) in `dir`.
    fn create_tmp(&self, dir: &Path) -> io::Result<(PathBuf, File)> {
        let tmp = dir.join(unique_tmp_name());
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&tmp)
            .map_err(|e| at("create", &tmp, e))?;
        self.adopt(&tmp)?;
        Ok((tmp, file))
    }

    /// Holds the lock of `dir` until dropped: an exclusive flock on one of
    /// [`LOCK_STRIPES`] files in `<root>/.pgvault-locks/`, chosen by the
    /// directory's path, so that the object directories hold nothing but
    /// objects (expire empties them whole) and the lock files stay few.
    /// `None` when the repository does not exist yet (nothing to protect).
    fn lock_dir(&self, dir: &Path) -> io::Result<Option<File>> {
        if !self.root.is_dir() {
            return Ok(None);
        }
        let locks = self.root.join(LOCKS_DIR);
        self.create_dir_durable(&locks)?;
        let rel = dir.strip_prefix(&*self.root).unwrap_or(dir);
        // FNV-1a: stable across runs and versions, as every process of the
        // host must pick the same stripe for a directory.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in rel.as_os_str().as_encoded_bytes() {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        let path = locks.join(format!("{:02x}", h % LOCK_STRIPES));
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&path)
        {
            Ok(f) => {
                self.adopt(&path)?;
                f
            }
            // Read-only suffices for flock; a lock file another user
            // created stays usable.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                File::open(&path).map_err(|e| at("open", &path, e))?
            }
            Err(e) => return Err(at("create", &path, e)),
        };
        // Held only around a compare and a rename, so a wait is short —
        // unless the holder was paused right there (SIGSTOP, a VM freeze):
        // then fail after a bound rather than hang behind it.
        let start = std::time::Instant::now();
        loop {
            // SAFETY: flock on a descriptor we own; no memory is involved.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Some(file));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::WouldBlock if start.elapsed() < DIR_LOCK_WAIT => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                io::ErrorKind::WouldBlock => {
                    return Err(io::Error::new(
                        io::ErrorKind::WouldBlock,
                        format!(
                            "lock {}: another process has held it for {}s \
                             (a pgvault paused in the middle of a replace?)",
                            path.display(),
                            DIR_LOCK_WAIT.as_secs()
                        ),
                    ))
                }
                _ => return Err(at("lock", &path, e)),
            }
        }
    }
}

/// An I/O error that says what pgvault was doing and to which path.
fn at(what: &str, path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| at("fsync directory", dir, e))
}

fn unique_tmp_name() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{TMP_PREFIX}{}-{n}-{nanos:08x}", std::process::id())
}

/// A local object's version: the SHA-256 of its bytes.
fn version_of(bytes: &[u8]) -> ObjectVersion {
    ObjectVersion {
        e_tag: Some(hex::encode(Sha256::digest(bytes))),
        version: None,
    }
}

/// The version of the object at `path`, `None` if there is none.
fn current_version(path: &Path) -> io::Result<Option<ObjectVersion>> {
    let mut f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(at("open", path, e)),
    };
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => h.update(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(at("read", path, e)),
        }
    }
    Ok(Some(ObjectVersion {
        e_tag: Some(hex::encode(h.finalize())),
        version: None,
    }))
}

/// Puts the fsynced temporary file `tmp` in place as `dest` under `mode`.
/// `tmp` is gone afterwards whatever happened.
fn place(ctx: &Ctx, tmp: &Path, dest: &Path, mode: &PutMode) -> io::Result<PutOutcome> {
    let dir = dest
        .parent()
        .ok_or_else(|| io::Error::other(format!("{} has no directory", dest.display())))?;
    let outcome = match mode {
        PutMode::CreateNew => {
            let r = fs::hard_link(tmp, dest);
            let _ = fs::remove_file(tmp);
            match r {
                Ok(()) => PutOutcome::Created,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    // The existing copy may come from a writer that crashed
                    // before its fsync: make it durable before anyone relies
                    // on it.
                    File::open(dest)
                        .and_then(|f| f.sync_all())
                        .map_err(|e| at("fsync", dest, e))?;
                    PutOutcome::AlreadyExists
                }
                Err(e) => return Err(at("link into place", dest, e)),
            }
        }
        PutMode::Overwrite | PutMode::Update(_) => {
            let _guard = ctx.lock_dir(dir)?;
            if let PutMode::Update(expected) = mode {
                if current_version(dest)?.as_ref() != Some(expected) {
                    let _ = fs::remove_file(tmp);
                    return Ok(PutOutcome::AlreadyExists);
                }
            }
            if let Err(e) = fs::rename(tmp, dest) {
                let _ = fs::remove_file(tmp);
                return Err(at("rename into place", dest, e));
            }
            PutOutcome::Created
        }
    };
    fsync_dir(dir)?;
    Ok(outcome)
}

/// Flushes and fsyncs a spooled file, then places it.
fn commit_blocking(
    ctx: Ctx,
    tmp: &Path,
    file: BufWriter<File>,
    dest: &Path,
    mode: &PutMode,
) -> io::Result<PutOutcome> {
    let r = (|| {
        let file = file
            .into_inner()
            .map_err(|e| at("write", tmp, e.into_error()))?;
        // On network filesystems close() can report the loss of data that
        // write() accepted; sync_all surfaces it before we claim durability.
        file.sync_all().map_err(|e| at("fsync", tmp, e))?;
        drop(file);
        if let Some(dir) = dest.parent() {
            ctx.create_dir_durable(dir)?;
        }
        Ok(())
    })();
    if let Err(e) = r {
        let _ = fs::remove_file(tmp);
        return Err(e);
    }
    place(&ctx, tmp, dest, mode)
}

/// Whether `dir` holds an object anywhere below it. Deleting objects leaves
/// their directories behind; on an object store a "directory" exists only
/// while it holds objects, and `list_dirs` answers the same here. Stops at
/// the first object found.
fn holds_an_object(dir: &Path) -> io::Result<bool> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(OWN_PREFIX) {
            continue;
        }
        let ft = entry.file_type()?;
        if ft.is_file() || (ft.is_dir() && holds_an_object(&entry.path())?) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Lists the files below `dir`: the objects, or (with `leftovers`) only the
/// writers' temporary files. pgvault's other own files (directory locks)
/// are neither.
fn list_blocking(
    root: &Path,
    dir: &Path,
    leftovers: bool,
    out: &mut Vec<ObjectMeta>,
) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(at("list", dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| at("list", dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let path = entry.path();
        let ft = entry.file_type().map_err(|e| at("stat", &path, e))?;
        let tmp = name.starts_with(TMP_PREFIX);
        let own = name.starts_with(OWN_PREFIX);
        if ft.is_dir() && !own {
            list_blocking(root, &path, leftovers, out)?;
        } else if ft.is_file() && (if leftovers { tmp } else { !own }) {
            let Ok(rel) = path.strip_prefix(root) else {
                continue;
            };
            let key = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            let meta = match entry.metadata() {
                Ok(m) => m,
                // Renamed into place or removed since it was read from the
                // directory: a writer or a deleter at work.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(at("stat", &path, e)),
            };
            out.push(ObjectMeta {
                key,
                size: meta.len(),
                modified: meta.modified().ok(),
            });
        }
    }
    Ok(())
}

/// A file's identity, so that a resumed read never continues in another
/// file that replaced it.
fn identity(meta: &fs::Metadata) -> ObjectVersion {
    ObjectVersion {
        e_tag: Some(format!(
            "{}:{}:{}:{}",
            meta.dev(),
            meta.ino(),
            meta.mtime(),
            meta.mtime_nsec()
        )),
        version: None,
    }
}

fn delete_blocking(ctx: &Ctx, paths: &[PathBuf]) -> std::result::Result<(), (PathBuf, io::Error)> {
    let mut by_dir: std::collections::BTreeMap<&Path, Vec<&PathBuf>> = Default::default();
    for p in paths {
        by_dir.entry(p.parent().unwrap_or(p)).or_default().push(p);
    }
    for (dir, files) in by_dir {
        let _guard = ctx.lock_dir(dir).map_err(|e| (dir.to_path_buf(), e))?;
        for p in files {
            match fs::remove_file(p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err((p.clone(), e)),
            }
        }
    }
    Ok(())
}

#[async_trait]
impl Backend for LocalBackend {
    fn spool(&self, dir: &str) -> io::Result<Spool> {
        let dir = self.path(dir);
        let ctx = self.ctx();
        ctx.create_dir_durable(&dir)?;
        let (tmp, file) = ctx.create_tmp(&dir)?;
        Ok(Spool::LocalFile {
            tmp: TmpFile::new(tmp),
            file: BufWriter::with_capacity(1 << 20, file),
        })
    }

    async fn commit(&self, spool: Spool, key: &str, mode: PutMode) -> Result<PutOutcome> {
        let dest = self.path(key);
        let (tmp, file) = match spool {
            Spool::LocalFile { tmp, file } => (tmp.disarm(), file),
            other => {
                return Err(Error::internal(format!(
                    "local repository given a foreign spool {other:?}"
                )))
            }
        };
        let ctx = self.ctx();
        let dest2 = dest.clone();
        tokio::task::spawn_blocking(move || commit_blocking(ctx, &tmp, file, &dest2, &mode))
            .await?
            .map_err(|e| self.err("write", &dest, e))
    }

    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<PutResult> {
        let dest = self.path(key);
        let ctx = self.ctx();
        let dest2 = dest.clone();
        tokio::task::spawn_blocking(move || -> io::Result<PutResult> {
            let dir = dest2
                .parent()
                .ok_or_else(|| io::Error::other(format!("{} has no directory", dest2.display())))?;
            ctx.create_dir_durable(dir)?;
            let (tmp, mut file) = ctx.create_tmp(dir)?;
            let written = file
                .write_all(&data)
                .and_then(|_| file.sync_all())
                .map_err(|e| at("write", &tmp, e));
            drop(file);
            if let Err(e) = written {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
            Ok(match place(&ctx, &tmp, &dest2, &mode)? {
                PutOutcome::Created => PutResult::Written(version_of(&data)),
                PutOutcome::AlreadyExists => PutResult::Refused,
            })
        })
        .await?
        .map_err(|e| self.err("write", &dest, e))
    }

    fn atomic_create(&self) -> bool {
        true
    }

    async fn open(
        &self,
        key: &str,
        from: u64,
        pin: Option<&ObjectVersion>,
    ) -> Result<Option<RawRead>> {
        let path = self.path(key);
        let path2 = path.clone();
        let pin = pin.cloned();
        tokio::task::spawn_blocking(move || -> io::Result<Option<RawRead>> {
            let mut f = match File::open(&path2) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            };
            let meta = f.metadata()?;
            let id = identity(&meta);
            if pin.is_some_and(|p| p != id) {
                return Ok(None);
            }
            if from > 0 {
                f.seek(SeekFrom::Start(from.min(meta.len())))?;
            }
            Ok(Some(RawRead {
                reader: Box::new(f),
                size: meta.len(),
                pin: Some(id),
            }))
        })
        .await?
        .map_err(|e| self.err("open", &path, e))
    }

    async fn get_versioned(&self, key: &str) -> Result<Option<(Vec<u8>, ObjectVersion)>> {
        let path = self.path(key);
        let path2 = path.clone();
        tokio::task::spawn_blocking(move || match fs::read(&path2) {
            Ok(bytes) => {
                let v = version_of(&bytes);
                Ok(Some((bytes, v)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        })
        .await?
        .map_err(|e| self.err("read", &path, e))
    }

    async fn list(&self, dir: &str) -> Result<Vec<ObjectMeta>> {
        self.list_files(dir, false).await
    }

    async fn list_leftovers(&self, dir: &str) -> Result<Vec<ObjectMeta>> {
        self.list_files(dir, true).await
    }

    async fn list_dirs(&self, dir: &str) -> Result<Vec<String>> {
        let start = self.path(dir);
        let start2 = start.clone();
        tokio::task::spawn_blocking(move || -> io::Result<Vec<String>> {
            let entries = match fs::read_dir(&start2) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(e),
            };
            let mut out = Vec::new();
            for entry in entries {
                let entry = entry?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if entry.file_type()?.is_dir()
                    && !name.starts_with(OWN_PREFIX)
                    && holds_an_object(&entry.path())?
                {
                    out.push(name);
                }
            }
            out.sort();
            Ok(out)
        })
        .await?
        .map_err(|e| self.err("list", &start, e))
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.delete_many(&[key.to_string()]).await
    }

    async fn delete_many(&self, keys: &[String]) -> Result<()> {
        let paths: Vec<PathBuf> = keys.iter().map(|k| self.path(k)).collect();
        let ctx = self.ctx();
        tokio::task::spawn_blocking(move || delete_blocking(&ctx, &paths))
            .await?
            .map_err(|(p, e)| self.err("delete", &p, e))
    }

    async fn ensure_durable(&self, keys: &[String]) -> Result<()> {
        let paths: Vec<PathBuf> = keys.iter().map(|k| self.path(k)).collect();
        let r = tokio::task::spawn_blocking(
            move || -> std::result::Result<(), (PathBuf, io::Error)> {
                let mut dirs = Vec::new();
                for p in &paths {
                    File::open(p)
                        .and_then(|f| f.sync_all())
                        .map_err(|e| (p.clone(), e))?;
                    if let Some(d) = p.parent() {
                        if !dirs.contains(&d) {
                            dirs.push(d);
                        }
                    }
                }
                for d in dirs {
                    fsync_dir(d).map_err(|e| (d.to_path_buf(), e))?;
                }
                Ok(())
            },
        )
        .await?;
        r.map_err(|(p, e)| self.err("fsync", &p, e))
    }

    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn clone_arc(&self) -> Arc<dyn Backend> {
        Arc::new(self.clone())
    }
}

mod errors;
#[cfg(test)]
mod tests;

pub use errors::{local_error, permission_hint, user_name};
