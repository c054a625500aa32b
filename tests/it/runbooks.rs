//! The runbooks of `docs/disaster-recovery.md`, run as written (issue 9,
//! defect 15).
//!
//! The document marks each block of commands ` ```sh runbook=N step=S
//! [layout=debian|self-contained] user=root|postgres `; a block without a
//! layout is for both. This test parses the document, and for each
//! runbook and layout runs the blocks of each step in document order with
//! `bash -e`, as root or as the PostgreSQL user, preceded by the
//! document's own settings block — with the variables that block reads
//! (`PGVAULT_CONFIG`, `PGDATA`, ports, the OS user …) set to this test's
//! values, so nothing is copied from the document and nothing outside the
//! test's directories is touched. Between steps it checks what the step
//! should have achieved, against a real PostgreSQL 15 archiving through
//! pgvault.
//!
//! Debian's layout is the real postgresql-common (`pg_createcluster`,
//! `pg_ctlcluster`, `pg_dropcluster`) with `PG_CLUSTER_CONF_ROOT` — its own
//! variable for clusters kept outside `/etc/postgresql` — pointing into the
//! test's scratch directory; the primary is a Debian cluster too, so its
//! backup holds no `postgresql.conf`, as on a real Debian host. The
//! self-contained layout uses the harness's `initdb` cluster as primary.

pub(crate) mod book;

use crate::common::*;
use book::{Book, Layout, Shell};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

const ARCHIVE_TIMEOUT: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------
// Servers.

/// The server a runbook started on `port` with data directory `pgdata`,
/// for the test's own queries (socket in the test's socket directory). As
/// a [`Node`] it is stopped when dropped, should a step have failed.
fn server(w: &World, pgdata: &Path, port: u16, log: &Path) -> Node {
    Node {
        pgbin: w.env.pgbin.clone(),
        user: w.env.user.clone(),
        base: w.sock.clone(),
        pgdata: pgdata.to_path_buf(),
        log: log.to_path_buf(),
        port,
        running: true,
        vars: Vec::new(),
    }
}

/// Runs postgresql-common's tools as root under the test's configuration
/// root.
#[track_caller]
fn pg_common(env: &TestEnv, conf_root: &Path, argv: &[&str]) -> Run {
    let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
    let environ = vec![
        (
            "PG_CLUSTER_CONF_ROOT".to_string(),
            conf_root.display().to_string(),
        ),
        ("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into()),
    ];
    finish(
        env.spawn(As::Root, &argv, &environ, env.dir()),
        Duration::from_secs(300),
    )
}

/// The primary the runbooks recover from.
enum Primary {
    /// A Debian cluster: configuration under the test's configuration root.
    Debian { name: String, node: Node },
    /// A self-contained data directory (the harness's initdb cluster).
    Plain(Cluster),
}

/// Stops and removes what the runbooks started, also when a step failed:
/// every cluster under the test's configuration root, every server in a
/// self-contained data directory the test named.
struct Cleanup<'a> {
    env: &'a TestEnv,
    conf_root: PathBuf,
    pgdatas: Vec<PathBuf>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for d in &self.pgdatas {
            if d.join("postmaster.pid").exists() {
                let argv: Vec<OsString> = vec![
                    self.env.pg("pg_ctl").into(),
                    "-D".into(),
                    d.into(),
                    "-m".into(),
                    "immediate".into(),
                    "stop".into(),
                ];
                let _ = finish(
                    self.env.spawn(As::PgUser, &argv, &[], self.env.dir()),
                    Duration::from_secs(120),
                );
            }
        }
        let Ok(rd) = fs::read_dir(self.conf_root.join("15")) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let argv: &[&str] = if keep() {
                &["pg_ctlcluster", "15", &name, "stop", "-m", "immediate"]
            } else {
                &["pg_dropcluster", "--stop", "15", &name]
            };
            let _ = pg_common(self.env, &self.conf_root, argv);
        }
    }
}

/// The test's world: a repository, pgvault's configuration file, the
/// directories Debian keeps in /etc/postgresql, /var/lib/postgresql,
/// /var/log/postgresql and /var/run/postgresql.
struct World<'a> {
    env: &'a TestEnv,
    config: PathBuf,
    conf_root: PathBuf,
    lib: PathBuf,
    logdir: PathBuf,
    sock: PathBuf,
}

