//! Scratch space on disk: where commands that go through more files than
//! memory should hold sort and join them (issue 14). Backup keeps its walk
//! of the data directory, its reference's file list and the entries its
//! workers made here; restore and verify group a backup's files by the
//! object that stores them.
//!
//! SQLite in a temporary file with a small page cache: memory stays a few
//! MiB whatever the number of rows, and its sorter spills to disk. Every
//! table has the same columns — a unique key `k` (a path), a group `g`
//! (an object), an order `o` and a weight `w` (an offset and a length, or
//! a size) and a value `v` (JSON) — and readers page through it, a bounded
//! batch at a time, so no reader holds all its rows and no lock is held
//! between pages (workers insert into one table while another is read).

use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};

/// Page cache of a scratch database, in KiB.
const CACHE_KIB: i64 = 2048;
/// Rows fetched per page by the readers.
const PAGE: usize = 512;

/// One row of a scratch table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Row {
    pub k: String,
    pub g: String,
    pub o: i64,
    pub w: i64,
    pub v: Vec<u8>,
}

/// A temporary SQLite database, removed when dropped.
pub struct Scratch {
    conn: Connection,
    _dir: tempfile::TempDir,
}

/// A scratch database shared between threads (one at a time, a page at a
/// time).
pub type Shared = Arc<Mutex<Scratch>>;

/// A scratch error: SQLite's, or the temporary directory's.
#[derive(Debug, thiserror::Error)]
#[error("scratch database: {0}")]
pub struct ScratchError(String);

impl From<rusqlite::Error> for ScratchError {
    fn from(e: rusqlite::Error) -> Self {
        ScratchError(e.to_string())
    }
}

impl From<ScratchError> for crate::error::Error {
    fn from(e: ScratchError) -> Self {
        crate::error::Error::new(crate::error::Kind::Internal, e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, ScratchError>;

fn check_name(table: &str) -> Result<()> {
    if table.is_empty() || !table.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
        return Err(ScratchError(format!("bad table name {table:?}")));
    }
    Ok(())
}

fn lock(db: &Shared) -> Result<std::sync::MutexGuard<'_, Scratch>> {
    db.lock()
        .map_err(|_| ScratchError("a thread failed while holding it".into()))
}

impl Scratch {
    /// A new scratch database with `tables`, in a temporary directory of
    /// the system's (`TMPDIR`).
    pub fn new(tables: &[&str]) -> Result<Scratch> {
        let dir = tempfile::Builder::new()
            .prefix("pgvault-scratch-")
            .tempdir()
            .map_err(|e| ScratchError(format!("create a temporary directory: {e}")))?;
        let conn = Connection::open(dir.path().join("scratch.db"))?;
        // Nothing here survives the process: no journal, no syncs; the
        // sorter's temporary files on disk, not in memory.
        conn.execute_batch(&format!(
            "PRAGMA journal_mode = OFF; PRAGMA synchronous = OFF;
             PRAGMA temp_store = FILE; PRAGMA cache_size = -{CACHE_KIB};"
        ))?;
        let s = Scratch { conn, _dir: dir };
        for t in tables {
            s.create_table(t)?;
        }
        Ok(s)
    }

    /// Adds table `table`, unless it is there already (several readers
    /// may keep their rows in one database).
    pub fn create_table(&self, table: &str) -> Result<()> {
        check_name(table)?;
        self.conn.execute_batch(&format!(
            "CREATE TABLE IF NOT EXISTS {table} (k TEXT PRIMARY KEY, g TEXT NOT NULL,
               o INTEGER NOT NULL, w INTEGER NOT NULL, v BLOB NOT NULL);"
        ))?;
        Ok(())
    }

    pub fn shared(self) -> Shared {
        Arc::new(Mutex::new(self))
    }

    /// Adds rows in one transaction; a key already there is an error.
    pub fn insert(&mut self, table: &str, rows: &[Row]) -> Result<()> {
        self.put(table, rows, "INSERT")
    }

    /// Adds rows in one transaction; a row with a key already there
    /// replaces it (the last one wins).
    pub fn replace(&mut self, table: &str, rows: &[Row]) -> Result<()> {
        self.put(table, rows, "INSERT OR REPLACE")
    }

