//! What a base backup copies from a data directory, and what it leaves out.
//!
//! The rules follow PostgreSQL's "Making a Base Backup Using the Low Level
//! API" and `src/backend/backup/basebackup.c` (`excludeDirContents`,
//! `excludeFiles`): runtime state that is rebuilt at start-up, WAL (which
//! comes from the archive), and files that would make a restored cluster
//! start the wrong way (`backup_label`, `postmaster.pid`, signal files).

/// What to do with an entry of the data directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Copy,
    /// Leave out entirely.
    Skip,
    /// Keep the directory, empty (PostgreSQL expects it to exist).
    EmptyDir,
}

/// Directories whose contents are not copied; the directory itself is
/// recreated empty on restore.
pub const EMPTY_DIRS: &[&str] = &[
    "pg_wal",
    "pg_dynshmem",
    "pg_notify",
    "pg_replslot",
    "pg_serial",
    "pg_snapshots",
    "pg_stat_tmp",
    "pg_subtrans",
];

/// Files left out at the top level of the data directory.
const SKIP_TOP_FILES: &[&str] = &[
    POSTMASTER_PID,
    "postmaster.opts",
    "backup_label",
    "backup_label.old",
    "tablespace_map",
    "tablespace_map.old",
    "backup_manifest",
    "recovery.signal",
    "standby.signal",
    "recovery.done",
    "current_logfiles",
    "current_logfiles.tmp",
    "postgresql.auto.conf.tmp",
];

/// Prefix of temporary files and directories (`PG_TEMP_FILE_PREFIX`).
const PG_TEMP_PREFIX: &str = "pgsql_tmp";
/// Relation cache init files, rebuilt at start-up (`RELCACHE_INIT_FILENAME`).
const RELCACHE_INIT: &str = "pg_internal.init";

/// The control file: copied last by a backup, written last by a restore.
pub const PG_CONTROL: &str = "global/pg_control";

/// Classifies a path relative to the data directory (`/`-separated).
/// Paths inside tablespaces are given as `pg_tblspc/<oid>/…`.
pub fn classify(rel: &str, is_dir: bool) -> Entry {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    if name.starts_with(PG_TEMP_PREFIX) || name.starts_with(RELCACHE_INIT) {
        return Entry::Skip;
    }
    if !rel.contains('/') {
        if is_dir && EMPTY_DIRS.contains(&name) {
            return Entry::EmptyDir;
        }
        if !is_dir && SKIP_TOP_FILES.contains(&name) {
            return Entry::Skip;
        }
    }
    if !is_dir && name.ends_with(".tmp") {
        return Entry::Skip;
    }
    Entry::Copy
}

/// The lock file of a running server.
pub const POSTMASTER_PID: &str = "postmaster.pid";

/// What `postmaster.pid` says about the server that runs on a data
/// directory (`src/include/utils/pidfile.h`: line 1 the PID, 2 the data
/// directory, 3 the start time in seconds since the epoch, 4 the port).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostmasterPid {
    pub pid: i64,
    pub start_time: i64,
    pub port: u16,
}

impl PostmasterPid {
    /// `None` when the file is not a complete lock file (a server still
    /// starting writes the port a moment after the first lines).
    pub fn parse(text: &str) -> Option<PostmasterPid> {
        let mut lines = text.lines();
        let pid = lines.next()?.trim().parse().ok()?;
        let _datadir = lines.next()?;
        let start_time = lines.next()?.trim().parse().ok()?;
        let port = lines.next()?.trim().parse().ok()?;
        Some(PostmasterPid {
            pid,
            start_time,
            port,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_postmaster_pid() {
        // As PostgreSQL 15 writes it.
        let text = "4242\n/var/lib/postgresql/15/main\n1764152100\n5432\n/var/run/postgresql\n*\n  5432001    196608\nready   \n";
        assert_eq!(
            PostmasterPid::parse(text),
            Some(PostmasterPid {
                pid: 4242,
                start_time: 1764152100,
                port: 5432
            })
        );
        assert_eq!(PostmasterPid::parse("4242\n/data\n1764152100\n"), None);
        assert_eq!(PostmasterPid::parse(""), None);
    }

    #[test]
    fn follows_basebackup_rules() {
        assert_eq!(classify("base/5/16384", false), Entry::Copy);
        assert_eq!(classify("global/pg_control", false), Entry::Copy);
        assert_eq!(classify("postgresql.conf", false), Entry::Copy);
        assert_eq!(classify("pg_wal", true), Entry::EmptyDir);
        assert_eq!(classify("pg_replslot", true), Entry::EmptyDir);
        assert_eq!(classify("pg_subtrans", true), Entry::EmptyDir);
        assert_eq!(classify("postmaster.pid", false), Entry::Skip);
        assert_eq!(classify("backup_label", false), Entry::Skip);
        assert_eq!(classify("standby.signal", false), Entry::Skip);
        assert_eq!(classify("base/pgsql_tmp", true), Entry::Skip);
        assert_eq!(classify("base/5/pgsql_tmp123.4", false), Entry::Skip);
        assert_eq!(classify("base/5/pg_internal.init", false), Entry::Skip);
        assert_eq!(classify("global/pg_internal.init.1234", false), Entry::Skip);
        assert_eq!(classify("pg_logical/x.tmp", false), Entry::Skip);
        // only at the top level
        assert_eq!(classify("base/5/backup_label", false), Entry::Copy);
        assert_eq!(
            classify("pg_tblspc/16385/PG_15_202209061/5/16386", false),
            Entry::Copy
        );
    }
}
