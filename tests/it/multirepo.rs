//! Several repositories (issue 12): a local directory (repository 1) and
//! a moto of the test's own (repository 2), which the test kills while
//! PostgreSQL archives and starts again (`common::OwnMoto`).
//!
//! What failed before: there was one repository; a dead store made every
//! `archive_command` fail and `pg_wal` fill up, and nothing could fall
//! back to a second copy.

mod runbooks;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{
    assert_same_file, unique, As, Cluster, InitOpts, Node, OwnMoto, Repo, Run, TestEnv,
};

/// A 1 MiB-segment cluster archiving into both repositories with
/// `archive-push-quorum = 1`, its options in a configuration file.
struct Two {
    env: TestEnv,
    moto: OwnMoto,
    repo1: Repo,
    config: PathBuf,
    spool: PathBuf,
    pg: Cluster,
}

impl Two {
    fn start(extra_config: &str) -> Option<Two> {
        let env = TestEnv::new();
        let moto = OwnMoto::start()?;
        let repo1 = env.local_repo("main");
        let spool = env.mkdir("spool", As::PgUser);
        let s = &moto.server;
        let config = env.dir().join("pgvault.toml");
        std::fs::write(
            &config,
            format!(
                "stanza = \"main\"\n\
                 repo1-path = \"{}\"\n\
                 repo2-path = \"s3://{}/it-{}-{}\"\n\
                 repo2-s3-endpoint = \"{}\"\n\
                 repo2-s3-region = \"{}\"\n\
                 repo2-s3-allow-http = true\n\
                 repo2-s3-access-key-id = \"{}\"\n\
                 repo2-s3-secret-access-key = \"{}\"\n\
                 spool-path = \"{}\"\n\
                 archive-push-quorum = 1\n\
                 {extra_config}",
                repo1.url,
                s.bucket,
                std::process::id(),
                unique(),
                s.endpoint,
                s.region,
                s.access_key,
                s.secret_key,
                spool.display()
            ),
        )
        .unwrap();
        let pg = Cluster::init(
            &env,
            InitOpts {
                wal_segsize_mb: Some(1),
                data_checksums: false,
            },
        );
        let mut t = Two {
            env,
            moto,
            repo1,
            config,
            spool,
            pg,
        };
        let pgdata = t.pg.pgdata().display().to_string();
        let run = t.pgv(As::PgUser, &["stanza-create", "--pgdata", &pgdata]);
        run.ok();
        assert!(
            run.stderr.contains("in ") && run.stderr.matches("created").count() == 2,
            "stanza-create should say it created the stanza in both:\n{}",
            run.stderr
        );
        t.pg.set_conf(&format!(
            "archive_mode = on\n\
             archive_command = '{} --config {} archive-push %p'\n\
             wal_keep_size = 4GB\n\
             max_wal_size = 4GB\n",
            t.env.bin().display(),
            t.config.display()
        ));
        let vars = t.env.base_env(As::PgUser);
        t.pg.start_with_env(&vars);
        t.pg.psql("create table t(id int primary key, tag text not null)");
        t.pg.psql("create table if not exists pgvault_it_switch(x int)");
        Some(t)
    }

    /// `pgvault --config <file> ARGS` as `who`.
    fn pgv(&self, who: As, args: &[&str]) -> Run {
        let cfg = self.config.display().to_string();
        let mut all = vec!["--config", cfg.as_str()];
        all.extend_from_slice(args);
        self.env.pgvault(who, &all, &[], self.env.dir())
    }

    fn conn(&self) -> Vec<String> {
        vec![
            "--pg-host".into(),
            self.pg.sockdir().display().to_string(),
            "--pg-port".into(),
            self.pg.port().to_string(),
        ]
    }

