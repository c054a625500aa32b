//! The plan of a restore's writes, in a scratch database on disk: one row
//! per piece of a stored object (grouped by object, in stored order) and
//! one per file written as blocks; memory stays flat in the file count.

use serde::{Deserialize, Serialize};
use std::sync::Arc;

use crate::catalog::scratch::{self, Row, Scratch};
use crate::error::{Error, Result};
use crate::pg::datadir;
use crate::repo::blockmap::{self, Part, Ranges};
use crate::repo::filelist::{object_group, LocalFileList};
use crate::repo::manifest::FileEntry;

use super::blocks::DeltaBlocks;

/// Rows added to the scratch database at once.
pub(super) const BATCH: usize = 4096;

/// What one stored object gives to one file, as the scratch database
/// keeps it.
#[derive(Serialize, Deserialize)]
pub(super) struct PieceRow {
    pub(super) file: FileEntry,
    /// The part of the file this is (`None`: the whole file).
    pub(super) part: Option<Part>,
    /// The blocks of that part no newer part holds.
    pub(super) owned: Ranges,
}

/// What planning the restore found, besides its scratch database.
pub(super) struct Planned {
    /// The entry of `global/pg_control`, written apart, last.
    pub(super) control: Option<FileEntry>,
    pub(super) delta: bool,
    /// Files `--delta` keeps as they are (every block matches).
    pub(super) kept: usize,
    /// `--delta` with block sums: what the comparison found.
    pub(super) delta_blocks: Option<DeltaBlocks>,
}

/// A `mapped` row's `o`: the file is created (truncated) at its size; kept
/// at its place with the blocks that differ written (`--delta` with block
/// sums); kept whole (every block matches).
pub(super) const MAPPED_NEW: i64 = 0;
pub(super) const MAPPED_IN_PLACE: i64 = 1;
pub(super) const MAPPED_KEPT: i64 = 2;

/// Streams the file list of backup `label` into a scratch database: table
/// `pieces`, one row per piece of an object, grouped by object (`g`
/// `<backup>/<object>`) in stored order; `mapped`, the files written as
/// blocks (stored as block maps, or with `--delta` and block sums, kept in
/// place with only their differing blocks, `diffs`, written).
pub(super) fn plan_pieces(
    list: &LocalFileList,
    label: &str,
    delta: bool,
    diffs: Option<(scratch::Shared, DeltaBlocks)>,
) -> Result<(scratch::Shared, Planned)> {
    let mut s = Scratch::new(&["pieces", "mapped"])?;
    let mut planned = Planned {
        control: None,
        delta,
        kept: 0,
        delta_blocks: diffs.as_ref().map(|(_, d)| d.clone()),
    };
    // The blocks of a file on disk that differ from the backup's, and
    // whether it has the backup's size.
    let differ_of = |path: &str| -> Result<Option<(Ranges, bool)>> {
        let Some((db, _)) = &diffs else {
            return Ok(None);
        };
        let row = db
            .lock()
            .map_err(|_| Error::internal("scratch database: a thread failed holding it"))?
            .get("diffs", path)?;
        row.map(|r| Ok((from_json::<Ranges>(&r.v, "differing blocks")?, r.o == 1)))
            .transpose()
    };
    let (mut pieces, mut mapped) = (Vec::new(), Vec::new());
    for f in list.iter()? {
        let f = f?;
        if f.path == datadir::PG_CONTROL {
            planned.control = Some(f);
            continue;
        }
        let (differ, same_size) = match differ_of(&f.path)? {
            Some((d, same)) => (Some(d), same),
            None => (None, false),
        };
        if f.parts.is_empty() && differ.is_none() {
            let backup = f.backup.as_deref().unwrap_or(label);
            pieces.push(Row {
                k: f.path.clone(),
                g: object_group(backup, &f.object),
                o: f.offset as i64,
                w: f.length as i64,
                v: Vec::new(),
            });
            let row = PieceRow {
                file: f,
                part: None,
                owned: Vec::new(),
            };
            pieces.last_mut().expect("just pushed").v = json(&row)?;
        } else if same_size && differ.as_ref().is_some_and(|d| d.is_empty()) {
            planned.kept += 1;
            mapped.push(Row {
                k: f.path.clone(),
                o: MAPPED_KEPT,
                v: json(&f)?,
                ..Row::default()
            });
        } else {
            let parts = blockmap::parts_of(&f, label);
            let owned = blockmap::owned(&parts, f.size);
            for (i, (part, owned)) in parts.into_iter().zip(owned).enumerate() {
                let owned = match &differ {
                    Some(d) => blockmap::intersect(&owned, d),
                    None => owned,
                };
                if owned.is_empty() {
                    continue;
                }
                let (g, o, w) = (
                    object_group(&part.backup, &part.object),
                    part.offset as i64,
                    part.length as i64,
                );
                let row = PieceRow {
                    file: f.clone(),
                    part: Some(part),
                    owned,
                };
                pieces.push(Row {
                    k: format!("{}\0{i}", f.path),
                    g,
                    o,
                    w,
                    v: json(&row)?,
                });
            }
            mapped.push(Row {
                k: f.path.clone(),
                o: if differ.is_some() {
                    MAPPED_IN_PLACE
                } else {
                    MAPPED_NEW
                },
                v: json(&f)?,
                ..Row::default()
            });
        }
        for (table, rows) in [("pieces", &mut pieces), ("mapped", &mut mapped)] {
            if rows.len() >= BATCH {
                s.insert(table, rows)?;
                rows.clear();
            }
        }
    }
    s.insert("pieces", &pieces)?;
    s.insert("mapped", &mapped)?;
    s.index("pieces")?;
    Ok((s.shared(), planned))
}

/// With `delta`, every path of the list, in a scratch database (table
/// `files`), for `--delta` to remove what the backup does not have;
/// without, an empty one.
pub(super) fn listed_paths(list: &LocalFileList, delta: bool) -> Result<scratch::Shared> {
    let mut s = Scratch::new(&["files"])?;
    if delta {
        let mut files = Vec::new();
        for f in list.iter()? {
            files.push(Row {
                k: f?.path,
                ..Row::default()
            });
            if files.len() >= BATCH {
                s.insert("files", &files)?;
                files.clear();
            }
        }
        s.insert("files", &files)?;
    }
    Ok(s.shared())
}

/// A row's value in the scratch database.
pub(super) fn json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::internal(format!("serialize: {e}")))
}

pub(super) fn from_json<T: serde::de::DeserializeOwned>(v: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(v).map_err(|e| Error::internal(format!("read back {what}: {e}")))
}

/// What one stored object gives to the data directory.
pub(super) enum Piece {
    /// A whole file.
    Whole(FileEntry),
    /// The blocks of a part that no newer part holds (`blockmap::owned`).
    Blocks {
        file: Arc<FileEntry>,
        part: Part,
        owned: Ranges,
    },
}

impl Piece {
    pub(super) fn offset(&self) -> u64 {
        match self {
            Piece::Whole(f) => f.offset,
            Piece::Blocks { part, .. } => part.offset,
        }
    }
    pub(super) fn length(&self) -> u64 {
        match self {
            Piece::Whole(f) => f.length,
            Piece::Blocks { part, .. } => part.length,
        }
    }
}
