//! Differential and incremental backups end to end (issue 10) on a real
//! PostgreSQL archiving through the real binary into a local repository.
//!
//! One primary goes through: a full backup; writes of every kind that
//! changes relation files (updates, inserts, TRUNCATE, DROP TABLE, DELETE +
//! VACUUM truncating a table, CREATE DATABASE with WAL_LOG and FILE_COPY, a
//! table created and filled, VACUUM FULL, CLUSTER, ALTER TABLE … SET
//! TABLESPACE, hash and GIN indexes, pgbench transactions before the incr
//! and the diff); then incr, diff and incr backups. After each backup the content of every table of
//! every database is recorded (unlogged tables restore empty, as PostgreSQL
//! resets them); each backup is restored (`--target
//! immediate`), started and compared table by table, with `pg_amcheck` and
//! `pg_checksums --check` clean. Then PITR from the newest incremental to
//! the end of the archive (rows written after it are there); a backup whose
//! range lacks block references falls back to whole files and says so; a
//! new full with an incr on it, `expire --retention-diff 1` removing the
//! differential with what is built on it and keeping the full's incr,
//! `expire --retention-full 1` removing the old chain and keeping the new
//! one; `verify` naming a missing reference.
//!
//! Before this feature `backup --type incr` did not exist (clap refused
//! it): every case here failed.

use crate::common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

pub(crate) fn initopts() -> InitOpts {
    InitOpts {
        wal_segsize_mb: Some(1),
        data_checksums: true,
    }
}

/// psql on database `db` of the server listening in `sockdir` on `port`.
#[track_caller]
pub(crate) fn psql_db(env: &TestEnv, sockdir: &Path, port: u16, db: &str, sql: &str) -> String {
    let psql = env.pg("psql");
    let host = sockdir.display().to_string();
    let port = port.to_string();
    let argv = [
        psql.as_str(),
        "-XAtq",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        &host,
        "-p",
        &port,
        "-d",
        db,
        "-c",
        sql,
    ];
    env.run_ok(As::PgUser, &argv, &[], env.dir())
        .trim()
        .to_string()
}

/// Every table of every database: `db.table` → rows and an MD5 of them.
pub(crate) fn content(env: &TestEnv, sockdir: &Path, port: u16) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let dbs = psql_db(
        env,
        sockdir,
        port,
        "postgres",
        "select datname from pg_database where not datistemplate order by 1",
    );
    for db in dbs.lines() {
        let tables = psql_db(
            env,
            sockdir,
            port,
            db,
            "select relname from pg_class where relkind = 'r' and relpersistence = 'p' \
             and relnamespace = 'public'::regnamespace order by 1",
        );
        for t in tables.lines() {
            let sum = psql_db(
                env,
                sockdir,
                port,
                db,
                &format!(
                    "select count(*) || ':' || coalesce(md5(string_agg(x::text, ',' order by x::text)), '') from {t} x"
                ),
            );
            out.insert(format!("{db}.{t}"), sum);
        }
    }
    out
}

/// `pgvault backup --type ty --start-fast` of the server at `pgdata`
/// listening in `sockdir` on `port`; returns its label and stderr.
#[track_caller]
pub(crate) fn backup_at(
    env: &TestEnv,
    repo: &Repo,
    (pgdata, sockdir, port): (&Path, &Path, u16),
    ty: &str,
) -> (String, String) {
    let args = backup_args(pgdata, sockdir, port, ty);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = repo.run(env, As::PgUser, &args, env.dir());
    run.ok();
    for l in run
        .stderr
        .lines()
        .filter(|l| !l.contains("waiting for WAL"))
    {
        eprintln!("{ty}: {l}");
    }
    (run.stdout.trim().to_string(), run.stderr.clone())
}

/// Runs `backup --type ty` of `pg`; returns its label and stderr.
#[track_caller]
pub(crate) fn backup_of(env: &TestEnv, repo: &Repo, pg: &Cluster, ty: &str) -> (String, String) {
    backup_at(env, repo, (pg.pgdata(), pg.sockdir(), pg.port()), ty)
}

