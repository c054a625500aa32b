//! Block references and storage events against WAL of PostgreSQL 14 to 18
//! (`fixtures/pgNN-blockrefs/`, made by `scripts/make-fixtures.sh
//! blockrefs`): what pg_waldump -b prints, segment by segment, and on 17
//! what PostgreSQL's own WAL summaries hold.

use std::collections::BTreeMap;

use super::*;
use crate::pg::blockref::{
    decode_segment, dir_flags, encode_segment, fork_flags, ChangeSet, Fork, ForkState,
    RelFileLocator, RelFork, UnionResult, Whole,
};
use crate::pg::testdata;
use crate::pg::WalFileName;

const MAJORS: [u32; 5] = [14, 15, 16, 17, 18];

fn dir(major: u32) -> String {
    format!("pg{major}-blockrefs")
}

fn opts(name: &str, major: u32) -> ScanOptions {
    let file = WalFileName::parse(name).unwrap();
    ScanOptions {
        major,
        seg_size: 1 << 20,
        segment_start: file.start_lsn(1 << 20).unwrap(),
        partial: false,
    }
}

/// Every segment of a major's story, scanned: (name, summary, refs).
fn scanned(major: u32) -> Vec<(String, WalSummary, SegmentRefs)> {
    let facts = testdata::facts(&dir(major));
    facts["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let name = n.as_str().unwrap().to_string();
            let bytes = testdata::wal(&dir(major), &name);
            let mut s = WalScanner::new(opts(&name, major));
            s.feed(&bytes);
            let (sum, refs) = s.finish_with_blocks();
            (name, sum, refs)
        })
        .collect()
}

/// "1663/5/16384/main" → a fork.
fn fork_key(text: &str) -> RelFork {
    let p: Vec<&str> = text.split('/').collect();
    let fork = match p[3] {
        "main" => Fork::Main,
        "fsm" => Fork::Fsm,
        "vm" => Fork::Vm,
        "init" => Fork::Init,
        f => panic!("fork {f}"),
    };
    RelFork {
        loc: RelFileLocator {
            spc: p[0].parse().unwrap(),
            db: p[1].parse().unwrap(),
            rel: p[2].parse().unwrap(),
        },
        fork,
    }
}

fn n(v: &serde_json::Value) -> u32 {
    v.as_u64().unwrap() as u32
}

/// What pg_waldump -b printed for the records starting in each segment
/// (segment number → set), with the rules of the module comment of
/// `pg::blockref` applied to its text.
fn expected(major: u32) -> BTreeMap<u64, ChangeSet> {
    let raw = testdata::read_zst(&format!("{}/blockrefs.json.zst", dir(major)));
    let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    let mut out = BTreeMap::new();
    for (segno, seg) in v["by_segment"].as_object().unwrap() {
        let mut s = ChangeSet::new();
        for (k, ranges) in seg["blocks"].as_object().unwrap() {
            let key = fork_key(k);
            for r in ranges.as_array().unwrap() {
                for b in n(&r[0])..=n(&r[1]) {
                    s.mark_block(key, b);
                }
            }
        }
        for e in seg["events"].as_array().unwrap() {
            match e[0].as_str().unwrap() {
                "create" => s.set_limit(fork_key(e[2].as_str().unwrap()), 0, fork_flags::CREATED),
                "truncate" => {
                    let main = fork_key(e[2].as_str().unwrap());
                    let (blocks, flags) = (n(&e[3]), n(&e[4]));
                    let at = |fork| RelFork { fork, ..main };
                    if flags & 1 != 0 {
                        s.set_limit(at(Fork::Main), blocks, fork_flags::TRUNCATED);
                    }
                    if flags & 2 != 0 {
                        s.set_limit(at(Fork::Vm), 0, fork_flags::TRUNCATED);
                    }
                    if flags & 4 != 0 {
                        s.set_limit(at(Fork::Fsm), 0, fork_flags::TRUNCATED);
                    }
                }
                "drop" => {
                    for p in e[2].as_array().unwrap() {
                        s.drop_relation(fork_key(p.as_str().unwrap()).loc);
                    }
                }
                "db_copy" => s.mark_database(n(&e[2]), n(&e[3]), dir_flags::COPIED),
                "db_create" => s.mark_database(n(&e[2]), n(&e[3]), dir_flags::CREATED),
                "db_drop" => {
                    for d in e[2].as_array().unwrap() {
                        s.mark_database(n(&d[0]), n(&d[1]), dir_flags::DROPPED);
                    }
                }
                "ts_create" => s.mark_tablespace(n(&e[2]), dir_flags::CREATED),
                "ts_drop" => s.mark_tablespace(n(&e[2]), dir_flags::DROPPED),
                other => panic!("event {other}"),
            }
        }
        out.insert(segno.parse().unwrap(), s);
    }
    out
}

