//! Two local repositories, the second taken down by putting a file where
//! its directory was (every read and write of it then fails, as for an
//! unreachable store), with real PostgreSQL 15 segments.

use std::path::{Path, PathBuf};

use super::*;
use crate::ops::archive_push::tests::stanza;
use crate::ops::archive_push::{catch_up, OnSuperseded};
use crate::ops::stanza_create::{stanza_create, StanzaCreateOptions};
use crate::pg::WalFileName;
use crate::repo::codec::EncodeOptions;
use crate::repo::s3::S3Options;
use crate::repo::RepoLocation;

const S14: &str = "000000010000000000000014";
const S15: &str = "000000010000000000000015";

struct Two {
    dir: PathBuf,
    pg: PathBuf,
    targets: Vec<Target>,
}

impl Two {
    async fn new(dir: &Path) -> Two {
        let (pg, repo1) = stanza(dir).await;
        let repo2 = Repository::open(
            RepoLocation::Local(dir.join("repo2")),
            "s",
            &S3Options::default(),
        )
        .unwrap();
        stanza_create(&repo2, &StanzaCreateOptions { pgdata: pg.clone() })
            .await
            .unwrap();
        let target = |number, repo| Target {
            number,
            repo,
            catalog: None,
            spool: Some(SpoolDir::at(dir.join(format!("spool{number}")))),
        };
        Two {
            dir: dir.to_path_buf(),
            pg,
            targets: vec![target(1, repo1), target(2, repo2)],
        }
    }

    fn opts(&self, seg: &str) -> PushOptions {
        PushOptions {
            path: self.pg.join("pg_wal").join(seg),
            encode: EncodeOptions::default(),
            ahead: 0,
            process_max: 1,
            spool: None,
            superseded: OnSuperseded::Warn,
        }
    }

    async fn push(&self, seg: &str, quorum: usize, cap: Option<u64>) -> Result<QuorumOutcome> {
        let q = QuorumOptions {
            quorum,
            queue_max: cap,
        };
        archive_push_quorum(&self.targets, &self.opts(seg), &q).await
    }

    /// Repository 2 unreachable: a file where its directory was.
    fn down(&self) {
        std::fs::rename(self.dir.join("repo2"), self.dir.join("repo2.away")).unwrap();
        std::fs::write(self.dir.join("repo2"), b"not a directory").unwrap();
    }

    fn up(&self) {
        std::fs::remove_file(self.dir.join("repo2")).unwrap();
        std::fs::rename(self.dir.join("repo2.away"), self.dir.join("repo2")).unwrap();
    }

    fn queue2(&self) -> Vec<String> {
        let spool = self.targets[1].spool.as_ref().unwrap();
        spool
            .queue()
            .entries()
            .into_iter()
            .map(|q| q.name.as_str().to_string())
            .collect()
    }

    /// The checksum of what `n`'s repository holds for `seg`.
    async fn held(&self, n: usize, seg: &str) -> Option<crate::repo::Sha256Sum> {
        let repo = &self.targets[n - 1].repo;
        let db = repo.require_stanza().await.unwrap().current().clone();
        let name = WalFileName::parse(seg).unwrap();
        repo.archive(&db)
            .locate(&name)
            .await
            .unwrap()
            .map(|l| l.sha)
    }
}

/// Quorum 1 with repository 2 down: PostgreSQL is told at once, the file
/// waits in repository 2's queue (a durable copy); later files go to the
/// end of the queue even once the repository answers again (its WAL
/// arrives in order), and the pusher catches up, oldest first, to the
/// same bytes as repository 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_one_goes_on_while_a_repository_is_down_and_it_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let two = Two::new(dir.path()).await;
    two.down();
    let out = two.push(S14, 1, None).await.unwrap();
    assert_eq!((out.held, out.queued), (vec![1], vec![2]));
    assert!(two.targets[1].behind());
    assert_eq!(two.queue2(), [S14]);
    let queued = two.targets[1].spool.as_ref().unwrap().queue().entries();
    assert_eq!(
        std::fs::read(&queued[0].path).unwrap(),
        std::fs::read(two.pg.join("pg_wal").join(S14)).unwrap()
    );
    two.up();
    // Behind: queued untried, after 14.
    let out = two.push(S15, 1, None).await.unwrap();
    assert_eq!((out.held, out.queued), (vec![1], vec![2]));
    assert_eq!(two.queue2(), [S14, S15]);
    assert_eq!(two.held(2, S15).await, None, "not tried while behind");
    // Quorum 2 cannot be met while repository 2 is behind: refused,
    // saying why, and PostgreSQL tries again later.
    let e = two.push(S15, 2, None).await.unwrap_err();
    assert!(e.to_string().contains("1 of 2 repositories hold"), "{e}");
    assert!(e.hint_text().unwrap().contains("behind"), "{e:?}");

    let sent = catch_up(&two.targets[1], &two.opts(S15)).await.unwrap();
    assert_eq!(sent, 2);
    assert!(!two.targets[1].behind());
    for seg in [S14, S15] {
        let one = two.held(1, seg).await;
        assert!(one.is_some());
        assert_eq!(two.held(2, seg).await, one, "{seg}: the same bytes in both");
    }
    // In step again: quorum 2 holds.
    let out = two.push(S15, 2, None).await.unwrap();
    assert_eq!((out.held.len(), out.queued.len()), (2, 0));
}

