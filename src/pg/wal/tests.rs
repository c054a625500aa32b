use std::collections::BTreeSet;

use super::*;
use crate::pg::testdata;

const MIB: u32 = 1 << 20;
const SEG16: u32 = 16 << 20;
const GIB: u32 = 1 << 30;

fn name(s: &str) -> WalFileName {
    WalFileName::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn reason(s: &str) -> String {
    match WalFileName::parse(s) {
        Err(PgError::InvalidWalFileName { reason, .. }) => reason,
        other => panic!("{s:?} gave {other:?}"),
    }
}

#[test]
fn parses_every_kind() {
    let n = name("000000010000000A000000FF");
    assert_eq!(n.kind(), WalFileKind::Segment);
    assert_eq!(n.timeline(), TimelineId(1));
    assert_eq!(n.as_str(), "000000010000000A000000FF");
    assert_eq!(n.segment_name(), Some("000000010000000A000000FF"));
    assert_eq!(n.dir_part(), "000000010000000A");
    assert!(n.is_wal_data());

    let n = name("000000030000000A000000FF.partial");
    assert_eq!(n.kind(), WalFileKind::Partial);
    assert_eq!(n.timeline(), TimelineId(3));
    assert_eq!(n.segment_name(), Some("000000030000000A000000FF"));
    assert_eq!(n.dir_part(), "000000030000000A");
    assert!(n.is_wal_data());

    let n = name("0000000A.history");
    assert_eq!(n.kind(), WalFileKind::History);
    assert_eq!(n.timeline(), TimelineId(10));
    assert_eq!(n.segment_name(), None);
    assert_eq!(n.dir_part(), "history");
    assert_eq!(n.segno(SEG16), None);
    assert_eq!(n.start_lsn(SEG16), None);
    assert!(!n.is_wal_data());

    let n = name("000000010000000000000002.00000028.backup");
    assert_eq!(n.kind(), WalFileKind::BackupLabel);
    assert_eq!(n.timeline(), TimelineId(1));
    assert_eq!(n.segment_name(), Some("000000010000000000000002"));
    assert_eq!(n.dir_part(), "0000000100000000");
    assert_eq!(n.start_lsn(SEG16), Some(Lsn(0x0200_0000)));
    assert_eq!(n.backup_start_lsn(SEG16), Some(Lsn(0x0200_0028)));
    assert!(!n.is_wal_data());
}

#[test]
fn rejects_what_postgresql_never_writes() {
    assert!(reason("000000010000000a000000ff").contains("lower-case hex"));
    assert!(reason("00000001000000000000000a.partial").contains("upper case"));
    assert!(reason("0000000a.history").contains("lower-case"));
    assert!(reason("00000000000000000000000A").contains("timeline 0"));
    assert!(reason("00000000.history").contains("timeline 0"));
    assert!(reason("000000010000000000001000").contains("beyond 00000FFF"));
    for bad in [
        "",
        "0000000100000000000000",
        "0000000100000000000000011",
        "00000001000000000000000G",
        "00000001 000000000000001",
        "00000001000000000000000.partial",
        "000000010000000000000001.partial.partial",
        "000000010000000000000001.history",
        "1.history",
        "00000002.history.partial",
        "000000010000000000000002.backup",
        "000000010000000000000002.0000028.backup",
        "000000010000000000000002-00000028.backup",
        "000000010000000000000002.0000002g.backup",
        "000000010000000000000001.ready",
        "000000010000000000000001.gz",
        "archive_status",
        "00000001000000000000000１",
    ] {
        let e = WalFileName::parse(bad).unwrap_err();
        assert!(
            matches!(e, PgError::InvalidWalFileName { .. }),
            "{bad:?}: {e:?}"
        );
    }
    assert_eq!(
        WalFileName::parse("000000010000000a000000ff")
            .unwrap_err()
            .to_string(),
        "invalid WAL file name \"000000010000000a000000ff\": lower-case hex in the log part: \
         PostgreSQL writes WAL file names in upper case"
    );
    assert_eq!(
        WalFileName::parse("pg_wal").unwrap_err().to_string(),
        "invalid WAL file name \"pg_wal\": expected a WAL segment (24 hex digits), a .partial \
         segment, a .history file (8 hex digits) or a .backup file"
    );
}

#[test]
fn segment_numbers_for_each_size() {
    let n = name("000000010000000A000000FF");
    // 16 MiB: 256 segments per log unit
    assert_eq!(n.segno(SEG16), Some(SegmentNo(0xA * 256 + 0xFF)));
    assert_eq!(n.start_lsn(SEG16), Some("A/FF000000".parse().unwrap()));
    // 1 MiB: 4096 per log unit
    assert_eq!(n.segno(MIB), Some(SegmentNo(0xA * 4096 + 0xFF)));
    assert_eq!(n.start_lsn(MIB), Some("A/FF00000".parse().unwrap()));
    // 1 GiB: 4 per log unit; segment part FF cannot exist
    assert_eq!(n.segno(GIB), None);
    assert_eq!(n.start_lsn(GIB), None);
    let n = name("000000020000000300000003");
    assert_eq!(n.segno(GIB), Some(SegmentNo(15)));
    assert_eq!(n.start_lsn(GIB), Some("3/C0000000".parse().unwrap()));
    // with 16 MiB, segment parts stop at 000000FF
    assert_eq!(name("000000010000000000000100").segno(SEG16), None);
    assert_eq!(
        name("000000010000000000000100").segno(MIB),
        Some(SegmentNo(256))
    );
}

#[test]
fn builds_names_like_postgresql() {
    for seg_size in [MIB, SEG16, GIB] {
        for segno in [0, 1, 3, 255, 256, 4095, 4096, 123_456] {
            let segno = SegmentNo(segno);
            let n = WalFileName::for_segment(TimelineId(2), segno, seg_size);
            let parsed = name(n.as_str());
            assert_eq!(parsed, n);
            assert_eq!(parsed.kind(), WalFileKind::Segment);
            assert_eq!(parsed.segno(seg_size), Some(segno), "{n} {seg_size}");
            assert_eq!(parsed.start_lsn(seg_size), Some(segno.start_lsn(seg_size)));
            assert_eq!(parsed.start_lsn(seg_size).unwrap().segno(seg_size), segno);
            let p = WalFileName::partial(TimelineId(2), segno, seg_size);
            assert_eq!(p.as_str(), format!("{n}.partial"));
            assert_eq!(name(p.as_str()), p);
            assert_eq!(p.kind(), WalFileKind::Partial);
        }
    }
    assert_eq!(
        WalFileName::for_segment(TimelineId(1), SegmentNo(0xA * 256 + 0xFF), SEG16).as_str(),
        "000000010000000A000000FF"
    );
    assert_eq!(
        WalFileName::for_segment(TimelineId(0x1F), SegmentNo(0xA * 4096 + 0xFF), MIB).as_str(),
        "0000001F0000000A000000FF"
    );
    assert_eq!(
        WalFileName::history(TimelineId(2)).as_str(),
        "00000002.history"
    );
    assert_eq!(
        WalFileName::history(TimelineId(2)),
        name("00000002.history")
    );
    let b = WalFileName::backup_label(TimelineId(1), "0/2000028".parse().unwrap(), SEG16);
    assert_eq!(b.as_str(), "000000010000000000000002.00000028.backup");
    assert_eq!(b, name(b.as_str()));
}

#[test]
fn backup_history_name_of_the_fixture() {
    // pg_backup_stop named the file from the backup's start LSN
    let facts = testdata::facts("pg15");
    let backup = &facts["backup"];
    let start: Lsn = backup["start_lsn"].as_str().unwrap().parse().unwrap();
    let n = name(backup["history_file"].as_str().unwrap());
    assert_eq!(n.kind(), WalFileKind::BackupLabel);
    assert_eq!(n.backup_start_lsn(MIB), Some(start));
    assert_eq!(WalFileName::backup_label(TimelineId(1), start, MIB), n);
}

#[test]
fn orders_by_timeline_then_name() {
    let names: BTreeSet<WalFileName> = [
        "00000002000000000000001E",
        "00000002.history",
        "00000001000000000000001E.partial",
        "00000001000000000000001E",
        "000000010000000000000015.00000028.backup",
        "000000010000000000000015",
        "00000001000000000000001D",
        "0000000A.history",
        "00000003000000000000001F",
    ]
    .into_iter()
    .map(name)
    .collect();
    let sorted: Vec<&str> = names.iter().map(|n| n.as_str()).collect();
    assert_eq!(
        sorted,
        [
            "000000010000000000000015",
            "000000010000000000000015.00000028.backup",
            "00000001000000000000001D",
            "00000001000000000000001E",
            "00000001000000000000001E.partial",
            "00000002.history",
            "00000002000000000000001E",
            "00000003000000000000001F",
            "0000000A.history",
        ]
    );
}

#[test]
fn string_forms_and_serde() {
    let n: WalFileName = "000000010000000A000000FF".parse().unwrap();
    assert_eq!(n.to_string(), "000000010000000A000000FF");
    let j = serde_json::to_string(&n).unwrap();
    assert_eq!(j, "\"000000010000000A000000FF\"");
    assert_eq!(serde_json::from_str::<WalFileName>(&j).unwrap(), n);
    assert!(serde_json::from_str::<WalFileName>("\"nope\"").is_err());

    assert_eq!(TimelineId(2).hex8(), "00000002");
    assert_eq!(TimelineId(0xAB).hex8(), "000000AB");
    assert_eq!(TimelineId(171).to_string(), "171");
    assert_eq!("171".parse(), Ok(TimelineId(171)));
    assert!("0".parse::<TimelineId>().is_err());
    assert!("0x2".parse::<TimelineId>().is_err());
    assert!("-1".parse::<TimelineId>().is_err());
    assert!("4294967296".parse::<TimelineId>().is_err());
    assert_eq!(serde_json::to_string(&TimelineId(2)).unwrap(), "2");
    assert_eq!(
        serde_json::from_str::<TimelineId>("2").unwrap(),
        TimelineId(2)
    );
    assert_eq!(SegmentNo(5).next(), SegmentNo(6));
    assert_eq!(SegmentNo(0).prev(), None);
}

/// Every WAL data file in the fixtures with what the fixture script read
/// from its header bytes and from pg_waldump.
fn fixture_segments() -> Vec<(&'static str, u32, String, serde_json::Value, Vec<u8>)> {
    let mut out = Vec::new();
    for (dir, major) in testdata::MAJORS {
        let facts = testdata::facts(dir);
        for (file, wal) in facts["wal"].as_object().unwrap() {
            if wal.get("magic").is_some() {
                let bytes = testdata::wal(dir, file);
                out.push((*dir, *major, file.clone(), wal.clone(), bytes));
            }
        }
    }
    assert!(out.len() >= 9, "fixtures hold WAL of every major");
    out
}

fn system_id(dir: &str) -> u64 {
    testdata::facts(dir)["control_files"]["pg_control"]["system_identifier"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn long_headers_of_real_segments() {
    for (dir, major, file, wal, bytes) in fixture_segments() {
        let ctx = format!("{dir}/{file}");
        let h = parse_long_page_header(&bytes).unwrap_or_else(|e| panic!("{ctx}: {e}"));
        assert_eq!(u64::from(h.magic), wal["magic"].as_u64().unwrap(), "{ctx}");
        assert_eq!(major_for_wal_magic(h.magic), Some(major), "{ctx}");
        assert_eq!(
            u64::from(h.info),
            wal["xlp_info"].as_u64().unwrap(),
            "{ctx}"
        );
        assert_eq!(
            u64::from(h.tli.0),
            wal["xlp_tli"].as_u64().unwrap(),
            "{ctx}"
        );
        assert_eq!(
            h.pageaddr.to_string(),
            wal["xlp_pageaddr"].as_str().unwrap(),
            "{ctx}"
        );
        assert_eq!(
            u64::from(h.rem_len),
            wal["xlp_rem_len"].as_u64().unwrap(),
            "{ctx}"
        );
        assert_eq!(
            h.system_identifier.to_string(),
            wal["xlp_sysid"].as_str().unwrap()
        );
        assert_eq!(
            h.system_identifier,
            system_id(dir),
            "{ctx}: pg_controldata's"
        );
        assert_eq!(h.seg_size, MIB, "{ctx}");
        assert_eq!(h.xlog_blcksz, 8192, "{ctx}");
        assert_eq!(bytes.len(), MIB as usize, "{ctx}");

        let n = name(&file);
        assert_eq!(n.start_lsn(MIB), Some(h.pageaddr), "{ctx}");
        // pg_waldump's first record is in this segment
        let first: Lsn = wal["waldump_first_lsn"].as_str().unwrap().parse().unwrap();
        assert_eq!(first.segno(MIB), n.segno(MIB).unwrap(), "{ctx}");

        let expect = SegmentExpectation {
            major,
            system_identifier: system_id(dir),
            seg_size: MIB,
        };
        assert_eq!(validate_segment_start(&n, &bytes, &expect), Ok(h), "{ctx}");
        // only the first page is needed
        assert_eq!(validate_segment_start(&n, &bytes[..8192], &expect), Ok(h));
        assert_eq!(validate_segment_start(&n, &bytes[..40], &expect), Ok(h));
    }
}

#[test]
fn first_segment_of_a_new_timeline_starts_with_old_timeline_pages() {
    let facts = testdata::facts("pg15");
    let file = facts["promotion"]["first_new_timeline_segment"]
        .as_str()
        .unwrap();
    let n = name(file);
    assert_eq!(n.timeline(), TimelineId(2));
    let bytes = testdata::wal("pg15", file);
    let expect = SegmentExpectation {
        major: 15,
        system_identifier: system_id("pg15"),
        seg_size: MIB,
    };
    let h = validate_segment_start(&n, &bytes, &expect).unwrap();
    assert_eq!(
        h.tli,
        TimelineId(1),
        "the copied first page keeps timeline 1"
    );
    // later pages, written after the promotion, are on timeline 2
    let page_tlis: BTreeSet<u32> = bytes
        .chunks(8192)
        .filter(|p| p[..2] == h.magic.to_le_bytes())
        .map(|p| u32::from_le_bytes(p[4..8].try_into().unwrap()))
        .collect();
    assert_eq!(page_tlis, BTreeSet::from([1, 2]));
    // the switch point (from the history file) is inside this segment
    let switch: Lsn = facts["promotion"]["switch_point"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(switch.segno(MIB), n.segno(MIB).unwrap());

    // The .partial of timeline 1 for the same segment is valid too, and
    // holds the same bytes up to the switch point.
    let partial_name = name(facts["promotion"]["partial"].as_str().unwrap());
    assert_eq!(partial_name.kind(), WalFileKind::Partial);
    assert_eq!(partial_name.segno(MIB), n.segno(MIB));
    let partial = testdata::wal("pg15", partial_name.as_str());
    validate_segment_start(&partial_name, &partial, &expect).unwrap();
    let upto = switch.segment_offset(MIB) as usize;
    assert_eq!(partial[..upto], bytes[..upto]);
}

fn pg15_segment() -> (WalFileName, Vec<u8>, SegmentExpectation) {
    let facts = testdata::facts("pg15");
    let file = facts["pgbench_init_segment"].as_str().unwrap();
    let expect = SegmentExpectation {
        major: 15,
        system_identifier: system_id("pg15"),
        seg_size: MIB,
    };
    (name(file), testdata::wal("pg15", file), expect)
}

#[test]
fn refuses_wal_of_another_major() {
    let facts = testdata::facts("pg14");
    let (file, _) = facts["wal"].as_object().unwrap().iter().next().unwrap();
    let bytes = testdata::wal("pg14", file);
    let expect = SegmentExpectation {
        major: 15,
        system_identifier: system_id("pg14"),
        seg_size: MIB,
    };
    let e = validate_segment_start(&name(file), &bytes, &expect).unwrap_err();
    assert_eq!(
        e.to_string(),
        "WAL page magic 0xD10D is PostgreSQL 14's, but the stanza is PostgreSQL 15"
    );
}

#[test]
fn refuses_wal_of_another_cluster() {
    let (n, bytes, mut expect) = pg15_segment();
    let ours = expect.system_identifier;
    expect.system_identifier = system_id("pg16");
    let e = validate_segment_start(&n, &bytes, &expect).unwrap_err();
    assert_eq!(
        e,
        PgError::SystemIdMismatch {
            found: ours,
            expected: system_id("pg16")
        }
    );
    assert!(e.to_string().contains("WAL of another cluster"), "{e}");
}

#[test]
fn refuses_other_segment_sizes() {
    let (n, bytes, mut expect) = pg15_segment();
    expect.seg_size = SEG16;
    // 0x14 is a valid 16 MiB segment name too; its header says 1 MiB
    let e = validate_segment_start(&n, &bytes, &expect).unwrap_err();
    assert_eq!(
        e,
        PgError::SegmentSizeMismatch {
            found: MIB,
            expected: SEG16
        }
    );
    expect.seg_size = 3 << 20;
    assert_eq!(
        validate_segment_start(&n, &bytes, &expect).unwrap_err(),
        PgError::InvalidSegmentSize { size: 3 << 20 }
    );
}

#[test]
fn refuses_renamed_segments() {
    let (n, bytes, expect) = pg15_segment();
    let next = WalFileName::for_segment(n.timeline(), n.segno(MIB).unwrap().next(), MIB);
    let e = validate_segment_start(&next, &bytes, &expect).unwrap_err();
    assert_eq!(
        e.to_string(),
        "first WAL page is at 0/1400000, but the file name says the segment starts at \
         0/1500000: renamed or recycled file"
    );
    let partial = name(&format!("{next}.partial"));
    assert!(matches!(
        validate_segment_start(&partial, &bytes, &expect),
        Err(PgError::PageAddrMismatch { .. })
    ));
}

#[test]
fn page_timeline_may_be_older_but_not_newer() {
    let (n, mut bytes, expect) = pg15_segment();
    // the same page under a timeline-3 name: fine (older page timeline)
    let later = WalFileName::for_segment(TimelineId(3), n.segno(MIB).unwrap(), MIB);
    assert!(validate_segment_start(&later, &bytes, &expect).is_ok());
    // a page claiming timeline 3 under a timeline-1 name is not
    bytes[4..8].copy_from_slice(&3u32.to_le_bytes());
    assert_eq!(
        validate_segment_start(&n, &bytes, &expect).unwrap_err(),
        PgError::PageTimelineAhead {
            found: TimelineId(3),
            name_timeline: TimelineId(1)
        }
    );
    bytes[4..8].copy_from_slice(&0u32.to_le_bytes());
    assert_eq!(
        validate_segment_start(&n, &bytes, &expect).unwrap_err(),
        PgError::PageTimelineZero
    );
}

#[test]
fn refuses_what_is_not_a_segment_start() {
    let (n, bytes, expect) = pg15_segment();
    // too short
    assert_eq!(
        parse_long_page_header(&bytes[..39])
            .unwrap_err()
            .to_string(),
        "WAL long page header needs 40 bytes, got 39"
    );
    assert!(matches!(
        validate_segment_start(&n, &[], &expect),
        Err(PgError::Truncated { .. })
    ));
    // the second page of a segment has a short header
    let e = validate_segment_start(&n, &bytes[8192..], &expect).unwrap_err();
    assert!(matches!(e, PgError::NoLongHeader { .. }), "{e:?}");
    assert!(e.to_string().contains("not the start of a WAL segment"));
    // zeros, e.g. a file pre-allocated but never written
    let e = validate_segment_start(&n, &[0u8; 8192], &expect).unwrap_err();
    assert_eq!(
        e.to_string(),
        "WAL page magic 0x0000 is not one of PostgreSQL 14 to 18: not a WAL segment"
    );
    // big-endian
    let mut swapped = bytes[..8192].to_vec();
    swapped.swap(0, 1);
    assert_eq!(
        parse_long_page_header(&swapped).unwrap_err(),
        PgError::BigEndian {
            what: "WAL segment"
        }
    );
    // unknown flag bits
    let mut flags = bytes[..8192].to_vec();
    flags[3] = 0x80;
    assert!(matches!(
        parse_long_page_header(&flags),
        Err(PgError::UnknownPageFlags { info: 0x8007 })
    ));
    // block size
    let mut blck = bytes[..8192].to_vec();
    blck[36..40].copy_from_slice(&16384u32.to_le_bytes());
    assert_eq!(
        validate_segment_start(&n, &blck, &expect).unwrap_err(),
        PgError::WalBlockSize { found: 16384 }
    );
    // names of files without WAL pages
    for other in [
        "00000002.history",
        "000000010000000000000015.00000028.backup",
    ] {
        let e = validate_segment_start(&name(other), &bytes, &expect).unwrap_err();
        assert!(matches!(e, PgError::NotASegment { .. }), "{e:?}");
    }
    assert_eq!(
        validate_segment_start(&name("00000002.history"), &bytes, &expect)
            .unwrap_err()
            .to_string(),
        "00000002.history is a timeline history file, not a WAL segment"
    );
    // a stanza of an unsupported major
    let old = SegmentExpectation {
        major: 13,
        ..expect
    };
    assert_eq!(
        validate_segment_start(&n, &bytes, &old).unwrap_err(),
        PgError::UnsupportedMajor { major: 13 }
    );
}
