//! Walks the records of one WAL segment as its bytes stream by.
//!
//! At archive-push time every byte of a WAL file goes through
//! [`WalScanner`] in the same pass as hashing and compression, so the scanner
//! takes arbitrary chunks and gives the same [`WalSummary`] for any chunking.
//! It never holds a whole record: the body of each record is CRC-checked as
//! it passes, every record keeps its first [`KEEP_HEAD`] bytes (its block
//! headers: the blocks it touches, and where its main data is), and only
//! records pgvault decodes (commits, aborts, restore points, timeline
//! switches, storage events) keep the first bytes of their main data.
//!
//! Besides the [`WalSummary`], the scan gives the segment's
//! [`SegmentRefs`](crate::pg::blockref::SegmentRefs): which relation blocks
//! its records touched, the storage events that change relation files
//! without a block reference, and doubts (`storage`). A record cut by a
//! segment boundary cannot be checked or decoded by either segment alone:
//! each keeps its piece, and the union of consecutive segments puts it
//! together (`span`).
//!
//! ```ignore
//! let mut scanner = WalScanner::new(ScanOptions { major, seg_size, segment_start, partial });
//! for chunk in chunks {
//!     hasher.update(chunk);
//!     encoder.write_all(chunk)?;
//!     scanner.feed(chunk); // or io::Write, as one of several sinks
//! }
//! let summary = scanner.finish(); // `problems` and `crc_failures` to report
//! // or: let (summary, refs) = scanner.finish_with_blocks();
//! ```
//!
//! Format facts come from PostgreSQL's `xlog_internal.h` (page headers),
//! `xlogrecord.h` (record and block headers), `xlogreader.c` (what ends the
//! WAL, how continuation pages are checked), `xact.h` (commit and abort
//! records) and `pg_control.h` (XLOG records), REL_14 to REL_18. The tests
//! check them against WAL written by real servers (`fixtures/`).

use super::blockref::{DoubtScope, Piece, SegmentRefs};
use super::wal::{parse_long_page_header, LONG_PAGE_HEADER_SIZE, XLP_FIRST_IS_CONTRECORD};
use super::{wal_magic_for_major, Lsn, WAL_BLOCK_SIZE};

mod decode;
mod span;
mod storage;
mod summary;
mod xacts;

pub use span::{RangeUnion, SpanError};

pub use summary::{RestorePoint, TimelineSwitch, WalSummary, XactMark, SUMMARY_FORMAT};
pub use xacts::{XactEnd, XactEnds};

/// What the scanner needs to know about the file it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanOptions {
    /// PostgreSQL major that wrote the WAL (14 to 18).
    pub major: u32,
    /// WAL segment size in bytes.
    pub seg_size: u32,
    /// LSN of the segment's first byte.
    pub segment_start: Lsn,
    /// The file is a `.partial` segment: garbage after its last record is
    /// expected, not a problem.
    pub partial: bool,
}

/// `SizeOfXLogRecord`.
const RECORD_HEADER_SIZE: usize = 24;
/// `SizeOfXLogShortPHD`: MAXALIGN of the 20-byte short page header.
const SHORT_PAGE_HEADER_SIZE: usize = 24;
/// `XLP_FIRST_IS_OVERWRITE_CONTRECORD` (xlog_internal.h, back-patched to 10).
const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x0008;
const XLP_LONG_HEADER: u16 = super::wal::XLP_LONG_HEADER;
/// Every xlp_info bit PostgreSQL 14 to 18 define.
const XLP_ALL_FLAGS: u16 = 0x000F;
/// Largest xl_tot_len taken as a record: `XLogRecordMaxSize` is 1020 MB in
/// PostgreSQL 16+, and older releases stay below MaxAllocSize (1 GB).
const MAX_RECORD_SIZE: u32 = 1024 * 1024 * 1024;
/// Body bytes kept from the start of every record: enough for every block
/// header (at most 33, `XLR_MAX_BLOCK_ID` + 1, of at most 27 bytes,
/// `MaxSizeOfXLogRecordBlockHeader`), the origin and top-level xid headers
/// and the main data header: 904 bytes.
pub const KEEP_HEAD: usize = 1024;
/// Bytes kept from the start of a decoded record's main data.
pub const KEEP_MAIN: usize = 4096;
/// Bytes kept from the end of a record cut by the segment's end, or of the
/// continuation at its start: the main data of a storage event.
pub const KEEP_TAIL: usize = 4096;
/// Record bytes a piece keeps raw: the header and [`KEEP_HEAD`].
const PIECE_RAW: usize = RECORD_HEADER_SIZE + KEEP_HEAD;

