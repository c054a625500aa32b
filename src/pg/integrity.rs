//! Checks of a restored cluster, run by `drill` on its scratch server:
//! `pg_amcheck --heapallindexed` on every database, page verification of
//! every relation (`pg_checksums --check` on the stopped cluster when it
//! has data checksums, else a read of every block through the buffer
//! manager, which verifies each page header), and the user's own checks.
//! Failures are named by relation (`database.schema.name`), file and block.

use std::collections::HashMap;
use std::path::Path;

use super::conn::{ConnError, Session};
use super::relfile::RelFile;
use super::scratch::{ServerError, ServerSpec};

#[derive(Debug, thiserror::Error)]
pub enum IntegrityError {
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("{0}")]
    Query(String),
    #[error("{tool} failed (exit {code}): {stderr}")]
    Tool {
        tool: &'static str,
        code: String,
        stderr: String,
    },
}

fn query_err(what: &str) -> impl FnOnce(tokio_postgres::Error) -> IntegrityError + '_ {
    move |e| {
        let detail = e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| e.to_string());
        IntegrityError::Query(format!("{what}: {detail}"))
    }
}

fn connect_err(e: ConnError) -> IntegrityError {
    IntegrityError::Query(e.to_string())
}

/// Databases that accept connections (template0 does not).
pub async fn databases(session: &Session) -> Result<Vec<String>, IntegrityError> {
    let rows = session
        .client()
        .query(
            "SELECT datname::text FROM pg_database WHERE datallowconn ORDER BY datname",
            &[],
        )
        .await
        .map_err(query_err("list databases"))?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// A promoted server, as it describes itself.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerState {
    pub version: String,
    pub listen_addresses: String,
    pub archive_mode: String,
    pub data_checksums: bool,
    /// The commit time of the last transaction recovery replayed (Unix
    /// seconds), `None` when it replayed none; it stays after promotion.
    pub last_replayed_xact: Option<f64>,
    /// Where replay ended.
    pub last_replayed_lsn: Option<super::Lsn>,
}

pub async fn server_state(session: &Session) -> Result<ServerState, IntegrityError> {
    let row = session
        .client()
        .query_one(
            "SELECT current_setting('server_version'), current_setting('listen_addresses'),
                    current_setting('archive_mode'), current_setting('data_checksums'),
                    extract(epoch FROM pg_last_xact_replay_timestamp())::float8,
                    pg_last_wal_replay_lsn()::text",
            &[],
        )
        .await
        .map_err(query_err("read the server's settings"))?;
    Ok(ServerState {
        version: row.get(0),
        listen_addresses: row.get(1),
        archive_mode: row.get(2),
        data_checksums: row.get::<_, String>(3) == "on",
        last_replayed_xact: row.get(4),
        last_replayed_lsn: row.get::<_, Option<String>>(5).and_then(|l| l.parse().ok()),
    })
}

/// A relation with storage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    /// `database.schema.name`.
    pub name: String,
    /// Its file, relative to the data directory (`base/5/16384`).
    pub file: String,
    /// Forks with at least one block: `main`, `fsm`, `vm`, `init`.
    pub forks: Vec<String>,
}

/// The relations of database `db` that have storage (tables, indexes,
/// TOAST tables, materialized views, sequences), temporary ones aside.
pub async fn relations(
    spec: &ServerSpec,
    role: &str,
    db: &str,
) -> Result<Vec<Relation>, IntegrityError> {
    let s = Session::connect(&spec.conn(role, db))
        .await
        .map_err(connect_err)?;
    let rows = s
        .client()
        .query(
            "SELECT c.oid, n.nspname::text, c.relname::text, pg_relation_filepath(c.oid),
                    array(SELECT f FROM unnest(array['main', 'fsm', 'vm', 'init']) f
                           WHERE pg_relation_size(c.oid, f) > 0)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind IN ('r', 'i', 't', 'm', 'S') AND c.relpersistence <> 't'
              ORDER BY c.oid",
            &[],
        )
        .await
        .map_err(query_err(&format!("list the relations of database {db}")))?;
    Ok(rows
        .iter()
        .map(|r| Relation {
            oid: r.get(0),
            name: format!("{db}.{}.{}", r.get::<_, String>(1), r.get::<_, String>(2)),
            file: r.get::<_, Option<String>>(3).unwrap_or_default(),
            forks: r.get(4),
        })
        .collect())
}

/// Relation names by file, to name what a file-level check finds.
#[derive(Debug, Clone, Default)]
pub struct RelationMap {
    by_file: HashMap<(u32, u32, u32), String>,
}

