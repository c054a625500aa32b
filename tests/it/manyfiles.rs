//! A cluster of many files (issue 14): schema-per-tenant databases hold
//! hundreds of thousands. Here at least 20,000 files — 5,000 tables with a
//! primary key and a TOAST-able column, four files each — backed up,
//! verified, restored, started, and every table read back. Not timed: it
//! proves that restore lays every file down (and `verify` reads every
//! object) at a file count where per-file costs and per-file memory show.

use std::path::Path;

use super::common::{backup, As, Cluster, InitOpts, Node, TestEnv};
use super::pitr::restore;

/// Tables created; each has a heap, a primary-key index, a TOAST table and
/// its index: four files.
const TABLES: usize = 5_000;
/// Tables per transaction: creating them all in one would exceed the
/// shared lock table (max_locks_per_transaction × max_connections).
const BATCH: usize = 250;
/// Files the data directory must hold at least.
const MIN_FILES: usize = 20_000;

fn count_files(dir: &Path) -> usize {
    let mut n = 0;
    super::common::walk(dir, &mut |_| n += 1);
    n
}

#[test]
fn restore_and_verify_20k_files() {
    let env = TestEnv::new();
    let repo = env.local_repo("many");
    let mut pg = Cluster::init(
        &env,
        InitOpts {
            wal_segsize_mb: Some(16),
            data_checksums: true,
        },
    );
    repo.stanza_create(&env, pg.pgdata());
    pg.start_archiving(&env, &repo);
    for first in (0..TABLES).step_by(BATCH) {
        pg.psql(&format!(
            "do $$ begin for i in {first}..{last} loop \
               execute format('create table m_%s (id int primary key, v text)', i); \
               execute format('insert into m_%s values (%s, repeat(''x'', 10))', i, i); \
             end loop; end $$",
            last = first + BATCH - 1
        ));
    }
    pg.psql("checkpoint");
    let files = count_files(pg.pgdata());
    assert!(
        files >= MIN_FILES,
        "the primary should hold at least {MIN_FILES} files, has {files}"
    );

    let label = backup(&env, &repo, &pg);
    let run = repo.run(&env, As::PgUser, &["verify"], env.dir());
    run.ok();

    let mut node = Node::new(&env, &repo, "many");
    restore(
        &env,
        &repo,
        As::Root,
        &node.pgdata,
        &[
            "--set",
            &label,
            "--target",
            "immediate",
            "--target-action",
            "promote",
            "--archive-mode",
            "off",
        ],
    )
    .ok();
    let restored = count_files(&node.pgdata);
    assert!(
        restored >= MIN_FILES,
        "the restored directory should hold at least {MIN_FILES} files, has {restored}"
    );
    node.start();
    node.wait_promoted();
    // Every table is there and readable, with its row (and its TOAST
    // table's and index's files: the index scan and the detoasted value);
    // in the batches they were made in, for the same lock-table reason.
    for first in (0..TABLES).step_by(BATCH) {
        let got = node.psql(&format!(
            "set enable_seqscan = off; \
             select count(*), sum(length(v)) from ( \
               select (xpath('/row/v/text()', query_to_xml(format('select v from m_%s where id = %s', i, i), false, true, '')))[1]::text as v \
               from generate_series({first}, {last}) i) s",
            last = first + BATCH - 1
        ));
        assert_eq!(
            got,
            format!("{BATCH}|{}", BATCH * 10),
            "every table m_{first}..m_{} of the restored cluster should hold its row",
            first + BATCH - 1
        );
    }
    node.stop();
    pg.stop();
}
