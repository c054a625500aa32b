//! Azure Blob Storage: builds the `object_store` client that
//! [`CloudBackend`] drives.
//!
//! The account comes from the repository URL
//! (`https://<account>.blob.core.windows.net/<container>/<prefix>`),
//! `azure-account` or `AZURE_STORAGE_ACCOUNT_NAME`; credentials from
//! `azure-key` or the variables `object_store` reads
//! (`AZURE_STORAGE_ACCOUNT_KEY`, `AZURE_STORAGE_SAS_KEY`, a service
//! principal's `AZURE_CLIENT_ID`/`AZURE_CLIENT_SECRET`/`AZURE_TENANT_ID`,
//! workload identity, and otherwise the managed identity of the VM).
//! `azure-endpoint` replaces `https://<account>.blob.core.windows.net`, for
//! sovereign clouds and for Azurite (`http://127.0.0.1:10000/<account>`).
//!
//! Conditional writes: create is `If-None-Match: *`, update `If-Match:
//! <etag>`, both atomic on Azure itself.

use std::sync::Arc;

use super::cloud::{clean, Cloud, CloudBackend};
use super::s3::S3Options;
use crate::error::{Error, Result};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};

/// pgvault's own Azure options (each overrides the environment). Its
/// `Debug` never shows the key.
#[derive(Clone)]
pub struct AzureOptions {
    pub account: Option<String>,
    /// The storage account's access key.
    pub access_key: Option<String>,
    pub endpoint: Option<String>,
    /// Whether to delete in blob batches (256 a request). Azurite hangs on
    /// them (measured, docs/testing.md): turn off there.
    pub bulk_delete: bool,
}

impl std::fmt::Debug for AzureOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureOptions")
            .field("account", &self.account)
            .field(
                "access_key",
                &self.access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("endpoint", &self.endpoint)
            .field("bulk_delete", &self.bulk_delete)
            .finish()
    }
}

impl Default for AzureOptions {
    fn default() -> Self {
        AzureOptions {
            account: None,
            access_key: None,
            endpoint: None,
            bulk_delete: true,
        }
    }
}

impl CloudBackend {
    /// A backend on Azure container `container` below `prefix`; `account`
    /// when the repository URL named it.
    pub fn azure(
        account: Option<&str>,
        container: &str,
        prefix: &str,
        opts: &S3Options,
    ) -> Result<Self> {
        let mut b = MicrosoftAzureBuilder::from_env().with_container_name(container);
        if let Some(v) = account.or(opts.azure.account.as_deref()) {
            b = b.with_account(v);
        }
        if let Some(v) = &opts.azure.access_key {
            b = b.with_access_key(v);
        }
        if let Some(v) = &opts.azure.endpoint {
            b = b.with_endpoint(v.clone());
            if v.starts_with("http://") {
                b = b.with_allow_http(true);
            }
        }
        b = b.with_retry(opts.client.retry(opts.retry_timeout));
        for (k, v) in opts.client.client_config()? {
            b = b.with_config(AzureConfigKey::Client(k), v);
        }
        let store = b
            .build()
            .map_err(|e| {
                Error::usage(format!(
                    "Azure repository az://{container}/{prefix}: {}",
                    clean(&e)
                ))
                .hint("name the storage account in the URL (https://<account>.blob.core.windows.net/<container>), with azure-account or AZURE_STORAGE_ACCOUNT_NAME")
            })?;
        let mut backend =
            CloudBackend::configured(Arc::new(store), Cloud::Azure, container, prefix, opts)?;
        backend.bulk_delete = opts.azure.bulk_delete;
        Ok(backend)
    }
}
