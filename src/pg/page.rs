//! Data pages: the page header fields a backup looks at, and the page
//! checksum of clusters initialized with data checksums (`initdb -k`).
//!
//! The checksum is PostgreSQL's (`storage/checksum_impl.h`): the 8 KiB page
//! is read as 64 rows of 32 little-endian `u32` columns, each column folded
//! into its own FNV-1a-like sum (`sum = (sum ^ v) * FNV_PRIME ^ ((sum ^ v)
//! >> 17)`, 32 different starting values), two more rounds of zeroes, the
//! 32 sums xored together, the block number xored in, and the result
//! reduced to 16 bits, never 0. `pd_checksum` counts as zero while summing.

use super::relfile::BLOCK_SIZE;
use super::Lsn;

const N_SUMS: usize = 32;
const FNV_PRIME: u32 = 16_777_619;
/// The starting value of each of the 32 partial sums (`checksumBaseOffsets`).
const BASE_OFFSETS: [u32; N_SUMS] = [
    0x5B1F36E9, 0xB8525960, 0x02AB50AA, 0x1DE66D2A, 0x79FF467A, 0x9BB9F8A3, 0x217E7CD2, 0x83E13D2C,
    0xF8D4474F, 0xE39EB970, 0x42C6AE16, 0x993216FA, 0x7B093B5D, 0x98DAFF3C, 0xF718902A, 0x0B1C9CDB,
    0xE58F764B, 0x187636BC, 0x5D7B3BB1, 0xE73DE7DE, 0x92BEC979, 0xCCA6C0B2, 0x304A0979, 0x85AA43D4,
    0x783125BB, 0x6CA8EAA2, 0xE407EAC6, 0x4B5CFC3E, 0x9FBF8C76, 0x15CA20BE, 0xF2CA9FD3, 0x959BD756,
];
/// Where `pd_checksum` sits in the page header (`PageHeaderData`).
const CHECKSUM_OFFSET: usize = 8;
/// Where `pd_upper` sits: 0 on a page never initialized (`PageIsNew`).
const UPPER_OFFSET: usize = 14;

/// What a backup needs to know of one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageCheck {
    /// Never initialized and all zeroes: nothing to check.
    New,
    /// Its checksum matches.
    Valid,
    /// Changed at or after `lsn`: WAL replay from the backup's start
    /// rewrites it, so it may be torn in the copy and is not checked.
    ChangedSince,
    /// Its checksum does not match (stored, computed).
    BadChecksum { stored: u16, computed: u16 },
    /// `pd_upper` says never initialized, yet the page holds data.
    NotZero,
}

/// The LSN of the last WAL record that changed the page (`pd_lsn`).
pub fn page_lsn(page: &[u8]) -> Lsn {
    let hi = u32::from_le_bytes(page[0..4].try_into().expect("4 bytes"));
    let lo = u32::from_le_bytes(page[4..8].try_into().expect("4 bytes"));
    Lsn((u64::from(hi) << 32) | u64::from(lo))
}

/// Checks one 8 KiB page of a cluster with data checksums; `blkno` is the
/// block's number in its fork ([`super::relfile::RelFile::block_number`]),
/// `start` the backup's start LSN.
pub fn check_page(page: &[u8], blkno: u32, start: Lsn) -> PageCheck {
    assert_eq!(page.len(), BLOCK_SIZE, "a page is one 8 KiB block");
    let upper = u16::from_le_bytes([page[UPPER_OFFSET], page[UPPER_OFFSET + 1]]);
    if upper == 0 {
        return if page.iter().all(|&b| b == 0) {
            PageCheck::New
        } else {
            PageCheck::NotZero
        };
    }
    if page_lsn(page) >= start {
        return PageCheck::ChangedSince;
    }
    let stored = u16::from_le_bytes([page[CHECKSUM_OFFSET], page[CHECKSUM_OFFSET + 1]]);
    let computed = page_checksum(page, blkno);
    if stored == computed {
        PageCheck::Valid
    } else {
        PageCheck::BadChecksum { stored, computed }
    }
}

