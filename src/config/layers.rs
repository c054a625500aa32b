//! The file and the environment, layered under the flags.
//!
//! clap parses the flags. The values of the file and of the environment
//! (the environment's over the file's) become the options' defaults, so that
//! clap's own rule — a flag beats a default — is the precedence, and clap's
//! value parsers type and check every value wherever it came from. Before
//! that, each file key and each `PGVAULT_*` variable is checked here so
//! that a bad one is named: an unknown key is an error (a typo must not fall
//! back to a default silently), an unknown variable a warning (a stray
//! variable must not stop archiving), and a bad value an error naming the
//! key or the variable.
//!
//! Options of a command are also accepted before its name (`pgvault
//! --process-max 4 backup`), as they always were in `archive_command`s: each
//! is also a hidden global option of `pgvault` itself. A flag a command
//! does not use is then ignored with a warning; the file and the
//! environment may set any option for every command, since one file serves
//! them all.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::error::{ContextKind, ContextValue};
use clap::parser::ValueSource;
use clap::{Arg, ArgMatches, Command};

use super::{Secret, DEFAULT_CONFIG};
use crate::error::Error;

/// The command line with every layer applied.
#[derive(Debug)]
pub struct Parsed {
    pub matches: ArgMatches,
    /// The configuration file that was read, if any.
    pub config_file: Option<PathBuf>,
    /// For the log, once it is set up.
    pub warnings: Vec<String>,
}

#[derive(Debug)]
pub enum ParseError {
    /// `--help`, `--version`, or flags clap refused: clap renders these.
    Clap(clap::Error),
    /// A bad file, variable or option value.
    Config(Error),
}

impl From<Error> for ParseError {
    fn from(e: Error) -> Self {
        ParseError::Config(e)
    }
}

const ENV_PREFIX: &str = "PGVAULT_";
/// Variables that are not options: pgvault's own, for the helpers it
/// starts, and the test harness's (the fault injector's among them, see
/// `repo/fault.rs`).
const NOT_OPTIONS: &[&str] = &[
    "PGVAULT_INTERNAL_",
    "PGVAULT_TEST_",
    crate::repo::fault::VARIABLE,
];

/// An option: an argument with an environment variable, by long name.
struct Opt {
    arg: Arg,
    env: String,
}

/// Parses `argv` (program name first) against `cmd`, with the file and
/// `env` (the process environment) under the flags.
pub fn parse(
    cmd: Command,
    argv: &[OsString],
    env: &[(OsString, OsString)],
) -> Result<Parsed, ParseError> {
    let opts = options(&cmd);
    let flag_only: BTreeSet<String> = all_args(&cmd)
        .filter_map(|a| a.get_long().map(str::to_string))
        .filter(|l| !opts.contains_key(l))
        .collect();
    let own: BTreeMap<String, BTreeSet<String>> = cmd
        .get_subcommands()
        .map(|sc| {
            let ids = sc.get_arguments().map(|a| a.get_id().to_string());
            (sc.get_name().to_string(), ids.collect())
        })
        .collect();
    let on_root: BTreeSet<String> = cmd
        .get_arguments()
        .map(|a| a.get_id().to_string())
        .collect();
    let cmd = accept_before_command(cmd, &opts);

    let flags = cmd
        .clone()
        .try_get_matches_from(argv)
        .map_err(ParseError::Clap)?;
    refuse_secret_flags(&flags, &opts)?;

    let mut warnings = Vec::new();
    let from_env = read_env(&opts, env, &mut warnings)?;
    let config_file = match flags.get_one::<PathBuf>("config") {
        Some(p) => Some(p.clone()),
        None => match from_env.get("config") {
            Some(p) => Some(PathBuf::from(p)),
            None => Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.exists()),
        },
    };
    let mut values = match &config_file {
        Some(p) => read_file(&opts, &flag_only, p)?,
        None => BTreeMap::new(),
    };
    values.extend(from_env);

    let matches = with_defaults(cmd, &values)
        .try_get_matches_from(argv)
        .map_err(ParseError::Clap)?;
    if let Some((name, sub)) = matches.subcommand() {
        for o in opts.values() {
            let id = o.arg.get_id().as_str();
            let used = on_root.contains(id) || own.get(name).is_some_and(|ids| ids.contains(id));
            if !used && sub.value_source(id) == Some(ValueSource::CommandLine) {
                warnings.push(format!(
                    "--{} is not an option of {name}; ignored",
                    long(&o.arg)
                ));
            }
        }
    }
    Ok(Parsed {
        matches,
        config_file,
        warnings,
    })
}

