//! The command line: clap definitions, rendering, exit codes. The only
//! module that knows clap, indicatif or stdout.

mod args;
mod docs;
mod logger;
mod progress;
mod render;

use std::io::Write;

use std::path::Path;
use std::sync::Arc;

use clap::FromArgMatches;

use crate::config::{self, Global};
use crate::error::{Error, Kind, Result};
use crate::ops;
use crate::repo::{Fetched, Repository};
use args::{
    ArchiveModeArg, Cli, Command, DrillArgs, InfoOutput, RestoreArgs, TargetActionArg, TargetArgs,
};

/// Exit code of `archive-get` when the file is not in the archive.
pub const EXIT_NOT_FOUND: i32 = 1;
/// Exit code of `archive-get` for every failure other than "not in the
/// archive" during archive recovery: PostgreSQL treats codes above 125 as
/// fatal and stops, where 1–125 would mean "end of archive" and end
/// recovery early (xlogarchive.c, RestoreArchivedFile).
pub const EXIT_GET_FATAL: i32 = 254;
/// Exit code of `verify` when it found problems.
pub const EXIT_VERIFY_PROBLEMS: i32 = 11;
/// Exit codes after SIGINT and SIGTERM (128 + the signal), as shells use.
const EXIT_SIGINT: i32 = 130;
const EXIT_SIGTERM: i32 = 143;

pub fn main() -> i32 {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let env: Vec<(std::ffi::OsString, std::ffi::OsString)> = std::env::vars_os().collect();
    let is_get = argv.iter().any(|a| a == "archive-get");
    let parsed = match config::parse(Cli::definition(), &argv, &env) {
        Ok(p) => p,
        Err(config::ParseError::Clap(e)) => return clap_failure(&e, is_get),
        Err(config::ParseError::Config(e)) => {
            logger::init(log::LevelFilter::Warn);
            report(&e);
            return if is_get {
                get_failure_code()
            } else {
                e.kind().exit_code()
            };
        }
    };
    let cli = match Cli::from_arg_matches(&parsed.matches) {
        Ok(c) => c,
        Err(e) => return clap_failure(&e, is_get),
    };
    logger::init(cli.global.log_level);
    for w in &parsed.warnings {
        log::warn!("{w}");
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: start async runtime: {e}");
            return Kind::Internal.exit_code();
        }
    };
    match rt.block_on(run(&cli, parsed.config_file.as_deref())) {
        Ok(code) => code,
        Err(e) => {
            report(&e);
            exit_for(&cli.command, &e)
        }
    }
}

/// Help and version exit 0; refused flags 2, or what `archive-get` must
/// answer PostgreSQL.
fn clap_failure(e: &clap::Error, is_get: bool) -> i32 {
    let code = if e.use_stderr() { 2 } else { 0 };
    let _ = e.print();
    if code != 0 && is_get {
        return get_failure_code();
    }
    code
}

fn report(e: &Error) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "error: {e}");
    if let Some(h) = e.hint_text() {
        let _ = writeln!(err, "hint: {h}");
    }
}

fn exit_for(command: &Command, e: &Error) -> i32 {
    match command {
        Command::ArchiveGet { .. } => get_failure_code(),
        _ => e.kind().exit_code(),
    }
}

/// In standby mode "not available yet" is the right answer to any failure:
/// the standby retries and keeps streaming. During archive recovery a
/// failure must stop recovery instead.
fn get_failure_code() -> i32 {
    if std::path::Path::new(crate::pg::recovery::STANDBY_SIGNAL).exists() {
        EXIT_NOT_FOUND
    } else {
        EXIT_GET_FATAL
    }
}

/// Set in the environment of the detached prefetcher `archive-get` starts.
const PREFETCH_ENV: &str = "PGVAULT_INTERNAL_PREFETCH";
/// Set for the detached look-ahead pusher `archive-push` starts.
const LOOKAHEAD_ENV: &str = "PGVAULT_INTERNAL_LOOKAHEAD";

