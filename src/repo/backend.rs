//! Where repository objects live: a small trait with two implementations,
//! a local directory ([`super::local::LocalBackend`]) and S3-compatible
//! object storage ([`super::s3::S3Backend`]), and wrappers that compose
//! around any of them (object_store's way): [`super::fence::Fenced`] stops
//! the writes of a process that lost the stanza lock, and
//! [`super::fault::FaultBackend`] injects faults in tests.
//!
//! Keys are `/`-separated strings relative to the repository root. Large
//! objects are written through a [`Spool`]: the caller streams the encoded
//! object into it on a blocking thread (it does not need to know the final
//! key yet — WAL keys carry the checksum of the content) and then commits
//! it under a key. Small ones (claims, the stanza, the lock) go in one
//! [`Backend::put`], which also says which version of the object it wrote,
//! so that a later [`PutMode::Update`] can replace exactly that version.
//!
//! Every backend shows the behaviours of [`super::conformance`]; the suite
//! runs against each (unit tests for the local directory, tests/it/backends.rs
//! for moto and s3s-fs, and both under the fault injector).

use std::fmt;
use std::io::{self, Read, Write};
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub key: String,
    pub size: u64,
    /// When the object was last written, where the store says (a local
    /// file's mtime, an object's `Last-Modified`): how old a leftover is.
    pub modified: Option<std::time::SystemTime>,
}

/// Which version of an object a read saw or a write produced. Opaque: only
/// the backend that returned it interprets it (an e-tag and version id on
/// object stores, a checksum of the content on a local directory).
///
/// Versions follow content on every store pgvault knows (S3's e-tag of a
/// single PUT is the MD5 of the bytes): writing the very same bytes again
/// may give the same version. Objects that are updated conditionally must
/// therefore carry something unique to each write (the lock carries its
/// holder's token and expiry).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectVersion {
    pub e_tag: Option<String>,
    pub version: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutMode {
    /// Replace whatever is there (small metadata that is replaced atomically).
    Overwrite,
    /// Create only if no object exists under the key. Atomic where
    /// [`Backend::atomic_create`] says so; otherwise a best effort that the
    /// caller must back up with its own conflict detection (or use
    /// [`Backend::put_versioned`], which does it).
    CreateNew,
    /// Replace the object only if it still has this version (read with
    /// [`Backend::get_versioned`] or returned by an earlier put); refused
    /// when it changed or is gone. Atomic on the same terms as `CreateNew`.
    Update(ObjectVersion),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// Written (for [`PutMode::Update`]: replaced).
    Created,
    /// Not written: an object exists (`CreateNew`) or it no longer has the
    /// expected version (`Update`).
    AlreadyExists,
}

/// What a [`Backend::put`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutResult {
    /// The bytes are stored; the object now has this version.
    Written(ObjectVersion),
    /// The condition of the [`PutMode`] did not hold; nothing was written.
    Refused,
}

/// A blocking reader over an object's bytes, to be consumed on a blocking
/// thread (`spawn_blocking`), never on the async runtime.
pub type ObjectReader = Box<dyn Read + Send>;

/// One raw read of an object from an offset, as a backend serves it: the
/// body may break off (a reset connection, a truncated response).
/// [`Backend::get`] resumes it.
pub struct RawRead {
    pub reader: ObjectReader,
    /// The object's whole size (not what is left from the offset).
    pub size: u64,
    /// What a resumed read must match so that two versions of an object are
    /// never spliced together (an e-tag; on a local directory the file's
    /// identity). Backend-specific, like [`ObjectVersion`].
    pub pin: Option<ObjectVersion>,
}

/// How long a writer on a store whose conditional writes are missing or not
/// atomic waits before reading an object back to see whether its write won:
/// longer than any racing writer's check-then-write takes.
pub const SETTLE: Duration = Duration::from_millis(300);

/// How many times a read whose body broke off is started again (from the
/// offset it reached) before it is reported as a failed transfer.
pub const READ_ATTEMPTS: u32 = 6;

