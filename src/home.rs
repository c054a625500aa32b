//! Where pgvault keeps its local state (the catalog, the spool) when no
//! option says: `$XDG_STATE_HOME/pgvault`, else `~/.local/state/pgvault`.
//!
//! `~` is `$HOME`, or — when the environment has none — the home directory
//! the user database gives the effective user. Debian's `pg_ctlcluster`
//! and the systemd unit start PostgreSQL with an empty environment, so
//! `archive_command` and `restore_command` run without `HOME`; without this
//! fallback look-ahead push, prefetch and the catalog would be silently off
//! there.

use std::ffi::{CStr, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// `<state>/pgvault`, or `None` when no home directory can be found.
pub fn state_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| home().map(|h| h.join(".local/state")))?;
    Some(base.join("pgvault"))
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(passwd_home)
}

/// The effective user's home directory from the user database
/// (`getpwuid_r`, as libc's own tilde expansion does).
fn passwd_home() -> Option<PathBuf> {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: passwd is plain old data; getpwuid_r fills it, pointing into
    // buf, which outlives every use of those pointers below.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: valid pointers and buf's true length; geteuid cannot fail.
    let rc = unsafe {
        libc::getpwuid_r(
            libc::geteuid(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() || pwd.pw_dir.is_null() {
        return None;
    }
    // SAFETY: pw_dir is a NUL-terminated string inside buf.
    let dir = unsafe { CStr::from_ptr(pwd.pw_dir) };
    let dir = PathBuf::from(OsStr::from_bytes(dir.to_bytes()));
    dir.is_absolute().then_some(dir)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_user_database_knows_this_user_home() {
        let home = super::passwd_home().expect("the user running the tests has a home");
        assert!(home.is_absolute(), "{}", home.display());
    }
}
