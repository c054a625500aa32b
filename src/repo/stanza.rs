//! The stanza object: which PostgreSQL cluster a stanza archives.
//!
//! It keeps the history of clusters (one entry per `pg_upgrade`), so that
//! old backups and WAL stay restorable after an upgrade; the newest entry
//! is the one archiving now.

use serde::{Deserialize, Serialize};

use super::layout;
use super::{Fetched, PutMode, PutOutcome, Repository};
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

    /// The cluster recorded under `id` (a manifest's `db_id`).
    pub fn db(&self, id: u32) -> Option<&DbInfo> {
        self.dbs.iter().find(|d| d.id == id)
    }

    /// The recorded cluster with this system identifier and major, newest
    /// first (after `pg_upgrade` both differ from the old cluster's).
    pub fn db_for_cluster(&self, system_identifier: u64, major: u32) -> Option<&DbInfo> {
        self.dbs
            .iter()
            .rev()
            .find(|d| d.system_id() == system_identifier && d.pg_version == major)
    }

    /// What `stanza-upgrade` does with the cluster `new` (its id is
    /// ignored): `None` when it is already the current one, else the stanza
    /// with `new` appended as the current cluster. Refuses an older cluster
    /// of this stanza and an older major.
    pub fn upgraded(&self, new: &DbInfo) -> Result<Option<StanzaInfo>> {
        let current = self.current();
        if current.system_identifier == new.system_identifier
            && current.pg_version == new.pg_version
        {
            same_cluster(&self.stanza, current, new)?;
            return Ok(None);
        }
        if let Some(old) = self.db_for_cluster(new.system_id(), new.pg_version) {
            return Err(Error::new(
                Kind::Stanza,
                format!(
                    "stanza {:?}: this is its earlier cluster {} (system identifier {}, PostgreSQL {}); \
                     it now archives cluster {} (system identifier {}, PostgreSQL {})",
                    self.stanza,
                    old.id,
                    old.system_identifier,
                    old.pg_version,
                    current.id,
                    current.system_identifier,
                    current.pg_version
                ),
            )
            .hint("pass --pgdata of the upgraded (new) cluster"));
        }
        if new.pg_version < current.pg_version {
            return Err(Error::new(
                Kind::Stanza,
                format!(
                    "stanza {:?} archives PostgreSQL {}, the cluster is PostgreSQL {}: \
                     a stanza cannot be downgraded",
                    self.stanza, current.pg_version, new.pg_version
                ),
            )
            .hint("pass --pgdata of the upgraded cluster, or use another --stanza for this one"));
        }
        let mut next = self.clone();
        let id = self.dbs.iter().map(|d| d.id).max().unwrap_or(0) + 1;
        next.dbs.push(DbInfo { id, ..new.clone() });
        Ok(Some(next))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreateOutcome {
    Created,
    AlreadyExists,
}

impl Repository {
    pub async fn read_stanza(&self) -> Result<Option<StanzaInfo>> {
        self.fetch_stanza().await?.optional()
    }

    /// The stanza object, telling a damaged one (or one this pgvault cannot
    /// read) from a store that cannot be read: `verify` reports the first
    /// and goes on.
    pub async fn fetch_stanza(&self) -> Result<Fetched<StanzaInfo>> {
        let key = layout::stanza_key(self.stanza());
        let what = || format!("{}/{key}", self.describe());
        Ok(match self.fetch_json::<StanzaInfo>(&key).await? {
            Fetched::Found(i) if i.format > STANZA_FORMAT => Fetched::Damaged(format!(
                "{}: written by a newer pgvault (format {})",
                what(),
                i.format
            )),
            Fetched::Found(i) if i.dbs.is_empty() => {
                Fetched::Damaged(format!("{}: lists no cluster", what()))
            }
            other => other,
        })
    }

    /// The stanza, or an error: naming the stanzas the repository does hold
    /// (a misspelled `--stanza`), else with a hint to create it.
    pub async fn require_stanza(&self) -> Result<StanzaInfo> {
        if let Some(info) = self.read_stanza().await? {
            return Ok(info);
        }
        let create = format!(
            "`pgvault --repo {} --stanza {} stanza-create --pgdata <PGDATA>`",
            self.location().identity(),
            self.stanza()
        );
        let missing = |holds: &str| {
            Error::new(
                Kind::Stanza,
                format!(
                    "stanza {:?} does not exist in {}{holds}",
                    self.stanza(),
                    self.describe()
                ),
            )
        };
        // Only to help: a listing that fails leaves the plain message.
        let others = self.stanzas().await.unwrap_or_default();
        Err(match others.as_slice() {
            [] => missing("").hint(format!("run {create} first")),
            [one] => missing(&format!("; it holds stanza {one:?}")).hint(format!(
                "pass --stanza {one}; for a new cluster, run {create}"
            )),
            many => {
                let names: Vec<String> = many.iter().map(|n| format!("{n:?}")).collect();
                missing(&format!("; it holds stanzas {}", names.join(", "))).hint(format!(
                    "pass one of them with --stanza; for a new cluster, run {create}"
                ))
            }
        })
    }

    /// The stanzas of the repository: the names at its root that hold a
    /// stanza object (one level is listed, not the whole repository).
    pub async fn stanzas(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for name in self.backend().list_dirs("").await? {
            if self
                .backend()
                .get(&layout::stanza_key(&name))
                .await?
                .is_some()
            {
                out.push(name);
            }
        }
        Ok(out)
    }

    /// Replaces the stanza object with `info` (one atomic put: a rename on a
    /// local directory, a single PUT on S3). Callers hold the stanza lock
    /// and built `info` from what they read under it.
    pub async fn replace_stanza(&self, info: &StanzaInfo) -> Result<()> {
        self.put_json(&layout::stanza_key(self.stanza()), info, PutMode::Overwrite)
            .await?;
        Ok(())
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
        .hint(
            "use another --stanza name for this cluster; after pg_upgrade run \
             `pgvault stanza-upgrade --pgdata <new PGDATA>` instead",
        ));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn db(id: u32, sysid: &str, major: u32) -> DbInfo {
        DbInfo {
            id,
            system_identifier: sysid.into(),
            pg_version: major,
            wal_segment_size: 1 << 24,
            pg_control_version: 1300,
            catalog_version: 0,
        }
    }

    fn stanza(dbs: Vec<DbInfo>) -> StanzaInfo {
        StanzaInfo {
            format: STANZA_FORMAT,
            stanza: "main".into(),
            created_at: "2026-01-01T00:00:00Z".into(),
            dbs,
        }
    }

    #[test]
    fn upgrade_appends_refuses_older_and_is_idempotent() {
        let s = stanza(vec![db(1, "111", 15)]);
        let up = s.upgraded(&db(0, "222", 16)).unwrap().unwrap();
        assert_eq!(up.dbs.len(), 2);
        assert_eq!(up.current(), &db(2, "222", 16));
        assert_eq!(up.current().dir(), "16-2");
        assert_eq!(up.dbs[0], db(1, "111", 15));
        // Again for the same cluster: nothing to do.
        assert_eq!(up.upgraded(&db(0, "222", 16)).unwrap(), None);
        // The old cluster's data directory by mistake.
        let e = up.upgraded(&db(0, "111", 15)).unwrap_err();
        assert_eq!(e.kind(), Kind::Stanza);
        assert!(e.to_string().contains("earlier cluster 1"), "{e}");
        // Another, older major.
        let e = up.upgraded(&db(0, "333", 14)).unwrap_err();
        assert!(e.to_string().contains("cannot be downgraded"), "{e}");
        // Same major, new cluster (dump and restore): a new entry too.
        let again = up.upgraded(&db(0, "444", 16)).unwrap().unwrap();
        assert_eq!(again.current().dir(), "16-3");
        assert_eq!(again.db_for_cluster(111, 15).map(|d| d.id), Some(1));
        assert_eq!(again.db(2).map(|d| d.pg_version), Some(16));
    }
}
