//! Look-ahead: a detached pusher that archives the files PostgreSQL has
//! marked `.ready` after the one it asked for, so that its next calls
//! (it calls once per file, serially) return at once.
//!
//! Records of what was pushed live in the spool (`crate::spool`), written
//! only after the object is durable and naming the very file read; a later
//! call is answered from a record only for that file, unchanged, or for a
//! file with the same checksum.

use std::path::Path;
use std::time::Duration;

use super::{file_name_of, hash_file, push_one, Caller, PushOptions, PushOutcome, Pushed};
use crate::catalog::Catalog;
use crate::error::{Error, Kind, Result};
use crate::pg::WalFileName;
use crate::repo::codec::EncodeOptions;
use crate::repo::Repository;
use crate::spool::{FileIdentity, SpoolDir};

/// How long the look-ahead pusher waits for PostgreSQL to take records
/// before it gives up (PostgreSQL may have stopped archiving).
const IDLE_PUSHER: Duration = Duration::from_secs(30);
/// How long PostgreSQL's call waits for the look-ahead pusher to finish
/// the file it asked for, before pushing it itself.
const WAIT_FOR_PUSHER: Duration = Duration::from_secs(300);

/// Was `name` pushed ahead of time (or is it being pushed now: then wait)?
/// Only if the file PostgreSQL gives now has exactly the bytes pushed.
pub(super) async fn pushed_ahead(
    spool: &SpoolDir,
    name: &WalFileName,
    path: &Path,
) -> Result<Option<Pushed>> {
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
        .map_err(|e| Error::io_in(Kind::Internal, "lock the look-ahead spool", &e))?
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
            let r = push_one(repo, &db, &path, encode, Caller::LookAhead).await;
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
                    done.record_in(catalog, repo).await;
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
