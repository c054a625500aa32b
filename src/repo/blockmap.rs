//! Block maps: a relation file of an incremental or differential backup
//! stored as blocks of several backups.
//!
//! A [`FileEntry`] with `parts` lists, newest first, the stored objects
//! that hold blocks of the file: a *part* holds either the whole file as a
//! full backup copied it (`blocks: None`), or the blocks a later backup
//! found changed (`blocks`: the file's block numbers it holds, in order,
//! 8 KiB each, concatenated). Each block of the file comes from the newest
//! part that holds it ([`owned`]): restore reads every part once, in any
//! order, and writes each block once at its place (no chain replay, no
//! staging copy); each part's checksum covers its raw bytes.
//!
//! A new incremental's entry is its own part (the blocks it read) followed
//! by the reference's parts, without those that no longer own any block
//! ([`chain`]), so a map never grows past what restore needs.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};

use super::manifest::FileEntry;
use crate::pg::relfile::BLOCK_SIZE;

/// Inclusive ranges of block numbers, sorted and disjoint.
pub type Ranges = Vec<(u32, u32)>;

/// One stored object holding blocks of one file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Part {
    /// The backup whose directory holds `object`.
    pub backup: String,
    pub object: String,
    pub offset: u64,
    pub length: u64,
    /// SHA-256 and size of the part's raw bytes.
    pub sha256: String,
    pub raw_size: u64,
    /// The file's blocks it holds, in order; `None`: the whole file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks: Option<Ranges>,
    /// Stored in chunks of this many blocks (`repo::chunked`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_blocks: Option<u32>,
}

/// The parts of a file as backup `label` lists it (a whole-file entry is
/// one part).
pub fn parts_of(f: &FileEntry, label: &str) -> Vec<Part> {
    if !f.parts.is_empty() {
        return f.parts.clone();
    }
    vec![Part {
        backup: f.backup.clone().unwrap_or_else(|| label.to_string()),
        object: f.object.clone(),
        offset: f.offset,
        length: f.length,
        sha256: f.sha256.clone(),
        raw_size: f.size,
        blocks: None,
        chunk_blocks: f.chunk_blocks,
    }]
}

/// Blocks of a file of `size` bytes (the last one possibly short).
pub fn block_count(size: u64) -> u32 {
    u32::try_from(size.div_ceil(BLOCK_SIZE as u64)).unwrap_or(u32::MAX)
}

/// `newest` followed by `older`, keeping only the older parts that still
/// own a block of a file of `size` bytes.
pub fn chain(newest: Part, older: Vec<Part>, size: u64) -> Vec<Part> {
    let mut parts = vec![newest];
    parts.extend(older);
    let owned = owned(&parts, size);
    parts
        .into_iter()
        .zip(owned)
        .enumerate()
        .filter(|(i, (_, o))| *i == 0 || !o.is_empty())
        .map(|(_, (p, _))| p)
        .collect()
}

/// For each part, the blocks of a file of `size` bytes it is the newest
/// holder of.
pub fn owned(parts: &[Part], size: u64) -> Vec<Ranges> {
    let n = block_count(size);
    let mut covered: Ranges = Vec::new();
    let mut out = Vec::with_capacity(parts.len());
    for p in parts {
        let held = held_within(p, n);
        out.push(subtract(&held, &covered));
        covered = union(&covered, &held);
    }
    out
}

fn held_within(p: &Part, n: u32) -> Ranges {
    if n == 0 {
        return Vec::new();
    }
    match &p.blocks {
        None => vec![(0, n - 1)],
        Some(r) => r
            .iter()
            .filter(|(a, _)| *a < n)
            .map(|&(a, b)| (a, b.min(n - 1)))
            .collect(),
    }
}

/// Where file block `block` is among the raw blocks of `part` (`None`:
/// the part does not hold it).
pub fn raw_index(part: &Part, block: u32) -> Option<u64> {
    let Some(held) = &part.blocks else {
        return Some(u64::from(block));
    };
    let mut before = 0u64;
    for &(a, b) in held {
        if (a..=b).contains(&block) {
            return Some(before + u64::from(block - a));
        }
        before += u64::from(b - a) + 1;
    }
    None
}