    /// `backup --type full --start-fast`, with `extra` (`--repo N`), as the postgres user.
    fn backup(&self, extra: &[&str]) -> Run {
        let pgdata = self.pg.pgdata().display().to_string();
        let conn = self.conn();
        let mut args = vec![
            "backup",
            "--type",
            "full",
            "--pgdata",
            &pgdata,
            "--start-fast",
        ];
        args.extend(conn.iter().map(String::as_str));
        args.extend_from_slice(extra);
        self.pgv(As::PgUser, &args)
    }

    fn check(&self, extra: &[&str]) -> Run {
        let conn = self.conn();
        let mut args = vec!["check"];
        args.extend(conn.iter().map(String::as_str));
        args.extend_from_slice(extra);
        self.pgv(As::PgUser, &args)
    }

    fn info2(&self) -> Value {
        let run = self.pgv(As::PgUser, &["info", "--repo", "2", "--output", "json"]);
        run.ok();
        serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("info is not JSON ({e}):\n{}", run.stdout))
    }

    /// Waits until repository 2's queue on this host is empty and every
    /// drop is marked in it: the pusher caught up.
    #[track_caller]
    fn wait_caught_up(&self) {
        let start = Instant::now();
        loop {
            let run = self.pgv(As::PgUser, &["info", "--repo", "2", "--output", "json"]);
            if run.code == Some(0) {
                let v: Value = serde_json::from_str(&run.stdout).unwrap();
                let q = &v["archive_push_queue"];
                if q["files"] == 0
                    && q["dropped_pending"]
                        .as_array()
                        .is_some_and(|a| a.is_empty())
                {
                    eprintln!("repository 2 caught up in {:.1?}", start.elapsed());
                    return;
                }
            }
            if start.elapsed() > Duration::from_secs(400) {
                panic!(
                    "repository 2 did not catch up in {:?}; last info:\n{}\n{}",
                    start.elapsed(),
                    run.stdout,
                    run.stderr
                );
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }

    /// Files queued for repository 2 in the spool.
    fn queued(&self) -> usize {
        let mut n = 0;
        for e in std::fs::read_dir(&self.spool).unwrap().flatten() {
            if let Ok(rd) = std::fs::read_dir(e.path().join("queue")) {
                n += rd
                    .flatten()
                    .filter(|f| !f.file_name().to_string_lossy().starts_with('.'))
                    .count();
            }
        }
        n
    }

    /// `archive-get NAME` into a fresh file, without prefetch, as root in
    /// a directory that is no data directory (so failures mean "stop
    /// recovery", exit 254).
    fn get(&self, extra: &[&str], name: &str) -> (Run, PathBuf) {
        let dest = self.env.dir().join(format!("got-{}-{name}", unique()));
        let d = dest.display().to_string();
        let mut args = vec!["archive-get", "--archive-get-ahead", "0"];
        args.extend_from_slice(extra);
        args.extend([name, d.as_str()]);
        (self.pgv(As::Root, &args), dest)
    }

    /// Restores with `args` into a new directory, starts it, waits for the
    /// promotion; returns the running node.
    #[track_caller]
    fn pitr(&self, name: &str, args: &[&str]) -> Node {
        let mut node = Node::new(&self.env, &self.repo1, name);
        let pgdata = node.pgdata.display().to_string();
        let mut all = vec!["restore", "--pgdata", &pgdata, "--target-action", "promote"];
        all.extend_from_slice(args);
        let run = self.pgv(As::PgUser, &all);
        run.ok();
        node.start();
        node.wait_promoted();
        node
    }

    fn archiver_failures(&self) -> String {
        self.pg.psql("select failed_count from pg_stat_archiver")
    }
}

/// Segment names repository 1 holds (its `.claim` objects), in order.
fn segments_in(repo: &Repo) -> Vec<String> {
    let mut out = Vec::new();
    crate::common::walk(&repo.local_archive(), &mut |p| {
        let f = p.file_name().unwrap_or_default().to_string_lossy();
        if let Some(stem) = f.strip_suffix(".claim") {
            if stem.len() == 24 && stem.bytes().all(|b| b.is_ascii_hexdigit()) {
                out.push(stem.to_string());
            }
        }
    });
    out.sort();
    out
}

fn rows(node: &Node) -> String {
    node.psql("select tag, count(*) from t group by tag order by tag")
}

/// Repository 2 killed while pgbench writes: the archiver never fails
/// (quorum 1), archive-get still answers from repository 1 and never says
/// "not available" for what only the dead one might hold; once it is back
/// the pusher catches it up, and every segment is byte-identical in both.
/// PITR from each repository alone; a segment missing in repository 1 is
/// read from repository 2, by archive-get and by a recovery.
#[test]
fn a_repository_down_under_load_catches_up_byte_for_byte() {
    let Some(mut two) = Two::start("") else {
        return;
    };
    let run = two.backup(&[]);
    run.ok();
    assert_eq!(
        run.stdout.lines().count(),
        2,
        "a backup into each repository, one label each:\n{}",
        run.stdout
    );
    two.pg.pgbench(&["-i", "-s", "2", "-q"]);

    two.moto.kill();
    let started = Instant::now();
    two.pg.pgbench(&["-n", "-T", "20", "-c", "2"]);
    two.pg
        .psql("insert into t select g, 'A' from generate_series(1, 10) g");
    two.pg.psql("select pg_create_restore_point('mr_rp')");
    two.pg
        .psql("insert into t select g, 'B' from generate_series(11, 20) g");
    let last = two.pg.switch_wal();
    // Fails fast, with the server log, if archive_command ever fails.
    two.pg.wait_archived(&last, Duration::from_secs(300));
    eprintln!(
        "archived up to {last} with repository 2 down, in {:.1?}",
        started.elapsed()
    );
    assert_eq!(two.archiver_failures(), "0", "{}", two.pg.log_tail(30));
    assert!(
        two.queued() > 5,
        "repository 2's queue holds what it missed"
    );

    // Repository 2 down: repository 1 answers; a name only the dead one
    // might hold is never "not available" (exit 1), it stops recovery.
    let (run, dest) = two.get(&[], &last);
    run.ok();
    assert_same_file(&two.pg.wal_dir().join(&last), &dest);
    let (run, _) = two.get(&[], "00000001000000AA000000AA");
    run.expect_code(254);
    assert!(run.stderr.contains("did not answer"), "{}", run.stderr);

    two.moto.restart();
    two.wait_caught_up();
    assert_eq!(two.archiver_failures(), "0");

    // Every segment, from each repository alone: the same bytes, those
    // PostgreSQL wrote.
    let names = two_sided(&two, &last);
    eprintln!("{} segments compared", names.len());

    two.check(&[]).ok();

    // PITR from each repository alone.
    for n in ["1", "2"] {
        let node = two.pitr(
            &format!("pitr-{n}"),
            &["--repo", n, "--target-name", "mr_rp"],
        );
        assert_eq!(rows(&node), "A|10", "PITR from repository {n}");
        let conf = node.auto_conf();
        assert!(conf.contains(&format!("--repo {n}")), "{conf}");
        if n == "2" {
            assert!(!conf.contains(&two.repo1.url), "repository 2 alone: {conf}");
        }
    }

    // A segment missing in repository 1 comes from repository 2.
    let gone = &names[names.len() / 2];
    let mut removed = 0;
    crate::common::walk(&two.repo1.local_archive(), &mut |p| {
        if p.file_name()
            .is_some_and(|f| f.to_string_lossy().starts_with(gone.as_str()))
        {
            std::fs::remove_file(p).unwrap();
            removed += 1;
        }
    });
    assert!(removed >= 2, "{gone}: its claim and content removed");
    let (run, _) = two.get(&["--repo", "1"], gone);
    run.expect_code(1);
    let (run, dest) = two.get(&[], gone);
    run.ok();
    assert_same_file(&two.pg.wal_dir().join(gone), &dest);
    // And recovery through it: restored from repository 1's backup, the
    // segment fetched from repository 2.
    let node = two.pitr("pitr-both", &["--target-name", "mr_rp"]);
    assert_eq!(rows(&node), "A|10");
}

/// Each archived segment fetched from each repository alone: equal, and
/// equal to PostgreSQL's own file. Returns the names.
fn two_sided(two: &Two, last: &str) -> Vec<String> {
    let names: Vec<String> = segments_in(&two.repo1)
        .into_iter()
        .filter(|n| n.as_str() <= last)
        .collect();
    assert!(names.len() > 10, "{names:?}");
    for n in &names {
        let (r1, d1) = two.get(&["--repo", "1"], n);
        r1.ok();
        let (r2, d2) = two.get(&["--repo", "2"], n);
        r2.ok();
        assert_same_file(&d1, &d2);
        let orig = two.pg.wal_dir().join(n);
        if orig.exists() {
            assert_same_file(&orig, &d1);
        }
        let _ = std::fs::remove_file(&d1);
        let _ = std::fs::remove_file(&d2);
    }
    names
}

/// A small `archive-push-queue-max` with repository 2 down: the archiver
/// still never fails; the oldest queued files are dropped, and the gap is
/// marked in repository 2 once it answers, and shown by `info`, `check`
/// and `verify` — never silently. Repository 1 still serves the files.
#[test]
fn past_queue_max_the_gap_is_recorded_and_shown() {
    let Some(mut two) = Two::start("archive-push-queue-max = \"3MiB\"\n") else {
        return;
    };
    two.backup(&[]).ok();
    two.moto.kill();
    let mut last = String::new();
    for i in 0..8 {
        two.pg.psql(&format!("insert into t values ({i}, 'gap')"));
        last = two.pg.switch_wal();
    }
    two.pg.wait_archived(&last, Duration::from_secs(300));
    assert_eq!(two.archiver_failures(), "0", "{}", two.pg.log_tail(30));
    assert!(two.queued() <= 3, "at most 3 MiB queued");

    two.moto.restart();
    two.wait_caught_up();

    // info: the drops, per timeline, with when and why.
    let v = two.info2();
    let dropped = v["timelines"][0]["dropped"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(!dropped.is_empty(), "{v:#}");
    assert_eq!(dropped[0]["reason"], "archive-push-queue-max", "{v:#}");
    let first = dropped[0]["from"].as_str().unwrap().to_string();
    let queue = &v["archive_push_queue"];
    assert!(
        !queue["dropped_recorded"].as_array().unwrap().is_empty(),
        "{v:#}"
    );
    let text = two.pgv(As::PgUser, &["info"]);
    text.ok();
    assert!(text.stdout.contains("repository 2:"), "{}", text.stdout);
    assert!(text.stdout.contains("DROPPED:"), "{}", text.stdout);
    assert!(text.stdout.contains(&first), "{}", text.stdout);

    // check: repository 2 cannot recover past the gap from its backup.
    let run = two.check(&["--repo", "2"]);
    run.expect_code(5);
    assert!(
        run.stderr.contains("missed by this repository") && run.stderr.contains(&first),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("hint: take a backup"), "{}", run.stderr);
    // verify: a problem, exit 11.
    let run = two.pgv(As::PgUser, &["verify", "--repo", "2"]);
    run.expect_code(11);
    assert!(
        run.stdout.contains("dropped: ") && run.stdout.contains(&first),
        "{}",
        run.stdout
    );
    // Repository 1 holds what repository 2 missed.
    let (run, dest) = two.get(&[], &first);
    run.ok();
    assert_same_file(&two.pg.wal_dir().join(&first), &dest);
    let run = two.pgv(As::PgUser, &["verify", "--repo", "1"]);
    run.ok();

    // A backup into repository 2 after the gap: check passes, warning.
    two.backup(&["--repo", "2"]).ok();
    let run = two.check(&["--repo", "2"]);
    run.ok();
    assert!(
        run.stderr.contains("missed by this repository"),
        "{}",
        run.stderr
    );
}
