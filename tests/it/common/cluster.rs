//! A PostgreSQL cluster in a temporary directory, run as the unprivileged
//! test user (PostgreSQL refuses to run as root).

use super::process::{finish, spawn_as, Run, Spawned};
use super::{chown, free_port, keep, mkdir_mode, As, Repo, Scratch, TestEnv};
use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Options for `initdb`.
#[derive(Clone, Copy, Debug, Default)]
pub struct InitOpts {
    /// `--wal-segsize` in MiB; None = PostgreSQL's default (16).
    pub wal_segsize_mb: Option<u32>,
    pub data_checksums: bool,
}

/// A PostgreSQL cluster in a temporary directory, run as the postgres user.
pub struct Cluster {
    pgbin: PathBuf,
    user: String,
    /// Removed (unless kept) when the cluster is dropped.
    _scratch: Scratch,
    pgdata: PathBuf,
    sockdir: PathBuf,
    log: PathBuf,
    port: u16,
    running: bool,
    wal_segment_size: u64,
}

impl Cluster {
    /// `initdb` a new cluster (as the postgres user).
    pub fn init(env: &TestEnv, opts: InitOpts) -> Cluster {
        let scratch = Scratch::new("pg");
        let base = scratch.path().join("pg");
        mkdir_mode(&base, 0o755);
        chown(&base, env.uid, env.gid);
        let pgdata = base.join("data");
        let mut args = vec![
            env.pg("initdb"),
            "-D".into(),
            pgdata.display().to_string(),
            "--auth=trust".into(),
            "--encoding=UTF8".into(),
            "--locale=C".into(),
            "--no-sync".into(),
            "--no-instructions".into(),
        ];
        if let Some(mb) = opts.wal_segsize_mb {
            args.push(format!("--wal-segsize={mb}"));
        }
        if opts.data_checksums {
            args.push("--data-checksums".into());
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        env.run_ok(As::PgUser, &argv, &[], &base);
        let c = Cluster {
            pgbin: env.pgbin.clone(),
            user: env.user.clone(),
            _scratch: scratch,
            sockdir: base.clone(),
            log: base.join("server.log"),
            pgdata,
            port: 0,
            running: false,
            wal_segment_size: u64::from(opts.wal_segsize_mb.unwrap_or(16)) << 20,
        };
        // Quiet, fast, and nothing that switches WAL behind the test's back.
        c.set_conf(
            "fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = on\n\
             shared_buffers = 32MB\n\
             max_connections = 20\n\
             archive_timeout = 0\n\
             checkpoint_timeout = 1h\n\
             log_min_messages = warning\n\
             log_checkpoints = off\n",
        );
        c
    }

    /// The socket directory (the parent of the data directory).
    pub fn sockdir(&self) -> &Path {
        &self.sockdir
    }

    pub fn pgdata(&self) -> &Path {
        &self.pgdata
    }

    pub fn wal_dir(&self) -> PathBuf {
        self.pgdata.join("pg_wal")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn wal_segment_size(&self) -> u64 {
        self.wal_segment_size
    }

    /// Append settings to postgresql.conf.
    pub fn set_conf(&self, conf: &str) {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(self.pgdata.join("postgresql.conf"))
            .expect("open postgresql.conf");
        writeln!(f, "{conf}").expect("append to postgresql.conf");
    }

    /// `archive_mode = on` with `archive_command` pushing to `repo`, and WAL
    /// kept in pg_wal (so tests can compare the archived copies with the
    /// originals without changing what the archiver is given).
    pub fn enable_archiving(&self, env: &TestEnv, repo: &Repo) {
        self.set_conf(&format!(
            "archive_mode = on\n\
             archive_command = '{}'\n\
             wal_keep_size = 4GB\n\
             max_wal_size = 4GB\n\
             min_wal_size = 80MB\n",
            repo.archive_command(env.bin())
        ));
    }

    /// A cluster of 1 MiB segments archiving into `repo`, its stanza
    /// created: what most single-cluster tests start from.
    pub fn archiving(env: &TestEnv, repo: &Repo, data_checksums: bool) -> Cluster {
        let mut pg = Cluster::init(
            env,
            InitOpts {
                wal_segsize_mb: Some(1),
                data_checksums,
            },
        );
        pg.start_archiving(env, repo);
        repo.stanza_create(env, pg.pgdata());
        pg
    }

    /// Start with archiving to `repo` through the real binary: the
    /// postmaster gets the postgres user's test home and the repo's AWS_*
    /// variables, which archive_command inherits.
    pub fn start_archiving(&mut self, env: &TestEnv, repo: &Repo) {
        self.enable_archiving(env, repo);
        let mut vars = env.base_env(As::PgUser);
        vars.extend(repo.env.iter().cloned());
        self.start_with_env(&vars);
    }

    pub fn start(&mut self) {
        self.start_with_env(&[]);
    }

    /// `pg_ctl -w start` with extra environment for the postmaster (which
    /// archive_command inherits).
    pub fn start_with_env(&mut self, extra: &[(String, String)]) {
        assert!(!self.running, "cluster already running");
        let mut last_err = String::new();
        for _ in 0..3 {
            self.port = free_port();
            let opts = format!(
                "-p {} -k {} -c listen_addresses=127.0.0.1",
                self.port,
                self.sockdir.display()
            );
            let argv: Vec<OsString> = [
                self.pg("pg_ctl"),
                "-D".into(),
                self.pgdata.display().to_string(),
                "-l".into(),
                self.log.display().to_string(),
                "-w".into(),
                "-t".into(),
                "60".into(),
                "-o".into(),
                opts,
                "start".into(),
            ]
            .iter()
            .map(OsString::from)
            .collect();
            let run = finish(self.spawn_pg(&argv, extra), Duration::from_secs(120));
            if run.code == Some(0) {
                self.running = true;
                return;
            }
            last_err = format!("{}\n{}\n{}", run.stdout, run.stderr, self.log_tail(20));
            if !last_err.contains("could not bind") && !last_err.contains("in use") {
                break;
            }
        }
        panic!("pg_ctl start failed:\n{last_err}");
    }

    fn spawn_pg(&self, argv: &[OsString], env: &[(String, String)]) -> Spawned {
        spawn_as(Some(&self.user), argv, env, &self.sockdir)
    }

    fn pg(&self, tool: &str) -> String {
        self.pgbin.join(tool).display().to_string()
    }

    /// `pg_ctl -m fast stop` (a clean shutdown).
    pub fn stop(&mut self) {
        self.stop_mode("fast");
    }

    /// `pg_ctl -m immediate stop`: the server dies as in a crash (or a
    /// failover that cuts it off); a later start runs crash recovery.
    pub fn stop_immediate(&mut self) {
        self.stop_mode("immediate");
    }

    fn stop_mode(&mut self, mode: &str) {
        if !self.running {
            return;
        }
        let argv: Vec<OsString> = [
            self.pg("pg_ctl"),
            "-D".into(),
            self.pgdata.display().to_string(),
            "-w".into(),
            "-t".into(),
            "120".into(),
            "-m".into(),
            mode.into(),
            "stop".into(),
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let run = finish(self.spawn_pg(&argv, &[]), Duration::from_secs(180));
        self.running = false;
        run.ok();
    }

    /// Run SQL with psql (`-XAtq`, stop on error) and return trimmed stdout.
    #[track_caller]
    pub fn psql(&self, sql: &str) -> String {
        assert!(self.running, "psql on a stopped cluster");
        let argv: Vec<OsString> = [
            self.pg("psql"),
            "-XAtq".into(),
            "-v".into(),
            "ON_ERROR_STOP=1".into(),
            "-h".into(),
            self.sockdir.display().to_string(),
            "-p".into(),
            self.port.to_string(),
            "-d".into(),
            "postgres".into(),
            "-c".into(),
            sql.into(),
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let run = finish(self.spawn_pg(&argv, &[]), Duration::from_secs(300));
        assert_eq!(
            run.code,
            Some(0),
            "psql failed: {sql}\n{}\n{}",
            run.stderr,
            self.log_tail(20)
        );
        run.stdout.trim().to_string()
    }

    /// Run pgbench against the `postgres` database with `args`.
    #[track_caller]
    pub fn pgbench(&self, args: &[&str]) {
        let mut argv: Vec<OsString> = vec![
            self.pg("pgbench").into(),
            "-h".into(),
            self.sockdir.clone().into(),
            "-p".into(),
            self.port.to_string().into(),
        ];
        argv.extend(args.iter().map(OsString::from));
        argv.push("postgres".into());
        let run = finish(self.spawn_pg(&argv, &[]), Duration::from_secs(600));
        assert_eq!(
            run.code,
            Some(0),
            "pgbench {args:?} failed:\n{}\n{}",
            run.stderr,
            self.log_tail(20)
        );
    }

    /// Write something, then switch WAL; returns the name of the segment
    /// that was just completed (which the archiver will get next).
    pub fn switch_wal(&self) -> String {
        self.psql(
            "create table if not exists pgvault_it_switch(x int); \
             insert into pgvault_it_switch values (1);",
        );
        self.psql("select pg_walfile_name(pg_switch_wal())")
    }

    /// The segment currently being written.
    pub fn current_wal(&self) -> String {
        self.psql("select pg_walfile_name(pg_current_wal_lsn())")
    }

    /// A field of `pg_controldata` output, e.g. "Database system identifier".
    pub fn controldata(&self, field: &str) -> String {
        let out = Command::new(self.pg("pg_controldata"))
            .arg(&self.pgdata)
            .env("LC_ALL", "C")
            .output()
            .expect("run pg_controldata");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| panic!("no {field:?} in pg_controldata output:\n{text}"))
    }

    /// The cluster's system identifier, as a decimal string.
    pub fn system_identifier(&self) -> String {
        self.controldata("Database system identifier")
    }

    /// The segment holding the last checkpoint's redo point. Right after
    /// initdb it is the only real segment in pg_wal (initdb writes several
    /// 1 MiB segments and leaves older ones recycled under future names, with
    /// stale contents), so tests use it as "a real segment of this cluster".
    pub fn redo_wal_file(&self) -> String {
        self.controldata("Latest checkpoint's REDO WAL file")
    }

    /// Wait until `pg_stat_archiver.last_archived_wal` reaches `name` (a
    /// segment name; same timeline, so names compare as text). Fails fast,
    /// with the failing file and the server log, when archiving keeps
    /// failing.
    #[track_caller]
    pub fn wait_archived(&self, name: &str, timeout: Duration) {
        let start = Instant::now();
        let mut base_failed: Option<u64> = None;
        let mut failing_since: Option<Instant> = None;
        loop {
            let row = self.psql(
                "select coalesce(last_archived_wal, ''), failed_count, \
                 coalesce(last_failed_wal, ''), \
                 coalesce(last_failed_time > coalesce(last_archived_time, '-infinity'), false) \
                 from pg_stat_archiver",
            );
            let cols: Vec<&str> = row.split('|').collect();
            let (last, failed, last_failed, failing_now) = (
                cols[0],
                cols[1].parse::<u64>().unwrap_or(0),
                cols[2],
                cols[3] == "t",
            );
            if last.len() == 24 && last >= name {
                return;
            }
            let base = *base_failed.get_or_insert(failed);
            if failed > base && failing_now {
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(8) {
                    panic!(
                        "archiving keeps failing: last_failed_wal={last_failed} \
                         failed_count={failed} last_archived_wal={last:?} (waiting for {name})\n\
                         --- server log tail\n{}",
                        self.log_tail(40)
                    );
                }
            } else {
                failing_since = None;
            }
            if start.elapsed() > timeout {
                panic!(
                    "{name} not archived after {timeout:?}: last_archived_wal={last:?} \
                     failed_count={failed} last_failed_wal={last_failed}\n\
                     --- server log tail\n{}",
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The last `n` lines of the server log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running {
            let _ = Command::new("runuser")
                .args(["-u", &self.user, "--"])
                .arg(self.pgbin.join("pg_ctl"))
                .arg("-D")
                .arg(&self.pgdata)
                .args(["-w", "-t", "60", "-m", "immediate", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            self.running = false;
        }
        if keep() {
            eprintln!("PGVAULT_TEST_KEEP: server log {}", self.log.display());
        }
    }
}

/// `pgvault stanza-create` for the cluster at `pgdata`, as the postgres user.
#[track_caller]
pub fn stanza_create(env: &TestEnv, repo: &Repo, pgdata: &Path) {
    let pgdata = pgdata.display().to_string();
    repo.run(
        env,
        As::PgUser,
        &["stanza-create", "--pgdata", &pgdata],
        env.dir(),
    )
    .ok();
}

/// `backup --type ty --start-fast` of the server with data directory
/// `pgdata` listening in `sockdir` on `port`.
pub fn backup_args(pgdata: &Path, sockdir: &Path, port: u16, ty: &str) -> Vec<String> {
    [
        "backup",
        "--type",
        ty,
        "--pgdata",
        &pgdata.display().to_string(),
        "--pg-host",
        &sockdir.display().to_string(),
        "--pg-port",
        &port.to_string(),
        "--start-fast",
    ]
    .map(String::from)
    .to_vec()
}

/// `pgvault backup --type full --start-fast` of `pg` as the postgres user.
pub fn backup_run(env: &TestEnv, repo: &Repo, pg: &Cluster) -> Run {
    let args = backup_args(pg.pgdata(), pg.sockdir(), pg.port(), "full");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    repo.run(env, As::PgUser, &args, env.dir())
}

/// `pgvault backup --start-fast` of `pg` as the postgres user; returns the
/// label it printed.
#[track_caller]
pub fn backup(env: &TestEnv, repo: &Repo, pg: &Cluster) -> String {
    let run = backup_run(env, repo, pg);
    run.ok();
    eprintln!("pgvault backup took {:.1?}", run.elapsed);
    let label = run.stdout.trim().to_string();
    let b = label.as_bytes();
    assert!(
        b.len() == 16
            && b[..8].iter().all(u8::is_ascii_digit)
            && b[8] == b'-'
            && b[9..15].iter().all(u8::is_ascii_digit)
            && b[15] == b'F',
        "backup should print its label (YYYYMMDD-HHMMSSF) on stdout, got {:?}\n--- stderr\n{}",
        run.stdout,
        run.stderr
    );
    label
}

/// Flips one bit inside block `block` of a relation file of a stopped
/// cluster, in place: the page's checksum then fails (and nothing rewrites
/// it before the backup reads it).
pub fn damage_page(path: &Path, block: u64) {
    use std::os::unix::fs::FileExt;
    let at = block * 8192 + 4000;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, at)
        .unwrap_or_else(|e| panic!("read {} at {at}: {e}", path.display()));
    f.write_all_at(&[byte[0] ^ 0x40], at)
        .unwrap_or_else(|e| panic!("write {} at {at}: {e}", path.display()));
}
