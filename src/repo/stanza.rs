//! The stanza object: which PostgreSQL cluster a stanza archives.
//!
//! It keeps the history of clusters (one entry per `pg_upgrade`), so that
//! old backups and WAL stay restorable after an upgrade; the newest entry
//! is the one archiving now.

use serde::{Deserialize, Serialize};

use super::layout;
use super::{PutMode, PutOutcome, Repository};
use crate::error::{Error, Kind, Result};

pub const STANZA_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbInfo {
    /// 1 for the first cluster, +1 per upgrade.
    pub id: u32,
    /// Kept as a string: JSON numbers lose precision above 2^53.
    pub system_identifier: String,
    pub pg_version: u32,
    pub wal_segment_size: u32,
    pub pg_control_version: u32,
    pub catalog_version: u32,
}

impl DbInfo {
    pub fn system_id(&self) -> u64 {
        self.system_identifier.parse().unwrap_or(0)
    }
    /// The directory name of this cluster's archive (`15-1`).
    pub fn dir(&self) -> String {
        layout::db_dir_name(self.pg_version, self.id)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StanzaInfo {
    pub format: u32,
    pub stanza: String,
    pub created_at: String,
    /// Oldest first; the last one is current.
    pub dbs: Vec<DbInfo>,
}

impl StanzaInfo {
    pub fn current(&self) -> &DbInfo {
        self.dbs
            .last()
            .expect("a stanza always has at least one cluster")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateOutcome {
    Created,
    AlreadyExists,
}

impl Repository {
    pub async fn read_stanza(&self) -> Result<Option<StanzaInfo>> {
        let info: Option<StanzaInfo> = self.get_json(&layout::stanza_key(self.stanza())).await?;
        if let Some(i) = &info {
            if i.format > STANZA_FORMAT {
                return Err(Error::repository(format!(
                    "stanza {} was written by a newer pgvault (format {})",
                    self.stanza(),
                    i.format
                )));
            }
            if i.dbs.is_empty() {
                return Err(Error::repository(format!(
                    "stanza {} lists no cluster",
                    self.stanza()
                )));
            }
        }
        Ok(info)
    }

    /// The stanza, or an error with a hint to create it.
    pub async fn require_stanza(&self) -> Result<StanzaInfo> {
        self.read_stanza().await?.ok_or_else(|| {
            Error::new(
                Kind::Stanza,
                format!(
                    "stanza {:?} does not exist in {}",
                    self.stanza(),
                    self.describe()
                ),
            )
            .hint(format!(
                "run `pgvault --repo {} --stanza {} stanza-create --pgdata <PGDATA>` first",
                self.location().identity(),
                self.stanza()
            ))
        })
    }

    /// Records the cluster; a no-op when the stanza already records this very
    /// cluster, an error when it records another.
    pub async fn create_stanza(&self, db: DbInfo) -> Result<CreateOutcome> {
        if let Some(existing) = self.read_stanza().await? {
            return same_cluster(self.stanza(), existing.current(), &db)
                .map(|_| CreateOutcome::AlreadyExists);
        }
        let info = StanzaInfo {
            format: STANZA_FORMAT,
            stanza: self.stanza().to_string(),
            created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            dbs: vec![db.clone()],
        };
        match self
            .put_json(
                &layout::stanza_key(self.stanza()),
                &info,
                PutMode::CreateNew,
            )
            .await?
        {
            PutOutcome::Created => Ok(CreateOutcome::Created),
            PutOutcome::AlreadyExists => {
                // Lost a race with another stanza-create: same rules.
                let existing = self.require_stanza().await?;
                same_cluster(self.stanza(), existing.current(), &db)
                    .map(|_| CreateOutcome::AlreadyExists)
            }
        }
    }
}

fn same_cluster(stanza: &str, have: &DbInfo, want: &DbInfo) -> Result<()> {
    if have.system_identifier != want.system_identifier || have.pg_version != want.pg_version {
        return Err(Error::new(
            Kind::Stanza,
            format!(
                "stanza {stanza:?} belongs to another cluster (system identifier {}, PostgreSQL {}), \
                 not this one (system identifier {}, PostgreSQL {})",
                have.system_identifier, have.pg_version, want.system_identifier, want.pg_version
            ),
        )
        .hint("use another --stanza name for this cluster (or stanza-upgrade after pg_upgrade)"));
    }
    if have.wal_segment_size != want.wal_segment_size {
        return Err(Error::new(
            Kind::Stanza,
            format!(
                "stanza {stanza:?} records WAL segments of {} bytes but the cluster uses {}",
                have.wal_segment_size, want.wal_segment_size
            ),
        ));
    }
    Ok(())
}
