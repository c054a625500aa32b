//! The WAL archive against real things (issue 2): a PostgreSQL 15 cluster
//! whose `archive_command` is the real `pgvault` binary, archiving to a local
//! directory, to moto and to s3s-fs; bad input; racing pushes; exit codes
//! that PostgreSQL's `restore_command` handling depends on; configuration.
//!
//! Run through `scripts/test.sh` (it starts the S3 servers and sets the
//! `PGVAULT_TEST_*` variables; see tests/it/common/mod.rs).

use crate::common::*;
use serde_json::Value;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

const ARCHIVE_TIMEOUT: Duration = Duration::from_secs(300);

fn one_mib() -> InitOpts {
    InitOpts {
        wal_segsize_mb: Some(1),
        data_checksums: false,
    }
}

fn stanza_create(env: &TestEnv, repo: &Repo, who: As, pgdata: &Path) -> Run {
    let pgdata = pgdata.display().to_string();
    repo.run(env, who, &["stanza-create", "--pgdata", &pgdata], env.dir())
}

/// Copy `src` to `dir/name` (creating `dir`), returning the new path.
fn copy_as(src: &Path, dir: &Path, name: &str) -> PathBuf {
    fs::create_dir_all(dir).expect("mkdir");
    let dst = dir.join(name);
    fs::copy(src, &dst)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", src.display(), dst.display()));
    dst
}

/// Invert one byte of a file in place.
fn flip_byte(path: &Path, offset: usize) {
    let mut bytes = fs::read(path).expect("read file to corrupt");
    assert!(
        offset < bytes.len(),
        "offset past the end of {}",
        path.display()
    );
    bytes[offset] ^= 0xFF;
    fs::write(path, bytes).expect("write corrupted file");
}

/// A 1 MiB-segment cluster with `n` completed segments kept in pg_wal
/// (archiving off), stopped; returns it and the segment names.
fn cluster_with_segments(env: &TestEnv, n: usize) -> (Cluster, Vec<String>) {
    let mut pg = Cluster::init(env, one_mib());
    pg.set_conf("wal_keep_size = 1GB\nmax_wal_size = 1GB\n");
    pg.start();
    let names: Vec<String> = (0..n).map(|_| pg.switch_wal()).collect();
    pg.stop();
    for name in &names {
        assert!(
            pg.wal_dir().join(name).exists(),
            "{name} was removed from pg_wal despite wal_keep_size"
        );
    }
    (pg, names)
}

// ---------------------------------------------------------------------------
// End to end: PostgreSQL's archiver -> pgvault -> repository -> archive-get.

/// Archive at least `min_segments` segments through the real archiver, then
/// fetch each one back and compare it with the original still in pg_wal,
/// and check `info --output json`.
fn end_to_end(env: &TestEnv, repo: &Repo, wal_segsize_mb: Option<u32>, min_segments: u64) {
    let mut pg = Cluster::init(
        env,
        InitOpts {
            wal_segsize_mb,
            data_checksums: true,
        },
    );
    let seg_size = pg.wal_segment_size();
    // As the postgres user, like a DBA would set it up; a local repo is
    // then owned by the user whose archive_command writes to it.
    stanza_create(env, repo, As::PgUser, pg.pgdata()).ok();
    pg.start_archiving(env, repo);
    // The segment in use at start-up is the first one archived (initdb's
    // earlier ones are gone or recycled).
    let first = pg.current_wal();
    let (_, first_no) = parse_segment(&first, seg_size);

    // Scale 4 writes about 45 MiB of WAL in a second or two; the runs add
    // ordinary OLTP records (about 1 MiB per 1000 transactions here).
    pg.pgbench(&["-i", "-s", "4", "-q"]);
    loop {
        pg.pgbench(&["-n", "-c", "2", "-j", "2", "-t", "300"]);
        let (_, cur) = parse_segment(&pg.current_wal(), seg_size);
        if cur >= first_no + min_segments {
            break;
        }
    }
    let last = pg.switch_wal();
    pg.wait_archived(&last, ARCHIVE_TIMEOUT);

    // Every segment from the first one archived to the one just switched.
    let names = segment_range(&first, &last, seg_size);
    assert!(
        names.len() as u64 >= min_segments,
        "only {} segments generated",
        names.len()
    );

    // Fetch as restore_command would: as the postgres user, cwd = a data
    // directory (no standby.signal), DEST relative.
    let getdir = env.mkdir("restore", As::PgUser);
    let walget = env.mkdir("restore/pg_wal", As::PgUser);
    let dest = walget.join("RECOVERYXLOG");
    for name in &names {
        let original = pg.wal_dir().join(name);
        assert!(
            original.exists(),
            "{name} is no longer in pg_wal: cannot compare"
        );
        let _ = fs::remove_file(&dest);
        let run = repo.run(
            env,
            As::PgUser,
            &["archive-get", name, "pg_wal/RECOVERYXLOG"],
            &getdir,
        );
        run.ok();
        assert_same_file(&original, &dest);
    }

    // info, as another OS user (root) with an empty catalog: rebuilt from
    // the repository alone.
    let run = repo.run(env, As::Root, &["info", "--output", "json"], env.dir());
    run.ok();
    let info: Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("info --output json is not JSON ({e}):\n{}", run.stdout));
    check_info(&info, repo, &pg, seg_size, &first, &last);

    let run = repo.run(env, As::Root, &["info"], env.dir());
    run.ok();
    assert!(
        run.stdout.contains(&repo.stanza),
        "text info should name the stanza:\n{}",
        run.stdout
    );
}

