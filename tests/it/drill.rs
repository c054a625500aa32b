//! `pgvault drill` (issue 13) against real PostgreSQL 15 clusters archiving
//! through the real binary: a healthy repository passes and reports its
//! RTO and RPO, with PostgreSQL on a private socket only and nothing left
//! behind; a user check returning false, a missed RTO objective, a flipped
//! bit in a backup object and a page that failed its checksum before the
//! backup was taken each fail, naming what failed.

use crate::common::*;
use serde_json::Value;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Exit codes from docs/exit-codes.md.
const EXIT_USAGE: i32 = 2;
const EXIT_REPOSITORY: i32 = 5;
const EXIT_THRESHOLD: i32 = 13;
const EXIT_DRILL_FAILED: i32 = 14;

/// `pgvault drill ARGS` as `who`, restoring below `base`.
fn drill(env: &TestEnv, repo: &Repo, who: As, base: &Path, args: &[&str]) -> Run {
    let base = base.display().to_string();
    let mut all = vec!["drill", "--scratch-dir", base.as_str()];
    all.extend_from_slice(args);
    repo.run(env, who, &all, env.dir())
}

#[track_caller]
fn json(run: &Run) -> Value {
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| {
        panic!(
            "drill --output json is not JSON ({e}):\n{}\n--- stderr\n{}",
            run.stdout, run.stderr
        )
    })
}

/// The progress lines of a run's stderr: one per phase as it ends,
/// "pgvault: PHASE: … in 1.2s …".
fn progress_lines(stderr: &str) -> impl Iterator<Item = &str> {
    stderr.lines().filter(|l| {
        l.starts_with("pgvault: ")
            && l.split(" in ").skip(1).any(|t| {
                let secs = t.split(['s', ' ']).next().unwrap_or("");
                secs.contains('.') && secs.parse::<f64>().is_ok()
            })
    })
}

/// Nothing is left in the drill's scratch base: the drill's directory went.
#[track_caller]
fn assert_empty(base: &Path) {
    let left: Vec<PathBuf> = fs::read_dir(base)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "the drill left {left:?} behind");
}

/// The postmaster started with a data directory below `base` (its
/// children rename themselves "postgres: …"), if one runs.
fn postmaster_below(base: &Path) -> Option<u32> {
    let base = base.display().to_string();
    for e in fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.first().is_some_and(|a| a.ends_with("/postgres"))
            && args.iter().any(|a| a.contains(&base))
        {
            return Some(pid);
        }
    }
    None
}