/// Every argument of `cmd` and of its subcommands.
fn all_args(cmd: &Command) -> impl Iterator<Item = &Arg> {
    cmd.get_arguments()
        .chain(cmd.get_subcommands().flat_map(|sc| sc.get_arguments()))
}

fn long(arg: &Arg) -> &str {
    arg.get_long().unwrap_or_else(|| arg.get_id().as_str())
}

/// The options of `cmd`: its arguments that have an environment variable.
fn options(cmd: &Command) -> BTreeMap<String, Opt> {
    let mut out = BTreeMap::new();
    for arg in all_args(cmd) {
        if let (Some(l), Some(env)) = (arg.get_long(), arg.get_env()) {
            out.entry(l.to_string()).or_insert_with(|| Opt {
                arg: arg.clone(),
                env: env.to_string_lossy().into_owned(),
            });
        }
    }
    out
}

/// A value of type [`Secret`].
pub fn is_secret(arg: &Arg) -> bool {
    arg.get_value_parser().type_id() == std::any::TypeId::of::<Secret>()
}

/// Every option also as a hidden global option of `pgvault` itself (where
/// it is not one already), and no argument reading the environment on its
/// own: [`read_env`] does, so that a bad value is named.
fn accept_before_command(cmd: Command, opts: &BTreeMap<String, Opt>) -> Command {
    let mut cmd = cmd;
    for o in opts.values() {
        if cmd.get_arguments().all(|a| a.get_id() != o.arg.get_id()) {
            cmd = cmd.arg(
                o.arg
                    .clone()
                    .global(true)
                    .hide(true)
                    .default_value(None::<&str>),
            );
        }
    }
    let no_env = |a: Arg| a.env(None::<&str>);
    cmd.mut_args(no_env)
        .mut_subcommands(move |sc| sc.mut_args(no_env))
}

/// `values` (by long name) as the defaults of the options they name.
fn with_defaults(cmd: Command, values: &BTreeMap<String, String>) -> Command {
    let set = |a: Arg| match a.get_long().and_then(|l| values.get(l)) {
        Some(v) => a.default_value(v.clone()),
        None => a,
    };
    cmd.mut_args(set).mut_subcommands(|sc| sc.mut_args(set))
}

/// A secret given as a flag is refused: flags show in `ps`.
fn refuse_secret_flags(m: &ArgMatches, opts: &BTreeMap<String, Opt>) -> Result<(), Error> {
    for o in opts.values() {
        let id = o.arg.get_id().as_str();
        if is_secret(&o.arg) && m.value_source(id) == Some(ValueSource::CommandLine) {
            let name = long(&o.arg);
            return Err(Error::usage(format!(
                "--{name} is not accepted on the command line: command lines show in `ps`"
            ))
            .hint(format!(
                "put {name} in the configuration file (readable only by its user) or set {}",
                o.env
            )));
        }
    }
    match m.subcommand() {
        Some((_, sub)) => refuse_secret_flags(sub, opts),
        None => Ok(()),
    }
}