fn check_info(info: &Value, repo: &Repo, pg: &Cluster, seg_size: u64, first: &str, last: &str) {
    let ctx = || serde_json::to_string_pretty(info).unwrap_or_default();
    assert_eq!(info["schema_version"], 1, "schema_version in {}", ctx());
    let stanza = &info["stanza"];
    assert_eq!(
        stanza["name"],
        repo.stanza.as_str(),
        "stanza.name in {}",
        ctx()
    );
    assert_eq!(
        stanza["system_identifier"],
        pg.system_identifier().as_str(),
        "stanza.system_identifier (a decimal string) in {}",
        ctx()
    );
    assert_eq!(stanza["pg_version"], 15, "stanza.pg_version in {}", ctx());
    assert_eq!(
        stanza["wal_segment_size"],
        seg_size,
        "stanza.wal_segment_size (bytes) in {}",
        ctx()
    );
    let timelines = info["timelines"].as_array().expect("timelines array");
    assert_eq!(timelines.len(), 1, "one timeline in {}", ctx());
    let tl = &timelines[0];
    assert_eq!(tl["timeline"], 1, "timeline number in {}", ctx());
    assert_eq!(tl["first_segment"], first, "first_segment in {}", ctx());
    let last_seen = tl["last_segment"].as_str().expect("last_segment string");
    assert!(
        last_seen.len() == 24 && last_seen >= last,
        "last_segment {last_seen} should be at least {last} in {}",
        ctx()
    );
    let expected = segment_range(first, last_seen, seg_size).len();
    assert_eq!(tl["segments"], expected, "segments count in {}", ctx());
    assert_eq!(
        tl["gaps"].as_array().map(Vec::len),
        Some(0),
        "no gaps in {}",
        ctx()
    );
}

#[test]
fn archive_roundtrip_local_1mib_segments() {
    let env = TestEnv::new();
    let repo = env.local_repo("main");
    end_to_end(&env, &repo, Some(1), 40);
}

#[test]
fn archive_roundtrip_local_16mib_segments() {
    let env = TestEnv::new();
    let repo = env.local_repo("main");
    end_to_end(&env, &repo, None, 2);
}

#[test]
fn archive_roundtrip_moto() {
    let env = TestEnv::new();
    let Some(server) = env.moto.clone() else {
        eprintln!("skipped: PGVAULT_TEST_MOTO is not set");
        return;
    };
    let repo = env.s3_repo(&server, "main");
    end_to_end(&env, &repo, Some(1), 40);
}

#[test]
fn archive_roundtrip_s3sfs() {
    let env = TestEnv::new();
    let Some(server) = env.s3sfs.clone() else {
        eprintln!("skipped: PGVAULT_TEST_S3SFS is not set");
        return;
    };
    let repo = env.s3_repo(&server, "main");
    end_to_end(&env, &repo, Some(1), 40);
}

// ---------------------------------------------------------------------------
// Bad input.

