//! A real Patroni cluster archiving through pgvault (issue 12): Patroni
//! (PyPI `patroni[etcd]`) with etcd (Debian's `etcd-server`), both started
//! on loopback by `scripts/test.sh` (`PGVAULT_TEST_ETCD`,
//! `PGVAULT_TEST_PATRONI`), two nodes configured as docs/patroni.md says:
//! `archive_command` in `postgresql.parameters`, `restore_command` in
//! `recovery_conf`, and `pgvault restore` as the only
//! `create_replica_methods` entry.
//!
//! 1. node1 bootstraps (initdb), the stanza is created and a backup taken;
//! 2. node2 is created by `pgvault restore` through
//!    `create_replica_methods` (Patroni says so in its log; no
//!    `basebackup` to fall back on) and streams;
//! 3. with the same options as on any node, `backup-standby = prefer` on
//!    node2 backs up from the standby;
//! 4. `patronictl switchover` makes node2 the leader, on timeline 2;
//!    archiving continues there (its segments and history in the stanza);
//! 5. a PITR to a time after the switchover lands on timeline 2, with the
//!    rows written before that time (on both timelines) and none after;
//! 6. docs/disaster-recovery.md's runbook 6, run as written, rebuilds
//!    node1 (now a replica) from the newest backup: `patronictl reinit`,
//!    Patroni's `pgvault restore`, streaming from node2 on timeline 2;
//! 7. a second cluster bootstraps from the stanza with `pgvault restore` as
//!    its custom bootstrap method, replays the archive to its end, and
//!    leads.

use crate::common::*;
use crate::runbooks::book::{Book, Layout, Shell};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(240);

/// etcd's `host:port` and Patroni's bin directory, or `None` (skip) outside
/// CI when scripts/test.sh did not provide them.
fn tools() -> Option<(String, PathBuf)> {
    let etcd = std::env::var("PGVAULT_TEST_ETCD")
        .ok()
        .filter(|v| !v.is_empty());
    let bin = std::env::var("PGVAULT_TEST_PATRONI")
        .ok()
        .map(PathBuf::from)
        .filter(|b| b.join("patroni").exists());
    match (etcd, bin) {
        (Some(e), Some(b)) => Some((e, b)),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true but no etcd/Patroni: PGVAULT_TEST_ETCD and PGVAULT_TEST_PATRONI come from scripts/test.sh")
        }
        _ => {
            eprintln!("skipped: no etcd/Patroni (run through scripts/test.sh)");
            None
        }
    }
}

/// One Patroni node: its configuration, data directory and log, and the
/// running `patroni` process.
struct Member {
    name: String,
    base: PathBuf,
    data: PathBuf,
    yml: PathBuf,
    log: PathBuf,
    pg_port: u16,
    patroni: Option<Spawned>,
}

/// What every member shares: etcd, the scope (and a namespace of this
/// test's own in etcd), pgvault and its configuration file.
struct World<'a> {
    env: &'a TestEnv,
    etcd: String,
    bin: PathBuf,
    namespace: String,
    config: PathBuf,
}

