//! Client-side encryption (issue 11): an encrypted repository round-trips
//! WAL and recovers to a point in time, locally and on moto; no stored
//! byte gives away a known plaintext; a flipped bit, a cut and a swapped
//! object each fail by name; a missing or wrong key is one line, a hint and
//! exit 15 (254 for archive-get during recovery); the key never shows in
//! output, logs, `ps` or the files pgvault writes; keys rotate without
//! rewriting data; encryption turned on for an existing stanza leaves its
//! older backups restorable and `verify --reencrypt` seals them.

use crate::common::*;
use crate::pitr::{primary, restore_promoted, write_a_then_b};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const CIPHER: &str = "xchacha20-poly1305";
const ARCHIVE_TIMEOUT: Duration = Duration::from_secs(180);
/// A table row's text, to be looked for in the stored bytes.
const ROW_MARK: &str = "pgvault-row-marker-7f3a";
/// Exit code of a missing or wrong key (docs/exit-codes.md).
const EXIT_KEY: i32 = 15;
/// archive-get's failure during archive recovery: stop, not "not found".
const EXIT_GET_FATAL: i32 = 254;

struct Key {
    path: PathBuf,
    text: String,
}

/// A key file readable by the postgres user alone (and root).
fn key_file(env: &TestEnv, name: &str) -> Key {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let text = format!("{name}-{:08x}-{nanos:032x}", unique());
    let path = env.dir().join(format!("{name}.key"));
    fs::write(&path, format!("{text}\n")).expect("write a key file");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod the key");
    chown(&path, env.uid, env.gid);
    Key { path, text }
}

/// `repo` with no key settings.
fn without_key(repo: &Repo) -> Repo {
    let mut r = repo.clone();
    r.env.retain(|(k, _)| !k.starts_with("PGVAULT_REPO_CIPHER"));
    r
}

/// `repo` encrypted with the key in `key`'s file.
fn with_key(repo: &Repo, key: &Key) -> Repo {
    let mut r = without_key(repo);
    r.env
        .push(("PGVAULT_REPO_CIPHER_TYPE".into(), CIPHER.into()));
    r.env.push((
        "PGVAULT_REPO_CIPHER_KEY_FILE".into(),
        key.path.display().to_string(),
    ));
    r
}

/// `repo` with one more variable.
fn plus(repo: &Repo, k: &str, v: &str) -> Repo {
    let mut r = repo.clone();
    r.env.push((k.into(), v.into()));
    r
}

/// Every stored object of a local repository.
fn stored(repo: &Repo) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    walk(repo.local.as_ref().expect("a local repository"), &mut |p| {
        // Temporary files, and the local store's empty flock files.
        let s = p.to_string_lossy();
        if !s.contains(".pgvault-tmp") && !s.contains("/.pgvault-locks/") {
            out.insert(p.to_path_buf(), fs::read(p).unwrap_or_default());
        }
    });
    out
}

fn is_key_object(p: &Path) -> bool {
    p.parent()
        .and_then(|d| d.file_name())
        .is_some_and(|d| d == "keys")
}

