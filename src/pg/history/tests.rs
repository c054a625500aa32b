use super::*;
use crate::pg::testdata;

const MIB: u32 = 1 << 20;
const SEG16: u32 = 16 << 20;

fn lsn(s: &str) -> Lsn {
    s.parse().unwrap()
}

fn tl(v: u32) -> TimelineId {
    TimelineId(v)
}

fn departure(at: &str, to: u32) -> Option<Departure> {
    Some(Departure {
        at: lsn(at),
        to: tl(to),
    })
}

fn span(timeline: u32, begin: &str, end: Option<&str>) -> TimelineSpan {
    TimelineSpan {
        timeline: tl(timeline),
        begin: if begin.is_empty() {
            Lsn::INVALID
        } else {
            lsn(begin)
        },
        end: end.map(lsn),
    }
}

#[test]
fn parses_the_fixture_written_at_promotion() {
    let facts = testdata::facts("pg15");
    let text = testdata::read_text("pg15/wal/00000002.history");
    let h = parse_history(tl(2), &text).unwrap();
    let switch = lsn(facts["promotion"]["switch_point"].as_str().unwrap());
    assert_eq!(
        h.entries,
        [HistoryEntry {
            parent: tl(1),
            switch_point: switch,
            reason: "no recovery target specified".to_string(),
        }]
    );
    assert_eq!(h.to_text(), text);
    assert_eq!(h.parent_of(tl(2)), Some(tl(1)));
    assert_eq!(h.parent_of(tl(1)), None);
    assert_eq!(h.switch_point_into(tl(2)), Some(switch));
    assert_eq!(h.end_of(tl(1)), Some(switch));
    assert_eq!(h.end_of(tl(2)), None);
    // The segment holding the switch point is read from timeline 2 (the
    // fixture's 00000002 file of that segment), then from timeline 1.
    let segno = switch.segno(MIB);
    assert_eq!(h.timelines_for_segment(segno, MIB), [tl(2), tl(1)]);
    assert_eq!(
        facts["promotion"]["first_new_timeline_segment"],
        crate::pg::WalFileName::for_segment(tl(2), segno, MIB).as_str()
    );
    assert_eq!(h.timelines_for_segment(segno.prev().unwrap(), MIB), [tl(1)]);
    assert_eq!(h.timeline_at(switch), tl(2));
    assert_eq!(h.timeline_at(Lsn(switch.0 - 1)), tl(1));
    // The fixture's first timeline-2 segment opens with the promotion's
    // end-of-recovery record, at the switch point, from timeline 1.
    assert!(h.begins_with_switch(switch, tl(1), tl(2), MIB));
    assert!(!h.begins_with_switch(switch + 8, tl(1), tl(2), MIB));
}

const THREE: &str = "# written by hand\n\
                     1\t0/3000000\tno recovery target specified\n\
                     \n\
                     \x20 2\t0/5000060\tbefore 2024-01-01 00:00:00+00\n";

