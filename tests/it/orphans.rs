//! Nothing left behind, nothing hidden (issue 9, defects 3 and 7): what
//! killed, failed or interrupted commands leave in the repository is listed
//! by `verify` and swept by `expire`; damage to one object hides no other.
//!
//! One PostgreSQL 15 cluster (1 MiB WAL segments) archives into one local
//! repository through the real binary (its archive_command held back by a
//! flag file when a case needs it), and the cases share it, in order:
//!
//! 1. a backup SIGKILLed while it waits for the archive (its data written,
//!    no manifest): `verify` lists the directory; `expire` leaves it while
//!    it is young, and removes it once its files are an hour old (their
//!    times set back, as an hour later);
//! 2. temporary files a killed archive-push leaves in the archive: listed
//!    by `verify`, the old one swept by `expire`, the fresh one left;
//! 3. an expire interrupted after a backup's manifest, before its data (it
//!    cannot delete the data: their directory made read-only): the re-run
//!    finishes;
//! 4. in a copy of the repository, flipped bits in a manifest, a summary,
//!    a claim, a WAL object, a backup file and the stanza object: `verify`
//!    names all six and exits 11;
//! 5. in a copy with the newest backup's manifest damaged: `info` lists the
//!    others and names it; `restore` takes the newest readable backup, says
//!    which one it skipped, and the restored cluster has every row; `restore
//!    --set` of the damaged one is refused naming its manifest.

use crate::common::*;
use serde_json::Value;
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

/// Exit codes from docs/exit-codes.md.
const EXIT_REPOSITORY: i32 = 5;
const EXIT_VERIFY: i32 = 11;
/// Older than the hour after which expire removes leftovers.
const AN_HOUR_AGO: Duration = Duration::from_secs(2 * 3600);

struct Primary {
    pg: Cluster,
    repo: Repo,
    /// While this file exists, archive_command fails (archiving is held back).
    block: PathBuf,
}

impl Primary {
    fn hold_archiving(&self) {
        fs::write(&self.block, "held\n").expect("create the block flag");
    }

    /// Let archiving go on, switch to a new segment and wait until it is
    /// archived (so everything written so far is).
    fn archive_all(&self) {
        let _ = fs::remove_file(&self.block);
        let seg = self.pg.switch_wal();
        self.pg.wait_archived(&seg, Duration::from_secs(120));
    }

    fn rows(&self, n: usize) {
        for _ in 0..n {
            self.pg.psql("insert into t(tag) values ('row')");
        }
    }

    fn backup_args(&self) -> Vec<String> {
        let mut v = self.repo.args();
        v.extend(
            [
                "backup",
                "--pgdata",
                &self.pg.pgdata().display().to_string(),
                "--pg-host",
                &self.pg.sockdir().display().to_string(),
                "--pg-port",
                &self.pg.port().to_string(),
                "--start-fast",
                "--archive-timeout",
                "120",
            ]
            .map(String::from),
        );
        v
    }

    fn stanza_dir(&self) -> PathBuf {
        stanza_dir(&self.repo)
    }
}

fn stanza_dir(repo: &Repo) -> PathBuf {
    repo.local
        .as_ref()
        .expect("a local repository")
        .join(&repo.stanza)
}

fn pgv(env: &TestEnv, repo: &Repo, who: As, args: &[&str]) -> Run {
    repo.run(env, who, args, env.dir())
}

/// `expire --retention-full N [extra]` as the repository's owner; it must
/// succeed.
#[track_caller]
fn expire(env: &TestEnv, p: &Primary, full: &str, extra: &[&str]) -> Run {
    let mut args = vec!["expire", "--retention-full", full];
    args.extend_from_slice(extra);
    let run = pgv(env, &p.repo, As::PgUser, &args);
    run.ok();
    run
}

#[track_caller]
fn json(run: &Run) -> Value {
    serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("`{}` printed no JSON ({e}):\n{}", run.what, run.stdout))
}

fn files_under(dir: &Path) -> BTreeSet<PathBuf> {
    let mut out = BTreeSet::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p);
            }
        }
    }
    out
}

