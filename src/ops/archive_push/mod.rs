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

mod lookahead;

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use crate::catalog::Catalog;
use crate::error::{Error, Kind, Result};
use crate::ops::walfacts;
use crate::pg::walscan::{WalScanner, WalSummary};
use crate::pg::{self, WalFileKind, WalFileName};
use crate::repo::archive::ClaimOutcome;
use crate::repo::codec::{self, EncodeOptions, Encoder};
use crate::repo::{DbInfo, Digest256, Repository};
use crate::spool::SpoolDir;

pub use lookahead::{lookahead_wanted, push_ahead};

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
    let pushed = push_one(repo, &db, &opts.path, opts.encode)
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
) -> Result<Pushed> {
    let name = file_name_of(path)?;
    let archive = repo.archive(db);

    // Validate before anything touches the repository.
    let path2 = path.to_path_buf();
    let (name2, db2) = (name.clone(), db.clone());
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

    // Hash + compress + walk the records in one pass into a spool (zstd's
    // own worker threads compress while this thread reads, hashes and
    // scans).
    let path = path.to_path_buf();
    let scan = walfacts::scan_options(db, &name);
    let (archive2, name2) = (archive.clone(), name.clone());
    let (spool, digest, summary) = tokio::task::spawn_blocking(move || -> Result<_> {
        let file = File::open(&path).map_err(|e| input_error(&path, e))?;
        let size = file.metadata().map_err(|e| input_error(&path, e))?.len();
        let spool = archive2.spool(&name2)?;
        // Written to a temporary object in this directory, named once its
        // checksum is known.
        let place = archive2.describe_dir(&name2);
        let write_err = |e: io::Error| Error::io(Kind::Repository, "write to", &place, &e);
        let mut enc = Encoder::new(spool, encode).map_err(write_err)?;
        enc.set_pledged_size(size)
            .map_err(|e| Error::internal(format!("start compression: {e}")))?;
        let mut scanner = scan.map(WalScanner::new);
        match scanner.as_mut() {
            Some(scanner) => copy_file(file, &mut Tee(&mut enc, scanner), &path, write_err)?,
            None => copy_file(file, &mut enc, &path, write_err)?,
        }
        let (spool, digest) = enc.finish().map_err(write_err)?;
        Ok((spool, digest, scanner.map(WalScanner::finish)))
    })
    .await??;
    if let Some(summary) = &summary {
        walfacts::warn_about(&name, summary);
    }

    // The summary goes beside the content at the same time; it is not
    // needed to restore the segment (backfill rewrites a missing one), so
    // failing to store it only costs a warning.
    let store_data = archive.store_content(spool, &name, &digest);
    let store_summary = async {
        if let Some(summary) = &summary {
            if let Err(e) = archive.store_summary(&name, &digest.sha256, summary).await {
                log::warn!("{name}: record summary not stored ({e}); `pgvault backfill` writes it");
            }
        }
    };
    let (stored, ()) = futures::join!(store_data, store_summary);
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
            pg::history::parse_history(name.timeline(), &text)
                .map_err(|e| Error::invalid_input(format!("not a timeline history file: {e}")))?;
        }
        WalFileKind::BackupLabel => {
            let text = read_small_text(&mut file, size, path)?;
            pg::recovery::check_backup_history(&text)
                .map_err(|e| Error::invalid_input(e.to_string()))?;
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

fn hash_file(path: &Path) -> Result<Digest256> {
    let file = File::open(path).map_err(|e| input_error(path, e))?;
    let mut h = codec::HashingWriter::new(io::sink());
    copy_file(file, &mut h, path, |e| {
        Error::internal(format!("hash {}: {e}", path.display()))
    })?;
    Ok(h.finish().1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;
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
