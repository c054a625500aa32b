//! The archive's rules, in one place: which object answers for a WAL file
//! name, how a name is claimed and the claim read back, how a listing of
//! the archive is read. Every command asks this module; none builds or
//! parses an archive key itself.
//!
//! For each WAL file name N (a segment, `.partial`, `.history` or
//! `.backup` file) the archive of one cluster (`<stanza>/archive/<db>/`,
//! see [`super::layout`]) holds:
//! - `N-<sha256>.zst`, a *content*: named by its checksum, so two different
//!   files pushed for N can never overwrite each other, whatever the store;
//! - `N.claim`, which content N is: created once, only if absent;
//! - `N-<sha256>.summary`: what that content's WAL records say;
//! - `N-<sha256>.blockrefs`: the relation blocks and storage events of its
//!   records (`pg::blockref`), which incremental backups read.
//! - `N.gap`, a *gap marker*: this repository missed N — with several
//!   repositories, N left this repository's archive-push queue unsent
//!   (past `archive-push-queue-max`, or refused), while PostgreSQL was
//!   told N is archived because the others hold it. `info`, `check` and
//!   `verify` show it; a content of N stored later fills the gap.
//!
//! **The one answer to "which object is N"**: the content N's claim names.
//! Without a claim (a push that crashed between storing its data and
//! creating the claim), the only content there is — a re-push of the same
//! file then claims it. Several contents and no readable claim naming one
//! of them: a conflict, and N counts as not archived for every command
//! (`verify` and `info` report it). `archive-get`, `info`, `restore`'s
//! target check and `verify` all read the archive through here, so they
//! cannot disagree.

mod timelines;

pub use timelines::{ArchivedHistory, Fork, Histories};

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::backend::{ObjectMeta, ObjectReader, Spool};
use super::codec::{self, Binding, CodecError, Digest256, Keys, Sha256Sum};
use super::layout::{self, ArchiveKey};
use super::{DbInfo, Deletion, Fetched, PutMode, PutOutcome, Repository};
use crate::error::{Error, Kind, Result, WriteWatch};
use crate::pg::blockref::{decode_segment, encode_segment, SegmentRefs};
use crate::pg::history::{parse_history, TimelineHistory};
use crate::pg::walscan::WalSummary;
use crate::pg::{SegmentNo, TimelineId, WalFileKind, WalFileName};

/// The claim object: which content owns a WAL file name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub sha256: Sha256Sum,
    pub size: u64,
    pub archived_at: String,
}

/// The gap marker object: why and when this repository missed a name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GapMarker {
    pub dropped_at: String,
    /// Bytes of the file that was dropped.
    pub size: u64,
    /// `archive-push-queue-max`, or why the repository refused it.
    pub reason: String,
}

/// Where the content answering for a name is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub key: String,
    pub sha: Sha256Sum,
}

/// Whether a push created the name's claim or found it naming these bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimOutcome {
    Claimed,
    AlreadyClaimed,
}

/// The archive of one cluster of a stanza.
#[derive(Debug, Clone)]
pub struct Archive {
    repo: Repository,
    db: DbInfo,
}

impl Repository {
    /// The archive of cluster `db` (an entry of this stanza).
    pub fn archive(&self, db: &DbInfo) -> Archive {
        Archive {
            repo: self.clone(),
            db: db.clone(),
        }
    }
}

impl Archive {
    pub fn repo(&self) -> &Repository {
        &self.repo
    }
    pub fn db(&self) -> &DbInfo {
        &self.db
    }

    fn dir(&self) -> String {
        self.db.dir()
    }
    /// The key of content `sha` of `name` (for readers that check objects
    /// themselves, like `verify`).
    pub fn content_key(&self, name: &WalFileName, sha: &Sha256Sum) -> String {
        self.data_key(name, sha)
    }
    /// What every content of `name` is bound to when sealed (its key is
    /// known only once it is encoded: see `layout::binding_name`).
    pub fn content_binding(&self, name: &WalFileName) -> String {
        layout::wal_content_binding(self.repo.stanza(), &self.dir(), name)
    }
    fn data_key(&self, name: &WalFileName, sha: &Sha256Sum) -> String {
        layout::wal_data_key(self.repo.stanza(), &self.dir(), name, sha)
    }
    fn claim_key(&self, name: &WalFileName) -> String {
        layout::wal_claim_key(self.repo.stanza(), &self.dir(), name)
    }
    fn summary_key(&self, name: &WalFileName, sha: &Sha256Sum) -> String {
        layout::wal_summary_key(self.repo.stanza(), &self.dir(), name, sha)
    }
    fn blockrefs_key(&self, name: &WalFileName, sha: &Sha256Sum) -> String {
        layout::wal_blockrefs_key(self.repo.stanza(), &self.dir(), name, sha)
    }

