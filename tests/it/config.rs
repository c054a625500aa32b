//! Options as a new user meets them (issue 9's smaller defects, issue 13's
//! "finish"), through the real binary:
//!
//! - each command's `--help` shows only the options it uses, grouped
//!   (its own, PostgreSQL, Repository), each with a description;
//! - one configuration file serves every command, even with options a
//!   command does not use; a value of the wrong type is named by its key;
//! - a misspelled `PGVAULT_*` variable is warned about, naming the option
//!   meant;
//! - `expire-auto` without any retention is refused before the backup
//!   starts;
//! - a misspelled `--stanza` is told which stanzas the repository holds,
//!   and leaves no directory behind (no lock in the repository, no spool).

use crate::common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// `pgvault <command> --help`.
fn help(env: &TestEnv, command: &str) -> String {
    let run = env.pgvault(As::Root, &[command, "--help"], &[], env.dir());
    run.ok();
    run.stdout
}

/// The section of a help text under `heading` ("Options", "PostgreSQL",
/// "Repository"), up to the next heading.
fn section<'a>(help: &'a str, heading: &str) -> &'a str {
    let start = help
        .find(&format!("\n{heading}:\n"))
        .unwrap_or_else(|| panic!("no {heading:?} section in:\n{help}"));
    let rest = &help[start + heading.len() + 3..];
    let end = rest
        .match_indices("\n\n")
        .map(|(i, _)| i)
        .find(|&i| rest[i + 2..].starts_with(|c: char| !c.is_whitespace()))
        .unwrap_or(rest.len());
    &rest[..end]
}

/// The flags (`--name`) a help section lists.
fn flags(section: &str) -> Vec<&str> {
    section
        .lines()
        .filter_map(|l| {
            let l = l.trim_start().trim_start_matches("-h, ");
            l.starts_with("--")
                .then(|| l.split([' ', '=']).next().unwrap_or_default())
        })
        .collect()
}

struct HelpCase {
    command: &'static str,
    /// Flags under the command's own "Options:".
    own: &'static [&'static str],
    /// Flags under "PostgreSQL:" (none: no such section).
    postgres: &'static [&'static str],
    /// Flags nowhere in the help.
    absent: &'static [&'static str],
}

const HELP_CASES: &[HelpCase] = &[
    HelpCase {
        command: "restore",
        own: &[
            "--set",
            "--target-time",
            "--target-name",
            "--delta",
            "--process-max",
        ],
        postgres: &["--pgdata"],
        absent: &[
            "--compress-level",
            "--retention-full",
            "--archive-push-ahead",
            "--pg-host",
        ],
    },
    HelpCase {
        command: "archive-get",
        own: &["--archive-get-ahead", "--spool-path"],
        postgres: &[],
        absent: &[
            "--retention-full",
            "--compress-level",
            "--process-max",
            "--pgdata",
            "--expire-auto",
        ],
    },
    HelpCase {
        command: "archive-push",
        own: &[
            "--archive-push-ahead",
            "--process-max",
            "--compress-level",
            "--spool-path",
        ],
        postgres: &[],
        absent: &["--retention-full", "--pgdata", "--pg-host", "--set"],
    },
    HelpCase {
        command: "backup",
        own: &[
            "--start-fast",
            "--process-max",
            "--compress-level",
            "--expire-auto",
            "--retention-full",
            "--archive-timeout",
        ],
        postgres: &["--pgdata", "--pg-host", "--pg-port"],
        absent: &["--archive-get-ahead", "--set", "--spool-path"],
    },
    HelpCase {
        command: "check",
        own: &["--archive-timeout"],
        postgres: &["--pg-host", "--pg-port"],
        absent: &["--pgdata", "--compress-level", "--process-max"],
    },
    HelpCase {
        command: "expire",
        own: &["--dry-run", "--retention-full", "--retention-window"],
        postgres: &[],
        absent: &["--process-max", "--pgdata", "--compress-level"],
    },
    HelpCase {
        command: "verify",
        own: &["--output", "--process-max"],
        postgres: &[],
        absent: &["--retention-full", "--pgdata", "--compress-level"],
    },
    HelpCase {
        command: "info",
        own: &["--output"],
        // For the archiver's lag, when given (issue 13).
        postgres: &["--pg-host", "--pg-port"],
        absent: &["--process-max", "--retention-full", "--pgdata"],
    },
    HelpCase {
        command: "stanza-create",
        own: &[],
        postgres: &["--pgdata"],
        absent: &["--process-max", "--pg-host", "--compress-level"],
    },
];

