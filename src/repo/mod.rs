//! The repository: the source of truth. Objects, their encoding, their
//! keys, and the storage they live in. Nothing outside this module builds a
//! key, encodes or decodes an object, or talks to `object_store`.

pub mod archive;
pub mod azure;
pub mod backend;
pub mod blockmap;
pub mod blocksums;
pub mod chunked;
pub mod cloud;
pub mod codec;
#[doc(hidden)]
pub mod conformance;
pub mod crypt;
pub mod deletion;
pub mod fault;
pub mod fence;
pub mod filelist;
pub mod gcs;
pub mod keys;
pub mod layout;
pub mod local;
pub mod lock;
pub mod manifest;
pub mod orphans;
pub mod results;
pub mod s3;
pub mod sealing;
pub mod stanza;
pub mod storeopts;
pub mod throttle;

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use backend::{Backend, ObjectMeta, ObjectVersion, PutMode, PutOutcome, PutResult, Spool};
pub use codec::{Digest256, EncodeOptions, Sha256Sum};
pub use deletion::Deletion;
pub use stanza::{DbInfo, StanzaInfo};

use crate::error::{Error, Result};

/// What reading one small object found. A damaged object is an outcome,
/// not an error, for the readers that go through many objects (verify,
/// info, expire, restore's choice of backup): they report it and go on, so
/// that one flipped bit hides nothing else. A store that cannot be read
/// stays an error.
#[derive(Debug, Clone)]
pub enum Fetched<T> {
    Found(T),
    Missing,
    /// There, but not readable: the object and the cause.
    Damaged(String),
}

impl<T> Fetched<T> {
    /// What was found (`None`: nothing there), for readers to whom a
    /// damaged object is an error: a repository error, its cause.
    pub fn optional(self) -> Result<Option<T>> {
        match self {
            Fetched::Found(t) => Ok(Some(t)),
            Fetched::Missing => Ok(None),
            Fetched::Damaged(why) => Err(Error::repository(why)),
        }
    }

    /// [`Fetched::optional`], where missing is an error too: `missing`
    /// says what is missing.
    pub fn found(self, missing: impl FnOnce() -> String) -> Result<T> {
        self.optional()?.ok_or_else(|| Error::repository(missing()))
    }
}

/// Where the repository is, as given by `--repo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoLocation {
    Local(PathBuf),
    S3 {
        bucket: String,
        prefix: String,
    },
    Gcs {
        bucket: String,
        prefix: String,
    },
    /// `account` when the URL named it (the `https://` form); otherwise
    /// from `azure-account` or the environment.
    Azure {
        account: Option<String>,
        container: String,
        prefix: String,
    },
}

/// `bucket/some/prefix/` as (bucket, prefix), or `None` without a bucket.
fn bucket_and_prefix(rest: &str) -> Option<(String, String)> {
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return None;
    }
    Some((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

impl RepoLocation {
    /// Accepts a plain path, `file:///path`, `s3://bucket/prefix`,
    /// `gs://bucket/prefix`, `az://container/prefix` or
    /// `https://<account>.blob.core.windows.net/<container>/prefix`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::usage(format!("repository {s:?}: {why}"))
                .hint("--repo takes a path, file:///path, s3://bucket/prefix, gs://bucket/prefix, az://container/prefix or https://<account>.blob.core.windows.net/<container>/prefix")
        };
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = bucket_and_prefix(rest).ok_or_else(|| bad("no bucket name"))?;
            return Ok(RepoLocation::S3 { bucket, prefix });
        }
        if let Some(rest) = s.strip_prefix("gs://") {
            let (bucket, prefix) = bucket_and_prefix(rest).ok_or_else(|| bad("no bucket name"))?;
            return Ok(RepoLocation::Gcs { bucket, prefix });
        }
        if let Some(rest) = s.strip_prefix("az://") {
            let (container, prefix) =
                bucket_and_prefix(rest).ok_or_else(|| bad("no container name"))?;
            return Ok(RepoLocation::Azure {
                account: None,
                container,
                prefix,
            });
        }
        if let Some(rest) = s.strip_prefix("https://") {
            let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
            let Some(account) = host.strip_suffix(".blob.core.windows.net") else {
                return Err(bad("an https:// repository must be an Azure Blob Storage URL (https://<account>.blob.core.windows.net/<container>/prefix)"));
            };
            if account.is_empty() || account.contains('.') {
                return Err(bad("no storage account name"));
            }
            let (container, prefix) =
                bucket_and_prefix(path).ok_or_else(|| bad("no container name"))?;
            return Ok(RepoLocation::Azure {
                account: Some(account.to_string()),
                container,
                prefix,
            });
        }
        let path = if let Some(rest) = s.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(bad(
                    "a file:// URL needs an absolute path (file:///var/lib/pgvault)",
                ));
            }
            rest
        } else if s.contains("://") {
            return Err(bad("unsupported scheme"));
        } else {
            s
        };
        if path.is_empty() {
            return Err(bad("empty path"));
        }
        let p = PathBuf::from(path);
        // archive_command runs with the data directory as its working
        // directory: a relative repository path would land inside it.
        let p = if p.is_relative() {
            std::env::current_dir()
                .map_err(|e| bad(&format!("cannot resolve a relative path: {e}")))?
                .join(p)
        } else {
            p
        };
        Ok(RepoLocation::Local(p))
    }

    /// A stable identity for this repository (catalog file names).
    pub fn identity(&self) -> String {
        match self {
            RepoLocation::Local(p) => format!("file://{}", p.display()),
            RepoLocation::S3 { bucket, prefix } => format!("s3://{bucket}/{prefix}"),
            RepoLocation::Gcs { bucket, prefix } => format!("gs://{bucket}/{prefix}"),
            RepoLocation::Azure {
                account: Some(account),
                container,
                prefix,
            } => format!("https://{account}.blob.core.windows.net/{container}/{prefix}"),
            RepoLocation::Azure {
                account: None,
                container,
                prefix,
            } => format!("az://{container}/{prefix}"),
        }
    }
}

