//! Recovery targets that name a record — a restore point, a transaction —
//! chosen, checked and recovered to like times (issue 9, defect 4), against
//! a real PostgreSQL 15 archiving through the real `pgvault` binary into a
//! local repository.
//!
//! The primary's history, one row per transaction:
//!
//! ```text
//! backup 1 · row 1 (xid X1) · restore point rp_old · row 2 (X2)
//! backup 2 · row 3 (X3) · row 4 (X4) · WAL switch, archived
//! ```
//!
//! Every restore below is made without `--set`: pgvault must find the
//! backup itself. A target between the two backups needs backup 1 (backup
//! 2's replay never meets it), so each case fails where restore takes the
//! newest backup for a name or an xid.

use crate::common::*;
use serde_json::Value;
use std::ffi::OsString;
use std::fs;
use std::time::{Duration, Instant};

const ARCHIVE_TIMEOUT: Duration = Duration::from_secs(120);
/// Exit code of a refused target (docs/exit-codes.md).
const EXIT_USAGE: i32 = 2;
const ROWS: &str = "select coalesce(string_agg(id::text, ',' order by id), '') from t";

/// What the primary's history holds.
struct History {
    repo: Repo,
    backup1: String,
    backup2: String,
    /// xids of rows 1 to 4, as `pg_current_xact_id()` printed them.
    xids: [String; 4],
    /// What `pg_create_restore_point('rp_old')` returned.
    rp_lsn: String,
    /// An xid no transaction has had yet.
    future_xid: String,
}

/// One row in its own transaction; returns the transaction's xid.
fn row(pg: &Cluster, id: u32) -> String {
    pg.psql(&format!(
        "insert into t values ({id}) returning pg_current_xact_id()::text"
    ))
}

fn write_history(env: &TestEnv) -> (Cluster, History) {
    let repo = env.local_repo("targets");
    let mut pg = Cluster::init(
        env,
        InitOpts {
            wal_segsize_mb: Some(1),
            data_checksums: true,
        },
    );
    stanza_create(env, &repo, pg.pgdata());
    pg.start_archiving(env, &repo);
    pg.psql("create table t(id int primary key)");
    let backup1 = backup(env, &repo, &pg);
    let x1 = row(&pg, 1);
    let rp_lsn = pg.psql("select pg_create_restore_point('rp_old')::text");
    let x2 = row(&pg, 2);
    let backup2 = backup(env, &repo, &pg);
    let x3 = row(&pg, 3);
    let x4 = row(&pg, 4);
    let future_xid = pg.psql("select (pg_current_xact_id()::text::bigint + 1000)::text");
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, ARCHIVE_TIMEOUT);
    let history = History {
        repo,
        backup1,
        backup2,
        xids: [x1, x2, x3, x4],
        rp_lsn,
        future_xid,
    };
    (pg, history)
}

/// `pgvault restore` into a new node with `args` (no `--set`, a clone that
/// does not archive); checks which backup it chose.
#[track_caller]
fn restore(env: &TestEnv, h: &History, name: &str, args: &[&str], from_backup: &str) -> Node {
    let node = Node::new(env, &h.repo, name);
    let pgdata = node.pgdata.display().to_string();
    let mut all = vec!["restore", "--pgdata", &pgdata, "--archive-mode", "off"];
    all.extend_from_slice(args);
    let run = h.repo.run(env, As::PgUser, &all, env.dir());
    run.ok();
    assert!(
        run.stderr.contains(&format!("restoring backup {from_backup} ")),
        "restore {args:?} should choose backup {from_backup} by itself (backup 1 is {}, backup 2 {}):\n{}",
        h.backup1,
        h.backup2,
        run.stderr
    );
    node
}

/// Restores with `args` and promotion at the target; the rows there.
#[track_caller]
fn promoted_rows(env: &TestEnv, h: &History, name: &str, args: &[&str], from: &str) -> String {
    let mut all = args.to_vec();
    all.extend_from_slice(&["--target-action", "promote"]);
    let mut node = restore(env, h, name, &all, from);
    node.start();
    node.wait_promoted();
    let rows = node.psql(ROWS);
    node.stop();
    node.assert_log_clean();
    rows
}

