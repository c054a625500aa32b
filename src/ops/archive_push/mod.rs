//! `archive-push`: archive one WAL segment, `.partial`, `.history` or
//! `.backup` file, durably, never overwriting what is archived.
//!
//! Per file name N with content C (SHA-256 h), by the archive's rules
//! (`repo::archive`, which owns claims and keys):
//!
//! 1. If N is claimed already, the file is archived when the claim names h
//!    (once that content is durable: PostgreSQL calls again after a crash
//!    that may have come before our fsync), a conflict otherwise — the
//!    archived copy stays as it is.
//! 2. Stream C through SHA-256, zstd and the WAL record scanner in one pass
//!    into a spool, and store it as N's content h beside its summary.
//! 3. Claim N for h.
//!
//! With look-ahead ([`lookahead`]), a detached pusher pushes the files
//! PostgreSQL has marked `.ready` meanwhile, so that its next calls return
//! at once.
//!
//! With several repositories ([`quorum`]), PostgreSQL is told once
//! `archive-push-quorum` of them hold the file; each of the others gets it
//! queued durably in its spool, and the detached pusher ([`catchup`])
//! sends the queue when the repository answers again.
//!
//! Timelines ([`timeline_rules`]): a file of timeline N > 1 goes to the
//! archive only after `0000000N.history`, as PostgreSQL's archiver orders
//! them; a history file only when the WAL of its timeline already archived
//! agrees with it; and a segment holding WAL of a timeline past the point
//! where an archived history left it is archived with a warning, or refused
//! (`archive-push-superseded`).

mod catchup;
mod lookahead;
mod quorum;

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::catalog::Catalog;
use crate::error::{Error, Kind, Result};
use crate::ops::walfacts;
use crate::pg::walscan::{WalScanner, WalSummary};
use crate::pg::{self, TimelineId, WalFileKind, WalFileName};
use crate::repo::archive::{ClaimOutcome, Fork};
use crate::repo::codec::{self, Binding, EncodeOptions, Encoder};
use crate::repo::{DbInfo, Digest256, Repository};
use crate::spool::SpoolDir;

pub use catchup::{catch_up, push_behind, pusher_wanted};
pub use lookahead::{lookahead_wanted, push_ahead};
pub use quorum::{archive_push_quorum, QuorumOptions, QuorumOutcome, Target};

#[derive(Debug, Clone)]
pub struct PushOptions {
    pub path: PathBuf,
    pub encode: EncodeOptions,
    /// Look-ahead: how many other `.ready` files to push in the same call
    /// (0 = off). Needs a spool.
    pub ahead: usize,
    /// Parallel pushes within one call.
    pub process_max: usize,
    pub spool: Option<SpoolDir>,
    /// What to do with WAL of a timeline past the point where an archived
    /// history left it.
    pub superseded: OnSuperseded,
}

/// `archive-push-superseded`: what `archive-push` does with a segment
/// holding WAL of timeline N past the point where an archived history file
/// left N for another timeline. That is an old primary writing after a
/// failover (a split brain) — or the original primary going on while a PITR
/// clone restored into the same stanza with `--archive-mode preserve` was
/// promoted, which looks the same in the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnSuperseded {
    /// Archive it, and log a warning naming the timeline and the LSN on
    /// every such push. The default: failing the pushes of a primary that
    /// rightly goes on (the clone case) fills its `pg_wal` and stops it.
    #[default]
    Warn,
    /// Refuse it (exit 12), for clusters where a superseded timeline must
    /// never continue.
    Fail,
}

impl std::str::FromStr for OnSuperseded {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "warn" => Ok(OnSuperseded::Warn),
            "fail" => Ok(OnSuperseded::Fail),
            _ => Err(format!("{s:?} is not warn or fail")),
        }
    }
}

/// Who pushes: PostgreSQL's own call, or the look-ahead pusher. What must
/// reach PostgreSQL's log (a warning, a refusal) the pusher leaves to
/// PostgreSQL's call for that file: its output goes nowhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Postgres(OnSuperseded),
    LookAhead,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    Archived,
    AlreadyArchived,
}

/// What was archived, for the catalog.
#[derive(Debug, Clone)]
pub struct Pushed {
    pub name: WalFileName,
    pub digest: Digest256,
    pub outcome: PushOutcome,
    /// What its records say, when this call read them.
    pub summary: Option<WalSummary>,
}

impl Pushed {
    /// Notes the push in the catalog (a cache: failures only cost a log line).
    async fn record_in(&self, catalog: Option<&Catalog>, repo: &Repository) {
        if let Some(cat) = catalog {
            cat.record_wal_best_effort(
                repo.stanza(),
                &self.name,
                &self.digest,
                self.summary.as_ref(),
            )
            .await;
        }
    }
}

