//! The directory tree of a restore: directories with their modes,
//! tablespace links (remapped or not), and for `--delta` what must go
//! before anything is written.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::catalog::scratch;
use crate::error::{Error, Result};
use crate::pg::datadir::{self, EMPTY_DIRS};
use crate::pg::recovery;
use crate::repo::manifest::Manifest;

use super::durable::local_err;

/// Creates the directory tree and tablespace links. With `--delta`, first
/// removes `global/pg_control` so that an interrupted restore cannot start.
pub(super) fn prepare_dirs(
    pgdata: &Path,
    m: &Manifest,
    ts_map: &BTreeMap<u32, PathBuf>,
    delta: bool,
    db: &scratch::Shared,
) -> Result<()> {
    fs::create_dir_all(pgdata).map_err(local_err("create", pgdata))?;
    fs::set_permissions(pgdata, fs::Permissions::from_mode(0o700))
        .map_err(local_err("set permissions of", pgdata))?;
    if delta {
        let control = pgdata.join(datadir::PG_CONTROL);
        match fs::remove_file(&control) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(local_err("remove", &control)(e)),
        }
        for f in [
            recovery::BACKUP_LABEL,
            recovery::TABLESPACE_MAP,
            "postmaster.pid",
        ] {
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
        remove_unlisted(pgdata, db)?;
    }
    let tblspc = pgdata.join("pg_tblspc");
    fs::create_dir_all(&tblspc).map_err(local_err("create", &tblspc))?;
    for ts in &m.tablespaces {
        let location = ts_map
            .get(&ts.oid)
            .cloned()
            .unwrap_or_else(|| PathBuf::from(&ts.location));
        fs::create_dir_all(&location).map_err(local_err("create", &location))?;
        fs::set_permissions(&location, fs::Permissions::from_mode(0o700))
            .map_err(local_err("set permissions of", &location))?;
        let link = pgdata.join("pg_tblspc").join(ts.oid.to_string());
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&location, &link).map_err(local_err("link", &link))?;
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
        fs::create_dir_all(&p).map_err(local_err("create", &p))?;
        // PostgreSQL accepts 0700 or 0750 data directories: keep what the
        // backup recorded, but never more than 0750.
        fs::set_permissions(&p, fs::Permissions::from_mode(d.mode & 0o750))
            .map_err(local_err("set permissions of", &p))?;
    }
    for d in EMPTY_DIRS {
        let p = pgdata.join(d);
        fs::create_dir_all(&p).map_err(local_err("create", &p))?;
    }
    let status = pgdata.join("pg_wal/archive_status");
    fs::create_dir_all(&status).map_err(local_err("create", &status))?;
    Ok(())
}

/// Removes everything inside `dir` (following no links).
pub(super) fn clear_dir(dir: &Path) -> Result<()> {
    for e in fs::read_dir(dir).map_err(local_err("read directory", dir))? {
        let p = e.map_err(local_err("read directory", dir))?.path();
        let meta = fs::symlink_metadata(&p).map_err(local_err("stat", &p))?;
        if meta.is_dir() {
            fs::remove_dir_all(&p).map_err(local_err("remove", &p))?;
        } else {
            fs::remove_file(&p).map_err(local_err("remove", &p))?;
        }
    }
    Ok(())
}

/// `--delta`: removes files the backup does not have, so the result is the
/// backup and nothing else (the left-out directories were emptied already;
/// configuration files the backup holds are restored from it).
pub(super) fn remove_unlisted(pgdata: &Path, db: &scratch::Shared) -> Result<()> {
    let listed = |r: &str| -> Result<bool> {
        let s = db
            .lock()
            .map_err(|_| Error::internal("scratch database: a thread failed holding it"))?;
        Ok(s.get("files", r)?.is_some())
    };
    let mut stack = vec![(pgdata.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        for e in fs::read_dir(&dir).map_err(local_err("read directory", &dir))? {
            let e = e.map_err(local_err("read directory", &dir))?;
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
            let meta = fs::metadata(&p).map_err(local_err("stat", &p))?;
            if meta.is_dir() {
                stack.push((p, r));
            } else if !listed(&r)? {
                fs::remove_file(&p).map_err(local_err("remove", &p))?;
            }
        }
    }
    Ok(())
}
