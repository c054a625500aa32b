//! Day-two operations end to end (issue 5): `check`, the stanza lock between
//! concurrent `backup` runs (and a stale lock left by a killed one),
//! `expire` with `--retention-full` and `--retention-window` (and
//! `--dry-run`), and `verify` on a clean and on a damaged repository.
//!
//! One PostgreSQL 15 cluster (1 MiB WAL segments, `track_commit_timestamp`
//! on, so the test knows the exact commit time of every row) archives into
//! one local repository through the real binary, and every case shares it,
//! in an order that matters:
//!
//! 1. `check` on the correct set-up, then with `archive_command` pointing
//!    elsewhere (`/bin/true`; pgvault for another stanza);
//! 2. two backups started at the same moment: one completes (B1), the other
//!    exits 9; then two concurrent backups while archiving is held back
//!    (one holds the lock and waits for the archive, the other stops with
//!    exit 9 naming it; `expire` too; `check` times out with exit 8); the
//!    holder completes as B2;
//! 3. a backup SIGKILLed while it holds the lock: the next backup is
//!    refused until the lock expires, then takes it over (B3);
//! 4. B4; `expire --retention-full 2` (after a `--dry-run`) removes B1, B2
//!    and exactly the WAL before B3's start; PITR between B3 and B4;
//! 5. `verify`: clean -> 0; a copy of the repository with a flipped byte in
//!    a WAL object, a deleted backup object and a WAL segment removed from
//!    the middle of the timeline -> each named, exit 11, text and JSON;
//! 6. more than a minute of commits, B5, `expire --retention-window 1m`:
//!    B3 goes, B4 (the base for the window's oldest moment) stays, and a
//!    restore to that oldest moment (B5's stop time minus 1 minute) has
//!    exactly the rows committed up to it.
//!
//! Archiving is held back with a flag file: the archive_command is
//! `test ! -e FLAG && pgvault ... archive-push %p`.
//!
//! `check_archive_mode_off` runs a cluster of its own (archive_mode off).

use crate::common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const ARCHIVE_TIMEOUT: Duration = Duration::from_secs(120);
/// Exit codes from docs/exit-codes.md.
const EXIT_USAGE: i32 = 2;
const EXIT_POSTGRES: i32 = 7;
const EXIT_TIMEOUT: i32 = 8;
const EXIT_LOCKED: i32 = 9;
const EXIT_VERIFY: i32 = 11;

// ---------------------------------------------------------------------------
// The primary and pgvault invocations.

struct Primary {
    pg: Cluster,
    repo: Repo,
    /// While this file exists, archive_command fails (archiving is held back).
    block: PathBuf,
    /// The archive_command that archives into `repo` unless `block` exists.
    archive_command: String,
}

impl Primary {
    fn host(&self) -> String {
        self.pg
            .pgdata()
            .parent()
            .expect("pgdata has a parent")
            .display()
            .to_string()
    }

    fn port(&self) -> String {
        self.pg.port().to_string()
    }

    fn pgdata(&self) -> String {
        self.pg.pgdata().display().to_string()
    }

