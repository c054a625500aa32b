//! The archive-push queue of one repository, in its spool.
//!
//! With several repositories PostgreSQL is told a file is archived once
//! `archive-push-quorum` of them hold it durably. For each of the others
//! the file is first copied here, durably — PostgreSQL recycles the file
//! once told — and a detached pusher sends it when the repository answers
//! again. While a repository's queue is not empty, every new file goes to
//! the end of it, so the repository receives its WAL in order.
//!
//! * `queue/<wal>`: a queued file: a full copy, or a hard link to another
//!   repository's copy (the bytes are stored once). Never a link into
//!   `pg_wal`: PostgreSQL recycles a segment by renaming it and writing
//!   over it.
//! * `queue/.lock`: held while the queue changes (enqueue, drop, sent).
//! * `queue/.sending`: the file the pusher sends now; a drop skips it.
//! * `queue-pusher/.lock`: held by the one pusher of this queue.
//! * `gaps/pending/<wal>`: a file dropped from the queue (past
//!   `archive-push-queue-max`, or refused by the repository), recorded
//!   *before* it left the queue; its marker object is not in the
//!   repository yet (the pusher writes it first thing when the repository
//!   answers). `gaps/recorded/<wal>`: the marker is there. Nothing leaves
//!   the queue without one of these: a gap is never silent.
//!
//! Order: PostgreSQL's archiver's (`pgarch.c`, `ready_file_comparator`):
//! timeline history files first, then by name. The pusher sends in this
//! order, and the cap drops the oldest segments first. History files are
//! never dropped: a few hundred bytes each, and a timeline's WAL is
//! archived only after its history file.
//!
//! Everything here is plain files, so that `info`, `check` and the metrics
//! read a queue's state ([`Queue::state`]) without any process running.

use std::cmp::Ordering;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{at, lock_file, sweep, write_durable, TMP_PREFIX};
use crate::pg::{WalFileKind, WalFileName};

/// Why a file left a queue unsent, past the cap.
pub const QUEUE_MAX_REASON: &str = "archive-push-queue-max";

const LOCK: &str = ".lock";
const SENDING: &str = ".sending";

/// One repository's queue (see the module doc).
#[derive(Debug, Clone)]
pub struct Queue {
    dir: PathBuf,
    pusher: PathBuf,
    gaps: PathBuf,
}

/// A queued file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    pub name: WalFileName,
    pub path: PathBuf,
    pub size: u64,
}

/// A file that left a queue without reaching its repository: a gap in
/// that repository's archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dropped {
    pub name: String,
    pub size: u64,
    /// When, RFC 3339 UTC.
    pub dropped_at: String,
    /// Why: `archive-push-queue-max`, or why the repository refused it.
    pub reason: String,
}

/// What [`Queue::enqueue`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Enqueued {
    /// Where the file now waits; `None` when the cap dropped the file
    /// itself (it is in `dropped`).
    pub queued: Option<PathBuf>,
    /// Files dropped to stay under the cap, oldest first.
    pub dropped: Vec<Dropped>,
}

/// A queue as its files show it, for `info`, `check` and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct QueueState {
    pub files: u64,
    pub bytes: u64,
    /// The first and last file in catch-up order.
    pub oldest: Option<String>,
    pub newest: Option<String>,
    /// Dropped, and no marker in the repository yet.
    pub dropped_pending: Vec<Dropped>,
    /// Dropped, and marked in the repository.
    pub dropped_recorded: Vec<Dropped>,
    pub pusher_running: bool,
}

