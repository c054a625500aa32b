//! Bit rot: one flipped bit in one random repository object of each kind
//! in turn — archived WAL, its claim, its summary, a backup's data object,
//! its manifest, the stanza file — each in a fresh copy of one repository
//! (a backup, and WAL after it).
//!
//! A flip may be harmless: the object still decodes to exactly its
//! original bytes (a zstd header field, a reserved byte); this test's own
//! decoder (common::objects) tells. Every other flip must be caught:
//! `verify` names the object (exit 11; a damaged stanza file, which verify
//! cannot read past, may instead stop it with an error naming it);
//! `archive-get` of a damaged WAL name refuses with 254 — never 0 with other
//! bytes, never 1, which would end recovery — and leaves nothing at the
//! destination; `restore` of a damaged backup refuses and leaves no
//! `global/pg_control` (PostgreSQL cannot start what it wrote).
//!
//! Then the end to end case: a flip in a segment that recovery needs, and
//! PostgreSQL's recovery from that archive must stop with FATAL instead of
//! replaying other bytes.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::inventory::{all_files, copy_repo};
use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Wal,
    Claim,
    Summary,
    BackupData,
    /// A backup's block sums: verify names them; restore does not read
    /// them (only `--delta` and incrementals do), so it still succeeds.
    BlockSums,
    Manifest,
    Stanza,
}

const KINDS: [Kind; 7] = [
    Kind::Wal,
    Kind::Claim,
    Kind::Summary,
    Kind::BackupData,
    Kind::BlockSums,
    Kind::Manifest,
    Kind::Stanza,
];

impl Kind {
    fn of(rel: &str) -> Option<Kind> {
        let file = rel.rsplit('/').next().unwrap_or(rel);
        if rel.contains("/archive/") {
            if file.ends_with(".claim") {
                Some(Kind::Claim)
            } else if file.ends_with(".summary") {
                Some(Kind::Summary)
            } else if file.ends_with(".zst") && !file.contains(".history") {
                Some(Kind::Wal)
            } else {
                None
            }
        } else if rel.contains("/backup/") {
            if file == "manifest.pgv" {
                Some(Kind::Manifest)
            } else if file == "blocksums.pgv" {
                Some(Kind::BlockSums)
            } else {
                Some(Kind::BackupData)
            }
        } else if file == "stanza.pgv" {
            Some(Kind::Stanza)
        } else {
            None
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Wal => "WAL",
            Kind::Claim => "claim",
            Kind::Summary => "summary",
            Kind::BackupData => "backup data",
            Kind::BlockSums => "block sums",
            Kind::Manifest => "manifest",
            Kind::Stanza => "stanza file",
        }
    }
}

/// The repository every case copies: a backup of a small cluster and WAL
/// after it, the primary stopped.
struct Golden {
    env: TestEnv,
    repo: Repo,
    label: String,
    /// Segments archived after the backup, and the originals.
    after: Vec<String>,
    wal: PathBuf,
    _pg: Cluster,
}

fn golden() -> Golden {
    let env = TestEnv::new();
    let repo = env.local_repo("campaign");
    let mut pg = Cluster::init(&env, small_segments());
    pg.set_conf("wal_keep_size = 1GB\n");
    stanza_create(&env, &repo, pg.pgdata());
    pg.start_archiving(&env, &repo);
    pg.psql("create table t as select g from generate_series(1, 20000) g");
    let label = backup(&env, &repo, &pg);
    let mut after = Vec::new();
    for i in 0..4 {
        pg.psql(&format!("insert into t values ({i})"));
        after.push(pg.switch_wal());
    }
    pg.wait_archived(after.last().expect("segments"), Duration::from_secs(120));
    pg.stop();
    let wal = pg.wal_dir();
    Golden {
        env,
        repo,
        label,
        after,
        wal,
        _pg: pg,
    }
}

/// Which archived name an archive object is for (`<name>-<sha>.zst`,
/// `<name>.claim`, `<name>-<sha>.summary`), whole: a backup history file's
/// (`<segment>.<offset>.backup`) is not its segment's.
fn wal_name_of(file: &str) -> String {
    let base = file.rsplit('/').next().unwrap_or(file);
    let name = match base.strip_suffix(".claim") {
        Some(n) => n,
        None => base.split('-').next().unwrap_or(base),
    };
    name.to_string()
}

/// Whether the flipped `bytes` still decode to what `original` decodes to
/// (each file's envelope of a backup bundle, as the manifest places them).
/// A flip in an envelope's magic, format version, compression or
/// encryption byte (the first 12 bytes) is never harmless, even where this
/// test's decoder does not read the field.
fn harmless(original: &[u8], flipped: &[u8], slices: &[(u64, u64)], at: usize) -> bool {
    let same = |a: &[u8], b: &[u8], at: usize| {
        at >= 12
            && match (try_decode_envelope(a), try_decode_envelope(b)) {
                (Ok(x), Ok(y)) => x == y,
                _ => false,
            }
    };
    if slices.is_empty() {
        return same(original, flipped, at);
    }
    match slices
        .iter()
        .find(|(off, len)| (*off as usize..(*off + *len) as usize).contains(&at))
    {
        Some(&(off, len)) => {
            let r = off as usize..(off + len) as usize;
            same(&original[r.clone()], &flipped[r], at - off as usize)
        }
        None => true, // between the files: read by nothing
    }
}