/// The default quorum (all) with a repository down: PostgreSQL is not
/// told, nothing is queued (it will call again with the file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_all_refuses_while_a_repository_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let two = Two::new(dir.path()).await;
    two.down();
    let e = two.push(S14, 2, None).await.unwrap_err();
    assert!(e.to_string().contains("1 of 2 repositories hold"), "{e}");
    assert!(two.queue2().is_empty());
    two.up();
    two.push(S14, 2, None).await.unwrap();
    assert_eq!(two.held(1, S14).await, two.held(2, S14).await);
}

/// Past `archive-push-queue-max` the oldest queued file goes; the gap is
/// recorded in the spool at once and, first thing when the repository
/// answers, as a marker in the repository, before the rest is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_cap_the_gap_is_marked_in_the_repository() {
    let dir = tempfile::tempdir().unwrap();
    let two = Two::new(dir.path()).await;
    let size = std::fs::metadata(two.pg.join("pg_wal").join(S14))
        .unwrap()
        .len();
    two.down();
    let cap = Some(size + size / 2);
    assert!(two.push(S14, 1, cap).await.unwrap().dropped.is_empty());
    let out = two.push(S15, 1, cap).await.unwrap();
    let dropped: Vec<(u8, &str)> = out
        .dropped
        .iter()
        .map(|(n, d)| (*n, d.name.as_str()))
        .collect();
    assert_eq!(dropped, [(2, S14)]);
    assert_eq!(two.queue2(), [S15]);
    let queue = two.targets[1].spool.as_ref().unwrap().queue();
    assert_eq!(queue.state().dropped_pending.len(), 1);
    two.up();
    catch_up(&two.targets[1], &two.opts(S15)).await.unwrap();
    let st = queue.state();
    assert!(st.dropped_pending.is_empty());
    assert_eq!(st.dropped_recorded[0].name, S14);

    let repo2 = &two.targets[1].repo;
    let db = repo2.require_stanza().await.unwrap().current().clone();
    let archive = repo2.archive(&db);
    let listing = archive.list().await.unwrap();
    let missed: Vec<&str> = listing.dropped().map(|n| n.as_str()).collect();
    assert_eq!(missed, [S14]);
    let runs = crate::ops::gaps::dropped_runs(&archive, &listing)
        .await
        .unwrap();
    assert!(
        runs[0].describe().contains("archive-push-queue-max"),
        "{runs:?}"
    );
    assert!(two.held(2, S15).await.is_some());
    assert!(two.held(1, S14).await.is_some(), "repository 1 has it");
}

/// A file a repository refuses for what it is (different bytes archived
/// under its name there) fails PostgreSQL's call whatever the quorum: it
/// is never just queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_fails_the_call_whatever_the_quorum() {
    let dir = tempfile::tempdir().unwrap();
    let two = Two::new(dir.path()).await;
    let path = two.pg.join("pg_wal").join(S14);
    let good = std::fs::read(&path).unwrap();
    let mut other = good.clone();
    other[100_000] ^= 0xff;
    std::fs::write(&path, &other).unwrap();
    archive_push(&two.targets[1].repo, None, &two.opts(S14))
        .await
        .unwrap();
    std::fs::write(&path, &good).unwrap();
    let e = two.push(S14, 1, None).await.unwrap_err();
    assert_eq!(e.kind(), Kind::Conflict, "{e}");
    assert!(two.queue2().is_empty());
}
