//! Block-level writes: parts of files stored as block maps (each block
//! written once, by its newest holder), chunks fetched by range, and
//! `--delta`'s comparison of relation files on disk with the backup's
//! block sums.

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use crate::catalog::scratch::{self, Row, Scratch};
use crate::error::{Error, Kind, Result, WriteWatch};
use crate::ops::workers;
use crate::repo::blockmap::{self, Part, PartWriter};
use crate::repo::blocksums::{self, BlockSums};
use crate::repo::chunked;
use crate::repo::codec::{self, Binding, Check, Keys};
use crate::repo::filelist::LocalFileList;
use crate::repo::keys::decode_error;
use crate::repo::manifest::FileEntry;
use crate::repo::Backend;

use super::durable::local_err;
use super::pieces::{json, BATCH};

/// `--delta` with the backup's block sums: the relation files on disk
/// compared block by block, and only the blocks that differ written.
#[derive(Debug, Clone, Default, serde::Serialize, PartialEq, Eq)]
pub struct DeltaBlocks {
    /// Relation files compared, and their blocks.
    pub files: u64,
    pub blocks: u64,
    /// Blocks that differed (or were missing) and were written.
    pub blocks_written: u64,
    /// Bytes read from the repository for them and the other files.
    pub bytes_fetched: u64,
}

/// `--delta`: the blocks of each relation file on disk whose sums differ
/// from the backup's (or that it lacks), for the files the backup has sums
/// for; one that is the backup's already has none. Files are read
/// `process_max` at a time, and what differs goes to a scratch database
/// (table `diffs`, by path), not memory.
pub(super) async fn differing_blocks(
    pgdata: &Path,
    list: Arc<LocalFileList>,
    sums: BlockSums,
    process_max: usize,
) -> Result<(scratch::Shared, DeltaBlocks)> {
    let db = Scratch::new(&["diffs"])?.shared();
    let sums = Arc::new(sums);
    let items = list.iter()?.map(|f| f.map(|f| (f.path, f.size)));
    let states = vec![(Vec::new(), DeltaBlocks::default()); process_max.max(1)];
    let pgdata = pgdata.to_path_buf();
    type State = (Vec<Row>, DeltaBlocks);
    let insert = {
        let db = db.clone();
        move |rows: &mut Vec<Row>| -> Result<()> {
            db.lock()
                .map_err(|_| Error::internal("scratch database: a thread failed holding it"))?
                .insert("diffs", rows)?;
            rows.clear();
            Ok(())
        }
    };
    let insert2 = insert.clone();
    let work = move |(out, d): &mut State, (path, size): (String, u64)| -> Result<()> {
        let n = blockmap::block_count(size);
        let Some(want) = sums
            .get(&path)
            .map_err(|e| Error::io_in(Kind::Internal, "read the backup's block sums", &e))?
            .filter(|w| w.len() == n as usize)
        else {
            return Ok(());
        };
        let dest = pgdata.join(&path);
        // Not there, or not a file: every block. Only a file of the
        // backup's size may be kept as it is: a missing empty file must be
        // created, and a longer one cut to the backup's length.
        let (disk, same_size) = match fs::symlink_metadata(&dest) {
            Ok(meta) if meta.is_file() => (
                blocksums::sums_of_file(&dest).map_err(local_err("read", &dest))?,
                meta.len() == size,
            ),
            _ => (None, false),
        };
        let disk = disk.unwrap_or_default();
        d.files += 1;
        d.blocks += u64::from(n);
        let differ = (0..n).filter(|&b| disk.get(b as usize) != want.get(b as usize));
        let differ = blockmap::ranges_of(differ);
        d.blocks_written += blockmap::count(&differ);
        out.push(Row {
            k: path,
            o: i64::from(same_size),
            v: json(&differ)?,
            ..Row::default()
        });
        if out.len() >= BATCH {
            insert(out)?;
        }
        Ok(())
    };
    let done = workers::run(items, states, work, move |(mut out, d): State| {
        insert2(&mut out)?;
        Ok(d)
    })
    .await?;
    let mut all = DeltaBlocks::default();
    for d in done {
        all.files += d.files;
        all.blocks += d.blocks;
        all.blocks_written += d.blocks_written;
    }
    Ok((db, all))
}

