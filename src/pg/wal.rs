//! WAL file names, timelines, segment numbers and the long page header that
//! opens every WAL segment (xlog_internal.h).

use std::cmp::Ordering;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::str::FromStr;

use super::{
    major_for_wal_magic, validate_wal_segment_size, wal_magic_for_major, Lsn, PgError, Result,
    WAL_BLOCK_SIZE,
};

/// A timeline ID (`TimeLineID`). Shown in decimal, as PostgreSQL's messages
/// and `recovery_target_timeline` do; file names use [`TimelineId::hex8`].
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct TimelineId(pub u32);

impl TimelineId {
    /// Every cluster starts on timeline 1 (0 is never a valid timeline).
    pub const FIRST: TimelineId = TimelineId(1);

    /// The eight upper-case hex digits used in WAL file names: "00000002".
    pub fn hex8(self) -> String {
        format!("{:08X}", self.0)
    }
}

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl FromStr for TimelineId {
    type Err = PgError;

    /// Decimal, as users write it (`--target-timeline 2`); 0 is refused.
    fn from_str(s: &str) -> Result<TimelineId> {
        let err = || PgError::InvalidTimeline {
            text: s.chars().take(40).collect(),
        };
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        match s.parse::<u32>() {
            Ok(0) | Err(_) => Err(err()),
            Ok(v) => Ok(TimelineId(v)),
        }
    }
}

/// A WAL segment number (`XLogSegNo`): the segment's start LSN divided by the
/// segment size. Only meaningful together with a segment size.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct SegmentNo(pub u64);

impl SegmentNo {
    pub fn next(self) -> SegmentNo {
        SegmentNo(self.0 + 1)
    }

    pub fn prev(self) -> Option<SegmentNo> {
        self.0.checked_sub(1).map(SegmentNo)
    }

    /// LSN of the segment's first byte (`XLogSegNoOffsetToRecPtr` with offset 0).
    pub fn start_lsn(self, seg_size: u32) -> Lsn {
        Lsn(self.0 * u64::from(seg_size))
    }
}

impl fmt::Display for SegmentNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// `XLogSegmentsPerXLogId`: segments per 4 GiB "log" unit, the middle eight
/// hex digits of a segment name.
pub fn segments_per_xlog_id(seg_size: u32) -> u64 {
    0x1_0000_0000 / u64::from(seg_size)
}

/// The largest segment part a name can have: with the smallest (1 MiB)
/// segments there are 4096 segments per log unit.
const MAX_SEG_PART: u32 = (0x1_0000_0000u64 / super::WAL_SEG_MIN_SIZE as u64 - 1) as u32;

/// What an archived file is, by its name.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WalFileKind {
    /// `000000010000000A000000FF`: a complete WAL segment.
    Segment,
    /// `000000010000000A000000FF.partial`: the last, incomplete segment of a
    /// timeline, archived at promotion (or by pg_receivewal).
    Partial,
    /// `00000002.history`: a timeline history file.
    History,
    /// `000000010000000000000002.00000028.backup`: a backup history file,
    /// written by pg_backup_stop (`BackupHistoryFileName`).
    BackupLabel,
}

impl WalFileKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WalFileKind::Segment => "segment",
            WalFileKind::Partial => "partial segment",
            WalFileKind::History => "timeline history",
            WalFileKind::BackupLabel => "backup history",
        }
    }
}

/// The name of a file PostgreSQL hands to `archive_command` or asks of
/// `restore_command`, parsed once: see [`WalFileName::parse`].
///
/// Ordered by timeline, then by name (so by segment within a timeline, and
/// a `.backup` or `.partial` file right after its segment). Serialized as
/// the file name.
#[derive(Clone, Debug)]
pub struct WalFileName {
    name: Box<str>,
    kind: WalFileKind,
    tli: TimelineId,
    /// The "log" and "seg" parts of segment-like names (0 for History).
    log: u32,
    seg: u32,
}