#[test]
fn follows_a_longer_history() {
    let h = parse_history(tl(4), THREE).unwrap();
    assert_eq!(h.entries.len(), 2);
    assert_eq!(h.entries[1].reason, "before 2024-01-01 00:00:00+00");
    assert_eq!(
        h.spans(),
        [
            span(4, "0/5000060", None),
            span(2, "0/3000000", Some("0/5000060")),
            span(1, "", Some("0/3000000")),
        ]
    );
    assert_eq!(h.parent_of(tl(4)), Some(tl(2)));
    assert_eq!(h.parent_of(tl(2)), Some(tl(1)));
    assert_eq!(h.parent_of(tl(3)), None, "3 is not an ancestor of 4");
    assert!(!h.contains(tl(3)));
    assert!(h.contains(tl(4)) && h.contains(tl(1)));
    assert_eq!(h.switch_point_into(tl(4)), Some(lsn("0/5000060")));
    assert_eq!(h.switch_point_into(tl(2)), Some(lsn("0/3000000")));
    assert_eq!(h.switch_point_into(tl(1)), None);
    assert_eq!(h.end_of(tl(2)), Some(lsn("0/5000060")));
    assert_eq!(h.departure(tl(1)), departure("0/3000000", 2));
    assert_eq!(h.departure(tl(2)), departure("0/5000060", 4));
    assert_eq!(h.departure(tl(4)), None);
    assert_eq!(h.departure(tl(3)), None);
    assert_eq!(h.timeline_at(lsn("0/2FFFFFF")), tl(1));
    assert_eq!(h.timeline_at(lsn("0/3000000")), tl(2));
    assert_eq!(h.timeline_at(lsn("0/5000060")), tl(4));
    assert_eq!(
        h.range_of(tl(1)),
        Some((Lsn::INVALID, Some(lsn("0/3000000"))))
    );
    assert_eq!(
        h.range_of(tl(2)),
        Some((lsn("0/3000000"), Some(lsn("0/5000060"))))
    );
    assert_eq!(h.range_of(tl(4)), Some((lsn("0/5000060"), None)));
    assert_eq!(h.range_of(tl(3)), None);
    assert_eq!(h.timelines_for_segment(SegmentNo(2), SEG16), [tl(1)]);
    assert_eq!(h.timelines_for_segment(SegmentNo(3), SEG16), [tl(2), tl(1)]);
    assert_eq!(
        h.timelines_for_segment(SegmentNo(5), SEG16),
        [tl(4), tl(2), tl(1)]
    );
    let root = TimelineHistory::root(tl(1));
    assert_eq!(root.timeline_at(lsn("5/0")), tl(1));
    assert_eq!(root.timelines_for_segment(SegmentNo(9), SEG16), [tl(1)]);
    assert_eq!(root.parent_of(tl(1)), None);
    assert_eq!(root.range_of(tl(1)), Some((Lsn::INVALID, None)));
    assert_eq!(root.to_text(), "");
    assert!(!root.begins_with_switch(lsn("0/3000000"), tl(1), tl(1), SEG16));
}

/// Timeline 3's history in PostgreSQL's 028_pitr_timelines.pl, byte for
/// byte as `writeTimeLineHistory` writes it: timeline 2's file copied, a
/// newline in case the copy lacked one, then the new line. Timeline 2
/// began at 0/3018CE0; the PITR along it stopped at restore point "rp",
/// 0/3018C78, which is still timeline 1's WAL (read from the start of
/// 000000020000000000000003, a copy of timeline 1's).
const PITR_028: &str = "1\t0/3018CE0\tno recovery target specified\n\
                        \n\
                        2\t0/3018C78\tat restore point \"rp\"\n";

#[test]
fn accepts_a_switch_point_before_the_previous_one_as_postgresql_does() {
    let h = parse_history(tl(3), PITR_028).unwrap();
    assert_eq!(
        h.entries,
        [
            HistoryEntry {
                parent: tl(1),
                switch_point: lsn("0/3018CE0"),
                reason: "no recovery target specified".into()
            },
            HistoryEntry {
                parent: tl(2),
                switch_point: lsn("0/3018C78"),
                reason: "at restore point \"rp\"".into()
            },
        ]
    );
    assert_eq!(parse_history(tl(3), &h.to_text()).unwrap(), h);
    // readTimeLineHistory's list, newest first: each line's switch point
    // is the end of its timeline and the begin of the next.
    assert_eq!(
        h.spans(),
        [
            span(3, "0/3018C78", None),
            span(2, "0/3018CE0", Some("0/3018C78")),
            span(1, "", Some("0/3018CE0")),
        ]
    );
}

