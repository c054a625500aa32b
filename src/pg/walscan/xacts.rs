//! [`XactEnds`]: the end (commit or abort record) of every transaction in
//! one segment, kept compactly, so that an `--target-xid` can be found in
//! the archive the way a time or a restore point is.
//!
//! A busy 16 MiB segment holds ~100,000 commit records; JSON numbers for
//! each would make its summary several megabytes. Instead each end is two
//! LEB128 varints, deltas from the end before it:
//! * the xid's difference, as a wrapping 32-bit signed number zig-zagged,
//!   shifted left one bit with the commit flag in the low bit (xids mostly
//!   end in the order they were assigned: usually one byte);
//! * the LSN's difference in 8-byte units (every record starts MAXALIGNed:
//!   `XLogInsertRecord` reserves MAXALIGN(size), xlog.c), usually one or
//!   two bytes.
//!
//! The first end's deltas are from xid 0 and LSN 0. In JSON the bytes are
//! a string, `"<version>:<base64>"`; a version this build does not know
//! parses, and reads as "not recorded".

use base64::Engine as _;

use crate::pg::Lsn;

/// Encoding of [`XactEnds`] this build writes.
const XACT_ENDS_VERSION: u32 = 1;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// One commit or abort record: what recovery matches a `recovery_target_xid`
/// against (`recoveryStopsBefore`/`recoveryStopsAfter`, xlogrecovery.c).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XactEnd {
    /// The record's xid: the top-level transaction's (subtransactions that
    /// commit with it are not matched), a subtransaction's own for the
    /// abort record of a rolled-back savepoint, the prepared transaction's
    /// for COMMIT/ABORT PREPARED.
    pub xid: u32,
    /// Start of the record.
    pub lsn: Lsn,
    pub commit: bool,
}

/// The commit and abort records of one segment, in WAL order.
#[derive(Clone, Default)]
pub struct XactEnds {
    /// Encoding of `bytes`; another than [`XACT_ENDS_VERSION`] (written by a
    /// newer pgvault) cannot be read.
    version: u32,
    bytes: Vec<u8>,
    count: u64,
    /// The last end pushed (the base of the next deltas).
    last_xid: u32,
    last_lsn: u64,
}

impl XactEnds {
    pub fn new() -> XactEnds {
        XactEnds {
            version: XACT_ENDS_VERSION,
            ..XactEnds::default()
        }
    }

    /// Appends an end; `lsn` must not be before the last one's.
    pub fn push(&mut self, end: XactEnd) {
        let Some(step) = end.lsn.0.checked_sub(self.last_lsn) else {
            debug_assert!(false, "{} pushed after {}", end.lsn, Lsn(self.last_lsn));
            return;
        };
        let d = end.xid.wrapping_sub(self.last_xid) as i32;
        let zigzag = ((d << 1) ^ (d >> 31)) as u32;
        put_varint(
            &mut self.bytes,
            (u64::from(zigzag) << 1) | u64::from(end.commit),
        );
        put_varint(&mut self.bytes, step >> 3);
        self.last_xid = end.xid;
        // What the decoder will see (a start off MAXALIGN is rounded down).
        self.last_lsn += step & !7;
        self.count += 1;
    }

    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The ends, in WAL order; `None` when they were written in an encoding
    /// this build does not read.
    pub fn iter(&self) -> Option<impl Iterator<Item = XactEnd> + '_> {
        (self.version == XACT_ENDS_VERSION).then(|| Decoder {
            bytes: &self.bytes,
            xid: 0,
            lsn: 0,
        })
    }

    fn from_encoded(s: &str) -> Result<XactEnds, String> {
        let (version, b64) = s
            .split_once(':')
            .ok_or_else(|| format!("no version in xact_ends {:?}", truncated(s)))?;
        let version: u32 = version
            .parse()
            .map_err(|_| format!("bad version in xact_ends {:?}", truncated(s)))?;
        let bytes = B64
            .decode(b64)
            .map_err(|e| format!("xact_ends is not base64: {e}"))?;
        let mut out = XactEnds {
            version,
            bytes,
            ..XactEnds::default()
        };
        if version == XACT_ENDS_VERSION {
            // Checked once here, so that iterating never meets a cut varint.
            let mut d = Decoder {
                bytes: &out.bytes,
                xid: 0,
                lsn: 0,
            };
            let mut count = 0u64;
            while !d.bytes.is_empty() {
                d.next_checked()
                    .ok_or_else(|| format!("xact_ends is cut short after {count} ends"))?;
                count += 1;
            }
            (out.count, out.last_xid, out.last_lsn) = (count, d.xid, d.lsn);
        }
        Ok(out)
    }

    fn encoded(&self) -> String {
        format!("{}:{}", self.version, B64.encode(&self.bytes))
    }
}

