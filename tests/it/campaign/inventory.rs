//! What a local repository holds, read from outside pgvault (its layout is
//! docs/repository-format.md): which backups are complete, which WAL names
//! are claimed by which content — and everything else, which nothing
//! points to: orphans.
//!
//! After every command of a crash case has been re-run to success and
//! `expire` has run once more "a day later" (every file's time set back,
//! [`age`]), the repository must hold no orphan: whatever a crash left
//! behind was either finished by the re-run or swept by `expire`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::common::*;

/// A local repository's objects, by what they are.
#[derive(Debug, Default)]
pub struct Inventory {
    /// Complete backups (a readable manifest): label -> its data objects.
    pub backups: BTreeMap<String, BTreeSet<String>>,
    /// WAL names with a readable claim: name -> claimed SHA-256 (hex).
    pub claims: BTreeMap<String, String>,
    /// Data objects: (name, sha) -> path.
    pub contents: BTreeMap<(String, String), PathBuf>,
    /// Files nothing points to, each with why (relative to the repository).
    pub orphans: Vec<String>,
    /// A stanza lock object, if one is there.
    pub lock: Option<PathBuf>,
    /// Every file, relative to the repository root.
    pub files: usize,
}

fn rel(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).unwrap_or(p).display().to_string()
}

/// Every file below `dir`.
pub fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    walk(dir, &mut |p| v.push(p.to_path_buf()));
    v.sort();
    v
}

/// A copy of the local repository `repo` (owners and times kept), in a
/// new directory of the test named after `what`.
pub fn copy_repo(env: &TestEnv, repo: &Repo, what: &str) -> Repo {
    let src = repo.local.as_ref().expect("a local repository");
    let dir = env.dir().join(format!("{what}-{}", unique()));
    env.run_ok(
        As::Root,
        &[
            "cp",
            "-a",
            &src.display().to_string(),
            &dir.display().to_string(),
        ],
        &[],
        env.dir(),
    );
    Repo {
        url: dir.display().to_string(),
        local: Some(dir),
        ..repo.clone()
    }
}

fn json_of(path: &Path) -> Result<Value, String> {
    let bytes = fs::read(path).map_err(|e| e.to_string())?;
    let data = try_decode_envelope(&bytes)?;
    serde_json::from_slice(&data).map_err(|e| e.to_string())
}

/// `<name>-<64 hex>.<suffix>` -> (name, sha).
fn split_content(file: &str, suffix: &str) -> Option<(String, String)> {
    let stem = file.strip_suffix(suffix)?;
    let (name, sha) = stem.rsplit_once('-')?;
    (sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()))
        .then(|| (name.to_string(), sha.to_string()))
}

/// Reads the stanza `stanza` of the local repository at `root`.
pub fn inventory(root: &Path, stanza: &str) -> Inventory {
    let mut inv = Inventory::default();
    let files = all_files(root);
    inv.files = files.len();
    let base = root.join(stanza);
    // Manifests first: they decide which backup objects are referenced.
    for f in &files {
        let Ok(r) = f.strip_prefix(base.join("backup")) else {
            continue;
        };
        let parts: Vec<&str> = r.iter().filter_map(|c| c.to_str()).collect();
        if parts.len() == 2 && parts[1] == "manifest.pgv" {
            let dir = f.parent().expect("a manifest's directory");
            match backup_files(dir) {
                Ok(files) => {
                    let mut objects: BTreeSet<String> = files
                        .iter()
                        .filter_map(|e| e["object"].as_str().map(String::from))
                        .collect();
                    // Written with the data, before the manifest.
                    objects.insert("blocksums.pgv".into());
                    // Format 2: the file list is an object of the backup.
                    objects.insert("files.pgv".into());
                    inv.backups.insert(parts[0].to_string(), objects);
                }
                Err(e) => inv
                    .orphans
                    .push(format!("{}: unreadable manifest ({e})", rel(root, f))),
            }
        }
    }
    let mut summaries = Vec::new();
    for f in &files {
        let r = rel(root, f);
        let file = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let Ok(inner) = f.strip_prefix(&base) else {
            // The local backend's lock stripes, shared by the stanzas.
            if !r.starts_with(".pgvault-locks/") {
                inv.orphans.push(format!("{r}: outside the stanza"));
            }
            continue;
        };
        let parts: Vec<&str> = inner.iter().filter_map(|c| c.to_str()).collect();
        // A local backend's lock file of a directory it replaces or deletes
        // in (`.pgvault-dirlock`, before they moved to `.pgvault-locks/`)
        // belongs to the directory: fine where the directory is pgvault's,
        // left behind in a backup's that is gone.
        let dirlock = file == ".pgvault-dirlock";
        match parts.as_slice() {
            _ if dirlock && !inner.starts_with("backup") => {}
            ["backup", _] if dirlock => {}
            ["backup", label, ..] if dirlock && inv.backups.contains_key(*label) => {}
            ["stanza.pgv"] => {}
            ["lock", "stanza.lock"] => inv.lock = Some(f.clone()),
            ["backup", label, "manifest.pgv"] if inv.backups.contains_key(*label) => {}
            ["backup", label, rest @ ..] => {
                let object = rest.join("/");
                match inv.backups.get(*label) {
                    Some(objects) if objects.contains(&object) => {}
                    Some(_) => inv
                        .orphans
                        .push(format!("{r}: not in backup {label}'s manifest")),
                    None if object != "manifest.pgv" => inv
                        .orphans
                        .push(format!("{r}: backup {label} has no manifest")),
                    None => {} // unreadable: reported above
                }
            }
            ["archive", _db, _dir, _] if file.ends_with(".claim") => {
                let name = file.trim_end_matches(".claim").to_string();
                match json_of(f) {
                    Ok(c) => match c["sha256"].as_str() {
                        Some(sha) => {
                            inv.claims.insert(name, sha.to_string());
                        }
                        None => inv.orphans.push(format!("{r}: claim without sha256")),
                    },
                    Err(e) => inv.orphans.push(format!("{r}: unreadable claim ({e})")),
                }
            }
            ["archive", _db, _dir, _] => {
                if let Some(key) = split_content(&file, ".zst") {
                    inv.contents.insert(key, f.clone());
                } else if let Some(key) =
                    split_content(&file, ".summary").or_else(|| split_content(&file, ".blockrefs"))
                {
                    // A summary, or its sibling the block references
                    // (incremental backups read them).
                    summaries.push((key, r));
                } else {
                    inv.orphans.push(format!("{r}: not a pgvault object"));
                }
            }
            _ => inv.orphans.push(format!("{r}: not a pgvault object")),
        }
    }
    for ((name, sha), path) in &inv.contents {
        match inv.claims.get(name) {
            Some(claimed) if claimed == sha => {}
            Some(claimed) => inv.orphans.push(format!(
                "{}: content of {name} that its claim ({}) does not name",
                rel(root, path),
                &claimed[..12.min(claimed.len())]
            )),
            None => inv.orphans.push(format!(
                "{}: content of {name}, which has no claim",
                rel(root, path)
            )),
        }
    }
    for (name, sha) in &inv.claims {
        if !inv.contents.contains_key(&(name.clone(), sha.clone())) {
            inv.orphans.push(format!(
                "{name}: claimed content {} is missing",
                &sha[..12.min(sha.len())]
            ));
        }
    }
    for (key, r) in summaries {
        if !inv.contents.contains_key(&key) {
            inv.orphans.push(format!(
                "{r}: summary or block references of content that is not stored"
            ));
        }
    }
    inv
}

