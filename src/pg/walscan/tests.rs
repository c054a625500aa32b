//! The scanner against WAL written by real servers (`fixtures/`, facts from
//! pg_waldump and SQL in `facts.json`), and against damaged copies of it.

use super::*;
use crate::pg::testdata::{self, Noise};
use crate::pg::{WalFileKind, WalFileName};

/// The records story (scripts/make-fixtures.sh records).
const RECORDS: &str = "pg15-records";

fn lsn(v: &serde_json::Value) -> Lsn {
    v.as_str()
        .unwrap_or_else(|| panic!("not an LSN string: {v}"))
        .parse()
        .unwrap()
}

fn opts(name: &str, major: u32, seg_size: u32) -> ScanOptions {
    let file = WalFileName::parse(name).unwrap();
    ScanOptions {
        major,
        seg_size,
        segment_start: file.start_lsn(seg_size).unwrap(),
        partial: file.kind() == WalFileKind::Partial,
    }
}

/// Every WAL segment of every fixture: (dir, name, options, bytes, facts).
fn all_segments() -> Vec<(String, String, ScanOptions, Vec<u8>, serde_json::Value)> {
    let mut out = Vec::new();
    for (dir, major) in testdata::MAJORS {
        let facts = testdata::facts(dir);
        let Some(wal) = facts["wal"].as_object() else {
            continue;
        };
        for (name, f) in wal {
            let Some(seg_size) = f.get("xlp_seg_size").and_then(|v| v.as_u64()) else {
                continue; // history and backup files
            };
            let o = opts(name, *major, seg_size as u32);
            out.push((
                dir.to_string(),
                name.clone(),
                o,
                testdata::wal(dir, name),
                f.clone(),
            ));
        }
    }
    let facts = testdata::facts(RECORDS);
    let seg_size = facts["seg_size"].as_u64().unwrap() as u32;
    for (name, f) in facts["wal"].as_object().unwrap() {
        let o = opts(name, 15, seg_size);
        out.push((
            RECORDS.to_string(),
            name.clone(),
            o,
            testdata::wal(RECORDS, name),
            f.clone(),
        ));
    }
    out
}

fn records_segment(name: &str) -> (ScanOptions, Vec<u8>) {
    let facts = testdata::facts(RECORDS);
    let seg_size = facts["seg_size"].as_u64().unwrap() as u32;
    (opts(name, 15, seg_size), testdata::wal(RECORDS, name))
}

fn records_summary(name: &str) -> WalSummary {
    let (o, bytes) = records_segment(name);
    scan_segment(&bytes, o)
}

/// Every commit and abort of a segment, in order: fed 8 bytes at a time, at
/// most one record (24 bytes or more) completes per step, so each change of
/// `last_xact` is one record.
fn all_xacts(o: ScanOptions, bytes: &[u8]) -> Vec<XactMark> {
    let mut s = WalScanner::new(o);
    let mut out: Vec<XactMark> = Vec::new();
    for chunk in bytes.chunks(8) {
        s.feed(chunk);
        if let Some(m) = &s.summary.last_xact {
            if out.last() != Some(m) {
                out.push(m.clone());
            }
        }
    }
    out
}

#[test]
fn every_fixture_segment_scans_clean() {
    let records_facts = testdata::facts(RECORDS);
    let aborted = lsn(&records_facts["overwrite_contrecord"]["aborted_lsn"]);
    for (dir, name, o, bytes, f) in all_segments() {
        let s = scan_segment(&bytes, o);
        let what = format!("{dir}/{name}: {s:#?}");
        assert_eq!(s.format, SUMMARY_FORMAT, "{what}");
        assert!(s.crc_failures.is_empty(), "{what}");
        assert!(s.problems.is_empty(), "{what}");
        let waldump = f["waldump_records"].as_u64().unwrap();
        if dir == RECORDS {
            // pg_waldump over the whole archive, counted by segment: exact,
            // but for the record the crash cut, which pg_waldump never shows.
            let seg_end = Lsn(o.segment_start.0 + u64::from(o.seg_size));
            let cut_here = (o.segment_start..seg_end).contains(&aborted);
            assert_eq!(s.records, waldump + u64::from(cut_here), "{what}");
            assert_eq!(s.commits, f["commits"].as_u64().unwrap(), "{what}");
            assert_eq!(s.aborts, f["aborts"].as_u64().unwrap(), "{what}");
        } else {
            // pg_waldump of this file alone does not show a last record
            // that goes on into the next file.
            assert!(
                s.records == waldump || s.records == waldump + 1 && s.spanning > 0,
                "{what}"
            );
        }
        if let Some(first) = f["waldump_first_lsn"].as_str() {
            assert_eq!(s.first_record, Some(first.parse().unwrap()), "{what}");
        } else {
            assert_eq!(s.first_record, None, "{what}");
        }
    }
}

