//! Block sums: a checksum of every 8 KiB block of every relation file a
//! backup holds, as restore lays it down (before WAL replay), in one object
//! per backup (`<label>/blocksums.pgv`), beside the manifest rather than in
//! it: a terabyte cluster has 128 Mi blocks, 2 GiB of sums, which the JSON
//! manifest must not carry.
//!
//! What they are for: an incremental whose WAL cannot answer for a file
//! compares the file block by block with its reference's sums and stores
//! only the blocks that differ (`ops::backup`); `restore --delta` compares
//! the files on disk with them and writes only the blocks that differ;
//! `verify` checks each stored block against them.
//!
//! The sum is XXH3-128 of the block (16 bytes): it only has to tell a
//! changed block from an unchanged one — a collision would need 2^64 blocks
//! by chance, and whoever can write the data directory needs no collision
//! to change what is backed up — while every object's integrity stays
//! SHA-256's (`repo::codec`). XXH3 hashes at memory speed, so summing a
//! block costs far less than reading it.
//!
//! Format (inside one codec envelope, streamed): the magic `PGVBSUM1`,
//! then one record per file: path length (u16 LE), path (UTF-8), block
//! count (u32 LE), that many 16-byte sums. Records are in no order (each
//! worker's in turn). A reader decodes the object into a temporary file and
//! indexes where each file's sums are in a scratch database on disk
//! (`catalog::scratch`), so that neither the sums nor their index are in
//! memory, whatever the number of files (issue 14).

use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

use super::codec::{self, EncodeOptions, Encoder};
use super::{layout, Fetched, PutMode, Repository};
use crate::catalog::scratch::{self, Row, Rows, Scratch};
use crate::error::{Error, Kind, Result};
use crate::pg::relfile::BLOCK_SIZE;

/// The checksum of one block.
pub type BlockSum = [u8; SUM_LEN];
pub const SUM_LEN: usize = 16;
const MAGIC: &[u8; 8] = b"PGVBSUM1";

/// The sum of one block (a short last block is summed as it is).
pub fn block_sum(block: &[u8]) -> BlockSum {
    xxhash_rust::xxh3::xxh3_128(block).to_le_bytes()
}

/// Sums a stream of blocks as it passes (a file being read, or a part's
/// raw bytes being decoded).
#[derive(Default)]
pub struct Summer {
    partial: Vec<u8>,
    sums: Vec<BlockSum>,
}

impl Summer {
    pub fn new() -> Self {
        Summer::default()
    }

    /// The sums of the blocks seen, the last one possibly short.
    pub fn finish(mut self) -> Vec<BlockSum> {
        if !self.partial.is_empty() {
            self.sums.push(block_sum(&self.partial));
        }
        self.sums
    }
}

impl Write for Summer {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        let n = buf.len();
        if !self.partial.is_empty() {
            let take = (BLOCK_SIZE - self.partial.len()).min(buf.len());
            self.partial.extend_from_slice(&buf[..take]);
            buf = &buf[take..];
            if self.partial.len() == BLOCK_SIZE {
                self.sums.push(block_sum(&self.partial));
                self.partial.clear();
            }
        }
        let mut blocks = buf.chunks_exact(BLOCK_SIZE);
        for b in &mut blocks {
            self.sums.push(block_sum(b));
        }
        self.partial.extend_from_slice(blocks.remainder());
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The sums of the blocks of a file on disk; `None` if it does not exist.
pub fn sums_of_file(path: &std::path::Path) -> io::Result<Option<Vec<BlockSum>>> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut s = Summer::new();
    io::copy(&mut BufReader::with_capacity(1 << 20, file), &mut s)?;
    Ok(Some(s.finish()))
}

/// One worker's records, gathered in a local temporary file until the
/// backup's object is written.
pub struct SumsSink {
    out: BufWriter<File>,
}

impl SumsSink {
    pub fn new() -> io::Result<Self> {
        Ok(SumsSink {
            out: BufWriter::new(tempfile::tempfile()?),
        })
    }

