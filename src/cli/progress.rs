//! Progress for people: an indicatif bar on a terminal, plain log lines
//! otherwise (cron mail, systemd journal).

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use super::render::bytes;
use crate::ops::progress::Progress;

pub fn for_stderr() -> Box<dyn Progress> {
    if std::io::stderr().is_terminal() && std::env::var_os("NO_PROGRESS").is_none() {
        Box::new(Bar::new())
    } else {
        Box::new(Lines::default())
    }
}

struct Bar {
    bar: ProgressBar,
    files: AtomicU64,
    total_files: AtomicU64,
}

impl Bar {
    fn new() -> Self {
        let bar = ProgressBar::hidden();
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
        Bar {
            bar,
            files: AtomicU64::new(0),
            total_files: AtomicU64::new(0),
        }
    }
}

impl Progress for Bar {
    fn set_total(&self, files: u64, bytes: u64) {
        self.total_files.store(files, Ordering::Relaxed);
        self.bar.set_length(bytes);
        self.bar
            .set_draw_target(indicatif::ProgressDrawTarget::stderr());
        self.bar.enable_steady_tick(Duration::from_millis(200));
    }
    fn file_done(&self, n: u64) {
        let f = self.files.fetch_add(1, Ordering::Relaxed) + 1;
        self.bar.inc(n);
        self.bar.set_message(format!(
            "files {f}/{}",
            self.total_files.load(Ordering::Relaxed)
        ));
    }
    fn message(&self, msg: &str) {
        self.bar.println(msg);
        if self.bar.is_hidden() {
            eprintln!("{msg}");
        }
    }
    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[derive(Default)]
struct Lines {
    total: AtomicU64,
    total_files: AtomicU64,
    done: AtomicU64,
    files: AtomicU64,
    started: Mutex<Option<Instant>>,
    last: Mutex<Option<Instant>>,
}

impl Lines {
    fn line(&self) {
        let started = self
            .started
            .lock()
            .expect("not poisoned")
            .unwrap_or_else(Instant::now);
        let secs = started.elapsed().as_secs_f64().max(0.001);
        let done = self.done.load(Ordering::Relaxed);
        let total = self.total.load(Ordering::Relaxed);
        let of_total = if total > 0 {
            format!(" of {}", bytes(total))
        } else {
            String::new()
        };
        eprintln!(
            "pgvault: {}{of_total} ({} files of {}), {}/s",
            bytes(done),
            self.files.load(Ordering::Relaxed),
            self.total_files.load(Ordering::Relaxed),
            bytes((done as f64 / secs) as u64)
        );
    }
}

impl Progress for Lines {
    fn set_total(&self, files: u64, b: u64) {
        self.total.store(b, Ordering::Relaxed);
        self.total_files.store(files, Ordering::Relaxed);
        *self.started.lock().expect("not poisoned") = Some(Instant::now());
        *self.last.lock().expect("not poisoned") = Some(Instant::now());
    }
    fn file_done(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
        self.files.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last.lock().expect("not poisoned");
        if last.is_some_and(|l| l.elapsed() >= Duration::from_secs(10)) {
            *last = Some(Instant::now());
            drop(last);
            self.line();
        }
    }
    fn message(&self, msg: &str) {
        eprintln!("pgvault: {msg}");
    }
    fn finish(&self) {
        if self.files.load(Ordering::Relaxed) > 0 {
            self.line();
        }
    }
}