#[test]
fn commits_and_aborts_with_their_times() {
    let facts = testdata::facts(RECORDS);
    let mut xacts = Vec::new();
    for name in facts["segments"].as_array().unwrap() {
        let (o, bytes) = records_segment(name.as_str().unwrap());
        xacts.extend(all_xacts(o, &bytes));
    }
    for c in facts["commits"].as_array().unwrap() {
        let want = XactMark {
            lsn: lsn(&c["lsn"]),
            xid: c["xid"].as_u64().unwrap() as u32,
            time_us: c["time_us"].as_i64().unwrap(),
            commit: true,
        };
        assert!(xacts.contains(&want), "{want:?} not in {xacts:#?}");
    }
    let abort = xacts
        .iter()
        .find(|m| m.lsn == lsn(&facts["abort_lsn"]))
        .expect("the abort record");
    assert_eq!(abort.xid as u64, facts["abort_xid"].as_u64().unwrap());
    assert!(!abort.commit);
    // ROLLBACK PREPARED: the prepared transaction's xid, from the main data.
    let ap = &facts["abort_prepared"];
    let abort = xacts
        .iter()
        .find(|m| m.lsn == lsn(&ap["lsn"]))
        .expect("the abort prepared record");
    assert_eq!(abort.xid as u64, ap["xid"].as_u64().unwrap());
    assert!(!abort.commit);

    // first_xact and last_xact are the ends of that list.
    let first_seg = facts["segments"][0].as_str().unwrap();
    let (o, bytes) = records_segment(first_seg);
    let list = all_xacts(o, &bytes);
    let s = scan_segment(&bytes, o);
    assert_eq!(s.first_xact.as_ref(), list.first());
    assert_eq!(s.last_xact.as_ref(), list.last());
    assert_eq!(s.commits + s.aborts, list.len() as u64);
}

#[test]
fn every_commit_and_abort_is_kept_for_xid_targets() {
    // The same records first_xact/last_xact step through, in WAL order,
    // with the xid recovery matches: ROLLBACK PREPARED's is the prepared
    // transaction's, from the main data.
    let facts = testdata::facts(RECORDS);
    let mut ends = Vec::new();
    for name in facts["segments"].as_array().unwrap() {
        let (o, bytes) = records_segment(name.as_str().unwrap());
        let s = scan_segment(&bytes, o);
        let kept: Vec<XactEnd> = s
            .xact_ends
            .as_ref()
            .expect("a new summary keeps the xact ends")
            .iter()
            .expect("readable")
            .collect();
        let marks: Vec<XactEnd> = all_xacts(o, &bytes)
            .into_iter()
            .map(|m| XactEnd {
                xid: m.xid,
                lsn: m.lsn,
                commit: m.commit,
            })
            .collect();
        assert_eq!(kept, marks, "{name}");
        assert_eq!(kept.len() as u64, s.commits + s.aborts, "{name}");
        // And they survive the summary's JSON.
        let back: WalSummary = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        ends.extend(kept);
    }
    for c in facts["commits"].as_array().unwrap() {
        let want = XactEnd {
            lsn: lsn(&c["lsn"]),
            xid: c["xid"].as_u64().unwrap() as u32,
            commit: true,
        };
        assert!(ends.contains(&want), "{want:?} not in {ends:#?}");
    }
    let ap = &facts["abort_prepared"];
    assert!(ends.contains(&XactEnd {
        lsn: lsn(&ap["lsn"]),
        xid: ap["xid"].as_u64().unwrap() as u32,
        commit: false,
    }));
    assert!(ends.contains(&XactEnd {
        lsn: lsn(&facts["abort_lsn"]),
        xid: facts["abort_xid"].as_u64().unwrap() as u32,
        commit: false,
    }));
}

