//! `drill`: a restore rehearsal. Restores a backup into a scratch
//! directory with the real restore ([`crate::ops::restore`]), starts
//! PostgreSQL there (private socket, no TCP listener, no archiving),
//! waits for recovery to reach the target and promote, checks what came
//! back (`pg_amcheck`, page verification, the user's checks), and reports
//! the RTO and RPO achieved, every phase measured. The result is kept in
//! the repository for `info` and the metrics.
//!
//! The target defaults to the newest archived commit on the chosen
//! backup's replay path, given to PostgreSQL as the LSN of its record
//! (`recovery_target_lsn`, inclusive: recovery stops right after it): a
//! time target at the newest commit would wait for a later record that
//! the archive does not have, and end recovery with FATAL.

mod report;
mod scratch;

pub use report::{
    duration_text, BackupFacts, CheckResult, DrillReport, Failure, Phase, ServerFacts, Space,
    DRILL_SCHEMA_VERSION,
};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::catalog::Catalog;
use crate::error::{Error, Kind, Result};
use crate::ops::progress::Progress;
use crate::ops::restore::{self, Reach, RestoreOptions};
use crate::ops::walfacts::format_us;
use crate::pg::binaries::{OsUser, PgBinaries};
use crate::pg::integrity::{self, RelationMap, UserCheck};
use crate::pg::recovery::{self, RecoveryTarget, TargetAction};
use crate::pg::scratch::{ScratchServer, ServerError, ServerSpec};
use crate::repo::manifest::{BackupHeader, ManifestRead};
use crate::repo::results::{host_name, ResultKind};
use crate::repo::Repository;
use scratch::Scratch;

#[derive(Debug, Clone)]
pub struct DrillOptions {
    /// A backup label; `None`: the newest (that fits the target).
    pub set: Option<String>,
    /// `None`: the newest archived commit.
    pub target: Option<RecoveryTarget>,
    pub target_timeline: Option<String>,
    pub target_exclusive: bool,
    /// Where the scratch directory is made (default: the temporary
    /// directory).
    pub scratch_dir: Option<PathBuf>,
    /// Keep the scratch directory (the server stopped) for a post-mortem.
    pub keep: bool,
    pub pg_bin: Option<PathBuf>,
    pub pg_os_user: Option<String>,
    /// The user's checks (already read from their file) and the file's
    /// name, for messages.
    pub checks: Vec<UserCheck>,
    pub checks_file: Option<PathBuf>,
    pub rto_objective: Option<Duration>,
    pub rpo_objective: Option<Duration>,
    /// Restore workers, and `pg_amcheck`'s connections.
    pub process_max: usize,
    /// The `restore_command` the scratch server runs, and the
    /// configuration file it names (the server's user must read it).
    pub restore_command: String,
    pub config_file: Option<PathBuf>,
    pub catalog: Option<Catalog>,
}

/// Archived WAL segments the scratch directory holds at once, at most:
/// the one being replayed, archive-get's prefetched ones (8 by default),
/// and the first of the new timeline.
const WAL_SEGMENTS_HELD: u64 = 10;

/// A step that failed, and how.
type StepResult<T> = std::result::Result<T, Failure>;

fn at(step: &'static str) -> impl FnOnce(Error) -> Failure {
    move |e| Failure {
        step: step.into(),
        message: e.to_string(),
        hint: e.hint_text().map(str::to_string),
        kind: e.kind(),
    }
}

fn failed(step: &str, message: impl Into<String>) -> Failure {
    Failure {
        step: step.into(),
        message: message.into(),
        hint: None,
        kind: Kind::DrillFailed,
    }
}

fn since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64()
}

