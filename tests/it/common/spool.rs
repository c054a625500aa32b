//! The local spool of look-ahead pushes and prefetches (`src/spool.rs`),
//! as the tests see it from outside, and the checks that what it says was
//! archived or prefetched is byte-identical to the original.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{unique, As, Repo, TestEnv};

pub fn sha256_file(p: &Path) -> String {
    let bytes = fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
    hex::encode(Sha256::digest(&bytes))
}

/// The postgres user's spool root (`$XDG_STATE_HOME/pgvault/spool`).
pub fn pg_spool_root(env: &TestEnv) -> PathBuf {
    let state = env
        .base_env(As::PgUser)
        .into_iter()
        .find(|(k, _)| k == "XDG_STATE_HOME")
        .map(|(_, v)| v)
        .expect("XDG_STATE_HOME in base_env");
    PathBuf::from(state).join("pgvault").join("spool")
}

pub fn is_temp(name: &str) -> bool {
    name.starts_with('.') || name.ends_with(".pgvault-tmp")
}

/// The postgres user's spool of `repo`
/// (`<root>/<sha256(identity)[..8]>-<stanza>`, the identity being the S3
/// URL, or `file://<path>` for a directory).
pub fn pg_spool_dir(env: &TestEnv, repo: &Repo) -> PathBuf {
    let identity = if repo.url.starts_with("s3://") {
        repo.url.clone()
    } else {
        format!("file://{}", repo.url)
    };
    let id = hex::encode(&Sha256::digest(identity.as_bytes())[..8]);
    pg_spool_root(env).join(format!("{id}-{}", repo.stanza))
}

/// Complete (non-temporary) files in `<spool of repo>/<sub>/`: name -> path.
pub fn spool_files(env: &TestEnv, repo: &Repo, sub: &str) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    let Ok(files) = fs::read_dir(pg_spool_dir(env, repo).join(sub)) else {
        return out;
    };
    for f in files.flatten() {
        let name = f.file_name().to_string_lossy().into_owned();
        if !is_temp(&name) {
            out.insert(name, f.path());
        }
    }
    out
}

/// Push records: segment name -> the record's text (`<sha256> <size>`).
pub fn pushed_records(env: &TestEnv, repo: &Repo) -> BTreeMap<String, String> {
    spool_files(env, repo, "pushed")
        .into_iter()
        .filter_map(|(n, p)| fs::read_to_string(p).ok().map(|t| (n, t)))
        .collect()
}

/// archive-get `name` as root (its own home and spool, no prefetch) into a
/// fresh file; returns its path, or None when the archive does not have it.
pub fn fetch(env: &TestEnv, repo: &Repo, name: &str, dir: &Path) -> Option<PathBuf> {
    let dest = dir.join(format!("{name}.{}", unique()));
    let dest_s = dest.display().to_string();
    let run = repo.run(
        env,
        As::Root,
        &["--archive-get-ahead", "0", "archive-get", name, &dest_s],
        dir,
    );
    match run.code {
        Some(0) => Some(dest),
        Some(1) => None,
        _ => {
            run.ok();
            unreachable!()
        }
    }
}

/// After a kill: every push record names bytes the store holds (and that
/// are the original's); every prefetched file in the spool is complete and
/// identical to the original.
pub fn check_after_kill(
    env: &TestEnv,
    direct: &Repo,
    wal: &Path,
    dir: &Path,
    ctx: &str,
    checked: &mut (usize, usize),
) -> Vec<String> {
    let mut problems = Vec::new();
    let records = pushed_records(env, direct);
    let prefetched = spool_files(env, direct, "get");
    checked.0 += records.len();
    checked.1 += prefetched.len();
    for (name, record) in records {
        let sha = record.split_whitespace().next().unwrap_or_default();
        let original = sha256_file(&wal.join(&name));
        if sha != original {
            problems.push(format!(
                "{ctx}: record for {name} says {sha}, the original is {original}"
            ));
        }
        match fetch(env, direct, &name, dir) {
            None => problems.push(format!(
                "{ctx}: record for {name} exists but the archive does not have it"
            )),
            Some(got) => {
                let got_sha = sha256_file(&got);
                let _ = fs::remove_file(&got);
                if got_sha != sha {
                    problems.push(format!(
                        "{ctx}: record for {name} says {sha}, the archive holds {got_sha}"
                    ));
                }
            }
        }
    }
    for (name, path) in prefetched {
        let original = wal.join(&name);
        if !original.exists() {
            problems.push(format!(
                "{ctx}: prefetched {name} is not a segment of this cluster"
            ));
            continue;
        }
        if sha256_file(&path) != sha256_file(&original) {
            problems.push(format!(
                "{ctx}: prefetched {name} ({} bytes) differs from the original",
                fs::metadata(&path).map(|m| m.len()).unwrap_or(0)
            ));
        }
    }
    problems
}

pub fn mark_done(wal: &Path, name: &str) {
    let status = wal.join("archive_status");
    let _ = fs::rename(
        status.join(format!("{name}.ready")),
        status.join(format!("{name}.done")),
    );
}

pub fn check_acknowledged_file(
    env: &TestEnv,
    direct: &Repo,
    wal: &Path,
    name: &str,
    dir: &Path,
) -> Result<(), String> {
    let Some(got) = fetch(env, direct, name, dir) else {
        return Err(format!("{name} is not in the archive"));
    };
    let same = sha256_file(&got) == sha256_file(&wal.join(name));
    let _ = fs::remove_file(&got);
    if same {
        Ok(())
    } else {
        Err(format!(
            "{name}: the archived copy differs from the original"
        ))
    }
}
