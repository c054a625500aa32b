//! Progress for people: on a terminal an indicatif bar per phase (bytes
//! done and total, rate, ETA); otherwise one plain line per phase as it
//! ends (cron mail, the systemd journal); nothing with `--output json`.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use super::render::bytes;
use crate::ops::progress::{NoProgress, Progress};

/// What a command reports on stderr: `quiet` (its `--output json`) gets
/// nothing, so a script reading stdout and stderr sees only the JSON and
/// errors.
pub fn for_stderr(quiet: bool) -> Box<dyn Progress> {
    if quiet {
        Box::new(NoProgress)
    } else if std::io::stderr().is_terminal() && std::env::var_os("NO_PROGRESS").is_none() {
        Box::new(Bar::default())
    } else {
        Box::new(Lines::default())
    }
}

/// One bar per phase: a spinner with the elapsed time until the phase
/// knows its size, then a bar of bytes with rate and ETA.
#[derive(Default)]
struct Bar {
    bar: Mutex<Option<ProgressBar>>,
    files: AtomicU64,
    total_files: AtomicU64,
}

impl Bar {
    fn with<T>(&self, f: impl FnOnce(&ProgressBar) -> T) -> Option<T> {
        self.bar.lock().expect("not poisoned").as_ref().map(f)
    }
    fn end(&self) {
        if let Some(b) = self.bar.lock().expect("not poisoned").take() {
            b.finish_and_clear();
        }
    }
}

impl Progress for Bar {
    fn phase(&self, name: &str) {
        self.end();
        let b = ProgressBar::new_spinner().with_prefix(name.to_string());
        b.set_style(
            ProgressStyle::with_template("{prefix}: {spinner} [{elapsed_precise}] {msg}")
                .expect("the template is valid"),
        );
        b.enable_steady_tick(Duration::from_millis(200));
        self.files.store(0, Ordering::Relaxed);
        self.total_files.store(0, Ordering::Relaxed);
        *self.bar.lock().expect("not poisoned") = Some(b);
    }
    fn set_total(&self, files: u64, total: u64) {
        if self.with(|_| ()).is_none() {
            self.phase("");
        }
        self.total_files.store(files, Ordering::Relaxed);
        self.with(|b| {
            let template = if total > 0 {
                "{prefix}: [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} \
                 {binary_bytes_per_sec} ETA {eta} {msg}"
            } else {
                "{prefix}: {spinner} [{elapsed_precise}] {bytes} {binary_bytes_per_sec} {msg}"
            };
            b.set_style(
                ProgressStyle::with_template(template)
                    .expect("the template is valid")
                    .progress_chars("=> "),
            );
            b.set_length(total);
            b.reset_eta();
        });
    }
    fn file_done(&self, n: u64) {
        let f = self.files.fetch_add(1, Ordering::Relaxed) + 1;
        let of = self.total_files.load(Ordering::Relaxed);
        self.with(|b| {
            b.inc(n);
            b.set_message(format!("files {f}/{of}"));
        });
    }
    fn message(&self, msg: &str) {
        if self.with(|b| b.println(msg)).is_none() {
            eprintln!("{msg}");
        }
    }
    fn finish(&self) {
        self.end();
    }
}

/// The current phase's counts, for its closing line.
#[derive(Default)]
struct PhaseCounts {
    name: String,
    started: Option<Instant>,
    total: u64,
    total_files: u64,
    done: u64,
    files: u64,
}

impl PhaseCounts {
    /// "copy files: 1.2 GiB of 1.2 GiB, 300 of 300 files in 12.3s (100 MiB/s)".
    fn line(&self) -> Option<String> {
        let started = self.started?;
        let secs = started.elapsed().as_secs_f64();
        let name = if self.name.is_empty() {
            "done"
        } else {
            &self.name
        };
        let mut line = format!("pgvault: {name}:");
        if self.done > 0 || self.total > 0 {
            line += &format!(" {}", bytes(self.done));
            if self.total > 0 {
                line += &format!(" of {}", bytes(self.total));
            }
            line += ",";
        }
        if self.files > 0 || self.total_files > 0 {
            line += &format!(" {} of {} files", self.files, self.total_files);
        }
        line += &format!(" in {secs:.1}s");
        if self.done > 0 {
            let rate = (self.done as f64 / secs.max(0.001)) as u64;
            line += &format!(" ({}/s)", bytes(rate));
        }
        Some(line)
    }
}

#[derive(Default)]
struct Lines {
    current: Mutex<PhaseCounts>,
}

impl Lines {
    /// Ends the current phase with its line; starts `next`.
    fn next(&self, next: Option<&str>) {
        let mut c = self.current.lock().expect("not poisoned");
        if let Some(line) = c.line() {
            eprintln!("{line}");
        }
        *c = PhaseCounts::default();
        if let Some(name) = next {
            c.name = name.to_string();
            c.started = Some(Instant::now());
        }
    }
}

impl Progress for Lines {
    fn phase(&self, name: &str) {
        self.next(Some(name));
    }
    fn set_total(&self, files: u64, b: u64) {
        let mut c = self.current.lock().expect("not poisoned");
        c.started.get_or_insert_with(Instant::now);
        c.total = b;
        c.total_files = files;
    }
    fn file_done(&self, n: u64) {
        let mut c = self.current.lock().expect("not poisoned");
        c.done += n;
        c.files += 1;
    }
    fn message(&self, msg: &str) {
        eprintln!("pgvault: {msg}");
    }
    fn finish(&self) {
        self.next(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phase_line_says_what_was_done_how_fast() {
        let c = PhaseCounts {
            name: "copy files".into(),
            started: Instant::now().checked_sub(Duration::from_secs(2)),
            total: 4 << 20,
            total_files: 3,
            done: 4 << 20,
            files: 3,
        };
        let line = c.line().expect("a started phase has a line");
        assert!(
            line.starts_with("pgvault: copy files: 4 MiB of 4 MiB, 3 of 3 files in 2.")
                && line.ends_with(" MiB/s)"),
            "{line}"
        );
        let empty = PhaseCounts {
            name: "checks".into(),
            started: Some(Instant::now()),
            ..PhaseCounts::default()
        };
        assert!(empty
            .line()
            .expect("line")
            .starts_with("pgvault: checks: in 0.0s"));
        assert!(PhaseCounts::default().line().is_none());
    }
}