    /// How the block references of content `sha` of `name` are named in
    /// messages.
    pub fn describe_blockrefs(&self, name: &WalFileName, sha: &Sha256Sum) -> String {
        format!("{}/{}", self.repo.describe(), self.blockrefs_key(name, sha))
    }

    fn gap_key(&self, name: &WalFileName) -> String {
        layout::wal_gap_key(self.repo.stanza(), &self.dir(), name)
    }

    /// Marks that this repository missed `name` (idempotent: a marker that
    /// is there already stays as it is).
    pub async fn mark_gap(&self, name: &WalFileName, marker: &GapMarker) -> Result<()> {
        self.repo
            .put_json(&self.gap_key(name), marker, PutMode::CreateNew)
            .await?;
        Ok(())
    }

    /// The gap marker of `name`, if it has one (see `repo::Fetched`).
    pub async fn read_gap(&self, name: &WalFileName) -> Result<super::Fetched<GapMarker>> {
        self.repo.fetch_json(&self.gap_key(name)).await
    }

    /// How `name`'s claim is named in messages.
    pub fn describe_claim(&self, name: &WalFileName) -> String {
        format!("{}/{}", self.repo.describe(), self.claim_key(name))
    }

    /// How the directory of `name`'s objects is named in messages: where a
    /// new content is written before its checksum (so its key) is known.
    pub fn describe_dir(&self, name: &WalFileName) -> String {
        let dir = layout::wal_dir(self.repo.stanza(), &self.dir(), name);
        format!("{}/{dir}", self.repo.describe())
    }

    /// How a content of `name` is named in messages.
    pub fn describe_content(&self, name: &WalFileName, sha: &Sha256Sum) -> String {
        format!("{}/{}", self.repo.describe(), self.data_key(name, sha))
    }

    /// `name`'s claim, `None` when it has none.
    pub async fn read_claim(&self, name: &WalFileName) -> Result<Option<Claim>> {
        let key = self.claim_key(name);
        self.repo.get_json(&key).await
    }

    /// `name`'s claim, telling a damaged claim (an outcome) from a store
    /// that cannot be read right now (an error): `verify` reports the one
    /// and fails on the other.
    pub async fn fetch_claim(&self, name: &WalFileName) -> Result<Fetched<Claim>> {
        self.repo.fetch_json(&self.claim_key(name)).await
    }

    /// A sink for a new content of `name`, to be filled on a blocking
    /// thread (its key is known only once the content's checksum is) and
    /// then stored with [`Archive::store_content`]. Blocking.
    pub fn spool(&self, name: &WalFileName) -> Result<Spool> {
        let dir = layout::wal_dir(self.repo.stanza(), &self.dir(), name);
        self.repo
            .backend()
            .spool(&dir)
            .map_err(|e| self.repo.backend().io_error(&dir, e))
    }

    /// Stores a content of `name` durably under its checksum. Idempotent:
    /// the key names the bytes, so an existing object is these very bytes.
    pub async fn store_content(
        &self,
        spool: Spool,
        name: &WalFileName,
        digest: &Digest256,
    ) -> Result<()> {
        let key = self.data_key(name, &digest.sha256);
        self.repo
            .backend()
            .commit(spool, &key, PutMode::CreateNew)
            .await?;
        Ok(())
    }

    /// Makes `name` answer for the stored content `digest` — the last step
    /// of a push, after [`Archive::store_content`]. Where create-if-absent
    /// is atomic (local `link()`, S3 `If-None-Match` on stores honouring
    /// it) exactly one of racing pushers creates the claim; elsewhere each
    /// waits briefly and reads the claim back, and only the one it names
    /// succeeds. Either way a loser's content stays under its own key, so a
    /// conflict is never silent.
    pub async fn claim(&self, name: &WalFileName, digest: &Digest256) -> Result<ClaimOutcome> {
        let claim = Claim {
            sha256: digest.sha256,
            size: digest.size,
            archived_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        };
        let created = self
            .repo
            .put_json(&self.claim_key(name), &claim, PutMode::CreateNew)
            .await?;
        if created == PutOutcome::Created && self.repo.backend().atomic_create() {
            // Ours, and both objects were made durable as they were
            // committed (data first): nothing left to check.
            return Ok(ClaimOutcome::Claimed);
        }
        if created == PutOutcome::Created {
            tokio::time::sleep(crate::repo::backend::SETTLE).await;
        }
        let owner = self.read_claim(name).await?.ok_or_else(|| {
            Error::repository(format!(
                "{}/{} vanished after it was written",
                self.repo.describe(),
                self.claim_key(name)
            ))
        })?;
        self.confirm(name, &owner, digest).await?;
        Ok(match created {
            PutOutcome::Created if owner.sha256 == digest.sha256 => ClaimOutcome::Claimed,
            _ => ClaimOutcome::AlreadyClaimed,
        })
    }