/// (offset, length) of each file of backup `label` in `object`.
fn slices_in(root: &Path, stanza: &str, label: &str, object: &str) -> Vec<(u64, u64)> {
    let dir = root.join(stanza).join("backup").join(label);
    let Ok(files) = backup_files(&dir) else {
        return Vec::new();
    };
    files
        .iter()
        .filter(|f| f["object"].as_str() == Some(object))
        .filter_map(|f| Some((f["offset"].as_u64()?, f["length"].as_u64()?)))
        .collect()
}

#[test]
fn bit_rot_is_caught() {
    let mut c = Campaign::new("bit_rot_is_caught");
    let scale = Scale::from_env();
    let mut rng = c.rng(1);
    let g = golden();
    let root = g.repo.local.clone().expect("local");
    let objects: Vec<(Kind, String)> = all_files(&root)
        .iter()
        .filter_map(|p| {
            let rel = p.strip_prefix(&root).ok()?.display().to_string();
            Some((Kind::of(&rel)?, rel))
        })
        .collect();
    let offset = rng.below(KINDS.len() as u64) as usize;
    for i in 0..scale.flips {
        let kind = KINDS[(offset + i) % KINDS.len()];
        let of_kind: Vec<&String> = objects
            .iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, r)| r)
            .collect();
        let rel = of_kind[rng.below(of_kind.len() as u64) as usize].clone();
        let repo = copy_repo(&g.env, &g.repo, "rot");
        let path = repo.local.as_ref().expect("local").join(&rel);
        let original = fs::read(&path).expect("read the object");
        let bit = rng.below(original.len() as u64 * 8) as usize;
        let mut flipped = original.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        fs::write(&path, &flipped).expect("write the flipped object");
        let file = rel.rsplit('/').next().unwrap_or(&rel).to_string();
        let ctx = format!(
            "seed {} flip#{i}: bit {bit} of {} {rel} ({} bytes)",
            c.seed,
            kind.name(),
            original.len()
        );
        let slices = if kind == Kind::BackupData {
            let object = rel
                .split(&format!("{}/", g.label))
                .nth(1)
                .unwrap_or_default();
            slices_in(&root, &repo.stanza, &g.label, object)
        } else {
            Vec::new()
        };
        let harmless = harmless(&original, &flipped, &slices, bit / 8);
        eprintln!("{ctx}: {}", if harmless { "harmless" } else { "damaging" });
        let problems = if harmless {
            c.count("harmless flips (decode to the original bytes)", 1);
            check_harmless(&g, &repo, &file)
        } else {
            let problems = check_damage(&g, &repo, kind, &file);
            c.count(
                &format!("{} flips detected", kind.name()),
                u64::from(problems.is_empty()),
            );
            problems
        };
        c.problems(&ctx, problems);
        let _ = fs::remove_dir_all(repo.local.as_ref().expect("local"));
    }

    // End to end: PostgreSQL recovering through a damaged segment.
    let repo = copy_repo(&g.env, &g.repo, "rot");
    let victim = &g.after[1];
    let ctx = format!("seed {} recovery through damaged {victim}", c.seed);
    let objects = repo.local_wal_objects(victim);
    let object = objects.first().expect("the segment's object");
    let mut bytes = fs::read(object).expect("read the segment's object");
    // The middle of the payload: zstd data, never a header field.
    let at = bytes.len() / 2;
    bytes[at] ^= 0x10;
    fs::write(object, &bytes).expect("write the flipped object");
    match c.guard(&ctx, || recover_through_damage(&g, &repo, victim)) {
        Some(Ok(())) => c.count("damaged segments that never reached PostgreSQL", 1),
        Some(Err(e)) => c.problem(&ctx, e),
        None => {}
    }
    c.finish();
}

/// A harmless flip (a reserved byte, a zstd header field that decodes the
/// same) may go unnoticed, or be reported — but only as that object.
fn check_harmless(g: &Golden, repo: &Repo, file: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let (code, found, run) = super::inventory::verify(&g.env, repo);
    let only_it = !found.is_empty() && found.iter().all(|p| p.contains(file));
    if !(code == Some(0) || (code == Some(11) && only_it)) {
        problems.push(format!(
            "verify exited {code:?} (the object decodes to its original bytes): {}{}",
            found.join("; "),
            run.stderr.trim()
        ));
    }
    problems
}