#[track_caller]
pub(crate) fn info(env: &TestEnv, repo: &Repo) -> Value {
    let run = repo.run(env, As::PgUser, &["info", "--output", "json"], env.dir());
    run.ok();
    serde_json::from_str(&run.stdout).expect("info --output json")
}

#[track_caller]
pub(crate) fn backup_info(info: &Value, label: &str) -> Value {
    info["backups"]
        .as_array()
        .and_then(|a| a.iter().find(|b| b["label"] == label))
        .unwrap_or_else(|| panic!("backup {label} not in info: {info:#}"))
        .clone()
}

/// Restores `label` to its consistency point, starts it, and checks that
/// every table holds what `want` recorded; amcheck and pg_checksums clean.
#[track_caller]
pub(crate) fn restore_and_compare(
    env: &TestEnv,
    repo: &Repo,
    label: &str,
    target: &[&str],
    want: &BTreeMap<String, String>,
) {
    let mut node = Node::new(env, repo, &format!("incr-{label}"));
    let pgdata = node.pgdata.display().to_string();
    let mut args = vec!["restore", "--pgdata", pgdata.as_str(), "--set", label];
    args.extend_from_slice(target);
    args.extend_from_slice(&["--target-action", "promote", "--archive-mode", "off"]);
    repo.run(env, As::PgUser, &args, env.dir()).ok();
    node.start();
    node.wait_promoted();
    let got = content(env, &node.base, node.port);
    assert_eq!(
        &got, want,
        "restore of {label} {target:?}: tables differ from the cluster at that backup"
    );
    node.amcheck();
    node.stop();
    node.checksums();
}

#[test]
fn incremental_chain_restores_every_backup() {
    cycle(&TestEnv::new(), 15, true);
}

/// The chain (full, incr, diff, incr, each restored and compared) on
/// another PostgreSQL major, with the binaries `scripts/test.sh` fetches.
fn cycle_on(major: u32) {
    let var = format!("PGVAULT_TEST_PGBIN_{major}");
    let Some(bin) = std::env::var(&var).ok().filter(|v| !v.is_empty()) else {
        let ci = crate::common::ci();
        assert!(
            !ci,
            "{var} is not set: scripts/test.sh sets it from `scripts/fetch-pg.sh {major}`"
        );
        eprintln!("skipping PostgreSQL {major}: {var} is not set (run scripts/test.sh)");
        return;
    };
    let mut env = TestEnv::new();
    env.pgbin = std::path::PathBuf::from(&bin);
    cycle(&env, major, false);
}

#[test]
fn incremental_chain_pg14() {
    cycle_on(14);
}

#[test]
fn incremental_chain_pg16() {
    cycle_on(16);
}

#[test]
fn incremental_chain_pg17() {
    cycle_on(17);
}

#[test]
fn incremental_chain_pg18() {
    cycle_on(18);
}

