//! Timelines as PostgreSQL makes them (issue 9, defects 0, 10 and 11), with
//! pgvault as `archive_command` and `restore_command` of real PostgreSQL 15
//! clusters on a local repository:
//!
//! * `pitr_before_the_parent_switch_point`: the scenario of PostgreSQL's
//!   `028_pitr_timelines.pl`. A standby (archive_mode = always) streams from
//!   the primary; the primary dies before archiving the segment that holds a
//!   restore point; the standby is promoted to timeline 2. A PITR to the
//!   restore point, along timeline 2, stops in timeline 1's WAL before
//!   timeline 2's own switch point and creates timeline 3, whose history
//!   file lists a switch point (`2 …`) lower than the one before it
//!   (`1 …`). That file must be archived, before any timeline-3 segment;
//!   later restores must not reuse timeline 3 and must reach the rows of
//!   timeline 3 by name, by time and to the end. Pushed by hand into other
//!   stanzas: a timeline-3 segment brings its history file along first, and
//!   a timeline-3 history that the archived timeline-3 WAL contradicts is
//!   refused.
//! * `failover_rpo_and_split_brain`: right after a failover, `info`'s RPO
//!   comes from the same replay path as the recoverable window (a commit that
//!   only the old timeline's `.partial` holds is not counted); then the old
//!   primary comes back and archives timeline-1 WAL past the switch point:
//!   `archive-push` warns on every such push, `info`, `check` and `verify`
//!   flag it, so do the metrics, and `archive-push-superseded = fail`
//!   refuses such pushes.
//!
//! Before issue 9's fixes every case failed: the history file was refused
//! (exit 3) while the look-ahead pusher archived timeline 3's segment
//! without it, later restores took timeline 3 again, `info` counted a
//! commit only a `.partial` held, and WAL archived past a switch point
//! went unnoticed.

use crate::common::*;
use crate::pitr::{clone_args, info, lsn, primary, restore, timeline_info};
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

const ARCHIVE_TIMEOUT: Duration = Duration::from_secs(120);
/// The primaries here have 1 MiB WAL segments (`pitr::primary`).
const SEG: u64 = 1 << 20;
/// Exit codes from docs/exit-codes.md.
const EXIT_NOT_ARCHIVED: i32 = 1;
const EXIT_VERIFY: i32 = 11;

/// Ids of `t`, "1,3,4" ("" when empty).
const IDS: &str = "select coalesce(string_agg(id::text, ',' order by id), '') from t";

// ---------------------------------------------------------------------------
// Helpers.

/// A primary archiving into a new local repository (stanza `stanza`),
/// with one backup.
fn backed_up_primary(env: &TestEnv, stanza: &str) -> (Repo, Cluster) {
    let repo = env.local_repo(stanza);
    let pg = primary(env, &repo);
    crate::common::backup(env, &repo, &pg);
    (repo, pg)
}

/// A standby restored by pgvault (`--standby`, archive settings kept) that
/// streams from `pg` and, when `always`, archives what it receives
/// (`archive_mode = always`, as the standby of 028_pitr_timelines.pl).
fn streaming_standby(env: &TestEnv, repo: &Repo, pg: &Cluster, always: bool) -> Node {
    let mut sb = Node::new(env, repo, "standby");
    restore(
        env,
        repo,
        As::PgUser,
        &sb.pgdata,
        &["--standby", "--archive-mode", "preserve"],
    )
    .ok();
    sb.set_conf(&format!(
        "primary_conninfo = 'host={} port={} user={}'\n\
         wal_retrieve_retry_interval = '1s'",
        pg.sockdir().display(),
        pg.port(),
        env.user
    ));
    if always {
        sb.set_conf("archive_mode = always");
    }
    sb.start();
    sb
}

/// `select pg_promote()` (waits for the end of recovery).
#[track_caller]
fn promote(node: &Node) {
    assert_eq!(node.psql("select pg_promote()"), "t");
    node.wait_promoted();
}

