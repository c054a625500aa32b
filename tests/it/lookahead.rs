//! Keeping up with the write load (issue 4): look-ahead archive-push and
//! prefetching archive-get against real things — a PostgreSQL 15 cluster
//! with 1 MiB segments, the real `pgvault` binary, and moto behind a
//! bandwidth-limiting TCP proxy started by the test (a slow repository).
//!
//! * `burst_through_a_slow_repository`: a bounded pgbench burst drains
//!   within a deadline; every segment is archived byte-identical; look-ahead
//!   did push ahead (records seen in the spool during the drain); nothing was
//!   acknowledged (by `pg_stat_archiver` or by a spool record) before it was
//!   fetchable from the store.
//! * `sigkill_during_lookahead_push_and_prefetch`: SIGKILL of pgvault at
//!   moments chosen by a seeded generator (`PGVAULT_TEST_SEED` replays a
//!   run), during look-ahead pushes and during prefetch; after each kill no
//!   record names bytes the store does not hold, and the prefetch spool holds
//!   only complete, correct segments; afterwards everything completes,
//!   every segment comes back byte-identical, and PostgreSQL's recovery
//!   from the archive (through the same spool) ends with the primary's rows.
//!
//! Run through `scripts/test.sh` (it starts moto and sets `PGVAULT_TEST_*`).

use crate::common::*;
use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// A bandwidth-limiting TCP proxy (both directions share one budget).

struct Throttle {
    next: Mutex<Instant>,
    bytes_per_sec: f64,
}

impl Throttle {
    fn take(&self, n: usize) {
        let cost = Duration::from_secs_f64(n as f64 / self.bytes_per_sec);
        let wait = {
            let mut next = self.next.lock().expect("throttle lock");
            let now = Instant::now();
            let start = (*next).max(now);
            *next = start + cost;
            start.saturating_duration_since(now)
        };
        if !wait.is_zero() {
            thread::sleep(wait);
        }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, throttle: Arc<Throttle>) {
    thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    throttle.take(n);
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
        let _ = from.shutdown(Shutdown::Read);
    });
}

/// Listens on 127.0.0.1 (ephemeral port) and forwards every connection to
/// `upstream` at no more than `bytes_per_sec` in total. Runs until the test
/// process exits.
fn start_slow_proxy(upstream: SocketAddr, bytes_per_sec: f64) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
    let addr = listener.local_addr().expect("proxy address");
    let throttle = Arc::new(Throttle {
        next: Mutex::new(Instant::now()),
        bytes_per_sec,
    });
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(client) = conn else { continue };
            let Ok(server) = TcpStream::connect(upstream) else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
                continue;
            };
            pump(client, server, throttle.clone());
            pump(s2, c2, throttle.clone());
        }
    });
    addr
}

/// moto (if configured), and the same server behind a slow proxy.
fn moto_and_slow(bytes_per_sec: f64) -> Option<(S3Server, S3Server)> {
    let moto = require_server(TestEnv::new().moto.clone(), "PGVAULT_TEST_MOTO")?;
    let hostport = moto
        .endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string();
    let upstream = hostport
        .to_socket_addrs()
        .unwrap_or_else(|e| panic!("resolve moto at {hostport}: {e}"))
        .next()
        .expect("an address for moto");
    let proxy = start_slow_proxy(upstream, bytes_per_sec);
    let slow = S3Server {
        endpoint: format!("http://{proxy}"),
        ..moto.clone()
    };
    Some((moto, slow))
}

/// The same bucket and prefix reached through another server (endpoint).
fn via(repo: &Repo, server: &S3Server) -> Repo {
    Repo {
        env: server.env(),
        ..repo.clone()
    }
}

// ---------------------------------------------------------------------------
// Helpers.

fn one_mib() -> InitOpts {
    InitOpts {
        wal_segsize_mb: Some(1),
        data_checksums: false,
    }
}

// ---------------------------------------------------------------------------
// 1. A burst through a slow repository.

/// What a check of one acknowledged segment found wrong, if anything.
fn check_acknowledged(
    env: &TestEnv,
    direct: &Repo,
    pg: &Cluster,
    name: &str,
    expect_sha: Option<&str>,
    dir: &Path,
) -> Result<(), String> {
    let original = pg.wal_dir().join(name);
    let Some(got) = fetch(env, direct, name, dir) else {
        return Err(format!(
            "{name} was acknowledged but archive-get says it is not in the archive"
        ));
    };
    let got_sha = sha256_file(&got);
    let _ = fs::remove_file(&got);
    if got_sha != sha256_file(&original) {
        return Err(format!(
            "{name}: the archived copy differs from the original in pg_wal"
        ));
    }
    if let Some(sha) = expect_sha {
        if sha != got_sha {
            return Err(format!(
                "{name}: push record says sha256 {sha}, the archive holds {got_sha}"
            ));
        }
    }
    Ok(())
}

