//! Options: flags > `PGVAULT_*` environment variables > the TOML file.
//!
//! Every option is written once, as one field of a clap `Args` struct in
//! this file. Its flag (`--compress-level`), its environment variable
//! (`PGVAULT_COMPRESS_LEVEL`) and its file key (`compress-level = 3`), its
//! `--help` text, type, check and default all come from that field.
//! `config/layers.rs` puts the file and the environment under the flags. A
//! command's `--help` shows the options of the structs that command
//! flattens, grouped under "Repository", "PostgreSQL" and its own
//! "Options".
//!
//! # Adding an option
//!
//! One field, in the struct of the commands that use it:
//! - every command: [`Global`] (with `global = true`);
//! - one command: that command's struct ([`Backup`], [`ArchivePush`], …);
//! - several commands: the group they all flatten ([`Compression`],
//!   [`Workers`], …), or a new group (`#[derive(Debug, Clone, Args)]
//!   #[group(skip)]`, as the others) flattened into each of them.
//!
//! ```ignore
//! /// Take the backup from a standby [default: false]
//! #[arg(long, env = "PGVAULT_BACKUP_STANDBY", value_name = "BOOL",
//!       action = ArgAction::Set, default_value_t = false)]
//! pub backup_standby: bool,
//! ```
//!
//! - `env = "PGVAULT_<NAME>"` (the long name in upper case, `_` for `-`;
//!   a test checks) is what makes the field an option: settable from the
//!   environment and the file too. Flags of the command line only
//!   (`--start-fast`, `--target-time`) live in `cli/args.rs` without one.
//! - The doc comment is the `--help` text: true for every command that
//!   shows it.
//! - The default: `default_value_t` (shown by `--help`), or `Option<T>`
//!   when there is none or it is computed at run time (then say it in the
//!   text).
//! - Parse into the type the code uses (`value_parser = parse_duration`):
//!   a bad value is then refused before the command starts, naming the
//!   flag, the variable or the file key.
//! - A boolean takes a value (`action = ArgAction::Set`: `--expire-auto
//!   false`), so that a flag can override the file.
//! - A secret (a key, a password): type [`Secret`] and `hide = true` (a
//!   test checks). It is refused as a flag (flags show in `ps`) and never
//!   printed.
//!
//! Then read it where `cli/mod.rs` builds the command's options for `ops`
//! (`options.backup_standby`), and add its row to docs/configuration.md (a
//! test checks).

mod layers;

pub use layers::{is_secret, parse, ParseError, Parsed};

use std::convert::Infallible;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::builder::RangedU64ValueParser;
use clap::{ArgAction, Args};

use crate::error::{Error, Result};
use crate::ops::archive_push::OnSuperseded;
use crate::ops::standby::{PrimaryOverride, StandbyMode};
use crate::pg::conn::ConnParams;
use crate::repo::s3::S3Options;
use crate::repo::{EncodeOptions, RepoLocation, Repository};
use crate::spool::SpoolDir;

pub const DEFAULT_CONFIG: &str = "/etc/pgvault/pgvault.toml";

/// `--help` headings; options without one are the command's own.
const REPOSITORY: &str = "Repository";
const POSTGRES: &str = "PostgreSQL";
const GENERAL: &str = "General";

