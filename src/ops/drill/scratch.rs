//! The drill's scratch directory: who owns it, what goes where, whether
//! its file system has room, and its removal whatever happens.
//!
//! ```text
//! <scratch>/pgvault-drill-XXXXXX/     0700, the server's user
//!     data/                           the restored data directory
//!     tblspc/<oid>/                   its tablespaces, mapped here
//!     conf/                           pg_hba.conf, pg_ident.conf (and postgresql.conf)
//!     sock/                           the server's only socket
//!     spool/                          archive-get's prefetched WAL
//!     postgresql.log                  the server's log
//! ```

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::pg::binaries::OsUser;

/// A scratch directory, removed when dropped unless kept.
pub struct Scratch {
    pub root: PathBuf,
    pub pgdata: PathBuf,
    pub conf: PathBuf,
    pub socket: PathBuf,
    pub spool: PathBuf,
    pub log: PathBuf,
    /// A socket directory of its own under /tmp when `root` is too long a
    /// path for a socket.
    extra_socket: Option<PathBuf>,
    pub keep: bool,
    removed: bool,
}

fn local(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::internal(format!("{}: {e}", path.display()))
}

/// The OS user the scratch server runs as: this process's own, or, when
/// it runs as root (PostgreSQL refuses to), `--pg-os-user`, else the owner
/// of `--scratch-dir`, else `postgres`.
pub fn server_user(pg_os_user: Option<&str>, base: Option<&Path>) -> Result<Option<OsUser>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let user = if let Some(name) = pg_os_user {
        OsUser::by_name(name).map_err(|e| Error::usage(format!("--pg-os-user: {e}")))?
    } else if let Some(u) = base
        .and_then(|b| fs::metadata(b).ok())
        .filter(|m| m.uid() != 0)
        .and_then(|m| OsUser::by_uid(m.uid()))
    {
        u
    } else {
        OsUser::by_name("postgres").map_err(|_| {
            Error::usage("running as root, the scratch PostgreSQL needs an unprivileged OS user (PostgreSQL refuses to run as root), and there is no user postgres")
                .hint("pass --pg-os-user USER, or a --scratch-dir owned by that user")
        })?
    };
    if user.uid == 0 {
        return Err(Error::usage(format!(
            "--pg-os-user {}: PostgreSQL refuses to run as root",
            user.name
        )));
    }
    Ok(Some(user))
}