impl<'a> World<'a> {
    fn new(env: &'a TestEnv, repo: &Repo) -> World<'a> {
        let config = env.dir().join("pgvault.toml");
        fs::write(
            &config,
            format!("repo = \"{}\"\nstanza = \"{}\"\n", repo.url, repo.stanza),
        )
        .expect("write pgvault.toml");
        World {
            env,
            config,
            conf_root: env.mkdir("etc-postgresql", As::Root),
            lib: env.mkdir("lib-postgresql", As::PgUser),
            logdir: env.mkdir("log-postgresql", As::PgUser),
            sock: env.mkdir("run-postgresql", As::PgUser),
        }
    }

    fn shell<'b>(&'b self, book: &'b Book, layout: Layout) -> Shell<'b> {
        let bindir = self.env.bin().parent().expect("pgvault's directory");
        let mut sh = Shell {
            env: self.env,
            book,
            layout,
            vars: BTreeMap::new(),
            environ: vec![
                (
                    "PATH".into(),
                    format!(
                        "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                        bindir.display()
                    ),
                ),
                (
                    "PG_CLUSTER_CONF_ROOT".into(),
                    self.conf_root.display().to_string(),
                ),
                // psql's default database is the OS user's name; the
                // test's user has none.
                ("PGDATABASE".into(), "postgres".into()),
                ("LC_ALL".into(), "C.UTF-8".into()),
            ],
        };
        sh.set("PGVAULT_CONFIG", self.config.display());
        sh.set("PG_OS_USER", &self.env.user);
        sh.set("PGBIN", self.env.pgbin.display());
        sh.set("PGHOST", self.sock.display());
        // Values a runbook does not use still point into the test's
        // directories; each runbook sets its own.
        self.node(&mut sh, "none");
        sh.set("PITR_CLUSTER", "none");
        sh.set("PITR_DATA", self.lib.join("none").display());
        sh.set("PITR_PORT", 1);
        sh.set("PITR_LOG", self.logdir.join("none.log").display());
        sh.set("TARGET_TIME", "none");
        sh.set("PRIMARY_CONNINFO", "none");
        // Runbook 6 (Patroni) runs in tests/it/patroni.rs.
        sh.set("PATRONI_CONFIG", "none");
        sh.set("PATRONI_SCOPE", "none");
        sh.set("MEMBER", "none");
        sh
    }

    /// Points the settings at a cluster called `name` (runbooks 2 and 4).
    fn node(&self, sh: &mut Shell, name: &str) -> (PathBuf, u16, PathBuf) {
        let pgdata = self.lib.join(name);
        let port = free_port();
        let log = self.logdir.join(format!("postgresql-15-{name}.log"));
        sh.set("CLUSTER", name);
        sh.set("PGDATA", pgdata.display());
        sh.set("PGPORT", port);
        sh.set("PGLOG", log.display());
        (pgdata, port, log)
    }

    /// A Debian-layout primary archiving through pgvault, registered in the
    /// stanza.
    fn debian_primary(&self, name: &str) -> Primary {
        let pgdata = self.lib.join(name);
        let log = self.logdir.join(format!("postgresql-15-{name}.log"));
        let port = free_port();
        let port_s = port.to_string();
        let (d, s, l) = (
            pgdata.display().to_string(),
            self.sock.display().to_string(),
            log.display().to_string(),
        );
        pg_common(
            self.env,
            &self.conf_root,
            &[
                "pg_createcluster",
                "15",
                name,
                "--user",
                &self.env.user,
                "--datadir",
                &d,
                "--port",
                &port_s,
                "--socketdir",
                &s,
                "--logfile",
                &l,
                "-o",
                "fsync=off",
                "-o",
                "shared_buffers=32MB",
                "-o",
                "checkpoint_timeout=1h",
                "-o",
                "max_wal_size=1GB",
            ],
        )
        .ok();
        // Where archiving.md says Debian's archive settings go. The
        // postmaster pg_ctlcluster starts has an empty environment, so the
        // binary is named by its path.
        fs::write(
            self.conf_root
                .join(format!("15/{name}/conf.d/pgvault.conf")),
            format!(
                "archive_mode = on\narchive_command = '{} --config {} archive-push %p'\n",
                self.env.bin().display(),
                self.config.display()
            ),
        )
        .expect("write conf.d/pgvault.conf");
        self.pgvault(&["stanza-create", "--pgdata", &d]).ok();
        pg_common(
            self.env,
            &self.conf_root,
            &["pg_ctlcluster", "15", name, "start"],
        )
        .ok();
        Primary::Debian {
            name: name.into(),
            node: server(self, &pgdata, port, &log),
        }
    }

    fn plain_primary(&self, repo: &Repo) -> Primary {
        let mut pg = Cluster::init(
            self.env,
            InitOpts {
                wal_segsize_mb: Some(1),
                data_checksums: true,
            },
        );
        let d = pg.pgdata().display().to_string();
        self.pgvault(&["stanza-create", "--pgdata", &d]).ok();
        // As RHEL's packages have it: the server log in `log/` inside the
        // data directory, which a `--delta` restore rewrites. Runbook 3's
        // copy must log elsewhere all the same.
        pg.set_conf("logging_collector = on");
        pg.start_archiving(self.env, repo);
        Primary::Plain(pg)
    }

    /// pgvault with this world's configuration file, as the PostgreSQL user.
    fn pgvault(&self, args: &[&str]) -> Run {
        let cfg = self.config.display().to_string();
        let mut all = vec!["--config", cfg.as_str()];
        all.extend_from_slice(args);
        self.env.pgvault(As::PgUser, &all, &[], self.env.dir())
    }
}

impl Primary {
    fn sock(&self) -> &Path {
        match self {
            Primary::Debian { node, .. } => &node.base,
            Primary::Plain(pg) => pg.sockdir(),
        }
    }

