//! The block set against a plain `BTreeSet` model, the change set's rules,
//! its binary form (and damaged copies of it), and the spilling union.

use std::collections::BTreeSet;

use super::*;
use crate::pg::testdata::Noise;

/// Blocks of several shapes: scattered, dense, runs, near chunk borders and
/// the top of the block number space.
fn random_blocks(noise: &mut Noise) -> Vec<u32> {
    let mut v = Vec::new();
    match noise.below_u64(5) {
        0 => v.extend((0..noise.below_u64(200)).map(|_| noise.below_u64(1 << 20) as u32)),
        1 => {
            let base = noise.below_u64(1 << 18) as u32;
            v.extend((0..noise.below_u64(8_000)).map(|_| base + noise.below_u64(70_000) as u32));
        }
        2 => {
            for _ in 0..noise.below_u64(20) {
                let f = noise.below_u64(1 << 22) as u32;
                v.extend(f..f + noise.below_u64(10_000) as u32);
            }
        }
        3 => {
            for hi in [0u32, 1, 2, 0xFFFF] {
                let base = hi << 16;
                v.extend([base, base + 1, base | 0xFFFF, base | 0xFFFE, base | 0x8000]);
            }
            v.push(u32::MAX);
        }
        _ => {}
    }
    v
}

fn model_of(s: &BlockSet) -> BTreeSet<u32> {
    s.iter().collect()
}

#[test]
fn block_set_matches_a_plain_set() {
    let mut noise = Noise(0x1234_5678_9ABC_DEF1);
    for round in 0..60 {
        let a = random_blocks(&mut noise);
        let b = random_blocks(&mut noise);
        let mut model: BTreeSet<u32> = a.iter().copied().collect();
        let mut s = BlockSet::from_blocks(a.iter().copied());
        assert_eq!(model_of(&s), model, "round {round}: from_blocks");
        assert_eq!(s.len(), model.len() as u64);
        // Union, with one side built by single inserts and ranges.
        // Single inserts for some, a batch for the rest.
        let mut t = BlockSet::from_blocks(b.iter().skip(3000).copied());
        for &x in b.iter().take(3000) {
            t.insert(x);
        }
        if round % 3 == 0 {
            let f = noise.below_u64(1 << 20) as u32;
            let l = f + noise.below_u64(200_000) as u32;
            t.insert_range(f, l);
            model.extend(f..=l);
        }
        model.extend(b.iter().copied());
        s.union_with(&t);
        assert_eq!(model_of(&s), model, "round {round}: union");
        for &x in b.iter().take(50) {
            assert!(s.contains(x));
        }
        assert!(!s.contains(4_000_000_000) || model.contains(&4_000_000_000));
        // Ranges and range iteration.
        let ranges = s.ranges();
        let from_ranges: BTreeSet<u32> = ranges.iter().flat_map(|&(f, l)| f..=l).collect();
        assert_eq!(from_ranges, model);
        for w in ranges.windows(2) {
            assert!(w[0].1 + 1 < w[1].0, "ranges touch: {w:?}");
        }
        let (lo, hi) = (
            noise.below_u64(1 << 19) as u32,
            noise.below_u64(1 << 21) as u32,
        );
        let got: Vec<u32> = s.range(lo, hi).collect();
        let want: Vec<u32> = model.range(lo..hi.max(lo)).copied().collect();
        assert_eq!(got, want, "round {round}: range {lo}..{hi}");
        // Truncation.
        let limit = noise.below_u64(1 << 21) as u32;
        s.truncate(limit);
        model.retain(|&x| x < limit);
        assert_eq!(model_of(&s), model, "round {round}: truncate {limit}");
        // Memory stays near the smallest form: about a bitmap per chunk at
        // most (an array grown by single inserts may hold an eighth more).
        assert!(s.mem_bytes() <= s.chunks().len() * (9300 + 64) + 64);
    }
}

#[test]
fn block_set_picks_the_small_form() {
    // A whole 1 TiB relation (2^27 blocks of 8 KiB): runs, a few bytes a chunk.
    let mut s = BlockSet::new();
    s.insert_range(0, (1 << 27) - 1);
    assert_eq!(s.len(), 1 << 27);
    assert!(s.mem_bytes() < 2048 * 64, "{}", s.mem_bytes());
    // Every other block: a bitmap per chunk, 8 KiB per 512 MiB.
    let s = BlockSet::from_blocks((0..1u32 << 20).step_by(2));
    assert!(s.mem_bytes() <= 16 * (8192 + 64), "{}", s.mem_bytes());
    // Scattered: two bytes a block.
    let s = BlockSet::from_blocks((0..1000u32).map(|i| i * 1000));
    assert!(s.mem_bytes() < 1000 * 2 + 64 * 16, "{}", s.mem_bytes());
}

fn key(rel: u32, fork: Fork) -> RelFork {
    RelFork {
        loc: RelFileLocator {
            spc: 1663,
            db: 5,
            rel,
        },
        fork,
    }
}

