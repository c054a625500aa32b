//! `verify`: read every object of a stanza and check it; check that every
//! backup's files exist and that the WAL after each backup has no gap; list
//! what killed or failed commands left behind.
//!
//! Every damaged object is reported and verify goes on — a damaged claim,
//! summary, manifest or even the stanza object hides nothing else — and the
//! command exits non-zero (see `cli`) when there is any problem. Leftovers
//! (`repo::orphans`: backup directories without a manifest, temporary
//! files, summaries without their content, an interrupted expire) are
//! listed apart: they are no damage, and `expire` removes them.
//!
//! Safe against a live repository: objects are immutable once written, so
//! an object that appears while verify runs is simply not looked at, and a
//! claim without data yet (a push in flight) is reported only if it is
//! still so at the end.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{self, Read};
use std::sync::Arc;
use std::time::SystemTime;

use futures::stream::{self, StreamExt};
use serde::Serialize;

use crate::catalog::scratch::{self, Groups, Row, Scratch};
use crate::error::{Error, Result};
use crate::ops::gaps;
use crate::ops::progress::Progress;
use crate::ops::walfacts;
use crate::pg::{SegmentNo, TimelineId, WalFileKind, WalFileName};
use crate::repo::archive::Listing;
use crate::repo::blockmap::{self, Ranges};
use crate::repo::blocksums::{BlockSums, Summer};
use crate::repo::chunked;
use crate::repo::codec::{self, Binding, Keys, Sha256Sum};
use crate::repo::filelist::{object_group, split_object_group, LocalFileList};
use crate::repo::layout;
use crate::repo::manifest::{Backups, FileEntry, Manifest};
use crate::repo::orphans::{self, Orphan};
use crate::repo::results::{host_name, ResultKind, VerifyRecord, RESULT_FORMAT};
use crate::repo::{Backend, DbInfo, Fetched, Repository};

#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub process_max: usize,
    /// Seal the plaintext objects of an encrypted stanza first
    /// (`--reencrypt`, `repo::sealing`).
    pub reencrypt: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub schema_version: u32,
    pub stanza: String,
    pub wal_objects: u64,
    pub backups: u64,
    pub backup_objects: u64,
    pub bytes_read: u64,
    pub problems: Vec<Problem>,
    /// What killed or failed commands left behind (not problems: `expire`
    /// removes them).
    pub orphans: Vec<Orphan>,
    /// With `--reencrypt`: how many plaintext objects were sealed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sealed: Option<u64>,
    /// With encryption configured: how much is still plaintext.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encryption: Option<crate::repo::sealing::SealingReport>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    /// `corrupt`, `missing`, `gap`, `conflict`, `unreadable`,
    /// `newer-format` (a manifest written by a newer pgvault),
    /// `damaged-record`, `unknown-object`, `superseded`, `dropped` (WAL
    /// this repository missed: its gap markers), `key` (an encrypted object
    /// the configured key does not open).
    pub kind: String,
    /// The object, file or WAL range concerned.
    pub what: String,
    pub detail: String,
}

fn problem(kind: &str, what: impl Into<String>, detail: impl Into<String>) -> Problem {
    Problem {
        kind: kind.into(),
        what: what.into(),
        detail: detail.into(),
    }
}

/// One object to read and what must hold for it.
enum Job {
    Wal {
        key: String,
        sha: Sha256Sum,
    },
    Backup {
        key: String,
        label: String,
        files: Vec<(FileEntry, Option<SumsCheck>)>,
        /// The backup's block sums (`None`: it has none).
        sums: Option<Arc<BlockSums>>,
    },
}

/// Which block sums a stored file or part must match: those of relation
/// file `rel`, at `blocks` (a part's) or all of them (a whole file).
#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct SumsCheck {
    rel: String,
    blocks: Option<Ranges>,
}

