//! The Debian package (issue 13): `scripts/package.sh` builds it, it
//! installs on this machine with `dpkg -i`, the installed `pgvault` runs,
//! its man pages and completions are where the shells and `man` look, its
//! systemd units pass `systemd-analyze verify`, and a unit's `ExecStart`
//! command works against a real repository. The package is removed
//! afterwards: the other tests run the binary cargo built, never
//! /usr/bin/pgvault.
//!
//! It packages the debug binary `scripts/test.sh` has just built
//! (`PGV_PACKAGE_PROFILE=dev`): every packaging step, in seconds
//! rather than a release build's minutes (scripts/package.sh says why).

use crate::common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const UNITS: [&str; 8] = [
    "pgvault-backup.service",
    "pgvault-backup.timer",
    "pgvault-expire.service",
    "pgvault-expire.timer",
    "pgvault-verify.service",
    "pgvault-verify.timer",
    "pgvault-drill.service",
    "pgvault-drill.timer",
];

/// Runs `argv` to completion as root.
fn sh(argv: &[&str], env: &[(&str, &str)]) -> Run {
    let argv: Vec<std::ffi::OsString> = argv.iter().map(Into::into).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    finish(
        spawn_as(None, &argv, &env, root),
        std::time::Duration::from_secs(600),
    )
}

/// A tool the test needs: a missing one fails the test (scripts/test.sh
/// installs them); it never passes without having run.
#[track_caller]
fn require(tool: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool} >/dev/null")])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "{tool} is not installed (scripts/test.sh installs it: scripts/lib.sh pgv_ensure_tools)"
    );
}

/// The `ExecStart=` of an installed unit, split into words (the units use
/// no quoting).
fn exec_start(unit: &Path) -> Vec<String> {
    let text = fs::read_to_string(unit).unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap_or_else(|| panic!("{} has no ExecStart:\n{text}", unit.display()));
    line.split_whitespace().map(str::to_string).collect()
}

/// Removes the package when the test ends, passed or not.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "pgvault"]).status();
    }
}

#[test]
fn the_package_installs_and_its_units_verify_and_run() {
    for tool in ["dpkg", "systemd-analyze", "man", "cargo"] {
        require(tool);
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "dpkg -i needs root: run through scripts/test.sh");
    let env = TestEnv::new();

    // Build: the debug binary cargo test was built with.
    let built = sh(
        &["scripts/package.sh"],
        &[
            ("PGV_PACKAGE_PROFILE", "dev"),
            ("PGV_PACKAGE_NO_BUILD", "1"),
        ],
    );
    built.ok();
    let deb = PathBuf::from(
        built
            .stdout
            .lines()
            .last()
            .unwrap_or_else(|| panic!("package.sh printed no path:\n{}", built.stderr))
            .trim(),
    );
    assert!(deb.is_file(), "{} is not a file", deb.display());
    let listing = sh(&["dpkg-deb", "--contents", deb.to_str().unwrap()], &[]);
    listing.ok();
    for want in [
        "./usr/bin/pgvault",
        "./usr/share/man/man1/pgvault.1.gz",
        "./usr/share/man/man1/pgvault-drill.1.gz",
        "./usr/share/bash-completion/completions/pgvault",
        "./usr/share/zsh/vendor-completions/_pgvault",
        "./usr/share/fish/vendor_completions.d/pgvault.fish",
        "./lib/systemd/system/pgvault-drill.timer",
        "./usr/share/doc/pgvault/operations.md",
    ] {
        assert!(
            listing.stdout.lines().any(|l| l.ends_with(want)),
            "the package lacks {want}:\n{}",
            listing.stdout
        );
    }

    // Install into this machine.
    let _installed = Installed;
    sh(&["dpkg", "-i", deb.to_str().unwrap()], &[]).ok();
    let version = sh(&["/usr/bin/pgvault", "--version"], &[]);
    version.ok();
    assert_eq!(
        version.stdout.trim(),
        format!("pgvault {}", env!("CARGO_PKG_VERSION"))
    );
    // man finds the pages where the package put them.
    let page = sh(&["man", "-w", "pgvault-drill"], &[]);
    page.ok();
    assert!(
        page.stdout.contains("/usr/share/man/man1/pgvault-drill.1"),
        "{}",
        page.stdout
    );
    let completion = fs::read_to_string("/usr/share/bash-completion/completions/pgvault").unwrap();
    assert!(
        completion.contains("drill"),
        "bash completion without drill"
    );

    // The units: systemd's own checker (it also runs the ExecStart
    // binary's existence check and man for each Documentation=).
    let units: Vec<String> = UNITS
        .iter()
        .map(|u| format!("/lib/systemd/system/{u}"))
        .collect();
    let mut argv = vec!["systemd-analyze", "verify"];
    argv.extend(units.iter().map(String::as_str));
    let verified = sh(&argv, &[]);
    assert!(
        verified.code == Some(0) && verified.stderr.trim().is_empty(),
        "systemd-analyze verify: exit {:?}\n{}",
        verified.code,
        verified.stderr
    );

    // A unit's command, as systemd would run it: the options from the
    // environment (its EnvironmentFile=), the unit's user (here the test's
    // unprivileged one), against a stanza with a cluster registered.
    let pg = Cluster::init(&env, InitOpts::default());
    let repo = env.local_repo("main");
    repo.stanza_create(&env, pg.pgdata());
    let cmd = exec_start(Path::new("/lib/systemd/system/pgvault-verify.service"));
    assert_eq!(cmd[0], "/usr/bin/pgvault", "{cmd:?}");
    let argv: Vec<std::ffi::OsString> = cmd.iter().map(Into::into).collect();
    let mut vars = env.base_env(As::PgUser);
    vars.push(("PGVAULT_REPO".into(), repo.url.clone()));
    vars.push(("PGVAULT_STANZA".into(), repo.stanza.clone()));
    let ran = finish(
        env.spawn(As::PgUser, &argv, &vars, env.dir()),
        std::time::Duration::from_secs(120),
    );
    ran.ok();
}