#[test]
fn a_summary_written_before_xact_ends_still_parses() {
    // Format 1, as archive-push wrote it before the field existed.
    let old = r#"{"format":1,"records":12,"first_record":"0/3000028","end_of_wal":"0/30001A0",
        "commits":1,"aborts":0,
        "first_xact":{"lsn":"0/3000100","xid":740,"time_us":1764000000000000,"commit":true},
        "last_xact":{"lsn":"0/3000100","xid":740,"time_us":1764000000000000,"commit":true},
        "restore_points":[],"timeline_switches":[],"xlog_switch":null,"spanning":0,
        "crc_failures":[],"problems":[],"overwritten_contrecords":[]}"#;
    let s: WalSummary = serde_json::from_str(old).unwrap();
    assert_eq!(s.format, 1);
    assert_eq!(s.commits, 1);
    assert!(s.xact_ends.is_none(), "unknown, not empty: {s:#?}");
}

#[test]
fn restore_points_by_name() {
    let facts = testdata::facts(RECORDS);
    let mut found = Vec::new();
    for name in facts["segments"].as_array().unwrap() {
        found.extend(records_summary(name.as_str().unwrap()).restore_points);
    }
    let want = facts["restore_points"].as_array().unwrap();
    assert_eq!(found.len(), want.len(), "{found:#?}");
    for w in want {
        let name = w["name"].as_str().unwrap();
        let rp = found
            .iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("restore point {name:?} not in {found:#?}"));
        assert_eq!(rp.lsn, lsn(&w["lsn"]), "{name}");
        // What pg_create_restore_point returned.
        assert_eq!(rp.end, lsn(&w["end"]), "{name}");
    }
    // Times in order, after the commits before them.
    let last_commit = facts["commits"].as_array().unwrap().last().unwrap()["time_us"]
        .as_i64()
        .unwrap();
    assert!(found[0].time_us >= last_commit && found[1].time_us >= found[0].time_us);
}

#[test]
fn promotion_is_a_timeline_switch() {
    let facts = testdata::facts("pg15");
    let p = &facts["promotion"];
    let switch_point = lsn(&p["switch_point"]);
    let name = p["first_new_timeline_segment"].as_str().unwrap();
    let seg_size = facts["wal"][name]["xlp_seg_size"].as_u64().unwrap() as u32;
    let s = scan_segment(&testdata::wal("pg15", name), opts(name, 15, seg_size));
    assert_eq!(
        s.timeline_switches,
        vec![TimelineSwitch {
            lsn: switch_point,
            from: 1,
            to: 2,
            time_us: s.timeline_switches.first().and_then(|t| t.time_us),
        }],
        "{s:#?}"
    );
    assert!(s.timeline_switches[0].time_us.unwrap() > 0);
    assert!(s.problems.is_empty());

    // The old timeline's .partial: ends quietly where timeline 2 branched.
    let name = p["partial"].as_str().unwrap();
    let s = scan_segment(&testdata::wal("pg15", name), opts(name, 15, seg_size));
    assert!(s.problems.is_empty(), "{s:#?}");
    assert!(s.timeline_switches.is_empty());
    let last = lsn(&facts["wal"][name]["waldump_last_lsn"]);
    assert!(s.end_of_wal.unwrap() > last && s.end_of_wal.unwrap() <= switch_point);

    // The same file, taken as a finished segment: ending early is a problem.
    let mut o = opts(name, 15, seg_size);
    o.partial = false;
    let s = scan_segment(&testdata::wal("pg15", name), o);
    assert_eq!(s.problems.len(), 1, "{s:#?}");
    assert!(s.problems[0].contains("before the end of the segment"));
}

