//! The local spool: small working files that make archive-push and
//! archive-get keep up with PostgreSQL, which calls them one file at a time.
//!
//! * `pushed/<wal>`: a record that look-ahead archive-push stored `<wal>`
//!   durably in the repository, with its SHA-256 and size, and which file
//!   it read ([`FileIdentity`]). Written only after the object is durable; a
//!   later call for `<wal>` succeeds at once only if the file it is given
//!   is that very file, unchanged, or else hashes to the record's SHA-256.
//! * `get/<wal>`: a segment prefetched by archive-get, already verified
//!   against its checksum; a later call for exactly `<wal>` moves it into
//!   place.
//! * `pushing/<wal>`: the look-ahead pusher (one per spool, holding
//!   `pushing/.lock`) is pushing `<wal>` now; PostgreSQL's call for it
//!   waits for the record rather than push it a second time.
//! * `get/.timeline`: the timeline whose history file recovery fetched last
//!   (the one it recovers along), so that prefetch follows its switches.
//!
//! Files appear under their final name only by rename, after their checksum
//! was verified (and, for records, after an fsync), so a crash at any moment
//! leaves either nothing or a complete, checked file (temporaries are swept
//! after ten minutes).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::pg::{TimelineId, WalFileKind, WalFileName};
use crate::repo::{Digest256, Sha256Sum};

/// A look-ahead push record: the content pushed, and the file it was read
/// from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PushRecord {
    pub digest: Digest256,
    pub identity: Option<FileIdentity>,
}

/// Which file, in which state: device, inode, size, and modification and
/// status-change times in nanoseconds. Any write to the file, and any other
/// file put in its place, changes it (the change time cannot be set back).
/// PostgreSQL never writes a segment again once it is `.ready`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileIdentity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
    ctime_ns: i128,
}

impl FileIdentity {
    pub fn of(path: &Path) -> io::Result<FileIdentity> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(path)?;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Ok(FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: ns(m.mtime(), m.mtime_nsec()),
            ctime_ns: ns(m.ctime(), m.ctime_nsec()),
        })
    }
}

#[derive(Debug, Clone)]
pub struct SpoolDir {
    dir: PathBuf,
}

const TMP_PREFIX: &str = ".tmp-";
/// In `get/`: the timeline recovery follows (see `record_recovery_timeline`).
const TIMELINE_RECORD: &str = ".timeline";

impl SpoolDir {
    pub fn at(dir: PathBuf) -> Self {
        SpoolDir { dir }
    }

    /// `~/.local/state/pgvault/spool/<repo>-<stanza>` (or under `$XDG_STATE_HOME`).
    pub fn default_for(repo_identity: &str, stanza: &str) -> Option<Self> {
        Some(Self::under(
            &crate::home::state_dir()?.join("spool"),
            repo_identity,
            stanza,
        ))
    }

