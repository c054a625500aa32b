//! A full disk (ENOSPC), on size-limited tmpfs file systems the test mounts
//! (it runs as root): under the repository, under a restore target, and
//! under the destination of `archive-get`.
//!
//! Every command that meets the full disk fails with one clear error line
//! naming the path and the cause; nothing half-written is taken as
//! complete (no manifest for a failed backup, `verify` clean, no
//! `global/pg_control` in a failed restore, nothing at archive-get's
//! destination); the failed attempts do not keep the disk full (no
//! temporary files left behind: PostgreSQL retries `archive_command`
//! every few seconds, forever); and once space is freed the same command
//! succeeds.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::inventory::{all_files, inventory, settle};
use super::*;

/// A tmpfs of `mb` MiB mounted at `dir`, owned by `uid:gid`, mode 0700;
/// unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, mb: u32, uid: u32, gid: u32) -> Tmpfs {
        fs::create_dir_all(dir).expect("create the mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={mb}m,mode=0700,uid={uid},gid={gid}"))
            .args(["tmpfs"])
            .arg(dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mount a {mb} MiB tmpfs at {} (the test runs as root): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            dir: dir.to_path_buf(),
        }
    }

    fn resize(&self, mb: u32) {
        let out = Command::new("mount")
            .args(["-o", &format!("remount,size={mb}m")])
            .arg(&self.dir)
            .output()
            .expect("run mount -o remount");
        assert!(
            out.status.success(),
            "resize {}: {}",
            self.dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Fills the file system of `dir` but for about `leave` bytes, with a file
/// `dir/filler`; returns its path.
fn fill(dir: &Path, leave: u64) -> PathBuf {
    let path = dir.join("filler");
    let mut f = fs::File::create(&path).expect("create the filler");
    let chunk = vec![0xA5u8; 64 << 10];
    loop {
        let free = free_bytes(dir);
        if free <= leave + chunk.len() as u64 {
            let rest = free.saturating_sub(leave) as usize;
            let _ = f.write_all(&chunk[..rest.min(chunk.len())]);
            break;
        }
        if f.write_all(&chunk).is_err() {
            break;
        }
    }
    let _ = f.sync_all();
    path
}

fn free_bytes(dir: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(dir)
        .output()
        .expect("run df");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(0)
}

/// A failure at a full disk: one clear error line, saying so and naming a
/// path under `under`.
fn enospc_error(run: &Run, under: &Path) -> Result<(), String> {
    clear_error(run)?;
    let line = run
        .stderr_lines()
        .into_iter()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default()
        .to_string();
    if !line.contains("No space left on device") {
        return Err(format!("the error does not say the disk is full: {line}"));
    }
    if !line.contains(&under.display().to_string()) {
        return Err(format!(
            "the error names no path under {}: {line}",
            under.display()
        ));
    }
    Ok(())
}

/// pgvault's temporary files below `dir` that stay (there now, and two
/// seconds later): what a failed write left instead of removing it. (One
/// being written now is gone by then, at a full disk.)
fn temporaries(dir: &Path) -> Vec<String> {
    let look = || -> BTreeSet<String> {
        all_files(dir)
            .into_iter()
            .filter_map(|p| {
                let name = p.file_name()?.to_string_lossy().into_owned();
                (name.contains("pgvault-tmp") || name.starts_with(".tmp-"))
                    .then(|| p.display().to_string())
            })
            .collect()
    };
    let first = look();
    std::thread::sleep(Duration::from_secs(2));
    first.intersection(&look()).cloned().collect()
}

#[test]
fn full_disks() {
    let mut c = Campaign::new("full_disks");
    let env = TestEnv::new();

    // The repository on 40 MiB.
    let mnt = env.dir().join("repo-fs");
    let fs_repo = Tmpfs::mount(&mnt, 40, env.uid, env.gid);
    let repo_dir = mnt.join("repo");
    fs::create_dir(&repo_dir).expect("mkdir repo");
    chown(&repo_dir, env.uid, env.gid);
    let repo = Repo {
        url: repo_dir.display().to_string(),
        stanza: "campaign".into(),
        env: Vec::new(),
        local: Some(repo_dir.clone()),
    };
    let mut pg = Cluster::init(&env, small_segments());
    pg.set_conf("wal_keep_size = 1GB\n");
    stanza_create(&env, &repo, pg.pgdata());
    pg.start_archiving(&env, &repo);
    pg.psql("create table t as select g from generate_series(1, 20000) g");
    let first = backup(&env, &repo, &pg);

    // A backup into a repository with room for WAL but not for it.
    let ctx = format!("seed {} backup into a full repository", c.seed);
    let filler = fill(&mnt, 1 << 20);
    let args = with_cluster(&pg, &["backup", "--type", "full", "--start-fast"]);
    let failed = exec(&env, &repo, As::PgUser, &args, &[]);
    if failed.code == Some(0) {
        c.problem(&ctx, "succeeded in 1 MiB");
    } else {
        c.count("commands failed clearly at a full disk", 1);
        if let Err(e) = enospc_error(&failed, &repo_dir) {
            c.problem(&ctx, e);
        }
    }
    let inv = inventory(&repo_dir, &repo.stanza);
    if inv.backups.keys().collect::<Vec<_>>() != [&first] {
        c.problem(
            &ctx,
            format!("complete backups now: {:?}", inv.backups.keys()),
        );
    }
    let left = temporaries(&repo_dir.join(&repo.stanza).join("backup"));
    if !left.is_empty() {
        c.problem(
            &ctx,
            format!("the failed backup left temporary files: {left:?}"),
        );
    }

    // WAL into a repository with no room at all: PostgreSQL retries.
    let ctx = format!("seed {} archive-push into a full repository", c.seed);
    let more = fill(&mnt, 0);
    let failed_before: u64 = pg
        .psql("select failed_count from pg_stat_archiver")
        .parse()
        .unwrap_or(0);
    let mut last = String::new();
    for i in 0..3 {
        pg.psql(&format!("insert into t values ({i})"));
        last = pg.switch_wal();
    }
    let start = Instant::now();
    loop {
        let failed: u64 = pg
            .psql("select failed_count from pg_stat_archiver")
            .parse()
            .unwrap_or(0);
        if failed >= failed_before + 3 {
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            c.problem(
                &ctx,
                format!("only {} archive_command failures", failed - failed_before),
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Between PostgreSQL's retries nothing of pgvault's may keep working
    // at a disk that stays full (a helper retrying in a loop).
    let before = pgvault_cpu_ticks(&env);
    std::thread::sleep(Duration::from_secs(3));
    let after = pgvault_cpu_ticks(&env);
    for (pid, t) in &after {
        if let Some(b) = before.get(pid) {
            if t - b > 30 {
                c.problem(
                    &ctx,
                    format!(
                        "pgvault process {pid} ({}) used {} ms of CPU in 3 s at the full repository: \
                         it keeps retrying",
                        fs::read_to_string(format!("/proc/{pid}/cmdline"))
                            .unwrap_or_default()
                            .replace('\0', " ")
                            .trim(),
                        (t - b) * 10
                    ),
                );
            }
        }
    }
    let log = pg.log_tail(usize::MAX);
    let errors: Vec<&str> = log.lines().filter(|l| l.starts_with("error:")).collect();
    c.count("archive-push failures at a full disk", errors.len() as u64);
    for e in errors.iter().filter(|e| {
        !(e.contains("No space left on device") && e.contains(&repo_dir.display().to_string()))
    }) {
        c.problem(
            &ctx,
            format!("an error line that does not name the full disk's path: {e}"),
        );
    }
    let left = temporaries(&repo_dir.join(&repo.stanza).join("archive"));
    if !left.is_empty() {
        c.problem(
            &ctx,
            format!(
                "{} failed pushes left temporary files that keep the disk full: {left:?}",
                errors.len()
            ),
        );
    }
    // Nothing half-written is taken as complete: verify reads only.
    let (code, found, vrun) = super::inventory::verify(&env, &repo);
    if code != Some(0) {
        c.problem(
            &ctx,
            format!(
                "verify on the full repository exited {code:?}: {} {}",
                found.join("; "),
                vrun.stderr.trim()
            ),
        );
    }

    // Space freed: PostgreSQL's retries and the same backup succeed.
    let ctx = format!("seed {} after space was freed", c.seed);
    let _ = fs::remove_file(&more);
    let _ = fs::remove_file(&filler);
    c.guard(&ctx, || wait_archived(&pg, &last));
    let again = exec(&env, &repo, As::PgUser, &args, &[]);
    let label = if again.code == Some(0) {
        c.count("commands that succeeded once space was freed", 1);
        again.stdout.trim().to_string()
    } else {
        c.problem(
            &ctx,
            format!(
                "the same backup exited {:?}: {}",
                again.code,
                again.stderr.trim()
            ),
        );
        first.clone()
    };
    let rows = pg.psql("select count(*) from t");
    pg.stop();
    for p in settle(&env, &repo, 10) {
        c.problem(&ctx, p);
    }

    // A restore target with room for half the cluster.
    let ctx = format!("seed {} restore into a full directory", c.seed);
    let mut node = Node::new(&env, &repo, "full");
    let fs_target = Tmpfs::mount(&node.pgdata, 12, env.uid, env.gid);
    let args = restore_args(&node.pgdata, &label, &TO_ARCHIVE_END);
    let failed = exec(&env, &repo, As::PgUser, &args, &[]);
    if failed.code == Some(0) {
        c.problem(&ctx, "succeeded in 12 MiB");
    } else {
        c.count("commands failed clearly at a full disk", 1);
        if let Err(e) = enospc_error(&failed, &node.pgdata) {
            c.problem(&ctx, e);
        }
    }
    if node.pgdata.join("global/pg_control").exists() {
        c.problem(
            &ctx,
            "the failed restore left global/pg_control: PostgreSQL would start it",
        );
    }
    fs_target.resize(256);
    let mut again = exec(&env, &repo, As::PgUser, &args, &[]);
    if again.code == Some(2) && again.stderr.contains("--delta") {
        let mut delta = args.clone();
        delta.push("--delta".into());
        again = exec(&env, &repo, As::PgUser, &delta, &[]);
    }
    if again.code != Some(0) {
        c.problem(
            &ctx,
            format!(
                "the restore after space was freed exited {:?}: {}",
                again.code,
                again.stderr.trim()
            ),
        );
    } else {
        c.count("commands that succeeded once space was freed", 1);
        c.guard(&ctx, || {
            node.start();
            node.wait_promoted();
            assert_eq!(
                node.psql("select count(*) from t"),
                rows,
                "rows after the restore"
            );
            node.stop();
            node.checksums();
        });
    }
    drop(node);
    drop(fs_target);

    // archive-get into a full pg_wal: 254, never 1, nothing at the
    // destination; then the file, byte-identical.
    let ctx = format!("seed {} archive-get into a full directory", c.seed);
    let dest_dir = env.dir().join("full-pg_wal");
    let fs_dest = Tmpfs::mount(&dest_dir, 1, env.uid, env.gid);
    let filler = fill(&dest_dir, 64 << 10);
    let dest = dest_dir.join("RECOVERYXLOG");
    let args: Vec<String> = vec![
        "--archive-get-ahead".into(),
        "0".into(),
        "archive-get".into(),
        last.clone(),
        dest.display().to_string(),
    ];
    let failed = exec(&env, &repo, As::PgUser, &args, &[]);
    match failed.code {
        Some(254) => {
            c.count("commands failed clearly at a full disk", 1);
            if let Err(e) = enospc_error(&failed, &dest_dir) {
                c.problem(&ctx, e);
            }
        }
        code => c.problem(
            &ctx,
            format!("exit {code:?} (want 254): {}", failed.stderr.trim()),
        ),
    }
    let left: Vec<String> = fs::read_dir(&dest_dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "filler")
                .collect()
        })
        .unwrap_or_default();
    if !left.is_empty() {
        c.problem(&ctx, format!("left in the destination directory: {left:?}"));
    }
    let _ = fs::remove_file(&filler);
    let again = exec(&env, &repo, As::PgUser, &args, &[]);
    if again.code != Some(0) || fs::read(&dest).ok() != fs::read(pg.wal_dir().join(&last)).ok() {
        c.problem(
            &ctx,
            format!(
                "after space was freed: exit {:?}: {}",
                again.code,
                again.stderr.trim()
            ),
        );
    } else {
        c.count("commands that succeeded once space was freed", 1);
    }
    drop(fs_dest);
    drop(fs_repo);
    c.finish();
}
