//! SIGKILL of `archive-push` (and the look-ahead pusher it detaches) and of
//! `archive-get` (and its prefetcher), at seeded points spread over the
//! phases of a measured unkilled run, on a local repository.
//!
//! The test plays PostgreSQL's archiver, as tests/it/lookahead.rs does on
//! moto: real segments kept in a stopped cluster's pg_wal, every one marked
//! `.ready`, and `archive-push` of the first one — which also starts the
//! look-ahead pusher for the others — killed at the point. Then, as
//! PostgreSQL would, the same command again, and the archiver's calls for
//! every segment in order. After each case: every push record and every
//! prefetched file is right (common::check_after_kill), every segment comes
//! back byte-identical, and, "a day later", `expire` leaves no orphan and
//! `verify` exits 0 (inventory::settle).
//!
//! `archive-get` is then killed in the middle of restore_command calls (the
//! postgres user's spool, prefetch on), re-run, and finally every segment
//! is fetched the way recovery would, through that spool.

use std::fs;
use std::path::{Path, PathBuf};

use super::inventory::settle;
use super::points::{files_below, measure, run_killed};
use super::*;

/// What check_after_kill's findings are prefixed with.
const KILLED: &str = "after the kill";

/// A stopped cluster's real segments, kept in its pg_wal.
struct Segments {
    pg: Cluster,
    names: Vec<String>,
}

fn segments(env: &TestEnv) -> Segments {
    let mut pg = Cluster::init(env, small_segments());
    pg.set_conf("wal_keep_size = 1GB\nmax_wal_size = 1GB\n");
    let first = pg.redo_wal_file();
    pg.start();
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    let last = pg.switch_wal();
    pg.stop();
    let names = segment_range(&first, &last, pg.wal_segment_size());
    assert!(names.len() >= 10, "only {} segments", names.len());
    Segments { pg, names }
}

/// Marks every segment `.ready`, as PostgreSQL does once it is complete.
fn mark_all_ready(wal: &Path, names: &[String]) {
    let status = wal.join("archive_status");
    for n in names {
        let _ = fs::remove_file(status.join(format!("{n}.done")));
        fs::write(status.join(format!("{n}.ready")), b"").expect("write .ready");
    }
}

fn fresh_repo(env: &TestEnv, s: &Segments) -> Repo {
    let repo = env.local_repo("campaign");
    stanza_create(env, &repo, s.pg.pgdata());
    repo
}

/// PostgreSQL's call for `name`. Look-ahead takes every other `.ready`
/// file at once (`--archive-push-ahead` above the count), so that the
/// pusher ends when they are archived instead of waiting for PostgreSQL to
/// take its records (which this test, playing the archiver, does only
/// after the kill).
fn push_args(wal: &Path, name: &str) -> Vec<String> {
    vec![
        "--log-level".into(),
        "debug".into(),
        "--archive-push-ahead".into(),
        "64".into(),
        "archive-push".into(),
        wal.join(name).display().to_string(),
    ]
}

/// PostgreSQL's archiver after a crash: the call for each segment in order,
/// each marked done once it succeeded; then every segment must come back
/// byte-identical.
fn archive_all(env: &TestEnv, repo: &Repo, wal: &Path, names: &[String]) -> Vec<String> {
    let scratch = env.mkdir(&format!("fetched-{}", unique()), As::Root);
    let mut problems = Vec::new();
    for name in names {
        let args = push_args(wal, name);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = repo.run(env, As::PgUser, &args, env.dir());
        if run.code != Some(0) {
            problems.push(format!(
                "the archiver's call for {name} exited {:?}: {}",
                run.code,
                run.stderr.trim()
            ));
        }
        mark_done(wal, name);
    }
    if let Some(p) = wait_quiet(env) {
        problems.push(p);
    }
    for name in names {
        if let Err(e) = check_acknowledged_file(env, repo, wal, name, &scratch) {
            problems.push(e);
        }
    }
    let _ = fs::remove_dir_all(&scratch);
    problems
}

