//! Which server a backup copies, and the primary behind a standby
//! (`backup-standby = n | prefer | y`, pgBackRest's words).
//!
//! pgvault runs on the host of the server whose files it copies and reads
//! them from its local disk: `--pgdata` and `--pg-host`/`--pg-port` name
//! that server, "this node". The same configuration then serves every node
//! of a Patroni cluster, whatever role each has today.
//!
//! A backup from a standby starts and stops on the standby — the
//! non-exclusive API works there ("Making a Base Backup Using the Low Level
//! API"); the backup then ends at the standby's minimum recovery point, and
//! `global/pg_control`, copied last, carries it — and its files come from
//! the standby's data directory, so the primary does no backup I/O. The
//! primary (found from the standby's WAL receiver or `primary_conninfo`,
//! or `--primary-host`/`--primary-port`/`--primary-user`) is used only to
//! prove archiving, to checkpoint with `--start-fast`, and to switch WAL so
//! that the segment holding the stop point gets archived.
//!
//! A promotion during the backup fails it: a backup whose label starts on
//! one timeline and whose files were copied while the server changed roles
//! is not worth the doubt. PostgreSQL itself refuses to stop such a backup
//! ("the standby was promoted during online backup"); pgvault says so
//! plainly, and also fails when the standby followed a new primary onto
//! another timeline, or when its primary stopped being one. No manifest is
//! written, so the backup is never offered for restore.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Kind, Result};
use crate::ops::pg_error;
use crate::ops::progress::Progress;
use crate::pg::conn::{parse_conninfo, ConnError, ConnParams, Session};
use crate::pg::datadir::{PostmasterPid, POSTMASTER_PID};
use crate::pg::{Lsn, TimelineId};

/// `backup-standby`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StandbyMode {
    /// Back up this node, which must be the primary.
    #[default]
    No,
    /// Back up this node if it is a healthy standby; otherwise the primary.
    Prefer,
    /// Back up this node, which must be a healthy standby.
    Yes,
}

impl StandbyMode {
    pub fn parse(s: &str) -> std::result::Result<StandbyMode, String> {
        match s.to_ascii_lowercase().as_str() {
            "n" | "no" | "false" => Ok(StandbyMode::No),
            "prefer" => Ok(StandbyMode::Prefer),
            "y" | "yes" | "true" => Ok(StandbyMode::Yes),
            _ => Err("expected n, prefer or y".into()),
        }
    }

    fn name(self) -> &'static str {
        match self {
            StandbyMode::No => "n",
            StandbyMode::Prefer => "prefer",
            StandbyMode::Yes => "y",
        }
    }
}

/// `--primary-host`, `--primary-port`, `--primary-user`: the primary when
/// the standby's own connection to it is not the way pgvault should go.
#[derive(Debug, Clone, Default)]
pub struct PrimaryOverride {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
}

/// A connection to the primary.
pub(crate) struct Primary {
    pub session: Session,
    pub params: ConnParams,
}

/// The server a backup copies.
pub(crate) struct Source {
    /// Where the backup starts and stops.
    pub session: Session,
    pub params: ConnParams,
    /// Whose files are copied.
    pub pgdata: PathBuf,
    /// Set when `session` is a standby: the primary, for the WAL switch.
    pub primary: Option<Primary>,
}