/// The scenario of the module comment on `major`; `tail`: also PITR,
/// fallback, expire and verify.
fn cycle(env: &TestEnv, major: u32, tail: bool) {
    let repo = env.local_repo("incr");
    let mut pg = Cluster::init(env, initopts());
    repo.stanza_create(env, pg.pgdata());
    pg.start_archiving(env, &repo);
    let (sock, port) = (pg.sockdir().to_path_buf(), pg.port());
    assert_eq!(
        pg.psql("select current_setting('server_version_num')::int / 10000"),
        major.to_string()
    );
    // STRATEGY (FILE_COPY or WAL_LOG) is PostgreSQL 15's; 14 copies files.
    let file_copy = if major >= 15 {
        "create database db3 strategy file_copy"
    } else {
        "create database db3"
    };
    pg.psql("create table if not exists pgvault_it_switch(x int)");
    // A tablespace (restores map it to a new directory each) and pgbench's
    // tables, which its transactions update and insert into between
    // backups.
    let ts_dir = env.mkdir("incr-ts", As::PgUser);
    pg.psql(&format!(
        "create tablespace ts1 location '{}'",
        ts_dir.display()
    ));
    let ts_oid = pg.psql("select oid from pg_tablespace where spcname = 'ts1'");
    let restores = std::cell::Cell::new(0);
    let restore_and_compare = |env: &TestEnv, repo: &Repo, label: &str, target: &[&str], want| {
        restores.set(restores.get() + 1);
        let dir = env.mkdir(&format!("incr-ts-{}", restores.get()), As::PgUser);
        let map = format!("{ts_oid}={}", dir.display());
        let mut args = target.to_vec();
        args.extend(["--tablespace-map", map.as_str()]);
        restore_and_compare(env, repo, label, &args, want)
    };
    let pgbench = || pg.pgbench(&["-n", "-c", "2", "-t", "150"]);
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.psql(
        "create table accounts(id int primary key, bal int, tags int[], pad text);
         create table moving(id int, pad text); insert into moving select g, repeat('m', 50) from generate_series(1, 3000) g;
         insert into accounts select g, g % 1000, array[g % 7, g % 11], repeat('x', 80)
           from generate_series(1, 20000) g;
         create index accounts_bal_hash on accounts using hash (bal);
         create index accounts_tags_gin on accounts using gin (tags);
         create table tr(id int); insert into tr select generate_series(1, 3000);
         create table dropme(id int); insert into dropme select generate_series(1, 3000);
         create table vac(id int, pad text);
         insert into vac select g, repeat('v', 100) from generate_series(1, 10000) g;
         create unlogged table scratch(id int); insert into scratch select generate_series(1, 100);",
    );

    // With no backup at all, an incr becomes a full one and says so.
    let (full, err) = backup_of(env, &repo, &pg, "incr");
    assert!(full.ends_with('F'), "label {full}");
    assert!(
        err.contains("taking a full backup"),
        "an incr without a full should say it takes a full one:\n{err}"
    );
    let full_content = content(env, &sock, port);

    // Round 1.
    pgbench();
    for sql in [
        "alter table moving set tablespace ts1",
        "update accounts set bal = bal + 1, tags = tags || 99 where id % 50 = 0",
        "insert into accounts select g, g % 1000, array[g % 5], repeat('y', 80)
           from generate_series(20001, 21000) g",
        "truncate tr",
        "drop table dropme",
        "delete from vac where id > 4000",
        "vacuum vac",
        "create table newt as select g as id, md5(g::text) as h from generate_series(1, 5000) g",
        "create database db2",
        file_copy,
    ] {
        pg.psql(sql);
    }
    psql_db(
        env,
        &sock,
        port,
        "db2",
        "create table x as select generate_series(1, 1000) id",
    );
    psql_db(
        env,
        &sock,
        port,
        "db3",
        "create table y as select generate_series(1, 500) id",
    );
    let (incr1, err) = backup_of(env, &repo, &pg, "incr");
    assert!(incr1.ends_with('I'), "label {incr1}");
    assert!(
        err.contains(&format!("incr backup on {full}")) && err.contains("changes found by wal"),
        "the incr should name its reference and its method:\n{err}"
    );
    let incr1_content = content(env, &sock, port);

    // Round 2.
    pgbench();
    for sql in [
        "update accounts set bal = bal - 1 where id % 70 = 0",
        "update moving set pad = 'moved' where id % 10 = 0",
        "alter table accounts set tablespace ts1",
        "create index tr_id on tr(id)",
        "cluster tr using tr_id",
        "cluster pgbench_accounts using pgbench_accounts_pkey",
        "vacuum full vac",
        "insert into tr select generate_series(1, 500)",
        "drop database db2",
    ] {
        pg.psql(sql);
    }
    psql_db(
        env,
        &sock,
        port,
        "db3",
        "insert into y select generate_series(501, 600)",
    );
    let (diff, err) = backup_of(env, &repo, &pg, "diff");
    assert!(diff.ends_with('D'), "label {diff}");
    assert!(err.contains(&format!("diff backup on {full}")), "{err}");
    let diff_content = content(env, &sock, port);

    pg.psql("update accounts set pad = 'z' where id between 100 and 300; insert into newt values (0, 'zero');");
    pg.psql("alter table moving set tablespace pg_default");
    let (incr2, err) = backup_of(env, &repo, &pg, "incr");
    assert!(err.contains(&format!("incr backup on {diff}")), "{err}");
    let incr2_content = content(env, &sock, port);

    let i = info(env, &repo);
    let b = backup_info(&i, &incr2);
    assert_eq!(b["type"], "incr");
    assert_eq!(b["reference"], diff.as_str());
    assert_eq!(b["depends_on"], serde_json::json!([diff, full]));
    assert_eq!(b["changes"]["method"], "wal");
    let c = &b["changes"];
    assert!(
        c["changed_blocks"].as_u64().unwrap_or(0) > 0
            && c["unchanged_files"].as_u64().unwrap_or(0) > 0,
        "incr2 should store some changed blocks and take unchanged files: {c:#}"
    );
    let stored = |l: &str| backup_info(&i, l)["stored_size"].as_u64().unwrap_or(0);
    // `moving` is rewritten whole (its tablespace changed) and autovacuum
    // may touch more under load: half the full is the bound that still
    // fails for an incr that copies every file.
    assert!(
        stored(&incr2) * 2 < stored(&full),
        "incr2 stored {} bytes, the full {}",
        stored(&incr2),
        stored(&full)
    );

    let immediate: &[&str] = &["--target", "immediate"];
    restore_and_compare(env, &repo, &full, immediate, &full_content);
    restore_and_compare(env, &repo, &incr1, immediate, &incr1_content);
    restore_and_compare(env, &repo, &diff, immediate, &diff_content);
    restore_and_compare(env, &repo, &incr2, immediate, &incr2_content);
    if !tail {
        pg.stop();
        return;
    }

    // PITR from the incremental to the end of the archive: rows written
    // after it are there.
    pg.psql("insert into newt values (-1, 'after incr2')");
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, Duration::from_secs(120));
    let latest = content(env, &sock, port);
    restore_and_compare(env, &repo, &incr2, &[], &latest);

    // A missing block references object: the backup falls back to whole
    // files, says so and restores right.
    let wal_start = backup_info(&i, &incr2)["wal_start"]
        .as_str()
        .expect("wal_start")
        .to_string();
    let mut removed = Vec::new();
    walk(&repo.local_archive(), &mut |p: &Path| {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".blockrefs") && name.get(..24).is_some_and(|n| n >= wal_start.as_str()) {
            removed.push(p.to_path_buf());
        }
    });
    assert!(
        !removed.is_empty(),
        "no block references at or after {wal_start}"
    );
    for p in &removed {
        std::fs::remove_file(p).expect("remove a blockrefs object");
    }
    pg.psql("update accounts set bal = 0 where id % 3 = 0");
    let (fallback, err) = backup_of(env, &repo, &pg, "incr");
    assert!(
        err.contains("falling back to whole files") && err.contains("no block references"),
        "the backup should say it fell back, and why:\n{err}"
    );
    let fallback_content = content(env, &sock, port);
    let i = info(env, &repo);
    let c = &backup_info(&i, &fallback)["changes"];
    assert_eq!(c["method"], "whole-files");
    // Read and compared, the files that did not change are not stored again.
    assert!(
        c["compared_files"].as_u64().unwrap_or(0) > 0
            && c["unchanged_files"].as_u64().unwrap_or(0) > 0,
        "the fallback should compare files with the reference: {c:#}"
    );
    restore_and_compare(env, &repo, &fallback, immediate, &fallback_content);

    // A new full and an incr on it; retention of one full removes the old
    // chain and keeps the incr's full.
    let (full2, _) = backup_of(env, &repo, &pg, "full");
    pg.psql("update accounts set bal = 1 where id % 97 = 0");
    let (incr3, err) = backup_of(env, &repo, &pg, "incr");
    assert!(err.contains(&format!("incr backup on {full2}")), "{err}");
    let incr3_content = content(env, &sock, port);
    let expire = |args: &[&str]| {
        let mut all = vec!["expire"];
        all.extend_from_slice(args);
        repo.run(env, As::PgUser, &all, env.dir()).ok();
        let i = info(env, &repo);
        let labels: Vec<String> = i["backups"]
            .as_array()
            .expect("backups")
            .iter()
            .filter_map(|b| b["label"].as_str().map(String::from))
            .collect();
        labels
    };
    // One differential (fulls counted): the diff goes, with the incrs built
    // on it (incr2, and the fallback on incr2); the incr on the old full
    // stays with it.
    assert_eq!(
        expire(&["--retention-full", "2", "--retention-diff", "1"]),
        [
            full.as_str(),
            incr1.as_str(),
            full2.as_str(),
            incr3.as_str()
        ],
        "after expire --retention-diff 1"
    );
    assert_eq!(
        expire(&["--retention-full", "1"]),
        [full2.as_str(), incr3.as_str()],
        "after expire --retention-full 1"
    );
    restore_and_compare(env, &repo, &incr3, immediate, &incr3_content);

    // A damaged object of the incr (its changed blocks or a whole file):
    // verify names the backup.
    let backups = repo.local.as_ref().expect("local repo").join("incr/backup");
    let mut objects = Vec::new();
    walk(&backups.join(&incr3).join("data"), &mut |p: &Path| {
        objects.push(p.to_path_buf())
    });
    objects.sort_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0));
    let victim = objects.last().expect("incr3 stored objects");
    let mut bytes = std::fs::read(victim).expect("read an object");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(victim, &bytes).expect("damage an object");
    let v = repo.run(env, As::PgUser, &["verify", "--output", "json"], env.dir());
    assert!(
        v.stdout.contains("corrupt") && v.stdout.contains(&format!("backup {incr3}")),
        "verify should report the damaged object of {incr3}:\n{}\n{}",
        v.stdout,
        v.stderr
    );

    // The full an incr depends on gone by hand: verify names it.
    let dir = backups.join(&full2);
    std::fs::remove_dir_all(&dir).expect("remove the full's directory");
    let v = repo.run(env, As::PgUser, &["verify", "--output", "json"], env.dir());
    assert!(
        v.stdout.contains("missing-dependency") && v.stdout.contains(&full2),
        "verify should name the missing reference {full2}:\n{}\n{}",
        v.stdout,
        v.stderr
    );
    pg.stop();
}