/// MAXALIGN (8 bytes on every platform pgvault reads WAL of).
const fn maxalign(v: u64) -> u64 {
    v.saturating_add(7) & !7
}

/// A record header, as read (`XLogRecord`, xlogrecord.h).
#[derive(Debug, Clone, Copy)]
struct RecordHeader {
    tot_len: u32,
    xid: u32,
    prev: Lsn,
    info: u8,
    rmid: u8,
    crc: u32,
}

impl RecordHeader {
    fn parse(b: &[u8; RECORD_HEADER_SIZE]) -> RecordHeader {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        RecordHeader {
            tot_len: u32_at(0),
            xid: u32_at(4),
            prev: Lsn(u32_at(8) as u64 | (u32_at(12) as u64) << 32),
            info: b[16],
            rmid: b[17],
            crc: u32_at(20),
        }
    }
}

/// A record whose header is complete and whose body is streaming by. One
/// per scanner, reused for every record, as is its [`decode::Capture`]: the
/// scanner allocates nothing per record.
#[derive(Debug)]
struct Body {
    start: Lsn,
    header_bytes: [u8; RECORD_HEADER_SIZE],
    header: RecordHeader,
    /// Body bytes still to come.
    remaining: u64,
    crc: u32,
    capture: decode::Capture,
}

/// The continuation at the segment's start: a [`Piece`] being filled.
#[derive(Debug, Default)]
struct Continued {
    piece: Piece,
}

impl Continued {
    fn take(&mut self, bytes: &[u8]) {
        let p = &mut self.piece;
        let mut rest = bytes;
        if p.raw.len() < PIECE_RAW && p.len == p.raw.len() as u64 {
            let n = (PIECE_RAW - p.raw.len()).min(rest.len());
            p.raw.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
        }
        p.len += bytes.len() as u64;
        if !rest.is_empty() {
            p.rest_crc = crc32c::crc32c_append(p.rest_crc, rest);
            p.tail.extend_from_slice(rest);
            if p.tail.len() > 2 * KEEP_TAIL {
                p.tail.drain(..p.tail.len() - KEEP_TAIL);
            }
        }
    }
}

#[derive(Debug)]
enum State {
    /// Next payload byte (after alignment) starts a record.
    Start,
    /// Collecting a record header, which may straddle a page boundary.
    Header {
        start: Lsn,
        buf: [u8; RECORD_HEADER_SIZE],
        have: usize,
    },
    /// In the record described by `WalScanner::body`.
    Body,
    /// The rest of a record that began before this segment.
    Continuation { remaining: u64 },
    /// Nothing more to read: the WAL ended (or XLOG_SWITCH zeroed the rest).
    Done,
}

/// Streaming walker over one WAL segment: [`feed`](WalScanner::feed) it the
/// file's bytes in any chunks, then [`finish`](WalScanner::finish).
#[derive(Debug)]
pub struct WalScanner {
    opts: ScanOptions,
    magic: Option<u16>,
    /// Bytes of the file seen so far (offset of the next byte).
    pos: u64,
    page_header: [u8; LONG_PAGE_HEADER_SIZE],
    state: State,
    body: Body,
    /// `xl_prev` the next record must have; None when unknown (the first
    /// record of the file, the first after an overwritten contrecord).
    expect_prev: Option<Lsn>,
    summary: WalSummary,
    /// What the records do to relation files.
    blocks: storage::Collector,
    /// The record continued from the previous segment, if any.
    continued: Option<Continued>,
}

