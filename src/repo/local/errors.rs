//! What a failed local operation tells the user: the path, what pgvault was
//! doing, and for permissions and a full disk what to do about it.

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::Error;

/// The rich error for a failed local operation: what, where, and for
/// permissions and a full disk a hint saying what to do.
pub fn local_error(what: &str, path: &Path, e: io::Error) -> Error {
    let text = e.to_string();
    // Errors built by `at` already name the path.
    let msg = if text.contains(&path.display().to_string()) {
        text
    } else {
        format!("{what} {}: {text}", path.display())
    };
    let err = Error::repository(msg);
    match e.kind() {
        io::ErrorKind::PermissionDenied => err.hint(permission_hint(path)),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => err.hint(format!(
            "the filesystem holding {} is full: free space there (or move the repository), \
             then run the command again; nothing half-written was kept",
            path.display()
        )),
        _ => err,
    }
}

/// Which user needs what, for a permission error on `path`.
pub fn permission_hint(path: &Path) -> String {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = user_name(unsafe { libc::geteuid() });
    let owner = path
        .ancestors()
        .find_map(|p| fs::metadata(p).ok().map(|m| (p.to_path_buf(), m)));
    let whose = match owner {
        Some((p, m)) => format!(
            "{} belongs to {} (mode {:o})",
            p.display(),
            user_name(m.uid()),
            m.mode() & 0o7777
        ),
        None => String::new(),
    };
    format!(
        "pgvault runs as {me} here, and {whose}: every pgvault command must run as the \
         user that owns the repository, which must be the PostgreSQL server's user \
         (archive_command runs as that user); fix the ownership with \
         `chown -R <that user> <repository>` or run pgvault as that user"
    )
}

/// The login name of `uid`, or the number when it has none.
pub fn user_name(uid: u32) -> String {
    let mut buf = vec![0u8; 4096];
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes into `pwd` and `buf`, both owned here and
    // alive for the call; `out` is set to `&pwd` or null.
    let rc =
        unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr().cast(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() || pwd.pw_name.is_null() {
        return format!("uid {uid}");
    }
    // SAFETY: on success pw_name points to a NUL-terminated string in `buf`.
    let name = unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) };
    format!("{} (uid {uid})", name.to_string_lossy())
}
