//! Metrics for Prometheus (issue 13): `info --output openmetrics` parses
//! with a real parser (Python's prometheus_client: its strict OpenMetrics
//! parser, and its Prometheus text parser, as node_exporter's textfile
//! collector reads files) and its values are those of `info --output
//! json`; `exporter` serves the same on /metrics from a cache, never
//! reading the repository per scrape (the repository is moved away between
//! scrapes, and the scrapes still answer from the one read); `check`'s
//! thresholds pass and fail with their exit codes.

use crate::common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const EXIT_THRESHOLD: i32 = 13;

/// name → [(labels, value)]
type Samples = BTreeMap<String, Vec<(BTreeMap<String, String>, f64)>>;

/// Parses `text` with prometheus_client's OpenMetrics parser (every
/// sample) and its Prometheus text parser (it must accept it too).
#[track_caller]
fn parse(text: &str) -> Samples {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics
from prometheus_client.parser import text_string_to_metric_families as prometheus_text
text = sys.stdin.read()
out = [[s.name, s.labels, s.value] for f in openmetrics(text) for s in f.samples]
list(prometheus_text(text))
print(json.dumps(out))
"#;
    let python = std::env::var("PGVAULT_TEST_PYTHON")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| "python3".into());
    let mut child = std::process::Command::new(&python)
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {python}: {e} (scripts/test.sh sets PGVAULT_TEST_PYTHON)"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "prometheus_client refused the metrics (or is not installed: scripts/test.sh installs it):\n{}\n--- metrics\n{text}",
        String::from_utf8_lossy(&o.stderr)
    );
    let list: Vec<(String, BTreeMap<String, String>, f64)> =
        serde_json::from_slice(&o.stdout).unwrap();
    let mut out = Samples::new();
    for (name, labels, v) in list {
        out.entry(name).or_default().push((labels, v));
    }
    out
}

