//! What a record does to relation files, into a [`ChangeSet`]: the blocks
//! its block references name, and the storage events that change files
//! without one. The events are those PostgreSQL's own WAL summarizer treats
//! specially (walsummarizer.c: SummarizeSmgrRecord, SummarizeXactRecord,
//! SummarizeDbaseRecord), plus tablespaces and `wal_level = minimal`; any
//! other record flagged `XLR_SPECIAL_REL_UPDATE` ("modifies relation files
//! in ways not covered by the usual block references", xlogrecord.h), and
//! any record of a resource manager pgvault does not know (an extension's
//! custom one), is a doubt: its effect is never guessed.

use std::collections::HashMap;

use super::decode::{self, Capture, RM_XACT_ID, RM_XLOG_ID, XLOG_PARAMETER_CHANGE};
use super::RecordHeader;
use crate::pg::blockref::RelFileLocator;
use crate::pg::blockref::{dir_flags, fork_flags, ChangeSet, DoubtScope, Fork, RelFork};
use crate::pg::Lsn;

/// Resource managers (rmgrlist.h, the same IDs in 14 to 18).
const RM_SMGR_ID: u8 = 2;
const RM_DBASE_ID: u8 = 4;
const RM_TBLSPC_ID: u8 = 5;
/// `RM_LOGICALMSG_ID`, the last built-in one; custom ones are 128 to 255.
const RM_MAX_BUILTIN_ID: u8 = 21;
const RMGR_NAMES: [&str; 22] = [
    "XLOG",
    "Transaction",
    "Storage",
    "CLOG",
    "Database",
    "Tablespace",
    "MultiXact",
    "RelMap",
    "Standby",
    "Heap2",
    "Heap",
    "Btree",
    "Hash",
    "Gin",
    "Gist",
    "Sequence",
    "SPGist",
    "BRIN",
    "CommitTs",
    "ReplicationOrigin",
    "Generic",
    "LogicalMessage",
];

/// `XLR_SPECIAL_REL_UPDATE` (xlogrecord.h), in xl_info's low bits.
const XLR_SPECIAL_REL_UPDATE: u8 = 0x01;

/// storage_xlog.h.
const XLOG_SMGR_CREATE: u8 = 0x10;
const XLOG_SMGR_TRUNCATE: u8 = 0x20;
const SMGR_TRUNCATE_HEAP: u32 = 0x0001;
const SMGR_TRUNCATE_VM: u32 = 0x0002;
const SMGR_TRUNCATE_FSM: u32 = 0x0004;

/// dbcommands_xlog.h: 14 has CREATE (a file copy) 0x00 and DROP 0x10;
/// 15 added the WAL_LOG strategy at 0x10 and moved DROP to 0x20.
const XLOG_DBASE_CREATE_FILE_COPY: u8 = 0x00;
const XLOG_DBASE_CREATE_WAL_LOG: u8 = 0x10;
const XLOG_DBASE_DROP_14: u8 = 0x10;
const XLOG_DBASE_DROP: u8 = 0x20;

/// tablespace.h.
const XLOG_TBLSPC_CREATE: u8 = 0x00;
const XLOG_TBLSPC_DROP: u8 = 0x10;

/// `WAL_LEVEL_MINIMAL` (xlog.h): new relation files are then synced, not
/// WAL-logged.
const WAL_LEVEL_MINIMAL: i32 = 0;

/// Main data bytes a commit or abort record keeps: enough for the dropped
/// relations after a large subtransaction array.
pub(super) const KEEP_XACT_MAIN: usize = 256 * 1024;

/// Main data bytes worth keeping of the record `h` heads (0: none).
pub(super) fn main_to_keep(h: &RecordHeader) -> usize {
    let info = h.info & 0xF0;
    match h.rmid {
        RM_XACT_ID => match info & decode::XLOG_XACT_OPMASK {
            decode::XLOG_XACT_COMMIT
            | decode::XLOG_XACT_ABORT
            | decode::XLOG_XACT_COMMIT_PREPARED
            | decode::XLOG_XACT_ABORT_PREPARED => KEEP_XACT_MAIN,
            _ => 0,
        },
        RM_SMGR_ID | RM_TBLSPC_ID => 64,
        // xl_dbase_drop_rec lists tablespaces: 4 KiB is a thousand.
        RM_DBASE_ID => 4096,
        RM_XLOG_ID if info == XLOG_PARAMETER_CHANGE => 64,
        _ => 0,
    }
}

fn rmgr_name(rmid: u8) -> String {
    RMGR_NAMES
        .get(usize::from(rmid))
        .map_or_else(|| format!("resource manager {rmid}"), |n| n.to_string())
}

fn describe(h: &RecordHeader) -> String {
    format!("{} record (xl_info {:#04X})", rmgr_name(h.rmid), h.info)
}

/// Collects block references fast: (fork, block) pairs go to a buffer as
/// u64s, sorted and folded into the set a batch at a time, so a record costs
/// a push per reference, not a set insert.
#[derive(Debug, Default)]
pub(super) struct Collector {
    pub(super) set: ChangeSet,
    keys: Vec<RelFork>,
    index: HashMap<RelFork, u32>,
    last: Option<(RelFork, u32)>,
    buf: Vec<u64>,
}

