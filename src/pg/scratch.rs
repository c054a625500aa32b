//! A scratch PostgreSQL server on a restored data directory, for `drill`:
//! started as an unprivileged user, on a private Unix socket with no TCP
//! listener, never archiving, its log where pgvault can read it.
//!
//! The restored `postgresql.conf` (when the backup holds one; Debian keeps
//! it in `/etc`) is the production server's, so everything that could
//! reach outside the scratch directory is set on the command line, which
//! beats both configuration files ("Parameter Interaction via the Shell",
//! `PGC_S_ARGV`): the data directory itself (a `data_directory` in the
//! file would otherwise win over `-D`), `listen_addresses = ''`, the socket
//! directory, `archive_mode = off`, the authentication files, the log,
//! `ssl`, `external_pid_file`. `hot_standby = off` keeps connections out
//! until recovery has ended and the server is promoted, so recovery never
//! waits on the primary's `max_connections` & co., and the first
//! connection that gets in is the end of recovery.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::binaries::{OsUser, PgBinaries};
use super::conn::{ConnError, ConnParams, Session};
use super::Lsn;
use tokio_postgres::error::SqlState;

/// The port number in the socket's name (`.s.PGSQL.<port>`); nothing
/// listens on TCP, and the socket directory is the scratch server's own.
pub const PORT: u16 = 5432;
/// `sun_path` holds 108 bytes (`UNIXSOCK_PATH_BUFLEN`), the NUL included.
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("PostgreSQL exited ({status}) {during}; its log says: {log}")]
    Exited {
        status: String,
        during: &'static str,
        log: String,
    },
    #[error("no role to connect as: tried {0} (neither exists in the restored cluster)")]
    NoRole(String),
    #[error("{0}")]
    Connect(String),
    #[error("PostgreSQL did not stop within {0:?}")]
    StopTimeout(Duration),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ServerError {
    let what = what.into();
    move |source| ServerError::Io { what, source }
}

/// Where the scratch server lives and who runs it.
#[derive(Debug, Clone)]
pub struct ServerSpec {
    pub bin: PgBinaries,
    pub pgdata: PathBuf,
    /// The socket directory: private (0700) to the server's user.
    pub socket_dir: PathBuf,
    /// The server's log (its stderr).
    pub log: PathBuf,
    /// Where the authentication files (and a `postgresql.conf` when the
    /// data directory has none) are written.
    pub conf_dir: PathBuf,
    /// The user to run as (when pgvault runs as root); `None`: this one.
    pub user: Option<OsUser>,
    /// The server's environment, which `restore_command` inherits.
    pub env: Vec<(String, String)>,
}

impl ServerSpec {
    /// Whether `dir` can hold the socket (its path is short enough).
    pub fn socket_dir_fits(dir: &Path) -> bool {
        dir.as_os_str().len() + format!("/.s.PGSQL.{PORT}").len() <= MAX_SOCKET_PATH
    }

    /// Connection parameters for `role` and `dbname` over the socket.
    pub fn conn(&self, role: &str, dbname: &str) -> ConnParams {
        ConnParams {
            host: Some(self.socket_dir.display().to_string()),
            port: Some(PORT),
            user: Some(role.to_string()),
            dbname: Some(dbname.to_string()),
        }
    }

    /// Runs program `tool` of these binaries as the server's user, with
    /// messages in English (they are parsed); returns its exit code (`None`:
    /// killed by a signal), stdout and stderr.
    pub async fn run_tool(
        &self,
        tool: &str,
        args: &[String],
    ) -> Result<(Option<i32>, String, String), ServerError> {
        let path = self.bin.tool(tool);
        let mut cmd = tokio::process::Command::new(&path);
        cmd.args(args)
            .env("LC_ALL", "C")
            .env("PGCONNECT_TIMEOUT", "10")
            .current_dir(&self.conf_dir)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        if let Some(u) = &self.user {
            cmd.uid(u.uid).gid(u.gid);
        }
        let o = cmd
            .output()
            .await
            .map_err(io_err(format!("run {}", path.display())))?;
        Ok((
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ))
    }
}

