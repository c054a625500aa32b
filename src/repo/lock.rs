//! A lock in the repository, so that two backups of one stanza, or an
//! expire during a backup, never run at once — across hosts, on object
//! stores too.
//!
//! The lock is one object (`<stanza>/lock/stanza.lock`) naming its holder
//! and an expiry: a lease. Every change to it is conditional on the version
//! the changer read, so two processes can never both believe they hold it:
//!
//! - taking a free lock is a create-if-absent;
//! - taking over a stale one (expired, or naming a process of this host
//!   that no longer exists) replaces exactly the version that was judged
//!   stale ([`PutMode::Update`]); a second taker's update is refused;
//! - renewing replaces exactly the version the holder last wrote; when that
//!   is refused, someone took the lock over, and the holder stops: the
//!   repository's writes are fenced (see `fence.rs`), so a holder paused
//!   past its expiry (SIGSTOP, a VM freeze) writes nothing more, and its
//!   error names the new holder.
//!
//! On stores whose conditional writes are not atomic each change is read
//! back after a pause ([`Backend::put_versioned`]), as archive-push's claims
//! are. Expiry is generous (minutes) so clock skew between hosts does not
//! matter; a holder renews every minute.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::backend::{Backend, ObjectVersion, PutMode, PutResult};
use super::codec::{self, Binding, EncodeOptions, Keys};
use super::fence::{Gate, Guard};
use super::Repository;
use crate::error::{Error, Kind, Result};

/// How long a lock stays valid without renewal.
pub const LOCK_TTL: Duration = Duration::from_secs(300);
/// How often the holder renews it (at most; a third of the TTL when that is
/// shorter).
const RENEW_EVERY: Duration = Duration::from_secs(60);
/// Test-only: a shorter TTL, in seconds, for tests that pause a holder.
pub const TTL_VARIABLE: &str = "PGVAULT_TEST_LOCK_TTL";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LockInfo {
    pub command: String,
    pub host: String,
    pub pid: u32,
    pub token: String,
    pub acquired_at: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// This host's boot, so that a pid is only judged on the host (and
    /// boot) it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// The pid namespace, so that a container's pid is not looked up in
    /// another one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_ns: Option<String>,
    /// When the holder process started (clock ticks since boot), so that a
    /// reused pid is not taken for the holder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_start: Option<u64>,
}

impl LockInfo {
    /// "backup (pid 812 on db1, since 2025-06-01T03:00:00Z)".
    pub fn holder(&self) -> String {
        format!(
            "{} (pid {} on {}, since {})",
            self.command, self.pid, self.host, self.acquired_at
        )
    }

    /// When it expires, as a time and relative to now.
    pub fn expiry(&self) -> String {
        let now = chrono::Utc::now().timestamp();
        let at = rfc3339(self.expires_at);
        if self.expires_at >= now {
            format!("{at}, in {}", human_secs(self.expires_at - now))
        } else {
            format!("{at}, {} ago", human_secs(now - self.expires_at))
        }
    }
}

/// Unix seconds as RFC 3339 (UTC).
pub fn rfc3339(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| format!("{unix} (not a valid time)"))
}

/// "4m12s", "2h05m", "9s".
pub fn human_secs(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

fn human(d: Duration) -> String {
    human_secs(d.as_secs() as i64)
}

/// Who this process is, as a lock records it.
struct Me {
    host: String,
    boot_id: Option<String>,
    pid_ns: Option<String>,
}

fn me() -> Me {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_string())
    };
    Me {
        host: read("/proc/sys/kernel/hostname").unwrap_or_else(|| "unknown-host".into()),
        boot_id: read("/proc/sys/kernel/random/boot_id"),
        pid_ns: std::fs::read_link("/proc/self/ns/pid")
            .ok()
            .map(|p| p.display().to_string()),
    }
}

/// Field 22 of `/proc/<pid>/stat`: the process's start time.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count
    // from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` names no live process here (or a newer one that reused it).
fn process_gone(pid: u32, start: Option<u64>) -> bool {
    let Ok(pid_t) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks that the process exists.
    if unsafe { libc::kill(pid_t, 0) } != 0 {
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
    }
    match (start, process_start(pid)) {
        (Some(recorded), Some(now)) => recorded != now,
        _ => false,
    }
}

