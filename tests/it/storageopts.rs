//! The storage options a cloud DBA sets (issue 11, docs/cloud.md), against
//! moto and servers started by the tests themselves: the storage class of
//! each kind of object as moto recorded it, a request timeout against a
//! listener that never answers, a proxy that counts what goes through it,
//! and the bandwidth limit's lower bound (never an upper bound on speed).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgvault::repo::backend::Backend;
use pgvault::repo::s3::{S3Backend, S3Options};
use pgvault::repo::PutMode;

use crate::backends::{moto_head, require, runtime, server_options};
use crate::common::{backup_run, As, Cluster, Repo, S3Server, TestEnv};

/// The prefix of an `s3://bucket/prefix` repository URL.
fn prefix_of(repo: &Repo) -> String {
    let rest = repo.url.trim_start_matches("s3://");
    rest.split_once('/')
        .map(|(_, p)| p)
        .unwrap_or("")
        .to_string()
}

fn with_env(repo: &Repo, vars: &[(&str, &str)]) -> Repo {
    let mut r = repo.clone();
    r.env
        .extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    r
}

/// `x-amz-storage-class` as moto answers a HEAD of `key` (it leaves the
/// header out for STANDARD).
fn recorded_class(server: &S3Server, prefix: &str, key: &str) -> String {
    let head = moto_head(server, &format!("{prefix}/{key}"));
    assert!(head.starts_with("http/1.1 200"), "{key}: {head}");
    head.lines()
        .find_map(|l| l.strip_prefix("x-amz-storage-class: "))
        .map(|v| v.trim().to_ascii_uppercase())
        .unwrap_or_else(|| "STANDARD".into())
}

#[test]
fn a_real_backup_sends_each_kind_its_class_under_the_bandwidth_limit() {
    let env = TestEnv::new();
    let Some(server) = require(env.moto.clone(), "PGVAULT_TEST_MOTO") else {
        return;
    };
    let repo = with_env(
        &env.s3_repo(&server, "main"),
        &[
            ("PGVAULT_STORAGE_CLASS", "STANDARD_IA"),
            ("PGVAULT_STORAGE_CLASS_WAL", "ONEZONE_IA"),
            ("PGVAULT_STORAGE_CLASS_BACKUP", "GLACIER_IR"),
            ("PGVAULT_STORAGE_BANDWIDTH_LIMIT", "2M"),
        ],
    );
    // archive_command inherits the variables: WAL goes through the same
    // options as the backup.
    let pg = Cluster::archiving(&env, &repo, false);
    // A relation file that stays over 16 MiB compressed: stored by a
    // multipart upload, whose class is set when the upload is created.
    pg.psql(
        "create table noise as select md5(random()::text) || md5(random()::text) || \
         md5(random()::text) as t from generate_series(1, 300000)",
    );
    let run = backup_run(&env, &repo, &pg);
    run.ok();

    let prefix = prefix_of(&repo);
    let b = S3Backend::new(&server.bucket, &prefix, &server_options(&server)).expect("a backend");
    let objects = runtime().block_on(b.list("")).expect("list the repository");
    let (mut wal, mut backups, mut meta, mut large) = (0, 0, 0, 0);
    for o in &objects {
        let want = if o.key.starts_with("main/archive/") {
            wal += 1;
            "ONEZONE_IA"
        } else if o.key.starts_with("main/backup/") {
            backups += 1;
            if o.size > 16 << 20 {
                large += 1;
            }
            "GLACIER_IR"
        } else {
            meta += 1;
            "STANDARD_IA"
        };
        assert_eq!(recorded_class(&server, &prefix, &o.key), want, "{}", o.key);
    }
    assert!(wal > 0 && backups > 0 && meta > 0, "{objects:?}");
    assert!(large > 0, "no object went up by multipart: {objects:?}");

    // The backup uploaded at least its own objects through the limit (and
    // its first second's worth at once): a lower bound on its time.
    let uploaded: u64 = objects
        .iter()
        .filter(|o| o.key.starts_with("main/backup/"))
        .map(|o| o.size)
        .sum();
    let rate = 2u64 << 20;
    let bound = Duration::from_secs_f64(uploaded.saturating_sub(rate) as f64 / rate as f64);
    eprintln!(
        "backup of {uploaded} bytes under 2 MiB/s took {:?} (at least {bound:?})",
        run.elapsed
    );
    assert!(run.elapsed >= bound, "{:?} < {bound:?}", run.elapsed);
}

