//! The key objects of an encrypted stanza, and where the master key comes
//! from (docs/encryption.md).
//!
//! `<stanza>/keys/<id>.key` holds the stanza's data keys wrapped by the
//! master key `<id>` (an HKDF of the key: the key itself is never stored).
//! Several master keys can open a stanza at once, one key object each;
//! adding one writes its object, retiring one deletes it. Data objects name
//! only the data key they were sealed with, so neither touches them.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::codec::{self, Binding, EncodeOptions, Keys};
use super::crypt::{DataKey, KeyId, Keyring, MasterKey, OpenError};
use super::{layout, PutMode, PutOutcome, Repository};
use crate::error::{Error, Result};

pub const KEY_OBJECT_FORMAT: u32 = 1;

/// Where the master key comes from. Its `Debug` shows where, never what.
pub enum KeySource {
    File(PathBuf),
    /// The value of `PGVAULT_REPO_CIPHER_KEY` (or the file's `repo-cipher-key`).
    Value(Zeroizing<Vec<u8>>),
    /// A shell command printing the key on its standard output.
    Command(String),
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::File(p) => write!(f, "File({})", p.display()),
            KeySource::Value(_) => f.write_str("Value(…)"),
            KeySource::Command(c) => write!(f, "Command({c:?})"),
        }
    }
}

impl KeySource {
    fn describe(&self) -> String {
        match self {
            KeySource::File(p) => format!("repo-cipher-key-file {}", p.display()),
            KeySource::Value(_) => "PGVAULT_REPO_CIPHER_KEY".to_string(),
            KeySource::Command(c) => format!("repo-cipher-key-command {c:?}"),
        }
    }

    /// Reads the key. A command's standard output is the key; its standard
    /// error goes to ours; nothing of the key is passed on a command line.
    pub async fn load(&self) -> Result<MasterKey> {
        let what = self.describe();
        let raw = match self {
            KeySource::File(p) => tokio::fs::read(p).await.map_err(|e| {
                Error::key(format!("read the key file {}: {e}", p.display()))
                    .hint("repo-cipher-key-file names a file holding the repository's key")
            })?,
            KeySource::Value(v) => v.to_vec(),
            KeySource::Command(c) => {
                let out = tokio::process::Command::new("/bin/sh")
                    .arg("-c")
                    .arg(c)
                    .stdin(std::process::Stdio::null())
                    .stderr(std::process::Stdio::inherit())
                    .output()
                    .await
                    .map_err(|e| Error::key(format!("run {what}: {e}")))?;
                if !out.status.success() {
                    return Err(Error::key(format!("{what} failed ({})", out.status))
                        .hint("the command must print the key on its standard output and exit 0"));
                }
                out.stdout
            }
        };
        MasterKey::from_bytes(raw, &what).map_err(|e| {
            Error::key(e.to_string()).hint(
                "a key is one line of at least 32 bytes: `openssl rand -base64 48 > key` makes one",
            )
        })
    }
}

/// `repo-cipher-type` and the key it needs.
#[derive(Debug, Default)]
pub enum CipherSetting {
    #[default]
    None,
    Sealed(KeySource),
}

/// A repository's cipher: the setting, and the keys once loaded.
#[derive(Debug, Default)]
pub struct Cipher {
    setting: CipherSetting,
    keys: tokio::sync::OnceCell<Keys>,
}

impl Cipher {
    pub fn new(setting: CipherSetting) -> Cipher {
        Cipher {
            setting,
            keys: tokio::sync::OnceCell::new(),
        }
    }
}

/// The error of an object that could not be opened for want of the right
/// key: one line naming it, and what to do.
pub fn key_error(what: &str, e: &OpenError) -> Error {
    Error::key(format!("{what}: {e}")).hint(e.hint())
}