/// Chooses the server to back up under `mode`; `local` and `pgdata` are
/// this node's server.
pub(crate) async fn choose(
    mode: StandbyMode,
    local: &ConnParams,
    pgdata: &Path,
    over: &PrimaryOverride,
    progress: &dyn Progress,
) -> Result<Source> {
    if mode == StandbyMode::No {
        let session = Session::connect(local).await.map_err(pg_error)?;
        if session.in_recovery().await.map_err(pg_error)? {
            return Err(Error::new(
                Kind::Postgres,
                format!(
                    "the server at {} is a standby (in recovery), and backup-standby is n",
                    local.describe()
                ),
            )
            .hint("set backup-standby = prefer or y to back up from this standby (its primary only switches WAL), or point --pg-host/--pg-port at the primary"));
        }
        return Ok(Source {
            session,
            params: local.clone(),
            pgdata: pgdata.to_path_buf(),
            primary: None,
        });
    }
    let setting = format!("backup-standby = {}", mode.name());
    match try_standby(local, pgdata, over).await {
        Ok(Attempt::Standby(source)) => Ok(*source),
        Ok(Attempt::IsPrimary(session)) => {
            if mode == StandbyMode::Yes {
                return Err(Error::new(
                    Kind::Postgres,
                    format!(
                        "{setting}, but the server at {} is the primary, not a standby",
                        local.describe()
                    ),
                )
                .hint("run the backup on a standby's host, or set backup-standby = prefer to back up the primary when it is the node at hand"));
            }
            progress.message(&format!(
                "{setting}: the server at {} is the primary; backing it up",
                local.describe()
            ));
            Ok(Source {
                session,
                params: local.clone(),
                pgdata: pgdata.to_path_buf(),
                primary: None,
            })
        }
        Err(failed) if mode == StandbyMode::Yes => Err(failed
            .error
            .context(format!("{setting}: no healthy standby to back up"))),
        Err(failed) => fall_back(&setting, failed, local, over, progress).await,
    }
}

enum Attempt {
    Standby(Box<Source>),
    IsPrimary(Session),
}

/// Why this node's standby cannot be backed up, and the primary if it was
/// reached on the way.
struct NoStandby {
    error: Error,
    primary: Option<Primary>,
}

impl From<Error> for NoStandby {
    fn from(error: Error) -> Self {
        NoStandby {
            error,
            primary: None,
        }
    }
}

async fn try_standby(
    local: &ConnParams,
    pgdata: &Path,
    over: &PrimaryOverride,
) -> std::result::Result<Attempt, NoStandby> {
    let session = Session::connect(local).await.map_err(pg_error)?;
    if !session.in_recovery().await.map_err(pg_error)? {
        return Ok(Attempt::IsPrimary(session));
    }
    let primary = primary_of(&session, local, over).await?;
    if let Err(error) = check_pair(&session, &primary).await {
        return Err(NoStandby {
            error,
            primary: Some(primary),
        });
    }
    Ok(Attempt::Standby(Box::new(Source {
        session,
        params: local.clone(),
        pgdata: pgdata.to_path_buf(),
        primary: Some(primary),
    })))
}

/// `prefer` without a healthy standby: back up the primary, whose data
/// directory must then be on this host.
async fn fall_back(
    setting: &str,
    failed: NoStandby,
    local: &ConnParams,
    over: &PrimaryOverride,
    progress: &dyn Progress,
) -> Result<Source> {
    let reason = failed.error.to_string();
    let primary = match failed.primary {
        Some(p) => p,
        None if over.host.is_none() => {
            return Err(Error::new(
                Kind::Postgres,
                format!("{setting}: no healthy standby ({reason}), and the primary is unknown"),
            )
            .hint("give --primary-host and --primary-port, so that pgvault can back up the primary when the standby is down"));
        }
        None => {
            let params = primary_params(over, None, local);
            connect_primary(params, "--primary-host").await?
        }
    };
    let dir = primary
        .session
        .setting("data_directory")
        .await
        .map_err(|e| {
            pg_error(e).context(format!(
                "{setting}: no healthy standby ({reason}); find the primary's data directory"
            ))
        })?;
    progress.message(&format!(
        "{setting}: no healthy standby ({reason}); backing up the primary at {} from {dir}",
        primary.params.describe()
    ));
    Ok(Source {
        session: primary.session,
        params: primary.params,
        pgdata: PathBuf::from(dir),
        primary: None,
    })
}

/// The primary `standby` streams from, connected: `over` first, then what
/// its WAL receiver shows, then its `primary_conninfo`. The user and
/// database are this node's (a standby has its primary's roles; the
/// replication role of `primary_conninfo` usually may not log in to a
/// database, nor switch WAL).
pub(crate) async fn primary_of(
    standby: &Session,
    local: &ConnParams,
    over: &PrimaryOverride,
) -> Result<Primary> {
    let receiver = standby.wal_receiver().await.map_err(pg_error)?;
    let (found, source) = match receiver {
        Some(r) if r.sender_host.is_some() => (
            Some((r.sender_host, r.sender_port)),
            "the standby's WAL receiver",
        ),
        _ if over.host.is_some() => (None, "--primary-host"),
        _ => (
            Some(conninfo_target(standby).await?),
            "the standby's primary_conninfo",
        ),
    };
    let source = if over.host.is_some() {
        "--primary-host"
    } else {
        source
    };
    let params = primary_params(over, found, local);
    connect_primary(params, source).await
}