/// `ss -H -l -p` with `flags` (`-tn`: TCP, `-x`: Unix sockets).
fn ss(flags: &str) -> String {
    let o = std::process::Command::new("ss")
        .args(["-H", "-l", "-p", flags])
        .output()
        .expect("run ss (iproute2)");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs a drill as `who` and, while it runs, finds its postmaster and
/// what that listens on: its TCP listeners (there must be none) and its
/// Unix sockets (the one in the scratch directory).
fn drill_watching_sockets(
    env: &TestEnv,
    repo: &Repo,
    who: As,
    base: &Path,
    args: &[&str],
) -> (Run, Vec<String>, Vec<String>) {
    let b = base.display().to_string();
    let mut all: Vec<String> = repo.args();
    all.extend(["drill", "--scratch-dir", b.as_str()].map(String::from));
    all.extend(args.iter().map(|s| s.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let child = env.spawn_pgvault(who, &all, &repo.env, env.dir());
    let deadline = Instant::now() + Duration::from_secs(240);
    let (mut tcp, mut unix) = (Vec::new(), Vec::new());
    while Instant::now() < deadline {
        if let Some(pid) = postmaster_below(base) {
            // Once it listens at all, it has opened every listener.
            let mine = |text: String| -> Vec<String> {
                text.lines()
                    .filter(|l| l.contains(&format!("pid={pid},")))
                    .map(str::to_string)
                    .collect()
            };
            unix = mine(ss("-x"));
            if !unix.is_empty() {
                tcp = mine(ss("-tn"));
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (finish(child, PGVAULT_TIMEOUT), tcp, unix)
}

/// The healthy cases, then the failing ones, on one cluster without data
/// checksums (so every relation is read in full), the drill run as root.
#[test]
fn drill_passes_on_a_healthy_repository_and_fails_naming_what_failed() {
    let env = TestEnv::new();
    let repo = env.local_repo("main");
    let pg = Cluster::archiving(&env, &repo, false);
    pg.psql("create table t (id int primary key, v text)");
    pg.psql("insert into t select g, md5(g::text) from generate_series(1, 5000) g");
    let label = backup(&env, &repo, &pg);
    // Commits after the backup: the drill must bring them back.
    pg.psql("insert into t select g, 'after' from generate_series(5001, 5100) g");
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, Duration::from_secs(120));

    let base = env.mkdir("scratch", As::PgUser);
    let checks = env.dir().join("checks.sql");
    fs::write(
        &checks,
        "-- The drill's own checks\n\
         -- check: every row came back\n\
         select count(*) = 5100 from t;\n\
         select exists (select 1 from t where v = 'after');\n",
    )
    .unwrap();
    let checks = checks.display().to_string();

    // 1. Healthy: passes, reports RTO and RPO, socket only, nothing left.
    let (run, tcp, unix) = drill_watching_sockets(
        &env,
        &repo,
        As::Root,
        &base,
        &[
            "--drill-checks",
            &checks,
            "--rpo-objective",
            "5m",
            "--pg-os-user",
            &env.user,
            "--output",
            "json",
        ],
    );
    run.ok();
    assert!(
        !unix.is_empty(),
        "the drill's postmaster was not seen listening on its socket"
    );
    assert!(
        tcp.is_empty(),
        "the drill's PostgreSQL listened on TCP: {tcp:?}"
    );
    let r = json(&run);
    assert_eq!(r["passed"], true, "{r:#}");
    // --output json: no progress on stderr either (issue 13).
    assert!(
        !progress_lines(&run.stderr).any(|_| true),
        "progress with --output json:\n{}",
        run.stderr
    );
    assert_eq!(r["exit_code"], 0);
    assert_eq!(r["backup"]["label"], label.as_str());
    assert!(
        r["target"]
            .as_str()
            .is_some_and(|t| t.contains("newest archived commit")),
        "{r:#}"
    );
    let rto = r["rto_seconds"].as_f64().unwrap();
    assert!(rto > 0.0 && rto < 240.0, "{r:#}");
    // Recovery reached the newest archived commit: nothing archived is lost.
    assert_eq!(r["rpo_seconds"].as_f64(), Some(0.0), "{r:#}");
    assert_eq!(r["recovered_to"], r["newest_archived_commit"]);
    assert_eq!(r["objectives_met"], true);
    assert_eq!(r["server"]["listen_addresses"], "");
    assert_eq!(r["server"]["archive_mode"], "off");
    assert_eq!(r["server"]["os_user"], env.user.as_str());
    assert_eq!(r["server"]["data_checksums"], false);
    let names: Vec<&str> = r["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for want in [
        "plan",
        "restore",
        "start-up",
        "replay",
        "promotion",
        "amcheck",
        "user-checks",
        "relation-read",
        "shutdown",
    ] {
        assert!(names.contains(&want), "no phase {want} in {names:?}");
    }
    assert!(r["replay_bytes"].as_u64().unwrap() > 0, "{r:#}");
    let checks_run: Vec<(&str, bool)> = r["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap(), c["passed"].as_bool().unwrap()))
        .collect();
    assert_eq!(checks_run.len(), 4, "{checks_run:?}");
    assert!(checks_run.iter().all(|(_, ok)| *ok), "{checks_run:?}");
    assert!(checks_run[0].0 == "pg_amcheck" && checks_run[3].0 == "relation read");
    assert!(
        checks_run[1].0.contains("every row came back"),
        "{checks_run:?}"
    );
    assert_empty(&base);

    // info shows it, from the repository.
    let info = repo.run(&env, As::PgUser, &["info", "--output", "json"], env.dir());
    info.ok();
    let v: Value = serde_json::from_str(&info.stdout).unwrap();
    assert_eq!(v["last_drill"]["passed"], true, "{v:#}");
    assert_eq!(v["last_drill"]["rto_seconds"], r["rto_seconds"]);
    assert_eq!(v["last_drill"]["backup"], label.as_str());
    let text = repo.run(&env, As::PgUser, &["info"], env.dir());
    assert!(
        text.stdout.contains("last drill: ") && text.stdout.contains(", passed, RTO "),
        "{}",
        text.stdout
    );

    // 2. A user check that returns false fails, naming it.
    let bad = env.dir().join("bad-checks.sql");
    fs::write(
        &bad,
        "select true;\n-- check: the ledger balances\nselect sum(id) = 0 from t;\n",
    )
    .unwrap();
    let bad = bad.display().to_string();
    let run = drill(&env, &repo, As::Root, &base, &["--drill-checks", &bad]);
    run.expect_code(EXIT_DRILL_FAILED);
    let errors: Vec<&str> = run
        .stderr_lines()
        .into_iter()
        .filter(|l| l.starts_with("error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{}", run.stderr);
    assert!(
        errors[0].contains("user-check")
            && errors[0].contains("\"the ledger balances\"")
            && errors[0].contains("bad-checks.sql:3")
            && errors[0].contains("returned false"),
        "{}",
        run.stderr
    );
    assert!(run.stdout.contains("FAILED"), "{}", run.stdout);
    assert_empty(&base);

    // 3. An RTO objective of one millisecond is missed (one second is not:
    // on a quiet machine the drill's restore, replay and promotion take less).
    let run = drill(&env, &repo, As::Root, &base, &["--rto-objective", "1ms"]);
    run.expect_code(EXIT_THRESHOLD);
    // Not a terminal: one line per phase as it ends, the restore's with
    // its bytes, files and rate.
    let phases: Vec<&str> = progress_lines(&run.stderr).collect();
    let named = |p: &str| phases.iter().filter(|l| l.starts_with(p)).count();
    assert_eq!(named("pgvault: write files: "), 1, "{}", run.stderr);
    assert_eq!(
        named("pgvault: recovery (start, replay WAL, promote): "),
        1,
        "{}",
        run.stderr
    );
    assert_eq!(named("pgvault: checks: "), 1, "{}", run.stderr);
    assert_eq!(phases.len(), 3, "{}", run.stderr);
    let write = phases[0];
    assert!(
        write.contains(" of ") && write.contains(" files in ") && write.ends_with("/s)"),
        "{write}"
    );
    assert!(
        run.stderr.contains("RTO") && run.stderr.contains("over its objective 1ms"),
        "{}",
        run.stderr
    );
    assert_empty(&base);
    let v: Value = serde_json::from_str(
        &repo
            .run(&env, As::PgUser, &["info", "--output", "json"], env.dir())
            .stdout,
    )
    .unwrap();
    assert_eq!(v["last_drill"]["passed"], false);
    assert_eq!(v["last_drill"]["failed_step"], "objectives");

    // 4. A flipped bit in an object of the newest backup: the restore
    // fails, naming the object and the file it held.
    let label2 = backup(&env, &repo, &pg);
    let data = repo
        .local
        .as_ref()
        .unwrap()
        .join("main/backup")
        .join(&label2)
        .join("data");
    let object = fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&object)
        .unwrap();
    let at = fs::metadata(&object).unwrap().len() / 2;
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, at).unwrap();
    f.write_all_at(&[byte[0] ^ 0x10], at).unwrap();
    drop(f);
    let name = object.file_name().unwrap().to_string_lossy().into_owned();
    let run = drill(&env, &repo, As::Root, &base, &[]);
    run.expect_code(EXIT_REPOSITORY);
    let line = run
        .stderr_lines()
        .into_iter()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default()
        .to_string();
    assert!(
        line.contains("step restore") && line.contains(&name) && line.contains(&label2),
        "the error should name the restore step and the object {name}:\n{}",
        run.stderr
    );
    // "<file> (in <repo>/<object>)": the file it held is named first.
    assert!(line.contains(" (in "), "{line}");
    assert_empty(&base);
}

/// A page damaged in the source cluster before the backup: the backup
/// flags it, and the drill fails naming the relation (pg_amcheck, and
/// pg_checksums on the stopped copy). Run as the PostgreSQL user itself.
#[test]
fn drill_fails_naming_a_relation_whose_page_was_bad_before_the_backup() {
    let env = TestEnv::new();
    let repo = env.local_repo("main");
    let mut pg = Cluster::archiving(&env, &repo, true);
    pg.psql("create table t as select g as id, md5(g::text) as v from generate_series(1, 2000) g");
    let rel = pg.psql("select pg_relation_filepath('t')");
    pg.psql("checkpoint");
    // Damage block 2 while the server is down (tests/it/pages.rs).
    pg.stop();
    damage_page(&pg.pgdata().join(&rel), 2);
    pg.start_archiving(&env, &repo);
    let run = backup_run(&env, &repo, &pg);
    run.ok();
    let flagged = format!("{rel} (main fork) block 2");
    assert!(
        run.stderr.contains(&flagged),
        "the backup should flag {flagged}:\n{}",
        run.stderr
    );

    let base = env.mkdir("scratch", As::PgUser);
    let run = drill(&env, &repo, As::PgUser, &base, &["--output", "json"]);
    run.expect_code(EXIT_DRILL_FAILED);
    let r = json(&run);
    assert_eq!(r["passed"], false);
    assert_eq!(r["server"]["data_checksums"], true);
    assert_eq!(
        r["backup"]["bad_pages_at_backup"][0],
        flagged.as_str(),
        "{r:#}"
    );
    let failures: Vec<(String, String)> = r["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["step"].as_str().unwrap().to_string(),
                f["message"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        failures
            .iter()
            .any(|(s, m)| s == "amcheck" && m.contains("heap table \"postgres.public.t\"")),
        "{failures:?}"
    );
    let page = format!("relation postgres.public.t ({rel}) block 2");
    assert!(
        failures
            .iter()
            .any(|(s, m)| s == "page-verification" && m.contains(&page)),
        "{failures:?}"
    );
    assert!(run.stderr.contains("postgres.public.t"), "{}", run.stderr);
    assert_empty(&base);

    // Stopped (SIGTERM) while PostgreSQL runs: the server is stopped and
    // the scratch directory removed.
    let b = base.display().to_string();
    let mut args: Vec<String> = repo.args();
    args.extend(["drill", "--scratch-dir", b.as_str()].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let child = env.spawn_pgvault(As::PgUser, &args, &repo.env, env.dir());
    let deadline = Instant::now() + Duration::from_secs(240);
    let pid = loop {
        if let Some(pid) = postmaster_below(&base) {
            break pid;
        }
        assert!(Instant::now() < deadline, "no postmaster appeared");
        std::thread::sleep(Duration::from_millis(50));
    };
    child.terminate();
    let run = finish(child, PGVAULT_TIMEOUT);
    run.expect_code(143);
    assert!(
        run.stderr.contains("interrupted by SIGTERM"),
        "{}",
        run.stderr
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "the scratch postmaster {pid} outlived the drill"
    );
    assert_empty(&base);

    // A file system without room for the backup: refused before anything
    // is written.
    let small = Tmpfs::mount(&env, "small", "4m");
    let run = drill(&env, &repo, As::PgUser, &small.0, &[]);
    run.expect_code(EXIT_USAGE);
    assert!(
        run.stderr.contains("step space")
            && run.stderr.contains("bytes free, the drill needs")
            && run.stderr.contains("of backup"),
        "{}",
        run.stderr
    );
    assert_empty(&small.0);
}

/// A small tmpfs owned by the postgres user, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(env: &TestEnv, name: &str, size: &str) -> Tmpfs {
        let dir = env.mkdir(name, As::PgUser);
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0755")])
            .arg("tmpfs")
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "mount a tmpfs on {} (the tests run as root)",
            dir.display()
        );
        chown(&dir, env.uid, env.gid);
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}
