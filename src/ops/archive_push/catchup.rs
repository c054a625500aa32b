//! The catch-up pusher: with several repositories, the detached process
//! `archive-push` starts sends each repository's queue (`spool::Queue`),
//! and pushes ahead (look-ahead) for the repositories that are not behind.
//!
//! Per queue, one pusher (a lock), in the archiver's order: first the gap
//! markers of what was dropped from the queue (so the repository itself
//! says what it missed), then each queued file — pushed exactly as
//! PostgreSQL's own call pushes it, and removed from the queue only once
//! its object and claim are durable. A repository that does not answer is
//! retried with a growing pause (at most [`BACKOFF_MAX`]); after
//! [`GIVE_UP`] without progress the pusher exits, and the next call of
//! PostgreSQL's starts another. A file the repository refuses for good (a
//! different file archived under its name) leaves the queue as a recorded
//! gap.

use std::time::{Duration, Instant};

use super::quorum::{queueable, Target};
use super::{lookahead_wanted, push_ahead, push_one, Caller, PushOptions};
use crate::error::{Error, Kind, Result};
use crate::pg::WalFileName;
use crate::repo::archive::GapMarker;
use crate::repo::DbInfo;
use crate::spool::{Dropped, Queue, Queued};

/// How long a pusher goes on without progress before it exits.
pub const GIVE_UP: Duration = Duration::from_secs(600);
/// The longest pause between two tries of a repository that does not
/// answer.
pub const BACKOFF_MAX: Duration = Duration::from_secs(10);

/// The detached pusher's work with several repositories: catch up those
/// behind, push ahead for the others; returns when every part is done.
pub async fn push_behind(targets: &[Target], opts: &PushOptions) {
    let work = targets.iter().map(|t| async move {
        let r = if t.behind() {
            catch_up(t, opts).await
        } else {
            push_ahead(&t.repo, t.catalog.as_ref(), &t.options(opts)).await
        };
        if let Err(e) = r {
            log::debug!("{}: {e}", t.describe());
        }
    });
    futures::future::join_all(work).await;
}

/// Should PostgreSQL's call start the detached pusher? When a queue has
/// no pusher, or look-ahead has work for a repository that is not behind.
pub fn pusher_wanted(targets: &[Target], opts: &PushOptions) -> bool {
    targets.iter().any(|t| match &t.spool {
        Some(s) if t.behind() => !s.queue().pusher_running(),
        _ => lookahead_wanted(&t.options(opts)),
    })
}

/// Sends `t`'s queue (see the module doc); returns how many files went.
pub async fn catch_up(t: &Target, opts: &PushOptions) -> Result<usize> {
    let Some(spool) = &t.spool else {
        return Ok(0);
    };
    let queue = spool.queue();
    let Some(_lock) = queue
        .try_lock_pusher()
        .map_err(|e| Error::io_in(Kind::Internal, "lock the archive-push queue", &e))?
    else {
        return Ok(0); // one is at work already
    };
    queue.clear_sending();
    let mut db: Option<DbInfo> = None;
    let mut sent = 0;
    let mut backoff = Duration::from_secs(1);
    let mut progress = Instant::now();
    loop {
        match round(t, &queue, opts, &mut db).await {
            Ok(Round::Empty) => return Ok(sent),
            Ok(Round::Sent) => {
                sent += 1;
                backoff = Duration::from_secs(1);
                progress = Instant::now();
            }
            Ok(Round::Other) => {
                backoff = Duration::from_secs(1);
                progress = Instant::now();
            }
            Err(e) => {
                if progress.elapsed() > GIVE_UP {
                    return Err(e.context(format!(
                        "{}: no progress for {}s; the next archive-push starts another pusher",
                        t.describe(),
                        GIVE_UP.as_secs()
                    )));
                }
                log::debug!("{}: {e}; trying again in {backoff:?}", t.describe());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

enum Round {
    /// Nothing left to send.
    Empty,
    /// A file reached the repository.
    Sent,
    /// Progress of another kind: markers written, a refused file recorded.
    Other,
}

/// One step: the pending gap markers, else the first queued file.
async fn round(
    t: &Target,
    queue: &Queue,
    opts: &PushOptions,
    db: &mut Option<DbInfo>,
) -> Result<Round> {
    let db = match db {
        Some(db) => db.clone(),
        None => {
            let stanza = t.repo.require_stanza().await?;
            db.insert(stanza.current().clone()).clone()
        }
    };
    let pending = blocking_queue(queue, |q| Ok(q.pending_gaps())).await?;
    if !pending.is_empty() {
        for d in pending {
            mark(t, &db, queue, &d).await?;
        }
        return Ok(Round::Other);
    }
    let Some(next) = blocking_queue(queue, |q| Ok(q.next())).await? else {
        return Ok(Round::Empty);
    };
    let n2 = next.clone();
    if !blocking_queue(queue, move |q| q.start_sending(&n2)).await? {
        return Ok(Round::Other); // dropped meanwhile
    }
    let caller = Caller::Postgres(opts.superseded);
    match push_one(&t.repo, &db, &next.path, opts.encode, caller).await {
        Ok(pushed) => {
            let n2 = next.clone();
            blocking_queue(queue, move |q| q.sent(&n2)).await?;
            pushed.record_in(t.catalog.as_ref(), &t.repo).await;
            Ok(Round::Sent)
        }
        Err(e) if !queueable(&e) => {
            refused(t, queue, &next, &e).await?;
            Ok(Round::Other)
        }
        Err(e) => Err(e),
    }
}

/// Writes the gap marker of dropped `d` into the repository, then notes
/// that it is there.
async fn mark(t: &Target, db: &DbInfo, queue: &Queue, d: &Dropped) -> Result<()> {
    let Ok(name) = WalFileName::parse(&d.name) else {
        return Ok(());
    };
    let marker = GapMarker {
        dropped_at: d.dropped_at.clone(),
        size: d.size,
        reason: d.reason.clone(),
    };
    t.repo.archive(db).mark_gap(&name, &marker).await?;
    let n = d.name.clone();
    blocking_queue(queue, move |q| q.gap_marked(&n)).await
}

/// The repository refuses `q` for good: a recorded gap, loudly.
async fn refused(t: &Target, queue: &Queue, q: &Queued, e: &Error) -> Result<()> {
    let reason = format!("refused by the repository: {e}");
    let q2 = q.clone();
    let d = blocking_queue(queue, move |queue| queue.refused(&q2, &reason)).await?;
    t.gap_recorded(&d).await;
    Ok(())
}

/// Runs `f` on the queue on a blocking thread (its calls touch the disk
/// and take its lock).
async fn blocking_queue<T: Send + 'static>(
    queue: &Queue,
    f: impl FnOnce(&Queue) -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    let q = queue.clone();
    tokio::task::spawn_blocking(move || f(&q))
        .await?
        .map_err(|e| Error::io_in(Kind::Internal, "archive-push queue", &e))
}
