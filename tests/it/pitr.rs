//! Base backups, restore and point-in-time recovery end to end (issue 3),
//! against real PostgreSQL clusters archiving through the real `pgvault`
//! binary, on a local-directory repository and on moto's S3.
//!
//! One primary and one backup per repository are shared by all the cases of
//! that repository (CI time is tight), so each repository is one test
//! function that runs the cases in an order that matters:
//!
//! 1. the backup is taken while pgbench writes (a custom script that moves
//!    money between accounts and logs every transaction in `ledger`);
//! 2. rows A, a noted time T, a restore point and rows B are written;
//! 3. clones restored with `--archive-mode off` to T, to the restore point,
//!    to an LSN and to `immediate` (each started, promoted and checked;
//!    `pg_amcheck` while running, `pg_checksums --check` after a clean stop);
//! 4. a `--delta` restore over the `immediate` clone, whose
//!    `postgresql.auto.conf` still holds the earlier recovery settings;
//! 5. refusal of a non-empty directory;
//! 6. a `--standby` restore that follows the primary through the archive;
//! 7. a "restored primary" (`--archive-mode preserve`) promoted to timeline
//!    2, writing rows C into the same stanza, then a PITR on timeline 2;
//! 8. (local repository) a corrupted backup object makes restore fail.
//!
//! The PITR-by-time case also runs on PostgreSQL 14, 16, 17 and 18 with the
//! binaries `scripts/test.sh` fetches (`PGVAULT_TEST_PGBIN_<MAJOR>`).

use crate::common::*;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const ARCHIVE_TIMEOUT: Duration = Duration::from_secs(180);

/// The restore point the cases recover to by name.
const RESTORE_POINT: &str = "pitr_after_a";

fn initopts() -> InitOpts {
    InitOpts {
        wal_segsize_mb: Some(1),
        data_checksums: true,
    }
}

// ---------------------------------------------------------------------------
// Helpers: LSNs, pgvault invocations.

/// `X/X` to a number.
pub(crate) fn lsn(s: &str) -> u64 {
    let (hi, lo) = s
        .trim()
        .split_once('/')
        .unwrap_or_else(|| panic!("not an LSN: {s:?}"));
    let hi = u64::from_str_radix(hi, 16).unwrap_or_else(|e| panic!("LSN {s:?}: {e}"));
    let lo = u64::from_str_radix(lo, 16).unwrap_or_else(|e| panic!("LSN {s:?}: {e}"));
    (hi << 32) | lo
}

/// `pgvault restore --pgdata DIR ARGS...` as `who`.
pub(crate) fn restore(env: &TestEnv, repo: &Repo, who: As, pgdata: &Path, args: &[&str]) -> Run {
    let pgdata = pgdata.display().to_string();
    let mut all = vec!["restore", "--pgdata", pgdata.as_str()];
    all.extend_from_slice(args);
    repo.run(env, who, &all, env.dir())
}

/// The error contract for a command that also logs progress on stderr
/// (`pgvault: ...` lines when stderr is not a terminal): exactly one
/// `error: ...` line, naming `needle`; otherwise only `hint:` and progress
/// lines.
#[track_caller]
fn expect_error_line(run: &Run, needle: &str) {
    let lines = run.stderr_lines();
    let errors: Vec<&&str> = lines.iter().filter(|l| l.starts_with("error:")).collect();
    let other: Vec<&&str> = lines
        .iter()
        .filter(|l| {
            !l.starts_with("error:") && !l.starts_with("hint:") && !l.starts_with("pgvault: ")
        })
        .collect();
    assert!(
        errors.len() == 1 && other.is_empty(),
        "`{}` should print one `error:` line (plus `hint:` and progress lines) on stderr, got:\n{}",
        run.what,
        run.stderr
    );
    assert!(
        errors[0].contains(needle),
        "the error line of `{}` should name {needle:?}, got: {}",
        run.what,
        errors[0]
    );
}

/// `pgvault info --output json`.
#[track_caller]
pub(crate) fn info(env: &TestEnv, repo: &Repo) -> Value {
    let run = repo.run(env, As::PgUser, &["info", "--output", "json"], env.dir());
    run.ok();
    serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("info --output json is not JSON ({e}):\n{}", run.stdout))
}

/// The `backups[]` entry of `label`.
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

