//! The behaviours every [`Backend`] must show, as one suite that each
//! backend's tests run (object_store's `integration.rs` is the model): the
//! local directory in unit tests, moto and s3s-fs in tests/it/backends.rs,
//! and each of them again under the fault injector ([`super::fault`]).
//!
//! Test support, not used by pgvault itself: the functions panic with a
//! message naming the behaviour and the backend when it is not shown.

use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;

use super::backend::{Backend, PutMode, PutOutcome, PutResult};

/// Pseudo-random bytes (not compressible, the same for a given seed).
pub fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Which parts of the suite to run.
#[derive(Debug, Clone, Copy)]
pub struct Suite {
    /// The backend injects faults: listings may lag behind writes, and a
    /// spooled commit whose answer was lost cannot know that it created the
    /// object (callers of `commit` read back, as archive-push does).
    pub faulty: bool,
    /// How many objects the long listing writes (more than 1,000: S3 pages
    /// listings and bulk deletes by 1,000).
    pub many: usize,
    /// How many writers race for one key.
    pub racers: usize,
}

impl Default for Suite {
    fn default() -> Self {
        Suite {
            faulty: false,
            many: 1100,
            racers: 16,
        }
    }
}

/// Every behaviour, each under its own key prefix below `prefix`.
pub async fn run(b: Arc<dyn Backend>, prefix: &str, suite: Suite) {
    missing_is_none(&*b, &format!("{prefix}/missing")).await;
    ranged_reads(&*b, &format!("{prefix}/ranges")).await;
    versioned_updates(&*b, &format!("{prefix}/versions")).await;
    create_race(b.clone(), &format!("{prefix}/create-race"), suite).await;
    update_race(b.clone(), &format!("{prefix}/update-race"), suite.racers).await;
    temp_files_never_listed(&*b, &format!("{prefix}/temp")).await;
    many_objects(&*b, &format!("{prefix}/many"), suite).await;
}

/// A missing object is `None` from every read, never an error; deleting
/// one is not an error either.
pub async fn missing_is_none(b: &dyn Backend, prefix: &str) {
    let key = format!("{prefix}/nothing-here");
    let d = b.describe();
    assert!(b.get(&key).await.expect("get").is_none(), "{d}: get");
    assert!(b.get_bytes(&key).await.expect("get_bytes").is_none(), "{d}");
    assert!(
        b.get_versioned(&key)
            .await
            .expect("get_versioned")
            .is_none(),
        "{d}"
    );
    assert!(
        b.get_range(&key, 0..10).await.expect("get_range").is_none(),
        "{d}"
    );
    assert!(b.open(&key, 0, None).await.expect("open").is_none(), "{d}");
    assert!(b.list(prefix).await.expect("list").is_empty(), "{d}: list");
    b.delete(&key).await.expect("delete of a missing object");
    b.delete_many(&[key.clone(), format!("{prefix}/neither")])
        .await
        .expect("bulk delete of missing objects");
}

/// Ranges of an object come back exactly; ranges past its end are errors
/// that name its size.
pub async fn ranged_reads(b: &dyn Backend, prefix: &str) {
    let d = b.describe();
    let key = format!("{prefix}/object");
    let data = bytes(200_000, 1);
    b.put(&key, Bytes::from(data.clone()), PutMode::Overwrite)
        .await
        .expect("put");
    let len = data.len() as u64;
    for r in [
        0..1,
        0..len,
        10..20,
        len - 1..len,
        5000..150_000,
        7..7,
        len..len,
    ] {
        let got = b
            .get_range(&key, r.clone())
            .await
            .unwrap_or_else(|e| panic!("{d}: get_range {r:?}: {e}"))
            .unwrap_or_else(|| panic!("{d}: get_range {r:?}: missing"));
        assert_eq!(
            &got[..],
            &data[r.start as usize..r.end as usize],
            "{d}: range {r:?}"
        );
    }
    for r in [len - 10..len + 1, len + 5..len + 10] {
        let e = b
            .get_range(&key, r.clone())
            .await
            .expect_err("a range past the end");
        assert!(
            e.to_string().contains(&len.to_string()),
            "{d}: the error for {r:?} should name the size {len}: {e}"
        );
    }
    let whole = b.get_bytes(&key).await.expect("get").expect("present");
    assert!(whole == data, "{d}: whole object differs");
    b.delete(&key).await.expect("delete");
    assert!(b.get(&key).await.expect("get").is_none(), "{d}: deleted");
}