    fn put(&mut self, table: &str, rows: &[Row], verb: &str) -> Result<()> {
        check_name(table)?;
        let tx = self.conn.transaction()?;
        {
            let mut st = tx.prepare_cached(&format!(
                "{verb} INTO {table} (k, g, o, w, v) VALUES (?1, ?2, ?3, ?4, ?5)"
            ))?;
            for r in rows {
                st.execute(params![r.k, r.g, r.o, r.w, r.v])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// The row of `table` with key `k`.
    pub fn get(&self, table: &str, k: &str) -> Result<Option<Row>> {
        check_name(table)?;
        Ok(self
            .conn
            .prepare_cached(&format!("SELECT k, g, o, w, v FROM {table} WHERE k = ?1"))?
            .query_row(params![k], row)
            .optional()?)
    }

    pub fn count(&self, table: &str) -> Result<u64> {
        check_name(table)?;
        let n: i64 = self
            .conn
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))?;
        Ok(n as u64)
    }

    /// The sums of `o` and of `w` over the table.
    pub fn sums(&self, table: &str) -> Result<(i64, i64)> {
        check_name(table)?;
        Ok(self.conn.query_row(
            &format!("SELECT coalesce(sum(o), 0), coalesce(sum(w), 0) FROM {table}"),
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?)
    }

    /// Makes reading by weight, and by group, fast: indexes built once,
    /// after the rows are in (cheaper than keeping them up to date).
    pub fn index(&self, table: &str) -> Result<()> {
        check_name(table)?;
        self.conn.execute_batch(&format!(
            "CREATE INDEX IF NOT EXISTS {table}_w ON {table} (w, k);
             CREATE INDEX IF NOT EXISTS {table}_g ON {table} (g, o);"
        ))?;
        Ok(())
    }

    /// The groups of `table` as a table of their own (`grp_<table>`): one
    /// row per group, its key the group, `w` the sum of its rows' weights.
    fn group_table(&self, table: &str) -> Result<String> {
        check_name(table)?;
        let grp = format!("grp_{table}");
        self.conn.execute_batch(&format!(
            "DROP TABLE IF EXISTS {grp};
             CREATE TABLE {grp} AS SELECT g AS k, '' AS g, 0 AS o, sum(w) AS w, x'' AS v
               FROM {table} GROUP BY g;
             CREATE INDEX {grp}_w ON {grp} (w, k);"
        ))?;
        Ok(grp)
    }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        k: r.get(0)?,
        g: r.get(1)?,
        o: r.get(2)?,
        w: r.get(3)?,
        v: r.get(4)?,
    })
}

/// How [`Rows`] walks a table.
#[derive(Debug, Clone)]
enum Walk {
    /// By key (path order).
    ByKey,
    /// Heaviest first (then by key, descending), each row with the value
    /// of the row of table `join` with the same key, if any.
    HeaviestFirst { join: Option<String> },
    /// By key, only the rows (of group `group`, if given) whose key table
    /// `other` does not have: an anti-join.
    Unmatched {
        other: String,
        group: Option<String>,
    },
}

/// Every row of a table, a page at a time (with [`Rows::heaviest_first`]
/// and a join, each with its partner in the other table).
pub struct Rows {
    db: Shared,
    table: String,
    walk: Walk,
    page: std::vec::IntoIter<Joined>,
    after: Option<(i64, String)>,
    done: bool,
}

/// A row and, when the walk joins another table, that table's value for
/// the same key.
#[derive(Debug, Clone)]
pub struct Joined {
    pub row: Row,
    pub other: Option<Vec<u8>>,
}

impl Rows {
    /// The rows of `table` in key order.
    pub fn by_key(db: Shared, table: &str) -> Rows {
        Rows::new(db, table, Walk::ByKey)
    }

    /// The rows of `table` (only those of group `group`, if given) whose
    /// key is not in table `other`, in key order.
    pub fn unmatched(db: Shared, table: &str, other: &str, group: Option<&str>) -> Rows {
        Rows::new(
            db,
            table,
            Walk::Unmatched {
                other: other.to_string(),
                group: group.map(str::to_string),
            },
        )
    }

    /// The rows of `table`, heaviest first, each with the value of
    /// `join`'s row of the same key (a left join: `None` when it has none).
    /// Call [`Scratch::index`] on `table` first.
    pub fn heaviest_first(db: Shared, table: &str, join: Option<&str>) -> Rows {
        Rows::new(
            db,
            table,
            Walk::HeaviestFirst {
                join: join.map(str::to_string),
            },
        )
    }

    fn new(db: Shared, table: &str, walk: Walk) -> Rows {
        Rows {
            db,
            table: table.to_string(),
            walk,
            page: Vec::new().into_iter(),
            after: None,
            done: false,
        }
    }