    /// `name` is claimed already: fine if the claim names `digest` (once
    /// that content is durable: an earlier pusher may have crashed before
    /// its fsync), a conflict otherwise — the archived copy stays.
    pub async fn confirm(
        &self,
        name: &WalFileName,
        claim: &Claim,
        digest: &Digest256,
    ) -> Result<()> {
        if claim.sha256 != digest.sha256 {
            return Err(Error::new(
                Kind::Conflict,
                format!(
                    "a different {name} is already archived (sha256 {}, {} bytes; this file: sha256 {}, {} bytes); the archived copy was kept",
                    short(&claim.sha256),
                    claim.size,
                    short(&digest.sha256),
                    digest.size
                ),
            )
            .hint("two clusters may be archiving into one stanza (an old primary beside a promoted standby?): give each its own stanza"));
        }
        self.repo
            .backend()
            .ensure_durable(&[self.data_key(name, &digest.sha256), self.claim_key(name)])
            .await
    }

    /// The content answering for `name` (see the module doc); `None` when
    /// the archive does not hold `name`.
    pub async fn locate(&self, name: &WalFileName) -> Result<Option<Located>> {
        if let Some(claim) = self.read_claim(name).await? {
            return Ok(Some(Located {
                key: self.data_key(name, &claim.sha256),
                sha: claim.sha256,
            }));
        }
        let dir = layout::wal_dir(self.repo.stanza(), &self.dir(), name);
        let listing = self.repo.backend().list(&dir).await?;
        let mut found: Vec<Sha256Sum> = listing
            .iter()
            .filter_map(|m| match layout::parse_archive_key(&m.key) {
                Some(ArchiveKey::Data { name: n, sha }) if &n == name => Some(sha),
                _ => None,
            })
            .collect();
        match found.len() {
            0 => Ok(None),
            1 => {
                let sha = found.pop().expect("one element");
                Ok(Some(Located {
                    key: self.data_key(name, &sha),
                    sha,
                }))
            }
            n => Err(unresolved(name, n)),
        }
    }

