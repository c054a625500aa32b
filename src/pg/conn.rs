//! Talking to a running PostgreSQL: the one place with SQL.
//!
//! Connection parameters honour the libpq variables (`PGHOST`, `PGPORT`,
//! `PGUSER`, `PGDATABASE`, `PGPASSWORD`); the password is only ever read
//! from the environment, never a flag.
//!
//! Base backups use the non-exclusive low-level API, held in one session
//! ("Making a Base Backup Using the Low Level API"): `pg_backup_start` /
//! `pg_backup_stop` on 15+, `pg_start_backup` / `pg_stop_backup` on 14.

use tokio_postgres::{Client, NoTls};

use super::{Lsn, TimelineId};

#[derive(Debug, Clone, Default)]
pub struct ConnParams {
    pub host: Option<String>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub dbname: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connect to PostgreSQL at {target}: {}", detail(.source))]
    Connect {
        target: String,
        source: tokio_postgres::Error,
    },
    #[error("{what}: {}", detail(.source))]
    Query {
        what: String,
        source: tokio_postgres::Error,
    },
    #[error("{0}")]
    Unexpected(String),
}

type Result<T> = std::result::Result<T, ConnError>;

/// tokio-postgres shows a server error as just "db error": say what the
/// server said, and for other errors the underlying cause.
fn detail(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{}: {}", db.severity(), db.message());
        if let Some(h) = db.hint() {
            s.push_str(&format!(" ({h})"));
        }
        return s;
    }
    match std::error::Error::source(e) {
        Some(src) => format!("{e}: {src}"),
        None => e.to_string(),
    }
}

/// An open session.
pub struct Session {
    client: Client,
    pub major: u32,
}

/// What the archiver looks like right now.
#[derive(Debug, Clone)]
pub struct ArchiverStatus {
    pub archive_mode: String,
    pub archive_command: String,
    pub archived_count: i64,
    pub failed_count: i64,
    pub last_archived_wal: Option<String>,
    pub last_failed_wal: Option<String>,
    /// The last failure is more recent than the last success.
    pub failing: bool,
}

/// A standby's WAL receiver (`pg_stat_wal_receiver`).
#[derive(Debug, Clone)]
pub struct WalReceiver {
    /// `streaming`, `starting`, `waiting`, …; `None` when not visible.
    pub status: Option<String>,
    pub received_tli: Option<TimelineId>,
    /// The server it streams from: host name, address or socket directory.
    pub sender_host: Option<String>,
    pub sender_port: Option<u16>,
}

/// The result of the backup stop call.
#[derive(Debug, Clone)]
pub struct BackupStop {
    pub lsn: Lsn,
    pub backup_label: String,
    pub tablespace_map: String,
}

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok().filter(|v| !v.is_empty())
}

impl ConnParams {
    /// Fills what was not given from the libpq environment and defaults.
    pub fn resolved(&self) -> ConnParams {
        let user = self
            .user
            .clone()
            .or_else(|| env("PGUSER"))
            .or_else(|| env("USER"))
            .or_else(|| env("LOGNAME"))
            .unwrap_or_else(|| "postgres".into());
        ConnParams {
            host: self
                .host
                .clone()
                .or_else(|| env("PGHOST"))
                .or_else(|| Some("/var/run/postgresql".into())),
            port: self
                .port
                .or_else(|| env("PGPORT").and_then(|p| p.parse().ok()))
                .or(Some(5432)),
            // Not libpq's default (the user name): the backup API works in
            // any database, and "postgres" exists on every cluster.
            dbname: self
                .dbname
                .clone()
                .or_else(|| env("PGDATABASE"))
                .or_else(|| Some("postgres".into())),
            user: Some(user),
        }
    }

    /// For messages: never includes a password.
    pub fn describe(&self) -> String {
        let r = self.resolved();
        format!(
            "host={} port={} user={} dbname={}",
            r.host.unwrap_or_default(),
            r.port.unwrap_or_default(),
            r.user.unwrap_or_default(),
            r.dbname.unwrap_or_default()
        )
    }
}

