//! The one rich error that reaches the edge of the program.
//!
//! Inside, modules use their own `thiserror` enums; they become an [`Error`]
//! with a [`Kind`] (which decides the exit code), a message, the chain of
//! contexts added on the way up ("archive-push pg_wal/000000010000000000000003")
//! and an optional hint. `cli` renders it as one `error:` line plus an
//! optional `hint:` line (see docs/exit-codes.md).

use std::fmt;
use std::io::{self, Write};

/// What went wrong, coarsely: this is what decides the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Bad flags, a bad configuration file or option value.
    Usage,
    /// The file we were given is not what it must be (missing, truncated,
    /// not WAL, another cluster's WAL, bad header).
    InvalidInput,
    /// Different bytes are already archived under this name.
    Conflict,
    /// The repository could not be read or written, or an object in it is
    /// corrupt.
    Repository,
    /// The stanza is missing, or belongs to another cluster.
    Stanza,
    /// Talking to PostgreSQL failed.
    Postgres,
    /// A bounded wait ran out.
    Timeout,
    /// Another process holds the lock.
    Locked,
    /// Timelines disagree: a history file that the archived WAL of its
    /// timeline contradicts, or (with `archive-push-superseded = fail`) WAL
    /// of a timeline that a later one branched off, past the branch point.
    Timeline,
    /// Anything else: a bug or an unexpected local failure.
    Internal,
    /// A threshold or objective was missed: `check --max-backup-age`,
    /// `drill --rto-objective`.
    Threshold,
    /// What was restored does not work: `drill`'s scratch cluster did not
    /// recover, or failed one of its checks.
    DrillFailed,
    /// The repository is encrypted and the key is missing, is not one of
    /// its keys, or cannot be read (`repo-cipher-*`).
    Key,
}

impl Kind {
    /// The exit code documented in docs/exit-codes.md.
    pub fn exit_code(self) -> i32 {
        match self {
            Kind::Usage => 2,
            Kind::InvalidInput => 3,
            Kind::Conflict => 4,
            Kind::Repository => 5,
            Kind::Stanza => 6,
            Kind::Postgres => 7,
            Kind::Timeout => 8,
            Kind::Locked => 9,
            Kind::Internal => 10,
            Kind::Timeline => 12,
            Kind::Threshold => 13,
            Kind::DrillFailed => 14,
            Kind::Key => 15,
        }
    }
}

