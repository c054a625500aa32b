//! SIGKILL of `backup`, `restore` and `expire` at seeded points spread over
//! the phases of a measured unkilled run, each followed by the same command
//! again, on a local repository that a real PostgreSQL archives into.
//!
//! * backup: before every attempt a row goes into `marks`, so the content
//!   of each backup is known (nothing else writes). Afterwards every
//!   completed backup — those whose run printed a label, and any a killed
//!   run completed before it died — is restored to its end (`--target
//!   immediate`) and must start with exactly its rows, `pg_checksums
//!   --check` clean and a clean server log.
//! * restore: into a fresh directory, killed, then the same command again
//!   (with `--delta` when it refuses the non-empty directory, as its hint
//!   says); the result must start and check clean.
//! * expire: on a copy of the repository holding every backup, `expire
//!   --retention-full 1` killed, then again; the newest backup must stay
//!   whole (and restore, for every fifth case).
//!
//! After each phase, "a day later", `expire` leaves no orphan and `verify`
//! exits 0 (inventory::settle).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

use super::inventory::{copy_repo, inventory, settle, settle_except};
use super::points::{files_below, measure, run_killed};
use super::*;

/// The primary, archiving into a local repository through the real binary.
struct World {
    env: TestEnv,
    repo: Repo,
    pg: Cluster,
    /// Rows in `marks` before each backup attempt, by the label of each
    /// completed backup.
    expected: BTreeMap<String, u64>,
    marks: u64,
}

impl World {
    fn new() -> World {
        let env = TestEnv::new();
        let repo = env.local_repo("campaign");
        let mut pg = Cluster::init(&env, small_segments());
        stanza_create(&env, &repo, pg.pgdata());
        pg.start_archiving(&env, &repo);
        pg.psql(
            "create table marks(n int); \
             create table filler as select g, md5(g::text) from generate_series(1, 50000) g",
        );
        World {
            env,
            repo,
            pg,
            expected: BTreeMap::new(),
            marks: 0,
        }
    }

    fn backup_args(&self) -> Vec<String> {
        with_cluster(
            &self.pg,
            &[
                "--log-level",
                "debug",
                "backup",
                "--type",
                "full",
                "--start-fast",
            ],
        )
    }

    /// One more row in `marks`: the content of the next backup.
    fn mark(&mut self) -> u64 {
        self.marks += 1;
        self.pg
            .psql(&format!("insert into marks values ({})", self.marks));
        self.marks
    }

    /// Notes every complete backup not seen yet as holding `marks` rows.
    fn note_backups(&mut self, marks: u64) -> usize {
        let inv = inventory(self.repo.local.as_ref().expect("local"), &self.repo.stanza);
        let mut new = 0;
        for label in inv.backups.keys() {
            if !self.expected.contains_key(label) {
                self.expected.insert(label.clone(), marks);
                new += 1;
            }
        }
        new
    }

    fn spawn(&self, args: &[String], tag: Option<&(String, String)>) -> Spawned {
        let extra: Vec<(String, String)> = tag.into_iter().cloned().collect();
        spawn(
            &self.env,
            &self.repo,
            As::PgUser,
            args,
            &extra,
            self.env.dir(),
        )
    }
}

/// Starts a restored data directory, waits for the end of recovery, checks
/// its rows, stops it, and checks its pages and its log.
fn start_and_check(node: &mut Node, marks: u64) {
    node.start();
    node.wait_promoted();
    let rows = node.psql("select count(*) from marks");
    assert_eq!(
        rows,
        marks.to_string(),
        "rows in marks after recovery to the backup's end\n--- server log\n{}",
        node.log_tail(30)
    );
    node.stop();
    node.checksums();
    node.assert_log_clean();
}

/// Restore `label` into a fresh directory, start, check.
fn restore_and_check(env: &TestEnv, repo: &Repo, label: &str, marks: u64) -> Result<(), String> {
    let mut node = Node::new(env, repo, "restored");
    let args = restore_args(&node.pgdata, label, &TO_BACKUP_END);
    let run = exec(env, repo, As::PgUser, &args, &[]);
    if run.code != Some(0) {
        return Err(format!(
            "restore of {label} exited {:?}: {}",
            run.code,
            run.stderr.trim()
        ));
    }
    start_and_check(&mut node, marks);
    Ok(())
}