/// Archives `opts.path`. With look-ahead, the detached pusher
/// ([`push_ahead`], started by the caller) pushes the files PostgreSQL has
/// marked `.ready` meanwhile, so that its next calls return at once; a
/// call for a file the pusher is pushing right now waits for it.
pub async fn archive_push(
    repo: &Repository,
    catalog: Option<&Catalog>,
    opts: &PushOptions,
) -> Result<Pushed> {
    let shown = opts.path.display().to_string();
    let context = |e: Error| e.context(format!("archive-push {shown}"));
    let name = file_name_of(&opts.path).map_err(context)?;

    if let Some(spool) = opts.spool.as_ref().filter(|_| opts.ahead > 0) {
        if let Some(pushed) = lookahead::pushed_ahead(spool, &name, &opts.path)
            .await
            .map_err(context)?
        {
            return Ok(pushed);
        }
    }

    let stanza = repo.require_stanza().await.map_err(context)?;
    let db = stanza.current().clone();
    let pushed = push_one(
        repo,
        &db,
        &opts.path,
        opts.encode,
        Caller::Postgres(opts.superseded),
    )
    .await
    .map_err(context)?;
    if let Some(spool) = &opts.spool {
        spool.forget_pushed_before(&name);
    }
    pushed.record_in(catalog, repo).await;
    Ok(pushed)
}

async fn push_one(
    repo: &Repository,
    db: &DbInfo,
    path: &Path,
    encode: EncodeOptions,
    caller: Caller,
) -> Result<Pushed> {
    let name = file_name_of(path)?;
    let archive = repo.archive(db);

    // Validate before anything touches the repository.
    let path2 = path.to_path_buf();
    let (name2, db2) = (name.clone(), db.clone());
    let history =
        tokio::task::spawn_blocking(move || validate_file(&path2, &name2, &db2)).await??;

    if let Some(claim) = archive.read_claim(&name).await? {
        let path = path.to_path_buf();
        let digest = tokio::task::spawn_blocking(move || hash_file(&path)).await??;
        archive.confirm(&name, &claim, &digest).await?;
        return Ok(Pushed {
            name,
            digest,
            outcome: PushOutcome::AlreadyArchived,
            summary: None,
        });
    }

    let rules = timeline_rules(repo, db, path, &name, history.as_ref(), encode, caller);
    if let Some(fork) = rules.await? {
        // Decided before anything is stored: a refused push leaves nothing.
        let seg = db.wal_segment_size;
        let summary = if name.segno(seg) == Some(fork.at.segno(seg)) {
            // The segment holding the fork: its records tell (read once
            // more, only here).
            let (p, scan) = (path.to_path_buf(), walfacts::scan_options(db, &name));
            tokio::task::spawn_blocking(move || scan_only(&p, scan)).await??
        } else {
            None
        };
        if fork.passed_by(&name, summary.as_ref(), seg) {
            superseded(&name, &fork, caller)?;
        }
    }

    // Hash + compress + walk the records in one pass into a spool (zstd's
    // own worker threads compress while this thread reads, hashes and
    // scans).
    let path = path.to_path_buf();
    let scan = walfacts::scan_options(db, &name);
    let (archive2, name2) = (archive.clone(), name.clone());
    let keys = repo.keys().await?;
    let (spool, digest, summary) = tokio::task::spawn_blocking(move || -> Result<_> {
        let file = File::open(&path).map_err(|e| input_error(&path, e))?;
        let size = file.metadata().map_err(|e| input_error(&path, e))?.len();
        let spool = archive2.spool(&name2)?;
        // Written to a temporary object in this directory, named once its
        // checksum is known.
        let place = archive2.describe_dir(&name2);
        let write_err = |e: io::Error| Error::io(Kind::Repository, "write to", &place, &e);
        let bind = archive2.content_binding(&name2);
        let mut enc =
            Encoder::new(spool, encode, &keys, Binding::object(&bind)).map_err(write_err)?;
        enc.set_pledged_size(size)
            .map_err(|e| Error::internal(format!("start compression: {e}")))?;
        let mut scanner = scan.map(WalScanner::new);
        match scanner.as_mut() {
            Some(scanner) => copy_file(file, &mut Tee(&mut enc, scanner), &path, write_err)?,
            None => copy_file(file, &mut enc, &path, write_err)?,
        }
        let (spool, digest) = enc.finish().map_err(write_err)?;
        Ok((spool, digest, scanner.map(WalScanner::finish_with_blocks)))
    })
    .await??;
    let (summary, refs) = match summary {
        Some((s, r)) => (Some(s), Some(r)),
        None => (None, None),
    };
    if let Some(summary) = &summary {
        walfacts::warn_about(&name, summary);
    }

    // The summary and the block references go beside the content at the
    // same time; neither is needed to restore the segment (backfill
    // rewrites a missing one, and an incremental backup without them
    // compares blocks instead), so failing to store one only costs a
    // warning.
    let store_data = archive.store_content(spool, &name, &digest);
    let store_summary = async {
        if let Some(summary) = &summary {
            if let Err(e) = archive.store_summary(&name, &digest.sha256, summary).await {
                log::warn!("{name}: record summary not stored ({e}); `pgvault backfill` writes it");
            }
        }
    };
    let store_refs = async {
        if let Some(refs) = &refs {
            if let Err(e) = archive.store_blockrefs(&name, &digest.sha256, refs).await {
                log::warn!(
                    "{name}: block references not stored ({e}); `pgvault backfill` writes them"
                );
            }
        }
    };
    let (stored, (), ()) = futures::join!(store_data, store_summary, store_refs);
    stored?;

    let outcome = match archive.claim(&name, &digest).await? {
        ClaimOutcome::Claimed => PushOutcome::Archived,
        ClaimOutcome::AlreadyClaimed => PushOutcome::AlreadyArchived,
    };
    Ok(Pushed {
        name,
        digest,
        outcome,
        summary,
    })
}