    /// Decodes content `sha` of `name` into `sink` on a blocking thread and
    /// returns the sink once the content matched its checksum. The sink has
    /// seen every byte before the check at the end: callers write to a
    /// temporary place and only use it after this returned `Ok`.
    pub async fn read_content<W: Write + Send + 'static>(
        &self,
        name: &WalFileName,
        sha: &Sha256Sum,
        sink: W,
    ) -> Result<W> {
        self.read_content_into(name, sha, sink, None).await
    }

    /// [`Archive::read_content`] into a local file (`dest`), whose write
    /// errors are named as such: a full disk is not a damaged object.
    async fn read_content_into<W: Write + Send + 'static>(
        &self,
        name: &WalFileName,
        sha: &Sha256Sum,
        sink: W,
        dest: Option<PathBuf>,
    ) -> Result<W> {
        let key = self.data_key(name, sha);
        let what = format!("{}/{key}", self.repo.describe());
        let Some(reader) = self.repo.backend().get(&key).await? else {
            // Listed or claimed a moment ago: it was there. Vanishing now
            // means something deletes archived WAL under a running reader.
            return Err(Error::repository(format!("{what} is missing")));
        };
        let expected = *sha;
        let keys = self.repo.keys().await?;
        tokio::task::spawn_blocking(move || {
            let mut watch = WriteWatch::new(sink);
            let bind = Binding::object(layout::binding_name(&key));
            decode_checked(reader, &mut watch, expected, &what, &keys, bind).map_err(
                |e| match (watch.error(), &dest) {
                    (Some(w), Some(dest)) => Error::io(Kind::Internal, "write", dest.display(), &w),
                    _ => e,
                },
            )?;
            Ok(watch.into_inner())
        })
        .await?
    }

    /// Fetches `name` into `dest`, verified: decoded beside `dest` and
    /// renamed into place only after its checksum matched, so a corrupt
    /// object never reaches `dest`. `false` when the archive does not hold
    /// `name`.
    pub async fn fetch_into(&self, name: &WalFileName, dest: &Path) -> Result<bool> {
        let Some(found) = self.locate(name).await? else {
            return Ok(false);
        };
        let tmp = tmp_path(dest);
        let file = File::create(&tmp).map_err(|e| local_error("create", &tmp, e))?;
        let written = self
            .read_content_into(
                name,
                &found.sha,
                BufWriter::with_capacity(1 << 20, file),
                Some(tmp.clone()),
            )
            .await
            .and_then(|out| {
                out.into_inner()
                    .map_err(|e| local_error("write", &tmp, e.into_error()))?;
                fs::rename(&tmp, dest).map_err(|e| local_error("rename into", dest, e))
            });
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written.map(|()| true)
    }

    /// A small archived file (a timeline history) in memory, verified;
    /// `None` when the archive does not hold it.
    pub async fn fetch_small(&self, name: &WalFileName) -> Result<Option<Vec<u8>>> {
        let Some(found) = self.locate(name).await? else {
            return Ok(None);
        };
        self.read_content(name, &found.sha, Vec::new())
            .await
            .map(Some)
    }

    /// The archived history of timeline `tli` (timeline 1 has none and is
    /// its own root); `None` when the archive has no history file for it.
    pub async fn history(&self, tli: TimelineId) -> Result<Option<TimelineHistory>> {
        if tli == TimelineId::FIRST {
            return Ok(Some(TimelineHistory::root(tli)));
        }
        let name = WalFileName::history(tli);
        let Some(bytes) = self.fetch_small(&name).await? else {
            return Ok(None);
        };
        parse_history(tli, &String::from_utf8_lossy(&bytes))
            .map(Some)
            .map_err(|e| {
                Error::repository(format!(
                    "{}/{}: {e}",
                    self.repo.describe(),
                    self.claim_key(&name)
                ))
            })
    }

    /// Timelines whose history file is claimed in the archive.
    pub async fn history_timelines(&self) -> Result<Vec<TimelineId>> {
        let dir = format!(
            "{}/history",
            layout::archive_root(self.repo.stanza(), &self.dir())
        );
        let mut out: Vec<TimelineId> = self
            .repo
            .backend()
            .list(&dir)
            .await?
            .iter()
            .filter_map(|m| match layout::parse_archive_key(&m.key) {
                Some(ArchiveKey::Claim { name }) if name.kind() == WalFileKind::History => {
                    Some(name.timeline())
                }
                _ => None,
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Which of `names` are claimed (archived), listing only their
    /// directories.
    pub async fn claimed_among(&self, names: &[WalFileName]) -> Result<HashSet<WalFileName>> {
        let mut dirs: Vec<String> = names
            .iter()
            .map(|n| layout::wal_dir(self.repo.stanza(), &self.dir(), n))
            .collect();
        dirs.sort();
        dirs.dedup();
        let mut have = HashSet::new();
        for d in dirs {
            for m in self.repo.backend().list(&d).await? {
                if let Some(ArchiveKey::Claim { name }) = layout::parse_archive_key(&m.key) {
                    if names.contains(&name) {
                        have.insert(name);
                    }
                }
            }
        }
        Ok(have)
    }

    /// Stores the record summary of content `sha` of `name` (idempotent).
    pub async fn store_summary(
        &self,
        name: &WalFileName,
        sha: &Sha256Sum,
        summary: &WalSummary,
    ) -> Result<()> {
        let json = serde_json::to_vec(summary)
            .map_err(|e| Error::internal(format!("encode the summary of {name}: {e}")))?;
        self.repo
            .put_encoded(&self.summary_key(name, sha), &json, PutMode::CreateNew)
            .await?;
        Ok(())
    }

    /// Stores the block references of content `sha` of `name`
    /// (`pg::blockref::encode_segment`; idempotent).
    pub async fn store_blockrefs(
        &self,
        name: &WalFileName,
        sha: &Sha256Sum,
        refs: &SegmentRefs,
    ) -> Result<()> {
        let bytes = encode_segment(refs);
        self.repo
            .put_encoded(&self.blockrefs_key(name, sha), &bytes, PutMode::CreateNew)
            .await?;
        Ok(())
    }

    /// The block references of content `sha` of `name`: like
    /// [`Archive::read_summary`], a store that cannot be read is an error,
    /// a missing or damaged object an outcome.
    pub async fn read_blockrefs(
        &self,
        name: &WalFileName,
        sha: &Sha256Sum,
    ) -> Result<BlockRefsRead> {
        let key = self.blockrefs_key(name, sha);
        let Some(raw) = self.repo.backend().get_bytes(&key).await? else {
            return Ok(BlockRefsRead::Missing);
        };
        let keys = self.repo.keys().await?;
        let repo = self.repo.clone();
        let parsed = tokio::task::spawn_blocking(move || {
            Ok::<_, Error>(repo.decode_small(&keys, &raw, &key)?.and_then(|b| {
                decode_segment(&b).map_err(|e| format!("{}/{key}: {e}", repo.describe()))
            }))
        })
        .await??;
        Ok(match parsed {
            Ok(s) => BlockRefsRead::Found(Box::new(s)),
            Err(e) => BlockRefsRead::Damaged(e),
        })
    }

    /// The record summary of content `sha` of `name`. A store that cannot
    /// be read is an error; a summary that is there but damaged is an
    /// outcome ([`SummaryRead::Damaged`]), so that one bad object hides
    /// nothing else.
    pub async fn read_summary(&self, name: &WalFileName, sha: &Sha256Sum) -> Result<SummaryRead> {
        let key = self.summary_key(name, sha);
        let Some(raw) = self.repo.backend().get_bytes(&key).await? else {
            return Ok(SummaryRead::Missing);
        };
        let what = format!("{}/{key}", self.repo.describe());
        let keys = self.repo.keys().await?;
        let parsed = self.repo.decode_small(&keys, &raw, &key)?.and_then(|b| {
            serde_json::from_slice(&b).map_err(|e| format!("{what}: unreadable summary: {e}"))
        });
        Ok(match parsed {
            Ok(s) => SummaryRead::Found(Box::new(s)),
            Err(e) => SummaryRead::Damaged(e),
        })
    }

    /// One listing of the whole archive, read by the rules above.
    pub async fn list(&self) -> Result<Listing> {
        let root = layout::archive_root(self.repo.stanza(), &self.dir());
        let objects = self.repo.backend().list(&root).await?;
        let mut listing = Listing::from_objects(objects);
        // Names with several contents: their claim decides (read only
        // for them; a single content is what the claim names, by the push
        // protocol, and `verify` checks every claim).
        let undecided: Vec<WalFileName> = listing
            .names
            .iter()
            .filter(|(_, e)| e.contents.len() > 1 && e.claimed)
            .map(|(n, _)| n.clone())
            .collect();
        for name in undecided {
            let claim = self.read_claim(&name).await;
            let entry = listing.names.get_mut(&name).expect("listed above");
            match claim {
                Ok(Some(c)) => {
                    if entry.contents.iter().any(|x| x.sha == c.sha256) {
                        entry.answer = Some(c.sha256);
                    }
                }
                Ok(None) => {}
                Err(e) => entry.claim_error = Some(e.to_string()),
            }
        }
        Ok(listing)
    }

    /// Keys of the summaries `entry` of `name` has without their content:
    /// a push stores the two side by side, so one killed in between can
    /// leave a summary alone (`repo::orphans` sweeps it).
    pub fn orphan_summary_keys(&self, name: &WalFileName, entry: &NameEntry) -> Vec<String> {
        entry
            .orphan_summaries
            .iter()
            .map(|sha| self.summary_key(name, sha))
            .chain(
                entry
                    .orphan_blockrefs
                    .iter()
                    .map(|sha| self.blockrefs_key(name, sha)),
            )
            .collect()
    }

    /// Every key `entry` of `name` has, in the order to delete them: the
    /// claim first (without it the name answers with its only content, the
    /// same bytes), then summaries and block references, then contents — an
    /// interrupted delete leaves what a re-run removes, never a claim
    /// without its content.
    pub fn keys_to_delete(&self, name: &WalFileName, entry: &NameEntry) -> Deletion {
        let claim = entry.claimed.then(|| self.claim_key(name));
        let summaries = entry
            .contents
            .iter()
            .flat_map(|c| {
                let summary = c.summarized.then(|| self.summary_key(name, &c.sha));
                let blockrefs = c.blockrefs.then(|| self.blockrefs_key(name, &c.sha));
                summary.into_iter().chain(blockrefs)
            })
            .chain(self.orphan_summary_keys(name, entry));
        let contents = entry.contents.iter().map(|c| self.data_key(name, &c.sha));
        Deletion::phased([
            claim.into_iter().collect::<Vec<_>>(),
            summaries.collect(),
            contents.collect(),
            // The gap marker last: it says what was dropped until the
            // name's objects are all gone.
            entry.gap.then(|| self.gap_key(name)).into_iter().collect(),
        ])
    }
}

/// The outcome of reading one summary object.
#[derive(Debug, Clone)]
pub enum SummaryRead {
    Found(Box<WalSummary>),
    Missing,
    /// Present but not readable: object and cause.
    Damaged(String),
}

/// The outcome of reading one block references object.
#[derive(Debug, Clone)]
pub enum BlockRefsRead {
    Found(Box<SegmentRefs>),
    Missing,
    /// Present but not readable: object and cause.
    Damaged(String),
}

/// A content of a name, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    pub sha: Sha256Sum,
    /// Bytes stored (compressed).
    pub stored_size: u64,
    /// Whether its record summary is stored.
    pub summarized: bool,
    /// Whether its block references are stored.
    pub blockrefs: bool,
}

/// What one listing shows of one name.
#[derive(Debug, Clone, Default)]
pub struct NameEntry {
    pub claimed: bool,
    /// Contents stored under the name, by checksum.
    pub contents: Vec<Content>,
    /// The content that answers for the name: see the module doc. `None`
    /// for a conflict, and for a name with a claim but no content.
    pub answer: Option<Sha256Sum>,
    /// The claim of a name with several contents could not be read.
    pub claim_error: Option<String>,
    /// Summaries whose content is not stored.
    pub orphan_summaries: Vec<Sha256Sum>,
    /// Block references whose content is not stored.
    pub orphan_blockrefs: Vec<Sha256Sum>,
    /// A gap marker says this repository missed the name.
    pub gap: bool,
}

impl NameEntry {
    /// Several contents are stored under the name.
    pub fn is_conflict(&self) -> bool {
        self.contents.len() > 1
    }
    pub fn content(&self, sha: &Sha256Sum) -> Option<&Content> {
        self.contents.iter().find(|c| &c.sha == sha)
    }
}

/// The archive of one cluster as one listing shows it.
#[derive(Debug, Clone, Default)]
pub struct Listing {
    names: BTreeMap<WalFileName, NameEntry>,
    /// Keys below the archive that pgvault does not write there.
    pub unrecognized: Vec<ObjectMeta>,
}

impl Listing {
    /// Reads a listing of one cluster's archive directory (claims of names
    /// with several contents are not read here: see [`Archive::list`]).
    pub fn from_objects(objects: Vec<ObjectMeta>) -> Listing {
        let mut out = Listing::default();
        let mut summaries: Vec<(WalFileName, Sha256Sum)> = Vec::new();
        let mut blockrefs: Vec<(WalFileName, Sha256Sum)> = Vec::new();
        for m in objects {
            match layout::parse_archive_key(&m.key) {
                Some(ArchiveKey::Data { name, sha }) => {
                    out.names.entry(name).or_default().contents.push(Content {
                        sha,
                        stored_size: m.size,
                        summarized: false,
                        blockrefs: false,
                    })
                }
                Some(ArchiveKey::Claim { name }) => {
                    out.names.entry(name).or_default().claimed = true
                }
                Some(ArchiveKey::Summary { name, sha }) => summaries.push((name, sha)),
                Some(ArchiveKey::BlockRefs { name, sha }) => blockrefs.push((name, sha)),
                Some(ArchiveKey::Gap { name }) => out.names.entry(name).or_default().gap = true,
                None => out.unrecognized.push(m),
            }
        }
        for (name, sha) in summaries {
            let entry = out.names.entry(name).or_default();
            match entry.contents.iter_mut().find(|c| c.sha == sha) {
                Some(c) => c.summarized = true,
                None => entry.orphan_summaries.push(sha),
            }
        }
        for (name, sha) in blockrefs {
            let entry = out.names.entry(name).or_default();
            match entry.contents.iter_mut().find(|c| c.sha == sha) {
                Some(c) => c.blockrefs = true,
                None => entry.orphan_blockrefs.push(sha),
            }
        }
        for entry in out.names.values_mut() {
            entry.contents.sort_by_key(|c| c.sha.0);
            if entry.contents.len() == 1 {
                entry.answer = Some(entry.contents[0].sha);
            }
        }
        out
    }

    /// Every name listed, with what the listing shows of it.
    pub fn entries(&self) -> impl Iterator<Item = (&WalFileName, &NameEntry)> {
        self.names.iter()
    }

    pub fn entry(&self, name: &WalFileName) -> Option<&NameEntry> {
        self.names.get(name)
    }

    /// The content answering for `name`, if the archive holds it.
    pub fn answer(&self, name: &WalFileName) -> Option<Sha256Sum> {
        self.names.get(name).and_then(|e| e.answer)
    }

    pub fn holds(&self, name: &WalFileName) -> bool {
        self.answer(name).is_some()
    }

    /// Names this repository missed: a gap marker, and no content
    /// answering for the name (a content stored later fills the gap).
    pub fn dropped(&self) -> impl Iterator<Item = &WalFileName> {
        self.names
            .iter()
            .filter(|(_, e)| e.gap && e.answer.is_none())
            .map(|(n, _)| n)
    }

    /// Names the archive holds, each with the content answering for it.
    pub fn archived(&self) -> impl Iterator<Item = (&WalFileName, Sha256Sum)> {
        self.names
            .iter()
            .filter_map(|(n, e)| e.answer.map(|sha| (n, sha)))
    }

    /// Whether the content answering for `name` has its summary stored.
    pub fn is_summarized(&self, name: &WalFileName) -> bool {
        self.names.get(name).is_some_and(|e| {
            e.answer
                .and_then(|sha| e.content(&sha))
                .is_some_and(|c| c.summarized)
        })
    }

    /// Whether the content answering for `name` has its block references
    /// stored.
    pub fn has_blockrefs(&self, name: &WalFileName) -> bool {
        self.names.get(name).is_some_and(|e| {
            e.answer
                .and_then(|sha| e.content(&sha))
                .is_some_and(|c| c.blockrefs)
        })
    }

    /// The files recovery along `history` replays from segment `start` on,
    /// in order, up to the first segment the archive does not hold.
    pub fn replay_path(
        &self,
        history: &TimelineHistory,
        start: SegmentNo,
        seg_size: u32,
    ) -> Vec<WalFileName> {
        let mut out = Vec::new();
        let mut floor = None;
        let mut segno = start;
        'segments: loop {
            for tli in history.timelines_for_segment(segno, seg_size) {
                if floor.is_some_and(|f| tli < f) {
                    break;
                }
                let name = WalFileName::for_segment(tli, segno, seg_size);
                if self.holds(&name) {
                    out.push(name);
                    floor = Some(tli);
                    segno = segno.next();
                    continue 'segments;
                }
            }
            return out;
        }
    }
}