    /// One directory per repository and stanza below `base`: a record says
    /// "in this repository", never just "archived somewhere".
    pub fn under(base: &Path, repo_identity: &str, stanza: &str) -> Self {
        let id = hex::encode(&Sha256::digest(repo_identity.as_bytes())[..8]);
        SpoolDir::at(base.join(format!("{id}-{stanza}")))
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn sub(&self, what: &str) -> PathBuf {
        self.dir.join(what)
    }

    /// The record of a look-ahead push of `name`, if any.
    pub fn pushed(&self, name: &WalFileName) -> Option<PushRecord> {
        let text = fs::read_to_string(self.sub("pushed").join(name.as_str())).ok()?;
        let f: Vec<&str> = text.split_whitespace().collect();
        let digest = Digest256 {
            sha256: Sha256Sum::from_hex(f.first()?)?,
            size: f.get(1)?.parse().ok()?,
        };
        let identity = match f.get(2..6) {
            Some([dev, ino, mtime, ctime]) => Some(FileIdentity {
                dev: dev.parse().ok()?,
                ino: ino.parse().ok()?,
                size: digest.size,
                mtime_ns: mtime.parse().ok()?,
                ctime_ns: ctime.parse().ok()?,
            }),
            _ => None,
        };
        Some(PushRecord { digest, identity })
    }

    /// Records durably that `name` with `digest` is in the repository, and
    /// which file was read (when it did not change while it was read).
    pub fn record_pushed(
        &self,
        name: &WalFileName,
        digest: &Digest256,
        identity: Option<FileIdentity>,
    ) -> io::Result<()> {
        let dir = self.sub("pushed");
        let mut line = format!("{} {}", digest.sha256, digest.size);
        if let Some(id) = identity.filter(|id| id.size == digest.size) {
            line += &format!(" {} {} {} {}", id.dev, id.ino, id.mtime_ns, id.ctime_ns);
        }
        line.push('\n');
        write_durable(&dir, name.as_str(), line.as_bytes())
    }

    /// Drops push records of WAL files before `name`: PostgreSQL has asked
    /// for them already. Its archiver takes `.ready` files in name order,
    /// but timeline history files first (`pgarch.c`,
    /// `ready_file_comparator`): asking for one says nothing about the
    /// segments, so nothing is dropped then.
    pub fn forget_pushed_before(&self, name: &WalFileName) {
        let history = name.kind() == WalFileKind::History;
        sweep(&self.sub("pushed"), |f| !history && f < name.as_str());
    }

    /// Where a prefetched `name` is kept.
    pub fn prefetched(&self, name: &WalFileName) -> PathBuf {
        self.sub("get").join(name.as_str())
    }

    pub fn get_dir(&self) -> PathBuf {
        self.sub("get")
    }

    /// Notes that recovery fetched `tli`'s history file. PostgreSQL reads
    /// the history of its target timeline (with `latest`, probing upwards
    /// until one is missing), so the last one found is the timeline it
    /// recovers along; the prefetcher follows that history.
    pub fn record_recovery_timeline(&self, tli: TimelineId) -> io::Result<()> {
        write_durable(
            &self.get_dir(),
            TIMELINE_RECORD,
            format!("{}\n", tli.0).as_bytes(),
        )
    }

    /// The timeline of the last history file recovery fetched, if any.
    pub fn recovery_timeline(&self) -> Option<TimelineId> {
        let text = fs::read_to_string(self.get_dir().join(TIMELINE_RECORD)).ok()?;
        text.trim()
            .parse::<u32>()
            .ok()
            .filter(|&t| t > 0)
            .map(TimelineId)
    }

    /// Drops prefetched files PostgreSQL will not ask for any more, and
    /// stale temporaries. Recovery reads WAL in order: by segment, and in
    /// one segment an older timeline before a newer one (it moves to a new
    /// timeline at a switch point, never back: `xlogrecovery.c`). So once
    /// it asks for segment S of timeline T, every file before (S, T) in that
    /// order is done with — whatever the order of the names as text, in
    /// which any file of timeline 2 sorts after every file of timeline 1.
    /// A request for a history or backup history file says nothing about
    /// where recovery is (it reads history files whenever it looks for a
    /// newer timeline): nothing is dropped then.
    pub fn forget_prefetched_before(&self, name: &WalFileName) {
        let Some(asked) = recovery_position(name) else {
            sweep(&self.sub("get"), |_| false);
            return;
        };
        sweep(&self.sub("get"), |f| {
            WalFileName::parse(f)
                .ok()
                .as_ref()
                .and_then(recovery_position)
                .is_some_and(|p| p < asked)
        });
    }

    /// Names with a look-ahead push record (waiting for PostgreSQL's call),
    /// from one listing.
    pub fn pushed_names(&self) -> std::collections::BTreeSet<String> {
        fs::read_dir(self.sub("pushed"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The look-ahead pusher's lock: `Some` (held until dropped) when no
    /// other process holds it.
    pub fn try_lock_pusher(&self) -> io::Result<Option<File>> {
        try_lock(&self.sub("pushing"))
    }

    /// The prefetcher's lock, likewise.
    pub fn try_lock_prefetcher(&self) -> io::Result<Option<File>> {
        try_lock(&self.get_dir())
    }

    /// Is a look-ahead pusher running for this spool? Asking creates
    /// nothing: a spool that does not exist has none (and a misspelled
    /// stanza leaves no spool behind).
    pub fn pusher_running(&self) -> bool {
        self.sub("pushing").is_dir() && matches!(self.try_lock_pusher(), Ok(None))
    }

    /// Marks `name` as being pushed by the look-ahead pusher (which holds
    /// the lock): PostgreSQL's call for it waits for the record instead of
    /// pushing the same file again.
    pub fn mark_pushing(&self, name: &WalFileName) -> io::Result<()> {
        let dir = self.sub("pushing");
        fs::create_dir_all(&dir).map_err(at("create", &dir))?;
        let path = dir.join(name.as_str());
        File::create(&path).map(drop).map_err(at("create", &path))
    }

    pub fn unmark_pushing(&self, name: &WalFileName) {
        let _ = fs::remove_file(self.sub("pushing").join(name.as_str()));
    }

    pub fn is_marked_pushing(&self, name: &WalFileName) -> bool {
        self.sub("pushing").join(name.as_str()).exists()
    }

    /// Drops every marker (a new pusher, holding the lock: any marker left
    /// is a dead pusher's).
    pub fn clear_pushing_marks(&self) {
        sweep(&self.sub("pushing"), |_| true);
    }
}

/// Where a segment (or `.partial` file) lies in the order recovery reads
/// WAL: its segment (the log and segment parts of the name, fixed-width
/// upper-case hex, so they compare as text like the numbers they are), then
/// its timeline. `None` for other files.
fn recovery_position(name: &WalFileName) -> Option<(String, TimelineId)> {
    if !name.is_wal_data() {
        return None;
    }
    let segment = name.segment_name()?.get(8..)?.to_string();
    Some((segment, name.timeline()))
}

/// `flock(LOCK_EX | LOCK_NB)` on `<dir>/.lock`: `Some(file)` holds the lock
/// until the file is dropped (or the process dies); `None`: another process
/// holds it.
fn try_lock(dir: &Path) -> io::Result<Option<File>> {
    fs::create_dir_all(dir).map_err(at("create", dir))?;
    let path = dir.join(".lock");
    let lock = File::create(&path).map_err(at("create", &path))?;
    // SAFETY: flock on a file descriptor we own.
    let r = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&lock),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    };
    if r == 0 {
        Ok(Some(lock))
    } else {
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => Ok(None),
            _ => Err(at("lock", &path)(e)),
        }
    }
}

fn sweep(dir: &Path, old: impl Fn(&str) -> bool) {
    let Ok(rd) = fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let Some(n) = e.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let tmp = n.starts_with(TMP_PREFIX) || n.ends_with(".pgvault-tmp");
        let stale_tmp = tmp
            && e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|a| a.as_secs() > 600));
        // Dot files (the lock, the timeline record) are not WAL.
        if stale_tmp || (!tmp && !n.starts_with('.') && old(&n)) {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// tmp + fsync + rename + fsync(dir).
pub fn write_durable(dir: &Path, name: &str, data: &[u8]) -> io::Result<()> {
    fs::create_dir_all(dir).map_err(at("create", dir))?;
    let tmp = dir.join(format!("{TMP_PREFIX}{name}-{}", std::process::id()));
    let written = File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(data)?;
            f.sync_all()
        })
        .map_err(at("write", &tmp));
    if let Err(e) = written {
        // Not left to the sweep: on a full disk every byte counts.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fs::rename(&tmp, dir.join(name)).map_err(at("rename into", &dir.join(name)))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(at("fsync", dir))
}