/// Starts this same command again, detached (own session, no stdio), with
/// `role` set in its environment: the prefetcher (fetches the next segments
/// while PostgreSQL replays this one) or the look-ahead pusher (pushes the
/// files ready after this one). PostgreSQL waits only for its own command,
/// not for this child.
fn spawn_detached(role: &str) {
    use std::os::unix::process::CommandExt;
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.args(std::env::args_os().skip(1))
        .env(role, "1")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // The prefetcher yields the CPU to PostgreSQL's startup process, which
    // replays on one core and is what recovery waits for; a prefetch that
    // falls behind only means a call fetches its segment itself. The
    // look-ahead pusher keeps normal priority: it is what keeps pg_wal
    // from filling up.
    let nice = if role == PREFETCH_ENV { 5 } else { 0 };
    // SAFETY: setsid and nice are async-signal-safe and touch no memory.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            if nice != 0 {
                libc::nice(nice);
            }
            Ok(())
        });
    }
    if let Err(e) = cmd.spawn() {
        log::debug!("start a detached helper ({role}): {e}");
    }
}

/// The repository, once the stanza is known to exist: for the commands
/// that take the stanza lock (or start a look-ahead pusher with its spool)
/// before they read the stanza, so that a misspelled `--stanza` leaves
/// nothing behind. `archive-push` and `archive-get` read it first anyway
/// and are spared the extra read.
/// A stanza object that is there but damaged counts as there: the command
/// says so itself (`verify` reports it and goes on).
async fn open_stanza(g: &Global) -> Result<Repository> {
    let repo = g.open_repo()?;
    if let Fetched::Missing = repo.fetch_stanza().await? {
        repo.require_stanza().await?;
    }
    Ok(repo)
}

