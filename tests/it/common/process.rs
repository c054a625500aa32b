//! Running processes: as root or as the PostgreSQL user, with a clean
//! environment, a timeout, and output captured for assertions.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// How long any single pgvault invocation may take before the harness kills
/// it and fails the test (object_store's default retries can take minutes).
pub const PGVAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Who runs a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum As {
    Root,
    /// The unprivileged PostgreSQL user.
    PgUser,
}

/// The output of one process: exit code (None when killed by a signal),
/// stdout and stderr as text.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    pub what: String,
}

impl Run {
    /// Panic with everything known about the run unless it exited with `code`.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "expected exit {code} from `{}`, got {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.what,
            self.code,
            self.stdout,
            self.stderr
        );
        self
    }

    #[track_caller]
    pub fn ok(&self) -> &Self {
        self.expect_code(0)
    }

    /// Non-empty stderr lines.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.trim().is_empty())
            .collect()
    }

    /// The error contract: exactly one `error: ...` line, optionally followed
    /// by `hint: ...` lines, and the error line mentions `needle` (usually
    /// the file name).
    #[track_caller]
    pub fn expect_one_error_line(&self, needle: &str) -> &Self {
        let lines = self.stderr_lines();
        let errors: Vec<_> = lines.iter().filter(|l| !l.starts_with("hint:")).collect();
        assert!(
            errors.len() == 1 && errors[0].starts_with("error:"),
            "`{}` should print one `error:` line (plus optional `hint:` lines) on stderr, got:\n{}",
            self.what,
            self.stderr
        );
        assert!(
            errors[0].contains(needle),
            "the error line of `{}` should name {needle:?}, got: {}",
            self.what,
            errors[0]
        );
        self
    }
}

/// A started process.
pub struct Spawned {
    child: Child,
    what: String,
    started: Instant,
}

impl Spawned {
    /// SIGTERM to the program itself: for the postgres user, `runuser`'s
    /// child (runuser would answer SIGTERM by killing it and dying of the
    /// signal, hiding the program's own exit code).
    pub fn terminate(&self) {
        let pid = self.child.id();
        let target = children_of(pid)
            .first()
            .copied()
            .filter(|_| self.what.starts_with("(as postgres user)"))
            .unwrap_or(pid);
        let _ = Command::new("kill").arg(target.to_string()).status();
    }

    /// The started process's id (with `As::PgUser`, that of `runuser`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Ids of the children of process `pid` (from `/proc/*/stat`).
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            // "pid (comm) state ppid …"; comm may hold spaces and parentheses.
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = &s[s.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(pid)
        })
        .collect()
}

/// Wait for a started process (killing it after `timeout`) and collect its
/// output.
pub fn finish(spawned: Spawned, timeout: Duration) -> Run {
    Running::start(spawned, false).wait(timeout)
}

/// [`finish`], also noting when each stderr line arrived (from the start of
/// the process): the phases of a command, for choosing crash points.
pub fn finish_timed(spawned: Spawned, timeout: Duration) -> (Run, Vec<(Duration, String)>) {
    let running = Running::start(spawned, true);
    let lines = running.lines();
    let run = running.wait(timeout);
    // The reader is done once the process has exited and its pipe closed.
    (run, lines_of(&lines))
}

type TimedLines = Arc<Mutex<Vec<(Duration, String)>>>;

fn lines_of(lines: &TimedLines) -> Vec<(Duration, String)> {
    lines.lock().expect("stderr lines").clone()
}

/// A started process whose output is being read: its stderr lines can be
/// looked at while it runs (a crash test waits for one before it kills).
pub struct Running {
    pid: u32,
    what: String,
    started: Instant,
    lines: TimedLines,
    exited: Arc<AtomicBool>,
    t_out: std::thread::JoinHandle<Vec<u8>>,
    t_err: std::thread::JoinHandle<Vec<u8>>,
    waiter: std::thread::JoinHandle<std::io::Result<std::process::ExitStatus>>,
    done: mpsc::Receiver<()>,
}