fn help_cases(env: &TestEnv, cases: &mut Cases) {
    for c in HELP_CASES {
        cases.run(
            &format!("{} --help: its own options, grouped", c.command),
            || {
                let text = help(env, c.command);
                let own = flags(section(&text, "Options"));
                for f in c.own {
                    assert!(own.contains(f), "{f} should be under Options:\n{text}");
                }
                if c.postgres.is_empty() {
                    assert!(!text.contains("\nPostgreSQL:\n"), "{text}");
                } else {
                    let pg = flags(section(&text, "PostgreSQL"));
                    for f in c.postgres {
                        assert!(pg.contains(f), "{f} should be under PostgreSQL:\n{text}");
                    }
                }
                let repo = flags(section(&text, "Repository"));
                for f in ["--repo", "--stanza", "--s3-endpoint", "--s3-allow-http"] {
                    assert!(repo.contains(&f), "{f} should be under Repository:\n{text}");
                    assert!(!own.contains(&f), "{f} is not {}'s own:\n{text}", c.command);
                }
                for f in c.absent {
                    assert!(
                        !text.contains(&format!("{f} ")),
                        "{} --help should not offer {f}:\n{text}",
                        c.command
                    );
                }
                assert!(!text.contains("secret-access-key"), "{text}");
                // Every option says what it is.
                for line in section(&text, "Options").lines() {
                    let l = line.trim();
                    if l.starts_with("--") {
                        let described = l.split_whitespace().count() > 2
                            || text.contains(&format!("{l}\n          "));
                        assert!(described, "no description: {l:?}\n{text}");
                    }
                }
                assert!(!text.contains("for backup and restore"), "{text}");
            },
        );
    }
}

/// A file with options of many commands: every command reads it.
fn shared_file_cases(env: &TestEnv, repo: &Repo, cases: &mut Cases) {
    cases.run("one configuration file serves every command", || {
        let file = env.dir().join("shared.toml");
        fs::write(
            &file,
            format!(
                "repo = \"{}\"\nstanza = \"{}\"\npg-port = 5999\nretention-full = 2\n\
                 compress-level = 5\narchive-get-ahead = 0\nexpire-auto = false\n",
                repo.url, repo.stanza
            ),
        )
        .unwrap();
        let file = file.display().to_string();
        let run = env.pgvault(As::Root, &["--config", &file, "info"], &[], env.dir());
        run.ok();
        assert!(run.stderr.trim().is_empty(), "{}", run.stderr);
        let dest = env.dir().join("fetched").display().to_string();
        let get = [
            "archive-get",
            "--config",
            &file,
            "000000010000000000000009",
            &dest,
        ];
        let run = env.pgvault(As::Root, &get, &[], env.dir());
        run.expect_code(1);
        assert!(!run.stderr.contains("error"), "{}", run.stderr);
    });

    cases.run(
        "a value of the wrong type names its key and the file",
        || {
            let file = env.dir().join("wrong-type.toml");
            fs::write(
                &file,
                format!("repo = \"{}\"\npg-port = \"port\"\n", repo.url),
            )
            .unwrap();
            let file = file.display().to_string();
            let run = env.pgvault(As::Root, &["--config", &file, "info"], &[], env.dir());
            run.expect_code(2).expect_one_error_line("pg-port");
            assert!(run.stderr.contains(&file), "{}", run.stderr);
        },
    );

    cases.run(
        "a misspelled PGVAULT_ variable is named, with the option meant",
        || {
            let mut args = repo.args();
            args.push("info".into());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut vars = repo.env.clone();
            vars.push(("PGVAULT_COMPRES_LEVEL".into(), "5".into()));
            let run = env.pgvault(As::Root, &args, &vars, env.dir());
            run.ok();
            let warning = run
                .stderr_lines()
                .into_iter()
                .find(|l| l.contains("PGVAULT_COMPRES_LEVEL"))
                .unwrap_or_else(|| panic!("no warning naming the variable:\n{}", run.stderr))
                .to_string();
            assert!(
                warning.contains("warning") && warning.contains("PGVAULT_COMPRESS_LEVEL"),
                "{warning}"
            );
        },
    );
}