fn random_change_set(noise: &mut Noise) -> ChangeSet {
    let mut s = ChangeSet::new();
    for _ in 0..noise.below_u64(40) {
        let k = key(
            16384 + noise.below_u64(30) as u32,
            Fork::ALL[noise.below_u64(4) as usize],
        );
        let mut blocks = random_blocks(noise);
        blocks.sort_unstable();
        blocks.dedup();
        s.mark_blocks_sorted(k, &blocks);
        s.mark_block(k, noise.below_u64(1 << 24) as u32);
        match noise.below_u64(8) {
            0 => s.set_limit(k, noise.below_u64(1 << 20) as u32, fork_flags::TRUNCATED),
            1 => s.set_limit(k, 0, fork_flags::CREATED),
            2 => s.drop_relation(k.loc),
            _ => {}
        }
    }
    if noise.below_u64(3) == 0 {
        s.mark_database(1663, 16400 + noise.below_u64(3) as u32, dir_flags::COPIED);
    }
    if noise.below_u64(5) == 0 {
        s.mark_tablespace(16500, dir_flags::CREATED);
    }
    if noise.below_u64(4) == 0 {
        let k = key(16384 + noise.below_u64(30) as u32, Fork::Main);
        s.add_doubt(
            Lsn(noise.below_u64(1 << 30)),
            DoubtScope::Fork(k),
            "a test's doubt, ü".into(),
        );
    }
    s
}

#[test]
fn limits_flags_and_union() {
    let k = key(16384, Fork::Main);
    let mut a = ChangeSet::new();
    for b in [1, 5, 9, 100] {
        a.mark_block(k, b);
    }
    a.set_limit(k, 8, fork_flags::TRUNCATED);
    // Blocks at or beyond the limit are dropped: they are read whole.
    assert_eq!(
        a.fork(&k).unwrap().blocks.iter().collect::<Vec<_>>(),
        [1, 5]
    );
    // Blocks written after the truncation, beyond the limit, add nothing.
    a.mark_block(k, 20);
    assert_eq!(a.fork(&k).unwrap().blocks.len(), 2);
    let mut b = ChangeSet::new();
    b.mark_block(k, 3);
    b.mark_block(k, 7);
    b.set_limit(k, 6, fork_flags::TRUNCATED);
    // Union in either order: minimum limit, union of blocks below it.
    let mut ab = a.clone();
    ab.union_with(b.clone());
    let mut ba = b.clone();
    ba.union_with(a.clone());
    assert_eq!(ab, ba);
    let f = ab.fork(&k).unwrap();
    assert_eq!(
        (f.limit, f.blocks.iter().collect::<Vec<_>>()),
        (Some(6), vec![1, 3, 5])
    );
    assert_eq!(
        ab.fork_state(&k),
        ForkState::Changed {
            blocks: &f.blocks,
            limit: Some(6)
        }
    );
    // Created or dropped: whole.
    ab.drop_relation(k.loc);
    assert_eq!(
        ab.fork_state(&k),
        ForkState::Whole(Whole::Fork(fork_flags::TRUNCATED | fork_flags::DROPPED))
    );
    // Untouched forks; the FSM never trusted.
    let other = key(99999, Fork::Main);
    assert_eq!(ab.fork_state(&other), ForkState::Unchanged);
    assert_eq!(
        ab.fork_state(&key(99999, Fork::Fsm)),
        ForkState::Whole(Whole::NotWalLogged)
    );
    // A database copied whole covers all its forks.
    ab.mark_database(1663, 5, dir_flags::COPIED);
    assert_eq!(
        ab.fork_state(&other),
        ForkState::Whole(Whole::Database(dir_flags::COPIED))
    );
    // Doubts: the earliest per scope; the cluster-wide one covers all.
    ab.add_doubt(Lsn(200), DoubtScope::All, "later".into());
    ab.add_doubt(Lsn(100), DoubtScope::All, "earlier".into());
    ab.add_doubt(Lsn(300), DoubtScope::All, "latest".into());
    match ab.fork_state(&other) {
        ForkState::Whole(Whole::Doubt(d)) => {
            assert_eq!((d.lsn, d.why.as_str()), (Lsn(100), "earlier"))
        }
        s => panic!("{s:?}"),
    }
}

#[test]
fn union_is_commutative_and_associative() {
    let mut noise = Noise(77);
    for _ in 0..50 {
        let (a, b, c) = (
            random_change_set(&mut noise),
            random_change_set(&mut noise),
            random_change_set(&mut noise),
        );
        let mut x = a.clone();
        x.union_with(b.clone());
        x.union_with(c.clone());
        let mut y = c.clone();
        let mut bc = b.clone();
        bc.union_with(a.clone());
        y.union_with(bc);
        assert_eq!(x, y);
    }
}

