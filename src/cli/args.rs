//! Low-level arguments: what the user typed, as clap parses it.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::LowArgs;

#[derive(Debug, Parser)]
#[command(
    name = "pgvault",
    version,
    about = "Backup, WAL archive and point-in-time recovery for PostgreSQL",
    after_help = "Options can also be set as PGVAULT_<NAME> environment variables or in the TOML \
                  configuration file (--config, default /etc/pgvault/pgvault.toml). \
                  Exit codes: see docs/exit-codes.md."
)]
pub struct Cli {
    /// Configuration file (TOML)
    #[arg(long, global = true, env = "PGVAULT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Repository: a path, file:///path or s3://bucket/prefix
    #[arg(long, global = true, env = "PGVAULT_REPO", value_name = "URL")]
    pub repo: Option<String>,
    /// Stanza (the cluster's name in the repository) [default: main]
    #[arg(long, global = true, env = "PGVAULT_STANZA")]
    pub stanza: Option<String>,
    /// PostgreSQL data directory
    #[arg(long, global = true, env = "PGVAULT_PGDATA", value_name = "DIR")]
    pub pgdata: Option<PathBuf>,
    /// zstd level, 1 to 19 [default: 3]
    #[arg(long, global = true, env = "PGVAULT_COMPRESS_LEVEL", value_name = "N")]
    pub compress_level: Option<i32>,
    /// zstd worker threads for one file [default: number of cores, at most 8]
    #[arg(
        long,
        global = true,
        env = "PGVAULT_COMPRESS_THREADS",
        value_name = "N"
    )]
    pub compress_threads: Option<u32>,
    /// Catalog (SQLite cache) file, or "off" [default: ~/.local/state/pgvault/catalog-<repo>.db]
    #[arg(long, global = true, env = "PGVAULT_CATALOG", value_name = "FILE")]
    pub catalog: Option<String>,
    /// off, error, warn, info, debug or trace [default: warn]
    #[arg(long, global = true, env = "PGVAULT_LOG_LEVEL", value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// S3 endpoint URL (overrides AWS_ENDPOINT)
    #[arg(long, global = true, env = "PGVAULT_S3_ENDPOINT", value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// S3 region (overrides AWS_REGION)
    #[arg(long, global = true, env = "PGVAULT_S3_REGION")]
    pub s3_region: Option<String>,
    /// Whether the store's conditional create (If-None-Match) is atomic [default: true]
    #[arg(
        long,
        global = true,
        env = "PGVAULT_S3_ATOMIC_CREATE",
        value_name = "BOOL"
    )]
    pub s3_atomic_create: Option<bool>,
    /// Allow plain HTTP to the S3 endpoint (overrides AWS_ALLOW_HTTP)
    #[arg(
        long,
        global = true,
        env = "PGVAULT_S3_ALLOW_HTTP",
        value_name = "BOOL"
    )]
    pub s3_allow_http: Option<bool>,

    /// Parallel workers for backup and restore [default: 2]
    #[arg(long, global = true, env = "PGVAULT_PROCESS_MAX", value_name = "N")]
    pub process_max: Option<usize>,
    /// Seconds to wait for WAL to reach the repository [default: 120]
    #[arg(
        long,
        global = true,
        env = "PGVAULT_ARCHIVE_TIMEOUT",
        value_name = "SECS"
    )]
    pub archive_timeout: Option<u64>,
    /// PostgreSQL host or socket directory (else PGHOST)
    #[arg(long, global = true, env = "PGVAULT_PG_HOST")]
    pub pg_host: Option<String>,
    /// PostgreSQL port (else PGPORT)
    #[arg(long, global = true, env = "PGVAULT_PG_PORT")]
    pub pg_port: Option<u16>,
    /// PostgreSQL user (else PGUSER)
    #[arg(long, global = true, env = "PGVAULT_PG_USER")]
    pub pg_user: Option<String>,
    /// PostgreSQL database (else PGDATABASE)
    #[arg(long, global = true, env = "PGVAULT_PG_DATABASE")]
    pub pg_database: Option<String>,

    /// expire: keep this many full backups
    #[arg(long, global = true, env = "PGVAULT_RETENTION_FULL", value_name = "N")]
    pub retention_full: Option<usize>,
    /// expire: keep what recovers to any moment this far back (14d, 36h, 2w)
    #[arg(
        long,
        global = true,
        env = "PGVAULT_RETENTION_WINDOW",
        value_name = "DURATION"
    )]
    pub retention_window: Option<String>,

    /// archive-push: also push up to N files already marked .ready (0 = off) [default: 8]
    #[arg(
        long,
        global = true,
        env = "PGVAULT_ARCHIVE_PUSH_AHEAD",
        value_name = "N"
    )]
    pub archive_push_ahead: Option<usize>,
    /// archive-push: warn or fail on WAL of a timeline past the point where an archived history left it (a split brain, or the original of a PITR clone) [default: warn]
    #[arg(
        long,
        global = true,
        env = "PGVAULT_ARCHIVE_PUSH_SUPERSEDED",
        value_name = "warn|fail"
    )]
    pub archive_push_superseded: Option<String>,
    /// archive-get: prefetch up to N following segments (0 = off) [default: 8]
    #[arg(
        long,
        global = true,
        env = "PGVAULT_ARCHIVE_GET_AHEAD",
        value_name = "N"
    )]
    pub archive_get_ahead: Option<usize>,
    /// backup: run expire after each successful backup [default: false]
    #[arg(long, global = true, env = "PGVAULT_EXPIRE_AUTO", value_name = "BOOL")]
    pub expire_auto: Option<bool>,
    /// Local spool directory [default: ~/.local/state/pgvault/spool]
    #[arg(long, global = true, env = "PGVAULT_SPOOL_PATH", value_name = "DIR")]
    pub spool_path: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Register the cluster in --pgdata in the repository
    StanzaCreate,
    /// After pg_upgrade: record the upgraded cluster in --pgdata as the stanza's current one
    StanzaUpgrade,
    /// Archive one WAL file (archive_command = 'pgvault archive-push %p')
    ArchivePush {
        /// The file, as PostgreSQL passes it (%p, relative to the data directory)
        path: PathBuf,
    },
    /// Fetch one archived WAL file (restore_command = 'pgvault archive-get %f "%p"')
    ArchiveGet {
        /// The WAL file name (%f)
        name: String,
        /// Where to put it (%p)
        dest: PathBuf,
    },
    /// Take a base backup of the running cluster
    Backup {
        /// Backup type (only full for now)
        #[arg(long = "type", value_enum, default_value_t = BackupType::Full)]
        backup_type: BackupType,
        /// Start with an immediate checkpoint instead of a spread one
        #[arg(long)]
        start_fast: bool,
    },
    /// Restore a backup into --pgdata and write the recovery settings
    Restore(RestoreArgs),
    /// Prove that archiving into the repository works right now
    Check,
    /// Apply retention: delete old backups and the WAL nothing kept needs
    Expire {
        /// Show what would be deleted, delete nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// Read every object of the stanza and check checksums, backups and the WAL chain
    Verify {
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Show what the repository holds for the stanza
    Info {
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Summarize the records of archived WAL that has no summary yet (archived by an older pgvault)
    Backfill {
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackupType {
    Full,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RestoreArgs {
    /// Backup label, or "latest" (with a time or LSN target: the newest that ends before it)
    #[arg(long, value_name = "LABEL")]
    pub set: Option<String>,
    /// Recover to this time: RFC 3339 or "YYYY-MM-DD HH:MM:SS[.ffffff]±TZ"
    #[arg(long, group = "target_kind")]
    pub target_time: Option<String>,
    /// Recover to this LSN (X/X)
    #[arg(long, group = "target_kind")]
    pub target_lsn: Option<String>,
    /// Recover to this transaction id
    #[arg(long, group = "target_kind")]
    pub target_xid: Option<String>,
    /// Recover to this restore point (pg_create_restore_point)
    #[arg(long, group = "target_kind")]
    pub target_name: Option<String>,
    /// "immediate": stop as soon as the backup is consistent
    #[arg(long, group = "target_kind", value_parser = ["immediate"])]
    pub target: Option<String>,
    /// What to do at the target [PostgreSQL's default: pause]
    #[arg(long, value_enum)]
    pub target_action: Option<TargetActionArg>,
    /// latest, current, or a timeline number [PostgreSQL's default: latest]
    #[arg(long)]
    pub target_timeline: Option<String>,
    /// Stop just before the target instead of just after it
    #[arg(long)]
    pub target_exclusive: bool,
    /// preserve: the restored cluster archives (a restored primary must); off: clones and drills
    #[arg(long, value_enum, default_value_t = ArchiveModeArg::Preserve)]
    pub archive_mode: ArchiveModeArg,
    /// Restore tablespace OID into DIR instead of its original location (repeatable)
    #[arg(long, value_name = "OID=DIR")]
    pub tablespace_map: Vec<String>,
    /// Start as a standby (standby.signal) replaying from the archive
    #[arg(long)]
    pub standby: bool,
    /// With --standby: file holding the primary_conninfo (keep passwords in ~/.pgpass)
    #[arg(long, value_name = "FILE")]
    pub primary_conninfo_file: Option<PathBuf>,
    /// Restore into a non-empty directory, reusing files that match the backup
    #[arg(long)]
    pub delta: bool,
    /// Try the target even if the archive does not reach it (a time after the last archived commit, an unknown restore point)
    #[arg(long)]
    pub no_target_check: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TargetActionArg {
    Pause,
    Promote,
    Shutdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ArchiveModeArg {
    Preserve,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

impl Cli {
    pub fn low_args(&self) -> LowArgs {
        LowArgs {
            config: self.config.clone(),
            repo: self.repo.clone(),
            stanza: self.stanza.clone(),
            pgdata: self.pgdata.clone(),
            compress_level: self.compress_level,
            compress_threads: self.compress_threads,
            catalog: self.catalog.clone(),
            log_level: self.log_level.clone(),
            s3_endpoint: self.s3_endpoint.clone(),
            s3_region: self.s3_region.clone(),
            s3_atomic_create: self.s3_atomic_create,
            s3_allow_http: self.s3_allow_http,
            process_max: self.process_max,
            archive_timeout: self.archive_timeout,
            pg_host: self.pg_host.clone(),
            pg_port: self.pg_port,
            pg_user: self.pg_user.clone(),
            pg_database: self.pg_database.clone(),
            retention_full: self.retention_full,
            retention_window: self.retention_window.clone(),
            archive_push_ahead: self.archive_push_ahead,
            archive_push_superseded: self.archive_push_superseded.clone(),
            archive_get_ahead: self.archive_get_ahead,
            spool_path: self.spool_path.clone(),
            expire_auto: self.expire_auto,
        }
    }
}