    fn port(&self) -> u16 {
        match self {
            Primary::Debian { node, .. } => node.port,
            Primary::Plain(pg) => pg.port(),
        }
    }

    fn pgdata(&self) -> &Path {
        match self {
            Primary::Debian { node, .. } => &node.pgdata,
            Primary::Plain(pg) => pg.pgdata(),
        }
    }

    #[track_caller]
    fn psql(&self, sql: &str) -> String {
        match self {
            Primary::Debian { node, .. } => node.psql(sql),
            Primary::Plain(pg) => pg.psql(sql),
        }
    }

    /// Switches WAL and waits until the finished segment is archived.
    #[track_caller]
    fn archive_now(&self) {
        let seg = self.psql("select pg_walfile_name(pg_switch_wal())");
        match self {
            Primary::Debian { node, .. } => node.wait_archived(&seg),
            Primary::Plain(pg) => pg.wait_archived(&seg, ARCHIVE_TIMEOUT),
        }
    }

    /// `pgvault backup --start-fast`; returns the label.
    #[track_caller]
    fn backup(&self, w: &World) -> String {
        let (d, h, p) = (
            self.pgdata().display().to_string(),
            self.sock().display().to_string(),
            self.port().to_string(),
        );
        let run = w.pgvault(&[
            "backup",
            "--pgdata",
            &d,
            "--pg-host",
            &h,
            "--pg-port",
            &p,
            "--start-fast",
        ]);
        run.ok();
        run.stdout.trim().to_string()
    }