impl RelationMap {
    pub fn new<'a>(relations: impl IntoIterator<Item = &'a Relation>) -> RelationMap {
        let mut by_file = HashMap::new();
        for r in relations {
            if let Some(f) = RelFile::parse(&r.file) {
                // Shared catalogs appear in every database: keep one name.
                by_file
                    .entry((f.tablespace, f.database, f.relnumber))
                    .or_insert_with(|| r.name.clone());
            }
        }
        RelationMap { by_file }
    }

    /// The relation file `rel` (relative to the data directory, any fork
    /// or segment) belongs to.
    pub fn name_of(&self, rel: &str) -> Option<&str> {
        let f = RelFile::parse(rel)?;
        self.by_file
            .get(&(f.tablespace, f.database, f.relnumber))
            .map(String::as_str)
    }
}

/// What `pg_amcheck` reported about one relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmcheckFinding {
    /// `heap table "postgres.public.t"`, `btree index "…"`, with block and
    /// offset when it names them.
    pub object: String,
    pub detail: String,
}

/// `pg_amcheck --all --heapallindexed --install-missing`: every database,
/// every table (with its TOAST table) and btree index; amcheck is created
/// in each database of the scratch copy where it is missing. `jobs`
/// connections at once.
pub async fn amcheck(
    spec: &ServerSpec,
    role: &str,
    jobs: usize,
) -> Result<Vec<AmcheckFinding>, IntegrityError> {
    let args: Vec<String> = vec![
        "--host".into(),
        spec.socket_dir.display().to_string(),
        "--port".into(),
        super::scratch::PORT.to_string(),
        "--username".into(),
        role.into(),
        "--no-password".into(),
        "--all".into(),
        "--heapallindexed".into(),
        "--install-missing".into(),
        "--jobs".into(),
        jobs.max(1).to_string(),
    ];
    let (code, stdout, stderr) = spec.run_tool("pg_amcheck", &args).await?;
    let findings = parse_amcheck(&stdout);
    match code {
        // 2: corruption found (pg_amcheck.c); whatever the code, what it
        // said about relations is the finding.
        Some(0) => Ok(findings),
        _ if !findings.is_empty() => Ok(findings),
        c => Err(IntegrityError::Tool {
            tool: "pg_amcheck",
            code: c.map_or("signal".into(), |c| c.to_string()),
            stderr: last_lines(&format!("{stdout}\n{stderr}"), 4),
        }),
    }
}

/// Findings in `pg_amcheck`'s report: a line naming a relation (`heap
/// table "db.s.t", block 2, offset 3:`), then its indented details.
fn parse_amcheck(stdout: &str) -> Vec<AmcheckFinding> {
    let mut out: Vec<AmcheckFinding> = Vec::new();
    for line in stdout.lines() {
        if line.trim().is_empty() {
            continue;
        }
        if !line.starts_with(char::is_whitespace) {
            out.push(AmcheckFinding {
                object: line.trim_end_matches(':').to_string(),
                detail: String::new(),
            });
        } else if let Some(f) = out.last_mut() {
            if !f.detail.is_empty() {
                f.detail.push_str("; ");
            }
            f.detail.push_str(line.trim());
        }
    }
    out
}

/// One page `pg_checksums` found bad.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadBlock {
    /// Relative to the data directory.
    pub file: String,
    pub block: u32,
    pub detail: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChecksumsOutcome {
    pub blocks_scanned: u64,
    pub bad: Vec<BadBlock>,
}

/// `pg_checksums --check` on the (cleanly stopped) data directory.
pub async fn checksums(spec: &ServerSpec) -> Result<ChecksumsOutcome, IntegrityError> {
    let args = vec![
        "--check".into(),
        "--pgdata".into(),
        spec.pgdata.display().to_string(),
    ];
    let (code, stdout, stderr) = spec.run_tool("pg_checksums", &args).await?;
    let outcome = parse_checksums(&stdout, &stderr, &spec.pgdata);
    match code {
        Some(0) => Ok(outcome),
        Some(1) if !outcome.bad.is_empty() => Ok(outcome),
        c => Err(IntegrityError::Tool {
            tool: "pg_checksums",
            code: c.map_or("signal".into(), |c| c.to_string()),
            stderr: last_lines(&stderr, 4),
        }),
    }
}