/// Options of every command, accepted before or after the command name.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct Global {
    /// Repository: a path, file:///path or s3://bucket/prefix
    #[arg(
        long,
        global = true,
        env = "PGVAULT_REPO",
        value_name = "URL",
        value_parser = RepoLocation::parse,
        help_heading = REPOSITORY
    )]
    pub repo: Option<RepoLocation>,
    /// Stanza: the cluster's name in the repository
    #[arg(
        long,
        global = true,
        env = "PGVAULT_STANZA",
        value_name = "NAME",
        default_value = "main",
        help_heading = REPOSITORY
    )]
    pub stanza: String,
    /// S3 endpoint URL [default: AWS_ENDPOINT]
    #[arg(
        long,
        global = true,
        env = "PGVAULT_S3_ENDPOINT",
        value_name = "URL",
        help_heading = REPOSITORY
    )]
    pub s3_endpoint: Option<String>,
    /// S3 region [default: AWS_REGION]
    #[arg(
        long,
        global = true,
        env = "PGVAULT_S3_REGION",
        value_name = "REGION",
        help_heading = REPOSITORY
    )]
    pub s3_region: Option<String>,
    /// Allow plain HTTP to the S3 endpoint [default: AWS_ALLOW_HTTP]
    #[arg(
        long,
        global = true,
        env = "PGVAULT_S3_ALLOW_HTTP",
        value_name = "BOOL",
        help_heading = REPOSITORY
    )]
    pub s3_allow_http: Option<bool>,
    /// Whether the store's conditional create (If-None-Match) is atomic under races
    #[arg(
        long,
        global = true,
        env = "PGVAULT_S3_ATOMIC_CREATE",
        value_name = "BOOL",
        action = ArgAction::Set,
        default_value_t = true,
        help_heading = REPOSITORY
    )]
    pub s3_atomic_create: bool,
    /// S3 access key id (the file or the environment only) [default: AWS_ACCESS_KEY_ID]
    #[arg(
        long,
        global = true,
        hide = true,
        env = "PGVAULT_S3_ACCESS_KEY_ID",
        value_parser = Secret::parse
    )]
    pub s3_access_key_id: Option<Secret>,
    /// S3 secret access key (the file or the environment only) [default: AWS_SECRET_ACCESS_KEY]
    #[arg(
        long,
        global = true,
        hide = true,
        env = "PGVAULT_S3_SECRET_ACCESS_KEY",
        value_parser = Secret::parse
    )]
    pub s3_secret_access_key: Option<Secret>,
    /// Configuration file (TOML) [default: /etc/pgvault/pgvault.toml, when it exists]
    #[arg(
        long,
        global = true,
        env = "PGVAULT_CONFIG",
        value_name = "FILE",
        help_heading = GENERAL
    )]
    pub config: Option<PathBuf>,
    /// Log lines on stderr from this level up: off, error, warn, info, debug or trace
    #[arg(
        long,
        global = true,
        env = "PGVAULT_LOG_LEVEL",
        value_name = "LEVEL",
        default_value = "warn",
        value_parser = parse_log_level,
        help_heading = GENERAL
    )]
    pub log_level: log::LevelFilter,
}

/// The local catalog: `archive-push`, `backup`, `restore`, `info`, `expire`,
/// `backfill`.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct CatalogFile {
    /// Local catalog (SQLite cache of the repository) file, or "off" [default: ~/.local/state/pgvault/catalog-<repo>.db]
    #[arg(
        long,
        env = "PGVAULT_CATALOG",
        value_name = "FILE",
        value_parser = parse_catalog,
        help_heading = REPOSITORY
    )]
    pub catalog: Option<CatalogSetting>,
}

/// The data directory: `stanza-create`, `stanza-upgrade`, `backup`, `restore`.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct DataDir {
    /// PostgreSQL data directory
    #[arg(long, env = "PGVAULT_PGDATA", value_name = "DIR", help_heading = POSTGRES)]
    pub pgdata: Option<PathBuf>,
}

/// A connection to the running cluster: `backup`, `check`.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct Connection {
    /// PostgreSQL host or socket directory [default: PGHOST]
    #[arg(long, env = "PGVAULT_PG_HOST", value_name = "HOST", help_heading = POSTGRES)]
    pub pg_host: Option<String>,
    /// PostgreSQL port [default: PGPORT]
    #[arg(long, env = "PGVAULT_PG_PORT", value_name = "PORT", help_heading = POSTGRES)]
    pub pg_port: Option<u16>,
    /// PostgreSQL user [default: PGUSER]
    #[arg(long, env = "PGVAULT_PG_USER", value_name = "USER", help_heading = POSTGRES)]
    pub pg_user: Option<String>,
    /// PostgreSQL database [default: PGDATABASE, else postgres]
    #[arg(long, env = "PGVAULT_PG_DATABASE", value_name = "DB", help_heading = POSTGRES)]
    pub pg_database: Option<String>,
}

/// The bound on waiting for archived WAL: `backup`, `check`.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct ArchiveTimeout {
    /// Seconds to wait for the cluster's WAL to reach the repository
    #[arg(
        long,
        env = "PGVAULT_ARCHIVE_TIMEOUT",
        value_name = "SECS",
        default_value_t = 120
    )]
    pub archive_timeout: u64,
}

