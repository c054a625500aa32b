//! Finding the PostgreSQL programs of one major version on this host, and
//! the OS user a server runs as.
//!
//! A backup must be started by its own major's `postgres`. Packagers put
//! each major in a directory of its own: Debian and Ubuntu in
//! `/usr/lib/postgresql/<N>/bin`, the PGDG RPMs in `/usr/pgsql-<N>/bin`;
//! a source build wherever `pg_config --bindir` says. Each candidate's
//! `postgres --version` decides, never its path.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

/// What went wrong finding binaries or a user. Messages name what was
/// tried.
#[derive(Debug, thiserror::Error)]
pub enum BinError {
    #[error("no PostgreSQL {major} binaries found: {tried}")]
    NotFound { major: u32, tried: String },
    #[error("{dir}: {why}")]
    Unusable { dir: String, why: String },
    #[error("no OS user {0:?}")]
    NoUser(String),
}

/// A directory holding one major's programs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBinaries {
    pub dir: PathBuf,
    pub major: u32,
    /// `postgres --version`, for reports.
    pub version: String,
}

impl PgBinaries {
    /// The programs of PostgreSQL `major`: in `explicit` when given (and
    /// only there), else the first candidate whose `postgres` is that major.
    pub async fn find(major: u32, explicit: Option<&Path>) -> Result<PgBinaries, BinError> {
        if let Some(dir) = explicit {
            return match probe(dir).await {
                Ok(b) if b.major == major => Ok(b),
                Ok(b) => Err(BinError::Unusable {
                    dir: dir.display().to_string(),
                    why: format!(
                        "holds PostgreSQL {} ({}), the backup needs PostgreSQL {major}",
                        b.major, b.version
                    ),
                }),
                Err(why) => Err(BinError::Unusable {
                    dir: dir.display().to_string(),
                    why,
                }),
            };
        }
        let mut tried = Vec::new();
        for dir in candidates(major).await {
            match probe(&dir).await {
                Ok(b) if b.major == major => return Ok(b),
                Ok(b) => tried.push(format!("{} (PostgreSQL {})", dir.display(), b.major)),
                Err(why) => tried.push(format!("{} ({why})", dir.display())),
            }
        }
        Err(BinError::NotFound {
            major,
            tried: tried.join(", "),
        })
    }

    /// The path of program `name` (`pg_ctl`, `pg_amcheck`, …).
    pub fn tool(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Where to look, in order: `pg_config --bindir` (the one on `PATH`), the
/// Debian and the RPM directory of `major`.
async fn candidates(major: u32) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(o) = tokio::process::Command::new("pg_config")
        .arg("--bindir")
        .env("LC_ALL", "C")
        .output()
        .await
    {
        let dir = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if o.status.success() && !dir.is_empty() {
            out.push(PathBuf::from(dir));
        }
    }
    for d in [
        format!("/usr/lib/postgresql/{major}/bin"),
        format!("/usr/pgsql-{major}/bin"),
    ] {
        let d = PathBuf::from(d);
        if !out.contains(&d) {
            out.push(d);
        }
    }
    out
}

/// The major of the `postgres` in `dir`, from `postgres --version`.
async fn probe(dir: &Path) -> Result<PgBinaries, String> {
    let postgres = dir.join("postgres");
    if !postgres.exists() {
        return Err("no postgres program".into());
    }
    let o = tokio::process::Command::new(&postgres)
        .arg("--version")
        .env("LC_ALL", "C")
        .output()
        .await
        .map_err(|e| format!("run {}: {e}", postgres.display()))?;
    let text = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let major =
        parse_version(&text).ok_or_else(|| format!("`postgres --version` said {text:?}"))?;
    Ok(PgBinaries {
        dir: dir.to_path_buf(),
        major,
        version: text,
    })
}

/// The major in `postgres (PostgreSQL) 15.8 (Debian 15.8-0+deb12u1)` or
/// `postgres (PostgreSQL) 18beta1`.
fn parse_version(text: &str) -> Option<u32> {
    let rest = text.split("(PostgreSQL)").nth(1)?.trim_start();
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// An OS user, as the password database has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OsUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl OsUser {
    pub fn by_name(name: &str) -> Result<OsUser, BinError> {
        let c = CString::new(name).map_err(|_| BinError::NoUser(name.to_string()))?;
        lookup(|pwd, buf, res| unsafe {
            // SAFETY: every pointer is valid for the call; buf's length is passed.
            libc::getpwnam_r(c.as_ptr(), pwd, buf.as_mut_ptr(), buf.len(), res)
        })
        .ok_or_else(|| BinError::NoUser(name.to_string()))
    }

    pub fn by_uid(uid: u32) -> Option<OsUser> {
        lookup(|pwd, buf, res| unsafe {
            // SAFETY: as above.
            libc::getpwuid_r(uid, pwd, buf.as_mut_ptr(), buf.len(), res)
        })
    }

    /// The user this process runs as.
    pub fn current() -> Option<OsUser> {
        // SAFETY: geteuid has no preconditions.
        Self::by_uid(unsafe { libc::geteuid() })
    }
}

fn lookup(
    call: impl Fn(*mut libc::passwd, &mut [libc::c_char], *mut *mut libc::passwd) -> libc::c_int,
) -> Option<OsUser> {
    let mut buf = vec![0 as libc::c_char; 16384];
    // SAFETY: a zeroed passwd is a valid out-parameter.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut res: *mut libc::passwd = std::ptr::null_mut();
    if call(&mut pwd, &mut buf, &mut res) != 0 || res.is_null() {
        return None;
    }
    // SAFETY: on success pw_name points into buf, NUL-terminated.
    let name = unsafe { CStr::from_ptr(pwd.pw_name) }
        .to_string_lossy()
        .into_owned();
    Some(OsUser {
        name,
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_versions() {
        assert_eq!(
            parse_version("postgres (PostgreSQL) 15.8 (Debian 15.8-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(parse_version("postgres (PostgreSQL) 18beta1"), Some(18));
        assert_eq!(parse_version("postgres (PostgreSQL) 9.6.24"), Some(9));
        assert_eq!(parse_version("something else"), None);
    }

    #[test]
    fn finds_users() {
        let root = OsUser::by_uid(0).unwrap();
        assert_eq!(root.name, "root");
        assert_eq!(OsUser::by_name("root").unwrap(), root);
        assert!(OsUser::by_name("no-such-user-pgvault").is_err());
    }

    #[tokio::test]
    async fn an_explicit_directory_must_hold_the_major() {
        let d = tempfile::tempdir().unwrap();
        let e = PgBinaries::find(15, Some(d.path())).await.unwrap_err();
        assert!(e.to_string().contains("no postgres program"), "{e}");
        let e = PgBinaries::find(99, None).await.unwrap_err();
        assert!(e.to_string().contains("/usr/lib/postgresql/99/bin"), "{e}");
    }
}