#[test]
fn kill_archive_push_and_get() {
    let mut c = Campaign::new("kill_archive_push_and_get");
    let scale = Scale::from_env();
    let env = TestEnv::new();
    let s = segments(&env);
    let wal = s.pg.wal_dir();
    let names = &s.names;

    // archive-push, with look-ahead (on by default: 8 files ahead).
    let mut rng = c.rng(1);
    let repo = fresh_repo(&env, &s);
    mark_all_ready(&wal, names);
    let args = push_args(&wal, &names[0]);
    let push = |repo: &Repo, tag: &(String, String)| {
        spawn(
            &env,
            repo,
            As::PgUser,
            &args,
            std::slice::from_ref(tag),
            env.dir(),
        )
    };
    // What a push writes: the repository, and the spool's records.
    let writes = |repo: &Repo| {
        files_below(vec![
            repo.local.clone().expect("local"),
            pg_spool_dir(&env, repo),
        ])
    };
    let (run, plan) = measure(
        &env,
        "archive-push",
        |tag| push(&repo, tag),
        writes(&repo),
        &mut rng,
    );
    run.ok();
    let problems = archive_all(&env, &repo, &wal, names);
    c.problems("archive-push, measured run", problems);
    let scratch = env.mkdir("checked", As::Root);
    let mut checked = (0, 0);
    // The measured run's repository, complete and clean, serves the
    // archive-get cases.
    let get_repo = repo;
    for i in 0..scale.points {
        let point = plan.point(i, scale.points, &mut rng);
        let ctx = format!("seed {} archive-push#{i} ({point})", c.seed);
        let repo = fresh_repo(&env, &s);
        mark_all_ready(&wal, names);
        let killed = run_killed(&env, &ctx, &point, |tag| push(&repo, tag), writes(&repo));
        let mut problems = Vec::new();
        if killed.run.code == Some(0) {
            if let Err(e) = check_acknowledged_file(&env, &repo, &wal, &names[0], &scratch) {
                problems.push(format!("exit 0 before the kill, but {e}"));
            }
        }
        problems.extend(check_after_kill(
            &env,
            &repo,
            &wal,
            &scratch,
            KILLED,
            &mut checked,
        ));
        // The same command again (PostgreSQL retries it), then the rest.
        problems.extend(archive_all(&env, &repo, &wal, names));
        problems.extend(settle(&env, &repo, 1));
        c.tally("archive-push", &killed, &problems);
        c.problems(&ctx, problems);
    }
    c.count("look-ahead records checked after a kill", checked.0 as u64);

    // archive-get, with prefetch, as restore_command runs it.
    let repo = get_repo;
    let mut rng = c.rng(2);
    let recov = env.mkdir("recov", As::PgUser);
    env.mkdir("recov/pg_wal", As::PgUser);
    let dest = recov.join("pg_wal/RECOVERYXLOG");
    let get_args = |name: &str| -> Vec<String> {
        vec![
            "--log-level".into(),
            "debug".into(),
            "archive-get".into(),
            name.into(),
            "pg_wal/RECOVERYXLOG".into(),
        ]
    };
    // Between cases (nothing runs then): the prefetch spool emptied, its
    // lock and timeline record too, so that each case's prefetcher starts
    // as the measured one did and its steps can be waited for.
    let clear_spool = || {
        let _ = fs::remove_dir_all(pg_spool_dir(&env, &repo).join("get"));
    };
    let get = |name: &str, tag: &[(String, String)]| {
        spawn(&env, &repo, As::PgUser, &get_args(name), tag, &recov)
    };
    // restore_command's call for `name`, as PostgreSQL makes it (after
    // removing the destination): what is wrong, if anything.
    let restore_command = |name: &str| -> Option<String> {
        let _ = fs::remove_file(&dest);
        let run = finish(get(name, &[]), PGVAULT_TIMEOUT);
        if run.code != Some(0) {
            Some(format!(
                "archive-get {name}: exit {:?}: {}",
                run.code,
                run.stderr.trim()
            ))
        } else if sha256_file(&dest) != sha256_file(&wal.join(name)) {
            Some(format!("archive-get {name}: other bytes"))
        } else {
            None
        }
    };
    clear_spool();
    let (run, plan) = measure(
        &env,
        "archive-get",
        |tag| get(&names[0], std::slice::from_ref(tag)),
        files_below(vec![pg_spool_dir(&env, &repo), recov.clone()]),
        &mut rng,
    );
    let fetches = files_below(vec![pg_spool_dir(&env, &repo), recov.clone()]);
    run.ok();
    let prefetched = spool_files(&env, &repo, "get").len();
    if prefetched == 0 {
        c.problem(
            "archive-get, measured run",
            "the prefetcher fetched nothing",
        );
    }
    clear_spool();
    for i in 0..scale.points {
        let point = plan.point(i, scale.points, &mut rng);
        // A segment with as many after it to prefetch as the measured
        // run had (8, the default look-ahead).
        let k = rng.below(names.len().saturating_sub(9).max(1) as u64) as usize;
        let name = &names[k];
        let ctx = format!("seed {} archive-get#{i} of {name} ({point})", c.seed);
        // PostgreSQL removes the destination before each call.
        let _ = fs::remove_file(&dest);
        let killed = run_killed(
            &env,
            &ctx,
            &point,
            |tag| get(name, std::slice::from_ref(tag)),
            &fetches,
        );
        let mut problems = Vec::new();
        if killed.run.code == Some(0) && sha256_file(&dest) != sha256_file(&wal.join(name)) {
            problems.push("exit 0 with other bytes".to_string());
        }
        if killed.run.code == Some(1) {
            problems.push(format!(
                "exit 1 (\"not in the archive\") for an archived file: {}",
                killed.run.stderr.trim()
            ));
        }
        problems.extend(check_after_kill(
            &env,
            &repo,
            &wal,
            &scratch,
            KILLED,
            &mut checked,
        ));
        // The same call again.
        problems.extend(restore_command(name).map(|e| format!("the same call again: {e}")));
        if let Some(p) = wait_quiet(&env) {
            problems.push(p);
        }
        problems.extend(leftovers(&recov.join("pg_wal"), &["RECOVERYXLOG"]));
        c.tally("archive-get", &killed, &problems);
        c.problems(&ctx, problems);
        // Checked: dropped, so that the next prefetcher has work to be
        // killed in.
        clear_spool();
    }
    c.count("prefetched files checked after a kill", checked.1 as u64);

    // Recovery's walk through every segment, through the spool the killed
    // prefetchers used: byte-identical; the repository is as it was.
    let mut problems: Vec<String> = names.iter().filter_map(|n| restore_command(n)).collect();
    if let Some(p) = wait_quiet(&env) {
        problems.push(p);
    }
    problems.extend(settle(&env, &repo, 1));
    c.problems(
        &format!("seed {} recovery walk after the kills", c.seed),
        problems,
    );
    c.finish();
}

/// Files in `dir` other than `expected` (and `archive_status`): what a
/// killed command left in PostgreSQL's directory.
fn leftovers(dir: &Path, expected: &[&str]) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "archive_status" && !expected.contains(&n.as_str()))
        .map(|n| format!("left in {}: {n}", PathBuf::from(dir).display()))
        .collect()
}
