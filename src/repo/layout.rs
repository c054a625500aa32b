//! The one place that builds (and parses) object keys.
//!
//! ```text
//! <stanza>/stanza.pgv                                   stanza facts (replaced atomically)
//! <stanza>/archive/<db>/<tli+log>/<wal>-<sha256>.zst    archived WAL, content-addressed
//! <stanza>/archive/<db>/<tli+log>/<wal>.claim           which content owns the name <wal>
//! <stanza>/archive/<db>/<tli+log>/<wal>-<sha256>.summary what that content's records say
//! <stanza>/archive/<db>/<tli+log>/<wal>-<sha256>.blockrefs the relation blocks its records touch
//! <stanza>/archive/<db>/<tli+log>/<wal>.gap            this repository missed <wal> (dropped from its archive-push queue)
//! <stanza>/archive/<db>/history/<tli>.history-<sha256>.zst (and .claim)
//! <stanza>/backup/<label>/data/<worker>-<n>.pgv             whole files and parts (changed blocks), small ones bundled
//! <stanza>/backup/<label>/blocksums.pgv                     a checksum of every block of its relation files (`repo::blocksums`)
//! <stanza>/backup/<label>/journal/<n>.pgv                  what an unfinished backup stored so far (for resume)
//! <stanza>/backup/<label>/files.pgv                         the file list (format 2, `repo::filelist`), written just before the manifest
//! <stanza>/backup/<label>/manifest.pgv                      written last: the backup is complete
//! <stanza>/backup/<label>/expiring.pgv                      written first by expire: the backup is going
//! <stanza>/results/<drill|verify>/<YYYYMMDDTHHMMSS.mmmZ>.pgv  one run's result (the newest few kept)
//! <stanza>/keys/<master key id>.key                          the data keys wrapped by one master key (encryption)
//! ```
//!
//! `<db>` is `<major>-<id>` (e.g. `15-1`): a new id after `pg_upgrade` keeps
//! the old cluster's WAL apart. `<tli+log>` is the first 16 characters of the
//! segment name, so a directory (or listing) holds at most 256 segments of
//! 16 MiB. The checksum in the WAL key means two different files pushed for
//! one name can never overwrite each other, even on stores whose conditional
//! create is missing or not atomic; the `.claim` object decides which one
//! the name belongs to (see `repo::archive`, which owns these rules).

use crate::pg::WalFileName;
use crate::repo::codec::Sha256Sum;

pub const STANZA_OBJECT: &str = "stanza.pgv";
pub const WAL_SUFFIX: &str = ".zst";
pub const CLAIM_SUFFIX: &str = ".claim";
pub const SUMMARY_SUFFIX: &str = ".summary";
pub const BLOCKREFS_SUFFIX: &str = ".blockrefs";
pub const GAP_SUFFIX: &str = ".gap";

pub fn stanza_key(stanza: &str) -> String {
    format!("{stanza}/{STANZA_OBJECT}")
}

pub fn backups_root(stanza: &str) -> String {
    format!("{stanza}/backup")
}

pub fn backup_dir(stanza: &str, label: &str) -> String {
    format!("{stanza}/backup/{label}")
}

pub fn backup_manifest_key(stanza: &str, label: &str) -> String {
    format!("{}/{MANIFEST_OBJECT}", backup_dir(stanza, label))
}

/// The mark `expire` writes before it deletes a backup's manifest and
/// removes last: a backup directory holding it is being expired, and a
/// re-run of an interrupted expire finishes the job (see `repo::orphans`).
pub fn backup_expiring_key(stanza: &str, label: &str) -> String {
    format!("{}/{EXPIRING_OBJECT}", backup_dir(stanza, label))
}

/// The file list of a format-2 backup (`repo::filelist`).
pub fn backup_file_list_key(stanza: &str, label: &str) -> String {
    format!("{}/{FILE_LIST_OBJECT}", backup_dir(stanza, label))
}

/// The block sums of a backup (`repo::blocksums`).
pub fn backup_block_sums_key(stanza: &str, label: &str) -> String {
    format!("{}/{BLOCK_SUMS_OBJECT}", backup_dir(stanza, label))
}

/// Chunk `n` of an unfinished backup's journal (`ops::backup::resume`):
/// the files it stored in data objects already committed.
pub fn backup_journal_key(stanza: &str, label: &str, n: u64) -> String {
    format!("{}/{JOURNAL_DIR}/{n:06}.pgv", backup_dir(stanza, label))
}