impl Running {
    /// Starts reading the output of `spawned` (noting when each stderr
    /// line arrives if `timed`).
    pub fn start(spawned: Spawned, timed: bool) -> Running {
        let Spawned {
            mut child,
            what,
            started,
        } = spawned;
        let mut out = child.stdout.take().expect("stdout is piped");
        let err = child.stderr.take().expect("stderr is piped");
        let lines: TimedLines = Arc::default();
        let t_out = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = out.read_to_end(&mut s);
            s
        });
        let noted = lines.clone();
        let t_err = std::thread::spawn(move || {
            let mut s = Vec::new();
            let mut err = BufReader::new(err);
            loop {
                let at = s.len();
                match err.read_until(b'\n', &mut s) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if timed => {
                        let line = String::from_utf8_lossy(&s[at..]).trim_end().to_string();
                        noted
                            .lock()
                            .expect("stderr lines")
                            .push((started.elapsed(), line));
                    }
                    Ok(_) => {}
                }
            }
            s
        });
        let (tx, done) = mpsc::channel();
        let pid = child.id();
        let exited = Arc::new(AtomicBool::new(false));
        let flag = exited.clone();
        let waiter = std::thread::spawn(move || {
            let status = child.wait();
            flag.store(true, Ordering::SeqCst);
            let _ = tx.send(());
            status
        });
        Running {
            pid,
            what,
            started,
            lines,
            exited,
            t_out,
            t_err,
            waiter,
            done,
        }
    }

    /// Whether it has exited.
    pub fn exited(&self) -> bool {
        self.exited.load(Ordering::SeqCst)
    }

    /// Its stderr lines so far, with when each arrived (if timed).
    pub fn lines_so_far(&self) -> Vec<(Duration, String)> {
        lines_of(&self.lines)
    }

    fn lines(&self) -> TimedLines {
        self.lines.clone()
    }

    /// Waits for it (killing it after `timeout`) and collects its output.
    pub fn wait(self, timeout: Duration) -> Run {
        let Running {
            pid,
            what,
            started,
            t_out,
            t_err,
            waiter,
            done,
            ..
        } = self;
        if done.recv_timeout(timeout).is_err() {
            // runuser forwards SIGTERM to its child; SIGKILL as a last resort.
            let _ = Command::new("kill").arg(pid.to_string()).status();
            std::thread::sleep(Duration::from_secs(2));
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("`{what}` did not finish within {timeout:?}; killed it");
        }
        let status = waiter
            .join()
            .expect("waiter thread")
            .expect("wait for child");
        let stdout = String::from_utf8_lossy(&t_out.join().expect("stdout reader")).into_owned();
        let stderr = String::from_utf8_lossy(&t_err.join().expect("stderr reader")).into_owned();
        Run {
            code: status.code(),
            stdout,
            stderr,
            elapsed: started.elapsed(),
            what,
        }
    }
}

fn describe(argv: &[OsString], env: &[(String, String)], as_pg_user: bool) -> String {
    let mut s = String::new();
    if as_pg_user {
        s.push_str("(as postgres user) ");
    }
    for (k, v) in env {
        if k.starts_with("AWS_") || k.starts_with("PGVAULT_") {
            let v = if k.contains("SECRET") { "***" } else { v };
            let _ = write!(s, "{k}={v} ");
        }
    }
    for a in argv {
        s.push_str(&a.to_string_lossy());
        s.push(' ');
    }
    s.trim_end().to_string()
}

/// Start `argv` as root (`user` None) or as `user` through `runuser`, with
/// exactly `env` on top of a cleaned environment: no PGVAULT_*, AWS_* or
/// libpq PG* variable leaks from the test process into what is tested.
pub fn spawn_as(
    user: Option<&str>,
    argv: &[OsString],
    env: &[(String, String)],
    cwd: &Path,
) -> Spawned {
    let what = describe(argv, env, user.is_some());
    let mut cmd = match user {
        None => {
            let mut c = Command::new(&argv[0]);
            c.args(&argv[1..]);
            c.envs(env.iter().map(|(k, v)| (k, v)));
            c
        }
        Some(user) => {
            // runuser keeps the environment (except HOME, SHELL, USER,
            // LOGNAME); `env` then sets ours for the program.
            let mut c = Command::new("runuser");
            c.args(["-u", user, "--", "env"]);
            c.args(env.iter().map(|(k, v)| format!("{k}={v}")));
            c.args(argv);
            c
        }
    };
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("PGVAULT_") || k.starts_with("AWS_") || k.starts_with("PG") {
            cmd.env_remove(&k);
        }
    }
    cmd.current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
    Spawned {
        child,
        what,
        started: Instant::now(),
    }
}
