//! Several repositories, numbered as pgBackRest numbers them.
//!
//! Repository N's options are the options of one repository with `repoN-`
//! in front: `repo2-path`, `repo2-s3-endpoint`, `repo2-retention-full`
//! (`PGVAULT_REPO2_PATH`, …). They are not written again: [`PerRepo`]
//! makes them from the fields of a template struct (their type, check and
//! help text), once per number up to [`REPO_MAX`].
//!
//! Repository 1 is the one pgvault always had: `repo`, `s3-endpoint`,
//! `retention-full`, … are its options, and `repo1-path`, `repo1-s3-…` are
//! the same options by their numbered names (a numbered value wins; `repo`
//! and `repo1-path` naming two different places is refused). `--repo`
//! also takes a number: `--repo 2` makes a command act on repository 2
//! only, where without it every command acts on every repository (a
//! directory named by a bare number is written `./2`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use clap::{Arg, ArgMatches, Args, Command, FromArgMatches};

use crate::error::{Error, Result};
use crate::repo::RepoLocation;

/// The highest repository number.
pub const REPO_MAX: u8 = 4;

/// What `--repo` says: where repository 1 is, or which repository to act
/// on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoArg {
    Location(RepoLocation),
    Number(u8),
}

impl RepoArg {
    pub fn parse(s: &str) -> Result<RepoArg> {
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return match s.parse::<u8>() {
                Ok(n) if (1..=REPO_MAX).contains(&n) => Ok(RepoArg::Number(n)),
                _ => Err(Error::usage(format!(
                    "repository number {s}: repositories are numbered 1 to {REPO_MAX}"
                ))
                .hint(format!("a directory named {s} is written ./{s}"))),
            };
        }
        RepoLocation::parse(s).map(RepoArg::Location)
    }

    pub fn location(&self) -> Option<&RepoLocation> {
        match self {
            RepoArg::Location(l) => Some(l),
            RepoArg::Number(_) => None,
        }
    }
}

/// The fields of `T`, once per repository number: `T`'s field `--x` is
/// `--repoN-x` (environment `PGVAULT_REPON_X`, file key `repoN-x`), for N
/// from 1 to [`REPO_MAX`], with `T`'s type, check and help text. Numbered
/// options are hidden from `--help` (which names them once, in `--repo`'s
/// text); docs/configuration.md lists them.
#[derive(Debug, Clone, Default)]
pub struct PerRepo<T> {
    numbered: BTreeMap<u8, Numbered<T>>,
}

/// Repository N's values of `T`, and which were given.
#[derive(Debug, Clone)]
pub struct Numbered<T> {
    pub value: T,
    /// Ids of `T`'s fields that were given (a flag, a variable, the file).
    set: BTreeSet<String>,
}

impl<T> Numbered<T> {
    /// Whether field `id` (its Rust name, as clap's id) was given.
    pub fn is_set(&self, id: &str) -> bool {
        self.set.contains(id)
    }
}

impl<T> PerRepo<T> {
    /// Repository `n`'s values, when any was given.
    pub fn get(&self, n: u8) -> Option<&Numbered<T>> {
        self.numbered.get(&n)
    }

    /// The numbers with any value given, in order.
    pub fn numbers(&self) -> impl Iterator<Item = u8> + '_ {
        self.numbered.keys().copied()
    }
}

/// `repoN-<long>`.
pub fn numbered_long(n: u8, long: &str) -> String {
    format!("repo{n}-{long}")
}

fn template<T: Args>() -> Command {
    T::augment_args(Command::new("template"))
}

fn long_of(a: &Arg) -> &str {
    a.get_long().unwrap_or_else(|| a.get_id().as_str())
}

