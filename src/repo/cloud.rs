//! A repository in object storage (S3, Google Cloud Storage, Azure Blob
//! Storage), through `object_store`: one backend over `dyn ObjectStore`;
//! `s3.rs`, `gcs.rs` and `azure.rs` only build the store from each cloud's
//! options and environment.
//!
//! Create-if-absent and update-if-unchanged use each store's conditional
//! writes (S3 `If-None-Match: *` / `If-Match`, GCS `ifGenerationMatch`,
//! Azure `If-None-Match: *` / `If-Match`). Many S3-compatible stores and
//! some emulators ignore them or check them non-atomically; with
//! `s3-atomic-create = false` the callers add their own conflict detection
//! (see `repo::archive`).

use std::io::{self, Read};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path as OsPath;
use object_store::{
    GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode as OsPutMode, PutMultipartOptions,
    PutOptions, PutPayload, UpdateVersion, WriteMultipart,
};
use tokio::sync::mpsc;

use super::backend::{
    check_range, delete_each, Backend, ObjectMeta, ObjectReader, ObjectVersion, PutMode,
    PutOutcome, PutResult, RawRead, Spool,
};
use super::s3::S3Options;
use super::storeopts::StorageClasses;
use super::throttle::Throttle;
use crate::error::{Error, Result};

/// Which cloud a [`CloudBackend`] talks to: its URL scheme and its hints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloud {
    S3,
    Gcs,
    Azure,
}

impl Cloud {
    fn scheme(self) -> &'static str {
        match self {
            Cloud::S3 => "s3",
            Cloud::Gcs => "gs",
            Cloud::Azure => "az",
        }
    }

    fn credentials_hint(self) -> &'static str {
        match self {
            Cloud::S3 => "check the S3 credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or s3-access-key-id/s3-secret-access-key)",
            Cloud::Gcs => "check the GCS credentials (GOOGLE_APPLICATION_CREDENTIALS, GOOGLE_SERVICE_ACCOUNT or gcs-key-file)",
            Cloud::Azure => "check the Azure credentials (AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_KEY, a managed identity, or azure-key)",
        }
    }

    fn endpoint_hint(self) -> &'static str {
        match self {
            Cloud::S3 => "check the S3 endpoint (AWS_ENDPOINT or s3-endpoint) and that it is reachable",
            Cloud::Gcs => "check the GCS endpoint (gcs-endpoint) and that it is reachable",
            Cloud::Azure => "check the Azure endpoint (azure-endpoint, or the account name) and that it is reachable",
        }
    }
}

#[derive(Debug, Clone)]
pub struct CloudBackend {
    store: Arc<dyn ObjectStore>,
    cloud: Cloud,
    bucket: String,
    prefix: String,
    atomic_create: bool,
    /// Whether `delete_many` uses the store's bulk deletion.
    pub(crate) bulk_delete: bool,
    /// Conditional puts rejected as not implemented (`AWS_CONDITIONAL_PUT=disabled`).
    conditional_disabled: Arc<AtomicBool>,
    /// The storage class of each kind of object written.
    classes: StorageClasses,
    /// The bandwidth limit every transfer of this backend (and its clones:
    /// every worker of the command) draws from.
    throttle: Option<Arc<Throttle>>,
}

const PART_SIZE: usize = 8 << 20;

const TIMEOUT_HINT: &str = "the store did not answer in time: check that it is reachable (and the proxy, storage-proxy), or raise storage-timeout";

impl CloudBackend {
    /// A backend over a store built by `s3.rs`, `gcs.rs` or `azure.rs`;
    /// `bucket` is the bucket or container, for messages.
    pub(crate) fn from_store(
        store: Arc<dyn ObjectStore>,
        cloud: Cloud,
        bucket: &str,
        prefix: &str,
        atomic_create: bool,
    ) -> Self {
        CloudBackend {
            store,
            cloud,
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            atomic_create,
            bulk_delete: true,
            conditional_disabled: Arc::new(AtomicBool::new(false)),
            classes: StorageClasses::default(),
            throttle: None,
        }
    }

    /// A backend over a store that `s3.rs`, `gcs.rs` or `azure.rs` built
    /// from `opts`, with what applies to every store: the storage classes
    /// (checked against the cloud's names) and the bandwidth limit.
    pub(crate) fn configured(
        store: Arc<dyn ObjectStore>,
        cloud: Cloud,
        bucket: &str,
        prefix: &str,
        opts: &S3Options,
    ) -> Result<Self> {
        opts.storage_class.check(cloud)?;
        let mut b = CloudBackend::from_store(store, cloud, bucket, prefix, opts.atomic_create);
        b.classes = opts.storage_class.clone();
        b.throttle = opts.bandwidth_limit.map(|r| Arc::new(Throttle::new(r)));
        Ok(b)
    }

