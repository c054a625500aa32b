//! `check`: prove that the set-up works now, end to end. `backup` runs the
//! same proof before it copies anything.
//!
//! Archiving is proven on the primary: it switches WAL and the segment must
//! reach the repository. Run against a standby, `check` finds its primary
//! (as a backup from the standby does), checks that the standby streams
//! from it on the same timeline, and proves archiving there.

use std::time::{Duration, Instant};

use crate::error::{Error, Kind, Result};
use crate::ops::gaps;
use crate::ops::pg_error;
use crate::ops::progress::Progress;
use crate::ops::standby::{self, PrimaryOverride};
use crate::ops::walfacts;
use crate::pg::archiver::archiver_lag;
use crate::pg::conn::{ArchiverStatus, ConnParams, Session};
use crate::pg::{SegmentNo, TimelineId, WalFileName};
use crate::repo::{DbInfo, Repository};

#[derive(Debug, Clone)]
pub struct CheckOptions {
    pub conn: ConnParams,
    /// The primary, when `conn` is a standby whose own connection to it is
    /// not the way.
    pub primary: PrimaryOverride,
    pub archive_timeout: Duration,
    /// Thresholds for monitors: the newest backup's age, the archiver's
    /// lag in bytes.
    pub max_backup_age: Option<Duration>,
    pub max_archive_lag: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct CheckReport {
    pub segment: String,
    /// The id of the configured key, proven to open the stanza's data keys
    /// and to seal and open an object (an encrypted stanza).
    pub key: Option<String>,
    /// The primary archiving was proven on, when `conn` is a standby.
    pub primary: Option<String>,
    pub warnings: Vec<String>,
    /// One per threshold given, in the order of the options.
    pub thresholds: Vec<Threshold>,
}

/// A threshold and what was measured against it.
#[derive(Debug, Clone, PartialEq)]
pub struct Threshold {
    /// `backup age`, `archive lag`.
    pub name: &'static str,
    /// What was measured (seconds or bytes); `None`: it could not be.
    pub value: Option<f64>,
    pub limit: f64,
    /// Why it could not be measured.
    pub note: Option<String>,
}

impl Threshold {
    pub fn met(&self) -> bool {
        self.value.is_some_and(|v| v <= self.limit)
    }
}

pub async fn check(
    repo: &Repository,
    opts: &CheckOptions,
    progress: &dyn Progress,
) -> Result<CheckReport> {
    // Before anything else: a key that does not work fails here, with its
    // own error, not as an archive_command that fails in the server log.
    let key = repo.prove_key().await?;
    let stanza = repo.require_stanza().await?;
    let db = stanza.current().clone();
    let session = Session::connect(&opts.conn).await.map_err(pg_error)?;
    if session.major != db.pg_version {
        return Err(Error::stanza(format!(
            "the server runs PostgreSQL {}, stanza {:?} records {}",
            session.major,
            repo.stanza(),
            db.pg_version
        ))
        .hint("after pg_upgrade run `pgvault stanza-upgrade --pgdata <new PGDATA>`"));
    }
    let primary = if session.in_recovery().await.map_err(pg_error)? {
        let p = standby::primary_of(&session, &opts.conn, &opts.primary).await?;
        standby::check_pair(&session, &p).await?;
        progress.message(&format!(
            "{} is a standby streaming from the primary at {}: proving archiving there",
            opts.conn.describe(),
            p.params.describe()
        ));
        Some(p)
    } else {
        None
    };
    let on = primary.as_ref().map(|p| &p.session).unwrap_or(&session);
    let status = on.archiver_status().await.map_err(pg_error)?;
    let mut warnings = Vec::new();
    if status.archive_mode == "always" {
        warnings.push(
            "archive_mode is always: a standby re-archives restored segments, whose bytes can differ from the primary's (pgvault then refuses them)"
                .to_string(),
        );
    }
    // With archive_mode off PostgreSQL shows archive_command as
    // "(disabled)": say what is really wrong (prove_archiving does).
    if status.archive_mode != "off"
        && (!status.archive_command.contains("pgvault")
            || !status.archive_command.contains("archive-push"))
    {
        return Err(Error::usage(format!(
            "archive_command is {:?}: it does not call pgvault archive-push",
            status.archive_command
        ))
        .hint(
            "set archive_command = 'pgvault --config <file> archive-push %p' and reload PostgreSQL",
        ));
    }
    // Measured before the switch below, which would change the lag; on the
    // primary when this is a standby (its archiver is the one that lags).
    let mut thresholds = Vec::new();
    if let Some(max) = opts.max_backup_age {
        thresholds.push(backup_age(repo, max).await?);
    }
    if let Some(max) = opts.max_archive_lag {
        let lag = archiver_lag(on, db.wal_segment_size)
            .await
            .map_err(pg_error)?;
        thresholds.push(Threshold {
            name: "archive lag",
            value: lag.lag_bytes.map(|b| b as f64),
            limit: max as f64,
            note: lag.lag_bytes.is_none().then(|| {
                "unknown: the server is a standby or has archived no segment yet".to_string()
            }),
        });
    }
    let segment = prove_archiving(repo, &db, on, opts.archive_timeout, progress).await?;
    // Archiving works; the archive must also be one cluster history.
    let archive = repo.archive(&db);
    let listing = archive.list().await?;
    let histories = archive.histories().await?;
    let superseded = walfacts::superseded_wal(&archive, None, &listing, &histories).await?;
    if let Some((fork, files)) = superseded.first() {
        return Err(Error::new(
            Kind::Timeline,
            format!(
                "{}: {} archived after that",
                fork.describe(),
                walfacts::names_list(files)
            ),
        )
        .hint("a split brain (an old primary writing after a failover: stop it), or the original of a PITR clone archiving into this stanza (restore clones with --archive-mode off); see docs/disaster-recovery.md"));
    }
    missed_wal(repo, &archive, &listing, &mut warnings).await?;
    Ok(CheckReport {
        key,
        segment,
        primary: primary.map(|p| p.params.describe()),
        warnings,
        thresholds,
    })
}

/// How long ago the newest complete backup ended.
async fn backup_age(repo: &Repository, max: Duration) -> Result<Threshold> {
    let newest = repo
        .manifests()
        .await?
        .iter()
        .filter_map(|m| m.stop_time_utc())
        .max();
    Ok(Threshold {
        name: "backup age",
        value: newest.map(|t| (chrono::Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0),
        limit: max.as_secs_f64(),
        note: newest.is_none().then(|| "no complete backup".to_string()),
    })
}

/// WAL this repository missed (several repositories: dropped from its
/// archive-push queue, see `ops::gaps`): a failure while no backup in it
/// starts after the gap — recovery from this repository cannot reach now —
/// and a warning once one does.
async fn missed_wal(
    repo: &Repository,
    archive: &crate::repo::archive::Archive,
    listing: &crate::repo::archive::Listing,
    warnings: &mut Vec<String>,
) -> Result<()> {
    let dropped = gaps::dropped_runs(archive, listing).await?;
    if dropped.is_empty() {
        return Ok(());
    }
    let db = archive.db();
    let seg = db.wal_segment_size;
    let newest = repo
        .backups()
        .await?
        .manifests
        .into_iter()
        .filter(|m| m.db_id == db.id)
        .map(|m| m.start_lsn.segno(seg))
        .max();
    let blocking: Vec<String> = dropped
        .iter()
        .filter(|r| {
            let end = WalFileName::parse(&r.to).ok().and_then(|n| n.segno(seg));
            match (newest, end) {
                (Some(start), Some(end)) => end >= start,
                _ => true,
            }
        })
        .map(|r| r.describe())
        .collect();
    if blocking.is_empty() {
        for r in &dropped {
            warnings.push(format!(
                "{} (before the newest backup's start: recovery to now does not need it)",
                r.describe()
            ));
        }
        return Ok(());
    }
    Err(Error::repository(format!(
        "{}: recovery from this repository's backups cannot pass it",
        blocking.join("; ")
    ))
    .hint("take a backup into this repository (`pgvault backup`, with --repo N for repository N alone): recovery from it does not need the missed WAL; the other repositories hold it"))
}

/// Archiving must work: archive_mode on, and a WAL switch now reaches the
/// repository within the bound. Returns the segment that proved it.
pub(crate) async fn prove_archiving(
    repo: &Repository,
    db: &DbInfo,
    session: &Session,
    timeout: Duration,
    progress: &dyn Progress,
) -> Result<String> {
    let st: ArchiverStatus = session.archiver_status().await.map_err(pg_error)?;
    if st.archive_mode == "off" {
        return Err(Error::new(Kind::Postgres, "archive_mode is off: WAL is not archived")
            .hint("set archive_mode = on and archive_command = 'pgvault archive-push %p', then restart PostgreSQL"));
    }
    // Callers hand the primary; a standby cannot switch WAL.
    if session.in_recovery().await.map_err(pg_error)? {
        return Err(Error::new(
            Kind::Postgres,
            "the server is in recovery: only the primary can switch WAL to prove archiving",
        ));
    }
    // pg_switch_wal() does nothing on an idle cluster: write a little WAL first.
    let segment = session.write_and_switch().await.map_err(pg_error)?;
    let name = WalFileName::parse(&segment).map_err(|e| {
        Error::new(
            Kind::Postgres,
            format!("pg_walfile_name returned {segment:?}: {e}"),
        )
    })?;
    progress.message(&format!(
        "checking that archiving works: waiting for {segment}"
    ));
    let segno = name
        .segno(db.wal_segment_size)
        .ok_or_else(|| Error::internal(format!("{segment} is not a segment")))?;
    wait_for_wal(repo, db, name.timeline(), segno, segno, timeout)
        .await
        .map_err(|e| {
            let why = match (&st.last_failed_wal, st.failing) {
                (Some(f), true) => format!(" (PostgreSQL reports archive_command failing on {f})"),
                _ => String::new(),
            };
            Error::new(Kind::Timeout, format!("archiving does not work: {e}{why}"))
                .hint("check archive_command and the PostgreSQL log; `select * from pg_stat_archiver` shows failures")
        })?;
    Ok(segment)
}

/// Waits until segments `first..=last` of `tli` are in the repository.
pub(crate) async fn wait_for_wal(
    repo: &Repository,
    db: &DbInfo,
    tli: TimelineId,
    first: SegmentNo,
    last: SegmentNo,
    timeout: Duration,
) -> Result<()> {
    let seg = db.wal_segment_size;
    let deadline = Instant::now() + timeout;
    let mut missing: Vec<WalFileName> = (first.0..=last.0)
        .map(|s| WalFileName::for_segment(tli, SegmentNo(s), seg))
        .collect();
    let archive = repo.archive(db);
    let mut delay = Duration::from_millis(50);
    loop {
        let have = archive.claimed_among(&missing).await?;
        missing.retain(|n| !have.contains(n));
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::new(
                Kind::Timeout,
                format!(
                    "{} WAL segment(s) not archived after {}s, first missing {}",
                    missing.len(),
                    timeout.as_secs(),
                    missing[0]
                ),
            )
            .hint("raise --archive-timeout, or check archive_command"));
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
    }
}
