//! `restore`: lay down a backup in a data directory and write the recovery
//! configuration for a target.
//!
//! Order: choose the backup; check the target directory; create directories
//! and tablespace links; write every file (in parallel, each checked against
//! its SHA-256); write `backup_label`, `tablespace_map`, the recovery
//! settings and the signal file; flush everything to disk; and only then
//! write `global/pg_control`. Until that last file exists PostgreSQL refuses
//! to start the directory, so a restore that fails half-way can never be
//! started as if it were complete.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::catalog::Catalog;
use crate::error::{Error, Kind, Result};
use crate::ops::archive_get::fetch_small;
use crate::ops::progress::Progress;
use crate::ops::walfacts;
use crate::ops::workers;
use crate::pg::datadir::{self, EMPTY_DIRS};
use crate::pg::history::{parse_history, TimelineHistory};
use crate::pg::recovery::{self, RecoverySettings, RecoveryTarget, TargetAction};
use crate::pg::{TimelineId, WalFileKind, WalFileName};
use crate::repo::codec;
use crate::repo::layout::{self, ArchiveKey};
use crate::repo::manifest::{FileEntry, Manifest};
use crate::repo::{Backend, DbInfo, Repository, StanzaInfo};

#[derive(Debug, Clone)]
pub struct RestoreOptions {
    pub pgdata: PathBuf,
    /// A backup label; `None` for the newest that fits the target.
    pub set: Option<String>,
    pub target: Option<RecoveryTarget>,
    pub target_action: Option<TargetAction>,
    /// `latest`, `current` or a number.
    pub target_timeline: Option<String>,
    pub target_exclusive: bool,
    pub archive_mode_off: bool,
    pub tablespace_map: Vec<(u32, PathBuf)>,
    pub standby: bool,
    pub primary_conninfo: Option<String>,
    pub delta: bool,
    pub process_max: usize,
    /// The `restore_command` to write (built by the caller, who knows how
    /// this binary was invoked; it never contains a secret).
    pub restore_command: String,
    /// Refuse a target the archived WAL does not reach (`--no-target-check`
    /// turns it off).
    pub target_check: bool,
    pub catalog: Option<Catalog>,
}

#[derive(Debug, Clone)]
pub struct Restored {
    pub label: String,
    pub files: usize,
    pub bytes: u64,
    pub skipped_by_delta: usize,
    /// The PostgreSQL major that must start it (the backup's cluster's).
    pub pg_version: u32,
}

