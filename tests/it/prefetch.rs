//! archive-get's common call during recovery (issue 14): the segment waits
//! in the prefetch spool. It is handed over by a rename, without the
//! repository, and a detached prefetcher is started only when the spool
//! runs low — not on every call, where each start is a process competing
//! with PostgreSQL's startup process for the CPU.

use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use pgvault::pg::WalFileName;
use pgvault::repo::RepoLocation;
use pgvault::spool::SpoolDir;

use super::common::{pseudo_random_bytes, As, TestEnv};

const AHEAD: usize = 8;

/// Has a prefetcher been started for `spool` within `wait`? Every
/// prefetcher takes `get/.lock` first thing (and archive-get's own check
/// for a running one takes it only when it means to start one).
fn prefetcher_started(spool: &SpoolDir, wait: Duration) -> bool {
    let lock = spool.get_dir().join(".lock");
    let until = Instant::now() + wait;
    loop {
        if lock.exists() {
            return true;
        }
        if Instant::now() > until {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn prefetched_segments_are_renamed_and_the_prefetcher_starts_only_when_low() {
    let env = TestEnv::new();
    // A repository with no stanza at all: a call served from the spool
    // must not need it.
    let repo = env.local_repo("nostanza");
    let spool_root = env.mkdir("spool", As::Root);
    let location = RepoLocation::parse(&repo.url).expect("the test repository's URL parses");
    let spool = SpoolDir::under(&spool_root, &location.identity(), &repo.stanza);
    fs::create_dir_all(spool.get_dir()).expect("create the spool's get/");
    let names: Vec<WalFileName> = (0x10..0x10 + AHEAD as u64)
        .map(|s| WalFileName::parse(&format!("0000000100000000{s:08X}")).expect("a segment name"))
        .collect();
    let bytes: Vec<Vec<u8>> = (0..AHEAD)
        .map(|i| pseudo_random_bytes(64 << 10, i as u64))
        .collect();
    for (n, b) in names.iter().zip(&bytes) {
        fs::write(spool.prefetched(n), b).expect("write a prefetched segment");
    }

    let get = |i: usize| -> std::path::PathBuf {
        let dest = env.dir().join(format!("RECOVERYXLOG-{i}"));
        let spool_s = spool_root.display().to_string();
        let dest_s = dest.display().to_string();
        let ahead = AHEAD.to_string();
        let mut args = repo.args();
        args.extend(
            [
                "--spool-path",
                &spool_s,
                "--archive-get-ahead",
                &ahead,
                "archive-get",
                names[i].as_str(),
                &dest_s,
            ]
            .map(String::from),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        env.pgvault(As::Root, &args, &[], env.dir()).ok();
        dest
    };
    let check = |i: usize, dest: &Path| {
        assert_eq!(
            fs::read(dest).expect("archive-get wrote its destination"),
            bytes[i],
            "{} should be the prefetched bytes",
            names[i]
        );
        assert!(
            !spool.prefetched(&names[i]).exists(),
            "{} should have been moved out of the spool, not copied",
            names[i]
        );
    };

    // Seven still wait after the first call: no prefetcher.
    let dest = get(0);
    check(0, &dest);
    assert!(
        !prefetcher_started(&spool, Duration::from_secs(2)),
        "archive-get started a prefetcher while {} of {AHEAD} segments still waited",
        AHEAD - 1
    );
    // Down to fewer than half: now one is started.
    for i in 1..=AHEAD / 2 + 1 {
        let dest = get(i);
        check(i, &dest);
    }
    assert!(
        prefetcher_started(&spool, Duration::from_secs(20)),
        "archive-get started no prefetcher with fewer than half of {AHEAD} segments waiting"
    );
}
