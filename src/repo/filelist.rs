//! The file list of a backup, streamed: memory stays one entry whatever the
//! number of files (issue 14).
//!
//! Format 2 keeps the list out of the manifest, in its own object
//! (`files.pgv`, see `layout`), written after every data object and before
//! the manifest that names it:
//!
//! ```text
//! files.pgv   a codec object whose content is one FileEntry as JSON per line,
//!             sorted by path (byte order, each path once)
//! manifest    "file_list": {"sha256": <of that content>, "count": <lines>}
//! ```
//!
//! The manifest stays small (what `info`, `expire` and the choice of a
//! backup read), and binds the list: a list that is not the one the
//! manifest was written with is refused. A reader decodes the list into a
//! temporary file first — the codec checks the checksum only at the end,
//! and nothing is handed on before it passed — then reads it a line at a
//! time, as often as it needs. Format-1 manifests held the list inline
//! (`files`); it is read from the manifest object the same way, with a
//! streaming JSON parser, so an old repository is read in bounded memory
//! too.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, Write};

use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::codec::{self, Binding, EncodeOptions, Encoder, Keys};
use super::layout;
use super::manifest::{FileEntry, Manifest};
use super::{Fetched, PutMode, PutOutcome, Repository};
use crate::error::{Error, Result};

/// What a format-2 manifest says of its file list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileListRef {
    /// SHA-256 of the list's content (the decoded lines).
    pub sha256: String,
    /// Lines (files) in it.
    pub count: u64,
}

/// Writes entries, in path order, as a file list.
pub struct FileListWriter<W: Write> {
    enc: Encoder<W>,
    line: Vec<u8>,
    last: Option<String>,
    count: u64,
}

impl<W: Write> FileListWriter<W> {
    /// A list sealed with `keys` (when they hold a keyring) and bound to
    /// `bind`, the object's key, like every object.
    pub fn new(out: W, opts: EncodeOptions, keys: &Keys, bind: Binding<'_>) -> io::Result<Self> {
        Ok(FileListWriter {
            enc: Encoder::new(out, EncodeOptions { threads: 0, ..opts }, keys, bind)?,
            line: Vec::with_capacity(1024),
            last: None,
            count: 0,
        })
    }

    /// Adds `f`, whose path must come after the previous one's.
    pub fn push(&mut self, f: &FileEntry) -> io::Result<()> {
        if self.last.as_deref().is_some_and(|p| p >= f.path.as_str()) {
            return Err(io::Error::other(format!(
                "file list out of order: {} after {}",
                f.path,
                self.last.as_deref().unwrap_or_default()
            )));
        }
        self.line.clear();
        serde_json::to_writer(&mut self.line, f).map_err(io::Error::other)?;
        self.line.push(b'\n');
        self.enc.write_all(&self.line)?;
        self.last = Some(f.path.clone());
        self.count += 1;
        Ok(())
    }

    /// Ends the list: the sink, and what the manifest says of it.
    pub fn finish(self) -> io::Result<(W, FileListRef)> {
        let (out, digest) = self.enc.finish()?;
        Ok((
            out,
            FileListRef {
                sha256: digest.sha256.to_hex(),
                count: self.count,
            },
        ))
    }
}

/// A backup's file list, decoded and checked, in a temporary file (removed
/// when dropped).
#[derive(Debug)]
pub struct LocalFileList {
    file: tempfile::NamedTempFile,
    count: u64,
    /// The object it was read from, for messages.
    what: String,
}

impl LocalFileList {
    /// Files in the list.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Its entries, a line at a time (blocking: read on a blocking thread).
    pub fn iter(&self) -> Result<Entries> {
        let mut f = self
            .file
            .reopen()
            .map_err(|e| Error::io_in(crate::error::Kind::Internal, "reopen a file list", &e))?;
        f.rewind()
            .map_err(|e| Error::io_in(crate::error::Kind::Internal, "reopen a file list", &e))?;
        Ok(Entries {
            lines: BufReader::with_capacity(64 << 10, f),
            line: String::new(),
            what: self.what.clone(),
            n: 0,
        })
    }

