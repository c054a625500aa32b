//! `stanza-upgrade` after a real `pg_upgrade` from PostgreSQL 15 to 16,
//! with the real `pgvault` binary as archive_command and restore_command.
//!
//! 1. A PostgreSQL 15 cluster archives into a local repository; a base
//!    backup, rows P, rows A, a restore point, rows B.
//! 2. It is stopped and `pg_upgrade`d (copy mode) into a PostgreSQL 16
//!    cluster (binaries from `scripts/fetch-pg.sh 16`), which is started
//!    archiving into the same stanza: its pushes are refused (other major,
//!    other system identifier) and the error points at `stanza-upgrade`.
//! 3. `stanza-upgrade` refuses the old data directory and a missing stanza,
//!    records the new cluster, and a second run is a no-op.
//! 4. Archiving resumes into `archive/16-2`, a PostgreSQL 16 backup works,
//!    `info` lists both clusters with their backups, `verify` is clean.
//! 5. The old backup is restored and recovered with the PostgreSQL 15
//!    binaries to the restore point: `archive-get` serves the old
//!    cluster's WAL (`archive/15-1`), chosen from the restored
//!    `global/pg_control`. Rows P and A are there, B is not.
//!
//! Skipped when `PGVAULT_TEST_PGBIN_16` is not set (outside CI), like the
//! other majors' tests in tests/it/pitr.rs.

use crate::common::*;
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const ARCHIVE_TIMEOUT: Duration = Duration::from_secs(180);
const RESTORE_POINT: &str = "before_upgrade";
const ROWS_BY_TAG: &str = "select string_agg(tag || '|' || n, E'\\n' order by tag) \
                           from (select tag, count(*) n from t group by tag) s";

fn initopts() -> InitOpts {
    InitOpts {
        wal_segsize_mb: Some(1),
        data_checksums: true,
    }
}

/// The PostgreSQL 16 bin directory, or `None` (skip) outside CI.
fn pg16_bin() -> Option<PathBuf> {
    let var = "PGVAULT_TEST_PGBIN_16";
    let Some(bin) = std::env::var(var).ok().filter(|v| !v.is_empty()) else {
        let ci = crate::common::ci();
        assert!(
            !ci,
            "{var} is not set: scripts/test.sh sets it from `scripts/fetch-pg.sh 16`"
        );
        eprintln!("skipping: {var} is not set (run scripts/test.sh)");
        return None;
    };
    let bin = PathBuf::from(bin);
    assert!(
        bin.join("pg_upgrade").exists(),
        "{} holds no pg_upgrade",
        bin.display()
    );
    Some(bin)
}

fn pgdata_arg(pg: &Cluster) -> String {
    pg.pgdata().display().to_string()
}

