//! Low-level arguments: what the user typed, as clap parses it. The options
//! (settable from the environment and the file too) are defined in
//! `config`; here are the commands and their command-line-only flags.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config;

#[derive(Debug, Parser)]
#[command(
    name = "pgvault",
    version,
    about = "Backup, WAL archive and point-in-time recovery for PostgreSQL",
    after_help = "Each option can also be set as a PGVAULT_<NAME> environment variable or in the TOML \
                  configuration file (--config, default /etc/pgvault/pgvault.toml); S3 credentials \
                  (s3-access-key-id, s3-secret-access-key) only there. `pgvault <command> --help` \
                  shows a command's options. Exit codes: see docs/exit-codes.md."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: config::Global,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Register the cluster in --pgdata in the repository
    StanzaCreate {
        #[command(flatten)]
        options: config::Stanza,
    },
    /// After pg_upgrade: record the upgraded cluster in --pgdata as the stanza's current one
    StanzaUpgrade {
        #[command(flatten)]
        options: config::Stanza,
    },
    /// Archive one WAL file (archive_command = 'pgvault archive-push %p')
    ArchivePush {
        /// The file, as PostgreSQL passes it (%p, relative to the data directory)
        path: PathBuf,
        #[command(flatten)]
        options: config::ArchivePush,
    },
    /// Fetch one archived WAL file (restore_command = 'pgvault archive-get %f "%p"')
    ArchiveGet {
        /// The WAL file name (%f)
        name: String,
        /// Where to put it (%p)
        dest: PathBuf,
        #[command(flatten)]
        options: config::ArchiveGet,
    },
    /// Take a base backup of the running cluster
    Backup {
        /// Backup type (only full for now)
        #[arg(long = "type", value_enum, default_value_t = BackupType::Full)]
        backup_type: BackupType,
        /// Start with an immediate checkpoint instead of a spread one
        #[arg(long)]
        start_fast: bool,
        #[command(flatten)]
        options: config::Backup,
    },
    /// Restore a backup into --pgdata and write the recovery settings
    Restore(RestoreArgs),
    /// Prove that archiving into the repository works right now
    Check {
        #[command(flatten)]
        options: config::Check,
    },
    /// Apply retention: delete old backups and the WAL nothing kept needs
    Expire {
        /// Show what would be deleted, delete nothing
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        options: config::Expire,
    },
    /// Read every object of the stanza and check checksums, backups and the WAL chain
    Verify {
        /// Output format: text for people, json for scripts
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        #[command(flatten)]
        options: config::Verify,
    },
    /// Show what the repository holds for the stanza
    Info {
        /// Output format: text for people, json for scripts
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        #[command(flatten)]
        options: config::Info,
    },
    /// Summarize the records of archived WAL that has no summary yet (archived by an older pgvault)
    Backfill {
        /// Output format: text for people, json for scripts
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        #[command(flatten)]
        options: config::Backfill,
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
    #[command(flatten)]
    pub options: config::Restore,
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
