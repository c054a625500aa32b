//! `stanza-create`: record the cluster in `--pgdata` in the repository.

use std::path::PathBuf;

use crate::error::{Error, Kind, Result};
use crate::pg::control::{read_cluster_info, ClusterInfo};
use crate::repo::stanza::CreateOutcome;
use crate::repo::{DbInfo, PutMode, PutOutcome, Repository};

#[derive(Debug, Clone)]
pub struct StanzaCreateOptions {
    pub pgdata: PathBuf,
}

#[derive(Debug, Clone)]
pub struct StanzaCreated {
    pub outcome: CreateOutcome,
    pub db: DbInfo,
}

/// Reads `PG_VERSION` and `global/pg_control` (blocking, off the runtime).
pub async fn read_cluster(pgdata: PathBuf) -> Result<ClusterInfo> {
    let shown = pgdata.display().to_string();
    tokio::task::spawn_blocking(move || read_cluster_info(&pgdata))
        .await?
        .map_err(|e| {
            Error::new(Kind::InvalidInput, e.to_string()).hint(format!(
                "--pgdata must be a PostgreSQL data directory ({shown})"
            ))
        })
}

pub fn db_info(id: u32, cluster: &ClusterInfo) -> DbInfo {
    DbInfo {
        id,
        system_identifier: cluster.control.system_identifier.to_string(),
        pg_version: cluster.major,
        wal_segment_size: cluster.control.wal_segment_size,
        pg_control_version: cluster.control.pg_control_version,
        catalog_version: cluster.control.catalog_version_no,
    }
}

/// Checks that the store refuses a second create of one key, as
/// `atomic_create` promises. A store that ignores `If-None-Match` would let
/// a second, different WAL file win silently; it needs
/// `s3-atomic-create = false`. (A store that checks the condition but not
/// atomically cannot be caught by a probe: see docs/repository-format.md.)
async fn probe_create_if_absent(repo: &Repository) -> Result<()> {
    if !repo.backend().atomic_create() {
        return Ok(());
    }
    let key = format!(
        "{}/probe-{}-{}",
        repo.stanza(),
        std::process::id(),
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
    );
    let first = repo.put_encoded(&key, b"1", PutMode::CreateNew).await?;
    let second = repo.put_encoded(&key, b"2", PutMode::CreateNew).await;
    repo.backend().delete(&key).await?;
    match (first, second?) {
        (PutOutcome::Created, PutOutcome::AlreadyExists) => Ok(()),
        _ => Err(Error::usage(format!(
            "{} does not refuse a second create of the same object (it ignores If-None-Match)",
            repo.describe()
        ))
        .hint("set s3-atomic-create = false for this store: pgvault then detects racing pushes itself")),
    }
}

pub async fn stanza_create(repo: &Repository, opts: &StanzaCreateOptions) -> Result<StanzaCreated> {
    probe_create_if_absent(repo)
        .await
        .map_err(|e| e.context(format!("stanza-create {}", repo.stanza())))?;
    let cluster = read_cluster(opts.pgdata.clone()).await?;
    let db = db_info(1, &cluster);
    let outcome = repo
        .create_stanza(db.clone())
        .await
        .map_err(|e| e.context(format!("stanza-create {}", repo.stanza())))?;
    Ok(StanzaCreated { outcome, db })
}
