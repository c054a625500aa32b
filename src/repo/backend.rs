//! Where repository objects live: a small trait with two implementations,
//! a local directory ([`super::local::LocalBackend`]) and S3-compatible
//! object storage ([`super::s3::S3Backend`]).
//!
//! Keys are `/`-separated strings relative to the repository root. Writing
//! goes through a [`Spool`]: the caller streams the encoded object into it on
//! a blocking thread (it does not need to know the final key yet — WAL keys
//! carry the checksum of the content) and then commits it under a key.

use std::fmt;
use std::io::{self, Read, Write};

use async_trait::async_trait;

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    /// When the object was last written, where the store says (a local
    /// file's mtime, an object's `Last-Modified`): how old a leftover is.
    pub modified: Option<std::time::SystemTime>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutMode {
    /// Replace whatever is there (small metadata that is replaced atomically).
    Overwrite,
    /// Create only if no object exists under the key. Atomic where
    /// [`Backend::atomic_create`] says so; otherwise a best effort that the
    /// caller must back up with its own conflict detection.
    CreateNew,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    AlreadyExists,
}

/// A blocking reader over an object's bytes, to be consumed on a blocking
/// thread (`spawn_blocking`), never on the async runtime.
pub type ObjectReader = Box<dyn Read + Send>;

#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug {
    /// A sink for a new object that will be committed under `dir`
    /// (a key prefix without trailing `/`). Blocking; call it off the runtime.
    fn spool(&self, dir: &str) -> io::Result<Spool>;

    /// Makes the spooled object durable under `key`.
    async fn commit(&self, spool: Spool, key: &str, mode: PutMode) -> Result<PutOutcome>;

    /// Whether [`PutMode::CreateNew`] is atomic (exactly one of racing
    /// creators gets `Created`).
    fn atomic_create(&self) -> bool;

    /// The object, or `None` when it definitely does not exist. Every other
    /// failure is an error: callers must never mistake an unreachable
    /// repository for a missing object.
    async fn get(&self, key: &str) -> Result<Option<ObjectReader>>;

    /// Every object below `dir` (recursively), in no particular order.
    /// Temporary files of writers in progress are not listed.
    async fn list(&self, dir: &str) -> Result<Vec<ObjectMeta>>;

    /// The names one level below `dir` that hold objects (the
    /// "directories" of a key prefix), sorted, without reading what they
    /// hold. This default lists everything below `dir`; backends that can
    /// list one level (a directory, a delimiter listing) do that instead.
    async fn list_dirs(&self, dir: &str) -> Result<Vec<String>> {
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        let mut out: Vec<String> = self
            .list(dir)
            .await?
            .into_iter()
            .filter_map(|m| {
                let (first, _) = m.key.strip_prefix(&prefix)?.split_once('/')?;
                Some(first.to_string())
            })
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// The temporary files of writers below `dir` (recursively), which
    /// [`Backend::list`] hides: those of a writer killed before it committed
    /// stay behind. Only a local directory has them (an object store never
    /// shows an upload before it completes).
    async fn list_leftovers(&self, _dir: &str) -> Result<Vec<ObjectMeta>> {
        Ok(Vec::new())
    }

    async fn delete(&self, key: &str) -> Result<()>;

    /// Checks that objects exist and makes them durable (an earlier writer
    /// may have crashed before its fsync; object stores only check).
    async fn ensure_durable(&self, keys: &[String]) -> Result<()>;

    /// The repository as the user named it, for messages.
    fn describe(&self) -> String;

    /// Small whole-object helpers.
    async fn put_bytes(&self, key: &str, data: Vec<u8>, mode: PutMode) -> Result<PutOutcome> {
        let dir = key
            .rsplit_once('/')
            .map(|(d, _)| d)
            .unwrap_or("")
            .to_string();
        let spool = {
            let mut s = self.spool(&dir).map_err(|e| self.io_error(key, e))?;
            s.write_all(&data).map_err(|e| self.io_error(key, e))?;
            s
        };
        self.commit(spool, key, mode).await
    }

    async fn get_bytes(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let Some(reader) = self.get(key).await? else {
            return Ok(None);
        };
        let key2 = key.to_string();
        let out = tokio::task::spawn_blocking(move || {
            let mut r = reader;
            let mut v = Vec::new();
            r.read_to_end(&mut v).map(|_| v)
        })
        .await?;
        out.map(Some).map_err(|e| self.io_error(&key2, e))
    }

    fn io_error(&self, key: &str, e: io::Error) -> Error {
        Error::repository(format!("{}/{}: {}", self.describe(), key, e))
    }
}

/// An object being written. In memory up to a bound, then on disk.
pub enum Spool {
    /// A temporary file in the final directory of a local repository.
    LocalFile {
        tmp: std::path::PathBuf,
        file: io::BufWriter<std::fs::File>,
    },
    /// Object stores: memory first …
    Memory(Vec<u8>),
    /// … then a temporary file, so memory stays bounded whatever the size.
    Spilled(io::BufWriter<tempfile::NamedTempFile>),
}

/// Above this many bytes an object-store spool moves to a temporary file.
pub const SPOOL_MEMORY_LIMIT: usize = 16 << 20;

impl Write for Spool {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Spool::LocalFile { file, .. } => file.write(buf),
            Spool::Spilled(f) => f.write(buf),
            Spool::Memory(v) => {
                if v.len() + buf.len() > SPOOL_MEMORY_LIMIT {
                    let mut f =
                        io::BufWriter::with_capacity(1 << 20, tempfile::NamedTempFile::new()?);
                    f.write_all(v)?;
                    f.write_all(buf)?;
                    *self = Spool::Spilled(f);
                } else {
                    v.extend_from_slice(buf);
                }
                Ok(buf.len())
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Spool::LocalFile { file, .. } => file.flush(),
            Spool::Spilled(f) => f.flush(),
            Spool::Memory(_) => Ok(()),
        }
    }
}

impl fmt::Debug for Spool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Spool::LocalFile { tmp, .. } => write!(f, "Spool::LocalFile({})", tmp.display()),
            Spool::Memory(v) => write!(f, "Spool::Memory({} bytes)", v.len()),
            Spool::Spilled(_) => f.write_str("Spool::Spilled"),
        }
    }
}

/// Joins key parts with `/`, skipping empty ones.
pub fn join_key(parts: &[&str]) -> String {
    let mut out = String::new();
    for p in parts
        .iter()
        .map(|p| p.trim_matches('/'))
        .filter(|p| !p.is_empty())
    {
        if !out.is_empty() {
            out.push('/');
        }
        out.push_str(p);
    }
    out
}
