//! Durability of a restore: writeback started early while files are
//! written, ownership set before the flush, one `syncfs` per file system
//! at the end, and the directory fsync for `global/pg_control`.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::{Error, Kind, Result};

/// An I/O error on the data directory being restored: what was done, to
/// which path, and (for a full disk, permissions) a hint.
pub(super) fn local_err<'a>(what: &'a str, path: &'a Path) -> impl Fn(io::Error) -> Error + 'a {
    move |e| Error::io(Kind::Internal, what, path.display(), &e)
}

pub(super) fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(local_err("fsync", dir))
}

/// Bytes written to one file between two starts of its writeback.
pub(super) const WRITEBACK_AFTER: u64 = 1 << 20;

/// Files smaller than this are left to the final `syncfs` whole.
pub(super) const WRITEBACK_MIN_FILE: u64 = 64 << 10;

/// A file being restored that starts the kernel's writeback of what was
/// written every [`WRITEBACK_AFTER`] bytes, without waiting for it —
/// PostgreSQL's `pg_flush_data` (storage/file/fd.c) does the same with
/// `sync_file_range(SYNC_FILE_RANGE_WRITE)` for checkpoints and initdb's
/// sync. Otherwise nothing reaches the disk until the dirty-page limits
/// or the final `syncfs`: the disk idles while files are decoded, then
/// the CPU idles while the disk writes everything at the end. Durability
/// still comes from that `syncfs` (this only starts writes early).
pub(super) struct StartWriteback {
    file: File,
    written: u64,
    started: u64,
}

impl StartWriteback {
    pub(super) fn new(file: File) -> Self {
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
    pub(super) fn finish(mut self) -> File {
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

/// Flushes everything written: one `syncfs` per file system involved
/// (the data directory and each tablespace) instead of an fsync per file.
pub(super) fn sync_tree(pgdata: &Path) -> Result<()> {
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

pub(super) fn chown_tree(root: &Path, uid: u32, gid: u32) -> Result<()> {
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