/// "A day later": sets every file's and directory's times below `root`
/// back by `hours`, so that what a crash left is as old as a real leftover
/// would be when `expire` next runs.
pub fn age(root: &Path, hours: u32) {
    let out = Command::new("find")
        .arg(root)
        .args([
            "-exec",
            "touch",
            "-h",
            "-d",
            &format!("{hours} hours ago"),
            "{}",
            "+",
        ])
        .output()
        .expect("run find | touch");
    assert!(
        out.status.success(),
        "age {}: {}",
        root.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `verify --output json`: its exit code and the problems it listed
/// (`kind: what: detail`).
pub fn verify(env: &TestEnv, repo: &Repo) -> (Option<i32>, Vec<String>, Run) {
    let run = repo.run(env, As::Root, &["verify", "--output", "json"], env.dir());
    let problems = serde_json::from_str::<Value>(&run.stdout)
        .ok()
        .and_then(|v| v["problems"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|p| {
            format!(
                "{}: {}: {}",
                p["kind"].as_str().unwrap_or("?"),
                p["what"].as_str().unwrap_or("?"),
                p["detail"].as_str().unwrap_or("?")
            )
        })
        .collect();
    (run.code, problems, run)
}

/// The end state every case must reach, once its commands were re-run to
/// success: "a day later", `expire` (keeping every backup: `keep` full
/// backups) sweeps what crashes left; then nothing in the repository is an
/// orphan, no lock is left, and `verify` exits 0. Returns the problems.
pub fn settle(env: &TestEnv, repo: &Repo, keep: usize) -> Vec<String> {
    settle_except(env, repo, keep, &BTreeSet::new())
}

/// [`settle`], leaving out orphans in `known` (those of the repository a
/// case started from, reported already).
pub fn settle_except(
    env: &TestEnv,
    repo: &Repo,
    keep: usize,
    known: &BTreeSet<String>,
) -> Vec<String> {
    let root = repo.local.as_ref().expect("a local repository");
    let mut problems = Vec::new();
    age(root, 30);
    let keep = keep.max(1).to_string();
    let run = repo.run(
        env,
        As::PgUser,
        &["expire", "--retention-full", &keep],
        env.dir(),
    );
    if run.code != Some(0) {
        problems.push(format!(
            "expire a day later exited {:?}: {}",
            run.code,
            run.stderr.trim()
        ));
    }
    let inv = inventory(root, &repo.stanza);
    for o in inv.orphans.iter().filter(|o| !known.contains(*o)) {
        problems.push(format!("left behind, not swept by expire: {o}"));
    }
    if let Some(l) = &inv.lock {
        problems.push(format!("a stanza lock is left behind: {}", l.display()));
    }
    let (code, found, run) = verify(env, repo);
    if code != Some(0) {
        problems.push(format!(
            "verify exited {code:?}: {}{}",
            found.join("; "),
            run.stderr.trim()
        ));
    }
    problems
}
