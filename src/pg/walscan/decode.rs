//! The records [`super::WalScanner`] decodes, and how: which bytes of a
//! streaming record to keep, where its block references and main data are
//! (block headers, xlogrecord.h; DecodeXLogRecord in xlogreader.c), and what
//! the main data of commits, restore points and timeline switches says
//! (xact.h, pg_control.h). What records do to relation files is in
//! `storage`.

use super::{
    RecordHeader, RestorePoint, TimelineSwitch, WalSummary, XactEnd, XactMark, KEEP_HEAD,
    KEEP_MAIN, KEEP_TAIL, RECORD_HEADER_SIZE,
};
use crate::pg::blockref::{Fork, RelFileLocator, RelFork};
use crate::pg::Lsn;

/// Resource manager IDs (rmgrlist.h).
pub(super) const RM_XLOG_ID: u8 = 0;
pub(super) const RM_XACT_ID: u8 = 1;

/// XLOG record types (pg_control.h), in `xl_info & 0xF0`.
pub(super) const XLOG_PARAMETER_CHANGE: u8 = 0x60;
const XLOG_CHECKPOINT_SHUTDOWN: u8 = 0x00;
const XLOG_CHECKPOINT_ONLINE: u8 = 0x10;
pub(super) const XLOG_SWITCH: u8 = 0x40;
const XLOG_RESTORE_POINT: u8 = 0x70;
const XLOG_END_OF_RECOVERY: u8 = 0x90;
const XLOG_OVERWRITE_CONTRECORD: u8 = 0xD0;

/// Transaction record types (xact.h), in `xl_info & XLOG_XACT_OPMASK`.
pub(super) const XLOG_XACT_OPMASK: u8 = 0x70;
pub(super) const XLOG_XACT_COMMIT: u8 = 0x00;
pub(super) const XLOG_XACT_ABORT: u8 = 0x20;
pub(super) const XLOG_XACT_COMMIT_PREPARED: u8 = 0x30;
pub(super) const XLOG_XACT_ABORT_PREPARED: u8 = 0x40;
/// `XLOG_XACT_HAS_INFO`: an `xl_xact_xinfo` follows `xact_time`.
const XLOG_XACT_HAS_INFO: u8 = 0x80;

/// `xl_xact_xinfo.xinfo` bits (xact.h): which optional parts follow.
const XACT_XINFO_HAS_DBINFO: u32 = 1 << 0;
const XACT_XINFO_HAS_SUBXACTS: u32 = 1 << 1;
const XACT_XINFO_HAS_RELFILELOCATORS: u32 = 1 << 2;
const XACT_XINFO_HAS_INVALS: u32 = 1 << 3;
const XACT_XINFO_HAS_TWOPHASE: u32 = 1 << 4;
/// PostgreSQL 15+.
const XACT_XINFO_HAS_DROPPED_STATS: u32 = 1 << 8;

/// Block header fields (xlogrecord.h).
const XLR_MAX_BLOCK_ID: u8 = 32;
const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
const XLR_BLOCK_ID_ORIGIN: u8 = 253;
const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;
const BKPBLOCK_FORK_MASK: u8 = 0x0F;
const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
const BKPBLOCK_SAME_REL: u8 = 0x80;
const BKPIMAGE_HAS_HOLE: u8 = 0x01;
/// PostgreSQL 14: `BKPIMAGE_IS_COMPRESSED` (0x04 is BKPIMAGE_APPLY there).
const BKPIMAGE_IS_COMPRESSED_14: u8 = 0x02;
/// PostgreSQL 15+: `BKPIMAGE_COMPRESS_PGLZ | _LZ4 | _ZSTD`.
const BKPIMAGE_COMPRESSED_15: u8 = 0x04 | 0x08 | 0x10;
/// `sizeof(RelFileLocator)` (RelFileNode before 16): three Oids.
pub(super) const REL_FILE_LOCATOR_SIZE: usize = 12;

