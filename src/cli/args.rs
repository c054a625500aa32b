//! Low-level arguments: what the user typed, as clap parses it. The options
//! (settable from the environment and the file too) are defined in
//! `config`; here are the commands and their command-line-only flags.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config;

/// Said under every command's `--help`.
const OPTIONS_NOTE: &str = "Each option can also be set as a PGVAULT_<NAME> environment variable \
                            or in the configuration file (see docs/configuration.md).";

#[derive(Debug, Parser)]
#[command(
    name = "pgvault",
    version,
    about = "Backup, WAL archive and point-in-time recovery for PostgreSQL",
    after_help = "Each option can also be set as a PGVAULT_<NAME> environment variable or in the TOML \
                  configuration file (--config, default /etc/pgvault/pgvault.toml); S3 credentials \
                  (s3-access-key-id, s3-secret-access-key) only there. `pgvault <command> --help` \
                  shows a command's options. Exit codes: see docs/exit-codes.md."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: config::Global,

    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The command line, with a note on options under each command's help.
    pub fn definition() -> clap::Command {
        <Cli as clap::CommandFactory>::command().mut_subcommands(|sc| sc.after_help(OPTIONS_NOTE))
    }
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// Register the cluster in --pgdata in the repository
    StanzaCreate {
        #[command(flatten)]
        options: config::Stanza,
    },
    /// After pg_upgrade: record the upgraded cluster in --pgdata as the stanza's current one
    StanzaUpgrade {
        #[command(flatten)]
        options: config::Stanza,
    },
    /// Archive one WAL file (archive_command = 'pgvault archive-push %p')
    ArchivePush {
        /// The file, as PostgreSQL passes it (%p, relative to the data directory)
        path: PathBuf,
        #[command(flatten)]
        options: config::ArchivePush,
    },
    /// Fetch one archived WAL file (restore_command = 'pgvault archive-get %f "%p"')
    ArchiveGet {
        /// The WAL file name (%f)
        name: String,
        /// Where to put it (%p)
        dest: PathBuf,
        #[command(flatten)]
        options: config::ArchiveGet,
    },
    /// Take a base backup of the running cluster
    Backup {
        /// Backup type: full, diff (changes since the newest full) or incr
        /// (changes since the newest backup); a diff or incr without a
        /// usable backup to build on becomes a full one, and says so
        #[arg(long = "type", value_enum, default_value_t = BackupType::Incr)]
        backup_type: BackupType,
        /// Start with an immediate checkpoint instead of a spread one
        #[arg(long)]
        start_fast: bool,
        #[command(flatten)]
        options: config::Backup,
    },
    /// Restore a backup into --pgdata and write the recovery settings
    Restore(Box<RestoreArgs>),
    /// Prove that archiving into the repository works right now
    Check {
        #[command(flatten)]
        options: config::Check,
    },
    /// Apply retention: delete old backups and the WAL nothing kept needs
    Expire {
        /// Show what would be deleted, delete nothing
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        options: config::Expire,
    },
    /// Read every object of the stanza and check checksums, backups and the WAL chain
    Verify {
        /// Output format: text for people, json for scripts
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        /// First seal the plaintext objects of a stanza encrypted after it was created (backup data objects excepted: see docs/encryption.md)
        #[arg(long)]
        reencrypt: bool,
        #[command(flatten)]
        options: config::Verify,
    },
    /// Show what the repository holds for the stanza
    Info {
        /// Output format: text for people, json for scripts, openmetrics for Prometheus (node_exporter's textfile collector)
        #[arg(long, value_enum, default_value_t = InfoOutput::Text)]
        output: InfoOutput,
        #[command(flatten)]
        options: config::Info,
    },
    /// Restore a backup into a scratch directory, start it, check it, and report the RTO and RPO achieved
    Drill(DrillArgs),
    /// Serve the metrics of `info --output openmetrics` over HTTP (/metrics), read again on an interval
    Exporter {
        #[command(flatten)]
        options: config::Exporter,
    },
    /// Summarize the records of archived WAL that has no summary yet (archived by an older pgvault)
    Backfill {
        /// Output format: text for people, json for scripts
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
        #[command(flatten)]
        options: config::Backfill,
    },
    /// The repository's encryption keys: add one (or turn encryption on), list them, retire one
    Key {
        #[command(subcommand)]
        action: KeyAction,
    },
    /// Print the completion script for SHELL on stdout (packaging: generated from these definitions)
    #[command(hide = true)]
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages, pgvault.1 and pgvault-COMMAND.1, into DIR (packaging)
    #[command(hide = true)]
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

