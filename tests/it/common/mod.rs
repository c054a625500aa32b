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
//! - `PGVAULT_TEST_AZURITE` Azurite's blob URL with its account
//!   (`http://127.0.0.1:PORT/devstoreaccount1`), used like the S3 servers
//! - `PGVAULT_TEST_AWS_ACCESS_KEY_ID`, `PGVAULT_TEST_AWS_SECRET_ACCESS_KEY`,
//!   `PGVAULT_TEST_AWS_REGION`, `PGVAULT_TEST_BUCKET`  credentials both servers accept
//! - `PGVAULT_TEST_MOTO_PY`  the Python that runs moto, for tests that start
//!   (and kill) a moto of their own ([`OwnMoto`])
//! - `PGVAULT_TEST_PYTHON` a python3 that can import `prometheus_client`
//!   (default `python3`)
//! - `PGVAULT_TEST_KEEP=1` keeps temporary directories for a post-mortem.
//!
//! PostgreSQL refuses to run as root, so the tests (run as root) start it
//! with `runuser -u <user> --`. Everything the postgres user must read or
//! write lives under `/tmp` with permissions it can traverse; the `pgvault`
//! binary is copied there too, because the cargo target directory may sit
//! under a path that user cannot reach.

mod cases;
mod cluster;
mod crash;
mod moto;
mod node;
mod objects;
mod process;
mod spool;
mod wal;

pub use cases::{panic_message, Cases};
pub use cluster::{backup, backup_args, backup_run, damage_page, stanza_create, Cluster, InitOpts};
pub use crash::*;
pub use moto::OwnMoto;
pub use node::{Node, RECOVERY_TIMEOUT};
pub use objects::{backup_files, decode_envelope, encode_envelope, try_decode_envelope};
pub use process::{
    children_of, finish, finish_timed, spawn_as, As, Run, Running, Spawned, PGVAULT_TIMEOUT,
};
pub use spool::*;
pub use wal::{assert_same_file, parse_segment, pseudo_random_bytes, segment_name, segment_range};

use std::ffi::OsString;
use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Which cloud's API a test server speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cloud {
    S3,
    Azure,
}

/// Azurite's built-in account and its published key.
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// One object-store server the tests may use (an S3-API server, or the
/// Azure emulator).
#[derive(Clone, Debug)]
pub struct S3Server {
    pub name: &'static str,
    pub cloud: Cloud,
    pub endpoint: String,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
    pub bucket: String,
    /// Whether the store's conditional create (`If-None-Match: *`) is atomic
    /// under races. Neither test server's is: s3s-fs checks it but not
    /// atomically, and moto 5 looks the key up and then stores it with no
    /// lock between (two racing conditional PUTs both succeed, seen in
    /// about one round in ten under load). pgvault is told so
    /// (`s3-atomic-create = false`), as a user of such a store must.
    pub atomic_create: bool,
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
    pub azurite: Option<S3Server>,
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
        let server = |name: &'static str, cloud: Cloud, var: &str, atomic_create: bool| {
            std::env::var(var)
                .ok()
                .filter(|v| !v.is_empty())
                .map(|endpoint| S3Server {
                    name,
                    cloud,
                    endpoint,
                    access_key: cred("AWS_ACCESS_KEY_ID", "pgvault-test-key"),
                    secret_key: cred("AWS_SECRET_ACCESS_KEY", "pgvault-test-secret"),
                    region: cred("AWS_REGION", "us-east-1"),
                    bucket: std::env::var("PGVAULT_TEST_BUCKET")
                        .unwrap_or_else(|_| "pgvault-test".into()),
                    atomic_create,
                })
        };
        let moto = server("moto", Cloud::S3, "PGVAULT_TEST_MOTO", false);
        let s3sfs = server("s3s-fs", Cloud::S3, "PGVAULT_TEST_S3SFS", false);
        // Azurite's conditional writes are atomic (measured, docs/testing.md).
        let azurite = server("azurite", Cloud::Azure, "PGVAULT_TEST_AZURITE", true);

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
            azurite,
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
            url: server.url(&prefix),
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

    /// Start any program as `who` (see [`spawn_as`]).
    pub fn spawn(
        &self,
        who: As,
        argv: &[OsString],
        env: &[(String, String)],
        cwd: &Path,
    ) -> Spawned {
        let user = match who {
            As::Root => None,
            As::PgUser => Some(self.user.as_str()),
        };
        spawn_as(user, argv, env, cwd)
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

impl S3Server {
    /// What a pgvault process needs to reach this server (the names
    /// object_store reads).
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = match self.cloud {
            Cloud::S3 => self.s3_env(),
            Cloud::Azure => vec![
                ("PGVAULT_AZURE_ENDPOINT".into(), self.endpoint.clone()),
                ("PGVAULT_AZURE_ACCOUNT".into(), AZURITE_ACCOUNT.into()),
                ("PGVAULT_AZURE_KEY".into(), AZURITE_KEY.into()),
                // Azurite stops answering after a blob batch (docs/testing.md).
                ("PGVAULT_AZURE_BULK_DELETE".into(), "false".into()),
            ],
        };
        if !self.atomic_create {
            env.push(("PGVAULT_S3_ATOMIC_CREATE".into(), "false".into()));
        }
        env
    }

    /// The repository URL of `prefix` in the test bucket (or container).
    pub fn url(&self, prefix: &str) -> String {
        let scheme = match self.cloud {
            Cloud::S3 => "s3",
            Cloud::Azure => "az",
        };
        format!("{scheme}://{}/{prefix}", self.bucket)
    }

    fn s3_env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT".into(), self.endpoint.clone()),
            ("AWS_ALLOW_HTTP".into(), "true".into()),
            ("AWS_ACCESS_KEY_ID".into(), self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), self.secret_key.clone()),
            ("AWS_REGION".into(), self.region.clone()),
        ]
    }
}