/// Repository `n`'s copy of the template argument `a`.
fn numbered_arg(a: &Arg, n: u8) -> Arg {
    let long = numbered_long(n, long_of(a));
    let env = format!("PGVAULT_{}", long.to_ascii_uppercase().replace('-', "_"));
    let help = a
        .get_help()
        .map(|h| format!("Repository {n}: {h}"))
        .unwrap_or_else(|| format!("Repository {n}"));
    a.clone()
        .id(long.clone())
        .long(long)
        .env(env)
        .help(help)
        .hide(true)
        .default_value(None::<&str>)
}

impl<T: Args> Args for PerRepo<T> {
    fn augment_args(cmd: Command) -> Command {
        let t = template::<T>();
        let mut cmd = cmd;
        for n in 1..=REPO_MAX {
            for a in t.get_arguments() {
                cmd = cmd.arg(numbered_arg(a, n));
            }
        }
        cmd
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl<T: Args + FromArgMatches> FromArgMatches for PerRepo<T> {
    /// Repository N's values are parsed again as `T`'s own flags, so that
    /// `T` builds itself (its defaults for what was not given) exactly as
    /// it does for repository 1.
    fn from_arg_matches(m: &ArgMatches) -> std::result::Result<Self, clap::Error> {
        let t = template::<T>();
        let mut numbered = BTreeMap::new();
        for n in 1..=REPO_MAX {
            let mut argv: Vec<String> = Vec::new();
            let mut set = BTreeSet::new();
            for a in t.get_arguments() {
                let id = numbered_long(n, long_of(a));
                let Ok(Some(raw)) = m.try_get_raw(&id) else {
                    continue;
                };
                for v in raw {
                    let v = v.to_str().ok_or_else(|| {
                        clap::Error::raw(
                            clap::error::ErrorKind::InvalidUtf8,
                            format!("--{id}: not valid UTF-8\n"),
                        )
                    })?;
                    argv.push(format!("--{}={v}", long_of(a)));
                }
                set.insert(a.get_id().to_string());
            }
            if set.is_empty() {
                continue;
            }
            let sub = template::<T>()
                .no_binary_name(true)
                .mut_args(|a| a.env(None::<&str>).global(false));
            let matches = sub.try_get_matches_from(argv)?;
            numbered.insert(
                n,
                Numbered {
                    value: T::from_arg_matches(&matches)?,
                    set,
                },
            );
        }
        Ok(PerRepo { numbered })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> std::result::Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

/// With a catalog file named for repository 1, repository N's: the same
/// name with `.repoN` before its extension (the catalog caches one
/// repository; two must not share a file).
pub fn catalog_path_for(p: &std::path::Path, n: u8) -> PathBuf {
    if n == 1 {
        return p.to_path_buf();
    }
    let stem = p
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = match p.extension() {
        Some(ext) => format!("{stem}.repo{n}.{}", ext.to_string_lossy()),
        None => format!("{stem}.repo{n}"),
    };
    p.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_numbers_and_locations() {
        assert_eq!(RepoArg::parse("2").unwrap(), RepoArg::Number(2));
        assert!(matches!(
            RepoArg::parse("/var/lib/pgvault").unwrap(),
            RepoArg::Location(_)
        ));
        assert!(matches!(
            RepoArg::parse("./2").unwrap(),
            RepoArg::Location(_)
        ));
        let e = RepoArg::parse("9").unwrap_err();
        assert!(e.to_string().contains("numbered 1 to 4"), "{e}");
        assert!(e.hint_text().unwrap().contains("./9"), "{e:?}");
        assert!(RepoArg::parse("0").is_err());
    }

    #[test]
    fn catalog_files_per_repository() {
        let p = std::path::Path::new("/x/cat.db");
        assert_eq!(catalog_path_for(p, 1), p);
        assert_eq!(
            catalog_path_for(p, 2),
            std::path::Path::new("/x/cat.repo2.db")
        );
        assert_eq!(
            catalog_path_for(std::path::Path::new("/x/cat"), 3),
            std::path::Path::new("/x/cat.repo3")
        );
    }
}
