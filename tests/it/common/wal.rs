//! WAL names and byte helpers, written independently of the crate on
//! purpose: the tests check the binary against PostgreSQL, not against its
//! own code.

use std::fs;
use std::path::Path;

/// Split a 24-hex-digit segment name into (timeline, segment number).
pub fn parse_segment(name: &str, seg_size: u64) -> (u32, u64) {
    assert_eq!(name.len(), 24, "not a segment name: {name}");
    let tli = u32::from_str_radix(&name[0..8], 16).expect("hex timeline");
    let log = u64::from_str_radix(&name[8..16], 16).expect("hex log");
    let seg = u64::from_str_radix(&name[16..24], 16).expect("hex seg");
    (tli, log * segs_per_xlogid(seg_size) + seg)
}

/// `XLogFileName` (xlog_internal.h).
pub fn segment_name(tli: u32, segno: u64, seg_size: u64) -> String {
    let per = segs_per_xlogid(seg_size);
    format!("{tli:08X}{:08X}{:08X}", segno / per, segno % per)
}

fn segs_per_xlogid(seg_size: u64) -> u64 {
    0x1_0000_0000 / seg_size
}

/// Every segment name from `first` to `last`, inclusive.
pub fn segment_range(first: &str, last: &str, seg_size: u64) -> Vec<String> {
    let (t1, a) = parse_segment(first, seg_size);
    let (t2, b) = parse_segment(last, seg_size);
    assert_eq!(t1, t2, "segment_range across timelines");
    (a..=b).map(|n| segment_name(t1, n, seg_size)).collect()
}

/// Deterministic pseudo-random bytes (xorshift64*), no extra crates.
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        v.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Assert two files are byte-identical without printing megabytes.
#[track_caller]
pub fn assert_same_file(expected: &Path, actual: &Path) {
    let a = fs::read(expected).unwrap_or_else(|e| panic!("read {}: {e}", expected.display()));
    let b = fs::read(actual).unwrap_or_else(|e| panic!("read {}: {e}", actual.display()));
    if a != b {
        let first = a.iter().zip(&b).position(|(x, y)| x != y);
        panic!(
            "{} differs from {}: sizes {} vs {}, first difference at {:?}",
            actual.display(),
            expected.display(),
            b.len(),
            a.len(),
            first
        );
    }
}
