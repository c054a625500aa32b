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
//!
//! Then, in the same budget, what else was held per file: a backup's block
//! sums (`blocksums.pgv`) written from two workers' records, read back and
//! looked up by path (an incremental's reference, `restore --delta`,
//! `verify`) and walked for the files a list does not name (`verify`);
//! and a resumed backup's journal of a million stored files, written in
//! chunks, read back by `find`, looked up by path and joined with the
//! finished list to delete the objects it does not use. Before, the sums'
//! index was a map of every path in memory and the journal a map of every
//! record (about 0.5 KiB a file).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{BufWriter, Seek};
use std::sync::atomic::{AtomicUsize, Ordering};

use pgvault::catalog::scratch::{Groups, Row, Rows, Scratch};
use pgvault::ops::backup::resume::{self, Journal, JournalHeader, Journaled, Reuse, Want};
use pgvault::ops::progress::NoProgress;
use pgvault::repo::blocksums::{block_sum, SumsSink};
use pgvault::repo::codec::{Binding, EncodeOptions, Keys};
use pgvault::repo::filelist::{FileListWriter, LocalFileList};
use pgvault::repo::manifest::FileEntry;
use pgvault::repo::s3::S3Options;
use pgvault::repo::{layout, Fetched, PutMode, RepoLocation, Repository};

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
    report("file list");

    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let repo = Repository::open(
        RepoLocation::Local(dir.path().to_path_buf()),
        "s",
        &S3Options::default(),
    )
    .expect("a local repository");
    block_sums(&rt, &repo);
    report("block sums");
    journal(&rt, &repo);
    report("resume journal");
}

/// The sum of file `i`'s one block in [`block_sums`].
fn sum_of(i: u64) -> [u8; 16] {
    block_sum(&i.to_le_bytes())
}

/// A million files' block sums, as two workers record them (interleaved,
/// in no order), written, read back, looked up, and walked.
fn block_sums(rt: &tokio::runtime::Runtime, repo: &Repository) {
    let mut sinks = [SumsSink::new(), SumsSink::new()].map(|s| s.expect("a sums sink"));
    for i in 0..FILES {
        let k = (i * 7919) % FILES;
        sinks[(k % 2) as usize]
            .add(&entry(k).path, &[sum_of(k)])
            .expect("record sums");
    }
    let label = "20260101-000000F";
    rt.block_on(repo.write_block_sums(label, Vec::from(sinks), EncodeOptions::default()))
        .expect("write the block sums");
    let Fetched::Found(sums) = rt.block_on(repo.read_block_sums(label)).expect("read them") else {
        panic!("the block sums just written should read back");
    };
    for i in (0..FILES).step_by(101) {
        let got = sums.get(&entry(i).path).expect("look up");
        assert_eq!(got, Some(vec![sum_of(i)]), "the sums of file {i}");
    }
    assert_eq!(sums.get("base/1/none").expect("look up"), None);
    // verify's walk for the files its list does not name: here all.
    sums.db()
        .lock()
        .expect("the scratch database")
        .create_table("listed")
        .expect("a table");
    let mut last = String::new();
    let mut n = 0u64;
    for r in sums.unlisted("listed") {
        let (path, blocks) = r.expect("a file");
        assert!(path > last && blocks == 1);
        last = path;
        n += 1;
    }
    assert_eq!(n, FILES);
}

/// The journal of an interrupted backup of a million files in bundles of
/// 2,048, as its workers write it; read back by a resumed run.
fn journal(rt: &tokio::runtime::Runtime, repo: &Repository) {
    let label = "20260102-000000F";
    let header = JournalHeader::test_full(label);
    let objects = FILES.div_ceil(2048);
    let record = |i: u64| {
        let mut e = entry(i);
        e.object = layout::backup_object_name(0, i / 2048);
        e.offset = i % 2048;
        e.length = 1;
        Journaled {
            entry: e,
            ino: i,
            mtime_ns: 0,
            opened_ns: 5_000_000_000,
            pages_checked: 0,
            bad_pages: Vec::new(),
        }
    };
    rt.block_on(async {
        for o in 0..objects {
            let key = layout::backup_object_key("s", label, &layout::backup_object_name(0, o));
            repo.backend()
                .put_bytes(&key, vec![0u8; 2048], PutMode::CreateNew)
                .await
                .expect("a data object");
        }
        let journal = Journal::new(repo, header.clone(), 0);
        tokio::task::spawn_blocking(move || {
            for o in 0..objects {
                let files = (o * 2048..((o + 1) * 2048).min(FILES)).map(record);
                journal
                    .committed(&layout::backup_object_name(0, o), 2048, files.collect())
                    .expect("journal an object");
            }
            journal.flush().expect("write the last chunk")
        })
        .await
        .expect("the journal's thread");
    });
    let r = rt
        .block_on(resume::find(repo, &header, &NoProgress))
        .expect("find the interrupted backup")
        .expect("it is resumable");
    let sizes: u64 = (0..FILES).map(|i| entry(i).size).sum();
    assert_eq!(r.candidates(), (FILES, sizes));
    let gone = std::path::Path::new("/nonexistent/pgvault");
    for i in (0..FILES).step_by(101) {
        let e = entry(i);
        // Recorded (not on disk here: to be read again), or not.
        let found = r.reusable(&e.path, gone, e.size, Want::Whole);
        assert!(matches!(found, Ok(Reuse::No)), "file {i}");
    }
    let none = r.reusable("base/1/none", gone, 0, Want::Whole);
    assert!(matches!(none, Ok(Reuse::NotStored)));
    // The finished list uses every object but the last.
    let used = (0..(objects - 1) * 2048).map(move |i| Ok(record(i).entry));
    let deleted = rt
        .block_on(r.delete_unused(repo, used))
        .expect("delete what is not used");
    assert_eq!(deleted, 1);
}

/// Prints the peaks so far and checks them against the budgets.
fn report(what: &str) {
    let heap = PEAK.load(Ordering::Relaxed);
    let rss = vm_hwm_kib();
    eprintln!(
        "{FILES} files, after the {what}: peak Rust heap {} KiB, peak RSS {rss} KiB",
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