/// The `timelines[]` entry of timeline `tl`, if any.
pub(crate) fn timeline_info(info: &Value, tl: u64) -> Option<Value> {
    info["timelines"]
        .as_array()?
        .iter()
        .find(|t| t["timeline"].as_u64() == Some(tl))
        .cloned()
}

fn timeline_numbers(info: &Value) -> Vec<u64> {
    info["timelines"]
        .as_array()
        .map(|a| a.iter().filter_map(|t| t["timeline"].as_u64()).collect())
        .unwrap_or_default()
}

/// Rows of `t` per tag, as psql prints `select tag, count(*) ... order by tag`
/// (e.g. "A|10\nB|10"; "" when empty).
const ROWS_BY_TAG: &str = "select tag, count(*) from t group by tag order by tag";

/// Restore with `args` as `who` into a new directory, start, wait for
/// promotion and check the rows of `t`; returns the running clone.
#[track_caller]
pub(crate) fn restore_promoted(
    env: &TestEnv,
    repo: &Repo,
    who: As,
    name: &str,
    args: &[&str],
    want_rows: &str,
) -> Node {
    let mut node = Node::new(env, repo, name);
    restore(env, repo, who, &node.pgdata, args).ok();
    assert!(
        node.pgdata.join("recovery.signal").exists()
            && !node.pgdata.join("standby.signal").exists(),
        "restore should write recovery.signal (and no standby.signal)"
    );
    node.start();
    node.wait_promoted();
    assert_eq!(
        node.psql(ROWS_BY_TAG),
        want_rows,
        "rows of t after restore {args:?}\n--- postgresql.auto.conf\n{}\n--- server log\n{}",
        node.auto_conf(),
        node.log_tail(40)
    );
    node
}

// ---------------------------------------------------------------------------
// The primary.

/// A 1 MiB-segment cluster with data checksums, registered in `repo` and
/// archiving into it, with the table `t(id, tag)` the cases count rows of.
pub(crate) fn primary(env: &TestEnv, repo: &Repo) -> Cluster {
    let mut pg = Cluster::init(env, initopts());
    repo.stanza_create(env, pg.pgdata());
    pg.start_archiving(env, repo);
    pg.psql("create table t(id int primary key, tag text not null)");
    // The table Cluster::switch_wal writes to.
    pg.psql("create table if not exists pgvault_it_switch(x int)");
    pg
}

/// Points in the primary's history after the backup.
pub(crate) struct Marks {
    /// `now()` after rows A committed and before rows B.
    pub(crate) time_a: String,
    /// The WAL insert position right after rows A committed.
    lsn_a: String,
}

/// Rows A (ids 1..10), then the marks and the restore point, then rows B
/// (ids 11..20) and a WAL switch, waiting until it is archived.
pub(crate) fn write_a_then_b(pg: &Cluster) -> Marks {
    pg.psql("insert into t select g, 'A' from generate_series(1, 10) g");
    // The insert position, not pg_current_wal_lsn() (the write position,
    // which may lag behind A's commit record with synchronous_commit = off).
    let lsn_a = pg.psql("select pg_current_wal_insert_lsn()");
    pg.psql(&format!(
        "select pg_create_restore_point('{RESTORE_POINT}')"
    ));
    // The server's clock, read after A's commit returned.
    let time_a = pg.psql("select now()::text");
    std::thread::sleep(Duration::from_millis(1100));
    pg.psql("insert into t select g, 'B' from generate_series(11, 20) g");
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, ARCHIVE_TIMEOUT);
    assert_eq!(
        pg.psql(
            "select count(*) filter (where tag = 'A'), count(*) filter (where tag = 'B') from t"
        ),
        "10|10"
    );
    Marks { time_a, lsn_a }
}

// ---------------------------------------------------------------------------
// Backup under load.

/// pgbench script: move one unit into a random account and log the
/// transaction (with its xid) in `ledger`, atomically. In any consistent
/// state, sum(abalance) = count(ledger).
const BENCH_SCRIPT: &str = "\\set aid random(1, 100000 * :scale)\n\
BEGIN;\n\
UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\n\
INSERT INTO ledger(client) VALUES (:client_id);\n\
END;\n";