async fn run(cli: &Cli, config_file: Option<&Path>) -> Result<i32> {
    let g = &cli.global;
    match &cli.command {
        Command::StanzaCreate { options } => {
            let repo = g.open_repo()?;
            let opts = ops::stanza_create::StanzaCreateOptions {
                pgdata: options.data.pgdata()?.to_path_buf(),
            };
            let r = ops::stanza_create::stanza_create(&repo, &opts).await?;
            render::stanza_created(&repo, &r);
            Ok(0)
        }
        Command::StanzaUpgrade { options } => {
            let pgdata = options.data.pgdata()?.to_path_buf();
            let repo = open_stanza(g).await?;
            let opts = ops::stanza_upgrade::StanzaUpgradeOptions { pgdata };
            let r = ops::stanza_upgrade::stanza_upgrade(&repo, &opts).await?;
            render::stanza_upgraded(&repo, &r);
            Ok(0)
        }
        Command::ArchivePush { path, options: o } => {
            let repo = g.open_repo()?;
            let catalog = g.catalog(&o.catalog);
            let opts = ops::archive_push::PushOptions {
                path: path.clone(),
                encode: o.compression.encode(),
                ahead: o.archive_push_ahead,
                process_max: o.workers.process_max,
                spool: g.spool(&o.spool),
                superseded: o.archive_push_superseded,
            };
            if std::env::var_os(LOOKAHEAD_ENV).is_some() {
                // The detached pusher started below: push ahead, quietly.
                let pushed = match repo.require_stanza().await {
                    Ok(_) => ops::archive_push::push_ahead(&repo, catalog.as_ref(), &opts).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = pushed {
                    log::debug!("look-ahead after {}: {e}", path.display());
                }
                return Ok(0);
            }
            if ops::archive_push::lookahead_wanted(&opts) {
                spawn_detached(LOOKAHEAD_ENV);
            }
            ops::archive_push::archive_push(&repo, catalog.as_ref(), &opts).await?;
            Ok(0)
        }
        Command::ArchiveGet {
            name,
            dest,
            options: o,
        } => {
            let repo = g.open_repo()?;
            let spool = if o.archive_get_ahead > 0 {
                g.spool(&o.spool)
            } else {
                None
            };
            if std::env::var_os(PREFETCH_ENV).is_some() {
                // The detached prefetcher started below: fetch ahead, quietly.
                if let Some(spool) = &spool {
                    if let Err(e) =
                        ops::archive_get::prefetch(&repo, name, o.archive_get_ahead, spool).await
                    {
                        log::debug!("prefetch after {name}: {e}");
                    }
                }
                return Ok(0);
            }
            let opts = ops::archive_get::GetOptions {
                name: name.clone(),
                dest: dest.clone(),
                spool: spool.clone(),
            };
            match ops::archive_get::archive_get(&repo, &opts).await? {
                ops::archive_get::GetOutcome::Restored => {
                    if spool.is_some() {
                        spawn_detached(PREFETCH_ENV);
                    }
                    Ok(0)
                }
                ops::archive_get::GetOutcome::NotFound => {
                    log::info!("{name} is not in the archive");
                    Ok(EXIT_NOT_FOUND)
                }
            }
        }
        Command::Backup {
            start_fast,
            options: o,
            ..
        } => {
            let expire_after = o.expire_after()?;
            let opts = ops::backup::BackupOptions {
                pgdata: o.data.pgdata()?.to_path_buf(),
                conn: o.connection.params(),
                standby: o.backup_standby,
                primary: o.primary.over(),
                start_fast: *start_fast,
                process_max: o.workers.process_max,
                // Parallel across files; where one file is all that is left
                // (or process-max is 1), zstd's own workers compress while
                // the worker reads and hashes.
                encode: o.compression.encode(),
                archive_timeout: o.archive_timeout.duration(),
            };
            let repo = open_stanza(g).await?;
            let progress: Arc<dyn ops::progress::Progress> = Arc::from(progress::for_stderr(false));
            let m = ops::backup::backup(&repo, &opts, progress).await?;
            render::backup_done(&m)?;
            if let Some(retention) = expire_after {
                let opts = expire_options(retention, false);
                let catalog = g.catalog(&o.catalog);
                let r = ops::expire::expire(&repo, catalog.as_ref(), &opts)
                    .await
                    .map_err(|e| e.context("expire after the backup (expire-auto)"))?;
                for l in &r.expired {
                    eprintln!("pgvault: expired backup {l}");
                }
            }
            Ok(0)
        }
        Command::Restore(args) => {
            let opts = restore_options(g, config_file, args)?;
            let repo = open_stanza(g).await?;
            let progress: Arc<dyn ops::progress::Progress> = Arc::from(progress::for_stderr(false));
            let r = ops::restore::restore(&repo, &opts, progress).await?;
            render::restore_done(&r, &opts);
            Ok(0)
        }
        Command::Check { options: o } => {
            let repo = open_stanza(g).await?;
            let opts = ops::check::CheckOptions {
                conn: o.connection.params(),
                primary: o.primary.over(),
                archive_timeout: o.archive_timeout.duration(),
                max_backup_age: o.max_backup_age,
                max_archive_lag: o.max_archive_lag,
            };
            let progress = progress::for_stderr(false);
            let r = ops::check::check(&repo, &opts, &*progress).await?;
            for w in &r.warnings {
                log::warn!("{w}");
            }
            let through = r
                .primary
                .as_ref()
                .map(|p| format!(", switched on the primary at {p}"))
                .unwrap_or_default();
            eprintln!(
                "pgvault: check ok: {} reached {} (stanza {}{through})",
                r.segment,
                repo.describe(),
                repo.stanza()
            );
            if r.thresholds.is_empty() {
                return Ok(0);
            }
            render::check_thresholds(&r)?;
            Ok(if r.thresholds.iter().all(|t| t.met()) {
                0
            } else {
                Kind::Threshold.exit_code()
            })
        }
        Command::Expire {
            dry_run,
            options: o,
        } => {
            let opts = expire_options(&o.retention, *dry_run);
            let repo = open_stanza(g).await?;
            let catalog = g.catalog(&o.catalog);
            let r = ops::expire::expire(&repo, catalog.as_ref(), &opts).await?;
            render::expire(&r)?;
            Ok(0)
        }
        Command::Verify { output, options: o } => {
            let repo = open_stanza(g).await?;
            let opts = ops::verify::VerifyOptions {
                process_max: o.workers.process_max,
            };
            let progress: Arc<dyn ops::progress::Progress> =
                Arc::from(progress::for_stderr(*output == args::Output::Json));
            let r = ops::verify::verify(&repo, &opts, progress).await?;
            render::verify(&r, *output)?;
            Ok(if r.problems.is_empty() {
                0
            } else {
                EXIT_VERIFY_PROBLEMS
            })
        }
        Command::Info { output, options: o } => {
            let repo = g.open_repo()?;
            let opts = ops::info::InfoOptions {
                catalog: g.catalog(&o.catalog),
                conn: o.status.connection.if_given(),
                spool: g.spool(&o.status.spool),
            };
            let report = ops::info::info(&repo, &opts).await?;
            match output {
                InfoOutput::Text => render::info(&report, args::Output::Text)?,
                InfoOutput::Json => render::info(&report, args::Output::Json)?,
                InfoOutput::Openmetrics => render::metrics(&report)?,
            }
            Ok(0)
        }
        Command::Drill(a) => drill(g, config_file, a).await,
        Command::Exporter { options: o } => {
            let repo = open_stanza(g).await?;
            let opts = ops::exporter::ExporterOptions {
                listen: o.listen,
                refresh: o.exporter_refresh,
                info: ops::info::InfoOptions {
                    catalog: g.catalog(&o.catalog),
                    conn: o.status.connection.if_given(),
                    spool: g.spool(&o.status.spool),
                },
            };
            tokio::select! {
                r = ops::exporter::serve(&repo, &opts) => r.map(|_| 0),
                sig = interrupted() => {
                    log::info!("exporter: stopped by {}", sig.0);
                    Ok(0)
                }
            }
        }
        Command::Backfill { output, options: o } => {
            let repo = open_stanza(g).await?;
            let r = ops::walfacts::backfill(
                &repo,
                g.catalog(&o.catalog).as_ref(),
                o.workers.process_max,
            )
            .await?;
            render::backfill(&r, *output)?;
            Ok(0)
        }
        Command::Completions { shell } => docs::completions(*shell),
        Command::Man { dir } => {
            let dir = dir.clone();
            let written = tokio::task::spawn_blocking(move || docs::man_pages(&dir))
                .await
                .map_err(|e| Error::internal(format!("write the man pages: {e}")))??;
            for w in written {
                println!("{w}");
            }
            Ok(0)
        }
    }
}

/// Waits for SIGINT or SIGTERM; returns its name and the exit code.
async fn interrupted() -> (&'static str, i32) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => ("SIGINT", EXIT_SIGINT),
        _ = term.recv() => ("SIGTERM", EXIT_SIGTERM),
    }
}