/// Host and port from the standby's `primary_conninfo`.
async fn conninfo_target(standby: &Session) -> Result<(Option<String>, Option<u16>)> {
    let unknown = |why: String| {
        Error::new(
            Kind::Postgres,
            format!("cannot tell where the standby's primary is: {why}"),
        )
        .hint("give the primary with --primary-host and --primary-port")
    };
    let conninfo = standby
        .setting("primary_conninfo")
        .await
        .map_err(|e| unknown(format!("its WAL receiver does not run, and {e}")))?;
    let kv = parse_conninfo(&conninfo)
        .map_err(|e| unknown(format!("primary_conninfo is not understood ({e})")))?;
    let get = |k: &str| kv.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
    let host = get("host").or_else(|| get("hostaddr"));
    if host.is_none() {
        return Err(unknown("primary_conninfo names no host".into()));
    }
    let port = get("port").and_then(|p| p.split(',').next()?.trim().parse().ok());
    Ok((host, port))
}

fn primary_params(
    over: &PrimaryOverride,
    found: Option<(Option<String>, Option<u16>)>,
    local: &ConnParams,
) -> ConnParams {
    let local = local.resolved();
    let (host, port) = found.unwrap_or_default();
    ConnParams {
        host: over.host.clone().or(host),
        port: over.port.or(port).or(Some(5432)),
        user: over.user.clone().or(local.user),
        dbname: local.dbname,
    }
}

async fn connect_primary(params: ConnParams, source: &str) -> Result<Primary> {
    let session = Session::connect(&params).await.map_err(|e| {
        Error::new(Kind::Postgres, format!("the primary (from {source}): {e}"))
            .hint("give the primary with --primary-host/--primary-port/--primary-user (PGPASSWORD or a trusted connection for its password)")
    })?;
    if session.in_recovery().await.map_err(pg_error)? {
        return Err(Error::new(
            Kind::Postgres,
            format!(
                "the server at {} (from {source}) is a standby itself (cascading replication), not the primary",
                params.describe()
            ),
        )
        .hint("point --primary-host/--primary-port at the primary"));
    }
    Ok(Primary { session, params })
}

/// The standby can be backed up now: the primary's cluster, streaming on
/// the primary's timeline. Returns that timeline.
pub(crate) async fn check_pair(standby: &Session, primary: &Primary) -> Result<TimelineId> {
    let at = primary.params.describe();
    let (mine, theirs) = (
        standby.system_identifier().await.map_err(pg_error)?,
        primary
            .session
            .system_identifier()
            .await
            .map_err(pg_error)?,
    );
    if mine != theirs {
        return Err(Error::new(
            Kind::Postgres,
            format!("the standby is cluster {mine}, but the primary at {at} is cluster {theirs}"),
        )
        .hint("point --primary-host/--primary-port at this standby's primary"));
    }
    if standby.major != primary.session.major {
        return Err(Error::new(
            Kind::Postgres,
            format!(
                "the standby runs PostgreSQL {}, the primary at {at} {}",
                standby.major, primary.session.major
            ),
        ));
    }
    let receiver = standby.wal_receiver().await.map_err(pg_error)?;
    let tli = primary.session.current_timeline().await.map_err(pg_error)?;
    match receiver {
        None => Err(Error::new(
            Kind::Postgres,
            "the standby is not streaming: its WAL receiver does not run",
        )
        .hint("check primary_conninfo and the standby's log; a standby replaying only from the archive lags behind")),
        Some(r) => match r.status.as_deref() {
            None => Err(Error::new(
                Kind::Postgres,
                "cannot see whether the standby streams: pg_stat_wal_receiver shows nothing to this user",
            )
            .hint("grant pg_read_all_stats to the backup user")),
            Some("streaming") if r.received_tli == Some(tli) => Ok(tli),
            Some("streaming") => Err(Error::new(
                Kind::Postgres,
                format!(
                    "the standby streams timeline {}, but the primary at {at} writes timeline {tli}",
                    r.received_tli.map(|t| t.to_string()).unwrap_or_else(|| "?".into())
                ),
            )),
            Some(other) => Err(Error::new(
                Kind::Postgres,
                format!("the standby is not streaming (its WAL receiver is {other})"),
            )),
        },
    }
}

