//! Running the cases of one long test so that one failure does not hide the
//! others: each case's panic is printed as it happens and recorded, and
//! `finish` fails the test with every failed case named.

use std::time::Instant;

/// What a caught panic said.
pub fn panic_message(p: &(dyn std::any::Any + Send)) -> &str {
    p.downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| p.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)")
}

pub struct Cases {
    pub start: Instant,
    failed: Vec<String>,
}

impl Default for Cases {
    fn default() -> Self {
        Cases::new()
    }
}

impl Cases {
    pub fn new() -> Cases {
        Cases {
            start: Instant::now(),
            failed: Vec::new(),
        }
    }

    /// Runs one case; `None` when it panicked.
    pub fn run<T>(&mut self, name: &str, f: impl FnOnce() -> T) -> Option<T> {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        match r {
            Ok(v) => {
                eprintln!("[{:>6.1?}] case {name}: ok", self.start.elapsed());
                Some(v)
            }
            Err(p) => {
                let first = panic_message(&p).lines().next().unwrap_or_default();
                eprintln!("[{:>6.1?}] case {name}: FAILED", self.start.elapsed());
                self.failed.push(format!("{name}: {first}"));
                None
            }
        }
    }

    #[track_caller]
    pub fn finish(self) {
        assert!(
            self.failed.is_empty(),
            "{} case(s) failed (details above):\n  {}",
            self.failed.len(),
            self.failed.join("\n  ")
        );
    }
}
