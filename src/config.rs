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
pub mod repos;

pub use layers::{is_secret, parse, ParseError, Parsed};
pub use repos::{RepoArg, REPO_MAX};

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
use crate::repo::azure::AzureOptions;
use crate::repo::gcs::GcsOptions;
use crate::repo::keys::{CipherSetting, KeySource};
use crate::repo::s3::{S3Options, Sse};
use crate::repo::storeopts::{ClientSettings, StorageClasses};
use crate::repo::{EncodeOptions, RepoLocation, Repository};
use crate::spool::SpoolDir;
use repos::PerRepo;

pub const DEFAULT_CONFIG: &str = "/etc/pgvault/pgvault.toml";

/// `--help` headings; options without one are the command's own.
const REPOSITORY: &str = "Repository";
const POSTGRES: &str = "PostgreSQL";
const GENERAL: &str = "General";

/// Options of every command, accepted before or after the command name.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct Global {
    /// Repository 1: a path, file:///path, s3://bucket/prefix, gs://bucket/prefix or az://container/prefix; or a number N: act on repository N only (repositories 2 to 4: repo2-path, repo2-s3-…, see docs/configuration.md)
    #[arg(
        long,
        global = true,
        env = "PGVAULT_REPO",
        value_name = "URL|N",
        value_parser = RepoArg::parse,
        help_heading = REPOSITORY
    )]
    pub repo: Option<RepoArg>,
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
    /// Repository 1's S3 settings.
    #[command(flatten)]
    pub s3: S3Settings,
    /// `repoN-path`, `repoN-s3-…`.
    #[command(flatten)]
    pub numbered: PerRepo<RepoSettings>,
    /// Client-side encryption (every repository).
    #[command(flatten)]
    pub cipher: CipherSettings,
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

/// Client-side encryption of every object written (docs/encryption.md).
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct CipherSettings {
    /// Encrypt every object written with this construction: none or xchacha20-poly1305
    #[arg(
        long,
        global = true,
        env = "PGVAULT_REPO_CIPHER_TYPE",
        value_name = "TYPE",
        default_value = "none",
        value_parser = ["none", crate::repo::crypt::CIPHER_NAME],
        help_heading = REPOSITORY
    )]
    pub repo_cipher_type: String,
    /// File holding the repository key (one line, at least 32 bytes)
    #[arg(
        long,
        global = true,
        env = "PGVAULT_REPO_CIPHER_KEY_FILE",
        value_name = "FILE",
        help_heading = REPOSITORY
    )]
    pub repo_cipher_key_file: Option<PathBuf>,
    /// Shell command printing the repository key on its standard output (Vault, a cloud KMS, an HSM)
    #[arg(
        long,
        global = true,
        env = "PGVAULT_REPO_CIPHER_KEY_COMMAND",
        value_name = "COMMAND",
        help_heading = REPOSITORY
    )]
    pub repo_cipher_key_command: Option<String>,
    /// The repository key itself (the file or the environment only)
    #[arg(
        long,
        global = true,
        hide = true,
        env = "PGVAULT_REPO_CIPHER_KEY",
        value_parser = Secret::parse
    )]
    pub repo_cipher_key: Option<Secret>,
}

impl CipherSettings {
    /// What the repository seals objects with; exactly one key source
    /// with a cipher, none without.
    pub fn setting(&self) -> Result<CipherSetting> {
        if self.repo_cipher_type == "none" {
            return Ok(CipherSetting::None);
        }
        let mut sources = Vec::new();
        if let Some(p) = &self.repo_cipher_key_file {
            sources.push(KeySource::File(p.clone()));
        }
        if let Some(c) = &self.repo_cipher_key_command {
            sources.push(KeySource::Command(c.clone()));
        }
        if let Some(k) = &self.repo_cipher_key {
            sources.push(KeySource::Value(zeroize::Zeroizing::new(
                k.expose().as_bytes().to_vec(),
            )));
        }
        let hint = "give the key in one of repo-cipher-key-file, repo-cipher-key-command or PGVAULT_REPO_CIPHER_KEY";
        match sources.len() {
            0 => Err(Error::key(format!(
                "repo-cipher-type is {} and no key is given",
                self.repo_cipher_type
            ))
            .hint(hint)),
            1 => Ok(CipherSetting::Sealed(sources.remove(0))),
            _ => Err(Error::usage("more than one repository key is given").hint(hint)),
        }
    }
}

