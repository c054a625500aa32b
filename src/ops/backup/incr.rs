//! Differential and incremental backups: which backup to build on, what
//! changed since it, and what to store of each file.
//!
//! The change set is the union of the block references `archive-push` kept
//! for every WAL segment from the reference backup's start LSN to this
//! backup's, along the current timeline's history (`pg::blockref`,
//! `pg::walscan::RangeUnion`). Blocks changed after this backup's start need
//! no care: replay from its start redoes them (full-page writes are forced
//! during a backup). Whatever the WAL cannot answer with certainty falls
//! back to copying the file whole, and the backup's report names why:
//! - a segment of the range not archived, or archived without block
//!   references (an older pgvault; `pgvault backfill` writes them), or
//!   damaged: every relation file is copied whole;
//! - a record that touches relation storage in a way pgvault does not know
//!   (a *doubt*): the files of its scope;
//! - a file smaller than the reference's with no truncation in the range.
//!
//! Non-relation files are always copied whole; new relation files too, and
//! those created, dropped, truncated to nothing or whose database or
//! tablespace directory was created or copied (as PostgreSQL 17's
//! basebackup_incremental.c does). The free space map is not WAL-logged
//! (freespace.c) and is copied whole.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;

use crate::error::{Error, Kind, Result};
use crate::ops::backups;
use crate::ops::progress::Progress;
use crate::pg::blockref::{self, ForkState, RelFileLocator, RelFork, UnionResult, Whole};
use crate::pg::history::TimelineHistory;
use crate::pg::relfile::{RelFile, BLOCK_SIZE, RELSEG_SIZE};
use crate::pg::walscan::RangeUnion;
use crate::pg::{Lsn, TimelineId, WalFileName};
use crate::repo::archive::BlockRefsRead;
use crate::repo::blockmap::{self, Part, Ranges};
use crate::repo::blocksums::{BlockSum, BlockSums};
use crate::repo::manifest::{ChangeReport, FileEntry, Manifest, ManifestRead};
use crate::repo::{DbInfo, Fetched, Repository};

/// Memory for the union of block references before it spills to disk.
const UNION_BUDGET: usize = 32 << 20;

/// `--type`: pgBackRest's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackupKind {
    Full,
    /// Relative to the newest full backup.
    Diff,
    /// Relative to the newest backup of any type.
    #[default]
    Incr,
}

impl BackupKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackupKind::Full => "full",
            BackupKind::Diff => "diff",
            BackupKind::Incr => "incr",
        }
    }

    /// The label's last letter.
    pub(super) fn suffix(self) -> char {
        match self {
            BackupKind::Full => 'F',
            BackupKind::Diff => 'D',
            BackupKind::Incr => 'I',
        }
    }
}

/// The history of timeline `tli` as recovery follows it; `None` when the
/// archive has no history file for it.
pub(super) async fn history_of(
    repo: &Repository,
    db: &DbInfo,
    tli: TimelineId,
) -> Result<Option<TimelineHistory>> {
    if tli == TimelineId::FIRST {
        return Ok(Some(TimelineHistory::root(tli)));
    }
    repo.archive(db).history(tli).await
}

/// The backup a `diff` or `incr` builds on: the newest usable one (of this
/// cluster, on the current timeline's path, every backup it depends on
/// still there). `None`, said on `progress`, when there is none: the
/// backup becomes a full one.
pub(super) async fn choose_reference(
    repo: &Repository,
    catalog: Option<&crate::catalog::Catalog>,
    db: &DbInfo,
    kind: BackupKind,
    history: Option<&TimelineHistory>,
    progress: &dyn Progress,
) -> Result<Option<Manifest>> {
    if kind == BackupKind::Full {
        return Ok(None);
    }
    let full = |why: String| {
        progress.message(&format!(
            "{} backup requested, but {why}: taking a full backup",
            kind.as_str()
        ));
        Ok(None)
    };
    let Some(history) = history else {
        return full("the current timeline has no history file in the archive".into());
    };
    let index = backups::index(repo, catalog).await?;
    let present: std::collections::HashSet<&str> =
        index.headers.iter().map(|h| h.label.as_str()).collect();
    let usable = index.headers.iter().rev().find(|h| {
        h.db_id == db.id
            && h.system_identifier == db.system_identifier
            && (kind == BackupKind::Incr || h.backup_type == "full")
            && history.holds(h.timeline, h.start_lsn, h.stop_lsn)
            && h.depends_on.iter().all(|l| present.contains(l.as_str()))
    });
    let Some(h) = usable else {
        let what = match kind {
            BackupKind::Diff => "full backup",
            _ => "backup",
        };
        return full(format!(
            "the stanza has no usable {what} of this cluster on timeline {}'s path",
            history.timeline
        ));
    };
    match repo.read_manifest(&h.label).await? {
        Some(ManifestRead::Found(m)) => Ok(Some(*m)),
        Some(ManifestRead::Unreadable(u)) => full(format!(
            "the manifest of backup {} cannot be read ({})",
            u.label, u.error
        )),
        None => full(format!("backup {} has just gone", h.label)),
    }
}