    /// A list of `entries` (tests, and lists built here).
    pub fn from_entries<'a>(
        entries: impl IntoIterator<Item = &'a FileEntry>,
        what: &str,
    ) -> io::Result<LocalFileList> {
        let mut out = LineSink::new()?;
        for e in entries {
            out.push(e)?;
        }
        out.finish(what)
    }

    /// Decodes an encoded list from `input`, checking it against `expect`
    /// (blocking), opened with `keys` and bound to `bind` (the object's
    /// key). `what` names the object in messages.
    pub fn decode(
        input: impl Read,
        expect: &FileListRef,
        what: &str,
        keys: &Keys,
        bind: Binding<'_>,
    ) -> Result<LocalFileList> {
        Self::decode_fetched(input, expect, what, keys, bind)?
            .found(|| format!("{what} is missing"))
    }

    /// [`LocalFileList::decode`], a damaged list (corrupt, cut, not the
    /// manifest's) an outcome, [`Fetched::Damaged`]; a transfer that failed,
    /// a key that does not open it or a local failure stays an error.
    pub fn decode_fetched(
        input: impl Read,
        expect: &FileListRef,
        what: &str,
        keys: &Keys,
        bind: Binding<'_>,
    ) -> Result<Fetched<LocalFileList>> {
        let tmp = temp_file()?;
        let mut out = BufWriter::with_capacity(64 << 10, tmp);
        let digest = match codec::decode(input, &mut out, keys, bind) {
            Ok(d) => d,
            Err(e) if e.is_corruption() => return Ok(Fetched::Damaged(format!("{what}: {e}"))),
            Err(e) => return Err(super::keys::decode_error(&format!("read {what}"), e)),
        };
        let tmp = out.into_inner().map_err(|e| temp_err(e.into_error()))?;
        if digest.sha256.to_hex() != expect.sha256 {
            return Ok(Fetched::Damaged(format!(
                "{what}: not the file list the manifest was written with (SHA-256 {}, the manifest says {})",
                digest.sha256, expect.sha256
            )));
        }
        // The count is checked as the lines are read.
        Ok(Fetched::Found(LocalFileList {
            file: tmp,
            count: expect.count,
            what: what.to_string(),
        }))
    }

    /// The `files` of a format-1 manifest (a decoded manifest object in
    /// `input`), streamed out of the JSON (blocking).
    pub fn from_format1(input: impl Read, what: &str) -> Result<LocalFileList> {
        Self::format1_fetched(input, what)?.found(|| format!("{what} is missing"))
    }

    fn format1_fetched(input: impl Read, what: &str) -> Result<Fetched<LocalFileList>> {
        let mut sink = LineSink::new().map_err(temp_err)?;
        let mut de = serde_json::Deserializer::from_reader(BufReader::new(input));
        if let Err(e) = ManifestFiles(&mut sink).deserialize(&mut de) {
            return Ok(Fetched::Damaged(format!(
                "{what}: unreadable manifest: {e}"
            )));
        }
        sink.finish(what).map(Fetched::Found).map_err(temp_err)
    }
}

fn temp_file() -> Result<tempfile::NamedTempFile> {
    tempfile::Builder::new()
        .prefix("pgvault-files-")
        .tempfile()
        .map_err(temp_err)
}

/// Decodes an object into a temporary file (checked: the codec verifies
/// the checksum at the end), and opens it again for reading from its
/// start; the temporary file goes when the second value is dropped. The
/// codec's error is the inner one (blocking).
#[allow(clippy::type_complexity)]
fn decode_to_temp(
    reader: impl Read,
    keys: &Keys,
    bind: Binding<'_>,
) -> Result<std::result::Result<(File, tempfile::NamedTempFile), codec::CodecError>> {
    let mut tmp = temp_file()?;
    let mut out = BufWriter::with_capacity(64 << 10, tmp.as_file_mut());
    if let Err(e) = codec::decode(reader, &mut out, keys, bind) {
        return Ok(Err(e));
    }
    out.flush().map_err(temp_err)?;
    drop(out);
    let mut f = tmp.reopen().map_err(temp_err)?;
    f.rewind().map_err(temp_err)?;
    Ok(Ok((f, tmp)))
}