/// What must never be readable in an encrypted repository: a table row,
/// the system identifier (in every WAL page header and in pg_control), the
/// backup label's text, and field names of manifests and stanza files.
fn needles(pg: &Cluster) -> Vec<(&'static str, Vec<u8>)> {
    let sysid: u64 = pg.system_identifier().parse().expect("a system identifier");
    vec![
        ("a table row", ROW_MARK.as_bytes().to_vec()),
        ("the system identifier", sysid.to_le_bytes().to_vec()),
        ("backup_label text", b"START WAL LOCATION".to_vec()),
        ("a manifest field", b"\"wal_start\"".to_vec()),
        ("a stanza field", b"system_identifier".to_vec()),
    ]
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// What anyone without the key can read of an object: its bytes, and
/// whatever zstd decodes after each envelope header in it (after the
/// 16-byte header, or after the 32-byte seal too). A plaintext object's
/// rows are compressed, so a scan of raw bytes alone would find nothing in
/// a plaintext repository either.
fn readable(bytes: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = bytes.to_vec();
    let starts: Vec<usize> = bytes
        .windows(8)
        .enumerate()
        .filter(|(_, w)| *w == b"PGVAULT\0")
        .map(|(i, _)| i)
        .collect();
    for at in starts {
        for skip in [16, 48] {
            let Some(rest) = bytes.get(at + skip..) else {
                continue;
            };
            let Ok(dec) = zstd::stream::read::Decoder::new(rest) else {
                continue;
            };
            let mut dec = dec.single_frame();
            let mut buf = vec![0u8; 1 << 16];
            // Whatever decodes before an error counts.
            while let Ok(n) = dec.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
        }
    }
    out
}

/// Which needles are readable in which stored objects.
fn plaintext_found(
    objects: &BTreeMap<PathBuf, Vec<u8>>,
    needles: &[(&str, Vec<u8>)],
) -> Vec<String> {
    let mut found = Vec::new();
    for (p, bytes) in objects {
        let bytes = readable(bytes);
        for (what, n) in needles {
            if contains(&bytes, n) {
                found.push(format!("{what} in {}", p.display()));
            }
        }
    }
    found
}

/// Objects whose header does not say sealed (key objects aside: they are
/// what unseals).
fn unsealed(objects: &BTreeMap<PathBuf, Vec<u8>>) -> Vec<String> {
    objects
        .iter()
        .filter(|(p, _)| !is_key_object(p))
        .filter(|(_, b)| !(b.len() > 16 && &b[..8] == b"PGVAULT\0" && b[11] == 1))
        .map(|(p, _)| p.display().to_string())
        .collect()
}

/// `archive-get NAME DEST` as the postgres user into a fresh directory,
/// without prefetch.
fn archive_get(env: &TestEnv, repo: &Repo, name: &str) -> (Run, PathBuf) {
    let dir = env.mkdir(&format!("get-{}", unique()), As::PgUser);
    let dest = dir.join(name);
    let d = dest.display().to_string();
    // From the repository each time: a prefetched copy (restore's
    // recovery fills the spool) would hide what the object holds now.
    let repo = plus(repo, "PGVAULT_ARCHIVE_GET_AHEAD", "0");
    let run = repo.run(env, As::PgUser, &["archive-get", name, &d], env.dir());
    (run, dest)
}

/// archive-get of `name` fails for good (not "not found"), names `needle`
/// in one error line, and leaves no file behind.
#[track_caller]
fn get_fails(env: &TestEnv, repo: &Repo, name: &str, needle: &str) -> Run {
    let (run, dest) = archive_get(env, repo, name);
    run.expect_code(EXIT_GET_FATAL);
    run.expect_one_error_line(needle);
    assert!(
        !dest.exists(),
        "a failed archive-get left {}",
        dest.display()
    );
    run
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .unwrap_or_default()
        .to_string_lossy()
        .into_owned()
}

/// A flipped bit, a cut and a swap each fail, naming the object.
fn tampering(env: &TestEnv, repo: &Repo, seg: &str) {
    let objs = repo.local_wal_objects(seg);
    assert_eq!(objs.len(), 1, "one stored copy of {seg}: {objs:?}");
    let obj = &objs[0];
    let orig = fs::read(obj).expect("read the WAL object");
    let name = file_name(obj);

    let mut flipped = orig.clone();
    flipped[orig.len() / 2] ^= 0x10;
    fs::write(obj, &flipped).expect("flip a bit");
    let run = get_fails(env, repo, seg, &name);
    assert!(run.stderr.contains("decryption failed"), "{}", run.stderr);

    fs::write(obj, &orig[..orig.len() - 100]).expect("cut the object");
    get_fails(env, repo, seg, &name);
    fs::write(obj, &orig).expect("put the object back");

    // Two claims of the same size swapped: each is bound to its own name.
    let mut claims: BTreeMap<usize, Vec<PathBuf>> = BTreeMap::new();
    walk(&repo.local_archive(), &mut |p| {
        if file_name(p).ends_with(".claim") {
            let len = fs::metadata(p).map(|m| m.len() as usize).unwrap_or(0);
            claims.entry(len).or_default().push(p.to_path_buf());
        }
    });
    let pair = claims
        .values()
        .find(|v| v.len() >= 2)
        .unwrap_or_else(|| panic!("two claims of one size: {claims:?}"));
    let (a, b) = (&pair[0], &pair[1]);
    let (ba, bb) = (fs::read(a).unwrap(), fs::read(b).unwrap());
    fs::write(a, &bb).unwrap();
    fs::write(b, &ba).unwrap();
    let wal_a = file_name(a).trim_end_matches(".claim").to_string();
    get_fails(env, repo, &wal_a, &file_name(a));
    fs::write(a, &ba).unwrap();
    fs::write(b, &bb).unwrap();
    let (run, _) = archive_get(env, repo, &wal_a);
    run.ok();
}

/// A missing or wrong key: one line naming what could not be opened, a
/// hint, exit 15; archive-get stops recovery instead of ending it.
fn missing_and_wrong_keys(env: &TestEnv, repo: &Repo, seg: &str) -> Vec<Run> {
    let mut runs = Vec::new();
    let none = without_key(repo);
    let run = none.run(env, As::Root, &["info"], env.dir());
    run.expect_code(EXIT_KEY)
        .expect_one_error_line("stanza.pgv");
    assert!(
        run.stderr.contains("hint: set repo-cipher-type"),
        "{}",
        run.stderr
    );
    runs.push(run);
    runs.push(get_fails(env, &none, seg, "stanza.pgv"));

    let wrong = key_file(env, "wrong");
    let bad = with_key(repo, &wrong);
    let run = bad.run(env, As::Root, &["info"], env.dir());
    run.expect_code(EXIT_KEY)
        .expect_one_error_line("is not a key of stanza");
    assert!(run.stderr.contains("hint: "), "{}", run.stderr);
    runs.push(run);
    runs.push(get_fails(env, &bad, seg, "is not a key of stanza"));

    let short = env.dir().join("short.key");
    fs::write(&short, "too short\n").unwrap();
    let typed = plus(&none, "PGVAULT_REPO_CIPHER_TYPE", CIPHER);
    let run = typed.run(env, As::Root, &["info"], env.dir());
    run.expect_code(EXIT_KEY)
        .expect_one_error_line("no key is given");
    runs.push(run);
    let run = plus(
        &typed,
        "PGVAULT_REPO_CIPHER_KEY_FILE",
        &short.display().to_string(),
    )
    .run(env, As::Root, &["info"], env.dir());
    run.expect_code(EXIT_KEY)
        .expect_one_error_line("at least 32 are needed");
    runs.push(run);
    runs
}

/// The key is in no output, no log line (at debug level), no process's
/// arguments while pgvault runs, and no file pgvault or PostgreSQL wrote.
fn key_never_shown(env: &TestEnv, repo: &Repo, key: &Key, mut runs: Vec<Run>) {
    let by_value = plus(&without_key(repo), "PGVAULT_REPO_CIPHER_TYPE", CIPHER);
    let by_value = plus(&by_value, "PGVAULT_REPO_CIPHER_KEY", &key.text);
    runs.push(by_value.run(
        env,
        As::Root,
        &["--log-level", "trace", "info", "--output", "json"],
        env.dir(),
    ));
    runs.last().unwrap().ok();
    // The key command takes a snapshot of every process's arguments while
    // pgvault (and the command, its child) run.
    let ps = env.dir().join("ps.txt");
    let cmd = format!(
        "ps -eo args > {} && cat {}",
        ps.display(),
        key.path.display()
    );
    let by_command = plus(
        &plus(&without_key(repo), "PGVAULT_REPO_CIPHER_TYPE", CIPHER),
        "PGVAULT_REPO_CIPHER_KEY_COMMAND",
        &cmd,
    );
    runs.push(by_command.run(env, As::Root, &["--log-level", "debug", "info"], env.dir()));
    runs.last().unwrap().ok();
    let snapshot = fs::read_to_string(&ps).expect("the key command ran");
    assert!(
        snapshot.contains("pgvault"),
        "ps saw pgvault running:\n{snapshot}"
    );
    assert!(
        !snapshot.contains(&key.text),
        "the key is in ps:\n{snapshot}"
    );
    for r in &runs {
        assert!(
            !r.stdout.contains(&key.text) && !r.stderr.contains(&key.text),
            "the key is in the output of `{}`",
            r.what
        );
    }
    // Every file pgvault and PostgreSQL wrote: repository, catalogs,
    // spools, postgresql.auto.conf (restore_command), server logs.
    let mut leaks = Vec::new();
    walk(env.dir(), &mut |p| {
        let big = fs::metadata(p).map(|m| m.len() > (2 << 20)).unwrap_or(true);
        if p.extension().is_some_and(|e| e == "key") || big {
            return;
        }
        if contains(&fs::read(p).unwrap_or_default(), key.text.as_bytes()) {
            leaks.push(p.display().to_string());
        }
    });
    assert!(leaks.is_empty(), "the key is written in {leaks:?}");
}

fn key_list(env: &TestEnv, repo: &Repo) -> Vec<Value> {
    let run = repo.run(
        env,
        As::PgUser,
        &["key", "list", "--output", "json"],
        env.dir(),
    );
    run.ok();
    serde_json::from_str::<Value>(&run.stdout)
        .expect("key list JSON")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn data_objects(repo: &Repo) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut all = stored(repo);
    all.retain(|p, _| !is_key_object(p) && !p.ends_with("lock/stanza.lock"));
    all
}

/// Add a key, back up with it, retire the old key: no data object is
/// rewritten, the old key opens nothing, the older backup restores.
fn rotation(env: &TestEnv, repo: &Repo, pg: &mut Cluster, old_label: &str) {
    let k2 = key_file(env, "k2");
    let before = data_objects(repo);
    let add = plus(
        repo,
        "PGVAULT_REPO_CIPHER_NEW_KEY_FILE",
        &k2.path.display().to_string(),
    );
    add.run(env, As::PgUser, &["key", "add"], env.dir()).ok();
    let keys = key_list(env, repo);
    assert_eq!(keys.len(), 2, "{keys:?}");
    let old_id = keys
        .iter()
        .find(|k| k["configured"] == true)
        .and_then(|k| k["id"].as_str())
        .expect("the configured key is listed")
        .to_string();
    let repo2 = with_key(repo, &k2);
    // Every user of the repository moves to the new key, then the old one goes.
    pg.stop();
    pg.start_archiving(env, &repo2);
    let label2 = backup(env, &repo2, pg);
    repo2
        .run(env, As::PgUser, &["key", "retire", &old_id], env.dir())
        .ok();
    let after = data_objects(repo);
    for (p, bytes) in &before {
        assert!(after.get(p) == Some(bytes), "{} was rewritten", p.display());
    }
    assert_eq!(key_list(env, &repo2).len(), 1);
    repo.run(env, As::Root, &["info"], env.dir())
        .expect_code(EXIT_KEY)
        .expect_one_error_line("is not a key of stanza");
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, ARCHIVE_TIMEOUT);
    let mut n = restore_promoted(
        env,
        &repo2,
        As::PgUser,
        "rotated",
        &[
            "--set",
            old_label,
            "--target",
            "immediate",
            "--target-action",
            "promote",
            "--archive-mode",
            "off",
        ],
        "P|5",
    );
    n.stop();
    assert!(!label2.is_empty());
}

