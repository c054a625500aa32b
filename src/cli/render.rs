//! Rendering results for people (text) and programs (JSON).

use std::io::Write;

use super::args::Output;
use crate::error::{Error, Result};
use crate::ops::check::CheckReport;
use crate::ops::drill::{duration_text, DrillReport};
use crate::ops::expire::ExpireReport;
use crate::ops::info::{BackupReport, InfoReport, TimelineReport};
use crate::ops::restore::{RestoreOptions, Restored};
use crate::ops::stanza_create::StanzaCreated;
use crate::ops::stanza_upgrade::{StanzaUpgraded, UpgradeOutcome};
use crate::ops::verify::VerifyReport;
use crate::ops::walfacts::BackfillReport;
use crate::repo::manifest::Manifest;
use crate::repo::stanza::CreateOutcome;
use crate::repo::Repository;
use crate::spool::QueueState;

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn out(text: &str) -> Result<()> {
    let mut o = std::io::stdout().lock();
    match o.write_all(text.as_bytes()).and_then(|_| o.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::internal(format!("write to stdout: {e}"))),
    }
}

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v.fract() == 0.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

pub fn stanza_created(repo: &Repository, r: &StanzaCreated) {
    let verb = match r.outcome {
        CreateOutcome::Created => "created",
        CreateOutcome::AlreadyExists => "already exists",
    };
    eprintln!(
        "stanza {:?} {verb} in {} (system identifier {}, PostgreSQL {}, WAL segments of {})",
        repo.stanza(),
        repo.describe(),
        r.db.system_identifier,
        r.db.pg_version,
        bytes(r.db.wal_segment_size as u64)
    );
}

pub fn stanza_upgraded(repo: &Repository, r: &StanzaUpgraded) {
    match r.outcome {
        UpgradeOutcome::AlreadyCurrent => eprintln!(
            "stanza {:?} already archives this cluster (system identifier {}, PostgreSQL {}, \
             archive {}): nothing to upgrade",
            repo.stanza(),
            r.db.system_identifier,
            r.db.pg_version,
            r.db.dir()
        ),
        UpgradeOutcome::Upgraded => eprintln!(
            "stanza {:?} upgraded in {}: now archives system identifier {}, PostgreSQL {} \
             into archive {} (was {}, PostgreSQL {}, archive {}, kept for its backups)",
            repo.stanza(),
            repo.describe(),
            r.db.system_identifier,
            r.db.pg_version,
            r.db.dir(),
            r.previous.system_identifier,
            r.previous.pg_version,
            r.previous.dir()
        ),
    }
}

fn json<T: serde::Serialize>(v: &T) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v).map_err(|e| Error::internal(e.to_string()))?;
    s.push('\n');
    out(&s)
}

/// With one repository, its report as it always was; with several, one
/// after the other (text), or `{"schema_version": 1, "repositories":
/// [...]}` (JSON).
pub fn info_all(reports: &[InfoReport], several: bool, output: Output) -> Result<()> {
    match (output, several) {
        (Output::Json, false) => reports.iter().try_for_each(json),
        (Output::Json, true) => json(&serde_json::json!({
            "schema_version": crate::ops::info::INFO_SCHEMA_VERSION,
            "repositories": reports,
        })),
        (Output::Text, _) => {
            let text: Vec<String> = reports.iter().map(|r| info_text(r, several)).collect();
            out(&text.join("\n"))
        }
    }
}

/// A repository's archive-push queue on this host, in one line.
pub fn queue_line(q: &QueueState) -> String {
    let mut s = match (&q.oldest, &q.newest) {
        (Some(a), Some(b)) => format!(
            "{} file(s) ({}) queued in this host's spool, {a} … {b}",
            q.files,
            bytes(q.bytes)
        ),
        _ => "nothing queued in this host's spool".to_string(),
    };
    if q.files > 0 {
        s += if q.pusher_running {
            ", pusher running"
        } else {
            ", no pusher running (the next archive-push starts one)"
        };
    }
    let dropped = q.dropped_pending.len() + q.dropped_recorded.len();
    if dropped > 0 {
        s += &format!(
            "; {dropped} file(s) dropped from the queue ({} not yet marked in the repository)",
            q.dropped_pending.len()
        );
    }
    s
}