/// Runs a drill. Options that cannot work (a bad target, no backup)
/// are errors; everything that fails once the drill has started is in
/// the report (and in the repository's history), with the exit code.
pub async fn drill(
    repo: &Repository,
    opts: &DrillOptions,
    progress: Arc<dyn Progress>,
) -> Result<DrillReport> {
    let started = chrono::Utc::now();
    let mut report = DrillReport {
        schema_version: DRILL_SCHEMA_VERSION,
        stanza: repo.stanza().to_string(),
        repository: repo.describe(),
        host: host_name(),
        started_at: rfc3339(&started),
        finished_at: String::new(),
        passed: false,
        exit_code: 0,
        backup: None,
        target: None,
        newest_archived_commit: None,
        recovered_to: None,
        rto_seconds: None,
        rpo_seconds: None,
        rto_objective_seconds: opts.rto_objective.map(|d| d.as_secs_f64()),
        rpo_objective_seconds: opts.rpo_objective.map(|d| d.as_secs_f64()),
        objectives_met: false,
        space: None,
        phases: Vec::new(),
        replay_bytes: None,
        server: None,
        checks: Vec::new(),
        failures: Vec::new(),
        scratch_dir: None,
        kept: opts.keep,
    };
    let t = Instant::now();
    let (newest, chosen) = plan(repo, opts).await?;
    report.phases.push(Phase::new("plan", since(t), None));

    let mut slot: Option<Scratch> = None;
    if let Err(f) = run(
        repo,
        opts,
        &progress,
        &newest,
        &chosen,
        &mut report,
        &mut slot,
    )
    .await
    {
        report.failures.insert(0, f);
    }
    progress.finish();
    if let Some(mut s) = slot.take() {
        report.scratch_dir = Some(s.root.display().to_string());
        let removed = tokio::task::spawn_blocking(move || {
            s.wait_for_prefetchers(Duration::from_secs(60));
            s.remove()
        })
        .await?;
        if let Err(e) = removed {
            report.failures.push(at("cleanup")(e));
        }
    }
    let finished = chrono::Utc::now();
    report.finished_at = rfc3339(&finished);
    report.decide();
    if let Err(e) = repo
        .record_result(ResultKind::Drill, &finished, &report.record())
        .await
    {
        log::warn!("keep this drill's result in the repository: {e}");
    }
    Ok(report)
}