pub async fn verify(
    repo: &Repository,
    opts: &VerifyOptions,
    progress: Arc<dyn Progress>,
) -> Result<VerifyReport> {
    let started = chrono::Utc::now();
    let mut problems = Vec::new();
    let sealed = if opts.reencrypt {
        let lock = repo.lock("verify --reencrypt").await?;
        let n = repo.reencrypt().await;
        lock.release().await?;
        Some(n?)
    } else {
        None
    };
    let backups = repo.backups().await?;
    let dbs = match repo.fetch_stanza().await? {
        Fetched::Found(stanza) => stanza.dbs,
        Fetched::Missing => repo.require_stanza().await?.dbs,
        Fetched::Damaged(why) => {
            problems.push(problem(
                "corrupt",
                format!("{}/{}", repo.describe(), layout::stanza_key(repo.stanza())),
                why,
            ));
            dbs_without_stanza(repo, &backups).await?
        }
    };
    let mut jobs = Vec::new();
    let mut wal_objects = 0;
    let mut seg_sets: Vec<(u32, BTreeMap<TimelineId, BTreeSet<SegmentNo>>)> = Vec::new();
    // Gaps in the WAL after a backup (not needed to make it consistent):
    // while PostgreSQL archives, a segment pushed ahead can land before the
    // one it follows, so these are looked at again at the end, like a claim
    // without its data.
    let mut tail_gaps = Vec::new();
    let mut archives = Vec::new();

    for db in &dbs {
        let archive = repo.archive(db);
        let listing = archive.list().await?;
        // Every claim is read (it names the content that answers), in
        // parallel: one at a time was a round trip per archived name.
        let mut claims: BTreeMap<&WalFileName, _> =
            stream::iter(listing.entries().filter(|(_, e)| e.claimed).map(|(n, _)| n))
                .map(|name| {
                    let archive = &archive;
                    async move { (name, archive.fetch_claim(name).await) }
                })
                .buffer_unordered(opts.process_max.max(1) * 4)
                .collect()
                .await;
        for (name, entry) in listing.entries() {
            if let Some(claim) = claims.remove(name) {
                // A claim the store cannot hand over (a transfer that
                // failed every retry) is not a damaged claim: verify fails
                // on it, as on a listing it cannot read.
                match claim? {
                    Fetched::Found(claim) if entry.content(&claim.sha256).is_none() => {
                        // A push stores its data before its claim, so a
                        // claim without its data is real, never in flight.
                        problems.push(problem(
                            "missing",
                            name.as_str(),
                            format!(
                                "claimed content {} is not in the repository",
                                &claim.sha256.to_hex()[..12]
                            ),
                        ))
                    }
                    Fetched::Found(_) | Fetched::Missing => {}
                    Fetched::Damaged(why) => {
                        problems.push(problem("corrupt", archive.describe_claim(name), why))
                    }
                }
            }
            if entry.is_conflict() {
                problems.push(problem(
                    "conflict",
                    name.as_str(),
                    match entry.answer {
                        Some(sha) => format!(
                            "{} different contents are stored; the claim names {}",
                            entry.contents.len(),
                            &sha.to_hex()[..12]
                        ),
                        None => format!(
                            "{} different contents are stored and no readable claim names one: \
                             the name counts as not archived",
                            entry.contents.len()
                        ),
                    },
                ));
            }
            for c in &entry.contents {
                wal_objects += 1;
                jobs.push(Job::Wal {
                    key: archive.content_key(name, &c.sha),
                    sha: c.sha,
                });
            }
        }
        for m in &listing.unrecognized {
            problems.push(problem(
                "unknown-object",
                format!("{}/{}", repo.describe(), m.key),
                "not an object pgvault writes in the archive",
            ));
        }
        // Without the stanza object the segment size may be unknown: then
        // there is no gap check.
        if db.wal_segment_size > 0 {
            seg_sets.push((db.id, segments(&listing, db.wal_segment_size)));
        }

        // Records that failed their CRC check when they were archived, and
        // summaries that cannot be read.
        let names: Vec<WalFileName> = listing.archived().map(|(n, _)| n.clone()).collect();
        let sums = walfacts::load(&archive, None, &listing, &names).await?;
        for (name, s) in &sums.by_name {
            for lsn in &s.crc_failures {
                problems.push(problem(
                    "damaged-record",
                    name.as_str(),
                    format!("the WAL record at {lsn} fails its CRC-32C check"),
                ));
            }
        }
        for (name, why) in &sums.damaged {
            problems.push(problem(
                "corrupt",
                format!("summary of {name}"),
                why.clone(),
            ));
        }
        for run in gaps::dropped_runs(&archive, &listing).await? {
            problems.push(problem(
                "dropped",
                if run.from == run.to {
                    run.from.clone()
                } else {
                    format!("{} … {}", run.from, run.to)
                },
                run.describe(),
            ));
        }
        let histories = archive.histories_listed(&listing).await?;
        for (fork, files) in walfacts::superseded_wal(&archive, None, &listing, &histories).await? {
            problems.push(problem(
                "superseded",
                format!("timeline {}", fork.timeline),
                format!(
                    "continues {}: {} archived after that (a split brain, or the original of a PITR clone archiving into this stanza; see docs/disaster-recovery.md)",
                    fork.past(),
                    walfacts::names_list(&files)
                ),
            ));
        }
        archives.push((archive, listing));
    }

    // Backups: complete ones (with a readable manifest) are checked file by
    // file; a manifest that cannot be read is a problem of its own.
    for u in &backups.unreadable {
        // Not damaged: written by a newer pgvault, which this one cannot
        // read (not a store that failed either).
        let kind = if u.corrupt { "corrupt" } else { "newer-format" };
        problems.push(problem(
            kind,
            u.object.clone(),
            format!("backup {}: {}", u.label, u.error),
        ));
    }
    for dir in &backups.dirs {
        for o in dir.unknown_objects(repo.stanza()) {
            problems.push(problem(
                "unknown-object",
                format!("{}/{}", repo.describe(), o.key),
                format!("not an object pgvault writes in backup {}", dir.label),
            ));
        }
    }
    let manifests = &backups.manifests;
    // What each backup stored, by object, and the index of every backup's
    // block sums, in one scratch database on disk (issue 14: neither a
    // backup's files nor its sums are ever all in memory).
    let db = Scratch::new(&["pieces", LISTED])?.shared();
    // Each backup's block sums, for the jobs that read its objects.
    let mut block_sums: HashMap<String, Arc<BlockSums>> = HashMap::new();
    for m in manifests {
        // What this backup stored: whole files and its own parts of block
        // maps (the objects of the backups it depends on are checked with
        // those, which must be there), checked against its block sums.
        let sums = match repo
            .read_block_sums_into(&m.label, Some(db.clone()))
            .await?
        {
            Fetched::Found(s) => Some(Arc::new(s)),
            Fetched::Missing => None,
            Fetched::Damaged(why) => {
                problems.push(problem(
                    "corrupt",
                    format!(
                        "{}/{}",
                        repo.describe(),
                        layout::backup_block_sums_key(repo.stanza(), &m.label)
                    ),
                    format!("backup {}: its block sums: {why}", m.label),
                ));
                None
            }
        };
        if let Some(s) = &sums {
            block_sums.insert(m.label.clone(), s.clone());
        }
        // A list the store cannot hand over (a transfer that failed every
        // retry) is not a damaged list: verify fails on it, as on a claim.
        match repo.fetch_file_list(m).await? {
            Fetched::Found(list) => {
                let (label, db) = (m.label.clone(), db.clone());
                let found = tokio::task::spawn_blocking(move || {
                    add_pieces(&db, &label, &list, sums.as_deref())
                })
                .await??;
                problems.extend(found);
            }
            Fetched::Missing => problems.push(problem(
                "missing",
                format!("backup {}", m.label),
                "its file list is missing".to_string(),
            )),
            Fetched::Damaged(why) => problems.push(problem(
                "corrupt",
                format!("backup {}", m.label),
                format!("its file list cannot be read: {why}"),
            )),
        }
        for dep in &m.depends_on {
            if !manifests.iter().any(|o| &o.label == dep) {
                problems.push(problem(
                    "missing-dependency",
                    format!("backup {}", m.label),
                    format!(
                        "depends on backup {dep} (its reference chain), which is not in the repository: it cannot be restored"
                    ),
                ));
            }
        }
        let db = dbs.iter().find(|d| d.id == m.db_id).or(dbs.last());
        if let Some(db) = db {
            if let Some((_, segs)) = seg_sets.iter().find(|(id, _)| *id == db.id) {
                for (p, after) in wal_chain(m, db.wal_segment_size, segs) {
                    match after {
                        Some(range) => tail_gaps.push((db.clone(), m.timeline, range, p)),
                        None => problems.push(p),
                    }
                }
            }
        }
    }

    let listed: Vec<_> = archives.iter().map(|(a, l)| (a, l)).collect();
    let leftovers = orphans::find(repo, &backups, &listed, SystemTime::now()).await?;

    let groups = {
        let db2 = db.clone();
        tokio::task::spawn_blocking(move || -> Result<Groups> {
            lock(&db2)?.index("pieces")?;
            Ok(Groups::heaviest_first(db2, "pieces")?)
        })
        .await??
    };
    let backup_objects = groups.count_groups();
    let stanza = repo.stanza().to_string();
    // One object's pieces at a time, read off the runtime.
    let block_sums = Arc::new(block_sums);
    let backup_jobs = stream::unfold(Some(groups), move |g| {
        let stanza = stanza.clone();
        let block_sums = block_sums.clone();
        async move {
            let mut g = g?;
            let (next, g) = tokio::task::spawn_blocking(move || (g.next(), g))
                .await
                .ok()?;
            let job = next?
                .map_err(Error::from)
                .and_then(|(object, rows)| backup_job(&stanza, &object, &rows, &block_sums));
            Some((job, Some(g)))
        }
    });
    progress.phase("read objects");
    progress.set_total(jobs.len() as u64 + backup_objects, 0);
    let backend = repo.backend().clone();
    let keys = repo.keys().await?;
    let results: Vec<(Vec<Problem>, u64)> = stream::iter(jobs)
        .map(Ok)
        .chain(backup_jobs)
        .map(|job| {
            let backend = backend.clone();
            let progress = progress.clone();
            let keys = keys.clone();
            async move {
                let r = match job {
                    Ok(job) => check_job(backend, job, keys).await,
                    Err(e) => (
                        vec![problem(UNREADABLE, "scratch database", e.to_string())],
                        0,
                    ),
                };
                progress.file_done(r.1);
                r
            }
        })
        .buffer_unordered(opts.process_max.max(1))
        .collect()
        .await;
    let mut bytes_read = 0;
    for (p, n) in results {
        problems.extend(p);
        bytes_read += n;
    }
    problems.extend(still_missing(repo, tail_gaps).await?);
    problems.sort_by(|a, b| (&a.kind, &a.what).cmp(&(&b.kind, &b.what)));
    progress.finish();
    let report = VerifyReport {
        schema_version: 1,
        stanza: repo.stanza().to_string(),
        wal_objects,
        backups: manifests.len() as u64,
        backup_objects,
        bytes_read,
        problems,
        orphans: leftovers,
        sealed,
        encryption: match repo.encryption_configured() {
            true => Some(repo.sealing().await?),
            false => None,
        },
    };
    keep_result(repo, &report, &started).await;
    Ok(report)
}

