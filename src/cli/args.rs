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

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Register the cluster in --pgdata in the repository
    StanzaCreate,
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
    /// Show what the repository holds for the stanza
    Info {
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
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
        }
    }
}