/// The `PGVAULT_*` variables that name options, by long name; a warning
/// for each that names none.
fn read_env(
    opts: &BTreeMap<String, Opt>,
    env: &[(OsString, OsString)],
    warnings: &mut Vec<String>,
) -> Result<BTreeMap<String, String>, Error> {
    let mut out = BTreeMap::new();
    for (name, value) in env {
        let name = name.to_string_lossy();
        if !name.starts_with(ENV_PREFIX) || NOT_OPTIONS.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let Some((l, o)) = opts.iter().find(|(_, o)| o.env == name) else {
            let mut w = format!("environment variable {name} is not a pgvault option; ignored");
            let key = name[ENV_PREFIX.len()..]
                .to_ascii_lowercase()
                .replace('_', "-");
            if let Some(c) = closest(&key, opts.keys().map(String::as_str)) {
                w.push_str(&format!(" (did you mean {}?)", opts[c].env));
            }
            warnings.push(w);
            continue;
        };
        let Some(value) = value.to_str() else {
            return Err(Error::usage(format!(
                "environment variable {name} is not valid UTF-8"
            )));
        };
        // clap's own rule for the environment: empty is unset.
        if value.is_empty() {
            continue;
        }
        check(&o.arg, value).map_err(|cause| {
            Error::usage(format!(
                "environment variable {name}{}: {cause}",
                shown(&o.arg, &format!("={value}"))
            ))
        })?;
        out.insert(l.clone(), value.to_string());
    }
    Ok(out)
}

/// The options the file sets, by long name. Every key must be an option;
/// any of them may be set, whichever command reads the file.
fn read_file(
    opts: &BTreeMap<String, Opt>,
    flag_only: &BTreeSet<String>,
    path: &Path,
) -> Result<BTreeMap<String, String>, Error> {
    let here = |msg: String| Error::usage(format!("configuration file {}: {msg}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| here(e.to_string()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        let line = e
            .span()
            .map(|s| format!("line {}: ", text[..s.start].lines().count().max(1)))
            .unwrap_or_default();
        here(format!("{line}{}", e.message()))
    })?;
    let mut out = BTreeMap::new();
    for (key, value) in &table {
        let Some(o) = opts.get(key).filter(|_| key != "config") else {
            let e = here(format!("unknown option {key}"));
            return Err(if key == "config" {
                e.hint("a configuration file cannot name another one")
            } else if flag_only.contains(key) {
                e.hint(format!(
                    "--{key} is a flag of the command line only, not an option"
                ))
            } else if let Some(c) = closest(key, opts.keys().map(String::as_str)) {
                e.hint(format!("did you mean {c}?"))
            } else {
                e.hint("docs/configuration.md lists the options")
            });
        };
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Array(_) => {
                return Err(here(format!("{key}: expected one value, not a list")))
            }
            toml::Value::Table(_) | toml::Value::Datetime(_) => {
                return Err(here(format!(
                    "{key}: expected a string, a number or true/false, not a {}",
                    value.type_str()
                )))
            }
        };
        check(&o.arg, &text).map_err(|cause| {
            here(format!(
                "{key}{}: {cause}",
                shown(&o.arg, &format!(" = {value}"))
            ))
        })?;
        out.insert(key.clone(), text);
    }
    Ok(out)
}

/// `text`, unless the option is a secret.
fn shown(arg: &Arg, text: &str) -> String {
    if is_secret(arg) {
        String::new()
    } else {
        text.to_string()
    }
}

/// Whether `value` is one the option takes (its value parser's verdict),
/// else why not.
fn check(arg: &Arg, value: &str) -> Result<(), String> {
    let one = Command::new("pgvault")
        .no_binary_name(true)
        .disable_help_flag(true)
        .arg(arg.clone().global(false).env(None::<&str>));
    match one.try_get_matches_from([format!("--{}={value}", long(arg))]) {
        Ok(_) => Ok(()),
        Err(e) => Err(cause(&e)),
    }
}

/// The reason in a clap error about a value, without clap's framing.
fn cause(e: &clap::Error) -> String {
    if let Some(src) = std::error::Error::source(e) {
        return src.to_string();
    }
    if let Some(ContextValue::Strings(valid)) = e.get(ContextKind::ValidValue) {
        return format!("expected one of {}", valid.join(", "));
    }
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

/// The candidate most like `word`, if any is alike enough to be a typo of it.
fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|c| (strsim::jaro_winkler(word, c), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}
