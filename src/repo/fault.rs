//! A backend that injects faults around any other — for tests only.
//!
//! Enabled in the real binary by `PGVAULT_FAULTS` (see docs/testing.md),
//! e.g. `PGVAULT_FAULTS="seed=7,error=0.2,truncate=0.1"`. Each request
//! attempt may meet, with the given probabilities:
//!
//! - `error`: a 5xx-like answer; nothing was done;
//! - `reset`: the connection is reset; for a write, half the time after the
//!   store applied it (the answer was lost);
//! - `timeout`: the request hangs for `timeout_ms`, then fails; a write was
//!   applied;
//! - `slow`: the request (and the first read of a body) waits `slow_ms`;
//!
//! and, past the request:
//!
//! - `truncate`: a body breaks off part-way (an error, or a silent early
//!   end);
//! - `hide`: a write is acknowledged but missing from listings for
//!   `hide_ms`, as on stores whose listings lag;
//!
//! and, to cut a command off at a chosen point (what `kill -9` or a host
//! losing power does, but deterministic):
//!
//! - `kill_after=N` (with `kill_on=TEXT`, default `/data/`): the process
//!   SIGKILLs itself right after the N-th write whose key contains TEXT
//!   was stored.
//!
//! Failed attempts are retried, as a store client retries them (object_store
//! does for S3): up to `attempts` in all, with backoff; a write applied
//! before its answer was lost is sent again, and meets its own object (a
//! create is refused by it), which is what pgvault's conditional writes must
//! cope with. When the attempts run out the error says "transfer of <object>
//! failed after N attempts". Broken bodies are not retried here: pgvault's
//! own reader resumes them ([`Backend::get`]).
//!
//! Every decision is a function of the seed, the operation, the key and how
//! many times that operation was asked of that key, so a run is replayed by
//! its seed whatever the interleaving of its tasks.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;

use super::backend::{
    backoff, Backend, ObjectMeta, ObjectVersion, PutMode, PutOutcome, PutResult, RawRead, Spool,
};
use crate::error::{Error, Result};

/// The environment variable that turns fault injection on.
pub const VARIABLE: &str = "PGVAULT_FAULTS";

/// What to inject, and how often.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultConfig {
    pub seed: u64,
    pub error: f64,
    pub reset: f64,
    pub timeout: f64,
    pub timeout_ms: u64,
    pub slow: f64,
    pub slow_ms: u64,
    pub truncate: f64,
    pub hide: f64,
    pub hide_ms: u64,
    /// Attempts per request, the first included.
    pub attempts: u32,
    /// SIGKILL this process after this many stored writes whose key
    /// contains `kill_on` (0: never).
    pub kill_after: u64,
    pub kill_on: String,
}

impl Default for FaultConfig {
    fn default() -> Self {
        FaultConfig {
            seed: 0,
            error: 0.0,
            reset: 0.0,
            timeout: 0.0,
            timeout_ms: 200,
            slow: 0.0,
            slow_ms: 100,
            truncate: 0.0,
            hide: 0.0,
            hide_ms: 2000,
            attempts: 5,
            kill_after: 0,
            kill_on: "/data/".into(),
        }
    }
}

impl FaultConfig {
    /// Parses `seed=7,error=0.2,truncate=0.1,…`.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let mut c = FaultConfig::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("{part:?} is not key=value"))?;
            let prob = || match v.parse::<f64>() {
                Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
                _ => Err(format!("{k}={v}: a probability from 0 to 1")),
            };
            let int = || v.parse::<u64>().map_err(|_| format!("{k}={v}: a number"));
            match k {
                "seed" => c.seed = int()?,
                "error" => c.error = prob()?,
                "reset" => c.reset = prob()?,
                "timeout" => c.timeout = prob()?,
                "timeout_ms" => c.timeout_ms = int()?,
                "slow" => c.slow = prob()?,
                "slow_ms" => c.slow_ms = int()?,
                "truncate" => c.truncate = prob()?,
                "hide" => c.hide = prob()?,
                "hide_ms" => c.hide_ms = int()?,
                "kill_after" => c.kill_after = int()?,
                "kill_on" => c.kill_on = v.to_string(),
                "attempts" => {
                    c.attempts = u32::try_from(int()?)
                        .ok()
                        .filter(|&n| n >= 1)
                        .ok_or_else(|| format!("{k}={v}: at least 1"))?
                }
                _ => return Err(format!("unknown key {k:?}")),
            }
        }
        Ok(c)
    }
}