pub async fn restore(
    repo: &Repository,
    opts: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<Restored> {
    restore_inner(repo, opts, progress)
        .await
        .map_err(|e| e.context(format!("restore into {}", opts.pgdata.display())))
}

async fn restore_inner(
    repo: &Repository,
    opts: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<Restored> {
    let stanza = repo.require_stanza().await?;
    let manifests = repo.manifests().await?;
    if manifests.is_empty() {
        return Err(Error::new(
            Kind::Stanza,
            format!("stanza {:?} has no complete backup", repo.stanza()),
        )
        .hint("take one with `pgvault backup`"));
    }
    let (m, db, history) = choose_backup_and_db(repo, &stanza, &manifests, opts).await?;
    if opts.target_check {
        check_target_reachable(repo, opts, db, m, history.as_ref()).await?;
    }
    progress.message(&format!(
        "restoring backup {} (stopped {} at {}, timeline {})",
        m.label, m.stop_time, m.stop_lsn, m.timeline
    ));
    if db.id != stanza.current().id {
        progress.message(&format!(
            "backup {} is of the cluster before a pg_upgrade (PostgreSQL {}, archive {}): \
             start it with PostgreSQL {}'s binaries",
            m.label,
            db.pg_version,
            db.dir(),
            db.pg_version
        ));
    }

    let owner = target_owner(&opts.pgdata)?;
    check_target(&opts.pgdata, opts.delta)?;
    let ts_map: BTreeMap<u32, PathBuf> = opts.tablespace_map.iter().cloned().collect();
    for oid in ts_map.keys() {
        if !m.tablespaces.iter().any(|t| t.oid == *oid) {
            return Err(Error::usage(format!(
                "--tablespace-map {oid}=…: backup {} has no tablespace {oid}",
                m.label
            )));
        }
    }

    // Never onto another cluster's tablespace; checked before anything is
    // written, so a refused restore leaves everything as it was.
    for ts in &m.tablespaces {
        let location = ts_map
            .get(&ts.oid)
            .cloned()
            .unwrap_or_else(|| PathBuf::from(&ts.location));
        let nonempty = fs::read_dir(&location)
            .map(|mut r| r.next().is_some())
            .unwrap_or(false);
        if nonempty && !opts.delta {
            return Err(Error::usage(format!(
                "tablespace {} ({}) target {} is not empty",
                ts.name,
                ts.oid,
                location.display()
            ))
            .hint(format!(
                "map it elsewhere with --tablespace-map {}=/new/empty/dir",
                ts.oid
            )));
        }
    }

    let pgdata = opts.pgdata.clone();
    let m2 = m.clone();
    let delta = opts.delta;
    let ts_map2 = ts_map.clone();
    tokio::task::spawn_blocking(move || prepare_dirs(&pgdata, &m2, &ts_map2, delta)).await??;

    let control = m
        .files
        .iter()
        .find(|f| f.path == datadir::PG_CONTROL)
        .cloned()
        .ok_or_else(|| {
            Error::repository(format!("backup {} has no {}", m.label, datadir::PG_CONTROL))
        })?;
    let files: Vec<FileEntry> = m
        .files
        .iter()
        .filter(|f| f.path != datadir::PG_CONTROL)
        .cloned()
        .collect();
    progress.set_total(m.files.len() as u64, m.original_size);
    let skipped = write_files(repo, &m.label, &opts.pgdata, files, opts.delta, opts.process_max, progress.clone())
        .await
        .map_err(|e| e.hint("the data directory is incomplete and cannot be started; rerun the restore (--delta reuses what was written)"))?;

    // backup_label, tablespace_map, recovery settings, signal file.
    let pgdata = opts.pgdata.clone();
    let settings = RecoverySettings {
        restore_command: opts.restore_command.clone(),
        target: opts.target.clone(),
        target_action: opts.target_action,
        target_timeline: opts.target_timeline.clone(),
        target_exclusive: opts.target_exclusive,
        archive_mode_off: opts.archive_mode_off,
        primary_conninfo: opts.primary_conninfo.clone(),
    };
    let standby = opts.standby;
    let m3 = m.clone();
    tokio::task::spawn_blocking(move || {
        write_recovery_files(&pgdata, &m3, &ts_map, &settings, standby)
    })
    .await??;

    // Everything on disk first, then pg_control, then flush that.
    let pgdata = opts.pgdata.clone();
    let reader = repo
        .backend()
        .get(&layout::backup_object_key(
            repo.stanza(),
            &m.label,
            &control.object,
        ))
        .await?
        .ok_or_else(|| {
            Error::repository(format!(
                "backup {}: object {} is missing",
                m.label, control.object
            ))
        })?;
    let what = format!("{} ({})", control.path, control.object);
    let control_size = control.size;
    tokio::task::spawn_blocking(move || -> Result<()> {
        sync_tree(&pgdata)?;
        let mut reader = reader;
        discard(&mut reader, control.offset)?;
        let dest = pgdata.join(&control.path);
        write_one(&mut reader.take(control.length), &dest, &control, &what)?;
        File::open(&dest)
            .and_then(|f| f.sync_all())
            .map_err(local_err(&dest))?;
        fsync_dir(dest.parent().expect("global/pg_control has a parent"))?;
        if let Some((uid, gid)) = owner {
            chown_tree(&pgdata, uid, gid)?;
        }
        Ok(())
    })
    .await??;
    progress.file_done(control_size);
    progress.finish();
    Ok(Restored {
        label: m.label.clone(),
        files: m.files.len(),
        bytes: m.original_size,
        skipped_by_delta: skipped,
        pg_version: db.pg_version,
    })
}

/// Refuses, before anything is written, a target the archive cannot reach:
/// a time after the last archived commit (or abort, or restore point: the
/// records recovery can stop at), a restore point that is not in the WAL
/// recovery would replay, an LSN past its end. Files without a record
/// summary make the answer unknown: then a warning, not a refusal.
async fn check_target_reachable(
    repo: &Repository,
    opts: &RestoreOptions,
    db: &DbInfo,
    m: &Manifest,
    history: Option<&TimelineHistory>,
) -> Result<()> {
    let target = match &opts.target {
        Some(t @ (RecoveryTarget::Time(_) | RecoveryTarget::Name(_) | RecoveryTarget::Lsn(_))) => t,
        _ => return Ok(()),
    };
    let seg = db.wal_segment_size;
    let root = TimelineHistory::root(m.timeline);
    let history = history.unwrap_or(&root);
    let archived = walfacts::Archived::list(repo, db).await?;
    let path = archived.replay_path(history, m.start_lsn.segno(seg), seg);
    let sums = walfacts::load(repo, opts.catalog.as_ref(), db, &archived, &path).await?;
    let facts = walfacts::path_facts(&path, &sums, seg);
    let timeline = history.timeline;
    let window = match (&facts.last_time, path.last()) {
        (Some((t, _)), Some(last)) => format!(
            "recoverable on timeline {timeline} from backup {}: {} to {} (last archived commit), WAL up to {} ({})",
            m.label,
            m.stop_time,
            walfacts::format_us(*t),
            facts.end_lsn.unwrap_or_default(),
            last
        ),
        (None, Some(last)) => format!(
            "recoverable on timeline {timeline} from backup {}: {} to WAL {} ({}); no commit is archived after it",
            m.label,
            m.stop_time,
            facts.end_lsn.unwrap_or_default(),
            last
        ),
        (_, None) => format!(
            "the archive does not hold backup {}'s first WAL segment on timeline {timeline}",
            m.label
        ),
    };
    let refuse = |what: String| {
        Err(Error::usage(format!("{what}; {window}"))
            .hint("choose a target inside that window, or pass --no-target-check to try anyway"))
    };
    let unsure = |what: &str| {
        log::warn!(
            "cannot check {what}: {} archived segment(s) on the way have no record summary (run `pgvault backfill`)",
            facts.unsummarized.len()
        );
        Ok(())
    };
    match target {
        RecoveryTarget::Time(t) => {
            let want = t.timestamp_micros();
            match facts.last_time {
                Some((last, _)) if want <= last => Ok(()),
                _ if !facts.unsummarized.is_empty() => unsure("the target time"),
                _ => refuse(format!(
                    "target time {} is after the last archived commit",
                    recovery::format_target_time(t)
                )),
            }
        }
        RecoveryTarget::Name(n) => {
            if facts.restore_points.iter().any(|rp| &rp.name == n) {
                Ok(())
            } else if !facts.unsummarized.is_empty() {
                unsure("the restore point")
            } else {
                let known: Vec<&str> = facts
                    .restore_points
                    .iter()
                    .map(|rp| rp.name.as_str())
                    .collect();
                refuse(format!(
                    "restore point {n:?} is not in the archived WAL (restore points there: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ))
            }
        }
        RecoveryTarget::Lsn(l) => match facts.end_lsn {
            Some(end) if *l <= end => Ok(()),
            _ => refuse(format!(
                "target LSN {l} is past the end of the archived WAL"
            )),
        },
        _ => Ok(()),
    }
}

/// The history of the target timeline, when one is named (or `latest`).
async fn target_history(
    repo: &Repository,
    db_dir: &str,
    target: Option<&str>,
) -> Result<Option<TimelineHistory>> {
    let tli = match target {
        None | Some("latest") => {
            // The newest timeline with a history file in the archive.
            let listing = repo
                .backend()
                .list(&format!(
                    "{}/history",
                    layout::archive_root(repo.stanza(), db_dir)
                ))
                .await?;
            listing
                .iter()
                .filter_map(|m| match layout::parse_archive_key(&m.key) {
                    Some(ArchiveKey::Claim { name }) if name.kind() == WalFileKind::History => {
                        Some(name.timeline())
                    }
                    _ => None,
                })
                .max()
        }
        Some("current") => None,
        Some(n) => Some(
            n.parse::<TimelineId>()
                .map_err(|e| Error::usage(format!("--target-timeline: {e}")))?,
        ),
    };
    let Some(tli) = tli else {
        return Ok(None);
    };
    if tli == TimelineId::FIRST {
        return Ok(Some(TimelineHistory::root(tli)));
    }
    let name = WalFileName::history(tli);
    let Some(bytes) = fetch_small(repo, db_dir, &name).await? else {
        return Err(Error::usage(format!(
            "timeline {tli} has no history file in the archive"
        )));
    };
    let text = String::from_utf8_lossy(&bytes);
    parse_history(tli, &text)
        .map(Some)
        .map_err(|e| Error::repository(format!("{name}: {e}")))
}

/// Picks the backup and the cluster (stanza entry) whose archive recovers
/// it, and the target timeline's history read from that archive. A named
/// backup brings its own cluster (the manifest's `db_id`).
/// Otherwise the newest cluster that has backups comes first, its
/// timelines read from its own archive; only when none of its backups can
/// reach a time or LSN target are the clusters before a `pg_upgrade` tried,
/// newest first.
async fn choose_backup_and_db<'a>(
    repo: &Repository,
    stanza: &'a StanzaInfo,
    all: &'a [Manifest],
    opts: &RestoreOptions,
) -> Result<(&'a Manifest, &'a DbInfo, Option<TimelineHistory>)> {
    let tli = opts.target_timeline.as_deref();
    if opts.set.as_deref().is_some_and(|l| l != "latest") {
        let m = choose_backup(all, opts, None)?;
        let db = stanza.db(m.db_id).ok_or_else(|| {
            Error::new(
                Kind::Stanza,
                format!(
                    "backup {} belongs to cluster {} (PostgreSQL {}), which stanza {:?} does not record",
                    m.label,
                    m.db_id,
                    m.pg_version,
                    repo.stanza()
                ),
            )
        })?;
        // A timeline named that its archive does not know is refused here.
        let history = target_history(repo, &db.dir(), tli).await?;
        return Ok((m, db, history));
    }
    let mut refused: Option<Error> = None;
    for db in stanza.dbs.iter().rev() {
        let own: Vec<Manifest> = all.iter().filter(|m| m.db_id == db.id).cloned().collect();
        if own.is_empty() {
            continue;
        }
        let chosen = match target_history(repo, &db.dir(), tli).await {
            Ok(history) => choose_backup(&own, opts, history.as_ref())
                .map(|m| m.label.clone())
                .map(|label| (label, history)),
            Err(e) => Err(e),
        };
        match chosen {
            Ok((label, history)) => {
                let m = all
                    .iter()
                    .find(|m| m.label == label)
                    .expect("chosen among these manifests");
                return Ok((m, db, history));
            }
            Err(e) if e.kind() == Kind::Usage => refused = refused.or(Some(e)),
            Err(e) => return Err(e),
        }
        if !matches!(
            opts.target,
            Some(RecoveryTarget::Time(_) | RecoveryTarget::Lsn(_))
        ) {
            break;
        }
    }
    Err(refused.unwrap_or_else(|| {
        Error::new(
            Kind::Stanza,
            format!(
                "no backup of stanza {:?} belongs to a cluster it records",
                repo.stanza()
            ),
        )
    }))
}

/// Picks the backup: the named one, or the newest whose stop (as the server
/// reported it) is before the target and on the target timeline's path.
fn choose_backup<'a>(
    all: &'a [Manifest],
    opts: &RestoreOptions,
    history: Option<&TimelineHistory>,
) -> Result<&'a Manifest> {
    if let Some(label) = opts.set.as_deref().filter(|l| *l != "latest") {
        return all.iter().find(|m| m.label == label).ok_or_else(|| {
            Error::usage(format!("no complete backup labelled {label}")).hint(format!(
                "complete backups: {}",
                all.iter()
                    .map(|m| m.label.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        });
    }
    let on_path = |m: &Manifest| match history {
        None => true,
        Some(h) => {
            h.contains(m.timeline) && h.end_of(m.timeline).is_none_or(|end| m.stop_lsn <= end)
        }
    };
    let candidates: Vec<&Manifest> = all.iter().filter(|m| on_path(m)).collect();
    let fits = |m: &Manifest| match &opts.target {
        Some(RecoveryTarget::Time(t)) => m.stop_time_utc().is_some_and(|s| s < *t),
        Some(RecoveryTarget::Lsn(l)) => m.stop_lsn <= *l,
        _ => true,
    };
    if let Some(m) = candidates.iter().rev().find(|m| fits(m)) {
        return Ok(m);
    }
    let oldest = candidates
        .first()
        .copied()
        .or(all.first())
        .expect("at least one backup");
    let what = match &opts.target {
        Some(RecoveryTarget::Time(t)) => format!("target time {}", recovery::format_target_time(t)),
        Some(RecoveryTarget::Lsn(l)) => format!("target LSN {l}"),
        _ => "the target".into(),
    };
    Err(Error::usage(format!(
        "{what} is before the end of the oldest usable backup ({}, consistent at {} / {})",
        oldest.label, oldest.stop_time, oldest.stop_lsn
    ))
    .hint("choose a later target; a backup can only recover to moments after it ended"))
}

/// Run as root, the restored files must belong to the data directory's
/// owner: PostgreSQL refuses to run as root.
fn target_owner(pgdata: &Path) -> Result<Option<(u32, u32)>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let hint = format!(
        "create it for the PostgreSQL user first: install -d -o postgres -g postgres -m 700 {}",
        pgdata.display()
    );
    let meta = fs::metadata(pgdata).map_err(|_| {
        Error::usage(format!(
            "running as root, {} must exist and belong to the PostgreSQL user",
            pgdata.display()
        ))
        .hint(hint.clone())
    })?;
    if meta.uid() == 0 {
        return Err(Error::usage(format!(
            "running as root, {} belongs to root; PostgreSQL would refuse to start it",
            pgdata.display()
        ))
        .hint(hint));
    }
    Ok(Some((meta.uid(), meta.gid())))
}

fn check_target(pgdata: &Path, delta: bool) -> Result<()> {
    match fs::read_dir(pgdata) {
        Ok(mut rd) => {
            if rd.next().is_some() && !delta {
                return Err(Error::usage(format!("{} is not empty", pgdata.display())).hint(
                    "restore into an empty directory, or pass --delta to reuse the files that match the backup",
                ));
            }
            if pgdata.join("postmaster.pid").exists() {
                return Err(Error::usage(format!(
                    "{} has a postmaster.pid: is PostgreSQL running there?",
                    pgdata.display()
                ))
                .hint(
                    "stop the server first; remove a stale postmaster.pid only if no server runs",
                ));
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::usage(format!("{}: {e}", pgdata.display()))),
    }
}

fn local_err(path: &Path) -> impl Fn(io::Error) -> Error + '_ {
    move |e| Error::new(Kind::Internal, format!("{}: {e}", path.display()))
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(local_err(dir))
}

/// Creates the directory tree and tablespace links. With `--delta`, first
/// removes `global/pg_control` so that an interrupted restore cannot start.
fn prepare_dirs(
    pgdata: &Path,
    m: &Manifest,
    ts_map: &BTreeMap<u32, PathBuf>,
    delta: bool,
) -> Result<()> {
    fs::create_dir_all(pgdata).map_err(local_err(pgdata))?;
    fs::set_permissions(pgdata, fs::Permissions::from_mode(0o700)).map_err(local_err(pgdata))?;
    if delta {
        let control = pgdata.join(datadir::PG_CONTROL);
        match fs::remove_file(&control) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(local_err(&control)(e)),
        }
        for f in ["backup_label", "tablespace_map", "postmaster.pid"] {
            let _ = fs::remove_file(pgdata.join(f));
        }
        // What the backup left out must start empty: WAL of an earlier
        // run in pg_wal (with its history files) would be replayed before
        // the archive's and lead recovery onto the wrong timeline.
        for d in EMPTY_DIRS {
            let p = pgdata.join(d);
            if p.is_dir() {
                clear_dir(&p)?;
            }
        }
        remove_unlisted(pgdata, m)?;
    }
    fs::create_dir_all(pgdata.join("pg_tblspc")).map_err(local_err(pgdata))?;
    for ts in &m.tablespaces {
        let location = ts_map
            .get(&ts.oid)
            .cloned()
            .unwrap_or_else(|| PathBuf::from(&ts.location));
        fs::create_dir_all(&location).map_err(local_err(&location))?;
        fs::set_permissions(&location, fs::Permissions::from_mode(0o700))
            .map_err(local_err(&location))?;
        let link = pgdata.join("pg_tblspc").join(ts.oid.to_string());
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&location, &link).map_err(local_err(&link))?;
    }
    for d in &m.dirs {
        if d.path.starts_with("pg_tblspc/") && !d.path["pg_tblspc/".len()..].contains('/') {
            continue; // the link itself
        }
        let p = pgdata.join(&d.path);
        if fs::symlink_metadata(&p)
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(false)
        {
            continue;
        }
        fs::create_dir_all(&p).map_err(local_err(&p))?;
        // PostgreSQL accepts 0700 or 0750 data directories: keep what the
        // backup recorded, but never more than 0750.
        fs::set_permissions(&p, fs::Permissions::from_mode(d.mode & 0o750))
            .map_err(local_err(&p))?;
    }
    for d in EMPTY_DIRS {
        let p = pgdata.join(d);
        fs::create_dir_all(&p).map_err(local_err(&p))?;
    }
    fs::create_dir_all(pgdata.join("pg_wal/archive_status")).map_err(local_err(pgdata))?;
    Ok(())
}

/// Removes everything inside `dir` (following no links).
fn clear_dir(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir).map_err(local_err(dir))? {
        let p = e.map_err(local_err(dir))?.path();
        let meta = fs::symlink_metadata(&p).map_err(local_err(&p))?;
        if meta.is_dir() {
            fs::remove_dir_all(&p).map_err(local_err(&p))?;
        } else {
            fs::remove_file(&p).map_err(local_err(&p))?;
        }
    }
    Ok(())
}