impl Scratch {
    /// A new directory below `base` (default: the system's temporary
    /// directory), owned by `user`.
    pub fn create(base: Option<&Path>, user: Option<&OsUser>, keep: bool) -> Result<Scratch> {
        let base = base
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir);
        if let Some(u) = user {
            traversable(&base, u)?;
        }
        let dir = tempfile::Builder::new()
            .prefix("pgvault-drill-")
            .tempdir_in(&base)
            .map_err(|e| {
                Error::usage(format!(
                    "create a scratch directory in {}: {e}",
                    base.display()
                ))
                .hint("pass --scratch-dir DIR, a directory this user can write")
            })?;
        let root = dir.keep();
        let mut s = Scratch {
            pgdata: root.join("data"),
            conf: root.join("conf"),
            socket: root.join("sock"),
            spool: root.join("spool"),
            log: root.join("postgresql.log"),
            root,
            extra_socket: None,
            keep,
            removed: false,
        };
        if !crate::pg::scratch::ServerSpec::socket_dir_fits(&s.socket) {
            let d = tempfile::Builder::new()
                .prefix("pgvault-drill-sock-")
                .tempdir_in("/tmp")
                .map_err(|e| Error::internal(format!("create a socket directory in /tmp: {e}")))?
                .keep();
            s.socket = d.clone();
            s.extra_socket = Some(d);
        }
        for d in [&s.root, &s.pgdata, &s.conf, &s.spool] {
            fs::create_dir_all(d).map_err(local(d))?;
        }
        if s.extra_socket.is_none() {
            fs::create_dir_all(&s.socket).map_err(local(&s.socket))?;
        }
        for d in [&s.root, &s.pgdata, &s.conf, &s.spool, &s.socket] {
            fs::set_permissions(d, fs::Permissions::from_mode(0o700)).map_err(local(d))?;
            if let Some(u) = user {
                std::os::unix::fs::chown(d, Some(u.uid), Some(u.gid)).map_err(local(d))?;
            }
        }
        Ok(s)
    }

    /// Where tablespace `oid` is restored.
    pub fn tablespace(&self, oid: u32) -> PathBuf {
        self.root.join("tblspc").join(oid.to_string())
    }

    /// Bytes free for this user on the scratch directory's file system.
    pub fn available(&self) -> Result<u64> {
        available(&self.root)
    }

    /// Waits (at most `bound`) for `archive-get` prefetchers the server
    /// started, detached, to finish: each holds the lock of its spool's
    /// `get/` directory while it runs, and would write into a removed
    /// directory otherwise.
    pub fn wait_for_prefetchers(&self, bound: std::time::Duration) {
        let deadline = std::time::Instant::now() + bound;
        let locks: Vec<PathBuf> = fs::read_dir(&self.spool)
            .map(|rd| rd.flatten().map(|e| e.path().join("get/.lock")).collect())
            .unwrap_or_default();
        for lock in locks.iter().filter(|l| l.exists()) {
            let Ok(f) = fs::File::open(lock) else {
                continue;
            };
            loop {
                // SAFETY: flock on a file descriptor we own.
                let r = unsafe {
                    libc::flock(
                        std::os::fd::AsRawFd::as_raw_fd(&f),
                        libc::LOCK_EX | libc::LOCK_NB,
                    )
                };
                if r == 0 || std::time::Instant::now() >= deadline {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }

    /// Removes everything, unless kept.
    pub fn remove(&mut self) -> Result<()> {
        if self.keep || self.removed {
            return Ok(());
        }
        self.removed = true;
        if let Some(d) = &self.extra_socket {
            let _ = fs::remove_dir_all(d);
        }
        fs::remove_dir_all(&self.root).map_err(|e| {
            Error::internal(format!(
                "remove the scratch directory {}: {e}",
                self.root.display()
            ))
        })
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            log::warn!("{e}");
        }
    }
}

/// Bytes available to unprivileged users on `path`'s file system.
pub fn available(path: &Path) -> Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| Error::usage(format!("{}: not a valid path", path.display())))?;
    // SAFETY: a zeroed statvfs is a valid out-parameter; c is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(local(path)(std::io::Error::last_os_error()));
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Whether `user` may do `bits` (`0o4` read, `0o1` execute or search) on
/// `m`, by its owner, group or other bits.
fn allowed(m: &fs::Metadata, user: &OsUser, bits: u32) -> bool {
    let mode = m.permissions().mode();
    let shift = if m.uid() == user.uid {
        6
    } else if m.gid() == user.gid {
        3
    } else {
        0
    };
    (mode >> shift) & bits == bits
}

/// `user` must be able to reach into `dir`: every directory on the way
/// searchable by it (PostgreSQL, run as that user, opens its data
/// directory by this path).
fn traversable(dir: &Path, user: &OsUser) -> Result<()> {
    let dir = fs::canonicalize(dir)
        .map_err(|e| Error::usage(format!("scratch directory {}: {e}", dir.display())))?;
    for d in dir.ancestors() {
        let m = fs::metadata(d).map_err(local(d))?;
        if !allowed(&m, user, 0o1) {
            return Err(Error::usage(format!(
                "the scratch PostgreSQL runs as {}, who cannot enter {} (mode {:o})",
                user.name,
                d.display(),
                m.permissions().mode() & 0o7777
            ))
            .hint("pass a --scratch-dir that user can reach, e.g. one it owns"));
        }
    }
    Ok(())
}