/// Waits until the archiver has failed on `name` at least once.
#[track_caller]
fn wait_archive_failed(pg: &Cluster, name: &str) {
    let start = Instant::now();
    loop {
        let row = pg.psql(
            "select failed_count, coalesce(last_failed_wal, ''), coalesce(last_archived_wal, '') \
             from pg_stat_archiver",
        );
        let cols: Vec<&str> = row.split('|').collect();
        assert!(
            cols[2] < name,
            "{name} was archived before stanza-upgrade: {row}"
        );
        if cols[0] != "0" && cols[1] == name {
            return;
        }
        assert!(
            start.elapsed() < ARCHIVE_TIMEOUT,
            "the archiver never tried {name}: {row}\n{}",
            pg.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn stanza_upgrade_after_pg_upgrade_15_to_16() {
    let Some(bin16) = pg16_bin() else { return };
    let mut env = TestEnv::new();
    let bin15 = env.pgbin.clone();
    let repo = env.local_repo("up");
    let repo_dir = repo.local.clone().expect("local repo");

    // 1. PostgreSQL 15, archiving; backup; P, A, restore point, B.
    let mut old = Cluster::init(&env, initopts());
    let old_data = pgdata_arg(&old);
    repo.run(
        &env,
        As::PgUser,
        &["stanza-create", "--pgdata", &old_data],
        env.dir(),
    )
    .ok();
    old.start_archiving(&env, &repo);
    old.psql("create table t(id int primary key, tag text not null)");
    old.psql("create table pgvault_it_switch(x int)");
    old.psql("insert into t select g, 'P' from generate_series(1001, 1005) g");
    let label15 = backup(&env, &repo, &old);
    old.psql("insert into t select g, 'A' from generate_series(1, 10) g");
    old.psql(&format!(
        "select pg_create_restore_point('{RESTORE_POINT}')"
    ));
    old.psql("insert into t select g, 'B' from generate_series(11, 20) g");
    let seg = old.switch_wal();
    old.wait_archived(&seg, ARCHIVE_TIMEOUT);
    let sysid15 = old.system_identifier();
    old.stop();

    // 2. pg_upgrade into a new PostgreSQL 16 cluster (copy mode: the old
    // data directory stays as it was).
    env.pgbin = bin16.clone();
    let mut new = Cluster::init(&env, initopts());
    env.pgbin = bin15.clone();
    let workdir = new.sockdir().to_path_buf();
    let upgrade: Vec<String> = vec![
        bin16.join("pg_upgrade").display().to_string(),
        "-b".into(),
        bin15.display().to_string(),
        "-B".into(),
        bin16.display().to_string(),
        "-d".into(),
        old_data.clone(),
        "-D".into(),
        pgdata_arg(&new),
        "-p".into(),
        free_port().to_string(),
        "-P".into(),
        free_port().to_string(),
        "-s".into(),
        workdir.display().to_string(),
    ];
    let argv: Vec<&str> = upgrade.iter().map(String::as_str).collect();
    env.run_ok(As::PgUser, &argv, &[], &workdir);
    new.start_archiving(&env, &repo);
    assert_eq!(
        new.psql("select current_setting('server_version_num')::int / 10000"),
        "16"
    );
    let sysid16 = new.system_identifier();
    assert_ne!(sysid15, sysid16, "pg_upgrade gives a new system identifier");
    let refused = new.switch_wal();
    wait_archive_failed(&new, &refused);

    // What the archiver got, by hand: one error line and the way out.
    let run = repo.run(
        &env,
        As::PgUser,
        &["archive-push", &format!("pg_wal/{refused}")],
        new.pgdata(),
    );
    run.expect_code(3)
        .expect_one_error_line("is PostgreSQL 16's, but the stanza is PostgreSQL 15");
    assert!(
        run.stderr
            .contains("hint: after pg_upgrade run `pgvault stanza-upgrade --pgdata <new PGDATA>`"),
        "{}",
        run.stderr
    );
    // stanza-create for the new cluster points there too.
    let new_data = pgdata_arg(&new);
    let run = repo.run(
        &env,
        As::PgUser,
        &["stanza-create", "--pgdata", &new_data],
        env.dir(),
    );
    run.expect_code(6)
        .expect_one_error_line("belongs to another cluster");
    assert!(run.stderr.contains("stanza-upgrade"), "{}", run.stderr);

    // 3. stanza-upgrade: refusals, then the upgrade, then a no-op.
    let run = repo.with_stanza("nope").run(
        &env,
        As::PgUser,
        &["stanza-upgrade", "--pgdata", &new_data],
        env.dir(),
    );
    run.expect_code(6).expect_one_error_line("does not exist");
    let up = ["stanza-upgrade", "--pgdata", &new_data];
    let run = repo.run(&env, As::PgUser, &up, env.dir());
    run.ok();
    assert!(
        run.stderr.contains("upgraded") && run.stderr.contains("16-2"),
        "{}",
        run.stderr
    );
    let run = repo.run(&env, As::PgUser, &up, env.dir());
    run.ok();
    assert!(
        run.stderr.contains("nothing to upgrade"),
        "a second stanza-upgrade is a no-op: {}",
        run.stderr
    );
    let run = repo.run(
        &env,
        As::PgUser,
        &["stanza-upgrade", "--pgdata", &old_data],
        env.dir(),
    );
    run.expect_code(6)
        .expect_one_error_line("earlier cluster 1");
    assert!(run.stderr.contains("hint:"), "{}", run.stderr);

    // 4. Archiving resumes (a switch wakes the archiver from its retry
    // pause), into the new cluster's own directory; a backup of it.
    let seg16 = new.switch_wal();
    new.wait_archived(&seg16, ARCHIVE_TIMEOUT);
    let dir16 = repo_dir.join("up/archive/16-2").join(&seg16[..16]);
    assert!(
        std::fs::read_dir(&dir16)
            .map(|rd| rd.flatten().any(|e| e
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("{seg16}-"))))
            .unwrap_or(false),
        "{seg16} should be archived under {}",
        dir16.display()
    );
    new.psql("insert into t select g, 'N' from generate_series(21, 22) g");
    let label16 = backup(&env, &repo, &new);

    let run = repo.run(&env, As::PgUser, &["info", "--output", "json"], env.dir());
    run.ok();
    let info: Value = serde_json::from_str(&run.stdout).expect("info JSON");
    let dbs = info["dbs"].as_array().expect("info.dbs");
    let summary: Vec<(u64, String, bool, Vec<String>)> = dbs
        .iter()
        .map(|d| {
            (
                d["pg_version"].as_u64().unwrap_or(0),
                d["system_identifier"].as_str().unwrap_or("").to_string(),
                d["current"].as_bool().unwrap_or(false),
                d["backups"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|l| l.as_str().unwrap_or("").to_string())
                            .collect()
                    })
                    .unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (15, sysid15.clone(), false, vec![label15.clone()]),
            (16, sysid16.clone(), true, vec![label16.clone()]),
        ],
        "info --output json:\n{}",
        run.stdout
    );
    assert_eq!(info["stanza"]["pg_version"], 16);
    let text = repo.run(&env, As::PgUser, &["info"], env.dir());
    text.ok();
    assert!(
        text.stdout.contains("before pg_upgrade")
            && text.stdout.contains(&label15)
            && text.stdout.contains(&label16),
        "{}",
        text.stdout
    );
    repo.run(&env, As::PgUser, &["verify"], env.dir()).ok();
    new.stop();

    // 5. The old backup, recovered with PostgreSQL 15 to the restore point.
    let mut node = Node::new(&env, &repo, "old15");
    let node_data = node.pgdata.display().to_string();
    let run = repo.run(
        &env,
        As::Root,
        &[
            "restore",
            "--pgdata",
            &node_data,
            "--set",
            &label15,
            "--target-name",
            RESTORE_POINT,
            "--target-action",
            "promote",
            "--archive-mode",
            "off",
        ],
        env.dir(),
    );
    run.ok();
    assert!(
        run.stderr.contains("start PostgreSQL 15"),
        "restore should say which PostgreSQL starts it: {}",
        run.stderr
    );
    node.start();
    node.wait_promoted();
    assert_eq!(
        node.psql("select current_setting('server_version_num')::int / 10000"),
        "15"
    );
    assert_eq!(
        node.psql(ROWS_BY_TAG),
        "A|10\nP|5",
        "rows after PITR of the PostgreSQL 15 backup\n--- server log\n{}",
        node.log_tail(40)
    );
    node.stop();
    node.assert_log_clean();
}