/// An open repository for one stanza.
#[derive(Debug, Clone)]
pub struct Repository {
    /// Every write through it passes the gate (see `fence.rs`).
    backend: Arc<dyn Backend>,
    /// The same backend unfenced: the lock's own reads and writes.
    raw: Arc<dyn Backend>,
    gate: Arc<fence::Gate>,
    location: RepoLocation,
    stanza: String,
    /// `repo-cipher-type` and, once loaded, the keys (`repo::keys`).
    cipher: Arc<keys::Cipher>,
}

impl Repository {
    /// Opens the repository; under `PGVAULT_FAULTS` (tests only) its
    /// backend injects faults (see `fault.rs`).
    pub fn open(location: RepoLocation, stanza: &str, s3: &s3::S3Options) -> Result<Self> {
        validate_stanza_name(stanza)?;
        let backend: Arc<dyn Backend> = match &location {
            RepoLocation::Local(p) => {
                refuse_store_options(p, s3)?;
                Arc::new(local::LocalBackend::new(p.clone()))
            }
            RepoLocation::S3 { bucket, prefix } => {
                Arc::new(cloud::CloudBackend::new(bucket, prefix, s3)?)
            }
            RepoLocation::Gcs { bucket, prefix } => {
                Arc::new(cloud::CloudBackend::gcs(bucket, prefix, s3)?)
            }
            RepoLocation::Azure {
                account,
                container,
                prefix,
            } => Arc::new(cloud::CloudBackend::azure(
                account.as_deref(),
                container,
                prefix,
                s3,
            )?),
        };
        let backend = fault::from_env(backend)?;
        Ok(Self::with_backend(backend, location, stanza))
    }

    /// Wraps an existing backend (tests use fault-injecting ones).
    pub fn with_backend(backend: Arc<dyn Backend>, location: RepoLocation, stanza: &str) -> Self {
        let gate = Arc::new(fence::Gate::default());
        Repository {
            backend: Arc::new(fence::Fenced::new(backend.clone(), gate.clone())),
            raw: backend,
            gate,
            location,
            stanza: stanza.to_string(),
            cipher: Arc::default(),
        }
    }

    /// This repository sealing and opening objects as `setting` says.
    pub fn with_cipher(mut self, setting: keys::CipherSetting) -> Self {
        self.cipher = Arc::new(keys::Cipher::new(setting));
        self
    }

    /// A repository in local directory `dir` (unit tests).
    #[cfg(test)]
    pub(crate) fn local_for_tests(dir: &std::path::Path, stanza: &str) -> Self {
        Self::open(
            RepoLocation::Local(dir.to_path_buf()),
            stanza,
            &s3::S3Options::default(),
        )
        .expect("a valid stanza name")
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }
    pub fn location(&self) -> &RepoLocation {
        &self.location
    }
    pub fn stanza(&self) -> &str {
        &self.stanza
    }
    pub fn describe(&self) -> String {
        self.backend.describe()
    }

    /// Encodes (and seals, when the repository is encrypted) and writes a
    /// small object.
    pub async fn put_encoded(&self, key: &str, data: &[u8], mode: PutMode) -> Result<PutOutcome> {
        let keys = self.keys().await?;
        let obj = codec::encode_bytes(
            data,
            EncodeOptions::default(),
            &keys,
            codec::Binding::object(key),
        )
        .map_err(|e| Error::internal(format!("encode {key}: {e}")))?;
        self.backend.put_bytes(key, obj, mode).await
    }

    pub async fn get_json<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Option<T>> {
        self.fetch_json(key).await?.optional()
    }

    /// Reads a small JSON object, telling a damaged object (an outcome:
    /// see [`Fetched`]) from a store that cannot be read (an error).
    pub async fn fetch_json<T: for<'de> Deserialize<'de>>(&self, key: &str) -> Result<Fetched<T>> {
        let Some(raw) = self.backend.get_bytes(key).await? else {
            return Ok(Fetched::Missing);
        };
        let what = format!("{}/{key}", self.describe());
        let keys = self.keys().await?;
        let bytes = match self.decode_small(&keys, &raw, key)? {
            Ok(b) => b,
            Err(why) => return Ok(Fetched::Damaged(why)),
        };
        Ok(match serde_json::from_slice(&bytes) {
            Ok(v) => Fetched::Found(v),
            Err(e) => Fetched::Damaged(format!("{what}: unreadable metadata: {e}")),
        })
    }