/// Each segment's changes with the record that starts in it and goes on
/// into the next ones put together: what pg_waldump attributes to it.
fn by_start_segment(major: u32) -> BTreeMap<u64, ChangeSet> {
    let segs = scanned(major);
    let mut out = BTreeMap::new();
    for (i, (name, sum, refs)) in segs.iter().enumerate() {
        assert!(
            sum.problems.is_empty() && sum.crc_failures.is_empty(),
            "{name}: {sum:#?}"
        );
        let mut c = refs.changes.clone();
        if let Some(tail) = &refs.tail {
            let mut pieces = vec![tail.clone()];
            for (_, _, later) in &segs[i + 1..] {
                let head = later.head.clone().expect("a continuation");
                let ends = head.len >= u64::from(head.rem_len);
                pieces.push(head);
                if ends {
                    break;
                }
            }
            c.union_with(span::stitch(major, &pieces).unwrap_or_else(|e| panic!("{name}: {e}")));
        }
        out.insert(refs.segment_start.0 >> 20, c);
    }
    out
}

#[test]
fn block_references_and_storage_events_match_pg_waldump() {
    for major in MAJORS {
        let want = expected(major);
        let got = by_start_segment(major);
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "PostgreSQL {major}: segments"
        );
        for (segno, w) in &want {
            let g = &got[segno];
            assert!(
                g.doubts().next().is_none(),
                "{major}/{segno}: {:#?}",
                g.doubts().collect::<Vec<_>>()
            );
            for (k, f) in w.forks() {
                assert_eq!(
                    g.fork(k),
                    Some(f),
                    "PostgreSQL {major}, segment {segno:X}, {k}"
                );
            }
            assert_eq!(g, w, "PostgreSQL {major}, segment {segno:X}");
        }
        // The story made every kind of event (facts.events, from pg_waldump).
        let facts = testdata::facts(&dir(major));
        let kinds: Vec<&str> = facts["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap())
            .collect();
        for k in [
            "create",
            "truncate",
            "drop",
            "db_copy",
            "db_drop",
            "ts_create",
            "ts_drop",
        ] {
            assert!(
                kinds.contains(&k),
                "PostgreSQL {major}: no {k} in the story"
            );
        }
        if major == 17 {
            assert!(kinds.contains(&"db_create"));
        }
    }
}

#[test]
fn storage_events_give_the_verdicts_a_backup_needs() {
    // The union over the whole story, on every major.
    for major in MAJORS {
        let u = union_of(major, None);
        let UnionResult::Memory(set) = &u else {
            panic!("a small union stays in memory");
        };
        assert!(set.doubts().next().is_none());
        // A copied database and a dropped one: every file whole.
        let copied: Vec<_> = set
            .databases()
            .filter(|(_, f)| f & dir_flags::COPIED != 0)
            .collect();
        assert_eq!(copied.len(), 1, "{major}: {copied:?}");
        let ((spc, db), _) = copied[0];
        let any = RelFork {
            loc: RelFileLocator { spc, db, rel: 1259 },
            fork: Fork::Main,
        };
        assert!(matches!(
            set.fork_state(&any),
            ForkState::Whole(Whole::Database(_))
        ));
        // The table VACUUM truncated: a limit above 0, unless VACUUM FULL
        // (later in the story) dropped that file, and its visibility map
        // whole.
        let (k, f) = set
            .forks()
            .find(|(k, f)| k.fork == Fork::Main && f.flags & fork_flags::TRUNCATED != 0)
            .unwrap_or_else(|| panic!("{major}: no table truncated by VACUUM"));
        assert!(f.limit.is_some_and(|l| l > 0) || f.flags & fork_flags::DROPPED != 0);
        let vm = RelFork {
            fork: Fork::Vm,
            ..*k
        };
        assert!(matches!(
            set.fork_state(&vm),
            ForkState::Whole(Whole::Fork(_))
        ));
        // Relations created in the story: whole.
        let created = set
            .forks()
            .filter(|(_, f)| f.flags & fork_flags::CREATED != 0)
            .count();
        assert!(created >= 10, "{major}: {created} created forks");
        // The unlogged table's init fork was created.
        assert!(set
            .forks()
            .any(|(k, f)| k.fork == Fork::Init && f.flags & fork_flags::CREATED != 0));
    }
}

fn union_of(major: u32, budget: Option<usize>) -> UnionResult {
    let dir = tempfile::tempdir().unwrap();
    let mut u = RangeUnion::new(budget.unwrap_or(64 << 20), dir.path());
    let segs = scanned(major);
    let n = segs.len();
    for (_, _, refs) in segs {
        u.add(refs).unwrap();
    }
    // Every boundary of the story cut a record, and each was put together.
    assert_eq!(u.stitched(), n as u64 - 1, "PostgreSQL {major}");
    let r = u.finish().unwrap();
    // Kept in memory here; the spill directory may go.
    drop(dir);
    r
}

