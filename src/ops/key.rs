//! `pgvault key add|list|retire`: the master keys that open an encrypted
//! stanza (`repo::keys`, docs/encryption.md). None of them rewrites data:
//! they write or delete one small key object.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::repo::keys::{KeyListing, KeySource};
use crate::repo::{PutOutcome, Repository};

/// What `key add` did.
#[derive(Debug, Clone, Serialize)]
pub struct KeyAdded {
    /// The stanza had no keys: encryption is on from now on, with the
    /// configured key.
    pub initialized: Option<String>,
    /// The key added, and whether the stanza had it already.
    pub added: Option<(String, bool)>,
}

fn require_cipher(repo: &Repository, command: &str) -> Result<()> {
    if repo.encryption_configured() {
        return Ok(());
    }
    Err(Error::usage(format!("`{command}` needs the repository's key")).hint(
        "set repo-cipher-type = xchacha20-poly1305 and the key (repo-cipher-key-file, repo-cipher-key-command or PGVAULT_REPO_CIPHER_KEY)",
    ))
}

pub async fn add(repo: &Repository, new: Option<&KeySource>) -> Result<KeyAdded> {
    require_cipher(repo, "key add")?;
    let mut done = KeyAdded {
        initialized: None,
        added: None,
    };
    if repo.init_keys().await? {
        done.initialized = Some(repo.master_key().await?.id().to_hex());
        repo.seal_stanza_object().await?;
    }
    match new {
        Some(source) => {
            let new = source.load().await?;
            let outcome = repo.add_master_key(&new).await?;
            done.added = Some((new.id().to_hex(), outcome == PutOutcome::AlreadyExists));
        }
        None if done.initialized.is_none() => {
            return Err(Error::usage(format!(
                "stanza {:?} is encrypted already: give the key to add",
                repo.stanza()
            ))
            .hint("set repo-cipher-new-key-file (or repo-cipher-new-key-command, or PGVAULT_REPO_CIPHER_NEW_KEY)"));
        }
        None => {}
    }
    // The configured key opens the stanza (a fresh key object is read back).
    repo.keys().await?;
    Ok(done)
}

pub async fn list(repo: &Repository) -> Result<Vec<KeyListing>> {
    repo.list_master_keys().await
}

pub async fn retire(repo: &Repository, id: &str) -> Result<()> {
    require_cipher(repo, "key retire")?;
    repo.retire_master_key(id).await
}