/// A read returns the version a conditional update needs; an update with
/// a stale version is refused and changes nothing.
pub async fn versioned_updates(b: &dyn Backend, prefix: &str) {
    let d = b.describe();
    let key = format!("{prefix}/object");
    let v1 = match b
        .put_versioned(&key, Bytes::from_static(b"one"), PutMode::CreateNew)
        .await
        .expect("create")
    {
        PutResult::Written(v) => v,
        PutResult::Refused => panic!("{d}: create of a new key refused"),
    };
    let (got, v1r) = b.get_versioned(&key).await.expect("get").expect("present");
    assert_eq!(got, b"one");
    assert_eq!(
        v1, v1r,
        "{d}: the version written and the version read differ"
    );
    let again = b
        .put_versioned(&key, Bytes::from_static(b"uno"), PutMode::CreateNew)
        .await
        .expect("second create");
    assert_eq!(again, PutResult::Refused, "{d}: second create");
    let v2 = match b
        .put_versioned(
            &key,
            Bytes::from_static(b"two"),
            PutMode::Update(v1.clone()),
        )
        .await
        .expect("update")
    {
        PutResult::Written(v) => v,
        PutResult::Refused => panic!("{d}: update with the current version refused"),
    };
    assert_ne!(v1, v2, "{d}: a replace must change the version");
    let stale = b
        .put_versioned(&key, Bytes::from_static(b"three"), PutMode::Update(v1))
        .await
        .expect("stale update");
    assert_eq!(
        stale,
        PutResult::Refused,
        "{d}: update with a stale version"
    );
    let (got, v2r) = b.get_versioned(&key).await.expect("get").expect("present");
    assert_eq!(got, b"two", "{d}: a refused update changed the object");
    assert_eq!(v2, v2r);
    // Overwrite, then the old version no longer matches.
    b.put(&key, Bytes::from_static(b"four"), PutMode::Overwrite)
        .await
        .expect("overwrite");
    let refused = b
        .put_versioned(
            &key,
            Bytes::from_static(b"five"),
            PutMode::Update(v2.clone()),
        )
        .await
        .expect("update after overwrite");
    assert_eq!(
        refused,
        PutResult::Refused,
        "{d}: update after an overwrite"
    );
    b.delete(&key).await.expect("delete");
    let gone = b
        .put_versioned(&key, Bytes::from_static(b"six"), PutMode::Update(v2))
        .await
        .expect("update of a deleted object");
    assert_eq!(gone, PutResult::Refused, "{d}: update of a deleted object");
    assert!(
        b.get(&key).await.expect("get").is_none(),
        "{d}: resurrected"
    );
}

/// Racing creators of one key: exactly one wins, and the object is its.
pub async fn create_race(b: Arc<dyn Backend>, prefix: &str, suite: Suite) {
    let racers = suite.racers;
    let key = format!("{prefix}/object");
    let results = race(
        b.clone(),
        racers,
        |b, i, key: String| async move {
            b.put_versioned(&key, Bytes::from(format!("writer {i}")), PutMode::CreateNew)
                .await
        },
        key.clone(),
    )
    .await;
    one_winner(&*b, &key, &results, "conditional create").await;
    // Spooled commits: exactly one is created where creates are atomic.
    if b.atomic_create() {
        let key = format!("{prefix}/spooled");
        let outcomes = race(
            b.clone(),
            racers,
            |b, i, key: String| async move {
                let dir = key
                    .rsplit_once('/')
                    .map(|(d, _)| d.to_string())
                    .unwrap_or_default();
                let b2 = b.clone();
                let spool = tokio::task::spawn_blocking(move || {
                    use std::io::Write;
                    let mut s = b2.spool(&dir)?;
                    s.write_all(format!("spooled {i}").as_bytes())?;
                    Ok::<_, std::io::Error>(s)
                })
                .await
                .expect("spool task")
                .expect("spool");
                b.commit(spool, &key, PutMode::CreateNew).await
            },
            key.clone(),
        )
        .await;
        let created: Vec<usize> = outcomes
            .iter()
            .enumerate()
            .filter(|(_, r)| matches!(r, Ok(PutOutcome::Created)))
            .map(|(i, _)| i)
            .collect();
        let d = b.describe();
        assert!(
            outcomes.iter().all(|r| r.is_ok()),
            "{d}: spooled creates {outcomes:?}"
        );
        let got = b.get_bytes(&key).await.expect("get").expect("present");
        let owner = (0..racers).find(|i| got == format!("spooled {i}").into_bytes());
        assert!(owner.is_some(), "{d}: the object is no writer's");
        if suite.faulty {
            assert!(created.len() <= 1, "{d}: spooled creates {outcomes:?}");
        } else {
            assert_eq!(
                created,
                vec![owner.unwrap_or(usize::MAX)],
                "{d}: spooled creates {outcomes:?}"
            );
        }
    }
}