#[test]
fn point_in_time_recovery_is_a_timeline_switch() {
    let facts = testdata::facts(RECORDS);
    let ck = &facts["end_of_recovery_checkpoint"];
    let s = records_summary(ck["segment"].as_str().unwrap());
    assert!(s.problems.is_empty() && s.crc_failures.is_empty(), "{s:#?}");
    assert_eq!(s.timeline_switches.len(), 1, "{s:#?}");
    let t = &s.timeline_switches[0];
    assert_eq!(
        (t.lsn, t.from, t.to),
        (
            lsn(&ck["lsn"]),
            ck["from"].as_u64().unwrap() as u32,
            ck["to"].as_u64().unwrap() as u32
        )
    );
    // The segment begins with timeline 1's WAL up to the recovery target,
    // copied; the checkpoint's time (whole seconds) is not before it.
    let rp = s
        .restore_points
        .iter()
        .find(|r| r.name == "before_drop")
        .expect("the recovery target, copied into timeline 2");
    let time = t.time_us.expect("a checkpoint has a time");
    assert_eq!(time % 1_000_000, 0);
    assert!(time >= rp.time_us / 1_000_000 * 1_000_000 && time < rp.time_us + 3_600_000_000);
}

#[test]
fn xlog_switch_ends_the_segment() {
    let facts = testdata::facts(RECORDS);
    let switches = facts["xlog_switches"].as_object().unwrap();
    assert!(!switches.is_empty());
    for name in facts["segments"].as_array().unwrap() {
        let name = name.as_str().unwrap();
        let s = records_summary(name);
        assert_eq!(s.xlog_switch, switches.get(name).map(lsn), "{name}");
        if let Some(switch) = s.xlog_switch {
            // XLOG_SWITCH is a bare 24-byte header, the segment's last record.
            assert_eq!(s.end_of_wal, Some(Lsn(switch.0 + 24)));
        }
    }
}

#[test]
fn a_record_across_two_segment_boundaries() {
    let facts = testdata::facts(RECORDS);
    let big = lsn(&facts["big_message"]["lsn"]);
    let seg_size = facts["seg_size"].as_u64().unwrap();
    let segno = big.0 / seg_size;
    let end = lsn(&facts["big_message_end"]);
    assert!(
        end.0 / seg_size >= segno + 2,
        "the fixture's message is too short"
    );
    for name in facts["segments"].as_array().unwrap() {
        let name = name.as_str().unwrap();
        let (o, bytes) = records_segment(name);
        let this = o.segment_start.0 / seg_size;
        if this < segno || this > end.0 / seg_size {
            continue;
        }
        let s = scan_segment(&bytes, o);
        assert!(s.crc_failures.is_empty() && s.problems.is_empty(), "{s:#?}");
        assert!(s.spanning >= 1, "{name}: {s:#?}");
        if this == segno {
            // It starts here: counted as a record, the last one.
            assert!(s.first_record.unwrap() <= big, "{name}");
            assert!(s.end_of_wal.unwrap() <= big, "{name}");
        } else if this < end.0 / seg_size {
            // Wholly inside the record.
            assert_eq!(
                (s.records, s.spanning, s.end_of_wal),
                (0, 1, None),
                "{name}"
            );
        } else {
            // The next record starts where pg_logical_emit_message said.
            assert_eq!(s.first_record, Some(end), "{name}");
        }
    }
}

#[test]
fn a_record_header_across_a_segment_boundary() {
    let facts = testdata::facts(RECORDS);
    let at = lsn(&facts["split_header_lsn"]);
    let seg_size = facts["seg_size"].as_u64().unwrap() as u32;
    // Only xl_tot_len and xl_xid are in the first file.
    assert_eq!(seg_size - at.segment_offset(seg_size), 16);
    let first = WalFileName::for_segment(crate::pg::TimelineId(1), at.segno(seg_size), seg_size);
    let next = WalFileName::for_segment(
        crate::pg::TimelineId(1),
        at.segno(seg_size).next(),
        seg_size,
    );
    let (o, bytes) = records_segment(first.as_str());
    let s = scan_segment(&bytes, o);
    assert!(s.crc_failures.is_empty() && s.problems.is_empty(), "{s:#?}");
    // It, and one continued from the segment before if the first page says
    // so (xlp_info, the u16 at offset 2).
    let continued = u16::from_le_bytes([bytes[2], bytes[3]]) & XLP_FIRST_IS_CONTRECORD != 0;
    assert_eq!(s.spanning, 1 + u32::from(continued), "{s:#?}");
    // Counted where it starts; the last complete record ends where it starts.
    assert_eq!(s.end_of_wal, Some(at));
    let f = &facts["wal"][first.as_str()];
    assert_eq!(s.records, f["waldump_records"].as_u64().unwrap());
    assert_eq!(
        Some(at),
        f["waldump_last_lsn"].as_str().map(|l| l.parse().unwrap())
    );
    let s = records_summary(next.as_str());
    assert!(s.crc_failures.is_empty() && s.problems.is_empty(), "{s:#?}");
    assert_eq!(s.spanning, 1, "{s:#?}");
    assert!(s.first_record.unwrap() > at);
}

