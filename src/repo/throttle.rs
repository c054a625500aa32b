//! The bandwidth limit of a repository (`storage-bandwidth-limit`): a
//! token bucket that every transfer of one command through one repository
//! draws from, whichever of its parallel workers makes it, so that a backup
//! or a restore does not saturate a link it shares with the database's
//! clients or its replication.
//!
//! Waiting is asynchronous (a `tokio` sleep): a worker that is over the
//! limit never holds a runtime thread. A transfer larger than the bucket
//! (an 8 MiB part under a 2 MiB/s limit) goes into debt and waits it off
//! before it is sent, so over any interval at most `burst + rate × interval`
//! bytes move — the bound `tests/it/storageopts.rs` checks.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Throttle {
    /// Bytes per second.
    rate: f64,
    /// Most bytes that may move at once after an idle spell: one second's.
    burst: f64,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    /// Bytes that may move now; negative is a debt to wait off.
    tokens: f64,
    at: Instant,
}

impl Throttle {
    /// A limit of `bytes_per_sec` (at least 1).
    pub fn new(bytes_per_sec: u64) -> Throttle {
        let rate = bytes_per_sec.max(1) as f64;
        Throttle {
            rate,
            burst: rate,
            state: Mutex::new(Bucket {
                tokens: rate,
                at: Instant::now(),
            }),
        }
    }

    /// The limit, bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate as u64
    }

    /// Waits until `n` more bytes may move.
    pub async fn take(&self, n: usize) {
        let wait = self.reserve(n, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Takes `n` bytes from the bucket at `now`; how long the caller must
    /// wait before moving them.
    fn reserve(&self, n: usize, now: Instant) -> Duration {
        // Held for a few arithmetic operations, never across an await.
        let mut b = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let refill = now.saturating_duration_since(b.at).as_secs_f64() * self.rate;
        b.tokens = (b.tokens + refill).min(self.burst) - n as f64;
        b.at = now.max(b.at);
        if b.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-b.tokens / self.rate)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debts_add_up_across_workers() {
        let t = Throttle::new(1000);
        let now = Instant::now();
        // The first second's worth goes at once.
        assert_eq!(t.reserve(1000, now), Duration::ZERO);
        // Two more workers asking at the same instant wait one and two
        // seconds: the limit is shared, not per worker.
        assert_eq!(t.reserve(1000, now), Duration::from_secs(1));
        assert_eq!(t.reserve(1000, now), Duration::from_secs(2));
        // Three seconds later the debt is paid and one second refilled.
        assert_eq!(
            t.reserve(1000, now + Duration::from_secs(3)),
            Duration::ZERO
        );
    }

    #[test]
    fn an_idle_spell_never_saves_more_than_the_burst() {
        let t = Throttle::new(1000);
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        assert_eq!(t.reserve(1000, later), Duration::ZERO);
        assert_eq!(t.reserve(500, later), Duration::from_millis(500));
    }

    #[tokio::test]
    async fn waiting_does_not_hold_the_runtime() {
        // One runtime thread: a blocking wait would stall the other task.
        let t = std::sync::Arc::new(Throttle::new(1 << 20));
        t.take(1 << 20).await;
        let slow = {
            let t = t.clone();
            tokio::spawn(async move { t.take(1 << 20).await })
        };
        let other = tokio::spawn(async { 7 });
        assert_eq!(other.await.expect("the other task ran"), 7);
        assert!(
            !slow.is_finished(),
            "the other task ran only after the wait"
        );
        slow.await.expect("the throttled task finished");
    }
}