/// `pgvault archive-get NAME` into a scratch file, as the postgres user.
fn archive_get(env: &TestEnv, repo: &Repo, name: &str) -> (Run, PathBuf) {
    let dir = env.mkdir(&format!("get-{}", unique()), As::PgUser);
    let dest = dir.join(name);
    let dest_s = dest.display().to_string();
    let run = repo.run(
        env,
        As::PgUser,
        &["--archive-get-ahead", "0", "archive-get", name, &dest_s],
        &dir,
    );
    (run, dest)
}

/// Wait until the archive serves `name`.
#[track_caller]
fn wait_in_archive(env: &TestEnv, repo: &Repo, name: &str) {
    let start = Instant::now();
    loop {
        let (run, _) = archive_get(env, repo, name);
        match run.code {
            Some(0) => return,
            Some(EXIT_NOT_ARCHIVED) if start.elapsed() < ARCHIVE_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(300))
            }
            _ => panic!(
                "{name} did not reach the archive within {ARCHIVE_TIMEOUT:?}: exit {:?}\n{}",
                run.code, run.stderr
            ),
        }
    }
}

/// Wait until `node`'s archiver has archived `segment`, failing fast (with
/// the file PostgreSQL keeps retrying and the server log) when archiving
/// keeps failing: the archiver retries a refused file forever.
#[track_caller]
fn wait_node_archived(node: &Node, segment: &str) {
    let start = Instant::now();
    let mut failing_since: Option<Instant> = None;
    loop {
        let row = node.psql(
            "select coalesce(last_archived_wal, ''), coalesce(last_failed_wal, ''), \
             coalesce(last_failed_time > coalesce(last_archived_time, '-infinity'), false) \
             from pg_stat_archiver",
        );
        let cols: Vec<&str> = row.split('|').collect();
        if cols[0].len() == 24 && cols[0] >= segment {
            return;
        }
        if cols[2] == "t" {
            let since = *failing_since.get_or_insert_with(Instant::now);
            assert!(
                since.elapsed() < Duration::from_secs(15),
                "archiving keeps failing on {} while waiting for {segment}\n--- server log\n{}",
                cols[1],
                node.log_tail(40)
            );
        } else {
            failing_since = None;
        }
        assert!(
            start.elapsed() < ARCHIVE_TIMEOUT,
            "{segment} not archived after {ARCHIVE_TIMEOUT:?}: {row}\n--- server log\n{}",
            node.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// When the local repository's objects for `name` were written: (the
/// earliest, the latest) modification time of its data objects and claim.
fn written_at(repo: &Repo, name: &str) -> Option<(SystemTime, SystemTime)> {
    let mut files = repo.local_wal_objects(name);
    if let Some(dir) = files.first().and_then(|f| f.parent()) {
        files.push(dir.join(format!("{name}.claim")));
    }
    let times: Vec<SystemTime> = files
        .iter()
        .filter_map(|f| fs::metadata(f).and_then(|m| m.modified()).ok())
        .collect();
    Some((*times.iter().min()?, *times.iter().max()?))
}

/// The segments in the local repository's archive whose names start with
/// `prefix` (from the data objects, `<name>-<sha256>.zst`).
fn archived_names(repo: &Repo, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    walk(&repo.local_archive(), &mut |p| {
        let file = p.file_name().unwrap_or_default().to_string_lossy();
        let name = file
            .strip_suffix(".zst")
            .and_then(|stem| stem.rsplit_once('-'))
            .map(|(name, _sha)| name);
        if let Some(name) = name.filter(|n| n.len() == 24 && n.starts_with(prefix)) {
            out.push(name.to_string());
        }
    });
    out.sort();
    out.dedup();
    out
}

/// Copies the objects of WAL file `name` (data, claim, summary) from one
/// stanza of a local repository to another, as pgvault's layout keeps them.
fn copy_objects(env: &TestEnv, from: &Repo, to: &Repo, name: &str) {
    let (src, dst) = (from.local_archive(), to.local_archive());
    let mut copied = 0;
    walk(&src, &mut |p| {
        let file = p.file_name().unwrap_or_default().to_string_lossy();
        if !file.starts_with(name) {
            return;
        }
        let rel = p.strip_prefix(&src).expect("below the archive");
        let target = dst.join(rel);
        // Directories as pgvault would have made them: the postgres user's.
        let mut dir = dst.clone();
        let mut dirs = vec![dir.clone()];
        for part in rel.parent().into_iter().flat_map(Path::components) {
            dir.push(part);
            dirs.push(dir.clone());
        }
        for d in dirs.iter().filter(|d| !d.exists()) {
            mkdir_mode(d, 0o755);
            chown(d, env.uid, env.gid);
        }
        fs::copy(p, &target).unwrap_or_else(|e| panic!("copy {}: {e}", p.display()));
        chown(&target, env.uid, env.gid);
        copied += 1;
    });
    assert!(copied > 0, "no objects of {name} in {}", src.display());
}

/// The last line of a history file: (parent, switch point).
fn last_switch(history: &str) -> (u32, String) {
    let line = history
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .unwrap_or_else(|| panic!("empty history file:\n{history}"));
    let mut f = line.split_whitespace();
    let parent = f.next().and_then(|p| p.parse().ok()).expect("parent");
    let at = f.next().expect("switch point").to_string();
    (parent, at)
}

/// A history file of `node`'s pg_wal.
fn node_history(node: &Node, tli: u32) -> String {
    let p = node
        .pgdata
        .join("pg_wal")
        .join(format!("{tli:08X}.history"));
    fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// Restore with `args` into a new directory, start and wait for promotion.
#[track_caller]
fn restored(env: &TestEnv, repo: &Repo, name: &str, args: &[&str]) -> Node {
    let mut node = Node::new(env, repo, name);
    restore(env, repo, As::PgUser, &node.pgdata, args).ok();
    node.start();
    node.wait_promoted();
    node
}

/// A clone (`--archive-mode off`) restored with `target`, promoted: its
/// rows and the timeline it promoted to.
#[track_caller]
fn clone_rows(env: &TestEnv, repo: &Repo, name: &str, target: &[&str]) -> (String, u64) {
    let mut n = restored(env, repo, name, &clone_args(target));
    let out = (n.psql(IDS), n.timeline());
    n.stop();
    n.assert_log_clean();
    out
}

// ---------------------------------------------------------------------------
// 028_pitr_timelines.pl with pgvault.

#[test]
fn pitr_before_the_parent_switch_point() {
    let env = TestEnv::new();
    let (repo, mut pg) = backed_up_primary(&env, "tl028");
    let mut cases = Cases::new();

    // Rows 1 and 2 around the restore point, in a segment the primary will
    // not get to archive.
    pg.psql("insert into t values (1, 'x')");
    pg.psql("select pg_create_restore_point('rp')");
    pg.psql("insert into t values (2, 'x')");
    let mut sb = streaming_standby(&env, &repo, &pg, true);
    sb.wait_for(IDS, "1,2", RECOVERY_TIMEOUT, "rows 1 and 2 on the standby");
    pg.stop_immediate();

    // Timeline 2: it holds rows 1 and 2; its first segment starts with
    // timeline 1's WAL up to the switch (restore point included).
    promote(&sb);
    let seg2 = sb.psql("select pg_walfile_name(pg_current_wal_lsn())");
    sb.psql("select pg_switch_wal()");
    sb.stop();
    wait_in_archive(&env, &repo, "00000002.history");
    wait_in_archive(&env, &repo, &seg2);
    let (_, tl2_switch) = last_switch(&node_history(&sb, 2));

    // The PITR to "rp" along timeline 2 (the latest) stops in timeline 1's
    // WAL before timeline 2 began, and archives into the same stanza.
    let mut p3 = restored(
        &env,
        &repo,
        "pitr",
        &[
            "--target-name",
            "rp",
            "--target-action",
            "promote",
            "--archive-mode",
            "preserve",
        ],
    );
    assert_eq!(p3.psql(IDS), "1", "the PITR to rp has row 1 only");
    assert_eq!(p3.timeline(), 3);
    let h3 = node_history(&p3, 3);
    let (parent, tl3_switch) = last_switch(&h3);
    assert_eq!(parent, 2, "timeline 3's history:\n{h3}");
    assert!(
        lsn(&tl3_switch) < lsn(&tl2_switch),
        "the scenario needs timeline 3's switch point before timeline 2's:\n{h3}"
    );
    eprintln!("00000003.history as PostgreSQL wrote it:\n{h3}");

    p3.psql("insert into t values (3, 'x')");
    p3.psql("select pg_create_restore_point('rp3')");
    let time3 = p3.psql("select now()::text");
    std::thread::sleep(Duration::from_millis(1100));
    p3.psql("insert into t values (4, 'x')");
    let seg3 = p3.psql("select pg_walfile_name(pg_switch_wal())");
    assert!(seg3.starts_with("00000003"), "{seg3}");

    cases.run(
        "00000003.history is archived as PostgreSQL wrote it",
        || {
            wait_node_archived(&p3, &seg3);
            let (run, got) = archive_get(&env, &repo, "00000003.history");
            run.ok();
            assert_eq!(
                fs::read_to_string(&got).expect("read the fetched history"),
                h3,
                "the archived 00000003.history is not the one PostgreSQL wrote"
            );
        },
    );
    p3.stop();
    cases.run(
        "no timeline-3 segment reached the archive before its history",
        || {
            let segments = archived_names(&repo, "00000003");
            let history = written_at(&repo, "00000003.history");
            for s in &segments {
                let (first, _) = written_at(&repo, s).expect("segment objects");
                assert!(
                    history.is_some_and(|(_, done)| done <= first),
                    "{s} reached the archive before 00000003.history (archived: {})",
                    if history.is_some() { "later" } else { "never" }
                );
            }
        },
    );
    cases.run("PostgreSQL's archiver never failed on timeline 3", || {
        let log = p3.log_text();
        let failed: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("archive command failed"))
            .collect();
        assert!(
            failed.is_empty(),
            "the archiver failed on timeline 3's files:\n{}",
            failed.join("\n")
        );
    });

    // The same files pushed by hand into other stanzas of the repository.
    cases.run(
        "archive-push of a timeline-3 segment archives 00000003.history first",
        || {
            let other = repo.with_stanza("tl028-segment-first");
            other.stanza_create(&env, &p3.pgdata);
            let path = p3.pgdata.join("pg_wal").join(&seg3);
            other
                .run(
                    &env,
                    As::PgUser,
                    &["archive-push", &path.display().to_string()],
                    &p3.pgdata,
                )
                .ok();
            let (run, got) = archive_get(&env, &other, "00000003.history");
            run.ok();
            assert_eq!(fs::read_to_string(&got).expect("read the history"), h3);
            let (_, history_done) = written_at(&other, "00000003.history").expect("history");
            let (segment_first, _) = written_at(&other, &seg3).expect("segment");
            assert!(
                history_done <= segment_first,
                "{seg3} reached the archive before 00000003.history"
            );
        },
    );
    cases.run(
        "a history that the archived timeline-3 WAL contradicts is refused",
        || {
            // An archive holding timeline 3's first segment but not its
            // history (what pushing ahead of the history used to leave), and
            // a timeline-3 history from another cluster history: timeline 3
            // beginning one segment later.
            let forged = repo.with_stanza("tl028-forged");
            forged.stanza_create(&env, &p3.pgdata);
            copy_objects(&env, &repo, &forged, &seg3);
            let dir = env.mkdir(&format!("forged-{}", unique()), As::PgUser);
            let file = dir.join("00000003.history");
            let begins = lsn(&tl3_switch) - lsn(&tl3_switch) % SEG + SEG;
            fs::write(
                &file,
                format!(
                    "1\t{tl2_switch}\tno recovery target specified\n\n\
                     2\t{:X}/{:X}\tno recovery target specified\n",
                    begins >> 32,
                    begins & 0xFFFF_FFFF
                ),
            )
            .expect("write the forged history");
            let run = forged.run(
                &env,
                As::PgUser,
                &["archive-push", &file.display().to_string()],
                &dir,
            );
            let lines = run.stderr_lines();
            let errors: Vec<&&str> = lines.iter().filter(|l| l.starts_with("error:")).collect();
            assert!(
                run.code != Some(0)
                    && errors.len() == 1
                    && errors[0].contains("00000003.history")
                    && errors[0].contains(&seg3)
                    && lines.iter().any(|l| l.starts_with("hint:")),
                "pushing a 00000003.history that {seg3} in the archive contradicts should fail \
                 with one error line naming both, and a hint: exit {:?}\n{}",
                run.code,
                run.stderr
            );
            let (get, _) = archive_get(&env, &forged, "00000003.history");
            get.expect_code(EXIT_NOT_ARCHIVED);
        },
    );

    cases.run("info shows timeline 3 off timeline 2, with rp3", || {
        let i = info(&env, &repo);
        let t3 = timeline_info(&i, 3).unwrap_or_else(|| panic!("no timeline 3 in info: {i:#}"));
        assert_eq!(t3["parent"], 2, "{t3:#}");
        assert_eq!(t3["switch_lsn"], tl3_switch.as_str(), "{t3:#}");
        let rps: Vec<&str> = t3["recoverable"]["restore_points"]
            .as_array()
            .map(|a| a.iter().filter_map(|r| r["name"].as_str()).collect())
            .unwrap_or_default();
        assert!(
            rps.contains(&"rp3"),
            "timeline 3's recoverable window should hold rp3: {t3:#}"
        );
    });

    // Later restores: the next timeline is 4, whichever timeline they follow
    // (PostgreSQL probes the archive's history files: 3 is taken).
    cases.run("PITR to rp again, along timeline 2: promotes to 4", || {
        let got = clone_rows(
            &env,
            &repo,
            "again",
            &["--target-name", "rp", "--target-timeline", "2"],
        );
        assert_eq!(got, ("1".to_string(), 4));
    });
    cases.run("PITR to rp3 on timeline 3", || {
        let got = clone_rows(&env, &repo, "rp3", &["--target-name", "rp3"]);
        assert_eq!(got, ("1,3".to_string(), 4));
    });
    cases.run("PITR by time on timeline 3", || {
        let got = clone_rows(&env, &repo, "time3", &["--target-time", &time3]);
        assert_eq!(got, ("1,3".to_string(), 4));
    });
    cases.run("recovery to the end of timeline 3", || {
        let got = clone_rows(&env, &repo, "end3", &[]);
        assert_eq!(got, ("1,3,4".to_string(), 4));
    });
    cases.finish();
}

// ---------------------------------------------------------------------------
// Failover: the RPO right after it, then a split brain.

/// Seconds since the epoch of an RFC 3339 time (`info`'s format).
fn epoch(rfc3339: &str) -> f64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap_or_else(|e| panic!("not an RFC 3339 time: {rfc3339:?}: {e}"))
        .timestamp_micros() as f64
        / 1e6
}

/// Lines of `text` that name timeline 1 and the LSN `at`.
fn naming<'a>(text: &'a str, at: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| l.contains("timeline 1") && l.contains(at))
        .collect()
}