/// What the backup taken under pgbench must contain.
struct Ledger {
    /// Ledger ids whose transaction's commit record starts before the
    /// backup's stop LSN: exactly these must be in a `--target immediate`
    /// restore.
    before_stop: BTreeSet<i64>,
    /// How many of them committed while the backup ran (after its start
    /// LSN), to show that the load really overlapped the backup.
    during: usize,
    /// How many committed after the stop LSN.
    after: usize,
}

/// Prepare pgbench tables and `ledger`, then take the shared backup while
/// `pgbench -c 2` writes, in 3-second runs until the backup has returned
/// (a fixed run could end before a backup slowed by a loaded machine
/// starts). Returns the label and the ledger
/// classification (from the commit records' LSNs in the primary's WAL).
fn backup_under_load(env: &TestEnv, repo: &Repo, pg: &Cluster) -> (String, Ledger) {
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.psql(
        "create table ledger(id bigserial primary key, client int not null, \
         xid bigint not null default (pg_current_xact_id()::text::bigint))",
    );
    let script = env.dir().join(format!("bench-{}.sql", unique()));
    fs::write(&script, BENCH_SCRIPT).expect("write pgbench script");
    let script = script.display().to_string();

    let done = AtomicBool::new(false);
    let label = std::thread::scope(|s| {
        let bench = s.spawn(|| {
            while !done.load(Ordering::SeqCst) {
                pg.pgbench(&["-n", "-c", "2", "-T", "3", "-R", "300", "-f", &script]);
            }
        });
        // Whatever fails here must still stop the load, or the scope never
        // ends.
        let label = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // Let the load start before the backup does.
            let start = Instant::now();
            while pg.psql("select count(*) > 0 from ledger") != "t" {
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "pgbench did not start writing"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
            std::thread::sleep(Duration::from_millis(500));
            backup(env, repo, pg)
        }));
        done.store(true, Ordering::SeqCst);
        if let Err(p) = bench.join() {
            std::panic::resume_unwind(p);
        }
        label.unwrap_or_else(|p| std::panic::resume_unwind(p))
    });
    // Write, then switch: the switch record's end (what pg_switch_wal
    // returns) is flushed and inside a real segment, so pg_waldump can read
    // every record up to it (an insert position at a segment's start can
    // point into a recycled file's stale bytes).
    pg.psql("insert into pgvault_it_switch values (2)");
    let end = pg.psql("select pg_switch_wal()");
    let seg = pg.psql(&format!("select pg_walfile_name('{end}')"));
    pg.wait_archived(&seg, ARCHIVE_TIMEOUT);

    let info = info(env, repo);
    let b = backup_info(&info, &label);
    assert_eq!(b["type"], "full", "backup entry: {b:#}");
    assert_eq!(b["timeline"], 1, "backup entry: {b:#}");
    let start_lsn = b["start_lsn"].as_str().expect("start_lsn").to_string();
    let stop_lsn = b["stop_lsn"].as_str().expect("stop_lsn").to_string();
    assert!(lsn(&start_lsn) < lsn(&stop_lsn), "backup entry: {b:#}");

    // Commit LSN of every transaction from the backup's start to now.
    let commits = commit_lsns(env, pg, &start_lsn, &end);
    let rows = pg.psql("select id, xid from ledger");
    let (start, stop) = (lsn(&start_lsn), lsn(&stop_lsn));
    let mut ledger = Ledger {
        before_stop: BTreeSet::new(),
        during: 0,
        after: 0,
    };
    for row in rows.lines() {
        let (id, xid) = row.split_once('|').expect("id|xid");
        let id: i64 = id.parse().expect("ledger id");
        let xid: u64 = xid.parse().expect("ledger xid");
        // Not in the dump (which covers start..end, after pgbench ended):
        // committed before the backup started.
        match commits.get(&xid) {
            None => {
                ledger.before_stop.insert(id);
            }
            Some(&c) if c < stop => {
                assert!(c >= start);
                ledger.during += 1;
                ledger.before_stop.insert(id);
            }
            Some(_) => ledger.after += 1,
        }
    }
    eprintln!(
        "backup {label} ({start_lsn}..{stop_lsn}) under pgbench: {} ledger rows before its stop \
         ({} committed while it ran), {} after",
        ledger.before_stop.len(),
        ledger.during,
        ledger.after
    );
    assert!(
        ledger.during > 0,
        "no pgbench transaction committed while the backup ran: the load did not overlap it"
    );
    (label, ledger)
}