/// `pgdata` is the data directory of the server `session` is connected to:
/// its `postmaster.pid` names that server's port and start time. A backup
/// label from one server with the files of another (a standby and its
/// primary share their system identifier) would restore into garbage.
pub(crate) async fn check_datadir(
    session: &Session,
    params: &ConnParams,
    pgdata: &Path,
) -> Result<()> {
    let path = pgdata.join(POSTMASTER_PID);
    let (port, started) = session.postmaster().await.map_err(pg_error)?;
    let text = tokio::fs::read_to_string(&path).await;
    let pid = text.as_deref().ok().and_then(PostmasterPid::parse);
    // PostgreSQL notes the start time for the lock file a moment before
    // pg_postmaster_start_time() (shared memory is set up in between).
    const SLACK: i64 = 10;
    let why = match (&text, pid) {
        (Err(e), _) => format!("read {}: {e}", path.display()),
        (Ok(_), None) => format!("{} is incomplete", path.display()),
        (Ok(_), Some(p)) if p.port != port => format!(
            "{} is of a server on port {}, pgvault is connected to one on port {port}",
            path.display(),
            p.port
        ),
        (Ok(_), Some(p)) if (p.start_time - started).abs() > SLACK => format!(
            "{} is of a server started at {} (seconds since the epoch), pgvault is connected to one started at {started}",
            path.display(),
            p.start_time
        ),
        (Ok(_), Some(_)) => return Ok(()),
    };
    Err(Error::new(
        Kind::InvalidInput,
        format!(
            "{} is not the data directory of the server at {}: {why}",
            pgdata.display(),
            params.describe()
        ),
    )
    .hint("pgvault reads the files of the server it backs up from this host's disk: run it on that server's host, with --pgdata its data directory and --pg-host/--pg-port that server"))
}

