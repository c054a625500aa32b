//! The fault campaign (issue 9, "Trust"): the proof that a crash, a fault,
//! a full disk, bit rot, a race or a curious user never loses data,
//! never hands PostgreSQL bad bytes, never leaves a repository that the
//! next command cannot finish, and never shows a secret.
//!
//! * `kill_archive`: SIGKILL of `archive-push` (with its look-ahead pusher)
//!   and of `archive-get` (with its prefetcher) at seeded points;
//! * `kill_backup`: SIGKILL of `backup`, `restore` and `expire`;
//! * `faults`: every command through the fault-injecting backend
//!   (`PGVAULT_FAULTS`);
//! * `enospc`: a full repository and a full restore target;
//! * `bitrot`: single-bit flips in every kind of repository object;
//! * `concurrency`: racing commands on the local repository, moto and s3s-fs;
//! * `secrets`: the S3 secret never shows anywhere.
//!
//! The schedule of every test is a function of one seed (printed, with the
//! kill point of every case): `PGVAULT_TEST_SEED=<n>` replays it.
//! `scripts/test.sh` runs a short sample; `scripts/reliability.sh` raises
//! the counts (`PGVAULT_CAMPAIGN_POINTS` kill points per command,
//! `PGVAULT_CAMPAIGN_FLIPS` bit flips, `PGVAULT_CAMPAIGN_FAULT_ROUNDS`
//! rounds under faults) and collects the figures each test prints
//! (`campaign figures ...`, also appended as JSON to
//! `$PGVAULT_CAMPAIGN_REPORT`) into docs/reliability.md's table.

mod bitrot;
mod concurrency;
mod enospc;
mod faults;
mod inventory;
mod kill_archive;
mod kill_backup;
mod points;
mod secrets;

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;

/// The seed of a campaign test run: `PGVAULT_TEST_SEED`, or a fixed one
/// (so that CI runs the same sample every time).
pub fn seed() -> u64 {
    seed_or(0xCA4E_0009)
}

/// How much of the campaign to run.
#[derive(Debug, Clone, Copy)]
pub struct Scale {
    /// Kill points per command.
    pub points: usize,
    /// Bit flips.
    pub flips: usize,
    /// Rounds of commands under injected faults.
    pub fault_rounds: usize,
}

impl Scale {
    pub fn from_env() -> Scale {
        let n = |var: &str, default: usize| {
            std::env::var(var)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(default)
        };
        Scale {
            points: n("PGVAULT_CAMPAIGN_POINTS", 2),
            flips: n("PGVAULT_CAMPAIGN_FLIPS", 12),
            fault_rounds: n("PGVAULT_CAMPAIGN_FAULT_ROUNDS", 1),
        }
    }
}

/// What one campaign test did, by kind (kill points survived per command,
/// faults injected per kind, corruptions detected, ...), and what went
/// wrong. Printed (and appended to `$PGVAULT_CAMPAIGN_REPORT`) before the
/// test passes or fails, so a failing run still has its figures.
pub struct Campaign {
    pub test: &'static str,
    pub seed: u64,
    pub counts: BTreeMap<String, u64>,
    pub problems: Vec<String>,
    started: Instant,
}

impl Campaign {
    pub fn new(test: &'static str) -> Campaign {
        let seed = seed();
        eprintln!("campaign {test}: seed {seed} (replay: PGVAULT_TEST_SEED={seed})");
        Campaign {
            test,
            seed,
            counts: BTreeMap::new(),
            problems: Vec::new(),
            started: Instant::now(),
        }
    }

    /// A generator for one part of this test.
    pub fn rng(&self, stream: u64) -> Rng {
        Rng::new(self.seed, stream)
    }

    pub fn count(&mut self, what: &str, n: u64) {
        *self.counts.entry(what.to_string()).or_default() += n;
    }