/// Adds what backup `label` stored itself to table `pieces`, grouped by
/// object (`<label>/<object>`): whole files and its own parts of block
/// maps (the objects of the backups it depends on are checked with those,
/// which must be there).
fn add_pieces(
    db: &scratch::Shared,
    label: &str,
    list: &LocalFileList,
    sums: Option<&BlockSums>,
) -> Result<Vec<Problem>> {
    let mut rows = Vec::new();
    let mut push =
        |db: &scratch::Shared, k: String, f: FileEntry, c: Option<SumsCheck>| -> Result<()> {
            rows.push(Row {
                k: format!("{label}/{k}"),
                g: object_group(label, &f.object),
                o: f.offset as i64,
                w: f.length as i64,
                v: serde_json::to_vec(&(&f, &c))
                    .map_err(|e| Error::internal(format!("serialize: {e}")))?,
            });
            if rows.len() >= BATCH {
                lock(db)?.insert("pieces", &rows)?;
                rows.clear();
            }
            Ok(())
        };
    let check = |rel: &str, blocks: Option<Ranges>| {
        sums?;
        Some(SumsCheck {
            rel: rel.to_string(),
            blocks,
        })
    };
    let mut counts = sums.map(|s| BlockCounts::new(label, s));
    for f in list.iter()? {
        let f = f?;
        if let Some(c) = counts.as_mut() {
            c.file(&f.path, f.size)?;
        }
        for (i, p) in f
            .parts
            .iter()
            .enumerate()
            .filter(|(_, p)| p.backup == label)
        {
            let part = FileEntry {
                path: format!("{} (its changed blocks)", f.path),
                size: p.raw_size,
                sha256: p.sha256.clone(),
                object: p.object.clone(),
                offset: p.offset,
                length: p.length,
                backup: None,
                parts: Vec::new(),
                chunk_blocks: p.chunk_blocks,
                ..f.clone()
            };
            push(
                db,
                format!("{}\0{i}", f.path),
                part,
                check(&f.path, p.blocks.clone()),
            )?;
        }
        if f.parts.is_empty() && f.backup.is_none() {
            let c = check(&f.path, None);
            push(db, f.path.clone(), f, c)?;
        }
    }
    lock(db)?.insert("pieces", &rows)?;
    match counts {
        Some(c) => c.finish(),
        None => Ok(Vec::new()),
    }
}