pub struct Error {
    kind: Kind,
    message: String,
    /// Outermost first.
    context: Vec<String>,
    hint: Option<String>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            context: Vec::new(),
            hint: None,
        }
    }

    pub fn usage(message: impl Into<String>) -> Self {
        Self::new(Kind::Usage, message)
    }
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::new(Kind::InvalidInput, message)
    }
    pub fn repository(message: impl Into<String>) -> Self {
        Self::new(Kind::Repository, message)
    }
    pub fn stanza(message: impl Into<String>) -> Self {
        Self::new(Kind::Stanza, message)
    }
    pub fn key(message: impl Into<String>) -> Self {
        Self::new(Kind::Key, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Kind::Internal, message)
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }
    pub fn hint_text(&self) -> Option<&str> {
        self.hint.as_deref()
    }

    /// Adds a context (a verb phrase: "read WAL header of pg_wal/…").
    pub fn context(mut self, context: impl Into<String>) -> Self {
        self.context.insert(0, context.into());
        self
    }

    /// Sets the hint, unless a more specific one was set deeper down.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        if self.hint.is_none() {
            self.hint = Some(hint.into());
        }
        self
    }

    /// An I/O error on a local file or directory: `{what} {path}: {cause}`
    /// ("write /var/lib/pgvault/…: No space left on device"), with a hint
    /// when the cause is one the user can fix (see [`io_hint`]).
    pub fn io(kind: Kind, what: &str, path: impl fmt::Display, e: &io::Error) -> Self {
        Self::io_in(kind, format!("{what} {path}"), e)
    }

    /// [`Error::io`] for an error that names its path already (one made
    /// where the path was known): `{doing}: {cause}`.
    pub fn io_in(kind: Kind, doing: impl fmt::Display, e: &io::Error) -> Self {
        let err = Self::new(kind, format!("{doing}: {e}"));
        match io_hint(e) {
            Some(h) => err.hint(h),
            None => err,
        }
    }

    pub fn with_kind(mut self, kind: Kind) -> Self {
        self.kind = kind;
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.context {
            write!(f, "{c}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self)?;
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

/// `.context(…)` on results that already carry our [`Error`], or anything
/// that converts into it.
pub trait ResultExt<T> {
    fn context<C: Into<String>>(self, context: impl FnOnce() -> C) -> Result<T>;
}

impl<T, E: Into<Error>> ResultExt<T> for std::result::Result<T, E> {
    fn context<C: Into<String>>(self, context: impl FnOnce() -> C) -> Result<T> {
        self.map_err(|e| e.into().context(context()))
    }
}

/// What to do about an I/O error whose cause is outside pgvault. Matched by
/// kind, which survives an `io::Error` rewrapped with a message.
pub fn io_hint(e: &io::Error) -> Option<&'static str> {
    Some(match e.kind() {
        io::ErrorKind::StorageFull => {
            "the file system is full: free space on it and run the command again \
             (PostgreSQL retries archive-push by itself; `pgvault expire` removes \
             temporary files that killed commands left behind)"
        }
        io::ErrorKind::QuotaExceeded => {
            "the disk quota of the user running pgvault is used up: raise it or free space"
        }
        io::ErrorKind::ReadOnlyFilesystem => "the file system is mounted read-only",
        io::ErrorKind::PermissionDenied => {
            "the user running pgvault needs access to it (archive_command and \
             restore_command run as the PostgreSQL server's user)"
        }
        _ => return None,
    })
}

/// A writer that keeps the error its inner writer returned, so that a
/// failure seen through a pipeline from a reader into it (an object decoded
/// into a file) is reported as the write it was — "write <file>: No space
/// left on device" — and not as damage to what was read.
pub struct WriteWatch<W> {
    inner: W,
    failed: Option<(io::ErrorKind, String)>,
}

impl<W: Write> WriteWatch<W> {
    pub fn new(inner: W) -> Self {
        WriteWatch {
            inner,
            failed: None,
        }
    }

    /// The write error seen, if any (its kind kept for [`io_hint`]).
    pub fn error(&self) -> Option<io::Error> {
        self.failed
            .as_ref()
            .map(|(kind, msg)| io::Error::new(*kind, msg.clone()))
    }

    pub fn into_inner(self) -> W {
        self.inner
    }

    fn watch<T>(&mut self, r: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &r {
            if self.failed.is_none() && e.kind() != io::ErrorKind::Interrupted {
                self.failed = Some((e.kind(), e.to_string()));
            }
        }
        r
    }
}

impl<W: Write> Write for WriteWatch<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let r = self.inner.write(buf);
        self.watch(r)
    }
    fn flush(&mut self) -> io::Result<()> {
        let r = self.inner.flush();
        self.watch(r)
    }
}

// No `From<io::Error>` and no `From<PgError>`: an I/O error must name its
// path and what pgvault was doing, and whether bytes are bad input or a
// damaged repository object depends on where they came from — so every
// caller maps them itself (issue 9, defect 6).

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::internal(format!("worker task failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full disk names the path, what was done, and says what to do; a
    /// write error seen through a decoder is still the write's.
    #[test]
    fn io_errors_name_the_path_and_hint() {
        let full = io::Error::from_raw_os_error(libc::ENOSPC);
        let e = Error::io(Kind::Repository, "write", "/repo/s/x", &full);
        assert!(
            e.to_string()
                .starts_with("write /repo/s/x: No space left on device"),
            "{e}"
        );
        assert!(e.hint_text().is_some_and(|h| h.contains("full")), "{e:?}");
        let mut w = WriteWatch::new(Failing);
        assert!(w.write_all(b"x").is_err());
        let seen = w.error().expect("the write error is kept");
        assert_eq!(seen.kind(), io::ErrorKind::StorageFull);
        assert!(io_hint(&seen).is_some());
        assert!(io_hint(&io::Error::other("x")).is_none());
    }

    struct Failing;
    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(libc::ENOSPC))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}