/// `TimestampTz` counts microseconds from 2000-01-01 00:00 UTC.
const PG_EPOCH_UNIX_US: i64 = 946_684_800_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Kind {
    #[default]
    None,
    Xact {
        commit: bool,
        prepared: bool,
    },
    RestorePoint,
    EndOfRecovery,
    Checkpoint,
    OverwriteContrecord,
}

/// One block reference of a record: the fork (a number, as read: it may
/// not be one PostgreSQL defines) and the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BlockRef {
    pub loc: RelFileLocator,
    pub fork: u8,
    pub block: u32,
}

impl BlockRef {
    pub(super) fn key(&self) -> Option<RelFork> {
        Some(RelFork {
            loc: self.loc,
            fork: Fork::from_number(self.fork)?,
        })
    }
}

/// The kept bytes of the record streaming by. Every record keeps its
/// first [`KEEP_HEAD`] body bytes (its block headers); those whose main data
/// pgvault reads keep that too, up to a bound per kind; a record that goes on
/// into the next segment keeps its last [`KEEP_TAIL`] bytes as well.
#[derive(Debug, Default)]
pub(super) struct Capture {
    kind: Kind,
    /// Main data bytes to keep (0: none).
    keep_main: usize,
    /// tot_len minus the record header.
    body_len: u64,
    /// The first min(body_len, KEEP_HEAD) body bytes.
    pub(super) head: Vec<u8>,
    /// Main data (offset in the body, length) once the block headers are read.
    main: Option<(u64, u64)>,
    /// The block headers could not be read.
    pub(super) unreadable: bool,
    /// The first min(main length, keep_main) bytes of the main data.
    main_buf: Vec<u8>,
    /// The block references, once the block headers are read.
    pub(super) refs: Vec<BlockRef>,
    /// Keep the last bytes: the record goes on into the next segment.
    spans: bool,
    /// The last body bytes after `head` (at most KEEP_TAIL), when `spans`.
    pub(super) tail: Vec<u8>,
    /// CRC-32C of the body bytes after `head`, when `spans`.
    pub(super) rest_crc: u32,
}

impl Capture {
    /// Sets up for the record `h` heads, keeping the buffers' memory.
    /// `spans`: the record goes on beyond this segment.
    pub(super) fn reset(&mut self, h: &RecordHeader, spans: bool) {
        let kind = match h.rmid {
            RM_XACT_ID => match h.info & XLOG_XACT_OPMASK {
                XLOG_XACT_COMMIT => Kind::Xact {
                    commit: true,
                    prepared: false,
                },
                XLOG_XACT_ABORT => Kind::Xact {
                    commit: false,
                    prepared: false,
                },
                XLOG_XACT_COMMIT_PREPARED => Kind::Xact {
                    commit: true,
                    prepared: true,
                },
                XLOG_XACT_ABORT_PREPARED => Kind::Xact {
                    commit: false,
                    prepared: true,
                },
                _ => Kind::None,
            },
            RM_XLOG_ID => match h.info & 0xF0 {
                XLOG_CHECKPOINT_SHUTDOWN | XLOG_CHECKPOINT_ONLINE => Kind::Checkpoint,
                XLOG_RESTORE_POINT => Kind::RestorePoint,
                XLOG_END_OF_RECOVERY => Kind::EndOfRecovery,
                XLOG_OVERWRITE_CONTRECORD => Kind::OverwriteContrecord,
                _ => Kind::None,
            },
            _ => Kind::None,
        };
        self.kind = kind;
        self.keep_main =
            super::storage::main_to_keep(h).max(if kind == Kind::None { 0 } else { KEEP_MAIN });
        self.body_len = u64::from(h.tot_len).saturating_sub(RECORD_HEADER_SIZE as u64);
        self.head.clear();
        self.main = None;
        self.unreadable = false;
        self.main_buf.clear();
        self.refs.clear();
        self.spans = spans;
        self.tail.clear();
        self.rest_crc = 0;
    }