/// Rows added to the scratch database at once.
const BATCH: usize = 4096;
/// The scratch table of the files each backup's list holds and its block
/// sums name (`<label>/<path>`): what is left of the sums names no file.
const LISTED: &str = "listed";

fn lock(db: &scratch::Shared) -> Result<std::sync::MutexGuard<'_, Scratch>> {
    db.lock()
        .map_err(|_| Error::internal("scratch database: a thread failed holding it"))
}

/// The job that reads one object of a backup (`<label>/<object>`).
fn backup_job(
    stanza: &str,
    object: &str,
    rows: &[Row],
    block_sums: &HashMap<String, Arc<BlockSums>>,
) -> Result<Job> {
    let (label, object) = split_object_group(object)?;
    let files = rows
        .iter()
        .map(|r| {
            serde_json::from_slice::<(FileEntry, Option<SumsCheck>)>(&r.v)
                .map_err(|e| Error::internal(format!("read back {}: {e}", r.k)))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Job::Backup {
        key: layout::backup_object_key(stanza, label, object),
        label: label.to_string(),
        files,
        sums: block_sums.get(label).cloned(),
    })
}

/// Keeps the result in the repository for `info` and the metrics ("last
/// verify"); a failure to keep it is a warning, not a failed verify.
async fn keep_result(repo: &Repository, r: &VerifyReport, started: &chrono::DateTime<chrono::Utc>) {
    let finished = chrono::Utc::now();
    let stamp =
        |t: &chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let record = VerifyRecord {
        format: RESULT_FORMAT,
        started_at: stamp(started),
        finished_at: stamp(&finished),
        passed: r.problems.is_empty(),
        problems: r.problems.len() as u64,
        bytes_read: r.bytes_read,
        objects: r.wal_objects + r.backup_objects,
        host: host_name(),
    };
    if let Err(e) = repo
        .record_result(ResultKind::Verify, &finished, &record)
        .await
    {
        log::warn!("keep this verify's result in the repository: {e}");
    }
}

/// The clusters whose archives the repository holds, when the stanza object
/// that records them cannot be read: from the archive's directories
/// (`<major>-<id>`), with the WAL segment size a backup of each recorded
/// (0, unknown, when none did).
async fn dbs_without_stanza(repo: &Repository, backups: &Backups) -> Result<Vec<DbInfo>> {
    let listed = repo
        .backend()
        .list(&layout::archives_root(repo.stanza()))
        .await?;
    let found: BTreeSet<(u32, u32)> = listed
        .iter()
        .filter_map(|m| layout::parse_db_dir(repo.stanza(), &m.key))
        .collect();
    let mut dbs: Vec<DbInfo> = found
        .into_iter()
        .map(|(major, id)| DbInfo {
            id,
            system_identifier: String::new(),
            pg_version: major,
            wal_segment_size: backups
                .manifests
                .iter()
                .find(|m| m.db_id == id)
                .map_or(0, |m| m.wal_segment_size),
            pg_control_version: 0,
            catalog_version: 0,
        })
        .collect();
    dbs.sort_by_key(|d| d.id);
    Ok(dbs)
}

/// The archived segments of a listing, by timeline.
fn segments(listing: &Listing, seg_size: u32) -> BTreeMap<TimelineId, BTreeSet<SegmentNo>> {
    let mut segs: BTreeMap<TimelineId, BTreeSet<SegmentNo>> = BTreeMap::new();
    for (name, _) in listing.archived() {
        if name.kind() == WalFileKind::Segment {
            if let Some(s) = name.segno(seg_size) {
                segs.entry(name.timeline()).or_default().insert(s);
            }
        }
    }
    segs
}

/// The gaps after backups found at the start that are still there: each
/// archive that had one is listed again.
async fn still_missing(
    repo: &Repository,
    gaps: Vec<(DbInfo, TimelineId, (SegmentNo, SegmentNo), Problem)>,
) -> Result<Vec<Problem>> {
    let mut now: Vec<(u32, BTreeMap<TimelineId, BTreeSet<SegmentNo>>)> = Vec::new();
    let mut out = Vec::new();
    for (db, tli, (from, to), p) in gaps {
        if !now.iter().any(|(id, _)| *id == db.id) {
            let listing = repo.archive(&db).list().await?;
            now.push((db.id, segments(&listing, db.wal_segment_size)));
        }
        let segs = &now
            .iter()
            .find(|(id, _)| *id == db.id)
            .expect("listed above")
            .1;
        let have = segs.get(&tli);
        if (from.0..=to.0).any(|s| !have.is_some_and(|h| h.contains(&SegmentNo(s)))) {
            out.push(p);
        }
    }
    Ok(out)
}

/// The WAL a backup needs (its start to its stop) and the WAL after it on
/// its timeline must have no gap. A gap after the backup comes with its
/// range.
fn wal_chain(
    m: &Manifest,
    seg_size: u32,
    segs: &BTreeMap<TimelineId, BTreeSet<SegmentNo>>,
) -> Vec<(Problem, Option<(SegmentNo, SegmentNo)>)> {
    let mut out = Vec::new();
    let empty = BTreeSet::new();
    let have = segs.get(&m.timeline).unwrap_or(&empty);
    let first = m.start_lsn.segno(seg_size);
    let stop = m.stop_lsn.prev_segno(seg_size).max(first);
    let last = have.iter().next_back().copied().unwrap_or(stop).max(stop);
    let mut s = first;
    while s <= last {
        if !have.contains(&s) {
            let from = s;
            while s <= last && !have.contains(&s) {
                s = s.next();
            }
            let to = SegmentNo(s.0 - 1);
            let name = |x| {
                WalFileName::for_segment(m.timeline, x, seg_size)
                    .as_str()
                    .to_string()
            };
            let (needed, after) = if from <= stop {
                ("needed to make it consistent", None)
            } else {
                ("after it", Some((from, to)))
            };
            let p = problem(
                "gap",
                format!("{} … {}", name(from), name(to)),
                format!("WAL missing for backup {} ({needed})", m.label),
            );
            out.push((p, after));
        }
        s = s.next();
    }
    out
}

/// Each relation file of a backup with block sums has one per block:
/// checked file by file as its list streams by; the files the sums name
/// and the list does not are found in the scratch database (table
/// `listed`), never in a map of the files in memory.
struct BlockCounts<'a> {
    label: &'a str,
    sums: &'a BlockSums,
    /// Listed files with sums, not yet in table `listed`.
    listed: Vec<Row>,
    out: Vec<Problem>,
}