#[test]
fn union_covers_postgresql_17s_wal_summaries() {
    for major in [17u32] {
        let u = union_of(major, None);
        let facts = testdata::facts(&dir(major));
        assert!(facts["summaries"].as_u64().unwrap() >= 2);
        let csv = testdata::read_zst(&format!("{}/summaries.csv.zst", dir(major)));
        let csv = String::from_utf8(csv).unwrap();
        let (mut blocks, mut limits, mut dbs) = (0, 0, 0);
        for line in csv.lines() {
            // start, end, tablespace, database, relfilenode, fork, block, is_limit
            let f: Vec<&str> = line.split(',').collect();
            let num = |i: usize| f[i].parse::<u32>().unwrap();
            let (spc, db, rel, fork, blk, limit) =
                (num(2), num(3), num(4), num(5) as u8, num(6), f[7] == "t");
            if rel == 0 {
                // A whole database created or dropped (walsummarizer.c).
                dbs += 1;
                assert!(
                    u.small_sections().databases().any(|(k, _)| k == (spc, db)),
                    "{line}: database not marked"
                );
                continue;
            }
            let key = RelFork {
                loc: RelFileLocator { spc, db, rel },
                fork: Fork::from_number(fork).unwrap(),
            };
            let covered = u
                .with_fork_state(&key, |s| match s {
                    ForkState::Whole(_) => true,
                    // PostgreSQL's limit L: ours at or below it. A block:
                    // ours has it, or a limit at or below it.
                    ForkState::Changed { blocks, limit: l } => {
                        l.is_some_and(|l| l <= blk) || (!limit && blocks.contains(blk))
                    }
                    ForkState::Unchanged => false,
                })
                .unwrap();
            assert!(covered, "{line}: not covered by pgvault's set");
            if limit {
                limits += 1;
            } else {
                blocks += 1;
            }
        }
        // The summaries saw the story's blocks, limits and databases.
        assert!(
            blocks > 100 && limits > 10 && dbs >= 1,
            "{blocks} {limits} {dbs}"
        );
    }
}

#[test]
fn chunking_does_not_change_the_refs() {
    for major in [14u32, 17] {
        let facts = testdata::facts(&dir(major));
        for name in facts["segments"].as_array().unwrap() {
            let name = name.as_str().unwrap();
            let bytes = testdata::wal(&dir(major), name);
            let whole = scan_segment_refs(&bytes, opts(name, major));
            for size in [7usize, 8191, 100_000] {
                let mut s = WalScanner::new(opts(name, major));
                for c in bytes.chunks(size) {
                    s.feed(c);
                }
                assert_eq!(
                    s.finish_with_blocks().1,
                    whole,
                    "{major}/{name} in {size}-byte chunks"
                );
            }
        }
    }
}

fn scan_segment_refs(bytes: &[u8], o: ScanOptions) -> SegmentRefs {
    let mut s = WalScanner::new(o);
    s.feed(bytes);
    s.finish_with_blocks().1
}

#[test]
fn segment_refs_round_trip_and_stay_small() {
    for major in MAJORS {
        for (name, _, refs) in scanned(major) {
            let bytes = encode_segment(&refs);
            assert_eq!(decode_segment(&bytes).unwrap(), refs, "{major}/{name}");
            // A 1 MiB segment's refs: a few KiB (zstd in the repository
            // makes them smaller still).
            assert!(
                bytes.len() < 64 * 1024,
                "{major}/{name}: {} bytes",
                bytes.len()
            );
        }
    }
}

/// Rewrites the CRC of the record at `off` (wholly inside `bytes`, no page
/// boundary in it) after its bytes were changed.
fn fix_crc(bytes: &mut [u8], off: usize) {
    let tot = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
    let crc = crc32c::crc32c_append(
        crc32c::crc32c(&bytes[off + 24..off + tot]),
        &bytes[off..off + 20],
    );
    bytes[off + 20..off + 24].copy_from_slice(&crc.to_le_bytes());
}

/// The first record of `rmid` in the segment that does not cross a page.
fn find_record(bytes: &[u8], o: ScanOptions, rmid: u8) -> usize {
    // Walk record starts via xl_prev chain-free scanning: records are
    // MAXALIGNed after a page header; trust the scanner's count instead and
    // look for a header whose CRC checks.
    let mut off = LONG_PAGE_HEADER_SIZE;
    while off + 24 < bytes.len() {
        if off % 8192 == 0 {
            off += SHORT_PAGE_HEADER_SIZE;
            continue;
        }
        let tot = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
        if tot >= 24 && off % 8192 + tot <= 8192 && bytes[off + 17] == rmid {
            let crc = crc32c::crc32c_append(
                crc32c::crc32c(&bytes[off + 24..off + tot]),
                &bytes[off..off + 20],
            );
            if crc == u32::from_le_bytes(bytes[off + 20..off + 24].try_into().unwrap()) {
                return off;
            }
        }
        off += 8;
    }
    panic!(
        "no record of resource manager {rmid} in {:?}",
        o.segment_start
    );
}