    /// Body bytes `bytes`, the first at body offset `offset` (in order;
    /// a gap leaves the main data short).
    pub(super) fn take(&mut self, major: u32, offset: u64, bytes: &[u8]) {
        let head_len = self.body_len.min(KEEP_HEAD as u64);
        let mut rest = bytes;
        let mut rest_off = offset;
        if offset < head_len && offset == self.head.len() as u64 {
            let n = ((head_len - offset) as usize).min(bytes.len());
            self.head.extend_from_slice(&bytes[..n]);
            rest = &bytes[n..];
            rest_off += n as u64;
            if self.head.len() as u64 == head_len {
                self.locate_main(major);
            }
        }
        if self.spans && !rest.is_empty() && rest_off >= head_len {
            self.rest_crc = crc32c::crc32c_append(self.rest_crc, rest);
            self.tail.extend_from_slice(rest);
            if self.tail.len() > 2 * KEEP_TAIL {
                self.tail.drain(..self.tail.len() - KEEP_TAIL);
            }
        }
        let Some((main_off, main_len)) = self.main else {
            return;
        };
        let want_end = main_off + main_len.min(self.keep_main as u64);
        let next = main_off + self.main_buf.len() as u64;
        let end = offset + bytes.len() as u64;
        if next >= offset && next < end && next < want_end {
            let from = (next - offset) as usize;
            let to = (want_end.min(end) - offset) as usize;
            self.main_buf.extend_from_slice(&bytes[from..to]);
        }
    }

    /// The kept tail, at most KEEP_TAIL bytes.
    pub(super) fn trim_tail(&mut self) {
        if self.tail.len() > KEEP_TAIL {
            self.tail.drain(..self.tail.len() - KEEP_TAIL);
        }
    }

    /// Reads the block headers (xlogrecord.h; DecodeXLogRecord in
    /// xlogreader.c): the block references, and where the main data is.
    fn locate_main(&mut self, major: u32) {
        match parse_headers(major, &self.head, self.body_len, &mut self.refs) {
            Some((off, len)) => {
                self.main = Some((off, len));
                // What of the main data is already in `head`.
                let want_end = (off + len.min(self.keep_main as u64)).min(self.head.len() as u64);
                if off < want_end {
                    self.main_buf
                        .extend_from_slice(&self.head[off as usize..want_end as usize]);
                }
            }
            None => {
                self.refs.clear();
                self.unreadable = true;
            }
        }
    }

    fn main_data(&self) -> Option<&[u8]> {
        if self.unreadable {
            return None;
        }
        Some(&self.main_buf)
    }

    /// The main data as kept, and whether that is all of it.
    pub(super) fn main_kept(&self) -> Option<(&[u8], bool)> {
        let (_, len) = self.main?;
        if self.unreadable {
            return None;
        }
        Some((&self.main_buf, self.main_buf.len() as u64 == len))
    }
}

