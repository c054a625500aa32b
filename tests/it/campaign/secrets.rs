//! The S3 secret key never shows: not in the arguments of any process
//! pgvault starts (its detached look-ahead pusher and prefetcher, anything
//! — every process on the machine is watched while the test runs), not in
//! its log lines (at `trace`), not in `info`, not in error messages, not
//! in any file it writes (catalog, spool, the restored cluster's
//! `postgresql.auto.conf`, PostgreSQL's logs).
//!
//! One unique secret, given the ways a user gives it: the configuration
//! file (`s3-secret-access-key`, which PostgreSQL's `archive_command` and
//! the restored cluster's `restore_command` read through `--config`),
//! `PGVAULT_S3_SECRET_ACCESS_KEY` and `AWS_SECRET_ACCESS_KEY`. moto
//! accepts any secret; s3s-fs, which checks signatures, is given the
//! secret as a wrong one, for its refusal.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::inventory::all_files;
use super::*;

/// Every process's arguments, read from /proc until `stop`: those that
/// hold `secret` (pid, argv), and how many processes were read.
fn watch_processes(secret: &str, stop: &AtomicBool, seen: &Mutex<(Vec<String>, BTreeSet<i32>)>) {
    while !stop.load(Ordering::Relaxed) {
        if let Ok(rd) = fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
                    continue;
                };
                let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                let mut s = seen.lock().expect("seen");
                s.1.insert(pid);
                if text.contains(secret) {
                    s.0.push(format!("pid {pid}: {}", text.replace(secret, "<SECRET>")));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Files below `dir` (but `except`) that hold `secret`.
fn files_holding(dir: &Path, secret: &str, except: &Path) -> Vec<String> {
    all_files(dir)
        .into_iter()
        .filter(|p| p != except)
        .filter(|p| {
            fs::read(p).is_ok_and(|b| b.windows(secret.len()).any(|w| w == secret.as_bytes()))
        })
        .map(|p| p.display().to_string())
        .collect()
}

#[test]
fn secrets_never_show() {
    let mut c = Campaign::new("secrets_never_show");
    let env = TestEnv::new();
    let Some(server) = require_server(env.moto.clone(), "PGVAULT_TEST_MOTO") else {
        return;
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let secret = format!("Campaign-Secret-{nanos}-x9");
    let base = env.s3_repo(&server, "campaign");
    // The repository without the secret: the configuration file has it.
    let repo = Repo {
        env: server
            .env()
            .into_iter()
            .filter(|(k, _)| !k.contains("SECRET"))
            .collect(),
        ..base.clone()
    };
    let config = env.dir().join("pgvault.toml");
    fs::write(
        &config,
        format!(
            "repo = \"{}\"\nstanza = \"campaign\"\ns3-endpoint = \"{}\"\ns3-region = \"{}\"\n\
             s3-allow-http = true\ns3-access-key-id = \"{}\"\ns3-secret-access-key = \"{secret}\"\n\
             log-level = \"trace\"\n",
            repo.url, server.endpoint, server.region, server.access_key
        ),
    )
    .expect("write the configuration file");
    fs::set_permissions(&config, fs::Permissions::from_mode(0o600)).expect("chmod");
    chown(&config, env.uid, env.gid);
    let cfg = |args: &[&str]| -> Vec<String> {
        let mut v = vec!["--config".to_string(), config.display().to_string()];
        v.extend(args.iter().map(|s| s.to_string()));
        v
    };
    // Without --repo/--stanza on the command line: the file has them.
    let pgv = |who: As, args: &[String], extra: &[(String, String)]| -> Run {
        let mut vars = repo.env.clone();
        vars.extend(extra.iter().cloned());
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        env.pgvault(who, &a, &vars, env.dir())
    };

    let stop = AtomicBool::new(false);
    let seen = Mutex::new((Vec::new(), BTreeSet::new()));
    let mut outputs: Vec<(String, String)> = Vec::new();
    let mut pg = Cluster::init(&env, small_segments());
    std::thread::scope(|s| {
        s.spawn(|| watch_processes(&secret, &stop, &seen));
        let mut note = |what: &str, run: &Run| {
            outputs.push((format!("{what}: stderr"), run.stderr.clone()));
            outputs.push((format!("{what}: stdout"), run.stdout.clone()));
        };
        let pgdata = pg.pgdata().display().to_string();
        note(
            "stanza-create",
            pgv(
                As::PgUser,
                &cfg(&["stanza-create", "--pgdata", &pgdata]),
                &[],
            )
            .ok(),
        );
        // PostgreSQL archives with the secret from the file (look-ahead on).
        pg.set_conf(&format!(
            "archive_mode = on\narchive_command = '{} --config {} archive-push %p'\nwal_keep_size = 1GB\n",
            env.bin().display(),
            config.display()
        ));
        let mut vars = env.base_env(As::PgUser);
        vars.extend(repo.env.iter().cloned());
        pg.start_with_env(&vars);
        pg.psql("create table t as select g from generate_series(1, 10000) g");
        for _ in 0..10 {
            pg.switch_wal();
        }
        let (host, port) = (pg.sockdir().display().to_string(), pg.port().to_string());
        let conn = ["--pgdata", &pgdata, "--pg-host", &host, "--pg-port", &port];
        let mut backup = vec!["backup", "--type", "full", "--start-fast"];
        backup.extend(conn);
        let b = pgv(As::PgUser, &cfg(&backup), &[]);
        b.ok();
        let label = b.stdout.trim().to_string();
        note("backup", &b);
        let mut check = vec!["check"];
        check.extend(conn);
        note("check", pgv(As::PgUser, &cfg(&check), &[]).ok());
        for out in ["text", "json"] {
            note(
                &format!("info --output {out}"),
                pgv(As::Root, &cfg(&["info", "--output", out]), &[]).ok(),
            );
        }
        note("verify", pgv(As::Root, &cfg(&["verify"]), &[]).ok());
        note("backfill", pgv(As::Root, &cfg(&["backfill"]), &[]).ok());
        let last = pg.switch_wal();
        wait_archived(&pg, &last);
        // Restore, and recovery through archive-get with prefetch.
        let mut node = Node::new(&env, &repo, "secret");
        let nd = node.pgdata.display().to_string();
        let restore = cfg(&[
            "restore",
            "--pgdata",
            &nd,
            "--set",
            &label,
            "--target-action",
            "promote",
            "--archive-mode",
            "off",
        ]);
        note("restore", pgv(As::PgUser, &restore, &[]).ok());
        c.guard("restored cluster", || {
            node.start();
            node.wait_promoted();
            node.stop();
        });
        note(
            "expire",
            pgv(As::PgUser, &cfg(&["expire", "--retention-full", "1"]), &[]).ok(),
        );
        // The secret from the environment, both names.
        let from_env = |name: &str| {
            let mut v = vec![(name.to_string(), secret.clone())];
            v.push(("PGVAULT_LOG_LEVEL".into(), "trace".into()));
            v
        };
        let plain = |args: &[&str]| -> Vec<String> {
            let mut v = vec![
                "--repo".to_string(),
                repo.url.clone(),
                "--stanza".into(),
                "campaign".into(),
            ];
            v.extend(args.iter().map(|s| s.to_string()));
            v
        };
        for var in ["AWS_SECRET_ACCESS_KEY", "PGVAULT_S3_SECRET_ACCESS_KEY"] {
            note(
                &format!("info ({var})"),
                pgv(As::Root, &plain(&["info"]), &from_env(var)).ok(),
            );
            let dest = env.dir().join(format!("got-{var}"));
            let get = plain(&["archive-get", &last, &dest.display().to_string()]);
            note(
                &format!("archive-get ({var})"),
                pgv(As::Root, &get, &from_env(var)).ok(),
            );
        }
        // Errors: a bucket that does not exist; s3s-fs refusing the secret.
        let wrong = Repo {
            url: format!("s3://no-such-bucket-{nanos}/x"),
            ..repo.clone()
        };
        let mut a = vec![
            "--repo".to_string(),
            wrong.url.clone(),
            "--stanza".into(),
            "campaign".into(),
            "info".into(),
        ];
        let r = pgv(As::Root, &a, &from_env("AWS_SECRET_ACCESS_KEY"));
        if r.code == Some(0) {
            c.problem("info on a bucket that does not exist", "exit 0");
        }
        note("error: no such bucket", &r);
        if let Some(s3sfs) = env.s3sfs.clone() {
            let mut vars: Vec<(String, String)> = s3sfs
                .env()
                .into_iter()
                .filter(|(k, _)| !k.contains("SECRET"))
                .collect();
            vars.extend(from_env("AWS_SECRET_ACCESS_KEY"));
            a[1] = format!("s3://{}/secret-{nanos}", s3sfs.bucket);
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            let r = env.pgvault(As::Root, &a, &vars, env.dir());
            if r.code == Some(0) {
                c.problem("info on s3s-fs with a wrong secret", "exit 0");
            }
            note("error: s3s-fs refuses the secret", &r);
        }
        pg.stop();
        stop.store(true, Ordering::Relaxed);
    });

    // Where the secret was looked for, and found.
    let (found, pids) = seen.into_inner().expect("seen");
    c.count("processes whose arguments were read", pids.len() as u64);
    for f in found {
        c.problem("process arguments", f);
    }
    c.count("command outputs searched", outputs.len() as u64);
    for (what, text) in &outputs {
        if text.contains(&secret) {
            c.problem(what, text.replace(&secret, "<SECRET>"));
        }
    }
    // The primary's directory: its data and its server log.
    let logs: Vec<PathBuf> = vec![pg.sockdir().to_path_buf()];
    let mut searched = all_files(env.dir()).len();
    for f in files_holding(env.dir(), &secret, &config) {
        c.problem("a file pgvault or PostgreSQL wrote", f);
    }
    for d in &logs {
        searched += all_files(d).len();
        for f in files_holding(d, &secret, &config) {
            c.problem("a file of the primary", f);
        }
    }
    c.count("files searched", searched as u64);
    c.finish();
}