/// The sequence number of a journal chunk's name below its backup
/// directory (`journal/000003.pgv`); `None` for any other name.
pub fn parse_journal_name(name: &str) -> Option<u64> {
    let n = name.strip_prefix(JOURNAL_DIR)?.strip_prefix('/')?;
    let n = n.strip_suffix(".pgv")?;
    (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        .then(|| n.parse().ok())
        .flatten()
}

const JOURNAL_DIR: &str = "journal";
const MANIFEST_OBJECT: &str = "manifest.pgv";
const BLOCK_SUMS_OBJECT: &str = "blocksums.pgv";
const FILE_LIST_OBJECT: &str = "files.pgv";
const EXPIRING_OBJECT: &str = "expiring.pgv";

/// What an object of a backup directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackupObject {
    Manifest,
    Expiring,
    /// The file list (format 2): written just before the manifest.
    FileList,
    /// A chunk of an unfinished backup's journal.
    Journal,
    Data,
    /// The block sums: written with the data, before the manifest.
    BlockSums,
    /// Not an object pgvault writes in a backup directory.
    Unknown,
}

/// The label of the backup a key below `<stanza>/backup/` belongs to, and
/// what the object is; `None` for a key not below a backup directory.
pub fn parse_backup_key<'a>(stanza: &str, key: &'a str) -> Option<(&'a str, BackupObject)> {
    let rest = key.strip_prefix(stanza)?.strip_prefix("/backup/")?;
    let (label, object) = rest.split_once('/')?;
    let kind = match object {
        MANIFEST_OBJECT => BackupObject::Manifest,
        EXPIRING_OBJECT => BackupObject::Expiring,
        FILE_LIST_OBJECT => BackupObject::FileList,
        BLOCK_SUMS_OBJECT => BackupObject::BlockSums,
        o if parse_journal_name(o).is_some() => BackupObject::Journal,
        o if o.starts_with("data/") && o.ends_with(".pgv") && !o[5..].contains('/') => {
            BackupObject::Data
        }
        _ => BackupObject::Unknown,
    };
    Some((label, kind))
}

/// A data object of a backup, relative to the backup's directory.
pub fn backup_object_name(worker: usize, n: u64) -> String {
    format!("data/{worker:02}-{n:06}.pgv")
}

/// The worker and sequence number of a data object's name
/// ([`backup_object_name`]); `None` for any other name.
pub fn parse_backup_object_name(name: &str) -> Option<(usize, u64)> {
    let stem = name.strip_prefix("data/")?.strip_suffix(".pgv")?;
    let (w, n) = stem.split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(w) || !digits(n) {
        return None;
    }
    Some((w.parse().ok()?, n.parse().ok()?))
}

pub fn backup_object_key(stanza: &str, label: &str, object: &str) -> String {
    format!("{}/{object}", backup_dir(stanza, label))
}

/// Where the results of `drill` or `verify` runs (`kind`) are kept.
pub fn results_dir(stanza: &str, kind: &str) -> String {
    format!("{stanza}/results/{kind}")
}

/// One run's result, named by when it finished (`20261126T031500.123Z`):
/// names sort in time order.
pub fn result_key(stanza: &str, kind: &str, stamp: &str) -> String {
    format!("{}/{stamp}.pgv", results_dir(stanza, kind))
}

/// The key objects of an encrypted stanza (`repo::keys`).
pub fn keys_dir(stanza: &str) -> String {
    format!("{stanza}/keys")
}

pub const KEY_SUFFIX: &str = ".key";

/// The data keys wrapped by the master key `id` (16 hex characters).
pub fn key_object_key(stanza: &str, id: &str) -> String {
    format!("{}/{id}{KEY_SUFFIX}", keys_dir(stanza))
}

/// What a sealed object is bound to (`repo::crypt::Binding`): its key, but
/// for archived contents the key without its `-<sha256>.zst` tail, which is
/// not known until the content was encoded (a writer binds
/// [`wal_content_binding`]).
pub fn binding_name(key: &str) -> &str {
    if let Some(stem) = key.strip_suffix(WAL_SUFFIX) {
        if let Some((head, sha)) = stem.rsplit_once('-') {
            if Sha256Sum::from_hex(sha).is_some() {
                return head;
            }
        }
    }
    key
}

/// [`binding_name`] of every content of `name`.
pub fn wal_content_binding(stanza: &str, db_dir: &str, name: &WalFileName) -> String {
    format!("{}/{}", wal_dir(stanza, db_dir, name), name.as_str())
}

pub fn db_dir_name(major: u32, db_id: u32) -> String {
    format!("{major}-{db_id}")
}

pub fn archive_root(stanza: &str, db_dir: &str) -> String {
    format!("{stanza}/archive/{db_dir}")
}

/// Where every cluster's archive of a stanza lies.
pub fn archives_root(stanza: &str) -> String {
    format!("{stanza}/archive")
}