/// What an incremental or differential backup compares against. The
/// reference's files are not here: backup joins them with its walk of the
/// data directory on disk (`catalog::scratch`) and hands each file's
/// counterpart to [`Plan::decide`].
pub(super) struct Plan {
    pub reference: Manifest,
    /// `None`: the WAL cannot answer (see `report.fallbacks`), every
    /// relation file is copied whole.
    changes: Option<UnionResult>,
    /// The reference's block sums; `None` for a reference written before
    /// pgvault kept them (or whose sums are damaged: said in the report).
    sums: Option<BlockSums>,
    pub report: ChangeReport,
}

/// Reads the block references of the segments from the reference's start
/// to `start_lsn` along `history` and unions them.
pub(super) async fn plan(
    repo: &Repository,
    db: &DbInfo,
    history: &TimelineHistory,
    reference: Manifest,
    start_lsn: Lsn,
    progress: &dyn Progress,
) -> Result<Plan> {
    let mut report = ChangeReport {
        method: "wal".into(),
        ..ChangeReport::default()
    };
    let changes = match union_range(repo, db, history, &reference, start_lsn, &mut report).await? {
        Ok(u) => Some(u),
        Err(why) => {
            report.method = "whole-files".into();
            report.fallbacks.push(why);
            None
        }
    };
    if let Some(u) = &changes {
        for d in u.small_sections().doubts() {
            report.fallbacks.push(format!(
                "WAL record at {} not understood ({}): the files it may touch ({:?}) are copied whole",
                d.lsn, d.why, d.scope
            ));
        }
    }
    let sums = match repo.read_block_sums(&reference.label).await? {
        Fetched::Found(s) => Some(s),
        Fetched::Missing => {
            report.fallbacks.push(format!(
                "the reference backup {} has no block sums (written by an older pgvault): files the WAL cannot answer for are compared whole, and files stored as changed blocks get no sums in this backup",
                reference.label
            ));
            None
        }
        Fetched::Damaged(why) => {
            report.fallbacks.push(format!(
                "the block sums of the reference backup {} cannot be read ({why}): files the WAL cannot answer for are compared whole",
                reference.label
            ));
            None
        }
    };
    for f in &report.fallbacks {
        progress.message(&format!("falling back to whole files: {f}"));
    }
    Ok(Plan {
        reference,
        changes,
        sums,
        report,
    })
}