/// `Blocks scanned:  3737` on stdout; `pg_checksums: error: checksum
/// verification failed in file "…/base/5/16404", block 2: calculated
/// checksum DE8D but block contains 48BF` on stderr (pg_checksums.c).
fn parse_checksums(stdout: &str, stderr: &str, pgdata: &Path) -> ChecksumsOutcome {
    let mut out = ChecksumsOutcome::default();
    for l in stdout.lines() {
        if let Some(v) = l.strip_prefix("Blocks scanned:") {
            out.blocks_scanned = v.trim().parse().unwrap_or(0);
        }
    }
    let prefix = format!("{}/", pgdata.display());
    for l in stderr.lines() {
        let Some(rest) = l.split("checksum verification failed in file \"").nth(1) else {
            continue;
        };
        let Some((file, after)) = rest.split_once('"') else {
            continue;
        };
        let block = after
            .trim_start_matches([',', ' '])
            .strip_prefix("block ")
            .and_then(|b| b.split(':').next())
            .and_then(|b| b.parse().ok())
            .unwrap_or(0);
        let detail = after.split_once(": ").map_or("", |(_, d)| d).to_string();
        out.bad.push(BadBlock {
            file: file.strip_prefix(&prefix).unwrap_or(file).to_string(),
            block,
            detail,
        });
    }
    out
}

/// Reads every block of every fork of `rels` (of database `db`) through
/// the buffer manager (`pg_prewarm(…, 'buffer', fork)`), which verifies
/// each page header (and checksum) as it reads; returns the relations that
/// failed, each with what the server said.
pub async fn read_relations(
    spec: &ServerSpec,
    role: &str,
    db: &str,
    rels: &[Relation],
) -> Result<Vec<(String, String)>, IntegrityError> {
    let s = Session::connect(&spec.conn(role, db))
        .await
        .map_err(connect_err)?;
    s.client()
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_prewarm")
        .await
        .map_err(query_err(&format!(
            "create extension pg_prewarm in database {db}"
        )))?;
    let mut failed = Vec::new();
    for r in rels {
        for fork in &r.forks {
            // Numbers and a fixed fork name: nothing to quote.
            let sql = format!(
                "SELECT pg_prewarm({}::oid::regclass, 'buffer', '{}')",
                r.oid,
                match fork.as_str() {
                    f @ ("main" | "fsm" | "vm" | "init") => f,
                    _ => continue,
                }
            );
            if let Err(e) = s.client().query_one(&sql, &[]).await {
                let why = e
                    .as_db_error()
                    .map(|d| d.message().to_string())
                    .unwrap_or_else(|| e.to_string());
                failed.push((r.name.clone(), format!("{fork} fork: {why}")));
            }
        }
    }
    Ok(failed)
}

/// One of the user's checks: a query that must return true.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserCheck {
    pub name: String,
    /// Line of the file where the query starts.
    pub line: usize,
    pub database: String,
    pub sql: String,
}

/// Reads a checks file: queries, each ending with `;` at the end of a
/// line (or the end of the file). A `-- check: NAME` comment names the
/// next query, `-- database: NAME` picks its database (default
/// `postgres`); other comments are ignored. An unnamed query is named by
/// its first line.
pub fn parse_checks(text: &str) -> Vec<UserCheck> {
    let mut out = Vec::new();
    let (mut name, mut database) = (None::<String>, None::<String>);
    let mut sql = String::new();
    let mut start = 0;
    let mut finish = |sql: &mut String,
                      start: usize,
                      name: &mut Option<String>,
                      database: &mut Option<String>| {
        let q = sql.trim().trim_end_matches(';').trim().to_string();
        sql.clear();
        if q.is_empty() {
            return;
        }
        let first = q.lines().next().unwrap_or("").trim();
        let default_name = if first.chars().count() > 60 {
            format!("{}…", first.chars().take(60).collect::<String>())
        } else {
            first.to_string()
        };
        out.push(UserCheck {
            name: name.take().unwrap_or(default_name),
            line: start,
            database: database.take().unwrap_or_else(|| "postgres".into()),
            sql: q,
        });
    };
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if sql.is_empty() {
            if let Some(c) = t.strip_prefix("--") {
                let c = c.trim();
                if let Some(n) = c.strip_prefix("check:") {
                    name = Some(n.trim().to_string());
                } else if let Some(d) = c.strip_prefix("database:") {
                    database = Some(d.trim().to_string());
                }
                continue;
            }
            if t.is_empty() {
                continue;
            }
            start = i + 1;
        }
        sql.push_str(line);
        sql.push('\n');
        if t.ends_with(';') {
            finish(&mut sql, start, &mut name, &mut database);
        }
    }
    finish(&mut sql, start, &mut name, &mut database);
    out
}