/// Ranges from sorted block numbers.
pub fn ranges_of(blocks: impl IntoIterator<Item = u32>) -> Ranges {
    let mut out: Ranges = Vec::new();
    for b in blocks {
        match out.last_mut() {
            Some((_, last)) if last.checked_add(1) == Some(b) => *last = b,
            Some((_, last)) if *last >= b => {}
            _ => out.push((b, b)),
        }
    }
    out
}

pub fn count(r: &[(u32, u32)]) -> u64 {
    r.iter().map(|(a, b)| u64::from(b - a) + 1).sum()
}

fn contains(r: &[(u32, u32)], b: u32) -> bool {
    let i = r.partition_point(|&(_, last)| last < b);
    r.get(i).is_some_and(|&(first, _)| first <= b)
}

fn union(a: &[(u32, u32)], b: &[(u32, u32)]) -> Ranges {
    let mut all: Ranges = a.iter().chain(b).copied().collect();
    all.sort_unstable();
    let mut out: Ranges = Vec::new();
    for (s, e) in all {
        match out.last_mut() {
            Some((_, last)) if u64::from(s) <= u64::from(*last) + 1 => *last = (*last).max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// The blocks in both `a` and `b`.
pub fn intersect(a: &[(u32, u32)], b: &[(u32, u32)]) -> Ranges {
    subtract(a, &subtract(a, b))
}

fn subtract(a: &[(u32, u32)], b: &[(u32, u32)]) -> Ranges {
    let mut out = Vec::new();
    for &(s, e) in a {
        let mut from = u64::from(s);
        let end = u64::from(e);
        for &(bs, be) in b {
            let (bs, be) = (u64::from(bs), u64::from(be));
            if be < from || bs > end {
                continue;
            }
            if bs > from {
                out.push((from as u32, (bs - 1) as u32));
            }
            from = be + 1;
            if from > end {
                break;
            }
        }
        if from <= end {
            out.push((from as u32, end as u32));
        }
    }
    out
}

/// Receives a part's raw bytes in order and writes the blocks it owns at
/// their place in `file` (bytes at or past `size` are not written).
pub struct PartWriter<'a> {
    file: &'a File,
    size: u64,
    /// File block of each raw block: `None` the identity.
    held: Option<&'a [(u32, u32)]>,
    owned: &'a [(u32, u32)],
    /// Raw bytes received so far.
    pos: u64,
    /// Cursor into `held`: range index and blocks of it passed.
    range: usize,
    into_range: u32,
}

impl<'a> PartWriter<'a> {
    pub fn new(file: &'a File, size: u64, part: &'a Part, owned: &'a [(u32, u32)]) -> Self {
        PartWriter {
            file,
            size,
            held: part.blocks.as_deref(),
            owned,
            pos: 0,
            range: 0,
            into_range: 0,
        }
    }

    /// A writer for the part's raw bytes from raw block `first` on (a
    /// chunk fetched alone).
    pub fn starting_at(
        file: &'a File,
        size: u64,
        part: &'a Part,
        owned: &'a [(u32, u32)],
        first: u64,
    ) -> Self {
        let mut w = PartWriter::new(file, size, part, owned);
        w.pos = first * BLOCK_SIZE as u64;
        if let Some(held) = w.held {
            let mut left = first;
            while let Some(&(a, b)) = held.get(w.range) {
                let n = u64::from(b - a) + 1;
                if left < n {
                    w.into_range = left as u32;
                    break;
                }
                left -= n;
                w.range += 1;
            }
        }
        w
    }

    /// The file block of the raw block being received, advancing the
    /// cursor when a new raw block starts.
    fn file_block(&mut self, raw_block: u64) -> Option<u32> {
        match self.held {
            None => u32::try_from(raw_block).ok(),
            Some(held) => {
                let &(first, last) = held.get(self.range)?;
                let b = first + self.into_range;
                debug_assert!(b <= last);
                Some(b)
            }
        }
    }

    fn advance(&mut self) {
        if let Some(held) = self.held {
            if let Some(&(first, last)) = held.get(self.range) {
                if first + self.into_range >= last {
                    self.range += 1;
                    self.into_range = 0;
                } else {
                    self.into_range += 1;
                }
            }
        }
    }
}

impl Write for PartWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let bs = BLOCK_SIZE as u64;
        let mut done = 0usize;
        while done < buf.len() {
            let raw_block = self.pos / bs;
            let within = self.pos % bs;
            let n = ((bs - within) as usize).min(buf.len() - done);
            let Some(block) = self.file_block(raw_block) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the part holds more blocks than its map lists",
                ));
            };
            if contains(self.owned, block) {
                let at = u64::from(block) * bs + within;
                if at < self.size {
                    let len = (n as u64).min(self.size - at) as usize;
                    self.file.write_all_at(&buf[done..done + len], at)?;
                }
            }
            done += n;
            self.pos += n as u64;
            if self.pos % bs == 0 {
                self.advance();
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(label: &str, blocks: Option<Ranges>) -> Part {
        Part {
            backup: label.into(),
            object: "o".into(),
            offset: 0,
            length: 0,
            sha256: String::new(),
            raw_size: 0,
            blocks,
            chunk_blocks: None,
        }
    }

    #[test]
    fn newest_part_wins_each_block() {
        let parts = vec![
            part("i2", Some(vec![(1, 1), (5, 6)])),
            part("i1", Some(vec![(0, 1), (6, 9)])),
            part("f", None),
        ];
        let o = owned(&parts, 8 * 8192);
        assert_eq!(o[0], vec![(1, 1), (5, 6)]);
        assert_eq!(o[1], vec![(0, 0), (7, 7)], "8 and 9 are past the end");
        assert_eq!(o[2], vec![(2, 4)]);
    }

    #[test]
    fn parts_owning_nothing_leave_the_chain() {
        let older = vec![part("i1", Some(vec![(3, 3)])), part("f", None)];
        let c = chain(part("i2", Some(vec![(0, 3)])), older, 4 * 8192);
        let labels: Vec<&str> = c.iter().map(|p| p.backup.as_str()).collect();
        assert_eq!(labels, ["i2"]);
    }

    #[test]
    fn ranges_and_subtraction() {
        assert_eq!(
            ranges_of([1, 2, 3, 7, 9, 10]),
            vec![(1, 3), (7, 7), (9, 10)]
        );
        assert_eq!(
            subtract(&[(0, 10)], &[(2, 3), (5, 5)]),
            vec![(0, 1), (4, 4), (6, 10)]
        );
        assert_eq!(union(&[(0, 1)], &[(2, 4), (8, 9)]), vec![(0, 4), (8, 9)]);
        assert_eq!(count(&[(0, 1), (5, 5)]), 3);
        assert_eq!(
            intersect(&[(0, 10), (20, 30)], &[(5, 22), (29, 40)]),
            vec![(5, 10), (20, 22), (29, 30)]
        );
    }

    /// A file of `blocks` zero blocks in a temporary directory.
    fn blank_file(blocks: u64) -> (tempfile::TempDir, std::path::PathBuf, File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(blocks * 8192).unwrap();
        (dir, path, file)
    }

    #[test]
    fn a_part_written_from_a_later_block() {
        let (_dir, path, file) = blank_file(10);
        // Raw blocks 0..5 are file blocks 1, 2, 6, 7, 8; from raw block 3 on.
        let p = part("i", Some(vec![(1, 2), (6, 8)]));
        let owned = vec![(0, 9)];
        let mut w = PartWriter::starting_at(&file, 10 * 8192, &p, &owned, 3);
        w.write_all(&[7u8; 8192]).unwrap();
        w.write_all(&[8u8; 8192]).unwrap();
        let got = std::fs::read(&path).unwrap();
        assert!(got[7 * 8192..8 * 8192].iter().all(|&b| b == 7));
        assert!(got[8 * 8192..9 * 8192].iter().all(|&b| b == 8));
        assert!(got[..7 * 8192].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_part_writes_only_the_blocks_it_owns() {
        let (_dir, path, file) = blank_file(4);
        let p = part("i", Some(vec![(1, 1), (3, 3)]));
        let owned = vec![(3, 3)];
        let mut w = PartWriter::new(&file, 4 * 8192, &p, &owned);
        let mut raw = vec![1u8; 8192];
        raw.extend(vec![3u8; 8192]);
        for c in raw.chunks(1000) {
            w.write_all(c).unwrap();
        }
        let got = std::fs::read(&path).unwrap();
        assert!(got[..3 * 8192].iter().all(|&b| b == 0));
        assert!(got[3 * 8192..].iter().all(|&b| b == 3));
    }
}