    pub fn add(&mut self, path: &str, sums: &[BlockSum]) -> io::Result<()> {
        let len = u16::try_from(path.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path too long"))?;
        let count = u32::try_from(sums.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many blocks"))?;
        self.out.write_all(&len.to_le_bytes())?;
        self.out.write_all(path.as_bytes())?;
        self.out.write_all(&count.to_le_bytes())?;
        for s in sums {
            self.out.write_all(s)?;
        }
        Ok(())
    }

    fn into_file(self) -> io::Result<File> {
        let mut f = self.out.into_inner().map_err(|e| e.into_error())?;
        f.seek(SeekFrom::Start(0))?;
        Ok(f)
    }
}

/// The scratch table of the index: key the path (after the reader's
/// prefix), group the backup, `o` where its sums start in the decoded
/// file, `w` how many there are.
const TABLE: &str = "blocksums";
/// Records indexed per transaction.
const INDEX_BATCH: usize = 4096;

/// A backup's block sums, read: decoded into a temporary file, with where
/// each file's sums are in a scratch database (its own, or one that several
/// backups' sums share, their keys apart by a prefix).
pub struct BlockSums {
    file: File,
    db: scratch::Shared,
    /// `<label>/` in a shared database, empty in its own.
    prefix: String,
    label: String,
}

impl std::fmt::Debug for BlockSums {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockSums")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

fn scratch_err(e: scratch::ScratchError) -> io::Error {
    io::Error::other(e.to_string())
}

impl BlockSums {
    /// Where `path`'s sums are: their offset and count.
    fn locate(&self, path: &str) -> io::Result<Option<(u64, u32)>> {
        let db = self
            .db
            .lock()
            .map_err(|_| io::Error::other("scratch database: a thread failed holding it"))?;
        let row = db
            .get(TABLE, &format!("{}{path}", self.prefix))
            .map_err(scratch_err)?;
        Ok(row.map(|r| (r.o as u64, r.w as u32)))
    }

    /// The sums of `path`'s blocks; `None`: the backup has none for it.
    pub fn get(&self, path: &str) -> io::Result<Option<Vec<BlockSum>>> {
        let Some((at, n)) = self.locate(path)? else {
            return Ok(None);
        };
        let mut raw = vec![0u8; n as usize * SUM_LEN];
        self.file.read_exact_at(&mut raw, at)?;
        Ok(Some(
            raw.chunks_exact(SUM_LEN)
                .map(|c| c.try_into().expect("chunks of SUM_LEN"))
                .collect(),
        ))
    }

    /// How many blocks `path` has sums for (`None`: none).
    pub fn count(&self, path: &str) -> io::Result<Option<u32>> {
        Ok(self.locate(path)?.map(|(_, n)| n))
    }

    /// The files it has sums for whose path table `listed` of its
    /// database does not hold as `<prefix><path>` (see
    /// [`BlockSums::listed_key`]), in path order, with their block counts:
    /// the files the sums name and a file list does not, found on disk.
    pub fn unlisted(&self, listed: &str) -> impl Iterator<Item = Result<(String, u32)>> + '_ {
        Rows::unmatched(self.db.clone(), TABLE, listed, Some(&self.label)).map(move |r| {
            let r = r?.row;
            let path = r.k.strip_prefix(&self.prefix).unwrap_or(&r.k).to_string();
            Ok((path, r.w as u32))
        })
    }

    /// The key of `path` in a table of its database that
    /// [`BlockSums::unlisted`] reads.
    pub fn listed_key(&self, path: &str) -> String {
        format!("{}{path}", self.prefix)
    }

    /// The scratch database its index is in.
    pub fn db(&self) -> &scratch::Shared {
        &self.db
    }

    /// Reads the decoded records of `file` into an index in `db`, under
    /// `label`'s prefix (`shared`) or none. A damaged object may leave some
    /// of its rows behind in a shared database: nothing reads them, the
    /// caller has no `BlockSums` for that backup.
    fn index(file: File, db: scratch::Shared, label: &str, shared: bool) -> io::Result<BlockSums> {
        let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_string());
        let prefix = if shared {
            format!("{label}/")
        } else {
            String::new()
        };
        let lock = || {
            db.lock()
                .map_err(|_| io::Error::other("scratch database: a thread failed holding it"))
        };
        lock()?.create_table(TABLE).map_err(scratch_err)?;
        let len = file.metadata()?.len();
        (&file).seek(SeekFrom::Start(0))?;
        let mut r = BufReader::new(&file);
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(bad("not a block sums object"));
        }
        let mut at = MAGIC.len() as u64;
        let mut rows = Vec::with_capacity(INDEX_BATCH);
        while at < len {
            let mut l = [0u8; 2];
            r.read_exact(&mut l)?;
            let mut path = vec![0u8; usize::from(u16::from_le_bytes(l))];
            r.read_exact(&mut path)?;
            let mut c = [0u8; 4];
            r.read_exact(&mut c)?;
            let n = u32::from_le_bytes(c);
            let path = String::from_utf8(path).map_err(|_| bad("a path is not UTF-8"))?;
            at += 2 + path.len() as u64 + 4;
            let bytes = u64::from(n) * SUM_LEN as u64;
            if at + bytes > len {
                return Err(bad("a record runs past the end"));
            }
            r.seek_relative(bytes as i64)?;
            rows.push(Row {
                k: format!("{prefix}{path}"),
                g: label.to_string(),
                o: at as i64,
                w: i64::from(n),
                v: Vec::new(),
            });
            if rows.len() >= INDEX_BATCH {
                // A path recorded twice: the last record wins, as it did
                // when the index was a map in memory.
                lock()?.replace(TABLE, &rows).map_err(scratch_err)?;
                rows.clear();
            }
            at += bytes;
        }
        lock()?.replace(TABLE, &rows).map_err(scratch_err)?;
        drop(r);
        Ok(BlockSums {
            file,
            db,
            prefix,
            label: label.to_string(),
        })
    }
}

