//! What a DBA sets about how an object-store repository is reached and
//! how its objects are stored: request timeouts, retries and a proxy (the
//! HTTP client's settings, the same on S3, GCS and Azure), and the storage
//! class of each kind of object. The bandwidth limit is `throttle.rs`.

use std::time::Duration;

use object_store::{Attribute, Attributes, BackoffConfig, ClientConfigKey, RetryConfig};

use super::cloud::Cloud;
use super::layout::{kind_of, StoredKind};
use crate::error::{Error, Result};

/// The HTTP client's settings (`storage-timeout`, `storage-connect-timeout`,
/// `storage-retries`, `storage-proxy`, …). Its `Debug` never shows the
/// proxy's credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientSettings {
    /// How long a request may wait for its answer's head — the time to
    /// send it, an upload's body included — and then for each further
    /// chunk of the answer's body (reqwest's read timeout). pgBackRest's
    /// `io-timeout` is the same idea.
    pub timeout: Duration,
    /// How long opening a connection may take.
    pub connect_timeout: Duration,
    /// How many times one failed request is sent again.
    pub retries: usize,
    /// Every request goes through this HTTP(S) proxy; its URL may carry a
    /// user and password (sent as basic authentication to the proxy).
    pub proxy: Option<String>,
    /// Hosts reached without the proxy (comma-separated names, domains
    /// `.example.com`, addresses, CIDR ranges).
    pub proxy_excludes: Option<String>,
    /// A PEM file of the CA that signed an HTTPS proxy's certificate.
    pub proxy_ca_file: Option<String>,
}

/// A backstop on one whole request, body included. Not a user setting:
/// `timeout` catches a stalled request; this only stops one that trickles
/// forever. It must let the largest object (a 1 GiB relation segment)
/// arrive under a bandwidth limit, and a body cut by it is resumed
/// (`repo/backend.rs`).
const REQUEST_BACKSTOP: Duration = Duration::from_secs(3600);

impl std::fmt::Debug for ClientSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSettings")
            .field("timeout", &self.timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("retries", &self.retries)
            .field("proxy", &self.proxy.as_deref().map(without_credentials))
            .field("proxy_excludes", &self.proxy_excludes)
            .field("proxy_ca_file", &self.proxy_ca_file)
            .finish()
    }
}

/// `http://user:password@host:3128` as `http://<redacted>@host:3128`.
fn without_credentials(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    match authority.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}://<redacted>@{host}/{path}")
            .trim_end_matches('/')
            .to_string(),
        None => url.to_string(),
    }
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            // As long as the whole-request timeout pgvault had before this
            // option: an 8 MiB part must still go up over a slow link.
            timeout: Duration::from_secs(120),
            connect_timeout: Duration::from_secs(5),
            retries: 10,
            proxy: None,
            proxy_excludes: None,
            proxy_ca_file: None,
        }
    }
}

impl ClientSettings {
    /// The settings as object_store's client keys, for every builder's
    /// `with_config` (set one by one: `with_client_options` would replace
    /// what the builder read from the environment, among them
    /// `AWS_ALLOW_HTTP`).
    /// A missing or unreadable `proxy_ca_file` is refused here, naming it.
    pub(crate) fn client_config(&self) -> Result<Vec<(ClientConfigKey, String)>> {
        let ms = |d: Duration| format!("{}ms", d.as_millis());
        let mut out = vec![
            (ClientConfigKey::ConnectTimeout, ms(self.connect_timeout)),
            (ClientConfigKey::ReadTimeout, ms(self.timeout)),
            (ClientConfigKey::Timeout, ms(REQUEST_BACKSTOP)),
        ];
        if let Some(p) = &self.proxy {
            out.push((ClientConfigKey::ProxyUrl, p.clone()));
        }
        if let Some(p) = &self.proxy_excludes {
            out.push((ClientConfigKey::ProxyExcludes, p.clone()));
        }
        if let Some(path) = &self.proxy_ca_file {
            out.push((ClientConfigKey::ProxyCaCertificate, read_pem(path)?));
        }
        Ok(out)
    }

    /// Retries of one request: `retries` of them, with exponential
    /// back-off (100 ms to 5 s), all within `budget` of the first attempt.
    pub(crate) fn retry(&self, budget: Duration) -> RetryConfig {
        RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            max_retries: self.retries,
            retry_timeout: budget,
        }
    }
}

/// The proxy CA's certificate file, read when the client is built.
fn read_pem(path: &str) -> Result<String> {
    let pem = std::fs::read_to_string(path).map_err(|e| {
        Error::usage(format!("storage-proxy-ca-file {path}: {e}"))
            .hint("name a PEM file holding the proxy's CA certificate")
    })?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(Error::usage(format!(
            "storage-proxy-ca-file {path}: not a PEM certificate"
        )));
    }
    Ok(pem)
}

/// The storage class of each kind of object (`storage-class`,
/// `storage-class-wal`, `storage-class-backup`): S3's `x-amz-storage-class`,
/// GCS's `x-goog-storage-class`, Azure's access tier (`x-ms-access-tier`).
/// `None` leaves the bucket's default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StorageClasses {
    /// Every object's, unless one of the others says otherwise.
    pub default: Option<String>,
    /// Archived WAL and what is stored beside it (`<stanza>/archive/`).
    pub wal: Option<String>,
    /// Backups (`<stanza>/backup/`).
    pub backup: Option<String>,
}

impl StorageClasses {
    pub fn is_set(&self) -> bool {
        self.default.is_some() || self.wal.is_some() || self.backup.is_some()
    }