/// Wraps `backend` in a [`FaultBackend`] when [`VARIABLE`] is set.
pub fn from_env(backend: Arc<dyn Backend>) -> Result<Arc<dyn Backend>> {
    let Some(spec) = std::env::var(VARIABLE)
        .ok()
        .filter(|v| !v.trim().is_empty())
    else {
        return Ok(backend);
    };
    let config = FaultConfig::parse(&spec).map_err(|e| {
        Error::usage(format!("{VARIABLE}: {e}"))
            .hint("see docs/testing.md: PGVAULT_FAULTS is for tests only")
    })?;
    log::warn!(
        "{VARIABLE} is set: injecting faults into {} (for tests only)",
        backend.describe()
    );
    Ok(Arc::new(FaultBackend::new(backend, config)))
}

/// How many faults of each kind were injected.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FaultCounts {
    pub error: u64,
    pub reset: u64,
    pub timeout: u64,
    pub slow: u64,
    pub truncate: u64,
    pub hide: u64,
}

#[derive(Default)]
struct Counters {
    error: AtomicU64,
    reset: AtomicU64,
    timeout: AtomicU64,
    slow: AtomicU64,
    truncate: AtomicU64,
    hide: AtomicU64,
}

struct State {
    config: FaultConfig,
    /// Calls so far per (operation, key): the replayable part of a decision.
    calls: Mutex<HashMap<(&'static str, String), u64>>,
    hidden: Mutex<HashMap<String, Instant>>,
    counts: Counters,
    /// Stored writes that `kill_on` matched.
    kill_count: AtomicU64,
}

/// See the module documentation.
#[derive(Clone)]
pub struct FaultBackend {
    inner: Arc<dyn Backend>,
    state: Arc<State>,
}

impl fmt::Debug for FaultBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultBackend({:?}, {:?})", self.inner, self.state.config)
    }
}

/// One decision's dice: uniform in [0, 1).
#[derive(Clone, Copy)]
struct Dice(u64);

impl Dice {
    fn roll(&mut self) -> f64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What one attempt meets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Error,
    Reset { applied: bool },
    Timeout,
}

impl Fault {
    fn text(self) -> &'static str {
        match self {
            Fault::Error => "503 Service Unavailable (injected)",
            Fault::Reset { .. } => "connection reset by peer (injected)",
            Fault::Timeout => "operation timed out (injected)",
        }
    }
    /// Whether a write reached the store before the failure.
    fn applied(self) -> bool {
        matches!(self, Fault::Reset { applied: true } | Fault::Timeout)
    }
}

impl FaultBackend {
    pub fn new(inner: Arc<dyn Backend>, config: FaultConfig) -> Self {
        FaultBackend {
            inner,
            state: Arc::new(State {
                config,
                calls: Mutex::new(HashMap::new()),
                hidden: Mutex::new(HashMap::new()),
                counts: Counters::default(),
                kill_count: AtomicU64::new(0),
            }),
        }
    }

    pub fn counts(&self) -> FaultCounts {
        let c = &self.state.counts;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FaultCounts {
            error: get(&c.error),
            reset: get(&c.reset),
            timeout: get(&c.timeout),
            slow: get(&c.slow),
            truncate: get(&c.truncate),
            hide: get(&c.hide),
        }
    }

    fn config(&self) -> &FaultConfig {
        &self.state.config
    }

