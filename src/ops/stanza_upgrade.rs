//! `stanza-upgrade`: after `pg_upgrade`, record the new cluster in the
//! stanza, next to the history of the clusters before it.
//!
//! The new cluster (new system identifier, new major, so new WAL magic)
//! becomes the current one with the next id, and archives into its own
//! `<major>-<id>` directory; the old clusters' WAL, whose names repeat in
//! the new cluster's, and their backups stay where they are, restorable
//! with the old PostgreSQL binaries.

use std::path::PathBuf;

use crate::error::Result;
use crate::ops::stanza_create::{db_info, read_cluster};
use crate::repo::{DbInfo, Repository};

#[derive(Debug, Clone)]
pub struct StanzaUpgradeOptions {
    pub pgdata: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeOutcome {
    Upgraded,
    /// The cluster is already the stanza's current one: nothing to do.
    AlreadyCurrent,
}

#[derive(Debug, Clone)]
pub struct StanzaUpgraded {
    pub outcome: UpgradeOutcome,
    /// The cluster archived before (the same as `db` when nothing changed).
    pub previous: DbInfo,
    /// The current cluster now.
    pub db: DbInfo,
}

pub async fn stanza_upgrade(
    repo: &Repository,
    opts: &StanzaUpgradeOptions,
) -> Result<StanzaUpgraded> {
    let context = |e: crate::error::Error| e.context(format!("stanza-upgrade {}", repo.stanza()));
    let cluster = read_cluster(opts.pgdata.clone()).await?;
    let new = db_info(0, &cluster);
    // Read-modify-write under the stanza lock: no backup or expire (nor a
    // second stanza-upgrade) runs while the stanza changes.
    let lock = repo.lock("stanza-upgrade").await.map_err(context)?;
    let result = upgrade_locked(repo, &new).await;
    let released = lock.release().await;
    let done = result.map_err(context)?;
    released.map_err(context)?;
    Ok(done)
}

async fn upgrade_locked(repo: &Repository, new: &DbInfo) -> Result<StanzaUpgraded> {
    let stanza = repo.require_stanza().await?;
    let previous = stanza.current().clone();
    match stanza.upgraded(new)? {
        None => Ok(StanzaUpgraded {
            outcome: UpgradeOutcome::AlreadyCurrent,
            db: previous.clone(),
            previous,
        }),
        Some(next) => {
            repo.replace_stanza(&next).await?;
            Ok(StanzaUpgraded {
                outcome: UpgradeOutcome::Upgraded,
                previous,
                db: next.current().clone(),
            })
        }
    }
}