/// The primary behind a standby: `backup`, `check`.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct Primary {
    /// The primary's host or socket directory, when this node is a standby [default: where the standby streams from]
    #[arg(long, env = "PGVAULT_PRIMARY_HOST", value_name = "HOST", help_heading = POSTGRES)]
    pub primary_host: Option<String>,
    /// The primary's port [default: where the standby streams from, else 5432]
    #[arg(long, env = "PGVAULT_PRIMARY_PORT", value_name = "PORT", help_heading = POSTGRES)]
    pub primary_port: Option<u16>,
    /// The user pgvault connects to the primary as [default: pg-user]
    #[arg(long, env = "PGVAULT_PRIMARY_USER", value_name = "USER", help_heading = POSTGRES)]
    pub primary_user: Option<String>,
}

impl Primary {
    pub fn over(&self) -> PrimaryOverride {
        PrimaryOverride {
            host: self.primary_host.clone(),
            port: self.primary_port,
            user: self.primary_user.clone(),
        }
    }
}

/// zstd settings for what is stored: `archive-push`, `backup`.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct Compression {
    /// zstd level of what is stored, 1 to 19
    #[arg(
        long,
        env = "PGVAULT_COMPRESS_LEVEL",
        value_name = "N",
        default_value_t = 3,
        value_parser = clap::value_parser!(i32).range(1..=19)
    )]
    pub compress_level: i32,
    /// zstd worker threads for one file [default: number of cores, at most 8]
    #[arg(long, env = "PGVAULT_COMPRESS_THREADS", value_name = "N")]
    pub compress_threads: Option<u32>,
}

/// Parallelism: `archive-push` (its look-ahead), `backup`, `restore`,
/// `verify`, `backfill`.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct Workers {
    /// Parallel workers: files or objects processed at once, 1 to 64
    #[arg(
        long,
        env = "PGVAULT_PROCESS_MAX",
        value_name = "N",
        default_value_t = 2,
        value_parser = RangedU64ValueParser::<usize>::new().range(1..=64)
    )]
    pub process_max: usize,
}

/// Retention: `expire`, and `backup` for `expire-auto`.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct Retention {
    /// Expire: keep this many full backups
    #[arg(long, env = "PGVAULT_RETENTION_FULL", value_name = "N")]
    pub retention_full: Option<usize>,
    /// Expire: keep what recovers to any moment this far back (90m, 36h, 14d, 2w)
    #[arg(
        long,
        env = "PGVAULT_RETENTION_WINDOW",
        value_name = "DURATION",
        value_parser = parse_duration
    )]
    pub retention_window: Option<Duration>,
}

impl Retention {
    pub fn is_set(&self) -> bool {
        self.retention_full.is_some() || self.retention_window.is_some()
    }
}

/// The local spool: `archive-push`, `archive-get`.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct Spool {
    /// Local spool directory (look-ahead push records, prefetched WAL) [default: ~/.local/state/pgvault/spool]
    #[arg(long, env = "PGVAULT_SPOOL_PATH", value_name = "DIR")]
    pub spool_path: Option<PathBuf>,
}

/// `stanza-create` and `stanza-upgrade`.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct Stanza {
    #[command(flatten)]
    pub data: DataDir,
}

/// `archive-push`.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct ArchivePush {
    /// Also push up to N files already marked .ready, in parallel (0 = off)
    #[arg(
        long,
        env = "PGVAULT_ARCHIVE_PUSH_AHEAD",
        value_name = "N",
        default_value_t = 8
    )]
    pub archive_push_ahead: usize,
    /// WAL of a timeline past the point where an archived history file left it (a split brain, or the original of a PITR clone): warn archives it and logs a warning on every such push, fail refuses it (exit 12)
    #[arg(
        long,
        env = "PGVAULT_ARCHIVE_PUSH_SUPERSEDED",
        value_name = "warn|fail",
        default_value = "warn",
        value_parser = parse_on_superseded
    )]
    pub archive_push_superseded: OnSuperseded,
    #[command(flatten)]
    pub workers: Workers,
    #[command(flatten)]
    pub compression: Compression,
    #[command(flatten)]
    pub spool: Spool,
    #[command(flatten)]
    pub catalog: CatalogFile,
}

/// `archive-get`.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct ArchiveGet {
    /// Prefetch up to N following segments (0 = off)
    #[arg(
        long,
        env = "PGVAULT_ARCHIVE_GET_AHEAD",
        value_name = "N",
        default_value_t = 8
    )]
    pub archive_get_ahead: usize,
    #[command(flatten)]
    pub spool: Spool,
}