/// Each repository's report: text one after the other, JSON as one
/// report (one repository) or `{"schema_version": 1, "repositories":
/// [{"repository": N, "describe": …, "report": …}]}`.
pub fn verify_all(reports: &[(u8, String, VerifyReport)], output: Output) -> Result<()> {
    let several = reports.len() > 1;
    if output == Output::Json && several {
        let all: Vec<serde_json::Value> = reports
            .iter()
            .map(|(n, d, r)| serde_json::json!({"repository": n, "describe": d, "report": r}))
            .collect();
        return json(&serde_json::json!({"schema_version": 1, "repositories": all}));
    }
    for (n, d, r) in reports {
        if several && output == Output::Text {
            out(&format!("repository {n}: {d}\n"))?;
        }
        verify(r, output)?;
    }
    Ok(())
}

/// `info --output openmetrics`: ages as of each report; several
/// repositories' samples under one family each (labelled `repo`).
pub fn metrics(reports: &[InfoReport]) -> Result<()> {
    let mut all: Option<crate::ops::metrics::Families> = None;
    for report in reports {
        let now = chrono::DateTime::parse_from_rfc3339(&report.generated_at)
            .map(|t| t.with_timezone(&chrono::Utc))
            .unwrap_or_else(|_| chrono::Utc::now());
        let f = crate::ops::metrics::families(report, &now);
        match &mut all {
            Some(a) => a.merge(f),
            None => all = Some(f),
        }
    }
    match all {
        Some(a) => out(&a.encode()),
        None => Ok(()),
    }
}

pub fn drill(r: &DrillReport, output: Output) -> Result<()> {
    if output == Output::Json {
        return json(r);
    }
    let mut s = format!(
        "drill of stanza {} ({}): {}\n",
        r.stanza,
        r.repository,
        if r.passed { "PASSED" } else { "FAILED" }
    );
    if let Some(b) = &r.backup {
        s += &format!(
            "  backup {}: ended {} at {}, {}\n",
            b.label,
            b.stop_time,
            b.stop_lsn,
            bytes(b.original_size)
        );
        for p in &b.bad_pages_at_backup {
            s += &format!("  the backup itself found a page failing its checksum: {p}\n");
        }
    }
    if let Some(t) = &r.target {
        s += &format!("  target: {t}\n");
    }
    if let Some(sv) = &r.server {
        s += &format!(
            "  server: PostgreSQL {} ({}) as {} (role {}), socket {} only (listen_addresses '{}'), archive_mode {}, data checksums {}\n",
            sv.version,
            sv.bin_dir,
            sv.os_user,
            sv.role,
            sv.socket_dir,
            sv.listen_addresses,
            sv.archive_mode,
            if sv.data_checksums { "on" } else { "off" }
        );
    }
    if let Some(sp) = &r.space {
        s += &format!(
            "  space: needed {} ({} backup, {} WAL), {} free\n",
            bytes(sp.needed_bytes),
            bytes(sp.backup_bytes),
            bytes(sp.wal_bytes),
            bytes(sp.available_bytes)
        );
    }
    s += "  phases:\n";
    for p in &r.phases {
        let moved = match (p.bytes, p.bytes_per_second) {
            (Some(b), Some(rate)) => format!("  {} at {}/s", bytes(b), bytes(rate as u64)),
            (Some(b), None) => format!("  {}", bytes(b)),
            _ => String::new(),
        };
        s += &format!(
            "    {:<15} {:>9}{moved}\n",
            p.name,
            duration_text(p.seconds)
        );
    }
    s += "  checks:\n";
    for c in &r.checks {
        s += &format!(
            "    {}: {} ({})\n",
            c.name,
            if c.passed { "passed" } else { "FAILED" },
            duration_text(c.seconds)
        );
        for d in &c.detail {
            s += &format!("      {d}\n");
        }
    }
    let objective = |got: Option<f64>, want: Option<f64>| match (got, want) {
        (Some(g), Some(w)) => format!(
            " (objective {}: {})",
            duration_text(w),
            if g <= w { "met" } else { "MISSED" }
        ),
        _ => String::new(),
    };
    if let Some(rto) = r.rto_seconds {
        s += &format!(
            "  RTO {}{}: restore start to consistent and promoted\n",
            duration_text(rto),
            objective(r.rto_seconds, r.rto_objective_seconds)
        );
    }
    if let Some(rpo) = r.rpo_seconds {
        s += &format!(
            "  RPO {}{}: newest archived commit {}, recovered to {}\n",
            duration_text(rpo),
            objective(r.rpo_seconds, r.rpo_objective_seconds),
            r.newest_archived_commit.as_deref().unwrap_or("none"),
            r.recovered_to.as_deref().unwrap_or("the backup's end")
        );
    }
    if let Some(d) = &r.scratch_dir {
        s += &format!(
            "  scratch directory {}: {}\n",
            d,
            if r.kept { "kept" } else { "removed" }
        );
    }
    for f in &r.failures {
        s += &format!("  FAILED at {}: {}\n", f.step, f.message);
    }
    out(&s)
}