const BATCH: usize = 1 << 16;

impl Collector {
    pub(super) fn add(&mut self, key: RelFork, block: u32) {
        let i = match self.last {
            Some((k, i)) if k == key => i,
            _ => {
                let next = self.keys.len() as u32;
                let i = *self.index.entry(key).or_insert(next);
                if i == next {
                    self.keys.push(key);
                }
                self.last = Some((key, i));
                i
            }
        };
        self.buf.push(u64::from(i) << 32 | u64::from(block));
        if self.buf.len() >= BATCH {
            self.flush();
        }
    }

    pub(super) fn flush(&mut self) {
        self.buf.sort_unstable();
        self.buf.dedup();
        let mut blocks: Vec<u32> = Vec::new();
        let mut at = 0;
        while at < self.buf.len() {
            let i = (self.buf[at] >> 32) as u32;
            blocks.clear();
            while at < self.buf.len() && (self.buf[at] >> 32) as u32 == i {
                blocks.push(self.buf[at] as u32);
                at += 1;
            }
            self.set.mark_blocks_sorted(self.keys[i as usize], &blocks);
        }
        self.buf.clear();
    }

    /// The set, every buffered reference in it.
    pub(super) fn finish(mut self) -> ChangeSet {
        self.flush();
        self.set
    }

    fn doubt(&mut self, lsn: Lsn, scope: DoubtScope, why: String) {
        self.set.add_doubt(lsn, scope, why);
    }
}

fn locator_at(b: &[u8], off: usize) -> Option<RelFileLocator> {
    Some(RelFileLocator {
        spc: decode::u32_at(b, off)?,
        db: decode::u32_at(b, off + 4)?,
        rel: decode::u32_at(b, off + 8)?,
    })
}

/// Adds what a complete record (CRC-checked, or put together from pieces
/// and checked) does to relation files.
pub(super) fn apply(col: &mut Collector, major: u32, lsn: Lsn, h: &RecordHeader, c: &Capture) {
    if c.unreadable {
        col.doubt(
            lsn,
            DoubtScope::All,
            format!(
                "{} at {lsn}: its block headers could not be read",
                describe(h)
            ),
        );
        return;
    }
    for r in &c.refs {
        match r.key() {
            Some(k) => col.add(k, r.block),
            None => col.doubt(
                lsn,
                DoubtScope::Database {
                    spc: r.loc.spc,
                    db: r.loc.db,
                },
                format!(
                    "{} at {lsn} references fork {} of {}/{}/{}",
                    describe(h),
                    r.fork,
                    r.loc.spc,
                    r.loc.db,
                    r.loc.rel
                ),
            ),
        }
    }
    let special = h.info & XLR_SPECIAL_REL_UPDATE != 0;
    let main = c.main_kept();
    let verdict = match h.rmid {
        RM_SMGR_ID => smgr(col, h, main),
        RM_DBASE_ID => dbase(col, major, h, main),
        RM_TBLSPC_ID => tblspc(col, h, main),
        RM_XACT_ID => xact(col, h, main),
        RM_XLOG_ID if h.info & 0xF0 == XLOG_PARAMETER_CHANGE => parameter_change(main),
        id if id <= RM_MAX_BUILTIN_ID && !special => Ok(()),
        id if id <= RM_MAX_BUILTIN_ID => Err("it says it changes relation files outside its block references, and pgvault does not know how".to_string()),
        _ => Err("pgvault does not know this resource manager (an extension's?)".to_string()),
    };
    if let Err(why) = verdict {
        col.doubt(
            lsn,
            DoubtScope::All,
            format!("{} at {lsn}: {why}", describe(h)),
        );
    }
}

/// The main data, which must have at least `n` bytes.
fn need(main: Option<(&[u8], bool)>, n: usize) -> Result<&[u8], String> {
    match main {
        Some((b, _)) if b.len() >= n => Ok(b),
        Some((b, complete)) => Err(format!(
            "its main data has {}{} bytes, {n} needed",
            b.len(),
            if complete { "" } else { " readable" }
        )),
        None => Err("its main data could not be found".into()),
    }
}

fn u32_of(b: &[u8], off: usize) -> u32 {
    decode::u32_at(b, off).unwrap_or_default()
}