/// The timeline rules, before a file is stored (see the module doc). For a
/// history file: the archived WAL of its timeline must agree with it. For
/// any other file of timeline N > 1: `0000000N.history` is archived first —
/// from beside the file when the archive lacks it (PostgreSQL's archiver
/// archives history files first, pgarch.c; a restore that finds no
/// `0000000N.history` takes N to be free and reuses it). Returns where an
/// archived history leaves the timeline of a segment, for the check of its
/// records.
async fn timeline_rules(
    repo: &Repository,
    db: &DbInfo,
    path: &Path,
    name: &WalFileName,
    history: Option<&pg::history::TimelineHistory>,
    encode: EncodeOptions,
    caller: Caller,
) -> Result<Option<Fork>> {
    let tli = name.timeline();
    let archive = repo.archive(db);
    if let Some(history) = history {
        archive.check_history_agrees(history).await?;
        return Ok(None);
    }
    let archived = archive.history_timelines().await?;
    if tli != TimelineId::FIRST && !archived.contains(&tli) {
        let history = WalFileName::history(tli);
        let beside = path.with_file_name(history.as_str());
        if beside.is_file() {
            Box::pin(push_one(repo, db, &beside, encode, caller))
                .await
                .map_err(|e| e.context(format!("archive {history} before {name}")))?;
        } else if caller == Caller::LookAhead {
            return Err(Error::new(
                Kind::Timeline,
                format!(
                    "{history} is neither archived nor beside {name}: left to PostgreSQL's call"
                ),
            ));
        } else {
            // PostgreSQL keeps every history file in pg_wal; none there
            // means the cluster has none: pg_upgrade (through pg_resetwal)
            // keeps the timeline number but not its history.
            log::warn!(
                "{name}: timeline {tli} has no history file, neither in the archive nor beside it; archived without one (recovery takes timeline {tli} to have no ancestors)"
            );
        }
    }
    if name.kind() != WalFileKind::Segment {
        return Ok(None);
    }
    let later: Vec<TimelineId> = archived.into_iter().filter(|&m| m > tli).collect();
    if later.is_empty() {
        return Ok(None);
    }
    Ok(archive.histories_of(later).await?.fork_of(tli))
}

/// A segment holds WAL past the point where an archived history left its
/// timeline: warn, refuse, or (look-ahead) leave it to PostgreSQL's call.
fn superseded(name: &WalFileName, fork: &Fork, caller: Caller) -> Result<()> {
    let what = format!("{name}: {}", fork.describe());
    match caller {
        Caller::Postgres(OnSuperseded::Warn) => {
            log::warn!(
                "{what}: an old primary writing after a failover (split brain), or the original of a PITR clone archiving into this stanza; archived (archive-push-superseded = warn)"
            );
            Ok(())
        }
        Caller::Postgres(OnSuperseded::Fail) => Err(Error::new(Kind::Timeline, what).hint(
            "a superseded timeline may not continue here (archive-push-superseded = fail): stop this server, or give it a stanza of its own; see docs/disaster-recovery.md",
        )),
        Caller::LookAhead => Err(Error::new(
            Kind::Timeline,
            format!("{what}: left to PostgreSQL's call, which logs it"),
        )),
    }
}