/// Writes the blocks `owned` of a chunked part into `dest`, fetching only
/// the chunks that hold them (ranged reads), each checked against its own
/// SHA-256; returns the bytes fetched.
pub(super) fn write_chunks(
    backend: &dyn Backend,
    handle: &tokio::runtime::Handle,
    (key, keys): (&str, &Keys),
    dest: &Path,
    f: &FileEntry,
    part: &Part,
    owned: &[(u32, u32)],
) -> Result<u64> {
    let what = format!("{}/{key}", backend.describe());
    let cb = u64::from(part.chunk_blocks.unwrap_or(chunked::CHUNK_BLOCKS).max(1));
    let (ranges, mut fetched) = handle.block_on(chunked::chunk_ranges(
        backend,
        keys,
        key,
        part.offset,
        part.length,
    ))?;
    let needed: std::collections::BTreeSet<u64> = owned
        .iter()
        .flat_map(|&(a, b)| a..=b)
        .filter_map(|b| blockmap::raw_index(part, b))
        .map(|r| r / cb)
        .collect();
    let file = OpenOptions::new()
        .write(true)
        .open(dest)
        .map_err(local_err("open", dest))?;
    for c in needed {
        let range = ranges.get(c as usize).cloned().ok_or_else(|| {
            Error::repository(format!(
                "{} (a part in {what}): its chunk index has no chunk {c}",
                f.path
            ))
        })?;
        let len = range.end - range.start;
        let bind = Binding::at(key, range.start);
        let bytes = handle
            .block_on(backend.get_range(key, range))?
            .ok_or_else(|| Error::repository(format!("{what} is missing")))?;
        fetched += len;
        let mut out = WriteWatch::new(PartWriter::starting_at(&file, f.size, part, owned, c * cb));
        codec::decode_sized(&bytes[..], &mut out, len, keys, bind).map_err(|e| {
            match out.error() {
                Some(w) => local_err("write", dest)(w),
                None => decode_error(&format!("{} (chunk {c} of a part in {what})", f.path), e),
            }
        })?;
    }
    Ok(fetched)
}

/// Decodes a piece of `shape` (stored length, raw size, chunk blocks) from
/// `r` into `out`, bound for `dest`, every byte hashed once (a chunk's own
/// SHA-256 would be a second pass over the same bytes): whether its
/// SHA-256 and size are `expect`'s. A failed write is the write to `dest`
/// it was; a decode failure names `name()`.
pub(super) fn decode_checked<R: Read, W: Write>(
    r: &mut R,
    out: &mut WriteWatch<W>,
    dest: &Path,
    shape: (u64, u64, Option<u32>),
    (sha256, size): (&str, u64),
    (keys, bind): (&Keys, Binding<'_>),
    name: impl FnOnce() -> String,
) -> Result<bool> {
    let digest = chunked::decode_piece_with(r, &mut *out, shape, keys, bind, Check::SizeOnly)
        .map_err(|e| match out.error() {
            Some(w) => local_err("write", dest)(w),
            None => decode_error(&name(), e),
        })?;
    Ok(digest.sha256.to_hex() == sha256 && digest.size == size)
}

/// Decodes one part into the blocks it owns of `dest`, checking the part's
/// checksum.
pub(super) fn write_blocks<R: Read>(
    r: &mut R,
    dest: &Path,
    (f, part, owned): (&FileEntry, &Part, &[(u32, u32)]),
    what: &str,
    keys: &Keys,
    bind: Binding<'_>,
) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .open(dest)
        .map_err(local_err("open", dest))?;
    let mut out = WriteWatch::new(PartWriter::new(&file, f.size, part, owned));
    let shape = (part.length, part.raw_size, part.chunk_blocks);
    let expect = (part.sha256.as_str(), part.raw_size);
    if !decode_checked(r, &mut out, dest, shape, expect, (keys, bind), || {
        format!("{} (a part in {what})", f.path)
    })? {
        return Err(Error::repository(format!(
            "{} (a part in {what}): its blocks do not match the manifest (checksum or size)",
            f.path
        )));
    }
    Ok(())
}