/// How to reach an S3 repository: repository 1's as they are
/// (`s3-endpoint`), the others' numbered (`repo2-s3-endpoint`).
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct S3Settings {
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
    /// S3 server-side encryption of every object written: none, sse-s3, sse-kms or sse-c
    #[arg(
        long,
        global = true,
        env = "PGVAULT_S3_SSE",
        value_name = "KIND",
        default_value = "none",
        value_parser = ["none", "sse-s3", "sse-kms", "sse-c"],
        help_heading = REPOSITORY
    )]
    pub s3_sse: String,
    /// With s3-sse = sse-kms: the KMS key id or ARN [default: the account's S3 key]
    #[arg(
        long,
        global = true,
        env = "PGVAULT_S3_SSE_KMS_KEY_ID",
        value_name = "ID",
        help_heading = REPOSITORY
    )]
    pub s3_sse_kms_key_id: Option<String>,
    /// With s3-sse = sse-c: the key, base64 of 32 bytes (the file or the environment only)
    #[arg(
        long,
        global = true,
        hide = true,
        env = "PGVAULT_S3_SSE_C_KEY",
        value_parser = Secret::parse
    )]
    pub s3_sse_c_key: Option<Secret>,
    /// GCS base URL, for an emulator or a private endpoint [default: https://storage.googleapis.com]
    #[arg(
        long,
        global = true,
        env = "PGVAULT_GCS_ENDPOINT",
        value_name = "URL",
        help_heading = REPOSITORY
    )]
    pub gcs_endpoint: Option<String>,
    /// GCS service-account JSON key file [default: GOOGLE_APPLICATION_CREDENTIALS, then the metadata server]
    #[arg(
        long,
        global = true,
        env = "PGVAULT_GCS_KEY_FILE",
        value_name = "FILE",
        help_heading = REPOSITORY
    )]
    pub gcs_key_file: Option<String>,
    /// Azure storage account [default: from an https:// repository URL, or AZURE_STORAGE_ACCOUNT_NAME]
    #[arg(
        long,
        global = true,
        env = "PGVAULT_AZURE_ACCOUNT",
        value_name = "NAME",
        help_heading = REPOSITORY
    )]
    pub azure_account: Option<String>,
    /// Azure Blob endpoint, for sovereign clouds or Azurite [default: https://<account>.blob.core.windows.net]
    #[arg(
        long,
        global = true,
        env = "PGVAULT_AZURE_ENDPOINT",
        value_name = "URL",
        help_heading = REPOSITORY
    )]
    pub azure_endpoint: Option<String>,
    /// Azure storage account key (the file or the environment only) [default: AZURE_STORAGE_ACCOUNT_KEY]
    #[arg(
        long,
        global = true,
        hide = true,
        env = "PGVAULT_AZURE_KEY",
        value_parser = Secret::parse
    )]
    pub azure_key: Option<Secret>,
    /// Delete Azure blobs in batches of 256 (false for Azurite, which hangs on them)
    #[arg(
        long,
        global = true,
        env = "PGVAULT_AZURE_BULK_DELETE",
        value_name = "BOOL",
        action = ArgAction::Set,
        default_value_t = true,
        help_heading = REPOSITORY
    )]
    pub azure_bulk_delete: bool,
    /// Storage class of every object written to an object store: S3's (STANDARD_IA, GLACIER_IR, …), GCS's (NEARLINE, …) or an Azure access tier (Cool, …) [default: the bucket's]
    #[arg(
        long,
        global = true,
        env = "PGVAULT_STORAGE_CLASS",
        value_name = "CLASS",
        help_heading = REPOSITORY
    )]
    pub storage_class: Option<String>,
    /// Storage class of archived WAL [default: storage-class]
    #[arg(
        long,
        global = true,
        env = "PGVAULT_STORAGE_CLASS_WAL",
        value_name = "CLASS",
        help_heading = REPOSITORY
    )]
    pub storage_class_wal: Option<String>,
    /// Storage class of backups [default: storage-class]
    #[arg(
        long,
        global = true,
        env = "PGVAULT_STORAGE_CLASS_BACKUP",
        value_name = "CLASS",
        help_heading = REPOSITORY
    )]
    pub storage_class_backup: Option<String>,
    /// How long a request to the object store may wait for its answer (an upload included), and then for each further part of it, before it is retried (30s, 5m)
    #[arg(
        long,
        global = true,
        env = "PGVAULT_STORAGE_TIMEOUT",
        value_name = "DURATION",
        default_value = "120s",
        value_parser = parse_duration,
        help_heading = REPOSITORY
    )]
    pub storage_timeout: Duration,
    /// How long connecting to the object store may take
    #[arg(
        long,
        global = true,
        env = "PGVAULT_STORAGE_CONNECT_TIMEOUT",
        value_name = "DURATION",
        default_value = "5s",
        value_parser = parse_duration,
        help_heading = REPOSITORY
    )]
    pub storage_connect_timeout: Duration,
    /// How many times a failed request to the object store is sent again, 0 to 100
    #[arg(
        long,
        global = true,
        env = "PGVAULT_STORAGE_RETRIES",
        value_name = "N",
        default_value_t = 10,
        value_parser = RangedU64ValueParser::<usize>::new().range(0..=100),
        help_heading = REPOSITORY
    )]
    pub storage_retries: usize,
    /// How long after its first attempt a request is no longer retried
    #[arg(
        long,
        global = true,
        env = "PGVAULT_STORAGE_RETRY_TIMEOUT",
        value_name = "DURATION",
        default_value = "60s",
        value_parser = parse_duration,
        help_heading = REPOSITORY
    )]
    pub storage_retry_timeout: Duration,
    /// HTTP(S) proxy for every request to the object store, http://[user:password@]host:3128 (the file or the environment only: it may carry credentials) [default: HTTPS_PROXY, HTTP_PROXY]
    #[arg(
        long,
        global = true,
        hide = true,
        env = "PGVAULT_STORAGE_PROXY",
        value_parser = Secret::parse
    )]
    pub storage_proxy: Option<Secret>,
    /// Hosts reached without the proxy: comma-separated names, .domains, addresses or CIDR ranges
    #[arg(
        long,
        global = true,
        env = "PGVAULT_STORAGE_PROXY_EXCLUDES",
        value_name = "LIST",
        help_heading = REPOSITORY
    )]
    pub storage_proxy_excludes: Option<String>,
    /// PEM file of the CA that signed an HTTPS proxy's certificate
    #[arg(
        long,
        global = true,
        env = "PGVAULT_STORAGE_PROXY_CA_FILE",
        value_name = "FILE",
        help_heading = REPOSITORY
    )]
    pub storage_proxy_ca_file: Option<String>,
    /// Bytes per second that backup, restore, verify and the other commands but archive-push and archive-get may move to or from the object store, shared by all their workers (512K, 20M, 1G) [default: no limit]
    #[arg(
        long,
        global = true,
        env = "PGVAULT_STORAGE_BANDWIDTH_LIMIT",
        value_name = "BYTES",
        value_parser = parse_rate,
        help_heading = REPOSITORY
    )]
    pub storage_bandwidth_limit: Option<u64>,
}

