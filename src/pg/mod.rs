//! Everything pgvault knows about PostgreSQL's own file formats.
//!
//! The rest of the crate asks this module and never looks at bytes of a WAL
//! segment, `pg_control` or a timeline history file itself. Facts here come
//! from PostgreSQL's source (`src/include/access/xlog_internal.h`,
//! `src/include/access/xlogdefs.h`, `src/include/catalog/pg_control.h`,
//! `src/backend/access/transam/timeline.c` of the REL_14 to REL_18 branches)
//! and every offset is checked by the tests against files written by real
//! PostgreSQL servers (`fixtures/`, made by `scripts/make-fixtures.sh`).
//!
//! PostgreSQL writes these files in the machine's byte order; pgvault reads
//! little-endian ones (x86-64, aarch64) and recognises big-endian ones only
//! to say so.
//!
//! Supported majors: 14 to 18.

pub mod archiver;
pub mod binaries;
pub mod blockref;
pub mod conn;
pub mod control;
pub mod datadir;
pub mod history;
pub mod integrity;
pub mod lsn;
pub mod page;
pub mod recovery;
pub mod relfile;
pub mod scratch;
pub mod wal;
pub mod walscan;

#[cfg(test)]
pub(crate) mod testdata;

pub use lsn::Lsn;
pub use wal::{SegmentNo, TimelineId, WalFileKind, WalFileName};

/// The oldest and newest PostgreSQL major versions pgvault understands.
pub const MIN_MAJOR: u32 = 14;
pub const MAX_MAJOR: u32 = 18;

/// `XLOG_BLCKSZ`: the WAL page size. Configurable only when compiling
/// PostgreSQL; every packaged build uses 8192, and so does pgvault.
pub const WAL_BLOCK_SIZE: u32 = 8192;

/// Smallest and largest WAL segment sizes (`WalSegMinSize`/`WalSegMaxSize`
/// in xlog_internal.h).
pub const WAL_SEG_MIN_SIZE: u32 = 1024 * 1024;
pub const WAL_SEG_MAX_SIZE: u32 = 1024 * 1024 * 1024;

/// What is wrong with a PostgreSQL file or value. Messages are one line,
/// name the value at fault and carry no file path: callers add the path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PgError {
    #[error("invalid LSN {text:?}: expected two hexadecimal numbers like 16/B374D848")]
    InvalidLsn { text: String },

    #[error("invalid WAL file name {name:?}: {reason}")]
    InvalidWalFileName { name: String, reason: String },

    #[error("invalid timeline {text:?}: expected a decimal number from 1 to 4294967295")]
    InvalidTimeline { text: String },

    #[error("PG_VERSION holds {text:?}: {reason}")]
    PgVersionFile { text: String, reason: String },

    #[error("PostgreSQL {major} is not supported (pgvault supports {MIN_MAJOR} to {MAX_MAJOR})")]
    UnsupportedMajor { major: u32 },

    #[error("WAL segment size {size} bytes is not a power of two from 1 MiB to 1 GiB")]
    InvalidSegmentSize { size: u64 },

    #[error("{what} needs {need} bytes, got {got}")]
    Truncated {
        what: &'static str,
        need: usize,
        got: usize,
    },

    #[error("{what} is in big-endian byte order; pgvault reads little-endian clusters only")]
    BigEndian { what: &'static str },

    #[error("WAL page magic {found:#06X} is PostgreSQL {found_major}'s, but the stanza is PostgreSQL {expected_major}")]
    WalMagicOtherMajor {
        found: u16,
        found_major: u32,
        expected_major: u32,
    },

    #[error("WAL page magic {found:#06X} is not one of PostgreSQL {MIN_MAJOR} to {MAX_MAJOR}: not a WAL segment")]
    WalMagicUnknown { found: u16 },

    #[error(
        "first WAL page has no long header (xlp_info {info:#06X}): not the start of a WAL segment"
    )]
    NoLongHeader { info: u16 },

    #[error("WAL page header has unknown flags (xlp_info {info:#06X}): not a WAL segment")]
    UnknownPageFlags { info: u16 },

    #[error("WAL system identifier {found} differs from the stanza's {expected}: WAL of another cluster")]
    SystemIdMismatch { found: u64, expected: u64 },

    #[error(
        "WAL segment size in the page header is {found} bytes, but the stanza's is {expected}"
    )]
    SegmentSizeMismatch { found: u32, expected: u32 },

    #[error("WAL block size in the page header is {found} bytes; PostgreSQL builds pgvault supports use 8192")]
    WalBlockSize { found: u32 },

    #[error("first WAL page is at {found}, but the file name says the segment starts at {expected}: renamed or recycled file")]
    PageAddrMismatch { found: Lsn, expected: Lsn },

    #[error("first WAL page is on timeline {found}, newer than the file name's timeline {name_timeline}")]
    PageTimelineAhead {
        found: TimelineId,
        name_timeline: TimelineId,
    },

    #[error("first WAL page is on timeline 0, which does not exist: not a WAL segment")]
    PageTimelineZero,

    #[error("WAL file name {name} is not a segment: its segment part is out of range for {seg_size}-byte segments")]
    SegmentOutOfRange { name: String, seg_size: u32 },

    #[error("{name} is a {kind} file, not a WAL segment")]
    NotASegment { name: String, kind: &'static str },

    #[error("pg_control version {version} is not one pgvault reads (1300 is PostgreSQL 14 to 16, 1700 is 17, 1800 is 18)")]
    UnknownControlVersion { version: u32 },

    #[error("pg_control CRC mismatch (stored {stored:#010X}, computed {computed:#010X}): the file is corrupt or was torn while written")]
    ControlCrc { stored: u32, computed: u32 },

    #[error("pg_control float format check failed (read {found}, expected 1234567): unknown layout or corrupt file")]
    ControlFloatFormat {
        /// The value read, as text (an `f64` would keep the error from being `Eq`).
        found: String,
    },

    #[error("{0}")]
    VersionMismatch(String),

    #[error("timeline history line {line}: {reason}")]
    InvalidHistory { line: usize, reason: String },
}

