//! The union of consecutive segments' [`SegmentRefs`], with the records
//! their boundaries cut put together: [`RangeUnion`].
//!
//! A record that starts in one segment and ends in a later one is seen by
//! neither whole: its block headers may be split, its main data (where a
//! storage event says which file) is at its end, and its CRC covers all of
//! it. Each segment keeps its [`Piece`]: the first bytes raw, the CRC of the
//! rest and the last bytes. Here the pieces of consecutive segments are
//! joined, the CRC checked (CRC-32C combines: crc(A‖B) from crc(A), crc(B)
//! and B's length), and the record applied like any other. A piece that
//! finds no partner (a segment missing from the range, a damaged one) is a
//! doubt at the record's LSN, never a guess.

use std::path::Path;

use super::decode::Capture;
use super::storage::{self, Collector};
use super::{RecordHeader, RECORD_HEADER_SIZE};
use crate::pg::blockref::{
    BlockRefError, ChangeSet, DoubtScope, Piece, SegmentRefs, UnionBuilder, UnionResult,
};
use crate::pg::Lsn;

#[derive(Debug, thiserror::Error)]
pub enum SpanError {
    #[error("spill the union of block references to disk: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    BlockRef(#[from] BlockRefError),
}

/// Unions the segments of an LSN range along a timeline path, given in
/// order (see the module comment). Memory is bounded by the budget given to
/// [`UnionBuilder`].
pub struct RangeUnion {
    builder: UnionBuilder,
    /// The record cut at the end of the last segment added, its pieces so far.
    open: Vec<Piece>,
    /// Where the next segment must start for `open` to go on.
    next_start: Option<Lsn>,
    stitched: u64,
}

impl RangeUnion {
    pub fn new(budget: usize, spill_dir: &Path) -> RangeUnion {
        RangeUnion {
            builder: UnionBuilder::new(budget, spill_dir),
            open: Vec::new(),
            next_start: None,
            stitched: 0,
        }
    }

    /// Records put together from pieces so far.
    pub fn stitched(&self) -> u64 {
        self.stitched
    }

    /// Adds the next segment of the range. The continuation at the first
    /// segment's start belongs to a record that began before the range and
    /// is not looked at.
    pub fn add(&mut self, seg: SegmentRefs) -> Result<(), SpanError> {
        let mut changes = seg.changes;
        let seg_end = seg.segment_start.checked_add(u64::from(seg.seg_size));
        if !self.open.is_empty() {
            let open = std::mem::take(&mut self.open);
            let lsn = open[0].start;
            match (self.next_start == Some(seg.segment_start), seg.head) {
                (true, Some(head)) => {
                    let mut pieces = open;
                    let ends_here = head.len >= u64::from(head.rem_len);
                    pieces.push(head);
                    if ends_here {
                        match stitch(seg.major, &pieces) {
                            Ok(c) => {
                                changes.union_with(c);
                                self.stitched += 1;
                            }
                            Err(why) => changes.add_doubt(lsn, DoubtScope::All, why),
                        }
                    } else {
                        // The segment lies wholly inside the record.
                        self.open = pieces;
                    }
                }
                (true, None) => changes.add_doubt(
                    lsn,
                    DoubtScope::All,
                    format!(
                        "the record at {lsn} goes on into the segment at {}, which does not continue it",
                        seg.segment_start
                    ),
                ),
                (false, _) => changes.add_doubt(
                    lsn,
                    DoubtScope::All,
                    format!(
                        "the record at {lsn} goes on into a segment that is not in the range (the next one given starts at {})",
                        seg.segment_start
                    ),
                ),
            }
        }
        if let Some(tail) = seg.tail {
            self.open = vec![tail];
        }
        self.next_start = seg_end;
        self.builder.add(changes)?;
        Ok(())
    }