/// Where repository N is and how to reach it: the template of the
/// numbered options `repoN-path`, `repoN-s3-…` (see `config/repos.rs`).
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct RepoSettings {
    /// A path, file:///path, s3://, gs:// or az:// URL
    #[arg(long = "path", global = true, value_name = "URL", value_parser = RepoLocation::parse)]
    pub path: Option<RepoLocation>,
    #[command(flatten)]
    pub s3: S3Settings,
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
    /// zstd level of what is stored, 1 to 19 [default: 1 for WAL, 3 for backups]
    #[arg(
        long,
        env = "PGVAULT_COMPRESS_LEVEL",
        value_name = "N",
        value_parser = clap::value_parser!(i32).range(1..=19)
    )]
    pub compress_level: Option<i32>,
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

/// Retention: `expire`, and `backup` for `expire-auto`. Each repository
/// has its own: `retention-full` is repository 1's, `repo2-retention-full`
/// repository 2's.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct Retention {
    /// Repository 1's.
    #[command(flatten)]
    pub values: RetentionSettings,
    /// `repoN-retention-…`.
    #[command(flatten)]
    pub numbered: PerRepo<RetentionSettings>,
}

/// The retention of one repository.
#[derive(Debug, Clone, Default, Args)]
#[group(skip)]
pub struct RetentionSettings {
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
    /// Expire: keep this many differential backups (full ones count as differential); an older one goes with the incrementals on it
    #[arg(long, env = "PGVAULT_RETENTION_DIFF", value_name = "N")]
    pub retention_diff: Option<usize>,
}