fn temp_err(e: io::Error) -> Error {
    Error::io_in(
        crate::error::Kind::Internal,
        "write a file list to a temporary file",
        &e,
    )
}

/// A local list being written, a line per entry (no order required).
struct LineSink {
    out: BufWriter<tempfile::NamedTempFile>,
    count: u64,
}

impl LineSink {
    fn new() -> io::Result<LineSink> {
        let tmp = tempfile::Builder::new()
            .prefix("pgvault-files-")
            .tempfile()?;
        Ok(LineSink {
            out: BufWriter::with_capacity(64 << 10, tmp),
            count: 0,
        })
    }

    fn push(&mut self, e: &FileEntry) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, e).map_err(io::Error::other)?;
        self.out.write_all(b"\n")?;
        self.count += 1;
        Ok(())
    }

    fn finish(self, what: &str) -> io::Result<LocalFileList> {
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        Ok(LocalFileList {
            file,
            count: self.count,
            what: what.to_string(),
        })
    }
}

/// The entries of a [`LocalFileList`].
pub struct Entries {
    lines: BufReader<File>,
    line: String,
    what: String,
    n: u64,
}

impl Iterator for Entries {
    type Item = Result<FileEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        self.line.clear();
        match self.lines.read_line(&mut self.line) {
            Ok(0) => None,
            Ok(_) => {
                self.n += 1;
                Some(
                    serde_json::from_str(self.line.trim_end()).map_err(|e| {
                        Error::repository(format!("{}: file {}: {e}", self.what, self.n))
                    }),
                )
            }
            Err(e) => Some(Err(Error::io_in(
                crate::error::Kind::Internal,
                "read a file list from its temporary file",
                &e,
            ))),
        }
    }
}

/// Deserializes a format-1 manifest, writing each of its `files` to the
/// sink and skipping everything else.
struct ManifestFiles<'a>(&'a mut LineSink);

impl<'de> DeserializeSeed<'de> for ManifestFiles<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for ManifestFiles<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a manifest")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<(), A::Error> {
        while let Some(key) = map.next_key::<String>()? {
            if key == "files" {
                map.next_value_seed(FilesSeq(&mut *self.0))?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

struct FilesSeq<'a>(&'a mut LineSink);

impl<'de> DeserializeSeed<'de> for FilesSeq<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for FilesSeq<'_> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of files")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<(), A::Error> {
        while let Some(e) = seq.next_element::<FileEntry>()? {
            self.0.push(&e).map_err(serde::de::Error::custom)?;
        }
        Ok(())
    }
}

/// The number of files of a format-1 manifest's inline list, counted as it
/// is read and not kept: readers of manifests (every backup's, for `info`,
/// `expire`, `verify`) never hold the files; [`Repository::file_list`]
/// streams them when a command needs them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InlineFiles(pub u64);

impl<'de> Deserialize<'de> for InlineFiles {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Count;
        impl<'de> Visitor<'de> for Count {
            type Value = InlineFiles;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of files")
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<InlineFiles, A::Error> {
                let mut n = 0;
                while seq.next_element::<IgnoredAny>()?.is_some() {
                    n += 1;
                }
                Ok(InlineFiles(n))
            }
        }
        d.deserialize_seq(Count)
    }
}

/// The object that stores a piece of a file, as commands group a file list
/// by it: `<backup>/<object>` (labels hold no `/`).
pub fn object_group(backup: &str, object: &str) -> String {
    format!("{backup}/{object}")
}

/// The backup and object of an [`object_group`].
pub fn split_object_group(group: &str) -> Result<(&str, &str)> {
    group
        .split_once('/')
        .ok_or_else(|| Error::internal(format!("not a backup's object: {group}")))
}

