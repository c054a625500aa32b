//! Which relation blocks a stretch of WAL changed: [`ChangeSet`].
//!
//! `archive-push` fills one per WAL segment as it walks the records
//! (`pg::walscan`); an incremental backup takes the union of those from its
//! reference backup's start LSN to its own. What it holds, per relation fork
//! (tablespace, database, relation number, fork):
//! - the blocks that records' block references touch ([`BlockSet`]);
//! - a *limit block*: the fork was truncated to that many blocks (0 when it
//!   was created, dropped or rewritten), so no block at or beyond it may be
//!   taken from the reference backup;
//! - flags saying why (created, truncated, dropped);
//!
//! and per database and tablespace the events that create or remove files
//! without a record per file (`CREATE DATABASE … STRATEGY FILE_COPY` copies
//! a whole directory), and the *doubts*: records whose effect on relation
//! files pgvault does not know, each with the scope it may have touched.
//! The rules follow PostgreSQL's own WAL summaries (walsummarizer.c,
//! blkreftable.c, basebackup_incremental.c, PostgreSQL 17), more cautious
//! where noted.
//!
//! The union is commutative: limits take the minimum, flags and blocks the
//! union, doubts the earliest per scope. [`ChangeSet::fork_state`] answers
//! the backup's question for one fork. The binary form is in `codec`;
//! union over more than fits in memory is in `spill`.

use std::collections::BTreeMap;

use super::Lsn;

mod codec;
mod set;
mod spill;

pub use codec::{decode_change_set, decode_segment, encode_change_set, encode_segment};
pub use codec::{BlockRefError, BLOCKREF_FORMAT};
pub use set::BlockSet;
pub use spill::{SpilledChangeSet, UnionBuilder, UnionResult};

/// `RelFileLocator` (`RelFileNode` before PostgreSQL 16): where a relation's
/// files are. Ordered as the binary form stores them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RelFileLocator {
    /// Tablespace OID (1663 `pg_default`, 1664 `pg_global`).
    pub spc: u32,
    /// Database OID (0 for shared relations).
    pub db: u32,
    /// Relation file number (`relfilenode`).
    pub rel: u32,
}

/// `ForkNumber` (common/relpath.h); `MAX_FORKNUM` is 3 in 14 to 18.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[repr(u8)]
pub enum Fork {
    #[default]
    Main = 0,
    /// The free space map: not WAL-logged (freespace.c), always copied whole.
    Fsm = 1,
    Vm = 2,
    /// An unlogged relation's init fork.
    Init = 3,
}

impl Fork {
    pub fn from_number(n: u8) -> Option<Fork> {
        Some(match n {
            0 => Fork::Main,
            1 => Fork::Fsm,
            2 => Fork::Vm,
            3 => Fork::Init,
            _ => return None,
        })
    }

    /// The file name suffix (`forkNames` in relpath.c): "", "_fsm", ….
    pub fn suffix(self) -> &'static str {
        match self {
            Fork::Main => "",
            Fork::Fsm => "_fsm",
            Fork::Vm => "_vm",
            Fork::Init => "_init",
        }
    }

    pub const ALL: [Fork; 4] = [Fork::Main, Fork::Fsm, Fork::Vm, Fork::Init];
}

/// One fork of one relation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RelFork {
    pub loc: RelFileLocator,
    pub fork: Fork,
}

impl std::fmt::Display for RelFork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = self.loc;
        write!(f, "{}/{}/{}{}", l.spc, l.db, l.rel, self.fork.suffix())
    }
}

/// Why a fork has a limit block: bits of [`ForkChanges::flags`].
pub mod fork_flags {
    /// `XLOG_SMGR_CREATE`: the file was created (limit 0).
    pub const CREATED: u8 = 1;
    /// `XLOG_SMGR_TRUNCATE`.
    pub const TRUNCATED: u8 = 2;
    /// Dropped at commit or abort (limit 0).
    pub const DROPPED: u8 = 4;
}

/// Bits of a database's or tablespace's entry.
pub mod dir_flags {
    /// `XLOG_DBASE_CREATE_FILE_COPY` (`XLOG_DBASE_CREATE` in 14): the
    /// directory was copied whole from another database, file by file,
    /// without a record per file.
    pub const COPIED: u8 = 1;
    /// `XLOG_DBASE_CREATE_WAL_LOG` (15+), or `XLOG_TBLSPC_CREATE`.
    pub const CREATED: u8 = 2;
    /// `XLOG_DBASE_DROP`, `XLOG_TBLSPC_DROP`.
    pub const DROPPED: u8 = 4;
}

/// What the WAL says about one fork.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ForkChanges {
    /// Blocks below `limit` that records touched (blocks at or beyond it
    /// are dropped: they are read whole anyway).
    pub blocks: BlockSet,
    /// Smallest length the fork was cut to, in blocks; None if never.
    pub limit: Option<u32>,
    /// [`fork_flags`].
    pub flags: u8,
}

impl ForkChanges {
    fn set_limit(&mut self, limit: u32) {
        let l = self.limit.map_or(limit, |old| old.min(limit));
        self.limit = Some(l);
        self.blocks.truncate(l);
    }

