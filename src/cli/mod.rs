//! The command line: clap definitions, rendering, exit codes. The only
//! module that knows clap, indicatif or stdout.

mod args;
mod logger;
mod render;

use std::io::Write;

use clap::Parser;

use crate::config::Settings;
use crate::error::{Error, Kind, Result};
use crate::ops;
use crate::repo::Repository;
use args::{Cli, Command};

/// Exit code of `archive-get` when the file is not in the archive.
pub const EXIT_NOT_FOUND: i32 = 1;
/// Exit code of `archive-get` for every failure other than "not in the
/// archive" during archive recovery: PostgreSQL treats codes above 125 as
/// fatal and stops, where 1–125 would mean "end of archive" and end
/// recovery early (xlogarchive.c, RestoreArchivedFile).
pub const EXIT_GET_FATAL: i32 = 254;

pub fn main() -> i32 {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let is_get = argv.iter().any(|a| a == "archive-get");
    let cli = match Cli::try_parse_from(&argv) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            if code != 0 && is_get {
                return get_failure_code();
            }
            return code;
        }
    };
    let command = cli.command.clone();
    let settings = match cli.low_args().resolve() {
        Ok(s) => s,
        Err(e) => {
            logger::init(log::LevelFilter::Warn);
            report(&e);
            return exit_for(&command, &e);
        }
    };
    logger::init(settings.log_level);
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
    match rt.block_on(run(&command, &settings)) {
        Ok(code) => code,
        Err(e) => {
            report(&e);
            exit_for(&command, &e)
        }
    }
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
    if std::path::Path::new("standby.signal").exists() {
        EXIT_NOT_FOUND
    } else {
        EXIT_GET_FATAL
    }
}

fn open_repo(s: &Settings) -> Result<Repository> {
    Repository::open(s.repo()?.clone(), &s.stanza, &s.s3)
}

async fn run(command: &Command, s: &Settings) -> Result<i32> {
    match command {
        Command::StanzaCreate => {
            let repo = open_repo(s)?;
            let opts = ops::stanza_create::StanzaCreateOptions {
                pgdata: s.pgdata()?.to_path_buf(),
            };
            let r = ops::stanza_create::stanza_create(&repo, &opts).await?;
            render::stanza_created(&repo, &r);
            Ok(0)
        }
        Command::ArchivePush { path } => {
            let repo = open_repo(s)?;
            let opts = ops::archive_push::PushOptions {
                path: path.clone(),
                encode: s.encode,
            };
            ops::archive_push::archive_push(&repo, s.catalog().as_ref(), &opts).await?;
            Ok(0)
        }
        Command::ArchiveGet { name, dest } => {
            let repo = open_repo(s)?;
            let opts = ops::archive_get::GetOptions {
                name: name.clone(),
                dest: dest.clone(),
            };
            match ops::archive_get::archive_get(&repo, &opts).await? {
                ops::archive_get::GetOutcome::Restored => Ok(0),
                ops::archive_get::GetOutcome::NotFound => {
                    log::info!("{name} is not in the archive");
                    Ok(EXIT_NOT_FOUND)
                }
            }
        }
        Command::Info { output } => {
            let repo = open_repo(s)?;
            let report = ops::info::info(&repo, s.catalog().as_ref()).await?;
            render::info(&report, *output)?;
            Ok(0)
        }
    }
}