#[test]
fn encrypted_local_repository() {
    let env = TestEnv::new();
    let k1 = key_file(&env, "k1");
    let repo = with_key(&env.local_repo("enc"), &k1);
    let mut pg = primary(&env, &repo);
    pg.psql(&format!(
        "create table secret(s text); \
         insert into secret select '{ROW_MARK}' || g from generate_series(1, 500) g"
    ));
    pg.psql("insert into t select g, 'P' from generate_series(1001, 1005) g");
    let label = backup(&env, &repo, &pg);
    let marks = write_a_then_b(&pg);

    let seg = pg.switch_wal();
    pg.wait_archived(&seg, ARCHIVE_TIMEOUT);
    let (run, dest) = archive_get(&env, &repo, &seg);
    run.ok();
    assert!(
        fs::read(&dest).unwrap() == fs::read(pg.wal_dir().join(&seg)).unwrap(),
        "archive-get of {seg} gave other bytes"
    );

    let mut n = restore_promoted(
        &env,
        &repo,
        As::PgUser,
        "enc-pitr",
        &[
            "--set",
            &label,
            "--target-time",
            &marks.time_a,
            "--target-action",
            "promote",
            "--archive-mode",
            "off",
        ],
        "A|10\nP|5",
    );
    assert_eq!(n.psql("select count(*) from secret"), "500");
    n.stop();

    let objects = stored(&repo);
    assert!(objects.len() > 20, "{} objects", objects.len());
    let found = plaintext_found(&objects, &needles(&pg));
    assert!(
        found.is_empty(),
        "plaintext in an encrypted repository: {found:#?}"
    );
    let open = unsealed(&objects);
    assert!(open.is_empty(), "objects not sealed: {open:#?}");

    // verify opens every object.
    let verify = repo.run(&env, As::PgUser, &["verify"], env.dir());
    verify.ok();
    // check proves the key before it proves archiving, and a wrong key
    // fails there, before PostgreSQL is asked anything.
    let check = |r: &Repo| {
        let (host, port) = (pg.sockdir().display().to_string(), pg.port().to_string());
        let args = ["check", "--pg-host", &host, "--pg-port", &port];
        r.run(&env, As::PgUser, &args, env.dir())
    };
    let run = check(&repo);
    assert!(
        run.ok()
            .stderr
            .contains("opens stanza enc and seals its objects"),
        "{}",
        run.stderr
    );
    check(&with_key(&repo, &key_file(&env, "other")))
        .expect_code(EXIT_KEY)
        .expect_one_error_line("is not a key of stanza");

    // Claims enough that two have one size (their compressed JSON varies
    // by a few bytes): the swap below needs a pair.
    let mut last = seg.clone();
    for _ in 0..16 {
        last = pg.switch_wal();
    }
    pg.wait_archived(&last, ARCHIVE_TIMEOUT);
    tampering(&env, &repo, &seg);
    let runs = missing_and_wrong_keys(&env, &repo, &seg);
    key_never_shown(&env, &repo, &k1, runs);
    rotation(&env, &repo, &mut pg, &label);
    pg.stop();
}

