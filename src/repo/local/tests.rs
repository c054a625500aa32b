use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use super::*;
use crate::repo::conformance::{self, Suite};
use crate::repo::fault::{FaultBackend, FaultConfig};

fn backend() -> (tempfile::TempDir, Arc<dyn Backend>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let b: Arc<dyn Backend> = Arc::new(LocalBackend::new(dir.path().join("repo")));
    (dir, b)
}

/// Every file under `dir`, own files included.
fn all_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            if e.path().is_dir() {
                todo.push(e.path());
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

fn tmp_files(dir: &Path) -> Vec<PathBuf> {
    all_files(dir)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(TMP_PREFIX))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance() {
    let (_d, b) = backend();
    conformance::run(b, "suite", Suite::default()).await;
}

/// The suite's parts that must hold whatever the faults (a listing may lag
/// behind a write).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_under_faults() {
    let (_d, inner) = backend();
    let config = FaultConfig::parse(
        "seed=11,error=0.15,reset=0.1,timeout=0.05,timeout_ms=20,truncate=0.3,\
         slow=0.05,slow_ms=5,hide=0.2,hide_ms=50,attempts=12",
    )
    .expect("config");
    let faulty = FaultBackend::new(inner, config);
    let b: Arc<dyn Backend> = Arc::new(faulty.clone());
    conformance::run(
        b,
        "suite",
        Suite {
            faulty: true,
            many: 300,
            ..Suite::default()
        },
    )
    .await;
    let n = faulty.counts();
    assert!(
        n.error > 0 && n.reset > 0 && n.truncate > 0 && n.hide > 0,
        "{n:?}"
    );
}

/// A body cut off in transfer is resumed from where it stopped; when it
/// keeps failing, the error says so and is not taken for corruption.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_bodies_are_resumed_or_reported_as_transfers() {
    let (_d, inner) = backend();
    let data = conformance::bytes(300_000, 5);
    // Sealed: a cut body is a transfer failure through the decryption too.
    let keys = crate::repo::crypt::tests::test_keys();
    let obj = crate::repo::codec::encode_bytes(
        &data,
        crate::repo::codec::EncodeOptions {
            compression: crate::repo::codec::Compression::None,
            ..Default::default()
        },
        &keys,
        crate::repo::codec::Binding::object("o"),
    )
    .expect("encode");
    inner
        .put("o", Bytes::from(obj.clone()), PutMode::Overwrite)
        .await
        .expect("put");
    for seed in 0..20 {
        let config = FaultConfig::parse(&format!("seed={seed},truncate=0.5")).expect("config");
        let b = FaultBackend::new(inner.clone(), config);
        let got = b
            .get_bytes("o")
            .await
            .expect("resumed read")
            .expect("present");
        assert!(got == obj, "seed {seed}: resumed read differs");
    }
    // Every body cut: the reader gives up, and the codec says why.
    let b = FaultBackend::new(
        inner.clone(),
        FaultConfig::parse("seed=1,truncate=1").expect("config"),
    );
    let reader = b.get("o").await.expect("open").expect("present");
    let e = tokio::task::spawn_blocking(move || {
        let bind = crate::repo::codec::Binding::object("o");
        crate::repo::codec::decode(reader, io::sink(), &keys, bind).expect_err("a cut body")
    })
    .await
    .expect("task");
    assert!(!e.is_corruption(), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("transfer of") && text.contains("failed after") && text.contains("/o"),
        "{text}"
    );
    assert!(!text.contains("corrupt"), "{text}");
}

/// Deleting and replacing leave nothing of pgvault's own in the object
/// directories (expire empties backup directories whole): the lock files
/// live apart, and stay few.
#[tokio::test]
async fn lock_files_stay_out_of_object_directories() {
    let (d, b) = backend();
    let keys: Vec<String> = (0..3).map(|i| format!("s/backup/l/data/{i}")).collect();
    for k in &keys {
        b.put(k, Bytes::from_static(b"x"), PutMode::CreateNew)
            .await
            .expect("put");
    }
    for i in 0..300 {
        b.put(
            &format!("s/d{i}/x"),
            Bytes::from_static(b"1"),
            PutMode::Overwrite,
        )
        .await
        .expect("put");
        b.delete(&format!("s/d{i}/x")).await.expect("delete");
    }
    b.delete_many(&keys).await.expect("delete");
    let files = all_files(d.path());
    let locks = d.path().join("repo").join(LOCKS_DIR);
    assert!(files.iter().all(|f| f.starts_with(&locks)), "{files:?}");
    assert!(
        files.len() as u64 <= LOCK_STRIPES,
        "{} lock files",
        files.len()
    );
    assert!(b.list("").await.expect("list").is_empty());
    // Emptied directories are not listed, as on an object store, where a
    // "directory" exists only while it holds objects.
    assert!(b.list_dirs("").await.expect("list_dirs").is_empty());
}

