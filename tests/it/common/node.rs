//! A cluster restored by pgvault into a directory of its own, started and
//! stopped as the postgres user (shared by the PITR and operations tests).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::*;

/// How long a restored cluster may take to reach its target.
pub const RECOVERY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a restored cluster may take to archive a segment.
const ARCHIVE_TIMEOUT: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------
// A restored data directory, started and stopped as the postgres user.

/// A cluster restored by pgvault into a directory of its own. Unlike
/// [`Cluster`] it is not created by initdb; its postgresql.conf is the
/// primary's (archive_command included) and its postgresql.auto.conf holds
/// what pgvault wrote.
pub struct Node {
    pub pgbin: PathBuf,
    pub user: String,
    pub base: PathBuf,
    pub pgdata: PathBuf,
    pub log: PathBuf,
    pub port: u16,
    pub running: bool,
    /// The postmaster's environment: the postgres user's test home and the
    /// repo's AWS_* variables (restore_command and archive_command inherit
    /// them).
    pub vars: Vec<(String, String)>,
}

impl Node {
    /// An empty data directory (0700, owned by the postgres user) under the
    /// test's scratch directory, next to the socket directory and log.
    pub fn new(env: &TestEnv, repo: &Repo, name: &str) -> Node {
        let base = env.mkdir(&format!("{name}-{}", unique()), As::PgUser);
        let pgdata = base.join("data");
        mkdir_mode(&pgdata, 0o700);
        chown(&pgdata, env.uid, env.gid);
        let mut vars = env.base_env(As::PgUser);
        vars.extend(repo.env.iter().cloned());
        Node {
            pgbin: env.pgbin.clone(),
            user: env.user.clone(),
            log: base.join("server.log"),
            base,
            pgdata,
            port: 0,
            running: false,
            vars,
        }
    }

    pub fn pg(&self, tool: &str) -> OsString {
        self.pgbin.join(tool).into_os_string()
    }

    pub fn run_pg(&self, argv: Vec<OsString>, env: &[(String, String)], timeout: Duration) -> Run {
        finish(spawn_as(Some(&self.user), &argv, env, &self.base), timeout)
    }

    pub fn set_conf(&self, conf: &str) {
        use std::io::Write;
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(self.pgdata.join("postgresql.conf"))
            .expect("open postgresql.conf");
        writeln!(f, "{conf}").expect("append to postgresql.conf");
    }

    pub fn auto_conf(&self) -> String {
        fs::read_to_string(self.pgdata.join("postgresql.auto.conf")).unwrap_or_default()
    }

    /// `pg_ctl -w start` on a port of its own, sockets only. Panics with the
    /// server log when the server does not come up (e.g. recovery FATAL).
    #[track_caller]
    pub fn start(&mut self) {
        if let Err(e) = self.try_start() {
            panic!("{e}");
        }
    }

    /// [`Node::start`], returning what went wrong instead of panicking (a
    /// server that must refuse to start).
    pub fn try_start(&mut self) -> Result<(), String> {
        assert!(!self.running, "already running");
        self.port = free_port();
        let opts = format!(
            "-p {} -k {} -c listen_addresses=",
            self.port,
            self.base.display()
        );
        let argv = vec![
            self.pg("pg_ctl"),
            "-D".into(),
            self.pgdata.clone().into(),
            "-l".into(),
            self.log.clone().into(),
            "-w".into(),
            "-t".into(),
            "180".into(),
            "-o".into(),
            opts.into(),
            "start".into(),
        ];
        let run = self.run_pg(argv, &self.vars, Duration::from_secs(240));
        if run.code != Some(0) {
            return Err(format!(
                "pg_ctl start of the restored cluster {} failed:\n{}\n{}\n--- server log\n{}\n--- postgresql.auto.conf\n{}",
                self.pgdata.display(),
                run.stdout,
                run.stderr,
                self.log_tail(60),
                self.auto_conf()
            ));
        }
        self.running = true;
        Ok(())
    }

    /// `pg_ctl stop -m MODE`, waiting up to `secs`.
    fn pg_ctl_stop(&self, mode: &str, secs: u64) -> Run {
        let argv = vec![
            self.pg("pg_ctl"),
            "-D".into(),
            self.pgdata.clone().into(),
            "-w".into(),
            "-t".into(),
            secs.to_string().into(),
            "-m".into(),
            mode.into(),
            "stop".into(),
        ];
        self.run_pg(argv, &[], Duration::from_secs(secs + 60))
    }