    /// The class of the object under `key` (relative to the repository).
    pub fn for_key(&self, key: &str) -> Option<&str> {
        let own = match kind_of(key) {
            StoredKind::Wal => self.wal.as_deref(),
            StoredKind::Backup => self.backup.as_deref(),
            StoredKind::Meta => None,
        };
        own.or(self.default.as_deref())
    }

    /// The attributes a write of `key` carries.
    pub(crate) fn attributes(&self, key: &str) -> Attributes {
        let mut a = Attributes::new();
        if let Some(class) = self.for_key(key) {
            a.insert(Attribute::StorageClass, class.to_string().into());
        }
        a
    }

    /// Refuses, before anything is written, a class the store does not
    /// have a name for or whose objects cannot be read without first being
    /// restored: archive-get and restore read every object at once.
    pub fn check(&self, cloud: Cloud) -> Result<()> {
        let all = [
            ("storage-class", &self.default),
            ("storage-class-wal", &self.wal),
            ("storage-class-backup", &self.backup),
        ];
        for (option, class) in all {
            let Some(class) = class else { continue };
            check_class(cloud, option, class)?;
        }
        Ok(())
    }
}

fn check_class(cloud: Cloud, option: &str, class: &str) -> Result<()> {
    let bad = |why: &str| Error::usage(format!("{option} = {class:?}: {why}"));
    if class.is_empty()
        || !class
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_')
    {
        return Err(bad("a storage class is a name of letters, digits and '_'"));
    }
    match cloud {
        // S3-compatible stores have classes of their own: any name goes,
        // but the two that need a restore before a read.
        Cloud::S3 => {
            if matches!(class, "GLACIER" | "DEEP_ARCHIVE") {
                return Err(bad("objects of this class must be restored before they can be read, and archive-get and restore read at once")
                    .hint("use GLACIER_IR (instant retrieval), STANDARD_IA or INTELLIGENT_TIERING, and move old backups to GLACIER with a lifecycle rule"));
            }
        }
        // GCS's classes all read at once (ARCHIVE too, at a higher price).
        Cloud::Gcs => {
            if !matches!(class, "STANDARD" | "NEARLINE" | "COLDLINE" | "ARCHIVE") {
                return Err(bad(
                    "GCS storage classes are STANDARD, NEARLINE, COLDLINE and ARCHIVE",
                ));
            }
        }
        Cloud::Azure => match class {
            "Hot" | "Cool" | "Cold" => {}
            "Archive" => {
                return Err(bad("archive-tier blobs must be rehydrated before they can be read, and archive-get and restore read at once")
                    .hint("use Cool or Cold, and move old backups to Archive with a lifecycle rule"));
            }
            _ => return Err(bad("Azure access tiers are Hot, Cool and Cold")),
        },
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_by_kind_of_object() {
        let c = StorageClasses {
            default: Some("STANDARD_IA".into()),
            wal: Some("ONEZONE_IA".into()),
            backup: None,
        };
        assert_eq!(
            c.for_key("main/archive/15-1/0000000100000000/000000010000000000000003-ab.zst"),
            Some("ONEZONE_IA")
        );
        assert_eq!(
            c.for_key("main/backup/20260101-000000F/data/0-1.pgv"),
            Some("STANDARD_IA")
        );
        assert_eq!(c.for_key("main/stanza.pgv"), Some("STANDARD_IA"));
        assert!(StorageClasses::default()
            .for_key("main/stanza.pgv")
            .is_none());
    }

    #[test]
    fn unreadable_classes_are_refused_at_configuration() {
        let only = |s: &str| StorageClasses {
            backup: Some(s.into()),
            ..Default::default()
        };
        assert!(only("GLACIER_IR").check(Cloud::S3).is_ok());
        let e = only("DEEP_ARCHIVE")
            .check(Cloud::S3)
            .expect_err("unreadable");
        assert!(format!("{e:#}").contains("storage-class-backup"), "{e:#}");
        assert!(e.hint_text().is_some_and(|h| h.contains("GLACIER_IR")));
        assert!(only("NEARLINE").check(Cloud::Gcs).is_ok());
        assert!(only("STANDARD_IA").check(Cloud::Gcs).is_err());
        assert!(only("Cool").check(Cloud::Azure).is_ok());
        assert!(only("Archive").check(Cloud::Azure).is_err());
        assert!(only("a b").check(Cloud::S3).is_err());
    }

    #[test]
    fn client_settings_reach_object_store_keys() {
        let s = ClientSettings {
            timeout: Duration::from_secs(7),
            proxy: Some("http://proxy:3128".into()),
            proxy_excludes: Some("169.254.169.254,.internal".into()),
            ..Default::default()
        };
        let keys = s.client_config().expect("no file to read");
        assert!(keys.contains(&(ClientConfigKey::ReadTimeout, "7000ms".into())));
        assert!(keys.contains(&(ClientConfigKey::ConnectTimeout, "5000ms".into())));
        assert!(keys.contains(&(ClientConfigKey::ProxyUrl, "http://proxy:3128".into())));
        assert!(keys.contains(&(
            ClientConfigKey::ProxyExcludes,
            "169.254.169.254,.internal".into()
        )));
        assert_eq!(s.retry(Duration::from_secs(60)).max_retries, 10);
        let with_password = ClientSettings {
            proxy: Some("http://u:hunter2@proxy:3128".into()),
            ..Default::default()
        };
        let shown = format!("{with_password:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("proxy:3128"),
            "{shown}"
        );
        let missing = ClientSettings {
            proxy_ca_file: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        let e = missing.client_config().expect_err("no such file");
        assert!(format!("{e:#}").contains("/nonexistent/ca.pem"), "{e:#}");
    }
}
