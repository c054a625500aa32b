//! Resume of an interrupted backup (issue 10): a full and an incremental
//! backup killed part-way (SIGKILL, deterministic: the fault injector ends
//! the process right after a chosen journal chunk is stored), rows changed,
//! then `backup` again. It continues the killed backup's directory (same
//! label), reuses what the killed run had stored of unchanged files (the
//! output and `info` say how much), reads the changed files again, and its
//! restore equals the cluster at that backup, table by table, with
//! `pg_amcheck` and `pg_checksums` clean; `verify` finds nothing wrong.
//!
//! Before resume a killed backup's directory stayed an orphan and the next
//! backup started from nothing under a new label: every assertion on the
//! label and on reused bytes failed.

use crate::common::*;
use crate::incr::{backup_info, backup_of, content, info, restore_and_compare};
use std::time::Duration;

/// The labels of the backup directories without a manifest, as `verify`
/// lists them.
#[track_caller]
fn incomplete(env: &TestEnv, repo: &Repo) -> Vec<String> {
    let run = repo.run(env, As::PgUser, &["verify", "--output", "json"], env.dir());
    let v: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("verify --output json: {e}\n{}\n{}", run.stdout, run.stderr));
    v["orphans"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|o| o["kind"] == "incomplete-backup")
                .filter_map(|o| o["what"].as_str()?.rsplit('/').next().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// The journal chunks in backup directory `label` of a local repository
/// (`None`: not a local repository).
fn local_journal(repo: &Repo, label: &str) -> Option<usize> {
    let dir = repo.local.as_ref()?.join(&repo.stanza).join("backup");
    let journal = dir.join(label).join("journal");
    // A run killed while writing leaves a `.pgvault-tmp-*` file: the
    // orphan sweep removes those once old (repo::orphans), not the backup.
    let stored =
        |e: &std::fs::DirEntry| !e.file_name().to_string_lossy().starts_with(".pgvault-tmp-");
    Some(
        journal
            .read_dir()
            .map(|d| d.flatten().filter(stored).count())
            .unwrap_or(0),
    )
}

/// Runs `backup --type ty` of `pg` that SIGKILLs itself right after its
/// `chunks`-th journal chunk is stored; returns the label of the directory
/// it left (no manifest, a journal).
#[track_caller]
fn killed_backup(env: &TestEnv, repo: &Repo, pg: &Cluster, ty: &str, chunks: u32) -> String {
    let before = incomplete(env, repo);
    let mut killer = repo.clone();
    killer.env.push((
        "PGVAULT_FAULTS".into(),
        format!("kill_after={chunks},kill_on=/journal/"),
    ));
    killer
        .env
        .push(("PGVAULT_TEST_JOURNAL_EVERY".into(), "1".into()));
    let args = backup_args(pg.pgdata(), pg.sockdir(), pg.port(), ty);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = killer.run(env, As::PgUser, &args, env.dir());
    // Run through `runuser`, which reports the signal as 128 + 9.
    assert!(
        matches!(run.code, None | Some(137)) && run.stderr.contains("killing this process"),
        "the backup should have been killed: {:?}\n{}",
        run.code,
        run.stderr
    );
    let new: Vec<String> = incomplete(env, repo)
        .into_iter()
        .filter(|l| !before.contains(l))
        .collect();
    assert_eq!(new.len(), 1, "one new backup without a manifest: {new:?}");
    if let Some(n) = local_journal(repo, &new[0]) {
        assert!(
            n >= chunks as usize,
            "the killed backup should have left {chunks} journal chunk(s), not {n}"
        );
    }
    new[0].clone()
}

/// Checks that `label` was resumed with reused bytes, in its output and in
/// `info`.
#[track_caller]
fn assert_resumed(env: &TestEnv, repo: &Repo, label: &str, killed: &str, err: &str) {
    assert_eq!(label, killed, "the backup should continue the killed one");
    assert!(
        err.contains("resuming the interrupted") && err.contains("resumed: "),
        "the backup should say it resumed and what it reused:\n{err}"
    );
    let i = info(env, repo);
    let r = &backup_info(&i, label)["resumed"];
    assert!(
        r["files"].as_u64().unwrap_or(0) > 0 && r["bytes"].as_u64().unwrap_or(0) > 0,
        "{label} should have reused files and bytes: {r:#}"
    );
    assert_eq!(r["interrupted_runs"], 1, "{r:#}");
    assert!(
        !incomplete(env, repo).contains(&label.to_string()),
        "{label} is complete"
    );
    if let Some(n) = local_journal(repo, label) {
        assert_eq!(
            n, 0,
            "the journal of the complete backup {label} should be gone"
        );
    }
}

#[test]
fn killed_backups_resume() {
    let env = &TestEnv::new();
    killed_backups_resume_in(env, env.local_repo("resume"));
}

/// The same on an object store (moto): its listing decides which stored
/// objects are trusted.
#[test]
fn killed_backups_resume_s3() {
    let env = &TestEnv::new();
    let Some(moto) = require_server(env.moto.clone(), "PGVAULT_TEST_MOTO") else {
        return;
    };
    killed_backups_resume_in(env, env.s3_repo(&moto, "resume"));
}

fn killed_backups_resume_in(env: &TestEnv, repo: Repo) {
    let mut pg = Cluster::archiving(env, &repo, true);
    let (sock, port) = (pg.sockdir().to_path_buf(), pg.port());
    pg.psql("create table if not exists pgvault_it_switch(x int)");
    pg.psql(
        "create table big(id int primary key, v int, pad text) with (autovacuum_enabled = off);
         insert into big select g, 0, repeat('b', 150) from generate_series(1, 40000) g;
         select count(*) from big;
         create table small(id int, v int); insert into small select generate_series(1, 2000), 0;
         create table other(id int, v int); insert into other select generate_series(1, 2000), 0;",
    );
    // Files written a moment before they are read are read again on
    // resume (their mtime cannot prove they did not change since): let the
    // writes settle first, as on a cluster whose data is mostly old. (`big`
    // is read once so its hint bits are set before, and autovacuum, which
    // would set them later, is off for it.)
    pg.psql("checkpoint");
    std::thread::sleep(Duration::from_millis(1500));

    // A full backup killed after its second journal chunk.
    let killed = killed_backup(env, &repo, &pg, "full", 2);
    pg.psql("update small set v = 1 where id % 3 = 0; insert into other values (-1, -1)");
    let (full, err) = backup_of(env, &repo, &pg, "full");
    assert!(full.ends_with('F'), "label {full}");
    assert_resumed(env, &repo, &full, &killed, &err);
    let full_content = content(env, &sock, port);

    // An incremental killed after its first chunk (the changed blocks of
    // `big`, stored in an object of their own).
    pg.psql("update big set v = 1; select count(*) from big");
    pg.psql("update small set v = 2 where id % 5 = 0");
    pg.psql("checkpoint");
    std::thread::sleep(Duration::from_millis(1500));
    let killed = killed_backup(env, &repo, &pg, "incr", 1);
    pg.psql("update small set v = 3 where id % 7 = 0; insert into other values (-2, -2)");
    let (incr, err) = backup_of(env, &repo, &pg, "incr");
    assert!(incr.ends_with('I'), "label {incr}");
    assert!(err.contains(&format!("incr backup on {full}")), "{err}");
    assert_resumed(env, &repo, &incr, &killed, &err);
    let incr_content = content(env, &sock, port);

    let immediate: &[&str] = &["--target", "immediate"];
    restore_and_compare(env, &repo, &full, immediate, &full_content);
    restore_and_compare(env, &repo, &incr, immediate, &incr_content);
    repo.run(env, As::PgUser, &["verify"], env.dir()).ok();
    pg.stop();
}