    /// `kill_after`: a write of `key` was stored; the N-th such write
    /// ends the process as `kill -9` would (nothing flushed, no cleanup).
    fn stored(&self, key: &str) {
        let c = self.config();
        if c.kill_after == 0 || !key.contains(&c.kill_on) {
            return;
        }
        let n = self.state.kill_count.fetch_add(1, Ordering::SeqCst) + 1;
        if n == c.kill_after {
            log::warn!(
                "{VARIABLE}: killing this process after storing {key} (write {n} on {:?})",
                c.kill_on
            );
            // SAFETY: sends SIGKILL to this very process.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }

    /// The dice for this call of `op` on `key`.
    fn dice(&self, op: &'static str, key: &str) -> Dice {
        let n = {
            let mut calls = self.state.calls.lock().unwrap_or_else(|p| p.into_inner());
            let n = calls.entry((op, key.to_string())).or_insert(0);
            *n += 1;
            *n
        };
        // FNV-1a over what identifies the call.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self
            .config()
            .seed
            .to_le_bytes()
            .iter()
            .chain(op.as_bytes())
            .chain([0u8].iter())
            .chain(key.as_bytes())
            .chain(n.to_le_bytes().iter())
        {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
        Dice(h)
    }

    /// What this attempt meets, if anything; counts and logs it.
    async fn attempt(&self, dice: &mut Dice, op: &str, key: &str) -> Option<Fault> {
        let c = self.config();
        let counts = &self.state.counts;
        if dice.roll() < c.slow {
            counts.slow.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(c.slow_ms)).await;
        }
        let r = dice.roll();
        let applied = dice.roll() < 0.5;
        let fault = if r < c.error {
            counts.error.fetch_add(1, Ordering::Relaxed);
            Fault::Error
        } else if r < c.error + c.reset {
            counts.reset.fetch_add(1, Ordering::Relaxed);
            Fault::Reset { applied }
        } else if r < c.error + c.reset + c.timeout {
            counts.timeout.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(c.timeout_ms)).await;
            Fault::Timeout
        } else {
            return None;
        };
        log::info!(
            "fault injected (seed {}): {} on {op} {key}",
            c.seed,
            fault.text()
        );
        Some(fault)
    }

    fn exhausted(&self, key: &str, attempts: u32, fault: Fault) -> Error {
        Error::repository(format!(
            "transfer of {}/{key} failed after {attempts} attempts: {}",
            self.inner.describe(),
            fault.text()
        ))
    }

    /// Runs `call` (a request that changes nothing, or a write that may be
    /// sent again) under injected faults and retries.
    async fn request<T, F, Fut>(
        &self,
        op: &'static str,
        key: &str,
        write: bool,
        call: F,
    ) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut dice = self.dice(op, key);
        let attempts = self.config().attempts;
        for attempt in 1..=attempts {
            match self.attempt(&mut dice, op, key).await {
                None => return call().await,
                Some(fault) => {
                    if write && fault.applied() {
                        // The store did it; the answer was lost.
                        call().await?;
                    }
                    if attempt == attempts {
                        return Err(self.exhausted(key, attempts, fault));
                    }
                    tokio::time::sleep(backoff(attempt)).await;
                }
            }
        }
        unreachable!("the last attempt returns")
    }

    fn maybe_hide(&self, key: &str) {
        let mut dice = self.dice("hide", key);
        if dice.roll() < self.config().hide {
            self.state.counts.hide.fetch_add(1, Ordering::Relaxed);
            let until = Instant::now() + Duration::from_millis(self.config().hide_ms);
            self.state
                .hidden
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.to_string(), until);
        }
    }
}

/// A body that breaks off after `left` bytes: with an error, or silently.
struct Truncated {
    inner: Box<dyn Read + Send>,
    left: u64,
    silent: bool,
    delay: Option<Duration>,
}

impl Read for Truncated {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if let Some(d) = self.delay.take() {
            std::thread::sleep(d);
        }
        if self.left == 0 {
            return if self.silent {
                Ok(0)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "response body cut off (injected)",
                ))
            };
        }
        let n = out
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut out[..n])?;
        self.left -= n as u64;
        Ok(n)
    }
}

#[async_trait]
impl Backend for FaultBackend {
    fn spool(&self, dir: &str) -> io::Result<Spool> {
        self.inner.spool(dir)
    }

    async fn commit(&self, spool: Spool, key: &str, mode: PutMode) -> Result<PutOutcome> {
        // A spool can be sent once: faults before it was sent are retried
        // with it; once the store applied it, a resend would meet the object
        // itself, which is what is answered.
        let mut dice = self.dice("commit", key);
        let attempts = self.config().attempts;
        let mut spool = Some(spool);
        for attempt in 1..=attempts {
            let fault = self.attempt(&mut dice, "commit", key).await;
            let Some(fault) = fault.filter(|f| !f.applied()) else {
                let s = spool.take().expect("the spool is sent once");
                let outcome = self.inner.commit(s, key, mode.clone()).await?;
                self.stored(key);
                self.maybe_hide(key);
                return Ok(if fault.is_some() && mode != PutMode::Overwrite {
                    PutOutcome::AlreadyExists
                } else {
                    outcome
                });
            };
            if attempt == attempts {
                return Err(self.exhausted(key, attempts, fault));
            }
            tokio::time::sleep(backoff(attempt)).await;
        }
        unreachable!("the last attempt returns")
    }

    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<PutResult> {
        let r = self
            .request("put", key, true, || {
                self.inner.put(key, data.clone(), mode.clone())
            })
            .await?;
        if matches!(r, PutResult::Written(_)) {
            self.stored(key);
            self.maybe_hide(key);
        }
        Ok(r)
    }

    fn atomic_create(&self) -> bool {
        self.inner.atomic_create()
    }

