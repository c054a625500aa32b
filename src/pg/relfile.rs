//! Relation files: which relation, fork and segment a path of the data
//! directory holds (`relpath.h`, `GetRelationPath`).
//!
//! ```text
//! global/<relnumber>[_<fork>][.<segno>]                         pg_global (oid 1664)
//! base/<dboid>/<relnumber>[_<fork>][.<segno>]                   pg_default (oid 1663)
//! pg_tblspc/<spcoid>/PG_<major>_<catversion>/<dboid>/<relnumber>[_<fork>][.<segno>]
//! ```
//!
//! A relation fork is stored in segment files of `RELSEG_SIZE` blocks
//! (131072 blocks of 8 KiB: 1 GiB in every packaged build); block `n` of
//! segment `s` is block `s * RELSEG_SIZE + n` of the fork.

/// Blocks per relation segment file (`RELSEG_SIZE`, the default of every
/// packaged build).
pub const RELSEG_SIZE: u32 = 131_072;
/// Bytes per relation block (`BLCKSZ`).
pub const BLOCK_SIZE: usize = 8192;

/// OID of the `pg_default` tablespace (`DEFAULTTABLESPACE_OID`).
pub const DEFAULT_TABLESPACE: u32 = 1663;
/// OID of the `pg_global` tablespace (`GLOBALTABLESPACE_OID`).
pub const GLOBAL_TABLESPACE: u32 = 1664;

/// A relation fork (`ForkNumber`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fork {
    Main = 0,
    Fsm = 1,
    VisibilityMap = 2,
    Init = 3,
}

impl Fork {
    /// The fork's name (`forkNames`: "main", "fsm", "vm", "init").
    pub fn name(self) -> &'static str {
        match self {
            Fork::Main => "main",
            Fork::Fsm => "fsm",
            Fork::VisibilityMap => "vm",
            Fork::Init => "init",
        }
    }

    /// The file name suffix of a fork (`forkNames`: "", "_fsm", "_vm", "_init").
    pub fn suffix(self) -> &'static str {
        match self {
            Fork::Main => "",
            Fork::Fsm => "_fsm",
            Fork::VisibilityMap => "_vm",
            Fork::Init => "_init",
        }
    }
}

/// Which relation file a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelFile {
    pub tablespace: u32,
    pub database: u32,
    pub relnumber: u32,
    pub fork: Fork,
    pub segno: u32,
}

impl RelFile {
    /// Parses a path relative to the data directory (`/`-separated); `None`
    /// for anything that is not a relation file (pg_control, pg_xact, the
    /// relation map `pg_filenode.map`, `PG_VERSION`, …).
    pub fn parse(rel: &str) -> Option<RelFile> {
        let parts: Vec<&str> = rel.split('/').collect();
        let (tablespace, database, file) = match parts.as_slice() {
            ["global", file] => (GLOBAL_TABLESPACE, 0, *file),
            ["base", db, file] => (DEFAULT_TABLESPACE, oid(db)?, *file),
            ["pg_tblspc", spc, version, db, file] if version.starts_with("PG_") => {
                (oid(spc)?, oid(db)?, *file)
            }
            _ => return None,
        };
        let (stem, segno) = match file.split_once('.') {
            Some((stem, seg)) => (stem, number(seg)?),
            None => (file, 0),
        };
        let (relnumber, fork) = match stem.split_once('_') {
            None => (stem, Fork::Main),
            Some((r, "fsm")) => (r, Fork::Fsm),
            Some((r, "vm")) => (r, Fork::VisibilityMap),
            Some((r, "init")) => (r, Fork::Init),
            Some(_) => return None,
        };
        Some(RelFile {
            tablespace,
            database,
            relnumber: oid(relnumber)?,
            fork,
            segno,
        })
    }

    /// The fork-wide number of block `n` of this segment file.
    pub fn block_number(&self, n: u32) -> u32 {
        self.segno.wrapping_mul(RELSEG_SIZE).wrapping_add(n)
    }
}

/// An OID as PostgreSQL writes it in a path: decimal, no sign, not zero.
fn oid(s: &str) -> Option<u32> {
    number(s).filter(|&v| v != 0)
}

fn number(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_relation_paths() {
        assert_eq!(
            RelFile::parse("base/5/16384"),
            Some(RelFile {
                tablespace: DEFAULT_TABLESPACE,
                database: 5,
                relnumber: 16384,
                fork: Fork::Main,
                segno: 0
            })
        );
        let r = RelFile::parse("base/16390/16384_vm.3").unwrap();
        assert_eq!((r.fork, r.segno), (Fork::VisibilityMap, 3));
        assert_eq!(r.block_number(7), 3 * RELSEG_SIZE + 7);
        let g = RelFile::parse("global/1262_fsm").unwrap();
        assert_eq!(
            (g.tablespace, g.database, g.fork),
            (GLOBAL_TABLESPACE, 0, Fork::Fsm)
        );
        let t = RelFile::parse("pg_tblspc/16385/PG_15_202209061/5/16386_init").unwrap();
        assert_eq!((t.tablespace, t.database, t.relnumber), (16385, 5, 16386));
        assert_eq!(t.fork, Fork::Init);
        for not in [
            "global/pg_control",
            "global/pg_filenode.map",
            "base/5/PG_VERSION",
            "base/5/pg_filenode.map",
            "base/5/16384_xx",
            "base/5/016384",
            "base/5/16384.",
            "pg_xact/0000",
            "postgresql.conf",
            "base/5/sub/16384",
            "pg_tblspc/16385/5/16386",
        ] {
            assert_eq!(RelFile::parse(not), None, "{not}");
        }
    }
}
