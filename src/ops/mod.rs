//! One async function per command. Options in, results out; `cli` renders
//! them. Nothing here prints.

pub mod archive_get;
pub mod archive_push;
pub mod backup;
pub mod backups;
pub mod check;
pub mod drill;
pub mod expire;
pub mod exporter;
pub mod gaps;
pub mod info;
pub mod key;
pub mod metrics;
pub mod progress;
pub mod restore;
pub mod standby;
pub mod stanza_create;
pub mod stanza_upgrade;
pub mod verify;
pub mod walfacts;
mod workers;

use crate::error::{Error, Kind};

/// A failure talking to PostgreSQL, with a hint where the fix is known.
pub(crate) fn pg_error(e: crate::pg::conn::ConnError) -> Error {
    let hint = matches!(e, crate::pg::conn::ConnError::Connect { .. }).then_some(
        "set --pg-host/--pg-port/--pg-user (or PGHOST, PGPORT, PGUSER) to reach the server",
    );
    let err = Error::new(Kind::Postgres, e.to_string());
    match hint {
        Some(h) => err.hint(h),
        None => err,
    }
}