/// Starts a node whose recovery ends in a shutdown: `pg_ctl start` without
/// waiting (the server may stop before it ever accepts connections), then
/// waits until the postmaster is gone.
#[track_caller]
fn start_until_it_stops(node: &Node) {
    let argv: Vec<OsString> = vec![
        node.pg("pg_ctl"),
        "-D".into(),
        node.pgdata.clone().into(),
        "-l".into(),
        node.log.clone().into(),
        "-W".into(),
        "-o".into(),
        format!(
            "-p {} -k {} -c listen_addresses=",
            free_port(),
            node.base.display()
        )
        .into(),
        "start".into(),
    ];
    node.run_pg(argv, &node.vars, Duration::from_secs(60)).ok();
    let start = Instant::now();
    // pg_ctl returns once the postmaster has written its pid file.
    std::thread::sleep(Duration::from_millis(500));
    while node.postmaster_alive() {
        assert!(
            start.elapsed() < RECOVERY_TIMEOUT,
            "the server did not shut down at the recovery target\n--- server log\n{}",
            node.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until recovery pauses at the target (`--target-action pause`).
#[track_caller]
fn wait_paused(node: &Node) {
    node.wait_for(
        "select pg_get_wal_replay_pause_state()",
        "paused",
        RECOVERY_TIMEOUT,
        "a pause at the target",
    );
    assert_eq!(node.psql("select pg_is_in_recovery()"), "t");
}

fn controldata_state(node: &Node) -> String {
    let argv = vec![node.pg("pg_controldata"), node.pgdata.clone().into()];
    let run = node.run_pg(
        argv,
        &[("LC_ALL".into(), "C".into())],
        Duration::from_secs(60),
    );
    run.ok();
    run.stdout
        .lines()
        .find_map(|l| l.strip_prefix("Database cluster state:"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| panic!("no cluster state in pg_controldata:\n{}", run.stdout))
}

#[test]
fn targets_by_name_and_xid() {
    let env = TestEnv::new();
    let (_pg, h) = write_history(&env);
    let [x1, x2, x3, x4] = &h.xids;
    eprintln!(
        "backups {} and {}; xids {x1} {x2} | {x3} {x4}",
        h.backup1, h.backup2
    );
    let (b1, b2) = (h.backup1.as_str(), h.backup2.as_str());
    let mut cases = Cases::new();

    cases.run(
        "info shows the restore point's LSN as PostgreSQL returned it",
        || {
            let run = h
                .repo
                .run(&env, As::PgUser, &["info", "--output", "json"], env.dir());
            run.ok();
            let v: Value = serde_json::from_str(&run.stdout).expect("info JSON");
            let rps: Vec<Value> = v["timelines"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t["recoverable"]["restore_points"].as_array())
                .flatten()
                .filter(|rp| rp["name"] == "rp_old")
                .cloned()
                .collect();
            assert_eq!(rps.len(), 1, "{v:#}");
            assert_eq!(rps[0]["lsn"], h.rp_lsn.as_str(), "{v:#}");
        },
    );

    cases.run(
        "--target-name of a restore point older than the newest backup",
        || {
            let rows = promoted_rows(&env, &h, "name", &["--target-name", "rp_old"], b1);
            assert_eq!(rows, "1");
        },
    );

    cases.run(
        "--target-xid, inclusive, between the backups and after them",
        || {
            assert_eq!(
                promoted_rows(&env, &h, "xid-in-1", &["--target-xid", x2], b1),
                "1,2"
            );
            assert_eq!(
                promoted_rows(&env, &h, "xid-in-2", &["--target-xid", x3], b2),
                "1,2,3"
            );
        },
    );

    cases.run("--target-xid --target-exclusive", || {
        let args = ["--target-xid", x2.as_str(), "--target-exclusive"];
        assert_eq!(promoted_rows(&env, &h, "xid-ex-1", &args, b1), "1");
        let args = ["--target-xid", x4.as_str(), "--target-exclusive"];
        assert_eq!(promoted_rows(&env, &h, "xid-ex-2", &args, b2), "1,2,3");
    });

    cases.run("an xid with no archived commit is refused", || {
        let dir = env.mkdir(&format!("refused-{}", unique()), As::PgUser);
        let pgdata = dir.display().to_string();
        let restore = |extra: &[&str]| {
            let mut all = vec![
                "restore",
                "--pgdata",
                &pgdata,
                "--target-xid",
                &h.future_xid,
            ];
            all.extend_from_slice(extra);
            h.repo.run(&env, As::PgUser, &all, env.dir())
        };
        let run = restore(&[]);
        run.expect_code(EXIT_USAGE);
        let errors: Vec<&str> = run
            .stderr_lines()
            .into_iter()
            .filter(|l| l.starts_with("error:"))
            .collect();
        assert!(
            errors.len() == 1
                && errors[0].contains(&format!(
                    "no commit or abort of transaction {} is archived after backup {b1}",
                    h.future_xid
                ))
                && errors[0].contains("recoverable on timeline 1 from backup"),
            "one error line naming the transaction and the window:\n{}",
            run.stderr
        );
        assert!(run.stderr.contains("hint:"), "{}", run.stderr);
        assert_eq!(
            fs::read_dir(&dir).expect("read --pgdata").count(),
            0,
            "a refused restore must leave --pgdata untouched"
        );
        // --no-target-check tries anyway.
        let run = restore(&["--no-target-check"]);
        run.ok();
    });

    cases.run("--target-action pause: paused at the xid, resumed", || {
        let args = ["--target-xid", x2.as_str(), "--target-action", "pause"];
        let mut node = restore(&env, &h, "pause", &args, b1);
        node.start();
        wait_paused(&node);
        assert_eq!(node.psql(ROWS), "1,2");
        node.psql("select pg_wal_replay_resume()");
        node.wait_promoted();
        assert_eq!(
            node.psql(ROWS),
            "1,2",
            "resuming ends recovery at the target"
        );
        node.stop();
        node.assert_log_clean();
    });

    cases.run(
        "--target-action shutdown: stops at the xid, still recovering",
        || {
            let args = ["--target-xid", x1.as_str(), "--target-action", "shutdown"];
            let mut node = restore(&env, &h, "shutdown", &args, b1);
            start_until_it_stops(&node);
            assert_eq!(
                controldata_state(&node),
                "shut down in recovery",
                "--- server log\n{}",
                node.log_tail(40)
            );
            assert!(node.pgdata.join("recovery.signal").exists());
            // Started again with a pause instead, it replays to the same target
            // and waits there, still in recovery.
            fs::write(
                node.pgdata.join("postgresql.auto.conf"),
                format!("{}recovery_target_action = 'pause'\n", node.auto_conf()),
            )
            .expect("append to postgresql.auto.conf");
            node.start();
            wait_paused(&node);
            assert_eq!(node.psql(ROWS), "1");
            node.stop();
            node.assert_log_clean();
        },
    );

    cases.finish();
}
