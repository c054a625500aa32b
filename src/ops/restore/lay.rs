//! Laying a backup down in a data directory: directories and tablespace
//! links, every file checked against its SHA-256 as it is written, the
//! recovery files, a flush of everything, and `global/pg_control` last.
//!
//! Memory stays flat in the number of files (issue 14): the file list is
//! streamed into a scratch database on disk, grouped there by the object
//! that stores each file, and the workers take one object (with its
//! pieces) at a time from it. The steps live beside this module:
//! [`super::pieces`] (the plan of work), [`super::dirs`] (directories,
//! links, `--delta`'s removals), [`super::files`] (the workers writing
//! whole files), [`super::blocks`] (block-level writes and `--delta`'s
//! comparison), [`super::durable`] (writeback, ownership, the final flush).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::ops::progress::Progress;
use crate::pg::datadir;
use crate::pg::recovery::{self, RecoverySettings};
use crate::repo::codec::Binding;
use crate::repo::layout;
use crate::repo::manifest::Manifest;
use crate::repo::{Fetched, Repository};

use super::blocks::differing_blocks;
pub use super::blocks::DeltaBlocks;
use super::dirs::prepare_dirs;
use super::durable::{chown_tree, fsync_dir, local_err, sync_tree};
use super::files::{discard, write_files, write_one};
use super::pieces::{listed_paths, plan_pieces};
use super::RestoreOptions;

/// What laying a backup down did.
pub(super) struct Laid {
    /// Files `--delta` found in place already.
    pub skipped: usize,
    pub delta_blocks: Option<DeltaBlocks>,
}

/// Lays backup `m` down in `opts.pgdata`.
pub(super) async fn lay_down(
    repo: &Repository,
    m: &Manifest,
    opts: &RestoreOptions,
    progress: Arc<dyn Progress>,
) -> Result<Laid> {
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

    let list = Arc::new(repo.file_list(m).await?);
    let count = list.count();
    let (label, delta) = (m.label.clone(), opts.delta);
    // With --delta, what is not in the backup goes (the paths, on disk).
    let list2 = list.clone();
    let listed = tokio::task::spawn_blocking(move || listed_paths(&list2, delta)).await??;
    let pgdata = opts.pgdata.clone();
    let m2 = m.clone();
    let ts_map2 = ts_map.clone();
    tokio::task::spawn_blocking(move || prepare_dirs(&pgdata, &m2, &ts_map2, delta, &listed))
        .await??;

    // With --delta, the backup's block sums say which blocks of the
    // relation files on disk differ (a backup without them: whole files);
    // compared after the tablespace links point where this restore writes.
    let sums = match opts.delta {
        false => None,
        true => match repo.read_block_sums(&m.label).await? {
            Fetched::Found(s) => Some(s),
            Fetched::Missing => None,
            Fetched::Damaged(why) => {
                log::warn!("--delta compares whole files: {why}");
                None
            }
        },
    };
    let diffs = match sums {
        None => None,
        Some(sums) => {
            Some(differing_blocks(&opts.pgdata, list.clone(), sums, opts.process_max).await?)
        }
    };
    let (db, mut planned) =
        tokio::task::spawn_blocking(move || plan_pieces(&list, &label, delta, diffs)).await??;
    let control = planned.control.take().ok_or_else(|| {
        Error::repository(format!("backup {} has no {}", m.label, datadir::PG_CONTROL))
    })?;

    progress.phase("write files");
    progress.set_total(count, m.original_size);
    let laid = write_files(repo, &opts.pgdata, db, planned, opts.process_max, progress.clone())
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
    let key = layout::backup_object_key(repo.stanza(), &m.label, &control.object);
    let object = format!("{}/{key}", repo.describe());
    let reader = repo
        .backend()
        .get(&key)
        .await?
        .ok_or_else(|| Error::repository(format!("backup {}: {object} is missing", m.label)))?;
    let what = format!("{} (in {object})", control.path);
    let control_size = control.size;
    let keys = repo.keys().await?;
    tokio::task::spawn_blocking(move || -> Result<()> {
        // Ownership before the flush: a chown after it (as this did) is
        // metadata a crash can lose, leaving root's files PostgreSQL
        // refuses.
        if let Some((uid, gid)) = owner {
            chown_tree(&pgdata, uid, gid)?;
        }
        sync_tree(&pgdata)?;
        let mut reader = reader;
        discard(&mut reader, control.offset, &what)?;
        // Under another name until it is whole and checked: a damaged or
        // cut-off object must leave no pg_control that PostgreSQL would
        // start from (write_one checks the checksum only at the end).
        let dest = pgdata.join(&control.path);
        let tmp = dest.with_file_name("pg_control.pgvault-restore");
        let bind = Binding::at(&key, control.offset);
        let r = &mut reader.take(control.length);
        if let Err(e) = write_one(r, &tmp, &control, &what, &keys, bind) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::lchown(&tmp, Some(uid), Some(gid))
                .map_err(local_err("chown", &tmp))?;
        }
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(local_err("fsync", &tmp))?;
        fs::rename(&tmp, &dest).map_err(local_err("rename", &tmp))?;
        fsync_dir(dest.parent().expect("global/pg_control has a parent"))?;
        Ok(())
    })
    .await??;
    progress.file_done(control_size);
    Ok(laid)
}

/// Run as root, the restored files must belong to the data directory's
/// owner: PostgreSQL refuses to run as root.
pub(super) fn target_owner(pgdata: &Path) -> Result<Option<(u32, u32)>> {
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

pub(super) fn check_target(pgdata: &Path, delta: bool) -> Result<()> {
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

pub(super) fn write_recovery_files(
    pgdata: &Path,
    m: &Manifest,
    ts_map: &BTreeMap<u32, PathBuf>,
    settings: &RecoverySettings,
    standby: bool,
) -> Result<()> {
    let write = |name: &str, text: &str| -> Result<()> {
        let p = pgdata.join(name);
        fs::write(&p, text).map_err(local_err("write", &p))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600))
            .map_err(local_err("set permissions of", &p))
    };
    write(recovery::BACKUP_LABEL, &m.backup_label)?;
    if !m.tablespace_map.is_empty() {
        write(
            recovery::TABLESPACE_MAP,
            &recovery::remap_tablespace_map(&m.tablespace_map, ts_map),
        )?;
    }
    let auto = pgdata.join("postgresql.auto.conf");
    let existing = fs::read_to_string(&auto).unwrap_or_default();
    let stamp = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    write(
        "postgresql.auto.conf",
        &recovery::rewrite_auto_conf(&existing, settings, &stamp),
    )?;
    let _ = fs::remove_file(pgdata.join(recovery::RECOVERY_SIGNAL));
    let _ = fs::remove_file(pgdata.join(recovery::STANDBY_SIGNAL));
    write(
        if standby {
            recovery::STANDBY_SIGNAL
        } else {
            recovery::RECOVERY_SIGNAL
        },
        "",
    )?;
    Ok(())
}