impl PartialEq for XactEnds {
    fn eq(&self, other: &XactEnds) -> bool {
        self.version == other.version && self.bytes == other.bytes
    }
}

impl Eq for XactEnds {}

impl std::fmt::Debug for XactEnds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "XactEnds {{ version: {}, count: {}, bytes: {} }}",
            self.version,
            self.count,
            self.bytes.len()
        )
    }
}

impl serde::Serialize for XactEnds {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.encoded())
    }
}

impl<'de> serde::Deserialize<'de> for XactEnds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<XactEnds, D::Error> {
        let s = String::deserialize(d)?;
        XactEnds::from_encoded(&s).map_err(serde::de::Error::custom)
    }
}

fn truncated(s: &str) -> &str {
    s.get(..s.len().min(20)).unwrap_or("")
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

struct Decoder<'a> {
    bytes: &'a [u8],
    xid: u32,
    lsn: u64,
}

impl Decoder<'_> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for (i, &b) in self.bytes.iter().enumerate().take(10) {
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                self.bytes = &self.bytes[i + 1..];
                return Some(v);
            }
        }
        None
    }

    fn next_checked(&mut self) -> Option<XactEnd> {
        let first = self.varint()?;
        let step = self.varint()?;
        let zigzag = (first >> 1) as u32;
        let d = ((zigzag >> 1) as i32) ^ -((zigzag & 1) as i32);
        self.xid = self.xid.wrapping_add(d as u32);
        self.lsn = self.lsn.checked_add(step.checked_mul(8)?)?;
        Some(XactEnd {
            xid: self.xid,
            lsn: Lsn(self.lsn),
            commit: first & 1 == 1,
        })
    }
}

impl Iterator for Decoder<'_> {
    type Item = XactEnd;
    fn next(&mut self) -> Option<XactEnd> {
        if self.bytes.is_empty() {
            return None;
        }
        self.next_checked()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(xid: u32, lsn: u64, commit: bool) -> XactEnd {
        XactEnd {
            xid,
            lsn: Lsn(lsn),
            commit,
        }
    }

    #[test]
    fn round_trip_through_json() {
        // Out of order xids, a wraparound, an xid far back, the largest
        // LSN steps, aborts.
        let ends = vec![
            end(745, 0x1_0300_0028, true),
            end(747, 0x1_0300_0060, true),
            end(746, 0x1_0300_00a0, false),
            end(u32::MAX, 0x1_0300_0100, true),
            end(3, 0x1_0300_0f00, true),
            end(4_000_000_000, 0x1_03ff_fff8, false),
            end(4_000_000_000, 0xffff_ffff_ffff_fff8, true),
        ];
        let mut x = XactEnds::new();
        for e in &ends {
            x.push(*e);
        }
        assert_eq!(x.len(), ends.len() as u64);
        let json = serde_json::to_string(&x).unwrap();
        assert!(json.starts_with("\"1:"), "{json}");
        let back: XactEnds = serde_json::from_str(&json).unwrap();
        assert_eq!(back, x);
        assert_eq!(back.len(), ends.len() as u64);
        assert_eq!(back.iter().unwrap().collect::<Vec<_>>(), ends);
        assert!(XactEnds::new().iter().unwrap().next().is_none());
    }

    #[test]
    fn a_busy_segment_stays_small() {
        // 100,000 commits ~160 bytes apart with the odd xid out of order:
        // about 2 bytes each before base64.
        let mut x = XactEnds::new();
        let mut lsn = 0x5_0000_0028u64;
        for i in 0..100_000u32 {
            let xid = 1000 + if i % 10 == 3 { i + 1 } else { i };
            x.push(end(xid, lsn, i % 50 != 0));
            lsn += 160 + u64::from(i % 7) * 8;
        }
        let json = serde_json::to_string(&x).unwrap();
        assert!(json.len() < 400_000, "{} bytes", json.len());
        let back: XactEnds = serde_json::from_str(&json).unwrap();
        assert_eq!(back.iter().unwrap().count(), 100_000);
    }

    #[test]
    fn unknown_version_reads_as_unrecorded_and_damage_is_an_error() {
        let x: XactEnds = serde_json::from_str("\"2:AAAA\"").unwrap();
        assert!(x.iter().is_none());
        // Cut in the middle of a varint.
        let bad = format!("\"1:{}\"", B64.encode([0x80u8]));
        assert!(serde_json::from_str::<XactEnds>(&bad).is_err());
        assert!(serde_json::from_str::<XactEnds>("\"1:not base64!\"").is_err());
        assert!(serde_json::from_str::<XactEnds>("\"AAAA\"").is_err());
    }
}
