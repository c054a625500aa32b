//! Kill points: where in a command's run a SIGKILL lands.
//!
//! A command is first run unkilled and measured: the moments its stderr
//! lines appear (`--log-level debug` makes them many: each is the start of
//! a phase), when it exits, and when the helpers it detached (look-ahead
//! pusher, prefetcher) are done. Kill points are then spread over those
//! phases — each phase in turn, at a seeded fraction of it — so that short
//! phases (the manifest write at the end of a backup) are hit as often as
//! long ones (copying files). The schedule is a function of the seed; the
//! times scale with how long the measured run took on this machine now.

use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common::*;

/// How long a measured or killed command may take.
const TIMEOUT: Duration = Duration::from_secs(300);

/// One phase of a measured run: from `start` to `end`, begun by `label`.
#[derive(Debug, Clone)]
pub struct Phase {
    pub start: Duration,
    pub end: Duration,
    pub label: String,
}

/// The phases of a measured run.
#[derive(Debug, Clone)]
pub struct KillPlan {
    pub command: String,
    pub phases: Vec<Phase>,
    /// Where the phases start: each case `i` of `n` takes phase
    /// `(offset + i * phases / n) % phases`.
    offset: usize,
}

/// One kill point, as printed with every case (with the seed, it replays).
#[derive(Debug, Clone)]
pub struct KillPoint {
    pub at: Duration,
    pub phase: usize,
    pub phases: usize,
    pub permille: u64,
    pub label: String,
}

impl fmt::Display for KillPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "kill at {} ms: phase {}/{} ({}) at {}/1000 of it",
            self.at.as_millis(),
            self.phase + 1,
            self.phases,
            self.label,
            self.permille
        )
    }
}

/// Shortens a stderr line to a phase label.
fn label_of(line: &str) -> String {
    let l = line.trim().trim_start_matches("pgvault: ");
    let mut s: String = l.chars().take(70).collect();
    if l.chars().count() > 70 {
        s.push('…');
    }
    s
}

impl KillPlan {
    /// Phases from a measured run: stderr lines, the exit of the command
    /// and the end of its detached helpers. Boundaries closer than 3 ms
    /// merge (a kill cannot tell them apart).
    pub fn new(
        command: &str,
        lines: &[(Duration, String)],
        exit: Duration,
        done: Duration,
        rng: &mut Rng,
    ) -> KillPlan {
        let mut marks: Vec<(Duration, String)> = vec![(Duration::ZERO, "start".into())];
        marks.extend(lines.iter().map(|(t, l)| (*t, label_of(l))));
        marks.push((exit, "exited".into()));
        marks.sort_by_key(|(t, _)| *t);
        let end = done.max(exit + Duration::from_millis(1));
        let mut phases: Vec<Phase> = Vec::new();
        for (i, (t, label)) in marks.iter().enumerate() {
            let next = marks.get(i + 1).map(|m| m.0).unwrap_or(end);
            if next <= *t {
                continue;
            }
            match phases.last_mut() {
                Some(last) if *t - last.start < Duration::from_millis(3) => last.end = next,
                _ => phases.push(Phase {
                    start: *t,
                    end: next,
                    label: label.clone(),
                }),
            }
        }
        let offset = rng.below(phases.len().max(1) as u64) as usize;
        KillPlan {
            command: command.to_string(),
            phases,
            offset,
        }
    }

    /// Kill point `i` of `n`.
    pub fn point(&self, i: usize, n: usize, rng: &mut Rng) -> KillPoint {
        let k = (self.offset + i * self.phases.len() / n.max(1)) % self.phases.len();
        let p = &self.phases[k];
        let permille = rng.below(1000);
        let at = p.start + (p.end - p.start) * permille as u32 / 1000;
        KillPoint {
            at,
            phase: k,
            phases: self.phases.len(),
            permille,
            label: p.label.clone(),
        }
    }

    pub fn describe(&self) -> String {
        let mut s = format!("{}: {} phases:", self.command, self.phases.len());
        for (i, p) in self.phases.iter().enumerate() {
            s += &format!(
                "\n  {:>2}. {:>6} ms .. {:>6} ms  {}",
                i + 1,
                p.start.as_millis(),
                p.end.as_millis(),
                p.label
            );
        }
        s
    }
}

/// A command run with a tag (see `common::case_tag`), unkilled: its run,
/// and its plan of kill points. Besides its stderr lines, `observe` (polled
/// every few milliseconds while it runs: files appearing in a spool or in
/// the repository) marks the start of phases — it sees what detached
/// helpers do, whose output goes nowhere.
pub fn measure(
    env: &TestEnv,
    command: &str,
    spawn: impl FnOnce(&(String, String)) -> Spawned,
    observe: impl Fn() -> BTreeSet<String> + Sync,
    rng: &mut Rng,
) -> (Run, KillPlan) {
    let tag = format!("measure-{}", unique());
    let t0 = Instant::now();
    let before = observe();
    let stop = AtomicBool::new(false);
    let (run, mut lines, exit, done) = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut seen = before.clone();
            let mut events = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                for e in observe() {
                    if seen.insert(e.clone()) {
                        events.push((t0.elapsed(), e));
                    }
                }
                std::thread::sleep(Duration::from_millis(3));
            }
            events
        });
        let (run, lines) = finish_timed(spawn(&case_tag(&tag)), TIMEOUT);
        let exit = t0.elapsed();
        let quiet = wait_untagged(env, &tag, TIMEOUT);
        let done = t0.elapsed();
        stop.store(true, Ordering::Relaxed);
        let events = watcher.join().expect("watcher thread");
        assert!(quiet, "the helpers `{}` detached did not finish", run.what);
        let mut lines = lines;
        lines.extend(events);
        (run, lines, exit, done)
    });
    lines.sort_by_key(|(t, _)| *t);
    let plan = KillPlan::new(command, &lines, exit, done, rng);
    eprintln!("{}", plan.describe());
    (run, plan)
}

/// What a killed run did.
pub struct Killed {
    pub run: Run,
    /// pgvault processes killed (the command, and helpers it detached).
    pub killed: usize,
}

/// Starts a command with a fresh tag, SIGKILLs it and every helper it
/// detached at `point`, and collects it; says so after `ctx`.
pub fn run_killed(
    env: &TestEnv,
    ctx: &str,
    point: &KillPoint,
    spawn: impl FnOnce(&(String, String)) -> Spawned,
) -> Killed {
    let tag = format!("kill-{}", unique());
    let t0 = Instant::now();
    let child = spawn(&case_tag(&tag));
    if let Some(left) = point.at.checked_sub(t0.elapsed()) {
        std::thread::sleep(left);
    }
    let killed = kill_tagged(env, &tag);
    let run = finish(child, TIMEOUT);
    eprintln!("{ctx}: {killed} process(es) killed, exit {:?}", run.code);
    Killed { run, killed }
}

/// An observer for [`measure`]: every file below `roots` (temporaries
/// too: one appearing is the start of a write), as `+ <dir>/<file>`.
pub fn files_below(roots: Vec<PathBuf>) -> impl Fn() -> BTreeSet<String> + Sync {
    move || {
        let mut seen = BTreeSet::new();
        for root in &roots {
            for f in super::inventory::all_files(root) {
                if let Ok(r) = f.strip_prefix(root) {
                    let parts: Vec<String> =
                        r.iter().map(|c| c.to_string_lossy().into_owned()).collect();
                    let short = parts[parts.len().saturating_sub(2)..].join("/");
                    seen.insert(format!("+ {short}"));
                }
            }
        }
        seen
    }
}
