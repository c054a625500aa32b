//! Every command through the fault-injecting backend (`PGVAULT_FAULTS`,
//! `src/repo/fault.rs`): 5xx answers, connection resets (a write applied
//! or not), timeouts, slow requests, bodies cut off, writes missing from
//! listings for a while — seeded, so a run replays.
//!
//! PostgreSQL archives under faults (its `archive_command` inherits the
//! variable from the postmaster) and retries what fails, as it does. Each
//! command run under faults must either succeed with correct results —
//! checked afterwards without faults — or fail with one clear error line;
//! it is then run again with the next fault seed, as a cron job or an
//! operator would. In particular:
//!
//! * `archive-get` never answers 1 ("not in the archive") for an archived
//!   file, and never 0 with other bytes; a restored cluster recovering
//!   through `archive-get` under faults reaches exactly the primary's rows
//!   (an early end of recovery would lose some), being started again after
//!   each stop on a 254 — what PostgreSQL's FATAL asks of an operator;
//! * a backup that exits 0 restores; one that failed is not listed;
//! * `verify` never reports a problem the repository does not have;
//! * `info` lists every backup, `expire` leaves exactly what it keeps.
//!
//! Faults injected are counted by kind from pgvault's own log lines
//! (`--log-level info`: "fault injected (seed N): ...").

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use super::*;

/// The fault mix of one command run; `seed` changes with every run, so a
/// retry meets other faults (a decision is a function of the seed, the
/// request and how often it was made).
fn faults(seed: u64) -> String {
    format!(
        "seed={seed},error=0.12,reset=0.08,timeout=0.04,timeout_ms=100,slow=0.08,slow_ms=40,\
         truncate=0.12,hide=0.25,hide_ms=800"
    )
}

/// The kind of fault one log line reports, if it reports one.
fn fault_kind(line: &str) -> Option<&'static str> {
    let (_, what) = line.split_once("fault injected")?;
    let what = what.to_ascii_lowercase();
    Some(if what.contains("503") || what.contains("unavailable") {
        "5xx answer"
    } else if what.contains("reset") {
        "connection reset"
    } else if what.contains("timed out") || what.contains("timeout") {
        "timeout"
    } else if what.contains("cut off") || what.contains("truncat") {
        "body cut off"
    } else if what.contains("slow") {
        "slow request"
    } else if what.contains("hid") || what.contains("listing") {
        "write missing from listings"
    } else {
        "other"
    })
}

/// One repository under faults, and what was seen there.
struct Bench<'a> {
    c: &'a mut Campaign,
    env: &'a TestEnv,
    repo: Repo,
    /// The next fault seed.
    next: u64,
    /// Faults counted by kind.
    faults: BTreeMap<&'static str, u64>,
}

impl Bench<'_> {
    fn vars(&mut self) -> Vec<(String, String)> {
        self.next += 1;
        vec![
            ("PGVAULT_FAULTS".into(), faults(self.next)),
            ("PGVAULT_LOG_LEVEL".into(), "info".into()),
        ]
    }

    fn count_faults(&mut self, text: &str) {
        for kind in text.lines().filter_map(fault_kind) {
            *self.faults.entry(kind).or_default() += 1;
        }
    }

    /// Runs `args` under faults (each time with the next fault seed) until
    /// it succeeds, at most `tries` times; every failure must be a clear
    /// error. Returns the successful run.
    fn until_ok(
        &mut self,
        what: &str,
        who: As,
        args: &[String],
        cwd: &std::path::Path,
        tries: usize,
    ) -> Option<Run> {
        for attempt in 1..=tries {
            let vars = self.vars();
            let run = finish(
                spawn(self.env, &self.repo, who, args, &vars, cwd),
                PGVAULT_TIMEOUT,
            );
            self.count_faults(&run.stderr);
            if run.code == Some(0) {
                self.c
                    .count(&format!("{what} runs under faults: succeeded"), 1);
                return Some(run);
            }
            self.c
                .count(&format!("{what} runs under faults: failed clearly"), 1);
            if let Err(e) = clear_error(&run) {
                let ctx = format!(
                    "seed {} {what} (attempt {attempt}, {})",
                    self.c.seed,
                    faults(self.next)
                );
                self.c.problem(&ctx, e);
            }
        }
        let ctx = format!("seed {} {what}", self.c.seed);
        self.c.problem(
            &ctx,
            format!("did not succeed in {tries} runs under faults"),
        );
        None
    }
}