/// The one sample of `name` whose labels include `labels`.
#[track_caller]
fn value(s: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = s
        .get(name)
        .unwrap_or_else(|| panic!("no metric {name} in {:?}", s.keys().collect::<Vec<_>>()))
        .iter()
        .filter(|(l, _)| {
            labels
                .iter()
                .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(found.len(), 1, "{name}{labels:?}: {found:?}");
    found[0]
}

fn epoch(t: &Value) -> f64 {
    chrono::DateTime::parse_from_rfc3339(t.as_str().unwrap_or_else(|| panic!("not a time: {t}")))
        .unwrap()
        .timestamp_micros() as f64
        / 1e6
}

#[track_caller]
fn close(a: f64, b: f64, within: f64, what: &str) {
    assert!((a - b).abs() <= within, "{what}: {a} vs {b}");
}

/// Every metric is labelled with the stanza and repository, and the values
/// are those of `info --output json` (`j`). Ages may differ by the time
/// between the two reads.
#[track_caller]
fn matches_info(s: &Samples, j: &Value) {
    let repo = j["repository"].as_str().unwrap();
    for (name, samples) in s {
        for (l, _) in samples {
            assert!(
                l.get("stanza").map(String::as_str) == Some("main")
                    && l.get("repo").map(String::as_str) == Some(repo),
                "{name} {l:?}"
            );
        }
    }
    let v = |name: &str| value(s, name, &[]);
    assert_eq!(v("pgvault_up"), 1.0);
    assert_eq!(
        v("pgvault_stanza_pg_version"),
        j["stanza"]["pg_version"].as_f64().unwrap()
    );
    // Backups.
    let backups = j["backups"].as_array().unwrap();
    let last = backups.last().unwrap();
    let full = [("type", "full")];
    assert_eq!(value(s, "pgvault_backups", &full), backups.len() as f64);
    assert_eq!(
        value(s, "pgvault_backup_last_size_bytes", &full),
        last["original_size"].as_f64().unwrap()
    );
    assert_eq!(
        value(s, "pgvault_backup_last_stored_bytes", &full),
        last["stored_size"].as_f64().unwrap()
    );
    close(
        value(s, "pgvault_backup_last_timestamp_seconds", &full),
        epoch(&last["stop_time"]),
        1e-3,
        "backup end",
    );
    close(
        value(s, "pgvault_backup_last_duration_seconds", &full),
        epoch(&last["stop_time"]) - epoch(&last["start_time"]),
        1e-3,
        "backup duration",
    );
    close(
        value(s, "pgvault_backup_last_age_seconds", &full),
        epoch(&j["generated_at"]) - epoch(&last["stop_time"]),
        30.0,
        "backup age",
    );
    assert_eq!(v("pgvault_backups_with_bad_pages"), 0.0);
    // WAL.
    for t in j["timelines"].as_array().unwrap() {
        let tl = t["timeline"].to_string();
        assert_eq!(
            value(s, "pgvault_wal_archived_segments", &[("timeline", &tl)]),
            t["segments"].as_f64().unwrap()
        );
        let superseded = t["superseded"]["files"].as_array().map_or(0, Vec::len);
        assert_eq!(
            value(s, "pgvault_wal_superseded_segments", &[("timeline", &tl)]),
            superseded as f64
        );
        assert_eq!(
            value(s, "pgvault_wal_dropped_segments", &[("timeline", &tl)]),
            0.0
        );
    }
    let gaps: usize = j["timelines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["gaps"].as_array().unwrap().len())
        .sum();
    assert_eq!(v("pgvault_wal_gaps"), gaps as f64);
    assert_eq!(v("pgvault_wal_missing_segments"), 0.0);
    let newest = &j["newest_archived_wal"];
    close(
        v("pgvault_wal_newest_archived_timestamp_seconds"),
        epoch(&newest["archived_at"]),
        1e-3,
        "newest WAL",
    );
    assert_eq!(
        v("pgvault_wal_newest_archived_timeline"),
        newest["timeline"].as_f64().unwrap()
    );
    close(
        v("pgvault_wal_newest_commit_timestamp_seconds"),
        epoch(&j["newest_commit_time"]),
        1e-3,
        "newest commit",
    );
    close(
        v("pgvault_rpo_seconds"),
        j["rpo_seconds"].as_f64().unwrap(),
        30.0,
        "RPO",
    );
    let rc = &j["timelines"].as_array().unwrap().last().unwrap()["recoverable"];
    close(
        v("pgvault_recoverable_start_timestamp_seconds"),
        epoch(&rc["from_time"]),
        1e-3,
        "window start",
    );
    close(
        v("pgvault_recoverable_end_timestamp_seconds"),
        epoch(&rc["to_time"]),
        1e-3,
        "window end",
    );
    // Verify and drill results.
    let lv = &j["last_verify"];
    assert_eq!(v("pgvault_verify_last_success"), 1.0);
    assert_eq!(
        v("pgvault_verify_last_problems"),
        lv["problems"].as_f64().unwrap()
    );
    close(
        v("pgvault_verify_last_timestamp_seconds"),
        epoch(&lv["finished_at"]),
        1e-3,
        "verify",
    );
    let ld = &j["last_drill"];
    assert_eq!(v("pgvault_drill_last_success"), 1.0);
    assert_eq!(
        v("pgvault_drill_last_rto_seconds"),
        ld["rto_seconds"].as_f64().unwrap()
    );
    assert_eq!(
        v("pgvault_drill_last_rpo_seconds"),
        ld["rpo_seconds"].as_f64().unwrap()
    );
    close(
        v("pgvault_drill_last_timestamp_seconds"),
        epoch(&ld["finished_at"]),
        1e-3,
        "drill",
    );
    // The server's archiver, and the spool.
    let a = &j["archiver"];
    assert_eq!(a["reachable"], true, "{a}");
    assert_eq!(v("pgvault_postgres_up"), 1.0);
    assert_eq!(
        v("pgvault_archive_push_failures_total"),
        a["failed_count"].as_f64().unwrap()
    );
    assert_eq!(
        v("pgvault_archive_pushed_total"),
        a["archived_count"].as_f64().unwrap()
    );
    close(
        v("pgvault_archive_lag_bytes"),
        a["lag_bytes"].as_f64().unwrap(),
        1048576.0,
        "archive lag",
    );
    assert_eq!(
        v("pgvault_archive_lag_segments"),
        a["lag_segments"].as_f64().unwrap()
    );
    match j["spool"]["pushed_ahead"].as_f64() {
        Some(n) => assert_eq!(v("pgvault_spool_queue_files"), n),
        None => assert!(!s.contains_key("pgvault_spool_queue_files")),
    }
}

/// `GET /metrics`: the status line, the content type and the body.
fn scrape(port: u16) -> (String, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(
        b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: application/openmetrics-text\r\n\r\n",
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.lines().next().unwrap().to_string();
    let ctype = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap_or_default()
        .to_string();
    (status, ctype, body.to_string())
}

#[test]
fn openmetrics_match_info_and_the_exporter_serves_them_from_a_cache() {
    let env = TestEnv::new();
    let repo = env.local_repo("main");
    let pg = Cluster::archiving(&env, &repo, true);
    pg.psql("create table t as select g as id, md5(g::text) as v from generate_series(1, 3000) g");
    backup(&env, &repo, &pg);
    pg.psql("insert into t select g, 'after' from generate_series(3001, 3100) g");
    let seg = pg.switch_wal();
    pg.wait_archived(&seg, Duration::from_secs(120));
    repo.run(&env, As::PgUser, &["verify"], env.dir()).ok();
    let base = env.mkdir("scratch", As::PgUser);
    let b = base.display().to_string();
    repo.run(&env, As::PgUser, &["drill", "--scratch-dir", &b], env.dir())
        .ok();

    let host = pg.sockdir().display().to_string();
    let port = pg.port().to_string();
    let conn = ["--pg-host", host.as_str(), "--pg-port", port.as_str()];
    let info = |output: &str| {
        let mut args = vec!["info", "--output", output];
        args.extend_from_slice(&conn);
        let run = repo.run(&env, As::PgUser, &args, env.dir());
        run.ok();
        run.stdout
    };
    let j: Value = serde_json::from_str(&info("json")).unwrap();
    let text = info("openmetrics");
    assert!(text.ends_with("# EOF\n"), "{text}");
    matches_info(&parse(&text), &j);

    // The exporter: one read of the repository, however many scrapes.
    let http = free_port();
    let listen = format!("127.0.0.1:{http}");
    let mut args: Vec<String> = repo.args();
    args.extend(
        [
            "--log-level",
            "info",
            "exporter",
            "--listen",
            &listen,
            "--exporter-refresh",
            "10m",
        ]
        .map(String::from),
    );
    args.extend(conn.map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let exporter = env.spawn_pgvault(As::PgUser, &args, &repo.env, env.dir());
    let deadline = Instant::now() + Duration::from_secs(60);
    while TcpStream::connect(("127.0.0.1", http)).is_err() {
        assert!(
            Instant::now() < deadline,
            "the exporter does not listen on {listen}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, ctype, body) = scrape(http);
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        ctype.starts_with("application/openmetrics-text; version=1.0.0"),
        "{ctype}"
    );
    let first = parse(&body);
    matches_info(&first, &j);
    assert_eq!(value(&first, "pgvault_exporter_refreshes_total", &[]), 1.0);
    // The alert rules and the dashboard use only metrics that exist.
    for file in [
        "contrib/prometheus/pgvault-alerts.yml",
        "contrib/grafana/pgvault-dashboard.json",
    ] {
        let text = fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file))
            .unwrap();
        for (i, _) in text.match_indices("pgvault_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                first.contains_key(&name),
                "{file} uses {name}, which pgvault does not export"
            );
        }
    }
    // With the repository gone, scrapes still answer from the one read.
    let dir = repo.local.clone().unwrap();
    let moved = dir.with_extension("moved");
    fs::rename(&dir, &moved).unwrap();
    for _ in 0..3 {
        let (status, _, body) = scrape(http);
        assert_eq!(status, "HTTP/1.1 200 OK");
        let s = parse(&body);
        matches_info(&s, &j);
        assert_eq!(value(&s, "pgvault_exporter_refreshes_total", &[]), 1.0);
    }
    fs::rename(&moved, &dir).unwrap();
    exporter.terminate();
    let run = finish(exporter, Duration::from_secs(60));
    run.ok();
    assert_eq!(
        run.stderr.matches("exporter: refresh ").count(),
        1,
        "one read of the repository for four scrapes:\n{}",
        run.stderr
    );

    // check's thresholds, for cron and Nagios-style monitors.
    let check = |extra: &[&str]| {
        let mut args = vec!["check"];
        args.extend_from_slice(&conn);
        args.extend_from_slice(extra);
        repo.run(&env, As::PgUser, &args, env.dir())
    };
    let ok = check(&["--max-backup-age", "1h", "--max-archive-lag", "64MiB"]);
    ok.ok();
    assert!(ok.stdout.starts_with("PGVAULT CHECK OK: "), "{}", ok.stdout);
    std::thread::sleep(Duration::from_secs(2));
    let old = check(&["--max-backup-age", "1s"]);
    old.expect_code(EXIT_THRESHOLD);
    assert!(
        old.stdout.starts_with("PGVAULT CHECK CRITICAL: ")
            && old.stdout.contains("backup age")
            && old.stdout.contains("over the max 1.0s"),
        "{}",
        old.stdout
    );
}