impl RetentionSettings {
    pub fn is_set(&self) -> bool {
        self.retention_full.is_some()
            || self.retention_window.is_some()
            || self.retention_diff.is_some()
    }
}

impl Retention {
    /// Repository `n`'s retention: its numbered options, and for
    /// repository 1 the unnumbered ones under them.
    pub fn for_repo(&self, n: u8) -> RetentionSettings {
        let base = if n == 1 {
            self.values.clone()
        } else {
            RetentionSettings::default()
        };
        match self.numbered.get(n) {
            None => base,
            Some(r) => RetentionSettings {
                retention_full: if r.is_set("retention_full") {
                    r.value.retention_full
                } else {
                    base.retention_full
                },
                retention_window: if r.is_set("retention_window") {
                    r.value.retention_window
                } else {
                    base.retention_window
                },
                retention_diff: if r.is_set("retention_diff") {
                    r.value.retention_diff
                } else {
                    base.retention_diff
                },
            },
        }
    }
}

/// The local spool: `archive-push`, `archive-get`; `info` and `check`
/// read the archive-push queues there.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct Spool {
    /// Local spool directory (look-ahead push records, archive-push queues, prefetched WAL) [default: ~/.local/state/pgvault/spool]
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
    /// With several repositories: acknowledge PostgreSQL once this many hold the file durably; the others get it queued in the spool, and a detached pusher catches them up [default: all]
    #[arg(
        long,
        env = "PGVAULT_ARCHIVE_PUSH_QUORUM",
        value_name = "N",
        value_parser = RangedU64ValueParser::<usize>::new().range(1..=u64::from(REPO_MAX))
    )]
    pub archive_push_quorum: Option<usize>,
    /// Most bytes queued in the spool for one repository that is behind (4GiB, 512MiB, or bytes); past it the oldest files queued for that repository are dropped from its queue and the gap recorded [default: no limit]
    #[arg(
        long,
        env = "PGVAULT_ARCHIVE_PUSH_QUEUE_MAX",
        value_name = "SIZE",
        value_parser = parse_size
    )]
    pub archive_push_queue_max: Option<u64>,
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
    /// Resume an interrupted backup of the same type and reference (its unchanged files are not read again)
    #[arg(
        long,
        env = "PGVAULT_RESUME",
        value_name = "BOOL",
        action = ArgAction::Set,
        default_value_t = true
    )]
    pub resume: bool,
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
    /// The retention to apply after the backup into repository `n`, if
    /// `expire-auto` is on. Refused up front without any: the backup would
    /// succeed and its expire then fail, and a cron job would see a failed
    /// backup.
    pub fn expire_after(&self, n: u8) -> Result<Option<RetentionSettings>> {
        if !self.expire_auto {
            return Ok(None);
        }
        let r = self.retention.for_repo(n);
        if !r.is_set() {
            let (full, window) = if n == 1 {
                ("retention-full".to_string(), "retention-window".to_string())
            } else {
                (
                    repos::numbered_long(n, "retention-full"),
                    repos::numbered_long(n, "retention-window"),
                )
            };
            return Err(Error::usage(format!(
                "expire-auto is on but repository {n} has no retention: the expire after the backup would have nothing to apply",
            ))
            .hint(format!(
                "set {full} and/or {window} (a flag, PGVAULT_{}, or the configuration file), or turn expire-auto off",
                full.to_ascii_uppercase().replace('-', "_")
            )));
        }
        Ok(Some(r))
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
    #[command(flatten)]
    pub spool: Spool,
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

/// `key add`: the master key to add.
#[derive(Debug, Clone, Args)]
#[group(skip)]
pub struct KeyAdd {
    /// File holding the key to add (one line, at least 32 bytes)
    #[arg(long, env = "PGVAULT_REPO_CIPHER_NEW_KEY_FILE", value_name = "FILE")]
    pub repo_cipher_new_key_file: Option<PathBuf>,
    /// Shell command printing the key to add on its standard output
    #[arg(
        long,
        env = "PGVAULT_REPO_CIPHER_NEW_KEY_COMMAND",
        value_name = "COMMAND"
    )]
    pub repo_cipher_new_key_command: Option<String>,
    /// The key to add itself (the file or the environment only)
    #[arg(
        long,
        hide = true,
        env = "PGVAULT_REPO_CIPHER_NEW_KEY",
        value_parser = Secret::parse
    )]
    pub repo_cipher_new_key: Option<Secret>,
}