    /// The region is lost: the primary stops for good (and, in Debian's
    /// layout, its cluster goes, so the runbook can build one of that name).
    fn lose(self, w: &World) {
        match self {
            Primary::Debian { name, mut node } => {
                node.running = false;
                pg_common(
                    w.env,
                    &w.conf_root,
                    &["pg_dropcluster", "--stop", "15", &name],
                )
                .ok();
            }
            Primary::Plain(mut pg) => pg.stop(),
        }
    }
}

/// The `count(*)` a `psql -c "select count(*) …"` printed (aligned output).
fn printed_count(out: &str) -> Option<u64> {
    out.lines().rev().find_map(|l| l.trim().parse().ok())
}

// ---------------------------------------------------------------------------
// The runbooks.

/// What the primary wrote after the backup: `orders` 1..100, a time, 101..200,
/// a time, then the `DELETE` runbook 3 recovers from.
struct History {
    before_all: String,
    before_delete: String,
}

fn write_history(pg: &Primary) -> History {
    pg.psql("create table orders(id int primary key)");
    pg.psql("insert into orders select generate_series(1, 100)");
    // The server's clock, read after the insert committed.
    let before_all = pg.psql("select now()::text");
    std::thread::sleep(Duration::from_millis(1100));
    pg.psql("insert into orders select generate_series(101, 200)");
    let before_delete = pg.psql("select now()::text");
    std::thread::sleep(Duration::from_millis(1100));
    pg.psql("delete from orders");
    pg.archive_now();
    History {
        before_all,
        before_delete,
    }
}

/// Runbook 3: a copy to a time beside production, inspected while paused,
/// restored again with `--delta` to a later time, then resumed; its port
/// and log survive the `--delta` restore.
fn runbook_3(w: &World, book: &Book, layout: Layout, cleanup: &mut Cleanup, h: &History) {
    let mut sh = w.shell(book, layout);
    let name = format!("pitr{}", unique());
    let (data, port, log) = (
        w.lib.join(&name),
        free_port(),
        w.logdir.join(format!("{name}.log")),
    );
    cleanup.pgdatas.push(data.clone());
    sh.set("PITR_CLUSTER", &name);
    sh.set("PITR_DATA", data.display());
    sh.set("PITR_PORT", port);
    sh.set("PITR_LOG", log.display());
    let copy = server(w, &data, port, &log);
    let ready = || {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("ready to accept read-only connections")
            .count()
    };
    // Restores (again), starts and inspects the copy at `target`; the count
    // of orders it printed must be `want`.
    let look = |sh: &mut Shell, steps: &[&str], target: &str, want: u64| {
        sh.set("TARGET_TIME", target);
        for step in steps {
            sh.run("3", step);
        }
        let out = sh.run("3", "inspect");
        assert_eq!(
            printed_count(&out),
            Some(want),
            "paused at {target}, orders should hold {want} rows; printed:\n{out}\n--- log\n{}",
            copy.log_tail(30)
        );
    };

    let info = sh.run("3", "info");
    assert!(info.contains("recoverable"), "info printed:\n{info}");
    look(
        &mut sh,
        &["prepare", "restore", "start"],
        &h.before_all,
        100,
    );
    assert_eq!(
        ready(),
        1,
        "the copy should log to {} (outside its data directory)",
        log.display()
    );
    // Too early: again, to the moment before the DELETE.
    look(&mut sh, &["stop", "again", "start"], &h.before_delete, 200);
    // Same log, same port: the --delta restore touched neither.
    assert_eq!(
        ready(),
        2,
        "{} should log both starts of the copy:\n{}",
        log.display(),
        copy.log_tail(60)
    );
    assert_eq!(copy.psql("show port"), port.to_string());

    sh.run("3", "resume");
    assert_eq!(copy.psql("select count(*) from orders"), "200");
    assert_eq!(copy.psql("show archive_mode"), "off");
    sh.run("3", "remove");
    assert!(!data.exists(), "the copy's data directory should be gone");
    assert!(!w.conf_root.join("15").join(&name).exists());
}

/// Runbook 4: a standby from the newest backup that streams from the
/// primary.
fn runbook_4(w: &World, book: &Book, layout: Layout, cleanup: &mut Cleanup, pg: &Primary) {
    let mut sh = w.shell(book, layout);
    let name = format!("standby{}", unique());
    let (pgdata, port, log) = w.node(&mut sh, &name);
    cleanup.pgdatas.push(pgdata.clone());
    sh.set(
        "PRIMARY_CONNINFO",
        format!(
            "host={} port={} user={} application_name=node2",
            pg.sock().display(),
            pg.port(),
            w.env.user
        ),
    );
    sh.run("4", "prepare");
    sh.run("4", "restore");
    sh.run("4", "start");
    let out = sh.run("4", "check");
    assert_eq!(out.trim(), "t", "pg_is_in_recovery() on the standby");
    // It streams: a row the primary writes now, and does not archive,
    // appears on the standby.
    let standby = server(w, &pgdata, port, &log);
    pg.psql("create table streamed as select 42 as x");
    standby.wait_for(
        "select x from streamed",
        "42",
        ARCHIVE_TIMEOUT,
        "the row streamed from the primary",
    );
    assert_eq!(
        pg.psql("select state from pg_stat_replication where application_name = 'node2'"),
        "streaming"
    );
    assert_eq!(
        standby.psql("select status from pg_stat_wal_receiver"),
        "streaming"
    );
    // The standby goes (stopped as `standby` drops; Debian's configuration
    // with the others at the end).
}

/// Runbook 2: the primary is lost; a new node of the same name restores
/// the newest backup, replays every archived file, promotes, archives its
/// new timeline and takes a backup.
fn runbook_2(w: &World, book: &Book, layout: Layout, cleanup: &mut Cleanup, pg: Primary) {
    pg.psql("create table last_words as select 'archived' as w");
    pg.archive_now();
    let name = match &pg {
        Primary::Debian { name, .. } => name.clone(),
        Primary::Plain(_) => format!("restored{}", unique()),
    };
    pg.lose(w);

    let mut sh = w.shell(book, layout);
    let (pgdata, port, log) = w.node(&mut sh, &name);
    cleanup.pgdatas.push(pgdata.clone());
    sh.run("2", "prepare");
    sh.run("2", "restore");
    sh.run("2", "start");
    let out = sh.run("2", "finish");

    // Everything archived was replayed: the DELETE, and the last row.
    let node = server(w, &pgdata, port, &log);
    assert_eq!(node.psql("select count(*) from orders"), "0");
    assert_eq!(node.psql("select w from last_words"), "archived");
    // Promoted onto timeline 2, archived into the stanza, backed up there.
    assert_eq!(node.timeline(), 2);
    let run = w.pgvault(&["info", "--output", "json"]);
    run.ok();
    let info: serde_json::Value =
        serde_json::from_str(&run.stdout).expect("info --output json is JSON");
    let tl2 = info["timelines"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["timeline"] == 2))
        .unwrap_or_else(|| panic!("no timeline 2 in info:\n{}", run.stdout));
    assert_eq!(tl2["parent"], 1, "timeline 2's parent: {tl2}");
    let backups = info["backups"].as_array().expect("backups[]");
    assert!(
        backups.iter().any(|b| b["timeline"] == 2),
        "the runbook's backup should be on timeline 2:\n{}\n--- the runbook printed\n{out}",
        run.stdout
    );
}