/// PostgreSQL's data checksum of `page` as block `blkno` of its fork.
pub fn page_checksum(page: &[u8], blkno: u32) -> u16 {
    let mut sums = BASE_OFFSETS;
    let mix = |sum: &mut u32, v: u32| {
        let t = *sum ^ v;
        *sum = t.wrapping_mul(FNV_PRIME) ^ (t >> 17);
    };
    for (i, row) in page.chunks_exact(4 * N_SUMS).enumerate() {
        for (j, col) in row.chunks_exact(4).enumerate() {
            let mut v = u32::from_le_bytes(col.try_into().expect("4 bytes"));
            // pd_checksum (bytes 8..10 of row 0: the low half of column 2)
            // counts as zero.
            if i == 0 && j == CHECKSUM_OFFSET / 4 {
                v &= 0xFFFF_0000;
            }
            mix(&mut sums[j], v);
        }
    }
    for _ in 0..2 {
        for s in sums.iter_mut() {
            mix(s, 0);
        }
    }
    let folded = sums.iter().fold(0u32, |acc, s| acc ^ s) ^ blkno;
    ((folded % 65535) + 1) as u16
}

/// A page of a relation file whose checksum failed, twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BadPage {
    /// Block number in the fork.
    pub block: u32,
    pub stored: u16,
    pub computed: u16,
}

/// Checks the pages of one relation segment file as its bytes stream past
/// (a `Write` sink beside the copy), remembering the ones that fail; then
/// [`PageVerifier::finish`] reads those again from the file, once, since a
/// page being written while it was read can be torn.
pub struct PageVerifier {
    file: super::relfile::RelFile,
    start: Lsn,
    page: Vec<u8>,
    /// Index of the page being assembled in the file.
    next: u32,
    suspects: Vec<u32>,
    checked: u64,
}

/// What [`PageVerifier`] found in one file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageReport {
    /// Pages whose checksum was compared.
    pub checked: u64,
    pub bad: Vec<BadPage>,
}

impl PageVerifier {
    /// For segment file `file` of a cluster with data checksums, in a backup
    /// that started at `start`.
    pub fn new(file: super::relfile::RelFile, start: Lsn) -> Self {
        PageVerifier {
            file,
            start,
            page: Vec::with_capacity(BLOCK_SIZE),
            next: 0,
            suspects: Vec::new(),
            checked: 0,
        }
    }

    fn check(&mut self, page: &[u8], index: u32) {
        let blkno = self.file.block_number(index);
        match check_page(page, blkno, self.start) {
            PageCheck::BadChecksum { .. } | PageCheck::NotZero => {
                self.checked += 1;
                self.suspects.push(index)
            }
            PageCheck::Valid => self.checked += 1,
            PageCheck::New | PageCheck::ChangedSince => {}
        }
    }

    /// Re-reads the pages that failed from `path` (the file just copied)
    /// and returns those that fail again. A page gone meanwhile (the file
    /// was truncated) is not a failure: WAL replay truncates it too.
    pub fn finish(self, path: &std::path::Path) -> std::io::Result<PageReport> {
        use std::os::unix::fs::FileExt;
        if self.suspects.is_empty() {
            return Ok(PageReport {
                checked: self.checked,
                bad: Vec::new(),
            });
        }
        let f = std::fs::File::open(path)?;
        let mut page = vec![0u8; BLOCK_SIZE];
        let mut bad = Vec::new();
        for index in self.suspects {
            let offset = u64::from(index) * BLOCK_SIZE as u64;
            match f.read_exact_at(&mut page, offset) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => continue,
                Err(e) => return Err(e),
            }
            let block = self.file.block_number(index);
            match check_page(&page, block, self.start) {
                PageCheck::BadChecksum { stored, computed } => bad.push(BadPage {
                    block,
                    stored,
                    computed,
                }),
                PageCheck::NotZero => bad.push(BadPage {
                    block,
                    stored: 0,
                    computed: 0,
                }),
                PageCheck::New | PageCheck::Valid | PageCheck::ChangedSince => {}
            }
        }
        Ok(PageReport {
            checked: self.checked,
            bad,
        })
    }
}

