//! How far the server's archiver is behind: `pg_stat_archiver` against
//! the WAL the server has written (`pg_current_wal_lsn()`).

use serde::Serialize;

use super::conn::{ConnError, Session};
use super::{Lsn, WalFileName};

/// The archiver as the server sees it, and the lag that follows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ArchiverLag {
    /// Where the server writes WAL now; `None` on a standby.
    pub current_lsn: Option<Lsn>,
    pub last_archived_wal: Option<String>,
    /// When the archiver last succeeded (UTC, RFC 3339).
    pub last_archived_time: Option<String>,
    /// WAL written after the end of the last archived segment: what a
    /// disaster now would lose if the server's disk went with it.
    pub lag_bytes: Option<u64>,
    /// Complete segments waiting to be archived (the one being written is
    /// not complete).
    pub lag_segments: Option<u64>,
    /// `pg_stat_archiver`'s counters since its last reset.
    pub archived_count: u64,
    pub failed_count: u64,
    pub last_failed_wal: Option<String>,
    /// The last failure is newer than the last success.
    pub failing: bool,
}

pub async fn archiver_lag(session: &Session, seg_size: u32) -> Result<ArchiverLag, ConnError> {
    let row = session
        .client()
        .query_one(
            "SELECT CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END,
                    last_archived_wal,
                    to_char(last_archived_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                    archived_count, failed_count, last_failed_wal,
                    coalesce(last_failed_time > coalesce(last_archived_time, '-infinity'), false)
               FROM pg_stat_archiver",
            &[],
        )
        .await
        .map_err(|source| ConnError::Query {
            what: "read pg_stat_archiver".into(),
            source,
        })?;
    let current_lsn: Option<Lsn> = row.get::<_, Option<String>>(0).and_then(|l| l.parse().ok());
    let last_archived_wal: Option<String> = row.get(1);
    let (lag_bytes, lag_segments) = lag(current_lsn, last_archived_wal.as_deref(), seg_size);
    Ok(ArchiverLag {
        current_lsn,
        last_archived_wal,
        last_archived_time: row.get(2),
        lag_bytes,
        lag_segments,
        archived_count: row.get::<_, i64>(3).max(0) as u64,
        failed_count: row.get::<_, i64>(4).max(0) as u64,
        last_failed_wal: row.get(5),
        failing: row.get(6),
    })
}

/// Bytes and complete segments written after the last archived segment.
fn lag(
    current: Option<Lsn>,
    last_archived: Option<&str>,
    seg_size: u32,
) -> (Option<u64>, Option<u64>) {
    let Some(current) = current else {
        return (None, None);
    };
    let Some(last) = last_archived
        .and_then(|n| WalFileName::parse(n).ok())
        .and_then(|n| n.segno(seg_size))
    else {
        return (None, None);
    };
    let archived_to = last.next().start_lsn(seg_size);
    let bytes = current.0.saturating_sub(archived_to.0);
    let segments = current.segno(seg_size).0.saturating_sub(last.next().0);
    (Some(bytes), Some(segments))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_what_follows_the_last_archived_segment() {
        let seg = 16 << 20;
        // Archived up to segment 3; writing in segment 6.
        let current = Some(Lsn(6 * (16 << 20) + 100));
        assert_eq!(
            lag(current, Some("000000010000000000000003"), seg),
            (Some(2 * (16 << 20) + 100), Some(2))
        );
        // All caught up: writing the segment after the last archived one.
        assert_eq!(
            lag(
                Some(Lsn(4 * (16 << 20) + 5)),
                Some("000000010000000000000003"),
                seg
            ),
            (Some(5), Some(0))
        );
        assert_eq!(lag(current, Some("00000002.history"), seg), (None, None));
        assert_eq!(
            lag(None, Some("000000010000000000000003"), seg),
            (None, None)
        );
        assert_eq!(lag(current, None, seg), (None, None));
    }
}
