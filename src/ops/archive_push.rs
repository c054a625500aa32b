//! `archive-push`: archive one WAL segment, `.partial`, `.history` or
//! `.backup` file, durably, never overwriting what is archived.
//!
//! The protocol, per file name N with content C (SHA-256 h):
//!
//! 1. Read N's claim. If it names h, the file is already archived: make sure
//!    the existing copy is durable (PostgreSQL calls again after a crash that
//!    may have come before our fsync) and succeed. If it names another
//!    checksum, fail: the archived copy stays as it is.
//! 2. Stream C through SHA-256 and zstd into a spool, then store it under
//!    `N-h.zst`. The key is content-addressed, so no two different files
//!    can ever overwrite each other, whatever the store.
//! 3. Create N's claim (naming h) if absent. Where create-if-absent is
//!    atomic (local `link()`, S3 `If-None-Match` on stores that honour it)
//!    exactly one racing pusher gets it. On stores where it is not atomic,
//!    wait briefly and read the claim back: it names exactly one checksum,
//!    and only that pusher succeeds. Either way a loser's object stays under
//!    its own key, so a conflict is never silent (`verify` reports it).

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::catalog::Catalog;
use crate::error::{Error, Kind, Result};
use crate::ops::walfacts;
use crate::pg::walscan::{WalScanner, WalSummary};
use crate::pg::{self, WalFileKind, WalFileName};
use crate::repo::codec::{self, EncodeOptions, Encoder};
use crate::repo::{layout, DbInfo, Digest256, PutMode, PutOutcome, Repository, Sha256Sum};
use crate::spool::{FileIdentity, SpoolDir};

/// How long a pusher waits before reading back a claim on a store whose
/// create-if-absent is not atomic: longer than any racing writer's
/// check-then-write takes.
const CLAIM_SETTLE: Duration = Duration::from_millis(300);

/// The claim object: which content owns a WAL file name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub sha256: String,
    pub size: u64,
    pub archived_at: String,
}

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

/// How long the look-ahead pusher waits for PostgreSQL to take records
/// before it gives up (PostgreSQL may have stopped archiving).
const IDLE_PUSHER: Duration = Duration::from_secs(30);
/// How long PostgreSQL's call waits for the look-ahead pusher to finish
/// the file it asked for, before pushing it itself.
const WAIT_FOR_PUSHER: Duration = Duration::from_secs(300);

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
        if let Some(pushed) = pushed_ahead(spool, &name, &opts.path)
            .await
            .map_err(context)?
        {
            return Ok(pushed);
        }
    }

    let stanza = repo.require_stanza().await.map_err(context)?;
    let db = stanza.current().clone();
    let pushed = push_one(repo, &db, &opts.path, opts.encode)
        .await
        .map_err(context)?;
    if let Some(spool) = &opts.spool {
        spool.forget_pushed_before(&name);
    }
    if let Some(cat) = catalog {
        cat.record_wal_best_effort(
            repo.stanza(),
            &pushed.name,
            &pushed.digest,
            pushed.summary.as_ref(),
        )
        .await;
    }
    Ok(pushed)
}