fn rfc3339(t: &chrono::DateTime<chrono::Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The base of every restore the drill plans or runs.
fn restore_options(opts: &DrillOptions) -> RestoreOptions {
    RestoreOptions {
        pgdata: PathBuf::new(),
        set: None,
        target: None,
        target_action: Some(TargetAction::Promote),
        target_timeline: opts.target_timeline.clone(),
        target_exclusive: false,
        archive_mode_off: true,
        tablespace_map: Vec::new(),
        standby: false,
        primary_conninfo: None,
        delta: false,
        process_max: opts.process_max,
        restore_command: opts.restore_command.clone(),
        target_check: true,
        catalog: opts.catalog.clone(),
    }
}

/// Where the newest backup reaches (the newest archived commit) and the
/// backup the drill restores.
async fn plan(repo: &Repository, opts: &DrillOptions) -> Result<(Reach, Reach)> {
    let base = restore_options(opts);
    let newest = restore::reach(repo, &base)
        .await
        .map_err(|e| e.context("plan the drill"))?;
    if opts.set.is_none() && opts.target.is_none() {
        return Ok((newest.clone(), newest));
    }
    let chosen = restore::reach(
        repo,
        &RestoreOptions {
            set: opts.set.clone(),
            target: opts.target.clone(),
            target_exclusive: opts.target_exclusive,
            ..base
        },
    )
    .await
    .map_err(|e| e.context("plan the drill"))?;
    Ok((newest, chosen))
}

/// The target the drill recovers to, and how to describe it.
fn target(opts: &DrillOptions, newest: &Reach, chosen: &Reach) -> (RecoveryTarget, String) {
    if let Some(t) = &opts.target {
        let text = match t {
            RecoveryTarget::Immediate => "immediate".to_string(),
            RecoveryTarget::Time(t) => format!("time {}", recovery::format_target_time(t)),
            RecoveryTarget::Lsn(l) => format!("lsn {l}"),
            RecoveryTarget::Xid(x) => format!("xid {x}"),
            RecoveryTarget::Name(n) => format!("restore point {n:?}"),
        };
        return (t.clone(), text);
    }
    match newest.last_commit {
        Some((us, lsn)) if lsn >= chosen.backup.stop_lsn => (
            RecoveryTarget::Lsn(lsn),
            format!("lsn {lsn} (the newest archived commit, {})", format_us(us)),
        ),
        _ => (
            RecoveryTarget::Immediate,
            "immediate (no commit is archived after the backup)".into(),
        ),
    }
}

async fn run(
    repo: &Repository,
    opts: &DrillOptions,
    progress: &Arc<dyn Progress>,
    newest: &Reach,
    chosen: &Reach,
    report: &mut DrillReport,
    slot: &mut Option<Scratch>,
) -> StepResult<()> {
    let m = &chosen.backup;
    report.backup = Some(BackupFacts {
        label: m.label.clone(),
        stop_time: m.stop_time.clone(),
        stop_lsn: m.stop_lsn.to_string(),
        original_size: m.original_size,
        pg_version: chosen.pg_version,
        bad_pages_at_backup: m
            .page_checksums
            .iter()
            .flat_map(|pc| &pc.bad_pages)
            .map(|p| format!("{} ({} fork) block {}", p.path, p.fork, p.block))
            .collect(),
    });
    let (target, target_text) = target(opts, newest, chosen);
    report.target = Some(target_text.clone());
    let newest_us = newest.last_commit.map(|(us, _)| us);
    report.newest_archived_commit = newest_us.map(format_us);

    let bin = PgBinaries::find(chosen.pg_version, opts.pg_bin.as_deref())
        .await
        .map_err(|e| Failure {
            step: "binaries".into(),
            message: e.to_string(),
            hint: Some(format!(
                "install PostgreSQL {}'s server package, or pass --pg-bin DIR",
                chosen.pg_version
            )),
            kind: Kind::Usage,
        })?;
    let user = scratch::server_user(opts.pg_os_user.as_deref(), opts.scratch_dir.as_deref())
        .map_err(at("scratch"))?;
    if let Some(u) = &user {
        scratch::usable_by(u, opts.config_file.as_deref()).map_err(at("scratch"))?;
    }
    let s = slot.insert(
        Scratch::create(opts.scratch_dir.as_deref(), user.as_ref(), opts.keep)
            .map_err(at("scratch"))?,
    );
    report.scratch_dir = Some(s.root.display().to_string());

    // Room for the backup and the WAL held at once, checked up front.
    let seg = u64::from(chosen.wal_segment_size);
    let space = Space {
        backup_bytes: m.original_size,
        wal_bytes: (chosen.wal_files.min(WAL_SEGMENTS_HELD - 2) + 2) * seg,
        needed_bytes: 0,
        available_bytes: s.available().map_err(at("space"))?,
    };
    let space = Space {
        needed_bytes: space.backup_bytes + space.wal_bytes,
        ..space
    };
    report.space = Some(space.clone());
    progress.message(&format!(
        "drill: backup {} to {target_text} in {}: needs {} bytes, {} free",
        m.label,
        s.root.display(),
        space.needed_bytes,
        space.available_bytes
    ));
    if space.available_bytes < space.needed_bytes {
        return Err(Failure {
            step: "space".into(),
            message: format!(
                "the file system of {} has {} bytes free, the drill needs {} ({} of backup, {} of WAL)",
                s.root.display(),
                space.available_bytes,
                space.needed_bytes,
                space.backup_bytes,
                space.wal_bytes
            ),
            hint: Some("pass a --scratch-dir on a file system with room".into()),
            kind: Kind::Usage,
        });
    }

    // Restore, with the real restore. The header the choice read has no
    // tablespaces, the full manifest has: a manifest that cannot be read
    // here is left to restore, which reads it again and names the failure.
    let tablespaces: Vec<u32> = match repo.read_manifest(&m.label).await {
        Ok(Some(ManifestRead::Found(full))) => full.tablespaces.iter().map(|t| t.oid).collect(),
        _ => Vec::new(),
    };
    let ropts = RestoreOptions {
        pgdata: s.pgdata.clone(),
        set: Some(m.label.clone()),
        target: Some(target),
        target_exclusive: opts.target_exclusive,
        tablespace_map: tablespaces
            .iter()
            .map(|&oid| (oid, s.tablespace(oid)))
            .collect(),
        ..restore_options(opts)
    };
    let t_restore = Instant::now();
    let restored = restore::restore(repo, &ropts, progress.clone())
        .await
        .map_err(at("restore"))?;
    report.phases.push(Phase::new(
        "restore",
        since(t_restore),
        Some(restored.bytes),
    ));

    // Recovery, up to promotion.
    let spec = ServerSpec {
        bin: bin.clone(),
        pgdata: s.pgdata.clone(),
        socket_dir: s.socket.clone(),
        log: s.log.clone(),
        conf_dir: s.conf.clone(),
        user: user.clone(),
        env: scratch::server_env(s),
    };
    let os_user = user
        .clone()
        .or_else(OsUser::current)
        .map(|u| u.name)
        .unwrap_or_default();
    let mut roles = vec![os_user.clone()];
    if os_user != "postgres" {
        roles.push("postgres".into());
    }
    progress.message("drill: starting PostgreSQL on the restored copy and waiting for recovery");
    progress.phase("recovery (start, replay WAL, promote)");
    let spawned_at = chrono::Utc::now();
    let mut server = ScratchServer::start(spec.clone())
        .await
        .map_err(server_failure("recovery"))?;
    let (session, role) = server
        .wait_promoted(&roles)
        .await
        .map_err(server_failure("recovery"))?;
    let recovery_secs = since(server.started);
    report.rto_seconds = Some(since(t_restore));
    let state = integrity::server_state(&session)
        .await
        .map_err(|e| failed("recovery", e.to_string()))?;
    recovery_phases(report, &server, spawned_at, recovery_secs, m, &state);

    // The RPO: what the archive held at the start that did not come back.
    // Replay past the newest commit's record brought it back (recovery
    // stopping at an LSN target does not count it in
    // pg_last_xact_replay_timestamp(): recoveryStopsAfter returns first);
    // else the last commit replayed, else what the backup holds.
    let recovered_us = match (newest.last_commit, state.last_replayed_lsn) {
        (Some((us, lsn)), Some(replayed)) if replayed > lsn => Some(us),
        _ => state
            .last_replayed_xact
            .map(|s| (s * 1e6) as i64)
            .or_else(|| m.stop_time_utc().map(|t| t.timestamp_micros())),
    };
    report.recovered_to = recovered_us.map(format_us);
    report.rpo_seconds = Some(match (newest_us, recovered_us) {
        (Some(n), Some(r)) => ((n - r) as f64 / 1e6).max(0.0),
        _ => 0.0,
    });

    let databases = integrity::databases(&session)
        .await
        .map_err(|e| failed("recovery", e.to_string()))?;
    report.server = Some(ServerFacts {
        version: state.version.clone(),
        bin_dir: bin.dir.display().to_string(),
        os_user,
        role: role.clone(),
        socket_dir: s.socket.display().to_string(),
        listen_addresses: state.listen_addresses.clone(),
        archive_mode: state.archive_mode.clone(),
        data_checksums: state.data_checksums,
        databases: databases.clone(),
    });
    drop(session);

    progress.phase("checks");
    checks_online(opts, progress, &spec, &role, &databases, &state, report).await;
    // pg_checksums names files: the relations they hold are read while
    // the server still runs.
    let names = if state.data_checksums {
        relation_names(&spec, &role, &databases, report).await
    } else {
        RelationMap::default()
    };

    let t = Instant::now();
    server.stop().await.map_err(server_failure("shutdown"))?;
    report.phases.push(Phase::new("shutdown", since(t), None));
    if state.data_checksums {
        page_checksums(progress, &spec, &names, report).await;
    }
    Ok(())
}

async fn relation_names(
    spec: &ServerSpec,
    role: &str,
    databases: &[String],
    report: &mut DrillReport,
) -> RelationMap {
    let mut all = Vec::new();
    for db in databases {
        match integrity::relations(spec, role, db).await {
            Ok(rels) => all.extend(rels),
            Err(e) => report
                .failures
                .push(failed("page-verification", format!("database {db}: {e}"))),
        }
    }
    RelationMap::new(&all)
}

fn server_failure(step: &'static str) -> impl FnOnce(ServerError) -> Failure {
    move |e| failed(step, e.to_string())
}

/// Start-up, replay and promotion from the server's log; one `recovery`
/// phase when the log does not tell them apart.
fn recovery_phases(
    report: &mut DrillReport,
    server: &ScratchServer,
    spawned_at: chrono::DateTime<chrono::Utc>,
    recovery_secs: f64,
    m: &BackupHeader,
    state: &integrity::ServerState,
) {
    let log = server.recovery_log(spawned_at);
    match (log.redo_start, log.redo_done) {
        (Some((t0, l0)), Some((t1, l1))) if t1 >= t0 && t0 >= 0.0 => {
            let bytes = l1.0.saturating_sub(l0.0);
            report.replay_bytes = Some(bytes);
            report.phases.push(Phase::new("start-up", t0, None));
            report
                .phases
                .push(Phase::new("replay", t1 - t0, Some(bytes)));
            report
                .phases
                .push(Phase::new("promotion", (recovery_secs - t1).max(0.0), None));
        }
        _ => {
            let bytes = state
                .last_replayed_lsn
                .map(|l| l.0.saturating_sub(m.start_lsn.0));
            report.replay_bytes = bytes;
            report
                .phases
                .push(Phase::new("recovery", recovery_secs, bytes));
        }
    }
}

/// The checks run on the promoted server: `pg_amcheck`, the user's
/// checks, and (without data checksums) a read of every relation.
async fn checks_online(
    opts: &DrillOptions,
    progress: &Arc<dyn Progress>,
    spec: &ServerSpec,
    role: &str,
    databases: &[String],
    state: &integrity::ServerState,
    report: &mut DrillReport,
) {
    progress.message("drill: pg_amcheck --heapallindexed on every database");
    let t = Instant::now();
    let (passed, detail) = match integrity::amcheck(spec, role, opts.process_max).await {
        Ok(findings) if findings.is_empty() => (
            true,
            vec![format!(
                "{} database(s): {}",
                databases.len(),
                databases.join(", ")
            )],
        ),
        Ok(findings) => {
            let lines: Vec<String> = findings
                .iter()
                .map(|f| format!("{}: {}", f.object, f.detail))
                .collect();
            for l in &lines {
                report.failures.push(failed("amcheck", l.clone()));
            }
            (false, lines)
        }
        Err(e) => {
            report.failures.push(failed("amcheck", e.to_string()));
            (false, vec![e.to_string()])
        }
    };
    let secs = since(t);
    report.phases.push(Phase::new("amcheck", secs, None));
    report.checks.push(CheckResult {
        name: "pg_amcheck".into(),
        passed,
        seconds: secs,
        detail,
    });

    if !opts.checks.is_empty() {
        let t = Instant::now();
        let file = opts
            .checks_file
            .as_ref()
            .map(|f| f.display().to_string())
            .unwrap_or_default();
        for c in &opts.checks {
            let tc = Instant::now();
            let outcome = integrity::run_check(spec, role, c)
                .await
                .unwrap_or_else(|e| Some(e.to_string()));
            let name = format!("user check {:?} ({file}:{})", c.name, c.line);
            if let Some(why) = &outcome {
                report
                    .failures
                    .push(failed("user-check", format!("{name} {why}")));
            }
            report.checks.push(CheckResult {
                name,
                passed: outcome.is_none(),
                seconds: since(tc),
                detail: outcome.into_iter().collect(),
            });
        }
        report
            .phases
            .push(Phase::new("user-checks", since(t), None));
    }

    if !state.data_checksums {
        progress.message("drill: reading every relation (the cluster has no data checksums)");
        let t = Instant::now();
        let mut detail = Vec::new();
        let mut count = 0;
        for db in databases {
            let read = async {
                let rels = integrity::relations(spec, role, db).await?;
                count += rels.len();
                integrity::read_relations(spec, role, db, &rels).await
            };
            match read.await {
                Ok(bad) => {
                    for (rel, why) in bad {
                        let l = format!("relation {rel}: {why}");
                        report.failures.push(failed("page-verification", l.clone()));
                        detail.push(l);
                    }
                }
                Err(e) => {
                    let l = format!("database {db}: {e}");
                    report.failures.push(failed("page-verification", l.clone()));
                    detail.push(l);
                }
            }
        }
        let passed = detail.is_empty();
        if passed {
            detail.push(format!("{count} relation(s) read in full"));
        }
        let secs = since(t);
        report.phases.push(Phase::new("relation-read", secs, None));
        report.checks.push(CheckResult {
            name: "relation read".into(),
            passed,
            seconds: secs,
            detail,
        });
    }
}

/// `pg_checksums --check` on the stopped copy, failures named by
/// relation.
async fn page_checksums(
    progress: &Arc<dyn Progress>,
    spec: &ServerSpec,
    names: &RelationMap,
    report: &mut DrillReport,
) {
    progress.message("drill: pg_checksums --check on the stopped copy");
    let t = Instant::now();
    let (passed, detail) = match integrity::checksums(spec).await {
        Ok(o) if o.bad.is_empty() => (true, vec![format!("{} blocks verified", o.blocks_scanned)]),
        Ok(o) => {
            let lines: Vec<String> = o
                .bad
                .iter()
                .map(|b| {
                    let rel = names.name_of(&b.file).unwrap_or("an unknown relation");
                    format!(
                        "relation {rel} ({}) block {}: {}",
                        b.file, b.block, b.detail
                    )
                })
                .collect();
            for l in &lines {
                report.failures.push(failed("page-verification", l.clone()));
            }
            (false, lines)
        }
        Err(e) => {
            report
                .failures
                .push(failed("page-verification", e.to_string()));
            (false, vec![e.to_string()])
        }
    };
    let secs = since(t);
    report.phases.push(Phase::new("page-checksums", secs, None));
    report.checks.push(CheckResult {
        name: "page checksums".into(),
        passed,
        seconds: secs,
        detail,
    });
}