pub type Result<T> = std::result::Result<T, PgError>;

/// Major version from the text of `PGDATA/PG_VERSION` ("15\n" -> 15).
///
/// Since PostgreSQL 10 the file holds the major version alone; "9.6" and the
/// like are older releases and refused as unsupported.
pub fn parse_pg_version_file(text: &str) -> Result<u32> {
    let trimmed = text.trim();
    let err = |reason: &str| PgError::PgVersionFile {
        text: trimmed.chars().take(40).collect(),
        reason: reason.to_string(),
    };
    if trimmed.is_empty() {
        return Err(err("empty file, expected a major version like 15"));
    }
    if trimmed.contains('\n') {
        return Err(err("expected one line with a major version like 15"));
    }
    if let Some((major, _)) = trimmed.split_once('.') {
        if major.bytes().all(|b| b.is_ascii_digit()) && !major.is_empty() {
            return Err(err(&format!(
                "PostgreSQL {trimmed} is not supported (pgvault supports {MIN_MAJOR} to {MAX_MAJOR})"
            )));
        }
    }
    if !trimmed.bytes().all(|b| b.is_ascii_digit()) {
        return Err(err("expected a major version like 15"));
    }
    let major: u32 = trimmed
        .parse()
        .map_err(|_| err("expected a major version like 15"))?;
    if !(MIN_MAJOR..=MAX_MAJOR).contains(&major) {
        return Err(err(&format!(
            "PostgreSQL {major} is not supported (pgvault supports {MIN_MAJOR} to {MAX_MAJOR})"
        )));
    }
    Ok(major)
}

/// `XLOG_PAGE_MAGIC` of each supported major (xlog_internal.h of each
/// release branch; every major bumps it because the WAL format changes).
const WAL_MAGICS: [(u32, u16); 5] = [
    (14, 0xD10D),
    (15, 0xD110),
    (16, 0xD113),
    (17, 0xD116),
    (18, 0xD118),
];

/// The WAL page magic written by PostgreSQL `major`, if pgvault supports it.
pub fn wal_magic_for_major(major: u32) -> Option<u16> {
    WAL_MAGICS
        .iter()
        .find(|(m, _)| *m == major)
        .map(|(_, magic)| *magic)
}

