//! The runbook document: its marked blocks, and running them as written.
//!
//! A block is marked ` ```sh runbook=N step=S [layout=debian|self-contained]
//! user=root|postgres `; the one marked `runbook=settings` holds the shell
//! variables every block uses, and runs before each of them with the
//! test's own values set first.

use crate::common::*;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

pub(crate) const DOC: &str = "docs/disaster-recovery.md";
/// How long one block of a runbook may run (it may wait for recovery).
const BLOCK_TIMEOUT: Duration = Duration::from_secs(600);

/// One marked block of commands.
#[derive(Debug, Clone)]
pub(crate) struct Block {
    pub(crate) runbook: String,
    pub(crate) step: String,
    /// `None`: for both layouts.
    pub(crate) layout: Option<String>,
    pub(crate) user: As,
    pub(crate) code: String,
    pub(crate) line: usize,
}

/// The marked blocks of the runbook document and its settings block.
pub(crate) struct Book {
    pub(crate) settings: String,
    pub(crate) blocks: Vec<Block>,
}

impl Book {
    pub(crate) fn load() -> Book {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DOC);
        let text =
            fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        Book::parse(&text)
    }

    /// Blocks whose info string is `sh` followed by `key=value` words with
    /// a `runbook` key.
    fn parse(text: &str) -> Book {
        let mut settings = None;
        let mut blocks = Vec::new();
        let mut lines = text.lines().enumerate();
        while let Some((i, line)) = lines.next() {
            let Some(info) = line.strip_prefix("```sh ") else {
                continue;
            };
            let attrs: BTreeMap<&str, &str> = info
                .split_whitespace()
                .filter_map(|w| w.split_once('='))
                .collect();
            let Some(runbook) = attrs.get("runbook") else {
                continue;
            };
            let mut code = String::new();
            for (_, l) in lines.by_ref() {
                if l.starts_with("```") {
                    break;
                }
                code.push_str(l);
                code.push('\n');
            }
            let at = format!("{DOC}:{}", i + 1);
            if *runbook == "settings" {
                assert!(settings.is_none(), "{at}: a second settings block");
                settings = Some(code);
                continue;
            }
            let user = match attrs.get("user") {
                Some(&"root") => As::Root,
                Some(&"postgres") => As::PgUser,
                other => panic!("{at}: user={other:?}, expected root or postgres"),
            };
            let layout = attrs.get("layout").map(|l| l.to_string());
            assert!(
                layout
                    .as_deref()
                    .is_none_or(|l| l == "debian" || l == "self-contained"),
                "{at}: layout={layout:?}"
            );
            blocks.push(Block {
                runbook: runbook.to_string(),
                step: attrs
                    .get("step")
                    .unwrap_or_else(|| panic!("{at}: no step="))
                    .to_string(),
                layout,
                user,
                code,
                line: i + 1,
            });
        }
        Book {
            settings: settings
                .unwrap_or_else(|| panic!("{DOC} has no ```sh runbook=settings block")),
            blocks,
        }
    }

    /// The variables the settings block takes from the environment
    /// (`NAME=${NAME:-default}`).
    pub(crate) fn settings_vars(&self) -> Vec<String> {
        let mut names = Vec::new();
        for line in self.settings.lines() {
            let line = line.trim_start().trim_start_matches("export ");
            if let Some((name, rest)) = line.split_once('=') {
                if rest.starts_with(&format!("${{{name}:-")) {
                    names.push(name.to_string());
                }
            }
        }
        names
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    Debian,
    SelfContained,
}

impl Layout {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Layout::Debian => "debian",
            Layout::SelfContained => "self-contained",
        }
    }
}

/// Runs the document's blocks for one layout with this test's values.
pub(crate) struct Shell<'a> {
    pub(crate) env: &'a TestEnv,
    pub(crate) book: &'a Book,
    pub(crate) layout: Layout,
    /// The settings block's variables, set before it runs.
    pub(crate) vars: BTreeMap<String, String>,
    /// Environment of every block: PATH with pgvault on it,
    /// postgresql-common's configuration root, the database psql uses.
    pub(crate) environ: Vec<(String, String)>,
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

impl Shell<'_> {
    pub(crate) fn set(&mut self, name: &str, value: impl ToString) {
        self.vars.insert(name.into(), value.to_string());
    }

    /// Runs every block of `runbook`'s `step` for this layout, in document
    /// order; returns their standard output.
    #[track_caller]
    pub(crate) fn run(&self, runbook: &str, step: &str) -> String {
        // Every variable the settings block reads is this test's own:
        // none may fall back to a real path such as /var/lib/postgresql.
        for name in self.book.settings_vars() {
            assert!(
                self.vars.contains_key(&name),
                "the test does not set {name}, which the settings block of {DOC} reads"
            );
        }
        let blocks: Vec<&Block> = self
            .book
            .blocks
            .iter()
            .filter(|b| {
                b.runbook == runbook
                    && b.step == step
                    && b.layout.as_deref().is_none_or(|l| l == self.layout.name())
            })
            .collect();
        assert!(
            !blocks.is_empty(),
            "{DOC} has no block for runbook {runbook}, step {step}, layout {}",
            self.layout.name()
        );
        let mut out = String::new();
        for b in blocks {
            out.push_str(&self.run_block(b));
        }
        out
    }

    #[track_caller]
    fn run_block(&self, b: &Block) -> String {
        let mut script = String::from("set -euo pipefail\n");
        for (k, v) in &self.vars {
            script.push_str(&format!("{k}={}\n", shell_quote(v)));
        }
        script.push_str(&self.book.settings);
        script.push_str("set -x\n");
        script.push_str(&b.code);
        let argv: Vec<OsString> = ["bash", "-c", &script].iter().map(OsString::from).collect();
        let mut environ = self.env.base_env(b.user);
        environ.extend(self.environ.iter().cloned());
        let started = Instant::now();
        let run = finish(
            self.env.spawn(b.user, &argv, &environ, self.env.dir()),
            BLOCK_TIMEOUT,
        );
        eprintln!(
            "[{}] {DOC}:{} runbook {} step {} as {:?}: exit {:?} in {:.1?}",
            self.layout.name(),
            b.line,
            b.runbook,
            b.step,
            b.user,
            run.code,
            started.elapsed()
        );
        assert_eq!(
            run.code,
            Some(0),
            "runbook {} step {} ({DOC}:{}, layout {}, as {:?}) failed:\n{}\n--- stdout\n{}\n--- stderr (bash -x)\n{}",
            b.runbook,
            b.step,
            b.line,
            self.layout.name(),
            b.user,
            b.code,
            run.stdout,
            run.stderr
        );
        run.stdout
    }
}
