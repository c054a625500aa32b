//! A lock in the repository, so that two backups of one stanza, or an
//! expire during a backup, never run at once — across hosts, on object
//! stores too.
//!
//! The lock is an object created if absent (`<stanza>/lock/stanza.lock`),
//! naming its holder and an expiry. The holder renews the expiry while it
//! works; a holder that crashed stops renewing, and once its expiry has
//! passed the next taker removes the stale lock and takes it. Expiry is
//! generous (minutes) so clock skew between hosts does not matter.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{PutMode, PutOutcome, Repository};
use crate::error::{Error, Kind, Result};

/// How long a lock stays valid without renewal.
pub const LOCK_TTL: Duration = Duration::from_secs(300);
/// How often the holder renews it.
const RENEW_EVERY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LockInfo {
    pub command: String,
    pub host: String,
    pub pid: u32,
    pub token: String,
    pub acquired_at: String,
    /// Unix seconds.
    pub expires_at: i64,
}

/// A held lock; released on drop (best effort) or by [`Lock::release`].
pub struct Lock {
    repo: Repository,
    key: String,
    token: String,
    stop: Option<watch::Sender<bool>>,
}

fn lock_key(stanza: &str) -> String {
    format!("{stanza}/lock/stanza.lock")
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown-host".into())
}

impl Repository {
    /// Takes the stanza lock for `command`, or fails naming the holder.
    pub async fn lock(&self, command: &str) -> Result<Lock> {
        self.lock_with_ttl(command, LOCK_TTL).await
    }

    pub async fn lock_with_ttl(&self, command: &str, ttl: Duration) -> Result<Lock> {
        let key = lock_key(self.stanza());
        let now = chrono::Utc::now();
        let token = format!(
            "{}-{}-{}",
            hostname(),
            std::process::id(),
            now.timestamp_nanos_opt().unwrap_or(0)
        );
        let info = LockInfo {
            command: command.to_string(),
            host: hostname(),
            pid: std::process::id(),
            token: token.clone(),
            acquired_at: now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            expires_at: now.timestamp() + ttl.as_secs() as i64,
        };
        for _ in 0..2 {
            if self.put_json(&key, &info, PutMode::CreateNew).await? == PutOutcome::Created {
                // Read back: on stores whose create is not atomic, the last
                // writer wins and only it may proceed.
                let held: Option<LockInfo> = self.get_json(&key).await?;
                if held.as_ref().map(|h| &h.token) == Some(&token) {
                    return Ok(self.start_renewal(key, info, ttl));
                }
            }
            let Some(holder) = self.get_json::<LockInfo>(&key).await? else {
                continue; // released meanwhile: try again
            };
            if holder.expires_at < chrono::Utc::now().timestamp() {
                log::warn!(
                    "removing a stale lock of {} (pid {} on {}, expired at {})",
                    holder.command,
                    holder.pid,
                    holder.host,
                    holder.expires_at
                );
                self.backend().delete(&key).await?;
                continue;
            }
            return Err(Error::new(
                Kind::Locked,
                format!(
                    "stanza {:?} is locked by {} (pid {} on {}, since {})",
                    self.stanza(),
                    holder.command,
                    holder.pid,
                    holder.host,
                    holder.acquired_at
                ),
            )
            .hint("wait for it to finish; a lock whose holder died expires by itself within 5 minutes"));
        }
        Err(Error::new(
            Kind::Locked,
            format!("could not take the lock of stanza {:?}", self.stanza()),
        ))
    }

    fn start_renewal(&self, key: String, info: LockInfo, ttl: Duration) -> Lock {
        let (tx, mut rx) = watch::channel(false);
        let token = info.token.clone();
        let repo = self.clone();
        let key2 = key.clone();
        tokio::spawn(async move {
            let every = RENEW_EVERY.min(ttl / 3);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = rx.changed() => return,
                }
                let mut renewed = info.clone();
                renewed.expires_at = chrono::Utc::now().timestamp() + ttl.as_secs() as i64;
                if let Err(e) = repo.put_json(&key2, &renewed, PutMode::Overwrite).await {
                    log::warn!("renew the stanza lock: {e}");
                }
            }
        });
        Lock {
            repo: self.clone(),
            key,
            token,
            stop: Some(tx),
        }
    }
}

impl Lock {
    /// Releases the lock (only if it is still ours).
    pub async fn release(mut self) -> Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(true);
        }
        let held: Option<LockInfo> = self.repo.get_json(&self.key).await?;
        if held.is_some_and(|h| h.token == self.token) {
            self.repo.backend().delete(&self.key).await?;
        }
        Ok(())
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::s3::S3Options;
    use crate::repo::RepoLocation;

    #[tokio::test]
    async fn one_holder_named_and_stale_locks_expire() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open(
            RepoLocation::Local(dir.path().into()),
            "s",
            &S3Options::default(),
        )
        .unwrap();
        let held = repo.lock("backup").await.unwrap();
        let e = repo.lock("expire").await.err().unwrap();
        assert_eq!(e.kind(), Kind::Locked);
        assert!(e.to_string().contains("locked by backup"), "{e}");
        assert!(
            e.to_string()
                .contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        held.release().await.unwrap();
        let again = repo.lock("expire").await.unwrap();
        // A holder that died: its lock is never renewed and expires.
        std::mem::forget(again);
        let e = repo.lock("backup").await.err().unwrap();
        assert_eq!(e.kind(), Kind::Locked);
        let key = lock_key("s");
        let mut stale: LockInfo = repo.get_json(&key).await.unwrap().unwrap();
        stale.expires_at = chrono::Utc::now().timestamp() - 1;
        repo.put_json(&key, &stale, PutMode::Overwrite)
            .await
            .unwrap();
        repo.lock("backup").await.unwrap().release().await.unwrap();
    }
}
