//! Options: flags > `PGVAULT_*` environment variables > the TOML file.
//!
//! `cli` turns flags and environment (clap does both) into [`LowArgs`]; this
//! module layers the configuration file under them and builds the
//! high-level [`Settings`] the commands use. Names are the same everywhere:
//! `--compress-level`, `PGVAULT_COMPRESS_LEVEL`, `compress-level = 3`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::pg::conn::ConnParams;
use crate::repo::s3::S3Options;
use crate::repo::{EncodeOptions, RepoLocation};
use crate::spool::SpoolDir;

pub const DEFAULT_CONFIG: &str = "/etc/pgvault/pgvault.toml";
pub const DEFAULT_STANZA: &str = "main";

/// What the user typed (flag or environment), before the file is consulted.
#[derive(Debug, Clone, Default)]
pub struct LowArgs {
    pub config: Option<PathBuf>,
    pub repo: Option<String>,
    pub stanza: Option<String>,
    pub pgdata: Option<PathBuf>,
    pub compress_level: Option<i32>,
    pub compress_threads: Option<u32>,
    pub catalog: Option<String>,
    pub log_level: Option<String>,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub s3_atomic_create: Option<bool>,
    pub s3_allow_http: Option<bool>,
    pub process_max: Option<usize>,
    pub archive_timeout: Option<u64>,
    pub pg_host: Option<String>,
    pub pg_port: Option<u16>,
    pub pg_user: Option<String>,
    pub pg_database: Option<String>,
    pub retention_full: Option<usize>,
    pub retention_window: Option<String>,
    pub archive_push_ahead: Option<usize>,
    pub archive_push_superseded: Option<String>,
    pub archive_get_ahead: Option<usize>,
    pub spool_path: Option<PathBuf>,
    pub expire_auto: Option<bool>,
}

/// The configuration file. Unknown keys are an error naming the key.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub repo: Option<String>,
    pub stanza: Option<String>,
    pub pgdata: Option<PathBuf>,
    pub compress_level: Option<i32>,
    pub compress_threads: Option<u32>,
    pub catalog: Option<String>,
    pub log_level: Option<String>,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub s3_access_key_id: Option<String>,
    /// Only from the file (or `PGVAULT_S3_SECRET_ACCESS_KEY`), never a flag:
    /// flags show in `ps`.
    pub s3_secret_access_key: Option<String>,
    pub s3_atomic_create: Option<bool>,
    pub s3_allow_http: Option<bool>,
    pub process_max: Option<usize>,
    pub archive_timeout: Option<u64>,
    pub pg_host: Option<String>,
    pub pg_port: Option<u16>,
    pub pg_user: Option<String>,
    pub pg_database: Option<String>,
    pub retention_full: Option<usize>,
    pub retention_window: Option<String>,
    pub archive_push_ahead: Option<usize>,
    pub archive_push_superseded: Option<String>,
    pub archive_get_ahead: Option<usize>,
    pub spool_path: Option<PathBuf>,
    pub expire_auto: Option<bool>,
    /// For `restore --standby`: the standby's primary_conninfo. Passwords
    /// belong in ~/.pgpass, not here.
    pub primary_conninfo: Option<String>,
}

/// Where the catalog lives, or that there is none.
#[derive(Debug, Clone)]
pub enum CatalogSetting {
    Off,
    Default,
    Path(PathBuf),
}

/// High-level settings, built once at the edge.
#[derive(Debug, Clone)]
pub struct Settings {
    pub repo: Option<RepoLocation>,
    pub stanza: String,
    pub pgdata: Option<PathBuf>,
    pub encode: EncodeOptions,
    pub catalog: CatalogSetting,
    pub log_level: log::LevelFilter,
    pub s3: S3Options,
    /// The configuration file that was read, if any (restore writes it into
    /// `restore_command`).
    pub config_file: Option<PathBuf>,
    pub process_max: usize,
    pub archive_timeout: Duration,
    pub conn: ConnParams,
    pub primary_conninfo: Option<String>,
    pub retention_full: Option<usize>,
    pub retention_window: Option<Duration>,
    pub archive_push_ahead: usize,
    pub archive_push_superseded: crate::ops::archive_push::OnSuperseded,
    pub archive_get_ahead: usize,
    spool_path: Option<PathBuf>,
    /// Run expire after each successful backup.
    pub expire_auto: bool,
}

impl Settings {
    /// The local spool of this repository and stanza (look-ahead push
    /// records, prefetched WAL); `None` when no place for it is known.
    pub fn spool(&self) -> Option<SpoolDir> {
        match &self.spool_path {
            Some(p) => Some(SpoolDir::under(
                p,
                &self.repo.as_ref()?.identity(),
                &self.stanza,
            )),
            None => SpoolDir::default_for(&self.repo.as_ref()?.identity(), &self.stanza),
        }
    }

    pub fn repo(&self) -> Result<&RepoLocation> {
        self.repo.as_ref().ok_or_else(|| {
            Error::usage("no repository given")
                .hint("pass --repo PATH|s3://bucket/prefix, set PGVAULT_REPO, or put repo = \"…\" in the configuration file")
        })
    }

    pub fn pgdata(&self) -> Result<&Path> {
        self.pgdata.as_deref().ok_or_else(|| {
            Error::usage("no data directory given").hint("pass --pgdata DIR, set PGVAULT_PGDATA, or put pgdata = \"…\" in the configuration file")
        })
    }

    pub fn catalog(&self) -> Option<Catalog> {
        match &self.catalog {
            CatalogSetting::Off => None,
            CatalogSetting::Path(p) => Some(Catalog::at(p.clone())),
            CatalogSetting::Default => Catalog::default_for(&self.repo.as_ref()?.identity()),
        }
    }
}

