//! Encoding one file (or its changed blocks) into a data object.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};

use super::super::copy::ScanFile;
use super::super::incr::BlockReader;
use super::super::resume;
use super::{Worker, BUNDLE_FILE_MAX};
use crate::error::{Error, Kind, Result};
use crate::pg::page::PageVerifier;
use crate::pg::relfile::RelFile;
use crate::repo::blockmap::{self, Part, Ranges};
use crate::repo::blocksums::{BlockSum, Summer};
use crate::repo::chunked::{PieceEncoder, CHUNK_BLOCKS};
use crate::repo::codec::{Binding, EncodeOptions};
use crate::repo::layout;
use crate::repo::manifest::{BadPageEntry, FileEntry};
use crate::repo::{PutMode, Spool};

/// Counts what passes through, so bundle offsets are known.
pub(super) struct Counting<W> {
    pub inner: W,
    pub n: u64,
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

impl Worker {
    pub(super) fn new_object(&mut self) -> io::Result<(Counting<Spool>, String)> {
        let name = layout::backup_object_name(self.id, self.next_object);
        self.next_object += 1;
        let spool = self.backend.spool(&format!("{}/data", self.dir))?;
        Ok((Counting { inner: spool, n: 0 }, name))
    }

    pub(super) fn commit(&self, spool: Spool, object: &str) -> Result<()> {
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
    pub(super) fn encode_into(
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

    pub(super) fn write_err(&self, e: io::Error) -> Error {
        let dir = format!("{}/{}", self.backend.describe(), self.dir);
        Error::io(Kind::Repository, "write to", dir, &e)
    }

    /// Whether `f` on disk is the reference's copy `old` (size and SHA-256;
    /// a file that vanished is not).
    pub(super) fn same_as(&mut self, f: &ScanFile, old: &FileEntry) -> Result<bool> {
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
}