/// One status line on stdout, for cron mail and Nagios-style monitors:
/// `PGVAULT CHECK OK: …` or `PGVAULT CHECK CRITICAL: …`, every threshold
/// with its value and limit.
pub fn check_thresholds(r: &CheckReport) -> Result<()> {
    let ok = r.thresholds.iter().all(|t| t.met());
    let mut parts = vec![format!(
        "archiving works ({} reached the repository)",
        r.segment
    )];
    for t in &r.thresholds {
        let show = |v: f64| match t.name {
            "archive lag" => bytes(v as u64),
            _ => duration_text(v),
        };
        let value = match (t.value, &t.note) {
            (Some(v), _) => show(v),
            (None, Some(n)) => n.clone(),
            (None, None) => "unknown".into(),
        };
        parts.push(format!(
            "{} {value} ({}max {})",
            t.name,
            if t.met() { "" } else { "over the " },
            show(t.limit)
        ));
    }
    out(&format!(
        "PGVAULT CHECK {}: {}\n",
        if ok { "OK" } else { "CRITICAL" },
        parts.join("; ")
    ))
}

fn verify(r: &VerifyReport, output: Output) -> Result<()> {
    if output == Output::Json {
        return json(r);
    }
    let mut s = String::new();
    if let Some(n) = r.sealed {
        s += &format!("sealed {n} plaintext object(s)\n");
    }
    if let Some(e) = &r.encryption {
        s += &encryption_line(e);
    }
    for p in &r.problems {
        s += &format!("{}: {}: {}\n", p.kind, p.what, p.detail);
    }
    for o in &r.orphans {
        s += &format!("orphan {}: {}: {}\n", o.kind.as_str(), o.what, o.detail);
    }
    s += &format!(
        "verify {}: {} WAL objects, {} backups ({} objects), {} read: {}{}\n",
        r.stanza,
        r.wal_objects,
        r.backups,
        r.backup_objects,
        bytes(r.bytes_read),
        if r.problems.is_empty() {
            "no problems".to_string()
        } else {
            format!("{} problem(s)", r.problems.len())
        },
        if r.orphans.is_empty() {
            String::new()
        } else {
            format!(
                "; {} orphan(s) left by killed or failed commands (`pgvault expire` removes them)",
                r.orphans.len()
            )
        }
    );
    out(&s)
}

