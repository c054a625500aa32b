//! Backends (issue 9): the conformance suite against moto and s3s-fs, plain
//! and under the fault injector; the real binary under `PGVAULT_FAULTS`; the
//! stanza lock against a real `pgvault backup` paused with SIGSTOP past its
//! expiry; who owns what a local repository holds.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgvault::repo::azure::AzureOptions;
use pgvault::repo::backend::Backend;
use pgvault::repo::conformance::{self, Suite};
use pgvault::repo::fault::{FaultBackend, FaultConfig};
use pgvault::repo::s3::{S3Backend, S3Options, Sse};
use pgvault::repo::PutMode;
use serde_json::Value;

use crate::common::{
    assert_same_file, finish, As, Cloud, Cluster, InitOpts, Repo, S3Server, Spawned, TestEnv,
    AZURITE_ACCOUNT, AZURITE_KEY,
};

pub(crate) use crate::common::require_server as require;

/// A backend on `server`. Conditional writes are taken as not atomic on
/// both test servers: s3s-fs checks them non-atomically, and so does moto
/// (5.2: `put_object` looks the key up, then stores, with no lock between —
/// two of 16 racing creates have been seen to both succeed). The suite then
/// checks the read-back that such stores get; real S3 is atomic.
pub(crate) fn s3_backend(server: &S3Server) -> Arc<dyn Backend> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let prefix = format!("conformance-{}-{nanos}", std::process::id());
    let opts = server_options(server);
    let backend = match server.cloud {
        Cloud::S3 => S3Backend::new(&server.bucket, &prefix, &opts),
        Cloud::Azure => S3Backend::azure(None, &server.bucket, &prefix, &opts),
    };
    Arc::new(backend.expect("an object-store backend"))
}

/// What a backend on `server` needs (its endpoint and credentials).
pub(crate) fn server_options(server: &S3Server) -> S3Options {
    S3Options {
        endpoint: Some(server.endpoint.clone()),
        region: Some(server.region.clone()),
        access_key_id: Some(server.access_key.clone()),
        secret_access_key: Some(server.secret_key.clone()),
        allow_http: Some(true),
        atomic_create: server.atomic_create,
        retry_timeout: Duration::from_secs(60),
        azure: AzureOptions {
            account: Some(AZURITE_ACCOUNT.into()),
            access_key: Some(AZURITE_KEY.into()),
            endpoint: Some(server.endpoint.clone()),
            bulk_delete: false,
        },
        ..Default::default()
    }
}

pub(crate) fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

pub(crate) fn conformance_on(server: &S3Server) {
    runtime().block_on(conformance::run(
        s3_backend(server),
        "suite",
        Suite::default(),
    ));
}

/// The faults every backend must survive: 5xx answers, resets (some after
/// the store applied a write), timeouts, cut bodies, slow requests, and
/// writes missing from listings for a while.
const FAULTS: &str = "error=0.15,reset=0.1,timeout=0.05,timeout_ms=100,truncate=0.3,\
                      slow=0.05,slow_ms=20,hide=0.2,hide_ms=300,attempts=10";

pub(crate) fn conformance_under_faults_on(server: &S3Server, seed: u64) {
    let config = FaultConfig::parse(&format!("seed={seed},{FAULTS}")).expect("fault config");
    let faulty = FaultBackend::new(s3_backend(server), config);
    runtime().block_on(conformance::run(
        Arc::new(faulty.clone()),
        "suite",
        Suite {
            faulty: true,
            many: 1100,
            racers: 16,
        },
    ));
    let n = faulty.counts();
    eprintln!("{}: faults injected {n:?}", server.name);
    assert!(
        n.error > 0 && n.reset > 0 && n.truncate > 0 && n.hide > 0,
        "{n:?}"
    );
}

#[test]
fn conformance_moto() {
    let env = TestEnv::new();
    if let Some(s) = require(env.moto.clone(), "PGVAULT_TEST_MOTO") {
        conformance_on(&s);
    }
}