impl<'a> BlockCounts<'a> {
    fn new(label: &'a str, sums: &'a BlockSums) -> Self {
        BlockCounts {
            label,
            sums,
            listed: Vec::new(),
            out: Vec::new(),
        }
    }

    fn sums_err(&self, e: io::Error) -> Error {
        Error::io_in(
            crate::error::Kind::Internal,
            format!("read the block sums of backup {}", self.label),
            &e,
        )
    }

    /// The list's file `rel` of `size` bytes.
    fn file(&mut self, rel: &str, size: u64) -> Result<()> {
        let n = match self.sums.count(rel) {
            Ok(Some(n)) => n,
            Ok(None) => return Ok(()),
            Err(e) => return Err(self.sums_err(e)),
        };
        self.listed.push(Row {
            k: self.sums.listed_key(rel),
            ..Row::default()
        });
        if self.listed.len() >= BATCH {
            self.flush()?;
        }
        let want = blockmap::block_count(size);
        if want != n {
            self.out
                .push(self.mismatch(rel, n, &format!("{want} blocks")));
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        // `replace`: a list that names a path twice is not this check's to
        // fail on.
        lock(self.sums.db())?.replace(LISTED, &self.listed)?;
        self.listed.clear();
        Ok(())
    }

    fn mismatch(&self, rel: &str, n: u32, manifest: &str) -> Problem {
        problem(
            "corrupt",
            rel.to_string(),
            format!(
                "backup {}: its block sums list {n} blocks, the manifest {manifest}",
                self.label
            ),
        )
    }

    /// The problems, with the files the sums list and the list has not.
    fn finish(mut self) -> Result<Vec<Problem>> {
        self.flush()?;
        for r in self.sums.unlisted(LISTED) {
            let (rel, n) = r?;
            let p = self.mismatch(&rel, n, "no such file");
            self.out.push(p);
        }
        Ok(self.out)
    }
}

/// The stored blocks just decoded (summed by `got`) against the backup's
/// block sums.
fn check_sums(
    sums: &BlockSums,
    c: &SumsCheck,
    got: Summer,
    label: &str,
    what: &str,
) -> Vec<Problem> {
    let got = got.finish();
    let want = match sums.get(&c.rel) {
        Ok(Some(w)) => w,
        // Files stored as blocks on a reference without sums have none.
        Ok(None) => return Vec::new(),
        Err(e) => {
            return vec![problem(
                UNREADABLE,
                c.rel.clone(),
                format!("backup {label}: read its block sums: {e}"),
            )]
        }
    };
    let at: Vec<u32> = match &c.blocks {
        None => (0..want.len() as u32).collect(),
        Some(r) => r.iter().flat_map(|&(a, b)| a..=b).collect(),
    };
    let bad: Vec<u32> = at
        .iter()
        .zip(&got)
        .filter(|(&b, s)| want.get(b as usize) != Some(s))
        .map(|(&b, _)| b)
        .collect();
    if bad.is_empty() && at.len() == got.len() {
        return Vec::new();
    }
    vec![problem(
        "corrupt",
        c.rel.clone(),
        format!(
            "backup {label}: {} of {} stored blocks do not match its block sums (first: block {}) ({what})",
            bad.len().max(1),
            got.len(),
            bad.first().map_or("count".to_string(), |b| b.to_string())
        ),
    )]
}

/// Reads one object; returns its problems and the bytes read.
async fn check_job(backend: Arc<dyn Backend>, job: Job, keys: Keys) -> (Vec<Problem>, u64) {
    let key = match &job {
        Job::Wal { key, .. } | Job::Backup { key, .. } => key.clone(),
    };
    let what = format!("{}/{key}", backend.describe());
    let reader = match backend.get(&key).await {
        Ok(Some(r)) => r,
        Ok(None) => {
            let p = match &job {
                Job::Backup { label, files, .. } => problem(
                    "missing",
                    what,
                    format!(
                        "backup {label}: object holding {} file(s) (first: {}) is missing",
                        files.len(),
                        files[0].0.path
                    ),
                ),
                // Listed a moment ago: deleted by expire while we ran.
                Job::Wal { .. } => return (Vec::new(), 0),
            };
            return (vec![p], 0);
        }
        Err(e) => return (vec![problem(UNREADABLE, what, e.to_string())], 0),
    };
    let r = tokio::task::spawn_blocking(move || check_blocking(reader, job, &what, &keys)).await;
    match r {
        Ok(r) => r,
        Err(e) => (vec![problem(UNREADABLE, key, e.to_string())], 0),
    }
}

struct Counted<R> {
    inner: R,
    n: u64,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n += n as u64;
        Ok(n)
    }
}