#[test]
fn archive_push_refuses_bad_input() {
    let env = TestEnv::new();
    let a = Cluster::init(&env, one_mib());
    let b = Cluster::init(&env, one_mib());
    let repo = env.local_repo("main");
    let input = env.mkdir("input", As::Root);
    let seg = a.redo_wal_file();
    let seg = seg.as_str();
    let a_seg = a.wal_dir().join(seg);
    let seg_size = a.wal_segment_size();
    let (tli, segno) = parse_segment(seg, seg_size);
    let push = |path: &Path| {
        let p = path.display().to_string();
        repo.run(&env, As::Root, &["archive-push", &p], env.dir())
    };

    // No stanza yet.
    let early = copy_as(&a_seg, &input.join("early"), seg);
    push(&early).expect_code(6);

    stanza_create(&env, &repo, As::Root, a.pgdata()).ok();
    // Again for the same cluster: a no-op.
    stanza_create(&env, &repo, As::Root, a.pgdata()).ok();
    // For another cluster under the same stanza: refused.
    stanza_create(&env, &repo, As::Root, b.pgdata()).expect_code(6);

    // A truncated segment.
    let truncated = input.join("truncated").join(seg);
    fs::create_dir_all(truncated.parent().unwrap()).unwrap();
    let bytes = fs::read(&a_seg).unwrap();
    fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    push(&truncated).expect_code(3).expect_one_error_line(seg);

    // A segment of another cluster (another system identifier).
    let b_seg = b.redo_wal_file();
    let foreign = b.wal_dir().join(&b_seg);
    push(&foreign).expect_code(3).expect_one_error_line(&b_seg);

    // Not WAL at all, with a segment's name and size.
    let name = &segment_name(tli, segno + 2, seg_size);
    let not_wal = input.join("random").join(name);
    fs::create_dir_all(not_wal.parent().unwrap()).unwrap();
    fs::write(&not_wal, pseudo_random_bytes(1 << 20, 42)).unwrap();
    push(&not_wal).expect_code(3).expect_one_error_line(name);

    // A real segment under a name its page address does not match.
    let name = &segment_name(tli, segno + 1, seg_size);
    let renamed = copy_as(&a_seg, &input.join("renamed"), name);
    push(&renamed).expect_code(3).expect_one_error_line(name);

    // A path that does not exist.
    let name = &segment_name(tli, segno + 9, seg_size);
    let missing = input.join("missing").join(name);
    push(&missing).expect_code(3).expect_one_error_line(name);

    // None of that reached the archive...
    let dest = input.join("fetched");
    repo.run(
        &env,
        As::Root,
        &["archive-get", seg, &dest.display().to_string()],
        env.dir(),
    )
    .expect_code(1);
    assert!(
        !dest.exists(),
        "archive-get created DEST for a missing file"
    );

    // ...and the real segment still goes in. It is initdb's unfinished
    // segment (PostgreSQL itself would archive it only once full), so the
    // one thing said is the warning that its records stop short.
    let run = push(&a_seg);
    run.ok();
    let lines = run.stderr_lines();
    assert!(
        run.stdout.is_empty()
            && lines.len() == 1
            && lines[0].starts_with(&format!("pgvault: warning: {seg}: WAL ends at "))
            && lines[0].contains("before the end of the segment"),
        "archive-push of an unfinished segment: exit 0 and only the warning \
         that its WAL ends early, got:\n{}{}",
        run.stdout,
        run.stderr
    );
}

#[test]
fn archive_push_conflict_keeps_the_original() {
    let env = TestEnv::new();
    let a = Cluster::init(&env, one_mib());
    let repo = env.local_repo("main");
    stanza_create(&env, &repo, As::Root, a.pgdata()).ok();
    let seg = a.redo_wal_file();
    let seg = seg.as_str();
    let original = a.wal_dir().join(seg);
    let orig = original.display().to_string();
    let push = |p: &str| repo.run(&env, As::Root, &["archive-push", p], env.dir());

    push(&orig).ok();
    // The same bytes again (PostgreSQL retries after a crash): success.
    push(&orig).ok();

    // Different bytes under the archived name: refused, original kept.
    let other = copy_as(&original, &env.dir().join("other"), seg);
    let len = fs::metadata(&other).unwrap().len() as usize;
    flip_byte(&other, len - 1);
    push(&other.display().to_string())
        .expect_code(4)
        .expect_one_error_line(seg);

    let dest = env.dir().join("fetched");
    repo.run(
        &env,
        As::Root,
        &["archive-get", seg, &dest.display().to_string()],
        env.dir(),
    )
    .ok();
    assert_same_file(&original, &dest);
    // The original still counts as archived.
    push(&orig).ok();
}