    /// The union. A record still open goes on beyond the last segment:
    /// a doubt at its LSN (a backup whose start LSN is in that last segment
    /// starts before it, and replay covers it).
    pub fn finish(mut self) -> Result<UnionResult, SpanError> {
        if let Some(p) = self.open.first() {
            let mut c = ChangeSet::new();
            c.add_doubt(
                p.start,
                DoubtScope::All,
                format!(
                    "the record at {} goes on beyond the last segment of the range",
                    p.start
                ),
            );
            self.builder.add(c)?;
        }
        Ok(self.builder.finish()?)
    }
}

/// Puts a record together from its pieces, checks its CRC, and returns what
/// it does to relation files.
pub(super) fn stitch(major: u32, pieces: &[Piece]) -> Result<ChangeSet, String> {
    let lsn = pieces.first().map(|p| p.start).unwrap_or_default();
    // The record's first bytes: raw pieces, while each before was raw whole.
    let mut prefix: Vec<u8> = Vec::new();
    for p in pieces {
        prefix.extend_from_slice(&p.raw);
        if (p.raw.len() as u64) < p.len {
            break;
        }
    }
    let Some(hb) = prefix.get(..RECORD_HEADER_SIZE) else {
        return Err(format!(
            "the record at {lsn}: its pieces hold no whole record header"
        ));
    };
    let hb: [u8; RECORD_HEADER_SIZE] = hb.try_into().expect("24 bytes");
    let h = RecordHeader::parse(&hb);
    // Every later piece says how much of the record was still to come.
    let mut before = 0u64;
    for (i, p) in pieces.iter().enumerate() {
        if i > 0 && u64::from(p.rem_len) != u64::from(h.tot_len).saturating_sub(before) {
            return Err(format!(
                "the record at {lsn} ({} bytes) does not fit its continuation at {} ({} bytes still to come after {before})",
                h.tot_len, p.start, p.rem_len
            ));
        }
        before += p.len;
    }
    if before != u64::from(h.tot_len) {
        return Err(format!(
            "the record at {lsn} has {} bytes, its pieces {before}",
            h.tot_len
        ));
    }
    // CRC over the body (record bytes after the header), then the header
    // up to xl_crc, as XLogInsertRecord computes it.
    let mut crc = 0u32;
    let mut at = 0u64;
    for p in pieces {
        let skip = (RECORD_HEADER_SIZE as u64)
            .saturating_sub(at)
            .min(p.raw.len() as u64);
        crc = crc32c::crc32c_append(crc, &p.raw[skip as usize..]);
        let rest = p.len - p.raw.len() as u64;
        if rest > 0 {
            crc = crc32c::crc32c_combine(crc, p.rest_crc, rest as usize);
        }
        at += p.len;
    }
    crc = crc32c::crc32c_append(crc, &hb[..20]);
    if crc != h.crc {
        return Err(format!(
            "the record at {lsn}, put together from its pieces, fails its CRC check"
        ));
    }
    // The record's last bytes: tails (and raw parts of pieces known whole),
    // from the end back.
    let mut suffix: Vec<u8> = Vec::new();
    let mut suffix_start = before;
    for p in pieces.iter().rev() {
        let whole = p.raw.len() as u64 + p.tail.len() as u64 >= p.len;
        let mut bytes = if whole {
            let from_tail = (p.len - p.raw.len() as u64) as usize;
            let mut b = p.raw.clone();
            b.extend_from_slice(&p.tail[p.tail.len() - from_tail.min(p.tail.len())..]);
            b
        } else {
            p.tail.clone()
        };
        suffix_start -= bytes.len() as u64;
        bytes.extend_from_slice(&suffix);
        suffix = bytes;
        if !whole {
            break;
        }
    }
    let mut c = Capture::default();
    c.reset(&h, false);
    let body_prefix = &prefix[RECORD_HEADER_SIZE..];
    c.take(major, 0, body_prefix);
    let known = prefix.len() as u64;
    if suffix_start + (suffix.len() as u64) > known {
        let from = known.saturating_sub(suffix_start) as usize;
        let offset = suffix_start.max(known) - RECORD_HEADER_SIZE as u64;
        c.take(major, offset, &suffix[from..]);
    }
    let mut col = Collector::default();
    storage::apply(&mut col, major, lsn, &h, &c);
    Ok(col.finish())
}