impl Repository {
    /// Writes backup `label`'s block sums from the workers' records:
    /// before the manifest, like every object the manifest relies on.
    pub async fn write_block_sums(
        &self,
        label: &str,
        sinks: Vec<SumsSink>,
        opts: EncodeOptions,
    ) -> Result<()> {
        let key = layout::backup_block_sums_key(self.stanza(), label);
        let what = format!("{}/{key}", self.describe());
        let backend = self.backend().clone();
        let dir = layout::backup_dir(self.stanza(), label);
        let what2 = what.clone();
        let keys = self.keys().await?;
        let key2 = key.clone();
        let spool = tokio::task::spawn_blocking(move || -> io::Result<_> {
            let bind = codec::Binding::object(&key2);
            let mut enc = Encoder::new(backend.spool(&dir)?, opts, &keys, bind)?;
            enc.write_all(MAGIC)?;
            for s in sinks {
                io::copy(&mut s.into_file()?, &mut enc)?;
            }
            Ok(enc.finish()?.0)
        })
        .await?
        .map_err(|e| Error::io(Kind::Repository, "write", &what2, &e))?;
        self.backend()
            .commit(spool, &key, PutMode::CreateNew)
            .await
            .map_err(|e| e.context(format!("write {what}")))?;
        Ok(())
    }

    /// Backup `label`'s block sums: `Missing` for a backup written before
    /// pgvault kept them, `Damaged` naming the object and the cause. Their
    /// index goes to a scratch database of their own.
    pub async fn read_block_sums(&self, label: &str) -> Result<Fetched<BlockSums>> {
        self.read_block_sums_into(label, None).await
    }

    /// [`Repository::read_block_sums`], the index in `db` (shared with
    /// other backups' sums, under a prefix of `label`'s) if given: a
    /// command that holds several backups' sums (`verify`) keeps one
    /// database, not one page cache per backup.
    pub async fn read_block_sums_into(
        &self,
        label: &str,
        db: Option<scratch::Shared>,
    ) -> Result<Fetched<BlockSums>> {
        let key = layout::backup_block_sums_key(self.stanza(), label);
        let what = format!("{}/{key}", self.describe());
        let Some(reader) = self.backend().get(&key).await? else {
            return Ok(Fetched::Missing);
        };
        let keys = self.keys().await?;
        let label = label.to_string();
        tokio::task::spawn_blocking(move || {
            let tmp = tempfile::tempfile()
                .map_err(|e| Error::io_in(Kind::Internal, "create a temporary file", &e))?;
            let mut out = BufWriter::new(tmp);
            match codec::decode(reader, &mut out, &keys, codec::Binding::object(&key)) {
                Ok(_) => {}
                Err(e) if e.is_corruption() => return Ok(Fetched::Damaged(format!("{what}: {e}"))),
                Err(e) => return Err(crate::repo::keys::decode_error(&format!("read {what}"), e)),
            }
            let file = out.into_inner().map_err(|e| {
                Error::io_in(Kind::Internal, "write a temporary file", &e.into_error())
            })?;
            let shared = db.is_some();
            let db = match db {
                Some(db) => db,
                None => Scratch::new(&[])?.shared(),
            };
            match BlockSums::index(file, db, &label, shared) {
                Ok(s) => Ok(Fetched::Found(s)),
                Err(e)
                    if e.kind() == io::ErrorKind::InvalidData
                        || e.kind() == io::ErrorKind::UnexpectedEof =>
                {
                    Ok(Fetched::Damaged(format!("{what}: {e}")))
                }
                Err(e) => Err(Error::io_in(
                    Kind::Internal,
                    format!("index the block sums of {what}"),
                    &e,
                )),
            }
        })
        .await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summer_sums_each_block_whatever_the_writes() {
        let mut data = vec![1u8; BLOCK_SIZE];
        data.extend(vec![2u8; BLOCK_SIZE]);
        data.extend(vec![3u8; 100]);
        let mut s = Summer::new();
        for c in data.chunks(3000) {
            s.write_all(c).unwrap();
        }
        let sums = s.finish();
        assert_eq!(
            sums,
            vec![
                block_sum(&data[..BLOCK_SIZE]),
                block_sum(&data[BLOCK_SIZE..2 * BLOCK_SIZE]),
                block_sum(&data[2 * BLOCK_SIZE..])
            ]
        );
        assert_ne!(sums[0], sums[1]);
    }

    /// The decoded records of `sinks`, as the object holds them.
    fn decoded(sinks: Vec<SumsSink>) -> Vec<u8> {
        let mut raw = MAGIC.to_vec();
        for s in sinks {
            s.into_file().unwrap().read_to_end(&mut raw).unwrap();
        }
        raw
    }

    fn file_of(raw: &[u8]) -> File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(raw).unwrap();
        f
    }