#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug {
    /// A sink for a new object that will be committed under `dir`
    /// (a key prefix without trailing `/`). Blocking; call it off the runtime.
    fn spool(&self, dir: &str) -> io::Result<Spool>;

    /// Makes the spooled object durable under `key`.
    async fn commit(&self, spool: Spool, key: &str, mode: PutMode) -> Result<PutOutcome>;

    /// Stores a small object held in memory, durably, in one atomic step,
    /// and says which version it now has. Does no blocking work on the
    /// runtime. On stores whose conditional writes are not atomic this is
    /// one attempt; [`Backend::put_versioned`] adds the read-back.
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<PutResult>;

    /// Whether [`PutMode::CreateNew`] and [`PutMode::Update`] are atomic
    /// (exactly one of racing writers gets to write).
    fn atomic_create(&self) -> bool;

    /// Starts reading `key` at byte `from`; `None` when the object does not
    /// exist — or, with `pin`, is no longer the one pinned (a resumed read
    /// never continues in another version). The body may break off: use
    /// [`Backend::get`], which resumes it.
    async fn open(
        &self,
        key: &str,
        from: u64,
        pin: Option<&ObjectVersion>,
    ) -> Result<Option<RawRead>>;

    /// A small object's bytes and version; `None` when it does not exist.
    async fn get_versioned(&self, key: &str) -> Result<Option<(Vec<u8>, ObjectVersion)>>;

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

    /// Deletes `key`; a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<()>;

    /// Checks that objects exist and makes them durable (an earlier writer
    /// may have crashed before its fsync; object stores only check).
    async fn ensure_durable(&self, keys: &[String]) -> Result<()>;

    /// The repository as the user named it, for messages.
    fn describe(&self) -> String;

    /// A shared handle on this backend, for readers that outlive the call
    /// that made them (a resumed read opens the object again).
    fn clone_arc(&self) -> Arc<dyn Backend>;

    /// The object, or `None` when it definitely does not exist. Every other
    /// failure is an error: callers must never mistake an unreachable
    /// repository for a missing object. A body that breaks off is resumed
    /// from where it stopped (the same version of the object, never a newer
    /// one), up to [`READ_ATTEMPTS`] times without progress; after that the
    /// reader fails with "transfer of <object> failed after N attempts",
    /// which the codec reports as a transfer error, never as corruption.
    async fn get(&self, key: &str) -> Result<Option<ObjectReader>> {
        let Some(first) = self.open(key, 0, None).await? else {
            return Ok(None);
        };
        Ok(Some(Box::new(ResumingReader::new(
            self.clone_arc(),
            key,
            first,
        ))))
    }

    /// The bytes `range` of the stored object (as stored: encoded), or
    /// `None` when it does not exist. A range that does not lie within the
    /// object is an error naming the object's size. Incremental backups read
    /// chunks of larger objects this way.
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Option<Bytes>> {
        let what = format!("{}/{key}", self.describe());
        // An empty range only asks whether the object is there (and long
        // enough): a read from its very end is not one that every store
        // serves.
        let from = if range.is_empty() { 0 } else { range.start };
        let Some(first) = self.open(key, from, None).await? else {
            return Ok(None);
        };
        check_range(&what, &range, first.size)?;
        if range.is_empty() {
            return Ok(Some(Bytes::new()));
        }
        let mut reader = ResumingReader::new(self.clone_arc(), key, first);
        reader.offset = range.start;
        let len = range.end - range.start;
        let out = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
            reader.read_exact(&mut buf).map(|_| Bytes::from(buf))
        })
        .await?;
        out.map(Some)
            .map_err(|e| Error::repository(format!("read {what} bytes {range:?}: {e}")))
    }

    /// Deletes many objects, with bounded parallelism (object stores delete
    /// up to 1,000 per request). Missing objects are not errors. No order
    /// among `keys` is kept: a caller that needs one (data before the
    /// manifest that points to it) makes two calls.
    async fn delete_many(&self, keys: &[String]) -> Result<()> {
        let mut results = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(8) {
            let batch = futures::future::join_all(chunk.iter().map(|k| self.delete(k))).await;
            results.extend(batch);
        }
        first_of_failures(results.into_iter().filter_map(|r| r.err()), keys.len())
    }

    /// [`Backend::put`], made reliable for conditional modes on every store:
    /// where conditional writes are not atomic, waits [`SETTLE`] and reads
    /// the object back, and only the writer whose bytes are there wins (the
    /// discipline archive-push's claims use); where a write was refused,
    /// reads it back too, because a retried request whose first attempt did
    /// land is refused by the object it wrote itself. The bytes must be
    /// unique to this writer (see [`ObjectVersion`]).
    async fn put_versioned(&self, key: &str, data: Bytes, mode: PutMode) -> Result<PutResult> {
        if mode == PutMode::Overwrite {
            return self.put(key, data, mode).await;
        }
        let first = self.put(key, data.clone(), mode).await?;
        if first != PutResult::Refused && self.atomic_create() {
            return Ok(first);
        }
        if first != PutResult::Refused {
            tokio::time::sleep(SETTLE).await;
        }
        match self.get_versioned(key).await? {
            Some((bytes, version)) if bytes == data => Ok(PutResult::Written(version)),
            _ => Ok(PutResult::Refused),
        }
    }

    /// Small whole-object helpers.
    async fn put_bytes(&self, key: &str, data: Vec<u8>, mode: PutMode) -> Result<PutOutcome> {
        Ok(match self.put(key, Bytes::from(data), mode).await? {
            PutResult::Written(_) => PutOutcome::Created,
            PutResult::Refused => PutOutcome::AlreadyExists,
        })
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
        Error::repository(format!("read {}/{}: {}", self.describe(), key, e))
    }
}