async fn drill(g: &Global, config_file: Option<&Path>, a: &DrillArgs) -> Result<i32> {
    let o = &a.options;
    let checks = match &o.drill_checks {
        Some(f) => {
            let text = tokio::fs::read_to_string(f)
                .await
                .map_err(|e| Error::usage(format!("drill-checks {}: {e}", f.display())))?;
            let checks = crate::pg::integrity::parse_checks(&text);
            if checks.is_empty() {
                return Err(Error::usage(format!(
                    "drill-checks {}: no query in it",
                    f.display()
                ))
                .hint("write queries that return true, each ending with ';' (see docs/operations.md)"));
            }
            checks
        }
        None => Vec::new(),
    };
    let opts = ops::drill::DrillOptions {
        set: a.targets.set.clone(),
        target: recovery_target(&a.targets)?,
        target_timeline: a.targets.target_timeline.clone(),
        target_exclusive: a.targets.target_exclusive,
        scratch_dir: o.scratch_dir.clone(),
        keep: a.keep,
        pg_bin: o.pg_bin.clone(),
        pg_os_user: o.pg_os_user.clone(),
        checks,
        checks_file: o.drill_checks.clone(),
        rto_objective: o.rto_objective,
        rpo_objective: o.rpo_objective,
        process_max: o.workers.process_max,
        restore_command: restore_command(g, config_file)?,
        config_file: config_file.map(Path::to_path_buf),
        catalog: g.catalog(&o.catalog),
    };
    let repo = open_stanza(g).await?;
    let progress: Arc<dyn ops::progress::Progress> =
        Arc::from(progress::for_stderr(a.output == args::Output::Json));
    // On a signal the drill is dropped: its server is stopped and its
    // scratch directory removed on the way.
    let report = tokio::select! {
        r = ops::drill::drill(&repo, &opts, progress) => r?,
        (sig, code) = interrupted() => {
            eprintln!("error: drill interrupted by {sig}: the scratch server was stopped and its directory removed");
            return Ok(code);
        }
    };
    render::drill(&report, a.output)?;
    for f in &report.failures {
        eprintln!("error: drill failed at step {}: {}", f.step, f.message);
        if let Some(h) = &f.hint {
            eprintln!("hint: {h}");
        }
    }
    if report.failures.is_empty() {
        if let Some(missed) = report.objectives_text() {
            eprintln!("error: drill missed its objectives: {missed}");
        }
    }
    Ok(report.exit_code)
}

fn expire_options(r: &config::Retention, dry_run: bool) -> ops::expire::ExpireOptions {
    ops::expire::ExpireOptions {
        retention_full: r.retention_full,
        retention_window: r.retention_window,
        dry_run,
    }
}

