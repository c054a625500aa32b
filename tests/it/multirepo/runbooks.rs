//! Runbooks 8 and 9 of docs/disaster-recovery.md, run as written (the
//! blocks marked `runbook=8` and `runbook=9`, with runbook 2's steps 1 and
//! 3 in the self-contained layout) on [`Two`]: repository 2 lost and back
//! empty, then the primary and repository 1 lost together.
//!
//! What failed before: the runbooks did not exist; `info` of a repository
//! that did not answer showed nothing of what waited for it.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{rows, Two};
use crate::common::{free_port, As, Node};
use crate::runbooks::book::{Book, Layout, Shell};

impl Two {
    /// A shell for the runbooks, every setting pointing at this test's
    /// primary.
    fn runbook_shell<'a>(&'a self, book: &'a Book) -> Shell<'a> {
        let bindir = self.env.bin().parent().expect("pgvault's directory");
        let mut sh = Shell {
            env: &self.env,
            book,
            layout: Layout::SelfContained,
            vars: BTreeMap::new(),
            environ: vec![
                (
                    "PATH".into(),
                    format!("{}:/usr/local/bin:/usr/bin:/bin", bindir.display()),
                ),
                ("PGDATABASE".into(), "postgres".into()),
                ("LC_ALL".into(), "C.UTF-8".into()),
            ],
        };
        // What a runbook does not use still points nowhere real.
        for v in book.settings_vars() {
            sh.set(&v, "none");
        }
        sh.set("PGVAULT_CONFIG", self.config.display());
        sh.set("PG_OS_USER", &self.env.user);
        sh.set("PGBIN", self.env.pgbin.display());
        sh.set("PGHOST", self.pg.sockdir().display());
        sh.set("PGPORT", self.pg.port());
        sh.set("PGDATA", self.pg.pgdata().display());
        sh
    }

    /// Writes `n` rows tagged `tag`, switches WAL and waits until
    /// PostgreSQL has archived it; returns the segment.
    fn write(&self, tag: &str, n: u32) -> String {
        self.pg.psql(&format!(
            "insert into t select (select coalesce(max(id), 0) from t) + g, '{tag}' from generate_series(1, {n}) g"
        ));
        let last = self.pg.switch_wal();
        self.pg.wait_archived(&last, Duration::from_secs(300));
        last
    }
}

#[test]
fn runbooks_8_and_9_one_repository_then_the_first_ones_region() {
    let Some(mut two) = Two::start("") else {
        return;
    };
    let book = Book::load();
    two.backup(&[]).ok();
    two.write("A", 10);

    // Runbook 8: repository 2 lost (moto killed), PostgreSQL goes on
    // (quorum 1), and it comes back empty.
    two.moto.kill();
    for _ in 0..3 {
        two.write("B", 10);
    }
    assert_eq!(two.archiver_failures(), "0", "{}", two.pg.log_tail(30));
    let queued = two.queued();
    assert!(queued >= 3, "queued for repository 2: {queued}");
    {
        let sh = two.runbook_shell(&book);
        let look = sh.run("8", "look");
        // pg_stat_archiver's failed_count, last: PostgreSQL never failed.
        assert!(look.trim_end().ends_with("|0"), "{look}");
        // `info --repo 2` of a repository that does not answer still says
        // what waits for it (stderr, which the shell does not return).
        let run = two.pgv(As::PgUser, &["info", "--repo", "2"]);
        assert_ne!(run.code, Some(0), "{}", run.stderr);
        assert!(
            run.stderr.contains("repository 2:") && run.stderr.contains("queued"),
            "{}",
            run.stderr
        );
    }
    two.moto.restart_empty();
    let sh = two.runbook_shell(&book);
    sh.run("8", "recreate");
    two.write("C", 10);
    sh.run("8", "wait");
    let out = sh.run("8", "backup");
    assert!(out.contains("backup"), "{out}");
    assert_eq!(two.archiver_failures(), "0", "{}", two.pg.log_tail(30));
    drop(sh);
    let v = two.info2();
    assert_eq!(
        v["backups"].as_array().map(Vec::len),
        Some(1),
        "the replacement holds the runbook's backup alone: {v:#}"
    );
    // Recovery from the replacement alone reaches now.
    let last_d = two.write("D", 10);
    two.wait_caught_up();
    // A copy: it must not archive its own timeline into the stanza.
    let node = two.pitr("after-8", &["--repo", "2", "--archive-mode", "off"]);
    assert_eq!(
        rows(&node),
        "A|10\nB|30\nC|10\nD|10",
        "PITR from repository 2"
    );
    drop(node);
    eprintln!("runbook 8 done, repository 2 archived through {last_d}");

    // Runbook 9: the primary and repository 1 lost together; the new
    // primary comes from repository 2, then gets a repository 1 again
    // (here a new empty directory where the old one was).
    two.wait_caught_up();
    two.pg.stop_immediate();
    let repo1 = two.repo1.local.clone().expect("repository 1 is local");
    std::fs::remove_dir_all(&repo1).expect("remove repository 1");
    let mut node = Node::new(&two.env, &two.repo1, "region");
    // Node::start would choose one; the runbook starts it.
    node.port = free_port();
    let mut sh = two.runbook_shell(&book);
    sh.set("PGDATA", node.pgdata.display());
    sh.set("PGPORT", node.port);
    sh.set("PGHOST", node.base.display());
    sh.set("PGLOG", node.log.display());
    sh.run("2", "prepare");
    sh.run("9", "restore");
    sh.run("2", "start");
    node.running = true;
    // The place the runbook's configuration names for repository 1.
    let name = repo1
        .file_name()
        .expect("a directory name")
        .to_string_lossy();
    two.env.mkdir(&name, As::PgUser);
    let out = sh.run("9", "finish");
    assert!(out.contains("repository 2:"), "info of both: {out}");
    assert_eq!(node.timeline(), 2, "{}", node.log_tail(30));
    assert_eq!(rows(&node), "A|10\nB|30\nC|10\nD|10");
    // It is the primary: it takes writes.
    node.psql(
        "insert into t select (select max(id) from t) + g, 'E' from generate_series(1, 10) g",
    );
    let run = two.pgv(As::PgUser, &["info", "--repo", "1", "--output", "json"]);
    run.ok();
    let v: serde_json::Value = serde_json::from_str(&run.stdout).expect("info is JSON");
    assert_eq!(
        v["backups"].as_array().map(Vec::len),
        Some(1),
        "the new repository 1 holds the runbook's backup: {v:#}"
    );
    assert_eq!(v["backups"][0]["timeline"], 2, "{v:#}");
}
