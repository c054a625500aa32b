//! How much of an encrypted stanza is still plaintext, and sealing it
//! (`info`, `verify --reencrypt`; docs/encryption.md).
//!
//! Encryption switched on for an existing stanza seals what is written from
//! then on; the older objects stay readable as they are. `info` reads the
//! 16-byte header of each object to say how many are left; `verify
//! --reencrypt` rewrites those that stand alone (WAL contents, claims,
//! summaries, block references, gap marks, manifests, the stanza object,
//! results) sealed, each decoded and checked first and replaced in one put
//! with the same plaintext. Backup data objects are left as they are:
//! their files sit at offsets the manifests of this and later backups
//! record, which sealing would move; they go when their backups expire.

use serde::Serialize;

use super::codec::{self, Binding, EncodeOptions, Encoder};
use super::keys::decode_error;
use super::layout::{self, BackupObject};
use super::{ObjectMeta, PutMode, Repository};
use crate::error::{Error, Result};

/// How many objects (and bytes) of a stanza are sealed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SealingReport {
    pub objects: u64,
    pub bytes: u64,
    pub plaintext_objects: u64,
    pub plaintext_bytes: u64,
    /// Of those, backup data objects (`verify --reencrypt` leaves them).
    pub plaintext_backup_objects: u64,
}

/// Headers read at once.
const HEADER_READS: usize = 16;

impl Repository {
    /// The stanza's objects (its key objects and lock aside) and whether
    /// each is sealed.
    async fn objects_sealed(&self) -> Result<Vec<(ObjectMeta, bool)>> {
        use futures::stream::{self, StreamExt, TryStreamExt};
        let stanza = self.stanza();
        let keys_dir = format!("{}/", layout::keys_dir(stanza));
        let lock_dir = format!("{stanza}/lock/");
        let listed: Vec<ObjectMeta> = self
            .backend()
            .list(stanza)
            .await?
            .into_iter()
            .filter(|m| !m.key.starts_with(&keys_dir) && !m.key.starts_with(&lock_dir))
            .collect();
        stream::iter(listed)
            .map(|m| async move {
                let head = self
                    .backend()
                    .get_range(&m.key, 0..codec::HEADER_LEN as u64)
                    .await?;
                let sealed = head.as_deref().and_then(codec::is_sealed).unwrap_or(true);
                Ok::<_, Error>((m, sealed))
            })
            .buffer_unordered(HEADER_READS)
            .try_collect()
            .await
    }

    /// How much of the stanza is sealed: one 16-byte read per object.
    pub async fn sealing(&self) -> Result<SealingReport> {
        let mut r = SealingReport::default();
        let stanza = self.stanza().to_string();
        for (m, sealed) in self.objects_sealed().await? {
            r.objects += 1;
            r.bytes += m.size;
            if !sealed {
                r.plaintext_objects += 1;
                r.plaintext_bytes += m.size;
                if is_backup_data(&stanza, &m.key) {
                    r.plaintext_backup_objects += 1;
                }
            }
        }
        Ok(r)
    }

    /// Seals every plaintext object that stands alone (see the module
    /// doc); returns how many were sealed.
    pub async fn reencrypt(&self) -> Result<u64> {
        let keys = self.keys().await?;
        if !keys.encrypts() {
            return Err(Error::usage("--reencrypt needs the repository's key")
                .hint("set repo-cipher-type and the key (repo-cipher-key-file, repo-cipher-key-command or PGVAULT_REPO_CIPHER_KEY)"));
        }
        let stanza = self.stanza().to_string();
        let mut n = 0;
        for (m, sealed) in self.objects_sealed().await? {
            if sealed || is_backup_data(&stanza, &m.key) {
                continue;
            }
            self.seal_one(&m.key, &keys).await?;
            n += 1;
        }
        Ok(n)
    }

    /// Decodes `key` and writes it back sealed, its plaintext checked
    /// against its trailer before the put.
    async fn seal_one(&self, key: &str, keys: &codec::Keys) -> Result<()> {
        let what = format!("{}/{key}", self.describe());
        let Some(reader) = self.backend().get(key).await? else {
            return Ok(()); // expired meanwhile
        };
        let dir = key.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        let spool = self
            .backend()
            .spool(dir)
            .map_err(|e| self.backend().io_error(dir, e))?;
        let (keys2, key2, what2) = (keys.clone(), key.to_string(), what.clone());
        let spool = tokio::task::spawn_blocking(move || -> Result<_> {
            let bind = Binding::object(layout::binding_name(&key2));
            let write_err = |e: std::io::Error| Error::repository(format!("seal {what2}: {e}"));
            let enc =
                Encoder::new(spool, EncodeOptions::default(), &keys2, bind).map_err(write_err)?;
            let mut enc = enc;
            codec::decode(reader, &mut enc, &keys2, bind).map_err(|e| decode_error(&what2, e))?;
            Ok(enc.finish().map_err(write_err)?.0)
        })
        .await??;
        self.backend()
            .commit(spool, key, PutMode::Overwrite)
            .await
            .map_err(|e| e.context(format!("seal {what}")))?;
        Ok(())
    }
}

fn is_backup_data(stanza: &str, key: &str) -> bool {
    matches!(
        layout::parse_backup_key(stanza, key),
        Some((_, BackupObject::Data))
    )
}