    fn next_page(&self) -> Result<Vec<Joined>> {
        check_name(&self.table)?;
        let db = lock(&self.db)?;
        let t = &self.table;
        let limit = PAGE as i64;
        let plain = |r: &rusqlite::Row<'_>| {
            Ok(Joined {
                row: row(r)?,
                other: None,
            })
        };
        let rows = match &self.walk {
            // Keyset paging: a plain range on the key (no OR with a
            // parameter, which would keep SQLite from using the index and
            // make every page a scan and sort of the whole table).
            Walk::ByKey => {
                let after = self.after.as_ref().map_or(String::new(), |a| a.1.clone());
                let mut st = db.conn.prepare_cached(&format!(
                    "SELECT k, g, o, w, v FROM {t} WHERE k > ?1 ORDER BY k LIMIT ?2"
                ))?;
                let v = st
                    .query_map(params![after, limit], plain)?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                v
            }
            Walk::Unmatched { other, group } => {
                check_name(other)?;
                let after = self.after.as_ref().map_or(String::new(), |a| a.1.clone());
                // `?3 IS NULL OR`: one statement with and without a group;
                // the range on the key keeps the walk on the index.
                let mut st = db.conn.prepare_cached(&format!(
                    "SELECT k, g, o, w, v FROM {t} a WHERE a.k > ?1
                       AND (?3 IS NULL OR a.g = ?3)
                       AND NOT EXISTS (SELECT 1 FROM {other} b WHERE b.k = a.k)
                     ORDER BY a.k LIMIT ?2"
                ))?;
                let v = st
                    .query_map(params![after, limit, group], plain)?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                v
            }
            Walk::HeaviestFirst { join } => {
                // Before the first page: above every row (weights are
                // sizes and lengths, never i64::MAX).
                let (w, k) = self.after.clone().unwrap_or((i64::MAX, String::new()));
                let (cols, from) = match join {
                    Some(j) => {
                        check_name(j)?;
                        (
                            "a.k, a.g, a.o, a.w, a.v, b.v".to_string(),
                            format!("{t} a LEFT JOIN {j} b ON b.k = a.k"),
                        )
                    }
                    None => ("a.k, a.g, a.o, a.w, a.v, NULL".into(), format!("{t} a")),
                };
                let mut st = db.conn.prepare_cached(&format!(
                    "SELECT {cols} FROM {from} WHERE (a.w, a.k) < (?1, ?2)
                     ORDER BY a.w DESC, a.k DESC LIMIT ?3"
                ))?;
                let v = st
                    .query_map(params![w, k, limit], |r| {
                        Ok(Joined {
                            row: row(r)?,
                            other: r.get(5)?,
                        })
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                v
            }
        };
        Ok(rows)
    }
}

impl Iterator for Rows {
    type Item = Result<Joined>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(j) = self.page.next() {
                self.after = Some((j.row.w, j.row.k.clone()));
                return Some(Ok(j));
            }
            if self.done {
                return None;
            }
            match self.next_page() {
                Ok(p) => {
                    self.done = p.len() < PAGE;
                    self.page = p.into_iter();
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// The groups of a table (rows sharing `g`), heaviest group first (the
/// sum of its rows' `w`), each with its rows ordered by `o`: one group at
/// a time in memory.
pub struct Groups {
    db: Shared,
    table: String,
    groups: Rows,
    len: u64,
}

impl Groups {
    /// Call [`Scratch::index`] on `table` first.
    pub fn heaviest_first(db: Shared, table: &str) -> Result<Groups> {
        let (grp, len) = {
            let s = lock(&db)?;
            let grp = s.group_table(table)?;
            let len = s.count(&grp)?;
            (grp, len)
        };
        Ok(Groups {
            groups: Rows::heaviest_first(db.clone(), &grp, None),
            db,
            table: table.to_string(),
            len,
        })
    }

    /// How many groups there are.
    pub fn count_groups(&self) -> u64 {
        self.len
    }
}

impl Iterator for Groups {
    /// The group and its rows.
    type Item = Result<(String, Vec<Row>)>;

    fn next(&mut self) -> Option<Self::Item> {
        let g = match self.groups.next()? {
            Ok(g) => g.row.k,
            Err(e) => return Some(Err(e)),
        };
        let rows = (|| -> Result<Vec<Row>> {
            check_name(&self.table)?;
            let db = lock(&self.db)?;
            let mut st = db.conn.prepare_cached(&format!(
                "SELECT k, g, o, w, v FROM {} WHERE g = ?1 ORDER BY o, k",
                self.table
            ))?;
            let v = st
                .query_map(params![g], row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(v)
        })();
        Some(rows.map(|r| (g, r)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every page must be an index range, not a scan and sort of the table
    /// (a million rows in 2,000 pages would be 2,000 sorts).
    #[test]
    fn pages_are_index_ranges() {
        let s = Scratch::new(&["t", "u"]).unwrap();
        s.index("t").unwrap();
        let plan = |sql: &str| -> String {
            let mut st = s
                .conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .unwrap();
            let rows = st.query_map([], |r| r.get::<_, String>(3)).unwrap();
            rows.map(|r| r.unwrap()).collect::<Vec<_>>().join("; ")
        };
        let by_key = plan("SELECT k FROM t WHERE k > 'a' ORDER BY k LIMIT 5");
        assert!(!by_key.contains("TEMP B-TREE"), "{by_key}");
        let heavy = plan(
            "SELECT a.k, b.v FROM t a LEFT JOIN u b ON b.k = a.k WHERE (a.w, a.k) < (5, 'a')
             ORDER BY a.w DESC, a.k DESC LIMIT 5",
        );
        assert!(!heavy.contains("TEMP B-TREE"), "{heavy}");
        assert!(heavy.contains("t_w"), "{heavy}");
    }

    fn r(k: &str, g: &str, o: i64, w: i64) -> Row {
        Row {
            k: k.into(),
            g: g.into(),
            o,
            w,
            v: k.as_bytes().to_vec(),
        }
    }

    #[test]
    fn rows_come_back_sorted_joined_and_grouped_a_page_at_a_time() {
        let mut s = Scratch::new(&["t", "u"]).unwrap();
        let rows: Vec<Row> = (0..2000)
            .map(|i| {
                let k = format!("k{:05}", (i * 7919) % 2000);
                r(&k, &format!("g{}", i % 7), i % 13, i % 101)
            })
            .collect();
        s.insert("t", &rows).unwrap();
        s.insert("u", &[r("k00005", "", 0, 0)]).unwrap();
        assert!(
            s.insert("t", &[r("k00005", "", 0, 0)]).is_err(),
            "duplicate key"
        );
        assert_eq!(s.count("t").unwrap(), 2000);
        assert_eq!(s.get("t", "k00005").unwrap().unwrap().k, "k00005");
        assert_eq!(s.get("t", "nope").unwrap(), None);
        s.index("t").unwrap();
        let db = s.shared();
        let keys: Vec<String> = Rows::by_key(db.clone(), "t")
            .map(|r| r.unwrap().row.k)
            .collect();
        assert_eq!(keys.len(), 2000);
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        let heavy: Vec<Joined> = Rows::heaviest_first(db.clone(), "t", Some("u"))
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(heavy.len(), 2000);
        assert!(heavy.windows(2).all(|w| w[0].row.w >= w[1].row.w));
        let joined: Vec<&Joined> = heavy.iter().filter(|j| j.other.is_some()).collect();
        assert_eq!(joined.len(), 1);
        assert_eq!(joined[0].row.k, "k00005");
        let groups: Vec<(String, Vec<Row>)> = Groups::heaviest_first(db, "t")
            .unwrap()
            .map(|g| g.unwrap())
            .collect();
        assert_eq!(groups.len(), 7);
        assert_eq!(groups.iter().map(|g| g.1.len()).sum::<usize>(), 2000);
        let sums: Vec<i64> = groups
            .iter()
            .map(|g| g.1.iter().map(|r| r.w).sum())
            .collect();
        assert!(sums.windows(2).all(|w| w[0] >= w[1]));
        assert!(groups
            .iter()
            .all(|g| g.1.windows(2).all(|w| w[0].o <= w[1].o)));
    }

    /// The anti-join: the rows of a table (of one group, or all) whose key
    /// the other table has not, in key order, across pages.
    #[test]
    fn unmatched_rows_page_through_in_key_order() {
        let mut s = Scratch::new(&["t", "u"]).unwrap();
        let rows: Vec<Row> = (0..1500)
            .map(|i| r(&format!("k{i:05}"), &format!("g{}", i % 2), 0, 0))
            .collect();
        s.insert("t", &rows).unwrap();
        let even: Vec<Row> = (0..1500)
            .step_by(3)
            .map(|i| r(&format!("k{i:05}"), "", 0, 0))
            .collect();
        s.insert("u", &even).unwrap();
        s.replace("u", &even[..2]).unwrap();
        let db = s.shared();
        let keys = |g: Option<&str>| -> Vec<String> {
            Rows::unmatched(db.clone(), "t", "u", g)
                .map(|r| r.unwrap().row.k)
                .collect()
        };
        let all = keys(None);
        assert_eq!(all.len(), 1000);
        assert!(all.windows(2).all(|w| w[0] < w[1]));
        let odd = keys(Some("g1"));
        assert_eq!(odd.len(), 500);
        assert!(odd.iter().all(|k| {
            let i: u32 = k[1..].parse().unwrap();
            i % 2 == 1 && i % 3 != 0
        }));
    }
}
