//! Data page checksums checked while `backup` reads the files (issue 13):
//! a real PostgreSQL 15 cluster with data checksums, one page of a table
//! damaged on disk before the backup; the backup completes, names the
//! relation file, fork and block, and `info` reports it.

use crate::common::*;
use serde_json::Value;

#[test]
fn backup_flags_a_page_whose_checksum_fails() {
    let env = TestEnv::new();
    let repo = env.local_repo("main");
    let mut pg = Cluster::archiving(&env, &repo, true);
    pg.psql("create table t as select g as id, md5(g::text) as v from generate_series(1, 2000) g");
    let rel = pg.psql("select pg_relation_filepath('t')");
    pg.psql("checkpoint");
    // Damage block 2 while the server is down, so nothing rewrites it.
    pg.stop();
    damage_page(&pg.pgdata().join(&rel), 2);
    pg.start_archiving(&env, &repo);

    let run = backup_run(&env, &repo, &pg);
    run.ok();
    let line = format!("{rel} (main fork) block 2");
    assert!(
        run.stderr.contains(&line),
        "the backup should name {line}:\n{}",
        run.stderr
    );
    assert!(run.stderr.contains("1 FAILED"), "{}", run.stderr);

    let info = repo.run(&env, As::PgUser, &["info", "--output", "json"], env.dir());
    info.ok();
    let v: Value = serde_json::from_str(&info.stdout).unwrap();
    let pc = &v["backups"][0]["page_checksums"];
    assert!(pc["pages_checked"].as_u64().unwrap() > 10, "{pc}");
    let bad = pc["bad_pages"].as_array().unwrap();
    assert_eq!(bad.len(), 1, "{pc}");
    assert_eq!(bad[0]["path"], rel.as_str());
    assert_eq!(bad[0]["fork"], "main");
    assert_eq!(bad[0]["block"], 2);
    let text = repo.run(&env, As::PgUser, &["info"], env.dir());
    assert!(text.stdout.contains(&line), "{}", text.stdout);
}