/// Whether this run is CI's (`CI=true`), where a missing server or binary
/// is a failure, never a skip.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// `server`, or `None` (the caller skips, saying so) when its variable
/// `var` is unset — which under CI fails the test instead.
#[track_caller]
pub fn require_server(server: Option<S3Server>, var: &str) -> Option<S3Server> {
    require_server_in(server, var, ci())
}

#[track_caller]
fn require_server_in(server: Option<S3Server>, var: &str, ci: bool) -> Option<S3Server> {
    if server.is_none() {
        assert!(
            !ci,
            "{var} is not set: under CI the S3 tests must run (scripts/test.sh starts the servers)"
        );
        eprintln!("skipped: {var} is not set (run scripts/test.sh)");
    }
    server
}

/// Issue 9, defect 5: a server test without its server fails under CI
/// instead of passing as if it had run.
#[test]
fn a_missing_server_fails_under_ci() {
    let r = std::panic::catch_unwind(|| require_server_in(None, "PGVAULT_TEST_MOTO", true));
    let payload = r.expect_err("no server under CI must fail the test");
    let msg = panic_message(&*payload);
    assert!(msg.contains("PGVAULT_TEST_MOTO is not set"), "{msg}");
    assert!(require_server_in(None, "PGVAULT_TEST_MOTO", false).is_none());
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

    /// `<repo>/<stanza>/archive` of a local repository.
    pub fn local_archive(&self) -> PathBuf {
        self.local
            .as_ref()
            .expect("a local repository")
            .join(&self.stanza)
            .join("archive")
    }

    /// `stanza-create` for `pgdata`, as the postgres user; must succeed.
    #[track_caller]
    pub fn stanza_create(&self, env: &TestEnv, pgdata: &Path) {
        let pgdata = pgdata.display().to_string();
        self.run(
            env,
            As::PgUser,
            &["stanza-create", "--pgdata", &pgdata],
            env.dir(),
        )
        .ok();
    }

    /// The stored object for WAL file `name` in a local repository:
    /// `<repo>/<stanza>/archive/**/<name>-<sha256>.zst`.
    pub fn local_wal_objects(&self, name: &str) -> Vec<PathBuf> {
        let mut found = Vec::new();
        walk(&self.local_archive(), &mut |p| {
            let fname = p.file_name().unwrap_or_default().to_string_lossy();
            if fname.starts_with(&format!("{name}-")) && fname.ends_with(".zst") {
                found.push(p.to_path_buf());
            }
        });
        found
    }
}

/// Calls `f` with every file below `dir` (none when it cannot be read).
pub fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
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

pub(crate) fn keep() -> bool {
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