/// The error for a range that does not lie within an object of `size` bytes.
pub fn check_range(what: &str, range: &Range<u64>, size: u64) -> Result<()> {
    if range.start > range.end || range.end > size {
        return Err(Error::repository(format!(
            "{what}: bytes {range:?} asked of an object of {size} bytes"
        )));
    }
    Ok(())
}

/// One error for a batch: the first failure, and how many there were.
pub fn first_of_failures(mut errors: impl Iterator<Item = Error>, of: usize) -> Result<()> {
    let Some(first) = errors.next() else {
        return Ok(());
    };
    let more = errors.count();
    if more == 0 {
        return Err(first);
    }
    Err(first.context(format!("{} of {of} deletions failed; the first", more + 1)))
}

/// A reader that starts the read again from where it broke off.
///
/// It runs on a blocking thread; reopening is async, so it is handed to the
/// runtime (the one current when the reader was made) and awaited through a
/// channel, which works whether the consumer is a `spawn_blocking` task or
/// a thread of its own.
pub struct ResumingReader {
    backend: Arc<dyn Backend>,
    key: String,
    current: Option<ObjectReader>,
    size: u64,
    pin: Option<ObjectVersion>,
    offset: u64,
    /// Failed attempts since the last byte that came through.
    failures: u32,
    handle: tokio::runtime::Handle,
}

/// Marks an I/O error as a failed transfer (the reader's, not the data's):
/// the codec reports it as such instead of as corruption.
#[derive(Debug)]
pub struct TransferError(pub String);

impl fmt::Display for TransferError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TransferError {}

impl TransferError {
    /// Whether `e` is (or wraps) a failed transfer.
    pub fn is(e: &io::Error) -> bool {
        e.get_ref().is_some_and(|inner| inner.is::<TransferError>())
    }
}

impl ResumingReader {
    fn new(backend: Arc<dyn Backend>, key: &str, first: RawRead) -> Self {
        ResumingReader {
            backend,
            key: key.to_string(),
            current: Some(first.reader),
            size: first.size,
            pin: first.pin,
            offset: 0,
            failures: 0,
            handle: tokio::runtime::Handle::current(),
        }
    }

    fn what(&self) -> String {
        format!("{}/{}", self.backend.describe(), self.key)
    }

