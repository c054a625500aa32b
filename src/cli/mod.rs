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

use crate::config::{self, Global, RepoConfig};
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
    if let Some(code) = archive_get_from_spool(&cli) {
        return code;
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

/// `archive-get`'s common call during recovery, answered before the async
/// runtime and the repository exist: the file waits in the prefetch
/// spool, and a rename hands it over. A prefetcher is started only when
/// the spool runs low and none is running (one start per call was a
/// process start-up competing with PostgreSQL's startup process for the
/// CPU on every segment). `None`: take the ordinary path.
fn archive_get_from_spool(cli: &Cli) -> Option<i32> {
    let Command::ArchiveGet {
        name,
        dest,
        options: o,
    } = &cli.command
    else {
        return None;
    };
    if o.archive_get_ahead == 0 || std::env::var_os(PREFETCH_ENV).is_some() {
        return None;
    }
    // The first repository's spool, as the ordinary path below uses.
    let repos = cli.global.repos().ok()?;
    let spool = cli.global.spool(repos.first()?, &o.spool)?;
    let wal = crate::pg::WalFileName::parse(name).ok()?;
    let taken = ops::archive_get::take_prefetched(&spool, &wal, dest)?;
    if taken.waiting * 2 < o.archive_get_ahead {
        start_prefetcher(&spool);
    }
    Some(0)
}

/// Starts the detached prefetcher unless one is running already.
fn start_prefetcher(spool: &crate::spool::SpoolDir) {
    if !spool.prefetcher_running() {
        spawn_detached(PREFETCH_ENV);
    }
}

/// The repository, once the stanza is known to exist: for the commands
/// that take the stanza lock (or start a look-ahead pusher with its spool)
/// before they read the stanza, so that a misspelled `--stanza` leaves
/// nothing behind. `archive-push` and `archive-get` read it first anyway
/// and are spared the extra read.
/// A stanza object that is there but damaged counts as there: the command
/// says so itself (`verify` reports it and goes on).
async fn open_stanza(g: &Global, r: &RepoConfig) -> Result<Repository> {
    let repo = g.open(r)?;
    if let Fetched::Missing = repo.fetch_stanza().await? {
        repo.require_stanza().await?;
    }
    Ok(repo)
}

async fn run(cli: &Cli, config_file: Option<&Path>) -> Result<i32> {
    let g = &cli.global;
    match &cli.command {
        Command::StanzaCreate { options } => {
            let opts = ops::stanza_create::StanzaCreateOptions {
                pgdata: options.data.pgdata()?.to_path_buf(),
            };
            let repos = g.repos()?;
            let mut each = Each::new(&repos);
            for r in &repos {
                let done = async {
                    let repo = g.open(r)?;
                    let c = ops::stanza_create::stanza_create(&repo, &opts).await?;
                    render::stanza_created(&repo, &c);
                    Ok(())
                };
                each.note(r, done.await)?;
            }
            Ok(each.code(0))
        }
        Command::StanzaUpgrade { options } => {
            let opts = ops::stanza_upgrade::StanzaUpgradeOptions {
                pgdata: options.data.pgdata()?.to_path_buf(),
            };
            let repos = g.repos()?;
            let mut each = Each::new(&repos);
            for r in &repos {
                let done = async {
                    let repo = open_stanza(g, r).await?;
                    let u = ops::stanza_upgrade::stanza_upgrade(&repo, &opts).await?;
                    render::stanza_upgraded(&repo, &u);
                    Ok(())
                };
                each.note(r, done.await)?;
            }
            Ok(each.code(0))
        }
        Command::ArchivePush { path, options: o } => archive_push(g, path, o).await,
        Command::ArchiveGet {
            name,
            dest,
            options: o,
        } => {
            let repos = g.repos()?;
            let opened = repos
                .iter()
                .map(|r| g.open_for_wal(r))
                .collect::<Result<Vec<_>>>()?;
            // One prefetch spool: the first repository's (a prefetched file
            // is verified, whichever repository it came from).
            let spool = if o.archive_get_ahead > 0 {
                g.spool(&repos[0], &o.spool)
            } else {
                None
            };
            if std::env::var_os(PREFETCH_ENV).is_some() {
                // The detached prefetcher started below: fetch ahead, quietly.
                if let Some(spool) = &spool {
                    let ahead = o.archive_get_ahead;
                    if let Err(e) =
                        ops::archive_get::prefetch_any(&opened, name, ahead, spool).await
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
            match ops::archive_get::archive_get_any(&opened, &opts).await? {
                ops::archive_get::GetOutcome::Restored => {
                    if let Some(spool) = &spool {
                        start_prefetcher(spool);
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
            backup_type,
            start_fast,
            options: o,
        } => {
            let repos = g.repos()?;
            for r in &repos {
                o.expire_after(r.number)?;
            }
            let opts = ops::backup::BackupOptions {
                kind: match backup_type {
                    args::BackupType::Full => ops::backup::BackupKind::Full,
                    args::BackupType::Diff => ops::backup::BackupKind::Diff,
                    args::BackupType::Incr => ops::backup::BackupKind::Incr,
                },
                pgdata: o.data.pgdata()?.to_path_buf(),
                conn: o.connection.params(),
                standby: o.backup_standby,
                primary: o.primary.over(),
                start_fast: *start_fast,
                process_max: o.workers.process_max,
                // Parallel across files; where one file is all that is left
                // (or process-max is 1), zstd's own workers compress while
                // the worker reads and hashes.
                encode: o.compression.encode_backup(),
                archive_timeout: o.archive_timeout.duration(),
                resume: o.resume,
                // Set per repository below.
                catalog: None,
            };
            let mut each = Each::new(&repos);
            for r in &repos {
                let done = async {
                    let repo = open_stanza(g, r).await?;
                    each.announce(r, &repo, "backup into");
                    let progress: Arc<dyn ops::progress::Progress> =
                        Arc::from(progress::for_stderr(false));
                    let opts = ops::backup::BackupOptions {
                        catalog: g.catalog(r, &o.catalog),
                        ..opts.clone()
                    };
                    let m = ops::backup::backup(&repo, &opts, progress).await?;
                    render::backup_done(&m)?;
                    if let Some(retention) = o.expire_after(r.number)? {
                        let opts = expire_options(&retention, false);
                        let catalog = g.catalog(r, &o.catalog);
                        let x = ops::expire::expire(&repo, catalog.as_ref(), &opts)
                            .await
                            .map_err(|e| e.context("expire after the backup (expire-auto)"))?;
                        for l in &x.expired {
                            eprintln!("pgvault: expired backup {l}");
                        }
                    }
                    Ok(())
                };
                let done = done.await;
                each.note(r, done)?;
            }
            Ok(each.code(0))
        }
        Command::Restore(args) => {
            let repos = g.repos()?;
            let opts = restore_options(g, config_file, args, &repos)?;
            let progress: Arc<dyn ops::progress::Progress> = Arc::from(progress::for_stderr(false));
            let r = if repos.len() == 1 {
                let repo = open_stanza(g, &repos[0]).await?;
                ops::restore::restore(&repo, &opts, progress).await?
            } else {
                let opened = repos
                    .iter()
                    .map(|r| Ok((g.open(r)?, g.catalog(r, &args.options.catalog))))
                    .collect::<Result<Vec<_>>>()?;
                let (i, r) = ops::restore::restore_first(&opened, &opts, progress).await?;
                eprintln!(
                    "pgvault: restored from repository {} ({})",
                    repos[i].number,
                    opened[i].0.describe()
                );
                r
            };
            render::restore_done(&r, &opts);
            Ok(0)
        }
        Command::Check { options: o } => {
            let opts = ops::check::CheckOptions {
                conn: o.connection.params(),
                primary: o.primary.over(),
                archive_timeout: o.archive_timeout.duration(),
                max_backup_age: o.max_backup_age,
                max_archive_lag: o.max_archive_lag,
            };
            let repos = g.repos()?;
            let mut each = Each::new(&repos);
            let mut missed = false;
            for r in &repos {
                // Before the repository is asked: one that does not answer
                // still has its queue shown.
                warn_behind(g, r, &o.spool);
                let done = async {
                    let repo = open_stanza(g, r).await?;
                    let progress = progress::for_stderr(false);
                    let c = ops::check::check(&repo, &opts, &*progress).await?;
                    for w in &c.warnings {
                        log::warn!("{w}");
                    }
                    if let Some(id) = &c.key {
                        eprintln!(
                            "pgvault: key {id} opens stanza {} and seals its objects",
                            repo.stanza()
                        );
                    }
                    let through = c
                        .primary
                        .as_ref()
                        .map(|p| format!(", switched on the primary at {p}"))
                        .unwrap_or_default();
                    eprintln!(
                        "pgvault: check ok: {} reached {} (stanza {}{through})",
                        c.segment,
                        repo.describe(),
                        repo.stanza()
                    );
                    if !c.thresholds.is_empty() {
                        render::check_thresholds(&c)?;
                    }
                    Ok(c.thresholds.iter().all(|t| t.met()))
                };
                let done = done.await;
                if let Some(met) = each.note(r, done)? {
                    missed |= !met;
                }
            }
            Ok(each.code(if missed {
                Kind::Threshold.exit_code()
            } else {
                0
            }))
        }
        Command::Expire {
            dry_run,
            options: o,
        } => {
            let repos = g.repos()?;
            let several = repos.len() > 1;
            if several
                && repos
                    .iter()
                    .all(|r| !o.retention.for_repo(r.number).is_set())
            {
                return Err(Error::usage("no repository has a retention policy").hint(
                    "set retention-full and/or retention-window for repository 1, repo2-retention-full and/or repo2-retention-window for repository 2, …",
                ));
            }
            let mut each = Each::new(&repos);
            for r in &repos {
                let retention = o.retention.for_repo(r.number);
                if several && !retention.is_set() {
                    eprintln!(
                        "pgvault: repository {} has no retention ({} / {}): nothing expired there",
                        r.number,
                        config::repos::numbered_long(r.number, "retention-full"),
                        config::repos::numbered_long(r.number, "retention-window")
                    );
                    continue;
                }
                let opts = expire_options(&retention, *dry_run);
                let done = async {
                    let repo = open_stanza(g, r).await?;
                    each.announce(r, &repo, "expire in");
                    let catalog = g.catalog(r, &o.catalog);
                    let x = ops::expire::expire(&repo, catalog.as_ref(), &opts).await?;
                    render::expire(&x)
                };
                let done = done.await;
                each.note(r, done)?;
            }
            Ok(each.code(0))
        }
        Command::Verify {
            output,
            reencrypt,
            options: o,
        } => {
            let opts = ops::verify::VerifyOptions {
                process_max: o.workers.process_max,
                reencrypt: *reencrypt,
            };
            let repos = g.repos()?;
            let mut each = Each::new(&repos);
            let mut reports = Vec::new();
            for r in &repos {
                let done = async {
                    let repo = open_stanza(g, r).await?;
                    let progress: Arc<dyn ops::progress::Progress> =
                        Arc::from(progress::for_stderr(*output == args::Output::Json));
                    ops::verify::verify(&repo, &opts, progress)
                        .await
                        .map(|v| (r.number, repo.describe(), v))
                };
                let done = done.await;
                if let Some(v) = each.note(r, done)? {
                    reports.push(v);
                }
            }
            render::verify_all(&reports, *output)?;
            if reports.iter().any(|(_, _, v)| v.damage() > 0) {
                return Ok(each.code(EXIT_VERIFY_PROBLEMS));
            }
            let unread: Vec<_> = reports
                .iter()
                .flat_map(|(_, repo, v)| {
                    v.problems
                        .iter()
                        .filter(|p| p.kind == ops::verify::UNREADABLE)
                        .map(move |p| (repo, p))
                })
                .collect();
            // Objects it could not read, and nothing it read was damaged:
            // the store failed, not the repository (exit 5, not 11).
            if let Some((repo, first)) = unread.first() {
                let e = Error::repository(format!(
                    "verify of {repo}: {} object(s) could not be read, and nothing read was damaged; first: {}: {}",
                    unread.len(),
                    first.what,
                    first.detail
                ))
                .hint("the objects listed as unreadable could not be fetched (the store did not answer, or a file cannot be read); run verify again once they can");
                report(&e);
                return Ok(each.code(e.kind().exit_code()));
            }
            Ok(each.code(0))
        }
        Command::Info { output, options: o } => {
            let repos = g.repos()?;
            let mut each = Each::new(&repos);
            let mut reports = Vec::new();
            for r in &repos {
                let queue = if repos.len() > 1 || g.selected().is_some() {
                    g.spool(r, &o.status.spool).map(|s| s.queue().state())
                } else {
                    None
                };
                let done = async {
                    let repo = g.open(r)?;
                    let opts = ops::info::InfoOptions {
                        catalog: g.catalog(r, &o.catalog),
                        conn: o.status.connection.if_given(),
                        spool: g.spool(r, &o.status.spool),
                        sealing: true,
                    };
                    let mut report = ops::info::info(&repo, &opts).await?;
                    report.repository_number = r.number;
                    report.archive_push_queue = queue.clone();
                    Ok(report)
                };
                let done = done.await;
                // A repository that does not answer: what waits for it
                // here is what a DBA needs to see now (runbook 8 of
                // docs/disaster-recovery.md).
                if done.is_err() {
                    if let Some(q) = queue
                        .as_ref()
                        .filter(|q| q.files > 0 || !q.dropped_pending.is_empty())
                    {
                        log::warn!("repository {}: {}", r.number, render::queue_line(q));
                    }
                }
                if let Some(report) = each.note(r, done)? {
                    reports.push(report);
                }
            }
            match output {
                InfoOutput::Text => {
                    render::info_all(&reports, repos.len() > 1, args::Output::Text)?
                }
                InfoOutput::Json => {
                    render::info_all(&reports, repos.len() > 1, args::Output::Json)?
                }
                InfoOutput::Openmetrics => render::metrics(&reports)?,
            }
            Ok(each.code(0))
        }
        Command::Drill(a) => drill(g, config_file, a).await,
        Command::Exporter { options: o } => {
            // One repository per exporter (the first, or --repo N).
            let r = g.repo_config()?;
            let repo = open_stanza(g, &r).await?;
            let opts = ops::exporter::ExporterOptions {
                listen: o.listen,
                refresh: o.exporter_refresh,
                info: ops::info::InfoOptions {
                    catalog: g.catalog(&r, &o.catalog),
                    conn: o.status.connection.if_given(),
                    spool: g.spool(&r, &o.status.spool),
                    sealing: false,
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
            let repos = g.repos()?;
            let mut each = Each::new(&repos);
            for r in &repos {
                let done = async {
                    let repo = open_stanza(g, r).await?;
                    each.announce(r, &repo, "backfill in");
                    let b = ops::walfacts::backfill(
                        &repo,
                        g.catalog(r, &o.catalog).as_ref(),
                        o.workers.process_max,
                    )
                    .await?;
                    render::backfill(&b, *output)
                };
                let done = done.await;
                each.note(r, done)?;
            }
            Ok(each.code(0))
        }
        Command::Key { action } => {
            let repos = g.repos()?;
            let mut each = Each::new(&repos);
            for r in &repos {
                let done = async {
                    let repo = g.open(r)?;
                    match action {
                        args::KeyAction::Add { options } => {
                            let source = options.source()?;
                            let a = ops::key::add(&repo, source.as_ref()).await?;
                            render::key_added(&repo, &a);
                        }
                        args::KeyAction::List { output } => {
                            let keys = ops::key::list(&repo).await?;
                            render::key_list(&keys, *output)?;
                        }
                        args::KeyAction::Retire { id } => {
                            ops::key::retire(&repo, id).await?;
                            eprintln!(
                                "pgvault: key {id} retired: it no longer opens stanza {}",
                                repo.stanza()
                            );
                        }
                    }
                    Ok(())
                };
                let done = done.await;
                each.note(r, done)?;
            }
            Ok(each.code(0))
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

/// `archive-push`: into one repository as always, or into several with a
/// quorum and queues (`ops::archive_push::archive_push_quorum`).
async fn archive_push(g: &Global, path: &Path, o: &config::ArchivePush) -> Result<i32> {
    let repos = g.repos()?;
    let opts = ops::archive_push::PushOptions {
        path: path.to_path_buf(),
        encode: o.compression.encode_wal(),
        ahead: o.archive_push_ahead,
        process_max: o.workers.process_max,
        spool: g.spool(&repos[0], &o.spool),
        superseded: o.archive_push_superseded,
    };
    let detached = std::env::var_os(LOOKAHEAD_ENV).is_some();
    if repos.len() == 1 {
        let repo = g.open_for_wal(&repos[0])?;
        let catalog = g.catalog(&repos[0], &o.catalog);
        if detached {
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
        return Ok(0);
    }
    let targets = repos
        .iter()
        .map(|r| {
            Ok(ops::archive_push::Target {
                number: r.number,
                repo: g.open_for_wal(r)?,
                catalog: g.catalog(r, &o.catalog),
                spool: g.spool(r, &o.spool),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let quorum = o.archive_push_quorum.unwrap_or(targets.len());
    if quorum > targets.len() {
        return Err(Error::usage(format!(
            "archive-push-quorum is {quorum}, but {} repositories are configured",
            targets.len()
        ))
        .hint("the quorum is how many repositories must hold a file before PostgreSQL is told"));
    }
    if detached {
        // The detached pusher: catch up the queues, push ahead, quietly.
        ops::archive_push::push_behind(&targets, &opts).await;
        return Ok(0);
    }
    if ops::archive_push::pusher_wanted(&targets, &opts) {
        spawn_detached(LOOKAHEAD_ENV);
    }
    let q = ops::archive_push::QuorumOptions {
        quorum,
        queue_max: o.archive_push_queue_max,
    };
    let out = ops::archive_push::archive_push_quorum(&targets, &opts, &q).await?;
    // A queue that formed just now needs its pusher.
    if !out.queued.is_empty() && ops::archive_push::pusher_wanted(&targets, &opts) {
        spawn_detached(LOOKAHEAD_ENV);
    }
    Ok(0)
}

/// A command acting on each of several repositories: one's failure is
/// reported as it comes and the others still run; the exit code is the
/// first failure's. With one repository its error is the command's, as
/// always.
/// Warns when this host's spool holds files for repository `r` that it
/// does not have yet (several repositories: its archive-push queue).
fn warn_behind(g: &Global, r: &RepoConfig, spool: &config::Spool) {
    let queue = g.spool(r, spool).map(|s| s.queue().state());
    if let Some(q) = queue.as_ref().filter(|q| q.files > 0) {
        log::warn!(
            "repository {} is behind: {}",
            r.number,
            render::queue_line(q)
        );
    }
}

struct Each {
    several: bool,
    code: Option<i32>,
}

impl Each {
    fn new(repos: &[RepoConfig]) -> Each {
        Each {
            several: repos.len() > 1,
            code: None,
        }
    }

    fn note<T>(&mut self, r: &RepoConfig, res: Result<T>) -> Result<Option<T>> {
        match res {
            Ok(v) => Ok(Some(v)),
            Err(e) if !self.several => Err(e),
            Err(e) => {
                let e = e.context(format!("repository {}", r.number));
                report(&e);
                self.code.get_or_insert(e.kind().exit_code());
                Ok(None)
            }
        }
    }

    /// Says which repository comes next, when there are several.
    fn announce(&self, r: &RepoConfig, repo: &Repository, what: &str) {
        if self.several {
            eprintln!(
                "pgvault: {what} repository {} ({})",
                r.number,
                repo.describe()
            );
        }
    }

    fn code(&self, ok: i32) -> i32 {
        self.code.unwrap_or(ok)
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

/// `drill`: of one repository, the first or the one `--repo N` selects.
async fn drill(g: &Global, config_file: Option<&Path>, a: &DrillArgs) -> Result<i32> {
    let o = &a.options;
    let r = g.repo_config()?;
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
        restore_command: restore_command(g, config_file, std::slice::from_ref(&r))?,
        config_file: config_file.map(Path::to_path_buf),
        catalog: g.catalog(&r, &o.catalog),
    };
    let repo = open_stanza(g, &r).await?;
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

fn expire_options(r: &config::RetentionSettings, dry_run: bool) -> ops::expire::ExpireOptions {
    ops::expire::ExpireOptions {
        retention_full: r.retention_full,
        retention_window: r.retention_window,
        retention_diff: r.retention_diff,
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
    repos: &[RepoConfig],
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
        restore_command: restore_command(g, config_file, repos)?,
        target_check: !a.no_target_check,
        catalog: g.catalog(&repos[0], &a.options.catalog),
    })
}

/// The `restore_command` a restored cluster runs: this same binary, with
/// what it needs to reach the repositories this restore used. The
/// postmaster's environment has no `AWS_*` variables, so the configuration
/// file is passed along when one was used; secrets are never written here.
/// Every repository configured, each file from the first that holds it;
/// with `--repo N`, repository N alone (and `--repo N`, so that one the
/// configuration file names too is not asked: after losing a region, a
/// repository there must not stop recovery at its end).
fn restore_command(g: &Global, config_file: Option<&Path>, repos: &[RepoConfig]) -> Result<String> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::internal(format!("find this program's path: {e}")))?;
    let mut parts = vec![shell_quote(&exe.display().to_string())];
    if let Some(c) = config_file {
        let c = std::fs::canonicalize(c).unwrap_or_else(|_| c.to_path_buf());
        parts.push("--config".into());
        parts.push(shell_quote(&c.display().to_string()));
    }
    let selected = g.selected();
    for r in repos {
        // Repository 1 by the names it always had, unless one is selected.
        let name = |long: &str| {
            if r.number == 1 && selected.is_none() {
                format!("--{long}")
            } else {
                format!("--{}", config::repos::numbered_long(r.number, long))
            }
        };
        parts.push(if r.number == 1 && selected.is_none() {
            "--repo".into()
        } else {
            name("path")
        });
        parts.push(shell_quote(&r.location.identity()));
        let s3 = &r.s3;
        if let Some(e) = &s3.s3_endpoint {
            parts.push(name("s3-endpoint"));
            parts.push(shell_quote(e));
        }
        if let Some(reg) = &s3.s3_region {
            parts.push(name("s3-region"));
            parts.push(shell_quote(reg));
        }
        if let Some(h) = s3.s3_allow_http {
            parts.push(format!("{}={h}", name("s3-allow-http")));
        }
        if !s3.s3_atomic_create {
            parts.push(format!("{}=false", name("s3-atomic-create")));
        }
        // The other stores' settings that are not secrets (keys come from
        // the configuration file or the server's environment).
        for (long, v) in [
            ("gcs-endpoint", &s3.gcs_endpoint),
            ("gcs-key-file", &s3.gcs_key_file),
            ("azure-account", &s3.azure_account),
            ("azure-endpoint", &s3.azure_endpoint),
            ("s3-sse-kms-key-id", &s3.s3_sse_kms_key_id),
        ] {
            if let Some(v) = v {
                parts.push(name(long));
                parts.push(shell_quote(v));
            }
        }
        if s3.s3_sse != "none" {
            parts.push(format!("{}={}", name("s3-sse"), s3.s3_sse));
        }
        if !s3.azure_bulk_delete {
            parts.push(format!("{}=false", name("azure-bulk-delete")));
        }
    }
    // The key's place, never the key: a key file, or the command that
    // prints it (PostgreSQL's environment lacks PGVAULT_REPO_CIPHER_KEY
    // unless its service sets it, or the configuration file holds it).
    let c = &g.cipher;
    if c.repo_cipher_type != "none" {
        parts.push(format!("--repo-cipher-type={}", c.repo_cipher_type));
        if let Some(f) = &c.repo_cipher_key_file {
            let f = std::fs::canonicalize(f).unwrap_or_else(|_| f.clone());
            parts.push("--repo-cipher-key-file".into());
            parts.push(shell_quote(&f.display().to_string()));
        }
        if let Some(cmd) = &c.repo_cipher_key_command {
            parts.push("--repo-cipher-key-command".into());
            parts.push(shell_quote(cmd));
        }
    }
    if let Some(n) = selected {
        parts.push("--repo".into());
        parts.push(n.to_string());
    }
    parts.push("--stanza".into());
    parts.push(shell_quote(&g.stanza));
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