pub fn backfill(r: &BackfillReport, output: Output) -> Result<()> {
    if output == Output::Json {
        return json(r);
    }
    let mut s = String::new();
    for d in &r.damaged {
        s += &format!("damaged record: {d}\n");
    }
    s += &format!(
        "backfill: {} segment(s) summarized now, block references written for {}, {} had both already\n",
        r.summarized, r.blockrefs, r.had_summary
    );
    out(&s)
}

/// How much of an encrypted stanza is still plaintext, in one line.
fn encryption_line(e: &crate::repo::sealing::SealingReport) -> String {
    if e.plaintext_objects == 0 {
        return format!("encryption: all {} objects sealed\n", e.objects);
    }
    format!(
        "encryption: {} of {} objects still plaintext ({} of {}; {} of them backup data, sealed only by new backups)\n",
        e.plaintext_objects,
        e.objects,
        bytes(e.plaintext_bytes),
        bytes(e.bytes),
        e.plaintext_backup_objects
    )
}

pub fn key_added(repo: &Repository, a: &crate::ops::key::KeyAdded) {
    if let Some(id) = &a.initialized {
        eprintln!(
            "pgvault: stanza {} is encrypted from now on, with key {id}",
            repo.stanza()
        );
    }
    if let Some((id, already)) = &a.added {
        if *already {
            eprintln!("pgvault: key {id} opens stanza {} already", repo.stanza());
        } else {
            eprintln!(
                "pgvault: key {id} added: it opens stanza {} too",
                repo.stanza()
            );
        }
    }
}

pub fn key_list(keys: &[crate::repo::keys::KeyListing], output: Output) -> Result<()> {
    if output == Output::Json {
        return json(&keys);
    }
    let mut s = String::new();
    for k in keys {
        let mark = if k.configured { "  (configured)" } else { "" };
        s += &format!("{}  created {}{mark}\n", k.id, k.created_at);
    }
    if keys.is_empty() {
        s += "no keys: the stanza is not encrypted\n";
    }
    out(&s)
}

fn info_text(r: &InfoReport, several: bool) -> String {
    let mut s = String::new();
    let st = &r.stanza;
    s += &format!("stanza: {}\n", st.name);
    if let Some(e) = &r.encryption {
        s += "    ";
        s += &encryption_line(e);
    }
    if several || r.repository_number > 1 {
        s += &format!("    repository {}: {}\n", r.repository_number, r.repository);
    } else {
        s += &format!("    repository: {}\n", r.repository);
    }
    if let Some(q) = &r.archive_push_queue {
        s += &format!("    archive-push queue: {}\n", queue_line(q));
        for d in &q.dropped_pending {
            s += &format!(
                "    DROPPED {} at {} ({}): gap marker not in the repository yet\n",
                d.name, d.dropped_at, d.reason
            );
        }
    }
    if r.dbs.len() <= 1 {
        s += &format!(
            "    cluster: PostgreSQL {}, system identifier {}, WAL segments of {}\n",
            st.pg_version,
            st.system_identifier,
            bytes(st.wal_segment_size as u64)
        );
        info_backups(&mut s, r.backups.iter(), "    ");
        info_timelines(&mut s, &r.timelines, "    ");
        info_rpo(&mut s, r);
        return s;
    }
    // After pg_upgrade: each cluster with its own backups and archive.
    for db in r.dbs.iter().rev() {
        s += &format!(
            "    cluster {} ({}): PostgreSQL {}, system identifier {}, WAL segments of {}, archive {}\n",
            db.db_id,
            if db.current { "current" } else { "before pg_upgrade" },
            db.pg_version,
            db.system_identifier,
            bytes(db.wal_segment_size as u64),
            db.archive
        );
        info_backups(
            &mut s,
            r.backups.iter().filter(|b| b.db_id == db.db_id),
            "        ",
        );
        info_timelines(&mut s, &db.timelines, "        ");
    }
    info_rpo(&mut s, r);
    s
}