/// Racing updaters of one version: exactly one wins.
pub async fn update_race(b: Arc<dyn Backend>, prefix: &str, racers: usize) {
    let key = format!("{prefix}/object");
    let v0 = match b
        .put_versioned(&key, Bytes::from_static(b"start"), PutMode::CreateNew)
        .await
        .expect("create")
    {
        PutResult::Written(v) => v,
        PutResult::Refused => panic!("{}: create refused", b.describe()),
    };
    let results = race(
        b.clone(),
        racers,
        move |b, i, key: String| {
            let v0 = v0.clone();
            async move {
                b.put_versioned(
                    &key,
                    Bytes::from(format!("writer {i}")),
                    PutMode::Update(v0),
                )
                .await
            }
        },
        key.clone(),
    )
    .await;
    one_winner(&*b, &key, &results, "conditional update").await;
}

async fn race<T, F, Fut>(b: Arc<dyn Backend>, n: usize, f: F, key: String) -> Vec<T>
where
    F: Fn(Arc<dyn Backend>, usize, String) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let barrier = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let fut = f(b.clone(), i, key.clone());
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                fut.await
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("racer task"));
    }
    out
}

async fn one_winner(
    b: &dyn Backend,
    key: &str,
    results: &[crate::error::Result<PutResult>],
    what: &str,
) {
    let d = b.describe();
    let winners: Vec<usize> = results
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r, Ok(PutResult::Written(_))))
        .map(|(i, _)| i)
        .collect();
    let errors: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    assert!(errors.is_empty(), "{d}: {what}: errors {errors:?}");
    assert_eq!(
        winners.len(),
        1,
        "{d}: {what}: winners {winners:?} of {}",
        results.len()
    );
    let (got, _) = b.get_versioned(key).await.expect("get").expect("present");
    assert_eq!(
        got,
        format!("writer {}", winners[0]).into_bytes(),
        "{d}: {what}: the object is not the winner's"
    );
}

/// A writer's temporary files are never listed, and leave nothing behind
/// when dropped uncommitted.
pub async fn temp_files_never_listed(b: &dyn Backend, prefix: &str) {
    let d = b.describe();
    let mut spool = b.spool(prefix).expect("spool");
    {
        use std::io::Write;
        spool.write_all(&bytes(100_000, 3)).expect("write");
        spool.flush().expect("flush");
    }
    assert!(
        b.list(prefix).await.expect("list").is_empty(),
        "{d}: a temporary file is listed"
    );
    drop(spool);
    assert!(b.list(prefix).await.expect("list").is_empty(), "{d}");
}

/// More than 1,000 objects are all listed (S3 pages by 1,000), and one
/// bulk delete removes them all.
pub async fn many_objects(b: &dyn Backend, prefix: &str, suite: Suite) {
    let d = b.describe();
    let keys: Vec<String> = (0..suite.many)
        .map(|i| format!("{prefix}/{:02}/obj-{i:05}", i % 7))
        .collect();
    let results: Vec<_> = futures::stream::iter(keys.iter())
        .map(|k| b.put(k, Bytes::from(k.clone().into_bytes()), PutMode::Overwrite))
        .buffer_unordered(32)
        .collect()
        .await;
    for r in results {
        r.expect("put");
    }
    if !suite.faulty {
        let mut listed: Vec<String> = b
            .list(prefix)
            .await
            .expect("list")
            .into_iter()
            .map(|m| m.key)
            .collect();
        listed.sort();
        let mut want = keys.clone();
        want.sort();
        assert_eq!(
            listed.len(),
            want.len(),
            "{d}: listing of {} objects",
            want.len()
        );
        assert!(listed == want, "{d}: listing differs");
    }
    b.delete_many(&keys).await.expect("bulk delete");
    for k in keys.iter().step_by(97) {
        assert!(b.get(k).await.expect("get").is_none(), "{d}: {k} survived");
    }
    if !suite.faulty {
        let left = b.list(prefix).await.expect("list");
        assert!(
            left.is_empty(),
            "{d}: {} objects survived the bulk delete",
            left.len()
        );
    }
}