/// Before the backup starts on a standby: the primary checkpoints (with
/// `--start-fast`), and the standby replays past the primary's last
/// checkpoint, so that its restartpoint — the backup's start — is recent.
/// The wait is bounded by `timeout` without progress: a slow standby that
/// keeps replaying is waited for.
///
/// A standby with `recovery_min_apply_delay` replays late on purpose: it
/// is backed up as it stands, from its last restartpoint (the backup then
/// holds the data of that delay ago, and restoring it replays the delay's
/// WAL from the archive).
pub(crate) async fn wait_replayed(
    standby: &Session,
    primary: &Primary,
    start_fast: bool,
    timeout: Duration,
    progress: &dyn Progress,
) -> Result<()> {
    let delay = standby.apply_delay_ms().await.map_err(pg_error)?;
    if delay > 0 {
        progress.message(&format!(
            "the standby applies WAL {}s late (recovery_min_apply_delay): the backup starts at its last restartpoint and holds its data as of its replay point",
            delay / 1000
        ));
        return Ok(());
    }
    if start_fast {
        primary.session.checkpoint().await.map_err(|e| {
            pg_error(e)
                .context(format!("checkpoint on the primary at {}", primary.params.describe()))
                .hint("--start-fast checkpoints the primary: grant pg_checkpoint to the backup user there, or leave --start-fast out")
        })?;
    }
    let target = primary.session.last_checkpoint().await.map_err(pg_error)?;
    progress.message(&format!(
        "waiting for the standby to replay past the primary's checkpoint at {target}"
    ));
    let mut last: Option<Lsn> = None;
    let mut since = Instant::now();
    loop {
        let replayed = standby.replay_lsn().await.map_err(pg_error)?;
        if replayed.is_some_and(|r| r > target) {
            return Ok(());
        }
        if replayed > last {
            last = replayed;
            since = Instant::now();
        } else if since.elapsed() >= timeout {
            let at = last
                .map(|l| l.to_string())
                .unwrap_or_else(|| "nothing".into());
            return Err(Error::new(
                Kind::Timeout,
                format!(
                    "the standby has replayed up to {at}, not past the backup's start point {target} (the primary's checkpoint), and made no progress for {}s",
                    timeout.as_secs()
                ),
            )
            .hint("check replication (pg_stat_wal_receiver on the standby, pg_stat_replication on the primary), or raise --archive-timeout"));
        }
        if !standby.in_recovery().await.map_err(pg_error)? {
            return Err(promoted());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn promoted() -> Error {
    Error::new(
        Kind::Postgres,
        "the standby was promoted during the backup: its files are not a consistent backup of either role",
    )
    .hint("take the backup again (backup-standby = prefer backs up the new primary if no standby is left)")
}

/// Whether the standby is still one after `pg_backup_stop` (whose own
/// error on a promotion is "the standby was promoted during online
/// backup"): a promotion is reported as such, whatever the stop said.
pub(crate) async fn still_standby(standby: &Session) -> Result<()> {
    match standby.in_recovery().await {
        Ok(true) => Ok(()),
        Ok(false) => Err(promoted()),
        Err(e) => Err(pg_error(e)),
    }
}

/// After a backup from a standby stopped at `stop` on timeline `tli`: the
/// standby ended on the timeline it started on, the primary still is one
/// on that timeline, and the segment holding `stop` is complete there (the
/// primary switches WAL if it still writes that segment), so that the
/// archiver hands it to pgvault.
pub(crate) async fn finish_on_primary(
    standby: &Session,
    primary: &Primary,
    tli: TimelineId,
    stop: Lsn,
    seg_size: u32,
) -> Result<()> {
    let ended = standby.min_recovery_timeline().await.map_err(pg_error)?;
    if ended != tli {
        return Err(Error::new(
            Kind::Postgres,
            format!("the standby moved from timeline {tli} to {ended} during the backup (its primary failed over)"),
        )
        .hint("take the backup again"));
    }
    let on_primary =
        |e: ConnError| pg_error(e).context(format!("the primary at {}", primary.params.describe()));
    if primary.session.in_recovery().await.map_err(on_primary)? {
        return Err(Error::new(
            Kind::Postgres,
            format!(
                "the primary at {} became a standby during the backup (a switchover)",
                primary.params.describe()
            ),
        )
        .hint("take the backup again"));
    }
    let now = primary
        .session
        .current_timeline()
        .await
        .map_err(on_primary)?;
    if now != tli {
        return Err(Error::new(
            Kind::Postgres,
            format!("the backup is on timeline {tli}, but the primary now writes timeline {now}"),
        )
        .hint("take the backup again"));
    }
    let current = primary.session.current_lsn().await.map_err(on_primary)?;
    if current.segno(seg_size) <= stop.segno(seg_size) {
        primary
            .session
            .write_and_switch()
            .await
            .map_err(on_primary)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(StandbyMode::parse("n"), Ok(StandbyMode::No));
        assert_eq!(StandbyMode::parse("PREFER"), Ok(StandbyMode::Prefer));
        assert_eq!(StandbyMode::parse("y"), Ok(StandbyMode::Yes));
        assert!(StandbyMode::parse("maybe").is_err());
    }

    #[test]
    fn the_primary_is_reached_as_this_node_s_user() {
        let local = ConnParams {
            host: Some("/run/pg".into()),
            port: Some(5433),
            user: Some("backup".into()),
            dbname: Some("postgres".into()),
        };
        let p = primary_params(
            &PrimaryOverride::default(),
            Some((Some("10.0.0.1".into()), Some(5432))),
            &local,
        );
        assert_eq!(p.host.as_deref(), Some("10.0.0.1"));
        assert_eq!(p.port, Some(5432));
        assert_eq!(p.user.as_deref(), Some("backup"));
        let over = PrimaryOverride {
            host: Some("vip".into()),
            port: None,
            user: Some("admin".into()),
        };
        let p = primary_params(&over, Some((Some("10.0.0.1".into()), Some(6432))), &local);
        assert_eq!(p.host.as_deref(), Some("vip"));
        assert_eq!(p.port, Some(6432));
        assert_eq!(p.user.as_deref(), Some("admin"));
        let p = primary_params(&over, None, &local);
        assert_eq!(p.port, Some(5432));
    }
}