/// The union, or why the WAL cannot give it.
async fn union_range(
    repo: &Repository,
    db: &DbInfo,
    history: &TimelineHistory,
    reference: &Manifest,
    start_lsn: Lsn,
    report: &mut ChangeReport,
) -> Result<std::result::Result<UnionResult, String>> {
    let seg = db.wal_segment_size;
    let archive = repo.archive(db);
    let listing = archive.list().await?;
    let (first, last) = (reference.start_lsn.segno(seg), start_lsn.segno(seg));
    let path: Vec<WalFileName> = listing
        .replay_path(history, first, seg)
        .into_iter()
        .take_while(|n| n.segno(seg).is_some_and(|s| s <= last))
        .collect();
    let reached = path.last().and_then(|n| n.segno(seg));
    if reached != Some(last) {
        let next = reached.map_or(first, |s| s.next());
        let tli = history.timeline_at(Lsn(next.0 * u64::from(seg)));
        return Ok(Err(format!(
            "WAL segment {} (between the reference backup {}'s start and this backup's) is not in the archive",
            WalFileName::for_segment(tli, next, seg),
            reference.label
        )));
    }
    let spill = tempfile::tempdir()
        .map_err(|e| Error::io_in(Kind::Internal, "create a temporary directory", &e))?;
    let mut union = RangeUnion::new(UNION_BUDGET, spill.path());
    for name in &path {
        let Some(sha) = listing.answer(name) else {
            return Ok(Err(format!(
                "WAL segment {name} has no answer in the archive"
            )));
        };
        let refs = match archive.read_blockrefs(name, &sha).await? {
            BlockRefsRead::Found(r) => r,
            BlockRefsRead::Missing => {
                return Ok(Err(format!(
                    "WAL segment {name} has no block references in the repository ({}); `pgvault backfill` writes them",
                    archive.describe_blockrefs(name, &sha)
                )))
            }
            BlockRefsRead::Damaged(why) => {
                return Ok(Err(format!(
                    "the block references of WAL segment {name} are damaged: {why}"
                )))
            }
        };
        report.segments += 1;
        union = tokio::task::spawn_blocking(move || union.add(*refs).map(|()| union))
            .await?
            .map_err(|e| Error::new(Kind::Internal, format!("union of block references: {e}")))?;
    }
    let mut u = tokio::task::spawn_blocking(move || {
        let r = union.finish();
        drop(spill);
        r
    })
    .await?
    .map_err(|e| Error::new(Kind::Internal, format!("union of block references: {e}")))?;
    u.forget_doubts_from(start_lsn);
    Ok(Ok(u))
}

/// What to store of one file.
pub(super) enum Decision {
    /// Copy it whole.
    Whole,
    /// Unchanged: the reference's entry.
    Same(FileEntry),
    /// These blocks of it, the rest from the reference's parts.
    Blocks { blocks: Ranges, older: Vec<Part> },
    /// The WAL cannot answer for it and the reference has no block sums:
    /// read it and compare it with the reference's copy (same size,
    /// whole-file checksum); the same, it is taken from the reference,
    /// else copied whole.
    Compare(FileEntry),
    /// The WAL cannot answer for it: read it, sum each block and compare
    /// with the reference's block sums `sums`; store the blocks that
    /// differ (the rest from `older`, the reference's parts), or take the
    /// reference's entry `old` when none does.
    CompareBlocks {
        old: FileEntry,
        older: Vec<Part>,
        sums: Vec<BlockSum>,
    },
}

