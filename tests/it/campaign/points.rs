//! Kill points: where in a command's run a SIGKILL lands.
//!
//! A command is first run unkilled and measured: the moments its stderr
//! lines appear (`--log-level debug` makes them many), the moments files
//! appear where it writes (an observer polls the repository, the spool, the
//! data directory: that sees what detached helpers do, whose output goes
//! nowhere), when it exits, and when the helpers it detached (look-ahead
//! pusher, prefetcher) are done. Each of those events starts a phase.
//!
//! A kill point is a phase and a seeded fraction of it. When a killed run
//! is started, the kill waits for the event that started that phase in the
//! measured run — the same line or file, its digits aside, the same number
//! of times — and then for that fraction of the phase's measured length. So
//! a point lands in the phase it names however much faster or slower this
//! run is than the measured one (a warm cache, a loaded machine), and short
//! phases (the manifest write at the end of a backup) are hit as often as
//! long ones (copying files): case `i` of `n` takes the phases in turn.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::Campaign;
use crate::common::*;

/// How long a measured or killed command may take.
const TIMEOUT: Duration = Duration::from_secs(300);

/// What starts a phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// The process is started.
    Start,
    /// The `nth` (from 0) event whose label, digits aside, is this.
    Event(String, usize),
    /// The process has exited (its detached helpers may go on).
    Exit,
}

/// One phase of a measured run: from `start` to `end`, begun by `trigger`
/// (shown as `label`).
#[derive(Debug, Clone)]
pub struct Phase {
    pub start: Duration,
    pub end: Duration,
    pub trigger: Trigger,
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
    pub phase: usize,
    pub phases: usize,
    pub trigger: Trigger,
    /// When the phase began in the measured run.
    pub began: Duration,
    /// After the trigger: this fraction of the phase's measured length.
    pub delay: Duration,
    pub permille: u64,
    pub label: String,
}

impl fmt::Display for KillPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "kill {} ms into phase {}/{} ({}), {}/1000 of it",
            self.delay.as_millis(),
            self.phase + 1,
            self.phases,
            self.label,
            self.permille
        )
    }
}

/// Shortens a line or event to a phase label.
fn label_of(line: &str) -> String {
    let l = line.trim().trim_start_matches("pgvault: ");
    let mut s: String = l.chars().take(70).collect();
    if l.chars().count() > 70 {
        s.push('…');
    }
    s
}

/// An event's label with every run of digits (and of hexadecimal digits
/// holding one) as `#`: the same step in another run — another pid,
/// label, temporary name or checksum — has the same key. A label an
/// observer starts with `= ` is its own key ("= 300 files").
fn key_of(label: &str) -> String {
    if label.starts_with("= ") {
        return label.to_string();
    }
    let mut out = String::new();
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.bytes().any(|b| b.is_ascii_digit()) {
            out.push('#');
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for ch in label.chars() {
        if ch.is_ascii_hexdigit() {
            run.push(ch);
        } else {
            flush(&mut run, &mut out);
            out.push(ch);
        }
    }
    flush(&mut run, &mut out);
    out
}

/// Events in the order they came, each with its trigger: (time, label,
/// key, how many earlier events had that key).
fn numbered(events: &[(Duration, String)]) -> Vec<(Duration, String, Trigger)> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    events
        .iter()
        .map(|(t, l)| {
            let key = key_of(l);
            let n = seen.entry(key.clone()).or_default();
            let trigger = Trigger::Event(key, *n);
            *n += 1;
            (*t, label_of(l), trigger)
        })
        .collect()
}