/// PostgreSQL's archiver's order: history files first, then by name.
fn catch_up_order(a: &WalFileName, b: &WalFileName) -> Ordering {
    let history = |n: &WalFileName| n.kind() != WalFileKind::History;
    (history(a), a.as_str()).cmp(&(history(b), b.as_str()))
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

impl Queue {
    pub(super) fn new(dir: PathBuf, gaps: PathBuf) -> Queue {
        let pusher = dir.with_file_name(format!(
            "{}-pusher",
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        Queue { dir, pusher, gaps }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The queued files, in catch-up order.
    pub fn entries(&self) -> Vec<Queued> {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<Queued> = rd
            .flatten()
            .filter_map(|e| {
                let n = e.file_name().into_string().ok()?;
                let name = WalFileName::parse(&n).ok()?;
                let size = e.metadata().ok()?.len();
                Some(Queued {
                    name,
                    path: e.path(),
                    size,
                })
            })
            .collect();
        out.sort_by(|a, b| catch_up_order(&a.name, &b.name));
        out
    }

    /// Nothing queued: the repository holds everything PostgreSQL was told
    /// is archived (as far as this host knows).
    pub fn is_empty(&self) -> bool {
        self.next().is_none()
    }

    /// The file to send first.
    pub fn next(&self) -> Option<Queued> {
        self.entries().into_iter().next()
    }

    /// Queues `name` (read from `src`), durably: a copy (or, with `link`,
    /// a hard link when `src` is another queue's copy) fsynced, renamed
    /// into place, its directory fsynced — only then may PostgreSQL be
    /// told. With `cap`, the oldest queued segments (never history files,
    /// never the one being sent) are dropped first until this file fits,
    /// each recorded as a gap before it goes; when it cannot fit, this file
    /// is dropped (and recorded) instead. Blocking.
    pub fn enqueue(
        &self,
        name: &WalFileName,
        src: &Path,
        link: bool,
        cap: Option<u64>,
    ) -> io::Result<Enqueued> {
        let _lock = lock_file(&self.dir.join(LOCK), true)?;
        sweep(&self.dir, |_| false);
        let entries = self.entries();
        let dest = self.dir.join(name.as_str());
        if entries.iter().any(|q| &q.name == name) {
            // Queued already: PostgreSQL called again for the same file.
            return Ok(Enqueued {
                queued: Some(dest),
                dropped: Vec::new(),
            });
        }
        let size = fs::metadata(src).map_err(at("read", src))?.len();
        let mut out = Enqueued::default();
        if let Some(cap) = cap {
            let sending = self.sending();
            let mut total: u64 = entries.iter().map(|q| q.size).sum();
            let droppable: Vec<&Queued> = entries
                .iter()
                .filter(|q| {
                    q.name.kind() != WalFileKind::History
                        && Some(q.name.as_str()) != sending.as_deref()
                })
                .collect();
            // What stays whatever is dropped: when even that leaves no
            // room, this file goes, and nothing queued goes for nothing.
            let stays = total - droppable.iter().map(|q| q.size).sum::<u64>();
            if stays.saturating_add(size) > cap && name.kind() != WalFileKind::History {
                let d = self.record_gap(name.as_str(), size, QUEUE_MAX_REASON.to_string())?;
                out.dropped.push(d);
                return Ok(out);
            }
            for q in droppable {
                if total.saturating_add(size) <= cap {
                    break;
                }
                out.dropped
                    .push(self.drop_entry(q, QUEUE_MAX_REASON.to_string())?);
                total -= q.size;
            }
        }
        if link {
            link_durable(src, &self.dir, name.as_str())?;
        } else {
            copy_durable(src, &self.dir, name.as_str())?;
        }
        out.queued = Some(dest);
        Ok(out)
    }

    /// Records that `q` is being sent (so that a drop leaves it), if it is
    /// still queued. Blocking.
    pub fn start_sending(&self, q: &Queued) -> io::Result<bool> {
        let _lock = lock_file(&self.dir.join(LOCK), true)?;
        if !q.path.exists() {
            return Ok(false);
        }
        write_durable(&self.dir, SENDING, q.name.as_str().as_bytes())?;
        Ok(true)
    }

    /// `q` is durably in the repository: it leaves the queue. Blocking.
    pub fn sent(&self, q: &Queued) -> io::Result<()> {
        let _lock = lock_file(&self.dir.join(LOCK), true)?;
        self.remove(q)
    }

    /// The repository refuses `q` for good (a conflict, WAL of another
    /// cluster): it leaves the queue, recorded as a gap. Blocking.
    pub fn refused(&self, q: &Queued, reason: &str) -> io::Result<Dropped> {
        let _lock = lock_file(&self.dir.join(LOCK), true)?;
        let d = self.record_gap(q.name.as_str(), q.size, reason.to_string())?;
        self.remove(q)?;
        Ok(d)
    }

    /// Records as a gap a file that could not be queued at all (the
    /// spool's disk is full): PostgreSQL may be told once the record is
    /// durable. Blocking.
    pub fn record_unqueued(&self, name: &str, size: u64, reason: String) -> io::Result<Dropped> {
        self.record_gap(name, size, reason)
    }

    fn remove(&self, q: &Queued) -> io::Result<()> {
        match fs::remove_file(&q.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(at("remove", &q.path)(e)),
        }
        let _ = fs::remove_file(self.dir.join(SENDING));
        Ok(())
    }

    /// Records `q` as dropped, then removes it (the record first: a crash
    /// in between leaves a record of a file still queued, never a file
    /// gone unrecorded).
    fn drop_entry(&self, q: &Queued, reason: String) -> io::Result<Dropped> {
        let d = self.record_gap(q.name.as_str(), q.size, reason)?;
        fs::remove_file(&q.path).map_err(at("remove", &q.path))?;
        Ok(d)
    }

    fn record_gap(&self, name: &str, size: u64, reason: String) -> io::Result<Dropped> {
        let d = Dropped {
            name: name.to_string(),
            size,
            dropped_at: now(),
            reason,
        };
        let mut line = serde_json::to_vec(&d).map_err(io::Error::other)?;
        line.push(b'\n');
        write_durable(&self.gaps.join("pending"), name, &line)?;
        Ok(d)
    }

    /// The file the running pusher is sending, if one runs.
    fn sending(&self) -> Option<String> {
        if !self.pusher_running() {
            return None;
        }
        fs::read_to_string(self.dir.join(SENDING))
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// Dropped files whose marker is not in the repository yet, oldest
    /// first.
    pub fn pending_gaps(&self) -> Vec<Dropped> {
        read_gaps(&self.gaps.join("pending"))
    }

    /// The marker of dropped `name` is in the repository now.
    pub fn gap_marked(&self, name: &str) -> io::Result<()> {
        let from = self.gaps.join("pending").join(name);
        let to_dir = self.gaps.join("recorded");
        fs::create_dir_all(&to_dir).map_err(at("create", &to_dir))?;
        fs::rename(&from, to_dir.join(name)).map_err(at("rename", &from))?;
        File::open(&to_dir)
            .and_then(|d| d.sync_all())
            .map_err(at("fsync", &to_dir))
    }

    /// What the files say now.
    pub fn state(&self) -> QueueState {
        let entries = self.entries();
        QueueState {
            files: entries.len() as u64,
            bytes: entries.iter().map(|q| q.size).sum(),
            oldest: entries.first().map(|q| q.name.as_str().to_string()),
            newest: entries.last().map(|q| q.name.as_str().to_string()),
            dropped_pending: self.pending_gaps(),
            dropped_recorded: read_gaps(&self.gaps.join("recorded")),
            pusher_running: self.pusher_running(),
        }
    }

    /// The pusher's lock: `Some` (held until dropped) when no other process
    /// holds it.
    pub fn try_lock_pusher(&self) -> io::Result<Option<File>> {
        lock_file(&self.pusher.join(LOCK), false)
    }

    /// Is a pusher sending this queue? Asking creates nothing.
    pub fn pusher_running(&self) -> bool {
        self.pusher.is_dir() && matches!(self.try_lock_pusher(), Ok(None))
    }

    /// A new pusher (holding the lock): what a dead one was sending is
    /// just queued.
    pub fn clear_sending(&self) {
        let _ = fs::remove_file(self.dir.join(SENDING));
    }
}

fn read_gaps(dir: &Path) -> Vec<Dropped> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<Dropped> = rd
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| serde_json::from_slice(&fs::read(e.path()).ok()?).ok())
        .collect();
    out.sort_by(|a: &Dropped, b: &Dropped| {
        match (WalFileName::parse(&a.name), WalFileName::parse(&b.name)) {
            (Ok(x), Ok(y)) => catch_up_order(&x, &y),
            _ => a.name.cmp(&b.name),
        }
    });
    out
}

/// Copies `src` to `dir/name`: a temporary copy, fsynced, renamed, the
/// directory fsynced.
fn copy_durable(src: &Path, dir: &Path, name: &str) -> io::Result<()> {
    fs::create_dir_all(dir).map_err(at("create", dir))?;
    let tmp = dir.join(format!("{TMP_PREFIX}{name}-{}", std::process::id()));
    let copied = fs::copy(src, &tmp)
        .map_err(at("copy into", &tmp))
        .and_then(|_| {
            File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(at("fsync", &tmp))
        });
    if let Err(e) = copied {
        // Not left to the sweep: on a full disk every byte counts.
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    let dest = dir.join(name);
    fs::rename(&tmp, &dest).map_err(at("rename into", &dest))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(at("fsync", dir))
}

/// Links `src` (another queue's durable copy) as `dir/name`, the directory
/// fsynced; copies when a link cannot be made (another file system).
fn link_durable(src: &Path, dir: &Path, name: &str) -> io::Result<()> {
    fs::create_dir_all(dir).map_err(at("create", dir))?;
    let dest = dir.join(name);
    match fs::hard_link(src, &dest) {
        Ok(()) => File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(at("fsync", dir)),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(_) => copy_durable(src, dir, name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::SpoolDir;

    fn name(s: &str) -> WalFileName {
        WalFileName::parse(s).unwrap()
    }

    /// A "WAL file" of `size` bytes in `dir`.
    fn wal(dir: &Path, n: &str, size: usize) -> PathBuf {
        let p = dir.join(n);
        fs::write(&p, vec![n.as_bytes()[23 % n.len()]; size]).unwrap();
        p
    }

    fn names(q: &Queue) -> Vec<String> {
        q.entries()
            .into_iter()
            .map(|e| e.name.as_str().to_string())
            .collect()
    }

    /// A queued file is a complete copy under its final name once enqueue
    /// returns, and stays whatever happens to the original (PostgreSQL
    /// recycles it by renaming it and writing over it).
    #[test]
    fn enqueue_is_a_durable_copy() {
        let d = tempfile::tempdir().unwrap();
        let pg_wal = d.path().join("pg_wal");
        fs::create_dir_all(&pg_wal).unwrap();
        let q = SpoolDir::at(d.path().join("spool")).queue();
        assert!(q.is_empty());
        let n = name("000000010000000000000003");
        let src = wal(&pg_wal, n.as_str(), 4096);
        let e = q.enqueue(&n, &src, false, None).unwrap();
        let at = e.queued.clone().unwrap();
        assert!(e.dropped.is_empty());
        assert_eq!(fs::read(&at).unwrap(), fs::read(&src).unwrap());
        // Recycled: renamed away and written over in place.
        fs::rename(&src, pg_wal.join("000000010000000000000009")).unwrap();
        fs::write(pg_wal.join("000000010000000000000009"), vec![0u8; 4096]).unwrap();
        assert_eq!(
            fs::read(&at).unwrap(),
            vec![n.as_str().as_bytes()[23]; 4096]
        );
        assert_eq!(
            fs::metadata(&at).unwrap().len(),
            4096,
            "no temporary left in its place"
        );
        let left: Vec<_> = fs::read_dir(q.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| !n.starts_with('.'))
            .collect();
        assert_eq!(left, [n.as_str()]);
        // The same file again: still queued once.
        let src = wal(&pg_wal, n.as_str(), 4096);
        assert_eq!(q.enqueue(&n, &src, false, None).unwrap().queued, Some(at));
        assert_eq!(q.entries().len(), 1);
    }

    /// Another repository's queue links the first copy: the bytes once.
    #[test]
    fn a_second_queue_links_the_first_copy() {
        use std::os::unix::fs::MetadataExt;
        let d = tempfile::tempdir().unwrap();
        let q1 = SpoolDir::at(d.path().join("s1")).queue();
        let q2 = SpoolDir::at(d.path().join("s2")).queue();
        let n = name("000000010000000000000003");
        let src = wal(d.path(), n.as_str(), 100);
        let first = q1.enqueue(&n, &src, false, None).unwrap().queued.unwrap();
        let second = q2.enqueue(&n, &first, true, None).unwrap().queued.unwrap();
        assert_eq!(
            fs::metadata(&first).unwrap().ino(),
            fs::metadata(&second).unwrap().ino()
        );
        // Sent to repository 1: repository 2's copy stays.
        q1.sent(&q1.next().unwrap()).unwrap();
        assert!(q1.is_empty());
        assert_eq!(fs::read(&second).unwrap(), fs::read(&src).unwrap());
    }

    /// Catch-up sends in the archiver's order: history files first, then
    /// by name, whatever order they were queued in.
    #[test]
    fn catch_up_order_is_the_archivers() {
        let d = tempfile::tempdir().unwrap();
        let q = SpoolDir::at(d.path().join("spool")).queue();
        for n in [
            "000000010000000000000005",
            "000000020000000000000006",
            "00000002.history",
            "000000010000000000000004",
            "000000010000000000000005.partial",
            "000000010000000000000004.00000028.backup",
        ] {
            let src = wal(d.path(), n, 10);
            q.enqueue(&name(n), &src, false, None).unwrap();
        }
        assert_eq!(
            names(&q),
            [
                "00000002.history",
                "000000010000000000000004",
                "000000010000000000000004.00000028.backup",
                "000000010000000000000005",
                "000000010000000000000005.partial",
                "000000020000000000000006",
            ]
        );
        let first = q.next().unwrap();
        assert!(q.start_sending(&first).unwrap());
        q.sent(&first).unwrap();
        assert_eq!(q.next().unwrap().name.as_str(), "000000010000000000000004");
    }

    /// Past the cap the oldest segments go first, each recorded as a gap
    /// before it leaves; history files stay; a file larger than the cap
    /// is dropped itself — and recorded.
    #[test]
    fn past_the_cap_the_oldest_go_and_each_gap_is_recorded() {
        let d = tempfile::tempdir().unwrap();
        let q = SpoolDir::at(d.path().join("spool")).queue();
        let cap = Some(300);
        let push = |n: &str, size: usize| {
            let src = wal(d.path(), n, size);
            q.enqueue(&name(n), &src, false, cap).unwrap()
        };
        assert!(push("00000002.history", 50).dropped.is_empty());
        assert!(push("000000010000000000000001", 100).dropped.is_empty());
        assert!(push("000000010000000000000002", 100).dropped.is_empty());
        // 250 queued; 100 more needs 50 freed: the oldest segment goes.
        let e = push("000000010000000000000003", 100);
        let dropped: Vec<&str> = e.dropped.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(dropped, ["000000010000000000000001"]);
        assert_eq!(e.dropped[0].reason, QUEUE_MAX_REASON);
        assert_eq!(e.dropped[0].size, 100);
        assert!(e.queued.is_some());
        assert_eq!(
            names(&q),
            [
                "00000002.history",
                "000000010000000000000002",
                "000000010000000000000003"
            ]
        );
        // Larger than the cap: it goes itself, and nothing queued goes
        // for nothing.
        let e = push("000000010000000000000004", 400);
        assert_eq!(e.queued, None);
        let dropped: Vec<&str> = e.dropped.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(dropped, ["000000010000000000000004"]);
        assert_eq!(names(&q).len(), 3);
        // Every drop is on record, pending its marker in the repository.
        let pending: Vec<String> = q.pending_gaps().into_iter().map(|d| d.name).collect();
        assert!(pending.contains(&"000000010000000000000001".to_string()));
        assert!(pending.contains(&"000000010000000000000004".to_string()));
        let st = q.state();
        assert_eq!(st.dropped_pending.len(), pending.len());
        assert!(names(&q).contains(&"00000002.history".to_string()));
        q.gap_marked("000000010000000000000001").unwrap();
        let st = q.state();
        assert_eq!(st.dropped_recorded.len(), 1);
        assert_eq!(st.dropped_recorded[0].name, "000000010000000000000001");
        assert_eq!(st.dropped_pending.len(), pending.len() - 1);
    }

    /// The file the pusher is sending is not dropped under it.
    #[test]
    fn the_file_being_sent_is_not_dropped() {
        let d = tempfile::tempdir().unwrap();
        let q = SpoolDir::at(d.path().join("spool")).queue();
        let push = |n: &str, cap| {
            let src = wal(d.path(), n, 100);
            q.enqueue(&name(n), &src, false, cap).unwrap()
        };
        push("000000010000000000000001", None);
        push("000000010000000000000002", None);
        let _pusher = q.try_lock_pusher().unwrap().unwrap();
        let first = q.next().unwrap();
        assert!(q.start_sending(&first).unwrap());
        let e = push("000000010000000000000003", Some(200));
        let dropped: Vec<&str> = e.dropped.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(dropped, ["000000010000000000000002"]);
        q.sent(&first).unwrap();
        assert_eq!(names(&q), ["000000010000000000000003"]);
    }

    /// A file the repository refuses for good leaves the queue as a
    /// recorded gap, never silently.
    #[test]
    fn a_refused_file_is_a_recorded_gap() {
        let d = tempfile::tempdir().unwrap();
        let q = SpoolDir::at(d.path().join("spool")).queue();
        let n = name("000000010000000000000007");
        let src = wal(d.path(), n.as_str(), 10);
        q.enqueue(&n, &src, false, None).unwrap();
        let first = q.next().unwrap();
        let d = q.refused(&first, "a different file is archived").unwrap();
        assert!(q.is_empty());
        assert_eq!(q.pending_gaps(), [d]);
    }
}
