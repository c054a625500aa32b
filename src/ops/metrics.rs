//! Metrics in the OpenMetrics text format (`info --output openmetrics`,
//! `exporter`), made from an [`InfoReport`]: every value is one `info
//! --output json` shows, so the two never disagree.
//!
//! Names follow Prometheus conventions: `pgvault_` first, the unit last
//! (`_seconds`, `_bytes`), counters' samples end in `_total`; every
//! series is labelled with `stanza` and `repo`. Ages are computed at
//! `now` from the report's timestamps, so a cached report still gives
//! current ages. The output is also read by the Prometheus text parser
//! (node_exporter's textfile collector): `# UNIT` and `# EOF` are comments
//! there, and a counter is seen as untyped.

use std::fmt::Write;

use chrono::{DateTime, Utc};

use crate::ops::info::InfoReport;
use crate::pg::WalFileName;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    Gauge,
    Counter,
}

/// One metric family and its samples.
#[derive(Debug, Clone)]
pub struct Family {
    /// Without `_total` for a counter.
    pub name: String,
    pub help: &'static str,
    pub kind: MetricType,
    /// Extra labels (beyond `stanza` and `repo`) and the value of each sample.
    pub samples: Vec<(Vec<(&'static str, String)>, f64)>,
}

/// Families of one stanza and repository, labelled with both.
pub struct Families {
    base: Vec<(&'static str, String)>,
    pub list: Vec<Family>,
}

impl Families {
    pub fn new(stanza: &str, repo: &str) -> Families {
        Families {
            base: vec![("stanza", stanza.to_string()), ("repo", repo.to_string())],
            list: Vec::new(),
        }
    }

    fn family(&mut self, name: &str, help: &'static str, kind: MetricType) -> &mut Family {
        if let Some(i) = self.list.iter().position(|f| f.name == name) {
            return &mut self.list[i];
        }
        self.list.push(Family {
            name: name.to_string(),
            help,
            kind,
            samples: Vec::new(),
        });
        self.list.last_mut().expect("just pushed")
    }

    /// One gauge sample (nothing when the value is unknown).
    pub fn gauge(
        &mut self,
        name: &str,
        help: &'static str,
        labels: &[(&'static str, String)],
        v: Option<f64>,
    ) {
        self.add(name, help, MetricType::Gauge, labels, v);
    }

    /// One counter sample; `name` without `_total`.
    pub fn counter(&mut self, name: &str, help: &'static str, v: Option<f64>) {
        self.add(name, help, MetricType::Counter, &[], v);
    }

    fn add(
        &mut self,
        name: &str,
        help: &'static str,
        kind: MetricType,
        labels: &[(&'static str, String)],
        v: Option<f64>,
    ) {
        let Some(v) = v.filter(|v| v.is_finite()) else {
            return;
        };
        let mut all = self.base.clone();
        all.extend(labels.iter().cloned());
        self.family(name, help, kind).samples.push((all, v));
    }

    /// Adds `other`'s samples (another repository's) to the families of
    /// the same name: OpenMetrics allows each family once.
    pub fn merge(&mut self, other: Families) {
        for f in other.list {
            self.family(&f.name, f.help, f.kind)
                .samples
                .extend(f.samples);
        }
    }

    /// The OpenMetrics text, ending with `# EOF`.
    pub fn encode(&self) -> String {
        let mut s = String::new();
        for f in self.list.iter().filter(|f| !f.samples.is_empty()) {
            let (typ, suffix) = match f.kind {
                MetricType::Gauge => ("gauge", ""),
                MetricType::Counter => ("counter", "_total"),
            };
            let _ = writeln!(s, "# TYPE {} {typ}", f.name);
            for unit in ["seconds", "bytes"] {
                if f.name.ends_with(&format!("_{unit}")) {
                    let _ = writeln!(s, "# UNIT {} {unit}", f.name);
                }
            }
            let _ = writeln!(s, "# HELP {} {}", f.name, f.help);
            for (labels, v) in &f.samples {
                let labels: Vec<String> = labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                    .collect();
                let _ = writeln!(
                    s,
                    "{}{suffix}{{{}}} {}",
                    f.name,
                    labels.join(","),
                    number(*v)
                );
            }
        }
        s.push_str("# EOF\n");
        s
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Integers without a fraction, others as Rust writes them (both valid).
fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Seconds since the epoch of an RFC 3339 time.
fn ts(t: &str) -> Option<f64> {
    DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|d| d.timestamp_micros() as f64 / 1e6)
}

fn age(now: &DateTime<Utc>, t: Option<f64>) -> Option<f64> {
    t.map(|t| (now.timestamp_micros() as f64 / 1e6 - t).max(0.0))
}

fn flag(b: bool) -> Option<f64> {
    Some(if b { 1.0 } else { 0.0 })
}

/// The families `info` knows of, ages as of `now`.
pub fn families(r: &InfoReport, now: &DateTime<Utc>) -> Families {
    let mut m = Families::new(&r.stanza.name, &r.repository);
    m.gauge("pgvault_up", "1: the repository was read", &[], Some(1.0));
    m.gauge(
        "pgvault_stanza_pg_version",
        "PostgreSQL major of the cluster archiving now",
        &[],
        Some(f64::from(r.stanza.pg_version)),
    );
    wal(&mut m, r, now);
    backups(&mut m, r, now);
    results(&mut m, r, now);
    if let Some(a) = &r.archiver {
        m.gauge(
            "pgvault_postgres_up",
            "1: the server answered (its archiver's state is known)",
            &[],
            flag(a.reachable),
        );
        if let Some(st) = &a.status {
            m.gauge(
                "pgvault_archive_lag_bytes",
                "WAL the server wrote after the end of the last archived segment (pg_stat_archiver)",
                &[],
                st.lag_bytes.map(|v| v as f64),
            );
            m.gauge(
                "pgvault_archive_lag_segments",
                "Complete WAL segments waiting to be archived",
                &[],
                st.lag_segments.map(|v| v as f64),
            );
            m.counter(
                "pgvault_archive_push_failures",
                "archive_command failures (pg_stat_archiver.failed_count)",
                Some(st.failed_count as f64),
            );
            m.counter(
                "pgvault_archive_pushed",
                "Files archived (pg_stat_archiver.archived_count)",
                Some(st.archived_count as f64),
            );
            m.gauge(
                "pgvault_archive_failing",
                "1: the archiver's last attempt failed",
                &[],
                flag(st.failing),
            );
        }
    }
    if let Some(sp) = &r.spool {
        m.gauge(
            "pgvault_spool_queue_files",
            "Files pushed ahead by look-ahead archive-push, waiting for PostgreSQL's call",
            &[],
            Some(sp.pushed_ahead as f64),
        );
    }
    m
}

fn wal(m: &mut Families, r: &InfoReport, now: &DateTime<Utc>) {
    let seg = r.stanza.wal_segment_size;
    for t in &r.timelines {
        let tl = [("timeline", t.timeline.to_string())];
        m.gauge(
            "pgvault_wal_archived_segments",
            "WAL segments archived, by timeline",
            &tl,
            Some(t.segments as f64),
        );
        // A split brain (issue 9, defect 10): alert on > 0.
        m.gauge(
            "pgvault_wal_superseded_segments",
            "Segments of this timeline archived past the point where a later timeline's history left it (a split brain, or a PITR clone archiving here)",
            &tl,
            Some(t.superseded.as_ref().map_or(0, |s| s.files.len()) as f64),
        );
        // Several repositories: what this one missed (archive-push-queue-max).
        m.gauge(
            "pgvault_wal_dropped_segments",
            "Segments of this timeline dropped from this repository's archive-push queue, as its gap markers record",
            &tl,
            Some(t.dropped.iter().map(|d| d.files).sum::<u64>() as f64),
        );
    }
    let missing: u64 = r
        .timelines
        .iter()
        .flat_map(|t| &t.gaps)
        .filter_map(|g| {
            let a = WalFileName::parse(&g.from).ok()?.segno(seg)?;
            let b = WalFileName::parse(&g.to).ok()?.segno(seg)?;
            Some(b.0.saturating_sub(a.0) + 1)
        })
        .sum();
    let gaps = r.timelines.iter().map(|t| t.gaps.len()).sum::<usize>();
    m.gauge(
        "pgvault_wal_gaps",
        "Runs of missing segments between the first and last archived ones",
        &[],
        Some(gaps as f64),
    );
    m.gauge(
        "pgvault_wal_missing_segments",
        "Segments missing in those runs",
        &[],
        Some(missing as f64),
    );
    if let Some(w) = &r.newest_archived_wal {
        m.gauge(
            "pgvault_wal_newest_archived_timeline",
            "Timeline of the newest archived segment",
            &[],
            Some(f64::from(w.timeline)),
        );
        let end = WalFileName::parse(&w.name)
            .ok()
            .and_then(|n| n.segno(seg))
            .map(|s| s.next().start_lsn(seg).0 as f64);
        m.gauge(
            "pgvault_wal_newest_archived_end_bytes",
            "End of the newest archived segment, as a WAL position (rate() of it: archiving throughput)",
            &[],
            end,
        );
        let at = w.archived_at.as_deref().and_then(ts);
        m.gauge(
            "pgvault_wal_newest_archived_timestamp_seconds",
            "When the newest segment was archived",
            &[],
            at,
        );
        m.gauge(
            "pgvault_wal_newest_archived_age_seconds",
            "How long ago the newest segment was archived",
            &[],
            age(now, at),
        );
    }
    let commit = r.newest_commit_time.as_deref().and_then(ts);
    m.gauge(
        "pgvault_wal_newest_commit_timestamp_seconds",
        "The newest commit in the archived WAL",
        &[],
        commit,
    );
    m.gauge(
        "pgvault_rpo_seconds",
        "Age of the newest archived commit: what a disaster now would lose at most",
        &[],
        age(now, commit),
    );
    // The window of the newest timeline a backup recovers onto.
    if let Some(rc) = r
        .timelines
        .iter()
        .rev()
        .find_map(|t| t.recoverable.as_ref())
    {
        m.gauge(
            "pgvault_recoverable_start_timestamp_seconds",
            "The earliest moment a restore can reach (the oldest backup's end)",
            &[],
            ts(&rc.from_time),
        );
        m.gauge(
            "pgvault_recoverable_end_timestamp_seconds",
            "The latest moment a restore can reach (the last archived commit on the way)",
            &[],
            rc.to_time.as_deref().and_then(ts),
        );
    }
}

fn backups(m: &mut Families, r: &InfoReport, now: &DateTime<Utc>) {
    let mut types: Vec<&str> = r.backups.iter().map(|b| b.backup_type.as_str()).collect();
    types.sort();
    types.dedup();
    for typ in types {
        let l = [("type", typ.to_string())];
        let of_type: Vec<_> = r.backups.iter().filter(|b| b.backup_type == typ).collect();
        m.gauge(
            "pgvault_backups",
            "Complete backups, by type",
            &l,
            Some(of_type.len() as f64),
        );
        let Some(last) = of_type.last() else {
            continue;
        };
        let (start, stop) = (ts(&last.start_time), ts(&last.stop_time));
        m.gauge(
            "pgvault_backup_last_timestamp_seconds",
            "When the newest backup of the type ended",
            &l,
            stop,
        );
        m.gauge(
            "pgvault_backup_last_age_seconds",
            "How long ago the newest backup of the type ended",
            &l,
            age(now, stop),
        );
        m.gauge(
            "pgvault_backup_last_duration_seconds",
            "How long the newest backup of the type took (server clock, start to stop)",
            &l,
            start.zip(stop).map(|(a, b)| (b - a).max(0.0)),
        );
        m.gauge(
            "pgvault_backup_last_size_bytes",
            "Bytes of the files the newest backup of the type holds",
            &l,
            Some(last.original_size as f64),
        );
        m.gauge(
            "pgvault_backup_last_stored_bytes",
            "Bytes the newest backup of the type takes in the repository",
            &l,
            Some(last.stored_size as f64),
        );
    }
    let bad: Vec<usize> = r
        .backups
        .iter()
        .filter_map(|b| b.page_checksums.as_ref())
        .map(|pc| pc.bad_pages.len())
        .filter(|n| *n > 0)
        .collect();
    m.gauge(
        "pgvault_backups_with_bad_pages",
        "Backups that found data pages failing their checksum as they read them",
        &[],
        Some(bad.len() as f64),
    );
    m.gauge(
        "pgvault_backup_bad_pages",
        "Data pages failing their checksum, over all backups",
        &[],
        Some(bad.iter().sum::<usize>() as f64),
    );
}

fn results(m: &mut Families, r: &InfoReport, now: &DateTime<Utc>) {
    if let Some(v) = &r.last_verify {
        let at = ts(&v.finished_at);
        m.gauge(
            "pgvault_verify_last_timestamp_seconds",
            "When the last verify finished",
            &[],
            at,
        );
        m.gauge(
            "pgvault_verify_last_age_seconds",
            "How long ago the last verify finished",
            &[],
            age(now, at),
        );
        m.gauge(
            "pgvault_verify_last_success",
            "1: the last verify found no problem",
            &[],
            flag(v.passed),
        );
        m.gauge(
            "pgvault_verify_last_problems",
            "Problems the last verify found",
            &[],
            Some(v.problems as f64),
        );
        m.gauge(
            "pgvault_verify_last_duration_seconds",
            "How long the last verify took",
            &[],
            ts(&v.started_at).zip(at).map(|(a, b)| b - a),
        );
    }
    if let Some(d) = &r.last_drill {
        let at = ts(&d.finished_at);
        m.gauge(
            "pgvault_drill_last_timestamp_seconds",
            "When the last drill finished",
            &[],
            at,
        );
        m.gauge(
            "pgvault_drill_last_age_seconds",
            "How long ago the last drill finished",
            &[],
            age(now, at),
        );
        m.gauge(
            "pgvault_drill_last_success",
            "1: the last drill restored, recovered, passed every check and met its objectives",
            &[],
            flag(d.passed),
        );
        m.gauge(
            "pgvault_drill_last_rto_seconds",
            "The last drill's recovery time: restore start to consistent and promoted",
            &[],
            d.rto_seconds,
        );
        m.gauge(
            "pgvault_drill_last_rpo_seconds",
            "The last drill's recovery point: archived commits it did not bring back, in seconds",
            &[],
            d.rpo_seconds,
        );
        m.gauge(
            "pgvault_drill_last_duration_seconds",
            "How long the last drill took",
            &[],
            ts(&d.started_at).zip(at).map(|(a, b)| b - a),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_openmetrics() {
        let mut m = Families::new("main", "/r\"x");
        m.gauge(
            "pgvault_backups",
            "Backups",
            &[("type", "full".into())],
            Some(2.0),
        );
        m.gauge("pgvault_rpo_seconds", "RPO", &[], Some(1.5));
        m.gauge("pgvault_nothing", "never", &[], None);
        m.counter("pgvault_archive_push_failures", "Failures", Some(3.0));
        let text = m.encode();
        assert_eq!(
            text,
            "# TYPE pgvault_backups gauge\n\
             # HELP pgvault_backups Backups\n\
             pgvault_backups{stanza=\"main\",repo=\"/r\\\"x\",type=\"full\"} 2\n\
             # TYPE pgvault_rpo_seconds gauge\n\
             # UNIT pgvault_rpo_seconds seconds\n\
             # HELP pgvault_rpo_seconds RPO\n\
             pgvault_rpo_seconds{stanza=\"main\",repo=\"/r\\\"x\"} 1.5\n\
             # TYPE pgvault_archive_push_failures counter\n\
             # HELP pgvault_archive_push_failures Failures\n\
             pgvault_archive_push_failures_total{stanza=\"main\",repo=\"/r\\\"x\"} 3\n\
             # EOF\n"
        );
    }

    #[test]
    fn several_repositories_share_each_family() {
        let mut a = Families::new("main", "/one");
        a.gauge("pgvault_up", "up", &[], Some(1.0));
        let mut b = Families::new("main", "s3://two");
        b.gauge("pgvault_up", "up", &[], Some(1.0));
        a.merge(b);
        let text = a.encode();
        assert_eq!(text.matches("# TYPE pgvault_up gauge").count(), 1, "{text}");
        assert!(
            text.contains("repo=\"/one\"} 1") && text.contains("repo=\"s3://two\"} 1"),
            "{text}"
        );
    }
}
