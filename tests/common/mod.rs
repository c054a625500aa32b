//! Test harness for integration tests that drive real things: a real
//! PostgreSQL 15 cluster run as an unprivileged OS user, the real `pgvault`
//! binary, and real S3-API servers (moto, s3s-fs) started by
//! `scripts/test.sh`.
//!
//! Environment (all set by `scripts/test.sh`):
//! - `PGVAULT_TEST_PGBIN`  PostgreSQL binaries (default `/usr/lib/postgresql/15/bin`)
//! - `PGVAULT_TEST_USER`   OS user that runs postgres (default `pgvtest`)
//! - `PGVAULT_TEST_MOTO`, `PGVAULT_TEST_S3SFS`  S3 endpoints; a test that
//!   needs one whose variable is missing is skipped with a message
//! - `PGVAULT_TEST_AWS_ACCESS_KEY_ID`, `PGVAULT_TEST_AWS_SECRET_ACCESS_KEY`,
//!   `PGVAULT_TEST_AWS_REGION`, `PGVAULT_TEST_BUCKET`  credentials both servers accept
//! - `PGVAULT_TEST_KEEP=1` keeps temporary directories for a post-mortem.
//!
//! PostgreSQL refuses to run as root, so the tests (run as root) start it
//! with `runuser -u <user> --`. Everything the postgres user must read or
//! write lives under `/tmp` with permissions it can traverse; the `pgvault`
//! binary is copied there too, because the cargo target directory may sit
//! under a path that user cannot reach.

#![allow(dead_code)] // each test binary uses a different subset

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long any single pgvault invocation may take before the harness kills
/// it and fails the test (object_store's default retries can take minutes).
pub const PGVAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Who runs a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum As {
    Root,
    /// The unprivileged PostgreSQL user.
    PgUser,
}

/// One S3-API server the tests may use.
#[derive(Clone, Debug)]
pub struct S3Server {
    pub name: &'static str,
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
    pub bucket: String,
}

/// The output of one process: exit code (None when killed by a signal),
/// stdout and stderr as text.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    pub what: String,
}

impl Run {
    /// Panic with everything known about the run unless it exited with `code`.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "expected exit {code} from `{}`, got {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.what,
            self.code,
            self.stdout,
            self.stderr
        );
        self
    }

    #[track_caller]
    pub fn ok(&self) -> &Self {
        self.expect_code(0)
    }

    /// Non-empty stderr lines.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.trim().is_empty())
            .collect()
    }

    /// The error contract: exactly one `error: ...` line, optionally followed
    /// by `hint: ...` lines, and the error line mentions `needle` (usually
    /// the file name).
    #[track_caller]
    pub fn expect_one_error_line(&self, needle: &str) -> &Self {
        let lines = self.stderr_lines();
        let errors: Vec<_> = lines.iter().filter(|l| !l.starts_with("hint:")).collect();
        assert!(
            errors.len() == 1 && errors[0].starts_with("error:"),
            "`{}` should print one `error:` line (plus optional `hint:` lines) on stderr, got:\n{}",
            self.what,
            self.stderr
        );
        assert!(
            errors[0].contains(needle),
            "the error line of `{}` should name {needle:?}, got: {}",
            self.what,
            errors[0]
        );
        self
    }
}

/// What the tests need to know about the machine, plus a per-test scratch
/// directory holding a copy of the `pgvault` binary.
pub struct TestEnv {
    pub pgbin: PathBuf,
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    pub moto: Option<S3Server>,
    pub s3sfs: Option<S3Server>,
    scratch: Scratch,
    bin: PathBuf,
    home_root: PathBuf,
    home_pg: PathBuf,
}