fn info_rpo(s: &mut String, r: &InfoReport) {
    if let (Some(t), Some(age)) = (&r.newest_commit_time, r.rpo_seconds) {
        *s += &format!("    newest archived commit: {t} ({age:.0} s ago)\n");
    }
    for u in &r.unreadable_backups {
        *s += &format!(
            "    backup {}: left out, its manifest cannot be read: {}\n",
            u.label, u.error
        );
    }
    let ago = |t: &str| {
        chrono::DateTime::parse_from_rfc3339(t)
            .ok()
            .zip(chrono::DateTime::parse_from_rfc3339(&r.generated_at).ok())
            .map(|(t, now)| {
                let secs = (now - t).num_milliseconds() as f64 / 1000.0;
                format!("{} ago", duration_text(secs.max(0.0)))
            })
            .unwrap_or_else(|| t.to_string())
    };
    if let Some(w) = &r.newest_archived_wal {
        *s += &format!(
            "    newest archived WAL: {}{}\n",
            w.name,
            w.archived_at
                .as_deref()
                .map(|t| format!(" (archived {})", ago(t)))
                .unwrap_or_default()
        );
    }
    match &r.last_verify {
        Some(v) => {
            *s += &format!(
                "    last verify: {}, {}\n",
                ago(&v.finished_at),
                if v.passed {
                    "no problems".to_string()
                } else {
                    format!("{} PROBLEM(S)", v.problems)
                }
            )
        }
        None => *s += "    last verify: never\n",
    }
    match &r.last_drill {
        Some(d) => {
            let mut line = format!(
                "    last drill: {}, {}",
                ago(&d.finished_at),
                if d.passed { "passed" } else { "FAILED" }
            );
            if let Some(rto) = d.rto_seconds {
                line += &format!(", RTO {}", duration_text(rto));
            }
            if let Some(rpo) = d.rpo_seconds {
                line += &format!(", RPO {}", duration_text(rpo));
            }
            if let (Some(step), Some(why)) = (&d.failed_step, &d.failure) {
                line += &format!(" (at {step}: {why})");
            }
            *s += &line;
            s.push('\n');
        }
        None => *s += "    last drill: never\n",
    }
    if let Some(a) = &r.archiver {
        match (&a.status, &a.error) {
            (Some(st), _) => {
                *s += &format!(
                    "    archiver: last archived {}, lag {} ({} segment(s)), {} archived, {} failed{}\n",
                    st.last_archived_wal.as_deref().unwrap_or("none"),
                    st.lag_bytes.map(bytes).unwrap_or_else(|| "unknown".into()),
                    st.lag_segments.map(|n| n.to_string()).unwrap_or_else(|| "?".into()),
                    st.archived_count,
                    st.failed_count,
                    if st.failing { ", FAILING now" } else { "" }
                )
            }
            (None, Some(e)) => *s += &format!("    archiver: unknown ({e})\n"),
            (None, None) => {}
        }
    }
    if let Some(sp) = &r.spool {
        *s += &format!(
            "    spool: {} file(s) pushed ahead ({})\n",
            sp.pushed_ahead, sp.path
        );
    }
}