#[test]
fn an_unreadable_storage_class_is_refused_before_anything_is_written() {
    let env = TestEnv::new();
    let Some(server) = require(env.moto.clone(), "PGVAULT_TEST_MOTO") else {
        return;
    };
    let repo = env.s3_repo(&server, "main");
    let run = repo.run(
        &env,
        As::PgUser,
        &["info", "--storage-class-backup", "DEEP_ARCHIVE"],
        env.dir(),
    );
    run.expect_code(2)
        .expect_one_error_line("storage-class-backup = \"DEEP_ARCHIVE\"");
    assert!(run.stderr.contains("hint:"), "{}", run.stderr);
}

// ---------------------------------------------------------------------------
// Timeouts: a listener that accepts and never answers.

/// Accepts connections and holds them open without a byte of answer.
fn start_silent_listener() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("address");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().flatten() {
            held.push(conn);
        }
    });
    format!("http://{addr}")
}

#[test]
fn a_request_without_an_answer_fails_within_the_timeout_naming_the_object() {
    let env = TestEnv::new();
    let endpoint = start_silent_listener();
    let repo = Repo {
        url: "s3://silent/pfx".into(),
        stanza: "main".into(),
        env: vec![
            ("AWS_ENDPOINT".into(), endpoint),
            ("AWS_ALLOW_HTTP".into(), "true".into()),
            ("AWS_ACCESS_KEY_ID".into(), "test".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "test".into()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("PGVAULT_STORAGE_TIMEOUT".into(), "2s".into()),
            ("PGVAULT_STORAGE_RETRIES".into(), "1".into()),
        ],
        local: None,
    };
    let dest = env.dir().join("seg");
    let dest = dest.display().to_string();
    let run = repo.run(
        &env,
        As::Root,
        &["archive-get", "000000010000000000000001", &dest],
        env.dir(),
    );
    // Never "not in the archive" (1): a repository that does not answer is
    // an error that must stop recovery.
    assert_ne!(run.code, Some(0), "{}", run.stderr);
    assert_ne!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("s3://silent/pfx/main/"),
        "the error names the object: {}",
        run.stderr
    );
    assert!(
        run.stderr.contains("operation timed out"),
        "the error says it timed out: {}",
        run.stderr
    );
    assert!(
        run.stderr.contains("hint:") && run.stderr.contains("storage-timeout"),
        "the hint names the option: {}",
        run.stderr
    );
    // Two attempts of 2 s and the back-off between them; the default
    // (60 s, 10 retries) would take minutes.
    assert!(
        run.elapsed < Duration::from_secs(30),
        "took {:?}: storage-timeout was not applied",
        run.elapsed
    );
}

// ---------------------------------------------------------------------------
// The proxy: every request goes through it, but for excluded hosts.

/// A forward HTTP proxy that records the request line (and the
/// `Proxy-Authorization` header) of every request and relays it to the
/// host it names (moto takes the absolute form).
struct CountingProxy {
    url: String,
    seen: Arc<Mutex<Vec<String>>>,
}

impl CountingProxy {
    fn start() -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let log = log.clone();
                std::thread::spawn(move || relay(client, log));
            }
        });
        CountingProxy { url, seen }
    }

    fn requests(&self) -> Vec<String> {
        self.seen.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// Relays one client connection: each request's head is read (its line
/// recorded), its body passed on by Content-Length; answers are piped back.
fn relay(client: TcpStream, log: Arc<Mutex<Vec<String>>>) {
    let mut reader = BufReader::new(client.try_clone().expect("clone the client socket"));
    let mut upstream: Option<TcpStream> = None;
    loop {
        let mut head = Vec::new();
        let mut line = String::new();
        let mut length = 0usize;
        let mut auth = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if lower.starts_with("proxy-authorization:") {
                auth = line.trim_end().to_string();
            }
            head.extend_from_slice(line.as_bytes());
            if line == "\r\n" {
                break;
            }
        }
        // "<request line> | <Proxy-Authorization header, if any>"
        let first = String::from_utf8_lossy(&head)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        if let Ok(mut l) = log.lock() {
            l.push(format!("{first} | {auth}"));
        }
        if upstream.is_none() {
            // "PUT http://127.0.0.1:1234/bucket/key HTTP/1.1": the host.
            let first = String::from_utf8_lossy(&head).to_string();
            let target = first.split_whitespace().nth(1).unwrap_or("");
            let host = target
                .trim_start_matches("http://")
                .split('/')
                .next()
                .unwrap_or("");
            let Ok(up) = TcpStream::connect(host) else {
                return;
            };
            let mut back = up.try_clone().expect("clone the upstream socket");
            let mut to_client = client.try_clone().expect("clone the client socket");
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut back, &mut to_client);
                let _ = to_client.shutdown(Shutdown::Both);
            });
            upstream = Some(up);
        }
        let Some(up) = upstream.as_mut() else { return };
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err()
            || up.write_all(&head).is_err()
            || up.write_all(&body).is_err()
        {
            return;
        }
    }
}