fn unresolved(name: &WalFileName, n: usize) -> Error {
    Error::new(
        Kind::Conflict,
        format!("{n} different copies of {name} are archived and none is claimed"),
    )
    .hint("run `pgvault verify` and keep the right copy")
}

fn short(sha: &Sha256Sum) -> String {
    sha.to_hex()[..12].to_string()
}

/// Decodes `reader` into `sink`, then checks the content against `expected`.
fn decode_checked<W: Write>(
    reader: ObjectReader,
    sink: &mut W,
    expected: Sha256Sum,
    what: &str,
    keys: &Keys,
    bind: Binding<'_>,
) -> Result<()> {
    let digest = codec::decode(reader, sink, keys, bind).map_err(|e| match e {
        CodecError::Io(io) => Error::repository(format!("read {what}: {io}")),
        CodecError::Open(o) if o.is_key_problem() => super::keys::key_error(what, &o),
        other => Error::repository(format!("{what}: {other}")),
    })?;
    if digest.sha256 != expected {
        return Err(Error::repository(format!(
            "{what}: content checksum {} does not match the archived name's {expected}",
            digest.sha256
        )));
    }
    Ok(())
}

/// Where a file is written before it is renamed to `dest`.
pub(crate) fn tmp_path(dest: &Path) -> PathBuf {
    let mut name = dest
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "wal".into());
    name.push(".pgvault-tmp");
    dest.with_file_name(name)
}