/// Across a timeline switch: the old primary stops, its incremental is
/// restored as the new primary (archiving into the same stanza) and
/// promoted to timeline 2; an incremental of it builds on the timeline-1
/// incremental, and its restore equals the new primary at that backup.
#[test]
fn incremental_across_a_timeline_switch() {
    let env = &TestEnv::new();
    let repo = env.local_repo("incrtl");
    let mut pg = Cluster::init(env, initopts());
    repo.stanza_create(env, pg.pgdata());
    pg.start_archiving(env, &repo);
    let (sock, port) = (pg.sockdir().to_path_buf(), pg.port());
    pg.psql("create table if not exists pgvault_it_switch(x int)");
    pg.psql(
        "create table a(id int primary key, v int);
         insert into a select g, 0 from generate_series(1, 20000) g",
    );
    let (full, _) = backup_of(env, &repo, &pg, "full");
    pg.psql("update a set v = 1 where id % 40 = 0");
    let (incr1, _) = backup_of(env, &repo, &pg, "incr");
    let incr1_content = content(env, &sock, port);
    // The old primary goes on a little on timeline 1, then stops.
    pg.psql("update a set v = 7 where id % 3 = 0");
    pg.stop();

    let mut p2 = Node::new(env, &repo, "incr-tl2");
    let pgdata = p2.pgdata.display().to_string();
    let args = [
        "restore",
        "--pgdata",
        pgdata.as_str(),
        "--set",
        &incr1,
        "--target",
        "immediate",
        "--target-action",
        "promote",
        "--archive-mode",
        "preserve",
    ];
    repo.run(env, As::PgUser, &args, env.dir()).ok();
    p2.start();
    p2.wait_promoted();
    assert_eq!(p2.timeline(), 2);
    assert_eq!(content(env, &p2.base, p2.port), incr1_content);
    p2.psql("update a set v = 2 where id % 60 = 0");
    p2.psql("insert into a select g, 2 from generate_series(20001, 21000) g");
    let (incr2, err) = backup_at(env, &repo, (&p2.pgdata, &p2.base, p2.port), "incr");
    assert!(
        incr2.ends_with('I') && err.contains(&format!("incr backup on {incr1}")),
        "the timeline-2 incr should build on the timeline-1 incr {incr1}:\n{err}"
    );
    let want = content(env, &p2.base, p2.port);
    let i = info(env, &repo);
    let b = backup_info(&i, &incr2);
    assert_eq!(b["timeline"], 2);
    assert_eq!(b["depends_on"], serde_json::json!([incr1, full]));
    restore_and_compare(env, &repo, &incr2, &["--target", "immediate"], &want);
    p2.stop();
}

