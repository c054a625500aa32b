//! The restore's workers: one stored object at a time, each file decoded,
//! checked against its SHA-256 from the manifest and written.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use crate::catalog::scratch::{self, Groups, Rows};
use crate::error::{Error, Result, WriteWatch};
use crate::ops::progress::Progress;
use crate::ops::workers;
use crate::repo::blockmap;
use crate::repo::codec::{self, Binding, Keys};
use crate::repo::filelist::split_object_group;
use crate::repo::layout;
use crate::repo::manifest::FileEntry;
use crate::repo::{Backend, Repository};

use super::blocks::{decode_checked, write_blocks, write_chunks};
use super::durable::{local_err, StartWriteback};
use super::lay::Laid;
use super::pieces::{from_json, Piece, PieceRow, Planned, MAPPED_IN_PLACE, MAPPED_KEPT};
use super::pipe::{Piped, PIPED_MIN_FILE};

#[allow(clippy::too_many_arguments)]
pub(super) async fn write_files(
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

pub(super) fn discard<R: Read>(r: &mut R, n: u64, what: &str) -> Result<()> {
    io::copy(&mut r.take(n), &mut io::sink())
        .map_err(|e| Error::repository(format!("read {what}: {e}")))?;
    Ok(())
}

/// Decodes one file from `r` into `dest`, checking its checksum against the
/// manifest, then sets mode and mtime.
pub(super) fn write_one<R: Read>(
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
    let file = StartWriteback::new(file);
    let out = if f.size >= PIPED_MIN_FILE {
        Out::Piped(Piped::new(file).map_err(local_err("start a writer thread for", dest))?)
    } else {
        let cap = usize::try_from(f.size.clamp(8 << 10, 1 << 20)).unwrap_or(1 << 20);
        Out::Buffered(BufWriter::with_capacity(cap, file))
    };
    let mut out = WriteWatch::new(out);
    // A failed write (a full disk) is the target's, not a damaged object.
    let shape = (f.length, f.size, f.chunk_blocks);
    let expect = (f.sha256.as_str(), f.size);
    let matched = decode_checked(r, &mut out, dest, shape, expect, (keys, bind), || {
        what.to_string()
    })?;
    let out = out.into_inner();
    if !matched {
        return Err(Error::repository(format!(
            "{what}: restored {} does not match the manifest (checksum or size)",
            f.path
        )));
    }
    let file = out.finish().map_err(local_err("write", dest))?.finish();
    file.set_permissions(fs::Permissions::from_mode(f.mode & 0o750))
        .map_err(local_err("set permissions of", dest))?;
    let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(f.mtime.max(0) as u64);
    let _ = file.set_modified(mtime);
    Ok(())
}

/// Is `dest` already what the manifest says (for `--delta`)?
pub(super) fn matches(dest: &Path, f: &FileEntry) -> bool {
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

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}
impl Mode0600 for OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

/// Where [`write_one`] puts a file's bytes: through a buffer, or for a
/// large file through a writer thread of its own.
enum Out {
    Buffered(BufWriter<StartWriteback>),
    Piped(Piped),
}

impl Out {
    /// The file, once every byte reached it.
    fn finish(self) -> io::Result<StartWriteback> {
        match self {
            Out::Buffered(b) => b.into_inner().map_err(|e| e.into_error()),
            Out::Piped(p) => p.finish(),
        }
    }
}

impl io::Write for Out {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Out::Buffered(b) => b.write(buf),
            Out::Piped(p) => p.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Out::Buffered(b) => b.flush(),
            Out::Piped(p) => p.flush(),
        }
    }
}