    #[track_caller]
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        let run = self.pg_ctl_stop("fast", 120);
        self.running = false;
        assert_eq!(
            run.code,
            Some(0),
            "pg_ctl stop failed:\n{}\n--- server log\n{}",
            run.stderr,
            self.log_tail(30)
        );
    }

    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        let argv = vec![
            self.pg("psql"),
            "-XAtq".into(),
            "-v".into(),
            "ON_ERROR_STOP=1".into(),
            "-h".into(),
            self.base.clone().into(),
            "-p".into(),
            self.port.to_string().into(),
            "-d".into(),
            "postgres".into(),
            "-c".into(),
            sql.into(),
        ];
        let run = self.run_pg(argv, &[], Duration::from_secs(300));
        if run.code == Some(0) {
            Ok(run.stdout.trim().to_string())
        } else {
            Err(run.stderr)
        }
    }

    #[track_caller]
    pub fn psql(&self, sql: &str) -> String {
        assert!(self.running, "psql on a stopped cluster");
        self.try_psql(sql).unwrap_or_else(|e| {
            panic!(
                "psql on the restored cluster failed: {sql}\n{e}\n--- server log\n{}",
                self.log_tail(30)
            )
        })
    }

    pub fn postmaster_alive(&self) -> bool {
        self.pgdata.join("postmaster.pid").exists()
    }

    /// Poll until `sql` returns `want`.
    #[track_caller]
    pub fn wait_for(&self, sql: &str, want: &str, timeout: Duration, what: &str) {
        let start = Instant::now();
        let mut last: String;
        loop {
            match self.try_psql(sql) {
                Ok(v) if v == want => return,
                Ok(v) => last = v,
                Err(e) => last = e,
            }
            if !self.postmaster_alive() {
                panic!(
                    "the restored cluster stopped while waiting for {what}\n--- server log\n{}\n--- postgresql.auto.conf\n{}",
                    self.log_tail(60),
                    self.auto_conf()
                );
            }
            if start.elapsed() > timeout {
                panic!(
                    "no {what} after {timeout:?} ({sql} = {last:?})\n--- server log\n{}\n--- postgresql.auto.conf\n{}",
                    self.log_tail(60),
                    self.auto_conf()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Wait for the end of recovery (`--target-action promote`).
    #[track_caller]
    pub fn wait_promoted(&self) {
        self.wait_for(
            "select pg_is_in_recovery()",
            "f",
            RECOVERY_TIMEOUT,
            "promotion",
        );
    }

    /// The timeline the server now writes, from its current WAL file name.
    pub fn timeline(&self) -> u64 {
        let name = self.psql("select pg_walfile_name(pg_current_wal_insert_lsn())");
        u64::from_str_radix(&name[..8], 16).expect("timeline in a WAL file name")
    }

    /// `pg_amcheck --install-missing --heapallindexed` on every relation of
    /// the `postgres` database (tables, their TOAST and btree indexes):
    /// exit 0 and nothing reported.
    #[track_caller]
    pub fn amcheck(&self) {
        let argv = vec![
            self.pg("pg_amcheck"),
            "--install-missing".into(),
            "--heapallindexed".into(),
            "-h".into(),
            self.base.clone().into(),
            "-p".into(),
            self.port.to_string().into(),
            "-d".into(),
            "postgres".into(),
        ];
        let run = self.run_pg(argv, &[], Duration::from_secs(300));
        assert!(
            run.code == Some(0) && run.stdout.trim().is_empty(),
            "pg_amcheck found problems in the restored cluster (exit {:?}):\n{}\n{}",
            run.code,
            run.stdout,
            run.stderr
        );
        // It did check the tables the tests care about.
        assert_eq!(
            self.psql("select count(*) from pg_extension where extname = 'amcheck'"),
            "1"
        );
    }

    /// `pg_checksums --check` on the stopped cluster: every block verified.
    #[track_caller]
    pub fn checksums(&self) {
        assert!(!self.running, "pg_checksums needs a stopped cluster");
        let argv = vec![
            self.pg("pg_checksums"),
            "--check".into(),
            "-D".into(),
            self.pgdata.clone().into(),
        ];
        let run = self.run_pg(
            argv,
            &[("LC_ALL".into(), "C".into())],
            Duration::from_secs(300),
        );
        let field = |name: &str| {
            run.stdout
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
        };
        assert!(
            run.code == Some(0)
                && field("Bad checksums:").as_deref() == Some("0")
                && field("Blocks scanned:").is_some_and(|n| n != "0"),
            "pg_checksums --check failed on the restored cluster (exit {:?}):\n{}\n{}",
            run.code,
            run.stdout,
            run.stderr
        );
    }

    /// Wait until this server's archiver has archived `name` (or a later
    /// segment name).
    #[track_caller]
    pub fn wait_archived(&self, name: &str) {
        let start = Instant::now();
        loop {
            let row = self.psql(
                "select coalesce(last_archived_wal, ''), failed_count, coalesce(last_failed_wal, '') \
                 from pg_stat_archiver",
            );
            let cols: Vec<&str> = row.split('|').collect();
            if cols[0].len() == 24 && cols[0] >= name {
                return;
            }
            if start.elapsed() > ARCHIVE_TIMEOUT {
                panic!(
                    "{name} not archived by the restored cluster after {ARCHIVE_TIMEOUT:?}: {row}\n--- server log\n{}",
                    self.log_tail(40)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self, n: usize) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Nothing in the server log says the restored data is damaged or that
    /// recovery hit an error.
    #[track_caller]
    pub fn assert_log_clean(&self) {
        let text = self.log_text();
        let bad: Vec<&str> = text
            .lines()
            // A fast shutdown may cut a session that is just ending.
            .filter(|l| !l.contains("terminating connection due to administrator command"))
            .filter(|l| {
                l.contains("PANIC")
                    || l.contains("FATAL")
                    || l.contains("ERROR:")
                    || l.contains("page verification failed")
                    || l.contains("invalid page")
                    || l.contains("could not read block")
            })
            .collect();
        assert!(
            bad.is_empty(),
            "the restored cluster's log reports problems:\n{}\n--- full log\n{text}",
            bad.join("\n")
        );
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.running {
            let _ = self.pg_ctl_stop("immediate", 60);
            self.running = false;
        }
    }
}