/// Whether this binary injects faults at all (the fault-injecting backend
/// landed): every request failing must fail `info`.
fn injects_faults(env: &TestEnv, repo: &Repo) -> bool {
    let mut vars = repo.env.clone();
    vars.push(("PGVAULT_FAULTS".into(), "seed=1,error=1,attempts=1".into()));
    let mut args = repo.args();
    args.extend(["info".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    env.pgvault(As::Root, &args, &vars, env.dir()).code != Some(0)
}

/// The archive_command of a primary archiving under faults: a script that
/// runs pgvault's archive-push with `PGVAULT_FAULTS` seeded by `base` plus
/// the number of the call. A fault decision is a function of the seed, the
/// request and how often this process made it, so with one seed in the
/// postmaster's environment every retry of a segment would meet exactly
/// the faults that failed it — forever. The calls are numbered in the
/// order PostgreSQL makes them (its archiver is one process), so a seed
/// replays.
fn archiver_under_faults(env: &TestEnv, repo: &Repo, base: u64) -> String {
    let dir = env.mkdir(&format!("archiver-{}", unique()), As::PgUser);
    let script = dir.join("archive-under-faults");
    let calls = dir.join("calls");
    let mix = faults(0);
    let mix = mix.split_once(',').map_or("", |(_, rest)| rest);
    fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             n=$(( $(cat {calls} 2>/dev/null || echo 0) + 1 ))\n\
             echo \"$n\" >{calls}\n\
             PGVAULT_FAULTS=\"seed=$(( {base} + n )),{mix}\" exec \"$@\"\n",
            calls = calls.display(),
            // (the shell's arithmetic is signed 64-bit)
            base = (base % (1 << 62)) + 100_000
        ),
    )
    .expect("write the archiver script");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755))
        .expect("chmod the archiver script");
    chown(&script, env.uid, env.gid);
    format!("{} {}", script.display(), repo.archive_command(env.bin()))
}