    /// Records the problems of one case, each prefixed with `ctx` (which
    /// names the seed and the kill point).
    pub fn problems(&mut self, ctx: &str, problems: impl IntoIterator<Item = String>) {
        for p in problems {
            eprintln!("  PROBLEM {ctx}: {p}");
            self.problems.push(format!("{ctx}: {p}"));
        }
    }

    pub fn problem(&mut self, ctx: &str, p: impl Into<String>) {
        self.problems(ctx, [p.into()]);
    }

    /// Runs `f`, recording its panic (a helper's failed assertion) as a
    /// problem of `ctx` instead of ending the test; `None` if it panicked.
    pub fn guard<T>(&mut self, ctx: &str, f: impl FnOnce() -> T) -> Option<T> {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            Ok(v) => Some(v),
            Err(p) => {
                // The first lines say what; a server log may follow.
                let short: Vec<&str> = panic_message(&*p).lines().take(12).collect();
                self.problem(ctx, short.join("\n    "));
                None
            }
        }
    }

    /// Prints the figures, appends them to `$PGVAULT_CAMPAIGN_REPORT`, and
    /// fails the test with every problem found.
    #[track_caller]
    pub fn finish(self) {
        let figures = json!({
            "test": self.test,
            "seed": self.seed,
            "counts": self.counts,
            "problems": self.problems.len(),
            "seconds": self.started.elapsed().as_secs(),
        });
        eprintln!("campaign figures {}: {figures}", self.test);
        if let Ok(path) = std::env::var("PGVAULT_CAMPAIGN_REPORT") {
            if let Ok(mut f) = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
            {
                let _ = writeln!(f, "{figures}");
            }
        }
        assert!(
            self.problems.is_empty(),
            "campaign {} (seed {}, replay with PGVAULT_TEST_SEED={}): {} problem(s):\n  {}",
            self.test,
            self.seed,
            self.seed,
            self.problems.len(),
            self.problems.join("\n  ")
        );
    }
}

/// 1 MiB WAL segments, so that a few seconds of work make many of them,
/// and data checksums, so that `pg_checksums --check` can vouch for a
/// restored cluster.
pub fn small_segments() -> InitOpts {
    InitOpts {
        wal_segsize_mb: Some(1),
        data_checksums: true,
    }
}