/// `archive-get name` into a fresh directory: (exit code, whether the
/// destination holds the original's bytes, files left in the directory).
fn get(g: &Golden, repo: &Repo, name: &str) -> (Option<i32>, Option<bool>, Vec<String>) {
    let dir = g.env.mkdir(&format!("get-{}", unique()), As::Root);
    let dest = dir.join("RECOVERYXLOG");
    let run = repo.run(
        &g.env,
        As::Root,
        &[
            "--archive-get-ahead",
            "0",
            "archive-get",
            name,
            &dest.display().to_string(),
        ],
        &dir,
    );
    let same = fs::read(&dest)
        .ok()
        .map(|b| fs::read(g.wal.join(name)).is_ok_and(|o| o == b));
    let left = fs::read_dir(&dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "RECOVERYXLOG")
                .collect()
        })
        .unwrap_or_default();
    let _ = fs::remove_dir_all(&dir);
    (run.code, same, left)
}

/// What must happen for a damaging flip of `file` (a `kind` object).
fn check_damage(g: &Golden, repo: &Repo, kind: Kind, file: &str) -> Vec<String> {
    let mut problems = Vec::new();
    // verify names it.
    let (code, found, run) = super::inventory::verify(&g.env, repo);
    let named = |text: &str| {
        text.contains(file)
            || (matches!(kind, Kind::Wal | Kind::Claim | Kind::Summary)
                && text.contains(&wal_name_of(file)))
            || (matches!(kind, Kind::BackupData | Kind::BlockSums | Kind::Manifest)
                && text.contains(&g.label))
    };
    match code {
        Some(11) if found.iter().any(|p| named(p)) => {}
        Some(c) if kind == Kind::Stanza && c != 0 && c != 11 && named(&run.stderr) => {}
        _ => problems.push(format!(
            "verify did not name it (exit {code:?}): {}{}",
            found.join("; "),
            run.stderr.trim()
        )),
    }
    // archive-get refuses a damaged WAL name; the stanza file is read
    // first by every command.
    let name = match kind {
        Kind::Wal | Kind::Claim => Some(wal_name_of(file)),
        Kind::Stanza => Some(g.after[0].clone()),
        _ => None,
    };
    if let Some(name) = name {
        let (code, same, left) = get(g, repo, &name);
        match (code, same) {
            (Some(0), Some(true)) if kind == Kind::Claim => {} // the one content
            (Some(254), None) => {}
            (Some(1), _) => problems.push(format!(
                "archive-get {name} exited 1 (\"not in the archive\"): recovery would end early"
            )),
            (code, same) => problems.push(format!(
                "archive-get {name} exited {code:?}, destination {}",
                match same {
                    None => "absent",
                    Some(true) => "holds the original bytes",
                    Some(false) => "holds OTHER BYTES",
                }
            )),
        }
        if !left.is_empty() {
            problems.push(format!(
                "archive-get {name} left {left:?} beside the destination"
            ));
        }
    }
    // restore refuses a damaged backup, and PostgreSQL cannot start what it
    // wrote.
    if matches!(kind, Kind::BackupData | Kind::Manifest | Kind::Stanza) {
        let node = Node::new(&g.env, repo, "rot");
        let args = restore_args(&node.pgdata, &g.label, &TO_BACKUP_END);
        let run = exec(&g.env, repo, As::PgUser, &args, &[]);
        if run.code == Some(0) {
            problems.push("restore of the damaged backup succeeded".into());
        } else if !run.stderr.lines().any(|l| l.starts_with("error:")) {
            problems.push(format!(
                "restore failed without an error line: {}",
                run.stderr.trim()
            ));
        }
        if node.pgdata.join("global/pg_control").exists() {
            problems.push(
                "the refused restore left global/pg_control: PostgreSQL would start it".into(),
            );
        }
    }
    problems
}

/// Restore the backup, start it recovering to the end of the archive: the
/// damaged segment must stop recovery (FATAL, restore_command exit 254),
/// never be replayed.
fn recover_through_damage(g: &Golden, repo: &Repo, victim: &str) -> Result<(), String> {
    let mut node = Node::new(&g.env, repo, "rot-recovery");
    let args = restore_args(&node.pgdata, &g.label, &TO_ARCHIVE_END);
    exec(&g.env, repo, As::PgUser, &args, &[]).ok();
    if node.try_start().is_ok() {
        // Running: recovery must not get past the damaged segment.
        std::thread::sleep(Duration::from_secs(5));
        if node.try_psql("select pg_is_in_recovery()").as_deref() == Ok("f") {
            return Err(format!(
                "recovery ended and the server was promoted past damaged {victim}\n--- server log\n{}",
                node.log_tail(30)
            ));
        }
    }
    let log = node.log_text();
    if !log.contains(victim) || !log.contains("254") {
        return Err(format!(
            "the server log does not show restore_command refusing {victim} (exit 254):\n{}",
            node.log_tail(30)
        ));
    }
    Ok(())
}