impl Plan {
    /// Decides for `rel` of `size` bytes, whose entry in the reference is
    /// `old`; a fallback for the file alone is added to the report by the
    /// caller through `fallback`.
    pub(super) fn decide(
        &self,
        rel: &str,
        size: u64,
        old: Option<&FileEntry>,
    ) -> (Decision, Option<String>) {
        let whole = (Decision::Whole, None);
        let Some(rf) = RelFile::parse(rel) else {
            return whole;
        };
        let Some(old) = old else {
            return whole;
        };
        let bs = BLOCK_SIZE as u64;
        // Where the WAL cannot answer, the file is compared block by block
        // with the reference's sums; without them, a file the reference
        // holds whole at the same size is compared whole.
        let compare = || match self.reference_sums(old) {
            Some(sums) if size % bs == 0 => (
                Decision::CompareBlocks {
                    old: self.same(old),
                    older: blockmap::parts_of(old, &self.reference.label),
                    sums,
                },
                None,
            ),
            _ if old.parts.is_empty() && old.size == size => {
                (Decision::Compare(self.same(old)), None)
            }
            _ => (Decision::Whole, None),
        };
        let Some(changes) = &self.changes else {
            return compare();
        };
        let Some(fork) = blockref::Fork::from_number(rf.fork as u8) else {
            return whole;
        };
        let key = RelFork {
            loc: RelFileLocator {
                spc: rf.tablespace,
                db: rf.database,
                rel: rf.relnumber,
            },
            fork,
        };
        if size % bs != 0 || old.size % bs != 0 {
            return (
                Decision::Whole,
                Some(format!(
                    "{rel}: not whole blocks ({size} bytes, reference {})",
                    old.size
                )),
            );
        }
        let (n, m) = (blockmap::block_count(size), blockmap::block_count(old.size));
        let seg_first = rf.segno.saturating_mul(RELSEG_SIZE);
        let seg_end = seg_first.saturating_add(RELSEG_SIZE);
        /// What the change set says of the fork, owned.
        enum Said {
            Blocks(Vec<u32>, Option<u32>),
            Doubt,
            Whole,
        }
        let said = changes.with_fork_state(&key, |st| match st {
            ForkState::Unchanged => Said::Blocks(Vec::new(), None),
            ForkState::Changed { blocks, limit } => Said::Blocks(
                blocks
                    .range(seg_first, seg_end)
                    .map(|b| b - seg_first)
                    .collect(),
                limit.map(|l| l.saturating_sub(seg_first)),
            ),
            ForkState::Whole(Whole::Doubt(_)) => Said::Doubt,
            ForkState::Whole(_) => Said::Whole,
        });
        let (changed, limit) = match said {
            Ok(Said::Blocks(changed, limit)) => (changed, limit),
            Ok(Said::Doubt) => return compare(),
            Ok(Said::Whole) => return whole,
            Err(e) => {
                return (
                    Decision::Whole,
                    Some(format!("{rel}: read the spilled change set: {e}")),
                )
            }
        };
        // Blocks at or past the reference's end or the truncation limit
        // cannot come from the reference.
        let keep_upto = limit.map_or(m, |l| l.min(m));
        if n < keep_upto {
            return (
                Decision::Whole,
                Some(format!(
                    "{rel}: {n} blocks, fewer than the {keep_upto} the WAL explains"
                )),
            );
        }
        let mut blocks: Vec<u32> = changed.into_iter().filter(|&b| b < n).collect();
        blocks.extend(keep_upto..n);
        blocks.sort_unstable();
        let blocks = blockmap::ranges_of(blocks);
        let older = blockmap::parts_of(old, &self.reference.label);
        if blocks.is_empty() && n == m {
            return (Decision::Same(self.same(old)), None);
        }
        (Decision::Blocks { blocks, older }, None)
    }

    /// The reference's block sums of `rel` (`None`: it has none).
    pub(super) fn sums_of(&self, rel: &str) -> Option<Vec<BlockSum>> {
        let sums = self.sums.as_ref()?;
        match sums.get(rel) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("read the reference's block sums of {rel}: {e}");
                None
            }
        }
    }

    /// The reference's block sums of `old`, if they cover its blocks.
    fn reference_sums(&self, old: &FileEntry) -> Option<Vec<BlockSum>> {
        self.sums_of(&old.path)
            .filter(|s| s.len() == blockmap::block_count(old.size) as usize)
    }

    /// The reference's entry as this backup lists it: pointing at the
    /// backup that holds it.
    fn same(&self, old: &FileEntry) -> FileEntry {
        let mut same = old.clone();
        if same.parts.is_empty() && same.backup.is_none() {
            same.backup = Some(self.reference.label.clone());
        }
        same
    }
}

/// Reads the given blocks of a file, in order; blocks past its end read as
/// zeros (a truncation after the backup's start, which replay redoes).
pub(super) struct BlockReader {
    file: File,
    blocks: std::vec::IntoIter<u32>,
    buf: Vec<u8>,
    at: usize,
}

impl BlockReader {
    pub(super) fn new(file: File, ranges: &[(u32, u32)]) -> BlockReader {
        let blocks: Vec<u32> = ranges.iter().flat_map(|&(a, b)| a..=b).collect();
        BlockReader {
            file,
            blocks: blocks.into_iter(),
            buf: Vec::new(),
            at: 0,
        }
    }
}

impl Read for BlockReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.at == self.buf.len() {
            let Some(b) = self.blocks.next() else {
                return Ok(0);
            };
            self.buf = vec![0u8; BLOCK_SIZE];
            let mut got = 0;
            let pos = u64::from(b) * BLOCK_SIZE as u64;
            while got < BLOCK_SIZE {
                match self.file.read_at(&mut self.buf[got..], pos + got as u64) {
                    Ok(0) => break,
                    Ok(k) => got += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            self.at = 0;
        }
        let n = out.len().min(self.buf.len() - self.at);
        out[..n].copy_from_slice(&self.buf[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}