    /// `ALTER SYSTEM SET archive_command`, reload, and wait until a new
    /// session sees it.
    fn set_archive_command(&self, cmd: &str) {
        let q = cmd.replace('\'', "''");
        self.pg
            .psql(&format!("alter system set archive_command = '{q}'"));
        self.pg.psql("select pg_reload_conf()");
        let start = Instant::now();
        while self.pg.psql("show archive_command") != cmd {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "archive_command was not reloaded"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn hold_archiving(&self) {
        fs::write(&self.block, "held\n").expect("create the block flag");
    }

    /// Let archiving go on, and wake the archiver (after failures it
    /// sleeps up to a minute unless a new segment is ready).
    fn release_archiving(&self) {
        let _ = fs::remove_file(&self.block);
        let seg = self.pg.switch_wal();
        self.pg.wait_archived(&seg, ARCHIVE_TIMEOUT);
    }

    /// Insert one row into `t` (its own transaction) tagged `tag`.
    fn row(&self, tag: &str) {
        self.pg
            .psql(&format!("insert into t(tag) values ('{tag}')"));
    }

    /// Ids of the rows of `t` whose transaction committed at or before
    /// `time` (`recovery_target_inclusive` is on by default), "1,2,3".
    fn rows_until(&self, time: &str) -> String {
        self.pg.psql(&format!(
            "select coalesce(string_agg(id::text, ',' order by id), '') from t \
             where pg_xact_commit_timestamp(xmin) <= '{time}'::timestamptz"
        ))
    }

    /// The exact commit time of the row with id `id`.
    fn commit_time(&self, id: &str) -> String {
        self.pg.psql(&format!(
            "select pg_xact_commit_timestamp(xmin)::text from t where id = {id}"
        ))
    }
}

const ALL_ROWS: &str = "select coalesce(string_agg(id::text, ',' order by id), '') from t";

fn ids(s: &str) -> BTreeSet<i64> {
    s.split(',')
        .filter(|x| !x.is_empty())
        .map(|x| x.parse().expect("row id"))
        .collect()
}

fn pgvault(env: &TestEnv, p: &Primary, args: &[&str]) -> Run {
    p.repo.run(env, As::PgUser, args, env.dir())
}

/// `backup` arguments for the primary.
fn backup_args(p: &Primary, archive_timeout: u64) -> Vec<String> {
    let mut v: Vec<String> = p.repo.args();
    v.extend(
        [
            "backup",
            "--type",
            "full",
            "--pgdata",
            &p.pgdata(),
            "--pg-host",
            &p.host(),
            "--pg-port",
            &p.port(),
            "--start-fast",
            "--archive-timeout",
            &archive_timeout.to_string(),
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    v
}

fn spawn_backup(env: &TestEnv, p: &Primary, archive_timeout: u64) -> Spawned {
    let args = backup_args(p, archive_timeout);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    env.spawn_pgvault(As::PgUser, &args, &p.repo.env, env.dir())
}

fn run_backup(env: &TestEnv, p: &Primary) -> Run {
    finish(spawn_backup(env, p, 120), PGVAULT_TIMEOUT)
}

/// The label a successful backup printed on stdout.
#[track_caller]
fn label_of(run: &Run) -> String {
    run.ok();
    let label = run.stdout.trim().to_string();
    let b = label.as_bytes();
    assert!(
        b.len() == 16 && b[8] == b'-' && b[15] == b'F',
        "backup should print its label on stdout, got {:?}\n--- stderr\n{}",
        run.stdout,
        run.stderr
    );
    label
}

#[track_caller]
fn backup(env: &TestEnv, p: &Primary) -> String {
    let run = run_backup(env, p);
    let label = label_of(&run);
    eprintln!("backup {label} took {:.1?}", run.elapsed);
    label
}

fn check_args(p: &Primary, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        "check".to_string(),
        "--pg-host".into(),
        p.host(),
        "--pg-port".into(),
        p.port(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn check(env: &TestEnv, p: &Primary, extra: &[&str]) -> Run {
    let args = check_args(p, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    pgvault(env, p, &args)
}

#[track_caller]
fn info(env: &TestEnv, repo: &Repo) -> Value {
    let run = repo.run(env, As::PgUser, &["info", "--output", "json"], env.dir());
    run.ok();
    serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("info --output json is not JSON ({e}):\n{}", run.stdout))
}

fn labels(info: &Value) -> Vec<String> {
    info["backups"]
        .as_array()
        .unwrap_or_else(|| panic!("no backups[] in info: {info:#}"))
        .iter()
        .map(|b| b["label"].as_str().expect("label").to_string())
        .collect()
}

#[track_caller]
fn backup_info(info: &Value, label: &str) -> Value {
    info["backups"]
        .as_array()
        .unwrap_or_else(|| panic!("no backups[] in info: {info:#}"))
        .iter()
        .find(|b| b["label"] == label)
        .unwrap_or_else(|| panic!("backup {label} not in info: {info:#}"))
        .clone()
}

#[track_caller]
fn field(v: &Value, name: &str) -> String {
    v[name]
        .as_str()
        .unwrap_or_else(|| panic!("no string {name:?} in {v:#}"))
        .to_string()
}

#[track_caller]
fn timeline1(info: &Value) -> Value {
    info["timelines"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["timeline"] == 1))
        .unwrap_or_else(|| panic!("no timeline 1 in info: {info:#}"))
        .clone()
}

/// One `error:` line containing `needle` and at least one `hint:` line.
#[track_caller]
fn expect_error_with_hint(run: &Run, needle: &str) {
    let lines = run.stderr_lines();
    let errors: Vec<&&str> = lines.iter().filter(|l| l.starts_with("error:")).collect();
    assert!(
        errors.len() == 1 && errors[0].contains(needle),
        "`{}` should print one `error:` line naming {needle:?}, got:\n{}",
        run.what,
        run.stderr
    );
    assert!(
        lines.iter().any(|l| l.starts_with("hint:")),
        "`{}` should say how to fix it on a `hint:` line, got:\n{}",
        run.what,
        run.stderr
    );
}

// ---------------------------------------------------------------------------
// The local repository's files.

fn stanza_dir(repo: &Repo) -> PathBuf {
    repo.local
        .as_ref()
        .expect("a local repository")
        .join(&repo.stanza)
}

fn files_under(dir: &Path, out: &mut BTreeSet<PathBuf>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.insert(p);
        }
    }
}

fn all_files(root: &Path) -> BTreeSet<PathBuf> {
    let mut s = BTreeSet::new();
    files_under(root, &mut s);
    s
}

/// File names of the archived WAL of timeline 1 (data objects and claims;
/// not history files), as stored.
fn wal_files(repo: &Repo) -> BTreeSet<String> {
    let mut s = BTreeSet::new();
    files_under(&stanza_dir(repo).join("archive"), &mut s);
    s.into_iter()
        .filter_map(|p| {
            let name = p.file_name()?.to_string_lossy().into_owned();
            (name.len() >= 24
                && name[..24].bytes().all(|b| b.is_ascii_hexdigit())
                && name.starts_with("00000001")
                && !name.contains(".history"))
            .then_some(name)
        })
        .collect()
}

/// Segment names (24 hex digits, no suffix) that have a data object.
fn archived_segments(repo: &Repo) -> BTreeSet<String> {
    wal_files(repo)
        .into_iter()
        .filter(|n| n.len() == 24 + 1 + 64 + 4 && n.ends_with(".zst"))
        .map(|n| n[..24].to_string())
        .collect()
}

fn lock_path(repo: &Repo) -> PathBuf {
    stanza_dir(repo).join("lock").join("stanza.lock")
}

/// The lock object's JSON, if there is a lock.
fn read_lock(repo: &Repo) -> Option<Value> {
    let bytes = fs::read(lock_path(repo)).ok()?;
    Some(serde_json::from_slice(&decode_envelope(&bytes)).expect("the lock holds JSON"))
}

/// Wait until a lock held by a process other than `not_pid` appears.
#[track_caller]
fn wait_for_lock(repo: &Repo, not_pid: Option<u64>, what: &str) -> Value {
    let start = Instant::now();
    loop {
        if let Some(l) = read_lock(repo) {
            if l["pid"].as_u64() != not_pid {
                return l;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no stanza lock appeared at {} while {what}",
            lock_path(repo).display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

fn cmdline(pid: u64) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// A restored cluster.

/// Restore to `time` (latest backup before it, promoted, not archiving),
/// start, and return the restored rows of `t` and the label restore says it
/// used.
#[track_caller]
fn restore_to_time(env: &TestEnv, p: &Primary, name: &str, time: &str, from: &str) -> String {
    let mut n = Node::new(env, &p.repo, name);
    let pgdata = n.pgdata.display().to_string();
    let run = pgvault(
        env,
        p,
        &[
            "restore",
            "--pgdata",
            &pgdata,
            "--target-time",
            time,
            "--target-action",
            "promote",
            "--archive-mode",
            "off",
        ],
    );
    run.ok();
    assert!(
        run.stderr.contains(&format!("restoring backup {from} ")),
        "a restore to {time} should start from backup {from} (the newest that ended before \
         it):\n{}",
        run.stderr
    );
    n.start();
    n.wait_promoted();
    let rows = n
        .try_psql(ALL_ROWS)
        .unwrap_or_else(|e| panic!("read t on the restored cluster: {e}"));
    n.stop();
    rows
}

// ---------------------------------------------------------------------------
// The cases.

/// `check` passes now, and the segment it names is in the repository; then
/// with archive_command not calling pgvault, and calling it for another
/// stanza, it fails with a hint.
fn check_cases(env: &TestEnv, p: &Primary, cases: &mut Cases) {
    cases.run("check: ok on a correct set-up", || {
        let run = check(env, p, &[]);
        run.ok();
        let line = run
            .stderr_lines()
            .into_iter()
            .find(|l| l.contains("check ok"))
            .unwrap_or_else(|| panic!("no `check ok` line on stderr:\n{}", run.stderr))
            .to_string();
        // "pgvault: check ok: <segment> reached <repo> (stanza <s>)"
        let seg = line
            .split_whitespace()
            .find(|w| w.len() == 24 && w.bytes().all(|b| b.is_ascii_hexdigit()))
            .unwrap_or_else(|| panic!("`check ok` should name the segment it proved: {line}"));
        assert!(
            archived_segments(&p.repo).contains(seg),
            "check says {seg} reached the repository, but it is not there: {line}"
        );
    });

    cases.run(
        "check: archive_command = '/bin/true' fails with a hint",
        || {
            let before = p.pg.psql("select archived_count from pg_stat_archiver");
            p.set_archive_command("/bin/true");
            let run = check(env, p, &["--archive-timeout", "10"]);
            p.set_archive_command(&p.archive_command);
            // /bin/true must not have "archived" anything meanwhile (the test's
            // own precondition: a segment lost to it would be a gap).
            assert_eq!(
                p.pg.psql("select archived_count from pg_stat_archiver"),
                before,
                "a segment was archived by /bin/true during the check"
            );
            assert_ne!(run.code, Some(0), "check must fail:\n{}", run.stderr);
            run.expect_code(EXIT_USAGE);
            expect_error_with_hint(&run, "archive_command");
            assert!(
                run.stderr.contains("/bin/true"),
                "the error should quote the archive_command found:\n{}",
                run.stderr
            );
        },
    );

    cases.run(
        "check: archive_command for another stanza fails with a hint",
        || {
            let other = p
                .repo
                .with_stanza("not-this-one")
                .archive_command(env.bin());
            p.set_archive_command(&other);
            let run = check(env, p, &["--archive-timeout", "3"]);
            p.set_archive_command(&p.archive_command);
            p.release_archiving();
            // Only the end-to-end proof can tell (the stanza may come from
            // a configuration file): the segment never arrives.
            assert_ne!(
                run.code,
                Some(0),
                "check must fail when archive_command archives into another stanza:\n{}",
                run.stderr
            );
            run.expect_code(EXIT_TIMEOUT);
            expect_error_with_hint(&run, "archiving does not work");
        },
    );
}

/// Two concurrent backups: the first holds the lock while it waits for the
/// (held back) archive; the second, and an expire, stop with exit 9 naming
/// it; check times out (exit 8); once archiving goes on the first completes.
/// Returns its label.
fn concurrent_backups(env: &TestEnv, p: &Primary) -> String {
    p.hold_archiving();
    let first = spawn_backup(env, p, 120);
    let lock = wait_for_lock(&p.repo, None, "a backup waits for the archive");
    let pid = lock["pid"].as_u64().expect("pid in the lock");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_eq!(lock["command"], "backup", "lock: {lock:#}");
        let cmd = cmdline(pid);
        assert!(
            cmd.contains("pgvault") && cmd.contains("backup"),
            "the lock names pid {pid}, which is not the running backup ({cmd:?})"
        );
        let second = run_backup(env, p);
        second.expect_code(EXIT_LOCKED);
        let host = hostname();
        expect_error_with_hint(
            &second,
            &format!("is locked by backup (pid {pid} on {host}, since "),
        );
        assert!(
            second.stdout.trim().is_empty(),
            "the refused backup printed {:?}",
            second.stdout
        );
        assert!(
            second.elapsed < Duration::from_secs(30),
            "the refused backup should stop at once, took {:?}",
            second.elapsed
        );
        let ex = pgvault(env, p, &["expire", "--retention-full", "1"]);
        ex.expect_code(EXIT_LOCKED);
        expect_error_with_hint(&ex, &format!("locked by backup (pid {pid}"));
        // check does not take the lock; with archiving held it times out.
        let ck = check(env, p, &["--archive-timeout", "3"]);
        ck.expect_code(EXIT_TIMEOUT);
        expect_error_with_hint(&ck, "archiving does not work");
        // The holder still holds it.
        assert_eq!(
            read_lock(&p.repo).and_then(|l| l["pid"].as_u64()),
            Some(pid),
            "the refused backup or expire touched the holder's lock"
        );
    }));
    p.release_archiving();
    let run = finish(first, PGVAULT_TIMEOUT);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    let label = label_of(&run);
    assert!(
        !lock_path(&p.repo).exists(),
        "the lock is still there after the backup finished"
    );
    label
}

/// Two backups started at the same moment (cron firing twice): exactly one
/// completes, the other exits 9 naming a backup as the holder. Returns the
/// label of the one that ran.
fn started_at_once(env: &TestEnv, p: &Primary) -> String {
    let a = spawn_backup(env, p, 120);
    let b = spawn_backup(env, p, 120);
    let (a, b) = std::thread::scope(|s| {
        let b = s.spawn(|| finish(b, PGVAULT_TIMEOUT));
        let a = finish(a, PGVAULT_TIMEOUT);
        (a, b.join().expect("join"))
    });
    let (won, lost) = match (a.code, b.code) {
        (Some(0), _) => (a, b),
        (_, Some(0)) => (b, a),
        _ => panic!(
            "one of two backups started at once must complete; got exits {:?} and {:?}\n\
             --- stderr\n{}\n--- stderr\n{}",
            a.code, b.code, a.stderr, b.stderr
        ),
    };
    lost.expect_code(EXIT_LOCKED);
    expect_error_with_hint(&lost, "is locked by backup (pid ");
    assert!(lost.stdout.trim().is_empty(), "{:?}", lost.stdout);
    assert!(!lock_path(&p.repo).exists(), "the lock is still there");
    label_of(&won)
}

/// A backup SIGKILLed while it holds the lock: the next one is refused
/// naming the dead holder; the lock says it expires within 5 minutes; once
/// past (the lock object rewritten with an expiry in the past, as 5 minutes
/// later) a backup takes it over and completes. Returns its label.
fn stale_lock(env: &TestEnv, p: &Primary) -> String {
    p.hold_archiving();
    let victim = spawn_backup(env, p, 120);
    let lock = wait_for_lock(&p.repo, None, "a backup waits for the archive");
    let pid = lock["pid"].as_u64().expect("pid in the lock");
    assert!(
        cmdline(pid).contains("backup"),
        "the lock names pid {pid}, not the running backup"
    );
    let killed = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success(), "kill -KILL {pid}");
    let run = finish(victim, Duration::from_secs(30));
    assert_ne!(run.code, Some(0), "the killed backup exited 0");
    let expires = read_lock(&p.repo).expect("a killed holder leaves its lock behind")["expires_at"]
        .as_i64()
        .expect("expires_at");
    assert!(
        expires <= unix_now() + 300 + 5,
        "a lock must expire within 5 minutes of its last renewal; this one expires in {}s",
        expires - unix_now()
    );
    // The same lock as seen from another host, which cannot tell whether
    // pid {pid} lives: it must wait for the expiry.
    let path = lock_path(&p.repo);
    let original = fs::read(&path).expect("read the lock");
    let rewrite = |edit: &dyn Fn(&mut Value)| {
        let mut json: Value =
            serde_json::from_slice(&decode_envelope(&original)).expect("lock JSON");
        edit(&mut json);
        let tmp = path.with_file_name("stanza.lock.it-rewrite");
        fs::write(
            &tmp,
            encode_envelope(&original, &serde_json::to_vec_pretty(&json).expect("json")),
        )
        .expect("write the lock");
        chown(&tmp, env.uid, env.gid);
        fs::rename(&tmp, &path).expect("rename the lock");
    };
    rewrite(&|j| {
        j["host"] = Value::from("another-host");
        j["boot_id"] = Value::Null;
    });
    let refused = run_backup(env, p);
    let refusal = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        refused.expect_code(EXIT_LOCKED);
        expect_error_with_hint(
            &refused,
            &format!("locked by backup (pid {pid} on another-host"),
        );
    }));
    // On this host a holder that no longer exists is known to be gone: its
    // lock is taken over at once, with no wait for the expiry.
    rewrite(&|_| {});
    p.release_archiving();
    let run = run_backup(env, p);
    let label = label_of(&run);
    assert!(
        run.stderr.contains("stale lock") && run.stderr.contains("no longer exists"),
        "taking over a dead holder's lock should be logged with why, got:\n{}",
        run.stderr
    );
    assert!(!path.exists(), "the lock is still there after the backup");
    if let Err(e) = refusal {
        std::panic::resume_unwind(e);
    }
    label
}

