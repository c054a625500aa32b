use super::*;
use crate::repo::s3::S3Options;
use crate::repo::{PutMode, RepoLocation};

fn open(dir: &std::path::Path) -> Repository {
    Repository::open(RepoLocation::Local(dir.into()), "s", &S3Options::default())
        .expect("open the repository")
}

/// A lock as another process would have written it.
fn foreign(host: &str, pid: u32, expires_in: i64) -> LockInfo {
    let me = me();
    LockInfo {
        command: "backup".into(),
        host: host.into(),
        pid,
        token: format!("foreign-{host}-{pid}-{expires_in}"),
        acquired_at: "2025-01-01T00:00:00Z".into(),
        expires_at: chrono::Utc::now().timestamp() + expires_in,
        boot_id: me.boot_id,
        pid_ns: me.pid_ns,
        pid_start: None,
    }
}

async fn write_lock(repo: &Repository, info: &LockInfo) {
    repo.put_json(&lock_key("s"), info, PutMode::Overwrite)
        .await
        .expect("write the lock");
}

async fn read_lock(repo: &Repository) -> Option<LockInfo> {
    repo.get_json(&lock_key("s")).await.expect("read the lock")
}

/// A pid that no longer exists: a child that has exited and been reaped.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true")
        .spawn()
        .expect("run true");
    let pid = child.id();
    child.wait().expect("wait for true");
    pid
}

#[tokio::test]
async fn one_holder_named_with_times_as_times() {
    let dir = tempfile::tempdir().unwrap();
    let repo = open(dir.path());
    let held = repo.lock("backup").await.unwrap();
    let e = repo.lock("expire").await.err().unwrap();
    assert_eq!(e.kind(), Kind::Locked);
    let text = e.to_string();
    assert!(text.contains("locked by backup"), "{text}");
    assert!(
        text.contains(&format!("pid {}", std::process::id())),
        "{text}"
    );
    // Issue 9, defect 13: times as times, never a raw epoch.
    let epoch = chrono::Utc::now().timestamp().to_string();
    assert!(!text.contains(&epoch[..6]), "a raw epoch in: {text}");
    assert!(
        text.contains("Z, in 4m") || text.contains("Z, in 5m"),
        "{text}"
    );
    held.release().await.unwrap();
    assert!(
        read_lock(&repo).await.is_none(),
        "released, yet still there"
    );
    repo.lock("expire").await.unwrap().release().await.unwrap();
}

#[tokio::test]
async fn an_expired_lock_is_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let repo = open(dir.path());
    write_lock(&repo, &foreign("elsewhere", 4242, -10)).await;
    let held = repo.lock("backup").await.unwrap();
    let now = read_lock(&repo).await.unwrap();
    assert_eq!(now.pid, std::process::id());
    held.release().await.unwrap();
    // A fresh one elsewhere is respected.
    write_lock(&repo, &foreign("elsewhere", 4242, 100)).await;
    let e = repo.lock("backup").await.err().unwrap();
    assert_eq!(e.kind(), Kind::Locked);
    assert!(e.to_string().contains("pid 4242 on elsewhere"), "{e}");
}

/// Issue 9, defect 2: two takers of a stale lock can never both proceed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_takers_of_a_stale_lock_one_wins() {
    for round in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        write_lock(&open(dir.path()), &foreign("elsewhere", 4242, -10)).await;
        let barrier = Arc::new(tokio::sync::Barrier::new(16));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let repo = open(dir.path());
                let barrier = barrier.clone();
                tokio::spawn(async move {
                    barrier.wait().await;
                    repo.lock("backup").await
                })
            })
            .collect();
        let mut won = Vec::new();
        for t in tasks {
            match t.await.unwrap() {
                Ok(lock) => won.push(lock),
                Err(e) => assert_eq!(e.kind(), Kind::Locked, "{e}"),
            }
        }
        assert_eq!(
            won.len(),
            1,
            "round {round}: {} takers proceeded",
            won.len()
        );
    }
}