impl TestEnv {
    /// Read the environment and prepare a scratch directory (one per test).
    pub fn new() -> TestEnv {
        let pgbin = PathBuf::from(
            std::env::var("PGVAULT_TEST_PGBIN")
                .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()),
        );
        assert!(
            pgbin.join("postgres").exists(),
            "no PostgreSQL at {} (set PGVAULT_TEST_PGBIN, or run scripts/test.sh)",
            pgbin.display()
        );
        let user = std::env::var("PGVAULT_TEST_USER").unwrap_or_else(|_| "pgvtest".into());
        let uid = id_of(&user, "-u");
        let gid = id_of(&user, "-g");
        let cred = |name: &str, default: &str| {
            std::env::var(format!("PGVAULT_TEST_{name}"))
                .or_else(|_| std::env::var(name))
                .unwrap_or_else(|_| default.into())
        };
        let server = |name: &'static str, var: &str| {
            std::env::var(var)
                .ok()
                .filter(|v| !v.is_empty())
                .map(|endpoint| S3Server {
                    name,
                    endpoint,
                    access_key: cred("AWS_ACCESS_KEY_ID", "pgvault-test-key"),
                    secret_key: cred("AWS_SECRET_ACCESS_KEY", "pgvault-test-secret"),
                    region: cred("AWS_REGION", "us-east-1"),
                    bucket: std::env::var("PGVAULT_TEST_BUCKET")
                        .unwrap_or_else(|_| "pgvault-test".into()),
                })
        };
        let moto = server("moto", "PGVAULT_TEST_MOTO");
        let s3sfs = server("s3s-fs", "PGVAULT_TEST_S3SFS");

        let scratch = Scratch::new("env");
        let bindir = scratch.path().join("bin");
        mkdir_mode(&bindir, 0o755);
        let bin = bindir.join("pgvault");
        // A hard link is instant; copy when the target dir is on another fs.
        if fs::hard_link(env!("CARGO_BIN_EXE_pgvault"), &bin).is_err() {
            fs::copy(env!("CARGO_BIN_EXE_pgvault"), &bin).expect("copy the pgvault binary");
        }
        fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).expect("chmod pgvault");
        // Separate homes so each OS user has its own catalog, as on a real
        // host (postgres for archive_command, root for cron).
        let home_root = scratch.path().join("home-root");
        let home_pg = scratch.path().join("home-pg");
        mkdir_mode(&home_root, 0o700);
        mkdir_mode(&home_pg, 0o700);
        chown(&home_pg, uid, gid);
        TestEnv {
            pgbin,
            user,
            uid,
            gid,
            moto,
            s3sfs,
            scratch,
            bin,
            home_root,
            home_pg,
        }
    }

    /// The copy of the pgvault binary both root and the postgres user can run.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    pub fn dir(&self) -> &Path {
        self.scratch.path()
    }

    /// A new directory in the scratch dir, owned by `owner`, mode 0755.
    pub fn mkdir(&self, name: &str, owner: As) -> PathBuf {
        let p = self.dir().join(name);
        mkdir_mode(&p, 0o755);
        if owner == As::PgUser {
            chown(&p, self.uid, self.gid);
        }
        p
    }

    /// The environment a pgvault process gets besides the repo's: a home of
    /// its own, so the local catalog is per test and per OS user.
    pub fn base_env(&self, who: As) -> Vec<(String, String)> {
        let home = match who {
            As::Root => &self.home_root,
            As::PgUser => &self.home_pg,
        };
        let home = home.display().to_string();
        vec![
            ("HOME".into(), home.clone()),
            ("XDG_CACHE_HOME".into(), format!("{home}/.cache")),
            ("XDG_DATA_HOME".into(), format!("{home}/.local/share")),
            ("XDG_STATE_HOME".into(), format!("{home}/.local/state")),
            ("XDG_CONFIG_HOME".into(), format!("{home}/.config")),
            ("NO_COLOR".into(), "1".into()),
        ]
    }

    /// A local-directory repository owned by the postgres user (its
    /// archive_command writes there).
    pub fn local_repo(&self, stanza: &str) -> Repo {
        let path = self.mkdir(&format!("repo-{}", unique()), As::PgUser);
        Repo {
            url: path.display().to_string(),
            stanza: stanza.into(),
            env: Vec::new(),
            local: Some(path),
        }
    }

    /// A repository under a unique prefix of `server`'s test bucket.
    pub fn s3_repo(&self, server: &S3Server, stanza: &str) -> Repo {
        // Unique across runs too: the servers may outlive one test process.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let prefix = format!("it-{}-{nanos}-{}", std::process::id(), unique());
        Repo {
            url: format!("s3://{}/{prefix}", server.bucket),
            stanza: stanza.into(),
            env: server.env(),
            local: None,
        }
    }

    /// Run the pgvault binary to completion.
    pub fn pgvault(&self, who: As, args: &[&str], env: &[(String, String)], cwd: &Path) -> Run {
        let child = self.spawn_pgvault(who, args, env, cwd);
        finish(child, PGVAULT_TIMEOUT)
    }

    /// Start the pgvault binary (for races); collect with [`finish`].
    pub fn spawn_pgvault(
        &self,
        who: As,
        args: &[&str],
        env: &[(String, String)],
        cwd: &Path,
    ) -> Spawned {
        let mut all = self.base_env(who);
        all.extend(env.iter().cloned());
        let mut argv: Vec<OsString> = vec![self.bin.clone().into()];
        argv.extend(args.iter().map(OsString::from));
        self.spawn(who, &argv, &all, cwd)
    }

    /// Start any program as `who` with exactly `env` on top of a cleaned
    /// environment (no PGVAULT_* or AWS_* leaks from the test process).
    pub fn spawn(
        &self,
        who: As,
        argv: &[OsString],
        env: &[(String, String)],
        cwd: &Path,
    ) -> Spawned {
        let what = describe(argv, env, who);
        let mut cmd = match who {
            As::Root => {
                let mut c = Command::new(&argv[0]);
                c.args(&argv[1..]);
                c.envs(env.iter().map(|(k, v)| (k, v)));
                c
            }
            As::PgUser => {
                // runuser keeps the environment (except HOME, SHELL, USER,
                // LOGNAME); `env` then sets ours for the program.
                let mut c = Command::new("runuser");
                c.args(["-u", &self.user, "--", "env"]);
                c.args(env.iter().map(|(k, v)| format!("{k}={v}")));
                c.args(argv);
                c
            }
        };
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            if k.starts_with("PGVAULT_") || k.starts_with("AWS_") || k.starts_with("PG") {
                cmd.env_remove(&k);
            }
        }
        cmd.current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
        Spawned {
            child,
            what,
            started: Instant::now(),
        }
    }

    /// Run any program as `who` and panic unless it succeeds; returns stdout.
    #[track_caller]
    pub fn run_ok(&self, who: As, argv: &[&str], env: &[(String, String)], cwd: &Path) -> String {
        let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
        let run = finish(self.spawn(who, &argv, env, cwd), Duration::from_secs(600));
        run.ok();
        run.stdout
    }

    pub fn pg(&self, tool: &str) -> String {
        self.pgbin.join(tool).display().to_string()
    }
}

