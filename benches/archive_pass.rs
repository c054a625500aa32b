//! What one archive-push pass costs per byte of WAL, by part: SHA-256, zstd
//! at the default level, the record scan, and the whole pass with and
//! without the scan (`cargo bench --bench archive_pass`).
//!
//! The input is real WAL from `fixtures/` (1 MiB segments written by
//! PostgreSQL 14 to 18: pgbench, commits, restore points, large records,
//! and the block reference stories: inserts, updates, indexes, VACUUM,
//! database and tablespace commands). The scan walks every record header,
//! CRC-checks every record and collects every block reference, so its cost
//! is what the issue asks to keep off the critical path: the numbers show it
//! beside compression. `refs` adds encoding the segment's block references
//! (what archive-push would store); `union` is an incremental backup's side:
//! the union of a story's segments. Figures and the run of record:
//! docs/benchmarks.md.

use std::io::{self, Write};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sha2::{Digest, Sha256};

use pgvault::pg::blockref::{decode_segment, encode_segment};
use pgvault::pg::walscan::{scan_segment, RangeUnion, ScanOptions, WalScanner};
use pgvault::pg::Lsn;
use pgvault::repo::codec::{Binding, EncodeOptions, Encoder, Keys};

/// (name, major, bytes) of every fixture segment.
fn segments() -> Vec<(String, u32, Vec<u8>)> {
    let mut out = Vec::new();
    for (dir, major) in [
        ("pg14", 14),
        ("pg15", 15),
        ("pg15-records", 15),
        ("pg16", 16),
        ("pg17", 17),
        ("pg18", 18),
        ("pg14-blockrefs", 14),
        ("pg15-blockrefs", 15),
        ("pg16-blockrefs", 16),
        ("pg17-blockrefs", 17),
        ("pg18-blockrefs", 18),
    ] {
        out.extend(dir_segments(dir, major));
    }
    assert!(!out.is_empty(), "no fixture WAL under fixtures/");
    out
}

/// (name, major, bytes) of one fixture directory's segments, in order.
fn dir_segments(dir: &str, major: u32) -> Vec<(String, u32, Vec<u8>)> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(root.join(dir).join("wal")) else {
        return out;
    };
    let mut names: Vec<_> = rd.flatten().map(|e| e.path()).collect();
    names.sort();
    for p in names {
        let n = p.file_name().unwrap().to_string_lossy().into_owned();
        let Some(stem) = n.strip_suffix(".zst") else {
            continue;
        };
        if stem.len() != 24 || !stem.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let bytes = zstd::decode_all(std::fs::File::open(&p).unwrap()).unwrap();
        out.push((stem.to_string(), major, bytes));
    }
    out
}

fn options(name: &str, major: u32, len: usize) -> ScanOptions {
    let log = u64::from_str_radix(&name[8..16], 16).unwrap();
    let seg = u64::from_str_radix(&name[16..24], 16).unwrap();
    let seg_size = len as u32;
    ScanOptions {
        major,
        seg_size,
        segment_start: Lsn((log << 32) | (seg * u64::from(seg_size))),
        partial: false,
    }
}

fn encode(bytes: &[u8], scan: Option<ScanOptions>) {
    let (keys, bind) = (Keys::none(), Binding::object("bench"));
    let mut enc = Encoder::new(io::sink(), EncodeOptions::default(), &keys, bind).unwrap();
    match scan {
        Some(o) => {
            let mut scanner = WalScanner::new(o);
            for chunk in bytes.chunks(1 << 20) {
                enc.write_all(chunk).unwrap();
                scanner.feed(chunk);
            }
            std::hint::black_box(scanner.finish());
        }
        None => enc.write_all(bytes).unwrap(),
    }
    std::hint::black_box(enc.finish().unwrap());
}

fn archive_pass(c: &mut Criterion) {
    let segs = segments();
    let total: usize = segs.iter().map(|(_, _, b)| b.len()).sum();
    let mut g = c.benchmark_group("archive_pass");
    g.throughput(Throughput::Bytes(total as u64));
    g.sample_size(20);
    g.bench_function(BenchmarkId::new("scan", segs.len()), |b| {
        b.iter(|| {
            for (n, m, bytes) in &segs {
                std::hint::black_box(scan_segment(bytes, options(n, *m, bytes.len())));
            }
        })
    });
    g.bench_function(BenchmarkId::new("scan + refs", segs.len()), |b| {
        b.iter(|| {
            for (n, m, bytes) in &segs {
                let mut s = WalScanner::new(options(n, *m, bytes.len()));
                s.feed(bytes);
                let (sum, refs) = s.finish_with_blocks();
                std::hint::black_box((sum, encode_segment(&refs)));
            }
        })
    });
    g.bench_function(BenchmarkId::new("sha256", segs.len()), |b| {
        b.iter(|| {
            for (_, _, bytes) in &segs {
                std::hint::black_box(Sha256::digest(bytes));
            }
        })
    });
    g.bench_function(BenchmarkId::new("zstd-3", segs.len()), |b| {
        b.iter(|| {
            for (_, _, bytes) in &segs {
                std::hint::black_box(zstd::bulk::compress(bytes, 3).unwrap());
            }
        })
    });
    g.bench_function(BenchmarkId::new("pass without scan", segs.len()), |b| {
        b.iter(|| {
            for (_, _, bytes) in &segs {
                encode(bytes, None);
            }
        })
    });
    g.bench_function(BenchmarkId::new("pass with scan", segs.len()), |b| {
        b.iter(|| {
            for (n, m, bytes) in &segs {
                encode(bytes, Some(options(n, *m, bytes.len())));
            }
        })
    });
    g.finish();

    // An incremental backup's side: decode each segment's stored refs and
    // union a story's segments, records cut by boundaries put together.
    let story: Vec<Vec<u8>> = dir_segments("pg17-blockrefs", 17)
        .iter()
        .map(|(n, m, bytes)| {
            let mut s = WalScanner::new(options(n, *m, bytes.len()));
            s.feed(bytes);
            encode_segment(&s.finish_with_blocks().1)
        })
        .collect();
    let mut g = c.benchmark_group("blockrefs");
    g.sample_size(20);
    g.bench_function(BenchmarkId::new("union", story.len()), |b| {
        let dir = tempfile::tempdir().unwrap();
        b.iter(|| {
            let mut u = RangeUnion::new(64 << 20, dir.path());
            for bytes in &story {
                u.add(decode_segment(bytes).unwrap()).unwrap();
            }
            std::hint::black_box(u.finish().unwrap());
        })
    });
    g.finish();
}

criterion_group!(benches, archive_pass);
criterion_main!(benches);