/// `expire --dry-run` deletes nothing and says what it would do.
#[track_caller]
fn dry_run(env: &TestEnv, p: &Primary, policy: &[&str], would: &[&str]) {
    let before = all_files(&stanza_dir(&p.repo));
    let mut args = vec!["expire"];
    args.extend_from_slice(policy);
    args.push("--dry-run");
    let run = pgvault(env, p, &args);
    run.ok();
    let after = all_files(&stanza_dir(&p.repo));
    let gone: Vec<_> = before.difference(&after).collect();
    assert!(gone.is_empty(), "expire --dry-run deleted {gone:?}");
    for l in would {
        assert!(
            run.stdout.contains(&format!("would expire backup {l}")),
            "expire --dry-run should say it would expire {l}:\n{}",
            run.stdout
        );
    }
}

/// `expire POLICY`: exactly `gone` are expired (by info), and exactly the
/// WAL before `first_kept`'s start is deleted.
#[track_caller]
fn expire_and_check(
    env: &TestEnv,
    p: &Primary,
    policy: &[&str],
    all: &[String],
    gone: &[String],
    first_kept: &str,
) {
    let i = info(env, &p.repo);
    assert_eq!(labels(&i), all, "backups before expire");
    let wal_start = field(&backup_info(&i, first_kept), "wal_start");
    let wal_before = wal_files(&p.repo);
    let history_before: BTreeSet<PathBuf> = all_files(&stanza_dir(&p.repo).join("archive"))
        .into_iter()
        .filter(|f| f.to_string_lossy().contains(".history"))
        .collect();
    assert!(
        wal_before.iter().any(|n| n[..24] < *wal_start),
        "test precondition: WAL before {wal_start} to expire"
    );

    let mut args = vec!["expire"];
    args.extend_from_slice(policy);
    let run = pgvault(env, p, &args);
    run.ok();
    for l in gone {
        assert!(
            run.stdout.contains(&format!("expired backup {l}")),
            "expire should report `expired backup {l}`:\n{}",
            run.stdout
        );
    }
    let kept: Vec<String> = all.iter().filter(|l| !gone.contains(l)).cloned().collect();
    for l in &kept {
        assert!(
            run.stdout.contains(&format!("kept backup {l}")),
            "expire should report `kept backup {l}`:\n{}",
            run.stdout
        );
    }

    let i = info(env, &p.repo);
    assert_eq!(
        labels(&i),
        kept,
        "after expire {policy:?} the backups should be {kept:?}:\n{}",
        run.stdout
    );
    for l in gone {
        assert!(
            !stanza_dir(&p.repo)
                .join("backup")
                .join(l)
                .join("manifest.pgv")
                .exists(),
            "expired backup {l} left its manifest"
        );
        let leftover = all_files(&stanza_dir(&p.repo).join("backup").join(l));
        assert!(leftover.is_empty(), "expired backup {l} left {leftover:?}");
    }

    let wal_after = wal_files(&p.repo);
    let removed: BTreeSet<&String> = wal_before.difference(&wal_after).collect();
    let want_removed: BTreeSet<&String> =
        wal_before.iter().filter(|n| n[..24] < *wal_start).collect();
    assert_eq!(
        removed, want_removed,
        "expire must delete exactly the WAL before {wal_start} (the start of {first_kept})"
    );
    assert!(
        run.stdout.contains(&format!(
            "expired {} WAL objects before {wal_start}",
            removed.len()
        )),
        "expire should say how many WAL objects it deleted before {wal_start}:\n{}",
        run.stdout
    );
    let tl = timeline1(&i);
    assert_eq!(
        tl["first_segment"], wal_start,
        "the first archived segment after expire should be {first_kept}'s wal_start: {tl:#}"
    );
    assert_eq!(
        tl["gaps"],
        Value::Array(vec![]),
        "gaps after expire: {tl:#}"
    );
    // Every segment from the kept start to the last is still there (data
    // object and claim).
    let last = field(&tl, "last_segment");
    let segs = archived_segments(&p.repo);
    for s in segment_range(&wal_start, &last, p.pg.wal_segment_size()) {
        assert!(
            segs.contains(&s),
            "expire deleted {s}, which {first_kept} needs"
        );
        assert!(
            wal_after.contains(&format!("{s}.claim")),
            "expire deleted the claim of {s}"
        );
    }
    let history_after: BTreeSet<PathBuf> = all_files(&stanza_dir(&p.repo).join("archive"))
        .into_iter()
        .filter(|f| f.to_string_lossy().contains(".history"))
        .collect();
    assert_eq!(history_before, history_after, "history files must stay");
    assert!(!lock_path(&p.repo).exists(), "expire left its lock behind");
}