fn every_command_under_faults(c: &mut Campaign, env: &TestEnv, repo: Repo, base_seed: u64) {
    let rounds = Scale::from_env().fault_rounds.max(1);
    let where_ = if repo.local.is_some() { "local" } else { "S3" };
    let mut pg = Cluster::init(env, small_segments());
    // Archiving off until the stanza exists (PostgreSQL would retry, but
    // its failures would count against wait_archived's patience).
    let mut b = Bench {
        c,
        env,
        repo: repo.clone(),
        next: base_seed,
        faults: BTreeMap::new(),
    };
    let create: Vec<String> = vec![
        "stanza-create".into(),
        "--pgdata".into(),
        pg.pgdata().display().to_string(),
    ];
    if b.until_ok("stanza-create", As::PgUser, &create, env.dir(), 10)
        .is_none()
    {
        return;
    }
    if !injects_faults(env, &repo) {
        let ctx = format!("seed {} {where_}", b.c.seed);
        b.c.problem(
            &ctx,
            "PGVAULT_FAULTS had no effect: this pgvault has no fault-injecting backend \
             (the campaign's fault part runs once it has)",
        );
        return;
    }
    // PostgreSQL archives under faults, each archive_command call with a
    // seed of its own (see archiver_under_faults).
    pg.enable_archiving(env, &repo);
    pg.set_conf(&format!(
        "archive_command = '{}'\n",
        archiver_under_faults(env, &repo, base_seed)
    ));
    let mut vars = env.base_env(As::PgUser);
    vars.extend(repo.env.iter().cloned());
    vars.push(("PGVAULT_LOG_LEVEL".into(), "info".into()));
    pg.start_with_env(&vars);
    pg.psql("create table t(n int)");
    let mut backups: Vec<String> = Vec::new();
    let scratch = env.mkdir(&format!("faults-{}", unique()), As::PgUser);
    let mut archived: Vec<String> = Vec::new();
    for round in 0..rounds {
        // WAL, archived by PostgreSQL through the faults (it retries).
        for i in 0..4 {
            pg.psql(&format!(
                "insert into t select g from generate_series(1, {}) g",
                1000 * (i + 1)
            ));
            archived.push(pg.switch_wal());
        }
        wait_archived(&pg, archived.last().expect("segments"));

        // backup: exit 0 means restorable (checked below).
        let args = with_cluster(&pg, &["backup", "--type", "full", "--start-fast"]);
        if let Some(run) = b.until_ok("backup", As::PgUser, &args, env.dir(), 8) {
            backups.push(run.stdout.trim().to_string());
        }

        // archive-get of every archived segment: exit 0 with the very
        // bytes, or a clear failure (254) — never 1.
        for name in &archived {
            let dest = scratch.join(format!("{name}.{}", unique()));
            let args: Vec<String> = vec![
                "archive-get".into(),
                name.clone(),
                dest.display().to_string(),
            ];
            for _ in 0..3 {
                let vars = b.vars();
                let run = finish(
                    spawn(env, &repo, As::PgUser, &args, &vars, &scratch),
                    PGVAULT_TIMEOUT,
                );
                b.count_faults(&run.stderr);
                let ctx = format!("seed {} archive-get {name} ({})", b.c.seed, faults(b.next));
                match run.code {
                    Some(0) => {
                        if fs::read(&dest).ok() != fs::read(pg.wal_dir().join(name)).ok() {
                            b.c.problem(&ctx, "exit 0 with other bytes");
                        }
                        b.c.count("archive-get runs under faults: succeeded", 1);
                        break;
                    }
                    Some(1) => {
                        b.c.problem(&ctx, format!(
                            "exit 1 (\"not in the archive\") for an archived file: recovery would end early: {}",
                            run.stderr.trim()
                        ));
                        break;
                    }
                    _ => {
                        b.c.count("archive-get runs under faults: failed clearly", 1);
                        if let Err(e) = clear_error(&run) {
                            b.c.problem(&ctx, e);
                        }
                        if dest.exists() {
                            b.c.problem(&ctx, "failed, but the destination exists");
                        }
                    }
                }
            }
            let _ = fs::remove_file(&dest);
        }
        // A name that was never archived: 1 (or a clear failure), never 0.
        let never = segment_name(1, 0xFFFF, pg.wal_segment_size());
        let dest = scratch.join("never");
        let args: Vec<String> = vec![
            "archive-get".into(),
            never.clone(),
            dest.display().to_string(),
        ];
        let vars = b.vars();
        let run = finish(
            spawn(env, &repo, As::PgUser, &args, &vars, &scratch),
            PGVAULT_TIMEOUT,
        );
        b.count_faults(&run.stderr);
        if run.code == Some(0) || dest.exists() {
            let ctx = format!("seed {} archive-get {never} (never archived)", b.c.seed);
            b.c.problem(&ctx, "exit 0 for a file the archive does not have");
        }

        // info lists every backup (after listings caught up).
        std::thread::sleep(Duration::from_millis(1000));
        let info_args: Vec<String> = vec!["info".into(), "--output".into(), "json".into()];
        if let Some(run) = b.until_ok("info", As::Root, &info_args, env.dir(), 5) {
            let got = labels_in(&run.stdout);
            for label in &backups {
                if !got.contains(label) {
                    let ctx = format!("seed {} info (round {round})", b.c.seed);
                    b.c.problem(
                        &ctx,
                        format!("exit 0 but backup {label} is not listed: {got:?}"),
                    );
                }
            }
        }

        // verify: the repository is sound, so any problem is a false alarm.
        let args: Vec<String> = vec!["verify".into()];
        for _ in 0..3 {
            let vars = b.vars();
            let run = finish(
                spawn(env, &repo, As::Root, &args, &vars, env.dir()),
                PGVAULT_TIMEOUT,
            );
            b.count_faults(&run.stderr);
            let ctx = format!("seed {} verify ({})", b.c.seed, faults(b.next));
            match run.code {
                Some(0) => {
                    b.c.count("verify runs under faults: succeeded", 1);
                    break;
                }
                Some(11) => {
                    b.c.problem(
                        &ctx,
                        format!("a sound repository reported damaged: {}", run.stdout.trim()),
                    );
                    break;
                }
                _ => {
                    b.c.count("verify runs under faults: failed clearly", 1);
                    if let Err(e) = clear_error(&run) {
                        b.c.problem(&ctx, e);
                    }
                }
            }
        }

        // check: archiving works end to end, or a clear error.
        let args = with_cluster(&pg, &["check"]);
        b.until_ok("check", As::PgUser, &args, env.dir(), 5);
    }

    // A second backup (expire below needs one to remove), then a restore
    // of the newest under faults, and PostgreSQL recovering through
    // archive-get under faults to the end of the archive.
    if backups.len() < 2 {
        let args = with_cluster(&pg, &["backup", "--type", "full", "--start-fast"]);
        if let Some(run) = b.until_ok("backup", As::PgUser, &args, env.dir(), 8) {
            backups.push(run.stdout.trim().to_string());
        }
    }
    pg.psql("insert into t values (-1)");
    let last = pg.switch_wal();
    wait_archived(&pg, &last);
    let rows = pg.psql("select count(*) from t");
    if let Some(label) = backups.last().cloned() {
        let mut node = Node::new(env, &repo, "under-faults");
        let args = restore_args(&node.pgdata, &label, &TO_ARCHIVE_END);
        let mut restored = false;
        for attempt in 0..6 {
            let mut a = args.clone();
            if attempt > 0 {
                a.push("--delta".into());
            }
            let vars = b.vars();
            let run = finish(
                spawn(env, &repo, As::PgUser, &a, &vars, env.dir()),
                PGVAULT_TIMEOUT,
            );
            b.count_faults(&run.stderr);
            if run.code == Some(0) {
                b.c.count("restore runs under faults: succeeded", 1);
                restored = true;
                break;
            }
            b.c.count("restore runs under faults: failed clearly", 1);
            let ctx = format!("seed {} restore of {label} ({})", b.c.seed, faults(b.next));
            if let Err(e) = clear_error(&run) {
                b.c.problem(&ctx, e);
            }
            if node.pgdata.join("global/pg_control").exists() {
                b.c.problem(&ctx, "the failed restore left global/pg_control");
            }
        }
        if restored {
            let ctx = format!("seed {} recovery of {label} under faults", b.c.seed);
            node.vars.extend(b.vars());
            let mut promoted = false;
            for _ in 0..10 {
                node.vars.retain(|(k, _)| k != "PGVAULT_FAULTS");
                node.vars.push((
                    "PGVAULT_FAULTS".into(),
                    faults({
                        b.next += 1;
                        b.next
                    }),
                ));
                if node.try_start().is_err() {
                    // restore_command exited 254: recovery stopped, as it
                    // must; an operator starts it again.
                    b.c.count("recoveries stopped by archive-get 254 and started again", 1);
                    continue;
                }
                if b.c.guard(&ctx, || node.wait_promoted()).is_some() {
                    promoted = true;
                }
                break;
            }
            let log = node.log_text();
            b.count_faults(&log);
            if !promoted {
                b.c.problem(&ctx, format!("never promoted\n{}", node.log_tail(20)));
            } else {
                let got = node.psql("select count(*) from t");
                if got != rows {
                    b.c.problem(
                        &ctx,
                        format!("{got} rows after recovery, the primary has {rows}: recovery ended early"),
                    );
                } else {
                    b.c.count("recoveries under faults that reached every row", 1);
                }
                node.stop();
                b.c.guard(&ctx, || node.checksums());
            }
        }
    }

    // expire under faults: exactly the newest backup stays.
    if backups.len() >= 2 {
        let args: Vec<String> = vec!["expire".into(), "--retention-full".into(), "1".into()];
        if b.until_ok("expire", As::PgUser, &args, env.dir(), 8)
            .is_some()
        {
            std::thread::sleep(Duration::from_millis(1000));
            let got = info_labels(env, &repo);
            let want = vec![backups.last().expect("a backup").clone()];
            if got != want {
                let ctx = format!("seed {} expire", b.c.seed);
                b.c.problem(&ctx, format!("backups left {got:?}, want {want:?}"));
            }
        }
    }
    let failed: u64 = pg
        .psql("select failed_count from pg_stat_archiver")
        .parse()
        .unwrap_or(0);
    b.c.count("archive_command failures PostgreSQL retried", failed);
    pg.stop();
    b.count_faults(&pg.log_tail(usize::MAX));

    // Without faults: the repository is sound.
    let (code, found, run) = super::inventory::verify(env, &repo);
    if code != Some(0) {
        let ctx = format!(
            "seed {} {where_}: verify without faults at the end",
            b.c.seed
        );
        b.c.problem(
            &ctx,
            format!("exit {code:?}: {} {}", found.join("; "), run.stderr.trim()),
        );
    }
    let total: u64 = b.faults.values().sum();
    for (kind, n) in std::mem::take(&mut b.faults) {
        b.c.count(&format!("faults injected: {kind}"), n);
    }
    if total == 0 {
        let ctx = format!("seed {} {where_}", b.c.seed);
        b.c.problem(&ctx, "no fault was injected (or logged) at all");
    }
}

#[test]
fn every_command_under_faults_local() {
    let mut c = Campaign::new("every_command_under_faults_local");
    let env = TestEnv::new();
    let repo = env.local_repo("campaign");
    let seed = c.seed.wrapping_mul(1000);
    every_command_under_faults(&mut c, &env, repo, seed);
    c.finish();
}

#[test]
fn every_command_under_faults_moto() {
    let mut c = Campaign::new("every_command_under_faults_moto");
    let env = TestEnv::new();
    let Some(server) = require_server(env.moto.clone(), "PGVAULT_TEST_MOTO") else {
        return;
    };
    let repo = env.s3_repo(&server, "campaign");
    let seed = c.seed.wrapping_mul(1000) + 500;
    every_command_under_faults(&mut c, &env, repo, seed);
    c.finish();
}