fn runbooks(layout: Layout) {
    let env = TestEnv::new();
    let repo = env.local_repo("rb");
    let book = Book::load();
    let w = World::new(&env, &repo);
    let mut cleanup = Cleanup {
        env: &env,
        conf_root: w.conf_root.clone(),
        pgdatas: Vec::new(),
    };
    let pg = match layout {
        Layout::Debian => w.debian_primary(&format!("prod{}", std::process::id())),
        Layout::SelfContained => w.plain_primary(&repo),
    };
    cleanup.pgdatas.push(pg.pgdata().to_path_buf());
    let label = pg.backup(&w);
    eprintln!("backup {label}");
    let h = write_history(&pg);

    let mut cases = Cases::new();
    cases.run("runbook 3: PITR copy, --delta again, resume", || {
        runbook_3(&w, &book, layout, &mut cleanup, &h)
    });
    cases.run("runbook 4: standby from a backup, streaming", || {
        runbook_4(&w, &book, layout, &mut cleanup, &pg)
    });
    cases.run(
        "runbook 2: region lost, newest restored and promoted",
        || runbook_2(&w, &book, layout, &mut cleanup, pg),
    );
    cases.finish();
}

#[test]
fn runbooks_debian_layout() {
    runbooks(Layout::Debian);
}

#[test]
fn runbooks_self_contained_data_directory() {
    runbooks(Layout::SelfContained);
}

#[test]
fn runbook_blocks_are_well_formed() {
    let book = Book::load();
    let vars = book.settings_vars();
    for v in ["PGVAULT_CONFIG", "PG_OS_USER", "PGBIN", "PGDATA", "PGPORT"] {
        assert!(
            vars.contains(&v.to_string()),
            "settings should read {v}: {vars:?}"
        );
    }
    for (rb, steps) in [
        ("2", &["prepare", "restore", "start", "finish"][..]),
        (
            "3",
            &[
                "info", "prepare", "restore", "start", "inspect", "stop", "again", "resume",
                "remove",
            ],
        ),
        ("4", &["prepare", "restore", "start", "check"]),
    ] {
        for step in steps {
            for layout in ["debian", "self-contained"] {
                assert!(
                    book.blocks.iter().any(|b| b.runbook == rb
                        && b.step == *step
                        && b.layout.as_deref().is_none_or(|l| l == layout)),
                    "no block for runbook {rb} step {step} layout {layout}"
                );
            }
        }
    }
}