    fn reopen(&mut self) -> io::Result<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        let (backend, key, pin, from) = (
            self.backend.clone(),
            self.key.clone(),
            self.pin.clone(),
            self.offset,
        );
        self.handle.spawn(async move {
            let _ = tx.send(backend.open(&key, from, pin.as_ref()).await);
        });
        let opened = rx
            .recv()
            .map_err(|_| io::Error::other(format!("reopen {}: runtime stopped", self.what())))?;
        match opened {
            Ok(Some(raw)) => {
                self.current = Some(raw.reader);
                Ok(())
            }
            Ok(None) => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "{} was removed or replaced while it was being read",
                    self.what()
                ),
            )),
            Err(e) => Err(io::Error::other(e.to_string())),
        }
    }

    /// A failed attempt: wait, then reopen, or give up after
    /// [`READ_ATTEMPTS`] attempts without progress.
    fn failed(&mut self, cause: String) -> io::Result<()> {
        self.current = None;
        self.failures += 1;
        if self.failures >= READ_ATTEMPTS {
            return Err(io::Error::other(TransferError(format!(
                "transfer of {} failed after {} attempts: {cause}",
                self.what(),
                self.failures
            ))));
        }
        log::debug!(
            "read of {} broke off at byte {} of {} ({cause}); resuming",
            self.what(),
            self.offset,
            self.size
        );
        std::thread::sleep(backoff(self.failures));
        match self.reopen() {
            Ok(()) => Ok(()),
            // The object is gone or changed: not something a retry mends.
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(e),
            Err(e) => self.failed(e.to_string()),
        }
    }
}

/// Exponential backoff from 50 ms, at most 2 s.
pub fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(50u64.saturating_mul(1 << attempt.min(6))).min(Duration::from_secs(2))
}

impl Read for ResumingReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            let Some(r) = self.current.as_mut() else {
                // Only after a give-up or a permanent error.
                return Err(io::Error::other(TransferError(format!(
                    "transfer of {} failed earlier",
                    self.what()
                ))));
            };
            match r.read(out) {
                Ok(0) if self.offset >= self.size => return Ok(0),
                Ok(0) => {
                    let cause = format!("body ended at byte {} of {}", self.offset, self.size);
                    self.failed(cause)?;
                }
                Ok(n) => {
                    self.offset += n as u64;
                    self.failures = 0;
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.failed(e.to_string())?,
            }
        }
    }
}

/// An object being written. In memory up to a bound, then on disk.
pub enum Spool {
    /// A temporary file in the final directory of a local repository.
    LocalFile {
        tmp: TmpFile,
        file: io::BufWriter<std::fs::File>,
    },
    /// Object stores: memory first …
    Memory(Vec<u8>),
    /// … then a temporary file, so memory stays bounded whatever the size.
    Spilled(io::BufWriter<tempfile::NamedTempFile>),
}

/// Above this many bytes an object-store spool moves to a temporary file.
pub const SPOOL_MEMORY_LIMIT: usize = 16 << 20;

/// The path of a local spool's temporary file, which is removed when it is
/// dropped before the committer took it: an encode that failed, a file that
/// vanished, a full disk leave nothing behind (nothing lists temporary
/// files, so nothing else would ever remove them).
#[derive(Debug)]
pub struct TmpFile {
    path: PathBuf,
    armed: bool,
}

impl TmpFile {
    pub fn new(path: PathBuf) -> Self {
        TmpFile { path, armed: true }
    }

    /// The path, now the caller's to rename or remove.
    pub fn disarm(mut self) -> PathBuf {
        self.armed = false;
        std::mem::take(&mut self.path)
    }
}

impl std::ops::Deref for TmpFile {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.path
    }
}

impl AsRef<std::path::Path> for TmpFile {
    fn as_ref(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for TmpFile {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A local write error that names the file (a bare "No space left on
/// device" does not say where).
fn local_write_error(tmp: &std::path::Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("write {}: {e}", tmp.display()))
}

impl Write for Spool {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Spool::LocalFile { tmp, file } => {
                file.write(buf).map_err(|e| local_write_error(tmp, e))
            }
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
            Spool::LocalFile { tmp, file } => file.flush().map_err(|e| local_write_error(tmp, e)),
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
