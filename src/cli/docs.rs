//! Shell completions and man pages, generated from the clap definitions
//! (the hidden `completions` and `man` commands), so that what a package
//! ships can never disagree with `--help`. `scripts/package.sh` runs them.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

use super::args::Cli;

/// The completion script for `shell`, on stdout.
pub fn completions(shell: clap_complete::Shell) -> Result<i32> {
    let mut cmd = Cli::definition();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "pgvault", &mut out);
    std::io::stdout()
        .lock()
        .write_all(&out)
        .map_err(|e| Error::internal(format!("write the {shell} completions to stdout: {e}")))?;
    Ok(0)
}

/// `pgvault.1` and one `pgvault-COMMAND.1` per visible command, into `dir`
/// (created when missing). Returns the files written.
pub fn man_pages(dir: &Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::usage(format!("create {}: {e}", dir.display())))?;
    // Built, so that the global options (--repo, --stanza, …) appear on
    // every command's page as they do in its --help.
    let mut root = Cli::definition();
    root.build();
    let mut pages = vec![("pgvault".to_string(), root.clone())];
    // clap's own `help` command has no page of its own: `pgvault.1` is it.
    let visible = root
        .get_subcommands()
        .filter(|sc| !sc.is_hide_set() && sc.get_name() != "help");
    for sc in visible {
        let name = format!("pgvault-{}", sc.get_name());
        pages.push((name.clone(), sc.clone().name(name)));
    }
    let mut written = Vec::new();
    for (name, cmd) in pages {
        let path = dir.join(format!("{name}.1"));
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd)
            .render(&mut buf)
            .map_err(|e| Error::internal(format!("render the man page {name}.1: {e}")))?;
        std::fs::write(&path, &buf)
            .map_err(|e| Error::usage(format!("write {}: {e}", path.display())))?;
        written.push(path.display().to_string());
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_per_visible_command_and_none_for_maintenance() {
        let d = tempfile::tempdir().expect("tempdir");
        let written = man_pages(d.path()).expect("man pages");
        let names: Vec<String> = written
            .iter()
            .map(|w| {
                Path::new(w)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        for want in [
            "pgvault.1",
            "pgvault-backup.1",
            "pgvault-drill.1",
            "pgvault-exporter.1",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
        for not in ["pgvault-man.1", "pgvault-completions.1", "pgvault-help.1"] {
            assert!(!names.iter().any(|n| n == not), "{not} written: {names:?}");
        }
        let drill = std::fs::read_to_string(d.path().join("pgvault-drill.1")).expect("read");
        // The command's own options and the global ones.
        assert!(drill.contains("rto\\-objective"), "{drill}");
        assert!(drill.contains("stanza"), "{drill}");
    }
}