/// The recovery target the flags name, if any.
fn recovery_target(a: &TargetArgs) -> Result<Option<crate::pg::recovery::RecoveryTarget>> {
    use crate::pg::recovery::{parse_target_time, RecoveryTarget};
    Ok(if let Some(t) = &a.target_time {
        Some(RecoveryTarget::Time(
            parse_target_time(t).map_err(|e| Error::usage(format!("--target-time: {e}")))?,
        ))
    } else if let Some(l) = &a.target_lsn {
        Some(RecoveryTarget::Lsn(
            l.parse()
                .map_err(|e| Error::usage(format!("--target-lsn: {e}")))?,
        ))
    } else if let Some(x) = &a.target_xid {
        if x.is_empty() || !x.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Error::usage(format!(
                "--target-xid {x:?} is not a transaction id"
            )));
        }
        Some(RecoveryTarget::Xid(x.clone()))
    } else if let Some(n) = &a.target_name {
        Some(RecoveryTarget::Name(n.clone()))
    } else {
        a.target.as_ref().map(|_| RecoveryTarget::Immediate)
    })
}

fn restore_options(
    g: &Global,
    config_file: Option<&Path>,
    a: &RestoreArgs,
) -> Result<ops::restore::RestoreOptions> {
    use crate::pg::recovery::TargetAction;
    let target = recovery_target(&a.targets)?;
    let mut tablespace_map = Vec::new();
    for m in &a.tablespace_map {
        let (oid, dir) = m
            .split_once('=')
            .and_then(|(o, d)| Some((o.parse::<u32>().ok()?, d)))
            .ok_or_else(|| Error::usage(format!("--tablespace-map {m:?}: expected OID=DIR")))?;
        tablespace_map.push((oid, std::path::PathBuf::from(dir)));
    }
    let primary_conninfo = match &a.primary_conninfo_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| Error::usage(format!("--primary-conninfo-file {}: {e}", f.display())))?
                .trim()
                .to_string(),
        ),
        None => a
            .options
            .primary_conninfo
            .as_ref()
            .map(|c| c.expose().to_string()),
    };
    // Patroni's create_replica_methods pass --role=replica.
    let standby = a.standby || a.role.as_deref() == Some("replica");
    let pgdata = match &a.datadir {
        Some(d) => d.clone(),
        None => a.options.data.pgdata()?.to_path_buf(),
    };
    Ok(ops::restore::RestoreOptions {
        pgdata,
        set: a.targets.set.clone(),
        target,
        target_action: a.target_action.map(|t| match t {
            TargetActionArg::Pause => TargetAction::Pause,
            TargetActionArg::Promote => TargetAction::Promote,
            TargetActionArg::Shutdown => TargetAction::Shutdown,
        }),
        target_timeline: a.targets.target_timeline.clone(),
        target_exclusive: a.targets.target_exclusive,
        archive_mode_off: a.archive_mode == ArchiveModeArg::Off,
        tablespace_map,
        standby,
        primary_conninfo: if standby { primary_conninfo } else { None },
        delta: a.delta,
        process_max: a.options.workers.process_max,
        restore_command: restore_command(g, config_file)?,
        target_check: !a.no_target_check,
        catalog: g.catalog(&a.options.catalog),
    })
}

/// The `restore_command` a restored cluster runs: this same binary, with
/// what it needs to reach this repository. The postmaster's environment has
/// no `AWS_*` variables, so the configuration file is passed along when one
/// was used; secrets are never written here.
fn restore_command(g: &Global, config_file: Option<&Path>) -> Result<String> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::internal(format!("find this program's path: {e}")))?;
    let mut parts = vec![shell_quote(&exe.display().to_string())];
    if let Some(c) = config_file {
        let c = std::fs::canonicalize(c).unwrap_or_else(|_| c.to_path_buf());
        parts.push("--config".into());
        parts.push(shell_quote(&c.display().to_string()));
    }
    parts.push("--repo".into());
    parts.push(shell_quote(&g.repo()?.identity()));
    parts.push("--stanza".into());
    parts.push(shell_quote(&g.stanza));
    if let Some(e) = &g.s3_endpoint {
        parts.push("--s3-endpoint".into());
        parts.push(shell_quote(e));
    }
    if let Some(r) = &g.s3_region {
        parts.push("--s3-region".into());
        parts.push(shell_quote(r));
    }
    if let Some(h) = g.s3_allow_http {
        parts.push(format!("--s3-allow-http={h}"));
    }
    if !g.s3_atomic_create {
        parts.push("--s3-atomic-create=false".into());
    }
    parts.push("archive-get %f \"%p\"".into());
    Ok(parts.join(" "))
}

/// Quotes for `sh -c` (PostgreSQL runs restore_command through the shell).
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:=@,+".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}
