//! S3 and S3-compatible object storage: builds the `object_store` client
//! that [`CloudBackend`] drives.
//!
//! Endpoint, region and credentials come from the standard `AWS_*`
//! variables (as `object_store` reads them), overridden by pgvault's own
//! `s3-*` options so that a configuration file can carry them where the
//! environment cannot (a postmaster's `restore_command`).

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};

use super::cloud::{clean, Cloud, CloudBackend};
use super::storeopts::{ClientSettings, StorageClasses};
use crate::error::{Error, Result};

/// The S3 repository's backend (the shared object-store backend).
pub type S3Backend = CloudBackend;

/// What pgvault's own options say about an object store: the `s3-*` ones
/// (each overrides `AWS_*`), the `gcs-*` and `azure-*` ones (each overrides
/// that cloud's variables), and what applies to every store. Its `Debug`
/// never shows a secret.
#[derive(Clone, Default)]
pub struct S3Options {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub allow_http: Option<bool>,
    /// Server-side encryption asked of S3 for every object written.
    pub sse: Sse,
    /// Whether the store's conditional create is atomic under races.
    pub atomic_create: bool,
    /// Bound on retries of one request, in total.
    pub retry_timeout: Duration,
    /// The HTTP client's timeouts, retries and proxy (every store).
    pub client: ClientSettings,
    /// The storage class of each kind of object (every store).
    pub storage_class: StorageClasses,
    /// Bytes per second every transfer of one command through this
    /// repository shares (`throttle.rs`); `None`: no limit.
    pub bandwidth_limit: Option<u64>,
    /// Google Cloud Storage (see `gcs.rs`).
    pub gcs: super::gcs::GcsOptions,
    /// Azure Blob Storage (see `azure.rs`).
    pub azure: super::azure::AzureOptions,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("allow_http", &self.allow_http)
            .field("sse", &self.sse)
            .field("atomic_create", &self.atomic_create)
            .field("retry_timeout", &self.retry_timeout)
            .field("client", &self.client)
            .field("storage_class", &self.storage_class)
            .field("bandwidth_limit", &self.bandwidth_limit)
            .field("gcs", &self.gcs)
            .field("azure", &self.azure)
            .finish()
    }
}

/// S3 server-side encryption (`s3-sse`): the store encrypts what it keeps.
/// Its `Debug` never shows an SSE-C key.
#[derive(Clone, Default, PartialEq, Eq)]
pub enum Sse {
    /// The bucket's default.
    #[default]
    None,
    /// SSE-S3: keys managed by S3 (`AES256`).
    S3,
    /// SSE-KMS with this key id or ARN (the account's default key when empty).
    Kms(String),
    /// SSE-C: this base64-encoded 256-bit key, sent with every request; S3
    /// does not keep it, and every read needs it.
    Customer(String),
}

impl std::fmt::Debug for Sse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sse::None => f.write_str("None"),
            Sse::S3 => f.write_str("S3"),
            Sse::Kms(k) => write!(f, "Kms({k:?})"),
            Sse::Customer(_) => f.write_str("Customer(<redacted>)"),
        }
    }
}

impl Sse {
    /// From `s3-sse` (`none`, `sse-s3`, `sse-kms`, `sse-c`) and the key
    /// options it needs.
    pub fn from_options(
        kind: &str,
        kms_key_id: Option<&str>,
        customer_key: Option<&str>,
    ) -> Result<Sse> {
        match kind {
            "none" => Ok(Sse::None),
            "sse-s3" => Ok(Sse::S3),
            "sse-kms" => Ok(Sse::Kms(kms_key_id.unwrap_or_default().to_string())),
            "sse-c" => customer_key
                .map(|k| Sse::Customer(k.to_string()))
                .ok_or_else(|| {
                    Error::usage("s3-sse = sse-c needs a key")
                        .hint("set s3-sse-c-key (base64 of 32 bytes) in the configuration file or PGVAULT_S3_SSE_C_KEY")
                }),
            other => Err(Error::usage(format!(
                "s3-sse {other:?}: use none, sse-s3, sse-kms or sse-c"
            ))),
        }
    }
}

impl CloudBackend {
    /// A backend on S3 bucket `bucket` below `prefix`.
    pub fn new(bucket: &str, prefix: &str, opts: &S3Options) -> Result<Self> {
        let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(v) = &opts.endpoint {
            b = b.with_endpoint(v);
        }
        if let Some(v) = &opts.region {
            b = b.with_region(v);
        }
        if let Some(v) = &opts.access_key_id {
            b = b.with_access_key_id(v);
        }
        if let Some(v) = &opts.secret_access_key {
            b = b.with_secret_access_key(v);
        }
        if let Some(v) = opts.allow_http {
            b = b.with_allow_http(v);
        }
        b = match &opts.sse {
            Sse::None => b,
            Sse::S3 => {
                let key: AmazonS3ConfigKey = "aws_server_side_encryption"
                    .parse()
                    .map_err(|e| Error::internal(format!("S3 encryption option: {e}")))?;
                b.with_config(key, "AES256")
            }
            Sse::Kms(key) => b.with_sse_kms_encryption(key.clone()),
            Sse::Customer(key) => b.with_ssec_encryption(key.clone()),
        };
        b = b.with_retry(opts.client.retry(opts.retry_timeout));
        for (k, v) in opts.client.client_config()? {
            b = b.with_config(AmazonS3ConfigKey::Client(k), v);
        }
        let store = b.build().map_err(|e| {
            Error::usage(format!(
                "S3 repository s3://{bucket}/{prefix}: {}",
                clean(&e)
            ))
        })?;
        CloudBackend::configured(Arc::new(store), Cloud::S3, bucket, prefix, opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_options() {
        assert_eq!(Sse::from_options("none", None, None).unwrap(), Sse::None);
        assert_eq!(Sse::from_options("sse-s3", None, None).unwrap(), Sse::S3);
        assert_eq!(
            Sse::from_options("sse-kms", Some("k1"), None).unwrap(),
            Sse::Kms("k1".into())
        );
        let err = Sse::from_options("sse-c", None, None).expect_err("no key");
        assert!(format!("{err:#}").contains("sse-c"), "{err:#}");
        let c = Sse::from_options("sse-c", None, Some("c2VjcmV0LWtleQ==")).unwrap();
        assert!(!format!("{c:?}").contains("c2VjcmV0"), "{c:?}");
        assert!(Sse::from_options("aes", None, None).is_err());
    }

    #[test]
    fn debug_never_shows_the_secret_key() {
        let opts = S3Options {
            access_key_id: Some("AKIAEXAMPLE".into()),
            secret_access_key: Some("wJalrXUtnFEMI-very-secret".into()),
            ..Default::default()
        };
        let shown = format!("{opts:?}");
        assert!(shown.contains("AKIAEXAMPLE"), "{shown}");
        assert!(!shown.contains("very-secret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }
}
