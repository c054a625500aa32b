//! Block references against PostgreSQL 17's own WAL summaries on a live
//! server: the default 16 MiB segments, `summarize_wal = on`, a pgbench
//! workload with updates, a VACUUM that truncates, and a database copied and
//! dropped. For the LSN range of the summaries PostgreSQL wrote, the union
//! of pgvault's per-segment sets (`pg::walscan`, `pg::blockref`) must cover
//! every block and limit `pg_wal_summary_contents()` reports. The fixture
//! test in src/pg/walscan/blocktests.rs does the same on 1 MiB segments of
//! every major; this one runs where the summarizer really runs.

use std::path::PathBuf;
use std::time::Duration;

use pgvault::pg::blockref::{Fork, ForkState, RelFileLocator, RelFork};
use pgvault::pg::walscan::{RangeUnion, ScanOptions, WalScanner};
use pgvault::pg::WalFileName;

use super::common::{As, Cluster, InitOpts, TestEnv};

/// A TestEnv running PostgreSQL 17, or None (outside CI) when its binaries
/// are not there.
fn pg17_env() -> Option<TestEnv> {
    let var = "PGVAULT_TEST_PGBIN_17";
    let Some(bin) = std::env::var(var).ok().filter(|v| !v.is_empty()) else {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
        assert!(
            !ci,
            "{var} is not set: scripts/test.sh sets it from `scripts/fetch-pg.sh 17`"
        );
        eprintln!("skipping: {var} is not set (run scripts/test.sh)");
        return None;
    };
    let mut env = TestEnv::new();
    env.pgbin = PathBuf::from(&bin);
    assert!(
        env.pgbin.join("postgres").exists(),
        "{var}={bin} holds no postgres binary"
    );
    Some(env)
}

#[test]
fn covers_postgresql_17s_wal_summaries() {
    let Some(env) = pg17_env() else {
        return;
    };
    let archive = env.mkdir("blockrefs-archive", As::PgUser);
    let mut pg = Cluster::init(
        &env,
        InitOpts {
            wal_segsize_mb: None,
            data_checksums: true,
        },
    );
    pg.set_conf(&format!(
        "summarize_wal = on\narchive_mode = on\narchive_command = 'cp %p {}/%f'\n",
        archive.display()
    ));
    pg.start();
    pg.switch_wal();
    let start = pg.psql("select pg_current_wal_lsn()");
    pg.psql("checkpoint");
    pg.pgbench(&["-i", "-s", "3", "-q"]);
    pg.pgbench(&["-n", "-c", "2", "-t", "400"]);
    pg.psql("delete from pgbench_accounts where aid > 200000");
    pg.psql("vacuum pgbench_accounts");
    pg.psql("create database copied template template0 strategy file_copy");
    pg.psql("drop database copied");
    pg.psql("update pgbench_branches set bbalance = bbalance + 1");
    pg.psql("checkpoint");
    let end = pg.psql("select pg_current_wal_lsn()");
    let last = pg.psql(&format!("select pg_walfile_name('{end}')"));
    pg.switch_wal();
    pg.wait_archived(&last, Duration::from_secs(120));
    let redo = pg.psql("select redo_lsn from pg_control_checkpoint()");
    let mut caught_up = false;
    for _ in 0..240 {
        if pg.psql(&format!(
            "select summarized_lsn >= '{redo}'::pg_lsn from pg_get_wal_summarizer_state()"
        )) == "t"
        {
            caught_up = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(caught_up, "the WAL summarizer never reached {redo}");
    let inside = format!("s.start_lsn >= '{start}' and s.end_lsn <= '{end}'");
    let summaries: u32 = pg
        .psql(&format!(
            "select count(*) from pg_available_wal_summaries() s where {inside}"
        ))
        .parse()
        .unwrap();
    assert!(summaries >= 1, "no summary between {start} and {end}");
    let rows = pg.psql(&format!(
        "select c.reltablespace, c.reldatabase, c.relfilenode, c.relforknumber, \
         c.relblocknumber, c.is_limit_block \
         from pg_available_wal_summaries() s, \
         pg_wal_summary_contents(s.tli, s.start_lsn, s.end_lsn) c where {inside}"
    ));
    let first = pg.psql(&format!("select pg_walfile_name('{start}')"));
    pg.stop();

    // pgvault's side: every archived segment from the first to the last,
    // scanned as archive-push scans them, and their union.
    let seg_size = 16u32 << 20;
    let mut names: Vec<String> = std::fs::read_dir(&archive)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24 && n.as_str() >= first.as_str() && n.as_str() <= last.as_str())
        .collect();
    names.sort();
    assert!(names.len() >= 2, "{names:?}");
    let spill = env.mkdir("blockrefs-spill", As::Root);
    // A small budget: the union spills to disk and merges, as it would for
    // a large range.
    let mut union = RangeUnion::new(64 * 1024, &spill);
    for name in &names {
        let file = WalFileName::parse(name).unwrap();
        let mut s = WalScanner::new(ScanOptions {
            major: 17,
            seg_size,
            segment_start: file.start_lsn(seg_size).unwrap(),
            partial: false,
        });
        s.feed(&std::fs::read(archive.join(name)).unwrap());
        let (summary, refs) = s.finish_with_blocks();
        assert!(
            summary.problems.is_empty() && summary.crc_failures.is_empty(),
            "{name}: {summary:#?}"
        );
        assert!(
            refs.changes.doubts().next().is_none(),
            "{name}: {:#?}",
            refs.changes.doubts().collect::<Vec<_>>()
        );
        union.add(refs).unwrap();
    }
    let union = union.finish().unwrap();
    // The only doubt allowed: the record cut at the last segment's end,
    // after the range.
    let end_lsn: pgvault::pg::Lsn = end.parse().unwrap();
    let early: Vec<_> = union
        .small_sections()
        .doubts()
        .filter(|d| d.lsn < end_lsn)
        .collect();
    assert!(early.is_empty(), "{early:#?}");

    let (mut blocks, mut limits) = (0u32, 0u32);
    for line in rows.lines() {
        let f: Vec<&str> = line.split('|').collect();
        let num = |i: usize| f[i].parse::<u32>().unwrap();
        let (spc, db, rel, fork, blk, limit) =
            (num(0), num(1), num(2), num(3) as u8, num(4), f[5] == "t");
        if rel == 0 {
            assert!(
                union
                    .small_sections()
                    .databases()
                    .any(|(k, _)| k == (spc, db)),
                "{line}: database {spc}/{db} created or dropped, not marked"
            );
            continue;
        }
        let key = RelFork {
            loc: RelFileLocator { spc, db, rel },
            fork: Fork::from_number(fork).unwrap(),
        };
        let covered = union
            .with_fork_state(&key, |s| match s {
                ForkState::Whole(_) => true,
                ForkState::Changed { blocks, limit: l } => {
                    l.is_some_and(|l| l <= blk) || (!limit && blocks.contains(blk))
                }
                ForkState::Unchanged => false,
            })
            .unwrap();
        assert!(
            covered,
            "PostgreSQL's summary has {line}; pgvault's set does not cover it"
        );
        if limit {
            limits += 1;
        } else {
            blocks += 1;
        }
    }
    assert!(
        blocks > 1000 && limits > 0,
        "{blocks} blocks, {limits} limits"
    );
}