/// An observer of a restore into `pgdata`: the top directories as they
/// appear, files by the hundred, and pg_control, written last.
fn laying(pgdata: &Path) -> impl Fn() -> BTreeSet<String> + Sync {
    let pgdata = pgdata.to_path_buf();
    move || {
        let mut seen: BTreeSet<String> = fs::read_dir(&pgdata)
            .map(|rd| {
                rd.flatten()
                    .map(|e| format!("+ {}", e.file_name().to_string_lossy()))
                    .collect()
            })
            .unwrap_or_default();
        let n = super::inventory::all_files(&pgdata).len();
        seen.extend((1..=n / 100).map(|h| format!("= {} files", h * 100)));
        if pgdata.join("global/pg_control").exists() {
            seen.insert("+ global/pg_control".into());
        }
        seen
    }
}

/// An observer of an expire in `repo`: each deletion (nothing appears),
/// counted from when the observer was made.
fn deleting(repo: &Repo) -> impl Fn() -> BTreeSet<String> + Sync {
    let root = repo.local.clone().expect("local");
    let before = super::inventory::all_files(&root).len();
    move || {
        let n = super::inventory::all_files(&root).len();
        (1..=before.saturating_sub(n))
            .map(|k| format!("= {k} deleted"))
            .collect()
    }
}