/// `--delta`: removes files the backup does not have, so the result is the
/// backup and nothing else (the left-out directories were emptied already;
/// configuration files the backup holds are restored from it).
fn remove_unlisted(pgdata: &Path, m: &Manifest) -> Result<()> {
    let listed: HashSet<&str> = m.files.iter().map(|f| f.path.as_str()).collect();
    let mut stack = vec![(pgdata.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        for e in fs::read_dir(&dir).map_err(local_err(&dir))? {
            let e = e.map_err(local_err(&dir))?;
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let r = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            if rel.is_empty() && EMPTY_DIRS.contains(&name.as_str()) {
                continue;
            }
            let p = e.path();
            // pg_tblspc/<oid> are links: walk through them into the tablespace.
            let meta = fs::metadata(&p).map_err(local_err(&p))?;
            if meta.is_dir() {
                stack.push((p, r));
            } else if !listed.contains(r.as_str()) {
                fs::remove_file(&p).map_err(local_err(&p))?;
            }
        }
    }
    Ok(())
}

fn discard<R: Read>(r: &mut R, n: u64) -> Result<()> {
    io::copy(&mut r.take(n), &mut io::sink())
        .map_err(|e| Error::repository(format!("read: {e}")))?;
    Ok(())
}

/// Decodes one file from `r` into `dest`, checking its checksum against the
/// manifest, then sets mode and mtime.
fn write_one<R: Read>(r: &mut R, dest: &Path, f: &FileEntry, what: &str) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode_0600()
        .open(dest)
        .map_err(local_err(dest))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let digest = codec::decode_sized(r, &mut out, f.length)
        .map_err(|e| Error::repository(format!("{what}: {e}")))?;
    if digest.sha256.to_hex() != f.sha256 || digest.size != f.size {
        return Err(Error::repository(format!(
            "{what}: restored {} does not match the manifest (checksum or size)",
            f.path
        )));
    }
    let file = out
        .into_inner()
        .map_err(|e| local_err(dest)(e.into_error()))?;
    file.set_permissions(fs::Permissions::from_mode(f.mode & 0o750))
        .map_err(local_err(dest))?;
    let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(f.mtime.max(0) as u64);
    let _ = file.set_modified(mtime);
    Ok(())
}

