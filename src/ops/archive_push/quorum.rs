//! `archive-push` into several repositories: PostgreSQL is told a file is
//! archived once `archive-push-quorum` of them hold it durably; for each
//! of the others it is first queued, durably, in that repository's spool
//! (`spool::Queue`), and the detached pusher ([`super::catchup`]) sends it
//! when the repository answers again.
//!
//! Per repository:
//! * its queue is empty: the file is pushed as with one repository
//!   (look-ahead records included). When the quorum is reached, the others
//!   get [`GRACE`] more to finish; one still not done is queued.
//! * its queue is not empty (it is behind): the file goes to the end of
//!   the queue, untried, so that the repository receives its WAL in the
//!   archiver's order.
//!
//! A file refused for what it is (another cluster's WAL, different bytes
//! archived under its name, a timeline refusal) fails the call whatever
//! the quorum: PostgreSQL must hear of it. Any other failure of a
//! repository (unreachable, a timeout, its stanza missing) only costs it
//! the file's place in its queue — as long as the quorum holds it.
//! Nothing is acknowledged before every repository either holds the file
//! or has it queued durably, or recorded as a gap (`archive-push-queue-max`
//! reached): a gap is never silent.

use std::path::PathBuf;
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};

use super::{archive_push, file_name_of, PushOptions, Pushed};
use crate::catalog::Catalog;
use crate::error::{Error, Kind, Result};
use crate::repo::Repository;
use crate::spool::{Dropped, SpoolDir};

/// How long the repositories not yet done get once the quorum holds the
/// file, before it is queued for them.
pub const GRACE: Duration = Duration::from_secs(2);

/// One of the repositories `archive-push` writes to.
#[derive(Debug, Clone)]
pub struct Target {
    /// Its number (`repo2-…`), for messages.
    pub number: u8,
    pub repo: Repository,
    pub catalog: Option<Catalog>,
    /// Its spool: look-ahead records and its queue.
    pub spool: Option<SpoolDir>,
}

impl Target {
    pub fn describe(&self) -> String {
        format!("repository {} ({})", self.number, self.repo.describe())
    }

    /// Whether files wait in its queue.
    pub fn behind(&self) -> bool {
        self.spool.as_ref().is_some_and(|s| !s.queue().is_empty())
    }

    /// Says, loudly, that `d` left this repository's queue unsent (the
    /// spool recorded it already), and notes it in the catalog.
    pub(super) async fn gap_recorded(&self, d: &Dropped) {
        log::warn!(
            "{}: {} left its archive-push queue unsent ({}): this repository will not have it; gap recorded",
            self.describe(),
            d.name,
            d.reason
        );
        if let Some(cat) = &self.catalog {
            cat.record_gap_best_effort(self.repo.stanza(), d).await;
        }
    }