/// A running scratch server. Dropped while running, it is stopped at once
/// (immediate shutdown), so no failure leaves it behind.
pub struct ScratchServer {
    child: Option<tokio::process::Child>,
    spec: ServerSpec,
    pub started: Instant,
}

/// When the server's log says recovery reached its milestones (the log
/// lines of `xlogrecovery.c` and `xlog.c`, in English: the server runs
/// with `lc_messages = C`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecoveryLog {
    /// "redo starts at X": seconds after the start, and X.
    pub redo_start: Option<(f64, Lsn)>,
    /// "consistent recovery state reached".
    pub consistent: Option<f64>,
    /// "redo done at X".
    pub redo_done: Option<(f64, Lsn)>,
    /// "database system is ready to accept connections".
    pub ready: Option<f64>,
    /// "recovery stopping after/before …": where the target stopped it.
    pub stopped_at: Option<String>,
}

impl ScratchServer {
    /// Writes the authentication files, then starts `postgres` on the
    /// data directory, detached from this process's terminal signals
    /// (pgvault stops it itself).
    pub async fn start(spec: ServerSpec) -> Result<ScratchServer, ServerError> {
        let config_file = write_config(&spec)?;
        let log =
            File::create(&spec.log).map_err(io_err(format!("create {}", spec.log.display())))?;
        if let Some(u) = &spec.user {
            std::os::unix::fs::chown(&spec.log, Some(u.uid), Some(u.gid))
                .map_err(io_err(format!("chown {}", spec.log.display())))?;
        }
        let err = log
            .try_clone()
            .map_err(io_err(format!("open {}", spec.log.display())))?;
        let s = |p: &Path| p.display().to_string();
        let settings: Vec<(&str, String)> = vec![
            ("config_file", s(&config_file)),
            ("data_directory", s(&spec.pgdata)),
            ("hba_file", s(&spec.conf_dir.join("pg_hba.conf"))),
            ("ident_file", s(&spec.conf_dir.join("pg_ident.conf"))),
            ("external_pid_file", String::new()),
            ("listen_addresses", String::new()),
            ("port", PORT.to_string()),
            ("unix_socket_directories", s(&spec.socket_dir)),
            ("unix_socket_permissions", "0700".into()),
            ("unix_socket_group", String::new()),
            ("archive_mode", "off".into()),
            ("hot_standby", "off".into()),
            ("ssl", "off".into()),
            ("logging_collector", "off".into()),
            ("log_destination", "stderr".into()),
            ("lc_messages", "C".into()),
            ("log_timezone", "UTC".into()),
            ("log_line_prefix", "%m [%p] ".into()),
            ("log_min_messages", "log".into()),
            ("huge_pages", "try".into()),
        ];
        let mut cmd = tokio::process::Command::new(spec.bin.tool("postgres"));
        for (k, v) in &settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        cmd.env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&spec.conf_dir)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(0);
        if let Some(u) = &spec.user {
            cmd.uid(u.uid).gid(u.gid);
        }
        let child = cmd.spawn().map_err(io_err(format!(
            "start {}",
            spec.bin.tool("postgres").display()
        )))?;
        Ok(ScratchServer {
            child: Some(child),
            spec,
            started: Instant::now(),
        })
    }

    pub fn spec(&self) -> &ServerSpec {
        &self.spec
    }

    /// The postmaster's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Waits until the server accepts a connection out of recovery (with
    /// `hot_standby = off` that is after promotion), as the first of
    /// `roles` that exists; fails when the server exits first.
    pub async fn wait_promoted(
        &mut self,
        roles: &[String],
    ) -> Result<(Session, String), ServerError> {
        let mut delay = Duration::from_millis(50);
        let mut missing: Vec<&str> = Vec::new();
        loop {
            self.check_alive("while recovering")?;
            missing.clear();
            let mut starting = false;
            for role in roles {
                // template1: the one database every cluster keeps.
                match Session::connect(&self.spec.conn(role, "template1")).await {
                    Ok(s) => {
                        if s.in_recovery()
                            .await
                            .map_err(|e| ServerError::Connect(e.to_string()))?
                        {
                            starting = true;
                            break;
                        }
                        return Ok((s, role.clone()));
                    }
                    Err(ConnError::Connect { source, target }) => match source.code() {
                        // "role … does not exist"
                        Some(c) if *c == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => {
                            missing.push(role)
                        }
                        // "the database system is starting up" (or shutting down)
                        Some(c) if *c == SqlState::CANNOT_CONNECT_NOW => {
                            starting = true;
                            break;
                        }
                        Some(_) => {
                            return Err(ServerError::Connect(
                                ConnError::Connect { source, target }.to_string(),
                            ))
                        }
                        // No socket yet: the server is still starting.
                        None => {
                            starting = true;
                            break;
                        }
                    },
                    Err(e) => return Err(ServerError::Connect(e.to_string())),
                }
            }
            if !starting && missing.len() == roles.len() {
                return Err(ServerError::NoRole(roles.join(", ")));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }

    /// An error if the server has exited.
    fn check_alive(&mut self, during: &'static str) -> Result<(), ServerError> {
        let Some(child) = self.child.as_mut() else {
            return Err(ServerError::Exited {
                status: "stopped".into(),
                during,
                log: self.log_excerpt(),
            });
        };
        match child.try_wait() {
            Ok(Some(status)) => {
                self.child = None;
                Err(ServerError::Exited {
                    status: status.to_string(),
                    during,
                    log: self.log_excerpt(),
                })
            }
            Ok(None) => Ok(()),
            Err(e) => Err(io_err("wait for the scratch server")(e)),
        }
    }

    /// A clean (fast) shutdown: SIGINT, then wait for the postmaster to
    /// exit with success, which it does after its shutdown checkpoint.
    pub async fn stop(&mut self) -> Result<(), ServerError> {
        const BOUND: Duration = Duration::from_secs(600);
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Some(pid) = child.id() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
        }
        match tokio::time::timeout(BOUND, child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(ServerError::Exited {
                status: status.to_string(),
                during: "during its shutdown",
                log: self.log_excerpt(),
            }),
            Ok(Err(e)) => Err(io_err("wait for the scratch server")(e)),
            Err(_) => {
                self.child = Some(child);
                self.kill_now();
                Err(ServerError::StopTimeout(BOUND))
            }
        }
    }

    /// Immediate shutdown (SIGQUIT), waiting a little; SIGKILL if that does
    /// not do it. For failures and interruptions.
    pub fn kill_now(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let Some(pid) = child.id() else {
            return;
        };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGQUIT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.start_kill();
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.spec.log).unwrap_or_default()
    }

    /// What the log says went wrong: its PANIC, FATAL and ERROR lines (the
    /// last few), else its last lines.
    pub fn log_excerpt(&self) -> String {
        excerpt(&self.log_text())
    }

    /// Recovery's milestones from the log, in seconds after the start.
    pub fn recovery_log(&self, started_at: chrono::DateTime<chrono::Utc>) -> RecoveryLog {
        parse_recovery_log(&self.log_text(), started_at)
    }
}

