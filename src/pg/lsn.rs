//! Log sequence numbers: byte positions in the WAL stream (`XLogRecPtr`).

use std::fmt;
use std::ops::{Add, AddAssign};
use std::str::FromStr;

use super::wal::SegmentNo;
use super::{PgError, Result};

/// A WAL position (`XLogRecPtr`, xlogdefs.h). Shown as PostgreSQL shows it,
/// `16/B374D848`: the high and low 32 bits in upper-case hex without leading
/// zeros (`LSN_FORMAT_ARGS`). Serialized as that string.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Lsn(pub u64);

impl Lsn {
    /// `InvalidXLogRecPtr`: PostgreSQL's "no position" (e.g. an unset
    /// backup start point in pg_control).
    pub const INVALID: Lsn = Lsn(0);

    pub fn is_valid(self) -> bool {
        self != Self::INVALID
    }

    pub fn checked_add(self, bytes: u64) -> Option<Lsn> {
        self.0.checked_add(bytes).map(Lsn)
    }

    pub fn checked_sub(self, bytes: u64) -> Option<Lsn> {
        self.0.checked_sub(bytes).map(Lsn)
    }

    /// Bytes from `earlier` to `self`, if `earlier` is not after `self`.
    pub fn distance_from(self, earlier: Lsn) -> Option<u64> {
        self.0.checked_sub(earlier.0)
    }

    /// Offset inside its segment (`XLogSegmentOffset`). `seg_size` must be a
    /// valid WAL segment size (a power of two), see
    /// [`validate_wal_segment_size`](super::validate_wal_segment_size).
    pub fn segment_offset(self, seg_size: u32) -> u32 {
        debug_assert!(seg_size.is_power_of_two());
        // Smaller than seg_size, so it fits.
        (self.0 & (u64::from(seg_size) - 1)) as u32
    }

    /// The segment this position is in (`XLByteToSeg`).
    pub fn segno(self, seg_size: u32) -> SegmentNo {
        debug_assert!(seg_size.is_power_of_two());
        SegmentNo(self.0 / u64::from(seg_size))
    }

    /// The segment holding the byte just before this position
    /// (`XLByteToPrevSeg`): the segment a record *ending* here was written
    /// to. A position on a segment boundary belongs to the previous segment.
    pub fn prev_segno(self, seg_size: u32) -> SegmentNo {
        debug_assert!(seg_size.is_power_of_two());
        SegmentNo(self.0.saturating_sub(1) / u64::from(seg_size))
    }

    pub fn is_segment_start(self, seg_size: u32) -> bool {
        self.segment_offset(seg_size) == 0
    }

    /// Start of the segment this position is in.
    pub fn segment_start(self, seg_size: u32) -> Lsn {
        Lsn(self.0 - u64::from(self.segment_offset(seg_size)))
    }

    /// Offset inside its WAL page (8192-byte `XLOG_BLCKSZ` pages).
    pub fn page_offset(self) -> u32 {
        (self.0 % u64::from(super::WAL_BLOCK_SIZE)) as u32
    }
}

impl Add<u64> for Lsn {
    type Output = Lsn;

    /// Panics on overflow: 2^64 bytes of WAL is not a position PostgreSQL
    /// reaches; use [`Lsn::checked_add`] for values read from input.
    fn add(self, bytes: u64) -> Lsn {
        self.checked_add(bytes)
            .expect("an LSN plus a length stays below 2^64 bytes of WAL")
    }
}

impl AddAssign<u64> for Lsn {
    fn add_assign(&mut self, bytes: u64) {
        *self = *self + bytes;
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = PgError;

    /// Parses `X/X` as `pg_lsn`'s input function does: one to eight hex
    /// digits on each side, either case (users type LSNs; PostgreSQL itself
    /// prints upper case).
    fn from_str(s: &str) -> Result<Lsn> {
        let err = || PgError::InvalidLsn {
            text: s.chars().take(40).collect(),
        };
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let part = |p: &str| -> Result<u64> {
            if p.is_empty() || p.len() > 8 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err());
            }
            u64::from_str_radix(p, 16).map_err(|_| err())
        };
        Ok(Lsn((part(hi)? << 32) | part(lo)?))
    }
}

impl serde::Serialize for Lsn {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Lsn {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Lsn, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u32 = 1 << 20;
    const SEG16: u32 = 16 << 20;
    const GIB: u32 = 1 << 30;

    #[test]
    fn display_like_postgresql() {
        assert_eq!(Lsn(0).to_string(), "0/0");
        assert_eq!(Lsn(0x16_B374_D848).to_string(), "16/B374D848");
        assert_eq!(Lsn(0x0100_0028).to_string(), "0/1000028");
        assert_eq!(Lsn(u64::MAX).to_string(), "FFFFFFFF/FFFFFFFF");
    }