#[test]
fn kill_backup_restore_expire() {
    let mut c = Campaign::new("kill_backup_restore_expire");
    let scale = Scale::from_env();
    let mut w = World::new();

    // backup.
    let mut rng = c.rng(1);
    let args = w.backup_args();
    let marks = w.mark();
    let backups = files_below(vec![w
        .repo
        .local
        .clone()
        .expect("local")
        .join("campaign/backup")]);
    let (run, plan) = measure(
        &w.env,
        "backup",
        |tag| w.spawn(&args, Some(tag)),
        &backups,
        &mut rng,
    );
    run.ok();
    w.note_backups(marks);
    for i in 0..scale.points {
        let point = plan.point(i, scale.points, &mut rng);
        let ctx = format!("seed {} backup#{i} ({point})", c.seed);
        let marks = w.mark();
        let killed = run_killed(
            &w.env,
            &ctx,
            &point,
            |tag| w.spawn(&args, Some(tag)),
            &backups,
        );
        let mut problems = Vec::new();
        let mut again = finish(w.spawn(&args, None), PGVAULT_TIMEOUT);
        if again.code == Some(9) {
            // The killed backup's lock, naming a process of this host that
            // no longer exists (defect 13 of issue 9: it should be taken
            // over at once). What waiting out its expiry would do, so
            // that the rest is still checked:
            problems.push(format!(
                "the same backup again was refused by the killed backup's lock: {}",
                again.stderr.trim()
            ));
            let lock = w
                .repo
                .local
                .as_ref()
                .expect("local")
                .join(&w.repo.stanza)
                .join("lock/stanza.lock");
            let _ = fs::remove_file(lock);
            again = finish(w.spawn(&args, None), PGVAULT_TIMEOUT);
        }
        if again.code != Some(0) {
            problems.push(format!(
                "the same backup again exited {:?}: {}",
                again.code,
                again.stderr.trim()
            ));
        }
        let new = w.note_backups(marks);
        let completed_before_kill = new.saturating_sub(usize::from(again.code == Some(0)));
        c.count(
            "backups completed before their kill",
            completed_before_kill as u64,
        );
        c.tally("backup", &killed, &problems);
        c.problems(&ctx, problems);
    }
    // The primary stops (archiving what it has), so that nothing writes
    // into the repository any more.
    w.pg.stop();
    if let Some(p) = wait_quiet(&w.env) {
        c.problem("after the backups", p);
    }
    let backups = w.expected.len();
    let problems = settle(&w.env, &w.repo, backups);
    c.problems(&format!("seed {} after the backup kills", c.seed), problems);

    // Every completed backup restores, to its end.
    let expected = w.expected.clone();
    for (label, marks) in &expected {
        let ctx = format!("seed {} restore of backup {label}", c.seed);
        match c.guard(&ctx, || restore_and_check(&w.env, &w.repo, label, *marks)) {
            Some(Ok(())) => c.count("completed backups restored and checked", 1),
            Some(Err(e)) => c.problem(&ctx, e),
            None => {}
        }
    }

    // restore, of the newest backup.
    let (label, marks) = expected
        .iter()
        .next_back()
        .map(|(l, m)| (l.clone(), *m))
        .expect("at least one backup");
    let mut rng = c.rng(2);
    let node = Node::new(&w.env, &w.repo, "measured");
    let args = restore_args(&node.pgdata, &label, &TO_BACKUP_END);
    let (run, plan) = measure(
        &w.env,
        "restore",
        |tag| w.spawn(&args, Some(tag)),
        laying(&node.pgdata),
        &mut rng,
    );
    run.ok();
    drop(node);
    for i in 0..scale.points {
        let point = plan.point(i, scale.points, &mut rng);
        let ctx = format!("seed {} restore#{i} of {label} ({point})", c.seed);
        let mut node = Node::new(&w.env, &w.repo, "killed");
        let args = restore_args(&node.pgdata, &label, &TO_BACKUP_END);
        let killed = run_killed(
            &w.env,
            &ctx,
            &point,
            |tag| w.spawn(&args, Some(tag)),
            laying(&node.pgdata),
        );
        if node.pgdata.join("global/pg_control").exists() {
            c.count("restores killed after pg_control was written", 1);
        }
        let mut problems = Vec::new();
        let mut again = finish(w.spawn(&args, None), PGVAULT_TIMEOUT);
        if again.code == Some(2) && again.stderr.contains("--delta") {
            // As its hint says: the directory is not empty any more.
            c.count("restore re-runs that needed --delta", 1);
            let mut delta = args.clone();
            delta.push("--delta".into());
            again = finish(w.spawn(&delta, None), PGVAULT_TIMEOUT);
        }
        if again.code != Some(0) {
            problems.push(format!(
                "the same restore again exited {:?}: {}",
                again.code,
                again.stderr.trim()
            ));
        } else if c
            .guard(&ctx, || start_and_check(&mut node, marks))
            .is_none()
        {
            problems.push("the restored cluster did not check clean (above)".into());
        }
        c.tally("restore", &killed, &problems);
        c.problems(&ctx, problems);
    }

    // expire, on copies of the repository holding every backup (and
    // whatever the backup kills left in it, reported above).
    let mut rng = c.rng(3);
    let source = w.repo.local.clone().expect("local");
    let known: BTreeSet<String> = inventory(&source, &w.repo.stanza)
        .orphans
        .into_iter()
        .collect();
    let args: Vec<String> = ["--log-level", "debug", "expire", "--retention-full", "1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let measured = copy_repo(&w.env, &w.repo, "expire-measured");
    let (run, plan) = measure(
        &w.env,
        "expire",
        |tag| {
            spawn(
                &w.env,
                &measured,
                As::PgUser,
                &args,
                std::slice::from_ref(tag),
                w.env.dir(),
            )
        },
        deleting(&measured),
        &mut rng,
    );
    run.ok();
    for i in 0..scale.points {
        let point = plan.point(i, scale.points, &mut rng);
        let ctx = format!("seed {} expire#{i} ({point})", c.seed);
        let repo = copy_repo(&w.env, &w.repo, "expire");
        let run_on = |tag: Option<&(String, String)>| {
            let extra: Vec<(String, String)> = tag.into_iter().cloned().collect();
            spawn(&w.env, &repo, As::PgUser, &args, &extra, w.env.dir())
        };
        let killed = run_killed(
            &w.env,
            &ctx,
            &point,
            |tag| run_on(Some(tag)),
            deleting(&repo),
        );
        let mut problems = Vec::new();
        let mut again = finish(run_on(None), PGVAULT_TIMEOUT);
        if again.code == Some(9) {
            problems.push(format!(
                "the same expire again was refused by the killed expire's lock: {}",
                again.stderr.trim()
            ));
            let _ = fs::remove_file(
                repo.local
                    .as_ref()
                    .expect("local")
                    .join(&repo.stanza)
                    .join("lock/stanza.lock"),
            );
            again = finish(run_on(None), PGVAULT_TIMEOUT);
        }
        if again.code != Some(0) {
            problems.push(format!(
                "the same expire again exited {:?}: {}",
                again.code,
                again.stderr.trim()
            ));
        }
        let inv = inventory(repo.local.as_ref().expect("local"), &repo.stanza);
        let kept: Vec<&String> = inv.backups.keys().collect();
        if kept != [&label] {
            problems.push(format!("backups left: {kept:?}, want only {label}"));
        }
        problems.extend(settle_except(&w.env, &repo, 1, &known));
        if i % 5 == 0 {
            match c.guard(&ctx, || restore_and_check(&w.env, &repo, &label, marks)) {
                Some(Ok(())) => c.count("backups restored after an expire kill", 1),
                Some(Err(e)) => problems.push(e),
                None => {}
            }
        }
        c.tally("expire", &killed, &problems);
        c.problems(&ctx, problems);
    }
    c.finish();
}