/// Reads the configuration file: the one named, else the default one if it
/// exists, else none.
pub fn load_file(explicit: Option<&Path>) -> Result<(Option<PathBuf>, FileConfig)> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None if Path::new(DEFAULT_CONFIG).exists() => PathBuf::from(DEFAULT_CONFIG),
        None => return Ok((None, FileConfig::default())),
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::usage(format!("configuration file {}: {e}", path.display())))?;
    let cfg: FileConfig = toml::from_str(&text).map_err(|e| {
        Error::usage(format!(
            "configuration file {}: {}",
            path.display(),
            e.message().replace("field", "option")
        ))
    })?;
    Ok((Some(path), cfg))
}

impl LowArgs {
    /// Layers the file under the flags/environment and validates.
    pub fn resolve(self) -> Result<Settings> {
        let (config_file, file) = load_file(self.config.as_deref())?;
        let repo = self
            .repo
            .or(file.repo)
            .map(|r| RepoLocation::parse(&r))
            .transpose()?;
        let level = self.compress_level.or(file.compress_level).unwrap_or(3);
        if !(1..=19).contains(&level) {
            return Err(Error::usage(format!(
                "compress-level {level} is out of range (1 to 19)"
            )));
        }
        let threads = self
            .compress_threads
            .or(file.compress_threads)
            .unwrap_or_else(default_compress_threads);
        let catalog = match self.catalog.or(file.catalog).as_deref() {
            None | Some("") => CatalogSetting::Default,
            Some("off") | Some("none") => CatalogSetting::Off,
            Some(p) => CatalogSetting::Path(PathBuf::from(p)),
        };
        let log_level = parse_log_level(
            self.log_level
                .or(file.log_level)
                .as_deref()
                .unwrap_or("warn"),
        )?;
        let s3 = S3Options {
            endpoint: self.s3_endpoint.or(file.s3_endpoint),
            region: self.s3_region.or(file.s3_region),
            access_key_id: std::env::var("PGVAULT_S3_ACCESS_KEY_ID")
                .ok()
                .or(file.s3_access_key_id),
            secret_access_key: std::env::var("PGVAULT_S3_SECRET_ACCESS_KEY")
                .ok()
                .or(file.s3_secret_access_key),
            allow_http: self.s3_allow_http.or(file.s3_allow_http),
            atomic_create: self
                .s3_atomic_create
                .or(file.s3_atomic_create)
                .unwrap_or(true),
            retry_timeout: Duration::from_secs(60),
        };
        Ok(Settings {
            repo,
            stanza: self
                .stanza
                .or(file.stanza)
                .unwrap_or_else(|| DEFAULT_STANZA.to_string()),
            pgdata: self.pgdata.or(file.pgdata),
            encode: EncodeOptions {
                compression: crate::repo::codec::Compression::Zstd,
                level,
                threads,
            },
            catalog,
            log_level,
            s3,
            config_file,
            process_max: self
                .process_max
                .or(file.process_max)
                .unwrap_or(2)
                .clamp(1, 64),
            archive_timeout: Duration::from_secs(
                self.archive_timeout.or(file.archive_timeout).unwrap_or(120),
            ),
            conn: ConnParams {
                host: self.pg_host.or(file.pg_host),
                port: self.pg_port.or(file.pg_port),
                user: self.pg_user.or(file.pg_user),
                dbname: self.pg_database.or(file.pg_database),
            },
            primary_conninfo: file.primary_conninfo,
            retention_full: self.retention_full.or(file.retention_full),
            retention_window: self
                .retention_window
                .or(file.retention_window)
                .map(|w| crate::ops::expire::parse_window(&w))
                .transpose()?,
            archive_push_ahead: self
                .archive_push_ahead
                .or(file.archive_push_ahead)
                .unwrap_or(8),
            archive_push_superseded: self
                .archive_push_superseded
                .or(file.archive_push_superseded)
                .map(|v| {
                    v.parse().map_err(|e| {
                        Error::usage(format!("archive-push-superseded: {e}"))
                            .hint("archive-push-superseded = \"warn\" (the default) or \"fail\"")
                    })
                })
                .transpose()?
                .unwrap_or_default(),
            archive_get_ahead: self
                .archive_get_ahead
                .or(file.archive_get_ahead)
                .unwrap_or(8),
            spool_path: self.spool_path.or(file.spool_path),
            expire_auto: self.expire_auto.or(file.expire_auto).unwrap_or(false),
        })
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

pub fn parse_log_level(s: &str) -> Result<log::LevelFilter> {
    match s.to_ascii_lowercase().as_str() {
        "off" => Ok(log::LevelFilter::Off),
        "error" => Ok(log::LevelFilter::Error),
        "warn" | "warning" => Ok(log::LevelFilter::Warn),
        "info" => Ok(log::LevelFilter::Info),
        "debug" => Ok(log::LevelFilter::Debug),
        "trace" => Ok(log::LevelFilter::Trace),
        other => Err(Error::usage(format!(
            "log-level {other:?} is not one of off, error, warn, info, debug, trace"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "repo = \"/x\"\ncompres-level = 3\n").unwrap();
        let e = load_file(Some(&p)).unwrap_err().to_string();
        assert!(e.contains("compres-level"), "{e}");
        assert!(e.contains(&p.display().to_string()), "{e}");
    }

    #[test]
    fn flags_beat_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "repo = \"/from/file\"\nstanza = \"filestanza\"\ncompress-level = 5\n",
        )
        .unwrap();
        let s = LowArgs {
            config: Some(p),
            repo: Some("/from/flag".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(s.repo, Some(RepoLocation::Local("/from/flag".into())));
        assert_eq!(s.stanza, "filestanza");
        assert_eq!(s.encode.level, 5);
    }
}