/// The scratch server's `restore_command` runs this program (and reads
/// the configuration file it was given) as `user`: refused up front when
/// that user cannot, rather than as a FATAL in the server's log.
pub fn usable_by(user: &OsUser, config_file: Option<&Path>) -> Result<()> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::internal(format!("find this program's path: {e}")))?;
    let reach = |p: &Path, bits: u32, what: &str| -> Result<()> {
        let deny = || {
            Error::usage(format!(
                "the scratch PostgreSQL runs as {}, whose restore_command cannot {what} {}",
                user.name,
                p.display()
            ))
            .hint("install pgvault and its configuration where that user can read them, or pass --pg-os-user")
        };
        if let Some(parent) = p.parent() {
            traversable(parent, user).map_err(|_| deny())?;
        }
        let m = fs::metadata(p).map_err(local(p))?;
        if allowed(&m, user, bits) {
            Ok(())
        } else {
            Err(deny())
        }
    };
    reach(&exe, 0o1, "run")?;
    if let Some(c) = config_file {
        reach(c, 0o4, "read")?;
    }
    Ok(())
}

/// The scratch server's environment: this process's (the S3 settings
/// `restore_command` needs), with a home, a spool and nothing of this
/// user's own state directories.
pub fn server_env(s: &Scratch) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "HOME" | "PGVAULT_SPOOL_PATH" | "PGDATA" | "PGHOST" | "PGPORT" | "PGUSER"
            ) && !k.starts_with("XDG_")
        })
        .collect();
    env.push(("HOME".into(), s.root.display().to_string()));
    env.push(("PGVAULT_SPOOL_PATH".into(), s.spool.display().to_string()));
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), "/usr/local/bin:/usr/bin:/bin".into()));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scratch_directory_is_removed_unless_kept() {
        let base = tempfile::tempdir().unwrap();
        let s = Scratch::create(Some(base.path()), None, false).unwrap();
        assert!(s.pgdata.is_dir() && s.socket.is_dir());
        assert!(s.available().unwrap() > 0);
        let root = s.root.clone();
        drop(s);
        assert!(!root.exists());
        let s = Scratch::create(Some(base.path()), None, true).unwrap();
        let root = s.root.clone();
        drop(s);
        assert!(root.exists());
    }

    #[test]
    fn permissions_by_owner_group_and_others() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        fs::write(&f, "").unwrap();
        let m = |mode| {
            fs::set_permissions(&f, fs::Permissions::from_mode(mode)).unwrap();
            fs::metadata(&f).unwrap()
        };
        let me = fs::metadata(&f).unwrap();
        let owner = OsUser {
            name: "o".into(),
            uid: me.uid(),
            gid: me.gid(),
        };
        let group = OsUser {
            name: "g".into(),
            uid: me.uid() + 1,
            gid: me.gid(),
        };
        let other = OsUser {
            name: "x".into(),
            uid: me.uid() + 1,
            gid: me.gid() + 1,
        };
        assert!(allowed(&m(0o600), &owner, 0o4));
        assert!(!allowed(&m(0o600), &group, 0o4));
        assert!(allowed(&m(0o640), &group, 0o4));
        assert!(!allowed(&m(0o640), &other, 0o4));
        assert!(allowed(&m(0o755), &other, 0o1));
        assert!(!allowed(&m(0o750), &other, 0o1));
    }

    #[test]
    fn a_long_path_gets_its_socket_elsewhere() {
        let base = tempfile::tempdir().unwrap();
        let deep = base.path().join("d".repeat(100));
        fs::create_dir_all(&deep).unwrap();
        let s = Scratch::create(Some(&deep), None, false).unwrap();
        assert!(s.socket.starts_with("/tmp") && s.socket.is_dir());
        let sock = s.socket.clone();
        drop(s);
        assert!(!sock.exists());
    }
}