impl KillPlan {
    /// Phases from a measured run's events (stderr lines and observed
    /// files, in time order), its exit, and the end of its detached
    /// helpers. An event within 3 ms of the previous one adds nothing (a
    /// kill cannot tell them apart).
    pub fn new(
        command: &str,
        events: &[(Duration, String)],
        exit: Duration,
        done: Duration,
        rng: &mut Rng,
    ) -> KillPlan {
        let mut marks = vec![(Duration::ZERO, "start".to_string(), Trigger::Start)];
        marks.extend(numbered(events));
        // A phase of detached helpers at work, if any outlived the command.
        if done > exit + Duration::from_millis(20) {
            marks.push((exit, "exited; its helpers at work".into(), Trigger::Exit));
        }
        marks.sort_by_key(|(t, _, _)| *t);
        let end = done.max(exit + Duration::from_millis(1));
        let mut phases: Vec<Phase> = Vec::new();
        for (i, (t, label, trigger)) in marks.iter().enumerate() {
            let next = marks.get(i + 1).map(|m| m.0).unwrap_or(end);
            if next <= *t {
                continue;
            }
            match phases.last_mut() {
                Some(last) if *t - last.start < Duration::from_millis(3) => last.end = next,
                _ => phases.push(Phase {
                    start: *t,
                    end: next,
                    trigger: trigger.clone(),
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
        KillPoint {
            phase: k,
            phases: self.phases.len(),
            trigger: p.trigger.clone(),
            began: p.start,
            delay: (p.end - p.start) * permille as u32 / 1000,
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

/// Events as they happen while `running` runs: its stderr lines and what
/// `observe` sees appear (new since `before`), in order, with their time.
struct Events<'a, O: Fn() -> BTreeSet<String>> {
    observe: &'a O,
    seen: BTreeSet<String>,
    files: Vec<(Duration, String)>,
    t0: Instant,
}

impl<'a, O: Fn() -> BTreeSet<String>> Events<'a, O> {
    fn new(observe: &'a O, t0: Instant) -> Self {
        Events {
            observe,
            seen: observe(),
            files: Vec::new(),
            t0,
        }
    }

    fn poll(&mut self) {
        for e in (self.observe)() {
            if self.seen.insert(e.clone()) {
                self.files.push((self.t0.elapsed(), e));
            }
        }
    }

    /// Every event so far with `lines`, in time order.
    fn all(&self, lines: Vec<(Duration, String)>) -> Vec<(Duration, String)> {
        let mut v = lines;
        v.extend(self.files.iter().cloned());
        v.sort_by_key(|(t, _)| *t);
        v
    }
}

/// A command run with a tag (see `common::case_tag`), unkilled: its run,
/// and its plan of kill points.
pub fn measure<O: Fn() -> BTreeSet<String> + Sync>(
    env: &TestEnv,
    command: &str,
    spawn: impl FnOnce(&(String, String)) -> Spawned,
    observe: O,
    rng: &mut Rng,
) -> (Run, KillPlan) {
    let tag = format!("measure-{}", unique());
    let stop = AtomicBool::new(false);
    let t0 = Instant::now();
    let (run, events, exit, done) = std::thread::scope(|scope| {
        let watcher = scope.spawn(|| {
            let mut ev = Events::new(&observe, t0);
            while !stop.load(Ordering::Relaxed) {
                ev.poll();
                std::thread::sleep(Duration::from_millis(2));
            }
            ev.files
        });
        let (run, lines) = finish_timed(spawn(&case_tag(&tag)), TIMEOUT);
        let exit = t0.elapsed();
        let quiet = wait_untagged(env, &tag, TIMEOUT);
        let done = t0.elapsed();
        stop.store(true, Ordering::Relaxed);
        let files = watcher.join().expect("watcher thread");
        assert!(quiet, "the helpers `{}` detached did not finish", run.what);
        let mut events = lines;
        events.extend(files);
        events.sort_by_key(|(t, _)| *t);
        (run, events, exit, done)
    });
    let plan = KillPlan::new(command, &events, exit, done, rng);
    eprintln!("{}", plan.describe());
    (run, plan)
}

/// What a killed run did.
pub struct Killed {
    pub run: Run,
    /// pgvault processes killed (the command, and helpers it detached).
    pub killed: usize,
    /// Whether the run reached the point's phase before it ended (if not,
    /// it was done early and nothing was killed in the phase).
    pub reached: bool,
}

/// Starts a command with a fresh tag, waits for `point`'s phase to begin
/// (watching `observe` and the command's stderr) and for its delay, then
/// SIGKILLs the command and every helper it detached, and collects it;
/// says so after `ctx`.
pub fn run_killed<O: Fn() -> BTreeSet<String>>(
    env: &TestEnv,
    ctx: &str,
    point: &KillPoint,
    spawn: impl FnOnce(&(String, String)) -> Spawned,
    observe: O,
) -> Killed {
    let tag = format!("kill-{}", unique());
    let t0 = Instant::now();
    let mut ev = Events::new(&observe, t0);
    let running = Running::start(spawn(&case_tag(&tag)), true);
    let reached = loop {
        ev.poll();
        let hit = match &point.trigger {
            Trigger::Start => Some(Duration::ZERO),
            Trigger::Exit => running.exited().then(|| t0.elapsed()),
            Trigger::Event(key, nth) => numbered(&ev.all(running.lines_so_far()))
                .into_iter()
                .find(|(_, _, t)| *t == Trigger::Event(key.clone(), *nth))
                .map(|(at, _, _)| at),
        };
        if let Some(at) = hit {
            // As much faster or slower as this run reached the phase.
            let pace = if point.began > Duration::from_millis(100) {
                (at.as_secs_f64() / point.began.as_secs_f64()).clamp(0.25, 4.0)
            } else {
                1.0
            };
            let until = at + point.delay.mul_f64(pace);
            if let Some(left) = until.checked_sub(t0.elapsed()) {
                std::thread::sleep(left);
            }
            break true;
        }
        // Done before the phase began: its helpers (if any) are killed now.
        if running.exited() && tagged_pids(env, &tag).is_empty() || t0.elapsed() > TIMEOUT {
            break false;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let killed = kill_tagged(env, &tag);
    let run = running.wait(TIMEOUT);
    eprintln!(
        "{ctx}: {}{killed} process(es) killed, exit {:?}",
        if reached {
            ""
        } else {
            "the phase never began; "
        },
        run.code
    );
    Killed {
        run,
        killed,
        reached,
    }
}

impl Campaign {
    /// Counts one kill point of `command`: survived (it killed a process
    /// and no problem followed — a point that killed nothing proves
    /// nothing, however clean its aftermath), the processes killed, and
    /// whether its phase began at all.
    pub fn tally(&mut self, command: &str, killed: &Killed, problems: &[String]) {
        self.count(
            &format!("{command} kill points survived"),
            u64::from(problems.is_empty() && killed.killed > 0),
        );
        self.count(&format!("{command} kill points tried"), 1);
        self.count(
            &format!("{command} kill points that killed a process"),
            u64::from(killed.killed > 0),
        );
        self.count(&format!("{command} processes killed"), killed.killed as u64);
        self.count(
            &format!("{command} kill points whose phase never began"),
            u64::from(!killed.reached),
        );
    }
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