/// The keywords of a libpq connection string in its `key=value` form
/// (libpq's `conninfo_parse`: values may be single-quoted, with `\\` and
/// `\'` escapes). A URI (`postgresql://…`) is not parsed: `Err`.
pub fn parse_conninfo(s: &str) -> std::result::Result<Vec<(String, String)>, String> {
    if s.trim_start().starts_with("postgres") && s.contains("://") {
        return Err("a connection URI, not key=value pairs".into());
    }
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(format!("missing \"=\" after {key:?}"));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                    None => return Err(format!("unterminated quoted value of {key:?}")),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next());
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
}

fn lsn(s: &str, what: &str) -> Result<Lsn> {
    s.parse()
        .map_err(|_| ConnError::Unexpected(format!("{what} returned {s:?}")))
}

fn q(what: &str) -> impl FnOnce(tokio_postgres::Error) -> ConnError + '_ {
    move |source| ConnError::Query {
        what: what.to_string(),
        source,
    }
}

impl Session {
    pub async fn connect(params: &ConnParams) -> Result<Session> {
        let r = params.resolved();
        let mut cfg = tokio_postgres::Config::new();
        if let Some(h) = &r.host {
            for one in h.split(',') {
                if one.starts_with('/') {
                    cfg.host_path(one);
                } else {
                    cfg.host(one);
                }
            }
        }
        cfg.port(r.port.unwrap_or(5432));
        cfg.user(r.user.as_deref().unwrap_or("postgres"));
        cfg.dbname(r.dbname.as_deref().unwrap_or("postgres"));
        cfg.application_name("pgvault");
        cfg.connect_timeout(std::time::Duration::from_secs(10));
        if let Some(pw) = env("PGPASSWORD") {
            cfg.password(pw);
        }
        let (client, connection) =
            cfg.connect(NoTls)
                .await
                .map_err(|source| ConnError::Connect {
                    target: params.describe(),
                    source,
                })?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                log::debug!("PostgreSQL connection ended: {e}");
            }
        });
        let v: String = client
            .query_one("SHOW server_version_num", &[])
            .await
            .map_err(q("read server_version_num"))?
            .get(0);
        let num: u32 = v.parse().map_err(|_| {
            ConnError::Unexpected(format!("server_version_num {v:?} is not a number"))
        })?;
        Ok(Session {
            client,
            major: num / 10000,
        })
    }

    /// The client, for the SQL `pg::integrity` runs against a scratch
    /// server.
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    async fn text(&self, sql: &str, what: &str) -> Result<String> {
        let row = self.client.query_one(sql, &[]).await.map_err(q(what))?;
        Ok(row.get::<_, Option<String>>(0).unwrap_or_default())
    }

    pub async fn setting(&self, name: &str) -> Result<String> {
        let row = self
            .client
            .query_one("SELECT current_setting($1)", &[&name])
            .await
            .map_err(q(&format!("read setting {name}")))?;
        Ok(row.get(0))
    }

    pub async fn in_recovery(&self) -> Result<bool> {
        let row = self
            .client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .map_err(q("pg_is_in_recovery()"))?;
        Ok(row.get(0))
    }

    /// The server's clock, UTC, RFC 3339 with microseconds.
    pub async fn now_utc(&self) -> Result<String> {
        self.text(
            "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            "read the server clock",
        )
        .await
    }

    pub async fn archiver_status(&self) -> Result<ArchiverStatus> {
        let row = self
            .client
            .query_one(
                "SELECT current_setting('archive_mode'), current_setting('archive_command'),
                        archived_count, failed_count, last_archived_wal, last_failed_wal,
                        coalesce(last_failed_time > coalesce(last_archived_time, '-infinity'), false)
                   FROM pg_stat_archiver",
                &[],
            )
            .await
            .map_err(q("read pg_stat_archiver"))?;
        Ok(ArchiverStatus {
            archive_mode: row.get(0),
            archive_command: row.get(1),
            archived_count: row.get(2),
            failed_count: row.get(3),
            last_archived_wal: row.get(4),
            last_failed_wal: row.get(5),
            failing: row.get(6),
        })
    }

    /// Writes a little WAL (a switch on an idle cluster does nothing) and
    /// switches to a new segment; returns the name of the segment just
    /// completed, which the archiver will now hand to `archive_command`.
    pub async fn write_and_switch(&self) -> Result<String> {
        self.client
            .query_one(
                "SELECT pg_logical_emit_message(false, 'pgvault', 'check')::text",
                &[],
            )
            .await
            .map_err(q("write WAL (pg_logical_emit_message)"))?;
        self.text("SELECT pg_walfile_name(pg_switch_wal())", "pg_switch_wal()")
            .await
    }

    /// Starts a non-exclusive backup; returns its start LSN.
    pub async fn backup_start(&self, label: &str, fast: bool) -> Result<Lsn> {
        let sql = if self.major >= 15 {
            "SELECT pg_backup_start($1, $2)::text"
        } else {
            "SELECT pg_start_backup($1, $2, false)::text"
        };
        let row = self
            .client
            .query_one(sql, &[&label, &fast])
            .await
            .map_err(q("start the backup"))?;
        let s: String = row.get(0);
        s.parse()
            .map_err(|_| ConnError::Unexpected(format!("backup start returned {s:?}")))
    }

    /// Stops the backup started in this session. Does not wait for the
    /// archiver (PostgreSQL's own wait never gives up); the caller waits,
    /// with a bound, for the WAL to reach the repository.
    pub async fn backup_stop(&self) -> Result<BackupStop> {
        let sql = if self.major >= 15 {
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_backup_stop(wait_for_archive => false)"
        } else {
            "SELECT lsn::text, labelfile, spcmapfile FROM pg_stop_backup(false, false)"
        };
        let row = self
            .client
            .query_one(sql, &[])
            .await
            .map_err(q("stop the backup"))?;
        let lsn: String = row.get(0);
        Ok(BackupStop {
            lsn: lsn
                .parse()
                .map_err(|_| ConnError::Unexpected(format!("backup stop returned LSN {lsn:?}")))?,
            backup_label: row.get::<_, Option<String>>(1).unwrap_or_default(),
            tablespace_map: row.get::<_, Option<String>>(2).unwrap_or_default(),
        })
    }

    /// `pg_current_wal_lsn()`: where a primary writes now.
    pub async fn current_lsn(&self) -> Result<Lsn> {
        let s = self
            .text("SELECT pg_current_wal_lsn()::text", "pg_current_wal_lsn()")
            .await?;
        lsn(&s, "pg_current_wal_lsn()")
    }

    /// The timeline a primary writes, from the name of its current WAL
    /// file (`pg_control_checkpoint()` shows the last checkpoint's, which
    /// lags behind a promotion until the next checkpoint).
    pub async fn current_timeline(&self) -> Result<TimelineId> {
        let name = self
            .text(
                "SELECT pg_walfile_name(pg_current_wal_lsn())",
                "pg_walfile_name(pg_current_wal_lsn())",
            )
            .await?;
        name.get(..8)
            .and_then(|t| u32::from_str_radix(t, 16).ok())
            .map(TimelineId)
            .ok_or_else(|| ConnError::Unexpected(format!("pg_walfile_name returned {name:?}")))
    }

    /// `pg_last_wal_replay_lsn()`: how far a standby has replayed (`None`
    /// before it replayed anything).
    pub async fn replay_lsn(&self) -> Result<Option<Lsn>> {
        let row = self
            .client
            .query_one("SELECT pg_last_wal_replay_lsn()::text", &[])
            .await
            .map_err(q("pg_last_wal_replay_lsn()"))?;
        row.get::<_, Option<String>>(0)
            .map(|s| lsn(&s, "pg_last_wal_replay_lsn()"))
            .transpose()
    }

    /// The cluster's system identifier, as PostgreSQL prints it (decimal).
    pub async fn system_identifier(&self) -> Result<String> {
        self.text(
            "SELECT system_identifier::text FROM pg_control_system()",
            "read the system identifier (pg_control_system())",
        )
        .await
    }

    /// `CHECKPOINT` (superuser, or `pg_checkpoint` from PostgreSQL 15).
    pub async fn checkpoint(&self) -> Result<()> {
        self.client
            .batch_execute("CHECKPOINT")
            .await
            .map_err(q("CHECKPOINT"))
    }

    /// The location of the last checkpoint record in `pg_control` (on a
    /// standby: its last restartpoint).
    pub async fn last_checkpoint(&self) -> Result<Lsn> {
        let s = self
            .text(
                "SELECT checkpoint_lsn::text FROM pg_control_checkpoint()",
                "pg_control_checkpoint()",
            )
            .await?;
        lsn(&s, "pg_control_checkpoint()")
    }

    /// On a standby: the timeline of its minimum recovery point, which a
    /// backup from it ends on (`pg_backup_stop` returns that point).
    pub async fn min_recovery_timeline(&self) -> Result<TimelineId> {
        let row = self
            .client
            .query_one(
                "SELECT min_recovery_end_timeline::int8 FROM pg_control_recovery()",
                &[],
            )
            .await
            .map_err(q("pg_control_recovery()"))?;
        let t: i64 = row.get(0);
        u32::try_from(t).map(TimelineId).map_err(|_| {
            ConnError::Unexpected(format!("pg_control_recovery() returned timeline {t}"))
        })
    }

    /// `recovery_min_apply_delay`, in milliseconds.
    pub async fn apply_delay_ms(&self) -> Result<i64> {
        let row = self
            .client
            .query_one(
                "SELECT setting::int8 FROM pg_settings WHERE name = 'recovery_min_apply_delay'",
                &[],
            )
            .await
            .map_err(q("read setting recovery_min_apply_delay"))?;
        Ok(row.get(0))
    }

    /// What a standby's WAL receiver shows; `None` when it does not run.
    /// Without `pg_read_all_stats` the row's columns read as NULL.
    pub async fn wal_receiver(&self) -> Result<Option<WalReceiver>> {
        let rows = self
            .client
            .query(
                "SELECT status, received_tli::int8, sender_host, sender_port::int8
                   FROM pg_stat_wal_receiver",
                &[],
            )
            .await
            .map_err(q("read pg_stat_wal_receiver"))?;
        Ok(rows.first().map(|r| WalReceiver {
            status: r.get(0),
            received_tli: r
                .get::<_, Option<i64>>(1)
                .and_then(|t| u32::try_from(t).ok())
                .map(TimelineId),
            sender_host: r.get(2),
            sender_port: r
                .get::<_, Option<i64>>(3)
                .and_then(|p| u16::try_from(p).ok()),
        }))
    }

    /// The postmaster as it describes itself: its port and start time
    /// (seconds since the epoch), to be matched with `postmaster.pid`.
    pub async fn postmaster(&self) -> Result<(u16, i64)> {
        let row = self
            .client
            .query_one(
                "SELECT current_setting('port')::int8,
                        extract(epoch FROM pg_postmaster_start_time())::int8",
                &[],
            )
            .await
            .map_err(q("read the port and pg_postmaster_start_time()"))?;
        let port: i64 = row.get(0);
        Ok((
            u16::try_from(port)
                .map_err(|_| ConnError::Unexpected(format!("port {port} out of range")))?,
            row.get(1),
        ))
    }

    /// Tablespaces: (oid, name, location).
    pub async fn tablespaces(&self) -> Result<Vec<(u32, String, String)>> {
        let rows = self
            .client
            .query(
                "SELECT oid::int8, spcname::text, pg_tablespace_location(oid) FROM pg_tablespace
                  WHERE pg_tablespace_location(oid) <> ''",
                &[],
            )
            .await
            .map_err(q("list tablespaces"))?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, i64>(0) as u32, r.get(1), r.get(2)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get<'a>(kv: &'a [(String, String)], k: &str) -> Option<&'a str> {
        kv.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str())
    }

    #[test]
    fn conninfo_as_patroni_and_pg_basebackup_write_it() {
        // pg_basebackup -R quotes every value; Patroni writes plain ones.
        let kv = parse_conninfo(
            "user=replicator passfile='/var/lib/postgresql/.pgpass' channel_binding=prefer \
             host='10.0.0.1' port=5432 sslmode=prefer application_name='node 2'",
        )
        .unwrap();
        assert_eq!(get(&kv, "host"), Some("10.0.0.1"));
        assert_eq!(get(&kv, "port"), Some("5432"));
        assert_eq!(get(&kv, "user"), Some("replicator"));
        assert_eq!(get(&kv, "application_name"), Some("node 2"));
        let kv = parse_conninfo(r"host = /tmp password='it\'s' x=a\ b").unwrap();
        assert_eq!(get(&kv, "host"), Some("/tmp"));
        assert_eq!(get(&kv, "password"), Some("it's"));
        assert_eq!(get(&kv, "x"), Some("a b"));
        assert_eq!(parse_conninfo("").unwrap(), vec![]);
        assert!(parse_conninfo("host").is_err());
        assert!(parse_conninfo("host='x").is_err());
        assert!(parse_conninfo("postgresql://u@h:5432/db").is_err());
    }
}