/// verify on the live repository: exit 0, no problems (text, or JSON).
fn verify_clean(env: &TestEnv, repo: &Repo, json: bool) {
    if !json {
        let run = repo.run(env, As::Root, &["verify"], env.dir());
        run.ok();
        assert!(
            run.stdout.contains("no problems"),
            "verify of a clean repository:\n{}",
            run.stdout
        );
        return;
    }
    let run = repo.run(env, As::Root, &["verify", "--output", "json"], env.dir());
    run.ok();
    let v: Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("verify --output json is not JSON ({e}):\n{}", run.stdout));
    assert_eq!(v["schema_version"], 1, "{v:#}");
    assert_eq!(v["stanza"], repo.stanza.as_str(), "{v:#}");
    assert_eq!(v["problems"], Value::Array(vec![]), "{v:#}");
}

/// A copy (`cp -a`) of the primary's local repository, to damage.
fn copy_repo(env: &TestEnv, p: &Primary, tag: &str) -> Repo {
    let root = env.dir().join(format!("repo-{tag}-{}", unique()));
    let status = Command::new("cp")
        .arg("-a")
        .arg(p.repo.local.as_ref().expect("local"))
        .arg(&root)
        .status()
        .expect("cp");
    assert!(status.success(), "cp -a the repository");
    Repo {
        url: root.display().to_string(),
        local: Some(root),
        ..p.repo.clone()
    }
}