/// Block sums: with the block references of one segment of its range
/// deleted, an incremental compares each relation file block by block with
/// its reference's sums and stores only the blocks that changed (before,
/// a changed file was copied whole); it says it fell back, restores right,
/// and verify checks every stored block against the sums.
#[test]
fn block_fallback_stores_only_changed_blocks() {
    let env = &TestEnv::new();
    let repo = env.local_repo("incrblk");
    let mut pg = Cluster::archiving(env, &repo, true);
    let (sock, port) = (pg.sockdir().to_path_buf(), pg.port());
    pg.psql("create table if not exists pgvault_it_switch(x int)");
    // About 25 MiB in one relation file: a whole copy would show.
    pg.psql(
        "create table big(id int primary key, v int, pad text);
         insert into big select g, 0, repeat(md5(g::text), 4) from generate_series(1, 100000) g",
    );
    // For --delta below: an empty relation file, and a one-block one.
    pg.psql("create table empty_t(x int); create table one_block as select 1 x");
    // Hint bits set and tuples frozen now, so that the update below
    // changes only the blocks of the rows it updates.
    pg.psql("vacuum (freeze, analyze) big");
    pg.psql("vacuum (freeze, analyze) one_block");
    let (full, _) = backup_of(env, &repo, &pg, "full");
    let i = info(env, &repo);
    let wal_start = backup_info(&i, &full)["wal_start"]
        .as_str()
        .expect("wal_start")
        .to_string();
    // A few rows spread over the table: a few dozen blocks change.
    pg.psql("update big set v = 1 where id % 5000 = 0");
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, Duration::from_secs(120));

    // One segment's block references gone: the WAL cannot answer.
    let mut refs = Vec::new();
    walk(&repo.local_archive(), &mut |p: &Path| {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".blockrefs") && name.get(..24).is_some_and(|n| n >= wal_start.as_str()) {
            refs.push(p.to_path_buf());
        }
    });
    refs.sort();
    let victim = refs.first().expect("block references after the full");
    std::fs::remove_file(victim).expect("remove a blockrefs object");

    let (incr, err) = backup_of(env, &repo, &pg, "incr");
    assert!(
        err.contains("falling back to whole files") && err.contains("no block references"),
        "the backup should say it fell back, and why:\n{err}"
    );
    let want = content(env, &sock, port);
    let i = info(env, &repo);
    let c = &backup_info(&i, &incr)["changes"];
    assert_eq!(c["method"], "whole-files", "{c:#}");
    let n = |k: &str| c[k].as_u64().unwrap_or(0);
    assert!(
        n("compared_files") > 0 && n("compared_blocks") > 2000,
        "every relation file should be compared block by block: {c:#}"
    );
    assert!(
        n("delta_files") > 0 && n("changed_blocks") > 0 && n("changed_blocks") < 400,
        "the changed files should be stored as their changed blocks only: {c:#}"
    );
    let stored = |l: &str| backup_info(&i, l)["stored_size"].as_u64().unwrap_or(0);
    assert!(
        stored(&incr) * 10 < stored(&full),
        "the fallback incr stored {} bytes, the full {}",
        stored(&incr),
        stored(&full)
    );
    restore_and_compare(env, &repo, &incr, &["--target", "immediate"], &want);
    let v = repo.run(env, As::PgUser, &["verify", "--output", "json"], env.dir());
    v.ok();

    // restore --delta onto a restore of it with three blocks of the table
    // damaged, an empty relation file gone and a junk block after the one
    // of another: only those three blocks are written, the empty file is
    // made again and the longer one cut to its length (its block matches:
    // compared by blocks alone, it was kept as it was), and the cluster is
    // the backup again.
    let rel = pg.psql("select pg_relation_filepath('big')");
    let empty_rel = pg.psql("select pg_relation_filepath('empty_t')");
    let one_rel = pg.psql("select pg_relation_filepath('one_block')");
    pg.stop();
    let mut node = Node::new(env, &repo, "incr-delta");
    let pgdata = node.pgdata.display().to_string();
    let mut args = vec![
        "restore",
        "--pgdata",
        pgdata.as_str(),
        "--set",
        incr.as_str(),
    ];
    args.extend(crate::campaign::TO_BACKUP_END);
    repo.run(env, As::PgUser, &args, env.dir()).ok();
    let file = node.pgdata.join(&rel);
    for b in [3, 700, 1500] {
        damage_page(&file, b);
    }
    let (empty, one) = (node.pgdata.join(&empty_rel), node.pgdata.join(&one_rel));
    assert_eq!(
        std::fs::metadata(&one).expect("one_block's file").len(),
        8192
    );
    std::fs::remove_file(&empty).expect("remove empty_t's file");
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&one)
            .expect("open one_block's file");
        f.write_all(&[0xab; 8192]).expect("append a junk block");
    }
    args.push("--delta");
    let run = repo.run(env, As::PgUser, &args, env.dir());
    run.ok();
    assert_eq!(
        std::fs::metadata(&empty).map(|m| m.len()).ok(),
        Some(0),
        "--delta should make the missing empty relation file again"
    );
    assert_eq!(
        std::fs::metadata(&one).expect("one_block's file").len(),
        8192,
        "--delta should cut a relation file back to the backup's length"
    );
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains("--delta:"))
        .unwrap_or_else(|| panic!("restore --delta should report its blocks:\n{}", run.stderr));
    let num = |after: &str| -> u64 {
        line.split(after)
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number after {after:?} in {line:?}"))
    };
    eprintln!("{line}");
    assert_eq!(
        num("--delta:"),
        3,
        "only the damaged blocks should be written: {line}"
    );
    assert!(
        num(" of ") > 2000,
        "every relation file's blocks compared: {line}"
    );
    // Only the chunks holding them are fetched (ranged reads), not the
    // table's whole stored copy.
    let fetched = {
        let words: Vec<&str> = line.split_whitespace().collect();
        let at = words.iter().position(|w| *w == "fetched").expect("fetched");
        let v: f64 = words[at - 2].parse().expect("a size");
        let unit = ["B", "KiB", "MiB", "GiB"]
            .iter()
            .position(|u| *u == words[at - 1])
            .expect("a unit");
        (v * 1024f64.powi(unit as i32)) as u64
    };
    assert!(
        fetched * 4 < stored(&full),
        "restore --delta fetched {fetched} bytes for three blocks; the full stored {}",
        stored(&full)
    );
    node.start();
    node.wait_promoted();
    assert_eq!(
        content(env, &node.base, node.port),
        want,
        "restore --delta of {incr}"
    );
    node.amcheck();
    node.stop();
    node.checksums();

    // Damaged block sums: verify names the object.
    let sums = repo
        .local
        .as_ref()
        .expect("local repo")
        .join("incrblk/backup")
        .join(&incr)
        .join("blocksums.pgv");
    let mut bytes = std::fs::read(&sums).expect("read the block sums");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&sums, &bytes).expect("damage the block sums");
    let v = repo.run(env, As::PgUser, &["verify", "--output", "json"], env.dir());
    assert!(
        v.stdout.contains("corrupt") && v.stdout.contains(&format!("{incr}/blocksums.pgv")),
        "verify should report the damaged block sums of {incr}:\n{}\n{}",
        v.stdout,
        v.stderr
    );
}