/// Sets the modification time of every file below `dir` back by `by`: as
/// if that much time had passed since they were written.
fn age(dir: &Path, by: Duration) {
    for f in files_under(dir) {
        set_age(&f, by);
    }
}

fn set_age(file: &Path, by: Duration) {
    fs::File::options()
        .write(true)
        .open(file)
        .and_then(|f| f.set_modified(SystemTime::now() - by))
        .unwrap_or_else(|e| panic!("set the time of {}: {e}", file.display()));
}

/// Flips one bit in the middle of `file`.
fn flip(file: &Path) {
    let mut bytes = fs::read(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    fs::write(file, bytes).unwrap_or_else(|e| panic!("write {}: {e}", file.display()));
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .expect("a file name")
        .to_string_lossy()
        .into_owned()
}

/// The orphans `verify --output json` lists, as (kind, what, removable).
#[track_caller]
fn orphans(env: &TestEnv, repo: &Repo) -> Vec<(String, String, bool)> {
    let run = pgv(env, repo, As::Root, &["verify", "--output", "json"]);
    run.ok();
    let v = json(&run);
    assert_eq!(v["problems"], Value::Array(vec![]), "{v:#}");
    v["orphans"]
        .as_array()
        .unwrap_or_else(|| panic!("verify --output json lists no orphans[]: {v:#}"))
        .iter()
        .map(|o| {
            (
                o["kind"].as_str().unwrap_or_default().to_string(),
                o["what"].as_str().unwrap_or_default().to_string(),
                o["removable"].as_bool().unwrap_or_default(),
            )
        })
        .collect()
}

/// The pid of the running pgvault whose arguments include all of `args`.
fn pgvault_pid(bin: &Path, args: &[&str]) -> Option<u32> {
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = fs::read(e.path().join("cmdline")).ok()?;
        let argv: Vec<String> = cmd
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        (argv.first()? == &bin.display().to_string()
            && args.iter().all(|a| argv.iter().any(|x| x == a)))
        .then_some(pid)
    })
}