/// Puts what was done, and to which path, in an I/O error, keeping its kind
/// (which `error::io_hint` reads).
fn at<'a>(what: &'a str, path: &'a Path) -> impl FnOnce(io::Error) -> io::Error + 'a {
    move |e| io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_records_roundtrip_and_sweep() {
        let d = tempfile::tempdir().unwrap();
        let s = SpoolDir::at(d.path().to_path_buf());
        let a = WalFileName::parse("000000010000000000000003").unwrap();
        let b = WalFileName::parse("000000010000000000000004").unwrap();
        let dg = Digest256 {
            size: 16,
            sha256: Sha256Sum([7; 32]),
        };
        assert_eq!(s.pushed(&a), None);
        let f = d.path().join("file");
        fs::write(&f, [0u8; 16]).unwrap();
        let id = FileIdentity::of(&f).unwrap();
        s.record_pushed(&a, &dg, Some(id)).unwrap();
        s.record_pushed(&b, &dg, None).unwrap();
        let rec = |digest, identity| Some(PushRecord { digest, identity });
        assert_eq!(s.pushed(&a), rec(dg, Some(id)));
        s.forget_pushed_before(&b);
        assert_eq!(s.pushed(&a), None);
        assert_eq!(s.pushed(&b), rec(dg, None));
        // The archiver takes history files before segments: asking for
        // one drops no record of a segment it has not taken yet.
        s.forget_pushed_before(&WalFileName::parse("00000002.history").unwrap());
        assert_eq!(s.pushed(&b), rec(dg, None));
        // A write changes the identity, even with the same bytes.
        std::thread::sleep(std::time::Duration::from_millis(10));
        fs::write(&f, [0u8; 16]).unwrap();
        assert_ne!(FileIdentity::of(&f).unwrap(), id);
    }

    /// Recovery along timeline 2, which branched from timeline 1 in segment
    /// 5: prefetched files before the asked-for segment go whatever their
    /// timeline (as text, `00000003…` sorts after every `00000002…` name and
    /// was never swept); the asked-for segment's newer timelines and later
    /// segments stay; history files and asking for one change nothing.
    #[test]
    fn prefetch_sweep_follows_recovery_order_across_timelines() {
        let d = tempfile::tempdir().unwrap();
        let s = SpoolDir::at(d.path().to_path_buf());
        let files = [
            "000000010000000000000003",
            "000000010000000000000005",
            "000000010000000000000007",
            "000000020000000000000004",
            "000000020000000000000005",
            "000000020000000000000006",
            "000000030000000000000004",
            "000000030000000000000005",
            "000000010000000100000001",
            "00000003.history",
        ];
        fs::create_dir_all(s.get_dir()).unwrap();
        for f in files {
            fs::write(s.get_dir().join(f), b"x").unwrap();
        }
        let left = || -> Vec<String> {
            let mut v: Vec<String> = fs::read_dir(s.get_dir())
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            v.sort();
            v
        };
        s.forget_prefetched_before(&WalFileName::parse("00000003.history").unwrap());
        assert_eq!(
            left().len(),
            files.len(),
            "a history request sweeps nothing"
        );

        s.forget_prefetched_before(&WalFileName::parse("000000020000000000000005").unwrap());
        assert_eq!(
            left(),
            [
                "000000010000000000000007",
                "000000010000000100000001",
                "000000020000000000000005",
                "000000020000000000000006",
                "00000003.history",
                "000000030000000000000005",
            ]
        );
        // Segment 0x100000001 comes after 0x07 (log 1), on any timeline.
        s.forget_prefetched_before(&WalFileName::parse("000000030000000100000000").unwrap());
        assert_eq!(left(), ["000000010000000100000001", "00000003.history"]);
    }
}