    #[test]
    fn parse() {
        assert_eq!("16/B374D848".parse(), Ok(Lsn(0x16_B374_D848)));
        assert_eq!("0/0".parse(), Ok(Lsn(0)));
        assert_eq!("16/b374d848".parse(), Ok(Lsn(0x16_B374_D848)));
        assert_eq!("00000000/01000028".parse(), Ok(Lsn(0x0100_0028)));
        for bad in [
            "",
            "/",
            "0/",
            "/0",
            "16",
            "16/B374D848/1",
            "123456789/0",
            "g/0",
            " 0/0",
            "0/0 ",
            "-1/0",
            "+1/0",
        ] {
            let e = bad.parse::<Lsn>().unwrap_err();
            assert!(matches!(e, PgError::InvalidLsn { .. }), "{bad:?}");
        }
        assert_eq!(
            "16".parse::<Lsn>().unwrap_err().to_string(),
            "invalid LSN \"16\": expected two hexadecimal numbers like 16/B374D848"
        );
    }

    #[test]
    fn round_trip_and_serde() {
        for v in [0, 1, 0xFFFF_FFFF, 0x1_0000_0000, 0x16_B374_D848, u64::MAX] {
            let l = Lsn(v);
            assert_eq!(l.to_string().parse(), Ok(l));
            let j = serde_json::to_string(&l).unwrap();
            assert_eq!(j, format!("\"{l}\""));
            assert_eq!(serde_json::from_str::<Lsn>(&j).unwrap(), l);
        }
        assert!(serde_json::from_str::<Lsn>("\"zz\"").is_err());
        assert!(serde_json::from_str::<Lsn>("42").is_err());
    }

    #[test]
    fn arithmetic() {
        let l = Lsn(0x1_0000_0000);
        assert_eq!(l + 1, Lsn(0x1_0000_0001));
        let mut m = l;
        m += 0x10;
        assert_eq!(m, Lsn(0x1_0000_0010));
        assert_eq!(l.checked_sub(1), Some(Lsn(0xFFFF_FFFF)));
        assert_eq!(Lsn(0).checked_sub(1), None);
        assert_eq!(Lsn(u64::MAX).checked_add(1), None);
        assert_eq!(m.distance_from(l), Some(0x10));
        assert_eq!(l.distance_from(m), None);
        assert!(!Lsn::INVALID.is_valid());
        assert!(l.is_valid());
        assert_eq!(Lsn(0x0150_2010).page_offset(), 0x10);
    }

    #[test]
    fn segments_of_1_mib() {
        let l: Lsn = "0/1C65300".parse().unwrap();
        assert_eq!(l.segno(MIB), SegmentNo(0x1C));
        assert_eq!(l.segment_offset(MIB), 0x65300);
        assert_eq!(l.segment_start(MIB), Lsn(0x01C0_0000));
        assert!(!l.is_segment_start(MIB));
        assert!(Lsn(0x01C0_0000).is_segment_start(MIB));
        // 4096 segments per 4 GiB "log file"
        let l: Lsn = "1/0".parse().unwrap();
        assert_eq!(l.segno(MIB), SegmentNo(4096));
        assert_eq!(l.prev_segno(MIB), SegmentNo(4095));
    }

    #[test]
    fn segments_of_16_mib() {
        let l: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(l.segno(SEG16), SegmentNo(0x16 * 256 + 0xB3));
        assert_eq!(l.segment_offset(SEG16), 0x74D848);
        assert_eq!(l.prev_segno(SEG16), l.segno(SEG16));
        let boundary: Lsn = "16/B4000000".parse().unwrap();
        assert!(boundary.is_segment_start(SEG16));
        assert_eq!(boundary.segno(SEG16), SegmentNo(0x16 * 256 + 0xB4));
        // a record ending exactly on the boundary was written to the segment before
        assert_eq!(boundary.prev_segno(SEG16), SegmentNo(0x16 * 256 + 0xB3));
        assert_eq!(Lsn(0).prev_segno(SEG16), SegmentNo(0));
    }

    #[test]
    fn segments_of_1_gib() {
        let l: Lsn = "3/7FFFFFFF".parse().unwrap();
        assert_eq!(l.segno(GIB), SegmentNo(3 * 4 + 1));
        assert_eq!(l.segment_offset(GIB), 0x3FFF_FFFF);
        assert_eq!((l + 1).segno(GIB), SegmentNo(3 * 4 + 2));
        assert!((l + 1).is_segment_start(GIB));
        assert_eq!(l.segment_start(GIB), "3/40000000".parse().unwrap());
    }
}