#[test]
fn overwrite_contrecord() {
    let facts = testdata::facts(RECORDS);
    let ow = &facts["overwrite_contrecord"];
    // The segment the crash cut: its last record goes on nowhere.
    let cut = records_summary(facts["cut_segment"].as_str().unwrap());
    assert!(
        cut.crc_failures.is_empty() && cut.problems.is_empty(),
        "{cut:#?}"
    );
    assert_eq!(cut.spanning, 1);
    assert!(cut.end_of_wal.unwrap() <= lsn(&ow["aborted_lsn"]));
    // The segment recovery wrote after it: its first page says so
    // (xlp_info, the u16 at offset 2), so the fixture exercises the flag.
    let (o, bytes) = records_segment(facts["overwrite_segment"].as_str().unwrap());
    let xlp_info = u16::from_le_bytes([bytes[2], bytes[3]]);
    assert_ne!(xlp_info & XLP_FIRST_IS_OVERWRITE_CONTRECORD, 0);
    let s = scan_segment(&bytes, o);
    assert!(s.crc_failures.is_empty() && s.problems.is_empty(), "{s:#?}");
    assert_eq!(s.spanning, 0);
    assert_eq!(s.first_record, Some(lsn(&ow["lsn"])));
    assert_eq!(s.overwritten_contrecords, vec![lsn(&ow["aborted_lsn"])]);
}

#[test]
fn a_flipped_byte_fails_that_records_crc() {
    let facts = testdata::facts(RECORDS);
    let (o, mut bytes) = records_segment(facts["segments"][0].as_str().unwrap());
    let clean = scan_segment(&bytes, o);
    for c in facts["commits"].as_array().unwrap() {
        let at = lsn(&c["lsn"]);
        let off = (at.0 - o.segment_start.0) as usize;
        // A byte of xact_time, in the record's main data.
        let tot_len = u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap()) as usize;
        let flip = off + tot_len - 1;
        bytes[flip] ^= 0x40;
        let s = scan_segment(&bytes, o);
        bytes[flip] ^= 0x40;
        assert_eq!(s.crc_failures, vec![at]);
        assert!(s.problems.is_empty(), "{s:#?}");
        // Still counted as a record, not decoded as a commit.
        assert_eq!(s.records, clean.records);
        assert_eq!(s.commits, clean.commits - 1);
    }
    // A flipped byte of a header's xl_info is covered too.
    let at = lsn(&facts["restore_points"][0]["lsn"]);
    let off = (at.0 - o.segment_start.0) as usize;
    bytes[off + 16] ^= 0x01;
    let s = scan_segment(&bytes, o);
    assert_eq!(s.crc_failures, vec![at]);
    assert_eq!(s.restore_points.len(), clean.restore_points.len() - 1);
    bytes[off + 16] ^= 0x01;

    // A flipped xl_tot_len loses the way through the segment: a CRC failure
    // and then an end of WAL (xl_prev or the next page's continuation no
    // longer fit), never a record read from the wrong bytes.
    let at = lsn(&facts["commits"][0]["lsn"]);
    let off = (at.0 - o.segment_start.0) as usize;
    for bit in [0x08u8, 0x40] {
        bytes[off + 1] ^= bit;
        let s = scan_segment(&bytes, o);
        bytes[off + 1] ^= bit;
        assert_eq!(s.problems.len(), 1, "{s:#?}");
        assert!(
            s.problems[0].contains("before the end of the segment"),
            "{s:#?}"
        );
        assert!(s.records < clean.records);
    }
}