fn info_backups<'a>(s: &mut String, backups: impl Iterator<Item = &'a BackupReport>, ind: &str) {
    let mut none = true;
    for b in backups {
        none = false;
        *s += &format!(
            "{ind}{} backup {}: {} … {} (timeline {}, {} … {}), {} stored {}, WAL {} … {}\n",
            b.backup_type,
            b.label,
            b.start_time,
            b.stop_time,
            b.timeline,
            b.start_lsn,
            b.stop_lsn,
            bytes(b.original_size),
            bytes(b.stored_size),
            b.wal_start,
            b.wal_stop
        );
        if let (Some(r), Some(c)) = (&b.reference, &b.changes) {
            *s += &format!(
                "{ind}  on {} (chain {}): changes found by {}, {} changed blocks in {} files, {} files unchanged, {} copied whole\n",
                r,
                b.depends_on.join(" ← "),
                c.method,
                c.changed_blocks,
                c.delta_files,
                c.unchanged_files,
                c.whole_files
            );
            for f in &c.fallbacks {
                *s += &format!("{ind}  fell back: {f}\n");
            }
        }
        if let Some(r) = &b.resumed {
            *s += &format!(
                "{ind}  resumed after {} interrupted run(s): {} files reused ({}, {} stored), {} read again\n",
                r.interrupted_runs,
                r.files,
                bytes(r.bytes),
                bytes(r.stored_bytes),
                r.recopied_files
            );
        }
        if let Some(pc) = &b.page_checksums {
            if !pc.bad_pages.is_empty() {
                *s += &format!(
                    "{ind}  page checksums: {} of {} checked pages FAILED:\n",
                    pc.bad_pages.len(),
                    pc.pages_checked
                );
                for p in &pc.bad_pages {
                    *s += &format!("{ind}    {} ({} fork) block {}\n", p.path, p.fork, p.block);
                }
            }
        }
    }
    if none {
        *s += &format!("{ind}backups: none\n");
    }
}

fn info_timelines(s: &mut String, timelines: &[TimelineReport], ind: &str) {
    if timelines.is_empty() {
        *s += &format!("{ind}WAL archive: empty\n");
    }
    for t in timelines {
        match (&t.first_segment, &t.last_segment) {
            (Some(a), Some(b)) => {
                *s += &format!(
                    "{ind}timeline {}: {a} … {b} ({} segments",
                    t.timeline, t.segments
                );
                *s += if t.gaps.is_empty() {
                    ", no gaps)\n"
                } else {
                    ")\n"
                };
            }
            _ => *s += &format!("{ind}timeline {}: no segments\n", t.timeline),
        }
        if let (Some(p), Some(l)) = (t.parent, t.switch_lsn) {
            *s += &format!("{ind}    branched from timeline {p} at {l}\n");
        }
        match &t.recoverable {
            Some(rc) => {
                *s += &format!(
                    "{ind}    recoverable: {} (backup {}, {}) … {} (last archived commit {})\n",
                    rc.from_time,
                    rc.from_backup,
                    rc.from_lsn,
                    rc.to_lsn,
                    rc.to_time.as_deref().unwrap_or("none")
                );
                for rp in &rc.restore_points {
                    *s += &format!(
                        "{ind}    restore point {:?}: {} ({})\n",
                        rp.name, rp.time, rp.lsn
                    );
                }
                if rc.unsummarized_segments > 0 {
                    *s += &format!(
                        "{ind}    {} segment(s) on the way have no record summary: commit times and restore points may be incomplete (run pgvault backfill)\n",
                        rc.unsummarized_segments
                    );
                }
            }
            None => *s += &format!("{ind}    recoverable: no backup to start from\n"),
        }
        for d in &t.damaged_records {
            *s += &format!("{ind}    DAMAGED RECORD: {d} fails its CRC-32C check\n");
        }
        for g in &t.gaps {
            *s += &format!("{ind}    gap: {} … {} missing\n", g.from, g.to);
        }
        for d in &t.dropped {
            *s += &format!("{ind}    DROPPED: {}\n", d.describe());
        }
        for p in &t.partial {
            *s += &format!("{ind}    partial: {p}\n");
        }
        if t.history_file {
            *s += &format!("{ind}    history: {:08X}.history\n", t.timeline);
        }
        for c in &t.conflicts {
            *s += &format!(
                "{ind}    CONFLICT: {c} is stored with more than one content (run pgvault verify)\n"
            );
        }
        if let Some(x) = &t.superseded {
            *s += &format!(
                "{ind}    SUPERSEDED: timeline {} continues past {}, where timeline {} branched off ({}): {} archived after that (a split brain, or the original of a PITR clone archiving here; see docs/disaster-recovery.md)\n",
                t.timeline,
                x.at_lsn,
                x.by_timeline,
                x.history_file,
                x.files.join(", ")
            );
        }
    }
}