/// Issue 9, defect 3: a spool dropped before its commit (a failed encode, a
/// file that vanished) leaves no temporary file behind.
#[test]
fn dropped_spool_leaves_nothing() {
    let (d, b) = backend();
    let mut s = b.spool("a/b").expect("spool");
    s.write_all(b"half an object").expect("write");
    assert_eq!(tmp_files(d.path()).len(), 1);
    drop(s);
    assert_eq!(tmp_files(d.path()), Vec::<PathBuf>::new());
}

/// Issue 9, defect 6: a full disk names the file and gives a hint, and the
/// temporary file is gone.
#[tokio::test]
async fn full_disk_names_the_file() {
    let (d, b) = backend();
    let mut s = b.spool("wal").expect("spool");
    // Swap the spool's file for /dev/full, which answers every write with
    // ENOSPC.
    if let Spool::LocalFile { file, .. } = &mut s {
        let full = OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .expect("/dev/full");
        *file = BufWriter::with_capacity(16, full);
    }
    let e = s
        .write_all(&[0u8; 4096])
        .and_then(|_| s.flush())
        .expect_err("ENOSPC");
    assert_eq!(e.kind(), io::ErrorKind::StorageFull);
    assert!(e.to_string().contains(TMP_PREFIX), "{e}");
    assert!(
        e.to_string().contains(&d.path().display().to_string()),
        "{e}"
    );
    drop(s);
    assert_eq!(tmp_files(d.path()), Vec::<PathBuf>::new());
    let err = local_error(
        "write",
        &d.path().join("x"),
        io::Error::from_raw_os_error(libc::ENOSPC),
    );
    assert!(err.to_string().contains("write "), "{err}");
    assert!(
        err.hint_text().is_some_and(|h| h.contains("full")),
        "{err:?}"
    );
}

/// Issue 9, defect 12: every file and directory is owner-only, whatever
/// the umask.
#[tokio::test]
async fn created_owner_only() {
    let (d, b) = backend();
    // SAFETY: umask only changes this process's file creation mask.
    let old = unsafe { libc::umask(0o022) };
    b.put(
        "s/archive/x/a",
        Bytes::from_static(b"a"),
        PutMode::CreateNew,
    )
    .await
    .expect("put");
    let mut s = b.spool("s/backup/l/data").expect("spool");
    s.write_all(b"data").expect("write");
    b.commit(s, "s/backup/l/data/00-000000.pgv", PutMode::CreateNew)
        .await
        .expect("commit");
    b.put("s/stanza.pgv", Bytes::from_static(b"x"), PutMode::Overwrite)
        .await
        .expect("put");
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let root = d.path().join("repo");
    let mut seen = 0;
    let mut todo = vec![root.clone()];
    while let Some(dir) = todo.pop() {
        let mode = fs::metadata(&dir).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", dir.display());
        for e in fs::read_dir(&dir).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                let mode = fs::metadata(&p).expect("stat").permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", p.display());
                seen += 1;
            }
        }
    }
    assert!(seen >= 3);
}

/// A permission error says which user needs what.
#[test]
fn permission_errors_carry_a_hint() {
    let e = local_error(
        "create",
        Path::new("/var/lib/nothing-here/x"),
        io::Error::from_raw_os_error(libc::EACCES),
    );
    let hint = e.hint_text().expect("a hint");
    assert!(hint.contains("pgvault runs as"), "{hint}");
    assert!(hint.contains("belongs to"), "{hint}");
    assert!(hint.contains("archive_command"), "{hint}");
}

/// Issue 9, defect 8: `put_bytes` does its file work off the runtime: a task
/// on a single-threaded runtime keeps running while a large object is
/// written.
#[test]
fn put_bytes_leaves_the_runtime_free() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (_d, b) = backend();
    let data = vec![7u8; 64 << 20];
    rt.block_on(async move {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let ticker = tokio::spawn(async move {
            let mut last = Instant::now();
            let mut worst = Duration::ZERO;
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(1)).await;
                worst = worst.max(last.elapsed());
                last = Instant::now();
            }
            worst
        });
        tokio::task::yield_now().await;
        let start = Instant::now();
        b.put_bytes("big", data, PutMode::Overwrite)
            .await
            .expect("put");
        let took = start.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let worst = ticker.await.expect("ticker");
        assert!(
            worst < Duration::from_millis(100),
            "the runtime stalled for {worst:?} during a put of {took:?}"
        );
    });
}