#[test]
fn looks_up_the_028_history_as_postgresql_does() {
    let h = parse_history(tl(3), PITR_028).unwrap();
    // tliOfPointInHistory, newest first: timeline 3 from 0/3018C78 on;
    // timeline 2's [0/3018CE0, 0/3018C78) is empty; timeline 1 below.
    for (at, want) in [
        ("0/0", 1),
        ("0/2000028", 1),
        ("0/3018C77", 1),
        ("0/3018C78", 3),
        // Between the two switch points: timeline 1 by its own line, but
        // timeline 3 comes first in PostgreSQL's walk. (Reading oldest
        // first would say 1: the old lookup's answer.)
        ("0/3018CA0", 3),
        ("0/3018CE0", 3),
        ("0/3018CE8", 3),
        ("0/4000000", 3),
        ("FFFFFFFF/FFFFFFFF", 3),
    ] {
        assert_eq!(h.timeline_at(lsn(at)), tl(want), "timeline at {at}");
    }
    // tliSwitchPoint: the line of each timeline, whatever the order.
    assert_eq!(h.departure(tl(1)), departure("0/3018CE0", 2));
    assert_eq!(h.departure(tl(2)), departure("0/3018C78", 3));
    assert_eq!(h.departure(tl(3)), None);
    assert_eq!(h.end_of(tl(1)), Some(lsn("0/3018CE0")));
    assert_eq!(h.parent_of(tl(3)), Some(tl(2)));
    assert_eq!(h.switch_point_into(tl(3)), Some(lsn("0/3018C78")));
    assert_eq!(h.switch_point_into(tl(2)), Some(lsn("0/3018CE0")));
    assert!(h.contains(tl(2)), "tliInHistory: 2 is listed");
    // What the lookups give each timeline: timeline 1 ends at 0/3018C78,
    // not at its own line's 0/3018CE0; timeline 2 holds nothing.
    assert_eq!(
        h.range_of(tl(1)),
        Some((Lsn::INVALID, Some(lsn("0/3018C78"))))
    );
    assert_eq!(h.range_of(tl(2)), None);
    assert_eq!(h.range_of(tl(3)), Some((lsn("0/3018C78"), None)));
    // A backup of timeline 1 is on timeline 3's path when its WAL ends by
    // 0/3018C78; one whose WAL runs to 0/3018CA0 is not (recovery reads
    // timeline 3's WAL from 0/3018C78 on).
    assert!(h.holds(tl(1), lsn("0/2000028"), lsn("0/2000100")));
    assert!(h.holds(tl(1), lsn("0/2000028"), lsn("0/3018C78")));
    assert!(!h.holds(tl(1), lsn("0/2000028"), lsn("0/3018CA0")));
    assert!(!h.holds(tl(2), lsn("0/3018CE0"), lsn("0/3018CE0")));
    assert!(!h.holds(tl(2), lsn("0/3018CE8"), lsn("0/4000000")));
    assert!(h.holds(tl(3), lsn("0/3018C78"), lsn("0/5000000")));
    // XLogFileReadAnyTLI: segment 3 is asked of timelines 3, 2, 1 (each
    // begins in it or before); segment 2 of timeline 1 only.
    assert_eq!(h.timelines_for_segment(SegmentNo(2), SEG16), [tl(1)]);
    assert_eq!(
        h.timelines_for_segment(SegmentNo(3), SEG16),
        [tl(3), tl(2), tl(1)]
    );
    assert_eq!(
        h.timelines_for_segment(SegmentNo(4), SEG16),
        [tl(3), tl(2), tl(1)]
    );
    // Timeline 3's first segment opens with the end-of-recovery record at
    // 0/3018C78 switching from timeline 1 (the timeline replay was on),
    // not from 2 (the parent the file lists).
    assert!(h.begins_with_switch(lsn("0/3018C78"), tl(1), tl(3), SEG16));
    assert!(!h.begins_with_switch(lsn("0/3018C78"), tl(2), tl(3), SEG16));
    assert!(!h.begins_with_switch(lsn("0/3018CE0"), tl(1), tl(3), SEG16));
    assert!(!h.begins_with_switch(lsn("0/3018C78"), tl(1), tl(4), SEG16));
}