trait Mode0600 {
    fn mode_0600(&mut self) -> &mut Self;
}
impl Mode0600 for OpenOptions {
    fn mode_0600(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.mode(0o600)
    }
}

/// Is `dest` already what the manifest says (for `--delta`)?
fn matches(dest: &Path, f: &FileEntry) -> bool {
    let Ok(meta) = fs::metadata(dest) else {
        return false;
    };
    if meta.len() != f.size {
        return false;
    }
    let Ok(file) = File::open(dest) else {
        return false;
    };
    let mut h = codec::HashingWriter::new(io::sink());
    if io::copy(&mut io::BufReader::with_capacity(1 << 20, file), &mut h).is_err() {
        return false;
    }
    h.finish().1.sha256.to_hex() == f.sha256
}

async fn write_files(
    repo: &Repository,
    label: &str,
    pgdata: &Path,
    files: Vec<FileEntry>,
    delta: bool,
    process_max: usize,
    progress: Arc<dyn Progress>,
) -> Result<usize> {
    // One work item per stored object; its files in stored order.
    let mut by_object: BTreeMap<String, Vec<FileEntry>> = BTreeMap::new();
    for f in files {
        by_object.entry(f.object.clone()).or_default().push(f);
    }
    let mut items: Vec<(String, Vec<FileEntry>)> = by_object.into_iter().collect();
    for (_, v) in items.iter_mut() {
        v.sort_by_key(|f| f.offset);
    }
    // Largest objects first.
    items.sort_by_key(|(_, v)| v.iter().map(|f| f.length).sum::<u64>());
    let skipped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let states = vec![(); process_max.max(1)];
    let backend: Arc<dyn Backend> = repo.backend().clone();
    let (stanza, label, pgdata) = (
        repo.stanza().to_string(),
        label.to_string(),
        pgdata.to_path_buf(),
    );
    let handle = tokio::runtime::Handle::current();
    let skipped2 = skipped.clone();
    let work = move |_: &mut (), (object, entries): (String, Vec<FileEntry>)| -> Result<()> {
        let key = layout::backup_object_key(&stanza, &label, &object);
        let what = format!("{}/{key}", backend.describe());
        if delta && entries.iter().all(|f| matches(&pgdata.join(&f.path), f)) {
            skipped2.fetch_add(entries.len(), std::sync::atomic::Ordering::Relaxed);
            entries.iter().for_each(|f| progress.file_done(f.size));
            return Ok(());
        }
        let mut reader = handle
            .block_on(backend.get(&key))?
            .ok_or_else(|| Error::repository(format!("{what} is missing")))?;
        let mut pos = 0u64;
        for f in &entries {
            discard(&mut reader, f.offset - pos)?;
            let dest = pgdata.join(&f.path);
            let mut part = (&mut reader).take(f.length);
            write_one(&mut part, &dest, f, &format!("{} (in {what})", f.path))?;
            discard(&mut part, u64::MAX)?;
            pos = f.offset + f.length;
            progress.file_done(f.size);
        }
        Ok(())
    };
    workers::run(items, states, work, |_| Ok(())).await?;
    Ok(skipped.load(std::sync::atomic::Ordering::Relaxed))
}