/// xid -> start LSN of its COMMIT record, from `pg_waldump` of the primary's
/// pg_wal between `from` and `to`.
fn commit_lsns(env: &TestEnv, pg: &Cluster, from: &str, to: &str) -> HashMap<u64, u64> {
    let argv: Vec<OsString> = [
        env.pg("pg_waldump"),
        "-p".into(),
        pg.wal_dir().display().to_string(),
        "-s".into(),
        from.into(),
        "-e".into(),
        to.into(),
        "-r".into(),
        "Transaction".into(),
    ]
    .iter()
    .map(OsString::from)
    .collect();
    let run = finish(
        env.spawn(As::PgUser, &argv, &[], env.dir()),
        Duration::from_secs(300),
    );
    run.ok();
    let mut out = HashMap::new();
    for line in run.stdout.lines() {
        if !line.contains("desc: COMMIT") {
            continue;
        }
        let after = |key: &str| -> &str {
            let i = line
                .find(key)
                .unwrap_or_else(|| panic!("no {key} in {line}"));
            line[i + key.len()..].trim_start()
        };
        let tx = after("tx:");
        let tx: u64 = tx[..tx.find(',').expect("tx, ")]
            .parse()
            .expect("tx number");
        let l = after("lsn:");
        let l = lsn(&l[..l.find(',').expect("lsn, ")]);
        out.insert(tx, l);
    }
    assert!(
        !out.is_empty(),
        "pg_waldump found no commit records between {from} and {to}:\n{}",
        run.stderr
    );
    out
}

// ---------------------------------------------------------------------------
// The cases, in order.

/// Restore args for a clone promoted at `target` (not archiving).
pub(crate) fn clone_args<'a>(target: &[&'a str]) -> Vec<&'a str> {
    let mut v = target.to_vec();
    v.extend_from_slice(&["--target-action", "promote", "--archive-mode", "off"]);
    v
}