impl WalFileName {
    /// Accepts exactly the names PostgreSQL writes: 24 upper-case hex digits
    /// (`XLogFileName`), the same with `.partial`, eight digits and
    /// `.history` (`TLHistoryFileName`), and 24 digits, a dot, eight digits
    /// and `.backup` (`BackupHistoryFileName`). Lower-case hex is refused:
    /// PostgreSQL never writes it, and accepting it would let two names for
    /// one segment into the archive.
    pub fn parse(name: &str) -> Result<WalFileName> {
        let bad = |reason: &str| PgError::InvalidWalFileName {
            name: name.chars().take(80).collect(),
            reason: reason.to_string(),
        };
        if !name.is_ascii() {
            return Err(bad("not ASCII"));
        }
        let (stem, kind) = if let Some(stem) = name.strip_suffix(".partial") {
            (stem, WalFileKind::Partial)
        } else if let Some(stem) = name.strip_suffix(".history") {
            (stem, WalFileKind::History)
        } else if let Some(stem) = name.strip_suffix(".backup") {
            (stem, WalFileKind::BackupLabel)
        } else {
            (name, WalFileKind::Segment)
        };

        let hex_field = |s: &str, what: &str| -> Result<u32> {
            if s.bytes().any(|b| b.is_ascii_lowercase()) && s.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Err(bad(&format!(
                    "lower-case hex in the {what}: PostgreSQL writes WAL file names in upper case"
                )));
            }
            if !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'A'..=b'F')) {
                return Err(bad(&format!("the {what} is not hexadecimal")));
            }
            // Eight hex digits always fit.
            Ok(u32::from_str_radix(s, 16).expect("eight upper-case hex digits fit a u32"))
        };

        let shape = "expected a WAL segment (24 hex digits), a .partial segment, \
                     a .history file (8 hex digits) or a .backup file";
        let (tli, log, seg) = match kind {
            WalFileKind::History => {
                if stem.len() != 8 {
                    return Err(bad(shape));
                }
                (hex_field(stem, "timeline")?, 0, 0)
            }
            WalFileKind::Segment | WalFileKind::Partial | WalFileKind::BackupLabel => {
                let segment_part = if kind == WalFileKind::BackupLabel {
                    // 24 digits, '.', 8 digits of the backup start's offset
                    if stem.len() != 33 || stem.as_bytes()[24] != b'.' {
                        return Err(bad(shape));
                    }
                    hex_field(&stem[25..], "backup start offset")?;
                    &stem[..24]
                } else {
                    if stem.len() != 24 {
                        return Err(bad(shape));
                    }
                    stem
                };
                let tli = hex_field(&segment_part[..8], "timeline")?;
                let log = hex_field(&segment_part[8..16], "log part")?;
                let seg = hex_field(&segment_part[16..24], "segment part")?;
                if seg > MAX_SEG_PART {
                    return Err(bad(&format!(
                        "segment part {seg:08X} is beyond {MAX_SEG_PART:08X}, the last segment of a log unit even with 1 MiB segments"
                    )));
                }
                (tli, log, seg)
            }
        };
        if tli == 0 {
            return Err(bad("timeline 0 does not exist (timelines start at 1)"));
        }
        Ok(WalFileName {
            name: name.into(),
            kind,
            tli: TimelineId(tli),
            log,
            seg,
        })
    }

    pub fn kind(&self) -> WalFileKind {
        self.kind
    }

    pub fn timeline(&self) -> TimelineId {
        self.tli
    }

    /// The exact file name.
    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// The 24-character segment name inside a Segment, Partial or BackupLabel
    /// name; `None` for History.
    pub fn segment_name(&self) -> Option<&str> {
        match self.kind {
            WalFileKind::History => None,
            _ => Some(&self.name[..24]),
        }
    }

    /// Is this a Segment or Partial: a file holding WAL pages?
    pub fn is_wal_data(&self) -> bool {
        matches!(self.kind, WalFileKind::Segment | WalFileKind::Partial)
    }

    /// The segment number (`XLogFromFileName`: log * segments per log unit +
    /// seg); `None` for History, and when the segment part is out of range
    /// for this segment size (such a name is never written with it).
    pub fn segno(&self, seg_size: u32) -> Option<SegmentNo> {
        if self.kind == WalFileKind::History {
            return None;
        }
        let per = segments_per_xlog_id(seg_size);
        if u64::from(self.seg) >= per {
            return None;
        }
        Some(SegmentNo(u64::from(self.log) * per + u64::from(self.seg)))
    }

    /// LSN where the named segment starts (for a BackupLabel: the start of
    /// the segment the backup started in; see [`WalFileName::backup_start_lsn`]).
    pub fn start_lsn(&self, seg_size: u32) -> Option<Lsn> {
        self.segno(seg_size).map(|s| s.start_lsn(seg_size))
    }

    /// For a BackupLabel name: the backup's start LSN, which the name spells
    /// as its segment plus the offset in the last eight digits.
    pub fn backup_start_lsn(&self, seg_size: u32) -> Option<Lsn> {
        if self.kind != WalFileKind::BackupLabel {
            return None;
        }
        let offset = u32::from_str_radix(&self.name[25..33], 16).ok()?;
        if offset >= seg_size {
            return None;
        }
        Some(self.start_lsn(seg_size)? + u64::from(offset))
    }

    /// The name of segment `segno` of timeline `tli` (`XLogFileName`).
    pub fn for_segment(tli: TimelineId, segno: SegmentNo, seg_size: u32) -> WalFileName {
        let per = segments_per_xlog_id(seg_size);
        let log = segno.0 / per;
        let seg = segno.0 % per;
        let log = u32::try_from(log)
            .expect("a segment number below 2^64 / seg_size has a 32-bit log part");
        let seg = seg as u32; // < per <= 4096
        WalFileName {
            name: format!("{:08X}{:08X}{:08X}", tli.0, log, seg).into(),
            kind: WalFileKind::Segment,
            tli,
            log,
            seg,
        }
    }

    /// The `.partial` name of segment `segno` of timeline `tli`.
    pub fn partial(tli: TimelineId, segno: SegmentNo, seg_size: u32) -> WalFileName {
        let s = Self::for_segment(tli, segno, seg_size);
        WalFileName {
            name: format!("{}.partial", s.name).into(),
            kind: WalFileKind::Partial,
            ..s
        }
    }

    /// The timeline history file of `tli` (`TLHistoryFileName`).
    pub fn history(tli: TimelineId) -> WalFileName {
        WalFileName {
            name: format!("{:08X}.history", tli.0).into(),
            kind: WalFileKind::History,
            tli,
            log: 0,
            seg: 0,
        }
    }

    /// The backup history file of a backup that started at `start` on `tli`
    /// (`BackupHistoryFileName`).
    pub fn backup_label(tli: TimelineId, start: Lsn, seg_size: u32) -> WalFileName {
        let s = Self::for_segment(tli, start.segno(seg_size), seg_size);
        WalFileName {
            name: format!("{}.{:08X}.backup", s.name, start.segment_offset(seg_size)).into(),
            kind: WalFileKind::BackupLabel,
            ..s
        }
    }

    /// Key prefix grouping files like pgBackRest's archive layout: the first
    /// 16 characters (timeline and log part, so up to 4096 segments);
    /// "history" for History files.
    pub fn dir_part(&self) -> &str {
        match self.kind {
            WalFileKind::History => "history",
            _ => &self.name[..16],
        }
    }
}