    /// Waits, under a bandwidth limit, until `n` more bytes may move.
    async fn pace(&self, n: usize) {
        if let Some(t) = &self.throttle {
            t.take(n).await;
        }
    }

    fn path(&self, key: &str) -> OsPath {
        if self.prefix.is_empty() {
            OsPath::from(key)
        } else {
            OsPath::from(format!("{}/{}", self.prefix, key))
        }
    }

    fn strip(&self, p: &OsPath) -> String {
        let s = p.as_ref();
        if self.prefix.is_empty() {
            s.to_string()
        } else {
            s.strip_prefix(&self.prefix)
                .map(|r| r.trim_start_matches('/'))
                .unwrap_or(s)
                .to_string()
        }
    }

    fn err(&self, what: &str, key: &str, e: object_store::Error) -> Error {
        let text = clean(&e);
        let mut err = Error::repository(format!("{what} {}/{key}: {text}", self.describe()));
        if text.contains("operation timed out") {
            err = err.hint(TIMEOUT_HINT);
        } else if text.contains("401")
            || text.contains("403")
            || text.contains("InvalidAccessKeyId")
            || text.contains("SignatureDoesNotMatch")
            || text.contains("AuthenticationFailed")
        {
            err = err.hint(self.cloud.credentials_hint());
        } else if text.contains("error sending request") || text.contains("connect") {
            err = err.hint(self.cloud.endpoint_hint());
        }
        err
    }

    async fn put_payload(
        &self,
        key: &str,
        payload: PutPayload,
        mode: PutMode,
    ) -> Result<PutResult> {
        let path = self.path(key);
        let conditional = mode != PutMode::Overwrite;
        if conditional && self.conditional_disabled.load(Ordering::Relaxed) {
            return self.put_unconditionally(key, payload, mode).await;
        }
        let os_mode = match &mode {
            PutMode::Overwrite => OsPutMode::Overwrite,
            PutMode::CreateNew => OsPutMode::Create,
            PutMode::Update(v) => OsPutMode::Update(UpdateVersion {
                e_tag: v.e_tag.clone(),
                version: v.version.clone(),
            }),
        };
        let opts = PutOptions {
            mode: os_mode,
            attributes: self.classes.attributes(key),
            ..Default::default()
        };
        self.pace(payload.content_length()).await;
        match self.store.put_opts(&path, payload.clone(), opts).await {
            Ok(r) => Ok(PutResult::Written(version(r.e_tag, r.version))),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(PutResult::Refused),
            Err(object_store::Error::NotImplemented { .. }) if conditional => {
                // The store was configured without conditional puts: fall
                // back to a plain PUT; callers detect conflicts themselves.
                self.conditional_disabled.store(true, Ordering::Relaxed);
                self.put_unconditionally(key, payload, mode).await
            }
            Err(e) => Err(self.err("write", key, e)),
        }
    }

    /// A conditional put on a store without conditional puts: check, then
    /// write. Not atomic ([`Backend::atomic_create`] says so, and
    /// [`Backend::put_versioned`] reads back), but it never replaces an
    /// object that was already there when the check ran.
    async fn put_unconditionally(
        &self,
        key: &str,
        payload: PutPayload,
        mode: PutMode,
    ) -> Result<PutResult> {
        let path = self.path(key);
        let current = match self.store.head(&path).await {
            Ok(meta) => Some(version(meta.e_tag, meta.version)),
            Err(object_store::Error::NotFound { .. }) => None,
            Err(e) => return Err(self.err("check", key, e)),
        };
        let allowed = match &mode {
            PutMode::Overwrite => true,
            PutMode::CreateNew => current.is_none(),
            PutMode::Update(v) => current.as_ref().is_some_and(|c| c.e_tag == v.e_tag),
        };
        if !allowed {
            return Ok(PutResult::Refused);
        }
        let opts = PutOptions {
            attributes: self.classes.attributes(key),
            ..Default::default()
        };
        self.store
            .put_opts(&path, payload, opts)
            .await
            .map(|r| PutResult::Written(version(r.e_tag, r.version)))
            .map_err(|e| self.err("write", key, e))
    }

    /// Streams a GET's body into a channel that a blocking reader drains.
    fn stream(&self, key: &str, res: object_store::GetResult) -> ObjectReader {
        let mut stream = res.into_stream();
        // A small bounded channel: memory stays at a few chunks whatever the
        // object size, and the blocking consumer applies back-pressure.
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
        let what = format!("{}/{key}", self.describe());
        let throttle = self.throttle.clone();
        tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                if let (Some(t), Ok(chunk)) = (&throttle, &item) {
                    t.take(chunk.len()).await;
                }
                let item =
                    item.map_err(|e| io::Error::other(format!("read {what}: {}", clean(&e))));
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    break;
                }
            }
        });
        Box::new(ChannelReader {
            rx,
            current: Bytes::new(),
        })
    }
}

