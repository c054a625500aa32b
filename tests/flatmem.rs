//! Issue 14: the manifest machinery handles a million files within a fixed
//! memory budget. Its own test binary, so that its global allocator counts
//! only this test's heap, and the process's peak resident set (`VmHWM`,
//! which also sees SQLite's own allocations) is this test's.
//!
//! What it drives is what backup and restore do with a file list: write
//! it in path order (`FileListWriter`), decode and check it into a local
//! list, stream it into a scratch database, and read it back grouped by
//! object (restore's and verify's plan), heaviest first joined with another
//! table by path (backup's walk joined with its reference's list), and in
//! path order (the list written back). Before issue 14 a manifest held every
//! entry in memory (`Vec<FileEntry>`, about 0.7 KiB a file: some 700 MiB
//! here).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{BufWriter, Seek};
use std::sync::atomic::{AtomicUsize, Ordering};

use pgvault::catalog::scratch::{Groups, Row, Rows, Scratch};
use pgvault::repo::codec::{Binding, EncodeOptions, Keys};
use pgvault::repo::filelist::{FileListWriter, LocalFileList};
use pgvault::repo::manifest::FileEntry;

/// Counts the live heap and keeps its peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, only counting.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, l, new) };
        if !q.is_null() {
            if new >= l.size() {
                let now = LIVE.fetch_add(new - l.size(), Ordering::Relaxed) + new - l.size();
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(l.size() - new, Ordering::Relaxed);
            }
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const FILES: u64 = 1_000_000;
/// Rust heap at any moment, whatever the number of files.
const HEAP_BUDGET: usize = 16 << 20;
/// The process's peak resident set (the target for a command).
const RSS_BUDGET_KIB: u64 = 64 << 10;

fn entry(i: u64) -> FileEntry {
    // Paths of a schema-per-tenant cluster: many databases, many small
    // relation files each, in path order.
    FileEntry {
        path: format!("base/{:06}/{:08}", 16384 + i / 5000, i),
        size: 8192 * (i % 7),
        mtime: 1_700_000_000 + i as i64,
        mode: 0o600,
        sha256: format!("{:064x}", i * 0x9E37_79B9),
        object: format!("data/{:02}-{:06}.pgv", i % 2, i / 2048),
        offset: (i % 2048) * 300,
        length: 300,
        backup: None,
        parts: Vec::new(),
        chunk_blocks: None,
    }
}

fn vm_hwm_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

#[test]
fn a_million_files_in_a_fixed_memory_budget() {
    // Write the list, in path order, into a file.
    let file = tempfile::tempfile().expect("a temporary file");
    let mut w = FileListWriter::new(
        BufWriter::new(file),
        EncodeOptions::default(),
        &Keys::none(),
        Binding::object("files.pgv"),
    )
    .expect("start a file list");
    for i in 0..FILES {
        w.push(&entry(i)).expect("add an entry");
    }
    let (out, list_ref) = w.finish().expect("end the file list");
    assert_eq!(list_ref.count, FILES);
    let mut file = out.into_inner().expect("flush the file list");
    file.rewind().expect("rewind");

    // Decode and check it, then stream it into a scratch database the way
    // restore groups a backup's files by object.
    let list = LocalFileList::decode(
        file,
        &list_ref,
        "files.pgv",
        &Keys::none(),
        Binding::object("files.pgv"),
    )
    .expect("decode the list");
    let mut db = Scratch::new(&["pieces", "refs"]).expect("a scratch database");
    let mut rows = Vec::new();
    let mut refs = Vec::new();
    let mut n = 0u64;
    for e in list.iter().expect("read the list") {
        let e = e.expect("an entry");
        assert_eq!(e, entry(n), "entries come back as written, in order");
        n += 1;
        if n % 3 == 0 {
            refs.push(Row {
                k: e.path.clone(),
                ..Row::default()
            });
        }
        rows.push(Row {
            g: e.object.clone(),
            o: e.offset as i64,
            w: e.length as i64,
            v: serde_json::to_vec(&e).expect("serialize"),
            k: e.path,
        });
        if rows.len() >= 4096 {
            db.insert("pieces", &rows).expect("insert pieces");
            db.insert("refs", &refs).expect("insert refs");
            rows.clear();
            refs.clear();
        }
    }
    db.insert("pieces", &rows).expect("insert pieces");
    db.insert("refs", &refs).expect("insert refs");
    drop((rows, refs));
    assert_eq!(n, FILES);
    db.index("pieces").expect("index");
    let db = db.shared();

    // Grouped by object, heaviest first, one group in memory at a time.
    let groups = Groups::heaviest_first(db.clone(), "pieces").expect("groups");
    assert_eq!(groups.count_groups(), FILES.div_ceil(2048) * 2);
    let mut in_groups = 0u64;
    for g in groups {
        let (_, rows) = g.expect("a group");
        assert!(rows.windows(2).all(|w| w[0].o <= w[1].o));
        in_groups += rows.len() as u64;
    }
    assert_eq!(in_groups, FILES);

    // Joined with another table by path, heaviest first.
    let mut joined = 0u64;
    let mut last_w = i64::MAX;
    for j in Rows::heaviest_first(db.clone(), "pieces", Some("refs")) {
        let j = j.expect("a row");
        assert!(j.row.w <= last_w);
        last_w = j.row.w;
        joined += u64::from(j.other.is_some());
    }
    assert_eq!(joined, FILES / 3);

    // In path order again, as backup writes its list.
    let mut last = String::new();
    let mut count = 0u64;
    for r in Rows::by_key(db, "pieces") {
        let r = r.expect("a row");
        assert!(r.row.k > last);
        last = r.row.k;
        count += 1;
    }
    assert_eq!(count, FILES);

    let heap = PEAK.load(Ordering::Relaxed);
    let rss = vm_hwm_kib();
    eprintln!(
        "{FILES} files: peak Rust heap {} KiB, peak RSS {rss} KiB",
        heap >> 10
    );
    assert!(
        heap <= HEAP_BUDGET,
        "peak heap {heap} bytes, budget {HEAP_BUDGET}"
    );
    assert!(
        rss <= RSS_BUDGET_KIB,
        "peak RSS {rss} KiB, budget {RSS_BUDGET_KIB} KiB"
    );
}
