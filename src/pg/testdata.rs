//! Test access to `fixtures/`: files written by real PostgreSQL servers
//! (`scripts/make-fixtures.sh`), with the facts the tests assert taken from
//! `pg_controldata` and `pg_waldump` (`facts.json` in each directory).

use std::path::PathBuf;

/// Fixture directories with one cluster's files, and the major that made them.
pub const MAJORS: &[(&str, u32)] = &[
    ("pg14", 14),
    ("pg15", 15),
    ("pg15-16mib", 15),
    ("pg16", 16),
    ("pg17", 17),
    ("pg18", 18),
];

pub fn path(rel: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures")).join(rel)
}

pub fn read(rel: &str) -> Vec<u8> {
    let p = path(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("read fixture {}: {e}", p.display()))
}

pub fn read_text(rel: &str) -> String {
    String::from_utf8(read(rel)).unwrap_or_else(|e| panic!("fixture {rel} is not UTF-8: {e}"))
}

/// A zstd-compressed fixture, decompressed.
pub fn read_zst(rel: &str) -> Vec<u8> {
    zstd::decode_all(&read(rel)[..]).unwrap_or_else(|e| panic!("decompress fixture {rel}: {e}"))
}

pub fn facts(dir: &str) -> serde_json::Value {
    serde_json::from_str(&read_text(&format!("{dir}/facts.json")))
        .unwrap_or_else(|e| panic!("{dir}/facts.json: {e}"))
}

/// A WAL file of a fixture directory, by name, decompressed.
pub fn wal(dir: &str, name: &str) -> Vec<u8> {
    read_zst(&format!("{dir}/wal/{name}.zst"))
}

/// xorshift64*: reproducible noise for tests, without a dependency.
pub struct Noise(pub u64);

impl Noise {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number below `n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub fn below_u64(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