#[test]
fn requests_go_through_the_proxy_but_for_excluded_hosts() {
    let env = TestEnv::new();
    let Some(server) = require(env.moto.clone(), "PGVAULT_TEST_MOTO") else {
        return;
    };
    let proxy = CountingProxy::start();
    let repo = env.s3_repo(&server, "main");
    let direct = repo.run(&env, As::Root, &["info", "--output", "json"], env.dir());

    // The file or the environment only: a proxy URL may hold a password,
    // which goes to the proxy as basic authentication.
    let with_login = proxy.url.replace("http://", "http://pgv:pw@");
    let repo = with_env(&repo, &[("PGVAULT_STORAGE_PROXY", &with_login)]);
    let proxied = repo.run(&env, As::Root, &["info", "--output", "json"], env.dir());
    assert_eq!(proxied.code, direct.code, "{}", proxied.stderr);
    let seen = proxy.requests();
    let moto = server.endpoint.trim_end_matches('/');
    assert!(!seen.is_empty(), "no request went through the proxy");
    for l in &seen {
        // The absolute form: the request was sent to a proxy, for moto.
        assert!(
            l.contains(&format!(" {moto}/{}", server.bucket)),
            "{l} (moto at {moto})"
        );
        // base64 of "pgv:pw".
        assert!(l.ends_with("Basic cGd2OnB3"), "{l}: no proxy login");
    }

    let before = seen.len();
    let host = moto.trim_start_matches("http://");
    let host = host.split(':').next().unwrap_or(host);
    let excluded = repo.run(
        &env,
        As::Root,
        &["info", "--output", "json", "--storage-proxy-excludes", host],
        env.dir(),
    );
    assert_eq!(excluded.code, direct.code, "{}", excluded.stderr);
    assert_eq!(
        proxy.requests().len(),
        before,
        "a request for an excluded host went through the proxy"
    );
}

// ---------------------------------------------------------------------------
// The bandwidth limit: a lower bound on the time a transfer takes.

const MIB: usize = 1 << 20;

/// Writes three objects of `size` bytes with three workers at once, then
/// reads them back streamed, each through a fresh backend built from
/// `opts`; how long each half took.
fn write_then_read(server: &S3Server, opts: &S3Options, size: usize) -> (Duration, Duration) {
    let prefix = format!("bw-{}-{}", std::process::id(), crate::common::unique());
    let rt = runtime();
    let b = Arc::new(S3Backend::new(&server.bucket, &prefix, opts).expect("a backend"));
    let started = Instant::now();
    rt.block_on(async {
        let mut workers = tokio::task::JoinSet::new();
        for i in 0..3u64 {
            let b = b.clone();
            workers.spawn(async move {
                let data = crate::common::pseudo_random_bytes(size, i);
                b.put_bytes(&format!("obj{i}"), data, PutMode::Overwrite)
                    .await
                    .expect("put")
            });
        }
        while let Some(r) = workers.join_next().await {
            r.expect("a worker");
        }
    });
    let wrote = started.elapsed();

    // A fresh backend: its bucket starts full, as a new command's does.
    let b = Arc::new(S3Backend::new(&server.bucket, &prefix, opts).expect("a backend"));
    let started = Instant::now();
    let total: usize = rt.block_on(async {
        let mut workers = tokio::task::JoinSet::new();
        for i in 0..3u64 {
            let b = b.clone();
            workers.spawn(async move {
                let raw = b
                    .open(&format!("obj{i}"), 0, None)
                    .await
                    .expect("open")
                    .expect("the object is there");
                let mut reader = raw.reader;
                tokio::task::spawn_blocking(move || {
                    let mut n = 0;
                    let mut buf = vec![0u8; 64 << 10];
                    loop {
                        let k = reader.read(&mut buf).expect("read");
                        if k == 0 {
                            return n;
                        }
                        n += k;
                    }
                })
                .await
                .expect("the reader")
            });
        }
        let mut total = 0;
        while let Some(r) = workers.join_next().await {
            total += r.expect("a worker");
        }
        total
    });
    assert_eq!(total, 3 * size);
    (wrote, started.elapsed())
}