fn file_name_of(path: &Path) -> Result<WalFileName> {
    let base = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::invalid_input("not a file name"))?;
    WalFileName::parse(base).map_err(|e| {
        Error::invalid_input(format!("not a WAL file: {e}"))
            .hint("archive_command must pass %p: archive_command = 'pgvault archive-push %p'")
    })
}

fn input_error(path: &Path, e: io::Error) -> Error {
    let err = Error::invalid_input(match e.kind() {
        io::ErrorKind::NotFound => "file not found".to_string(),
        _ => format!("cannot read: {e}"),
    });
    if e.kind() == io::ErrorKind::NotFound && path.is_relative() {
        err.hint("a relative path is read from the working directory; PostgreSQL runs archive_command in the data directory")
    } else {
        err
    }
}

/// Checks that the file is what its name says and belongs to this stanza;
/// a history file is returned read as PostgreSQL reads it.
fn validate_file(
    path: &Path,
    name: &WalFileName,
    db: &DbInfo,
) -> Result<Option<pg::history::TimelineHistory>> {
    let mut file = File::open(path).map_err(|e| input_error(path, e))?;
    let size = file.metadata().map_err(|e| input_error(path, e))?.len();
    match name.kind() {
        WalFileKind::Segment | WalFileKind::Partial => {
            if size != u64::from(db.wal_segment_size) {
                return Err(Error::invalid_input(format!(
                    "file is {size} bytes, but WAL segments of this stanza are {} bytes (truncated or not a WAL segment)",
                    db.wal_segment_size
                )));
            }
            let mut page = vec![0u8; (pg::WAL_BLOCK_SIZE as usize).min(size as usize)];
            file.read_exact(&mut page)
                .map_err(|e| input_error(path, e))?;
            let expect = pg::wal::SegmentExpectation {
                major: db.pg_version,
                system_identifier: db.system_id(),
                seg_size: db.wal_segment_size,
            };
            pg::wal::validate_segment_start(name, &page, &expect).map_err(|e| {
                Error::invalid_input(format!("not a WAL segment of this stanza's cluster: {e}"))
                    .hint(
                        "after pg_upgrade run `pgvault stanza-upgrade --pgdata <new PGDATA>`; \
                         otherwise another cluster's archive_command points at this stanza",
                    )
            })?;
        }
        WalFileKind::History => {
            let text = read_small_text(&mut file, size, path)?;
            let history = pg::history::parse_history(name.timeline(), &text)
                .map_err(|e| Error::invalid_input(format!("not a timeline history file: {e}")))?;
            return Ok(Some(history));
        }
        WalFileKind::BackupLabel => {
            let text = read_small_text(&mut file, size, path)?;
            pg::recovery::check_backup_history(&text)
                .map_err(|e| Error::invalid_input(e.to_string()))?;
        }
    }
    Ok(None)
}

fn read_small_text(file: &mut File, size: u64, path: &Path) -> Result<String> {
    if size > 1 << 20 {
        return Err(Error::invalid_input(format!(
            "file is {size} bytes, too large for a history or backup label file"
        )));
    }
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(|e| {
        Error::invalid_input(format!("not a text file: {e}")).context(path.display().to_string())
    })?;
    Ok(text)
}

/// Copies `file` (the input at `path`) into `out`, whose errors
/// `out_err` names.
fn copy_file<W: io::Write>(
    mut file: File,
    out: &mut W,
    path: &Path,
    out_err: impl Fn(io::Error) -> Error,
) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(input_error(path, e)),
        };
        out.write_all(&buf[..n]).map_err(&out_err)?;
    }
}

/// Writes everything to both: the encoder and the record scanner.
struct Tee<'a, A, B>(&'a mut A, &'a mut B);

impl<A: io::Write, B: io::Write> io::Write for Tee<'_, A, B> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(buf)?;
        self.1.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// The records of a file, without storing it.
fn scan_only(path: &Path, scan: Option<pg::walscan::ScanOptions>) -> Result<Option<WalSummary>> {
    let Some(scan) = scan else {
        return Ok(None);
    };
    let file = File::open(path).map_err(|e| input_error(path, e))?;
    let mut scanner = WalScanner::new(scan);
    copy_file(file, &mut scanner, path, |e| {
        Error::internal(format!("read the records of {}: {e}", path.display()))
    })?;
    Ok(Some(scanner.finish()))
}

fn hash_file(path: &Path) -> Result<Digest256> {
    let file = File::open(path).map_err(|e| input_error(path, e))?;
    let mut h = codec::HashingWriter::new(io::sink());
    copy_file(file, &mut h, path, |e| {
        Error::internal(format!("hash {}: {e}", path.display()))
    })?;
    Ok(h.finish().1)
}

#[cfg(test)]
pub(crate) mod tests;