#[test]
fn burst_through_a_slow_repository() {
    let started = Instant::now();
    // 1 MiB/s in total, both directions: pgbench WAL (about 10:1 under
    // zstd) takes about 0.1 s per segment to ship, one request at a time.
    let Some((moto, slow)) = moto_and_slow(1024.0 * 1024.0) else {
        return;
    };
    let env = TestEnv::new();
    let repo = env.s3_repo(&slow, "burst");
    let direct = via(&repo, &moto);
    let mut pg = Cluster::init(&env, one_mib());
    let pgdata = pg.pgdata().display().to_string();
    repo.run(
        &env,
        As::PgUser,
        &["stanza-create", "--pgdata", &pgdata],
        env.dir(),
    )
    .ok();
    pg.start_archiving(&env, &repo);
    let seg = pg.wal_segment_size();
    let first = pg.current_wal();
    let scratch = env.mkdir("fetched", As::Root);

    // Sample while the burst is written and drained: spool records seen
    // (name -> record), and pg_stat_archiver's acknowledgements.
    let stop = Arc::new(Mutex::new(false));
    let seen: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let sampler = {
        let (stop, seen) = (stop.clone(), seen.clone());
        let home = pg_spool_root(&env);
        thread::spawn(move || {
            while !*stop.lock().expect("stop flag") {
                if let Ok(rd) = fs::read_dir(&home) {
                    for d in rd.flatten() {
                        let Ok(files) = fs::read_dir(d.path().join("pushed")) else {
                            continue;
                        };
                        for f in files.flatten() {
                            let n = f.file_name().to_string_lossy().into_owned();
                            if is_temp(&n) {
                                continue;
                            }
                            if let Ok(t) = fs::read_to_string(f.path()) {
                                seen.lock().expect("seen").entry(n).or_insert(t);
                            }
                        }
                    }
                }
                thread::sleep(Duration::from_millis(20));
            }
        })
    };

    // The bounded burst: about 25 MiB of WAL from initialisation, then
    // ordinary transactions.
    pg.pgbench(&["-i", "-s", "2", "-q"]);
    pg.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "1000"]);
    let last = pg.switch_wal();
    let names = segment_range(&first, &last, seg);
    assert!(
        names.len() >= 20,
        "only {} segments in the burst",
        names.len()
    );
    let burst_done = Instant::now();

    // Drain, with a generous deadline; meanwhile check that what
    // pg_stat_archiver acknowledges is already fetchable, byte-identical.
    let deadline = Duration::from_secs(120);
    let mut samples = 0;
    let mut problems = Vec::new();
    loop {
        let acked = pg.psql("select coalesce(last_archived_wal, '') from pg_stat_archiver");
        if acked.len() == 24 && acked >= last {
            break;
        }
        if acked.len() == 24 && samples < 6 {
            samples += 1;
            if let Err(e) = check_acknowledged(&env, &direct, &pg, &acked, None, &scratch) {
                problems.push(format!("during the drain: {e}"));
            }
        }
        assert!(
            burst_done.elapsed() < deadline,
            "the archiver did not drain {} segments within {deadline:?}: \
             last_archived_wal={acked:?}, want {last}\n--- server log tail\n{}",
            names.len(),
            pg.log_tail(40)
        );
        thread::sleep(Duration::from_millis(300));
    }
    let drain = burst_done.elapsed();
    *stop.lock().expect("stop flag") = true;
    sampler.join().expect("sampler thread");
    let failed = pg.psql("select failed_count from pg_stat_archiver");
    assert_eq!(
        failed,
        "0",
        "archive_command failed during the burst\n--- server log tail\n{}",
        pg.log_tail(40)
    );

    // Look-ahead did something: records of pushes ahead of PostgreSQL's
    // calls appeared, and each names bytes the store holds.
    let seen = seen.lock().expect("seen").clone();
    assert!(
        !seen.is_empty(),
        "no look-ahead push record appeared under {} while {} segments queued \
         behind a slow repository: look-ahead did not push ahead",
        pg_spool_root(&env).display(),
        names.len()
    );
    for (name, record) in &seen {
        let sha = record.split_whitespace().next().unwrap_or_default();
        if let Err(e) = check_acknowledged(&env, &direct, &pg, name, Some(sha), &scratch) {
            problems.push(format!("push record: {e}"));
        }
    }

    // Every segment of the burst is archived, byte-identical.
    for name in &names {
        if let Err(e) = check_acknowledged(&env, &direct, &pg, name, None, &scratch) {
            problems.push(e);
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    eprintln!(
        "burst: {} segments drained in {drain:?} after the burst; {} look-ahead \
         records seen; {samples} acknowledgements sampled; test took {:?}",
        names.len(),
        seen.len(),
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------
// 2. SIGKILL during look-ahead pushes and during prefetch.

/// What recovery must reproduce: pgbench's tables, row by row in sum.
const ROW_COUNTS: &str = "select (select count(*) from pgbench_accounts) || '/' || \
     (select sum(abalance) from pgbench_accounts) || '/' || \
     (select count(*) from pgbench_history)";

#[test]
fn sigkill_during_lookahead_push_and_prefetch() {
    let started = Instant::now();
    let seed = seed_or(0x5EED_0004);
    let mut rng = Rng(seed | 1);
    let replay = format!("seed {seed} (replay: PGVAULT_TEST_SEED={seed})");
    // 2 MiB/s: a push of nine segments or a prefetch of eight takes a good
    // fraction of a second, so kills land inside them.
    let Some((moto, slow)) = moto_and_slow(2.0 * 1024.0 * 1024.0) else {
        return;
    };
    let env = TestEnv::new();
    let scratch = env.mkdir("fetched", As::Root);

    // Real segments, kept in pg_wal; archiving off, so the test plays the
    // archiver (it marks .ready files itself and calls archive-push).
    let mut pg = Cluster::init(&env, one_mib());
    pg.set_conf("wal_keep_size = 1GB\nmax_wal_size = 1GB\n");
    // The cluster as initdb left it (shut down cleanly): the base that
    // recovery from the archive starts from at the end.
    let cold = env.mkdir("cold-copy", As::Root);
    env.run_ok(
        As::Root,
        &[
            "cp",
            "-a",
            &format!("{}/.", pg.pgdata().display()),
            &cold.display().to_string(),
        ],
        &[],
        env.dir(),
    );
    let first = pg.redo_wal_file();
    pg.start();
    let seg = pg.wal_segment_size();
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.pgbench(&["-t", "200", "-c", "2"]);
    let final_rows = pg.psql(ROW_COUNTS);
    let last = pg.switch_wal();
    pg.stop();
    let names = segment_range(&first, &last, seg);
    assert!(names.len() >= 10, "only {} segments", names.len());
    let wal = pg.wal_dir();
    let status = wal.join("archive_status");
    let pgdata = pg.pgdata().display().to_string();

    // Pushes: each round starts from a fresh repository (a new prefix, so
    // a new spool too) with every segment marked .ready, and kills
    // PostgreSQL's first call and the look-ahead pusher it started, at a
    // random fraction of the time the two take (round 0 measures it,
    // unkilled: the schedule then fits however loaded the machine is). Then PostgreSQL's
    // retries complete everything, in order.
    let mut problems = Vec::new();
    let mut kills = 0;
    let mut checked = (0, 0);
    let rounds = 6;
    let mut span_ms = 0;
    let mut repo = env.s3_repo(&slow, "crash");
    let mut direct = via(&repo, &moto);
    for round in 0..=rounds {
        repo = env.s3_repo(&slow, "crash");
        direct = via(&repo, &moto);
        repo.run(
            &env,
            As::PgUser,
            &["stanza-create", "--pgdata", &pgdata],
            env.dir(),
        )
        .ok();
        for n in &names {
            let _ = fs::remove_file(status.join(format!("{n}.done")));
            fs::write(status.join(format!("{n}.ready")), b"").expect("write .ready");
        }
        let path = wal.join(&names[0]).display().to_string();
        let mut args = repo.args();
        args.extend(["archive-push".to_string(), path]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let t0 = Instant::now();
        let child = env.spawn_pgvault(As::PgUser, &args, &repo.env, env.dir());
        let permille = if round == 0 { 1000 } else { rng.below(1000) };
        let delay = span_ms * permille / 1000;
        if round > 0 {
            thread::sleep(Duration::from_millis(delay));
            if sigkill_all(&env) > 0 {
                kills += 1;
            }
        }
        let run = finish(child, PGVAULT_TIMEOUT);
        if round == 0 {
            run.ok();
            // The call, and the detached look-ahead pusher it started.
            while !pgvault_pids(&env).is_empty() {
                assert!(
                    t0.elapsed() < PGVAULT_TIMEOUT,
                    "{replay}: the look-ahead pusher did not finish"
                );
                thread::sleep(Duration::from_millis(20));
            }
            span_ms = (t0.elapsed().as_millis() as u64).max(200);
        }
        let ctx = format!(
            "{replay}, push round {round} (archive-push {}, killed at {permille}/1000 \
             of {span_ms} ms: after {delay} ms)",
            names[0]
        );
        if run.code == Some(0) {
            if let Err(e) = check_acknowledged_file(&env, &direct, &wal, &names[0], &scratch) {
                problems.push(format!("{ctx}: exit 0 but {e}"));
            }
        }
        problems.extend(check_after_kill(
            &env,
            &direct,
            &wal,
            &scratch,
            &ctx,
            &mut checked,
        ));
        // PostgreSQL's retries, in order: everything completes.
        for name in &names {
            let path = wal.join(name).display().to_string();
            let run = repo.run(&env, As::PgUser, &["archive-push", &path], env.dir());
            if run.code != Some(0) {
                problems.push(format!(
                    "{ctx}: archive-push {name} after the kill failed: {}",
                    run.stderr.trim()
                ));
            }
            mark_done(&wal, name);
        }
        for name in &names {
            if let Err(e) = check_acknowledged_file(&env, &direct, &wal, name, &scratch) {
                problems.push(format!("{ctx}: after the retries: {e}"));
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }
    assert!(
        kills >= rounds / 2,
        "{replay}: only {kills} of {rounds} pushes were still running when killed"
    );
    assert!(
        checked.0 > 0,
        "{replay}: no look-ahead record existed after any kill: nothing was checked"
    );

    // Prefetch: archive-get as restore_command would (postgres user, its
    // spool), then kill it and the detached prefetcher after a random delay.
    let recov = env.mkdir("recov", As::PgUser);
    env.mkdir("recov/pg_wal", As::PgUser);
    let mut pkills = 0;
    for round in 0..10 {
        let k = rng.below(names.len() as u64 - 1) as usize;
        let mut args = repo.args();
        args.extend([
            "archive-get".to_string(),
            names[k].clone(),
            "pg_wal/RECOVERYXLOG".to_string(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = env.spawn_pgvault(As::PgUser, &args, &repo.env, &recov);
        let delay = rng.below(500);
        thread::sleep(Duration::from_millis(delay));
        if sigkill_all(&env) > 0 {
            pkills += 1;
        }
        let run = finish(child, PGVAULT_TIMEOUT);
        let ctx = format!(
            "{replay}, prefetch round {round} (after {}, killed after {delay} ms)",
            names[k]
        );
        let dest = recov.join("pg_wal/RECOVERYXLOG");
        if run.code == Some(0) && sha256_file(&dest) != sha256_file(&wal.join(&names[k])) {
            problems.push(format!("{ctx}: archive-get exited 0 with other bytes"));
        }
        let _ = fs::remove_file(&dest);
        problems.extend(check_after_kill(
            &env,
            &direct,
            &wal,
            &scratch,
            &ctx,
            &mut checked,
        ));
        // Checked: drop them, so that the next prefetcher has work to be
        // killed in (crash leftovers, temporaries, stay).
        for path in spool_files(&env, &direct, "get").values() {
            let _ = fs::remove_file(path);
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(
        pkills >= 5,
        "{replay}: only {pkills} of 10 archive-gets/prefetchers were killed"
    );

    // Recovery's walk through every segment, with prefetch: byte-identical.
    for name in &names {
        let run = repo.run(
            &env,
            As::PgUser,
            &["archive-get", name, "pg_wal/RECOVERYXLOG"],
            &recov,
        );
        run.ok();
        assert_same_file(&wal.join(name), &recov.join("pg_wal/RECOVERYXLOG"));
    }
    // And straight from the store.
    for name in &names {
        if let Err(e) = check_acknowledged_file(&env, &direct, &wal, name, &scratch) {
            problems.push(format!("{replay}: after the crashes: {e}"));
        }
    }
    thread::sleep(Duration::from_millis(300));
    sigkill_all(&env);
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    // PostgreSQL's own recovery from that archive, through the same spool
    // the killed prefetchers used: the initdb copy replays every segment
    // and ends with the rows the primary had.
    let mut node = Node::new(&env, &repo, "crash-recovered");
    env.run_ok(
        As::Root,
        &[
            "cp",
            "-a",
            &format!("{}/.", cold.display()),
            &node.pgdata.display().to_string(),
        ],
        &[],
        env.dir(),
    );
    let restore_command = format!(
        "{} --repo {} --stanza {} archive-get %f \"%p\"",
        env.bin().display(),
        repo.url,
        repo.stanza
    );
    // initdb's own shutdown recorded its max_connections, which recovery
    // must not go below.
    node.set_conf(&format!(
        "restore_command = '{restore_command}'\nmax_connections = 100"
    ));
    fs::write(node.pgdata.join("recovery.signal"), b"").expect("write recovery.signal");
    chown(&node.pgdata.join("recovery.signal"), env.uid, env.gid);
    node.start();
    node.wait_promoted();
    assert_eq!(
        node.psql(ROW_COUNTS),
        final_rows,
        "{replay}: rows after recovery from the archive\n--- server log\n{}",
        node.log_tail(40)
    );
    node.stop();
    node.assert_log_clean();
    eprintln!(
        "crash: {replay}: {} segments, {kills} push \
         kills, {pkills} prefetch kills, {} records and {} prefetched files checked, {:?}",
        names.len(),
        checked.0,
        checked.1,
        started.elapsed()
    );
}