/// The PostgreSQL major that writes WAL page magic `magic`.
pub fn major_for_wal_magic(magic: u16) -> Option<u32> {
    WAL_MAGICS
        .iter()
        .find(|(_, m)| *m == magic)
        .map(|(major, _)| *major)
}

/// Checks a WAL segment size (`IsValidWalSegSize` in xlog_internal.h): a
/// power of two from 1 MiB to 1 GiB.
pub fn validate_wal_segment_size(size: u64) -> Result<u32> {
    if size.is_power_of_two()
        && (u64::from(WAL_SEG_MIN_SIZE)..=u64::from(WAL_SEG_MAX_SIZE)).contains(&size)
    {
        // In range, so it fits in a u32.
        Ok(size as u32)
    } else {
        Err(PgError::InvalidSegmentSize { size })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pg_version_file() {
        assert_eq!(parse_pg_version_file("15\n"), Ok(15));
        assert_eq!(parse_pg_version_file("14"), Ok(14));
        assert_eq!(parse_pg_version_file(" 18 \n"), Ok(18));
        let e = parse_pg_version_file("9.6\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "PG_VERSION holds \"9.6\": PostgreSQL 9.6 is not supported (pgvault supports 14 to 18)"
        );
        let e = parse_pg_version_file("13\n").unwrap_err();
        assert!(
            e.to_string().contains("PostgreSQL 13 is not supported"),
            "{e}"
        );
        assert!(parse_pg_version_file("19").is_err());
        assert!(parse_pg_version_file("").is_err());
        assert!(parse_pg_version_file("fifteen").is_err());
        assert!(parse_pg_version_file("15\n16\n").is_err());
        assert!(parse_pg_version_file("+15").is_err());
        assert!(parse_pg_version_file("99999999999999").is_err());
    }

    #[test]
    fn pg_version_files_of_every_fixture() {
        for (dir, major) in testdata::MAJORS {
            let text = testdata::read_text(&format!("{dir}/PG_VERSION"));
            assert_eq!(parse_pg_version_file(&text), Ok(*major), "{dir}");
        }
    }

    #[test]
    fn wal_magics_round_trip() {
        for major in MIN_MAJOR..=MAX_MAJOR {
            let magic = wal_magic_for_major(major).unwrap();
            assert_eq!(major_for_wal_magic(magic), Some(major));
        }
        assert_eq!(wal_magic_for_major(13), None);
        assert_eq!(wal_magic_for_major(19), None);
        assert_eq!(major_for_wal_magic(0xD106), None);
        assert_eq!(wal_magic_for_major(15), Some(0xD110));
    }

    #[test]
    fn wal_magics_match_real_segments() {
        // The magic of each fixture's WAL, read by the fixture script with
        // Python's struct module from files PostgreSQL wrote.
        for (dir, major) in testdata::MAJORS {
            let facts = testdata::facts(dir);
            for (name, wal) in facts["wal"].as_object().unwrap() {
                if let Some(magic) = wal.get("magic").and_then(|m| m.as_u64()) {
                    assert_eq!(
                        wal_magic_for_major(*major),
                        Some(magic as u16),
                        "{dir}/{name}"
                    );
                }
            }
        }
    }

    #[test]
    fn segment_sizes() {
        assert_eq!(validate_wal_segment_size(1 << 20), Ok(1 << 20));
        assert_eq!(validate_wal_segment_size(16 << 20), Ok(16 << 20));
        assert_eq!(validate_wal_segment_size(1 << 30), Ok(1 << 30));
        for bad in [0, 1, 512 << 10, (1 << 20) + 1, 3 << 20, 2 << 30, u64::MAX] {
            let e = validate_wal_segment_size(bad).unwrap_err();
            assert_eq!(e, PgError::InvalidSegmentSize { size: bad });
        }
        assert_eq!(
            validate_wal_segment_size(3 << 20).unwrap_err().to_string(),
            "WAL segment size 3145728 bytes is not a power of two from 1 MiB to 1 GiB"
        );
    }
}