/// Runs one user check: `Ok(None)` when it returned true, else what it
/// returned or the error.
pub async fn run_check(
    spec: &ServerSpec,
    role: &str,
    check: &UserCheck,
) -> Result<Option<String>, IntegrityError> {
    let s = match Session::connect(&spec.conn(role, &check.database)).await {
        Ok(s) => s,
        Err(e) => {
            return Ok(Some(format!(
                "cannot connect to database {}: {e}",
                check.database
            )))
        }
    };
    let rows = match s.client().query(check.sql.as_str(), &[]).await {
        Ok(rows) => rows,
        Err(e) => {
            let why = e
                .as_db_error()
                .map(|d| format!("ERROR: {}", d.message()))
                .unwrap_or_else(|| e.to_string());
            return Ok(Some(why));
        }
    };
    Ok(match rows.as_slice() {
        [row] if !row.is_empty() => match row.try_get::<_, Option<bool>>(0) {
            Ok(Some(true)) => None,
            Ok(Some(false)) => Some("returned false".into()),
            Ok(None) => Some("returned NULL".into()),
            Err(_) => Some(format!(
                "returned a {}, not a boolean",
                row.columns()[0].type_().name()
            )),
        },
        rows => Some(format!("returned {} rows, not one boolean", rows.len())),
    })
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pg_amcheck_findings() {
        let out = "heap table \"postgres.public.t\":\n    ERROR:  invalid page in block 2 of relation base/5/16404\nbtree index \"postgres.public.t_id_idx\":\n    ERROR:  invalid page in block 2 of relation base/5/16404\nheap table \"db.s.u\", block 7, offset 3:\n    line pointer redirection to item at offset 59 exceeds maximum offset 38\n    second\n";
        let f = parse_amcheck(out);
        assert_eq!(f.len(), 3);
        assert_eq!(f[0].object, "heap table \"postgres.public.t\"");
        assert_eq!(
            f[0].detail,
            "ERROR:  invalid page in block 2 of relation base/5/16404"
        );
        assert_eq!(f[2].object, "heap table \"db.s.u\", block 7, offset 3");
        assert!(f[2].detail.ends_with("; second"));
        assert!(parse_amcheck("").is_empty());
    }

    #[test]
    fn reads_pg_checksums_failures() {
        let stdout = "Checksum operation completed\nFiles scanned:   1246\nBlocks scanned:  3737\nBad checksums:  1\nData checksum version: 1\n";
        let stderr = "pg_checksums: error: checksum verification failed in file \"/s/data/base/5/16404\", block 2: calculated checksum DE8D but block contains 48BF\n";
        let o = parse_checksums(stdout, stderr, Path::new("/s/data"));
        assert_eq!(o.blocks_scanned, 3737);
        assert_eq!(
            o.bad,
            vec![BadBlock {
                file: "base/5/16404".into(),
                block: 2,
                detail: "calculated checksum DE8D but block contains 48BF".into()
            }]
        );
    }

    #[test]
    fn names_files_by_relation() {
        let rels = [Relation {
            oid: 16404,
            name: "postgres.public.t".into(),
            file: "base/5/16404".into(),
            forks: vec!["main".into()],
        }];
        let m = RelationMap::new(&rels);
        assert_eq!(m.name_of("base/5/16404"), Some("postgres.public.t"));
        assert_eq!(m.name_of("base/5/16404_fsm.1"), Some("postgres.public.t"));
        assert_eq!(m.name_of("base/5/16405"), None);
        assert_eq!(m.name_of("global/pg_control"), None);
    }

    #[test]
    fn reads_a_checks_file() {
        let text = "\
-- Checks for the drill
select true;

-- check: orders arrived
-- database: shop
select count(*) > 0
  from orders;
select 1 = 1
";
        let c = parse_checks(text);
        assert_eq!(c.len(), 3, "{c:?}");
        assert_eq!(c[0].name, "select true");
        assert_eq!((c[0].line, c[0].database.as_str()), (2, "postgres"));
        assert_eq!(c[0].sql, "select true");
        assert_eq!(c[1].name, "orders arrived");
        assert_eq!((c[1].line, c[1].database.as_str()), (6, "shop"));
        assert_eq!(c[1].sql, "select count(*) > 0\n  from orders");
        assert_eq!(c[2].name, "select 1 = 1");
        assert_eq!(c[2].database, "postgres");
        assert!(parse_checks("-- nothing\n\n").is_empty());
    }
}