impl Repository {
    /// A manifest object decoded through a temporary file and parsed as a
    /// stream: a format-1 manifest's inline files are counted, never held
    /// (see [`InlineFiles`]), whatever the size of the object. Outcomes as
    /// [`Repository::fetch_json`].
    pub(crate) async fn fetch_manifest_streamed(&self, key: &str) -> Result<Fetched<Manifest>> {
        let Some(reader) = self.backend().get(key).await? else {
            return Ok(Fetched::Missing);
        };
        let what = format!("{}/{key}", self.describe());
        let keys = self.keys().await?;
        let key = key.to_string();
        tokio::task::spawn_blocking(move || {
            let bind = Binding::object(layout::binding_name(&key));
            let (f, _tmp) = match decode_to_temp(reader, &keys, bind)? {
                Ok(f) => f,
                Err(e) if e.is_corruption() => return Ok(Fetched::Damaged(format!("{what}: {e}"))),
                Err(e) => return Err(super::keys::decode_error(&format!("read {what}"), e)),
            };
            Ok(match serde_json::from_reader(BufReader::new(f)) {
                Ok(m) => Fetched::Found(m),
                Err(e) => Fetched::Damaged(format!("{what}: unreadable metadata: {e}")),
            })
        })
        .await?
    }

    /// The file list of backup `m`, decoded and checked into a temporary
    /// file.
    pub async fn file_list(&self, m: &Manifest) -> Result<LocalFileList> {
        self.fetch_file_list(m).await?.found(|| {
            let (key, _) = self.file_list_key(m);
            format!("backup {}: {}/{key} is missing", m.label, self.describe())
        })
    }

    /// The object that holds backup `m`'s file list, and what its manifest
    /// says of it (none for a format-1 manifest, which holds the list).
    fn file_list_key(&self, m: &Manifest) -> (String, Option<FileListRef>) {
        match &m.file_list {
            Some(r) => (
                layout::backup_file_list_key(self.stanza(), &m.label),
                Some(r.clone()),
            ),
            None => (layout::backup_manifest_key(self.stanza(), &m.label), None),
        }
    }

    /// [`Repository::file_list`], a missing or damaged list an outcome (for
    /// verify, which reports it and goes on); a store that cannot be read,
    /// or a key that does not open the list, stays an error.
    pub async fn fetch_file_list(&self, m: &Manifest) -> Result<Fetched<LocalFileList>> {
        let (key, expect) = self.file_list_key(m);
        let what = format!("{}/{key}", self.describe());
        let Some(reader) = self.backend().get(&key).await? else {
            return Ok(Fetched::Missing);
        };
        let keys = self.keys().await?;
        tokio::task::spawn_blocking(move || {
            let bind = Binding::object(layout::binding_name(&key));
            match expect {
                Some(r) => LocalFileList::decode_fetched(reader, &r, &what, &keys, bind),
                None => {
                    // Format 1: decode the manifest object, then stream its
                    // files out of it.
                    let (f, _tmp) = match decode_to_temp(reader, &keys, bind)? {
                        Ok(decoded) => decoded,
                        Err(e) if e.is_corruption() => {
                            return Ok(Fetched::Damaged(format!("{what}: {e}")))
                        }
                        Err(e) => {
                            return Err(super::keys::decode_error(&format!("read {what}"), e))
                        }
                    };
                    LocalFileList::format1_fetched(f, &what)
                }
            }
        })
        .await?
    }