#[test]
fn the_bandwidth_limit_bounds_writes_and_reads_of_all_workers_together() {
    let env = TestEnv::new();
    let Some(server) = require(env.moto.clone(), "PGVAULT_TEST_MOTO") else {
        return;
    };
    // For the log only (never asserted): the same transfers unlimited.
    let free = write_then_read(&server, &server_options(&server), MIB);
    eprintln!(
        "3 MiB without a limit: written in {:?}, read in {:?}",
        free.0, free.1
    );

    // 3 MiB through 512 KiB/s, one second's worth allowed at once: at
    // least 5 s each way, whichever of the three workers moves what.
    let limited = S3Options {
        bandwidth_limit: Some(512 << 10),
        ..server_options(&server)
    };
    let (wrote, read) = write_then_read(&server, &limited, MIB);
    eprintln!("3 MiB under 512 KiB/s: written in {wrote:?}, read in {read:?}");
    let bound = Duration::from_millis(4900);
    assert!(
        wrote >= bound,
        "3 MiB written in {wrote:?} under a 512 KiB/s limit"
    );
    assert!(
        read >= bound,
        "3 MiB read in {read:?} under a 512 KiB/s limit"
    );
}

// ---------------------------------------------------------------------------
// Azure access tiers, as Azurite recorded them.

/// HMAC-SHA256 (RFC 2104) over sha2, which pgvault already depends on.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .to_vec()
}

/// `x-ms-access-tier` of blob `container/name` as Azurite answers a Get
/// Blob Properties signed with the account key (Shared Key, as
/// object_store signs for the emulator's path-style URLs).
fn azurite_tier(server: &S3Server, name: &str) -> String {
    use crate::common::{AZURITE_ACCOUNT, AZURITE_KEY};
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let url = server.endpoint.trim_end_matches('/');
    let hostport = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap_or("");
    let path = format!("/{AZURITE_ACCOUNT}/{}/{name}", server.bucket);
    let date = chrono::Utc::now()
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    let version = "2021-08-06";
    let to_sign = format!(
        "HEAD\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{AZURITE_ACCOUNT}{path}"
    );
    let key = b64
        .decode(AZURITE_KEY)
        .expect("the published key is base64");
    let sig = b64.encode(hmac_sha256(&key, to_sign.as_bytes()));
    let mut conn = TcpStream::connect(hostport).expect("connect to Azurite");
    write!(
        conn,
        "HEAD {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\
         x-ms-date: {date}\r\nx-ms-version: {version}\r\n\
         Authorization: SharedKey {AZURITE_ACCOUNT}:{sig}\r\n\r\n"
    )
    .expect("send a HEAD to Azurite");
    let mut answer = String::new();
    conn.read_to_string(&mut answer)
        .expect("read Azurite's answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{name}: {answer}");
    answer
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-ms-access-tier")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("{name}: no x-ms-access-tier in {answer}"))
}

#[test]
fn azure_access_tier_of_each_kind_of_object_is_sent() {
    let env = TestEnv::new();
    let Some(server) = require(env.azurite.clone(), "PGVAULT_TEST_AZURITE") else {
        return;
    };
    let prefix = format!("tier-{}-{}", std::process::id(), crate::common::unique());
    let opts = S3Options {
        storage_class: pgvault::repo::storeopts::StorageClasses {
            default: Some("Cool".into()),
            wal: Some("Hot".into()),
            backup: Some("Cold".into()),
        },
        ..server_options(&server)
    };
    let b = S3Backend::azure(None, &server.bucket, &prefix, &opts).expect("an Azure backend");
    let wal = "main/archive/15-1/0000000100000000/000000010000000000000001-ab.zst";
    let small = "main/backup/20260101-000000F/data/0-1.pgv";
    let large = "main/backup/20260101-000000F/data/0-2.pgv";
    runtime().block_on(async {
        for key in [wal, small, "main/stanza.pgv"] {
            b.put_bytes(key, b"bytes".to_vec(), PutMode::Overwrite)
                .await
                .expect("put");
        }
        // Past the spool's memory limit: a block-list upload.
        let mut spool = b.spool("main/backup").expect("a spool");
        let data = crate::common::pseudo_random_bytes(17 * MIB, 3);
        let mut spool = tokio::task::spawn_blocking(move || {
            spool.write_all(&data).expect("spool");
            spool
        })
        .await
        .expect("the spooling thread");
        spool.flush().expect("flush the spool");
        b.commit(spool, large, PutMode::Overwrite)
            .await
            .expect("commit");
    });
    assert_eq!(azurite_tier(&server, &format!("{prefix}/{wal}")), "Hot");
    assert_eq!(azurite_tier(&server, &format!("{prefix}/{small}")), "Cold");
    assert_eq!(azurite_tier(&server, &format!("{prefix}/{large}")), "Cold");
    assert_eq!(
        azurite_tier(&server, &format!("{prefix}/main/stanza.pgv")),
        "Cool"
    );
}