/// `pgvault check` against the server listening on `host:port`.
fn check(env: &TestEnv, repo: &Repo, host: &Path, port: u16) -> Run {
    let host = host.display().to_string();
    let port = port.to_string();
    repo.run(
        env,
        As::PgUser,
        &["check", "--pg-host", &host, "--pg-port", &port],
        env.dir(),
    )
}

#[test]
fn failover_rpo_and_split_brain() {
    let env = TestEnv::new();
    let (repo, mut pg) = backed_up_primary(&env, "failover");
    let mut cases = Cases::new();
    let sb = streaming_standby(&env, &repo, &pg, false);

    // Row 1 in an archived segment; row 2 only in the segment the primary
    // is writing when it dies.
    pg.psql("insert into t values (1, 'a')");
    let archived = pg.switch_wal();
    pg.wait_archived(&archived, ARCHIVE_TIMEOUT);
    std::thread::sleep(Duration::from_millis(1100));
    let before_2: f64 = pg
        .psql("select extract(epoch from clock_timestamp())")
        .parse()
        .expect("epoch");
    pg.psql("insert into t values (2, 'b')");
    // (The insert position: the write position may still be the start of
    // the segment, which pg_walfile_name names as the previous one.)
    let partial = format!(
        "{}.partial",
        pg.psql("select pg_walfile_name(pg_current_wal_insert_lsn())")
    );
    sb.wait_for(IDS, "1,2", RECOVERY_TIMEOUT, "rows 1 and 2 on the standby");

    // Failover: the standby is promoted while its WAL receiver still runs
    // (had the primary's end of WAL closed the last segment, PostgreSQL
    // would have marked it done), then the primary dies. The promoted
    // standby archives 00000002.history and the old timeline's last segment
    // as .partial; timeline 2's first segment is still being written.
    promote(&sb);
    pg.stop_immediate();
    wait_in_archive(&env, &repo, "00000002.history");
    wait_in_archive(&env, &repo, &partial);

    cases.run(
        "RPO right after the failover: not from the .partial",
        || {
            let i = info(&env, &repo);
            let newest = i["newest_commit_time"]
                .as_str()
                .unwrap_or_else(|| panic!("no newest_commit_time: {i:#}"))
                .to_string();
            let window_end = i["timelines"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t["recoverable"]["to_time"].as_str())
                .max_by(|a, b| epoch(a).total_cmp(&epoch(b)))
                .unwrap_or_else(|| panic!("no recoverable window: {i:#}"))
                .to_string();
            assert!(
                epoch(&newest) < before_2,
                "newest_commit_time {newest} counts row 2's commit, which only {partial} holds \
             (recovery never reads a .partial): {i:#}"
            );
            assert_eq!(
                newest, window_end,
                "newest_commit_time must be the end of the recoverable window: {i:#}"
            );
            let rpo = i["rpo_seconds"].as_f64().expect("rpo_seconds");
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .expect("clock")
                .as_secs_f64();
            assert!(
                rpo >= now - before_2 - 1.0,
                "rpo_seconds {rpo} is smaller than the age of row 2, which is not recoverable"
            );
        },
    );

    // The new primary writes on timeline 2 and archives.
    sb.psql("insert into t values (3, 'new')");
    let seg = sb.psql("select pg_walfile_name(pg_switch_wal())");
    sb.wait_archived(&seg);
    let (parent, at) = last_switch(&node_history(&sb, 2));
    assert_eq!(parent, 1);

    // The old primary comes back and writes: timeline 1 past `at`.
    let mut vars = env.base_env(As::PgUser);
    vars.extend(repo.env.iter().cloned());
    pg.start_with_env(&vars);
    let mut pushed = Vec::new();
    for id in [10, 11] {
        pg.psql(&format!("insert into t values ({id}, 'split')"));
        let s = pg.switch_wal();
        pg.wait_archived(&s, ARCHIVE_TIMEOUT);
        pushed.push(s);
    }
    cases.run(
        "archive-push warns on every push past the switch point (and succeeds)",
        || {
            let log = pg.log_tail(usize::MAX);
            let warned = naming(&log, &at);
            assert!(
                warned.len() >= pushed.len(),
                "archive-push of {pushed:?} (timeline 1 past {at}, where timeline 2 branched \
                 off) should warn once per push naming timeline 1 and {at}; the server log has:\n{}",
                warned.join("\n")
            );
        },
    );
    cases.run("info flags timeline 1 as continued past the switch", || {
        let i = info(&env, &repo);
        let t1 = timeline_info(&i, 1).unwrap_or_else(|| panic!("no timeline 1: {i:#}"));
        let s = &t1["superseded"];
        assert_eq!(s["by_timeline"], 2, "timeline 1: {t1:#}");
        assert_eq!(s["at_lsn"], at.as_str(), "timeline 1: {t1:#}");
        let files: Vec<&str> = s["files"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for p in &pushed {
            assert!(files.contains(&p.as_str()), "{p} not flagged: {t1:#}");
        }
    });
    cases.run("the metrics flag it (alert on > 0)", || {
        let run = repo.run(
            &env,
            As::PgUser,
            &["info", "--output", "openmetrics"],
            env.dir(),
        );
        run.ok();
        let line = run
            .stdout
            .lines()
            .find(|l| {
                l.starts_with("pgvault_wal_superseded_segments{") && l.contains("timeline=\"1\"")
            })
            .unwrap_or_else(|| panic!("no superseded gauge for timeline 1:\n{}", run.stdout));
        let v: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no value in {line}"));
        assert!(
            v >= pushed.len() as f64,
            "{line}: want at least {}",
            pushed.len()
        );
    });
    cases.run(
        "check fails on both servers, naming timeline 1 and the LSN",
        || {
            for (host, port, who) in [
                (pg.sockdir().to_path_buf(), pg.port(), "old primary"),
                (sb.base.clone(), sb.port, "new primary"),
            ] {
                let run = check(&env, &repo, &host, port);
                assert!(
                    run.code != Some(0) && !naming(&run.stderr, &at).is_empty(),
                    "check against the {who} should fail naming timeline 1 and {at}: exit {:?}\n{}",
                    run.code,
                    run.stderr
                );
            }
        },
    );
    cases.run("verify flags it", || {
        let run = repo.run(&env, As::PgUser, &["verify"], env.dir());
        run.expect_code(EXIT_VERIFY);
        assert!(
            !naming(&run.stdout, &at).is_empty(),
            "verify should name timeline 1 and {at}:\n{}",
            run.stdout
        );
    });
    cases.run("archive-push-superseded = fail refuses such pushes", || {
        let cmd = format!(
            "PGVAULT_ARCHIVE_PUSH_SUPERSEDED=fail {}",
            repo.archive_command(env.bin())
        );
        pg.psql(&format!(
            "alter system set archive_command = '{}'",
            cmd.replace('\'', "''")
        ));
        pg.psql("select pg_reload_conf()");
        let start = Instant::now();
        while pg.psql("show archive_command") != cmd {
            assert!(start.elapsed() < Duration::from_secs(30), "not reloaded");
            std::thread::sleep(Duration::from_millis(100));
        }
        // The archiver reads the new setting at its next wake-up.
        std::thread::sleep(Duration::from_secs(1));
        pg.psql("insert into t values (12, 'split')");
        let s = pg.switch_wal();
        let start = Instant::now();
        while pg.psql("select coalesce(last_failed_wal, '') from pg_stat_archiver") != s {
            assert!(
                start.elapsed() < ARCHIVE_TIMEOUT,
                "the push of {s} did not fail:\n{}",
                pg.log_tail(20)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        let (run, _) = archive_get(&env, &repo, &s);
        run.expect_code(EXIT_NOT_ARCHIVED);
        // Refused before anything was stored: nothing left behind by the
        // retries either.
        let mut leftovers = Vec::new();
        walk(&repo.local_archive(), &mut |p| {
            if p.to_string_lossy().contains("pgvault-tmp") {
                leftovers.push(p.to_path_buf());
            }
        });
        assert!(leftovers.is_empty(), "refused pushes left {leftovers:?}");
        let log = pg.log_tail(200);
        assert!(
            log.lines()
                .any(|l| l.starts_with("error:") && l.contains("timeline 1") && l.contains(&at)),
            "the refused push should log an error naming timeline 1 and {at}:\n{log}"
        );
    });
    pg.stop_immediate();
    cases.finish();
}