/// `restore --pgdata <pgdata> --set <label>` and `more` (a target, an
/// action), logging at debug level: its lines mark phases.
pub fn restore_args(pgdata: &std::path::Path, label: &str, more: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["--log-level", "debug", "restore", "--pgdata"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend([pgdata.display().to_string(), "--set".into(), label.into()]);
    v.extend(more.iter().map(|s| s.to_string()));
    v
}

/// The restored copies of these tests must not archive into the
/// repository: recovery to the backup's end, promoted, archiving off.
pub const TO_BACKUP_END: [&str; 6] = [
    "--target",
    "immediate",
    "--target-action",
    "promote",
    "--archive-mode",
    "off",
];

/// Recovery to the end of the archive, promoted, archiving off.
pub const TO_ARCHIVE_END: [&str; 4] = ["--target-action", "promote", "--archive-mode", "off"];

/// Owned arguments.
pub fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// `cmd` and what reaches `pg`: `--pgdata`, `--pg-host`, `--pg-port`.
pub fn with_cluster(pg: &Cluster, cmd: &[&str]) -> Vec<String> {
    let mut v = args(cmd);
    v.extend([
        "--pgdata".into(),
        pg.pgdata().display().to_string(),
        "--pg-host".into(),
        pg.sockdir().display().to_string(),
        "--pg-port".into(),
        pg.port().to_string(),
    ]);
    v
}

/// The labels of the backups `info` lists (none when it fails).
pub fn info_labels(env: &TestEnv, repo: &Repo) -> Vec<String> {
    let run = repo.run(env, As::Root, &["info", "--output", "json"], env.dir());
    labels_in(&run.stdout)
}

/// The backup labels in `info --output json`'s output.
pub fn labels_in(info: &str) -> Vec<String> {
    serde_json::from_str::<serde_json::Value>(info)
        .ok()
        .and_then(|v| {
            v["backups"].as_array().map(|a| {
                a.iter()
                    .filter_map(|b| b["label"].as_str().map(String::from))
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// `args` after the repository's, as one owned vector (for spawning).
pub fn with_repo(repo: &Repo, args: &[&str]) -> Vec<String> {
    let mut all = repo.args();
    all.extend(args.iter().map(|s| s.to_string()));
    all
}

/// Starts pgvault as `who` with the repository's options and environment,
/// plus `extra` environment (a case tag).
pub fn spawn(
    env: &TestEnv,
    repo: &Repo,
    who: As,
    args: &[String],
    extra: &[(String, String)],
    cwd: &std::path::Path,
) -> Spawned {
    let mut all = with_repo(repo, &[]);
    all.extend(args.iter().cloned());
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let mut vars = repo.env.clone();
    vars.extend(extra.iter().cloned());
    env.spawn_pgvault(who, &all, &vars, cwd)
}

/// The error contract of a failed command: exactly one `error:` line on
/// stderr, naming a file or object (a path, a key or a WAL name: it holds
/// a `/`, or 24 hexadecimal digits), and otherwise only `hint:` lines and
/// pgvault's own `pgvault: ...` log and progress lines.
pub fn clear_error(run: &Run) -> Result<(), String> {
    let lines = run.stderr_lines();
    let errors: Vec<&&str> = lines.iter().filter(|l| l.starts_with("error:")).collect();
    let other: Vec<&&str> = lines
        .iter()
        .filter(|l| {
            !l.starts_with("error:") && !l.starts_with("hint:") && !l.starts_with("pgvault: ")
        })
        .collect();
    let names_something = |l: &str| {
        l.contains('/')
            || l.as_bytes()
                .windows(24)
                .any(|w| w.iter().all(u8::is_ascii_hexdigit))
    };
    if errors.len() != 1 || !other.is_empty() {
        return Err(format!(
            "not one clear error line (exit {:?}):\n{}",
            run.code,
            run.stderr.trim()
        ));
    }
    if !names_something(errors[0]) {
        return Err(format!("the error names no file or object: {}", errors[0]));
    }
    Ok(())
}

/// [`spawn`] from the test's directory, to completion.
pub fn exec(
    env: &TestEnv,
    repo: &Repo,
    who: As,
    args: &[String],
    extra: &[(String, String)],
) -> Run {
    finish(
        spawn(env, repo, who, args, extra, env.dir()),
        PGVAULT_TIMEOUT,
    )
}

/// Waits until PostgreSQL archived `name`, however many of its
/// `archive_command` calls fail meanwhile: after three failures in a row
/// its archiver sleeps a minute unless woken, so a new segment wakes it.
pub fn wait_archived(pg: &Cluster, name: &str) {
    let start = Instant::now();
    let mut last_progress = start;
    let mut last_seen = String::new();
    loop {
        let seen = pg.psql("select coalesce(last_archived_wal, '') from pg_stat_archiver");
        if seen.len() == 24 && seen.as_str() >= name {
            return;
        }
        if seen != last_seen {
            last_seen = seen;
            last_progress = Instant::now();
        } else if last_progress.elapsed() > Duration::from_secs(5) {
            pg.switch_wal();
            last_progress = Instant::now();
        }
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "{name} not archived after 10 minutes (last {last_seen:?})\n{}",
            pg.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until no pgvault process of this test runs (detached helpers
/// finishing); a problem if they do not within a minute.
pub fn wait_quiet(env: &TestEnv) -> Option<String> {
    let start = Instant::now();
    while !pgvault_pids(env).is_empty() {
        if start.elapsed() > Duration::from_secs(60) {
            return Some(format!(
                "pgvault processes still running after a minute: {:?}",
                pgvault_pids(env)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}