/// Was `name` pushed ahead of time (or is it being pushed now: then wait)?
/// Only if the file PostgreSQL gives now has exactly the bytes pushed.
async fn pushed_ahead(spool: &SpoolDir, name: &WalFileName, path: &Path) -> Result<Option<Pushed>> {
    let started = std::time::Instant::now();
    let record = loop {
        if let Some(record) = spool.pushed(name) {
            break record;
        }
        if !spool.is_marked_pushing(name)
            || !spool.pusher_running()
            || started.elapsed() > WAIT_FOR_PUSHER
        {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // The very file that was read, unchanged since: those bytes are
    // archived. Otherwise (copied, touched), its content decides.
    let same_file = record
        .identity
        .is_some_and(|id| FileIdentity::of(path).is_ok_and(|now| now == id));
    let digest = if same_file {
        record.digest
    } else {
        let p = path.to_path_buf();
        tokio::task::spawn_blocking(move || hash_file(&p)).await??
    };
    if digest != record.digest {
        log::warn!("{name} differs from what was pushed ahead of time; pushing it again");
        return Ok(None);
    }
    spool.forget_pushed_before(name);
    Ok(Some(Pushed {
        name: name.clone(),
        digest,
        outcome: PushOutcome::AlreadyArchived,
        summary: None,
    }))
}

/// The look-ahead pusher: a detached process (one per spool: a lock),
/// started by PostgreSQL's call for `opts.path`. `process_max` workers push
/// the other `.ready` files in `pg_wal/archive_status`, oldest first, each
/// compressed on one thread, and record each in the spool once its object
/// is durable; at most `ahead` records wait for PostgreSQL at any time. It
/// exits when nothing is left to push.
pub async fn push_ahead(
    repo: &Repository,
    catalog: Option<&Catalog>,
    opts: &PushOptions,
) -> Result<usize> {
    let Some(spool) = opts.spool.as_ref().filter(|_| opts.ahead > 0) else {
        return Ok(0);
    };
    let Some(_lock) = spool
        .try_lock_pusher()
        .map_err(|e| Error::internal(format!("lock the look-ahead spool: {e}")))?
    else {
        return Ok(0); // one is at work already
    };
    spool.clear_pushing_marks();
    let name = file_name_of(&opts.path)?;
    let Some(wal_dir) = opts.path.parent().map(Path::to_path_buf) else {
        return Ok(0);
    };
    let stanza = repo.require_stanza().await?;
    let db = stanza.current().clone();
    let encode = EncodeOptions {
        threads: 0,
        ..opts.encode
    };
    // Names taken by a worker and not recorded yet.
    let busy = std::sync::Mutex::new(std::collections::BTreeSet::new());
    let pushed = std::sync::atomic::AtomicUsize::new(0);
    let worker = || async {
        let mut waiting_since: Option<std::time::Instant> = None;
        loop {
            let next = {
                let mut busy = busy.lock().expect("lock poisoned");
                let recorded = spool.pushed_names();
                let Some(first) = ready_files(&wal_dir, &name, &recorded, &busy)
                    .into_iter()
                    .next()
                else {
                    return; // nothing left to push
                };
                let room = opts.ahead.saturating_sub(recorded.len() + busy.len());
                (room > 0).then(|| {
                    busy.insert(first.clone());
                    let _ = spool.mark_pushing(&first);
                    first
                })
            };
            let Some(next) = next else {
                // `ahead` records wait for PostgreSQL: wait until it takes
                // some, unless it stopped calling.
                let since = *waiting_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > IDLE_PUSHER {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            waiting_since = None;
            let path = wal_dir.join(next.as_str());
            let before = FileIdentity::of(&path).ok();
            let r = push_one(repo, &db, &path, encode).await;
            // Which file was read, if it did not change meanwhile.
            let identity = before.filter(|b| FileIdentity::of(&path).is_ok_and(|a| a == *b));
            match r {
                Ok(done) => {
                    // Only now that the object is durable.
                    let (sp, d) = (spool.clone(), done.clone());
                    let rec = tokio::task::spawn_blocking(move || {
                        sp.record_pushed(&d.name, &d.digest, identity)
                    })
                    .await;
                    if !matches!(rec, Ok(Ok(()))) {
                        log::debug!("record the look-ahead push of {next}: {rec:?}");
                    }
                    pushed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if let Some(cat) = catalog {
                        cat.record_wal_best_effort(
                            repo.stanza(),
                            &done.name,
                            &done.digest,
                            done.summary.as_ref(),
                        )
                        .await;
                    }
                }
                // PostgreSQL will ask for it and get the error then.
                Err(e) => log::debug!("look-ahead push of {next} failed: {e}"),
            }
            spool.unmark_pushing(&next);
            busy.lock().expect("lock poisoned").remove(&next);
        }
    };
    futures::future::join_all((0..opts.process_max.max(1)).map(|_| worker())).await;
    Ok(pushed.into_inner())
}

/// Should PostgreSQL's call for `opts.path` start the look-ahead pusher?
/// When look-ahead is on, none runs, and other files are ready.
pub fn lookahead_wanted(opts: &PushOptions) -> bool {
    let (Some(spool), Ok(name), Some(wal_dir)) = (
        opts.spool.as_ref().filter(|_| opts.ahead > 0),
        file_name_of(&opts.path),
        opts.path.parent(),
    ) else {
        return false;
    };
    !spool.pusher_running()
        && !ready_files(wal_dir, &name, &spool.pushed_names(), &Default::default()).is_empty()
}

/// `.ready` files in `pg_wal/archive_status` other than `name` (the one
/// PostgreSQL's own call pushes), oldest first, neither pushed ahead
/// already (`recorded`: the spool's records) nor taken by a worker.
fn ready_files(
    wal_dir: &Path,
    name: &WalFileName,
    recorded: &std::collections::BTreeSet<String>,
    busy: &std::collections::BTreeSet<WalFileName>,
) -> Vec<WalFileName> {
    let Ok(rd) = std::fs::read_dir(wal_dir.join("archive_status")) else {
        return Vec::new();
    };
    let mut names: Vec<WalFileName> = rd
        .flatten()
        .filter_map(|e| {
            let f = e.file_name();
            let stem = f.to_str()?.strip_suffix(".ready")?.to_string();
            WalFileName::parse(&stem).ok()
        })
        .filter(|n| n != name && !busy.contains(n) && !recorded.contains(n.as_str()))
        .collect();
    names.sort();
    names
}

async fn push_one(
    repo: &Repository,
    db: &DbInfo,
    path: &Path,
    encode: EncodeOptions,
) -> Result<Pushed> {
    let name = file_name_of(path)?;
    let db = db.clone();

    // Validate before anything touches the repository.
    let path2 = path.to_path_buf();
    let (name2, db2) = (name.clone(), db.clone());
    tokio::task::spawn_blocking(move || validate_file(&path2, &name2, &db2)).await??;

    let stanza_name = repo.stanza().to_string();
    let dir = layout::wal_dir(&stanza_name, &db.dir(), &name);
    let claim_key = layout::wal_claim_key(&stanza_name, &db.dir(), &name);

    if let Some(claim) = read_claim(repo, &claim_key).await? {
        let path = path.to_path_buf();
        let digest = tokio::task::spawn_blocking(move || hash_file(&path)).await??;
        settle_existing(repo, &name, &db, &claim_key, &claim, &digest).await?;
        return Ok(Pushed {
            name,
            digest,
            outcome: PushOutcome::AlreadyArchived,
            summary: None,
        });
    }

    // Hash + compress + walk the records in one pass into a spool (zstd's
    // own worker threads compress while this thread reads, hashes and
    // scans).
    let backend = repo.backend().clone();
    let path = path.to_path_buf();
    let scan = walfacts::scan_options(&db, &name);
    let (spool, digest, summary) = tokio::task::spawn_blocking(move || -> Result<_> {
        let file = File::open(&path).map_err(|e| input_error(&path, e))?;
        let size = file.metadata().map_err(|e| input_error(&path, e))?.len();
        let spool = backend
            .spool(&dir)
            .map_err(|e| Error::repository(format!("{}: {e}", backend.describe())))?;
        let mut enc = Encoder::new(spool, encode)
            .map_err(|e| Error::internal(format!("start compression: {e}")))?;
        enc.set_pledged_size(size)
            .map_err(|e| Error::internal(format!("start compression: {e}")))?;
        let mut scanner = scan.map(WalScanner::new);
        match scanner.as_mut() {
            Some(scanner) => copy_file(file, &mut Tee(&mut enc, scanner), &path)?,
            None => copy_file(file, &mut enc, &path)?,
        }
        let (spool, digest) = enc
            .finish()
            .map_err(|e| Error::repository(format!("write {}: {e}", backend.describe())))?;
        Ok((spool, digest, scanner.map(WalScanner::finish)))
    })
    .await??;
    if let Some(summary) = &summary {
        walfacts::warn_about(&name, summary);
    }

    let data_key = layout::wal_data_key(&stanza_name, &db.dir(), &name, &digest.sha256);
    // Content-addressed: AlreadyExists means these very bytes are stored.
    // The summary goes beside it at the same time; it is not needed to
    // restore the segment (backfill rewrites a missing one), so failing to
    // store it only costs a warning.
    let store_data = repo.backend().commit(spool, &data_key, PutMode::CreateNew);
    let store_summary = async {
        if let Some(summary) = &summary {
            if let Err(e) =
                walfacts::store_summary(repo, &db.dir(), &name, &digest.sha256, summary).await
            {
                log::warn!("{name}: record summary not stored ({e}); `pgvault backfill` writes it");
            }
        }
    };
    let (stored, ()) = futures::join!(store_data, store_summary);
    stored?;

    let claim = Claim {
        sha256: digest.sha256.to_hex(),
        size: digest.size,
        archived_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    };
    let created = repo
        .put_json(&claim_key, &claim, PutMode::CreateNew)
        .await?;
    let pushed = Pushed {
        name: name.clone(),
        digest,
        outcome: match created {
            PutOutcome::Created => PushOutcome::Archived,
            PutOutcome::AlreadyExists => PushOutcome::AlreadyArchived,
        },
        summary,
    };
    if created == PutOutcome::Created && repo.backend().atomic_create() {
        // We own the name, and both objects were made durable as they were
        // committed (data first): nothing left to check.
        return Ok(pushed);
    }
    if created == PutOutcome::Created {
        tokio::time::sleep(CLAIM_SETTLE).await;
    }
    let owner = read_claim(repo, &claim_key).await?.ok_or_else(|| {
        Error::repository(format!(
            "{}/{claim_key} vanished after it was written",
            repo.describe()
        ))
    })?;
    settle_existing(repo, &name, &db, &claim_key, &owner, &pushed.digest).await?;
    Ok(pushed)
}

/// N's claim exists: fine if it names our content (once that is durable),
/// a conflict otherwise.
async fn settle_existing(
    repo: &Repository,
    name: &WalFileName,
    db: &DbInfo,
    claim_key: &str,
    claim: &Claim,
    digest: &Digest256,
) -> Result<()> {
    if claim.sha256 != digest.sha256.to_hex() {
        return Err(Error::new(
            Kind::Conflict,
            format!(
                "a different {} is already archived (sha256 {}, {} bytes; this file: sha256 {}, {} bytes); the archived copy was kept",
                name,
                short(&claim.sha256),
                claim.size,
                short(&digest.sha256.to_hex()),
                digest.size
            ),
        )
        .hint("two clusters may be archiving into one stanza (an old primary beside a promoted standby?): give each its own stanza"));
    }
    let data_key = layout::wal_data_key(repo.stanza(), &db.dir(), name, &digest.sha256);
    repo.backend()
        .ensure_durable(&[data_key, claim_key.to_string()])
        .await
}

pub(crate) async fn read_claim(repo: &Repository, key: &str) -> Result<Option<Claim>> {
    let claim: Option<Claim> = repo.get_json(key).await?;
    if let Some(c) = &claim {
        if Sha256Sum::from_hex(&c.sha256).is_none() {
            return Err(Error::repository(format!(
                "{}/{key}: claim has a malformed checksum",
                repo.describe()
            )));
        }
    }
    Ok(claim)
}

fn short(hex: &str) -> &str {
    &hex[..hex.len().min(12)]
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

/// Checks that the file is what its name says and belongs to this stanza.
fn validate_file(path: &Path, name: &WalFileName, db: &DbInfo) -> Result<()> {
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
            let mut page = vec![0u8; 8192.min(size as usize)];
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
            pg::history::parse_history(name.timeline(), &text)
                .map_err(|e| Error::invalid_input(format!("not a timeline history file: {e}")))?;
        }
        WalFileKind::BackupLabel => {
            let text = read_small_text(&mut file, size, path)?;
            if !text.contains("START WAL LOCATION:") {
                return Err(Error::invalid_input(
                    "not a backup history file: no START WAL LOCATION line",
                ));
            }
        }
    }
    Ok(())
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

fn copy_file<W: io::Write>(mut file: File, out: &mut W, path: &Path) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(input_error(path, e)),
        };
        out.write_all(&buf[..n])
            .map_err(|e| Error::repository(format!("write: {e}")))?;
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

fn hash_file(path: &Path) -> Result<Digest256> {
    let file = File::open(path).map_err(|e| input_error(path, e))?;
    let mut h = codec::HashingWriter::new(io::sink());
    copy_file(file, &mut h, path)?;
    Ok(h.finish().1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::stanza_create::{stanza_create, StanzaCreateOptions};
    use crate::pg::testdata;
    use crate::repo::s3::S3Options;
    use crate::repo::RepoLocation;

    /// A data directory with two real, consecutive segments marked ready.
    fn pgdata(dir: &Path) -> PathBuf {
        let pg = dir.join("pg");
        std::fs::create_dir_all(pg.join("global")).unwrap();
        std::fs::create_dir_all(pg.join("pg_wal/archive_status")).unwrap();
        std::fs::write(
            pg.join("global/pg_control"),
            testdata::read("pg15/pg_control"),
        )
        .unwrap();
        std::fs::write(pg.join("PG_VERSION"), testdata::read("pg15/PG_VERSION")).unwrap();
        for n in ["000000010000000000000014", "000000010000000000000015"] {
            std::fs::write(pg.join("pg_wal").join(n), testdata::wal("pg15", n)).unwrap();
            std::fs::write(pg.join(format!("pg_wal/archive_status/{n}.ready")), b"").unwrap();
        }
        pg
    }

    /// That data directory, and a local repository with its stanza.
    async fn stanza(dir: &Path) -> (PathBuf, Repository) {
        let pg = pgdata(dir);
        let repo = Repository::open(
            RepoLocation::Local(dir.join("repo")),
            "s",
            &S3Options::default(),
        )
        .unwrap();
        stanza_create(&repo, &StanzaCreateOptions { pgdata: pg.clone() })
            .await
            .unwrap();
        (pg, repo)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn look_ahead_pushes_ready_files_and_later_calls_check_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (pg, repo) = stanza(dir.path()).await;
        let spool = SpoolDir::at(dir.path().join("spool"));
        let opts = |seg: &str| PushOptions {
            path: pg.join("pg_wal").join(seg),
            encode: EncodeOptions::default(),
            ahead: 8,
            process_max: 2,
            spool: Some(spool.clone()),
        };
        let o = opts("000000010000000000000014");
        assert!(lookahead_wanted(&o), "15 is ready too");
        // The detached pusher, run here in the test's process.
        assert_eq!(push_ahead(&repo, None, &o).await.unwrap(), 1);
        let first = archive_push(&repo, None, &o).await.unwrap();
        assert_eq!(first.outcome, PushOutcome::Archived);
        let next = WalFileName::parse("000000010000000000000015").unwrap();
        let record = spool
            .pushed(&next)
            .expect("15 was pushed ahead and recorded");

        // PostgreSQL's call for 15: answered from the record, after hashing.
        let second = archive_push(&repo, None, &opts("000000010000000000000015"))
            .await
            .unwrap();
        assert_eq!(second.outcome, PushOutcome::AlreadyArchived);
        assert_eq!(second.digest, record.digest);

        // Different bytes under that name: the record does not vouch for
        // them, and the archive refuses them.
        let p15 = pg.join("pg_wal/000000010000000000000015");
        let mut bytes = std::fs::read(&p15).unwrap();
        bytes[100_000] ^= 0xff;
        std::fs::write(&p15, &bytes).unwrap();
        let e = archive_push(&repo, None, &opts("000000010000000000000015"))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), Kind::Conflict, "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn prefetch_fetches_following_segments_verified_and_stops_at_the_end() {
        use crate::ops::archive_get::{archive_get, prefetch, GetOptions, GetOutcome};
        let dir = tempfile::tempdir().unwrap();
        let (pg, repo) = stanza(dir.path()).await;
        for seg in ["000000010000000000000014", "000000010000000000000015"] {
            let opts = PushOptions {
                path: pg.join("pg_wal").join(seg),
                encode: EncodeOptions::default(),
                ahead: 0,
                process_max: 1,
                spool: None,
            };
            archive_push(&repo, None, &opts).await.unwrap();
        }
        let spool = SpoolDir::at(dir.path().join("spool"));
        let n = prefetch(&repo, "000000010000000000000014", 8, &spool)
            .await
            .unwrap();
        assert_eq!(n, 1, "only 15 follows 14 in the archive");
        let p15 = WalFileName::parse("000000010000000000000015").unwrap();
        assert!(spool.prefetched(&p15).exists());
        let dest = dir.path().join("RECOVERYXLOG");
        let got = archive_get(
            &repo,
            &GetOptions {
                name: "000000010000000000000015".into(),
                dest: dest.clone(),
                spool: Some(spool.clone()),
            },
        )
        .await
        .unwrap();
        assert_eq!(got, GetOutcome::Restored);
        assert_eq!(
            std::fs::read(&dest).unwrap(),
            std::fs::read(pg.join("pg_wal/000000010000000000000015")).unwrap()
        );
        assert!(!spool.prefetched(&p15).exists(), "moved, not copied");
    }
}