/// Reads the block headers at the start of a record's body: the block
/// references go to `refs`; returns the main data's (offset in the body,
/// length), or None if the headers do not make sense or lie beyond `head`.
fn parse_headers(
    major: u32,
    head: &[u8],
    body_len: u64,
    refs: &mut Vec<BlockRef>,
) -> Option<(u64, u64)> {
    let u16_at = |p: usize| -> Option<u64> {
        Some(u64::from(u16::from_le_bytes(
            head.get(p..p + 2)?.try_into().ok()?,
        )))
    };
    let u32_at = |p: usize| -> Option<u32> {
        Some(u32::from_le_bytes(head.get(p..p + 4)?.try_into().ok()?))
    };
    let mut p = 0usize;
    let mut datatotal = 0u64;
    let mut last_id: Option<u8> = None;
    let mut prev_loc: Option<RelFileLocator> = None;
    while body_len.checked_sub(p as u64)? > datatotal {
        let id = *head.get(p)?;
        p += 1;
        let main_len = match id {
            XLR_BLOCK_ID_DATA_SHORT => {
                let len = u64::from(*head.get(p)?);
                p += 1;
                len
            }
            XLR_BLOCK_ID_DATA_LONG => {
                let len = u64::from(u32_at(p)?);
                p += 4;
                len
            }
            XLR_BLOCK_ID_ORIGIN => {
                p += 2;
                continue;
            }
            XLR_BLOCK_ID_TOPLEVEL_XID => {
                p += 4;
                continue;
            }
            0..=XLR_MAX_BLOCK_ID => {
                // DecodeXLogRecord: block IDs only go up.
                if last_id.is_some_and(|l| id <= l) {
                    return None;
                }
                last_id = Some(id);
                let fork_flags = *head.get(p)?;
                datatotal += u16_at(p + 1)?;
                p += 3;
                if fork_flags & BKPBLOCK_HAS_IMAGE != 0 {
                    let bimg_len = u16_at(p)?;
                    let bimg_info = *head.get(p + 4)?;
                    p += 5;
                    let compressed = if major >= 15 {
                        bimg_info & BKPIMAGE_COMPRESSED_15 != 0
                    } else {
                        bimg_info & BKPIMAGE_IS_COMPRESSED_14 != 0
                    };
                    if compressed && bimg_info & BKPIMAGE_HAS_HOLE != 0 {
                        p += 2;
                    }
                    datatotal += bimg_len;
                }
                let loc = if fork_flags & BKPBLOCK_SAME_REL == 0 {
                    let loc = RelFileLocator {
                        spc: u32_at(p)?,
                        db: u32_at(p + 4)?,
                        rel: u32_at(p + 8)?,
                    };
                    p += REL_FILE_LOCATOR_SIZE;
                    loc
                } else {
                    // "BKPBLOCK_SAME_REL set but no previous rel" is an error
                    // in DecodeXLogRecord.
                    prev_loc?
                };
                prev_loc = Some(loc);
                refs.push(BlockRef {
                    loc,
                    fork: fork_flags & BKPBLOCK_FORK_MASK,
                    block: u32_at(p)?,
                });
                p += 4;
                continue;
            }
            _ => return None,
        };
        // By convention the main data header is the last one, and its data
        // the last bytes of the record.
        let headers_end = p as u64;
        if headers_end + datatotal + main_len != body_len {
            return None;
        }
        return Some((body_len - main_len, main_len));
    }
    if p as u64 + datatotal != body_len {
        return None;
    }
    // No main data.
    Some((body_len, 0))
}