/// Why a held lock may be taken over, if it may.
fn stale_because(holder: &LockInfo, me: &Me) -> Option<String> {
    let now = chrono::Utc::now().timestamp();
    if holder.expires_at < now {
        return Some(format!("it expired at {}", holder.expiry()));
    }
    let same_machine = holder.host == me.host
        && holder.boot_id.is_some()
        && holder.boot_id == me.boot_id
        && holder.pid_ns.is_some()
        && holder.pid_ns == me.pid_ns;
    if same_machine && process_gone(holder.pid, holder.pid_start) {
        return Some(format!(
            "process {} no longer exists on this host",
            holder.pid
        ));
    }
    None
}

fn lock_key(stanza: &str) -> String {
    format!("{stanza}/lock/stanza.lock")
}

/// Sealed like every object when the repository is encrypted: it names
/// hosts and commands.
fn encode(info: &LockInfo, keys: &Keys, key: &str) -> Result<Bytes> {
    let json = serde_json::to_vec_pretty(info)
        .map_err(|e| Error::internal(format!("serialize the lock: {e}")))?;
    codec::encode_bytes(&json, EncodeOptions::default(), keys, Binding::object(key))
        .map(Bytes::from)
        .map_err(|e| Error::internal(format!("encode the lock: {e}")))
}

fn decode(what: &str, bytes: &[u8], keys: &Keys, key: &str) -> Result<LockInfo> {
    let unreadable = |e: String| {
        Error::repository(format!("{what}: unreadable lock: {e}"))
            .hint("if no pgvault command is running on this stanza, delete the lock object")
    };
    let json = codec::decode_bytes(bytes, keys, Binding::object(key)).map_err(|e| {
        match e.key_problem() {
            Some(k) => super::keys::key_error(what, k),
            None => unreadable(e.to_string()),
        }
    })?;
    serde_json::from_slice(&json).map_err(|e| unreadable(e.to_string()))
}

/// The TTL: [`LOCK_TTL`], or a shorter one that tests set.
fn ttl() -> Duration {
    std::env::var(TTL_VARIABLE)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map(Duration::from_secs)
        .unwrap_or(LOCK_TTL)
}

impl Repository {
    /// Takes the stanza lock for `command`, or fails naming the holder.
    pub async fn lock(&self, command: &str) -> Result<Lock> {
        self.lock_with_ttl(command, ttl()).await
    }