/// An object that could not be decoded, as an error: a key problem with
/// its hint, anything else a repository error naming the object (`what`).
pub fn decode_error(what: &str, e: codec::CodecError) -> Error {
    match e.key_problem() {
        Some(k) => key_error(what, k),
        None => Error::repository(format!("{what}: {e}")),
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct KeyObject {
    format: u32,
    master_key: String,
    created_at: String,
    data_keys: Vec<WrappedKey>,
}

#[derive(Debug, Serialize, Deserialize)]
struct WrappedKey {
    id: String,
    nonce: String,
    wrapped: String,
}

/// One key object as `key list` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct KeyListing {
    pub id: String,
    pub created_at: String,
    pub data_keys: usize,
    /// The master key this process is configured with.
    pub configured: bool,
}

impl Repository {
    /// The keys objects are sealed and opened with: none without
    /// `repo-cipher-type`, else the data keys the configured master key
    /// unwraps from its key object (read once per process).
    pub async fn keys(&self) -> Result<Keys> {
        self.cipher
            .keys
            .get_or_try_init(|| self.load_keys())
            .await
            .cloned()
    }

    /// With encryption configured: that the configured key unwraps the
    /// stanza's data keys, and that an object sealed with them opens again
    /// (`check`). Returns the key's id.
    pub async fn prove_key(&self) -> Result<Option<String>> {
        if !self.encryption_configured() {
            return Ok(None);
        }
        let keys = self.keys().await?;
        let ring = keys
            .keyring()
            .ok_or_else(|| Error::internal("encryption configured and no keyring loaded"))?;
        let probe = b"pgvault check: the key seals and opens";
        let bind = Binding::object("check");
        let sealed = codec::encode_bytes(probe, EncodeOptions::default(), &keys, bind)
            .map_err(|e| Error::internal(format!("seal a probe: {e}")))?;
        match codec::decode_bytes(&sealed, &keys, bind) {
            Ok(back) if back == probe => Ok(Some(ring.master().to_hex())),
            Ok(_) => Err(Error::key(
                "a probe sealed with the stanza's key opened to other bytes",
            )),
            Err(e) => Err(Error::key(format!(
                "a probe sealed with the stanza's key: {e}"
            ))),
        }
    }

    /// Whether `repo-cipher-type` asks for encryption.
    pub fn encryption_configured(&self) -> bool {
        matches!(self.cipher.setting, CipherSetting::Sealed(_))
    }

    /// The configured master key; an error without one.
    pub async fn master_key(&self) -> Result<MasterKey> {
        match &self.cipher.setting {
            CipherSetting::None => Err(Error::key("no repository key is configured")
                .hint("set repo-cipher-type and repo-cipher-key-file (or PGVAULT_REPO_CIPHER_KEY, or repo-cipher-key-command)")),
            CipherSetting::Sealed(source) => source.load().await,
        }
    }

    async fn load_keys(&self) -> Result<Keys> {
        if let CipherSetting::None = self.cipher.setting {
            return Ok(Keys::none());
        }
        let master = self.master_key().await?;
        if let Some(ring) = self.unwrap_keys(&master).await? {
            return Ok(Keys::with(ring));
        }
        let ids = self.key_ids().await?;
        let stanza = self.stanza();
        Err(if ids.is_empty() {
            Error::key(format!(
                "stanza {stanza:?} in {} has no encryption key yet",
                self.describe()
            ))
            .hint("run `pgvault stanza-create` (a new stanza) or `pgvault key add` (to encrypt an existing one) with this key configured")
        } else {
            Error::key(format!(
                "the configured key ({}) is not a key of stanza {stanza:?} in {} (its keys: {})",
                master.id(),
                self.describe(),
                ids.join(", ")
            ))
            .hint("configure one of its keys (`pgvault key list` shows them), or add this one with `pgvault key add`")
        })
    }

    /// The ids of the stanza's master keys, from its key objects' names.
    pub async fn key_ids(&self) -> Result<Vec<String>> {
        let dir = layout::keys_dir(self.stanza());
        let mut ids: Vec<String> = self
            .backend()
            .list(&dir)
            .await?
            .into_iter()
            .filter_map(|m| {
                let name = m.key.rsplit('/').next()?;
                let id = name.strip_suffix(layout::KEY_SUFFIX)?;
                KeyId::from_hex(id).map(|_| id.to_string())
            })
            .collect();
        ids.sort();
        Ok(ids)
    }

    async fn read_key_object(&self, id: &str) -> Result<Option<KeyObject>> {
        let key = layout::key_object_key(self.stanza(), id);
        let Some(raw) = self.backend().get_bytes(&key).await? else {
            return Ok(None);
        };
        let what = format!("{}/{key}", self.describe());
        let bytes = codec::decode_bytes(&raw, &Keys::none(), Binding::object(&key))
            .map_err(|e| Error::key(format!("{what}: {e}")))?;
        let obj: KeyObject = serde_json::from_slice(&bytes)
            .map_err(|e| Error::key(format!("{what}: unreadable key object: {e}")))?;
        if obj.format > KEY_OBJECT_FORMAT {
            return Err(Error::key(format!(
                "{what}: written by a newer pgvault (format {})",
                obj.format
            )));
        }
        Ok(Some(obj))
    }

    /// The data keys `master` unwraps from its key object; `None` when the
    /// stanza has no key object for it.
    async fn unwrap_keys(&self, master: &MasterKey) -> Result<Option<Keyring>> {
        let id = master.id().to_hex();
        let Some(obj) = self.read_key_object(&id).await? else {
            return Ok(None);
        };
        let what = format!(
            "{}/{}",
            self.describe(),
            layout::key_object_key(self.stanza(), &id)
        );
        let mut data = Vec::new();
        for w in &obj.data_keys {
            let parsed = (|| {
                let id = KeyId::from_hex(&w.id)?;
                let nonce: [u8; 24] = hex::decode(&w.nonce).ok()?.try_into().ok()?;
                let wrapped = hex::decode(&w.wrapped).ok()?;
                master.unwrap(id, &nonce, &wrapped)
            })();
            let Some(dk) = parsed else {
                return Err(Error::key(format!(
                    "{what}: data key {} does not unwrap with the configured key",
                    w.id
                ))
                .hint("the key object is damaged or was replaced: restore it from a copy, or open the stanza with another of its keys"));
            };
            data.push(dk);
        }
        Ok(Keyring::new(master.id(), data))
    }

    async fn write_key_object(&self, master: &MasterKey, data: &[DataKey]) -> Result<PutOutcome> {
        let obj = KeyObject {
            format: KEY_OBJECT_FORMAT,
            master_key: master.id().to_hex(),
            created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            data_keys: data
                .iter()
                .map(|dk| {
                    let (nonce, wrapped) = master.wrap(dk);
                    WrappedKey {
                        id: dk.id().to_hex(),
                        nonce: hex::encode(nonce),
                        wrapped: hex::encode(wrapped),
                    }
                })
                .collect(),
        };
        let key = layout::key_object_key(self.stanza(), &master.id().to_hex());
        let json = serde_json::to_vec_pretty(&obj)
            .map_err(|e| Error::internal(format!("serialize {key}: {e}")))?;
        // The key object is not sealed (it is what unseals): its data keys
        // are wrapped, its other fields are ids and a date.
        let bytes = codec::encode_bytes(
            &json,
            EncodeOptions::default(),
            &Keys::none(),
            Binding::object(&key),
        )
        .map_err(|e| Error::internal(format!("encode {key}: {e}")))?;
        self.backend()
            .put_bytes(&key, bytes, PutMode::CreateNew)
            .await
    }

    /// Makes the stanza encrypted from now on, with a new data key wrapped
    /// by the configured master key, unless it has keys already. Returns
    /// whether it made them.
    pub async fn init_keys(&self) -> Result<bool> {
        let master = self.master_key().await?;
        if !self.key_ids().await?.is_empty() {
            return Ok(false);
        }
        self.write_key_object(&master, &[DataKey::generate()])
            .await?;
        if !self.backend().atomic_create() {
            // Another process initialising at the same moment may have
            // written the object: use what is stored.
            tokio::time::sleep(super::backend::SETTLE).await;
        }
        Ok(true)
    }

    /// Rewrites the stanza object sealed, when the stanza exists (after
    /// encryption was turned on for it): every process must read it first,
    /// so one left without the key fails at once instead of writing
    /// plaintext into an encrypted stanza.
    pub async fn seal_stanza_object(&self) -> Result<()> {
        let lock = self.lock("key add").await?;
        let done = async {
            if let Some(info) = self.read_stanza().await? {
                self.replace_stanza(&info).await?;
            }
            Ok(())
        }
        .await;
        lock.release().await?;
        done
    }

    /// Wraps the stanza's data keys with `new` too (`key add`): only a new
    /// small key object is written.
    pub async fn add_master_key(&self, new: &MasterKey) -> Result<PutOutcome> {
        let keys = self.keys().await?;
        let ring = keys.keyring().ok_or_else(|| {
            Error::key("the stanza is not encrypted: no key to wrap")
                .hint("set repo-cipher-type and the stanza's key first")
        })?;
        self.write_key_object(new, ring.data_keys()).await
    }

    /// The stanza's key objects (`key list`).
    pub async fn list_master_keys(&self) -> Result<Vec<KeyListing>> {
        let configured = match &self.cipher.setting {
            CipherSetting::None => None,
            CipherSetting::Sealed(_) => Some(self.master_key().await?.id().to_hex()),
        };
        let mut out = Vec::new();
        for id in self.key_ids().await? {
            let Some(obj) = self.read_key_object(&id).await? else {
                continue;
            };
            out.push(KeyListing {
                configured: configured.as_deref() == Some(&id),
                id,
                created_at: obj.created_at,
                data_keys: obj.data_keys.len(),
            });
        }
        Ok(out)
    }

    /// Deletes the key object of master key `id` (`key retire`): that key
    /// no longer opens the stanza. Refuses the configured key (a command
    /// could not open the stanza afterwards) and the last key.
    pub async fn retire_master_key(&self, id: &str) -> Result<()> {
        let configured = self.master_key().await?.id().to_hex();
        let ids = self.key_ids().await?;
        if !ids.iter().any(|i| i == id) {
            return Err(Error::usage(format!(
                "stanza {:?} has no key {id} (its keys: {})",
                self.stanza(),
                ids.join(", ")
            )));
        }
        if id == configured {
            return Err(Error::usage(format!(
                "key {id} is the configured key: retiring it would lock this command out"
            ))
            .hint("configure another of the stanza's keys first (`pgvault key add` makes one), then retire this one"));
        }
        // The configured key must open the stanza before another goes.
        self.keys().await?;
        let key = layout::key_object_key(self.stanza(), id);
        self.backend().delete(&key).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Kind;

    fn sealed(dir: &std::path::Path, key: &str) -> Repository {
        let source = KeySource::Value(Zeroizing::new(key.as_bytes().to_vec()));
        Repository::local_for_tests(dir, "s").with_cipher(CipherSetting::Sealed(source))
    }

    const K1: &str = "the first key, long enough for pgvault";
    const K2: &str = "the second key, long enough for pgvault";

    #[tokio::test]
    async fn keys_are_added_listed_and_retired_without_touching_data() {
        let d = tempfile::tempdir().unwrap();
        let r1 = sealed(d.path(), K1);
        let e = r1.keys().await.unwrap_err();
        assert_eq!(e.kind(), Kind::Key);
        assert!(e.to_string().contains("no encryption key yet"), "{e}");

        let r1 = sealed(d.path(), K1);
        assert!(r1.init_keys().await.unwrap());
        assert!(!r1.init_keys().await.unwrap());
        r1.put_json("s/x.json", &"secret value", PutMode::CreateNew)
            .await
            .unwrap();
        let raw = std::fs::read(d.path().join("s/x.json")).unwrap();
        assert_eq!(codec::is_sealed(&raw), Some(true));
        assert!(!raw.windows(12).any(|w| w == b"secret value"));

        // Another key does not open the stanza until it is added.
        let r2 = sealed(d.path(), K2);
        let e = r2.get_json::<String>("s/x.json").await.unwrap_err();
        assert_eq!(e.kind(), Kind::Key);
        assert!(e.to_string().contains("is not a key of stanza"), "{e}");
        let new = KeySource::Value(Zeroizing::new(K2.as_bytes().to_vec()))
            .load()
            .await
            .unwrap();
        assert_eq!(r1.add_master_key(&new).await.unwrap(), PutOutcome::Created);
        let r2 = sealed(d.path(), K2);
        assert_eq!(
            r2.get_json::<String>("s/x.json").await.unwrap().as_deref(),
            Some("secret value")
        );
        let list = r2.list_master_keys().await.unwrap();
        assert_eq!(list.len(), 2);
        let old = list.iter().find(|k| !k.configured).unwrap().id.clone();
        let mine = list.iter().find(|k| k.configured).unwrap().id.clone();
        assert_eq!(
            r2.retire_master_key(&mine).await.unwrap_err().kind(),
            Kind::Usage
        );
        r2.retire_master_key(&old).await.unwrap();
        assert_eq!(std::fs::read(d.path().join("s/x.json")).unwrap(), raw);
        let e = sealed(d.path(), K1).keys().await.unwrap_err();
        assert_eq!(e.kind(), Kind::Key);
        // The last key stays.
        assert!(r2.retire_master_key(&mine).await.is_err());

        // No key at all: one line naming the object, and a hint.
        let plain = Repository::local_for_tests(d.path(), "s");
        let e = plain.get_json::<String>("s/x.json").await.unwrap_err();
        assert_eq!(e.kind(), Kind::Key);
        assert!(e.to_string().contains("s/x.json"), "{e}");
        assert!(e.hint_text().is_some());
        assert!(!format!("{e:?} {:?}", r2).contains("long enough"));
    }
}