#[test]
fn records_not_understood_are_doubts() {
    let major = 16;
    let facts = testdata::facts(&dir(major));
    let name = facts["segments"][0].as_str().unwrap();
    let o = opts(name, major);
    let clean = testdata::wal(&dir(major), name);
    // A heap record (rmgr 10) of an unknown resource manager (an extension's),
    // and one flagged XLR_SPECIAL_REL_UPDATE.
    let off = find_record(&clean, o, 10);
    let at = Lsn(o.segment_start.0 + off as u64);
    for (what, patch) in [("unknown rmgr", 0usize), ("special rel update", 1)] {
        let mut bytes = clean.clone();
        if patch == 0 {
            bytes[off + 17] = 200;
        } else {
            bytes[off + 16] |= 0x01;
        }
        fix_crc(&mut bytes, off);
        let (sum, refs) = {
            let mut s = WalScanner::new(o);
            s.feed(&bytes);
            s.finish_with_blocks()
        };
        assert!(
            sum.crc_failures.is_empty() && sum.problems.is_empty(),
            "{what}: {sum:#?}"
        );
        let d: Vec<_> = refs.changes.doubts().collect();
        assert_eq!(d.len(), 1, "{what}: {d:#?}");
        assert_eq!(
            (d[0].lsn, d[0].scope),
            (at, crate::pg::blockref::DoubtScope::All),
            "{what}"
        );
        assert!(d[0].why.contains(&at.to_string()), "{what}: {}", d[0].why);
    }
    // A flipped byte: a CRC failure, a doubt over everything.
    let mut bytes = clean.clone();
    bytes[off + 30] ^= 0x55;
    let refs = scan_segment_refs(&bytes, o);
    let d: Vec<_> = refs.changes.doubts().collect();
    assert_eq!(d.len(), 1, "{d:#?}");
    assert_eq!(d[0].lsn, at);
}

#[test]
fn a_broken_or_missing_piece_is_a_doubt() {
    let major = 18;
    let segs = scanned(major);
    assert!(segs.len() >= 3);
    let tail_lsn = segs[0]
        .2
        .tail
        .as_ref()
        .expect("a record cut at the first boundary")
        .start;
    // The continuation damaged: its CRC no longer checks.
    let dir = tempfile::tempdir().unwrap();
    let mut u = RangeUnion::new(1 << 20, dir.path());
    let mut second = segs[1].2.clone();
    let head = second.head.as_mut().unwrap();
    if let Some(b) = head.raw.last_mut() {
        *b ^= 1;
    }
    u.add(segs[0].2.clone()).unwrap();
    u.add(second).unwrap();
    let r = u.finish().unwrap();
    let d: Vec<_> = r.small_sections().doubts().collect();
    assert!(
        d.iter().any(|d| d.lsn == tail_lsn && d.why.contains("CRC")),
        "{d:#?}"
    );
    // A segment left out of the range.
    let mut u = RangeUnion::new(1 << 20, dir.path());
    u.add(segs[0].2.clone()).unwrap();
    u.add(segs[2].2.clone()).unwrap();
    let r = u.finish().unwrap();
    let d: Vec<_> = r.small_sections().doubts().collect();
    assert!(
        d.iter()
            .any(|d| d.lsn == tail_lsn && d.why.contains("not in the range")),
        "{d:#?}"
    );
    // The last segment's cut record: a doubt at its LSN, after which a
    // backup starting in that segment need not look.
    let mut u = RangeUnion::new(1 << 20, dir.path());
    u.add(segs[0].2.clone()).unwrap();
    let d: Vec<_> = u
        .finish()
        .unwrap()
        .small_sections()
        .doubts()
        .cloned()
        .collect();
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].lsn, tail_lsn);
}

#[test]
fn spilled_union_of_real_wal_equals_the_one_in_memory() {
    let mem = union_of(17, None);
    let spilled = union_of(17, Some(4096));
    assert!(matches!(spilled, UnionResult::Spilled(_)));
    let UnionResult::Memory(set) = &mem else {
        panic!("in memory");
    };
    for (k, _) in set.forks() {
        let a = mem.with_fork_state(k, |s| format!("{s:?}")).unwrap();
        let b = spilled.with_fork_state(k, |s| format!("{s:?}")).unwrap();
        assert_eq!(a, b, "{k}");
    }
}