    /// Writes the file list of backup `label` from `entries` (in path
    /// order) and returns what its manifest says of it. Blocking work goes
    /// to a blocking thread.
    pub async fn write_file_list<I>(&self, label: &str, entries: I) -> Result<FileListRef>
    where
        I: Iterator<Item = Result<FileEntry>> + Send + 'static,
    {
        let key = layout::backup_file_list_key(self.stanza(), label);
        let dir = layout::backup_dir(self.stanza(), label);
        let backend = self.backend().clone();
        let what = format!("{}/{key}", self.describe());
        let what2 = what.clone();
        let keys = self.keys().await?;
        let key2 = key.clone();
        let (spool, list) = tokio::task::spawn_blocking(move || -> Result<_> {
            let werr = |e: io::Error| Error::repository(format!("write {what2}: {e}"));
            let spool = backend.spool(&dir).map_err(werr)?;
            let bind = Binding::object(&key2);
            let mut w =
                FileListWriter::new(spool, EncodeOptions::default(), &keys, bind).map_err(werr)?;
            for e in entries {
                w.push(&e?).map_err(werr)?;
            }
            w.finish().map_err(werr)
        })
        .await??;
        match self
            .backend()
            .commit(spool, &key, PutMode::CreateNew)
            .await?
        {
            PutOutcome::Created => Ok(list),
            PutOutcome::AlreadyExists => Err(Error::repository(format!(
                "{what} exists already: another backup under label {label}?"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn entry(i: u64) -> FileEntry {
        FileEntry {
            path: format!("base/16384/{:08}", i),
            size: i * 8192,
            mtime: 1_700_000_000,
            mode: 0o600,
            sha256: format!("{:064x}", i),
            object: format!("data/00-{:06}.pgv", i / 1000),
            offset: i * 100,
            length: 100,
            backup: None,
            parts: Vec::new(),
            chunk_blocks: None,
        }
    }

    #[test]
    fn a_list_roundtrips_and_is_checked() {
        let entries: Vec<FileEntry> = (0..3000).map(entry).collect();
        let mut w = FileListWriter::new(
            Vec::new(),
            EncodeOptions::default(),
            &Keys::none(),
            Binding::object("files.pgv"),
        )
        .unwrap();
        for e in &entries {
            w.push(e).unwrap();
        }
        let (bytes, r) = w.finish().unwrap();
        assert_eq!(r.count, 3000);
        let list = LocalFileList::decode(
            &bytes[..],
            &r,
            "files.pgv",
            &Keys::none(),
            Binding::object("files.pgv"),
        )
        .unwrap();
        let back: Vec<FileEntry> = list.iter().unwrap().map(|e| e.unwrap()).collect();
        assert_eq!(back, entries);
        // Twice: a list is read as often as a command needs.
        assert_eq!(list.iter().unwrap().count(), 3000);

        // Another list than the manifest's, or a damaged one: refused.
        let other = FileListRef {
            sha256: "00".repeat(32),
            ..r.clone()
        };
        let e = LocalFileList::decode(
            &bytes[..],
            &other,
            "files.pgv",
            &Keys::none(),
            Binding::object("files.pgv"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not the file list"), "{e}");
        let mut flipped = bytes.clone();
        let at = flipped.len() / 2;
        flipped[at] ^= 1;
        assert!(LocalFileList::decode(
            &flipped[..],
            &r,
            "files.pgv",
            &Keys::none(),
            Binding::object("files.pgv")
        )
        .is_err());
    }

    /// Through a repository: a format-2 backup's list written and read
    /// back; a format-1 manifest (files inline) read as a header with its
    /// files counted, and its list streamed; another backup's list refused.
    #[tokio::test]
    async fn lists_of_both_formats_through_a_repository() {
        use crate::repo::manifest::{test_manifest, ManifestRead};
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::local_for_tests(dir.path(), "s");
        let entries: Vec<FileEntry> = (0..100).map(entry).collect();
        let mut m = test_manifest("20260101-000000F", 1, 0x1000, "2026-01-01T00:00:00Z");
        let list = repo
            .write_file_list(&m.label, entries.clone().into_iter().map(Ok))
            .await
            .unwrap();
        assert_eq!(list.count, 100);
        m.file_list = Some(list);
        m.header.file_count = 100;
        repo.write_manifest(&m).await.unwrap();
        let Some(ManifestRead::Found(back)) = repo.read_manifest(&m.label).await.unwrap() else {
            panic!("the manifest reads back");
        };
        let files = repo.file_list(&back).await.unwrap();
        let got: Vec<FileEntry> = files.iter().unwrap().map(|e| e.unwrap()).collect();
        assert_eq!(got, entries);

        // Format 1: the same entries inline.
        let old = "20260102-000000F";
        let mut v =
            serde_json::to_value(test_manifest(old, 1, 0x2000, "2026-01-02T00:00:00Z")).unwrap();
        v["format"] = 1.into();
        v["file_count"] = 0.into();
        v.as_object_mut().unwrap().remove("file_list");
        v["files"] = serde_json::to_value(&entries).unwrap();
        let key = layout::backup_manifest_key("s", old);
        repo.put_json(&key, &v, PutMode::CreateNew).await.unwrap();
        let Some(ManifestRead::Found(m1)) = repo.read_manifest(old).await.unwrap() else {
            panic!("a format-1 manifest reads");
        };
        assert_eq!(m1.file_count, 100, "counted from the inline files");
        let files = repo.file_list(&m1).await.unwrap();
        assert_eq!(
            files
                .iter()
                .unwrap()
                .map(|e| e.unwrap())
                .collect::<Vec<_>>(),
            entries
        );

        // Another backup's list under this manifest: refused.
        let mut other = (*back).clone();
        other.file_list = Some(FileListRef {
            sha256: "ab".repeat(32),
            count: 100,
        });
        let e = repo.file_list(&other).await.unwrap_err();
        assert!(e.to_string().contains("not the file list"), "{e}");
        assert!(matches!(
            repo.fetch_file_list(&other).await.unwrap(),
            Fetched::Damaged(why) if why.contains("not the file list")
        ));

        // A store that cannot hand the list over (every attempt fails) is
        // an error, never a damaged list: verify must not call it corrupt.
        let config = crate::repo::fault::FaultConfig {
            error: 1.0,
            attempts: 2,
            ..Default::default()
        };
        let faulty = Repository::with_backend(
            std::sync::Arc::new(crate::repo::fault::FaultBackend::new(
                repo.backend().clone(),
                config,
            )),
            repo.location().clone(),
            "s",
        );
        let Err(e) = faulty.fetch_file_list(&back).await else {
            panic!("a store that fails every attempt gave a result");
        };
        assert!(e.to_string().contains("failed after 2 attempts"), "{e}");

        // A flipped byte in the stored list: damaged; the list gone: missing.
        let path = dir
            .path()
            .join(layout::backup_file_list_key("s", &back.label));
        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x10;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            repo.fetch_file_list(&back).await.unwrap(),
            Fetched::Damaged(_)
        ));
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            repo.fetch_file_list(&back).await.unwrap(),
            Fetched::Missing
        ));
        let e = repo.file_list(&back).await.unwrap_err();
        assert!(e.to_string().contains("files.pgv is missing"), "{e}");
    }

    #[test]
    fn out_of_order_is_refused() {
        let mut w = FileListWriter::new(
            Vec::new(),
            EncodeOptions::default(),
            &Keys::none(),
            Binding::object("files.pgv"),
        )
        .unwrap();
        w.push(&entry(2)).unwrap();
        assert!(w.push(&entry(1)).is_err());
        assert!(w.push(&entry(2)).is_err(), "a path twice");
    }

    #[test]
    fn a_format1_manifest_streams_its_files_and_counts_them() {
        let mut m = serde_json::to_value(crate::repo::manifest::test_manifest(
            "a",
            1,
            0x100,
            "2026-01-01T00:00:00Z",
        ))
        .unwrap();
        m["format"] = 1.into();
        m["files"] = serde_json::to_value((0..50).map(entry).collect::<Vec<_>>()).unwrap();
        let text = serde_json::to_vec_pretty(&m).unwrap();
        let list = LocalFileList::from_format1(&text[..], "manifest.pgv").unwrap();
        assert_eq!(list.count(), 50);
        let back: Vec<FileEntry> = list.iter().unwrap().map(|e| e.unwrap()).collect();
        assert_eq!(back[49], entry(49));
        let read: Manifest = serde_json::from_slice(&text).unwrap();
        assert_eq!(read.inline_files, InlineFiles(50));
    }
}
