//! Google Cloud Storage: builds the `object_store` client that
//! [`CloudBackend`] drives.
//!
//! Credentials are found as Google's client libraries find them (through
//! `object_store`): `GOOGLE_SERVICE_ACCOUNT` / `GOOGLE_SERVICE_ACCOUNT_KEY`,
//! then Application Default Credentials (`GOOGLE_APPLICATION_CREDENTIALS`,
//! or gcloud's own file), then the instance metadata server (GCE, GKE
//! workload identity). `gcs-key-file` names a service-account JSON file
//! when the environment cannot carry it; `gcs-endpoint` points the client
//! at an emulator or a private endpoint.
//!
//! Conditional writes: create is `ifGenerationMatch=0` and update is
//! `ifGenerationMatch=<generation>`, both atomic on GCS itself.

use std::sync::Arc;

use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::ClientConfigKey;

use super::cloud::{clean, Cloud, CloudBackend};
use super::s3::S3Options;
use crate::error::{Error, Result};

/// pgvault's own GCS options (each overrides the environment).
#[derive(Debug, Clone, Default)]
pub struct GcsOptions {
    /// The service's base URL (`https://storage.googleapis.com`), for an
    /// emulator or a private endpoint.
    pub endpoint: Option<String>,
    /// A service-account JSON key file.
    pub key_file: Option<String>,
}

impl CloudBackend {
    /// A backend on GCS bucket `bucket` below `prefix`.
    pub fn gcs(bucket: &str, prefix: &str, opts: &S3Options) -> Result<Self> {
        let mut b = GoogleCloudStorageBuilder::from_env().with_bucket_name(bucket);
        if let Some(v) = &opts.gcs.endpoint {
            b = b.with_base_url(v);
            if v.starts_with("http://") {
                b = b.with_config(GoogleConfigKey::Client(ClientConfigKey::AllowHttp), "true");
            }
        }
        if let Some(v) = &opts.gcs.key_file {
            b = b.with_service_account_path(v);
        }
        b = b.with_retry(opts.client.retry(opts.retry_timeout));
        for (k, v) in opts.client.client_config()? {
            b = b.with_config(GoogleConfigKey::Client(k), v);
        }
        let store = b.build().map_err(|e| {
            Error::usage(format!(
                "GCS repository gs://{bucket}/{prefix}: {}",
                clean(&e)
            ))
            .hint(
                "set GOOGLE_APPLICATION_CREDENTIALS or gcs-key-file to a service-account JSON file",
            )
        })?;
        CloudBackend::configured(Arc::new(store), Cloud::Gcs, bucket, prefix, opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::Backend;

    /// No GCS emulator accepts object_store's uploads (docs/testing.md), so
    /// this is what runs without one: the options reach the client (the
    /// key file is read, requests go to the endpoint), and a failure names
    /// the object with its gs:// URL and a GCS hint.
    #[tokio::test]
    async fn options_reach_the_client_and_errors_name_the_object() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let key = dir.path().join("key.json");
        std::fs::write(
            &key,
            r#"{"private_key": "", "private_key_id": "", "client_email": "", "disable_oauth": true}"#,
        )
        .expect("write the key file");
        let opts = S3Options {
            gcs: GcsOptions {
                // Nothing listens on loopback port 1.
                endpoint: Some("http://127.0.0.1:1".into()),
                key_file: Some(key.display().to_string()),
            },
            retry_timeout: std::time::Duration::from_millis(200),
            ..Default::default()
        };
        let b = CloudBackend::gcs("bucket", "some/prefix", &opts).expect("a GCS backend");
        assert_eq!(b.describe(), "gs://bucket/some/prefix");
        let err = b
            .get_bytes("stanza.json")
            .await
            .expect_err("nothing listens");
        let shown = format!("{err:#}");
        assert!(
            shown.contains("gs://bucket/some/prefix/stanza.json"),
            "{shown}"
        );
        assert!(shown.contains("127.0.0.1:1"), "{shown}");

        let missing = S3Options {
            gcs: GcsOptions {
                endpoint: None,
                key_file: Some(dir.path().join("absent.json").display().to_string()),
            },
            ..Default::default()
        };
        let err = CloudBackend::gcs("bucket", "", &missing).expect_err("no key file");
        assert!(format!("{err:#}").contains("gs://bucket/"), "{err:#}");
    }
}