#[test]
fn a_switch_record_on_a_page_boundary_follows_the_page_header() {
    let h = parse_history(tl(2), "1\t0/3002000\tx\n").unwrap();
    assert!(h.begins_with_switch(lsn("0/3002018"), tl(1), tl(2), SEG16));
    assert!(!h.begins_with_switch(lsn("0/3002000"), tl(1), tl(2), SEG16));
    let h = parse_history(tl(2), "1\t0/4000000\tx\n").unwrap();
    assert!(h.begins_with_switch(lsn("0/4000028"), tl(1), tl(2), SEG16));
    assert!(!h.begins_with_switch(lsn("0/4000018"), tl(1), tl(2), SEG16));
    // With 1 MiB segments 0/3100000 starts a segment; with 16 MiB a page.
    let h = parse_history(tl(2), "1\t0/3100000\tx\n").unwrap();
    assert!(h.begins_with_switch(lsn("0/3100028"), tl(1), tl(2), MIB));
    assert!(h.begins_with_switch(lsn("0/3100018"), tl(1), tl(2), SEG16));
}

#[test]
fn accepts_what_readtimelinehistory_accepts() {
    let one = |text: &str| {
        let h = parse_history(tl(2), text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
        assert_eq!(h.entries.len(), 1, "{text:?}");
        (h.entries[0].switch_point, h.entries[0].reason.clone())
    };
    let at = lsn("0/3000000");
    assert_eq!(one("1 0/3000000\n"), (at, String::new()));
    assert_eq!(one("1\t0/3000000\tr\r\n"), (at, "r".into()));
    // sscanf's "\t" matches any run of white space, and %X skips it too.
    assert_eq!(one("1\t\t 0/3000000  why\n"), (at, "why".into()));
    assert_eq!(one("1\t0/ 3000000\n"), (at, String::new()));
    assert_eq!(one("1\x0b0/3000000\x0b\n"), (at, String::new()));
    assert_eq!(one("\t 1\t0/3000000\n"), (at, String::new()));
    // Whatever follows the second hex number is ignored ("the remainder").
    assert_eq!(one("1\t0/3000000x y\n"), (at, "x y".into()));
    // upper or lower case hex, as sscanf("%X") reads either
    assert_eq!(one("1\t0/3a00000\tx\n").0, lsn("0/3A00000"));
    // no newline at the end
    assert_eq!(one("1\t0/3000000").0, at);
    assert!(parse_history(tl(2), "").unwrap().entries.is_empty());
    assert!(parse_history(tl(2), "\n \n# c\n  # c\n\x0c\n")
        .unwrap()
        .entries
        .is_empty());
}

fn history_err(tli: u32, text: &str) -> String {
    parse_history(tl(tli), text).unwrap_err().to_string()
}

#[test]
fn rejects_malformed_files() {
    assert_eq!(
        history_err(2, "one\t0/3000000\tx\n"),
        "timeline history line 1: expected a numeric timeline ID, found \"one\""
    );
    assert_eq!(
        history_err(2, "\n1\n"),
        "timeline history line 2: expected a write-ahead log switch point location after the timeline ID"
    );
    assert_eq!(
        history_err(2, "1\t3000000\tx\n"),
        "timeline history line 1: switch point \"3000000\" is not an LSN like 0/3000000"
    );
    assert_eq!(
        history_err(3, "2\t0/3000000\tx\n1\t0/4000000\tx\n"),
        "timeline history line 2: timeline IDs must be in increasing sequence (1 follows 2)"
    );
    assert_eq!(
        history_err(3, "1\t0/3000000\tx\n1\t0/4000000\tx\n"),
        "timeline history line 2: timeline IDs must be in increasing sequence (1 follows 1)"
    );
    assert_eq!(
        history_err(2, "1\t0/3000000\tx\n2\t0/4000000\tx\n"),
        "timeline history line 2: timeline IDs must be less than the history's own timeline: 2 is not below 2"
    );
    assert!(history_err(2, "0\t0/3000000\tx\n").contains("timeline 0 does not exist"));
    assert!(history_err(2, "99999999999\t0/3000000\tx\n").contains("too large"));
    assert!(history_err(2, "-1\t0/3000000\tx\n").contains("numeric timeline ID"));
    assert!(history_err(2, "+1\t0/3000000\tx\n").contains("numeric timeline ID"));
    for lsn in [
        "0/",
        "/3000000",
        "0x0/3000000",
        "100000000/0",
        "0/100000000",
        "g/1",
    ] {
        assert!(
            history_err(2, &format!("1\t{lsn}\tx\n")).contains("is not an LSN"),
            "{lsn}"
        );
    }
}

#[test]
fn finds_the_newest_timeline_as_findnewesttimeline_does() {
    let archived = [2, 3, 5];
    let mut asked = Vec::new();
    let mut exists = |t: TimelineId| {
        asked.push(t.0);
        archived.contains(&t.0)
    };
    assert_eq!(
        newest_timeline(tl(1), &mut exists),
        tl(3),
        "stops at the gap"
    );
    assert_eq!(asked, [2, 3, 4]);
    assert_eq!(newest_timeline(tl(3), |t| archived.contains(&t.0)), tl(3));
    assert_eq!(newest_timeline(tl(4), |t| archived.contains(&t.0)), tl(5));
    assert_eq!(newest_timeline(tl(u32::MAX), |_| true), tl(u32::MAX));
}

/// A small generator, so that the property below needs no dependency.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Over many histories with switch points in any order, on a small LSN
/// scale: every position belongs to one timeline; [`range_of`] is exactly
/// the positions `timeline_at` gives a timeline (one run); [`holds`] agrees
/// with asking `timeline_at` of every position; `timelines_for_segment`
/// keeps the list order and skips only timelines beginning later.
#[test]
fn lookups_agree_with_each_other_on_any_history() {
    const SCALE: u64 = 64;
    let seg = 8; // "segments" of 8 bytes on this scale
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    for _ in 0..500 {
        let n = rng.below(5) as usize;
        let mut text = String::new();
        let mut parent = 0;
        for _ in 0..n {
            parent += 1 + rng.below(2) as u32;
            let sp = 1 + rng.below(SCALE - 2);
            text += &format!("{parent}\t0/{sp:X}\tr\n");
        }
        let me = tl(parent + 1 + rng.below(2) as u32);
        let h = parse_history(me, &text).unwrap();
        let spans = h.spans();
        let owner: Vec<TimelineId> = (0..SCALE).map(|p| h.timeline_at(Lsn(p))).collect();
        for s in &spans {
            let mine: Vec<u64> = (0..SCALE)
                .filter(|&p| owner[p as usize] == s.timeline)
                .collect();
            match h.range_of(s.timeline) {
                None => assert!(mine.is_empty(), "{text}: {s:?} owns {mine:?}"),
                Some((b, e)) => {
                    let want: Vec<u64> = (b.0..e.map_or(SCALE, |e| e.0.min(SCALE))).collect();
                    assert_eq!(mine, want, "{text}: range of {}", s.timeline);
                }
            }
            for from in 0..SCALE {
                for to in from..SCALE {
                    let all = if to == from {
                        owner[from as usize] == s.timeline
                    } else {
                        (from..to).all(|p| owner[p as usize] == s.timeline)
                    };
                    assert_eq!(
                        h.holds(s.timeline, Lsn(from), Lsn(to)),
                        all,
                        "{text}: holds({}, {from}, {to})",
                        s.timeline
                    );
                }
            }
        }
        // The newest timeline owns everything from its begin on.
        assert!((spans[0].begin.0..SCALE).all(|p| owner[p as usize] == me));
        for segno in 0..SCALE / seg {
            let got = h.timelines_for_segment(SegmentNo(segno), seg as u32);
            let want: Vec<TimelineId> = spans
                .iter()
                .filter(|s| s.begin.0 / seg <= segno)
                .map(|s| s.timeline)
                .collect();
            assert_eq!(got, want, "{text}: segment {segno}");
        }
    }
}