/// A started process.
pub struct Spawned {
    child: Child,
    what: String,
    started: Instant,
}

/// Wait for a started process (killing it after `timeout`) and collect its
/// output.
pub fn finish(spawned: Spawned, timeout: Duration) -> Run {
    let Spawned {
        mut child,
        what,
        started,
    } = spawned;
    let mut out = child.stdout.take().expect("stdout is piped");
    let mut err = child.stderr.take().expect("stderr is piped");
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let (tx, rx) = mpsc::channel();
    let pid = child.id();
    let waiter = std::thread::spawn(move || {
        let status = child.wait();
        let _ = tx.send(());
        status
    });
    if rx.recv_timeout(timeout).is_err() {
        // runuser forwards SIGTERM to its child; SIGKILL as a last resort.
        let _ = Command::new("kill").arg(pid.to_string()).status();
        std::thread::sleep(Duration::from_secs(2));
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        panic!("`{what}` did not finish within {timeout:?}; killed it");
    }
    let status = waiter
        .join()
        .expect("waiter thread")
        .expect("wait for child");
    let stdout = String::from_utf8_lossy(&t_out.join().expect("stdout reader")).into_owned();
    let stderr = String::from_utf8_lossy(&t_err.join().expect("stderr reader")).into_owned();
    Run {
        code: status.code(),
        status,
        stdout,
        stderr,
        elapsed: started.elapsed(),
        what,
    }
}