/// Case 1. Returns the label of the killed backup.
fn killed_backup(env: &TestEnv, p: &Primary, complete: &[String]) -> String {
    let args = p.backup_args();
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let victim = env.spawn_pgvault(As::PgUser, &argv, &p.repo.env, env.dir());
    // Archiving is held back as soon as the backup copies (before, it
    // checks that archiving works): once its data is written it waits for
    // the WAL up to its stop.
    let backups = p.stanza_dir().join("backup");
    let new_dir = || {
        fs::read_dir(&backups).ok().and_then(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .find(|d| !complete.contains(&file_name(d)))
        })
    };
    let wait = |what: &str, done: &dyn Fn() -> bool| {
        let start = Instant::now();
        while !done() {
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "the backup {what}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait("never started copying", &|| new_dir().is_some());
    p.hold_archiving();
    let dir = new_dir().expect("seen a moment ago");
    wait("wrote no data object", &|| {
        files_under(&dir.join("data"))
            .iter()
            .any(|f| !file_name(f).starts_with('.'))
    });
    let pid = pgvault_pid(env.bin(), &["backup", &p.repo.url]).expect("the backup's pid");
    // SAFETY: sends a signal to the pgvault process this test started.
    let sent = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    let why = std::io::Error::last_os_error();
    assert_eq!(sent, 0, "SIGKILL to the backup (pid {pid}): {why}");
    assert_ne!(
        finish(victim, Duration::from_secs(30)).code,
        Some(0),
        "the SIGKILLed backup exited 0"
    );
    // The lock it held stands for a lock that expired (the lock's own rules
    // are tested in operations.rs).
    let _ = fs::remove_file(p.stanza_dir().join("lock").join("stanza.lock"));
    p.archive_all();
    let label = file_name(&dir);
    assert!(
        !dir.join("manifest.pgv").exists(),
        "the killed backup wrote its manifest"
    );
    let data = files_under(&dir);

    let listed = orphans(env, &p.repo);
    assert!(
        listed
            .iter()
            .any(|(kind, what, removable)| kind == "incomplete-backup"
                && what.ends_with(&format!("/backup/{label}"))
                && !removable),
        "verify should list backup directory {label} without a manifest (not yet \
         removable): {listed:?}"
    );
    let text = pgv(env, &p.repo, As::Root, &["verify"]);
    text.ok();
    assert!(
        text.stdout
            .lines()
            .any(|l| l.starts_with("orphan incomplete-backup: ") && l.contains(&label)),
        "verify should print `orphan incomplete-backup: …{label}…`:\n{}",
        text.stdout
    );

    // Young: a backup in progress looks the same. Left alone.
    let ex = expire(env, p, "10", &[]);
    assert_eq!(
        files_under(&dir),
        data,
        "expire touched a young backup directory"
    );
    assert!(
        ex.stdout.contains("left incomplete-backup: "),
        "expire should say it left the directory:\n{}",
        ex.stdout
    );

    // An hour later.
    age(&dir, AN_HOUR_AGO);
    let dry = expire(env, p, "10", &["--dry-run"]);
    assert!(
        dry.stdout
            .lines()
            .any(|l| l.starts_with("would remove incomplete-backup: ") && l.contains(&label)),
        "expire --dry-run should say it would remove {label}:\n{}",
        dry.stdout
    );
    assert_eq!(
        files_under(&dir),
        data,
        "expire --dry-run deleted something"
    );
    let ex = expire(env, p, "10", &[]);
    assert!(
        ex.stdout
            .lines()
            .any(|l| l.starts_with("removed incomplete-backup: ") && l.contains(&label)),
        "expire should say it removed {label}:\n{}",
        ex.stdout
    );
    let left = files_under(&dir);
    assert!(left.is_empty(), "expire left {left:?}");
    label
}

/// Case 2.
fn temporary_files(env: &TestEnv, p: &Primary) {
    let claim = files_under(&p.stanza_dir().join("archive"))
        .into_iter()
        .find(|f| file_name(f).ends_with(".claim") && !file_name(f).contains("history"))
        .expect("an archived segment");
    let wal_dir = claim.parent().expect("a directory").to_path_buf();
    // Named as the local repository names them: .pgvault-tmp-<pid>-<n>-<ns>.
    let old = wal_dir.join(".pgvault-tmp-4194301-0-0badcafe");
    let fresh = wal_dir.join(".pgvault-tmp-4194302-0-0badcaff");
    for f in [&old, &fresh] {
        fs::write(f, vec![0u8; 4096]).expect("write a temporary file");
        chown(f, env.uid, env.gid);
    }
    set_age(&old, AN_HOUR_AGO);

    let listed = orphans(env, &p.repo);
    for (f, removable) in [(&old, true), (&fresh, false)] {
        let name = file_name(f);
        assert!(
            listed.iter().any(|(kind, what, r)| kind == "temporary-file"
                && what.ends_with(&name)
                && *r == removable),
            "verify should list {name} (removable: {removable}): {listed:?}"
        );
    }
    expire(env, p, "10", &[]);
    assert!(!old.exists(), "expire left the hour-old {}", old.display());
    assert!(
        fresh.exists(),
        "expire removed the fresh {}",
        fresh.display()
    );
    fs::remove_file(&fresh).expect("remove the fresh temporary file");
}

/// Case 3: `oldest` is expired by `--retention-full 2`.
fn interrupted_expire(env: &TestEnv, p: &Primary, oldest: &str) {
    let dir = p.stanza_dir().join("backup").join(oldest);
    let data_dir = dir.join("data");
    let data: BTreeSet<PathBuf> = files_under(&data_dir);
    assert!(!data.is_empty(), "test precondition: {oldest} has data");
    // Its data cannot be deleted: expire stops after the manifest.
    fs::set_permissions(&data_dir, fs::Permissions::from_mode(0o555)).expect("chmod");
    let ex = pgv(
        env,
        &p.repo,
        As::PgUser,
        &["expire", "--retention-full", "2"],
    );
    fs::set_permissions(&data_dir, fs::Permissions::from_mode(0o755)).expect("chmod");
    assert_eq!(ex.code, Some(EXIT_REPOSITORY), "{}", ex.stderr);
    ex.expect_one_error_line(&data_dir.display().to_string());
    assert!(
        !dir.join("manifest.pgv").exists(),
        "test precondition: expire deleted the manifest before it stopped"
    );
    assert_eq!(files_under(&data_dir), data, "test precondition");

    let ex = expire(env, p, "2", &[]);
    let left = files_under(&dir);
    assert!(
        left.is_empty(),
        "the re-run of the interrupted expire left {left:?}:\n{}",
        ex.stdout
    );
    assert!(
        ex.stdout.contains("removed interrupted-expire: "),
        "expire should say it finished the interrupted one:\n{}",
        ex.stdout
    );
}

/// A copy of the repository (as `cp -a`, owners kept).
fn copy_repo(env: &TestEnv, repo: &Repo) -> Repo {
    let root = env.dir().join(format!("repo-copy-{}", unique()));
    let status = Command::new("cp")
        .arg("-a")
        .arg(repo.local.as_ref().expect("local"))
        .arg(&root)
        .status()
        .expect("cp");
    assert!(status.success(), "cp -a the repository");
    Repo {
        url: root.display().to_string(),
        local: Some(root),
        ..repo.clone()
    }
}

/// Case 4: `b` and `c` are complete backups.
fn bit_flips(env: &TestEnv, p: &Primary, b: &str, c: &str) {
    let copy = copy_repo(env, &p.repo);
    let root = stanza_dir(&copy);
    let archive = files_under(&root.join("archive"));
    let segment = |f: &PathBuf| {
        let n = file_name(f);
        n.len() >= 24 && n[..24].bytes().all(|c| c.is_ascii_hexdigit())
    };
    let with = |suffix: &str| -> Vec<PathBuf> {
        archive
            .iter()
            .filter(|f| segment(f) && file_name(f).ends_with(suffix))
            .cloned()
            .collect()
    };
    let (summaries, claims, contents) = (with(".summary"), with(".claim"), with(".zst"));
    // Three different segments: one loses its summary, one its claim, one
    // its content.
    let summary = summaries.first().expect("a summary").clone();
    let seg_of = |f: &PathBuf| file_name(f)[..24].to_string();
    let claim = claims
        .iter()
        .find(|f| seg_of(f) != seg_of(&summary))
        .expect("a claim")
        .clone();
    let content = contents
        .iter()
        .find(|f| seg_of(f) != seg_of(&summary) && seg_of(f) != seg_of(&claim))
        .expect("a content")
        .clone();
    let manifest = root.join("backup").join(b).join("manifest.pgv");
    let data = files_under(&root.join("backup").join(c).join("data"))
        .into_iter()
        .max_by_key(|f| fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .expect("a data object");
    let stanza = root.join("stanza.pgv");
    let damaged = [&summary, &claim, &content, &manifest, &data, &stanza];
    for f in damaged {
        flip(f);
    }

    let run = pgv(env, &copy, As::Root, &["verify"]);
    run.expect_code(EXIT_VERIFY);
    let problems: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("corrupt: "))
        .collect();
    for f in damaged {
        let rel = f
            .strip_prefix(&root)
            .expect("in the copy")
            .display()
            .to_string();
        assert!(
            problems.iter().any(|l| l.contains(&rel)),
            "verify should report {rel} as corrupt:\n{}\n--- stderr\n{}",
            run.stdout,
            run.stderr
        );
    }
    let v = json(&copy.run(env, As::Root, &["verify", "--output", "json"], env.dir()));
    let corrupt = v["problems"]
        .as_array()
        .map(|a| a.iter().filter(|p| p["kind"] == "corrupt").count())
        .unwrap_or(0);
    assert_eq!(corrupt, problems.len(), "JSON and text agree: {v:#}");
}

/// Case 5: `newest` is the newest complete backup, `before` the one before.
fn past_a_damaged_manifest(env: &TestEnv, p: &Primary, before: &str, newest: &str) {
    p.archive_all();
    let rows = p.pg.psql("select count(*) from t");
    let copy = copy_repo(env, &p.repo);
    flip(
        &stanza_dir(&copy)
            .join("backup")
            .join(newest)
            .join("manifest.pgv"),
    );

    let info = pgv(env, &copy, As::PgUser, &["info", "--output", "json"]);
    info.ok();
    let v = json(&info);
    let labels: Vec<&str> = v["backups"]
        .as_array()
        .map(|a| a.iter().filter_map(|b| b["label"].as_str()).collect())
        .unwrap_or_default();
    assert!(
        labels.contains(&before) && !labels.contains(&newest),
        "info should list {before} and leave out {newest}: {v:#}"
    );
    assert_eq!(
        v["unreadable_backups"][0]["label"], newest,
        "info should name the backup it left out: {v:#}"
    );

    let set = pgv(
        env,
        &copy,
        As::PgUser,
        &[
            "restore",
            "--pgdata",
            "/nonexistent-pgvault-it",
            "--set",
            newest,
        ],
    );
    set.expect_code(EXIT_REPOSITORY);
    set.expect_one_error_line(&format!("{newest}/manifest.pgv"));

    let mut n = Node::new(env, &copy, "past-damaged");
    let pgdata = n.pgdata.display().to_string();
    let r = pgv(
        env,
        &copy,
        As::PgUser,
        &["restore", "--pgdata", &pgdata, "--archive-mode", "off"],
    );
    r.ok();
    assert!(
        r.stderr.contains(&format!("restoring backup {before} ")),
        "restore should start from {before}, the newest it can read:\n{}",
        r.stderr
    );
    assert!(
        r.stderr
            .lines()
            .any(|l| l.contains(newest) && l.contains("skipped")),
        "restore should say it skipped {newest}:\n{}",
        r.stderr
    );
    n.start();
    n.wait_promoted();
    let restored = n.psql("select count(*) from t");
    n.stop();
    assert_eq!(
        restored, rows,
        "the restored cluster has every archived row"
    );
}

#[test]
fn orphans_and_damage_local_repo() {
    let env = TestEnv::new();
    let repo = env.local_repo("orphans");
    let mut cases = Cases::new();
    let one_mib = InitOpts {
        wal_segsize_mb: Some(1),
        ..InitOpts::default()
    };
    let mut pg = Cluster::init(&env, one_mib);
    let pgdata = pg.pgdata().display().to_string();
    pgv(
        &env,
        &repo,
        As::PgUser,
        &["stanza-create", "--pgdata", &pgdata],
    )
    .ok();
    let block = env.dir().join("archiving-held");
    pg.set_conf(&format!(
        "archive_mode = on\narchive_command = 'test ! -e {} && {}'\n",
        block.display(),
        repo.archive_command(env.bin())
    ));
    let mut vars = env.base_env(As::PgUser);
    vars.extend(repo.env.iter().cloned());
    pg.start_with_env(&vars);
    let p = Primary { pg, repo, block };
    p.pg.psql("create table t(id serial primary key, tag text not null)");

    let mut labels = Vec::new();
    for _ in 0..3 {
        p.rows(20);
        p.archive_all();
        labels.push(backup(&env, &p.repo, &p.pg));
    }
    p.rows(20);
    p.archive_all();

    cases.run(
        "a backup killed halfway: listed by verify, removed by expire only once an hour old",
        || killed_backup(&env, &p, &labels),
    );
    cases.run(
        "temporary files a killed archive-push left: listed by verify, swept once an hour old",
        || temporary_files(&env, &p),
    );
    cases.run(
        "an expire interrupted between a backup's manifest and its data finishes when re-run",
        || interrupted_expire(&env, &p, &labels[0]),
    );
    cases.run(
        "flipped bits in six kinds of object: verify names every one and exits 11",
        || bit_flips(&env, &p, &labels[1], &labels[2]),
    );
    p.rows(20);
    p.archive_all();
    let newest = backup(&env, &p.repo, &p.pg);
    p.rows(20);
    cases.run(
        "info and restore go on past another backup's damaged manifest",
        || past_a_damaged_manifest(&env, &p, &labels[2], &newest),
    );
    cases.finish();
}