/// Everything on one repository; `local` adds the case that needs to touch
/// the repository's files.
pub(crate) fn pitr_suite(env: &TestEnv, repo: &Repo, local: bool) {
    let mut cases = Cases::new();
    let mut pg = primary(env, repo);
    let (label, ledger) = backup_under_load(env, repo, &pg);
    let marks = write_a_then_b(&pg);
    eprintln!("[{:>6.1?}] backup and marks done", cases.start.elapsed());

    // PITR by time. On S3 as root (into a directory the postgres user owns,
    // with no local catalog: the backup is found from the repository alone).
    cases.run("PITR by time (+ pg_amcheck, pg_checksums)", || {
        let who = if local { As::PgUser } else { As::Root };
        let args = clone_args(&["--target-time", &marks.time_a]);
        let mut n = restore_promoted(env, repo, who, "r-time", &args, "A|10");
        n.amcheck();
        n.stop();
        n.checksums();
        n.assert_log_clean();
    });

    cases.run("PITR by restore point name", || {
        let args = clone_args(&["--target-name", RESTORE_POINT]);
        let mut n = restore_promoted(env, repo, As::PgUser, "r-name", &args, "A|10");
        n.stop();
        n.assert_log_clean();
    });

    cases.run("PITR by LSN", || {
        let args = clone_args(&["--target-lsn", &marks.lsn_a]);
        let mut n = restore_promoted(env, repo, As::PgUser, "r-lsn", &args, "A|10");
        n.stop();
        n.assert_log_clean();
    });

    // Immediate: consistent at the end of the backup taken under pgbench,
    // with exactly the transactions committed before its stop.
    let mut immediate: Option<Node> = None;
    cases.run("--target immediate of the backup taken under pgbench", || {
        let args = clone_args(&["--set", &label, "--target", "immediate"]);
        let mut n = restore_promoted(env, repo, As::PgUser, "r-immediate", &args, "");
        let restored: BTreeSet<i64> = n
            .psql("select id from ledger order by id")
            .lines()
            .map(|l| l.parse().expect("ledger id"))
            .collect();
        let missing: Vec<_> = ledger.before_stop.difference(&restored).take(10).collect();
        let extra: Vec<_> = restored.difference(&ledger.before_stop).take(10).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "a --target immediate restore must hold exactly the {} ledger rows committed before \
             the backup's stop; it has {}: missing (first 10) {missing:?}, later ones present \
             (first 10) {extra:?}",
            ledger.before_stop.len(),
            restored.len()
        );
        assert_eq!(
            n.psql(
                "select (select sum(abalance) from pgbench_accounts) = (select count(*) from ledger)"
            ),
            "t",
            "every ledger row's account update must be there too, and no other (atomicity)"
        );
        n.amcheck();
        n.stop();
        n.checksums();
        n.assert_log_clean();
        immediate = Some(n);
    });

    // --delta over that clone, whose postgresql.auto.conf holds
    // recovery_target = 'immediate' and which has run on a timeline of its
    // own: the new restore must reach T, not stop at the old target.
    if let Some(mut n) = immediate.take() {
        cases.run("--delta restore over an earlier restore", || {
            assert!(
                n.auto_conf().contains("immediate"),
                "the immediate restore should have written its target into \
                 postgresql.auto.conf:\n{}",
                n.auto_conf()
            );
            // Without --delta: refused.
            restore(
                env,
                repo,
                As::PgUser,
                &n.pgdata,
                &["--target-time", &marks.time_a],
            )
            .expect_code(2);
            let mut args = vec!["--delta"];
            args.extend(clone_args(&["--target-time", &marks.time_a]));
            restore(env, repo, As::PgUser, &n.pgdata, &args).ok();
            n.start();
            n.wait_promoted();
            assert_eq!(
                n.psql(ROWS_BY_TAG),
                "A|10",
                "a --delta restore over an earlier restore must reach the new target\n\
                 --- postgresql.auto.conf\n{}\n--- server log\n{}",
                n.auto_conf(),
                n.log_tail(40)
            );
            n.stop();
        });
    }

    cases.run("non-empty directory without --delta is refused", || {
        let dir = Node::new(env, repo, "r-nonempty").pgdata.clone();
        fs::write(dir.join("precious.txt"), "keep me\n").expect("write");
        let run = restore(env, repo, As::PgUser, &dir, &["--target", "immediate"]);
        run.expect_code(2);
        expect_error_line(&run, &format!("{} is not empty", dir.display()));
        let listing: Vec<_> = fs::read_dir(&dir)
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(
            listing,
            vec![OsString::from("precious.txt")],
            "a refused restore must not touch the directory"
        );
        assert_eq!(
            fs::read_to_string(dir.join("precious.txt")).expect("read"),
            "keep me\n"
        );
    });

    cases.run(
        "clones restored with --archive-mode off do not archive",
        || {
            let before_tl2 = info(env, repo);
            assert_eq!(
                timeline_numbers(&before_tl2),
                vec![1],
                "clones restored with --archive-mode off must not archive a new timeline: \
             {before_tl2:#}"
            );
        },
    );

    // Before any timeline 2 is archived: the standby follows the latest
    // timeline, which must be the primary's.
    cases.run("--standby replays from the archive", || {
        let mut sb = Node::new(env, repo, "r-standby");
        restore(
            env,
            repo,
            As::PgUser,
            &sb.pgdata,
            &["--standby", "--archive-mode", "off"],
        )
        .ok();
        assert!(
            sb.pgdata.join("standby.signal").exists()
                && !sb.pgdata.join("recovery.signal").exists(),
            "--standby should write standby.signal (and no recovery.signal)"
        );
        // Look at the archive every second rather than every 5 (the default).
        sb.set_conf("wal_retrieve_retry_interval = '1s'");
        sb.start();
        assert_eq!(sb.psql("select pg_is_in_recovery()"), "t");
        sb.wait_for(
            ROWS_BY_TAG,
            "A|10\nB|10",
            RECOVERY_TIMEOUT,
            "rows A and B on the standby",
        );
        pg.psql("insert into t select g, 'S' from generate_series(101, 105) g");
        let seg = pg.switch_wal();
        pg.wait_archived(&seg, ARCHIVE_TIMEOUT);
        sb.wait_for(
            ROWS_BY_TAG,
            "A|10\nB|10\nS|5",
            RECOVERY_TIMEOUT,
            "the primary's new rows on the standby",
        );
        assert_eq!(sb.psql("select pg_is_in_recovery()"), "t");
        sb.stop();
        sb.assert_log_clean();
    });

    // Timelines: a restored primary (archiving into the same stanza) is
    // promoted to timeline 2 and writes rows C; then a PITR on timeline 2
    // from the timeline-1 backup, through the archived 00000002.history.
    cases.run("timeline 2: restored primary, then PITR on it", || {
        let mut p2 = restore_promoted(
            env,
            repo,
            As::PgUser,
            "r-primary2",
            &[
                "--target-time",
                &marks.time_a,
                "--target-action",
                "promote",
                "--archive-mode",
                "preserve",
            ],
            "A|10",
        );
        assert_eq!(p2.timeline(), 2);
        p2.psql("insert into t select g, 'C' from generate_series(21, 30) g");
        let time_c = p2.psql("select now()::text");
        std::thread::sleep(Duration::from_millis(1100));
        p2.psql("insert into t select g, 'D' from generate_series(31, 40) g");
        let seg = p2.psql("select pg_walfile_name(pg_switch_wal())");
        assert!(seg.starts_with("00000002"), "{seg}");
        p2.wait_archived(&seg);
        p2.stop();
        p2.assert_log_clean();

        let tl_info = info(env, repo);
        let tl2 = timeline_info(&tl_info, 2)
            .unwrap_or_else(|| panic!("info shows no timeline 2 after a promotion: {tl_info:#}"));
        assert!(
            timeline_info(&tl_info, 1).is_some(),
            "info lost timeline 1: {tl_info:#}"
        );
        assert_eq!(tl2["parent"], 1, "timeline 2's parent: {tl2:#}");
        assert!(
            tl2["switch_lsn"].as_str().is_some_and(|s| lsn(s) > 0),
            "timeline 2's switch LSN: {tl2:#}"
        );
        prefetch_follows_the_switch(env, repo, lsn(tl2["switch_lsn"].as_str().unwrap_or("0/0")));

        // "latest" on one repository, the number on the other.
        let timeline = if local { "latest" } else { "2" };
        let args = clone_args(&["--target-time", &time_c, "--target-timeline", timeline]);
        let mut n = restore_promoted(env, repo, As::PgUser, "r-tl2", &args, "A|10\nC|10");
        // Promoted once more, past timeline 2 (3 is the next free number).
        assert_eq!(n.timeline(), 3);
        n.stop();
        n.assert_log_clean();
    });

    // Last: it damages the shared backup.
    if local {
        cases.run("corrupted backup object", || {
            corrupted_backup_object(env, repo, &label)
        });
    }
    pg.stop();
    cases.finish();
}