impl PartialEq for WalFileName {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for WalFileName {}

impl Hash for WalFileName {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name.hash(state);
    }
}

impl Ord for WalFileName {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.tli, &self.name).cmp(&(other.tli, &other.name))
    }
}

impl PartialOrd for WalFileName {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for WalFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl FromStr for WalFileName {
    type Err = PgError;

    fn from_str(s: &str) -> Result<WalFileName> {
        WalFileName::parse(s)
    }
}

impl serde::Serialize for WalFileName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.name)
    }
}

impl<'de> serde::Deserialize<'de> for WalFileName {
    fn deserialize<D: serde::Deserializer<'de>>(
        d: D,
    ) -> std::result::Result<WalFileName, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        WalFileName::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `XLP_LONG_HEADER`: the page starts with `XLogLongPageHeaderData`, as the
/// first page of every segment does.
pub const XLP_LONG_HEADER: u16 = 0x0002;
/// `XLP_FIRST_IS_CONTRECORD`: the page starts with the rest of a record.
pub const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
/// Every xlp_info bit any of PostgreSQL 14 to 18 defines. Bit 0x0004 is
/// `XLP_BKP_REMOVABLE` there (set on most pages), and 0x0008
/// `XLP_FIRST_IS_OVERWRITE_CONTRECORD` where back-patched; other bits are
/// never set.
const XLP_KNOWN_FLAGS: u16 = 0x000F;
/// `SizeOfXLogLongPHD`: MAXALIGN(sizeof(XLogLongPageHeaderData)).
pub const LONG_PAGE_HEADER_SIZE: usize = 40;

/// The long page header that opens a WAL segment (`XLogLongPageHeaderData`,
/// xlog_internal.h):
///
/// | offset | field            | type   |
/// |--------|------------------|--------|
/// | 0      | xlp_magic        | u16    |
/// | 2      | xlp_info         | u16    |
/// | 4      | xlp_tli          | u32    |
/// | 8      | xlp_pageaddr     | u64    |
/// | 16     | xlp_rem_len      | u32    |
/// | 20     | (padding)        |        |
/// | 24     | xlp_sysid        | u64    |
/// | 32     | xlp_seg_size     | u32    |
/// | 36     | xlp_xlog_blcksz  | u32    |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LongPageHeader {
    pub magic: u16,
    pub info: u16,
    /// Timeline of the first record on the page.
    pub tli: TimelineId,
    /// LSN of the page's first byte.
    pub pageaddr: Lsn,
    /// Bytes of a record continued from the previous page (0 if none).
    pub rem_len: u32,
    pub system_identifier: u64,
    pub seg_size: u32,
    pub xlog_blcksz: u32,
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4-byte slice"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8-byte slice"))
}

