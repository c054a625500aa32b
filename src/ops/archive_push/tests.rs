use super::*;
use crate::error::Kind;
use crate::ops::stanza_create::{stanza_create, StanzaCreateOptions};
use crate::pg::testdata;
use crate::repo::s3::S3Options;
use crate::repo::RepoLocation;

/// A data directory with two real, consecutive segments marked ready.
fn pgdata(dir: &Path) -> PathBuf {
    let pg = dir.join("pg");
    std::fs::create_dir_all(pg.join("global")).unwrap();
    std::fs::create_dir_all(pg.join("pg_wal/archive_status")).unwrap();
    std::fs::write(
        pg.join("global/pg_control"),
        testdata::read("pg15/pg_control"),
    )
    .unwrap();
    std::fs::write(pg.join("PG_VERSION"), testdata::read("pg15/PG_VERSION")).unwrap();
    for n in ["000000010000000000000014", "000000010000000000000015"] {
        std::fs::write(pg.join("pg_wal").join(n), testdata::wal("pg15", n)).unwrap();
        std::fs::write(pg.join(format!("pg_wal/archive_status/{n}.ready")), b"").unwrap();
    }
    pg
}

/// That data directory, and a local repository with its stanza.
async fn stanza(dir: &Path) -> (PathBuf, Repository) {
    let pg = pgdata(dir);
    let repo = Repository::open(
        RepoLocation::Local(dir.join("repo")),
        "s",
        &S3Options::default(),
    )
    .unwrap();
    stanza_create(&repo, &StanzaCreateOptions { pgdata: pg.clone() })
        .await
        .unwrap();
    (pg, repo)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn look_ahead_pushes_ready_files_and_later_calls_check_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (pg, repo) = stanza(dir.path()).await;
    let spool = SpoolDir::at(dir.path().join("spool"));
    let opts = |seg: &str| PushOptions {
        path: pg.join("pg_wal").join(seg),
        encode: EncodeOptions::default(),
        ahead: 8,
        process_max: 2,
        spool: Some(spool.clone()),
        superseded: OnSuperseded::Warn,
    };
    let o = opts("000000010000000000000014");
    assert!(lookahead_wanted(&o), "15 is ready too");
    // The detached pusher, run here in the test's process.
    assert_eq!(push_ahead(&repo, None, &o).await.unwrap(), 1);
    let first = archive_push(&repo, None, &o).await.unwrap();
    assert_eq!(first.outcome, PushOutcome::Archived);
    let next = WalFileName::parse("000000010000000000000015").unwrap();
    let record = spool
        .pushed(&next)
        .expect("15 was pushed ahead and recorded");

    // PostgreSQL's call for 15: answered from the record, after hashing.
    let second = archive_push(&repo, None, &opts("000000010000000000000015"))
        .await
        .unwrap();
    assert_eq!(second.outcome, PushOutcome::AlreadyArchived);
    assert_eq!(second.digest, record.digest);

    // Different bytes under that name: the record does not vouch for
    // them, and the archive refuses them.
    let p15 = pg.join("pg_wal/000000010000000000000015");
    let mut bytes = std::fs::read(&p15).unwrap();
    bytes[100_000] ^= 0xff;
    std::fs::write(&p15, &bytes).unwrap();
    let e = archive_push(&repo, None, &opts("000000010000000000000015"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), Kind::Conflict, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefetch_fetches_following_segments_verified_and_stops_at_the_end() {
    use crate::ops::archive_get::{archive_get, prefetch, GetOptions, GetOutcome};
    let dir = tempfile::tempdir().unwrap();
    let (pg, repo) = stanza(dir.path()).await;
    for seg in ["000000010000000000000014", "000000010000000000000015"] {
        let opts = PushOptions {
            path: pg.join("pg_wal").join(seg),
            encode: EncodeOptions::default(),
            ahead: 0,
            process_max: 1,
            spool: None,
            superseded: OnSuperseded::Warn,
        };
        archive_push(&repo, None, &opts).await.unwrap();
    }
    let spool = SpoolDir::at(dir.path().join("spool"));
    let n = prefetch(&repo, "000000010000000000000014", 8, &spool)
        .await
        .unwrap();
    assert_eq!(n, 1, "only 15 follows 14 in the archive");
    let p15 = WalFileName::parse("000000010000000000000015").unwrap();
    assert!(spool.prefetched(&p15).exists());
    let dest = dir.path().join("RECOVERYXLOG");
    let got = archive_get(
        &repo,
        &GetOptions {
            name: "000000010000000000000015".into(),
            dest: dest.clone(),
            spool: Some(spool.clone()),
        },
    )
    .await
    .unwrap();
    assert_eq!(got, GetOutcome::Restored);
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        std::fs::read(pg.join("pg_wal/000000010000000000000015")).unwrap()
    );
    assert!(!spool.prefetched(&p15).exists(), "moved, not copied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_of_a_new_timeline_brings_its_history_file_first() {
    let dir = tempfile::tempdir().unwrap();
    let (pg, repo) = stanza(dir.path()).await;
    let facts = testdata::facts("pg15");
    let seg2 = facts["promotion"]["first_new_timeline_segment"]
        .as_str()
        .unwrap()
        .to_string();
    let wal = pg.join("pg_wal");
    std::fs::write(wal.join(&seg2), testdata::wal("pg15", &seg2)).unwrap();
    let db = repo.require_stanza().await.unwrap().current().clone();
    let archive = repo.archive(&db);
    let history = WalFileName::history(TimelineId(2));
    let seg_path = wal.join(&seg2);
    let push = |caller| push_one(&repo, &db, &seg_path, EncodeOptions::default(), caller);

    // No history file anywhere: the look-ahead pusher leaves the
    // segment to PostgreSQL's call, which archives it (a pg_upgraded
    // cluster keeps its timeline without a history file).
    let e = push(Caller::LookAhead).await.unwrap_err();
    assert_eq!(e.kind(), Kind::Timeline, "{e}");
    assert!(archive
        .locate(&WalFileName::parse(&seg2).unwrap())
        .await
        .unwrap()
        .is_none());

    // With 00000002.history beside it: the history goes first.
    std::fs::write(
        wal.join(history.as_str()),
        testdata::read("pg15/wal/00000002.history"),
    )
    .unwrap();
    push(Caller::LookAhead).await.unwrap();
    let got = archive.fetch_small(&history).await.unwrap().unwrap();
    assert_eq!(got, testdata::read("pg15/wal/00000002.history"));

    // A history that the archived timeline-2 segment contradicts (it
    // begins timeline 2 one segment later) is refused, exit 12.
    let other = dir.path().join("elsewhere");
    std::fs::create_dir_all(&other).unwrap();
    let switch: crate::pg::Lsn = facts["promotion"]["switch_point"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let later = switch
        .segno(db.wal_segment_size)
        .next()
        .start_lsn(db.wal_segment_size);
    let forged = other.join("00000002.history");
    std::fs::write(
        &forged,
        format!("1\t{later}\tno recovery target specified\n"),
    )
    .unwrap();
    // (into a second stanza holding only the segment)
    let repo2 = Repository::open(
        RepoLocation::Local(dir.path().join("repo")),
        "s2",
        &S3Options::default(),
    )
    .unwrap();
    stanza_create(&repo2, &StanzaCreateOptions { pgdata: pg.clone() })
        .await
        .unwrap();
    std::fs::remove_file(wal.join(history.as_str())).unwrap();
    push_one(
        &repo2,
        &db,
        &wal.join(&seg2),
        EncodeOptions::default(),
        Caller::Postgres(OnSuperseded::Warn),
    )
    .await
    .unwrap();
    let e = push_one(
        &repo2,
        &db,
        &forged,
        EncodeOptions::default(),
        Caller::Postgres(OnSuperseded::Warn),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), Kind::Timeline, "{e}");
    assert!(e.to_string().contains(&seg2), "{e}");
    // The right one is taken.
    std::fs::write(&forged, testdata::read("pg15/wal/00000002.history")).unwrap();
    push_one(
        &repo2,
        &db,
        &forged,
        EncodeOptions::default(),
        Caller::Postgres(OnSuperseded::Warn),
    )
    .await
    .unwrap();
}