impl std::io::Write for PageVerifier {
    fn write(&mut self, mut buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len();
        if !self.page.is_empty() {
            let take = (BLOCK_SIZE - self.page.len()).min(buf.len());
            self.page.extend_from_slice(&buf[..take]);
            buf = &buf[take..];
            if self.page.len() == BLOCK_SIZE {
                let page = std::mem::take(&mut self.page);
                self.check(&page, self.next);
                self.next += 1;
                self.page = page;
                self.page.clear();
            }
        }
        while buf.len() >= BLOCK_SIZE {
            let (page, rest) = buf.split_at(BLOCK_SIZE);
            self.check(page, self.next);
            self.next += 1;
            buf = rest;
        }
        // A partial last page (a file being extended) is not checked.
        self.page.extend_from_slice(buf);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::testdata;

    /// Pages written by a real PostgreSQL 15 with data checksums (see
    /// fixtures/README.md): every one must verify with its stored checksum,
    /// and a flipped bit or a wrong block number must not.
    #[test]
    fn matches_postgresql_on_real_pages() {
        let facts = testdata::facts("pg15-pages");
        let file = facts["file"].as_str().unwrap();
        let data = testdata::read(&format!("pg15-pages/{file}"));
        let first_block = facts["first_block"].as_u64().unwrap() as u32;
        let mut checked = 0;
        for (n, page) in data.chunks_exact(BLOCK_SIZE).enumerate() {
            let blkno = first_block + n as u32;
            let stored = facts["pages"][n]["pd_checksum"].as_u64().unwrap() as u16;
            assert_eq!(page_checksum(page, blkno), stored, "block {blkno}");
            match check_page(page, blkno, Lsn(u64::MAX)) {
                PageCheck::Valid => checked += 1,
                PageCheck::New => continue,
                other => panic!("block {blkno}: {other:?}"),
            }
            let mut bad = page.to_vec();
            bad[4000] ^= 0x10;
            assert!(matches!(
                check_page(&bad, blkno, Lsn(u64::MAX)),
                PageCheck::BadChecksum { .. }
            ));
            assert!(matches!(
                check_page(page, blkno + 1, Lsn(u64::MAX)),
                PageCheck::BadChecksum { .. }
            ));
            // Changed after the backup started: not checked.
            assert_eq!(
                check_page(&bad, blkno, page_lsn(page)),
                PageCheck::ChangedSince
            );
        }
        assert!(checked >= 2, "the fixture has initialized pages");
        // Streamed in odd pieces, with one page corrupt on disk and in the
        // stream: reported once, after the re-read.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("16384.2");
        let mut on_disk = data.clone();
        on_disk[BLOCK_SIZE + 100] ^= 1;
        std::fs::write(&path, &on_disk).unwrap();
        let file = crate::pg::relfile::RelFile::parse("base/5/16384").unwrap();
        let mut v = PageVerifier::new(file, Lsn(u64::MAX));
        for piece in on_disk.chunks(3000) {
            std::io::Write::write_all(&mut v, piece).unwrap();
        }
        let report = v.finish(&path).unwrap();
        assert_eq!(report.checked, 4);
        assert_eq!(report.bad.len(), 1);
        assert_eq!(report.bad[0].block, first_block + 1);

        let zero = vec![0u8; BLOCK_SIZE];
        assert_eq!(check_page(&zero, 0, Lsn(1)), PageCheck::New);
        let mut junk = zero.clone();
        junk[100] = 1;
        assert_eq!(check_page(&junk, 0, Lsn(1)), PageCheck::NotZero);
    }
}