/// An object's version as the store reports it (e-tag, version id).
fn version(e_tag: Option<String>, version: Option<String>) -> ObjectVersion {
    ObjectVersion { e_tag, version }
}

/// object_store's messages can be long and nested; keep them to one line,
/// with the causes it does not show itself ("error sending request" says
/// nothing; "operation timed out" or "connection refused" below it does).
pub(crate) fn clean(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text.replace('\n', " ")
}

#[async_trait]
impl Backend for CloudBackend {
    fn spool(&self, _dir: &str) -> io::Result<Spool> {
        Ok(Spool::Memory(Vec::new()))
    }

    async fn commit(&self, spool: Spool, key: &str, mode: PutMode) -> Result<PutOutcome> {
        match spool {
            Spool::Memory(v) => Ok(
                match self
                    .put_payload(key, PutPayload::from(Bytes::from(v)), mode)
                    .await?
                {
                    PutResult::Written(_) => PutOutcome::Created,
                    PutResult::Refused => PutOutcome::AlreadyExists,
                },
            ),
            Spool::Spilled(f) => {
                let file = f
                    .into_inner()
                    .map_err(|e| self.io_error(key, e.into_error()))?;
                let file = file.reopen().map_err(|e| self.io_error(key, e))?;
                // Large objects: a multipart upload becomes visible only
                // when completed, so readers still never see a partial one.
                // It cannot be conditional: the caller's conflict detection
                // covers it (WAL keys carry the content's checksum).
                let opts = PutMultipartOptions {
                    attributes: self.classes.attributes(key),
                    ..Default::default()
                };
                let upload = self
                    .store
                    .put_multipart_opts(&self.path(key), opts)
                    .await
                    .map_err(|e| self.err("start upload of", key, e))?;
                let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
                let mut file = Some(file);
                loop {
                    // Read the spilled file off the runtime, one part at a time.
                    let mut f = file.take().expect("file is put back after every read");
                    let (f, chunk) = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; PART_SIZE];
                        let mut filled = 0;
                        while filled < buf.len() {
                            let n = f.read(&mut buf[filled..])?;
                            if n == 0 {
                                break;
                            }
                            filled += n;
                        }
                        buf.truncate(filled);
                        Ok::<_, io::Error>((f, buf))
                    })
                    .await?
                    .map_err(|e| self.io_error(key, e))?;
                    file = Some(f);
                    if chunk.is_empty() {
                        break;
                    }
                    w.wait_for_capacity(2)
                        .await
                        .map_err(|e| self.err("upload", key, e))?;
                    self.pace(chunk.len()).await;
                    w.put(Bytes::from(chunk));
                }
                w.finish()
                    .await
                    .map_err(|e| self.err("complete upload of", key, e))?;
                Ok(PutOutcome::Created)
            }
            Spool::LocalFile { .. } => Err(Error::internal(
                "object-store repository given a local spool",
            )),
        }
    }

    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<PutResult> {
        self.put_payload(key, PutPayload::from(data), mode).await
    }

    fn atomic_create(&self) -> bool {
        self.atomic_create && !self.conditional_disabled.load(Ordering::Relaxed)
    }

    async fn open(
        &self,
        key: &str,
        from: u64,
        pin: Option<&ObjectVersion>,
    ) -> Result<Option<RawRead>> {
        let opts = GetOptions {
            range: (from > 0).then_some(GetRange::Offset(from)),
            if_match: pin.and_then(|p| p.e_tag.clone()),
            ..Default::default()
        };
        let res = match self.store.get_opts(&self.path(key), opts).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            // Replaced since the pinned read began.
            Err(object_store::Error::Precondition { .. }) if pin.is_some() => return Ok(None),
            Err(e) => {
                // A read from past the end is refused by the store; say so
                // in the words of the other backends.
                if from > 0 {
                    if let Ok(meta) = self.store.head(&self.path(key)).await {
                        let what = format!("{}/{key}", self.describe());
                        check_range(&what, &(from..from), meta.size)?;
                    }
                }
                return Err(self.err("read", key, e));
            }
        };
        let size = res.meta.size;
        let pin = version(res.meta.e_tag.clone(), res.meta.version.clone());
        Ok(Some(RawRead {
            reader: self.stream(key, res),
            size,
            pin: Some(pin),
        }))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Option<Bytes>> {
        let what = format!("{}/{key}", self.describe());
        let path = self.path(key);
        if range.is_empty() {
            // S3 cannot express an empty range: only check the object.
            return match self.store.head(&path).await {
                Ok(meta) => check_range(&what, &range, meta.size).map(|_| Some(Bytes::new())),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.err("check", key, e)),
            };
        }
        let opts = GetOptions {
            range: Some(GetRange::Bounded(range.clone())),
            ..Default::default()
        };
        let res = match self.store.get_opts(&path, opts).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => {
                // A range past the end is refused by the store; say so in
                // the words of the other backends.
                if let Ok(meta) = self.store.head(&path).await {
                    check_range(&what, &range, meta.size)?;
                }
                return Err(self.err("read", key, e));
            }
        };
        check_range(&what, &range, res.meta.size)?;
        // object_store resumes a body that breaks off (ranged, pinned to the
        // e-tag), within its retry budget.
        let bytes = res.bytes().await.map_err(|e| self.err("read", key, e))?;
        self.pace(bytes.len()).await;
        if bytes.len() as u64 != range.end - range.start {
            return Err(Error::repository(format!(
                "read {what} bytes {range:?}: got {} bytes",
                bytes.len()
            )));
        }
        Ok(Some(bytes))
    }

    async fn get_versioned(&self, key: &str) -> Result<Option<(Vec<u8>, ObjectVersion)>> {
        let res = match self.store.get(&self.path(key)).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err("read", key, e)),
        };
        let v = version(res.meta.e_tag.clone(), res.meta.version.clone());
        let bytes = res.bytes().await.map_err(|e| self.err("read", key, e))?;
        self.pace(bytes.len()).await;
        Ok(Some((bytes.to_vec(), v)))
    }

    async fn list(&self, dir: &str) -> Result<Vec<ObjectMeta>> {
        let prefix = self.path(dir);
        let mut stream = self.store.list(Some(&prefix));
        let mut out = Vec::new();
        while let Some(item) = stream.next().await {
            let meta = item.map_err(|e| self.err("list", dir, e))?;
            out.push(ObjectMeta {
                key: self.strip(&meta.location),
                size: meta.size,
                modified: Some(meta.last_modified.into()),
            });
        }
        Ok(out)
    }

    async fn list_dirs(&self, dir: &str) -> Result<Vec<String>> {
        let listed = self
            .store
            .list_with_delimiter(Some(&self.path(dir)))
            .await
            .map_err(|e| self.err("list", dir, e))?;
        let mut out: Vec<String> = listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_string))
            .collect();
        out.sort();
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<()> {
        match self.store.delete(&self.path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("delete", key, e)),
        }
    }

    async fn delete_many(&self, keys: &[String]) -> Result<()> {
        if !self.bulk_delete {
            return delete_each(self, keys).await;
        }
        // DeleteObjects takes 1,000 keys per request; object_store sends up
        // to 20 such requests at once, which bounds the parallelism.
        let paths: Vec<object_store::Result<OsPath>> =
            keys.iter().map(|k| Ok(self.path(k))).collect();
        let results: Vec<object_store::Result<OsPath>> = self
            .store
            .delete_stream(futures::stream::iter(paths).boxed())
            .collect()
            .await;
        let failed = results
            .iter()
            .any(|r| !matches!(r, Ok(_) | Err(object_store::Error::NotFound { .. })));
        if failed {
            // A batch that failed as a whole does not say which of its keys
            // were deleted: delete them one by one, which is idempotent.
            log::debug!(
                "{}: bulk delete failed; deleting {} objects one by one",
                self.describe(),
                keys.len()
            );
            return delete_each(self, keys).await;
        }
        Ok(())
    }

    async fn ensure_durable(&self, keys: &[String]) -> Result<()> {
        // A completed PUT is durable on an object store; what is left to
        // check is that the objects are there.
        for key in keys {
            match self.store.head(&self.path(key)).await {
                Ok(_) => {}
                Err(object_store::Error::NotFound { .. }) => {
                    return Err(Error::repository(format!(
                        "{}/{key} is missing",
                        self.describe()
                    )))
                }
                Err(e) => return Err(self.err("check", key, e)),
            }
        }
        Ok(())
    }

    fn describe(&self) -> String {
        let scheme = self.cloud.scheme();
        if self.prefix.is_empty() {
            format!("{scheme}://{}", self.bucket)
        } else {
            format!("{scheme}://{}/{}", self.bucket, self.prefix)
        }
    }

    fn clone_arc(&self) -> Arc<dyn Backend> {
        Arc::new(self.clone())
    }
}

/// Adapts the async chunk stream to a blocking `Read`.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.current = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = self.current.len().min(out.len());
        out[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}