    /// Decodes a small object read from `key`. A damaged object is an
    /// outcome (its error line); a key that is missing or not this
    /// repository's is an error: it is the same for every object.
    pub fn decode_small(
        &self,
        keys: &codec::Keys,
        raw: &[u8],
        key: &str,
    ) -> Result<std::result::Result<Vec<u8>, String>> {
        match codec::decode_bytes(raw, keys, codec::Binding::object(layout::binding_name(key))) {
            Ok(b) => Ok(Ok(b)),
            Err(e) => {
                let what = format!("{}/{key}", self.describe());
                match e.key_problem() {
                    Some(k) => Err(keys::key_error(&what, k)),
                    None => Ok(Err(format!("{what}: {e}"))),
                }
            }
        }
    }

    pub async fn put_json<T: Serialize>(
        &self,
        key: &str,
        value: &T,
        mode: PutMode,
    ) -> Result<PutOutcome> {
        let bytes = serde_json::to_vec_pretty(value)
            .map_err(|e| Error::internal(format!("serialize {key}: {e}")))?;
        self.put_encoded(key, &bytes, mode).await
    }
}

/// The options that only mean something to an object store, set for a
/// local repository: refused rather than silently ignored.
fn refuse_store_options(path: &std::path::Path, s3: &s3::S3Options) -> Result<()> {
    let set = if s3.storage_class.is_set() {
        "storage-class"
    } else if s3.bandwidth_limit.is_some() {
        "storage-bandwidth-limit"
    } else {
        return Ok(());
    };
    Err(Error::usage(format!(
        "{set} applies to object-store repositories, and {} is a directory",
        path.display()
    ))
    .hint(format!("remove {set} from this repository's settings")))
}

fn validate_stanza_name(s: &str) -> Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !s.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::usage(format!(
            "stanza name {s:?} is not valid: use 1 to 64 letters, digits, '-', '_' or '.'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_repo_locations() {
        assert_eq!(
            RepoLocation::parse("/var/lib/pgvault").unwrap(),
            RepoLocation::Local("/var/lib/pgvault".into())
        );
        assert_eq!(
            RepoLocation::parse("file:///var/lib/pgvault").unwrap(),
            RepoLocation::Local("/var/lib/pgvault".into())
        );
        assert_eq!(
            RepoLocation::parse("s3://b/some/prefix/").unwrap(),
            RepoLocation::S3 {
                bucket: "b".into(),
                prefix: "some/prefix".into()
            }
        );
        assert!(RepoLocation::parse("s3:///x").is_err());
        assert_eq!(
            RepoLocation::parse("gs://b/x/").unwrap(),
            RepoLocation::Gcs {
                bucket: "b".into(),
                prefix: "x".into()
            }
        );
        assert_eq!(
            RepoLocation::parse("az://c/p/q").unwrap(),
            RepoLocation::Azure {
                account: None,
                container: "c".into(),
                prefix: "p/q".into()
            }
        );
        assert_eq!(
            RepoLocation::parse("https://acct.blob.core.windows.net/c/p").unwrap(),
            RepoLocation::Azure {
                account: Some("acct".into()),
                container: "c".into(),
                prefix: "p".into()
            }
        );
        assert!(RepoLocation::parse("gs://").is_err());
        assert!(RepoLocation::parse("https://example.com/c/p").is_err());
        assert!(RepoLocation::parse("https://acct.blob.core.windows.net/").is_err());
        assert!(RepoLocation::parse("ftp://b/x").is_err());
        assert!(RepoLocation::parse("file://relative").is_err());
    }

    #[test]
    fn object_store_options_are_refused_on_a_directory() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let loc = RepoLocation::Local(dir.path().to_path_buf());
        let classed = s3::S3Options {
            storage_class: storeopts::StorageClasses {
                wal: Some("STANDARD_IA".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let e =
            Repository::open(loc.clone(), "main", &classed).expect_err("a class on a directory");
        assert!(format!("{e:#}").contains("storage-class"), "{e:#}");
        let limited = s3::S3Options {
            bandwidth_limit: Some(1 << 20),
            ..Default::default()
        };
        let e =
            Repository::open(loc.clone(), "main", &limited).expect_err("a limit on a directory");
        assert!(
            format!("{e:#}").contains("storage-bandwidth-limit"),
            "{e:#}"
        );
        assert!(Repository::open(loc, "main", &s3::S3Options::default()).is_ok());
    }

    #[test]
    fn stanza_names() {
        assert!(validate_stanza_name("main").is_ok());
        assert!(validate_stanza_name("db-01_a.b").is_ok());
        assert!(validate_stanza_name("").is_err());
        assert!(validate_stanza_name("../x").is_err());
        assert!(validate_stanza_name("a/b").is_err());
    }
}