    fn own_db() -> scratch::Shared {
        Scratch::new(&[]).unwrap().shared()
    }

    #[test]
    fn records_read_back_by_path() {
        let mut a = SumsSink::new().unwrap();
        a.add("base/1/2", &[block_sum(b"x"), block_sum(b"y")])
            .unwrap();
        let mut b = SumsSink::new().unwrap();
        b.add("base/1/3", &[]).unwrap();
        b.add("base/1/4", &[block_sum(b"z")]).unwrap();
        let raw = decoded(vec![a, b]);
        let sums = BlockSums::index(file_of(&raw), own_db(), "l", false).unwrap();
        assert_eq!(
            sums.get("base/1/2").unwrap().unwrap(),
            vec![block_sum(b"x"), block_sum(b"y")]
        );
        assert!(sums.get("base/1/3").unwrap().unwrap().is_empty());
        assert_eq!(
            sums.get("base/1/4").unwrap().unwrap(),
            vec![block_sum(b"z")]
        );
        assert_eq!(sums.get("base/1/5").unwrap(), None);
        assert_eq!(sums.count("base/1/2").unwrap(), Some(2));
        assert_eq!(sums.count("base/1/5").unwrap(), None);

        let cut = file_of(&raw[..raw.len() - 3]);
        assert!(BlockSums::index(cut, own_db(), "l", false).is_err());
    }

    /// Two backups' sums in one database stay apart; what a list does not
    /// name is found there, per backup; a path recorded twice reads as its
    /// last record.
    #[test]
    fn shared_index_keeps_backups_apart() {
        let db = Scratch::new(&["listed"]).unwrap().shared();
        let mut a = SumsSink::new().unwrap();
        a.add("base/1/2", &[block_sum(b"a")]).unwrap();
        a.add("base/1/3", &[block_sum(b"a"), block_sum(b"b")])
            .unwrap();
        a.add("base/1/2", &[block_sum(b"c")]).unwrap();
        let mut b = SumsSink::new().unwrap();
        b.add("base/1/2", &[]).unwrap();
        let one = BlockSums::index(file_of(&decoded(vec![a])), db.clone(), "one", true).unwrap();
        let two = BlockSums::index(file_of(&decoded(vec![b])), db.clone(), "two", true).unwrap();
        assert_eq!(one.get("base/1/2").unwrap().unwrap(), vec![block_sum(b"c")]);
        assert_eq!(two.count("base/1/2").unwrap(), Some(0));
        assert_eq!(two.count("base/1/3").unwrap(), None);
        db.lock()
            .unwrap()
            .insert(
                "listed",
                &[Row {
                    k: one.listed_key("base/1/2"),
                    ..Row::default()
                }],
            )
            .unwrap();
        let left: Vec<(String, u32)> = one.unlisted("listed").map(|r| r.unwrap()).collect();
        assert_eq!(left, vec![("base/1/3".to_string(), 2)]);
        let left: Vec<(String, u32)> = two.unlisted("listed").map(|r| r.unwrap()).collect();
        assert_eq!(left, vec![("base/1/2".to_string(), 0)]);
    }
}