#[test]
fn results_do_not_depend_on_chunking() {
    for (dir, name, o, bytes, _) in all_segments() {
        let whole = scan_segment(&bytes, o);
        for size in [1, 7, 8191] {
            let mut s = WalScanner::new(o);
            for chunk in bytes.chunks(size) {
                s.feed(chunk);
            }
            assert_eq!(s.finish(), whole, "{dir}/{name} in {size}-byte chunks");
        }
        // Through io::Write, as the archive-push tee uses it.
        let mut s = WalScanner::new(o);
        std::io::copy(&mut &bytes[..], &mut s).unwrap();
        assert_eq!(s.finish(), whole, "{dir}/{name} through io::copy");
    }
}

#[test]
fn garbage_never_panics() {
    let mut noise = Noise(0x9E37_79B9_7F4A_7C15);
    let (o, real) = records_segment(testdata::facts(RECORDS)["segments"][0].as_str().unwrap());
    // Random bytes, with and without a real first page header before them.
    for with_header in [false, true] {
        let mut bytes: Vec<u8> = (0..o.seg_size).map(|_| noise.next() as u8).collect();
        if with_header {
            bytes[..40].copy_from_slice(&real[..40]);
        }
        let s = scan_segment(&bytes, o);
        assert!(!s.problems.is_empty(), "{s:#?}");
    }
    // Truncated files: a problem, never a panic.
    for len in [0, 1, 39, 40, 41, 8191, 8192, 8200, 100_000, real.len() - 1] {
        let s = scan_segment(&real[..len], o);
        assert!(
            s.problems.iter().any(|p| p.contains("short of")),
            "{len}: {s:#?}"
        );
    }
    // Too long: a problem too.
    let mut long = real.clone();
    long.push(0);
    assert!(!scan_segment(&long, o).problems.is_empty());
    // Flipped bytes and runs of noise anywhere, mostly where records are.
    let used = 0x2000 * 2;
    for round in 0..300 {
        let mut bytes = real.clone();
        for _ in 0..1 + round % 4 {
            let at = if round % 3 == 0 {
                noise.below(bytes.len())
            } else {
                noise.below(used)
            };
            let n = 1 + noise.below(if round % 5 == 0 { 64 } else { 1 });
            for b in bytes.iter_mut().skip(at).take(n) {
                *b ^= (noise.next() as u8) | 1;
            }
        }
        let mut s = WalScanner::new(o);
        for chunk in bytes.chunks(1 + noise.below(9000)) {
            s.feed(chunk);
        }
        let _ = s.finish();
        // Every other major's options on the same bytes.
        let _ = scan_segment(
            &bytes,
            ScanOptions {
                major: 14 + (round % 5) as u32,
                ..o
            },
        );
    }
    // A segment start where LSN arithmetic would overflow.
    let s = scan_segment(
        &real,
        ScanOptions {
            segment_start: Lsn(u64::MAX - 4096),
            ..o
        },
    );
    assert!(!s.problems.is_empty());
    // Nonsense options.
    for (major, seg_size) in [(13, o.seg_size), (15, 0), (15, 3), (15, 4096)] {
        let s = scan_segment(
            &real,
            ScanOptions {
                major,
                seg_size,
                ..o
            },
        );
        assert!(!s.problems.is_empty());
    }
}

#[test]
fn summary_json() {
    let s = records_summary(testdata::facts(RECORDS)["segments"][0].as_str().unwrap());
    let json = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<WalSummary>(&json).unwrap(), s);
    // LSNs as PostgreSQL shows them.
    assert!(json.contains(&format!("\"first_record\":\"{}\"", s.first_record.unwrap())));
    // Older or smaller JSON still parses.
    let old: WalSummary = serde_json::from_str(r#"{"format":1,"records":3}"#).unwrap();
    assert_eq!(old.records, 3);
    assert!(old.overwritten_contrecords.is_empty());
}