#[test]
fn binary_form_round_trips() {
    let mut noise = Noise(4242);
    for _ in 0..100 {
        let s = random_change_set(&mut noise);
        let bytes = encode_change_set(&s);
        assert_eq!(decode_change_set(&bytes).unwrap(), s);
        let seg = SegmentRefs {
            segment_start: Lsn(0x1_0000_0000 + noise.below_u64(1 << 20) * (1 << 20)),
            seg_size: 1 << 20,
            major: 17,
            changes: s,
            head: Some(Piece {
                start: Lsn(0x100),
                rem_len: 12,
                len: 12,
                raw: vec![1, 2, 3],
                rest_crc: 0xDEAD_BEEF,
                tail: vec![4; 10],
            }),
            tail: None,
        };
        let bytes = encode_segment(&seg);
        assert_eq!(decode_segment(&bytes).unwrap(), seg);
    }
    // Empty sets are a few bytes.
    assert!(encode_change_set(&ChangeSet::new()).len() < 20);
}

#[test]
fn binary_form_is_compact() {
    // A 1 TiB relation changed whole, a 100 GiB one every tenth block, and
    // 10 000 scattered blocks.
    let mut s = ChangeSet::new();
    s.forks
        .entry(key(1, Fork::Main))
        .or_default()
        .blocks
        .insert_range(0, (1 << 27) - 1);
    s.mark_blocks_sorted(
        key(2, Fork::Main),
        &(0..(100u32 << 17)).step_by(10).collect::<Vec<_>>(),
    );
    for i in 0..10_000u32 {
        s.mark_block(key(3, Fork::Main), i.wrapping_mul(2_654_435_761) >> 4);
    }
    let bytes = encode_change_set(&s);
    // Bitmaps for the dense one (1.3 M blocks in 200 chunks: 1.6 MiB), and
    // under 3 bytes a scattered block.
    assert!(bytes.len() < 200 * 8200 + 60_000, "{}", bytes.len());
    assert!(s.mem_bytes() < 4 << 20, "{}", s.mem_bytes());
}

#[test]
fn damaged_binary_form_is_refused() {
    let mut noise = Noise(99);
    let mut s = random_change_set(&mut noise);
    s.mark_block(key(1, Fork::Vm), 7);
    let good = encode_change_set(&s);
    assert!(matches!(
        decode_change_set(b"PGVBRE"),
        Err(BlockRefError::Magic)
    ));
    assert!(matches!(
        decode_change_set(b"{\"json\": 1}"),
        Err(BlockRefError::Magic)
    ));
    let mut newer = good.clone();
    newer[7] = BLOCKREF_FORMAT + 1;
    assert!(
        matches!(decode_change_set(&newer), Err(BlockRefError::Version(v)) if v == BLOCKREF_FORMAT + 1)
    );
    for cut in [8, 9, good.len() / 2, good.len() - 1] {
        assert!(decode_change_set(&good[..cut]).is_err(), "cut at {cut}");
    }
    for at in (9..good.len()).step_by(good.len() / 50 + 1) {
        let mut bad = good.clone();
        bad[at] ^= 0x10;
        assert!(decode_change_set(&bad).is_err(), "flip at {at}");
    }
    let mut long = good.clone();
    long.push(0);
    assert!(decode_change_set(&long).is_err());
    // A segment object is not a change set, nor the reverse.
    assert!(decode_segment(&good).is_err());
}

#[test]
fn spilled_union_equals_the_one_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut noise = Noise(31337);
    let sets: Vec<ChangeSet> = (0..60).map(|_| random_change_set(&mut noise)).collect();
    let mut whole = ChangeSet::new();
    for s in &sets {
        whole.union_with(s.clone());
    }
    let mut small = UnionBuilder::new(20_000, dir.path());
    let mut big = UnionBuilder::new(1 << 30, dir.path());
    for s in &sets {
        small.add(s.clone()).unwrap();
        big.add(s.clone()).unwrap();
    }
    assert!(small.spilled_runs() > 3, "the budget should make it spill");
    assert_eq!(big.spilled_runs(), 0);
    let spilled = small.finish().unwrap();
    let UnionResult::Spilled(sp) = &spilled else {
        panic!("expected a spilled union");
    };
    assert_eq!(sp.fork_count(), whole.forks.len() as u64);
    let mem = big.finish().unwrap();
    assert!(matches!(mem, UnionResult::Memory(_)));
    // Every fork (and some absent ones) answers the same.
    let mut keys: Vec<RelFork> = whole.forks.keys().copied().collect();
    keys.extend([
        key(1, Fork::Main),
        key(16384 + 29, Fork::Init),
        key(u32::MAX, Fork::Init),
    ]);
    for k in &keys {
        let want = format!("{:?}", whole.fork_state(k));
        assert_eq!(
            spilled.with_fork_state(k, |s| format!("{s:?}")).unwrap(),
            want,
            "{k}"
        );
        assert_eq!(
            mem.with_fork_state(k, |s| format!("{s:?}")).unwrap(),
            want,
            "{k}"
        );
        assert_eq!(sp.fork(k).unwrap().as_ref(), whole.fork(k), "{k}");
    }
}