#[test]
fn encrypted_s3_moto() {
    let env = TestEnv::new();
    let Some(server) = require_server(env.moto.clone(), "PGVAULT_TEST_MOTO") else {
        return;
    };
    let k1 = key_file(&env, "k1");
    let repo = with_key(&env.s3_repo(&server, "enc"), &k1);
    let mut pg = primary(&env, &repo);
    pg.psql("insert into t select g, 'P' from generate_series(1001, 1005) g");
    let label = backup(&env, &repo, &pg);
    let marks = write_a_then_b(&pg);
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, ARCHIVE_TIMEOUT);
    let (run, dest) = archive_get(&env, &repo, &seg);
    run.ok();
    assert!(fs::read(&dest).unwrap() == fs::read(pg.wal_dir().join(&seg)).unwrap());
    let mut n = restore_promoted(
        &env,
        &repo,
        As::PgUser,
        "enc-s3",
        &[
            "--set",
            &label,
            "--target-time",
            &marks.time_a,
            "--target-action",
            "promote",
            "--archive-mode",
            "off",
        ],
        "A|10\nP|5",
    );
    n.stop();
    repo.run(&env, As::PgUser, &["verify"], env.dir()).ok();
    without_key(&repo)
        .run(&env, As::Root, &["info"], env.dir())
        .expect_code(EXIT_KEY)
        .expect_one_error_line("stanza.pgv");
    pg.stop();
}