fn local_error(what: &str, path: &Path, e: io::Error) -> Error {
    Error::io(Kind::Internal, what, path.display(), &e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(key: &str, size: u64) -> ObjectMeta {
        ObjectMeta {
            key: key.into(),
            size,
            modified: None,
        }
    }

    fn name(s: &str) -> WalFileName {
        WalFileName::parse(s).unwrap()
    }

    #[test]
    fn a_listing_answers_like_locate() {
        let n1 = name("000000010000000000000001");
        let n2 = name("000000010000000000000002");
        let n3 = name("000000010000000000000003");
        let n4 = name("000000010000000000000004");
        let (a, b) = (Sha256Sum([1; 32]), Sha256Sum([2; 32]));
        let key = |n: &WalFileName, s: &Sha256Sum| layout::wal_data_key("s", "15-1", n, s);
        let listing = Listing::from_objects(vec![
            meta(&key(&n1, &a), 10),
            meta(&layout::wal_claim_key("s", "15-1", &n1), 1),
            meta(&layout::wal_summary_key("s", "15-1", &n1, &a), 1),
            // unclaimed single content: a push that crashed before its claim
            meta(&key(&n2, &b), 10),
            // two contents: undecided until the claim is read
            meta(&key(&n3, &a), 10),
            meta(&key(&n3, &b), 10),
            meta(&layout::wal_claim_key("s", "15-1", &n3), 1),
            meta("s/archive/15-1/0000000100000000/.pgvault-tmp-1", 3),
            // missed (a gap marker), and missed but filled later
            meta(&layout::wal_gap_key("s", "15-1", &n4), 1),
            meta(&layout::wal_gap_key("s", "15-1", &n1), 1),
        ]);
        let dropped: Vec<&WalFileName> = listing.dropped().collect();
        assert_eq!(dropped, [&n4]);
        assert!(!listing.holds(&n4));
        assert_eq!(listing.answer(&n1), Some(a));
        assert!(listing.is_summarized(&n1));
        assert_eq!(listing.answer(&n2), Some(b));
        assert!(!listing.is_summarized(&n2));
        assert_eq!(listing.answer(&n3), None);
        assert!(listing.entry(&n3).unwrap().is_conflict());
        assert_eq!(listing.unrecognized.len(), 1);
        let held: Vec<_> = listing.archived().map(|(n, _)| n.clone()).collect();
        assert_eq!(held, [n1, n2]);
    }

    /// The archive of cluster 1 (PostgreSQL 15, 1 MiB segments) of stanza
    /// `s` in a local repository at `dir`.
    fn test_archive(dir: &Path) -> Archive {
        let db = DbInfo {
            id: 1,
            system_identifier: "1".into(),
            pg_version: 15,
            wal_segment_size: 1 << 20,
            pg_control_version: 1300,
            catalog_version: 0,
        };
        Repository::local_for_tests(dir, "s").archive(&db)
    }

    /// Stores `bytes` as a content of `name` (unclaimed).
    async fn store(archive: &Archive, name: WalFileName, bytes: Vec<u8>) -> Digest256 {
        let (a2, n2) = (archive.clone(), name.clone());
        let (spool, digest) = tokio::task::spawn_blocking(move || {
            let spool = a2.spool(&n2).unwrap();
            let bind = a2.content_binding(&n2);
            let (opts, keys) = (Default::default(), Keys::none());
            let mut enc = codec::Encoder::new(spool, opts, &keys, Binding::object(&bind)).unwrap();
            enc.write_all(&bytes).unwrap();
            enc.finish().unwrap()
        })
        .await
        .unwrap();
        archive.store_content(spool, &name, &digest).await.unwrap();
        digest
    }

    /// Two different contents raced for one name and one of them won the
    /// claim: every reader must take the name as archived, with the
    /// claimed content (`info` and restore's target check used to drop the
    /// name and cut the recoverable window short there).
    #[tokio::test]
    async fn a_raced_name_answers_with_its_claimed_content_everywhere() {
        use crate::pg::history::TimelineHistory;
        use crate::pg::TimelineId;
        let dir = tempfile::tempdir().unwrap();
        let archive = test_archive(dir.path());
        let seg = 1u32 << 20;
        let names: Vec<WalFileName> = (1..=3)
            .map(|n| WalFileName::for_segment(TimelineId(1), SegmentNo(n), seg))
            .collect();
        let push = |name: WalFileName, bytes: Vec<u8>| store(&archive, name, bytes);
        for n in &names {
            let d = push(n.clone(), n.as_str().as_bytes().to_vec()).await;
            archive.claim(n, &d).await.unwrap();
        }
        // The racing loser's content of the middle name, stored unclaimed.
        let loser = push(names[1].clone(), b"other bytes".to_vec()).await;
        let e = archive.claim(&names[1], &loser).await.unwrap_err();
        assert_eq!(e.kind(), Kind::Conflict, "{e}");

        let listing = archive.list().await.unwrap();
        let winner = archive.locate(&names[1]).await.unwrap().unwrap().sha;
        assert_ne!(winner, loser.sha256);
        assert!(listing.entry(&names[1]).unwrap().is_conflict());
        assert_eq!(listing.answer(&names[1]), Some(winner));
        let path = listing.replay_path(&TimelineHistory::root(TimelineId(1)), SegmentNo(1), seg);
        assert_eq!(path, names, "the raced name does not cut the replay path");
        let mut got = archive.fetch_small(&names[1]).await.unwrap().unwrap();
        assert_eq!(std::mem::take(&mut got), names[1].as_str().as_bytes());
    }

    /// A full disk where archive-get writes is named as such, with its
    /// path and a hint — not as a damaged object in the repository.
    #[tokio::test]
    async fn a_full_destination_is_a_write_error_naming_it() {
        use crate::pg::TimelineId;
        let dir = tempfile::tempdir().unwrap();
        let archive = test_archive(dir.path());
        let name = WalFileName::for_segment(TimelineId(1), SegmentNo(1), 1 << 20);
        let digest = store(&archive, name.clone(), vec![7u8; 1 << 20]).await;
        archive.claim(&name, &digest).await.unwrap();

        let dest = dir.path().join("RECOVERYXLOG");
        std::os::unix::fs::symlink("/dev/full", tmp_path(&dest)).unwrap();
        let e = archive.fetch_into(&name, &dest).await.unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with(&format!("write {}", tmp_path(&dest).display()))
                && text.contains("No space left on device"),
            "{text}"
        );
        assert_eq!(e.kind(), Kind::Internal, "{e:?}");
        assert!(e.hint_text().is_some(), "{e:?}");
    }

    #[test]
    fn claim_sha_is_hex_on_the_wire() {
        let c = Claim {
            sha256: Sha256Sum([0xab; 32]),
            size: 3,
            archived_at: "t".into(),
        };
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["sha256"], "ab".repeat(32));
        let back: Claim = serde_json::from_value(v).unwrap();
        assert_eq!(back, c);
        let bad = serde_json::json!({"sha256": "xyz", "size": 1, "archived_at": "t"});
        assert!(serde_json::from_value::<Claim>(bad).is_err());
    }
}