/// verify's problem lines (`<kind>: <what>: <detail>`) in its output.
fn problem_lines(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|l| {
            ["corrupt", "missing", "gap", "conflict", "unreadable", "key"]
                .iter()
                .any(|k| l.starts_with(&format!("{k}: ")))
        })
        .collect()
}

/// A copy of the repository where one WAL object cannot be read (mode
/// 000, verify run as the unprivileged user): it is listed as
/// `unreadable`, and since nothing that was read is damaged verify exits 5
/// (the store failed) with one error line and a hint — not 11 (damage),
/// which a transfer that failed every retry used to give.
fn verify_unreadable(env: &TestEnv, p: &Primary) {
    let copy = copy_repo(env, p, "unread");
    let status = Command::new("chown")
        .arg("-R")
        .arg(format!("{}:{}", env.uid, env.gid))
        .arg(copy.local.as_ref().expect("local"))
        .status()
        .expect("chown");
    assert!(status.success(), "chown the copy to the unprivileged user");
    let segs: Vec<String> = archived_segments(&copy).into_iter().collect();
    let seg = &segs[segs.len() / 2];
    let obj = copy.local_wal_objects(seg).remove(0);
    let obj_name = obj.file_name().unwrap().to_string_lossy().into_owned();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&obj, fs::Permissions::from_mode(0o000)).expect("chmod 000");

    let run = copy.run(env, As::PgUser, &["verify"], env.dir());
    run.expect_code(5);
    let problems = problem_lines(&run.stdout);
    assert!(
        problems.len() == 1
            && problems[0].starts_with("unreadable: ")
            && problems[0].contains(&obj_name),
        "one problem, the unreadable {obj_name}:\n{}",
        run.stdout
    );
    let stderr: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| !l.starts_with("pgvault: "))
        .collect();
    assert!(
        stderr.len() == 2
            && stderr[0].starts_with("error: ")
            && stderr[0].contains("1 object(s) could not be read, and nothing read was damaged")
            && stderr[0].contains(&obj_name)
            && stderr[1].starts_with("hint: "),
        "one error line naming the object, and a hint:\n{}",
        run.stderr
    );
}

/// A copy of the repository with three kinds of damage; verify names each.
fn verify_damaged(env: &TestEnv, p: &Primary, backup_label: &str) {
    let copy = copy_repo(env, p, "copy");
    let i = info(env, &p.repo);
    let tl = timeline1(&i);
    let segs = segment_range(
        &field(&tl, "first_segment"),
        &field(&tl, "last_segment"),
        p.pg.wal_segment_size(),
    );
    assert!(
        segs.len() >= 5,
        "test precondition: a timeline of 5+ segments: {segs:?}"
    );
    // A segment in the middle goes (claim and data): a gap.
    let gap = segs[segs.len() / 2].clone();
    // Another one gets a flipped byte.
    let flipped = segs[segs.len() / 2 + 1].clone();
    let mut removed = 0;
    for path in all_files(&stanza_dir(&copy).join("archive")) {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name == format!("{gap}.claim")
            || (name.starts_with(&format!("{gap}-")) && name.ends_with(".zst"))
        {
            fs::remove_file(&path).expect("remove");
            removed += 1;
        }
    }
    assert_eq!(
        removed, 2,
        "test precondition: {gap} has a claim and a data object"
    );
    let wal_obj = copy.local_wal_objects(&flipped);
    assert_eq!(wal_obj.len(), 1, "{flipped}: {wal_obj:?}");
    let wal_obj = wal_obj[0].clone();
    let mut bytes = fs::read(&wal_obj).expect("read");
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    fs::write(&wal_obj, bytes).expect("write");
    let wal_obj_name = wal_obj.file_name().unwrap().to_string_lossy().into_owned();
    // The largest data object of a backup goes.
    let data_dir = stanza_dir(&copy)
        .join("backup")
        .join(backup_label)
        .join("data");
    let victim = all_files(&data_dir)
        .into_iter()
        .max_by_key(|f| fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .unwrap_or_else(|| panic!("no objects under {}", data_dir.display()));
    fs::remove_file(&victim).expect("remove backup object");
    let victim_name = victim.file_name().unwrap().to_string_lossy().into_owned();

    let run = copy.run(env, As::Root, &["verify"], env.dir());
    run.expect_code(EXIT_VERIFY);
    let lines: Vec<&str> = run.stdout.lines().collect();
    let has = |kind: &str, needle: &str| {
        lines
            .iter()
            .any(|l| l.starts_with(&format!("{kind}: ")) && l.contains(needle))
    };
    assert!(
        has("corrupt", &wal_obj_name),
        "verify should report `corrupt: ...{wal_obj_name}: ...`:\n{}",
        run.stdout
    );
    assert!(
        has("missing", &victim_name),
        "verify should report `missing: ...{victim_name}: ...`:\n{}",
        run.stdout
    );
    assert!(
        has("gap", &gap),
        "verify should report `gap: {gap}...: ...`:\n{}",
        run.stdout
    );
    // Nothing else is reported: every problem line is about one of the three.
    let problems = problem_lines(&run.stdout);
    for l in &problems {
        assert!(
            l.contains(&wal_obj_name) || l.contains(&victim_name) || l.contains(&gap),
            "verify reports a problem the test did not cause: {l}\n{}",
            run.stdout
        );
        let parts: Vec<&str> = l.splitn(3, ": ").collect();
        assert!(
            parts.len() == 3 && !parts[2].is_empty(),
            "problem line not `<kind>: <what>: <detail>`: {l}"
        );
    }
    // Problem lines first, then a summary.
    assert!(
        lines
            .last()
            .is_some_and(|l| l.contains(&format!("{} problem", problems.len()))),
        "verify should end with a summary counting {} problems:\n{}",
        problems.len(),
        run.stdout
    );

    let run = copy.run(env, As::Root, &["verify", "--output", "json"], env.dir());
    run.expect_code(EXIT_VERIFY);
    let v: Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("verify --output json is not JSON ({e}):\n{}", run.stdout));
    assert_eq!(v["schema_version"], 1, "{v:#}");
    assert_eq!(v["stanza"], copy.stanza.as_str(), "{v:#}");
    let probs = v["problems"]
        .as_array()
        .unwrap_or_else(|| panic!("problems[]: {v:#}"));
    assert_eq!(
        probs.len(),
        problems.len(),
        "JSON and text list the same problems: {v:#}"
    );
    let has_json = |kind: &str, needle: &str| {
        probs.iter().any(|p| {
            p["kind"] == kind
                && p["what"].as_str().is_some_and(|w| w.contains(needle))
                && p["detail"].as_str().is_some_and(|d| !d.is_empty())
        })
    };
    assert!(has_json("corrupt", &wal_obj_name), "{v:#}");
    assert!(has_json("missing", &victim_name), "{v:#}");
    assert!(has_json("gap", &gap), "{v:#}");
}

