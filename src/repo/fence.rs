//! Stops the writes of a process that lost the stanza lock.
//!
//! A lock on an object store is a lease: a holder paused past its expiry
//! (SIGSTOP, a VM freeze, a partition) may find that someone else took the
//! lock meanwhile. Every backend of a [`super::Repository`] is wrapped in a
//! [`Fenced`] backend whose writes (commit, put, delete) first ask the
//! [`Gate`]; while a lock is held, the gate asks the lock whether it is
//! still ours (see `lock.rs`: cheap while renewals succeed, a conditional
//! renewal when the last one is too old) and refuses the write with an error
//! naming the new holder when it is not. Commands therefore stop before
//! they write anything more, without each having to remember to ask; they
//! can still ask at the start of a phase with `Lock::check`.
//!
//! This narrows the window to one write begun just before the pause; only
//! a store that checks a fencing token itself could close it, and S3 has
//! none.

use std::fmt;
use std::io;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;

use super::backend::{
    Backend, ObjectMeta, ObjectVersion, PutMode, PutOutcome, PutResult, RawRead, Spool,
};
use crate::error::Result;

/// What a held lock does before each write.
#[async_trait]
pub trait Guard: Send + Sync {
    /// Ok while the lock is ours; the error names the new holder otherwise.
    /// `what` names the object about to be written.
    async fn before_write(&self, what: &str) -> Result<()>;
}

/// Where the held lock (if any) is found, shared by every clone of a
/// repository and its backend.
#[derive(Default)]
pub struct Gate {
    guard: Mutex<Option<Arc<dyn Guard>>>,
}

impl fmt::Debug for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let held = self.guard.lock().map(|g| g.is_some()).unwrap_or(false);
        write!(f, "Gate {{ held: {held} }}")
    }
}

impl Gate {
    pub fn set(&self, guard: Arc<dyn Guard>) {
        if let Ok(mut g) = self.guard.lock() {
            *g = Some(guard);
        }
    }

    /// Removes `guard` if it is the one installed.
    pub fn clear(&self, guard: &Arc<dyn Guard>) {
        if let Ok(mut g) = self.guard.lock() {
            if g.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, guard)) {
                *g = None;
            }
        }
    }

    pub async fn check(&self, what: &str) -> Result<()> {
        let guard = self.guard.lock().ok().and_then(|g| g.clone());
        match guard {
            Some(g) => g.before_write(what).await,
            None => Ok(()),
        }
    }
}

/// A backend whose writes pass the [`Gate`] first.
#[derive(Debug, Clone)]
pub struct Fenced {
    inner: Arc<dyn Backend>,
    gate: Arc<Gate>,
}

impl Fenced {
    pub fn new(inner: Arc<dyn Backend>, gate: Arc<Gate>) -> Self {
        Fenced { inner, gate }
    }

    fn what(&self, key: &str) -> String {
        format!("{}/{key}", self.inner.describe())
    }
}

#[async_trait]
impl Backend for Fenced {
    fn spool(&self, dir: &str) -> io::Result<Spool> {
        self.inner.spool(dir)
    }

    async fn commit(&self, spool: Spool, key: &str, mode: PutMode) -> Result<PutOutcome> {
        // Refused: the spool is dropped, and with it its temporary file.
        self.gate.check(&self.what(key)).await?;
        self.inner.commit(spool, key, mode).await
    }

    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<PutResult> {
        self.gate.check(&self.what(key)).await?;
        self.inner.put(key, data, mode).await
    }

    fn atomic_create(&self) -> bool {
        self.inner.atomic_create()
    }

    async fn open(
        &self,
        key: &str,
        from: u64,
        pin: Option<&ObjectVersion>,
    ) -> Result<Option<RawRead>> {
        self.inner.open(key, from, pin).await
    }

    async fn get_range(&self, key: &str, range: std::ops::Range<u64>) -> Result<Option<Bytes>> {
        self.inner.get_range(key, range).await
    }

    async fn get_versioned(&self, key: &str) -> Result<Option<(Vec<u8>, ObjectVersion)>> {
        self.inner.get_versioned(key).await
    }

    async fn list(&self, dir: &str) -> Result<Vec<ObjectMeta>> {
        self.inner.list(dir).await
    }

    async fn list_dirs(&self, dir: &str) -> Result<Vec<String>> {
        self.inner.list_dirs(dir).await
    }

    async fn list_leftovers(&self, dir: &str) -> Result<Vec<ObjectMeta>> {
        self.inner.list_leftovers(dir).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.gate.check(&self.what(key)).await?;
        self.inner.delete(key).await
    }

    async fn delete_many(&self, keys: &[String]) -> Result<()> {
        let first = keys.first().map(String::as_str).unwrap_or("");
        self.gate.check(&self.what(first)).await?;
        self.inner.delete_many(keys).await
    }

    async fn ensure_durable(&self, keys: &[String]) -> Result<()> {
        self.inner.ensure_durable(keys).await
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn clone_arc(&self) -> Arc<dyn Backend> {
        Arc::new(self.clone())
    }
}