/// How a problem decoding an object is filed: a key that does not open it
/// is not damage.
fn decode_kind(e: &codec::CodecError) -> &'static str {
    if e.key_problem().is_some() {
        "key"
    } else if e.is_corruption() {
        "corrupt"
    } else {
        // The body broke off or could not be read: nothing says it is
        // damaged.
        UNREADABLE
    }
}

/// The kind of a problem that is not damage: an object the store did not
/// hand over (a transfer that failed every retry, a file that cannot be
/// read).
pub const UNREADABLE: &str = "unreadable";

impl VerifyReport {
    /// The problems that are damage (or its likelihood: a gap, a conflict,
    /// a key that does not open an object) — every one but objects that
    /// could not be read.
    pub fn damage(&self) -> usize {
        self.problems
            .iter()
            .filter(|p| p.kind != UNREADABLE)
            .count()
    }
}

fn check_blocking(
    reader: Box<dyn Read + Send>,
    job: Job,
    what: &str,
    keys: &Keys,
) -> (Vec<Problem>, u64) {
    let mut r = Counted {
        inner: reader,
        n: 0,
    };
    let mut problems = Vec::new();
    match job {
        Job::Wal { sha, ref key } => match codec::decode(
            &mut r,
            io::sink(),
            keys,
            Binding::object(layout::binding_name(key)),
        ) {
            Ok(d) if d.sha256 == sha => {}
            Ok(d) => problems.push(problem(
                "corrupt",
                what,
                format!(
                    "content checksum {} does not match the name's {}",
                    d.sha256, sha
                ),
            )),
            Err(e) => problems.push(problem(decode_kind(&e), what, e.to_string())),
        },
        Job::Backup {
            label,
            files,
            sums,
            key,
        } => {
            let mut pos = 0u64;
            for (f, check) in &files {
                let skip = f.offset.saturating_sub(pos);
                if io::copy(&mut (&mut r).take(skip), &mut io::sink()).is_err() {
                    problems.push(problem(
                        "corrupt",
                        what,
                        format!("backup {label}: cannot read {}", f.path),
                    ));
                    break;
                }
                let mut part = (&mut r).take(f.length);
                let mut summer = Summer::new();
                let bind = Binding::at(&key, f.offset);
                match chunked::decode_piece(
                    &mut part,
                    &mut summer,
                    f.length,
                    f.size,
                    f.chunk_blocks,
                    keys,
                    bind,
                ) {
                    Ok(d) if d.sha256.to_hex() == f.sha256 && d.size == f.size => {
                        if let (Some(c), Some(s)) = (check, &sums) {
                            problems.extend(check_sums(s, c, summer, &label, what));
                        }
                    }
                    Ok(_) => problems.push(problem(
                        "corrupt",
                        f.path.clone(),
                        format!("backup {label}: content does not match the manifest ({what})"),
                    )),
                    Err(e) => problems.push(problem(
                        decode_kind(&e),
                        f.path.clone(),
                        format!("backup {label}: {e} ({what})"),
                    )),
                }
                let _ = io::copy(&mut part, &mut io::sink());
                pos = f.offset + f.length;
            }
        }
    }
    (problems, r.n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::blocksums::{block_sum, SumsSink};
    use crate::repo::codec::EncodeOptions;

    fn file(path: &str, size: u64) -> FileEntry {
        FileEntry {
            path: path.into(),
            size,
            mtime: 0,
            mode: 0o600,
            sha256: String::new(),
            object: "data/00-000000.pgv".into(),
            offset: 0,
            length: 10,
            backup: None,
            parts: Vec::new(),
            chunk_blocks: None,
        }
    }

    /// Each backup's block counts are checked against its list, in one
    /// scratch database for all backups: a file with another count, and a
    /// file the sums name and the list does not, are problems of that
    /// backup only.
    #[tokio::test]
    async fn block_counts_per_backup_in_one_scratch_database() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::local_for_tests(dir.path(), "s");
        let s = block_sum(b"x");
        for (label, recs) in [
            ("L", vec![("base/1/2", 2), ("base/1/3", 1), ("base/1/4", 1)]),
            ("M", vec![("base/1/3", 1)]),
        ] {
            let mut sink = SumsSink::new().unwrap();
            for (p, n) in recs {
                sink.add(p, &vec![s; n]).unwrap();
            }
            repo.write_block_sums(label, vec![sink], EncodeOptions::default())
                .await
                .unwrap();
        }
        let db = Scratch::new(&["pieces", LISTED]).unwrap().shared();
        let mut found = Vec::new();
        for (label, files) in [
            ("L", vec![file("base/1/2", 8192), file("base/1/4", 8192)]),
            ("M", vec![file("base/1/3", 8192)]),
        ] {
            let Fetched::Found(sums) = repo
                .read_block_sums_into(label, Some(db.clone()))
                .await
                .unwrap()
            else {
                panic!("the sums of {label}");
            };
            let list = LocalFileList::from_entries(&files, label).unwrap();
            found.push(add_pieces(&db, label, &list, Some(&sums)).unwrap());
        }
        let details: Vec<(&str, &str)> = found[0]
            .iter()
            .map(|p| (p.what.as_str(), p.detail.as_str()))
            .collect();
        assert_eq!(
            details,
            [
                (
                    "base/1/2",
                    "backup L: its block sums list 2 blocks, the manifest 1 blocks"
                ),
                (
                    "base/1/3",
                    "backup L: its block sums list 1 blocks, the manifest no such file"
                ),
            ]
        );
        assert!(found[1].is_empty(), "{:?}", found[1]);
    }
}