fn i64_at(b: &[u8], off: usize) -> Option<i64> {
    Some(i64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

pub(super) fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn unix_us(pg_time: i64) -> i64 {
    pg_time.saturating_add(PG_EPOCH_UNIX_US)
}

/// Adds what a complete, CRC-checked record says to the summary.
pub(super) fn apply(
    s: &mut WalSummary,
    major: u32,
    start: Lsn,
    end: Lsn,
    h: &RecordHeader,
    c: &Capture,
) {
    let Some(main) = c.main_data() else {
        forget_xids_if_xact(s, c.kind);
        return;
    };
    match c.kind {
        Kind::None => {}
        Kind::Xact { commit, prepared } => {
            // xl_xact_commit / xl_xact_abort: TimestampTz xact_time first.
            let Some(t) = i64_at(main, 0) else {
                forget_xids_if_xact(s, c.kind);
                return;
            };
            let twophase = prepared
                .then(|| twophase_xid(major, h.info, main, commit))
                .flatten();
            if prepared && twophase.is_none() {
                // The prepared xid lies past the bytes kept: this
                // segment's list would miss it.
                s.xact_ends = None;
            }
            let xid = twophase.unwrap_or(h.xid);
            let mark = XactMark {
                lsn: start,
                xid,
                time_us: unix_us(t),
                commit,
            };
            if let Some(ends) = &mut s.xact_ends {
                ends.push(XactEnd {
                    xid,
                    lsn: start,
                    commit,
                });
            }
            if commit {
                s.commits += 1;
            } else {
                s.aborts += 1;
            }
            if s.first_xact.is_none() {
                s.first_xact = Some(mark.clone());
            }
            s.last_xact = Some(mark);
        }
        Kind::RestorePoint => {
            // xl_restore_point: TimestampTz rp_time; char rp_name[MAXFNAMELEN (64)].
            let Some(t) = i64_at(main, 0) else {
                return;
            };
            let raw = main.get(8..main.len().min(8 + 64)).unwrap_or(&[]);
            let name = raw.split(|&b| b == 0).next().unwrap_or(&[]);
            s.restore_points.push(RestorePoint {
                name: String::from_utf8_lossy(name).into_owned(),
                lsn: start,
                time_us: unix_us(t),
                end,
            });
        }
        Kind::EndOfRecovery => {
            // xl_end_of_recovery: TimestampTz end_time; TimeLineID
            // ThisTimeLineID; TimeLineID PrevTimeLineID (17+: int wal_level).
            let (Some(t), Some(this), Some(prev)) =
                (i64_at(main, 0), u32_at(main, 8), u32_at(main, 12))
            else {
                return;
            };
            if this != prev {
                s.timeline_switches.push(TimelineSwitch {
                    lsn: start,
                    from: prev,
                    to: this,
                    time_us: Some(unix_us(t)),
                });
            }
        }
        Kind::Checkpoint => {
            // CheckPoint: redo u64 @0, ThisTimeLineID @8, PrevTimeLineID @12,
            // pg_time_t time (Unix seconds) @64 in 14 to 18 (pg_control.h;
            // the same offsets src/pg/control.rs reads in checkPointCopy).
            // The timelines differ only in an end-of-recovery checkpoint.
            let (Some(this), Some(prev)) = (u32_at(main, 8), u32_at(main, 12)) else {
                return;
            };
            if this != prev {
                s.timeline_switches.push(TimelineSwitch {
                    lsn: start,
                    from: prev,
                    to: this,
                    time_us: i64_at(main, 64).map(|secs| secs.saturating_mul(1_000_000)),
                });
            }
        }
        Kind::OverwriteContrecord => {
            // xl_overwrite_contrecord: XLogRecPtr overwritten_lsn; TimestampTz.
            if let Some(lsn) = main.get(0..8).and_then(|b| b.try_into().ok()) {
                s.overwritten_contrecords.push(Lsn(u64::from_le_bytes(lsn)));
            }
        }
    }
}

/// A commit or abort record that could not be read: the segment's
/// `xact_ends` would miss it, so which xids end here is unknown.
fn forget_xids_if_xact(s: &mut WalSummary, kind: Kind) {
    if matches!(kind, Kind::Xact { .. }) {
        s.xact_ends = None;
    }
}

/// The prepared transaction's xid in a COMMIT/ABORT PREPARED record's main
/// data (ParseCommitRecord / ParseAbortRecord in xactdesc.c): the optional
/// parts after xl_xact_xinfo come in a fixed order, each an int count and
/// its array, and `xl_xact_twophase` after them.
fn twophase_xid(major: u32, info: u8, main: &[u8], commit: bool) -> Option<u32> {
    if info & XLOG_XACT_HAS_INFO == 0 {
        return None;
    }
    let xinfo = u32_at(main, 8)?;
    let mut off = 12usize;
    let skip_array = |off: &mut usize, item: usize| -> Option<()> {
        let n = usize::try_from(u32_at(main, *off)?).ok()?;
        *off = off.checked_add(4)?.checked_add(n.checked_mul(item)?)?;
        Some(())
    };
    if xinfo & XACT_XINFO_HAS_DBINFO != 0 {
        off += 8;
    }
    if xinfo & XACT_XINFO_HAS_SUBXACTS != 0 {
        skip_array(&mut off, 4)?;
    }
    if xinfo & XACT_XINFO_HAS_RELFILELOCATORS != 0 {
        skip_array(&mut off, REL_FILE_LOCATOR_SIZE)?;
    }
    if major >= 15 && xinfo & XACT_XINFO_HAS_DROPPED_STATS != 0 {
        // xl_xact_stats_item: kind, dboid, objoid (12 bytes); 18 widened the
        // object id to two uint32 halves (16 bytes).
        skip_array(&mut off, if major >= 18 { 16 } else { 12 })?;
    }
    if commit && xinfo & XACT_XINFO_HAS_INVALS != 0 {
        // SharedInvalidationMessage: 16 bytes.
        skip_array(&mut off, 16)?;
    }
    if xinfo & XACT_XINFO_HAS_TWOPHASE == 0 {
        return None;
    }
    u32_at(main, off)
}

/// Where a commit or abort record's dropped relations are in its main data
/// (`xl_xact_relfilelocators`, after the optional dbinfo and subxacts; see
/// ParseCommitRecord / ParseAbortRecord in xactdesc.c): (offset of the
/// first `RelFileLocator`, count), `(0, 0)` when there are none; None if the
/// kept bytes end before the count.
pub(super) fn xact_dropped_rels(info: u8, main: &[u8]) -> Option<(usize, usize)> {
    if info & XLOG_XACT_HAS_INFO == 0 {
        return Some((0, 0));
    }
    let xinfo = u32_at(main, 8)?;
    let mut off = 12usize;
    if xinfo & XACT_XINFO_HAS_DBINFO != 0 {
        off += 8;
    }
    if xinfo & XACT_XINFO_HAS_SUBXACTS != 0 {
        let n = usize::try_from(u32_at(main, off)?).ok()?;
        off = off.checked_add(4)?.checked_add(n.checked_mul(4)?)?;
    }
    if xinfo & XACT_XINFO_HAS_RELFILELOCATORS == 0 {
        return Some((0, 0));
    }
    let n = usize::try_from(u32_at(main, off)?).ok()?;
    Some((off + 4, n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pg::walscan::XactEnds;

    /// Decodes a COMMIT PREPARED record whose main data holds `nmsgs`
    /// invalidation messages before the prepared xid 777.
    fn commit_prepared(nmsgs: u32) -> WalSummary {
        let mut main = Vec::new();
        main.extend_from_slice(&0i64.to_le_bytes()); // xact_time
        main.extend_from_slice(&(XACT_XINFO_HAS_INVALS | XACT_XINFO_HAS_TWOPHASE).to_le_bytes());
        main.extend_from_slice(&nmsgs.to_le_bytes());
        main.extend(std::iter::repeat_n(0u8, nmsgs as usize * 16));
        main.extend_from_slice(&777u32.to_le_bytes());
        let mut body = vec![XLR_BLOCK_ID_DATA_LONG];
        body.extend_from_slice(&(main.len() as u32).to_le_bytes());
        body.extend_from_slice(&main);
        let h = RecordHeader {
            tot_len: (RECORD_HEADER_SIZE + body.len()) as u32,
            xid: 0,
            prev: Lsn(0),
            info: XLOG_XACT_COMMIT_PREPARED | XLOG_XACT_HAS_INFO,
            rmid: RM_XACT_ID,
            crc: 0,
        };
        let mut c = Capture::default();
        c.reset(&h, false);
        c.take(15, 0, &body);
        let mut s = WalSummary {
            xact_ends: Some(XactEnds::new()),
            ..WalSummary::default()
        };
        apply(&mut s, 15, Lsn(0x3000028), Lsn(0x3000028 + 8192), &h, &c);
        s
    }

    #[test]
    fn a_prepared_xid_past_the_kept_bytes_makes_the_xids_unknown() {
        let s = commit_prepared(2);
        let ends: Vec<XactEnd> = s.xact_ends.unwrap().iter().unwrap().collect();
        assert_eq!(
            ends,
            vec![XactEnd {
                xid: 777,
                lsn: Lsn(0x3000028),
                commit: true
            }]
        );
        // So many messages that the xid is past what is kept of a commit
        // record's main data. Recording the record's own xid (0) instead
        // would make an archived target look absent.
        let s = commit_prepared((super::super::storage::KEEP_XACT_MAIN / 16 + 10) as u32);
        assert_eq!(s.commits, 1);
        assert!(s.xact_ends.is_none(), "{s:?}");
    }
}