fn write_recovery_files(
    pgdata: &Path,
    m: &Manifest,
    ts_map: &BTreeMap<u32, PathBuf>,
    settings: &RecoverySettings,
    standby: bool,
) -> Result<()> {
    let write = |name: &str, text: &str| -> Result<()> {
        let p = pgdata.join(name);
        fs::write(&p, text).map_err(local_err(&p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).map_err(local_err(&p))
    };
    write("backup_label", &m.backup_label)?;
    if !m.tablespace_map.is_empty() {
        // tablespace_map lines are "<oid> <path>"; remapped tablespaces get
        // their new location (PostgreSQL recreates the links from it).
        let mut out = String::new();
        for line in m.tablespace_map.lines() {
            let (oid, path) = line.split_once(' ').unwrap_or((line, ""));
            let mapped = oid.parse::<u32>().ok().and_then(|o| ts_map.get(&o));
            match mapped {
                Some(p) => out.push_str(&format!("{oid} {}\n", p.display())),
                None => out.push_str(&format!("{oid} {path}\n")),
            }
        }
        write("tablespace_map", &out)?;
    }
    let auto = pgdata.join("postgresql.auto.conf");
    let existing = fs::read_to_string(&auto).unwrap_or_default();
    let stamp = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    write(
        "postgresql.auto.conf",
        &recovery::rewrite_auto_conf(&existing, settings, &stamp),
    )?;
    let _ = fs::remove_file(pgdata.join("recovery.signal"));
    let _ = fs::remove_file(pgdata.join("standby.signal"));
    write(
        if standby {
            "standby.signal"
        } else {
            "recovery.signal"
        },
        "",
    )?;
    Ok(())
}

/// Flushes everything written: one `syncfs` per file system involved
/// (the data directory and each tablespace) instead of an fsync per file.
fn sync_tree(pgdata: &Path) -> Result<()> {
    let mut seen = HashSet::new();
    let mut roots = vec![pgdata.to_path_buf()];
    if let Ok(rd) = fs::read_dir(pgdata.join("pg_tblspc")) {
        roots.extend(rd.flatten().map(|e| e.path()));
    }
    for r in roots {
        let f = File::open(&r).map_err(local_err(&r))?;
        let dev = f.metadata().map_err(local_err(&r))?.dev();
        if seen.insert(dev) {
            use std::os::fd::AsRawFd;
            // SAFETY: a valid open file descriptor.
            if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
                return Err(local_err(&r)(io::Error::last_os_error()));
            }
        }
    }
    Ok(())
}

