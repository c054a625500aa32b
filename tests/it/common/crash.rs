//! Crash tests' tools: a seeded generator (the schedule of a crash test is
//! a function of its seed, `PGVAULT_TEST_SEED` replays it) and SIGKILL of
//! the pgvault processes a test started, detached helpers included.

use std::fs;
use std::process::Command;
use std::thread;
use std::time::Duration;

use super::TestEnv;

/// xorshift64*: the schedule of a crash test is a function of its seed.
pub struct Rng(pub u64);

impl Rng {
    /// A generator for one stream of a test: the same seed gives each
    /// `stream` its own sequence.
    pub fn new(seed: u64, stream: u64) -> Rng {
        Rng((seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `PGVAULT_TEST_SEED`, or `default`.
pub fn seed_or(default: u64) -> u64 {
    std::env::var("PGVAULT_TEST_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default)
}

/// Every process whose program is this test's copy of pgvault and that
/// `keep` accepts (given its pid).
fn pgvault_pids_where(env: &TestEnv, keep: impl Fn(i32) -> bool) -> Vec<i32> {
    let bin = env.bin().as_os_str().to_string_lossy().into_owned();
    let mut pids = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return pids;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        if argv0 == bin.as_bytes() && keep(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// Every pgvault process started from this test's copy of the binary
/// (PostgreSQL's archive_command children, detached prefetchers).
pub fn pgvault_pids(env: &TestEnv) -> Vec<i32> {
    pgvault_pids_where(env, |_| true)
}

fn kill9(pids: &[i32]) {
    for pid in pids {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
}

pub fn sigkill_all(env: &TestEnv) -> usize {
    let pids = pgvault_pids(env);
    kill9(&pids);
    pids.len()
}

/// The environment variable that marks the processes of one case: pgvault
/// passes its environment on to the helpers it detaches, so they carry it
/// too. (Not a `PGVAULT_*` name: pgvault reads those.)
pub const CASE_TAG: &str = "CAMPAIGN_CASE";

/// `(CASE_TAG, tag)`, to add to a process's environment.
pub fn case_tag(tag: &str) -> (String, String) {
    (CASE_TAG.to_string(), tag.to_string())
}

/// The pgvault processes carrying `tag` (see [`case_tag`]).
pub fn tagged_pids(env: &TestEnv, tag: &str) -> Vec<i32> {
    let want = format!("{CASE_TAG}={tag}");
    pgvault_pids_where(env, |pid| {
        fs::read(format!("/proc/{pid}/environ"))
            .is_ok_and(|e| e.split(|b| *b == 0).any(|kv| kv == want.as_bytes()))
    })
}

/// SIGKILL every pgvault process carrying `tag`, again until none is left
/// (one may have detached a helper between the look and the kill); returns
/// how many were killed.
pub fn kill_tagged(env: &TestEnv, tag: &str) -> usize {
    let mut killed = std::collections::BTreeSet::new();
    let mut quiet = 0;
    while quiet < 3 {
        let pids = tagged_pids(env, tag);
        if pids.is_empty() {
            quiet += 1;
        } else {
            quiet = 0;
            killed.extend(pids.iter().copied());
            kill9(&pids);
        }
        thread::sleep(Duration::from_millis(10));
    }
    killed.len()
}

/// Wait until no pgvault process carries `tag` (a detached helper
/// finishing its work); false on timeout.
pub fn wait_untagged(env: &TestEnv, tag: &str, timeout: Duration) -> bool {
    let start = std::time::Instant::now();
    while !tagged_pids(env, tag).is_empty() {
        if start.elapsed() > timeout {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
    true
}

/// CPU time (user and system, in clock ticks) the pgvault processes of this
/// test have used so far, by pid.
pub fn pgvault_cpu_ticks(env: &TestEnv) -> std::collections::BTreeMap<i32, u64> {
    pgvault_pids(env)
        .into_iter()
        .filter_map(|pid| {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Fields after the command name (which may hold spaces): state
            // is field 3, utime and stime fields 14 and 15.
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some((pid, ticks))
        })
        .collect()
}