fn describe(argv: &[OsString], env: &[(String, String)], who: As) -> String {
    let mut s = String::new();
    if who == As::PgUser {
        s.push_str("(as postgres user) ");
    }
    for (k, v) in env {
        if k.starts_with("AWS_") || k == "PGVAULT_REPO" || k == "PGVAULT_STANZA" {
            let v = if k.contains("SECRET") { "***" } else { v };
            let _ = write!(s, "{k}={v} ");
        }
    }
    for a in argv {
        s.push_str(&a.to_string_lossy());
        s.push(' ');
    }
    s.trim_end().to_string()
}

impl S3Server {
    /// What a pgvault process needs to reach this server (the names
    /// object_store reads).
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT".into(), self.endpoint.clone()),
            ("AWS_ALLOW_HTTP".into(), "true".into()),
            ("AWS_ACCESS_KEY_ID".into(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key.clone()),
            ("AWS_REGION".into(), self.region.clone()),
        ]
    }
}

/// A repository and stanza as pgvault sees them.
#[derive(Clone, Debug)]
pub struct Repo {
    /// What goes to `--repo`.
    pub url: String,
    pub stanza: String,
    /// Environment a pgvault process needs for this repo (AWS_* for S3).
    pub env: Vec<(String, String)>,
    /// The directory, for a local repository.
    pub local: Option<PathBuf>,
}

impl Repo {
    /// `--repo URL --stanza NAME`.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--repo".into(),
            self.url.clone(),
            "--stanza".into(),
            self.stanza.clone(),
        ]
    }

    /// The same repo under another stanza name.
    pub fn with_stanza(&self, stanza: &str) -> Repo {
        Repo {
            stanza: stanza.into(),
            ..self.clone()
        }
    }

    /// `archive_command` value (unquoted) for this repo.
    pub fn archive_command(&self, bin: &Path) -> String {
        format!(
            "{} --repo {} --stanza {} archive-push %p",
            bin.display(),
            self.url,
            self.stanza
        )
    }

    /// Run pgvault with this repo's options in front of `args`.
    pub fn run(&self, env: &TestEnv, who: As, args: &[&str], cwd: &Path) -> Run {
        let mut all: Vec<String> = self.args();
        all.extend(args.iter().map(|s| s.to_string()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        env.pgvault(who, &all, &self.env, cwd)
    }

    /// The stored object for WAL file `name` in a local repository:
    /// `<repo>/<stanza>/archive/**/<name>-<sha256>.zst`.
    pub fn local_wal_objects(&self, name: &str) -> Vec<PathBuf> {
        let root = self
            .local
            .as_ref()
            .expect("local_wal_objects needs a local repo")
            .join(&self.stanza)
            .join("archive");
        let mut found = Vec::new();
        walk(&root, &mut |p| {
            let fname = p.file_name().unwrap_or_default().to_string_lossy();
            if fname.starts_with(&format!("{name}-")) && fname.ends_with(".zst") {
                found.push(p.to_path_buf());
            }
        });
        found
    }
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, f);
        } else {
            f(&p);
        }
    }
}

/// A temporary directory under /tmp that the postgres user can traverse,
/// removed on drop unless PGVAULT_TEST_KEEP=1.
pub struct Scratch {
    dir: Option<tempfile::TempDir>,
}

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix(&format!("pgvault-it-{tag}-"))
            .tempdir_in("/tmp")
            .expect("create a temp dir under /tmp");
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod tmp");
        Scratch { dir: Some(dir) }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("scratch dir present").path()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if keep() {
            if let Some(d) = self.dir.take() {
                eprintln!("PGVAULT_TEST_KEEP: kept {}", d.keep().display());
            }
        }
    }
}

fn keep() -> bool {
    std::env::var("PGVAULT_TEST_KEEP").is_ok_and(|v| v == "1")
}

