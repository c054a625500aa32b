//! `global/pg_control` (`ControlFileData`, pg_control.h) and the cluster
//! facts read from a data directory.
//!
//! Layouts pgvault reads, by `pg_control_version` (x86-64 offsets, checked
//! against files written by PostgreSQL 14 to 18 in `fixtures/`):
//!
//! | offset | field                                   | 1300 (14-16) | 1700 (17) | 1800 (18) |
//! |--------|-----------------------------------------|--------------|-----------|-----------|
//! | 0      | system_identifier u64                   | =            | =         | =         |
//! | 8      | pg_control_version u32                  | =            | =         | =         |
//! | 12     | catalog_version_no u32                  | =            | =         | =         |
//! | 16     | state (DBState) u32                     | =            | =         | =         |
//! | 24     | time (pg_time_t) i64                    | =            | =         | =         |
//! | 32     | checkPoint u64                          | =            | =         | =         |
//! | 40     | checkPointCopy.redo u64                 | =            | =         | =         |
//! | 48     | checkPointCopy.ThisTimeLineID u32       | =            | =         | =         |
//! | 52     | checkPointCopy.PrevTimeLineID u32       | =            | =         | =         |
//! | 104    | checkPointCopy.time i64                 | =            | =         | =         |
//! | 128    | unloggedLSN u64                         | =            | =         | =         |
//! | 136    | minRecoveryPoint u64                    | =            | =         | =         |
//! | 144    | minRecoveryPointTLI u32                 | =            | =         | =         |
//! | 152    | backupStartPoint u64                    | =            | =         | =         |
//! | 160    | backupEndPoint u64                      | =            | =         | =         |
//! | 168    | backupEndRequired bool                  | =            | =         | =         |
//! | 172    | wal_level int                           | =            | =         | =         |
//! | 208    | floatFormat f64 (1234567.0)             | =            | =         | =         |
//! | 216    | blcksz u32                              | =            | =         | =         |
//! | 224    | xlog_blcksz u32                         | =            | =         | =         |
//! | 228    | xlog_seg_size u32                       | =            | =         | =         |
//! | 252    | data_checksum_version u32               | =            | =         | =         |
//! | 256    | default_char_signedness bool            | —            | —         | 256       |
//! | 256/257| mock_authentication_nonce [u8; 32]      | 256          | 256       | 257       |
//! | 288/292| crc (CRC-32C of all bytes before it)    | 288          | 288       | 292       |
//!
//! PostgreSQL 17's 1700 added `wal_level` to `CheckPoint` in padding after
//! `fullPageWrites`, so no offset pgvault reads moved; 18's 1800 added
//! `default_char_signedness`, which moves the nonce and the CRC.

use std::fmt;
use std::path::{Path, PathBuf};

use super::{parse_pg_version_file, Lsn, PgError, Result, TimelineId, MAX_MAJOR, MIN_MAJOR};

/// `DBState` (pg_control.h). The numbering is the same in 14 to 18.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DbState {
    Startup,
    Shutdowned,
    ShutdownedInRecovery,
    Shutdowning,
    InCrashRecovery,
    InArchiveRecovery,
    InProduction,
    Unknown(u32),
}

impl DbState {
    pub fn from_u32(v: u32) -> DbState {
        match v {
            0 => DbState::Startup,
            1 => DbState::Shutdowned,
            2 => DbState::ShutdownedInRecovery,
            3 => DbState::Shutdowning,
            4 => DbState::InCrashRecovery,
            5 => DbState::InArchiveRecovery,
            6 => DbState::InProduction,
            other => DbState::Unknown(other),
        }
    }

    /// Was the server stopped cleanly (a shutdown checkpoint is the last
    /// record)? Anything else means it ran, crashed, or was copied running.
    pub fn is_shut_down(self) -> bool {
        matches!(self, DbState::Shutdowned | DbState::ShutdownedInRecovery)
    }
}

impl fmt::Display for DbState {
    /// The words of pg_controldata's "Database cluster state".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DbState::Startup => "starting up",
            DbState::Shutdowned => "shut down",
            DbState::ShutdownedInRecovery => "shut down in recovery",
            DbState::Shutdowning => "shutting down",
            DbState::InCrashRecovery => "in crash recovery",
            DbState::InArchiveRecovery => "in archive recovery",
            DbState::InProduction => "in production",
            DbState::Unknown(v) => return write!(f, "unrecognized status code {v}"),
        };
        f.write_str(s)
    }
}