impl Drop for ScratchServer {
    fn drop(&mut self) {
        self.kill_now();
    }
}

/// `pg_hba.conf` letting only local (socket) connections in, the socket
/// directory being private; an empty `pg_ident.conf`; and an empty
/// `postgresql.conf` when the data directory has none (Debian keeps it in
/// /etc). Returns the configuration file to use.
fn write_config(spec: &ServerSpec) -> Result<PathBuf, ServerError> {
    let write = |name: &str, text: &str| -> Result<PathBuf, ServerError> {
        let p = spec.conf_dir.join(name);
        fs::write(&p, text).map_err(io_err(format!("write {}", p.display())))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600))
            .map_err(io_err(format!("chmod {}", p.display())))?;
        if let Some(u) = &spec.user {
            std::os::unix::fs::chown(&p, Some(u.uid), Some(u.gid))
                .map_err(io_err(format!("chown {}", p.display())))?;
        }
        Ok(p)
    };
    write(
        "pg_hba.conf",
        "# pgvault drill: only the private socket, only this host\nlocal all all trust\n",
    )?;
    write("pg_ident.conf", "")?;
    let own = spec.pgdata.join("postgresql.conf");
    if own.exists() {
        return Ok(own);
    }
    write(
        "postgresql.conf",
        "# pgvault drill: the backup holds no postgresql.conf; defaults apply\n",
    )
}

