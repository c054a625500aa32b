//! A repository in a local (or mounted) directory.
//!
//! Durability is explicit, because a WAL file that PostgreSQL was told is
//! archived may be removed from `pg_wal` right after: write to a temporary
//! name in the final directory, fsync it, link or rename it into place, fsync
//! the directory. `link()` gives an atomic create-if-absent (it fails with
//! EEXIST), which is what makes two racing archive-pushes safe here.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::backend::{Backend, ObjectMeta, ObjectReader, PutMode, PutOutcome, Spool};
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct LocalBackend {
    root: PathBuf,
}

const TMP_PREFIX: &str = ".pgvault-tmp-";

impl LocalBackend {
    pub fn new(root: PathBuf) -> Self {
        LocalBackend { root }
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
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

    fn err(&self, what: &str, path: &Path, e: io::Error) -> Error {
        let mut err = Error::repository(format!("{what} {}: {e}", path.display()));
        if e.kind() == io::ErrorKind::PermissionDenied {
            err = err.hint(
                "the repository must be writable by the user running pgvault \
                 (archive_command runs as the PostgreSQL server's user)",
            );
        }
        err
    }
}

/// Creates `dir` and any missing parents, fsyncing each parent whose
/// entries changed so the new directories survive a crash.
fn create_dir_durable(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        create_dir_durable(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {
            if let Some(parent) = dir.parent() {
                fsync_dir(parent)?;
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
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

fn commit_blocking(
    tmp: &Path,
    file: BufWriter<File>,
    dest: &Path,
    mode: PutMode,
) -> io::Result<PutOutcome> {
    let file = file.into_inner().map_err(|e| e.into_error())?;
    // On network filesystems close() can report the loss of data that
    // write() accepted; sync_all surfaces it before we claim durability.
    file.sync_all()?;
    drop(file);
    let dir = dest.parent().expect("object keys always have a directory");
    let outcome = match mode {
        PutMode::Overwrite => {
            fs::rename(tmp, dest)?;
            PutOutcome::Created
        }
        PutMode::CreateNew => {
            let r = fs::hard_link(tmp, dest);
            let _ = fs::remove_file(tmp);
            match r {
                Ok(()) => PutOutcome::Created,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    // The existing copy may come from a writer that crashed
                    // before its fsync: make it durable before anyone relies
                    // on it.
                    File::open(dest)?.sync_all()?;
                    PutOutcome::AlreadyExists
                }
                Err(e) => return Err(e),
            }
        }
    };
    fsync_dir(dir)?;
    Ok(outcome)
}

/// Lists the files below `dir`: the objects, or (with `leftovers`) only the
/// writers' temporary files.
fn list_blocking(
    root: &Path,
    dir: &Path,
    leftovers: bool,
    out: &mut Vec<ObjectMeta>,
) -> io::Result<()> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let ft = entry.file_type()?;
        let path = entry.path();
        let tmp = name.to_string_lossy().starts_with(TMP_PREFIX);
        if ft.is_dir() && !tmp {
            list_blocking(root, &path, leftovers, out)?;
        } else if ft.is_file() && tmp == leftovers {
            let rel = path.strip_prefix(root).expect("listed below the root");
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
                Err(e) => return Err(e),
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

#[async_trait]
impl Backend for LocalBackend {
    fn spool(&self, dir: &str) -> io::Result<Spool> {
        let dir = self.path(dir);
        create_dir_durable(&dir)
            .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", dir.display())))?;
        let tmp = dir.join(unique_tmp_name());
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| io::Error::new(e.kind(), format!("create {}: {e}", tmp.display())))?;
        Ok(Spool::LocalFile {
            tmp,
            file: BufWriter::with_capacity(1 << 20, file),
        })
    }

    async fn commit(&self, spool: Spool, key: &str, mode: PutMode) -> Result<PutOutcome> {
        let dest = self.path(key);
        let (tmp, file) = match spool {
            Spool::LocalFile { tmp, file } => (tmp, file),
            other => {
                return Err(Error::internal(format!(
                    "local repository given a foreign spool {other:?}"
                )))
            }
        };
        let dest2 = dest.clone();
        let tmp2 = tmp.clone();
        let r = tokio::task::spawn_blocking(move || {
            if let Some(dir) = dest2.parent() {
                create_dir_durable(dir)?;
            }
            commit_blocking(&tmp2, file, &dest2, mode)
        })
        .await?;
        r.map_err(|e| {
            let _ = fs::remove_file(&tmp);
            self.err("write", &dest, e)
        })
    }

    fn atomic_create(&self) -> bool {
        true
    }

    async fn get(&self, key: &str) -> Result<Option<ObjectReader>> {
        let path = self.path(key);
        match File::open(&path) {
            Ok(f) => Ok(Some(Box::new(f))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err("open", &path, e)),
        }
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
                if entry.file_type()?.is_dir() && !name.starts_with(TMP_PREFIX) {
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
        let path = self.path(key);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.err("delete", &path, e)),
        }
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
}