/// `WalLevel` values stored in pg_control (xlog.h): 0 minimal, 1 replica,
/// 2 logical.
pub fn wal_level_name(level: i32) -> Option<&'static str> {
    match level {
        0 => Some("minimal"),
        1 => Some("replica"),
        2 => Some("logical"),
        _ => None,
    }
}

/// What pgvault reads from `global/pg_control`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlFile {
    pub system_identifier: u64,
    pub pg_control_version: u32,
    pub catalog_version_no: u32,
    pub state: DbState,
    /// Last checkpoint record (`checkPoint`).
    pub checkpoint: Lsn,
    /// Its redo point (`checkPointCopy.redo`): where recovery from it starts.
    pub redo: Lsn,
    /// `checkPointCopy.ThisTimeLineID`.
    pub timeline: TimelineId,
    /// `checkPointCopy.PrevTimeLineID` (equal to `timeline` unless the
    /// checkpoint began a new timeline).
    pub prev_timeline: TimelineId,
    /// `checkPointCopy.time`, Unix seconds.
    pub checkpoint_time: i64,
    /// Last update of pg_control (`time`), Unix seconds.
    pub last_modified: i64,
    pub min_recovery_point: Lsn,
    pub min_recovery_point_timeline: TimelineId,
    pub backup_start_point: Lsn,
    pub backup_end_point: Lsn,
    pub backup_end_required: bool,
    pub wal_level: i32,
    pub block_size: u32,
    pub wal_block_size: u32,
    pub wal_segment_size: u32,
    pub data_checksum_version: u32,
    /// `default_char_signedness` (1800 and later): `None` before 18.
    pub default_char_signed: Option<bool>,
    pub mock_authentication_nonce: [u8; 32],
}

/// Where the fields that move between layouts are.
struct Layout {
    nonce: usize,
    char_signedness: Option<usize>,
    crc: usize,
}

fn layout(version: u32) -> Option<Layout> {
    match version {
        1300 | 1700 => Some(Layout {
            nonce: 256,
            char_signedness: None,
            crc: 288,
        }),
        1800 => Some(Layout {
            nonce: 257,
            char_signedness: Some(256),
            crc: 292,
        }),
        _ => None,
    }
}

/// The majors that write a pg_control version.
pub fn majors_for_control_version(version: u32) -> Option<std::ops::RangeInclusive<u32>> {
    match version {
        1300 => Some(14..=16),
        1700 => Some(17..=17),
        1800 => Some(18..=18),
        _ => None,
    }
}

const FLOAT_FORMAT: f64 = 1234567.0;

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4-byte slice"))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8-byte slice"))
}

fn i64_at(b: &[u8], off: usize) -> i64 {
    i64::from_le_bytes(b[off..off + 8].try_into().expect("8-byte slice"))
}

/// Parses `global/pg_control`. Reads `pg_control_version` first to choose
/// the layout, then verifies the CRC-32C over the bytes before the CRC
/// field (as `ReadControlFile` and controldata_utils.c do) before anything
/// else is believed.
pub fn parse_control_file(bytes: &[u8]) -> Result<ControlFile> {
    if bytes.len() < 12 {
        return Err(PgError::Truncated {
            what: "pg_control",
            need: 12,
            got: bytes.len(),
        });
    }
    let version = u32_at(bytes, 8);
    let Some(l) = layout(version) else {
        if layout(version.swap_bytes()).is_some() {
            return Err(PgError::BigEndian { what: "pg_control" });
        }
        return Err(PgError::UnknownControlVersion { version });
    };
    if bytes.len() < l.crc + 4 {
        return Err(PgError::Truncated {
            what: "pg_control",
            need: l.crc + 4,
            got: bytes.len(),
        });
    }
    let stored = u32_at(bytes, l.crc);
    let computed = crc32c::crc32c(&bytes[..l.crc]);
    if stored != computed {
        return Err(PgError::ControlCrc { stored, computed });
    }
    let b = bytes;
    let float_format = f64::from_le_bytes(b[208..216].try_into().expect("8-byte slice"));
    if float_format != FLOAT_FORMAT {
        return Err(PgError::ControlFloatFormat {
            found: float_format.to_string(),
        });
    }
    let mut nonce = [0u8; 32];
    nonce.copy_from_slice(&b[l.nonce..l.nonce + 32]);
    Ok(ControlFile {
        system_identifier: u64_at(b, 0),
        pg_control_version: version,
        catalog_version_no: u32_at(b, 12),
        state: DbState::from_u32(u32_at(b, 16)),
        last_modified: i64_at(b, 24),
        checkpoint: Lsn(u64_at(b, 32)),
        redo: Lsn(u64_at(b, 40)),
        timeline: TimelineId(u32_at(b, 48)),
        prev_timeline: TimelineId(u32_at(b, 52)),
        checkpoint_time: i64_at(b, 104),
        min_recovery_point: Lsn(u64_at(b, 136)),
        min_recovery_point_timeline: TimelineId(u32_at(b, 144)),
        backup_start_point: Lsn(u64_at(b, 152)),
        backup_end_point: Lsn(u64_at(b, 160)),
        backup_end_required: b[168] != 0,
        wal_level: i32::from_le_bytes(b[172..176].try_into().expect("4-byte slice")),
        block_size: u32_at(b, 216),
        wal_block_size: u32_at(b, 224),
        wal_segment_size: u32_at(b, 228),
        data_checksum_version: u32_at(b, 252),
        default_char_signed: l.char_signedness.map(|off| b[off] != 0),
        mock_authentication_nonce: nonce,
    })
}