/// `backup`.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct Backup {
    #[command(flatten)]
    pub workers: Workers,
    #[command(flatten)]
    pub compression: Compression,
    /// Run expire (with the retention options) after each successful backup
    #[arg(
        long,
        env = "PGVAULT_EXPIRE_AUTO",
        value_name = "BOOL",
        action = ArgAction::Set,
        default_value_t = false
    )]
    pub expire_auto: bool,
    #[command(flatten)]
    pub retention: Retention,
    /// Back up this node when it is a standby: n (never: it must be the primary), prefer (a healthy standby, else the primary), y (only a healthy standby)
    #[arg(
        long,
        env = "PGVAULT_BACKUP_STANDBY",
        value_name = "n|prefer|y",
        default_value = "n",
        value_parser = StandbyMode::parse,
        help_heading = POSTGRES
    )]
    pub backup_standby: StandbyMode,
    #[command(flatten)]
    pub data: DataDir,
    #[command(flatten)]
    pub connection: Connection,
    #[command(flatten)]
    pub archive_timeout: ArchiveTimeout,
    #[command(flatten)]
    pub primary: Primary,
    #[command(flatten)]
    pub catalog: CatalogFile,
}

impl Backup {
    /// The retention to apply after the backup, if `expire-auto` is on.
    /// Refused up front without any: the backup would succeed and its
    /// expire then fail, and a cron job would see a failed backup.
    pub fn expire_after(&self) -> Result<Option<&Retention>> {
        if !self.expire_auto {
            return Ok(None);
        }
        if !self.retention.is_set() {
            return Err(Error::usage(
                "expire-auto is on but no retention is set: the expire after the backup would have nothing to apply",
            )
            .hint(
                "set retention-full and/or retention-window (a flag, PGVAULT_RETENTION_FULL, or the configuration file), or turn expire-auto off",
            ));
        }
        Ok(Some(&self.retention))
    }
}

/// `restore`.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct Restore {
    #[command(flatten)]
    pub workers: Workers,
    /// With --standby: the standby's primary_conninfo (the file or the environment only; passwords belong in ~/.pgpass)
    #[arg(long, hide = true, env = "PGVAULT_PRIMARY_CONNINFO", value_parser = Secret::parse)]
    pub primary_conninfo: Option<Secret>,
    #[command(flatten)]
    pub data: DataDir,
    #[command(flatten)]
    pub catalog: CatalogFile,
}

/// `check`.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct Check {
    #[command(flatten)]
    pub connection: Connection,
    #[command(flatten)]
    pub archive_timeout: ArchiveTimeout,
    /// Fail (exit 13) when the newest complete backup ended longer ago than this (90m, 26h, 8d)
    #[arg(
        long,
        env = "PGVAULT_MAX_BACKUP_AGE",
        value_name = "DURATION",
        value_parser = parse_duration
    )]
    pub max_backup_age: Option<Duration>,
    /// Fail (exit 13) when the server has written more WAL than this that is not archived yet (64MiB, 1GiB)
    #[arg(
        long,
        env = "PGVAULT_MAX_ARCHIVE_LAG",
        value_name = "SIZE",
        value_parser = parse_size
    )]
    pub max_archive_lag: Option<u64>,
    #[command(flatten)]
    pub primary: Primary,
}

/// `expire`.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct Expire {
    #[command(flatten)]
    pub retention: Retention,
    #[command(flatten)]
    pub catalog: CatalogFile,
}

/// `verify`.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct Verify {
    #[command(flatten)]
    pub workers: Workers,
}

/// `info`.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct Info {
    #[command(flatten)]
    pub catalog: CatalogFile,
    #[command(flatten)]
    pub status: LiveStatus,
}

/// Where `info` and `exporter` look for the live state around the
/// repository: the server's archiver (only when a host or port is given)
/// and the local spool.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct LiveStatus {
    #[command(flatten)]
    pub connection: Connection,
    #[command(flatten)]
    pub spool: Spool,
}

/// `exporter`.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct Exporter {
    /// Address to serve /metrics on (HOST:PORT)
    #[arg(
        long,
        env = "PGVAULT_LISTEN",
        value_name = "ADDR",
        default_value = "127.0.0.1:9876"
    )]
    pub listen: std::net::SocketAddr,
    /// How often the metrics are read from the repository again, 10s at least (scrapes are served from the last read)
    #[arg(
        long,
        env = "PGVAULT_EXPORTER_REFRESH",
        value_name = "DURATION",
        default_value = "5m",
        value_parser = parse_refresh
    )]
    pub exporter_refresh: Duration,
    #[command(flatten)]
    pub catalog: CatalogFile,
    #[command(flatten)]
    pub status: LiveStatus,
}