    fn union_with(&mut self, other: ForkChanges) {
        self.flags |= other.flags;
        if let Some(l) = other.limit {
            self.set_limit(l);
        }
        let mut blocks = other.blocks;
        if let Some(l) = self.limit {
            blocks.truncate(l);
        }
        self.blocks.union_with(&blocks);
    }

    fn mem_bytes(&self) -> usize {
        std::mem::size_of::<(RelFork, ForkChanges)>() + 32 + self.blocks.mem_bytes()
    }
}

/// What a doubt may have touched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DoubtScope {
    /// Any relation file of the cluster.
    All,
    /// Any file of one database directory in one tablespace.
    Database { spc: u32, db: u32 },
    /// One fork.
    Fork(RelFork),
}

/// A record whose effect on relation files pgvault cannot tell. Backups
/// compare blocks for what its scope covers instead of trusting the set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Doubt {
    /// The earliest record with this scope (doubts at or after a backup's
    /// own start LSN do not concern it: replay redoes them).
    pub lsn: Lsn,
    pub scope: DoubtScope,
    /// One line: what the record was and why it is not understood.
    pub why: String,
}

/// The verdict for one fork: what a backup must read of it.
#[derive(Debug, PartialEq, Eq)]
pub enum ForkState<'a> {
    /// No record touched it: every block can come from the reference backup.
    Unchanged,
    /// These blocks changed; with a limit, also every block at or beyond it.
    Changed {
        blocks: &'a BlockSet,
        limit: Option<u32>,
    },
    /// Read it whole.
    Whole(Whole<'a>),
}

/// Why a fork must be read whole.
#[derive(Debug, PartialEq, Eq)]
pub enum Whole<'a> {
    /// A doubt covers it.
    Doubt(&'a Doubt),
    /// The free space map is not WAL-logged (basebackup_incremental.c too
    /// always sends it whole).
    NotWalLogged,
    /// Its tablespace was created or dropped ([`dir_flags`]).
    Tablespace(u8),
    /// Its database directory was copied, created or dropped ([`dir_flags`]).
    Database(u8),
    /// Created, dropped, or truncated to nothing ([`fork_flags`]).
    Fork(u8),
}

/// Relation-file changes of a stretch of WAL. See the module comment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChangeSet {
    pub(crate) forks: BTreeMap<RelFork, ForkChanges>,
    /// (tablespace, database) → [`dir_flags`].
    pub(crate) databases: BTreeMap<(u32, u32), u8>,
    /// tablespace → [`dir_flags`].
    pub(crate) tablespaces: BTreeMap<u32, u8>,
    /// The earliest doubt per scope.
    pub(crate) doubts: BTreeMap<DoubtScope, Doubt>,
}

impl ChangeSet {
    pub fn new() -> ChangeSet {
        ChangeSet::default()
    }

    pub fn is_empty(&self) -> bool {
        self.forks.is_empty()
            && self.databases.is_empty()
            && self.tablespaces.is_empty()
            && self.doubts.is_empty()
    }

    pub fn mark_block(&mut self, key: RelFork, block: u32) {
        let e = self.forks.entry(key).or_default();
        if e.limit.is_none_or(|l| block < l) {
            e.blocks.insert(block);
        }
    }

    /// Adds sorted, deduplicated blocks of one fork.
    pub fn mark_blocks_sorted(&mut self, key: RelFork, blocks: &[u32]) {
        let e = self.forks.entry(key).or_default();
        let end = match e.limit {
            Some(l) => blocks.partition_point(|&b| b < l),
            None => blocks.len(),
        };
        e.blocks.extend_sorted(&blocks[..end]);
    }

    /// The fork was cut to `limit` blocks, for the reason `flag`.
    pub fn set_limit(&mut self, key: RelFork, limit: u32, flag: u8) {
        let e = self.forks.entry(key).or_default();
        e.flags |= flag;
        e.set_limit(limit);
    }

    /// Every fork of a relation was dropped (commit or abort).
    pub fn drop_relation(&mut self, loc: RelFileLocator) {
        for fork in Fork::ALL {
            self.set_limit(RelFork { loc, fork }, 0, fork_flags::DROPPED);
        }
    }

    pub fn mark_database(&mut self, spc: u32, db: u32, flag: u8) {
        *self.databases.entry((spc, db)).or_default() |= flag;
    }

    pub fn mark_tablespace(&mut self, spc: u32, flag: u8) {
        *self.tablespaces.entry(spc).or_default() |= flag;
    }

    pub fn add_doubt(&mut self, lsn: Lsn, scope: DoubtScope, why: String) {
        let d = Doubt { lsn, scope, why };
        match self.doubts.get(&scope) {
            Some(old) if old.lsn <= lsn => {}
            _ => {
                self.doubts.insert(scope, d);
            }
        }
    }