impl KeyAdd {
    /// Where the key to add comes from; `None` when none is given.
    pub fn source(&self) -> Result<Option<KeySource>> {
        let mut sources = Vec::new();
        if let Some(p) = &self.repo_cipher_new_key_file {
            sources.push(KeySource::File(p.clone()));
        }
        if let Some(c) = &self.repo_cipher_new_key_command {
            sources.push(KeySource::Command(c.clone()));
        }
        if let Some(k) = &self.repo_cipher_new_key {
            sources.push(KeySource::Value(zeroize::Zeroizing::new(
                k.expose().as_bytes().to_vec(),
            )));
        }
        if sources.len() > 1 {
            return Err(Error::usage("more than one key to add is given").hint(
                "give it in one of repo-cipher-new-key-file, repo-cipher-new-key-command or PGVAULT_REPO_CIPHER_NEW_KEY",
            ));
        }
        Ok(sources.pop())
    }
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

/// One repository a command acts on: its number, where it is, and how to
/// reach it.
#[derive(Debug, Clone)]
pub struct RepoConfig {
    pub number: u8,
    pub location: RepoLocation,
    pub s3: S3Settings,
}

impl Global {
    /// Every configured repository, in number order: repository 1 from
    /// `repo` (a location) or `repo1-path`, the others from `repoN-path`.
    pub fn configured(&self) -> Result<Vec<RepoConfig>> {
        let out = self.configured_or_none()?;
        if out.is_empty() {
            return Err(Error::usage("no repository given").hint(
                "pass --repo PATH|s3://bucket/prefix, set PGVAULT_REPO, or put repo = \"…\" (or repo1-path, repo2-path, …) in the configuration file",
            ));
        }
        Ok(out)
    }

    fn configured_or_none(&self) -> Result<Vec<RepoConfig>> {
        let mut out = Vec::new();
        let first = self.repo.as_ref().and_then(RepoArg::location);
        let numbered_first = self.numbered.get(1).and_then(|r| r.value.path.as_ref());
        if let (Some(a), Some(b)) = (first, numbered_first) {
            if a != b {
                return Err(Error::usage(format!(
                    "repo ({}) and repo1-path ({}) name two different places for repository 1",
                    a.identity(),
                    b.identity()
                ))
                .hint("they are one option under two names: keep one"));
            }
        }
        if let Some(location) = numbered_first.or(first) {
            let s3 = match self.numbered.get(1) {
                Some(n) => self.s3.under(n),
                None => self.s3.clone(),
            };
            out.push(RepoConfig {
                number: 1,
                location: location.clone(),
                s3,
            });
        }
        for n in self.numbered.numbers().filter(|&n| n > 1) {
            let r = self.numbered.get(n).expect("a number listed");
            let Some(location) = &r.value.path else {
                return Err(Error::usage(format!(
                    "repository {n} has options but no {}",
                    repos::numbered_long(n, "path")
                ))
                .hint(format!(
                    "set {} to its path, file:///path or s3://bucket/prefix",
                    repos::numbered_long(n, "path")
                )));
            };
            out.push(RepoConfig {
                number: n,
                location: location.clone(),
                s3: r.value.s3.clone(),
            });
        }
        Ok(out)
    }

    /// The repository `--repo N` selects, if it is a number.
    pub fn selected(&self) -> Option<u8> {
        match self.repo {
            Some(RepoArg::Number(n)) => Some(n),
            _ => None,
        }
    }