fn excerpt(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let bad: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.contains("PANIC:") || l.contains("FATAL:") || l.contains("ERROR:"))
        .collect();
    let pick = if bad.is_empty() { &lines } else { &bad };
    let tail = &pick[pick.len().saturating_sub(4)..];
    if tail.is_empty() {
        "(nothing)".into()
    } else {
        tail.join(" | ")
    }
}

/// Reads the milestones from a log written with `log_line_prefix = '%m
/// [%p] '` and `log_timezone = UTC` (`2026-11-26 03:15:00.123 UTC [42]
/// LOG:  redo starts at 0/2000028`).
pub fn parse_recovery_log(text: &str, started_at: chrono::DateTime<chrono::Utc>) -> RecoveryLog {
    let mut r = RecoveryLog::default();
    for line in text.lines() {
        let Some(at) = line
            .get(..23)
            .and_then(|t| chrono::NaiveDateTime::parse_from_str(t, "%Y-%m-%d %H:%M:%S%.3f").ok())
        else {
            continue;
        };
        let secs = (at.and_utc() - started_at).num_milliseconds() as f64 / 1000.0;
        let Some((_, msg)) = line.split_once("LOG:  ") else {
            continue;
        };
        let lsn_after = |prefix: &str| -> Option<Lsn> {
            msg.strip_prefix(prefix)?
                .split(|c: char| c.is_whitespace() || c == ',')
                .next()?
                .parse()
                .ok()
        };
        if let Some(l) = lsn_after("redo starts at ") {
            r.redo_start.get_or_insert((secs, l));
        } else if msg.starts_with("consistent recovery state reached") {
            r.consistent.get_or_insert(secs);
        } else if let Some(l) = lsn_after("redo done at ") {
            r.redo_done = Some((secs, l));
        } else if msg.starts_with("database system is ready to accept connections") {
            r.ready.get_or_insert(secs);
        } else if msg.starts_with("recovery stopping ") {
            r.stopped_at = Some(msg.trim().to_string());
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_recovery_milestones() {
        let log = "\
2026-11-26 03:15:00.100 UTC [7] LOG:  starting PostgreSQL 15.8 on x86_64-pc-linux-gnu
2026-11-26 03:15:00.500 UTC [9] LOG:  redo starts at 0/2000028
2026-11-26 03:15:00.700 UTC [9] LOG:  consistent recovery state reached at 0/2000100
2026-11-26 03:15:02.000 UTC [9] LOG:  recovery stopping after commit of transaction 745, time 2026-11-26 03:10:00.1+00
2026-11-26 03:15:02.000 UTC [9] LOG:  redo done at 0/5000F80 system usage: CPU: user: 0.01 s, system: 0.00 s, elapsed: 1.50 s
2026-11-26 03:15:02.500 UTC [7] LOG:  database system is ready to accept connections
";
        let t0 = chrono::DateTime::parse_from_rfc3339("2026-11-26T03:15:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let r = parse_recovery_log(log, t0);
        assert_eq!(r.redo_start, Some((0.5, Lsn(0x2000028))));
        assert_eq!(r.consistent, Some(0.7));
        assert_eq!(r.redo_done, Some((2.0, Lsn(0x5000F80))));
        assert_eq!(r.ready, Some(2.5));
        assert!(r.stopped_at.unwrap().contains("transaction 745"));
    }

    #[test]
    fn an_excerpt_prefers_errors() {
        assert_eq!(excerpt("a\nb\nFATAL:  x\nc\n"), "FATAL:  x".to_string());
        assert_eq!(excerpt("a\nb\n"), "a | b");
        assert_eq!(excerpt(""), "(nothing)");
    }

    #[test]
    fn socket_paths_must_be_short() {
        assert!(ServerSpec::socket_dir_fits(Path::new(
            "/tmp/pgvault-drill-x/sock"
        )));
        assert!(!ServerSpec::socket_dir_fits(&PathBuf::from(format!(
            "/{}",
            "d".repeat(100)
        ))));
    }
}
