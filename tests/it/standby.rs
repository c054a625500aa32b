//! Backups from a streaming standby (`backup-standby`, issue 12), on a real
//! PostgreSQL 15 primary archiving through pgvault and a standby made by
//! `pg_basebackup -R` that streams from it.
//!
//! One primary and one standby serve every case, in an order that leaves
//! each case the servers it needs:
//! 1. a backup from the standby while pgbench writes on the primary, run in
//!    a mount namespace where the primary's data directory is an empty
//!    tmpfs: the backup cannot have read a byte of the primary's files (a
//!    backup of the primary under the same mask fails, which shows the mask
//!    holds); restored, it recovers to a time after the backup with the
//!    rows written before that time and none after, and pgbench's ledger
//!    balances;
//! 2. `check` against the standby proves archiving through its primary;
//! 3. the standby applies WAL an hour late (`recovery_min_apply_delay`):
//!    its backup works and holds the standby's state, not the primary's;
//! 4. with the standby stopped, `prefer` backs up the primary and says so,
//!    `y` fails with one clear error line;
//! 5. a standby promoted while its backup copies files fails the backup,
//!    which never appears in `info`.

use crate::common::*;
use std::ffi::OsString;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

const ARCHIVE_TIMEOUT: Duration = Duration::from_secs(180);

/// pgbench script: one unit into a random account, logged in `ledger` in
/// the same transaction, so that sum(abalance) = count(ledger) in any
/// consistent state.
const BENCH_SCRIPT: &str = "\\set aid random(1, 100000 * :scale)\n\
BEGIN;\n\
UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;\n\
INSERT INTO ledger(client) VALUES (:client_id);\n\
END;\n";

const BALANCED: &str = "select (select sum(abalance) from pgbench_accounts) = \
                        (select count(*) from ledger)";

/// A streaming standby of `pg`: `pg_basebackup -R` (which writes
/// `standby.signal` and a `primary_conninfo` through the primary's socket
/// directory), started on a port and socket directory of its own.
fn standby_of(env: &TestEnv, repo: &Repo, pg: &Cluster) -> Node {
    let mut node = Node::new(env, repo, "standby");
    let argv: Vec<OsString> = vec![
        env.pg("pg_basebackup").into(),
        "-D".into(),
        node.pgdata.clone().into(),
        "-R".into(),
        "-X".into(),
        "stream".into(),
        "-c".into(),
        "fast".into(),
        "-h".into(),
        pg.sockdir().into(),
        "-p".into(),
        pg.port().to_string().into(),
    ];
    node.run_pg(argv, &[], Duration::from_secs(300)).ok();
    node.start();
    node.wait_for(
        "select status from pg_stat_wal_receiver",
        "streaming",
        ARCHIVE_TIMEOUT,
        "the standby streaming",
    );
    node
}

/// `pgvault backup --start-fast ARGS` as the PostgreSQL user, in a mount
/// namespace of its own where `hidden` (the primary's data directory) is
/// an empty tmpfs. The primary keeps its directory; pgvault sees nothing
/// there.
fn backup_hiding(env: &TestEnv, repo: &Repo, hidden: &Path, args: &[&str]) -> Run {
    let script = "set -e; mount -t tmpfs -o size=1m,mode=0700 pgvault-hidden \"$1\"; \
                  user=$2; shift 2; exec runuser -u \"$user\" -- env \"$@\"";
    let mut argv: Vec<OsString> = vec![
        "unshare".into(),
        "--mount".into(),
        "--propagation".into(),
        "private".into(),
        "--".into(),
        "bash".into(),
        "-c".into(),
        script.into(),
        "bash".into(),
        hidden.into(),
        env.user.clone().into(),
    ];
    argv.extend(
        env.base_env(As::PgUser)
            .into_iter()
            .map(|(k, v)| OsString::from(format!("{k}={v}"))),
    );
    argv.push(env.bin().into());
    argv.extend(repo.args().into_iter().map(OsString::from));
    argv.push("backup".into());
    argv.push("--start-fast".into());
    argv.extend(args.iter().map(OsString::from));
    finish(env.spawn(As::Root, &argv, &[], env.dir()), PGVAULT_TIMEOUT)
}