    pub async fn lock_with_ttl(&self, command: &str, ttl: Duration) -> Result<Lock> {
        let key = lock_key(self.stanza());
        let what = format!("{}/{key}", self.describe());
        let raw = self.raw.clone();
        let keys = self.keys().await?;
        let me = me();
        let token = {
            use std::sync::atomic::{AtomicU64, Ordering};
            static N: AtomicU64 = AtomicU64::new(0);
            format!(
                "{}-{}-{}-{}",
                me.host,
                std::process::id(),
                chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0),
                N.fetch_add(1, Ordering::Relaxed)
            )
        };
        const TRIES: usize = 5;
        for _ in 0..TRIES {
            let now = chrono::Utc::now();
            let info = LockInfo {
                command: command.to_string(),
                host: me.host.clone(),
                pid: std::process::id(),
                token: token.clone(),
                acquired_at: now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                expires_at: now.timestamp() + ttl.as_secs() as i64,
                boot_id: me.boot_id.clone(),
                pid_ns: me.pid_ns.clone(),
                pid_start: process_start(std::process::id()),
            };
            let mode = match raw.get_versioned(&key).await? {
                None => PutMode::CreateNew,
                Some((bytes, version)) => {
                    let holder = decode(&what, &bytes, &keys, &key)?;
                    if holder.token == token {
                        // An earlier attempt of ours did land.
                        return Ok(self.hold(key, keys, holder, version, ttl));
                    }
                    let Some(why) = stale_because(&holder, &me) else {
                        return Err(locked(self.stanza(), &holder));
                    };
                    log::warn!("taking over a stale lock of {}: {why}", holder.holder());
                    PutMode::Update(version)
                }
            };
            match raw
                .put_versioned(&key, encode(&info, &keys, &key)?, mode)
                .await?
            {
                PutResult::Written(version) => return Ok(self.hold(key, keys, info, version, ttl)),
                // Someone else created, renewed or took it first: look again.
                PutResult::Refused => continue,
            }
        }
        Err(Error::new(
            Kind::Locked,
            format!(
                "could not take the lock of stanza {:?}: it changed hands {TRIES} times while trying",
                self.stanza()
            ),
        )
        .hint("another pgvault command is taking it right now; try again"))
    }

    fn hold(
        &self,
        key: String,
        keys: Keys,
        info: LockInfo,
        version: ObjectVersion,
        ttl: Duration,
    ) -> Lock {
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let (lost_tx, lost_rx) = watch::channel(false);
        let held = Arc::new(Held {
            raw: self.raw.clone(),
            what: format!("{}/{key}", self.describe()),
            key,
            keys,
            stanza: self.stanza().to_string(),
            ttl,
            lost_tx,
            state: tokio::sync::Mutex::new(State {
                info,
                version,
                renewed: Instant::now(),
                lost: None,
            }),
        });
        let renewer = held.clone();
        tokio::spawn(async move {
            let every = RENEW_EVERY.min(renewer.ttl / 3);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop_rx.changed() => return,
                }
                let mut st = renewer.state.lock().await;
                match renewer.renew(&mut st).await {
                    Ok(()) => {}
                    // The command's next write fails with the error; a
                    // warning says when it was found.
                    Err(e) if st.lost.is_some() => {
                        log::warn!("{e}");
                        return;
                    }
                    Err(e) => log::warn!("renew the stanza lock: {e}"),
                }
            }
        });
        let guard: Arc<dyn Guard> = held.clone();
        self.gate.set(guard.clone());
        Lock {
            held,
            gate: self.gate.clone(),
            guard,
            stop: Some(stop_tx),
            lost: lost_rx,
        }
    }
}

/// The error for a lock that someone else holds.
fn locked(stanza: &str, holder: &LockInfo) -> Error {
    Error::new(
        Kind::Locked,
        format!(
            "stanza {stanza:?} is locked by {}; it expires at {} unless renewed",
            holder.holder(),
            holder.expiry()
        ),
    )
    .hint(
        "wait for it to finish; the lock of a holder that died is taken over at once \
         on its own host, elsewhere once it expires (5 minutes after its last renewal)",
    )
}

/// The shared state of a held lock: renewed by a task, asked before writes.
struct Held {
    raw: Arc<dyn Backend>,
    key: String,
    keys: Keys,
    what: String,
    stanza: String,
    ttl: Duration,
    lost_tx: watch::Sender<bool>,
    state: tokio::sync::Mutex<State>,
}

struct State {
    info: LockInfo,
    /// The version of the lock object we last wrote.
    version: ObjectVersion,
    /// When that write was made (a monotonic clock: a pause counts).
    renewed: Instant,
    /// Why the lock is no longer ours, once that is known.
    lost: Option<String>,
}

impl Held {
    fn lost_error(&self, why: &str, before: &str) -> Error {
        Error::new(
            Kind::Locked,
            format!(
                "lost the lock of stanza {:?} before writing {before}: {why}",
                self.stanza
            ),
        )
        .hint(format!(
            "this command was paused or cut off from the repository for longer than the \
             lock's {}; it stopped without writing more: run it again when the other \
             command is done",
            human(self.ttl)
        ))
    }

    fn mark_lost(&self, st: &mut State, why: String) -> Error {
        let e = self.lost_error(&why, "anything more");
        st.lost = Some(why);
        let _ = self.lost_tx.send(true);
        e
    }