#[test]
fn operations_local_repo() {
    let env = TestEnv::new();
    let repo = env.local_repo("ops");
    let mut cases = Cases::new();

    // The primary: exact commit times, archiving through a flag-guarded
    // archive_command.
    let mut pg = Cluster::init(
        &env,
        InitOpts {
            wal_segsize_mb: Some(1),
            data_checksums: true,
        },
    );
    pg.set_conf("track_commit_timestamp = on");
    let pgdata = pg.pgdata().display().to_string();
    repo.run(
        &env,
        As::PgUser,
        &["stanza-create", "--pgdata", &pgdata],
        env.dir(),
    )
    .ok();
    pg.start_archiving(&env, &repo);
    let block = env.dir().join("archiving-held");
    let archive_command = format!(
        "test ! -e {} && {}",
        block.display(),
        repo.archive_command(env.bin())
    );
    let mut p = Primary {
        pg,
        repo,
        block,
        archive_command,
    };
    p.set_archive_command(&p.archive_command);
    p.pg.psql("create table t(id serial primary key, tag text not null)");
    p.pg.psql("create table if not exists pgvault_it_switch(x int)");
    p.release_archiving();

    check_cases(&env, &p, &mut cases);

    // Two backups started at once (B1), two concurrent backups while the
    // archive is held back (B2), then a stale lock (B3).
    p.row("before-b1");
    let b1 = cases
        .run("two backups started at once: exactly one runs", || {
            started_at_once(&env, &p)
        })
        .unwrap_or_else(|| backup(&env, &p));
    p.row("after-b1");
    let b2 = cases
        .run(
            "two concurrent backups: one proceeds, the other exits 9 naming it",
            || concurrent_backups(&env, &p),
        )
        .unwrap_or_else(|| backup(&env, &p));
    p.row("after-b2");
    let b3 = cases
        .run(
            "a killed backup's lock: taken over at once on its host, refused until it expires elsewhere",
            || stale_lock(&env, &p),
        )
        .unwrap_or_else(|| {
            // Go on with the other cases: no lock, archiving running.
            let _ = fs::remove_file(lock_path(&p.repo));
            p.release_archiving();
            backup(&env, &p)
        });
    // Commits between B3 and B4; the PITR target is between them.
    // (and WAL switches, so the timeline has segments enough to damage one
    // in the middle).
    for _ in 0..3 {
        p.row("f1");
        p.pg.switch_wal();
    }
    let f1_last = p.pg.psql("select max(id) from t");
    let target_f = p.commit_time(&f1_last);
    std::thread::sleep(Duration::from_millis(50));
    for _ in 0..3 {
        p.row("f2");
        p.pg.switch_wal();
    }
    let b4 = backup(&env, &p);
    let b4_done = Instant::now();
    p.row("after-b4");

    let all4 = vec![b1.clone(), b2.clone(), b3.clone(), b4.clone()];
    cases.run(
        "expire --retention-full 2 --dry-run deletes nothing",
        || {
            dry_run(&env, &p, &["--retention-full", "2"], &[&b1, &b2]);
        },
    );
    cases.run(
        "expire --retention-full 2: the two oldest and exactly the WAL before the third's start",
        || {
            expire_and_check(
                &env,
                &p,
                &["--retention-full", "2"],
                &all4,
                &[b1.clone(), b2.clone()],
                &b3,
            )
        },
    );
    cases.run("verify: clean repository after expire (JSON)", || {
        verify_clean(&env, &p.repo, true)
    });
    cases.run(
        "PITR inside the kept range after retention-full expire",
        || {
            let want = p.rows_until(&target_f);
            let got_ids = ids(&want);
            assert!(
                got_ids.contains(&f1_last.parse::<i64>().unwrap()),
                "test precondition: the target includes the f1 rows"
            );
            let rows = restore_to_time(&env, &p, "r-full", &target_f, &b3);
            assert_eq!(
                rows, want,
                "a restore to {target_f} (between {b3} and {b4}) must hold exactly the rows \
             committed up to then"
            );
        },
    );
    cases.run(
        "verify: a flipped WAL byte, a deleted backup object and a WAL gap are each named",
        || verify_damaged(&env, &p, &b4),
    );
    cases.run(
        "verify: an object it cannot read is unreadable, exit 5 (the store failed), not 11",
        || verify_unreadable(&env, &p),
    );

    // More than the window (1 minute) of commits after B4, then B5: the
    // window's oldest moment is after B4's stop, so B4 is the base it needs
    // and B3 is not needed any more.
    let until = b4_done + Duration::from_secs(63);
    while Instant::now() < until {
        p.row("w");
        std::thread::sleep(Duration::from_millis(700));
    }
    let b5 = backup(&env, &p);
    p.row("after-b5");
    let all3 = vec![b3.clone(), b4.clone(), b5.clone()];
    // Stop times as the server reported them, read before expire.
    let stops = info(&env, &p.repo);
    let b4_stop = field(&backup_info(&stops, &b4), "stop_time");
    let b5_stop = field(&backup_info(&stops, &b5), "stop_time");
    cases.run(
        "expire --retention-window 1m --dry-run deletes nothing",
        || {
            dry_run(&env, &p, &["--retention-window", "1m"], &[&b3]);
        },
    );
    cases.run(
        "expire --retention-window 1m: keeps the base of the window's oldest moment",
        || {
            expire_and_check(
                &env,
                &p,
                &["--retention-window", "1m"],
                &all3,
                std::slice::from_ref(&b3),
                &b4,
            )
        },
    );
    cases.run("restore to the retention window's oldest moment", || {
        let edge = p.pg.psql(&format!(
            "select ('{b5_stop}'::timestamptz - interval '1 minute')::text"
        ));
        let want = p.rows_until(&edge);
        let since_b4: i64 =
            p.pg.psql(&format!(
                "select count(*) from t where pg_xact_commit_timestamp(xmin) > '{b4_stop}' \
                 and pg_xact_commit_timestamp(xmin) <= '{edge}'"
            ))
            .parse()
            .unwrap();
        let after_edge: i64 =
            p.pg.psql(&format!(
                "select count(*) from t where pg_xact_commit_timestamp(xmin) > '{edge}'"
            ))
            .parse()
            .unwrap();
        assert!(
            since_b4 > 0 && after_edge > 0,
            "test precondition: commits between {b4}'s stop and the edge {edge} ({since_b4}) \
             and after it ({after_edge})"
        );
        let rows = restore_to_time(&env, &p, "r-window", &edge, &b4);
        assert_eq!(
            rows, want,
            "a restore to the window's oldest moment {edge} must hold exactly the rows \
             committed up to then"
        );
    });
    cases.run("verify: clean repository after the window expire", || {
        verify_clean(&env, &p.repo, false)
    });
    cases.run(
        "info: the recoverable window in commit times, restore points, the RPO",
        || recoverable_window(&env, &p),
    );
    cases.run(
        "restore refuses targets the archive does not reach, leaving --pgdata alone",
        || refused_targets(&env, &p),
    );
    cases.run(
        "a record failing its CRC is archived, warned about with its LSN, flagged by info and verify",
        || damaged_record(&env, &p),
    );

    p.pg.stop();
    eprintln!("operations: {:.1?}", cases.start.elapsed());
    cases.finish();
}