/// `drill`.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct Drill {
    #[command(flatten)]
    pub workers: Workers,
    /// Directory to restore into: a new directory is made inside it and removed afterwards [default: the system's temporary directory]
    #[arg(long, env = "PGVAULT_SCRATCH_DIR", value_name = "DIR")]
    pub scratch_dir: Option<PathBuf>,
    /// Directory of the PostgreSQL binaries of the backup's major [default: found through pg_config, /usr/lib/postgresql/N/bin, /usr/pgsql-N/bin]
    #[arg(long, env = "PGVAULT_PG_BIN", value_name = "DIR", help_heading = POSTGRES)]
    pub pg_bin: Option<PathBuf>,
    /// OS user that runs the scratch PostgreSQL when pgvault runs as root [default: the owner of --scratch-dir, else postgres]
    #[arg(long, env = "PGVAULT_PG_OS_USER", value_name = "USER", help_heading = POSTGRES)]
    pub pg_os_user: Option<String>,
    /// SQL file of checks: each query must return true (see docs/operations.md)
    #[arg(long, env = "PGVAULT_DRILL_CHECKS", value_name = "FILE")]
    pub drill_checks: Option<PathBuf>,
    /// Fail (exit 13) when the restore took longer than this to be consistent and promoted (90s, 30m, 2h)
    #[arg(
        long,
        env = "PGVAULT_RTO_OBJECTIVE",
        value_name = "DURATION",
        value_parser = parse_duration
    )]
    pub rto_objective: Option<Duration>,
    /// Fail (exit 13) when the recovered cluster's newest commit is older than the newest commit archived at the drill's start by more than this (30s, 5m)
    #[arg(
        long,
        env = "PGVAULT_RPO_OBJECTIVE",
        value_name = "DURATION",
        value_parser = parse_duration
    )]
    pub rpo_objective: Option<Duration>,
    #[command(flatten)]
    pub catalog: CatalogFile,
}

/// `backfill`.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct Backfill {
    #[command(flatten)]
    pub workers: Workers,
    #[command(flatten)]
    pub catalog: CatalogFile,
}

/// A value never shown: not by `Debug`, not in an error, not in `--help`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    fn parse(s: &str) -> std::result::Result<Secret, Infallible> {
        Ok(Secret(s.to_string()))
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// Where the catalog lives, or that there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogSetting {
    Off,
    Default,
    Path(PathBuf),
}

fn parse_catalog(s: &str) -> std::result::Result<CatalogSetting, Infallible> {
    Ok(match s {
        "" => CatalogSetting::Default,
        "off" | "none" => CatalogSetting::Off,
        p => CatalogSetting::Path(PathBuf::from(p)),
    })
}

impl Global {
    pub fn repo(&self) -> Result<&RepoLocation> {
        self.repo.as_ref().ok_or_else(|| {
            Error::usage("no repository given")
                .hint("pass --repo PATH|s3://bucket/prefix, set PGVAULT_REPO, or put repo = \"…\" in the configuration file")
        })
    }

    pub fn s3(&self) -> S3Options {
        S3Options {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            access_key_id: self.s3_access_key_id.as_ref().map(|s| s.0.clone()),
            secret_access_key: self.s3_secret_access_key.as_ref().map(|s| s.0.clone()),
            allow_http: self.s3_allow_http,
            atomic_create: self.s3_atomic_create,
            retry_timeout: Duration::from_secs(60),
        }
    }

    pub fn open_repo(&self) -> Result<Repository> {
        Repository::open(self.repo()?.clone(), &self.stanza, &self.s3())
    }

    /// The local spool of this repository and stanza (look-ahead push
    /// records, prefetched WAL); `None` when no place for it is known.
    pub fn spool(&self, spool: &Spool) -> Option<SpoolDir> {
        let identity = self.repo.as_ref()?.identity();
        match &spool.spool_path {
            Some(p) => Some(SpoolDir::under(p, &identity, &self.stanza)),
            None => SpoolDir::default_for(&identity, &self.stanza),
        }
    }

    pub fn catalog(&self, catalog: &CatalogFile) -> Option<crate::catalog::Catalog> {
        match catalog.catalog.as_ref().unwrap_or(&CatalogSetting::Default) {
            CatalogSetting::Off => None,
            CatalogSetting::Path(p) => Some(crate::catalog::Catalog::at(p.clone())),
            CatalogSetting::Default => {
                crate::catalog::Catalog::default_for(&self.repo.as_ref()?.identity())
            }
        }
    }
}