#[test]
fn conformance_s3sfs() {
    let env = TestEnv::new();
    if let Some(s) = require(env.s3sfs.clone(), "PGVAULT_TEST_S3SFS") {
        conformance_on(&s);
    }
}

#[test]
fn conformance_moto_under_faults() {
    let env = TestEnv::new();
    if let Some(s) = require(env.moto.clone(), "PGVAULT_TEST_MOTO") {
        conformance_under_faults_on(&s, 3);
    }
}

#[test]
fn conformance_s3sfs_under_faults() {
    let env = TestEnv::new();
    if let Some(s) = require(env.s3sfs.clone(), "PGVAULT_TEST_S3SFS") {
        conformance_under_faults_on(&s, 4);
    }
}

// ---------------------------------------------------------------------------
// The real binary under PGVAULT_FAULTS.

fn one_mib() -> InitOpts {
    InitOpts {
        wal_segsize_mb: Some(1),
        data_checksums: false,
    }
}

fn stanza_create(env: &TestEnv, repo: &Repo, who: As, pgdata: &Path) -> crate::common::Run {
    let pgdata = pgdata.display().to_string();
    repo.run(env, who, &["stanza-create", "--pgdata", &pgdata], env.dir())
}

/// Pushes and fetches real WAL through the binary under injected faults:
/// everything arrives byte for byte; when every attempt fails, the error
/// says so (exit 5), and archive-get never answers "not in the archive".
#[test]
fn the_binary_under_faults() {
    let env = TestEnv::new();
    let mut pg = Cluster::init(&env, one_mib());
    pg.start();
    let mut repos = vec![env.local_repo("main")];
    if let Some(s) = require(env.moto.clone(), "PGVAULT_TEST_MOTO") {
        repos.push(env.s3_repo(&s, "main"));
    }
    let segments: Vec<String> = (0..3).map(|_| pg.switch_wal()).collect();
    let wal = pg.wal_dir();
    let out = env.mkdir("fetched", As::PgUser);
    for repo in &repos {
        stanza_create(&env, repo, As::PgUser, pg.pgdata()).ok();
        for (i, seg) in segments.iter().enumerate() {
            let faults = format!(
                "seed={i},error=0.2,reset=0.1,timeout=0.05,timeout_ms=50,truncate=0.4,\
                 hide=0.3,hide_ms=300,attempts=10"
            );
            let mut vars = repo.env.clone();
            vars.push(("PGVAULT_FAULTS".into(), faults));
            let path = wal.join(seg).display().to_string();
            let mut args = repo.args();
            args.extend(["archive-push".into(), path]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            env.pgvault(As::PgUser, &args, &vars, env.dir()).ok();
            let dest = out.join(format!("{seg}-{}", crate::common::unique()));
            let dest_s = dest.display().to_string();
            let mut args = repo.args();
            args.extend(["archive-get".into(), seg.clone(), dest_s]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            env.pgvault(As::PgUser, &args, &vars, env.dir()).ok();
            assert_same_file(&wal.join(seg), &dest);
        }
        // Every attempt fails: a transfer error, never "not archived" (exit
        // 1 would end recovery: see docs/exit-codes.md).
        let mut vars = repo.env.clone();
        vars.push(("PGVAULT_FAULTS".into(), "seed=1,error=1,attempts=3".into()));
        let mut args = repo.args();
        args.extend([
            "archive-get".into(),
            segments[0].clone(),
            out.join("never").display().to_string(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = env.pgvault(As::PgUser, &args, &vars, env.dir());
        run.expect_code(254);
        assert!(
            run.stderr.contains("failed after 3 attempts"),
            "{}",
            run.stderr
        );
        assert!(!out.join("never").exists());
        let mut args = repo.args();
        args.extend([
            "archive-push".into(),
            wal.join(&segments[0]).display().to_string(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        env.pgvault(As::PgUser, &args, &vars, env.dir())
            .expect_code(5);
    }
}

// ---------------------------------------------------------------------------
// The stanza lock against a paused backup.

/// The lock object's JSON in a local repository, if there is a lock.
fn read_lock(repo: &Repo) -> Option<Value> {
    let path = lock_path(repo);
    let bytes = fs::read(path).ok()?;
    use pgvault::repo::codec::{decode_bytes, Binding, Keys};
    // Plaintext: the binding is read only from sealed objects.
    let json = decode_bytes(&bytes, &Keys::none(), Binding::object("")).expect("a lock object");
    Some(serde_json::from_slice(&json).expect("lock JSON"))
}

fn lock_path(repo: &Repo) -> PathBuf {
    let local = repo.local.as_ref().expect("a local repository");
    local.join(&repo.stanza).join("lock").join("stanza.lock")
}

/// The pid in the lock once one appears that is not `not`; `None` after
/// two minutes.
fn lock_holder(repo: &Repo, not: Option<u64>) -> Option<u64> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(120) {
        if let Some(pid) = read_lock(repo).and_then(|l| l["pid"].as_u64()) {
            if Some(pid) != not {
                return Some(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// The pid in the lock taken by `backup`, or a failure with its output.
#[track_caller]
fn holder_or_fail(repo: &Repo, not: Option<u64>, backup: &mut Option<Spawned>) -> u64 {
    match lock_holder(repo, not) {
        Some(pid) => pid,
        None => {
            let run = backup.take().map(|b| finish(b, Duration::from_secs(10)));
            panic!(
                "no lock appeared at {}; the backup: {run:?}",
                lock_path(repo).display()
            )
        }
    }
}

fn signal(sig: &str, pid: u64) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(ok.success(), "kill {sig} {pid}");
}

/// The parent of `pid` (field 4 of /proc/<pid>/stat).
fn parent_of(pid: u64) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// A stopped pgvault and the `runuser` that started it: runuser stops
/// itself when its child stops (as su does) and stays stopped until it is
/// continued, so both are continued — also when the test ends early, so
/// that nothing stays stopped behind it.
struct Stopped {
    pid: u64,
    parent: Option<u64>,
}

impl Stopped {
    fn stop(pid: u64) -> Stopped {
        let parent = parent_of(pid);
        signal("-STOP", pid);
        Stopped { pid, parent }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        for pid in [Some(self.pid), self.parent].into_iter().flatten() {
            let _ = Command::new("kill")
                .args(["-CONT", &pid.to_string()])
                .status();
        }
    }
}

fn spawn_backup(env: &TestEnv, repo: &Repo, pg: &Cluster, extra: &[(String, String)]) -> Spawned {
    let mut args = repo.args();
    args.extend(
        [
            "backup",
            "--type",
            "full",
            "--pgdata",
            &pg.pgdata().display().to_string(),
            "--pg-host",
            &pg.sockdir().display().to_string(),
            "--pg-port",
            &pg.port().to_string(),
            "--start-fast",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vars = repo.env.clone();
    vars.extend(extra.iter().cloned());
    env.spawn_pgvault(As::PgUser, &args, &vars, env.dir())
}

/// Issue 9, defect 2: a backup paused (SIGSTOP) past its lock's expiry,
/// whose lock a second backup took over meanwhile, writes nothing more when
/// it resumes: it exits 9 naming the new holder, leaves no manifest, and
/// the second backup completes.
#[test]
fn a_paused_backup_loses_its_lock_and_writes_nothing_more() {
    let env = TestEnv::new();
    let repo = env.local_repo("main");
    let mut pg = Cluster::init(&env, one_mib());
    stanza_create(&env, &repo, As::PgUser, pg.pgdata()).ok();
    // Archiving held back while `block` exists: a backup then waits for its
    // WAL with its lock held, before it writes its manifest.
    let block = env.dir().join("archiving-held");
    fs::write(&block, b"").expect("create the block file");
    pg.set_conf(&format!(
        "archive_mode = on\narchive_command = 'test ! -e {} && {}'\n",
        block.display(),
        repo.archive_command(env.bin())
    ));
    let mut vars = env.base_env(As::PgUser);
    vars.extend(repo.env.iter().cloned());
    pg.start_with_env(&vars);

    let ttl = 3;
    let mut first = Some(spawn_backup(
        &env,
        &repo,
        &pg,
        &[("PGVAULT_TEST_LOCK_TTL".into(), ttl.to_string())],
    ));
    let a = holder_or_fail(&repo, None, &mut first);
    // Stop it right after a renewal replaced the lock: not in the middle of
    // one, where it would hold the lock directory's flock (a holder frozen
    // there holds up takers until it resumes; see repo/local.rs).
    let before = fs::metadata(lock_path(&repo)).map(|m| m.ino()).ok();
    let start = Instant::now();
    while fs::metadata(lock_path(&repo)).map(|m| m.ino()).ok() == before {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the first backup never renewed its lock"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let stopped = Stopped::stop(a);
    // Past the expiry (whole seconds) with a margin.
    std::thread::sleep(Duration::from_secs(ttl + 3));
    fs::remove_file(&block).expect("release archiving");
    let mut second = Some(spawn_backup(&env, &repo, &pg, &[]));
    let b = holder_or_fail(&repo, Some(a), &mut second);
    drop(stopped);

    let run_a = finish(
        first.take().expect("the first backup"),
        Duration::from_secs(300),
    );
    run_a.expect_code(9);
    assert!(
        run_a.stderr.contains("lost the lock") && run_a.stderr.contains(&format!("pid {b} ")),
        "the paused backup should name its successor (pid {b}):\n{}",
        run_a.stderr
    );
    let run_b = finish(
        second.take().expect("the second backup"),
        Duration::from_secs(300),
    );
    run_b.ok();
    assert!(run_b.stderr.contains("stale lock"), "{}", run_b.stderr);
    let label_b = run_b.stdout.trim().to_string();
    let backups = repo
        .local
        .as_ref()
        .expect("local")
        .join("main")
        .join("backup");
    let mut manifests = Vec::new();
    for e in fs::read_dir(&backups).expect("backups").flatten() {
        if e.path().join("manifest.pgv").exists() {
            manifests.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    assert_eq!(manifests, vec![label_b], "only the second backup completed");
    assert!(read_lock(&repo).is_none(), "the lock was left behind");
}

// ---------------------------------------------------------------------------
// Who owns what a local repository holds (issue 9, defect 12).

/// Every path under `dir` with its owner and mode.
fn owners(dir: &Path) -> Vec<(PathBuf, u32, u32)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).expect("read_dir").flatten() {
            let m = e.metadata().expect("stat");
            if m.is_dir() {
                todo.push(e.path());
            }
            out.push((e.path(), m.uid(), m.permissions().mode() & 0o777));
        }
    }
    out
}

/// A stanza created by root in a repository that belongs to the server's
/// user stays writable by that user's archive_command; everything is
/// owner-only; a permission error says who needs what.
#[test]
fn root_creates_for_the_repository_owner() {
    let env = TestEnv::new();
    let repo = env.local_repo("main");
    let mut pg = Cluster::init(&env, one_mib());
    pg.start();
    stanza_create(&env, &repo, As::Root, pg.pgdata()).ok();
    let seg = pg.switch_wal();
    let path = pg.wal_dir().join(&seg).display().to_string();
    repo.run(&env, As::PgUser, &["archive-push", &path], env.dir())
        .ok();
    let root = repo.local.clone().expect("local");
    for (p, uid, mode) in owners(&root) {
        assert_eq!(uid, env.uid, "{} belongs to uid {uid}", p.display());
        let want = if p.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode, want, "{} has mode {mode:o}", p.display());
    }
    // Someone else's directory in the way: the hint names the users.
    let archive = root.join("main").join("archive");
    std::os::unix::fs::chown(&archive, Some(0), Some(0)).expect("chown to root");
    let seg = pg.switch_wal();
    let path = pg.wal_dir().join(&seg).display().to_string();
    let run = repo.run(&env, As::PgUser, &["archive-push", &path], env.dir());
    run.expect_code(5);
    assert!(run.stderr.contains("Permission denied"), "{}", run.stderr);
    let hint = run
        .stderr_lines()
        .into_iter()
        .find(|l| l.starts_with("hint:"))
        .unwrap_or_else(|| panic!("no hint:\n{}", run.stderr))
        .to_string();
    assert!(
        hint.contains(&format!("runs as {}", env.user)) && hint.contains("belongs to root"),
        "{hint}"
    );
}

/// stanza-create refuses a repository the server's user could not write.
#[test]
fn stanza_create_refuses_a_repository_the_server_cannot_write() {
    let env = TestEnv::new();
    let pg = Cluster::init(&env, one_mib());
    let owned_by_root = env.mkdir("repo-of-root", As::Root);
    let missing = env.dir().join("repo-not-yet");
    for dir in [&owned_by_root, &missing] {
        let repo = Repo {
            url: dir.display().to_string(),
            stanza: "main".into(),
            env: Vec::new(),
            local: Some(dir.clone()),
        };
        let run = stanza_create(&env, &repo, As::Root, pg.pgdata());
        run.expect_code(2);
        run.expect_one_error_line(&dir.display().to_string());
        assert!(
            run.stderr
                .contains("hint: create the repository as the PostgreSQL server's user"),
            "{}",
            run.stderr
        );
        assert!(
            run.stderr
                .contains(&format!("install -d -o {} -m 700", env.user)),
            "{}",
            run.stderr
        );
        let left = fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
        assert_eq!(left, 0, "stanza-create left files in {}", dir.display());
    }
}

// ---------------------------------------------------------------------------
// S3 server-side encryption: the headers are really sent (moto records them).

/// The response headers of a HEAD of `bucket/key` on moto, lower-cased.
/// Moto refuses anonymous reads of a private object but does not check
/// signatures: an Authorization header naming a key is enough.
pub(crate) fn moto_head(server: &S3Server, path: &str) -> String {
    use std::io::{Read, Write};
    let hostport = server
        .endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let mut conn = std::net::TcpStream::connect(hostport).expect("connect to moto");
    write!(
        conn,
        "HEAD /{}/{path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\
         Authorization: AWS4-HMAC-SHA256 Credential={}/20260101/{}/s3/aws4_request, \
         SignedHeaders=host, Signature=0\r\n\r\n",
        server.bucket, server.access_key, server.region
    )
    .expect("send a HEAD to moto");
    let mut answer = String::new();
    conn.read_to_string(&mut answer)
        .expect("read moto's answer");
    answer.to_ascii_lowercase()
}

#[test]
fn s3_server_side_encryption_is_requested() {
    let env = TestEnv::new();
    let Some(server) = require(env.moto.clone(), "PGVAULT_TEST_MOTO") else {
        return;
    };
    let cases = [
        (Sse::None, None),
        (Sse::S3, Some("x-amz-server-side-encryption: aes256")),
        (
            Sse::Kms("pgvault-test-kms-key".into()),
            Some("x-amz-server-side-encryption-aws-kms-key-id: pgvault-test-kms-key"),
        ),
    ];
    for (sse, header) in cases {
        let prefix = format!("sse-{}-{}", std::process::id(), crate::common::unique());
        let opts = S3Options {
            sse: sse.clone(),
            ..server_options(&server)
        };
        let b = S3Backend::new(&server.bucket, &prefix, &opts).expect("an S3 backend");
        runtime().block_on(async {
            b.put_bytes("obj", b"secret rows".to_vec(), PutMode::Overwrite)
                .await
                .expect("put");
        });
        let head = moto_head(&server, &format!("{prefix}/obj"));
        assert!(head.starts_with("http/1.1 200"), "{sse:?}: {head}");
        match header {
            Some(h) => assert!(head.contains(h), "{sse:?}: no {h:?} in {head}"),
            None => assert!(
                !head.contains("x-amz-server-side-encryption"),
                "{sse:?}: {head}"
            ),
        }
    }
}