/// The `encryption` part of `info --output json`.
fn info_encryption(env: &TestEnv, repo: &Repo) -> Value {
    let run = repo.run(env, As::Root, &["info", "--output", "json"], env.dir());
    run.ok();
    let v: Value = serde_json::from_str(&run.stdout).expect("info JSON");
    v["encryption"].clone()
}

#[test]
fn encryption_switched_on_for_an_existing_stanza() {
    let env = TestEnv::new();
    let plain = env.local_repo("late");
    let mut pg = primary(&env, &plain);
    pg.psql(&format!(
        "create table secret(s text); \
         insert into secret select '{ROW_MARK}' || g from generate_series(1, 500) g"
    ));
    pg.psql("insert into t select g, 'P' from generate_series(1001, 1005) g");
    let old = backup(&env, &plain, &pg);
    // The scan finds each known plaintext in a plaintext repository: its
    // silence about an encrypted one means something.
    let found = plaintext_found(&stored(&plain), &needles(&pg));
    for (what, _) in needles(&pg) {
        assert!(
            found.iter().any(|f| f.starts_with(what)),
            "{what} not found in a plaintext repository: {found:#?}"
        );
    }

    let k = key_file(&env, "late");
    let enc = with_key(&plain, &k);
    enc.run(&env, As::PgUser, &["key", "add"], env.dir()).ok();
    // The stanza object is sealed at once: a host left without the key
    // fails instead of writing plaintext into the encrypted stanza.
    plain
        .run(&env, As::Root, &["info"], env.dir())
        .expect_code(EXIT_KEY)
        .expect_one_error_line("stanza.pgv");
    pg.stop();
    pg.start_archiving(&env, &enc);
    let marks = write_a_then_b(&pg);
    let new = backup(&env, &enc, &pg);
    let e = info_encryption(&env, &enc);
    assert!(e["plaintext_objects"].as_u64().unwrap() > 0, "{e}");
    assert!(
        e["objects"].as_u64() > e["plaintext_objects"].as_u64(),
        "{e}"
    );
    let text = enc.run(&env, As::Root, &["info"], env.dir());
    assert!(
        text.ok().stdout.contains("still plaintext"),
        "{}",
        text.stdout
    );

    // The backup from before (plaintext, and WAL from both sides) and the
    // one from after.
    let mut n = restore_promoted(
        &env,
        &enc,
        As::PgUser,
        "late-old",
        &[
            "--set",
            &old,
            "--target-time",
            &marks.time_a,
            "--target-action",
            "promote",
            "--archive-mode",
            "off",
        ],
        "A|10\nP|5",
    );
    n.stop();
    let mut n = restore_promoted(
        &env,
        &enc,
        As::PgUser,
        "late-new",
        &[
            "--set",
            &new,
            "--target",
            "immediate",
            "--target-action",
            "promote",
            "--archive-mode",
            "off",
        ],
        "A|10\nB|10\nP|5",
    );
    n.stop();

    let run = enc.run(&env, As::PgUser, &["verify", "--reencrypt"], env.dir());
    assert!(run.ok().stdout.contains("sealed "), "{}", run.stdout);
    // What is left in plaintext is the old backup's data objects alone.
    let objects = stored(&plain);
    let old_data = format!("/backup/{old}/data/");
    let open = unsealed(&objects);
    assert!(!open.is_empty());
    for p in &open {
        assert!(p.contains(&old_data), "{p} is still plaintext");
    }
    let found = plaintext_found(&objects, &needles(&pg));
    for f in &found {
        assert!(f.contains(&old_data), "after --reencrypt: {f}");
    }
    let e = info_encryption(&env, &enc);
    assert_eq!(e["plaintext_objects"], e["plaintext_backup_objects"], "{e}");
    let mut n = restore_promoted(
        &env,
        &enc,
        As::PgUser,
        "late-sealed",
        &[
            "--set",
            &old,
            "--target",
            "immediate",
            "--target-action",
            "promote",
            "--archive-mode",
            "off",
        ],
        "P|5",
    );
    n.stop();
    pg.stop();
}