    /// Extends the lease, conditionally on it still being the version we
    /// wrote. An error with `st.lost` set means the lock is gone for good;
    /// without, the renewal failed and may be tried again.
    async fn renew(&self, st: &mut State) -> Result<()> {
        if let Some(why) = &st.lost {
            return Err(self.lost_error(why, "anything more"));
        }
        let mut next = st.info.clone();
        next.expires_at = chrono::Utc::now().timestamp() + self.ttl.as_secs() as i64;
        let put = self
            .raw
            .put_versioned(
                &self.key,
                encode(&next, &self.keys, &self.key)?,
                PutMode::Update(st.version.clone()),
            )
            .await;
        match put {
            Ok(PutResult::Written(v)) => {
                st.info = next;
                st.version = v;
                st.renewed = Instant::now();
                Ok(())
            }
            Ok(PutResult::Refused) => {
                let why = match self.raw.get_versioned(&self.key).await {
                    Ok(Some((bytes, _))) => match decode(&self.what, &bytes, &self.keys, &self.key)
                    {
                        Ok(h) => format!(
                            "it was taken over by {} (expires at {})",
                            h.holder(),
                            h.expiry()
                        ),
                        Err(e) => format!("it was replaced by something unreadable ({e})"),
                    },
                    Ok(None) => format!("{} was removed", self.what),
                    Err(e) => format!("it changed, and reading it failed ({e})"),
                };
                Err(self.mark_lost(st, why))
            }
            Err(e) if st.renewed.elapsed() >= self.ttl => Err(self.mark_lost(
                st,
                format!("it could not be renewed for {} ({e})", human(self.ttl)),
            )),
            Err(e) => Err(e),
        }
    }
}

#[async_trait]
impl Guard for Held {
    async fn before_write(&self, what: &str) -> Result<()> {
        let mut st = self.state.lock().await;
        if let Some(why) = &st.lost {
            return Err(self.lost_error(why, what));
        }
        // The renewal task renews every third of the TTL: a renewal older
        // than half of it means this process was paused (or the store was
        // unreachable). Renew now, and write only if that worked.
        if st.renewed.elapsed() < self.ttl / 2 {
            return Ok(());
        }
        match self.renew(&mut st).await {
            Ok(()) => Ok(()),
            Err(_) if st.lost.is_some() => {
                let why = st.lost.clone().unwrap_or_default();
                Err(self.lost_error(&why, what))
            }
            // Could not renew right now, but the lease still runs.
            Err(e) if st.renewed.elapsed() < self.ttl * 4 / 5 => {
                log::warn!("renew the stanza lock before writing {what}: {e}");
                Ok(())
            }
            Err(e) => Err(e.context(format!("renew the stanza lock before writing {what}"))),
        }
    }
}

/// A held lock; released on drop (best effort: it then expires) or by
/// [`Lock::release`].
pub struct Lock {
    held: Arc<Held>,
    gate: Arc<Gate>,
    guard: Arc<dyn Guard>,
    stop: Option<watch::Sender<bool>>,
    lost: watch::Receiver<bool>,
}

impl Lock {
    /// Ok while the lock is ours; commands ask before each write phase (the
    /// repository's writes ask by themselves too).
    pub async fn check(&self) -> Result<()> {
        self.held.before_write("the next write").await
    }

    /// Resolves once the lock is known lost (a refused renewal), for a
    /// command that wants to stop at once rather than at its next write.
    pub async fn lost(&self) {
        let mut rx = self.lost.clone();
        let _ = rx.wait_for(|lost| *lost).await;
    }

    /// Releases the lock (only if it is still ours). A lock that was lost
    /// meanwhile is an error: the command's work may be incomplete.
    pub async fn release(mut self) -> Result<()> {
        self.stop_renewing();
        let mut st = self.held.state.lock().await;
        if let Some(why) = &st.lost {
            return Err(self.held.lost_error(why, "its release"));
        }
        // Deleting is not conditional on object stores: make sure no one
        // can have taken the lock over (it must not be close to expiry) by
        // renewing first when the last renewal is not recent.
        if st.renewed.elapsed() >= self.held.ttl / 2 {
            self.held.renew(&mut st).await?;
        }
        match self.held.raw.get_versioned(&self.held.key).await? {
            Some((bytes, _))
                if decode(&self.held.what, &bytes, &self.held.keys, &self.held.key)?.token
                    == st.info.token =>
            {
                self.held.raw.delete(&self.held.key).await
            }
            _ => Ok(()),
        }
    }

    fn stop_renewing(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(true);
        }
        self.gate.clear(&self.guard);
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        self.stop_renewing();
    }
}

#[cfg(test)]
mod tests;