fn chown_tree(root: &Path, uid: u32, gid: u32) -> Result<()> {
    let mut stack = vec![root.to_path_buf()];
    if let Ok(rd) = fs::read_dir(root.join("pg_tblspc")) {
        stack.extend(rd.flatten().filter_map(|e| fs::canonicalize(e.path()).ok()));
    }
    while let Some(p) = stack.pop() {
        std::os::unix::fs::lchown(&p, Some(uid), Some(gid)).map_err(local_err(&p))?;
        let meta = fs::symlink_metadata(&p).map_err(local_err(&p))?;
        if meta.is_dir() {
            for e in fs::read_dir(&p).map_err(local_err(&p))? {
                stack.push(e.map_err(local_err(&p))?.path());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::Lsn;

    use crate::repo::manifest::test_manifest as manifest;

    fn opts(target: Option<RecoveryTarget>) -> RestoreOptions {
        RestoreOptions {
            pgdata: "/x".into(),
            set: None,
            target,
            target_action: None,
            target_timeline: None,
            target_exclusive: false,
            archive_mode_off: false,
            tablespace_map: vec![],
            standby: false,
            primary_conninfo: None,
            delta: false,
            process_max: 1,
            restore_command: String::new(),
            target_check: true,
            catalog: None,
        }
    }

    fn time(s: &str) -> RecoveryTarget {
        RecoveryTarget::Time(recovery::parse_target_time(s).unwrap())
    }

    #[test]
    fn picks_newest_backup_ending_before_the_target() {
        // Labels deliberately disagree with the server's times: the choice
        // must follow the stop time and LSN, never the label.
        let all = vec![
            manifest("20261126-090000F", 1, 0x1000000, "2026-11-26T10:00:00Z"),
            manifest("20261126-080000F", 1, 0x2000000, "2026-11-26T11:00:00Z"),
            manifest("20261126-070000F", 1, 0x3000000, "2026-11-26T12:00:00Z"),
        ];
        let pick = |t| choose_backup(&all, &opts(Some(time(t))), None).map(|m| m.label.clone());
        assert_eq!(pick("2026-11-26T11:30:00Z").unwrap(), "20261126-080000F");
        assert_eq!(pick("2026-11-26T13:00:00Z").unwrap(), "20261126-070000F");
        assert_eq!(pick("2026-11-26T10:00:01Z").unwrap(), "20261126-090000F");
        let e = pick("2026-11-26T09:59:59Z").unwrap_err().to_string();
        assert!(
            e.contains("before the end of the oldest usable backup"),
            "{e}"
        );
        assert!(e.contains("20261126-090000F"), "{e}");
        let lsn =
            choose_backup(&all, &opts(Some(RecoveryTarget::Lsn(Lsn(0x2500000)))), None).unwrap();
        assert_eq!(lsn.label, "20261126-080000F");
        assert_eq!(
            choose_backup(&all, &opts(None), None).unwrap().label,
            "20261126-070000F"
        );
        let mut named = opts(None);
        named.set = Some("20261126-080000F".into());
        assert_eq!(
            choose_backup(&all, &named, None).unwrap().label,
            "20261126-080000F"
        );
        named.set = Some("nope".into());
        assert!(choose_backup(&all, &named, None).is_err());
    }

    #[test]
    fn follows_the_target_timeline() {
        // Timeline 2 branched from 1 at 0/2800000: a timeline-1 backup that
        // ended after the switch is not on timeline 2's path.
        let all = vec![
            manifest("a", 1, 0x1000000, "2026-11-26T10:00:00Z"),
            manifest("b", 1, 0x3000000, "2026-11-26T12:00:00Z"),
            manifest("c", 2, 0x4000000, "2026-11-26T13:00:00Z"),
        ];
        let h = parse_history(
            TimelineId(2),
            "1\t0/2800000\tno recovery target specified\n",
        )
        .unwrap();
        let pick = |t| choose_backup(&all, &opts(Some(time(t))), Some(&h)).map(|m| m.label.clone());
        assert_eq!(pick("2026-11-26T12:30:00Z").unwrap(), "a");
        assert_eq!(pick("2026-11-26T14:00:00Z").unwrap(), "c");
        let root = TimelineHistory::root(TimelineId(1));
        let on1 =
            choose_backup(&all, &opts(Some(time("2026-11-26T14:00:00Z"))), Some(&root)).unwrap();
        assert_eq!(on1.label, "b");
    }
}