impl World<'_> {
    /// Writes `name`'s Patroni configuration (docs/patroni.md's, with this
    /// test's ports and paths), a member of scope `pgv`.
    fn member(&self, name: &str) -> Member {
        self.member_of("pgv", &self.namespace, name, "", "on")
    }

    /// A member of `scope`: `bootstrap` is added to the bootstrap section
    /// (a custom method), `archive_mode` is this member's.
    fn member_of(
        &self,
        scope: &str,
        namespace: &str,
        name: &str,
        bootstrap: &str,
        archive_mode: &str,
    ) -> Member {
        let base = self.env.mkdir(name, As::PgUser);
        let (pg_port, rest_port) = (free_port(), free_port());
        let data = base.join("data");
        let pgvault = format!(
            "{} --config {}",
            self.env.bin().display(),
            self.config.display()
        );
        let yml = format!(
            r#"scope: {scope}
namespace: {namespace}
name: {name}
log:
  level: INFO
restapi:
  listen: 127.0.0.1:{rest_port}
  connect_address: 127.0.0.1:{rest_port}
etcd3:
  hosts: {etcd}
bootstrap:
{bootstrap}  dcs:
    ttl: 20
    loop_wait: 2
    retry_timeout: 5
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: true
      parameters:
        wal_level: replica
        hot_standby: "on"
        max_connections: 20
        max_wal_senders: 5
        max_replication_slots: 5
        wal_keep_size: 256MB
  initdb:
    - encoding: UTF8
    - locale: C
    - data-checksums
  pg_hba:
    - local all all trust
    - local replication all trust
    - host all all 127.0.0.1/32 trust
    - host replication all 127.0.0.1/32 trust
postgresql:
  listen: 127.0.0.1:{pg_port}
  connect_address: 127.0.0.1:{pg_port}
  data_dir: {data}
  bin_dir: {pgbin}
  pgpass: {base}/pgpass
  authentication:
    superuser:
      username: {user}
    replication:
      username: {user}
  parameters:
    unix_socket_directories: '{base}'
    fsync: "off"
    shared_buffers: 32MB
    archive_mode: "{archive_mode}"
    archive_command: '{pgvault} archive-push %p'
  recovery_conf:
    restore_command: '{pgvault} archive-get %f "%p"'
  create_replica_methods:
    - pgvault
  pgvault:
    command: {pgvault} restore
    no_leader: true
"#,
            etcd = self.etcd,
            data = data.display(),
            pgbin = self.env.pgbin.display(),
            base = base.display(),
            user = self.env.user,
        );
        let path = base.join("patroni.yml");
        fs::write(&path, yml).expect("write patroni.yml");
        Member {
            name: name.into(),
            log: base.join("patroni.log"),
            data,
            yml: path,
            base,
            pg_port,
            patroni: None,
        }
    }

    /// `patronictl ARGS` as the PostgreSQL user, with `m`'s configuration.
    fn patronictl(&self, m: &Member, args: &[&str]) -> Run {
        let mut argv: Vec<OsString> = vec![
            self.bin.join("patronictl").into(),
            "-c".into(),
            m.yml.clone().into(),
        ];
        argv.extend(args.iter().map(OsString::from));
        finish(
            self.env.spawn(As::PgUser, &argv, &[], &m.base),
            Duration::from_secs(120),
        )
    }

    /// Members as `patronictl list` shows them: name -> (role, state, timeline).
    fn list(&self, m: &Member) -> Vec<(String, String, String, u64)> {
        let run = self.patronictl(m, &["list", "-f", "json"]);
        let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap_or_default();
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|m| {
                        (
                            m["Member"].as_str().unwrap_or_default().to_string(),
                            m["Role"].as_str().unwrap_or_default().to_string(),
                            m["State"].as_str().unwrap_or_default().to_string(),
                            m["TL"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until `patronictl list` shows `name` as `role` in `state`.
    #[track_caller]
    fn wait_member(&self, ms: &[&Member], name: &str, role: &str, state: &str) {
        let start = Instant::now();
        loop {
            let list = self.list(ms[0]);
            if list
                .iter()
                .any(|(n, r, s, _)| n == name && r == role && s == state)
            {
                return;
            }
            let dead = ms.iter().find(|m| {
                m.patroni
                    .as_ref()
                    .is_some_and(|p| children_of(p.pid()).is_empty())
            });
            if let Some(m) = dead {
                panic!("patroni of {} exited:\n{}", m.name, m.log_tail(40));
            }
            if start.elapsed() > WAIT {
                let logs: Vec<String> = ms
                    .iter()
                    .map(|m| format!("--- {} ({})\n{}", m.name, m.log.display(), m.log_tail(40)))
                    .collect();
                panic!(
                    "{name} not {role}/{state} after {WAIT:?}: {list:?}\n{}",
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

impl Member {
    /// Starts `patroni` as the PostgreSQL user, its output into its log.
    fn start(&mut self, w: &World) {
        let argv: Vec<OsString> = vec![
            "bash".into(),
            "-c".into(),
            "exec \"$0\" \"$1\" >>\"$2\" 2>&1".into(),
            w.bin.join("patroni").into(),
            self.yml.clone().into(),
            self.log.clone().into(),
        ];
        let mut vars = w.env.base_env(As::PgUser);
        vars.push(("PATH".into(), "/usr/bin:/bin".into()));
        self.patroni = Some(w.env.spawn(As::PgUser, &argv, &vars, &self.base));
    }

    fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// psql on this member's server, as the PostgreSQL user.
    #[track_caller]
    fn psql(&self, env: &TestEnv, sql: &str) -> String {
        let argv = [
            env.pg("psql"),
            "-XAtq".into(),
            "-v".into(),
            "ON_ERROR_STOP=1".into(),
            "-h".into(),
            self.base.display().to_string(),
            "-p".into(),
            self.pg_port.to_string(),
            "-d".into(),
            "postgres".into(),
            "-c".into(),
            sql.into(),
        ];
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        env.run_ok(As::PgUser, &argv, &[], &self.base)
            .trim()
            .to_string()
    }

    /// Stops Patroni (SIGTERM: it stops PostgreSQL first), then whatever
    /// server is left on its data directory.
    fn stop(&mut self, env: &TestEnv) {
        if let Some(p) = self.patroni.take() {
            let _ = std::process::Command::new("kill")
                .arg(p.pid().to_string())
                .status();
            if !std::thread::panicking() {
                let _ = finish(p, Duration::from_secs(120));
            }
        }
        if self.data.join("postmaster.pid").exists() {
            let argv: Vec<OsString> = vec![
                env.pg("pg_ctl").into(),
                "-D".into(),
                self.data.clone().into(),
                "-m".into(),
                "immediate".into(),
                "-w".into(),
                "stop".into(),
            ];
            let _ = finish(
                env.spawn(As::PgUser, &argv, &[], &self.base),
                Duration::from_secs(60),
            );
        }
    }
}

/// Stops every member, also when the test failed.
struct Members<'a> {
    env: &'a TestEnv,
    all: Vec<Member>,
}

impl Drop for Members<'_> {
    fn drop(&mut self) {
        for m in &mut self.all {
            m.stop(self.env);
        }
    }
}

fn pgvault(env: &TestEnv, config: &Path, args: &[&str]) -> Run {
    let cfg = config.display().to_string();
    let mut all = vec!["--config", cfg.as_str()];
    all.extend_from_slice(args);
    env.pgvault(As::PgUser, &all, &[], env.dir())
}

fn member_args(m: &Member) -> Vec<String> {
    vec![
        "--pgdata".into(),
        m.data.display().to_string(),
        "--pg-host".into(),
        m.base.display().to_string(),
        "--pg-port".into(),
        m.pg_port.to_string(),
    ]
}

#[test]
fn patroni_cluster_archives_and_recovers_through_pgvault() {
    let Some((etcd, bin)) = tools() else {
        return;
    };
    let env = TestEnv::new();
    let repo = env.local_repo("pgv");
    let config = env.dir().join("pgvault.toml");
    fs::write(
        &config,
        format!("repo = \"{}\"\nstanza = \"{}\"\n", repo.url, repo.stanza),
    )
    .expect("write pgvault.toml");
    let w = World {
        env: &env,
        etcd,
        bin,
        namespace: format!("/pgvault-it-{}-{}/", std::process::id(), unique()),
        config: config.clone(),
    };
    let mut ms = Members {
        env: &env,
        all: vec![w.member("node1"), w.member("node2")],
    };

    // 1. node1 bootstraps; the stanza; a backup.
    ms.all[0].start(&w);
    w.wait_member(&[&ms.all[0]], "node1", "Leader", "running");
    let n1 = &ms.all[0];
    pgvault(
        &env,
        &config,
        &["stanza-create", "--pgdata", &n1.data.display().to_string()],
    )
    .ok();
    n1.psql(&env, "create table t(tag text, n int)");
    n1.psql(
        &env,
        "insert into t select 'before-backup', g from generate_series(1, 100) g",
    );
    let mut args = vec!["backup".to_string(), "--start-fast".into()];
    args.extend(member_args(n1));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    pgvault(&env, &config, &args).ok();
    n1.psql(
        &env,
        "insert into t select 'after-backup', g from generate_series(1, 100) g",
    );

    // 2. node2 from the backup, through create_replica_methods.
    ms.all[1].start(&w);
    let (n1, n2) = (&ms.all[0], &ms.all[1]);
    w.wait_member(&[n1, n2], "node2", "Replica", "streaming");
    let log2 = fs::read_to_string(&n2.log).unwrap_or_default();
    assert!(
        log2.contains("replica has been created using pgvault"),
        "node2 should be created by pgvault restore:\n{log2}"
    );
    assert_eq!(
        n2.psql(&env, "select count(*) from t where tag = 'after-backup'"),
        "100"
    );

    // 3. The same options on the replica: a backup from the standby.
    let mut args = vec![
        "backup".to_string(),
        "--start-fast".into(),
        "--backup-standby".into(),
        "prefer".into(),
    ];
    args.extend(member_args(n2));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = pgvault(&env, &config, &args);
    run.ok();
    assert!(run.stderr.contains("from the standby at"), "{}", run.stderr);

    // 4. Switchover: node2 leads on timeline 2 and archives there.
    w.patronictl(
        n1,
        &[
            "switchover",
            "pgv",
            "--leader",
            "node1",
            "--candidate",
            "node2",
            "--force",
        ],
    )
    .ok();
    w.wait_member(&[n1, n2], "node2", "Leader", "running");
    w.wait_member(&[n1, n2], "node1", "Replica", "streaming");
    assert!(
        w.list(n1)
            .iter()
            .any(|(n, _, _, tl)| n == "node2" && *tl == 2),
        "node2 should lead on timeline 2: {:?}",
        w.list(n1)
    );
    n2.psql(
        &env,
        "insert into t select 'after-switchover', g from generate_series(1, 100) g",
    );
    let time = n2.psql(&env, "select now()::text");
    std::thread::sleep(Duration::from_millis(1100));
    n2.psql(
        &env,
        "insert into t select 'too-late', g from generate_series(1, 100) g",
    );
    let seg = n2.psql(&env, "select pg_walfile_name(pg_switch_wal())");
    assert!(
        seg.starts_with("00000002"),
        "node2 writes timeline 2: {seg}"
    );
    let start = Instant::now();
    while n2.psql(
        &env,
        "select coalesce(last_archived_wal, '') from pg_stat_archiver",
    ) < seg
    {
        assert!(
            start.elapsed() < WAIT,
            "{seg} not archived by node2: {}",
            n2.psql(&env, "select * from pg_stat_archiver")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let run = pgvault(&env, &config, &["info", "--output", "json"]);
    run.ok();
    let info: serde_json::Value = serde_json::from_str(&run.stdout).expect("info is JSON");
    let tl2 = info["timelines"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["timeline"] == 2))
        .unwrap_or_else(|| panic!("no timeline 2 in info:\n{}", run.stdout));
    assert_eq!(tl2["parent"], 1, "{tl2}");

    // 5. PITR to a time after the switchover.
    let mut node = Node::new(&env, &repo, "pitr");
    let pgdata = node.pgdata.display().to_string();
    pgvault(
        &env,
        &config,
        &[
            "restore",
            "--pgdata",
            &pgdata,
            "--target-time",
            &time,
            "--target-action",
            "promote",
            "--archive-mode",
            "off",
        ],
    )
    .ok();
    node.start();
    node.wait_promoted();
    assert_eq!(
        node.psql("select tag || '=' || count(*) from t group by tag order by tag"),
        "after-backup=100\nafter-switchover=100\nbefore-backup=100"
    );
    // Promoted from timeline 2: it replayed timeline 2's WAL.
    assert_eq!(node.timeline(), 3, "{}", node.log_tail(30));
    assert!(
        node.log_text().contains("restored log file \"00000002"),
        "{}",
        node.log_tail(40)
    );
    node.assert_log_clean();

    // 6. Runbook 6: node1 rebuilt from the newest backup.
    let before = fs::read_to_string(&n1.log).unwrap_or_default().len();
    let book = Book::load();
    let mut sh = Shell {
        env: &env,
        book: &book,
        layout: Layout::SelfContained,
        vars: BTreeMap::new(),
        environ: vec![
            (
                "PATH".into(),
                format!(
                    "{}:{}:/usr/bin:/bin",
                    env.bin().parent().expect("pgvault's directory").display(),
                    w.bin.display()
                ),
            ),
            ("LC_ALL".into(), "C.UTF-8".into()),
        ],
    };
    // What the runbook does not use still points nowhere real.
    for v in book.settings_vars() {
        sh.set(&v, "none");
    }
    sh.set("PGVAULT_CONFIG", config.display());
    sh.set("PATRONI_CONFIG", n1.yml.display());
    sh.set("PATRONI_SCOPE", "pgv");
    sh.set("MEMBER", "node1");
    let listed = sh.run("6", "check");
    assert!(
        listed.contains("node1") && listed.contains("node2"),
        "{listed}"
    );
    sh.run("6", "rebuild");
    sh.run("6", "verify");
    let log1 = fs::read_to_string(&n1.log).unwrap_or_default();
    assert!(
        log1[before..].contains("replica has been created using pgvault"),
        "node1 should be rebuilt by pgvault restore:\n{}",
        &log1[before..]
    );
    assert_eq!(
        n1.psql(&env, "select count(*) from t where tag = 'too-late'"),
        "100"
    );
    assert_eq!(
        n1.psql(&env, "select received_tli from pg_stat_wal_receiver"),
        "2"
    );

    // 7. A new cluster bootstrapped from the stanza (patroni.md's custom
    // bootstrap method): it replays the archive to its end and leads. It
    // archives nowhere: two clusters never archive into one stanza.
    let bootstrap = format!(
        "  method: pgvault\n  pgvault:\n    command: {} --config {} restore --target-action promote\n    keep_existing_recovery_conf: true\n",
        env.bin().display(),
        config.display()
    );
    let namespace = format!("{}copy/", w.namespace);
    ms.all
        .push(w.member_of("pgvcopy", &namespace, "copy1", &bootstrap, "off"));
    ms.all[2].start(&w);
    let copy = &ms.all[2];
    w.wait_member(&[copy], "copy1", "Leader", "running");
    assert!(
        fs::read_to_string(&copy.log)
            .unwrap_or_default()
            .contains("Running custom bootstrap script"),
        "{}",
        copy.log_tail(40)
    );
    assert_eq!(
        copy.psql(
            &env,
            "select tag || '=' || count(*) from t group by tag order by tag"
        ),
        "after-backup=100\nafter-switchover=100\nbefore-backup=100\ntoo-late=100"
    );
    assert_eq!(copy.psql(&env, "select pg_is_in_recovery()"), "f");
}
