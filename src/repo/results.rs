//! Results of `drill` and `verify` runs kept in the repository, so that
//! `info`, `exporter` and `check` can say when recovery was last proven,
//! from any host that reads the repository.
//!
//! One small object per run under `<stanza>/results/<kind>/`, named by
//! when the run finished, so that a listing sorted by name is in time
//! order; each is written once, and only the newest [`RESULTS_KEPT`] are
//! kept (older ones are deleted after a new one is written).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{layout, PutMode, Repository};
use crate::error::Result;

/// Results kept per kind.
pub const RESULTS_KEPT: usize = 30;
pub const RESULT_FORMAT: u32 = 1;

/// Which command's results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResultKind {
    Drill,
    Verify,
}

impl ResultKind {
    fn dir(self) -> &'static str {
        match self {
            ResultKind::Drill => "drill",
            ResultKind::Verify => "verify",
        }
    }
}

/// One phase of a drill, as kept.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PhaseRecord {
    pub name: String,
    pub seconds: f64,
    /// Bytes the phase moved (restored, replayed), when it moves any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

/// One `drill` run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DrillRecord {
    pub format: u32,
    /// UTC, RFC 3339.
    pub started_at: String,
    pub finished_at: String,
    /// Every step worked, every check passed and every objective was met.
    pub passed: bool,
    pub backup: Option<String>,
    /// The recovery target, as PostgreSQL was given it.
    pub target: Option<String>,
    /// The step that failed (`restore`, `recovery`, `amcheck`, …) and what
    /// it said; `None` when none did.
    pub failed_step: Option<String>,
    pub failure: Option<String>,
    /// Restore start to consistent and promoted.
    pub rto_seconds: Option<f64>,
    /// The newest commit archived at the drill's start minus the newest
    /// commit the recovered cluster holds.
    pub rpo_seconds: Option<f64>,
    pub rto_objective_seconds: Option<f64>,
    pub rpo_objective_seconds: Option<f64>,
    pub phases: Vec<PhaseRecord>,
    /// The host the drill ran on.
    pub host: String,
}

/// One `verify` run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VerifyRecord {
    pub format: u32,
    pub started_at: String,
    pub finished_at: String,
    /// No problem found.
    pub passed: bool,
    pub problems: u64,
    pub bytes_read: u64,
    pub objects: u64,
    pub host: String,
}

/// A result's name: its finish time, sortable as text.
fn stamp(finished_at: &chrono::DateTime<chrono::Utc>) -> String {
    finished_at.format("%Y%m%dT%H%M%S%.3fZ").to_string()
}

impl Repository {
    /// Keeps the result of a run that finished at `finished_at`, then
    /// deletes all but the newest [`RESULTS_KEPT`] of its kind.
    pub async fn record_result<T: Serialize>(
        &self,
        kind: ResultKind,
        finished_at: &chrono::DateTime<chrono::Utc>,
        value: &T,
    ) -> Result<()> {
        let key = layout::result_key(self.stanza(), kind.dir(), &stamp(finished_at));
        self.put_json(&key, value, PutMode::Overwrite).await?;
        let keys = self.result_keys(kind).await?;
        if keys.len() > RESULTS_KEPT {
            for old in &keys[..keys.len() - RESULTS_KEPT] {
                self.backend().delete(old).await?;
            }
        }
        Ok(())
    }

    /// The newest result of `kind`, if any run left one.
    pub async fn latest_result<T: DeserializeOwned>(&self, kind: ResultKind) -> Result<Option<T>> {
        match self.result_keys(kind).await?.last() {
            Some(key) => self.get_json(key).await,
            None => Ok(None),
        }
    }

    /// Keys of the kept results of `kind`, oldest first.
    async fn result_keys(&self, kind: ResultKind) -> Result<Vec<String>> {
        let mut keys: Vec<String> = self
            .backend()
            .list(&layout::results_dir(self.stanza(), kind.dir()))
            .await?
            .into_iter()
            .map(|m| m.key)
            .filter(|k| k.ends_with(".pgv"))
            .collect();
        keys.sort();
        Ok(keys)
    }
}

/// This host's name, for results (`uname -n`).
pub fn host_name() -> String {
    // SAFETY: uname fills the struct it is given.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return String::new();
    }
    let bytes: Vec<u8> = u
        .nodename
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(n: usize) -> VerifyRecord {
        VerifyRecord {
            format: RESULT_FORMAT,
            started_at: String::new(),
            finished_at: n.to_string(),
            passed: n % 2 == 0,
            problems: n as u64,
            bytes_read: 0,
            objects: 0,
            host: host_name(),
        }
    }

    #[tokio::test]
    async fn keeps_the_newest_results() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::local_for_tests(dir.path(), "main");
        assert_eq!(
            repo.latest_result::<VerifyRecord>(ResultKind::Verify)
                .await
                .unwrap(),
            None
        );
        let t0 = chrono::DateTime::parse_from_rfc3339("2026-11-26T03:15:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        for n in 0..RESULTS_KEPT + 3 {
            let t = t0 + chrono::Duration::seconds(n as i64 * 3600 * 7);
            repo.record_result(ResultKind::Verify, &t, &record(n))
                .await
                .unwrap();
        }
        let latest: VerifyRecord = repo
            .latest_result(ResultKind::Verify)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(latest, record(RESULTS_KEPT + 2));
        assert_eq!(
            repo.result_keys(ResultKind::Verify).await.unwrap().len(),
            RESULTS_KEPT
        );
        // Kinds are kept apart.
        assert!(repo
            .latest_result::<DrillRecord>(ResultKind::Drill)
            .await
            .unwrap()
            .is_none());
    }
}