/// Final `CATALOG_VERSION_NO` of each release (catversion.h of each release
/// branch; frozen at release). A major's catalog versions are those after
/// the previous release's final one, up to its own.
const FINAL_CATVERSIONS: [(u32, u32); 6] = [
    (13, 202007201),
    (14, 202107181),
    (15, 202209061),
    (16, 202307071),
    (17, 202406281),
    (18, 202506291),
];

/// The major a catalog version belongs to (development snapshots included),
/// for the supported majors; `None` for older releases and for versions
/// newer than the last release pgvault knows.
pub fn major_from_catalog_version(catversion: u32) -> Option<u32> {
    FINAL_CATVERSIONS
        .windows(2)
        .find(|w| catversion > w[0].1 && catversion <= w[1].1)
        .map(|w| w[1].0)
}

/// The major version and control file of a data directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterInfo {
    pub major: u32,
    pub control: ControlFile,
}

/// Why a data directory could not be read. Display: "read {path}: {cause}".
#[derive(Debug, thiserror::Error)]
pub enum ClusterInfoError {
    #[error("read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("read {}: {source}", path.display())]
    Format {
        path: PathBuf,
        #[source]
        source: PgError,
    },
}

/// Reads `PGDATA/PG_VERSION` and `PGDATA/global/pg_control` (blocking I/O:
/// call from a blocking thread) and checks that they agree: the catalog
/// version and the pg_control version must be those of the PG_VERSION major.
pub fn read_cluster_info(pgdata: &Path) -> std::result::Result<ClusterInfo, ClusterInfoError> {
    let version_path = pgdata.join("PG_VERSION");
    let text = std::fs::read(&version_path).map_err(|source| ClusterInfoError::Io {
        path: version_path.clone(),
        source,
    })?;
    let text = String::from_utf8_lossy(&text);
    let major = parse_pg_version_file(&text).map_err(|source| ClusterInfoError::Format {
        path: version_path.clone(),
        source,
    })?;

    let control_path = pgdata.join("global").join("pg_control");
    let bytes = std::fs::read(&control_path).map_err(|source| ClusterInfoError::Io {
        path: control_path.clone(),
        source,
    })?;
    let format_err = |source| ClusterInfoError::Format {
        path: control_path.clone(),
        source,
    };
    let control = parse_control_file(&bytes).map_err(format_err)?;
    check_versions_agree(major, &control).map_err(format_err)?;
    Ok(ClusterInfo { major, control })
}

/// PG_VERSION decides the major; pg_control must not contradict it.
pub fn check_versions_agree(major: u32, control: &ControlFile) -> Result<()> {
    debug_assert!((MIN_MAJOR..=MAX_MAJOR).contains(&major));
    if let Some(majors) = majors_for_control_version(control.pg_control_version) {
        if !majors.contains(&major) {
            return Err(PgError::VersionMismatch(format!(
                "pg_control version {} is not PostgreSQL {major}'s, though PG_VERSION says {major}",
                control.pg_control_version
            )));
        }
    }
    if let Some(cat_major) = major_from_catalog_version(control.catalog_version_no) {
        if cat_major != major {
            return Err(PgError::VersionMismatch(format!(
                "catalog version {} is PostgreSQL {cat_major}'s, but PG_VERSION says {major}",
                control.catalog_version_no
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