fn smgr(col: &mut Collector, h: &RecordHeader, main: Option<(&[u8], bool)>) -> Result<(), String> {
    match h.info & 0xF0 {
        XLOG_SMGR_CREATE => {
            // xl_smgr_create: RelFileLocator; ForkNumber (an int).
            let b = need(main, 16)?;
            let loc = locator_at(b, 0).ok_or("short")?;
            let n = u32_of(b, 12);
            let fork = u8::try_from(n)
                .ok()
                .and_then(Fork::from_number)
                .ok_or_else(|| format!("it creates fork {n}"))?;
            col.set
                .set_limit(RelFork { loc, fork }, 0, fork_flags::CREATED);
            Ok(())
        }
        XLOG_SMGR_TRUNCATE => {
            // xl_smgr_truncate: BlockNumber blkno; RelFileLocator; int flags.
            let b = need(main, 20)?;
            let blkno = u32_of(b, 0);
            let loc = locator_at(b, 4).ok_or("short")?;
            let flags = u32_of(b, 16);
            if flags & SMGR_TRUNCATE_HEAP != 0 {
                col.set.set_limit(
                    RelFork {
                        loc,
                        fork: Fork::Main,
                    },
                    blkno,
                    fork_flags::TRUNCATED,
                );
            }
            // The visibility map is cut to the map page covering blkno, and
            // that page's bits beyond blkno cleared, both without a block
            // reference (visibilitymap_prepare_truncate, redone by
            // smgr_redo). PostgreSQL's summarizer sets the limit to blkno;
            // the map is 1/32672 of the heap, so pgvault reads it whole.
            if flags & SMGR_TRUNCATE_VM != 0 {
                col.set.set_limit(
                    RelFork {
                        loc,
                        fork: Fork::Vm,
                    },
                    0,
                    fork_flags::TRUNCATED,
                );
            }
            if flags & SMGR_TRUNCATE_FSM != 0 {
                col.set.set_limit(
                    RelFork {
                        loc,
                        fork: Fork::Fsm,
                    },
                    0,
                    fork_flags::TRUNCATED,
                );
            }
            Ok(())
        }
        i => Err(format!(
            "Storage record type {i:#04X} is not one pgvault knows"
        )),
    }
}

fn dbase(
    col: &mut Collector,
    major: u32,
    h: &RecordHeader,
    main: Option<(&[u8], bool)>,
) -> Result<(), String> {
    let info = h.info & 0xF0;
    let drop = if major >= 15 {
        XLOG_DBASE_DROP
    } else {
        XLOG_DBASE_DROP_14
    };
    if info == XLOG_DBASE_CREATE_FILE_COPY {
        // xl_dbase_create_file_copy_rec (xl_dbase_create_rec in 14): db_id,
        // tablespace_id, src_db_id, src_tablespace_id.
        let b = need(main, 16)?;
        col.set
            .mark_database(u32_of(b, 4), u32_of(b, 0), dir_flags::COPIED);
        Ok(())
    } else if info == drop {
        // xl_dbase_drop_rec: db_id; int ntablespaces; Oid tablespace_ids[].
        let b = need(main, 8)?;
        let db = u32_of(b, 0);
        let n = u32_of(b, 4) as usize;
        let b = need(main, 8 + 4 * n)?;
        for i in 0..n {
            col.set
                .mark_database(u32_of(b, 8 + 4 * i), db, dir_flags::DROPPED);
        }
        Ok(())
    } else if major >= 15 && info == XLOG_DBASE_CREATE_WAL_LOG {
        // xl_dbase_create_wal_log_rec: db_id, tablespace_id. The files come
        // with their own records; walsummarizer.c marks the whole database
        // anyway, and so does pgvault.
        let b = need(main, 8)?;
        col.set
            .mark_database(u32_of(b, 4), u32_of(b, 0), dir_flags::CREATED);
        Ok(())
    } else {
        Err(format!(
            "Database record type {info:#04X} is not one pgvault knows"
        ))
    }
}

fn tblspc(
    col: &mut Collector,
    h: &RecordHeader,
    main: Option<(&[u8], bool)>,
) -> Result<(), String> {
    // xl_tblspc_create_rec: ts_id, then the path; xl_tblspc_drop_rec: ts_id.
    let flag = match h.info & 0xF0 {
        XLOG_TBLSPC_CREATE => dir_flags::CREATED,
        XLOG_TBLSPC_DROP => dir_flags::DROPPED,
        i => {
            return Err(format!(
                "Tablespace record type {i:#04X} is not one pgvault knows"
            ))
        }
    };
    let b = need(main, 4)?;
    col.set.mark_tablespace(u32_of(b, 0), flag);
    Ok(())
}

fn xact(col: &mut Collector, h: &RecordHeader, main: Option<(&[u8], bool)>) -> Result<(), String> {
    if main_to_keep(h) == 0 {
        // PREPARE (its files are dropped by COMMIT/ROLLBACK PREPARED, which
        // list them again), assignments, invalidations.
        return Ok(());
    }
    let b = need(main, 8)?;
    let (off, n) = decode::xact_dropped_rels(h.info, b)
        .ok_or("its list of dropped relations could not be read")?;
    let b = need(main, off + n * decode::REL_FILE_LOCATOR_SIZE)?;
    for i in 0..n {
        let loc = locator_at(b, off + i * decode::REL_FILE_LOCATOR_SIZE).ok_or("short")?;
        col.set.drop_relation(loc);
    }
    Ok(())
}

fn parameter_change(main: Option<(&[u8], bool)>) -> Result<(), String> {
    // xl_parameter_change: five ints, then int wal_level at 20.
    let b = need(main, 24)?;
    let wal_level = u32_of(b, 20) as i32;
    if wal_level <= WAL_LEVEL_MINIMAL {
        return Err(
            "wal_level is minimal from here on: relation files may change without WAL".into(),
        );
    }
    Ok(())
}