/// The label on stdout (for scripts), a summary on stderr.
pub fn backup_done(m: &Manifest) -> Result<()> {
    if let Some(pc) = &m.page_checksums {
        let bad = pc.bad_pages.len();
        eprintln!(
            "pgvault: page checksums: {} pages checked, {}",
            pc.pages_checked,
            if bad == 0 {
                "all valid".to_string()
            } else {
                format!("{bad} FAILED (listed above, and in `pgvault info`)")
            }
        );
    }
    if let (Some(r), Some(c)) = (&m.reference, &m.changes) {
        eprintln!(
            "pgvault: {} backup on {}: changes found by {} ({} WAL segments): {} changed blocks in {} files, {} files unchanged ({} compared with the reference, {} blocks by their sums), {} copied whole{}",
            m.backup_type,
            r,
            c.method,
            c.segments,
            c.changed_blocks,
            c.delta_files,
            c.unchanged_files,
            c.compared_files,
            c.compared_blocks,
            c.whole_files,
            if c.fallbacks.is_empty() {
                String::new()
            } else {
                format!(", {} fallback(s)", c.fallbacks.len())
            }
        );
    }
    if let Some(r) = &m.resumed {
        eprintln!(
            "pgvault: backup {} resumed: {} files reused ({}, {} stored by the interrupted run), {} read again",
            m.label,
            r.files,
            bytes(r.bytes),
            bytes(r.stored_bytes),
            r.recopied_files
        );
    }
    eprintln!(
        "pgvault: backup {} complete: {} files, {} ({} stored), WAL {} … {}, consistent at {}",
        m.label,
        m.file_count,
        bytes(m.original_size),
        bytes(m.stored_size),
        m.wal_start,
        m.wal_stop,
        m.stop_lsn
    );
    out(&format!("{}\n", m.label))
}

pub fn restore_done(r: &Restored, opts: &RestoreOptions) {
    let delta = if r.skipped_by_delta > 0 {
        format!(", {} unchanged files kept", r.skipped_by_delta)
    } else {
        String::new()
    };
    if let Some(d) = &r.delta_blocks {
        eprintln!(
            "pgvault: --delta: {} of {} blocks in {} relation files differed from the backup's block sums and were written; {} fetched from the repository",
            d.blocks_written,
            d.blocks,
            d.files,
            bytes(d.bytes_fetched)
        );
    }
    eprintln!(
        "pgvault: restored backup {} into {}: {} files, {}{delta}",
        r.label,
        opts.pgdata.display(),
        r.files,
        bytes(r.bytes)
    );
    eprintln!(
        "pgvault: start PostgreSQL {} on {} to recover ({})",
        r.pg_version,
        opts.pgdata.display(),
        if opts.standby {
            "standby.signal"
        } else {
            "recovery.signal"
        }
    );
}

pub fn expire(r: &ExpireReport) -> Result<()> {
    let verb = if r.dry_run { "would expire" } else { "expired" };
    let mut s = String::new();
    for l in &r.expired {
        s += &format!("{verb} backup {l}\n");
    }
    for l in &r.kept {
        s += &format!("kept backup {l}\n");
    }
    match &r.wal_kept_from {
        Some(w) => {
            s += &format!(
                "{verb} {} WAL objects before {w}; WAL from {w} on and every history file kept\n",
                r.wal_objects_removed
            )
        }
        None => s += "no WAL expired\n",
    }
    for u in &r.unreadable {
        s += &format!(
            "kept backup {} (its manifest cannot be read: {})\n",
            u.label, u.error
        );
    }
    for o in &r.orphans {
        let verb = match (o.removable, r.dry_run) {
            (true, true) => "would remove",
            (true, false) => "removed",
            (false, _) => "left",
        };
        s += &format!("{verb} {}: {}: {}\n", o.kind.as_str(), o.what, o.detail);
    }
    out(&s)
}