/// Prefetch along timeline 2 (whose switch point is `switch`), as recovery
/// to timeline 2 drives it: after 00000002.history was fetched, fetching a
/// timeline-1 segment before the switch prefetches timeline 2's copies from
/// the switch segment on, never timeline 1's (which exist too: the old
/// primary went on writing), and the next call is served from the spool.
fn prefetch_follows_the_switch(env: &TestEnv, repo: &Repo, switch: u64) {
    const SEG: u64 = 1 << 20;
    let dir = env.mkdir(&format!("prefetch-tl-{}", unique()), As::PgUser);
    let spool_base = dir.join("spool");
    let spool_arg = spool_base.display().to_string();
    let get = |name: &str, ahead: &str| {
        repo.run(
            env,
            As::PgUser,
            &[
                "--spool-path",
                &spool_arg,
                "--archive-get-ahead",
                ahead,
                "archive-get",
                name,
                name,
            ],
            &dir,
        )
    };
    let switch_seg = switch / SEG;
    assert!(switch_seg >= 2, "switch at {switch:#x}");
    get("00000002.history", "3").ok();
    get(&segment_name(1, switch_seg - 2, SEG), "3").ok();
    let spool_get = || -> Vec<String> {
        let Some(sub) = fs::read_dir(&spool_base)
            .ok()
            .and_then(|mut rd| rd.next())
            .and_then(|e| e.ok())
        else {
            return Vec::new();
        };
        let mut names: Vec<String> = fs::read_dir(sub.path().join("get"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.') && !n.ends_with(".pgvault-tmp"))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    };
    let want = vec![
        segment_name(1, switch_seg - 1, SEG),
        segment_name(2, switch_seg, SEG),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    while !want.iter().all(|w| spool_get().contains(w)) {
        assert!(
            Instant::now() < deadline,
            "the prefetcher did not fetch {want:?} within 60 s; spool: {:?}",
            spool_get()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let wrong: Vec<String> = spool_get()
        .into_iter()
        .filter(|n| {
            n.starts_with("00000001") && n.as_str() >= segment_name(1, switch_seg, SEG).as_str()
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "prefetch fetched timeline 1 segments past the switch to timeline 2: {wrong:?}"
    );
    // PostgreSQL's next call is served from the spool, byte for byte what
    // the archive holds.
    let name = segment_name(2, switch_seg, SEG);
    get(&name, "3").ok();
    assert!(
        !spool_get().contains(&name),
        "{name} was not taken from the spool"
    );
    let direct = dir.join("direct");
    let direct_s = direct.display().to_string();
    repo.run(
        env,
        As::PgUser,
        &["--archive-get-ahead", "0", "archive-get", &name, &direct_s],
        &dir,
    )
    .ok();
    assert_same_file(&direct, &dir.join(&name));
}

/// Flip a byte in the largest stored object of the backup: restore fails
/// with exit 5 naming that object, and leaves no startable cluster.
fn corrupted_backup_object(env: &TestEnv, repo: &Repo, label: &str) {
    let data = repo
        .local
        .as_ref()
        .expect("local repo")
        .join(&repo.stanza)
        .join("backup")
        .join(label)
        .join("data");
    let mut files = Vec::new();
    collect_files(&data, &mut files);
    let (victim, size) = files
        .iter()
        .map(|p| (p.clone(), fs::metadata(p).expect("stat").len()))
        .max_by_key(|(_, s)| *s)
        .unwrap_or_else(|| panic!("no stored objects under {}", data.display()));
    let mut bytes = fs::read(&victim).expect("read object");
    let at = (size / 2) as usize;
    bytes[at] ^= 0x55;
    fs::write(&victim, bytes).expect("write object");

    let n = Node::new(env, repo, "r-corrupt");
    let run = restore(
        env,
        repo,
        As::PgUser,
        &n.pgdata,
        &["--set", label, "--target", "immediate"],
    );
    let name = victim
        .file_name()
        .expect("file name")
        .to_string_lossy()
        .into_owned();
    run.expect_code(5);
    expect_error_line(&run, &name);
    assert!(
        !n.pgdata.join("global/pg_control").exists(),
        "a failed restore must not leave a global/pg_control PostgreSQL could start from"
    );
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display())) {
        let p = e.expect("entry").path();
        if p.is_dir() {
            collect_files(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn pitr_local_repo() {
    let env = TestEnv::new();
    let repo = env.local_repo("pitr");
    pitr_suite(&env, &repo, true);
}

#[test]
fn pitr_s3_moto() {
    let env = TestEnv::new();
    let Some(moto) = require_server(env.moto.clone(), "PGVAULT_TEST_MOTO") else {
        return;
    };
    let repo = env.s3_repo(&moto, "pitr");
    pitr_suite(&env, &repo, false);
}

// ---------------------------------------------------------------------------
// Other PostgreSQL majors: PITR by time on a local repository.

fn pitr_by_time_on(major: u32) {
    let var = format!("PGVAULT_TEST_PGBIN_{major}");
    let bin = std::env::var(&var).ok().filter(|v| !v.is_empty());
    let Some(bin) = bin else {
        let ci = crate::common::ci();
        assert!(
            !ci,
            "{var} is not set: scripts/test.sh sets it from `scripts/fetch-pg.sh {major}`"
        );
        eprintln!("skipping PostgreSQL {major}: {var} is not set (run scripts/test.sh)");
        return;
    };
    let mut env = TestEnv::new();
    env.pgbin = PathBuf::from(&bin);
    assert!(
        env.pgbin.join("postgres").exists(),
        "{var}={bin} holds no postgres binary"
    );
    let repo = env.local_repo("pitr");
    let mut pg = primary(&env, &repo);
    assert_eq!(
        pg.psql("select current_setting('server_version_num')::int / 10000"),
        major.to_string()
    );
    pg.psql("insert into t select g, 'P' from generate_series(1001, 1005) g");
    let label = backup(&env, &repo, &pg);
    let marks = write_a_then_b(&pg);
    let mut n = restore_promoted(
        &env,
        &repo,
        As::PgUser,
        &format!("r-pg{major}"),
        &[
            "--set",
            &label,
            "--target-time",
            &marks.time_a,
            "--target-action",
            "promote",
            "--archive-mode",
            "off",
        ],
        "A|10\nP|5",
    );
    assert_eq!(
        n.psql("select current_setting('server_version_num')::int / 10000"),
        major.to_string()
    );
    n.stop();
    n.checksums();
    n.assert_log_clean();
    pg.stop();
}

#[test]
fn pitr_by_time_pg14() {
    pitr_by_time_on(14);
}

#[test]
fn pitr_by_time_pg16() {
    pitr_by_time_on(16);
}

#[test]
fn pitr_by_time_pg17() {
    pitr_by_time_on(17);
}

#[test]
fn pitr_by_time_pg18() {
    pitr_by_time_on(18);
}

/// Tablespaces: the backup follows pg_tblspc links; a restore onto a
/// non-empty tablespace location is refused before anything is written;
/// `--tablespace-map` restores it elsewhere, and the table in it is intact;
/// `--delta` onto that restore, mapping the tablespace elsewhere again,
/// undoes what was written since and fills the new location.
#[test]
fn tablespace_backup_and_remapped_restore() {
    let env = TestEnv::new();
    let repo = env.local_repo("ts");
    let mut pg = primary(&env, &repo);
    let ts_dir = env.mkdir("ts-original", As::PgUser);
    pg.psql(&format!(
        "create tablespace ts1 location '{}'",
        ts_dir.display()
    ));
    pg.psql("create table in_ts(x int) tablespace ts1");
    pg.psql("insert into in_ts select generate_series(1, 5000)");
    let oid = pg.psql("select oid from pg_tablespace where spcname = 'ts1'");
    let label = backup(&env, &repo, &pg);
    pg.switch_wal();

    // The original location holds the primary's tablespace: refused, and
    // the target directory stays empty.
    let mut node = Node::new(&env, &repo, "ts-refused");
    let run = restore(
        &env,
        &repo,
        As::PgUser,
        &node.pgdata,
        &["--set", &label, "--archive-mode", "off"],
    );
    run.expect_code(2);
    expect_error_line(&run, &ts_dir.display().to_string());
    assert_eq!(
        std::fs::read_dir(&node.pgdata).unwrap().count(),
        0,
        "a refused restore must not write into the data directory"
    );

    // A restore of the backup with the tablespace mapped to `to`, then
    // checked that pg_tblspc links there.
    let restore_mapped = |node: &Node, delta: bool, to: &std::path::Path| {
        let map = format!("{oid}={}", to.display());
        let mut args = vec![
            "--set",
            &label,
            "--target",
            "immediate",
            "--target-action",
            "promote",
            "--archive-mode",
            "off",
            "--tablespace-map",
            &map,
        ];
        if delta {
            args.insert(0, "--delta");
        }
        restore(&env, &repo, As::PgUser, &node.pgdata, &args).ok();
        let link = std::fs::read_link(node.pgdata.join("pg_tblspc").join(&oid)).unwrap();
        assert_eq!(
            link, to,
            "pg_tblspc/{oid} should point at the mapped location"
        );
    };
    let new_ts = env.mkdir("ts-remapped", As::PgUser);
    restore_mapped(&node, false, &new_ts);
    node.start();
    node.wait_promoted();
    assert_eq!(node.psql("select count(*) from in_ts"), "5000");
    assert_eq!(
        node.psql(&format!("select pg_tablespace_location({oid})")),
        new_ts.display().to_string()
    );

    // `--delta` onto that node, the tablespace mapped to yet another
    // (empty) directory: what was written since is undone, and the blocks
    // are compared where the link points for this restore — compared
    // through the node's old link, only the blocks that differ there (the
    // 700 rows') would be written to the new location, the rest left
    // holes.
    node.psql("insert into in_ts select generate_series(1, 700)");
    node.psql("checkpoint");
    assert_eq!(node.psql("select count(*) from in_ts"), "5700");
    node.stop();
    let new_ts2 = env.mkdir("ts-remapped-2", As::PgUser);
    restore_mapped(&node, true, &new_ts2);
    node.start();
    node.wait_promoted();
    assert_eq!(
        node.psql("select count(*) from in_ts"),
        "5000",
        "--delta with --tablespace-map should restore the mapped tablespace's blocks"
    );
    node.amcheck();
    node.stop();
    assert_eq!(pg.psql("select count(*) from in_ts"), "5000");
    pg.stop();
}
