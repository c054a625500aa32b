//! `stanza-create`: record the cluster in `--pgdata` in the repository.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Kind, Result};
use crate::pg::control::{read_cluster_info, ClusterInfo};
use crate::repo::local::user_name;
use crate::repo::stanza::CreateOutcome;
use crate::repo::{DbInfo, PutMode, PutOutcome, RepoLocation, Repository};

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

/// A local repository must belong to the user who owns the data directory:
/// that is the PostgreSQL server's user, whose archive_command writes every
/// WAL file into it. A repository that root (or anyone else) owns would let
/// stanza-create succeed and every archive-push after it fail.
async fn check_owner(repo: &Repository, pgdata: &Path) -> Result<()> {
    let RepoLocation::Local(root) = repo.location() else {
        return Ok(());
    };
    let (root, pgdata) = (root.clone(), pgdata.to_path_buf());
    tokio::task::spawn_blocking(move || {
        // A data directory that cannot be read is reported by read_cluster.
        let Ok(data) = std::fs::metadata(&pgdata) else {
            return Ok(());
        };
        let (repo_uid, how) = match std::fs::metadata(&root) {
            Ok(m) => (m.uid(), "belongs to"),
            // It would be created by this process, for its user.
            // SAFETY: geteuid has no preconditions and cannot fail.
            Err(_) => (unsafe { libc::geteuid() }, "would be created for"),
        };
        if repo_uid == data.uid() {
            return Ok(());
        }
        let pg_user = user_name(data.uid());
        let login = pg_user.split(' ').next().unwrap_or(&pg_user).to_string();
        Err(Error::usage(format!(
            "the repository {} {how} {}, but the data directory {} belongs to {pg_user}: \
             the PostgreSQL server's archive_command, which runs as {pg_user}, could not write to it",
            root.display(),
            user_name(repo_uid),
            pgdata.display()
        ))
        .hint(format!(
            "create the repository as the PostgreSQL server's user, owner-only: \
             `install -d -o {login} -m 700 {}` (or chown an existing one to {login}), \
             and run pgvault as {login}",
            root.display()
        )))
    })
    .await?
}

pub async fn stanza_create(repo: &Repository, opts: &StanzaCreateOptions) -> Result<StanzaCreated> {
    check_owner(repo, &opts.pgdata)
        .await
        .map_err(|e| e.context(format!("stanza-create {}", repo.stanza())))?;
    let cluster = read_cluster(opts.pgdata.clone()).await?;
    // The key object first: every object after it is sealed (the probe's
    // and the stanza object too). On an existing stanza this turns
    // encryption on; its older objects stay readable.
    if repo.encryption_configured() {
        let sealed = async {
            if repo.init_keys().await? {
                repo.seal_stanza_object().await?;
            }
            Ok::<_, Error>(())
        };
        sealed
            .await
            .map_err(|e| e.context(format!("stanza-create {}", repo.stanza())))?;
    }
    probe_create_if_absent(repo)
        .await
        .map_err(|e| e.context(format!("stanza-create {}", repo.stanza())))?;
    let db = db_info(1, &cluster);
    let outcome = repo
        .create_stanza(db.clone())
        .await
        .map_err(|e| e.context(format!("stanza-create {}", repo.stanza())))?;
    Ok(StanzaCreated { outcome, db })
}