/// Microseconds since the Unix epoch of a time PostgreSQL can parse.
fn micros(p: &Primary, time: &str) -> i64 {
    p.pg.psql(&format!(
        "select (extract(epoch from '{time}'::timestamptz) * 1000000)::bigint"
    ))
    .parse()
    .unwrap_or_else(|e| panic!("{time:?}: {e}"))
}

/// A restore point and a last row, archived: `info` shows the window up to
/// that commit (read from the WAL records), the restore point with its LSN,
/// and the RPO.
fn recoverable_window(env: &TestEnv, p: &Primary) {
    let rp_end = p.pg.psql("select pg_create_restore_point('ops_rp')::text");
    p.row("last");
    let last_row = micros(p, &p.commit_time("(select max(id) from t)"));
    let seg = p.pg.switch_wal();
    p.pg.wait_archived(&seg, ARCHIVE_TIMEOUT);
    // Only the switch's own insert commits after the last row before the
    // switch; background commits (autovacuum) may follow it.
    let newest_now = micros(
        p,
        &p.pg
            .psql("select timestamp::text from pg_last_committed_xact()"),
    );

    let v = info(env, &p.repo);
    let rc = &timeline1(&v)["recoverable"];
    let to = micros(
        p,
        rc["to_time"]
            .as_str()
            .unwrap_or_else(|| panic!("no to_time: {v:#}")),
    );
    assert!(
        last_row <= to && to <= newest_now,
        "the last archived commit {to} should be the switch's insert, between the last row's \
         commit {last_row} and the newest commit {newest_now}: {rc:#}"
    );
    assert_eq!(rc["unsummarized_segments"], 0, "{rc:#}");
    let rp = rc["restore_points"]
        .as_array()
        .and_then(|a| a.iter().find(|r| r["name"] == "ops_rp"))
        .unwrap_or_else(|| panic!("restore point ops_rp not in info: {rc:#}"));
    assert_eq!(
        lsn_of(&field(rp, "lsn")),
        lsn_of(&rp_end),
        "info should show the restore point's LSN as pg_create_restore_point returned it: {rp:#}"
    );
    assert_eq!(
        v["newest_commit_time"], rc["to_time"],
        "the newest archived commit is the last on timeline 1: {v:#}"
    );
    let rpo = v["rpo_seconds"].as_f64().unwrap_or(-1.0);
    assert!((0.0..600.0).contains(&rpo), "rpo_seconds {rpo}: {v:#}");

    // A segment archived without a summary (as by an older pgvault): info
    // says the window may be incomplete, backfill writes the summary, and
    // the window is whole again. (Without the catalog, which caches it.)
    let mut files = BTreeSet::new();
    files_under(&stanza_dir(&p.repo).join("archive"), &mut files);
    let summaries: Vec<PathBuf> = files
        .into_iter()
        .filter(|f| {
            f.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&seg) && n.ends_with(".summary"))
        })
        .collect();
    assert_eq!(summaries.len(), 1, "one summary for {seg}: {summaries:?}");
    fs::remove_file(&summaries[0]).expect("remove the summary");
    let no_catalog = |args: &[&str]| {
        let mut all = vec!["--catalog", "off"];
        all.extend_from_slice(args);
        pgvault(env, p, &all)
    };
    let run = no_catalog(&["info", "--output", "json"]);
    let v2: Value = serde_json::from_str(&run.stdout).expect("info JSON");
    assert_eq!(
        timeline1(&v2)["recoverable"]["unsummarized_segments"],
        1,
        "{v2:#}"
    );
    let run = no_catalog(&["backfill"]);
    run.ok();
    assert!(
        run.stdout.contains("backfill: 1 segment(s) summarized now"),
        "backfill should summarize {seg}:\n{}",
        run.stdout
    );
    assert!(summaries[0].exists(), "backfill wrote no summary for {seg}");
    let run = no_catalog(&["info", "--output", "json"]);
    let v3: Value = serde_json::from_str(&run.stdout).expect("info JSON");
    let rc3 = &timeline1(&v3)["recoverable"];
    assert_eq!(rc3["unsummarized_segments"], 0, "{rc3:#}");
    assert_eq!(rc3["to_time"], rc["to_time"], "{rc3:#}");
}