/// A process-wide counter for unique names.
pub fn unique() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn id_of(user: &str, flag: &str) -> u32 {
    let out = Command::new("id")
        .args([flag, user])
        .output()
        .expect("run id");
    assert!(
        out.status.success(),
        "no OS user {user:?} (run scripts/test.sh, or `useradd --system --create-home {user}`)"
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("numeric id")
}

pub fn mkdir_mode(p: &Path, mode: u32) {
    fs::create_dir_all(p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", p.display()));
}

pub fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

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
    uid: u32,
    gid: u32,
    scratch: Scratch,
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
            uid: env.uid,
            gid: env.gid,
            scratch,
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

    pub fn log_path(&self) -> &Path {
        &self.log
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
            let mut env = vec![("PGVAULT_TEST_CLUSTER".to_string(), "1".to_string())];
            env.extend(extra.iter().cloned());
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
            let run = finish(self.spawn_pg(&argv, &env), Duration::from_secs(120));
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
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", &self.user, "--", "env"]);
        cmd.args(env.iter().map(|(k, v)| format!("{k}={v}")));
        cmd.args(argv);
        for (k, _) in std::env::vars_os() {
            let k = k.to_string_lossy().into_owned();
            if k.starts_with("PGVAULT_") || k.starts_with("AWS_") || k.starts_with("PG") {
                cmd.env_remove(&k);
            }
        }
        cmd.current_dir(&self.sockdir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = describe(argv, env, As::PgUser);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
        Spawned {
            child,
            what,
            started: Instant::now(),
        }
    }

    fn pg(&self, tool: &str) -> String {
        self.pgbin.join(tool).display().to_string()
    }

    /// `pg_ctl -m fast stop` (a clean shutdown).
    pub fn stop(&mut self) {
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
            "fast".into(),
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

// ---------------------------------------------------------------------------
// WAL names (independent of the crate on purpose: the tests check the
// binary against PostgreSQL, not against its own code).

/// Split a 24-hex-digit segment name into (timeline, segment number).
pub fn parse_segment(name: &str, seg_size: u64) -> (u32, u64) {
    assert_eq!(name.len(), 24, "not a segment name: {name}");
    let tli = u32::from_str_radix(&name[0..8], 16).expect("hex timeline");
    let log = u64::from_str_radix(&name[8..16], 16).expect("hex log");
    let seg = u64::from_str_radix(&name[16..24], 16).expect("hex seg");
    (tli, log * segs_per_xlogid(seg_size) + seg)
}

/// `XLogFileName` (xlog_internal.h).
pub fn segment_name(tli: u32, segno: u64, seg_size: u64) -> String {
    let per = segs_per_xlogid(seg_size);
    format!("{tli:08X}{:08X}{:08X}", segno / per, segno % per)
}

fn segs_per_xlogid(seg_size: u64) -> u64 {
    0x1_0000_0000 / seg_size
}

/// Every segment name from `first` to `last`, inclusive.
pub fn segment_range(first: &str, last: &str, seg_size: u64) -> Vec<String> {
    let (t1, a) = parse_segment(first, seg_size);
    let (t2, b) = parse_segment(last, seg_size);
    assert_eq!(t1, t2, "segment_range across timelines");
    (a..=b).map(|n| segment_name(t1, n, seg_size)).collect()
}

/// Deterministic pseudo-random bytes (xorshift64*), no extra crates.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Assert two files are byte-identical without printing megabytes.
#[track_caller]
pub fn assert_same_file(expected: &Path, actual: &Path) {
    let a = fs::read(expected).unwrap_or_else(|e| panic!("read {}: {e}", expected.display()));
    let b = fs::read(actual).unwrap_or_else(|e| panic!("read {}: {e}", actual.display()));
    if a != b {
        let first = a.iter().zip(&b).position(|(x, y)| x != y);
        panic!(
            "{} differs from {}: sizes {} vs {}, first difference at {:?}",
            actual.display(),
            expected.display(),
            b.len(),
            a.len(),
            first
        );
    }
}