/// Parses the long header of a segment's first page. Needs the first 40
/// bytes; checks only that this is a long header with known flags (the
/// magic is checked against a major by [`validate_segment_start`]).
pub fn parse_long_page_header(first_page: &[u8]) -> Result<LongPageHeader> {
    if first_page.len() < LONG_PAGE_HEADER_SIZE {
        return Err(PgError::Truncated {
            what: "WAL long page header",
            need: LONG_PAGE_HEADER_SIZE,
            got: first_page.len(),
        });
    }
    let b = first_page;
    let magic = u16_at(b, 0);
    if major_for_wal_magic(magic).is_none() && major_for_wal_magic(magic.swap_bytes()).is_some() {
        return Err(PgError::BigEndian {
            what: "WAL segment",
        });
    }
    let info = u16_at(b, 2);
    let header = LongPageHeader {
        magic,
        info,
        tli: TimelineId(u32_at(b, 4)),
        pageaddr: Lsn(u64_at(b, 8)),
        rem_len: u32_at(b, 16),
        system_identifier: u64_at(b, 24),
        seg_size: u32_at(b, 32),
        xlog_blcksz: u32_at(b, 36),
    };
    if major_for_wal_magic(magic).is_none() {
        return Err(PgError::WalMagicUnknown { found: magic });
    }
    if info & !XLP_KNOWN_FLAGS != 0 {
        return Err(PgError::UnknownPageFlags { info });
    }
    if info & XLP_LONG_HEADER == 0 {
        return Err(PgError::NoLongHeader { info });
    }
    Ok(header)
}

/// What the stanza says a segment of its cluster must look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentExpectation {
    pub major: u32,
    pub system_identifier: u64,
    pub seg_size: u32,
}

/// Checks the first page of a Segment or Partial file against its name and
/// the stanza: the magic is the stanza major's, the long header is there,
/// the system identifier, segment size and WAL block size (8192) match, the
/// page address is the name's start LSN, and the page's timeline is not
/// newer than the name's. An older one is legitimate: the first segment of a
/// new timeline begins with a copy of the old timeline's pages up to the
/// switch point (xlog.c, XLogInitNewTimeline), which keep their xlp_tli.
pub fn validate_segment_start(
    name: &WalFileName,
    first_page: &[u8],
    expect: &SegmentExpectation,
) -> Result<LongPageHeader> {
    if !name.is_wal_data() {
        return Err(PgError::NotASegment {
            name: name.as_str().to_string(),
            kind: name.kind().as_str(),
        });
    }
    let expected_magic = wal_magic_for_major(expect.major).ok_or(PgError::UnsupportedMajor {
        major: expect.major,
    })?;
    let seg_size = validate_wal_segment_size(u64::from(expect.seg_size))?;
    let expected_start = name
        .start_lsn(seg_size)
        .ok_or_else(|| PgError::SegmentOutOfRange {
            name: name.as_str().to_string(),
            seg_size,
        })?;

    let h = match parse_long_page_header(first_page) {
        // The magic says more than a missing long header would: check it first.
        Err(PgError::NoLongHeader { .. } | PgError::UnknownPageFlags { .. })
            if first_page.len() >= 2 && u16_at(first_page, 0) != expected_magic =>
        {
            return Err(magic_error(u16_at(first_page, 0), expect.major));
        }
        other => other?,
    };
    if h.magic != expected_magic {
        return Err(magic_error(h.magic, expect.major));
    }
    if h.system_identifier != expect.system_identifier {
        return Err(PgError::SystemIdMismatch {
            found: h.system_identifier,
            expected: expect.system_identifier,
        });
    }
    if h.seg_size != seg_size {
        return Err(PgError::SegmentSizeMismatch {
            found: h.seg_size,
            expected: seg_size,
        });
    }
    if h.xlog_blcksz != WAL_BLOCK_SIZE {
        return Err(PgError::WalBlockSize {
            found: h.xlog_blcksz,
        });
    }
    if h.pageaddr != expected_start {
        return Err(PgError::PageAddrMismatch {
            found: h.pageaddr,
            expected: expected_start,
        });
    }
    if h.tli.0 == 0 {
        return Err(PgError::PageTimelineZero);
    }
    if h.tli > name.timeline() {
        return Err(PgError::PageTimelineAhead {
            found: h.tli,
            name_timeline: name.timeline(),
        });
    }
    Ok(h)
}

fn magic_error(found: u16, expected_major: u32) -> PgError {
    match major_for_wal_magic(found) {
        Some(found_major) => PgError::WalMagicOtherMajor {
            found,
            found_major,
            expected_major,
        },
        None => PgError::WalMagicUnknown { found },
    }
}

#[cfg(test)]
mod tests;