/// The major and id of the cluster whose archive a key below
/// [`archives_root`] belongs to (the `<major>-<id>` directory).
pub fn parse_db_dir(stanza: &str, key: &str) -> Option<(u32, u32)> {
    let rest = key.strip_prefix(stanza)?.strip_prefix("/archive/")?;
    let (dir, _) = rest.split_once('/')?;
    let (major, id) = dir.split_once('-')?;
    Some((major.parse().ok()?, id.parse().ok()?))
}

pub fn wal_dir(stanza: &str, db_dir: &str, name: &WalFileName) -> String {
    format!("{}/{}", archive_root(stanza, db_dir), name.dir_part())
}

pub fn wal_data_key(stanza: &str, db_dir: &str, name: &WalFileName, sha: &Sha256Sum) -> String {
    format!(
        "{}/{}-{}{WAL_SUFFIX}",
        wal_dir(stanza, db_dir, name),
        name.as_str(),
        sha.to_hex()
    )
}

pub fn wal_claim_key(stanza: &str, db_dir: &str, name: &WalFileName) -> String {
    format!(
        "{}/{}{CLAIM_SUFFIX}",
        wal_dir(stanza, db_dir, name),
        name.as_str()
    )
}

/// The record summary of one archived content (`pg::walscan`): commit
/// times, restore points, damaged records. Named by the content's checksum,
/// so it can never describe other bytes.
pub fn wal_summary_key(stanza: &str, db_dir: &str, name: &WalFileName, sha: &Sha256Sum) -> String {
    format!(
        "{}/{}-{}{SUMMARY_SUFFIX}",
        wal_dir(stanza, db_dir, name),
        name.as_str(),
        sha.to_hex()
    )
}

/// The relation blocks and storage events of one archived content's
/// records (`pg::blockref::encode_segment`), for incremental backups. Named
/// by the content's checksum, like its summary.
pub fn wal_blockrefs_key(
    stanza: &str,
    db_dir: &str,
    name: &WalFileName,
    sha: &Sha256Sum,
) -> String {
    format!(
        "{}/{}-{}{BLOCKREFS_SUFFIX}",
        wal_dir(stanza, db_dir, name),
        name.as_str(),
        sha.to_hex()
    )
}

/// The marker that this repository missed `name`: it left the repository's
/// archive-push queue unsent (see `repo::archive`, `spool::Queue`).
pub fn wal_gap_key(stanza: &str, db_dir: &str, name: &WalFileName) -> String {
    format!(
        "{}/{}{GAP_SUFFIX}",
        wal_dir(stanza, db_dir, name),
        name.as_str()
    )
}

/// The kinds of object a DBA may store differently (`storage-class-wal`,
/// `storage-class-backup`): what lies below `<stanza>/archive/`, below
/// `<stanza>/backup/`, and the rest (the stanza, the lock, results).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredKind {
    Wal,
    Backup,
    Meta,
}

/// The kind of the object under `key` (relative to the repository root).
pub fn kind_of(key: &str) -> StoredKind {
    let mut parts = key.splitn(3, '/');
    let (_stanza, dir, rest) = (parts.next(), parts.next(), parts.next());
    match (dir, rest) {
        (Some("archive"), Some(_)) => StoredKind::Wal,
        (Some("backup"), Some(_)) => StoredKind::Backup,
        _ => StoredKind::Meta,
    }
}

/// What a key below an archive root is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArchiveKey {
    Data { name: WalFileName, sha: Sha256Sum },
    Claim { name: WalFileName },
    Summary { name: WalFileName, sha: Sha256Sum },
    BlockRefs { name: WalFileName, sha: Sha256Sum },
    Gap { name: WalFileName },
}