    /// The repositories a command acts on: the one `--repo N` selects,
    /// else every configured one.
    pub fn repos(&self) -> Result<Vec<RepoConfig>> {
        let Some(n) = self.selected() else {
            return self.configured();
        };
        match self.configured_or_none()?.into_iter().find(|r| r.number == n) {
            Some(r) => Ok(vec![r]),
            None => Err(Error::usage(format!(
                "--repo {n}: repository {n} is not configured"
            ))
            .hint(format!(
                "set {} (a --repo {n} flag replaces a repo = \"…\" of the configuration file or the environment: name repository 1 repo1-path there)",
                repos::numbered_long(n, "path")
            ))),
        }
    }

    /// Repository 1 (or the one `--repo N` selects) alone: for the commands
    /// that act on one repository.
    pub fn repo_config(&self) -> Result<RepoConfig> {
        let mut all = self.repos()?;
        Ok(all.remove(0))
    }

    pub fn open(&self, r: &RepoConfig) -> Result<Repository> {
        Ok(
            Repository::open(r.location.clone(), &self.stanza, &r.s3.options()?)?
                .with_cipher(self.cipher.setting()?),
        )
    }

    /// The repository for `archive-push` and `archive-get`, which serve
    /// PostgreSQL's archiver and recovery: never under the bandwidth limit
    /// (a slowed archiver fills `pg_wal`, a slowed recovery lengthens the
    /// outage), whatever the file or the environment set for the others.
    pub fn open_for_wal(&self, r: &RepoConfig) -> Result<Repository> {
        let mut opts = r.s3.options()?;
        opts.bandwidth_limit = None;
        Ok(Repository::open(r.location.clone(), &self.stanza, &opts)?
            .with_cipher(self.cipher.setting()?))
    }

    /// The local spool of repository `r` and this stanza (look-ahead push
    /// records, its archive-push queue, prefetched WAL); `None` when no
    /// place for it is known.
    pub fn spool(&self, r: &RepoConfig, spool: &Spool) -> Option<SpoolDir> {
        let identity = r.location.identity();
        match &spool.spool_path {
            Some(p) => Some(SpoolDir::under(p, &identity, &self.stanza)),
            None => SpoolDir::default_for(&identity, &self.stanza),
        }
    }

    /// Repository `r`'s catalog: one file per repository.
    pub fn catalog(
        &self,
        r: &RepoConfig,
        catalog: &CatalogFile,
    ) -> Option<crate::catalog::Catalog> {
        match catalog.catalog.as_ref().unwrap_or(&CatalogSetting::Default) {
            CatalogSetting::Off => None,
            CatalogSetting::Path(p) => Some(crate::catalog::Catalog::at(repos::catalog_path_for(
                p, r.number,
            ))),
            CatalogSetting::Default => crate::catalog::Catalog::default_for(&r.location.identity()),
        }
    }
}

impl S3Settings {
    /// What the store's client gets; a bad server-side encryption
    /// setting is refused here.
    pub fn options(&self) -> Result<S3Options> {
        Ok(S3Options {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            access_key_id: self.s3_access_key_id.as_ref().map(|s| s.0.clone()),
            secret_access_key: self.s3_secret_access_key.as_ref().map(|s| s.0.clone()),
            allow_http: self.s3_allow_http,
            atomic_create: self.s3_atomic_create,
            retry_timeout: self.storage_retry_timeout,
            client: ClientSettings {
                timeout: self.storage_timeout,
                connect_timeout: self.storage_connect_timeout,
                retries: self.storage_retries,
                proxy: self
                    .storage_proxy
                    .as_ref()
                    .map(|p| check_proxy(p.expose()))
                    .transpose()?,
                proxy_excludes: self.storage_proxy_excludes.clone(),
                proxy_ca_file: self.storage_proxy_ca_file.clone(),
            },
            storage_class: StorageClasses {
                default: self.storage_class.clone(),
                wal: self.storage_class_wal.clone(),
                backup: self.storage_class_backup.clone(),
            },
            bandwidth_limit: self.storage_bandwidth_limit,
            gcs: GcsOptions {
                endpoint: self.gcs_endpoint.clone(),
                key_file: self.gcs_key_file.clone(),
            },
            azure: AzureOptions {
                account: self.azure_account.clone(),
                access_key: self.azure_key.as_ref().map(|s| s.0.clone()),
                endpoint: self.azure_endpoint.clone(),
                bulk_delete: self.azure_bulk_delete,
            },
            sse: Sse::from_options(
                &self.s3_sse,
                self.s3_sse_kms_key_id.as_deref(),
                self.s3_sse_c_key.as_ref().map(Secret::expose),
            )?,
        })
    }