fn expire_auto_cases(env: &TestEnv, repo: &Repo, pg: &Cluster, cases: &mut Cases) {
    let pgdata = pg.pgdata().display().to_string();
    // The cluster is not running: a backup that started would fail to
    // connect (exit 7) instead.
    cases.run("expire-auto without retention is refused up front", || {
        let run = repo.run(
            env,
            As::PgUser,
            &["backup", "--pgdata", &pgdata, "--expire-auto", "true"],
            env.dir(),
        );
        run.expect_code(2).expect_one_error_line("expire-auto");
        assert!(
            run.stderr.contains("hint:") && run.stderr.contains("retention-full"),
            "{}",
            run.stderr
        );
        let lock = repo.local.as_ref().unwrap().join(&repo.stanza).join("lock");
        assert!(!lock.exists(), "a refused backup took the lock");
    });
    cases.run(
        "expire-auto from the file, without retention: refused too",
        || {
            let file = env.dir().join("expire-auto.toml");
            fs::write(&file, "expire-auto = true\n").unwrap();
            let file = file.display().to_string();
            let run = repo.run(
                env,
                As::PgUser,
                &["--config", &file, "backup", "--pgdata", &pgdata],
                env.dir(),
            );
            run.expect_code(2).expect_one_error_line("expire-auto");
        },
    );
}

/// Everything below `dir`, relative.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(p.strip_prefix(dir).unwrap().to_path_buf());
            if p.is_dir() {
                todo.push(p);
            }
        }
    }
    out.sort();
    out
}

fn misspelled_stanza_cases(env: &TestEnv, repo: &Repo, pg: &Cluster, cases: &mut Cases) {
    let wrong = repo.with_stanza("mian");
    let pgdata = pg.pgdata().display().to_string();
    let target = env.dir().join("restore-target").display().to_string();
    // A file waiting to be archived: archive-push starts its look-ahead
    // pusher, whose spool must not appear either.
    let status = pg.wal_dir().join("archive_status");
    fs::write(status.join("000000010000000000000002.ready"), "").unwrap();
    let segment = pg.wal_dir().join("000000010000000000000001");
    assert!(segment.exists(), "initdb's first segment");
    let segment = segment.display().to_string();
    let state = env
        .base_env(As::PgUser)
        .into_iter()
        .find(|(k, _)| k == "XDG_STATE_HOME")
        .map(|(_, v)| PathBuf::from(v))
        .unwrap();
    let repo_dir = repo.local.clone().unwrap();
    let before = tree(&repo_dir);
    let commands: &[&[&str]] = &[
        &["info"],
        &["backup", "--pgdata", &pgdata],
        &["expire", "--retention-full", "1"],
        &["verify"],
        &["check"],
        &["backfill"],
        &["restore", "--pgdata", &target],
        &["stanza-upgrade", "--pgdata", &pgdata],
        &["archive-push", &segment],
    ];
    for args in commands {
        cases.run(&format!("{}: a misspelled --stanza", args[0]), || {
            let run = wrong.run(env, As::PgUser, args, pg.pgdata());
            run.expect_code(6)
                .expect_one_error_line("stanza \"mian\" does not exist");
            let error = run.stderr_lines()[0].to_string();
            assert!(
                error.contains("\"main\""),
                "should name stanza main: {error}"
            );
            assert!(
                run.stderr.contains("hint: pass --stanza main"),
                "{}",
                run.stderr
            );
            // The look-ahead pusher is detached: give it time to misbehave.
            std::thread::sleep(Duration::from_millis(500));
            assert_eq!(tree(&repo_dir), before, "the repository changed");
            let spools = tree(&state.join("pgvault/spool"));
            assert!(
                !spools.iter().any(|p| p.to_string_lossy().contains("-mian")),
                "a spool for the stanza that does not exist: {spools:?}"
            );
        });
    }
}

#[test]
fn options_help_and_stanza_names() {
    let env = TestEnv::new();
    let mut cases = Cases::new();
    help_cases(&env, &mut cases);

    let pg = Cluster::init(&env, InitOpts::default());
    let repo = env.local_repo("main");
    repo.stanza_create(&env, pg.pgdata());

    shared_file_cases(&env, &repo, &mut cases);
    expire_auto_cases(&env, &repo, &pg, &mut cases);
    misspelled_stanza_cases(&env, &repo, &pg, &mut cases);
    cases.finish();
}