    /// Adds everything `other` holds.
    pub fn union_with(&mut self, other: ChangeSet) {
        for (k, v) in other.forks {
            match self.forks.get_mut(&k) {
                Some(mine) => mine.union_with(v),
                None => {
                    self.forks.insert(k, v);
                }
            }
        }
        for (k, f) in other.databases {
            *self.databases.entry(k).or_default() |= f;
        }
        for (k, f) in other.tablespaces {
            *self.tablespaces.entry(k).or_default() |= f;
        }
        for (_, d) in other.doubts {
            self.add_doubt(d.lsn, d.scope, d.why);
        }
    }

    pub fn forks(&self) -> impl Iterator<Item = (&RelFork, &ForkChanges)> {
        self.forks.iter()
    }

    pub fn fork(&self, key: &RelFork) -> Option<&ForkChanges> {
        self.forks.get(key)
    }

    pub fn databases(&self) -> impl Iterator<Item = ((u32, u32), u8)> + '_ {
        self.databases.iter().map(|(k, v)| (*k, *v))
    }

    pub fn tablespaces(&self) -> impl Iterator<Item = (u32, u8)> + '_ {
        self.tablespaces.iter().map(|(k, v)| (*k, *v))
    }

    pub fn doubts(&self) -> impl Iterator<Item = &Doubt> {
        self.doubts.values()
    }

    /// The doubt that covers a fork, if any (the cluster-wide one first).
    pub fn doubt_for(&self, key: &RelFork) -> Option<&Doubt> {
        let l = key.loc;
        self.doubts
            .get(&DoubtScope::All)
            .or_else(|| {
                self.doubts.get(&DoubtScope::Database {
                    spc: l.spc,
                    db: l.db,
                })
            })
            .or_else(|| self.doubts.get(&DoubtScope::Fork(*key)))
    }

    /// What a backup must read of one fork, given everything this set holds.
    pub fn fork_state(&self, key: &RelFork) -> ForkState<'_> {
        state_of(
            key,
            self.doubt_for(key),
            self.tablespaces.get(&key.loc.spc).copied(),
            self.databases.get(&(key.loc.spc, key.loc.db)).copied(),
            self.forks.get(key),
        )
    }

    /// Approximate bytes of memory held.
    pub fn mem_bytes(&self) -> usize {
        self.forks
            .values()
            .map(ForkChanges::mem_bytes)
            .sum::<usize>()
            + (self.databases.len() + self.tablespaces.len()) * 48
            + self
                .doubts
                .values()
                .map(|d| 96 + d.why.len())
                .sum::<usize>()
    }
}

/// The rule behind [`ChangeSet::fork_state`], shared with the spilled form.
fn state_of<'a>(
    key: &RelFork,
    doubt: Option<&'a Doubt>,
    tablespace: Option<u8>,
    database: Option<u8>,
    fork: Option<&'a ForkChanges>,
) -> ForkState<'a> {
    if let Some(d) = doubt {
        return ForkState::Whole(Whole::Doubt(d));
    }
    if key.fork == Fork::Fsm {
        return ForkState::Whole(Whole::NotWalLogged);
    }
    if let Some(f) = tablespace {
        return ForkState::Whole(Whole::Tablespace(f));
    }
    if let Some(f) = database {
        // Like basebackup_incremental.c: any create or drop of the
        // database directory since the reference backup means whole files.
        return ForkState::Whole(Whole::Database(f));
    }
    match fork {
        None => ForkState::Unchanged,
        Some(f) if f.limit == Some(0) => ForkState::Whole(Whole::Fork(f.flags)),
        Some(f) if f.blocks.is_empty() && f.limit.is_none() => ForkState::Unchanged,
        Some(f) => ForkState::Changed {
            blocks: &f.blocks,
            limit: f.limit,
        },
    }
}

/// Bytes of a record that a segment boundary cut: what one segment saw of
/// it, kept so that the union of consecutive segments can put the record
/// together, check its CRC and apply it (`pg::walscan`'s `span` module).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Piece {
    /// The record's LSN (a segment's last record), or the segment's start
    /// (the continuation at a segment's start).
    pub start: Lsn,
    /// For a continuation: `xlp_rem_len` of the segment's first page, the
    /// record's bytes still to come there.
    pub rem_len: u32,
    /// Record bytes in this segment (page headers not counted).
    pub len: u64,
    /// The first of those bytes (the record header and block headers).
    pub raw: Vec<u8>,
    /// CRC-32C of the bytes after `raw`.
    pub rest_crc: u32,
    /// The last bytes, after `raw` (main data is at a record's end).
    pub tail: Vec<u8>,
}

/// What archive-push keeps of one segment: the changes of the records that
/// start and end in it, and the pieces of those cut by its boundaries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SegmentRefs {
    /// LSN of the segment's first byte.
    pub segment_start: Lsn,
    /// Segment size in bytes.
    pub seg_size: u32,
    /// PostgreSQL major that wrote it.
    pub major: u32,
    pub changes: ChangeSet,
    /// The end of a record begun in an earlier segment.
    pub head: Option<Piece>,
    /// The start of a record that goes on into the next segment.
    pub tail: Option<Piece>,
}

#[cfg(test)]
mod tests;