    /// These settings with what repository 1's numbered options
    /// (`repo1-s3-…`) give over them.
    fn under(&self, n: &repos::Numbered<RepoSettings>) -> S3Settings {
        let v = &n.value.s3;
        // Each field: repository 1's numbered option where it was given,
        // else the plain one.
        macro_rules! over {
            ($($f:ident),* $(,)?) => {
                S3Settings {
                    $($f: if n.is_set(stringify!($f)) { v.$f.clone() } else { self.$f.clone() },)*
                }
            };
        }
        over!(
            s3_endpoint,
            s3_region,
            s3_allow_http,
            s3_atomic_create,
            s3_access_key_id,
            s3_secret_access_key,
            s3_sse,
            s3_sse_kms_key_id,
            s3_sse_c_key,
            gcs_endpoint,
            gcs_key_file,
            azure_account,
            azure_endpoint,
            azure_key,
            azure_bulk_delete,
            storage_class,
            storage_class_wal,
            storage_class_backup,
            storage_timeout,
            storage_connect_timeout,
            storage_retries,
            storage_retry_timeout,
            storage_proxy,
            storage_proxy_excludes,
            storage_proxy_ca_file,
            storage_bandwidth_limit,
        )
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

/// zstd level of archived WAL when none is set. Measured on real WAL
/// (docs/benchmarks.md, issue 14): level 1 compresses 2.2–2.9× faster than
/// level 3 for 14–19 % more bytes, and archive-push is the CPU-bound path
/// whose slowness fills pg_wal; WAL is kept only for the retention window.
pub const WAL_COMPRESS_LEVEL: i32 = 1;
/// zstd level of backups when none is set.
pub const BACKUP_COMPRESS_LEVEL: i32 = 3;

impl Compression {
    /// For archived WAL (`archive-push`).
    pub fn encode_wal(&self) -> EncodeOptions {
        self.encode_or(WAL_COMPRESS_LEVEL)
    }

    /// For backups.
    pub fn encode_backup(&self) -> EncodeOptions {
        self.encode_or(BACKUP_COMPRESS_LEVEL)
    }

    fn encode_or(&self, default_level: i32) -> EncodeOptions {
        EncodeOptions {
            compression: crate::repo::codec::Compression::Zstd,
            level: self.compress_level.unwrap_or(default_level),
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

/// A duration with a unit: `500ms`, `30s`, `90m`, `36h`, `14d`, `2w` (a
/// bare number is days).
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| Error::usage("expected a number and a unit, e.g. 14d"))?;
    let millis: u64 = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" | "" => 86_400_000,
        "w" => 7 * 86_400_000,
        _ => return Err(Error::usage("the unit must be ms, s, m, h, d or w")),
    };
    n.checked_mul(millis)
        .map(Duration::from_millis)
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
/// A bandwidth limit: bytes per second, with parse_size's units; 0 is
/// refused (no limit is no value).
fn parse_rate(s: &str) -> Result<u64> {
    match parse_size(s)? {
        0 => Err(Error::usage(
            "a limit of 0 would stop every transfer; leave it unset for no limit",
        )),
        n => Ok(n),
    }
}

/// A proxy URL: http:// or https://, then a host. It may carry
/// credentials, so a bad one is refused without being shown.
fn check_proxy(s: &str) -> Result<String> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"));
    let host = rest.and_then(|r| r.split('/').next()).unwrap_or_default();
    let host = host.rsplit('@').next().unwrap_or_default();
    if host.is_empty() {
        return Err(Error::usage(
            "storage-proxy: not a proxy URL (the value is not shown: it may hold a password)",
        )
        .hint("write http://host:port or http://user:password@host:port"));
    }
    Ok(s.to_string())
}

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
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
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
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
    }

    #[test]
    fn secrets_are_not_printed() {
        let s = Secret::parse("hunter2").unwrap();
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