#[test]
fn archive_get_never_hands_on_a_corrupt_object() {
    let env = TestEnv::new();
    let a = Cluster::init(&env, one_mib());
    let repo = env.local_repo("main");
    stanza_create(&env, &repo, As::Root, a.pgdata()).ok();
    let seg = a.redo_wal_file();
    let seg = seg.as_str();
    let original = a.wal_dir().join(seg);
    repo.run(
        &env,
        As::Root,
        &["archive-push", &original.display().to_string()],
        env.dir(),
    )
    .ok();

    let objects = repo.local_wal_objects(seg);
    assert_eq!(
        objects.len(),
        1,
        "expected one <repo>/main/archive/**/{seg}-<sha256>.zst, found {objects:?}"
    );
    let len = fs::metadata(&objects[0]).unwrap().len() as usize;
    flip_byte(&objects[0], len / 2);

    // Archive recovery (no standby.signal in cwd): a failure, not "end of
    // archive" — above 125 so PostgreSQL stops instead of ending recovery.
    let cwd = env.mkdir("pgdata-like", As::Root);
    let run = repo.run(&env, As::Root, &["archive-get", seg, "RECOVERYXLOG"], &cwd);
    run.expect_code(254).expect_one_error_line(seg);
    assert!(
        !cwd.join("RECOVERYXLOG").exists(),
        "a corrupt object reached DEST"
    );
}

// ---------------------------------------------------------------------------
// archive-get exit codes that restore_command relies on.

#[test]
fn archive_get_exit_codes() {
    let env = TestEnv::new();
    let a = Cluster::init(&env, one_mib());
    let repo = env.local_repo("main");
    stanza_create(&env, &repo, As::Root, a.pgdata()).ok();
    let plain = env.mkdir("recovery", As::Root);
    let standby = env.mkdir("standby", As::Root);
    fs::write(standby.join("standby.signal"), b"").unwrap();
    let seg = a.redo_wal_file();
    let seg = seg.as_str();
    let absent = "000000010000000000000042";

    // Not in the archive: 1, in archive recovery and in standby mode; also
    // with the global options after the command name.
    for cwd in [&plain, &standby] {
        let run = repo.run(
            &env,
            As::Root,
            &["archive-get", absent, "RECOVERYXLOG"],
            cwd,
        );
        run.expect_code(1);
        assert!(!cwd.join("RECOVERYXLOG").exists());
    }
    let mut args = vec![
        "archive-get".to_string(),
        absent.into(),
        "RECOVERYXLOG".into(),
    ];
    args.extend(repo.args());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    env.pgvault(As::Root, &args, &[], &plain).expect_code(1);

    // Repository unreachable (nothing listens on loopback port 1).
    assert!(
        std::net::TcpStream::connect("127.0.0.1:1").is_err(),
        "something listens on 127.0.0.1:1"
    );
    let dead = S3Server {
        name: "closed port",
        endpoint: "http://127.0.0.1:1".into(),
        access_key: "pgvault-test-key".into(),
        secret_key: "pgvault-test-secret".into(),
        region: "us-east-1".into(),
        bucket: "pgvault-test".into(),
        atomic_create: true,
    };
    let unreachable = Repo {
        url: "s3://pgvault-test/x".into(),
        stanza: "main".into(),
        env: dead.env(),
        local: None,
    };
    let get_args = |dest: &str| {
        let mut v = unreachable.args();
        v.extend(["archive-get".to_string(), seg.into(), dest.into()]);
        v
    };
    let spawn = |args: Vec<String>, cwd: &Path| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        env.spawn_pgvault(As::Root, &args, &unreachable.env, cwd)
    };
    // Concurrently: each may spend a while retrying.
    let in_recovery = spawn(get_args("RECOVERYXLOG"), &plain);
    let in_standby = spawn(get_args("RECOVERYXLOG"), &standby);
    let mut push_args = unreachable.args();
    push_args.extend([
        "archive-push".to_string(),
        a.wal_dir().join(seg).display().to_string(),
    ]);
    let pushing = spawn(push_args, env.dir());

    let run = finish(in_recovery, PGVAULT_TIMEOUT);
    eprintln!("unreachable archive-get took {:?}", run.elapsed);
    run.expect_code(254).expect_one_error_line(seg);
    assert!(!plain.join("RECOVERYXLOG").exists());
    let run = finish(in_standby, PGVAULT_TIMEOUT);
    run.expect_code(1);
    assert!(!standby.join("RECOVERYXLOG").exists());
    let run = finish(pushing, PGVAULT_TIMEOUT);
    run.expect_code(5).expect_one_error_line(seg);
}