impl DataDir {
    pub fn pgdata(&self) -> Result<&Path> {
        self.pgdata.as_deref().ok_or_else(|| {
            Error::usage("no data directory given").hint("pass --pgdata DIR, set PGVAULT_PGDATA, or put pgdata = \"…\" in the configuration file")
        })
    }
}

impl Connection {
    pub fn params(&self) -> ConnParams {
        ConnParams {
            host: self.pg_host.clone(),
            port: self.pg_port,
            user: self.pg_user.clone(),
            dbname: self.pg_database.clone(),
        }
    }

    /// The connection `info` and `exporter` try: only when a host or port
    /// is given (an option, or `PGHOST`/`PGPORT`), so that on a host
    /// without the server they do not wait for one.
    pub fn if_given(&self) -> Option<ConnParams> {
        let env = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
        (self.pg_host.is_some() || self.pg_port.is_some() || env("PGHOST") || env("PGPORT"))
            .then(|| self.params())
    }
}

impl ArchiveTimeout {
    pub fn duration(&self) -> Duration {
        Duration::from_secs(self.archive_timeout)
    }
}

impl Compression {
    pub fn encode(&self) -> EncodeOptions {
        EncodeOptions {
            compression: crate::repo::codec::Compression::Zstd,
            level: self.compress_level,
            threads: self
                .compress_threads
                .unwrap_or_else(default_compress_threads),
        }
    }
}

/// zstd worker threads for one object: all cores, since archive-push
/// compresses one segment at a time and its latency is what the archiver
/// waits for.
fn default_compress_threads() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
        .min(8)
}

fn parse_on_superseded(s: &str) -> std::result::Result<OnSuperseded, String> {
    s.parse()
}

pub fn parse_log_level(s: &str) -> Result<log::LevelFilter> {
    match s.to_ascii_lowercase().as_str() {
        "off" => Ok(log::LevelFilter::Off),
        "error" => Ok(log::LevelFilter::Error),
        "warn" | "warning" => Ok(log::LevelFilter::Warn),
        "info" => Ok(log::LevelFilter::Info),
        "debug" => Ok(log::LevelFilter::Debug),
        "trace" => Ok(log::LevelFilter::Trace),
        _ => Err(Error::usage(
            "expected one of off, error, warn, info, debug, trace",
        )),
    }
}

/// A duration with a unit: `30s`, `90m`, `36h`, `14d`, `2w` (a bare
/// number is days).
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| Error::usage("expected a number and a unit, e.g. 14d"))?;
    let secs = match unit {
        "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" | "" => 86400,
        "w" => 7 * 86400,
        _ => return Err(Error::usage("the unit must be s, m, h, d or w")),
    };
    n.checked_mul(secs)
        .map(Duration::from_secs)
        .ok_or_else(|| Error::usage("too long"))
}

/// The exporter's refresh interval: a duration, 10 s at least (each
/// refresh lists the archive).
fn parse_refresh(s: &str) -> Result<Duration> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(10) {
        return Err(Error::usage("at least 10s: each refresh lists the archive"));
    }
    Ok(d)
}

/// A size in bytes: `1048576`, `64MiB`, `16MB`, `1GiB`, `512kB` (units
/// of 1024, as PostgreSQL's own sizes).
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| Error::usage("expected a number of bytes, e.g. 64MiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => return Err(Error::usage("the unit must be B, kB, MB, GB or TB")),
    };
    n.checked_mul(mult).ok_or_else(|| Error::usage("too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("14d").unwrap(),
            Duration::from_secs(14 * 86400)
        );
        assert_eq!(
            parse_duration("36h").unwrap(),
            Duration::from_secs(36 * 3600)
        );
        assert_eq!(
            parse_duration("2w").unwrap(),
            Duration::from_secs(14 * 86400)
        );
        assert_eq!(parse_duration("90m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert!(parse_refresh("5s").is_err());
        assert_eq!(parse_refresh("10s").unwrap(), Duration::from_secs(10));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("3y").is_err());
        assert!(parse_duration("99999999999999999w").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("16MB").unwrap(), 16 << 20);
        assert_eq!(parse_size("1 GiB").unwrap(), 1 << 30);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 parsecs").is_err());
        assert!(parse_size("99999999999TB").is_err());
    }

    #[test]
    fn secrets_are_not_printed() {
        let s = Secret::parse("hunter2").unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