/// Issue 9, defect 13: a holder of this host that no longer exists is taken
/// over at once; one that lives, or lives elsewhere, is not.
#[tokio::test]
async fn a_dead_holder_on_this_host_is_taken_over_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let repo = open(dir.path());
    let host = me().host;
    write_lock(&repo, &foreign(&host, dead_pid(), 280)).await;
    let held = repo.lock("backup").await.expect("a dead holder's lock");
    held.release().await.unwrap();

    // A reused pid: ours, but the recorded start time is another process's.
    let mut reused = foreign(&host, std::process::id(), 280);
    reused.pid_start = process_start(std::process::id()).map(|s| s + 1);
    write_lock(&repo, &reused).await;
    repo.lock("backup")
        .await
        .expect("a reused pid")
        .release()
        .await
        .unwrap();

    // Alive (this very process, another lock): respected.
    let mut alive = foreign(&host, std::process::id(), 280);
    alive.pid_start = process_start(std::process::id());
    write_lock(&repo, &alive).await;
    assert_eq!(
        repo.lock("backup").await.err().unwrap().kind(),
        Kind::Locked
    );

    // Dead, but on another host (or another boot): only expiry frees it.
    write_lock(&repo, &foreign("elsewhere", dead_pid(), 280)).await;
    assert_eq!(
        repo.lock("backup").await.err().unwrap().kind(),
        Kind::Locked
    );
    let mut rebooted = foreign(&host, dead_pid(), 280);
    rebooted.boot_id = Some("another-boot".into());
    write_lock(&repo, &rebooted).await;
    assert_eq!(
        repo.lock("backup").await.err().unwrap().kind(),
        Kind::Locked
    );
}

/// Issue 9, defect 2: a holder paused past its expiry, whose lock was taken
/// over meanwhile, writes nothing more, and its error names the new holder.
#[test]
fn a_paused_holder_stops_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let ttl = Duration::from_secs(2);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let repo = open(&path);
    let lock = rt.block_on(repo.lock_with_ttl("backup", ttl)).unwrap();
    // Another process takes the lock over once it expired.
    let taker = std::thread::spawn(move || {
        std::thread::sleep(ttl + Duration::from_millis(1500));
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let repo = open(&path);
            let lock = repo
                .lock_with_ttl("expire", Duration::from_secs(60))
                .await?;
            let token = read_lock(&repo).await.map(|l| l.token);
            std::mem::forget(lock);
            Ok::<_, Error>(token)
        })
    });
    // The pause: this runtime's only thread sleeps, so nothing of the
    // holder runs (its renewals neither), as under SIGSTOP.
    std::thread::sleep(ttl + Duration::from_millis(2500));
    let taker_token = taker.join().unwrap().expect("the taker got the lock");
    rt.block_on(async {
        let e = repo
            .put_json("s/backup/x/manifest.pgv", &"late", PutMode::CreateNew)
            .await
            .expect_err("a write after the lock was lost");
        assert_eq!(e.kind(), Kind::Locked, "{e}");
        let text = e.to_string();
        assert!(text.contains("taken over by expire"), "{text}");
        assert!(text.contains("manifest.pgv"), "{text}");
        assert!(repo
            .backend()
            .get("s/backup/x/manifest.pgv")
            .await
            .unwrap()
            .is_none());
        assert!(lock.check().await.is_err());
        assert!(
            lock.release().await.is_err(),
            "a lost lock released quietly"
        );
        // The new holder's lock is untouched.
        assert_eq!(read_lock(&repo).await.map(|l| l.token), taker_token);
    });
}

/// A renewal that is refused is visible to the command, not only logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_renewal_is_visible() {
    let dir = tempfile::tempdir().unwrap();
    let repo = open(dir.path());
    let lock = repo
        .lock_with_ttl("backup", Duration::from_secs(3))
        .await
        .unwrap();
    let other = open(dir.path());
    let thief = foreign("elsewhere", 77, 200);
    write_lock(&other, &thief).await;
    tokio::time::timeout(Duration::from_secs(10), lock.lost())
        .await
        .expect("the holder noticed within two renewals");
    let e = lock.check().await.unwrap_err();
    assert!(e.to_string().contains("pid 77 on elsewhere"), "{e}");
    let e = repo.backend().delete("s/anything").await.unwrap_err();
    assert_eq!(e.kind(), Kind::Locked);
    assert!(lock.release().await.is_err());
    assert_eq!(read_lock(&other).await.unwrap().token, thief.token);
}

#[test]
fn durations_read_as_durations() {
    assert_eq!(human_secs(0), "0s");
    assert_eq!(human_secs(59), "59s");
    assert_eq!(human_secs(252), "4m12s");
    assert_eq!(human_secs(7500), "2h05m");
    assert_eq!(rfc3339(1_796_302_558), "2026-12-03T12:55:58Z");
}