/// `--pgdata`, `--pg-host`, `--pg-port` of `node` (this node's server).
fn node_args(node: &Node) -> Vec<String> {
    vec![
        "--pgdata".into(),
        node.pgdata.display().to_string(),
        "--pg-host".into(),
        node.base.display().to_string(),
        "--pg-port".into(),
        node.port.to_string(),
    ]
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The label a successful backup printed on stdout.
#[track_caller]
fn label_of(run: &Run) -> String {
    run.ok();
    let label = run.stdout.trim().to_string();
    assert_eq!(label.len(), 16, "backup label on stdout: {:?}", run.stdout);
    label
}

/// Labels of the backups `info` shows.
fn labels(env: &TestEnv, repo: &Repo) -> Vec<String> {
    let run = repo.run(env, As::PgUser, &["info", "--output", "json"], env.dir());
    run.ok();
    let info: serde_json::Value = serde_json::from_str(&run.stdout).expect("info is JSON");
    info["backups"]
        .as_array()
        .map(|b| {
            b.iter()
                .filter_map(|b| b["label"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Switches WAL on the primary and waits until the segment is archived.
fn archive_now(pg: &Cluster) {
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, ARCHIVE_TIMEOUT);
}

/// Case 1: a backup from the standby under load, the primary's directory
/// masked; then a PITR to a time after it.
fn backup_under_load_from_the_standby(env: &TestEnv, repo: &Repo, pg: &Cluster, sb: &Node) {
    let script = env.dir().join("bench.sql");
    fs::write(&script, BENCH_SCRIPT).expect("write pgbench script");
    let script = script.display().to_string();
    let mut args = node_args(sb);
    args.extend(["--backup-standby".into(), "y".into()]);

    let run = std::thread::scope(|s| {
        let bench =
            s.spawn(|| pg.pgbench(&["-n", "-c", "2", "-T", "8", "-R", "200", "-f", &script]));
        let start = Instant::now();
        while pg.psql("select count(*) > 0 from ledger") != "t" {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "pgbench did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let run = backup_hiding(env, repo, pg.pgdata(), &strs(&args));
        if let Err(p) = bench.join() {
            std::panic::resume_unwind(p);
        }
        run
    });
    let label = label_of(&run);
    assert!(
        run.stderr.contains("from the standby at") && run.stderr.contains(&sb.port.to_string()),
        "the backup should say it runs from the standby:\n{}",
        run.stderr
    );
    // The mask holds: the same backup of the primary cannot read its files.
    let primary_args = vec![
        "--pgdata".to_string(),
        pg.pgdata().display().to_string(),
        "--pg-host".into(),
        pg.sockdir().display().to_string(),
        "--pg-port".into(),
        pg.port().to_string(),
    ];
    let masked = backup_hiding(env, repo, pg.pgdata(), &strs(&primary_args));
    assert_ne!(
        masked.code,
        Some(0),
        "a backup of the masked primary should fail"
    );
    assert!(
        masked.stderr.contains(&pg.pgdata().display().to_string()),
        "{}",
        masked.stderr
    );

    // After the backup: rows before a time, then rows after it.
    pg.psql("create table marks(x int)");
    pg.psql("insert into marks values (1)");
    let time = pg.psql("select now()::text");
    std::thread::sleep(Duration::from_millis(1100));
    pg.psql("insert into marks values (2)");
    archive_now(pg);

    let mut node = Node::new(env, repo, "pitr");
    let pgdata = node.pgdata.display().to_string();
    repo.run(
        env,
        As::PgUser,
        &[
            "restore",
            "--pgdata",
            &pgdata,
            "--set",
            &label,
            "--target-time",
            &time,
            "--target-action",
            "promote",
            "--archive-mode",
            "off",
        ],
        env.dir(),
    )
    .ok();
    node.start();
    node.wait_promoted();
    assert_eq!(node.psql("select string_agg(x::text, ',') from marks"), "1");
    assert_eq!(node.psql(BALANCED), "t", "pgbench's ledger should balance");
    node.assert_log_clean();
}

/// Case 2: `check` on the standby switches WAL on its primary.
fn check_through_the_standby(env: &TestEnv, repo: &Repo, pg: &Cluster, sb: &Node) {
    let mut args = vec!["check".to_string()];
    args.extend(node_args(sb).into_iter().skip(2));
    let run = repo.run(env, As::PgUser, &strs(&args), env.dir());
    run.ok();
    assert!(
        run.stderr.contains("switched on the primary at")
            && run.stderr.contains(&pg.port().to_string()),
        "{}",
        run.stderr
    );
}

/// Case 3: a standby an hour behind is backed up as it stands.
fn delayed_standby(env: &TestEnv, repo: &Repo, pg: &Cluster, sb: &Node) {
    pg.psql("create table delayed(x int)");
    pg.psql("insert into delayed values (1)");
    archive_now(pg);
    sb.wait_for(
        "select count(*) from delayed",
        "1",
        ARCHIVE_TIMEOUT,
        "row 1 on the standby",
    );
    sb.set_conf("recovery_min_apply_delay = '1h'");
    sb.psql("select pg_reload_conf()");
    sb.wait_for(
        "show recovery_min_apply_delay",
        "1h",
        ARCHIVE_TIMEOUT,
        "the delay in force",
    );
    // Committed on the primary, held back on the standby.
    pg.psql("insert into delayed values (2)");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(sb.psql("select count(*) from delayed"), "1");

    let mut args = node_args(sb);
    args.extend(["--backup-standby".into(), "y".into(), "--start-fast".into()]);
    let mut all = vec!["backup".to_string()];
    all.extend(args);
    let run = repo.run(env, As::PgUser, &strs(&all), env.dir());
    let label = label_of(&run);
    assert!(
        run.stderr.contains("recovery_min_apply_delay"),
        "the backup should say the standby is delayed:\n{}",
        run.stderr
    );
    // Restored to its consistency point: the standby's state.
    let mut node = Node::new(env, repo, "delayed");
    let pgdata = node.pgdata.display().to_string();
    repo.run(
        env,
        As::PgUser,
        &[
            "restore",
            "--pgdata",
            &pgdata,
            "--set",
            &label,
            "--target",
            "immediate",
            "--target-action",
            "promote",
            "--archive-mode",
            "off",
        ],
        env.dir(),
    )
    .ok();
    node.start();
    node.wait_promoted();
    assert_eq!(
        node.psql("select string_agg(x::text, ',') from delayed"),
        "1"
    );
    node.assert_log_clean();
}

/// Case 4: the standby is down.
fn standby_down(env: &TestEnv, repo: &Repo, pg: &Cluster, sb: &mut Node) {
    let args = node_args(sb);
    sb.stop();
    let with = |mode: &str| {
        let mut all = vec!["backup".to_string(), "--start-fast".into()];
        all.extend(args.iter().cloned());
        all.extend([
            "--backup-standby".into(),
            mode.into(),
            "--primary-host".into(),
            pg.sockdir().display().to_string(),
            "--primary-port".into(),
            pg.port().to_string(),
        ]);
        repo.run(env, As::PgUser, &strs(&all), env.dir())
    };
    let run = with("prefer");
    label_of(&run);
    assert!(
        run.stderr.contains("no healthy standby")
            && run.stderr.contains(&format!(
                "backing up the primary at host={} port={}",
                pg.sockdir().display(),
                pg.port()
            ))
            && run.stderr.contains(&pg.pgdata().display().to_string()),
        "prefer should say it backs up the primary, from its data directory:\n{}",
        run.stderr
    );
    let run = with("y");
    run.expect_code(7);
    let errors: Vec<&str> = run
        .stderr_lines()
        .into_iter()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert!(
        errors.len() == 1
            && errors[0].contains("backup-standby = y: no healthy standby")
            && errors[0].contains(&sb.port.to_string()),
        "one clear error line:\n{}",
        run.stderr
    );
}

/// Case 5: the standby is promoted while its files are copied. pgvault is
/// stopped (SIGSTOP) once the copy has begun, the standby promoted, and
/// pgvault continued.
fn promoted_during_the_backup(env: &TestEnv, repo: &Repo, sb: &mut Node) {
    // Undo case 3's delay: the standby catches up before the backup.
    sb.set_conf("recovery_min_apply_delay = 0");
    sb.start();
    sb.wait_for(
        "select status from pg_stat_wal_receiver",
        "streaming",
        ARCHIVE_TIMEOUT,
        "the standby streaming again",
    );
    let before = labels(env, repo);
    let mut argv = repo.args();
    argv.push("backup".into());
    argv.extend(node_args(sb));
    argv.extend(["--backup-standby".into(), "y".into(), "--start-fast".into()]);
    let child = env.spawn_pgvault(As::PgUser, &strs(&argv), &repo.env, env.dir());
    let backups = repo
        .local
        .as_ref()
        .expect("a local repository")
        .join(&repo.stanza)
        .join("backup");
    let start = Instant::now();
    let pgvault = loop {
        // The copy has begun once a new backup directory exists.
        let copying = fs::read_dir(&backups).is_ok_and(|rd| {
            rd.flatten()
                .any(|e| !before.contains(&e.file_name().to_string_lossy().to_string()))
        });
        let pids = children_of(child.pid());
        if let (true, Some(&pid)) = (copying, pids.first()) {
            break pid.to_string();
        }
        if start.elapsed() > Duration::from_secs(120) {
            let run = finish(child, Duration::from_secs(5));
            panic!("the backup did not start copying:\n{}", run.stderr);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    // runuser stops itself when its child stops (job control): continue
    // both.
    let runuser = child.pid().to_string();
    let signal = |sig: &str, pids: &[&str]| {
        let mut argv: Vec<OsString> = vec!["kill".into(), sig.into()];
        argv.extend(pids.iter().map(OsString::from));
        finish(
            env.spawn(As::Root, &argv, &[], env.dir()),
            Duration::from_secs(10),
        )
        .ok();
    };
    signal("-STOP", &[&pgvault]);
    let promote: Vec<OsString> = vec![
        sb.pg("pg_ctl"),
        "-D".into(),
        sb.pgdata.clone().into(),
        "-w".into(),
        "promote".into(),
    ];
    let promoted = sb.run_pg(promote, &[], Duration::from_secs(120));
    signal("-CONT", &[&pgvault, &runuser]);
    promoted.ok();
    let run = finish(child, PGVAULT_TIMEOUT);
    assert_ne!(run.code, Some(0), "the backup should fail:\n{}", run.stderr);
    assert!(
        run.stderr
            .contains("the standby was promoted during the backup"),
        "{}",
        run.stderr
    );
    assert_eq!(labels(env, repo), before, "no new backup should be listed");
}

#[test]
fn backups_from_a_streaming_standby() {
    let env = TestEnv::new();
    let repo = env.local_repo("sb");
    let mut pg = Cluster::init(
        &env,
        InitOpts {
            wal_segsize_mb: Some(1),
            data_checksums: true,
        },
    );
    repo.stanza_create(&env, pg.pgdata());
    pg.start_archiving(&env, &repo);
    pg.pgbench(&["-i", "-s", "2", "-q"]);
    pg.psql(
        "create table ledger(id bigserial primary key, client int not null); \
         create table if not exists pgvault_it_switch(x int)",
    );
    archive_now(&pg);
    let mut sb = standby_of(&env, &repo, &pg);

    let mut cases = Cases::new();
    cases.run(
        "backup from the standby under load, primary masked; PITR",
        || backup_under_load_from_the_standby(&env, &repo, &pg, &sb),
    );
    cases.run("check through the standby", || {
        check_through_the_standby(&env, &repo, &pg, &sb)
    });
    cases.run("a standby with recovery_min_apply_delay", || {
        delayed_standby(&env, &repo, &pg, &sb)
    });
    cases.run("standby down: prefer backs up the primary, y fails", || {
        standby_down(&env, &repo, &pg, &mut sb)
    });
    cases.run("promoted during the backup", || {
        promoted_during_the_backup(&env, &repo, &mut sb)
    });
    cases.finish();
}