// ---------------------------------------------------------------------------
// Racing pushes of different bytes under one name.

fn racing_pushes(server: &S3Server) {
    const ROUNDS: usize = 10;
    let env = TestEnv::new();
    let (pg, names) = cluster_with_segments(&env, ROUNDS);
    let repo = env.s3_repo(server, "main");
    stanza_create(&env, &repo, As::Root, pg.pgdata()).ok();
    let mut problems = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let original = pg.wal_dir().join(name);
        let a = copy_as(&original, &env.dir().join(format!("race-a-{i}")), name);
        let b = copy_as(&original, &env.dir().join(format!("race-b-{i}")), name);
        let len = fs::metadata(&b).unwrap().len() as usize;
        flip_byte(&b, len - 1);
        let spawn = |p: &Path| {
            let mut args = repo.args();
            args.extend(["archive-push".to_string(), p.display().to_string()]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            env.spawn_pgvault(As::Root, &args, &repo.env, env.dir())
        };
        let (pa, pb) = (spawn(&a), spawn(&b));
        let (ra, rb) = (finish(pa, PGVAULT_TIMEOUT), finish(pb, PGVAULT_TIMEOUT));
        let (winner, loser) = match (ra.code, rb.code) {
            (Some(0), Some(4)) => (&a, &rb),
            (Some(4), Some(0)) => (&b, &ra),
            codes => {
                problems.push(format!(
                    "{name}: exit codes {codes:?} (want one 0 and one 4)\n  A stderr: {}\n  B stderr: {}",
                    ra.stderr.trim(),
                    rb.stderr.trim()
                ));
                continue;
            }
        };
        if !loser.stderr.starts_with("error:") || !loser.stderr.contains(name.as_str()) {
            problems.push(format!(
                "{name}: the loser's stderr should be an error line naming the file: {}",
                loser.stderr.trim()
            ));
        }
        let dest = env.dir().join(format!("race-get-{i}"));
        let get = repo.run(
            &env,
            As::Root,
            &["archive-get", name, &dest.display().to_string()],
            env.dir(),
        );
        if get.code != Some(0) {
            problems.push(format!(
                "{name}: archive-get exited {:?}: {}",
                get.code,
                get.stderr.trim()
            ));
        } else if fs::read(&dest).ok() != fs::read(winner).ok() {
            problems.push(format!(
                "{name}: archive-get did not return the winner's bytes"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "racing pushes on {} ({} of {ROUNDS} rounds wrong):\n{}",
        server.name,
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn racing_pushes_moto() {
    let env = TestEnv::new();
    match env.moto.clone() {
        Some(server) => racing_pushes(&server),
        None => eprintln!("skipped: PGVAULT_TEST_MOTO is not set"),
    }
}

#[test]
fn racing_pushes_s3sfs() {
    let env = TestEnv::new();
    match env.s3sfs.clone() {
        Some(server) => racing_pushes(&server),
        None => eprintln!("skipped: PGVAULT_TEST_S3SFS is not set"),
    }
}

// ---------------------------------------------------------------------------
// Configuration: flag > PGVAULT_* environment > TOML file.

#[test]
fn config_precedence_flag_env_file() {
    let env = TestEnv::new();
    let a = Cluster::init(&env, one_mib());
    let pgdata = a.pgdata().display().to_string();
    let dir = |n: &str| env.mkdir(n, As::PgUser).display().to_string();
    let (file_repo, env_repo, flag_repo, cfgenv_repo, after_repo) = (
        dir("repo-file"),
        dir("repo-env"),
        dir("repo-flag"),
        dir("repo-cfgenv"),
        dir("repo-after"),
    );
    let write_conf = |name: &str, body: &str| {
        let p = env.dir().join(name);
        fs::write(&p, body).unwrap();
        p.display().to_string()
    };
    let conf = write_conf(
        "pgvault.toml",
        &format!("repo = \"{file_repo}\"\nstanza = \"from-file\"\n"),
    );
    let vars = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    // Whether `repo` holds `stanza`, asked with flags only.
    let has_stanza = |repo: &str, stanza: &str| -> bool {
        let run = env.pgvault(
            As::Root,
            &[
                "--repo", repo, "--stanza", stanza, "info", "--output", "json",
            ],
            &[],
            env.dir(),
        );
        match run.code {
            Some(0) => true,
            Some(6) => false,
            _ => panic!(
                "info for {repo} / {stanza}: unexpected exit {:?}\n{}",
                run.code, run.stderr
            ),
        }
    };
    let create = |args: &[&str], vars: &[(String, String)]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["stanza-create", "--pgdata", &pgdata]);
        env.pgvault(As::Root, &all, vars, env.dir()).ok();
    };

    // File only.
    create(&["--config", &conf], &[]);
    assert!(
        has_stanza(&file_repo, "from-file"),
        "repo/stanza from the file"
    );

    // Environment over file (repo from env, stanza still from the file).
    create(&["--config", &conf], &vars(&[("PGVAULT_REPO", &env_repo)]));
    assert!(
        has_stanza(&env_repo, "from-file"),
        "PGVAULT_REPO over the file"
    );

    // Flag over environment over file.
    let both = vars(&[("PGVAULT_REPO", &env_repo), ("PGVAULT_STANZA", "from-env")]);
    create(&["--config", &conf, "--repo", &flag_repo], &both);
    assert!(
        has_stanza(&flag_repo, "from-env"),
        "--repo over PGVAULT_REPO"
    );
    assert!(
        !has_stanza(&env_repo, "from-env"),
        "PGVAULT_REPO used despite --repo"
    );
    create(
        &[
            "--config",
            &conf,
            "--repo",
            &flag_repo,
            "--stanza",
            "from-flag",
        ],
        &both,
    );
    assert!(
        has_stanza(&flag_repo, "from-flag"),
        "--stanza over PGVAULT_STANZA"
    );

    // PGVAULT_CONFIG names the file when --config is absent; file:// URLs.
    let conf2 = write_conf(
        "other.toml",
        &format!("repo = \"file://{cfgenv_repo}\"\nstanza = \"via-config-env\"\n"),
    );
    create(&[], &vars(&[("PGVAULT_CONFIG", &conf2)]));
    assert!(has_stanza(
        &format!("file://{cfgenv_repo}"),
        "via-config-env"
    ));

    // Global options after the command name.
    let run = env.pgvault(
        As::Root,
        &[
            "stanza-create",
            "--pgdata",
            &pgdata,
            "--repo",
            &after_repo,
            "--stanza",
            "after",
        ],
        &[],
        env.dir(),
    );
    run.ok();
    let run = env.pgvault(
        As::Root,
        &[
            "info",
            "--output",
            "json",
            "--repo",
            &after_repo,
            "--stanza",
            "after",
        ],
        &[],
        env.dir(),
    );
    run.ok();
    let info: Value = serde_json::from_str(&run.stdout).expect("info JSON");
    assert_eq!(info["stanza"]["name"], "after");
    assert_eq!(
        info["stanza"]["system_identifier"],
        a.system_identifier().as_str()
    );

    // An unknown key in the file: exit 2, naming the key.
    let bad = write_conf(
        "bad.toml",
        &format!("repo = \"{file_repo}\"\nstanza = \"from-file\"\nno_such_option = true\n"),
    );
    let run = env.pgvault(As::Root, &["--config", &bad, "info"], &[], env.dir());
    run.expect_code(2);
    assert!(
        run.stderr.contains("no_such_option"),
        "the error should name the unknown key:\n{}",
        run.stderr
    );
}