    async fn open(
        &self,
        key: &str,
        from: u64,
        pin: Option<&ObjectVersion>,
    ) -> Result<Option<RawRead>> {
        let raw = self
            .request("open", key, false, || self.inner.open(key, from, pin))
            .await?;
        let Some(mut raw) = raw else {
            return Ok(None);
        };
        let mut dice = self.dice("body", &format!("{key}@{from}"));
        let left = raw.size.saturating_sub(from);
        if left > 0 && dice.roll() < self.config().truncate {
            self.state.counts.truncate.fetch_add(1, Ordering::Relaxed);
            let at = (dice.roll() * left as f64) as u64;
            log::info!(
                "fault injected (seed {}): body of {key} cut off at byte {}",
                self.config().seed,
                from + at
            );
            let slow = dice.roll() < self.config().slow;
            raw.reader = Box::new(Truncated {
                inner: raw.reader,
                left: at,
                silent: dice.roll() < 0.5,
                delay: slow.then(|| Duration::from_millis(self.config().slow_ms)),
            });
        }
        Ok(Some(raw))
    }

    async fn get_versioned(&self, key: &str) -> Result<Option<(Vec<u8>, ObjectVersion)>> {
        self.request("get", key, false, || self.inner.get_versioned(key))
            .await
    }

    async fn list(&self, dir: &str) -> Result<Vec<ObjectMeta>> {
        let mut all = self
            .request("list", dir, false, || self.inner.list(dir))
            .await?;
        let now = Instant::now();
        let mut hidden = self.state.hidden.lock().unwrap_or_else(|p| p.into_inner());
        hidden.retain(|_, until| *until > now);
        all.retain(|m| !hidden.contains_key(&m.key));
        Ok(all)
    }

    async fn list_dirs(&self, dir: &str) -> Result<Vec<String>> {
        self.request("list_dirs", dir, false, || self.inner.list_dirs(dir))
            .await
    }

    async fn list_leftovers(&self, dir: &str) -> Result<Vec<ObjectMeta>> {
        self.request("list_leftovers", dir, false, || {
            self.inner.list_leftovers(dir)
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.request("delete", key, true, || self.inner.delete(key))
            .await
    }

    async fn delete_many(&self, keys: &[String]) -> Result<()> {
        let first = keys.first().map(String::as_str).unwrap_or("");
        let mut dice = self.dice("delete_many", first);
        let attempts = self.config().attempts;
        for attempt in 1..=attempts {
            match self.attempt(&mut dice, "delete_many", first).await {
                None => return self.inner.delete_many(keys).await,
                Some(fault) => {
                    if fault.applied() {
                        // Part of the batch was done before the failure.
                        let done = (dice.roll() * keys.len() as f64) as usize;
                        self.inner.delete_many(&keys[..done]).await?;
                    }
                    if attempt == attempts {
                        return Err(self.exhausted(first, attempts, fault));
                    }
                    tokio::time::sleep(backoff(attempt)).await;
                }
            }
        }
        unreachable!("the last attempt returns")
    }

    async fn ensure_durable(&self, keys: &[String]) -> Result<()> {
        let first = keys.first().map(String::as_str).unwrap_or("");
        self.request("ensure_durable", first, false, || {
            self.inner.ensure_durable(keys)
        })
        .await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn clone_arc(&self) -> Arc<dyn Backend> {
        Arc::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        let c = FaultConfig::parse("seed=7, error=0.2,truncate=0.1,hide_ms=50").unwrap();
        assert_eq!(c.seed, 7);
        assert_eq!(c.error, 0.2);
        assert_eq!(c.truncate, 0.1);
        assert_eq!(c.hide_ms, 50);
        assert_eq!(c.attempts, 5);
        assert!(FaultConfig::parse("error=2").is_err());
        assert!(FaultConfig::parse("eror=0.1").is_err());
        assert!(FaultConfig::parse("attempts=0").is_err());
        assert!(FaultConfig::parse("seed").is_err());
    }

    #[test]
    fn decisions_replay_by_seed_whatever_the_order() {
        let b = |seed| {
            FaultBackend::new(
                Arc::new(super::super::local::LocalBackend::new(
                    "/nonexistent".into(),
                )),
                FaultConfig {
                    seed,
                    ..FaultConfig::default()
                },
            )
        };
        let (x, y) = (b(7), b(7));
        let a1 = x.dice("get", "a").roll();
        let b1 = x.dice("get", "b").roll();
        // The other order, on another instance with the same seed.
        assert_eq!(y.dice("get", "b").roll(), b1);
        assert_eq!(y.dice("get", "a").roll(), a1);
        // The second call of an operation on a key rolls anew.
        assert_ne!(x.dice("get", "a").roll(), a1);
        assert_ne!(b(8).dice("get", "a").roll(), a1);
    }
}