fn lsn_of(s: &str) -> u64 {
    let (hi, lo) = s
        .split_once('/')
        .unwrap_or_else(|| panic!("not an LSN: {s:?}"));
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// A time after the last archived commit, and a restore point that does not
/// exist: refused (exit 2, like any target no backup reaches) before
/// anything is written, with the window.
fn refused_targets(env: &TestEnv, p: &Primary) {
    let dir = env.mkdir(&format!("refused-{}", unique()), As::PgUser);
    let pgdata = dir.display().to_string();
    let v = info(env, &p.repo);
    let to_time = field(&timeline1(&v)["recoverable"], "to_time");
    let later = p.pg.psql(&format!(
        "select ('{to_time}'::timestamptz + interval '1 hour')::text"
    ));
    for (args, needle) in [
        (
            vec!["--target-time", later.as_str()],
            "is after the last archived commit".to_string(),
        ),
        (
            vec!["--target-name", "no_such_point"],
            "restore point \"no_such_point\" is not in the archived WAL (restore points there: "
                .to_string(),
        ),
    ] {
        let mut all = vec!["restore", "--pgdata", &pgdata];
        all.extend(args.iter().copied());
        let run = pgvault(env, p, &all);
        run.expect_code(EXIT_USAGE);
        expect_error_with_hint(&run, &needle);
        assert!(
            run.stderr.contains("recoverable on timeline 1 from backup")
                && run.stderr.contains("(last archived commit)"),
            "the refusal should name the window:\n{}",
            run.stderr
        );
        assert!(
            run.stderr.contains("--no-target-check"),
            "the hint should name --no-target-check:\n{}",
            run.stderr
        );
        assert_eq!(
            fs::read_dir(&dir).expect("read the target dir").count(),
            0,
            "a refused restore must not write into --pgdata"
        );
    }
    // The restore point that exists is accepted (and not refused as unknown).
    let run = pgvault(
        env,
        p,
        &["restore", "--pgdata", &pgdata, "--target-name", "ops_rp"],
    );
    run.ok();
}

/// A copy of an archived segment with one byte flipped inside a record,
/// pushed into a stanza of its own: archived all the same (refusing would
/// stop the primary), with a warning naming the record's LSN; `info` lists
/// it and `verify` reports it (exit 11).
fn damaged_record(env: &TestEnv, p: &Primary) {
    let v = info(env, &p.repo);
    let name = field(&timeline1(&v), "last_segment");
    let dir = env.mkdir(&format!("damaged-{}", unique()), As::PgUser);
    let path = dir.join(&name);
    let path_s = path.display().to_string();
    p.repo
        .run(env, As::PgUser, &["archive-get", &name, &path_s], &dir)
        .ok();
    // A record with room inside its page, from pg_waldump.
    let dump = env.run_ok(As::PgUser, &[&env.pg("pg_waldump"), &path_s], &[], &dir);
    let (rec_lsn, _) = dump
        .lines()
        .filter_map(|l| {
            let tot: u64 = l
                .split("len (rec/tot):")
                .nth(1)?
                .split(',')
                .next()?
                .split('/')
                .nth(1)?
                .trim()
                .parse()
                .ok()?;
            let lsn = lsn_of(l.split("lsn: ").nth(1)?.split(',').next()?);
            (tot >= 64 && (lsn % 8192) + tot <= 8192).then_some((lsn, tot))
        })
        .next()
        .unwrap_or_else(|| panic!("no suitable record in pg_waldump's output:\n{dump}"));
    let mut bytes = fs::read(&path).expect("read the segment");
    let off = (rec_lsn % (1 << 20)) as usize + 40;
    bytes[off] ^= 0x5a;
    fs::write(&path, &bytes).expect("write the damaged segment");
    let want_lsn = format!("{:X}/{:X}", rec_lsn >> 32, rec_lsn & 0xFFFF_FFFF);

    let dmg = p.repo.with_stanza("ops-damaged");
    dmg.run(
        env,
        As::PgUser,
        &["stanza-create", "--pgdata", &p.pgdata()],
        env.dir(),
    )
    .ok();
    let run = dmg.run(env, As::PgUser, &["archive-push", &path_s], &dir);
    run.ok();
    assert!(
        run.stderr.contains(&format!(
            "the WAL record at {want_lsn} fails its CRC-32C check"
        )),
        "archive-push should warn about the record at {want_lsn}:\n{}",
        run.stderr
    );
    let v = info(env, &dmg);
    assert_eq!(
        timeline1(&v)["damaged_records"],
        serde_json::json!([format!("{name} at {want_lsn}")]),
        "{v:#}"
    );
    let run = dmg.run(env, As::PgUser, &["verify"], env.dir());
    run.expect_code(EXIT_VERIFY);
    assert!(
        run.stdout.contains(&format!(
            "damaged-record: {name}: the WAL record at {want_lsn} fails its CRC-32C check"
        )),
        "verify should name the damaged record:\n{}",
        run.stdout
    );
}

/// `check` on a server with `archive_mode = off` (and an archive_command
/// calling pgvault): exit 7, "archive_mode is off", with a hint — as
/// docs/operations.md and docs/exit-codes.md say. (PostgreSQL shows
/// archive_command as "(disabled)" while archive_mode is off.)
#[test]
fn check_archive_mode_off() {
    let env = TestEnv::new();
    let repo = env.local_repo("ops-off");
    let mut pg = Cluster::init(
        &env,
        InitOpts {
            wal_segsize_mb: Some(1),
            data_checksums: false,
        },
    );
    let pgdata = pg.pgdata().display().to_string();
    repo.run(
        &env,
        As::PgUser,
        &["stanza-create", "--pgdata", &pgdata],
        env.dir(),
    )
    .ok();
    pg.set_conf(&format!(
        "archive_mode = off\narchive_command = '{}'",
        repo.archive_command(env.bin())
    ));
    pg.start();
    let p = Primary {
        pg,
        repo,
        block: PathBuf::new(),
        archive_command: String::new(),
    };
    assert_eq!(p.pg.psql("show archive_mode"), "off");
    let run = check(&env, &p, &["--archive-timeout", "5"]);
    let mut pg = p.pg;
    pg.stop();
    run.expect_code(EXIT_POSTGRES);
    expect_error_with_hint(&run, "archive_mode is off");
}