    /// `opts` with this repository's spool.
    pub(super) fn options(&self, opts: &PushOptions) -> PushOptions {
        PushOptions {
            spool: self.spool.clone(),
            ..opts.clone()
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct QuorumOptions {
    /// Repositories that must hold a file before PostgreSQL is told.
    pub quorum: usize,
    /// `archive-push-queue-max`: most bytes queued per repository.
    pub queue_max: Option<u64>,
}

/// What one call did, per repository.
#[derive(Debug, Clone, Default)]
pub struct QuorumOutcome {
    /// Repositories that hold the file now.
    pub held: Vec<u8>,
    /// Repositories it is queued for.
    pub queued: Vec<u8>,
    /// Files dropped from a repository's queue to stay under the cap (this
    /// one among them when it could not be queued at all).
    pub dropped: Vec<(u8, Dropped)>,
}

/// Whether a repository's failure can wait in its queue: anything but a
/// refusal of the file itself.
pub(super) fn queueable(e: &Error) -> bool {
    !matches!(
        e.kind(),
        Kind::Conflict | Kind::InvalidInput | Kind::Timeline | Kind::Usage
    )
}

/// Archives `opts.path` into `targets` (see the module doc). `opts.spool`
/// is ignored: each target has its own.
pub async fn archive_push_quorum(
    targets: &[Target],
    opts: &PushOptions,
    q: &QuorumOptions,
) -> Result<QuorumOutcome> {
    let shown = opts.path.display().to_string();
    push_inner(targets, opts, q)
        .await
        .map_err(|e| e.context(format!("archive-push {shown}")))
}

async fn push_inner(
    targets: &[Target],
    opts: &PushOptions,
    q: &QuorumOptions,
) -> Result<QuorumOutcome> {
    let name = file_name_of(&opts.path)?;
    let quorum = q.quorum.clamp(1, targets.len());
    let mut out = QuorumOutcome::default();
    // Which are behind, before anything is tried.
    let (behind, inline): (Vec<&Target>, Vec<&Target>) = targets.iter().partition(|t| t.behind());
    let mut pushes: FuturesUnordered<_> = inline
        .iter()
        .map(|t| async move {
            let r = archive_push(&t.repo, t.catalog.as_ref(), &t.options(opts)).await;
            (*t, r)
        })
        .collect();
    let mut tally = Tally {
        name: &name,
        quorum,
        out: &mut out,
        failures: Vec::new(),
        done: 0,
    };
    // Until the quorum holds the file, or cannot any more.
    while tally.out.held.len() < quorum {
        let Some((t, r)) = pushes.next().await else {
            break;
        };
        tally.settle(t, r)?;
    }
    if tally.out.held.len() >= quorum && tally.done < inline.len() {
        // The others get a moment to finish.
        let rest = async {
            while let Some((t, r)) = pushes.next().await {
                tally.settle(t, r)?;
            }
            Ok::<(), Error>(())
        };
        if let Ok(r) = tokio::time::timeout(GRACE, rest).await {
            r?;
        }
    }
    drop(pushes);
    let failures = std::mem::take(&mut tally.failures);
    if out.held.len() < quorum {
        let held = out.held.len();
        let first = failures.into_iter().next();
        let why = match &first {
            Some((n, e)) => format!(": repository {n}: {e}"),
            None => String::new(),
        };
        let mut e = Error::new(
            first.as_ref().map_or(Kind::Repository, |(_, e)| e.kind()),
            format!(
                "{held} of {} repositories hold {name}, {quorum} must (archive-push-quorum){why}",
                targets.len()
            ),
        );
        if !behind.is_empty() {
            let numbers: Vec<String> = behind.iter().map(|t| t.number.to_string()).collect();
            e = e.hint(format!(
                "repository {} is behind (files wait in its spool queue for the pusher); with archive-push-quorum below the number of repositories, PostgreSQL goes on while one is down",
                numbers.join(", ")
            ));
        }
        return Err(e);
    }
    // Everyone that does not hold it now: queued, durably, before
    // PostgreSQL is told.
    let lagging: Vec<&Target> = targets
        .iter()
        .filter(|t| !out.held.contains(&t.number))
        .collect();
    let mut copy: Option<PathBuf> = None;
    for t in lagging {
        let (queued, dropped) = enqueue(t, &name, opts, copy.as_ref(), q.queue_max).await?;
        if queued.is_some() {
            out.queued.push(t.number);
            copy = copy.or(queued);
        }
        for d in dropped {
            t.gap_recorded(&d).await;
            out.dropped.push((t.number, d));
        }
    }
    log::debug!(
        "{name}: held by {:?}, queued for {:?}",
        out.held,
        out.queued
    );
    Ok(out)
}

/// The inline pushes as they finish.
struct Tally<'a> {
    name: &'a crate::pg::WalFileName,
    quorum: usize,
    out: &'a mut QuorumOutcome,
    failures: Vec<(u8, Error)>,
    done: usize,
}

impl Tally<'_> {
    fn settle(&mut self, t: &Target, r: Result<Pushed>) -> Result<()> {
        self.done += 1;
        match r {
            Ok(_) => {
                self.out.held.push(t.number);
                Ok(())
            }
            Err(e) if !queueable(&e) => Err(e.context(t.describe())),
            Err(e) => {
                log::warn!(
                    "{}: {e}; {} is queued for it if {} other(s) hold it",
                    t.describe(),
                    self.name,
                    self.quorum
                );
                self.failures.push((t.number, e));
                Ok(())
            }
        }
    }
}

/// Queues `name` for `t`: copied from `opts.path`, or linked from `copy`
/// (another repository's queued copy). A file that cannot be queued (a
/// full spool) is recorded as a gap instead; only when that fails too is
/// the call refused (PostgreSQL then tries again).
async fn enqueue(
    t: &Target,
    name: &crate::pg::WalFileName,
    opts: &PushOptions,
    copy: Option<&PathBuf>,
    cap: Option<u64>,
) -> Result<(Option<PathBuf>, Vec<Dropped>)> {
    let Some(spool) = &t.spool else {
        return Err(Error::new(
            Kind::Internal,
            format!(
                "{}: does not hold {name} and there is no spool to queue it in",
                t.describe()
            ),
        )
        .hint("set spool-path (a directory the archive_command's user can write)"));
    };
    let queue = spool.queue();
    let (src, link) = match copy {
        Some(c) => (c.clone(), true),
        None => (opts.path.clone(), false),
    };
    let (q2, n2) = (queue.clone(), name.clone());
    let r = tokio::task::spawn_blocking(move || q2.enqueue(&n2, &src, link, cap)).await?;
    match r {
        Ok(e) => Ok((e.queued, e.dropped)),
        Err(e) => {
            let size = std::fs::metadata(&opts.path).map_or(0, |m| m.len());
            let why = format!("not queued: {e}");
            let (q2, n2) = (queue.clone(), name.as_str().to_string());
            match tokio::task::spawn_blocking(move || q2.record_unqueued(&n2, size, why)).await? {
                Ok(d) => Ok((None, vec![d])),
                Err(e2) => Err(Error::io_in(
                    Kind::Internal,
                    format!(
                        "queue {name} for {} ({e}), or record it as a gap",
                        t.describe()
                    ),
                    &e2,
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests;