/// Parses the last component of a key below `archive/<db>/`; `None` for
/// anything pgvault did not write there.
pub fn parse_archive_key(key: &str) -> Option<ArchiveKey> {
    let file = key.rsplit('/').next()?;
    if let Some(stem) = file.strip_suffix(CLAIM_SUFFIX) {
        return WalFileName::parse(stem)
            .ok()
            .map(|name| ArchiveKey::Claim { name });
    }
    if let Some(stem) = file.strip_suffix(GAP_SUFFIX) {
        return WalFileName::parse(stem)
            .ok()
            .map(|name| ArchiveKey::Gap { name });
    }
    #[derive(PartialEq)]
    enum Side {
        Data,
        Summary,
        BlockRefs,
    }
    let (stem, side) = if let Some(stem) = file.strip_suffix(SUMMARY_SUFFIX) {
        (stem, Side::Summary)
    } else if let Some(stem) = file.strip_suffix(BLOCKREFS_SUFFIX) {
        (stem, Side::BlockRefs)
    } else {
        (file.strip_suffix(WAL_SUFFIX)?, Side::Data)
    };
    let (name, sha) = stem.rsplit_once('-')?;
    let (name, sha) = (WalFileName::parse(name).ok()?, Sha256Sum::from_hex(sha)?);
    Some(match side {
        Side::Summary => ArchiveKey::Summary { name, sha },
        Side::BlockRefs => ArchiveKey::BlockRefs { name, sha },
        Side::Data => ArchiveKey::Data { name, sha },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_content_binds_its_name_without_its_checksum() {
        let sha = Sha256Sum([0xab; 32]);
        for name in ["00000001000000020000003A", "00000002.history"] {
            let name = WalFileName::parse(name).unwrap();
            let key = wal_data_key("s", "15-1", &name, &sha);
            assert_eq!(binding_name(&key), wal_content_binding("s", "15-1", &name));
            let summary = wal_summary_key("s", "15-1", &name, &sha);
            assert_eq!(binding_name(&summary), summary);
        }
        assert_eq!(binding_name("s/stanza.pgv"), "s/stanza.pgv");
    }

    #[test]
    fn keys_roundtrip() {
        let name = WalFileName::parse("00000001000000020000003A").unwrap();
        let sha = Sha256Sum([0xab; 32]);
        let k = wal_data_key("main", "15-1", &name, &sha);
        assert_eq!(
            k,
            format!(
                "main/archive/15-1/0000000100000002/00000001000000020000003A-{}.zst",
                "ab".repeat(32)
            )
        );
        assert_eq!(
            parse_archive_key(&k),
            Some(ArchiveKey::Data {
                name: name.clone(),
                sha
            })
        );
        let c = wal_claim_key("main", "15-1", &name);
        assert_eq!(
            c,
            "main/archive/15-1/0000000100000002/00000001000000020000003A.claim"
        );
        assert_eq!(
            parse_archive_key(&c),
            Some(ArchiveKey::Claim { name: name.clone() })
        );
        let r = wal_summary_key("main", "15-1", &name, &sha);
        assert_eq!(r, k.replace(".zst", ".summary"));
        assert_eq!(
            parse_archive_key(&r),
            Some(ArchiveKey::Summary {
                name: name.clone(),
                sha
            })
        );
        let b = wal_blockrefs_key("main", "15-1", &name, &sha);
        assert_eq!(b, k.replace(".zst", ".blockrefs"));
        assert_eq!(
            parse_archive_key(&b),
            Some(ArchiveKey::BlockRefs { name, sha })
        );
        let h = WalFileName::parse("00000002.history").unwrap();
        assert_eq!(
            wal_claim_key("s", "15-1", &h),
            "s/archive/15-1/history/00000002.history.claim"
        );
        let g = wal_gap_key("s", "15-1", &h);
        assert_eq!(g, "s/archive/15-1/history/00000002.history.gap");
        assert_eq!(parse_archive_key(&g), Some(ArchiveKey::Gap { name: h }));
        assert_eq!(parse_archive_key("s/archive/15-1/x/.pgvault-tmp-1"), None);
        assert_eq!(
            parse_archive_key("s/archive/15-1/x/00000001000000020000003A-zz.zst"),
            None
        );
        assert_eq!(parse_db_dir("main", &c), Some((15, 1)));
        assert_eq!(parse_db_dir("s", "s/archive/x/y"), None);
    }

    #[test]
    fn backup_keys() {
        let m = backup_manifest_key("s", "20260101-000000F");
        assert_eq!(
            parse_backup_key("s", &m),
            Some(("20260101-000000F", BackupObject::Manifest))
        );
        let e = backup_expiring_key("s", "L");
        assert_eq!(
            parse_backup_key("s", &e),
            Some(("L", BackupObject::Expiring))
        );
        let d = backup_object_key("s", "L", &backup_object_name(3, 7));
        assert_eq!(parse_backup_key("s", &d), Some(("L", BackupObject::Data)));
        assert_eq!(
            parse_backup_object_name(&backup_object_name(3, 7)),
            Some((3, 7))
        );
        assert_eq!(parse_backup_object_name("data/x-1.pgv"), None);
        assert_eq!(
            parse_backup_key("s", &backup_file_list_key("s", "L")),
            Some(("L", BackupObject::FileList))
        );
        assert_eq!(
            parse_backup_key("s", "s/backup/L/data/x/y.pgv"),
            Some(("L", BackupObject::Unknown))
        );
        assert_eq!(parse_backup_key("s", "s/backup/L"), None);
        assert_eq!(parse_backup_key("s", "t/backup/L/manifest.pgv"), None);
    }
}