/// `pgvault key …` (docs/encryption.md).
#[derive(Debug, Clone, Subcommand)]
pub enum KeyAction {
    /// Wrap the stanza's data keys with another key too (only a small key object is written); on a stanza without keys, turn encryption on with the configured key
    Add {
        #[command(flatten)]
        options: config::KeyAdd,
    },
    /// The keys that open the stanza (ids only: a key is never shown)
    List {
        /// Output format: text for people, json for scripts
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Delete key ID's key object: that key no longer opens the stanza (data is not rewritten)
    Retire {
        /// The key's id, as `key list` shows it
        #[arg(value_name = "ID")]
        id: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackupType {
    Full,
    Diff,
    Incr,
}

/// Which backup, and the recovery target: `restore` and `drill`.
#[derive(Debug, Clone, clap::Args)]
pub struct TargetArgs {
    /// Backup label, or "latest" (with a time or LSN target: the newest that ends before it)
    #[arg(long, value_name = "LABEL")]
    pub set: Option<String>,
    /// Recover to this time: RFC 3339 or "YYYY-MM-DD HH:MM:SS[.ffffff]±TZ"
    #[arg(long, group = "target_kind")]
    pub target_time: Option<String>,
    /// Recover to this LSN (X/X)
    #[arg(long, group = "target_kind")]
    pub target_lsn: Option<String>,
    /// Recover to this transaction id
    #[arg(long, group = "target_kind")]
    pub target_xid: Option<String>,
    /// Recover to this restore point (pg_create_restore_point)
    #[arg(long, group = "target_kind")]
    pub target_name: Option<String>,
    /// "immediate": stop as soon as the backup is consistent
    #[arg(long, group = "target_kind", value_parser = ["immediate"])]
    pub target: Option<String>,
    /// latest, current, or a timeline number [PostgreSQL's default: latest]
    #[arg(long)]
    pub target_timeline: Option<String>,
    /// Stop just before the target instead of just after it
    #[arg(long)]
    pub target_exclusive: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct DrillArgs {
    /// Keep the scratch directory (PostgreSQL stopped) to look at afterwards
    #[arg(long)]
    pub keep: bool,
    /// Output format of the report: text for people, json for scripts
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    #[command(flatten)]
    pub targets: TargetArgs,
    #[command(flatten)]
    pub options: config::Drill,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub targets: TargetArgs,
    /// What to do at the target [PostgreSQL's default: pause]
    #[arg(long, value_enum)]
    pub target_action: Option<TargetActionArg>,
    /// preserve: the restored cluster archives (a restored primary must); off: clones and drills
    #[arg(long, value_enum, default_value_t = ArchiveModeArg::Preserve)]
    pub archive_mode: ArchiveModeArg,
    /// Restore tablespace OID into DIR instead of its original location (repeatable)
    #[arg(long, value_name = "OID=DIR")]
    pub tablespace_map: Vec<String>,
    /// Start as a standby (standby.signal) replaying from the archive
    #[arg(long)]
    pub standby: bool,
    /// With --standby: file holding the primary_conninfo (keep passwords in ~/.pgpass)
    #[arg(long, value_name = "FILE")]
    pub primary_conninfo_file: Option<PathBuf>,
    /// Restore into a non-empty directory, reusing files that match the backup
    #[arg(long)]
    pub delta: bool,
    /// Try the target even if the archive does not reach it (a time after the last archived commit, an unknown restore point)
    #[arg(long)]
    pub no_target_check: bool,
    /// Patroni: the data directory (as --pgdata, which it overrides)
    #[arg(long, value_name = "DIR", help_heading = PATRONI)]
    pub datadir: Option<PathBuf>,
    /// Patroni: "replica" restores as a standby (as --standby)
    #[arg(long, value_name = "ROLE", value_parser = ["replica", "primary", "master"], help_heading = PATRONI)]
    pub role: Option<String>,
    /// Patroni: the cluster's scope (accepted; the stanza comes from --stanza)
    #[arg(long, value_name = "NAME", help_heading = PATRONI)]
    pub scope: Option<String>,
    /// Patroni: the leader's connection (accepted; Patroni writes primary_conninfo itself)
    #[arg(long, value_name = "CONNINFO", help_heading = PATRONI)]
    pub connstring: Option<String>,
    /// Patroni: a method's keep_data, passed along (accepted)
    #[arg(long = "keep_data", value_name = "BOOL", hide = true)]
    pub keep_data: Option<String>,
    /// Patroni: a method's no_leader, passed along (accepted)
    #[arg(long = "no_leader", value_name = "BOOL", hide = true)]
    pub no_leader: Option<String>,
    #[command(flatten)]
    pub options: config::Restore,
}

/// The arguments Patroni passes to a `create_replica_methods` entry or a
/// custom `bootstrap` method (docs/patroni.md).
const PATRONI: &str = "Patroni (create_replica_methods, bootstrap)";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TargetActionArg {
    Pause,
    Promote,
    Shutdown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ArchiveModeArg {
    Preserve,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InfoOutput {
    Text,
    Json,
    Openmetrics,
}

#[cfg(test)]
mod tests {
    //! The whole command line: flags, `PGVAULT_*` and the file through
    //! `config::parse` into [`Cli`], with the real option definitions.

    use super::*;
    use clap::{CommandFactory, FromArgMatches};
    use std::ffi::OsString;

    struct Parsed {
        cli: Cli,
        warnings: Vec<String>,
    }

    /// `pgvault ARGS` with exactly `env` as the environment and `file` as
    /// the configuration file.
    fn parse(args: &[&str], env: &[(&str, &str)], file: &str) -> Result<Parsed, String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pgvault.toml");
        std::fs::write(&path, file).unwrap();
        let argv: Vec<OsString> = std::iter::once("pgvault")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect();
        let mut vars: Vec<(OsString, OsString)> = vec![("PGVAULT_CONFIG".into(), path.into())];
        vars.extend(env.iter().map(|(k, v)| (k.into(), v.into())));
        match crate::config::parse(Cli::definition(), &argv, &vars) {
            Ok(p) => Ok(Parsed {
                cli: Cli::from_arg_matches(&p.matches).map_err(|e| e.to_string())?,
                warnings: p.warnings,
            }),
            Err(crate::config::ParseError::Clap(e)) => Err(e.to_string()),
            Err(crate::config::ParseError::Config(e)) => {
                Err(format!("{e}\nhint: {}", e.hint_text().unwrap_or_default()))
            }
        }
    }

    #[track_caller]
    fn ok(args: &[&str], env: &[(&str, &str)], file: &str) -> Parsed {
        parse(args, env, file).unwrap_or_else(|e| panic!("pgvault {args:?}: {e}"))
    }

    #[track_caller]
    fn err(args: &[&str], env: &[(&str, &str)], file: &str) -> String {
        match parse(args, env, file) {
            Ok(p) => panic!("pgvault {args:?} should fail, got {:?}", p.cli),
            Err(e) => e,
        }
    }

    /// One option of each kind, read back from the parsed command line.
    struct Kind {
        /// The command (and positional arguments) that uses the option.
        command: &'static [&'static str],
        key: &'static str,
        /// Values for the file (TOML), the environment and the flag.
        file: &'static str,
        env: &'static str,
        flag: &'static str,
        default: &'static str,
        read: fn(&Cli) -> String,
    }

    fn kinds() -> Vec<Kind> {
        vec![
            Kind {
                command: &["info"],
                key: "stanza",
                file: "\"f\"",
                env: "e",
                flag: "c",
                default: "main",
                read: |c| c.global.stanza.clone(),
            },
            Kind {
                command: &["info"],
                key: "repo",
                file: "\"/f\"",
                env: "/e",
                flag: "s3://c/x",
                default: "None",
                read: |c| match &c.global.repo {
                    Some(crate::config::RepoArg::Location(l)) => {
                        format!("{:?}", Some(l.identity()))
                    }
                    other => format!("{other:?}"),
                },
            },
            Kind {
                command: &["info"],
                key: "s3-atomic-create",
                file: "false",
                env: "true",
                flag: "false",
                default: "true",
                read: |c| c.global.s3.s3_atomic_create.to_string(),
            },
            Kind {
                command: &["info"],
                key: "log-level",
                file: "\"error\"",
                env: "debug",
                flag: "trace",
                default: "WARN",
                read: |c| c.global.log_level.to_string(),
            },
            Kind {
                command: &["info"],
                key: "catalog",
                file: "\"off\"",
                env: "/e.db",
                flag: "/c.db",
                default: "None",
                read: |c| match &c.command {
                    Command::Info { options, .. } => format!("{:?}", options.catalog.catalog),
                    _ => unreachable!(),
                },
            },
            Kind {
                command: &["archive-push", "pg_wal/x"],
                key: "compress-level",
                file: "5",
                env: "7",
                flag: "9",
                // Set nowhere: archive-push's own default (WAL_COMPRESS_LEVEL).
                default: "1",
                read: |c| match &c.command {
                    Command::ArchivePush { options, .. } => {
                        options.compression.encode_wal().level.to_string()
                    }
                    _ => unreachable!(),
                },
            },
            Kind {
                command: &["backup"],
                key: "expire-auto",
                file: "true",
                env: "false",
                flag: "true",
                default: "false",
                read: |c| match &c.command {
                    Command::Backup { options, .. } => options.expire_auto.to_string(),
                    _ => unreachable!(),
                },
            },
            Kind {
                command: &["backup"],
                key: "pg-port",
                file: "5433",
                env: "5434",
                flag: "5435",
                default: "None",
                read: |c| match &c.command {
                    Command::Backup { options, .. } => {
                        format!("{:?}", options.connection.pg_port)
                    }
                    _ => unreachable!(),
                },
            },
            Kind {
                command: &["expire"],
                key: "retention-window",
                file: "\"1d\"",
                env: "2h",
                flag: "3m",
                default: "None",
                read: |c| match &c.command {
                    Command::Expire { options, .. } => {
                        format!("{:?}", options.retention.values.retention_window)
                    }
                    _ => unreachable!(),
                },
            },
            Kind {
                command: &["restore"],
                key: "pgdata",
                file: "\"/f\"",
                env: "/e",
                flag: "/c",
                default: "None",
                read: |c| match &c.command {
                    Command::Restore(a) => format!("{:?}", a.options.data.pgdata),
                    _ => unreachable!(),
                },
            },
            Kind {
                command: &["verify"],
                key: "process-max",
                file: "3",
                env: "4",
                flag: "5",
                default: "2",
                read: |c| match &c.command {
                    Command::Verify { options, .. } => options.workers.process_max.to_string(),
                    _ => unreachable!(),
                },
            },
        ]
    }

    #[test]
    fn flag_beats_environment_beats_file_for_every_kind_of_option() {
        for k in kinds() {
            let var = format!("PGVAULT_{}", k.key.to_uppercase().replace('-', "_"));
            let file = format!("{} = {}\n", k.key, k.file);
            let flag = format!("--{}={}", k.key, k.flag);
            let read = |args: &[&str], env: &[(&str, &str)], file: &str| {
                let mut all = k.command.to_vec();
                all.extend_from_slice(args);
                (k.read)(&ok(&all, env, file).cli)
            };
            let expect = |value: &str| {
                // What the option reads as when given `value` on its own.
                read(&[&format!("--{}={value}", k.key)], &[], "")
            };
            let from_file = read(&[], &[], &file);
            let from_env = read(&[], &[(&var, k.env)], &file);
            let from_flag = read(&[&flag], &[(&var, k.env)], &file);
            assert_eq!(read(&[], &[], ""), k.default, "{}: default", k.key);
            assert_eq!(
                from_file,
                expect(k.file.trim_matches('"')),
                "{}: the file",
                k.key
            );
            assert_ne!(from_file, k.default, "{}: the file's value is seen", k.key);
            assert_eq!(from_env, expect(k.env), "{}: environment over file", k.key);
            assert_eq!(from_flag, expect(k.flag), "{}: flag over both", k.key);
            // A flag before the command name counts the same.
            let mut before = vec![flag.as_str()];
            before.extend_from_slice(k.command);
            assert_eq!(
                (k.read)(&ok(&before, &[(&var, k.env)], &file).cli),
                from_flag,
                "{}: flag before the command",
                k.key
            );
        }
    }

    #[test]
    fn environment_names_follow_the_long_names() {
        let cmd = Cli::command();
        let mut options = 0;
        for arg in cmd
            .get_arguments()
            .chain(cmd.get_subcommands().flat_map(|s| s.get_arguments()))
        {
            let (Some(long), Some(env)) = (arg.get_long(), arg.get_env()) else {
                continue;
            };
            options += 1;
            assert_eq!(
                env.to_string_lossy(),
                format!("PGVAULT_{}", long.to_uppercase().replace('-', "_"))
            );
            assert!(arg.get_help().is_some(), "--{long} has no help text");
            if crate::config::is_secret(arg) {
                assert!(arg.is_hide_set(), "the secret --{long} must be hidden");
            }
        }
        assert!(options >= 25, "only {options} options found");
    }

    #[test]
    fn every_option_is_documented() {
        let doc = include_str!("../../docs/configuration.md");
        let cmd = Cli::command();
        for arg in cmd
            .get_arguments()
            .chain(cmd.get_subcommands().flat_map(|s| s.get_arguments()))
        {
            if let (Some(long), Some(env)) = (arg.get_long(), arg.get_env()) {
                // Repository N's options are documented once, as repoN-….
                let (long, env) = match numbered(long) {
                    Some(n) => (
                        long.replacen(&format!("repo{n}-"), "repoN-", 1),
                        env.to_string_lossy().replacen(
                            &format!("PGVAULT_REPO{n}_"),
                            "PGVAULT_REPON_",
                            1,
                        ),
                    ),
                    None => (long.to_string(), env.to_string_lossy().into_owned()),
                };
                let row = format!("| `{long}` | `{env}` |");
                assert!(doc.contains(&row), "docs/configuration.md has no row {row}");
            }
        }
    }

    /// N of a numbered option's name `repoN-…`.
    fn numbered(long: &str) -> Option<u8> {
        let rest = long.strip_prefix("repo")?;
        let (n, _) = rest.split_once('-')?;
        n.parse().ok()
    }

    fn configured(p: &Parsed) -> Vec<(u8, String)> {
        p.cli
            .global
            .repos()
            .unwrap()
            .iter()
            .map(|r| (r.number, r.location.identity()))
            .collect()
    }

    /// The storage options (docs/cloud.md) are each repository's own, from
    /// the file as from flags, and a bad value is named.
    #[test]
    fn storage_options_per_repository() {
        let file = "repo = \"s3://b/one\"\nstorage-class-wal = \"STANDARD_IA\"\n\
                    storage-bandwidth-limit = \"20M\"\nrepo2-path = \"s3://b/two\"\n\
                    repo2-storage-timeout = \"30s\"\nrepo2-storage-proxy = \"http://u:pw@p:3128\"\n";
        let p = ok(&["info", "--storage-retries", "3"], &[], file);
        let repos = p.cli.global.repos().unwrap();
        let one = repos[0].s3.options().unwrap();
        assert_eq!(one.storage_class.wal.as_deref(), Some("STANDARD_IA"));
        assert_eq!(one.bandwidth_limit, Some(20 << 20));
        assert_eq!(one.client.retries, 3);
        assert_eq!(one.client.timeout, std::time::Duration::from_secs(120));
        let two = repos[1].s3.options().unwrap();
        assert_eq!(
            two.storage_class.wal, None,
            "repository 1's settings are its own"
        );
        assert_eq!(two.bandwidth_limit, None);
        assert_eq!(two.client.timeout, std::time::Duration::from_secs(30));
        assert_eq!(two.client.proxy.as_deref(), Some("http://u:pw@p:3128"));
        let e = err(&["info"], &[], "storage-bandwidth-limit = \"0\"\n");
        assert!(e.contains("storage-bandwidth-limit"), "{e}");
        // The proxy URL may hold a password: never a flag, never shown.
        let e = err(
            &["info", "--storage-proxy", "http://u:secret@p:3128"],
            &[],
            "",
        );
        assert!(!e.contains("secret"), "{e}");
        let env = [("PGVAULT_STORAGE_PROXY", "ftp://u:secret@p")];
        let p = ok(&["info"], &env, "repo = \"s3://b/x\"\n");
        let e = p.cli.global.repos().unwrap()[0].s3.options().unwrap_err();
        assert!(!format!("{e:#}").contains("secret"), "{e:#}");
        assert!(format!("{e:#}").contains("storage-proxy"), "{e:#}");
    }

    /// `repo` is repository 1 as it always was; `repo2-path` and its
    /// numbered options add repository 2, from the file, the environment
    /// or flags; `--repo N` selects one.
    #[test]
    fn numbered_repositories() {
        let file =
            "repo = \"/one\"\nrepo2-path = \"s3://b/two\"\nrepo2-s3-endpoint = \"http://e\"\n\
                    repo2-s3-atomic-create = false\nrepo2-s3-secret-access-key = \"k2\"\n\
                    s3-region = \"r1\"\n";
        let p = ok(&["info"], &[], file);
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        assert_eq!(
            configured(&p),
            [(1, "file:///one".into()), (2, "s3://b/two".into())]
        );
        let repos = p.cli.global.repos().unwrap();
        assert_eq!(repos[0].s3.s3_region.as_deref(), Some("r1"));
        assert!(repos[0].s3.s3_atomic_create);
        let two = &repos[1].s3;
        assert_eq!(two.s3_endpoint.as_deref(), Some("http://e"));
        assert_eq!(two.s3_region, None, "repository 1's settings are its own");
        assert!(!two.s3_atomic_create);
        assert_eq!(
            two.s3_secret_access_key.as_ref().map(|s| s.expose()),
            Some("k2")
        );
        // The environment and flags, as for any option.
        let env = [("PGVAULT_REPO3_PATH", "/three")];
        let p = ok(&["info", "--repo2-path", "/two"], &env, "repo = \"/one\"\n");
        assert_eq!(
            configured(&p),
            [
                (1, "file:///one".into()),
                (2, "file:///two".into()),
                (3, "file:///three".into())
            ]
        );
        // --repo N selects; a flag replaces repo of the file, so repository
        // 1 is then named repo1-path there.
        let file = "repo1-path = \"/one\"\nrepo2-path = \"/two\"\n";
        let p = ok(&["info", "--repo", "2"], &[], file);
        assert_eq!(configured(&p), [(2, "file:///two".into())]);
        let p = ok(&["--repo", "1", "info"], &[], file);
        assert_eq!(configured(&p), [(1, "file:///one".into())]);
        let p = ok(&["info", "--repo", "2"], &[], "repo = \"/one\"\n");
        let e = p.cli.global.repos().unwrap_err();
        assert!(
            e.to_string().contains("repository 2 is not configured"),
            "{e}"
        );
        let p = ok(
            &["info", "--repo", "1"],
            &[],
            "repo = \"/one\"\nrepo2-path = \"/t\"\n",
        );
        let e = p.cli.global.repos().unwrap_err();
        assert!(e.hint_text().unwrap().contains("repo1-path"), "{e:?}");
        // One place under two names is fine; two places are not.
        let p = ok(&["info"], &[], "repo = \"/one\"\nrepo1-path = \"/one\"\n");
        assert_eq!(configured(&p), [(1, "file:///one".into())]);
        let p = ok(&["info"], &[], "repo = \"/one\"\nrepo1-path = \"/uno\"\n");
        let e = p.cli.global.repos().unwrap_err();
        assert!(e.to_string().contains("two different places"), "{e}");
        // Options without a path, and bad values, are named.
        let p = ok(&["info"], &[], "repo = \"/one\"\nrepo2-s3-region = \"x\"\n");
        let e = p.cli.global.repos().unwrap_err();
        assert!(e.to_string().contains("no repo2-path"), "{e}");
        let e = err(&["info"], &[], "repo2-path = \"ftp://x\"\n");
        assert!(e.contains("repo2-path"), "{e}");
        let e = err(&["info"], &[], "repo5-path = \"/x\"\n");
        assert!(e.contains("unknown option repo5-path"), "{e}");
        let e = err(&["info", "--repo2-s3-secret-access-key", "k"], &[], "");
        assert!(e.contains("is not accepted on the command line"), "{e}");
        let e = err(&["info", "--repo", "7"], &[], "");
        assert!(e.contains("numbered 1 to 4"), "{e}");
        // Today's single repository, unchanged.
        let p = ok(&["info", "--repo", "/r"], &[], "");
        assert_eq!(configured(&p), [(1, "file:///r".into())]);
        assert_eq!(p.cli.global.selected(), None);
    }

    #[test]
    fn quorum_and_queue_max() {
        let push = |file: &str| match ok(&["archive-push", "p"], &[], file).cli.command {
            Command::ArchivePush { options, .. } => options,
            _ => unreachable!(),
        };
        let o = push("archive-push-quorum = 1\narchive-push-queue-max = \"64MiB\"\n");
        assert_eq!(o.archive_push_quorum, Some(1));
        assert_eq!(o.archive_push_queue_max, Some(64 << 20));
        let o = push("");
        assert_eq!(
            (o.archive_push_quorum, o.archive_push_queue_max),
            (None, None)
        );
        let e = err(&["archive-push", "p"], &[], "archive-push-quorum = 0\n");
        assert!(e.contains("archive-push-quorum"), "{e}");
        let e = err(
            &["archive-push", "p"],
            &[],
            "archive-push-queue-max = \"lots\"\n",
        );
        assert!(e.contains("archive-push-queue-max"), "{e}");
    }

    #[test]
    fn restore_takes_what_patroni_passes() {
        // create_replica_methods: the command, then these four.
        let p = ok(
            &[
                "restore",
                "--scope=pgv",
                "--role=replica",
                "--datadir=/var/lib/pg/data",
                "--connstring=dbname=postgres user=replicator host=10.0.0.1 port=5432",
                // A method's own keys, which Patroni passes along too.
                "--keep_data=True",
                "--no_leader=True",
            ],
            &[],
            "pgdata = \"/elsewhere\"\n",
        );
        let Command::Restore(a) = p.cli.command else {
            panic!("not restore: {:?}", p.cli.command)
        };
        assert_eq!(
            a.datadir.as_deref(),
            Some(std::path::Path::new("/var/lib/pg/data"))
        );
        assert_eq!(a.role.as_deref(), Some("replica"));
        assert_eq!(a.scope.as_deref(), Some("pgv"));
        // A bootstrap method: --scope and --datadir only.
        ok(&["restore", "--scope=pgv", "--datadir=/d"], &[], "");
        assert!(err(&["restore", "--role=witness"], &[], "").contains("witness"));
    }

    #[test]
    fn secrets_come_from_the_file_or_the_environment_only() {
        let key = |p: &Parsed| {
            p.cli
                .global
                .s3
                .s3_secret_access_key
                .as_ref()
                .map(|s| s.expose().to_string())
        };
        let file = "s3-secret-access-key = \"from-file\"\n";
        assert_eq!(key(&ok(&["info"], &[], file)).as_deref(), Some("from-file"));
        let env = [("PGVAULT_S3_SECRET_ACCESS_KEY", "from-env")];
        assert_eq!(key(&ok(&["info"], &env, file)).as_deref(), Some("from-env"));
        let e = err(&["info", "--s3-secret-access-key", "hunter2"], &[], "");
        assert!(e.contains("--s3-secret-access-key is not accepted"), "{e}");
        assert!(e.contains("PGVAULT_S3_SECRET_ACCESS_KEY"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let e = err(&["--s3-access-key-id=AKIA", "info"], &[], "");
        assert!(e.contains("--s3-access-key-id is not accepted"), "{e}");
    }

    #[test]
    fn a_misspelled_variable_is_named_with_the_closest_option() {
        let p = ok(
            &["info"],
            &[
                ("PGVAULT_COMPRES_LEVEL", "5"),
                ("PGVAULT_INTERNAL_PREFETCH", "1"),
                ("PGVAULT_REPO", "/r"),
                ("PGVAULT_ZZZ", "1"),
            ],
            "",
        );
        assert_eq!(p.warnings.len(), 2, "{:?}", p.warnings);
        assert!(
            p.warnings[0].contains("PGVAULT_COMPRES_LEVEL")
                && p.warnings[0].contains("did you mean PGVAULT_COMPRESS_LEVEL?"),
            "{:?}",
            p.warnings
        );
        assert!(p.warnings[1].contains("PGVAULT_ZZZ"), "{:?}", p.warnings);
    }

    #[test]
    fn a_bad_value_names_its_key_or_variable() {
        let e = err(&["backup"], &[], "pg-port = \"port\"\n");
        assert!(
            e.contains("pgvault.toml: pg-port = \"port\": invalid digit"),
            "{e}"
        );
        let e = err(&["info"], &[], "pg-port = 70000\n");
        assert!(
            e.contains("pg-port = 70000: 70000 is not in 0..=65535"),
            "{e}"
        );
        let e = err(&["info"], &[], "compress-level = true\n");
        assert!(e.contains("compress-level = true: invalid digit"), "{e}");
        let e = err(&["info"], &[], "process-max = [1, 2]\n");
        assert!(e.contains("process-max: expected one value"), "{e}");
        let e = err(&["info"], &[("PGVAULT_RETENTION_WINDOW", "3y")], "");
        assert!(
            e.contains("environment variable PGVAULT_RETENTION_WINDOW=3y: the unit must be"),
            "{e}"
        );
        let e = err(&["info"], &[], "log-level = \"loud\"\n");
        assert!(
            e.contains("log-level = \"loud\": expected one of off"),
            "{e}"
        );
        // A number as a string is read as any value is: as text.
        let p = ok(&["backup"], &[], "pg-port = \"55601\"\n");
        match p.cli.command {
            Command::Backup { options, .. } => assert_eq!(options.connection.pg_port, Some(55601)),
            _ => unreachable!(),
        }
    }

    #[test]
    fn unknown_keys_are_errors_that_name_the_key() {
        let e = err(&["info"], &[], "repo = \"/x\"\ncompres-level = 3\n");
        assert!(
            e.contains("pgvault.toml: unknown option compres-level"),
            "{e}"
        );
        assert!(e.contains("did you mean compress-level?"), "{e}");
        let e = err(&["info"], &[], "start-fast = true\n");
        assert!(
            e.contains("--start-fast is a flag of the command line only"),
            "{e}"
        );
        let e = err(&["info"], &[], "config = \"/etc/other.toml\"\n");
        assert!(e.contains("unknown option config"), "{e}");
    }

    #[test]
    fn one_file_serves_every_command() {
        let file = "repo = \"/r\"\nstanza = \"s\"\npgdata = \"/d\"\npg-port = 5433\n\
                    compress-level = 5\nretention-full = 2\nretention-window = \"14d\"\n\
                    expire-auto = true\narchive-push-ahead = 4\narchive-get-ahead = 0\n\
                    spool-path = \"/s\"\ncatalog = \"off\"\nprocess-max = 4\n\
                    archive-timeout = 60\nprimary-conninfo = \"host=p\"\n\
                    s3-secret-access-key = \"k\"\n";
        for args in [
            &["archive-get", "000000010000000000000001", "p"][..],
            &["archive-push", "p"],
            &["info"],
            &["stanza-create"],
            &["restore"],
            &["backup"],
        ] {
            let p = ok(args, &[], file);
            assert!(p.warnings.is_empty(), "{args:?}: {:?}", p.warnings);
        }
    }

    #[test]
    fn a_flag_the_command_does_not_use_is_ignored_with_a_warning() {
        for args in [
            &["--retention-full", "2", "archive-get", "x", "y"][..],
            &["archive-get", "--retention-full", "2", "x", "y"],
        ] {
            let p = ok(args, &[], "");
            assert_eq!(
                p.warnings,
                ["--retention-full is not an option of archive-get; ignored"],
                "{args:?}"
            );
        }
        // Used by the command: no warning, wherever it stands.
        let p = ok(
            &["--archive-get-ahead", "0", "archive-get", "x", "y"],
            &[],
            "",
        );
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        match p.cli.command {
            Command::ArchiveGet { options, .. } => assert_eq!(options.archive_get_ahead, 0),
            _ => unreachable!(),
        }
    }

    #[test]
    fn expire_auto_needs_a_retention() {
        let backup = |file: &str| match ok(&["backup"], &[], file).cli.command {
            Command::Backup { options, .. } => options,
            _ => unreachable!(),
        };
        let e = backup("expire-auto = true\n").expire_after(1).unwrap_err();
        assert!(e.to_string().contains("expire-auto"), "{e}");
        assert!(e.hint_text().unwrap().contains("retention-full"), "{e:?}");
        let o = backup("expire-auto = true\nretention-full = 2\n");
        assert_eq!(o.expire_after(1).unwrap().unwrap().retention_full, Some(2));
        assert!(backup("").expire_after(1).unwrap().is_none());
        // Each repository its own: repository 2 has none here.
        let e = o.expire_after(2).unwrap_err();
        assert!(
            e.to_string().contains("repository 2 has no retention"),
            "{e}"
        );
        assert!(
            e.hint_text().unwrap().contains("repo2-retention-full"),
            "{e:?}"
        );
        let o = backup("expire-auto = true\nrepo2-retention-window = \"7d\"\n");
        let r2 = o.expire_after(2).unwrap().unwrap();
        assert_eq!(
            r2.retention_window,
            Some(std::time::Duration::from_secs(7 * 86400))
        );
        assert_eq!(r2.retention_full, None);
        assert!(o.expire_after(1).is_err(), "repository 1's is its own");
        // retention-diff is a retention too, per repository.
        let o = backup("expire-auto = true\nrepo2-retention-diff = 3\nretention-diff = 1\n");
        assert_eq!(o.expire_after(2).unwrap().unwrap().retention_diff, Some(3));
        assert_eq!(o.expire_after(1).unwrap().unwrap().retention_diff, Some(1));
    }
}