impl WalScanner {
    pub fn new(opts: ScanOptions) -> WalScanner {
        let mut s = WalScanner {
            opts,
            magic: wal_magic_for_major(opts.major),
            pos: 0,
            page_header: [0; LONG_PAGE_HEADER_SIZE],
            state: State::Start,
            body: Body {
                start: Lsn::INVALID,
                header_bytes: [0; RECORD_HEADER_SIZE],
                header: RecordHeader::parse(&[0; RECORD_HEADER_SIZE]),
                remaining: 0,
                crc: 0,
                capture: decode::Capture::default(),
            },
            expect_prev: None,
            summary: WalSummary {
                format: SUMMARY_FORMAT,
                xact_ends: Some(XactEnds::new()),
                ..WalSummary::default()
            },
            blocks: storage::Collector::default(),
            continued: None,
        };
        if s.magic.is_none() {
            s.fatal(format!(
                "PostgreSQL {} is not a major pgvault reads WAL of",
                opts.major
            ));
        } else if !opts.seg_size.is_power_of_two() || opts.seg_size < WAL_BLOCK_SIZE {
            s.fatal(format!("invalid WAL segment size {}", opts.seg_size));
        }
        s
    }

    /// Takes the next bytes of the file.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        let seg_size = u64::from(self.opts.seg_size);
        let page = u64::from(WAL_BLOCK_SIZE);
        while !bytes.is_empty() {
            if self.pos >= seg_size || matches!(self.state, State::Done) {
                // Only counted, for finish's size check.
                self.pos = self.pos.saturating_add(bytes.len() as u64);
                return;
            }
            let in_page = self.pos % page;
            let header_len = if self.pos < page {
                LONG_PAGE_HEADER_SIZE
            } else {
                SHORT_PAGE_HEADER_SIZE
            } as u64;
            let (n, page_header) = if in_page < header_len {
                ((header_len - in_page).min(bytes.len() as u64), true)
            } else {
                ((page - in_page).min(bytes.len() as u64), false)
            };
            let (now, rest) = bytes.split_at(n as usize);
            bytes = rest;
            if page_header {
                let at = in_page as usize;
                self.page_header[at..at + now.len()].copy_from_slice(now);
                self.pos += n;
                if in_page + n == header_len {
                    self.on_page_header(header_len as usize);
                }
            } else {
                self.payload(now);
            }
        }
    }

    /// Ends the scan: a record still open at the segment's end goes on in the
    /// next segment; input shorter than a segment is a problem.
    pub fn finish(self) -> WalSummary {
        self.finish_with_blocks().0
    }

    /// Ends the scan, with what the records did to relation files. A
    /// problem or a failed CRC in the segment is a doubt over every file.
    pub fn finish_with_blocks(mut self) -> (WalSummary, SegmentRefs) {
        let seg_size = u64::from(self.opts.seg_size);
        let mut tail = None;
        if self.pos == seg_size {
            match std::mem::replace(&mut self.state, State::Done) {
                State::Header { start, buf, have } => {
                    // Only here when xl_tot_len (on the first page) was plausible.
                    self.count_record(start);
                    self.summary.spanning += 1;
                    tail = Some(Piece {
                        start,
                        len: have as u64,
                        raw: buf[..have].to_vec(),
                        ..Piece::default()
                    });
                }
                State::Body => {
                    self.summary.spanning += 1;
                    let b = &mut self.body;
                    b.capture.trim_tail();
                    let body_seen =
                        u64::from(b.header.tot_len) - RECORD_HEADER_SIZE as u64 - b.remaining;
                    let mut raw = b.header_bytes.to_vec();
                    raw.extend_from_slice(&b.capture.head);
                    tail = Some(Piece {
                        start: b.start,
                        rem_len: 0,
                        len: RECORD_HEADER_SIZE as u64 + body_seen,
                        raw,
                        rest_crc: b.capture.rest_crc,
                        tail: std::mem::take(&mut b.capture.tail),
                    });
                }
                // Counted when it began.
                State::Continuation { .. } => {}
                State::Start | State::Done => {}
            }
        } else if self.pos < seg_size {
            let at = self.lsn(self.pos);
            self.summary.problems.push(format!(
                "WAL file ends at {at} after {} bytes, short of the {seg_size}-byte segment",
                self.pos
            ));
        } else {
            self.summary.problems.push(format!(
                "WAL file has {} bytes, more than the {seg_size}-byte segment",
                self.pos
            ));
        }
        let start = self.opts.segment_start;
        for &at in &self.summary.crc_failures {
            self.blocks.set.add_doubt(
                at,
                DoubtScope::All,
                format!("the record at {at} fails its CRC check: its block references are unknown"),
            );
        }
        if let Some(p) = self.summary.problems.first() {
            self.blocks.set.add_doubt(
                start,
                DoubtScope::All,
                format!("the WAL segment at {start} was not read to its end: {p}"),
            );
        }
        let head = self.continued.take().map(|mut c| {
            if c.piece.tail.len() > KEEP_TAIL {
                c.piece.tail.drain(..c.piece.tail.len() - KEEP_TAIL);
            }
            c.piece
        });
        let refs = SegmentRefs {
            segment_start: start,
            seg_size: self.opts.seg_size,
            major: self.opts.major,
            changes: self.blocks.finish(),
            head,
            tail,
        };
        (self.summary, refs)
    }

    fn lsn(&self, offset: u64) -> Lsn {
        Lsn(self.opts.segment_start.0.wrapping_add(offset))
    }

    /// A problem that ends the scan whether or not the file is `.partial`.
    fn fatal(&mut self, problem: String) {
        self.summary.problems.push(problem);
        self.state = State::Done;
    }

    /// The WAL ends here (xlogreader.c would stop reading): expected in a
    /// `.partial` file, a problem in a finished segment.
    fn end_of_wal(&mut self, at: Lsn, why: &str) {
        if !self.opts.partial {
            self.summary.problems.push(format!(
                "WAL ends at {at}, before the end of the segment: {why}"
            ));
        }
        self.state = State::Done;
    }

    fn on_page_header(&mut self, header_len: usize) {
        let page_start = self.pos - header_len as u64;
        let page_lsn = self.lsn(page_start);
        let h = &self.page_header;
        let magic = u16::from_le_bytes([h[0], h[1]]);
        let info = u16::from_le_bytes([h[2], h[3]]);
        let pageaddr = Lsn(u64::from_le_bytes(h[8..16].try_into().expect("8 bytes")));
        let rem_len = u32::from_le_bytes(h[16..20].try_into().expect("4 bytes"));
        if page_start == 0 {
            // Not WAL of this cluster at all: a problem even in a .partial.
            let problem = match parse_long_page_header(&self.page_header) {
                Err(e) => Some(e.to_string()),
                Ok(lh) if Some(lh.magic) != self.magic => Some(format!(
                    "WAL page magic {:#06X} is not PostgreSQL {}'s",
                    lh.magic, self.opts.major
                )),
                Ok(lh) if lh.seg_size != self.opts.seg_size => Some(format!(
                    "WAL segment size in the page header is {}, expected {}",
                    lh.seg_size, self.opts.seg_size
                )),
                Ok(lh) if lh.xlog_blcksz != WAL_BLOCK_SIZE => Some(format!(
                    "WAL block size in the page header is {}, expected {WAL_BLOCK_SIZE}",
                    lh.xlog_blcksz
                )),
                Ok(lh) if lh.pageaddr != page_lsn => Some(format!(
                    "first WAL page is at {}, expected {page_lsn}",
                    lh.pageaddr
                )),
                Ok(_) => None,
            };
            if let Some(p) = problem {
                self.fatal(format!("WAL segment at {page_lsn}: {p}"));
                return;
            }
        } else {
            // xlogreader.c, XLogReaderValidatePageHeader.
            let why = if Some(magic) != self.magic {
                Some(format!("page magic {magic:#06X}"))
            } else if info & !XLP_ALL_FLAGS != 0 || info & XLP_LONG_HEADER != 0 {
                Some(format!("page flags {info:#06X}"))
            } else if pageaddr != page_lsn {
                Some(format!(
                    "the page at {page_lsn} says it is at {pageaddr} (recycled segment)"
                ))
            } else {
                None
            };
            if let Some(why) = why {
                self.end_on_page(page_lsn, &why);
                return;
            }
        }

        let overwrite = info & XLP_FIRST_IS_OVERWRITE_CONTRECORD != 0;
        let contrecord = info & XLP_FIRST_IS_CONTRECORD != 0;
        let remaining = match &self.state {
            State::Done => return,
            State::Start => None,
            State::Header { buf, have, .. } => {
                // xl_tot_len is always on a record's first page.
                let tot = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes"));
                Some(u64::from(tot).saturating_sub(*have as u64))
            }
            State::Body => Some(self.body.remaining),
            State::Continuation { remaining } => Some(*remaining),
        };
        if overwrite {
            // The record being continued was cut short by a crash and
            // abandoned; recovery wrote new WAL from this page on
            // (xlogreader.c, XLogDecodeNextRecord). Not a corrupt record; it
            // stays counted, as it is in the segment where it starts, when
            // the overwrite is on a later segment's first page.
            self.state = State::Start;
            self.expect_prev = None;
            return;
        }
        match remaining {
            None if contrecord && page_start == 0 => {
                // The segment opens with the rest of an earlier record.
                self.summary.spanning += 1;
                self.state = State::Continuation {
                    remaining: u64::from(rem_len),
                };
                self.continued = Some(Continued {
                    piece: Piece {
                        start: self.opts.segment_start,
                        rem_len,
                        ..Piece::default()
                    },
                });
                self.expect_prev = None;
            }
            None if contrecord => {
                self.end_on_page(page_lsn, "continuation page where a record should start")
            }
            None => {}
            Some(_) if !contrecord => self.end_on_page(
                page_lsn,
                "a record goes on but the page is not a continuation",
            ),
            Some(left) if left != u64::from(rem_len) => self.end_on_page(
                page_lsn,
                &format!("continuation of {rem_len} bytes where {left} were expected"),
            ),
            Some(_) => {}
        }
    }

    /// End of WAL found at a page header: a record in progress is lost.
    fn end_on_page(&mut self, page_lsn: Lsn, why: &str) {
        let at = match &self.state {
            State::Header { start, .. } => *start,
            State::Body => self.body.start,
            _ => page_lsn,
        };
        self.end_of_wal(at, why);
    }

    /// Record bytes between the scan's position (inside a page's payload)
    /// and the segment's end: the bytes less the short page headers of the
    /// pages still to start.
    fn payload_left(&self) -> u64 {
        let seg_size = u64::from(self.opts.seg_size);
        let page = u64::from(WAL_BLOCK_SIZE);
        let pages_to_start = (seg_size / page).saturating_sub(self.pos.div_ceil(page));
        (seg_size.saturating_sub(self.pos))
            .saturating_sub(pages_to_start * SHORT_PAGE_HEADER_SIZE as u64)
    }

    fn count_record(&mut self, start: Lsn) {
        self.summary.records += 1;
        if self.summary.first_record.is_none() {
            self.summary.first_record = Some(start);
        }
    }

    /// Record bytes of one page (never a page header).
    fn payload(&mut self, mut bytes: &[u8]) {
        let major = self.opts.major;
        while !bytes.is_empty() {
            match &mut self.state {
                State::Done => {
                    self.pos += bytes.len() as u64;
                    return;
                }
                State::Start => {
                    // Records start MAXALIGNed.
                    let pad = (maxalign(self.pos) - self.pos).min(bytes.len() as u64) as usize;
                    bytes = &bytes[pad..];
                    self.pos += pad as u64;
                    if self.pos % 8 == 0 && !bytes.is_empty() {
                        self.state = State::Header {
                            start: self.lsn(self.pos),
                            buf: [0; RECORD_HEADER_SIZE],
                            have: 0,
                        };
                    }
                }
                State::Continuation { remaining } => {
                    let n = (*remaining).min(bytes.len() as u64);
                    *remaining -= n;
                    if let Some(c) = self.continued.as_mut() {
                        c.take(&bytes[..n as usize]);
                    }
                    bytes = &bytes[n as usize..];
                    self.pos += n;
                    if *remaining == 0 {
                        self.state = State::Start;
                    }
                }
                State::Header { start, buf, have } => {
                    let n = (RECORD_HEADER_SIZE - *have).min(bytes.len());
                    let before = *have;
                    buf[before..before + n].copy_from_slice(&bytes[..n]);
                    *have += n;
                    bytes = &bytes[n..];
                    self.pos += n as u64;
                    let (start, buf, have) = (*start, *buf, *have);
                    if before < 4 && have >= 4 {
                        let tot = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes"));
                        if tot == 0 {
                            self.end_of_wal(start, "zero-length record");
                            continue;
                        }
                        if (tot as usize) < RECORD_HEADER_SIZE || tot > MAX_RECORD_SIZE {
                            self.end_of_wal(start, &format!("invalid record length {tot}"));
                            continue;
                        }
                    }
                    if have == RECORD_HEADER_SIZE {
                        self.header_done(start, buf);
                    }
                }
                State::Body => {
                    let b = &mut self.body;
                    let n = b.remaining.min(bytes.len() as u64) as usize;
                    let (now, rest) = bytes.split_at(n);
                    b.crc = crc32c::crc32c_append(b.crc, now);
                    let offset =
                        u64::from(b.header.tot_len) - RECORD_HEADER_SIZE as u64 - b.remaining;
                    b.capture.take(major, offset, now);
                    b.remaining -= n as u64;
                    bytes = rest;
                    self.pos += n as u64;
                    if b.remaining == 0 {
                        self.record_done();
                    }
                }
            }
        }
    }

    fn header_done(&mut self, start: Lsn, buf: [u8; RECORD_HEADER_SIZE]) {
        let header = RecordHeader::parse(&buf);
        if let Some(prev) = self.expect_prev {
            if header.prev != prev {
                // xlogreader.c, ValidXLogRecordHeader: WAL that does not chain
                // on from the last record is old WAL of a recycled segment.
                self.end_of_wal(
                    start,
                    &format!("record's xl_prev {} is not {prev}", header.prev),
                );
                return;
            }
        }
        self.count_record(start);
        let spans = u64::from(header.tot_len) - RECORD_HEADER_SIZE as u64 > self.payload_left();
        let b = &mut self.body;
        b.start = start;
        b.header_bytes = buf;
        b.header = header;
        b.remaining = u64::from(header.tot_len) - RECORD_HEADER_SIZE as u64;
        b.crc = 0;
        b.capture.reset(&header, spans);
        self.state = State::Body;
        if header.tot_len as usize == RECORD_HEADER_SIZE {
            self.record_done();
        }
    }

    fn record_done(&mut self) {
        if !matches!(
            std::mem::replace(&mut self.state, State::Start),
            State::Body
        ) {
            return;
        }
        let b = &self.body;
        self.expect_prev = Some(b.start);
        // xlogrecord.h: the CRC covers the body, then the header up to xl_crc.
        let crc = crc32c::crc32c_append(b.crc, &b.header_bytes[..20]);
        if crc != b.header.crc {
            self.summary.crc_failures.push(b.start);
            return;
        }
        // Where its last byte was, not start + xl_tot_len: page headers
        // between them count in LSNs.
        let end = Lsn(maxalign(self.lsn(self.pos).0));
        self.summary.end_of_wal = Some(end);
        decode::apply(
            &mut self.summary,
            self.opts.major,
            b.start,
            end,
            &b.header,
            &b.capture,
        );
        storage::apply(
            &mut self.blocks,
            self.opts.major,
            b.start,
            &b.header,
            &b.capture,
        );
        if b.header.rmid == decode::RM_XLOG_ID && b.header.info & 0xF0 == decode::XLOG_SWITCH {
            // The rest of the segment is zeros (xlog.c, XLogInsertRecord).
            self.summary.xlog_switch = Some(b.start);
            self.state = State::Done;
        }
    }
}

impl std::io::Write for WalScanner {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.feed(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Scans a whole segment held in memory.
pub fn scan_segment(bytes: &[u8], opts: ScanOptions) -> WalSummary {
    let mut s = WalScanner::new(opts);
    s.feed(bytes);
    s.finish()
}

#[cfg(test)]
mod blocktests;
#[cfg(test)]
mod tests;
